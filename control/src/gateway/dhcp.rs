//! DHCPv4 as OVN's native DHCP answers it: a port gets its own IPv4 address
//! and its network's settings, decided by the port the frame came from and
//! its MAC (never by a client identifier); nothing is leased from a pool,
//! so an answer depends on the port alone and survives an agent restart.
//!
//! DISCOVER → OFFER; REQUEST for the port's address → ACK, for any other →
//! NAK; INFORM → ACK without an address or lease; RELEASE and DECLINE are
//! counted, not answered. Options: mask (1), router (3), DNS (6),
//! hostname (12), MTU (26), lease, T1, T2 (51, 58, 59), server identifier
//! (54) and classless static routes (121: the metadata address, the
//! network's host routes and the default route, which a client that takes
//! 121 only learns there, RFC 3442).
use std::net::{IpAddr, Ipv4Addr};

use cloison_dataplane::{Network, Port};
use ipnet::{IpNet, Ipv4Net};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress, EthernetFrame,
    EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket,
    UdpRepr, DHCP_CLIENT_PORT, DHCP_SERVER_PORT,
};

/// The instance metadata address, routed by option 121.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Lease time offered (seconds). Renewals reach the agent of the port's
/// host whatever happened meanwhile, so it can be long; a day, as Neutron.
pub const LEASE_SECS: u32 = 86_400;

const BOOTP_MIN: usize = 300;

/// Everything a port's answers are made of: its port and its network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The port's MAC: a frame from another source or for another client
    /// hardware address is not answered.
    pub mac: [u8; 6],
    /// The port's IPv4 address, in `subnet`.
    pub ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    /// The network's gateway in that subnet, if it has one.
    pub gateway: Option<Ipv4Addr>,
    /// Where the answers come from: their source MAC.
    pub server_mac: [u8; 6],
    pub dns_servers: Vec<Ipv4Addr>,
    /// `host_routes` of the network: (destination, next hop).
    pub routes: Vec<(Ipv4Net, Ipv4Addr)>,
    pub hostname: String,
    pub mtu: u16,
    pub lease_secs: u32,
}

impl Lease {
    /// The server identifier: the gateway, or the metadata address on a
    /// network without one (clients unicast their renewals there; the
    /// steering takes them to the agent either way).
    pub fn server_ip(&self) -> Ipv4Addr {
        self.gateway.unwrap_or(METADATA)
    }
}

/// The lease of `port` in `network` (its network: the caller's to
/// match), answered from `server_mac`: none when the network's DHCP is
/// off or the port has no IPv4 address in one of its subnets.
pub fn lease_for(port: &Port, network: &Network, server_mac: [u8; 6]) -> Option<Lease> {
    if !network.dhcp {
        return None;
    }
    let (ip, subnet) = port.ips.iter().find_map(|ip| {
        let IpAddr::V4(ip) = ip else { return None };
        network.subnets.iter().find_map(|sn| match sn {
            IpNet::V4(sn) if sn.contains(ip) => Some((*ip, *sn)),
            _ => None,
        })
    })?;
    let v4 = |a: &IpAddr| match a {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    };
    Some(Lease {
        mac: port.mac.0,
        ip,
        subnet,
        gateway: network
            .gateway_ips
            .iter()
            .filter_map(v4)
            .find(|g| subnet.contains(g)),
        server_mac,
        dns_servers: network.dns_servers.iter().filter_map(v4).collect(),
        routes: network
            .host_routes
            .iter()
            .filter_map(|r| match (r.destination, v4(&r.nexthop)) {
                (IpNet::V4(d), Some(h)) => Some((d, h)),
                _ => None,
            })
            .collect(),
        hostname: port.hostname.clone().unwrap_or_else(|| port.name.clone()),
        // The validator bounds a network's MTU well below 65,536.
        mtu: u16::try_from(network.mtu).unwrap_or(u16::MAX),
        lease_secs: LEASE_SECS,
    })
}

/// Why a frame got no answer (each counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unanswered {
    /// Not a well-formed IPv4/UDP DHCP request to port 67 (bad length,
    /// checksum, magic, hardware type, a missing message type).
    Malformed,
    /// Its source MAC or its client hardware address is not the port's.
    NotThePortsMac,
    /// A REQUEST for another server (the client took another offer).
    OtherServer,
    Release,
    Decline,
    /// A server's message (OFFER, ACK, NAK...) sent by a VM.
    ServerMessage,
}

