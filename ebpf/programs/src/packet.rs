//! Packet access for the two hooks the pipeline runs in, behind one trait:
//! the linear bytes (a [`Cursor`]), the length, pulling headers into the
//! linear area, decapsulation and the redirect into a port. The uplink
//! pipeline is written once over it; the port program is TC only (a VM
//! port's GSO and partial checksums need an skb).
use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams, xdp_action,
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, BPF_F_ADJ_ROOM_DECAP_L3_IPV4,
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_REDIRECT,
        TC_ACT_SHOT,
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_load_bytes,
        bpf_xdp_adjust_head, bpf_xdp_load_bytes,
    },
    programs::{TcContext, XdpContext},
};
use cloison_abi::{DropReason, ForwardEntry, PORT_F_VETH, VXLAN_ENCAP_LEN};

use crate::hdr::*;

/// Headers the pipeline reads directly; pulled into the linear area first.
pub const PULL_LEN: u32 = 128;

pub trait Packet {
    /// The hook's verdict type and its "hand to the host" and "drop".
    type Verdict: Copy;
    const PASS: Self::Verdict;
    const DROP: Self::Verdict;
    fn cursor(&self) -> Cursor;
    /// The whole packet's length (linear or not).
    fn len(&self) -> u32;
    /// Whether it stands for several segments (a GSO packet).
    fn is_gso(&self) -> bool;
    /// Makes the headers of the frame starting `base` bytes in linear.
    fn pull_headers(&self, base: u32);
    /// Removes the outer Ethernet, IPv4, UDP and VXLAN headers: the inner
    /// frame (`inner_proto` its ethertype) starts the packet.
    fn decap(&self, inner_proto: u16) -> Result<(), DropReason>;
    /// Hands the packet to a local port's VM.
    fn redirect_to(&self, port: &ForwardEntry) -> Self::Verdict;
    /// The interface the program runs on.
    fn ifindex(&self) -> u32;
    /// Copies the packet's first `len` bytes (1 to [`PULL_LEN`], within
    /// the packet) to `dst`; 0 on success.
    fn load(&self, dst: *mut u8, len: u32) -> i64;
}

pub struct Tc<'a>(pub &'a TcContext);

pub struct Xdp<'a>(pub &'a XdpContext);

impl Packet for Tc<'_> {
    type Verdict = i32;
    const PASS: i32 = TC_ACT_OK;
    const DROP: i32 = TC_ACT_SHOT;

    #[inline(always)]
    fn cursor(&self) -> Cursor {
        Cursor::new(self.0.data(), self.0.data_end())
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        self.0.len()
    }

    #[inline(always)]
    fn is_gso(&self) -> bool {
        unsafe { (*self.0.skb.skb).gso_size != 0 }
    }

    #[inline(always)]
    fn pull_headers(&self, base: u32) {
        pull_headers(self.0, base)
    }

    /// Removes outer IPv4, UDP, VXLAN and the inner Ethernet header's room,
    /// then writes the inner Ethernet header where the outer one was.
    #[inline(always)]
    fn decap(&self, inner_proto: u16) -> Result<(), DropReason> {
        let c = self.cursor();
        let inner: *mut [u8; ETH_LEN] = c.at(VXLAN_ENCAP_LEN).ok_or(DropReason::DecapFailed)?;
        let inner = unsafe { *inner };
        let l3 = match inner_proto {
            ETH_P_IP => BPF_F_ADJ_ROOM_DECAP_L3_IPV4,
            ETH_P_IPV6 => BPF_F_ADJ_ROOM_DECAP_L3_IPV6,
            _ => 0,
        };
        self.0
            .adjust_room(
                -(VXLAN_ENCAP_LEN as i32),
                BPF_ADJ_ROOM_MAC,
                (l3 | BPF_F_ADJ_ROOM_FIXED_GSO) as u64,
            )
            .map_err(|_| DropReason::DecapFailed)?;
        // Written in place through the packet pointers (the helper above
        // made the head writable), not by bpf_skb_store_bytes: one helper
        // call less.
        let eth: *mut [u8; ETH_LEN] = self.cursor().at(0).ok_or(DropReason::DecapFailed)?;
        unsafe { *eth = inner };
        Ok(())
    }

    #[inline(always)]
    fn redirect_to(&self, port: &ForwardEntry) -> i32 {
        redirect_tc(port, false)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.0.skb.skb).ifindex }
    }

    #[inline(always)]
    fn load(&self, dst: *mut u8, len: u32) -> i64 {
        unsafe { bpf_skb_load_bytes(self.0.skb.skb as *const _, 0, dst as *mut _, len) }
    }
}

