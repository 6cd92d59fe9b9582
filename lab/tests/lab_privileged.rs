//! Lab tests: real namespaces, real veths, the real kernel running the
//! programs, real traffic. They need root (CAP_NET_ADMIN, CAP_BPF).
use std::{
    io::{Read, Write},
    net::IpAddr,
    time::Duration,
};

use cloison_abi::DropReason;
use cloison_dataplane::UplinkHook;
use cloison_lab::lab::*;

/// The two-host lab, not yet programmed (tests add to it first): XDP on
/// the uplinks, over a wire that suits it (`--uplink-hook auto` picks TC on
/// a veth uplink: see the default-flags test).
fn lab() -> Lab {
    need_root();
    Lab::two_hosts(UplinkHook::Xdp).expect("lab")
}

/// How long a test waits for a frame or a counter it expects: long, as a
/// loaded machine can take its time; a test that passes never waits it out.
const WAIT: Duration = Duration::from_secs(5);

/// Polls `done` until it holds or `WAIT` passed (the assertion that follows
/// says what was expected).
fn eventually(mut done: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + WAIT;
    while !done() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn need_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab tests need root: run them through `cargo xtask test` as root"
    );
}

#[test]
fn privileged_two_tenants_same_addresses_stay_isolated() {
    let mut lab = lab();
    lab.apply().expect("apply");

    // Within each tenant: across hosts and on one host.
    assert!(lab.ping("a1", "10.0.0.2", 3), "a1 -> a2 across hosts");
    assert!(lab.ping("a1", "10.0.0.3", 3), "a1 -> a3 on one host");
    assert!(lab.ping("b1", "10.0.0.2", 3), "b1 -> b2 across hosts");
    assert!(
        lab.ping("a2", "fd00:1::1", 3),
        "a2 -> a1 over IPv6 (ND answered locally)"
    );

    // Tenant b watches while tenant a talks, and the other way round.
    for (talk, watch) in [("a", "b"), ("b", "a")] {
        let caps: Vec<_> = [format!("{watch}1"), format!("{watch}2")]
            .iter()
            .map(|v| Capture::start(&lab.vm(v).ns).expect("capture"))
            .collect();
        let marker = format!("cloison-tenant-{talk}-secret");
        let got = tcp_echo(
            &lab,
            &format!("{talk}1"),
            &format!("{talk}2"),
            marker.as_bytes(),
        )
        .expect("tcp");
        assert_eq!(got, marker.as_bytes(), "TCP echo within tenant {talk}");
        let got = udp_echo(
            &lab,
            &format!("{talk}2"),
            &format!("{talk}1"),
            marker.as_bytes(),
        )
        .expect("udp");
        assert_eq!(got, marker.as_bytes(), "UDP echo within tenant {talk}");
        if talk == "a" {
            let got = tcp_echo(&lab, "a3", "a1", marker.as_bytes()).expect("local tcp");
            assert_eq!(got, marker.as_bytes(), "TCP on one host");
        }
        for cap in caps {
            let frames = cap.finish().expect("capture");
            let leaked: Vec<_> = frames
                .iter()
                .filter(|f| contains(f, marker.as_bytes()))
                .collect();
            assert!(
                leaked.is_empty(),
                "tenant {watch} saw {} frames of tenant {talk}",
                leaked.len()
            );
            let ipv4 = frames
                .iter()
                .filter(|f| f.len() > 14 && f[12..14] == [0x08, 0x00])
                .count();
            assert_eq!(
                ipv4, 0,
                "tenant {watch} (idle) received IPv4 frames while {talk} talked"
            );
        }
    }

    let s1 = lab.stats("hv1").expect("stats");
    assert!(
        s1.ports
            .values()
            .any(|p| p.tx_packets > 0 && p.rx_packets > 0),
        "port counters move"
    );
    println!("hv1 drops: {:?}", s1.drops);
}

#[test]
fn privileged_kernel_vxlan_peer_interoperates() {
    let mut lab = lab();
    lab.add_kernel_vtep().expect("kernel vtep");
    lab.apply().expect("apply");
    assert!(
        lab.ping("a1", "10.0.0.9", 3),
        "Cloison VM -> kernel VXLAN peer"
    );
    let kv = lab.ns("kv");
    let ok = std::process::Command::new("ip")
        .args([
            "netns", "exec", &kv, "ping", "-q", "-c", "3", "-i", "0.2", "-W", "1", "10.0.0.2",
        ])
        .status()
        .expect("ping")
        .success();
    assert!(ok, "kernel VXLAN peer -> Cloison VM on hv2");
    // Tenant b (same addresses, other VNI) is not reachable from the peer.
    assert!(
        !lab.ping("b1", "10.0.0.9", 1),
        "tenant b must not reach tenant a's peer"
    );
    let d = lab.drops("hv1").expect("drops");
    assert!(
        d.get(&DropReason::ArpUnknownTarget).copied().unwrap_or(0) > 0,
        "b1's ARP for 10.0.0.9 unanswered: {d:?}"
    );
}

#[test]
fn privileged_underlay_injection_is_dropped_and_counted() {
    let mut lab = lab();
    let evil = lab.add_underlay_intruder().expect("intruder");
    lab.apply().expect("apply");
    let (a1, a2, a3) = (
        lab.vm("a1").clone(),
        lab.vm("a2").clone(),
        lab.vm("a3").clone(),
    );
    let legit = |marker: &str| VxlanFrame {
        outer_dst_mac: lab.uplink_mac("hv1").expect("mac"),
        outer_src: underlay_ip(2),
        outer_dst: underlay_ip(1),
        flags: 0x08,
        vni: 1001,
        inner_src_mac: a2.mac.0,
        inner_dst_mac: a1.mac.0,
        inner_src: a2.ip,
        inner_dst: a1.ip,
        marker: marker.as_bytes().to_vec(),
    };
    let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
        (
            "unknown VTEP",
            VxlanFrame {
                outer_src: "192.0.2.66".parse().unwrap(),
                ..legit("inj-unknown-vtep")
            }
            .build(),
            DropReason::VxlanUnknownVtep,
        ),
        (
            "wrong VNI",
            VxlanFrame {
                vni: 4242,
                ..legit("inj-wrong-vni")
            }
            .build(),
            DropReason::VxlanUnknownVni,
        ),
        (
            "bad flags",
            VxlanFrame {
                flags: 0x0c,
                ..legit("inj-bad-flags")
            }
            .build(),
            DropReason::VxlanBadFlags,
        ),
        (
            "truncated header",
            legit("inj-trunc").build_with_payload(&[0x08, 0, 0, 0]),
            DropReason::VxlanTruncated,
        ),
        (
            "spoofed inner source",
            VxlanFrame {
                inner_src_mac: a3.mac.0,
                ..legit("inj-spoofed-src")
            }
            .build(),
            DropReason::VxlanSpoofedSource,
        ),
        (
            "unknown inner destination",
            VxlanFrame {
                inner_dst_mac: [2, 0, 0, 0, 0, 0x77],
                ..legit("inj-unknown-dst")
            }
            .build(),
            DropReason::VxlanUnknownDestination,
        ),
    ];
    let caps = [
        Capture::start(&a1.ns).expect("cap"),
        Capture::start(&lab.vm("b1").ns).expect("cap"),
    ];
    for (what, frame, reason) in &cases {
        let before = lab
            .drops("hv1")
            .expect("drops")
            .get(reason)
            .copied()
            .unwrap_or(0);
        send_frames(&evil, "eth0", vec![frame.clone(); 3]).expect("send");
        let count = || {
            lab.drops("hv1")
                .expect("drops")
                .get(reason)
                .copied()
                .unwrap_or(0)
        };
        eventually(|| count() - before >= 3);
        assert_eq!(
            count() - before,
            3,
            "{what}: 3 frames dropped as {}",
            reason.name()
        );
    }
    // Control: the same rig, well formed and from hv2's VTEP, is delivered.
    send_frames(&evil, "eth0", vec![legit("inj-control-delivered").build()]).expect("send");
    caps[0].wait_for(WAIT, |fs| {
        fs.iter().any(|f| contains(f, b"inj-control-delivered"))
    });
    let [cap_a1, cap_b1] = caps;
    let a1_frames = cap_a1.finish().expect("cap");
    let b1_frames = cap_b1.finish().expect("cap");
    for f in a1_frames.iter().chain(&b1_frames) {
        assert!(
            !contains(f, b"inj-"[..].as_ref()) || contains(f, b"inj-control"),
            "an injected frame reached a VM"
        );
    }
    assert!(
        a1_frames
            .iter()
            .any(|f| contains(f, b"inj-control-delivered")),
        "control frame reached a1"
    );
    assert!(
        !b1_frames.iter().any(|f| contains(f, b"inj-")),
        "nothing reached tenant b"
    );
}

