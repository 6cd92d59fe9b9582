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
/// Tenants with a port on one host (conntrack quota counters).
pub const MAX_TENANTS: u32 = 4096;
/// Conntrack entries per host by default (the agent's `--conntrack-entries`
/// sets another size). Each tenant on the host gets an equal share of 7/8 of
/// the table (each of its ports at most three quarters of that when it has
/// several), so the LRU never has to evict: one tenant's flood only meets
/// its own limit.
pub const MAX_CONNTRACK: u32 = 262144;
/// First fragments whose verdict later fragments inherit (IPv4 and IPv6).
pub const MAX_FRAGMENTS: u32 = 16384;
/// Slots of the drop counters: more than there are reasons, so that a
/// release adding reasons keeps the pinned map.
pub const MAX_DROP_REASONS: u32 = 256;
/// Addresses of remote ports with port security (decapsulation check).
pub const MAX_REMOTE_ALLOW: u32 = 262144;
/// Security-group tables: (policy, direction, remote address) → class and
/// (policy, class, direction, protocol, port prefix) → allow.
pub const MAX_SG_ADDRS: u32 = 262144;
pub const MAX_SG_RULES: u32 = 1048576;
/// Routes of the routers on one host: one per subnet of each network the
/// host's routers join.
pub const MAX_ROUTES: u32 = 65536;
/// Floating IPs of one host's ports.
pub const MAX_FLOATING_IPS: u32 = 16384;
/// Source-NAT mappings of one host (each way).
pub const MAX_SNAT: u32 = 262144;
/// External ports SNAT hands out: above Linux's default ephemeral range
/// (32768-60999), so no mapping takes a port of the host's own connections.
pub const SNAT_PORT_MIN: u16 = 61000;
pub const SNAT_PORT_MAX: u16 = 65535;

/// How a map is stored in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LruHash,
    LruPerCpuHash,
    LpmTrie,
    Array,
    PerCpuArray,
    /// A ring buffer (no keys: `max_entries` is its size in bytes).
    RingBuf,
}

impl MapKind {
    /// The kernel's `bpf_map_type` number.
    pub const fn kernel_type(self) -> u32 {
        match self {
            MapKind::Hash => 1,
            MapKind::Array => 2,
            MapKind::PerCpuArray => 6,
            MapKind::LruHash => 9,
            MapKind::LruPerCpuHash => 10,
            MapKind::LpmTrie => 11,
            MapKind::RingBuf => 27,
        }
    }
}

/// One map of the dataplane: its pinned name, kind, key and value types and
/// capacity. Userspace opens maps through these definitions; the BPF object
/// declares each map under the same name (a test compares the two).
pub trait MapDef {
    const NAME: &'static str;
    const KIND: MapKind;
    const MAX_ENTRIES: u32;
    type Key: Copy + 'static;
    type Value: Copy + 'static;
}

/// A map's definition as data (for checks over all of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub name: &'static str,
    pub kind: MapKind,
    /// Bytes of a key as the kernel sees it (an LPM key has its prefix
    /// length in front).
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: u32,
}

const fn info<M: MapDef>() -> MapInfo {
    let lpm = matches!(M::KIND, MapKind::LpmTrie);
    MapInfo {
        name: M::NAME,
        kind: M::KIND,
        key_size: size_of::<M::Key>() + if lpm { 4 } else { 0 },
        value_size: size_of::<M::Value>(),
        max_entries: M::MAX_ENTRIES,
    }
}

