//! Any pinned map read as bytes, whatever its types: its keys (how full it
//! is, for `/metrics`) and its whole contents (to compare a map before and
//! after, as the trace tests do). Through the bpf(2) syscall's element
//! commands on the map's descriptor; nothing is written.
use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::maps::{MapData, MapType};

use crate::Error;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `union bpf_attr` as the element commands read it.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut ElemAttr) -> std::io::Result<()> {
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A (key, value) pair, as bytes.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One pinned map: its shape, from the kernel.
pub struct RawMap {
    data: MapData,
    pub map_type: MapType,
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: u32,
}

impl RawMap {
    pub fn open(pin: &Path) -> Result<RawMap, Error> {
        let what = || format!("open the pinned map {}", pin.display());
        let data = MapData::from_pin(pin).map_err(|e| Error::kernel(what())(e.into()))?;
        let info = data.info().map_err(|e| Error::kernel(what())(e.into()))?;
        let map_type = info
            .map_type()
            .map_err(|e| Error::kernel(what())(e.into()))?;
        Ok(RawMap {
            map_type,
            key_size: info.key_size() as usize,
            value_size: info.value_size() as usize,
            max_entries: info.max_entries(),
            data,
        })
    }

    /// Whether each CPU has its own value.
    pub fn per_cpu(&self) -> bool {
        matches!(
            self.map_type,
            MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash
        )
    }

    /// Whether every index always holds a value (an array's entries are its
    /// capacity, used or not).
    pub fn is_array(&self) -> bool {
        matches!(self.map_type, MapType::Array | MapType::PerCpuArray)
    }

    fn fd(&self) -> u32 {
        self.data.fd().as_fd().as_raw_fd() as u32
    }

    /// Every key, in the kernel's order. A map changing meanwhile may show
    /// a key twice or miss one (as `bpftool map dump` would).
    pub fn keys(&self) -> Result<Vec<Vec<u8>>, Error> {
        let mut out = Vec::new();
        let mut next = vec![0u8; self.key_size];
        let mut prev: Option<Vec<u8>> = None;
        loop {
            let mut attr = ElemAttr {
                map_fd: self.fd(),
                _pad: 0,
                key: prev.as_ref().map_or(0, |k| k.as_ptr() as u64),
                value: next.as_mut_ptr() as u64,
                flags: 0,
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(()) => {
                    out.push(next.clone());
                    prev = Some(next.clone());
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => return Err(Error::kernel("walk a map's keys")(e.into())),
            }
            if out.len() > self.max_entries as usize * 2 {
                return Err(Error::Invalid("a map's keys do not end".into()));
            }
        }
    }

    /// How many entries it holds.
    pub fn entries(&self) -> Result<usize, Error> {
        if self.is_array() {
            return Ok(self.max_entries as usize);
        }
        Ok(self.keys()?.len())
    }

    /// Every (key, value) pair, values of all CPUs one after the other;
    /// sorted by key.
    pub fn dump(&self) -> Result<Vec<Entry>, Error> {
        let cpus = if self.per_cpu() {
            aya::util::nr_cpus().map_err(|(_, e)| Error::io("count the CPUs")(e))?
        } else {
            1
        };
        let size = if self.per_cpu() {
            self.value_size.div_ceil(8) * 8 * cpus
        } else {
            self.value_size
        };
        let mut out = Vec::new();
        for k in self.keys()? {
            let mut v = vec![0u8; size];
            let mut attr = ElemAttr {
                map_fd: self.fd(),
                _pad: 0,
                key: k.as_ptr() as u64,
                value: v.as_mut_ptr() as u64,
                flags: 0,
            };
            match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
                Ok(()) => out.push((k, v)),
                // Gone since its key was read.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(Error::kernel("read a map entry")(e.into())),
            }
        }
        out.sort();
        Ok(out)
    }
}
