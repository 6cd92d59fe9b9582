//! A pure-Rust reference of the BPF pipeline's decisions: the test oracle.
//! It says what happens to a frame (delivered, passed to the host, or
//! dropped with which reason); the fixtures check the bytes the programs
//! write, and the property tests check that the programs and this model
//! decide alike on random frames and random rule sets.
//!
//! Forwarding and anti-spoofing read the same [`Tables`] as the kernel.
//! Security groups do not: the model evaluates the snapshot's rules as
//! API.md defines them (rule by rule, remote groups by their members'
//! addresses), so it checks the rule compiler and the programs together.
//! Connection tracking is kept here in plain maps, with the same states.
//!
//! One file per stage, as the programs have: `parse`, `spoof`, `proxy`,
//! `service`, `forward`, `conntrack` and `policy`, `uplink`; this file calls them in
//! order. A verdict says where the frame went.
use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use cloison_abi::*;
use ipnet::IpNet;

use crate::{
    snapshot::{Encryption, Rule, Snapshot},
    tables::Tables,
};

mod conntrack;
mod forward;
mod nat;
mod parse;
mod policy;
mod proxy;
mod route;
mod service;
mod spoof;
mod uplink;

use parse::{be16, parse};

/// What happens to a frame, and where it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Into the VM of the local port with this ifindex.
    ToPort(u32),
    /// Back to the port it came from: an ARP or ND answer, an ICMP error.
    Back,
    /// Inside VXLAN to this VTEP, out of the uplink.
    ToVtep([u8; 4]),
    /// Inside VXLAN to this VTEP, into the IPsec device (to be encrypted).
    ToIpsec([u8; 4]),
    /// Not for the overlay: handed to the host stack (uplink only).
    Host,
    /// To the agent's gateway services (its service tap), the port's
    /// ifindex in the destination MAC.
    ToAgent,
    /// Out of the external interface, NATed (from a floating IP or the
    /// host's external IP).
    ToExternal,
    Drop(DropReason),
}

impl Verdict {
    /// Whether the program redirected the frame (somewhere).
    pub fn redirected(self) -> bool {
        matches!(
            self,
            Verdict::ToPort(_)
                | Verdict::Back
                | Verdict::ToVtep(_)
                | Verdict::ToIpsec(_)
                | Verdict::ToAgent
                | Verdict::ToExternal
        )
    }
}

pub struct Model<'a> {
    pub tables: &'a Tables,
    /// Rules of each local port with port security, by ifindex: (group,
    /// the rule's index in it, the rule).
    rules: BTreeMap<u32, Vec<(String, usize, Rule)>>,
    /// Addresses of each group's ports (remote-group rules).
    members: BTreeMap<String, Vec<IpNet>>,
    pub epoch: u32,
    ct: RefCell<BTreeMap<ModelCtKey, ModelCt>>,
    /// The snapshot's routers touching this host's networks.
    routers: Vec<route::ModelRouter>,
    /// Floating IPs of this host's ports.
    fips: Vec<nat::ModelFip>,
    /// SNAT mappings the model handed out.
    snat: RefCell<nat::ModelSnat>,
    /// Whether the external interface's program is attached (the agent's
    /// `--external-interface`): set by whoever attached it.
    pub external: bool,
    /// Whether the IPsec device is attached (the agent found charon's):
    /// set by whoever attached it.
    pub ipsec: bool,
    /// Each host's encryption, by underlay address (this host's too).
    encryption: BTreeMap<[u8; 4], Encryption>,
    /// First fragments allowed: when, and the tenant charged.
    frags: RefCell<BTreeMap<ModelFragKey, (u64, u32)>>,
    /// The rule checks made, in order, since [`Model::take_checks`] (what
    /// a trace shows as the model's reason).
    checks: RefCell<Vec<RuleCheck>>,
}

/// One end's rules checked against a packet: the first rule that allows
/// it, if one does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCheck {
    /// The port's interface.
    pub ifindex: u32,
    pub direction: crate::snapshot::Direction,
    /// (group, index of the rule in the group).
    pub rule: Option<(String, usize)>,
}

