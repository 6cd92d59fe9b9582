//! Frames as plain values ([`Frame`]) with [`Frame::emit`] and
//! [`Frame::parse`] as inverse functions, as smoltcp's `Repr` types are:
//! `parse(emit(f)) == f` for every frame the types can say (a property test
//! holds it). Checksums and lengths are computed on emit, checked on parse;
//! a test that wants a broken frame edits the emitted bytes.
//!
//! What the fixtures, the benches and the lab send and look at is built
//! here, once: Ethernet (optionally 802.1Q-tagged), ARP, IPv4 (options,
//! fragments), IPv6 (extension headers), UDP, TCP, ICMP/ICMPv6, VXLAN.
use std::net::{Ipv4Addr, Ipv6Addr};

pub type Mac = [u8; 6];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const VXLAN_PORT: u16 = 4789;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub dst: Mac,
    pub src: Mac,
    /// An 802.1Q tag: (priority, VLAN id).
    pub vlan: Option<(u8, u16)>,
    pub net: Net,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Net {
    Arp(Arp),
    Ipv4(Ipv4),
    Ipv6(Ipv6),
    /// Any other ethertype and its bytes.
    Other(u16, Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arp {
    /// 1 request, 2 reply.
    pub op: u16,
    pub sha: Mac,
    pub spa: Ipv4Addr,
    pub tha: Mac,
    pub tpa: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub id: u16,
    pub tos: u8,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// In 8-byte units.
    pub fragment_offset: u16,
    /// Options, a multiple of 4 bytes.
    pub options: Vec<u8>,
    /// A later fragment's payload is `L4::Other` (its bytes).
    pub payload: L4,
}

/// An IPv6 extension header: its next-header code and its body after the
/// two-byte (next header, length) start (for a fragment header, the six
/// bytes after the first two: offset and flags, then the identification).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ext {
    pub kind: u8,
    pub body: Vec<u8>,
}

pub const EXT_HOP_BY_HOP: u8 = 0;
pub const EXT_ROUTING: u8 = 43;
pub const EXT_FRAGMENT: u8 = 44;
pub const EXT_DEST_OPTS: u8 = 60;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    pub flow_label: u32,
    pub ext: Vec<Ext>,
    /// A later fragment's payload is `L4::Other` (its bytes).
    pub payload: L4,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Udp(Udp),
    Tcp(Tcp),
    /// ICMP (in IPv4) or ICMPv6 (in IPv6).
    Icmp(Icmp),
    /// Any other protocol number and its bytes.
    Other(u8, Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp {
    pub sport: u16,
    pub dport: u16,
    pub payload: Payload,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    Bytes(Vec<u8>),
    /// A VXLAN header (flags, VNI) and the frame it carries.
    Vxlan {
        flags: u8,
        vni: u32,
        inner: Box<Frame>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub payload: Vec<u8>,
}

/// Type, code, the four bytes after the checksum, then the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub ty: u8,
    pub code: u8,
    pub rest: [u8; 4],
    pub body: Vec<u8>,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Why bytes are not a frame of these types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(m.into()))
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn take<'a>(b: &'a [u8], at: usize, n: usize, what: &str) -> Result<&'a [u8], ParseError> {
    b.get(at..at + n)
        .ok_or_else(|| ParseError(format!("{what}: {n} bytes at {at}, {} there", b.len())))
}

