//! Packets per second through the whole path, VM to VM across two hosts,
//! generated without the kernel stack: the `cloison-bench` generator sends
//! UDP frames out of the sending VM's eth0 with BPF_PROG_TEST_RUN live
//! frames (one core, as fast as it goes), and an XDP sink on the receiving
//! VM's eth0 counts them. The same generator and sink serve Cloison and the
//! kernel baseline.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use cloison_dataplane::{netdev, progstats, snapshot::MacAddr, traffic::Traffic};
use serde::Serialize;

use crate::lab::sh;

#[derive(Clone, Debug, Serialize)]
pub struct PpsRun {
    pub setup: String,
    pub frame_bytes: usize,
    pub flows: u32,
    pub sent: u64,
    pub delivered: u64,
    pub seconds: f64,
    /// Delivered frames per second (the median of the runs).
    pub mpps: f64,
    /// CPU time the machine spent busy during the run (all CPUs, the
    /// generator included), in seconds.
    pub cpu_seconds: f64,
    /// Delivered frames per second of busy CPU: Mpps per core.
    pub mpps_per_core: f64,
    /// Every run's Mpps.
    pub runs: Vec<f64>,
    /// Mean nanoseconds per run of each of Cloison's programs on the path,
    /// from one more run with the kernel timing them (empty for the kernel
    /// baseline, whose path is not BPF).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub program_ns: BTreeMap<String, f64>,
}

/// Runs per measurement (the median is reported): saturation figures move
/// from run to run.
pub const RUNS: usize = 3;

/// A UDP frame of `frame_bytes` (without FCS) from `src` to `dst`, UDP
/// checksum 0 (the generator rewrites the source port).
pub fn udp_frame(
    src: (MacAddr, Ipv4Addr),
    dst: (MacAddr, Ipv4Addr),
    frame_bytes: usize,
) -> Vec<u8> {
    use cloison_testkit::wire::build;
    let payload = vec![0x5a; frame_bytes.saturating_sub(14 + 20 + 8)];
    let l4 = build::udp(10000, 9, &payload);
    let mut f = build::v4(src.0 .0, dst.0 .0, src.1.octets(), dst.1.octets(), l4).emit();
    f[40] = 0; // UDP checksum: none
    f[41] = 0;
    f
}

/// Where a measurement runs: from the VM in namespace `from_ns` to
/// interface `sink_if` (a VM's eth0) in `to_ns`; `sender_port` is the
/// sending VM's port on its host (namespace, interface), which must take
/// XDP-transmitted frames (NAPI).
#[derive(Clone, Copy, Debug)]
pub struct Between<'a> {
    pub setup: &'a str,
    pub from_ns: &'a str,
    pub to_ns: &'a str,
    pub sink_if: &'a str,
    pub sender_port: (&'a str, &'a str),
}

/// One measurement: `packets` copies of `frame` over `flows` flows.
pub fn measure_once(at: &Between, frame: &[u8], packets: u32, flows: u32) -> Result<PpsRun> {
    measure_flows(at, frame, packets, (flows, 1))
}

/// One measurement: `packets` copies of `frame` over `flows` = (source
/// ports, destination ports from the frame's): `flows.0 * flows.1` flows.
pub fn measure_flows(
    at: &Between,
    frame: &[u8],
    packets: u32,
    flows: (u32, u32),
) -> Result<PpsRun> {
    let Between {
        setup,
        from_ns,
        to_ns,
        sink_if,
        sender_port,
    } = *at;
    sh(&[
        "ip",
        "netns",
        "exec",
        sender_port.0,
        "ethtool",
        "-K",
        sender_port.1,
        "gro",
        "on",
    ])?;
    let (to, sink_if) = (to_ns.to_string(), sink_if.to_string());
    let mut traffic = crate::lab::in_netns(&to, move || {
        let mut t = Traffic::load()?;
        t.attach_sink(&sink_if)?;
        Ok(t)
    })
    .context("sink")?;
    let before = traffic.sunk()?;
    let from = from_ns.to_string();
    let frame_bytes = frame.len();
    let frame = frame.to_vec();
    let start = Instant::now();
    let cpu_before = busy_cpu_seconds()?;
    let (traffic, _) = crate::lab::in_netns(&from, move || {
        let eth0 = netdev::ifindex("eth0").context("the sender's eth0")?;
        let took = traffic.send_flows(eth0, &frame, packets, flows)?;
        Ok((traffic, took))
    })?;
    // Frames still in flight reach the sink shortly: the run ends when its
    // count last moved.
    let mut delivered = traffic.sunk()? - before;
    let mut last_change = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = traffic.sunk()? - before;
        if now != delivered {
            delivered = now;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_millis(200) {
            break;
        }
    }
    let seconds = (last_change - start).as_secs_f64();
    // The idle tail after the last frame adds no busy time.
    let cpu_seconds = busy_cpu_seconds()? - cpu_before;
    drop(traffic); // detaches the sink
    Ok(PpsRun {
        setup: setup.to_string(),
        frame_bytes,
        flows: flows.0 * flows.1.max(1),
        sent: packets as u64,
        delivered,
        seconds,
        mpps: delivered as f64 / seconds / 1e6,
        cpu_seconds,
        mpps_per_core: delivered as f64 / cpu_seconds.max(1e-3) / 1e6,
        runs: vec![],
        program_ns: BTreeMap::new(),
    })
}

/// [`measure_once`] [`RUNS`] times; the run with the median rate, and all rates.
pub fn measure(at: &Between, frame: &[u8], packets: u32, flows: u32) -> Result<PpsRun> {
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        runs.push(measure_once(at, frame, packets, flows)?);
    }
    runs.sort_by(|a, b| a.mpps.total_cmp(&b.mpps));
    let all: Vec<f64> = runs.iter().map(|r| r.mpps).collect();
    let mut median = runs.swap_remove(RUNS / 2);
    median.runs = all;
    Ok(median)
}

/// One more run with the kernel timing every BPF program: the mean cost per
/// run of each program named in `names` while the traffic ran (the timing
/// adds two clock reads per run, so the rates of this run are not kept).
pub fn program_costs(
    at: &Between,
    frame: &[u8],
    packets: u32,
    flows: u32,
    names: &[&str],
) -> Result<BTreeMap<String, f64>> {
    let timing = progstats::start_timing()?;
    let before = progstats::costs(names)?;
    measure_once(at, frame, packets, flows)?;
    let after = progstats::costs(names)?;
    drop(timing);
    Ok(names
        .iter()
        .filter_map(|n| {
            after[*n]
                .ns_per_run_since(&before[*n])
                .map(|ns| (n.to_string(), ns))
        })
        .collect())
}

/// Seconds all CPUs together spent not idle since boot (/proc/stat: user,
/// nice, system, irq, softirq, steal; in USER_HZ ticks of 10 ms).
pub fn busy_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    anyhow::ensure!(ticks.len() >= 8, "short /proc/stat cpu line: {line}");
    // user nice system idle iowait irq softirq steal
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7];
    Ok(busy as f64 / 100.0)
}
