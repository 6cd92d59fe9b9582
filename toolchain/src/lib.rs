//! The one place that names the toolchain of the BPF object: `cargo xtask
//! setup` installs it, `dataplane/build.rs` builds with it. This crate has
//! no dependencies and builds on the plain stable toolchain, so `xtask` can
//! depend on it on a machine that has nothing else (see docs/development.md).
//!
//! The BPF crate is built with a nightly rustc (`-Z build-std=core` for
//! `bpfel-unknown-none`) whose LLVM must be the one bpf-linker links: the
//! bitcode a newer LLVM writes is not readable by an older one. So a
//! machine's `nightly` is used when its LLVM is [`LLVM_MAJOR`], and a pinned
//! nightly of that LLVM otherwise (a fresh `nightly` may have moved on).
use std::process::Command;

/// The LLVM that rustc, bpf-linker and Debian's `llvm-22-dev` share.
pub const LLVM_MAJOR: u32 = 22;
/// A nightly built with LLVM [`LLVM_MAJOR`] that aya-ebpf 0.2 builds with
/// (rustc 1.97.0-nightly e50aa6fba, LLVM 22.1.4: the one the project was
/// developed with).
pub const PINNED_NIGHTLY: &str = "nightly-2026-05-20";
/// bpf-linker, installed with `--features llvm-22` against Debian's LLVM.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
pub const LLVM_DEBIAN_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev"];

/// The LLVM major version `rustup run TOOLCHAIN rustc -vV` reports, if that
/// toolchain is installed.
pub fn rustc_llvm_major(toolchain: &str) -> Option<u32> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "-vV"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_llvm_major(&String::from_utf8_lossy(&out.stdout))
}

fn parse_llvm_major(version_verbose: &str) -> Option<u32> {
    version_verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
}

/// The toolchain that builds the BPF object here: the machine's `nightly`
/// when its LLVM is the right one, else [`PINNED_NIGHTLY`].
/// `CLOISON_BPF_TOOLCHAIN` overrides both.
pub fn bpf_toolchain() -> String {
    if let Ok(t) = std::env::var("CLOISON_BPF_TOOLCHAIN") {
        return t;
    }
    if rustc_llvm_major("nightly") == Some(LLVM_MAJOR) {
        "nightly".into()
    } else {
        PINNED_NIGHTLY.into()
    }
}

/// Whether `toolchain` has the rust-src component (for `-Z build-std`).
pub fn has_rust_src(toolchain: &str) -> bool {
    Command::new("rustup")
        .args(["component", "list", "--toolchain", toolchain, "--installed"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src")
        })
}

/// Whether a bpf-linker is on the PATH.
pub fn has_bpf_linker() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What is missing to build the BPF object, in words; empty when nothing.
pub fn missing() -> Vec<String> {
    let tc = bpf_toolchain();
    let mut out = Vec::new();
    if !has_rust_src(&tc) {
        out.push(format!("the {tc} toolchain with rust-src"));
    }
    if !has_bpf_linker() {
        out.push(format!(
            "bpf-linker {BPF_LINKER_VERSION} (LLVM {LLVM_MAJOR})"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_version_verbose() {
        let v = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(v), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
        assert_eq!(parse_llvm_major("LLVM version: x.1\n"), None);
    }
}