/// The Internet checksum's one's complement sum, unfolded.
fn sum(bytes: &[u8], mut acc: u32) -> u32 {
    for c in bytes.chunks(2) {
        acc += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Whether `bytes` (checksum field included) sum to the Internet checksum.
pub fn checksum_ok(bytes: &[u8]) -> bool {
    fold(sum(bytes, 0)) == 0
}

/// The pseudo-header sum of an L4 segment of `len` bytes.
fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut acc = sum(src, 0);
    acc = sum(dst, acc);
    acc + proto as u32 + (len as u32 & 0xffff) + (len as u32 >> 16)
}

impl L4 {
    pub fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Udp(_) => PROTO_UDP,
            L4::Tcp(_) => PROTO_TCP,
            L4::Icmp(_) if v6 => PROTO_ICMPV6,
            L4::Icmp(_) => PROTO_ICMP,
            L4::Other(p, _) => *p,
        }
    }

    /// The segment's bytes, checksummed over the pseudo header of
    /// (source, destination, protocol); ICMP in IPv4 has none.
    pub fn emit(&self, src: &[u8], dst: &[u8], proto: u8) -> Vec<u8> {
        let mut out = match self {
            L4::Udp(u) => {
                let body = u.payload.emit();
                let mut v = Vec::with_capacity(8 + body.len());
                v.extend(u.sport.to_be_bytes());
                v.extend(u.dport.to_be_bytes());
                v.extend(((8 + body.len()) as u16).to_be_bytes());
                v.extend([0, 0]);
                v.extend(body);
                v
            }
            L4::Tcp(t) => {
                let mut v = Vec::with_capacity(20 + t.payload.len());
                v.extend(t.sport.to_be_bytes());
                v.extend(t.dport.to_be_bytes());
                v.extend(t.seq.to_be_bytes());
                v.extend(t.ack.to_be_bytes());
                v.extend([5 << 4, t.flags]);
                v.extend(t.window.to_be_bytes());
                v.extend([0, 0, 0, 0]);
                v.extend(&t.payload);
                v
            }
            L4::Icmp(i) => {
                let mut v = vec![i.ty, i.code, 0, 0];
                v.extend(i.rest);
                v.extend(&i.body);
                v
            }
            L4::Other(_, b) => return b.clone(),
        };
        let at = match self {
            L4::Udp(_) => 6,
            L4::Tcp(_) => 16,
            _ => 2,
        };
        let acc = if proto == PROTO_ICMP {
            0
        } else {
            pseudo(src, dst, proto, out.len())
        };
        let mut c = fold(sum(&out, acc));
        if matches!(self, L4::Udp(_)) && c == 0 {
            c = 0xffff;
        }
        out[at..at + 2].copy_from_slice(&c.to_be_bytes());
        out
    }

    fn parse(proto: u8, b: &[u8], src: &[u8], dst: &[u8]) -> Result<L4, ParseError> {
        let check = |acc: u32| {
            if fold(sum(b, acc)) == 0 {
                Ok(())
            } else {
                err(format!("bad checksum of protocol {proto}"))
            }
        };
        let full = pseudo(src, dst, proto, b.len());
        Ok(match proto {
            PROTO_UDP => {
                let h = take(b, 0, 8, "UDP")?;
                if be16(h, 4) as usize != b.len() {
                    return err("UDP length");
                }
                if be16(h, 6) != 0 {
                    check(full)?;
                }
                L4::Udp(Udp {
                    sport: be16(h, 0),
                    dport: be16(h, 2),
                    payload: Payload::parse(be16(h, 2), &b[8..]),
                })
            }
            PROTO_TCP => {
                let h = take(b, 0, 20, "TCP")?;
                if h[12] >> 4 != 5 {
                    return err("TCP options are not parsed here");
                }
                check(full)?;
                L4::Tcp(Tcp {
                    sport: be16(h, 0),
                    dport: be16(h, 2),
                    seq: be32(h, 4),
                    ack: be32(h, 8),
                    flags: h[13],
                    window: be16(h, 14),
                    payload: b[20..].to_vec(),
                })
            }
            PROTO_ICMP | PROTO_ICMPV6 => {
                let h = take(b, 0, 8, "ICMP")?;
                check(if proto == PROTO_ICMP { 0 } else { full })?;
                L4::Icmp(Icmp {
                    ty: h[0],
                    code: h[1],
                    rest: [h[4], h[5], h[6], h[7]],
                    body: b[8..].to_vec(),
                })
            }
            p => L4::Other(p, b.to_vec()),
        })
    }
}

impl Payload {
    fn emit(&self) -> Vec<u8> {
        match self {
            Payload::Bytes(b) => b.clone(),
            Payload::Vxlan { flags, vni, inner } => {
                let v = vni.to_be_bytes();
                let mut out = vec![*flags, 0, 0, 0, v[1], v[2], v[3], 0];
                out.extend(inner.emit());
                out
            }
        }
    }

