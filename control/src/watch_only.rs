//! A watch-only agent: the fleet store of a real agent (its etcd watch, its
//! local copy, its reports to the fleet), and for every state it publishes
//! the host's tables compiled as the reconciler would, without a kernel or
//! an API. What the fleet convergence benchmark runs by the hundred in one
//! process, to measure what hundreds of hosts would do to etcd.
use std::{collections::BTreeMap, path::Path, sync::Arc};

use cloison_dataplane::tables::{self, ConntrackLimits, Iface};
use tokio::sync::watch;

use crate::{
    desired::Desired,
    reconcile::Applied,
    store::{Etcd, EtcdConfig, Redb, Store, StoreError},
};

pub struct WatchOnly {
    pub host: String,
    /// What the agent "applied": the generation of each state it compiled.
    pub applied: watch::Receiver<Applied>,
    _store: Box<dyn Store>,
}

/// Every interface exists (a tap), with an index of its own.
fn resolve(name: &str) -> Option<Iface> {
    let ifindex = name
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
        % 1_000_000
        + 10;
    Some(Iface {
        ifindex,
        veth: false,
        host_device: false,
    })
}

impl WatchOnly {
    /// Starts one on `cfg`, its local copy in `state_dir`. Needs a tokio
    /// runtime; compiles on a thread of its own.
    pub async fn start(cfg: EtcdConfig, state_dir: &Path) -> Result<WatchOnly, StoreError> {
        let host = cfg.host.clone();
        let mut store: Box<dyn Store> = Box::new(Etcd::connect(cfg, Redb::open(state_dir)?).await?);
        let (desired_tx, mut desired_rx) = watch::channel(Arc::new(Desired::default()));
        let (applied_tx, applied_rx) = watch::channel(Applied::default());
        store.start(desired_tx, applied_rx.clone())?;
        let me = host.clone();
        std::thread::Builder::new()
            .name(format!("compile-{host}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("a runtime");
                loop {
                    let state = desired_rx.borrow_and_update().clone();
                    if let Ok(valid) = &state.valid {
                        let programs = match tables::compile(
                            valid,
                            &me,
                            1,
                            resolve,
                            &BTreeMap::new(),
                            ConntrackLimits::default(),
                            cloison_abi::MAX_CONNTRACK,
                        ) {
                            Ok(_) => "attached".to_string(),
                            Err(e) => format!("apply failed: {e}"),
                        };
                        applied_tx.send_replace(Applied {
                            generation: state.generation,
                            programs,
                            ..Default::default()
                        });
                    }
                    if rt.block_on(desired_rx.changed()).is_err() {
                        return;
                    }
                }
            })
            .map_err(crate::store::err)?;
        Ok(WatchOnly {
            host,
            applied: applied_rx,
            _store: store,
        })
    }
}
