//! The one place that calls the stages, in order. Stages never call each
//! other: each takes what earlier ones decided (`decision`) and returns
//! `Result<_, DropReason>`; here an `Err(reason)` becomes a counted drop.
//!
//! VM egress (TC on the port): port → parse → anti-spoofing → local answers
//! (ARP, ND) → the agent's services (DHCP, RS, metadata) → forwarding (or
//! the router, for the gateway MAC) → the stateful check (conntrack, then
//! the rules for what conntrack does not know) → encap, local delivery, or
//! an ICMP error.
//! Underlay ingress (XDP or TC on the uplink, one code over [`Packet`]):
//! uplink checks → the receiver's stateful check → decap → delivery.
//! The agent's answers (TC on its service tap): to the port they name.
//! The outside (TC on the external interface): NAT back, the port's rules,
//! delivery.
//!
//! Functions marked `inline(never)` are BPF calls of their own: each gets its
//! own stack frame, so that no call chain reaches the 512-byte BPF stack, and
//! returns one register ([`Packed`]).
use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::bpf_skb_change_head,
    programs::TcContext,
};
use cloison_abi::*;

use crate::{
    conntrack,
    decision::*,
    forward,
    hdr::*,
    icmp,
    maps::{count_drop, count_to_vm, scratch, CL_CONFIG, CL_PORTS, NO_SLOT},
    mode::{note, TRACE},
    monitor, nat,
    packet::{self, pull_headers, Packet, Tc},
    parse::{self, Parsed, L3},
    policy, port, proxy, route, service, spoof, uplink, vxlan,
};

/// Everything a VM sends, from the TC hook on its port.
#[inline(always)]
pub fn from_vm(ctx: &TcContext) -> i32 {
    let mut slot = core::mem::MaybeUninit::uninit();
    let d = Decision::init(&mut slot);
    let first = first_stages(ctx, d);
    let res = if first < 0 {
        first
    } else {
        note(trace::NEXT, d.next.kind, d.next.arg, 0);
        let sg = match d.next.kind {
            NEXT_LOCAL | NEXT_ENCAP | NEXT_TOO_BIG_V4 | NEXT_TOO_BIG_V6 | NEXT_EXTERNAL => {
                from_port_checked(ctx, d)
            }
            _ => 0,
        };
        if sg < 0 {
            sg
        } else {
            match d.next.kind {
                NEXT_ARP => arp(ctx, d.ifindex, &d.port),
                NEXT_ND => pack(proxy::nd(ctx, &d.port, d.ifindex)),
                NEXT_SERVICE => steer(ctx, d.ifindex, &d.port),
                NEXT_TOO_BIG_V4
                | NEXT_TOO_BIG_V6
                | NEXT_TIME_EXCEEDED_V4
                | NEXT_TIME_EXCEEDED_V6 => icmp_error(ctx, d.ifindex, &d.port, d.next),
                NEXT_ENCAP => encap(ctx, d.out.vni, &d.peer, vxlan::flow_hash(&d.parsed)),
                NEXT_LOCAL => forward::deliver(&d.peer, ctx.len()) as Packed,
                NEXT_EXTERNAL => external(ctx, d.ifindex, d.out.zone),
                NEXT_ROUTER_ECHO => router_echo(ctx, d.ifindex, &d.port, &d.parsed),
                _ => d.next.arg as i32 as Packed,
            }
        }
    };
    // Every frame a VM sends is redirected (to a port, back to it, or to
    // the uplink) or dropped: never handed to the host.
    let res = match unpack(res) {
        Ok(action) if action == TC_ACT_REDIRECT => Ok(action),
        Ok(_) => Err(DropReason::NotRedirected),
        Err(reason) => Err(reason),
    };
    match res {
        Ok(action) => action,
        Err(reason) => {
            // A local receiver's ingress rules refused it: its counter.
            let slot = if reason == DropReason::SgIngressDenied && d.next.kind == NEXT_LOCAL {
                d.peer.slot
            } else {
                d.port.slot
            };
            count_drop(reason, slot);
            monitor::dropped(&Tc(ctx), monitor_hook::PORT, reason, slot);
            TC_ACT_SHOT
        }
    }
}

/// What the stateful check returns for a flow it has just started tracking.
const CREATED: Packed = 1;