    /// UDP to the VXLAN port with a VXLAN header and a whole frame behind
    /// it is VXLAN; anything else, bytes.
    fn parse(dport: u16, b: &[u8]) -> Payload {
        if dport == VXLAN_PORT && b.len() >= 8 + 14 && b[1..4] == [0; 3] && b[7] == 0 {
            if let Ok(inner) = Frame::parse(&b[8..]) {
                return Payload::Vxlan {
                    flags: b[0],
                    vni: u32::from_be_bytes([0, b[4], b[5], b[6]]),
                    inner: Box::new(inner),
                };
            }
        }
        Payload::Bytes(b.to_vec())
    }
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, payload: L4) -> Ipv4 {
        Ipv4 {
            src,
            dst,
            ttl: 64,
            id: 0,
            tos: 0,
            dont_fragment: false,
            more_fragments: false,
            fragment_offset: 0,
            options: vec![],
            payload,
        }
    }

    pub fn emit(&self) -> Vec<u8> {
        let (s, d) = (self.src.octets(), self.dst.octets());
        let proto = self.payload.proto(false);
        let body = self.payload.emit(&s, &d, proto);
        let ihl = 20 + self.options.len();
        let mut v = Vec::with_capacity(ihl + body.len());
        v.push(0x40 | (ihl / 4) as u8);
        v.push(self.tos);
        v.extend(((ihl + body.len()) as u16).to_be_bytes());
        v.extend(self.id.to_be_bytes());
        let frag = (self.dont_fragment as u16) << 14
            | (self.more_fragments as u16) << 13
            | self.fragment_offset;
        v.extend(frag.to_be_bytes());
        v.extend([self.ttl, proto, 0, 0]);
        v.extend(s);
        v.extend(d);
        v.extend(&self.options);
        let c = fold(sum(&v, 0));
        v[10..12].copy_from_slice(&c.to_be_bytes());
        v.extend(body);
        v
    }

    fn parse(b: &[u8]) -> Result<Ipv4, ParseError> {
        let h = take(b, 0, 20, "IPv4")?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if h[0] >> 4 != 4 || ihl < 20 {
            return err("IPv4 version or header length");
        }
        let hdr = take(b, 0, ihl, "IPv4 options")?;
        if !checksum_ok(hdr) {
            return err("IPv4 header checksum");
        }
        let tot = be16(h, 2) as usize;
        let body = b
            .get(ihl..tot)
            .ok_or_else(|| ParseError("IPv4 total length".into()))?;
        let frag = be16(h, 6);
        let offset = frag & 0x1fff;
        let payload = if offset != 0 {
            L4::Other(h[9], body.to_vec())
        } else {
            L4::parse(h[9], body, &h[12..16], &h[16..20])?
        };
        Ok(Ipv4 {
            src: Ipv4Addr::new(h[12], h[13], h[14], h[15]),
            dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]),
            ttl: h[8],
            id: be16(h, 4),
            tos: h[1],
            dont_fragment: frag & 0x4000 != 0,
            more_fragments: frag & 0x2000 != 0,
            fragment_offset: offset,
            options: hdr[20..].to_vec(),
            payload,
        })
    }
}

