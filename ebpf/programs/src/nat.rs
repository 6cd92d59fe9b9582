//! To and from the outside, at the VM's host (IPv4 only, as Neutron's
//! routers): a frame the router stage found for no network of its router
//! leaves through the external interface, from the port's floating IP
//! (1:1, its first IPv4 address only) or, if the router source-NATs, from
//! the host's external IP with an external port allocated for the flow.
//! The way back (TC ingress of the external interface, `cl_external`): ARP
//! for the floating IPs answered; a packet to a floating IP, or to the
//! external IP for a mapped flow, and an ICMP error about either,
//! translated back (the pipeline then checks
//! the port's ingress rules, conntrack in the router's zone, and delivers). Anything else goes
//! on untouched (the host's own traffic, the uplink's program after this).
//!
//! Checksums are updated with the kernel's helpers (which know a
//! CHECKSUM_PARTIAL packet's pseudo-header); every write goes through a
//! helper, so no packet pointer is kept across one.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    helpers::generated::bpf_redirect,
    programs::TcContext,
};
use cloison_abi::*;

use crate::{
    hdr::*,
    maps::{forward, CL_EXTERNAL, CL_FIPS, CL_PORTS, CL_PORT_FIPS, CL_SNAT, CL_SNAT_REV, NO_SLOT},
    mode::{note, TRACE},
    packet::{next_hop, redirect_to, Refusals},
};

/// Ports SNAT tries for a new flow before it counts the table exhausted.
const SNAT_TRIES: u32 = 16;

/// The parts of an IPv4 packet NAT rewrites, read from the packet.
struct Flow {
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    proto: u8,
    /// Offset of the L4 header.
    l4: usize,
    /// The inside port (TCP/UDP source, an echo request's identifier).
    sport: [u8; 2],
    /// The outside port (TCP/UDP destination; 0 for ICMP echo).
    dport: [u8; 2],
    /// ICMP: the echo's type (8 request, 0 reply).
    icmp_type: u8,
}

/// Reads the flow of an IPv4 frame for NAT: TCP, UDP or ICMP echo (request
/// or reply), never a fragment.
#[inline(always)]
fn flow(c: &Cursor) -> Result<Flow, DropReason> {
    let ip: *mut Ipv4Hdr = c.at(ETH_LEN).ok_or(DropReason::TruncatedIpv4)?;
    let ip = unsafe { &*ip };
    if be16(ip.frag) & 0x3fff != 0 {
        return Err(DropReason::NatFragment);
    }
    let l4 = ETH_LEN + ((ip.vihl & 0x0f) as usize) * 4;
    let (sport, dport, icmp_type) = match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: *mut [u8; 4] = c.at(l4).ok_or(DropReason::TruncatedL4)?;
            let p = unsafe { *ports };
            ([p[0], p[1]], [p[2], p[3]], 0)
        }
        IPPROTO_ICMP => {
            let h: *mut [u8; 8] = c.at(l4).ok_or(DropReason::TruncatedL4)?;
            let h = unsafe { *h };
            if h[0] != ICMP_ECHO_REQUEST && h[0] != ICMP_ECHO_REPLY {
                return Err(DropReason::NatFragment);
            }
            ([h[4], h[5]], [0, 0], h[0])
        }
        _ => return Err(DropReason::NatFragment),
    };
    Ok(Flow {
        src: ip.src,
        dst: ip.dst,
        ttl: ip.ttl,
        proto: ip.proto,
        l4,
        sport,
        dport,
        icmp_type,
    })
}

/// Offset of the L4 checksum, and whether the pseudo-header is in it.
#[inline(always)]
fn l4_csum(f: &Flow) -> (usize, u64) {
    match f.proto {
        IPPROTO_TCP => (f.l4 + 16, BPF_F_PSEUDO_HDR as u64),
        IPPROTO_UDP => (f.l4 + 6, (BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) as u64),
        _ => (f.l4 + 2, 0),
    }
}

