//! Interface facts from the calling thread's network namespace (ioctl, not
//! sysfs: sysfs shows the namespace it was mounted in, not the thread's).
use std::{ffi::CString, io};

use crate::tables::Iface;

pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

const ETHTOOL_GDRVINFO: u32 = 3;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

/// What ETHTOOL_GDRVINFO says of an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// "veth", "tun", "bridge", "ixgbe", "virtio_net", ...
    pub driver: String,
    /// The bus address of the device behind it ("0000:03:00.0"); empty,
    /// "N/A" or "tap" for software devices.
    pub bus_info: String,
}

fn c_str(b: &[u8; 32]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

pub fn driver_info(name: &str) -> io::Result<DriverInfo> {
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info as *mut DrvInfo as *mut libc::c_void,
        _pad: [0; 16],
    };
    if name.len() >= 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    let err = io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err);
    }
    Ok(DriverInfo {
        driver: c_str(&info.driver),
        bus_info: c_str(&info.bus_info),
    })
}

/// The kernel driver of an interface ("veth", "tun", ...).
pub fn driver(name: &str) -> io::Result<String> {
    driver_info(name).map(|d| d.driver)
}

impl DriverInfo {
    /// Whether an XDP program on this device sees frames as they were on
    /// a wire: complete checksums, at most MTU-sized. A device with a bus
    /// address is a NIC (physical, or virtio/SR-IOV); a software device
    /// (veth, tun, bridge, bond, vxlan, ...) may hand XDP GSO super-frames
    /// with partial checksums that XDP can neither see nor carry: measured
    /// on a veth uplink whose peer has GRO on, every TCP and UDP connection
    /// across hosts failed with XDP and passed with TC.
    pub fn xdp_sees_wire_frames(&self) -> bool {
        let b = self.bus_info.trim();
        let software = matches!(
            self.driver.as_str(),
            "veth" | "tun" | "bridge" | "bonding" | "vxlan"
        );
        !(b.is_empty() || b == "N/A" || b == "tap" || software)
    }
}

/// The name of interface `ifindex`, if it exists (in this namespace).
pub fn name_of(ifindex: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Resolves a port interface in the current namespace.
pub fn resolve(name: &str) -> Option<Iface> {
    let ifindex = ifindex(name)?;
    let driver = driver(name).unwrap_or_default();
    Some(Iface {
        ifindex,
        veth: driver == "veth",
        // A VM's NIC on the host is a tap (driver "tun") or, in a lab, a
        // veth: anything else is the host's own (a NIC, a bridge, a bond).
        host_device: driver != "veth" && driver != "tun",
    })
}

/// Moves the calling thread into the named network namespace
/// (`/run/netns/NAME`, as `ip netns add` makes). Only the network namespace
/// changes: unlike `ip netns exec`, the mount namespace, and so bpffs and
/// its pins, stay those of the host.
pub fn enter_netns(name: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{name}"))?;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The MAC address of interface `name` in this thread's namespace
/// (SIOCGIFHWADDR: /sys shows the namespace it was mounted in).
pub fn mac(name: &str) -> Option<[u8; 6]> {
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Some(mac)
}

/// Sends one Ethernet frame out of interface `ifindex` of this thread's
/// namespace (AF_PACKET; the frame carries its own header).
pub fn send_frame(ifindex: u32, frame: &[u8]) -> io::Result<()> {
    if frame.len() < 14 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "short frame"));
    }
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    let n = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    let res = if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    unsafe { libc::close(fd) };
    res
}

/// A gratuitous ARP request announcing that `ip` is at `mac` (sender and
/// target address both `ip`, broadcast): what a host sends when an address
/// moves to it, so that the segment's neighbour caches follow at once
/// instead of when their entries expire.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend([0xff; 6]);
    f.extend(mac);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend(mac);
    f.extend(ip);
    f.extend([0; 6]);
    f.extend(ip);
    f
}

#[cfg(test)]
mod tests {
    use super::DriverInfo;

    #[test]
    fn a_gratuitous_arp_is_a_request_for_its_own_address() {
        let f = super::gratuitous_arp([2, 0, 0, 0, 0, 7], [198, 51, 100, 20]);
        assert_eq!(f.len(), 42);
        assert_eq!(f[..6], [0xff; 6], "broadcast");
        assert_eq!(f[12..14], [0x08, 0x06], "ARP");
        assert_eq!(f[20..22], [0, 1], "a request");
        assert_eq!(
            f[22..28],
            f[6..12],
            "sender hardware address: the source MAC"
        );
        assert_eq!(f[28..32], f[38..42], "sender address = target address");
        assert_eq!(f[28..32], [198, 51, 100, 20]);
    }

    fn info(driver: &str, bus_info: &str) -> DriverInfo {
        DriverInfo {
            driver: driver.into(),
            bus_info: bus_info.into(),
        }
    }

    #[test]
    fn xdp_only_where_frames_come_off_a_wire() {
        assert!(info("ixgbe", "0000:03:00.0").xdp_sees_wire_frames());
        assert!(info("mlx5_core", "0000:81:00.1").xdp_sees_wire_frames());
        assert!(info("virtio_net", "0000:00:04.0").xdp_sees_wire_frames());
        assert!(!info("veth", "").xdp_sees_wire_frames());
        assert!(!info("tun", "tap").xdp_sees_wire_frames());
        assert!(!info("bridge", "N/A").xdp_sees_wire_frames());
        assert!(!info("bonding", "").xdp_sees_wire_frames());
        assert!(!info("veth", "0000:00:01.0").xdp_sees_wire_frames());
    }
}
