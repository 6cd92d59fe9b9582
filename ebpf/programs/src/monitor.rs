//! The monitor: drops and (sampled) new flows streamed to the agent through
//! a ring buffer while someone watches (`cloisonctl monitor`), each with
//! the packet's first bytes. Off (the agent's `CL_MONITOR` all zero), a
//! drop costs one array lookup more and a packet that is not dropped
//! nothing. On, each CPU sends at most `rate` events a second; the others
//! are counted lost, as are those the full ring refuses.
use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use cloison_abi::{monitor::*, DropReason, MonitorConfig, MonitorEvent};

use crate::{
    maps::{CL_EVENTS, CL_MONITOR, CL_MON_RATE},
    mode::TRACE,
    packet::Packet,
};

const SECOND_NS: u64 = 1_000_000_000;
const _: () = assert!(CAPTURE.is_power_of_two());

/// The monitor's settings if it wants `flag` events of port `slot` (never
/// in the trace build).
#[inline(always)]
fn wanted(flag: u32, slot: u32) -> Option<&'static MonitorConfig> {
    if TRACE {
        return None;
    }
    let cfg = CL_MONITOR.get(0)?;
    (cfg.flags & flag != 0 && (cfg.slot == ANY_SLOT || cfg.slot == slot)).then_some(cfg)
}

/// A packet dropped for `reason`, charged to port `slot`.
#[inline(always)]
pub fn dropped<P: Packet>(pkt: &P, hook: u8, reason: DropReason, slot: u32) {
    let Some(cfg) = wanted(F_DROPS, slot) else {
        return;
    };
    let meta = KIND_DROP as u32 | (hook as u32) << 8 | (reason as u32 & 0xff) << 16;
    send(pkt, meta, slot, cfg.rate);
}

/// A new flow the rules allowed (its conntrack entry just created), for
/// port `slot`: one in `sample` is sent.
#[inline(always)]
pub fn new_flow<P: Packet>(pkt: &P, hook: u8, slot: u32) {
    let Some(cfg) = wanted(F_FLOWS, slot) else {
        return;
    };
    if cfg.sample > 1 && unsafe { bpf_get_prandom_u32() }.checked_rem(cfg.sample) != Some(0) {
        return;
    }
    send(pkt, KIND_FLOW as u32 | (hook as u32) << 8, slot, cfg.rate);
}

/// One event, within this CPU's budget. A BPF call of its own (the callers
/// are entry points: their stages have returned).
#[inline(never)]
fn send<P: Packet>(pkt: &P, meta: u32, slot: u32, rate: u32) {
    let Some(b) = CL_MON_RATE.get_ptr_mut(0) else {
        return;
    };
    let b = unsafe { &mut *b };
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(b.window_ns) >= SECOND_NS {
        b.window_ns = now;
        b.sent = 0;
    }
    if b.sent >= rate as u64 {
        b.lost += 1;
        return;
    }
    let Some(mut entry) = CL_EVENTS.reserve::<MonitorEvent>(0) else {
        b.lost += 1;
        return;
    };
    let ev = entry.as_mut_ptr();
    let len = pkt.len();
    let mut cap = len;
    if cap > CAPTURE as u32 {
        cap = CAPTURE as u32;
    }
    unsafe {
        (*ev).time_ns = now;
        (*ev).kind = meta as u8;
        (*ev).hook = (meta >> 8) as u8;
        (*ev).reason = (meta >> 16) as u8;
        (*ev)._pad = 0;
        (*ev).slot = slot;
        (*ev).ifindex = pkt.ifindex();
        (*ev).len = len;
        (*ev)._pad2 = 0;
        let data = core::ptr::addr_of_mut!((*ev).data) as *mut u8;
        // 1 to CAPTURE bytes, in a form the verifier can bound: the value is
        // read back through memory so that LLVM cannot fold the mask away.
        let n = core::ptr::read_volatile(&cap);
        let n = (n.wrapping_sub(1) & (CAPTURE as u32 - 1)) + 1;
        if cap == 0 || pkt.load(data, n) != 0 {
            cap = 0;
        }
        (*ev).captured = cap;
    }
    entry.submit(0);
    b.sent += 1;
}
