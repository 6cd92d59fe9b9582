//! Local answers: ARP requests and IPv6 neighbour solicitations for addresses
//! the controller knows in the port's network are answered here, back to the
//! asking port. Nothing is flooded.
use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::generated::bpf_redirect, programs::TcContext};
use cloison_abi::{DropReason, NeighbourKey, PortInfo};

use crate::{
    hdr::*,
    maps::{count_to_vm, v4_mapped, NEIGHBOURS},
    spoof,
};

#[inline(always)]
fn neighbour(vni: u32, addr: [u8; 16]) -> Option<[u8; 6]> {
    let key = NeighbourKey { vni, addr };
    NEIGHBOURS.get_ptr(&key).map(|n| unsafe { (*n).mac })
}

#[inline(always)]
fn redirect_back(ctx: &TcContext, ifindex: u32, port: &PortInfo) -> Result<i32, DropReason> {
    count_to_vm(port.slot, ctx.len());
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(TC_ACT_REDIRECT)
}

#[inline(never)]
pub fn arp(ctx: &TcContext, ifindex: u32, port: &PortInfo) -> Result<i32, DropReason> {
    let c = &Cursor::new(ctx.data(), ctx.data_end());
    let secure = port.flags & cloison_abi::PORT_F_SECURITY != 0;
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    let arp: *mut ArpHdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedArp)?;
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };
    if secure {
        spoof::check_arp(eth, arp, ifindex, port)?;
    }
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

#[repr(C)]
struct NaReply {
    ip: [u8; 40],
    icmp: [u8; NA_LEN],
}

#[inline(never)]
pub fn nd(ctx: &TcContext, port: &PortInfo, ifindex: u32) -> Result<i32, DropReason> {
    let c = &Cursor::new(ctx.data(), ctx.data_end());
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    let ip: *mut Ipv6Hdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedIpv6)?;
    let (eth, ip) = unsafe { (&*eth, &*ip) };
    let ns: *mut [u8; NS_MIN_LEN] = c.at(ETH_LEN + 40).ok_or(DropReason::NdMalformed)?;
    let ns = unsafe { &*ns };
    if be16(ip.payload_len) < NS_MIN_LEN as u16 || ip.hop_limit != 255 || ns[1] != 0 {
        return Err(DropReason::NdMalformed);
    }
    if ip.src == [0; 16] {
        // Duplicate address detection: never answered, the VM keeps its address.
        return Err(DropReason::NdDadProbe);
    }
    let mut target = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        target[i] = ns[8 + i];
        i += 1;
    }
    let mac = neighbour(port.vni, target).ok_or(DropReason::NdUnknownTarget)?;
    let asker_mac = eth.src;
    let asker_ip = ip.src;

    let mut r = NaReply {
        ip: [0; 40],
        icmp: [0; NA_LEN],
    };
    r.ip[0] = 0x60;
    r.ip[5] = NA_LEN as u8;
    r.ip[6] = IPPROTO_ICMPV6;
    r.ip[7] = 255;
    let mut i = 0;
    while i < 16 {
        r.ip[8 + i] = target[i];
        r.ip[24 + i] = asker_ip[i];
        r.icmp[8 + i] = target[i];
        i += 1;
    }
    r.icmp[0] = 136;
    r.icmp[4] = 0x60; // solicited, override
    r.icmp[24] = 2; // target link-layer address
    r.icmp[25] = 1;
    let mut i = 0;
    while i < 6 {
        r.icmp[26 + i] = mac[i];
        i += 1;
    }
    let mut sum = (NA_LEN as u32) + IPPROTO_ICMPV6 as u32;
    let mut i = 8;
    while i < 40 {
        sum += ((r.ip[i] as u32) << 8) | r.ip[i + 1] as u32;
        i += 2;
    }
    sum = csum_words(&r.icmp, sum);
    let csum = csum_fold(sum).to_be_bytes();
    r.icmp[2] = csum[0];
    r.icmp[3] = csum[1];

    let want = (ETH_LEN + 40 + NA_LEN) as u32;
    if ctx.len() != want {
        let rc = unsafe { aya_ebpf::helpers::generated::bpf_skb_change_tail(ctx.skb.skb, want, 0) };
        if rc != 0 {
            return Err(DropReason::NdMalformed);
        }
    }
    let mut macs = [0u8; 12];
    let mut i = 0;
    while i < 6 {
        macs[i] = asker_mac[i];
        macs[6 + i] = mac[i];
        i += 1;
    }
    ctx.store(0, &macs, 0).map_err(|_| DropReason::NdMalformed)?;
    ctx.store(ETH_LEN, &r, 0).map_err(|_| DropReason::NdMalformed)?;
    redirect_back(ctx, ifindex, port)
}
