//! The monitor's events as userspace reads them from the ring buffer
//! (`CL_EVENTS`): decoded from the kernel's record and the packet's first
//! bytes it carries (a VXLAN packet's inner frame is the one shown), named
//! after the port, and matched against a filter.
use std::{collections::BTreeMap, fmt::Write, net::IpAddr};

use cloison_abi::{monitor as m, DropReason, MonitorEvent};
use etherparse::{LaxNetSlice, LaxSlicedPacket, TransportSlice};
use serde::{Deserialize, Serialize};

use cloison_abi::VXLAN_PORT;

/// One event, as `GET /v1/monitor` streams it (a JSON line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When the program saw it: Unix time, in nanoseconds.
    pub time_ns: u64,
    /// `drop`, or `flow` (a new flow the rules allowed).
    pub kind: String,
    /// The program: `port`, `uplink`, `service` or `external`.
    pub hook: String,
    /// Why it was dropped (drops only).
    pub reason: Option<String>,
    /// The port charged and its tenant (where known).
    pub port: Option<String>,
    pub tenant: Option<String>,
    /// The interface the program runs on.
    pub ifindex: u32,
    /// The packet's length.
    pub len: u32,
    /// The (inner) packet: protocol, addresses, ports; the VNI if it came
    /// in VXLAN.
    pub proto: Option<String>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub vni: Option<u32>,
    /// One line: what the packet is.
    pub summary: String,
}

/// A port slot's name and tenant.
pub type Names = BTreeMap<u32, (String, String)>;

/// The record in `raw` (one ring buffer entry), or None if it is not one.
/// `boot_ns` is the Unix time of monotonic time zero (see [`boot_ns`]).
pub fn decode(raw: &[u8], names: &Names, boot_ns: u64) -> Option<Event> {
    if raw.len() < size_of::<MonitorEvent>() {
        return None;
    }
    // SAFETY: long enough, and every bit pattern is a valid MonitorEvent.
    let e: MonitorEvent = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
    let data = &e.data[..(e.captured as usize).min(m::CAPTURE)];
    let named = names.get(&e.slot);
    let mut ev = Event {
        time_ns: boot_ns + e.time_ns,
        kind: match e.kind {
            m::KIND_DROP => "drop",
            m::KIND_FLOW => "flow",
            _ => "unknown",
        }
        .into(),
        hook: match e.hook {
            m::HOOK_PORT => "port",
            m::HOOK_UPLINK => "uplink",
            m::HOOK_SERVICE => "service",
            m::HOOK_EXTERNAL => "external",
            _ => "unknown",
        }
        .into(),
        reason: (e.kind == m::KIND_DROP).then(|| {
            DropReason::from_index(e.reason as u32)
                .map_or("unknown", |r| r.name())
                .into()
        }),
        port: named.map(|n| n.0.clone()),
        tenant: named.map(|n| n.1.clone()),
        ifindex: e.ifindex,
        len: e.len,
        proto: None,
        src: None,
        dst: None,
        sport: None,
        dport: None,
        vni: None,
        summary: String::new(),
    };
    describe(data, &mut ev, 0);
    Some(ev)
}

