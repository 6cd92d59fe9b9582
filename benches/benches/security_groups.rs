//! Per-packet cost of the security-group path in BPF_PROG_TEST_RUN (the
//! kernel's own timing of the program, not the syscall around it), port a1
//! to port a3 on one host, both with port security, with 1 to 10,000 rules
//! in each port's group:
//!
//! - established: one conntrack lookup (the same ACK, repeated in the kernel);
//! - new flow: a SYN with a source port never seen, so each run misses
//!   conntrack, checks a1's egress and a3's ingress rules (two lookups each)
//!   and creates an entry; conntrack is flushed between batches, untimed.
//!
//! Needs root: `sudo cargo bench -p cloison-benches` (or `cargo xtask bench`).
use std::time::Duration;

use cloison_benches::{kernel_time::*, *};
use cloison_dataplane::{loader::verdict::*, netdev, Dataplane, UplinkHook};
use cloison_testkit::testbed::Testbed;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn host(rules: usize, port_security: bool) -> (Testbed, Dataplane, u32) {
    let mut snap = sg_snapshot(rules);
    for p in &mut snap.ports {
        p.port_security = port_security;
        if !port_security {
            p.security_groups.clear();
        }
    }
    applied_bed(&format!("clbn{:x}", std::process::id() & 0xffff), &snap)
}

fn security_groups(c: &mut Criterion) {
    if !has_root("security_groups") {
        return;
    }
    let mut g = c.benchmark_group("sg");
    {
        // The same forwarding without port security: no anti-spoofing, no
        // security groups, no conntrack. What the rest costs is the difference.
        let (_bed, dp, pa1) = host(1, false);
        let ack = tcp(40000, TCP_ACK);
        g.bench_function("no_port_security", |b| {
            repeated(
                b,
                |n| dp.test_run_port_repeat(pa1, &ack, n),
                TC_ACT_REDIRECT,
            )
        });
        // The floor of a TC test run here: the uplink program handing a
        // frame that is not VXLAN (ARP) to the host after two checks.
        let up0 = netdev::ifindex(cloison_testkit::testbed::UPLINK).expect("uplink");
        let arp = {
            let mut f = vec![0xff; 6];
            f.extend(A1);
            f.extend([0x08, 0x06]);
            f.extend([0u8; 28]);
            f
        };
        g.bench_function("tc_floor_uplink_pass", |b| {
            repeated(
                b,
                |n| dp.test_run_uplink_repeat(UplinkHook::Tc, up0, &arp, n),
                0,
            )
        });
    }
    for rules in [1usize, 100, 1_000, 10_000] {
        let (bed, mut dp, pa1) = host(rules, true);
        let syn = tcp(40000, TCP_SYN);
        assert_eq!(
            dp.test_run_port(pa1, &syn, 0).unwrap().verdict,
            TC_ACT_REDIRECT
        );
        let ack = tcp(40000, TCP_ACK);
        g.bench_function(BenchmarkId::new("established", rules), |b| {
            repeated(
                b,
                |n| dp.test_run_port_repeat(pa1, &ack, n),
                TC_ACT_REDIRECT,
            )
        });
        let mut sport = 0u16;
        g.bench_function(BenchmarkId::new("new_flow", rules), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += new_flow(&mut dp, pa1, &mut sport);
                }
                total
            })
        });
        drop(dp);
        drop(bed);
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = security_groups
}
criterion_main!(benches);