macro_rules! map_table {
    ($($(#[$doc:meta])* $ty:ident / $konst:ident = $name:literal, $kind:ident, $k:ty => $v:ty, $max:expr;)*) => {
        /// Every map of the dataplane, one type each.
        pub mod maps {
            use super::*;
            $(
                $(#[$doc])*
                pub struct $ty;
                impl MapDef for $ty {
                    const NAME: &'static str = $name;
                    const KIND: MapKind = MapKind::$kind;
                    const MAX_ENTRIES: u32 = $max;
                    type Key = $k;
                    type Value = $v;
                }
            )*
            pub const ALL: &[MapInfo] = &[$(info::<$ty>(),)*];
        }
        /// Map names, at most 15 characters (the kernel's limit).
        pub mod map_names {
            use super::*;
            $(pub const $konst: &str = <maps::$ty as MapDef>::NAME;)*
        }
    };
}

map_table! {
    /// Local ports by the ifindex of their host-side interface.
    Ports / PORTS = "CL_PORTS", Hash, u32 => PortInfo, MAX_PORTS;
    /// Anti-spoofing: (port, source prefix) → the MAC that may send from it.
    AntiSpoof / ADDR_ALLOW = "CL_ADDR_ALLOW", LpmTrie, AddrKey => AddrAllow, MAX_ADDR_ALLOW;
    /// (VNI, MAC) → a local port or a remote VTEP.
    Forward / FORWARD = "CL_FWD", Hash, ForwardKey => ForwardEntry, MAX_FORWARD;
    /// (VNI, IP) → MAC, for ARP and ND answers.
    Neighbours / NEIGHBOURS = "CL_NEIGH", Hash, NeighbourKey => NeighbourEntry, MAX_NEIGHBOURS;
    /// Networks with a port on this host, by VNI.
    Networks / NETWORKS = "CL_NETWORKS", Hash, u32 => NetworkInfo, MAX_NETWORKS;
    /// (VNI, VTEP) pairs that may send VXLAN to this host.
    Vteps / VTEPS = "CL_VTEPS", Hash, VtepKey => u32, MAX_VTEPS;
    /// The host's own settings, one entry.
    Config / CONFIG = "CL_CONFIG", Array, u32 => HostConfig, 1;
    /// Drops by reason (per CPU).
    Drops / DROPS = "CL_DROP_COUNT", PerCpuArray, u32 => u64, MAX_DROP_REASONS;
    /// Per-port counters by slot (per CPU).
    PortCounters / PORT_STATS = "CL_PORT_STATS", PerCpuArray, u32 => PortStats, MAX_PORTS;
    /// Security groups: (policy, direction, remote address) → class.
    SgAddrs / SG_ADDRS = "CL_SG_ADDRS", LpmTrie, SgAddrKey => u32, MAX_SG_ADDRS;
    /// Security groups: (policy, class, direction, protocol, port) → allow.
    SgRules / SG_RULES = "CL_SG_RULES", LpmTrie, SgRuleKey => u32, MAX_SG_RULES;
    /// The entries of `CL_SG_ADDRS` that name one whole address (/32, /128),
    /// by exact key: looked up first, so that a flow whose remote is such an
    /// address (a remote group's member) costs a hash lookup, not a walk
    /// down a trie that grows with the rules (see [`sg_addr_whole_bits`]).
    SgHosts / SG_HOSTS = "CL_SG_HOSTS", Hash, SgAddrKey => u32, MAX_SG_ADDRS;
    /// The ports a class allows for one protocol, when they are few (at
    /// most [`SG_PORT_SET_LEN`] prefixes), by exact (policy, class,
    /// direction, protocol): looked up before `CL_SG_RULES`, so that a new
    /// flow costs one hash lookup and a short scan here, not a walk down a
    /// trie that every class of the policy shares (see [`SgPortSet`]).
    SgPortSets / SG_PORT_SETS = "CL_SG_PORTSETS", Hash, SgPortSetKey => SgPortSet, MAX_SG_RULES;
    /// Tracked flows (the size is set when the table is created).
    Conntrack / CONNTRACK = "CL_CONNTRACK", LruHash, CtKey => CtEntry, MAX_CONNTRACK;
    /// Live conntrack entries charged to each port slot, then each tenant.
    CtUse / CT_USE = "CL_CT_USE", Array, u32 => i64, MAX_PORTS + MAX_TENANTS;
    /// First fragments allowed, when they were seen, and whose.
    Fragments / FRAGMENTS = "CL_FRAGMENTS", LruHash, FragKey => FragEntry, MAX_FRAGMENTS;
    /// First fragments remembered for each tenant index.
    FragUse / FRAG_USE = "CL_FRAG_USE", Array, u32 => i64, MAX_TENANTS;
    /// Where remote ports with port security may send from, by (VNI, prefix).
    RemoteAllow / REMOTE_ALLOW = "CL_REMOTE_ALLOW", LpmTrie, RemoteAddrKey => AddrAllow, MAX_REMOTE_ALLOW;
    /// Drops by (port, reason), per CPU.
    PortDrops / PORT_DROPS = "CL_PORT_DROPS", LruPerCpuHash, PortDropKey => u64, MAX_PORT_DROPS;
    /// The agent's service tap and the per-port limit on it, one entry.
    Service / SERVICE = "CL_SERVICE", Array, u32 => ServiceConfig, 1;
    /// Each port slot's theoretical arrival time (ns) of its next frame to
    /// the agent (the rate limit's state).
    ServiceRate / SERVICE_RATE = "CL_SVC_RATE", Array, u32 => u64, MAX_PORTS;
    /// Networks joined by a router, by VNI: the router and its addresses there.
    RouterIfaces / ROUTER_IFACES = "CL_RIFACES", Hash, u32 => RouterIface, MAX_NETWORKS;
    /// Each router's networks by (router, prefix): where it routes an address.
    Routes / ROUTES = "CL_ROUTES", LpmTrie, RouteKey => RouteEntry, MAX_ROUTES;
    /// The external interface and the host's external IP, one entry.
    External / EXTERNAL = "CL_EXTERNAL", Array, u32 => ExternalConfig, 1;
    /// The IPsec device (its ifindex; 0: none), one entry.
    Ipsec / IPSEC = "CL_IPSEC", Array, u32 => IpsecConfig, 1;
    /// Floating IPs of local ports, by the floating IP (inbound).
    FloatingIps / FLOATING_IPS = "CL_FIPS", Hash, [u8; 4] => FloatingIn, MAX_FLOATING_IPS;
    /// Floating IPs of local ports, by the port's ifindex (outbound).
    PortFloatingIps / PORT_FLOATING_IPS = "CL_PORT_FIPS", Hash, u32 => FloatingOut, MAX_FLOATING_IPS;
    /// SNAT mappings by the inside flow.
    Snat / SNAT = "CL_SNAT", LruHash, SnatKey => SnatEntry, MAX_SNAT;
    /// SNAT mappings by the outside flow (the reply's view).
    SnatReverse / SNAT_REVERSE = "CL_SNAT_REV", LruHash, SnatRevKey => SnatRevEntry, MAX_SNAT;
    /// Drop and new-flow events for `cloisonctl monitor` ([`MonitorEvent`]).
    Events / EVENTS = "CL_EVENTS", RingBuf, () => (), monitor::RING_BYTES;
    /// What the programs stream to [`Events`], one entry (off: nothing).
    Monitor / MONITOR = "CL_MONITOR", Array, u32 => MonitorConfig, 1;
    /// Each CPU's event budget and the events it could not send.
    MonitorRate / MONITOR_RATE = "CL_MON_RATE", PerCpuArray, u32 => MonitorBudget, 1;
}

/// The monitor: events the programs stream through a ring buffer while an
/// agent's client watches (`CL_EVENTS`), within a per-CPU rate.
pub mod monitor {
    /// The ring buffer's size (a power of two, a multiple of the page).
    pub const RING_BYTES: u32 = 256 * 1024;
    /// Bytes of the packet each event carries (its headers).
    pub const CAPTURE: usize = 128;
    /// `MonitorConfig::flags`: stream drops; stream new flows (sampled).
    pub const F_DROPS: u32 = 1;
    pub const F_FLOWS: u32 = 2;
    /// `MonitorConfig::slot` for every port.
    pub const ANY_SLOT: u32 = u32::MAX;
    /// `MonitorEvent::kind`.
    pub const KIND_DROP: u8 = 1;
    /// A new flow the rules allowed (conntrack entry created).
    pub const KIND_FLOW: u8 = 2;
    /// `MonitorEvent::hook`: which program saw it.
    pub const HOOK_PORT: u8 = 1;
    pub const HOOK_UPLINK: u8 = 2;
    pub const HOOK_SERVICE: u8 = 3;
    pub const HOOK_EXTERNAL: u8 = 4;
}

/// What the programs stream (`CL_MONITOR`); all zero: nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MonitorConfig {
    /// `monitor::F_*`.
    pub flags: u32,
    /// Events each CPU may send per second; past it they are counted lost.
    pub rate: u32,
    /// One new flow in `sample` is streamed (0 or 1: every one).
    pub sample: u32,
    /// Only this port slot's events (`monitor::ANY_SLOT`: every port's).
    pub slot: u32,
}
const _: () = assert!(size_of::<MonitorConfig>() == 16);

/// One CPU's event budget (`CL_MON_RATE`): the second it counts in, the
/// events sent in it, and every event not sent (over the rate, or the ring
/// full).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MonitorBudget {
    pub window_ns: u64,
    pub sent: u64,
    pub lost: u64,
}
const _: () = assert!(size_of::<MonitorBudget>() == 24);

/// One event of the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MonitorEvent {
    /// CLOCK_MONOTONIC, ns.
    pub time_ns: u64,
    pub kind: u8,
    pub hook: u8,
    /// A `DropReason` (drops), else 0.
    pub reason: u8,
    pub _pad: u8,
    /// The port slot charged (`u32::MAX`: none known).
    pub slot: u32,
    /// The interface the program runs on.
    pub ifindex: u32,
    /// The packet's length, and the bytes of it in `data`.
    pub len: u32,
    pub captured: u32,
    pub _pad2: u32,
    pub data: [u8; monitor::CAPTURE],
}
const _: () = assert!(size_of::<MonitorEvent>() == 32 + monitor::CAPTURE);

