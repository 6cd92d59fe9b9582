//! Every type that crosses the kernel/userspace boundary of Cloison.
//!
//! The eBPF programs and the `dataplane` crate both compile this crate, so the
//! two sides share one definition of each map key and value. Keys are
//! `#[repr(C)]` with explicit padding fields (always zero) so that hashing in
//! the kernel never sees uninitialised bytes; a size assert pins each layout.
#![no_std]

use core::mem::size_of;

/// UDP destination port of VXLAN (RFC 7348).
pub const VXLAN_PORT: u16 = 4789;
/// Bytes added in front of the inner frame: outer Ethernet, IPv4, UDP, VXLAN.
pub const VXLAN_ENCAP_LEN: usize = 14 + 20 + 8 + 8;
/// Default tenant network MTU: 1500 underlay minus the VXLAN overhead.
pub const DEFAULT_MTU: u32 = 1450;

/// Port slots (index of [`PortStats`] in `CL_PORT_STATS`).
pub const MAX_PORTS: u32 = 16384;
pub const MAX_NETWORKS: u32 = 16384;
/// Addresses known in all networks (ARP/ND proxy table).
pub const MAX_NEIGHBOURS: u32 = 262144;
/// (VNI, MAC) forwarding entries: local and remote ports.
pub const MAX_FORWARD: u32 = 262144;
pub const MAX_VTEPS: u32 = 65536;
pub const MAX_ADDR_ALLOW: u32 = 65536;

/// Map names, at most 15 characters (the kernel's limit).
pub mod map_names {
    pub const PORTS: &str = "CL_PORTS";
    pub const ADDR_ALLOW: &str = "CL_ADDR_ALLOW";
    pub const FORWARD: &str = "CL_FWD";
    pub const NEIGHBOURS: &str = "CL_NEIGH";
    pub const NETWORKS: &str = "CL_NETWORKS";
    pub const VTEPS: &str = "CL_VTEPS";
    pub const CONFIG: &str = "CL_CONFIG";
    pub const DROPS: &str = "CL_DROPS";
    pub const PORT_STATS: &str = "CL_PORT_STATS";
}

/// Program names (the entry point functions of `ebpf/programs`).
pub mod program_names {
    pub const PORT: &str = "cl_port";
    pub const UPLINK_XDP: &str = "cl_uplink_xdp";
    pub const UPLINK_TC: &str = "cl_uplink_tc";
}

/// Bits of [`PortInfo::flags`].
pub const PORT_F_SECURITY: u32 = 1;
/// Deliver into this port with `bpf_redirect_peer` (veth) instead of
/// `bpf_redirect` to its egress (tap).
pub const PORT_F_VETH: u32 = 2;

/// A local port, keyed by the ifindex of its host-side interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortInfo {
    pub vni: u32,
    pub slot: u32,
    pub flags: u32,
    pub mtu: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<PortInfo>() == 24);

/// Key of `CL_ADDR_ALLOW`, an LPM trie: (ifindex, address) with the prefix
/// length counting the 32 ifindex bits first. IPv4 addresses are stored
/// IPv4-mapped (`::ffff:a.b.c.d`) so one trie serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    pub ifindex_be: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<AddrKey>() == 20);

/// The MAC a port may send from when using an allowed source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrAllow {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<AddrAllow>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ForwardKey {
    pub vni: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<ForwardKey>() == 12);

pub const FWD_LOCAL: u32 = 1;
pub const FWD_REMOTE: u32 = 2;

/// Where a (VNI, MAC) lives: a local port (ifindex, slot) or a remote VTEP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ForwardEntry {
    pub kind: u32,
    pub ifindex: u32,
    pub slot: u32,
    pub flags: u32,
    pub vtep: [u8; 4],
}
const _: () = assert!(size_of::<ForwardEntry>() == 20);

