//! What happens to one frame, stage by stage, on this host's live tables:
//! the trace build of the programs (BPF_PROG_TEST_RUN on the pinned maps,
//! nothing written, see [`Dataplane::trace_port`]) and the reference model
//! on the same tables and tracked flows, side by side. Where they differ the
//! report says so: a table the compiler got wrong, a program the model does
//! not describe, or a map changed behind the agent's back.
//!
//! A frame is given as bytes, or as a flow in a short text form
//! ([`Spec`]): `tcp 10.0.0.5:40000 > 10.0.0.7:22 flags S`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
};

use cloison_abi::{next::*, trace as T, *};
use serde::{Deserialize, Serialize};

use crate::{
    loader::{verdict, KernelTrace},
    model::{Model, RuleCheck, Verdict},
    netdev,
    policy::{policy_set, Compiler},
    snapshot::{Direction, Snapshot},
    tables::Tables,
    Dataplane, Error,
};

/// Where the traced frame enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Sent by the VM of the port on this interface.
    Port(u32),
    /// Arriving from the underlay on this uplink interface.
    Uplink(u32),
}

/// A trace, as `POST /v1/trace` returns it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    /// Where the frame entered (`port NAME`, `uplink IFACE`).
    pub entry: String,
    /// The frame traced, in hex.
    pub input: String,
    /// What the input is, in one line.
    pub input_summary: String,
    pub kernel: Side,
    pub model: Side,
    /// The kernel and the model took the same decision.
    pub agree: bool,
    /// Why not, when they do not.
    pub disagreement: Option<String>,
    /// The host the kernel sent it to, for a frame encapsulated to a VTEP
    /// of the snapshot's hosts (where `--follow` traces it next).
    pub next_host: Option<String>,
}

/// One side of a trace: its verdict, its stages, its output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Side {
    /// Short and stable (`to-port:IFACE`, `to-vtep:ADDR`, `back`, `host`,
    /// `to-agent`, `to-external`, `drop:REASON`).
    pub verdict: String,
    pub stages: Vec<Stage>,
    /// The security-group rules that decided, as `group#index` (index from
    /// 0 in the group's rules), by the end they were checked for.
    pub rules: Vec<String>,
    /// The frame as it leaves (kernel only), in hex, and read.
    pub output: Option<String>,
    pub output_summary: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stage {
    pub stage: String,
    pub detail: String,
}

fn stage(stage: &str, detail: impl Into<String>) -> Stage {
    Stage {
        stage: stage.to_string(),
        detail: detail.into(),
    }
}

/// Traces `frame` through `entry` on `dp`'s live maps and through the model
/// of `snap` (the desired state the tables were applied from).
pub fn trace(dp: &Dataplane, snap: &Snapshot, entry: Entry, frame: &[u8]) -> Result<Report, Error> {
    let tables = dp.tables()?;
    let mut model = Model::new(&tables, snap, netdev::ifindex);
    model.adopt_conntrack(&dp.conntrack()?);
    model.external = dp.external().is_ok_and(|e| e.ifindex != 0);
    model.ipsec = dp.ipsec().is_ok_and(|c| c.ifindex != 0);
    let names = Names::new(snap, &tables);
    let (kernel, modelled, entry_name) = match entry {
        Entry::Port(ifindex) => (
            dp.trace_port(ifindex, frame)?,
            model.port(ifindex, frame),
            format!("port {}", names.port(ifindex)),
        ),
        Entry::Uplink(ifindex) => (
            dp.trace_uplink(ifindex, frame)?,
            model.uplink(frame),
            format!("uplink {}", names.iface(ifindex)),
        ),
    };
    let checks = model.take_checks();
    let kv = kernel_verdict(entry, &kernel);
    let compiler = Compiler::new(snap);
    let mut stages = kernel_stages(&kernel, &names, &compiler);
    if let Entry::Port(ifindex) = entry {
        if let (Some(st), Some(e)) = (
            stages
                .iter_mut()
                .find(|s| s.stage == "anti-spoofing" && s.detail.starts_with("source")),
            spoof_entry(&tables, ifindex, frame),
        ) {
            st.detail = format!("{}: {e}", st.detail);
        }
    }
    let kernel_side = Side {
        verdict: names.verdict(kv),
        stages,
        rules: kernel_rules(&kernel, &names, &compiler),
        output: (kernel.run.verdict == verdict::TC_ACT_REDIRECT).then(|| hex(&kernel.run.frame)),
        output_summary: (kernel.run.verdict == verdict::TC_ACT_REDIRECT)
            .then(|| summary(&kernel.run.frame)),
    };
    let model_side = Side {
        verdict: names.verdict(modelled),
        stages: model_stages(modelled, &checks, &names),
        rules: model_rules(&checks, &names),
        output: None,
        output_summary: None,
    };
    let disagreement = if kv != modelled {
        Some(format!(
            "the kernel says {}, the model {}",
            kernel_side.verdict, model_side.verdict
        ))
    } else if kernel_side.rules != model_side.rules {
        Some(format!(
            "the kernel's tables decide by {:?}, the model by {:?}",
            kernel_side.rules, model_side.rules
        ))
    } else {
        None
    };
    let next_host = match kv {
        Verdict::ToVtep(a) | Verdict::ToIpsec(a) => snap
            .hosts
            .iter()
            .find(|h| h.underlay_ip == Ipv4Addr::from(a))
            .map(|h| h.name.clone()),
        _ => None,
    };
    Ok(Report {
        next_host,
        entry: entry_name,
        input: hex(frame),
        input_summary: summary(frame),
        kernel: kernel_side,
        model: model_side,
        agree: disagreement.is_none(),
        disagreement,
    })
}

