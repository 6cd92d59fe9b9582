//! Loads the BPF object, pins its maps and links under
//! `/sys/fs/bpf/cloison/<host>/`, attaches programs, and applies snapshots
//! to the maps as a diff. A second `open` of the same host reuses the pinned
//! maps (their contents survive) and swaps the programs behind the pinned
//! links atomically (`bpf_link_update`), so traffic never stops.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    util::nr_cpus,
    Ebpf, EbpfLoader, Pod,
};
use cloison_abi::{map_names as M, maps, program_names as P, MapDef, *};

use crate::{
    batch, bpffs, netdev,
    plan::{self, Current, Diffs, Purge, Step, Table},
    tables::{self, Compiled, ConntrackLimits, Tables},
    validate::Valid,
    Error,
};

/// The BPF object built by build.rs from ebpf/programs.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cloison"));

/// The trace build of the same programs (ebpf/programs/src/trace.rs): run
/// by test-run on the live maps, it writes none of them and records what
/// each stage found.
static TRACE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cloison-trace"));

/// The embedded BPF object (for the layout checks).
pub fn bpf_object() -> &'static [u8] {
    BPF_OBJECT
}

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/cloison";

/// Where the uplink stage runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum UplinkHook {
    /// XDP in driver mode on a NIC whose frames XDP sees whole (see
    /// [`netdev::DriverInfo::xdp_sees_wire_frames`]) and whose driver takes
    /// it; TC on every other uplink (veth, tun, bridge, bond, ...).
    #[default]
    Auto,
    Xdp,
    Tc,
}

impl UplinkHook {
    /// The flag value (`--uplink-hook`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Xdp => "xdp",
            Self::Tc => "tc",
        }
    }
}

impl FromStr for UplinkHook {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auto" => Ok(Self::Auto),
            "xdp" => Ok(Self::Xdp),
            "tc" => Ok(Self::Tc),
            _ => Err(Error::Invalid(format!(
                "uplink hook {s:?}: expected auto, xdp or tc"
            ))),
        }
    }
}

/// What an apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Map entries written or deleted.
    pub map_updates: usize,
    pub ports_attached: Vec<String>,
    pub ports_detached: Vec<u32>,
    pub pending: Vec<String>,
    /// Ports never attached: their interface is the uplink or a host device.
    pub refused: Vec<(String, String)>,
    pub uplink_hook: Option<&'static str>,
    /// Conntrack and fragment entries deleted because what they belonged
    /// to went or changed (and what was over a shrunk share).
    pub purged: usize,
    /// What the kernel refused (the rest was applied): the apply is
    /// incomplete, and is tried again.
    pub failures: Vec<String>,
    /// The ports whose entries this apply wrote, by the ifindex of their
    /// interface: what the port programs know each interface as.
    pub local_ports: Vec<(u32, String)>,
    /// Floating IPs this apply brought to this host, announced with a
    /// gratuitous ARP out of the external interface.
    pub announced: Vec<std::net::Ipv4Addr>,
    /// What went wrong without leaving the maps incomplete (an
    /// announcement not sent: the outside learns the address when its
    /// neighbour entry expires instead).
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets dropped per reason, all CPUs, all ports and the uplink.
    pub drops: BTreeMap<DropReason, u64>,
    /// Counters per port ifindex.
    pub ports: BTreeMap<u32, PortStats>,
    /// Drops per port ifindex and reason.
    pub port_drops: BTreeMap<u32, BTreeMap<DropReason, u64>>,
}

/// The verdicts a test run returns ([`RunResult::verdict`]): the kernel's
/// `TC_ACT_*` and `xdp_action` values.
pub mod verdict {
    pub const TC_ACT_OK: u32 = 0;
    pub const TC_ACT_SHOT: u32 = 2;
    pub const TC_ACT_REDIRECT: u32 = 7;
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
    pub const XDP_REDIRECT: u32 = 4;
}

/// Result of one BPF_PROG_TEST_RUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    pub verdict: u32,
    pub frame: Vec<u8>,
    /// The kernel's time per run of the program (the average over repeats).
    pub duration: std::time::Duration,
}

pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    access: Access,
    /// The writer's lock on the pin directory (see [`lock_pins`]), held
    /// while this handle lives; `None` for a read-only one.
    _lock: Option<fs::File>,
    ct_limits: ConntrackLimits,
    /// Entries of the conntrack table (as created; a restart keeps the size).
    ct_capacity: u32,
    /// The trace object over the same pinned maps, loaded on first use.
    tracer: std::sync::Mutex<Option<Ebpf>>,
}

/// What the trace build of a program did with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelTrace {
    pub run: RunResult,
    /// The stages' steps, in order (see [`cloison_abi::trace`]).
    pub steps: Vec<TraceStep>,
    /// The record was full: later steps are missing.
    pub cut: bool,
}

fn link_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// What a [`Dataplane`] handle may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Programs loaded, maps written: the one writer of a host.
    Programs,
    /// Maps only, written (conntrack ageing), with the writer's lock.
    Maps,
    /// Maps only, read.
    ReadOnly,
}

/// The writer's lock of a host's pins: an exclusive `flock` on its pin
/// directory, so that a second writer (another agent, `cloison-dp apply`
/// or `ct-gc` beside a running agent) is refused instead of racing it. The
/// kernel drops it when the holder exits, however it exits.
fn lock_pins(pin_dir: &Path, host: &str) -> Result<fs::File, Error> {
    use std::os::fd::AsRawFd;
    fs::create_dir_all(pin_dir).map_err(Error::io(format!("create {}", pin_dir.display())))?;
    let dir = fs::File::open(pin_dir).map_err(Error::io(format!("open {}", pin_dir.display())))?;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::Invalid(format!(
                "another process is writing the dataplane of host {host} ({} is locked: \
                 its cloisond, or a cloison-dp apply/ct-gc): stop it first; stats and \
                 conntrack listings read without the lock",
                pin_dir.display()
            )));
        }
        return Err(Error::io(format!("lock {}", pin_dir.display()))(err));
    }
    Ok(dir)
}

/// Entries of the conntrack table pinned in `pin_dir`, if there is one (a
/// pinned table keeps the size it was created with).
fn pinned_ct_entries(pin_dir: &Path) -> Result<Option<u32>, Error> {
    let pinned = pin_dir.join(M::CONNTRACK);
    if !pinned.exists() {
        return Ok(None);
    }
    aya::maps::MapData::from_pin(&pinned)
        .and_then(|m| m.info())
        .map(|i| Some(i.max_entries()))
        .map_err(|e| Error::kernel("read the pinned conntrack table")(e.into()))
}

fn host_dir(pin_root: &Path, host: &str) -> Result<PathBuf, Error> {
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(Error::Invalid(format!("host name {host:?}")));
    }
    Ok(pin_root.join(host))
}

impl Dataplane {
    /// Loads the programs for `host`, reusing its pinned maps and swapping
    /// the programs of its pinned links.
    pub fn open(host: &str, pin_root: &Path) -> Result<Self, Error> {
        Self::open_with_conntrack(host, pin_root, MAX_CONNTRACK)
    }

    /// [`Self::open`], creating the conntrack table with `entries` entries
    /// if it does not exist yet (a pinned table keeps the size it has).
    pub fn open_with_conntrack(host: &str, pin_root: &Path, entries: u32) -> Result<Self, Error> {
        Self::open_with_sizes(host, pin_root, entries, &[])
    }

