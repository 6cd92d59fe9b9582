//! Shared by the privileged fixture tests: a namespace with a programmed
//! dataplane, and builders for the frames they send.
#![allow(dead_code)] // each test crate uses its own part

use std::{net::Ipv4Addr, process::Command};

use cloison_abi::DropReason;
use cloison_dataplane::{
    loader::RunResult,
    model::Verdict,
    netdev,
    snapshot::MacAddr,
    testbed::{Testbed, UPLINK},
    Dataplane, Host, Network, Port, SecurityGroup, Snapshot, UplinkHook,
};
use etherparse::PacketBuilder;

pub use cloison_dataplane::loader::verdict::*;

pub const A1: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const A2: [u8; 6] = [2, 0, 0, 0, 0, 2];
pub const A3: [u8; 6] = [2, 0, 0, 0, 0, 3];
pub use cloison_dataplane::testbed::NEXT_HOP_MAC;

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn snapshot() -> Snapshot {
    let port = |name: &str, host: &str, iface: &str, mac: [u8; 6], ip: &str| Port {
        name: name.into(),
        network: "a-net".into(),
        host: host.into(),
        interface: iface.into(),
        mac: MacAddr(mac),
        ips: vec![
            ip.parse().unwrap(),
            format!("fd00:1::{}", mac[5]).parse().unwrap(),
        ],
        security_groups: vec!["open".into()],
        allowed_address_pairs: vec![],
        port_security: true,
    };
    Snapshot {
        security_groups: vec![open_group()],
        hosts: vec![
            Host {
                name: "hv1".into(),
                underlay_ip: Ipv4Addr::new(192, 0, 2, 1),
            },
            Host {
                name: "hv2".into(),
                underlay_ip: Ipv4Addr::new(192, 0, 2, 2),
            },
        ],
        networks: vec![Network {
            name: "a-net".into(),
            tenant: "a".into(),
            vni: 1001,
            subnets: vec![
                "10.0.0.0/24".parse().unwrap(),
                "fd00:1::/64".parse().unwrap(),
            ],
            mtu: 1450,
        }],
        ports: vec![
            port("a1", "hv1", "pa1", A1, "10.0.0.1"),
            port("a2", "hv2", "pa2", A2, "10.0.0.2"),
            port("a3", "hv1", "pa3", A3, "10.0.0.3"),
        ],
    }
}

/// Everything allowed both ways, for the fixtures that are not about rules.
pub fn open_group() -> SecurityGroup {
    serde_json::from_str(
        r#"{"name": "open", "tenant": "a", "rules": [
            {"direction": "ingress"}, {"direction": "egress"},
            {"direction": "ingress", "ethertype": "IPv6"}, {"direction": "egress", "ethertype": "IPv6"}]}"#,
    )
    .unwrap()
}

/// Runs `f` with a programmed dataplane, on a thread inside the test's namespace.
pub fn with_dataplane(f: impl FnOnce(&mut Dataplane, u32, u32) + Send + 'static) {
    with_snapshot(snapshot(), f)
}

/// [`with_dataplane`] programmed with `snap` (ports on pa1, pa3 of hv1).
pub fn with_snapshot(snap: Snapshot, f: impl FnOnce(&mut Dataplane, u32, u32) + Send + 'static) {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "fixtures need root: run `cargo xtask test` as root"
    );
    let tag = format!("clfx{:x}", std::process::id() & 0xffff);
    let bed = Testbed::new(&tag, &snap, "hv1").expect("test bed");
    // A thread of its own enters the namespace; the test bed outlives it.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut dp = bed.enter().expect("open");
                dp.apply(
                    &snap.validated().expect("valid"),
                    "hv1",
                    UPLINK,
                    UplinkHook::Xdp,
                )
                .expect("apply");
                let pa1 = netdev::ifindex("pa1").expect("pa1");
                let up0 = netdev::ifindex(UPLINK).expect("up0");
                f(&mut dp, pa1, up0);
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
}

pub fn drops(dp: &Dataplane, r: DropReason) -> u64 {
    dp.stats()
        .expect("stats")
        .drops
        .get(&r)
        .copied()
        .unwrap_or(0)
}

/// Runs the port program and checks the verdict and the drop reason.
pub fn expect_drop(dp: &Dataplane, ifindex: u32, frame: &[u8], reason: DropReason) {
    let before = drops(dp, reason);
    let r = dp
        .test_run_port(ifindex, frame, 0)
        .unwrap_or_else(|e| panic!("test run for {}: {e}", reason.name()));
    assert_eq!(r.verdict, TC_ACT_SHOT, "{} expected", reason.name());
    assert_eq!(
        drops(dp, reason),
        before + 1,
        "counted as {}",
        reason.name()
    );
}

pub fn udp4(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

pub fn arp(sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4], op: u16) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(sha);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    f.extend(op.to_be_bytes());
    f.extend(sha);
    f.extend(spa);
    f.extend([0; 6]);
    f.extend(tpa);
    f
}

/// A neighbour solicitation from a1 for fd00:1::2 (with its source
/// link-layer address option), as a VM sends it.
pub fn neighbour_solicitation() -> Vec<u8> {
    let src: std::net::Ipv6Addr = "fd00:1::1".parse().unwrap();
    let dst: std::net::Ipv6Addr = "ff02::1:ff00:2".parse().unwrap();
    let target: std::net::Ipv6Addr = "fd00:1::2".parse().unwrap();
    let mut body = target.octets().to_vec();
    body.extend([1, 1]);
    body.extend(A1);
    let b = PacketBuilder::ethernet2(A1, [0x33, 0x33, 0xff, 0, 0, 2])
        .ipv6(src.octets(), dst.octets(), 255)
        .icmpv6(etherparse::Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        });
    let mut v = Vec::new();
    b.write(&mut v, &body).unwrap();
    v
}

/// A TCP segment from a1 to a2.
pub fn tcp4(payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(A1, A2)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(1234, 80, 1, 1000);
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

/// `inner` in VXLAN from underlay address `src` to this host (192.0.2.1).
pub fn vxlan(src: [u8; 4], flags: u8, vni: u32, inner: &[u8]) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut p = vec![flags, 0, 0, 0, v[1], v[2], v[3], 0];
    p.extend(inner);
    udp4(
        NEXT_HOP_MAC,
        [2, 0, 0, 0, 0xbb, 1],
        src,
        [192, 0, 2, 1],
        50000,
        4789,
        &p,
    )
}

/// `frame` with `edit` applied: a malformed variant of a valid frame.
pub fn edited(mut frame: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    edit(&mut frame);
    frame
}

pub fn csum_ok(bytes: &[u8]) -> bool {
    let mut sum = 0u32;
    for c in bytes.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

pub fn redirected(r: &RunResult) -> &[u8] {
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "redirect expected");
    &r.frame
}

/// The BPF verdict of a test run, in the model's terms (drop reason from
/// the counter that moved).
pub fn bpf_verdict(
    dp: &Dataplane,
    r: &RunResult,
    before: &std::collections::BTreeMap<DropReason, u64>,
    redirect: u32,
    pass: u32,
) -> Verdict {
    if r.verdict == redirect {
        return Verdict::Redirect;
    }
    if r.verdict == pass {
        return Verdict::Pass;
    }
    let after = dp.stats().expect("stats").drops;
    let moved: Vec<_> = after
        .iter()
        .filter(|(k, v)| before.get(k).copied().unwrap_or(0) < **v)
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(moved.len(), 1, "exactly one drop counter moves: {moved:?}");
    Verdict::Drop(moved[0])
}
