//! The desired state `dataplane` is asked to make true: hosts, networks and
//! ports, in the shape of the northbound API (docs/api.md). A snapshot is
//! complete; applying it makes the kernel's maps equal to what it implies.
use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::Error;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Invalid(format!("bad MAC address {s:?}"));
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl MacAddr {
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }

    /// The IPv6 link-local address a VM derives from this MAC (EUI-64).
    pub fn link_local(&self) -> std::net::Ipv6Addr {
        let m = self.0;
        std::net::Ipv6Addr::from([
            0xfe,
            0x80,
            0,
            0,
            0,
            0,
            0,
            0,
            m[0] ^ 2,
            m[1],
            m[2],
            0xff,
            0xfe,
            m[3],
            m[4],
            m[5],
        ])
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    /// The host's address on the external network: the source of its
    /// VMs' SNATed traffic (none: no SNAT on this host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Encryption::is_none")]
    pub encryption: Encryption,
}

/// How a host's VXLAN travels to other hosts. Between two `ipsec` hosts,
/// inside ESP only; between an `ipsec` host and a `none` host, not at all
/// (an ipsec host never sends in clear, and takes nothing in clear).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    #[default]
    None,
    Ipsec,
}

impl Encryption {
    pub fn is_none(&self) -> bool {
        *self == Encryption::None
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub tenant: String,
    pub vni: u32,
    #[serde(default)]
    pub subnets: Vec<IpNet>,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// The gateway's address in each subnet that has one (at most one per
    /// subnet, inside it, not a port's): the router VMs are told of.
    #[serde(default)]
    pub gateway_ips: Vec<IpAddr>,
    /// Whether the agent answers its ports' DHCPv4.
    #[serde(default = "default_true")]
    pub dhcp: bool,
    #[serde(default)]
    pub dns_servers: Vec<IpAddr>,
    /// Routes handed to VMs (DHCP option 121), next hops on the network.
    #[serde(default)]
    pub host_routes: Vec<HostRoute>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRoute {
    pub destination: IpNet,
    pub nexthop: IpAddr,
}

fn default_mtu() -> u32 {
    cloison_abi::DEFAULT_MTU
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressPair {
    pub ip: IpNet,
    #[serde(default)]
    pub mac: Option<MacAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub name: String,
    pub network: String,
    pub host: String,
    pub interface: String,
    pub mac: MacAddr,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    #[serde(default)]
    pub allowed_address_pairs: Vec<AddressPair>,
    #[serde(default = "default_true")]
    pub port_security: bool,
    /// The VM's host name (DHCP, metadata); the port's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The instance the metadata service names; the port's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
}

impl Port {
    /// Each of the port's groups is one of `groups`, of its network's
    /// `tenant` (the API answers 409 otherwise).
    pub fn check_groups(
        &self,
        tenant: &str,
        network: &str,
        groups: &HashMap<&str, &SecurityGroup>,
    ) -> Result<(), String> {
        for g in &self.security_groups {
            match groups.get(g.as_str()) {
                Some(sg) if sg.tenant == tenant => {}
                Some(_) => {
                    return Err(format!(
                    "port {}: security group {g} belongs to another tenant than network {network}",
                    self.name
                ))
                }
                None => return Err(format!("port {}: unknown group {g}", self.name)),
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Ethertype {
    #[default]
    IPv4,
    IPv6,
}

/// A rule's protocol: a name of API.md or an IP protocol number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    #[default]
    Any,
    Number(u8),
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

impl Protocol {
    /// The IP protocol this rule matches for its ethertype ("icmp" in an IPv6
    /// rule means ICMPv6, as in Neutron). `None`: any protocol.
    pub fn number(self, ethertype: Ethertype) -> Option<u8> {
        match (self, ethertype) {
            (Protocol::Any, _) => None,
            (Protocol::Number(PROTO_ICMP), Ethertype::IPv6) => Some(PROTO_ICMPV6),
            (Protocol::Number(n), _) => Some(n),
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Protocol::Any => s.serialize_str("any"),
            Protocol::Number(PROTO_TCP) => s.serialize_str("tcp"),
            Protocol::Number(PROTO_UDP) => s.serialize_str("udp"),
            Protocol::Number(PROTO_ICMP) => s.serialize_str("icmp"),
            Protocol::Number(PROTO_ICMPV6) => s.serialize_str("icmpv6"),
            Protocol::Number(n) => s.serialize_u8(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Number(u64),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => u8::try_from(n)
                .map(Protocol::Number)
                .map_err(|_| serde::de::Error::custom(format!("protocol {n} is not 0-255"))),
            Raw::Name(name) => match name.as_str() {
                "any" => Ok(Protocol::Any),
                "tcp" => Ok(Protocol::Number(PROTO_TCP)),
                "udp" => Ok(Protocol::Number(PROTO_UDP)),
                "icmp" => Ok(Protocol::Number(PROTO_ICMP)),
                "icmpv6" => Ok(Protocol::Number(PROTO_ICMPV6)),
                other => Err(serde::de::Error::custom(format!(
                    "unknown protocol {other:?} (tcp, udp, icmp, icmpv6, any or 0-255)"
                ))),
            },
        }
    }
}

/// A destination port range, `"22"` or `"8000-8080"` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl FromStr for PortRange {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Invalid(format!("bad port range {s:?} (\"22\" or \"8000-8080\")"));
        let num = |p: &str| -> Result<u16, Error> {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(s)?, num(s)?),
        };
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Remote {
    Cidr(IpNet),
    Group(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub direction: Direction,
    #[serde(default)]
    pub ethertype: Ethertype,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<Remote>,
}

impl Rule {
    /// Field checks that need no other object (API.md's 400 cases).
    pub fn check(&self) -> Result<(), String> {
        let invalid = |m: String| Err(m);
        let proto = self.protocol.number(self.ethertype);
        if self.ports.is_some() && !matches!(proto, Some(PROTO_TCP | PROTO_UDP)) {
            return invalid("a port range needs protocol tcp or udp".into());
        }
        if self.ethertype == Ethertype::IPv4 && proto == Some(PROTO_ICMPV6) {
            return invalid("protocol icmpv6 needs ethertype IPv6".into());
        }
        if let Some(Remote::Cidr(net)) = &self.remote {
            let v6 = matches!(net, IpNet::V6(_));
            if v6 != (self.ethertype == Ethertype::IPv6) {
                return invalid(format!(
                    "remote {net} is not an {:?} network",
                    self.ethertype
                ));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityGroup {
    pub name: String,
    pub tenant: String,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Why a group's rules cannot be used: a malformed rule (`Invalid`), or a
/// remote group that does not exist or is another tenant's (`Reference`; the
/// API answers 400 for the first, 409 for the second).
#[derive(Debug, PartialEq, Eq)]
pub enum RulesError {
    Invalid(String),
    Reference(String),
}

impl RulesError {
    pub fn message(self) -> String {
        match self {
            RulesError::Invalid(m) | RulesError::Reference(m) => m,
        }
    }
}

impl SecurityGroup {
    /// Checks every rule, and that each remote group is one of `groups` of
    /// this group's tenant.
    pub fn check_rules(&self, groups: &HashMap<&str, &SecurityGroup>) -> Result<(), RulesError> {
        for (i, r) in self.rules.iter().enumerate() {
            let at = || format!("security group {} rule {i}", self.name);
            r.check()
                .map_err(|e| RulesError::Invalid(format!("{}: {e}", at())))?;
            if let Some(Remote::Group(other)) = &r.remote {
                match groups.get(other.as_str()) {
                    Some(o) if o.tenant == self.tenant => {}
                    Some(_) => {
                        return Err(RulesError::Reference(format!(
                            "{}: group {other} belongs to another tenant",
                            at()
                        )))
                    }
                    None => {
                        return Err(RulesError::Reference(format!(
                            "{}: unknown group {other}",
                            at()
                        )))
                    }
                }
            }
        }
        Ok(())
    }
}

/// A tenant's router: it joins `networks` (their `gateway_ips` are its
/// addresses) and routes between them on every host (distributed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Router {
    pub name: String,
    pub tenant: String,
    #[serde(default)]
    pub networks: Vec<String>,
    /// Source NAT to the host's external IP for traffic to addresses of
    /// none of the router's networks.
    #[serde(default)]
    pub snat: bool,
}

/// A 1:1 NAT of a port's first IPv4 address, at the port's host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloatingIp {
    pub name: String,
    pub tenant: String,
    pub ip: Ipv4Addr,
    pub port: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    #[serde(default)]
    pub hosts: Vec<Host>,
    #[serde(default)]
    pub networks: Vec<Network>,
    #[serde(default)]
    pub security_groups: Vec<SecurityGroup>,
    #[serde(default)]
    pub ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routers: Vec<Router>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub floating_ips: Vec<FloatingIp>,
}

impl Snapshot {
    /// The router that joins each network one joins (at most one: the
    /// validator sees to it).
    pub fn router_of(&self) -> HashMap<&str, &Router> {
        self.routers
            .iter()
            .flat_map(|r| r.networks.iter().map(move |n| (n.as_str(), r)))
            .collect()
    }

    /// The networks a host with ports in `networks` takes part in: those,
    /// and every other network of their routers (it routes to them).
    pub fn with_routed<'a>(
        &'a self,
        networks: impl IntoIterator<Item = &'a str>,
    ) -> std::collections::BTreeSet<&'a str> {
        let router_of = self.router_of();
        let mut out = std::collections::BTreeSet::new();
        for n in networks {
            out.insert(n);
            if let Some(r) = router_of.get(n) {
                out.extend(r.networks.iter().map(String::as_str));
            }
        }
        out
    }

    /// [`crate::validate::validate`] of a copy of this snapshot.
    pub fn validated(&self) -> Result<crate::validate::Valid, crate::validate::Violation> {
        crate::validate::validate(self.clone())
    }
}
