//! Every map of the dataplane, and the lookups and counters over them.
//! Typed in `cloison-abi`, written only by the `dataplane` crate; pinned by
//! name so an agent restart reuses them. Knows no stage: only the ABI and the
//! shared decision types.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use cloison_abi::*;

use crate::{
    decision::Scratch,
    mode::{note, TRACE},
};

// Each static's name is its map's name (`cloison_abi::maps`, where userspace
// finds it); dataplane's layout test compares the object with that table.

#[map]
pub static CL_PORTS: HashMap<u32, PortInfo> = HashMap::pinned(MAX_PORTS, 0);

#[map]
pub static CL_ADDR_ALLOW: LpmTrie<AddrKey, AddrAllow> = LpmTrie::pinned(MAX_ADDR_ALLOW, 0);

#[map]
pub static CL_FWD: HashMap<ForwardKey, ForwardEntry> = HashMap::pinned(MAX_FORWARD, 0);

#[map]
pub static CL_NEIGH: HashMap<NeighbourKey, NeighbourEntry> = HashMap::pinned(MAX_NEIGHBOURS, 0);

#[map]
pub static CL_NETWORKS: HashMap<u32, NetworkInfo> = HashMap::pinned(MAX_NETWORKS, 0);

#[map]
pub static CL_VTEPS: HashMap<VtepKey, u32> = HashMap::pinned(MAX_VTEPS, 0);

#[map]
pub static CL_CONFIG: Array<HostConfig> = Array::pinned(1, 0);

#[map]
pub static CL_DROP_COUNT: PerCpuArray<u64> = PerCpuArray::pinned(MAX_DROP_REASONS, 0);

#[map]
pub static CL_PORT_STATS: PerCpuArray<PortStats> = PerCpuArray::pinned(MAX_PORTS, 0);

#[map]
pub static CL_SG_ADDRS: LpmTrie<SgAddrKey, u32> = LpmTrie::pinned(MAX_SG_ADDRS, 0);

#[map]
pub static CL_SG_RULES: LpmTrie<SgRuleKey, u32> = LpmTrie::pinned(MAX_SG_RULES, 0);

