//! What the stages tell each other, in one place: the port program's
//! [`Decision`] (filled by the first stages, read by the later ones), the
//! flow's [`Ends`] for the stateful check, the uplink's [`Delivery`], and the
//! per-CPU [`Scratch`] memory. Knows only `parse`'s output and the ABI.
use cloison_abi::{CtKey, ForwardEntry, PortInfo};

use crate::{hdr::zero, parse::Parsed};

/// What the entry point does next. The stages that rewrite the packet are
/// called from the pipeline after the first stages returned, not from
/// inside them, so that no call chain exceeds the 512-byte BPF stack.
///
/// A plain struct rather than an enum with payloads: every byte is always
/// written, so LLVM never hands the verifier an uninitialised register.
#[derive(Clone, Copy)]
pub struct Next {
    pub kind: u32,
    pub arg: u32,
}

// What comes next (`Next::kind`) and its arguments: in the ABI, so that a
// trace's reader names them.
pub use cloison_abi::next::*;

impl Next {
    #[inline(always)]
    pub fn of(kind: u32, arg: u32) -> Self {
        Next { kind, arg }
    }
}

/// What the first stages learnt of a frame from a VM, for the stages that
/// follow (one out-parameter: BPF calls take at most five arguments).
#[repr(C, align(8))]
pub struct Decision {
    pub port: PortInfo,
    pub ifindex: u32,
    pub next: Next,
    /// Where forwarding sends the frame (`NEXT_LOCAL`, `NEXT_ENCAP`, too big).
    pub peer: ForwardEntry,
    /// The network it is delivered in and its flow's conntrack zone: the
    /// port's own, or the router's for a routed frame.
    pub out: Out,
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

/// Where a frame from a port goes on, network-wise (see [`Decision::out`]).
#[derive(Clone, Copy)]
pub struct Out {
    pub vni: u32,
    pub zone: u32,
}

/// The two ends of a flow as the stateful check sees them.
pub struct Ends {
    /// The flow's network: its conntrack zone.
    pub zone: u32,
    /// The sending port if it is local and has port security, else null.
    pub sender: *const PortInfo,
    /// The receiving port's ifindex if it is local and has port security,
    /// else 0; its entry is looked up only when rules are checked.
    pub receiver_ifindex: u32,
}

/// A decapsulated frame's destination (the uplink stage's answer).
pub struct Delivery {
    pub port: ForwardEntry,
    /// The flow's conntrack zone: the network's, or its router's if routed.
    pub zone: u32,
    pub inner_proto: u16,
}

/// Per-CPU working memory: what would not fit in the 512-byte BPF stack
/// along the longest call chain (the uplink's parse of the inner frame, and
/// conntrack keys).
pub struct Scratch {
    pub parsed: Parsed,
    pub key: CtKey,
}
