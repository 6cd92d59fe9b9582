//! Connection tracking: one entry per flow in an LRU map keyed by the
//! network (zone) and the flow's two ends in canonical order, aged by
//! timestamps, charged to a port and its tenant within their quotas;
//! fragments (IPv4 and IPv6) by their first fragment, within their tenant's
//! share; ICMP errors by the flow they quote, only to that flow's sender.
//! Whether a new flow may start is the policy stage's to say; the pipeline
//! calls the two in turn.
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use cloison_abi::*;

use crate::{
    hdr::*,
    maps::{scratch, CL_CONFIG, CL_CONNTRACK, CL_CT_USE, CL_FRAGMENTS, CL_FRAG_USE},
    mode::{note, TRACE},
    parse::{Parsed, L3},
};

/// The clock entries are stamped with. Coarse (a tick of resolution) is
/// plenty for timeouts of seconds, and cheaper.
#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Writes the canonical key of a packet's flow into `k`; true if the packet
/// comes from end b of it.
#[inline(always)]
pub fn key(
    k: &mut CtKey,
    zone: u32,
    proto: u8,
    src: &[u8; 16],
    ports: (u16, u16),
    dst: &[u8; 16],
) -> bool {
    let (sport, dport) = ports;
    let from_b = greater(src, sport, dst, dport);
    k.zone = zone;
    k.proto = proto;
    for b in k._pad.iter_mut() {
        unsafe { core::ptr::write_volatile(b, 0) };
    }
    let ((a, pa), (b, pb)) = if from_b {
        ((dst, dport), (src, sport))
    } else {
        ((src, sport), (dst, dport))
    };
    copy16(&mut k.addr_a, a);
    copy16(&mut k.addr_b, b);
    k.port_a = pa.to_be_bytes();
    k.port_b = pb.to_be_bytes();
    from_b
}

/// Any total order will do, as long as both directions agree on it.
#[inline(always)]
fn greater(x: &[u8; 16], xp: u16, y: &[u8; 16], yp: u16) -> bool {
    let (px, py) = (x.as_ptr() as *const u64, y.as_ptr() as *const u64);
    let (x0, x1, y0, y1) = unsafe {
        (
            core::ptr::read_unaligned(px),
            core::ptr::read_unaligned(px.add(1)),
            core::ptr::read_unaligned(py),
            core::ptr::read_unaligned(py.add(1)),
        )
    };
    if x0 != y0 {
        return x0 > y0;
    }
    if x1 != y1 {
        return x1 > y1;
    }
    xp > yp
}

#[inline(always)]
pub fn expired(e: &CtEntry, now: u64) -> bool {
    ct_expired(e.state, e.last_seen_ns, now)
}

#[inline(always)]
fn add_use(index: u32, delta: i64) {
    if let Some(c) = CL_CT_USE.get_ptr_mut(index) {
        // An atomic add (BPF_ATOMIC | BPF_ADD): CPUs create and end flows at once.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(c, delta) };
    }
}

#[inline(always)]
fn in_use(index: u32) -> i64 {
    match CL_CT_USE.get(index) {
        Some(v) => *v,
        None => 0,
    }
}

/// Gives back what an entry was charged.
#[inline(always)]
pub fn release(e: &CtEntry) {
    add_use(e.owner_slot, -1);
    add_use(MAX_PORTS + e.owner_tenant, -1);
}

/// Removes a live entry and gives back its charge.
#[inline(always)]
pub fn remove(key: &CtKey, e: &CtEntry) {
    if TRACE {
        return;
    }
    let owner = *e;
    if CL_CONNTRACK.remove(key).is_ok() {
        release(&owner);
    }
}

/// Creates the entry of a new flow, charged to `owner` if within its quotas.
#[inline(always)]
pub fn create(
    key: &CtKey,
    owner: &PortInfo,
    state: u8,
    from_b: bool,
    epoch: u32,
    now: u64,
) -> Result<(), DropReason> {
    if in_use(owner.slot) >= owner.ct_port_quota as i64 {
        return Err(DropReason::CtPortQuota);
    }
    if in_use(MAX_PORTS + owner.tenant) >= owner.ct_tenant_quota as i64 {
        return Err(DropReason::CtTenantQuota);
    }
    if TRACE {
        note(
            trace::CONNTRACK,
            trace::CT_WOULD_INSERT,
            state as u32,
            key.zone,
        );
        return Ok(());
    }
    let e = CtEntry {
        last_seen_ns: now,
        epoch,
        owner_slot: owner.slot,
        owner_tenant: owner.tenant,
        state,
        flags: if from_b { CT_F_ORIG_B } else { 0 },
        _pad: [0; 2],
    };
    CL_CONNTRACK
        .insert(key, &e, 0)
        .map_err(|_| DropReason::CtFull)?;
    add_use(owner.slot, 1);
    add_use(MAX_PORTS + owner.tenant, 1);
    Ok(())
}

/// The live entry of `key`, if any; an expired one is removed (and its
/// charge given back) on the way.
#[inline(always)]
pub fn live(key: &CtKey, now: u64) -> Option<&'static mut CtEntry> {
    let e = unsafe { &mut *CL_CONNTRACK.get_ptr_mut(key)? };
    if !expired(e, now) {
        return Some(e);
    }
    remove(key, e);
    None
}

/// Moves an established entry on with this packet (`reply`: from the
/// flow's responder).
#[inline(always)]
pub fn advance(e: &mut CtEntry, p: &Parsed, reply: bool, now: u64) {
    if TRACE {
        return;
    }
    let (state, flags) = ct_advance(e.state, e.flags, p.proto == IPPROTO_TCP, p.tcp_flags, reply);
    // Written only when they change (the clock is coarse: once a tick):
    // both directions of a flow, often on two CPUs, share this cache line.
    if e.state != state || e.flags != flags {
        e.state = state;
        e.flags = flags;
    }
    if e.last_seen_ns != now {
        e.last_seen_ns = now;
    }
}