/// Entries allocated as written (like the tries): a million-entry table
/// preallocated would hold a hundred megabytes whatever the rules.
#[map]
pub static CL_SG_HOSTS: HashMap<SgAddrKey, u32> =
    HashMap::pinned(MAX_SG_ADDRS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
pub static CL_SG_PORTSETS: HashMap<SgPortSetKey, SgPortSet> =
    HashMap::pinned(MAX_SG_RULES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
pub static CL_CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(MAX_CONNTRACK, 0);

/// Live conntrack entries charged to each port slot, then to each tenant
/// (`MAX_PORTS + tenant`). Signed: a decrement racing the agent's recount may
/// briefly go below zero, which must not read as a full quota.
#[map]
pub static CL_CT_USE: Array<i64> = Array::pinned(MAX_PORTS + MAX_TENANTS, 0);

/// First fragments allowed, and when they were seen.
#[map]
pub static CL_FRAGMENTS: LruHashMap<FragKey, FragEntry> = LruHashMap::pinned(MAX_FRAGMENTS, 0);

/// First fragments remembered for each tenant index (a tenant's share is
/// `HostConfig::frag_tenant_quota`).
#[map]
pub static CL_FRAG_USE: Array<i64> = Array::pinned(MAX_TENANTS, 0);

/// Where each remote port with port security may send from.
#[map]
pub static CL_REMOTE_ALLOW: LpmTrie<RemoteAddrKey, AddrAllow> =
    LpmTrie::pinned(MAX_REMOTE_ALLOW, 0);

/// Drops by (port, reason): per-CPU counters, created on a port's first
/// drop for a reason.
#[map]
pub static CL_PORT_DROPS: LruPerCpuHashMap<PortDropKey, u64> =
    LruPerCpuHashMap::pinned(MAX_PORT_DROPS, 0);

/// The agent's service tap and the per-port rate limit on it.
#[map]
pub static CL_SERVICE: Array<ServiceConfig> = Array::pinned(1, 0);

/// When each port slot's next frame to the agent is due (rate limit).
#[map]
pub static CL_SVC_RATE: Array<u64> = Array::pinned(MAX_PORTS, 0);

/// Networks joined by a router: the router's id and addresses there.
#[map]
pub static CL_RIFACES: HashMap<u32, RouterIface> = HashMap::pinned(MAX_NETWORKS, 0);

/// Each router's networks, by (router, prefix).
#[map]
pub static CL_ROUTES: LpmTrie<RouteKey, RouteEntry> = LpmTrie::pinned(MAX_ROUTES, 0);

/// The external interface and the host's external IP.
#[map]
pub static CL_EXTERNAL: Array<ExternalConfig> = Array::pinned(1, 0);

/// The IPsec device.
#[map]
pub static CL_IPSEC: Array<IpsecConfig> = Array::pinned(1, 0);

/// Floating IPs of local ports, by the floating IP.
#[map]
pub static CL_FIPS: HashMap<[u8; 4], FloatingIn> = HashMap::pinned(MAX_FLOATING_IPS, 0);

/// Floating IPs of local ports, by the port's ifindex.
#[map]
pub static CL_PORT_FIPS: HashMap<u32, FloatingOut> = HashMap::pinned(MAX_FLOATING_IPS, 0);

/// SNAT mappings by the inside flow, and by the outside one.
#[map]
pub static CL_SNAT: LruHashMap<SnatKey, SnatEntry> = LruHashMap::pinned(MAX_SNAT, 0);

#[map]
pub static CL_SNAT_REV: LruHashMap<SnatRevKey, SnatRevEntry> = LruHashMap::pinned(MAX_SNAT, 0);

/// The monitor's events, what it streams, and each CPU's budget.
#[map]
pub static CL_EVENTS: RingBuf = RingBuf::pinned(monitor::RING_BYTES, 0);

#[map]
pub static CL_MONITOR: Array<MonitorConfig> = Array::pinned(1, 0);

#[map]
pub static CL_MON_RATE: PerCpuArray<MonitorBudget> = PerCpuArray::pinned(1, 0);

/// Per-CPU working memory (see [`Scratch`]). Programs on one CPU run in
/// softirq context one at a time, so one slot per CPU is never shared.
#[map]
pub static CL_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Slot value meaning "no port known yet" (drops not attributed to a port).
pub const NO_SLOT: u32 = u32::MAX;

#[inline(always)]
pub fn count_drop(reason: DropReason, slot: u32) {
    if TRACE {
        note(trace::DROP, reason as u32, slot, 0);
        return;
    }
    if let Some(c) = CL_DROP_COUNT.get_ptr_mut(reason as u32) {
        unsafe { *c += 1 };
    }
    if let Some(s) = CL_PORT_STATS.get_ptr_mut(slot) {
        unsafe { (*s).drops += 1 };
        let key = PortDropKey {
            slot,
            reason: reason as u32,
        };
        match CL_PORT_DROPS.get_ptr_mut(&key) {
            Some(c) => unsafe { *c += 1 },
            None => {
                let _ = CL_PORT_DROPS.insert(&key, &1, 0);
            }
        }
    }
}

/// A frame the VM sent (seen at its port).
#[inline(always)]
pub fn count_from_vm(slot: u32, bytes: u32) {
    if TRACE {
        return;
    }
    if let Some(s) = CL_PORT_STATS.get_ptr_mut(slot) {
        unsafe {
            (*s).tx_packets += 1;
            (*s).tx_bytes += bytes as u64;
        }
    }
}

/// A frame handed to the VM.
#[inline(always)]
pub fn count_to_vm(slot: u32, bytes: u32) {
    if TRACE {
        note(trace::DELIVER, slot, 0, 0);
        return;
    }
    if let Some(s) = CL_PORT_STATS.get_ptr_mut(slot) {
        unsafe {
            (*s).rx_packets += 1;
            (*s).rx_bytes += bytes as u64;
        }
    }
}

/// Which MAC the remote port that sends from `addr` in network `vni` has
/// (remote ports with port security only).
#[inline(always)]
pub fn remote_mac(vni: u32, addr: [u8; 16]) -> Option<[u8; 6]> {
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        32 + 128,
        RemoteAddrKey {
            vni_be: vni.to_be_bytes(),
            addr,
        },
    );
    CL_REMOTE_ALLOW.get(&key).map(|a| a.mac)
}

/// Which MAC may send from `addr` on port `ifindex` (anti-spoofing).
#[inline(always)]
pub fn allowed_mac(ifindex: u32, addr: [u8; 16]) -> Option<[u8; 6]> {
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        32 + 128,
        AddrKey {
            ifindex_be: ifindex.to_be_bytes(),
            addr,
        },
    );
    CL_ADDR_ALLOW.get(&key).map(|a| a.mac)
}

#[inline(always)]
pub fn scratch() -> Result<&'static mut Scratch, DropReason> {
    match CL_SCRATCH.get_ptr_mut(0) {
        Some(s) => Ok(unsafe { &mut *s }),
        None => Err(DropReason::NoConfig),
    }
}

/// Where frames to `mac` in network `vni` go.
#[inline(always)]
pub fn forward(vni: u32, mac: [u8; 6]) -> Option<ForwardEntry> {
    let key = ForwardKey {
        vni,
        mac,
        _pad: [0; 2],
    };
    CL_FWD.get_ptr(&key).map(|f| unsafe { *f })
}

/// The MAC of `addr` in network `vni` (ARP and ND answers).
#[inline(always)]
pub fn neighbour(vni: u32, addr: [u8; 16]) -> Option<[u8; 6]> {
    let key = NeighbourKey { vni, addr };
    CL_NEIGH.get_ptr(&key).map(|n| unsafe { (*n).mac })
}

/// Where router `router` sends `addr`: the network holding it.
#[inline(always)]
pub fn route(router: u32, addr: [u8; 16]) -> Option<RouteEntry> {
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        32 + 128,
        RouteKey {
            router_be: router.to_be_bytes(),
            addr,
        },
    );
    CL_ROUTES.get(&key).copied()
}

/// The router joining network `vni`, if one does.
#[inline(always)]
pub fn router_iface(vni: u32) -> Option<RouterIface> {
    CL_RIFACES.get_ptr(&vni).map(|r| unsafe { *r })
}
