//! Packet fixtures as table rows: `{case, where it enters, input, expected
//! verdict (where it goes, or why it is dropped), expected output}`, run in
//! order (conntrack state carries from one row to the next) through the
//! kernel's programs (BPF_PROG_TEST_RUN) and through the reference model by
//! one runner. Both must give the row's verdict; the kernel's output frame
//! must agree with it, and with the row's expected output.
use cloison_abi::DropReason;
use cloison_dataplane::{
    loader::{verdict::*, RunResult},
    model::{Model, Verdict},
    netdev,
    trace::{self, Entry},
    Dataplane, UplinkHook,
};

use crate::wire::Frame;

/// Where a row's frame enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// The TC hook of a port, by its interface name: a frame from its VM.
    Port(&'static str),
    /// The uplink, in XDP or TC: a frame from the underlay.
    Uplink(UplinkHook),
    /// The agent's service tap: an answer of its gateway services.
    Service,
    /// The external interface (the test bed's uplink): from the outside.
    External,
}

/// A check of an output frame (parsed, and its bytes).
pub type OutputCheck = Box<dyn Fn(&Frame, &[u8]) -> Result<(), String>>;

/// What must come out of a redirect.
pub enum Out {
    /// Whatever agrees with the verdict.
    Any,
    /// The input, byte for byte.
    Unchanged,
    /// Exactly these bytes.
    Bytes(Vec<u8>),
    /// The output parses, and this check of it passes.
    Check(OutputCheck),
}

pub struct Case {
    pub name: String,
    pub at: At,
    pub input: Vec<u8>,
    /// A GSO frame of segments of this size (0: not GSO); ports only.
    pub gso_size: u32,
    pub expect: Verdict,
    pub out: Out,
}

impl Case {
    pub fn new(name: impl Into<String>, at: At, input: impl Into<Input>, expect: Verdict) -> Case {
        Case {
            name: name.into(),
            at,
            input: input.into().0,
            gso_size: 0,
            expect,
            out: Out::Any,
        }
    }

    pub fn out(mut self, out: Out) -> Case {
        self.out = out;
        self
    }

    pub fn gso(mut self, size: u32) -> Case {
        self.gso_size = size;
        self
    }

    /// The output must parse and pass `check`.
    pub fn check(self, check: impl Fn(&Frame, &[u8]) -> Result<(), String> + 'static) -> Case {
        self.out(Out::Check(Box::new(check)))
    }
}

/// A row's input: a frame value or raw bytes (a malformed frame).
pub struct Input(pub Vec<u8>);

impl From<Frame> for Input {
    fn from(f: Frame) -> Input {
        Input(f.emit())
    }
}

impl From<&Frame> for Input {
    fn from(f: &Frame) -> Input {
        Input(f.emit())
    }
}

impl From<Vec<u8>> for Input {
    fn from(b: Vec<u8>) -> Input {
        Input(b)
    }
}

/// The verdict "into the VM of the port on interface `name`".
pub fn to_port(name: &str) -> Verdict {
    Verdict::ToPort(netdev::ifindex(name).unwrap_or_else(|| panic!("no interface {name}")))
}

pub fn drop(r: DropReason) -> Verdict {
    Verdict::Drop(r)
}

/// What the kernel did, as far as a test run shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Redirect(Vec<u8>),
    Pass,
    Drop(DropReason),
}

/// The kernel's verdict on a test run; a drop's reason is the one counter
/// that moved since `before`.
pub fn seen(
    dp: &Dataplane,
    r: &RunResult,
    before: &std::collections::BTreeMap<DropReason, u64>,
    redirect: u32,
    pass: u32,
) -> Result<Seen, String> {
    if r.verdict == redirect {
        return Ok(Seen::Redirect(r.frame.clone()));
    }
    if r.verdict == pass {
        return Ok(Seen::Pass);
    }
    let after = dp.drop_counts().map_err(|e| e.to_string())?;
    let moved: Vec<DropReason> = after
        .iter()
        .filter(|(k, v)| before.get(k).copied().unwrap_or(0) < **v)
        .map(|(k, _)| *k)
        .collect();
    match moved.as_slice() {
        [one] => Ok(Seen::Drop(*one)),
        _ => Err(format!(
            "verdict {}, and not exactly one drop counter moved: {moved:?}",
            r.verdict
        )),
    }
}

