//! Entry points only; each stage lives in its own module and returns
//! `Result<_, DropReason>`, which is turned here into a counted drop.
#![no_std]
#![no_main]
// Atomic add on map values: core's atomics have no fetch_add on this target.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conntrack;
mod forward;
mod hdr;
mod icmp;
mod maps;
mod parse;
mod policy;
mod port;
mod proxy;
mod spoof;
mod uplink;
mod vxlan;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action, BPF_F_ADJ_ROOM_DECAP_L3_IPV4,
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::generated::{bpf_redirect, bpf_xdp_adjust_head},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use cloison_abi::{DropReason, PORT_F_SECURITY, VXLAN_ENCAP_LEN};

use crate::{
    hdr::{unpack, Cursor, Packed, ETH_LEN, ETH_P_IP, ETH_P_IPV6},
    maps::{count_drop, count_to_vm, NO_SLOT},
    port::*,
};

/// TC ingress of a port's host-side interface: everything the VM sends.
#[classifier]
pub fn cl_port(ctx: TcContext) -> i32 {
    let mut slot = core::mem::MaybeUninit::uninit();
    let d = Decision::init(&mut slot);
    let first = port::from_vm(&ctx, d);
    let res = if first < 0 {
        first
    } else {
        let sg = match d.next.kind {
            NEXT_LOCAL | NEXT_ENCAP | NEXT_TOO_BIG_V4 | NEXT_TOO_BIG_V6 => {
                policy::from_port(&ctx, d)
            }
            _ => 0,
        };
        if sg < 0 {
            sg
        } else {
            match d.next.kind {
                NEXT_ARP => proxy::arp(&ctx, d.ifindex, &d.port),
                NEXT_ND => proxy::nd(&ctx, &d.port, d.ifindex),
                NEXT_TOO_BIG_V4 => icmp::too_big(&ctx, d.ifindex, &d.port, true),
                NEXT_TOO_BIG_V6 => icmp::too_big(&ctx, d.ifindex, &d.port, false),
                NEXT_ENCAP => {
                    vxlan::encap(&ctx, d.port.vni, d.peer.vtep, vxlan::flow_hash(&d.parsed))
                }
                NEXT_LOCAL => forward::deliver(&d.peer, ctx.len(), true) as Packed,
                _ => d.next.arg as i32 as Packed,
            }
        }
    };
    match unpack(res) {
        Ok(action) => action,
        Err(reason) => {
            // A local receiver's ingress rules refused it: its counter.
            let slot = if reason == DropReason::SgIngressDenied && d.next.kind == NEXT_LOCAL {
                d.peer.slot
            } else {
                d.port.slot
            };
            count_drop(reason, slot);
            TC_ACT_SHOT
        }
    }
}

/// XDP on the uplink: decapsulate with `bpf_xdp_adjust_head` and redirect.
#[xdp]
pub fn cl_uplink_xdp(ctx: XdpContext) -> u32 {
    let c = Cursor::new(ctx.data(), ctx.data_end());
    match uplink::classify(&c) {
        Ok(None) => xdp_action::XDP_PASS,
        Ok(Some(d)) => {
            if d.port.flags & PORT_F_SECURITY != 0 {
                let inner = Cursor::new(ctx.data() + VXLAN_ENCAP_LEN, ctx.data_end());
                if let Err(reason) =
                    unpack(policy::to_port(&inner, inner.len(), d.port.ifindex, d.vni))
                {
                    count_drop(reason, d.port.slot);
                    return xdp_action::XDP_DROP;
                }
            }
            if unsafe { bpf_xdp_adjust_head(ctx.ctx, VXLAN_ENCAP_LEN as i32) } != 0 {
                count_drop(DropReason::DecapFailed, d.port.slot);
                return xdp_action::XDP_DROP;
            }
            count_to_vm(d.port.slot, (c.len() - VXLAN_ENCAP_LEN) as u32);
            unsafe { bpf_redirect(d.port.ifindex, 0) as u32 }
        }
        Err(reason) => {
            count_drop(reason, NO_SLOT);
            xdp_action::XDP_DROP
        }
    }
}

/// The same uplink stage as a TC program (`--uplink-hook tc`).
#[classifier]
pub fn cl_uplink_tc(ctx: TcContext) -> i32 {
    let len = ctx.len();
    parse::pull_headers(&ctx, VXLAN_ENCAP_LEN as u32);
    let c = Cursor::new(ctx.data(), ctx.data_end());
    match uplink::classify(&c) {
        Ok(None) => TC_ACT_OK,
        Ok(Some(d)) => {
            if d.port.flags & PORT_F_SECURITY != 0 {
                let inner = Cursor::new(c.data + VXLAN_ENCAP_LEN, c.end);
                let inner_len = len as usize - VXLAN_ENCAP_LEN;
                if let Err(reason) =
                    unpack(policy::to_port(&inner, inner_len, d.port.ifindex, d.vni))
                {
                    count_drop(reason, d.port.slot);
                    return TC_ACT_SHOT;
                }
            }
            match decap_tc(&ctx, &c, d.inner_proto) {
                Ok(()) => forward::deliver(&d.port, ctx.len(), false),
                Err(reason) => {
                    count_drop(reason, d.port.slot);
                    TC_ACT_SHOT
                }
            }
        }
        Err(reason) => {
            count_drop(reason, NO_SLOT);
            TC_ACT_SHOT
        }
    }
}

/// Removes outer IPv4, UDP, VXLAN and the inner Ethernet header's room,
/// then writes the inner Ethernet header where the outer one was.
fn decap_tc(ctx: &TcContext, c: &Cursor, inner_proto: u16) -> Result<(), DropReason> {
    let inner: *mut [u8; ETH_LEN] = c.at(VXLAN_ENCAP_LEN).ok_or(DropReason::DecapFailed)?;
    let inner = unsafe { *inner };
    let l3 = match inner_proto {
        ETH_P_IP => BPF_F_ADJ_ROOM_DECAP_L3_IPV4,
        ETH_P_IPV6 => BPF_F_ADJ_ROOM_DECAP_L3_IPV6,
        _ => 0,
    };
    ctx.adjust_room(
        -(VXLAN_ENCAP_LEN as i32),
        BPF_ADJ_ROOM_MAC,
        (l3 | BPF_F_ADJ_ROOM_FIXED_GSO) as u64,
    )
    .map_err(|_| DropReason::DecapFailed)?;
    ctx.store(0, &inner, 0).map_err(|_| DropReason::DecapFailed)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