/// Maps of earlier releases whose layout changed (so they were renamed):
/// the loader removes their pins once it has loaded the object, so an
/// upgrade leaves nothing behind. Their contents were transient (fragments)
/// or counters, or moved before the new programs run (whole ports).
/// `CL_SG_PORTS` held whole security-group ports by exact [`SgRuleKey`]
/// (a release of 2026-12-03): the loader moves its entries into the
/// rules trie before the new programs run, so no flow it allowed is
/// refused before the first apply ([`SG_RETIRED_PORTS`]).
pub const RETIRED_MAPS: &[&str] = &["CL_DROPS", "CL_FRAGS", SG_RETIRED_PORTS];
/// The retired hash of whole security-group ports: [`SgRuleKey`] → u32.
pub const SG_RETIRED_PORTS: &str = "CL_SG_PORTS";

/// Program names (the entry point functions of `ebpf/programs`).
pub mod program_names {
    pub const PORT: &str = "cl_port";
    pub const UPLINK_XDP: &str = "cl_uplink_xdp";
    pub const UPLINK_TC: &str = "cl_uplink_tc";
    pub const SERVICE: &str = "cl_service";
    pub const EXTERNAL: &str = "cl_external";
    pub const IPSEC: &str = "cl_ipsec";
    /// The trace build (a separate object, never attached): the port
    /// program and the uplink's TC program, run by BPF_PROG_TEST_RUN on the
    /// live maps without writing them.
    pub const PORT_TRACE: &str = "cl_port_trace";
    pub const UPLINK_TRACE: &str = "cl_uplink_trace";
}

/// What the port program does next with a frame once the first stages
/// decided (`Next` in ebpf/programs/src/decision.rs; a trace's `NEXT` step).
pub mod next {
    /// `arg` is the TC verdict.
    pub const NEXT_VERDICT: u32 = 0;
    pub const NEXT_ARP: u32 = 1;
    pub const NEXT_ND: u32 = 2;
    pub const NEXT_TOO_BIG_V4: u32 = 3;
    pub const NEXT_TOO_BIG_V6: u32 = 4;
    /// To the remote VTEP in `Decision::peer`.
    pub const NEXT_ENCAP: u32 = 5;
    /// To the local port in `Decision::peer`.
    pub const NEXT_LOCAL: u32 = 6;
    /// To the agent's gateway services.
    pub const NEXT_SERVICE: u32 = 7;
    /// Routed with a TTL / hop limit that runs out: ICMP time exceeded back.
    pub const NEXT_TIME_EXCEEDED_V4: u32 = 8;
    pub const NEXT_TIME_EXCEEDED_V6: u32 = 9;
    /// To the outside, through the external interface (NAT).
    pub const NEXT_EXTERNAL: u32 = 10;
    /// An echo request to the router's address: answered back to the port.
    pub const NEXT_ROUTER_ECHO: u32 = 11;
    /// `arg` of `NEXT_TOO_BIG_*`: the router says so (from its address),
    /// rather than the destination network.
    pub const TOO_BIG_ROUTED: u32 = 1;
}

