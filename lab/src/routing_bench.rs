//! `cargo xtask bench --routing`: tenant routing and NAT in the netns lab,
//! beside the switched path and beside the kernel doing the same job, both
//! labs up at once and measured in alternating rounds (the median round is
//! reported). The kernel's answer is a router namespace as Neutron's legacy
//! routers are: two bridged VXLAN networks with the router's addresses,
//! IP forwarding, nftables anti-spoofing, groups with conntrack and
//! masquerade (`KernelBaseline::routed`). Cloison's is the lab with tenant
//! a's router and the outside (`Lab::add_routers`, `Lab::add_outside`),
//! driven through its agents.
//!
//! - Packets per second of 60-byte UDP frames from a VM on the first host,
//!   1 and 1,000 flows: switched to a VM of its network on the other host;
//!   routed to a VM of the router's other network on the other host;
//!   source-NATed to the outside.
//! - NAT flows per second: 60,000 frames that each start a flow (2,000
//!   source ports x 30 destination ports), through SNAT to the outside.
//! - Memory per NAT flow: Cloison's from the maps one flow takes (conntrack,
//!   the SNAT mapping and its reverse: preallocated, so their size over
//!   their capacity); the kernel's from the slab memory the new flows added
//!   over the conntrack entries they made.
//!
//! Results in benches/results/routing.{json,md}.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result};
use cloison_abi::DropReason;
use cloison_dataplane::{netdev, snapshot::MacAddr, UplinkHook};
use serde_json::json;

use crate::{
    lab::{in_netns, sh, KernelBaseline, Lab},
    pps::{measure_flows, udp_frame, Between, PpsRun},
};

fn step(msg: &str) {
    println!("==> {msg}");
}

const ROUNDS: usize = 3;
const FRAME: usize = 60;
const PACKETS: u32 = 1_000_000;
/// The new-flows run: source ports x destination ports (from port
/// `NEW_FLOWS_DPORT`, away from the other runs' flows). 2,000 of SNAT's
/// 4,536 ports per destination port keeps allocation from failing.
const NEW_FLOWS: (u32, u32) = (2000, 30);
const NEW_FLOWS_DPORT: u16 = 100;
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// One path to measure in one setup.
struct Path {
    setup: &'static str,
    case: &'static str,
    from: String,
    to: String,
    sink_if: &'static str,
    sender_port: (String, String),
    src: (MacAddr, Ipv4Addr),
    dst: (MacAddr, Ipv4Addr),
}

impl Path {
    fn run(&self, packets: u32, flows: (u32, u32), dport: Option<u16>) -> Result<PpsRun> {
        let mut frame = udp_frame(self.src, self.dst, FRAME);
        if let Some(d) = dport {
            frame[36..38].copy_from_slice(&d.to_be_bytes());
        }
        let at = Between {
            setup: self.setup,
            from_ns: &self.from,
            to_ns: &self.to,
            sink_if: self.sink_if,
            sender_port: (&self.sender_port.0, &self.sender_port.1),
        };
        measure_flows(&at, &frame, packets, flows)
            .with_context(|| format!("{} {}", self.setup, self.case))
    }
}

/// Pins the outside's address to `mac` in host namespace `hv`'s neighbour
/// table, as it is once traffic runs (both setups alike).
fn outside_neighbour(hv: &str, mac: [u8; 6]) -> Result<()> {
    sh(&[
        "ip",
        "-n",
        hv,
        "neigh",
        "replace",
        &OUTSIDE.to_string(),
        "lladdr",
        &MacAddr(mac).to_string(),
        "dev",
        "ext0",
        "nud",
        "permanent",
    ])?;
    Ok(())
}

/// Slab memory of the whole kernel, in bytes (/proc/meminfo).
fn slab_bytes() -> Result<u64> {
    let m = std::fs::read_to_string("/proc/meminfo")?;
    let kb: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .context("no Slab in /proc/meminfo")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

fn conntrack_count(ns: &str) -> Result<u64> {
    Ok(sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "cat",
        "/proc/sys/net/netfilter/nf_conntrack_count",
    ])?
    .trim()
    .parse()?)
}

