//! The per-host agent, `cloisond`, and its CLI, `cloisonctl`: the northbound
//! API of docs/api.md over a durable embedded store, and a reconciler
//! that hands the dataplane complete snapshots. No aya here: the kernel side
//! is `cloison-dataplane`.

pub mod client;
pub mod desired;
pub mod fuzzing;
pub mod gateway;
pub mod ipsec;
pub mod monitor;
pub mod reconcile;
pub mod server;
pub mod store;
pub mod tls;
pub mod watch_only;