impl Ipv6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, payload: L4) -> Ipv6 {
        Ipv6 {
            src,
            dst,
            hop_limit: 64,
            flow_label: 0,
            ext: vec![],
            payload,
        }
    }

    pub fn emit(&self) -> Vec<u8> {
        let (s, d) = (self.src.octets(), self.dst.octets());
        let proto = self.payload.proto(true);
        let body = self.payload.emit(&s, &d, proto);
        let mut exts = Vec::new();
        for (i, e) in self.ext.iter().enumerate() {
            exts.push(self.ext.get(i + 1).map_or(proto, |n| n.kind));
            if e.kind == EXT_FRAGMENT {
                assert_eq!(e.body.len(), 6, "a fragment header is 8 bytes");
                exts.push(0);
            } else {
                assert!(
                    (e.body.len() + 2).is_multiple_of(8),
                    "an extension header is 8n bytes"
                );
                exts.push(((e.body.len() + 2) / 8 - 1) as u8);
            }
            exts.extend(&e.body);
        }
        let first = self.ext.first().map_or(proto, |e| e.kind);
        let mut v = Vec::with_capacity(40 + exts.len() + body.len());
        v.extend((6u32 << 28 | (self.flow_label & 0xfffff)).to_be_bytes());
        v.extend(((exts.len() + body.len()) as u16).to_be_bytes());
        v.extend([first, self.hop_limit]);
        v.extend(s);
        v.extend(d);
        v.extend(exts);
        v.extend(body);
        v
    }

    fn parse(b: &[u8]) -> Result<Ipv6, ParseError> {
        let h = take(b, 0, 40, "IPv6")?;
        if h[0] >> 4 != 6 {
            return err("IPv6 version");
        }
        let end = 40 + be16(h, 4) as usize;
        let b = b
            .get(..end)
            .ok_or_else(|| ParseError("IPv6 payload length".into()))?;
        let (mut next, mut at) = (h[6], 40);
        let mut ext = Vec::new();
        while matches!(
            next,
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_FRAGMENT | EXT_DEST_OPTS
        ) {
            let e = take(b, at, 8, "IPv6 extension header")?;
            let len = if next == EXT_FRAGMENT {
                8
            } else {
                (e[1] as usize + 1) * 8
            };
            let body = take(b, at + 2, len - 2, "IPv6 extension header")?;
            ext.push(Ext {
                kind: next,
                body: body.to_vec(),
            });
            next = e[0];
            at += len;
        }
        let later_fragment = ext
            .iter()
            .any(|e| e.kind == EXT_FRAGMENT && be16(&e.body, 0) & 0xfff8 != 0);
        let payload = if later_fragment {
            L4::Other(next, b[at..].to_vec())
        } else {
            L4::parse(next, &b[at..], &h[8..24], &h[24..40])?
        };
        Ok(Ipv6 {
            src: Ipv6Addr::from(<[u8; 16]>::try_from(&h[8..24]).unwrap()),
            dst: Ipv6Addr::from(<[u8; 16]>::try_from(&h[24..40]).unwrap()),
            hop_limit: h[7],
            flow_label: be32(h, 0) & 0xfffff,
            ext,
            payload,
        })
    }
}

impl Arp {
    fn emit(&self) -> Vec<u8> {
        let mut v = vec![0, 1, 0x08, 0, 6, 4];
        v.extend(self.op.to_be_bytes());
        v.extend(self.sha);
        v.extend(self.spa.octets());
        v.extend(self.tha);
        v.extend(self.tpa.octets());
        v
    }

    fn parse(b: &[u8]) -> Result<Arp, ParseError> {
        let h = take(b, 0, 28, "ARP")?;
        if h[0..6] != [0, 1, 0x08, 0, 6, 4] {
            return err("not Ethernet/IPv4 ARP");
        }
        let mac = |o: usize| -> Mac { h[o..o + 6].try_into().unwrap() };
        let ip = |o: usize| Ipv4Addr::new(h[o], h[o + 1], h[o + 2], h[o + 3]);
        Ok(Arp {
            op: be16(h, 6),
            sha: mac(8),
            spa: ip(14),
            tha: mac(18),
            tpa: ip(24),
        })
    }
}

impl Frame {
    pub fn ethertype(&self) -> u16 {
        match &self.net {
            Net::Arp(_) => ETH_P_ARP,
            Net::Ipv4(_) => ETH_P_IP,
            Net::Ipv6(_) => ETH_P_IPV6,
            Net::Other(t, _) => *t,
        }
    }

    pub fn emit(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(self.dst);
        v.extend(self.src);
        if let Some((pcp, vid)) = self.vlan {
            v.extend(ETH_P_8021Q.to_be_bytes());
            v.extend(((pcp as u16) << 13 | (vid & 0x0fff)).to_be_bytes());
        }
        v.extend(self.ethertype().to_be_bytes());
        v.extend(match &self.net {
            Net::Arp(a) => a.emit(),
            Net::Ipv4(ip) => ip.emit(),
            Net::Ipv6(ip) => ip.emit(),
            Net::Other(_, b) => b.clone(),
        });
        v
    }

