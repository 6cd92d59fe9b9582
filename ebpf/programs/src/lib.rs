// The eBPF object is the `cloison` binary of this crate (src/main.rs); this
// empty library exists so that `dataplane` can name the crate as a build
// dependency and be rebuilt when it changes (see aya-build).
#![no_std]