/// The anti-spoofing entry that lets `frame`'s source address through on
/// port `ifindex` (the longest prefix, as the kernel's LPM lookup finds it).
fn spoof_entry(tables: &Tables, ifindex: u32, frame: &[u8]) -> Option<String> {
    use etherparse::{NetSlice, SlicedPacket};
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let src: [u8; 16] = match &p.net {
        Some(NetSlice::Ipv4(ip)) => ip.header().source_addr().to_ipv6_mapped().octets(),
        Some(NetSlice::Ipv6(ip)) => ip.header().source_addr().octets(),
        _ => return None,
    };
    let covers = |addr: &[u8; 16], bits: u32| {
        let full = (bits / 8) as usize;
        let rest = bits % 8;
        addr[..full] == src[..full] && (rest == 0 || (addr[full] ^ src[full]) >> (8 - rest) == 0)
    };
    let ((len, key), allow) = tables
        .addr_allow
        .iter()
        .filter(|((len, k), _)| {
            k.ifindex_be == ifindex.to_be_bytes() && *len >= 32 && covers(&k.addr, len - 32)
        })
        .max_by_key(|((len, _), _)| *len)?;
    let bits = len - 32;
    let addr = std::net::Ipv6Addr::from(key.addr);
    let shown = match addr.to_ipv4_mapped() {
        Some(v4) if bits >= 96 => format!("{v4}/{}", bits - 96),
        _ => format!("{addr}/{bits}"),
    };
    Some(format!("entry {shown} from MAC {}", mac(&allow.mac)))
}

/// The verdict the kernel's trace shows: where the port program's next
/// step or the uplink's classification sent a redirected frame, else the
/// drop's reason. (A frame answered with an ICMP error is counted as a drop
/// of its own reason and redirected: the redirect decides.)
pub fn kernel_verdict(entry: Entry, k: &KernelTrace) -> Verdict {
    let step = |stage| k.steps.iter().rev().find(|s| s.stage == stage);
    let dropped = || {
        Verdict::Drop(
            step(T::DROP)
                .and_then(|d| DropReason::from_index(d.a))
                .unwrap_or(DropReason::NotRedirected),
        )
    };
    match entry {
        Entry::Uplink(_) => match (k.run.verdict, step(T::UPLINK)) {
            (verdict::TC_ACT_REDIRECT, Some(u)) => Verdict::ToPort(u.b),
            (verdict::TC_ACT_OK, _) => Verdict::Host,
            _ => dropped(),
        },
        Entry::Port(_) => {
            if k.run.verdict != verdict::TC_ACT_REDIRECT {
                return dropped();
            }
            let fwd = step(T::FORWARD);
            match step(T::NEXT).map(|n| n.a) {
                Some(NEXT_LOCAL) => Verdict::ToPort(fwd.map_or(0, |f| f.b)),
                Some(NEXT_ENCAP) => {
                    let vtep = fwd.map_or([0; 4], |f| f.c.to_ne_bytes());
                    if step(T::IPSEC).is_some() {
                        Verdict::ToIpsec(vtep)
                    } else {
                        Verdict::ToVtep(vtep)
                    }
                }
                Some(NEXT_SERVICE) => Verdict::ToAgent,
                Some(NEXT_EXTERNAL) => Verdict::ToExternal,
                Some(_) => Verdict::Back,
                None => Verdict::Drop(DropReason::NotRedirected),
            }
        }
    }
}