/// (zone, source, destination, IP id, protocol) of a first fragment.
pub(crate) type ModelFragKey = (u32, u32, [u8; 16], [u8; 16], u8);

/// (zone, protocol, the two (address, port) ends in sorted order).
pub(crate) type ModelCtKey = (u32, u8, ([u8; 16], u16), ([u8; 16], u16));

#[derive(Clone, Copy, Debug)]
pub(crate) struct ModelCt {
    /// The originator's end: (address, port).
    pub orig: ([u8; 16], u16),
    pub state: u8,
    pub flags: u8,
    epoch: u32,
    pub last_seen_ns: u64,
    pub owner_slot: u32,
    pub owner_tenant: u32,
}

fn to_ip(a: [u8; 16], v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

fn now_ns() -> u64 {
    crate::loader::monotonic_ns()
}

use DropReason::*;

impl<'a> Model<'a> {
    /// A model of the host whose kernel tables are `tables`, with the
    /// security groups of `snap`; `ifindex` finds a port's interface.
    pub fn new(tables: &'a Tables, snap: &Snapshot, ifindex: impl Fn(&str) -> Option<u32>) -> Self {
        let mut m = Model {
            tables,
            rules: BTreeMap::new(),
            members: BTreeMap::new(),
            epoch: 0,
            ct: RefCell::new(BTreeMap::new()),
            frags: RefCell::new(BTreeMap::new()),
            routers: Vec::new(),
            fips: Vec::new(),
            snat: RefCell::new(BTreeMap::new()),
            external: false,
            ipsec: false,
            encryption: BTreeMap::new(),
            checks: RefCell::new(Vec::new()),
        };
        m.set_policy(snap, ifindex);
        m
    }

    /// New rules and memberships; tracked flows are checked again on their
    /// next packet (strict revoke), as in the kernel.
    pub fn set_policy(&mut self, snap: &Snapshot, ifindex: impl Fn(&str) -> Option<u32>) {
        self.epoch += 1;
        self.rules.clear();
        self.members.clear();
        self.encryption = snap
            .hosts
            .iter()
            .map(|h| (h.underlay_ip.octets(), h.encryption))
            .collect();
        self.routers = snap
            .routers
            .iter()
            .enumerate()
            .map(|(i, r)| route::ModelRouter {
                zone: ROUTER_ZONE | (i as u32 + 1),
                snat: r.snat,
                nets: r
                    .networks
                    .iter()
                    .filter_map(|n| snap.networks.iter().find(|x| &x.name == n))
                    .map(|n| route::RoutedNet {
                        vni: n.vni,
                        mtu: n.mtu,
                        subnets: n.subnets.clone(),
                        gateways: n.gateway_ips.clone(),
                    })
                    .collect(),
            })
            .collect();
        self.fips = snap
            .floating_ips
            .iter()
            .filter_map(|f| {
                let p = snap.ports.iter().find(|p| p.name == f.port)?;
                let ifindex =
                    ifindex(&p.interface).filter(|i| self.tables.ports.contains_key(i))?;
                let inner = p.ips.iter().find_map(|ip| match ip {
                    IpAddr::V4(a) => Some(*a),
                    IpAddr::V6(_) => None,
                })?;
                let zone = self
                    .routers
                    .iter()
                    .find(|r| {
                        r.nets
                            .iter()
                            .any(|n| n.vni == self.tables.ports[&ifindex].vni)
                    })?
                    .zone;
                Some(nat::ModelFip {
                    ip: f.ip,
                    ifindex,
                    inner,
                    zone,
                })
            })
            .collect();
        for p in &snap.ports {
            for g in &p.security_groups {
                let m = self.members.entry(g.clone()).or_default();
                m.extend(p.ips.iter().map(|ip| IpNet::from(*ip)));
                m.extend(p.allowed_address_pairs.iter().map(|a| a.ip));
            }
            let Some(i) = ifindex(&p.interface) else {
                continue;
            };
            if !p.port_security || !self.tables.ports.contains_key(&i) {
                continue;
            }
            let rules = snap
                .security_groups
                .iter()
                .filter(|g| p.security_groups.contains(&g.name))
                .flat_map(|g| {
                    g.rules
                        .iter()
                        .enumerate()
                        .map(|(i, r)| (g.name.clone(), i, r.clone()))
                })
                .collect();
            self.rules.insert(i, rules);
        }
    }

    /// The rule checks the last [`Model::port`] or [`Model::uplink`] made.
    pub fn take_checks(&self) -> Vec<RuleCheck> {
        std::mem::take(&mut self.checks.borrow_mut())
    }

    /// Takes the kernel's tracked flows as its own (a trace on the live
    /// state): entries last allowed under the kernel's current policy epoch
    /// are current here too, older ones are checked again.
    pub fn adopt_conntrack(&mut self, entries: &[(CtKey, CtEntry)]) {
        let mut ct = self.ct.borrow_mut();
        ct.clear();
        for (k, e) in entries {
            let a = (k.addr_a, u16::from_be_bytes(k.port_a));
            let b = (k.addr_b, u16::from_be_bytes(k.port_b));
            let orig = if e.flags & CT_F_ORIG_B != 0 { b } else { a };
            let epoch = if e.epoch == self.tables.config.policy_epoch {
                self.epoch
            } else {
                self.epoch.wrapping_sub(1)
            };
            ct.insert(
                conntrack::ct_key(k.zone, k.proto, a, b),
                ModelCt {
                    orig,
                    state: e.state,
                    flags: e.flags,
                    epoch,
                    last_seen_ns: e.last_seen_ns,
                    owner_slot: e.owner_slot,
                    owner_tenant: e.owner_tenant,
                },
            );
        }
    }

    fn forward(&self, vni: u32, mac: [u8; 6]) -> Option<ForwardEntry> {
        self.tables
            .forward
            .get(&ForwardKey {
                vni,
                mac,
                _pad: [0; 2],
            })
            .copied()
    }

    fn allowed_mac(&self, ifindex: u32, addr: [u8; 16]) -> Option<[u8; 6]> {
        // Longest prefix match over (ifindex, address): the trie's key, 160 bits.
        let addr = u128::from_be_bytes(addr);
        self.tables
            .addr_allow
            .iter()
            .filter(|((bits, k), _)| {
                let (ifindex_bits, addr_bits) = ((*bits).min(32), bits.saturating_sub(32));
                let ifindex_mask = u32::MAX.checked_shl(32 - ifindex_bits).unwrap_or(0);
                let addr_mask = u128::MAX.checked_shl(128 - addr_bits).unwrap_or(0);
                (u32::from_be_bytes(k.ifindex_be) ^ ifindex) & ifindex_mask == 0
                    && (u128::from_be_bytes(k.addr) ^ addr) & addr_mask == 0
            })
            .max_by_key(|((bits, _), _)| *bits)
            .map(|(_, v)| v.mac)
    }

    /// The MAC of the remote port with port security that sends from `addr`
    /// in network `vni` (longest prefix over (VNI, address)).
    fn remote_mac(&self, vni: u32, addr: [u8; 16]) -> Option<[u8; 6]> {
        let addr = u128::from_be_bytes(addr);
        self.tables
            .remote_allow
            .iter()
            .filter(|((bits, k), _)| {
                let addr_bits = bits.saturating_sub(32);
                let mask = u128::MAX.checked_shl(128 - addr_bits).unwrap_or(0);
                u32::from_be_bytes(k.vni_be) == vni
                    && *bits >= 32
                    && (u128::from_be_bytes(k.addr) ^ addr) & mask == 0
            })
            .max_by_key(|((bits, _), _)| *bits)
            .map(|(_, v)| v.mac)
    }

    fn neighbour(&self, vni: u32, addr: [u8; 16]) -> Option<[u8; 6]> {
        self.tables
            .neighbours
            .get(&NeighbourKey { vni, addr })
            .map(|n| n.mac)
    }

    /// What the port program does with a frame the VM on `ifindex` sent.
    pub fn port(&self, ifindex: u32, f: &[u8]) -> Verdict {
        self.checks.borrow_mut().clear();
        match self.port_stages(ifindex, f) {
            Ok(v) => v,
            Err(r) => Verdict::Drop(r),
        }
    }

    /// The port program's stages, in its order.
    fn port_stages(&self, ifindex: u32, f: &[u8]) -> Result<Verdict, DropReason> {
        let port = *self.tables.ports.get(&ifindex).ok_or(UnknownPort)?;
        let p = parse(f)?;
        let secure = port.flags & PORT_F_SECURITY != 0;
        if p.l3 == 0x0806 {
            if secure {
                self.check_arp(f, ifindex, &port)?;
            }
            return self.arp(f, &port);
        }
        let v4 = p.l3 == 0x0800;
        if secure {
            self.check_ip(f, &p, ifindex, &port)?;
        }
        if !v4 && p.proto == 58 {
            if (133..=137).contains(&p.icmp_type) && p.ext_headers != 0 {
                return Err(NdWithExtensionHeaders);
            }
            if p.icmp_type == 135 {
                return self.nd(f, &port);
            }
        }
        if service::for_agent(&p, &port)? {
            return Ok(Verdict::ToAgent);
        }
        if parse::mac(f, 0) == gateway_mac(port.vni) {
            return self.route(f, &p, ifindex, &port);
        }
        let fwd = self.forward_from(f, ifindex, &port)?;
        let local = fwd.kind == FWD_LOCAL;
        let receiver = if local && fwd.flags & PORT_F_SECURITY != 0 {
            Some(*self.tables.ports.get(&fwd.ifindex).ok_or(UnknownPort)?)
                .map(|info| (fwd.ifindex, info))
        } else {
            None
        };
        let sender = secure.then_some((ifindex, port));
        if sender.is_some() || receiver.is_some() {
            self.enforce(f, &p, port.vni, sender, receiver)?;
        }
        if local {
            return Ok(Verdict::ToPort(fwd.ifindex));
        }
        if p.ip_len > port.mtu as usize {
            // (An IPv6 frame too big gets its error whatever it carries.)
            // Too big for the network: an ICMP error back if the VM asked
            // for path MTU discovery (IPv6 always does), else dropped.
            return if v4 && be16(f, 20) & 0x4000 == 0 {
                Err(MtuExceeded)
            } else {
                Ok(Verdict::Back)
            };
        }
        self.to_vtep(fwd.vtep)
    }

    /// How a frame goes to the host at `vtep`: in clear between two plain
    /// hosts, encrypted between two ipsec hosts, not at all otherwise.
    pub(super) fn to_vtep(&self, vtep: [u8; 4]) -> Result<Verdict, DropReason> {
        let mine = self.own_encryption();
        match (mine, self.encryption_of(vtep)) {
            (Encryption::None, Encryption::None) => Ok(Verdict::ToVtep(vtep)),
            (Encryption::Ipsec, Encryption::Ipsec) if self.ipsec => Ok(Verdict::ToIpsec(vtep)),
            (Encryption::Ipsec, Encryption::Ipsec) => Err(IpsecUnavailable),
            _ => Err(EncryptionMismatch),
        }
    }

    /// This host's encryption (the host whose address is this VTEP's).
    pub(super) fn own_encryption(&self) -> Encryption {
        self.encryption_of(self.tables.config.vtep)
    }

    /// The encryption of the host at underlay address `vtep`.
    pub(super) fn encryption_of(&self, vtep: [u8; 4]) -> Encryption {
        self.encryption.get(&vtep).copied().unwrap_or_default()
    }

    /// What the uplink program (XDP or TC) does with a frame from the underlay.
    pub fn uplink(&self, f: &[u8]) -> Verdict {
        self.checks.borrow_mut().clear();
        match self.uplink_inner(f) {
            Ok(v) => v,
            Err(r) => Verdict::Drop(r),
        }
    }
}
