//! Stateless DHCPv6 (RFC 8415 section 6.1): an INFORMATION-REQUEST gets a
//! REPLY with the network's IPv6 DNS servers. Addresses come from SLAAC
//! (the advertisements' prefixes), so nothing is leased: a SOLICIT,
//! REQUEST and the rest of the stateful exchange are counted, not answered.
use std::net::Ipv6Addr;

use cloison_dataplane::{MacAddr, Network};
use smoltcp::wire::{IpAddress, IpProtocol, UdpPacket};

const INFORMATION_REQUEST: u8 = 11;
const REPLY: u8 = 7;
const OPT_CLIENT_ID: u16 = 1;
const OPT_SERVER_ID: u16 = 2;
const OPT_DNS_SERVERS: u16 = 23;
const OPT_INFORMATION_REFRESH_TIME: u16 = 32;
/// How often clients ask again (s): a day, as the DHCPv4 lease.
pub const REFRESH_SECS: u32 = 86_400;

/// What a network's answers carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub gateway_mac: [u8; 6],
    pub dns_servers: Vec<Ipv6Addr>,
}

impl Info {
    pub fn of(network: &Network, gateway_mac: [u8; 6]) -> Info {
        Info {
            gateway_mac,
            dns_servers: network
                .dns_servers
                .iter()
                .filter_map(|a| match a {
                    std::net::IpAddr::V6(a) => Some(*a),
                    std::net::IpAddr::V4(_) => None,
                })
                .collect(),
        }
    }

    /// The server's DUID: DUID-LL (type 3) of the gateway's MAC.
    fn duid(&self) -> Vec<u8> {
        let mut d = vec![0, 3, 0, 1];
        d.extend(self.gateway_mac);
        d
    }
}

/// Why a request got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unanswered {
    /// Not well-formed UDP 546 → 547 in IPv6 with a valid checksum, or
    /// options that overrun the message.
    Malformed,
    NotThePortsMac,
    /// Addresses are not leased (SOLICIT, REQUEST, RENEW...).
    Stateful,
    /// An INFORMATION-REQUEST for another server.
    OtherServer,
}

impl Unanswered {
    pub fn name(self) -> &'static str {
        match self {
            Unanswered::Malformed => "malformed",
            Unanswered::NotThePortsMac => "not_the_ports_mac",
            Unanswered::Stateful => "stateful_request",
            Unanswered::OtherServer => "other_server",
        }
    }
}

/// The options of a message: (code, data), or `Malformed`.
fn options(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, Unanswered> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 4 {
            return Err(Unanswered::Malformed);
        }
        let code = u16::from_be_bytes([b[0], b[1]]);
        let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
        let data = b.get(4..4 + len).ok_or(Unanswered::Malformed)?;
        out.push((code, data));
        b = &b[4 + len..];
    }
    Ok(out)
}

