//! Network namespaces, veths and bridges a test makes: uniquely named by
//! the caller, removed on drop (last made first), also after a failure.
//! Nothing here touches the machine's own interfaces.
use std::process::Command;

pub use cloison_dataplane::netdev::enter_netns as enter;

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("run {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `sysctl -w` inside namespace `ns`.
pub fn sysctl(ns: &str, setting: &str) -> Result<(), String> {
    sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", setting]).map(drop)
}

/// Network namespaces made by a test, deleted (last made first) on drop.
#[derive(Default)]
pub struct Namespaces(Vec<String>);

impl Namespaces {
    /// Makes namespace `ns` with its loopback up.
    pub fn add(&mut self, ns: &str) -> Result<(), String> {
        sh(&["ip", "netns", "add", ns])?;
        self.0.push(ns.to_string());
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]).map(drop)
    }

    pub fn delete_all(&mut self) {
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

/// A veth pair `a` (in `ns`) and `b` (in `peer_ns`), both up.
pub fn veth(ns: &str, a: &str, peer_ns: &str, b: &str) -> Result<(), String> {
    sh(&[
        "ip", "-n", ns, "link", "add", a, "type", "veth", "peer", "name", b, "netns", peer_ns,
    ])?;
    sh(&["ip", "-n", ns, "link", "set", a, "up"])?;
    sh(&["ip", "-n", peer_ns, "link", "set", b, "up"]).map(drop)
}

/// A Linux bridge `name` in `ns`, up, that bridges without the IP hooks
/// (br_netfilter is built into this kernel and on by default): a switch,
/// not a firewall.
pub fn bridge(ns: &str, name: &str) -> Result<(), String> {
    sh(&["ip", "-n", ns, "link", "add", name, "type", "bridge"])?;
    sh(&["ip", "-n", ns, "link", "set", name, "up"])?;
    for family in ["iptables", "ip6tables", "arptables"] {
        sysctl(ns, &format!("net.bridge.bridge-nf-call-{family}=0"))?;
    }
    Ok(())
}

/// Runs `f` on a thread inside network namespace `ns` and returns its result.
pub fn in_netns<T: Send + 'static, E: From<String> + Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns).map_err(|e| E::from(format!("enter netns {ns}: {e}")))?;
        f()
    })
    .join()
    .map_err(|_| E::from("a thread in a namespace panicked".to_string()))?
}

/// A tag unique to this process and moment, for names of namespaces.
pub fn tag(prefix: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{:x}", (std::process::id() ^ t) & 0xffff)
}