    pub fn parse(b: &[u8]) -> Result<Frame, ParseError> {
        let h = take(b, 0, 14, "Ethernet")?;
        let mut et = be16(h, 12);
        let mut at = 14;
        let mut vlan = None;
        if et == ETH_P_8021Q {
            let t = take(b, 14, 4, "802.1Q")?;
            vlan = Some((t[0] >> 5, be16(t, 0) & 0x0fff));
            et = be16(t, 2);
            at = 18;
        }
        let body = &b[at..];
        let net = match et {
            ETH_P_ARP => Net::Arp(Arp::parse(body)?),
            ETH_P_IP => Net::Ipv4(Ipv4::parse(body)?),
            ETH_P_IPV6 => Net::Ipv6(Ipv6::parse(body)?),
            t => Net::Other(t, body.to_vec()),
        };
        Ok(Frame {
            dst: h[0..6].try_into().unwrap(),
            src: h[6..12].try_into().unwrap(),
            vlan,
            net,
        })
    }

    /// The L4 of an IP frame.
    pub fn l4(&self) -> Option<&L4> {
        match &self.net {
            Net::Ipv4(ip) => Some(&ip.payload),
            Net::Ipv6(ip) => Some(&ip.payload),
            _ => None,
        }
    }

    /// The frame a VXLAN frame carries.
    pub fn vxlan_inner(&self) -> Option<(u32, &Frame)> {
        match self.l4()? {
            L4::Udp(Udp {
                payload: Payload::Vxlan { vni, inner, .. },
                ..
            }) => Some((*vni, inner)),
            _ => None,
        }
    }
}

/// Short constructors for the frames tests send most.
pub mod build {
    use super::*;

    pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> L4 {
        L4::Udp(Udp {
            sport,
            dport,
            payload: Payload::Bytes(payload.to_vec()),
        })
    }

    pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> L4 {
        L4::Tcp(Tcp {
            sport,
            dport,
            seq: 1,
            ack: if flags & TCP_ACK != 0 { 1000 } else { 0 },
            flags,
            window: 65535,
            payload: payload.to_vec(),
        })
    }

