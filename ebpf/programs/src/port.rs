//! VM egress, on the host side of the port (TC ingress): parse, port,
//! anti-spoofing, local answers, forwarding.
use aya_ebpf::programs::TcContext;
use cloison_abi::*;

use crate::{
    forward,
    hdr::*,
    maps::{count_from_vm, PORTS},
    parse::{self, L3},
    proxy, spoof,
};

/// Headers the pipeline reads directly; pulled into the linear area first.
const PULL_LEN: u32 = 128;

pub fn from_vm(ctx: &TcContext, slot: &mut u32) -> Result<i32, DropReason> {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let port = PORTS.get_ptr(&ifindex).ok_or(DropReason::UnknownPort)?;
    let port = unsafe { *port };
    *slot = port.slot;
    let len = ctx.len();
    count_from_vm(port.slot, len);
    let _ = ctx.pull_data(if len < PULL_LEN { len } else { PULL_LEN });

    let c = Cursor::new(ctx.data(), ctx.data_end());
    let p = parse::frame(&c, len as usize)?;
    let secure = port.flags & PORT_F_SECURITY != 0;
    if p.l3 == L3::Arp {
        return proxy::arp(ctx, ifindex, &port);
    }
    if secure {
        let (eth, _) = parse::ethernet(&c)?;
        spoof::check_ip(eth, ifindex, &port, &p)?;
    }
    if p.l3 == L3::Ipv6 && p.proto == IPPROTO_ICMPV6 {
        match p.icmp_type {
            135 => return proxy::nd(ctx, &port, ifindex),
            133 => return Err(DropReason::RouterSolicitation),
            _ => {}
        }
    }
    forward::from_port(ctx, &c, ifindex, &port, &p)
}
