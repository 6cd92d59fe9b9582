//! The fleet store (`--store etcd`): one desired state for every agent, in
//! etcd. The keys, under `--etcd-prefix` (default `/cloison`):
//!
//! - `state/objects/{kind}/{name}`: an object's fields (JSON); its
//!   generation is the key's `mod_revision`.
//! - `state/generation`: rewritten by every write, in the write's
//!   transaction; its `mod_revision` is the state's generation (the etcd
//!   revision of the last write), the same number on every host.
//! - `agents/{host}`: `{"applied_generation": N}`, what that host's kernel
//!   holds; `alive/{host}`: present while the agent's lease is kept alive.
//!
//! Each agent lists `state/` at one revision (in pages), publishes it, then
//! watches from the next revision. A watch that is cancelled, compacted or
//! broken is never resumed: the agent lists again and takes the new list as
//! the whole state (deletions included). The local redb file follows the
//! published state 200 ms after the watch goes quiet (at most a second
//! behind during a burst); the agent starts from it when etcd cannot be
//! reached.
//! A write is checked against the agent's copy at generation G
//! and committed in a transaction that holds only if `state/generation` is
//! still at G: two agents can never both commit writes checked against the
//! same state, so the fleet's state is always one the validator accepted.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::{runtime::Handle, sync::watch};

use super::{err, rfc3339, Change, CommitError, Member, Redb, Store, StoreError, StoreView};
use crate::{
    desired::{parse_stored, Desired, Kind, Record},
    reconcile::Applied,
};

/// Client certificates for an etcd that requires them (`https://` endpoints).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// The CA that signed the etcd servers' certificates.
    pub ca: PathBuf,
    /// This agent's client certificate and key (etcd maps the certificate's
    /// CN to a user for RBAC).
    pub cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Clone, Debug)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Every key lives under it.
    pub prefix: String,
    /// This agent's host.
    pub host: String,
    pub tls: Option<EtcdTls>,
    /// Seconds an agent stays `up` without news of it.
    pub lease_ttl: i64,
}

impl EtcdConfig {
    pub fn new(endpoints: &str, host: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_string)
                .collect(),
            prefix: "/cloison".into(),
            host: host.into(),
            tls: None,
            lease_ttl: 10,
        }
    }
}

/// A list is read in pages of this many keys (etcd answers each page in
/// one message; a page of ports is well under its 2 MiB default).
const PAGE: i64 = 500;
/// How often, at most, an agent writes its applied generation to etcd: a
/// fleet of a thousand hosts is a thousand writes a second at most.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct Keys {
    state: String,
    generation: String,
    objects: String,
    agents: String,
    alive: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        let p = prefix.trim_end_matches('/');
        Keys {
            state: format!("{p}/state/"),
            generation: format!("{p}/state/generation"),
            objects: format!("{p}/state/objects/"),
            agents: format!("{p}/agents/"),
            alive: format!("{p}/alive/"),
        }
    }

    fn object(&self, kind: Kind, name: &str) -> String {
        format!("{}{}/{name}", self.objects, kind.path())
    }

    /// The kind and name of an object's key.
    fn parse_object(&self, key: &[u8]) -> Option<(Kind, String)> {
        let key = std::str::from_utf8(key).ok()?;
        let (kind, name) = key.strip_prefix(&self.objects)?.split_once('/')?;
        Some((Kind::from_path(kind)?, name.to_string()))
    }
}

/// What the watcher and the API share of the connection.
struct Link {
    /// `None` while etcd answers; since when it does not.
    down_since: Mutex<Option<SystemTime>>,
    why: Mutex<String>,
    /// Lists of the whole state after the first (each a watch that broke,
    /// was cancelled or compacted).
    relists: std::sync::atomic::AtomicU64,
    /// Whether etcd ever answered this process.
    ever_up: std::sync::atomic::AtomicBool,
}

impl Link {
    fn down(&self, why: String) {
        let mut d = self.down_since.lock().unwrap();
        if d.is_none() {
            tracing::warn!(error = %why, "etcd unreachable: the dataplane goes on with the last state, writes are refused");
            *d = Some(SystemTime::now());
        }
        *self.why.lock().unwrap() = why;
    }