    /// [`Self::open_with_conntrack`], creating the maps named in `sizes`
    /// with those capacities (tests that fill a table on purpose).
    pub fn open_with_sizes(
        host: &str,
        pin_root: &Path,
        entries: u32,
        sizes: &[(&str, u32)],
    ) -> Result<Self, Error> {
        bpffs::prepare(pin_root)?;
        let pin_dir = host_dir(pin_root, host)?;
        fs::create_dir_all(link_dir(&pin_dir))
            .map_err(Error::io(format!("create {}", pin_dir.display())))?;
        let lock = lock_pins(&pin_dir, host)?;
        let entries = pinned_ct_entries(&pin_dir)?.unwrap_or(entries);
        if entries < 1024 {
            return Err(Error::Invalid(format!(
                "a conntrack table of {entries} entries is too small"
            )));
        }
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(M::CONNTRACK, entries);
        for (name, n) in sizes {
            loader.map_max_entries(name, *n);
        }
        let mut ebpf = loader
            .load(BPF_OBJECT)
            .map_err(|e| Error::kernel("load the BPF object")(e.into()))?;
        for name in [P::PORT, P::UPLINK_TC, P::SERVICE, P::EXTERNAL, P::IPSEC] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|e| Error::kernel(format!("verify {name}"))(e.into()))?;
        }
        let xdp: &mut Xdp = program(&mut ebpf, P::UPLINK_XDP)?;
        xdp.load()
            .map_err(|e| Error::kernel(format!("verify {}", P::UPLINK_XDP))(e.into()))?;
        let mut dp = Dataplane {
            ebpf,
            pin_dir,
            access: Access::Programs,
            _lock: Some(lock),
            ct_limits: ConntrackLimits::default(),
            ct_capacity: entries,
            tracer: Default::default(),
        };
        dp.migrate_retired_ports()?;
        dp.swap_pinned_links()?;
        // Maps an earlier release pinned under names since retired.
        for name in RETIRED_MAPS {
            let pin = dp.pin_dir.join(name);
            if pin.exists() {
                fs::remove_file(&pin).map_err(Error::io(format!("unpin {}", pin.display())))?;
            }
        }
        Ok(dp)
    }

    /// Moves the whole ports an earlier release kept in its own hash
    /// (abi's `SG_RETIRED_PORTS`) into the rules trie, before this
    /// object's programs, which never look there, replace the running
    /// ones: until the first apply writes the port sets, the trie allows
    /// what the old hash did (the programs look in the trie when a class
    /// has no set). The apply then moves them to the sets.
    ///
    /// Port sets pinned beside that hash were left by this release before
    /// a rollback to the earlier one, which never read or cleaned them: they
    /// are emptied first (a stale set answers before the trie, for classes
    /// since renumbered). Each port leaves the old hash once it is in the
    /// trie (the running programs look in both), so a failed upgrade rolled
    /// back finds every port in one place. Any failure fails the open
    /// before the programs are swapped.
    fn migrate_retired_ports(&mut self) -> Result<(), Error> {
        let pin = self.pin_dir.join(SG_RETIRED_PORTS);
        if !pin.exists() {
            return Ok(());
        }
        let what = || Error::kernel(format!("migrate {}", pin.display()));
        let mut sets: aya::maps::HashMap<&mut MapData, SgPortSetKey, SgPortSet> =
            map_mut(&mut self.ebpf, M::SG_PORT_SETS)?;
        let stale: Vec<SgPortSetKey> = sets
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| what()(e.into()))?;
        for k in &stale {
            sets.remove(k).map_err(|e| what()(e.into()))?;
        }
        let old = MapData::from_pin(&pin).map_err(|e| what()(e.into()))?;
        let mut old: aya::maps::HashMap<MapData, SgRuleKey, u32> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(old))
                .map_err(|e| what()(e.into()))?;
        let entries: Vec<(SgRuleKey, u32)> = old
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| what()(e.into()))?;
        let mut trie: LpmTrie<&mut MapData, SgRuleKey, u32> = map_mut(&mut self.ebpf, M::SG_RULES)?;
        for (k, v) in entries {
            trie.insert(&LpmKey::new(SG_RULE_WHOLE_BITS, k), v, 0)
                .map_err(|e| what()(e.into()))?;
            old.remove(&k).map_err(|e| what()(e.into()))?;
        }
        Ok(())
    }

    /// Opens `host`'s pinned maps only, to read them (stats, conntrack,
    /// tables): no program is loaded and the running ones are left alone (an
    /// `open` swaps this binary's programs in behind the links, which an
    /// operator's `stats` must never do), no lock is taken and nothing can
    /// be written through it. Fails if nothing is pinned for `host`.
    pub fn open_maps(host: &str, pin_root: &Path) -> Result<Self, Error> {
        bpffs::prepare(pin_root)?;
        let pin_dir = host_dir(pin_root, host)?;
        let entries = pinned_ct_entries(&pin_dir)?.ok_or_else(|| {
            Error::Invalid(format!(
                "no dataplane pinned for host {host} under {}",
                pin_root.display()
            ))
        })?;
        // Loading the object creates (or here, reuses) its maps; programs
        // are only loaded into the kernel by `Program::load`, not called.
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(M::CONNTRACK, entries)
            .load(BPF_OBJECT)
            .map_err(|e| Error::kernel("open the pinned maps")(e.into()))?;
        Ok(Dataplane {
            ebpf,
            pin_dir,
            access: Access::ReadOnly,
            _lock: None,
            ct_limits: ConntrackLimits::default(),
            ct_capacity: entries,
            tracer: Default::default(),
        })
    }

    /// [`Self::open_maps`] for the maps' writer, without programs: takes the
    /// writer's lock (refused while an agent runs for `host`), and may age
    /// and flush conntrack, but not apply.
    pub fn open_maps_to_write(host: &str, pin_root: &Path) -> Result<Self, Error> {
        let lock = lock_pins(&host_dir(pin_root, host)?, host)?;
        let mut dp = Self::open_maps(host, pin_root)?;
        dp.access = Access::Maps;
        dp._lock = Some(lock);
        Ok(dp)
    }

    /// Refuses `what` on a handle that may not do it.
    fn writable(&self, what: &str) -> Result<(), Error> {
        match (self.access, what) {
            (Access::Programs, _) | (Access::Maps, "conntrack") => Ok(()),
            (Access::Maps, _) => Err(Error::Invalid(format!(
                "{what}: this dataplane was opened for its maps only (open_maps_to_write): {what} needs open"
            ))),
            (Access::ReadOnly, _) => Err(Error::Invalid(format!(
                "{what}: this dataplane was opened to read its maps only (open_maps)"
            ))),
        }
    }

    /// Entries of this host's conntrack table.
    pub fn conntrack_capacity(&self) -> u32 {
        self.ct_capacity
    }

    /// Caps the conntrack shares from the next `apply` on.
    pub fn set_conntrack_limits(&mut self, limits: ConntrackLimits) {
        self.ct_limits = limits;
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Points every pinned link at this instance's programs (upgrade).
    fn swap_pinned_links(&mut self) -> Result<(), Error> {
        for (name, path) in self.pinned_links()? {
            let pinned = match PinnedLink::from_pin(&path) {
                Ok(l) => l,
                Err(_) => {
                    let _ = fs::remove_file(&path);
                    continue;
                }
            };
            let fd: FdLink = pinned.into();
            let res = if name == "uplink-xdp" {
                let prog: &mut Xdp = program(&mut self.ebpf, P::UPLINK_XDP)?;
                fd.try_into()
                    .map_err(|e: aya::programs::links::LinkError| e.to_string())
                    .and_then(|l| prog.attach_to_link(l).map(drop).map_err(|e| e.to_string()))
            } else {
                let pname = if name == "uplink-tc" {
                    P::UPLINK_TC
                } else if name.starts_with("service-") {
                    P::SERVICE
                } else if name.starts_with("external-") {
                    P::EXTERNAL
                } else if name.starts_with("ipsec-") {
                    P::IPSEC
                } else {
                    P::PORT
                };
                let prog: &mut SchedClassifier = program(&mut self.ebpf, pname)?;
                SchedClassifierLink::try_from(fd)
                    .map_err(|e| e.to_string())
                    .and_then(|l| prog.attach_to_link(l).map(drop).map_err(|e| e.to_string()))
            };
            if let Err(e) = res {
                return Err(Error::Invalid(format!("swap program of link {name}: {e}")));
            }
        }
        Ok(())
    }

    fn pinned_links(&self) -> Result<Vec<(String, PathBuf)>, Error> {
        let dir = link_dir(&self.pin_dir);
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(Error::io(format!("read {}", dir.display())))? {
            let e = e.map_err(Error::io("read link pins"))?;
            out.push((e.file_name().to_string_lossy().into_owned(), e.path()));
        }
        out.sort();
        Ok(out)
    }

    /// Makes the maps and attachments of this host equal to what `snap`
    /// implies: what the kernel holds is read once, [`plan::plan`] orders the
    /// changes (never opening a hole), and they are carried out in order.
    pub fn apply(
        &mut self,
        snap: &Valid,
        host: &str,
        uplink: &str,
        hook: UplinkHook,
    ) -> Result<ApplyReport, Error> {
        self.writable("apply")?;
        let (current, compiled) = self.wanted(snap, host, uplink)?;
        let plan = plan::plan(&current, &compiled);
        let mut report = ApplyReport {
            pending: compiled.pending.clone(),
            refused: compiled.refused.clone(),
            map_updates: plan.map_updates(),
            local_ports: compiled
                .local_ports
                .iter()
                .map(|p| (p.ifindex, p.name.clone()))
                .collect(),
            ..Default::default()
        };
        // Every step is tried, whatever one refuses: one tenant's entries
        // that do not fit keep no other tenant's changes out, and
        // revocations (deletes, the epoch) always take effect. Writes
        // refused are tried again once the deletes have made room.
        let mut refused = Vec::new();
        for step in &plan.steps {
            if let Err(e) = self.execute(step, &plan.diffs, uplink, hook, &mut report) {
                refused.push((step.clone(), e));
            }
        }
        for (step, e) in std::mem::take(&mut refused) {
            let again = match step {
                Step::Write(_) => self.execute(&step, &plan.diffs, uplink, hook, &mut report),
                _ => Err(e),
            };
            if let Err(e) = again {
                report.failures.push(format!("{step:?}: {e}"));
            }
        }
        if !plan.purge.is_empty() {
            report.purged = self.gc(&plan.purge)?;
        }
        let arrived: Vec<[u8; 4]> = plan
            .diffs
            .fips
            .changed
            .iter()
            .map(|(ip, _)| *ip)
            .filter(|ip| !current.tables.fips.contains_key(ip))
            .collect();
        if !arrived.is_empty() {
            self.announce(&arrived, &mut report);
        }
        Ok(report)
    }

    /// A gratuitous ARP out of the external interface for each floating IP
    /// that has just come to this host (a port created here or moved
    /// here): the outside's neighbour caches then send its traffic here at
    /// once, not to the host it left when their entries expire. Without an
    /// external interface attached there is no one to tell yet.
    fn announce(&mut self, ips: &[[u8; 4]], report: &mut ApplyReport) {
        let ext = match self.external() {
            Ok(x) if x.ifindex != 0 => x,
            _ => return,
        };
        for ip in ips {
            let arp = netdev::gratuitous_arp(ext.mac, *ip);
            match netdev::send_frame(ext.ifindex, &arp) {
                Ok(()) => report.announced.push((*ip).into()),
                Err(e) => report.warnings.push(format!(
                    "announce floating IP {}: {e}",
                    std::net::Ipv4Addr::from(*ip)
                )),
            }
        }
    }

    /// How many map entries an apply of `snap` would write or delete: 0 when
    /// the kernel holds exactly what `snap` compiles to for `host`. Reads
    /// only (a read-only handle will do); in the host's network namespace.
    pub fn drift(&self, snap: &Valid, host: &str, uplink: &str) -> Result<usize, Error> {
        let (current, compiled) = self.wanted(snap, host, uplink)?;
        Ok(plan::plan(&current, &compiled).map_updates())
    }

    /// What the kernel holds, and what `snap` compiles to for `host`.
    fn wanted(&self, snap: &Valid, host: &str, uplink: &str) -> Result<(Current, Compiled), Error> {
        let uplink_ifindex = netdev::ifindex(uplink)
            .ok_or_else(|| Error::Invalid(format!("uplink interface {uplink} does not exist")))?;
        let current = self.current()?;
        let compiled = tables::compile(
            snap,
            host,
            uplink_ifindex,
            netdev::resolve,
            &current.tables.ports,
            self.ct_limits,
            self.ct_capacity,
        )?;
        Ok((current, compiled))
    }

    /// Attaches the port program to `interface` and pins the link. Until the
    /// port's entry is written, the program drops all the interface sends.
    fn attach_port(&mut self, interface: &str, ifindex: u32) -> Result<(), Error> {
        let path = link_dir(&self.pin_dir).join(format!("port-{ifindex}"));
        let prog: &mut SchedClassifier = program(&mut self.ebpf, P::PORT)?;
        let id = prog
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|err| Error::kernel(format!("attach to port {interface}"))(err.into()))?;
        pin_tc_link(prog, id, &path)
    }

    /// Puts the agent's service tap behind the port programs: `cl_service`
    /// on its TC ingress (the agent's answers, each to its port), and
    /// `CL_SERVICE` naming it with the per-port rate limit. Idempotent; a
    /// link pinned for an earlier tap is removed.
    pub fn attach_service(
        &mut self,
        tap_name: &str,
        tap_ifindex: u32,
        limit: ServiceConfig,
    ) -> Result<(), Error> {
        self.writable("attach the service tap")?;
        let want = format!("service-{tap_ifindex}");
        for (name, path) in self.pinned_links()? {
            if name.starts_with("service-") && name != want {
                fs::remove_file(&path).map_err(Error::io(format!("unpin {}", path.display())))?;
            }
        }
        let path = link_dir(&self.pin_dir).join(&want);
        if !path.exists() {
            let prog: &mut SchedClassifier = program(&mut self.ebpf, P::SERVICE)?;
            let id = prog
                .attach_with_options(
                    tap_name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|err| Error::kernel(format!("attach to {tap_name}"))(err.into()))?;
            pin_tc_link(prog, id, &path)?;
        }
        self.set_service(ServiceConfig {
            ifindex: tap_ifindex,
            ..limit
        })
    }

    /// Attaches the external interface's program (floating IPs and SNAT
    /// replies back to their ports) to `name`, first of its TC ingress
    /// programs (whatever it does not take goes on to the uplink's, or the
    /// host), and writes where outbound NAT goes.
    pub fn attach_external(&mut self, name: &str) -> Result<(), Error> {
        self.writable("attach the external interface")?;
        let ifindex = netdev::ifindex(name)
            .ok_or_else(|| Error::Invalid(format!("external interface {name} does not exist")))?;
        let mac = netdev::mac(name)
            .ok_or_else(|| Error::Invalid(format!("external interface {name} has no MAC")))?;
        let want = format!("external-{ifindex}");
        for (link, path) in self.pinned_links()? {
            if link.starts_with("external-") && link != want {
                fs::remove_file(&path).map_err(Error::io(format!("unpin {}", path.display())))?;
            }
        }
        let path = link_dir(&self.pin_dir).join(&want);
        if !path.exists() {
            let prog: &mut SchedClassifier = program(&mut self.ebpf, P::EXTERNAL)?;
            let id = prog
                .attach_with_options(
                    name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(|err| Error::kernel(format!("attach to {name}"))(err.into()))?;
            pin_tc_link(prog, id, &path)?;
        }
        let mut m: Array<&mut MapData, ExternalConfig> =
            typed_mut::<_, maps::External>(&mut self.ebpf)?;
        let ip = m.get(&0, 0).map_or([0; 4], |x| x.ip);
        m.set(
            0,
            ExternalConfig {
                ifindex,
                ip,
                mac,
                _pad: [0; 2],
            },
            0,
        )
        .map_err(|err| Error::kernel("write the external config")(err.into()))
    }

    /// Attaches the IPsec device's program (the VXLAN of ipsec peers,
    /// decrypted, to their ports) to `name` and sends what goes to ipsec
    /// peers there; `None`: there is no IPsec device (charon is not
    /// running), so nothing is sent to them at all. Idempotent; a device
    /// made again (charon restarted) gets the program again.
    pub fn attach_ipsec(&mut self, name: Option<&str>) -> Result<(), Error> {
        self.writable("attach the IPsec device")?;
        let ifindex = match name {
            Some(n) => Some(
                netdev::ifindex(n)
                    .ok_or_else(|| Error::Invalid(format!("IPsec device {n} does not exist")))?,
            ),
            None => None,
        };
        let want = ifindex.map(|i| format!("ipsec-{i}"));
        for (link, path) in self.pinned_links()? {
            if link.starts_with("ipsec-") && Some(&link) != want.as_ref() {
                fs::remove_file(&path).map_err(Error::io(format!("unpin {}", path.display())))?;
            }
        }
        if let (Some(n), Some(want)) = (name, &want) {
            let path = link_dir(&self.pin_dir).join(want);
            if !path.exists() {
                let prog: &mut SchedClassifier = program(&mut self.ebpf, P::IPSEC)?;
                let id = prog
                    .attach_with_options(
                        n,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .map_err(|err| Error::kernel(format!("attach to {n}"))(err.into()))?;
                pin_tc_link(prog, id, &path)?;
            }
        }
        let mut m: Array<&mut MapData, IpsecConfig> = typed_mut::<_, maps::Ipsec>(&mut self.ebpf)?;
        m.set(
            0,
            IpsecConfig {
                ifindex: ifindex.unwrap_or(0),
                _reserved: 0,
            },
            0,
        )
        .map_err(|err| Error::kernel("write the IPsec config")(err.into()))
    }

    /// What `CL_IPSEC` holds.
    pub fn ipsec(&self) -> Result<IpsecConfig, Error> {
        typed_ref::<Array<&MapData, IpsecConfig>, maps::Ipsec>(&self.ebpf)?
            .get(&0, 0)
            .map_err(|err| Error::kernel("read the IPsec config")(err.into()))
    }

    /// What `CL_EXTERNAL` holds.
    pub fn external(&self) -> Result<ExternalConfig, Error> {
        external_ref(&self.ebpf)?
            .get(&0, 0)
            .map_err(|err| Error::kernel("read the external config")(err.into()))
    }

    /// Runs the external interface's program on `frame` (from the outside).
    pub fn test_run_external(&self, ifindex: u32, frame: &[u8]) -> Result<RunResult, Error> {
        let prog: &SchedClassifier = program_ref(&self.ebpf, P::EXTERNAL)?;
        run_tc(prog, ifindex, frame, 0, 1)
    }

    /// Writes `CL_SERVICE` (where steered frames go, and each port's limit).
    pub fn set_service(&mut self, c: ServiceConfig) -> Result<(), Error> {
        self.writable("write the service config")?;
        let mut m: Array<&mut MapData, ServiceConfig> =
            typed_mut::<_, maps::Service>(&mut self.ebpf)?;
        m.set(0, c, 0)
            .map_err(|err| Error::kernel("write the service config")(err.into()))
    }

    /// What `CL_SERVICE` holds.
    pub fn service(&self) -> Result<ServiceConfig, Error> {
        let m: Array<&MapData, ServiceConfig> = typed_ref::<_, maps::Service>(&self.ebpf)?;
        m.get(&0, 0)
            .map_err(|err| Error::kernel("read the service config")(err.into()))
    }

    /// Runs the service tap's program on `frame`, an answer the agent wrote.
    pub fn test_run_service(&self, ifindex: u32, frame: &[u8]) -> Result<RunResult, Error> {
        let prog: &SchedClassifier = program_ref(&self.ebpf, P::SERVICE)?;
        run_tc(prog, ifindex, frame, 0, 1)
    }

    /// Closes the interfaces of `ports` (this host's, by interface name)
    /// that exist and carry no program yet: the port program goes on at
    /// once, and drops all they send until an apply writes their entries.
    /// Cheap (no map is read): run before every apply, and as soon as an
    /// interface appears, so that no interface of a port is ever open. The
    /// uplink and host devices are never touched. Returns those closed.
    pub fn close(&mut self, interfaces: &[&str], uplink: &str) -> Result<Vec<String>, Error> {
        self.writable("close")?;
        let linked: BTreeSet<u32> = self
            .pinned_links()?
            .iter()
            .filter_map(|(n, _)| n.strip_prefix("port-")?.parse().ok())
            .collect();
        let uplink = netdev::ifindex(uplink);
        let mut closed = Vec::new();
        for name in interfaces {
            let Some(iface) = netdev::resolve(name) else {
                continue;
            };
            if iface.host_device || Some(iface.ifindex) == uplink || linked.contains(&iface.ifindex)
            {
                continue;
            }
            self.attach_port(name, iface.ifindex)?;
            closed.push(name.to_string());
        }
        Ok(closed)
    }

    /// What the kernel holds for this host now.
    pub fn current(&self) -> Result<Current, Error> {
        let e = &self.ebpf;
        let cfg: Array<&MapData, HostConfig> = typed_ref::<_, maps::Config>(e)?;
        let mut port_links = BTreeMap::new();
        for (name, _) in self.pinned_links()? {
            if let Some(i) = name.strip_prefix("port-").and_then(|s| s.parse().ok()) {
                port_links.insert(i, netdev::name_of(i).is_some());
            }
        }
        Ok(Current {
            config: cfg.get(&0, 0).ok(),
            tables: Tables {
                config: HostConfig::default(),
                ports: read_hash::<maps::Ports>(e)?,
                addr_allow: read_lpm::<maps::AntiSpoof>(e)?,
                forward: read_hash::<maps::Forward>(e)?,
                neighbours: read_hash::<maps::Neighbours>(e)?,
                networks: read_hash::<maps::Networks>(e)?,
                vteps: read_hash::<maps::Vteps>(e)?,
                remote_allow: read_lpm::<maps::RemoteAllow>(e)?,
                router_ifaces: read_hash::<maps::RouterIfaces>(e)?,
                routes: read_lpm::<maps::Routes>(e)?,
                fips: read_hash::<maps::FloatingIps>(e)?,
                port_fips: read_hash::<maps::PortFloatingIps>(e)?,
                external_ip: external_ref(e)?.get(&0, 0).map_or([0; 4], |x| x.ip),
                sg: crate::policy::SgTables {
                    addrs: read_split::<SgAddrsSplit>(e)?,
                    rules: read_lpm::<maps::SgRules>(e)?,
                    port_sets: read_hash::<maps::SgPortSets>(e)?,
                },
            },
            port_links,
        })
    }

    /// Carries out one step of a plan.
    fn execute(
        &mut self,
        step: &Step,
        d: &Diffs,
        uplink: &str,
        hook: UplinkHook,
        report: &mut ApplyReport,
    ) -> Result<(), Error> {
        let e = &mut self.ebpf;
        match step {
            Step::ResetCounters(slots) => {
                let mut stats: PerCpuArray<&mut MapData, PortStats> =
                    typed_mut::<_, maps::PortCounters>(e)?;
                let cpus = nr_cpus().map_err(|(_, e)| Error::io("count CPUs")(e))?;
                for &slot in slots {
                    let zero = PerCpuValues::try_from(vec![PortStats::default(); cpus])
                        .map_err(Error::io("per-CPU values"))?;
                    stats
                        .set(slot, zero, 0)
                        .map_err(|e| Error::kernel("reset port counters")(e.into()))?;
                }
                let mut drops: PerCpuHashMap<&mut MapData, PortDropKey, u64> =
                    typed_mut::<_, maps::PortDrops>(e)?;
                let stale: Vec<PortDropKey> = drops
                    .keys()
                    .filter_map(Result::ok)
                    .filter(|k| slots.contains(&k.slot))
                    .collect();
                for k in &stale {
                    let _ = drops.remove(k);
                }
            }
            Step::ExternalIp(ip) => {
                let mut m: Array<&mut MapData, ExternalConfig> = typed_mut::<_, maps::External>(e)?;
                let mut x = m.get(&0, 0).unwrap_or_default();
                x.ip = *ip;
                m.set(0, x, 0)
                    .map_err(|err| Error::kernel("write the external IP")(err.into()))?;
            }
            Step::Config(c) => {
                let mut cfg: Array<&mut MapData, HostConfig> = typed_mut::<_, maps::Config>(e)?;
                cfg.set(0, *c, 0)
                    .map_err(|err| Error::kernel("write config")(err.into()))?;
            }
            Step::Write(t) => match t {
                Table::SgAddrs => write_split::<SgAddrsSplit>(e, &d.sg_addrs.changed)?,
                Table::SgRules => write_lpm::<maps::SgRules>(e, &d.sg_rules.changed)?,
                Table::SgPortSets => write_hash::<maps::SgPortSets>(e, &d.sg_port_sets.changed)?,
                Table::Networks => write_hash::<maps::Networks>(e, &d.networks.changed)?,
                Table::Vteps => write_hash::<maps::Vteps>(e, &d.vteps.changed)?,
                Table::Neighbours => write_hash::<maps::Neighbours>(e, &d.neighbours.changed)?,
                Table::Forward => write_hash::<maps::Forward>(e, &d.forward.changed)?,
                Table::AddrAllow => write_lpm::<maps::AntiSpoof>(e, &d.addr_allow.changed)?,
                Table::RemoteAllow => write_lpm::<maps::RemoteAllow>(e, &d.remote_allow.changed)?,
                Table::Routes => write_lpm::<maps::Routes>(e, &d.routes.changed)?,
                Table::FloatingIps => write_hash::<maps::FloatingIps>(e, &d.fips.changed)?,
                Table::PortFloatingIps => {
                    write_hash::<maps::PortFloatingIps>(e, &d.port_fips.changed)?
                }
                Table::RouterIfaces => {
                    write_hash::<maps::RouterIfaces>(e, &d.router_ifaces.changed)?
                }
                Table::Ports => write_hash::<maps::Ports>(e, &d.ports.changed)?,
            },
            Step::Delete(t) => match t {
                Table::SgAddrs => delete_split::<SgAddrsSplit>(e, &d.sg_addrs.stale)?,
                Table::SgRules => delete_lpm::<maps::SgRules>(e, &d.sg_rules.stale)?,
                Table::SgPortSets => delete_hash::<maps::SgPortSets>(e, &d.sg_port_sets.stale)?,
                Table::Networks => delete_hash::<maps::Networks>(e, &d.networks.stale)?,
                Table::Vteps => delete_hash::<maps::Vteps>(e, &d.vteps.stale)?,
                Table::Neighbours => delete_hash::<maps::Neighbours>(e, &d.neighbours.stale)?,
                Table::Forward => delete_hash::<maps::Forward>(e, &d.forward.stale)?,
                Table::AddrAllow => delete_lpm::<maps::AntiSpoof>(e, &d.addr_allow.stale)?,
                Table::RemoteAllow => delete_lpm::<maps::RemoteAllow>(e, &d.remote_allow.stale)?,
                Table::Routes => delete_lpm::<maps::Routes>(e, &d.routes.stale)?,
                Table::FloatingIps => delete_hash::<maps::FloatingIps>(e, &d.fips.stale)?,
                Table::PortFloatingIps => {
                    delete_hash::<maps::PortFloatingIps>(e, &d.port_fips.stale)?
                }
                Table::RouterIfaces => {
                    delete_hash::<maps::RouterIfaces>(e, &d.router_ifaces.stale)?
                }
                Table::Ports => delete_hash::<maps::Ports>(e, &d.ports.stale)?,
            },
            Step::Detach(ifindex) => {
                let path = link_dir(&self.pin_dir).join(format!("port-{ifindex}"));
                fs::remove_file(&path).map_err(Error::io(format!("unpin {}", path.display())))?;
                report.ports_detached.push(*ifindex);
            }
            Step::Attach(p) => {
                self.attach_port(&p.interface, p.ifindex)?;
                report.ports_attached.push(p.name.clone());
            }
            Step::Uplink => report.uplink_hook = Some(self.attach_uplink(uplink, hook)?),
        }
        Ok(())
    }

    fn attach_uplink(&mut self, uplink: &str, hook: UplinkHook) -> Result<&'static str, Error> {
        let dir = link_dir(&self.pin_dir);
        let xdp_pin = dir.join("uplink-xdp");
        let tc_pin = dir.join("uplink-tc");
        let want_xdp = match hook {
            UplinkHook::Xdp => true,
            UplinkHook::Tc => false,
            UplinkHook::Auto => netdev::driver_info(uplink).is_ok_and(|d| d.xdp_sees_wire_frames()),
        };
        if want_xdp {
            if !xdp_pin.exists() {
                let prog: &mut Xdp = program(&mut self.ebpf, P::UPLINK_XDP)?;
                let id = match prog.attach(uplink, XdpMode::Driver) {
                    Ok(id) => id,
                    Err(err) if hook == UplinkHook::Auto => {
                        warn(&format!("native XDP on {uplink} failed ({err}); using TC"));
                        return self.attach_uplink(uplink, UplinkHook::Tc);
                    }
                    Err(err) => {
                        return Err(Error::kernel(format!("attach XDP to {uplink}"))(err.into()))
                    }
                };
                let link = prog
                    .take_link(id)
                    .map_err(|err| Error::kernel("take XDP link")(err.into()))?;
                let fd: FdLink =
                    link.try_into()
                        .map_err(|err: aya::programs::links::LinkError| {
                            Error::kernel("XDP link")(err.into())
                        })?;
                fd.pin(&xdp_pin)
                    .map_err(|err| Error::kernel("pin XDP link")(err.into()))?;
            }
            if tc_pin.exists() {
                fs::remove_file(&tc_pin).map_err(Error::io("unpin uplink TC link"))?;
            }
            Ok("xdp")
        } else {
            if !tc_pin.exists() {
                if hook == UplinkHook::Auto {
                    warn(&format!(
                        "{uplink} is not a NIC (XDP could not carry the GSO frames a software device may hand it): the uplink runs in TC"
                    ));
                }
                let prog: &mut SchedClassifier = program(&mut self.ebpf, P::UPLINK_TC)?;
                let id = prog
                    .attach_with_options(
                        uplink,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|err| Error::kernel(format!("attach TC to {uplink}"))(err.into()))?;
                pin_tc_link(prog, id, &tc_pin)?;
            }
            if xdp_pin.exists() {
                fs::remove_file(&xdp_pin).map_err(Error::io("unpin uplink XDP link"))?;
            }
            Ok("tc")
        }
    }

    /// Sums the per-CPU counters.
    /// Packets dropped per reason, all CPUs (the first part of [`Self::stats`]).
    pub fn drop_counts(&self) -> Result<BTreeMap<DropReason, u64>, Error> {
        let mut out = BTreeMap::new();
        let drops: PerCpuArray<&MapData, u64> = map_ref(&self.ebpf, M::DROPS)?;
        for reason in DropReason::ALL {
            let v = drops
                .get(&(*reason as u32), 0)
                .map_err(|e| Error::kernel("read drops")(e.into()))?;
            let total: u64 = v.iter().sum();
            if total > 0 {
                out.insert(*reason, total);
            }
        }
        Ok(out)
    }

    pub fn stats(&self) -> Result<Stats, Error> {
        let mut out = Stats {
            drops: self.drop_counts()?,
            ..Stats::default()
        };
        let ports: HashMap<&MapData, u32, PortInfo> = map_ref(&self.ebpf, M::PORTS)?;
        let stats: PerCpuArray<&MapData, PortStats> = map_ref(&self.ebpf, M::PORT_STATS)?;
        for (ifindex, info) in ports.iter().filter_map(Result::ok) {
            let v = stats
                .get(&info.slot, 0)
                .map_err(|e| Error::kernel("read port stats")(e.into()))?;
            let mut sum = PortStats::default();
            for s in v.iter() {
                sum += *s;
            }
            out.ports.insert(ifindex, sum);
        }
        let by_slot: BTreeMap<u32, u32> = ports
            .iter()
            .filter_map(Result::ok)
            .map(|(ifindex, info)| (info.slot, ifindex))
            .collect();
        let port_drops: PerCpuHashMap<&MapData, PortDropKey, u64> =
            map_ref(&self.ebpf, M::PORT_DROPS)?;
        for (k, v) in port_drops.iter().filter_map(Result::ok) {
            if let (Some(&ifindex), Some(reason)) =
                (by_slot.get(&k.slot), DropReason::from_index(k.reason))
            {
                let total: u64 = v.iter().sum();
                *out.port_drops
                    .entry(ifindex)
                    .or_default()
                    .entry(reason)
                    .or_default() += total;
            }
        }
        Ok(out)
    }

    /// The tables the kernel holds now (for tests and `cloison-dp show`).
    pub fn tables(&self) -> Result<Tables, Error> {
        let c = self.current()?;
        Ok(Tables {
            config: c
                .config
                .ok_or_else(|| Error::Invalid("no host config written yet".into()))?,
            ..c.tables
        })
    }

    /// Every conntrack entry (live or not yet aged out).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtEntry)>, Error> {
        let m: HashMap<&MapData, CtKey, CtEntry> = map_ref(&self.ebpf, M::CONNTRACK)?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }

    /// Conntrack entries charged to each port slot and tenant index, as the
    /// programs count them (`CL_CT_USE`).
    pub fn conntrack_use(&self, index: u32) -> Result<i64, Error> {
        let m: Array<&MapData, i64> = map_ref(&self.ebpf, M::CT_USE)?;
        m.get(&index, 0)
            .map_err(|e| Error::kernel("read CL_CT_USE")(e.into()))
    }

    /// Forgets every tracked flow (their next packets are new flows again).
    pub fn conntrack_flush(&mut self) -> Result<usize, Error> {
        self.writable("conntrack")?;
        let keys: Vec<CtKey> = self.conntrack()?.into_iter().map(|(k, _)| k).collect();
        {
            let mut m: HashMap<&mut MapData, CtKey, CtEntry> =
                map_mut(&mut self.ebpf, M::CONNTRACK)?;
            for k in &keys {
                let _ = m.remove(k);
            }
        }
        self.conntrack_gc()?;
        Ok(keys.len())
    }

    /// Deletes the entries whose idle timeout has passed, trims what is
    /// over a share, and sets every quota counter to the number of live
    /// entries it is charged with (the LRU may have evicted entries behind
    /// the counters' back). The agent runs this periodically. Returns how
    /// many entries were deleted.
    pub fn conntrack_gc(&mut self) -> Result<usize, Error> {
        self.gc(&Purge {
            trim: true,
            ..Purge::default()
        })
    }

    /// [`Self::conntrack_gc`], also deleting the flows and fragments that
    /// `purge` names (what belonged to a removed or changed object).
    fn gc(&mut self, purge: &Purge) -> Result<usize, Error> {
        self.writable("conntrack")?;
        let now = monotonic_ns();
        let ports: BTreeMap<u32, PortInfo> = read_hash::<maps::Ports>(&self.ebpf)?;
        let live_slots: BTreeMap<u32, &PortInfo> = ports.values().map(|p| (p.slot, p)).collect();
        let mut gone = Vec::new();
        // Live entries by owner (slot, then tenant), oldest first for trimming.
        let mut live: Vec<(CtKey, CtEntry)> = Vec::new();
        for (k, e) in self.conntrack()? {
            let stale = ct_expired(e.state, e.last_seen_ns, now)
                || purge.slots.contains(&e.owner_slot)
                || !live_slots.contains_key(&e.owner_slot)
                || purge.covers(k.zone, &k.addr_a)
                || purge.covers(k.zone, &k.addr_b);
            if stale {
                gone.push(k);
            } else {
                live.push((k, e));
            }
        }
        if purge.trim {
            live.sort_by_key(|(_, e)| std::cmp::Reverse(e.last_seen_ns));
            let (mut by_slot, mut by_tenant) =
                (BTreeMap::<u32, u32>::new(), BTreeMap::<u32, u32>::new());
            live.retain(|(k, e)| {
                let info = live_slots[&e.owner_slot];
                let s = by_slot.entry(e.owner_slot).or_default();
                let t = by_tenant.entry(e.owner_tenant).or_default();
                if *s >= info.ct_port_quota || *t >= info.ct_tenant_quota {
                    gone.push(*k);
                    return false;
                }
                *s += 1;
                *t += 1;
                true
            });
        }
        let mut counted: BTreeMap<u32, i64> = BTreeMap::new();
        for (_, e) in &live {
            *counted.entry(e.owner_slot).or_default() += 1;
            *counted.entry(MAX_PORTS + e.owner_tenant).or_default() += 1;
        }
        {
            let mut m: HashMap<&mut MapData, CtKey, CtEntry> =
                typed_mut::<_, maps::Conntrack>(&mut self.ebpf)?;
            for k in &gone {
                // Gone already (LRU, or the program replaced it): fine.
                let _ = m.remove(k);
            }
        }
        set_counters::<maps::CtUse>(&mut self.ebpf, &counted, MAX_PORTS + MAX_TENANTS)?;

        // Fragments: the same ages and purges, charged per tenant.
        let frags: HashMap<&MapData, FragKey, FragEntry> =
            typed_ref::<_, maps::Fragments>(&self.ebpf)?;
        let mut frag_gone = Vec::new();
        let mut frag_use: BTreeMap<u32, i64> = BTreeMap::new();
        for (k, e) in frags.iter().filter_map(Result::ok) {
            if idle_longer_than(e.seen_ns, now, FRAG_TIMEOUT_NS)
                || purge.covers(k.zone, &k.src)
                || purge.covers(k.zone, &k.dst)
            {
                frag_gone.push(k);
            } else {
                *frag_use.entry(e.tenant).or_default() += 1;
            }
        }
        {
            let mut m: HashMap<&mut MapData, FragKey, FragEntry> =
                typed_mut::<_, maps::Fragments>(&mut self.ebpf)?;
            for k in &frag_gone {
                let _ = m.remove(k);
            }
        }
        set_counters::<maps::FragUse>(&mut self.ebpf, &frag_use, MAX_TENANTS)?;

        // SNAT mappings of a port gone or handed to another, or of an
        // address purged: a later port on the ifindex must not get them.
        let mapped = |zone: u32, inside: [u8; 4]| {
            purge.covers(
                zone,
                &crate::tables::ip16(std::net::Ipv4Addr::from(inside).into()),
            )
        };
        let rev: HashMap<&MapData, SnatRevKey, SnatRevEntry> =
            typed_ref::<_, maps::SnatReverse>(&self.ebpf)?;
        let rev_gone: Vec<SnatRevKey> = rev
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| {
                ports
                    .get(&v.ifindex)
                    .is_none_or(|p| purge.slots.contains(&p.slot))
                    || mapped(v.zone, v.inside)
            })
            .map(|(k, _)| k)
            .collect();
        let fwd: HashMap<&MapData, SnatKey, SnatEntry> = typed_ref::<_, maps::Snat>(&self.ebpf)?;
        let fwd_gone: Vec<SnatKey> = fwd
            .keys()
            .filter_map(Result::ok)
            .filter(|k| mapped(k.zone, k.inside))
            .collect();
        {
            let mut m: HashMap<&mut MapData, SnatRevKey, SnatRevEntry> =
                typed_mut::<_, maps::SnatReverse>(&mut self.ebpf)?;
            for k in &rev_gone {
                let _ = m.remove(k);
            }
        }
        {
            let mut m: HashMap<&mut MapData, SnatKey, SnatEntry> =
                typed_mut::<_, maps::Snat>(&mut self.ebpf)?;
            for k in &fwd_gone {
                let _ = m.remove(k);
            }
        }
        Ok(gone.len() + frag_gone.len() + rev_gone.len())
    }

    /// Runs the port program on `frame` as if it arrived from the VM on
    /// interface `ifindex` (which must exist in this namespace).
    pub fn test_run_port(
        &self,
        ifindex: u32,
        frame: &[u8],
        gso_size: u32,
    ) -> Result<RunResult, Error> {
        let prog: &SchedClassifier = program_ref(&self.ebpf, P::PORT)?;
        run_tc(prog, ifindex, frame, gso_size, 1)
    }

    /// [`Self::test_run_port`] `repeat` times in one call, for benches. The
    /// kernel runs the same input each time: what the program changes (its
    /// maps, not the input) carries from one run to the next.
    pub fn test_run_port_repeat(
        &self,
        ifindex: u32,
        frame: &[u8],
        repeat: u32,
    ) -> Result<RunResult, Error> {
        let prog: &SchedClassifier = program_ref(&self.ebpf, P::PORT)?;
        run_tc(prog, ifindex, frame, 0, repeat)
    }

    /// This host's port entries (`CL_PORTS`), by ifindex.
    pub fn port_entries(&self) -> Result<Vec<(u32, PortInfo)>, Error> {
        let m: HashMap<&MapData, u32, PortInfo> = typed_ref::<_, maps::Ports>(&self.ebpf)?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }

    /// How full each map that grows is: (name, entries, capacity). Arrays
    /// (every index always holds a value) are left out. Walks every key:
    /// its cost grows with the entries (a scrape's, not a packet's).
    pub fn map_fill(&self) -> Result<Vec<(&'static str, usize, u32)>, Error> {
        let mut out = Vec::new();
        for (name, m) in self.raw_maps()? {
            if !m.is_array() {
                out.push((name, m.entries()?, m.max_entries));
            }
        }
        Ok(out)
    }

    /// Every map of this host's dataplane that has keys (all but the
    /// monitor's ring buffer), opened by its pin: (name, map).
    pub fn raw_maps(&self) -> Result<Vec<(&'static str, crate::rawmap::RawMap)>, Error> {
        maps::ALL
            .iter()
            .filter(|m| m.kind != MapKind::RingBuf)
            .map(|m| {
                Ok((
                    m.name,
                    crate::rawmap::RawMap::open(&self.pin_dir.join(m.name))?,
                ))
            })
            .collect()
    }

    /// Sets what the programs stream to the monitor's ring buffer (all
    /// zero: nothing). Through the pin: any handle may, a read-only one too.
    pub fn set_monitor(&self, cfg: MonitorConfig) -> Result<(), Error> {
        let what = || Error::kernel("write the monitor's settings");
        let data =
            MapData::from_pin(self.pin_dir.join(M::MONITOR)).map_err(|e| what()(e.into()))?;
        let mut m: Array<MapData, MonitorConfig> =
            Array::try_from(aya::maps::Map::Array(data)).map_err(|e| what()(e.into()))?;
        m.set(0, cfg, 0).map_err(|e| what()(e.into()))
    }

    /// What the programs stream to the monitor now.
    pub fn monitor(&self) -> Result<MonitorConfig, Error> {
        let m: Array<&MapData, MonitorConfig> = typed_ref::<_, maps::Monitor>(&self.ebpf)?;
        m.get(&0, 0)
            .map_err(|e| Error::kernel("read the monitor's settings")(e.into()))
    }

    /// Events the programs could not stream (over the per-CPU rate, or the
    /// ring full), on all CPUs since the maps were created.
    pub fn monitor_lost(&self) -> Result<u64, Error> {
        let m: PerCpuArray<&MapData, MonitorBudget> =
            typed_ref::<_, maps::MonitorRate>(&self.ebpf)?;
        let v = m
            .get(&0, 0)
            .map_err(|e| Error::kernel("read the monitor's budget")(e.into()))?;
        Ok(v.iter().map(|b| b.lost).sum())
    }

    /// The monitor's ring buffer, opened by its pin (one reader at a time
    /// should consume it).
    pub fn open_events(&self) -> Result<aya::maps::RingBuf<MapData>, Error> {
        let what = || Error::kernel("open the monitor's ring buffer");
        let data = MapData::from_pin(self.pin_dir.join(M::EVENTS)).map_err(|e| what()(e.into()))?;
        aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(data)).map_err(|e| what()(e.into()))
    }

    /// Runs the trace build of the port program on `frame` from the VM on
    /// `ifindex`, on the live maps: the same stages, nothing written (no
    /// conntrack entry, counter, quota or mapping), each stage's finding
    /// recorded. Works on any handle, a read-only one included.
    pub fn trace_port(&self, ifindex: u32, frame: &[u8]) -> Result<KernelTrace, Error> {
        self.trace(P::PORT_TRACE, ifindex, frame)
    }

    /// [`Self::trace_port`] for the uplink's TC program: a frame from the
    /// underlay arriving on `ifindex`.
    pub fn trace_uplink(&self, ifindex: u32, frame: &[u8]) -> Result<KernelTrace, Error> {
        self.trace(P::UPLINK_TRACE, ifindex, frame)
    }

    fn trace(&self, name: &str, ifindex: u32, frame: &[u8]) -> Result<KernelTrace, Error> {
        let mut slot = self.tracer.lock().expect("tracer");
        if slot.is_none() {
            let mut ebpf = EbpfLoader::new()
                .default_map_pin_directory(&self.pin_dir)
                .map_max_entries(M::CONNTRACK, self.ct_capacity)
                .load(TRACE_OBJECT)
                .map_err(|e| Error::kernel("load the trace object")(e.into()))?;
            for p in [P::PORT_TRACE, P::UPLINK_TRACE] {
                let prog: &mut SchedClassifier = program(&mut ebpf, p)?;
                prog.load()
                    .map_err(|e| Error::kernel(format!("verify {p}"))(e.into()))?;
            }
            *slot = Some(ebpf);
        }
        let ebpf = slot.as_mut().expect("loaded");
        let empty = TraceRecord {
            n: 0,
            _pad: 0,
            steps: [TraceStep::default(); cloison_abi::trace::MAX_STEPS],
        };
        let mut rec: Array<&mut MapData, TraceRecord> = map_mut(ebpf, cloison_abi::trace::MAP)?;
        rec.set(0, empty, 0)
            .map_err(|e| Error::kernel("clear the trace record")(e.into()))?;
        let prog: &SchedClassifier = program_ref(ebpf, name)?;
        let run = run_tc(prog, ifindex, frame, 0, 1)?;
        let rec: Array<&MapData, TraceRecord> = map_ref(ebpf, cloison_abi::trace::MAP)?;
        let r = rec
            .get(&0, 0)
            .map_err(|e| Error::kernel("read the trace record")(e.into()))?;
        let n = (r.n as usize).min(cloison_abi::trace::MAX_STEPS);
        Ok(KernelTrace {
            run,
            steps: r.steps[..n].to_vec(),
            cut: n == cloison_abi::trace::MAX_STEPS,
        })
    }

    /// Runs an uplink program on a frame from the underlay.
    pub fn test_run_uplink(
        &self,
        hook: UplinkHook,
        ifindex: u32,
        frame: &[u8],
    ) -> Result<RunResult, Error> {
        self.test_run_uplink_repeat(hook, ifindex, frame, 1)
    }

    /// [`Self::test_run_uplink`] `repeat` times in one call, for benches.
    pub fn test_run_uplink_repeat(
        &self,
        hook: UplinkHook,
        ifindex: u32,
        frame: &[u8],
        repeat: u32,
    ) -> Result<RunResult, Error> {
        if hook == UplinkHook::Tc {
            let prog: &SchedClassifier = program_ref(&self.ebpf, P::UPLINK_TC)?;
            return run_tc(prog, ifindex, frame, 0, repeat);
        }
        let prog: &Xdp = program_ref(&self.ebpf, P::UPLINK_XDP)?;
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })
            .map_err(|e| Error::kernel("test-run XDP")(e.into()))?;
        out.truncate(r.data_size_out as usize);
        Ok(RunResult {
            verdict: r.return_value,
            frame: out,
            duration: r.duration,
        })
    }

    /// Removes everything this host's dataplane pinned: links (detaching the
    /// programs) and maps.
    pub fn purge(host: &str, pin_root: &Path) -> Result<(), Error> {
        let dir = host_dir(pin_root, host)?;
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(Error::io(format!("remove {}", dir.display())))?;
        }
        Ok(())
    }
}

