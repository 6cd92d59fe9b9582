//! The Linux kernel's own answer to the same job, built beside the lab.
use std::{io::Write, process::Command};

use anyhow::{bail, Context, Result};

use super::*;

/// The kernel's own answer to the same job, in namespaces of its own: two
/// hosts with a VXLAN device and a Linux bridge each, one VM per host.
/// Loads an nftables ruleset into namespace `ns`.
fn nft(ns: &str, ruleset: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run nft")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft in {ns}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The Linux kernel's own answer to the same job, for the benches: two
/// hosts with a VXLAN device and a bridge each, the VM port behind
/// nftables (bridge family) doing anti-spoofing and the default security
/// group with conntrack.
pub struct KernelBaseline {
    _namespaces: Namespaces,
    pub vm1: String,
    pub vm2: String,
    /// The first host's namespace (vm1's port is its tap0).
    pub hv1: String,
    hosts: [String; 2],
}

impl KernelBaseline {
    /// As [`Lab::uplink_forwarding`] (the bridged VXLAN path does not route,
    /// so it changes nothing here; the benches set both alike).
    pub fn uplink_forwarding(&self, on: bool) -> Result<()> {
        for host in &self.hosts {
            set_uplink_forwarding(host, on)?;
        }
        Ok(())
    }

    pub fn new() -> Result<KernelBaseline> {
        Self::on(Wire::Nic)
    }

    /// The baseline with its underlay handing the uplinks what `wire` says.
    pub fn on(wire: Wire) -> Result<KernelBaseline> {
        let tag = Lab::tag();
        let ul = format!("{tag}-kul");
        let (vm1, vm2) = (format!("{tag}-kvm1"), format!("{tag}-kvm2"));
        let mut namespaces = Namespaces::default();
        for ns in [
            &ul,
            &format!("{tag}-khv1"),
            &format!("{tag}-khv2"),
            &vm1,
            &vm2,
        ] {
            namespaces.add(ns)?;
        }
        switch(&ul)?;
        for i in 1..=2usize {
            let hv = format!("{tag}-khv{i}");
            let vm = if i == 1 { &vm1 } else { &vm2 };
            plug(&ul, &format!("p{i}"), &hv, underlay_ip(i), wire)?;
            let me = underlay_ip(i).to_string();
            let other = underlay_ip(3 - i).to_string();
            sh(&[
                "ip", "-n", &hv, "link", "add", "vx0", "type", "vxlan", "id", "1001", "local", &me,
                "remote", &other, "dstport", "4789", "dev", UPLINK,
            ])?;
            switch(&hv)?;
            sh(&["ip", "-n", &hv, "link", "set", "vx0", "master", "br0", "up"])?;
            sh(&[
                "ip", "-n", &hv, "link", "add", "tap0", "type", "veth", "peer", "name", "eth0",
                "netns", vm,
            ])?;
            sh(&[
                "ip", "-n", &hv, "link", "set", "tap0", "master", "br0", "up",
            ])?;
            sh(&["ip", "-n", vm, "link", "set", "eth0", "mtu", "1450"])?;
            let mac = format!("02:00:00:00:00:0{i}");
            sh(&["ip", "-n", vm, "link", "set", "eth0", "address", &mac])?;
            sh(&[
                "ip",
                "-n",
                vm,
                "addr",
                "add",
                &format!("10.0.0.{i}/24"),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", vm, "link", "set", "eth0", "up"])?;
            // The same isolation and security group as the lab's Cloison
            // ports: anti-spoofing on the VM port (bridge family), the
            // default group with conntrack (inet forward; this kernel has no
            // bridge-family conntrack, so bridged IPv4 goes through the IP
            // hooks with br_netfilter, as OpenStack's iptables firewall does).
            sh(&[
                "ip",
                "netns",
                "exec",
                &hv,
                "sysctl",
                "-qw",
                "net.bridge.bridge-nf-call-iptables=1",
            ])?;
            nft(
                &hv,
                &format!(
                    "table bridge cloison_spoof {{
                   chain forward {{
                     type filter hook forward priority 0; policy accept;
                     iifname \"tap0\" ether saddr != {mac} drop
                     iifname \"tap0\" ip saddr != 10.0.0.{i} drop
                   }}
                 }}
                 table inet cloison_sg {{
                   chain forward {{
                     type filter hook forward priority 0; policy drop;
                     ct state established,related accept
                     ct state invalid drop
                     ip saddr 10.0.0.{i} ct state new accept
                     ip daddr 10.0.0.{i} ip saddr {{ 10.0.0.1, 10.0.0.2 }} ct state new accept
                   }}
                 }}"
                ),
            )?;
        }
        Ok(KernelBaseline {
            _namespaces: namespaces,
            hosts: [format!("{tag}-khv1"), format!("{tag}-khv2")],
            vm1,
            vm2,
            hv1: format!("{tag}-khv1"),
        })
    }
}
