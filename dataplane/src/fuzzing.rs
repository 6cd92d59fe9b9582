//! Harnesses shared by the cargo-fuzz targets (`fuzz/`, `cargo xtask fuzz
//! SECS`) and their smoke runs in the tests: each takes arbitrary bytes and
//! panics when a property does not hold.
//!
//! - [`security_groups`]: bytes decoded into groups, rules, ports and probe
//!   packets. A state the validator accepts compiles on every host into no
//!   more than it counted, and the compiled tables, looked up as the BPF
//!   stage looks them up, answer every probe as the rules read (docs/api.md)
//!   one by one.
//! - [`frames`]: bytes as a frame from a VM and from the underlay, through
//!   the reference model: it never panics and always gives a verdict.
//!   (The kernel beside it: the testkit's differential harness.)
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use cloison_abi::*;
use ipnet::IpNet;

use crate::{
    model::Model,
    policy::{self, PolicySet, SgTables},
    snapshot::*,
    tables::{self, ConntrackLimits, Iface},
    validate::{self, host_loads, Valid},
};

/// Reads fuzz input a byte at a time; zeros once it runs out.
pub struct Bytes<'a>(pub &'a [u8]);

impl Bytes<'_> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the BPF policy stage does with the tables: the class of the
/// longest matching address prefix, then the class's port set for the
/// protocol, and any rules-trie entry matching (class, protocol, port) when
/// there is no set or the set says the trie may hold more.
pub fn tables_allow(
    t: &SgTables,
    policy: u32,
    dir: u8,
    remote: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    let (family, addr, bits) = match remote {
        IpAddr::V4(a) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&a.octets());
            (SG_FAMILY_V4, b, 32)
        }
        IpAddr::V6(a) => (SG_FAMILY_V6, a.octets(), 128),
    };
    let lookup = u128::from_be_bytes(addr);
    let class = t
        .addrs
        .iter()
        .filter(|((len, k), _)| {
            let plen = len - SG_ADDR_FIXED_BITS;
            let mask = u128::MAX.checked_shl(128 - plen).unwrap_or(0);
            k.policy == policy.to_be_bytes()
                && k.direction == dir
                && k.family == family
                && plen <= bits
                && (u128::from_be_bytes(k.addr) ^ lookup) & mask == 0
        })
        .max_by_key(|((len, _), _)| *len)
        .map(|(_, c)| *c);
    let Some(class) = class else {
        return false;
    };
    let set = t.port_sets.get(&SgPortSetKey {
        policy: policy.to_be_bytes(),
        class: class.to_be_bytes(),
        direction: dir,
        proto,
        _pad: [0; 2],
    });
    if let Some(set) = set {
        if set.allows(port) {
            return true;
        }
        if set.trie == 0 {
            return false;
        }
    }
    t.rules.keys().any(|(len, k)| {
        let rest = len - SG_RULE_FIXED_BITS;
        k.policy == policy.to_be_bytes()
            && k.class == class.to_be_bytes()
            && k.direction == dir
            && (rest == 0
                || (k.proto == proto && {
                    let pbits = rest - 8;
                    let mask = u16::MAX.checked_shl(16 - pbits).unwrap_or(0);
                    (u16::from_be_bytes(k.port) ^ port) & mask == 0
                }))
    })
}

/// docs/api.md's semantics, rule by rule: whether any rule of `groups`
/// admits a packet of `proto` to or from `remote` on `port`. A remote
/// group stands for its members' IPs and allowed pairs.
pub fn rules_allow(
    snap: &Snapshot,
    groups: &[String],
    dir: Direction,
    remote: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    let member = |g: &str| {
        snap.ports
            .iter()
            .filter(|p| p.security_groups.iter().any(|s| s == g))
            .any(|p| {
                p.ips.contains(&remote)
                    || p.allowed_address_pairs
                        .iter()
                        .any(|a| a.ip.contains(&remote))
            })
    };
    snap.security_groups
        .iter()
        .filter(|g| groups.contains(&g.name))
        .flat_map(|g| &g.rules)
        .any(|r| {
            r.direction == dir
                && (r.ethertype == Ethertype::IPv4) == remote.is_ipv4()
                && r.protocol.number(r.ethertype).is_none_or(|n| n == proto)
                && r.ports.is_none_or(|p| (p.first..=p.last).contains(&port))
                && match &r.remote {
                    None => true,
                    Some(Remote::Cidr(c)) => c.contains(&remote),
                    Some(Remote::Group(g)) => member(g),
                }
        })
}

