//! The plan of an apply: from what the kernel holds ([`Current`], read once)
//! and what the compiler wants ([`Compiled`]), the ordered steps that turn
//! one into the other without ever opening a hole. Pure: tested without
//! root; the writer (`loader.rs`) carries it out step by step.
//!
//! The order: counters of a slot that changes hands reset; the host config;
//! every table written, security groups first and port entries last (what a
//! port entry points to exists before it); stale port attachments detached
//! and new ones attached (after their entries); the uplink; then stale
//! entries deleted in the reverse order (ports first, what they pointed to
//! after); last, if any rule or a port's policy changed, the policy epoch
//! bumped so every flow is checked again against the tables as they now are.
use std::collections::{BTreeMap, BTreeSet};

use cloison_abi::*;

use crate::{
    policy::SgTables,
    tables::{Compiled, LocalPort, Tables},
};

/// What the kernel holds for a host, as read before an apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Current {
    /// `None` before the first apply.
    pub config: Option<HostConfig>,
    /// Every table's contents (its `config` field unused: see `config`).
    pub tables: Tables,
    /// Ports with a pinned attachment, by ifindex, and whether that
    /// interface still exists.
    pub port_links: BTreeMap<u32, bool>,
}

/// What changes a map from `have` to `want`: entries to write (new or
/// different) and keys to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff<K, V> {
    pub changed: Vec<(K, V)>,
    pub stale: Vec<K>,
}

impl<K, V> Default for Diff<K, V> {
    fn default() -> Self {
        Diff {
            changed: Vec::new(),
            stale: Vec::new(),
        }
    }
}

pub fn diff<K: Ord + Copy, V: PartialEq + Copy>(
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
) -> Diff<K, V> {
    Diff {
        changed: want
            .iter()
            .filter(|(k, v)| have.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect(),
        stale: have
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect(),
    }
}

/// The tables a plan writes and deletes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    SgAddrs,
    SgRules,
    SgPortSets,
    Networks,
    Vteps,
    Neighbours,
    RemoteAllow,
    Forward,
    Routes,
    RouterIfaces,
    AddrAllow,
    Ports,
    FloatingIps,
    PortFloatingIps,
}

impl Table {
    /// In the order they are written; deleted in the reverse one.
    /// A router's interface (where routing starts) comes after its routes
    /// and what they lead to.
    /// Floating IPs name ports: after them.
    pub const WRITE_ORDER: [Table; 14] = [
        Table::SgAddrs,
        Table::SgRules,
        Table::SgPortSets,
        Table::Networks,
        Table::Vteps,
        Table::Neighbours,
        Table::RemoteAllow,
        Table::Forward,
        Table::Routes,
        Table::RouterIfaces,
        Table::AddrAllow,
        Table::Ports,
        Table::FloatingIps,
        Table::PortFloatingIps,
    ];
}

/// Every table's diff.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diffs {
    pub sg_addrs: Diff<(u32, SgAddrKey), u32>,
    pub sg_rules: Diff<(u32, SgRuleKey), u32>,
    pub sg_port_sets: Diff<SgPortSetKey, SgPortSet>,
    pub networks: Diff<u32, NetworkInfo>,
    pub vteps: Diff<VtepKey, u32>,
    pub neighbours: Diff<NeighbourKey, NeighbourEntry>,
    pub forward: Diff<ForwardKey, ForwardEntry>,
    pub addr_allow: Diff<(u32, AddrKey), AddrAllow>,
    pub remote_allow: Diff<(u32, RemoteAddrKey), AddrAllow>,
    pub routes: Diff<(u32, RouteKey), RouteEntry>,
    pub router_ifaces: Diff<u32, RouterIface>,
    pub ports: Diff<u32, PortInfo>,
    pub fips: Diff<[u8; 4], FloatingIn>,
    pub port_fips: Diff<u32, FloatingOut>,
}

