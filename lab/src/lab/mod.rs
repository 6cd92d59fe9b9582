//! The netns lab: hypervisor hosts, VMs and an underlay switch, each a
//! network namespace this code creates (unique names) and removes on drop,
//! also after a failure. Nothing touches the machine's own interfaces.
use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, process::Command};

use anyhow::{bail, Result};
use cloison_abi::DropReason;
use cloison_dataplane::{
    loader::DEFAULT_PIN_ROOT, snapshot::MacAddr, Dataplane, Host, Network, Port, SecurityGroup,
    Snapshot, Stats, UplinkHook,
};

mod agents;
mod baseline;
mod boot;
mod capture;
mod fleet;
mod ipsec;
mod topology;
mod traffic;
mod underlay;

pub use agents::*;
pub use baseline::*;
pub use boot::*;
pub use capture::*;
pub use fleet::*;
pub use ipsec::*;
use topology::*;
pub use topology::{in_netns, sh, Wire};
pub use traffic::*;
pub use underlay::*;

/// A VM: a namespace with `eth0` on a veth whose host side is the port.
#[derive(Clone, Debug)]
pub struct Vm {
    pub name: String,
    pub ns: String,
    pub host: String,
    pub tenant: char,
    pub port_if: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub ip6: std::net::Ipv6Addr,
}

pub struct Lab {
    pub tag: String,
    /// Agents by host, once `start_agents` ran.
    pub agents: Vec<AgentProc>,
    /// The etcd members of fleet mode, once `start_etcd` ran.
    pub etcd: Vec<EtcdMember>,
    /// The agents' `--etcd-endpoints` (fleet mode).
    pub fleet: Option<String>,
    pub hosts: Vec<String>,
    pub vms: Vec<Vm>,
    pub snapshot: Snapshot,
    namespaces: Namespaces,
    pins: Vec<String>,
    pub pin_root: PathBuf,
    pub hook: UplinkHook,
    pub wire: Wire,
    /// VMs boot with no address: they take them from the gateway
    /// services (DHCP, SLAAC) of networks that have a gateway.
    pub booting: bool,
    /// More flags for the agents of these hosts (started from then on).
    pub agent_args: BTreeMap<String, Vec<String>>,
    /// The charons of ipsec hosts, once `enable_ipsec` ran.
    pub charons: Vec<Charon>,
}

pub const UPLINK: &str = "up0";

/// Neutron's default group, `{prefix}-default`: everything out, and in from
/// the group's own members, over IPv4 and IPv6.
pub fn default_group(tenant: &str, prefix: &str) -> SecurityGroup {
    let name = format!("{prefix}-default");
    let rules = ["IPv4", "IPv6"]
        .iter()
        .flat_map(|e| {
            [
                format!(r#"{{"direction": "egress", "ethertype": "{e}"}}"#),
                format!(
                    r#"{{"direction": "ingress", "ethertype": "{e}", "remote": {{"group": "{name}"}}}}"#
                ),
            ]
        })
        .map(|r| serde_json::from_str(&r).expect("rule literal"))
        .collect();
    SecurityGroup {
        name,
        tenant: tenant.into(),
        rules,
    }
}

/// `ping` from namespace `ns` to an address; true when every echo was
/// answered.
pub fn ping_in(ns: &str, to: &str, count: u32) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "ping",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            to,
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn underlay_ip(host: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, host as u8)
}