/// The answer to `frame` from the VM whose MAC is `vm_mac`, an Ethernet
/// frame whose source MAC is `src_mac`.
pub fn answer(
    info: &Info,
    vm_mac: [u8; 6],
    src_mac: [u8; 6],
    frame: &[u8],
) -> Result<Vec<u8>, Unanswered> {
    let ip = super::ipv6_from_vm(frame, vm_mac).map_err(|e| match e {
        super::NotFromVm::Malformed => Unanswered::Malformed,
        super::NotFromVm::NotThePortsMac => Unanswered::NotThePortsMac,
    })?;
    if ip.next_header() != IpProtocol::Udp {
        return Err(Unanswered::Malformed);
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let udp = UdpPacket::new_checked(ip.payload()).map_err(|_| Unanswered::Malformed)?;
    if udp.src_port() != 546
        || udp.dst_port() != 547
        || !udp.verify_checksum(&IpAddress::Ipv6(src), &IpAddress::Ipv6(dst))
    {
        return Err(Unanswered::Malformed);
    }
    let msg = udp.payload();
    if msg.len() < 4 {
        return Err(Unanswered::Malformed);
    }
    let opts = options(&msg[4..])?;
    if msg[0] != INFORMATION_REQUEST {
        return Err(Unanswered::Stateful);
    }
    let duid = info.duid();
    if opts
        .iter()
        .any(|(c, d)| *c == OPT_SERVER_ID && *d != duid.as_slice())
    {
        return Err(Unanswered::OtherServer);
    }
    let mut reply = vec![REPLY, msg[1], msg[2], msg[3]];
    let mut put = |code: u16, data: &[u8]| {
        reply.extend(code.to_be_bytes());
        reply.extend((data.len() as u16).to_be_bytes());
        reply.extend(data);
    };
    if let Some((_, client)) = opts.iter().find(|(c, _)| *c == OPT_CLIENT_ID) {
        put(OPT_CLIENT_ID, client);
    }
    put(OPT_SERVER_ID, &duid);
    if !info.dns_servers.is_empty() {
        let dns: Vec<u8> = info.dns_servers.iter().flat_map(|a| a.octets()).collect();
        put(OPT_DNS_SERVERS, &dns);
    }
    put(OPT_INFORMATION_REFRESH_TIME, &REFRESH_SECS.to_be_bytes());
    let server = MacAddr(info.gateway_mac).link_local();
    let mut udp = vec![0u8; 8 + reply.len()];
    udp[0..2].copy_from_slice(&547u16.to_be_bytes());
    udp[2..4].copy_from_slice(&546u16.to_be_bytes());
    let len = udp.len() as u16;
    udp[4..6].copy_from_slice(&len.to_be_bytes());
    udp[8..].copy_from_slice(&reply);
    UdpPacket::new_unchecked(&mut udp[..])
        .fill_checksum(&IpAddress::Ipv6(server), &IpAddress::Ipv6(src));
    Ok(super::ipv6_frame(
        src_mac,
        vm_mac,
        server,
        src,
        IpProtocol::Udp,
        64,
        &udp,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloison_testkit::wire::{
        build::{udp, v6},
        Frame, Net, Payload, L4,
    };

    const VM: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const GW: [u8; 6] = [2, 0xc1, 0x0a, 0, 3, 0xe9];
    const TAP: [u8; 6] = [0x0e, 0xc1, 0, 0, 0, 9];

    fn info() -> Info {
        Info {
            gateway_mac: GW,
            dns_servers: vec!["fd00:1::53".parse().unwrap()],
        }
    }

    fn request(ty: u8, opts: &[u8]) -> Vec<u8> {
        let mut m = vec![ty, 0xab, 0xcd, 0xef];
        m.extend(opts);
        v6(
            VM,
            [0x33, 0x33, 0, 1, 0, 2],
            MacAddr(VM).link_local(),
            "ff02::1:2".parse().unwrap(),
            udp(546, 547, &m),
        )
        .emit()
    }

    const CLIENT_ID: [u8; 14] = [0, 1, 0, 10, 0, 3, 0, 1, 2, 0, 0, 0, 0, 1];

    #[test]
    fn an_information_request_gets_the_dns_servers() {
        let out = answer(&info(), VM, TAP, &request(11, &CLIENT_ID)).unwrap();
        let f = Frame::parse(&out).expect("parses, checksums included");
        assert_eq!((f.src, f.dst), (TAP, VM));
        let Net::Ipv6(ip) = &f.net else {
            panic!("IPv6")
        };
        assert_eq!(ip.src, MacAddr(GW).link_local());
        assert_eq!(ip.dst, MacAddr(VM).link_local());
        let Some(L4::Udp(u)) = Some(&ip.payload) else {
            panic!("UDP")
        };
        assert_eq!((u.sport, u.dport), (547, 546));
        let Payload::Bytes(m) = &u.payload else {
            panic!("bytes")
        };
        assert_eq!(
            &m[..4],
            &[7, 0xab, 0xcd, 0xef],
            "a REPLY to the transaction"
        );
        let opts = options(&m[4..]).unwrap();
        assert_eq!(opts[0], (1, &CLIENT_ID[4..]), "the client's id echoed");
        assert_eq!(opts[1], (2, &[0, 3, 0, 1, 2, 0xc1, 0x0a, 0, 3, 0xe9][..]));
        let dns: Ipv6Addr = "fd00:1::53".parse().unwrap();
        assert_eq!(opts[2], (23, &dns.octets()[..]));
        assert_eq!(opts[3], (32, &REFRESH_SECS.to_be_bytes()[..]));
    }

    #[test]
    fn what_is_not_answered() {
        let ask = |f: Vec<u8>| answer(&info(), VM, TAP, &f);
        assert_eq!(
            ask(request(1, &CLIENT_ID)),
            Err(Unanswered::Stateful),
            "SOLICIT"
        );
        assert_eq!(
            ask(request(11, &[0, 2, 0, 3, 0, 3, 0])),
            Err(Unanswered::OtherServer)
        );
        assert_eq!(
            ask(request(11, &[0, 1, 0, 9, 0])),
            Err(Unanswered::Malformed),
            "overrun"
        );
        let mut bad = request(11, &CLIENT_ID);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(ask(bad), Err(Unanswered::Malformed), "checksum");
        let mut other = request(11, &[]);
        other[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
        assert_eq!(ask(other), Err(Unanswered::NotThePortsMac));
    }
}
