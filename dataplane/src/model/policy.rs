//! Security groups as docs/api.md reads them: rule by rule, remote groups
//! by their members' addresses (not the compiled tables: the model checks
//! the compiler and the programs together).
use std::net::IpAddr;

use cloison_abi::{
    DropReason::{self, *},
    PortInfo,
};

use super::{parse::Parsed, to_ip, Model};
use crate::snapshot::{Direction, Ethertype, Remote};

impl Model<'_> {
    /// `reply`: the packet goes from the flow's responder to its originator.
    pub(super) fn rules_allow(
        &self,
        p: &Parsed,
        s: Option<(u32, PortInfo)>,
        r: Option<(u32, PortInfo)>,
        reply: bool,
    ) -> Result<(), DropReason> {
        let service = if reply { p.sport } else { p.dport };
        let v4 = p.l3 == 0x0800;
        if let Some((i, _)) = s {
            let dir = if reply {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            if !self.port_allows(i, dir, to_ip(p.dst, v4), p.proto, service) {
                return Err(if reply {
                    SgIngressDenied
                } else {
                    SgEgressDenied
                });
            }
        }
        if let Some((i, _)) = r {
            let dir = if reply {
                Direction::Egress
            } else {
                Direction::Ingress
            };
            if !self.port_allows(i, dir, to_ip(p.src, v4), p.proto, service) {
                return Err(if reply {
                    SgEgressDenied
                } else {
                    SgIngressDenied
                });
            }
        }
        Ok(())
    }

    /// API.md's rule semantics, one rule at a time.
    fn port_allows(
        &self,
        ifindex: u32,
        dir: Direction,
        remote: IpAddr,
        proto: u8,
        port: u16,
    ) -> bool {
        let rules = self.rules.get(&ifindex).map_or(&[][..], |r| r.as_slice());
        let first = rules.iter().find(|(_, _, rule)| {
            rule.direction == dir
                && (rule.ethertype == Ethertype::IPv4) == remote.is_ipv4()
                && rule
                    .protocol
                    .number(rule.ethertype)
                    .is_none_or(|n| n == proto)
                && rule
                    .ports
                    .is_none_or(|r| (r.first..=r.last).contains(&port))
                && match &rule.remote {
                    None => true,
                    Some(Remote::Cidr(c)) => c.contains(&remote),
                    Some(Remote::Group(g)) => self
                        .members
                        .get(g)
                        .is_some_and(|m| m.iter().any(|n| n.contains(&remote))),
                }
        });
        self.checks.borrow_mut().push(super::RuleCheck {
            ifindex,
            direction: dir,
            rule: first.map(|(g, i, _)| (g.clone(), *i)),
        });
        first.is_some()
    }
}
