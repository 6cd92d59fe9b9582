//! VXLAN (RFC 7348) encapsulation towards a remote VTEP over the IPv4
//! underlay. The next hop comes from the kernel FIB; an unresolved neighbour
//! is left to `bpf_redirect_neigh` so the first packet is not lost.
use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        TC_ACT_REDIRECT,
    },
    helpers::generated::bpf_redirect,
    programs::TcContext,
};
use cloison_abi::{DropReason, FWD_F_ENCRYPT, FWD_F_REFUSE, VXLAN_ENCAP_LEN, VXLAN_PORT};

use crate::{
    hdr::*,
    maps::{CL_CONFIG, CL_IPSEC},
    mode::note,
    packet::{next_hop, redirect_to, Refusals},
    parse::Parsed,
};

/// Outer UDP source ports: the ephemeral range, chosen by the inner flow hash.
const SPORT_MIN: u32 = 49152;
const SPORT_RANGE: u64 = 16384;

#[repr(C)]
struct Outer {
    eth: [u8; 14],
    ip: [u8; 20],
    udp: [u8; 8],
    vxlan: [u8; 8],
    inner_eth: [u8; 14],
}

#[inline(always)]
pub fn ipv4_csum(ip: &[u8; 20]) -> [u8; 2] {
    csum_fold(csum_words(ip, 0)).to_be_bytes()
}