/// The monitor's names of the hooks.
mod monitor_hook {
    pub use cloison_abi::monitor::{
        HOOK_EXTERNAL as EXTERNAL, HOOK_PORT as PORT, HOOK_SERVICE as SERVICE,
        HOOK_UPLINK as UPLINK,
    };
}

/// Port, parse, anti-spoofing, local answers and forwarding: fills `d`.
#[inline(never)]
fn first_stages(ctx: &TcContext, d: &mut Decision) -> Packed {
    match first_stages_in_order(ctx, d) {
        Ok(n) => {
            d.next = n;
            0
        }
        Err(e) => pack(Err(e)),
    }
}

#[inline(always)]
fn first_stages_in_order(ctx: &TcContext, d: &mut Decision) -> Result<Next, DropReason> {
    port::identify(ctx, d)?;
    note(trace::PORT, d.port.slot, d.port.vni, d.port.flags);
    let len = ctx.len();
    pull_headers(ctx, 0);
    let c = Cursor::new(ctx.data(), ctx.data_end());
    parse::frame(&c, len as usize, &mut d.parsed)?;
    note_parsed(&d.parsed);
    let (port, p) = (&d.port, &d.parsed);
    if p.l3 == L3::Arp {
        return Ok(Next::of(NEXT_ARP, 0));
    }
    if port.flags & PORT_F_SECURITY != 0 {
        let (eth, _) = parse::ethernet(&c)?;
        spoof::check_ip(&c, eth, d.ifindex, port, p)?;
        note(trace::SPOOF, 1, 0, 0);
    }
    if p.l3 == L3::Ipv6 && p.proto == IPPROTO_ICMPV6 {
        // RFC 6980: neighbour discovery never comes with extension headers
        // (nor could the answers below read it past them).
        if (133..=137).contains(&p.icmp_type) && p.ext_headers != 0 {
            return Err(DropReason::NdWithExtensionHeaders);
        }
        if p.icmp_type == 135 {
            return Ok(Next::of(NEXT_ND, 0));
        }
    }
    if service::wanted(port, p)? {
        return Ok(Next::of(NEXT_SERVICE, 0));
    }
    d.out = Out {
        vni: port.vni,
        zone: port.vni,
    };
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    if mac_eq(unsafe { &(*eth).dst }, &gateway_mac(port.vni)) {
        let next = route::from_port(ctx, &c, d.ifindex, port, p, &mut d.peer, &mut d.out)?;
        note(trace::ROUTE, d.out.zone, d.out.vni, 0);
        note_forward(&d.peer);
        return Ok(next);
    }
    let next = forward::from_port(ctx, &c, d.ifindex, port, p, &mut d.peer);
    if next.is_ok() {
        note_forward(&d.peer);
    }
    next
}

/// What the parse found (trace build).
#[inline(always)]
fn note_parsed(p: &Parsed) {
    if TRACE {
        let l3 = match p.l3 {
            L3::Arp => 0x0806,
            L3::Ipv4 => 0x0800,
            L3::Ipv6 => 0x86dd,
        };
        let ports = (p.sport as u32) << 16 | p.dport as u32;
        note(trace::PARSE, l3, p.proto as u32, ports);
    }
}

/// The forwarding entry chosen (trace build).
#[inline(always)]
fn note_forward(f: &ForwardEntry) {
    if TRACE {
        note(
            trace::FORWARD,
            f.kind,
            f.ifindex,
            u32::from_ne_bytes(f.vtep),
        );
    }
}

/// ARP: the sender fields checked (with port security), then answered.
#[inline(never)]
fn arp(ctx: &TcContext, ifindex: u32, port: &PortInfo) -> Packed {
    if port.flags & PORT_F_SECURITY != 0 {
        let c = Cursor::new(ctx.data(), ctx.data_end());
        if let Err(e) = spoof::check_arp(&c, ifindex, port) {
            return pack(Err(e));
        }
        note(trace::SPOOF, 2, 0, 0);
    }
    pack(proxy::arp(ctx, ifindex, port))
}

#[inline(never)]
fn steer(ctx: &TcContext, ifindex: u32, port: &PortInfo) -> Packed {
    pack(service::steer(ctx, ifindex, port))
}

/// An answer the agent wrote to its service tap (TC ingress there): to the
/// port it names, or dropped. Nothing from the tap reaches the host stack.
#[inline(always)]
pub fn from_agent(ctx: &TcContext) -> i32 {
    pull_headers(ctx, 0);
    match service::answer(ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason, NO_SLOT);
            monitor::dropped(&Tc(ctx), monitor_hook::SERVICE, reason, NO_SLOT);
            TC_ACT_SHOT
        }
    }
}

