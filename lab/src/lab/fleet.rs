//! Fleet mode in the lab: a real etcd (one member, or a cluster of three)
//! in a namespace of its own on the underlay switch, and the hosts' agents
//! on it (`--store etcd`). etcd members are started and stopped by their
//! process id; their data lives in the lab's agent directory.
use std::{
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cloison_dataplane::netdev;

use super::*;

/// Where etcd listens on the underlay.
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);

/// One etcd member the lab runs.
pub struct EtcdMember {
    pub name: String,
    pub client_url: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl EtcdMember {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Lab {
    /// Starts an etcd cluster of `members` in namespace `etcd`, plugged into
    /// the underlay switch at [`ETCD_IP`]; waits until it answers.
    pub fn start_etcd(&mut self, members: usize) -> Result<()> {
        if !self.etcd.is_empty() {
            bail!("etcd runs already");
        }
        if Command::new("etcd").arg("--version").output().is_err() {
            bail!(
                "no etcd server on this machine: `cargo xtask setup` installs Debian's etcd-server"
            );
        }
        let ul = self.ns("ul");
        let ns = self.add_ns("etcd")?;
        plug(&ul, "p8", &ns, ETCD_IP, self.wire)?;
        let peer = |i: usize| format!("http://{ETCD_IP}:{}", 23800 + i);
        let cluster: Vec<String> = (0..members).map(|i| format!("m{i}={}", peer(i))).collect();
        for i in 0..members {
            let dir = self.agent_dir().join(format!("etcd-m{i}"));
            std::fs::create_dir_all(&dir)?;
            let client_url = format!("http://{ETCD_IP}:{}", 23790 + i);
            let args = vec![
                "--name".into(),
                format!("m{i}"),
                "--data-dir".into(),
                dir.display().to_string(),
                "--listen-client-urls".into(),
                client_url.clone(),
                "--advertise-client-urls".into(),
                client_url.clone(),
                "--listen-peer-urls".into(),
                peer(i),
                "--initial-advertise-peer-urls".into(),
                peer(i),
                "--initial-cluster".into(),
                cluster.join(","),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                self.tag.clone(),
                // Quick elections: a killed leader is replaced within a second.
                "--heartbeat-interval".into(),
                "50".into(),
                "--election-timeout".into(),
                "500".into(),
                // Room for the benchmark's transactions of 500 ports.
                "--max-txn-ops".into(),
                "1000".into(),
                "--logger".into(),
                "zap".into(),
                "--log-outputs".into(),
                dir.join("etcd.log").display().to_string(),
            ];
            self.etcd.push(EtcdMember {
                name: format!("m{i}"),
                client_url,
                args,
                child: None,
            });
            self.restart_etcd(i)?;
        }
        self.wait_etcd()
    }

    /// Starts member `i` again (on its data).
    pub fn restart_etcd(&mut self, i: usize) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let ns = self.ns("etcd");
        let m = &mut self.etcd[i];
        m.stop();
        let mut cmd = Command::new("etcd");
        cmd.args(&m.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        unsafe {
            cmd.pre_exec(move || netdev::enter_netns(&ns));
        }
        m.child = Some(cmd.spawn().context("start etcd")?);
        Ok(())
    }

    /// SIGKILL member `i`.
    pub fn kill_etcd(&mut self, i: usize) {
        self.etcd[i].stop();
    }

    /// Every member's client URL, comma-separated.
    pub fn etcd_endpoints(&self) -> String {
        self.etcd
            .iter()
            .map(|m| m.client_url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// etcdctl against the running members, in etcd's namespace.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let eps: Vec<&str> = self
            .etcd
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.as_str())
            .collect();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns("etcd"), "etcdctl"])
            .arg(format!("--endpoints={}", eps.join(",")))
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()?;
        if !out.status.success() {
            bail!(
                "etcdctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until etcd has a leader and answers.
    pub fn wait_etcd(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.etcdctl(&["endpoint", "status", "-w", "json"]) {
                Ok(s) if s.contains("\"leader\"") && !s.contains("\"leader\":0") => return Ok(()),
                r => {
                    if Instant::now() > deadline {
                        bail!("etcd never came up: {r:?}");
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the member that leads.
    pub fn etcd_leader(&self) -> Result<usize> {
        let s = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&s)?;
        for e in v.as_array().context("a list")? {
            let st = &e["Status"];
            if st["leader"].as_u64().is_some() && st["leader"] == st["header"]["member_id"] {
                let url = e["Endpoint"].as_str().unwrap_or_default();
                if let Some(i) = self.etcd.iter().position(|m| m.client_url == url) {
                    return Ok(i);
                }
            }
        }
        bail!("no leader among {s}")
    }

    /// The fleet's objects as etcd holds them: `{kind}/{name}` to the
    /// object's fields (a fresh list, with etcdctl).
    pub fn etcd_objects(&self) -> Result<BTreeMap<String, serde_json::Value>> {
        // Keys and values on lines of their own (the values are one-line JSON).
        let s = self.etcdctl(&["get", "--prefix", "/cloison/state/objects/"])?;
        let mut out = BTreeMap::new();
        let mut lines = s.lines();
        while let (Some(k), Some(v)) = (lines.next(), lines.next()) {
            let key = k.strip_prefix("/cloison/state/objects/").unwrap_or(k);
            out.insert(key.to_string(), serde_json::from_str(v)?);
        }
        Ok(out)
    }

    /// The state etcd holds, validated as an agent would.
    pub fn etcd_state(&self) -> Result<cloison_dataplane::validate::Valid> {
        let mut snap = Snapshot::default();
        for (key, v) in self.etcd_objects()? {
            let v = v.clone();
            match key.split_once('/').map(|(k, _)| k) {
                Some("hosts") => snap.hosts.push(serde_json::from_value(v)?),
                Some("networks") => snap.networks.push(serde_json::from_value(v)?),
                Some("security-groups") => snap.security_groups.push(serde_json::from_value(v)?),
                Some("ports") => snap.ports.push(serde_json::from_value(v)?),
                _ => bail!("unknown key {key}"),
            }
        }
        cloison_dataplane::validate::validate(snap).map_err(|v| anyhow::anyhow!("{v}"))
    }

    /// How many map entries `host`'s kernel lacks or has too many for
    /// `state` (0: it holds exactly that state), read in its namespace.
    pub fn drift(&self, host: &str, state: &cloison_dataplane::validate::Valid) -> Result<usize> {
        let (host, pins, state) = (host.to_string(), self.pin_root.clone(), state.clone());
        in_netns(&self.ns(&host), move || {
            let dp = Dataplane::open_maps(&host, &pins)?;
            Ok(dp.drift(&state, &host, UPLINK)?)
        })
    }

    /// The process id of `host`'s agent.
    pub fn agent_pid(&self, host: &str) -> u32 {
        self.agents
            .iter()
            .find(|a| a.host == host)
            .expect("an agent for this host")
            .pid()
    }

    /// Starts every host's agent in fleet mode, on the lab's etcd.
    pub fn start_fleet_agents(&mut self) -> Result<()> {
        if self.etcd.is_empty() {
            bail!("start etcd first");
        }
        self.fleet = Some(self.etcd_endpoints());
        self.start_agents()?;
        for a in &self.agents {
            self.wait_status(&a.host, "connected to etcd", |s| {
                s["store"] == "etcd: connected"
            })?;
        }
        Ok(())
    }

    /// The lab's state written through one agent only, as an IaaS talking
    /// to one agent of the fleet would; waits until every agent has in its
    /// kernel the generation of the last write.
    pub fn apply_via_fleet(&self, via: &str) -> Result<u64> {
        let generation = self.put_all(via)?;
        self.wait_fleet(generation)?;
        Ok(generation)
    }

    /// Waits until every agent's kernel holds `generation` (or later).
    pub fn wait_fleet(&self, generation: u64) -> Result<()> {
        for a in &self.agents {
            self.wait_status(&a.host, &format!("applied generation {generation}"), |s| {
                s["applied_generation"].as_u64() >= Some(generation) && s["programs"] == "attached"
            })?;
        }
        Ok(())
    }
}
