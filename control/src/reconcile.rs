//! The reconciler: one thread, the only owner of the host's dataplane
//! writer, that makes the kernel match the latest desired state. It watches
//! the desired state (a `watch` channel of immutable states: it always takes
//! the newest one, so any number of writes cost one apply) and publishes what
//! it applied on another; nobody waits on it. It applies again while ports
//! are pending (their interface may have appeared), after a failure, and
//! ages conntrack.
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use cloison_dataplane::{Dataplane, UplinkHook};
use tokio::sync::{mpsc, watch};

use crate::desired::Desired;

/// What the kernel holds, as `GET /v1/status` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub generation: u64,
    /// "attached", or why not.
    pub programs: String,
    pub pending_ports: Vec<String>,
    /// Ports never attached (their interface is the uplink or a host
    /// device), with why.
    pub refused_ports: Vec<(String, String)>,
    /// This host's ports in the kernel, by the ifindex of their interface
    /// (the gateway services know a frame's port by it).
    pub ports: Arc<std::collections::BTreeMap<u32, String>>,
    /// How the applies went, since the agent started.
    pub applies: ApplyStats,
}

/// The reconciler's applies (`/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub total: u64,
    /// Applies that failed or left something out (tried again).
    pub failures: u64,
    /// Time spent applying, in all and the last one (µs).
    pub micros_sum: u64,
    pub last_micros: u64,
}

pub struct Config {
    pub host: String,
    pub uplink: String,
    pub hook: UplinkHook,
    pub pin_root: PathBuf,
    /// Size of the conntrack table when it is created.
    pub conntrack_entries: u32,
    /// The service tap (name, ifindex) the gateway services read, put
    /// behind the port programs once the dataplane is loaded, and each
    /// port's limit on it.
    pub service_tap: Option<(String, u32, cloison_abi::ServiceConfig)>,
    /// Where floating-IP and SNAT traffic leaves and enters the host.
    pub external: Option<String>,
    /// The IPsec device (charon's kernel-libipsec TUN device), for a host
    /// whose `encryption` is `ipsec`.
    pub ipsec_device: String,
}

/// How often a failed apply is retried (and pending ports looked for, in
/// case a link event was missed).
const RETRY: Duration = Duration::from_secs(5);
const CONNTRACK_GC: Duration = Duration::from_secs(30);

/// Starts the reconciler on a thread of its own. `links` says an interface
/// appeared, changed or went.
pub fn spawn(
    cfg: Config,
    desired: watch::Receiver<Arc<Desired>>,
    applied: watch::Sender<Applied>,
    links: mpsc::UnboundedReceiver<()>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("reconcile".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("the reconciler's runtime");
            rt.block_on(run(cfg, desired, applied, links));
        })?;
    Ok(())
}

