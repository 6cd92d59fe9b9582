//! `cloison-lab fuzz-seeds DIR`: the fuzz targets' seed corpora, written
//! under `DIR/<target>/` (what `cargo xtask fuzz` starts each target
//! from): the malformed-frame corpus and its valid seeds for `frames`,
//! a body of every kind (valid, and each with a fault) for `api_bodies`,
//! and a spread of byte strings for `sg_compiler`, whose decoder reads any.
use std::path::Path;

use anyhow::{Context, Result};
use cloison_testkit::corpus::{malformed, port_seeds, uplink_corpus};

fn write_all(dir: &Path, entries: impl IntoIterator<Item = Vec<u8>>) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut n = 0;
    for (i, e) in entries.into_iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:05}")), e)?;
        n += 1;
    }
    Ok(n)
}

pub fn run(dir: &str) -> Result<()> {
    let dir = Path::new(dir);
    let mut frames: Vec<Vec<u8>> = port_seeds().into_iter().map(|(_, f)| f).collect();
    frames.extend(malformed(&port_seeds()).into_iter().map(|(_, f)| f));
    frames.extend(uplink_corpus().into_iter().map(|(_, f)| f));
    let n = write_all(&dir.join("frames"), frames)?;
    let m = write_all(&dir.join("api_bodies"), cloison_control::fuzzing::seeds())?;
    // sg_compiler: 64 strings of 96 bytes from a fixed generator.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let strings = (0..64).map(|_| {
        (0..96)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>()
    });
    let k = write_all(&dir.join("sg_compiler"), strings)?;
    println!(
        "seeds: {n} frames, {m} API bodies, {k} security-group states under {}",
        dir.display()
    );
    Ok(())
}