impl Unanswered {
    /// Its name in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Unanswered::Malformed => "malformed",
            Unanswered::NotThePortsMac => "not_the_ports_mac",
            Unanswered::OtherServer => "other_server",
            Unanswered::Release => "release",
            Unanswered::Decline => "decline",
            Unanswered::ServerMessage => "server_message",
        }
    }
}

/// The answer to `frame`, sent by the port of `lease`: an Ethernet frame
/// to hand back to that port, or why there is none.
pub fn answer(lease: &Lease, frame: &[u8]) -> Result<Vec<u8>, Unanswered> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| Unanswered::Malformed)?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return Err(Unanswered::Malformed);
    }
    if eth.src_addr().0 != lease.mac {
        return Err(Unanswered::NotThePortsMac);
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).map_err(|_| Unanswered::Malformed)?;
    if !ip.verify_checksum()
        || ip.next_header() != IpProtocol::Udp
        || ip.more_frags()
        || ip.frag_offset() != 0
    {
        return Err(Unanswered::Malformed);
    }
    let udp = UdpPacket::new_checked(ip.payload()).map_err(|_| Unanswered::Malformed)?;
    let (src, dst) = (
        IpAddress::Ipv4(ip.src_addr()),
        IpAddress::Ipv4(ip.dst_addr()),
    );
    if udp.dst_port() != DHCP_SERVER_PORT
        || udp.src_port() != DHCP_CLIENT_PORT
        || (udp.checksum() != 0 && !udp.verify_checksum(&src, &dst))
    {
        return Err(Unanswered::Malformed);
    }
    let dhcp = DhcpPacket::new_checked(udp.payload()).map_err(|_| Unanswered::Malformed)?;
    let req = DhcpRepr::parse(&dhcp).map_err(|_| Unanswered::Malformed)?;
    if req.client_hardware_address.0 != lease.mac {
        return Err(Unanswered::NotThePortsMac);
    }
    let server = lease.server_ip();
    let (kind, your_ip) = match req.message_type {
        DhcpMessageType::Discover => (DhcpMessageType::Offer, lease.ip),
        DhcpMessageType::Request => {
            if req.server_identifier.is_some_and(|s| s != server) {
                return Err(Unanswered::OtherServer);
            }
            let wanted = req
                .requested_ip
                .or((!req.client_ip.is_unspecified()).then_some(req.client_ip));
            if wanted == Some(lease.ip) {
                (DhcpMessageType::Ack, lease.ip)
            } else {
                (DhcpMessageType::Nak, Ipv4Addr::UNSPECIFIED)
            }
        }
        DhcpMessageType::Inform => (DhcpMessageType::Ack, Ipv4Addr::UNSPECIFIED),
        DhcpMessageType::Release => return Err(Unanswered::Release),
        DhcpMessageType::Decline => return Err(Unanswered::Decline),
        _ => return Err(Unanswered::ServerMessage),
    };
    let inform = req.message_type == DhcpMessageType::Inform;
    let nak = kind == DhcpMessageType::Nak;
    let extra = if nak { vec![] } else { options(lease, !inform) };
    let extra: Vec<DhcpOption<'_>> = extra
        .iter()
        .map(|(kind, data)| DhcpOption { kind: *kind, data })
        .collect();
    let reply = DhcpRepr {
        message_type: kind,
        transaction_id: req.transaction_id,
        secs: 0,
        client_hardware_address: req.client_hardware_address,
        client_ip: if inform {
            req.client_ip
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        your_ip,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: req.relay_agent_ip,
        broadcast: req.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(server),
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &extra,
    };
    // RFC 2131 4.1: a NAK and an answer to a client that asked for one
    // are broadcast; an INFORM is answered to its address (broadcast if
    // it gave none); the rest to
    // the address given, at the client's MAC.
    let (dst_ip, dst_mac) = if nak || req.broadcast || (inform && req.client_ip.is_unspecified()) {
        (Ipv4Addr::BROADCAST, EthernetAddress::BROADCAST)
    } else if inform || !req.client_ip.is_unspecified() {
        (req.client_ip, EthernetAddress(lease.mac))
    } else {
        (your_ip, EthernetAddress(lease.mac))
    };
    Ok(frame_of(lease, &reply, server, dst_ip, dst_mac))
}

