//! Parsing of the frame a VM sent: Ethernet, then ARP, IPv4 or IPv6 (its
//! extension headers walked to the real upper-layer header), then the L4
//! header where one matters. Each header is bounds checked once, against
//! the packet and against the IP length (trailer bytes past it are not the
//! packet's); anything short or inconsistent is an error with its own drop
//! reason.
use cloison_abi::DropReason;

use crate::hdr::*;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    Arp,
    Ipv4,
    Ipv6,
}

/// IPv6 extension headers walked before giving up (RFC 8200's recommended
/// order has at most six, RFC 7112 wants the whole chain in the first
/// fragment).
pub const MAX_EXT_HEADERS: usize = 6;
/// The upper-layer header must start within this many bytes of the frame:
/// the headers the programs read are pulled into the linear area.
pub const MAX_L4_OFFSET: usize = 128;

const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AUTH: u8 = 51;
const EXT_DEST_OPTS: u8 = 60;

/// What the later stages need to know of a frame. All zeroes is a valid
/// (empty) value, which [`frame`] starts from.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Parsed {
    pub l3: L3,
    /// Offset of the upper-layer header (IPv4/IPv6 only), after any IPv6
    /// extension headers.
    pub l4_off: usize,
    /// The upper-layer protocol: IPv4's protocol, or the next header that
    /// ends IPv6's chain of extension headers.
    pub proto: u8,
    /// IPv6 extension headers walked (RA and ND must come without any).
    pub ext_headers: u8,
    /// Source and destination IP, IPv4-mapped for IPv4.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// A non-first fragment: no upper-layer header in it.
    pub later_fragment: bool,
    /// The first fragment of several (more fragments, offset 0). An atomic
    /// fragment (offset 0, no more) is neither: a whole packet.
    pub first_fragment: bool,
    /// The identification of a fragmented datagram (IPv4: 16 bits).
    pub frag_id: u32,
    /// TCP/UDP ports, 0 where absent. ICMP echo: the identifier as the
    /// requester's port (`sport` of a request, `dport` of a reply).
    pub sport: u16,
    pub dport: u16,
    pub icmp_type: u8,
    pub tcp_flags: u8,
    /// IP packet length (IPv4 total length / IPv6 40 + payload).
    pub ip_len: usize,
}

impl Parsed {
    /// An ICMP or ICMPv6 error message (it quotes another packet).
    #[inline(always)]
    pub fn is_icmp_error(&self) -> bool {
        match (self.l3, self.proto) {
            (L3::Ipv4, IPPROTO_ICMP) => matches!(self.icmp_type, 3 | 11 | 12),
            (L3::Ipv6, IPPROTO_ICMPV6) => matches!(self.icmp_type, 1..=4),
            _ => false,
        }
    }
}

/// The IP length of the packets this frame will be on the wire: a GSO frame
/// is judged by its segment size, not its total length.
#[inline(always)]
pub fn segment_len(ctx: &aya_ebpf::programs::TcContext, c: &Cursor, p: &Parsed) -> usize {
    let gso_size = unsafe { (*ctx.skb.skb).gso_size } as usize;
    if gso_size == 0 || p.l3 == L3::Arp {
        return p.ip_len;
    }
    let l4_hdr = match p.proto {
        IPPROTO_TCP => match c.at::<TcpHdr>(p.l4_off) {
            Some(t) => ((unsafe { (*t).off } >> 4) as usize) * 4,
            None => 20,
        },
        _ => 8,
    };
    (p.l4_off - ETH_LEN) + l4_hdr + gso_size
}

#[inline(always)]
pub fn ethernet(c: &Cursor) -> Result<(&EthHdr, u16), DropReason> {
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    let eth = unsafe { &*eth };
    Ok((eth, be16(eth.proto)))
}

