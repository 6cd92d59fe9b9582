//! The port stage: which port a frame from a VM came in on (the ifindex of
//! its host-side interface → the port's entry), counted on that port.
use aya_ebpf::programs::TcContext;
use cloison_abi::DropReason;

use crate::{
    decision::Decision,
    hdr::copy,
    maps::{count_from_vm, CL_PORTS},
};

#[inline(always)]
pub fn identify(ctx: &TcContext, d: &mut Decision) -> Result<(), DropReason> {
    d.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The kernel takes an 802.1Q tag off before tc and keeps it beside the
    // frame: carried on, the VM's VID and priority would reach the
    // underlay and its peers. A VM port carries untagged frames only.
    let tagged = unsafe { (*ctx.skb.skb).vlan_present } != 0;
    let info = CL_PORTS
        .get_ptr(&d.ifindex)
        .ok_or(DropReason::UnknownPort)?;
    unsafe { copy(&mut d.port, info) };
    count_from_vm(d.port.slot, ctx.len());
    if tagged {
        return Err(DropReason::VlanTaggedFromVm);
    }
    Ok(())
}
