//! Compiles a [`Valid`] snapshot into the exact contents of every map for
//! one host. Pure: the same snapshot and interfaces always give the same
//! tables, which the plan then diffs against what the kernel holds. Nothing
//! is checked here: the validator has (what fits a host included).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use cloison_abi::*;
use ipnet::IpNet;

use crate::{policy::PolicySet, snapshot::*, validate::Valid, Error};

/// A port's interface as found on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iface {
    pub ifindex: u32,
    /// A veth (delivered with `bpf_redirect_peer`) rather than a tap.
    pub veth: bool,
    /// One of the host's own devices (not a tap or veth): never a port.
    pub host_device: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub config: HostConfig,
    pub ports: BTreeMap<u32, PortInfo>,
    /// (prefix length, key) of the LPM trie.
    pub addr_allow: BTreeMap<(u32, AddrKey), AddrAllow>,
    pub forward: BTreeMap<ForwardKey, ForwardEntry>,
    pub neighbours: BTreeMap<NeighbourKey, NeighbourEntry>,
    pub networks: BTreeMap<u32, NetworkInfo>,
    pub vteps: BTreeMap<VtepKey, u32>,
    /// (prefix length, key) of the LPM trie: remote ports' own addresses.
    pub remote_allow: BTreeMap<(u32, RemoteAddrKey), AddrAllow>,
    /// Networks joined by a router, by VNI.
    pub router_ifaces: BTreeMap<u32, RouterIface>,
    /// (prefix length, key) of the LPM trie: each router's subnets.
    pub routes: BTreeMap<(u32, RouteKey), RouteEntry>,
    /// Floating IPs of local ports, by the floating IP and by the port.
    pub fips: BTreeMap<[u8; 4], FloatingIn>,
    pub port_fips: BTreeMap<u32, FloatingOut>,
    /// The host's external IP (SNAT's source), 0.0.0.0 for none.
    pub external_ip: [u8; 4],
    pub sg: crate::policy::SgTables,
}

/// A port of this host whose interface exists: programs attach to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPort {
    pub name: String,
    pub interface: String,
    pub ifindex: u32,
    pub slot: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub tables: Tables,
    pub local_ports: Vec<LocalPort>,
    /// Ports of this host whose interface does not exist (yet).
    pub pending: Vec<String>,
    /// Ports of this host whose interface is the uplink or another host
    /// device: never attached, with why.
    pub refused: Vec<(String, String)>,
}

pub fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// LPM key for `net` on port `ifindex`: 32 bits of ifindex, then the address
/// (IPv4 as IPv4-mapped IPv6, so its prefix counts 96 more bits).
pub fn addr_key(ifindex: u32, net: IpNet) -> (u32, AddrKey) {
    let bits = match net {
        IpNet::V4(n) => 96 + n.prefix_len() as u32,
        IpNet::V6(n) => n.prefix_len() as u32,
    };
    let key = AddrKey {
        ifindex_be: ifindex.to_be_bytes(),
        addr: ip16(net.network()),
    };
    (32 + bits, key)
}

/// The addresses a port with port security sends from, and with which MAC:
/// its IPs and link-local address (its MAC), its allowed pairs (theirs).
pub fn own_addresses(p: &Port) -> impl Iterator<Item = (IpNet, MacAddr)> + '_ {
    p.ips
        .iter()
        .copied()
        .chain([IpAddr::V6(p.mac.link_local())])
        .map(|ip| (IpNet::from(ip), p.mac))
        .chain(
            p.allowed_address_pairs
                .iter()
                .map(|pair| (pair.ip.trunc(), pair.mac.unwrap_or(p.mac))),
        )
}

/// LPM key for `net` in network `vni` (remote ports' addresses).
pub fn remote_key(vni: u32, net: IpNet) -> (u32, RemoteAddrKey) {
    let (bits, key) = addr_key(0, net);
    (
        bits,
        RemoteAddrKey {
            vni_be: vni.to_be_bytes(),
            addr: key.addr,
        },
    )
}

