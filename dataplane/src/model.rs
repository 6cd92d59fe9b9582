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
use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use cloison_abi::*;
use ipnet::IpNet;

use crate::{
    snapshot::{Direction, Ethertype, Remote, Rule, Snapshot},
    tables::Tables,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Redirected: to a local port, back to the VM (answers, ICMP errors) or
    /// to the uplink inside VXLAN.
    Redirect,
    /// Not for the overlay: handed to the host stack (uplink only).
    Pass,
    Drop(DropReason),
}

pub struct Model<'a> {
    pub tables: &'a Tables,
    /// Rules of each local port with port security, by ifindex.
    rules: BTreeMap<u32, Vec<Rule>>,
    /// Addresses of each group's ports (remote-group rules).
    members: BTreeMap<String, Vec<IpNet>>,
    epoch: u32,
    ct: RefCell<BTreeMap<ModelCtKey, ModelCt>>,
    frags: RefCell<BTreeMap<ModelFragKey, u64>>,
}

/// (zone, source, destination, IP id, protocol) of a first fragment.
type ModelFragKey = (u32, [u8; 4], [u8; 4], u16, u8);

/// (zone, protocol, the two (address, port) ends in sorted order).
type ModelCtKey = (u32, u8, ([u8; 16], u16), ([u8; 16], u16));

#[derive(Clone, Copy, Debug)]
struct ModelCt {
    /// The originator's end: (address, port).
    orig: ([u8; 16], u16),
    state: u8,
    flags: u8,
    epoch: u32,
    last_seen_ns: u64,
    owner_slot: u32,
    owner_tenant: u32,
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn v4_mapped(a: &[u8]) -> [u8; 16] {
    let v4: [u8; 4] = a[..4].try_into().expect("4 bytes");
    crate::tables::ip16(std::net::Ipv4Addr::from(v4).into())
}

fn mac(b: &[u8], off: usize) -> [u8; 6] {
    b[off..off + 6].try_into().expect("6 bytes")
}

struct Parsed {
    l3: u16,
    l4_off: usize,
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
    later_fragment: bool,
    first_fragment: bool,
    ip_id: u16,
    sport: u16,
    dport: u16,
    icmp_type: u8,
    tcp_flags: u8,
    ip_len: usize,
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

fn ct_key(zone: u32, proto: u8, a: ([u8; 16], u16), b: ([u8; 16], u16)) -> ModelCtKey {
    (zone, proto, a.min(b), a.max(b))
}

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
                .flat_map(|g| g.rules.iter().cloned())
                .collect();
            self.rules.insert(i, rules);
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

    fn neighbour(&self, vni: u32, addr: [u8; 16]) -> Option<[u8; 6]> {
        self.tables
            .neighbours
            .get(&NeighbourKey { vni, addr })
            .map(|n| n.mac)
    }

    fn parse(f: &[u8]) -> Result<Parsed, DropReason> {
        if f.len() < 14 {
            return Err(TruncatedEthernet);
        }
        let mut p = Parsed {
            l3: be16(f, 12),
            l4_off: 0,
            proto: 0,
            src: [0; 16],
            dst: [0; 16],
            later_fragment: false,
            first_fragment: false,
            ip_id: 0,
            sport: 0,
            dport: 0,
            icmp_type: 0,
            tcp_flags: 0,
            ip_len: 0,
        };
        match p.l3 {
            0x0806 => {
                if f.len() < 14 + 28 {
                    return Err(TruncatedArp);
                }
                if be16(f, 14) != 1 || be16(f, 16) != 0x0800 || f[18] != 6 || f[19] != 4 {
                    return Err(MalformedArp);
                }
                Ok(p)
            }
            0x0800 => {
                if f.len() < 34 {
                    return Err(TruncatedIpv4);
                }
                let ihl = (f[14] & 0x0f) as usize * 4;
                let tot = be16(f, 16) as usize;
                if f[14] >> 4 != 4 || ihl < 20 || tot < ihl || 14 + tot > f.len() {
                    return Err(MalformedIpv4);
                }
                p.l4_off = 14 + ihl;
                p.proto = f[23];
                p.src = v4_mapped(&f[26..30]);
                p.dst = v4_mapped(&f[30..34]);
                p.ip_len = tot;
                let frag = be16(f, 20);
                p.later_fragment = frag & 0x1fff != 0;
                p.first_fragment = frag & 0x3fff == 0x2000;
                p.ip_id = be16(f, 18);
                if !p.later_fragment {
                    Self::l4(f, &mut p)?;
                }
                Ok(p)
            }
            0x86dd => {
                if f.len() < 54 {
                    return Err(TruncatedIpv6);
                }
                let plen = be16(f, 18) as usize;
                if f[14] >> 4 != 6 || 54 + plen > f.len() {
                    return Err(MalformedIpv6);
                }
                p.l4_off = 54;
                p.proto = f[20];
                p.src.copy_from_slice(&f[22..38]);
                p.dst.copy_from_slice(&f[38..54]);
                p.ip_len = 40 + plen;
                Self::l4(f, &mut p)?;
                Ok(p)
            }
            _ => Err(UnsupportedEthertype),
        }
    }

