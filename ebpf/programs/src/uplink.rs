//! Underlay ingress, written once for XDP and TC: the host's own traffic
//! passes untouched; VXLAN is accepted only from a VTEP that has the network,
//! with valid flags, for a local port of that network, from a MAC that lives
//! behind the sending VTEP and (for a sender with port security) from one of
//! that port's addresses; a routed frame (from the gateway MAC) from the
//! address of a port of the router's other networks behind that VTEP. Everything else aimed at our VXLAN port is dropped
//! with its reason. The pipeline decapsulates as its hook allows.
use cloison_abi::*;

use crate::{
    decision::Delivery,
    hdr::*,
    maps::{forward, neighbour, remote_mac, route, router_iface, CL_CONFIG, CL_NETWORKS, CL_VTEPS},
};

/// `Ok(None)`: not for the overlay, hand to the host stack. `decrypted`:
/// the frame came out of the IPsec device (authenticated, decrypted), not
/// in clear from the underlay.
#[inline(always)]
pub fn classify(
    c: &Cursor,
    len: u32,
    gso: bool,
    decrypted: bool,
) -> Result<Option<Delivery>, DropReason> {
    let Some(eth) = c.at::<EthHdr>(0) else {
        return Ok(None);
    };
    if be16(unsafe { (*eth).proto }) != ETH_P_IP {
        return Ok(None);
    }
    let Some(ip) = c.at::<Ipv4Hdr>(ETH_LEN) else {
        return Ok(None);
    };
    let ip = unsafe { &*ip };
    if ip.proto != IPPROTO_UDP || ip.vihl >> 4 != 4 {
        return Ok(None);
    }
    let Some(cfg) = CL_CONFIG.get(0) else {
        return Ok(None);
    };
    if !ip4_eq(&ip.dst, &cfg.vtep) {
        return Ok(None);
    }
    let frag = be16(ip.frag);
    if frag & 0x1fff != 0 {
        return Ok(None);
    }
    if ip.vihl != 0x45 {
        // IP options: the only header length the decapsulation handles is 20,
        // so say so (if it is VXLAN at all) instead of mis-parsing.
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Ok(None);
        }
        let Some(udp) = c.at::<UdpHdr>(ETH_LEN + ihl) else {
            return Ok(None);
        };
        if be16(unsafe { (*udp).dport }) == VXLAN_PORT {
            return Err(DropReason::MalformedIpv4);
        }
        return Ok(None);
    }
    let Some(udp) = c.at::<UdpHdr>(ETH_LEN + 20) else {
        return Ok(None);
    };
    let udp = unsafe { &*udp };
    if be16(udp.dport) != VXLAN_PORT {
        return Ok(None);
    }
    if frag & 0x2000 != 0 {
        return Err(DropReason::VxlanFragmented);
    }
    // The outer headers describe the packet, as the kernel's receive path
    // requires: an IPv4 total length that covers VXLAN and an inner
    // Ethernet header and ends where the packet does, the UDP length the
    // rest of it, the header checksum right. (A GSO packet's lengths are
    // its segments' business: only the minimum holds for it.)
    let tot = be16(ip.tot_len) as u32;
    let ulen = be16(udp.len) as u32;
    let min = (VXLAN_ENCAP_LEN - ETH_LEN + ETH_LEN) as u32;
    if tot < min {
        return Err(DropReason::VxlanTruncated);
    }
    let lengths_ok = if gso {
        ulen >= min - 20
    } else {
        tot + ETH_LEN as u32 == len && ulen + 20 == tot
    };
    let raw: &[u8; 20] = unsafe { &*(ip as *const Ipv4Hdr as *const [u8; 20]) };
    if !lengths_ok || csum_fold(csum_words(raw, 0)) != 0 {
        return Err(DropReason::VxlanBadOuterHeader);
    }
    let vx: *mut VxlanHdr = c.at(ETH_LEN + 28).ok_or(DropReason::VxlanTruncated)?;
    let vx = unsafe { &*vx };
    if vx.flags != 0x08 || (vx.reserved1[0] | vx.reserved1[1] | vx.reserved1[2] | vx.reserved2) != 0
    {
        return Err(DropReason::VxlanBadFlags);
    }
    let vni = u32::from_be_bytes([0, vx.vni[0], vx.vni[1], vx.vni[2]]);
    let vtep = VtepKey { vni, addr: ip.src };
    let Some(allowed) = CL_VTEPS.get_ptr(&vtep) else {
        // A (VNI, VTEP) entry exists only with its network (the loader
        // writes networks first and deletes them last): one lookup on the
        // accepted path, a second only to name what is unknown.
        return Err(if CL_NETWORKS.get_ptr(&vni).is_none() {
            DropReason::VxlanUnknownVni
        } else {
            DropReason::VxlanUnknownVtep
        });
    };
    // An ipsec host takes VXLAN only out of the IPsec device: a frame in
    // clear that claims an ipsec VTEP's address may be forged by anyone on
    // the underlay.
    let flags = unsafe { *allowed };
    if decrypted {
        // Decrypted: only from a VTEP that is an ipsec host, as this one.
        if flags & VTEP_F_DECRYPTED == 0 {
            return Err(DropReason::EncryptionMismatch);
        }
    } else if flags & VTEP_F_ENCRYPTED != 0 {
        return Err(DropReason::VxlanPlaintext);
    }
    let inner: *mut EthHdr = c.at(VXLAN_ENCAP_LEN).ok_or(DropReason::VxlanTruncated)?;
    let inner = unsafe { &*inner };
    let port = match forward(vni, inner.dst) {
        Some(f) if f.kind == FWD_LOCAL => f,
        _ => return Err(DropReason::VxlanUnknownDestination),
    };
    if mac_eq(&inner.src, &gateway_mac(vni)) {
        // Routed on the sender's host: from the router's other networks.
        let src = inner_source(c, be16(inner.proto))?;
        let zone = routed_sender(vni, &ip.src, src)?;
        return Ok(Some(Delivery {
            port,
            zone,
            inner_proto: be16(inner.proto),
        }));
    }
    let sender = match forward(vni, inner.src) {
        Some(f) if f.kind == FWD_REMOTE && ip4_eq(&f.vtep, &ip.src) => f,
        _ => return Err(DropReason::VxlanSpoofedSource),
    };
    if sender.flags & PORT_F_SECURITY != 0 {
        // The sender has port security: its frames come from its own
        // addresses only, here too (its host checked them; a forged VXLAN
        // frame would not be).
        let src = inner_source(c, be16(inner.proto))?;
        match remote_mac(vni, src) {
            Some(mac) if mac_eq(&mac, &inner.src) => {}
            _ => return Err(DropReason::VxlanSpoofedSourceIp),
        }
    }
    Ok(Some(Delivery {
        port,
        zone: vni,
        inner_proto: be16(inner.proto),
    }))
}

