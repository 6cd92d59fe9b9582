//! `cargo xtask demo`: two hypervisors and a kernel VXLAN peer, each host run
//! by its own cloisond, the state sent as an IaaS would (cloisonctl apply -f);
//! then traffic, isolation between tenants with the same addresses, security
//! groups (a revoke cutting a live stream), an agent killed under a ping,
//! throughput beside the kernel, the counters by port; then fleet mode: three
//! hosts on a three-member etcd, the IaaS writing to one agent only, etcd's
//! leader killed under a ping; routers between each tenant's networks, SNAT
//! and a floating IP to an outside network; and a summary.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cloison_dataplane::UplinkHook;
use serde_json::Value;

use crate::lab::{self, Lab};

fn step(msg: &str) {
    println!("==> {msg}");
}

/// What the demo showed: a line each, with its numbers and whether it is
/// what it must be.
#[derive(Default)]
struct Summary(Vec<(&'static str, String, bool)>);

impl Summary {
    fn add(&mut self, what: &'static str, numbers: String, ok: bool) {
        self.0.push((what, numbers, ok));
    }

    fn print(&self) {
        for (what, numbers, ok) in &self.0 {
            println!(
                "  {:<4} {what:<34} {numbers}",
                if *ok { "ok" } else { "FAIL" }
            );
        }
    }

    fn failed(&self) -> Vec<&'static str> {
        self.0.iter().filter(|l| !l.2).map(|l| l.0).collect()
    }
}

/// The whole demo: one host's own state per agent, then fleet mode.
pub fn run() -> Result<()> {
    let mut summary = Summary::default();
    per_host(&mut summary)?;
    routing(&mut summary)?;
    fleet(&mut summary)?;
    finish(summary)
}

/// Only the routing part (`cargo xtask demo --routing`).
pub fn run_routing() -> Result<()> {
    let mut summary = Summary::default();
    routing(&mut summary)?;
    finish(summary)
}

/// Only the fleet-mode part (`cargo xtask demo --fleet`).
pub fn run_fleet() -> Result<()> {
    let mut summary = Summary::default();
    fleet(&mut summary)?;
    finish(summary)
}

fn finish(summary: Summary) -> Result<()> {
    step("summary");
    summary.print();
    let failed = summary.failed();
    if !failed.is_empty() {
        bail!("the demo showed something wrong: {}", failed.join(", "));
    }
    Ok(())
}

fn per_host(summary: &mut Summary) -> Result<()> {
    step("lab: 2 hypervisors on one underlay switch; tenants a and b both use 10.0.0.0/24 and MACs 02:00:00:00:00:0x");
    let mut lab = Lab::two_hosts_booting(UplinkHook::Auto)?;
    lab.add_kernel_vtep()?;
    lab.start_agents()?;
    iaas_applies(&lab)?;
    let _clients = boot(&lab, summary)?;
    traffic(&lab, summary);
    isolation(&lab, summary)?;
    security_groups(&mut lab, summary)?;
    hitless_restart(&mut lab, summary)?;
    throughput(&lab, summary);
    counters(&lab)?;
    step("cleaning up");
    lab.cleanup();
    Ok(())
}

/// Routers: each tenant's second network and router (the same subnets,
/// addresses and MACs in both tenants), a network on no router, the outside
/// behind each host's external interface, SNAT and a floating IP.
fn routing(summary: &mut Summary) -> Result<()> {
    step("routing: each tenant adds a network 10.1.0.0/24 (VMs ad1/bd1 on hv1, ad2/bd2 on hv2) and a router joining it to 10.0.0.0/24; a-iso (10.2.0.0/24, ai1) is on no router; an outside network 198.51.100.0/24 on each host's ext0");
    let mut lab = Lab::two_hosts(UplinkHook::Auto)?;
    lab.add_routers()?;
    lab.add_outside()?;
    lab.snapshot
        .security_groups
        .push(serde_json::from_value(serde_json::json!({
        "name": "a-public", "tenant": "tenant-a", "rules": [
            {"direction": "ingress", "protocol": "tcp", "ports": "5001"},
            {"direction": "ingress", "protocol": "icmp"}, {"direction": "egress"}]}))?);
    lab.set_groups(&[("ad2", "a-public")]);
    lab.start_agents()?;
    apply_file(&lab, false)?;
    println!("  routers a-r, b-r (snat: true); floating IP 198.51.100.20 -> ad2; hv1, hv2 external IPs 198.51.100.11, .12");

    let checks = [
        ("a1", "10.1.0.11", "a-net -> a-db on hv1"),
        (
            "a1",
            "10.1.0.12",
            "a-net hv1 -> a-db hv2 (VXLAN in a-db's VNI)",
        ),
        ("ad1", "fd00:1::2", "IPv6, a-db hv1 -> a-net hv2"),
        (
            "b1",
            "10.1.0.12",
            "tenant b, the same addresses, its own router",
        ),
    ];
    let ok = pings(&lab, &checks, 2);
    let iso = !lab.ping("a1", "10.2.0.21", 1);
    println!(
        "  ping a1 -> 10.2.0.21  {} a-iso is on no router",
        if iso { "unreachable, ok" } else { "REACHED" }
    );
    let addr = "10.1.0.11".parse()?;
    let cross =
        lab::tcp_echo_to(&lab, "b1", "ad1", addr, 5002, b"x", Duration::from_secs(1)).is_err();
    let own = lab::tcp_echo_to(&lab, "b1", "bd1", addr, 5002, b"x", Duration::from_secs(1)).is_ok();
    println!(
        "  TCP b1 -> 10.1.0.11: {} (tenant b's bd1), tenant a's ad1 {}",
        if own { "ok" } else { "FAIL" },
        if cross { "not reached" } else { "REACHED" }
    );
    let hops = lab::traceroute(&lab, "a2", "10.1.0.11")?;
    println!("  traceroute a2 (hv2) -> ad1 (hv1): {}", hops.join(" -> "));
    let traced = hops == ["10.0.0.254", "10.1.0.11"];
    summary.add(
        "routing between a tenant's networks",
        format!(
            "{ok}/{} routed pings, a-iso unreachable: {iso}, tenant b's twin reached and not a's: {}, traceroute via the router: {traced}",
            checks.len(),
            own && cross
        ),
        ok == checks.len() && iso && own && cross && traced,
    );

    let outside = lab.ns("out");
    let server = lab::tcp_server_in(&outside, "198.51.100.1", 7000, 3);
    let conns = ["a1", "b1", "ad2"].map(|vm| lab::connect_from(&lab, vm, "198.51.100.1", 7000));
    let mut echoed = 0;
    for c in conns.into_iter().flatten() {
        echoed += (lab::echo(c, b"hi") == b"hi") as usize;
    }
    let peers = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread"))??;
    for (vm, p) in ["a1", "b1", "ad2"].iter().zip(&peers) {
        println!("  {vm} (10.x) -> the outside's 198.51.100.1:7000: it sees {p}");
    }
    let fip_ping = lab::ping_in(&outside, "198.51.100.20", 2);
    let open = lab::tcp_echo_from_ns(&lab, &outside, "198.51.100.20", "ad2", 5001).is_ok();
    let closed = lab::tcp_echo_from_ns(&lab, &outside, "198.51.100.20", "ad2", 5002).is_err();
    println!(
        "  the outside -> 198.51.100.20 (ad2): ping {}, TCP 5001 {}, TCP 5002 {} (its group)",
        if fip_ping { "ok" } else { "FAIL" },
        if open { "ok" } else { "FAIL" },
        if closed { "refused" } else { "OPEN" }
    );
    let snat_ips: Vec<String> = peers.iter().map(|p| p.ip().to_string()).collect();
    let two_ports = peers.len() == 3 && peers[0].port() != peers[1].port();
    summary.add(
        "SNAT and floating IPs",
        format!(
            "{echoed}/3 outside echoes, seen from {}; the floating IP reached where its group allows: {}",
            snat_ips.join(", "),
            fip_ping && open && closed
        ),
        echoed == 3
            && two_ports
            && snat_ips == ["198.51.100.11", "198.51.100.11", "198.51.100.20"]
            && fip_ping
            && open
            && closed,
    );
    step("cleaning up");
    lab.cleanup();
    Ok(())
}

/// Every object of the lab's state to each host's cloisond, with
/// `cloisonctl apply -f`, waiting for each to converge.
fn apply_file(lab: &Lab, verbose: bool) -> Result<()> {
    let file = std::env::temp_dir().join(format!("{}-objects.json", lab.tag));
    std::fs::write(&file, serde_json::to_vec_pretty(&lab.objects_file()?)?)?;
    let path = file.display().to_string();
    for host in lab.hosts.clone() {
        let out = cloisonctl(lab, &host, &["apply", "-f", &path])?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&file);
            bail!(
                "cloisonctl apply on {host}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if verbose {
            println!(
                "  {host}: {} objects applied",
                String::from_utf8_lossy(&out.stdout).lines().count()
            );
        }
        lab.wait_agent(&host)?;
    }
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// Fleet mode: three hosts on a three-member etcd, the IaaS writing to
/// one agent only; traffic and isolation as before; etcd's leader killed
/// under a ping.
fn fleet(summary: &mut Summary) -> Result<()> {
    step("fleet mode: 3 hypervisors, each cloisond on a 3-member etcd cluster (--store etcd)");
    let mut lab = Lab::two_hosts(UplinkHook::Auto)?;
    lab.add_third_host()?;
    lab.start_etcd(3)?;
    println!("  etcd members {}", lab.etcd_endpoints());
    lab.start_fleet_agents()?;
    step("the IaaS side: every object to hv1's cloisond only, with cloisonctl apply -f");
    let file = std::env::temp_dir().join(format!("{}-objects.json", lab.tag));
    std::fs::write(&file, serde_json::to_vec_pretty(&lab.objects_file()?)?)?;
    let out = cloisonctl(
        &lab,
        "hv1",
        &["--json", "apply", "-f", &file.display().to_string()],
    );
    let _ = std::fs::remove_file(&file);
    let out = out?;
    if !out.status.success() {
        bail!(
            "cloisonctl apply on hv1: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let applied: Value = serde_json::from_slice(&out.stdout)?;
    let applied = applied.as_array().cloned().unwrap_or_default();
    let generation = applied
        .iter()
        .filter_map(|v| v["generation"].as_u64())
        .max()
        .unwrap_or(0);
    println!("  hv1: {} objects applied", applied.len());
    let started = Instant::now();
    lab.wait_fleet(generation)?;
    println!(
        "  generation {generation} (etcd's revision) in every host's kernel {} ms after the last write (the first apply: programs loaded and attached)",
        started.elapsed().as_millis()
    );
    println!("  $ cloisonctl fleet");
    for l in String::from_utf8_lossy(&cloisonctl(&lab, "hv3", &["fleet"])?.stdout).lines() {
        println!("    {l}");
    }
    let checks = [
        ("a1", "10.0.0.2", "hv1 -> hv2"),
        ("a2", "10.0.0.4", "hv2 -> hv3"),
        ("a4", "10.0.0.1", "hv3 -> hv1"),
        ("b1", "10.0.0.2", "tenant b, hv1 -> hv2"),
    ];
    let mut ok = 0;
    for (from, to, what) in checks {
        let r = lab.ping(from, to, 2);
        println!(
            "  {from} -> {to} ({what}): {}",
            if r { "ok" } else { "FAILED" }
        );
        ok += usize::from(r);
    }
    let crossed = lab.ping("b2", "10.0.0.4", 1);
    println!(
        "  b2 -> 10.0.0.4 (tenant a's VM on hv3): {}",
        if crossed {
            "REACHED (bug)"
        } else {
            "unreachable, as it must be"
        }
    );
    summary.add(
        "fleet: one write, every host",
        format!(
            "{ok}/{} pings across three hosts, tenant b kept out",
            checks.len()
        ),
        ok == checks.len() && !crossed,
    );

    step("fleet: etcd's leader killed with SIGKILL under a 250 pps ping a4 -> a2, a write through hv2 meanwhile");
    let ping = lab::ping_in_background(&lab, "a4", "10.0.0.2", 750, "0.004");
    let during = leader_killed(&mut lab);
    let (sent, received) = lab::ping_result(ping);
    let (leader, written, new_leader) = during?;
    println!("  killed etcd member m{leader}, the leader");
    println!("  new leader m{new_leader}; the write through hv2 (generation {written}) is in every kernel");
    println!("  {sent} packets transmitted, {received} received");
    summary.add(
        "fleet: etcd leader killed",
        format!("{received}/{sent} pings answered, the next write applied everywhere"),
        sent == received && sent > 0,
    );
    step("cleaning up");
    lab.cleanup();
    Ok(())
}

fn cloisonctl(lab: &Lab, host: &str, args: &[&str]) -> Result<std::process::Output> {
    let a = lab
        .agents
        .iter()
        .find(|a| a.host == host)
        .context("an agent for this host")?;
    let bin = lab::cloisond_path()?.with_file_name("cloisonctl");
    Command::new(&bin)
        .arg("--endpoint")
        .arg(format!("unix:{}", a.socket.display()))
        .args(args)
        .output()
        .with_context(|| format!("run {}", bin.display()))
}

fn iaas_applies(lab: &Lab) -> Result<()> {
    step("the IaaS side: every object to each host's cloisond, with cloisonctl apply -f");
    apply_file(lab, true)?;
    for args in [vec!["list", "ports"], vec!["status"]] {
        println!("  $ cloisonctl {}", args.join(" "));
        let out = cloisonctl(lab, "hv1", &args)?;
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            println!("    {l}");
        }
    }
    println!(
        "  namespaces {}-*, pins under {}/hv*",
        lab.tag,
        lab.pin_root.display()
    );
    for v in &lab.vms {
        println!(
            "  VM {:<3} tenant {} on {}  {}  {}  {}",
            v.name, v.tenant, v.host, v.mac, v.ip, v.ip6
        );
    }
    println!("  kernel VXLAN peer (hv3, Linux vxlan device): tenant a, 10.0.0.9");
    Ok(())
}

/// The VMs boot as cloud images do: no address until their DHCP client
/// (busybox udhcpc in tenant a, ISC dhclient in tenant b) and SLAAC
/// configure them from their host's agent; then each asks the metadata
/// service who it is. The clients are kept until the lab goes.
fn boot(lab: &Lab, summary: &mut Summary) -> Result<Vec<lab::DhcpClient>> {
    step("VMs boot with no address: DHCP (udhcpc in tenant a, dhclient in tenant b), SLAAC, metadata, all from their host's cloisond");
    let vms: Vec<lab::Vm> = lab
        .vms
        .iter()
        .filter(|v| v.host != "hv3")
        .cloned()
        .collect();
    for v in &vms {
        lab.boot(&v.name)?;
    }
    let mut clients = Vec::new();
    let mut leased = 0;
    for v in &vms {
        let (client, how) = if v.tenant == 'a' {
            (lab.udhcpc(&v.name, false), "udhcpc")
        } else {
            (lab.dhclient(&v.name), "dhclient")
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                println!("  {:<3} {how}: FAIL {e:#}", v.name);
                continue;
            }
        };
        let (addrs, routes, mtu) = lab.vm_config(&v.name, "-4")?;
        let got = addrs.contains(&format!("inet {}/24 ", v.ip));
        leased += got as usize;
        let routes: Vec<&str> = routes
            .lines()
            .filter(|l| l.contains(" via "))
            .map(str::trim)
            .collect();
        println!(
            "  {:<3} {how:<8} {}/24 mtu {mtu}  routes: {}",
            v.name,
            if got { v.ip.to_string() } else { "FAIL".into() },
            routes.join(", ")
        );
        clients.push(client);
    }
    let mut slaac = 0;
    for v in &vms {
        let ip6 = v.ip6.to_string();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut have = false;
        while !have && std::time::Instant::now() < end {
            let (addrs, routes, _) = lab.vm_config(&v.name, "-6")?;
            have = addrs.contains(&ip6)
                && !addrs.contains("tentative")
                && routes.contains("default via fe80::");
            if !have {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        slaac += have as usize;
        println!(
            "  {:<3} SLAAC    {}  {}",
            v.name,
            if have { ip6.as_str() } else { "FAIL" },
            if have {
                "default router: the gateway's link-local address"
            } else {
                ""
            }
        );
    }
    let mut answers = Vec::new();
    for vm in ["a1", "b1"] {
        let id = lab
            .metadata(vm, "/latest/meta-data/instance-id")
            .unwrap_or_else(|e| format!("FAIL {e:#}"));
        let doc = lab
            .metadata(vm, "/openstack/latest/meta_data.json")
            .unwrap_or_else(|e| format!("FAIL {e:#}"));
        println!("  {vm}  $ curl http://169.254.169.254/latest/meta-data/instance-id  -> {id}");
        println!("  {vm}  $ curl http://169.254.169.254/openstack/latest/meta_data.json -> {doc}");
        answers.push(id == format!("i-{vm}"));
    }
    summary.add(
        "VMs boot from gateway services",
        format!(
            "{leased}/{n} DHCP leases (udhcpc, dhclient), {slaac}/{n} SLAAC addresses, metadata: a1 and b1 (same IP and MAC) each their own instance {}",
            if answers.iter().all(|a| *a) { "ok" } else { "FAILED" },
            n = vms.len()
        ),
        leased == vms.len() && slaac == vms.len() && answers.iter().all(|a| *a),
    );
    Ok(clients)
}

/// Each (from, to, what) ping, `count` echoes, printed: how many were
/// answered.
fn pings(lab: &Lab, checks: &[(&str, &str, &str)], count: u32) -> usize {
    let mut ok = 0;
    for (from, to, what) in checks {
        let reached = lab.ping(from, to, count);
        ok += reached as usize;
        println!(
            "  ping {from} -> {to:<10} {:<4} {what}",
            if reached { "ok" } else { "FAIL" }
        );
    }
    ok
}

fn traffic(lab: &Lab, summary: &mut Summary) {
    step("traffic within each tenant");
    let a1_ip6 = lab.vm("a1").ip6.to_string();
    let checks = [
        ("a1", "10.0.0.2", "tenant a, hv1 -> hv2 (VXLAN)"),
        ("a1", "10.0.0.3", "tenant a, on hv1 (redirect)"),
        ("a2", a1_ip6.as_str(), "tenant a, IPv6 hv2 -> hv1 (SLAAC)"),
        (
            "b1",
            "10.0.0.2",
            "tenant b, hv1 -> hv2 (same IPs, other VNI)",
        ),
        ("a1", "10.0.0.9", "tenant a -> kernel VXLAN peer"),
    ];
    let ok = pings(lab, &checks, 3);
    let msg = b"hello from tenant a";
    let tcp = lab::tcp_echo(lab, "a1", "a2", msg).is_ok_and(|g| g == msg);
    println!("  TCP a1 -> a2 echo: {}", if tcp { "ok" } else { "FAIL" });
    summary.add(
        "traffic within tenants",
        format!(
            "{ok}/{} pings answered (v4, v6, local, across hosts, kernel peer); TCP echo {}",
            checks.len(),
            if tcp { "ok" } else { "failed" }
        ),
        ok == checks.len() && tcp,
    );
}

fn isolation(lab: &Lab, summary: &mut Summary) -> Result<()> {
    step("isolation: tenant b captures while tenant a talks");
    let cap = lab::Capture::start(&lab.vm("b2").ns)?;
    let marker = b"cloison-demo-tenant-a-secret";
    let echoed = lab::tcp_echo(lab, "a1", "a2", marker).is_ok();
    // b1 pings b2 meanwhile: a capture that sees its own tenant's frames
    // is one that would have seen a's.
    let b2 = lab.vm("b2").ip.to_string();
    let own = lab.ping("b1", &b2, 2);
    let frames = cap.finish()?;
    let leaked = frames.iter().filter(|f| lab::contains(f, marker)).count();
    println!(
        "  b2 captured {} frames (b1's pings among them: {own}), {leaked} carrying tenant a's data (a1 -> a2 echoed: {echoed})",
        frames.len()
    );
    let crossed = lab.ping("b1", "10.0.0.9", 1);
    println!(
        "  b1 -> 10.0.0.9 (tenant a's kernel peer): {}",
        if crossed {
            "REACHED (bug)"
        } else {
            "unreachable, as it must be"
        }
    );
    summary.add(
        "isolation between tenants",
        format!(
            "{leaked} of {} frames b2 captured (b1's pings seen: {own}) carried a's data (a1 -> a2 echoed: {echoed}); b1 -> a's peer {}",
            frames.len(),
            if crossed { "REACHED" } else { "unreachable" }
        ),
        leaked == 0 && !crossed && echoed && own && !frames.is_empty(),
    );
    Ok(())
}

fn security_groups(lab: &mut Lab, summary: &mut Summary) -> Result<()> {
    step("security groups: a1 in web (TCP 8080-8081 from group client), a2 in client, a3 in plain");
    lab.web_and_client();
    lab.apply()?;
    let wait = Duration::from_secs(1);
    let a1: std::net::IpAddr = lab.vm("a1").ip.into();
    let tcp_to_a1 = |from: &str, port| {
        lab::tcp_echo_to(lab, from, "a1", a1, port, b"sg", wait).is_ok_and(|g| g == b"sg")
    };
    let checks = [
        (
            "a2 -> a1 tcp 8080 (a2 in client, across hosts)",
            tcp_to_a1("a2", 8080),
            true,
        ),
        (
            "a3 -> a1 tcp 8080 (a3 not in client, same host)",
            tcp_to_a1("a3", 8080),
            false,
        ),
        ("a2 -> a1 tcp 9090 (no rule)", tcp_to_a1("a2", 9090), false),
        (
            "a2 -> a1 ping (icmp from anywhere)",
            lab.ping("a2", "10.0.0.1", 2),
            true,
        ),
        (
            "a1 -> a2 ping (client takes nothing in)",
            lab.ping("a1", "10.0.0.2", 2),
            false,
        ),
    ];
    let mut right = 0;
    for (what, got, want) in checks {
        right += (got == want) as usize;
        println!(
            "  {:<8} {what}{}",
            if got { "passes" } else { "refused" },
            if got == want { "" } else { "   <- WRONG" }
        );
    }
    summary.add(
        "security groups",
        format!("{right}/{} verdicts as the rules say", checks.len()),
        right == checks.len(),
    );
    diagnostics(lab, summary)?;
    let stream = lab::TcpStreamProbe::start(lab, "a2", "a1", 8081)?;
    let before = stream.progress(Duration::from_secs(1));
    lab.set_groups(&[("a2", "plain")]);
    lab.apply()?;
    std::thread::sleep(Duration::from_millis(300));
    let after = stream.progress(Duration::from_secs(1));
    drop(stream);
    println!(
        "  revoke: a2 leaves client while streaming to a1:8081: {before} B/s before, {after} B/s after"
    );
    summary.add(
        "strict revoke of a live stream",
        format!("{before} B/s before a2 left the group, {after} B/s after"),
        before > 0 && after == 0,
    );
    lab.set_groups(&[
        ("a1", "a-default"),
        ("a2", "a-default"),
        ("a3", "a-default"),
    ]);
    lab.apply()
}

/// What an operator sees of a refused connection: the trace of a2's SYN to
/// a1:9090 on both hosts (kernel beside model), and the drop streamed by
/// hv1's monitor while a2 tries it for real.
fn diagnostics(lab: &Lab, summary: &mut Summary) -> Result<()> {
    step("diagnostics: cloisonctl trace of a2 -> a1:9090 on both hosts, then cloisonctl monitor on hv1 while a2 tries it");
    let peer = format!("hv1={}", lab.agent_endpoint("hv1"));
    let flow = "tcp 10.0.0.2:40000 > 10.0.0.1:9090 flags S";
    let (ok, out, err) = lab.cloisonctl(
        "hv2",
        &["trace", "--port", "a2", flow, "--follow", "--peer", &peer],
    )?;
    println!("  $ cloisonctl trace --port a2 '{flow}' --follow --peer hv1=...");
    for l in out.lines() {
        println!("  | {l}");
    }
    if !ok {
        println!("  trace failed: {err}");
    }
    let (_, minimal, _) = lab.cloisonctl(
        "hv2",
        &[
            "trace",
            "--port",
            "a2",
            flow,
            "--follow",
            "--peer",
            &peer,
            "--minimal",
        ],
    )?;
    let traced = ok
        && minimal.matches("agree\n").count() == 2
        && minimal.contains("kernel drop:sg_ingress_denied");
    let mut monitor = Command::new(lab::cloisonctl_path()?)
        .args([
            "--endpoint",
            &lab.agent_endpoint("hv1"),
            "monitor",
            "--port",
            "a1",
            "--drops",
        ])
        .args(["--filter", "tcp dport 9090", "--count", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cloisonctl monitor")?;
    std::thread::sleep(Duration::from_millis(500));
    let a1: std::net::IpAddr = lab.vm("a1").ip.into();
    let _ = lab::tcp_echo_to(lab, "a2", "a1", a1, 9090, b"x", Duration::from_secs(1));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while monitor.try_wait()?.is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = monitor.kill();
    let out = monitor.wait_with_output()?;
    let seen = String::from_utf8_lossy(&out.stdout).into_owned();
    println!(
        "  $ cloisonctl monitor --port a1 --drops --filter 'tcp dport 9090' --count 1   (on hv1)"
    );
    for l in seen.lines() {
        println!("  | {l}");
    }
    let monitored = seen.contains("drop sg_ingress_denied") && seen.contains("a1 (tenant-a)");
    summary.add(
        "trace and monitor",
        format!(
            "a2 -> a1:9090 traced on both hosts, kernel and model agree: {traced}; the real SYN's drop streamed by hv1's monitor with port and reason: {monitored}"
        ),
        traced && monitored,
    );
    Ok(())
}

/// Kills etcd's leader, then writes through hv2 until it is taken and in
/// every kernel: (the leader killed, the write's generation, the new leader).
fn leader_killed(lab: &mut Lab) -> Result<(usize, u64, usize)> {
    std::thread::sleep(Duration::from_millis(500));
    let leader = lab.etcd_leader()?;
    lab.kill_etcd(leader);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = serde_json::json!({"tenant": "tenant-a", "rules": [{"direction": "ingress", "protocol": "tcp", "ports": "22"}]});
    let deadline = Instant::now() + Duration::from_secs(10);
    let written = loop {
        let a = rt.block_on(
            lab.agent_client("hv2")
                .put("/v1/security-groups/a-ssh", &body),
        )?;
        if a.status < 300 {
            break a.json()?["generation"].as_u64().unwrap_or(0);
        }
        if Instant::now() > deadline {
            bail!(
                "no write went through after the leader was killed: {}",
                String::from_utf8_lossy(&a.body)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    lab.wait_fleet(written)?;
    Ok((leader, written, lab.etcd_leader()?))
}

fn hitless_restart(lab: &mut Lab, summary: &mut Summary) -> Result<()> {
    step("hitless: hv1's agent killed with SIGKILL and restarted under a 250 pps ping a1 -> a2");
    let ping = Command::new("ip")
        .args(["netns", "exec", &lab.vm("a1").ns])
        .args([
            "ping", "-q", "-i", "0.004", "-c", "500", "-W", "1", "10.0.0.2",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    lab.kill_agent("hv1");
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    lab.restart_agent("hv1")?;
    lab.wait_agent("hv1")?;
    let back = killed.elapsed();
    let out = ping.wait_with_output()?;
    let summary_line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("no ping summary")
        .to_string();
    println!("  {summary_line}");
    summary.add(
        "agent SIGKILL + restart",
        format!(
            "{summary_line} (agent back and converged {} ms after the kill)",
            back.as_millis()
        ),
        summary_line.contains(" 0% packet loss"),
    );
    Ok(())
}

fn throughput(lab: &Lab, summary: &mut Summary) {
    step("throughput: iperf3 TCP between VMs on two hosts, 3 s each");
    let cloison = lab::iperf3(&lab.vm("a2").ns, &lab.vm("a1").ns, "10.0.0.2", 3);
    let base = lab::KernelBaseline::new().and_then(|b| lab::iperf3(&b.vm2, &b.vm1, "10.0.0.2", 3));
    match (&cloison, &base) {
        (Ok(c), Ok(b)) => {
            println!(
                "  Cloison {c:.2} Gbit/s, kernel VXLAN+bridge {b:.2} Gbit/s, ratio {:.2}",
                c / b
            );
            summary.add(
                "TCP throughput, one stream",
                format!(
                    "Cloison {c:.2} Gbit/s, kernel VXLAN + bridge + nftables {b:.2} Gbit/s ({:.2}x)",
                    c / b
                ),
                *c > 0.0,
            );
        }
        _ => {
            println!("  Cloison {cloison:?}, kernel baseline {base:?}");
            summary.add(
                "TCP throughput, one stream",
                format!("Cloison {cloison:?}, kernel {base:?}"),
                false,
            );
        }
    }
}

/// Each port's counters from its agent (`GET /v1/ports/{name}/stats`), by
/// name, tenant and network, and each host's drops by reason.
fn counters(lab: &Lab) -> Result<()> {
    step("counters, from each host's agent (cloisonctl stats PORT, /metrics)");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!(
        "  {:<5} {:<4} {:<8} {:<6} {:>10} {:>12} {:>10} {:>12} {:>6}  drops by reason",
        "port", "host", "tenant", "net", "from VM", "bytes", "to VM", "bytes", "drops"
    );
    let mut tenants: std::collections::BTreeMap<String, [u64; 3]> = Default::default();
    for p in &lab.snapshot.ports {
        if !lab.hosts.contains(&p.host) {
            continue; // the kernel peer has no agent
        }
        let net = lab
            .snapshot
            .networks
            .iter()
            .find(|n| n.name == p.network)
            .context("the port's network")?;
        let s: Value = rt
            .block_on(
                lab.agent_client(&p.host)
                    .get(&format!("/v1/ports/{}/stats", p.name)),
            )?
            .json()?;
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let reasons: Vec<String> = s["drops_by_reason"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(r, c)| format!("{r} {c}"))
            .collect();
        println!(
            "  {:<5} {:<4} {:<8} {:<6} {:>10} {:>12} {:>10} {:>12} {:>6}  {}",
            p.name,
            p.host,
            net.tenant,
            net.name,
            n(&s["from_vm"]["packets"]),
            n(&s["from_vm"]["bytes"]),
            n(&s["to_vm"]["packets"]),
            n(&s["to_vm"]["bytes"]),
            n(&s["drops"]),
            reasons.join(", ")
        );
        let t = tenants.entry(net.tenant.clone()).or_default();
        t[0] += n(&s["from_vm"]["packets"]);
        t[1] += n(&s["to_vm"]["packets"]);
        t[2] += n(&s["drops"]);
    }
    for (t, [tx, rx, drops]) in &tenants {
        println!("  tenant {t}: {tx} packets from its VMs, {rx} to them, {drops} dropped");
    }
    for host in &lab.hosts {
        let drops = lab.drops(host)?;
        let all: Vec<String> = drops
            .iter()
            .map(|(r, n)| format!("{} {n}", r.name()))
            .collect();
        println!(
            "  {host} drops by reason: {}",
            if all.is_empty() {
                "(none)".to_string()
            } else {
                all.join(", ")
            }
        );
    }
    Ok(())
}
