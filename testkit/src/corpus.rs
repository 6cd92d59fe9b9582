//! A malformed-frame corpus: from valid frames, every way of breaking them
//! that the parsers must survive. Each header field a program reads gets
//! its edge values (lengths too short, too long, zero, all ones; versions,
//! header lengths, protocols and next headers of every kind the programs
//! treat apart), every frame is cut at every length, and a VXLAN frame's
//! inner frame gets the same treatment behind an outer header that stays
//! consistent (so the breakage reaches the inner parser). Deterministic:
//! the same seeds give the same corpus, in the same order.

use crate::{
    frames::*,
    testbed::NEXT_HOP_MAC,
    wire::{build::*, Ext, Net, EXT_FRAGMENT, EXT_HOP_BY_HOP},
};

/// A corpus entry: what was done, and the bytes.
pub type Entry = (String, Vec<u8>);

fn be16(b: &[u8], at: usize) -> usize {
    u16::from_be_bytes([b[at], b[at + 1]]) as usize
}

fn put16(b: &mut [u8], at: usize, v: usize) {
    b[at..at + 2].copy_from_slice(&(v as u16).to_be_bytes());
}

/// The IPv4 header checksum of `h`, recomputed in place.
fn fix_ipv4_checksum(b: &mut [u8], ip: usize) {
    let ihl = ((b[ip] & 0x0f) as usize * 4).max(20);
    if b.len() < ip + ihl {
        return;
    }
    b[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let mut sum = 0u32;
    for w in b[ip..ip + ihl].chunks(2) {
        sum += u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    b[ip + 10..ip + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Where a frame's layers start, as far as they parse.
struct Layout {
    /// The network header (after Ethernet and one 802.1Q tag).
    l3: usize,
    ethertype: usize,
    /// The upper-layer header and its protocol, for IPv4 and IPv6.
    l4: Option<(usize, u8)>,
    /// For IPv6: the first extension header, if any.
    ext: Option<usize>,
}

fn layout(b: &[u8]) -> Option<Layout> {
    if b.len() < 14 {
        return None;
    }
    let (mut et, mut l3) = (be16(b, 12), 14);
    if et == 0x8100 && b.len() >= 18 {
        et = be16(b, 16);
        l3 = 18;
    }
    let mut out = Layout {
        l3,
        ethertype: et,
        l4: None,
        ext: None,
    };
    match et {
        0x0800 if b.len() >= l3 + 20 => {
            let ihl = (b[l3] & 0x0f) as usize * 4;
            out.l4 = Some((l3 + ihl, b[l3 + 9]));
        }
        0x86dd if b.len() >= l3 + 40 => {
            let (mut nh, mut at) = (b[l3 + 6], l3 + 40);
            if matches!(nh, 0 | 43 | 44 | 60) {
                out.ext = Some(at);
            }
            for _ in 0..8 {
                if !matches!(nh, 0 | 43 | 44 | 60) || b.len() < at + 8 {
                    break;
                }
                let len = if nh == 44 {
                    8
                } else {
                    (b[at + 1] as usize + 1) * 8
                };
                nh = b[at];
                at += len;
            }
            out.l4 = Some((at, nh));
        }
        _ => {}
    }
    Some(out)
}

/// Every variant of `frame`, named after `name`.
fn variants(name: &str, frame: &[u8], out: &mut Vec<Entry>) {
    let mut push = |what: String, b: Vec<u8>| {
        if b != frame {
            out.push((format!("{name}: {what}"), b))
        }
    };
    for n in 0..frame.len() {
        push(format!("cut to {n}"), frame[..n].to_vec());
    }
    let Some(l) = layout(frame) else {
        return;
    };
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = frame.to_vec();
        f(&mut b);
        b
    };
    for (what, mac) in [
        ("to broadcast", [0xff; 6]),
        ("to a multicast MAC", [0x01, 0x00, 0x5e, 0, 0, 1]),
        ("to the zero MAC", [0; 6]),
    ] {
        push(what.into(), edit(&|b| b[0..6].copy_from_slice(&mac)));
    }
    for (what, mac) in [
        ("from a multicast MAC", [0x01, 0x00, 0x5e, 0, 0, 1]),
        ("from the zero MAC", [0; 6]),
    ] {
        push(what.into(), edit(&|b| b[6..12].copy_from_slice(&mac)));
    }
    for et in [
        0x0000, 0x05dc, 0x0800, 0x0806, 0x86dd, 0x8100, 0x88a8, 0x88cc, 0xffff,
    ] {
        push(
            format!("ethertype {et:04x}"),
            edit(&|b| put16(b, l.ethertype_at(), et)),
        );
    }
    let ip = l.l3;
    match l.ethertype {
        0x0800 if frame.len() >= ip + 20 => {
            let total = frame.len() - ip;
            let ihl = (frame[ip] & 0x0f) as usize * 4;
            for v in [0x00, 0x44, 0x46, 0x4f, 0x60, 0xf5] {
                push(
                    format!("IPv4 version/IHL {v:02x}"),
                    edit(&|b| {
                        b[ip] = v;
                        fix_ipv4_checksum(b, ip);
                    }),
                );
            }
            for t in [0, 1, 19, 20, ihl, total - 1, total + 1, 0xffff] {
                push(
                    format!("IPv4 total length {t}"),
                    edit(&|b| {
                        put16(b, ip + 2, t);
                        fix_ipv4_checksum(b, ip);
                    }),
                );
            }
            for f in [0x2000, 0x0001, 0x1fff, 0x6000, 0x3fff, 0x8000] {
                push(
                    format!("IPv4 fragment field {f:04x}"),
                    edit(&|b| {
                        put16(b, ip + 6, f);
                        fix_ipv4_checksum(b, ip);
                    }),
                );
            }
            for p in [0, 1, 2, 6, 17, 41, 44, 47, 50, 58, 132, 255] {
                push(
                    format!("IPv4 protocol {p}"),
                    edit(&|b| {
                        b[ip + 9] = p;
                        fix_ipv4_checksum(b, ip);
                    }),
                );
            }
            push(
                "IPv4 TTL 0".into(),
                edit(&|b| {
                    b[ip + 8] = 0;
                    fix_ipv4_checksum(b, ip);
                }),
            );
            push("IPv4 bad checksum".into(), edit(&|b| b[ip + 10] ^= 0xff));
            push(
                "IPv4 from the destination's address".into(),
                edit(&|b| {
                    let d: [u8; 4] = b[ip + 16..ip + 20].try_into().unwrap();
                    b[ip + 12..ip + 16].copy_from_slice(&d);
                    fix_ipv4_checksum(b, ip);
                }),
            );
            for (what, a) in [
                ("from 0.0.0.0", [0, 0, 0, 0]),
                ("from 255.255.255.255", [255; 4]),
                ("from 127.0.0.1", [127, 0, 0, 1]),
                ("from 224.0.0.1", [224, 0, 0, 1]),
            ] {
                push(
                    what.into(),
                    edit(&|b| {
                        b[ip + 12..ip + 16].copy_from_slice(&a);
                        fix_ipv4_checksum(b, ip);
                    }),
                );
            }
        }
        0x86dd if frame.len() >= ip + 40 => {
            let payload = frame.len() - ip - 40;
            for v in [0x00, 0x40, 0xf0] {
                push(
                    format!("IPv6 version byte {v:02x}"),
                    edit(&|b| b[ip] = v | (b[ip] & 0x0f)),
                );
            }
            for p in [0, 1, payload.saturating_sub(1), payload + 1, 0xffff] {
                push(
                    format!("IPv6 payload length {p}"),
                    edit(&|b| put16(b, ip + 4, p)),
                );
            }
            for nh in [0, 6, 17, 41, 43, 44, 50, 51, 58, 59, 60, 135, 139, 253] {
                push(format!("IPv6 next header {nh}"), edit(&|b| b[ip + 6] = nh));
            }
            for (what, a) in [
                ("from ::", [0u8; 16]),
                ("from ::1", {
                    let mut a = [0u8; 16];
                    a[15] = 1;
                    a
                }),
                ("from ff02::1", {
                    let mut a = [0u8; 16];
                    a[0] = 0xff;
                    a[1] = 2;
                    a[15] = 1;
                    a
                }),
                ("from ::ffff:10.0.0.1", {
                    let mut a = [0u8; 16];
                    a[10] = 0xff;
                    a[11] = 0xff;
                    a[12..].copy_from_slice(&[10, 0, 0, 1]);
                    a
                }),
            ] {
                push(
                    what.into(),
                    edit(&|b| b[ip + 8..ip + 24].copy_from_slice(&a)),
                );
            }
            if let Some(x) = l.ext {
                for len in [0, 1, 255] {
                    push(
                        format!("IPv6 extension header length {len}"),
                        edit(&|b| b[x + 1] = len),
                    );
                }
                for nh in [0, 6, 17, 43, 44, 58, 59, 60] {
                    push(
                        format!("IPv6 extension header's next header {nh}"),
                        edit(&|b| b[x] = nh),
                    );
                }
            }
        }
        0x0806 if frame.len() >= ip + 8 => {
            for (at, vals) in [
                (ip, &[0u8, 0xff][..]),
                (ip + 2, &[0x86, 0x00]),
                (ip + 4, &[0, 5, 7, 255]),
                (ip + 5, &[0, 3, 6, 255]),
                (ip + 7, &[0, 3, 0xff]),
            ] {
                for &v in vals {
                    push(format!("ARP byte {} = {v}", at - ip), edit(&|b| b[at] = v));
                }
            }
        }
        _ => {}
    }
    if let Some((l4, proto)) = l.l4 {
        if frame.len() >= l4 + 8 {
            match proto {
                6 if frame.len() >= l4 + 20 => {
                    for off in [0x00, 0x40, 0x60, 0xf0] {
                        push(
                            format!("TCP data offset byte {off:02x}"),
                            edit(&|b| b[l4 + 12] = off),
                        );
                    }
                    for flags in [0x00, 0x03, 0x06, 0x29, 0xff] {
                        push(
                            format!("TCP flags {flags:02x}"),
                            edit(&|b| b[l4 + 13] = flags),
                        );
                    }
                    push("TCP ports 0".into(), edit(&|b| b[l4..l4 + 4].fill(0)));
                }
                17 => {
                    let len = frame.len() - l4;
                    for u in [0, 7, 8, len + 1, 0xffff] {
                        push(format!("UDP length {u}"), edit(&|b| put16(b, l4 + 4, u)));
                    }
                    push("UDP ports 0".into(), edit(&|b| b[l4..l4 + 4].fill(0)));
                    for port in [53, 67, 68, 546, 547, 4789] {
                        push(
                            format!("UDP source port {port}"),
                            edit(&|b| put16(b, l4, port)),
                        );
                    }
                }
                1 | 58 => {
                    for t in [
                        0, 3, 5, 8, 11, 12, 13, 128, 129, 133, 134, 135, 136, 137, 255,
                    ] {
                        push(format!("ICMP type {t}"), edit(&|b| b[l4] = t));
                    }
                    push("ICMP code 255".into(), edit(&|b| b[l4 + 1] = 255));
                }
                _ => {}
            }
        }
    }
}

impl Layout {
    fn ethertype_at(&self) -> usize {
        self.l3 - 2
    }
}

/// Frames that are nothing: empty, shorter than Ethernet, all zeros, all
/// ones, a jumbo of noise.
pub fn degenerate() -> Vec<Entry> {
    let noise: Vec<u8> = (0..9000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    vec![
        ("empty".into(), vec![]),
        ("one byte".into(), vec![0]),
        ("13 bytes".into(), vec![0xff; 13]),
        ("14 zero bytes".into(), vec![0; 14]),
        ("60 zero bytes".into(), vec![0; 60]),
        ("1514 bytes of ones".into(), vec![0xff; 1514]),
        ("9000 bytes of noise".into(), noise),
    ]
}

/// The corpus of `seeds` (each a name and a valid frame).
pub fn malformed(seeds: &[(&str, Vec<u8>)]) -> Vec<Entry> {
    let mut out = degenerate();
    for (name, frame) in seeds {
        variants(name, frame, &mut out);
    }
    out
}

/// The corpus of VXLAN frames: `outer` (a valid VXLAN frame) with its own
/// header broken, and with its inner frame broken in every way while the
/// outer lengths stay consistent.
pub fn malformed_vxlan(name: &str, outer: &[u8]) -> Vec<Entry> {
    let mut out = Vec::new();
    variants(name, outer, &mut out);
    const INNER: usize = 14 + 20 + 8 + 8;
    for (flags, what) in [
        (0x00, "no I flag"),
        (0x0c, "other flags"),
        (0xff, "all flags"),
    ] {
        let mut b = outer.to_vec();
        b[42] = flags;
        out.push((format!("{name}: VXLAN {what}"), b));
    }
    let mut b = outer.to_vec();
    b[43] = 1;
    out.push((format!("{name}: VXLAN reserved bits set"), b));
    for vni in [0u32, 0xffffff, 4242] {
        let mut b = outer.to_vec();
        b[46..49].copy_from_slice(&vni.to_be_bytes()[1..]);
        out.push((format!("{name}: VNI {vni}"), b));
    }
    let mut inner = Vec::new();
    variants("inner", &outer[INNER..], &mut inner);
    for (what, i) in inner {
        let mut b = outer[..INNER].to_vec();
        b.extend(&i);
        let len = b.len();
        put16(&mut b, 14 + 2, len - 14);
        fix_ipv4_checksum(&mut b, 14);
        put16(&mut b, 34 + 4, len - 34);
        b[40..42].copy_from_slice(&[0, 0]); // no UDP checksum
        out.push((format!("{name}: {what}"), b));
    }
    out
}

/// Valid frames a VM sends, one of every kind.
pub fn port_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with_ext = |kind: u8, body: Vec<u8>| {
        let mut f = v6_frame((A1, A3), 1, 3, udp(1, 2, b"ext"));
        if let Net::Ipv6(ip) = &mut f.net {
            ip.ext = vec![Ext { kind, body }];
        }
        f.emit()
    };
    vec![
        ("ARP request", arp_from(A1, IP_A1, IP_A3, 1).emit()),
        (
            "UDP on one host",
            udp4(A1, A3, IP_A1, IP_A3, (1000, 2000), b"local").emit(),
        ),
        (
            "UDP across hosts",
            udp4(A1, A2, IP_A1, IP_A2, (1000, 2000), b"remote").emit(),
        ),
        (
            "DHCP",
            udp4(A1, [0xff; 6], [0; 4], [255; 4], (68, 67), b"discover").emit(),
        ),
        (
            "TCP SYN",
            tcp4((A1, A3), IP_A1, IP_A3, (40000, 80), 0x02).emit(),
        ),
        ("ICMP echo", echo4((A1, A3), IP_A1, IP_A3, 7, false).emit()),
        (
            "ICMP error",
            icmp_error4(
                (A1, A3),
                IP_A1,
                IP_A3,
                3,
                &udp4(A3, A1, IP_A3, IP_A1, (5, 6), b"q"),
            )
            .emit(),
        ),
        (
            "IPv4 first fragment",
            fragment4(
                &udp4(A1, A3, IP_A1, IP_A3, (1, 2), b"fragmented!"),
                9,
                0,
                true,
            )
            .emit(),
        ),
        (
            "IPv6 UDP",
            v6_frame((A1, A3), 1, 3, udp(1, 2, b"v6")).emit(),
        ),
        ("IPv6 TCP", tcp6((A1, A3), 1, 3, (40000, 443), 0x02).emit()),
        ("neighbour solicitation", neighbour_solicitation(3).emit()),
        ("IPv6 hop-by-hop", with_ext(EXT_HOP_BY_HOP, vec![0; 6])),
        (
            "IPv6 fragment",
            with_ext(EXT_FRAGMENT, vec![0, 1, 0, 0, 0, 9]),
        ),
        (
            "ICMPv6 too big",
            too_big6((A1, A3), 1, 3, &v6_frame((A3, A1), 3, 1, udp(1, 2, b"q"))).emit(),
        ),
    ]
}

/// The uplink's corpus: VXLAN frames from hv2 of every inner kind, broken
/// outside and inside, and the host's own underlay traffic, broken.
pub fn uplink_corpus() -> Vec<Entry> {
    let inner = [
        udp4(A2, A1, IP_A2, IP_A1, (1000, 2000), b"from hv2"),
        tcp4((A2, A1), IP_A2, IP_A1, (40000, 80), 0x02),
        arp_from(A2, IP_A2, IP_A1, 1),
        v6_frame((A2, A1), 2, 1, udp(1, 2, b"v6 from hv2")),
    ];
    let mut uplink: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, f) in inner.iter().enumerate() {
        uplink.extend(malformed_vxlan(
            &format!("VXLAN {i}"),
            &vxlan_from(HV2, 8, VNI_A, f).emit(),
        ));
    }
    uplink.extend(malformed(&[(
        "underlay UDP",
        udp4(NEXT_HOP_MAC, UPLINK_MAC, HV2, HV1, (5, 53), b"dns").emit(),
    )]));
    uplink
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{build, Frame};

    #[test]
    fn the_corpus_breaks_every_layer_and_is_deterministic() {
        let f = build::v4(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            build::udp(1, 2, b"x"),
        )
        .emit();
        let a = malformed(&[("udp", f.clone())]);
        assert_eq!(a, malformed(&[("udp", f.clone())]));
        for what in [
            "cut to 13",
            "IPv4 total length 65535",
            "UDP length 7",
            "ethertype 8100",
        ] {
            assert!(a.iter().any(|(n, _)| n.ends_with(what)), "{what}");
        }
        // None is the seed itself; most no longer parse at all.
        assert!(a.iter().all(|(_, b)| *b != f));
        let parse = a.iter().filter(|(_, b)| Frame::parse(b).is_ok()).count();
        assert!(parse * 3 < a.len(), "{parse} of {} still parse", a.len());
    }
}

#[cfg(test)]
mod smoke {
    use cloison_dataplane::fuzzing::{frames, FramesHost};

    use super::*;

    /// The frames target's smoke run without the kernel: the whole corpus
    /// through the model (the fixtures run it through both).
    #[test]
    fn the_model_takes_the_whole_corpus() {
        let host = FramesHost::new();
        let model = host.model();
        let all = malformed(&port_seeds());
        for (_, f) in all.iter().chain(uplink_corpus().iter()) {
            frames(&model, f);
        }
    }
}
