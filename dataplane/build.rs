// Builds the BPF object (ebpf/programs) with the nightly toolchain and
// bpf-linker; `src/loader.rs` embeds it. See ../shared/TOOLCHAIN.md.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/programs");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "cloison-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    println!("cargo::rerun-if-changed=../ebpf/abi/src");
    Ok(())
}