/// Fills `ev`'s packet fields from the frame (truncated as it may be).
fn describe(frame: &[u8], ev: &mut Event, depth: u8) {
    let p = match LaxSlicedPacket::from_ethernet(frame) {
        Ok(p) => p,
        Err(e) => {
            ev.summary = format!("{} bytes captured, not parsed: {e}", frame.len());
            return;
        }
    };
    let s = &mut ev.summary;
    match &p.net {
        Some(LaxNetSlice::Ipv4(ip)) => {
            let h = ip.header();
            ev.src = Some(h.source_addr().into());
            ev.dst = Some(h.destination_addr().into());
            let _ = write!(s, "IPv4 {} > {}", h.source_addr(), h.destination_addr());
        }
        Some(LaxNetSlice::Ipv6(ip)) => {
            let h = ip.header();
            ev.src = Some(h.source_addr().into());
            ev.dst = Some(h.destination_addr().into());
            let _ = write!(s, "IPv6 {} > {}", h.source_addr(), h.destination_addr());
        }
        Some(LaxNetSlice::Arp(a)) => {
            ev.proto = Some("arp".into());
            let _ = write!(s, "ARP op {}", a.operation().0);
        }
        None => {
            let _ = write!(s, "{} bytes, no IP", frame.len());
        }
    }
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            ev.proto = Some("tcp".into());
            (ev.sport, ev.dport) = (Some(t.source_port()), Some(t.destination_port()));
            s.push_str(&crate::trace::tcp_summary(t));
        }
        Some(TransportSlice::Udp(u)) => {
            if depth == 0 && u.destination_port() == VXLAN_PORT && u.payload().len() >= 8 {
                let v = u.payload();
                let vni = u32::from_be_bytes([0, v[4], v[5], v[6]]);
                let outer = std::mem::take(&mut ev.summary);
                describe(&v[8..], ev, depth + 1);
                ev.vni = Some(vni);
                ev.summary = format!("{} (VXLAN VNI {vni} from {outer})", ev.summary);
                return;
            }
            ev.proto = Some("udp".into());
            (ev.sport, ev.dport) = (Some(u.source_port()), Some(u.destination_port()));
            let _ = write!(s, ", UDP {} > {}", u.source_port(), u.destination_port());
        }
        Some(TransportSlice::Icmpv4(i)) => {
            ev.proto = Some("icmp".into());
            let _ = write!(s, ", ICMP type {} code {}", i.type_u8(), i.code_u8());
        }
        Some(TransportSlice::Icmpv6(i)) => {
            ev.proto = Some("icmpv6".into());
            let _ = write!(s, ", ICMPv6 type {} code {}", i.type_u8(), i.code_u8());
        }
        Some(_) | None => {}
    }
}

/// The Unix time (ns) at which CLOCK_MONOTONIC was zero, to turn the
/// programs' timestamps into wall-clock time.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; the clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    unix.saturating_sub(mono)
}

/// Which events a watcher wants: every term must match (`and` between
/// terms may be written or left out). Terms: `drop`, `flow`, `tcp`, `udp`,
/// `icmp`, `icmpv6`, `arp`, `host IP`, `src IP`, `dst IP`, `port N`,
/// `sport N`, `dport N`, `reason NAME`, `tenant NAME`, `vni N`,
/// `hook NAME`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    terms: Vec<Term>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    Kind(String),
    Proto(String),
    Host(IpAddr),
    Src(IpAddr),
    Dst(IpAddr),
    Port(u16),
    Sport(u16),
    Dport(u16),
    Reason(String),
    Tenant(String),
    Vni(u32),
    Hook(String),
}

impl Filter {
    /// Parses `expr`; an unknown term or a bad value is an error naming it.
    pub fn parse(expr: &str) -> Result<Filter, String> {
        let mut words = expr.split_whitespace().filter(|w| *w != "and");
        let mut terms = Vec::new();
        while let Some(w) = words.next() {
            let mut arg = |what: &str| {
                words
                    .next()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{w} wants {what}"))
            };
            let ip = |s: String| {
                s.parse::<IpAddr>()
                    .map_err(|_| format!("{w}: {s:?} is not an IP address"))
            };
            let num = |s: String| {
                s.parse::<u32>()
                    .map_err(|_| format!("{w}: {s:?} is not a number"))
            };
            let port = |s: String| {
                s.parse::<u16>()
                    .map_err(|_| format!("{w}: {s:?} is not a port"))
            };
            terms.push(match w {
                "drop" | "flow" => Term::Kind(w.into()),
                "tcp" | "udp" | "icmp" | "icmpv6" | "arp" => Term::Proto(w.into()),
                "host" => Term::Host(ip(arg("an address")?)?),
                "src" => Term::Src(ip(arg("an address")?)?),
                "dst" => Term::Dst(ip(arg("an address")?)?),
                "port" => Term::Port(port(arg("a port")?)?),
                "sport" => Term::Sport(port(arg("a port")?)?),
                "dport" => Term::Dport(port(arg("a port")?)?),
                "reason" => {
                    let r = arg("a drop reason")?;
                    if !DropReason::ALL.iter().any(|d| d.name() == r) {
                        return Err(format!("reason: no drop reason is called {r:?}"));
                    }
                    Term::Reason(r)
                }
                "tenant" => Term::Tenant(arg("a tenant")?),
                "vni" => Term::Vni(num(arg("a VNI")?)?),
                "hook" => {
                    let h = arg("a hook")?;
                    if !["port", "uplink", "service", "external"].contains(&h.as_str()) {
                        return Err(format!(
                            "hook: {h:?} is not port, uplink, service or external"
                        ));
                    }
                    Term::Hook(h)
                }
                _ => return Err(format!("unknown filter term {w:?}")),
            });
        }
        Ok(Filter { terms })
    }

