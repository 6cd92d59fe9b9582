//! IPsec in the lab: a throwaway CA and a certificate per host made with
//! strongSwan's `pki`, and a real charon (kernel-libipsec) in each ipsec
//! host's namespace, which the host's agent drives over VICI. Each charon
//! runs in a mount namespace of its own with a private /run (its pid file
//! is fixed at build time), its VICI socket in the lab's directory; it is
//! stopped by its process id.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cloison_dataplane::snapshot::Encryption;

use super::*;

/// charon's strongSwan configuration for a Cloison host: ESP in charon
/// (kernel-libipsec, its TUN device `ipsec0`); peers' traffic selectors
/// that cover their own address allowed. kernel-libipsec installs a route
/// to each peer through `ipsec0` whatever `install_routes` says, in
/// charon's table (220), behind a rule of its own: that rule only applies
/// to packets with a firewall mark nothing sets, so no traffic of the host
/// (IKE, etcd, SSH, ping to the peer) ever takes it. The programs hand
/// VXLAN to the device themselves. The same as docs/encryption.md gives
/// operators, with the lab's paths.
pub fn strongswan_conf(vici: &Path, log: &Path) -> String {
    format!(
        r#"charon {{
    load = random nonce openssl kdf pem pkcs1 pkcs8 x509 revocation constraints pubkey kernel-libipsec kernel-netlink socket-default vici
    install_routes = no
    install_virtual_ip = no
    routing_table = 220
    filelog {{
        lab {{
            path = {log}
            default = 1
            time_format = %T
            flush_line = yes
        }}
    }}
    plugins {{
        vici {{
            socket = unix://{vici}
        }}
        kernel-libipsec {{
            allow_peer_ts = yes
        }}
        kernel-netlink {{
            fwmark = {UNUSED_MARK}
        }}
    }}
}}
"#,
        vici = vici.display(),
        log = log.display()
    )
}

/// The firewall mark of charon's routing rule: one no packet carries.
pub const UNUSED_MARK: &str = "0x4c150000/0xffff0000";

/// A charon the lab runs in a host's namespace.
pub struct Charon {
    pub host: String,
    pub vici: PathBuf,
    pub log: PathBuf,
    child: Child,
}