impl Lab {
    fn tag() -> String {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("cl{:x}", (std::process::id() ^ t) & 0xffff)
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    fn add_ns(&mut self, name: &str) -> Result<String> {
        let ns = self.ns(name);
        self.namespaces.add(&ns)?;
        Ok(ns)
    }

    /// Two hosts on one underlay switch; tenants `a` and `b` with the same
    /// subnet and the same MACs: a1, a3, b1 on hv1; a2, b2 on hv2.
    pub fn two_hosts(hook: UplinkHook) -> Result<Lab> {
        Self::two_hosts_on(hook, Wire::Nic)
    }

    /// `two_hosts` with the underlay handing the uplinks what `wire` says.
    pub fn two_hosts_on(hook: UplinkHook, wire: Wire) -> Result<Lab> {
        Self::make(hook, wire, false)
    }

    /// `two_hosts` whose VMs boot as a cloud image does: no address, link
    /// MTU 1500, until their DHCP client and SLAAC configure them. Each
    /// network has a gateway (10.0.0.254, fd00:1::1), DNS servers and a
    /// host route; each port's IPv6 address is its SLAAC one, its hostname
    /// `{name}-vm`, its instance id `i-{name}`.
    pub fn two_hosts_booting(hook: UplinkHook) -> Result<Lab> {
        Self::make(hook, Wire::Nic, true)
    }

    fn make(hook: UplinkHook, wire: Wire, booting: bool) -> Result<Lab> {
        let mut lab = Lab {
            tag: Self::tag(),
            hosts: Vec::new(),
            vms: Vec::new(),
            snapshot: Snapshot::default(),
            namespaces: Namespaces::default(),
            pins: Vec::new(),
            agents: Vec::new(),
            etcd: Vec::new(),
            fleet: None,
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            hook,
            wire,
            booting,
            agent_args: BTreeMap::new(),
            charons: Vec::new(),
        };
        lab.build()?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let ul = self.add_ns("ul")?;
        switch(&ul)?;
        for i in 1..=2 {
            self.add_host(i)?;
        }
        for n in ["a", "b"] {
            self.snapshot
                .security_groups
                .push(default_group(&format!("tenant-{n}"), n));
            self.snapshot.networks.push(Network {
                name: format!("{n}-net"),
                tenant: format!("tenant-{n}"),
                vni: if n == "a" { 1001 } else { 1002 },
                subnets: vec!["10.0.0.0/24".parse()?, "fd00:1::/64".parse()?],
                mtu: 1450,
                gateway_ips: if self.booting {
                    vec!["10.0.0.254".parse()?, "fd00:1::1".parse()?]
                } else {
                    vec![]
                },
                dhcp: true,
                dns_servers: if self.booting {
                    vec!["10.0.0.53".parse()?, "fd00:1::53".parse()?]
                } else {
                    vec![]
                },
                host_routes: if self.booting {
                    vec![cloison_dataplane::HostRoute {
                        destination: "192.168.0.0/16".parse()?,
                        nexthop: "10.0.0.254".parse()?,
                    }]
                } else {
                    vec![]
                },
            });
        }
        for (name, host, idx) in [
            ("a1", 1, 1u8),
            ("a2", 2, 2),
            ("a3", 1, 3),
            ("b1", 1, 1),
            ("b2", 2, 2),
        ] {
            self.add_vm(name, host, idx)?;
        }
        Ok(())
    }

    fn add_host(&mut self, i: usize) -> Result<()> {
        let ul = self.ns("ul");
        let hv = self.add_ns(&format!("hv{i}"))?;
        let sw = format!("p{i}");
        plug(&ul, &sw, &hv, underlay_ip(i), self.wire)?;
        let name = format!("hv{i}");
        self.snapshot.hosts.push(Host {
            external_ip: None,
            encryption: Default::default(),
            name: name.clone(),
            underlay_ip: underlay_ip(i),
        });
        self.hosts.push(name);
        Ok(())
    }

    /// A third Cloison host, hv3, with VM a4 (tenant a, 10.0.0.4) on it.
    /// Before agents or an apply; not with the kernel peer (also hv3).
    pub fn add_third_host(&mut self) -> Result<()> {
        if self.hosts.len() != 2 {
            bail!(
                "the lab has {} hosts: a third one is added to two",
                self.hosts.len()
            );
        }
        self.add_host(3)?;
        self.add_vm("a4", 3, 4)
    }

    fn add_vm(&mut self, name: &str, host: usize, idx: u8) -> Result<()> {
        self.add_vm_in(name, host, idx, 0)
    }

    /// A VM of tenant `name[0]` in its network `net`: 0 is `{t}-net`
    /// (10.0.0.0/24, fd00:1::/64), 1 `{t}-db` (10.1.0.0/24, fd00:2::/64),
    /// 2 `{t}-iso` (10.2.0.0/24, fd00:3::/64); address `idx` there.
    fn add_vm_in(&mut self, name: &str, host: usize, idx: u8, net: u8) -> Result<()> {
        let tenant = name.chars().next().unwrap_or('a');
        let hv = self.ns(&format!("hv{host}"));
        let ns = self.add_ns(name)?;
        let port_if = format!("t{name}");
        let mac = MacAddr([0x02, 0, 0, 0, net, idx]);
        let ip = Ipv4Addr::new(10, net, 0, idx);
        let prefix = 1 + net as u16;
        let ip6: std::net::Ipv6Addr = if self.booting {
            // SLAAC's: the /64 prefix and the MAC's EUI-64 interface id.
            let ll = mac.link_local().segments();
            std::net::Ipv6Addr::new(0xfd00, prefix, 0, 0, ll[4], ll[5], ll[6], ll[7])
        } else {
            format!("fd00:{prefix}::{idx}").parse()?
        };
        sh(&[
            "ip", "-n", &hv, "link", "add", &port_if, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        sh(&["ip", "-n", &hv, "link", "set", &port_if, "up"])?;
        let mtu = if self.booting { "1500" } else { "1450" };
        sh(&[
            "ip",
            "-n",
            &ns,
            "link",
            "set",
            "eth0",
            "address",
            &mac.to_string(),
            "mtu",
            mtu,
        ])?;
        if !self.booting {
            addr(&ns, &format!("{ip}/24"), "eth0")?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        if !self.booting {
            // (A booting VM's link comes up once its port is wired: `boot`.)
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        }
        if !self.booting {
            // A VM's NIC reader runs NAPI (a tap's reader would): veth needs
            // it to accept XDP-redirected frames. (Set on a link that is
            // down, it takes no effect when the link comes up: `boot`
            // sets it.)
            sh(&[
                "ip", "netns", "exec", &ns, "ethtool", "-K", "eth0", "gro", "on",
            ])?;
        }
        self.snapshot.ports.push(Port {
            name: name.to_string(),
            network: format!("{tenant}-{}", ["net", "db", "iso"][net as usize]),
            host: format!("hv{host}"),
            interface: port_if.clone(),
            mac,
            ips: vec![ip.into(), ip6.into()],
            security_groups: vec![format!("{tenant}-default")],
            allowed_address_pairs: vec![],
            port_security: true,
            hostname: self.booting.then(|| format!("{name}-vm")),
            instance_id: self.booting.then(|| format!("i-{name}")),
        });
        self.vms.push(Vm {
            name: name.to_string(),
            ns,
            host: format!("hv{host}"),
            tenant,
            port_if,
            mac,
            ip,
            ip6,
        });
        Ok(())
    }

    /// Routers, before agents or an apply: each tenant gets a second
    /// network, `{t}-db` (VNI 1101/1102, 10.1.0.0/24 and fd00:2::/64,
    /// gateway .1 and ::1), with VMs `{t}d1` on hv1 (10.1.0.11) and `{t}d2`
    /// on hv2 (10.1.0.12), the same addresses and MACs in both tenants, and
    /// a router `{t}-r` joining `{t}-net` (gateway 10.0.0.254, fd00:1::fe)
    /// and `{t}-db`. Tenant a also has `a-iso` (VNI 1201, 10.2.0.0/24) on no
    /// router, with VM ai1 on hv2 (10.2.0.21). Every VM routes through its
    /// gateway.
    pub fn add_routers(&mut self) -> Result<()> {
        if self.booting {
            bail!("add_routers is for a lab whose VMs have their addresses");
        }
        let net = |name: &str, tenant: &str, vni: u32, v4: &str, v6: &str, gws: [&str; 2]| {
            Ok::<_, anyhow::Error>(Network {
                name: name.into(),
                tenant: tenant.into(),
                vni,
                subnets: vec![v4.parse()?, v6.parse()?],
                mtu: 1450,
                gateway_ips: vec![gws[0].parse()?, gws[1].parse()?],
                dhcp: true,
                dns_servers: vec![],
                host_routes: vec![],
            })
        };
        for (t, vni) in [("a", 1101), ("b", 1102)] {
            let tenant = format!("tenant-{t}");
            let n = self
                .snapshot
                .networks
                .iter_mut()
                .find(|n| n.name == format!("{t}-net"))
                .expect("the lab's networks");
            n.gateway_ips = vec!["10.0.0.254".parse()?, "fd00:1::fe".parse()?];
            self.snapshot.networks.push(net(
                &format!("{t}-db"),
                &tenant,
                vni,
                "10.1.0.0/24",
                "fd00:2::/64",
                ["10.1.0.1", "fd00:2::1"],
            )?);
            self.snapshot.routers.push(cloison_dataplane::Router {
                name: format!("{t}-r"),
                tenant,
                networks: vec![format!("{t}-net"), format!("{t}-db")],
                snat: false,
            });
            self.add_vm_in(&format!("{t}d1"), 1, 11, 1)?;
            self.add_vm_in(&format!("{t}d2"), 2, 12, 1)?;
        }
        self.snapshot.networks.push(net(
            "a-iso",
            "tenant-a",
            1201,
            "10.2.0.0/24",
            "fd00:3::/64",
            ["10.2.0.1", "fd00:3::1"],
        )?);
        self.add_vm_in("ai1", 2, 21, 2)?;
        for v in &self.vms {
            let (gw4, gw6) = match v.ip.octets()[1] {
                0 => ("10.0.0.254", "fd00:1::fe"),
                1 => ("10.1.0.1", "fd00:2::1"),
                _ => ("10.2.0.1", "fd00:3::1"),
            };
            sh(&["ip", "-n", &v.ns, "route", "add", "default", "via", gw4])?;
            sh(&[
                "ip", "-n", &v.ns, "-6", "route", "add", "default", "via", gw6,
            ])?;
        }
        Ok(())
    }

    /// The outside, after `add_routers` and before the agents: a namespace
    /// `out` whose bridge has 198.51.100.1/24 (the outside's server), each
    /// host plugged into it by `ext0` (198.51.100.1{i}/24: the host's
    /// `external_ip`, its agent's `--external-interface`); both tenants'
    /// routers SNAT, and ad2 (hv2) has floating IP 198.51.100.20.
    pub fn add_outside(&mut self) -> Result<()> {
        if self.snapshot.routers.is_empty() {
            bail!("add_outside needs the routers of add_routers");
        }
        let out = self.add_ns("out")?;
        switch(&out)?;
        addr(&out, "198.51.100.1/24", "br0")?;
        for (i, host) in self.hosts.clone().iter().enumerate() {
            let (hv, dev) = (self.ns(host), format!("x{}", i + 1));
            sh(&[
                "ip", "-n", &out, "link", "add", &dev, "type", "veth", "peer", "name", "ext0",
                "netns", &hv,
            ])?;
            sh(&["ip", "-n", &out, "link", "set", &dev, "master", "br0", "up"])?;
            // A NIC's wire, as the uplink's.
            sh(&[
                "ip", "netns", "exec", &out, "ethtool", "-K", &dev, "gro", "on", "tx", "off",
            ])?;
            let ip = Ipv4Addr::new(198, 51, 100, 11 + i as u8);
            addr(&hv, &format!("{ip}/24"), "ext0")?;
            sh(&["ip", "-n", &hv, "link", "set", "ext0", "up"])?;
            self.snapshot
                .hosts
                .iter_mut()
                .find(|h| &h.name == host)
                .expect("the lab's host")
                .external_ip = Some(ip);
            self.agent_args
                .entry(host.clone())
                .or_default()
                .extend(["--external-interface".to_string(), "ext0".to_string()]);
        }
        for r in &mut self.snapshot.routers {
            r.snat = true;
        }
        self.snapshot
            .floating_ips
            .push(cloison_dataplane::FloatingIp {
                name: "ad2-fip".into(),
                tenant: "tenant-a".into(),
                ip: Ipv4Addr::new(198, 51, 100, 20),
                port: "ad2".into(),
            });
        Ok(())
    }

    /// A network beyond the outside, after `add_outside`: namespace `far`
    /// (203.0.113.1/24, MTU 1500) behind the outside, which routes to it
    /// over a link whose outside end has MTU 1280 (so the outside answers
    /// a larger packet with DF set with frag needed); the hosts route
    /// 203.0.113.0/24 via the outside (198.51.100.1).
    pub fn add_far_network(&mut self) -> Result<String> {
        let out = self.ns("out");
        let far = self.add_ns("far")?;
        sh(&[
            "ip", "-n", &out, "link", "add", "f0", "type", "veth", "peer", "name", "eth0", "netns",
            &far,
        ])?;
        sh(&["ip", "-n", &out, "link", "set", "f0", "mtu", "1280", "up"])?;
        addr(&out, "203.0.113.254/24", "f0")?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &out,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        addr(&far, "203.0.113.1/24", "eth0")?;
        sh(&["ip", "-n", &far, "link", "set", "eth0", "up"])?;
        sh(&[
            "ip",
            "-n",
            &far,
            "route",
            "add",
            "default",
            "via",
            "203.0.113.254",
        ])?;
        for host in self.hosts.clone() {
            sh(&[
                "ip",
                "-n",
                &self.ns(&host),
                "route",
                "add",
                "203.0.113.0/24",
                "via",
                "198.51.100.1",
                "dev",
                "ext0",
            ])?;
        }
        Ok(far)
    }

    /// A VM moves to `host` as in a live migration: its port's interface
    /// goes to that host's namespace (the VM keeps its eth0, addresses and
    /// neighbours) and its port object names the new host; `apply` next.
    pub fn move_vm(&mut self, name: &str, host: &str) -> Result<()> {
        let (from, to) = (self.ns(&self.vm(name).host), self.ns(host));
        let port_if = self.vm(name).port_if.clone();
        sh(&["ip", "-n", &from, "link", "set", &port_if, "netns", &to])?;
        sh(&["ip", "-n", &to, "link", "set", &port_if, "up"])?;
        if let Some(v) = self.vms.iter_mut().find(|v| v.name == name) {
            v.host = host.to_string();
        }
        let p = self
            .snapshot
            .ports
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow::anyhow!("no port {name}"))?;
        p.host = host.to_string();
        Ok(())
    }

    pub fn vm(&self, name: &str) -> &Vm {
        self.vms.iter().find(|v| v.name == name).expect("lab VM")
    }

    /// A host's pin directory name under `pin_root` (the agents pin under
    /// the host's own name, in a directory of this lab).
    fn pin_name(&self, host: &str) -> String {
        if self.agents_started() {
            host.to_string()
        } else {
            format!("{}-{host}", self.tag)
        }
    }

    fn agents_started(&self) -> bool {
        self.pin_root != std::path::Path::new(DEFAULT_PIN_ROOT)
    }

    /// Tenant a's groups for the security-group tests and demo: a1 serves
    /// TCP 8080-8081 to the members of `client` (a2), UDP 5353 to 10.0.0.3
    /// only, and ICMP to anyone; a3 is in `plain` (out only). Tenant b keeps
    /// its default group.
    pub fn web_and_client(&mut self) {
        let sg = |s: &str| serde_json::from_str::<SecurityGroup>(s).expect("group literal");
        let out = r#"{"direction": "egress"}, {"direction": "egress", "ethertype": "IPv6"}"#;
        self.snapshot.security_groups.extend([
            sg(&format!(
                r#"{{"name": "web", "tenant": "tenant-a", "rules": [
                {{"direction": "ingress", "protocol": "tcp", "ports": "8080-8081", "remote": {{"group": "client"}}}},
                {{"direction": "ingress", "protocol": "udp", "ports": "5353", "remote": {{"cidr": "10.0.0.3/32"}}}},
                {{"direction": "ingress", "protocol": "icmp"}}, {out}]}}"#
            )),
            sg(&format!(r#"{{"name": "client", "tenant": "tenant-a", "rules": [{out}]}}"#)),
            sg(&format!(r#"{{"name": "plain", "tenant": "tenant-a", "rules": [{out}]}}"#)),
        ]);
        self.set_groups(&[("a1", "web"), ("a2", "client"), ("a3", "plain")]);
    }

    /// Puts each named port in exactly the one group given.
    pub fn set_groups(&mut self, groups: &[(&str, &str)]) {
        for (port, group) in groups {
            let p = self
                .snapshot
                .ports
                .iter_mut()
                .find(|p| p.name == *port)
                .expect("lab port");
            p.security_groups = vec![group.to_string()];
        }
    }

    /// Forwarding entries in `host`'s kernel now (read through aya's typed
    /// map, not the agent).
    pub fn forward_entries(&self, host: &str) -> Result<usize> {
        let (pin, root) = (self.pin_name(host), self.pin_root.clone());
        in_netns(&self.ns(host), move || {
            Ok(Dataplane::open_maps(&pin, &root)?.tables()?.forward.len())
        })
    }

    /// What `host`'s programs stream to the monitor now.
    pub fn monitor_config(&self, host: &str) -> Result<cloison_abi::MonitorConfig> {
        let (pin, root) = (self.pin_name(host), self.pin_root.clone());
        in_netns(&self.ns(host), move || {
            Ok(Dataplane::open_maps(&pin, &root)?.monitor()?)
        })
    }

    /// Conntrack entries on `host` now.
    pub fn conntrack_entries(&self, host: &str) -> Result<usize> {
        let (pin, root) = (self.pin_name(host), self.pin_root.clone());
        in_netns(&self.ns(host), move || {
            Ok(Dataplane::open_maps(&pin, &root)?.conntrack()?.len())
        })
    }

    /// Turns IPv4 forwarding on or off on every host's uplink (the
    /// hosts' default is off). With it on, the encap stage's
    /// `bpf_fib_lookup` resolves the next hop and redirects straight to it;
    /// with it off the helper refuses and the kernel routes each packet
    /// after the program (`bpf_redirect_neigh`): about 10% fewer packets per
    /// second in the lab.
    pub fn uplink_forwarding(&self, on: bool) -> Result<()> {
        for host in &self.hosts {
            set_uplink_forwarding(&self.ns(host), on)?;
        }
        Ok(())
    }

    /// Programs every host with the lab's state: through the agents' API
    /// once they run, else straight through `dataplane`.
    pub fn apply(&mut self) -> Result<()> {
        if self.agents_started() {
            return self.apply_via_agents();
        }
        let valid = self.snapshot.validated()?;
        for host in self.hosts.clone() {
            let pin = self.pin_name(&host);
            if !self.pins.contains(&pin) {
                self.pins.push(pin.clone());
            }
            let (snap, root, hook) = (valid.clone(), self.pin_root.clone(), self.hook);
            in_netns(&self.ns(&host), move || {
                let mut dp = Dataplane::open(&pin, &root)?;
                dp.apply(&snap, &host, UPLINK, hook)?;
                Ok(())
            })?;
        }
        Ok(())
    }

    pub fn stats(&self, host: &str) -> Result<Stats> {
        let (pin, root) = (self.pin_name(host), self.pin_root.clone());
        in_netns(&self.ns(host), move || {
            Ok(Dataplane::open_maps(&pin, &root)?.stats()?)
        })
    }

    pub fn drops(&self, host: &str) -> Result<BTreeMap<DropReason, u64>> {
        Ok(self.stats(host)?.drops)
    }

    /// `ping` from one VM to an address; true when every echo was answered.
    pub fn ping(&self, from: &str, to: &str, count: u32) -> bool {
        ping_in(&self.vm(from).ns, to, count)
    }

    /// Adds a third host whose VTEP is the Linux kernel's own VXLAN device,
    /// with a "VM" address on it, joined to tenant a's network.
    pub fn add_kernel_vtep(&mut self) -> Result<()> {
        let ul = self.ns("ul");
        let kv = self.add_ns("kv")?;
        plug(&ul, "p3", &kv, underlay_ip(3), self.wire)?;
        sh(&[
            "ip",
            "-n",
            &kv,
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            "1001",
            "local",
            "192.0.2.3",
            "dstport",
            "4789",
            "nolearning",
            "dev",
            UPLINK,
        ])?;
        let mac = MacAddr([0x02, 0, 0, 0, 0, 9]);
        sh(&[
            "ip",
            "-n",
            &kv,
            "link",
            "set",
            "vx0",
            "address",
            &mac.to_string(),
            "mtu",
            "1450",
            "up",
        ])?;
        addr(&kv, "10.0.0.9/24", "vx0")?;
        // The kernel peer is told where tenant a's ports live, as a
        // controller would program it (no flooding, no learning).
        for v in self.vms.clone().iter().filter(|v| v.tenant == 'a') {
            let host_idx: usize = v.host[2..].parse()?;
            let dst = underlay_ip(host_idx).to_string();
            sh(&[
                "ip",
                "netns",
                "exec",
                &kv,
                "bridge",
                "fdb",
                "append",
                &v.mac.to_string(),
                "dev",
                "vx0",
                "dst",
                &dst,
            ])?;
            sh(&[
                "ip",
                "-n",
                &kv,
                "neigh",
                "add",
                &v.ip.to_string(),
                "lladdr",
                &v.mac.to_string(),
                "dev",
                "vx0",
                "nud",
                "permanent",
            ])?;
        }
        self.snapshot.hosts.push(Host {
            external_ip: None,
            encryption: Default::default(),
            name: "hv3".into(),
            underlay_ip: underlay_ip(3),
        });
        self.snapshot.ports.push(Port {
            name: "kv".into(),
            network: "a-net".into(),
            host: "hv3".into(),
            interface: "vx0".into(),
            mac,
            ips: vec!["10.0.0.9".parse()?],
            security_groups: vec!["a-default".into()],
            allowed_address_pairs: vec![],
            port_security: true,
            hostname: None,
            instance_id: None,
        });
        Ok(())
    }

    /// Removes every namespace and pin this lab made. Also run on drop.
    pub fn cleanup(&mut self) {
        self.agents.clear();
        self.charons.clear();
        self.etcd.clear();
        let _ = std::fs::remove_dir_all(self.agent_dir());
        for pin in self.pins.drain(..) {
            let _ = Dataplane::purge(&pin, &self.pin_root);
        }
        if self.agents_started() {
            for host in &self.hosts {
                let _ = Dataplane::purge(host, &self.pin_root);
            }
            let _ = std::fs::remove_dir(&self.pin_root);
        }
        self.namespaces.delete_all();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.cleanup();
    }
}