/// What the trace build of the programs records, step by step, in its own
/// record (a global, `CL_TRACE`, one [`TraceRecord`]: the trace object's
/// `.bss` map): the stages it went through and what each found. The live
/// object has neither record nor steps.
pub mod trace {
    /// The trace object's map holding the record.
    pub const MAP: &str = ".bss";
    pub const MAX_STEPS: usize = 24;
    /// a: port slot, b: VNI, c: port flags.
    pub const PORT: u32 = 1;
    /// a: ethertype, b: IP protocol, c: source port << 16 | destination port.
    pub const PARSE: u32 = 2;
    /// Anti-spoofing passed. a: 1 (IP) or 2 (ARP).
    pub const SPOOF: u32 = 3;
    /// a: forwarding entry kind, b: its ifindex, c: its VTEP (network order).
    pub const FORWARD: u32 = 4;
    /// No forwarding entry for the destination MAC.
    pub const FORWARD_MISS: u32 = 5;
    /// Routed. a: router zone, b: the network delivered in, c: TTL/hop limit left.
    pub const ROUTE: u32 = 6;
    /// a: [`CT_HIT`] and the rest, b: the entry's state, c: zone.
    pub const CONNTRACK: u32 = 7;
    /// A rules check of one end. a: policy, b: direction | allowed << 8 |
    /// the service port << 16, c: the remote address's class ([`NO_CLASS`]
    /// if none).
    pub const POLICY: u32 = 8;
    /// What the port program does next. a: next kind, b: its argument.
    pub const NEXT: u32 = 9;
    /// SNAT outbound. a: the outside port, b: 1 if the mapping would be new.
    pub const NAT: u32 = 10;
    /// Dropped. a: the reason, b: the slot charged.
    pub const DROP: u32 = 11;
    /// Handed to a VM. a: its slot.
    pub const DELIVER: u32 = 12;
    /// Uplink classified. a: VNI, b: destination ifindex, c: zone.
    pub const UPLINK: u32 = 13;
    /// Encapsulated. a: the VTEP (network order), b: VNI, c: UDP source port.
    pub const ENCAP: u32 = 14;
    /// The underlay's next hop of an encapsulated frame: a 1 if the FIB
    /// knew its MAC (then b: its first four bytes, c: its last two), 0 if
    /// the neighbour is not resolved yet (the kernel resolves it as it
    /// sends: `bpf_redirect_neigh`).
    pub const NEXT_HOP: u32 = 15;
    /// Encapsulated for an ipsec peer: a: the IPsec device's ifindex (0:
    /// none), b: 1 if the pair does not encrypt alike (refused).
    pub const IPSEC: u32 = 16;

    /// [`CONNTRACK`] results.
    pub const CT_HIT: u32 = 1;
    /// A new flow the rules allowed: the live program would insert it.
    pub const CT_WOULD_INSERT: u32 = 2;
    /// Tracked, and checked again against the rules (they changed since).
    pub const CT_RECHECKED: u32 = 3;
    /// An ICMP error quoting a tracked flow.
    pub const CT_RELATED: u32 = 4;
    /// A later fragment of an allowed first fragment.
    pub const CT_FRAGMENT: u32 = 5;
    /// Not tracked (exempt, or untracked ICMP checked every time).
    pub const CT_UNTRACKED: u32 = 6;
    /// Not tracked, and not a flow's first packet.
    pub const CT_MISS: u32 = 7;
    pub const NO_CLASS: u32 = u32::MAX;
}

/// One step of a trace (see [`trace`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceStep {
    pub stage: u32,
    pub a: u32,
    pub b: u32,
    pub c: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceRecord {
    pub n: u32,
    pub _pad: u32,
    pub steps: [TraceStep; trace::MAX_STEPS],
}

/// Bits of [`PortInfo::flags`].
pub const PORT_F_SECURITY: u32 = 1;
/// Deliver into this port with `bpf_redirect_peer` (veth) instead of
/// `bpf_redirect` to its egress (tap).
pub const PORT_F_VETH: u32 = 2;
/// The port's network answers DHCP (`dhcp: true`): its DHCPv4 and DHCPv6
/// requests go to the agent; without it they are dropped (`dhcp_off`).
pub const PORT_F_DHCP: u32 = 4;

/// The instance metadata address (169.254.169.254), IPv4.
pub const METADATA_IP: [u8; 4] = [169, 254, 169, 254];

/// The MAC of network `vni`'s gateway, the same on every host (a VM that
/// moves keeps a valid neighbour entry): the source of the agent's answers
/// to it, and what its `gateway_ips` and the metadata address resolve to.
/// Locally administered, unicast; the validator keeps ports off it.
pub const fn gateway_mac(vni: u32) -> [u8; 6] {
    [
        0x02,
        0xc1,
        0x0a,
        (vni >> 16) as u8,
        (vni >> 8) as u8,
        vni as u8,
    ]
}

/// Frames steered between the port programs and the agent's service tap
/// carry the port's ifindex in a MAC: the destination of a frame handed to
/// the agent, the source of an answer the agent sends back. These two
/// bytes, then the ifindex big-endian.
pub const STEER_MAC_PREFIX: [u8; 2] = [0x0e, 0xc1];

pub const fn steer_mac(ifindex: u32) -> [u8; 6] {
    let b = ifindex.to_be_bytes();
    [
        STEER_MAC_PREFIX[0],
        STEER_MAC_PREFIX[1],
        b[0],
        b[1],
        b[2],
        b[3],
    ]
}

/// The port ifindex a steering MAC carries.
pub const fn steered_ifindex(mac: [u8; 6]) -> Option<u32> {
    if mac[0] == STEER_MAC_PREFIX[0] && mac[1] == STEER_MAC_PREFIX[1] {
        Some(u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]))
    } else {
        None
    }
}

/// Where the port programs steer what the agent answers (DHCP, router
/// solicitations, metadata), the one entry of `CL_SERVICE`; and each
/// port's limit on it, a generic cell rate: one frame every `interval_ns`
/// sustained, `burst_ns` ahead of that at most (0: no limit).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceConfig {
    /// The agent's service tap; 0 while no agent serves.
    pub ifindex: u32,
    pub _pad: u32,
    pub interval_ns: u64,
    pub burst_ns: u64,
}
const _: () = assert!(size_of::<ServiceConfig>() == 24);

/// Conntrack zone of routed flows: the router's id on this host with this
/// bit set (a network's zone is its VNI, 24 bits). Both ends of a routed
/// flow are in different networks of one router: one zone for the two
/// directions, on every host that sees it, and never another tenant's.
pub const ROUTER_ZONE: u32 = 1 << 31;

/// Bits of [`RouterIface::flags`]: the router has an address of that family
/// in the network (routes that family from it).
pub const RIF_F_V4: u32 = 1;
pub const RIF_F_V6: u32 = 2;
/// The router source-NATs its networks' traffic to the outside.
pub const RIF_F_SNAT: u32 = 4;

