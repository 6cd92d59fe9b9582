//! Steering to the agent's gateway services: what a VM asks of its network
//! (DHCPv4 and DHCPv6 requests, router solicitations, TCP to the metadata
//! address) goes, after anti-spoofing, to the agent's service tap with the
//! port's ifindex in the destination MAC, under a per-port rate limit; the
//! agent's answers come back in on that tap with the ifindex in the source
//! MAC and go only to that port, from its network's gateway MAC. Nothing of
//! it reaches the host stack or another port.
use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::generated::{bpf_ktime_get_ns, bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use cloison_abi::*;

use crate::{
    hdr::*,
    maps::{count_to_vm, CL_PORTS, CL_SERVICE, CL_SVC_RATE},
    mode::TRACE,
    parse::{Parsed, L3},
};

/// Whether the agent answers this frame (a DHCP request on a network with
/// DHCP off is an error of its own).
#[inline(always)]
pub fn wanted(port: &PortInfo, p: &Parsed) -> Result<bool, DropReason> {
    if p.later_fragment {
        return Ok(false);
    }
    let dhcp = match (p.l3, p.proto) {
        (L3::Ipv4, IPPROTO_UDP) => p.sport == 68 && p.dport == 67,
        (L3::Ipv6, IPPROTO_UDP) => p.sport == 546 && p.dport == 547,
        (L3::Ipv6, IPPROTO_ICMPV6) => return Ok(p.icmp_type == 133),
        (L3::Ipv4, IPPROTO_TCP) => {
            return Ok(p.dport == 80 && eq16(&p.dst, &v4_mapped(METADATA_IP)))
        }
        _ => false,
    };
    if dhcp && port.flags & PORT_F_DHCP == 0 {
        return Err(DropReason::DhcpOff);
    }
    Ok(dhcp)
}

/// Hands the frame to the agent: the port's ifindex written as its
/// destination MAC, once the port's rate allows.
#[inline(always)]
pub fn steer(ctx: &TcContext, ifindex: u32, port: &PortInfo) -> Result<i32, DropReason> {
    let cfg = CL_SERVICE.get(0).ok_or(DropReason::NoConfig)?;
    if cfg.ifindex == 0 {
        return Err(DropReason::NoServiceAgent);
    }
    if cfg.interval_ns != 0 {
        // Generic cell rate: `tat` is when the port's next frame is due at
        // the sustained rate; up to `burst_ns` early is allowed. Updates
        // from two CPUs may race: a frame or two more, never fewer.
        let tat = CL_SVC_RATE
            .get_ptr_mut(port.slot)
            .ok_or(DropReason::NoConfig)?;
        let now = unsafe { bpf_ktime_get_ns() };
        let due = unsafe { *tat }.max(now);
        if due - now > cfg.burst_ns {
            return Err(DropReason::ServiceRateLimited);
        }
        if !TRACE {
            unsafe { *tat = due + cfg.interval_ns };
        }
    }
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    unsafe {
        (*eth).dst = steer_mac(ifindex);
        bpf_redirect(cfg.ifindex, 0);
    }
    Ok(TC_ACT_REDIRECT)
}

/// An answer the agent wrote to its service tap: to the port its source MAC
/// names, if that port exists and the answer is for its VM (its MAC, or a
/// broadcast or multicast), sent from the port's gateway MAC.
#[inline(always)]
pub fn answer(ctx: &TcContext) -> Result<i32, DropReason> {
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let eth: *mut EthHdr = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    let eth = unsafe { &mut *eth };
    let ifindex = steered_ifindex(eth.src).ok_or(DropReason::ServiceBadAnswer)?;
    let port = CL_PORTS.get_ptr(&ifindex).ok_or(DropReason::UnknownPort)?;
    let port = unsafe { &*port };
    if !is_multicast_mac(&eth.dst) && !mac_eq(&eth.dst, &port.mac) {
        return Err(DropReason::ServiceBadAnswer);
    }
    eth.src = gateway_mac(port.vni);
    count_to_vm(port.slot, ctx.len());
    unsafe {
        if port.flags & PORT_F_VETH != 0 {
            bpf_redirect_peer(ifindex, 0);
        } else {
            bpf_redirect(ifindex, 0);
        }
    }
    Ok(TC_ACT_REDIRECT)
}
