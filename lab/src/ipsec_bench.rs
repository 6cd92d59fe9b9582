//! `cargo xtask bench --ipsec`: TCP between two VMs on two hosts, one
//! iperf3 stream (3 s), with Cloison's hosts in clear and with both hosts
//! ipsec (ESP by charon's kernel-libipsec), beside the kernel's VXLAN +
//! bridge + nftables in clear, the three labs up at once and measured in
//! alternating rounds (the median round is reported). Both Cloison labs run
//! their agents and the 1350-byte MTU that encryption needs; the kernel's
//! baseline keeps its 1450. For the encrypted lab, the CPU time both
//! charons spent during the stream, per Gbit/s carried.
//!
//! Not measured yet: the kernel's VXLAN through the same IPsec
//! configuration, and packets per second.
//!
//! Results in benches/results/ipsec.{json,md}.
use anyhow::{Context, Result};
use cloison_dataplane::UplinkHook;
use serde_json::json;

use crate::lab::{self, KernelBaseline, Lab};

fn step(msg: &str) {
    println!("==> {msg}");
}

const ROUNDS: usize = 3;
const SECS: u32 = 3;

/// The CPU time (user + system, seconds) process `pid` used so far.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // After the command's name in parentheses: fields 14 and 15 are utime
    // and stime, in clock ticks.
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn cloison_lab(ipsec: bool) -> Result<Lab> {
    let mut lab = Lab::two_hosts(UplinkHook::Tc)?;
    if ipsec {
        lab.enable_ipsec(&["hv1", "hv2"])?;
    } else {
        // The same MTU as the encrypted lab: the same segments.
        let mtu = cloison_dataplane::validate::MAX_MTU_IPSEC;
        for n in &mut lab.snapshot.networks {
            n.mtu = mtu;
        }
        for vm in &lab.vms {
            lab::sh(&[
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
    }
    lab.start_agents()?;
    lab.apply_via_agents()?;
    Ok(lab)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run() -> Result<()> {
    step("labs: Cloison in clear, Cloison with IPsec (charon), the kernel's VXLAN + bridge");
    let plain = cloison_lab(false)?;
    let enc = cloison_lab(true)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !lab::ping_in(&enc.vm("a2").ns, "10.0.0.1", 1) {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("no SA between the encrypted lab's hosts");
        }
    }
    let base = KernelBaseline::new()?;
    let pids: Vec<u32> = enc.charons.iter().map(|c| c.pid()).collect();
    let (mut p, mut e, mut k, mut cpu) = (vec![], vec![], vec![], vec![]);
    for round in 1..=ROUNDS {
        step(&format!("round {round}/{ROUNDS}"));
        p.push(lab::iperf3(
            &plain.vm("a2").ns,
            &plain.vm("a1").ns,
            "10.0.0.2",
            SECS,
        )?);
        let before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>()?;
        let gbit = lab::iperf3(&enc.vm("a2").ns, &enc.vm("a1").ns, "10.0.0.2", SECS)?;
        let after: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>()?;
        e.push(gbit);
        // CPU-seconds a second, per Gbit/s.
        cpu.push((after - before) / SECS as f64 / gbit.max(1e-9));
        k.push(lab::iperf3(&base.vm2, &base.vm1, "10.0.0.2", SECS)?);
    }
    let (pm, em, km, cm) = (
        median(p.clone()),
        median(e.clone()),
        median(k.clone()),
        median(cpu.clone()),
    );
    let when = crate::bench::utc_now()?;
    let results = json!({
        "when": when,
        "rounds": ROUNDS,
        "seconds": SECS,
        "cloison_plain_gbit": p,
        "cloison_ipsec_gbit": e,
        "kernel_plain_gbit": k,
        "charon_cpu_per_gbit": cpu,
    });
    let md = format!(
        "# Encryption: one TCP stream between VMs on two hosts\n\n\
         `cargo xtask bench --ipsec`, {when}, {ROUNDS} alternating rounds of {SECS} s (median; every round in ipsec.json), TC uplinks, veth underlay.\n\n\
         | setup | Gbit/s | vs Cloison in clear | vs the kernel in clear |\n|---|---|---|---|\n\
         | Cloison, in clear (MTU 1350) | {pm:.2} | 1.00× | {:.2}× |\n\
         | Cloison, IPsec (charon's kernel-libipsec, AES-GCM-256) | {em:.3} | {:.3}× | {:.3}× |\n\
         | kernel VXLAN + bridge + nftables, in clear (MTU 1450) | {km:.2} | {:.2}× | 1.00× |\n\n\
         charon's CPU (both hosts) while encrypting: {cm:.2} CPU-seconds a second per Gbit/s.\n\n\
         Not measured yet: the kernel's VXLAN through the same IPsec configuration; packets per second.\n",
        pm / km,
        em / pm,
        em / km,
        km / pm,
    );
    crate::bench::write_results("ipsec", &results, &md)
}
