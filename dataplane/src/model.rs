//! A pure-Rust reference of the BPF pipeline's decisions, over the same
//! [`Tables`]: the test oracle. It says what happens to a frame (delivered,
//! passed to the host, or dropped with which reason); the fixtures check the
//! bytes the programs write, and the property test checks that the programs
//! and this model decide alike on random frames.
use cloison_abi::*;

use crate::tables::Tables;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Redirected: to a local port, back to the VM (answers, ICMP errors) or
    /// to the uplink inside VXLAN.
    Redirect,
    /// Not for the overlay: handed to the host stack (uplink only).
    Pass,
    Drop(DropReason),
}

pub struct Model<'a> {
    pub tables: &'a Tables,
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn v4_mapped(a: &[u8]) -> [u8; 16] {
    let v4: [u8; 4] = a[..4].try_into().expect("4 bytes");
    crate::tables::ip16(std::net::Ipv4Addr::from(v4).into())
}

fn mac(b: &[u8], off: usize) -> [u8; 6] {
    b[off..off + 6].try_into().expect("6 bytes")
}

struct Parsed {
    l3: u16,
    l4_off: usize,
    proto: u8,
    src: [u8; 16],
    sport: u16,
    dport: u16,
    icmp_type: u8,
    ip_len: usize,
}

use DropReason::*;

