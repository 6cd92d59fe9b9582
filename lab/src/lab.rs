//! The netns lab: hypervisor hosts, VMs and an underlay switch, each a
//! network namespace this code creates (unique names) and removes on drop,
//! also after a failure. Nothing touches the machine's own interfaces.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cloison_abi::DropReason;
use cloison_dataplane::{
    loader::DEFAULT_PIN_ROOT, netdev, snapshot::MacAddr, Dataplane, Host, Network, Port,
    SecurityGroup, Snapshot, Stats, UplinkHook,
};

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Network namespaces made by the lab, deleted (last made first) on drop.
#[derive(Default)]
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, ns: &str) -> Result<()> {
        sh(&["ip", "netns", "add", ns])?;
        self.0.push(ns.to_string());
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn delete_all(&mut self) {
        for ns in self.0.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.delete_all();
    }
}

/// A Linux bridge `br0` in namespace `ns`, up: the underlay switch, or a
/// kernel-baseline host's bridge.
fn switch(ns: &str) -> Result<()> {
    sh(&["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])?;
    sh(&["ip", "-n", ns, "link", "set", "br0", "up"])?;
    // A switch, not a firewall: bridged frames skip the IP hooks
    // (br_netfilter is built into this kernel and on by default). The
    // kernel baseline turns them back on where its nftables rules need them.
    for family in ["iptables", "ip6tables", "arptables"] {
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("net.bridge.bridge-nf-call-{family}=0"),
        ])?;
    }
    Ok(())
}

