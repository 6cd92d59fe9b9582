//! Any bytes as security groups, ports and probes: what the validator
//! accepts compiles within its counts, and the compiled tables answer as
//! the rules read.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cloison_dataplane::fuzzing::security_groups(data);
});
