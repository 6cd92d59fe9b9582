//! `cargo xtask bench --fleet`: fleet mode on a real etcd (one member, on
//! loopback, started and stopped by its process id). Convergence: the time
//! from a write to every agent's applied generation, with 100 watch-only
//! agents in this process (each the store of a real agent: its watch, its
//! local copy, its reports to etcd, and its host's tables compiled for every
//! state) and with 3 real agents in the netns lab; for one port, and for
//! 10,000 ports written at once. Write throughput through one agent and
//! through three at once. Beside them, in the same run, the floor: as
//! many plain etcd watchers, which only decode and parse the same writes.
//! Results in benches/results/fleet.{json,md}; `CLOISON_FLEET_NO_LAB=1`
//! leaves out the real agents (and writes no results).
//!
//! All of it shares the machine's 2 cores, where a fleet has a machine per
//! host and per etcd member: the figures for 100 agents are those of 100
//! hosts' work on 2 cores.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cloison_control::{
    desired::{parse_body, Kind},
    server::Agent,
    store::{Etcd, EtcdConfig, Redb},
    watch_only::WatchOnly,
};
use cloison_dataplane::UplinkHook;
use serde_json::{json, Value};

use crate::lab::Lab;

fn step(msg: &str) {
    println!("==> {msg}");
}

/// Watch-only agents (`CLOISON_FLEET_AGENTS` overrides).
fn agents_n() -> usize {
    std::env::var("CLOISON_FLEET_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn host(i: usize) -> Value {
    json!({"underlay_ip": format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256)})
}

/// Port `i` of `network` (subnet 10.`octet`.0.0/16) on `host`: interface
/// `tap{i}`, a MAC and an address of its own in the network, no group.
fn port(i: usize, network: &str, octet: u8, host: String) -> Value {
    json!({"network": network, "host": host, "interface": format!("tap{i}"),
        "mac": format!("02:{octet:02x}:00:{:02x}:{:02x}:{:02x}", i >> 16, (i >> 8) & 0xff, i & 0xff),
        "ips": [format!("10.{octet}.{}.{}", 1 + i / 250, 1 + i % 250)], "security_groups": []})
}

/// Port `i` of net-0, on host `i % agents`; in group sg-0 or in none
/// (10,000 members of one remote group would not fit a host's tables).
fn fleet_port(i: usize, grouped: bool, agents: usize) -> Value {
    let mut v = port(i, "net-0", 0, format!("h{:03}", i % agents));
    if grouped {
        v["security_groups"] = json!(["sg-0"]);
    }
    v
}

/// One write through `agent`'s API code path: its generation.
fn write(agent: &Agent, kind: Kind, name: &str, body: &Value) -> Result<u64> {
    let object = parse_body(kind, name, &serde_json::to_vec(body)?)
        .map_err(|e| anyhow::anyhow!("{kind} {name}: {e}"))?;
    let (_, v) = agent
        .write_blocking(kind, name, Some(object))
        .map_err(|e| anyhow::anyhow!("{kind} {name}: {e}"))?;
    v["generation"].as_u64().context("a generation")
}

