//! The netns lab (hosts, VMs, an underlay switch, a kernel baseline) and
//! what runs on it: `cloison-lab demo`, `bench`, `plot`, `lab`, which
//! `cargo xtask` runs once `setup` has installed the BPF toolchain.
pub mod bench;
pub mod demo;
pub mod fleet_bench;
pub mod fuzz_seeds;
pub mod gateway_bench;
pub mod ipsec_bench;
pub mod lab;
pub mod memory;
pub mod plot;
pub mod pps;
pub mod routing_bench;
