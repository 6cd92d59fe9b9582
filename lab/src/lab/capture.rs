//! A packet capture on a VM's eth0.
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use cloison_dataplane::netdev;

/// A packet capture on a VM's eth0 (AF_PACKET), running until stopped.
pub struct Capture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    handle: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Capture {
    pub fn start(ns: &str) -> Result<Capture> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        let flag = stop.clone();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let into = frames.clone();
        let handle = std::thread::spawn(move || -> Result<()> {
            let ready = |r: Result<()>| {
                let ok = r.is_ok();
                let _ = tx.send(r);
                ok
            };
            if !ready(netdev::enter_netns(&ns).context("enter netns")) {
                return Ok(());
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
                return Ok(());
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
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                let n =
                    unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
                if n > 0 {
                    into.lock().unwrap().push(buf[..n as usize].to_vec());
                }
            }
            unsafe { libc::close(fd) };
            Ok(())
        });
        rx.recv().context("capture thread")??;
        Ok(Capture {
            stop,
            frames,
            handle: Some(handle),
        })
    }

    /// Waits until the frames seen so far satisfy `done`, or `timeout`
    /// passed; whether they did. A loaded machine can take its time to
    /// deliver a frame: a test that expects one waits for it this way
    /// rather than for a fixed time.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&[Vec<u8>]) -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if done(&self.frames.lock().unwrap()) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn finish(mut self) -> Result<Vec<Vec<u8>>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow::anyhow!("capture panicked"))??;
        Ok(std::mem::take(&mut *self.frames.lock().unwrap()))
    }
}

pub fn contains(frame: &[u8], needle: &[u8]) -> bool {
    frame.windows(needle.len()).any(|w| w == needle)
}
