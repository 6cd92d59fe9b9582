//! Where the desired state is kept: the [`Store`] seam under the API.
//!
//! - [`Redb`] (`--store embedded`, the default): one host's own state, in a
//!   redb file of `--state-dir`.
//! - [`Etcd`] (`--store etcd`, fleet mode): one state for every agent of the
//!   fleet, in etcd; each agent keeps a copy it watches (and mirrors into the
//!   redb file, so that it starts without etcd), and commits its writes in
//!   transactions that fail when the fleet's state moved meanwhile.
//!
//! Either way the store publishes the state on the agent's watch channel
//! (readers and the reconciler take it from there), and a write is
//! acknowledged only once it is durable.
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

use crate::{
    desired::{Desired, Kind, Record},
    reconcile::Applied,
};

mod embedded;
mod etcd;

pub use embedded::Redb;
pub use etcd::{Etcd, EtcdConfig, EtcdTls};

#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(String);

pub(crate) fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// A committed change: what to write (`Some`) or delete (`None`).
pub struct Change<'a> {
    pub kind: Kind,
    pub name: &'a str,
    pub record: Option<&'a Record>,
}

/// Why a write was not committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The stored state moved on since the state the write was checked
    /// against (another agent wrote): check it again on the newer state.
    #[error("the state changed meanwhile")]
    Stale,
    /// The store cannot be reached: nothing was written.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Failed(#[from] StoreError),
}

/// One agent of the fleet, as `GET /v1/fleet` lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    pub host: String,
    pub applied_generation: u64,
    pub up: bool,
}

/// The desired state's durable home.
pub trait Store: Send + 'static {
    /// From now on the store publishes its state on `desired`, starting
    /// with what it holds. `applied` is what this host's kernel holds (a
    /// fleet store tells the fleet).
    fn start(
        &mut self,
        desired: watch::Sender<Arc<Desired>>,
        applied: watch::Receiver<Applied>,
    ) -> Result<(), StoreError>;
    /// Writes `change`, which turns `base` into `next` (both validated), if
    /// the stored state is still `base`'s; the generation it was written at,
    /// once it is durable and published.
    fn commit(
        &mut self,
        base: &Desired,
        change: Change<'_>,
        next: Desired,
    ) -> Result<u64, CommitError>;
    /// What the API reads of the store without waiting for a writer.
    fn view(&self) -> Arc<dyn StoreView>;
}

/// The store as `GET /v1/status`, `GET /v1/fleet` and `/metrics` see it.
pub trait StoreView: Send + Sync {
    /// `"embedded"`, `"etcd: connected"`, `"etcd: disconnected since …"`.
    fn describe(&self) -> String;
    /// Since when the store cannot be reached (`None`: it can).
    fn unreachable_since(&self) -> Option<SystemTime>;
    /// How many times the whole state was listed again after a watch broke
    /// (or was cancelled, or compacted away).
    fn relists(&self) -> u64 {
        0
    }
    /// Every agent of the fleet (`None`: not a fleet). Blocks: call it off
    /// the async workers.
    fn fleet(&self) -> Option<Result<Vec<Member>, String>>;
}

/// RFC 3339, to the second, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// How long a write waits for the store before it is refused.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