/// `::ffff:0:0/96`: never on the wire (RFC 4291 2.5.5.2); a VM sending it
/// would share IPv4's anti-spoofing entries and conntrack state.
#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    let w = a.as_ptr() as *const u64;
    let (hi, lo) = unsafe {
        (
            core::ptr::read_unaligned(w),
            core::ptr::read_unaligned(w.add(1)),
        )
    };
    hi == 0 && (u64::from_be(lo) >> 32) == 0xffff
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
            p.frag_id = be16(ip.id) as u32;
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
            if is_v4_mapped(&ip.src) || is_v4_mapped(&ip.dst) {
                return Err(DropReason::Ipv6V4Mapped);
            }
            p.l3 = L3::Ipv6;
            copy16(&mut p.src, &ip.src);
            copy16(&mut p.dst, &ip.dst);
            p.ip_len = 40 + plen;
            extension_headers(c, ip.next_header, p)?;
            if !p.later_fragment {
                l4(c, p)?;
            }
            Ok(())
        }
        // A tag left in the frame (stacked, or not offloaded): as for the
        // kernel's untagging (see port.rs), a VM sends untagged frames only.
        0x8100 | 0x88a8 => Err(DropReason::VlanTaggedFromVm),
        _ => Err(DropReason::UnsupportedEthertype),
    }
}

/// Walks IPv6's extension headers from `next` (the fixed header's next
/// header) to the upper-layer header: sets `l4_off`, `proto`,
/// `ext_headers`, and a fragment header's offset, flag and identification.
/// A chain longer than [`MAX_EXT_HEADERS`], or reaching past the headers
/// read or the packet, is refused.
#[inline(always)]
fn extension_headers(c: &Cursor, mut next: u8, p: &mut Parsed) -> Result<(), DropReason> {
    let end = ETH_LEN + p.ip_len;
    let mut off = ETH_LEN + 40;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        let len = match next {
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS => {
                let h: *mut [u8; 2] = c.at(off).ok_or(DropReason::Ipv6ExtensionHeaders)?;
                let h = unsafe { &*h };
                next = h[0];
                (h[1] as usize + 1) * 8
            }
            EXT_AUTH => {
                let h: *mut [u8; 2] = c.at(off).ok_or(DropReason::Ipv6ExtensionHeaders)?;
                let h = unsafe { &*h };
                next = h[0];
                (h[1] as usize + 2) * 4
            }
            EXT_FRAGMENT => {
                let h: *mut [u8; 8] = c.at(off).ok_or(DropReason::Ipv6ExtensionHeaders)?;
                let h = unsafe { &*h };
                next = h[0];
                let offset_flags = be16([h[2], h[3]]);
                p.later_fragment = offset_flags & 0xfff8 != 0;
                p.first_fragment = offset_flags & 0xfff9 == 1;
                p.frag_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                8
            }
            _ => break,
        };
        off += len;
        if off > MAX_L4_OFFSET || off > end {
            return Err(DropReason::Ipv6ExtensionHeaders);
        }
        p.ext_headers += 1;
        i += 1;
    }
    if matches!(
        next,
        EXT_HOP_BY_HOP | EXT_ROUTING | EXT_FRAGMENT | EXT_AUTH | EXT_DEST_OPTS
    ) {
        return Err(DropReason::Ipv6ExtensionHeaders);
    }
    p.l4_off = off;
    p.proto = next;
    Ok(())
}

#[inline(always)]
fn l4(c: &Cursor, p: &mut Parsed) -> Result<(), DropReason> {
    let off = p.l4_off;
    // The header must lie within the IP packet, not in the frame's trailer.
    let ip_end = ETH_LEN + p.ip_len;
    let within = |len: usize| off + len <= ip_end;
    match p.proto {
        IPPROTO_TCP => {
            let t: *mut TcpHdr = c.at(off).ok_or(DropReason::TruncatedL4)?;
            let t = unsafe { &*t };
            if (t.off >> 4) < 5 || !within(20) {
                return Err(DropReason::TruncatedL4);
            }
            p.sport = be16(t.sport);
            p.dport = be16(t.dport);
            p.tcp_flags = t.flags;
        }
        IPPROTO_UDP => {
            let u: *mut UdpHdr = c.at(off).ok_or(DropReason::TruncatedL4)?;
            let u = unsafe { &*u };
            if !within(8) {
                return Err(DropReason::TruncatedL4);
            }
            p.sport = be16(u.sport);
            p.dport = be16(u.dport);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let i: *mut IcmpHdr = c.at(off).ok_or(DropReason::TruncatedL4)?;
            let i = unsafe { &*i };
            if !within(8) {
                return Err(DropReason::TruncatedL4);
            }
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
