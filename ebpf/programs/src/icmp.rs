//! ICMP errors sent back to a VM: "fragmentation needed" (IPv4 with DF) and
//! ICMPv6 "packet too big" for a packet that does not fit the network MTU
//! (or, routed, the destination network's: then from the router's
//! address), and "time exceeded" from the router's address for a routed
//! packet whose TTL or hop limit runs out. The frame is turned into the
//! error in place: headers inserted in front of the original IP packet,
//! which is then cut to a fixed quote (a shorter one is padded with zeros;
//! its own header says its length).
use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_REDIRECT},
    helpers::generated::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use cloison_abi::{gateway_mac, DropReason, PortInfo};

use crate::{
    hdr::*,
    maps::{count_drop, count_to_vm, route, router_iface},
    parse::{Parsed, L3},
};

/// Which error.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Too big for the network: from the destination's address.
    TooBig,
    /// Too big for the routed-to network: from the router's address.
    TooBigRouted,
    /// A routed packet's TTL or hop limit ran out: from the router's address.
    TimeExceeded,
}

/// Bytes of the offending packet quoted in the error. Networks have an MTU of
/// at least 576 (validated by the controller), so every oversized packet has
/// this many bytes.
pub const QUOTE_LEN: usize = 128;
const ICMP_LEN: usize = 8 + QUOTE_LEN;

#[repr(C)]
struct V4Error {
    eth: EthHdr,
    ip: Ipv4Hdr,
    icmp: IcmpHdr,
}

#[repr(C)]
struct V6Error {
    eth: EthHdr,
    ip: Ipv6Hdr,
    icmp: IcmpHdr,
}

#[inline(always)]
pub fn error(
    ctx: &TcContext,
    ifindex: u32,
    port: &PortInfo,
    v4: bool,
    error: Error,
) -> Result<i32, DropReason> {
    let reason = if error == Error::TimeExceeded {
        DropReason::TtlExceeded
    } else {
        DropReason::MtuExceeded
    };
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    let (vm_mac, peer_mac) = unsafe { ((*eth).src, (*eth).dst) };
    let (src, mut dst) = if v4 {
        let ip: *mut Ipv4Hdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedIpv4)?;
        let ip = unsafe { &*ip };
        if error != Error::TimeExceeded && be16(ip.frag) & 0x4000 == 0 {
            // No DF: the VM did not ask for path MTU discovery; nothing to tell it.
            return Err(DropReason::MtuExceeded);
        }
        (v4_mapped(ip.src), v4_mapped(ip.dst))
    } else {
        let ip: *mut Ipv6Hdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedIpv6)?;
        let ip = unsafe { &*ip };
        (ip.src, ip.dst)
    };
    let mut mtu = port.mtu;
    if error != Error::TooBig {
        // From the router's address in the sender's network.
        let rif = router_iface(port.vni).ok_or(reason)?;
        if error == Error::TooBigRouted {
            mtu = route(rif.router, dst).ok_or(reason)?.mtu;
        }
        dst = if v4 { v4_mapped(rif.gw4) } else { rif.gw6 };
    }

    let ip_hdr_len = if v4 { 20 } else { 40 };
    ctx.adjust_room((ip_hdr_len + 8) as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| reason)?;
    let total = ETH_LEN + ip_hdr_len + ICMP_LEN;
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, total as u32, 0) } != 0 {
        return Err(reason);
    }
    ctx.pull_data(total as u32).map_err(|_| reason)?;
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let time = error == Error::TimeExceeded;
    if v4 {
        let f: *mut V4Error = c.at(0).ok_or(reason)?;
        let f = unsafe { &mut *f };
        f.eth.dst = vm_mac;
        f.eth.src = peer_mac;
        f.eth.proto = ETH_P_IP.to_be_bytes();
        f.ip.vihl = 0x45;
        f.ip.tos = 0xc0;
        f.ip.tot_len = ((20 + ICMP_LEN) as u16).to_be_bytes();
        f.ip.id = [0; 2];
        f.ip.frag = [0; 2];
        f.ip.ttl = 64;
        f.ip.proto = IPPROTO_ICMP;
        f.ip.csum = [0; 2];
        f.ip.src = [dst[12], dst[13], dst[14], dst[15]];
        f.ip.dst = [src[12], src[13], src[14], src[15]];
        f.icmp.csum = [0; 2];
        if time {
            f.icmp.ty = 11;
            f.icmp.code = 0;
            f.icmp.rest = [0; 4];
        } else {
            f.icmp.ty = 3;
            f.icmp.code = 4;
            let m = (mtu as u16).to_be_bytes();
            f.icmp.rest = [0, 0, m[0], m[1]];
        }
        let ip_sum = csum_packet::<20>(&c, ETH_LEN)?;
        f.ip.csum = csum_fold(ip_sum).to_be_bytes();
        let sum = csum_packet::<ICMP_LEN>(&c, ETH_LEN + 20)?;
        f.icmp.csum = csum_fold(sum).to_be_bytes();
    } else {
        let f: *mut V6Error = c.at(0).ok_or(reason)?;
        let f = unsafe { &mut *f };
        f.eth.dst = vm_mac;
        f.eth.src = peer_mac;
        f.eth.proto = ETH_P_IPV6.to_be_bytes();
        f.ip.vtcfl = [0x60, 0, 0, 0];
        f.ip.payload_len = (ICMP_LEN as u16).to_be_bytes();
        f.ip.next_header = IPPROTO_ICMPV6;
        f.ip.hop_limit = 64;
        f.ip.src = dst;
        f.ip.dst = src;
        f.icmp.ty = if time { 3 } else { 2 };
        f.icmp.code = 0;
        f.icmp.csum = [0; 2];
        f.icmp.rest = if time { [0; 4] } else { mtu.to_be_bytes() };
        // Pseudo header addresses and the body are contiguous.
        let sum = csum_packet::<{ 32 + ICMP_LEN }>(&c, ETH_LEN + 8)?
            + ICMP_LEN as u32
            + IPPROTO_ICMPV6 as u32;
        f.icmp.csum = csum_fold(sum).to_be_bytes();
    }
    // The original packet is dropped (counted here, once: a failure above is
    // counted by the entry point instead), its error delivered.
    count_drop(reason, port.slot);
    count_to_vm(port.slot, total as u32);
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(TC_ACT_REDIRECT)
}

