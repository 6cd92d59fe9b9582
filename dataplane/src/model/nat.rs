//! To and from the outside as API.md defines it (IPv4): a port's traffic
//! to an address of no network of its router leaves from its floating IP
//! (its first IPv4 address only) or, if the router SNATs, from the host's
//! external IP on a port the model hands out itself (the lowest free one:
//! not the kernel's choice, which only has to be free); the outside reaches
//! a floating IP's port, and a SNATed flow's replies its inside end,
//! through the port's ingress rules.
use std::net::Ipv4Addr;

use cloison_abi::{
    DropReason::{self, *},
    *,
};

use super::{
    parse::{be16, parse, Parsed},
    Model, Verdict,
};

/// A local port's floating IP: the port, its address, its flows' zone.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ModelFip {
    pub ip: Ipv4Addr,
    pub ifindex: u32,
    pub inner: Ipv4Addr,
    pub zone: u32,
}

/// (protocol, outside address, outside port, external port) → (zone,
/// inside address, inside port, ifindex).
pub(crate) type ModelSnat =
    std::collections::BTreeMap<(u8, [u8; 4], u16, u16), (u32, [u8; 4], u16, u32)>;

fn v4(a: [u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// The flow NAT reads: TCP, UDP or ICMP echo, no fragment.
fn natable(f: &[u8], p: &Parsed) -> Result<(), DropReason> {
    if be16(f, 20) & 0x3fff != 0 {
        return Err(NatFragment);
    }
    match p.proto {
        6 | 17 => Ok(()),
        1 if matches!(p.icmp_type, 0 | 8) => Ok(()),
        _ => Err(NatFragment),
    }
}

impl Model<'_> {
    /// A frame of port `ifindex` (its router's zone `zone`, SNAT or not)
    /// for an IPv4 address of no network of the router.
    pub(super) fn to_outside(
        &self,
        f: &[u8],
        p: &Parsed,
        ifindex: u32,
        port: &PortInfo,
        zone: u32,
        snat: bool,
    ) -> Result<Verdict, DropReason> {
        let fip = self
            .fips
            .iter()
            .find(|x| x.ifindex == ifindex && x.inner.octets() == v4(p.src));
        let external_ip = (self.tables.external_ip != [0; 4]).then_some(self.tables.external_ip);
        match fip {
            Some(_) if !self.external => return Err(NoExternal),
            Some(_) => {}
            None if !snat => return Err(NoRoute),
            None if !self.external || external_ip.is_none() => return Err(NoExternal),
            None => {}
        }
        if f[22] <= 1 {
            return super::route::time_exceeded(p);
        }
        if port.flags & PORT_F_SECURITY != 0 {
            self.enforce(f, p, zone, Some((ifindex, *port)), None)?;
        }
        natable(f, p)?;
        if fip.is_none() {
            if p.proto == 1 && p.icmp_type != 8 {
                return Err(NatFragment);
            }
            let (sport, dport) = if p.proto == 1 {
                (p.sport, 0)
            } else {
                (p.sport, p.dport)
            };
            let mut snat = self.snat.borrow_mut();
            let mine = (zone, v4(p.src), sport, ifindex);
            let taken = |ext: u16| snat.get(&(p.proto, v4(p.dst), dport, ext)).copied();
            if !(SNAT_PORT_MIN..=SNAT_PORT_MAX).any(|e| taken(e) == Some(mine)) {
                let free = (SNAT_PORT_MIN..=SNAT_PORT_MAX)
                    .find(|e| taken(*e).is_none())
                    .ok_or(SnatExhausted)?;
                snat.insert((p.proto, v4(p.dst), dport, free), mine);
            }
        }
        Ok(Verdict::ToExternal)
    }

    /// What the external interface's program does with a frame from the
    /// outside.
    pub fn external(&self, f: &[u8]) -> Verdict {
        match self.external_inner(f) {
            Ok(v) => v,
            Err(r) => Verdict::Drop(r),
        }
    }

    fn external_inner(&self, f: &[u8]) -> Result<Verdict, DropReason> {
        if f.len() < 14 || !self.external {
            return Ok(Verdict::Host);
        }
        match be16(f, 12) {
            0x0806 => {
                let request = f.len() >= 42 && be16(f, 20) == 1;
                let ours = request && self.fips.iter().any(|x| x.ip.octets() == f[38..42]);
                return Ok(if ours { Verdict::Back } else { Verdict::Host });
            }
            0x0800 if f.len() >= 34 => {}
            _ => return Ok(Verdict::Host),
        }
        let dst: [u8; 4] = f[30..34].try_into().expect("4 bytes");
        let fip = self.fips.iter().find(|x| x.ip.octets() == dst);
        let to_us = self.tables.external_ip != [0; 4] && dst == self.tables.external_ip;
        if fip.is_none() && !to_us {
            return Ok(Verdict::Host);
        }
        let p = match parse(f) {
            Ok(p) => p,
            Err(_) if fip.is_none() => return Ok(Verdict::Host),
            Err(e) => return Err(e),
        };
        if p.proto == 1 && matches!(p.icmp_type, 3 | 11) {
            return self.error_back(f, &p, fip.copied());
        }
        match natable(f, &p) {
            Ok(()) => {}
            Err(_) if fip.is_none() => return Ok(Verdict::Host),
            Err(e) => return Err(e),
        }
        // Who it is for, and the frame as it is delivered.
        let mut inner = f.to_vec();
        let (ifindex, zone) = match fip {
            Some(x) => {
                inner[30..34].copy_from_slice(&x.inner.octets());
                (x.ifindex, x.zone)
            }
            None => {
                if p.proto == 1 && p.icmp_type != 0 {
                    return Ok(Verdict::Host);
                }
                let (ext, outside_port) = if p.proto == 1 {
                    (p.dport, 0)
                } else {
                    (p.dport, p.sport)
                };
                let Some(&(zone, inside, inside_port, ifindex)) =
                    self.snat
                        .borrow()
                        .get(&(p.proto, v4(p.src), outside_port, ext))
                else {
                    return Ok(Verdict::Host);
                };
                inner[30..34].copy_from_slice(&inside);
                let at = p.l4_off + if p.proto == 1 { 4 } else { 2 };
                inner[at..at + 2].copy_from_slice(&inside_port.to_be_bytes());
                (ifindex, zone)
            }
        };
        self.deliver_back(f, inner, ifindex, zone)
    }

    /// An ICMP error from the outside about a NATed flow, as API.md says:
    /// the quoted packet left from the floating IP `fip`, or from the
    /// external IP on a port of a mapping; the error and the packet it
    /// quotes are translated back for the port, which takes it as related
    /// to the flow. Anything else is the host's (to the external IP), or
    /// dropped (to a floating IP).
    fn error_back(
        &self,
        f: &[u8],
        p: &Parsed,
        fip: Option<ModelFip>,
    ) -> Result<Verdict, DropReason> {
        let not_ours = match fip {
            Some(_) => Err(IcmpErrorUnrelated),
            None => Ok(Verdict::Host),
        };
        let q = p.l4_off + 8;
        let to: [u8; 4] = match fip {
            Some(x) => x.ip.octets(),
            None => self.tables.external_ip,
        };
        if be16(f, 20) & 0x3fff != 0 || f.len() < q + 28 || f[q] != 0x45 || f[q + 12..q + 16] != to
        {
            return not_ours;
        }
        let (proto, outside) = (f[q + 9], [f[q + 16], f[q + 17], f[q + 18], f[q + 19]]);
        // The quoted packet's NATed port: where it is, it, the outside's.
        let (port_at, ext, outside_port) = match proto {
            6 | 17 => (q + 20, be16(f, q + 20), be16(f, q + 22)),
            1 if f[q + 20] == 8 => (q + 24, be16(f, q + 24), 0),
            _ => return not_ours,
        };
        let (ifindex, zone, inside, inside_port) = match fip {
            Some(x) => (x.ifindex, x.zone, x.inner.octets(), None),
            None => {
                let Some(&(zone, inside, inside_port, ifindex)) =
                    self.snat.borrow().get(&(proto, outside, outside_port, ext))
                else {
                    return not_ours;
                };
                (ifindex, zone, inside, Some(inside_port))
            }
        };
        let mut inner = f.to_vec();
        inner[30..34].copy_from_slice(&inside);
        inner[q + 12..q + 16].copy_from_slice(&inside);
        if let Some(port) = inside_port {
            inner[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
        }
        self.deliver_back(f, inner, ifindex, zone)
    }

    /// `inner`, what frame `f` from the outside becomes inside, to local
    /// port `ifindex` through its ingress rules in conntrack zone `zone`.
    fn deliver_back(
        &self,
        f: &[u8],
        mut inner: Vec<u8>,
        ifindex: u32,
        zone: u32,
    ) -> Result<Verdict, DropReason> {
        let info = *self.tables.ports.get(&ifindex).ok_or(UnknownPort)?;
        if f[22] <= 1 {
            return Err(TtlExceeded);
        }
        inner[0..6].copy_from_slice(&info.mac);
        inner[6..12].copy_from_slice(&gateway_mac(info.vni));
        if info.flags & PORT_F_SECURITY != 0 {
            let q = parse(&inner)?;
            self.enforce(&inner, &q, zone, None, Some((ifindex, info)))?;
        }
        Ok(Verdict::ToPort(ifindex))
    }
}
