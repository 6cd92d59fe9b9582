//! Real traffic between the lab's VMs: echoes, streams, floods, iperf3,
//! request/response latency.
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cloison_dataplane::netdev;

use super::*;

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

/// `ping` from a VM at a fixed rate in the background; the report of how
/// many came back.
pub fn ping_in_background(
    lab: &Lab,
    from: &str,
    to: &str,
    count: u32,
    interval: &str,
) -> std::process::Child {
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.vm(from).ns,
            "ping",
            "-q",
            "-i",
            interval,
            "-c",
        ])
        .arg(count.to_string())
        .args(["-W", "1", to])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping")
}

pub fn ping_result(child: std::process::Child) -> (u32, u32) {
    let out = child.wait_with_output().expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in {text}"));
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

/// A TCP server in namespace `ns` on `addr:port` that echoes `conns`
/// connections; joined, the peers it saw.
pub fn tcp_server_in(
    ns: &str,
    addr: &str,
    port: u16,
    conns: usize,
) -> std::thread::JoinHandle<Result<Vec<std::net::SocketAddr>>> {
    let (ns, addr) = (ns.to_string(), addr.to_string());
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        in_netns(&ns, move || {
            let l = std::net::TcpListener::bind((addr.as_str(), port))?;
            tx.send(()).ok();
            let mut peers = Vec::new();
            let mut streams = Vec::new();
            // All connections are accepted (held open together) first.
            for _ in 0..conns {
                let (s, peer) = l.accept()?;
                peers.push(peer);
                streams.push(s);
            }
            for mut s in streams {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf)?;
                s.write_all(&buf[..n])?;
            }
            Ok(peers)
        })
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("server listening");
    h
}

/// Connects from VM `vm` to `addr:port`; the stream, once connected.
pub fn connect_from(lab: &Lab, vm: &str, addr: &str, port: u16) -> Result<std::net::TcpStream> {
    let addr: std::net::SocketAddr = format!("{addr}:{port}").parse()?;
    in_netns(&lab.vm(vm).ns, move || {
        Ok(std::net::TcpStream::connect_timeout(
            &addr,
            Duration::from_secs(3),
        )?)
    })
}

pub fn echo(mut s: std::net::TcpStream, msg: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(msg).expect("write");
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).expect("echo");
    buf
}

/// A TCP echo from namespace `out` to `addr:port` (an address of VM `vm`
/// as the outside sees it, a floating IP), its server in the VM.
pub fn tcp_echo_from_ns(lab: &Lab, out: &str, addr: &str, vm: &str, port: u16) -> Result<Vec<u8>> {
    let ns = lab.vm(vm).ns.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        in_netns(&ns, move || {
            let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
            l.set_nonblocking(true)?;
            tx.send(()).ok();
            let end = std::time::Instant::now() + Duration::from_secs(3);
            loop {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false)?;
                        let mut buf = [0u8; 64];
                        let n = s.read(&mut buf)?;
                        s.write_all(&buf[..n])?;
                        return Ok(());
                    }
                    Err(_) if std::time::Instant::now() < end => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        })
    });
    rx.recv_timeout(Duration::from_secs(5))?;
    let addr: std::net::SocketAddr = format!("{addr}:{port}").parse()?;
    let got = in_netns(out, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"outside")?;
        let mut buf = vec![0u8; 7];
        s.read_exact(&mut buf)?;
        Ok(buf)
    });
    let _ = server.join();
    got
}

/// `traceroute -n` from VM `from` to `to` (UDP probes, one per hop, 4 hops
/// at most): each hop's address, `*` for none.
pub fn traceroute(lab: &Lab, from: &str, to: &str) -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.vm(from).ns,
            "traceroute",
            "-n",
            "-q",
            "1",
            "-w",
            "1",
            "-m",
            "4",
            to,
        ])
        .output()
        .context("traceroute (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!("traceroute: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect())
}
