//! VMs booting as cloud images do (a lab made by `two_hosts_booting`):
//! their link comes up once their port is wired, and real clients
//! configure them from the gateway services: busybox's `udhcpc` or ISC's
//! `dhclient` for IPv4, the kernel's SLAAC for IPv6, `curl` for metadata.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::*;

/// udhcpc's hook, as a minimal cloud image has one: applies the lease
/// (address, MTU, classless routes or the router) and logs what it got.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  deconfig)
    ip addr flush dev "$interface" scope global
    ip link set "$interface" up ;;
  bound|renew)
    echo "$1 ip=$ip mask=$mask router=$router dns=$dns hostname=$hostname mtu=$mtu serverid=$serverid lease=$lease staticroutes=$staticroutes" >> "$CLOISON_LOG"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    ip addr replace "$ip/$mask" dev "$interface"
    if [ -n "$staticroutes" ]; then
      set -- $staticroutes
      while [ $# -ge 2 ]; do
        dst=$1; [ "$dst" = 0.0.0.0/0 ] && dst=default
        if [ "$2" = 0.0.0.0 ]; then ip route replace "$dst" dev "$interface"
        else ip route replace "$dst" via "$2" dev "$interface"; fi
        shift 2
      done
    elif [ -n "$router" ]; then
      ip route replace default via "${router%% *}" dev "$interface"
    fi ;;
  nak) echo "nak" >> "$CLOISON_LOG" ;;
esac
exit 0
"#;

/// Where `ip netns exec` finds a namespace's own /etc files.
const NETNS_ETC: &str = "/etc/netns";
/// Whether this process made `NETNS_ETC` (then it removes it when done).
static MADE_NETNS_ETC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A DHCP client running in a VM, stopped (by its process id) on drop.
pub struct DhcpClient {
    child: Option<Child>,
    pid_file: Option<PathBuf>,
    /// What the udhcpc hook logged (one line per lease event).
    pub log: PathBuf,
    netns_etc: Option<PathBuf>,
}