/// Rewrites an address (`at`: 12 source, 16 destination of the IPv4
/// header), a port (`port_at` from the L4 header, if it changes) and the
/// TTL (one less), checksums included.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    f: &Flow,
    at: usize,
    from: [u8; 4],
    to: [u8; 4],
    port: Option<(usize, [u8; 2], [u8; 2])>,
) -> Result<(), DropReason> {
    let e = DropReason::NatFragment;
    let (csum, pseudo) = l4_csum(f);
    let (a, b) = (
        u32::from_ne_bytes(from) as u64,
        u32::from_ne_bytes(to) as u64,
    );
    if f.proto != IPPROTO_ICMP {
        ctx.l4_csum_replace(csum, a, b, pseudo | 4).map_err(|_| e)?;
    }
    ctx.l3_csum_replace(ETH_LEN + 10, a, b, 4).map_err(|_| e)?;
    ctx.store(ETH_LEN + at, &to, 0).map_err(|_| e)?;
    if let Some((off, old, new)) = port {
        let (a, b) = (
            u16::from_ne_bytes(old) as u64,
            u16::from_ne_bytes(new) as u64,
        );
        let flags = if f.proto == IPPROTO_UDP {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        };
        ctx.l4_csum_replace(csum, a, b, flags | 2).map_err(|_| e)?;
        ctx.store(f.l4 + off, &new, 0).map_err(|_| e)?;
    }
    let old = u16::from_ne_bytes([f.ttl, f.proto]) as u64;
    let new = u16::from_ne_bytes([f.ttl - 1, f.proto]) as u64;
    ctx.l3_csum_replace(ETH_LEN + 10, old, new, 2)
        .map_err(|_| e)?;
    ctx.store(ETH_LEN + 8, &(f.ttl - 1), 0).map_err(|_| e)?;
    Ok(())
}

/// A flow's external port: the one it has, or a free one (tried from a
/// hash of the flow). A mapping whose flow conntrack no longer tracks is
/// free again.
#[inline(always)]
fn snat_port(
    ifindex: u32,
    zone: u32,
    f: &Flow,
    live: impl Fn(&SnatRevKey, &SnatRevEntry) -> bool,
) -> Result<[u8; 2], DropReason> {
    if f.proto == IPPROTO_ICMP && f.icmp_type != ICMP_ECHO_REQUEST {
        // Only what starts a flow gets a mapping.
        return Err(DropReason::NatFragment);
    }
    let key = SnatKey {
        zone,
        inside: f.src,
        outside: f.dst,
        inside_port: f.sport,
        outside_port: f.dport,
        proto: f.proto,
        _pad: [0; 3],
    };
    let mine = SnatRevEntry {
        ifindex,
        zone,
        inside: f.src,
        inside_port: f.sport,
        _pad: [0; 2],
    };
    let rev = |port: [u8; 2]| SnatRevKey {
        outside: f.dst,
        port,
        outside_port: f.dport,
        proto: f.proto,
        _pad: [0; 3],
    };
    if let Some(e) = CL_SNAT.get_ptr(&key) {
        let port = unsafe { (*e).port };
        match CL_SNAT_REV.get_ptr(&rev(port)) {
            Some(r) if unsafe { *r } == mine => {
                note(trace::NAT, u16::from_be_bytes(port) as u32, 0, 0);
                return Ok(port);
            }
            // Evicted: take it back if it is free.
            None if TRACE
                || CL_SNAT_REV
                    .insert(&rev(port), &mine, BPF_NOEXIST as u64)
                    .is_ok() =>
            {
                note(trace::NAT, u16::from_be_bytes(port) as u32, 1, 0);
                return Ok(port);
            }
            _ => {}
        }
    }
    let mut h = 0x811c_9dc5u32;
    for w in [
        zone,
        u32::from_ne_bytes(f.src),
        u32::from_ne_bytes(f.dst),
        u16::from_ne_bytes(f.sport) as u32 | (u16::from_ne_bytes(f.dport) as u32) << 16,
    ] {
        h = (h ^ w).wrapping_mul(0x0100_0193);
    }
    let range = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    let mut i = 0;
    while i < SNAT_TRIES {
        let port =
            (SNAT_PORT_MIN as u32 + (h.wrapping_add(i.wrapping_mul(0x9e37_79b9))) % range) as u16;
        let port = port.to_be_bytes();
        let rk = rev(port);
        let free = if TRACE {
            !taken(&rk, &live)
        } else {
            CL_SNAT_REV.insert(&rk, &mine, BPF_NOEXIST as u64).is_ok()
                || (!taken(&rk, &live) && CL_SNAT_REV.insert(&rk, &mine, 0).is_ok())
        };
        if free {
            if !TRACE {
                let _ = CL_SNAT.insert(&key, &SnatEntry { port, _pad: [0; 2] }, 0);
            }
            note(trace::NAT, u16::from_be_bytes(port) as u32, 1, 0);
            return Ok(port);
        }
        i += 1;
    }
    Err(DropReason::SnatExhausted)
}

