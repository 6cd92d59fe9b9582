//! Security groups, stateful, at both ends of a flow: the sending port's
//! egress rules and the receiving port's ingress rules, for the ends that are
//! local ports with port security. An established flow costs one conntrack
//! lookup; a new one two longest-prefix matches per end, whatever the number
//! of rules (see dataplane/src/policy.rs for how rules become those tables).
//! When the rules change (`policy_epoch`), a flow is checked again on its
//! next packet and cut if they no longer allow it.
use aya_ebpf::{
    helpers::generated::bpf_ktime_get_coarse_ns, maps::lpm_trie::Key, programs::TcContext,
};
use cloison_abi::*;

use crate::{
    conntrack,
    hdr::*,
    maps::{CONFIG, CONNTRACK, FRAGMENTS, PORTS, SCRATCH, SG_ADDRS, SG_RULES},
    parse::{self, Parsed, L3},
    port::{Decision, NEXT_LOCAL},
};

/// The two ends of a flow as the policy stage sees them.
pub struct Ends {
    /// The flow's network: its conntrack zone.
    zone: u32,
    /// The sending port if it is local and has port security, else null.
    sender: *const PortInfo,
    /// The receiving port's ifindex if it is local and has port security,
    /// else 0; its entry is looked up only when rules are checked.
    receiver_ifindex: u32,
}

/// The port program's check, after forwarding chose where the frame goes.
#[inline(never)]
pub fn from_port(ctx: &TcContext, d: &Decision) -> Packed {
    let local_peer = d.next.kind == NEXT_LOCAL && d.peer.flags & PORT_F_SECURITY != 0;
    let sender_secure = d.port.flags & PORT_F_SECURITY != 0;
    if !sender_secure && !local_peer {
        return 0;
    }
    let ends = Ends {
        zone: d.port.vni,
        sender: if sender_secure {
            &d.port
        } else {
            core::ptr::null()
        },
        receiver_ifindex: if local_peer { d.peer.ifindex } else { 0 },
    };
    let c = Cursor::new(ctx.data(), ctx.data_end());
    enforce(&c, &d.parsed, &ends)
}

pub struct Scratch {
    parsed: Parsed,
    key: CtKey,
}

#[inline(always)]
fn scratch() -> Result<&'static mut Scratch, DropReason> {
    match SCRATCH.get_ptr_mut(0) {
        Some(s) => Ok(unsafe { &mut *s }),
        None => Err(DropReason::NoConfig),
    }
}

/// The uplink's check of a decapsulated frame of network `vni` for local
/// port `ifindex`, which has port security (its forwarding entry says so);
/// `c` starts at the inner Ethernet header, `pkt_len` counts from there. The
/// port's entry is looked up only if rules are checked (a new flow, or one
/// to check again), not for an established flow.
#[inline(never)]
pub fn to_port(c: &Cursor, pkt_len: usize, ifindex: u32, vni: u32) -> Packed {
    let sc = match scratch() {
        Ok(s) => s,
        Err(e) => return pack(Err(e)),
    };
    if let Err(e) = parse::frame(c, pkt_len, &mut sc.parsed) {
        return pack(Err(e));
    }
    if sc.parsed.l3 == L3::Arp {
        // ARP is answered on every host by the proxy; none crosses the overlay.
        return pack(Err(DropReason::UnsupportedEthertype));
    }
    let ends = Ends {
        zone: vni,
        sender: core::ptr::null(),
        receiver_ifindex: ifindex,
    };
    enforce(c, &sc.parsed, &ends)
}

#[inline(never)]
fn enforce(c: &Cursor, p: &Parsed, ends: &Ends) -> Packed {
    pack(check(c, p, ends).map(|_| 0))
}

/// The secured ends' ports, for checking rules and charging a new entry
/// (to the sender if secured, else the receiver).
#[inline(always)]
fn resolve(ends: &Ends) -> Result<(Option<&PortInfo>, Option<&PortInfo>), DropReason> {
    let s = unsafe { ends.sender.as_ref() };
    if ends.receiver_ifindex == 0 {
        return Ok((s, None));
    }
    let info = PORTS
        .get_ptr(&ends.receiver_ifindex)
        .ok_or(DropReason::UnknownPort)?;
    Ok((s, Some(unsafe { &*info })))
}