/// A state the validator accepts compiles on every host (every interface
/// present) into no more entries than it counted for that host.
pub fn fits(valid: &Valid) -> Result<(), String> {
    let loads = host_loads(valid);
    for h in &valid.hosts {
        let c = tables::compile(
            valid,
            &h.name,
            2,
            tap,
            &BTreeMap::new(),
            ConntrackLimits::default(),
            MAX_CONNTRACK,
        )
        .map_err(|e| format!("a valid state does not compile on {}: {e}", h.name))?;
        let l = loads[h.name.as_str()];
        let t = &c.tables;
        let checks = [
            ("ports", t.ports.len(), l.ports, true),
            ("forward", t.forward.len(), l.forward, true),
            ("neighbours", t.neighbours.len(), l.neighbours, false),
            ("networks", t.networks.len(), l.networks, true),
            ("vteps", t.vteps.len(), l.vteps, true),
            ("addr_allow", t.addr_allow.len(), l.addr_allow, false),
            ("remote_allow", t.remote_allow.len(), l.remote_allow, false),
            ("sg addrs", t.sg.addrs.len(), l.sg_addrs, true),
            ("sg rules", t.sg.rules.len(), l.sg_rules, true),
            ("sg port sets", t.sg.port_sets.len(), l.sg_port_sets, true),
            (
                "router interfaces",
                t.router_ifaces.len(),
                l.router_ifaces,
                true,
            ),
            ("routes", t.routes.len(), l.routes, false),
        ];
        for (what, compiled, counted, exact) in checks {
            if compiled > counted || (exact && compiled != counted) {
                return Err(format!(
                    "host {}: {compiled} {what} compiled, {counted} counted",
                    h.name
                ));
            }
        }
    }
    Ok(())
}

/// Addresses the fuzz states use: a few IPv4 and IPv6 ones, so that rules,
/// members and probes meet.
fn address(b: u8) -> IpAddr {
    let n = b & 0x0f;
    if b & 0x80 == 0 {
        IpAddr::V4(Ipv4Addr::new(10, 0, n >> 2, (n & 3) * 64 + (b >> 4 & 7)))
    } else {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            n as u16 >> 2,
            n as u16 & 3,
        ))
    }
}

fn rule(b: &mut Bytes) -> Rule {
    let flags = b.u8();
    let ethertype = if flags & 2 == 0 {
        Ethertype::IPv4
    } else {
        Ethertype::IPv6
    };
    let protocol = [
        Protocol::Any,
        Protocol::Number(PROTO_TCP),
        Protocol::Number(PROTO_UDP),
        Protocol::Number(PROTO_ICMP),
        Protocol::Number(PROTO_ICMPV6),
        Protocol::Number(47),
    ][(flags >> 2) as usize % 6];
    let ports = (flags & 0x20 != 0 && matches!(protocol, Protocol::Number(PROTO_TCP | PROTO_UDP)))
        .then(|| {
            let (a, c) = (b.u16(), b.u16());
            PortRange {
                first: a.min(c),
                last: a.max(c),
            }
        });
    let remote = match flags >> 6 {
        0 => None,
        1 => Some(Remote::Group(format!("g{}", b.u8() % 3))),
        _ => {
            let a = address(b.u8() & 0x7f | (flags & 2) << 6);
            let max = if a.is_ipv4() { 32 } else { 128 };
            let len = b.u8() % (max + 1);
            Some(Remote::Cidr(IpNet::new(a, len).expect("length").trunc()))
        }
    };
    Rule {
        direction: if flags & 1 == 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        },
        ethertype,
        protocol,
        ports,
        remote,
    }
}