/// An address of a port in a network, answered by the ARP/ND proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighbourKey {
    pub vni: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<NeighbourKey>() == 20);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighbourEntry {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<NeighbourEntry>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkInfo {
    pub mtu: u32,
    pub _reserved: u32,
}
const _: () = assert!(size_of::<NetworkInfo>() == 8);

/// A VTEP allowed to send into a VNI: a host that has a port in that network.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VtepKey {
    pub vni: u32,
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<VtepKey>() == 8);

/// The host's own underlay settings, the one entry of `CL_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct HostConfig {
    pub vtep: [u8; 4],
    pub uplink_ifindex: u32,
}
const _: () = assert!(size_of::<HostConfig>() == 8);

/// Per-port counters (per CPU in the kernel), from the VM's point of view.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub drops: u64,
}
const _: () = assert!(size_of::<PortStats>() == 40);

impl core::ops::AddAssign for PortStats {
    fn add_assign(&mut self, o: Self) {
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.drops += o.drops;
    }
}

macro_rules! drop_reasons {
    ($($variant:ident = $name:literal,)*) => {
        /// Why a packet was dropped. Doubles as the index of its per-CPU counter.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum DropReason { $($variant,)* }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable human (and metrics label) name.
            pub const fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }

            pub fn from_index(i: u32) -> Option<Self> {
                Self::ALL.get(i as usize).copied()
            }
        }
    };
}

drop_reasons! {
    TruncatedEthernet = "truncated_ethernet",
    UnsupportedEthertype = "unsupported_ethertype",
    TruncatedArp = "truncated_arp",
    MalformedArp = "malformed_arp",
    TruncatedIpv4 = "truncated_ipv4",
    MalformedIpv4 = "malformed_ipv4",
    TruncatedIpv6 = "truncated_ipv6",
    MalformedIpv6 = "malformed_ipv6",
    TruncatedL4 = "truncated_l4",
    UnknownPort = "unknown_port",
    SpoofedMac = "spoofed_mac",
    SpoofedIp = "spoofed_ip",
    SpoofedArp = "spoofed_arp",
    DhcpServerFromVm = "dhcp_server_from_vm",
    RouterAdvertFromVm = "router_advert_from_vm",
    ArpReplyFromVm = "arp_reply_from_vm",
    ArpUnknownTarget = "arp_unknown_target",
    ArpSelfTarget = "arp_self_target",
    NdUnknownTarget = "nd_unknown_target",
    NdDadProbe = "nd_dad_probe",
    NdMalformed = "nd_malformed",
    RouterSolicitation = "router_solicitation",
    Broadcast = "broadcast",
    Multicast = "multicast",
    UnknownUnicast = "unknown_unicast",
    Hairpin = "hairpin",
    MtuExceeded = "mtu_exceeded",
    UnderlayUnreachable = "underlay_unreachable",
    UnderlayNotUplink = "underlay_not_uplink",
    EncapFailed = "encap_failed",
    VxlanTruncated = "vxlan_truncated",
    VxlanBadFlags = "vxlan_bad_flags",
    VxlanFragmented = "vxlan_fragmented",
    VxlanUnknownVni = "vxlan_unknown_vni",
    VxlanUnknownVtep = "vxlan_unknown_vtep",
    VxlanUnknownDestination = "vxlan_unknown_destination",
    VxlanSpoofedSource = "vxlan_spoofed_source",
    DecapFailed = "decap_failed",
    NoConfig = "no_config",
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], made only of integers and byte
    // arrays, with explicit padding fields: every bit pattern is valid.
    unsafe impl aya::Pod for PortInfo {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for AddrAllow {}
    unsafe impl aya::Pod for ForwardKey {}
    unsafe impl aya::Pod for ForwardEntry {}
    unsafe impl aya::Pod for NeighbourKey {}
    unsafe impl aya::Pod for NeighbourEntry {}
    unsafe impl aya::Pod for NetworkInfo {}
    unsafe impl aya::Pod for VtepKey {}
    unsafe impl aya::Pod for HostConfig {}
    unsafe impl aya::Pod for PortStats {}
}