/// The inner frame's source address (IPv4-mapped for IPv4).
#[inline(always)]
fn inner_source(c: &Cursor, proto: u16) -> Result<[u8; 16], DropReason> {
    match proto {
        ETH_P_IP => {
            let a: *mut [u8; 4] = c
                .at(VXLAN_ENCAP_LEN + ETH_LEN + 12)
                .ok_or(DropReason::VxlanTruncated)?;
            Ok(v4_mapped(unsafe { *a }))
        }
        ETH_P_IPV6 => {
            let a: *mut [u8; 16] = c
                .at(VXLAN_ENCAP_LEN + ETH_LEN + 8)
                .ok_or(DropReason::VxlanTruncated)?;
            Ok(unsafe { *a })
        }
        _ => Err(DropReason::VxlanSpoofedSourceIp),
    }
}

/// The sender of a routed frame that came in VXLAN for network `vni` from
/// VTEP `vtep` (its inner source MAC is the network's gateway MAC): the
/// remote port that has its source address `src` in another of the
/// router's networks, which must live behind that VTEP.
#[inline(always)]
fn routed_sender(vni: u32, vtep: &[u8; 4], src: [u8; 16]) -> Result<u32, DropReason> {
    let rif = router_iface(vni).ok_or(DropReason::VxlanSpoofedSource)?;
    if link_local(&src) {
        return Err(DropReason::VxlanSpoofedSourceIp);
    }
    let r = match route(rif.router, src) {
        Some(r) if r.vni != vni => r,
        _ => return Err(DropReason::VxlanSpoofedSourceIp),
    };
    let mac = match remote_mac(r.vni, src) {
        Some(m) => m,
        None => neighbour(r.vni, src).ok_or(DropReason::VxlanSpoofedSourceIp)?,
    };
    match forward(r.vni, mac) {
        Some(f) if f.kind == FWD_REMOTE && ip4_eq(&f.vtep, vtep) => Ok(ROUTER_ZONE | rif.router),
        _ => Err(DropReason::VxlanSpoofedSourceIp),
    }
}
