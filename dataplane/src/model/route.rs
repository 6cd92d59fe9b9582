//! Routing as API.md defines it, read from the snapshot's routers and
//! networks (not from the compiled route tables): a frame to its network's
//! gateway MAC goes to the router's network whose subnet holds the
//! destination, TTL decremented, or gets the router's ICMP error; a routed
//! frame from the underlay comes from a port of another of the router's
//! networks, behind the VTEP that sent it.
use std::net::IpAddr;

use cloison_abi::{
    DropReason::{self, *},
    *,
};
use ipnet::IpNet;

use super::{
    parse::{be16, mac, Parsed},
    to_ip, Model, Verdict,
};

/// A network as its router sees it.
#[derive(Clone, Debug)]
pub(crate) struct RoutedNet {
    pub vni: u32,
    pub mtu: u32,
    pub subnets: Vec<IpNet>,
    pub gateways: Vec<IpAddr>,
}

/// One router: its networks, and the zone its flows are tracked in (the
/// model's own numbering).
#[derive(Clone, Debug)]
pub(crate) struct ModelRouter {
    pub zone: u32,
    pub snat: bool,
    pub nets: Vec<RoutedNet>,
}

impl ModelRouter {
    fn net(&self, vni: u32) -> Option<&RoutedNet> {
        self.nets.iter().find(|n| n.vni == vni)
    }

    /// The network whose subnet holds `ip`.
    fn holding(&self, ip: IpAddr) -> Option<&RoutedNet> {
        self.nets
            .iter()
            .find(|n| n.subnets.iter().any(|s| s.contains(&ip)))
    }
}

fn link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
}

impl Model<'_> {
    fn router_of(&self, vni: u32) -> Option<&ModelRouter> {
        self.routers.iter().find(|r| r.net(vni).is_some())
    }

    /// A frame port `ifindex` sent to its gateway MAC.
    pub(super) fn route(
        &self,
        f: &[u8],
        p: &Parsed,
        ifindex: u32,
        port: &PortInfo,
    ) -> Result<Verdict, DropReason> {
        let v4 = p.l3 == 0x0800;
        let router = self.router_of(port.vni).ok_or(NotRouted)?;
        let here = router.net(port.vni).expect("the router's network");
        let gateway = here
            .gateways
            .iter()
            .find(|g| g.is_ipv4() == v4)
            .ok_or(NotRouted)?;
        let (src, dst) = (to_ip(p.src, v4), to_ip(p.dst, v4));
        if dst == *gateway {
            // The router answers pings of its address (as it answers ARP
            // and ND), not anything else sent to it.
            let echo = if v4 {
                (p.proto, p.icmp_type) == (1, 8)
            } else {
                (p.proto, p.icmp_type) == (58, 128)
            };
            return if echo && !p.first_fragment && !p.later_fragment {
                Ok(Verdict::Back)
            } else {
                Err(ToRouter)
            };
        }
        if link_local(src) || link_local(dst) {
            return Err(NoRoute);
        }
        let Some(there) = router.holding(dst) else {
            return if v4 {
                self.to_outside(f, p, ifindex, port, router.zone, router.snat)
            } else {
                Err(NoRoute)
            };
        };
        if there.vni == port.vni {
            return Err(NoRoute);
        }
        let dst_mac = self.neighbour(there.vni, p.dst).ok_or(RouteNoNeighbour)?;
        if dst_mac == gateway_mac(there.vni) {
            return Err(ToRouter);
        }
        let fwd = self.forward(there.vni, dst_mac).ok_or(RouteNoNeighbour)?;
        let ttl = if v4 { f[22] } else { f[21] };
        if ttl <= 1 {
            return time_exceeded(p);
        }
        let secure = port.flags & PORT_F_SECURITY != 0;
        let sender = secure.then_some((ifindex, *port));
        if p.ip_len > there.mtu as usize {
            if secure {
                self.enforce(f, p, router.zone, sender, None)?;
            }
            return if v4 && be16(f, 20) & 0x4000 == 0 {
                Err(MtuExceeded)
            } else {
                Ok(Verdict::Back)
            };
        }
        let local = fwd.kind == FWD_LOCAL;
        let receiver = if local && fwd.flags & PORT_F_SECURITY != 0 {
            Some((
                fwd.ifindex,
                *self.tables.ports.get(&fwd.ifindex).ok_or(UnknownPort)?,
            ))
        } else {
            None
        };
        if sender.is_some() || receiver.is_some() {
            self.enforce(f, p, router.zone, sender, receiver)?;
        }
        if local {
            Ok(Verdict::ToPort(fwd.ifindex))
        } else {
            self.to_vtep(fwd.vtep)
        }
    }

    /// The zone of a routed frame (from network `vni`'s gateway MAC) that
    /// VTEP `vtep` sent, if its source is a port of another of the router's
    /// networks behind that VTEP.
    pub(super) fn routed_from(
        &self,
        vni: u32,
        vtep: [u8; 4],
        src: [u8; 16],
        v4: bool,
    ) -> Result<u32, DropReason> {
        let router = self.router_of(vni).ok_or(VxlanSpoofedSource)?;
        let ip = to_ip(src, v4);
        if link_local(ip) {
            return Err(VxlanSpoofedSourceIp);
        }
        let from = router
            .holding(ip)
            .filter(|n| n.vni != vni)
            .ok_or(VxlanSpoofedSourceIp)?;
        let sender_mac = self
            .remote_mac(from.vni, src)
            .or_else(|| self.neighbour(from.vni, src))
            .ok_or(VxlanSpoofedSourceIp)?;
        match self.forward(from.vni, sender_mac) {
            Some(e) if e.kind == FWD_REMOTE && e.vtep == vtep => Ok(router.zone),
            _ => Err(VxlanSpoofedSourceIp),
        }
    }
}

/// A routed packet whose TTL runs out: the router's ICMP error back, never
/// one about an ICMP error.
pub(super) fn time_exceeded(p: &Parsed) -> Result<Verdict, DropReason> {
    if p.is_icmp_error() {
        Err(TtlExceeded)
    } else {
        Ok(Verdict::Back)
    }
}

/// Whether the inner frame at `f` comes from its network's gateway MAC.
pub(super) fn from_gateway(inner: &[u8], vni: u32) -> bool {
    mac(inner, 6) == gateway_mac(vni)
}
