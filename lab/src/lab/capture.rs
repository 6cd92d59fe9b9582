//! A packet capture on a VM's eth0.
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use anyhow::{Context, Result};
use cloison_dataplane::netdev;

/// A packet capture on a VM's eth0 (AF_PACKET), running until stopped.
pub struct Capture {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Result<Vec<Vec<u8>>>>>,
}

impl Capture {
    pub fn start(ns: &str) -> Result<Capture> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || -> Result<Vec<Vec<u8>>> {
            let ready = |r: Result<()>| {
                let ok = r.is_ok();
                let _ = tx.send(r);
                ok
            };
            if !ready(netdev::enter_netns(&ns).context("enter netns")) {
                return Ok(vec![]);
            }
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            if fd < 0 {
                ready(Err(std::io::Error::last_os_error().into()));
                return Ok(vec![]);
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
            }
            let _ = tx.send(Ok(()));
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                let n =
                    unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            unsafe { libc::close(fd) };
            Ok(frames)
        });
        rx.recv().context("capture thread")??;
        Ok(Capture {
            stop,
            handle: Some(handle),
        })
    }

    pub fn finish(mut self) -> Result<Vec<Vec<u8>>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow::anyhow!("capture panicked"))?
    }
}

pub fn contains(frame: &[u8], needle: &[u8]) -> bool {
    frame.windows(needle.len()).any(|w| w == needle)
}
