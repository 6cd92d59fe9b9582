//! `cargo xtask fuzz SECS`: each cargo-fuzz target (fuzz/) for SECS
//! seconds, from the seed corpora `cloison-lab fuzz-seeds` writes (added to
//! what earlier runs found, kept under fuzz/corpus). cargo-fuzz is
//! installed on first use; the targets build with the BPF toolchain's
//! nightly (libFuzzer's instrumentation needs one). A crash or a
//! disagreement fails the run, its input saved under fuzz/artifacts.
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::shell::{cargo, run, run_quiet, step, succeeds};

pub const TARGETS: [&str; 3] = ["frames", "sg_compiler", "api_bodies"];

/// cargo-fuzz, pinned: the version these targets were written against.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn fuzz(args: &[String]) -> Result<()> {
    let secs: u64 = match args.first() {
        Some(s) => s
            .parse()
            .with_context(|| format!("SECS: {s:?} is not a number of seconds"))?,
        None => bail!("usage: cargo xtask fuzz SECS"),
    };
    if secs == 0 {
        bail!("SECS: at least 1 second per target");
    }
    let toolchain = cloison_toolchain::bpf_toolchain();
    if succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        step("cargo-fuzz: present");
    } else {
        step(&format!(
            "cargo-fuzz {CARGO_FUZZ_VERSION}: installing with cargo (about 60 s)"
        ));
        run_quiet(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--quiet",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    step("seed corpora (cloison-lab fuzz-seeds fuzz/corpus)");
    run_quiet(cargo().args(["build", "--quiet", "-p", "cloison-lab", "--bins"]))?;
    run(cargo()
        .args(["run", "--quiet", "-p", "cloison-lab", "--", "fuzz-seeds"])
        .arg("fuzz/corpus"))?;
    for t in TARGETS {
        step(&format!(
            "fuzz {t} for {secs} s ({toolchain}, address sanitizer)"
        ));
        run(Command::new("rustup")
            .args([
                "run",
                &toolchain,
                "cargo",
                "fuzz",
                "run",
                "--fuzz-dir",
                "fuzz",
                t,
            ])
            .arg(format!("fuzz/corpus/{t}"))
            .args([
                "--",
                &format!("-max_total_time={secs}"),
                "-print_final_stats=1",
            ])
            // The frames harness leaks its model's tables on purpose.
            .arg("-detect_leaks=0")
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER"))
        .with_context(|| format!("fuzz target {t} (its input is under fuzz/artifacts/{t})"))?;
    }
    Ok(())
}