fn set_uplink_forwarding(host_ns: &str, on: bool) -> Result<()> {
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
fn plug(ns: &str, dev: &str, host_ns: &str, addr: Ipv4Addr, wire: Wire) -> Result<()> {
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

/// A `cloisond` the lab runs for one host, in that host's namespace.
pub struct AgentProc {
    pub host: String,
    pub socket: PathBuf,
    child: std::process::Child,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cloisond binary built beside the running one (target/<profile>/),
/// or $CLOISOND.
pub fn cloisond_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CLOISOND") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join("cloisond");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "no cloisond binary near {} (cargo build -p cloison-control, or set CLOISOND)",
        exe.display()
    )
}

pub struct Lab {
    pub tag: String,
    /// Agents by host, once `start_agents` ran.
    pub agents: Vec<AgentProc>,
    pub hosts: Vec<String>,
    pub vms: Vec<Vm>,
    pub snapshot: Snapshot,
    namespaces: Namespaces,
    pins: Vec<String>,
    pub pin_root: PathBuf,
    pub hook: UplinkHook,
    pub wire: Wire,
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
        let mut lab = Lab {
            tag: Self::tag(),
            hosts: Vec::new(),
            vms: Vec::new(),
            snapshot: Snapshot::default(),
            namespaces: Namespaces::default(),
            pins: Vec::new(),
            agents: Vec::new(),
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            hook,
            wire,
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
            name: name.clone(),
            underlay_ip: underlay_ip(i),
        });
        self.hosts.push(name);
        Ok(())
    }

    fn add_vm(&mut self, name: &str, host: usize, idx: u8) -> Result<()> {
        let tenant = name.chars().next().unwrap_or('a');
        let hv = self.ns(&format!("hv{host}"));
        let ns = self.add_ns(name)?;
        let port_if = format!("t{name}");
        let mac = MacAddr([0x02, 0, 0, 0, 0, idx]);
        let ip = Ipv4Addr::new(10, 0, 0, idx);
        let ip6: std::net::Ipv6Addr = format!("fd00:1::{idx}").parse()?;
        sh(&[
            "ip", "-n", &hv, "link", "add", &port_if, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        sh(&["ip", "-n", &hv, "link", "set", &port_if, "up"])?;
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
            "1450",
        ])?;
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ])?;
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
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        // A VM's NIC reader runs NAPI (a tap's reader would): veth needs it
        // to accept XDP-redirected frames.
        sh(&[
            "ip", "netns", "exec", &ns, "ethtool", "-K", "eth0", "gro", "on",
        ])?;
        self.snapshot.ports.push(Port {
            name: name.to_string(),
            network: format!("{tenant}-net"),
            host: format!("hv{host}"),
            interface: port_if.clone(),
            mac,
            ips: vec![ip.into(), ip6.into()],
            security_groups: vec![format!("{tenant}-default")],
            allowed_address_pairs: vec![],
            port_security: true,
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
        let ns = &self.vm(from).ns;
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
        sh(&["ip", "-n", &kv, "addr", "add", "10.0.0.9/24", "dev", "vx0"])?;
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
        });
        Ok(())
    }

    /// Where the agents of this lab keep their sockets and stores.
    fn agent_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}-agents", self.tag))
    }

    /// Starts a `cloisond` for every host, in its namespace, its pins under
    /// a directory of this lab. From then on the lab's state goes through
    /// their API ([`Lab::apply_via_agents`]).
    pub fn start_agents(&mut self) -> Result<()> {
        if !self.pins.is_empty() {
            bail!("this lab was programmed directly already: one way or the other");
        }
        self.pin_root = PathBuf::from(DEFAULT_PIN_ROOT).join(format!("{}-agents", self.tag));
        for host in self.hosts.clone() {
            let a = self.spawn_agent(&host)?;
            self.agents.push(a);
        }
        Ok(())
    }

    fn spawn_agent(&self, host: &str) -> Result<AgentProc> {
        use std::os::unix::process::CommandExt;
        let dir = self.agent_dir();
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join(format!("{host}.sock"));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(cloisond_path()?);
        cmd.args(["--name", host, "--uplink", UPLINK]);
        if self.hook != UplinkHook::Auto {
            // Auto is the default: the agents run with default flags.
            cmd.args(["--uplink-hook", self.hook.name()]);
        }
        cmd.arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--state-dir")
            .arg(dir.join(format!("{host}-state")))
            .arg("--pin-root")
            .arg(&self.pin_root)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null());
        let ns = self.ns(host);
        // In the host's network namespace, and ours for mounts (bpffs).
        unsafe {
            cmd.pre_exec(move || netdev::enter_netns(&ns));
        }
        let child = cmd.spawn().context("start cloisond")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("cloisond for {host} did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(AgentProc {
            host: host.to_string(),
            socket,
            child,
        })
    }

    pub fn agent_client(&self, host: &str) -> cloison_control::client::Client {
        let a = self
            .agents
            .iter()
            .find(|a| a.host == host)
            .expect("an agent for this host");
        cloison_control::client::Client {
            endpoint: cloison_control::client::Endpoint::Unix(a.socket.clone()),
            token: None,
        }
    }

    /// SIGKILL the agent of `host` (its dataplane stays in the kernel).
    pub fn kill_agent(&mut self, host: &str) {
        self.agents.retain(|a| a.host != host);
    }

    /// Starts the agent of `host` again, on its store: it adopts the pinned
    /// maps and links and swaps in freshly loaded programs.
    pub fn restart_agent(&mut self, host: &str) -> Result<()> {
        let a = self.spawn_agent(host)?;
        self.agents.push(a);
        Ok(())
    }

    /// The lab's state as a list of API objects, each with its `kind`: what
    /// `cloisonctl apply -f` takes.
    pub fn objects_file(&self) -> Result<serde_json::Value> {
        let mut out = Vec::new();
        let snap = &self.snapshot;
        let mut add = |kind: &str, v: serde_json::Value| {
            let mut v = v;
            v["kind"] = kind.into();
            out.push(v);
        };
        for h in &snap.hosts {
            add("host", serde_json::to_value(h)?);
        }
        for n in &snap.networks {
            add("network", serde_json::to_value(n)?);
        }
        for g in &snap.security_groups {
            add("security-group", serde_json::to_value(g)?);
        }
        for p in &snap.ports {
            add("port", serde_json::to_value(p)?);
        }
        Ok(serde_json::Value::Array(out))
    }

    /// Sends every object of the lab's state to every agent, as an IaaS
    /// would, and waits until each has it in the kernel.
    pub fn apply_via_agents(&self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let snap = &self.snapshot;
        let mut objects: Vec<(&str, String, serde_json::Value)> = Vec::new();
        for h in &snap.hosts {
            objects.push(("hosts", h.name.clone(), serde_json::to_value(h)?));
        }
        for n in &snap.networks {
            objects.push(("networks", n.name.clone(), serde_json::to_value(n)?));
        }
        for g in &snap.security_groups {
            objects.push(("security-groups", g.name.clone(), serde_json::to_value(g)?));
        }
        for p in &snap.ports {
            objects.push(("ports", p.name.clone(), serde_json::to_value(p)?));
        }
        for a in &self.agents {
            let c = self.agent_client(&a.host);
            rt.block_on(async {
                // Groups may name groups put later: those are retried once
                // the others are in.
                for phase in ["hosts", "networks", "security-groups", "ports"] {
                    let mut todo: Vec<&(&str, String, serde_json::Value)> =
                        objects.iter().filter(|o| o.0 == phase).collect();
                    while !todo.is_empty() {
                        let mut left = Vec::new();
                        let mut last = None;
                        for o in &todo {
                            let (kind, name, body) = o;
                            let ans = c.put(&format!("/v1/{kind}/{name}"), body).await?;
                            if ans.status == 409 && *kind == "security-groups" {
                                left.push(*o);
                                last = Some(ans);
                            } else if !(200..300).contains(&ans.status) {
                                bail!(
                                    "{}: PUT {kind}/{name}: {} {}",
                                    a.host,
                                    ans.status,
                                    String::from_utf8_lossy(&ans.body)
                                );
                            }
                        }
                        if left.len() == todo.len() {
                            let ans = last.expect("a refusal");
                            bail!("{}: {}", a.host, String::from_utf8_lossy(&ans.body));
                        }
                        todo = left;
                    }
                }
                Ok(())
            })?;
            self.wait_agent(&a.host)?;
        }
        Ok(())
    }

    /// Waits until the agent of `host` has its desired generation in the kernel.
    pub fn wait_agent(&self, host: &str) -> Result<serde_json::Value> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let c = self.agent_client(host);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = rt.block_on(c.get("/v1/status"))?.json()?;
            if s["applied_generation"] == s["desired_generation"] && s["programs"] == "attached" {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("{host}: the agent never converged: {s}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes every namespace and pin this lab made. Also run on drop.
    pub fn cleanup(&mut self) {
        self.agents.clear();
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

/// A packet capture on a VM's eth0 (AF_PACKET), running until stopped.
pub struct Capture {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Result<Vec<Vec<u8>>>>>,
}

impl Capture {
    pub fn start(ns: &str) -> Result<Capture> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || -> Result<Vec<Vec<u8>>> {
            let ready = |r: Result<()>| {
                let ok = r.is_ok();
                let _ = tx.send(r);
                ok
            };
            if !ready(netdev::enter_netns(&ns).context("enter netns")) {
                return Ok(vec![]);
            }
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            if fd < 0 {
                ready(Err(std::io::Error::last_os_error().into()));
                return Ok(vec![]);
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
            }
            let _ = tx.send(Ok(()));
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                let n =
                    unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            unsafe { libc::close(fd) };
            Ok(frames)
        });
        rx.recv().context("capture thread")??;
        Ok(Capture {
            stop,
            handle: Some(handle),
        })
    }

    pub fn finish(mut self) -> Result<Vec<Vec<u8>>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow::anyhow!("capture panicked"))?
    }
}

