//! Wire layouts and a bounds-checked cursor over the linear packet data.
//! Every field is a byte array so no access is ever misaligned.
use core::mem::size_of;

pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct ArpHdr {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub op: [u8; 2],
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub csum: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtcfl: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[repr(C)]
pub struct UdpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub len: [u8; 2],
    pub csum: [u8; 2],
}

#[repr(C)]
pub struct TcpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub off: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub csum: [u8; 2],
    pub urg: [u8; 2],
}

#[repr(C)]
pub struct IcmpHdr {
    pub ty: u8,
    pub code: u8,
    pub csum: [u8; 2],
    pub rest: [u8; 4],
}

#[repr(C)]
pub struct VxlanHdr {
    pub flags: u8,
    pub reserved1: [u8; 3],
    pub vni: [u8; 3],
    pub reserved2: u8,
}

/// The linear part of a packet: `[data, end)`.
#[derive(Clone, Copy)]
pub struct Cursor {
    pub data: usize,
    pub end: usize,
}

impl Cursor {
    #[inline(always)]
    pub fn new(data: usize, end: usize) -> Self {
        Self { data, end }
    }

    /// A header of type `T` at `off`, if all of it is inside the packet.
    #[inline(always)]
    pub fn at<T>(&self, off: usize) -> Option<*mut T> {
        let start = self.data + off;
        if start + size_of::<T>() > self.end {
            return None;
        }
        Some(start as *mut T)
    }
}

// The BPF backend (as bpf-linker drives it: memcpy expanded in order)
// inlines memcpy, but turns memset and memmove into calls to byte-loop
// subprograms: a tenth of an established packet's time went there. Zeroing
// is done below with volatile stores LLVM cannot fold into a memset, and
// copies with copy_nonoverlapping, which is a memcpy, never a memmove.

/// Zeroes `*p` with 8-byte stores, or 4-byte ones for a 4-byte aligned `T`
/// (all-zero must be a valid `T`).
#[inline(always)]
pub unsafe fn zero<T>(p: *mut T) {
    const { assert!(core::mem::align_of::<T>() >= 4 && size_of::<T>().is_multiple_of(4)) };
    if core::mem::align_of::<T>() >= 8 && size_of::<T>().is_multiple_of(8) {
        let w = p as *mut u64;
        let mut i = 0;
        while i < size_of::<T>() / 8 {
            core::ptr::write_volatile(w.add(i), 0);
            i += 1;
        }
    } else {
        let w = p as *mut u32;
        let mut i = 0;
        while i < size_of::<T>() / 4 {
            core::ptr::write_volatile(w.add(i), 0);
            i += 1;
        }
    }
}

/// Copies `*src` to `*dst` (distinct objects) as an inlined memcpy.
#[inline(always)]
pub unsafe fn copy<T>(dst: *mut T, src: *const T) {
    core::ptr::copy_nonoverlapping(src, dst, 1);
}

/// Copies an address (from a packet or the stack) as an inlined memcpy.
#[inline(always)]
pub fn copy16(dst: &mut [u8; 16], src: &[u8; 16]) {
    unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr(), 16) };
}

#[inline(always)]
pub fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
pub fn mac_eq(a: &[u8; 6], b: &[u8; 6]) -> bool {
    // Compared by hand: a slice compare could become a memcmp call, which BPF lacks.
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) | (a[5] ^ b[5])
        == 0
}

#[inline(always)]
pub fn ip4_eq(a: &[u8; 4], b: &[u8; 4]) -> bool {
    u32::from_ne_bytes(*a) == u32::from_ne_bytes(*b)
}

#[inline(always)]
pub fn is_multicast_mac(m: &[u8; 6]) -> bool {
    m[0] & 1 == 1
}

/// Folds a 32-bit one's complement sum into the 16-bit Internet checksum.
#[inline(always)]
pub fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// One's complement sum of `N` big-endian 16-bit words.
#[inline(always)]
pub fn csum_words<const N: usize>(bytes: &[u8; N], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += ((bytes[i] as u32) << 8) | bytes[i + 1] as u32;
        i += 2;
    }
    sum
}

/// `::ffff:a.b.c.d`, built in two registers (an array literal would be a
/// memset call).
#[inline(always)]
pub fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    let lo = ((0xffffu64 << 32) | u32::from_be_bytes(a) as u64).to_be();
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>([0, lo]) }
}

/// Whether `a` is an IPv6 link-local address (fe80::/10): never routed.
#[inline(always)]
pub fn link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

#[inline(always)]
pub fn is_zero16(a: &[u8; 16]) -> bool {
    let p = a.as_ptr() as *const u64;
    unsafe { (core::ptr::read_unaligned(p) | core::ptr::read_unaligned(p.add(1))) == 0 }
}

/// One's complement sum (not folded, network order) of `N` packet bytes at
/// `off`, with the kernel's `bpf_csum_diff`. `N` is a multiple of 4.
#[inline(always)]
pub fn csum_packet<const N: usize>(c: &Cursor, off: usize) -> Result<u32, cloison_abi::DropReason> {
    let p: *mut [u8; N] = c.at(off).ok_or(cloison_abi::DropReason::TruncatedL4)?;
    let partial = unsafe {
        aya_ebpf::helpers::generated::bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            p as *mut u32,
            N as u32,
            0,
        )
    };
    if partial < 0 {
        return Err(cloison_abi::DropReason::TruncatedL4);
    }
    // bpf_csum_diff sums native-endian words: fold, then swap to network order.
    let v = partial as u64;
    let mut s = (v & 0xffff) + (v >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    Ok((s as u16).swap_bytes() as u32)
}

#[inline(always)]
pub fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (pa, pb) = (a.as_ptr() as *const u64, b.as_ptr() as *const u64);
    unsafe {
        (core::ptr::read_unaligned(pa) ^ core::ptr::read_unaligned(pb))
            | (core::ptr::read_unaligned(pa.add(1)) ^ core::ptr::read_unaligned(pb.add(1)))
            == 0
    }
}

/// A stage result as one register: BPF subprograms cannot return aggregates
/// (LLVM would return a pointer into the caller's stack, which the verifier
/// refuses), so non-inlined stages return `Ok(verdict)` as itself and
/// `Err(reason)` as `-1 - reason`.
pub type Packed = i64;

#[inline(always)]
pub fn pack(r: Result<i32, cloison_abi::DropReason>) -> Packed {
    match r {
        Ok(v) => v as i64,
        Err(e) => -1 - e as i64,
    }
}

#[inline(always)]
pub fn unpack(v: Packed) -> Result<i32, cloison_abi::DropReason> {
    if v >= 0 {
        return Ok(v as i32);
    }
    let i = (-1 - v) as u32;
    if i >= cloison_abi::DropReason::COUNT {
        return Err(cloison_abi::DropReason::NoConfig);
    }
    // SAFETY: DropReason is #[repr(u32)] with variants 0..COUNT.
    Err(unsafe { core::mem::transmute::<u32, cloison_abi::DropReason>(i) })
}
