//! What the benches share: the hosts, rule sets and frames they measure.
use std::time::Duration;

use cloison_dataplane::{
    loader::verdict::TC_ACT_REDIRECT, netdev, snapshot::MacAddr, Dataplane, Host, Network, Port,
    Rule, SecurityGroup, Snapshot, UplinkHook,
};
use cloison_testkit::{testbed::Testbed, wire::build};

/// Criterion timings from the kernel's own clock (BPF_PROG_TEST_RUN's
/// duration), not the system call around it.
pub mod kernel_time {
    use std::time::Duration;

    use cloison_dataplane::{loader::RunResult, Error};
    use criterion::Bencher;

    /// The same input `iters` times in one call (`run` takes the repeat count).
    pub fn repeated(b: &mut Bencher, run: impl Fn(u32) -> Result<RunResult, Error>, want: u32) {
        b.iter_custom(|iters| {
            let r = run(iters as u32).expect("run");
            assert_eq!(r.verdict, want);
            r.duration * iters as u32
        })
    }

    /// Each iteration a separate call on fresh input; the kernel's times summed.
    pub fn single(b: &mut Bencher, run: impl Fn() -> Result<RunResult, Error>, want: u32) {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let r = run().expect("run");
                assert_eq!(r.verdict, want);
                total += r.duration;
            }
            total
        })
    }
}

/// How a rounds bench (harness = false) was started: `None` if it cannot
/// or need not run (no root, or only asked to list its benches), else
/// whether it is `cargo bench`'s full run (`true`) or `cargo test
/// --benches`'s smoke run (`false`).
pub fn rounds_run(bench: &str) -> Option<bool> {
    if !has_root(bench) || std::env::args().any(|a| a == "--list") {
        return None;
    }
    Some(std::env::args().any(|a| a == "--bench"))
}

/// The median, minimum and maximum of `v` (not empty).
pub fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Now, in UTC, as the results files give it.
pub fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Whether `bench` can run (BPF_PROG_TEST_RUN and map writes need root);
/// says why not when it cannot.
pub fn has_root(bench: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("{bench} bench: skipped, BPF_PROG_TEST_RUN and map writes need root");
    }
    root
}

/// A test bed `tag` with `snap`'s host hv1, entered on this thread and
/// applied (XDP on the uplink); and port a1's ifindex.
pub fn applied_bed(tag: &str, snap: &Snapshot) -> (Testbed, Dataplane, u32) {
    let bed = Testbed::new(tag, snap, "hv1").expect("test bed (needs root)");
    let mut dp = bed.enter().expect("open");
    dp.apply(
        &snap.validated().expect("valid"),
        "hv1",
        cloison_testkit::testbed::UPLINK,
        UplinkHook::Xdp,
    )
    .expect("apply");
    let pa1 = netdev::ifindex("pa1").expect("pa1");
    (bed, dp, pa1)
}

/// One new flow from a1 to a3:80 (a SYN from the source port after
/// `sport`; conntrack flushed, untimed, once they are all used): the
/// kernel's time for it.
pub fn new_flow(dp: &mut Dataplane, pa1: u32, sport: &mut u16) -> Duration {
    *sport = sport.wrapping_add(1);
    if *sport == 0 || *sport == 40000 {
        dp.conntrack_flush().expect("flush");
        *sport = 1;
    }
    let r = dp
        .test_run_port(pa1, &tcp(*sport, TCP_SYN), 0)
        .expect("run");
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "new flow allowed");
    r.duration
}

pub const A1: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const A3: [u8; 6] = [2, 0, 0, 0, 0, 3];
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// `n` rules in `direction` that never match the measured flow: distinct
/// TCP port ranges from distinct /32 remotes, as a large group has them.
fn filler(direction: &str, n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            let r = format!(
                r#"{{"direction": "{direction}", "protocol": "tcp", "ports": "{}-{}",
                    "remote": {{"cidr": "172.{}.{}.{}/32"}}}}"#,
                1000 + i % 50_000,
                1001 + i % 50_000,
                16 + i / 65536,
                (i / 256) % 256,
                i % 256
            );
            serde_json::from_str(&r).expect("rule literal")
        })
        .collect()
}

