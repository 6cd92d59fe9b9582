//! Entry points only. `pipeline` calls the stages in order; each stage lives
//! in its own module and returns `Result<_, DropReason>`; `decision` holds
//! what they share, `maps` the maps, `parse` and `hdr` the wire formats,
//! `packet` the XDP/TC packet access. Imports point one way (checked by
//! `cargo xtask test`).
#![no_std]
#![no_main]
// Atomic add on map values: core's atomics have no fetch_add on this target.
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Map keys are passed by reference where they already are on the BPF stack
// (a value would be one more copy of up to 40 bytes on a 512-byte stack).
#![allow(clippy::needless_borrows_for_generic_args)]

mod conntrack;
mod decision;
mod forward;
mod hdr;
mod icmp;
mod maps;
#[path = "mode_live.rs"]
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

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::packet::{Tc, Xdp};

/// TC ingress of a port's host-side interface: everything the VM sends.
#[classifier]
pub fn cl_port(ctx: TcContext) -> i32 {
    pipeline::from_vm(&ctx)
}

/// XDP on the uplink (a NIC's wire): decapsulation by moving the packet's
/// start, redirect.
#[xdp]
pub fn cl_uplink_xdp(ctx: XdpContext) -> u32 {
    pipeline::from_underlay(&Xdp(&ctx), false)
}

/// The same uplink pipeline as a TC program (software uplinks, `--uplink-hook tc`).
#[classifier]
pub fn cl_uplink_tc(ctx: TcContext) -> i32 {
    pipeline::from_underlay(&Tc(&ctx), false)
}

/// TC ingress of the IPsec device: what ipsec peers sent, decrypted.
#[classifier]
pub fn cl_ipsec(ctx: TcContext) -> i32 {
    pipeline::from_ipsec(&ctx)
}

/// TC ingress of the agent's service tap: the answers of its gateway
/// services, each to the port it names.
#[classifier]
pub fn cl_service(ctx: TcContext) -> i32 {
    pipeline::from_agent(&ctx)
}

/// TC ingress of the external interface: floating IPs and SNAT replies
/// back to their ports, the rest on.
#[classifier]
pub fn cl_external(ctx: TcContext) -> i32 {
    pipeline::from_outside(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
