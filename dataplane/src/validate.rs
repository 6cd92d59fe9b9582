//! The one check of a desired state. API objects go in; a [`Valid`]
//! snapshot comes out, which only this module can make and which nothing
//! downstream checks again: the compiler and the map writer take it as it
//! is. A violation says what is wrong and its [`Class`]; the API maps the
//! class to its answer (400 or 409), `cloison-dp` prints the message.
//!
//! Besides the objects themselves and their references, it checks what
//! every host can hold: a state it accepts compiles, on every host, into
//! tables that fit the maps (`capacity`; a property test holds the two
//! together).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    ops::Deref,
    sync::Arc,
};

use cloison_abi::*;

use crate::{policy, snapshot::*};

/// What kind of wrong a violation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The object itself is malformed (a field out of range, a bad name).
    Invalid,
    /// It conflicts with other objects: a duplicate, a reference to a
    /// missing object or to another tenant's.
    Conflict,
    /// It does not fit what a host's tables hold.
    Capacity,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Violation {
    pub class: Class,
    pub message: String,
}

fn invalid<T>(message: String) -> Result<T, Violation> {
    Err(Violation {
        class: Class::Invalid,
        message,
    })
}

fn conflict<T>(message: String) -> Result<T, Violation> {
    Err(Violation {
        class: Class::Conflict,
        message,
    })
}

fn capacity<T>(message: String) -> Result<T, Violation> {
    Err(Violation {
        class: Class::Capacity,
        message,
    })
}

/// A snapshot that passed [`validate`]. Cheap to clone (shared).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Valid(Arc<Snapshot>);

impl Deref for Valid {
    type Target = Snapshot;
    fn deref(&self) -> &Snapshot {
        &self.0
    }
}

impl Valid {
    pub fn snapshot(&self) -> &Snapshot {
        &self.0
    }
}

/// Names of objects and tenants: 1-63 characters of `[a-z0-9-]`.
pub fn check_name(what: &str, name: &str) -> Result<(), Violation> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return invalid(format!(
            "{what} name {name:?} is not 1-63 characters of [a-z0-9-]"
        ));
    }
    Ok(())
}

/// Per-object limits (docs/api.md): one object never holds more. With the
/// host capacities below them, one tenant's state cannot fill what other
/// tenants' need on a host.
pub const MAX_RULES_PER_GROUP: usize = 1000;
pub const MAX_GROUPS_PER_PORT: usize = 16;
pub const MAX_IPS_PER_PORT: usize = 16;
pub const MAX_PAIRS_PER_PORT: usize = 16;
pub const MAX_SUBNETS_PER_NETWORK: usize = 16;

/// `::ffff:0:0/96`, where the dataplane keeps IPv4 addresses: no IPv6
/// address, subnet or pair of the API may touch it (a pair covering it
/// would allow every IPv4 source).
fn touches_v4_mapped(net: &ipnet::IpNet) -> bool {
    let mapped: ipnet::IpNet = "::ffff:0:0/96".parse().expect("literal");
    matches!(net, ipnet::IpNet::V6(_)) && (net.contains(&mapped) || mapped.contains(net))
}

/// Smallest network MTU: room for an ICMP error's quote (see icmp.rs) and
/// what IPv4 hosts must accept.
pub const MIN_MTU: u32 = 576;
/// Largest: a 9000-byte jumbo underlay minus the VXLAN overhead.
pub const MAX_MTU: u32 = 8950;

/// Largest MTU of a network with a port on an ipsec host: its VXLAN
/// (the frame and 50 bytes) must fit the IPsec device, whose packets
/// strongSwan's kernel-libipsec takes up to 1400 bytes (a size fixed when
/// it was built; an XFRM interface would take more).
pub const MAX_MTU_IPSEC: u32 = 1350;

/// Checks `snap` whole: every object, every reference, and every host's
/// capacity. The first violation found is returned.
pub fn validate(snap: Snapshot) -> Result<Valid, Violation> {
    check_objects(&snap)?;
    check_capacity(&snap)?;
    Ok(Valid(Arc::new(snap)))
}

