//! IPsec between hosts (docs/encryption.md): the agent keeps charon's
//! IKEv2 connections, over its VICI socket, in step with the fleet's hosts.
//! One connection per ipsec peer, named `cloison-<peer>`: ESP in tunnel
//! mode for the UDP between the two underlay addresses (the VXLAN the
//! programs hand to charon's IPsec device), AES-GCM-256 with ECP-384 for
//! IKE and for every rekey (PFS), authenticated by the hosts' certificates
//! (an identity is the host's underlay address, which its certificate
//! carries as a subjectAltName) under the fleet's CA. charon is the
//! system's own service: the agent restarting does not touch an SA, and
//! charon restarting gets every connection back on the agent's next turn.
//!
//! The lower address of a pair initiates as soon as the connection is
//! loaded; both sides trap the policy, so a pair whose SA went (a peer
//! restarted) is negotiated again by the first packet either sends.
//! Rekeys are make-before-break (IKEv2): the new CHILD_SA is installed
//! before the old one is deleted.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use cloison_dataplane::snapshot::Encryption;
use futures_util::{pin_mut, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::desired::Desired;

/// The proposals: IKE, then ESP (with its DH group: PFS on every rekey).
/// ANSSI's IPsec recommendations: AES-GCM, ECP groups, SHA-2.
pub const IKE_PROPOSAL: &str = "aes256gcm16-prfsha384-ecp384";
pub const ESP_PROPOSAL: &str = "aes256gcm16-ecp384";
/// The prefix of the connections the agent owns in charon.
pub const CONN_PREFIX: &str = "cloison-";
/// The CHILD_SA of each connection.
pub const CHILD: &str = "vxlan";
/// How often the agent looks at charon's SAs (status) and retries.
const TICK: Duration = Duration::from_secs(2);
/// How long one turn with charon may take (every request in it returns at
/// once: none waits for a negotiation).
const VICI_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's `--ipsec-*` flags.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This host's certificate (PEM), its subjectAltName its underlay address.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The fleet's CA (PEM).
    pub ca: PathBuf,
    /// charon's VICI socket.
    pub vici: PathBuf,
    /// CHILD_SA rekey interval (IKE SAs: 4 times it).
    pub rekey: Duration,
}

/// What `GET /v1/status` says under `encryption`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// This host's `encryption`.
    pub mode: String,
    /// charon: "connected", or why not.
    pub ike: String,
    pub peers: Vec<Peer>,
}

/// One ipsec peer, as charon has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub host: String,
    pub address: Ipv4Addr,
    /// The IKE SA's state (`ESTABLISHED`, `CONNECTING`, …) or `none`.
    pub ike: String,
    /// The CHILD_SA's (`INSTALLED`, `REKEYING`, …) or `none`.
    pub child: String,
    /// Whether traffic with the peer flows: an IKE SA established and an
    /// ESP SA installed.
    pub up: bool,
    /// CHILD_SAs that replaced another one since the agent started.
    pub rekeys: u64,
    /// Times the SA was lost (down after having been up).
    pub downs: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The last error charon gave for this peer (loading, initiating).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The report, shared with the API.
#[derive(Default)]
pub struct Status(Mutex<Report>);

impl Status {
    pub fn get(&self) -> Report {
        self.0.lock().expect("ipsec status").clone()
    }

    fn set(&self, r: Report) {
        *self.0.lock().expect("ipsec status") = r;
    }
}

/// A peer that should have a connection: (name, its address).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Wanted {
    host: String,
    address: Ipv4Addr,
}

/// This host's encryption and address, and the ipsec peers it wants, from
/// the desired state (none while it is refused).
fn wanted(host: &str, d: &Desired) -> Option<(Encryption, Ipv4Addr, Vec<Wanted>)> {
    let valid = d.valid.as_ref().ok()?;
    let me = valid.hosts.iter().find(|h| h.name == host)?;
    let peers = if me.encryption == Encryption::Ipsec {
        valid
            .hosts
            .iter()
            .filter(|h| h.name != host && h.encryption == Encryption::Ipsec)
            .map(|h| Wanted {
                host: h.name.clone(),
                address: h.underlay_ip,
            })
            .collect()
    } else {
        Vec::new()
    };
    Some((me.encryption, me.underlay_ip, peers))
}