/// Decodes a state of three groups and up to four ports, then probes.
pub fn security_groups(data: &[u8]) {
    security_groups_probed(data);
}

/// [`security_groups`], saying how many (policy, probe) answers it
/// compared (0: the state was refused).
pub fn security_groups_probed(data: &[u8]) -> usize {
    let mut b = Bytes(data);
    let mut snap: Snapshot = serde_json::from_value(serde_json::json!({
        "hosts": [{"name": "h0", "underlay_ip": "192.0.2.1"}, {"name": "h1", "underlay_ip": "192.0.2.2"}],
        "networks": [{"name": "n", "tenant": "t", "vni": 1, "subnets": ["10.0.0.0/16", "fd00::/64"]}],
    }))
    .expect("literal");
    for g in 0..3 {
        let n = b.u8() % 6;
        snap.security_groups.push(SecurityGroup {
            name: format!("g{g}"),
            tenant: "t".into(),
            rules: (0..n).map(|_| rule(&mut b)).collect(),
        });
    }
    let ports = b.u8() % 5;
    for i in 0..ports {
        let (groups, a4, a6, pair) = (b.u8(), b.u8(), b.u8(), b.u8());
        let mut p: Port = serde_json::from_value(serde_json::json!({
            "name": format!("p{i}"), "network": "n", "host": format!("h{}", groups >> 7),
            "interface": format!("tap{i}"), "mac": format!("02:00:00:00:00:{:02x}", i + 1),
        }))
        .expect("literal");
        p.ips = vec![address(a4 & 0x7f), address(a6 | 0x80)];
        p.security_groups = (0..3)
            .filter(|g| groups & (1 << g) != 0)
            .map(|g| format!("g{g}"))
            .collect();
        if pair & 1 != 0 {
            let a = address(pair & 0xfe & 0x7f);
            p.allowed_address_pairs = vec![AddressPair {
                ip: IpNet::new(a, 30).expect("length").trunc(),
                mac: None,
            }];
        }
        snap.ports.push(p);
    }
    let Ok(valid) = validate::validate(snap) else {
        return 0; // refused (two ports with one address): nothing to compile
    };
    fits(&valid).unwrap_or_else(|e| panic!("{e}"));
    let sets: BTreeSet<PolicySet> = valid
        .ports
        .iter()
        .filter(|p| p.port_security)
        .map(policy::policy_set)
        .chain([vec!["g0".into(), "g1".into(), "g2".into()]])
        .collect();
    let policies: BTreeMap<u32, PolicySet> = sets
        .into_iter()
        .enumerate()
        .map(|(i, s)| (i as u32 + 1, s))
        .collect();
    let t = policy::compile(&valid, &policies);
    let mut compared = 0;
    while !b.is_empty() {
        let (flags, a, port) = (b.u8(), b.u8(), b.u16());
        let remote = address(a);
        let proto = [0, PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6, 47][flags as usize % 6];
        let dir = if flags & 0x80 == 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let code = match dir {
            Direction::Ingress => SG_INGRESS,
            Direction::Egress => SG_EGRESS,
        };
        for (id, set) in &policies {
            let compiled = tables_allow(&t, *id, code, remote, proto, port);
            let read = rules_allow(&valid, set, dir, remote, proto, port);
            assert_eq!(
                compiled, read,
                "policy {set:?}, {dir:?} {remote} proto {proto} port {port}: the tables say {compiled}, the rules {read}"
            );
            compared += 1;
        }
    }
    compared
}