/// Offsets in `struct __sk_buff` (uapi/linux/bpf.h) of the fields test-run
/// lets a caller set.
const SKB_CTX_LEN: usize = 192;
const SKB_INGRESS_IFINDEX: usize = 36;
const SKB_IFINDEX: usize = 40;
const SKB_GSO_SEGS: usize = 164;
const SKB_GSO_SIZE: usize = 176;

fn run_tc(
    prog: &SchedClassifier,
    ifindex: u32,
    frame: &[u8],
    gso_size: u32,
    repeat: u32,
) -> Result<RunResult, Error> {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_INGRESS_IFINDEX..][..4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[SKB_IFINDEX..][..4].copy_from_slice(&ifindex.to_ne_bytes());
    if gso_size > 0 {
        let segs = (frame.len() as u32).div_ceil(gso_size);
        ctx[SKB_GSO_SEGS..][..4].copy_from_slice(&segs.to_ne_bytes());
        ctx[SKB_GSO_SIZE..][..4].copy_from_slice(&gso_size.to_ne_bytes());
    }
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })
        .map_err(|e| Error::kernel("test-run TC")(e.into()))?;
    out.truncate(r.data_size_out as usize);
    Ok(RunResult {
        verdict: r.return_value,
        frame: out,
        duration: r.duration,
    })
}

