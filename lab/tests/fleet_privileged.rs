//! Fleet mode (`--store etcd`) in the netns lab: a real etcd server (one
//! member, or a cluster of three) on the underlay, each host's `cloisond`
//! in its namespace on it, driven through the API. Run as root (`cargo
//! xtask test`).
use std::time::{Duration, Instant};

use cloison_control::client::{Answer, Client};
use cloison_dataplane::UplinkHook;
use cloison_lab::lab::*;
use serde_json::{json, Value};

fn need_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the fleet tests need root: run them through `cargo xtask test` as root"
    );
}

/// The two-host lab on an etcd of `members`, its agents in fleet mode, the
/// lab's state written through hv1's agent only and applied by both.
fn fleet(members: usize) -> (Lab, u64) {
    need_root();
    let mut lab = Lab::two_hosts(UplinkHook::Xdp).expect("lab");
    lab.start_etcd(members).expect("etcd");
    lab.start_fleet_agents().expect("agents");
    let g = lab.apply_via_fleet("hv1").expect("state through hv1 only");
    (lab, g)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn code(a: &Answer) -> (u16, String) {
    let v: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
    (
        a.status,
        v["error"]["code"].as_str().unwrap_or_default().to_string(),
    )
}

fn network(vni: u32) -> Value {
    json!({"tenant": "tenant-c", "vni": vni, "subnets": ["10.9.0.0/24"]})
}

/// The objects an agent serves, `{kind}/{name}` to their fields (without
/// `generation`, which etcd's listing does not carry).
fn served(rt: &tokio::runtime::Runtime, c: &Client) -> std::collections::BTreeMap<String, Value> {
    let mut out = std::collections::BTreeMap::new();
    for kind in ["hosts", "networks", "security-groups", "ports"] {
        let list = rt.block_on(c.get(&format!("/v1/{kind}"))).expect("list");
        for mut o in list
            .json()
            .expect("json")
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let name = o["name"].as_str().unwrap_or_default().to_string();
            o.as_object_mut().unwrap().remove("generation");
            out.insert(format!("{kind}/{name}"), o);
        }
    }
    out
}

#[test]
fn privileged_fleet_one_write_applied_by_all_and_conflicts_refused_once() {
    let (lab, generation) = fleet(1);
    let rt = rt();
    let (c1, c2) = (lab.agent_client("hv1"), lab.agent_client("hv2"));

    // Written through hv1 only: hv2 serves the same objects and forwards.
    assert_eq!(
        served(&rt, &c1),
        served(&rt, &c2),
        "both agents serve one state"
    );
    assert!(lab.ping("a1", "10.0.0.2", 3), "a1 -> a2 across hosts");
    assert!(lab.ping("b1", "10.0.0.2", 3), "b1 -> b2 across hosts");
    assert!(!lab.ping("a1", "10.0.0.9", 1), "nothing of tenant b for a");
    let s2 = rt.block_on(c2.get("/v1/status")).unwrap().json().unwrap();
    assert_eq!(s2["store"], "etcd: connected");
    assert!(s2["applied_generation"].as_u64() >= Some(generation));
    // Each agent tells the fleet what it applied (at most once a second).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let fleet = rt.block_on(c2.get("/v1/fleet")).unwrap();
        assert_eq!(fleet.status, 200);
        let fleet = fleet.json().unwrap();
        let members = fleet.as_array().expect("a list").clone();
        assert_eq!(members.len(), 2, "{fleet}");
        let done = members
            .iter()
            .all(|m| m["up"] == true && m["applied_generation"].as_u64() >= Some(generation));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet never said so: {fleet}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The same VNI to both agents at the same moment: exactly one wins.
    for round in 0..5u32 {
        let vni = 5000 + round;
        let (pa, pb, body) = (
            format!("/v1/networks/c-x{round}"),
            format!("/v1/networks/c-y{round}"),
            network(vni),
        );
        let (a, b) = rt.block_on(async { tokio::join!(c1.put(&pa, &body), c2.put(&pb, &body)) });
        let (a, b) = (a.unwrap(), b.unwrap());
        let mut got = [code(&a), code(&b)];
        got.sort();
        assert_eq!(
            got,
            [(201, String::new()), (409, "conflict".into())],
            "round {round}: {} / {}",
            String::from_utf8_lossy(&a.body),
            String::from_utf8_lossy(&b.body)
        );
    }
    // One VNI of the fleet's is in use once: etcd holds five networks of
    // tenant c, VNIs all different.
    let objects = lab.etcd_objects().expect("etcd");
    let vnis: std::collections::BTreeSet<u64> = objects
        .iter()
        .filter(|(k, _)| k.starts_with("networks/c-"))
        .map(|(_, v)| v["vni"].as_u64().unwrap())
        .collect();
    assert_eq!(vnis.len(), 5, "{objects:?}");

    // A network deleted on one agent while a port is created on it through
    // the other: the port exists only if its network does.
    for round in 0..5u32 {
        let net = format!("c-d{round}");
        let put = rt.block_on(c1.put(&format!("/v1/networks/{net}"), &network(6000 + round)));
        assert_eq!(put.unwrap().status, 201);
        let port = json!({"network": net, "host": "hv2", "interface": format!("tapc{round}"),
            "mac": "02:00:00:00:0c:01", "ips": ["10.9.0.5"], "security_groups": []});
        let (pd, pp) = (
            format!("/v1/networks/{net}"),
            format!("/v1/ports/c-p{round}"),
        );
        let (del, put) = rt.block_on(async { tokio::join!(c1.delete(&pd), c2.put(&pp, &port)) });
        let (del, put) = (del.unwrap(), put.unwrap());
        let outcome = (code(&del), code(&put));
        assert!(
            outcome == ((204, String::new()), (409, "conflict".into()))
                || outcome == ((409, "conflict".into()), (201, String::new())),
            "round {round}: {outcome:?}"
        );
        let objects = lab.etcd_objects().expect("etcd");
        let has_port = objects.contains_key(&format!("ports/c-p{round}"));
        let has_net = objects.contains_key(&format!("networks/{net}"));
        assert!(
            !has_port || has_net,
            "a port on a deleted network: {objects:?}"
        );
        if has_port {
            rt.block_on(c2.delete(&format!("/v1/ports/c-p{round}")))
                .unwrap();
        }
    }
    // Every agent converges to what etcd holds.
    let last = rt
        .block_on(c1.put("/v1/networks/c-last", &network(7000)))
        .unwrap();
    let g = last.json().unwrap()["generation"].as_u64().unwrap();
    lab.wait_fleet(g).expect("converged");
    let want = lab.etcd_objects().expect("etcd");
    for c in [&c1, &c2] {
        let got = served(&rt, c);
        assert_eq!(got.len(), want.len());
        for (k, v) in &want {
            let mut v = v.clone();
            v["name"] = got[k]["name"].clone();
            assert_eq!(&got[k], &v, "{k}");
        }
    }
}