// Hash maps where the keys are many (ports' names, addresses, interfaces):
// the first violation found is the same, in the snapshot's order.
fn check_objects(s: &Snapshot) -> Result<(), Violation> {
    let mut hosts = HashSet::with_capacity(s.hosts.len());
    let mut underlay = HashMap::with_capacity(s.hosts.len());
    let mut external = HashMap::new();
    for h in &s.hosts {
        check_name("host", &h.name)?;
        if !hosts.insert(h.name.as_str()) {
            return conflict(format!("host {} given twice", h.name));
        }
        if let Some(other) = underlay.insert(h.underlay_ip, &h.name) {
            return conflict(format!(
                "host {}: underlay IP {} is already host {other}'s",
                h.name, h.underlay_ip
            ));
        }
        if let Some(ip) = h.external_ip {
            if !public_unicast(ip) {
                return invalid(format!(
                    "host {}: external IP {ip} is not a unicast address",
                    h.name
                ));
            }
            if let Some(other) = external.insert(ip, &h.name) {
                return conflict(format!(
                    "host {}: external IP {ip} is already host {other}'s",
                    h.name
                ));
            }
        }
    }
    let mut vnis = HashMap::with_capacity(s.networks.len());
    let mut nets = HashMap::with_capacity(s.networks.len());
    for n in &s.networks {
        check_name("network", &n.name)?;
        check_name("tenant", &n.tenant)?;
        if n.vni == 0 || n.vni > 0xff_ffff {
            return invalid(format!(
                "network {}: VNI {} is not 1-16777215",
                n.name, n.vni
            ));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&n.mtu) {
            return invalid(format!(
                "network {}: MTU {} is not {MIN_MTU}-{MAX_MTU}",
                n.name, n.mtu
            ));
        }
        if n.subnets.len() > MAX_SUBNETS_PER_NETWORK {
            return invalid(format!(
                "network {}: {} subnets, at most {MAX_SUBNETS_PER_NETWORK}",
                n.name,
                n.subnets.len()
            ));
        }
        if let Some(sn) = n.subnets.iter().find(|sn| touches_v4_mapped(sn)) {
            return invalid(format!(
                "network {}: subnet {sn} overlaps ::ffff:0:0/96 (IPv4-mapped)",
                n.name
            ));
        }
        check_services(n)?;
        if let Some(other) = vnis.insert(n.vni, &n.name) {
            return conflict(format!(
                "network {}: VNI {} is already network {other}'s",
                n.name, n.vni
            ));
        }
        if nets.insert(n.name.as_str(), n).is_some() {
            return conflict(format!("network {} given twice", n.name));
        }
    }
    check_routers(s, &nets)?;
    let mut groups = HashMap::with_capacity(s.security_groups.len());
    for g in &s.security_groups {
        check_name("security group", &g.name)?;
        check_name("tenant", &g.tenant)?;
        if g.rules.len() > MAX_RULES_PER_GROUP {
            return invalid(format!(
                "security group {}: {} rules, at most {MAX_RULES_PER_GROUP}",
                g.name,
                g.rules.len()
            ));
        }
        if groups.insert(g.name.as_str(), g).is_some() {
            return conflict(format!("security group {} given twice", g.name));
        }
    }
    for g in &s.security_groups {
        g.check_rules(&groups).map_err(|e| match e {
            RulesError::Invalid(message) => Violation {
                class: Class::Invalid,
                message,
            },
            RulesError::Reference(message) => Violation {
                class: Class::Conflict,
                message,
            },
        })?;
    }
    let ipsec_hosts: HashSet<&str> = s
        .hosts
        .iter()
        .filter(|h| h.encryption == crate::snapshot::Encryption::Ipsec)
        .map(|h| h.name.as_str())
        .collect();
    let n = s.ports.len();
    let mut names = HashSet::with_capacity(n);
    let mut macs = HashMap::with_capacity(n);
    let mut ips = HashMap::with_capacity(n);
    let mut interfaces = HashMap::with_capacity(n);
    for p in &s.ports {
        check_name("port", &p.name)?;
        if !names.insert(p.name.as_str()) {
            return conflict(format!("port {} given twice", p.name));
        }
        if p.interface.is_empty()
            || p.interface.len() > 15
            || p.interface.contains(['/', ' ', '\0', ':'])
            || p.interface == "."
            || p.interface == ".."
        {
            return invalid(format!(
                "port {}: {:?} is not an interface name",
                p.name, p.interface
            ));
        }
        if p.interface == "lo" {
            return invalid(format!(
                "port {}: lo is the host's loopback, not a port",
                p.name
            ));
        }
        if ipsec_hosts.contains(p.host.as_str()) {
            if let Some(n) = s
                .networks
                .iter()
                .find(|n| n.name == p.network && n.mtu > MAX_MTU_IPSEC)
            {
                return conflict(format!(
                    "port {}: network {} has MTU {}, and host {} encrypts (ipsec): a network with ports on ipsec hosts has an MTU of at most {MAX_MTU_IPSEC} (ESP's device takes 1400 bytes, VXLAN adds 50)",
                    p.name, n.name, n.mtu, p.host
                ));
            }
        }
        // One interface, one port (of whichever tenant).
        if let Some(other) = interfaces.insert((p.host.as_str(), p.interface.as_str()), &p.name) {
            return conflict(format!(
                "port {}: interface {} of host {} is already port {other}'s",
                p.name, p.interface, p.host
            ));
        }
        for (what, n, max) in [
            ("IPs", p.ips.len(), MAX_IPS_PER_PORT),
            (
                "allowed address pairs",
                p.allowed_address_pairs.len(),
                MAX_PAIRS_PER_PORT,
            ),
            (
                "security groups",
                p.security_groups.len(),
                MAX_GROUPS_PER_PORT,
            ),
        ] {
            if n > max {
                return invalid(format!("port {}: {n} {what}, at most {max}", p.name));
            }
        }
        for pair in &p.allowed_address_pairs {
            if touches_v4_mapped(&pair.ip) {
                return invalid(format!(
                    "port {}: allowed pair {} overlaps ::ffff:0:0/96 (IPv4-mapped)",
                    p.name, pair.ip
                ));
            }
            if let Some(mac) = pair.mac {
                if !mac.is_unicast() {
                    return invalid(format!(
                        "port {}: allowed pair {}: MAC {mac} is not unicast",
                        p.name, pair.ip
                    ));
                }
            }
        }
        if !p.mac.is_unicast() {
            return invalid(format!("port {}: MAC {} is not unicast", p.name, p.mac));
        }
        if !p.port_security && !p.security_groups.is_empty() {
            return invalid(format!(
                "port {}: security groups need port_security",
                p.name
            ));
        }
        let Some(net) = nets.get(p.network.as_str()) else {
            return conflict(format!("port {}: no network {}", p.name, p.network));
        };
        if !hosts.contains(p.host.as_str()) {
            return conflict(format!("port {}: no host {}", p.name, p.host));
        }
        if let Some(h) = &p.hostname {
            check_hostname(&p.name, h)?;
        }
        if let Some(id) = &p.instance_id {
            let ok = (1..=255).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
            if !ok {
                return invalid(format!(
                    "port {}: instance_id {id:?} is not 1-255 characters of [A-Za-z0-9._:-]",
                    p.name
                ));
            }
        }
        if p.mac.0 == cloison_abi::gateway_mac(net.vni) {
            return conflict(format!(
                "port {}: MAC {} is the gateway MAC of {}",
                p.name, p.mac, net.name
            ));
        }
        for ip in &p.ips {
            if *ip == IpAddr::V4(cloison_abi::METADATA_IP.into()) {
                return conflict(format!(
                    "port {}: {ip} is the metadata service's address",
                    p.name
                ));
            }
            if net.gateway_ips.contains(ip) {
                return conflict(format!(
                    "port {}: {ip} is the gateway of {}",
                    p.name, net.name
                ));
            }
            if !net.subnets.iter().any(|sn| sn.contains(ip)) {
                return invalid(format!(
                    "port {}: {ip} is outside the subnets of {}",
                    p.name, net.name
                ));
            }
            if let Some(other) = ips.insert((net.vni, *ip), &p.name) {
                return conflict(format!(
                    "port {}: {ip} is already port {other}'s in {}",
                    p.name, net.name
                ));
            }
        }
        if let Some(other) = macs.insert((net.vni, p.mac), &p.name) {
            return conflict(format!(
                "port {}: MAC {} is already port {other}'s in {}",
                p.name, p.mac, net.name
            ));
        }
        p.check_groups(&net.tenant, &net.name, &groups)
            .map_err(|message| Violation {
                class: Class::Conflict,
                message,
            })?;
    }
    check_floating_ips(s, &nets, &external)?;
    Ok(())
}

