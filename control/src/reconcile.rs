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
use crossbeam_channel::{Receiver, RecvTimeoutError};

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
}

/// How often pending ports are looked for and a failed apply retried.
const RETRY: Duration = Duration::from_millis(500);
const CONNTRACK_GC: Duration = Duration::from_secs(30);

pub fn run(
    cfg: Config,
    dataplane: Arc<Mutex<Option<Dataplane>>>,
    status: Arc<Status>,
    desired: Receiver<(u64, Arc<Snapshot>)>,
) {
    let mut latest: Option<(u64, Arc<Snapshot>)> = None;
    let mut dirty = false;
    let mut last_gc = Instant::now();
    loop {
        match desired.recv_timeout(RETRY) {
            Ok(d) => {
                latest = Some(d);
                while let Ok(d) = desired.try_recv() {
                    latest = Some(d);
                }
                dirty = true;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let pending = !status.pending_ports.lock().expect("status").is_empty();
        if let Some((generation, snap)) = &latest {
            if dirty || pending {
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
        match Dataplane::open(&cfg.host, &cfg.pin_root) {
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
