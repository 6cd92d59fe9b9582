//! Security groups: whether the rules of a flow's secured ends allow it
//! (the sending port's egress rules, the receiving port's ingress rules, for
//! the ends that are local ports with port security). Two lookups per end
//! (each a hash by exact key, then a longest-prefix match when the hash
//! cannot answer), whatever the number of rules (see
//! dataplane/src/policy.rs for how rules become those tables). Conntrack
//! remembers what was allowed; the pipeline asks here for new flows, and
//! again for established ones when the rules changed (`policy_epoch`).
use aya_ebpf::maps::lpm_trie::Key;
use cloison_abi::*;

use crate::{
    hdr::*,
    maps::{CL_SG_ADDRS, CL_SG_HOSTS, CL_SG_PORTSETS, CL_SG_RULES},
    mode::note,
    parse::{Parsed, L3},
};

/// Neighbour discovery is always allowed (as in Neutron).
#[inline(always)]
pub fn exempt(p: &Parsed) -> bool {
    p.l3 == L3::Ipv6 && p.proto == IPPROTO_ICMPV6 && (p.icmp_type == 135 || p.icmp_type == 136)
}

/// Whether the rules of the secured ends allow this packet's flow. `reply`:
/// the packet goes from the flow's responder to its originator, so the
/// sender's ingress and the receiver's egress rules apply, and the service
/// port is the packet's source port.
///
/// This and the other helpers below are calls, not inlined: each has its
/// own stack frame, so that no call chain reaches the 512-byte BPF stack.
#[inline(always)]
pub fn rules_allow(
    p: &Parsed,
    s: Option<&PortInfo>,
    r: Option<&PortInfo>,
    reply: bool,
) -> Result<(), DropReason> {
    let sp: *const PortInfo = match s {
        Some(s) => s,
        None => core::ptr::null(),
    };
    let rp: *const PortInfo = match r {
        Some(r) => r,
        None => core::ptr::null(),
    };
    unpack(rules_allow_call(p, sp, rp, reply as u32)).map(|_| ())
}

#[inline(never)]
fn rules_allow_call(p: &Parsed, s: *const PortInfo, r: *const PortInfo, reply: u32) -> Packed {
    let reply = reply != 0;
    let service = if reply { p.sport } else { p.dport };
    if let Some(s) = unsafe { s.as_ref() } {
        let dir = if reply { SG_INGRESS } else { SG_EGRESS };
        if allowed(s.policy, dir as u32, &p.dst, p, service as u32) == 0 {
            return pack(Err(if reply {
                DropReason::SgIngressDenied
            } else {
                DropReason::SgEgressDenied
            }));
        }
    }
    if let Some(r) = unsafe { r.as_ref() } {
        let dir = if reply { SG_EGRESS } else { SG_INGRESS };
        if allowed(r.policy, dir as u32, &p.src, p, service as u32) == 0 {
            return pack(Err(if reply {
                DropReason::SgEgressDenied
            } else {
                DropReason::SgIngressDenied
            }));
        }
    }
    0
}

/// Two lookups: the remote address's class (by exact key in a hash first,
/// by longest prefix in a trie when that misses: abi's
/// `sg_addr_whole_bits`), then the ports the class allows for the protocol
/// (a short set by exact key, `SgPortSet`; the rules trie when the set is
/// absent or says the trie may hold more). 1 if allowed.
#[inline(never)]
fn allowed(policy: u32, direction: u32, remote: &[u8; 16], p: &Parsed, port: u32) -> u32 {
    let (v4, proto, direction, port) = (p.l3 == L3::Ipv4, p.proto, direction as u8, port as u16);
    let (family, bits, addr) = if v4 {
        // The IPv4 address in the first 4 bytes, the rest zero.
        let a = [remote[12], remote[13], remote[14], remote[15]];
        let w = [u32::from_ne_bytes(a) as u64, 0u64];
        (SG_FAMILY_V4, 32, unsafe {
            core::mem::transmute::<[u64; 2], [u8; 16]>(w)
        })
    } else {
        let mut a = [0u8; 16];
        copy16(&mut a, remote);
        (SG_FAMILY_V6, 128, a)
    };
    let policy = policy.to_be_bytes();
    let key = Key::new(
        SG_ADDR_FIXED_BITS + bits,
        SgAddrKey {
            policy,
            direction,
            family,
            _pad: [0; 2],
            addr,
        },
    );
    // The whole address first, by exact key; then the trie of prefixes.
    let class = match unsafe { CL_SG_HOSTS.get(&key.data) }.or_else(|| CL_SG_ADDRS.get(&key)) {
        Some(c) => *c,
        None => {
            let policy = u32::from_be_bytes(policy);
            let b = direction as u32 | (port as u32) << 16;
            note(trace::POLICY, policy, b, trace::NO_CLASS);
            return 0;
        }
    };
    let set_key = SgPortSetKey {
        policy,
        class: class.to_be_bytes(),
        direction,
        proto,
        _pad: [0; 2],
    };
    // The class's few ports for this protocol, by exact key; the trie when
    // the class has none there or may allow more.
    let (mut allowed, mut trie) = (0u32, true);
    if let Some(set) = unsafe { CL_SG_PORTSETS.get(&set_key) } {
        allowed = set.allows(port) as u32;
        trie = set.trie != 0;
    }
    if allowed == 0 && trie {
        let key = Key::new(SG_RULE_WHOLE_BITS, set_key.rule(port));
        allowed = CL_SG_RULES.get(&key).is_some() as u32;
    }
    note(
        trace::POLICY,
        u32::from_be_bytes(policy),
        direction as u32 | allowed << 8 | (port as u32) << 16,
        class,
    );
    allowed
}
