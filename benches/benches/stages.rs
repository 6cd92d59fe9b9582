//! What each stage of the packet path costs, in one run: every path of
//! the programs asked in turn, round after round (the order rotated each
//! round), each time for a batch of calls on fresh input (BPF_PROG_TEST_RUN,
//! the kernel's own time of one run of the program per call); a stage's
//! cost is the difference between two paths that differ by that stage,
//! taken within each round, so that the machine's drift cancels, and
//! reported as the median and range over the rounds. The budget later work
//! measures itself against: docs/performance.md.
//!
//! `cargo bench -p cloison-benches --bench stages` (root; prints the table
//! and writes benches/results/stages.md); `cargo test --benches` runs one
//! short round and writes nothing.
use std::time::Duration;

use cloison_benches::*;
use cloison_dataplane::{loader::verdict::*, netdev, Dataplane, UplinkHook};

const IP_A1: [u8; 4] = [10, 0, 0, 1];
const IP_A2: [u8; 4] = [10, 0, 0, 2];
const IP_A3: [u8; 4] = [10, 0, 0, 3];

/// The paths measured, each on fresh input every call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// The uplink TC program passing a frame that is not VXLAN.
    Floor,
    /// The uplink XDP program passing it.
    FloorXdp,
    /// a1 → a3, established: the port program switching to a local port.
    Switched,
    /// The same packet repeated in one call (warm caches, no per-call setup).
    SwitchedRepeated,
    /// a1 → a3, a new flow each call (the open group's two lookups per
    /// end, a conntrack insert).
    NewFlow,
    /// a1 → a2 on hv2, established: switched, then VXLAN.
    Encap,
    /// a1 → d1 through the router, established.
    Routed,
    /// a1 → d2 on hv2 through the router: routed, then VXLAN.
    RoutedEncap,
    /// a1 → the outside, SNATed (the mapping kept).
    Snat,
    /// VXLAN from hv2 to a1, XDP uplink.
    DecapXdp,
    /// The same, TC uplink.
    DecapTc,
    /// a1 sending from an address not its own: dropped.
    Spoofed,
}

const PATHS: [Path; 12] = [
    Path::Floor,
    Path::FloorXdp,
    Path::Switched,
    Path::SwitchedRepeated,
    Path::NewFlow,
    Path::Encap,
    Path::Routed,
    Path::RoutedEncap,
    Path::Snat,
    Path::DecapXdp,
    Path::DecapTc,
    Path::Spoofed,
];

/// The stages: (name, the path with it, the path without it); `None`: the
/// path's own cost.
const STAGES: [(&str, Path, Option<Path>); 15] = [
    (
        "floor: the uplink TC program passing a non-VXLAN frame",
        Path::Floor,
        None,
    ),
    (
        "floor: the uplink XDP program passing it",
        Path::FloorXdp,
        None,
    ),
    (
        "port program, established, switched to a local port (fresh input)",
        Path::Switched,
        None,
    ),
    (
        "the same, repeated in one call (warm, no per-call setup)",
        Path::SwitchedRepeated,
        None,
    ),
    (
        "fresh input's cost in test-run (switched: fresh − repeated)",
        Path::Switched,
        Some(Path::SwitchedRepeated),
    ),
    (
        "a new flow: policy lookups and conntrack insert (new − established)",
        Path::NewFlow,
        Some(Path::Switched),
    ),
    (
        "VXLAN encapsulation: FIB next hop, headers, redirect (encap − switched)",
        Path::Encap,
        Some(Path::Switched),
    ),
    (
        "routing: router interface, route, neighbour, other VNI (routed − switched)",
        Path::Routed,
        Some(Path::Switched),
    ),
    (
        "VXLAN encapsulation after routing (routed encap − routed)",
        Path::RoutedEncap,
        Some(Path::Routed),
    ),
    (
        "SNAT to the outside: mapping, checksums, FIB (SNAT − routed)",
        Path::Snat,
        Some(Path::Routed),
    ),
    (
        "decapsulation to a port, XDP uplink (whole path)",
        Path::DecapXdp,
        None,
    ),
    (
        "decapsulation to a port, TC uplink (whole path)",
        Path::DecapTc,
        None,
    ),
    (
        "decap beyond the floor, XDP (decap − XDP floor)",
        Path::DecapXdp,
        Some(Path::FloorXdp),
    ),
    (
        "decap beyond the floor, TC (decap − TC floor)",
        Path::DecapTc,
        Some(Path::Floor),
    ),
    ("a spoofed source dropped and counted", Path::Spoofed, None),
];

struct Sizes {
    rounds: usize,
    calls: u32,
}
const BENCH: Sizes = Sizes {
    rounds: 15,
    calls: 5_000,
};
const SMOKE: Sizes = Sizes {
    rounds: 1,
    calls: 20,
};

struct Frames {
    local: Vec<u8>,
    remote: Vec<u8>,
    decap: Vec<u8>,
    routed_local: Vec<u8>,
    routed_remote: Vec<u8>,
    snat: Vec<u8>,
    host_traffic: Vec<u8>,
    spoofed: Vec<u8>,
}

fn frames() -> Frames {
    let gw = cloison_abi::gateway_mac(1001);
    Frames {
        local: udp((A1, IP_A1), (A3, IP_A3), 40000, 64),
        remote: udp((A1, IP_A1), (A2, IP_A2), 40000, 64),
        decap: vxlan(&udp((A2, IP_A2), (A1, IP_A1), 40001, 64)),
        routed_local: udp((A1, IP_A1), (gw, [10, 1, 0, 5]), 40002, 64),
        routed_remote: udp((A1, IP_A1), (gw, [10, 1, 0, 6]), 40002, 64),
        snat: udp((A1, IP_A1), (gw, [192, 0, 2, 2]), 40003, 64),
        host_traffic: udp(
            ([2, 0xaa, 0, 0, 0, 2], [192, 0, 2, 2]),
            ([2, 0xbb, 0, 0, 0, 1], [192, 0, 2, 1]),
            5,
            64,
        ),
        spoofed: udp((A1, [10, 0, 0, 66]), (A3, IP_A3), 40000, 64),
    }
}

