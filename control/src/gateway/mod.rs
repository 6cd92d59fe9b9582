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