/// One host, one network, a1 (pa1) and a3 (pa3). a1's group `client` and
/// a3's group `web` each hold `rules` rules, the last of which allows the
/// measured flow: a1 → a3, TCP port 80 (a remote-group rule on a3's side).
pub fn sg_snapshot(rules: usize) -> Snapshot {
    sg_snapshot_matching(rules, Matching::Whole)
}

/// What the rules that allow the measured flow name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matching {
    /// a1's egress: TCP port 80 to anywhere; a3's ingress: TCP port 80 from
    /// the group `client` (a1's address): single ports, a whole address.
    Whole,
    /// Both: TCP ports 80-81 with the remote 10.0.0.0/24: a range and a
    /// prefix, found by longest-prefix match only.
    Prefix,
}

/// [`sg_snapshot`] with the measured flow allowed by `matching` rules.
pub fn sg_snapshot_matching(rules: usize, matching: Matching) -> Snapshot {
    let (egress, ingress) = match matching {
        Matching::Whole => (
            r#"{"direction": "egress", "protocol": "tcp", "ports": "80"}"#,
            r#"{"direction": "ingress", "protocol": "tcp", "ports": "80", "remote": {"group": "client"}}"#,
        ),
        Matching::Prefix => (
            r#"{"direction": "egress", "protocol": "tcp", "ports": "80-81", "remote": {"cidr": "10.0.0.0/24"}}"#,
            r#"{"direction": "ingress", "protocol": "tcp", "ports": "80-81", "remote": {"cidr": "10.0.0.0/24"}}"#,
        ),
    };
    let mut client = filler("egress", rules.saturating_sub(1));
    client.push(serde_json::from_str(egress).expect("rule"));
    let mut web = filler("ingress", rules.saturating_sub(1));
    web.push(serde_json::from_str(ingress).expect("rule"));
    // A group holds at most MAX_RULES_PER_GROUP rules: the rules go into as
    // many groups as that takes, and the port into all of them (its policy
    // is their union, compiled alike).
    let split = |name: &str, rules: Vec<Rule>| -> Vec<SecurityGroup> {
        rules
            .chunks(cloison_dataplane::validate::MAX_RULES_PER_GROUP)
            .enumerate()
            .map(|(i, chunk)| SecurityGroup {
                name: if i == 0 {
                    name.to_string()
                } else {
                    format!("{name}-{i}")
                },
                tenant: "t".into(),
                rules: chunk.to_vec(),
            })
            .collect()
    };
    let (client, web) = (split("client", client), split("web", web));
    let names = |g: &[SecurityGroup]| g.iter().map(|g| g.name.clone()).collect::<Vec<_>>();
    let port = |name: &str, iface: &str, mac: [u8; 6], ip: &str, groups: Vec<String>| Port {
        name: name.into(),
        network: "net".into(),
        host: "hv1".into(),
        interface: iface.into(),
        mac: MacAddr(mac),
        ips: vec![ip.parse().expect("address")],
        security_groups: groups,
        allowed_address_pairs: vec![],
        port_security: true,
        hostname: None,
        instance_id: None,
    };
    Snapshot {
        floating_ips: vec![],
        hosts: vec![Host {
            external_ip: None,
            encryption: Default::default(),
            name: "hv1".into(),
            underlay_ip: "192.0.2.1".parse().expect("address"),
        }],
        networks: vec![Network {
            name: "net".into(),
            tenant: "t".into(),
            vni: 1001,
            subnets: vec!["10.0.0.0/24".parse().expect("subnet")],
            mtu: 1450,
            gateway_ips: vec![],
            dhcp: true,
            dns_servers: vec![],
            host_routes: vec![],
        }],
        ports: vec![
            port("a1", "pa1", A1, "10.0.0.1", names(&client)),
            port("a3", "pa3", A3, "10.0.0.3", names(&web)),
        ],
        security_groups: client.into_iter().chain(web).collect(),
        routers: vec![],
    }
}

