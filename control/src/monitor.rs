//! `GET /v1/monitor`: the programs' drop and new-flow events, read from
//! their ring buffer by one task of the agent and handed to every watcher.
//! The programs stream only while someone watches, and only what the
//! watchers want together (drops, flows, one port's or every port's); each
//! watcher's own port, kind and filter are then applied here.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cloison_abi::{monitor as m, MonitorConfig};
use cloison_dataplane::{
    monitor::{boot_ns, decode, Event, Names},
    Dataplane,
};
use tokio::{io::unix::AsyncFd, sync::broadcast};

use crate::desired::Desired;

/// The agent's settings of the programs' event stream.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Events each CPU may send a second (past it: counted lost).
    pub rate: u32,
    /// One new flow in `sample` is sent (1: each).
    pub sample: u32,
}

/// What one watcher wants from the programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// `monitor::F_*`.
    pub flags: u32,
    /// One port slot's events only.
    pub slot: Option<u32>,
}

impl Want {
    pub fn wants(&self, e: &Event, slot: Option<u32>) -> bool {
        let kind = match e.kind.as_str() {
            "drop" => m::F_DROPS,
            _ => m::F_FLOWS,
        };
        self.flags & kind != 0 && (self.slot.is_none() || self.slot == slot)
    }
}

/// An event and the port slot it was charged to.
pub type Item = Arc<(Event, Option<u32>)>;

pub struct Monitor {
    settings: Mutex<Settings>,
    state: Mutex<State>,
    tx: broadcast::Sender<Item>,
}

#[derive(Default)]
struct State {
    watchers: BTreeMap<u64, Want>,
    next: u64,
    reading: bool,
}

/// A dataplane handle the monitor uses (the agent's read-only view).
pub type WithDataplane =
    Arc<dyn Fn(&mut dyn FnMut(&Dataplane)) -> Result<(), String> + Send + Sync>;

impl Monitor {
    pub fn new(settings: Settings) -> Arc<Monitor> {
        Arc::new(Monitor {
            settings: Mutex::new(settings),
            state: Mutex::default(),
            tx: broadcast::channel(4096).0,
        })
    }

    /// The agent's settings (its flags), for the watchers to come.
    pub fn configure(&self, settings: Settings) {
        *self.settings.lock().expect("monitor") = settings;
    }

    /// How many watch now.
    pub fn watchers(&self) -> usize {
        self.state.lock().expect("monitor").watchers.len()
    }

    /// What the programs are told to stream for `watchers`.
    fn config(&self, watchers: &BTreeMap<u64, Want>) -> MonitorConfig {
        let Some(first) = watchers.values().next() else {
            return MonitorConfig::default();
        };
        let one_port = watchers.values().all(|w| w.slot == first.slot);
        let settings = *self.settings.lock().expect("monitor");
        MonitorConfig {
            flags: watchers.values().fold(0, |f, w| f | w.flags),
            rate: settings.rate,
            sample: settings.sample.max(1),
            slot: match (one_port, first.slot) {
                (true, Some(s)) => s,
                _ => m::ANY_SLOT,
            },
        }
    }

    /// A new watcher: the programs told, the reading task started if it
    /// is not yet.
    pub fn watch(
        self: &Arc<Self>,
        want: Want,
        dp: WithDataplane,
        desired: tokio::sync::watch::Receiver<Arc<Desired>>,
        host: String,
    ) -> Result<Watcher, String> {
        let mut st = self.state.lock().expect("monitor");
        let id = st.next;
        st.next += 1;
        st.watchers.insert(id, want);
        let cfg = self.config(&st.watchers);
        if let Err(e) = set(&dp, cfg) {
            st.watchers.remove(&id);
            return Err(e);
        }
        if !st.reading {
            st.reading = true;
            let me = self.clone();
            let dp2 = dp.clone();
            tokio::spawn(async move {
                if let Err(e) = me.read(dp2, desired, host).await {
                    tracing::warn!(error = %e, "the monitor's ring buffer");
                }
                me.state.lock().expect("monitor").reading = false;
            });
        }
        Ok(Watcher {
            id,
            rx: self.tx.subscribe(),
            monitor: self.clone(),
            dp,
        })
    }

    /// Reads the ring buffer as it fills, for as long as the agent runs.
    async fn read(
        &self,
        dp: WithDataplane,
        desired: tokio::sync::watch::Receiver<Arc<Desired>>,
        host: String,
    ) -> Result<(), String> {
        let mut ring = None;
        dp(&mut |d| ring = Some(d.open_events().map_err(|e| e.to_string())))?;
        let ring = ring.expect("called")?;
        // SAFETY: the ring buffer owns its map's descriptor, open for as
        // long as it lives, and always answers the same one.
        let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| e.to_string())?;
        let boot = boot_ns();
        let mut names = Names::new();
        let mut named_at: Option<Instant> = None;
        loop {
            let mut guard = fd.readable_mut().await.map_err(|e| e.to_string())?;
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                batch.push(item.to_vec());
            }
            guard.clear_ready();
            if batch.is_empty() {
                continue;
            }
            let stale = named_at.is_none_or(|t| t.elapsed() > Duration::from_secs(1));
            if stale {
                names = port_names(&dp, &desired.borrow(), &host);
                named_at = Some(Instant::now());
            }
            for raw in batch {
                if let Some(ev) = decode(&raw, &names, boot) {
                    let slot = slot_of(&raw);
                    let _ = self.tx.send(Arc::new((ev, slot)));
                }
            }
        }
    }

    fn forget(&self, id: u64, dp: &WithDataplane) {
        let mut st = self.state.lock().expect("monitor");
        st.watchers.remove(&id);
        if let Err(e) = set(dp, self.config(&st.watchers)) {
            tracing::warn!(error = %e, "the monitor's settings");
        }
    }
}

fn set(dp: &WithDataplane, cfg: MonitorConfig) -> Result<(), String> {
    let mut r = Ok(());
    dp(&mut |d| r = d.set_monitor(cfg).map_err(|e| e.to_string()))?;
    r
}

/// The port slot a raw event names (None: no port).
fn slot_of(raw: &[u8]) -> Option<u32> {
    let off = std::mem::offset_of!(cloison_abi::MonitorEvent, slot);
    let s = u32::from_ne_bytes(raw.get(off..off + 4)?.try_into().ok()?);
    (s != u32::MAX).then_some(s)
}

/// This host's ports by slot: (port name, tenant).
pub fn port_names(dp: &WithDataplane, desired: &Desired, host: &str) -> Names {
    let by_ifindex: BTreeMap<u32, (String, String)> = desired
        .local_ports(host)
        .into_iter()
        .map(|(p, n, i)| (i, (p.name, n.tenant)))
        .collect();
    let mut out = Names::new();
    let _ = dp(&mut |d| {
        if let Ok(entries) = d.port_entries() {
            for (i, info) in entries {
                if let Some(n) = by_ifindex.get(&i) {
                    out.insert(info.slot, n.clone());
                }
            }
        }
    });
    out
}

/// One watcher: its events, and the programs told again when it goes.
pub struct Watcher {
    id: u64,
    pub rx: broadcast::Receiver<Item>,
    monitor: Arc<Monitor>,
    dp: WithDataplane,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.monitor.forget(self.id, &self.dp);
    }
}

/// The settings an agent starts with (its flags' defaults).
pub const DEFAULT_SETTINGS: Settings = Settings {
    rate: 1000,
    sample: 1,
};