/// The kernel's mean time (ns) of `path` over `calls` calls.
fn measure(
    dp: &mut Dataplane,
    f: &Frames,
    (pa1, up0): (u32, u32),
    path: Path,
    calls: u32,
    sport: &mut u16,
) -> f64 {
    let one = |dp: &Dataplane| -> (u32, Duration) {
        let r = match path {
            Path::Floor => dp.test_run_uplink(UplinkHook::Tc, up0, &f.host_traffic),
            Path::FloorXdp => dp.test_run_uplink(UplinkHook::Xdp, up0, &f.host_traffic),
            Path::Switched => dp.test_run_port(pa1, &f.local, 0),
            Path::Encap => dp.test_run_port(pa1, &f.remote, 0),
            Path::Routed => dp.test_run_port(pa1, &f.routed_local, 0),
            Path::RoutedEncap => dp.test_run_port(pa1, &f.routed_remote, 0),
            Path::Snat => dp.test_run_port(pa1, &f.snat, 0),
            Path::DecapXdp => dp.test_run_uplink(UplinkHook::Xdp, up0, &f.decap),
            Path::DecapTc => dp.test_run_uplink(UplinkHook::Tc, up0, &f.decap),
            Path::Spoofed => dp.test_run_port(pa1, &f.spoofed, 0),
            Path::NewFlow | Path::SwitchedRepeated => unreachable!("below"),
        }
        .expect("run");
        (r.verdict, r.duration)
    };
    let want = match path {
        Path::Floor => TC_ACT_OK,
        Path::FloorXdp => XDP_PASS,
        Path::DecapXdp => XDP_REDIRECT,
        Path::Spoofed => TC_ACT_SHOT,
        _ => TC_ACT_REDIRECT,
    };
    let total = match path {
        Path::SwitchedRepeated => {
            let r = dp.test_run_port_repeat(pa1, &f.local, calls).expect("run");
            assert_eq!(r.verdict, want, "{path:?}");
            r.duration * calls
        }
        Path::NewFlow => (0..calls).map(|_| new_flow(dp, pa1, sport)).sum(),
        _ => (0..calls)
            .map(|_| {
                let (v, d) = one(dp);
                assert_eq!(v, want, "{path:?}");
                d
            })
            .sum(),
    };
    total.as_nanos() as f64 / calls as f64
}

fn main() {
    let Some(bench) = rounds_run("stages") else {
        return;
    };
    let sizes = if bench { &BENCH } else { &SMOKE };
    let snap = paths_snapshot();
    let (bed, mut dp, pa1) = applied_bed(&format!("clst{:x}", std::process::id() & 0xffff), &snap);
    dp.attach_external(cloison_testkit::testbed::UPLINK)
        .expect("the uplink as the external interface");
    let up0 = netdev::ifindex("up0").expect("up0");
    let f = frames();
    let mut sport = 0u16;
    // Warm up: every flow established, every path run once.
    for p in PATHS {
        measure(&mut dp, &f, (pa1, up0), p, 2, &mut sport);
    }
    // rounds[r][p]: path p's mean in round r.
    let mut rounds: Vec<[f64; PATHS.len()]> = Vec::new();
    for round in 0..sizes.rounds {
        let mut t = [0.0; PATHS.len()];
        for i in 0..PATHS.len() {
            let k = (i + round) % PATHS.len();
            t[k] = measure(&mut dp, &f, (pa1, up0), PATHS[k], sizes.calls, &mut sport);
        }
        rounds.push(t);
    }
    drop(dp);
    drop(bed);
    let idx = |p: Path| PATHS.iter().position(|&q| q == p).expect("a path");
    let mut rows = Vec::new();
    for (name, with, without) in STAGES {
        let mut v: Vec<f64> = rounds
            .iter()
            .map(|t| t[idx(with)] - without.map_or(0.0, |w| t[idx(w)]))
            .collect();
        let (mid, lo, hi) = spread(&mut v);
        let row = format!("| {name} | {mid:.0} ns | {lo:.0} to {hi:.0} ns |");
        println!("{row}");
        rows.push(row);
    }
    if !bench {
        println!("smoke run: one short round, benches/results/stages.md left as it was");
        return;
    }
    let when = utc_now();
    let Sizes { rounds: n, calls } = BENCH;
    let md = format!(
        "# The packet path's stages ({when})\n\n\
         `cargo bench -p cloison-benches --bench stages`: one test bed (hv1 with a1, a3 and \
         d1, hv2 with a2 and d2, a router with SNAT; every port with port security and a \
         group that allows everything), 64-byte UDP payloads. {n} rounds; in each, every \
         path asked in turn (the order rotated every round) for {calls} calls on fresh \
         input, the kernel's mean time per call (BPF_PROG_TEST_RUN); a stage is the \
         difference of two paths within a round. Median and range over the rounds.\n\n\
         | stage | median | range of the rounds |\n|---|---|---|\n{}\n",
        rows.join("\n")
    );
    let out = concat!(env!("CARGO_MANIFEST_DIR"), "/results/stages.md");
    std::fs::write(out, md).expect("write the results");
    println!("written: benches/results/stages.md");
}
