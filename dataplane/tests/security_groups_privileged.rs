//! Security groups and connection tracking through BPF_PROG_TEST_RUN: a table
//! of fixtures, run in order (the conntrack state carries from one to the
//! next) through the kernel and through the reference model, both of which
//! must give the expected verdict and drop reason. Then a property test on
//! random rule sets and random flows, and the conntrack quotas. Needs root.
mod common;

use std::net::Ipv6Addr;

use cloison_abi::DropReason::{self, *};
use cloison_dataplane::{
    model::{Model, Verdict},
    netdev,
    tables::ConntrackLimits,
    Dataplane, Network, Port, SecurityGroup, Snapshot, UplinkHook,
};
use common::*;
use etherparse::PacketBuilder;
use proptest::{prelude::*, test_runner::TestRunner};

const B1: [u8; 6] = A1; // tenant b reuses tenant a's MACs and addresses
const IP_A1: [u8; 4] = [10, 0, 0, 1];
const IP_A2: [u8; 4] = [10, 0, 0, 2];
const IP_A3: [u8; 4] = [10, 0, 0, 3];
const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;
const RST: u8 = 0x04;

fn groups() -> Vec<SecurityGroup> {
    serde_json::from_str(
        r#"[
        {"name": "client", "tenant": "a", "rules": [
            {"direction": "egress", "protocol": "tcp"},
            {"direction": "egress", "protocol": "udp", "ports": "53", "remote": {"cidr": "10.0.0.0/24"}},
            {"direction": "egress", "protocol": "icmp"},
            {"direction": "egress", "ethertype": "IPv6", "protocol": "tcp", "ports": "443"}]},
        {"name": "web", "tenant": "a", "rules": [
            {"direction": "ingress", "protocol": "tcp", "ports": "80", "remote": {"group": "client"}},
            {"direction": "ingress", "protocol": "tcp", "ports": "8000-8080", "remote": {"cidr": "10.0.0.2/32"}},
            {"direction": "ingress", "protocol": "icmp"},
            {"direction": "ingress", "ethertype": "IPv6", "protocol": "tcp", "ports": "443"}]},
        {"name": "b-open", "tenant": "b", "rules": [
            {"direction": "egress"}, {"direction": "ingress"}]}
        ]"#,
    )
    .unwrap()
}

/// hv1: a1 (client) and a3 (web) of tenant a, b1 of tenant b with a1's MAC
/// and address; hv2: a2 (client) and b2 (a2's MAC and address).
fn sg_snapshot() -> Snapshot {
    let mut s = snapshot();
    s.security_groups = groups();
    for p in &mut s.ports {
        p.security_groups = vec![if p.name == "a3" { "web" } else { "client" }.into()];
    }
    s.networks.push(Network {
        name: "b-net".into(),
        tenant: "b".into(),
        vni: 1002,
        subnets: vec!["10.0.0.0/24".parse().unwrap()],
        mtu: 1450,
    });
    for (name, host, iface, mac, ip) in [
        ("b1", "hv1", "pb1", B1, "10.0.0.1"),
        ("b2", "hv2", "pb2", A2, "10.0.0.2"),
    ] {
        s.ports.push(Port {
            name: name.into(),
            network: "b-net".into(),
            host: host.into(),
            interface: iface.into(),
            mac: cloison_dataplane::MacAddr(mac),
            ips: vec![ip.parse().unwrap()],
            security_groups: vec!["b-open".into()],
            allowed_address_pairs: vec![],
            port_security: true,
        });
    }
    s
}

fn tcp(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    flags: u8,
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src, dst, 64)
        .tcp(ports.0, ports.1, 1, 1000);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & ACK != 0 {
        b = b.ack(1);
    }
    if flags & RST != 0 {
        b = b.rst();
    }
    let mut v = Vec::new();
    b.write(&mut v, b"x").unwrap();
    v
}

fn v6(n: u8) -> [u8; 16] {
    format!("fd00:1::{n}").parse::<Ipv6Addr>().unwrap().octets()
}

fn tcp6(macs: ([u8; 6], [u8; 6]), src: u8, dst: u8, ports: (u16, u16), flags: u8) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(v6(src), v6(dst), 64)
        .tcp(ports.0, ports.1, 1, 1000);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & ACK != 0 {
        b = b.ack(1);
    }
    let mut v = Vec::new();
    b.write(&mut v, b"x").unwrap();
    v
}

