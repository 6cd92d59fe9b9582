//! The trace build: the same stages, run by BPF_PROG_TEST_RUN only, on
//! the live maps. It writes none of them (no counter, no conntrack entry,
//! no quota, no rate, no SNAT mapping: each write is skipped where
//! [`TRACE`] is tested) and records what each stage found in its own
//! global record, which userspace clears before a run and reads after it.
use cloison_abi::{trace::MAX_STEPS, TraceRecord, TraceStep};

/// Whether this build is the trace build.
pub const TRACE: bool = true;

/// The record (the object's `.bss`, a map of one value). A global rather
/// than a map lookup: writing it takes no stack, and the live build's
/// longest call chains are at the 512-byte limit already.
#[unsafe(no_mangle)]
static mut CL_TRACE: TraceRecord = TraceRecord {
    n: 0,
    _pad: 0,
    steps: [TraceStep {
        stage: 0,
        a: 0,
        b: 0,
        c: 0,
    }; MAX_STEPS],
};

/// Records one step, if the record has room (else the trace is cut short,
/// which userspace sees as `MAX_STEPS` steps).
#[inline(always)]
pub fn note(stage: u32, a: u32, b: u32, c: u32) {
    let r = unsafe { &mut *core::ptr::addr_of_mut!(CL_TRACE) };
    let n = unsafe { core::ptr::read_volatile(&r.n) } as usize;
    if n < MAX_STEPS {
        r.steps[n] = TraceStep { stage, a, b, c };
        unsafe { core::ptr::write_volatile(&mut r.n, n as u32 + 1) };
    }
}