/// Names for what the tables hold by number: ports by interface, policies
/// by the ports that have them.
struct Names<'a> {
    snap: &'a Snapshot,
    tables: &'a Tables,
    /// ifindex → port name, for this host's ports.
    ports: BTreeMap<u32, String>,
}

impl<'a> Names<'a> {
    fn new(snap: &'a Snapshot, tables: &'a Tables) -> Self {
        let ports = snap
            .ports
            .iter()
            .filter_map(|p| {
                let i = netdev::ifindex(&p.interface)?;
                tables.ports.contains_key(&i).then(|| (i, p.name.clone()))
            })
            .collect();
        Names {
            snap,
            tables,
            ports,
        }
    }

    fn iface(&self, ifindex: u32) -> String {
        netdev::name_of(ifindex).unwrap_or_else(|| format!("ifindex {ifindex}"))
    }

    fn port(&self, ifindex: u32) -> String {
        match self.ports.get(&ifindex) {
            Some(p) => format!("{p} ({})", self.iface(ifindex)),
            None => self.iface(ifindex),
        }
    }

    fn slot(&self, slot: u32) -> String {
        self.tables
            .ports
            .iter()
            .find(|(_, p)| p.slot == slot)
            .map_or(format!("slot {slot}"), |(i, _)| self.port(*i))
    }

    /// The security groups of the port with policy `id`.
    fn policy(&self, id: u32) -> Option<Vec<String>> {
        let (ifindex, _) = self.tables.ports.iter().find(|(_, p)| p.policy == id)?;
        let name = self.ports.get(ifindex)?;
        let p = self.snap.ports.iter().find(|p| &p.name == name)?;
        Some(policy_set(p))
    }

    fn vtep(&self, vtep: [u8; 4]) -> String {
        let ip = Ipv4Addr::from(vtep);
        match self.snap.hosts.iter().find(|h| h.underlay_ip == ip) {
            Some(h) => format!("{ip} (host {})", h.name),
            None => ip.to_string(),
        }
    }

    fn verdict(&self, v: Verdict) -> String {
        match v {
            Verdict::ToPort(i) => format!(
                "to-port:{}",
                self.ports.get(&i).cloned().unwrap_or_else(|| self.iface(i))
            ),
            Verdict::Back => "back".into(),
            Verdict::ToVtep(a) => format!("to-vtep:{}", Ipv4Addr::from(a)),
            Verdict::ToIpsec(a) => format!("to-vtep-encrypted:{}", Ipv4Addr::from(a)),
            Verdict::Host => "host".into(),
            Verdict::ToAgent => "to-agent".into(),
            Verdict::ToExternal => "to-external".into(),
            Verdict::Drop(r) => format!("drop:{}", r.name()),
        }
    }
}

fn ct_state_name(s: u32) -> &'static str {
    match s as u8 {
        ct_state::TCP_SYN_SENT => "SYN_SENT",
        ct_state::TCP_SYN_RECV => "SYN_RECV",
        ct_state::TCP_ESTABLISHED => "ESTABLISHED",
        ct_state::TCP_FIN_WAIT => "FIN_WAIT",
        ct_state::TCP_TIME_WAIT => "TIME_WAIT",
        ct_state::TCP_CLOSE => "CLOSE",
        ct_state::ONE_WAY => "ONE_WAY",
        ct_state::BOTH_WAYS => "BOTH_WAYS",
        _ => "?",
    }
}

