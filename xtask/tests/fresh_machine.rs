//! `cargo xtask` must build where only the stable toolchain is installed:
//! nothing in its build graph may need nightly, rust-src, bpf-linker or
//! LLVM, nor protoc (those are what `cargo xtask setup` installs). Anything
//! that pulls in aya-build (the BPF object's build), the BPF crate, or the
//! etcd client (its gRPC code is generated with protoc) would.
use std::process::Command;

/// The packages `cargo tree` lists for `package` over normal and build
/// dependencies (what `cargo run -p package` compiles).
fn build_graph(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-p", package, "-e", "normal,build"])
        .args(["--prefix", "none", "--format", "{p}"])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

const NEEDS_SETUP: &[&str] = &[
    "aya-build",
    "cloison-ebpf",
    "cloison-dataplane",
    "etcd-client",
    "tonic-prost-build",
    "prost-build",
];

#[test]
fn xtask_builds_without_the_bpf_toolchain() {
    let graph = build_graph("xtask");
    assert!(graph.iter().any(|p| p == "xtask"), "{graph:?}");
    let bad: Vec<&String> = graph
        .iter()
        .filter(|p| NEEDS_SETUP.contains(&p.as_str()))
        .collect();
    assert!(
        bad.is_empty(),
        "xtask's build graph reaches {bad:?}: `cargo xtask setup` could not even compile on a fresh machine \
         (`cargo tree -p xtask -e normal,build -i aya-build` shows the path)"
    );
}

/// The check above would see the dependencies: the lab's graph has them.
#[test]
fn the_check_sees_aya_build_and_protoc_builds_where_they_are() {
    let graph = build_graph("cloison-lab");
    for p in ["aya-build", "etcd-client", "prost-build"] {
        assert!(graph.iter().any(|g| g == p), "{p} not in {graph:?}");
    }
}