/// Redirects into a local port from TC: straight into a veth's peer (its
/// VM's namespace) when the frame came in on an ingress hook, else to the
/// port's egress.
#[inline(always)]
pub fn redirect_tc(port: &ForwardEntry, from_ingress: bool) -> i32 {
    unsafe {
        if from_ingress && port.flags & PORT_F_VETH != 0 {
            bpf_redirect_peer(port.ifindex, 0);
        } else {
            bpf_redirect(port.ifindex, 0);
        }
    }
    TC_ACT_REDIRECT
}

impl Packet for Xdp<'_> {
    type Verdict = u32;
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    #[inline(always)]
    fn cursor(&self) -> Cursor {
        Cursor::new(self.0.data(), self.0.data_end())
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (self.0.data_end() - self.0.data()) as u32
    }

    #[inline(always)]
    fn is_gso(&self) -> bool {
        false
    }

    /// An XDP frame is all linear.
    #[inline(always)]
    fn pull_headers(&self, _base: u32) {}

    /// The inner frame is complete behind the outer headers: moving the
    /// start of the packet past them is the whole decapsulation.
    #[inline(always)]
    fn decap(&self, _inner_proto: u16) -> Result<(), DropReason> {
        if unsafe { bpf_xdp_adjust_head(self.0.ctx, VXLAN_ENCAP_LEN as i32) } != 0 {
            return Err(DropReason::DecapFailed);
        }
        Ok(())
    }

    #[inline(always)]
    fn redirect_to(&self, port: &ForwardEntry) -> u32 {
        unsafe { bpf_redirect(port.ifindex, 0) as u32 }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.0.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn load(&self, dst: *mut u8, len: u32) -> i64 {
        unsafe { bpf_xdp_load_bytes(self.0.ctx, 0, dst as *mut _, len) }
    }
}

/// Why a next hop was not found: no route (`unreachable`), or one out of
/// another interface than `ifindex` (`elsewhere`).
pub struct Refusals {
    pub unreachable: DropReason,
    pub elsewhere: DropReason,
}

/// The next hop of an IPv4 packet (`proto`, to `dport` if UDP/TCP, `len`
/// bytes of IP) from `src` to `dst`, out of `ifindex` only, from the kernel's
/// FIB: its Ethernet addresses written to `eth` (destination, source) and
/// true, or false when they are not known yet (the neighbour unresolved,
/// or the host not forwarding on that interface): then `redirect_to`
/// leaves it to `bpf_redirect_neigh`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn next_hop(
    ctx: &TcContext,
    ifindex: u32,
    proto: u8,
    dport: u16,
    len: u16,
    (src, dst): ([u8; 4], [u8; 4]),
    why: Refusals,
    eth: &mut [u8; 12],
) -> Result<bool, DropReason> {
    let mut slot = core::mem::MaybeUninit::<FibParams>::uninit();
    // In place (see hdr::zero): mem::zeroed() would be a memset call.
    let fib = unsafe {
        zero(slot.as_mut_ptr());
        &mut *slot.as_mut_ptr()
    };
    fib.family = 2; // AF_INET
    fib.l4_protocol = proto;
    fib.dport = dport.to_be();
    fib.ifindex = ifindex;
    // The helper checks the length against the interface's MTU. A GSO
    // packet is judged by its segments (checked against the network MTU
    // before): with 0 the helper checks the skb itself, GSO aware. Without
    // this, every TSO burst of a VM was refused as soon as the host
    // forwarded (and the helper got that far).
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    fib.__bindgen_anon_1.tot_len = if gso { 0 } else { len };
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut core::ffi::c_void,
            fib,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    } as u32;
    let resolved = match rc {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        BPF_FIB_LKUP_RET_NO_NEIGH => false,
        // The helper refuses hosts with forwarding off on the interface;
        // the kernel then resolves the next hop itself, out of it.
        BPF_FIB_LKUP_RET_FWD_DISABLED => {
            fib.ifindex = ifindex;
            false
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(DropReason::MtuExceeded),
        _ => return Err(why.unreachable),
    };
    if fib.ifindex != ifindex {
        return Err(why.elsewhere);
    }
    let mut i = 0;
    while i < 6 {
        eth[i] = fib.dmac[i];
        eth[6 + i] = fib.smac[i];
        i += 1;
    }
    Ok(resolved)
}