fn echo(macs: ([u8; 6], [u8; 6]), src: [u8; 4], dst: [u8; 4], id: u16, reply: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(macs.0, macs.1).ipv4(src, dst, 64);
    let b = if reply {
        b.icmpv4_echo_reply(id, 1)
    } else {
        b.icmpv4_echo_request(id, 1)
    };
    let mut v = Vec::new();
    b.write(&mut v, b"ping").unwrap();
    v
}

/// ICMP port unreachable from `src` quoting the IP packet inside `quoted`.
fn unreachable(macs: ([u8; 6], [u8; 6]), src: [u8; 4], dst: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src, dst, 64)
        .icmpv4_raw(3, 3, [0; 4]);
    let mut v = Vec::new();
    b.write(&mut v, &quoted[14..(14 + 28).min(quoted.len())])
        .unwrap();
    v
}

/// ICMPv6 packet too big from `src` quoting the IPv6 packet inside `quoted`.
fn too_big6(macs: ([u8; 6], [u8; 6]), src: u8, dst: u8, quoted: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(v6(src), v6(dst), 64)
        .icmpv6_raw(2, 0, 1280u32.to_be_bytes());
    let mut v = Vec::new();
    b.write(&mut v, &quoted[14..(14 + 48).min(quoted.len())])
        .unwrap();
    v
}

/// A UDP datagram's IPv4 header turned into a fragment: `offset` in 8-byte
/// units, with more fragments to come or not.
fn fragment(frame: Vec<u8>, id: u16, offset: u16, more: bool) -> Vec<u8> {
    edited(frame, |f| {
        f[18..20].copy_from_slice(&id.to_be_bytes());
        let v = offset | if more { 0x2000 } else { 0 };
        f[20..22].copy_from_slice(&v.to_be_bytes());
    })
}