pub fn contains(frame: &[u8], needle: &[u8]) -> bool {
    frame.windows(needle.len()).any(|w| w == needle)
}

/// A TCP exchange: a server in `to`'s VM echoes what a client in `from`'s
/// VM sends. Returns the echoed bytes.
pub fn tcp_echo(lab: &Lab, from: &str, to: &str, msg: &[u8]) -> Result<Vec<u8>> {
    let addr = lab.vm(to).ip.into();
    tcp_echo_to(lab, from, to, addr, 5001, msg, Duration::from_secs(5))
}

/// [`tcp_echo`] to `addr:port` (an address of `to`), giving up after `wait`:
/// an error when the security groups stop it.
pub fn tcp_echo_to(
    lab: &Lab,
    from: &str,
    to: &str,
    addr: IpAddr,
    port: u16,
    msg: &[u8],
    wait: Duration,
) -> Result<Vec<u8>> {
    let msg = msg.to_vec();
    let serve = move |ready: &dyn Fn()| -> Result<()> {
        let l = TcpListener::bind((addr, port))?;
        ready();
        l.set_nonblocking(true)?;
        let deadline = Instant::now() + wait + Duration::from_secs(1);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(e.into()),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(wait))?;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n])?;
        }
        Ok(())
    };
    let client = move || {
        let mut s = TcpStream::connect_timeout(&(addr, port).into(), wait)?;
        s.set_read_timeout(Some(wait))?;
        s.write_all(&msg)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        Ok(got)
    };
    exchange(&lab.vm(to).ns, serve, &lab.vm(from).ns, client)
}