/// Sends the packet out of `ifindex` to its next hop: as it is if
/// `resolved` (its MACs written), else through the kernel's neighbours.
#[inline(always)]
pub fn redirect_to(ifindex: u32, resolved: bool) -> i32 {
    unsafe {
        if resolved {
            bpf_redirect(ifindex, 0);
        } else {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0);
        }
    }
    TC_ACT_REDIRECT
}

/// Makes the headers of the frame starting `base` bytes into the packet
/// linear, when they are not already (the helper costs).
#[inline(always)]
pub fn pull_headers(ctx: &TcContext, base: u32) {
    let want = pull_len(ctx, base);
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        let _ = ctx.pull_data(want);
    }
}

/// How many bytes of a frame (starting `base` bytes into the packet) to make
/// linear before parsing: `PULL_LEN` (capped at the packet), except for a
/// GSO packet, whose headers only are pulled (read with
/// `bpf_skb_load_bytes`, wherever they lie). Its payload stays in its pages:
/// pulling part of it into the head would copy it there and keep the
/// receiving VM's TCP from coalescing the segments (measured: 1 coalesced
/// segment in 3 s of iperf3 instead of ~20,000).
#[inline(never)]
fn pull_len(ctx: &TcContext, base: u32) -> u32 {
    let len = ctx.len();
    let all = base + PULL_LEN;
    let plain = if len < all { len } else { all };
    if unsafe { (*ctx.skb.skb).gso_size } == 0 {
        return plain;
    }
    let proto = match ctx.load::<[u8; 2]>(base as usize + 12) {
        Ok(p) => be16(p),
        Err(_) => return plain,
    };
    let (l4, l4_proto) = match proto {
        ETH_P_IP => {
            let (Ok(vihl), Ok(p)) = (
                ctx.load::<u8>(base as usize + ETH_LEN),
                ctx.load::<u8>(base as usize + ETH_LEN + 9),
            ) else {
                return plain;
            };
            (base + ETH_LEN as u32 + ((vihl & 0x0f) as u32) * 4, p)
        }
        ETH_P_IPV6 => match ctx.load::<u8>(base as usize + ETH_LEN + 6) {
            Ok(p) => (base + ETH_LEN as u32 + 40, p),
            Err(_) => return plain,
        },
        _ => return plain,
    };
    let l4_len = match l4_proto {
        IPPROTO_TCP => match ctx.load::<u8>(l4 as usize + 12) {
            Ok(doff) => ((doff >> 4) as u32) * 4,
            Err(_) => return plain,
        },
        IPPROTO_UDP => 8,
        // An extension header or another protocol: the whole first part, as
        // for any frame.
        _ => return plain,
    };
    let end = l4 + l4_len;
    if end < plain {
        end
    } else {
        plain
    }
}