    fn up(&self) {
        self.ever_up
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if self.down_since.lock().unwrap().take().is_some() {
            tracing::info!("etcd reachable again");
        }
    }
}

pub struct Etcd {
    cfg: EtcdConfig,
    keys: Keys,
    rt: Handle,
    client: Client,
    link: Arc<Link>,
    mirror: Arc<Mutex<Redb>>,
    desired: Option<watch::Receiver<Arc<Desired>>>,
}

fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions, StoreError> {
    let mut o = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(super::WRITE_TIMEOUT)
        // A dead peer (no RST: a partition) is noticed within seconds.
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        // A member cut from its quorum does not serve stale reads or watches.
        .with_require_leader(true);
    if let Some(tls) = &cfg.tls {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| err(format!("read {}: {e}", p.display())));
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
        if let Some((cert, key)) = &tls.cert {
            t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        o = o.with_tls(t);
    }
    Ok(o)
}

impl Etcd {
    /// A store on `cfg`'s endpoints, with `mirror` as the local copy. Needs
    /// a tokio runtime (its tasks run there); etcd itself may be down.
    pub async fn connect(cfg: EtcdConfig, mirror: Redb) -> Result<Etcd, StoreError> {
        if cfg.endpoints.is_empty() {
            return Err(err("--etcd-endpoints: no endpoint given"));
        }
        for e in &cfg.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(err(format!(
                    "--etcd-endpoints: {e:?} is not an http:// or https:// URL"
                )));
            }
            if e.starts_with("https://") && cfg.tls.is_none() {
                return Err(err(format!(
                    "--etcd-endpoints: {e} needs --etcd-ca-file (the CA of etcd's certificates)"
                )));
            }
        }
        let client = Client::connect(&cfg.endpoints, Some(connect_options(&cfg)?))
            .await
            .map_err(|e| err(format!("etcd client: {e}")))?;
        Ok(Etcd {
            keys: Keys::new(&cfg.prefix),
            cfg,
            rt: Handle::current(),
            client,
            link: Arc::new(Link {
                down_since: Mutex::new(Some(SystemTime::now())),
                why: Mutex::new("not connected yet".into()),
                relists: Default::default(),
                ever_up: Default::default(),
            }),
            mirror: Arc::new(Mutex::new(mirror)),
            desired: None,
        })
    }

    /// Waits (blocking) until the published state is at `generation`.
    fn wait_published(&mut self, generation: u64) -> bool {
        let Some(rx) = self.desired.as_mut() else {
            return false;
        };
        self.rt.block_on(async {
            tokio::time::timeout(
                super::WRITE_TIMEOUT,
                rx.wait_for(|d| d.generation >= generation),
            )
            .await
            .is_ok_and(|r| r.is_ok())
        })
    }
}

impl Store for Etcd {
    fn start(
        &mut self,
        desired: watch::Sender<Arc<Desired>>,
        applied: watch::Receiver<Applied>,
    ) -> Result<(), StoreError> {
        // The local copy first: an agent that starts while etcd is down
        // serves and applies the last state it saw.
        let cached = self.mirror.lock().unwrap().load()?;
        tracing::info!(
            generation = cached.generation,
            "fleet mode: the local copy of the fleet's state, until etcd answers"
        );
        desired.send_replace(Arc::new(cached));
        self.desired = Some(desired.subscribe());
        let w = Watcher {
            client: self.client.clone(),
            keys: self.keys.clone(),
            link: self.link.clone(),
            mirror: self.mirror.clone(),
            desired,
        };
        self.rt.spawn(w.run());
        self.rt.spawn(report(
            self.client.clone(),
            self.keys.clone(),
            self.cfg.clone(),
            applied,
        ));
        Ok(())
    }

