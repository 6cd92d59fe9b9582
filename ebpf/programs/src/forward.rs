//! Forwarding by (VNI, destination MAC): a local port gets the frame by
//! redirect, a remote one inside VXLAN. Oversized packets for a remote port get an ICMP error
//! back instead of a silent drop.
use aya_ebpf::programs::TcContext;
use cloison_abi::*;

use crate::{
    decision::*,
    hdr::*,
    maps::{count_to_vm, forward},
    packet::redirect_tc,
    parse::{segment_len, Parsed, L3},
};

/// Delivers a frame from a port's TC hook into a local port's VM.
#[inline(always)]
pub fn deliver(fwd: &ForwardEntry, bytes: u32) -> i32 {
    count_to_vm(fwd.slot, bytes);
    redirect_tc(fwd, true)
}

pub fn from_port(
    ctx: &TcContext,
    c: &Cursor,
    ifindex: u32,
    port: &PortInfo,
    p: &Parsed,
    peer: &mut ForwardEntry,
) -> Result<Next, DropReason> {
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    let dst = unsafe { (*eth).dst };
    if is_multicast_mac(&dst) {
        return Err(if mac_eq(&dst, &[0xff; 6]) {
            DropReason::Broadcast
        } else {
            DropReason::Multicast
        });
    }
    let fwd = forward(port.vni, dst).ok_or(DropReason::UnknownUnicast)?;
    *peer = fwd;
    if fwd.kind == FWD_LOCAL {
        if fwd.ifindex == ifindex {
            return Err(DropReason::Hairpin);
        }
        return Ok(Next::of(NEXT_LOCAL, 0));
    }
    if segment_len(ctx, c, p) > port.mtu as usize {
        let kind = if p.l3 == L3::Ipv4 {
            NEXT_TOO_BIG_V4
        } else {
            NEXT_TOO_BIG_V6
        };
        return Ok(Next::of(kind, 0));
    }
    Ok(Next::of(NEXT_ENCAP, 0))
}