/// The options smoltcp's representation does not carry: (kind, bytes).
fn options(lease: &Lease, with_lease: bool) -> Vec<(u8, Vec<u8>)> {
    let mut o = vec![(1, lease.subnet.netmask().octets().to_vec())];
    if let Some(gw) = lease.gateway {
        o.push((3, gw.octets().to_vec()));
    }
    if !lease.dns_servers.is_empty() {
        o.push((
            6,
            lease.dns_servers.iter().flat_map(|a| a.octets()).collect(),
        ));
    }
    if !lease.hostname.is_empty() {
        o.push((12, lease.hostname.as_bytes().to_vec()));
    }
    o.push((26, lease.mtu.to_be_bytes().to_vec()));
    if with_lease {
        o.push((51, lease.lease_secs.to_be_bytes().to_vec()));
        o.push((58, (lease.lease_secs / 2).to_be_bytes().to_vec()));
        o.push((59, (lease.lease_secs / 8 * 7).to_be_bytes().to_vec()));
    }
    let on_link = Ipv4Addr::UNSPECIFIED;
    let mut routes = vec![(
        Ipv4Net::new(METADATA, 32).expect("a /32"),
        lease.gateway.unwrap_or(on_link),
    )];
    routes.extend(lease.routes.iter().copied());
    if let Some(gw) = lease.gateway {
        routes.push((Ipv4Net::default(), gw));
    }
    o.push((121, classless_routes(&routes)));
    o
}

/// RFC 3442: each route as its prefix length, the significant octets of
/// its destination, and its router (0.0.0.0: on the link).
pub fn classless_routes(routes: &[(Ipv4Net, Ipv4Addr)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (dst, via) in routes {
        let len = dst.prefix_len();
        out.push(len);
        out.extend_from_slice(&dst.network().octets()[..usize::from(len.div_ceil(8))]);
        out.extend_from_slice(&via.octets());
    }
    out
}

fn frame_of(
    lease: &Lease,
    reply: &DhcpRepr<'_>,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    dst_mac: EthernetAddress,
) -> Vec<u8> {
    // At least a BOOTP message's 300 bytes (RFC 1542): some clients
    // drop shorter ones. The padding follows the end option.
    let dhcp_len = reply.buffer_len().max(BOOTP_MIN);
    let udp = UdpRepr {
        src_port: DHCP_SERVER_PORT,
        dst_port: DHCP_CLIENT_PORT,
    };
    let ip = Ipv4Repr {
        src_addr: src_ip,
        dst_addr: dst_ip,
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + dhcp_len,
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(lease.server_mac),
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
    let caps = ChecksumCapabilities::default();
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut f);
    let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p, &caps);
    let mut u = UdpPacket::new_unchecked(p.payload_mut());
    udp.emit(
        &mut u,
        &IpAddress::Ipv4(src_ip),
        &IpAddress::Ipv4(dst_ip),
        dhcp_len,
        |payload| {
            let mut d = DhcpPacket::new_unchecked(payload);
            reply
                .emit(&mut d)
                .expect("the buffer is the representation's length");
        },
        &caps,
    );
    buf
}

#[cfg(test)]
mod tests {
    //! BOOTP messages are assembled here byte by byte and answers read
    //! back the same way (RFC 2131's layout), their Ethernet, IPv4 and UDP
    //! by testkit's frames: nothing through smoltcp, so that a mistake in
    //! how the module uses it shows.
    use std::collections::BTreeMap;

    use cloison_testkit::wire::{build, Frame, Net, Payload, Udp, L4};

    use super::*;

    const VM: [u8; 6] = [2, 0, 0, 0, 0, 5];
    const GW_MAC: [u8; 6] = [2, 0xc1, 0, 0, 0, 1];
    const XID: u32 = 0x1234_5678;

    fn lease() -> Lease {
        Lease {
            mac: VM,
            ip: "10.0.0.5".parse().unwrap(),
            subnet: "10.0.0.0/24".parse().unwrap(),
            gateway: Some("10.0.0.1".parse().unwrap()),
            server_mac: GW_MAC,
            dns_servers: vec!["10.0.0.2".parse().unwrap(), "9.9.9.9".parse().unwrap()],
            routes: vec![(
                "192.168.0.0/16".parse().unwrap(),
                "10.0.0.254".parse().unwrap(),
            )],
            hostname: "vm1".into(),
            mtu: 1450,
            lease_secs: LEASE_SECS,
        }
    }