impl Model<'_> {
    fn forward(&self, vni: u32, mac: [u8; 6]) -> Option<ForwardEntry> {
        self.tables
            .forward
            .get(&ForwardKey {
                vni,
                mac,
                _pad: [0; 2],
            })
            .copied()
    }

    fn allowed_mac(&self, ifindex: u32, addr: [u8; 16]) -> Option<[u8; 6]> {
        // Longest prefix match over (ifindex, address): the trie's key, 160 bits.
        let addr = u128::from_be_bytes(addr);
        self.tables
            .addr_allow
            .iter()
            .filter(|((bits, k), _)| {
                let (ifindex_bits, addr_bits) = ((*bits).min(32), bits.saturating_sub(32));
                let ifindex_mask = u32::MAX.checked_shl(32 - ifindex_bits).unwrap_or(0);
                let addr_mask = u128::MAX.checked_shl(128 - addr_bits).unwrap_or(0);
                (u32::from_be_bytes(k.ifindex_be) ^ ifindex) & ifindex_mask == 0
                    && (u128::from_be_bytes(k.addr) ^ addr) & addr_mask == 0
            })
            .max_by_key(|((bits, _), _)| *bits)
            .map(|(_, v)| v.mac)
    }

    fn neighbour(&self, vni: u32, addr: [u8; 16]) -> Option<[u8; 6]> {
        self.tables
            .neighbours
            .get(&NeighbourKey { vni, addr })
            .map(|n| n.mac)
    }

    fn parse(f: &[u8]) -> Result<Parsed, DropReason> {
        if f.len() < 14 {
            return Err(TruncatedEthernet);
        }
        let mut p = Parsed {
            l3: be16(f, 12),
            l4_off: 0,
            proto: 0,
            src: [0; 16],
            sport: 0,
            dport: 0,
            icmp_type: 0,
            ip_len: 0,
        };
        match p.l3 {
            0x0806 => {
                if f.len() < 14 + 28 {
                    return Err(TruncatedArp);
                }
                if be16(f, 14) != 1 || be16(f, 16) != 0x0800 || f[18] != 6 || f[19] != 4 {
                    return Err(MalformedArp);
                }
                Ok(p)
            }
            0x0800 => {
                if f.len() < 34 {
                    return Err(TruncatedIpv4);
                }
                let ihl = (f[14] & 0x0f) as usize * 4;
                let tot = be16(f, 16) as usize;
                if f[14] >> 4 != 4 || ihl < 20 || tot < ihl || 14 + tot > f.len() {
                    return Err(MalformedIpv4);
                }
                p.l4_off = 14 + ihl;
                p.proto = f[23];
                p.src = v4_mapped(&f[26..30]);
                p.ip_len = tot;
                if be16(f, 20) & 0x1fff == 0 {
                    Self::l4(f, &mut p)?;
                }
                Ok(p)
            }
            0x86dd => {
                if f.len() < 54 {
                    return Err(TruncatedIpv6);
                }
                let plen = be16(f, 18) as usize;
                if f[14] >> 4 != 6 || 54 + plen > f.len() {
                    return Err(MalformedIpv6);
                }
                p.l4_off = 54;
                p.proto = f[20];
                p.src.copy_from_slice(&f[22..38]);
                p.ip_len = 40 + plen;
                Self::l4(f, &mut p)?;
                Ok(p)
            }
            _ => Err(UnsupportedEthertype),
        }
    }

    fn l4(f: &[u8], p: &mut Parsed) -> Result<(), DropReason> {
        let o = p.l4_off;
        let need = match p.proto {
            6 => 20,
            17 | 1 | 58 => 8,
            _ => return Ok(()),
        };
        if f.len() < o + need {
            return Err(TruncatedL4);
        }
        match p.proto {
            6 => {
                if f[o + 12] >> 4 < 5 {
                    return Err(TruncatedL4);
                }
                (p.sport, p.dport) = (be16(f, o), be16(f, o + 2));
            }
            17 => (p.sport, p.dport) = (be16(f, o), be16(f, o + 2)),
            _ => p.icmp_type = f[o],
        }
        Ok(())
    }

    /// What the port program does with a frame the VM on `ifindex` sent
    /// (`gso_size` 0: not a GSO frame).
    pub fn port(&self, ifindex: u32, f: &[u8]) -> Verdict {
        match self.port_inner(ifindex, f) {
            Ok(v) => v,
            Err(r) => Verdict::Drop(r),
        }
    }

    fn port_inner(&self, ifindex: u32, f: &[u8]) -> Result<Verdict, DropReason> {
        let port = *self.tables.ports.get(&ifindex).ok_or(UnknownPort)?;
        let p = Self::parse(f)?;
        let secure = port.flags & PORT_F_SECURITY != 0;
        let src_mac = mac(f, 6);
        if p.l3 == 0x0806 {
            let (sha, spa, tpa) = (mac(f, 22), &f[28..32], &f[38..42]);
            if secure {
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
            }
            match be16(f, 20) {
                1 => {}
                2 => return Err(ArpReplyFromVm),
                _ => return Err(MalformedArp),
            }
            if tpa == spa {
                return Err(ArpSelfTarget);
            }
            let m = self
                .neighbour(port.vni, v4_mapped(tpa))
                .ok_or(ArpUnknownTarget)?;
            if m == src_mac {
                return Err(ArpSelfTarget);
            }
            return Ok(Verdict::Redirect);
        }
        let v4 = p.l3 == 0x0800;
        if secure {
            if p.src == [0; 16] || p.src == v4_mapped(&[0; 4]) {
                let ok = if v4 {
                    p.proto == 17 && p.sport == 68 && p.dport == 67
                } else {
                    p.proto == 58 && (p.icmp_type == 135 || p.icmp_type == 143)
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
        }
        if !v4 && p.proto == 58 {
            match p.icmp_type {
                135 => return self.nd(f, &port),
                133 => return Err(RouterSolicitation),
                _ => {}
            }
        }
        let dst = mac(f, 0);
        if dst[0] & 1 == 1 {
            return Err(if dst == [0xff; 6] {
                Broadcast
            } else {
                Multicast
            });
        }
        let fwd = self.forward(port.vni, dst).ok_or(UnknownUnicast)?;
        if fwd.kind == FWD_LOCAL {
            if fwd.ifindex == ifindex {
                return Err(Hairpin);
            }
            return Ok(Verdict::Redirect);
        }
        if p.ip_len > port.mtu as usize {
            if v4 && be16(f, 20) & 0x4000 == 0 {
                return Err(MtuExceeded);
            }
            return Ok(Verdict::Redirect);
        }
        Ok(Verdict::Redirect)
    }

    fn nd(&self, f: &[u8], port: &PortInfo) -> Result<Verdict, DropReason> {
        if f.len() < 54 + 24 {
            return Err(NdMalformed);
        }
        if (be16(f, 18) as usize) < 24 || f[21] != 255 || f[55] != 0 {
            return Err(NdMalformed);
        }
        if f[22..38] == [0; 16] {
            return Err(NdDadProbe);
        }
        let target: [u8; 16] = f[62..78].try_into().expect("16 bytes");
        self.neighbour(port.vni, target).ok_or(NdUnknownTarget)?;
        Ok(Verdict::Redirect)
    }

    /// What the uplink program (XDP or TC) does with a frame from the underlay.
    pub fn uplink(&self, f: &[u8]) -> Verdict {
        match self.uplink_inner(f) {
            Ok(v) => v,
            Err(r) => Verdict::Drop(r),
        }
    }

    fn uplink_inner(&self, f: &[u8]) -> Result<Verdict, DropReason> {
        if f.len() < 34 || be16(f, 12) != 0x0800 || f[23] != 17 || f[14] >> 4 != 4 {
            return Ok(Verdict::Pass);
        }
        if f[30..34] != self.tables.config.vtep {
            return Ok(Verdict::Pass);
        }
        let frag = be16(f, 20);
        if frag & 0x1fff != 0 {
            return Ok(Verdict::Pass);
        }
        if f[14] != 0x45 {
            let ihl = (f[14] & 0x0f) as usize * 4;
            if ihl < 20 || f.len() < 14 + ihl + 8 {
                return Ok(Verdict::Pass);
            }
            if be16(f, 14 + ihl + 2) == VXLAN_PORT {
                return Err(MalformedIpv4);
            }
            return Ok(Verdict::Pass);
        }
        if f.len() < 42 || be16(f, 36) != VXLAN_PORT {
            return Ok(Verdict::Pass);
        }
        if frag & 0x2000 != 0 {
            return Err(VxlanFragmented);
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
        if f.len() < 64 {
            return Err(VxlanTruncated);
        }
        match self.forward(vni, mac(f, 50)) {
            Some(e) if e.kind == FWD_LOCAL => {}
            _ => return Err(VxlanUnknownDestination),
        }
        match self.forward(vni, mac(f, 56)) {
            Some(e) if e.kind == FWD_REMOTE && e.vtep == src => {}
            _ => return Err(VxlanSpoofedSource),
        }
        Ok(Verdict::Redirect)
    }
}