/// Runs `serve` on a thread in namespace `server_ns` (it calls `ready` once
/// it listens), then `client` in `client_ns`; the client's result, once both
/// are done and the server went well too.
fn exchange<T: Send + 'static>(
    server_ns: &str,
    serve: impl FnOnce(&dyn Fn()) -> Result<()> + Send + 'static,
    client_ns: &str,
    client: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = server_ns.to_string();
    let server = std::thread::spawn(move || -> Result<()> {
        netdev::enter_netns(&ns)?;
        serve(&|| {
            tx.send(()).ok();
        })
    });
    rx.recv_timeout(Duration::from_secs(5))
        .context("server start")?;
    let got = in_netns(client_ns, client);
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))?;
    let got = got?;
    served?;
    Ok(got)
}

/// One UDP datagram each way between two VMs; returns the reply.
pub fn udp_echo(lab: &Lab, from: &str, to: &str, msg: &[u8]) -> Result<Vec<u8>> {
    let addr = lab.vm(to).ip.into();
    udp_echo_to(lab, from, to, addr, 5002, msg, Duration::from_secs(5))
}

/// [`udp_echo`] to `addr:port`, giving up after `wait`.
pub fn udp_echo_to(
    lab: &Lab,
    from: &str,
    to: &str,
    addr: IpAddr,
    port: u16,
    msg: &[u8],
    wait: Duration,
) -> Result<Vec<u8>> {
    let serve = move |ready: &dyn Fn()| -> Result<()> {
        let s = UdpSocket::bind((addr, port))?;
        s.set_read_timeout(Some(wait + Duration::from_secs(1)))?;
        ready();
        let mut buf = [0u8; 2048];
        let (n, peer) = s.recv_from(&mut buf)?;
        s.send_to(&buf[..n], peer)?;
        Ok(())
    };
    let msg = msg.to_vec();
    let client = move || {
        let any: IpAddr = if addr.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        let s = UdpSocket::bind((any, 0))?;
        s.set_read_timeout(Some(wait))?;
        s.send_to(&msg, (addr, port))?;
        let mut buf = [0u8; 2048];
        let (n, _) = s.recv_from(&mut buf)?;
        Ok(buf[..n].to_vec())
    };
    exchange(&lab.vm(to).ns, serve, &lab.vm(from).ns, client)
}

