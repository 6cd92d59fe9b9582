//! Local answers: ARP requests and IPv6 neighbour solicitations for addresses
//! the controller knows in the port's network are answered here, back to the
//! asking port. Nothing is flooded.
use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::generated::bpf_redirect, programs::TcContext};
use cloison_abi::{DropReason, PortInfo};

use crate::{
    hdr::*,
    maps::{count_to_vm, neighbour},
};

#[inline(always)]
fn redirect_back(ctx: &TcContext, ifindex: u32, port: &PortInfo) -> Result<i32, DropReason> {
    count_to_vm(port.slot, ctx.len());
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(TC_ACT_REDIRECT)
}

/// Answers an ARP request (its sender fields already checked by the
/// anti-spoofing stage where the port has port security).
#[inline(always)]
pub fn arp(ctx: &TcContext, ifindex: u32, port: &PortInfo) -> Result<i32, DropReason> {
    let c = &Cursor::new(ctx.data(), ctx.data_end());
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    let arp: *mut ArpHdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedArp)?;
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };
    match be16(arp.op) {
        1 => {}
        2 => return Err(DropReason::ArpReplyFromVm),
        _ => return Err(DropReason::MalformedArp),
    }
    if ip4_eq(&arp.tpa, &arp.spa) {
        return Err(DropReason::ArpSelfTarget);
    }
    let mac = neighbour(port.vni, v4_mapped(arp.tpa)).ok_or(DropReason::ArpUnknownTarget)?;
    if mac_eq(&mac, &eth.src) {
        return Err(DropReason::ArpSelfTarget);
    }
    // The request becomes the reply in place.
    let asker_mac = arp.sha;
    let asker_ip = arp.spa;
    let target_ip = arp.tpa;
    eth.dst = eth.src;
    eth.src = mac;
    arp.op = 2u16.to_be_bytes();
    arp.tha = asker_mac;
    arp.tpa = asker_ip;
    arp.sha = mac;
    arp.spa = target_ip;
    redirect_back(ctx, ifindex, port)
}

const NS_MIN_LEN: usize = 24;
/// A neighbour advertisement with the target link-layer address option.
const NA_LEN: usize = 32;

/// The whole reply frame, written straight into the packet.
#[repr(C)]
struct NaFrame {
    eth: EthHdr,
    ip: Ipv6Hdr,
    ty: u8,
    code: u8,
    csum: [u8; 2],
    flags: [u8; 4],
    target: [u8; 16],
    opt_type: u8,
    opt_len: u8,
    opt_mac: [u8; 6],
}

/// Answers a neighbour solicitation.
#[inline(always)]
pub fn nd(ctx: &TcContext, port: &PortInfo, ifindex: u32) -> Result<i32, DropReason> {
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    let ip: *mut Ipv6Hdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedIpv6)?;
    let (eth, ip) = unsafe { (&*eth, &*ip) };
    let ns: *mut [u8; NS_MIN_LEN] = c.at(ETH_LEN + 40).ok_or(DropReason::NdMalformed)?;
    let ns = unsafe { &*ns };
    if be16(ip.payload_len) < NS_MIN_LEN as u16 || ip.hop_limit != 255 || ns[1] != 0 {
        return Err(DropReason::NdMalformed);
    }
    if is_zero16(&ip.src) {
        // Duplicate address detection: never answered, the VM keeps its address.
        return Err(DropReason::NdDadProbe);
    }
    let target: [u8; 16] = unsafe { *(ns.as_ptr().add(8) as *const [u8; 16]) };
    let mac = neighbour(port.vni, target).ok_or(DropReason::NdUnknownTarget)?;
    let asker_mac = eth.src;
    let asker_ip = ip.src;

    let want = (ETH_LEN + 40 + NA_LEN) as u32;
    if ctx.len() != want {
        let rc = unsafe { aya_ebpf::helpers::generated::bpf_skb_change_tail(ctx.skb.skb, want, 0) };
        if rc != 0 {
            return Err(DropReason::NdMalformed);
        }
    }
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let f: *mut NaFrame = c.at(0).ok_or(DropReason::NdMalformed)?;
    let f = unsafe { &mut *f };
    f.eth.dst = asker_mac;
    f.eth.src = mac;
    f.eth.proto = ETH_P_IPV6.to_be_bytes();
    f.ip.vtcfl = [0x60, 0, 0, 0];
    f.ip.payload_len = (NA_LEN as u16).to_be_bytes();
    f.ip.next_header = IPPROTO_ICMPV6;
    f.ip.hop_limit = 255;
    f.ip.src = target;
    f.ip.dst = asker_ip;
    f.ty = 136;
    f.code = 0;
    f.csum = [0; 2];
    f.flags = [0x60, 0, 0, 0]; // solicited, override
    f.target = target;
    f.opt_type = 2; // target link-layer address
    f.opt_len = 1;
    f.opt_mac = mac;
    // Pseudo header (addresses, length, next header) and body are contiguous
    // from the source address on.
    let sum =
        csum_packet::<{ 32 + NA_LEN }>(&c, ETH_LEN + 8)? + NA_LEN as u32 + IPPROTO_ICMPV6 as u32;
    f.csum = csum_fold(sum).to_be_bytes();
    redirect_back(ctx, ifindex, port)
}