    fn commit(
        &mut self,
        base: &Desired,
        change: Change<'_>,
        _next: Desired,
    ) -> Result<u64, CommitError> {
        if !self.link.ever_up.load(std::sync::atomic::Ordering::Relaxed) {
            // Just started: etcd may answer any moment.
            let link = self.link.clone();
            self.rt.block_on(async {
                let end = tokio::time::Instant::now() + super::WRITE_TIMEOUT;
                while link.down_since.lock().unwrap().is_some() && tokio::time::Instant::now() < end
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
        if let Some(since) = *self.link.down_since.lock().unwrap() {
            return Err(CommitError::Unavailable(format!(
                "etcd is unreachable since {}: {}",
                rfc3339(since),
                self.link.why.lock().unwrap()
            )));
        }
        let key = self.keys.object(change.kind, change.name);
        let op = match change.record {
            Some(r) => TxnOp::put(
                key,
                serde_json::to_vec(&r.object.fields_json()).map_err(err)?,
                None,
            ),
            None => TxnOp::delete(key, None),
        };
        // The write's own mark, in state/generation: a retried transaction
        // that finds it there knows that its first try committed.
        let mark = format!(
            "{} {}",
            self.cfg.host,
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let txn = Txn::new()
            .when([Compare::mod_revision(
                self.keys.generation.clone(),
                CompareOp::Equal,
                base.generation as i64,
            )])
            .and_then([
                op,
                TxnOp::put(self.keys.generation.clone(), mark.clone(), None),
            ])
            .or_else([TxnOp::get(self.keys.generation.clone(), None)]);
        // Errors are retried until the timeout: a member that died, a
        // leader being elected. A retry of a transaction that did commit
        // fails its comparison, and the caller finds its write done.
        let mut client = self.client.clone();
        let link = self.link.clone();
        let resp = self
            .rt
            .block_on(async {
                tokio::time::timeout(super::WRITE_TIMEOUT, async {
                    loop {
                        match client.txn(txn.clone()).await {
                            Ok(r) => return Ok(r),
                            Err(e) => {
                                tracing::debug!(error = %e, "etcd: write, again");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                if link.down_since.lock().unwrap().is_some() {
                                    return Err(e);
                                }
                            }
                        }
                    }
                })
                .await
            })
            .map_err(|_| CommitError::Unavailable("etcd did not answer in time".into()))?
            .map_err(|e| CommitError::Unavailable(format!("etcd: {e}")))?;
        let revision = resp.header().map_or(0, |h| h.revision()) as u64;
        if resp.succeeded() {
            if !self.wait_published(revision) {
                tracing::warn!(
                    revision,
                    "committed, but the watch has not brought it back yet"
                );
            }
            return Ok(revision);
        }
        // Another agent wrote since `base`: wait for its write to arrive,
        // then the caller checks again.
        let (current, theirs) = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| (kv.mod_revision() as u64, kv.value().to_vec())),
                _ => None,
            })
            .unwrap_or((0, vec![]));
        self.wait_published(current);
        if theirs == mark.as_bytes() {
            return Ok(current); // a retry of what had committed
        }
        Err(CommitError::Stale)
    }

    fn view(&self) -> Arc<dyn StoreView> {
        Arc::new(View {
            client: self.client.clone(),
            keys: self.keys.clone(),
            link: self.link.clone(),
            rt: self.rt.clone(),
        })
    }
}

struct View {
    client: Client,
    keys: Keys,
    link: Arc<Link>,
    rt: Handle,
}

impl StoreView for View {
    fn describe(&self) -> String {
        match *self.link.down_since.lock().unwrap() {
            None => "etcd: connected".into(),
            Some(t) => format!("etcd: disconnected since {}", rfc3339(t)),
        }
    }

    fn unreachable_since(&self) -> Option<SystemTime> {
        *self.link.down_since.lock().unwrap()
    }

