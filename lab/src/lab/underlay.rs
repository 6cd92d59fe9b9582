//! The underlay as an attacker sees it: an intruder on the switch, raw
//! frames, VXLAN frames built to order.
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use cloison_dataplane::{netdev, snapshot::MacAddr};
use cloison_testkit::wire::build;

use super::*;

impl Lab {
    /// A machine on the underlay switch that is not a host of the cloud
    /// (no VTEP of ours): what an attacker on the underlay would be.
    pub fn add_underlay_intruder(&mut self) -> Result<String> {
        let ul = self.ns("ul");
        let ns = self.add_ns("evil")?;
        sh(&[
            "ip", "-n", &ul, "link", "add", "p9", "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ])?;
        sh(&["ip", "-n", &ul, "link", "set", "p9", "master", "br0", "up"])?;
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(ns)
    }

    /// MAC address of a host's uplink.
    pub fn uplink_mac(&self, host: &str) -> Result<[u8; 6]> {
        let out = sh(&["ip", "-n", &self.ns(host), "-j", "link", "show", UPLINK])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let mac: MacAddr = v[0]["address"].as_str().context("no address")?.parse()?;
        Ok(mac.0)
    }
}

/// Sends raw Ethernet frames out of `ifname` in namespace `ns` (AF_PACKET).
pub fn send_frames(ns: &str, ifname: &str, frames: Vec<Vec<u8>>) -> Result<()> {
    let ifname = ifname.to_string();
    in_netns(ns, move || {
        let ifindex = netdev::ifindex(&ifname).context("no such interface")?;
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        let mut res = Ok(());
        for f in &frames {
            addr.sll_addr[..6].copy_from_slice(&f[..6]);
            let n = unsafe {
                libc::sendto(
                    fd,
                    f.as_ptr() as *const libc::c_void,
                    f.len(),
                    0,
                    &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n < 0 {
                res = Err(std::io::Error::last_os_error().into());
                break;
            }
        }
        unsafe { libc::close(fd) };
        res
    })
}

/// A VXLAN frame on the underlay carrying an inner UDP datagram with `marker`.
pub struct VxlanFrame {
    pub outer_dst_mac: [u8; 6],
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    pub flags: u8,
    pub vni: u32,
    pub inner_src_mac: [u8; 6],
    pub inner_dst_mac: [u8; 6],
    pub inner_src: Ipv4Addr,
    pub inner_dst: Ipv4Addr,
    pub marker: Vec<u8>,
}

impl VxlanFrame {
    pub fn inner(&self) -> Vec<u8> {
        let l4 = build::udp(40000, 7, &self.marker);
        let (s, d) = (self.inner_src.octets(), self.inner_dst.octets());
        build::v4(self.inner_src_mac, self.inner_dst_mac, s, d, l4).emit()
    }

    pub fn vxlan_payload(&self) -> Vec<u8> {
        let v = self.vni.to_be_bytes();
        let mut p = vec![self.flags, 0, 0, 0, v[1], v[2], v[3], 0];
        p.extend(self.inner());
        p
    }

    pub fn build_with_payload(&self, payload: &[u8]) -> Vec<u8> {
        let l4 = build::udp(50000, cloison_abi::VXLAN_PORT, payload);
        let (s, d) = (self.outer_src.octets(), self.outer_dst.octets());
        build::v4([0x02, 0xee, 0, 0, 0, 0x66], self.outer_dst_mac, s, d, l4).emit()
    }

    pub fn build(&self) -> Vec<u8> {
        self.build_with_payload(&self.vxlan_payload())
    }
}
