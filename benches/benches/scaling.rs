//! How per-packet cost grows with the state: the established local path
//! (a1 → a3, port security, a group) with 1 to 10,000 ports in the maps, and
//! with 1 to 1,000,000 other flows tracked (a conntrack table of 1,600,000
//! entries: a1's share of it, 3/4 of its tenant's 7/8, is 1,050,000). Needs root.
use std::time::Duration;

use cloison_benches::{kernel_time::*, *};
use cloison_dataplane::{loader::verdict::*, netdev, snapshot::MacAddr, UplinkHook};
use cloison_testkit::testbed::Testbed;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const CT_ENTRIES: u32 = 1_600_000;

fn scaling(c: &mut Criterion) {
    if !has_root("scaling") {
        return;
    }
    // No router: a network of 10.0.0.0/8 below would overlap its other one.
    let mut base = paths_snapshot();
    base.routers.clear();
    let tag = format!("clsc{:x}", std::process::id() & 0xffff);
    let bed = Testbed::new(&tag, &base, "hv1").expect("test bed (needs root)");
    let mut dp = bed.enter_with_conntrack(CT_ENTRIES).expect("open");
    let uplink = cloison_testkit::testbed::UPLINK;
    let pa1 = netdev::ifindex("pa1").expect("pa1");
    let flow = udp((A1, [10, 0, 0, 1]), (A3, [10, 0, 0, 3]), 40000, 64);
    let mut g = c.benchmark_group("scale");
    for ports in [1u32, 100, 1_000, 10_000] {
        let mut s = base.clone();
        for i in 0..ports {
            let mut p = s.ports[2].clone(); // a2, on hv2
            p.name = format!("r{i}");
            p.interface = format!("r{i}");
            p.mac = MacAddr([2, 1, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            p.ips = vec![std::net::IpAddr::from([
                10,
                0,
                100 + (i >> 8) as u8,
                i as u8,
            ])];
            s.ports.push(p);
        }
        s.networks[0].subnets = vec!["10.0.0.0/8".parse().expect("subnet")];
        dp.apply(
            &s.validated().expect("valid"),
            "hv1",
            uplink,
            UplinkHook::Xdp,
        )
        .expect("apply");
        dp.test_run_port(pa1, &flow, 0).expect("establish");
        g.bench_with_input(BenchmarkId::new("ports", ports), &ports, |b, _| {
            repeated(
                b,
                |n| dp.test_run_port_repeat(pa1, &flow, n),
                TC_ACT_REDIRECT,
            )
        });
    }
    let mut s = base.clone();
    s.networks[0].subnets = vec!["10.0.0.0/8".parse().expect("subnet")];
    dp.apply(
        &s.validated().expect("valid"),
        "hv1",
        uplink,
        UplinkHook::Xdp,
    )
    .expect("apply");
    let mut tracked = 0u32;
    for flows in [1u32, 1_000, 10_000, 100_000, 1_000_000] {
        // Other flows of a1, each a distinct source port and address of a3's.
        while tracked + 1 < flows {
            let i = tracked;
            let f = udp(
                (A1, [10, 0, 0, 1]),
                (A3, [10, 0, 0, 3]),
                (i % 60000) as u16 + 1,
                64 + (i / 60000) as usize,
            );
            let mut f = f;
            f[30..34].copy_from_slice(&[10, 0, 0, 3]);
            // Vary the destination port too, for more than 60,000 flows.
            let dport = 1 + (i / 60000) as u16;
            f[36..38].copy_from_slice(&dport.to_be_bytes());
            dp.test_run_port(pa1, &f, 0).expect("track");
            tracked += 1;
        }
        dp.test_run_port(pa1, &flow, 0).expect("establish");
        let entries = dp.conntrack().expect("conntrack").len();
        g.bench_with_input(BenchmarkId::new("flows", flows), &flows, |b, _| {
            repeated(
                b,
                |n| dp.test_run_port_repeat(pa1, &flow, n),
                TC_ACT_REDIRECT,
            )
        });
        eprintln!("scale/flows/{flows}: {entries} conntrack entries");
    }
    g.finish();
    drop(dp);
    drop(bed);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = scaling
}
criterion_main!(benches);