fn warn(msg: &str) {
    eprintln!("cloison dataplane: {msg}");
}

fn pin_tc_link(
    prog: &mut SchedClassifier,
    id: aya::programs::tc::SchedClassifierLinkId,
    path: &Path,
) -> Result<(), Error> {
    let link = prog
        .take_link(id)
        .map_err(|e| Error::kernel("take TC link")(e.into()))?;
    let fd: FdLink = link
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| Error::kernel("TC link")(e.into()))?;
    fd.pin(path)
        .map_err(|e| Error::kernel(format!("pin {}", path.display()))(e.into()))?;
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Invalid(format!("program {name} missing from the BPF object")))?;
    p.try_into().map_err(|e: aya::programs::ProgramError| {
        Error::kernel(format!("program {name}"))(e.into())
    })
}

fn program_ref<'a, T>(ebpf: &'a Ebpf, name: &str) -> Result<&'a T, Error>
where
    &'a T: TryFrom<&'a aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program(name)
        .ok_or_else(|| Error::Invalid(format!("program {name} missing from the BPF object")))?;
    p.try_into().map_err(|e: aya::programs::ProgramError| {
        Error::kernel(format!("program {name}"))(e.into())
    })
}

fn map_ref<'a, T>(ebpf: &'a Ebpf, name: &str) -> Result<T, Error>
where
    T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .map(name)
        .ok_or_else(|| Error::Invalid(format!("map {name} missing")))?;
    T::try_from(m).map_err(|e| Error::kernel(format!("map {name}"))(e.into()))
}

fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<T, Error>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .map_mut(name)
        .ok_or_else(|| Error::Invalid(format!("map {name} missing")))?;
    T::try_from(m).map_err(|e| Error::kernel(format!("map {name}"))(e.into()))
}

/// The clock the programs stamp conntrack entries with
/// (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; the clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sets counters `0..n` of an array of counters to `want` (0 where absent),
/// writing only those that differ.
fn set_counters<M: MapDef<Key = u32, Value = i64>>(
    ebpf: &mut Ebpf,
    want: &BTreeMap<u32, i64>,
    n: u32,
) -> Result<(), Error> {
    let mut counters: Array<&mut MapData, i64> = typed_mut::<_, M>(ebpf)?;
    for i in 0..n {
        let w = want.get(&i).copied().unwrap_or(0);
        if counters.get(&i, 0).ok() != Some(w) {
            counters
                .set(i, w, 0)
                .map_err(|e| Error::kernel(format!("write {}", M::NAME))(e.into()))?;
        }
    }
    Ok(())
}

/// A map of the object, typed by its definition in `cloison_abi::maps`.
fn typed_ref<'a, T, M: MapDef>(ebpf: &'a Ebpf) -> Result<T, Error>
where
    T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    map_ref(ebpf, M::NAME)
}

fn typed_mut<'a, T, M: MapDef>(ebpf: &'a mut Ebpf) -> Result<T, Error>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    map_mut(ebpf, M::NAME)
}

