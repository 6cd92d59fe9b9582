//! The fixtures' host as frames see it: its ports' MACs and addresses,
//! the hosts' underlay addresses and the network's VNI, and builders of the
//! frames the fixtures, the malformed-frame corpus and the fuzz targets
//! send (with the test kit's wire types). hv1 holds a1 and a3, hv2 a2.
use std::net::Ipv6Addr;

use crate::{
    testbed::NEXT_HOP_MAC,
    wire::{build::*, *},
};

pub const A1: Mac = [2, 0, 0, 0, 0, 1];
pub const A2: Mac = [2, 0, 0, 0, 0, 2];
pub const A3: Mac = [2, 0, 0, 0, 0, 3];
pub const IP_A1: [u8; 4] = [10, 0, 0, 1];
pub const IP_A2: [u8; 4] = [10, 0, 0, 2];
pub const IP_A3: [u8; 4] = [10, 0, 0, 3];
/// This host's and hv2's underlay addresses, and the uplink's MAC as the
/// frames from the underlay name it.
pub const HV1: [u8; 4] = [192, 0, 2, 1];
pub const HV2: [u8; 4] = [192, 0, 2, 2];
pub const UPLINK_MAC: Mac = [2, 0, 0, 0, 0xbb, 1];
pub const VNI_A: u32 = 1001;

/// `fd00:1::n`: the IPv6 address of port `n` of tenant a.
pub fn v6(n: u8) -> Ipv6Addr {
    format!("fd00:1::{n}").parse().unwrap()
}

pub fn udp4(src: Mac, dst: Mac, s: [u8; 4], d: [u8; 4], ports: (u16, u16), body: &[u8]) -> Frame {
    v4(src, dst, s, d, udp(ports.0, ports.1, body))
}

pub fn tcp4(macs: (Mac, Mac), s: [u8; 4], d: [u8; 4], ports: (u16, u16), flags: u8) -> Frame {
    v4(macs.0, macs.1, s, d, tcp(ports.0, ports.1, flags, b"x"))
}

pub fn tcp6(macs: (Mac, Mac), s: u8, d: u8, ports: (u16, u16), flags: u8) -> Frame {
    v6_frame(macs, s, d, tcp(ports.0, ports.1, flags, b"x"))
}

pub fn v6_frame(macs: (Mac, Mac), s: u8, d: u8, l4: L4) -> Frame {
    build::v6(macs.0, macs.1, v6(s), v6(d), l4)
}

pub fn echo4(macs: (Mac, Mac), s: [u8; 4], d: [u8; 4], id: u16, reply: bool) -> Frame {
    let i = id.to_be_bytes();
    v4(
        macs.0,
        macs.1,
        s,
        d,
        icmp(if reply { 0 } else { 8 }, 0, [i[0], i[1], 0, 1], b"ping"),
    )
}

/// An ICMP error from `s` to `d` (type, code) quoting the IP packet of `quoted`.
pub fn icmp_error4(macs: (Mac, Mac), s: [u8; 4], d: [u8; 4], ty: u8, quoted: &Frame) -> Frame {
    let q = quoted.emit();
    v4(
        macs.0,
        macs.1,
        s,
        d,
        icmp(ty, 3, [0; 4], &q[14..(14 + 28).min(q.len())]),
    )
}

/// ICMPv6 packet too big from `s` quoting the IPv6 packet of `quoted`.
pub fn too_big6(macs: (Mac, Mac), s: u8, d: u8, quoted: &Frame) -> Frame {
    let q = quoted.emit();
    v6_frame(
        macs,
        s,
        d,
        icmp(2, 0, 1280u32.to_be_bytes(), &q[14..(14 + 48).min(q.len())]),
    )
}

/// An IPv4 fragment of `f`'s datagram: `offset` in 8-byte units; a later
/// one carries the datagram's bytes from there (no L4 header).
pub fn fragment4(f: &Frame, id: u16, offset: u16, more: bool) -> Frame {
    let mut f = f.clone();
    let Net::Ipv4(ip) = &mut f.net else {
        panic!("an IPv4 frame")
    };
    ip.id = id;
    ip.more_fragments = more;
    ip.fragment_offset = offset;
    if offset != 0 {
        let proto = ip.payload.proto(false);
        ip.payload = L4::Other(proto, vec![0x5a; 8]);
    }
    f
}

/// An ARP frame from a1's MAC: `op` 1 request, 2 reply.
pub fn arp_from(sha: Mac, spa: [u8; 4], tpa: [u8; 4], op: u16) -> Frame {
    build::arp(op, sha, spa, tpa)
}

/// A neighbour solicitation from a1 for `fd00:1::{target}` (with its source
/// link-layer address option), as a VM sends it.
pub fn neighbour_solicitation(target: u8) -> Frame {
    let mut body = v6(target).octets().to_vec();
    body.extend([1, 1]);
    body.extend(A1);
    let dst: Ipv6Addr = format!("ff02::1:ff00:{target:x}").parse().unwrap();
    let mut f = build::v6(
        A1,
        [0x33, 0x33, 0xff, 0, 0, target],
        v6(1),
        dst,
        icmp(135, 0, [0; 4], &body),
    );
    if let Net::Ipv6(ip) = &mut f.net {
        ip.hop_limit = 255;
    }
    f
}

/// `inner` in VXLAN from hv2 (or `src`) to this host, with `flags`.
pub fn vxlan_from(src: [u8; 4], flags: u8, vni: u32, inner: &Frame) -> Frame {
    build::vxlan(
        (NEXT_HOP_MAC, src),
        (UPLINK_MAC, HV1),
        flags,
        vni,
        inner.clone(),
    )
}

/// Raw VXLAN bytes (a truncated inner frame is not a frame value).
pub fn vxlan_bytes(src: [u8; 4], flags: u8, vni: u32, inner: &[u8]) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut p = vec![flags, 0, 0, 0, v[1], v[2], v[3], 0];
    p.extend(inner);
    udp4(NEXT_HOP_MAC, UPLINK_MAC, src, HV1, (50000, VXLAN_PORT), &p).emit()
}
