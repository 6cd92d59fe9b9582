//! Any bytes as the body of a PUT: refused with a reason, or an object
//! that reads back from the store as itself and leaves a valid state.
#![no_main]
use std::sync::OnceLock;

use cloison_control::{desired::Desired, fuzzing};
use libfuzzer_sys::fuzz_target;

static BASE: OnceLock<Desired> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    fuzzing::api_body(BASE.get_or_init(fuzzing::base), data);
});
