//! Any bytes as a frame from a VM and from the underlay: the kernel's
//! programs and the reference model decide alike (root: a test bed of the
//! fixtures' host; otherwise the model alone, which must not panic).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cloison_testkit::fuzz::run(data);
});