/// The inner flow's hash, for the outer UDP source port (ECMP entropy in the
/// underlay): addresses, protocol and, unless the packet is a fragment,
/// ports, as the kernel's flow hash takes them. Computed from what the port
/// stage parsed: the kernel's flow dissector (`bpf_get_hash_recalc`) was 40%
/// of the encap stage's time in the live pps run.
#[inline(always)]
pub fn flow_hash(p: &Parsed) -> u32 {
    #[inline(always)]
    fn word(a: &[u8; 16], i: usize) -> u32 {
        u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
    }
    #[inline(always)]
    fn mix(h: u32, w: u32) -> u32 {
        (h ^ w).wrapping_mul(0x9e37_79b1).rotate_left(13)
    }
    let ports = if p.first_fragment || p.later_fragment {
        0
    } else {
        (p.sport as u32) << 16 | p.dport as u32
    };
    let mut h = 0x811c_9dc5 ^ p.proto as u32;
    h = mix(h, word(&p.src, 0) ^ word(&p.src, 4));
    h = mix(h, word(&p.src, 8) ^ word(&p.src, 12));
    h = mix(h, word(&p.dst, 0) ^ word(&p.dst, 4));
    h = mix(h, word(&p.dst, 8) ^ word(&p.dst, 12));
    h = mix(h, ports);
    // murmur3's finaliser: every input bit moves the top bits (the port
    // range is taken from them).
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Encapsulates towards `vtep` and redirects: to the uplink, or to the
/// IPsec device when `peer_flags` say the pair encrypts.
#[inline(always)]
pub fn encap(
    ctx: &TcContext,
    vni: u32,
    vtep: [u8; 4],
    peer_flags: u32,
    hash: u32,
) -> Result<i32, DropReason> {
    let cfg = CL_CONFIG.get(0).ok_or(DropReason::NoConfig)?;
    let inner_len = ctx.len();
    let outer_ip_len = inner_len + (VXLAN_ENCAP_LEN - ETH_LEN) as u32;
    let mut eth = [0u8; 12];
    // Where it goes: the IPsec device (an L3 device: no next hop, no MACs,
    // the redirect drops the Ethernet header) or the uplink's next hop.
    // (One `write_outer` below for both: the header it builds is on the
    // stack once.)
    let (dev, resolved) = if peer_flags & (FWD_F_ENCRYPT | FWD_F_REFUSE) != 0 {
        // Never in clear to (or from) an ipsec host.
        let dev = CL_IPSEC.get(0).map_or(0, |d| d.ifindex);
        let refused = peer_flags & FWD_F_REFUSE != 0;
        note(cloison_abi::trace::IPSEC, dev, refused as u32, 0);
        if refused {
            return Err(DropReason::EncryptionMismatch);
        }
        if dev == 0 {
            return Err(DropReason::IpsecUnavailable);
        }
        (dev, true)
    } else {
        // Tenant traffic leaves only through the uplink, whatever the routes say.
        let why = Refusals {
            unreachable: DropReason::UnderlayUnreachable,
            elsewhere: DropReason::UnderlayNotUplink,
        };
        let resolved = next_hop(
            ctx,
            cfg.uplink_ifindex,
            IPPROTO_UDP,
            VXLAN_PORT,
            outer_ip_len as u16,
            (cfg.vtep, vtep),
            why,
            &mut eth,
        )?;
        note(
            cloison_abi::trace::NEXT_HOP,
            resolved as u32,
            u32::from_be_bytes([eth[0], eth[1], eth[2], eth[3]]),
            u32::from_be_bytes([0, 0, eth[4], eth[5]]),
        );
        (0, resolved)
    };
    write_outer(ctx, cfg.vtep, vtep, vni, outer_ip_len, hash, &eth)?;
    if dev != 0 {
        unsafe { bpf_redirect(dev, 0) };
        return Ok(TC_ACT_REDIRECT);
    }
    Ok(redirect_to(cfg.uplink_ifindex, resolved))
}

/// Makes room for the outer headers and writes them: Ethernet (`eth`: the
/// next hop's destination and source MACs), IPv4 from `src` to `dst`, UDP,
/// VXLAN with `vni`.
#[inline(always)]
fn write_outer(
    ctx: &TcContext,
    src: [u8; 4],
    dst: [u8; 4],
    vni: u32,
    outer_ip_len: u32,
    hash: u32,
    eth: &[u8; 12],
) -> Result<(), DropReason> {
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let inner: *mut [u8; 14] = c.at(0).ok_or(DropReason::TruncatedEthernet)?;
    let sport = (SPORT_MIN + ((hash as u64 * SPORT_RANGE) >> 32) as u32) as u16;

    let inner_eth = unsafe { *inner };
    let tot = (outer_ip_len as u16).to_be_bytes();
    let mut ip = [
        0x45,
        0,
        tot[0],
        tot[1],
        0,
        0,
        0x40,
        0,
        64,
        IPPROTO_UDP,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
    ];
    let csum = ipv4_csum(&ip);
    ip[10] = csum[0];
    ip[11] = csum[1];
    let sp = sport.to_be_bytes();
    let dp = VXLAN_PORT.to_be_bytes();
    let ul = ((outer_ip_len - 20) as u16).to_be_bytes();
    let v = vni.to_be_bytes();

    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
        | BPF_F_ADJ_ROOM_FIXED_GSO) as u64
        | ((ETH_LEN as u64) << 56);
    ctx.adjust_room(VXLAN_ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| DropReason::EncapFailed)?;
    // Written in place through the packet pointers (the helper above made
    // the new head writable and linear), field by field (no copy of the
    // whole header on the stack), not by bpf_skb_store_bytes: one helper
    // call less.
    let c = Cursor::new(ctx.data(), ctx.data_end());
    let head: *mut Outer = c.at(0).ok_or(DropReason::EncapFailed)?;
    unsafe {
        let o = &mut *head;
        let mut i = 0;
        while i < 12 {
            o.eth[i] = eth[i];
            i += 1;
        }
        o.eth[12] = 0x08;
        o.eth[13] = 0;
        o.ip = ip;
        // UDP checksum zero, as RFC 7348 recommends for IPv4.
        o.udp = [sp[0], sp[1], dp[0], dp[1], ul[0], ul[1], 0, 0];
        o.vxlan = [0x08, 0, 0, 0, v[1], v[2], v[3], 0];
        o.inner_eth = inner_eth;
    }
    Ok(())
}
