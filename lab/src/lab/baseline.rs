//! The Linux kernel's own answer to the same job, built beside the lab.
use std::{io::Write, process::Command};

use anyhow::{bail, Context, Result};
use cloison_dataplane::{netdev, snapshot::MacAddr};

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
    tag: String,
    /// [`routed`](Self::routed)'s VM on the other network (10.1.0.12, on
    /// the second host).
    pub routed_vm: Option<String>,
    /// [`routed`](Self::routed)'s outside namespace (198.51.100.1 on `x1`).
    pub outside: Option<String>,
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
        let b = Self::hosts(wire)?;
        for i in 1..=2usize {
            let (hv, vm) = (&b.hosts[i - 1], if i == 1 { &b.vm1 } else { &b.vm2 });
            let mac = format!("02:00:00:00:00:0{i}");
            vm_on_bridge(hv, "br0", "tap0", vm, &mac, &format!("10.0.0.{i}/24"))?;
            // The same isolation and security group as the lab's Cloison
            // ports: anti-spoofing on the VM port (bridge family), the
            // default group with conntrack (inet forward; this kernel has no
            // bridge-family conntrack, so bridged IPv4 goes through the IP
            // hooks with br_netfilter, as OpenStack's iptables firewall does).
            nft(
                hv,
                &vm_rules(
                    &[("tap0", &mac, &format!("10.0.0.{i}"))],
                    &format!("10.0.0.{i}"),
                    "10.0.0.1, 10.0.0.2",
                ),
            )?;
        }
        Ok(b)
    }

    /// The kernel doing what a tenant router does, as Neutron's legacy
    /// routers do it (a router namespace per host): the first host has the
    /// router's two networks as bridges with its addresses (br0 10.0.0.254
    /// on VNI 1001, br1 10.1.0.1 on VNI 1101), forwards between them and
    /// masquerades (nftables NAT) out of `ext0` (198.51.100.11/24) to the
    /// outside namespace [`outside`](Self::outside) (198.51.100.1 on `x1`);
    /// the second host has vm2 (10.0.0.2) on br0 and [`routed_vm`]
    /// (Self::routed_vm) (10.1.0.12) on br1. The VM ports' anti-spoofing and
    /// groups as in [`on`](Self::on). Frames from vm1 to be routed go to
    /// [`ROUTER_MAC`](Self::ROUTER_MAC).
    pub fn routed() -> Result<KernelBaseline> {
        let mut b = Self::hosts(Wire::Nic)?;
        let (hv1, hv2) = (b.hosts[0].clone(), b.hosts[1].clone());
        let vm3 = format!("{}-kvm3", b.tag);
        let out = format!("{}-kout", b.tag);
        b._namespaces.add(&vm3)?;
        b._namespaces.add(&out)?;
        for (i, hv) in [&hv1, &hv2].into_iter().enumerate() {
            let (me, other) = (
                underlay_ip(i + 1).to_string(),
                underlay_ip(2 - i).to_string(),
            );
            cloison_testkit::netns::bridge(hv, "br1").map_err(anyhow::Error::msg)?;
            vxlan_on_bridge(hv, "vx1", 1101, "br1", &me, &other)?;
        }
        vm_on_bridge(
            &hv1,
            "br0",
            "tap0",
            &b.vm1,
            "02:00:00:00:00:01",
            "10.0.0.1/24",
        )?;
        vm_on_bridge(
            &hv2,
            "br0",
            "tap0",
            &b.vm2,
            "02:00:00:00:00:02",
            "10.0.0.2/24",
        )?;
        vm_on_bridge(
            &hv2,
            "br1",
            "tap1",
            &vm3,
            "02:00:00:00:01:12",
            "10.1.0.12/24",
        )?;
        let router_mac = MacAddr(Self::ROUTER_MAC).to_string();
        for (br, cidr) in [("br0", "10.0.0.254/24"), ("br1", "10.1.0.1/24")] {
            sh(&["ip", "-n", &hv1, "link", "set", br, "address", &router_mac])?;
            addr(&hv1, cidr, br)?;
        }
        sh(&[
            "ip", "-n", &hv1, "link", "add", "ext0", "type", "veth", "peer", "name", "x1", "netns",
            &out,
        ])?;
        addr(&hv1, "198.51.100.11/24", "ext0")?;
        sh(&["ip", "-n", &hv1, "link", "set", "ext0", "up"])?;
        addr(&out, "198.51.100.1/24", "x1")?;
        sh(&["ip", "-n", &out, "link", "set", "x1", "up"])?;
        // As the lab's outside: a NIC's wire.
        sh(&[
            "ip", "netns", "exec", &out, "ethtool", "-K", "x1", "gro", "on", "tx", "off",
        ])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &hv1,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        // Neighbours known, as they are once traffic runs.
        let x1 = MacAddr(super::in_netns(&out, || netdev::mac("x1").context("x1"))?).to_string();
        for (ip, mac, dev) in [
            ("10.1.0.12", "02:00:00:00:01:12", "br1"),
            ("10.0.0.2", "02:00:00:00:00:02", "br0"),
            ("198.51.100.1", x1.as_str(), "ext0"),
        ] {
            sh(&[
                "ip",
                "-n",
                &hv1,
                "neigh",
                "replace",
                ip,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        let peers = "10.0.0.1, 10.0.0.2, 10.1.0.12";
        nft(
            &hv1,
            &format!(
                "{}\ntable ip cloison_nat {{
                   chain postrouting {{
                     type nat hook postrouting priority srcnat; policy accept;
                     oifname \"ext0\" masquerade
                   }}
                 }}",
                vm_rules(
                    &[("tap0", "02:00:00:00:00:01", "10.0.0.1")],
                    "10.0.0.1",
                    peers
                )
            ),
        )?;
        nft(
            &hv2,
            &vm_rules(
                &[
                    ("tap0", "02:00:00:00:00:02", "10.0.0.2"),
                    ("tap1", "02:00:00:00:01:12", "10.1.0.12"),
                ],
                "10.0.0.2, 10.1.0.12",
                peers,
            ),
        )?;
        b.routed_vm = Some(vm3);
        b.outside = Some(out);
        Ok(b)
    }

    /// Where routed frames go: the router's bridges' address.
    pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xfe, 0x01];

    /// The two hosts on their underlay, each with a bridge br0 and VNI 1001
    /// on it, and the two VMs' namespaces: what every baseline starts from.
    fn hosts(wire: Wire) -> Result<KernelBaseline> {
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
            plug(&ul, &format!("p{i}"), &hv, underlay_ip(i), wire)?;
            let me = underlay_ip(i).to_string();
            let other = underlay_ip(3 - i).to_string();
            switch(&hv)?;
            vxlan_on_bridge(&hv, "vx0", 1001, "br0", &me, &other)?;
            sh(&[
                "ip",
                "netns",
                "exec",
                &hv,
                "sysctl",
                "-qw",
                "net.bridge.bridge-nf-call-iptables=1",
            ])?;
        }
        Ok(KernelBaseline {
            _namespaces: namespaces,
            hosts: [format!("{tag}-khv1"), format!("{tag}-khv2")],
            vm1,
            vm2,
            hv1: format!("{tag}-khv1"),
            tag,
            routed_vm: None,
            outside: None,
        })
    }
}

