//! A real etcd server for a test or a bench: one member on loopback, on
//! ports the system picks, its data in a directory of its own; stopped by
//! its process id (and its directory removed) when dropped.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct LocalEtcd {
    child: Child,
    dir: PathBuf,
    /// Its client URL (`http://127.0.0.1:PORT`, or `https://` with TLS).
    pub url: String,
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

impl LocalEtcd {
    /// Starts one in `dir` with `extra` flags (`https` makes its client URL
    /// https: give the certificate flags in `extra`); waits until it
    /// accepts connections.
    pub fn start(dir: &Path, https: bool, extra: &[&str]) -> Result<LocalEtcd, String> {
        if Command::new("etcd").arg("--version").output().is_err() {
            return Err(
                "no etcd server on this machine: `cargo xtask setup` installs Debian's etcd-server"
                    .into(),
            );
        }
        let (cport, pport) = (free_port()?, free_port()?);
        let scheme = if https { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{cport}");
        let peer = format!("http://127.0.0.1:{pport}");
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--logger", "zap", "--log-outputs"])
            .arg(dir.join("etcd.log"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start etcd: {e}"))?;
        let e = LocalEtcd {
            child,
            dir: dir.to_path_buf(),
            url,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", cport)).is_err() {
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd did not come up: {}",
                    std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(e)
    }
}
