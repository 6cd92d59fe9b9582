//! `cloisonctl`: the agent's API from a shell. Human tables by default,
//! `--json` for scripts.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cloison_control::{
    client::{Answer, Client, Endpoint},
    desired::Kind,
};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(about = "Drive a cloisond agent through its API")]
struct Args {
    /// unix:PATH, tcp:ADDR or https:ADDR of the agent.
    #[arg(
        long,
        env = "CLOISON_ENDPOINT",
        default_value = "unix:/run/cloison/cloisond.sock"
    )]
    endpoint: Endpoint,
    /// Bearer token file (TCP endpoints).
    #[arg(long, env = "CLOISON_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the agent's (https: endpoints).
    #[arg(long, env = "CLOISON_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// One object: KIND is host, network, security-group, port, router or floating-ip.
    Get {
        kind: String,
        name: String,
    },
    /// Every object of a kind.
    List {
        kind: String,
    },
    /// Create or replace the objects of a YAML or JSON file (a list, or
    /// YAML documents, each with `kind` and `name`), in dependency order.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    Delete {
        kind: String,
        name: String,
    },
    /// Desired and applied generations.
    Status,
    /// Every agent of the fleet: applied generation, up or down (fleet mode).
    Fleet,
    /// A port's packets, bytes and drops by reason.
    Stats {
        port: String,
    },
    /// What the programs do with one frame, stage by stage, on the live
    /// tables (nothing is written), beside the reference model; "DISAGREE"
    /// when they differ. PACKET is a flow in text:
    /// 'tcp 10.0.0.5:40000 > 10.0.0.7:22 flags S' (also udp, icmp; options
    /// flags, ttl, len), sent by the port's VM.
    Trace {
        /// The port whose VM sends the frame.
        #[arg(long)]
        port: Option<String>,
        packet: Option<String>,
        /// The frame in hex instead of PACKET.
        #[arg(long, conflicts_with_all = ["packet", "pcap"])]
        frame: Option<String>,
        /// The first frame of this pcap file (Ethernet) instead of PACKET.
        #[arg(long, conflicts_with = "packet")]
        pcap: Option<PathBuf>,
        /// The frame arrives from the underlay (VXLAN) instead of a port.
        #[arg(long, conflicts_with = "port")]
        from_underlay: bool,
        /// Trace the output on the receiving host too (its uplink program
        /// and its port's ingress rules): needs --peer for that host.
        #[arg(long)]
        follow: bool,
        /// HOST=ENDPOINT: where the agent of another host answers (--follow).
        #[arg(long = "peer")]
        peers: Vec<String>,
        /// Only the verdicts, the deciding rules and whether they agree.
        #[arg(long)]
        minimal: bool,
    },
    /// A live stream of what the programs drop (and new flows they allow,
    /// sampled): time, reason, port, tenant, the packet's addresses and
    /// ports. Bounded by the agent's --monitor-rate; losses are shown.
    Monitor {
        /// One port's events only (a port of this agent's host).
        #[arg(long)]
        port: Option<String>,
        /// Drops only (no new flows).
        #[arg(long)]
        drops: bool,
        /// Only events matching EXPR: terms all true, among drop, flow,
        /// tcp, udp, icmp, icmpv6, arp, host IP, src IP, dst IP, port N,
        /// sport N, dport N, reason NAME, tenant NAME, vni N, hook NAME.
        #[arg(long)]
        filter: Option<String>,
        /// Stop after N events.
        #[arg(long)]
        count: Option<u64>,
    },
}