/// Where traffic to and from the outside goes (the one entry of
/// `CL_EXTERNAL`): the external interface (0: none), its MAC, the host's
/// external IP (SNAT's source; 0.0.0.0: no SNAT on this host).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ExternalConfig {
    pub ifindex: u32,
    pub ip: [u8; 4],
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<ExternalConfig>() == 16);

/// A floating IP's local port (value of `CL_FIPS`): the port, its address
/// the floating IP stands for, the conntrack zone of its flows (its
/// router's).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FloatingIn {
    pub ifindex: u32,
    pub inner: [u8; 4],
    pub zone: u32,
}
const _: () = assert!(size_of::<FloatingIn>() == 12);

/// A local port's floating IP (value of `CL_PORT_FIPS`): traffic from
/// `inner` to the outside leaves from `ip`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FloatingOut {
    pub ip: [u8; 4],
    pub inner: [u8; 4],
}
const _: () = assert!(size_of::<FloatingOut>() == 8);

/// A source-NATed flow as its inside end sees it: (zone, protocol, inside
/// address and port, outside address and port). ICMP echo: the
/// identifier as the inside port, 0 as the outside one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnatKey {
    pub zone: u32,
    pub inside: [u8; 4],
    pub outside: [u8; 4],
    pub inside_port: [u8; 2],
    pub outside_port: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<SnatKey>() == 20);

/// The external port a flow was given.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnatEntry {
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SnatEntry>() == 4);

/// A source-NATed flow as the outside sees it (the host's external IP
/// implied): (protocol, external port, outside address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnatRevKey {
    pub outside: [u8; 4],
    pub port: [u8; 2],
    pub outside_port: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<SnatRevKey>() == 12);

/// Whose a mapping is: the inside end and its port, zone and flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnatRevEntry {
    pub ifindex: u32,
    pub zone: u32,
    pub inside: [u8; 4],
    pub inside_port: [u8; 2],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SnatRevEntry>() == 16);

/// A network joined by a router (value of `CL_RIFACES`, by VNI): the
/// router's id on this host and its addresses in the network (its
/// `gateway_ips`), the source of the router's ICMP errors.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouterIface {
    pub router: u32,
    pub flags: u32,
    pub gw4: [u8; 4],
    pub gw6: [u8; 16],
}
const _: () = assert!(size_of::<RouterIface>() == 28);

/// Key of `CL_ROUTES`, an LPM trie: (router, address) with the prefix length
/// counting the 32 router bits first; IPv4 IPv4-mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    pub router_be: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<RouteKey>() == 20);

/// Where a router sends an address: into network `vni`, whose MTU is `mtu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteEntry {
    pub vni: u32,
    pub mtu: u32,
}
const _: () = assert!(size_of::<RouteEntry>() == 8);

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
    /// Security policy (the port's set of groups), a key part of the SG tables.
    pub policy: u32,
    /// Tenant index on this host: its conntrack counter is
    /// `CL_CT_USE[MAX_PORTS + tenant]`; the port's own is `CL_CT_USE[slot]`.
    pub tenant: u32,
    pub ct_port_quota: u32,
    pub ct_tenant_quota: u32,
}
const _: () = assert!(size_of::<PortInfo>() == 40);

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

/// Bits of a remote [`ForwardEntry`]'s flags (beside [`PORT_F_SECURITY`]):
/// its VTEP and this host both have `encryption: ipsec`, so its frames go
/// to the IPsec device ([`IpsecConfig`]), never in clear to the uplink.
pub const FWD_F_ENCRYPT: u32 = 1 << 16;
/// One of its VTEP and this host is an ipsec host and the other is not:
/// its frames are dropped (`encryption_mismatch`), in clear or not.
pub const FWD_F_REFUSE: u32 = 1 << 17;

/// Bits of a `CL_VTEPS` value. Every entry has [`VTEP_F_ALLOWED`].
/// [`VTEP_F_ENCRYPTED`]: this host or the VTEP's is an ipsec host, so
/// nothing from the VTEP is taken in clear from the uplink
/// (`vxlan_plaintext`). [`VTEP_F_DECRYPTED`]: both are, so its VXLAN is
/// taken out of the IPsec device; decrypted VXLAN from any other VTEP is
/// refused (`encryption_mismatch`).
pub const VTEP_F_ALLOWED: u32 = 1;
pub const VTEP_F_ENCRYPTED: u32 = 2;
pub const VTEP_F_DECRYPTED: u32 = 4;

/// The IPsec device, the one entry of `CL_IPSEC`: the interface that
/// encrypts what is sent to it and out of which decrypted VXLAN comes
/// (charon's kernel-libipsec TUN device, or an XFRM interface); 0: none
/// (encrypted peers' frames are dropped, `ipsec_unavailable`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpsecConfig {
    pub ifindex: u32,
    pub _reserved: u32,
}
const _: () = assert!(size_of::<IpsecConfig>() == 8);

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
    /// Bumped whenever a security-group table changes: a conntrack entry
    /// stamped with an older epoch is checked against the rules again
    /// (strict revoke).
    pub policy_epoch: u32,
    /// First fragments each tenant may have remembered at once.
    pub frag_tenant_quota: u32,
}
const _: () = assert!(size_of::<HostConfig>() == 16);

/// Rule directions, as seen from the port the policy belongs to.
pub const SG_INGRESS: u8 = 0;
pub const SG_EGRESS: u8 = 1;
/// Address families in [`SgAddrKey`].
pub const SG_FAMILY_V4: u8 = 4;
pub const SG_FAMILY_V6: u8 = 6;

/// Key of `CL_SG_ADDRS`, an LPM trie: the fixed 64 bits (policy, direction,
/// family) then the remote address (IPv4 in its first 4 bytes). The longest
/// match gives the class: the set of rules whose remote contains the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SgAddrKey {
    pub policy: [u8; 4],
    pub direction: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<SgAddrKey>() == 24);
/// Prefix bits of [`SgAddrKey`] before the address.
pub const SG_ADDR_FIXED_BITS: u32 = 64;