    struct Client {
        src_mac: [u8; 6],
        chaddr: [u8; 6],
        ciaddr: [u8; 4],
        broadcast: bool,
        options: Vec<(u8, Vec<u8>)>,
    }

    fn client(kind: u8) -> Client {
        Client {
            src_mac: VM,
            chaddr: VM,
            ciaddr: [0; 4],
            broadcast: false,
            options: vec![(53, vec![kind])],
        }
    }

    impl Client {
        fn with(mut self, kind: u8, data: &[u8]) -> Client {
            self.options.push((kind, data.to_vec()));
            self
        }

        /// The BOOTP message, byte by byte.
        fn bootp(&self) -> Vec<u8> {
            let mut bootp = vec![1, 1, 6, 0];
            bootp.extend(XID.to_be_bytes());
            bootp.extend([0, 0]); // secs
            bootp.extend(if self.broadcast { [0x80, 0] } else { [0, 0] });
            bootp.extend(self.ciaddr);
            bootp.extend([0; 12]); // yiaddr, siaddr, giaddr
            bootp.extend(self.chaddr);
            bootp.extend([0; 10 + 64 + 128]);
            bootp.extend([99, 130, 83, 99]);
            for (k, d) in &self.options {
                bootp.push(*k);
                bootp.push(d.len() as u8);
                bootp.extend(d);
            }
            bootp.push(255);
            bootp
        }

        /// `bootp` from this client's MAC and address, broadcast, to `dport`.
        fn carrying(&self, bootp: &[u8], dport: u16) -> Vec<u8> {
            build::v4(
                self.src_mac,
                [0xff; 6],
                self.ciaddr,
                [255; 4],
                build::udp(68, dport, bootp),
            )
            .emit()
        }

        fn frame(&self) -> Vec<u8> {
            self.carrying(&self.bootp(), 67)
        }
    }

    /// An answer, read field by field.
    #[derive(Debug)]
    struct Answer {
        dst_mac: [u8; 6],
        src_mac: [u8; 6],
        src_ip: Ipv4Addr,
        dst_ip: Ipv4Addr,
        ciaddr: Ipv4Addr,
        yiaddr: Ipv4Addr,
        broadcast: bool,
        bootp_len: usize,
        options: BTreeMap<u8, Vec<u8>>,
    }

    /// Ethernet, IPv4 and UDP by testkit's parser (lengths and checksums
    /// checked), the BOOTP message by hand.
    fn read(f: &[u8]) -> Answer {
        let frame = Frame::parse(f).expect("a well-formed frame");
        let Net::Ipv4(ip) = &frame.net else {
            panic!("not IPv4: {frame:?}")
        };
        let L4::Udp(Udp {
            sport: 67,
            dport: 68,
            payload: Payload::Bytes(b),
        }) = &ip.payload
        else {
            panic!("not UDP from port 67 to 68: {:?}", ip.payload)
        };
        assert_eq!(&b[..3], &[2, 1, 6], "a BOOTREPLY on Ethernet");
        assert_eq!(u32::from_be_bytes(b[4..8].try_into().unwrap()), XID);
        assert_eq!(&b[28..34], &VM, "chaddr");
        assert_eq!(&b[236..240], &[99, 130, 83, 99], "magic cookie");
        let mut options = BTreeMap::new();
        let mut o = &b[240..];
        loop {
            match o[0] {
                255 => break,
                0 => o = &o[1..],
                k => {
                    let n = usize::from(o[1]);
                    assert!(
                        options.insert(k, o[2..2 + n].to_vec()).is_none(),
                        "option {k} twice"
                    );
                    o = &o[2 + n..];
                }
            }
        }
        let a4 = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        Answer {
            dst_mac: frame.dst,
            src_mac: frame.src,
            src_ip: ip.src,
            dst_ip: ip.dst,
            ciaddr: a4(&b[12..16]),
            yiaddr: a4(&b[16..20]),
            broadcast: b[10] & 0x80 != 0,
            bootp_len: b.len(),
            options,
        }
    }

    fn ask(l: &Lease, c: &Client) -> Answer {
        read(&answer(l, &c.frame()).expect("an answer"))
    }