/// Waits until each of `levels` (who, what it has reached now) is at
/// `target`: how long after `since`.
fn until_all<'a, F: Fn() -> u64>(
    levels: impl IntoIterator<Item = (&'a str, F)>,
    target: u64,
    since: Instant,
) -> Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(120);
    for (who, level) in levels {
        while level() < target {
            if Instant::now() > deadline {
                bail!("{who} never reached {target}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(since.elapsed())
}

/// Waits until every agent has applied `generation`: how long after `since`.
fn converged(agents: &[WatchOnly], generation: u64, since: Instant) -> Result<Duration> {
    until_all(
        agents
            .iter()
            .map(|a| (a.host.as_str(), || a.applied.borrow().generation)),
        generation,
        since,
    )
}

pub fn run() -> Result<()> {
    #[allow(non_snake_case)]
    let AGENTS = agents_n();
    let tag = format!("cloison-fleet-bench-{}", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    let _ = std::fs::remove_dir_all(&dir);
    step("etcd: one member on loopback (Debian's etcd-server)");
    let etcd = cloison_testkit::etcd::LocalEtcd::start(
        &dir.join("etcd"),
        false,
        &[
            "--max-txn-ops",
            "1000",
            "--quota-backend-bytes",
            "8589934592",
        ],
    )
    .map_err(anyhow::Error::msg)?;
    // The hundred watch-only agents share one runtime; the IaaS's writers,
    // which stand for machines of their own, have another, so that their
    // requests do not queue behind the agents' work.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let wrt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cfg = |host: &str| EtcdConfig::new(&etcd.url, host);
    let writer = |name: &str| -> Result<Arc<Agent>> {
        let store = wrt.block_on(Etcd::connect(cfg(name), Redb::open(&dir.join(name))?))?;
        let _g = wrt.enter();
        Ok(Agent::new(name.into(), Box::new(store), dir.join("no-pins"))?.0)
    };
    let w = writer("writer")?;
    for i in 0..AGENTS {
        write(&w, Kind::Host, &format!("h{i:03}"), &host(i))?;
    }
    write(
        &w,
        Kind::Network,
        "net-0",
        &json!({"tenant": "t", "vni": 100, "subnets": ["10.0.0.0/16"]}),
    )?;
    let g = write(
        &w,
        Kind::SecurityGroup,
        "sg-0",
        &json!({"tenant": "t", "rules": [
        {"direction": "egress"}, {"direction": "ingress", "remote": {"group": "sg-0"}}]}),
    )?;

    step("write throughput through one agent (200 sequential PUTs of a security group)");
    let t = Instant::now();
    for i in 0..200 {
        write(
            &w,
            Kind::SecurityGroup,
            &format!("sg-w{i}"),
            &json!({"tenant": "t", "rules": [{"direction": "ingress", "protocol": "tcp", "ports": format!("{}", 1000 + i)}]}),
        )?;
    }
    let one_writer = 200.0 / t.elapsed().as_secs_f64();
    println!("  {one_writer:.0} writes/s");

    step("write throughput through three agents at once (100 PUTs each)");
    let writers: Vec<Arc<Agent>> = (0..3)
        .map(|i| writer(&format!("writer{i}")))
        .collect::<Result<_>>()?;
    let t = Instant::now();
    let threads: Vec<_> = writers
        .iter()
        .enumerate()
        .map(|(k, a)| {
            let a = a.clone();
            std::thread::spawn(move || -> Result<u32> {
                // As an IaaS would: a 503 is tried again.
                let mut refused = 0;
                for i in 0..100 {
                    let name = format!("sg-{k}-{i}");
                    while let Err(e) = write(
                        &a,
                        Kind::SecurityGroup,
                        &name,
                        &json!({"tenant": "t", "rules": []}),
                    ) {
                        if !e.to_string().contains("503") || refused > 1000 {
                            return Err(e);
                        }
                        refused += 1;
                    }
                }
                Ok(refused)
            })
        })
        .collect();
    let mut refused = 0;
    for th in threads {
        refused += th
            .join()
            .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
    }
    let three_writers = 300.0 / t.elapsed().as_secs_f64();
    println!("  {three_writers:.0} writes/s in all (each checked on the fleet's state, again when another committed first); {refused} answered 503 after 8 such rounds, and sent again");

    step(&format!("the floor: {AGENTS} plain etcd watchers (decode and parse each event, nothing else), the same writes"));
    let (floor_one, floor_bulk) = {
        let watchers = plain_watchers(&rt, &etcd.url, AGENTS)?;
        let mut c = wrt.block_on(etcd_client::Client::connect([etcd.url.as_str()], None))?;
        let mut one = Vec::new();
        for i in 0..50 {
            let t = Instant::now();
            let r = wrt.block_on(c.put(
                format!("{FLOOR}/objects/ports/p{i}"),
                fleet_port(i, true, AGENTS).to_string(),
                None,
            ))?;
            let rev = r.header().map_or(0, |h| h.revision()) as u64;
            one.push(seen(&watchers, rev, t)?.as_secs_f64() * 1e3);
        }
        let t = Instant::now();
        let last = wrt.block_on(bulk_ports(&etcd.url, FLOOR, 50, 10_050, AGENTS))?;
        let bulk = seen(&watchers, last, t)?;
        for (_, task) in watchers {
            task.abort();
        }
        (
            (percentile(&mut one, 0.5), percentile(&mut one, 0.99)),
            bulk,
        )
    };
    println!(
        "  one port: p50 {:.1} ms, p99 {:.1} ms; 10,000 ports: all {AGENTS} saw the last {:.0} ms after the first write",
        floor_one.0,
        floor_one.1,
        floor_bulk.as_secs_f64() * 1e3
    );

    step(&format!("{AGENTS} watch-only agents (each: its watch, local copy, reports, tables compiled per state)"));
    let started = Instant::now();
    let agents: Vec<WatchOnly> = (0..AGENTS)
        .map(|i| {
            let h = format!("h{i:03}");
            rt.block_on(WatchOnly::start(cfg(&h), &dir.join(&h)))
                .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    let cold = converged(&agents, g, started)?;
    println!(
        "  all {AGENTS} listed and applied the first state in {:.0} ms",
        cold.as_secs_f64() * 1e3
    );

    step(&format!(
        "convergence, one port: a PUT through one agent until all {AGENTS} applied it (50 times)"
    ));
    let (mut one, mut answered) = (Vec::new(), Vec::new());
    for i in 0..50 {
        let t = Instant::now();
        let g = write(
            &w,
            Kind::Port,
            &format!("p{i}"),
            &fleet_port(i, true, AGENTS),
        )?;
        answered.push(t.elapsed().as_secs_f64() * 1e3);
        one.push(converged(&agents, g, t)?.as_secs_f64() * 1e3);
    }
    let answered_p50 = percentile(&mut answered, 0.5);
    let (one_p50, one_p99, one_max) = (
        percentile(&mut one, 0.5),
        percentile(&mut one, 0.99),
        percentile(&mut one, 1.0),
    );
    println!("  p50 {one_p50:.1} ms, p99 {one_p99:.1} ms, max {one_max:.1} ms (the PUT answered: p50 {answered_p50:.1} ms)");

    step(&format!("convergence, 10,000 ports: written into etcd in transactions of 500, until all {AGENTS} applied the last"));
    let t = Instant::now();
    let last = wrt.block_on(bulk_ports(&etcd.url, STATE, 50, 10_050, AGENTS))?;
    let written = t.elapsed();
    let bulk = converged(&agents, last, t)?;
    println!(
        "  written in {:.0} ms; every agent applied it {:.0} ms after the first write",
        written.as_secs_f64() * 1e3,
        bulk.as_secs_f64() * 1e3
    );
    drop(agents);
    drop(writers);
    drop(w);

    step("convergence with 3 real agents (cloisond in the netns lab, kernels programmed): 30 PUTs, then 10,000 ports at once");
    if std::env::var_os("CLOISON_FLEET_NO_LAB").is_some() {
        println!("  skipped (CLOISON_FLEET_NO_LAB)");
        drop(etcd);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    let ((real_p50, real_p99), (real_written, real_bulk)) = real_agents()?;
    println!("  p50 {real_p50:.1} ms, p99 {real_p99:.1} ms; 10,000 ports: written in {real_written:.0} ms, in all three kernels {real_bulk:.0} ms after the first write");

    let date = crate::bench::utc_now()?;
    let results = json!({
        "date": date,
        "agents": AGENTS,
        "cold_start_ms": cold.as_secs_f64() * 1e3,
        "one_port_ms": {"p50": one_p50, "p99": one_p99, "max": one_max},
        "plain_watchers_ms": {"one_port": {"p50": floor_one.0, "p99": floor_one.1}, "ten_thousand_ports": floor_bulk.as_secs_f64() * 1e3},
        "ten_thousand_ports_ms": {"written": written.as_secs_f64() * 1e3, "applied_everywhere": bulk.as_secs_f64() * 1e3},
        "three_real_agents_ms": {"p50": real_p50, "p99": real_p99,
            "ten_thousand_ports": {"written": real_written, "applied_everywhere": real_bulk}},
        "writes_per_s": {"one_agent": one_writer, "three_agents": three_writers, "three_agents_503": refused},
    });
    let md = format!(
        "Fleet mode ({}), one etcd member on loopback, 2 cores:\n\n\
         | | |\n|---|---|\n\
         | one port, PUT to applied on all {AGENTS} watch-only agents | p50 {one_p50:.1} ms, p99 {one_p99:.1} ms |\n\
         | the floor: one port, put to seen by {AGENTS} plain etcd watchers | p50 {:.1} ms, p99 {:.1} ms |\n\
         | 10,000 ports (transactions of 500), first write to applied on all {AGENTS} | {:.0} ms (written in {:.0} ms) |\n\
         | the floor: 10,000 ports, first write to seen by {AGENTS} plain etcd watchers | {:.0} ms |\n\
         | one PUT, to applied in 3 real agents' kernels | p50 {real_p50:.1} ms, p99 {real_p99:.1} ms |\n\
         | 10,000 ports (transactions of 500), first write to applied in 3 real agents' kernels | {real_bulk:.0} ms (written in {real_written:.0} ms) |\n\
         | writes through one agent | {one_writer:.0}/s |\n\
         | writes through three agents at once | {three_writers:.0}/s in all ({refused} sent again after a 503) |\n\
         | {AGENTS} agents' first list and apply | {:.0} ms |\n",
        date,
        floor_one.0,
        floor_one.1,
        bulk.as_secs_f64() * 1e3,
        written.as_secs_f64() * 1e3,
        floor_bulk.as_secs_f64() * 1e3,
        cold.as_secs_f64() * 1e3,
    );
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
    crate::bench::write_results("fleet", &results, &md)
}

/// Ports `from..to` of the watch-only agents' network, straight into
/// etcd's keys: the last transaction's revision.
async fn bulk_ports(url: &str, root: &str, from: usize, to: usize, agents: usize) -> Result<u64> {
    let objects = (from..to)
        .map(|k| {
            let mut v = fleet_port(k, false, agents);
            v["name"] = format!("p{k}").into();
            v
        })
        .collect();
    bulk_write(url, root, objects, 500).await
}

/// Where the agents' state is in etcd.
const STATE: &str = "/cloison/state";
/// Where the plain watchers' copy of the same writes goes.
const FLOOR: &str = "/cloison-bench-floor";

/// The highest revision a plain watcher saw, and its task.
type PlainWatcher = (
    tokio::sync::watch::Receiver<u64>,
    tokio::task::JoinHandle<()>,
);

/// `n` plain etcd watchers of `FLOOR` on `rt`, each on a connection of its
/// own as an agent is, doing what any client must with each event (decode
/// it, parse its JSON) and nothing else: the highest revision each saw.
fn plain_watchers(rt: &tokio::runtime::Runtime, url: &str, n: usize) -> Result<Vec<PlainWatcher>> {
    use etcd_client::{Client, WatchOptions};
    let mut ready = Vec::new();
    let watchers = (0..n)
        .map(|_| {
            let (tx, rx) = tokio::sync::watch::channel(0u64);
            let (up, is_up) = tokio::sync::oneshot::channel::<()>();
            ready.push(is_up);
            let url = url.to_string();
            let task = rt.spawn(async move {
                let Ok(mut c) = Client::connect([url], None).await else {
                    return;
                };
                let Ok(mut stream) = c
                    .watch(FLOOR, Some(WatchOptions::new().with_prefix()))
                    .await
                else {
                    return;
                };
                let _ = up.send(());
                while let Ok(Some(m)) = stream.message().await {
                    let mut seen = 0;
                    for kv in m.events().iter().filter_map(|e| e.kv()) {
                        let _: Option<Value> = serde_json::from_slice(kv.value()).ok();
                        seen = seen.max(kv.mod_revision() as u64);
                    }
                    tx.send_if_modified(|hi| {
                        let more = seen > *hi;
                        *hi = (*hi).max(seen);
                        more
                    });
                }
            });
            (rx, task)
        })
        .collect();
    for r in ready {
        rt.block_on(r).context("a plain watcher could not watch")?;
    }
    Ok(watchers)
}

/// Waits until every plain watcher has seen `revision`: how long after
/// `since`.
fn seen(watchers: &[PlainWatcher], revision: u64, since: Instant) -> Result<Duration> {
    until_all(
        watchers
            .iter()
            .map(|(w, _)| ("a plain watcher", || *w.borrow())),
        revision,
        since,
    )
}

/// `ports` (each with its `name`) straight into etcd's keys under `root`
/// (the agents' is `/cloison/state`), `per` to a transaction (each moving
/// `generation`, as the API's writes do), as an IaaS that writes them all
/// at once would: the last transaction's revision.
async fn bulk_write(url: &str, root: &str, ports: Vec<Value>, per: usize) -> Result<u64> {
    use etcd_client::{Client, Txn, TxnOp};
    let mut c = Client::connect([url], None).await?;
    let mut last = 0;
    for chunk in ports.chunks(per) {
        let mut ops: Vec<TxnOp> = chunk
            .iter()
            .map(|v| {
                let name = v["name"].as_str().unwrap_or_default();
                TxnOp::put(format!("{root}/objects/ports/{name}"), v.to_string(), None)
            })
            .collect();
        ops.push(TxnOp::put(format!("{root}/generation"), "bench", None));
        let r = c.txn(Txn::new().and_then(ops)).await?;
        last = r.header().map_or(0, |h| h.revision()) as u64;
    }
    Ok(last)
}

/// 30 PUTs through hv1 of a three-host lab in fleet mode, each timed until
/// all three kernels hold it (the agents' status polled): (p50, p99) in ms;
/// then 10,000 ports of a new network written into etcd at once, until all
/// three kernels hold them: (written, applied) in ms.
fn real_agents() -> Result<((f64, f64), (f64, f64))> {
    let mut lab = Lab::two_hosts(UplinkHook::Xdp)?;
    lab.add_third_host()?;
    lab.start_etcd(1)?;
    lab.start_fleet_agents()?;
    lab.apply_via_fleet("hv1")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let c = lab.agent_client("hv1");
    let clients: Vec<_> = ["hv1", "hv2", "hv3"]
        .iter()
        .map(|h| lab.agent_client(h))
        .collect();
    let mut times = Vec::new();
    for i in 0..30 {
        let t = Instant::now();
        let a = rt.block_on(c.put(&format!("/v1/security-groups/bench-{i}"), &json!({"tenant": "tenant-a", "rules": [{"direction": "ingress", "protocol": "tcp", "ports": format!("{}", 2000 + i)}]})))?;
        let g = a.json()?["generation"].as_u64().context("a generation")?;
        for c in &clients {
            while rt.block_on(c.get("/v1/status"))?.json()?["applied_generation"].as_u64() < Some(g)
            {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    rt.block_on(c.put(
        "/v1/networks/bulk",
        &json!({"tenant": "bulk", "vni": 4000, "subnets": ["10.60.0.0/16"]}),
    ))?;
    // Ports on the three hosts in turn, their interfaces absent (as VMs
    // not started yet): each kernel gets every forwarding and neighbour
    // entry of the network.
    let ports: Vec<Value> = (0..10_000usize)
        .map(|i| {
            let mut v = port(i, "bulk", 60, format!("hv{}", 1 + i % 3));
            v["name"] = format!("bulk-{i}").into();
            v["interface"] = format!("bk{i}").into();
            v
        })
        .collect();
    let url = lab
        .etcd_endpoints()
        .split(',')
        .next()
        .unwrap_or_default()
        .to_string();
    let t = Instant::now();
    // Written from etcd's namespace, where its client URL answers.
    let last = crate::lab::in_netns(&lab.ns("etcd"), move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(bulk_write(&url, STATE, ports, 500))
    })?;
    let written = t.elapsed().as_secs_f64() * 1e3;
    lab.wait_fleet(last)?;
    let applied = t.elapsed().as_secs_f64() * 1e3;
    lab.cleanup();
    Ok((
        (percentile(&mut times, 0.5), percentile(&mut times, 0.99)),
        (written, applied),
    ))
}