impl Charon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Charon {
    fn drop(&mut self) {
        // By its process id (SIGKILL: nothing of it must outlive the lab).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The files of the lab's PKI: the CA, and each host's certificate and key.
pub struct Pki {
    pub dir: PathBuf,
}

fn pki(args: &[&str], stdin: Option<&Path>, out: &Path) -> Result<()> {
    let mut cmd = Command::new("pki");
    cmd.args(args).stdout(Stdio::from(
        std::fs::File::create(out).with_context(|| format!("create {}", out.display()))?,
    ));
    if let Some(i) = stdin {
        cmd.stdin(Stdio::from(std::fs::File::open(i)?));
    }
    // (Its plugin loader's complaints, a TPM it does not need, only if it
    // fails.)
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .context("run pki (strongSwan's, package strongswan-pki)")?;
    if !out.status.success() {
        bail!(
            "pki {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Pki {
    /// A CA valid for a day.
    pub fn new(dir: &Path) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let p = Pki { dir: dir.into() };
        pki(
            &[
                "--gen",
                "--type",
                "ecdsa",
                "--size",
                "384",
                "--outform",
                "pem",
            ],
            None,
            &p.dir.join("ca.key"),
        )?;
        let key = p.dir.join("ca.key");
        pki(
            &[
                "--self",
                "--ca",
                "--lifetime",
                "1",
                "--in",
                &key.display().to_string(),
                "--type",
                "ecdsa",
                "--dn",
                "O=Cloison lab, CN=fleet CA",
                "--outform",
                "pem",
            ],
            None,
            &p.ca(),
        )?;
        Ok(p)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{host}.pem"))
    }

    pub fn key(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{host}.key"))
    }

    /// `host`'s key and certificate, its subjectAltName `ip`.
    pub fn issue(&self, host: &str, ip: Ipv4Addr) -> Result<()> {
        pki(
            &[
                "--gen",
                "--type",
                "ecdsa",
                "--size",
                "384",
                "--outform",
                "pem",
            ],
            None,
            &self.key(host),
        )?;
        let public = self.dir.join(format!("{host}.pub"));
        pki(
            &[
                "--pub",
                "--in",
                &self.key(host).display().to_string(),
                "--type",
                "ecdsa",
            ],
            None,
            &public,
        )?;
        pki(
            &[
                "--issue",
                "--lifetime",
                "1",
                "--cacert",
                &self.ca().display().to_string(),
                "--cakey",
                &self.dir.join("ca.key").display().to_string(),
                "--dn",
                &format!("O=Cloison lab, CN={host}"),
                "--san",
                &ip.to_string(),
                "--flag",
                "serverAuth",
                "--flag",
                "clientAuth",
                "--outform",
                "pem",
            ],
            Some(&public),
            &self.cert(host),
        )
    }
}

/// The charon binary (Debian's strongswan-charon).
pub fn charon_path() -> Result<PathBuf> {
    for p in ["/usr/lib/ipsec/charon", "/usr/libexec/ipsec/charon"] {
        if Path::new(p).is_file() {
            return Ok(p.into());
        }
    }
    bail!("no charon (install strongswan-charon and libcharon-extra-plugins: `cargo xtask setup`)")
}

impl Lab {
    fn ipsec_dir(&self) -> PathBuf {
        self.agent_dir().join("ipsec")
    }

    /// Makes `hosts` ipsec hosts: `encryption: ipsec` in their objects, a
    /// certificate each from the lab's CA, a charon in each one's
    /// namespace, and the `--ipsec-*` flags for their agents (started
    /// after this).
    pub fn enable_ipsec(&mut self, hosts: &[&str]) -> Result<()> {
        let dir = self.ipsec_dir();
        let pki = Pki::new(&dir)?;
        // Networks whose traffic is encrypted fit the IPsec device: the
        // networks' MTU, and the VMs' links as DHCP would set them.
        let mtu = cloison_dataplane::validate::MAX_MTU_IPSEC;
        for n in &mut self.snapshot.networks {
            n.mtu = mtu;
        }
        for vm in &self.vms {
            sh(&[
                "ip",
                "-n",
                &vm.ns,
                "link",
                "set",
                "eth0",
                "mtu",
                &mtu.to_string(),
            ])?;
        }
        for host in hosts {
            let Some(h) = self.snapshot.hosts.iter_mut().find(|h| h.name == *host) else {
                bail!("no host {host} in the lab");
            };
            h.encryption = Encryption::Ipsec;
            pki.issue(host, h.underlay_ip)?;
            let charon = self.start_charon(host)?;
            self.agent_args
                .entry(host.to_string())
                .or_default()
                .extend([
                    "--ipsec-cert".to_string(),
                    pki.cert(host).display().to_string(),
                    "--ipsec-key".into(),
                    pki.key(host).display().to_string(),
                    "--ipsec-ca".into(),
                    pki.ca().display().to_string(),
                    "--ipsec-vici".into(),
                    charon.vici.display().to_string(),
                ]);
            self.charons.push(charon);
        }
        Ok(())
    }

    /// Starts charon in `host`'s namespace (again, if it ran: its SAs are
    /// then gone until the agent loads its connections again).
    pub fn start_charon(&mut self, host: &str) -> Result<Charon> {
        self.charons.retain(|c| c.host != host);
        let dir = self.ipsec_dir();
        std::fs::create_dir_all(&dir)?;
        let vici = dir.join(format!("{host}.vici"));
        let log = dir.join(format!("{host}-charon.log"));
        let conf = dir.join(format!("{host}-strongswan.conf"));
        let _ = std::fs::remove_file(&vici);
        std::fs::write(&conf, strongswan_conf(&vici, &log))?;
        // `ip netns exec` and `unshare` exec in turn, and so does the
        // shell: the child's pid is charon's.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "unshare", "-m", "sh", "-c"])
            .arg(format!(
                "mount --make-rprivate / && mount -t tmpfs tmpfs /run && exec {}",
                charon_path()?.display()
            ))
            .env("STRONGSWAN_CONF", &conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start charon")?;
        let mut c = Charon {
            host: host.into(),
            vici: vici.clone(),
            log,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vici.exists() {
            if let Ok(Some(st)) = c.child.try_wait() {
                bail!(
                    "charon for {host} exited ({st}): {}",
                    std::fs::read_to_string(&c.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("charon for {host} did not open {}", vici.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The device appears as the plugin loads; wait for it too.
        let ns = self.ns(host);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !in_netns(&ns, || {
            Ok(cloison_dataplane::netdev::ifindex("ipsec0").is_some())
        })? {
            if Instant::now() > deadline {
                bail!("charon for {host} made no ipsec0");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing_pid(host, c.pid());
        Ok(c)
    }

    /// Stops `host`'s charon (by its pid).
    pub fn stop_charon(&mut self, host: &str) {
        self.charons.retain(|c| c.host != host);
    }

    /// charon's log for `host` (what a failing test shows).
    pub fn charon_log(&self, host: &str) -> String {
        std::fs::read_to_string(self.ipsec_dir().join(format!("{host}-charon.log")))
            .unwrap_or_default()
    }

    /// `swanctl` against `host`'s charon.
    pub fn swanctl(&self, host: &str, args: &[&str]) -> Result<String> {
        let vici = self.ipsec_dir().join(format!("{host}.vici"));
        let out = Command::new("swanctl")
            .args(args)
            .args(["--uri", &format!("unix://{}", vici.display())])
            .output()
            .context("run swanctl (package strongswan-swanctl)")?;
        if !out.status.success() {
            bail!(
                "swanctl {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn tracing_pid(host: &str, pid: u32) {
    if std::env::var_os("CLOISON_LAB_VERBOSE").is_some() {
        eprintln!("lab: charon for {host} is pid {pid}");
    }
}
