//! Anti-spoofing: a port with port security sends only from its MAC and
//! addresses (or allowed pairs), never as a DHCP server or an IPv6 router.
use cloison_abi::{
    DropReason::{self, *},
    PortInfo,
};

use super::{
    parse::{mac, v4_mapped, Parsed},
    Model,
};

impl Model<'_> {
    /// ARP sender fields of a frame from port `ifindex`.
    pub(super) fn check_arp(
        &self,
        f: &[u8],
        ifindex: u32,
        port: &PortInfo,
    ) -> Result<(), DropReason> {
        let (src_mac, sha, spa) = (mac(f, 6), mac(f, 22), &f[28..32]);
        if sha != src_mac {
            return Err(SpoofedArp);
        }
        if spa == [0; 4] {
            if src_mac != port.mac {
                return Err(SpoofedArp);
            }
        } else if self.allowed_mac(ifindex, v4_mapped(spa)) != Some(sha) {
            return Err(SpoofedArp);
        }
        Ok(())
    }

    /// Source MAC and IP of an IP frame from port `ifindex`.
    pub(super) fn check_ip(
        &self,
        f: &[u8],
        p: &Parsed,
        ifindex: u32,
        port: &PortInfo,
    ) -> Result<(), DropReason> {
        let src_mac = mac(f, 6);
        let v4 = p.l3 == 0x0800;
        if p.src == [0; 16] || p.src == v4_mapped(&[0; 4]) {
            let ok = if v4 {
                p.proto == 17 && p.sport == 68 && p.dport == 67
            } else {
                p.proto == 58 && matches!(p.icmp_type, 133 | 135 | 143)
            };
            if !ok {
                return Err(SpoofedIp);
            }
            if src_mac != port.mac {
                return Err(SpoofedMac);
            }
        } else {
            match self.allowed_mac(ifindex, p.src) {
                Some(m) if m == src_mac => {}
                Some(_) => return Err(SpoofedMac),
                None => return Err(SpoofedIp),
            }
        }
        if p.proto == 17 && ((v4 && p.sport == 67) || (!v4 && p.sport == 547)) {
            return Err(DhcpServerFromVm);
        }
        if !v4 && p.proto == 58 && p.icmp_type == 134 {
            return Err(RouterAdvertFromVm);
        }
        if !v4 && p.proto == 58 && p.icmp_type == 136 {
            // The target of an advertisement must be one of the sender's.
            let target: [u8; 16] = f
                .get(p.l4_off + 8..p.l4_off + 24)
                .ok_or(NdMalformed)?
                .try_into()
                .expect("16 bytes");
            if self.allowed_mac(ifindex, target) != Some(src_mac) {
                return Err(NdSpoofedTarget);
            }
        }
        Ok(())
    }
}
