//! Anti-spoofing: a port with port security sends only from its MAC and its
//! addresses (or an allowed address pair), never acts as a DHCP server or an
//! IPv6 router (judged by the final header, past any extension headers:
//! RFC 7113), and advertises only its own addresses as neighbour targets.
use cloison_abi::{DropReason, PortInfo};

use crate::{hdr::*, maps::allowed_mac, parse::*};

#[inline(always)]
pub fn check_ip(
    c: &Cursor,
    eth: &EthHdr,
    ifindex: u32,
    port: &PortInfo,
    p: &Parsed,
) -> Result<(), DropReason> {
    let unspecified = is_zero16(&p.src) || eq16(&p.src, &v4_mapped([0; 4]));
    if unspecified {
        // Address-less packets a VM must be able to send before it has an
        // address: DHCPv4 discovery, IPv6 DAD / MLD, and router
        // solicitations (RFC 4861 6.3.7).
        let ok = match p.l3 {
            L3::Ipv4 => p.proto == IPPROTO_UDP && p.sport == 68 && p.dport == 67,
            _ => {
                p.proto == IPPROTO_ICMPV6
                    && (p.icmp_type == 135 || p.icmp_type == 143 || p.icmp_type == 133)
            }
        };
        if !ok {
            return Err(DropReason::SpoofedIp);
        }
        if !mac_eq(&eth.src, &port.mac) {
            return Err(DropReason::SpoofedMac);
        }
    } else {
        match allowed_mac(ifindex, p.src) {
            Some(mac) if mac_eq(&mac, &eth.src) => {}
            Some(_) => return Err(DropReason::SpoofedMac),
            None => return Err(DropReason::SpoofedIp),
        }
    }
    if p.proto == IPPROTO_UDP
        && ((p.l3 == L3::Ipv4 && p.sport == 67) || (p.l3 == L3::Ipv6 && p.sport == 547))
    {
        return Err(DropReason::DhcpServerFromVm);
    }
    if p.l3 == L3::Ipv6 && p.proto == IPPROTO_ICMPV6 && p.icmp_type == 134 {
        return Err(DropReason::RouterAdvertFromVm);
    }
    if p.l3 == L3::Ipv6 && p.proto == IPPROTO_ICMPV6 && p.icmp_type == 136 {
        // A neighbour advertisement speaks for its target: only one of the
        // sender's own addresses (else it takes over a neighbour's traffic).
        if p.l4_off > crate::parse::MAX_L4_OFFSET {
            return Err(DropReason::NdMalformed);
        }
        let target: *mut [u8; 16] = c.at(p.l4_off + 8).ok_or(DropReason::NdMalformed)?;
        match allowed_mac(ifindex, unsafe { *target }) {
            Some(mac) if mac_eq(&mac, &eth.src) => {}
            _ => return Err(DropReason::NdSpoofedTarget),
        }
    }
    Ok(())
}

/// ARP sender fields: the sender MAC is the frame's source, and the sender
/// address is one of the port's (0.0.0.0 for an ARP probe from its own MAC).
#[inline(always)]
pub fn check_arp(c: &Cursor, ifindex: u32, port: &PortInfo) -> Result<(), DropReason> {
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    let arp: *mut ArpHdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedArp)?;
    let (eth, arp) = unsafe { (&*eth, &*arp) };
    if !mac_eq(&arp.sha, &eth.src) {
        return Err(DropReason::SpoofedArp);
    }
    if ip4_eq(&arp.spa, &[0; 4]) {
        if !mac_eq(&eth.src, &port.mac) {
            return Err(DropReason::SpoofedArp);
        }
        return Ok(());
    }
    match allowed_mac(ifindex, v4_mapped(arp.spa)) {
        Some(mac) if mac_eq(&mac, &arp.sha) => Ok(()),
        _ => Err(DropReason::SpoofedArp),
    }
}
