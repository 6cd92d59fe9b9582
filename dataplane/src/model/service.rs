//! What the agent's gateway services answer (API.md, Gateway services):
//! DHCP from a client (v4: 68 → 67, v6: 546 → 547) where the network has
//! DHCP, router solicitations, and HTTP to the metadata address. The per-port
//! rate limit is not modelled (the fixtures run without one).
use cloison_abi::{DropReason, PortInfo, METADATA_IP, PORT_F_DHCP, STEER_MAC_PREFIX};

use super::{
    parse::{mac, v4_mapped, Parsed},
    Model, Verdict,
};

pub(super) fn for_agent(p: &Parsed, port: &PortInfo) -> Result<bool, DropReason> {
    if p.later_fragment {
        return Ok(false);
    }
    let v4 = p.l3 == 0x0800;
    let rs = !v4 && p.proto == 58 && p.icmp_type == 133;
    let metadata = v4 && p.proto == 6 && p.dport == 80 && p.dst == v4_mapped(&METADATA_IP);
    let dhcp = p.proto == 17
        && if v4 {
            (p.sport, p.dport) == (68, 67)
        } else {
            (p.sport, p.dport) == (546, 547)
        };
    if dhcp && port.flags & PORT_F_DHCP == 0 {
        return Err(DropReason::DhcpOff);
    }
    Ok(rs || metadata || dhcp)
}

impl Model<'_> {
    /// What the service tap's program does with an answer the agent wrote:
    /// delivered to the port its source MAC names, if it exists and the
    /// answer is for its VM's MAC (or a group address).
    pub fn service_answer(&self, f: &[u8]) -> Verdict {
        if f.len() < 14 {
            return Verdict::Drop(DropReason::TruncatedEthernet);
        }
        let (dst, src) = (mac(f, 0), mac(f, 6));
        if src[..2] != STEER_MAC_PREFIX {
            return Verdict::Drop(DropReason::ServiceBadAnswer);
        }
        let ifindex = u32::from_be_bytes([src[2], src[3], src[4], src[5]]);
        let Some(port) = self.tables.ports.get(&ifindex) else {
            return Verdict::Drop(DropReason::UnknownPort);
        };
        let group = dst[0] & 1 == 1;
        if !group && dst != port.mac {
            return Verdict::Drop(DropReason::ServiceBadAnswer);
        }
        Verdict::ToPort(ifindex)
    }
}
