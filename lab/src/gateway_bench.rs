//! `cargo xtask bench --gateway`: the gateway services of one host's
//! cloisond, end to end in the netns lab (a VM's frames through the port
//! program, the service tap, the agent and back): DHCP transactions per
//! second and the agent's CPU per transaction, metadata requests per
//! second (one TCP connection each, sequential and 8 at once). The agent
//! runs with `--gateway-rate 0` so that the agent, not the per-port limit,
//! is measured. Results in benches/results/gateway.{json,md}.
use std::{
    io::{Read, Write},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cloison_dataplane::{netdev, UplinkHook};
use cloison_testkit::wire::build::{udp, v4};
use serde_json::json;

use crate::lab::{in_netns, Lab};

fn step(msg: &str) {
    println!("==> {msg}");
}

/// A DHCPDISCOVER from `mac` with transaction id `xid`.
fn discover(mac: [u8; 6], xid: u32) -> Vec<u8> {
    let mut m = vec![0u8; 240];
    m[0] = 1; // BOOTREQUEST
    m[1] = 1; // Ethernet
    m[2] = 6;
    m[4..8].copy_from_slice(&xid.to_be_bytes());
    m[28..34].copy_from_slice(&mac);
    m[236..240].copy_from_slice(&[99, 130, 83, 99]);
    m.extend([53, 1, 1, 255]);
    v4(mac, [0xff; 6], [0; 4], [255; 4], udp(68, 67, &m)).emit()
}

/// The transaction id of a DHCP answer (UDP 67 → 68) in `f`.
fn answer_xid(f: &[u8]) -> Option<u32> {
    if f.len() < 14 + 20 + 8 + 240 || f[12..14] != [8, 0] || f[23] != 17 {
        return None;
    }
    let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
    if f.get(l4..l4 + 4)? != [0, 67, 0, 68] {
        return None;
    }
    Some(u32::from_be_bytes(f[l4 + 12..l4 + 16].try_into().ok()?))
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("/proc stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// DHCP DISCOVERs from the VM in `ns` for `secs`, at most `window` without
/// an answer at a time: (transactions answered, elapsed).
fn dhcp_load(ns: &str, mac: [u8; 6], secs: f64, window: u32) -> Result<(u64, Duration)> {
    in_netns(ns, move || {
        let ifindex = netdev::ifindex("eth0").context("no eth0")?;
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                (libc::ETH_P_IP as u16).to_be() as i32,
            )
        };
        if fd < 0 {
            bail!("AF_PACKET: {}", std::io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let sa = &addr as *const libc::sockaddr_ll as *const libc::sockaddr;
        let salen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        if unsafe { libc::bind(fd, sa, salen) } != 0 {
            bail!("bind: {}", std::io::Error::last_os_error());
        }
        let (mut next, mut answered, mut outstanding) = (1u32, 0u64, 0u32);
        let mut buf = vec![0u8; 2048];
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        let mut last_progress = Instant::now();
        while Instant::now() < end {
            while outstanding < window {
                let f = discover(mac, next);
                unsafe { libc::sendto(fd, f.as_ptr().cast(), f.len(), 0, sa, salen) };
                next += 1;
                outstanding += 1;
            }
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                if answer_xid(&buf[..n as usize]).is_some_and(|x| x < next) {
                    answered += 1;
                    outstanding = outstanding.saturating_sub(1);
                    last_progress = Instant::now();
                }
            } else if last_progress.elapsed() > Duration::from_millis(200) {
                // Lost ones (a queue overflowed): not counted, the window
                // opens again.
                outstanding = 0;
                last_progress = Instant::now();
            }
        }
        unsafe { libc::close(fd) };
        Ok((answered, start.elapsed()))
    })
}

/// `n` HTTP GETs of the instance id from the VM in `ns`, one connection
/// each, by `clients` threads at once: elapsed.
fn metadata_load(ns: &str, n: usize, clients: usize) -> Result<Duration> {
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let ns = ns.to_string();
            std::thread::spawn(move || {
                in_netns(&ns, move || {
                    for i in 0..n / clients {
                        let mut s = std::net::TcpStream::connect_timeout(
                            &"169.254.169.254:80".parse()?,
                            Duration::from_secs(5),
                        )
                        .with_context(|| format!("connection {i}"))?;
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        s.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")?;
                        let mut answer = Vec::new();
                        s.read_to_end(&mut answer)?;
                        if !answer.starts_with(b"HTTP/1.1 200") {
                            bail!("answer: {}", String::from_utf8_lossy(&answer));
                        }
                    }
                    Ok(())
                })
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    Ok(start.elapsed())
}

pub fn run() -> Result<()> {
    step("lab: hv1's cloisond with --gateway-rate 0 (no per-port limit: the agent itself is measured), VM a1 booted with udhcpc");
    let mut lab = Lab::two_hosts_booting(UplinkHook::Xdp)?;
    lab.agent_args
        .insert("hv1".into(), vec!["--gateway-rate".into(), "0".into()]);
    lab.start_agents()?;
    lab.apply_via_agents()?;
    lab.boot("a1")?;
    lab.udhcpc("a1", false)?;
    let pid = lab.agent_pid("hv1");
    let (ns, mac) = (lab.vm("a1").ns.clone(), lab.vm("a1").mac.0);

    step("DHCP: DISCOVER -> OFFER from one VM, 64 outstanding, 5 s");
    let cpu0 = cpu_time(pid)?;
    let (answered, took) = dhcp_load(&ns, mac, 5.0, 64)?;
    let cpu = cpu_time(pid)? - cpu0;
    let tps = answered as f64 / took.as_secs_f64();
    let cpu_us = cpu.as_secs_f64() * 1e6 / answered.max(1) as f64;
    println!(
        "  {answered} transactions in {:.1} s: {tps:.0}/s, agent CPU {cpu_us:.1} µs each",
        took.as_secs_f64()
    );

    step("metadata: GET /latest/meta-data/instance-id, a new TCP connection each");
    let n = 2000;
    let cpu0 = cpu_time(pid)?;
    let one = metadata_load(&ns, n, 1)?;
    let eight = metadata_load(&ns, n, 8)?;
    let cpu = cpu_time(pid)? - cpu0;
    let (rps1, rps8) = (n as f64 / one.as_secs_f64(), n as f64 / eight.as_secs_f64());
    let md_cpu_us = cpu.as_secs_f64() * 1e6 / (2 * n) as f64;
    println!("  one client: {rps1:.0} requests/s; 8 at once: {rps8:.0} requests/s; agent CPU {md_cpu_us:.0} µs each");
    lab.cleanup();

    let date = crate::bench::utc_now()?;
    let results = json!({
        "date": date,
        "dhcp": {"transactions_per_s": tps, "agent_cpu_us_per_transaction": cpu_us},
        "metadata": {"requests_per_s_one_client": rps1, "requests_per_s_eight_clients": rps8,
                     "agent_cpu_us_per_request": md_cpu_us},
    });
    let md = format!(
        "Gateway services of one host's cloisond ({}), netns lab, 2 cores, no per-port limit:\n\n\
         | | |\n|---|---|\n\
         | DHCP transactions (DISCOVER to OFFER, one VM, 64 outstanding) | {tps:.0}/s, agent CPU {cpu_us:.1} µs each |\n\
         | metadata requests (a TCP connection each), one client | {rps1:.0}/s |\n\
         | metadata requests, 8 clients at once | {rps8:.0}/s, agent CPU {md_cpu_us:.0} µs each |\n",
        date
    );
    crate::bench::write_results("gateway", &results, &md)
}
