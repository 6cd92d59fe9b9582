//! Connection tracking as the programs keep it (zone, canonical ends,
//! states, timeouts, quotas), in plain maps; IPv4 fragments by their first
//! fragment; ICMP errors by the flow they quote.
use cloison_abi::{
    DropReason::{self, *},
    *,
};

use super::{
    now_ns,
    parse::{be16, v4_mapped, Parsed},
    Model, ModelCt, ModelCtKey, ModelFragKey,
};

pub(super) fn ct_key(zone: u32, proto: u8, a: ([u8; 16], u16), b: ([u8; 16], u16)) -> ModelCtKey {
    (zone, proto, a.min(b), a.max(b))
}

impl Model<'_> {
    /// The security groups of the secured ends (`(ifindex, info)`), with
    /// connection tracking; the same order of checks as policy.rs.
    pub(super) fn enforce(
        &self,
        f: &[u8],
        p: &Parsed,
        zone: u32,
        s: Option<(u32, PortInfo)>,
        r: Option<(u32, PortInfo)>,
    ) -> Result<(), DropReason> {
        let v4 = p.l3 == 0x0800;
        if !v4 && p.proto == 58 && (p.icmp_type == 135 || p.icmp_type == 136) {
            return Ok(());
        }
        let owner = s.or(r).expect("one end is secured").1;
        let now = now_ns();
        let fkey = (zone, p.frag_id, p.src, p.dst, p.proto);
        if p.later_fragment {
            return match self.frags.borrow().get(&fkey) {
                Some((t, _)) if !idle_longer_than(*t, now, FRAG_TIMEOUT_NS) => Ok(()),
                _ => Err(FragmentUnknown),
            };
        }
        if p.is_icmp_error() {
            return self.related(f, p, zone, now);
        }
        // Informational ICMP other than echo: no flow; the rules decide
        // every message.
        let echo = match (v4, p.proto) {
            (true, 1) => matches!(p.icmp_type, 0 | 8),
            (false, 58) => matches!(p.icmp_type, 128 | 129),
            _ => true,
        };
        if !echo {
            return self.rules_allow(p, s, r, false);
        }
        let key = ct_key(zone, p.proto, (p.src, p.sport), (p.dst, p.dport));
        let tcp = p.proto == 6;
        let mut ct = self.ct.borrow_mut();
        if let Some(e) = ct.get_mut(&key) {
            if !ct_expired(e.state, e.last_seen_ns, now) {
                let reply = (p.src, p.sport) != e.orig;
                if e.epoch != self.epoch {
                    if self.rules_allow(p, s, r, reply).is_err() {
                        ct.remove(&key);
                        return Err(SgRevoked);
                    }
                    e.epoch = self.epoch;
                }
                (e.state, e.flags) = ct_advance(e.state, e.flags, tcp, p.tcp_flags, reply);
                e.last_seen_ns = now;
                let tenant = e.owner_tenant;
                drop(ct);
                return self.remember_fragment(p, fkey, now, tenant);
            }
            ct.remove(&key);
        }
        if tcp && !tcp_opens(p.tcp_flags) {
            return Err(CtTcpNotSyn);
        }
        self.rules_allow(p, s, r, false)?;
        self.remember_fragment(p, fkey, now, owner.tenant)?;
        let port_use = ct.values().filter(|e| e.owner_slot == owner.slot).count();
        if port_use >= owner.ct_port_quota as usize {
            return Err(CtPortQuota);
        }
        let tenant_use = ct
            .values()
            .filter(|e| e.owner_tenant == owner.tenant)
            .count();
        if tenant_use >= owner.ct_tenant_quota as usize {
            return Err(CtTenantQuota);
        }
        let state = if tcp {
            ct_state::TCP_SYN_SENT
        } else {
            ct_state::ONE_WAY
        };
        ct.insert(
            key,
            ModelCt {
                orig: (p.src, p.sport),
                state,
                flags: 0,
                epoch: self.epoch,
                last_seen_ns: now,
                owner_slot: owner.slot,
                owner_tenant: owner.tenant,
            },
        );
        Ok(())
    }

    /// A first fragment allowed: its datagram's later fragments will pass,
    /// within its tenant's share of the fragment table.
    fn remember_fragment(
        &self,
        p: &Parsed,
        key: ModelFragKey,
        now: u64,
        tenant: u32,
    ) -> Result<(), DropReason> {
        if !p.first_fragment {
            return Ok(());
        }
        let mut frags = self.frags.borrow_mut();
        if !frags.contains_key(&key) {
            let used = frags
                .values()
                .filter(|(t, owner)| {
                    *owner == tenant && !idle_longer_than(*t, now, FRAG_TIMEOUT_NS)
                })
                .count();
            if used >= self.tables.config.frag_tenant_quota as usize {
                return Err(FragmentQuota);
            }
        }
        frags.insert(key, (now, tenant));
        Ok(())
    }

    /// An ICMP error passes if the packet it quotes is a tracked flow.
    fn related(&self, f: &[u8], p: &Parsed, zone: u32, now: u64) -> Result<(), DropReason> {
        let unrelated = Err(IcmpErrorUnrelated);
        if p.l4_off > 128 {
            return unrelated;
        }
        let off = p.l4_off + 8;
        let (proto, src, dst, l4) = if p.l3 == 0x0800 {
            if f.len() < off + 20 {
                return unrelated;
            }
            let ihl = (f[off] & 0x0f) as usize * 4;
            if ihl < 20 {
                return unrelated;
            }
            (
                f[off + 9],
                v4_mapped(&f[off + 12..off + 16]),
                v4_mapped(&f[off + 16..off + 20]),
                off + ihl,
            )
        } else {
            if f.len() < off + 40 {
                return unrelated;
            }
            let a = |o: usize| -> [u8; 16] { f[o..o + 16].try_into().expect("16 bytes") };
            (f[off + 6], a(off + 8), a(off + 24), off + 40)
        };
        let (mut sport, mut dport) = (0, 0);
        match proto {
            6 | 17 => {
                if f.len() < l4 + 4 {
                    return unrelated;
                }
                (sport, dport) = (be16(f, l4), be16(f, l4 + 2));
            }
            1 | 58 => {
                if f.len() < l4 + 8 {
                    return unrelated;
                }
                match f[l4] {
                    8 | 128 => sport = be16(f, l4 + 4),
                    0 | 129 => dport = be16(f, l4 + 4),
                    _ => {}
                }
            }
            _ => {}
        }
        // Only to the quoted packet's sender, and for a flow the rules
        // still allow as they now read.
        if p.dst != src {
            return unrelated;
        }
        let key = ct_key(zone, proto, (src, sport), (dst, dport));
        match self.ct.borrow().get(&key) {
            Some(e) if !ct_expired(e.state, e.last_seen_ns, now) && e.epoch == self.epoch => Ok(()),
            _ => unrelated,
        }
    }
}
