//! `cargo xtask bench`: everything measured, side by side with the kernel
//! baseline built in the same run (criterion benches, lab pps, TCP, latency,
//! memory), written to benches/results/latest.{json,md} and the plots.
use std::process::Command;

use anyhow::{bail, Context, Result};
use cloison_abi::DropReason;
use cloison_dataplane::UplinkHook;

use crate::lab::{self, Lab};

fn step(msg: &str) {
    println!("==> {msg}");
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Everything measured, side by side with the kernel baseline built in the
/// same run: the criterion benches, packets per second through the lab, TCP
/// throughput. Results in benches/results/latest.{json,md}.
pub fn run() -> Result<()> {
    step("criterion: per-packet costs in BPF_PROG_TEST_RUN, control plane (cargo bench -p cloison-benches)");
    // Only this run's estimates go into the results.
    let _ = std::fs::remove_dir_all("target/criterion");
    run_cmd(cargo().args(["bench", "-p", "cloison-benches"]))?;
    let criterion = criterion_estimates()?;

    step("lab: packets per second, VM to VM across two hosts (live-frames generator, XDP sink)");
    let mut runs = Vec::new();
    let setups: [(&str, Option<UplinkHook>); 3] = [
        ("cloison-xdp-uplink", Some(UplinkHook::Xdp)),
        ("cloison-tc-uplink", Some(UplinkHook::Tc)),
        ("kernel-vxlan-bridge-nftables", None),
    ];
    for (name, hook) in setups {
        runs.extend(lab_pps(name, hook)?);
    }
    for r in &runs {
        println!(
            "  {:<30} {:>5} B {:>5} flows  {:>8.3} Mpps  ({} of {} delivered)",
            r.setup, r.frame_bytes, r.flows, r.mpps, r.delivered, r.sent
        );
    }

    step("lab: iperf3 TCP and UDP request/response between VMs on two hosts, both labs up, 3 alternating rounds");
    // Both labs stay up and take turns, so background work of the kernel
    // (maps of earlier steps being freed) weighs on both alike; the median
    // round is reported. Two underlays: one that checksums and segments as
    // a NIC's wire does (Cloison's uplink in XDP), one that keeps GSO end to
    // end as a virtual fabric does (Cloison's uplink in TC: XDP cannot carry
    // GSO frames or partial checksums).
    let a2: std::net::Ipv4Addr = "10.0.0.2".parse()?;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let median_rr = |v: &mut Vec<lab::Latency>| {
        v.sort_by(|a, b| a.p50_us.total_cmp(&b.p50_us));
        v[v.len() / 2].clone()
    };
    let mut tcp = Vec::new();
    let mut rr = None;
    for (wire, hook) in [
        (lab::Wire::Nic, UplinkHook::Xdp),
        (lab::Wire::Offload, UplinkHook::Tc),
    ] {
        let mut lab = Lab::two_hosts_on(hook, wire)?;
        lab.uplink_forwarding(true)?;
        lab.apply()?;
        let b = lab::KernelBaseline::on(wire)?;
        b.uplink_forwarding(true)?;
        let (mut tcp_c, mut tcp_k, mut rr_c, mut rr_k) = (vec![], vec![], vec![], vec![]);
        for _ in 0..3 {
            tcp_c.push(lab::iperf3(
                &lab.vm("a2").ns,
                &lab.vm("a1").ns,
                "10.0.0.2",
                3,
            )?);
            tcp_k.push(lab::iperf3(&b.vm2, &b.vm1, "10.0.0.2", 3)?);
            if wire == lab::Wire::Nic {
                rr_c.push(lab::udp_rr(&lab.vm("a1").ns, &lab.vm("a2").ns, a2, 3000)?);
                rr_k.push(lab::udp_rr(&b.vm1, &b.vm2, a2, 3000)?);
            }
        }
        let drops: u64 = ["hv1", "hv2"]
            .iter()
            .map(|h| {
                lab.drops(h)
                    .map(|d| d.get(&DropReason::CtTcpNotSyn).copied().unwrap_or(0))
            })
            .sum::<Result<u64>>()?;
        drop(b);
        lab.cleanup();
        println!(
            "  iperf3 rounds, {wire:?} wire: Cloison ({hook:?} uplink) {tcp_c:.2?} Gbit/s, kernel {tcp_k:.2?} Gbit/s; {drops} segments dropped by conntrack"
        );
        tcp.push(serde_json::json!({
            "wire": format!("{wire:?}").to_lowercase(),
            "cloison_uplink": format!("{hook:?}").to_lowercase(),
            "cloison": median(&mut tcp_c),
            "kernel": median(&mut tcp_k),
            "cloison_rounds": tcp_c,
            "kernel_rounds": tcp_k,
        }));
        if wire == lab::Wire::Nic {
            rr = Some((median_rr(&mut rr_c), median_rr(&mut rr_k)));
        }
    }
    let (rr_cloison, rr_kernel) = rr.context("no request/response rounds")?;
    println!(
        "  request/response: Cloison p50 {:.1} us p99 {:.1} us ({:.0}/s), kernel p50 {:.1} us p99 {:.1} us ({:.0}/s)",
        rr_cloison.p50_us, rr_cloison.p99_us, rr_cloison.per_second, rr_kernel.p50_us, rr_kernel.p99_us, rr_kernel.per_second
    );

    step("kernel memory of the maps (bpftool), per port, rule and flow");
    let memory = crate::memory::measure()?;
    println!(
        "  {:.1} MiB in all maps; +{:.0} B per remote port, +{:.0} B per rule, {:.0} B per flow",
        memory.total_bytes as f64 / (1 << 20) as f64,
        memory.bytes_per_remote_port,
        memory.bytes_per_rule,
        memory.bytes_per_flow
    );

    let date = utc_now()?;
    let results = serde_json::json!({
        "date": date,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "criterion_ns": criterion,
        "pps": runs,
        "iperf3_gbit_s": tcp,
        "udp_request_response": {"cloison": rr_cloison, "kernel": rr_kernel},
        "memory": memory,
    });
    write_results("latest", &results, &results_markdown(&results))?;
    let dir = std::path::Path::new(RESULTS);
    crate::plot::pps(&results, &dir.join("pps.png"))?;
    crate::plot::scaling(&results, &dir.join("scaling.png"))?;
    step("written: benches/results/pps.png, scaling.png");
    Ok(())
}

/// Where the benches write their results.
const RESULTS: &str = "benches/results";

/// Writes a bench's results as `benches/results/{stem}.json` and its
/// table as `{stem}.md`, and shows the table.
pub fn write_results(stem: &str, results: &serde_json::Value, md: &str) -> Result<()> {
    let dir = std::path::Path::new(RESULTS);
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_vec_pretty(results)?,
    )?;
    std::fs::write(dir.join(format!("{stem}.md")), md)?;
    println!("{md}");
    step(&format!("written: {RESULTS}/{stem}.json, {stem}.md"));
    Ok(())
}