/// `s` as a URL query value.
fn encode_query(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The first frame of a classic pcap file of Ethernet frames.
fn pcap_first_frame(path: &std::path::Path) -> Result<Vec<u8>> {
    let b = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    if b.len() < 24 {
        bail!("{}: too short for a pcap file", path.display());
    }
    let magic = [b[0], b[1], b[2], b[3]];
    let le = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => bail!("{}: not a pcap file (pcapng is not read)", path.display()),
    };
    let u32_at = |o: usize| {
        let w = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    if u32_at(20) != 1 {
        bail!("{}: link type {}, not Ethernet", path.display(), u32_at(20));
    }
    if b.len() < 40 {
        bail!("{}: no frame in it", path.display());
    }
    let len = u32_at(32) as usize;
    b.get(40..40 + len)
        .map(<[u8]>::to_vec)
        .with_context(|| format!("{}: its first frame is cut short", path.display()))
}

fn client_for(c: &Client, endpoint: &str) -> Result<Client> {
    let endpoint: Endpoint = endpoint
        .parse()
        .map_err(|e| anyhow::anyhow!("endpoint {endpoint:?}: {e}"))?;
    let endpoint = match (endpoint, &c.endpoint) {
        (Endpoint::Https(a, None), Endpoint::Https(_, ca)) => Endpoint::Https(a, ca.clone()),
        (e, _) => e,
    };
    Ok(Client {
        endpoint,
        token: c.token.clone(),
    })
}

fn kind(s: &str) -> Result<Kind> {
    let k = match s.trim_end_matches('s') {
        "host" => Kind::Host,
        "network" => Kind::Network,
        "security-group" | "sg" => Kind::SecurityGroup,
        "port" => Kind::Port,
        "router" => Kind::Router,
        "floating-ip" | "fip" => Kind::FloatingIp,
        _ => {
            bail!("unknown kind {s:?}: host, network, security-group, port, router or floating-ip")
        }
    };
    Ok(k)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloisonctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The answer's JSON if it is a success; the API's error message otherwise.
fn ok(a: Answer) -> Result<Value> {
    if (200..300).contains(&a.status) {
        if a.body.is_empty() {
            return Ok(Value::Null);
        }
        return a.json();
    }
    let msg = a
        .json()
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&a.body).into_owned());
    bail!("{} ({})", msg, a.status)
}