fn next_name(kind: u32) -> &'static str {
    match kind {
        NEXT_VERDICT => "a verdict",
        NEXT_ARP => "answer ARP",
        NEXT_ND => "answer neighbour solicitation",
        NEXT_TOO_BIG_V4 | NEXT_TOO_BIG_V6 => "too big for the network: ICMP error back",
        NEXT_ENCAP => "encapsulate to the remote VTEP",
        NEXT_LOCAL => "deliver to the local port",
        NEXT_SERVICE => "hand to the agent's gateway services",
        NEXT_TIME_EXCEEDED_V4 | NEXT_TIME_EXCEEDED_V6 => "TTL exhausted: ICMP time exceeded back",
        NEXT_EXTERNAL => "out of the external interface, NATed",
        NEXT_ROUTER_ECHO => "answer the echo request to the router",
        _ => "?",
    }
}

fn direction_of(code: u8) -> Direction {
    if code == SG_INGRESS {
        Direction::Ingress
    } else {
        Direction::Egress
    }
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

/// The protocol of the trace's parse step.
fn parsed_proto(k: &KernelTrace) -> u8 {
    k.steps
        .iter()
        .rev()
        .find(|s| s.stage == T::PARSE)
        .map_or(0, |s| s.b as u8)
}

/// The rules the kernel's policy steps stand for (allowed checks only:
/// a denial has no rule).
fn kernel_rules(k: &KernelTrace, names: &Names, compiler: &Compiler) -> Vec<String> {
    let proto = parsed_proto(k);
    let mut out = Vec::new();
    for s in k.steps.iter().filter(|s| s.stage == T::POLICY) {
        let (dir, allowed, port) = (
            direction_of(s.b as u8),
            (s.b >> 8) & 1 == 1,
            (s.b >> 16) as u16,
        );
        if !allowed {
            out.push(format!("{}:none", dir_name(dir)));
            continue;
        }
        let rules = names
            .policy(s.a)
            .map(|set| compiler.rules_of_class(&set, dir, s.c, proto, port))
            .unwrap_or_default();
        match rules.first() {
            Some((g, i)) => out.push(format!("{}:{g}#{i}", dir_name(dir))),
            None => out.push(format!("{}:?", dir_name(dir))),
        }
    }
    out
}

fn model_rules(checks: &[RuleCheck], _names: &Names) -> Vec<String> {
    checks
        .iter()
        .map(|c| match &c.rule {
            Some((g, i)) => format!("{}:{g}#{i}", dir_name(c.direction)),
            None => format!("{}:none", dir_name(c.direction)),
        })
        .collect()
}

fn kernel_stages(k: &KernelTrace, names: &Names, compiler: &Compiler) -> Vec<Stage> {
    let proto = parsed_proto(k);
    let mut out = Vec::new();
    for s in &k.steps {
        let st = match s.stage {
            T::PORT => stage(
                "port",
                format!(
                    "{}, network {}, port security {}",
                    names.slot(s.a),
                    s.b,
                    if s.c & PORT_F_SECURITY != 0 {
                        "on"
                    } else {
                        "off"
                    }
                ),
            ),
            T::PARSE => stage(
                "parse",
                match s.a {
                    0x0806 => "ARP".to_string(),
                    l3 => format!(
                        "{} protocol {}, ports {} > {}",
                        if l3 == 0x0800 { "IPv4" } else { "IPv6" },
                        s.b,
                        s.c >> 16,
                        s.c & 0xffff
                    ),
                },
            ),
            T::SPOOF => stage(
                "anti-spoofing",
                if s.a == 2 {
                    "ARP sender MAC and IP are the port's"
                } else {
                    "source MAC and IP allowed on this port"
                },
            ),
            T::FORWARD => stage(
                "forwarding",
                match s.a {
                    FWD_LOCAL => format!("local port {}", names.port(s.b)),
                    _ => format!("remote port behind VTEP {}", names.vtep(s.c.to_ne_bytes())),
                },
            ),
            T::ROUTE => stage(
                "router",
                format!("zone {:#x}, routed into network {}", s.a, s.b),
            ),
            T::CONNTRACK => stage(
                "conntrack",
                match s.a {
                    T::CT_HIT => format!("hit: {} (zone {})", ct_state_name(s.b), s.c),
                    T::CT_RECHECKED => format!(
                        "hit: {}, rules changed since: checked again",
                        ct_state_name(s.b)
                    ),
                    T::CT_WOULD_INSERT => format!(
                        "miss: a new flow, would insert as {} (zone {}; not inserted by a trace)",
                        ct_state_name(s.b),
                        s.c
                    ),
                    T::CT_RELATED => "ICMP error about a tracked flow".into(),
                    T::CT_FRAGMENT => "a later fragment of an allowed first fragment".into(),
                    T::CT_UNTRACKED => "not tracked: the rules decide every packet".into(),
                    T::CT_MISS => "miss, and not a TCP SYN".into(),
                    _ => format!("result {}", s.a),
                },
            ),
            T::POLICY => {
                let dir = direction_of(s.b as u8);
                let (allowed, port) = ((s.b >> 8) & 1 == 1, (s.b >> 16) as u16);
                let groups = names.policy(s.a).unwrap_or_default();
                let detail = if s.c == T::NO_CLASS {
                    format!(
                        "{} of policy {} ({}): no rule names the remote address: denied",
                        dir_name(dir),
                        s.a,
                        groups.join(", ")
                    )
                } else if allowed {
                    let rules = compiler.rules_of_class(&groups, dir, s.c, proto, port);
                    let rules: Vec<String> =
                        rules.iter().map(|(g, i)| format!("{g}#{i}")).collect();
                    format!(
                        "{} of policy {} ({}): remote class {}, port {port}: allowed by {}",
                        dir_name(dir),
                        s.a,
                        groups.join(", "),
                        s.c,
                        rules.join(", ")
                    )
                } else {
                    format!(
                        "{} of policy {} ({}): remote class {}, port {port}: no rule allows it",
                        dir_name(dir),
                        s.a,
                        groups.join(", "),
                        s.c
                    )
                };
                stage("security groups", detail)
            }
            T::NEXT => stage("next", next_name(s.a)),
            T::NAT => stage(
                "snat",
                format!(
                    "outside port {}{}",
                    s.a,
                    if s.b == 1 {
                        " (a new mapping: not made by a trace)"
                    } else {
                        " (the flow's mapping)"
                    }
                ),
            ),
            T::ENCAP => stage(
                "vxlan",
                format!(
                    "to VTEP {}, VNI {}, flow hash {:#010x}",
                    names.vtep(s.a.to_ne_bytes()),
                    s.b,
                    s.c
                ),
            ),
            T::NEXT_HOP if s.a == 1 => {
                let (b, c) = (s.b.to_be_bytes(), s.c.to_be_bytes());
                stage(
                    "next hop",
                    format!("{} (the underlay's FIB and neighbour table)", mac(&[b[0], b[1], b[2], b[3], c[2], c[3]])),
                )
            }
            T::NEXT_HOP => stage(
                "next hop",
                "not resolved yet: the kernel resolves the VTEP's neighbour as it sends (bpf_redirect_neigh); the outer MACs below are filled then",
            ),
            T::IPSEC if s.b != 0 => stage(
                "encryption",
                "refused: one of this host and the VTEP's host is an ipsec host and the other is not",
            ),
            T::IPSEC if s.a == 0 => stage(
                "encryption",
                "no IPsec device yet (charon's not found): dropped, never sent in clear",
            ),
            T::IPSEC => stage(
                "encryption",
                format!("into the IPsec device ({}), to be sent inside ESP", names.iface(s.a)),
            ),
            T::DELIVER => stage("deliver", format!("to the VM of {}", names.slot(s.a))),
            T::UPLINK => stage("decap", format!("to {} (zone {})", names.port(s.b), s.c)),
            T::DROP => stage(
                "drop",
                DropReason::from_index(s.a)
                    .map_or(format!("reason {}", s.a), |r| r.name().to_string()),
            ),
            other => stage("?", format!("step {other}: {} {} {}", s.a, s.b, s.c)),
        };
        out.push(st);
    }
    if k.cut {
        out.push(stage(
            "…",
            "the trace record is full: later steps are not shown",
        ));
    }
    out
}

fn model_stages(v: Verdict, checks: &[RuleCheck], names: &Names) -> Vec<Stage> {
    let mut out: Vec<Stage> = checks
        .iter()
        .map(|c| {
            stage(
                "security groups",
                format!(
                    "{} of {}: {}",
                    dir_name(c.direction),
                    names.port(c.ifindex),
                    match &c.rule {
                        Some((g, i)) => format!("allowed by {g}#{i}"),
                        None => "no rule allows it".into(),
                    }
                ),
            )
        })
        .collect();
    out.push(stage("verdict", names.verdict(v)));
    out
}

pub fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

pub fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let s: String = s
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    if !s.len().is_multiple_of(2) {
        return Err("an odd number of hex digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("hex: {e}")))
        .collect()
}

fn mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `, TCP 40000 > 22 [SA]`: ports and flags.
pub(crate) fn tcp_summary(t: &etherparse::TcpSlice) -> String {
    let mut flags = String::new();
    for (on, c) in [
        (t.syn(), 'S'),
        (t.ack(), 'A'),
        (t.fin(), 'F'),
        (t.rst(), 'R'),
        (t.psh(), 'P'),
    ] {
        if on {
            flags.push(c);
        }
    }
    format!(
        ", TCP {} > {} [{flags}]",
        t.source_port(),
        t.destination_port()
    )
}

/// One line saying what a frame is: Ethernet, IP, transport, and the frame
/// inside it if it is VXLAN.
pub fn summary(frame: &[u8]) -> String {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let p = match SlicedPacket::from_ethernet(frame) {
        Ok(p) => p,
        Err(e) => return format!("{} bytes, not parsed: {e}", frame.len()),
    };
    let mut s = String::new();
    if let Some(etherparse::LinkSlice::Ethernet2(e)) = &p.link {
        let _ = write!(s, "{} > {}", mac(&e.source()), mac(&e.destination()));
    }
    match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            let _ = write!(
                s,
                ", IPv4 {} > {} ttl {}",
                h.source_addr(),
                h.destination_addr(),
                h.ttl()
            );
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            let _ = write!(
                s,
                ", IPv6 {} > {} hop limit {}",
                h.source_addr(),
                h.destination_addr(),
                h.hop_limit()
            );
        }
        Some(NetSlice::Arp(a)) => {
            let _ = write!(s, ", ARP op {}", a.operation().0);
        }
        None => {}
    }
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => s.push_str(&tcp_summary(t)),
        Some(TransportSlice::Udp(u)) => {
            let _ = write!(s, ", UDP {} > {}", u.source_port(), u.destination_port());
            if u.destination_port() == VXLAN_PORT && u.payload().len() >= 8 {
                let v = u.payload();
                let vni = u32::from_be_bytes([0, v[4], v[5], v[6]]);
                let _ = write!(s, ", VXLAN VNI {vni}: {}", summary(&v[8..]));
            }
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let _ = write!(s, ", ICMP type {} code {}", i.type_u8(), i.code_u8());
        }
        Some(TransportSlice::Icmpv6(i)) => {
            let _ = write!(s, ", ICMPv6 type {} code {}", i.type_u8(), i.code_u8());
        }
        Some(_) | None => {}
    }
    s
}