/// LPM key for `net` in router `router`'s routes.
pub fn route_key(router: u32, net: IpNet) -> (u32, RouteKey) {
    let (bits, key) = addr_key(0, net);
    (
        bits,
        RouteKey {
            router_be: router.to_be_bytes(),
            addr: key.addr,
        },
    )
}

/// Each router's id on this host (its routes' key, its conntrack zone
/// with [`ROUTER_ZONE`]): a hash of its name, so the same on every apply
/// and every host, moved on by one on a collision (in name order).
pub fn router_ids<'a>(routers: impl IntoIterator<Item = &'a str>) -> BTreeMap<&'a str, u32> {
    let mut names: Vec<&str> = routers.into_iter().collect();
    names.sort_unstable();
    names.dedup();
    let mut used = BTreeSet::new();
    let mut out = BTreeMap::new();
    for name in names {
        let mut h: u32 = 0x811c_9dc5;
        for b in name.bytes() {
            h = (h ^ b as u32).wrapping_mul(0x0100_0193);
        }
        // 1..=2^31-1: never 0, never with the zone bit.
        let mut id = h % (ROUTER_ZONE - 1) + 1;
        while !used.insert(id) {
            id = id % (ROUTER_ZONE - 1) + 1;
        }
        out.insert(name, id);
    }
    out
}

/// Caps on the fair shares of the conntrack table: an operator may hold a
/// port or a tenant below its share. `u32::MAX`: the share alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackLimits {
    pub per_port: u32,
    pub per_tenant: u32,
}

impl Default for ConntrackLimits {
    fn default() -> Self {
        ConntrackLimits {
            per_port: u32::MAX,
            per_tenant: u32::MAX,
        }
    }
}

/// The part of a conntrack table of `capacity` entries handed out as quotas;
/// the rest absorbs the LRU's per-CPU free lists, which may evict before
/// the table is globally full.
pub fn ct_usable(capacity: u32) -> u32 {
    capacity / 8 * 7
}

/// A port's conntrack share: all of its tenant's if it is the tenant's only
/// port on the host, else three quarters of it. A busy port is not held to
/// an equal split with idle neighbours, and they always keep a quarter.
pub fn port_share(tenant_quota: u32, tenant_ports: u32) -> u32 {
    if tenant_ports <= 1 {
        tenant_quota
    } else {
        (tenant_quota / 4 * 3).max(1)
    }
}

