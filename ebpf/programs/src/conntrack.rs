//! Connection tracking: one entry per flow in an LRU map keyed by the
//! network (zone) and the flow's two ends in canonical order, aged by
//! timestamps, charged to a port and its tenant within their quotas.
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use cloison_abi::*;

use crate::{
    hdr::copy16,
    maps::{CONNTRACK, CT_USE},
};

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
    if let Some(c) = CT_USE.get_ptr_mut(index) {
        // An atomic add (BPF_ATOMIC | BPF_ADD): CPUs create and end flows at once.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(c, delta) };
    }
}

#[inline(always)]
fn in_use(index: u32) -> i64 {
    match CT_USE.get(index) {
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
    let owner = *e;
    if CONNTRACK.remove(key).is_ok() {
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
    let e = CtEntry {
        last_seen_ns: now,
        epoch,
        owner_slot: owner.slot,
        owner_tenant: owner.tenant,
        state,
        flags: if from_b { CT_F_ORIG_B } else { 0 },
        _pad: [0; 2],
    };
    CONNTRACK
        .insert(key, &e, 0)
        .map_err(|_| DropReason::CtFull)?;
    add_use(owner.slot, 1);
    add_use(MAX_PORTS + owner.tenant, 1);
    Ok(())
}