/// Whether `b` is VXLAN over IPv4 without options to `dst` (read as the
/// programs do, by offset: a frame the checks let through need not be one
/// the strict parser takes).
fn is_vxlan_to(b: &[u8], dst: Option<[u8; 4]>) -> bool {
    b.len() >= VXLAN_ENCAP_LEN
        && b[12..14] == [0x08, 0x00]
        && b[14] == 0x45
        && b[23] == 17
        && b[36..38] == 4789u16.to_be_bytes()
        && dst.is_none_or(|d| b[30..34] == d)
}

const VXLAN_ENCAP_LEN: usize = 14 + 20 + 8 + 8;

/// The frame inside a VXLAN frame (its bytes), if it is one.
fn decapsulated(input: &[u8]) -> Option<Vec<u8>> {
    is_vxlan_to(input, None).then(|| input[VXLAN_ENCAP_LEN..].to_vec())
}

/// Whether `out` is `input` as a router forwards it: from a gateway MAC (to
/// whichever MAC: the row's check says), the TTL or hop limit one less, an
/// IPv4 header checksum still right, every other byte as sent.
pub fn routed(out: &[u8], input: &[u8]) -> bool {
    let gw = cloison_abi::gateway_mac(0);
    if out.len() != input.len() || out.len() < 54 || input[0..3] != gw[..3] || out[6..9] != gw[..3]
    {
        return false;
    }
    let (ttl, skip): (usize, &[usize]) = match input[12..14] {
        [0x08, 0x00] => (22, &[22, 24, 25]),
        [0x86, 0xdd] => (21, &[21]),
        _ => return false,
    };
    let same = (12..out.len()).all(|i| skip.contains(&i) || out[i] == input[i]);
    let csum_ok = ttl == 21 || {
        let ihl = (out[14] & 0x0f) as usize * 4;
        let mut sum: u32 = (14..14 + ihl)
            .step_by(2)
            .map(|i| u16::from_be_bytes([out[i], out[i + 1]]) as u32)
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    };
    same && csum_ok && out[ttl] + 1 == input[ttl]
}

/// Whether `out` is `input` from the outside translated back for a port:
/// to a port's MAC from a gateway MAC, the TTL one less, the source as sent
/// (the row's check says which address and port it now goes to).
fn nat_back(out: &[u8], input: &[u8]) -> bool {
    let gw = cloison_abi::gateway_mac(0);
    out.len() == input.len()
        && out.len() >= 34
        && out[6..9] == gw[..3]
        && out[26..30] == input[26..30]
        && out[22] + 1 == input[22]
}

/// Whether what the kernel did is what `v` says: the same verdict, and a
/// redirect's output where `v` says it goes (routed: see [`routed`]).
pub fn agrees(seen: &Seen, v: Verdict, input: &[u8]) -> Result<(), String> {
    match (seen, v) {
        (Seen::Pass, Verdict::Host) => Ok(()),
        (Seen::Drop(a), Verdict::Drop(b)) if *a == b => Ok(()),
        (Seen::Redirect(out), Verdict::ToVtep(vtep) | Verdict::ToIpsec(vtep)) => {
            // To the IPsec device (an L3 device): no next hop, so no MACs;
            // to the uplink: the next hop's.
            let ipsec = matches!(v, Verdict::ToIpsec(_));
            if is_vxlan_to(out, Some(vtep))
                && (out[0..12] == [0; 12]) == ipsec
                && (out[VXLAN_ENCAP_LEN..] == *input || routed(&out[VXLAN_ENCAP_LEN..], input))
            {
                Ok(())
            } else {
                Err(format!(
                    "not the frame inside VXLAN to {vtep:?} ({}): {out:02x?}",
                    if ipsec {
                        "to the IPsec device"
                    } else {
                        "to the uplink"
                    }
                ))
            }
        }
        (Seen::Redirect(out), Verdict::Back) => {
            if out.len() >= 12 && input.len() >= 12 && out[0..6] == input[6..12] {
                Ok(())
            } else {
                Err("redirected, but not back to the sender's MAC".into())
            }
        }
        (Seen::Redirect(out), Verdict::ToExternal) => {
            // NATed: the destination as sent, the TTL one less (the row's
            // check says from which address and port).
            let ok = out.len() == input.len()
                && out.len() >= 34
                && out[12..14] == [0x08, 0x00]
                && out[30..34] == input[30..34]
                && out[22] + 1 == input[22];
            if ok {
                Ok(())
            } else {
                Err("redirected, but not the frame NATed to the outside".into())
            }
        }
        (Seen::Redirect(out), Verdict::ToAgent) => {
            let steered = out.len() == input.len()
                && out.len() >= 12
                && cloison_abi::steered_ifindex(out[0..6].try_into().expect("6 bytes")).is_some()
                && out[6..] == input[6..];
            if steered {
                Ok(())
            } else {
                Err("redirected, but not the frame with a steering MAC as its destination".into())
            }
        }
        (Seen::Redirect(out), Verdict::ToPort(_)) => {
            // Delivered as sent, or as it was inside VXLAN, or (an agent's
            // answer) from a gateway MAC instead of the steering one.
            let want = decapsulated(input).unwrap_or_else(|| input.to_vec());
            let answered = out.len() == input.len()
                && out.len() >= 12
                && cloison_abi::steered_ifindex(input[6..12].try_into().expect("6 bytes"))
                    .is_some()
                && out[6..9] == cloison_abi::gateway_mac(0)[..3]
                && out[..6] == input[..6]
                && out[12..] == input[12..];
            if *out == want || answered || routed(out, input) || nat_back(out, input) {
                Ok(())
            } else {
                Err(format!(
                    "delivered to a port, but not the frame sent ({} bytes, {} expected)",
                    out.len(),
                    want.len()
                ))
            }
        }
        _ => Err(format!("the kernel did {seen:?}, not {v:?}")),
    }
}