/// Whether the mapping at `rk` still belongs to a flow (`live` says).
#[inline(always)]
fn taken(rk: &SnatRevKey, live: &impl Fn(&SnatRevKey, &SnatRevEntry) -> bool) -> bool {
    match CL_SNAT_REV.get_ptr(rk) {
        Some(r) => live(rk, unsafe { &*r }),
        None => false,
    }
}

/// Out to the external interface, from the floating IP or SNATed, for a
/// frame the router stage sent there and the sender's rules allowed.
#[inline(always)]
pub fn outbound(
    ctx: &TcContext,
    ifindex: u32,
    zone: u32,
    live: impl Fn(&SnatRevKey, &SnatRevEntry) -> bool,
) -> Result<i32, DropReason> {
    let ext = CL_EXTERNAL.get(0).ok_or(DropReason::NoExternal)?;
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let f = flow(&c)?;
    let fip = CL_PORT_FIPS
        .get_ptr(&ifindex)
        .map(|f| unsafe { *f })
        .filter(|fo| ip4_eq(&fo.inner, &f.src));
    let (src, port) = match fip {
        Some(fo) => (fo.ip, None),
        None => {
            let port = snat_port(ifindex, zone, &f, live)?;
            let off = if f.proto == IPPROTO_ICMP { 4 } else { 0 };
            (ext.ip, Some((off, f.sport, port)))
        }
    };

    let dport = if f.proto == IPPROTO_ICMP {
        0
    } else {
        u16::from_be_bytes(f.dport)
    };
    // Tenant traffic leaves only through the external interface.
    let why = Refusals {
        unreachable: DropReason::ExternalUnreachable,
        elsewhere: DropReason::ExternalUnreachable,
    };
    let mut eth = [0u8; 12];
    let resolved = next_hop(
        ctx,
        ext.ifindex,
        f.proto,
        dport,
        (ctx.len() - ETH_LEN as u32) as u16,
        (src, f.dst),
        why,
        &mut eth,
    )?;
    rewrite(ctx, &f, 12, f.src, src, port)?;
    if resolved {
        ctx.store(0, &eth, 0).map_err(|_| DropReason::NatFragment)?;
    }
    Ok(redirect_to(ext.ifindex, resolved))
}

/// What the external interface's program does with a packet.
pub enum Inbound {
    /// Not NAT's: on to the next program or the host.
    Pass,
    /// Answered (ARP): sent back out.
    Answered,
    /// Translated back for a local port, its rules not checked yet: the
    /// flow's zone.
    Deliver(ForwardEntry, u32),
}

/// Who an inbound packet is for: the port, its address, the port its flow
/// has inside (SNAT), and the flow's zone.
struct Target {
    ifindex: u32,
    inside: [u8; 4],
    inside_port: Option<[u8; 2]>,
    zone: u32,
}

impl Target {
    #[inline(always)]
    fn floating(fi: &FloatingIn) -> Target {
        Target {
            ifindex: fi.ifindex,
            inside: fi.inner,
            inside_port: None,
            zone: fi.zone,
        }
    }

    /// A SNAT mapping's inside end.
    #[inline(always)]
    fn mapped(r: &SnatRevEntry) -> Target {
        Target {
            ifindex: r.ifindex,
            inside: r.inside,
            inside_port: Some(r.inside_port),
            zone: r.zone,
        }
    }
}

