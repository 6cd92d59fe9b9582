//! Per-packet cost of every path of the programs, in BPF_PROG_TEST_RUN
//! (the kernel's timing of the program alone), all ports with port security
//! and a security group, flows established. Paths that rewrite the packet
//! (encapsulation, decapsulation, ARP answers) run once per call on fresh
//! input, since test-run does not reset a packet between repeats; the
//! others repeat in the kernel. Needs root.
use std::time::Duration;

use cloison_benches::{kernel_time::*, *};
use cloison_dataplane::{loader::verdict::*, netdev, UplinkHook};
use criterion::{criterion_group, criterion_main, Criterion};

const IP_A1: [u8; 4] = [10, 0, 0, 1];
const IP_A2: [u8; 4] = [10, 0, 0, 2];
const IP_A3: [u8; 4] = [10, 0, 0, 3];

fn paths(c: &mut Criterion) {
    if !has_root("paths") {
        return;
    }
    let snap = paths_snapshot();
    let (_bed, mut dp, pa1) = applied_bed(&format!("clpb{:x}", std::process::id() & 0xffff), &snap);
    dp.attach_external(cloison_testkit::testbed::UPLINK)
        .expect("the uplink as the external interface");
    let dp = dp;
    let up0 = netdev::ifindex("up0").expect("up0");

    let local = udp((A1, IP_A1), (A3, IP_A3), 40000, 64);
    let remote = udp((A1, IP_A1), (A2, IP_A2), 40000, 64);
    let decap = vxlan(&udp((A2, IP_A2), (A1, IP_A1), 40001, 64));
    // Routed: a1 to the gateway MAC, for d1 (here) and d2 (on hv2).
    let gw = cloison_abi::gateway_mac(1001);
    let routed_local = udp((A1, IP_A1), (gw, [10, 1, 0, 5]), 40002, 64);
    let routed_remote = udp((A1, IP_A1), (gw, [10, 1, 0, 6]), 40002, 64);
    // To the outside (192.0.2.2, the test bed's next hop): SNATed.
    let snat = udp((A1, IP_A1), (gw, [192, 0, 2, 2]), 40003, 64);
    // Establish the flows first: the benches measure the established path.
    for (f, up) in [
        (&local, false),
        (&remote, false),
        (&decap, true),
        (&routed_local, false),
        (&routed_remote, false),
        (&snat, false),
    ] {
        let r = if up {
            dp.test_run_uplink(UplinkHook::Xdp, up0, f)
        } else {
            dp.test_run_port(pa1, f, 0)
        };
        r.expect("warm-up");
    }
    let mut g = c.benchmark_group("path");
    g.bench_function("port_to_local_port", |b| {
        repeated(
            b,
            |n| dp.test_run_port_repeat(pa1, &local, n),
            TC_ACT_REDIRECT,
        )
    });
    // Switched beside routed, both on fresh input each run (a routed frame
    // is rewritten: test-run would route the rewritten one again).
    g.bench_function("port_to_local_port_fresh", |b| {
        single(b, || dp.test_run_port(pa1, &local, 0), TC_ACT_REDIRECT)
    });
    g.bench_function("port_routed_to_local_port", |b| {
        single(
            b,
            || dp.test_run_port(pa1, &routed_local, 0),
            TC_ACT_REDIRECT,
        )
    });
    g.bench_function("port_routed_to_remote_encap", |b| {
        single(
            b,
            || dp.test_run_port(pa1, &routed_remote, 0),
            TC_ACT_REDIRECT,
        )
    });
    g.bench_function("port_snat_to_external", |b| {
        single(b, || dp.test_run_port(pa1, &snat, 0), TC_ACT_REDIRECT)
    });
    // The reply to the mapping the kernel made for it.
    let out = dp.test_run_port(pa1, &snat, 0).expect("SNAT");
    let port = u16::from_be_bytes([out.frame[34], out.frame[35]]);
    let reply = udp(
        ([2, 0xaa, 0, 0, 0, 2], [192, 0, 2, 2]),
        ([2, 0xbb, 0, 0, 0, 1], EXTERNAL_IP),
        9,
        64,
    );
    let mut reply = reply;
    reply[36..38].copy_from_slice(&port.to_be_bytes());
    // (The UDP checksum is 0: no checksum to fix for the new port.)
    reply[40..42].copy_from_slice(&[0, 0]);
    g.bench_function("external_snat_reply_to_port", |b| {
        single(b, || dp.test_run_external(up0, &reply), TC_ACT_REDIRECT)
    });
    g.bench_function("port_to_remote_encap", |b| {
        single(b, || dp.test_run_port(pa1, &remote, 0), TC_ACT_REDIRECT)
    });
    g.bench_function("uplink_xdp_decap_to_port", |b| {
        single(
            b,
            || dp.test_run_uplink(UplinkHook::Xdp, up0, &decap),
            XDP_REDIRECT,
        )
    });
    g.bench_function("uplink_tc_decap_to_port", |b| {
        single(
            b,
            || dp.test_run_uplink(UplinkHook::Tc, up0, &decap),
            TC_ACT_REDIRECT,
        )
    });
    let arp = arp_request(IP_A3);
    g.bench_function("arp_proxy_answer", |b| {
        single(b, || dp.test_run_port(pa1, &arp, 0), TC_ACT_REDIRECT)
    });
    let host_traffic = udp(
        ([2, 0xaa, 0, 0, 0, 2], [192, 0, 2, 2]),
        ([2, 0xbb, 0, 0, 0, 1], [192, 0, 2, 1]),
        5,
        64,
    );
    g.bench_function("uplink_xdp_host_traffic_pass", |b| {
        repeated(
            b,
            |n| dp.test_run_uplink_repeat(UplinkHook::Xdp, up0, &host_traffic, n),
            2,
        )
    });
    // Drop paths (counted, nothing rewritten).
    let spoofed = udp((A1, [10, 0, 0, 66]), (A3, IP_A3), 40000, 64);
    g.bench_function("drop_spoofed_ip", |b| {
        repeated(
            b,
            |n| dp.test_run_port_repeat(pa1, &spoofed, n),
            TC_ACT_SHOT,
        )
    });
    let unknown = udp((A1, IP_A1), ([2, 0, 0, 0, 0, 0x77], IP_A3), 40000, 64);
    g.bench_function("drop_unknown_unicast", |b| {
        repeated(
            b,
            |n| dp.test_run_port_repeat(pa1, &unknown, n),
            TC_ACT_SHOT,
        )
    });
    let mut intruder = decap.clone();
    intruder[26..30].copy_from_slice(&[192, 0, 2, 66]); // outer source: no such VTEP
    g.bench_function("drop_vxlan_unknown_vtep", |b| {
        repeated(
            b,
            |n| dp.test_run_uplink_repeat(UplinkHook::Xdp, up0, &intruder, n),
            XDP_DROP,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = paths
}
criterion_main!(benches);