#[test]
fn privileged_iperf3_tcp_with_default_offloads_beside_kernel_baseline() {
    // The VMs keep their default offloads (checksum, TSO/GSO): the bulk
    // transfer must work through encap (GSO kept) and decap, over a wire
    // that checksums and segments as a NIC's does (XDP uplink) and over one
    // that keeps GSO end to end (TC uplink); an established stream never
    // loses a segment to conntrack (both CPUs stamp its entry). The hosts
    // forward on their uplink in one case (the FIB helper then resolves
    // the next hop, and checks the MTU: TSO bursts must pass) and not in
    // the other (the kernel resolves it after the program).
    need_root();
    for (hook, wire, forwarding) in [
        (UplinkHook::Xdp, Wire::Nic, false),
        (UplinkHook::Tc, Wire::Offload, true),
    ] {
        let mut lab = Lab::two_hosts_on(hook, wire).expect("lab");
        lab.uplink_forwarding(forwarding).expect("forwarding");
        lab.apply().expect("apply");
        let server = lab.vm("a2").ns.clone();
        sh(&["ip", "netns", "exec", &server, "nstat", "-n"]).expect("nstat");
        let cloison =
            iperf3(&server, &lab.vm("a1").ns, "10.0.0.2", 2).expect("iperf3 over Cloison");
        if wire == Wire::Offload {
            // GSO packets reach the VM with their payload in their pages
            // (only headers pulled), so its TCP coalesces them.
            let nstat = sh(&["ip", "netns", "exec", &server, "nstat"]).expect("nstat");
            let coalesced: u64 = nstat
                .lines()
                .find(|l| l.starts_with("TcpExtTCPRcvCoalesce "))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0);
            assert!(
                coalesced > 100,
                "receiver coalesced {coalesced} segments:\n{nstat}"
            );
        }
        // Only the VMs' own chatter (IPv6 solicitations, multicast, DAD)
        // may be dropped: nothing of the stream.
        let chatter = [
            // (Router solicitations, with no agent to answer them.)
            DropReason::NoServiceAgent,
            DropReason::Multicast,
            DropReason::NdDadProbe,
            DropReason::SpoofedIp,
        ];
        for host in ["hv1", "hv2"] {
            let drops = lab.drops(host).expect("drops");
            assert!(
                drops.keys().all(|r| chatter.contains(r)),
                "{wire:?} wire, forwarding {forwarding}: segments of the stream dropped on {host}: {drops:?}"
            );
        }
        // A bulk transfer, not a trickle of what fits one segment.
        assert!(
            cloison > 0.1,
            "{wire:?} wire, forwarding {forwarding}: {cloison} Gbit/s"
        );
        lab.cleanup();
        let base = KernelBaseline::on(wire)
            .and_then(|b| iperf3(&b.vm2, &b.vm1, "10.0.0.2", 2))
            .expect("iperf3 over the kernel baseline");
        println!(
            "iperf3 TCP, {wire:?} wire, uplink forwarding {forwarding}: Cloison ({hook:?} uplink) {cloison:.2} Gbit/s, kernel VXLAN + bridge {base:.2} Gbit/s (ratio {:.2})",
            cloison / base
        );
        assert!(cloison > 0.0 && base > 0.0, "both carried TCP");
    }
}

const DENIED_WAIT: Duration = Duration::from_secs(1);

fn tcp_ok(lab: &Lab, from: &str, to: &str, addr: IpAddr, port: u16) -> bool {
    tcp_echo_to(lab, from, to, addr, port, b"sg", DENIED_WAIT).is_ok_and(|got| got == b"sg")
}

fn udp_ok(lab: &Lab, from: &str, to: &str, port: u16) -> bool {
    let addr = lab.vm(to).ip.into();
    udp_echo_to(lab, from, to, addr, port, b"sg", DENIED_WAIT).is_ok_and(|got| got == b"sg")
}

#[test]
fn privileged_security_group_matrix_with_real_traffic() {
    let mut lab = lab();
    lab.web_and_client();
    lab.apply().expect("apply");
    let v4 = |vm: &str| IpAddr::from(lab.vm(vm).ip);
    let (a1, b2) = (v4("a1"), v4("b2"));
    let a1_v6 = IpAddr::from(lab.vm("a1").ip6);

    let allowed = [
        (
            "a2 -> a1 tcp 8080 (remote group, across hosts)",
            tcp_ok(&lab, "a2", "a1", a1, 8080),
        ),
        (
            "a3 -> a1 udp 5353 (remote CIDR, one host)",
            udp_ok(&lab, "a3", "a1", 5353),
        ),
        (
            "a2 -> a1 ping (icmp from anywhere)",
            lab.ping("a2", "10.0.0.1", 2),
        ),
        (
            "b1 -> b2 tcp 8080 (tenant b's default group)",
            tcp_ok(&lab, "b1", "b2", b2, 8080),
        ),
    ];
    let denied = [
        (
            "a3 -> a1 tcp 8080 (a3 is not in client)",
            tcp_ok(&lab, "a3", "a1", a1, 8080),
        ),
        (
            "a2 -> a1 tcp 9090 (no rule)",
            tcp_ok(&lab, "a2", "a1", a1, 9090),
        ),
        (
            "a2 -> a1 udp 5353 (the CIDR is a3's)",
            udp_ok(&lab, "a2", "a1", 5353),
        ),
        (
            "a1 -> a2 ping (client takes nothing in)",
            lab.ping("a1", "10.0.0.2", 2),
        ),
        (
            "a1 -> a3 tcp 8080 (plain takes nothing in)",
            tcp_ok(&lab, "a1", "a3", v4("a3"), 8080),
        ),
        (
            "a2 -> a1 tcp 8080 over IPv6 (the rule is IPv4)",
            tcp_ok(&lab, "a2", "a1", a1_v6, 8080),
        ),
    ];
    for (what, ok) in allowed {
        assert!(ok, "allowed: {what}");
    }
    for (what, ok) in denied {
        assert!(!ok, "denied: {what}");
    }
    let (d1, d2) = (lab.drops("hv1").unwrap(), lab.drops("hv2").unwrap());
    assert!(
        d1.contains_key(&DropReason::SgIngressDenied),
        "hv1 counts: {d1:?}"
    );
    assert!(
        d2.contains_key(&DropReason::SgIngressDenied),
        "hv2 counts: {d2:?}"
    );

    // A remote group follows its members: a3 joins client.
    lab.set_groups(&[("a3", "client")]);
    lab.apply().expect("apply");
    assert!(
        tcp_ok(&lab, "a3", "a1", a1, 8080),
        "a3 -> a1 tcp 8080 once a3 is in client"
    );
}