/// The plots again from benches/results/latest.json.
pub fn plot_results() -> Result<()> {
    let dir = std::path::Path::new(RESULTS);
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("latest.json"))?)?;
    crate::plot::pps(&results, &dir.join("pps.png"))?;
    crate::plot::scaling(&results, &dir.join("scaling.png"))?;
    step("written: benches/results/pps.png, scaling.png");
    Ok(())
}

/// One lab (Cloison with `hook`, or the kernel baseline) measured for 64-
/// and 1464-byte frames (the largest a 1450-MTU network carries), 1 and
/// 1,000 flows.
fn lab_pps(name: &str, hook: Option<UplinkHook>) -> Result<Vec<crate::pps::PpsRun>> {
    use cloison_dataplane::snapshot::MacAddr;
    let mut out = Vec::new();
    let mut lab = None;
    let mut base = None;
    let (from, to, port, src, dst) = match hook {
        Some(h) => {
            let mut l = Lab::two_hosts(h)?;
            l.uplink_forwarding(true)?;
            l.apply()?;
            let (a1, a2) = (l.vm("a1").clone(), l.vm("a2").clone());
            let port = (l.ns("hv1"), a1.port_if.clone());
            lab = Some(l);
            (a1.ns, a2.ns, port, (a1.mac, a1.ip), (a2.mac, a2.ip))
        }
        None => {
            let b = lab::KernelBaseline::new()?;
            b.uplink_forwarding(true)?;
            let r = (
                b.vm1.clone(),
                b.vm2.clone(),
                (b.hv1.clone(), "tap0".to_string()),
                (MacAddr([2, 0, 0, 0, 0, 1]), "10.0.0.1".parse()?),
                (MacAddr([2, 0, 0, 0, 0, 2]), "10.0.0.2".parse()?),
            );
            base = Some(b);
            r
        }
    };
    for bytes in [60usize, 1464] {
        for flows in [1u32, 1000] {
            let frame = crate::pps::udp_frame(src, dst, bytes);
            let packets = if bytes < 100 { 2_000_000 } else { 500_000 };
            let at = crate::pps::Between {
                setup: name,
                from_ns: &from,
                to_ns: &to,
                sink_if: "eth0",
                sender_port: (&port.0, &port.1),
            };
            let mut r = crate::pps::measure(&at, &frame, packets, flows)?;
            if hook.is_some() {
                r.program_ns = crate::pps::program_costs(
                    &at,
                    &frame,
                    packets,
                    flows,
                    &["cl_port", "cl_uplink_xdp", "cl_uplink_tc"],
                )?;
            }
            out.push(r);
        }
    }
    drop(lab);
    drop(base);
    Ok(out)
}

