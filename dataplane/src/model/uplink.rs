//! Underlay ingress: the host's own traffic to the host; VXLAN only from
//! a VTEP that has the network, for a local port, from a MAC behind it.
use cloison_abi::{
    DropReason::{self, *},
    *,
};

use super::{
    parse::{be16, mac, parse, v4_mapped},
    route, Encryption, Model, Verdict,
};

impl Model<'_> {
    pub(super) fn uplink_inner(&self, f: &[u8]) -> Result<Verdict, DropReason> {
        if f.len() < 34 || be16(f, 12) != 0x0800 || f[23] != 17 || f[14] >> 4 != 4 {
            return Ok(Verdict::Host);
        }
        if f[30..34] != self.tables.config.vtep {
            return Ok(Verdict::Host);
        }
        let frag = be16(f, 20);
        if frag & 0x1fff != 0 {
            return Ok(Verdict::Host);
        }
        if f[14] != 0x45 {
            let ihl = (f[14] & 0x0f) as usize * 4;
            if ihl < 20 || f.len() < 14 + ihl + 8 {
                return Ok(Verdict::Host);
            }
            if be16(f, 14 + ihl + 2) == VXLAN_PORT {
                return Err(MalformedIpv4);
            }
            return Ok(Verdict::Host);
        }
        if f.len() < 42 || be16(f, 36) != VXLAN_PORT {
            return Ok(Verdict::Host);
        }
        if frag & 0x2000 != 0 {
            return Err(VxlanFragmented);
        }
        // Outer lengths that describe the frame, and the header checksum.
        let (tot, ulen) = (be16(f, 16) as usize, be16(f, 38) as usize);
        let mut sum: u32 = (14..34).step_by(2).map(|i| be16(f, i) as u32).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        if tot < 50 {
            return Err(VxlanTruncated);
        }
        if 14 + tot != f.len() || ulen + 20 != tot || sum != 0xffff {
            return Err(VxlanBadOuterHeader);
        }
        if f.len() < 50 {
            return Err(VxlanTruncated);
        }
        if f[42] != 0x08 || f[43..46] != [0; 3] || f[49] != 0 {
            return Err(VxlanBadFlags);
        }
        let vni = u32::from_be_bytes([0, f[46], f[47], f[48]]);
        if !self.tables.networks.contains_key(&vni) {
            return Err(VxlanUnknownVni);
        }
        let src: [u8; 4] = f[26..30].try_into().expect("4 bytes");
        if !self.tables.vteps.contains_key(&VtepKey { vni, addr: src }) {
            return Err(VxlanUnknownVtep);
        }
        // In clear, from the underlay: an ipsec host takes none of it, and
        // an ipsec host sends none of it (so it is forged).
        let theirs = self.encryption_of(src);
        if self.own_encryption() == Encryption::Ipsec || theirs == Encryption::Ipsec {
            return Err(VxlanPlaintext);
        }
        if f.len() < 64 {
            return Err(VxlanTruncated);
        }
        let dst = match self.forward(vni, mac(f, 50)) {
            Some(e) if e.kind == FWD_LOCAL => e,
            _ => return Err(VxlanUnknownDestination),
        };
        let inner_src = || -> Result<[u8; 16], DropReason> {
            Ok(match be16(f, 62) {
                0x0800 => v4_mapped(f.get(76..80).ok_or(VxlanTruncated)?),
                0x86dd => f
                    .get(72..88)
                    .ok_or(VxlanTruncated)?
                    .try_into()
                    .expect("16 bytes"),
                _ => return Err(VxlanSpoofedSourceIp),
            })
        };
        let zone = if route::from_gateway(&f[50..], vni) {
            // Routed on its sender's host.
            self.routed_from(vni, src, inner_src()?, be16(f, 62) == 0x0800)?
        } else {
            let sender = match self.forward(vni, mac(f, 56)) {
                Some(e) if e.kind == FWD_REMOTE && e.vtep == src => e,
                _ => return Err(VxlanSpoofedSource),
            };
            if sender.flags & PORT_F_SECURITY != 0 {
                // A sender with port security: from its own addresses only.
                if self.remote_mac(vni, inner_src()?) != Some(mac(f, 56)) {
                    return Err(VxlanSpoofedSourceIp);
                }
            }
            vni
        };
        if dst.flags & PORT_F_SECURITY != 0 {
            let info = *self.tables.ports.get(&dst.ifindex).ok_or(UnknownPort)?;
            let inner = &f[50..];
            let p = parse(inner)?;
            if p.l3 == 0x0806 {
                return Err(UnsupportedEthertype);
            }
            self.enforce(inner, &p, zone, None, Some((dst.ifindex, info)))?;
        }
        Ok(Verdict::ToPort(dst.ifindex))
    }
}