/// hv1 of a small state for [`frames`]: a1 and a3 on hv1, a2 on hv2,
/// everything allowed: the fixtures' host, its addresses those of
/// `cloison_testkit::frames` (interfaces `paN`, here ifindex 10 + N).
pub struct FramesHost {
    pub snap: Snapshot,
    pub tables: tables::Tables,
}

fn tap(name: &str) -> Option<Iface> {
    let i: u32 = name.strip_prefix("tap")?.parse().ok()?;
    Some(Iface {
        ifindex: 10 + i,
        veth: true,
        host_device: false,
    })
}

fn pa(name: &str) -> Option<Iface> {
    tap(&name.replacen("pa", "tap", 1))
}

impl FramesHost {
    pub fn new() -> FramesHost {
        let snap: Snapshot = serde_json::from_value(serde_json::json!({
            "hosts": [{"name": "hv1", "underlay_ip": "192.0.2.1"}, {"name": "hv2", "underlay_ip": "192.0.2.2"}],
            "networks": [{"name": "n", "tenant": "a", "vni": 1001, "subnets": ["10.0.0.0/24", "fd00:1::/64"]}],
            "security_groups": [{"name": "open", "tenant": "a", "rules": [
                {"direction": "ingress"}, {"direction": "egress"},
                {"direction": "ingress", "ethertype": "IPv6"}, {"direction": "egress", "ethertype": "IPv6"}]}],
            "ports": [
                {"name": "a1", "network": "n", "host": "hv1", "interface": "pa1", "mac": "02:00:00:00:00:01",
                 "ips": ["10.0.0.1", "fd00:1::1"], "security_groups": ["open"]},
                {"name": "a2", "network": "n", "host": "hv2", "interface": "pa2", "mac": "02:00:00:00:00:02",
                 "ips": ["10.0.0.2", "fd00:1::2"], "security_groups": ["open"]},
                {"name": "a3", "network": "n", "host": "hv1", "interface": "pa3", "mac": "02:00:00:00:00:03",
                 "ips": ["10.0.0.3", "fd00:1::3"], "security_groups": ["open"]}]
        }))
        .expect("literal");
        let valid = validate::validate(snap.clone()).expect("a valid state");
        let c = tables::compile(
            &valid,
            "hv1",
            2,
            pa,
            &BTreeMap::new(),
            ConntrackLimits::default(),
            MAX_CONNTRACK,
        )
        .expect("compiles");
        FramesHost {
            snap,
            tables: c.tables,
        }
    }

    pub fn model(&self) -> Model<'_> {
        Model::new(&self.tables, &self.snap, |name| {
            tap(name).map(|i| i.ifindex)
        })
    }
}

impl Default for FramesHost {
    fn default() -> Self {
        Self::new()
    }
}

/// `data` as a frame from a1's VM and from the underlay: the model decides,
/// and a drop is always for a reason the programs count.
pub fn frames(model: &Model, data: &[u8]) {
    for v in [model.port(11, data), model.uplink(data)] {
        if let crate::model::Verdict::Drop(r) = v {
            assert!(DropReason::ALL.contains(&r), "{r:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The sg_compiler target's smoke run: random states and probes, most
    /// of them states the validator takes.
    #[test]
    fn security_groups_smoke() {
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 400,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let (states, answers) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        runner
            .run(&proptest::collection::vec(any::<u8>(), 40..200), |data| {
                let n = security_groups_probed(&data);
                states.set(states.get() + (n > 0) as u32);
                answers.set(answers.get() + n);
                Ok(())
            })
            .unwrap();
        println!(
            "{} of 400 states compiled, {} answers compared",
            states.get(),
            answers.get()
        );
        assert!(states.get() > 100, "{} states compiled", states.get());
    }

    #[test]
    fn frames_smoke_on_random_bytes() {
        let host = FramesHost::new();
        let model = host.model();
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 2000,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        runner
            .run(&proptest::collection::vec(any::<u8>(), 0..200), |f| {
                frames(&model, &f);
                Ok(())
            })
            .unwrap();
    }
}
