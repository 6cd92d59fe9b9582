//! The lab's plumbing: namespaces, the underlay switch, a host's uplink on
//! it, and running code inside a namespace.
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use cloison_dataplane::netdev;

use super::*;

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> Result<String> {
    cloison_testkit::netns::sh(args).map_err(anyhow::Error::msg)
}

/// Adds address `cidr` to interface `dev` of namespace `ns`.
pub(super) fn addr(ns: &str, cidr: &str, dev: &str) -> Result<()> {
    sh(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev])?;
    Ok(())
}

/// Network namespaces made by the lab, deleted (last made first) on drop.
#[derive(Default)]
pub(super) struct Namespaces(cloison_testkit::netns::Namespaces);

impl Namespaces {
    pub(super) fn add(&mut self, ns: &str) -> Result<()> {
        self.0.add(ns).map_err(anyhow::Error::msg)
    }

    pub(super) fn delete_all(&mut self) {
        self.0.delete_all();
    }
}

/// A Linux bridge `br0` in namespace `ns`, up: the underlay switch, or a
/// kernel-baseline host's bridge.
pub(super) fn switch(ns: &str) -> Result<()> {
    cloison_testkit::netns::bridge(ns, "br0").map_err(anyhow::Error::msg)
}

pub(super) fn set_uplink_forwarding(host_ns: &str, on: bool) -> Result<()> {
    sh(&[
        "ip",
        "netns",
        "exec",
        host_ns,
        "sysctl",
        "-qw",
        &format!("net.ipv4.conf.{UPLINK}.forwarding={}", on as u8),
    ])?;
    Ok(())
}

/// What the lab's underlay switch hands to a host's uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// As a NIC's wire: complete checksums and MTU-sized frames (the switch
    /// side checksums and segments in software). An XDP uplink needs this.
    Nic,
    /// A virtual fabric that keeps offloads end to end, as veth to veth
    /// does: GSO super-frames with partial checksums reach the uplink. Only
    /// a TC uplink can carry those (XDP sees neither the GSO nor the
    /// checksum state), and the kernel baseline keeps GSO end to end.
    Offload,
}

/// Plugs a host namespace into the underlay switch (bridge br0 of `ns`)
/// with a veth whose host side is `UPLINK`, addressed `addr`/24. The switch
/// side runs NAPI (GRO on), as a veth needs to take XDP-redirected frames;
/// what it sends depends on `wire`. The hosts and VMs keep their defaults.
pub(super) fn plug(ns: &str, dev: &str, host_ns: &str, addr: Ipv4Addr, wire: Wire) -> Result<()> {
    sh(&[
        "ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", UPLINK, "netns",
        host_ns,
    ])?;
    sh(&["ip", "-n", ns, "link", "set", dev, "master", "br0", "up"])?;
    let tx = match wire {
        Wire::Nic => "off",
        Wire::Offload => "on",
    };
    sh(&[
        "ip", "netns", "exec", ns, "ethtool", "-K", dev, "gro", "on", "tx", tx,
    ])?;
    sh(&[
        "ip",
        "-n",
        host_ns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        UPLINK,
    ])?;
    sh(&["ip", "-n", host_ns, "link", "set", UPLINK, "up"])?;
    Ok(())
}

/// Runs `f` on a thread inside network namespace `ns` and returns its result.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        netdev::enter_netns(&ns).with_context(|| format!("enter netns {ns}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("lab thread panicked"))?
}