fn external_ref(ebpf: &Ebpf) -> Result<Array<&MapData, ExternalConfig>, Error> {
    typed_ref::<_, maps::External>(ebpf)
}

fn read_hash<M: MapDef>(ebpf: &Ebpf) -> Result<BTreeMap<M::Key, M::Value>, Error>
where
    M::Key: Pod + Ord,
    M::Value: Pod,
{
    batch::read(ebpf, M::NAME)
}

/// Writes entries in batches, all that the kernel takes: an entry refused
/// (a full map) does not keep the others out.
fn write_hash<M: MapDef>(ebpf: &mut Ebpf, entries: &[(M::Key, M::Value)]) -> Result<(), Error>
where
    M::Key: Pod,
    M::Value: Pod,
{
    match batch::update_each(ebpf, M::NAME, entries)? {
        (0, _) => Ok(()),
        (n, e) => Err(Error::Invalid(format!(
            "{n} of {} entries not written to {}: {}",
            entries.len(),
            M::NAME,
            e.map_or_else(String::new, |e| e.to_string())
        ))),
    }
}

/// Deletes keys in batches.
fn delete_hash<M: MapDef>(ebpf: &mut Ebpf, keys: &[M::Key]) -> Result<(), Error>
where
    M::Key: Pod,
{
    batch::delete(ebpf, M::NAME, keys)
}