/// A TCP segment a1 → a3:80 from `sport` with `flags`.
pub fn tcp(sport: u16, flags: u8) -> Vec<u8> {
    build::v4(
        A1,
        A3,
        [10, 0, 0, 1],
        [10, 0, 0, 3],
        build::tcp(sport, 80, flags, &[0u8; 64]),
    )
    .emit()
}

pub const A2: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// Two hosts: a1 (pa1) and a3 (pa3) here on hv1, a2 on hv2 (192.0.2.2, the
/// test bed's next hop); every port in one group that allows everything.
pub fn paths_snapshot() -> Snapshot {
    let mut s = sg_snapshot(1);
    s.hosts.push(Host {
        external_ip: None,
        encryption: Default::default(),
        name: "hv2".into(),
        underlay_ip: "192.0.2.2".parse().expect("address"),
    });
    s.security_groups = vec![serde_json::from_str(
        r#"{"name": "open", "tenant": "t", "rules": [{"direction": "ingress"}, {"direction": "egress"}]}"#,
    )
    .expect("group")];
    let mut a2 = s.ports[0].clone();
    a2.name = "a2".into();
    a2.host = "hv2".into();
    a2.interface = "ta2".into();
    a2.mac = MacAddr(A2);
    a2.ips = vec!["10.0.0.2".parse().expect("address")];
    s.ports.push(a2);
    // A second network on a router with the first: d1 (pd1) here, d2 on hv2.
    s.networks[0].gateway_ips = vec!["10.0.0.254".parse().expect("address")];
    let mut db = s.networks[0].clone();
    db.name = "db".into();
    db.vni = 1002;
    db.subnets = vec!["10.1.0.0/24".parse().expect("subnet")];
    db.gateway_ips = vec!["10.1.0.1".parse().expect("address")];
    s.networks.push(db);
    for (name, host, iface, mac, ip) in [
        ("d1", "hv1", "pd1", D1, "10.1.0.5"),
        ("d2", "hv2", "pd2", D2, "10.1.0.6"),
    ] {
        let mut d = s.ports[0].clone();
        d.name = name.into();
        d.network = "db".into();
        d.host = host.into();
        d.interface = iface.into();
        d.mac = MacAddr(mac);
        d.ips = vec![ip.parse().expect("address")];
        s.ports.push(d);
    }
    s.routers = vec![cloison_dataplane::Router {
        name: "r".into(),
        tenant: "t".into(),
        networks: vec!["net".into(), "db".into()],
        snat: true,
    }];
    // SNAT to 192.0.2.101 (the test bed's uplink as the external interface).
    s.hosts[0].external_ip = Some(EXTERNAL_IP.into());
    for p in &mut s.ports {
        p.security_groups = vec!["open".into()];
    }
    s
}

/// hv1's external IP in [`paths_snapshot`].
pub const EXTERNAL_IP: [u8; 4] = [192, 0, 2, 101];

/// The routed ports of [`paths_snapshot`]: d1 here, d2 on hv2.
pub const D1: [u8; 6] = [2, 0, 0, 0, 1, 1];
pub const D2: [u8; 6] = [2, 0, 0, 0, 1, 2];

/// A UDP datagram between two MACs/addresses of the bench network.
pub fn udp(
    src: ([u8; 6], [u8; 4]),
    dst: ([u8; 6], [u8; 4]),
    sport: u16,
    payload: usize,
) -> Vec<u8> {
    build::v4(
        src.0,
        dst.0,
        src.1,
        dst.1,
        build::udp(sport, 9, &vec![0u8; payload]),
    )
    .emit()
}

/// `inner` in VXLAN from hv2 (192.0.2.2) to hv1 (192.0.2.1), VNI 1001.
pub fn vxlan(inner: &[u8]) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0, 0, 0x03, 0xe9, 0];
    p.extend(inner);
    build::v4(
        [2, 0xaa, 0, 0, 0, 2],
        [2, 0xbb, 0, 0, 0, 1],
        [192, 0, 2, 2],
        [192, 0, 2, 1],
        build::udp(50000, 4789, &p),
    )
    .emit()
}

/// An ARP request from a1 for `tpa`.
pub fn arp_request(tpa: [u8; 4]) -> Vec<u8> {
    build::arp(1, A1, [10, 0, 0, 1], tpa).emit()
}
