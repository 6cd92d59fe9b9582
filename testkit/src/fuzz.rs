//! The frames fuzz target's harness (`fuzz/fuzz_targets/frames.rs`): every
//! input at a1's port, and by the uplink in XDP and in TC, through the
//! kernel's programs (BPF_PROG_TEST_RUN, in a test bed of the fixtures'
//! host) and the reference model beside them; a disagreement panics. The
//! model and the kernel keep their conntrack state from one input to the
//! next, both seeing every input in the same order. Without root only the
//! model runs, and the harness says why once.
use std::sync::{Mutex, OnceLock};

use cloison_dataplane::{
    fuzzing::{self, FramesHost},
    model::Model,
    netdev, Dataplane, UplinkHook,
};

use crate::{
    fixture::{differ, At},
    testbed::{Testbed, UPLINK},
};

/// The kernel half: the bed and its dataplane.
struct Kernel {
    _bed: Testbed,
    dp: Dataplane,
}

pub struct Differential {
    kernel: Option<Kernel>,
    model: Model<'static>,
}

static TAG: OnceLock<String> = OnceLock::new();
/// The harness's state lives in statics until exit (reachable, so the
/// sanitizer's leak check at exit does not count it).
static HOST: OnceLock<FramesHost> = OnceLock::new();
static TABLES: OnceLock<cloison_dataplane::tables::Tables> = OnceLock::new();
static STATE: Mutex<Option<Differential>> = Mutex::new(None);

/// The fuzz target's body: `data` through [`Differential::run`], the
/// harness set up on the first call.
pub fn run(data: &[u8]) {
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    state.get_or_insert_with(Differential::start).run(data);
}

/// At exit (libFuzzer ends with `exit`, which runs no destructor): the
/// bed's namespace and pins go.
extern "C" fn remove_bed() {
    if let Some(tag) = TAG.get() {
        let _ = Dataplane::purge(tag, cloison_dataplane::loader::DEFAULT_PIN_ROOT.as_ref());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", tag])
            .output();
    }
}

impl Differential {
    /// Sets up the bed (root) or the model alone; this thread enters the
    /// bed's namespace.
    pub fn start() -> Differential {
        let host = HOST.get_or_init(FramesHost::new);
        if unsafe { libc::geteuid() } != 0 {
            eprintln!(
                "frames: not root, so the kernel half is off (BPF_PROG_TEST_RUN and the test \
                 bed's namespace need CAP_BPF and CAP_NET_ADMIN): the model runs alone"
            );
            return Differential {
                kernel: None,
                model: host.model(),
            };
        }
        let tag = TAG.get_or_init(|| format!("clfz{:x}", std::process::id() & 0xffff));
        unsafe { libc::atexit(remove_bed) };
        let bed = Testbed::new(tag, &host.snap, "hv1").expect("test bed");
        let mut dp = bed.enter().expect("open the dataplane");
        dp.apply(
            &host.snap.clone().validated().expect("valid"),
            "hv1",
            UPLINK,
            UplinkHook::Xdp,
        )
        .expect("apply");
        let tables = TABLES.get_or_init(|| dp.tables().expect("tables"));
        let model = Model::new(tables, &host.snap, netdev::ifindex);
        Differential {
            kernel: Some(Kernel { _bed: bed, dp }),
            model,
        }
    }

    /// One input, everywhere it can enter.
    pub fn run(&self, data: &[u8]) {
        let Some(k) = &self.kernel else {
            fuzzing::frames(&self.model, data);
            return;
        };
        for at in [
            At::Port("pa1"),
            At::Uplink(UplinkHook::Xdp),
            At::Uplink(UplinkHook::Tc),
        ] {
            if let Err(e) = differ(&k.dp, &self.model, at, data) {
                panic!("kernel and model disagree: {e}\nframe {data:02x?}");
            }
        }
    }
}
