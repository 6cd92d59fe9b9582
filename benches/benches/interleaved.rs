//! 1 rule against 10,000 in one run, interleaved: pairs of test beds side
//! by side (each port's groups holding 1 or 10,000 rules, the last one
//! allowing the measured flow), each in its own thread and namespace, asked
//! in turn for a batch of new flows and of established packets, the order
//! swapped every round. Each round gives a paired ratio (10,000 / 1)
//! measured within the same second, so that the machine's drift between
//! runs, which moves criterion's figures by up to 25%, cancels; the spread
//! of the ratios is reported. Two pairs: the flow allowed by whole keys
//! (a single port, a remote group's member: hash lookups) and by a port
//! range and a /24 only (longest-prefix matches in tries that hold the
//! other rules too).
//!
//! `sudo cargo bench -p cloison-benches --bench interleaved` (prints a
//! table and writes benches/results/interleaved.md); `cargo test --benches`
//! runs one short round and writes nothing.
use std::{
    sync::mpsc::{channel, Receiver, Sender},
    time::Duration,
};

use cloison_benches::*;
use cloison_dataplane::loader::verdict::*;

/// Rounds, new flows and established packets per ask: `cargo bench`'s
/// run, or `cargo test --benches`'s smoke run (one short round, no file).
struct Sizes {
    rounds: usize,
    new_flows: u32,
    established: u32,
}
const BENCH: Sizes = Sizes {
    rounds: 15,
    new_flows: 2_000,
    established: 200_000,
};
const SMOKE: Sizes = Sizes {
    rounds: 1,
    new_flows: 20,
    established: 1_000,
};

#[derive(Clone, Copy)]
enum Ask {
    NewFlows,
    Established,
}

/// One test bed's worker: its thread stays in its namespace and answers
/// each ask with the kernel's mean time per packet (ns); its bed
/// (namespace, pins) removed when `asks` closes and the thread is joined.
struct Worker {
    asks: Option<Sender<Ask>>,
    answers: Receiver<f64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.asks.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn worker(rules: usize, matching: Matching, sizes: &'static Sizes) -> Worker {
    let (ask_tx, ask_rx) = channel::<Ask>();
    let (ans_tx, ans_rx) = channel::<f64>();
    let thread = std::thread::spawn(move || {
        let snap = sg_snapshot_matching(rules, matching);
        let m = if matching == Matching::Whole {
            'w'
        } else {
            'p'
        };
        let tag = format!("clil{:x}{rules}{m}", std::process::id() & 0xfff);
        let (bed, mut dp, pa1) = applied_bed(&tag, &snap);
        let syn = tcp(40000, TCP_SYN);
        assert_eq!(
            dp.test_run_port(pa1, &syn, 0).unwrap().verdict,
            TC_ACT_REDIRECT
        );
        let ack = tcp(40000, TCP_ACK);
        let mut sport = 0u16;
        ans_tx.send(0.0).expect("ready");
        for ask in ask_rx {
            let ns = match ask {
                Ask::Established => {
                    let r = dp
                        .test_run_port_repeat(pa1, &ack, sizes.established)
                        .expect("run");
                    assert_eq!(r.verdict, TC_ACT_REDIRECT);
                    r.duration.as_nanos() as f64
                }
                Ask::NewFlows => {
                    let mut total = Duration::ZERO;
                    for _ in 0..sizes.new_flows {
                        total += new_flow(&mut dp, pa1, &mut sport);
                    }
                    total.as_nanos() as f64 / sizes.new_flows as f64
                }
            };
            if ans_tx.send(ns).is_err() {
                break;
            }
        }
        drop(dp);
        drop(bed);
    });
    assert_eq!(ans_rx.recv().expect("the bed is up"), 0.0);
    Worker {
        asks: Some(ask_tx),
        answers: ans_rx,
        thread: Some(thread),
    }
}

fn main() {
    let Some(bench) = rounds_run("interleaved") else {
        return;
    };
    let sizes = if bench { &BENCH } else { &SMOKE };
    let beds = |m| (worker(1, m, sizes), worker(10_000, m, sizes));
    let (whole, prefix) = (beds(Matching::Whole), beds(Matching::Prefix));
    let ask = |w: &Worker, a: Ask| {
        w.asks.as_ref().expect("open").send(a).expect("ask");
        w.answers.recv().expect("answer")
    };
    let mut rows = Vec::new();
    for (name, (one, many), a) in [
        (
            "new flow, allowed by whole keys (one port, a remote group's member)",
            &whole,
            Ask::NewFlows,
        ),
        (
            "new flow, allowed by a port range and a /24 only",
            &prefix,
            Ask::NewFlows,
        ),
        ("established flow", &whole, Ask::Established),
    ] {
        // Warm both first.
        ask(one, a);
        ask(many, a);
        let (mut t1, mut tn, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..sizes.rounds {
            let (x, y) = if round % 2 == 0 {
                let x = ask(one, a);
                (x, ask(many, a))
            } else {
                let y = ask(many, a);
                (ask(one, a), y)
            };
            t1.push(x);
            tn.push(y);
            ratios.push(y / x);
        }
        let (ratio, lo, hi) = spread(&mut ratios);
        let row = format!(
            "| {name} | {:.0} ns | {:.0} ns | {ratio:.2} | {lo:.2}-{hi:.2} |",
            spread(&mut t1).0,
            spread(&mut tn).0,
        );
        println!("{row}");
        rows.push(row);
    }
    drop((whole, prefix)); // every bed removed
    if !bench {
        println!("smoke run: one short round, benches/results/interleaved.md left as it was");
        return;
    }
    let when = utc_now();
    let Sizes {
        rounds,
        new_flows,
        established,
    } = BENCH;
    let md = format!(
        "# 1 rule against 10,000, interleaved ({when})\n\n\
         `cargo bench -p cloison-benches --bench interleaved`: test beds side by side, \
         port a1 to port a3 with port security, each port's groups holding 1 or 10,000 rules \
         (the last one allowing the measured flow; the others each a /32 remote and a \
         two-port range); {rounds} rounds, each asking a pair of beds in turn (the order \
         swapped every round) for {new_flows} new flows (a SYN of a source port never seen: \
         two rule lookups on each side, a conntrack insert) and {established} packets of an \
         established flow (the kernel's mean per packet, BPF_PROG_TEST_RUN). Medians of the \
         rounds, and the median and range of each round's paired ratio.\n\n\
         | case | 1 rule | 10,000 rules | 10,000 / 1 (median of rounds) | range of the rounds' ratios |\n\
         |---|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    let out = concat!(env!("CARGO_MANIFEST_DIR"), "/results/interleaved.md");
    std::fs::write(out, md).expect("write the results");
    println!("written: benches/results/interleaved.md");
}