impl Diffs {
    /// (entries to write, keys to delete) of `t`.
    pub fn sizes(&self, t: Table) -> (usize, usize) {
        fn s<K, V>(d: &Diff<K, V>) -> (usize, usize) {
            (d.changed.len(), d.stale.len())
        }
        match t {
            Table::SgAddrs => s(&self.sg_addrs),
            Table::SgRules => s(&self.sg_rules),
            Table::SgPortSets => s(&self.sg_port_sets),
            Table::Networks => s(&self.networks),
            Table::Vteps => s(&self.vteps),
            Table::Neighbours => s(&self.neighbours),
            Table::Forward => s(&self.forward),
            Table::AddrAllow => s(&self.addr_allow),
            Table::RemoteAllow => s(&self.remote_allow),
            Table::Routes => s(&self.routes),
            Table::RouterIfaces => s(&self.router_ifaces),
            Table::Ports => s(&self.ports),
            Table::FloatingIps => s(&self.fips),
            Table::PortFloatingIps => s(&self.port_fips),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Zero the counters of these port slots (a slot that changes hands).
    ResetCounters(Vec<u32>),
    Config(HostConfig),
    /// The host's external IP (SNAT's source) in `CL_EXTERNAL`.
    ExternalIp([u8; 4]),
    /// Write the table's new and changed entries.
    Write(Table),
    /// Unpin (detach) the port program from this ifindex: only once its
    /// interface is gone. The interface of a deleted port that still exists
    /// keeps the program, which drops all it sends (fail closed).
    Detach(u32),
    Attach(LocalPort),
    /// Attach the uplink program (as the writer's hook says) if it is not.
    Uplink,
    /// Delete the table's stale keys.
    Delete(Table),
}

/// An address range of a network: (zone, 16-byte address with IPv4
/// IPv4-mapped, prefix length over those 128 bits).
pub type ZonePrefix = (u32, [u8; 16], u32);

/// Tracked state that belonged to what the plan removes or changes: it must
/// not outlive it (a new port with the same (VNI, IP) would inherit its
/// pinholes). The writer deletes it after the steps, and recounts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Purge {
    /// Networks no longer on this host: every flow and fragment of their zone.
    pub zones: BTreeSet<u32>,
    /// Port slots whose port went or changed: the flows charged to them.
    pub slots: BTreeSet<u32>,
    /// Addresses that left a network or changed hands: flows and fragments
    /// with an end in them.
    pub ends: Vec<ZonePrefix>,
    /// Some tenant's or port's conntrack share shrank: trim to the shares.
    pub trim: bool,
}

impl Purge {
    pub fn is_empty(&self) -> bool {
        self.zones.is_empty() && self.slots.is_empty() && self.ends.is_empty() && !self.trim
    }

    /// Whether `addr` of zone `zone` is in a purged range.
    pub fn covers(&self, zone: u32, addr: &[u8; 16]) -> bool {
        let a = u128::from_be_bytes(*addr);
        self.zones.contains(&zone)
            || self.ends.iter().any(|(z, net, bits)| {
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                *z == zone && (u128::from_be_bytes(*net) ^ a) & mask == 0
            })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub diffs: Diffs,
    pub purge: Purge,
}

/// What of the tracked state `current` has that `want` no longer backs.
fn purge(current: &Current, want: &Compiled) -> Purge {
    let (have, t) = (&current.tables, &want.tables);
    let mut p = Purge {
        zones: have
            .networks
            .keys()
            .filter(|v| !t.networks.contains_key(v))
            .copied()
            .collect(),
        ..Purge::default()
    };
    let slots: BTreeMap<u32, u32> = t.ports.iter().map(|(i, info)| (info.slot, *i)).collect();
    for (ifindex, old) in &have.ports {
        let kept = t.ports.get(ifindex);
        if slots.get(&old.slot) != Some(ifindex) || kept.is_some_and(|n| n.vni != old.vni) {
            p.slots.insert(old.slot);
        }
        if let Some(n) = kept {
            p.trim |=
                n.ct_tenant_quota < old.ct_tenant_quota || n.ct_port_quota < old.ct_port_quota;
        }
    }
    // A routed flow lives in its router's zone: what leaves a network
    // leaves it there too.
    let router_zone = |vni: u32| have.router_ifaces.get(&vni).map(|r| ROUTER_ZONE | r.router);
    let mut ends = |vni: u32, addr: [u8; 16], bits: u32| {
        p.ends.push((vni, addr, bits));
        if let Some(z) = router_zone(vni) {
            p.ends.push((z, addr, bits));
        }
    };
    for (k, v) in &have.neighbours {
        if t.neighbours.get(k) != Some(v) {
            ends(k.vni, k.addr, 128);
        }
    }
    for ((bits, k), v) in &have.addr_allow {
        let Some(port) = have.ports.get(&u32::from_be_bytes(k.ifindex_be)) else {
            continue;
        };
        if t.addr_allow.get(&(*bits, *k)) != Some(v) {
            ends(port.vni, k.addr, bits - 32);
        }
    }
    for ((bits, k), v) in &have.remote_allow {
        if t.remote_allow.get(&(*bits, *k)) != Some(v) {
            ends(u32::from_be_bytes(k.vni_be), k.addr, bits - 32);
        }
    }
    // A network that leaves its router (or whose route changed): the
    // router's flows with an end in it; a router gone: its whole zone.
    for ((bits, k), v) in &have.routes {
        if t.routes.get(&(*bits, *k)) != Some(v) {
            let zone = ROUTER_ZONE | u32::from_be_bytes(k.router_be);
            p.ends.push((zone, k.addr, bits - 32));
        }
    }
    let kept: BTreeSet<u32> = t.router_ifaces.values().map(|r| r.router).collect();
    for r in have.router_ifaces.values() {
        if !kept.contains(&r.router) {
            p.zones.insert(ROUTER_ZONE | r.router);
        }
    }
    p
}

impl Plan {
    /// Map entries the plan writes or deletes (config writes included).
    pub fn map_updates(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Config(_) | Step::ExternalIp(_) => 1,
                Step::Write(t) => self.diffs.sizes(*t).0,
                Step::Delete(t) => self.diffs.sizes(*t).1,
                _ => 0,
            })
            .sum()
    }
}

