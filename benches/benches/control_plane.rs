//! Control-plane cost of `Dataplane::apply`: a host with 20 local ports in
//! 20 networks of 500 ports each (10,000 ports, most behind 99 other
//! hosts), applied from nothing, and one port more on top of it. Prints the
//! map entries written per second. Needs root.
use std::time::{Duration, Instant};

use cloison_benches::has_root;
use cloison_dataplane::{snapshot::MacAddr, Dataplane, Host, Network, Port, Snapshot, UplinkHook};
use cloison_testkit::testbed::Testbed;
use criterion::{criterion_group, criterion_main, Criterion};

const NETWORKS: u32 = 20;
const PORTS_PER_NETWORK: u32 = 500;
const HOSTS: u32 = 100;

fn fleet() -> Snapshot {
    let hosts = (1..=HOSTS)
        .map(|h| Host {
            external_ip: None,
            encryption: Default::default(),
            name: format!("hv{h}"),
            underlay_ip: std::net::Ipv4Addr::new(192, 0, 2 + (h / 250) as u8, (h % 250) as u8 + 1),
        })
        .collect();
    let networks = (0..NETWORKS)
        .map(|n| Network {
            name: format!("net{n}"),
            tenant: format!("t{n}"),
            vni: 1000 + n,
            subnets: vec!["10.0.0.0/16".parse().expect("subnet")],
            mtu: 1450,
            gateway_ips: vec![],
            dhcp: true,
            dns_servers: vec![],
            host_routes: vec![],
        })
        .collect();
    let mut ports = Vec::new();
    for n in 0..NETWORKS {
        for i in 0..PORTS_PER_NETWORK {
            // Port 0 of each network is on this host (hv1), the rest spread.
            let host = if i == 0 { 1 } else { 2 + i % (HOSTS - 1) };
            ports.push(Port {
                name: format!("p{n}-{i}"),
                network: format!("net{n}"),
                host: format!("hv{host}"),
                interface: if i == 0 {
                    format!("pn{n}")
                } else {
                    format!("t{n}-{i}")
                },
                mac: MacAddr([2, 0, (n >> 8) as u8, n as u8, (i >> 8) as u8, i as u8]),
                ips: vec![std::net::IpAddr::from([
                    10,
                    0,
                    (i / 250) as u8,
                    (i % 250) as u8 + 1,
                ])],
                security_groups: vec![],
                allowed_address_pairs: vec![],
                port_security: false,
                hostname: None,
                instance_id: None,
            });
        }
    }
    Snapshot {
        floating_ips: vec![],
        hosts,
        networks,
        security_groups: vec![],
        ports,
        routers: vec![],
    }
}

/// The validator on the whole of that state (what every write and, in
/// fleet mode, every agent's every new state costs).
fn validator(c: &mut Criterion) {
    let full = fleet();
    c.bench_function("validate_10k_ports", |b| {
        b.iter_batched(
            || full.clone(),
            |s| cloison_dataplane::validate::validate(s).expect("valid"),
            criterion::BatchSize::LargeInput,
        )
    });
}

fn control_plane(c: &mut Criterion) {
    if !has_root("control_plane") {
        return;
    }
    let full = fleet();
    let empty = Snapshot {
        hosts: full.hosts.clone(),
        ..Snapshot::default()
    };
    // Validated once, outside what is measured.
    let (vfull, vempty) = (
        full.validated().expect("valid"),
        empty.validated().expect("valid"),
    );
    let tag = format!("clcp{:x}", std::process::id() & 0xffff);
    let bed = Testbed::new(&tag, &full, "hv1").expect("test bed (needs root)");
    let mut dp: Dataplane = bed.enter().expect("open");
    let uplink = cloison_testkit::testbed::UPLINK;
    let mut g = c.benchmark_group("control_plane");
    g.sample_size(10);
    let mut rate = Vec::new();
    g.bench_function("apply_10k_ports_from_empty", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                dp.apply(&vempty, "hv1", uplink, UplinkHook::Xdp)
                    .expect("empty");
                let t = Instant::now();
                let r = dp
                    .apply(&vfull, "hv1", uplink, UplinkHook::Xdp)
                    .expect("full");
                let took = t.elapsed();
                rate.push(r.map_updates as f64 / took.as_secs_f64());
                total += took;
            }
            total
        })
    });
    if let Some(r) = rate.last() {
        println!("control_plane: {r:.0} map entries per second from empty (20 port attachments included)");
    }
    dp.apply(&vfull, "hv1", uplink, UplinkHook::Xdp)
        .expect("full");
    let mut more = full.clone();
    let mut extra = more.ports[1].clone();
    extra.name = "extra".into();
    extra.interface = "extra".into();
    extra.mac = MacAddr([2, 0xee, 0, 0, 0, 1]);
    extra.ips = vec!["10.0.250.1".parse().expect("address")];
    more.ports.push(extra);
    let vmore = more.validated().expect("valid");
    g.bench_function("apply_one_more_port_of_10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                dp.apply(&vmore, "hv1", uplink, UplinkHook::Xdp)
                    .expect("one more");
                total += t.elapsed();
                dp.apply(&vfull, "hv1", uplink, UplinkHook::Xdp)
                    .expect("back");
            }
            total
        })
    });
    // Every remote port moves (new MAC and address): no attachment, only
    // map entries rewritten and deleted, in batches.
    let mut moved = full.clone();
    for p in moved.ports.iter_mut().filter(|p| p.host != "hv1") {
        p.mac.0[1] = 0x77;
        if let Some(std::net::IpAddr::V4(a)) = p.ips.first().copied() {
            let o = a.octets();
            p.ips = vec![std::net::IpAddr::from([10, 0, o[2] + 100, o[3]])];
        }
    }
    let vmoved = moved.validated().expect("valid");
    dp.apply(&vfull, "hv1", uplink, UplinkHook::Xdp)
        .expect("full");
    let mut entries = Vec::new();
    let mut flip = false;
    g.bench_function("move_all_remote_ports", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                flip = !flip;
                let t = Instant::now();
                let r = dp
                    .apply(
                        if flip { &vmoved } else { &vfull },
                        "hv1",
                        uplink,
                        UplinkHook::Xdp,
                    )
                    .expect("move");
                let took = t.elapsed();
                entries.push(r.map_updates as f64 / took.as_secs_f64());
                total += took;
            }
            total
        })
    });
    if let Some(r) = entries.last() {
        println!("control_plane: {r:.0} map entries changed per second (batched writes and deletes, diff included)");
    }
    g.finish();
    drop(dp);
    drop(bed);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    targets = validator, control_plane
}
criterion_main!(benches);
