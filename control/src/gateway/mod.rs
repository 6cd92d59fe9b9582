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

use smoltcp::wire::{EthernetFrame, EthernetProtocol, Ipv6Packet};

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
