//! The agent's service tap: one tap device per host through which the port
//! programs hand the agent what its gateway services answer (DHCP, router
//! solicitations, metadata TCP), each frame with the port's ifindex in its
//! destination MAC, and through which the agent's answers go back (the
//! ifindex in their source MAC), each to that port only (`cl_service` on
//! the tap's TC ingress). The tap has no address and no IPv6: the host
//! stack neither sends on it nor gets anything from it.
//!
//! The tap is persistent, so it keeps its ifindex (which `CL_SERVICE`
//! names) across agent restarts; while no agent holds it, what is steered
//! to it is dropped by the kernel, and the VM's client asks again.
use std::{
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use cloison_abi::ServiceConfig;

use crate::Error;

const TUNSETIFF: libc::c_ulong = 0x400454ca;
const TUNSETPERSIST: libc::c_ulong = 0x400454cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Each port's default limit on frames to the agent: 200 a second
/// sustained, bursts of 100 (a VM's boot asks for a few dozen at once:
/// DHCP, RS, cloud-init's metadata requests).
pub const RATE_PER_SEC: u64 = 200;
pub const BURST: u64 = 100;

/// The limit of `per_sec` frames a second, bursts of `burst`; 0 = none.
pub fn config(ifindex: u32, per_sec: u64, burst: u64) -> ServiceConfig {
    let interval_ns = 1_000_000_000u64.checked_div(per_sec).unwrap_or(0);
    ServiceConfig {
        ifindex,
        _pad: 0,
        interval_ns,
        burst_ns: interval_ns.saturating_mul(burst.saturating_sub(1)),
    }
}

/// The service tap's name for `host`: `clsvc` and a hash of the host name
/// (interface names have at most 15 characters; two agents sharing a
/// namespace in a test get two taps).
pub fn tap_name(host: &str) -> String {
    // FNV-1a: stable across releases, unlike std's hasher.
    let mut h: u32 = 0x811c9dc5;
    for b in host.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x01000193);
    }
    format!("clsvc{h:08x}")
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str, flags: libc::c_short) -> Result<IfReq, Error> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(Error::Invalid(format!("interface name {name:?}")));
    }
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(r)
}

fn open_tun(name: &str) -> Result<OwnedFd, Error> {
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Error::io("open /dev/net/tun")(io::Error::last_os_error()));
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut r = ifreq(name, IFF_TAP | IFF_NO_PI)?;
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut r) } != 0 {
        return Err(Error::io(format!("create tap {name}"))(
            io::Error::last_os_error(),
        ));
    }
    Ok(fd)
}

/// The service tap of a host, held open: frames the ports steer are read
/// from its descriptor, answers written to it.
pub struct ServiceTap {
    pub fd: OwnedFd,
    pub name: String,
    pub ifindex: u32,
}

impl ServiceTap {
    /// Creates (or takes over) `host`'s service tap, persistent, up, with
    /// no IPv6 and no address. Non-blocking.
    pub fn open(host: &str) -> Result<ServiceTap, Error> {
        let name = tap_name(host);
        let fd = open_tun(&name)?;
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) } != 0 {
            return Err(Error::io(format!("make tap {name} persistent"))(
                io::Error::last_os_error(),
            ));
        }
        let sysctl = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        if fs::metadata(&sysctl).is_ok() {
            fs::write(&sysctl, "1").map_err(Error::io(format!("write {sysctl}")))?;
        }
        set_up(&name)?;
        let ifindex = crate::netdev::ifindex(&name)
            .ok_or_else(|| Error::Invalid(format!("tap {name} has no ifindex")))?;
        Ok(ServiceTap { fd, name, ifindex })
    }

    /// Deletes `host`'s service tap if it exists (`cloisond --purge`).
    pub fn remove(host: &str) -> Result<(), Error> {
        let name = tap_name(host);
        if crate::netdev::ifindex(&name).is_none() {
            return Ok(());
        }
        let fd = open_tun(&name)?;
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST as _, 0 as libc::c_ulong) } != 0 {
            return Err(Error::io(format!("delete tap {name}"))(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

fn set_up(name: &str) -> Result<(), Error> {
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(Error::io("socket")(io::Error::last_os_error()));
    }
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut r = ifreq(name, 0)?;
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut r) } != 0 {
        return Err(Error::io(format!("flags of {name}"))(
            io::Error::last_os_error(),
        ));
    }
    r.flags |= libc::IFF_UP as libc::c_short;
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut r) } != 0 {
        return Err(Error::io(format!("set {name} up"))(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_differ() {
        let (a, b) = (tap_name("hv1"), tap_name("hv2"));
        assert_ne!(a, b);
        assert!(a.len() <= 15 && a.starts_with("clsvc"));
        assert_eq!(tap_name(&"h".repeat(63)).len(), 13);
    }

    #[test]
    fn the_rate_is_a_cell_interval_and_a_burst() {
        let c = config(7, 200, 100);
        assert_eq!(
            (c.ifindex, c.interval_ns, c.burst_ns),
            (7, 5_000_000, 495_000_000)
        );
        assert_eq!(config(7, 0, 100).interval_ns, 0);
    }
}
