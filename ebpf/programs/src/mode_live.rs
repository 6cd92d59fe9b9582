//! The live build: nothing is traced, and every stage writes what it
//! writes (counters, conntrack, quotas). `trace.rs` builds the same stages
//! with the trace mode instead (`mode_trace.rs`).

/// Whether this build is the trace build.
pub const TRACE: bool = false;

/// A trace step: nothing in the live build.
#[inline(always)]
pub fn note(_stage: u32, _a: u32, _b: u32, _c: u32) {}