#[test]
fn privileged_fleet_etcd_down_traffic_goes_on_writes_refused() {
    let (mut lab, _) = fleet(1);
    let rt = rt();
    let stream = TcpStreamProbe::start(&lab, "a2", "a1", 8080).expect("stream");
    let pings = ping_in_background(&lab, "a1", "10.0.0.2", 1500, "0.004");
    assert!(
        stream.progress(Duration::from_millis(500)) > 0,
        "the stream runs"
    );

    lab.kill_etcd(0);
    let c1 = lab.agent_client("hv1");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = rt.block_on(c1.get("/v1/status")).unwrap().json().unwrap();
        if s["store"]
            .as_str()
            .unwrap_or("")
            .starts_with("etcd: disconnected since ")
        {
            break s;
        }
        assert!(Instant::now() < deadline, "never saw etcd go: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("etcd killed: {}", status["store"]);
    let w = rt
        .block_on(c1.put("/v1/networks/c-down", &network(5100)))
        .unwrap();
    assert_eq!(
        code(&w),
        (503, "store_unavailable".into()),
        "{}",
        String::from_utf8_lossy(&w.body)
    );
    let r = rt.block_on(c1.get("/v1/networks/a-net")).unwrap();
    assert_eq!(r.status, 200, "reads answer from the agent's copy");
    let metrics = String::from_utf8(rt.block_on(c1.get("/metrics")).unwrap().body).unwrap();
    assert!(
        metrics.contains("cloison_store_up{host=\"hv1\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cloison_store_down_since_seconds"),
        "{metrics}"
    );

    // An agent restarted while etcd is down comes up from its local copy.
    lab.kill_agent("hv2");
    lab.restart_agent("hv2").expect("restart");
    let s = lab.wait_agent("hv2").expect("hv2 applied its local copy");
    assert!(
        s["store"]
            .as_str()
            .unwrap()
            .starts_with("etcd: disconnected"),
        "{s}"
    );
    let c2 = lab.agent_client("hv2");
    let r = rt.block_on(c2.get("/v1/ports/a2")).unwrap();
    assert_eq!(r.status, 200, "hv2 serves its copy");
    assert!(
        stream.progress(Duration::from_millis(500)) > 0,
        "the stream still runs"
    );

    // etcd back: both converge with no manual step, writes work again.
    lab.restart_etcd(0).expect("etcd");
    let deadline = Instant::now() + Duration::from_secs(20);
    let put = loop {
        let w = rt
            .block_on(c2.put("/v1/networks/c-back", &network(5101)))
            .unwrap();
        if w.status == 201 {
            break w;
        }
        assert!(
            Instant::now() < deadline,
            "writes never came back: {:?}",
            code(&w)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let g = put.json().unwrap()["generation"].as_u64().unwrap();
    lab.wait_fleet(g).expect("both converged");
    for c in [&c1, &c2] {
        let s = rt.block_on(c.get("/v1/status")).unwrap().json().unwrap();
        assert_eq!(s["store"], "etcd: connected");
        assert_eq!(
            rt.block_on(c.get("/v1/networks/c-back")).unwrap().status,
            200
        );
    }
    let (sent, received) = ping_result(pings);
    println!("pings while etcd was down and an agent restarted: {received}/{sent}");
    assert_eq!(received, sent, "not one ping lost");
    assert!(
        stream.progress(Duration::from_millis(500)) > 0,
        "the stream still runs"
    );
}

fn group(i: u32, rules: usize) -> Value {
    let rules: Vec<Value> = (0..rules)
        .map(|r| json!({"direction": "ingress", "protocol": "tcp", "ports": format!("{}", 1000 + r), "remote": {"cidr": format!("10.{}.0.0/16", i % 200)}}))
        .collect();
    json!({"tenant": "tenant-c", "rules": rules})
}

/// Every agent serves exactly what a fresh list of etcd holds, object by
/// object, and every kernel holds exactly what that state compiles to.
fn assert_fleet_is(lab: &Lab, rt: &tokio::runtime::Runtime, generation: u64) {
    lab.wait_fleet(generation).expect("converged");
    let want = lab.etcd_objects().expect("etcd");
    for a in &lab.agents {
        let got = served(rt, &lab.agent_client(&a.host));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{}: the objects",
            a.host
        );
        for (k, v) in &want {
            let mut v = v.clone();
            v["name"] = got[k]["name"].clone();
            assert_eq!(&got[k], &v, "{}: {k}", a.host);
        }
    }
    let state = lab.etcd_state().expect("etcd's state is valid");
    for host in &lab.hosts {
        assert_eq!(
            lab.drift(host, &state).expect("read the maps"),
            0,
            "{host}'s maps"
        );
    }
}

fn signal(pid: u32, sig: i32) {
    assert_eq!(
        unsafe { libc::kill(pid as i32, sig) },
        0,
        "kill({pid}, {sig})"
    );
}

#[test]
fn privileged_fleet_compaction_and_broken_watches_converge() {
    let (mut lab, _) = fleet(1);
    let rt = rt();
    let c1 = lab.agent_client("hv1");
    // hv2's agent stops reading its watch while a burst of writes goes by
    // and etcd compacts its history under it, twice: it must come out of it
    // with every event, or list again.
    let hv2 = lab.agent_pid("hv2");
    let clients: std::collections::BTreeMap<&str, Client> = [
        ("hv1", lab.agent_client("hv1")),
        ("hv2", lab.agent_client("hv2")),
    ]
    .into();
    let relists = |host: &str| -> u64 {
        let m = rt.block_on(clients[host].get("/metrics")).unwrap().body;
        let m = String::from_utf8(m).unwrap();
        let line = m
            .lines()
            .find(|l| l.starts_with("cloison_store_relists_total"))
            .expect("the relists counter");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let before = relists("hv2");
    signal(hv2, libc::SIGSTOP);
    for i in 0..300u32 {
        let (path, ans) = match i % 6 {
            // every sixth write deletes the group written just before
            5 => {
                let p = format!("/v1/security-groups/c-g{}", i - 1);
                (p.clone(), rt.block_on(c1.delete(&p)).unwrap())
            }
            _ => {
                let p = format!("/v1/security-groups/c-g{i}");
                (
                    p.clone(),
                    rt.block_on(c1.put(&p, &group(i, 8 + i as usize % 4)))
                        .unwrap(),
                )
            }
        };
        assert!(ans.status < 300, "{path}: {:?}", code(&ans));
        if i == 150 || i == 299 {
            let s = lab.etcdctl(&["endpoint", "status", "-w", "json"]).unwrap();
            let v: Value = serde_json::from_str(&s).unwrap();
            let rev = v[0]["Status"]["header"]["revision"].to_string();
            lab.etcdctl(&["compact", &rev]).expect("compact");
        }
    }
    // Updates of groups a2 uses, on both hosts' kernels.
    let p = "/v1/security-groups/a-default";
    let mut sg = rt.block_on(c1.get(p)).unwrap().json().unwrap();
    sg.as_object_mut().unwrap().remove("generation");
    sg["rules"]
        .as_array_mut()
        .unwrap()
        .push(json!({"direction": "ingress", "protocol": "tcp", "ports": "2222"}));
    let put = rt.block_on(c1.put(p, &sg)).unwrap();
    assert_eq!(put.status, 200, "{:?}", code(&put));
    signal(hv2, libc::SIGCONT);
    assert_fleet_is(
        &lab,
        &rt,
        put.json().unwrap()["generation"].as_u64().unwrap(),
    );
    // (etcd buffered what hv2 missed, compaction or not: its watch went on.)
    println!(
        "hv2 listed again {} times after the burst",
        relists("hv2") - before
    );
    let before = [relists("hv1"), relists("hv2")];

    // Every watch broken at once: etcd killed and started again.
    lab.kill_etcd(0);
    lab.restart_etcd(0).expect("etcd");
    lab.wait_etcd().expect("etcd up");
    let deadline = Instant::now() + Duration::from_secs(20);
    let last = loop {
        let a = rt.block_on(c1.delete("/v1/security-groups/c-g0")).unwrap();
        if a.status == 204 {
            break rt
                .block_on(c1.put("/v1/networks/c-after", &network(5200)))
                .unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "writes never came back: {:?}",
            code(&a)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(last.status, 201);
    assert_fleet_is(
        &lab,
        &rt,
        last.json().unwrap()["generation"].as_u64().unwrap(),
    );
    assert!(
        relists("hv1") > before[0] && relists("hv2") > before[1],
        "both listed again"
    );

    // A port that moves: a1's port to hv2 (its interface is on hv1: pending
    // there), then back; each time both kernels hold exactly the new state.
    let mut a1 = rt.block_on(c1.get("/v1/ports/a1")).unwrap().json().unwrap();
    a1.as_object_mut().unwrap().remove("generation");
    for host in ["hv2", "hv1"] {
        a1["host"] = host.into();
        let a = rt.block_on(c1.put("/v1/ports/a1", &a1)).unwrap();
        assert_eq!(a.status, 200, "{:?}", code(&a));
        assert_fleet_is(&lab, &rt, a.json().unwrap()["generation"].as_u64().unwrap());
    }
    assert!(lab.ping("a1", "10.0.0.2", 2), "a1 back on hv1 reaches a2");
}

/// Three agents on a three-member etcd; the leader is killed while writes
/// go through every agent: each acknowledged write is in etcd and on every
/// agent, and traffic never stops.
#[test]
fn privileged_fleet_three_agents_leader_killed_during_writes() {
    need_root();
    let mut lab = Lab::two_hosts(UplinkHook::Xdp).expect("lab");
    lab.add_third_host().expect("hv3");
    lab.start_etcd(3).expect("etcd");
    lab.start_fleet_agents().expect("agents");
    lab.apply_via_fleet("hv3").expect("state through hv3 only");
    assert!(lab.ping("a4", "10.0.0.1", 2), "a4 (hv3) -> a1 (hv1)");
    assert!(lab.ping("a2", "10.0.0.4", 2), "a2 (hv2) -> a4 (hv3)");
    assert!(!lab.ping("b2", "10.0.0.4", 1), "tenant b does not reach a4");

    let pings = ping_in_background(&lab, "a4", "10.0.0.2", 1000, "0.004");
    let clients: Vec<Client> = ["hv1", "hv2", "hv3"]
        .iter()
        .map(|h| lab.agent_client(h))
        .collect();
    let writer = std::thread::spawn(move || {
        let rt = rt();
        let mut acked = Vec::new();
        let mut refused = 0;
        for i in 0..90u32 {
            let c = &clients[i as usize % 3];
            let name = format!("c-k{i}");
            let a = rt
                .block_on(c.put(&format!("/v1/security-groups/{name}"), &group(i, 2)))
                .unwrap();
            match a.status {
                // (200: a retry found its first try committed)
                200 | 201 => acked.push((name, a.json().unwrap()["generation"].as_u64().unwrap())),
                503 => refused += 1,
                s => panic!("{name}: {s} {}", String::from_utf8_lossy(&a.body)),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (acked, refused)
    });
    std::thread::sleep(Duration::from_millis(600));
    let leader = lab.etcd_leader().expect("a leader");
    lab.kill_etcd(leader);
    println!("etcd leader m{leader} killed");
    let (acked, refused) = writer.join().expect("writer");
    println!(
        "writes: {} acknowledged, {refused} refused (503) around the election",
        acked.len()
    );
    assert!(
        acked.len() > 45,
        "most writes went through: {}",
        acked.len()
    );
    let objects = lab.etcd_objects().expect("etcd");
    for (name, _) in &acked {
        assert!(
            objects.contains_key(&format!("security-groups/{name}")),
            "{name} acknowledged, not in etcd"
        );
    }
    let rt = rt();
    let last = acked.iter().map(|(_, g)| *g).max().unwrap();
    assert_fleet_is(&lab, &rt, last);
    let (sent, received) = ping_result(pings);
    println!("pings a4 -> a2 while the leader was killed: {received}/{sent}");
    assert_eq!(received, sent, "not one ping lost");
}
