//! What Cloison's programs cost while real traffic runs: the kernel's own
//! per-program run time and run count (BPF_ENABLE_STATS), summed over every
//! loaded program of a name.
use std::{collections::BTreeMap, os::fd::OwnedFd};

use aya::{
    programs::loaded_programs,
    sys::{enable_stats, Stats},
};

use crate::Error;

/// The kernel times every BPF program run while this lives (two clock
/// reads per run); dropping it turns that off again, even if the process dies.
pub struct Timing(#[allow(dead_code)] OwnedFd);

/// Runs and nanoseconds so far of the programs named `name`, summed over
/// all loaded instances (one per host in a lab).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub runs: u64,
    pub ns: u64,
}

impl Cost {
    /// Mean nanoseconds per run between `earlier` and `self`.
    pub fn ns_per_run_since(&self, earlier: &Cost) -> Option<f64> {
        let runs = self.runs.checked_sub(earlier.runs)?;
        (runs > 0).then(|| self.ns.saturating_sub(earlier.ns) as f64 / runs as f64)
    }
}

pub fn start_timing() -> Result<Timing, Error> {
    enable_stats(Stats::RunTime)
        .map(Timing)
        .map_err(|e| Error::kernel("BPF_ENABLE_STATS")(e.into()))
}

/// Accumulated cost of every loaded program whose name is in `names`.
pub fn costs(names: &[&str]) -> Result<BTreeMap<String, Cost>, Error> {
    let mut out: BTreeMap<String, Cost> = names
        .iter()
        .map(|n| (n.to_string(), Cost::default()))
        .collect();
    for p in loaded_programs() {
        let p = p.map_err(|e| Error::kernel("list loaded programs")(e.into()))?;
        if let Some(c) = p.name_as_str().and_then(|n| out.get_mut(n)) {
            c.runs += p.run_count();
            c.ns += p.run_time().as_nanos() as u64;
        }
    }
    Ok(out)
}