impl DhcpClient {
    /// The lines the hook logged so far.
    pub fn events(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Asks the client to renew now (udhcpc: SIGUSR1, a unicast REQUEST
    /// to the server).
    pub fn renew(&self) -> Result<()> {
        let child = self.child.as_ref().context("a client kept running")?;
        if unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) } != 0 {
            bail!("signal udhcpc: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for DhcpClient {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = self
            .pid_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if let Some(d) = &self.netns_etc {
            let _ = std::fs::remove_dir_all(d);
            if MADE_NETNS_ETC.load(std::sync::atomic::Ordering::Relaxed) {
                // The last client out removes /etc/netns too (it fails
                // while another's directory is still in it).
                let _ = std::fs::remove_dir(NETNS_ETC);
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Lab {
    /// Brings a booting VM's link up: its kernel starts IPv6 (link-local
    /// address, router solicitations).
    pub fn boot(&self, vm: &str) -> Result<()> {
        let ns = &self.vm(vm).ns;
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        // NAPI on the VM's side, as a tap's reader runs it (XDP-redirected
        // frames need it): only a link that is up takes it.
        sh(&[
            "ip", "netns", "exec", ns, "ethtool", "-K", "eth0", "gro", "on",
        ])?;
        Ok(())
    }

    fn client_file(&self, vm: &str, what: &str) -> PathBuf {
        std::env::temp_dir().join(format!("{}-{vm}-{what}", self.tag))
    }

    /// Runs busybox's udhcpc on the VM's eth0 until it is bound (or fails
    /// after a few tries); with `keep`, it stays running to renew.
    pub fn udhcpc(&self, vm: &str, keep: bool) -> Result<DhcpClient> {
        let script = self.client_file(vm, "udhcpc.sh");
        std::fs::write(&script, UDHCPC_SCRIPT)?;
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let log = self.client_file(vm, "udhcpc.log");
        let _ = std::fs::remove_file(&log);
        let ns = self.vm(vm).ns.clone();
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns", "exec", &ns, "busybox", "udhcpc", "-i", "eth0", "-f",
        ])
        .args(["-s", &script.display().to_string()])
        .args(["-t", "5", "-T", "1", "-n"])
        .args([
            "-O",
            "staticroutes",
            "-O",
            "mtu",
            "-O",
            "hostname",
            "-O",
            "dns",
        ])
        .env("CLOISON_LOG", &log)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if !keep {
            cmd.arg("-q");
            let ok = cmd.status().context("run busybox udhcpc")?.success();
            if !ok {
                bail!("udhcpc in {vm} got no lease");
            }
            return Ok(DhcpClient {
                child: None,
                pid_file: None,
                log,
                netns_etc: None,
            });
        }
        let client = DhcpClient {
            child: Some(cmd.spawn().context("start busybox udhcpc")?),
            pid_file: None,
            log,
            netns_etc: None,
        };
        let end = Instant::now() + Duration::from_secs(10);
        while !client.events().iter().any(|e| e.starts_with("bound")) {
            if Instant::now() > end {
                bail!("udhcpc in {vm} was not bound within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(client)
    }

    /// Runs ISC's dhclient with Debian's own hook script on the VM's eth0
    /// until bound. It cannot touch the machine: it runs with a UTS
    /// namespace of its own (hostname) and the VM's own resolv.conf
    /// (`ip netns exec` mounts /etc/netns/NS/ over /etc).
    pub fn dhclient(&self, vm: &str) -> Result<DhcpClient> {
        let ns = self.vm(vm).ns.clone();
        if !std::path::Path::new(NETNS_ETC).exists() {
            std::fs::create_dir(NETNS_ETC)?;
            MADE_NETNS_ETC.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let etc = PathBuf::from(NETNS_ETC).join(&ns);
        std::fs::create_dir_all(&etc)?;
        std::fs::write(etc.join("resolv.conf"), "")?;
        let lease = self.client_file(vm, "dhclient.leases");
        let pid = self.client_file(vm, "dhclient.pid");
        let client = DhcpClient {
            child: None,
            pid_file: Some(pid.clone()),
            log: lease.clone(),
            netns_etc: Some(etc),
        };
        let out = Command::new("ip")
            .args([
                "netns", "exec", &ns, "unshare", "--uts", "dhclient", "-1", "-v",
            ])
            .args(["-lf", &lease.display().to_string()])
            .args(["-pf", &pid.display().to_string()])
            .arg("eth0")
            .output()
            .context("run dhclient")?;
        if !out.status.success() {
            bail!(
                "dhclient in {vm} got no lease: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(client)
    }

    /// What `ip` says of the VM's eth0: (addresses, routes, MTU), IPv4
    /// with `-4`, IPv6 with `-6`.
    pub fn vm_config(&self, vm: &str, family: &str) -> Result<(String, String, u32)> {
        let ns = &self.vm(vm).ns;
        let addrs = sh(&["ip", "-n", ns, family, "addr", "show", "dev", "eth0"])?;
        let routes = sh(&["ip", "-n", ns, family, "route", "show"])?;
        let link = sh(&["ip", "-n", ns, "link", "show", "dev", "eth0"])?;
        let mtu = link
            .split_whitespace()
            .skip_while(|w| *w != "mtu")
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        Ok((addrs, routes, mtu))
    }

    /// The VM's HTTP GET of `path` from the metadata service (curl).
    pub fn metadata(&self, vm: &str, path: &str) -> Result<String> {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.vm(vm).ns,
            "curl",
            "-sS",
            "--fail",
            "-m",
            "5",
            &format!("http://169.254.169.254{path}"),
        ])
    }
}

/// A stand-in for the cloud's metadata service (Nova's), on loopback in a
/// host's namespace: records each request's head and answers with the
/// instance id the request named. Stopped on drop.
pub struct MetadataUpstream {
    pub port: u16,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for MetadataUpstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Lab {
    pub fn metadata_upstream(&self, host: &str) -> Result<MetadataUpstream> {
        use std::io::{Read, Write};
        let ns = self.ns(host);
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (seen, stopped) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            let listener = cloison_dataplane::netdev::enter_netns(&ns)
                .map_err(anyhow::Error::from)
                .and_then(|()| Ok(std::net::TcpListener::bind("127.0.0.1:0")?));
            let listener = match listener {
                Ok(l) => l,
                Err(e) => return tx.send(Err(e)).unwrap_or(()),
            };
            let _ = listener.set_nonblocking(true);
            let _ = tx.send(Ok(listener.local_addr().map(|a| a.port()).unwrap_or(0)));
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let id = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-instance-id: "))
                    .unwrap_or("none")
                    .to_string();
                seen.lock().expect("requests").push(head);
                let body = format!("upstream for {id}");
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let port = rx.recv()??;
        Ok(MetadataUpstream {
            port,
            requests,
            stop,
        })
    }
}