/// An LPM trie's entries by exact key (prefix length, data) as read: a
/// lookup is a longest-prefix match and could answer from a shorter entry.
/// An LPM trie's contents: (prefix length, key) → value.
type Lpm<K, V> = BTreeMap<(u32, K), V>;

fn read_lpm<M: MapDef>(ebpf: &Ebpf) -> Result<Lpm<M::Key, M::Value>, Error>
where
    M::Key: Pod + Ord,
    M::Value: Pod,
{
    let m: LpmTrie<&MapData, M::Key, M::Value> = map_ref(ebpf, M::NAME)?;
    Ok(m.iter()
        .filter_map(Result::ok)
        .map(|(k, v)| ((k.prefix_len(), k.data()), v))
        .collect())
}

type LpmEntry<K, V> = ((u32, K), V);

fn write_lpm<M: MapDef>(
    ebpf: &mut Ebpf,
    entries: &[LpmEntry<M::Key, M::Value>],
) -> Result<(), Error>
where
    M::Key: Pod,
    M::Value: Pod,
{
    let mut m: LpmTrie<&mut MapData, M::Key, M::Value> = map_mut(ebpf, M::NAME)?;
    let (mut failed, mut first) = (0, None);
    for &((bits, k), v) in entries {
        if let Err(e) = m.insert(&LpmKey::new(bits, k), v, 0) {
            failed += 1;
            first.get_or_insert(e);
        }
    }
    match failed {
        0 => Ok(()),
        n => Err(Error::Invalid(format!(
            "{n} of {} entries not written to {}: {}",
            entries.len(),
            M::NAME,
            first.map_or_else(String::new, |e| e.to_string())
        ))),
    }
}

