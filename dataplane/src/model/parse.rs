//! The model's reading of a frame: what later stages need, or why it is
//! not one (the same drop reasons as the programs).
use cloison_abi::DropReason::{self, *};

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

pub(crate) fn v4_mapped(a: &[u8]) -> [u8; 16] {
    let v4: [u8; 4] = a[..4].try_into().expect("4 bytes");
    crate::tables::ip16(std::net::Ipv4Addr::from(v4).into())
}

pub(crate) fn mac(b: &[u8], off: usize) -> [u8; 6] {
    b[off..off + 6].try_into().expect("6 bytes")
}

pub(crate) struct Parsed {
    pub l3: u16,
    pub l4_off: usize,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub later_fragment: bool,
    pub first_fragment: bool,
    /// The datagram's identification (IPv4's 16 bits, IPv6's 32).
    pub frag_id: u32,
    /// IPv6 extension headers before the upper-layer header.
    pub ext_headers: u8,
    pub sport: u16,
    pub dport: u16,
    pub icmp_type: u8,
    pub tcp_flags: u8,
    pub ip_len: usize,
}

impl Parsed {
    /// An ICMP or ICMPv6 error message (it quotes another packet).
    pub fn is_icmp_error(&self) -> bool {
        match (self.l3, self.proto) {
            (0x0800, 1) => matches!(self.icmp_type, 3 | 11 | 12),
            (0x86dd, 58) => matches!(self.icmp_type, 1..=4),
            _ => false,
        }
    }
}

pub(crate) fn parse(f: &[u8]) -> Result<Parsed, DropReason> {
    if f.len() < 14 {
        return Err(TruncatedEthernet);
    }
    let mut p = Parsed {
        l3: be16(f, 12),
        l4_off: 0,
        proto: 0,
        src: [0; 16],
        dst: [0; 16],
        later_fragment: false,
        first_fragment: false,
        frag_id: 0,
        ext_headers: 0,
        sport: 0,
        dport: 0,
        icmp_type: 0,
        tcp_flags: 0,
        ip_len: 0,
    };
    match p.l3 {
        0x0806 => {
            if f.len() < 14 + 28 {
                return Err(TruncatedArp);
            }
            if be16(f, 14) != 1 || be16(f, 16) != 0x0800 || f[18] != 6 || f[19] != 4 {
                return Err(MalformedArp);
            }
            Ok(p)
        }
        0x0800 => {
            if f.len() < 34 {
                return Err(TruncatedIpv4);
            }
            let ihl = (f[14] & 0x0f) as usize * 4;
            let tot = be16(f, 16) as usize;
            if f[14] >> 4 != 4 || ihl < 20 || tot < ihl || 14 + tot > f.len() {
                return Err(MalformedIpv4);
            }
            p.l4_off = 14 + ihl;
            p.proto = f[23];
            p.src = v4_mapped(&f[26..30]);
            p.dst = v4_mapped(&f[30..34]);
            p.ip_len = tot;
            let frag = be16(f, 20);
            p.later_fragment = frag & 0x1fff != 0;
            p.first_fragment = frag & 0x3fff == 0x2000;
            p.frag_id = be16(f, 18) as u32;
            if !p.later_fragment {
                l4(f, &mut p)?;
            }
            Ok(p)
        }
        0x86dd => {
            if f.len() < 54 {
                return Err(TruncatedIpv6);
            }
            let plen = be16(f, 18) as usize;
            if f[14] >> 4 != 6 || 54 + plen > f.len() {
                return Err(MalformedIpv6);
            }
            p.src.copy_from_slice(&f[22..38]);
            p.dst.copy_from_slice(&f[38..54]);
            // RFC 4291 2.5.5.2: IPv4-mapped addresses are not for the wire.
            let mapped = |a: &[u8; 16]| a[..10] == [0; 10] && a[10..12] == [0xff, 0xff];
            if mapped(&p.src) || mapped(&p.dst) {
                return Err(Ipv6V4Mapped);
            }
            p.ip_len = 40 + plen;
            walk_extensions(f, f[20], &mut p)?;
            if !p.later_fragment {
                l4(f, &mut p)?;
            }
            Ok(p)
        }
        0x8100 | 0x88a8 => Err(VlanTaggedFromVm),
        _ => Err(UnsupportedEthertype),
    }
}

/// IPv6's extension headers (RFC 8200 4.2-4.6, RFC 4302 for AH), at most
/// six, all within the first 128 bytes of the frame and the packet.
fn walk_extensions(f: &[u8], first: u8, p: &mut Parsed) -> Result<(), DropReason> {
    const HEADERS: [u8; 5] = [0, 43, 44, 51, 60];
    let end = 14 + p.ip_len;
    let (mut next, mut at) = (first, 54usize);
    for _ in 0..6 {
        if !HEADERS.contains(&next) {
            break;
        }
        let need = if next == 44 { 8 } else { 2 };
        let h = f.get(at..at + need).ok_or(Ipv6ExtensionHeaders)?;
        let len = match next {
            44 => {
                let offset_flags = u16::from_be_bytes([h[2], h[3]]);
                p.later_fragment = offset_flags >> 3 != 0;
                p.first_fragment = offset_flags & 0xfff9 == 1;
                p.frag_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                8
            }
            51 => (h[1] as usize + 2) * 4,
            _ => (h[1] as usize + 1) * 8,
        };
        next = h[0];
        at += len;
        if at > 128 || at > end {
            return Err(Ipv6ExtensionHeaders);
        }
        p.ext_headers += 1;
    }
    if HEADERS.contains(&next) {
        return Err(Ipv6ExtensionHeaders);
    }
    (p.l4_off, p.proto) = (at, next);
    Ok(())
}

fn l4(f: &[u8], p: &mut Parsed) -> Result<(), DropReason> {
    let o = p.l4_off;
    let need = match p.proto {
        6 => 20,
        17 | 1 | 58 => 8,
        _ => return Ok(()),
    };
    // In the frame, and within the IP packet (not its Ethernet trailer).
    if f.len() < o + need || o + need > 14 + p.ip_len {
        return Err(TruncatedL4);
    }
    match p.proto {
        6 => {
            if f[o + 12] >> 4 < 5 {
                return Err(TruncatedL4);
            }
            (p.sport, p.dport) = (be16(f, o), be16(f, o + 2));
            p.tcp_flags = f[o + 13];
        }
        17 => (p.sport, p.dport) = (be16(f, o), be16(f, o + 2)),
        _ => {
            p.icmp_type = f[o];
            let id = be16(f, o + 4);
            match (p.proto, f[o]) {
                (1, 8) | (58, 128) => p.sport = id,
                (1, 0) | (58, 129) => p.dport = id,
                _ => {}
            }
        }
    }
    Ok(())
}
