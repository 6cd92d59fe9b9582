//! ICMP "fragmentation needed" (IPv4 with DF) and ICMPv6 "packet too big"
//! sent back to a VM whose packet does not fit the network MTU. The frame is
//! turned into the error in place: headers inserted in front of the original
//! IP packet, which is then cut to a fixed quote.
use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_REDIRECT},
    helpers::generated::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use cloison_abi::{DropReason, PortInfo};

use crate::{
    hdr::*,
    maps::{count_drop, count_to_vm},
    parse::{Parsed, L3},
};

/// Bytes of the offending packet quoted in the error. Networks have an MTU of
/// at least 576 (validated by the controller), so every oversized packet has
/// this many bytes.
pub const QUOTE_LEN: usize = 128;
const ICMP_LEN: usize = 8 + QUOTE_LEN;

#[inline(never)]
pub fn too_big(
    ctx: &TcContext,
    ifindex: u32,
    port: &PortInfo,
    p: &Parsed,
) -> Result<i32, DropReason> {
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    let (vm_mac, peer_mac) = unsafe { ((*eth).src, (*eth).dst) };
    let v4 = p.l3 == L3::Ipv4;
    let (src, dst, ip_hdr_len) = if v4 {
        let ip: *mut Ipv4Hdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedIpv4)?;
        let ip = unsafe { &*ip };
        if be16(ip.frag) & 0x4000 == 0 {
            // No DF: the VM did not ask for path MTU discovery; nothing to tell it.
            return Err(DropReason::MtuExceeded);
        }
        (crate::maps::v4_mapped(ip.src), crate::maps::v4_mapped(ip.dst), 20usize)
    } else {
        let ip: *mut Ipv6Hdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedIpv6)?;
        let ip = unsafe { &*ip };
        (ip.src, ip.dst, 40usize)
    };
    count_drop(DropReason::MtuExceeded, port.slot);

    let hdr_len = ip_hdr_len + 8;
    ctx.adjust_room(hdr_len as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| DropReason::MtuExceeded)?;
    let total = ETH_LEN + hdr_len + QUOTE_LEN;
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, total as u32, 0) } != 0 {
        return Err(DropReason::MtuExceeded);
    }
    ctx.pull_data(total as u32).map_err(|_| DropReason::MtuExceeded)?;

    let mut e = [0u8; 14];
    let mut i = 0;
    while i < 6 {
        e[i] = vm_mac[i];
        e[6 + i] = peer_mac[i];
        i += 1;
    }
    e[12] = if v4 { 0x08 } else { 0x86 };
    e[13] = if v4 { 0x00 } else { 0xdd };
    ctx.store(0, &e, 0).map_err(|_| DropReason::MtuExceeded)?;

    let mtu = port.mtu;
    let mut sum: u32;
    if v4 {
        let tot = ((20 + ICMP_LEN) as u16).to_be_bytes();
        let mut ip = [
            0x45, 0xc0, tot[0], tot[1], 0, 0, 0, 0, 64, IPPROTO_ICMP, 0, 0, dst[12], dst[13],
            dst[14], dst[15], src[12], src[13], src[14], src[15],
        ];
        let csum = crate::vxlan::ipv4_csum(&ip);
        ip[10] = csum[0];
        ip[11] = csum[1];
        ctx.store(ETH_LEN, &ip, 0).map_err(|_| DropReason::MtuExceeded)?;
        let m = (mtu as u16).to_be_bytes();
        let icmp = [3u8, 4, 0, 0, 0, 0, m[0], m[1]];
        ctx.store(ETH_LEN + 20, &icmp, 0).map_err(|_| DropReason::MtuExceeded)?;
        sum = 0;
    } else {
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        let pl = (ICMP_LEN as u16).to_be_bytes();
        ip[4] = pl[0];
        ip[5] = pl[1];
        ip[6] = IPPROTO_ICMPV6;
        ip[7] = 64;
        let mut i = 0;
        while i < 16 {
            ip[8 + i] = dst[i];
            ip[24 + i] = src[i];
            i += 1;
        }
        ctx.store(ETH_LEN, &ip, 0).map_err(|_| DropReason::MtuExceeded)?;
        let m = mtu.to_be_bytes();
        let icmp = [2u8, 0, 0, 0, m[0], m[1], m[2], m[3]];
        ctx.store(ETH_LEN + 40, &icmp, 0).map_err(|_| DropReason::MtuExceeded)?;
        // Pseudo header: addresses, upper-layer length, next header.
        sum = ICMP_LEN as u32 + IPPROTO_ICMPV6 as u32;
        let mut i = 8;
        while i < 40 {
            sum += ((ip[i] as u32) << 8) | ip[i + 1] as u32;
            i += 2;
        }
    }

    let c = Cursor::new(ctx.data(), ctx.data_end());
    let off = ETH_LEN + ip_hdr_len;
    let body: *mut [u8; ICMP_LEN] = c.at(off).ok_or(DropReason::MtuExceeded)?;
    let partial = unsafe {
        bpf_csum_diff(core::ptr::null_mut(), 0, body as *mut u32, ICMP_LEN as u32, 0)
    };
    if partial < 0 {
        return Err(DropReason::MtuExceeded);
    }
    // bpf_csum_diff sums native-endian 32-bit words: fold, then bring to network order.
    let p32 = partial as u64;
    let mut s = (p32 & 0xffff) + (p32 >> 16);
    s = (s & 0xffff) + (s >> 16);
    let body_sum = (s as u16).swap_bytes() as u32;
    sum += body_sum;
    let csum = csum_fold(sum).to_be_bytes();
    ctx.store(off + 2, &csum, 0).map_err(|_| DropReason::MtuExceeded)?;

    count_to_vm(port.slot, total as u32);
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(TC_ACT_REDIRECT)
}