fn delete_lpm<M: MapDef>(ebpf: &mut Ebpf, keys: &[(u32, M::Key)]) -> Result<(), Error>
where
    M::Key: Pod,
    M::Value: Pod,
{
    let mut m: LpmTrie<&mut MapData, M::Key, M::Value> = map_mut(ebpf, M::NAME)?;
    for &(bits, k) in keys {
        m.remove(&LpmKey::new(bits, k))
            .map_err(|e| Error::kernel(format!("delete from {}", M::NAME))(e.into()))?;
    }
    Ok(())
}

/// A table of prefixes kept in two maps: its entries that are whole keys
/// (abi's `sg_addr_whole_bits`) in a hash the programs look in first, the
/// others in an LPM trie. The plan sees one table of (prefix bits, key)
/// entries; only these functions know where each one lives.
trait SplitTable {
    type Trie: MapDef<Key = Self::Key, Value = Self::Value>;
    type Exact: MapDef<Key = Self::Key, Value = Self::Value>;
    type Key: Pod + Ord;
    type Value: Pod;
    /// The prefix bits of a whole key.
    fn whole(key: &Self::Key) -> u32;
}

struct SgAddrsSplit;
impl SplitTable for SgAddrsSplit {
    type Trie = maps::SgAddrs;
    type Exact = maps::SgHosts;
    type Key = SgAddrKey;
    type Value = u32;
    fn whole(key: &SgAddrKey) -> u32 {
        sg_addr_whole_bits(key)
    }
}

/// Both maps as one table. A whole key found in the trie (written there by
/// a version from before the split) reads the same: the programs still
/// find it, by longest prefix.
fn read_split<S: SplitTable>(ebpf: &Ebpf) -> Result<Lpm<S::Key, S::Value>, Error> {
    let mut out = read_lpm::<S::Trie>(ebpf)?;
    for (k, v) in read_hash::<S::Exact>(ebpf)? {
        out.insert((S::whole(&k), k), v);
    }
    Ok(out)
}

fn write_split<S: SplitTable>(
    ebpf: &mut Ebpf,
    entries: &[LpmEntry<S::Key, S::Value>],
) -> Result<(), Error> {
    let (exact, prefixes): (Vec<_>, Vec<_>) = entries
        .iter()
        .partition(|((bits, k), _)| *bits == S::whole(k));
    let exact: Vec<(S::Key, S::Value)> = exact.into_iter().map(|&((_, k), v)| (k, v)).collect();
    let prefixes: Vec<LpmEntry<S::Key, S::Value>> = prefixes.into_iter().copied().collect();
    let hash = write_hash::<S::Exact>(ebpf, &exact);
    write_lpm::<S::Trie>(ebpf, &prefixes)?;
    hash
}

fn delete_split<S: SplitTable>(ebpf: &mut Ebpf, keys: &[(u32, S::Key)]) -> Result<(), Error> {
    let (exact, prefixes): (Vec<_>, Vec<_>) =
        keys.iter().partition(|(bits, k)| *bits == S::whole(k));
    let exact: Vec<S::Key> = exact.into_iter().map(|&(_, k)| k).collect();
    let prefixes: Vec<(u32, S::Key)> = prefixes.into_iter().copied().collect();
    if delete_hash::<S::Exact>(ebpf, &exact).is_err() {
        // One is not in the hash: an entry from before the split, in the
        // trie. The batch stopped at it, having deleted those before it.
        // One by one, from wherever each one still is: a key in neither map
        // is one the batch deleted (these keys were all read as present).
        let mut hash: aya::maps::HashMap<&mut MapData, S::Key, S::Value> =
            map_mut(ebpf, <S::Exact as MapDef>::NAME)?;
        let not_in_hash: Vec<S::Key> = exact
            .into_iter()
            .filter(|k| hash.remove(k).is_err())
            .collect();
        let mut trie: LpmTrie<&mut MapData, S::Key, S::Value> =
            map_mut(ebpf, <S::Trie as MapDef>::NAME)?;
        for k in not_in_hash {
            let _ = trie.remove(&LpmKey::new(S::whole(&k), k));
        }
    }
    delete_lpm::<S::Trie>(ebpf, &prefixes)
}