fn sg_diffs(have: &SgTables, want: &SgTables, d: &mut Diffs) {
    d.sg_addrs = diff(&have.addrs, &want.addrs);
    d.sg_rules = diff(&have.rules, &want.rules);
    d.sg_port_sets = diff(&have.port_sets, &want.port_sets);
}

/// The steps that make `current` into what `want` says.
pub fn plan(current: &Current, want: &Compiled) -> Plan {
    let (have, t) = (&current.tables, &want.tables);
    let mut diffs = Diffs::default();
    sg_diffs(&have.sg, &t.sg, &mut diffs);
    diffs.networks = diff(&have.networks, &t.networks);
    diffs.vteps = diff(&have.vteps, &t.vteps);
    diffs.neighbours = diff(&have.neighbours, &t.neighbours);
    diffs.forward = diff(&have.forward, &t.forward);
    diffs.addr_allow = diff(&have.addr_allow, &t.addr_allow);
    diffs.remote_allow = diff(&have.remote_allow, &t.remote_allow);
    diffs.routes = diff(&have.routes, &t.routes);
    diffs.router_ifaces = diff(&have.router_ifaces, &t.router_ifaces);
    diffs.ports = diff(&have.ports, &t.ports);
    diffs.fips = diff(&have.fips, &t.fips);
    diffs.port_fips = diff(&have.port_fips, &t.port_fips);

    let mut steps = Vec::new();
    let fresh: Vec<u32> = want
        .local_ports
        .iter()
        .filter(|p| have.ports.get(&p.ifindex).map(|i| i.slot) != Some(p.slot))
        .map(|p| p.slot)
        .collect();
    if !fresh.is_empty() {
        steps.push(Step::ResetCounters(fresh));
    }
    let epoch = current.config.map_or(0, |c| c.policy_epoch);
    let config = HostConfig {
        policy_epoch: epoch,
        ..t.config
    };
    if current.config != Some(config) {
        steps.push(Step::Config(config));
    }
    if have.external_ip != t.external_ip {
        steps.push(Step::ExternalIp(t.external_ip));
    }
    for table in Table::WRITE_ORDER {
        if diffs.sizes(table).0 > 0 {
            steps.push(Step::Write(table));
        }
    }
    let wanted: BTreeSet<u32> = want.local_ports.iter().map(|p| p.ifindex).collect();
    for (&ifindex, &exists) in &current.port_links {
        if !wanted.contains(&ifindex) && !exists {
            steps.push(Step::Detach(ifindex));
        }
    }
    for p in &want.local_ports {
        if !current.port_links.contains_key(&p.ifindex) {
            steps.push(Step::Attach(p.clone()));
        }
    }
    steps.push(Step::Uplink);
    for table in Table::WRITE_ORDER.into_iter().rev() {
        if diffs.sizes(table).1 > 0 {
            steps.push(Step::Delete(table));
        }
    }
    let policy_moved = have
        .ports
        .iter()
        .any(|(k, v)| t.ports.get(k).is_some_and(|p| p.policy != v.policy));
    let sg_moved = [Table::SgAddrs, Table::SgRules, Table::SgPortSets]
        .into_iter()
        .any(|t| diffs.sizes(t) != (0, 0));
    if policy_moved || sg_moved {
        steps.push(Step::Config(HostConfig {
            policy_epoch: epoch.wrapping_add(1),
            ..config
        }));
    }
    Plan {
        steps,
        diffs,
        purge: purge(current, want),
    }
}