/// A VXLAN device `dev` for `vni` between underlay addresses `me` and
/// `other`, a port of bridge `br` in host namespace `hv`.
fn vxlan_on_bridge(hv: &str, dev: &str, vni: u32, br: &str, me: &str, other: &str) -> Result<()> {
    let vni = vni.to_string();
    sh(&[
        "ip", "-n", hv, "link", "add", dev, "type", "vxlan", "id", &vni, "local", me, "remote",
        other, "dstport", "4789", "dev", UPLINK,
    ])?;
    sh(&["ip", "-n", hv, "link", "set", dev, "master", br, "up"])?;
    Ok(())
}

/// A VM (namespace `vm`, its eth0 with `mac` and `cidr`, MTU 1450) whose
/// port `tap` is on bridge `br` of host namespace `hv`.
fn vm_on_bridge(hv: &str, br: &str, tap: &str, vm: &str, mac: &str, cidr: &str) -> Result<()> {
    sh(&[
        "ip", "-n", hv, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", vm,
    ])?;
    sh(&["ip", "-n", hv, "link", "set", tap, "master", br, "up"])?;
    sh(&["ip", "-n", vm, "link", "set", "eth0", "mtu", "1450"])?;
    sh(&["ip", "-n", vm, "link", "set", "eth0", "address", mac])?;
    addr(vm, cidr, "eth0")?;
    sh(&["ip", "-n", vm, "link", "set", "eth0", "up"])?;
    Ok(())
}

/// The VM ports' rules of a host: anti-spoofing of each (tap, MAC,
/// address) where frames enter the bridge (so routed frames too), and the
/// default group: out to anyone from the host's `vms` and in from `peers`,
/// with conntrack.
fn vm_rules(ports: &[(&str, &str, &str)], vms: &str, peers: &str) -> String {
    let spoof: String = ports
        .iter()
        .map(|(tap, mac, ip)| {
            format!(
                "iifname \"{tap}\" ether saddr != {mac} drop\n\
                 iifname \"{tap}\" ip saddr != {ip} drop\n"
            )
        })
        .collect();
    format!(
        "table bridge cloison_spoof {{
           chain prerouting {{
             type filter hook prerouting priority 0; policy accept;
             {spoof}
           }}
         }}
         table inet cloison_sg {{
           chain forward {{
             type filter hook forward priority 0; policy drop;
             ct state established,related accept
             ct state invalid drop
             ip saddr {{ {vms} }} ct state new accept
             ip daddr {{ {vms} }} ip saddr {{ {peers} }} ct state new accept
           }}
         }}"
    )
}