/// `cloisonctl trace --follow` across the two hosts, through the agents:
/// a2's SYN to a1 leaves hv2 in VXLAN and hv1's uplink program delivers
/// it by the rule the test knows; a port no rule opens is dropped there,
/// and says so; the traces leave conntrack as it was; real traffic agrees.
#[test]
fn privileged_trace_follows_a_packet_across_hosts() {
    let mut lab = lab();
    lab.web_and_client();
    lab.start_agents().expect("agents");
    lab.apply_via_agents().expect("apply");
    let peer = format!("hv1={}", lab.agent_endpoint("hv1"));
    let trace = |packet: &str, extra: &[&str]| {
        let mut args = vec!["trace", "--port", "a2", packet, "--follow", "--peer", &peer];
        args.extend_from_slice(extra);
        let (ok, out, err) = lab.cloisonctl("hv2", &args).expect("cloisonctl");
        assert!(ok, "cloisonctl trace {packet}: {err}");
        out
    };
    let ct = (
        lab.conntrack_entries("hv1").unwrap(),
        lab.conntrack_entries("hv2").unwrap(),
    );
    let out = trace("tcp 10.0.0.2:40000 > 10.0.0.1:8080 flags S", &["--minimal"]);
    let hv1 = lab_underlay("hv1");
    assert_eq!(
        out,
        format!(
            "kernel to-vtep:{hv1}\nmodel to-vtep:{hv1}\nrule egress:client#0\nagree\n\
             --- followed to host hv1 ---\n\
             kernel to-port:a1\nmodel to-port:a1\nrule ingress:web#0\nagree\n"
        )
    );
    let out = trace("tcp 10.0.0.2:40000 > 10.0.0.1:9090 flags S", &["--minimal"]);
    assert!(
        out.ends_with("kernel drop:sg_ingress_denied\nmodel drop:sg_ingress_denied\nrule ingress:none\nagree\n"),
        "{out}"
    );
    // The full form names the stages and the encapsulation.
    let out = trace("tcp 10.0.0.2:40001 > 10.0.0.1:8080 flags S", &[]);
    for needle in [
        "anti-spoofing    source MAC and IP allowed on this port: entry 10.0.0.2/32 from MAC 02:",
        "would insert as SYN_SENT",
        "vxlan            to VTEP",
        "next hop         ",
        "VXLAN VNI",
        "decap            to a1",
        "allowed by web#0",
        "kernel and model agree",
    ] {
        assert!(out.contains(needle), "{needle:?} in:\n{out}");
    }
    assert_eq!(
        (
            lab.conntrack_entries("hv1").unwrap(),
            lab.conntrack_entries("hv2").unwrap()
        ),
        ct,
        "traces track nothing"
    );
    // JSON, and what a bad request gets.
    let (ok, out, _) = lab
        .cloisonctl(
            "hv2",
            &[
                "--json",
                "trace",
                "--port",
                "a2",
                "udp 10.0.0.2:1 > 10.0.0.1:5353",
            ],
        )
        .unwrap();
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["kernel"]["verdict"], format!("to-vtep:{hv1}"));
    let (ok, _, err) = lab
        .cloisonctl(
            "hv2",
            &["trace", "--port", "a2", "tcp 10.0.0.2 > 10.0.0.1:80"],
        )
        .unwrap();
    assert!(
        !ok && err.contains("a port is needed") && err.contains("400"),
        "{err}"
    );
    let (ok, _, err) = lab
        .cloisonctl(
            "hv2",
            &["trace", "--port", "a1", "udp 10.0.0.1:1 > 10.0.0.2:2"],
        )
        .unwrap();
    assert!(
        !ok && err.contains("on host hv1") && err.contains("409"),
        "{err}"
    );
    // What the trace says is what traffic does.
    assert!(tcp_ok(
        &lab,
        "a2",
        "a1",
        IpAddr::from(lab.vm("a1").ip),
        8080
    ));
    assert!(!tcp_ok(
        &lab,
        "a2",
        "a1",
        IpAddr::from(lab.vm("a1").ip),
        9090
    ));
}