/// An address that may stand for a host or a VM outside: not unspecified,
/// loopback, multicast or broadcast.
fn public_unicast(ip: std::net::Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast())
}

/// Floating IPs: each of its port's tenant, for a port with an IPv4
/// address on a network joined by a router, one per port, none twice and
/// none a host's external IP.
fn check_floating_ips(
    s: &Snapshot,
    nets: &HashMap<&str, &Network>,
    external: &HashMap<std::net::Ipv4Addr, &String>,
) -> Result<(), Violation> {
    if s.floating_ips.is_empty() {
        return Ok(());
    }
    let ports: HashMap<&str, &Port> = s.ports.iter().map(|p| (p.name.as_str(), p)).collect();
    let routed: HashSet<&str> = s
        .routers
        .iter()
        .flat_map(|r| r.networks.iter().map(String::as_str))
        .collect();
    let (mut names, mut ips, mut of_port) = (HashSet::new(), HashMap::new(), HashMap::new());
    for f in &s.floating_ips {
        check_name("floating IP", &f.name)?;
        check_name("tenant", &f.tenant)?;
        if !names.insert(f.name.as_str()) {
            return conflict(format!("floating IP {} given twice", f.name));
        }
        if !public_unicast(f.ip) {
            return invalid(format!(
                "floating IP {}: {} is not a unicast address",
                f.name, f.ip
            ));
        }
        if let Some(other) = ips.insert(f.ip, &f.name) {
            return conflict(format!(
                "floating IP {}: {} is already floating IP {other}",
                f.name, f.ip
            ));
        }
        if let Some(h) = external.get(&f.ip) {
            return conflict(format!(
                "floating IP {}: {} is host {h}'s external IP",
                f.name, f.ip
            ));
        }
        let Some(p) = ports.get(f.port.as_str()) else {
            return conflict(format!("floating IP {}: no port {}", f.name, f.port));
        };
        let net = nets[p.network.as_str()];
        if net.tenant != f.tenant {
            return conflict(format!(
                "floating IP {}: port {} belongs to another tenant",
                f.name, f.port
            ));
        }
        if !p.ips.iter().any(IpAddr::is_ipv4) {
            return conflict(format!(
                "floating IP {}: port {} has no IPv4 address",
                f.name, f.port
            ));
        }
        if !routed.contains(net.name.as_str()) {
            return conflict(format!(
                "floating IP {}: network {} of port {} is on no router",
                f.name, net.name, f.port
            ));
        }
        if let Some(other) = of_port.insert(f.port.as_str(), &f.name) {
            return conflict(format!(
                "floating IP {}: port {} already has floating IP {other}",
                f.name, f.port
            ));
        }
    }
    Ok(())
}

/// Networks one router joins at most.
pub const MAX_NETWORKS_PER_ROUTER: usize = 64;

/// Routers: each joins existing networks of its own tenant, each network on
/// one router at most, with an address of the router (a gateway) in it, and
/// no two of its networks' subnets overlapping (an address is routed to one
/// network).
fn check_routers(s: &Snapshot, nets: &HashMap<&str, &Network>) -> Result<(), Violation> {
    let mut names = HashSet::new();
    let mut joined: HashMap<&str, &str> = HashMap::new();
    for r in &s.routers {
        check_name("router", &r.name)?;
        check_name("tenant", &r.tenant)?;
        if !names.insert(r.name.as_str()) {
            return conflict(format!("router {} given twice", r.name));
        }
        if r.networks.len() > MAX_NETWORKS_PER_ROUTER {
            return invalid(format!(
                "router {}: {} networks, at most {MAX_NETWORKS_PER_ROUTER}",
                r.name,
                r.networks.len()
            ));
        }
        let mut subnets: Vec<(&ipnet::IpNet, &str)> = Vec::new();
        for (i, n) in r.networks.iter().enumerate() {
            if r.networks[..i].contains(n) {
                return invalid(format!("router {}: network {n} given twice", r.name));
            }
            let Some(net) = nets.get(n.as_str()) else {
                return conflict(format!("router {}: no network {n}", r.name));
            };
            if net.tenant != r.tenant {
                return conflict(format!(
                    "router {}: network {n} belongs to another tenant",
                    r.name
                ));
            }
            if let Some(other) = joined.insert(n.as_str(), r.name.as_str()) {
                return conflict(format!(
                    "router {}: network {n} is already on router {other}",
                    r.name
                ));
            }
            if net.gateway_ips.is_empty() {
                return conflict(format!(
                    "router {}: network {n} has no gateway_ips (the router's addresses there)",
                    r.name
                ));
            }
            for sn in &net.subnets {
                if let Some((o, on)) = subnets
                    .iter()
                    .find(|(o, _)| o.contains(&sn.network()) || sn.contains(&o.network()))
                {
                    return conflict(format!(
                        "router {}: subnet {sn} of {n} overlaps {o} of {on}",
                        r.name
                    ));
                }
            }
            subnets.extend(net.subnets.iter().map(|sn| (sn, n.as_str())));
        }
    }
    Ok(())
}

pub const MAX_DNS_SERVERS: usize = 5;
pub const MAX_HOST_ROUTES: usize = 20;