async fn run(
    cfg: Config,
    mut desired: watch::Receiver<Arc<Desired>>,
    applied: watch::Sender<Applied>,
    mut links: mpsc::UnboundedReceiver<()>,
) {
    let mut dataplane: Option<Dataplane> = None;
    let mut last_gc = Instant::now();
    // The state at start is new to this process: apply it.
    let mut dirty = true;
    loop {
        let mut link_event = false;
        if !dirty {
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() {
                        return; // the API is gone
                    }
                    dirty = true;
                }
                event = links.recv() => {
                    if event.is_none() {
                        return;
                    }
                    link_event = true;
                }
                _ = tokio::time::sleep(RETRY) => link_event = true,
            }
        }
        while links.try_recv().is_ok() {
            link_event = true;
        }
        let state = desired.borrow_and_update().clone();
        if dirty || link_event {
            let started = Instant::now();
            dirty = !apply(&cfg, &mut dataplane, &applied, &state);
            let took = started.elapsed().as_micros() as u64;
            // Counted without waking the watchers: nothing they act on changed.
            applied.send_if_modified(|a| {
                a.applies.total += 1;
                a.applies.failures += u64::from(dirty);
                a.applies.micros_sum += took;
                a.applies.last_micros = took;
                false
            });
            if dirty {
                // Failed: try again after a while (or on the next change).
                tokio::select! {
                    _ = desired.changed() => {}
                    _ = links.recv() => {}
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
        if last_gc.elapsed() >= CONNTRACK_GC {
            last_gc = Instant::now();
            if let Some(dp) = dataplane.as_mut() {
                match dp.conntrack_gc() {
                    Ok(n) if n > 0 => tracing::debug!(removed = n, "conntrack aged"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "conntrack gc"),
                }
            }
        }
    }
}

fn set_programs(applied: &watch::Sender<Applied>, programs: String) {
    applied.send_if_modified(|a| {
        let changed = a.programs != programs;
        a.programs = programs;
        changed
    });
}

/// One apply; true when the kernel now holds the state (or there is nothing
/// it could do with it yet).
fn apply(
    cfg: &Config,
    slot: &mut Option<Dataplane>,
    applied: &watch::Sender<Applied>,
    state: &Desired,
) -> bool {
    let valid = match &state.valid {
        Ok(v) => v,
        Err(v) => {
            set_programs(
                applied,
                format!("waiting: the stored state is refused by this version's checks: {v}"),
            );
            return true; // nothing to do until it is mended through the API
        }
    };
    if slot.is_none() {
        match Dataplane::open_with_conntrack(&cfg.host, &cfg.pin_root, cfg.conntrack_entries) {
            Ok(mut dp) => {
                if let Some((name, ifindex, limit)) = &cfg.service_tap {
                    if let Err(e) = dp.attach_service(name, *ifindex, *limit) {
                        set_programs(applied, format!("service tap: {e}"));
                        tracing::error!(error = %e, "attach the service tap");
                        return false;
                    }
                }
                // An event stream an earlier agent left on stops: this
                // agent's watchers turn it on again.
                if let Err(e) = dp.set_monitor(cloison_abi::MonitorConfig::default()) {
                    tracing::warn!(error = %e, "turn the monitor off");
                }
                *slot = Some(dp)
            }
            Err(e) => {
                set_programs(applied, format!("not loaded: {e}"));
                tracing::error!(error = %e, "load the dataplane");
                return false;
            }
        }
    }
    let dp = slot.as_mut().expect("just loaded");
    // First, and whatever the apply does next: every interface of this
    // host's ports that exists gets the port program, which drops what it
    // sends until its entry is written (fail closed).
    let interfaces: Vec<&str> = valid
        .ports
        .iter()
        .filter(|p| p.host == cfg.host)
        .map(|p| p.interface.as_str())
        .collect();
    match dp.close(&interfaces, &cfg.uplink) {
        Ok(closed) if !closed.is_empty() => {
            tracing::info!(?closed, "interfaces closed until applied")
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "close the ports' interfaces"),
    }
    if !valid.hosts.iter().any(|h| h.name == cfg.host) {
        set_programs(
            applied,
            format!("waiting: no host object named {}", cfg.host),
        );
        return true; // nothing to do until the host object exists
    }
    // The external interface (floating IPs, SNAT), on every turn until it
    // is attached (it may appear later); its failure keeps nothing else
    // from being applied.
    let external = cfg.external.as_ref().and_then(|name| {
        dp.attach_external(name)
            .err()
            .map(|e| format!("external interface {name}: {e}"))
    });
    let ipsec = ipsec_device(cfg, dp, valid);
    let external = match (external, ipsec) {
        (None, None) => None,
        (Some(e), None) | (None, Some(e)) => Some(e),
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
    };
    let started = Instant::now();
    let generation = state.generation;
    match dp.apply(valid, &cfg.host, &cfg.uplink, cfg.hook) {
        Ok(r) if !r.failures.is_empty() => {
            // Everything else is in; this is tried again.
            set_programs(
                applied,
                format!("apply incomplete: {}", r.failures.join("; ")),
            );
            tracing::error!(generation, failures = ?r.failures, "apply incomplete");
            false
        }
        Ok(r) => {
            let newly_pending = applied.borrow().pending_ports != r.pending;
            if !r.refused.is_empty() {
                tracing::warn!(refused = ?r.refused, "ports not attached");
            }
            if !r.announced.is_empty() {
                tracing::info!(floating_ips = ?r.announced, "floating IPs announced (gratuitous ARP)");
            }
            for w in &r.warnings {
                tracing::warn!(warning = %w, "apply");
            }
            if let Some(e) = &external {
                tracing::error!(error = %e, "the external interface");
            }
            // Read first: a borrow held across the send would deadlock it.
            let applies = applied.borrow().applies;
            applied.send_replace(Applied {
                generation,
                programs: match &external {
                    None => "attached".into(),
                    Some(e) => format!("attached; {e}"),
                },
                pending_ports: r.pending.clone(),
                refused_ports: r.refused.clone(),
                ports: Arc::new(r.local_ports.iter().cloned().collect()),
                applies,
            });
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
            external.is_none()
        }
        Err(e) => {
            set_programs(applied, format!("apply failed: {e}"));
            tracing::error!(generation, error = %e, "apply");
            false
        }
    }
}

/// The IPsec device, on every turn: attached while this host is an ipsec
/// host and the device exists (charon made it; a restarted charon makes a
/// new one, whose link event brings the reconciler here), detached
/// otherwise, so that nothing meant for an ipsec peer goes anywhere else.
/// What is missing, if something is.
fn ipsec_device(
    cfg: &Config,
    dp: &mut Dataplane,
    valid: &cloison_dataplane::Valid,
) -> Option<String> {
    use cloison_dataplane::snapshot::Encryption;
    let ipsec = valid
        .hosts
        .iter()
        .any(|h| h.name == cfg.host && h.encryption == Encryption::Ipsec);
    let name = cfg.ipsec_device.as_str();
    let present = ipsec && cloison_dataplane::netdev::ifindex(name).is_some();
    let res = dp.attach_ipsec(present.then_some(name));
    match (ipsec, present, res) {
        (_, _, Err(e)) => Some(format!("IPsec device {name}: {e}")),
        (true, false, Ok(())) => Some(format!(
            "IPsec device {name} missing (is charon running with kernel-libipsec?): nothing is sent to ipsec peers"
        )),
        _ => None,
    }
}

/// Signals `events` whenever the kernel reports a link added, changed or
/// removed in this network namespace (an rtnetlink RTMGRP_LINK socket; the
/// message itself is not parsed: the reconciler diffs anyway).
pub fn watch_links(events: mpsc::UnboundedSender<()>) -> std::io::Result<()> {
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
                if events.send(()).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}
