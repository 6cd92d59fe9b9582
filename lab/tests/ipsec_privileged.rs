//! Encryption between hosts, in the lab: hv1 and hv2 are ipsec hosts with
//! a real charon each (kernel-libipsec) driven by their agents, certificates
//! from a throwaway CA the test makes; hv3 is a plain host. Needs root.
use std::{net::IpAddr, time::Duration};

use cloison_abi::DropReason;
use cloison_dataplane::UplinkHook;
use cloison_lab::lab::*;

const WAIT: Duration = Duration::from_secs(20);

fn need_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab tests need root: run them through `cargo xtask test` as root"
    );
}

fn eventually(what: &str, lab: &Lab, mut done: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + WAIT;
    while !done() {
        if std::time::Instant::now() > end {
            panic!(
                "{what}: not within {WAIT:?}\nhv1: {}\nhv2: {}\n--- hv1's charon ---\n{}\n--- hv2's charon ---\n{}",
                encryption(lab, "hv1"),
                encryption(lab, "hv2"),
                tail(&lab.charon_log("hv1")),
                tail(&lab.charon_log("hv2"))
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a failing assertion shows: each host's drops and status, and the
/// charons' logs.
fn diag(lab: &Lab) -> String {
    let mut out = String::new();
    for h in ["hv1", "hv2"] {
        out += &format!(
            "\n{h} drops: {:?}\n{h} encryption: {}\n--- {h}'s charon ---\n{}",
            lab.drops(h).unwrap_or_default(),
            encryption(lab, h),
            tail(&lab.charon_log(h))
        );
    }
    out
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The `encryption` part of a host's status.
fn encryption(lab: &Lab, host: &str) -> serde_json::Value {
    let (ok, out, err) = lab
        .cloisonctl(host, &["status", "--json"])
        .expect("cloisonctl");
    assert!(ok, "cloisonctl status: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    v["encryption"].clone()
}

fn peer_up(lab: &Lab, host: &str, peer: &str) -> bool {
    encryption(lab, host)["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["host"] == peer && p["up"] == true)
}

/// Whether a captured frame is VXLAN (UDP to 4789) over IPv4.
fn is_vxlan(f: &[u8]) -> bool {
    f.len() >= 38 && f[12..14] == [8, 0] && f[23] == 17 && f[36..38] == 4789u16.to_be_bytes()
}

/// Whether it is ESP between these two addresses (raw, or in UDP 4500).
fn is_esp_between(f: &[u8], a: [u8; 4], b: [u8; 4]) -> bool {
    if f.len() < 34 || f[12..14] != [8, 0] {
        return false;
    }
    let (src, dst) = (&f[26..30], &f[30..34]);
    let ends = (src == a && dst == b) || (src == b && dst == a);
    let esp = f[23] == 50
        || (f[23] == 17
            && f.len() >= 46
            && f[36..38] == 4500u16.to_be_bytes()
            && f[42..46] != [0; 4]);
    ends && esp
}

#[test]
fn privileged_ipsec_hosts_carry_only_esp_and_refuse_plaintext() {
    need_root();
    let mut lab = Lab::two_hosts(UplinkHook::Tc).expect("lab");
    lab.add_third_host().expect("hv3");
    let evil = lab.add_underlay_intruder().expect("intruder");
    lab.enable_ipsec(&["hv1", "hv2"])
        .expect("charon on hv1 and hv2");
    lab.start_agents().expect("agents");
    lab.apply_via_agents().expect("apply");
    eventually("the SA between hv1 and hv2", &lab, || {
        peer_up(&lab, "hv1", "hv2") && peer_up(&lab, "hv2", "hv1")
    });

    if let Some(secs) = std::env::var("CLOISON_LAB_PAUSE")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("lab {} paused {secs} s", lab.tag);
        std::thread::sleep(Duration::from_secs(secs));
    }
    // Traffic both ways, the underlay captured meanwhile.
    let cap = Capture::start(&lab.ns("ul")).expect("capture the underlay");
    let a1 = IpAddr::from(lab.vm("a1").ip);
    let a2 = IpAddr::from(lab.vm("a2").ip);
    assert!(
        lab.ping("a1", "10.0.0.2", 3),
        "ping a1 -> a2 through ESP{}",
        diag(&lab)
    );
    assert!(
        lab.ping("a2", "10.0.0.1", 3),
        "ping a2 -> a1 through ESP{}",
        diag(&lab)
    );
    let got =
        tcp_echo_to(&lab, "a1", "a2", a2, 7001, b"secret-tcp-payload", WAIT).expect("TCP a1 -> a2");
    assert_eq!(got, b"secret-tcp-payload");
    let got =
        udp_echo_to(&lab, "a2", "a1", a1, 7002, b"secret-udp-payload", WAIT).expect("UDP a2 -> a1");
    assert_eq!(got, b"secret-udp-payload");
    // A bulk stream with the VMs' default offloads (GSO bursts).
    let bulk = vec![b'z'; 256 * 1024];
    let got = tcp_echo_to(&lab, "a2", "a1", a1, 7003, &bulk, WAIT).expect("bulk TCP a2 -> a1");
    assert_eq!(got.len(), bulk.len(), "the whole stream came back");
    let frames = cap.finish().expect("capture");
    let (hv1, hv2) = (underlay_ip(1).octets(), underlay_ip(2).octets());
    let between = |f: &&Vec<u8>| {
        f.len() >= 34 && {
            let (s, d) = (&f[26..30], &f[30..34]);
            (s == hv1 && d == hv2) || (s == hv2 && d == hv1)
        }
    };
    let esp = frames
        .iter()
        .filter(|f| is_esp_between(f, hv1, hv2))
        .count();
    assert!(
        esp > 20,
        "ESP between hv1 and hv2 on the underlay: {esp} frames"
    );
    for f in frames.iter().filter(between) {
        assert!(!is_vxlan(f), "VXLAN in clear between two ipsec hosts");
        for secret in [&b"secret-tcp"[..], b"secret-udp", b"zzzzzzzzzzzzzzzz"] {
            assert!(
                !contains(f, secret),
                "a tenant payload in clear on the underlay"
            );
        }
    }

    // hv3 (plain) talks with nobody encrypted: not with a1 or a2's hosts.
    assert!(
        !lab.ping("a4", "10.0.0.1", 2),
        "a plain host reached an ipsec host's VM"
    );
    assert!(
        !lab.ping("a2", "10.0.0.4", 2),
        "an ipsec host's VM reached a plain host"
    );
    let mismatch = |h: &str| {
        lab.drops(h)
            .expect("drops")
            .get(&DropReason::EncryptionMismatch)
            .copied()
            .unwrap_or(0)
    };
    assert!(mismatch("hv3") > 0, "hv3 counts what it refused to send");
    assert!(mismatch("hv2") > 0, "hv2 counts what it refused to send");

    // A forged VXLAN frame in clear with hv2's address: well formed, to a
    // port of a network hv2 has, from a MAC that lives there.
    let forged = VxlanFrame {
        outer_dst_mac: lab.uplink_mac("hv1").expect("mac"),
        outer_src: underlay_ip(2),
        outer_dst: underlay_ip(1),
        flags: 0x08,
        vni: 1001,
        inner_src_mac: lab.vm("a2").mac.0,
        inner_dst_mac: lab.vm("a1").mac.0,
        inner_src: lab.vm("a2").ip,
        inner_dst: lab.vm("a1").ip,
        marker: b"forged-in-clear".to_vec(),
    };
    let plaintext = || {
        lab.drops("hv1")
            .expect("drops")
            .get(&DropReason::VxlanPlaintext)
            .copied()
            .unwrap_or(0)
    };
    let before = plaintext();
    let cap = Capture::start(&lab.vm("a1").ns).expect("capture a1");
    send_frames(&evil, "eth0", vec![forged.build(); 3]).expect("send");
    eventually("3 forged frames counted", &lab, || {
        plaintext() - before >= 3
    });
    std::thread::sleep(Duration::from_millis(200));
    let seen = cap.finish().expect("capture");
    assert!(
        !seen.iter().any(|f| contains(f, b"forged-in-clear")),
        "a forged frame in clear reached a1"
    );
    assert_eq!(plaintext() - before, 3);

    // The status says it all per peer.
    let e = encryption(&lab, "hv1");
    assert_eq!(e["mode"], "ipsec");
    assert_eq!(e["ike"], "connected");
    let peers = e["peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 1, "hv2 only (hv3 is not an ipsec host): {e}");
    assert_eq!(peers[0]["host"], "hv2");
    assert_eq!(peers[0]["ike"], "ESTABLISHED");
    assert_eq!(peers[0]["child"], "INSTALLED");
    let e3 = encryption(&lab, "hv3");
    assert_eq!(e3["mode"], "none");
    let m = lab.agent_metrics("hv1").expect("metrics");
    assert!(
        m.contains("cloison_ipsec_peer_up{host=\"hv1\",peer=\"hv2\"} 1"),
        "{m}"
    );
    let (ok, out, _) = lab.cloisonctl("hv1", &["status"]).expect("cloisonctl");
    assert!(
        ok && out.contains("peer hv2 (192.0.2.2)  up  IKE ESTABLISHED  ESP INSTALLED"),
        "{out}"
    );
}

#[test]
fn privileged_ipsec_rekey_during_a_stream_and_a_ping_loses_nothing() {
    need_root();
    let mut lab = Lab::two_hosts(UplinkHook::Tc).expect("lab");
    lab.enable_ipsec(&["hv1", "hv2"])
        .expect("charon on hv1 and hv2");
    lab.start_agents().expect("agents");
    lab.apply_via_agents().expect("apply");
    eventually("the SA between hv1 and hv2", &lab, || {
        peer_up(&lab, "hv1", "hv2") && peer_up(&lab, "hv2", "hv1")
    });
    let a1 = IpAddr::from(lab.vm("a1").ip);
    assert!(lab.ping("a2", "10.0.0.1", 1), "a2 -> a1{}", diag(&lab));

    // A ping every 20 ms and a TCP stream, while the ESP SA is rekeyed
    // three times, from either side.
    let ping = ping_in_background(&lab, "a2", &a1.to_string(), 150, "0.02");
    let stream = TcpStreamProbe::start(&lab, "a2", "a1", 7010).expect("stream");
    assert!(
        stream.progress(Duration::from_millis(300)) > 0,
        "the stream runs"
    );
    let rekeys_before = encryption(&lab, "hv1")["peers"][0]["rekeys"]
        .as_u64()
        .unwrap_or(0);
    let mut during = Vec::new();
    for host in ["hv1", "hv2", "hv1"] {
        lab.swanctl(host, &["--rekey", "--child", "vxlan"])
            .expect("rekey");
        during.push(stream.progress(Duration::from_millis(500)));
    }
    let (sent, received) = ping_result(ping);
    assert_eq!(
        (sent, received),
        (150, 150),
        "pings lost across three rekeys"
    );
    assert!(
        during.iter().all(|b| *b > 0),
        "the stream moved during each rekey: {during:?} bytes"
    );
    drop(stream);
    eventually("the rekeys in the status", &lab, || {
        encryption(&lab, "hv1")["peers"][0]["rekeys"]
            .as_u64()
            .unwrap_or(0)
            >= rekeys_before + 3
    });
    assert!(peer_up(&lab, "hv1", "hv2"));
}