/// A report in ovn-trace's manner: the input, each side's stages, the
/// verdicts, and the disagreement if any, loudly.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}: {}", r.entry, r.input_summary);
    let _ = writeln!(s);
    let _ = writeln!(s, "kernel (the programs' trace build, on the live tables)");
    for (i, st) in r.kernel.stages.iter().enumerate() {
        let _ = writeln!(s, "  {:>2}. {:<16} {}", i + 1, st.stage, st.detail);
    }
    let _ = writeln!(s, "  verdict: {}", r.kernel.verdict);
    if let Some(o) = &r.kernel.output_summary {
        let _ = writeln!(s, "  output:  {o}");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "model (the reference, on the same tables and flows)");
    for (i, st) in r.model.stages.iter().enumerate() {
        let _ = writeln!(s, "  {:>2}. {:<16} {}", i + 1, st.stage, st.detail);
    }
    let _ = writeln!(s);
    match &r.disagreement {
        None => {
            let _ = writeln!(s, "kernel and model agree");
        }
        Some(d) => {
            let _ = writeln!(s, "!!! DISAGREE !!! {d}");
        }
    }
    s
}

/// The stable few lines tests read: the verdicts, the rules, agreement.
pub fn minimal(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "kernel {}", r.kernel.verdict);
    let _ = writeln!(s, "model {}", r.model.verdict);
    for rule in &r.kernel.rules {
        let _ = writeln!(s, "rule {rule}");
    }
    let _ = writeln!(s, "{}", if r.agree { "agree" } else { "DISAGREE" });
    s
}

