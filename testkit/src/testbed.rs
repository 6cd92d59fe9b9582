//! A one-host test bed for fixtures and benches: a network namespace of its
//! own with a veth per local port of the snapshot, a veth uplink at
//! 192.0.2.1/24 whose next hop 192.0.2.2 is a permanent neighbour (so the
//! encapsulation's FIB lookup has a known answer), and a pinned dataplane.
//! Everything it creates is removed on drop.
use std::process::Command;

use cloison_dataplane::{loader::DEFAULT_PIN_ROOT, netdev, Dataplane, Error, Snapshot};

/// The uplink's name inside the test bed.
pub const UPLINK: &str = "up0";
/// The MAC of the uplink's next hop (the outer destination MAC of encap).
pub const NEXT_HOP_MAC: [u8; 6] = [2, 0xaa, 0, 0, 0, 2];

pub struct Testbed {
    pub ns: String,
    pub pin: String,
}

fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::Invalid(format!("run ip: {e}")))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

fn sysctl(ns: &str, setting: &str) -> Result<(), Error> {
    let ok = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw", setting])
        .status()
        .map_err(|e| Error::Invalid(format!("sysctl: {e}")))?;
    if !ok.success() {
        return Err(Error::Invalid(format!("sysctl {setting} failed in {ns}")));
    }
    Ok(())
}

impl Testbed {
    /// Creates the namespace `tag` and the interfaces of `host`'s ports in `snap`.
    pub fn new(tag: &str, snap: &Snapshot, host: &str) -> Result<Testbed, Error> {
        let bed = Testbed {
            ns: tag.to_string(),
            pin: tag.to_string(),
        };
        let ns = bed.ns.as_str();
        ip(&["netns", "add", ns])?;
        // No IPv6 on the bed's own interfaces: their router solicitations
        // and reports would reach the port programs and move drop counters
        // in the middle of a fixture. The frames under test are injected.
        sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1")?;
        sysctl(ns, "net.ipv6.conf.default.disable_ipv6=1")?;
        ip(&[
            "-n", ns, "link", "add", UPLINK, "type", "veth", "peer", "name", "up1",
        ])?;
        ip(&["-n", ns, "addr", "add", "192.0.2.1/24", "dev", UPLINK])?;
        for dev in [UPLINK, "up1", "lo"] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        // A hypervisor that routes: the FIB helper answers with the next
        // hop's MAC. (Hosts with forwarding off are covered by the lab.)
        sysctl(ns, "net.ipv4.conf.up0.forwarding=1")?;
        let mac = cloison_dataplane::MacAddr(NEXT_HOP_MAC).to_string();
        ip(&[
            "-n",
            ns,
            "neigh",
            "add",
            "192.0.2.2",
            "lladdr",
            &mac,
            "dev",
            UPLINK,
            "nud",
            "permanent",
        ])?;
        for p in snap.ports.iter().filter(|p| p.host == host) {
            let (name, peer) = (p.interface.as_str(), format!("{}v", p.interface));
            ip(&[
                "-n", ns, "link", "add", name, "type", "veth", "peer", "name", &peer,
            ])?;
            ip(&["-n", ns, "link", "set", name, "up"])?;
            ip(&["-n", ns, "link", "set", &peer, "up"])?;
        }
        Ok(bed)
    }

    /// Enters the namespace (this thread only) and opens its dataplane.
    pub fn enter(&self) -> Result<Dataplane, Error> {
        self.enter_with_conntrack(cloison_abi::MAX_CONNTRACK)
    }

    /// [`Self::enter`] with a conntrack table of `entries`.
    pub fn enter_with_conntrack(&self, entries: u32) -> Result<Dataplane, Error> {
        self.enter_with_sizes(entries, &[])
    }

    /// [`Self::enter`] with a conntrack table of `entries` and the maps
    /// named in `sizes` created with those capacities (a test that fills a
    /// table on purpose). Maps pinned already keep their sizes.
    pub fn enter_with_sizes(
        &self,
        entries: u32,
        sizes: &[(&str, u32)],
    ) -> Result<Dataplane, Error> {
        netdev::enter_netns(&self.ns)
            .map_err(|e| Error::Invalid(format!("enter netns {}: {e}", self.ns)))?;
        Dataplane::open_with_sizes(&self.pin, DEFAULT_PIN_ROOT.as_ref(), entries, sizes)
    }

    /// Unpins this bed's dataplane (its maps start empty at the next enter).
    pub fn purge(&self) -> Result<(), Error> {
        Dataplane::purge(&self.pin, DEFAULT_PIN_ROOT.as_ref())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Dataplane::purge(&self.pin, DEFAULT_PIN_ROOT.as_ref());
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}
