//! The agent's CPU per gateway-service answer, without the kernel: a
//! DISCOVER to its OFFER, a REQUEST to its ACK, a router solicitation to
//! its advertisement (the lease or advertisement made from the port and
//! network each time, as the agent does). The end-to-end rates through the
//! kernel and the tap are `cargo xtask bench --gateway`.
use cloison_control::gateway::{dhcp, ra};
use cloison_dataplane::{MacAddr, Network, Port};
use cloison_testkit::wire::build::{icmp, udp, v4, v6};
use criterion::{criterion_group, criterion_main, Criterion};

const VM: [u8; 6] = [2, 0, 0, 0, 0, 5];
const TAP: [u8; 6] = [0x0e, 0xc1, 0, 0, 0, 9];

fn network() -> Network {
    serde_json::from_value(serde_json::json!({
        "name": "n", "tenant": "t", "vni": 1001, "subnets": ["10.0.0.0/24", "fd00:1::/64"],
        "gateway_ips": ["10.0.0.1", "fd00:1::1"], "dns_servers": ["10.0.0.53", "fd00:1::53"],
        "host_routes": [{"destination": "192.168.0.0/16", "nexthop": "10.0.0.254"}]
    }))
    .unwrap()
}

fn port() -> Port {
    serde_json::from_value(serde_json::json!({
        "name": "vm1", "network": "n", "host": "hv1", "interface": "tap1",
        "mac": "02:00:00:00:00:05", "ips": ["10.0.0.5"], "hostname": "vm1.example"
    }))
    .unwrap()
}

/// A DHCP message of `kind` (1 DISCOVER, 3 REQUEST) from the VM.
fn dhcp_frame(kind: u8) -> Vec<u8> {
    let mut m = vec![0u8; 240];
    m[..3].copy_from_slice(&[1, 1, 6]);
    m[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    m[28..34].copy_from_slice(&VM);
    m[236..240].copy_from_slice(&[99, 130, 83, 99]);
    m.extend([53, 1, kind]);
    if kind == 3 {
        m.extend([50, 4, 10, 0, 0, 5, 54, 4, 10, 0, 0, 1]);
    }
    m.extend([55, 4, 1, 3, 6, 121, 255]);
    v4(VM, [0xff; 6], [0; 4], [255; 4], udp(68, 67, &m)).emit()
}

fn gateway(c: &mut Criterion) {
    let (port, net) = (port(), network());
    let mut g = c.benchmark_group("gateway");
    for (name, kind) in [("dhcp_discover_to_offer", 1), ("dhcp_request_to_ack", 3)] {
        let frame = dhcp_frame(kind);
        g.bench_function(name, |b| {
            b.iter(|| {
                let lease = dhcp::lease_for(&port, &net, TAP).expect("a lease");
                dhcp::answer(&lease, &frame).expect("an answer")
            })
        });
    }
    let mut rs = v6(
        VM,
        [0x33, 0x33, 0, 0, 0, 2],
        MacAddr(VM).link_local(),
        "ff02::2".parse().unwrap(),
        icmp(133, 0, [0; 4], &[]),
    );
    if let cloison_testkit::wire::Net::Ipv6(ip) = &mut rs.net {
        ip.hop_limit = 255;
    }
    let rs = rs.emit();
    g.bench_function("router_solicitation_to_advert", |b| {
        b.iter(|| {
            let adv = ra::advert_for(&net, cloison_abi::gateway_mac(1001)).expect("IPv6");
            ra::answer(&adv, VM, TAP, &rs).expect("an answer")
        })
    });
    g.finish();
}

criterion_group!(benches, gateway);
criterion_main!(benches);