/// A flow in text, to build the frame to trace:
/// `PROTO SRC[:PORT] > DST[:PORT] [flags FLAGS] [ttl N] [len N]`, PROTO one
/// of tcp, udp, icmp (an echo request); IPv6 addresses with a port in
/// brackets (`[fd00::5]:53`); FLAGS TCP's letters (`S`, `SA`, `A`, `F`,
/// `R`, `P`; S by default); `len` the payload's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub proto: SpecProto,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub flags: String,
    pub ttl: u8,
    pub len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecProto {
    Tcp,
    Udp,
    Icmp,
}

fn addr_port(s: &str, proto: SpecProto) -> Result<(IpAddr, u16), String> {
    let (addr, port) = if let Some(rest) = s.strip_prefix('[') {
        let (a, p) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: no closing bracket"))?;
        (a, p.strip_prefix(':'))
    } else if s.matches(':').count() == 1 {
        let (a, p) = s.split_once(':').expect("one colon");
        (a, Some(p))
    } else {
        (s, None)
    };
    let ip: IpAddr = addr.parse().map_err(|e| format!("{addr:?}: {e}"))?;
    let port = match (port, proto) {
        (Some(p), SpecProto::Icmp) => return Err(format!("{p:?}: ICMP has no ports")),
        (Some(p), _) => p.parse().map_err(|e| format!("port {p:?}: {e}"))?,
        (None, SpecProto::Icmp) => 0,
        (None, _) => return Err(format!("{s:?}: a port is needed")),
    };
    Ok((ip, port))
}