/// Key of `CL_SG_RULES`, an LPM trie: the fixed 72 bits (policy, class,
/// direction), then the protocol (8 bits, absent for "any"), then the
/// destination port, big endian, as a prefix (a range compiles to prefixes).
/// Any match allows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SgRuleKey {
    pub policy: [u8; 4],
    pub class: [u8; 4],
    pub direction: u8,
    pub proto: u8,
    pub port: [u8; 2],
}
const _: () = assert!(size_of::<SgRuleKey>() == 12);
pub const SG_RULE_FIXED_BITS: u32 = 72;

/// The prefix bits of a whole key of `CL_SG_ADDRS`: one address (/32,
/// /128). Such entries live in `CL_SG_HOSTS`, by exact key, instead. The
/// longest match of an address is its own whole-address entry when there
/// is one, so looking there first and in the trie second answers as the
/// trie holding both would.
pub const fn sg_addr_whole_bits(key: &SgAddrKey) -> u32 {
    SG_ADDR_FIXED_BITS + if key.family == SG_FAMILY_V4 { 32 } else { 128 }
}

/// The prefix bits of a whole key of `CL_SG_RULES`: one protocol and one
/// port.
pub const SG_RULE_WHOLE_BITS: u32 = SG_RULE_FIXED_BITS + 24;

/// Key of `CL_SG_PORTSETS`: the part of an [`SgRuleKey`] a lookup knows
/// whole (policy, class, direction, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SgPortSetKey {
    pub policy: [u8; 4],
    pub class: [u8; 4],
    pub direction: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SgPortSetKey>() == 12);

impl SgPortSetKey {
    /// The rules-trie key of `port` for this (policy, class, direction,
    /// protocol).
    #[inline(always)]
    pub const fn rule(&self, port: u16) -> SgRuleKey {
        SgRuleKey {
            policy: self.policy,
            class: self.class,
            direction: self.direction,
            proto: self.proto,
            port: port.to_be_bytes(),
        }
    }
}

/// Port prefixes an [`SgPortSet`] holds at most; a class with more for one
/// protocol keeps them in the rules trie.
pub const SG_PORT_SET_LEN: usize = 7;

/// One port prefix: a port `p` is in it if `p & mask == value` (host
/// order; mask 0: every port, as a rule naming a protocol without ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SgPortPrefix {
    pub value: u16,
    pub mask: u16,
}

impl SgPortPrefix {
    /// The ports whose first `bits` bits (0 to 16) are those of `value`.
    pub const fn new(value: u16, bits: u32) -> Self {
        let mask = if bits == 0 {
            0
        } else {
            u16::MAX << (16 - bits)
        };
        SgPortPrefix { value, mask }
    }

    /// The prefix's length in bits.
    pub const fn bits(&self) -> u32 {
        self.mask.count_ones()
    }
}

/// Value of `CL_SG_PORTSETS`: the port prefixes a class allows for one
/// protocol (the first `len`, the rest zero, in order). `trie`: 1 if the
/// rules trie may allow more for this key (a rule of the class for any
/// protocol): a miss here is then looked up there. A key absent here is
/// looked up in the trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SgPortSet {
    pub ports: [SgPortPrefix; SG_PORT_SET_LEN],
    pub len: u8,
    pub trie: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SgPortSet>() == 32);

