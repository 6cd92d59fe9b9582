//! What the benches share: the hosts, rule sets and frames they measure.
use cloison_dataplane::{snapshot::MacAddr, Host, Network, Port, Rule, SecurityGroup, Snapshot};
use etherparse::PacketBuilder;

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
    let mut client = filler("egress", rules.saturating_sub(1));
    client.push(
        serde_json::from_str(r#"{"direction": "egress", "protocol": "tcp", "ports": "80"}"#)
            .expect("rule"),
    );
    let mut web = filler("ingress", rules.saturating_sub(1));
    web.push(
        serde_json::from_str(
            r#"{"direction": "ingress", "protocol": "tcp", "ports": "80", "remote": {"group": "client"}}"#,
        )
        .expect("rule"),
    );
    let port = |name: &str, iface: &str, mac: [u8; 6], ip: &str, group: &str| Port {
        name: name.into(),
        network: "net".into(),
        host: "hv1".into(),
        interface: iface.into(),
        mac: MacAddr(mac),
        ips: vec![ip.parse().expect("address")],
        security_groups: vec![group.into()],
        allowed_address_pairs: vec![],
        port_security: true,
    };
    Snapshot {
        hosts: vec![Host {
            name: "hv1".into(),
            underlay_ip: "192.0.2.1".parse().expect("address"),
        }],
        networks: vec![Network {
            name: "net".into(),
            tenant: "t".into(),
            vni: 1001,
            subnets: vec!["10.0.0.0/24".parse().expect("subnet")],
            mtu: 1450,
        }],
        security_groups: vec![
            SecurityGroup {
                name: "client".into(),
                tenant: "t".into(),
                rules: client,
            },
            SecurityGroup {
                name: "web".into(),
                tenant: "t".into(),
                rules: web,
            },
        ],
        ports: vec![
            port("a1", "pa1", A1, "10.0.0.1", "client"),
            port("a3", "pa3", A3, "10.0.0.3", "web"),
        ],
    }
}

/// A TCP segment a1 → a3:80 from `sport` with `flags`.
pub fn tcp(sport: u16, flags: u8) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(A1, A3)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 3], 64)
        .tcp(sport, 80, 1, 1000);
    if flags & TCP_SYN != 0 {
        b = b.syn();
    }
    if flags & TCP_ACK != 0 {
        b = b.ack(1);
    }
    let mut v = Vec::new();
    b.write(&mut v, &[0u8; 64]).expect("frame");
    v
}