/// Mean ns per benchmark, from criterion's own files.
fn criterion_estimates() -> Result<std::collections::BTreeMap<String, f64>> {
    let mut out = std::collections::BTreeMap::new();
    let root = std::path::Path::new("target/criterion");
    for group in std::fs::read_dir(root).context("target/criterion")? {
        let group = group?.path();
        let mut stack = vec![group.clone()];
        while let Some(dir) = stack.pop() {
            let est = dir.join("new/estimates.json");
            if est.is_file() {
                let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&est)?)?;
                let name = dir.strip_prefix(root)?.display().to_string();
                if let Some(ns) = v["mean"]["point_estimate"].as_f64() {
                    out.insert(name, ns);
                }
                continue;
            }
            for e in std::fs::read_dir(&dir)? {
                let p = e?.path();
                if p.is_dir()
                    && p.file_name()
                        .is_some_and(|n| n != "report" && n != "new" && n != "base")
                {
                    stack.push(p);
                }
            }
        }
    }
    Ok(out)
}

fn results_markdown(r: &serde_json::Value) -> String {
    let mut md = format!(
        "Measured {} on {} CPUs (`cargo xtask bench`).\n\n",
        r["date"].as_str().unwrap_or("?"),
        r["cpus"]
    );
    md.push_str(
        "| path, VM to VM across hosts | frame | flows | Mpps (median) | vs kernel | Mpps per busy core | vs kernel | Cloison programs, ns per packet | runs |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let runs = r["pps"].as_array().cloned().unwrap_or_default();
    let kernel = |bytes: &serde_json::Value, flows: &serde_json::Value| {
        runs.iter().find(|k| {
            k["setup"] == "kernel-vxlan-bridge-nftables"
                && &k["frame_bytes"] == bytes
                && &k["flows"] == flows
        })
    };
    for run in &runs {
        let mpps = run["mpps"].as_f64().unwrap_or(0.0);
        let per_core = run["mpps_per_core"].as_f64().unwrap_or(0.0);
        let k = kernel(&run["frame_bytes"], &run["flows"]);
        let ratio = |field: &str, v: f64| {
            k.and_then(|k| k[field].as_f64())
                .map_or("-".into(), |k| format!("{:.2}x", v / k))
        };
        let all: Vec<String> = run["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_f64())
            .map(|v| format!("{v:.3}"))
            .collect();
        let programs: Vec<String> = run["program_ns"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(name, ns)| Some(format!("{name} {:.0}", ns.as_f64()?)))
            .collect();
        md.push_str(&format!(
            "| {} | {} B | {} | {:.3} | {} | {:.3} | {} | {} | {} |\n",
            run["setup"].as_str().unwrap_or("?"),
            run["frame_bytes"],
            run["flows"],
            mpps,
            ratio("mpps", mpps),
            per_core,
            ratio("mpps_per_core", per_core),
            if programs.is_empty() {
                "-".to_string()
            } else {
                programs.join(" + ")
            },
            all.join(" ")
        ));
    }
    md.push_str(
        "\n| iperf3, one TCP stream | underlay | Cloison uplink | Cloison Gbit/s | kernel Gbit/s | vs kernel | rounds (Cloison / kernel) |\n|---|---|---|---|---|---|---|\n",
    );
    let wire_name = |w: &str| match w {
        "nic" => "NIC-like wire (full checksums, MTU frames)",
        "offload" => "GSO end to end (veth fabric)",
        _ => "?",
    };
    let rounds = |v: &serde_json::Value| -> String {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_f64())
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    for t in r["iperf3_gbit_s"].as_array().into_iter().flatten() {
        let c = t["cloison"].as_f64().unwrap_or(0.0);
        let k = t["kernel"].as_f64().unwrap_or(1.0);
        md.push_str(&format!(
            "| VM to VM across hosts | {} | {} | {c:.2} | {k:.2} | {:.2}x | {} / {} |\n",
            wire_name(t["wire"].as_str().unwrap_or("")),
            t["cloison_uplink"].as_str().unwrap_or("?"),
            c / k,
            rounds(&t["cloison_rounds"]),
            rounds(&t["kernel_rounds"]),
        ));
    }
    let (rc, rk) = (
        &r["udp_request_response"]["cloison"],
        &r["udp_request_response"]["kernel"],
    );
    md.push_str(&format!(
        "\n| UDP request/response, one at a time | p50 | p99 | per second |\n|---|---|---|---|\n\
         | Cloison | {:.1} us | {:.1} us | {:.0} |\n| kernel VXLAN + bridge + nftables | {:.1} us | {:.1} us | {:.0} |\n",
        rc["p50_us"].as_f64().unwrap_or(0.0),
        rc["p99_us"].as_f64().unwrap_or(0.0),
        rc["per_second"].as_f64().unwrap_or(0.0),
        rk["p50_us"].as_f64().unwrap_or(0.0),
        rk["p99_us"].as_f64().unwrap_or(0.0),
        rk["per_second"].as_f64().unwrap_or(0.0)
    ));
    let m = &r["memory"];
    md.push_str(&format!(
        "\nKernel memory: {:.1} MiB in all maps (hash maps preallocated); a remote port adds {:.0} B \
         beyond that, a rule {:.0} B, a flow takes {:.0} B of the conntrack table.\n\n\
         | map | type | entries | bytes | per entry |\n|---|---|---|---|---|\n",
        m["total_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        m["bytes_per_remote_port"].as_f64().unwrap_or(0.0),
        m["bytes_per_rule"].as_f64().unwrap_or(0.0),
        m["bytes_per_flow"].as_f64().unwrap_or(0.0)
    ));
    for x in m["maps"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} |\n",
            x["name"].as_str().unwrap_or("?"),
            x["kind"].as_str().unwrap_or("?"),
            x["max_entries"],
            x["bytes"],
            x["bytes_per_entry"].as_f64().unwrap_or(0.0)
        ));
    }
    md.push_str("\n| criterion benchmark | mean |\n|---|---|\n");
    for (name, ns) in r["criterion_ns"].as_object().into_iter().flatten() {
        let ns = ns.as_f64().unwrap_or(0.0);
        let shown = if ns >= 1e6 {
            format!("{:.1} ms", ns / 1e6)
        } else {
            format!("{ns:.0} ns")
        };
        md.push_str(&format!("| {name} | {shown} |\n"));
    }
    md
}

/// Now, as the results files date a run: `2026-12-01 13:33 UTC`.
pub fn utc_now() -> Result<String> {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}
