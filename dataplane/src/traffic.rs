//! Bench traffic without the kernel stack: the generator and sink of the
//! `cloison-bench` object. `send` runs the generator through
//! BPF_PROG_TEST_RUN in live-frames mode: the kernel builds `packets`
//! frames from the template and transmits each out of `ifindex` (in the
//! caller's network namespace) as fast as one core can. The sink, attached
//! with XDP to the receiving interface, counts and drops.
use std::time::{Duration, Instant};

use aya::{
    maps::{Array, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};

use crate::Error;

static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cloison-bench"));

/// The template headers the generator writes into every frame (Ethernet,
/// IPv4 without options, UDP).
const HDR: usize = 14 + 20 + 8;

pub struct Traffic {
    ebpf: Ebpf,
}

/// `struct xdp_md` as test-run's context: the frame (data 0, data_end its
/// length, as the kernel requires) arriving on `ingress_ifindex`.
fn xdp_ctx(len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
}

impl Traffic {
    pub fn load() -> Result<Traffic, Error> {
        let mut ebpf = EbpfLoader::new()
            .load(BENCH_OBJECT)
            .map_err(|e| Error::kernel("load the bench object")(e.into()))?;
        for name in ["cl_bench_gen", "cl_bench_sink"] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| Error::Invalid(format!("program {name} missing")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| Error::kernel(name)(e.into()))?;
            p.load()
                .map_err(|e| Error::kernel(format!("load {name}"))(e.into()))?;
        }
        Ok(Traffic { ebpf })
    }

    /// Attaches the sink to `iface` (in this thread's namespace), driver mode.
    pub fn attach_sink(&mut self, iface: &str) -> Result<(), Error> {
        let p: &mut Xdp = self
            .ebpf
            .program_mut("cl_bench_sink")
            .expect("loaded")
            .try_into()
            .map_err(|e: aya::programs::ProgramError| Error::kernel("sink")(e.into()))?;
        p.attach(iface, XdpMode::Driver)
            .map_err(|e| Error::kernel(format!("attach the sink to {iface}"))(e.into()))?;
        Ok(())
    }

    fn count(&self, index: u32) -> Result<u64, Error> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("BENCH_COUNTS").expect("bench map"))
                .map_err(|e| Error::kernel("BENCH_COUNTS")(e.into()))?;
        let v = m
            .get(&index, 0)
            .map_err(|e| Error::kernel("read BENCH_COUNTS")(e.into()))?;
        Ok(v.iter().sum())
    }

    /// Frames the sink has counted.
    pub fn sunk(&self) -> Result<u64, Error> {
        self.count(1)
    }

    /// Sends `packets` copies of `frame` (UDP source port cycling through
    /// `flows` values) out of `ifindex`; returns how long the kernel took.
    pub fn send(
        &mut self,
        ifindex: u32,
        frame: &[u8],
        packets: u32,
        flows: u32,
    ) -> Result<Duration, Error> {
        self.send_flows(ifindex, frame, packets, (flows, 1))
    }

    /// [`send`](Self::send) with `flows` = (source ports, destination
    /// ports): each destination port, from the frame's, after a whole round
    /// of source ports; the sink counts destination ports up to 1,032.
    pub fn send_flows(
        &mut self,
        ifindex: u32,
        frame: &[u8],
        packets: u32,
        flows: (u32, u32),
    ) -> Result<Duration, Error> {
        if frame.len() < HDR || frame[12..14] != [8, 0] || frame[14] != 0x45 || frame[23] != 17 {
            return Err(Error::Invalid(
                "the generator takes Ethernet + IPv4 (no options) + UDP frames".into(),
            ));
        }
        {
            let mut f: Array<_, u32> =
                Array::try_from(self.ebpf.map_mut("BENCH_FLOWS").expect("bench map"))
                    .map_err(|e| Error::kernel("BENCH_FLOWS")(e.into()))?;
            for (i, n) in [flows.0, flows.1].into_iter().enumerate() {
                f.set(i as u32, n, 0)
                    .map_err(|e| Error::kernel("write BENCH_FLOWS")(e.into()))?;
            }
        }
        {
            let mut t: Array<_, [u8; HDR]> =
                Array::try_from(self.ebpf.map_mut("BENCH_TEMPLATE").expect("bench map"))
                    .map_err(|e| Error::kernel("BENCH_TEMPLATE")(e.into()))?;
            let h: [u8; HDR] = frame[..HDR].try_into().expect("checked length");
            t.set(0, h, 0)
                .map_err(|e| Error::kernel("write BENCH_TEMPLATE")(e.into()))?;
        }
        let p: &Xdp = self
            .ebpf
            .program("cl_bench_gen")
            .expect("loaded")
            .try_into()
            .map_err(|e: aya::programs::ProgramError| Error::kernel("generator")(e.into()))?;
        let ctx = xdp_ctx(frame.len(), ifindex);
        let t = Instant::now();
        p.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat: packets,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..Default::default()
        })
        .map_err(|e| Error::kernel("live frames")(e.into()))?;
        Ok(t.elapsed())
    }
}
