// Builds the BPF object (ebpf/programs) with the nightly toolchain and
// bpf-linker that `cargo xtask setup` installs (cloison-toolchain names
// them); `src/loader.rs` embeds it.
//
// aya-build echoes every line of the inner cargo build as a `cargo:warning`
// (hundreds of lines on a clean build). Its output goes to a log in OUT_DIR
// instead: the build's `cargo:` directives are passed on, the echo is shown
// only when the BPF build fails.
use std::{fs, io::Write, os::fd::AsRawFd, path::Path};

use anyhow::{bail, Context};

fn main() {
    // An error is printed as one message, not with a backtrace.
    if let Err(e) = build() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn build() -> anyhow::Result<()> {
    println!("cargo::rerun-if-changed=../ebpf/abi/src");
    println!("cargo::rerun-if-env-changed=CLOISON_BPF_TOOLCHAIN");
    let missing = cloison_toolchain::missing();
    if !missing.is_empty() {
        bail!(
            "the BPF toolchain is not installed here ({}): run `cargo xtask setup` first",
            missing.join(", ")
        );
    }
    let toolchain = cloison_toolchain::bpf_toolchain();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/programs");
    let log = Path::new(&std::env::var("OUT_DIR")?).join("bpf-build.log");
    let built = stdout_to(&log, || {
        aya_build::build_ebpf(
            [aya_build::Package {
                name: "cloison-ebpf",
                root_dir: root,
                ..Default::default()
            }],
            aya_build::Toolchain::Custom(&toolchain),
        )
    })?;
    let text = fs::read_to_string(&log).with_context(|| format!("read {}", log.display()))?;
    let mut echo = Vec::new();
    for line in text.lines() {
        match line.strip_prefix("cargo:warning=") {
            Some(w) => echo.push(w),
            None if line.starts_with("cargo:") => println!("{line}"),
            None => echo.push(line),
        }
    }
    if let Err(e) = built {
        for l in echo {
            eprintln!("{l}");
        }
        return Err(e.context(format!("building the BPF object with {toolchain}")));
    }
    Ok(())
}

/// Runs `f` with this process's stdout (fd 1) sent to the file `path`.
fn stdout_to<T>(path: &Path, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    let file = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    std::io::stdout().flush()?;
    let saved = unsafe { libc::dup(1) };
    if saved < 0 || unsafe { libc::dup2(file.as_raw_fd(), 1) } < 0 {
        bail!("redirect stdout: {}", std::io::Error::last_os_error());
    }
    let out = f();
    std::io::stdout().flush()?;
    unsafe {
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    Ok(out)
}
