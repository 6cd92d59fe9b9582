//! The agent as an outside caller sees it: a real `cloisond` process in a
//! test-bed namespace of its own (uplink, port veths, real dataplane), driven
//! only through its socket, per docs/api.md. Needs root.
mod certs;

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use cloison_control::client::{Answer, Client, Endpoint};
use cloison_dataplane::{netdev, Snapshot};
use cloison_testkit::testbed::Testbed;
use serde_json::{json, Value};

struct Agent {
    child: Child,
    dir: PathBuf,
}

/// Removes a test's directory (socket, store) however the test ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Agent {
    fn start(ns: &str, name: &str, dir: &PathBuf, tcp: Option<&str>) -> Agent {
        Self::start_with(ns, name, dir, tcp, &[])
    }

    /// [`Self::start`] with more arguments.
    fn start_with(
        ns: &str,
        name: &str,
        dir: &PathBuf,
        tcp: Option<&str>,
        more: &[&std::ffi::OsStr],
    ) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloisond"));
        cmd.args(more);
        cmd.args(["--name", name, "--uplink", "up0", "--uplink-hook", "xdp"])
            .arg("--listen")
            .arg(format!("unix:{}", dir.join("agent.sock").display()))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        if let Some(addr) = tcp {
            std::fs::write(dir.join("token"), "s3cret-token-0123456789\n").unwrap();
            cmd.arg("--listen")
                .arg(format!("tcp:{addr}"))
                .arg("--token-file")
                .arg(dir.join("token"));
        }
        let ns_owned = ns.to_string();
        // The agent runs in the test bed's network namespace (and ours for
        // mounts, so its pins are where the test bed removes them).
        unsafe {
            cmd.pre_exec(move || netdev::enter_netns(&ns_owned));
        }
        let child = cmd.spawn().expect("start cloisond");
        let agent = Agent {
            child,
            dir: dir.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("agent.sock").exists() {
            assert!(Instant::now() < deadline, "cloisond did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    fn client(&self) -> Client {
        Client {
            endpoint: Endpoint::Unix(self.dir.join("agent.sock")),
            token: None,
        }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
        let _ = std::fs::remove_file(self.dir.join("agent.sock"));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn objects(host: &str) -> Vec<(&'static str, String, Value)> {
    vec![
        (
            "hosts",
            host.to_string(),
            json!({"underlay_ip": "192.0.2.1"}),
        ),
        ("hosts", "hv2".into(), json!({"underlay_ip": "192.0.2.2"})),
        (
            "networks",
            "acme-net".into(),
            json!({"tenant": "acme", "vni": 1001, "subnets": ["10.0.0.0/24", "fd00:1::/64"]}),
        ),
        (
            "security-groups",
            "web".into(),
            json!({"tenant": "acme", "rules": [
            {"direction": "ingress", "protocol": "tcp", "ports": "80", "remote": {"group": "web"}},
            {"direction": "egress"}]}),
        ),
        (
            "security-groups",
            "evil-sg".into(),
            json!({"tenant": "evil", "rules": []}),
        ),
        (
            "ports",
            "vm1".into(),
            json!({"network": "acme-net", "host": host, "interface": "pa1",
            "mac": "02:00:00:00:00:01", "ips": ["10.0.0.5", "fd00:1::5"], "security_groups": ["web"]}),
        ),
        (
            "ports",
            "vm2".into(),
            json!({"network": "acme-net", "host": "hv2", "interface": "tap-vm2",
            "mac": "02:00:00:00:00:02", "ips": ["10.0.0.6"], "security_groups": ["web"]}),
        ),
    ]
}

/// The namespace and interfaces of a host named `name` with port vm1 on pa1.
fn testbed(name: &str) -> Testbed {
    assert_eq!(unsafe { libc::geteuid() }, 0, "the agent tests need root");
    let snap: Snapshot = serde_json::from_value(json!({
        "hosts": [{"name": name, "underlay_ip": "192.0.2.1"}],
        "ports": [{"name": "vm1", "network": "n", "host": name, "interface": "pa1",
                   "mac": "02:00:00:00:00:01"}]
    }))
    .unwrap();
    Testbed::new(name, &snap, name).expect("test bed")
}

/// A test's host name (`prefix` and this process), its test bed, and a
/// directory of its own removed however the test ends.
fn scene(prefix: &str) -> (String, Testbed, PathBuf, RemoveOnDrop) {
    let name = format!("{prefix}{:x}", std::process::id() & 0xffff);
    let bed = testbed(&name);
    let dir = std::env::temp_dir().join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    let cleanup = RemoveOnDrop(dir.clone());
    (name, bed, dir, cleanup)
}

/// PUTs every object of [`objects`]: each is new (201, with its name and
/// a generation above the last); the last generation.
fn put_objects(rt: &tokio::runtime::Runtime, c: &Client, name: &str) -> u64 {
    let mut last_gen = 0;
    for (kind, n, body) in objects(name) {
        let a = rt
            .block_on(c.put(&format!("/v1/{kind}/{n}"), &body))
            .unwrap();
        assert_eq!(
            a.status,
            201,
            "{kind}/{n}: {}",
            String::from_utf8_lossy(&a.body)
        );
        let v = a.json().unwrap();
        assert_eq!(v["name"], n.as_str());
        let g = v["generation"].as_u64().unwrap();
        assert!(g > last_gen);
        last_gen = g;
    }
    last_gen
}

fn wait_applied(rt: &tokio::runtime::Runtime, c: &Client) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = rt.block_on(c.get("/v1/status")).unwrap().json().unwrap();
        if s["applied_generation"] == s["desired_generation"] && s["programs"] == "attached" {
            return s;
        }
        assert!(Instant::now() < deadline, "never applied: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn code(a: &Answer) -> (u16, String) {
    let c = a
        .json()
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    (a.status, c)
}

#[test]
fn privileged_api_contract() {
    let (name, _bed, dir, _cleanup) = scene("clapi");
    let tcp_addr = format!("127.0.0.1:{}", 17000 + (std::process::id() % 1000));
    let agent = Agent::start(&name, &name, &dir, Some(&tcp_addr));
    let c = agent.client();
    let rt = rt();
    let mode = std::fs::metadata(dir.join("agent.sock")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    // Create: 201 with name and generation; the same again: 200, unchanged.
    let last_gen = put_objects(&rt, &c, &name);
    let again = rt
        .block_on(c.put("/v1/hosts/hv2", &json!({"underlay_ip": "192.0.2.2"})))
        .unwrap();
    assert_eq!(again.status, 200);
    assert!(
        again.json().unwrap()["generation"].as_u64().unwrap() < last_gen,
        "unchanged object keeps its generation"
    );
    let got = rt.block_on(c.get("/v1/networks/acme-net")).unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.json().unwrap()["mtu"], 1450, "default filled");
    let list = rt.block_on(c.get("/v1/hosts")).unwrap().json().unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "lists are sorted by name");

    // Errors: each with its code, and none changes anything.
    let before =
        rt.block_on(c.get("/v1/status")).unwrap().json().unwrap()["desired_generation"].clone();
    let raw = |method: hyper::Method, path: &str, body: &[u8]| {
        rt.block_on(c.call(method, path, Some(body.to_vec())))
            .unwrap()
    };
    let cases: Vec<(&str, Answer, (u16, &str))> = vec![
        ("malformed JSON", raw(hyper::Method::PUT, "/v1/hosts/hv3", b"{\"underlay_ip\": "), (400, "invalid")),
        ("wrong type", raw(hyper::Method::PUT, "/v1/networks/n2", br#"{"tenant": "acme", "vni": "7"}"#), (400, "invalid")),
        ("unknown field", raw(hyper::Method::PUT, "/v1/hosts/hv3", br#"{"underlay_ip": "192.0.2.3", "rack": 4}"#), (400, "invalid")),
        ("bad name", raw(hyper::Method::PUT, "/v1/hosts/HV3", br#"{"underlay_ip": "192.0.2.3"}"#), (400, "invalid")),
        ("bad CIDR", raw(hyper::Method::PUT, "/v1/networks/n2", br#"{"tenant": "acme", "vni": 7, "subnets": ["10.0.0.0/40"]}"#), (400, "invalid")),
        ("unknown protocol", raw(hyper::Method::PUT, "/v1/security-groups/g2", br#"{"tenant": "acme", "rules": [{"direction": "ingress", "protocol": "sctp"}]}"#), (400, "invalid")),
        ("port range on icmp", raw(hyper::Method::PUT, "/v1/security-groups/g2", br#"{"tenant": "acme", "rules": [{"direction": "ingress", "protocol": "icmp", "ports": "22"}]}"#), (400, "invalid")),
        ("IP outside the subnets", raw(hyper::Method::PUT, "/v1/ports/vm3", br#"{"network": "acme-net", "host": "hv2", "interface": "t3", "mac": "02:00:00:00:00:03", "ips": ["192.168.1.1"]}"#), (400, "invalid")),
        ("VNI in use", raw(hyper::Method::PUT, "/v1/networks/n2", br#"{"tenant": "acme", "vni": 1001}"#), (409, "conflict")),
        ("IP in use", raw(hyper::Method::PUT, "/v1/ports/vm3", br#"{"network": "acme-net", "host": "hv2", "interface": "t3", "mac": "02:00:00:00:00:03", "ips": ["10.0.0.5"]}"#), (409, "conflict")),
        ("MAC in use", raw(hyper::Method::PUT, "/v1/ports/vm3", br#"{"network": "acme-net", "host": "hv2", "interface": "t3", "mac": "02:00:00:00:00:01"}"#), (409, "conflict")),
        ("missing network", raw(hyper::Method::PUT, "/v1/ports/vm3", br#"{"network": "nope", "host": "hv2", "interface": "t3", "mac": "02:00:00:00:00:03"}"#), (409, "conflict")),
        ("another tenant's group", raw(hyper::Method::PUT, "/v1/ports/vm3", br#"{"network": "acme-net", "host": "hv2", "interface": "t3", "mac": "02:00:00:00:00:03", "security_groups": ["evil-sg"]}"#), (409, "conflict")),
        ("network in use", rt.block_on(c.delete("/v1/networks/acme-net")).unwrap(), (409, "conflict")),
        ("group in use", rt.block_on(c.delete("/v1/security-groups/web")).unwrap(), (409, "conflict")),
        ("unknown object", rt.block_on(c.get("/v1/ports/nope")).unwrap(), (404, "not_found")),
        ("delete unknown", rt.block_on(c.delete("/v1/ports/nope")).unwrap(), (404, "not_found")),
        ("unknown collection", rt.block_on(c.get("/v1/vpn-services")).unwrap(), (404, "not_found")),
        ("a router on another tenant's network", raw(hyper::Method::PUT, "/v1/routers/r1", br#"{"tenant": "evil", "networks": ["acme-net"]}"#), (409, "conflict")),
        ("a router on a network without gateway_ips", raw(hyper::Method::PUT, "/v1/routers/r1", br#"{"tenant": "acme", "networks": ["acme-net"]}"#), (409, "conflict")),
        ("a floating IP of no port", raw(hyper::Method::PUT, "/v1/floating-ips/f1", br#"{"tenant": "acme", "ip": "198.51.100.20", "port": "nope"}"#), (409, "conflict")),
        ("a multicast floating IP", raw(hyper::Method::PUT, "/v1/floating-ips/f1", br#"{"tenant": "acme", "ip": "224.0.0.1", "port": "vm1"}"#), (400, "invalid")),
    ];
    // An oversized body: the agent answers 413 without reading it all (and
    // closes), so the writer may see its write fail; read the answer anyway.
    let oversized = {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(dir.join("agent.sock")).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let len = 2 << 20;
        let head =
            format!("PUT /v1/hosts/hv3 HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n");
        s.write_all(head.as_bytes()).unwrap();
        let _ = s.write_all(&vec![b' '; len]);
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    assert!(
        oversized.starts_with("HTTP/1.1 413"),
        "oversized body: {oversized}"
    );
    for (what, a, (status, want)) in &cases {
        assert_eq!(
            code(a),
            (*status, want.to_string()),
            "{what}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    let after =
        rt.block_on(c.get("/v1/status")).unwrap().json().unwrap()["desired_generation"].clone();
    assert_eq!(before, after, "rejected requests change nothing");
    assert_eq!(rt.block_on(c.get("/v1/ports/vm3")).unwrap().status, 404);

    // The TCP listener (on the test bed's loopback) wants the token.
    let tcp = |token: Option<&str>| {
        let c = Client {
            endpoint: Endpoint::Tcp(tcp_addr.clone()),
            token: token.map(str::to_string),
        };
        let ns = name.clone();
        std::thread::spawn(move || {
            netdev::enter_netns(&ns).unwrap();
            self::rt().block_on(c.get("/v1/status")).unwrap()
        })
        .join()
        .unwrap()
    };
    assert_eq!(code(&tcp(None)), (401, "unauthorized".into()));
    assert_eq!(
        code(&tcp(Some("wrong-token-0123456789"))),
        (401, "unauthorized".into())
    );
    assert_eq!(tcp(Some("s3cret-token-0123456789")).status, 200);

    // The kernel converges; the local port is attached and counted.
    let status = wait_applied(&rt, &c);
    assert_eq!(status["host"], name.as_str());
    let stats = rt.block_on(c.get("/v1/ports/vm1/stats")).unwrap();
    assert_eq!(
        stats.status,
        200,
        "{}",
        String::from_utf8_lossy(&stats.body)
    );
    assert!(stats.json().unwrap()["to_vm"]["packets"].is_u64());
    assert_eq!(
        code(&rt.block_on(c.get("/v1/ports/vm2/stats")).unwrap()).0,
        409,
        "not on this host"
    );
    // The monitor refuses what it cannot watch before it streams.
    for (path, want) in [
        ("/v1/monitor?filter=frobnicate", 400),
        ("/v1/monitor?filter=port%2070000", 400),
        ("/v1/monitor?drops=maybe", 400),
        ("/v1/monitor?colour=red", 400),
        ("/v1/monitor?port=nope", 404),
        ("/v1/monitor?port=vm2", 409),
    ] {
        assert_eq!(code(&rt.block_on(c.get(path)).unwrap()).0, want, "{path}");
    }
    let metrics = String::from_utf8(rt.block_on(c.get("/metrics")).unwrap().body).unwrap();
    for needle in [
        "cloison_applied_generation{",
        "cloison_drops_total{",
        "cloison_port_from_vm_packets_total{",
        "port=\"vm1\"",
        "tenant=\"acme\"",
        "cloison_tenant_to_vm_bytes_total{",
        "cloison_map_entries{",
        "cloison_map_capacity{",
        "cloison_port_conntrack_share{",
        "cloison_apply_duration_seconds_count{",
        "cloison_monitor_watchers{",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }
    // The dashboard in the repository plots only what the agent exports.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/grafana/cloison.json"
        ))
        .unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut plotted = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("cloison_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                assert!(
                    metrics.contains(&format!("{name}{{"))
                        || metrics.contains(&format!("# TYPE {name} ")),
                    "the dashboard's {:?} plots {name}, which /metrics does not have",
                    panel["title"]
                );
                plotted += 1;
            }
        }
    }
    assert!(plotted >= 15, "{plotted} series plotted");

    // A port whose interface does not exist yet is pending, and attached
    // as soon as the interface appears (a link event, not a poll).
    let late = json!({"network": "acme-net", "host": name, "interface": "pa9",
        "mac": "02:00:00:00:00:09", "ips": ["10.0.0.9"], "security_groups": ["web"]});
    assert_eq!(
        rt.block_on(c.put("/v1/ports/vm9", &late)).unwrap().status,
        201
    );
    let s = wait_applied(&rt, &c);
    assert_eq!(s["pending_ports"], json!(["vm9"]));
    assert_eq!(
        code(&rt.block_on(c.get("/v1/ports/vm9/stats")).unwrap()).0,
        409,
        "not attached yet"
    );
    let appeared = Instant::now();
    let ip = |args: &[&str]| {
        assert!(
            Command::new("ip").args(args).status().unwrap().success(),
            "ip {args:?}"
        );
    };
    ip(&[
        "-n", &name, "link", "add", "pa9", "type", "veth", "peer", "name", "pa9v",
    ]);
    ip(&["-n", &name, "link", "set", "pa9", "up"]);
    loop {
        let s = rt.block_on(c.get("/v1/status")).unwrap().json().unwrap();
        if s["pending_ports"] == json!([]) {
            break;
        }
        assert!(
            appeared.elapsed() < Duration::from_secs(3),
            "vm9 still pending: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "pending port attached {} ms after its interface appeared",
        appeared.elapsed().as_millis()
    );
    assert_eq!(
        rt.block_on(c.get("/v1/ports/vm9/stats")).unwrap().status,
        200
    );
    // And detached (pending again) when it goes.
    ip(&["-n", &name, "link", "del", "pa9"]);
    let gone = Instant::now();
    loop {
        let s = rt.block_on(c.get("/v1/status")).unwrap().json().unwrap();
        if s["pending_ports"] == json!(["vm9"]) {
            break;
        }
        assert!(
            gone.elapsed() < Duration::from_secs(3),
            "vm9 not pending after its interface went: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Delete: 204, then gone; a port first, then what it used.
    assert_eq!(rt.block_on(c.delete("/v1/ports/vm2")).unwrap().status, 204);
    assert_eq!(rt.block_on(c.get("/v1/ports/vm2")).unwrap().status, 404);
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn privileged_acknowledged_writes_survive_kill_9() {
    let (name, _bed, dir, _cleanup) = scene("clkil");
    let rt = rt();
    let mut agent = Agent::start(&name, &name, &dir, None);
    let c = agent.client();
    let mut acked = Vec::new();
    for (kind, n, body) in objects(&name) {
        let a = rt
            .block_on(c.put(&format!("/v1/{kind}/{n}"), &body))
            .unwrap();
        assert_eq!(a.status, 201);
        acked.push((kind, n, a.json().unwrap()));
    }
    // Writes racing the kill: each one acknowledged must be there after.
    let writer = {
        let c = c.clone();
        std::thread::spawn(move || {
            let rt = self::rt();
            let mut done = Vec::new();
            for i in 0..200u32 {
                let body = json!({"tenant": "acme", "vni": 2000 + i});
                match rt.block_on(c.put(&format!("/v1/networks/n{i}"), &body)) {
                    Ok(a) if a.status == 201 => done.push((i, a.json().unwrap())),
                    _ => break,
                }
            }
            done
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    agent.kill9();
    let written = writer.join().unwrap();
    assert!(
        !written.is_empty(),
        "some writes were acknowledged before the kill"
    );

    let agent = Agent::start(&name, &name, &dir, None);
    let c = agent.client();
    for (kind, n, v) in &acked {
        let got = rt.block_on(c.get(&format!("/v1/{kind}/{n}"))).unwrap();
        assert_eq!(got.status, 200, "{kind}/{n} after kill -9");
        assert_eq!(&got.json().unwrap(), v);
    }
    for (i, v) in &written {
        let got = rt.block_on(c.get(&format!("/v1/networks/n{i}"))).unwrap();
        assert_eq!(
            got.status, 200,
            "network n{i}, acknowledged before the kill"
        );
        assert_eq!(&got.json().unwrap(), v);
    }
    let s = wait_applied(&rt, &c);
    let last_acked = written.last().unwrap().1["generation"].as_u64().unwrap();
    assert!(s["desired_generation"].as_u64().unwrap() >= last_acked);
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{} acknowledged writes before the kill, all there after",
        acked.len() + written.len()
    );
}

#[test]
fn privileged_cloisonctl_sigterm_and_purge() {
    let (name, _bed, dir, _cleanup) = scene("clctl");
    let mut agent = Agent::start(&name, &name, &dir, None);
    let endpoint = format!("unix:{}", dir.join("agent.sock").display());
    let ctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cloisonctl"))
            .args(["--endpoint", &endpoint])
            .args(args)
            .output()
            .expect("cloisonctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // apply -f takes YAML documents (or JSON), many objects, any order.
    let yaml = format!(
        "kind: port\nname: vm1\nnetwork: acme-net\nhost: {name}\ninterface: pa1\nmac: 02:00:00:00:00:01\n\
         ips: [10.0.0.5]\nsecurity_groups: [web]\n---\n\
         - kind: security-group\n  name: web\n  tenant: acme\n  rules:\n  - direction: ingress\n    remote: {{group: admin}}\n\
         - kind: security-group\n  name: admin\n  tenant: acme\n  rules: [{{direction: egress}}]\n\
         - kind: network\n  name: acme-net\n  tenant: acme\n  vni: 1001\n  subnets: [10.0.0.0/24]\n\
         - kind: host\n  name: {name}\n  underlay_ip: 192.0.2.1\n"
    );
    std::fs::write(dir.join("objects.yaml"), yaml).unwrap();
    let (ok, out, err) = ctl(&["apply", "-f", dir.join("objects.yaml").to_str().unwrap()]);
    assert!(ok, "apply: {err}");
    assert_eq!(out.lines().count(), 5, "{out}");
    let (ok, out, _) = ctl(&["list", "ports"]);
    assert!(
        ok && out.contains("vm1") && out.contains("acme-net"),
        "{out}"
    );
    let (ok, out, _) = ctl(&["--json", "get", "network", "acme-net"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["vni"], 1001);
    let (ok, _, err) = ctl(&["delete", "network", "acme-net"]);
    assert!(
        !ok && err.contains("in use by vm1") && err.contains("409"),
        "{err}"
    );
    let (ok, _, err) = ctl(&["get", "port", "nope"]);
    assert!(!ok && err.contains("404"), "{err}");
    let rt = rt();
    wait_applied(&rt, &agent.client());
    let (ok, out, _) = ctl(&["stats", "vm1"]);
    assert!(ok && out.contains("to VM"), "{out}");

    // SIGTERM: the agent exits, the dataplane stays pinned and attached.
    let pins = PathBuf::from(cloison_dataplane::loader::DEFAULT_PIN_ROOT).join(&name);
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(
        pins.join("links").read_dir().unwrap().count() >= 2,
        "uplink and port links stay pinned"
    );
    // --purge removes what it pinned.
    let purge = Command::new(env!("CARGO_BIN_EXE_cloisond"))
        .args(["--name", &name, "--purge"])
        .status()
        .unwrap();
    assert!(purge.success());
    assert!(!pins.exists(), "purged");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ip netns exec` gives the agent a mount namespace of its own, where
/// /sys is remounted: a bpffs it mounted there would vanish with it, and
/// every port with it. It refuses to start, and says how to run it instead.
#[test]
fn privileged_refuses_pins_that_would_die_with_it() {
    let (name, _bed, dir, _cleanup) = scene("clpin");
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("agent.sock");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &name, env!("CARGO_BIN_EXE_cloisond")])
        .args(["--name", &name, "--uplink", "up0"])
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ip netns exec cloisond");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cloisond started under `ip netns exec`, where its pins die with it");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("would not outlive this process") && err.contains("nsenter --net"),
        "{err}"
    );
    assert!(!socket.exists(), "nothing was served");
    let pins = PathBuf::from(cloison_dataplane::loader::DEFAULT_PIN_ROOT).join(&name);
    assert!(!pins.exists(), "nothing was pinned on the host's bpffs");
}

/// Runs `ip` with `args`; the test fails if it does.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace of the test's own, deleted however the test ends.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        ip(&["netns", "add", &name]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Whether `ns` gets an answer to a ping of `addr`.
fn answered(ns: &str, addr: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-q", "-c", "2", "-i", "0.2", "-W", "1", addr,
        ])
        .output()
        .unwrap()
        .status
        .success()
}

fn wait_for(
    rt: &tokio::runtime::Runtime,
    c: &Client,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = rt.block_on(c.get("/v1/status")).unwrap().json().unwrap();
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never {what}: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Class 4 of the isolation review: no path leaves a port's interface
/// open. A VM (its own namespace behind pa1) pings the hypervisor's address
/// on pa1. Before pa1 is any port's, that is the host's business; from the
/// moment it is, the interface is closed: while every apply fails (here the
/// uplink is missing), once the apply succeeds (a VM's frames are never
/// handed to the host), and after its port is deleted while the VM runs.
/// Before the fix the VM reached the host stack until the first successful
/// apply, and again after its port was deleted.
#[test]
fn privileged_a_ports_interface_is_never_left_open() {
    let name = format!("clfc{:x}", std::process::id() & 0xffff);
    let _bed = testbed(&name);
    let vm = Netns::new(format!("{name}-vm"));
    ip(&["-n", &name, "link", "set", "pa1v", "netns", &vm.0]);
    ip(&["-n", &vm.0, "addr", "add", "10.9.0.2/24", "dev", "pa1v"]);
    ip(&["-n", &vm.0, "link", "set", "pa1v", "up"]);
    ip(&["-n", &name, "addr", "add", "10.9.0.1/24", "dev", "pa1"]);
    assert!(
        answered(&vm.0, "10.9.0.1"),
        "not a port yet: the host answers"
    );

    // No uplink: every apply fails.
    ip(&["-n", &name, "link", "del", "up0"]);
    let dir = std::env::temp_dir().join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    let _cleanup = RemoveOnDrop(dir.clone());
    let agent = Agent::start(&name, &name, &dir, None);
    let (c, rt) = (agent.client(), rt());
    let _ = put_objects(&rt, &c, &name);
    wait_for(&rt, &c, "failed", |s| {
        s["programs"].as_str().is_some_and(|p| p.contains("up0"))
            && s["applied_generation"] != s["desired_generation"]
    });
    assert!(
        !answered(&vm.0, "10.9.0.1"),
        "pa1 is vm1's: closed while the applies fail"
    );

    // The uplink back: applied; the VM still does not reach the host.
    ip(&[
        "-n", &name, "link", "add", "up0", "type", "veth", "peer", "name", "up1",
    ]);
    ip(&["-n", &name, "addr", "add", "192.0.2.1/24", "dev", "up0"]);
    ip(&["-n", &name, "link", "set", "up0", "up"]);
    ip(&["-n", &name, "link", "set", "up1", "up"]);
    wait_applied(&rt, &c);
    assert!(
        !answered(&vm.0, "10.9.0.1"),
        "applied: to the host, dropped"
    );
    let drops = String::from_utf8(rt.block_on(c.get("/metrics")).unwrap().body).unwrap();
    assert!(
        drops.contains("reason=\"not_redirected\"") || drops.contains("reason=\"unknown_port\""),
        "{drops}"
    );

    // vm1 deleted while its VM runs: pa1 stays closed.
    assert_eq!(rt.block_on(c.delete("/v1/ports/vm1")).unwrap().status, 204);
    wait_applied(&rt, &c);
    assert!(
        !answered(&vm.0, "10.9.0.1"),
        "a deleted port's interface stays closed while it exists"
    );
    drop(agent);
}

/// Classes 5 and 6 through the API: per-object limits (400) and a host's
/// capacities (409 "capacity") refused before anything is stored, one
/// interface one port (409), never `lo` (400) and never the uplink (the
/// host refuses to attach it and says so in its status); another tenant's
/// change still goes through and applies.
#[test]
fn privileged_api_refuses_what_would_not_fit() {
    let (name, _bed, dir, _cleanup) = scene("cllim");
    let agent = Agent::start(&name, &name, &dir, None);
    let (c, rt) = (agent.client(), rt());
    let _ = put_objects(&rt, &c, &name);
    wait_applied(&rt, &c);
    let put = |path: &str, body: Value| rt.block_on(c.put(path, &body)).unwrap();
    let generation = |rt: &tokio::runtime::Runtime| {
        rt.block_on(c.get("/v1/status")).unwrap().json().unwrap()["desired_generation"].clone()
    };
    let port = |extra: Value| {
        let mut p = json!({"network": "acme-net", "host": "hv2", "interface": "t7",
            "mac": "02:00:00:00:00:07"});
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        p
    };
    let before = generation(&rt);
    let rule = json!({"direction": "ingress", "protocol": "tcp", "ports": "22"});
    let ips: Vec<String> = (10..27).map(|i| format!("10.0.0.{i}")).collect();
    let groups: Vec<String> = (0..17).map(|_| "web".to_string()).collect();
    let cases: Vec<(&str, Answer, (u16, &str))> = vec![
        (
            "1001 rules",
            put(
                "/v1/security-groups/big",
                json!({"tenant": "acme", "rules": vec![rule; 1001]}),
            ),
            (400, "invalid"),
        ),
        (
            "17 IPs",
            put("/v1/ports/vm7", port(json!({"ips": ips}))),
            (400, "invalid"),
        ),
        (
            "17 groups",
            put("/v1/ports/vm7", port(json!({"security_groups": groups}))),
            (400, "invalid"),
        ),
        (
            "a group MAC in a pair",
            put(
                "/v1/ports/vm7",
                port(
                    json!({"allowed_address_pairs": [{"ip": "10.0.0.7/32", "mac": "01:00:5e:00:00:01"}]}),
                ),
            ),
            (400, "invalid"),
        ),
        (
            "a pair over ::ffff:0:0/96",
            put(
                "/v1/ports/vm7",
                port(json!({"allowed_address_pairs": [{"ip": "::ffff:10.0.0.0/104"}]})),
            ),
            (400, "invalid"),
        ),
        (
            "lo",
            put("/v1/ports/vm7", port(json!({"interface": "lo"}))),
            (400, "invalid"),
        ),
        (
            "vm1's interface, another tenant's port",
            {
                put(
                    "/v1/networks/other-net",
                    json!({"tenant": "other", "vni": 2002, "subnets": ["10.0.0.0/24"]}),
                );
                put(
                    "/v1/ports/o1",
                    json!({"network": "other-net", "host": name, "interface": "pa1", "mac": "02:00:00:00:00:71"}),
                )
            },
            (409, "conflict"),
        ),
    ];
    for (what, a, (status, want)) in &cases {
        assert_eq!(
            code(a),
            (*status, want.to_string()),
            "{what}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    let after_network = generation(&rt);
    assert_eq!(
        after_network.as_u64().unwrap(),
        before.as_u64().unwrap() + 1,
        "only the network was stored"
    );

    // A host's capacity: tenant big's groups of 1000 rules over wide port
    // ranges, on ports of hv2 with different sets of them, compile to more
    // rule entries than hv2's table holds by the third port.
    for g in 0..17 {
        let rules: Vec<Value> = (0..1000)
            .map(|i| {
                json!({"direction": "ingress", "protocol": "tcp", "ports": "1-65534",
                "remote": {"cidr": format!("10.{g}.{}.{}/32", i / 250, i % 250)}})
            })
            .collect();
        let a = put(
            &format!("/v1/security-groups/w{g}"),
            json!({"tenant": "acme", "rules": rules}),
        );
        assert_eq!(a.status, 201, "w{g}: {}", String::from_utf8_lossy(&a.body));
    }
    let sets: [Vec<String>; 3] = [
        (0..16).map(|g| format!("w{g}")).collect(),
        (1..17).map(|g| format!("w{g}")).collect(),
        (0..17)
            .filter(|g| *g != 1)
            .map(|g| format!("w{g}"))
            .collect(),
    ];
    for (i, set) in sets.iter().enumerate() {
        let a = put(
            &format!("/v1/ports/big{i}"),
            json!({"network": "acme-net", "host": "hv2", "interface": format!("tb{i}"),
                "mac": format!("02:00:00:00:01:{i:02x}"), "security_groups": set}),
        );
        if i < 2 {
            assert_eq!(
                a.status,
                201,
                "big{i}: {}",
                String::from_utf8_lossy(&a.body)
            );
        } else {
            assert_eq!(
                code(&a),
                (409, "capacity".into()),
                "{}",
                String::from_utf8_lossy(&a.body)
            );
            let msg = a.json().unwrap()["error"]["message"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(
                msg.contains("host hv2") && msg.contains("rule entries"),
                "{msg}"
            );
        }
    }
    let full = generation(&rt);
    assert_eq!(rt.block_on(c.get("/v1/ports/big2")).unwrap().status, 404);

    // Another change still goes through and applies: a revocation of
    // vm1's ingress, and a port on the uplink, which the host refuses.
    let a = put(
        "/v1/security-groups/web",
        json!({"tenant": "acme", "rules": [{"direction": "egress"}]}),
    );
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let a = put(
        "/v1/ports/vmu",
        json!({"network": "acme-net", "host": name, "interface": "up0", "mac": "02:00:00:00:00:55"}),
    );
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let s = wait_applied(&rt, &c);
    assert!(s["desired_generation"].as_u64() > full.as_u64());
    let refused = s["refused_ports"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{s}");
    assert_eq!(refused[0]["port"], "vmu");
    assert!(
        refused[0]["why"].as_str().unwrap().contains("uplink"),
        "{s}"
    );
    let links = PathBuf::from(cloison_dataplane::loader::DEFAULT_PIN_ROOT)
        .join(&name)
        .join("links");
    assert!(
        links.join("uplink-xdp").exists(),
        "the uplink keeps its own program"
    );
    drop(agent);
}

/// Class 12: the TCP listener with TLS. A client trusting the agent's CA
/// gets answers (with the token), one without the token 401; a client
/// trusting another CA, or speaking plain HTTP, gets nothing. A tcp:
/// listener off loopback without TLS is refused at start.
#[test]
fn privileged_tcp_listener_with_tls() {
    let (name, _bed, dir, _cleanup) = scene("cltls");
    std::fs::create_dir_all(&dir).unwrap();
    let (issuer, ca_pem) = certs::ca("cloison test CA");
    let (_, other_pem) = certs::ca("another CA");
    let (leaf_pem, leaf_key) = certs::leaf(&issuer, None, &["127.0.0.1"]);
    for (file, pem) in [
        ("ca.pem", ca_pem),
        ("other-ca.pem", other_pem),
        ("cert.pem", leaf_pem),
        ("key.pem", leaf_key),
    ] {
        std::fs::write(dir.join(file), pem).unwrap();
    }
    let addr = format!("127.0.0.1:{}", 18000 + (std::process::id() % 1000));
    let tls: [&std::ffi::OsStr; 4] = [
        "--tls-cert".as_ref(),
        dir.join("cert.pem").into_os_string().leak(),
        "--tls-key".as_ref(),
        dir.join("key.pem").into_os_string().leak(),
    ];
    let agent = Agent::start_with(&name, &name, &dir, Some(&addr), &tls);
    let ask = |endpoint: Endpoint, token: Option<&str>| {
        let c = Client {
            endpoint,
            token: token.map(str::to_string),
        };
        let ns = name.clone();
        std::thread::spawn(move || {
            netdev::enter_netns(&ns).unwrap();
            self::rt().block_on(c.get("/v1/status"))
        })
        .join()
        .unwrap()
    };
    let https = |ca: &str| Endpoint::Https(addr.clone(), Some(dir.join(ca)));
    let deadline = Instant::now() + Duration::from_secs(10);
    let ok = loop {
        match ask(https("ca.pem"), Some("s3cret-token-0123456789")) {
            Ok(a) => break a,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("https: {e:#}"),
        }
    };
    assert_eq!(ok.status, 200);
    let no_token = ask(https("ca.pem"), None).expect("https without the token");
    assert_eq!(code(&no_token), (401, "unauthorized".into()));
    let e = ask(https("other-ca.pem"), Some("s3cret-token-0123456789"))
        .expect_err("a CA that did not sign the agent's certificate");
    assert!(
        format!("{e:#}").to_lowercase().contains("certificate"),
        "{e:#}"
    );
    assert!(
        ask(Endpoint::Tcp(addr.clone()), Some("s3cret-token-0123456789"))
            .map_or(true, |a| a.status >= 400),
        "plain HTTP to the TLS listener"
    );
    drop(agent);

    // Off loopback (the test bed's underlay address) without TLS: refused,
    // before anything is opened.
    let ns = name.clone();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloisond"));
    unsafe {
        cmd.pre_exec(move || netdev::enter_netns(&ns));
    }
    let out = cmd
        .args([
            "--name",
            &name,
            "--uplink",
            "up0",
            "--listen",
            "tcp:192.0.2.1:7443",
        ])
        .arg("--token-file")
        .arg(dir.join("token"))
        .arg("--state-dir")
        .arg(dir.join("state2"))
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {err}");
    assert!(
        err.contains("off loopback") && err.contains("--tls-cert"),
        "{err}"
    );
}