impl SgPortSet {
    /// Whether `port` is in one of the set's first `len` prefixes (a
    /// bounded loop, as the verifier wants it).
    #[inline(always)]
    pub fn allows(&self, port: u16) -> bool {
        let mut i = 0;
        while i < SG_PORT_SET_LEN && i < self.len as usize {
            let p = &self.ports[i];
            if port & p.mask == p.value {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// A conntrack key: the flow's two ends in a canonical order (so both
/// directions find one entry), inside its network (zone = VNI) or, routed,
/// its router ([`ROUTER_ZONE`]), so tenants with the same addresses never
/// share an entry. IPv4 is IPv4-mapped.
/// ICMP echo: the identifier is the requester's port, 0 the responder's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub zone: u32,
    pub addr_a: [u8; 16],
    pub addr_b: [u8; 16],
    pub port_a: [u8; 2],
    pub port_b: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtKey>() == 44);

/// Conntrack states (`CtEntry::state`).
pub mod ct_state {
    pub const TCP_SYN_SENT: u8 = 1;
    pub const TCP_SYN_RECV: u8 = 2;
    pub const TCP_ESTABLISHED: u8 = 3;
    /// One side sent FIN.
    pub const TCP_FIN_WAIT: u8 = 4;
    /// Both sides sent FIN.
    pub const TCP_TIME_WAIT: u8 = 5;
    /// RST seen.
    pub const TCP_CLOSE: u8 = 6;
    /// UDP, ICMP and other protocols: seen one way, then both ways.
    pub const ONE_WAY: u8 = 7;
    pub const BOTH_WAYS: u8 = 8;
}

/// Bits of [`CtEntry::flags`].
pub const CT_F_ORIG_B: u8 = 1;
pub const CT_F_FIN_ORIG: u8 = 2;
pub const CT_F_FIN_REPLY: u8 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` of the last packet.
    pub last_seen_ns: u64,
    /// `HostConfig::policy_epoch` the flow was last allowed under.
    pub epoch: u32,
    /// Counters charged with this entry: a port slot and a tenant index.
    pub owner_slot: u32,
    pub owner_tenant: u32,
    pub state: u8,
    /// `CT_F_*`; `CT_F_ORIG_B`: the originator is end b of the key.
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<CtEntry>() == 24);

/// Idle timeouts by state (Linux conntrack's defaults, established shortened).
pub const CT_TCP_SYN_NS: u64 = 60_000_000_000;
pub const CT_TCP_ESTABLISHED_NS: u64 = 86_400_000_000_000;
pub const CT_TCP_FIN_NS: u64 = 120_000_000_000;
pub const CT_TCP_CLOSE_NS: u64 = 10_000_000_000;
pub const CT_ONE_WAY_NS: u64 = 30_000_000_000;
pub const CT_BOTH_WAYS_NS: u64 = 180_000_000_000;
/// A first fragment's verdict is kept this long for the others (Linux's ipfrag_time).
pub const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

/// Whether something last seen at `last_seen_ns` has been idle longer than
/// `timeout_ns` at `now`. A stamp ahead of `now` is fresh, not ~584 years
/// old: another CPU may have stamped the entry after this one read the
/// clock (seen as mid-stream drops of established TCP flows).
pub const fn idle_longer_than(last_seen_ns: u64, now: u64, timeout_ns: u64) -> bool {
    now.saturating_sub(last_seen_ns) > timeout_ns
}

/// Whether a conntrack entry in `state` last seen at `last_seen_ns` is gone at `now`.
pub const fn ct_expired(state: u8, last_seen_ns: u64, now: u64) -> bool {
    idle_longer_than(last_seen_ns, now, ct_timeout_ns(state))
}

/// Idle timeout of an entry in `state`.
pub const fn ct_timeout_ns(state: u8) -> u64 {
    match state {
        ct_state::TCP_SYN_SENT | ct_state::TCP_SYN_RECV => CT_TCP_SYN_NS,
        ct_state::TCP_ESTABLISHED => CT_TCP_ESTABLISHED_NS,
        ct_state::TCP_FIN_WAIT | ct_state::TCP_TIME_WAIT => CT_TCP_FIN_NS,
        ct_state::TCP_CLOSE => CT_TCP_CLOSE_NS,
        ct_state::BOTH_WAYS => CT_BOTH_WAYS_NS,
        _ => CT_ONE_WAY_NS,
    }
}

/// TCP header flag bits.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Whether a TCP packet with no conntrack entry may start one: a bare SYN.
pub const fn tcp_opens(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// The (state, flags) of an existing entry after one more packet of its
/// flow. Shared by the BPF conntrack and the reference model. TCP follows
/// the handshake and teardown flags only (no sequence-window tracking).
pub const fn ct_advance(state: u8, flags: u8, tcp: bool, tcp_flags: u8, reply: bool) -> (u8, u8) {
    use ct_state::*;
    if !tcp {
        return (if reply { BOTH_WAYS } else { state }, flags);
    }
    if tcp_flags & TCP_RST != 0 {
        return (TCP_CLOSE, flags);
    }
    let syn = tcp_flags & TCP_SYN != 0;
    let ack = tcp_flags & TCP_ACK != 0;
    if (state == TCP_CLOSE || state == TCP_TIME_WAIT) && !reply && tcp_opens(tcp_flags) {
        // The same ports used again for a new connection.
        return (TCP_SYN_SENT, flags & CT_F_ORIG_B);
    }
    let mut state = state;
    let mut flags = flags;
    if state == TCP_SYN_SENT && reply && syn && ack {
        state = TCP_SYN_RECV;
    } else if state == TCP_SYN_RECV && !reply && ack && !syn {
        state = TCP_ESTABLISHED;
    }
    if tcp_flags & TCP_FIN != 0
        && (state == TCP_SYN_RECV || state == TCP_ESTABLISHED || state == TCP_FIN_WAIT)
    {
        flags |= if reply { CT_F_FIN_REPLY } else { CT_F_FIN_ORIG };
        state = if flags & (CT_F_FIN_ORIG | CT_F_FIN_REPLY) == (CT_F_FIN_ORIG | CT_F_FIN_REPLY) {
            TCP_TIME_WAIT
        } else {
            TCP_FIN_WAIT
        };
    }
    (state, flags)
}

/// Key of `CL_PORT_DROPS`: drops of one port (slot) for one reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortDropKey {
    pub slot: u32,
    pub reason: u32,
}
const _: () = assert!(size_of::<PortDropKey>() == 8);
/// (port, reason) pairs with a count; least recently dropped go first when full.
pub const MAX_PORT_DROPS: u32 = 65536;

/// An IPv4 or IPv6 datagram whose first fragment was allowed: (zone, its
/// identification, its ends, its protocol). IPv4 addresses IPv4-mapped, an
/// IPv4 identification in the low 16 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub zone: u32,
    pub id: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FragKey>() == 44);

/// When a first fragment was allowed, and the tenant it is charged to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragEntry {
    pub seen_ns: u64,
    pub tenant: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<FragEntry>() == 16);

/// Key of `CL_REMOTE_ALLOW`, an LPM trie: (VNI, address) with the prefix
/// length counting the 32 VNI bits first; IPv4 IPv4-mapped. The addresses a
/// remote port with port security may send from (its IPs, allowed pairs
/// and link-local address), checked at decapsulation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteAddrKey {
    pub vni_be: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<RemoteAddrKey>() == 20);

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
    SgEgressDenied = "sg_egress_denied",
    SgIngressDenied = "sg_ingress_denied",
    SgRevoked = "sg_revoked",
    CtTcpNotSyn = "ct_tcp_not_syn",
    CtPortQuota = "ct_port_quota",
    CtTenantQuota = "ct_tenant_quota",
    CtFull = "ct_full",
    IcmpErrorUnrelated = "icmp_error_unrelated",
    FragmentUnknown = "fragment_unknown",
    Ipv6ExtensionHeaders = "ipv6_ext_headers",
    Ipv6V4Mapped = "ipv6_v4_mapped",
    NdWithExtensionHeaders = "nd_with_ext_headers",
    NdSpoofedTarget = "nd_spoofed_target",
    VlanTaggedFromVm = "vlan_tagged_from_vm",
    VxlanSpoofedSourceIp = "vxlan_spoofed_source_ip",
    FragmentQuota = "fragment_tenant_quota",
    NotRedirected = "not_redirected",
    VxlanBadOuterHeader = "vxlan_bad_outer_header",
    DhcpOff = "dhcp_off",
    ServiceRateLimited = "service_rate_limited",
    NoServiceAgent = "no_service_agent",
    ServiceBadAnswer = "service_bad_answer",
    NotRouted = "not_routed",
    NoRoute = "no_route",
    RouteNoNeighbour = "route_no_neighbour",
    ToRouter = "to_router",
    TtlExceeded = "ttl_exceeded",
    NoExternal = "no_external",
    SnatExhausted = "snat_exhausted",
    ExternalUnreachable = "external_unreachable",
    NatFragment = "nat_fragment",
    EncryptionMismatch = "encryption_mismatch",
    IpsecUnavailable = "ipsec_unavailable",
    VxlanPlaintext = "vxlan_plaintext",
    IpsecNotVxlan = "ipsec_not_vxlan",
}
const _: () = assert!(DropReason::COUNT <= MAX_DROP_REASONS);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], made only of integers and byte
    // arrays, with explicit padding fields: every bit pattern is valid.
    unsafe impl aya::Pod for PortInfo {}
    unsafe impl aya::Pod for TraceRecord {}
    unsafe impl aya::Pod for MonitorConfig {}
    unsafe impl aya::Pod for MonitorBudget {}
    unsafe impl aya::Pod for MonitorEvent {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for AddrAllow {}
    unsafe impl aya::Pod for ForwardKey {}
    unsafe impl aya::Pod for ForwardEntry {}
    unsafe impl aya::Pod for IpsecConfig {}
    unsafe impl aya::Pod for NeighbourKey {}
    unsafe impl aya::Pod for NeighbourEntry {}
    unsafe impl aya::Pod for NetworkInfo {}
    unsafe impl aya::Pod for VtepKey {}
    unsafe impl aya::Pod for HostConfig {}
    unsafe impl aya::Pod for PortStats {}
    unsafe impl aya::Pod for SgAddrKey {}
    unsafe impl aya::Pod for SgRuleKey {}
    unsafe impl aya::Pod for SgPortSetKey {}
    unsafe impl aya::Pod for SgPortSet {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragEntry {}
    unsafe impl aya::Pod for RemoteAddrKey {}
    unsafe impl aya::Pod for PortDropKey {}
    unsafe impl aya::Pod for ServiceConfig {}
    unsafe impl aya::Pod for RouterIface {}
    unsafe impl aya::Pod for RouteKey {}
    unsafe impl aya::Pod for RouteEntry {}
    unsafe impl aya::Pod for ExternalConfig {}
    unsafe impl aya::Pod for FloatingIn {}
    unsafe impl aya::Pod for FloatingOut {}
    unsafe impl aya::Pod for SnatKey {}
    unsafe impl aya::Pod for SnatEntry {}
    unsafe impl aya::Pod for SnatRevKey {}
    unsafe impl aya::Pod for SnatRevEntry {}
}

#[cfg(test)]
mod tests {
    use super::{ct_state::*, *};

    /// Runs packets (flags, from the responder) through `ct_advance` from a
    /// new TCP entry; returns the states after each.
    fn tcp(packets: &[(u8, bool)]) -> [u8; 8] {
        let (mut state, mut flags) = (TCP_SYN_SENT, 0);
        let mut out = [0; 8];
        for (i, &(f, reply)) in packets.iter().enumerate() {
            (state, flags) = ct_advance(state, flags, true, f, reply);
            out[i] = state;
        }
        out
    }

    #[test]
    fn tcp_handshake_data_and_teardown() {
        let states = tcp(&[
            (TCP_SYN | TCP_ACK, true),
            (TCP_ACK, false),
            (TCP_ACK, true),
            (TCP_FIN | TCP_ACK, false),
            (TCP_ACK, true),
            (TCP_FIN | TCP_ACK, true),
        ]);
        assert_eq!(
            states[..6],
            [
                TCP_SYN_RECV,
                TCP_ESTABLISHED,
                TCP_ESTABLISHED,
                TCP_FIN_WAIT,
                TCP_FIN_WAIT,
                TCP_TIME_WAIT
            ]
        );
    }

    #[test]
    fn tcp_reset_and_reuse() {
        let states = tcp(&[(TCP_SYN | TCP_ACK, true), (TCP_RST, true), (TCP_SYN, false)]);
        assert_eq!(states[..3], [TCP_SYN_RECV, TCP_CLOSE, TCP_SYN_SENT]);
        // A SYN from the responder does not reopen a closed entry.
        let (s, _) = ct_advance(TCP_CLOSE, 0, true, TCP_SYN, true);
        assert_eq!(s, TCP_CLOSE);
    }

    #[test]
    fn a_retransmitted_syn_or_a_stray_ack_changes_nothing() {
        assert_eq!(
            tcp(&[(TCP_SYN, false), (TCP_ACK, false)])[..2],
            [TCP_SYN_SENT, TCP_SYN_SENT]
        );
        assert!(tcp_opens(TCP_SYN));
        for f in [TCP_ACK, TCP_SYN | TCP_ACK, TCP_SYN | TCP_RST, TCP_FIN, 0] {
            assert!(!tcp_opens(f), "{f:#x} does not open a connection");
        }
    }

    #[test]
    fn other_protocols_become_two_way_on_a_reply() {
        assert_eq!(ct_advance(ONE_WAY, 0, false, 0, false).0, ONE_WAY);
        assert_eq!(ct_advance(ONE_WAY, 0, false, 0, true).0, BOTH_WAYS);
        assert!(ct_timeout_ns(BOTH_WAYS) > ct_timeout_ns(ONE_WAY));
        // Stamped by another CPU just after this one read the clock.
        assert!(!ct_expired(TCP_ESTABLISHED, 1_000_001, 1_000_000));
        assert!(!ct_expired(TCP_CLOSE, 5, 5 + CT_TCP_CLOSE_NS));
        assert!(ct_expired(TCP_CLOSE, 5, 6 + CT_TCP_CLOSE_NS));
        assert!(ct_timeout_ns(TCP_ESTABLISHED) > ct_timeout_ns(TCP_SYN_SENT));
    }
}