impl std::str::FromStr for Spec {
    type Err = String;
    fn from_str(text: &str) -> Result<Spec, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let [proto, src, gt, dst, rest @ ..] = words.as_slice() else {
            return Err("expected PROTO SRC > DST".into());
        };
        if *gt != ">" {
            return Err(format!("expected '>' between the ends, found {gt:?}"));
        }
        let proto = match *proto {
            "tcp" => SpecProto::Tcp,
            "udp" => SpecProto::Udp,
            "icmp" | "icmp6" => SpecProto::Icmp,
            p => return Err(format!("protocol {p:?}: expected tcp, udp or icmp")),
        };
        let (src, sport) = addr_port(src, proto)?;
        let (dst, dport) = addr_port(dst, proto)?;
        if src.is_ipv4() != dst.is_ipv4() {
            return Err("the two ends are not of one IP version".into());
        }
        let mut spec = Spec {
            proto,
            src,
            sport,
            dst,
            dport,
            flags: "S".into(),
            ttl: 64,
            len: 0,
        };
        let mut it = rest.iter();
        while let Some(k) = it.next() {
            let v = it.next().ok_or_else(|| format!("{k:?} needs a value"))?;
            match *k {
                "flags" if proto == SpecProto::Tcp => {
                    if v.is_empty() || !v.chars().all(|c| "SAFRP".contains(c)) {
                        return Err(format!("flags {v:?}: letters of SAFRP"));
                    }
                    spec.flags = v.to_string();
                }
                "ttl" => spec.ttl = v.parse().map_err(|e| format!("ttl {v:?}: {e}"))?,
                "len" => {
                    spec.len = v.parse().map_err(|e| format!("len {v:?}: {e}"))?;
                    if spec.len > 9000 {
                        return Err("len: at most 9000 bytes".into());
                    }
                }
                _ => return Err(format!("unknown option {k:?}")),
            }
        }
        Ok(spec)
    }
}

