//! The reconciler: one thread that owns the host's dataplane and makes the
//! kernel match the latest desired snapshot. Writes arrive faster than
//! applies: it takes the newest snapshot waiting and applies only that (one
//! diff for any number of writes). It applies again while ports are pending
//! (their interface may have appeared), after a failure, and ages conntrack.
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use cloison_dataplane::{Dataplane, Snapshot, UplinkHook};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

/// What `GET /v1/status` reports of the kernel side.
#[derive(Default)]
pub struct Status {
    pub applied_generation: AtomicU64,
    /// "attached", or why not.
    pub programs: Mutex<String>,
    pub pending_ports: Mutex<Vec<String>>,
}

pub struct Config {
    pub host: String,
    pub uplink: String,
    pub hook: UplinkHook,
    pub pin_root: PathBuf,
    /// Size of the conntrack table when it is created.
    pub conntrack_entries: u32,
}

/// How often a failed apply is retried (and pending ports looked for, in
/// case a link event was missed).
const RETRY: Duration = Duration::from_secs(5);
const CONNTRACK_GC: Duration = Duration::from_secs(30);

/// What wakes the reconciler.
pub enum Event {
    /// A new desired state and its generation.
    Desired(u64, Arc<Snapshot>),
    /// An interface appeared, changed or went (netlink): pending ports may
    /// attach, gone ones detach.
    Links,
}

pub fn run(
    cfg: Config,
    dataplane: Arc<Mutex<Option<Dataplane>>>,
    status: Arc<Status>,
    events: Receiver<Event>,
) {
    let mut latest: Option<(u64, Arc<Snapshot>)> = None;
    let mut dirty = false;
    let mut last_gc = Instant::now();
    loop {
        let mut links = false;
        match events.recv_timeout(RETRY) {
            Ok(first) => {
                for e in std::iter::once(first).chain(events.try_iter()) {
                    match e {
                        Event::Desired(g, s) => {
                            latest = Some((g, s));
                            dirty = true;
                        }
                        Event::Links => links = true,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => links = true,
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if let Some((generation, snap)) = &latest {
            if dirty || links {
                dirty = !apply(&cfg, &dataplane, &status, *generation, snap);
            }
        }
        if last_gc.elapsed() >= CONNTRACK_GC {
            last_gc = Instant::now();
            if let Some(dp) = dataplane.lock().expect("dataplane").as_mut() {
                match dp.conntrack_gc() {
                    Ok(n) if n > 0 => tracing::debug!(removed = n, "conntrack aged"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "conntrack gc"),
                }
            }
        }
    }
}

/// One apply; true when the kernel now holds `generation`.
fn apply(
    cfg: &Config,
    dataplane: &Mutex<Option<Dataplane>>,
    status: &Status,
    generation: u64,
    snap: &Snapshot,
) -> bool {
    let mut slot = dataplane.lock().expect("dataplane");
    if slot.is_none() {
        match Dataplane::open_with_conntrack(&cfg.host, &cfg.pin_root, cfg.conntrack_entries) {
            Ok(dp) => *slot = Some(dp),
            Err(e) => {
                *status.programs.lock().expect("status") = format!("not loaded: {e}");
                tracing::error!(error = %e, "load the dataplane");
                return false;
            }
        }
    }
    let dp = slot.as_mut().expect("just loaded");
    if !snap.hosts.iter().any(|h| h.name == cfg.host) {
        *status.programs.lock().expect("status") =
            format!("waiting: no host object named {}", cfg.host);
        return true; // nothing to do until the host object exists
    }
    let started = Instant::now();
    match dp.apply(snap, &cfg.host, &cfg.uplink, cfg.hook) {
        Ok(r) => {
            status
                .applied_generation
                .store(generation, Ordering::SeqCst);
            *status.programs.lock().expect("status") = "attached".into();
            let newly_pending = *status.pending_ports.lock().expect("status") != r.pending;
            *status.pending_ports.lock().expect("status") = r.pending.clone();
            if r.map_updates > 0 || newly_pending || !r.ports_attached.is_empty() {
                tracing::info!(
                    generation,
                    map_updates = r.map_updates,
                    attached = ?r.ports_attached,
                    detached = ?r.ports_detached,
                    pending = ?r.pending,
                    took_ms = started.elapsed().as_millis() as u64,
                    "applied"
                );
            }
            true
        }
        Err(e) => {
            *status.programs.lock().expect("status") = format!("apply failed: {e}");
            tracing::error!(generation, error = %e, "apply");
            false
        }
    }
}

/// Sends [`Event::Links`] whenever the kernel reports a link added, changed
/// or removed in this network namespace (an rtnetlink RTMGRP_LINK socket;
/// the message itself is not parsed: the reconciler diffs anyway).
pub fn watch_links(events: Sender<Event>) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket calls on a zeroed sockaddr_nl; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = libc::RTMGRP_LINK as u32;
    let rc = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::thread::Builder::new()
        .name("links".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = unsafe {
                    libc::recv(
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                    )
                };
                if n < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    // ENOBUFS (events overflowed) still means "something changed".
                    if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOBUFS) {
                        tracing::error!(error = %std::io::Error::last_os_error(), "link events");
                        return;
                    }
                }
                if events.send(Event::Links).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}