    fn relists(&self) -> u64 {
        self.link.relists.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn fleet(&self) -> Option<Result<Vec<Member>, String>> {
        let c = self.client.clone();
        let keys = self.keys.clone();
        Some(self.rt.block_on(async move {
            let get = |prefix: String| {
                let mut c = c.clone();
                async move {
                    tokio::time::timeout(
                        super::WRITE_TIMEOUT,
                        c.get(prefix, Some(GetOptions::new().with_prefix())),
                    )
                    .await
                    .map_err(|_| "etcd did not answer in time".to_string())?
                    .map_err(|e| format!("etcd: {e}"))
                }
            };
            let agents = get(keys.agents.clone()).await?;
            let alive = get(keys.alive.clone()).await?;
            let mut out: BTreeMap<String, Member> = BTreeMap::new();
            for kv in agents.kvs() {
                let Some(host) = kv.key_str().ok().and_then(|k| k.strip_prefix(&keys.agents))
                else {
                    continue;
                };
                let applied = serde_json::from_slice::<serde_json::Value>(kv.value())
                    .ok()
                    .and_then(|v| v["applied_generation"].as_u64())
                    .unwrap_or(0);
                out.insert(
                    host.to_string(),
                    Member {
                        host: host.to_string(),
                        applied_generation: applied,
                        up: false,
                    },
                );
            }
            for kv in alive.kvs() {
                let Some(host) = kv.key_str().ok().and_then(|k| k.strip_prefix(&keys.alive)) else {
                    continue;
                };
                out.entry(host.to_string())
                    .or_insert_with(|| Member {
                        host: host.to_string(),
                        applied_generation: 0,
                        up: true,
                    })
                    .up = true;
            }
            Ok(out.into_values().collect())
        }))
    }
}

/// What the local copy still lacks of the published state.
#[derive(Default)]
struct Unmirrored {
    /// The whole state is to replace the copy (after a list).
    all: bool,
    changed: BTreeSet<(Kind, String)>,
    /// Since when something is waiting.
    since: Option<tokio::time::Instant>,
}

/// The local copy is written once the watch has been quiet this long...
const MIRROR_QUIET: Duration = Duration::from_millis(200);
/// ...or when changes have waited this long during a burst.
const MIRROR_AT_MOST: Duration = Duration::from_secs(1);

struct Watcher {
    client: Client,
    keys: Keys,
    link: Arc<Link>,
    mirror: Arc<Mutex<Redb>>,
    desired: watch::Sender<Arc<Desired>>,
}

impl Watcher {
    async fn run(self) {
        let mut backoff = Duration::from_millis(50);
        for n in 0u64.. {
            if n > 0 {
                self.link
                    .relists
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let mut listed = false;
            let why = match self.sync(&mut listed).await {
                Ok(()) => "the watch ended".to_string(),
                Err(e) => e,
            };
            self.link.down(why.clone());
            tracing::debug!(error = %why, "etcd: list again");
            // Quick again after a watch that broke; slower while etcd
            // does not answer at all.
            backoff = if listed {
                Duration::from_millis(100)
            } else {
                (backoff * 2).min(Duration::from_secs(2))
            };
            tokio::time::sleep(backoff).await;
        }
    }

    /// One list and the watch that follows it, until the watch breaks;
    /// `listed` once the list is published. Each batch of events makes the
    /// next state from the last (the unchanged objects shared); the local
    /// copy follows off the path of the state, in one transaction when the
    /// watch is quiet.
    async fn sync(&self, listed: &mut bool) -> Result<(), String> {
        let (state, revision) = self.list().await?;
        let mut state = Arc::new(state);
        self.publish(state.clone());
        let mut unmirrored = Unmirrored {
            all: true,
            since: Some(tokio::time::Instant::now()),
            ..Default::default()
        };
        self.link.up();
        *listed = true;
        let mut client = self.client.clone();
        let mut stream = client
            .watch(
                self.keys.state.clone(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1)
                        .with_progress_notify(),
                ),
            )
            .await
            .map_err(|e| format!("watch: {e}"))?;
        // Changes that arrived while the state before them was being made
        // (and checked) go into the next one together: under load an agent
        // makes fewer states, never a later one. The copy is only ever told
        // of published changes (`unmirrored`): the keys of a state being
        // made travel with it until it is.
        let mut pending: Vec<(Kind, String, Option<Record>)> = Vec::new();
        let mut pending_generation = state.generation;
        type Making = (tokio::task::JoinHandle<Desired>, BTreeSet<(Kind, String)>);
        let mut making: Option<Making> = None;
        loop {
            if making.is_none() && (!pending.is_empty() || pending_generation > state.generation) {
                let (base, changes, g) = (
                    state.clone(),
                    std::mem::take(&mut pending),
                    pending_generation,
                );
                let keys = changes.iter().map(|(k, n, _)| (*k, n.clone())).collect();
                making = Some((
                    tokio::task::spawn_blocking(move || base.changed(changes, g)),
                    keys,
                ));
            }
            if unmirrored
                .since
                .is_some_and(|t| t.elapsed() >= MIRROR_AT_MOST)
            {
                // A burst that does not end: the copy is not left behind.
                self.write_mirror(&state, &mut unmirrored).await?;
            }
            let wait = match unmirrored.since {
                Some(since) => MIRROR_QUIET.min(MIRROR_AT_MOST.saturating_sub(since.elapsed())),
                None => Duration::from_secs(3600),
            };
            let resp = tokio::select! {
                made = async { (&mut making.as_mut().expect("guarded").0).await }, if making.is_some() => {
                    let (_, keys) = making.take().expect("guarded");
                    state = Arc::new(made.map_err(|e| e.to_string())?);
                    self.publish(state.clone());
                    if !keys.is_empty() {
                        unmirrored.changed.extend(keys);
                        unmirrored.since.get_or_insert_with(tokio::time::Instant::now);
                    }
                    continue;
                }
                m = tokio::time::timeout(wait, stream.message()) => match m {
                    Ok(m) => m
                        .map_err(|e| format!("watch: {e}"))?
                        .ok_or("the watch stream ended")?,
                    Err(_) => {
                        // Quiet: the copy takes what is published.
                        self.write_mirror(&state, &mut unmirrored).await?;
                        continue;
                    }
                },
            };
            if resp.canceled() || resp.compact_revision() > 0 {
                return Err(format!(
                    "the watch was cancelled ({}{}): list again",
                    resp.cancel_reason(),
                    if resp.compact_revision() > 0 {
                        format!("compacted up to revision {}", resp.compact_revision())
                    } else {
                        String::new()
                    }
                ));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                if kv.key() == self.keys.generation.as_bytes() {
                    pending_generation = pending_generation.max(kv.mod_revision() as u64);
                    continue;
                }
                let Some((kind, name)) = self.keys.parse_object(kv.key()) else {
                    continue;
                };
                let rec = match ev.event_type() {
                    EventType::Put => record(kind, &name, kv.value(), kv.mod_revision())
                        .map_err(|e| tracing::error!(kind = %kind, %name, error = %e, "etcd holds an object this agent cannot read: ignored"))
                        .ok(),
                    EventType::Delete => None,
                };
                pending.push((kind, name, rec));
            }
        }
    }