async fn run(args: Args) -> Result<()> {
    let token = match &args.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("read {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let endpoint = match args.endpoint.clone() {
        Endpoint::Https(a, _) => Endpoint::Https(a, args.ca_file.clone()),
        e => e,
    };
    let c = Client { endpoint, token };
    let json = args.json;
    match args.cmd {
        Cmd::Get { kind: k, name } => {
            let k = kind(&k)?;
            let v = ok(c.get(&format!("/v1/{}/{name}", k.path())).await?)?;
            print_objects(k, &[v], json);
        }
        Cmd::List { kind: k } => {
            let k = kind(&k)?;
            let v = ok(c.get(&format!("/v1/{}", k.path())).await?)?;
            print_objects(k, v.as_array().map(Vec::as_slice).unwrap_or(&[]), json);
        }
        Cmd::Delete { kind: k, name } => {
            let k = kind(&k)?;
            ok(c.delete(&format!("/v1/{}/{name}", k.path())).await?)?;
            if !json {
                println!("{k} {name} deleted");
            }
        }
        Cmd::Status => {
            let v = ok(c.get("/v1/status").await?)?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "host {}  desired generation {}  applied {}  programs {}",
                    v["host"].as_str().unwrap_or("?"),
                    v["desired_generation"],
                    v["applied_generation"],
                    v["programs"].as_str().unwrap_or("?")
                );
                println!("store {}", v["store"].as_str().unwrap_or("?"));
                if let Some(p) = v["pending_ports"].as_array().filter(|p| !p.is_empty()) {
                    println!("pending ports (no interface yet): {p:?}");
                }
                let e = &v["encryption"];
                if e["mode"] == "ipsec" {
                    println!("encryption ipsec  IKE {}", e["ike"].as_str().unwrap_or("?"));
                    for p in e["peers"].as_array().into_iter().flatten() {
                        println!(
                            "  peer {} ({})  {}  IKE {}  ESP {}  rekeys {}  lost {}  packets in {} out {}{}",
                            p["host"].as_str().unwrap_or("?"),
                            p["address"].as_str().unwrap_or("?"),
                            if p["up"] == true { "up" } else { "DOWN" },
                            p["ike"].as_str().unwrap_or("?"),
                            p["child"].as_str().unwrap_or("?"),
                            p["rekeys"],
                            p["downs"],
                            p["packets_in"],
                            p["packets_out"],
                            p["error"]
                                .as_str()
                                .map(|e| format!("  error: {e}"))
                                .unwrap_or_default()
                        );
                    }
                }
            }
        }
        Cmd::Fleet => {
            let v = ok(c.get("/v1/fleet").await?)?;
            if json {
                println!("{v}");
            } else {
                for m in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<16} applied generation {:<8} {}",
                        m["host"].as_str().unwrap_or("?"),
                        m["applied_generation"],
                        if m["up"] == true { "up" } else { "DOWN" }
                    );
                }
            }
        }
        Cmd::Stats { port } => {
            let v = ok(c.get(&format!("/v1/ports/{port}/stats")).await?)?;
            if json {
                println!("{v}");
            } else {
                println!("port {port} on {}", v["host"].as_str().unwrap_or("?"));
                println!(
                    "  from VM  {} packets  {} bytes",
                    v["from_vm"]["packets"], v["from_vm"]["bytes"]
                );
                println!(
                    "  to VM    {} packets  {} bytes",
                    v["to_vm"]["packets"], v["to_vm"]["bytes"]
                );
                println!("  drops    {}", v["drops"]);
                for (r, n) in v["drops_by_reason"].as_object().into_iter().flatten() {
                    println!("    {r:<28} {n}");
                }
            }
        }
        Cmd::Apply { file } => apply(&c, &file, json).await?,
        Cmd::Monitor {
            port,
            drops,
            filter,
            count,
        } => {
            let mut q = Vec::new();
            if let Some(p) = &port {
                q.push(format!("port={}", encode_query(p)));
            }
            if drops {
                q.push("drops=true".into());
            }
            if let Some(f) = &filter {
                q.push(format!("filter={}", encode_query(f)));
            }
            let path = format!("/v1/monitor?{}", q.join("&"));
            let mut seen = 0u64;
            let mut bad = None;
            let refused = c
                .stream_lines(&path, |line| {
                    if line.is_empty() {
                        return true;
                    }
                    let v: Value = match serde_json::from_str(line) {
                        Ok(v) => v,
                        Err(e) => {
                            bad = Some(format!("the agent sent {line:?}: {e}"));
                            return false;
                        }
                    };
                    if json {
                        println!("{line}");
                    } else if v["kind"] == "lost" {
                        println!(
                            "-- {} events lost so far (over the rate, ring full, or this reader too slow)",
                            v["lost"]
                        );
                    } else {
                        match serde_json::from_value::<cloison_dataplane::monitor::Event>(v.clone()) {
                            Ok(e) => println!("{}", cloison_dataplane::monitor::render(&e)),
                            Err(_) => println!("{line}"),
                        }
                    }
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                    if v["kind"] != "lost" {
                        seen += 1;
                    }
                    count.is_none_or(|n| seen < n)
                })
                .await?;
            if let Some(a) = refused {
                ok(a)?;
            }
            if let Some(b) = bad {
                bail!(b);
            }
        }
        Cmd::Trace {
            port,
            packet,
            frame,
            pcap,
            from_underlay,
            follow,
            peers,
            minimal,
        } => {
            use cloison_dataplane::trace::{self, Report};
            let frame = match (frame, pcap) {
                (Some(h), _) => Some(h),
                (None, Some(p)) => Some(trace::hex(&pcap_first_frame(&p)?)),
                (None, None) => None,
            };
            if port.is_none() && !from_underlay {
                bail!("name the sending port (--port NAME), or --from-underlay");
            }
            if packet.is_none() && frame.is_none() {
                bail!("give the packet (text), --frame HEX or --pcap FILE");
            }
            let mut body = serde_json::json!({"from_underlay": from_underlay});
            if let Some(p) = &port {
                body["port"] = p.clone().into();
            }
            if let Some(p) = &packet {
                body["packet"] = p.clone().into();
            }
            if let Some(f) = &frame {
                body["frame"] = f.clone().into();
            }
            let first: Report = serde_json::from_value(ok(c.post("/v1/trace", &body).await?)?)
                .context("the agent's trace report")?;
            let mut reports = vec![(None, first)];
            if follow {
                let last = &reports[0].1;
                match (&last.next_host, &last.kernel.output) {
                    (Some(host), Some(out)) => {
                        let endpoint = peers
                            .iter()
                            .find_map(|p| p.strip_prefix(&format!("{host}=")))
                            .with_context(|| {
                                format!("the frame goes to host {host}: give --peer {host}=ENDPOINT to follow it")
                            })?;
                        let peer = client_for(&c, endpoint)?;
                        let body = serde_json::json!({"from_underlay": true, "frame": out});
                        let r: Report =
                            serde_json::from_value(ok(peer.post("/v1/trace", &body).await?)?)
                                .with_context(|| format!("host {host}'s trace report"))?;
                        reports.push((Some(host.clone()), r));
                    }
                    _ => {
                        if !json {
                            println!("(--follow: the frame does not leave for another host)");
                        }
                    }
                }
            }
            if json {
                let all: Vec<&Report> = reports.iter().map(|(_, r)| r).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for (host, r) in &reports {
                    if let Some(h) = host {
                        println!("--- followed to host {h} ---");
                    }
                    if minimal {
                        print!("{}", trace::minimal(r));
                    } else {
                        print!("{}", trace::render(r));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Objects of a file: a JSON or YAML list, or YAML documents.
fn read_objects(file: &PathBuf) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)
            .with_context(|| format!("{}: not YAML or JSON", file.display()))?;
        match v {
            Value::Array(items) => out.extend(items),
            Value::Null => {}
            v => out.push(v),
        }
    }
    Ok(out)
}

async fn apply(c: &Client, file: &PathBuf, json: bool) -> Result<()> {
    let mut all: Vec<(Kind, String, Value)> = Vec::new();
    for (i, mut v) in read_objects(file)?.into_iter().enumerate() {
        let m = v
            .as_object_mut()
            .with_context(|| format!("object {i} is not a mapping"))?;
        let k = m
            .remove("kind")
            .and_then(|k| k.as_str().map(str::to_string))
            .with_context(|| format!("object {i} has no kind"))?;
        let name = m
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("object {i} has no name"))?;
        all.push((kind(&k)?, name, v));
    }
    // Hosts, networks, groups, ports, routers: what is referred to goes first.
    // Groups may name each other: within their turn, a conflict is retried
    // once the others are in.
    let mut results = Vec::new();
    for phase in Kind::ALL {
        let mut todo: Vec<&(Kind, String, Value)> = all.iter().filter(|o| o.0 == phase).collect();
        while !todo.is_empty() {
            let mut left = Vec::new();
            let mut refusal = None;
            for o in &todo {
                let (k, name, v) = o;
                let a = c.put(&format!("/v1/{}/{name}", k.path()), v).await?;
                if a.status == 409 && *k == Kind::SecurityGroup {
                    left.push(*o);
                    refusal = Some((k, name, a));
                    continue;
                }
                let answer = ok(a).with_context(|| format!("{k} {name}"))?;
                results.push((*k, name.clone(), answer));
            }
            if left.len() == todo.len() {
                let (k, name, a) = refusal.expect("a refusal");
                ok(a).with_context(|| format!("{k} {name}"))?;
            }
            todo = left;
        }
    }
    if json {
        let all: Vec<&Value> = results.iter().map(|(_, _, v)| v).collect();
        println!("{}", serde_json::to_string(&all)?);
    } else {
        for (k, name, v) in &results {
            println!("{k} {name} applied (generation {})", v["generation"]);
        }
    }
    Ok(())
}

fn print_objects(k: Kind, objs: &[Value], json: bool) {
    if json {
        if objs.len() == 1 && matches!(objs[0], Value::Object(_)) {
            println!("{}", objs[0]);
        } else {
            println!("{}", Value::Array(objs.to_vec()));
        }
        return;
    }
    // Every field but the long ones a table has no room for.
    let cols: Vec<&str> = k
        .fields()
        .iter()
        .copied()
        .filter(|c| !["allowed_address_pairs", "port_security"].contains(c))
        .collect();
    let cell = |v: &Value, c: &str| match &v[c] {
        Value::String(s) => s.clone(),
        Value::Array(a) if c == "rules" => format!("{} rules", a.len()),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map_or(x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    let mut rows = vec![std::iter::once("NAME".to_string())
        .chain(cols.iter().map(|c| c.to_uppercase()))
        .chain(std::iter::once("GEN".to_string()))
        .collect::<Vec<_>>()];
    for v in objs {
        rows.push(
            std::iter::once(v["name"].as_str().unwrap_or("?").to_string())
                .chain(cols.iter().map(|c| cell(v, c)))
                .chain(std::iter::once(v["generation"].to_string()))
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
