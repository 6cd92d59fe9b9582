//! Batched hash-map operations (BPF_MAP_{LOOKUP,UPDATE,DELETE}_BATCH): one
//! system call for thousands of entries where aya offers one per entry. The
//! loader reads, writes and deletes its hash maps through these.
use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::{maps::Map, Ebpf, Pod};

use crate::Error;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries per system call.
const CHUNK: usize = 4096;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: attr is a valid bpf_attr prefix for the batch commands; the
    // pointers in it point to buffers of `count` entries that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn map_fd(ebpf: &Ebpf, name: &str) -> Result<u32, Error> {
    match ebpf.map(name) {
        Some(Map::HashMap(m)) | Some(Map::LruHashMap(m)) => Ok(m.fd().as_fd().as_raw_fd() as u32),
        Some(_) => Err(Error::Invalid(format!("map {name} is not a hash map"))),
        None => Err(Error::Invalid(format!("map {name} missing"))),
    }
}

fn bytes<T: Pod>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

/// A buffer the kernel writes into.
fn bytes_mut<T: Pod>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}

/// Every entry of hash map `name`.
pub fn read<K: Pod + Ord, V: Pod>(ebpf: &Ebpf, name: &str) -> Result<BTreeMap<K, V>, Error> {
    let fd = map_fd(ebpf, name)?;
    let mut out = BTreeMap::new();
    // SAFETY: Pod types are valid for any bytes, zeroes included.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    // The kernel's batch cursor (a bucket index for hash maps).
    let (mut cursor_in, mut cursor_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &mut cursor_in as *mut u64 as u64
            },
            out_batch: &mut cursor_out as *mut u64 as u64,
            keys: bytes_mut(&mut keys),
            values: bytes_mut(&mut values),
            count: CHUNK as u32,
            map_fd: fd,
            ..Default::default()
        };
        let res = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        for i in 0..n {
            out.insert(keys[i], values[i]);
        }
        match res {
            Ok(()) => {}
            // ENOENT: no more entries (those of this call are in `count`).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => {
                return Err(Error::Io {
                    what: format!("batch lookup in {name}"),
                    source: e,
                })
            }
        }
        cursor_in = cursor_out;
        first = false;
    }
}

/// Inserts or replaces `entries` in hash map `name`.
pub fn update<K: Pod, V: Pod>(ebpf: &Ebpf, name: &str, entries: &[(K, V)]) -> Result<(), Error> {
    let fd = map_fd(ebpf, name)?;
    for chunk in entries.chunks(CHUNK) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr {
            keys: bytes(&keys),
            values: bytes(&values),
            count: chunk.len() as u32,
            map_fd: fd,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr).map_err(|e| Error::Io {
            what: format!(
                "batch update of {name} ({} of {} done)",
                attr.count,
                chunk.len()
            ),
            source: e,
        })?;
    }
    Ok(())
}

/// [`update`], carrying on past entries the kernel refuses (a full map):
/// every other entry is written. Returns the refused ones' count and the
/// first error.
pub fn update_each<K: Pod, V: Pod>(
    ebpf: &Ebpf,
    name: &str,
    entries: &[(K, V)],
) -> Result<(usize, Option<Error>), Error> {
    let mut failed = 0;
    let mut first = None;
    for chunk in entries.chunks(CHUNK) {
        if update(ebpf, name, chunk).is_ok() {
            continue;
        }
        for e in chunk {
            if let Err(err) = update(ebpf, name, std::slice::from_ref(e)) {
                failed += 1;
                first.get_or_insert(err);
            }
        }
    }
    Ok((failed, first))
}

/// Deletes `keys` from hash map `name` (all must exist).
pub fn delete<K: Pod>(ebpf: &Ebpf, name: &str, keys: &[K]) -> Result<(), Error> {
    let fd = map_fd(ebpf, name)?;
    for chunk in keys.chunks(CHUNK) {
        let mut attr = BatchAttr {
            keys: bytes(chunk),
            count: chunk.len() as u32,
            map_fd: fd,
            ..Default::default()
        };
        bpf(BPF_MAP_DELETE_BATCH, &mut attr).map_err(|e| Error::Io {
            what: format!("batch delete from {name}"),
            source: e,
        })?;
    }
    Ok(())
}
