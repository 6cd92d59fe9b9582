//! Compiles security groups into the two lookup stages of the BPF policy
//! stage, so a new flow costs two lookups per end whatever the number of
//! rules (each stage a hash by exact key first, an LPM trie only for what
//! the hash cannot answer):
//!
//! 1. `CL_SG_ADDRS`: (policy, direction, family, remote address) → class.
//!    Every remote prefix any rule names is a key; its class is the set of
//!    rules whose remote contains it. Remote prefixes that contain an address
//!    are nested, so the longest one present carries every rule matching it.
//!    Whole addresses (/32, /128) sit in `CL_SG_HOSTS` by exact key instead
//!    (abi's `sg_addr_whole_bits`; the loader puts each entry where it
//!    belongs).
//! 2. `CL_SG_PORTSETS`: (policy, class, direction, protocol) → the port
//!    prefixes the class allows (a port range becomes the few prefixes that
//!    cover it exactly), when they are at most abi's `SG_PORT_SET_LEN`;
//!    `CL_SG_RULES`, an LPM trie of (policy, class, direction, protocol,
//!    port prefix) → allow, for the rest: a class's rules for any protocol
//!    (its sets then say so), and its prefixes for a protocol when they are
//!    more. A set is one hash lookup whatever the other classes hold; the
//!    trie, shared by every class of every policy, grows deeper with them.
//!
//! A policy is a port's set of groups; ports with the same set share one.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use cloison_abi::*;
use ipnet::IpNet;

use crate::snapshot::*;

/// The policy of each local port with port security: its sorted group names.
pub type PolicySet = Vec<String>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SgTables {
    /// (prefix length, key) → class.
    pub addrs: BTreeMap<(u32, SgAddrKey), u32>,
    /// (prefix length, key) → 1: the rules trie, for what no port set
    /// holds (rules for any protocol, a class's ports for a protocol when
    /// they are more than a set holds).
    pub rules: BTreeMap<(u32, SgRuleKey), u32>,
    /// (policy, class, direction, protocol) → the few port prefixes the
    /// class allows for it.
    pub port_sets: BTreeMap<SgPortSetKey, SgPortSet>,
}

/// The prefixes that cover `first..=last` exactly: (value, prefix bits of 16).
pub fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u32)> {
    let (mut lo, hi) = (first as u32, last as u32);
    let mut out = Vec::new();
    while lo <= hi {
        // The largest aligned block starting at lo that stays inside the range.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            lo & lo.wrapping_neg()
        };
        while lo + size - 1 > hi {
            size /= 2;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

fn family(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => SG_FAMILY_V4,
        IpNet::V6(_) => SG_FAMILY_V6,
    }
}

fn addr_key(policy: u32, direction: u8, net: IpNet) -> (u32, SgAddrKey) {
    let mut addr = [0; 16];
    match net.network() {
        IpAddr::V4(a) => addr[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => addr = a.octets(),
    }
    let key = SgAddrKey {
        policy: policy.to_be_bytes(),
        direction,
        family: family(&net),
        _pad: [0; 2],
        addr,
    };
    (SG_ADDR_FIXED_BITS + net.prefix_len() as u32, key)
}

/// Addresses a remote group stands for: its ports' IPs and allowed pairs.
fn group_members(snap: &Snapshot) -> BTreeMap<&str, BTreeSet<IpNet>> {
    let mut out: BTreeMap<&str, BTreeSet<IpNet>> = BTreeMap::new();
    for p in &snap.ports {
        for g in &p.security_groups {
            let set = out.entry(g.as_str()).or_default();
            set.extend(p.ips.iter().map(|ip| IpNet::from(*ip)));
            set.extend(p.allowed_address_pairs.iter().map(|a| a.ip.trunc()));
        }
    }
    out
}

fn direction_code(d: Direction) -> u8 {
    match d {
        Direction::Ingress => SG_INGRESS,
        Direction::Egress => SG_EGRESS,
    }
}

/// A port's policy: its groups, sorted, each once.
pub fn policy_set(p: &Port) -> PolicySet {
    let set: BTreeSet<&String> = p.security_groups.iter().collect();
    set.into_iter().cloned().collect()
}

/// Compiles `policies` (id → group names) against the snapshot's groups.
/// The snapshot is valid, and its host's tables fit (see validate.rs).
pub fn compile(snap: &Snapshot, policies: &BTreeMap<u32, PolicySet>) -> SgTables {
    Compiler::new(snap).compile(policies)
}

/// What [`Compiler::classes`] finds.
struct Classes<'a> {
    rules: Vec<&'a Rule>,
    /// (remote prefix, its class).
    prefixes: Vec<(IpNet, u32)>,
    /// A class's rules (indexes in `rules`) → its id.
    classes: BTreeMap<Vec<usize>, u32>,
}

/// The snapshot's groups and the addresses of their members, found once for
/// any number of policies.
pub struct Compiler<'a> {
    groups: BTreeMap<&'a str, &'a SecurityGroup>,
    members: BTreeMap<&'a str, BTreeSet<IpNet>>,
}