#[inline(always)]
fn check(c: &Cursor, p: &Parsed, ends: &Ends) -> Result<(), DropReason> {
    let zone = ends.zone;
    let v4 = p.l3 == L3::Ipv4;
    if !v4 && p.proto == IPPROTO_ICMPV6 && (p.icmp_type == 135 || p.icmp_type == 136) {
        // Neighbour discovery is always allowed (as in Neutron).
        return Ok(());
    }
    // Coarse (a tick of resolution) is plenty for timeouts of seconds, and cheaper.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if p.later_fragment {
        return fragment_seen(zone, p, now);
    }
    if is_icmp_error(p) {
        return related(c, p, zone, now);
    }
    let epoch = CONFIG.get(0).ok_or(DropReason::NoConfig)?.policy_epoch;
    let key = &mut scratch()?.key;
    let from_b = conntrack::key(key, zone, p.proto, &p.src, (p.sport, p.dport), &p.dst);
    let tcp = p.proto == IPPROTO_TCP;
    if let Some(e) = CONNTRACK.get_ptr_mut(&*key) {
        let e = unsafe { &mut *e };
        if !conntrack::expired(e, now) {
            let reply = from_b != (e.flags & CT_F_ORIG_B != 0);
            if e.epoch != epoch {
                let (s, r) = resolve(ends)?;
                if rules_allow(p, s, r, reply).is_err() {
                    conntrack::remove(&*key, e);
                    return Err(DropReason::SgRevoked);
                }
                e.epoch = epoch;
            }
            let (state, flags) = ct_advance(e.state, e.flags, tcp, p.tcp_flags, reply);
            // Written only when they change (the clock is coarse: once a
            // tick): both directions of a flow, often on two CPUs, share
            // this cache line.
            if e.state != state || e.flags != flags {
                e.state = state;
                e.flags = flags;
            }
            if e.last_seen_ns != now {
                e.last_seen_ns = now;
            }
            remember_first_fragment(zone, p, now);
            return Ok(());
        }
        conntrack::remove(&*key, e);
    }
    if tcp && !tcp_opens(p.tcp_flags) {
        return Err(DropReason::CtTcpNotSyn);
    }
    let (s, r) = resolve(ends)?;
    rules_allow(p, s, r, false)?;
    let owner = match s {
        Some(s) => s,
        None => r.ok_or(DropReason::UnknownPort)?,
    };
    let state = if tcp {
        ct_state::TCP_SYN_SENT
    } else {
        ct_state::ONE_WAY
    };
    conntrack::create(&*key, owner, state, from_b, epoch, now)?;
    remember_first_fragment(zone, p, now);
    Ok(())
}

/// Whether the rules of the secured ends allow this packet's flow. `reply`:
/// the packet goes from the flow's responder to its originator, so the
/// sender's ingress and the receiver's egress rules apply, and the service
/// port is the packet's source port.
///
/// This and the other helpers below are calls, not inlined: each has its
/// own stack frame, so that no call chain reaches the 512-byte BPF stack.
#[inline(always)]
fn rules_allow(
    p: &Parsed,
    s: Option<&PortInfo>,
    r: Option<&PortInfo>,
    reply: bool,
) -> Result<(), DropReason> {
    let sp: *const PortInfo = match s {
        Some(s) => s,
        None => core::ptr::null(),
    };
    let rp: *const PortInfo = match r {
        Some(r) => r,
        None => core::ptr::null(),
    };
    unpack(rules_allow_call(p, sp, rp, reply as u32)).map(|_| ())
}

#[inline(never)]
fn rules_allow_call(p: &Parsed, s: *const PortInfo, r: *const PortInfo, reply: u32) -> Packed {
    let reply = reply != 0;
    let service = if reply { p.sport } else { p.dport };
    if let Some(s) = unsafe { s.as_ref() } {
        let dir = if reply { SG_INGRESS } else { SG_EGRESS };
        if allowed(s.policy, dir as u32, &p.dst, p, service as u32) == 0 {
            return pack(Err(if reply {
                DropReason::SgIngressDenied
            } else {
                DropReason::SgEgressDenied
            }));
        }
    }
    if let Some(r) = unsafe { r.as_ref() } {
        let dir = if reply { SG_EGRESS } else { SG_INGRESS };
        if allowed(r.policy, dir as u32, &p.src, p, service as u32) == 0 {
            return pack(Err(if reply {
                DropReason::SgEgressDenied
            } else {
                DropReason::SgIngressDenied
            }));
        }
    }
    0
}

/// Two lookups: the remote address's class, then (class, protocol, port).
/// 1 if allowed.
#[inline(never)]
fn allowed(policy: u32, direction: u32, remote: &[u8; 16], p: &Parsed, port: u32) -> u32 {
    let (v4, proto, direction, port) = (p.l3 == L3::Ipv4, p.proto, direction as u8, port as u16);
    let (family, bits, addr) = if v4 {
        // The IPv4 address in the first 4 bytes, the rest zero.
        let a = [remote[12], remote[13], remote[14], remote[15]];
        let w = [u32::from_ne_bytes(a) as u64, 0u64];
        (SG_FAMILY_V4, 32, unsafe {
            core::mem::transmute::<[u64; 2], [u8; 16]>(w)
        })
    } else {
        let mut a = [0u8; 16];
        copy16(&mut a, remote);
        (SG_FAMILY_V6, 128, a)
    };
    let policy = policy.to_be_bytes();
    let key = Key::new(
        SG_ADDR_FIXED_BITS + bits,
        SgAddrKey {
            policy,
            direction,
            family,
            _pad: [0; 2],
            addr,
        },
    );
    let class = match SG_ADDRS.get(&key) {
        Some(c) => *c,
        None => return 0,
    };
    let key = Key::new(
        SG_RULE_FIXED_BITS + 24,
        SgRuleKey {
            policy,
            class: class.to_be_bytes(),
            direction,
            proto,
            port: port.to_be_bytes(),
        },
    );
    SG_RULES.get(&key).is_some() as u32
}

