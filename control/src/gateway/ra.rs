//! IPv6 router advertisements for a network's ports: answered to router
//! solicitations and sent periodically, from the gateway's link-local
//! address. They carry each subnet as an on-link prefix, autonomous (for
//! SLAAC) where the port's address in it is the one SLAAC makes (its
//! EUI-64 address in a /64: any other would be refused as spoofed), the MTU, the DNS servers (RDNSS, RFC 8106, and the "other
//! configuration" flag so that clients ask stateless DHCPv6 for them), and
//! a router lifetime only when the network has an IPv6 gateway: without
//! one, the gateway is no default router.
use std::net::Ipv6Addr;

use cloison_dataplane::{MacAddr, Network};
use ipnet::{IpNet, Ipv6Net};
use smoltcp::wire::{Icmpv6Packet, IpProtocol};

/// How long the gateway is a default router (s): three times the period.
pub const ROUTER_LIFETIME: u16 = 1800;
/// Prefix lifetimes (s): valid 30 days, preferred 7, as radvd's defaults.
pub const VALID_LIFETIME: u32 = 2_592_000;
pub const PREFERRED_LIFETIME: u32 = 604_800;
/// DNS server lifetime (s).
pub const RDNSS_LIFETIME: u32 = 1800;

/// What a network's advertisements say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    /// The gateway's MAC (its link-local address is made from it).
    pub gateway_mac: [u8; 6],
    pub prefixes: Vec<Ipv6Net>,
    /// The prefixes SLAAC may use (see [`Advert::for_port`]).
    pub autonomous: Vec<Ipv6Net>,
    pub default_router: bool,
    pub mtu: u32,
    pub dns_servers: Vec<Ipv6Addr>,
    /// The network answers DHCPv6 (`dhcp`): the "other configuration"
    /// flag is set when it has DNS servers to give.
    pub dhcp: bool,
}

impl Advert {
    pub fn source(&self) -> Ipv6Addr {
        MacAddr(self.gateway_mac).link_local()
    }

    /// The advertisement for one port: a prefix is autonomous only where
    /// the port's address is its SLAAC (EUI-64) address there.
    pub fn for_port(mut self, ips: &[std::net::IpAddr], mac: MacAddr) -> Advert {
        let iid = &mac.link_local().octets()[8..];
        self.autonomous.retain(|p| {
            ips.iter().any(|ip| match ip {
                std::net::IpAddr::V6(a) => p.contains(a) && &a.octets()[8..] == iid,
                std::net::IpAddr::V4(_) => false,
            })
        });
        self
    }
}

/// The advertisement of `network` (its gateway MAC given): none when it
/// has no IPv6 subnet.
pub fn advert_for(network: &Network, gateway_mac: [u8; 6]) -> Option<Advert> {
    let prefixes: Vec<Ipv6Net> = network
        .subnets
        .iter()
        .filter_map(|s| match s {
            IpNet::V6(n) => Some(*n),
            IpNet::V4(_) => None,
        })
        .collect();
    if prefixes.is_empty() {
        return None;
    }
    let v6 = |a: &std::net::IpAddr| match a {
        std::net::IpAddr::V6(a) => Some(*a),
        std::net::IpAddr::V4(_) => None,
    };
    Some(Advert {
        gateway_mac,
        default_router: network.gateway_ips.iter().any(|g| v6(g).is_some()),
        autonomous: prefixes
            .iter()
            .copied()
            .filter(|p| p.prefix_len() == 64)
            .collect(),
        prefixes,
        mtu: network.mtu,
        dns_servers: network.dns_servers.iter().filter_map(v6).collect(),
        dhcp: network.dhcp,
    })
}

/// Why a solicitation got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unanswered {
    /// Not a well-formed solicitation (RFC 4861 6.1.1: hop limit 255,
    /// code 0, a valid checksum, at least 8 bytes, options well formed,
    /// none with an unspecified source address).
    Malformed,
    NotThePortsMac,
    /// The port's network has no IPv6 subnet.
    NoIpv6,
}

