//! The router stage: a frame a VM sends to its network's gateway MAC (and
//! not to the agent's services) is routed here, on the VM's own host, by
//! the router that joins the network: the destination address gives the
//! router's network that holds it, the neighbour table its MAC there, and
//! forwarding the port (local or behind a VTEP). The frame leaves from the
//! destination network's gateway MAC with its TTL or hop limit decremented;
//! one that runs out, or does not fit the destination network, gets an
//! ICMP error from the router's address instead. The flow is tracked in the
//! router's zone (one for both directions, on every host it crosses).
//!
//! An IPv4 address of no network of the router goes to the outside (see
//! `nat`) when the port has a floating IP or the router source-NATs.
//!
//! Underlay side (the uplink stage): a routed frame arrives from the
//! gateway MAC of its network, and is held to the host of the port its
//! source address belongs to.
use aya_ebpf::programs::TcContext;
use cloison_abi::*;

use crate::{
    decision::*,
    hdr::*,
    maps::{forward, neighbour, route, router_iface, CL_EXTERNAL, CL_PORT_FIPS},
    parse::{segment_len, Parsed, L3},
};

/// Routes a frame from `port` to its gateway MAC: fills `peer` and `out`,
/// rewrites the Ethernet header and the TTL, and says what comes next.
#[inline(always)]
pub fn from_port(
    ctx: &TcContext,
    c: &Cursor,
    ifindex: u32,
    port: &PortInfo,
    p: &Parsed,
    peer: &mut ForwardEntry,
    out: &mut Out,
) -> Result<Next, DropReason> {
    let rif = router_iface(port.vni).ok_or(DropReason::NotRouted)?;
    let v4 = p.l3 == L3::Ipv4;
    let family = match p.l3 {
        L3::Ipv4 => RIF_F_V4,
        L3::Ipv6 => RIF_F_V6,
        _ => 0,
    };
    if rif.flags & family == 0 {
        return Err(DropReason::NotRouted);
    }
    let to_gateway = if v4 {
        eq16(&p.dst, &v4_mapped(rif.gw4))
    } else {
        eq16(&p.dst, &rif.gw6)
    };
    if to_gateway {
        // A ping of the router's address is answered, as ARP and ND are,
        // on the VM's host; anything else to the router is dropped.
        let echo = if v4 {
            p.proto == IPPROTO_ICMP && p.icmp_type == ICMP_ECHO_REQUEST
        } else {
            p.proto == IPPROTO_ICMPV6 && p.icmp_type == ICMPV6_ECHO_REQUEST
        };
        return if echo && !p.first_fragment && !p.later_fragment {
            Ok(Next::of(NEXT_ROUTER_ECHO, 0))
        } else {
            Err(DropReason::ToRouter)
        };
    }
    if !v4 && (link_local(&p.src) || link_local(&p.dst)) {
        return Err(DropReason::NoRoute);
    }
    let ttl_at = if v4 { ETH_LEN + 8 } else { ETH_LEN + 7 };
    let ttl: *mut u8 = c.at(ttl_at).ok_or(DropReason::TruncatedEthernet)?;
    let r = match route(rif.router, p.dst) {
        Some(r) => r,
        None if v4 => {
            // To the outside (NAT), if the port or its router may go there.
            leaves(ifindex, &rif, p)?;
            out.zone = ROUTER_ZONE | rif.router;
            if unsafe { *ttl } <= 1 {
                return time_exceeded(p, v4);
            }
            return Ok(Next::of(NEXT_EXTERNAL, 0));
        }
        None => return Err(DropReason::NoRoute),
    };
    if r.vni == port.vni {
        return Err(DropReason::NoRoute);
    }
    let mac = neighbour(r.vni, p.dst).ok_or(DropReason::RouteNoNeighbour)?;
    let gw_out = gateway_mac(r.vni);
    if mac_eq(&mac, &gw_out) {
        // Another of the router's own addresses (or the metadata one).
        return Err(DropReason::ToRouter);
    }
    let fwd = forward(r.vni, mac).ok_or(DropReason::RouteNoNeighbour)?;
    *peer = fwd;
    out.vni = r.vni;
    out.zone = ROUTER_ZONE | rif.router;

    if unsafe { *ttl } <= 1 {
        return time_exceeded(p, v4);
    }
    if segment_len(ctx, c, p) > r.mtu as usize {
        let kind = if v4 { NEXT_TOO_BIG_V4 } else { NEXT_TOO_BIG_V6 };
        return Ok(Next::of(kind, TOO_BIG_ROUTED));
    }

    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    unsafe {
        (*eth).dst = mac;
        (*eth).src = gw_out;
        *ttl -= 1;
    }
    if v4 {
        // RFC 1624: the TTL is the high byte of its 16-bit word.
        let ip: *mut Ipv4Hdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedIpv4)?;
        let sum = u16::from_be_bytes(unsafe { (*ip).csum }) as u32 + 0x0100;
        let sum = (sum + (sum >> 16)) as u16;
        unsafe { (*ip).csum = sum.to_be_bytes() };
    }
    let kind = if fwd.kind == FWD_LOCAL {
        NEXT_LOCAL
    } else {
        NEXT_ENCAP
    };
    Ok(Next::of(kind, 0))
}

/// A TTL that runs out: the router's ICMP error, except about an ICMP
/// error (RFC 1812 4.3.2.7).
#[inline(always)]
fn time_exceeded(p: &Parsed, v4: bool) -> Result<Next, DropReason> {
    if p.is_icmp_error() {
        return Err(DropReason::TtlExceeded);
    }
    let kind = if v4 {
        NEXT_TIME_EXCEEDED_V4
    } else {
        NEXT_TIME_EXCEEDED_V6
    };
    Ok(Next::of(kind, 0))
}

/// Whether an IPv4 frame of port `ifindex` (whose router is `rif`) to an
/// address of no network of the router goes to the outside: from the
/// port's floating IP (its first IPv4 address only), or SNATed if the
/// router does and the host has an external IP.
#[inline(always)]
fn leaves(ifindex: u32, rif: &RouterIface, p: &Parsed) -> Result<(), DropReason> {
    let ext = CL_EXTERNAL.get(0).ok_or(DropReason::NoRoute)?;
    if let Some(f) = CL_PORT_FIPS.get_ptr(&ifindex) {
        if eq16(&v4_mapped(unsafe { (*f).inner }), &p.src) {
            return if ext.ifindex == 0 {
                Err(DropReason::NoExternal)
            } else {
                Ok(())
            };
        }
    }
    if rif.flags & RIF_F_SNAT == 0 {
        return Err(DropReason::NoRoute);
    }
    if ext.ifindex == 0 || ext.ip == [0; 4] {
        return Err(DropReason::NoExternal);
    }
    Ok(())
}
