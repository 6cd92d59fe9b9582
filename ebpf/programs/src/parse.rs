//! Parsing of the frame a VM sent: Ethernet, then ARP, IPv4 or IPv6, then the
//! L4 header where one matters. Each header is bounds checked once; anything
//! short or inconsistent is an error with its own drop reason.
use cloison_abi::DropReason;

use crate::hdr::*;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    Arp,
    Ipv4,
    Ipv6,
}

/// What the later stages need to know of a frame. All zeroes is a valid
/// (empty) value, which [`frame`] starts from.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Parsed {
    pub l3: L3,
    /// Offset of the L4 header (IPv4/IPv6 only).
    pub l4_off: usize,
    /// L4 protocol (IPv4 protocol or IPv6 next header).
    pub proto: u8,
    /// Source and destination IP, IPv4-mapped for IPv4.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Non-first IPv4 fragment: no L4 header in it.
    pub later_fragment: bool,
    /// IPv4 first fragment of several (more-fragments set, offset 0).
    pub first_fragment: bool,
    /// IPv4 identification (fragment reassembly key).
    pub ip_id: [u8; 2],
    /// TCP/UDP ports, 0 where absent. ICMP echo: the identifier as the
    /// requester's port (`sport` of a request, `dport` of a reply).
    pub sport: u16,
    pub dport: u16,
    pub icmp_type: u8,
    pub tcp_flags: u8,
    /// IP packet length (IPv4 total length / IPv6 40 + payload).
    pub ip_len: usize,
}

#[inline(always)]
pub fn ethernet(c: &Cursor) -> Result<(&EthHdr, u16), DropReason> {
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    let eth = unsafe { &*eth };
    Ok((eth, be16(eth.proto)))
}

/// Fills `p` (written in place: a returned copy would cost BPF stack).
#[inline(always)]
pub fn frame(c: &Cursor, pkt_len: usize, p: &mut Parsed) -> Result<(), DropReason> {
    let (_, proto) = ethernet(c)?;
    unsafe { zero(p) };
    match proto {
        ETH_P_ARP => {
            let arp: *mut ArpHdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedArp)?;
            let arp = unsafe { &*arp };
            if be16(arp.htype) != 1 || be16(arp.ptype) != ETH_P_IP || arp.hlen != 6 || arp.plen != 4
            {
                return Err(DropReason::MalformedArp);
            }
            Ok(())
        }
        ETH_P_IP => {
            let ip: *mut Ipv4Hdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedIpv4)?;
            let ip = unsafe { &*ip };
            let ihl_bytes = ((ip.vihl & 0x0f) as usize) * 4;
            let tot = be16(ip.tot_len) as usize;
            if ip.vihl >> 4 != 4 || ihl_bytes < 20 || tot < ihl_bytes || ETH_LEN + tot > pkt_len {
                return Err(DropReason::MalformedIpv4);
            }
            let frag = be16(ip.frag);
            p.l3 = L3::Ipv4;
            p.l4_off = ETH_LEN + ihl_bytes;
            p.proto = ip.proto;
            p.src = v4_mapped(ip.src);
            p.dst = v4_mapped(ip.dst);
            p.later_fragment = frag & 0x1fff != 0;
            p.first_fragment = frag & 0x3fff == 0x2000;
            p.ip_id = ip.id;
            p.ip_len = tot;
            if !p.later_fragment {
                l4(c, p)?;
            }
            Ok(())
        }
        ETH_P_IPV6 => {
            let ip: *mut Ipv6Hdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedIpv6)?;
            let ip = unsafe { &*ip };
            let plen = be16(ip.payload_len) as usize;
            if ip.vtcfl[0] >> 4 != 6 || ETH_LEN + 40 + plen > pkt_len {
                return Err(DropReason::MalformedIpv6);
            }
            p.l3 = L3::Ipv6;
            p.l4_off = ETH_LEN + 40;
            p.proto = ip.next_header;
            copy16(&mut p.src, &ip.src);
            copy16(&mut p.dst, &ip.dst);
            p.ip_len = 40 + plen;
            l4(c, p)?;
            Ok(())
        }
        _ => Err(DropReason::UnsupportedEthertype),
    }
}

#[inline(always)]
fn l4(c: &Cursor, p: &mut Parsed) -> Result<(), DropReason> {
    let off = p.l4_off;
    match p.proto {
        IPPROTO_TCP => {
            let t: *mut TcpHdr = c.at(off).ok_or(DropReason::TruncatedL4)?;
            let t = unsafe { &*t };
            if (t.off >> 4) < 5 {
                return Err(DropReason::TruncatedL4);
            }
            p.sport = be16(t.sport);
            p.dport = be16(t.dport);
            p.tcp_flags = t.flags;
        }
        IPPROTO_UDP => {
            let u: *mut UdpHdr = c.at(off).ok_or(DropReason::TruncatedL4)?;
            let u = unsafe { &*u };
            p.sport = be16(u.sport);
            p.dport = be16(u.dport);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let i: *mut IcmpHdr = c.at(off).ok_or(DropReason::TruncatedL4)?;
            let i = unsafe { &*i };
            p.icmp_type = i.ty;
            let id = be16([i.rest[0], i.rest[1]]);
            match (p.proto, i.ty) {
                (IPPROTO_ICMP, ICMP_ECHO_REQUEST) | (IPPROTO_ICMPV6, ICMPV6_ECHO_REQUEST) => {
                    p.sport = id
                }
                (IPPROTO_ICMP, ICMP_ECHO_REPLY) | (IPPROTO_ICMPV6, ICMPV6_ECHO_REPLY) => {
                    p.dport = id
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}