/// A packet that entered by the external interface: `Err` with the port
/// slot to count the drop on.
#[inline(always)]
pub fn inbound(ctx: &TcContext) -> Result<Inbound, (DropReason, u32)> {
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let Some(eth) = c.at::<EthHdr>(0) else {
        return Ok(Inbound::Pass);
    };
    let Some(ext) = CL_EXTERNAL.get(0) else {
        return Ok(Inbound::Pass);
    };
    match be16(unsafe { (*eth).proto }) {
        ETH_P_ARP => return Ok(arp(&c, ext)),
        ETH_P_IP => {}
        _ => return Ok(Inbound::Pass),
    }
    let Some(ip) = c.at::<Ipv4Hdr>(ETH_LEN) else {
        return Ok(Inbound::Pass);
    };
    let (dst, proto) = unsafe { ((*ip).dst, (*ip).proto) };
    let fip = CL_FIPS.get_ptr(&dst).map(|f| unsafe { *f });
    if fip.is_none() && (!ip4_eq(&dst, &ext.ip) || ext.ip == [0; 4]) {
        return Ok(Inbound::Pass);
    }
    if proto == IPPROTO_ICMP {
        if let Some(v) = icmp_error_back(ctx, &c, fip, ext)? {
            return Ok(v);
        }
    }
    let f = match flow(&c) {
        Ok(f) => f,
        // Not a flow NAT knows: the host's own, if to its address.
        Err(_) if fip.is_none() => return Ok(Inbound::Pass),
        Err(e) => return Err((e, NO_SLOT)),
    };
    let t = match fip {
        Some(fi) => Target::floating(&fi),
        None => {
            if proto == IPPROTO_ICMP && f.icmp_type != ICMP_ECHO_REPLY {
                return Ok(Inbound::Pass);
            }
            // The reply's view: its destination port is the external one
            // (an echo reply's identifier), its source the outside port.
            let (port, outside_port) = if proto == IPPROTO_ICMP {
                (f.sport, [0, 0])
            } else {
                (f.dport, f.sport)
            };
            let rk = SnatRevKey {
                outside: f.src,
                port,
                outside_port,
                proto,
                _pad: [0; 3],
            };
            let Some(r) = CL_SNAT_REV.get_ptr(&rk) else {
                return Ok(Inbound::Pass);
            };
            Target::mapped(unsafe { &*r })
        }
    };
    translate_back(ctx, &f, &t)
}

/// An ICMP error from the outside (destination unreachable, frag needed
/// included; time exceeded) about a flow NAT translated: its quoted packet
/// left from the floating IP, or from the external IP on a mapped port.
/// Translated back for the port, the quoted packet too (its source address
/// and port, its header checksum, the ICMP checksum), so that a VM learns
/// its path MTU through NAT and traceroute sees the hops beyond; the
/// pipeline then lets it in only as related to the flow it tracks. `None`:
/// not an ICMP error.
#[inline(always)]
fn icmp_error_back(
    ctx: &TcContext,
    c: &Cursor,
    fip: Option<FloatingIn>,
    ext: &ExternalConfig,
) -> Result<Option<Inbound>, (DropReason, u32)> {
    let ip: *mut Ipv4Hdr = c.at(ETH_LEN).ok_or((DropReason::TruncatedIpv4, NO_SLOT))?;
    let (vihl, frag, ttl, src, dst) = unsafe {
        let ip = &*ip;
        (ip.vihl, ip.frag, ip.ttl, ip.src, ip.dst)
    };
    let l4 = ETH_LEN + ((vihl & 0x0f) as usize) * 4;
    let Some(h) = c.at::<[u8; 8]>(l4) else {
        return Ok(None);
    };
    let ty = unsafe { (*h)[0] };
    if ty != 3 && ty != 11 {
        return Ok(None);
    }
    let not_ours = match fip {
        Some(_) => Err((DropReason::IcmpErrorUnrelated, NO_SLOT)),
        // The host's own, if about one of its flows.
        None => Ok(Some(Inbound::Pass)),
    };
    let q = l4 + 8;
    let (Some(qip), Some(qp)) = (c.at::<Ipv4Hdr>(q), c.at::<[u8; 8]>(q + 20)) else {
        return not_ours;
    };
    let (q_vihl, q_proto, q_src, q_dst, qp) = unsafe {
        let qip = &*qip;
        (qip.vihl, qip.proto, qip.src, qip.dst, *qp)
    };
    let to = if fip.is_some() { dst } else { ext.ip };
    if be16(frag) & 0x3fff != 0 || q_vihl != 0x45 || !ip4_eq(&q_src, &to) {
        return not_ours;
    }
    // Where the quoted packet has the port NAT gave it (from its L4
    // header), that port, and the outside's.
    let (port_at, ext_port, outside_port) = match q_proto {
        IPPROTO_TCP | IPPROTO_UDP => (0usize, [qp[0], qp[1]], [qp[2], qp[3]]),
        IPPROTO_ICMP if qp[0] == ICMP_ECHO_REQUEST => (4, [qp[4], qp[5]], [0, 0]),
        _ => return not_ours,
    };
    let t = match fip {
        Some(fi) => Target::floating(&fi),
        None => {
            let rk = SnatRevKey {
                outside: q_dst,
                port: ext_port,
                outside_port,
                proto: q_proto,
                _pad: [0; 3],
            };
            let Some(r) = CL_SNAT_REV.get_ptr(&rk) else {
                return not_ours;
            };
            Target::mapped(unsafe { &*r })
        }
    };
    let e = (DropReason::NatFragment, NO_SLOT);
    let csum = l4 + 2;
    let (a, b) = (
        u32::from_ne_bytes(to) as u64,
        u32::from_ne_bytes(t.inside) as u64,
    );
    let old_sum: [u8; 2] = ctx.load(q + 10).map_err(|_| e)?;
    ctx.l3_csum_replace(q + 10, a, b, 4).map_err(|_| e)?;
    let new_sum: [u8; 2] = ctx.load(q + 10).map_err(|_| e)?;
    ctx.store(q + 12, &t.inside, 0).map_err(|_| e)?;
    ctx.l4_csum_replace(csum, a, b, 4).map_err(|_| e)?;
    let (a, b) = (
        u16::from_ne_bytes(old_sum) as u64,
        u16::from_ne_bytes(new_sum) as u64,
    );
    ctx.l4_csum_replace(csum, a, b, 2).map_err(|_| e)?;
    if let Some(new) = t.inside_port {
        ctx.store(q + 20 + port_at, &new, 0).map_err(|_| e)?;
        let (a, b) = (
            u16::from_ne_bytes(ext_port) as u64,
            u16::from_ne_bytes(new) as u64,
        );
        ctx.l4_csum_replace(csum, a, b, 2).map_err(|_| e)?;
    }
    let f = Flow {
        src,
        dst,
        ttl,
        proto: IPPROTO_ICMP,
        l4,
        sport: [0, 0],
        dport: [0, 0],
        icmp_type: ty,
    };
    let t = Target {
        inside_port: None,
        ..t
    };
    translate_back(ctx, &f, &t).map(Some)
}