/// The router's answer to an echo request from `port` to its address:
/// the request turned into the reply in place (addresses swapped, which
/// leaves the IP and pseudo-header sums as they are; the type changed,
/// its checksum mended), from the network's gateway MAC, back to the port.
#[inline(always)]
pub fn echo_reply(
    ctx: &TcContext,
    ifindex: u32,
    port: &PortInfo,
    p: &Parsed,
) -> Result<i32, DropReason> {
    let e = DropReason::TruncatedL4;
    let v4 = p.l3 == L3::Ipv4;
    // Parsed may live in map memory: bound the offset the verifier sees.
    if p.l4_off > crate::parse::MAX_L4_OFFSET {
        return Err(e);
    }
    let (src_at, len) = if v4 {
        (ETH_LEN + 12, 4)
    } else {
        (ETH_LEN + 8, 16)
    };
    let src: [u8; 16] = ctx.load(src_at).map_err(|_| e)?;
    let dst: [u8; 16] = ctx.load(src_at + len).map_err(|_| e)?;
    if v4 {
        ctx.store::<[u8; 4]>(src_at, &[dst[0], dst[1], dst[2], dst[3]], 0)
            .map_err(|_| e)?;
        ctx.store::<[u8; 4]>(src_at + 4, &[src[0], src[1], src[2], src[3]], 0)
            .map_err(|_| e)?;
    } else {
        ctx.store(src_at, &dst, 0).map_err(|_| e)?;
        ctx.store(src_at + 16, &src, 0).map_err(|_| e)?;
    }
    let (request, reply) = if v4 {
        (ICMP_ECHO_REQUEST, 0u8)
    } else {
        (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
    };
    let code: [u8; 1] = ctx.load(p.l4_off + 1).map_err(|_| e)?;
    let (from, to) = (
        u16::from_ne_bytes([request, code[0]]) as u64,
        u16::from_ne_bytes([reply, code[0]]) as u64,
    );
    ctx.l4_csum_replace(p.l4_off + 2, from, to, 2)
        .map_err(|_| e)?;
    ctx.store(p.l4_off, &reply, 0).map_err(|_| e)?;
    let gw = gateway_mac(port.vni);
    let m = port.mac;
    let eth = [
        m[0], m[1], m[2], m[3], m[4], m[5], gw[0], gw[1], gw[2], gw[3], gw[4], gw[5],
    ];
    ctx.store(0, &eth, 0).map_err(|_| e)?;
    count_to_vm(port.slot, ctx.len());
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(TC_ACT_REDIRECT)
}