    pub fn icmp(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> L4 {
        L4::Icmp(Icmp {
            ty,
            code,
            rest,
            body: body.to_vec(),
        })
    }

    /// An ICMP (or ICMPv6) echo request with identifier `id`.
    pub fn echo(v6: bool, id: u16) -> L4 {
        let i = id.to_be_bytes();
        icmp(if v6 { 128 } else { 8 }, 0, [i[0], i[1], 0, 1], b"ping")
    }

    pub fn v4(src: Mac, dst: Mac, s: [u8; 4], d: [u8; 4], l4: L4) -> Frame {
        Frame {
            dst,
            src,
            vlan: None,
            net: Net::Ipv4(Ipv4::new(s.into(), d.into(), l4)),
        }
    }

    pub fn v6(src: Mac, dst: Mac, s: Ipv6Addr, d: Ipv6Addr, l4: L4) -> Frame {
        Frame {
            dst,
            src,
            vlan: None,
            net: Net::Ipv6(Ipv6::new(s, d, l4)),
        }
    }

    pub fn arp(op: u16, sha: Mac, spa: [u8; 4], tpa: [u8; 4]) -> Frame {
        Frame {
            dst: [0xff; 6],
            src: sha,
            vlan: None,
            net: Net::Arp(Arp {
                op,
                sha,
                spa: spa.into(),
                tha: [0; 6],
                tpa: tpa.into(),
            }),
        }
    }

    /// `inner` in VXLAN (`flags`) over IPv4/UDP from `(mac, ip)` to `(mac, ip)`.
    pub fn vxlan(
        src: (Mac, [u8; 4]),
        dst: (Mac, [u8; 4]),
        flags: u8,
        vni: u32,
        inner: Frame,
    ) -> Frame {
        v4(
            src.0,
            dst.0,
            src.1,
            dst.1,
            L4::Udp(Udp {
                sport: 50000,
                dport: VXLAN_PORT,
                payload: Payload::Vxlan {
                    flags,
                    vni,
                    inner: Box::new(inner),
                },
            }),
        )
    }

    /// `f` with `edit` applied: a malformed variant of a valid frame.
    pub fn edited(f: &Frame, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = f.emit();
        edit(&mut b);
        b
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{build::*, *};

    fn any_l4() -> BoxedStrategy<L4> {
        prop_oneof![
            (
                any::<u16>(),
                1u16..4789,
                proptest::collection::vec(any::<u8>(), 0..40)
            )
                .prop_map(|(s, d, p)| udp(s, d, &p)),
            (
                any::<u16>(),
                any::<u16>(),
                any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..40)
            )
                .prop_map(|(s, d, f, p)| tcp(s, d, f, &p)),
            (
                any::<u8>(),
                any::<u8>(),
                any::<[u8; 4]>(),
                proptest::collection::vec(any::<u8>(), 0..40)
            )
                .prop_map(|(t, c, r, b)| icmp(t, c, r, &b)),
            (
                prop_oneof![Just(47u8), Just(132u8)],
                proptest::collection::vec(any::<u8>(), 0..20)
            )
                .prop_map(|(p, b)| L4::Other(p, b)),
        ]
        .boxed()
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        let v4 = (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<bool>(),
            any_l4(),
            0usize..3,
        )
            .prop_map(|(s, d, id, df, l4, opts)| {
                let mut ip = Ipv4::new(s.into(), d.into(), l4);
                ip.id = id;
                ip.dont_fragment = df;
                ip.options = vec![1; opts * 4];
                Net::Ipv4(ip)
            });
        let kinds = prop_oneof![Just(EXT_HOP_BY_HOP), Just(EXT_DEST_OPTS), Just(EXT_ROUTING)];
        let v6 = (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any_l4(),
            proptest::collection::vec(kinds, 0..3),
        )
            .prop_map(|(s, d, l4, kinds)| {
                let mut ip = Ipv6::new(s.into(), d.into(), l4);
                ip.ext = kinds
                    .into_iter()
                    .map(|kind| Ext {
                        kind,
                        body: vec![0; 6],
                    })
                    .collect();
                Net::Ipv6(ip)
            });
        let arp = (
            1u16..3,
            any::<[u8; 6]>(),
            any::<[u8; 4]>(),
            any::<[u8; 6]>(),
            any::<[u8; 4]>(),
        )
            .prop_map(|(op, sha, spa, tha, tpa)| {
                Net::Arp(Arp {
                    op,
                    sha,
                    spa: spa.into(),
                    tha,
                    tpa: tpa.into(),
                })
            });
        (
            any::<[u8; 6]>(),
            any::<[u8; 6]>(),
            proptest::option::of((0u8..8, 0u16..4096)),
            prop_oneof![v4, v6, arp],
        )
            .prop_map(|(dst, src, vlan, net)| Frame {
                dst,
                src,
                vlan,
                net,
            })
    }

    proptest! {
        #[test]
        fn parse_inverts_emit(f in any_frame()) {
            prop_assert_eq!(Frame::parse(&f.emit()).unwrap(), f);
        }

        #[test]
        fn vxlan_carries_a_frame_both_ways(inner in any_frame(), vni in 1u32..0xffffff) {
            let outer = vxlan(([2, 0, 0, 0, 0, 1], [192, 0, 2, 2]), ([2, 0, 0, 0, 0, 2], [192, 0, 2, 1]), 0x08, vni, inner);
            prop_assert_eq!(Frame::parse(&outer.emit()).unwrap(), outer);
        }
    }

    #[test]
    fn fragments_both_families() {
        let mut ip = Ipv6::new(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            udp(1, 2, b"x"),
        );
        ip.ext = vec![Ext {
            kind: EXT_FRAGMENT,
            body: vec![0, 0, 0, 0, 0, 7],
        }];
        let f = Frame {
            dst: [2; 6],
            src: [4; 6],
            vlan: None,
            net: Net::Ipv6(ip),
        };
        assert_eq!(Frame::parse(&f.emit()).unwrap(), f, "atomic: L4 parsed");
        let mut later = Ipv4::new(
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            L4::Other(PROTO_UDP, vec![9; 16]),
        );
        later.fragment_offset = 3;
        let f = Frame {
            dst: [2; 6],
            src: [4; 6],
            vlan: None,
            net: Net::Ipv4(later),
        };
        assert_eq!(Frame::parse(&f.emit()).unwrap(), f, "later: bytes");
    }

    #[test]
    fn broken_checksums_are_refused() {
        let f = v4(
            [2; 6],
            [4; 6],
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            tcp(1, 2, TCP_SYN, b""),
        );
        assert!(Frame::parse(&edited(&f, |b| b[14 + 20 + 16] ^= 1)).is_err());
        assert!(Frame::parse(&edited(&f, |b| b[14 + 10] ^= 1)).is_err());
        assert!(Frame::parse(&f.emit()).is_ok());
    }
}
