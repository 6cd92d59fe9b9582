//! `cargo xtask setup | test | demo [--routing|--fleet] | bench [--fleet|--gateway|--routing|--ipsec] | plot | fuzz SECS | lab [ARGS]`
//!
//! `setup` installs what a fresh machine lacks (idempotently, a line per
//! step); `test`, `demo` and `bench` run it first, so each is the one
//! command a new machine needs. This crate builds on the plain stable
//! toolchain: what needs the BPF object (the lab, demo, benches) is the
//! `cloison-lab` crate, built and run here after setup.
use std::process::{Command, ExitCode};

use anyhow::Result;

mod fuzz;
mod setup;
mod shell;

use shell::{cargo, run, run_quiet, step};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("setup") => setup::setup(),
        Some("test") => setup::setup().and_then(|()| test()),
        Some("demo") => setup::setup().and_then(|()| {
            let mut a = vec!["demo"];
            a.extend(args[1..].iter().map(String::as_str));
            lab(&a)
        }),
        Some("bench") => setup::setup().and_then(|()| {
            let mut a = vec!["bench"];
            a.extend(args[1..].iter().map(String::as_str));
            lab(&a)
        }),
        Some("plot") => lab(&["plot"]),
        Some("fuzz") => setup::setup().and_then(|()| fuzz::fuzz(&args[1..])),
        Some("lab") => setup::setup().and_then(|()| {
            let mut a = vec!["lab"];
            a.extend(args[1..].iter().map(String::as_str));
            lab(&a)
        }),
        _ => Err(anyhow::anyhow!(
            "usage: cargo xtask setup | test | demo [--routing|--fleet] | bench [--fleet|--gateway|--routing|--ipsec] | plot | fuzz SECS | lab [SECS] [xdp|tc] [nic|offload]"
        )),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the agent binaries and the lab, then runs `cloison-lab ARGS`.
fn lab(args: &[&str]) -> Result<()> {
    step("build: the BPF object, cloisond, cloisonctl, cloison-lab");
    run_quiet(cargo().args([
        "build",
        "--quiet",
        "-p",
        "cloison-control",
        "-p",
        "cloison-lab",
        "--bins",
    ]))?;
    run(cargo()
        .args(["run", "--quiet", "-p", "cloison-lab", "--"])
        .args(args))
}

fn test() -> Result<()> {
    step("cargo fmt --check");
    run_quiet(cargo().args(["fmt", "--all", "--check"]))?;
    step("cargo clippy -- -D warnings");
    run_quiet(cargo().args([
        "clippy",
        "--quiet",
        "--workspace",
        "--exclude",
        "cloison-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let toolchain = cloison_toolchain::bpf_toolchain();
    step(&format!(
        "cargo clippy -- -D warnings, the BPF crate ({toolchain}, bpfel-unknown-none)"
    ));
    run_quiet(
        Command::new("rustup")
            .args(["run", &toolchain, "cargo", "clippy", "--quiet"])
            .args([
                "-p",
                "cloison-ebpf",
                "--bins",
                "--target",
                "bpfel-unknown-none",
            ])
            .args(["-Z", "build-std=core", "--target-dir", "target/bpf-clippy"])
            .args(["--", "-D", "warnings"])
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER"),
    )?;
    step("build: the tests (BPF object included)");
    let tests = [
        "--workspace",
        "--exclude",
        "cloison-ebpf",
        "--lib",
        "--bins",
        "--tests",
    ];
    run_quiet(cargo().args(["test", "--quiet", "--no-run"]).args(tests))?;
    step("cargo test (unit, test-run fixtures, agents, lab); privileged tests need root");
    // The lab tests share the machine's network tools; run them one at a time.
    run(cargo()
        .args(["test", "--quiet"])
        .args(tests)
        .args(["--", "--test-threads", "1"]))?;
    step("benches, smoke run (each benchmark once, in test mode)");
    run_quiet(cargo().args(["test", "--quiet", "-p", "cloison-benches", "--benches"]))?;
    Ok(())
}