impl Unanswered {
    pub fn name(self) -> &'static str {
        match self {
            Unanswered::Malformed => "malformed",
            Unanswered::NotThePortsMac => "not_the_ports_mac",
            Unanswered::NoIpv6 => "no_ipv6_subnet",
        }
    }
}

/// The answer to the router solicitation `frame` from the VM whose MAC is
/// `vm_mac`, an Ethernet frame whose source MAC is `src_mac`.
pub fn answer(
    adv: &Advert,
    vm_mac: [u8; 6],
    src_mac: [u8; 6],
    frame: &[u8],
) -> Result<Vec<u8>, Unanswered> {
    let ip = super::ipv6_from_vm(frame, vm_mac).map_err(|e| match e {
        super::NotFromVm::Malformed => Unanswered::Malformed,
        super::NotFromVm::NotThePortsMac => Unanswered::NotThePortsMac,
    })?;
    if ip.next_header() != IpProtocol::Icmpv6 || ip.hop_limit() != 255 {
        return Err(Unanswered::Malformed);
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let icmp = Icmpv6Packet::new_checked(ip.payload()).map_err(|_| Unanswered::Malformed)?;
    let body = ip.payload();
    if body[0] != 133 || body[1] != 0 || body.len() < 8 || !icmp.verify_checksum(&src, &dst) {
        return Err(Unanswered::Malformed);
    }
    // Options: each a type, a length in 8-byte units (never 0).
    let mut opts = &body[8..];
    while !opts.is_empty() {
        let len = usize::from(*opts.get(1).ok_or(Unanswered::Malformed)?) * 8;
        if len == 0 || len > opts.len() {
            return Err(Unanswered::Malformed);
        }
        if opts[0] == 1 && src.is_unspecified() {
            return Err(Unanswered::Malformed);
        }
        opts = &opts[len..];
    }
    // To the asker; to all nodes when it has no address yet.
    let (dst_ip, dst_mac) = if src.is_unspecified() {
        (ALL_NODES, ALL_NODES_MAC)
    } else {
        (src, vm_mac)
    };
    Ok(frame_of(adv, src_mac, dst_ip, dst_mac))
}

const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// A periodic advertisement, to all nodes on the port's link.
pub fn unsolicited(adv: &Advert, src_mac: [u8; 6]) -> Vec<u8> {
    frame_of(adv, src_mac, ALL_NODES, ALL_NODES_MAC)
}

/// The advertisement's ICMPv6 message, checksum included.
pub fn message(adv: &Advert, dst: Ipv6Addr) -> Vec<u8> {
    let mut m = vec![134, 0, 0, 0, 64];
    m.push(if adv.dhcp && !adv.dns_servers.is_empty() {
        0x40
    } else {
        0
    });
    let lifetime = if adv.default_router {
        ROUTER_LIFETIME
    } else {
        0
    };
    m.extend(lifetime.to_be_bytes());
    m.extend([0; 8]); // reachable time, retransmission timer: unspecified
    m.extend([1, 1]);
    m.extend(adv.gateway_mac);
    m.extend([5, 1, 0, 0]);
    m.extend(adv.mtu.to_be_bytes());
    for p in &adv.prefixes {
        m.extend([3, 4, p.prefix_len()]);
        // On-link; autonomous where SLAAC makes the port's address.
        m.push(if adv.autonomous.contains(p) {
            0xc0
        } else {
            0x80
        });
        m.extend(VALID_LIFETIME.to_be_bytes());
        m.extend(PREFERRED_LIFETIME.to_be_bytes());
        m.extend([0; 4]);
        m.extend(p.network().octets());
    }
    if !adv.dns_servers.is_empty() {
        m.extend([25, 1 + 2 * adv.dns_servers.len() as u8, 0, 0]);
        m.extend(RDNSS_LIFETIME.to_be_bytes());
        for d in &adv.dns_servers {
            m.extend(d.octets());
        }
    }
    Icmpv6Packet::new_unchecked(&mut m[..]).fill_checksum(&adv.source(), &dst);
    m
}

fn frame_of(adv: &Advert, src_mac: [u8; 6], dst: Ipv6Addr, dst_mac: [u8; 6]) -> Vec<u8> {
    let body = message(adv, dst);
    super::ipv6_frame(
        src_mac,
        dst_mac,
        adv.source(),
        dst,
        IpProtocol::Icmpv6,
        255,
        &body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloison_testkit::wire::{
        build::{icmp, v6},
        Frame, Net, L4,
    };

    const VM: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const GW: [u8; 6] = [2, 0xc1, 0x0a, 0, 3, 0xe9];
    const TAP: [u8; 6] = [0x0e, 0xc1, 0, 0, 0, 9];

    fn network() -> Network {
        serde_json::from_value(serde_json::json!({
            "name": "n", "tenant": "t", "vni": 1001,
            "subnets": ["10.0.0.0/24", "fd00:1::/64"],
            "gateway_ips": ["fd00:1::1"], "dns_servers": ["fd00:1::53", "10.0.0.2"]
        }))
        .unwrap()
    }

    fn rs(src: Ipv6Addr, options: &[u8]) -> Frame {
        let mut f = v6(
            VM,
            [0x33, 0x33, 0, 0, 0, 2],
            src,
            "ff02::2".parse().unwrap(),
            icmp(133, 0, [0; 4], options),
        );
        if let Net::Ipv6(ip) = &mut f.net {
            ip.hop_limit = 255;
        }
        f
    }

    fn ll() -> Ipv6Addr {
        MacAddr(VM).link_local()
    }

    /// The answer parsed: (destination MAC, destination IP, ICMPv6 bytes).
    fn parsed(out: &[u8]) -> ([u8; 6], Ipv6Addr, Vec<u8>) {
        let f = Frame::parse(out).expect("the answer parses, checksums included");
        assert_eq!(f.src, TAP, "from the tap's steering MAC");
        let Net::Ipv6(ip) = &f.net else {
            panic!("IPv6")
        };
        assert_eq!(ip.hop_limit, 255);
        assert_eq!(
            ip.src,
            MacAddr(GW).link_local(),
            "from the gateway's link-local address"
        );
        let L4::Icmp(m) = &ip.payload else {
            panic!("ICMPv6")
        };
        let mut bytes = vec![m.ty, m.code, 0, 0];
        bytes.extend(m.rest);
        bytes.extend(&m.body);
        (f.dst, ip.dst, bytes)
    }

    #[test]
    fn a_solicitation_gets_the_prefix_the_mtu_the_router_and_dns() {
        let adv = advert_for(&network(), GW).unwrap();
        let out = answer(&adv, VM, TAP, &rs(ll(), &[1, 1, 2, 0, 0, 0, 0, 1]).emit()).unwrap();
        let (dst_mac, dst, m) = parsed(&out);
        assert_eq!((dst_mac, dst), (VM, ll()), "unicast to the asker");
        assert_eq!(m[0], 134);
        assert_eq!(m[4], 64, "hop limit");
        assert_eq!(
            m[5], 0x40,
            "other configuration (stateless DHCPv6), not managed"
        );
        assert_eq!(u16::from_be_bytes([m[6], m[7]]), ROUTER_LIFETIME);
        let opts = &m[16..];
        assert_eq!(
            &opts[..8],
            &[1, 1, 2, 0xc1, 0x0a, 0, 3, 0xe9],
            "source link-layer"
        );
        assert_eq!(&opts[8..16], &[5, 1, 0, 0, 0, 0, 0x05, 0xaa], "MTU 1450");
        let prefix = &opts[16..48];
        assert_eq!(
            &prefix[..4],
            &[3, 4, 64, 0xc0],
            "a /64, on-link, autonomous"
        );
        assert_eq!(
            Ipv6Addr::from(<[u8; 16]>::try_from(&prefix[16..32]).unwrap()),
            "fd00:1::".parse::<Ipv6Addr>().unwrap()
        );
        let rdnss = &opts[48..];
        assert_eq!(&rdnss[..2], &[25, 3], "one IPv6 DNS server");
        assert_eq!(
            Ipv6Addr::from(<[u8; 16]>::try_from(&rdnss[8..24]).unwrap()),
            "fd00:1::53".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn slaac_only_where_it_makes_the_ports_address() {
        let adv = advert_for(&network(), GW).unwrap();
        let mac = MacAddr(VM);
        let iid = &mac.link_local().octets()[8..];
        let mut eui = [0u8; 16];
        eui[..8].copy_from_slice(&"fd00:1::".parse::<Ipv6Addr>().unwrap().octets()[..8]);
        eui[8..].copy_from_slice(iid);
        let slaac = adv.clone().for_port(&[Ipv6Addr::from(eui).into()], mac);
        assert_eq!(slaac.autonomous, slaac.prefixes);
        let fixed = adv.for_port(&["fd00:1::5".parse().unwrap()], mac);
        assert!(fixed.autonomous.is_empty());
        let (_, _, m) = parsed(&unsolicited(&fixed, TAP));
        let prefix = &m[16 + 16..16 + 16 + 4];
        assert_eq!(prefix, &[3, 4, 64, 0x80], "on-link, not autonomous");
    }

    #[test]
    fn without_an_ipv6_gateway_it_is_no_default_router() {
        let mut n = network();
        n.gateway_ips.clear();
        n.dns_servers.clear();
        let adv = advert_for(&n, GW).unwrap();
        let (_, _, m) = parsed(&unsolicited(&adv, TAP));
        assert_eq!((m[5], u16::from_be_bytes([m[6], m[7]])), (0, 0));
        let mut off = network();
        off.dhcp = false;
        let (_, _, m) = parsed(&unsolicited(&advert_for(&off, GW).unwrap(), TAP));
        assert_eq!(m[5], 0, "no DHCPv6 to ask: no other-configuration flag");
        n.subnets.retain(|s| matches!(s, IpNet::V4(_)));
        assert_eq!(advert_for(&n, GW), None, "an IPv4-only network");
    }

    #[test]
    fn before_any_address_the_answer_goes_to_all_nodes() {
        let adv = advert_for(&network(), GW).unwrap();
        let out = answer(&adv, VM, TAP, &rs(Ipv6Addr::UNSPECIFIED, &[]).emit()).unwrap();
        let (dst_mac, dst, _) = parsed(&out);
        assert_eq!((dst_mac, dst), (ALL_NODES_MAC, ALL_NODES));
        let (_, dst, _) = parsed(&unsolicited(&adv, TAP));
        assert_eq!(dst, ALL_NODES);
    }

    #[test]
    fn malformed_solicitations_are_not_answered() {
        let adv = advert_for(&network(), GW).unwrap();
        let ask = |f: Vec<u8>| answer(&adv, VM, TAP, &f);
        let mut low = rs(ll(), &[]);
        if let Net::Ipv6(ip) = &mut low.net {
            ip.hop_limit = 64;
        }
        assert_eq!(
            ask(low.emit()),
            Err(Unanswered::Malformed),
            "routed from off-link"
        );
        let zero_len = rs(ll(), &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            ask(zero_len.emit()),
            Err(Unanswered::Malformed),
            "an option of length 0"
        );
        let unspecified_with_lladdr = rs(Ipv6Addr::UNSPECIFIED, &[1, 1, 2, 0, 0, 0, 0, 1]);
        assert_eq!(
            ask(unspecified_with_lladdr.emit()),
            Err(Unanswered::Malformed)
        );
        let mut bad_sum = rs(ll(), &[]).emit();
        let last = bad_sum.len() - 1;
        bad_sum[last] ^= 1;
        assert_eq!(ask(bad_sum), Err(Unanswered::Malformed), "a bad checksum");
        let mut other = rs(ll(), &[]);
        other.src = [2, 0, 0, 0, 0, 9];
        assert_eq!(ask(other.emit()), Err(Unanswered::NotThePortsMac));
    }
}