/// What the kernel does with one row's frame.
fn kernel(dp: &Dataplane, c: &Case) -> Result<Seen, String> {
    let before = dp.drop_counts().map_err(|e| e.to_string())?;
    match c.at {
        At::Port(iface) => {
            let ifindex = netdev::ifindex(iface).ok_or(format!("no interface {iface}"))?;
            let r = dp
                .test_run_port(ifindex, &c.input, c.gso_size)
                .map_err(|e| e.to_string())?;
            seen(dp, &r, &before, TC_ACT_REDIRECT, u32::MAX)
        }
        At::Uplink(hook) => {
            let up0 = netdev::ifindex(crate::testbed::UPLINK).ok_or("no uplink")?;
            let r = dp
                .test_run_uplink(hook, up0, &c.input)
                .map_err(|e| e.to_string())?;
            let (redirect, pass) = if hook == UplinkHook::Tc {
                (TC_ACT_REDIRECT, TC_ACT_OK)
            } else {
                (XDP_REDIRECT, XDP_PASS)
            };
            seen(dp, &r, &before, redirect, pass)
        }
        At::Service => {
            let tap = dp.service().map_err(|e| e.to_string())?.ifindex;
            let r = dp
                .test_run_service(tap, &c.input)
                .map_err(|e| e.to_string())?;
            seen(dp, &r, &before, TC_ACT_REDIRECT, u32::MAX)
        }
        At::External => {
            let ext = dp.external().map_err(|e| e.to_string())?.ifindex;
            let r = dp
                .test_run_external(ext, &c.input)
                .map_err(|e| e.to_string())?;
            // TC_ACT_UNSPEC: on to the next program or the host.
            seen(dp, &r, &before, TC_ACT_REDIRECT, u32::MAX)
        }
    }
}

/// Whether the kernel did what the row says, its output included.
fn kernel_agrees(dp: &Dataplane, c: &Case) -> Result<(), String> {
    let kernel = kernel(dp, c)?;
    agrees(&kernel, c.expect, &c.input).map_err(|e| format!("kernel: {e}"))?;
    let Seen::Redirect(out) = &kernel else {
        return Ok(());
    };
    match &c.out {
        Out::Any => Ok(()),
        Out::Unchanged if *out == c.input => Ok(()),
        Out::Unchanged => Err("the output is not the input".into()),
        Out::Bytes(b) if out == b => Ok(()),
        Out::Bytes(_) => Err("the output is not the expected bytes".into()),
        Out::Check(check) => {
            let f = Frame::parse(out).map_err(|e| format!("the output does not parse: {e:?}"))?;
            check(&f, out).map_err(|e| format!("output: {e}"))
        }
    }
}

