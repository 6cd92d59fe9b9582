//! The trace build: the same modules as `main.rs`, compiled with the trace
//! mode (`mode_trace.rs`) so that no map is written and each stage records
//! what it found. Its programs are never attached: the dataplane runs them
//! with BPF_PROG_TEST_RUN on the live maps (`cloisonctl trace`).
#![no_std]
#![no_main]
// Atomic add on map values: core's atomics have no fetch_add on this target.
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Map keys are passed by reference where they already are on the BPF stack
// (a value would be one more copy of up to 40 bytes on a 512-byte stack).
#![allow(clippy::needless_borrows_for_generic_args)]
// The trace build has two of the five programs: the stages only the others
// call (the service tap's, the external interface's) are compiled unused.
#![allow(dead_code)]

mod conntrack;
mod decision;
mod forward;
mod hdr;
mod icmp;
mod maps;
#[path = "mode_trace.rs"]
mod mode;
mod monitor;
mod nat;
mod packet;
mod parse;
mod pipeline;
mod policy;
mod port;
mod proxy;
mod route;
mod service;
mod spoof;
mod uplink;
mod vxlan;

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::packet::Tc;

/// The port program's trace build (see `mode_trace.rs`).
#[classifier]
pub fn cl_port_trace(ctx: TcContext) -> i32 {
    pipeline::from_vm(&ctx)
}

/// The uplink's TC program, trace build.
#[classifier]
pub fn cl_uplink_trace(ctx: TcContext) -> i32 {
    pipeline::from_underlay(&Tc(&ctx), false)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
