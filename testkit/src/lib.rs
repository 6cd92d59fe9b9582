//! What Cloison's tests, benches and lab share, written once:
//!
//! - [`wire`]: frames as plain values whose `emit` and `parse` are inverse
//!   functions (smoltcp's `Repr` style): what the fixtures, the benches and
//!   the lab send and what they read back.
//! - [`netns`]: network namespaces, veths and bridges that a test makes
//!   (uniquely named) and removes however it ends.
//! - [`testbed`]: one host in a namespace of its own with a programmed
//!   dataplane, for BPF_PROG_TEST_RUN fixtures and benches.
//! - [`frames`]: the fixtures' host (addresses, VNI) and builders of its frames.
//! - [`fuzz`]: the frames fuzz target's kernel-and-model harness.
//! - [`corpus`]: malformed frames made from valid ones, every layer broken.
//! - [`etcd`]: a real etcd server on loopback, stopped by its process id.
//! - [`fixture`]: fixtures as table rows, `{case, input, expected verdict,
//!   expected output}`, run through the kernel and the model by one runner.
pub mod corpus;
pub mod etcd;
pub mod fixture;
pub mod frames;
pub mod fuzz;
pub mod netns;
pub mod testbed;
pub mod wire;
