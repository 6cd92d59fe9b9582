//! Bench helpers (a separate object, never part of the dataplane): a packet
//! generator run with BPF_PROG_TEST_RUN's live-frames mode, which transmits
//! each frame out of the interface it "arrived" on, cycling the UDP source
//! port through `FLOWS[0]` flows; and a sink that counts and drops.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

/// Number of distinct flows the generator cycles through (1: the frame as given).
#[map(name = "BENCH_FLOWS")]
static FLOWS: Array<u32> = Array::with_max_entries(1, 0);

/// [0]: frames generated, [1]: frames sunk.
#[map(name = "BENCH_COUNTS")]
static COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Offset of the UDP source port in an Ethernet + IPv4 (no options) frame.
const UDP_SPORT_OFF: usize = 14 + 20;
const FIRST_SPORT: u64 = 10000;

#[xdp]
pub fn cl_bench_gen(ctx: XdpContext) -> u32 {
    let flows = match FLOWS.get(0) {
        Some(f) if *f > 1 => *f as u64,
        _ => 1,
    };
    if let Some(n) = COUNTS.get_ptr_mut(0) {
        let i = unsafe { *n };
        unsafe { *n = i + 1 };
        if flows > 1 && ctx.data() + UDP_SPORT_OFF + 2 <= ctx.data_end() {
            let sport = ((FIRST_SPORT + i % flows) as u16).to_be_bytes();
            let p = (ctx.data() + UDP_SPORT_OFF) as *mut [u8; 2];
            unsafe { *p = sport };
        }
    }
    xdp_action::XDP_TX
}

/// UDP destination port of the generated frames: what the sink counts.
const DPORT: u16 = 9;

#[xdp]
pub fn cl_bench_sink(ctx: XdpContext) -> u32 {
    // Only the generator's frames (IPv4, UDP to DPORT); the rest, such as
    // the receiving VM's own IPv6 chatter, goes on to its stack.
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + UDP_SPORT_OFF + 4 > end {
        return xdp_action::XDP_PASS;
    }
    let b = data as *const u8;
    let ours = unsafe {
        *b.add(12) == 0x08
            && *b.add(13) == 0x00
            && *b.add(23) == 17
            && u16::from_be_bytes([*b.add(UDP_SPORT_OFF + 2), *b.add(UDP_SPORT_OFF + 3)]) == DPORT
    };
    if !ours {
        return xdp_action::XDP_PASS;
    }
    if let Some(n) = COUNTS.get_ptr_mut(1) {
        unsafe { *n += 1 };
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
