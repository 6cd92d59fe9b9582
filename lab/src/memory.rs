//! Kernel memory of the dataplane's maps (what `bpftool` reports as each
//! map's `bytes_memlock`: the real usage of tries, the preallocated size of
//! hash maps), and what one more port, rule or flow costs.
use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{Context, Result};
use cloison_dataplane::{
    snapshot::MacAddr, Host, Network, Port, Rule, SecurityGroup, Snapshot, UplinkHook,
};
use cloison_testkit::testbed::Testbed;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct MapMemory {
    pub name: String,
    pub kind: String,
    pub max_entries: u64,
    pub bytes: u64,
    /// `bytes / max_entries`: what one entry takes of a preallocated map.
    pub bytes_per_entry: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub maps: Vec<MapMemory>,
    pub total_bytes: u64,
    /// Added by one more remote port: nothing for the preallocated hash
    /// maps (their capacity is charged up front), so this is what grows.
    pub bytes_per_remote_port: f64,
    /// Added by one more rule in a port's group (the two LPM tables).
    pub bytes_per_rule: f64,
    /// One conntrack entry (the LRU map is preallocated: its size / capacity).
    pub bytes_per_flow: f64,
}

/// What `bpftool` reports of the map pinned at `pin`.
pub fn pinned_map(pin: &Path) -> Result<MapMemory> {
    let o = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin)
        .output()
        .context("bpftool")?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("bpftool on {}", pin.display()))?;
    Ok(MapMemory {
        name: v["name"].as_str().unwrap_or("?").to_string(),
        kind: v["type"].as_str().unwrap_or("?").to_string(),
        max_entries: v["max_entries"].as_u64().unwrap_or(0),
        bytes: v["bytes_memlock"].as_u64().unwrap_or(0),
        bytes_per_entry: v["bytes_memlock"].as_u64().unwrap_or(0) as f64
            / v["max_entries"].as_u64().unwrap_or(1).max(1) as f64,
    })
}

fn maps(pin_dir: &Path) -> Result<Vec<MapMemory>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(pin_dir)? {
        let p = e?.path();
        if p.is_file() {
            out.push(pinned_map(&p)?);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn total(m: &[MapMemory]) -> u64 {
    m.iter().map(|m| m.bytes).sum()
}

fn base() -> Snapshot {
    let open: SecurityGroup = serde_json::from_str(
        r#"{"name": "open", "tenant": "t", "rules": [{"direction": "egress"}]}"#,
    )
    .expect("group");
    Snapshot {
        floating_ips: vec![],
        hosts: vec![
            Host {
                external_ip: None,
                encryption: Default::default(),
                name: "hv1".into(),
                underlay_ip: "192.0.2.1".parse().expect("address"),
            },
            Host {
                external_ip: None,
                encryption: Default::default(),
                name: "hv2".into(),
                underlay_ip: "192.0.2.2".parse().expect("address"),
            },
        ],
        networks: vec![Network {
            name: "net".into(),
            tenant: "t".into(),
            vni: 1001,
            subnets: vec!["10.0.0.0/8".parse().expect("subnet")],
            mtu: 1450,
            gateway_ips: vec![],
            dhcp: true,
            dns_servers: vec![],
            host_routes: vec![],
        }],
        security_groups: vec![open],
        ports: vec![Port {
            name: "a1".into(),
            network: "net".into(),
            host: "hv1".into(),
            interface: "pa1".into(),
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            ips: vec!["10.0.0.1".parse().expect("address")],
            security_groups: vec!["open".into()],
            allowed_address_pairs: vec![],
            port_security: true,
            hostname: None,
            instance_id: None,
        }],
        routers: vec![],
    }
}

const N: u32 = 10_000;

/// Measures in a test bed of its own.
pub fn measure() -> Result<Memory> {
    let snap = base();
    let tag = format!("clmem{:x}", std::process::id() & 0xffff);
    let bed = Testbed::new(&tag, &snap, "hv1")?;
    let snap2 = snap.clone();
    let result = std::thread::scope(|s| {
        s.spawn(move || -> Result<Memory> {
            let mut dp = bed.enter()?;
            let uplink = cloison_testkit::testbed::UPLINK;
            dp.apply(&snap2.validated()?, "hv1", uplink, UplinkHook::Xdp)?;
            let pin = dp.pin_dir().to_path_buf();
            let before = maps(&pin)?;

            let mut ports = snap2.clone();
            for i in 0..N {
                let mut p = ports.ports[0].clone();
                p.name = format!("r{i}");
                p.host = "hv2".into();
                p.interface = format!("t{i}");
                p.mac = MacAddr([2, 1, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
                p.ips = vec![std::net::IpAddr::from([10, 1, (i >> 8) as u8, i as u8])];
                ports.ports.push(p);
            }
            dp.apply(&ports.validated()?, "hv1", uplink, UplinkHook::Xdp)?;
            let with_ports = maps(&pin)?;
            dp.apply(&snap2.validated()?, "hv1", uplink, UplinkHook::Xdp)?;

            // N rules, in groups of at most MAX_RULES_PER_GROUP, the port in all.
            let mut rules = snap2.clone();
            let extra: Vec<Rule> = (0..N)
                .map(|i| -> Rule {
                    serde_json::from_str(&format!(
                        r#"{{"direction": "ingress", "protocol": "tcp", "ports": "{}",
                        "remote": {{"cidr": "172.16.{}.{}/32"}}}}"#,
                        1 + i % 60000,
                        i >> 8,
                        i & 0xff
                    ))
                    .expect("rule")
                })
                .collect();
            let tenant = rules.security_groups[0].tenant.clone();
            for (i, chunk) in extra
                .chunks(cloison_dataplane::validate::MAX_RULES_PER_GROUP)
                .enumerate()
            {
                let name = format!("many-{i}");
                rules.security_groups.push(SecurityGroup {
                    name: name.clone(),
                    tenant: tenant.clone(),
                    rules: chunk.to_vec(),
                });
                rules.ports[0].security_groups.push(name);
            }
            dp.apply(&rules.validated()?, "hv1", uplink, UplinkHook::Xdp)?;
            let with_rules = maps(&pin)?;

            let ct = before
                .iter()
                .find(|m| m.name == "CL_CONNTRACK")
                .context("conntrack map")?;
            Ok(Memory {
                total_bytes: total(&before),
                bytes_per_remote_port: (total(&with_ports) as f64 - total(&before) as f64)
                    / N as f64,
                bytes_per_rule: (total(&with_rules) as f64 - total(&before) as f64) / N as f64,
                bytes_per_flow: ct.bytes as f64 / ct.max_entries.max(1) as f64,
                maps: before,
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("memory thread panicked"))?
    });
    result
}

/// Bytes per map, for the results file.
pub fn by_map(m: &Memory) -> BTreeMap<String, u64> {
    m.maps.iter().map(|x| (x.name.clone(), x.bytes)).collect()
}
