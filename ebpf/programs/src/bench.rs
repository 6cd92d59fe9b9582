//! Bench helpers (a separate object, never part of the dataplane): a packet
//! generator run with BPF_PROG_TEST_RUN's live-frames mode, which transmits
//! each frame out of the interface it "arrived" on, cycling the UDP source
//! source port through `FLOWS[0]` values and the destination port through
//! `FLOWS[1]`; and a sink that counts and drops.
//!
//! Live frames are recycled pages: what the path did to a frame (a router
//! rewriting its MACs and TTL in place) is still there when the page comes
//! back, so the generator writes the template's headers again every time.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

/// [0]: distinct UDP source ports the generator cycles through, [1]:
/// distinct destination ports (each after a whole round of source ports);
/// 0 or 1: the template's.
#[map(name = "BENCH_FLOWS")]
static FLOWS: Array<u32> = Array::with_max_entries(2, 0);

/// Bytes of the template's headers written into every frame: Ethernet,
/// IPv4 without options, UDP.
pub const HDR: usize = 14 + 20 + 8;

/// [0]: the template's first [`HDR`] bytes.
#[map(name = "BENCH_TEMPLATE")]
static TEMPLATE: Array<[u8; HDR]> = Array::with_max_entries(1, 0);

/// [0]: frames generated, [1]: frames sunk.
#[map(name = "BENCH_COUNTS")]
static COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Offset of the UDP source port in an Ethernet + IPv4 (no options) frame.
const UDP_SPORT_OFF: usize = 14 + 20;
const FIRST_SPORT: u64 = 10000;

#[xdp]
pub fn cl_bench_gen(ctx: XdpContext) -> u32 {
    let count = |i: u32| match FLOWS.get(i) {
        Some(f) if *f > 1 => *f as u64,
        _ => 1,
    };
    let (sports, dports) = (count(0), count(1));
    let (Some(t), Some(n)) = (TEMPLATE.get(0), COUNTS.get_ptr_mut(0)) else {
        return xdp_action::XDP_ABORTED;
    };
    let data = ctx.data();
    if data + HDR > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let i = unsafe { *n };
    unsafe { *n = i + 1 };
    // Word by word: a memcpy would be a call the BPF target cannot make.
    let (src, dst) = (t.as_ptr(), data as *mut u8);
    let mut k = 0;
    while k < HDR / 8 {
        unsafe {
            let w = core::ptr::read_unaligned(src.add(k * 8) as *const u64);
            core::ptr::write_unaligned(dst.add(k * 8) as *mut u64, w);
        }
        k += 1;
    }
    unsafe {
        let w = core::ptr::read_unaligned(src.add(HDR - 2) as *const u16);
        core::ptr::write_unaligned(dst.add(HDR - 2) as *mut u16, w);
    }
    let first_dport = u16::from_be_bytes([t[UDP_SPORT_OFF + 2], t[UDP_SPORT_OFF + 3]]) as u64;
    if sports > 1 {
        let sport = ((FIRST_SPORT + i.checked_rem(sports).unwrap_or(0)) as u16).to_be_bytes();
        unsafe { *(dst.add(UDP_SPORT_OFF) as *mut [u8; 2]) = sport };
    }
    if dports > 1 {
        // Checked: a division the verifier can see cannot fault.
        let round = i.checked_div(sports).unwrap_or(0);
        let dport = ((first_dport + round.checked_rem(dports).unwrap_or(0)) as u16).to_be_bytes();
        unsafe { *(dst.add(UDP_SPORT_OFF + 2) as *mut [u8; 2]) = dport };
    }
    xdp_action::XDP_TX
}

/// UDP destination ports of the generated frames, what the sink counts:
/// from `DPORT`, `DPORTS` of them.
const DPORT: u16 = 9;
const DPORTS: u16 = 1024;

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
            && u16::from_be_bytes([*b.add(UDP_SPORT_OFF + 2), *b.add(UDP_SPORT_OFF + 3)])
                .wrapping_sub(DPORT)
                < DPORTS
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