impl<'a> Compiler<'a> {
    pub fn new(snap: &'a Snapshot) -> Self {
        Compiler {
            groups: snap
                .security_groups
                .iter()
                .map(|g| (g.name.as_str(), g))
                .collect(),
            members: group_members(snap),
        }
    }

    /// Entries (addresses, rules trie, port sets) one policy of `set`
    /// compiles to.
    pub fn size(&self, set: &PolicySet) -> (usize, usize, usize) {
        let t = self.compile(&BTreeMap::from([(1, set.clone())]));
        (t.addrs.len(), t.rules.len(), t.port_sets.len())
    }

    /// One direction of one policy: its rules (each once, in order), the
    /// class of each remote prefix they name, and each class's rules.
    fn classes(&self, set: &PolicySet, dir: Direction) -> Classes<'a> {
        let (groups, members) = (&self.groups, &self.members);
        let none = BTreeSet::new();
        let rules: BTreeSet<&Rule> = set
            .iter()
            .filter_map(|g| groups.get(g.as_str()))
            .flat_map(|g| g.rules.iter())
            .filter(|r| r.direction == dir)
            .collect();
        let rules: Vec<&Rule> = rules.into_iter().collect();
        // Remote prefix → the rules naming it.
        let mut by_prefix: BTreeMap<IpNet, Vec<usize>> = BTreeMap::new();
        for (i, r) in rules.iter().enumerate() {
            let any = match r.ethertype {
                Ethertype::IPv4 => "0.0.0.0/0".parse().expect("literal"),
                Ethertype::IPv6 => "::/0".parse().expect("literal"),
            };
            let remotes: Vec<IpNet> = match &r.remote {
                None => vec![any],
                Some(Remote::Cidr(c)) => vec![c.trunc()],
                Some(Remote::Group(g)) => members
                    .get(g.as_str())
                    .unwrap_or(&none)
                    .iter()
                    .filter(|n| family(n) == family(&any))
                    .copied()
                    .collect(),
            };
            for n in remotes {
                by_prefix.entry(n).or_default().push(i);
            }
        }
        let mut classes: BTreeMap<Vec<usize>, u32> = BTreeMap::new();
        let mut prefixes = Vec::new();
        for prefix in by_prefix.keys() {
            let mut class = BTreeSet::new();
            for bits in 0..=prefix.prefix_len() {
                let ancestor = IpNet::new(prefix.addr(), bits)
                    .expect("shorter than the prefix")
                    .trunc();
                if let Some(rs) = by_prefix.get(&ancestor) {
                    class.extend(rs.iter().copied());
                }
            }
            let next = classes.len() as u32;
            let id = *classes.entry(class.into_iter().collect()).or_insert(next);
            prefixes.push((*prefix, id));
        }
        Classes {
            rules,
            prefixes,
            classes,
        }
    }

    /// The rules, as (group, index in the group), that the rules-table
    /// entries of `class` matching (`proto`, `port`) in direction `dir` of
    /// a policy of `set` were compiled from: the rules that allow what a
    /// packet found there. How a trace names the kernel's deciding rule.
    pub fn rules_of_class(
        &self,
        set: &PolicySet,
        dir: Direction,
        class: u32,
        proto: u8,
        port: u16,
    ) -> Vec<(String, usize)> {
        let c = self.classes(set, dir);
        let Some((members, _)) = c.classes.iter().find(|(_, &id)| id == class) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for &i in members {
            let r = c.rules[i];
            let hit = match (r.protocol.number(r.ethertype), r.ports) {
                (None, _) => true,
                (Some(p), None) => p == proto,
                (Some(p), Some(range)) => p == proto && (range.first..=range.last).contains(&port),
            };
            if !hit {
                continue;
            }
            for g in set {
                if let Some(group) = self.groups.get(g.as_str()) {
                    for (j, gr) in group.rules.iter().enumerate() {
                        if gr == r {
                            out.push((g.clone(), j));
                        }
                    }
                }
            }
        }
        out
    }

    pub fn compile(&self, policies: &BTreeMap<u32, PolicySet>) -> SgTables {
        let mut out = SgTables::default();
        for (&policy, set) in policies {
            for dir in [Direction::Ingress, Direction::Egress] {
                let d = direction_code(dir);
                let Classes {
                    rules,
                    prefixes,
                    classes,
                } = self.classes(set, dir);
                for (prefix, id) in prefixes {
                    out.addrs.insert(addr_key(policy, d, prefix), id);
                }
                for (class, &id) in &classes {
                    // The class's ports by protocol; whether a rule of it
                    // takes any protocol.
                    let mut ports: BTreeMap<u8, BTreeSet<(u16, u32)>> = BTreeMap::new();
                    let mut any_proto = false;
                    for &i in class {
                        let r = rules[i];
                        match (r.protocol.number(r.ethertype), r.ports) {
                            (None, _) => any_proto = true,
                            (Some(p), None) => {
                                ports.entry(p).or_default().insert((0, 0));
                            }
                            (Some(p), Some(range)) => ports
                                .entry(p)
                                .or_default()
                                .extend(port_prefixes(range.first, range.last)),
                        }
                    }
                    let key = |proto: u8| SgPortSetKey {
                        policy: policy.to_be_bytes(),
                        class: id.to_be_bytes(),
                        direction: d,
                        proto,
                        _pad: [0; 2],
                    };
                    if any_proto {
                        out.rules.insert((SG_RULE_FIXED_BITS, key(0).rule(0)), 1);
                    }
                    for (proto, prefixes) in ports {
                        let k = key(proto);
                        if prefixes.len() > SG_PORT_SET_LEN {
                            for (v, bits) in prefixes {
                                out.rules
                                    .insert((SG_RULE_FIXED_BITS + 8 + bits, k.rule(v)), 1);
                            }
                            continue;
                        }
                        let mut set = SgPortSet {
                            len: prefixes.len() as u8,
                            trie: any_proto as u8,
                            ..Default::default()
                        };
                        for (slot, (value, bits)) in set.ports.iter_mut().zip(prefixes) {
                            *slot = SgPortPrefix::new(value, bits);
                        }
                        out.port_sets.insert(k, set);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{rules_allow, tables_allow};
    use proptest::prelude::*;

    fn rule() -> impl Strategy<Value = Rule> {
        let remote = prop_oneof![
            Just(None),
            (0u8..4, 0u8..4, 22u8..=32).prop_map(|(c, d, len)| Some(Remote::Cidr(
                IpNet::new(IpAddr::from([10, 0, c, d * 64]), len)
                    .unwrap()
                    .trunc()
            ))),
            (0u8..8).prop_map(|len| Some(Remote::Cidr(
                IpNet::new(IpAddr::from([10, 0, 0, 0]), 16 + len).unwrap()
            ))),
            Just(Some(Remote::Group("g0".into()))),
            Just(Some(Remote::Group("g1".into()))),
        ];
        (
            any::<bool>(),
            0u8..4,
            proptest::option::of((1u16..40, 0u16..40)),
            remote,
        )
            .prop_map(|(ingress, proto, ports, remote)| {
                let protocol = [
                    Protocol::Any,
                    Protocol::Number(6),
                    Protocol::Number(17),
                    Protocol::Number(1),
                ][proto as usize];
                Rule {
                    direction: if ingress {
                        Direction::Ingress
                    } else {
                        Direction::Egress
                    },
                    ethertype: Ethertype::IPv4,
                    protocol,
                    ports: matches!(protocol, Protocol::Number(6 | 17))
                        .then_some(ports)
                        .flatten()
                        .map(|(first, n)| PortRange {
                            first,
                            last: first + n,
                        }),
                    remote,
                }
            })
    }

    proptest! {
        /// The compiled tables answer exactly as the rules read.
        #[test]
        fn compiled_tables_decide_as_the_rules_read(
            g0 in proptest::collection::vec(rule(), 0..8),
            g1 in proptest::collection::vec(rule(), 0..8),
            probes in proptest::collection::vec((any::<bool>(), 0u8..4, 0u8..=255, 0u8..4, 0u16..90), 1..40),
        ) {
            let snap: Snapshot = serde_json::from_value(serde_json::json!({
                "hosts": [{"name": "h", "underlay_ip": "192.0.2.1"}],
                "networks": [{"name": "n", "tenant": "t", "vni": 1, "subnets": ["10.0.0.0/16"]}],
                "security_groups": [
                    {"name": "g0", "tenant": "t", "rules": g0},
                    {"name": "g1", "tenant": "t", "rules": g1}],
                "ports": [
                    {"name": "p0", "network": "n", "host": "h", "interface": "i0", "mac": "02:00:00:00:00:01",
                     "ips": ["10.0.0.1"], "security_groups": ["g0"]},
                    {"name": "p1", "network": "n", "host": "h", "interface": "i1", "mac": "02:00:00:00:00:02",
                     "ips": ["10.0.1.7"], "security_groups": ["g1"],
                     "allowed_address_pairs": [{"ip": "10.0.2.0/26"}]}]
            })).unwrap();
            let snap = crate::validate::validate(snap).unwrap();
            let sets: Vec<PolicySet> = vec![vec!["g0".into()], vec!["g1".into()], vec!["g0".into(), "g1".into()]];
            let policies: BTreeMap<u32, PolicySet> =
                sets.iter().cloned().enumerate().map(|(i, s)| (i as u32 + 1, s)).collect();
            let t = compile(&snap, &policies);
            for (ingress, c, d, proto, port) in probes {
                let remote = IpAddr::from([10, 0, c, d]);
                let proto = [0u8, 6, 17, 1][proto as usize];
                let dir = if ingress { Direction::Ingress } else { Direction::Egress };
                for (id, set) in &policies {
                    prop_assert_eq!(
                        tables_allow(&t, *id, direction_code(dir), remote, proto, port),
                        rules_allow(&snap, set, dir, remote, proto, port),
                        "policy {:?} {:?} {} proto {} port {}", set, dir, remote, proto, port
                    );
                }
            }
        }
    }

    #[test]
    fn port_ranges_become_exact_prefixes() {
        assert_eq!(port_prefixes(22, 22), vec![(22, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(8000, 8003), vec![(8000, 14)]);
        assert_eq!(port_prefixes(1, 3), vec![(1, 16), (2, 15)]);
        assert_eq!(port_prefixes(65535, 65535), vec![(65535, 16)]);
    }

    proptest::proptest! {
        #[test]
        fn port_prefixes_cover_the_range_and_nothing_else(a: u16, b: u16, probe: u16) {
            let (first, last) = (a.min(b), a.max(b));
            let ps = port_prefixes(first, last);
            let hits = ps
                .iter()
                .filter(|(v, bits)| {
                    let mask = u16::MAX.checked_shl(16 - bits).unwrap_or(0);
                    probe & mask == *v
                })
                .count();
            proptest::prop_assert_eq!(hits, ((first..=last).contains(&probe)) as usize);
            proptest::prop_assert!(ps.len() <= 30);
        }
    }
}