/// A TCP stream that keeps running: a client in one VM writes small chunks
/// as fast as the connection takes them, a server in another counts them.
pub struct TcpStreamProbe {
    received: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl TcpStreamProbe {
    pub fn start(lab: &Lab, from: &str, to: &str, port: u16) -> Result<TcpStreamProbe> {
        let addr = lab.vm(to).ip;
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (server_ns, client_ns) = (lab.vm(to).ns.clone(), lab.vm(from).ns.clone());
        let (count, done) = (received.clone(), stop.clone());
        let server = std::thread::spawn(move || {
            let run = || -> Result<()> {
                netdev::enter_netns(&server_ns)?;
                let l = TcpListener::bind((addr, port))?;
                tx.send(()).ok();
                let (mut s, _) = l.accept()?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                let mut buf = vec![0u8; 65536];
                while !done.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            count.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(())
            };
            let _ = run();
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("stream server start")?;
        let done = stop.clone();
        let client = std::thread::spawn(move || {
            let run = || -> Result<()> {
                netdev::enter_netns(&client_ns)?;
                let mut s =
                    TcpStream::connect_timeout(&(addr, port).into(), Duration::from_secs(3))?;
                s.set_write_timeout(Some(Duration::from_millis(200)))?;
                let chunk = [0x5au8; 1024];
                while !done.load(Ordering::Relaxed) {
                    match s.write(&chunk) {
                        Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(())
            };
            let _ = run();
        });
        Ok(TcpStreamProbe {
            received,
            stop,
            threads: vec![server, client],
        })
    }

    /// Bytes the server has received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Bytes received during the next `d`.
    pub fn progress(&self, d: Duration) -> u64 {
        let before = self.received();
        std::thread::sleep(d);
        self.received() - before
    }
}

impl Drop for TcpStreamProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// An open TCP connection from VM `from` to VM `to` on `port`: the client
/// and the server's socket, usable from any thread (sockets keep their
/// namespace).
pub fn tcp_connection(
    lab: &Lab,
    from: &str,
    to: &str,
    port: u16,
) -> Result<(TcpStream, TcpStream)> {
    let addr = lab.vm(to).ip;
    let listener = in_netns(&lab.vm(to).ns, move || Ok(TcpListener::bind((addr, port))?))?;
    let accept = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let client = in_netns(&lab.vm(from).ns, move || {
        Ok(TcpStream::connect_timeout(
            &(addr, port).into(),
            Duration::from_secs(3),
        )?)
    })?;
    let server = accept
        .join()
        .map_err(|_| anyhow::anyhow!("accept panicked"))??;
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
    }
    Ok((client, server))
}

/// Sends one UDP datagram for each of `flows` distinct flows (source and
/// destination ports vary) from VM `from` to `addr`, as fast as it can.
pub fn udp_flood(lab: &Lab, from: &str, addr: Ipv4Addr, flows: u32) -> Result<()> {
    in_netns(&lab.vm(from).ns, move || {
        let sockets: Vec<UdpSocket> = (0..flows.div_ceil(60000))
            .map(|_| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
            .collect::<std::io::Result<_>>()?;
        for i in 0..flows {
            let s = &sockets[(i / 60000) as usize];
            let port = 1024 + (i % 60000) as u16;
            // A full socket buffer drops the datagram: fine for a flood.
            let _ = s.send_to(b"flood", (addr, port));
        }
        Ok(())
    })
}

/// iperf3 TCP throughput in Gbit/s between two namespaces, `secs` long.
pub fn iperf3(server_ns: &str, client_ns: &str, server_ip: &str, secs: u32) -> Result<f64> {
    let mut server = Command::new("ip")
        .args([
            "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5201",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            client_ns,
            "iperf3",
            "-c",
            server_ip,
            "-p",
            "5201",
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .output();
    let deadline = Instant::now() + Duration::from_secs(3);
    while server.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    if !out.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 JSON without end.sum_received: {}", v["error"]))?;
    anyhow::ensure!(
        bps > 0.0,
        "iperf3 carried nothing from {client_ns} to {server_ip}"
    );
    Ok(bps / 1e9)
}

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
        let b = etherparse::PacketBuilder::ethernet2(self.inner_src_mac, self.inner_dst_mac)
            .ipv4(self.inner_src.octets(), self.inner_dst.octets(), 64)
            .udp(40000, 7);
        let mut out = Vec::with_capacity(b.size(self.marker.len()));
        b.write(&mut out, &self.marker).expect("write to Vec");
        out
    }

    pub fn vxlan_payload(&self) -> Vec<u8> {
        let v = self.vni.to_be_bytes();
        let mut p = vec![self.flags, 0, 0, 0, v[1], v[2], v[3], 0];
        p.extend(self.inner());
        p
    }

    pub fn build_with_payload(&self, payload: &[u8]) -> Vec<u8> {
        let b =
            etherparse::PacketBuilder::ethernet2([0x02, 0xee, 0, 0, 0, 0x66], self.outer_dst_mac)
                .ipv4(self.outer_src.octets(), self.outer_dst.octets(), 64)
                .udp(50000, cloison_abi::VXLAN_PORT);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("write to Vec");
        out
    }

    pub fn build(&self) -> Vec<u8> {
        self.build_with_payload(&self.vxlan_payload())
    }
}

/// Request/response latency (UDP, one byte each way, one at a time) from
/// namespace `client_ns` to `server_ip` in `server_ns`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Latency {
    pub round_trips: u32,
    pub p50_us: f64,
    pub p99_us: f64,
    pub per_second: f64,
}

pub fn udp_rr(
    client_ns: &str,
    server_ns: &str,
    server_ip: Ipv4Addr,
    round_trips: u32,
) -> Result<Latency> {
    let server = in_netns(server_ns, move || Ok(UdpSocket::bind((server_ip, 7007))?))?;
    server.set_read_timeout(Some(Duration::from_secs(2)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = stop.clone();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !done.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], peer);
            }
        }
    });
    let res = in_netns(client_ns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect((server_ip, 7007))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut buf = [0u8; 64];
        // Warm up: neighbours, conntrack, caches.
        for _ in 0..100 {
            s.send(b"x")?;
            s.recv(&mut buf)?;
        }
        let mut rtts = Vec::with_capacity(round_trips as usize);
        let start = Instant::now();
        for _ in 0..round_trips {
            let t = Instant::now();
            s.send(b"x")?;
            s.recv(&mut buf)?;
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let total = start.elapsed().as_secs_f64();
        rtts.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| rtts[((rtts.len() as f64 * p) as usize).min(rtts.len() - 1)];
        Ok(Latency {
            round_trips,
            p50_us: q(0.50),
            p99_us: q(0.99),
            per_second: round_trips as f64 / total,
        })
    });
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    res
}