pub fn compile(
    snap: &Valid,
    host: &str,
    uplink_ifindex: u32,
    resolve: impl Fn(&str) -> Option<Iface>,
    previous: &BTreeMap<u32, PortInfo>,
    limits: ConntrackLimits,
    ct_capacity: u32,
) -> Result<Compiled, Error> {
    let me = snap
        .hosts
        .iter()
        .find(|h| h.name == host)
        .ok_or_else(|| Error::Invalid(format!("host {host} is not in the snapshot")))?;
    let host_ip: BTreeMap<&str, [u8; 4]> = snap
        .hosts
        .iter()
        .map(|h| (h.name.as_str(), h.underlay_ip.octets()))
        .collect();
    let host_encryption: BTreeMap<&str, Encryption> = snap
        .hosts
        .iter()
        .map(|h| (h.name.as_str(), h.encryption))
        .collect();
    // How frames go to a remote host: inside ESP between two ipsec hosts,
    // not at all between an ipsec host and a plain one.
    let to_host = |h: &str| match (me.encryption, host_encryption[h]) {
        (Encryption::None, Encryption::None) => 0,
        (Encryption::Ipsec, Encryption::Ipsec) => FWD_F_ENCRYPT,
        _ => FWD_F_REFUSE,
    };
    // VXLAN in clear is taken only between two plain hosts: an ipsec host
    // takes none in clear, from any VTEP; and since an ipsec host
    // never sends in clear, a plain host refuses what claims to come in
    // clear from one (forged). Decrypted VXLAN is taken only between two
    // ipsec hosts.
    let vtep_flags = |h: &str| match (me.encryption, host_encryption[h]) {
        (Encryption::None, Encryption::None) => VTEP_F_ALLOWED,
        (Encryption::Ipsec, Encryption::Ipsec) => {
            VTEP_F_ALLOWED | VTEP_F_ENCRYPTED | VTEP_F_DECRYPTED
        }
        _ => VTEP_F_ALLOWED | VTEP_F_ENCRYPTED,
    };
    let nets: BTreeMap<&str, &Network> =
        snap.networks.iter().map(|n| (n.name.as_str(), n)).collect();

    let mut out = Compiled::default();
    let t = &mut out.tables;
    t.config = HostConfig {
        vtep: me.underlay_ip.octets(),
        uplink_ifindex,
        policy_epoch: 0,
        frag_tenant_quota: 0,
    };

    // Local ports with an interface, keeping the slot (and so the counters)
    // each already had.
    let mut local: BTreeMap<&str, (Iface, u32)> = BTreeMap::new();
    let mut used_slots = BTreeSet::new();
    let mut fresh = Vec::new();
    for p in snap.ports.iter().filter(|p| p.host == host) {
        match resolve(&p.interface) {
            Some(iface) if iface.ifindex == uplink_ifindex || iface.host_device => {
                let why = if iface.ifindex == uplink_ifindex {
                    "is the uplink"
                } else {
                    "is a host device, not a VM's tap"
                };
                out.refused
                    .push((p.name.clone(), format!("interface {} {why}", p.interface)));
            }
            Some(iface) => match previous.get(&iface.ifindex).map(|p| p.slot) {
                Some(slot) if used_slots.insert(slot) => {
                    local.insert(&p.name, (iface, slot));
                }
                _ => fresh.push((p, iface)),
            },
            None => out.pending.push(p.name.clone()),
        }
    }
    let mut next = 0u32;
    for (p, iface) in fresh {
        while used_slots.contains(&next) {
            next += 1;
        }
        used_slots.insert(next);
        local.insert(&p.name, (iface, next));
    }

    // Networks this host takes part in: those with a port attached here,
    // and the other networks of their routers (routed to from here).
    let active = snap.with_routed(
        snap.ports
            .iter()
            .filter(|p| local.contains_key(p.name.as_str()))
            .map(|p| p.network.as_str()),
    );

    // Conntrack shares: each tenant on this host an equal part of the table
    // (see port_share for its ports).
    let mut tenant_ports: BTreeMap<&str, u32> = BTreeMap::new();
    for p in snap
        .ports
        .iter()
        .filter(|p| local.contains_key(p.name.as_str()))
    {
        *tenant_ports
            .entry(nets[p.network.as_str()].tenant.as_str())
            .or_default() += 1;
    }
    let usable = ct_usable(ct_capacity);
    let tenants = (tenant_ports.len() as u32).max(1);
    let tenant_quota = (usable / tenants).min(limits.per_tenant);
    t.config.frag_tenant_quota = ct_usable(MAX_FRAGMENTS) / tenants;
    // A tenant keeps the index its ports had (its counters are charged
    // there): a tenant arriving or leaving moves no other tenant's flows.
    let mut tenant_index: BTreeMap<&str, u32> = BTreeMap::new();
    for p in snap.ports.iter().filter(|p| p.host == host) {
        let tenant = nets[p.network.as_str()].tenant.as_str();
        let Some(&(iface, _)) = local.get(p.name.as_str()) else {
            continue;
        };
        if let Some(old) = previous.get(&iface.ifindex) {
            if !tenant_index.contains_key(tenant)
                && !tenant_index.values().any(|i| *i == old.tenant)
            {
                tenant_index.insert(tenant, old.tenant);
            }
        }
    }
    // A new tenant takes an index no port had before if there is one: the
    // counters of a tenant that just left are purged only after the writes.
    let taken: BTreeSet<u32> = tenant_index.values().copied().collect();
    let before: BTreeSet<u32> = previous.values().map(|p| p.tenant).collect();
    let mut free = (0..MAX_TENANTS)
        .filter(|i| !taken.contains(i) && !before.contains(i))
        .chain((0..MAX_TENANTS).filter(|i| !taken.contains(i) && before.contains(i)));
    for t in tenant_ports.keys() {
        if !tenant_index.contains_key(t) {
            tenant_index.insert(
                t,
                free.next()
                    .expect("the validator bounds the tenants of a host"),
            );
        }
    }

    // Policies: one per distinct set of groups among local ports with port
    // security, keeping the id a port already had where its set kept one.
    let mut sets: BTreeMap<&str, PolicySet> = BTreeMap::new();
    for p in snap.ports.iter().filter(|p| p.port_security) {
        if local.contains_key(p.name.as_str()) {
            sets.insert(&p.name, crate::policy::policy_set(p));
        }
    }
    let mut policies: BTreeMap<u32, PolicySet> = BTreeMap::new();
    let mut policy_of: BTreeMap<PolicySet, u32> = BTreeMap::new();
    for (name, set) in &sets {
        let ifindex = local[name].0.ifindex;
        if let Some(old) = previous.get(&ifindex).map(|p| p.policy) {
            if old != 0 && !policies.contains_key(&old) && !policy_of.contains_key(set) {
                policies.insert(old, set.clone());
                policy_of.insert(set.clone(), old);
            }
        }
    }
    let mut next_policy = 1u32;
    for set in sets.values() {
        if policy_of.contains_key(set) {
            continue;
        }
        while policies.contains_key(&next_policy) {
            next_policy += 1;
        }
        policies.insert(next_policy, set.clone());
        policy_of.insert(set.clone(), next_policy);
    }
    t.sg = crate::policy::compile(snap, &policies);

    for p in &snap.ports {
        if !active.contains(p.network.as_str()) {
            continue;
        }
        let net = nets[p.network.as_str()];
        let vni = net.vni;
        let first_of_network = t
            .networks
            .insert(
                vni,
                NetworkInfo {
                    mtu: net.mtu,
                    _reserved: 0,
                },
            )
            .is_none();
        if first_of_network {
            // The gateway answers for its addresses, its link-local one
            // (the source of its router advertisements) and the metadata
            // address: VMs resolve them to its MAC.
            let gw = MacAddr(gateway_mac(vni));
            let entry = NeighbourEntry {
                mac: gw.0,
                _pad: [0; 2],
            };
            for ip in net
                .gateway_ips
                .iter()
                .copied()
                .chain([IpAddr::V4(METADATA_IP.into()), IpAddr::V6(gw.link_local())])
            {
                t.neighbours.insert(
                    NeighbourKey {
                        vni,
                        addr: ip16(ip),
                    },
                    entry,
                );
            }
        }
        let neighbour = NeighbourEntry {
            mac: p.mac.0,
            _pad: [0; 2],
        };
        for ip in p
            .ips
            .iter()
            .copied()
            .chain([IpAddr::V6(p.mac.link_local())])
        {
            t.neighbours.insert(
                NeighbourKey {
                    vni,
                    addr: ip16(ip),
                },
                neighbour,
            );
        }
        let fkey = ForwardKey {
            vni,
            mac: p.mac.0,
            _pad: [0; 2],
        };
        if p.host == host {
            let Some(&(iface, slot)) = local.get(p.name.as_str()) else {
                continue; // pending: nothing can be delivered to it yet
            };
            let mut flags = 0;
            if p.port_security {
                flags |= PORT_F_SECURITY;
            }
            if iface.veth {
                flags |= PORT_F_VETH;
            }
            if net.dhcp {
                flags |= PORT_F_DHCP;
            }
            t.forward.insert(
                fkey,
                ForwardEntry {
                    kind: FWD_LOCAL,
                    ifindex: iface.ifindex,
                    slot,
                    flags,
                    vtep: [0; 4],
                },
            );
            t.ports.insert(
                iface.ifindex,
                PortInfo {
                    vni,
                    slot,
                    flags,
                    mtu: net.mtu,
                    mac: p.mac.0,
                    _pad: [0; 2],
                    policy: sets.get(p.name.as_str()).map_or(0, |s| policy_of[s]),
                    tenant: tenant_index[net.tenant.as_str()],
                    ct_port_quota: port_share(tenant_quota, tenant_ports[net.tenant.as_str()])
                        .min(limits.per_port),
                    ct_tenant_quota: tenant_quota,
                },
            );
            out.local_ports.push(LocalPort {
                name: p.name.clone(),
                interface: p.interface.clone(),
                ifindex: iface.ifindex,
                slot,
            });
            if p.port_security {
                for (net, mac) in own_addresses(p) {
                    t.addr_allow.insert(
                        addr_key(iface.ifindex, net),
                        AddrAllow {
                            mac: mac.0,
                            _pad: [0; 2],
                        },
                    );
                }
            }
        } else {
            let vtep = host_ip[p.host.as_str()];
            t.forward.insert(
                fkey,
                ForwardEntry {
                    kind: FWD_REMOTE,
                    ifindex: 0,
                    slot: 0,
                    flags: to_host(&p.host) | if p.port_security { PORT_F_SECURITY } else { 0 },
                    vtep,
                },
            );
            if p.port_security {
                // Where its frames may come from at decapsulation: its own
                // addresses, as its host's anti-spoofing has them.
                for (net, mac) in own_addresses(p) {
                    t.remote_allow.insert(
                        remote_key(vni, net),
                        AddrAllow {
                            mac: mac.0,
                            _pad: [0; 2],
                        },
                    );
                }
            }
        }
    }
    // Who may send VXLAN into each network: the hosts with a port in it or,
    // routed, in another network of its router.
    let router_of = snap.router_of();
    let mut hosts_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for p in &snap.ports {
        hosts_of
            .entry(p.network.as_str())
            .or_default()
            .insert(p.host.as_str());
    }
    for n in active
        .iter()
        .filter(|n| t.networks.contains_key(&nets[*n].vni))
    {
        let group: Vec<&str> = match router_of.get(n) {
            Some(r) => r.networks.iter().map(String::as_str).collect(),
            None => vec![n],
        };
        for h in group
            .iter()
            .flat_map(|m| hosts_of.get(m).into_iter().flatten())
        {
            if *h != host {
                t.vteps.insert(
                    VtepKey {
                        vni: nets[n].vni,
                        addr: host_ip[h],
                    },
                    vtep_flags(h),
                );
            }
        }
    }

    // The routers of those networks: their interfaces and routes.
    let routers: Vec<&Router> = snap
        .routers
        .iter()
        .filter(|r| r.networks.iter().any(|n| active.contains(n.as_str())))
        .collect();
    let ids = router_ids(routers.iter().map(|r| r.name.as_str()));
    for r in routers {
        let id = ids[r.name.as_str()];
        for n in r.networks.iter().map(|n| nets[n.as_str()]) {
            let mut rif = RouterIface {
                router: id,
                flags: if r.snat { RIF_F_SNAT } else { 0 },
                gw4: [0; 4],
                gw6: [0; 16],
            };
            for gw in &n.gateway_ips {
                match gw {
                    IpAddr::V4(a) => {
                        rif.flags |= RIF_F_V4;
                        rif.gw4 = a.octets();
                    }
                    IpAddr::V6(a) => {
                        rif.flags |= RIF_F_V6;
                        rif.gw6 = a.octets();
                    }
                }
            }
            t.router_ifaces.insert(n.vni, rif);
            for sn in &n.subnets {
                t.routes.insert(
                    route_key(id, sn.trunc()),
                    RouteEntry {
                        vni: n.vni,
                        mtu: n.mtu,
                    },
                );
            }
        }
    }
    // Floating IPs of this host's attached ports.
    t.external_ip = me.external_ip.map_or([0; 4], |ip| ip.octets());
    for f in &snap.floating_ips {
        let Some(p) = snap.ports.iter().find(|p| p.name == f.port) else {
            continue;
        };
        let (Some(&(iface, _)), Some(r)) = (
            local.get(p.name.as_str()),
            router_of.get(p.network.as_str()),
        ) else {
            continue;
        };
        let Some(IpAddr::V4(inner)) = p.ips.iter().find(|ip| ip.is_ipv4()) else {
            continue;
        };
        let inner = inner.octets();
        t.fips.insert(
            f.ip.octets(),
            FloatingIn {
                ifindex: iface.ifindex,
                inner,
                zone: ROUTER_ZONE | ids[r.name.as_str()],
            },
        );
        t.port_fips.insert(
            iface.ifindex,
            FloatingOut {
                ip: f.ip.octets(),
                inner,
            },
        );
    }
    out.local_ports.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        serde_json::from_str(
            r#"{"hosts":[{"name":"hv1","underlay_ip":"192.0.2.1"},{"name":"hv2","underlay_ip":"192.0.2.2"}],
                "networks":[{"name":"n","tenant":"t","vni":7,"subnets":["10.0.0.0/24"]}],
                "ports":[{"name":"p1","network":"n","host":"hv1","interface":"tap1","mac":"02:00:00:00:00:01","ips":["10.0.0.1"],
                          "allowed_address_pairs":[{"ip":"10.0.0.128/25"}]},
                         {"name":"p2","network":"n","host":"hv2","interface":"tap2","mac":"02:00:00:00:00:02","ips":["10.0.0.2"]},
                         {"name":"p3","network":"n","host":"hv1","interface":"missing","mac":"02:00:00:00:00:03","ips":["10.0.0.3"]}]}"#,
        )
        .unwrap()
    }

    /// This host (hv1) compiled with `prev` as the kernel's ports.
    fn compiled(
        s: &Snapshot,
        prev: &BTreeMap<u32, PortInfo>,
        limits: ConntrackLimits,
    ) -> Result<Compiled, Error> {
        let valid = crate::validate::validate(s.clone()).expect("a valid snapshot");
        compile(&valid, "hv1", 2, resolve, prev, limits, MAX_CONNTRACK)
    }

    fn resolve(name: &str) -> Option<Iface> {
        (name == "tap1").then_some(Iface {
            ifindex: 10,
            veth: true,
            host_device: false,
        })
    }

    fn fkey(last: u8) -> ForwardKey {
        ForwardKey {
            vni: 7,
            mac: [2, 0, 0, 0, 0, last],
            _pad: [0; 2],
        }
    }

    #[test]
    fn compiles_local_remote_and_pending_ports() {
        let c = compiled(&snap(), &BTreeMap::new(), ConntrackLimits::default()).unwrap();
        assert_eq!(c.pending, vec!["p3".to_string()]);
        assert_eq!(c.tables.config.vtep, [192, 0, 2, 1]);
        assert_eq!(c.tables.ports[&10].vni, 7);
        assert_eq!(
            c.tables.ports[&10].flags,
            PORT_F_SECURITY | PORT_F_VETH | PORT_F_DHCP
        );
        // The gateway answers for the metadata address.
        let metadata = NeighbourKey {
            vni: 7,
            addr: ip16(IpAddr::V4(METADATA_IP.into())),
        };
        assert_eq!(c.tables.neighbours[&metadata].mac, gateway_mac(7));
        let remote = c.tables.forward[&fkey(2)];
        assert_eq!((remote.kind, remote.vtep), (FWD_REMOTE, [192, 0, 2, 2]));
        assert!(c.tables.vteps.contains_key(&VtepKey {
            vni: 7,
            addr: [192, 0, 2, 2]
        }));
        // Own address, link-local, and the pair's /25.
        assert_eq!(c.tables.addr_allow.len(), 3);
        assert!(c
            .tables
            .addr_allow
            .contains_key(&addr_key(10, "10.0.0.128/25".parse().unwrap())));
        // A pending port is known to ARP but gets no forwarding entry.
        let addr = ip16("10.0.0.3".parse().unwrap());
        assert!(c
            .tables
            .neighbours
            .contains_key(&NeighbourKey { vni: 7, addr }));
        assert!(!c.tables.forward.contains_key(&fkey(3)));
    }

    #[test]
    fn keeps_the_slot_a_port_had() {
        let mut info = compiled(&snap(), &BTreeMap::new(), ConntrackLimits::default())
            .unwrap()
            .tables
            .ports[&10];
        info.slot = 5;
        let prev = BTreeMap::from([(10, info)]);
        let c = compiled(&snap(), &prev, ConntrackLimits::default()).unwrap();
        assert_eq!(c.local_ports[0].slot, 5);
    }

    #[test]
    fn a_host_without_ports_programs_no_network() {
        let mut s = snap();
        s.ports.retain(|p| p.host != "hv1");
        let c = compiled(&s, &BTreeMap::new(), ConntrackLimits::default()).unwrap();
        assert!(c.tables.networks.is_empty() && c.tables.forward.is_empty());
    }

    #[test]
    fn policies_are_shared_and_kept_and_quotas_split_per_tenant() {
        let mut s = snap();
        s.security_groups = serde_json::from_value(serde_json::json!([
            {"name": "g", "tenant": "t", "rules": [{"direction": "egress"}]}]))
        .unwrap();
        s.ports[0].security_groups = vec!["g".into()];
        let c = compiled(&s, &BTreeMap::new(), ConntrackLimits::default()).unwrap();
        let info = c.tables.ports[&10];
        assert_eq!(info.policy, 1);
        assert_eq!(
            (info.ct_tenant_quota, info.ct_port_quota),
            (ct_usable(MAX_CONNTRACK), ct_usable(MAX_CONNTRACK))
        );
        assert_eq!(c.tables.sg.addrs.len(), 1, "one remote prefix: any");
        // A port keeps its policy id across compiles.
        let mut prev_info = info;
        prev_info.policy = 7;
        let again = compiled(
            &s,
            &BTreeMap::from([(10, prev_info)]),
            ConntrackLimits::default(),
        )
        .unwrap();
        assert_eq!(again.tables.ports[&10].policy, 7);
        let limited = compiled(
            &s,
            &BTreeMap::new(),
            ConntrackLimits {
                per_port: 5,
                per_tenant: 100,
            },
        )
        .unwrap();
        assert_eq!(
            (
                limited.tables.ports[&10].ct_tenant_quota,
                limited.tables.ports[&10].ct_port_quota
            ),
            (100, 5)
        );
        assert_eq!(port_share(100, 1), 100);
        assert_eq!(port_share(100, 3), 75);
    }

    #[test]
    fn a_router_brings_its_other_networks_their_routes_and_senders() {
        let mut s = snap();
        s.networks[0].gateway_ips = vec!["10.0.0.254".parse().unwrap()];
        s.networks.push(
            serde_json::from_value(serde_json::json!({"name": "db", "tenant": "t", "vni": 8,
                "subnets": ["10.1.0.0/24", "fd00:8::/64"], "gateway_ips": ["10.1.0.1", "fd00:8::1"], "mtu": 1400}))
            .unwrap(),
        );
        // db's only port is on hv2, with no port of n there... but p2 is.
        s.ports.push(
            serde_json::from_value(
                serde_json::json!({"name": "d", "network": "db", "host": "hv2",
                "interface": "tapd", "mac": "02:00:00:00:01:01", "ips": ["10.1.0.5"]}),
            )
            .unwrap(),
        );
        let before = compiled(&s, &BTreeMap::new(), ConntrackLimits::default()).unwrap();
        assert!(before.tables.routes.is_empty() && before.tables.router_ifaces.is_empty());
        assert!(
            !before.tables.networks.contains_key(&8),
            "db is not this host's business"
        );
        s.routers = vec![serde_json::from_value(
            serde_json::json!({"name": "r", "tenant": "t", "networks": ["n", "db"]}),
        )
        .unwrap()];
        let c = compiled(&s, &BTreeMap::new(), ConntrackLimits::default()).unwrap();
        let t = &c.tables;
        let id = router_ids(["r"])["r"];
        assert_eq!(t.router_ifaces.len(), 2);
        let db = t.router_ifaces[&8];
        assert_eq!(
            (db.router, db.flags, db.gw4),
            (id, RIF_F_V4 | RIF_F_V6, [10, 1, 0, 1])
        );
        assert_eq!(t.router_ifaces[&7].flags, RIF_F_V4);
        assert_eq!(t.routes.len(), 3, "10.0.0.0/24, 10.1.0.0/24, fd00:8::/64");
        assert_eq!(
            t.routes[&route_key(id, "10.1.0.0/24".parse().unwrap())],
            RouteEntry { vni: 8, mtu: 1400 }
        );
        // d is reachable from here: its forwarding and neighbour entries,
        // and hv2 may send into n (routed from db) and into db.
        let d = ForwardKey {
            vni: 8,
            mac: [2, 0, 0, 0, 1, 1],
            _pad: [0; 2],
        };
        assert_eq!(t.forward[&d].kind, FWD_REMOTE);
        for vni in [7, 8] {
            assert!(t.vteps.contains_key(&VtepKey {
                vni,
                addr: [192, 0, 2, 2]
            }));
        }
        // Ids are a function of the names alone, distinct, never 0 and
        // never with the zone bit.
        let ids = router_ids(["a", "b", "c", "r"]);
        assert_eq!(ids["r"], id);
        let set: BTreeSet<u32> = ids.values().copied().collect();
        assert_eq!(set.len(), 4);
        assert!(set.iter().all(|i| *i != 0 && i & ROUTER_ZONE == 0));
    }

    #[test]
    fn a_floating_ip_is_where_its_port_is() {
        let mut s = snap();
        s.networks[0].gateway_ips = vec!["10.0.0.254".parse().unwrap()];
        s.hosts[0].external_ip = Some("198.51.100.11".parse().unwrap());
        s.routers = vec![serde_json::from_value(
            serde_json::json!({"name": "r", "tenant": "t", "networks": ["n"], "snat": true}),
        )
        .unwrap()];
        s.floating_ips = vec![serde_json::from_value(
            serde_json::json!({"name": "f", "tenant": "t", "ip": "198.51.100.20", "port": "p1"}),
        )
        .unwrap()];
        let c = compiled(&s, &BTreeMap::new(), ConntrackLimits::default()).unwrap();
        let t = &c.tables;
        assert_eq!(t.external_ip, [198, 51, 100, 11]);
        let fip = t.fips[&[198, 51, 100, 20]];
        assert_eq!((fip.ifindex, fip.inner), (10, [10, 0, 0, 1]));
        assert_eq!(fip.zone, ROUTER_ZONE | router_ids(["r"])["r"]);
        assert_eq!(t.port_fips[&10].ip, [198, 51, 100, 20]);
        assert_eq!(t.router_ifaces[&7].flags & RIF_F_SNAT, RIF_F_SNAT);
        // p1 moves to hv2: its floating IP goes with it.
        s.ports[0].host = "hv2".into();
        let c = compiled(&s, &BTreeMap::new(), ConntrackLimits::default()).unwrap();
        assert!(c.tables.fips.is_empty() && c.tables.port_fips.is_empty());
        let valid = crate::validate::validate(s).unwrap();
        let hv2 = compile(
            &valid,
            "hv2",
            2,
            |n| {
                (n == "tap1").then_some(Iface {
                    ifindex: 20,
                    veth: true,
                    host_device: false,
                })
            },
            &BTreeMap::new(),
            ConntrackLimits::default(),
            MAX_CONNTRACK,
        )
        .unwrap();
        assert_eq!(hv2.tables.fips[&[198, 51, 100, 20]].ifindex, 20);
        assert_eq!(hv2.tables.external_ip, [0; 4], "hv2 has no external IP");
    }

    #[test]
    fn mac_addresses_parse_and_print() {
        let m: MacAddr = "02:aB:00:00:00:ff".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:00:00:00:ff");
        for bad in [
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "zz:00:00:00:00:00",
            "2:00:00:00:00:00",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(m.link_local().to_string(), "fe80::ab:ff:fe00:ff");
    }
}