/// What carrying out `plan` on `current` leaves, in memory: what the kernel
/// holds after the writer has (the tests' model of the writer).
pub fn simulate(current: &Current, plan: &Plan) -> Current {
    fn write<K: Ord + Copy, V: Copy>(m: &mut BTreeMap<K, V>, d: &Diff<K, V>) {
        m.extend(d.changed.iter().copied());
    }
    fn delete<K: Ord + Copy, V>(m: &mut BTreeMap<K, V>, d: &Diff<K, V>) {
        for k in &d.stale {
            m.remove(k);
        }
    }
    let mut out = current.clone();
    let d = &plan.diffs;
    for step in &plan.steps {
        let t = &mut out.tables;
        match step {
            Step::ResetCounters(_) | Step::Uplink => {}
            Step::Config(c) => out.config = Some(*c),
            Step::ExternalIp(ip) => out.tables.external_ip = *ip,
            Step::Write(table) => match table {
                Table::SgAddrs => write(&mut t.sg.addrs, &d.sg_addrs),
                Table::SgRules => write(&mut t.sg.rules, &d.sg_rules),
                Table::SgPortSets => write(&mut t.sg.port_sets, &d.sg_port_sets),
                Table::Networks => write(&mut t.networks, &d.networks),
                Table::Vteps => write(&mut t.vteps, &d.vteps),
                Table::Neighbours => write(&mut t.neighbours, &d.neighbours),
                Table::Forward => write(&mut t.forward, &d.forward),
                Table::AddrAllow => write(&mut t.addr_allow, &d.addr_allow),
                Table::RemoteAllow => write(&mut t.remote_allow, &d.remote_allow),
                Table::Routes => write(&mut t.routes, &d.routes),
                Table::RouterIfaces => write(&mut t.router_ifaces, &d.router_ifaces),
                Table::FloatingIps => write(&mut t.fips, &d.fips),
                Table::PortFloatingIps => write(&mut t.port_fips, &d.port_fips),
                Table::Ports => write(&mut t.ports, &d.ports),
            },
            Step::Delete(table) => match table {
                Table::SgAddrs => delete(&mut t.sg.addrs, &d.sg_addrs),
                Table::SgRules => delete(&mut t.sg.rules, &d.sg_rules),
                Table::SgPortSets => delete(&mut t.sg.port_sets, &d.sg_port_sets),
                Table::Networks => delete(&mut t.networks, &d.networks),
                Table::Vteps => delete(&mut t.vteps, &d.vteps),
                Table::Neighbours => delete(&mut t.neighbours, &d.neighbours),
                Table::Forward => delete(&mut t.forward, &d.forward),
                Table::AddrAllow => delete(&mut t.addr_allow, &d.addr_allow),
                Table::RemoteAllow => delete(&mut t.remote_allow, &d.remote_allow),
                Table::Routes => delete(&mut t.routes, &d.routes),
                Table::RouterIfaces => delete(&mut t.router_ifaces, &d.router_ifaces),
                Table::FloatingIps => delete(&mut t.fips, &d.fips),
                Table::PortFloatingIps => delete(&mut t.port_fips, &d.port_fips),
                Table::Ports => delete(&mut t.ports, &d.ports),
            },
            Step::Detach(i) => {
                out.port_links.remove(i);
            }
            Step::Attach(p) => {
                out.port_links.insert(p.ifindex, true);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        snapshot::Snapshot,
        tables::{compile, ConntrackLimits, Iface},
    };

    /// A snapshot of `n` ports on two hosts (hv1 has the even ones), in
    /// `groups` groups; ports whose bit is set in `attached` have an
    /// interface on hv1.
    fn compiled(n: usize, groups: usize, attached: u64, prev: &Current) -> Compiled {
        let mut s: Snapshot = serde_json::from_str(
            r#"{"hosts":[{"name":"hv1","underlay_ip":"192.0.2.1"},{"name":"hv2","underlay_ip":"192.0.2.2"}],
                "networks":[{"name":"n","tenant":"t","vni":7,"subnets":["10.0.0.0/16"]}]}"#,
        )
        .unwrap();
        for g in 0..groups.max(1) {
            s.security_groups.push(
                serde_json::from_value(serde_json::json!({"name": format!("g{g}"), "tenant": "t",
                    "rules": [{"direction": "ingress", "protocol": "tcp", "ports": format!("{}", 20 + g),
                               "remote": {"group": format!("g{g}")}}, {"direction": "egress"}]}))
                .unwrap(),
            );
        }
        for i in 0..n {
            s.ports.push(
                serde_json::from_value(serde_json::json!({
                    "name": format!("p{i}"), "network": "n",
                    "host": if i % 2 == 0 { "hv1" } else { "hv2" },
                    "interface": format!("tap{i}"), "mac": format!("02:00:00:00:01:{i:02x}"),
                    "ips": [format!("10.0.1.{i}")],
                    "security_groups": if groups == 0 { vec![] } else { vec![format!("g{}", i % groups)] }}))
                .unwrap(),
            );
        }
        let valid = s.validated().unwrap();
        let resolve = |name: &str| {
            let i: u32 = name.strip_prefix("tap")?.parse().ok()?;
            (attached >> i & 1 == 1).then_some(Iface {
                ifindex: 100 + i,
                veth: true,
                host_device: false,
            })
        };
        compile(
            &valid,
            "hv1",
            2,
            resolve,
            &prev.tables.ports,
            ConntrackLimits::default(),
            MAX_CONNTRACK,
        )
        .unwrap()
    }

    fn position(p: &Plan, f: impl Fn(&Step) -> bool) -> Option<usize> {
        p.steps.iter().position(f)
    }

    /// Holds for every plan: port entries are written after what they point
    /// to and deleted before it; attachments come after their port's entry
    /// and before stale entries go; the epoch moves last, when rules did.
    fn assert_ordered(p: &Plan) {
        let w = |t| position(p, |s| *s == Step::Write(t));
        let d = |t| position(p, |s| *s == Step::Delete(t));
        let uplink = position(p, |s| *s == Step::Uplink).expect("the uplink step");
        if let Some(ports) = w(Table::Ports) {
            for t in Table::WRITE_ORDER.iter().filter(|t| **t != Table::Ports) {
                assert!(w(*t).is_none_or(|i| i < ports), "{t:?} written after ports");
            }
        }
        if let Some(ports) = d(Table::Ports) {
            for t in Table::WRITE_ORDER.iter().filter(|t| **t != Table::Ports) {
                assert!(
                    d(*t).is_none_or(|i| i > ports),
                    "{t:?} deleted before ports"
                );
            }
        }
        for (i, s) in p.steps.iter().enumerate() {
            match s {
                Step::Attach(_) | Step::Detach(_) => {
                    assert!(
                        w(Table::Ports).is_none_or(|j| j < i),
                        "attached before written"
                    );
                    assert!(i < uplink, "ports after the uplink");
                }
                Step::Delete(_) => assert!(i > uplink, "deleted before the attachments"),
                Step::Write(_) => assert!(i < uplink),
                _ => {}
            }
        }
        let bumps = p
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Config(_)))
            .count();
        if bumps == 2 {
            assert!(
                matches!(p.steps.last(), Some(Step::Config(_))),
                "epoch last"
            );
        }
    }

    fn current_after(want: &Compiled) -> Current {
        let p = plan(&Current::default(), want);
        simulate(&Current::default(), &p)
    }

    /// `c` with the interfaces whose bit is set in `attached` existing.
    fn existing(mut c: Current, attached: u64) -> Current {
        for (i, exists) in c.port_links.iter_mut() {
            *exists = attached >> (i - 100) & 1 == 1;
        }
        c
    }

    #[test]
    fn from_nothing_everything_is_written_then_attached() {
        let want = compiled(6, 2, 0b010101, &Current::default());
        let p = plan(&Current::default(), &want);
        assert_ordered(&p);
        let after = simulate(&Current::default(), &p);
        let mut expect = want.tables.clone();
        expect.config.policy_epoch = 1; // groups were written: the epoch moved
        assert_eq!(after.tables.ports, expect.ports);
        assert_eq!(after.tables.sg, expect.sg);
        assert_eq!(after.config, Some(expect.config));
        assert_eq!(
            after.port_links,
            BTreeMap::from([(100, true), (102, true), (104, true)])
        );
        assert_eq!(
            p.steps.first(),
            Some(&Step::ResetCounters(vec![0, 1, 2])),
            "fresh slots"
        );
    }

    #[test]
    fn the_same_state_again_changes_nothing() {
        let want = compiled(6, 2, 0b010101, &Current::default());
        let now = current_after(&want);
        let again = compiled(6, 2, 0b010101, &now);
        let p = plan(&now, &again);
        assert_eq!(p.steps, vec![Step::Uplink]);
        assert_eq!(p.map_updates(), 0);
    }

    #[test]
    fn what_a_removed_port_or_address_had_is_purged() {
        let first = compiled(6, 1, 0b111111, &Current::default());
        let now = current_after(&first);
        assert!(plan(&now, &compiled(6, 1, 0b111111, &now)).purge.is_empty());
        // p2 (on hv1) goes, p3 (on hv2) goes: p2's slot, both addresses.
        let fewer = compiled(2, 1, 0b000011, &now);
        let p = plan(&now, &fewer);
        let slot_p2 = now.tables.ports[&102].slot;
        assert!(p.purge.slots.contains(&slot_p2), "{:?}", p.purge);
        let ip = |i: u8| crate::tables::ip16(std::net::IpAddr::from([10, 0, 1, i]));
        assert!(p.purge.covers(7, &ip(2)) && p.purge.covers(7, &ip(3)));
        assert!(!p.purge.covers(7, &ip(1)), "p1 stays");
        assert!(!p.purge.covers(8, &ip(2)), "another zone");
        // p2's interface is still there: closed, not detached; gone: detached.
        let still = existing(now.clone(), 0b010111);
        let p = plan(&still, &compiled(2, 1, 0b010111, &still));
        assert!(!p.steps.contains(&Step::Detach(102)), "{:?}", p.steps);
        assert!(!p.steps.contains(&Step::Detach(104)));
        let gone = existing(now.clone(), 0b000011);
        let p = plan(&gone, &compiled(2, 1, 0b000011, &gone));
        assert!(p.steps.contains(&Step::Detach(102)) && p.steps.contains(&Step::Detach(104)));
        // The network leaves the host with its last port.
        let none = compiled(0, 1, 0, &now);
        assert!(plan(&now, &none).purge.zones.contains(&7));
    }

    proptest! {
        /// From any state to any other: the order holds, and carrying the
        /// plan out leaves exactly the wanted tables and attachments.
        #[test]
        fn any_plan_is_ordered_and_reaches_what_is_wanted(
            n0 in 0usize..10, g0 in 0usize..3, a0 in any::<u64>(),
            n1 in 0usize..10, g1 in 0usize..3, a1 in any::<u64>(),
        ) {
            let first = compiled(n0, g0, a0, &Current::default());
            let now = existing(current_after(&first), a1);
            let next = compiled(n1, g1, a1, &now);
            let p = plan(&now, &next);
            assert_ordered(&p);
            let after = simulate(&now, &p);
            let mut expect = next.tables.clone();
            expect.config.policy_epoch = after.config.unwrap().policy_epoch;
            prop_assert_eq!(&after.tables.ports, &expect.ports);
            prop_assert_eq!(&after.tables.forward, &expect.forward);
            prop_assert_eq!(&after.tables.neighbours, &expect.neighbours);
            prop_assert_eq!(&after.tables.addr_allow, &expect.addr_allow);
            prop_assert_eq!(&after.tables.remote_allow, &expect.remote_allow);
            prop_assert_eq!(&after.tables.vteps, &expect.vteps);
            prop_assert_eq!(&after.tables.networks, &expect.networks);
            prop_assert_eq!(&after.tables.sg, &expect.sg);
            prop_assert_eq!(after.config, Some(expect.config));
            // The wanted ports' links, and those of interfaces still there
            // whose port went: closed, not detached.
            let mut links: BTreeSet<u32> = next.local_ports.iter().map(|p| p.ifindex).collect();
            links.extend(now.port_links.iter().filter(|(_, e)| **e).map(|(i, _)| *i));
            prop_assert_eq!(after.port_links.keys().copied().collect::<BTreeSet<u32>>(), links);
            let sg_moved = p.diffs.sizes(Table::SgAddrs) != (0, 0)
                || p.diffs.sizes(Table::SgRules) != (0, 0)
                || p.diffs.sizes(Table::SgPortSets) != (0, 0)
                || now.tables.ports.iter().any(|(k, v)| next.tables.ports.get(k).is_some_and(|q| q.policy != v.policy));
            prop_assert_eq!(
                after.config.unwrap().policy_epoch,
                now.config.unwrap().policy_epoch + sg_moved as u32
            );
        }
    }
}