/// The trace build's verdict on a row (before the live run: the trace
/// writes nothing, so the live run that follows sees the same state), for
/// the rows it runs: frames from a port (not GSO) and from the underlay.
fn traced(dp: &Dataplane, c: &Case) -> Result<Option<Verdict>, String> {
    let (entry, k) = match c.at {
        At::Port(iface) if c.gso_size == 0 => {
            let ifindex = netdev::ifindex(iface).ok_or(format!("no interface {iface}"))?;
            (Entry::Port(ifindex), dp.trace_port(ifindex, &c.input))
        }
        At::Uplink(_) => {
            let up0 = netdev::ifindex(crate::testbed::UPLINK).ok_or("no uplink")?;
            (Entry::Uplink(up0), dp.trace_uplink(up0, &c.input))
        }
        _ => return Ok(None),
    };
    let k = k.map_err(|e| format!("trace: {e}"))?;
    Ok(Some(trace::kernel_verdict(entry, &k)))
}

/// Runs one row through the trace build, the kernel and the model.
pub fn run_case(dp: &Dataplane, model: &Model, c: &Case) -> Result<(), String> {
    if let Some(v) = traced(dp, c)? {
        if v != c.expect {
            return Err(format!("trace: {v:?}, expected {:?}", c.expect));
        }
    }
    kernel_agrees(dp, c)?;
    let modelled = match c.at {
        At::Port(iface) => {
            let ifindex = netdev::ifindex(iface).ok_or(format!("no interface {iface}"))?;
            model.port(ifindex, &c.input)
        }
        At::Uplink(_) => model.uplink(&c.input),
        At::Service => model.service_answer(&c.input),
        At::External => model.external(&c.input),
    };
    if modelled != c.expect {
        return Err(format!("model: {modelled:?}, expected {:?}", c.expect));
    }
    Ok(())
}

/// Runs rows through the kernel only: rows about what the agent's writer
/// does to the tables across applies (tenant indexes, purges, trims),
/// which the model of one table set does not hold.
pub fn run_kernel(dp: &Dataplane, cases: &[Case]) {
    for c in cases {
        if let Err(e) = kernel_agrees(dp, c) {
            panic!("fixture {:?} ({:?}): {e}", c.name, c.at);
        }
    }
}

/// Runs every row in order; fails on the first that does not hold.
pub fn run(dp: &Dataplane, model: &Model, cases: &[Case]) {
    for c in cases {
        if let Err(e) = run_case(dp, model, c) {
            panic!("fixture {:?} ({:?}): {e}", c.name, c.at);
        }
    }
}

/// The kernel and the model on one frame entering `at`: `Ok(Some(verdict))`
/// when they agree, `Ok(None)` when test-run refuses the frame outright (too
/// short to be Ethernet), `Err` saying how they differ.
pub fn differ(
    dp: &Dataplane,
    model: &Model,
    at: At,
    frame: &[u8],
) -> Result<Option<Verdict>, String> {
    let before = dp.drop_counts().map_err(|e| e.to_string())?;
    let (run, want, codes) = match at {
        At::Port(iface) => {
            let ifindex = netdev::ifindex(iface).ok_or(format!("no interface {iface}"))?;
            (
                dp.test_run_port(ifindex, frame, 0),
                model.port(ifindex, frame),
                (TC_ACT_REDIRECT, u32::MAX),
            )
        }
        At::Uplink(hook) => {
            let up0 = netdev::ifindex(crate::testbed::UPLINK).ok_or("no uplink")?;
            let codes = if hook == UplinkHook::Tc {
                (TC_ACT_REDIRECT, TC_ACT_OK)
            } else {
                (XDP_REDIRECT, XDP_PASS)
            };
            (
                dp.test_run_uplink(hook, up0, frame),
                model.uplink(frame),
                codes,
            )
        }
        At::External => {
            let ext = dp.external().map_err(|e| e.to_string())?.ifindex;
            (
                dp.test_run_external(ext, frame),
                model.external(frame),
                // TC_ACT_UNSPEC (-1): on to the next program or the host.
                (TC_ACT_REDIRECT, u32::MAX),
            )
        }
        At::Service => {
            let tap = dp.service().map_err(|e| e.to_string())?.ifindex;
            (
                dp.test_run_service(tap, frame),
                model.service_answer(frame),
                (TC_ACT_REDIRECT, u32::MAX),
            )
        }
    };
    let Ok(r) = run else {
        return Ok(None);
    };
    let got = seen(dp, &r, &before, codes.0, codes.1)?;
    agrees(&got, want, frame).map_err(|e| format!("{at:?}: {e} (the model: {want:?})"))?;
    Ok(Some(want))
}
