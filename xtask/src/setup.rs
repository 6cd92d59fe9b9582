//! `cargo xtask setup`: what a fresh machine with nothing but Rust lacks,
//! installed idempotently, one line per step (the tools' own output only
//! when a step fails).
use std::{path::Path, process::Command};

use anyhow::{bail, Result};
use cloison_toolchain as tc;

use crate::shell::{run_quiet, step, succeeds};

/// A Debian package and how to tell, without dpkg, that what it brings is
/// here (a command on the PATH or a file).
struct Package {
    name: &'static str,
    probe: &'static str,
    /// Needed only to build bpf-linker.
    for_linker: bool,
}

const fn pkg(name: &'static str, probe: &'static str) -> Package {
    Package {
        name,
        probe,
        for_linker: false,
    }
}

const fn llvm(name: &'static str, probe: &'static str) -> Package {
    Package {
        name,
        probe,
        for_linker: true,
    }
}

const PACKAGES: &[Package] = &[
    llvm("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    llvm("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    llvm("libzstd-dev", "/usr/include/zstd.h"),
    pkg("iproute2", "ip"),
    pkg("bpftool", "bpftool"),
    pkg("iperf3", "iperf3"),
    pkg("tcpdump", "tcpdump"),
    pkg("iputils-ping", "ping"),
    pkg("netcat-openbsd", "nc"),
    pkg("ethtool", "ethtool"),
    pkg("nftables", "nft"),
    // Fleet mode: protoc builds the etcd client's gRPC code; the tests and
    // the demo start their own etcd servers (the package's service is kept
    // from starting, see below).
    pkg("protobuf-compiler", "protoc"),
    pkg(
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
    ),
    pkg("etcd-server", "etcd"),
    pkg("etcd-client", "etcdctl"),
    // Gateway services: the lab's VMs run real DHCP clients (busybox's
    // udhcpc, ISC's dhclient) and fetch their metadata with curl.
    pkg("busybox", "busybox"),
    pkg("isc-dhcp-client", "dhclient"),
    pkg("curl", "curl"),
    // Routing: the lab checks the router hop with a real traceroute.
    pkg("traceroute", "traceroute"),
    // Encryption: the ipsec hosts' IKE daemon (strongSwan's charon, with
    // kernel-libipsec from the extra plugins), swanctl and pki for the
    // tests' throwaway CA (each test starts its own charons, by pid).
    pkg("strongswan-charon", "/usr/lib/ipsec/charon"),
    pkg("strongswan-swanctl", "swanctl"),
    pkg("strongswan-pki", "pki"),
    pkg(
        "libcharon-extra-plugins",
        "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so",
    ),
    pkg(
        "libstrongswan-standard-plugins",
        "/usr/lib/ipsec/plugins/libstrongswan-openssl.so",
    ),
    pkg(
        "fonts-dejavu-core",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ),
];

pub fn setup() -> Result<()> {
    let linker = tc::has_bpf_linker();
    packages(linker)?;
    rust_toolchain()?;
    if linker {
        step(&format!("bpf-linker: present ({})", version("bpf-linker")));
    } else {
        step(&format!(
            "bpf-linker {}: installing with cargo against LLVM {} in {} (about 70 s)",
            tc::BPF_LINKER_VERSION,
            tc::LLVM_MAJOR,
            tc::LLVM_PREFIX
        ));
        run_quiet(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--quiet",
                    "--locked",
                    "--version",
                    tc::BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    &format!("llvm-{}", tc::LLVM_MAJOR),
                ])
                .env("LLVM_PREFIX", tc::LLVM_PREFIX),
        )?;
        if !tc::has_bpf_linker() {
            bail!("bpf-linker was installed but is not on the PATH: add ~/.cargo/bin to PATH");
        }
    }
    bpffs()
}

fn version(cmd: &str) -> String {
    Command::new(cmd)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn on_path(cmd: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(cmd).is_file())
}

fn present(p: &Package) -> bool {
    if p.probe.starts_with('/') {
        Path::new(p.probe).exists()
    } else {
        on_path(p.probe)
    }
}

fn dpkg_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn packages(have_linker: bool) -> Result<()> {
    let debian = on_path("dpkg-query") && on_path("apt-get");
    let wanted = PACKAGES.iter().filter(|p| !p.for_linker || !have_linker);
    let missing: Vec<&Package> = wanted
        .filter(|p| {
            if debian {
                !dpkg_installed(p.name)
            } else {
                !present(p)
            }
        })
        .collect();
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    if missing.is_empty() {
        step("system packages: all present");
        return Ok(());
    }
    if !debian {
        bail!(
            "not a Debian machine: install the equivalents of these Debian packages, then run `cargo xtask setup` again: {}",
            names.join(" ")
        );
    }
    if !is_root() {
        bail!(
            "setup installs Debian packages ({}): run it as root",
            names.join(" ")
        );
    }
    step(&format!("Debian packages: installing {}", names.join(" ")));
    // Packages that ship a service (a test etcd, an IKE daemon) must not
    // start it on this machine: the tests start their own, by process id.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        set_mode(policy, 0o755)?;
    }
    let res = run_quiet(Command::new("apt-get").args(["update", "-qq"])).and_then(|()| {
        run_quiet(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&names)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    });
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    res
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn rust_toolchain() -> Result<()> {
    let toolchain = tc::bpf_toolchain();
    if tc::has_rust_src(&toolchain) {
        step(&format!("{toolchain} with rust-src: present"));
        return Ok(());
    }
    let installed = succeeds(Command::new("rustup").args(["run", &toolchain, "rustc", "-V"]));
    if installed {
        step(&format!(
            "{toolchain}: adding rust-src (the BPF crate builds core with -Z build-std)"
        ));
        run_quiet(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &toolchain,
        ]))?;
    } else {
        step(&format!(
            "{toolchain} with rust-src: installing (the BPF crate's nightly, LLVM {})",
            tc::LLVM_MAJOR
        ));
        run_quiet(Command::new("rustup").args([
            "toolchain",
            "install",
            &toolchain,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    if !tc::has_rust_src(&toolchain) {
        bail!("rustup did not install rust-src for {toolchain}");
    }
    Ok(())
}

/// bpffs on /sys/fs/bpf, where the dataplane pins (not always mounted on
/// a fresh machine).
fn bpffs() -> Result<()> {
    let is_bpffs = || {
        Command::new("stat")
            .args(["-f", "-c", "%T", "/sys/fs/bpf"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "bpf_fs")
    };
    if is_bpffs() {
        step("bpffs: mounted on /sys/fs/bpf");
        return Ok(());
    }
    step("bpffs: mounting on /sys/fs/bpf");
    run_quiet(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    if !is_bpffs() {
        bail!("/sys/fs/bpf is still not a bpffs");
    }
    Ok(())
}
