//! The bpffs that holds the pins. Pins must outlive the agent: maps and
//! links pinned on a bpffs that only the agent's own mount namespace has are
//! released when that namespace goes, with the agent (measured: an agent
//! started with `ip netns exec`, which remounts /sys in a namespace of its
//! own, mounted its own bpffs; a SIGKILL then stopped all traffic, detached
//! the ports and lost conntrack). A bpffs outlives the agent when PID 1's
//! mount namespace (the host's, or a container's) has the same one mounted.
use std::{
    ffi::CString,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::Error;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// The nearest ancestor of `path` (itself included) that exists.
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// The `major:minor` of every bpffs mount in a mountinfo text.
fn bpffs_devices(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            let fstype = tail.split_whitespace().next()?;
            (fstype == "bpf").then(|| head.split_whitespace().nth(2).map(str::to_string))?
        })
        .collect()
}

fn device_of(path: &Path) -> io::Result<String> {
    let dev = std::fs::metadata(path)?.dev();
    Ok(format!("{}:{}", libc::major(dev), libc::minor(dev)))
}

/// Why the bpffs at `at` would not outlive this process, if it would not.
fn dies_with_us(at: &Path, mounted_by_us: bool) -> Result<Option<String>, Error> {
    let dev = device_of(at).map_err(Error::io(format!("stat {}", at.display())))?;
    let init = std::fs::read_to_string("/proc/1/mountinfo")
        .map_err(Error::io("read /proc/1/mountinfo"))?;
    let shared_with_init = bpffs_devices(&init).contains(&dev);
    let we_are_init = std::process::id() == 1;
    Ok(if !shared_with_init {
        Some(format!(
            "the bpffs at {} ({dev}) is mounted only in this process's mount namespace, not in PID 1's",
            at.display()
        ))
    } else if we_are_init && mounted_by_us {
        Some(format!(
            "this process is PID 1 and mounted the bpffs at {} itself",
            at.display()
        ))
    } else {
        None
    })
}

/// Makes sure the pins under `pin_root` live on a bpffs that outlives this
/// process: mounts one on /sys/fs/bpf where a fresh machine lacks it, and
/// refuses (leaving nothing mounted) where that bpffs would be this mount
/// namespace's alone.
pub fn prepare(pin_root: &Path) -> Result<(), Error> {
    let at = existing_ancestor(pin_root);
    let mut mounted_by_us = false;
    if !is_bpffs(&at) {
        if !pin_root.starts_with(BPFFS_MOUNT) || is_bpffs(Path::new(BPFFS_MOUNT)) {
            return Err(Error::Invalid(format!(
                "the pin root {} is not on a bpffs (mount one there: mount -t bpf bpf DIR)",
                pin_root.display()
            )));
        }
        mount_bpffs()?;
        mounted_by_us = true;
    }
    let at = existing_ancestor(pin_root);
    if let Some(why) = dies_with_us(&at, mounted_by_us)? {
        if mounted_by_us {
            unmount_bpffs();
        }
        return Err(Error::Invalid(format!(
            "pins under {} would not outlive this process: {why}. A bpffs mounted here goes \
             with this mount namespace, and with it every map, link and conntrack entry. \
             Run in the host's mount namespace (`ip netns exec` makes a new one and remounts \
             /sys: enter only the network namespace, e.g. `nsenter --net=/run/netns/NAME`), \
             or bind-mount the host's /sys/fs/bpf into the container; see docs/operations.md",
            pin_root.display()
        )));
    }
    Ok(())
}

fn mount_bpffs() -> Result<(), Error> {
    let path = CString::new(BPFFS_MOUNT).expect("static path");
    let bpf = CString::new("bpf").expect("static");
    let rc = unsafe {
        libc::mount(
            bpf.as_ptr(),
            path.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::io(format!("mount bpffs on {BPFFS_MOUNT}"))(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn unmount_bpffs() {
    let path = CString::new(BPFFS_MOUNT).expect("static path");
    unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpffs_devices_from_mountinfo() {
        let m = "23 27 0:22 / /sys rw,relatime - sysfs sysfs rw\n\
                 31 23 0:27 / /sys/fs/bpf rw,nosuid shared:12 - bpf bpf rw,mode=700\n\
                 40 27 0:40 / /run/x rw master:1 - bpf none rw\n\
                 41 27 8:1 / / rw - ext4 /dev/vda rw\n";
        assert_eq!(bpffs_devices(m), vec!["0:27", "0:40"]);
        assert!(bpffs_devices("").is_empty());
    }
}