    /// The whole state at one revision, page by page; and that revision.
    async fn list(&self) -> Result<(Desired, i64), String> {
        let mut client = self.client.clone();
        let mut records = Vec::new();
        let mut generation = 0;
        let end = prefix_end(self.keys.state.as_bytes());
        let mut from = self.keys.state.as_bytes().to_vec();
        let mut revision = 0;
        loop {
            let mut o = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                o = o.with_revision(revision);
            }
            let resp = client
                .get(from.clone(), Some(o))
                .await
                .map_err(|e| format!("list: {e}"))?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                if kv.key() == self.keys.generation.as_bytes() {
                    generation = kv.mod_revision() as u64;
                } else if let Some((kind, name)) = self.keys.parse_object(kv.key()) {
                    match record(kind, &name, kv.value(), kv.mod_revision()) {
                        Ok(r) => records.push((name, r)),
                        Err(e) => {
                            tracing::error!(kind = %kind, %name, error = %e, "etcd holds an object this agent cannot read: ignored")
                        }
                    }
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        let state = tokio::task::spawn_blocking(move || Desired::loaded(records, generation))
            .await
            .map_err(|e| e.to_string())?;
        Ok((state, revision))
    }

    fn publish(&self, state: Arc<Desired>) {
        if let Err(v) = &state.valid {
            tracing::error!(error = %v, generation = state.generation, "the fleet's state is refused by this version's checks: not applied");
        }
        self.desired.send_replace(state);
    }

    /// Writes what the local copy lacks of `state`, in one durable
    /// transaction.
    async fn write_mirror(&self, state: &Arc<Desired>, u: &mut Unmirrored) -> Result<(), String> {
        if u.since.is_none() {
            return Ok(());
        }
        let all = std::mem::take(&mut u.all);
        let changed = std::mem::take(&mut u.changed);
        u.since = None;
        let (state, mirror) = (state.clone(), self.mirror.clone());
        let r = tokio::task::spawn_blocking(move || {
            let mut m = mirror.lock().unwrap();
            if all {
                return m.replace(&state);
            }
            let changes: Vec<Change<'_>> = changed
                .iter()
                .map(|(kind, name)| Change {
                    kind: *kind,
                    name,
                    record: state.get(*kind, name),
                })
                .collect();
            m.write(&changes, state.generation, false)
        })
        .await
        .map_err(|e| e.to_string())?;
        if let Err(e) = r {
            tracing::error!(error = %e, "write the local copy of the fleet's state");
        }
        Ok(())
    }
}

/// A stored object's fields (named as its key) and its key's revision.
fn record(kind: Kind, name: &str, value: &[u8], mod_revision: i64) -> Result<Record, String> {
    let object = parse_stored(kind, value).map_err(|e| e.to_string())?;
    if object.name() != name {
        return Err(format!("its body names it {:?}", object.name()));
    }
    Ok(Record {
        generation: mod_revision as u64,
        object,
    })
}

/// The end of the range of keys that start with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Tells the fleet what this host's kernel holds (`agents/{host}`) and that
/// the agent is alive (`alive/{host}`, on a lease it keeps alive).
async fn report(
    client: Client,
    keys: Keys,
    cfg: EtcdConfig,
    mut applied: watch::Receiver<Applied>,
) {
    let alive = {
        let (client, key, ttl) = (
            client.clone(),
            format!("{}{}", keys.alive, cfg.host),
            cfg.lease_ttl,
        );
        async move {
            loop {
                if let Err(e) = keep_alive(client.clone(), &key, ttl).await {
                    tracing::debug!(error = %e, "etcd lease");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let key = format!("{}{}", keys.agents, cfg.host);
    // At most one report per REPORT_EVERY: a burst of writes must not turn
    // into a burst of etcd writes from every agent of the fleet.
    let generation = async move {
        let mut told: Option<u64> = None;
        loop {
            let g = applied.borrow_and_update().generation;
            if told != Some(g) {
                let body = serde_json::json!({"applied_generation": g}).to_string();
                let mut c = client.clone();
                match c.put(key.clone(), body, None).await {
                    Ok(_) => told = Some(g),
                    Err(e) => tracing::debug!(error = %e, "etcd: report the applied generation"),
                }
                tokio::time::sleep(REPORT_EVERY).await;
                continue;
            }
            if applied.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::join!(alive, generation);
}

async fn keep_alive(mut client: Client, key: &str, ttl: i64) -> Result<(), String> {
    let lease = client
        .lease_grant(ttl, None)
        .await
        .map_err(|e| e.to_string())?
        .id();
    client
        .put(key, "", Some(PutOptions::new().with_lease(lease)))
        .await
        .map_err(|e| e.to_string())?;
    let (mut keeper, mut stream) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| e.to_string())?;
    let every = Duration::from_secs((ttl as u64 / 3).max(1));
    loop {
        keeper.keep_alive().await.map_err(|e| e.to_string())?;
        match tokio::time::timeout(every * 2, stream.message()).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return Err("the lease expired".into()),
            Ok(Ok(None)) => return Err("the keep-alive stream ended".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no keep-alive answer".into()),
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_objects_and_nothing_else() {
        let k = Keys::new("/cloison/");
        assert_eq!(
            k.object(Kind::Port, "vm1"),
            "/cloison/state/objects/ports/vm1"
        );
        assert_eq!(
            k.parse_object(b"/cloison/state/objects/ports/vm1"),
            Some((Kind::Port, "vm1".into()))
        );
        assert_eq!(k.parse_object(b"/cloison/state/generation"), None);
        assert_eq!(k.parse_object(b"/cloison/state/objects/nope/vm1"), None);
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
    }
}