/// What one NAT flow takes of Cloison's maps on `host`: (map, bytes per
/// entry) of the conntrack table and the two SNAT tables.
fn cloison_flow_maps(lab: &Lab, host: &str) -> Result<Vec<(String, f64)>> {
    let dir = lab.pin_root.join(host);
    let mut found = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("{}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                if ["CL_CONNTRACK", "CL_SNAT", "CL_SNAT_REV"].contains(&n) {
                    found.push(p);
                }
            }
        }
    }
    let mut out = Vec::new();
    for p in found {
        let m = crate::memory::pinned_map(&p)?;
        out.push((m.name, m.bytes_per_entry));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    anyhow::ensure!(
        out.len() == 3,
        "the flow's maps under {}: {out:?}",
        dir.display()
    );
    Ok(out)
}

pub fn run() -> Result<()> {
    step("lab: Cloison (XDP uplink, NIC-like wire), tenant a's router between a-net and a-db, SNAT to the outside on hv1's ext0; through its agents");
    let mut lab = Lab::two_hosts(UplinkHook::Xdp)?;
    lab.add_routers()?;
    lab.add_outside()?;
    lab.uplink_forwarding(true)?;
    lab.start_agents()?;
    lab.apply_via_agents()?;
    let (a1, a2, ad2) = (
        lab.vm("a1").clone(),
        lab.vm("a2").clone(),
        lab.vm("ad2").clone(),
    );
    let out = lab.ns("out");
    let hv1 = lab.ns("hv1");
    let out_mac = in_netns(&out, || netdev::mac("br0").context("the outside's br0"))?;
    outside_neighbour(&hv1, out_mac)?;
    let gateway = MacAddr(cloison_abi::gateway_mac(1001));
    let cl = |case, to: &str, sink_if, dst| Path {
        setup: "cloison",
        case,
        from: a1.ns.clone(),
        to: to.to_string(),
        sink_if,
        sender_port: (hv1.clone(), a1.port_if.clone()),
        src: (a1.mac, a1.ip),
        dst,
    };
    let cloison = [
        cl("switched", &a2.ns, "eth0", (a2.mac, a2.ip)),
        cl("routed", &ad2.ns, "eth0", (gateway, ad2.ip)),
        cl("snat", &out, "x1", (gateway, OUTSIDE)),
    ];

    step("lab: the kernel's router namespace (bridged VXLAN networks, forwarding, nftables anti-spoofing, groups with conntrack, masquerade)");
    let k = KernelBaseline::routed()?;
    k.uplink_forwarding(true)?;
    let (vm3, kout) = (
        k.routed_vm.clone().context("routed VM")?,
        k.outside.clone().context("outside")?,
    );
    let router = MacAddr(KernelBaseline::ROUTER_MAC);
    let vm1 = (MacAddr([2, 0, 0, 0, 0, 1]), Ipv4Addr::new(10, 0, 0, 1));
    let kp = |case, to: &str, sink_if, dst| Path {
        setup: "kernel",
        case,
        from: k.vm1.clone(),
        to: to.to_string(),
        sink_if,
        sender_port: (k.hv1.clone(), "tap0".to_string()),
        src: vm1,
        dst,
    };
    let kernel = [
        kp(
            "switched",
            &k.vm2,
            "eth0",
            (MacAddr([2, 0, 0, 0, 0, 2]), Ipv4Addr::new(10, 0, 0, 2)),
        ),
        kp(
            "routed",
            &vm3,
            "eth0",
            (router, Ipv4Addr::new(10, 1, 0, 12)),
        ),
        kp("snat", &kout, "x1", (router, OUTSIDE)),
    ];

    step(&format!(
        "packets per second, {FRAME}-byte frames, 1 and 1,000 flows, {ROUNDS} rounds alternating Cloison and the kernel"
    ));
    let drops_before = lab.drops("hv1")?;
    let mut rounds: BTreeMap<(&str, &str, u32), Vec<PpsRun>> = BTreeMap::new();
    for _ in 0..ROUNDS {
        for flows in [1u32, 1000] {
            for (c, kk) in cloison.iter().zip(&kernel) {
                for p in [c, kk] {
                    let r = p.run(PACKETS, (flows, 1), None)?;
                    rounds.entry((p.setup, p.case, flows)).or_default().push(r);
                }
            }
        }
    }
    let mut pps = Vec::new();
    for ((setup, case, flows), mut runs) in rounds {
        runs.sort_by(|a, b| a.mpps.total_cmp(&b.mpps));
        let all: Vec<f64> = runs.iter().map(|r| r.mpps).collect();
        let m = &runs[runs.len() / 2];
        println!(
            "  {setup:<8} {case:<9} {flows:>5} flows  {:>7.3} Mpps  ({} of {} delivered; rounds {all:.3?})",
            m.mpps, m.delivered, m.sent
        );
        pps.push(json!({
            "setup": setup, "case": case, "flows": flows, "frame_bytes": FRAME,
            "mpps": m.mpps, "mpps_per_core": m.mpps_per_core,
            "delivered": m.delivered, "sent": m.sent, "rounds": all,
        }));
    }

    step(&format!(
        "NAT flows per second: {} frames, each a new flow, through SNAT to the outside",
        NEW_FLOWS.0 * NEW_FLOWS.1
    ));
    let n = NEW_FLOWS.0 * NEW_FLOWS.1;
    let c = cloison[2].run(n, NEW_FLOWS, Some(NEW_FLOWS_DPORT))?;
    let (slab0, ct0) = (slab_bytes()?, conntrack_count(&k.hv1)?);
    let kr = kernel[2].run(n, NEW_FLOWS, Some(NEW_FLOWS_DPORT))?;
    let (slab1, ct1) = (slab_bytes()?, conntrack_count(&k.hv1)?);
    let drops_after = lab.drops("hv1")?;
    let grew = |r: DropReason| {
        drops_after.get(&r).copied().unwrap_or(0) - drops_before.get(&r).copied().unwrap_or(0)
    };
    let exhausted = grew(DropReason::SnatExhausted);
    let new_ct = ct1.saturating_sub(ct0);
    let kernel_flow_bytes = slab1.saturating_sub(slab0) as f64 / new_ct.max(1) as f64;
    let flow_maps = cloison_flow_maps(&lab, "hv1")?;
    let cloison_flow_bytes: f64 = flow_maps.iter().map(|(_, b)| b).sum();
    println!(
        "  Cloison {:.0} new flows/s ({} of {n} delivered, {exhausted} refused for want of a port), kernel {:.0}/s ({} delivered, {new_ct} conntrack entries made)",
        c.delivered as f64 / c.seconds,
        c.delivered,
        kr.delivered as f64 / kr.seconds,
        kr.delivered
    );
    println!(
        "  memory per NAT flow: Cloison {cloison_flow_bytes:.0} B ({flow_maps:.0?}, preallocated), kernel {kernel_flow_bytes:.0} B (slab grown by {} KiB)",
        slab1.saturating_sub(slab0) / 1024
    );
    let spoofed = grew(DropReason::SpoofedMac);
    anyhow::ensure!(
        spoofed == 0,
        "hv1 dropped {spoofed} generated frames as MAC-spoofed: the generator's frames are not what it was given"
    );
    drop(k);
    lab.cleanup();

    let date = crate::bench::utc_now()?;
    let results = json!({
        "date": date,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "pps": pps,
        "nat_new_flows": {
            "frames": n,
            "cloison": {"flows_per_s": c.delivered as f64 / c.seconds, "delivered": c.delivered,
                        "snat_exhausted": exhausted},
            "kernel": {"flows_per_s": kr.delivered as f64 / kr.seconds, "delivered": kr.delivered,
                       "conntrack_entries": new_ct},
        },
        "nat_flow_bytes": {
            "cloison": cloison_flow_bytes,
            "cloison_maps": flow_maps.iter().map(|(m, b)| (m.clone(), *b)).collect::<BTreeMap<_, _>>(),
            "kernel": kernel_flow_bytes,
        },
    });
    crate::bench::write_results("routing", &results, &markdown(&results))
}

