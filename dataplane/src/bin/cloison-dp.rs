//! `cloison-dp`: programs one host's dataplane from a snapshot file. The
//! agent (cloisond) does the same from the API; this is the tool the lab and
//! an operator use directly.
use std::{path::PathBuf, process::ExitCode};

use cloison_abi::DropReason;
use cloison_dataplane::{loader::DEFAULT_PIN_ROOT, Dataplane, Snapshot, UplinkHook};

const USAGE: &str = "usage:
  cloison-dp apply --host NAME --uplink IF --snapshot FILE [--uplink-hook auto|xdp|tc] [--pin-root DIR] [--netns NS]
  cloison-dp stats --host NAME [--pin-root DIR] [--netns NS]
  cloison-dp conntrack --host NAME [--pin-root DIR] [--netns NS]   (list tracked flows)
  cloison-dp ct-gc --host NAME [--pin-root DIR] [--netns NS]       (age out idle flows, recount quotas)
  cloison-dp purge --host NAME [--pin-root DIR]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloison-dp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().ok_or_else(|| anyhow::anyhow!("{USAGE}"))?;
    let (mut host, mut uplink, mut snapshot, mut hook) = (None, None, None, UplinkHook::Auto);
    let mut pin_root = PathBuf::from(DEFAULT_PIN_ROOT);
    while let Some(flag) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--host" => host = Some(val()?),
            "--uplink" => uplink = Some(val()?),
            "--snapshot" => snapshot = Some(PathBuf::from(val()?)),
            "--uplink-hook" => hook = val()?.parse()?,
            "--pin-root" => pin_root = PathBuf::from(val()?),
            "--netns" => {
                let ns = val()?;
                cloison_dataplane::netdev::enter_netns(&ns)
                    .map_err(|e| anyhow::anyhow!("enter netns {ns}: {e}"))?;
            }
            _ => anyhow::bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    let host = host.ok_or_else(|| anyhow::anyhow!("--host is required\n{USAGE}"))?;
    match cmd.as_str() {
        "apply" => {
            let uplink = uplink.ok_or_else(|| anyhow::anyhow!("--uplink is required"))?;
            let path = snapshot.ok_or_else(|| anyhow::anyhow!("--snapshot is required"))?;
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("read {}: {e}", path.display()))?;
            let snap: Snapshot = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let mut dp = Dataplane::open(&host, &pin_root)?;
            let valid = snap
                .validated()
                .map_err(|v| anyhow::anyhow!("{}: {v}", path.display()))?;
            let r = dp.apply(&valid, &host, &uplink, hook)?;
            println!(
                "{host}: {} map updates, uplink hook {}, attached {:?}, detached {:?}, pending {:?}",
                r.map_updates,
                r.uplink_hook.unwrap_or("-"),
                r.ports_attached,
                r.ports_detached,
                r.pending
            );
        }
        "stats" => {
            let dp = Dataplane::open_maps(&host, &pin_root)?;
            let s = dp.stats()?;
            println!(
                "{:<10} {:>10} {:>12} {:>10} {:>12} {:>8}",
                "ifindex", "tx_pkts", "tx_bytes", "rx_pkts", "rx_bytes", "drops"
            );
            for (ifindex, p) in &s.ports {
                println!(
                    "{ifindex:<10} {:>10} {:>12} {:>10} {:>12} {:>8}",
                    p.tx_packets, p.tx_bytes, p.rx_packets, p.rx_bytes, p.drops
                );
            }
            println!("drops by reason:");
            for (reason, n) in &s.drops {
                println!("  {:<28} {n}", DropReason::name(*reason));
            }
            for (ifindex, drops) in &s.port_drops {
                println!("drops of port {ifindex}:");
                for (reason, n) in drops {
                    println!("  {:<28} {n}", DropReason::name(*reason));
                }
            }
        }
        "conntrack" => {
            let dp = Dataplane::open_maps(&host, &pin_root)?;
            let now = cloison_dataplane::loader::monotonic_ns();
            println!(
                "{:<8} {:<5} {:<40} {:<40} {:<6} {:>8} {:>6}",
                "zone", "proto", "a", "b", "state", "idle_s", "slot"
            );
            for (k, e) in dp.conntrack()? {
                let end = |addr: [u8; 16], port: [u8; 2]| {
                    let ip = std::net::Ipv6Addr::from(addr);
                    let ip = ip
                        .to_ipv4_mapped()
                        .map_or(ip.to_string(), |v4| v4.to_string());
                    format!("{ip}:{}", u16::from_be_bytes(port))
                };
                println!(
                    "{:<8} {:<5} {:<40} {:<40} {:<6} {:>8} {:>6}",
                    k.zone,
                    k.proto,
                    end(k.addr_a, k.port_a),
                    end(k.addr_b, k.port_b),
                    e.state,
                    now.saturating_sub(e.last_seen_ns) / 1_000_000_000,
                    e.owner_slot
                );
            }
        }
        "ct-gc" => {
            let mut dp = Dataplane::open_maps_to_write(&host, &pin_root)?;
            println!("{host}: {} idle flows removed", dp.conntrack_gc()?);
        }
        "purge" => Dataplane::purge(&host, &pin_root)?,
        _ => anyhow::bail!("unknown command {cmd}\n{USAGE}"),
    }
    Ok(())
}
