//! Shared by `cargo xtask` and the lab tests: the netns lab.
pub mod lab;
pub mod memory;
pub mod plot;
pub mod pps;
