//! `cloison-lab bench | plot | demo | lab [SECS] | fuzz-seeds DIR`: what runs on the netns
//! lab. `cargo xtask` builds and runs it after `setup`; it needs root and
//! the lab tools that setup installs.
use std::process::ExitCode;

use anyhow::{Context, Result};
use cloison_dataplane::UplinkHook;
use cloison_lab::lab::{self, Lab};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("bench") if args.get(1).map(String::as_str) == Some("--fleet") => {
            cloison_lab::fleet_bench::run()
        }
        Some("bench") if args.get(1).map(String::as_str) == Some("--gateway") => {
            cloison_lab::gateway_bench::run()
        }
        Some("bench") if args.get(1).map(String::as_str) == Some("--routing") => {
            cloison_lab::routing_bench::run()
        }
        Some("bench") if args.get(1).map(String::as_str) == Some("--ipsec") => {
            cloison_lab::ipsec_bench::run()
        }
        Some("bench") => cloison_lab::bench::run(),
        Some("plot") => cloison_lab::bench::plot_results(),
        Some("demo") if args.get(1).map(String::as_str) == Some("--routing") => {
            cloison_lab::demo::run_routing()
        }
        Some("demo") if args.get(1).map(String::as_str) == Some("--fleet") => {
            cloison_lab::demo::run_fleet()
        }
        Some("demo") => cloison_lab::demo::run(),
        Some("lab") => hold_lab(&args[1..]),
        Some("fuzz-seeds") => match args.get(1) {
            Some(dir) => cloison_lab::fuzz_seeds::run(dir),
            None => Err(anyhow::anyhow!("usage: cloison-lab fuzz-seeds DIR")),
        },
        _ => Err(anyhow::anyhow!(
            "usage: cloison-lab bench [--fleet|--gateway|--routing|--ipsec] | plot | demo [--fleet] | lab [SECS] [xdp|tc] [nic|offload] | fuzz-seeds DIR (through cargo xtask, which installs what they need)"
        )),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloison-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Holds a two-host lab up for inspection: `lab [SECS] [xdp|tc] [nic|offload]`
/// (uplink hook, and what the underlay hands the uplinks; see `lab::Wire`).
fn hold_lab(args: &[String]) -> Result<()> {
    let (mut secs, mut hook, mut wire) = (600, UplinkHook::Auto, lab::Wire::Nic);
    for a in args {
        match a.as_str() {
            "xdp" => hook = UplinkHook::Xdp,
            "tc" => hook = UplinkHook::Tc,
            "nic" => wire = lab::Wire::Nic,
            "offload" => wire = lab::Wire::Offload,
            n => {
                secs = n
                    .parse()
                    .with_context(|| format!("lab: unknown argument {n}"))?
            }
        }
    }
    // SIGINT/SIGTERM end the wait, so the lab is torn down (blocked here,
    // before any thread exists, so every thread leaves them to the wait).
    let signals = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let mut lab = Lab::two_hosts_on(hook, wire)?;
    lab.apply()?;
    println!(
        "lab {} up for {secs} s (namespaces {}-*, {hook:?} uplink, {wire:?} wire); Ctrl-C or SIGTERM ends it",
        lab.tag, lab.tag
    );
    let wait = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    unsafe { libc::sigtimedwait(&signals, std::ptr::null_mut(), &wait) };
    println!("lab {}: tearing down", lab.tag);
    Ok(())
}