/// The value of the one series `name{labels}` in a `/metrics` text.
fn series(metrics: &str, name_and_labels: &str) -> f64 {
    let line = metrics
        .lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no series {name_and_labels} in:\n{metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// `/metrics` of an agent shows how full its maps are and each port's and
/// tenant's conntrack against its share, beside what the kernel holds.
#[test]
fn privileged_metrics_show_map_fill_and_conntrack_shares() {
    let mut lab = lab();
    lab.web_and_client();
    lab.start_agents().expect("agents");
    lab.apply_via_agents().expect("apply");
    let a1 = IpAddr::from(lab.vm("a1").ip);
    assert!(tcp_ok(&lab, "a2", "a1", a1, 8080));
    // Read around the scrape: a flow may start or expire meanwhile.
    let ct0 = lab.conntrack_entries("hv1").unwrap();
    let m = lab.agent_metrics("hv1").unwrap();
    let ct1 = lab.conntrack_entries("hv1").unwrap();
    assert!(ct0.min(ct1) >= 1);
    let shown = series(&m, r#"cloison_map_entries{host="hv1",map="CL_CONNTRACK"}"#) as usize;
    assert!(
        (ct0.min(ct1)..=ct0.max(ct1)).contains(&shown),
        "/metrics shows {shown} conntrack entries, the kernel held {ct0} then {ct1}"
    );
    assert_eq!(
        series(&m, r#"cloison_map_entries{host="hv1",map="CL_FWD"}"#) as usize,
        lab.forward_entries("hv1").unwrap()
    );
    assert_eq!(
        series(&m, r#"cloison_map_capacity{host="hv1",map="CL_FWD"}"#) as u32,
        cloison_abi::MAX_FORWARD
    );
    assert!(
        !m.contains(r#"map="CL_CONFIG""#),
        "arrays are always full: not shown"
    );
    // a1's flow is charged to a2 (the sender) on hv2, and to a1 on hv1
    // (the receiver, which has port security).
    let port = r#"{host="hv1",port="a1",tenant="tenant-a"}"#;
    let used = series(&m, &format!("cloison_port_conntrack_entries{port}"));
    let share = series(&m, &format!("cloison_port_conntrack_share{port}"));
    assert!(used >= 1.0 && share > used, "a1: {used} of {share}");
    let tenant = r#"{host="hv1",tenant="tenant-a"}"#;
    assert!(series(&m, &format!("cloison_tenant_conntrack_entries{tenant}")) >= used);
    assert!(series(&m, &format!("cloison_tenant_conntrack_share{tenant}")) >= share);
    assert!(series(&m, r#"cloison_apply_duration_seconds_count{host="hv1"}"#) >= 1.0);
    assert_eq!(
        series(&m, r#"cloison_apply_failures_total{host="hv1"}"#),
        0.0
    );
}

/// `cloisonctl monitor ARGS --json` against `host`'s agent, its lines
/// gathered as they come; killed (by its process id) when dropped.
struct Monitoring {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Monitoring {
    fn start(lab: &Lab, host: &str, args: &[&str]) -> Monitoring {
        use std::io::BufRead;
        let mut child = std::process::Command::new(cloisonctl_path().unwrap())
            .args(["--endpoint", &lab.agent_endpoint(host), "--json", "monitor"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cloisonctl monitor");
        let out = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                l.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).expect("a JSON line"));
            }
        });
        Monitoring { child, lines }
    }

    fn events(&self) -> Vec<serde_json::Value> {
        let l = self.lines.lock().unwrap();
        l.iter().filter(|v| v["kind"] != "lost").cloned().collect()
    }

    fn lost(&self) -> u64 {
        let l = self.lines.lock().unwrap();
        l.iter()
            .filter_map(|v| v["lost"].as_u64())
            .max()
            .unwrap_or(0)
    }
}

impl Drop for Monitoring {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cloisonctl monitor` shows the drops made in the lab with their port,
/// tenant, reason and addresses (a spoofed source on hv1's port, a
/// connection a1's group refuses from hv2); another port's watcher sees
/// none of a1's; a flood is held to the agent's rate and the loss shown.
#[test]
fn privileged_monitor_shows_drops_by_port_and_reason_and_counts_a_flood() {
    use cloison_testkit::wire::build::{udp, v4};
    let mut lab = lab();
    lab.web_and_client();
    lab.agent_args
        .entry("hv1".into())
        .or_default()
        .extend(["--monitor-rate".into(), "100".into()]);
    lab.start_agents().expect("agents");
    lab.apply_via_agents().expect("apply");
    let (a1, a2) = (lab.vm("a1").clone(), lab.vm("a2").clone());
    let spoofed = v4(
        a1.mac.0,
        a2.mac.0,
        [10, 0, 0, 99],
        a2.ip.octets(),
        udp(1000, 2000, b"spoofed"),
    )
    .emit();
    let watch = Monitoring::start(&lab, "hv1", &["--port", "a1", "--drops"]);
    let other = Monitoring::start(&lab, "hv1", &["--port", "b1"]);
    // The watcher is on once the drop shows (it may take a moment to
    // start; a1's own multicast listener reports are dropped too).
    let spoofed_seen = || {
        watch
            .events()
            .into_iter()
            .find(|e| e["reason"] == "spoofed_ip")
    };
    eventually(|| {
        send_frames(&a1.ns, "eth0", vec![spoofed.clone()]).expect("send");
        std::thread::sleep(Duration::from_millis(200));
        spoofed_seen().is_some()
    });
    let e = &spoofed_seen().expect("the spoofed frame's drop streamed");
    assert_eq!(e["kind"], "drop");
    assert_eq!(e["reason"], "spoofed_ip");
    assert_eq!(e["hook"], "port");
    assert_eq!(
        (e["port"].as_str(), e["tenant"].as_str()),
        (Some("a1"), Some("tenant-a"))
    );
    assert_eq!(e["src"], "10.0.0.99");
    assert_eq!(
        (e["proto"].as_str(), e["dport"].as_u64()),
        (Some("udp"), Some(2000))
    );

    // From hv2, to a port a1's group does not open: dropped on hv1's
    // uplink for a1, the inner packet shown.
    assert!(!tcp_ok(&lab, "a2", "a1", IpAddr::from(a1.ip), 9999));
    eventually(|| {
        watch
            .events()
            .iter()
            .any(|e| e["reason"] == "sg_ingress_denied")
    });
    let e = watch
        .events()
        .into_iter()
        .find(|e| e["reason"] == "sg_ingress_denied")
        .unwrap();
    assert_eq!(
        (e["hook"].as_str(), e["port"].as_str()),
        (Some("uplink"), Some("a1"))
    );
    assert_eq!(e["src"], a2.ip.to_string());
    assert_eq!(e["dport"], 9999);
    assert!(e["vni"].is_u64(), "the VXLAN packet's inner frame: {e}");
    assert!(
        other.events().iter().all(|e| e["port"] == "b1"),
        "b1's watcher saw another port's events: {:?}",
        other.events()
    );

    // A flood of 3000 spoofed frames: at most the rate (100 a second on
    // each CPU) is streamed, the rest counted lost and said so.
    let before = watch.events().len();
    send_frames(&a1.ns, "eth0", vec![spoofed.clone(); 3000]).expect("flood");
    eventually(|| watch.lost() > 0);
    std::thread::sleep(Duration::from_millis(1500));
    let streamed = watch.events().len() - before;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    assert!(
        streamed > 0 && streamed <= 100 * cpus * 3,
        "{streamed} events of a flood streamed"
    );
    assert!(
        watch.lost() as usize + streamed >= 3000,
        "{} lost + {streamed} streamed of 3000",
        watch.lost()
    );
    let m = lab.agent_metrics("hv1").unwrap();
    assert!(series(&m, r#"cloison_monitor_events_lost_total{host="hv1"}"#) >= watch.lost() as f64);
    assert_eq!(series(&m, r#"cloison_monitor_watchers{host="hv1"}"#), 2.0);
    assert_ne!(lab.monitor_config("hv1").unwrap().flags, 0);

    // The watchers gone (their next keep-alive line fails), the programs
    // stream nothing again.
    drop((watch, other));
    let watchers = || {
        series(
            &lab.agent_metrics("hv1").unwrap(),
            r#"cloison_monitor_watchers{host="hv1"}"#,
        )
    };
    let end = std::time::Instant::now() + Duration::from_secs(15);
    while watchers() > 0.0 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(watchers(), 0.0, "the watchers that left are forgotten");
    assert_eq!(
        lab.monitor_config("hv1").unwrap(),
        cloison_abi::MonitorConfig::default()
    );
}

fn lab_underlay(host: &str) -> std::net::Ipv4Addr {
    underlay_ip(if host == "hv1" { 1 } else { 2 })
}

#[test]
fn privileged_revoke_cuts_a_running_tcp_stream() {
    let mut lab = lab();
    lab.web_and_client();
    lab.apply().expect("apply");
    let stream = TcpStreamProbe::start(&lab, "a2", "a1", 8080).expect("stream");
    assert!(
        stream.progress(Duration::from_secs(1)) > 0,
        "the stream runs"
    );

    // a2 leaves client: the rule that let its stream in no longer matches.
    lab.set_groups(&[("a2", "plain")]);
    lab.apply().expect("apply");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        stream.progress(Duration::from_millis(1500)),
        0,
        "the stream stops once the rule no longer allows it"
    );
    let d1 = lab.drops("hv1").unwrap();
    assert!(
        d1.contains_key(&DropReason::SgRevoked),
        "cut and counted: {d1:?}"
    );

    lab.set_groups(&[("a2", "client")]);
    lab.apply().expect("apply");
    let a1 = IpAddr::from(lab.vm("a1").ip);
    assert!(
        tcp_ok(&lab, "a2", "a1", a1, 8081),
        "a new connection once a2 is back"
    );
}

#[test]
fn privileged_new_flow_flood_leaves_other_tenants_alone() {
    let mut lab = lab();
    lab.apply().expect("apply");
    // Tenant a: a busy stream, and a connection that stays idle during the
    // flood (an LRU would evict an idle entry first).
    let stream = TcpStreamProbe::start(&lab, "a2", "a1", 8080).expect("stream");
    assert!(
        stream.progress(Duration::from_secs(1)) > 0,
        "the stream runs"
    );
    let (mut client, mut server) = tcp_connection(&lab, "a1", "a2", 8081).expect("connection");
    let exchange = |client: &mut std::net::TcpStream, server: &mut std::net::TcpStream| {
        client.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf)?;
        server.write_all(b"pong")?;
        client.read_exact(&mut buf)?;
        anyhow::Ok(buf == *b"pong")
    };
    assert!(exchange(&mut client, &mut server).expect("before the flood"));

    // More new flows than the whole conntrack table holds.
    let flows = cloison_abi::MAX_CONNTRACK + 40_000;
    udp_flood(&lab, "b1", lab.vm("b2").ip, flows).expect("flood");

    assert!(
        exchange(&mut client, &mut server).expect("after the flood"),
        "tenant a's idle connection survives"
    );
    assert!(
        stream.progress(Duration::from_secs(1)) > 0,
        "tenant a's busy stream goes on"
    );
    let a3 = IpAddr::from(lab.vm("a3").ip);
    assert!(
        tcp_ok(&lab, "a1", "a3", a3, 5001),
        "tenant a still opens new flows"
    );
    let d1 = lab.drops("hv1").unwrap();
    let refused = d1.get(&DropReason::CtPortQuota).copied().unwrap_or(0);
    let entries = lab.conntrack_entries("hv1").unwrap();
    println!(
        "flood of {flows} flows: {refused} refused over quota, {entries} conntrack entries on hv1"
    );
    assert!(
        refused > 0,
        "b1's new flows beyond its share are refused: {d1:?}"
    );
    assert!(entries < cloison_abi::MAX_CONNTRACK as usize);
}

/// The id of the program behind `host`'s pinned uplink link (bpftool).
fn uplink_program_id(lab: &Lab, host: &str) -> String {
    let links = lab.pin_root.join(host).join("links");
    let pin = ["uplink-xdp", "uplink-tc"]
        .iter()
        .map(|n| links.join(n))
        .find(|p| p.exists())
        .expect("a pinned uplink link");
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(&pin)
        .output()
        .expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v["prog_id"].to_string()
}

#[test]
fn privileged_agents_restart_without_losing_a_packet() {
    let mut lab = lab();
    lab.start_agents().expect("agents");
    lab.apply_via_agents()
        .expect("state through the agents' API");
    assert!(
        lab.ping("a1", "10.0.0.2", 2),
        "a1 -> a2 through agent-programmed hosts"
    );

    let stream = TcpStreamProbe::start(&lab, "a2", "a1", 8080).expect("stream");
    let pings = ping_in_background(&lab, "a1", "10.0.0.2", 1500, "0.004");
    assert!(
        stream.progress(Duration::from_millis(500)) > 0,
        "the stream runs"
    );

    // SIGKILL an agent and start it again (it adopts the pinned maps and
    // links and swaps in freshly loaded programs), on each host in turn.
    for host in ["hv1", "hv2"] {
        let before = uplink_program_id(&lab, host);
        lab.kill_agent(host);
        std::thread::sleep(Duration::from_millis(300));
        lab.restart_agent(host).expect("restart");
        let s = lab.wait_agent(host).expect("converged after restart");
        assert_eq!(s["pending_ports"], serde_json::json!([]));
        let after = uplink_program_id(&lab, host);
        assert_ne!(
            before, after,
            "{host}: the restarted agent swapped in its own programs"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (sent, received) = ping_result(pings);
    println!("pings during two agent kill -9 / restarts: {received}/{sent}");
    assert_eq!(received, sent, "not one ping lost");
    assert!(
        stream.progress(Duration::from_millis(500)) > 0,
        "the stream still runs"
    );
    // The stream's connection survived: its conntrack entries were kept.
    // Reading the counters leaves the agent's programs running.
    let running = uplink_program_id(&lab, "hv1");
    let d1 = lab.drops("hv1").unwrap();
    assert_eq!(
        uplink_program_id(&lab, "hv1"),
        running,
        "reading stats swapped no program"
    );
    assert!(
        !d1.contains_key(&DropReason::CtTcpNotSyn),
        "no flow forgotten: {d1:?}"
    );
}

/// Agents with default flags on an underlay that hands the uplinks GSO
/// packets with partial checksums (a veth fabric whose switch ports have GRO
/// on): `--uplink-hook auto` must pick a hook that carries them. XDP there
/// passed ping and failed every TCP and UDP connection across hosts.
#[test]
fn privileged_default_flags_carry_tcp_and_udp_on_a_gso_underlay() {
    need_root();
    let mut lab = Lab::two_hosts_on(UplinkHook::Auto, Wire::Offload).expect("lab");
    lab.start_agents().expect("agents");
    lab.apply().expect("state through the agents' API");
    for host in ["hv1", "hv2"] {
        let links = lab.pin_root.join(host).join("links");
        assert!(
            links.join("uplink-tc").exists() && !links.join("uplink-xdp").exists(),
            "{host}: auto picked XDP on a veth uplink"
        );
    }
    assert!(lab.ping("a1", "10.0.0.2", 2), "ping across hosts");
    let big = vec![0x5au8; 60_000];
    let got = tcp_echo(&lab, "a1", "a2", &big).expect("TCP across hosts");
    assert!(got == big, "TCP echo of 60 kB: {} bytes back", got.len());
    let got = udp_echo(&lab, "a2", "a1", b"udp across hosts").expect("UDP across hosts");
    assert_eq!(got, b"udp across hosts");
    let gbit = iperf3(&lab.vm("a2").ns, &lab.vm("a1").ns, "10.0.0.2", 1).expect("iperf3");
    assert!(gbit > 0.1, "a bulk TCP stream: {gbit} Gbit/s");
}

/// The pps bench's generator and sink still work, for Cloison and the
/// kernel baseline (short runs; `cargo xtask bench` measures).
#[test]
fn privileged_pps_generator_reaches_the_other_host() {
    let mut lab = lab();
    lab.apply().expect("apply");
    let (a1, a2) = (lab.vm("a1").clone(), lab.vm("a2").clone());
    let frame = cloison_lab::pps::udp_frame((a1.mac, a1.ip), (a2.mac, a2.ip), 60);
    let hv1 = lab.ns("hv1");
    let r = cloison_lab::pps::measure(
        &cloison_lab::pps::Between {
            setup: "cloison",
            from_ns: &a1.ns,
            to_ns: &a2.ns,
            sink_if: "eth0",
            sender_port: (&hv1, &a1.port_if),
        },
        &frame,
        20_000,
        10,
    )
    .expect("cloison pps");
    assert!(r.delivered > 0 && r.delivered <= r.sent, "{r:?}");
    let rr = udp_rr(&a1.ns, &a2.ns, a2.ip, 200).expect("request/response");
    assert!(rr.p50_us > 0.0 && rr.p99_us >= rr.p50_us, "{rr:?}");
    lab.cleanup();
    let b = KernelBaseline::new().expect("baseline");
    let frame = cloison_lab::pps::udp_frame(
        (
            cloison_dataplane::snapshot::MacAddr([2, 0, 0, 0, 0, 1]),
            "10.0.0.1".parse().unwrap(),
        ),
        (
            cloison_dataplane::snapshot::MacAddr([2, 0, 0, 0, 0, 2]),
            "10.0.0.2".parse().unwrap(),
        ),
        60,
    );
    let k = cloison_lab::pps::measure(
        &cloison_lab::pps::Between {
            setup: "kernel",
            from_ns: &b.vm1,
            to_ns: &b.vm2,
            sink_if: "eth0",
            sender_port: (&b.hv1, "tap0"),
        },
        &frame,
        20_000,
        10,
    )
    .expect("kernel pps");
    assert!(
        k.delivered > 0,
        "the baseline delivers (its nftables rules allow the group): {k:?}"
    );
    println!(
        "smoke: Cloison {} / kernel {} of 20000 delivered",
        r.delivered, k.delivered
    );
}

/// The routing bench's paths carry the generator's frames: through
/// Cloison's router (the generator writes its headers into every recycled
/// frame, which the router rewrote in place: without that, the second use
/// of a page leaves with the router's MAC as its source and is dropped as
/// spoofed) and through the kernel baseline's router namespace.
#[test]
fn privileged_pps_generator_through_a_router() {
    let mut lab = lab();
    lab.add_routers().expect("routers");
    lab.apply().expect("apply");
    let (a1, ad2) = (lab.vm("a1").clone(), lab.vm("ad2").clone());
    let gateway = cloison_dataplane::snapshot::MacAddr(cloison_abi::gateway_mac(1001));
    let frame = cloison_lab::pps::udp_frame((a1.mac, a1.ip), (gateway, ad2.ip), 60);
    let hv1 = lab.ns("hv1");
    let r = cloison_lab::pps::measure_once(
        &cloison_lab::pps::Between {
            setup: "cloison",
            from_ns: &a1.ns,
            to_ns: &ad2.ns,
            sink_if: "eth0",
            sender_port: (&hv1, &a1.port_if),
        },
        &frame,
        50_000,
        10,
    )
    .expect("cloison routed pps");
    let spoofed = lab
        .drops("hv1")
        .expect("drops")
        .get(&DropReason::SpoofedMac)
        .copied()
        .unwrap_or(0);
    assert_eq!(spoofed, 0, "generated frames dropped as spoofed: {r:?}");
    assert!(r.delivered > 0 && r.delivered <= r.sent, "{r:?}");
    lab.cleanup();

    let b = KernelBaseline::routed().expect("the kernel's router namespace");
    let vm3 = b.routed_vm.clone().expect("routed VM");
    let frame = cloison_lab::pps::udp_frame(
        (
            cloison_dataplane::snapshot::MacAddr([2, 0, 0, 0, 0, 1]),
            "10.0.0.1".parse().unwrap(),
        ),
        (
            cloison_dataplane::snapshot::MacAddr(KernelBaseline::ROUTER_MAC),
            "10.1.0.12".parse().unwrap(),
        ),
        60,
    );
    let k = cloison_lab::pps::measure_once(
        &cloison_lab::pps::Between {
            setup: "kernel",
            from_ns: &b.vm1,
            to_ns: &vm3,
            sink_if: "eth0",
            sender_port: (&b.hv1, "tap0"),
        },
        &frame,
        50_000,
        10,
    )
    .expect("kernel routed pps");
    assert!(k.delivered > 0, "the kernel's router forwards: {k:?}");
    println!(
        "routed smoke: Cloison {} / kernel {} of 50000 delivered",
        r.delivered, k.delivered
    );
}

#[test]
fn privileged_map_memory_is_measured() {
    let m = cloison_lab::memory::measure().expect("memory");
    println!(
        "maps {} B; per remote port {:.0} B, per rule {:.0} B, per flow {:.0} B",
        m.total_bytes, m.bytes_per_remote_port, m.bytes_per_rule, m.bytes_per_flow
    );
    assert!(m.maps.iter().any(|x| x.name == "CL_CONNTRACK"));
    assert!(
        m.bytes_per_flow > 44.0 + 24.0,
        "a conntrack entry holds at least its key and value"
    );
    assert!(m.bytes_per_rule > 0.0, "rules grow the LPM tables");
}

/// Class 3 of the isolation review: a VM's 802.1Q-tagged frames. The
/// kernel takes the (outer) tag off before tc and carries it as metadata:
/// before the fix the frame went on to the peer VM and onto the underlay
/// frame with its VLAN id and priority. A second tag (802.1ad, QinQ) stays
/// in the frame. Both are dropped and counted, nothing of them reaches a VM
/// of this host or the other, and the same frames untagged do.
#[test]
fn privileged_vlan_tagged_frames_from_a_vm_are_dropped() {
    use cloison_testkit::wire::{build, Frame};
    let mut lab = lab();
    lab.apply().expect("apply");
    let a1 = lab.vm("a1");
    let marker = b"cloison-vlan-marker";
    let to = |peer: &str| -> Frame {
        let p = lab.vm(peer);
        build::v4(
            a1.mac.0,
            p.mac.0,
            a1.ip.octets(),
            p.ip.octets(),
            build::udp(40000, 9, marker),
        )
    };
    let vlan_count = |lab: &Lab| {
        lab.drops("hv1")
            .expect("drops")
            .get(&DropReason::VlanTaggedFromVm)
            .copied()
            .unwrap_or(0)
    };
    // Sends `frames` from a1's eth0, then waits until the tag counter has
    // counted `dropped` more or, with none to drop, until both a2 and a3
    // got one; how many frames with the marker a2 and a3 got.
    let send = |frames: Vec<Vec<u8>>, dropped: u64| {
        let caps: Vec<_> = ["a2", "a3"]
            .iter()
            .map(|v| Capture::start(&lab.vm(v).ns).expect("capture"))
            .collect();
        let before = vlan_count(&lab);
        send_frames(&a1.ns, "eth0", frames).expect("send");
        if dropped > 0 {
            eventually(|| vlan_count(&lab) - before >= dropped);
            // (time for a frame that went through anyway to arrive)
            std::thread::sleep(Duration::from_millis(200));
        } else {
            for c in &caps {
                c.wait_for(WAIT, |fs| fs.iter().any(|f| contains(f, marker)));
            }
        }
        caps.into_iter()
            .map(|c| {
                let frames = c.finish().expect("capture");
                frames.iter().filter(|f| contains(f, marker)).count()
            })
            .collect::<Vec<_>>()
    };
    let tagged = |f: Frame, qinq: bool| {
        let mut f = f;
        f.vlan = Some((5, 100));
        let mut b = f.emit();
        if qinq {
            // An outer service tag before the customer tag.
            b.splice(12..12, [0x88, 0xa8, 0xa0, 0x07]);
        }
        b
    };

    let before = vlan_count(&lab);
    let got = send(vec![tagged(to("a2"), false), tagged(to("a3"), false)], 2);
    assert_eq!(got, [0, 0], "tagged frames reached a2, a3");
    let one_tag = vlan_count(&lab) - before;
    assert_eq!(one_tag, 2, "the tag taken off into metadata: counted");

    let got = send(vec![tagged(to("a2"), true), tagged(to("a3"), true)], 2);
    assert_eq!(got, [0, 0], "double-tagged frames reached a2, a3");
    assert_eq!(
        vlan_count(&lab) - before - one_tag,
        2,
        "the inner tag in the frame: counted"
    );

    // (a VM's port unreachable quotes the marker too)
    let got = send(vec![to("a2").emit(), to("a3").emit()], 0);
    assert!(
        got.iter().all(|n| *n >= 1),
        "the same frames untagged arrive: {got:?}"
    );
}

/// Gateway services with real clients: VMs of two tenants with the same
/// subnet and MACs boot with no address; udhcpc and dhclient get exactly
/// their port's address, MTU and routes, SLAAC their IPv6 address and
/// default router, curl their own instance's metadata; a renewal works
/// across an agent restart.
#[test]
fn privileged_vms_boot_from_the_gateway_services() {
    need_root();
    let mut lab = Lab::two_hosts_booting(UplinkHook::Xdp).expect("lab");
    // Port security and no group: its DHCP and metadata are still
    // answered (Neutron's rule), all else it sends is dropped.
    let b2 = lab
        .snapshot
        .ports
        .iter_mut()
        .find(|p| p.name == "b2")
        .unwrap();
    b2.security_groups.clear();
    lab.start_agents().expect("agents");
    lab.apply_via_agents().expect("apply");
    for vm in ["a1", "b1", "a2", "b2"] {
        lab.boot(vm).expect("boot");
    }

    // IPv4: busybox's udhcpc in tenant a, ISC's dhclient in tenant b, on
    // both hosts; a1 and b1 have the same MAC.
    let a1 = lab.udhcpc("a1", true).expect("udhcpc a1");
    let a2 = lab.udhcpc("a2", false).expect("udhcpc a2");
    let _b1 = lab.dhclient("b1").expect("dhclient b1");
    let _b2 = lab.dhclient("b2").expect("dhclient b2");
    let bound = a1.events()[0].clone();
    for want in [
        "ip=10.0.0.1 ",
        "mask=24 ",
        "router=10.0.0.254 ",
        "dns=10.0.0.53 ",
        "hostname=a1-vm ",
        "mtu=1450 ",
        "serverid=10.0.0.254 ",
        "lease=86400 ",
        "staticroutes=169.254.169.254/32 10.0.0.254 192.168.0.0/16 10.0.0.254 0.0.0.0/0 10.0.0.254",
    ] {
        assert!(
            bound.contains(want),
            "udhcpc's lease lacks {want:?}: {bound}"
        );
    }
    assert!(a2.events()[0].contains("ip=10.0.0.2 "), "{:?}", a2.events());
    for (vm, ip) in [
        ("a1", "10.0.0.1"),
        ("a2", "10.0.0.2"),
        ("b1", "10.0.0.1"),
        ("b2", "10.0.0.2"),
    ] {
        let (addrs, routes, mtu) = lab.vm_config(vm, "-4").expect("ip");
        assert!(addrs.contains(&format!("inet {ip}/24 ")), "{vm}: {addrs}");
        assert_eq!(mtu, 1450, "{vm}: the network's MTU");
        for r in [
            "default via 10.0.0.254",
            "169.254.169.254 via 10.0.0.254",
            "192.168.0.0/16 via 10.0.0.254",
        ] {
            assert!(routes.contains(r), "{vm} lacks the route {r:?}:\n{routes}");
        }
    }
    // The same addresses in both tenants, each its own.
    assert!(
        lab.ping("a1", "10.0.0.2", 3),
        "a1 -> a2 on DHCP addresses: hv1 {:?} hv2 {:?}",
        lab.drops("hv1"),
        lab.drops("hv2")
    );
    assert!(
        !lab.ping("b1", "10.0.0.2", 2),
        "b2 has no group: nothing reaches it"
    );

    // IPv6: SLAAC from the advertisements, the gateway as default router.
    let gw_ll = "fe80::c1:aff:fe00:3e9"; // VNI 1001's gateway MAC, EUI-64
    let mut v6 = (String::new(), String::new());
    eventually(|| {
        let (addrs, routes, _) = lab.vm_config("a1", "-6").expect("ip -6");
        v6 = (addrs, routes);
        v6.0.contains(&format!("{}/64", lab.vm("a1").ip6)) && v6.1.contains(gw_ll)
    });
    assert!(
        v6.0.contains(&format!("inet6 {}/64 scope global", lab.vm("a1").ip6)),
        "a1's SLAAC address: {}",
        v6.0
    );
    assert!(
        v6.1.contains(&format!("default via {gw_ll}")),
        "a1's default router: {}",
        v6.1
    );
    // a1 too: the ping below is to its address.
    for vm in ["a1", "b1", "a2", "b2"] {
        let ip6 = lab.vm(vm).ip6.to_string();
        // Usable once duplicate address detection is over.
        eventually(|| {
            lab.vm_config(vm, "-6")
                .is_ok_and(|c| c.0.contains(&ip6) && !c.0.contains("tentative"))
        });
    }
    assert!(
        lab.ping("a2", &lab.vm("a1").ip6.to_string(), 3),
        "a2 -> a1 over SLAAC addresses"
    );

    // Metadata: each VM its own instance, whatever the other tenant has.
    for vm in ["a1", "b1", "a2"] {
        let id = lab
            .metadata(vm, "/latest/meta-data/instance-id")
            .expect("metadata");
        assert_eq!(id, format!("i-{vm}"), "{vm}'s instance id");
    }
    let doc = lab
        .metadata("b1", "/openstack/latest/meta_data.json")
        .expect("meta_data.json");
    let doc: serde_json::Value = serde_json::from_str(&doc).expect("JSON");
    assert_eq!(doc["uuid"], "i-b1");
    assert_eq!(doc["hostname"], "b1-vm");
    assert_eq!(
        lab.metadata("a1", "/latest/meta-data/local-ipv4").unwrap(),
        "10.0.0.1"
    );

    // A renewal across a restart of the agent of a1's host.
    lab.kill_agent("hv1");
    lab.restart_agent("hv1").expect("restart");
    lab.wait_agent("hv1").expect("converged");
    a1.renew().expect("renew");
    eventually(|| {
        a1.events()
            .iter()
            .any(|e| e.starts_with("renew ip=10.0.0.1 "))
    });
    assert!(
        a1.events()
            .iter()
            .any(|e| e.starts_with("renew ip=10.0.0.1 ")),
        "renewed after the restart: {:?}",
        a1.events()
    );

    // With --metadata-upstream: proxied with OpenStack's headers, for a1
    // and b1 alike (same IP and MAC, two tenants) each its own instance.
    let upstream = lab.metadata_upstream("hv1").expect("upstream");
    let secret = std::env::temp_dir().join(format!("{}-metadata-secret", lab.tag));
    std::fs::write(&secret, "s3cret\n").unwrap();
    lab.agent_args.insert(
        "hv1".into(),
        vec![
            "--metadata-upstream".into(),
            format!("http://127.0.0.1:{}", upstream.port),
            "--metadata-secret-file".into(),
            secret.display().to_string(),
        ],
    );
    lab.kill_agent("hv1");
    lab.restart_agent("hv1").expect("restart with an upstream");
    lab.wait_agent("hv1").expect("converged");
    for (vm, tenant) in [("a1", "tenant-a"), ("b1", "tenant-b")] {
        let body = lab
            .metadata(vm, "/openstack/latest/meta_data.json")
            .expect("proxied");
        assert_eq!(body, format!("upstream for i-{vm}"));
        let head = upstream.requests.lock().unwrap().last().cloned().unwrap();
        let id = format!("i-{vm}");
        for h in [
            "GET /openstack/latest/meta_data.json HTTP/1.1".to_string(),
            format!("x-instance-id: {id}"),
            format!("x-tenant-id: {tenant}"),
            "x-forwarded-for: 10.0.0.1".to_string(),
            format!(
                "x-instance-id-signature: {}",
                cloison_control::gateway::metadata::signature(b"s3cret", &id)
            ),
        ] {
            assert!(head.lines().any(|l| l == h), "{vm}: no {h:?} in\n{head}");
        }
    }
    let _ = std::fs::remove_file(&secret);
}

/// The agent's gateway services under a flood: a VM sending DHCP as fast
/// as it can is held to its rate (the rest dropped and counted in the
/// kernel), its malformed requests are counted, unanswered, by the agent,
/// and the other VMs still get their leases.
#[test]
fn privileged_a_vm_flooding_its_gateway_leaves_the_others_served() {
    use cloison_testkit::wire::build::{icmp, udp, v4, v6};
    need_root();
    let mut lab = Lab::two_hosts_booting(UplinkHook::Xdp).expect("lab");
    lab.start_agents().expect("agents");
    lab.apply_via_agents().expect("apply");
    for vm in ["a1", "a3"] {
        lab.boot(vm).expect("boot");
    }
    let a3 = lab.vm("a3").mac.0;
    let junk = v4(
        a3,
        [0xff; 6],
        [0; 4],
        [255; 4],
        udp(68, 67, b"not a DHCP message"),
    )
    .emit();
    let started = std::time::Instant::now();
    send_frames(&lab.vm("a3").ns, "eth0", vec![junk; 20_000]).expect("flood");
    let a1 = lab.udhcpc("a1", false).expect("a1 still gets its lease");
    assert!(a1.events()[0].contains("ip=10.0.0.1 "), "{:?}", a1.events());
    let secs = started.elapsed().as_secs_f64();
    // A router solicitation from off-link (hop limit 64): refused.
    let mut rs = v6(
        lab.vm("a1").mac.0,
        [0x33, 0x33, 0, 0, 0, 2],
        lab.vm("a1").mac.link_local(),
        "ff02::2".parse().unwrap(),
        icmp(133, 0, [0; 4], &[]),
    );
    if let cloison_testkit::wire::Net::Ipv6(ip) = &mut rs.net {
        ip.hop_limit = 64;
    }
    send_frames(&lab.vm("a1").ns, "eth0", vec![rs.emit()]).expect("RS");

    let metric = |service: &str, outcome: &str| -> u64 {
        let text = lab.agent_metrics("hv1").expect("metrics");
        let key = format!(
            "cloison_gateway_requests_total{{host=\"hv1\",service=\"{service}\",outcome=\"{outcome}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&key)?.parse().ok())
            .unwrap_or(0)
    };
    let mut malformed = 0;
    eventually(|| {
        malformed = metric("dhcpv4", "malformed");
        malformed > 0 && metric("ra", "malformed") == 1
    });
    let limited = lab.drops("hv1").expect("drops")[&DropReason::ServiceRateLimited];
    // The burst (100) and 200 a second: what reached the agent.
    let allowed = 100.0 + 200.0 * secs + 10.0;
    assert!(
        malformed >= 90 && (malformed as f64) <= allowed,
        "{malformed} malformed requests reached the agent in {secs:.1} s"
    );
    // Each frame of the flood is either (the kernel's backlog may drop a
    // few before the port program sees them).
    assert!(
        (19_000..=20_000).contains(&(malformed + limited)),
        "{malformed} to the agent and {limited} limited of 20,000"
    );
    assert_eq!(metric("ra", "malformed"), 1, "the off-link solicitation");
    assert_eq!(metric("dhcpv4", "answered"), 2, "a1's DISCOVER and REQUEST");
}

#[test]
fn privileged_routers_route_between_a_tenants_networks_only() {
    let mut lab = lab();
    lab.add_routers().expect("routers");
    lab.start_agents().expect("agents");
    lab.apply_via_agents()
        .expect("state, routers included, through the API");

    // Tenant a, a-net <-> a-db: on one host (a1 -> ad1) and across hosts
    // (a1 -> ad2, a2 -> ad1), both ways, IPv4 and IPv6, ping, TCP, UDP.
    for (from, to) in [
        ("a1", "10.1.0.11"),
        ("a1", "10.1.0.12"),
        ("a2", "10.1.0.11"),
        ("ad2", "10.0.0.1"),
        ("ad1", "10.0.0.3"),
        ("a1", "fd00:2::11"),
        ("ad2", "fd00:1::2"),
        // The router answers pings of its own addresses.
        ("a1", "10.0.0.254"),
        ("ad2", "10.1.0.1"),
        ("a1", "fd00:1::fe"),
    ] {
        assert!(
            lab.ping(from, to, 2),
            "{from} -> {to}, routed; drops: hv1 {:?}, hv2 {:?}",
            lab.drops("hv1"),
            lab.drops("hv2")
        );
    }
    let marker = b"cloison-routed-tenant-a";
    let caps: Vec<_> = ["bd1", "bd2", "b1", "b2"]
        .iter()
        .map(|v| Capture::start(&lab.vm(v).ns).expect("capture"))
        .collect();
    for (from, to) in [("a1", "ad1"), ("a1", "ad2"), ("ad2", "a1"), ("ad1", "a2")] {
        let got = tcp_echo(&lab, from, to, marker).expect("routed tcp");
        assert_eq!(got, marker, "TCP {from} -> {to}");
        let got = udp_echo(&lab, from, to, marker).expect("routed udp");
        assert_eq!(got, marker, "UDP {from} -> {to}");
    }
    // Tenant b has the same addresses and MACs behind its own router.
    let marker_b = b"cloison-routed-tenant-b";
    let got = tcp_echo(&lab, "b1", "bd2", marker_b).expect("tenant b routed tcp");
    assert_eq!(got, marker_b);
    for cap in caps {
        let frames = cap.finish().expect("capture");
        assert!(
            !frames.iter().any(|f| contains(f, marker)),
            "tenant b saw tenant a's routed traffic"
        );
    }
    // Tenant b's packets to 10.1.0.11 reach bd1, never ad1 (a server
    // there only): nothing answers.
    let addr: IpAddr = "10.1.0.11".parse().unwrap();
    assert!(
        !tcp_ok(&lab, "b1", "ad1", addr, 5002),
        "tenant b reached tenant a's ad1"
    );
    assert!(tcp_ok(&lab, "b1", "bd1", addr, 5002), "b1 -> bd1");

    // A network on no router stays unreachable, counted where it is tried.
    let before = lab.drops("hv1").expect("drops");
    assert!(!lab.ping("a1", "10.2.0.21", 1), "a-iso is on no router");
    assert!(!lab.ping("ai1", "10.0.0.1", 1), "nor routed from");
    let after = lab.drops("hv1").expect("drops");
    let moved = |r: DropReason| after.get(&r).unwrap_or(&0) > before.get(&r).unwrap_or(&0);
    assert!(
        moved(DropReason::NoRoute),
        "no_route counted on hv1: {after:?}"
    );

    // traceroute: the router is the first hop (its time exceeded, from
    // its address in the sender's network), the destination the second.
    assert_eq!(
        traceroute(&lab, "a1", "10.1.0.12").expect("traceroute"),
        ["10.0.0.254", "10.1.0.12"],
        "a1's traceroute to ad2"
    );
    assert!(
        lab.drops("hv1").expect("drops")[&DropReason::TtlExceeded] > 0,
        "ttl_exceeded counted"
    );
}

/// The routers' lab with the outside, before its agents: ad2 (floating IP
/// 198.51.100.20) serves TCP 5001 and answers pings to anyone; nothing else
/// comes in.
fn outside_lab() -> Lab {
    let mut lab = lab();
    lab.add_routers().expect("routers");
    lab.add_outside().expect("the outside");
    lab.snapshot.security_groups.push(
        serde_json::from_value(
            serde_json::json!({"name": "a-public", "tenant": "tenant-a", "rules": [
            {"direction": "ingress", "protocol": "tcp", "ports": "5001"},
            {"direction": "ingress", "protocol": "icmp"},
            {"direction": "egress"}]}),
        )
        .unwrap(),
    );
    lab.set_groups(&[("ad2", "a-public")]);
    lab
}

#[test]
fn privileged_the_outside_through_snat_and_floating_ips() {
    let mut lab = outside_lab();
    lab.start_agents().expect("agents");
    lab.apply_via_agents()
        .expect("state, floating IP included, through the API");
    let out = lab.ns("out");

    // SNAT: a1 and b1 (hv1, the same address in two tenants) hold a
    // connection to the outside at once: both from hv1's external IP, on
    // two ports of SNAT's range; a2 (hv2) from hv2's.
    let server = tcp_server_in(&out, "198.51.100.1", 7000, 3);
    let a = connect_from(&lab, "a1", "198.51.100.1", 7000).expect("a1 out, SNATed");
    let b = connect_from(&lab, "b1", "198.51.100.1", 7000).expect("b1 out, SNATed");
    let c = connect_from(&lab, "ad2", "198.51.100.1", 7000).expect("ad2 out, floating IP");
    assert_eq!(echo(a, b"a1"), b"a1");
    assert_eq!(echo(b, b"b1"), b"b1");
    assert_eq!(echo(c, b"ad2"), b"ad2");
    let peers = server.join().unwrap().expect("server");
    let (from_hv1, fip): (Vec<&std::net::SocketAddr>, Vec<&std::net::SocketAddr>) = peers
        .iter()
        .partition(|p| p.ip().to_string() == "198.51.100.11");
    assert_eq!(
        from_hv1.len(),
        2,
        "a1 and b1 from hv1's external IP: {peers:?}"
    );
    assert_ne!(
        from_hv1[0].port(),
        from_hv1[1].port(),
        "two tenants, two ports"
    );
    for p in &from_hv1 {
        assert!(
            (cloison_abi::SNAT_PORT_MIN..=cloison_abi::SNAT_PORT_MAX).contains(&p.port()),
            "{p}: a port of SNAT's range"
        );
    }
    assert_eq!(
        fip[0].ip().to_string(),
        "198.51.100.20",
        "ad2 leaves from its floating IP"
    );
    let server = tcp_server_in(&out, "198.51.100.1", 7001, 1);
    let s = connect_from(&lab, "a2", "198.51.100.1", 7001).expect("a2 out");
    assert_eq!(echo(s, b"a2"), b"a2");
    assert_eq!(
        server.join().unwrap().expect("server")[0].ip().to_string(),
        "198.51.100.12",
        "a2 from hv2's external IP"
    );
    assert!(
        lab.ping("a1", "198.51.100.1", 2),
        "ping the outside, SNATed"
    );

    // The outside reaches ad2 by its floating IP, where its group allows.
    let ping_fip = ping_in(&out, "198.51.100.20", 2);
    assert!(ping_fip, "the outside pings ad2's floating IP");
    let got =
        tcp_echo_from_ns(&lab, &out, "198.51.100.20", "ad2", 5001).expect("outside -> ad2:5001");
    assert_eq!(got, b"outside");
    assert!(
        tcp_echo_from_ns(&lab, &out, "198.51.100.20", "ad2", 5002).is_err(),
        "ad2's group keeps TCP 5002 closed to the outside"
    );
    let drops = lab.drops("hv2").expect("drops");
    assert!(
        drops
            .get(&DropReason::SgIngressDenied)
            .copied()
            .unwrap_or(0)
            > 0,
        "the refusal counted: {drops:?}"
    );
}

/// A floating IP follows its port to another host: the new host announces
/// it (gratuitous ARP), so the outside's neighbour cache points at it at
/// once, and the outside reaches the VM there, where its group allows; the
/// VM leaves from its floating IP there too.
#[test]
fn privileged_a_floating_ip_follows_its_port_to_another_host() {
    let mut lab = outside_lab();
    lab.start_agents().expect("agents");
    lab.apply_via_agents().expect("apply");
    let out = lab.ns("out");
    assert!(
        ping_in(&out, "198.51.100.20", 2),
        "ad2's floating IP on hv2"
    );
    let ext_mac = |host: &str| {
        let v: serde_json::Value = serde_json::from_str(
            &sh(&["ip", "-n", &lab.ns(host), "-j", "link", "show", "ext0"]).unwrap(),
        )
        .unwrap();
        v[0]["address"].as_str().unwrap().to_string()
    };
    let outside_sees = || {
        let v: serde_json::Value = serde_json::from_str(
            &sh(&["ip", "-n", &out, "-j", "neigh", "show", "198.51.100.20"]).unwrap(),
        )
        .unwrap();
        v[0]["lladdr"].as_str().unwrap_or("").to_string()
    };
    let (hv1_mac, hv2_mac) = (ext_mac("hv1"), ext_mac("hv2"));
    assert_eq!(outside_sees(), hv2_mac, "the outside learnt hv2 by ARP");

    lab.move_vm("ad2", "hv1").expect("move ad2");
    lab.apply_via_agents().expect("ad2's port on hv1");
    // Announced at once: the entry the outside had (fresh, not expired)
    // now names hv1.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while outside_sees() != hv1_mac && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        outside_sees(),
        hv1_mac,
        "the outside's neighbour entry for the floating IP names hv1 (hv2 is {hv2_mac})"
    );
    assert!(ping_in(&out, "198.51.100.20", 2), "the floating IP on hv1");
    let got =
        tcp_echo_from_ns(&lab, &out, "198.51.100.20", "ad2", 5001).expect("outside -> ad2:5001");
    assert_eq!(got, b"outside");
    assert!(
        tcp_echo_from_ns(&lab, &out, "198.51.100.20", "ad2", 5002).is_err(),
        "its group still keeps TCP 5002 closed"
    );
    let server = tcp_server_in(&out, "198.51.100.1", 7002, 1);
    let c = connect_from(&lab, "ad2", "198.51.100.1", 7002).expect("ad2 out from hv1");
    assert_eq!(echo(c, b"ad2"), b"ad2");
    assert_eq!(
        server.join().unwrap().expect("server")[0].ip().to_string(),
        "198.51.100.20",
        "ad2 leaves hv1 from its floating IP"
    );
}

/// ICMP errors from beyond the outside about SNATed flows reach their VM:
/// a TCP stream from a1 to a network behind a link of MTU 1280 completes
/// (the outside's frag needed, sent to hv1's external IP, is translated
/// back, so a1 learns the path MTU; without it the stream stalls), and
/// traceroute through SNAT sees the hops beyond the router.
#[test]
fn privileged_icmp_errors_from_beyond_the_outside_reach_the_vm() {
    let mut lab = lab();
    lab.add_routers().expect("routers");
    lab.add_outside().expect("the outside");
    let far = lab.add_far_network().expect("the far network");
    lab.start_agents().expect("agents");
    lab.apply_via_agents().expect("apply");

    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        cloison_lab::lab::in_netns(&far, move || {
            let l = std::net::TcpListener::bind(("203.0.113.1", 7100))?;
            tx.send(()).ok();
            let (mut s, peer) = l.accept()?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
            let mut got = vec![0u8; 200_000];
            std::io::Read::read_exact(&mut s, &mut got)?;
            std::io::Write::write_all(&mut s, b"ok")?;
            Ok(peer)
        })
    });
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .expect("server listening");
    let mut c = connect_from(&lab, "a1", "203.0.113.1", 7100).expect("a1 to the far network");
    c.set_write_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(&mut c, &vec![0x5a; 200_000]).expect("200 kB out");
    let mut ok = [0u8; 2];
    std::io::Read::read_exact(&mut c, &mut ok)
        .expect("the far end read it all: a1 learnt the path MTU through SNAT");
    assert_eq!(&ok, b"ok");
    let peer = server.join().unwrap().expect("server");
    assert_eq!(peer.ip().to_string(), "198.51.100.11", "SNATed: {peer}");
    let mtu = sh(&["ip", "-n", &lab.vm("a1").ns, "route", "get", "203.0.113.1"]).unwrap();
    assert!(mtu.contains("mtu 1280"), "a1's route cache: {mtu}");

    assert_eq!(
        traceroute(&lab, "a1", "203.0.113.1").expect("traceroute"),
        ["10.0.0.254", "198.51.100.1", "203.0.113.1"],
        "a1's traceroute through SNAT"
    );
}