/// Runs for the agent's life: keeps charon's connections as the desired
/// state says and the status up to date.
pub async fn run(
    host: String,
    settings: Option<Settings>,
    mut desired: watch::Receiver<Arc<Desired>>,
    status: Arc<Status>,
) {
    let mut ike = Ike::default();
    loop {
        let state = desired.borrow_and_update().clone();
        let report = match wanted(&host, &state) {
            None => Report {
                mode: "none".into(),
                ike: "waiting for this host's object".into(),
                peers: vec![],
            },
            Some((mode, me, peers)) => match &settings {
                None if mode == Encryption::Ipsec => Report {
                    mode: "ipsec".into(),
                    ike: "no --ipsec-cert, --ipsec-key and --ipsec-ca: nothing is sent to ipsec peers"
                        .into(),
                    peers: peers.iter().map(|w| ike.peer(w)).collect(),
                },
                None => Report {
                    mode: "none".into(),
                    ike: "not used".into(),
                    peers: vec![],
                },
                // A plain host with the flags (it was, or will be, an
                // ipsec host): its connections left in charon are unloaded.
                Some(s) if mode == Encryption::None => {
                    let _ = ike.turn(s, me, mode, &[]).await;
                    Report {
                        mode: "none".into(),
                        ike: "not used".into(),
                        peers: vec![],
                    }
                }
                Some(s) => ike.turn(s, me, mode, &peers).await,
            },
        };
        status.set(report);
        tokio::select! {
            changed = desired.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

/// The agent's side of charon: the VICI client, what it loaded, and what
/// it saw of each peer's SAs.
#[derive(Default)]
struct Ike {
    client: Option<rsvici::Client>,
    /// Connections loaded (name → the configuration sent), since connecting.
    loaded: BTreeMap<String, String>,
    /// Each peer's CHILD_SA unique ids seen, and whether it was up.
    seen: BTreeMap<String, (BTreeSet<String>, bool)>,
    rekeys: BTreeMap<String, u64>,
    downs: BTreeMap<String, u64>,
    errors: BTreeMap<String, String>,
    /// The last SAs listed, by connection name.
    sas: BTreeMap<String, IkeSa>,
    /// When this agent last asked charon to initiate each connection.
    initiated: BTreeMap<String, std::time::Instant>,
}

/// How long after asking charon to initiate a connection the agent asks
/// again, if there is still no IKE SA (charon retries on its own meanwhile:
/// `keyingtries = 0`).
const INITIATE_AGAIN: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
struct Answer {
    success: bool,
    errmsg: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Conns {
    #[serde(default)]
    conns: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct IkeSa {
    state: Option<String>,
    #[serde(rename = "child-sas", default)]
    children: BTreeMap<String, ChildSa>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct ChildSa {
    name: Option<String>,
    uniqueid: Option<String>,
    state: Option<String>,
    #[serde(rename = "bytes-in")]
    bytes_in: Option<String>,
    #[serde(rename = "bytes-out")]
    bytes_out: Option<String>,
    #[serde(rename = "packets-in")]
    packets_in: Option<String>,
    #[serde(rename = "packets-out")]
    packets_out: Option<String>,
}

#[derive(Serialize)]
struct Cert<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    flag: &'a str,
    data: &'a str,
}

#[derive(Serialize)]
struct Key<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    data: &'a str,
}

#[derive(Serialize)]
struct Conn<'a> {
    version: &'a str,
    local_addrs: Vec<String>,
    remote_addrs: Vec<String>,
    proposals: Vec<&'a str>,
    rekey_time: String,
    dpd_delay: &'a str,
    mobike: bool,
    unique: &'a str,
    keyingtries: &'a str,
    local: Local<'a>,
    remote: Remote<'a>,
    children: BTreeMap<&'a str, Child<'a>>,
}

#[derive(Serialize)]
struct Local<'a> {
    auth: &'a str,
    id: String,
    certs: Vec<&'a str>,
}

#[derive(Serialize)]
struct Remote<'a> {
    auth: &'a str,
    id: String,
    cacerts: Vec<&'a str>,
}

#[derive(Serialize)]
struct Child<'a> {
    mode: &'a str,
    local_ts: Vec<String>,
    remote_ts: Vec<String>,
    esp_proposals: Vec<&'a str>,
    rekey_time: String,
    start_action: &'a str,
    dpd_action: &'a str,
    close_action: &'a str,
}