/// A network's gateway services: its gateways, DNS servers and host routes.
fn check_services(n: &Network) -> Result<(), Violation> {
    let subnet_of = |ip: &IpAddr| n.subnets.iter().find(|sn| sn.contains(ip));
    let mut served = BTreeSet::new();
    for gw in &n.gateway_ips {
        let Some(sn) = subnet_of(gw) else {
            return invalid(format!(
                "network {}: gateway {gw} is outside its subnets",
                n.name
            ));
        };
        if !served.insert(sn) {
            return invalid(format!("network {}: two gateways in subnet {sn}", n.name));
        }
        if let ipnet::IpNet::V4(v4) = sn {
            if v4.prefix_len() <= 30
                && (IpAddr::V4(v4.network()) == *gw || IpAddr::V4(v4.broadcast()) == *gw)
            {
                return invalid(format!(
                    "network {}: gateway {gw} is the network or broadcast address of {sn}",
                    n.name
                ));
            }
        }
    }
    for (what, len, max) in [
        ("DNS servers", n.dns_servers.len(), MAX_DNS_SERVERS),
        ("host routes", n.host_routes.len(), MAX_HOST_ROUTES),
    ] {
        if len > max {
            return invalid(format!("network {}: {len} {what}, at most {max}", n.name));
        }
    }
    if let Some(d) = n.dns_servers.iter().find(|d| {
        d.is_unspecified() || d.is_multicast() || touches_v4_mapped(&ipnet::IpNet::from(**d))
    }) {
        return invalid(format!(
            "network {}: {d} is not a DNS server's address",
            n.name
        ));
    }
    for r in &n.host_routes {
        let (dst, hop) = (r.destination, r.nexthop);
        if dst != dst.trunc() || touches_v4_mapped(&dst) {
            return invalid(format!(
                "network {}: host route destination {dst} is not a network prefix",
                n.name
            ));
        }
        if dst.addr().is_ipv4() != hop.is_ipv4() || subnet_of(&hop).is_none() {
            return invalid(format!(
                "network {}: host route to {dst}: next hop {hop} is not on the network",
                n.name
            ));
        }
    }
    Ok(())
}

/// A host name: dot-separated labels of 1-63 `[A-Za-z0-9-]`, none at
/// either end of a label, 253 characters at most.
fn check_hostname(port: &str, h: &str) -> Result<(), Violation> {
    let ok = (1..=253).contains(&h.len())
        && h.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        return invalid(format!("port {port}: {h:?} is not a host name"));
    }
    Ok(())
}

/// What a host's tables would hold: an upper bound of each map's entries
/// (exact when every local port's interface exists; see the property test
/// against the compiler).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostLoad {
    pub ports: usize,
    pub tenants: usize,
    pub networks: usize,
    pub forward: usize,
    pub neighbours: usize,
    pub vteps: usize,
    pub addr_allow: usize,
    pub remote_allow: usize,
    pub sg_addrs: usize,
    pub sg_rules: usize,
    pub sg_port_sets: usize,
    pub router_ifaces: usize,
    pub routes: usize,
}

/// Neighbour entries a port brings: its IPs and its link-local address.
fn neighbour_entries(p: &Port) -> usize {
    let ll = IpAddr::V6(p.mac.link_local());
    p.ips.len() + usize::from(!p.ips.contains(&ll))
}

/// Every host's load. Per network, counts once; per distinct set of groups,
/// compiles once.
pub fn host_loads(s: &Snapshot) -> BTreeMap<&str, HostLoad> {
    let tenant_of: HashMap<&str, (&str, u32)> = s
        .networks
        .iter()
        .map(|n| (n.name.as_str(), (n.tenant.as_str(), n.vni)))
        .collect();
    #[derive(Default)]
    struct Net<'a> {
        ports: usize,
        neighbours: usize,
        /// Addresses of each host's ports with port security, and their sum.
        secured: HashMap<&'a str, usize>,
        secured_all: usize,
        hosts: HashSet<&'a str>,
    }
    let mut nets: HashMap<&str, Net> = HashMap::new();
    // The gateway's entries: its addresses, its link-local one, metadata.
    for n in &s.networks {
        nets.entry(n.name.as_str()).or_default().neighbours += n.gateway_ips.len() + 2;
    }
    for p in &s.ports {
        let n = nets.entry(p.network.as_str()).or_default();
        n.ports += 1;
        n.neighbours += neighbour_entries(p);
        n.hosts.insert(p.host.as_str());
        if p.port_security {
            let a = neighbour_entries(p) + p.allowed_address_pairs.len();
            *n.secured.entry(p.host.as_str()).or_default() += a;
            n.secured_all += a;
        }
    }
    let router_of = s.router_of();
    let subnets_of: HashMap<&str, usize> = s
        .networks
        .iter()
        .map(|n| (n.name.as_str(), n.subnets.len()))
        .collect();
    let compiler = policy::Compiler::new(s);
    let mut sg_size: BTreeMap<policy::PolicySet, (usize, usize, usize)> = BTreeMap::new();
    let mut out: BTreeMap<&str, HostLoad> = s
        .hosts
        .iter()
        .map(|h| (h.name.as_str(), HostLoad::default()))
        .collect();
    let mut local: HashMap<&str, Vec<&Port>> = HashMap::new();
    for p in &s.ports {
        local.entry(p.host.as_str()).or_default().push(p);
    }
    for (host, ports) in local {
        let Some(load) = out.get_mut(host) else {
            continue;
        };
        let own: BTreeSet<&str> = ports.iter().map(|p| p.network.as_str()).collect();
        let tenants: BTreeSet<&str> = own
            .iter()
            .filter_map(|n| tenant_of.get(n).map(|t| t.0))
            .collect();
        let sets: BTreeSet<policy::PolicySet> = ports
            .iter()
            .filter(|p| p.port_security)
            .map(|p| policy::policy_set(p))
            .collect();
        load.ports = ports.len();
        load.tenants = tenants.len();
        // Its networks and their routers' other networks (see tables.rs).
        let active = s.with_routed(own.iter().copied());
        for n in &active {
            if nets.get(n).is_none_or(|net| net.ports == 0) {
                continue;
            }
            if let Some(net) = nets.get(n) {
                load.networks += 1;
                load.forward += net.ports;
                load.neighbours += net.neighbours;
                load.remote_allow += net.secured_all - net.secured.get(host).copied().unwrap_or(0);
            }
            let senders: HashSet<&str> = match router_of.get(n) {
                Some(r) => r
                    .networks
                    .iter()
                    .filter_map(|m| nets.get(m.as_str()))
                    .flat_map(|m| m.hosts.iter().copied())
                    .collect(),
                None => nets.get(n).map(|net| net.hosts.clone()).unwrap_or_default(),
            };
            load.vteps += senders.len() - usize::from(senders.contains(host));
        }
        for r in s
            .routers
            .iter()
            .filter(|r| r.networks.iter().any(|n| active.contains(n.as_str())))
        {
            load.router_ifaces += r.networks.len();
            load.routes += r
                .networks
                .iter()
                .filter_map(|n| subnets_of.get(n.as_str()))
                .sum::<usize>();
        }
        load.addr_allow = ports
            .iter()
            .filter(|p| p.port_security)
            .map(|p| neighbour_entries(p) + p.allowed_address_pairs.len())
            .sum();
        for set in sets {
            let (a, r, ps) = *sg_size
                .entry(set.clone())
                .or_insert_with(|| compiler.size(&set));
            load.sg_addrs += a;
            load.sg_rules += r;
            load.sg_port_sets += ps;
        }
    }
    out
}