#[inline(always)]
pub fn is_icmp_error(p: &Parsed) -> bool {
    p.is_icmp_error()
}

/// An ICMP error passes only if the packet it quotes belongs to a flow that
/// is tracked, still allowed as the rules now read (its epoch is the
/// current one), and that the error goes back to: as Linux requires, the
/// error's destination is the quoted packet's source. A call of its own
/// (its own stack frame).
#[inline(never)]
pub fn related(c: &Cursor, p: &Parsed, zone: u32, now: u64) -> Packed {
    pack(related_stage(c, p, zone, now).map(|_| 0))
}

#[inline(always)]
fn related_stage(c: &Cursor, p: &Parsed, zone: u32, now: u64) -> Result<(), DropReason> {
    let epoch = CL_CONFIG.get(0).ok_or(DropReason::NoConfig)?.policy_epoch;
    let unrelated = DropReason::IcmpErrorUnrelated;
    // Parsed may live in map memory, whose values the verifier does not
    // track: bound the offset before it moves a packet pointer.
    if p.l4_off > crate::parse::MAX_L4_OFFSET {
        return Err(unrelated);
    }
    let off = p.l4_off + 8;
    let k = &mut scratch()?.key;
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
    // The quoted packet's own ends, put in canonical order like any key;
    // the error must go to the quoted packet's source.
    if p.l3 == L3::Ipv4 {
        let ip: *mut Ipv4Hdr = c.at(off).ok_or(unrelated)?;
        let ip = unsafe { &*ip };
        let (src, dst) = (v4_mapped(ip.src), v4_mapped(ip.dst));
        if !eq16(&p.dst, &src) {
            return Err(unrelated);
        }
        key(k, zone, proto, &src, (sport, dport), &dst);
    } else {
        let ip: *mut Ipv6Hdr = c.at(off).ok_or(unrelated)?;
        let ip = unsafe { &*ip };
        if !eq16(&p.dst, &ip.src) {
            return Err(unrelated);
        }
        key(k, zone, proto, &ip.src, (sport, dport), &ip.dst);
    }
    match CL_CONNTRACK.get_ptr(k) {
        Some(e) if !expired(unsafe { &*e }, now) && unsafe { (*e).epoch } == epoch => {
            note(
                trace::CONNTRACK,
                trace::CT_RELATED,
                unsafe { (*e).state } as u32,
                zone,
            );
            Ok(())
        }
        _ => Err(unrelated),
    }
}

#[inline(always)]
fn frag_key(zone: u32, p: &Parsed) -> FragKey {
    let mut k = FragKey {
        zone,
        id: p.frag_id,
        src: [0; 16],
        dst: [0; 16],
        proto: p.proto,
        _pad: [0; 3],
    };
    copy16(&mut k.src, &p.src);
    copy16(&mut k.dst, &p.dst);
    k
}

/// An allowed first fragment: its later fragments will pass. Charged to
/// `tenant`, within its share of the table (so one tenant's fragments
/// cannot push another's out of it). 1 if over the share, else 0.
#[inline(never)]
pub fn remember_first_fragment(zone: u32, p: &Parsed, now: u64, tenant: u32) -> u32 {
    if !p.first_fragment {
        return 0;
    }
    let quota = match CL_CONFIG.get(0) {
        Some(c) => c.frag_tenant_quota as i64,
        None => return 1,
    };
    let used = match CL_FRAG_USE.get_ptr_mut(tenant) {
        Some(u) => u,
        None => return 1,
    };
    let key = frag_key(zone, p);
    let known = CL_FRAGMENTS.get_ptr(&key).is_some();
    if !known && unsafe { *used } >= quota {
        return 1;
    }
    if TRACE {
        return 0;
    }
    let e = FragEntry {
        seen_ns: now,
        tenant,
        _pad: 0,
    };
    if CL_FRAGMENTS.insert(&key, &e, 0).is_ok() && !known {
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(used, 1) };
    }
    0
}

/// A later fragment gets its first fragment's verdict.
#[inline(always)]
pub fn fragment_seen(zone: u32, p: &Parsed, now: u64) -> Result<(), DropReason> {
    if fragment_seen_call(zone, p, now) != 0 {
        Ok(())
    } else {
        Err(DropReason::FragmentUnknown)
    }
}

#[inline(never)]
fn fragment_seen_call(zone: u32, p: &Parsed, now: u64) -> u32 {
    let seen = match CL_FRAGMENTS.get_ptr(&frag_key(zone, p)) {
        Some(t) => !idle_longer_than(unsafe { (*t).seen_ns }, now, FRAG_TIMEOUT_NS) as u32,
        None => 0,
    };
    if seen != 0 {
        note(trace::CONNTRACK, trace::CT_FRAGMENT, 0, zone);
    }
    seen
}

/// ICMP messages that are neither errors nor echo (nor neighbour
/// discovery, which the policy stage exempts): no flow to track, and none
/// to share an entry per address pair. Checked against the rules every time.
#[inline(always)]
pub fn untracked_icmp(p: &Parsed) -> bool {
    match (p.l3, p.proto) {
        (L3::Ipv4, IPPROTO_ICMP) => !matches!(p.icmp_type, ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY),
        (L3::Ipv6, IPPROTO_ICMPV6) => {
            !matches!(p.icmp_type, ICMPV6_ECHO_REQUEST | ICMPV6_ECHO_REPLY)
        }
        _ => false,
    }
}