#[derive(Serialize)]
struct Name<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct Initiate<'a> {
    child: &'a str,
    ike: &'a str,
    timeout: &'a str,
    #[serde(rename = "init-limits")]
    init_limits: bool,
}

#[derive(Serialize)]
struct ListSas {
    noblock: bool,
}

fn answer(what: &str, a: Answer) -> Result<(), String> {
    if a.success {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}",
            a.errmsg.unwrap_or_else(|| "refused".into())
        ))
    }
}

fn read(p: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|e| format!("read {}: {e}", p.display()))
}

impl Ike {
    /// One turn: connected to charon (and the credentials loaded), the
    /// connections as wanted, initiated where this host initiates, the SAs
    /// read back.
    async fn turn(
        &mut self,
        s: &Settings,
        me: Ipv4Addr,
        mode: Encryption,
        peers: &[Wanted],
    ) -> Report {
        let mode_name = match mode {
            Encryption::Ipsec => "ipsec",
            Encryption::None => "none",
        };
        // A charon that does not answer is one that is not there: the turn
        // gives up, and the next one connects again.
        let synced = tokio::time::timeout(VICI_TIMEOUT, self.sync(s, me, peers))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {VICI_TIMEOUT:?}")));
        let ike = match synced {
            Ok(()) => "connected".to_string(),
            Err(e) => {
                // Connected again (and everything loaded again) next turn.
                self.client = None;
                self.loaded.clear();
                self.sas.clear();
                format!("charon at {}: {e}", s.vici.display())
            }
        };
        let peers = peers.iter().map(|w| self.peer(w)).collect();
        Report {
            mode: mode_name.into(),
            ike,
            peers,
        }
    }