fn markdown(r: &serde_json::Value) -> String {
    let mut md = format!(
        "Measured {} on {} CPUs (`cargo xtask bench --routing`), {FRAME}-byte UDP frames from a VM on the first host, median of {ROUNDS} alternating rounds:\n\n\
         | path | flows | Cloison Mpps | kernel Mpps | vs kernel | Cloison vs its switched path | rounds (Cloison / kernel) |\n|---|---|---|---|---|---|---|\n",
        r["date"].as_str().unwrap_or("?"),
        r["cpus"]
    );
    let runs = r["pps"].as_array().cloned().unwrap_or_default();
    let find = |setup: &str, case: &str, flows: &serde_json::Value| {
        runs.iter()
            .find(|x| x["setup"] == setup && x["case"] == case && &x["flows"] == flows)
            .cloned()
            .unwrap_or_default()
    };
    let rounds = |v: &serde_json::Value| {
        v["rounds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_f64())
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for (case, what) in [
        (
            "switched",
            "switched, to a VM of its network on the other host",
        ),
        (
            "routed",
            "routed, to a VM of the router's other network on the other host",
        ),
        ("snat", "source-NATed to the outside (on the first host)"),
    ] {
        for flows in [json!(1), json!(1000)] {
            let (c, k) = (find("cloison", case, &flows), find("kernel", case, &flows));
            let sw = find("cloison", "switched", &flows);
            let (cm, km) = (
                c["mpps"].as_f64().unwrap_or(0.0),
                k["mpps"].as_f64().unwrap_or(0.0),
            );
            let swm = sw["mpps"].as_f64().unwrap_or(0.0);
            // The outside is on the first host: no second host to compare
            // with the switched path's.
            let vs_switched = if case == "snat" {
                "-".to_string()
            } else {
                format!("{:.2}x", cm / swm.max(1e-9))
            };
            md.push_str(&format!(
                "| {what} | {flows} | {cm:.3} | {km:.3} | {:.2}x | {vs_switched} | {} / {} |\n",
                cm / km.max(1e-9),
                rounds(&c),
                rounds(&k)
            ));
        }
    }
    let nf = &r["nat_new_flows"];
    let fb = &r["nat_flow_bytes"];
    let (cf, kf) = (
        nf["cloison"]["flows_per_s"].as_f64().unwrap_or(0.0),
        nf["kernel"]["flows_per_s"].as_f64().unwrap_or(0.0),
    );
    let maps: Vec<String> = fb["cloison_maps"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(m, b)| format!("{m} {:.0} B", b.as_f64().unwrap_or(0.0)))
        .collect();
    md.push_str(&format!(
        "\n| NAT, {} frames each starting a flow | Cloison | kernel (nftables masquerade) | vs kernel |\n|---|---|---|---|\n\
         | new flows per second | {cf:.0} ({} delivered, {} refused for want of a port) | {kf:.0} ({} delivered) | {:.2}x |\n\
         | memory per flow | {:.0} B ({}; preallocated) | {:.0} B (slab growth over {} conntrack entries) | {:.2}x |\n",
        nf["frames"],
        nf["cloison"]["delivered"],
        nf["cloison"]["snat_exhausted"],
        nf["kernel"]["delivered"],
        cf / kf.max(1e-9),
        fb["cloison"].as_f64().unwrap_or(0.0),
        maps.join(" + "),
        fb["kernel"].as_f64().unwrap_or(0.0),
        nf["kernel"]["conntrack_entries"],
        fb["cloison"].as_f64().unwrap_or(0.0) / fb["kernel"].as_f64().unwrap_or(1.0).max(1e-9),
    ));
    md
}