#[derive(Clone, Copy, Debug)]
enum At {
    Port(&'static str),
    /// The uplink (XDP), inside VXLAN from hv2 with this VNI.
    Uplink(u32),
}

/// The kernel's and the model's verdicts on `frame` entering at `at`.
fn verdict(dp: &Dataplane, model: &Model, at: At, frame: &[u8]) -> (Verdict, Verdict) {
    let before = dp.stats().expect("stats").drops;
    match at {
        At::Port(iface) => {
            let ifindex = netdev::ifindex(iface).expect("port interface");
            let r = dp.test_run_port(ifindex, frame, 0).expect("test run");
            (
                bpf_verdict(dp, &r, &before, TC_ACT_REDIRECT, u32::MAX),
                model.port(ifindex, frame),
            )
        }
        At::Uplink(vni) => {
            let f = vxlan([192, 0, 2, 2], 8, vni, frame);
            let up0 = netdev::ifindex("up0").expect("uplink");
            let r = dp
                .test_run_uplink(UplinkHook::Xdp, up0, &f)
                .expect("test run");
            (
                bpf_verdict(dp, &r, &before, XDP_REDIRECT, XDP_PASS),
                model.uplink(&f),
            )
        }
    }
}

/// Runs each fixture in order through the kernel and the model.
fn table(dp: &Dataplane, model: &Model, fixtures: &[(&str, At, Vec<u8>, Verdict)]) {
    for (what, at, frame, want) in fixtures {
        let (bpf, model) = verdict(dp, model, *at, frame);
        assert_eq!(bpf, *want, "kernel: {what}");
        assert_eq!(model, *want, "model: {what}");
    }
}

const PASS: Verdict = Verdict::Redirect;
fn drop(r: DropReason) -> Verdict {
    Verdict::Drop(r)
}

#[test]
fn privileged_security_group_fixtures() {
    with_snapshot(sg_snapshot(), |dp, _, _| {
        let tables = dp.tables().expect("tables");
        let snap = sg_snapshot();
        let mut model = Model::new(&tables, &snap, netdev::ifindex);
        let (a1a3, a3a1, a1a2) = ((A1, A3), (A3, A1), (A1, A2));
        let web = |flags| tcp(a1a3, IP_A1, IP_A3, (40000, 80), flags);
        let web_reply = |flags| tcp(a3a1, IP_A3, IP_A1, (80, 40000), flags);
        let dns = udp4(A1, A2, IP_A1, IP_A2, 5353, 53, b"query");
        table(
            dp,
            &model,
            &[
                // TCP through both ends' rules, and its state machine.
                (
                    "a1 SYN to a3:80 (client egress, web ingress from group client)",
                    At::Port("pa1"),
                    web(SYN),
                    PASS,
                ),
                (
                    "a3 SYN-ACK back: a reply",
                    At::Port("pa3"),
                    web_reply(SYN_ACK),
                    PASS,
                ),
                ("a1 ACK: established", At::Port("pa1"), web(ACK), PASS),
                ("a3 data back", At::Port("pa3"), web_reply(ACK), PASS),
                (
                    "a1 SYN to a3:81: no ingress rule",
                    At::Port("pa1"),
                    tcp(a1a3, IP_A1, IP_A3, (40001, 81), SYN),
                    drop(SgIngressDenied),
                ),
                (
                    "a1 SYN to a3:8000: range rule is for 10.0.0.2 only",
                    At::Port("pa1"),
                    tcp(a1a3, IP_A1, IP_A3, (40002, 8000), SYN),
                    drop(SgIngressDenied),
                ),
                (
                    "a3 SYN to a1:22: web has no egress rule",
                    At::Port("pa3"),
                    tcp(a3a1, IP_A3, IP_A1, (40003, 22), SYN),
                    drop(SgEgressDenied),
                ),
                (
                    "a1 ACK of no connection",
                    At::Port("pa1"),
                    tcp(a1a3, IP_A1, IP_A3, (40004, 80), ACK),
                    drop(CtTcpNotSyn),
                ),
                (
                    "a3 SYN-ACK of no connection",
                    At::Port("pa3"),
                    tcp(a3a1, IP_A3, IP_A1, (80, 40005), SYN_ACK),
                    drop(CtTcpNotSyn),
                ),
                // Across hosts: egress here, the reply through the uplink.
                (
                    "a1 UDP to a2:53 (egress rule with remote CIDR)",
                    At::Port("pa1"),
                    dns.clone(),
                    PASS,
                ),
                (
                    "a2's answer arrives by the uplink",
                    At::Uplink(1001),
                    udp4(A2, A1, IP_A2, IP_A1, 53, 5353, b"answer"),
                    PASS,
                ),
                (
                    "a2 UDP to a1:5000: a1 has no ingress rule",
                    At::Uplink(1001),
                    udp4(A2, A1, IP_A2, IP_A1, 53, 5000, b"new"),
                    drop(SgIngressDenied),
                ),
                (
                    "a1 UDP to a3:53: web has no UDP ingress",
                    At::Port("pa1"),
                    udp4(A1, A3, IP_A1, IP_A3, 5353, 53, b"q"),
                    drop(SgIngressDenied),
                ),
                (
                    "a2 SYN to a3:8080 by the uplink (range rule from 10.0.0.2)",
                    At::Uplink(1001),
                    tcp((A2, A3), IP_A2, IP_A3, (40006, 8080), SYN),
                    PASS,
                ),
                (
                    "a2 SYN to a3:8081 by the uplink",
                    At::Uplink(1001),
                    tcp((A2, A3), IP_A2, IP_A3, (40007, 8081), SYN),
                    drop(SgIngressDenied),
                ),
                // ICMP echo by identifier, and errors related to a flow.
                (
                    "a1 ping a3",
                    At::Port("pa1"),
                    echo(a1a3, IP_A1, IP_A3, 7, false),
                    PASS,
                ),
                (
                    "a3 pong",
                    At::Port("pa3"),
                    echo(a3a1, IP_A3, IP_A1, 7, true),
                    PASS,
                ),
                (
                    "a3 pong with another id",
                    At::Port("pa3"),
                    echo(a3a1, IP_A3, IP_A1, 8, true),
                    drop(SgEgressDenied),
                ),
                (
                    "a3 ping a1",
                    At::Port("pa3"),
                    echo(a3a1, IP_A3, IP_A1, 9, false),
                    drop(SgEgressDenied),
                ),
                (
                    "a3 port unreachable about a1's web flow",
                    At::Port("pa3"),
                    unreachable(a3a1, IP_A3, IP_A1, &web(ACK)),
                    PASS,
                ),
                (
                    "a3 port unreachable about no flow",
                    At::Port("pa3"),
                    unreachable(a3a1, IP_A3, IP_A1, &tcp(a1a3, IP_A1, IP_A3, (1, 2), SYN)),
                    drop(IcmpErrorUnrelated),
                ),
                // IPv4 fragments inherit their first fragment's verdict.
                (
                    "a1 first fragment to a2:53",
                    At::Port("pa1"),
                    fragment(dns.clone(), 99, 0, true),
                    PASS,
                ),
                (
                    "a1 later fragment of it",
                    At::Port("pa1"),
                    fragment(dns.clone(), 99, 8, false),
                    PASS,
                ),
                (
                    "a1 later fragment of nothing",
                    At::Port("pa1"),
                    fragment(dns.clone(), 100, 8, false),
                    drop(FragmentUnknown),
                ),
                (
                    "a1 first fragment to a2:54 (denied)",
                    At::Port("pa1"),
                    fragment(udp4(A1, A2, IP_A1, IP_A2, 5353, 54, b"q"), 101, 0, true),
                    drop(SgEgressDenied),
                ),
                (
                    "a1 later fragment of the denied one",
                    At::Port("pa1"),
                    fragment(dns.clone(), 101, 8, false),
                    drop(FragmentUnknown),
                ),
                // IPv6 rules are separate.
                (
                    "a1 IPv6 SYN to a3:443",
                    At::Port("pa1"),
                    tcp6(a1a3, 1, 3, (40000, 443), SYN),
                    PASS,
                ),
                (
                    "a3 IPv6 SYN-ACK back",
                    At::Port("pa3"),
                    tcp6(a3a1, 3, 1, (443, 40000), SYN_ACK),
                    PASS,
                ),
                (
                    "a3 ICMPv6 packet too big about that flow",
                    At::Port("pa3"),
                    too_big6(a3a1, 3, 1, &tcp6(a1a3, 1, 3, (40000, 443), ACK)),
                    PASS,
                ),
                (
                    "a3 ICMPv6 packet too big about no flow",
                    At::Port("pa3"),
                    too_big6(a3a1, 3, 1, &tcp6(a1a3, 1, 3, (40001, 443), ACK)),
                    drop(IcmpErrorUnrelated),
                ),
                (
                    "a1 IPv6 SYN to a3:80: client's IPv4 'tcp to anywhere' is not IPv6",
                    At::Port("pa1"),
                    tcp6(a1a3, 1, 3, (40000, 80), SYN),
                    drop(SgEgressDenied),
                ),
                // Tenants: b1 has a1's MAC and address, another zone.
                (
                    "a1 SYN to a2:22",
                    At::Port("pa1"),
                    tcp(a1a2, IP_A1, IP_A2, (40010, 22), SYN),
                    PASS,
                ),
                (
                    "b1's ACK with the same addresses and ports: not a's flow",
                    At::Port("pb1"),
                    tcp(a1a2, IP_A1, IP_A2, (40010, 22), ACK),
                    drop(CtTcpNotSyn),
                ),
                (
                    "b1 SYN, its own flow",
                    At::Port("pb1"),
                    tcp(a1a2, IP_A1, IP_A2, (40010, 22), SYN),
                    PASS,
                ),
                (
                    "RST ends a1's connection",
                    At::Port("pa1"),
                    tcp(a1a2, IP_A1, IP_A2, (40010, 22), RST),
                    PASS,
                ),
                (
                    "the same ports may open again",
                    At::Port("pa1"),
                    tcp(a1a2, IP_A1, IP_A2, (40010, 22), SYN),
                    PASS,
                ),
            ],
        );

        // A denial is counted on the port whose rules denied it.
        let (pa1, pa3) = (
            netdev::ifindex("pa1").unwrap(),
            netdev::ifindex("pa3").unwrap(),
        );
        // (all drops of the port, its drops for this reason)
        let port_drops = |dp: &Dataplane, i| {
            let s = dp.stats().unwrap();
            let by_reason = s.port_drops.get(&i).cloned().unwrap_or_default();
            (
                s.ports[&i].drops,
                by_reason.get(&SgIngressDenied).copied().unwrap_or(0),
            )
        };
        let (d1, d3) = (port_drops(dp, pa1), port_drops(dp, pa3));
        table(
            dp,
            &model,
            &[(
                "a1 SYN to a3:82",
                At::Port("pa1"),
                tcp(a1a3, IP_A1, IP_A3, (40011, 82), SYN),
                drop(SgIngressDenied),
            )],
        );
        assert_eq!(port_drops(dp, pa1), d1, "not on the sender's port");
        assert_eq!(
            port_drops(dp, pa3),
            (d3.0 + 1, d3.1 + 1),
            "on the receiver's, by reason"
        );

        // Strict revoke: web loses its port-80 rule; the established flow is
        // cut on its next packet, and stays cut. A rule added works at once.
        let mut revoked = sg_snapshot();
        let web_group = revoked
            .security_groups
            .iter_mut()
            .find(|g| g.name == "web")
            .unwrap();
        web_group.rules.remove(0);
        web_group.rules.push(
            serde_json::from_str(r#"{"direction": "ingress", "protocol": "udp", "ports": "53"}"#)
                .unwrap(),
        );
        let epoch = dp.tables().unwrap().config.policy_epoch;
        dp.apply(&revoked.validated().unwrap(), "hv1", "up0", UplinkHook::Xdp)
            .expect("apply");
        assert_eq!(dp.tables().unwrap().config.policy_epoch, epoch + 1);
        model.set_policy(&revoked, netdev::ifindex);
        table(
            dp,
            &model,
            &[
                (
                    "a1's established web flow after the revoke",
                    At::Port("pa1"),
                    web(ACK),
                    drop(SgRevoked),
                ),
                (
                    "and after",
                    At::Port("pa3"),
                    web_reply(ACK),
                    drop(CtTcpNotSyn),
                ),
                (
                    "a flow the change did not touch",
                    At::Uplink(1001),
                    udp4(A2, A1, IP_A2, IP_A1, 53, 5353, b"answer"),
                    PASS,
                ),
                (
                    "a1 UDP to a3:53, allowed by the new rule",
                    At::Port("pa1"),
                    udp4(A1, A3, IP_A1, IP_A3, 5353, 53, b"q"),
                    PASS,
                ),
            ],
        );
    });
}

#[test]
fn privileged_conntrack_quotas() {
    with_snapshot(sg_snapshot(), |dp, _, _| {
        dp.set_conntrack_limits(ConntrackLimits {
            per_port: 3,
            per_tenant: 4,
        });
        let snap = sg_snapshot();
        dp.apply(&snap.validated().unwrap(), "hv1", "up0", UplinkHook::Xdp)
            .expect("apply");
        let tables = dp.tables().expect("tables");
        let model = Model::new(&tables, &snap, netdev::ifindex);
        let flow = |macs, src, dst, sport| tcp(macs, src, dst, (sport, 22), SYN);
        let a1a2 = (A1, A2);
        table(
            dp,
            &model,
            &[
                (
                    "a1 flow 1",
                    At::Port("pa1"),
                    flow(a1a2, IP_A1, IP_A2, 1),
                    PASS,
                ),
                (
                    "a1 flow 2",
                    At::Port("pa1"),
                    flow(a1a2, IP_A1, IP_A2, 2),
                    PASS,
                ),
                (
                    "a1 flow 3",
                    At::Port("pa1"),
                    flow(a1a2, IP_A1, IP_A2, 3),
                    PASS,
                ),
                (
                    "a1 flow 4: over the port's share",
                    At::Port("pa1"),
                    flow(a1a2, IP_A1, IP_A2, 4),
                    drop(CtPortQuota),
                ),
                (
                    "a1 flow 1 again: tracked flows go on",
                    At::Port("pa1"),
                    flow(a1a2, IP_A1, IP_A2, 1),
                    PASS,
                ),
                (
                    "a2 to a3 (charged to a3): tenant a's 4th entry",
                    At::Uplink(1001),
                    tcp((A2, A3), IP_A2, IP_A3, (5, 8000), SYN),
                    PASS,
                ),
                (
                    "a2 to a3 again: over tenant a's share",
                    At::Uplink(1001),
                    tcp((A2, A3), IP_A2, IP_A3, (6, 8000), SYN),
                    drop(CtTenantQuota),
                ),
                (
                    "tenant b is not touched",
                    At::Port("pb1"),
                    flow(a1a2, IP_A1, IP_A2, 4),
                    PASS,
                ),
            ],
        );
        let a1 = netdev::ifindex("pa1").unwrap();
        let slot = tables.ports[&a1].slot;
        assert_eq!(dp.conntrack_use(slot).unwrap(), 3);
        assert_eq!(dp.conntrack().unwrap().len(), 5);
        // The recount finds what the programs counted; nothing is old enough to go.
        assert_eq!(dp.conntrack_gc().unwrap(), 0);
        assert_eq!(dp.conntrack_use(slot).unwrap(), 3);
    });
}

/// Random rule sets for a3 (ingress) and a1 (egress), random flows between
/// a1, a3 and a2 (remote, by the uplink), each flow a few packets both
/// ways: the kernel and the model agree on every packet.
#[test]
fn privileged_bpf_and_model_agree_on_random_rules_and_flows() {
    let rule = (
        0..2u8,
        prop_oneof![Just("any"), Just("tcp"), Just("udp"), Just("icmp")],
        proptest::option::of((1u16..200, 0u16..100)),
        prop_oneof![
            Just(None),
            Just(Some(r#"{"cidr": "10.0.0.0/30"}"#)),
            Just(Some(r#"{"cidr": "10.0.0.2/32"}"#)),
            Just(Some(r#"{"group": "g1"}"#)),
            Just(Some(r#"{"group": "g3"}"#)),
        ],
    )
        .prop_map(|(dir, proto, ports, remote)| {
            let dir = if dir == 0 { "ingress" } else { "egress" };
            let ports = match (proto, ports) {
                ("tcp" | "udp", Some((lo, n))) => format!(r#", "ports": "{lo}-{}""#, lo + n),
                _ => String::new(),
            };
            let remote = remote.map_or(String::new(), |r| format!(r#", "remote": {r}"#));
            format!(r#"{{"direction": "{dir}", "protocol": "{proto}"{ports}{remote}}}"#)
        });
    let packet = (0..3usize, 0..3usize, 0..3u8, 1u16..200, 1u16..200, 0..4u8);
    let case = (
        prop::collection::vec(rule.clone(), 0..6),
        prop::collection::vec(rule, 0..6),
        prop::collection::vec(packet, 1..12),
    );
    with_snapshot(sg_snapshot(), move |dp, _, _| {
        // One model for the whole run: the kernel's conntrack carries over
        // from case to case, and so does the model's.
        let tables = dp.tables().expect("tables");
        let model = std::cell::RefCell::new(Model::new(&tables, &sg_snapshot(), netdev::ifindex));
        let dp = std::cell::RefCell::new(dp);
        let seen: std::cell::RefCell<std::collections::BTreeMap<String, u32>> = Default::default();
        let mut runner = TestRunner::new(ProptestConfig {
            cases: 80,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        runner
            .run(&case, |(g1_rules, g3_rules, packets)| {
                let mut snap = sg_snapshot();
                let parse = |rules: &[String]| -> Vec<cloison_dataplane::Rule> {
                    rules
                        .iter()
                        .map(|r| serde_json::from_str(r).unwrap())
                        .collect()
                };
                snap.security_groups.retain(|g| g.tenant == "b");
                for (name, rules) in [("g1", &g1_rules), ("g3", &g3_rules)] {
                    snap.security_groups.push(SecurityGroup {
                        name: name.into(),
                        tenant: "a".into(),
                        rules: parse(rules),
                    });
                }
                for p in snap.ports.iter_mut().filter(|p| p.network == "a-net") {
                    p.security_groups = vec![if p.name == "a3" { "g3" } else { "g1" }.into()];
                }
                dp.borrow_mut()
                    .apply(&snap.validated().unwrap(), "hv1", "up0", UplinkHook::Xdp)
                    .expect("apply");
                model.borrow_mut().set_policy(&snap, netdev::ifindex);
                // (name, MAC, address, where its frames enter)
                let ends = [
                    (A1, IP_A1, At::Port("pa1")),
                    (A2, IP_A2, At::Uplink(1001)),
                    (A3, IP_A3, At::Port("pa3")),
                ];
                for (from, to, proto, sport, dport, flags) in packets {
                    if from == to {
                        continue;
                    }
                    let (fm, fip, at) = ends[from];
                    let (tm, tip, _) = ends[to];
                    let frame = match proto {
                        0 => tcp(
                            (fm, tm),
                            fip,
                            tip,
                            (sport, dport),
                            [SYN, SYN_ACK, ACK, RST][flags as usize],
                        ),
                        1 => udp4(fm, tm, fip, tip, sport, dport, b"u"),
                        _ => echo((fm, tm), fip, tip, sport, flags % 2 == 1),
                    };
                    let (bpf, model) = verdict(&dp.borrow(), &model.borrow(), at, &frame);
                    prop_assert_eq!(bpf, model, "{:?} {:02x?}", at, frame);
                    *seen.borrow_mut().entry(format!("{bpf:?}")).or_default() += 1;
                }
                Ok(())
            })
            .expect("kernel and model agree");
        // The random cases reach both sides of the rules and the conntrack.
        let seen = seen.into_inner();
        println!("verdicts: {seen:?}");
        for v in [
            "Redirect",
            "Drop(SgEgressDenied)",
            "Drop(SgIngressDenied)",
            "Drop(CtTcpNotSyn)",
        ] {
            assert!(seen.contains_key(v), "no {v} among {seen:?}");
        }
    });
}
