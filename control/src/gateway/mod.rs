//! Gateway services the agent answers for its host's VMs (issue 16):
//! DHCPv4, router advertisements, stateless DHCPv6 and instance metadata.
//! Each protocol is a module of pure functions from what the port's frame
//! asked and what its port and network say to the frame that answers (so
//! that fixtures hold it without a kernel); `serve` is the agent's end of
//! the steering: it reads the service tap, finds the port by the interface
//! the frame entered by, and writes the answers back for that port only.
pub mod dhcp;
pub mod dhcp6;
pub mod metadata;
pub mod ra;
pub mod serve;

pub use serve::{Counters, Service};

use std::net::Ipv6Addr;

use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv6Packet,
    Ipv6Repr,
};

/// Why a frame is not an IPv6 packet from the port's VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotFromVm {
    Malformed,
    NotThePortsMac,
}

/// The IPv6 packet of `frame`, an Ethernet frame the VM whose MAC is
/// `vm_mac` sent (lengths checked).
pub(crate) fn ipv6_from_vm(frame: &[u8], vm_mac: [u8; 6]) -> Result<Ipv6Packet<&[u8]>, NotFromVm> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| NotFromVm::Malformed)?;
    if eth.ethertype() != EthernetProtocol::Ipv6 {
        return Err(NotFromVm::Malformed);
    }
    if eth.src_addr().0 != vm_mac {
        return Err(NotFromVm::NotThePortsMac);
    }
    let payload = &frame[EthernetFrame::<&[u8]>::header_len()..];
    Ipv6Packet::new_checked(payload).map_err(|_| NotFromVm::Malformed)
}

/// An Ethernet frame carrying `payload` in IPv6.
pub(crate) fn ipv6_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: IpProtocol,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let eth = EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Ipv6,
    };
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header,
        payload_len: payload.len(),
        hop_limit,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + payload.len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut f);
    let mut p = Ipv6Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p);
    p.payload_mut().copy_from_slice(payload);
    buf
}