#[inline(never)]
fn icmp_error(ctx: &TcContext, ifindex: u32, port: &PortInfo, next: Next) -> Packed {
    let v4 = next.kind == NEXT_TOO_BIG_V4 || next.kind == NEXT_TIME_EXCEEDED_V4;
    let error = if next.kind == NEXT_TIME_EXCEEDED_V4 || next.kind == NEXT_TIME_EXCEEDED_V6 {
        icmp::Error::TimeExceeded
    } else if next.arg == TOO_BIG_ROUTED {
        icmp::Error::TooBigRouted
    } else {
        icmp::Error::TooBig
    };
    pack(icmp::error(ctx, ifindex, port, v4, error))
}

#[inline(never)]
fn router_echo(ctx: &TcContext, ifindex: u32, port: &PortInfo, p: &Parsed) -> Packed {
    pack(icmp::echo_reply(ctx, ifindex, port, p))
}

/// Out to the external interface (NAT). A mapping is free again once
/// conntrack no longer tracks its flow.
#[inline(never)]
fn external(ctx: &TcContext, ifindex: u32, zone: u32) -> Packed {
    pack(nat::outbound(ctx, ifindex, zone, snat_flow_live))
}

#[inline(always)]
fn snat_flow_live(rk: &SnatRevKey, r: &SnatRevEntry) -> bool {
    let Ok(sc) = scratch() else {
        return true;
    };
    conntrack::key(
        &mut sc.key,
        r.zone,
        rk.proto,
        &v4_mapped(r.inside),
        (
            u16::from_be_bytes(r.inside_port),
            u16::from_be_bytes(rk.outside_port),
        ),
        &v4_mapped(rk.outside),
    );
    conntrack::live(&sc.key, conntrack::now()).is_some()
}