fn check_capacity(s: &Snapshot) -> Result<(), Violation> {
    for (host, l) in host_loads(s) {
        let limits: [(&str, usize, u32); 13] = [
            ("ports", l.ports, MAX_PORTS),
            ("tenants", l.tenants, MAX_TENANTS),
            ("networks", l.networks, MAX_NETWORKS),
            (
                "forwarding entries (ports of its networks)",
                l.forward,
                MAX_FORWARD,
            ),
            (
                "neighbour entries (addresses in its networks)",
                l.neighbours,
                MAX_NEIGHBOURS,
            ),
            ("(network, remote host) pairs", l.vteps, MAX_VTEPS),
            (
                "anti-spoofing entries (addresses of its ports)",
                l.addr_allow,
                MAX_ADDR_ALLOW,
            ),
            (
                "remote anti-spoofing entries (addresses of remote ports)",
                l.remote_allow,
                MAX_REMOTE_ALLOW,
            ),
            ("security-group address entries", l.sg_addrs, MAX_SG_ADDRS),
            ("security-group rule entries", l.sg_rules, MAX_SG_RULES),
            (
                "security-group port sets (protocols of a class)",
                l.sg_port_sets,
                MAX_SG_RULES,
            ),
            (
                "router interfaces (networks of its routers)",
                l.router_ifaces,
                MAX_NETWORKS,
            ),
            ("routes (subnets of its routers)", l.routes, MAX_ROUTES),
        ];
        for (what, n, max) in limits {
            if n > max as usize {
                return capacity(format!(
                    "host {host} would hold {n} {what}, more than the {max} it has room for"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(json: &str) -> Snapshot {
        serde_json::from_str(json).unwrap()
    }

    const BASE: &str = r#"{"hosts":[{"name":"hv1","underlay_ip":"192.0.2.1"},{"name":"hv2","underlay_ip":"192.0.2.2"}],
        "networks":[{"name":"n","tenant":"t","vni":7,"subnets":["10.0.0.0/24"]}],
        "security_groups":[{"name":"g","tenant":"t","rules":[{"direction":"ingress","remote":{"group":"g"}}]}],
        "ports":[{"name":"p1","network":"n","host":"hv1","interface":"tap1","mac":"02:00:00:00:00:01","ips":["10.0.0.1"],"security_groups":["g"]},
                 {"name":"p2","network":"n","host":"hv2","interface":"tap2","mac":"02:00:00:00:00:02","ips":["10.0.0.2"]}]}"#;

    fn class_of(s: Snapshot) -> Class {
        validate(s).unwrap_err().class
    }

    /// A change to a valid state, what it is, and the class it must be refused with.
    type Change = (&'static str, Class, fn(&mut Snapshot));

    /// BASE with a second network of tenant t and a router joining both.
    fn routed() -> Snapshot {
        let mut s = snap(BASE);
        s.networks[0].gateway_ips = vec!["10.0.0.254".parse().unwrap()];
        s.networks.push(
            serde_json::from_value(serde_json::json!({"name": "db", "tenant": "t", "vni": 8,
                "subnets": ["10.1.0.0/24"], "gateway_ips": ["10.1.0.1"]}))
            .unwrap(),
        );
        s.routers = vec![serde_json::from_value(
            serde_json::json!({"name": "r", "tenant": "t", "networks": ["n", "db"]}),
        )
        .unwrap()];
        s
    }

    #[test]
    fn routers_join_their_tenants_networks_once_without_overlaps() {
        assert!(validate(routed()).is_ok());
        let cases: [Change; 7] = [
            ("a missing network", Class::Conflict, |s| {
                s.routers[0].networks.push("nope".into())
            }),
            ("another tenant's network", Class::Conflict, |s| {
                s.networks[1].tenant = "u".into()
            }),
            ("a network on two routers", Class::Conflict, |s| {
                let mut r = s.routers[0].clone();
                r.name = "r2".into();
                r.networks = vec!["db".into()];
                s.routers.push(r);
            }),
            ("overlapping subnets", Class::Conflict, |s| {
                s.networks[1].subnets = vec!["10.0.0.0/16".parse().unwrap()];
                s.networks[1].gateway_ips = vec!["10.0.1.1".parse().unwrap()];
            }),
            ("a network without a gateway", Class::Conflict, |s| {
                s.networks[1].gateway_ips.clear()
            }),
            ("a bad name", Class::Invalid, |s| {
                s.routers[0].name = "R".into()
            }),
            ("a network given twice", Class::Invalid, |s| {
                s.routers[0].networks.push("n".into())
            }),
        ];
        for (what, class, change) in cases {
            let mut s = routed();
            change(&mut s);
            assert_eq!(class_of(s), class, "{what}");
        }
        // The same subnets on two tenants' routers are fine.
        let mut s = routed();
        s.networks.push(
            serde_json::from_value(serde_json::json!({"name": "n2", "tenant": "u", "vni": 9,
                "subnets": ["10.0.0.0/24"], "gateway_ips": ["10.0.0.254"]}))
            .unwrap(),
        );
        s.routers.push(
            serde_json::from_value(
                serde_json::json!({"name": "u-r", "tenant": "u", "networks": ["n2"]}),
            )
            .unwrap(),
        );
        assert!(validate(s).is_ok());
    }

    #[test]
    fn floating_ips_are_their_ports_tenants_on_a_router_once() {
        let fip = |s: &mut Snapshot, name: &str, ip: &str, port: &str| {
            s.floating_ips.push(
                serde_json::from_value(
                    serde_json::json!({"name": name, "tenant": "t", "ip": ip, "port": port}),
                )
                .unwrap(),
            )
        };
        let mut ok = routed();
        ok.hosts[0].external_ip = Some("198.51.100.11".parse().unwrap());
        fip(&mut ok, "f1", "198.51.100.20", "p1");
        assert!(validate(ok.clone()).is_ok());
        let cases: [Change; 8] = [
            ("a missing port", Class::Conflict, |s| {
                s.floating_ips[0].port = "nope".into()
            }),
            ("another tenant's port", Class::Conflict, |s| {
                s.floating_ips[0].tenant = "u".into()
            }),
            ("a port on no router", Class::Conflict, |s| {
                s.routers.clear()
            }),
            ("a port without IPv4", Class::Conflict, |s| {
                s.ports[0].ips.clear()
            }),
            ("a host's external IP", Class::Conflict, |s| {
                s.floating_ips[0].ip = "198.51.100.11".parse().unwrap()
            }),
            ("not unicast", Class::Invalid, |s| {
                s.floating_ips[0].ip = "224.0.0.1".parse().unwrap()
            }),
            ("two for one port", Class::Conflict, |s| {
                let mut f = s.floating_ips[0].clone();
                f.name = "f2".into();
                f.ip = "198.51.100.21".parse().unwrap();
                s.floating_ips.push(f);
            }),
            ("two hosts with one external IP", Class::Conflict, |s| {
                s.hosts[1].external_ip = s.hosts[0].external_ip
            }),
        ];
        for (what, class, change) in cases {
            let mut s = ok.clone();
            change(&mut s);
            assert_eq!(class_of(s), class, "{what}");
        }
        // The same address twice.
        let mut s = ok.clone();
        fip(&mut s, "f2", "198.51.100.20", "p2");
        assert_eq!(class_of(s), Class::Conflict, "an address given twice");
    }

    #[test]
    fn classes_of_violations() {
        assert!(validate(snap(BASE)).is_ok());
        let mut s = snap(BASE);
        s.hosts[1].underlay_ip = s.hosts[0].underlay_ip;
        assert_eq!(class_of(s), Class::Conflict, "duplicate underlay IP");
        let mut s = snap(BASE);
        s.ports[0].interface = "a/b".into();
        assert_eq!(class_of(s), Class::Invalid, "interface name");
        let mut s = snap(BASE);
        s.networks[0].tenant = "Bad".into();
        assert_eq!(class_of(s), Class::Invalid, "tenant name");
        let mut s = snap(BASE);
        s.ports[1].network = "nope".into();
        assert_eq!(class_of(s), Class::Conflict, "missing network");
        let mut s = snap(BASE);
        s.ports[1].ips = vec!["10.0.0.1".parse().unwrap()];
        assert_eq!(class_of(s), Class::Conflict, "IP in use");
        let mut s = snap(BASE);
        s.ports[1].port_security = false;
        s.ports[1].security_groups = vec!["g".into()];
        assert_eq!(class_of(s), Class::Invalid, "groups without port security");
        // One interface, one port; never the loopback.
        let mut s = snap(BASE);
        s.ports[1].host = "hv1".into();
        s.ports[1].interface = "tap1".into();
        assert_eq!(class_of(s), Class::Conflict, "two ports on one interface");
        let mut s = snap(BASE);
        s.ports[0].interface = "lo".into();
        assert_eq!(class_of(s), Class::Invalid, "the loopback");
        // No pair over the IPv4-mapped range, no pair with a group MAC.
        for pair in ["::/0", "::ffff:0:0/96", "::ffff:10.0.0.0/120"] {
            let mut s = snap(BASE);
            s.ports[0].allowed_address_pairs = vec![AddressPair {
                ip: pair.parse().unwrap(),
                mac: None,
            }];
            assert_eq!(class_of(s), Class::Invalid, "pair {pair}");
        }
        let mut s = snap(BASE);
        s.ports[0].allowed_address_pairs = vec![AddressPair {
            ip: "10.0.0.128/25".parse().unwrap(),
            mac: Some(MacAddr([1, 0, 0x5e, 0, 0, 1])),
        }];
        assert_eq!(class_of(s), Class::Invalid, "a multicast pair MAC");
        let mut s = snap(BASE);
        s.ports[0].allowed_address_pairs = vec![AddressPair {
            ip: "fd00:1::/64".parse().unwrap(),
            mac: None,
        }];
        assert!(validate(s).is_ok(), "an ordinary IPv6 pair");
        // Per-object limits.
        let mut s = snap(BASE);
        let rule = s.security_groups[0].rules[0].clone();
        s.security_groups[0].rules = vec![rule; MAX_RULES_PER_GROUP + 1];
        assert_eq!(class_of(s), Class::Invalid, "too many rules");
    }

    #[test]
    fn gateway_services_are_checked() {
        let with = |f: &dyn Fn(&mut Snapshot)| {
            let mut s = snap(BASE);
            s.networks[0].subnets.push("fd00:1::/64".parse().unwrap());
            f(&mut s);
            validate(s)
        };
        let ip = |a: &str| -> IpAddr { a.parse().unwrap() };
        let route = |d: &str, h: &str| HostRoute {
            destination: d.parse().unwrap(),
            nexthop: ip(h),
        };
        let good = with(&|s| {
            let n = &mut s.networks[0];
            n.gateway_ips = vec![ip("10.0.0.254"), ip("fd00:1::1")];
            n.dns_servers = vec![ip("10.0.0.53"), ip("2001:db8::53")];
            n.host_routes = vec![route("192.168.0.0/16", "10.0.0.250")];
            s.ports[0].hostname = Some("vm-1.example".into());
            s.ports[0].instance_id = Some("7d3c2f8e-0b1a-4c6d-9e2f-1a2b3c4d5e6f".into());
        });
        assert!(good.is_ok(), "{good:?}");
        let class = |f: &dyn Fn(&mut Snapshot)| with(f).unwrap_err().class;
        let gw = |g: &'static [&'static str]| {
            move |s: &mut Snapshot| s.networks[0].gateway_ips = g.iter().map(|a| ip(a)).collect()
        };
        assert_eq!(
            class(&gw(&["10.9.0.1"])),
            Class::Invalid,
            "outside the subnets"
        );
        assert_eq!(
            class(&gw(&["10.0.0.1", "10.0.0.2"])),
            Class::Invalid,
            "two in a subnet"
        );
        assert_eq!(
            class(&gw(&["10.0.0.0"])),
            Class::Invalid,
            "the network address"
        );
        assert_eq!(
            class(&gw(&["10.0.0.255"])),
            Class::Invalid,
            "the broadcast address"
        );
        // p1 has 10.0.0.1: a gateway may not be a port's address.
        assert_eq!(
            class(&gw(&["10.0.0.1"])),
            Class::Conflict,
            "a port's address"
        );
        assert_eq!(
            class(&|s| {
                let vni = s.networks[0].vni;
                s.ports[0].mac = MacAddr(cloison_abi::gateway_mac(vni));
            }),
            Class::Conflict,
            "the gateway's MAC"
        );
        assert_eq!(
            class(&|s| {
                s.networks[0]
                    .subnets
                    .push("169.254.0.0/16".parse().unwrap());
                s.ports[0].ips.push(ip("169.254.169.254"));
            }),
            Class::Conflict,
            "the metadata address"
        );
        assert_eq!(
            class(&|s| s.networks[0].dns_servers = vec![ip("10.0.0.53"); MAX_DNS_SERVERS + 1]),
            Class::Invalid
        );
        for d in ["0.0.0.0", "224.0.0.1", "::ffff:10.0.0.53"] {
            assert_eq!(
                class(&|s| s.networks[0].dns_servers = vec![ip(d)]),
                Class::Invalid,
                "DNS server {d}"
            );
        }
        for (d, h, why) in [
            ("192.168.1.1/16", "10.0.0.250", "host bits"),
            ("192.168.0.0/16", "10.9.0.1", "next hop off the network"),
            ("192.168.0.0/16", "fd00:1::9", "families differ"),
            ("::ffff:0:0/96", "fd00:1::9", "IPv4-mapped"),
        ] {
            assert_eq!(
                class(&|s| s.networks[0].host_routes = vec![route(d, h)]),
                Class::Invalid,
                "{why}"
            );
        }
        assert_eq!(
            class(&|s| {
                s.networks[0].host_routes =
                    vec![route("192.168.0.0/16", "10.0.0.250"); MAX_HOST_ROUTES + 1]
            }),
            Class::Invalid
        );
        for h in ["", "-vm", "vm-", "a..b", "vm_1", &"a".repeat(64)] {
            assert_eq!(
                class(&|s| s.ports[0].hostname = Some(h.to_string())),
                Class::Invalid,
                "host name {h:?}"
            );
        }
        for id in ["", "a b", "x\r\nX-Tenant-ID: evil", &"a".repeat(256)] {
            assert_eq!(
                class(&|s| s.ports[0].instance_id = Some(id.to_string())),
                Class::Invalid,
                "instance id {id:?}"
            );
        }
    }

    #[test]
    fn a_host_full_of_ports_is_refused() {
        let mut s = snap(BASE);
        let p = s.ports[1].clone();
        s.networks[0].subnets = vec!["10.0.0.0/8".parse().unwrap()];
        for i in 0..MAX_PORTS {
            let mut q = p.clone();
            q.name = format!("x{i}");
            q.host = "hv1".into();
            q.interface = format!("t{i}");
            q.mac = MacAddr([2, 1, (i >> 16) as u8, (i >> 8) as u8, i as u8, 0]);
            q.ips = vec![];
            s.ports.push(q);
        }
        let v = validate(s).unwrap_err();
        assert_eq!(v.class, Class::Capacity);
        assert!(
            v.message.contains("host hv1") && v.message.contains("ports"),
            "{v}"
        );
    }

    #[test]
    fn rejects_inconsistent_snapshots() {
        let bad = |f: &dyn Fn(&mut Snapshot)| {
            let mut s = snap(BASE);
            f(&mut s);
            validate(s).unwrap_err().to_string()
        };
        assert!(bad(&|s| s.networks[0].vni = 0).contains("VNI"));
        assert!(bad(&|s| s.networks[0].mtu = 100).contains("MTU"));
        // A network with a port on an ipsec host fits the IPsec device.
        let ipsec = |s: &mut Snapshot| {
            for h in &mut s.hosts {
                h.encryption = crate::snapshot::Encryption::Ipsec;
            }
        };
        assert!(bad(&|s| ipsec(s)).contains("at most 1350"));
        let mut ok = snap(BASE);
        ipsec(&mut ok);
        for n in &mut ok.networks {
            n.mtu = MAX_MTU_IPSEC;
        }
        validate(ok).expect("MTU 1350 fits");
        assert!(bad(&|s| s.ports[1].mac = s.ports[0].mac).contains("already port"));
        assert!(
            bad(&|s| s.ports[1].ips = vec!["10.0.0.1".parse().unwrap()]).contains("already port")
        );
        assert!(
            bad(&|s| s.ports[0].ips = vec!["192.168.0.1".parse().unwrap()]).contains("outside")
        );
        assert!(bad(&|s| s.ports[0].network = "nope".into()).contains("no network"));
        assert!(bad(&|s| s.hosts[1].underlay_ip = s.hosts[0].underlay_ip).contains("already host"));
        assert!(
            bad(&|s| s.ports[0].mac = "01:00:00:00:00:01".parse().unwrap()).contains("unicast")
        );
    }

    #[test]
    fn rejects_bad_security_groups() {
        let bad = |groups: serde_json::Value, port_groups: &[&str]| {
            let mut s = snap(BASE);
            s.security_groups = serde_json::from_value(groups).unwrap();
            s.ports[0].security_groups = port_groups.iter().map(|g| g.to_string()).collect();
            s.ports[1].security_groups.clear();
            validate(s).unwrap_err().to_string()
        };
        let rule =
            |r: serde_json::Value| serde_json::json!([{"name": "g", "tenant": "t", "rules": [r]}]);
        assert!(bad(
            rule(serde_json::json!({"direction": "ingress", "protocol": "icmp", "ports": "22"})),
            &[]
        )
        .contains("tcp or udp"));
        assert!(bad(
            rule(serde_json::json!({"direction": "ingress", "protocol": "icmpv6"})),
            &[]
        )
        .contains("IPv6"));
        assert!(bad(
            rule(serde_json::json!({"direction": "egress", "remote": {"cidr": "fd00::/8"}})),
            &[]
        )
        .contains("not an IPv4 network"));
        assert!(bad(
            rule(serde_json::json!({"direction": "egress", "remote": {"group": "nope"}})),
            &[]
        )
        .contains("unknown group"));
        let other = serde_json::json!([{"name": "g", "tenant": "t", "rules": []},
                                       {"name": "x", "tenant": "other", "rules": []}]);
        assert!(bad(other.clone(), &["x"]).contains("another tenant"));
        assert!(bad(other, &["y"]).contains("unknown group"));
        for text in [
            r#"{"direction": "ingress", "protocol": "sctp"}"#,
            r#"{"direction": "ingress", "protocol": 256}"#,
            r#"{"direction": "ingress", "protocol": "tcp", "ports": "90-80"}"#,
            r#"{"direction": "ingress", "protocol": "tcp", "ports": "0"}"#,
            r#"{"direction": "sideways"}"#,
            r#"{"direction": "ingress", "remote": {"cidr": "10.0.0.0/8", "group": "g"}}"#,
        ] {
            assert!(serde_json::from_str::<Rule>(text).is_err(), "{text}");
        }
    }

    use proptest::prelude::*;

    fn random_snapshot(
        hosts: usize,
        ports: &[(usize, usize, u8, bool, bool, usize)],
        groups: &[(bool, usize, u16)],
    ) -> Snapshot {
        let mut s = Snapshot::default();
        for h in 0..hosts {
            s.hosts.push(Host {
                external_ip: None,
                encryption: Default::default(),
                name: format!("hv{h}"),
                underlay_ip: std::net::Ipv4Addr::new(192, 0, 2, h as u8 + 1),
            });
        }
        for n in 0..2 {
            s.networks.push(
                serde_json::from_value(serde_json::json!({"name": format!("n{n}"), "tenant": "t",
                    "vni": n + 1, "subnets": ["10.0.0.0/16", "fd00::/64"]}))
                .unwrap(),
            );
        }
        for (g, (ingress_from_group, remote, port)) in groups.iter().enumerate() {
            let rule = if *ingress_from_group {
                serde_json::json!({"direction": "ingress", "protocol": "tcp",
                    "ports": format!("{}-{}", port, port.saturating_add(40)),
                    "remote": {"group": format!("g{}", remote % groups.len())}})
            } else {
                serde_json::json!({"direction": "egress", "ethertype": "IPv6"})
            };
            s.security_groups.push(
                serde_json::from_value(serde_json::json!({"name": format!("g{g}"), "tenant": "t",
                    "rules": [rule, {"direction": "ingress", "remote": {"cidr": format!("10.0.{g}.0/24")}}]}))
                .unwrap(),
            );
        }
        for (i, (host, net, ip, secure, pair, group)) in ports.iter().enumerate() {
            let mut p: Port = serde_json::from_value(serde_json::json!({
                "name": format!("p{i}"), "network": format!("n{}", net % 2),
                "host": format!("hv{}", host % hosts), "interface": format!("tap{i}"),
                "mac": format!("02:00:00:00:{:02x}:{:02x}", i, ip),
                "ips": [format!("10.0.1.{ip}"), format!("fd00::{ip:x}")],
                "port_security": secure}))
            .unwrap();
            if *pair {
                p.allowed_address_pairs = vec![AddressPair {
                    ip: format!("10.0.2.{}/31", ip & 0xfe).parse().unwrap(),
                    mac: None,
                }];
            }
            if *secure && !groups.is_empty() {
                p.security_groups = vec![format!("g{}", group % groups.len())];
            }
            s.ports.push(p);
        }
        s
    }

    proptest! {
        /// What the validator counts for a host bounds what the compiler
        /// makes of it (every interface present): so a state it accepts
        /// always fits every host's maps.
        #[test]
        fn what_the_validator_accepts_fits_every_host(
            hosts in 1usize..4,
            ports in proptest::collection::vec((0usize..4, 0usize..2, 1u8..40, any::<bool>(), any::<bool>(), 0usize..3), 0..14),
            groups in proptest::collection::vec((any::<bool>(), 0usize..3, 1u16..2000), 0..3),
        ) {
            let s = random_snapshot(hosts, &ports, &groups);
            let Ok(valid) = validate(s) else {
                return Ok(()); // refused (a duplicate address): nothing to compile
            };
            let fits = crate::fuzzing::fits(&valid);
            prop_assert!(fits.is_ok(), "{:?}", fits);
        }
    }
}
