//! VM egress, on the host side of the port (TC ingress): parse, port,
//! anti-spoofing, local answers, forwarding.
use aya_ebpf::programs::TcContext;
use cloison_abi::*;

use crate::{
    forward,
    hdr::*,
    maps::{count_from_vm, PORTS},
    parse::{self, Parsed, L3},
    spoof,
};

/// Headers the pipeline reads directly; pulled into the linear area first.
pub const PULL_LEN: u32 = 128;

/// What the entry point does next. The stages that rewrite the packet are
/// called from the entry point, not from here, so that no call chain exceeds
/// the 512-byte BPF stack.
///
/// A plain struct rather than an enum with payloads: every byte is always
/// written, so LLVM never hands the verifier an uninitialised register.
#[derive(Clone, Copy)]
pub struct Next {
    pub kind: u32,
    pub arg: u32,
}

pub const NEXT_VERDICT: u32 = 0;
pub const NEXT_ARP: u32 = 1;
pub const NEXT_ND: u32 = 2;
pub const NEXT_TOO_BIG_V4: u32 = 3;
pub const NEXT_TOO_BIG_V6: u32 = 4;
/// To the remote VTEP in `Decision::peer`.
pub const NEXT_ENCAP: u32 = 5;
/// To the local port in `Decision::peer`.
pub const NEXT_LOCAL: u32 = 6;

impl Next {
    #[inline(always)]
    pub fn of(kind: u32, arg: u32) -> Self {
        Next { kind, arg }
    }
}

/// What the first stages learnt of a frame, for the stages that follow
/// (one out-parameter: BPF calls take at most five arguments).
#[repr(C, align(8))]
pub struct Decision {
    pub port: PortInfo,
    pub ifindex: u32,
    pub next: Next,
    /// Where forwarding sends the frame (`NEXT_LOCAL`, `NEXT_ENCAP`, too big).
    pub peer: ForwardEntry,
    pub parsed: Parsed,
}

impl Decision {
    /// Makes `slot` all zeroes (a valid value of every field), with "drop"
    /// as the verdict, in place: a value returned and moved would be zeroed
    /// again by a memset call.
    #[inline(always)]
    pub fn init(slot: &mut core::mem::MaybeUninit<Decision>) -> &mut Decision {
        unsafe {
            zero(slot.as_mut_ptr());
            let d = &mut *slot.as_mut_ptr();
            d.next = Next::of(NEXT_VERDICT, aya_ebpf::bindings::TC_ACT_SHOT as u32);
            d
        }
    }
}

/// Fills `d` for the stages that follow.
#[inline(never)]
pub fn from_vm(ctx: &TcContext, d: &mut Decision) -> Packed {
    match stage(ctx, d) {
        Ok(n) => {
            d.next = n;
            0
        }
        Err(e) => pack(Err(e)),
    }
}

#[inline(always)]
fn stage(ctx: &TcContext, d: &mut Decision) -> Result<Next, DropReason> {
    d.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let ifindex = d.ifindex;
    let info = PORTS.get_ptr(&ifindex).ok_or(DropReason::UnknownPort)?;
    unsafe { copy(&mut d.port, info) };
    let port = &d.port;
    let len = ctx.len();
    count_from_vm(port.slot, len);
    parse::pull_headers(ctx, 0);

    let c = Cursor::new(ctx.data(), ctx.data_end());
    parse::frame(&c, len as usize, &mut d.parsed)?;
    let p = &d.parsed;
    if p.l3 == L3::Arp {
        return Ok(Next::of(NEXT_ARP, 0));
    }
    if port.flags & PORT_F_SECURITY != 0 {
        let (eth, _) = parse::ethernet(&c)?;
        spoof::check_ip(eth, ifindex, port, p)?;
    }
    if p.l3 == L3::Ipv6 && p.proto == IPPROTO_ICMPV6 {
        match p.icmp_type {
            135 => return Ok(Next::of(NEXT_ND, 0)),
            133 => return Err(DropReason::RouterSolicitation),
            _ => {}
        }
    }
    forward::from_port(ctx, &c, ifindex, port, p, &mut d.peer)
}
