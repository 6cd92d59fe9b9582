//! The lab's agents: a real `cloisond` per host, in its namespace, driven
//! through its API as an IaaS would.
use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cloison_dataplane::{loader::DEFAULT_PIN_ROOT, netdev, UplinkHook};

use super::*;

/// A `cloisond` the lab runs for one host, in that host's namespace.
pub struct AgentProc {
    pub host: String,
    pub socket: PathBuf,
    child: std::process::Child,
}

impl AgentProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
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
    binary_path("cloisond", "CLOISOND")
}

/// The cloisonctl binary built beside the running one, or $CLOISONCTL.
pub fn cloisonctl_path() -> Result<PathBuf> {
    binary_path("cloisonctl", "CLOISONCTL")
}

fn binary_path(name: &str, var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "no {name} binary near {} (cargo build -p cloison-control --bins, or set {var})",
        exe.display()
    )
}

impl Lab {
    /// Where the agents of this lab keep their sockets and stores.
    pub(super) fn agent_dir(&self) -> PathBuf {
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
            .args(match &self.fleet {
                Some(eps) => vec![
                    "--store".to_string(),
                    "etcd".into(),
                    "--etcd-endpoints".into(),
                    eps.clone(),
                ],
                None => vec![],
            })
            .args(self.agent_args.get(host).into_iter().flatten())
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

    /// `unix:SOCKET` of `host`'s agent.
    pub fn agent_endpoint(&self, host: &str) -> String {
        let a = self
            .agents
            .iter()
            .find(|a| a.host == host)
            .expect("an agent for this host");
        format!("unix:{}", a.socket.display())
    }

    /// Runs `cloisonctl` against `host`'s agent: (success, stdout, stderr).
    pub fn cloisonctl(&self, host: &str, args: &[&str]) -> Result<(bool, String, String)> {
        let out = Command::new(cloisonctl_path()?)
            .args(["--endpoint", &self.agent_endpoint(host)])
            .args(args)
            .output()
            .context("run cloisonctl")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// The agent of `host`'s `/metrics` text.
    pub fn agent_metrics(&self, host: &str) -> Result<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let c = self.agent_client(host);
        let ans = rt.block_on(c.get("/metrics"))?;
        Ok(String::from_utf8_lossy(&ans.body).into_owned())
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
        for r in &snap.routers {
            add("router", serde_json::to_value(r)?);
        }
        for f in &snap.floating_ips {
            add("floating-ip", serde_json::to_value(f)?);
        }
        Ok(serde_json::Value::Array(out))
    }

    /// Sends every object of the lab's state to every agent, as an IaaS
    /// would, and waits until each has it in the kernel.
    pub fn apply_via_agents(&self) -> Result<()> {
        for a in &self.agents {
            self.put_all(&a.host)?;
            self.wait_agent(&a.host)?;
        }
        Ok(())
    }

    /// Sends every object of the lab's state to the agent of `host`; the
    /// highest generation its answers gave.
    pub fn put_all(&self, host: &str) -> Result<u64> {
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
        for r in &snap.routers {
            objects.push(("routers", r.name.clone(), serde_json::to_value(r)?));
        }
        for f in &snap.floating_ips {
            objects.push(("floating-ips", f.name.clone(), serde_json::to_value(f)?));
        }
        let c = self.agent_client(host);
        rt.block_on(async {
            let mut generation = 0;
            // Groups may name groups put later: those are retried once
            // the others are in.
            for phase in [
                "hosts",
                "networks",
                "security-groups",
                "ports",
                "routers",
                "floating-ips",
            ] {
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
                                "{host}: PUT {kind}/{name}: {} {}",
                                ans.status,
                                String::from_utf8_lossy(&ans.body)
                            );
                        } else {
                            let g = ans.json()?["generation"].as_u64().unwrap_or(0);
                            generation = generation.max(g);
                        }
                    }
                    if left.len() == todo.len() {
                        let ans = last.expect("a refusal");
                        bail!("{host}: {}", String::from_utf8_lossy(&ans.body));
                    }
                    todo = left;
                }
            }
            Ok(generation)
        })
    }

    /// Waits until the agent of `host` has its desired generation in the kernel.
    pub fn wait_agent(&self, host: &str) -> Result<serde_json::Value> {
        self.wait_status(host, "converged", |s| {
            s["applied_generation"] == s["desired_generation"] && s["programs"] == "attached"
        })
    }

    /// Polls the status of `host`'s agent until `done` holds of it (20 s at
    /// most, then an error saying it never `what`); that status.
    pub fn wait_status(
        &self,
        host: &str,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let c = self.agent_client(host);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = rt.block_on(c.get("/v1/status"))?.json()?;
            if done(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("{host}: the agent never {what}: {s}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