    fn l4(f: &[u8], p: &mut Parsed) -> Result<(), DropReason> {
        let o = p.l4_off;
        let need = match p.proto {
            6 => 20,
            17 | 1 | 58 => 8,
            _ => return Ok(()),
        };
        if f.len() < o + need {
            return Err(TruncatedL4);
        }
        match p.proto {
            6 => {
                if f[o + 12] >> 4 < 5 {
                    return Err(TruncatedL4);
                }
                (p.sport, p.dport) = (be16(f, o), be16(f, o + 2));
                p.tcp_flags = f[o + 13];
            }
            17 => (p.sport, p.dport) = (be16(f, o), be16(f, o + 2)),
            _ => {
                p.icmp_type = f[o];
                let id = be16(f, o + 4);
                match (p.proto, f[o]) {
                    (1, 8) | (58, 128) => p.sport = id,
                    (1, 0) | (58, 129) => p.dport = id,
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// What the port program does with a frame the VM on `ifindex` sent
    /// (`gso_size` 0: not a GSO frame).
    pub fn port(&self, ifindex: u32, f: &[u8]) -> Verdict {
        match self.port_inner(ifindex, f) {
            Ok(v) => v,
            Err(r) => Verdict::Drop(r),
        }
    }

    fn port_inner(&self, ifindex: u32, f: &[u8]) -> Result<Verdict, DropReason> {
        let port = *self.tables.ports.get(&ifindex).ok_or(UnknownPort)?;
        let p = Self::parse(f)?;
        let secure = port.flags & PORT_F_SECURITY != 0;
        let src_mac = mac(f, 6);
        if p.l3 == 0x0806 {
            let (sha, spa, tpa) = (mac(f, 22), &f[28..32], &f[38..42]);
            if secure {
                if sha != src_mac {
                    return Err(SpoofedArp);
                }
                if spa == [0; 4] {
                    if src_mac != port.mac {
                        return Err(SpoofedArp);
                    }
                } else if self.allowed_mac(ifindex, v4_mapped(spa)) != Some(sha) {
                    return Err(SpoofedArp);
                }
            }
            match be16(f, 20) {
                1 => {}
                2 => return Err(ArpReplyFromVm),
                _ => return Err(MalformedArp),
            }
            if tpa == spa {
                return Err(ArpSelfTarget);
            }
            let m = self
                .neighbour(port.vni, v4_mapped(tpa))
                .ok_or(ArpUnknownTarget)?;
            if m == src_mac {
                return Err(ArpSelfTarget);
            }
            return Ok(Verdict::Redirect);
        }
        let v4 = p.l3 == 0x0800;
        if secure {
            if p.src == [0; 16] || p.src == v4_mapped(&[0; 4]) {
                let ok = if v4 {
                    p.proto == 17 && p.sport == 68 && p.dport == 67
                } else {
                    p.proto == 58 && (p.icmp_type == 135 || p.icmp_type == 143)
                };
                if !ok {
                    return Err(SpoofedIp);
                }
                if src_mac != port.mac {
                    return Err(SpoofedMac);
                }
            } else {
                match self.allowed_mac(ifindex, p.src) {
                    Some(m) if m == src_mac => {}
                    Some(_) => return Err(SpoofedMac),
                    None => return Err(SpoofedIp),
                }
            }
            if p.proto == 17 && ((v4 && p.sport == 67) || (!v4 && p.sport == 547)) {
                return Err(DhcpServerFromVm);
            }
            if !v4 && p.proto == 58 && p.icmp_type == 134 {
                return Err(RouterAdvertFromVm);
            }
        }
        if !v4 && p.proto == 58 {
            match p.icmp_type {
                135 => return self.nd(f, &port),
                133 => return Err(RouterSolicitation),
                _ => {}
            }
        }
        let dst = mac(f, 0);
        if dst[0] & 1 == 1 {
            return Err(if dst == [0xff; 6] {
                Broadcast
            } else {
                Multicast
            });
        }
        let fwd = self.forward(port.vni, dst).ok_or(UnknownUnicast)?;
        let local = fwd.kind == FWD_LOCAL;
        if local && fwd.ifindex == ifindex {
            return Err(Hairpin);
        }
        let receiver = if local && fwd.flags & PORT_F_SECURITY != 0 {
            Some(*self.tables.ports.get(&fwd.ifindex).ok_or(UnknownPort)?)
                .map(|info| (fwd.ifindex, info))
        } else {
            None
        };
        let sender = secure.then_some((ifindex, port));
        if sender.is_some() || receiver.is_some() {
            self.enforce(f, &p, sender, receiver)?;
        }
        if !local && p.ip_len > port.mtu as usize && v4 && be16(f, 20) & 0x4000 == 0 {
            return Err(MtuExceeded);
        }
        Ok(Verdict::Redirect)
    }

    /// The security groups of the secured ends (`(ifindex, info)`), with
    /// connection tracking; the same order of checks as policy.rs.
    fn enforce(
        &self,
        f: &[u8],
        p: &Parsed,
        s: Option<(u32, PortInfo)>,
        r: Option<(u32, PortInfo)>,
    ) -> Result<(), DropReason> {
        let v4 = p.l3 == 0x0800;
        if !v4 && p.proto == 58 && (p.icmp_type == 135 || p.icmp_type == 136) {
            return Ok(());
        }
        let owner = s.or(r).expect("one end is secured").1;
        let zone = owner.vni;
        let now = now_ns();
        let fkey = (
            zone,
            p.src[12..16].try_into().expect("4 bytes"),
            p.dst[12..16].try_into().expect("4 bytes"),
            p.ip_id,
            p.proto,
        );
        if p.later_fragment {
            return match self.frags.borrow().get(&fkey) {
                Some(t) if !idle_longer_than(*t, now, FRAG_TIMEOUT_NS) => Ok(()),
                _ => Err(FragmentUnknown),
            };
        }
        let icmp_error = match (v4, p.proto) {
            (true, 1) => matches!(p.icmp_type, 3 | 11 | 12),
            (false, 58) => matches!(p.icmp_type, 1..=4),
            _ => false,
        };
        if icmp_error {
            return self.related(f, p, zone, now);
        }
        let key = ct_key(zone, p.proto, (p.src, p.sport), (p.dst, p.dport));
        let tcp = p.proto == 6;
        let mut ct = self.ct.borrow_mut();
        if let Some(e) = ct.get_mut(&key) {
            if !ct_expired(e.state, e.last_seen_ns, now) {
                let reply = (p.src, p.sport) != e.orig;
                if e.epoch != self.epoch {
                    if self.rules_allow(p, s, r, reply).is_err() {
                        ct.remove(&key);
                        return Err(SgRevoked);
                    }
                    e.epoch = self.epoch;
                }
                (e.state, e.flags) = ct_advance(e.state, e.flags, tcp, p.tcp_flags, reply);
                e.last_seen_ns = now;
                if p.first_fragment {
                    self.frags.borrow_mut().insert(fkey, now);
                }
                return Ok(());
            }
            ct.remove(&key);
        }
        if tcp && !tcp_opens(p.tcp_flags) {
            return Err(CtTcpNotSyn);
        }
        self.rules_allow(p, s, r, false)?;
        let port_use = ct.values().filter(|e| e.owner_slot == owner.slot).count();
        if port_use >= owner.ct_port_quota as usize {
            return Err(CtPortQuota);
        }
        let tenant_use = ct
            .values()
            .filter(|e| e.owner_tenant == owner.tenant)
            .count();
        if tenant_use >= owner.ct_tenant_quota as usize {
            return Err(CtTenantQuota);
        }
        let state = if tcp {
            ct_state::TCP_SYN_SENT
        } else {
            ct_state::ONE_WAY
        };
        ct.insert(
            key,
            ModelCt {
                orig: (p.src, p.sport),
                state,
                flags: 0,
                epoch: self.epoch,
                last_seen_ns: now,
                owner_slot: owner.slot,
                owner_tenant: owner.tenant,
            },
        );
        if p.first_fragment {
            self.frags.borrow_mut().insert(fkey, now);
        }
        Ok(())
    }

    /// `reply`: the packet goes from the flow's responder to its originator.
    fn rules_allow(
        &self,
        p: &Parsed,
        s: Option<(u32, PortInfo)>,
        r: Option<(u32, PortInfo)>,
        reply: bool,
    ) -> Result<(), DropReason> {
        let service = if reply { p.sport } else { p.dport };
        let v4 = p.l3 == 0x0800;
        if let Some((i, _)) = s {
            let dir = if reply {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            if !self.port_allows(i, dir, to_ip(p.dst, v4), p.proto, service) {
                return Err(if reply {
                    SgIngressDenied
                } else {
                    SgEgressDenied
                });
            }
        }
        if let Some((i, _)) = r {
            let dir = if reply {
                Direction::Egress
            } else {
                Direction::Ingress
            };
            if !self.port_allows(i, dir, to_ip(p.src, v4), p.proto, service) {
                return Err(if reply {
                    SgEgressDenied
                } else {
                    SgIngressDenied
                });
            }
        }
        Ok(())
    }

    /// API.md's rule semantics, one rule at a time.
    fn port_allows(
        &self,
        ifindex: u32,
        dir: Direction,
        remote: IpAddr,
        proto: u8,
        port: u16,
    ) -> bool {
        let Some(rules) = self.rules.get(&ifindex) else {
            return false;
        };
        rules.iter().any(|rule| {
            rule.direction == dir
                && (rule.ethertype == Ethertype::IPv4) == remote.is_ipv4()
                && rule
                    .protocol
                    .number(rule.ethertype)
                    .is_none_or(|n| n == proto)
                && rule
                    .ports
                    .is_none_or(|r| (r.first..=r.last).contains(&port))
                && match &rule.remote {
                    None => true,
                    Some(Remote::Cidr(c)) => c.contains(&remote),
                    Some(Remote::Group(g)) => self
                        .members
                        .get(g)
                        .is_some_and(|m| m.iter().any(|n| n.contains(&remote))),
                }
        })
    }

    /// An ICMP error passes if the packet it quotes is a tracked flow.
    fn related(&self, f: &[u8], p: &Parsed, zone: u32, now: u64) -> Result<(), DropReason> {
        let unrelated = Err(IcmpErrorUnrelated);
        if p.l4_off > 14 + 60 {
            return unrelated;
        }
        let off = p.l4_off + 8;
        let (proto, src, dst, l4) = if p.l3 == 0x0800 {
            if f.len() < off + 20 {
                return unrelated;
            }
            let ihl = (f[off] & 0x0f) as usize * 4;
            if ihl < 20 {
                return unrelated;
            }
            (
                f[off + 9],
                v4_mapped(&f[off + 12..off + 16]),
                v4_mapped(&f[off + 16..off + 20]),
                off + ihl,
            )
        } else {
            if f.len() < off + 40 {
                return unrelated;
            }
            let a = |o: usize| -> [u8; 16] { f[o..o + 16].try_into().expect("16 bytes") };
            (f[off + 6], a(off + 8), a(off + 24), off + 40)
        };
        let (mut sport, mut dport) = (0, 0);
        match proto {
            6 | 17 => {
                if f.len() < l4 + 4 {
                    return unrelated;
                }
                (sport, dport) = (be16(f, l4), be16(f, l4 + 2));
            }
            1 | 58 => {
                if f.len() < l4 + 8 {
                    return unrelated;
                }
                match f[l4] {
                    8 | 128 => sport = be16(f, l4 + 4),
                    0 | 129 => dport = be16(f, l4 + 4),
                    _ => {}
                }
            }
            _ => {}
        }
        let key = ct_key(zone, proto, (src, sport), (dst, dport));
        match self.ct.borrow().get(&key) {
            Some(e) if !ct_expired(e.state, e.last_seen_ns, now) => Ok(()),
            _ => unrelated,
        }
    }

    fn nd(&self, f: &[u8], port: &PortInfo) -> Result<Verdict, DropReason> {
        if f.len() < 54 + 24 {
            return Err(NdMalformed);
        }
        if (be16(f, 18) as usize) < 24 || f[21] != 255 || f[55] != 0 {
            return Err(NdMalformed);
        }
        if f[22..38] == [0; 16] {
            return Err(NdDadProbe);
        }
        let target: [u8; 16] = f[62..78].try_into().expect("16 bytes");
        self.neighbour(port.vni, target).ok_or(NdUnknownTarget)?;
        Ok(Verdict::Redirect)
    }

    /// What the uplink program (XDP or TC) does with a frame from the underlay.
    pub fn uplink(&self, f: &[u8]) -> Verdict {
        match self.uplink_inner(f) {
            Ok(v) => v,
            Err(r) => Verdict::Drop(r),
        }
    }

    fn uplink_inner(&self, f: &[u8]) -> Result<Verdict, DropReason> {
        if f.len() < 34 || be16(f, 12) != 0x0800 || f[23] != 17 || f[14] >> 4 != 4 {
            return Ok(Verdict::Pass);
        }
        if f[30..34] != self.tables.config.vtep {
            return Ok(Verdict::Pass);
        }
        let frag = be16(f, 20);
        if frag & 0x1fff != 0 {
            return Ok(Verdict::Pass);
        }
        if f[14] != 0x45 {
            let ihl = (f[14] & 0x0f) as usize * 4;
            if ihl < 20 || f.len() < 14 + ihl + 8 {
                return Ok(Verdict::Pass);
            }
            if be16(f, 14 + ihl + 2) == VXLAN_PORT {
                return Err(MalformedIpv4);
            }
            return Ok(Verdict::Pass);
        }
        if f.len() < 42 || be16(f, 36) != VXLAN_PORT {
            return Ok(Verdict::Pass);
        }
        if frag & 0x2000 != 0 {
            return Err(VxlanFragmented);
        }
        if f.len() < 50 {
            return Err(VxlanTruncated);
        }
        if f[42] != 0x08 || f[43..46] != [0; 3] || f[49] != 0 {
            return Err(VxlanBadFlags);
        }
        let vni = u32::from_be_bytes([0, f[46], f[47], f[48]]);
        if !self.tables.networks.contains_key(&vni) {
            return Err(VxlanUnknownVni);
        }
        let src: [u8; 4] = f[26..30].try_into().expect("4 bytes");
        if !self.tables.vteps.contains_key(&VtepKey { vni, addr: src }) {
            return Err(VxlanUnknownVtep);
        }
        if f.len() < 64 {
            return Err(VxlanTruncated);
        }
        let dst = match self.forward(vni, mac(f, 50)) {
            Some(e) if e.kind == FWD_LOCAL => e,
            _ => return Err(VxlanUnknownDestination),
        };
        match self.forward(vni, mac(f, 56)) {
            Some(e) if e.kind == FWD_REMOTE && e.vtep == src => {}
            _ => return Err(VxlanSpoofedSource),
        }
        if dst.flags & PORT_F_SECURITY != 0 {
            let info = *self.tables.ports.get(&dst.ifindex).ok_or(UnknownPort)?;
            let inner = &f[50..];
            let p = Self::parse(inner)?;
            if p.l3 == 0x0806 {
                return Err(UnsupportedEthertype);
            }
            self.enforce(inner, &p, None, Some((dst.ifindex, info)))?;
        }
        Ok(Verdict::Redirect)
    }
}
