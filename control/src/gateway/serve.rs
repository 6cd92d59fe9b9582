//! The agent's end of the steering: reads what the port programs hand to
//! the service tap, finds the port from the ifindex in the destination MAC
//! (the interface the frame entered by, never anything the VM wrote), as
//! the kernel knows it: the ifindex → port map of the last apply, so that
//! a renamed or recreated interface never answers as another port; and
//! writes each answer back to the tap with that ifindex in its source MAC:
//! the tap's program sends it to that port only, from the gateway's MAC.
//! One task for the host; every answer is counted, and so is every frame
//! left unanswered, with why.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    os::fd::{AsRawFd, OwnedFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use cloison_abi::{gateway_mac, steer_mac, steered_ifindex};
use cloison_dataplane::{Network, Port};
use tokio::{io::unix::AsyncFd, sync::watch};

use super::{dhcp, dhcp6, metadata, ra};
use crate::{desired::Desired, reconcile::Applied};

/// Unsolicited router advertisements to each port this often (RFC 4861's
/// MaxRtrAdvInterval may be up to 1800 s; the router lifetime is three
/// periods).
pub const RA_EVERY: Duration = Duration::from_secs(600);

/// Requests seen by each gateway service, by outcome ("answered", or why
/// not): `cloison_gateway_requests_total` in `/metrics`.
#[derive(Default)]
pub struct Counters {
    counts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Counters {
    pub fn count(&self, service: &'static str, outcome: &'static str) {
        *self
            .counts
            .lock()
            .expect("counters")
            .entry((service, outcome))
            .or_default() += 1;
    }

    pub fn get(&self, service: &'static str, outcome: &'static str) -> u64 {
        let c = self.counts.lock().expect("counters");
        c.get(&(service, outcome)).copied().unwrap_or(0)
    }

    pub fn all(&self) -> Vec<((&'static str, &'static str), u64)> {
        let c = self.counts.lock().expect("counters");
        c.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// What the service knows of a local port.
#[derive(Clone)]
pub struct Local {
    pub port: Port,
    pub network: Network,
}

/// The ports the kernel holds for this host, by ifindex, with their
/// objects as the desired state has them.
#[derive(Default)]
struct Ports {
    generation: Option<u64>,
    applied: Arc<BTreeMap<u32, String>>,
    by_ifindex: HashMap<u32, Arc<Local>>,
}

impl Ports {
    fn refresh(&mut self, state: &Desired, applied: &Arc<BTreeMap<u32, String>>) {
        if self.generation == Some(state.generation) && Arc::ptr_eq(&self.applied, applied) {
            return;
        }
        self.generation = Some(state.generation);
        self.applied = applied.clone();
        self.by_ifindex.clear();
        let Ok(valid) = &state.valid else { return };
        let nets: HashMap<&str, &Network> = valid
            .networks
            .iter()
            .map(|n| (n.name.as_str(), n))
            .collect();
        let ports: HashMap<&str, &Port> =
            valid.ports.iter().map(|p| (p.name.as_str(), p)).collect();
        for (ifindex, name) in applied.iter() {
            let Some(p) = ports.get(name.as_str()) else {
                continue; // deleted: its entry goes with the next apply
            };
            if let Some(n) = nets.get(p.network.as_str()) {
                self.by_ifindex.insert(
                    *ifindex,
                    Arc::new(Local {
                        port: (*p).clone(),
                        network: (*n).clone(),
                    }),
                );
            }
        }
    }
}

pub struct Service {
    tap: AsyncFd<OwnedFd>,
    desired: watch::Receiver<Arc<Desired>>,
    applied: watch::Receiver<Applied>,
    counters: Arc<Counters>,
    ports: Ports,
    metadata: metadata::Metadata,
}

/// What kind of request a steered frame is (as the port program chose it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dhcp4,
    Dhcp6,
    Solicitation,
    Metadata,
}

fn kind_of(f: &[u8]) -> Option<Kind> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    match ethertype {
        0x0800 => {
            let ihl = usize::from(f.get(14)? & 0x0f) * 4;
            match f.get(23)? {
                17 if f.get(14 + ihl + 2..14 + ihl + 4)? == 67u16.to_be_bytes() => {
                    Some(Kind::Dhcp4)
                }
                6 => Some(Kind::Metadata),
                _ => None,
            }
        }
        0x86dd => match f.get(20)? {
            58 => Some(Kind::Solicitation),
            17 => Some(Kind::Dhcp6),
            _ => None,
        },
        _ => None,
    }
}

impl Service {
    pub fn new(
        tap: OwnedFd,
        desired: watch::Receiver<Arc<Desired>>,
        applied: watch::Receiver<Applied>,
        counters: Arc<Counters>,
        metadata: metadata::Config,
    ) -> io::Result<Service> {
        Ok(Service {
            // SAFETY: an OwnedFd stays open, and is the same descriptor, for
            // as long as the AsyncFd that owns it.
            tap: unsafe { AsyncFd::register_with_interest(tap, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?,
            desired,
            applied,
            counters,
            ports: Ports::default(),
            metadata: metadata::Metadata::new(metadata),
        })
    }

    /// Serves until the tap fails.
    pub async fn run(mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 65536];
        let mut adverts = tokio::time::interval(RA_EVERY);
        loop {
            let wake = self.metadata.next_poll();
            tokio::select! {
                ready = self.tap.readable() => {
                    ready?.clear_ready();
                    // Drained until the kernel says there is nothing more
                    // (the readiness was cleared first: nothing is missed).
                    loop {
                        match read(self.tap.get_ref(), &mut buf) {
                            Ok(n) => self.handle(&buf[..n]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                _ = adverts.tick() => self.advertise(),
                _ = tokio::time::sleep(wake) => {}
                Some(done) = self.metadata.finished() => self.metadata.deliver(done),
            }
            for (_, frame) in self.metadata.poll() {
                self.send(&frame, "metadata");
            }
        }
    }

    fn send(&self, frame: &[u8], service: &'static str) {
        if let Err(e) = write(self.tap.get_ref(), frame) {
            tracing::debug!(error = %e, service, "write to the service tap");
            self.counters.count(service, "tap_write_failed");
        }
    }

    fn handle(&mut self, frame: &[u8]) {
        let Some(ifindex) = frame
            .get(..6)
            .and_then(|m| steered_ifindex(m.try_into().expect("6 bytes")))
        else {
            // The host's own chatter on the tap (it has no IPv6, no address).
            self.counters.count("steering", "not_steered");
            return;
        };
        self.refresh();
        let Some(local) = self.ports.by_ifindex.get(&ifindex).cloned() else {
            self.counters.count("steering", "unknown_port");
            return;
        };
        let tap_mac = steer_mac(ifindex);
        let gw = gateway_mac(local.network.vni);
        match kind_of(frame) {
            Some(Kind::Dhcp4) => {
                // The answer's source MAC names the port; the kernel writes
                // the gateway's in its place.
                let Some(lease) = dhcp::lease_for(&local.port, &local.network, tap_mac) else {
                    self.counters.count("dhcpv4", "no_ipv4_address");
                    return;
                };
                match dhcp::answer(&lease, frame) {
                    Ok(reply) => {
                        self.counters.count("dhcpv4", "answered");
                        self.send(&reply, "dhcpv4");
                    }
                    Err(why) => self.counters.count("dhcpv4", why.name()),
                }
            }
            Some(Kind::Solicitation) => {
                let Some(adv) = ra::advert_for(&local.network, gw)
                    .map(|a| a.for_port(&local.port.ips, local.port.mac))
                else {
                    self.counters.count("ra", "no_ipv6_subnet");
                    return;
                };
                match ra::answer(&adv, local.port.mac.0, tap_mac, frame) {
                    Ok(reply) => {
                        self.counters.count("ra", "answered");
                        self.send(&reply, "ra");
                    }
                    Err(why) => self.counters.count("ra", why.name()),
                }
            }
            Some(Kind::Dhcp6) => {
                let info = dhcp6::Info::of(&local.network, gw);
                match dhcp6::answer(&info, local.port.mac.0, tap_mac, frame) {
                    Ok(reply) => {
                        self.counters.count("dhcpv6", "answered");
                        self.send(&reply, "dhcpv6");
                    }
                    Err(why) => self.counters.count("dhcpv6", why.name()),
                }
            }
            Some(Kind::Metadata) => {
                if let Err(why) = self.metadata.receive(ifindex, &local, frame) {
                    self.counters.count("metadata", why);
                }
            }
            None => self.counters.count("steering", "not_a_service"),
        }
    }

    /// An unsolicited advertisement to every local port of a network with
    /// an IPv6 subnet.
    fn refresh(&mut self) {
        let state = self.desired.borrow().clone();
        let applied = self.applied.borrow().ports.clone();
        self.ports.refresh(&state, &applied);
    }

    fn advertise(&mut self) {
        self.refresh();
        let ports: Vec<(u32, Arc<Local>)> = self
            .ports
            .by_ifindex
            .iter()
            .map(|(i, l)| (*i, l.clone()))
            .collect();
        for (ifindex, local) in ports {
            if let Some(adv) = ra::advert_for(&local.network, gateway_mac(local.network.vni))
                .map(|a| a.for_port(&local.port.ips, local.port.mac))
            {
                self.counters.count("ra", "unsolicited");
                self.send(&ra::unsolicited(&adv, steer_mac(ifindex)), "ra");
            }
        }
    }
}

fn read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn write(fd: &OwnedFd, frame: &[u8]) -> io::Result<usize> {
    let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