    pub fn matches(&self, e: &Event) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Kind(k) => e.kind == *k,
            Term::Proto(p) => e.proto.as_deref() == Some(p),
            Term::Host(a) => e.src == Some(*a) || e.dst == Some(*a),
            Term::Src(a) => e.src == Some(*a),
            Term::Dst(a) => e.dst == Some(*a),
            Term::Port(p) => e.sport == Some(*p) || e.dport == Some(*p),
            Term::Sport(p) => e.sport == Some(*p),
            Term::Dport(p) => e.dport == Some(*p),
            Term::Reason(r) => e.reason.as_deref() == Some(r),
            Term::Tenant(t) => e.tenant.as_deref() == Some(t),
            Term::Vni(v) => e.vni == Some(*v),
            Term::Hook(h) => e.hook == *h,
        })
    }
}

/// One line for a person: time, kind, where, why, what.
pub fn render(e: &Event) -> String {
    let secs = e.time_ns / 1_000_000_000;
    let (h, mi, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let ms = (e.time_ns / 1_000_000) % 1000;
    let what = match &e.reason {
        Some(r) => format!("drop {r}"),
        None => e.kind.clone(),
    };
    let port = match (&e.port, &e.tenant) {
        (Some(p), Some(t)) => format!("{p} ({t})"),
        _ => format!("ifindex {}", e.ifindex),
    };
    format!(
        "{h:02}:{mi:02}:{s:02}.{ms:03} {what:<24} {port} [{}]: {} ({} bytes)",
        e.hook, e.summary, e.len
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_tcp() -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 5], [10, 0, 0, 7], 64)
            .tcp(40000, 22, 1, 1000)
            .syn();
        let mut out = Vec::new();
        b.write(&mut out, &[0; 300]).unwrap();
        out
    }

    fn raw(kind: u8, reason: u32, frame: &[u8]) -> Vec<u8> {
        let cap = frame.len().min(m::CAPTURE);
        let mut e = MonitorEvent {
            time_ns: 5,
            kind,
            hook: m::HOOK_PORT,
            reason: reason as u8,
            _pad: 0,
            slot: 3,
            ifindex: 9,
            len: frame.len() as u32,
            captured: cap as u32,
            _pad2: 0,
            data: [0; m::CAPTURE],
        };
        e.data[..cap].copy_from_slice(&frame[..cap]);
        let p = &e as *const MonitorEvent as *const u8;
        unsafe { std::slice::from_raw_parts(p, size_of::<MonitorEvent>()) }.to_vec()
    }

    #[test]
    fn a_truncated_capture_still_names_the_flow_and_the_port() {
        let f = frame_tcp();
        let names: Names = [(3, ("vm1".into(), "acme".into()))].into();
        let e = decode(
            &raw(m::KIND_DROP, DropReason::SpoofedIp as u32, &f),
            &names,
            100,
        )
        .unwrap();
        assert_eq!(e.len as usize, f.len());
        assert_eq!(e.time_ns, 105);
        assert_eq!(e.reason.as_deref(), Some("spoofed_ip"));
        assert_eq!(
            (e.port.as_deref(), e.tenant.as_deref()),
            (Some("vm1"), Some("acme"))
        );
        assert_eq!(e.proto.as_deref(), Some("tcp"));
        assert_eq!(e.src, Some("10.0.0.5".parse().unwrap()));
        assert_eq!((e.sport, e.dport), (Some(40000), Some(22)));
        assert!(render(&e).contains("drop spoofed_ip"), "{}", render(&e));
        assert!(decode(&[0; 8], &names, 0).is_none(), "short record");
    }

    #[test]
    fn filters_match_what_they_name_and_refuse_what_they_do_not_know() {
        let e = decode(&raw(m::KIND_FLOW, 0, &frame_tcp()), &Names::new(), 0).unwrap();
        assert_eq!(e.reason, None);
        for yes in [
            "",
            "flow",
            "tcp and dport 22",
            "host 10.0.0.7 port 40000",
            "hook port",
        ] {
            assert!(Filter::parse(yes).unwrap().matches(&e), "{yes}");
        }
        for no in [
            "drop",
            "udp",
            "src 10.0.0.7",
            "reason spoofed_ip",
            "tenant acme",
        ] {
            assert!(!Filter::parse(no).unwrap().matches(&e), "{no}");
        }
        for bad in [
            "host",
            "host x",
            "port 70000",
            "reason nope",
            "frobnicate",
            "hook vm",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }
}