    #[test]
    fn a_lease_is_made_of_the_port_and_its_network() {
        let net: Network = serde_json::from_str(
            r#"{"name": "n", "tenant": "t", "vni": 7, "subnets": ["fd00:1::/64", "10.0.0.0/24"], "mtu": 1400,
            "gateway_ips": ["fd00:1::1", "10.0.0.1"], "dns_servers": ["fd00:1::53", "10.0.0.2"],
            "host_routes": [{"destination": "fd00:9::/64", "nexthop": "fd00:1::9"},
                            {"destination": "192.168.0.0/16", "nexthop": "10.0.0.254"}]}"#,
        )
        .unwrap();
        let mut port: Port = serde_json::from_str(
            r#"{"name": "p", "network": "n", "host": "h", "interface": "t", "mac": "02:00:00:00:00:05",
            "ips": ["fd00:1::5", "10.0.0.5"]}"#,
        )
        .unwrap();
        let l = lease_for(&port, &net, GW_MAC).expect("a lease");
        assert_eq!(
            l,
            Lease {
                mtu: 1400,
                dns_servers: vec!["10.0.0.2".parse().unwrap()],
                routes: vec![(
                    "192.168.0.0/16".parse().unwrap(),
                    "10.0.0.254".parse().unwrap()
                )],
                hostname: "p".into(),
                ..lease()
            }
        );
        port.hostname = Some("vm1".into());
        assert_eq!(lease_for(&port, &net, GW_MAC).unwrap().hostname, "vm1");
        let mut off = net.clone();
        off.dhcp = false;
        assert_eq!(lease_for(&port, &off, GW_MAC), None, "DHCP off");
        port.ips.retain(|a| a.is_ipv6());
        assert_eq!(lease_for(&port, &net, GW_MAC), None, "no IPv4 address");
    }

    #[test]
    fn discover_gets_an_offer_of_the_ports_address_with_every_option() {
        let a = ask(&lease(), &client(1));
        assert_eq!(a.options[&53], [2], "OFFER");
        assert_eq!(a.yiaddr, Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(
            a.options[&54],
            [10, 0, 0, 1],
            "server identifier: the gateway"
        );
        assert_eq!(a.options[&1], [255, 255, 255, 0]);
        assert_eq!(a.options[&3], [10, 0, 0, 1]);
        assert_eq!(a.options[&6], [10, 0, 0, 2, 9, 9, 9, 9]);
        assert_eq!(a.options[&12], b"vm1");
        assert_eq!(a.options[&26], 1450u16.to_be_bytes());
        assert_eq!(a.options[&51], 86_400u32.to_be_bytes());
        assert_eq!(a.options[&58], 43_200u32.to_be_bytes());
        assert_eq!(a.options[&59], 75_600u32.to_be_bytes());
        assert_eq!(
            a.options[&121],
            [
                32, 169, 254, 169, 254, 10, 0, 0, 1, // metadata via the gateway
                16, 192, 168, 10, 0, 0, 254, // the host route
                0, 10, 0, 0, 1, // and the default route again
            ]
        );
        // Unicast to the offered address at the client's MAC, from the
        // gateway; a BOOTP message's minimum size.
        assert_eq!((a.dst_mac, a.dst_ip), (VM, Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!((a.src_mac, a.src_ip), (GW_MAC, Ipv4Addr::new(10, 0, 0, 1)));
        assert!(a.bootp_len >= 300, "{}", a.bootp_len);
    }

    #[test]
    fn the_broadcast_flag_is_honoured() {
        let mut c = client(1);
        c.broadcast = true;
        let a = ask(&lease(), &c);
        assert_eq!((a.dst_mac, a.dst_ip), ([0xff; 6], Ipv4Addr::BROADCAST));
        assert!(a.broadcast);
    }

    #[test]
    fn request_for_its_address_is_acked_any_other_naked() {
        let l = lease();
        let a = ask(
            &l,
            &client(3).with(50, &[10, 0, 0, 5]).with(54, &[10, 0, 0, 1]),
        );
        assert_eq!(a.options[&53], [5], "ACK");
        assert_eq!(a.yiaddr, l.ip);
        assert_eq!(a.options[&51], 86_400u32.to_be_bytes());
        let a = ask(&l, &client(3).with(50, &[10, 0, 0, 9]));
        assert_eq!(a.options[&53], [6], "NAK");
        assert_eq!(a.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!((a.dst_mac, a.dst_ip), ([0xff; 6], Ipv4Addr::BROADCAST));
        assert!(!a.options.contains_key(&51) && !a.options.contains_key(&1));
        assert_eq!(a.options[&54], [10, 0, 0, 1]);
        // A request with neither a requested address nor ciaddr.
        assert_eq!(ask(&l, &client(3)).options[&53], [6]);
        // Renewing: ciaddr, no option 50; answered to that address.
        let mut c = client(3);
        c.ciaddr = [10, 0, 0, 5];
        let a = ask(&l, &c);
        assert_eq!(a.options[&53], [5]);
        assert_eq!((a.dst_mac, a.dst_ip), (VM, l.ip));
        // The client took another server's offer.
        assert_eq!(
            answer(
                &l,
                &client(3)
                    .with(50, &[10, 0, 0, 5])
                    .with(54, &[10, 0, 0, 7])
                    .frame()
            ),
            Err(Unanswered::OtherServer)
        );
    }

    #[test]
    fn inform_is_acked_without_address_or_lease() {
        let l = lease();
        let mut c = client(8);
        c.ciaddr = [10, 0, 0, 5];
        let a = ask(&l, &c);
        assert_eq!(a.options[&53], [5]);
        assert_eq!(a.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(a.ciaddr, l.ip);
        assert_eq!(a.dst_ip, l.ip);
        for k in [51, 58, 59] {
            assert!(!a.options.contains_key(&k), "option {k} in an INFORM's ACK");
        }
        assert_eq!(a.options[&6], [10, 0, 0, 2, 9, 9, 9, 9]);
    }

    #[test]
    fn release_decline_and_server_messages_are_counted_not_answered() {
        let l = lease();
        assert_eq!(answer(&l, &client(7).frame()), Err(Unanswered::Release));
        assert_eq!(answer(&l, &client(4).frame()), Err(Unanswered::Decline));
        for kind in [2, 5, 6] {
            // A BOOTREQUEST claiming a server's message type does not
            // even parse (smoltcp checks the type against the opcode).
            assert!(answer(&l, &client(kind).frame()).is_err());
        }
    }

    #[test]
    fn keyed_by_the_ports_mac_never_by_a_client_identifier() {
        let l = lease();
        let mut c = client(1);
        c.src_mac = [2, 0, 0, 0, 0, 6];
        assert_eq!(answer(&l, &c.frame()), Err(Unanswered::NotThePortsMac));
        let mut c = client(1);
        c.chaddr = [2, 0, 0, 0, 0, 6];
        assert_eq!(answer(&l, &c.frame()), Err(Unanswered::NotThePortsMac));
        // Another client identifier changes nothing: same address.
        let a = ask(&l, &client(1).with(61, &[1, 2, 9, 9, 9, 9, 9]));
        assert_eq!(a.yiaddr, l.ip);
    }

    #[test]
    fn a_network_without_gateway() {
        let mut l = lease();
        l.gateway = None;
        l.routes.clear();
        let a = ask(&l, &client(1));
        assert!(!a.options.contains_key(&3), "no router");
        assert_eq!(a.options[&54], METADATA.octets());
        assert_eq!(a.src_ip, METADATA);
        assert_eq!(
            a.options[&121],
            [32, 169, 254, 169, 254, 0, 0, 0, 0],
            "metadata on the link, no default route"
        );
    }

    #[test]
    fn malformed_frames_are_refused_never_a_panic() {
        let l = lease();
        let good = client(1).frame();
        assert!(answer(&l, &good).is_ok());
        for n in 0..good.len() - 1 {
            assert!(answer(&l, &good[..n]).is_err(), "cut at {n}");
        }
        let mut bad = good.clone();
        bad[14 + 10] ^= 1; // IPv4 checksum
        assert_eq!(answer(&l, &bad), Err(Unanswered::Malformed));
        // Well-formed frames (checksums right) carrying a bad message.
        let c = client(1);
        let mut bootp = c.bootp();
        bootp[236] = 0; // magic cookie
        assert_eq!(
            answer(&l, &c.carrying(&bootp, 67)),
            Err(Unanswered::Malformed)
        );
        assert_eq!(
            answer(&l, &c.carrying(&c.bootp(), 68)),
            Err(Unanswered::Malformed),
            "to the client port"
        );
        let mut bootp = c.bootp();
        bootp[2] = 8; // hardware address length
        assert_eq!(
            answer(&l, &c.carrying(&bootp, 67)),
            Err(Unanswered::Malformed)
        );
        // Every byte flipped in turn: an answer or a reason, never a panic.
        for i in 0..good.len() {
            let mut f = good.clone();
            f[i] ^= 0xff;
            let _ = answer(&l, &f);
        }
    }
}