impl Spec {
    /// The frame from `src_mac` to `dst_mac`.
    pub fn frame(&self, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
        use etherparse::PacketBuilder;
        let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), self.ttl),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), self.ttl),
            _ => unreachable!("checked when parsed"),
        };
        let payload = vec![0u8; self.len];
        let mut out = Vec::new();
        let written = match self.proto {
            SpecProto::Udp => ip.udp(self.sport, self.dport).write(&mut out, &payload),
            SpecProto::Icmp if self.src.is_ipv4() => {
                ip.icmpv4_echo_request(1, 1).write(&mut out, &payload)
            }
            SpecProto::Icmp => ip.icmpv6_echo_request(1, 1).write(&mut out, &payload),
            SpecProto::Tcp => {
                let mut t = ip.tcp(self.sport, self.dport, 1, 64240);
                for c in self.flags.chars() {
                    t = match c {
                        'S' => t.syn(),
                        'A' => t.ack(1),
                        'F' => t.fin(),
                        'R' => t.rst(),
                        _ => t.psh(),
                    };
                }
                t.write(&mut out, &payload)
            }
        };
        written.expect("a vector takes any frame");
        out
    }
}

/// The frame a port's VM would send for `spec`: from the port's MAC, to the
/// destination's MAC in the port's network if the tables know it, else to
/// the network's gateway (routed).
pub fn frame_from_port(
    dp: &Dataplane,
    snap: &Snapshot,
    port: &str,
    spec: &Spec,
) -> Result<(u32, Vec<u8>), Error> {
    let p = snap
        .ports
        .iter()
        .find(|p| p.name == port)
        .ok_or_else(|| Error::Invalid(format!("no port {port}")))?;
    let ifindex = netdev::ifindex(&p.interface).ok_or_else(|| {
        Error::Invalid(format!(
            "port {port}: interface {} is not on this host",
            p.interface
        ))
    })?;
    let tables = dp.tables()?;
    let info = tables
        .ports
        .get(&ifindex)
        .ok_or_else(|| Error::Invalid(format!("port {port} is not in this host's tables")))?;
    let dst = crate::tables::ip16(spec.dst);
    let dst_mac = tables
        .neighbours
        .get(&NeighbourKey {
            vni: info.vni,
            addr: dst,
        })
        .map_or(gateway_mac(info.vni), |n| n.mac);
    Ok((ifindex, spec.frame(p.mac.0, dst_mac)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_build_the_frame_they_say() {
        let s: Spec = "tcp 10.0.0.5:40000 > 10.0.0.7:22 flags S".parse().unwrap();
        assert_eq!((s.sport, s.dport, s.flags.as_str()), (40000, 22, "S"));
        let f = s.frame([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        assert_eq!(
            summary(&f),
            "02:00:00:00:00:01 > 02:00:00:00:00:02, IPv4 10.0.0.5 > 10.0.0.7 ttl 64, TCP 40000 > 22 [S]"
        );
        let u: Spec = "udp [fd00::5]:53 > [fd00::7]:5353 len 10 ttl 3"
            .parse()
            .unwrap();
        let f = u.frame([2; 6], [4; 6]);
        assert_eq!(f.len(), 14 + 40 + 8 + 10);
        assert!(
            summary(&f).ends_with("hop limit 3, UDP 53 > 5353"),
            "{}",
            summary(&f)
        );
        let i: Spec = "icmp 10.0.0.5 > 10.0.0.7".parse().unwrap();
        assert!(summary(&i.frame([2; 6], [4; 6])).ends_with("ICMP type 8 code 0"));
        for bad in [
            "tcp 10.0.0.5 > 10.0.0.7:22",
            "tcp 10.0.0.5:1 10.0.0.7:22",
            "sctp 10.0.0.5:1 > 10.0.0.7:2",
            "tcp 10.0.0.5:1 > [fd00::1]:2",
            "tcp 10.0.0.5:1 > 10.0.0.7:2 flags X",
            "icmp 10.0.0.5:1 > 10.0.0.7",
            "udp 10.0.0.5:1 > 10.0.0.7:2 len",
            "udp 10.0.0.5:1 > 10.0.0.7:99999",
        ] {
            assert!(bad.parse::<Spec>().is_err(), "{bad} is refused");
        }
        assert_eq!(unhex("0a:FF 01").unwrap(), [0x0a, 0xff, 0x01]);
        assert!(unhex("abc").is_err());
    }
}
