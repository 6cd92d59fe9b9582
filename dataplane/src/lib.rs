//! Cloison's userspace dataplane library: builds (build.rs), loads, pins and
//! attaches the eBPF programs, and is the only writer of their maps. It takes
//! a complete desired [`Snapshot`] and applies only the difference.
//!
//! [`model`] is a pure-Rust reference of the same packet pipeline, used as the
//! test oracle for the BPF programs.

mod batch;
pub mod bpffs;
pub mod fuzzing;
pub mod loader;
pub mod model;
pub mod monitor;
pub mod netdev;
pub mod plan;
pub mod policy;
pub mod progstats;
pub mod rawmap;
pub mod service;
pub mod snapshot;
pub mod tables;
pub mod trace;
pub mod traffic;
pub mod validate;

pub use loader::{ApplyReport, Dataplane, Stats, UplinkHook};
pub use snapshot::{
    AddressPair, Direction, Ethertype, FloatingIp, Host, HostRoute, MacAddr, Network, Port,
    PortRange, Protocol, Remote, Router, Rule, SecurityGroup, Snapshot,
};
pub use validate::{validate, Valid, Violation};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request the dataplane cannot carry out (nothing was changed).
    #[error("{0}")]
    Invalid(String),
    /// The desired state breaks a rule of the validator; nothing was changed.
    #[error("invalid desired state: {0}")]
    Violation(#[from] Violation),
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn kernel(
        what: impl Into<String>,
    ) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Error {
        let what = what.into();
        move |source| Error::Kernel { what, source }
    }
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
