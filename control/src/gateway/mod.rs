//! Gateway services the agent answers for its host's VMs (issue 16, being
//! built): DHCPv4 first. Each service is a pure function from what the
//! port's frame asked and what its port and network say to the frame that
//! answers, so that the fixtures hold it without a kernel; the steering
//! that hands the agent these frames and takes the answers back to the
//! right port is not built yet.
pub mod dhcp;