#[inline(always)]
fn is_icmp_error(p: &Parsed) -> bool {
    match (p.l3, p.proto) {
        (L3::Ipv4, IPPROTO_ICMP) => matches!(p.icmp_type, 3 | 11 | 12),
        (L3::Ipv6, IPPROTO_ICMPV6) => matches!(p.icmp_type, 1..=4),
        _ => false,
    }
}

/// An ICMP error passes only if the packet it quotes belongs to a tracked flow.
#[inline(always)]
fn related(c: &Cursor, p: &Parsed, zone: u32, now: u64) -> Result<(), DropReason> {
    unpack(related_call(c, p, zone, now)).map(|_| ())
}

#[inline(never)]
fn related_call(c: &Cursor, p: &Parsed, zone: u32, now: u64) -> Packed {
    pack(related_stage(c, p, zone, now).map(|_| 0))
}

#[inline(always)]
fn related_stage(c: &Cursor, p: &Parsed, zone: u32, now: u64) -> Result<(), DropReason> {
    let unrelated = DropReason::IcmpErrorUnrelated;
    // Parsed may live in map memory, whose values the verifier does not
    // track: bound the offset before it moves a packet pointer.
    if p.l4_off > ETH_LEN + 60 {
        return Err(unrelated);
    }
    let off = p.l4_off + 8;
    let key = &mut scratch()?.key;
    let (proto, l4) = if p.l3 == L3::Ipv4 {
        let ip: *mut Ipv4Hdr = c.at(off).ok_or(unrelated)?;
        let ip = unsafe { &*ip };
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Err(unrelated);
        }
        (ip.proto, off + ihl)
    } else {
        let ip: *mut Ipv6Hdr = c.at(off).ok_or(unrelated)?;
        (unsafe { (*ip).next_header }, off + 40)
    };
    let (mut sport, mut dport) = (0u16, 0u16);
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: *mut [u8; 4] = c.at(l4).ok_or(unrelated)?;
            let ports = unsafe { &*ports };
            sport = be16([ports[0], ports[1]]);
            dport = be16([ports[2], ports[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let i: *mut IcmpHdr = c.at(l4).ok_or(unrelated)?;
            let i = unsafe { &*i };
            let id = be16([i.rest[0], i.rest[1]]);
            match i.ty {
                ICMP_ECHO_REQUEST | ICMPV6_ECHO_REQUEST => sport = id,
                ICMP_ECHO_REPLY | ICMPV6_ECHO_REPLY => dport = id,
                _ => {}
            }
        }
        _ => {}
    }
    // The quoted packet's own ends, put in canonical order like any key.
    if p.l3 == L3::Ipv4 {
        let ip: *mut Ipv4Hdr = c.at(off).ok_or(unrelated)?;
        let ip = unsafe { &*ip };
        let (src, dst) = (
            crate::maps::v4_mapped(ip.src),
            crate::maps::v4_mapped(ip.dst),
        );
        conntrack::key(key, zone, proto, &src, (sport, dport), &dst);
    } else {
        let ip: *mut Ipv6Hdr = c.at(off).ok_or(unrelated)?;
        let ip = unsafe { &*ip };
        conntrack::key(key, zone, proto, &ip.src, (sport, dport), &ip.dst);
    }
    match CONNTRACK.get_ptr(key) {
        Some(e) if !conntrack::expired(unsafe { &*e }, now) => Ok(()),
        _ => Err(unrelated),
    }
}

#[inline(always)]
fn frag_key(zone: u32, p: &Parsed) -> FragKey {
    FragKey {
        zone,
        src: [p.src[12], p.src[13], p.src[14], p.src[15]],
        dst: [p.dst[12], p.dst[13], p.dst[14], p.dst[15]],
        id: p.ip_id,
        proto: p.proto,
        _pad: 0,
    }
}

#[inline(never)]
fn remember_first_fragment(zone: u32, p: &Parsed, now: u64) {
    if p.first_fragment {
        let _ = FRAGMENTS.insert(&frag_key(zone, p), &now, 0);
    }
}

/// A later fragment gets its first fragment's verdict.
#[inline(always)]
fn fragment_seen(zone: u32, p: &Parsed, now: u64) -> Result<(), DropReason> {
    if fragment_seen_call(zone, p, now) != 0 {
        Ok(())
    } else {
        Err(DropReason::FragmentUnknown)
    }
}

#[inline(never)]
fn fragment_seen_call(zone: u32, p: &Parsed, now: u64) -> u32 {
    match FRAGMENTS.get_ptr(&frag_key(zone, p)) {
        Some(t) => !idle_longer_than(unsafe { *t }, now, FRAG_TIMEOUT_NS) as u32,
        None => 0,
    }
}
