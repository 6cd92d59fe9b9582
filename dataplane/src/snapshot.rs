//! The desired state `dataplane` is asked to make true: hosts, networks and
//! ports, in the shape of the northbound API (../shared/API.md). A snapshot is
//! complete; applying it makes the kernel's maps equal to what it implies.
use std::{
    collections::{BTreeMap, BTreeSet},
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
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    #[serde(default)]
    pub hosts: Vec<Host>,
    #[serde(default)]
    pub networks: Vec<Network>,
    #[serde(default)]
    pub ports: Vec<Port>,
}

/// Smallest network MTU: room for an ICMP error's quote (see icmp.rs) and
/// what IPv4 hosts must accept.
pub const MIN_MTU: u32 = 576;
/// Largest: a 9000-byte jumbo underlay minus the VXLAN overhead.
pub const MAX_MTU: u32 = 8950;

impl Snapshot {
    /// Checks everything the dataplane relies on. The northbound API checks
    /// more (tenants, names); this is the last line before the kernel.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |m: String| Err(Error::Invalid(m));
        let mut hosts = BTreeSet::new();
        for h in &self.hosts {
            if !hosts.insert(h.name.as_str()) {
                return invalid(format!("host {} given twice", h.name));
            }
        }
        let mut vnis = BTreeSet::new();
        let mut nets = BTreeMap::new();
        for n in &self.networks {
            if n.vni == 0 || n.vni > 0xff_ffff {
                return invalid(format!(
                    "network {}: VNI {} outside 1-16777215",
                    n.name, n.vni
                ));
            }
            if !vnis.insert(n.vni) {
                return invalid(format!("network {}: VNI {} already used", n.name, n.vni));
            }
            if !(MIN_MTU..=MAX_MTU).contains(&n.mtu) {
                return invalid(format!(
                    "network {}: MTU {} outside {MIN_MTU}-{MAX_MTU}",
                    n.name, n.mtu
                ));
            }
            if nets.insert(n.name.as_str(), n).is_some() {
                return invalid(format!("network {} given twice", n.name));
            }
        }
        let mut names = BTreeSet::new();
        let mut macs = BTreeSet::new();
        let mut ips = BTreeSet::new();
        for p in &self.ports {
            if !names.insert(p.name.as_str()) {
                return invalid(format!("port {} given twice", p.name));
            }
            let Some(net) = nets.get(p.network.as_str()) else {
                return invalid(format!("port {}: unknown network {}", p.name, p.network));
            };
            if !hosts.contains(p.host.as_str()) {
                return invalid(format!("port {}: unknown host {}", p.name, p.host));
            }
            if !p.mac.is_unicast() {
                return invalid(format!("port {}: MAC {} is not unicast", p.name, p.mac));
            }
            if !macs.insert((net.vni, p.mac)) {
                return invalid(format!(
                    "port {}: MAC {} already used in {}",
                    p.name, p.mac, net.name
                ));
            }
            for ip in &p.ips {
                if !net.subnets.iter().any(|s| s.contains(ip)) {
                    return invalid(format!(
                        "port {}: {ip} is outside the subnets of {}",
                        p.name, net.name
                    ));
                }
                if !ips.insert((net.vni, *ip)) {
                    return invalid(format!(
                        "port {}: {ip} already used in {}",
                        p.name, net.name
                    ));
                }
            }
            if p.interface.is_empty() || p.interface.len() > 15 {
                return invalid(format!(
                    "port {}: bad interface name {:?}",
                    p.name, p.interface
                ));
            }
        }
        Ok(())
    }
}