    async fn sync(&mut self, s: &Settings, me: Ipv4Addr, peers: &[Wanted]) -> Result<(), String> {
        if self.client.is_none() {
            let c = rsvici::unix::connect(&s.vici)
                .await
                .map_err(|e| format!("cannot connect ({e}): is charon running?"))?;
            self.client = Some(c);
            self.loaded.clear();
        }
        let (cert, key, ca) = (read(&s.cert)?, read(&s.key)?, read(&s.ca)?);
        let client = self.client.as_mut().expect("connected");
        // The credentials, every turn: a renewed certificate (same files)
        // is taken up by the next IKE SA.
        for (flag, data) in [("CA", &ca), ("NONE", &cert)] {
            let a: Answer = client
                .request(
                    "load-cert",
                    Cert {
                        kind: "X509",
                        flag,
                        data,
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            answer("load the certificates", a)?;
        }
        let a: Answer = client
            .request(
                "load-key",
                Key {
                    kind: "any",
                    data: &key,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        answer("load the private key", a)?;

        // Connections: the wanted ones loaded (again if they changed), the
        // agent's others unloaded.
        let have: Conns = client
            .request("get-conns", ())
            .await
            .map_err(|e| e.to_string())?;
        let want: BTreeMap<String, &Wanted> = peers
            .iter()
            .map(|w| (format!("{CONN_PREFIX}{}", w.host), w))
            .collect();
        for name in have.conns.iter().filter(|n| n.starts_with(CONN_PREFIX)) {
            if !want.contains_key(name) {
                let a: Answer = client
                    .request("unload-conn", Name { name })
                    .await
                    .map_err(|e| e.to_string())?;
                if let Err(e) = answer("unload", a) {
                    tracing::warn!(conn = %name, error = %e, "unload an IPsec connection");
                }
                // Its SAs go too: nothing to that host any more.
                let _: Result<Answer, _> = client
                    .request(
                        "terminate",
                        TerminateIke {
                            ike: name,
                            // Returns at once (0 would wait for the
                            // peer, maybe gone, to answer).
                            timeout: "-1",
                        },
                    )
                    .await;
                self.loaded.remove(name);
                tracing::info!(conn = %name, "IPsec connection removed");
            }
        }
        let live: BTreeSet<&String> = have.conns.iter().collect();
        for (name, w) in &want {
            let conn = connection(me, w, &cert, &ca, s.rekey);
            let fingerprint = serde_json::to_string(&(
                &conn.local_addrs,
                &conn.remote_addrs,
                &conn.rekey_time,
                &cert,
                &ca,
            ))
            .unwrap_or_default();
            if live.contains(name) && self.loaded.get(name) == Some(&fingerprint) {
                continue;
            }
            let a: Answer = client
                .request("load-conn", BTreeMap::from([(name.as_str(), conn)]))
                .await
                .map_err(|e| e.to_string())?;
            match answer("load the connection", a) {
                Ok(()) => {
                    self.errors.remove(&w.host);
                    self.loaded.insert(name.clone(), fingerprint);
                    tracing::info!(conn = %name, peer = %w.address, "IPsec connection loaded");
                }
                Err(e) => {
                    tracing::error!(conn = %name, error = %e, "load an IPsec connection");
                    self.errors.insert(w.host.clone(), e);
                }
            }
        }

        // The SAs.
        let mut listed: BTreeMap<String, IkeSa> = BTreeMap::new();
        {
            let sas = client.stream_request::<_, BTreeMap<String, IkeSa>>(
                "list-sas",
                "list-sa",
                ListSas { noblock: true },
            );
            pin_mut!(sas);
            while let Some(m) = sas.try_next().await.map_err(|e| e.to_string())? {
                for (name, sa) in m {
                    // Several IKE SAs of one connection (a reauthentication
                    // under way): the established one counts.
                    let keep = listed.get(&name).is_none_or(|old| {
                        old.state.as_deref() != Some("ESTABLISHED")
                            && sa.state.as_deref() == Some("ESTABLISHED")
                    });
                    if keep {
                        listed.insert(name, sa);
                    }
                }
            }
        }

        // The lower address of each pair initiates (the other one would
        // too on its first packet: the policy is trapped).
        for (name, w) in &want {
            if me >= w.address || !self.loaded.contains_key(name) {
                continue;
            }
            let exists = listed.contains_key(name);
            let recently = self
                .initiated
                .get(name)
                .is_some_and(|t| t.elapsed() < INITIATE_AGAIN);
            if !exists && !recently {
                self.initiated
                    .insert(name.clone(), std::time::Instant::now());
                let client = self.client.as_mut().expect("connected");
                let r: Result<Answer, _> = client
                    .request(
                        "initiate",
                        Initiate {
                            child: CHILD,
                            ike: name,
                            // Returns at once; the SA shows in the next turn's list.
                            timeout: "-1",
                            init_limits: false,
                        },
                    )
                    .await;
                match r {
                    Ok(a) => {
                        if let Err(e) = answer("initiate", a) {
                            self.errors.insert(w.host.clone(), e);
                        }
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }

        // Rekeys (a new CHILD_SA id once one was seen) and losses.
        for (name, w) in &want {
            let sa = listed.get(name);
            let children: BTreeSet<String> = sa
                .into_iter()
                .flat_map(|sa| sa.children.values())
                .filter(|c| c.name.as_deref() == Some(CHILD))
                .filter_map(|c| c.uniqueid.clone())
                .collect();
            let up = peer_up(sa);
            let (ids, was_up) = self.seen.entry(w.host.clone()).or_default();
            let new = children.iter().filter(|c| !ids.contains(*c)).count() as u64;
            if *was_up && up && new > 0 {
                *self.rekeys.entry(w.host.clone()).or_default() += new;
            }
            if *was_up && !up {
                *self.downs.entry(w.host.clone()).or_default() += 1;
                tracing::warn!(peer = %w.host, "the IPsec SA with a peer is down");
            }
            ids.extend(children);
            *was_up = up;
        }
        self.sas = listed;
        Ok(())
    }

    fn peer(&self, w: &Wanted) -> Peer {
        let name = format!("{CONN_PREFIX}{}", w.host);
        let sa = self.sas.get(&name);
        let child = sa.and_then(|sa| {
            sa.children
                .values()
                .filter(|c| c.name.as_deref() == Some(CHILD))
                .max_by_key(|c| {
                    (
                        c.state.as_deref() == Some("INSTALLED"),
                        c.uniqueid
                            .as_deref()
                            .and_then(|u| u.parse::<u64>().ok())
                            .unwrap_or(0),
                    )
                })
        });
        let num = |v: Option<&String>| v.and_then(|v| v.parse().ok()).unwrap_or(0u64);
        Peer {
            host: w.host.clone(),
            address: w.address,
            ike: sa
                .and_then(|sa| sa.state.clone())
                .unwrap_or_else(|| "none".into()),
            child: child
                .and_then(|c| c.state.clone())
                .unwrap_or_else(|| "none".into()),
            up: peer_up(sa),
            rekeys: self.rekeys.get(&w.host).copied().unwrap_or(0),
            downs: self.downs.get(&w.host).copied().unwrap_or(0),
            packets_in: num(child.and_then(|c| c.packets_in.as_ref())),
            packets_out: num(child.and_then(|c| c.packets_out.as_ref())),
            bytes_in: num(child.and_then(|c| c.bytes_in.as_ref())),
            bytes_out: num(child.and_then(|c| c.bytes_out.as_ref())),
            error: self.errors.get(&w.host).cloned(),
        }
    }
}

#[derive(Serialize)]
struct TerminateIke<'a> {
    ike: &'a str,
    timeout: &'a str,
}

fn peer_up(sa: Option<&IkeSa>) -> bool {
    sa.is_some_and(|sa| {
        sa.state.as_deref() == Some("ESTABLISHED")
            && sa.children.values().any(|c| {
                c.name.as_deref() == Some(CHILD) && c.state.as_deref() == Some("INSTALLED")
            })
    })
}

/// The connection to peer `w`.
fn connection<'a>(
    me: Ipv4Addr,
    w: &Wanted,
    cert: &'a str,
    ca: &'a str,
    rekey: Duration,
) -> Conn<'a> {
    let secs = rekey.as_secs().max(60);
    Conn {
        version: "2",
        local_addrs: vec![me.to_string()],
        remote_addrs: vec![w.address.to_string()],
        proposals: vec![IKE_PROPOSAL],
        rekey_time: format!("{}s", secs * 4),
        dpd_delay: "10s",
        mobike: false,
        unique: "replace",
        keyingtries: "0",
        local: Local {
            auth: "pubkey",
            id: me.to_string(),
            certs: vec![cert],
        },
        remote: Remote {
            auth: "pubkey",
            id: w.address.to_string(),
            cacerts: vec![ca],
        },
        children: BTreeMap::from([(
            CHILD,
            Child {
                mode: "tunnel",
                // The UDP between the two hosts: the VXLAN the programs
                // hand to the IPsec device (charon's own IKE traffic never
                // enters that device: there is no route to it).
                local_ts: vec![format!("{me}/32[udp]")],
                remote_ts: vec![format!("{}/32[udp]", w.address)],
                esp_proposals: vec![ESP_PROPOSAL],
                rekey_time: format!("{secs}s"),
                start_action: "trap",
                dpd_action: "trap",
                close_action: "trap",
            },
        )]),
    }
}