/// Translates an inbound packet back for its port: addresses, port, TTL,
/// MACs (to the port, from its network's gateway).
#[inline(always)]
fn translate_back(ctx: &TcContext, f: &Flow, t: &Target) -> Result<Inbound, (DropReason, u32)> {
    let info = CL_PORTS
        .get_ptr(&t.ifindex)
        .map(|i| unsafe { *i })
        .ok_or((DropReason::UnknownPort, NO_SLOT))?;
    let slot = info.slot;
    if f.ttl <= 1 {
        return Err((DropReason::TtlExceeded, slot));
    }
    let fwd = forward(info.vni, info.mac).ok_or((DropReason::UnknownPort, slot))?;
    let port = t.inside_port.map(|new| {
        // TCP/UDP: the destination port; ICMP echo reply: the identifier.
        if f.proto == IPPROTO_ICMP {
            (4, f.sport, new)
        } else {
            (2, f.dport, new)
        }
    });
    rewrite(ctx, f, 16, f.dst, t.inside, port).map_err(|e| (e, slot))?;
    let gw = gateway_mac(info.vni);
    let eth = [
        info.mac[0],
        info.mac[1],
        info.mac[2],
        info.mac[3],
        info.mac[4],
        info.mac[5],
        gw[0],
        gw[1],
        gw[2],
        gw[3],
        gw[4],
        gw[5],
    ];
    ctx.store(0, &eth, 0)
        .map_err(|_| (DropReason::NatFragment, slot))?;
    Ok(Inbound::Deliver(fwd, t.zone))
}

/// ARP on the external interface: requests for a floating IP of this
/// host are answered with the interface's MAC; the rest goes on.
#[inline(always)]
fn arp(c: &Cursor, ext: &ExternalConfig) -> Inbound {
    let (Some(eth), Some(arp)) = (c.at::<EthHdr>(0), c.at::<ArpHdr>(ETH_LEN)) else {
        return Inbound::Pass;
    };
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };
    if be16(arp.op) != 1 || CL_FIPS.get_ptr(&arp.tpa).is_none() {
        return Inbound::Pass;
    }
    let (asker_mac, asker_ip, target_ip) = (arp.sha, arp.spa, arp.tpa);
    eth.dst = eth.src;
    eth.src = ext.mac;
    arp.op = 2u16.to_be_bytes();
    arp.tha = asker_mac;
    arp.tpa = asker_ip;
    arp.sha = ext.mac;
    arp.spa = target_ip;
    unsafe { bpf_redirect(ext.ifindex, 0) };
    Inbound::Answered
}