/// Everything that enters by the external interface (TC ingress there):
/// ARP for floating IPs answered, NATed flows translated back and then
/// checked against the port's ingress rules, the rest on untouched (the
/// next program, or the host).
#[inline(always)]
pub fn from_outside(ctx: &TcContext) -> i32 {
    pull_headers(ctx, 0);
    let res = match nat::inbound(ctx) {
        Ok(nat::Inbound::Pass) => return TC_ACT_UNSPEC,
        Ok(nat::Inbound::Answered) => return TC_ACT_REDIRECT,
        Ok(nat::Inbound::Deliver(fwd, zone)) => deliver_inbound(ctx, &fwd, zone),
        Err((reason, slot)) => Err((reason, slot)),
    };
    match res {
        Ok(v) => v,
        Err((reason, slot)) => {
            count_drop(reason, slot);
            monitor::dropped(&Tc(ctx), monitor_hook::EXTERNAL, reason, slot);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn deliver_inbound(
    ctx: &TcContext,
    fwd: &ForwardEntry,
    zone: u32,
) -> Result<i32, (DropReason, u32)> {
    if fwd.flags & PORT_F_SECURITY != 0 {
        pull_headers(ctx, 0);
        let c = Cursor::new(ctx.data(), ctx.data_end());
        unpack(to_port_checked(&c, ctx.len() as usize, fwd.ifindex, zone))
            .map_err(|e| (e, fwd.slot))?;
    }
    count_to_vm(fwd.slot, ctx.len());
    Ok(packet::redirect_tc(fwd, true))
}

#[inline(never)]
fn encap(ctx: &TcContext, vni: u32, peer: &ForwardEntry, hash: u32) -> Packed {
    note(trace::ENCAP, u32::from_ne_bytes(peer.vtep), vni, hash);
    pack(vxlan::encap(ctx, vni, peer.vtep, peer.flags, hash))
}

/// The stateful check of a frame from a port, once forwarding chose where it
/// goes: the sender's egress rules (if it has port security) and a local
/// receiver's ingress rules (if it has).
#[inline(never)]
fn from_port_checked(ctx: &TcContext, d: &Decision) -> Packed {
    let local_peer = d.next.kind == NEXT_LOCAL && d.peer.flags & PORT_F_SECURITY != 0;
    let sender_secure = d.port.flags & PORT_F_SECURITY != 0;
    if !sender_secure && !local_peer {
        return 0;
    }
    let ends = Ends {
        zone: d.out.zone,
        sender: if sender_secure {
            &d.port
        } else {
            core::ptr::null()
        },
        receiver_ifindex: if local_peer { d.peer.ifindex } else { 0 },
    };
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let sg = stateful(&c, &d.parsed, &ends);
    if sg == CREATED {
        // Charged to the sender if it has port security, else to the local
        // receiver (as the conntrack entry is).
        let slot = if sender_secure {
            d.port.slot
        } else {
            d.peer.slot
        };
        monitor::new_flow(&Tc(ctx), monitor_hook::PORT, slot);
    }
    sg
}

/// The stateful check of a decapsulated frame of conntrack zone `zone` (its
/// network's, or its router's) for local port `ifindex`, which has port security (its forwarding entry says so);
/// `c` starts at the inner Ethernet header, `pkt_len` counts from there. The
/// port's entry is looked up only if rules are checked (a new flow, or one
/// to check again), not for an established flow.
#[inline(never)]
fn to_port_checked(c: &Cursor, pkt_len: usize, ifindex: u32, zone: u32) -> Packed {
    let sc = match scratch() {
        Ok(s) => s,
        Err(e) => return pack(Err(e)),
    };
    if let Err(e) = parse::frame(c, pkt_len, &mut sc.parsed) {
        return pack(Err(e));
    }
    note_parsed(&sc.parsed);
    if sc.parsed.l3 == L3::Arp {
        // ARP is answered on every host by the proxy; none crosses the overlay.
        return pack(Err(DropReason::UnsupportedEthertype));
    }
    let ends = Ends {
        zone,
        sender: core::ptr::null(),
        receiver_ifindex: ifindex,
    };
    stateful(c, &sc.parsed, &ends)
}

#[inline(never)]
fn stateful(c: &Cursor, p: &Parsed, ends: &Ends) -> Packed {
    match conntrack_then_policy(c, p, ends) {
        Ok(true) => CREATED,
        Ok(false) => 0,
        Err(e) => pack(Err(e)),
    }
}

/// The secured ends' ports, for checking rules and charging a new entry
/// (to the sender if secured, else the receiver).
#[inline(always)]
fn secured_ends(ends: &Ends) -> Result<(Option<&PortInfo>, Option<&PortInfo>), DropReason> {
    let s = unsafe { ends.sender.as_ref() };
    if ends.receiver_ifindex == 0 {
        return Ok((s, None));
    }
    let info = CL_PORTS
        .get_ptr(&ends.receiver_ifindex)
        .ok_or(DropReason::UnknownPort)?;
    Ok((s, Some(unsafe { &*info })))
}

/// Conntrack first; the rules only for a new flow, or for an established
/// one when they changed since it was last checked. True: a new flow,
/// tracked from now on.
#[inline(always)]
fn conntrack_then_policy(c: &Cursor, p: &Parsed, ends: &Ends) -> Result<bool, DropReason> {
    let zone = ends.zone;
    if policy::exempt(p) {
        note(trace::CONNTRACK, trace::CT_UNTRACKED, 0, zone);
        return Ok(false);
    }
    let now = conntrack::now();
    if p.later_fragment {
        return conntrack::fragment_seen(zone, p, now).map(|_| false);
    }
    if conntrack::is_icmp_error(p) {
        return unpack(conntrack::related(c, p, zone, now)).map(|_| false);
    }
    if conntrack::untracked_icmp(p) {
        note(trace::CONNTRACK, trace::CT_UNTRACKED, 0, zone);
        let (s, r) = secured_ends(ends)?;
        return policy::rules_allow(p, s, r, false).map(|_| false);
    }
    let epoch = CL_CONFIG.get(0).ok_or(DropReason::NoConfig)?.policy_epoch;
    let key = &mut scratch()?.key;
    let from_b = conntrack::key(key, zone, p.proto, &p.src, (p.sport, p.dport), &p.dst);
    if let Some(e) = conntrack::live(key, now) {
        let reply = from_b != (e.flags & CT_F_ORIG_B != 0);
        let hit = if e.epoch != epoch {
            trace::CT_RECHECKED
        } else {
            trace::CT_HIT
        };
        note(trace::CONNTRACK, hit, e.state as u32, zone);
        if e.epoch != epoch {
            let (s, r) = secured_ends(ends)?;
            if policy::rules_allow(p, s, r, reply).is_err() {
                conntrack::remove(key, e);
                return Err(DropReason::SgRevoked);
            }
            if !TRACE {
                e.epoch = epoch;
            }
        }
        conntrack::advance(e, p, reply, now);
        if conntrack::remember_first_fragment(zone, p, now, e.owner_tenant) != 0 {
            return Err(DropReason::FragmentQuota);
        }
        return Ok(false);
    }
    let tcp = p.proto == IPPROTO_TCP;
    if tcp && !tcp_opens(p.tcp_flags) {
        note(trace::CONNTRACK, trace::CT_MISS, 0, zone);
        return Err(DropReason::CtTcpNotSyn);
    }
    let (s, r) = secured_ends(ends)?;
    policy::rules_allow(p, s, r, false)?;
    let owner = match s {
        Some(s) => s,
        None => r.ok_or(DropReason::UnknownPort)?,
    };
    let state = if tcp {
        ct_state::TCP_SYN_SENT
    } else {
        ct_state::ONE_WAY
    };
    if conntrack::remember_first_fragment(zone, p, now, owner.tenant) != 0 {
        return Err(DropReason::FragmentQuota);
    }
    conntrack::create(key, owner, state, from_b, epoch, now)?;
    Ok(true)
}

/// What comes out of the IPsec device: the VXLAN that ipsec peers sent,
/// decrypted, without an Ethernet header (the device is an L3 one). Given
/// one, it takes the uplink's path, as decrypted; nothing else is expected
/// out of there.
#[inline(always)]
pub fn from_ipsec(ctx: &TcContext) -> i32 {
    if unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_LEN as u32, 0) } != 0 {
        count_drop(DropReason::DecapFailed, NO_SLOT);
        return TC_ACT_SHOT;
    }
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let Some(eth) = c.at::<[u8; ETH_LEN]>(0) else {
        count_drop(DropReason::DecapFailed, NO_SLOT);
        return TC_ACT_SHOT;
    };
    // The helper zeroed the addresses; the type is the underlay's, IPv4
    // (anything else is not VXLAN of ours: dropped below).
    unsafe {
        (*eth)[12] = 0x08;
        (*eth)[13] = 0;
    }
    from_underlay(&Tc(ctx), true)
}

/// Everything that reaches the uplink from the underlay, in either hook,
/// or (`decrypted`) out of the IPsec device.
#[inline(always)]
pub fn from_underlay<P: Packet>(pkt: &P, decrypted: bool) -> P::Verdict {
    let len = pkt.len();
    pkt.pull_headers(VXLAN_ENCAP_LEN as u32);
    let c = pkt.cursor();
    match uplink::classify(&c, len, pkt.is_gso(), decrypted) {
        Ok(None) if decrypted => {
            count_drop(DropReason::IpsecNotVxlan, NO_SLOT);
            monitor::dropped(
                pkt,
                monitor_hook::UPLINK,
                DropReason::IpsecNotVxlan,
                NO_SLOT,
            );
            P::DROP
        }
        Ok(None) => P::PASS,
        Ok(Some(d)) => {
            note(trace::UPLINK, d.port.slot, d.port.ifindex, d.zone);
            let mut created = false;
            if d.port.flags & PORT_F_SECURITY != 0 {
                let inner = Cursor::new(c.data + VXLAN_ENCAP_LEN, c.end);
                let inner_len = len as usize - VXLAN_ENCAP_LEN;
                let checked = to_port_checked(&inner, inner_len, d.port.ifindex, d.zone);
                if let Err(reason) = unpack(checked) {
                    count_drop(reason, d.port.slot);
                    monitor::dropped(pkt, monitor_hook::UPLINK, reason, d.port.slot);
                    return P::DROP;
                }
                created = checked == CREATED;
            }
            if let Err(reason) = pkt.decap(d.inner_proto) {
                count_drop(reason, d.port.slot);
                monitor::dropped(pkt, monitor_hook::UPLINK, reason, d.port.slot);
                return P::DROP;
            }
            count_to_vm(d.port.slot, len - VXLAN_ENCAP_LEN as u32);
            if created {
                monitor::new_flow(pkt, monitor_hook::UPLINK, d.port.slot);
            }
            pkt.redirect_to(&d.port)
        }
        Err(reason) => {
            count_drop(reason, NO_SLOT);
            monitor::dropped(pkt, monitor_hook::UPLINK, reason, NO_SLOT);
            P::DROP
        }
    }
}
