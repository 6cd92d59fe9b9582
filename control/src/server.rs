//! The northbound REST API of docs/api.md, served by axum on a unix
//! socket (mode 0600) and optionally on TCP with a bearer token.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Path, Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, MethodRouter},
    Router,
};
use cloison_abi::DropReason;
use cloison_dataplane::{netdev, Dataplane, Network, Port};
use serde_json::{json, Value};
use tokio::sync::{watch, OwnedMutexGuard};

use crate::{
    desired::{parse_body, Desired, Kind, Object, Refusal},
    reconcile::Applied,
    store::{Change, CommitError, Store, StoreView},
};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The API's side of an agent. The desired state is an immutable value on
/// a watch channel that the store publishes: readers (GET, status, stats,
/// metrics) take the latest one and never wait; writers take turns on the
/// store (the lock), check the next state, and commit it; the store
/// publishes it once durable, which wakes the reconciler. A fleet store may
/// answer that the fleet's state moved meanwhile: the write is checked
/// again on the newer state. Stats and metrics read the kernel through a
/// read-only handle of their own, never the reconciler's writer.
pub struct Agent {
    pub host: String,
    store: Arc<tokio::sync::Mutex<Box<dyn Store>>>,
    view: Arc<dyn StoreView>,
    desired: watch::Receiver<Arc<Desired>>,
    applied: watch::Receiver<Applied>,
    reader: Arc<Reader>,
    /// The programs' event stream (`GET /v1/monitor`).
    pub monitor: Arc<crate::monitor::Monitor>,
    /// What the gateway services answered and did not (`/metrics`).
    pub gateway: Arc<crate::gateway::Counters>,
    /// IPsec with the other hosts, as charon has it (`encryption` in the
    /// status, `/metrics`).
    pub ipsec: Arc<crate::ipsec::Status>,
    /// This host's uplink interface (traces of frames from the underlay).
    uplink: Mutex<Option<String>>,
}

/// How many times a write is checked again when the fleet's state moved
/// under it, before it is refused with 503.
pub const WRITE_ATTEMPTS: usize = 8;

/// What the reconciler takes: the desired states, and where to say what it
/// applied.
pub struct ReconcilerSide {
    pub desired: watch::Receiver<Arc<Desired>>,
    pub applied: watch::Sender<Applied>,
}

/// A read-only view of this host's pinned maps, opened on first use (the
/// reconciler creates them).
struct Reader {
    host: String,
    pin_root: PathBuf,
    handle: Mutex<Option<Dataplane>>,
}

impl Reader {
    fn stats(&self) -> Result<cloison_dataplane::Stats, ApiError> {
        self.with(|dp| dp.stats().map_err(ApiError::internal))
    }

    /// Runs `f` on the read-only view, opened first if need be.
    fn with<T>(&self, f: impl FnOnce(&Dataplane) -> Result<T, ApiError>) -> Result<T, ApiError> {
        let mut h = self.handle.lock().expect("reader");
        if h.is_none() {
            *h = Some(
                Dataplane::open_maps(&self.host, &self.pin_root).map_err(|e| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        format!("the dataplane is not loaded: {e}"),
                    )
                })?,
            );
        }
        f(h.as_ref().expect("opened"))
    }
}

impl Agent {
    /// The agent over a store, which it starts; the reconciler gets the
    /// stored state at once (a restart converges to it).
    pub fn new(
        host: String,
        mut store: Box<dyn Store>,
        pin_root: PathBuf,
    ) -> Result<(Arc<Agent>, ReconcilerSide), crate::store::StoreError> {
        let (desired_tx, desired_rx) = watch::channel(Arc::new(Desired::default()));
        let (applied_tx, applied_rx) = watch::channel(Applied::default());
        store.start(desired_tx, applied_rx.clone())?;
        if let Err(v) = &desired_rx.borrow().valid {
            tracing::error!(error = %v, "the stored state is refused by this version's checks: fix it through the API");
        }
        let agent = Arc::new(Agent {
            reader: Arc::new(Reader {
                host: host.clone(),
                pin_root,
                handle: Mutex::new(None),
            }),
            monitor: crate::monitor::Monitor::new(crate::monitor::DEFAULT_SETTINGS),
            host,
            view: store.view(),
            store: Arc::new(tokio::sync::Mutex::new(store)),
            desired: desired_rx.clone(),
            applied: applied_rx,
            gateway: Arc::default(),
            ipsec: Arc::default(),
            uplink: Mutex::new(None),
        });
        Ok((
            agent,
            ReconcilerSide {
                desired: desired_rx,
                applied: applied_tx,
            },
        ))
    }

    /// Names this host's uplink interface (where `POST /v1/trace` runs a
    /// frame from the underlay).
    pub fn set_uplink(&self, name: &str) {
        *self.uplink.lock().expect("uplink") = Some(name.to_string());
    }

    /// The latest desired state.
    pub fn desired(&self) -> Arc<Desired> {
        self.desired.borrow().clone()
    }

    /// A PUT (`Some`) or a DELETE (`None`) as the API makes it, blocking
    /// (not on an async worker): (created, the object as returned).
    pub fn write_blocking(
        &self,
        kind: Kind,
        name: &str,
        object: Option<Object>,
    ) -> Result<(bool, Value), ApiError> {
        let mut store = self.store.clone().blocking_lock_owned();
        match object {
            Some(o) => self.put(&mut store, kind, name, o),
            None => self
                .delete(&mut store, kind, name)
                .map(|()| (false, Value::Null)),
        }
    }

    /// PUT, with the store's lock held: (created, the object as returned).
    fn put(
        &self,
        store: &mut OwnedMutexGuard<Box<dyn Store>>,
        kind: Kind,
        name: &str,
        object: Object,
    ) -> Result<(bool, Value), ApiError> {
        for _ in 0..WRITE_ATTEMPTS {
            let current = self.desired();
            let existed = current.get(kind, name);
            if let Some(old) = existed {
                if old.object == object {
                    return Ok((false, old.to_json())); // idempotent: nothing changes
                }
            }
            let created = existed.is_none();
            let next = current.with(kind, name, Some(object.clone()))?;
            let written = next.get(kind, name).expect("just written").clone();
            let change = Change {
                kind,
                name,
                record: Some(&written),
            };
            match store.commit(&current, change, next) {
                Ok(generation) => {
                    let mut record = written;
                    record.generation = generation;
                    return Ok((created, record.to_json()));
                }
                Err(CommitError::Stale) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(contended())
    }

    fn delete(
        &self,
        store: &mut OwnedMutexGuard<Box<dyn Store>>,
        kind: Kind,
        name: &str,
    ) -> Result<(), ApiError> {
        for _ in 0..WRITE_ATTEMPTS {
            let current = self.desired();
            if current.get(kind, name).is_none() {
                return Err(Refusal::NotFound(format!("no {kind} {name}")).into());
            }
            if let Some(why) = current.in_use(kind, name) {
                return Err(Refusal::Conflict(why).into());
            }
            let next = current.with(kind, name, None)?;
            let change = Change {
                kind,
                name,
                record: None,
            };
            match store.commit(&current, change, next) {
                Ok(_) => return Ok(()),
                Err(CommitError::Stale) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(contended())
    }
}

fn contended() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!("the fleet's state changed under this write {WRITE_ATTEMPTS} times: try again"),
    )
}

impl From<CommitError> for ApiError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Unavailable(why) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("the fleet store cannot be reached, nothing was written: {why}"),
            ),
            CommitError::Stale => contended(),
            CommitError::Failed(e) => ApiError::internal(e),
        }
    }
}

/// An error answer: `{"error": {"code", "message"}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        let status = StatusCode::from_u16(r.status()).expect("a valid status");
        ApiError::new(status, r.code(), r.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

async fn put_object(agent: Arc<Agent>, kind: Kind, name: String, req: Request) -> ApiResult {
    let body = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("a body is at most {MAX_BODY_BYTES} bytes"),
            )
        })?;
    let object = parse_body(kind, &name, &body)?;
    let mut store = agent.store.clone().lock_owned().await;
    let a = agent.clone();
    // Validating the whole state and committing durably (fsync): off the
    // async workers.
    let (created, obj) =
        tokio::task::spawn_blocking(move || a.put(&mut store, kind, &name, object))
            .await
            .map_err(ApiError::internal)??;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(obj)).into_response())
}

async fn get_object(agent: Arc<Agent>, kind: Kind, name: String) -> ApiResult {
    let desired = agent.desired();
    let rec = desired
        .get(kind, &name)
        .ok_or_else(|| Refusal::NotFound(format!("no {kind} {name}")))?;
    Ok(axum::Json(rec.to_json()).into_response())
}

async fn list_objects(agent: Arc<Agent>, kind: Kind) -> ApiResult {
    let desired = agent.desired();
    let all: Vec<Value> = desired.list(kind).map(|r| r.to_json()).collect();
    Ok(axum::Json(all).into_response())
}

async fn delete_object(agent: Arc<Agent>, kind: Kind, name: String) -> ApiResult {
    let mut store = agent.store.clone().lock_owned().await;
    let a = agent.clone();
    tokio::task::spawn_blocking(move || a.delete(&mut store, kind, &name))
        .await
        .map_err(ApiError::internal)??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn status(State(agent): State<Arc<Agent>>) -> ApiResult {
    let desired = agent.desired().generation;
    let applied = agent.applied.borrow().clone();
    Ok(axum::Json(json!({
        "host": agent.host,
        "desired_generation": desired,
        "applied_generation": applied.generation,
        "programs": applied.programs,
        "pending_ports": applied.pending_ports,
        "refused_ports": applied
            .refused_ports
            .iter()
            .map(|(port, why)| json!({"port": port, "why": why}))
            .collect::<Vec<_>>(),
        "store": agent.view.describe(),
        "encryption": agent.ipsec.get(),
    }))
    .into_response())
}

/// Every agent of the fleet: its host, the generation its kernel holds,
/// whether it is alive.
async fn fleet(State(agent): State<Arc<Agent>>) -> ApiResult {
    let view = agent.view.clone();
    let members = tokio::task::spawn_blocking(move || view.fleet())
        .await
        .map_err(ApiError::internal)?;
    match members {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this agent is not in fleet mode (--store etcd): it has no fleet",
        )),
        Some(Err(why)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the fleet store cannot be reached: {why}"),
        )),
        Some(Ok(m)) => Ok(axum::Json(m).into_response()),
    }
}

/// The ifindex of port `name`'s interface on this host: 404 if there is
/// no such port, 409 if it is not attached here.
fn local_ifindex(a: &Agent, desired: &Desired, name: &str) -> Result<u32, ApiError> {
    if desired.get(Kind::Port, name).is_none() {
        return Err(Refusal::NotFound(format!("no port {name}")).into());
    }
    desired
        .local_ports(&a.host)
        .into_iter()
        .find(|(p, _, _)| p.name == name)
        .map(|(_, _, ifindex)| ifindex)
        .ok_or_else(|| {
            Refusal::Conflict(format!("port {name} is not attached on host {}", a.host)).into()
        })
}

async fn port_stats(State(agent): State<Arc<Agent>>, Path(name): Path<String>) -> ApiResult {
    let a = agent.clone();
    tokio::task::spawn_blocking(move || {
        let desired = a.desired();
        let ifindex = local_ifindex(&a, &desired, &name)?;
        let stats = a.reader.stats()?;
        let p = stats.ports.get(&ifindex).copied().unwrap_or_default();
        let drops: BTreeMap<&str, u64> = stats
            .port_drops
            .get(&ifindex)
            .map(|d| d.iter().map(|(r, n)| (r.name(), *n)).collect())
            .unwrap_or_default();
        Ok(axum::Json(json!({
            "port": name,
            "host": a.host,
            "from_vm": {"packets": p.tx_packets, "bytes": p.tx_bytes},
            "to_vm": {"packets": p.rx_packets, "bytes": p.rx_bytes},
            "drops": p.drops,
            "drops_by_reason": drops,
        }))
        .into_response())
    })
    .await
    .map_err(ApiError::internal)?
}

/// `POST /v1/trace`: a frame, from a port's VM or from the underlay, run
/// through the trace build of the programs on this host's live tables and
/// through the model; nothing is written.
async fn trace(State(agent): State<Arc<Agent>>, req: Request) -> ApiResult {
    use cloison_dataplane::trace::{self as tr, Entry, Spec};
    let body = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|_| Refusal::Invalid(format!("a body is at most {MAX_BODY_BYTES} bytes")))?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TraceRequest {
        port: Option<String>,
        packet: Option<String>,
        frame: Option<String>,
        #[serde(default)]
        from_underlay: bool,
    }
    let r: TraceRequest = serde_json::from_slice(&body)
        .map_err(|e| Refusal::Invalid(format!("a trace request: {e}")))?;
    let a = agent.clone();
    tokio::task::spawn_blocking(move || {
        let desired = a.desired();
        let snap = match &desired.valid {
            Ok(v) => v.snapshot().clone(),
            Err(v) => {
                return Err(Refusal::Conflict(format!(
                    "the stored state is not applied (it is refused: {v}): nothing to trace against"
                ))
                .into())
            }
        };
        let frame = match &r.frame {
            Some(h) => Some(tr::unhex(h).map_err(|e| Refusal::Invalid(format!("frame: {e}")))?),
            None => None,
        };
        let report = match (r.from_underlay, &r.port) {
            (true, Some(_)) => {
                return Err(Refusal::Invalid(
                    "a frame comes from a port or from the underlay, not both".into(),
                )
                .into())
            }
            (true, None) => {
                let frame = frame.ok_or_else(|| {
                    Refusal::Invalid("a frame from the underlay is given in hex (frame)".into())
                })?;
                let uplink = a.uplink.lock().expect("uplink").clone().ok_or_else(|| {
                    Refusal::Conflict("this agent has no uplink to trace on".into())
                })?;
                let ifindex = netdev::ifindex(&uplink).ok_or_else(|| {
                    Refusal::Conflict(format!("the uplink {uplink} does not exist"))
                })?;
                a.reader.with(|dp| {
                    tr::trace(dp, &snap, Entry::Uplink(ifindex), &frame).map_err(trace_error)
                })?
            }
            (false, None) => {
                return Err(
                    Refusal::Invalid("name the port the frame comes from (port)".into()).into(),
                )
            }
            (false, Some(port)) => {
                let p = snap
                    .ports
                    .iter()
                    .find(|p| &p.name == port)
                    .ok_or_else(|| Refusal::NotFound(format!("no port {port}")))?;
                if p.host != a.host {
                    return Err(Refusal::Conflict(format!(
                        "port {port} is on host {}, not {}: trace it there",
                        p.host, a.host
                    ))
                    .into());
                }
                a.reader.with(|dp| {
                    let (ifindex, frame) = match (&r.packet, frame) {
                        (Some(_), Some(_)) | (None, None) => {
                            return Err(Refusal::Invalid(
                                "give the packet (text) or the frame (hex), one of them".into(),
                            )
                            .into())
                        }
                        (Some(text), None) => {
                            let spec: Spec = text
                                .parse()
                                .map_err(|e| Refusal::Invalid(format!("packet {text:?}: {e}")))?;
                            tr::frame_from_port(dp, &snap, port, &spec).map_err(trace_error)?
                        }
                        (None, Some(f)) => {
                            let i = netdev::ifindex(&p.interface).ok_or_else(|| {
                                Refusal::Conflict(format!(
                                    "port {port}: its interface {} does not exist",
                                    p.interface
                                ))
                            })?;
                            (i, f)
                        }
                    };
                    tr::trace(dp, &snap, Entry::Port(ifindex), &frame).map_err(trace_error)
                })?
            }
        };
        Ok(axum::Json(report).into_response())
    })
    .await
    .map_err(ApiError::internal)?
}

/// A trace's failure: what the request named that is not there is a 409,
/// the rest is the dataplane's.
fn trace_error(e: cloison_dataplane::Error) -> ApiError {
    match e {
        cloison_dataplane::Error::Invalid(m) => Refusal::Conflict(m).into(),
        e => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

/// `GET /v1/monitor?port=NAME&drops=true&filter=EXPR`: drop and new-flow
/// events as JSON lines, as they happen, until the client goes; a line
/// `{"kind":"lost","lost":N}` when events were lost meanwhile (over the
/// programs' rate, the ring full, or this client too slow); an empty line
/// when nothing happened for a while.
async fn monitor(State(agent): State<Arc<Agent>>, req: Request) -> ApiResult {
    use cloison_abi::monitor as m;
    use cloison_dataplane::monitor::Filter;
    let mut port = None;
    let mut drops_only = false;
    let mut filter = Filter::default();
    for (k, v) in query_pairs(req.uri().query().unwrap_or("")) {
        match k.as_str() {
            "port" => port = Some(v),
            "drops" => {
                drops_only = match v.as_str() {
                    "true" | "1" | "" => true,
                    "false" | "0" => false,
                    _ => return Err(Refusal::Invalid(format!("drops={v}: true or false")).into()),
                }
            }
            "filter" => {
                filter = Filter::parse(&v).map_err(|e| Refusal::Invalid(format!("filter: {e}")))?
            }
            _ => {
                return Err(Refusal::Invalid(format!(
                    "unknown parameter {k:?} (port, drops, filter)"
                ))
                .into())
            }
        }
    }
    let a = agent.clone();
    let slot = match &port {
        None => None,
        Some(name) => {
            let (name, a) = (name.clone(), a.clone());
            Some(
                tokio::task::spawn_blocking(move || {
                    let ifindex = local_ifindex(&a, &a.desired(), &name)?;
                    a.reader.with(|dp| {
                        let entries = dp.port_entries().map_err(ApiError::internal)?;
                        entries
                            .into_iter()
                            .find(|(i, _)| *i == ifindex)
                            .map(|(_, p)| p.slot)
                            .ok_or_else(|| {
                                Refusal::Conflict(format!("port {name} is not attached yet")).into()
                            })
                    })
                })
                .await
                .map_err(ApiError::internal)??,
            )
        }
    };
    let want = crate::monitor::Want {
        flags: if drops_only {
            m::F_DROPS
        } else {
            m::F_DROPS | m::F_FLOWS
        },
        slot,
    };
    let reader = a.reader.clone();
    let dp: crate::monitor::WithDataplane = Arc::new(move |f| {
        reader
            .with(|dp| {
                f(dp);
                Ok(())
            })
            .map_err(|e| e.to_string())
    });
    let lost_now = {
        let reader = a.reader.clone();
        move || {
            reader
                .with(|dp| dp.monitor_lost().map_err(ApiError::internal))
                .unwrap_or(0)
        }
    };
    let lost_base = lost_now();
    let watcher = a
        .monitor
        .watch(want, dp, a.desired.clone(), a.host.clone())
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e))?;
    struct Stream {
        watcher: crate::monitor::Watcher,
        want: crate::monitor::Want,
        filter: Filter,
        lagged: u64,
        reported: u64,
        tick: tokio::time::Interval,
        idle: u32,
    }
    let st = Stream {
        watcher,
        want,
        filter,
        lagged: 0,
        reported: 0,
        tick: tokio::time::interval(std::time::Duration::from_secs(1)),
        idle: 0,
    };
    let lines = futures_util::stream::unfold(
        (st, lost_now, lost_base),
        |(mut st, lost_now, base)| async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                tokio::select! {
                    got = st.watcher.rx.recv() => match got {
                        Ok(item) => {
                            let (ev, slot) = &*item;
                            if st.want.wants(ev, *slot) && st.filter.matches(ev) {
                                st.idle = 0;
                                let mut line = serde_json::to_vec(ev).unwrap_or_default();
                                line.push(b'\n');
                                return Some((Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(line)), (st, lost_now, base)));
                            }
                        }
                        Err(RecvError::Lagged(n)) => st.lagged += n,
                        Err(RecvError::Closed) => return None,
                    },
                    _ = st.tick.tick() => {
                        let lost = lost_now().saturating_sub(base) + st.lagged;
                        if lost > st.reported {
                            st.reported = lost;
                            let line = format!("{{\"kind\":\"lost\",\"lost\":{lost}}}\n");
                            return Some((Ok(axum::body::Bytes::from(line)), (st, lost_now, base)));
                        }
                        st.idle += 1;
                        if st.idle >= 5 {
                            // Something to write: a client gone is noticed.
                            st.idle = 0;
                            return Some((Ok(axum::body::Bytes::from_static(b"\n")), (st, lost_now, base)));
                        }
                    }
                }
            }
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

/// `a=b&c=d` pairs, percent-decoded (`+` is a space).
fn query_pairs(q: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let hex = |c: u8| (c as char).to_digit(16);
                    match (hex(b[i + 1]), hex(b[i + 2])) {
                        (Some(h), Some(l)) => {
                            out.push((h * 16 + l) as u8);
                            i += 2;
                        }
                        _ => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

async fn metrics(State(agent): State<Arc<Agent>>) -> ApiResult {
    let a = agent.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        let desired = a.desired();
        let host = &a.host;
        let _ = writeln!(out, "# TYPE cloison_desired_generation gauge");
        let _ = writeln!(out, "cloison_desired_generation{{host=\"{host}\"}} {}", desired.generation);
        let _ = writeln!(out, "# TYPE cloison_applied_generation gauge");
        let _ = writeln!(
            out,
            "cloison_applied_generation{{host=\"{host}\"}} {}",
            a.applied.borrow().generation
        );
        let since = a.view.unreachable_since();
        let _ = writeln!(out, "# TYPE cloison_store_up gauge");
        let _ = writeln!(out, "cloison_store_up{{host=\"{host}\"}} {}", u8::from(since.is_none()));
        let _ = writeln!(out, "# TYPE cloison_store_relists_total counter");
        let _ = writeln!(out, "cloison_store_relists_total{{host=\"{host}\"}} {}", a.view.relists());
        if let Some(t) = since {
            let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let _ = writeln!(out, "# TYPE cloison_store_down_since_seconds gauge");
            let _ = writeln!(out, "cloison_store_down_since_seconds{{host=\"{host}\"}} {secs}");
        }
        let ipsec = a.ipsec.get();
        if ipsec.mode == "ipsec" {
            let _ = writeln!(out, "# TYPE cloison_ipsec_ike_connected gauge");
            let _ = writeln!(
                out,
                "cloison_ipsec_ike_connected{{host=\"{host}\"}} {}",
                u8::from(ipsec.ike == "connected")
            );
            for (name, kind) in [
                ("up", "gauge"),
                ("rekeys_total", "counter"),
                ("downs_total", "counter"),
                ("packets_in", "gauge"),
                ("packets_out", "gauge"),
                ("bytes_in", "gauge"),
                ("bytes_out", "gauge"),
            ] {
                let _ = writeln!(out, "# TYPE cloison_ipsec_peer_{name} {kind}");
                for p in &ipsec.peers {
                    let v = match name {
                        "up" => u64::from(p.up),
                        "rekeys_total" => p.rekeys,
                        "downs_total" => p.downs,
                        "packets_in" => p.packets_in,
                        "packets_out" => p.packets_out,
                        "bytes_in" => p.bytes_in,
                        _ => p.bytes_out,
                    };
                    let _ = writeln!(
                        out,
                        "cloison_ipsec_peer_{name}{{host=\"{host}\",peer=\"{}\"}} {v}",
                        p.host
                    );
                }
            }
        }
        let _ = writeln!(out, "# TYPE cloison_gateway_requests_total counter");
        for ((service, outcome), n) in a.gateway.all() {
            let _ = writeln!(
                out,
                "cloison_gateway_requests_total{{host=\"{host}\",service=\"{service}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        let applies = a.applied.borrow().applies;
        let _ = writeln!(out, "# TYPE cloison_apply_duration_seconds summary");
        let _ = writeln!(out, "cloison_apply_duration_seconds_sum{{host=\"{host}\"}} {}", applies.micros_sum as f64 / 1e6);
        let _ = writeln!(out, "cloison_apply_duration_seconds_count{{host=\"{host}\"}} {}", applies.total);
        let _ = writeln!(out, "# TYPE cloison_apply_last_duration_seconds gauge");
        let _ = writeln!(out, "cloison_apply_last_duration_seconds{{host=\"{host}\"}} {}", applies.last_micros as f64 / 1e6);
        let _ = writeln!(out, "# TYPE cloison_apply_failures_total counter");
        let _ = writeln!(out, "cloison_apply_failures_total{{host=\"{host}\"}} {}", applies.failures);
        let _ = writeln!(out, "# TYPE cloison_monitor_watchers gauge");
        let _ = writeln!(out, "cloison_monitor_watchers{{host=\"{host}\"}} {}", a.monitor.watchers());
        if let Ok(lost) = a.reader.with(|dp| dp.monitor_lost().map_err(ApiError::internal)) {
            let _ = writeln!(out, "# TYPE cloison_monitor_events_lost_total counter");
            let _ = writeln!(out, "cloison_monitor_events_lost_total{{host=\"{host}\"}} {lost}");
        }
        let Ok(stats) = a.reader.stats() else {
            return Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response());
        };
        // How full the maps are, and each port's and tenant's conntrack
        // against its share.
        if let Ok((fill, ports, uses)) = a.reader.with(|dp| {
            let fill = dp.map_fill().map_err(ApiError::internal)?;
            let ports = dp.port_entries().map_err(ApiError::internal)?;
            let mut uses = BTreeMap::new();
            for (_, p) in &ports {
                for i in [p.slot, cloison_abi::MAX_PORTS + p.tenant] {
                    uses.insert(i, dp.conntrack_use(i).map_err(ApiError::internal)?);
                }
            }
            Ok((fill, ports, uses))
        }) {
            let _ = writeln!(out, "# TYPE cloison_map_entries gauge");
            for (m, n, _) in &fill {
                let _ = writeln!(out, "cloison_map_entries{{host=\"{host}\",map=\"{m}\"}} {n}");
            }
            let _ = writeln!(out, "# TYPE cloison_map_capacity gauge");
            for (m, _, c) in &fill {
                let _ = writeln!(out, "cloison_map_capacity{{host=\"{host}\",map=\"{m}\"}} {c}");
            }
            let local = desired.local_ports(&a.host);
            let by_ifindex: BTreeMap<u32, (&Port, &Network)> =
                local.iter().map(|(p, n, i)| (*i, (p, n))).collect();
            let _ = writeln!(out, "# TYPE cloison_port_conntrack_entries gauge");
            let _ = writeln!(out, "# TYPE cloison_port_conntrack_share gauge");
            let mut tenants: BTreeMap<&str, (i64, u32)> = BTreeMap::new();
            for (ifindex, info) in &ports {
                let Some((p, net)) = by_ifindex.get(ifindex) else { continue };
                let used = uses.get(&info.slot).copied().unwrap_or(0);
                let labels = format!("host=\"{host}\",port=\"{}\",tenant=\"{}\"", p.name, net.tenant);
                let _ = writeln!(out, "cloison_port_conntrack_entries{{{labels}}} {used}");
                let _ = writeln!(out, "cloison_port_conntrack_share{{{labels}}} {}", info.ct_port_quota);
                let t = uses.get(&(cloison_abi::MAX_PORTS + info.tenant)).copied().unwrap_or(0);
                tenants.insert(&net.tenant, (t, info.ct_tenant_quota));
            }
            let _ = writeln!(out, "# TYPE cloison_tenant_conntrack_entries gauge");
            let _ = writeln!(out, "# TYPE cloison_tenant_conntrack_share gauge");
            for (t, (used, share)) in tenants {
                let _ = writeln!(out, "cloison_tenant_conntrack_entries{{host=\"{host}\",tenant=\"{t}\"}} {used}");
                let _ = writeln!(out, "cloison_tenant_conntrack_share{{host=\"{host}\",tenant=\"{t}\"}} {share}");
            }
        }
        let _ = writeln!(out, "# TYPE cloison_drops_total counter");
        for r in DropReason::ALL {
            let n = stats.drops.get(r).copied().unwrap_or(0);
            let _ = writeln!(out, "cloison_drops_total{{host=\"{host}\",reason=\"{}\"}} {n}", r.name());
        }
        let mut tenants: BTreeMap<String, [u64; 5]> = BTreeMap::new();
        let series = [
            ("cloison_port_from_vm_packets_total", 0),
            ("cloison_port_from_vm_bytes_total", 1),
            ("cloison_port_to_vm_packets_total", 2),
            ("cloison_port_to_vm_bytes_total", 3),
            ("cloison_port_drops_total", 4),
        ];
        let ports = desired.local_ports(&a.host);
        for (metric, i) in series {
            let _ = writeln!(out, "# TYPE {metric} counter");
            for (p, net, ifindex) in &ports {
                let st = stats.ports.get(ifindex).copied().unwrap_or_default();
                let v = [st.tx_packets, st.tx_bytes, st.rx_packets, st.rx_bytes, st.drops][i];
                tenants.entry(net.tenant.clone()).or_default()[i] += v;
                let _ = writeln!(
                    out,
                    "{metric}{{host=\"{host}\",port=\"{}\",network=\"{}\",tenant=\"{}\"}} {v}",
                    p.name, net.name, net.tenant
                );
            }
        }
        let _ = writeln!(out, "# TYPE cloison_port_drops_by_reason_total counter");
        for (p, net, ifindex) in &ports {
            for (r, n) in stats.port_drops.get(ifindex).into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "cloison_port_drops_by_reason_total{{host=\"{host}\",port=\"{}\",tenant=\"{}\",reason=\"{}\"}} {n}",
                    p.name,
                    net.tenant,
                    r.name()
                );
            }
        }
        for (metric, i) in series {
            let tmetric = metric.replace("cloison_port_", "cloison_tenant_");
            let _ = writeln!(out, "# TYPE {tmetric} counter");
            for (t, v) in &tenants {
                let _ = writeln!(out, "{tmetric}{{host=\"{host}\",tenant=\"{t}\"}} {}", v[i]);
            }
        }
        Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
    })
    .await
    .map_err(ApiError::internal)?
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// Whether `given` is the token. Their SHA-256 digests are compared in
/// constant time: the time taken says nothing of the token, not even its
/// length (the digests are of one length whatever the inputs').
pub fn token_matches(given: &[u8], token: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(given).ct_eq(&Sha256::digest(token)).into()
}

/// Every request on the TCP listener carries `Authorization: Bearer <token>`.
async fn bearer(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let got = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| v.strip_prefix(b"Bearer "));
    let ok = got.is_some_and(|g| token_matches(g, token.as_bytes()));
    if !ok {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or bad bearer token",
        )
        .into_response();
    }
    next.run(req).await
}

/// The API as an OpenAPI 3 document (hand-written: it is the contract,
/// docs/api.md in machine form; a test holds it and the routes together).
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

/// A route: its path (as OpenAPI writes it) and methods, beside the handlers.
pub struct Route {
    pub path: String,
    pub methods: &'static [&'static str],
    handler: MethodRouter<Arc<Agent>>,
}

fn route(
    path: impl Into<String>,
    methods: &'static [&'static str],
    handler: MethodRouter<Arc<Agent>>,
) -> Route {
    Route {
        path: path.into(),
        methods,
        handler,
    }
}

/// Every route the server has.
pub fn routes() -> Vec<Route> {
    let mut out = vec![
        route("/v1/status", &["get"], get(status)),
        route("/v1/fleet", &["get"], get(fleet)),
        route("/v1/openapi.json", &["get"], get(openapi)),
        route("/metrics", &["get"], get(metrics)),
        route("/v1/ports/{name}/stats", &["get"], get(port_stats)),
        route("/v1/trace", &["post"], axum::routing::post(trace)),
        route("/v1/monitor", &["get"], get(monitor)),
    ];
    for kind in Kind::ALL {
        let list = move |State(a): State<Arc<Agent>>| list_objects(a, kind);
        let one = move |State(a): State<Arc<Agent>>, Path(n): Path<String>| get_object(a, kind, n);
        let put = move |State(a): State<Arc<Agent>>, Path(n): Path<String>, req: Request| {
            put_object(a, kind, n, req)
        };
        let del =
            move |State(a): State<Arc<Agent>>, Path(n): Path<String>| delete_object(a, kind, n);
        out.push(route(format!("/v1/{}", kind.path()), &["get"], get(list)));
        out.push(route(
            format!("/v1/{}/{{name}}", kind.path()),
            &["get", "put", "delete"],
            get(one).put(put).delete(del),
        ));
    }
    out
}

/// How long a request may take, body included.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub fn router(agent: Arc<Agent>, token: Option<Arc<String>>) -> Router {
    let r = routes()
        .into_iter()
        .fold(Router::new(), |r, rt| r.route(&rt.path, rt.handler))
        .fallback(not_found)
        .with_state(agent);
    let r = match token {
        Some(t) => r.layer(middleware::from_fn_with_state(t, bearer)),
        None => r,
    };
    // On every route: no body over the limit, no request held open past
    // the timeout (a slow client gets 408 and its connection closed).
    r.layer(tower_http::limit::RequestBodyLimitLayer::new(
        MAX_BODY_BYTES,
    ))
    .layer(tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        REQUEST_TIMEOUT,
    ))
    .layer(middleware::map_response(json_errors))
}

/// The limit and timeout layers answer with an empty or plain body: every
/// error of the API is a JSON error document.
async fn json_errors(r: Response) -> Response {
    let json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE if !json => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a body is at most {MAX_BODY_BYTES} bytes"),
        )
        .into_response(),
        StatusCode::REQUEST_TIMEOUT if !json => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "the request took longer than {} s",
                REQUEST_TIMEOUT.as_secs()
            ),
        )
        .into_response(),
        _ => r,
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            query_pairs("port=a%201&filter=tcp+and+dport%2022&drops&bad=%zz%4"),
            [
                ("port", "a 1"),
                ("filter", "tcp and dport 22"),
                ("drops", ""),
                ("bad", "%zz%4"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert!(query_pairs("").is_empty());
        assert_eq!(query_pairs("x=%C3%A9")[0].1, "é");
    }

    fn agent(dir: &std::path::Path) -> Arc<Agent> {
        let store = crate::store::Redb::open(dir).expect("store");
        let pins = dir.join("no-pins-here");
        Agent::new("hv1".into(), Box::new(store), pins)
            .expect("agent")
            .0
    }

    fn doc() -> openapiv3::OpenAPI {
        serde_json::from_str(OPENAPI_JSON).expect("openapi.json is an OpenAPI 3 document")
    }

    fn operation<'a>(
        item: &'a openapiv3::PathItem,
        method: &str,
    ) -> Option<&'a openapiv3::Operation> {
        match method {
            "get" => item.get.as_ref(),
            "put" => item.put.as_ref(),
            "post" => item.post.as_ref(),
            "delete" => item.delete.as_ref(),
            _ => None,
        }
    }

    #[test]
    fn every_route_of_the_server_is_documented() {
        let doc = doc();
        for r in routes() {
            let item = match doc.paths.paths.get(&r.path) {
                Some(openapiv3::ReferenceOr::Item(i)) => i,
                _ => panic!("{} is served but not in openapi.json", r.path),
            };
            for m in r.methods {
                assert!(
                    operation(item, m).is_some(),
                    "{} {} is served but not in openapi.json",
                    m.to_uppercase(),
                    r.path
                );
            }
        }
    }

    /// Every documented operation answers, with one of the statuses the
    /// document gives it (the fallback's 404 "no such endpoint" is not one:
    /// its body says so and is checked).
    #[tokio::test]
    async fn every_documented_route_answers_as_documented() {
        let dir = std::env::temp_dir().join(format!("cloison-openapi-{}", std::process::id()));
        let app = router(agent(&dir), None);
        let doc = doc();
        let mut n = 0;
        for (path, item) in &doc.paths.paths {
            let openapiv3::ReferenceOr::Item(item) = item else {
                panic!("{path}: references are not used");
            };
            for method in ["get", "put", "post", "delete"] {
                let Some(op) = operation(item, method) else {
                    continue;
                };
                let uri = path.replace("{name}", "x-1");
                let body = if method == "put" { "{}" } else { "" };
                let req = axum::http::Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(&uri)
                    .body(Body::from(body))
                    .expect("request");
                let resp = app.clone().oneshot(req).await.expect("answer");
                let status = resp.status().as_u16().to_string();
                let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .expect("body");
                let text = String::from_utf8_lossy(&bytes);
                assert!(
                    !text.contains("no such endpoint"),
                    "{method} {uri}: not routed: {text}"
                );
                assert!(
                    op.responses
                        .responses
                        .contains_key(&openapiv3::StatusCode::Code(status.parse().unwrap())),
                    "{method} {uri} answered {status}, which openapi.json does not list: {text}"
                );
                n += 1;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(n >= 19, "only {n} operations documented");
    }

    #[test]
    fn tokens_match_only_themselves() {
        assert!(token_matches(
            b"s3cret-token-0123456789",
            b"s3cret-token-0123456789"
        ));
        assert!(!token_matches(
            b"s3cret-token-012345678",
            b"s3cret-token-0123456789"
        ));
        assert!(!token_matches(
            b"s3cret-token-01234567890",
            b"s3cret-token-0123456789"
        ));
        assert!(!token_matches(b"", b"s3cret-token-0123456789"));
        assert!(!token_matches(
            b"S3cret-token-0123456789",
            b"s3cret-token-0123456789"
        ));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_on_every_route() {
        let dir = std::env::temp_dir().join(format!("cloison-limit-{}", std::process::id()));
        let app = router(agent(&dir), None);
        for (method, uri) in [("PUT", "/v1/hosts/hv1"), ("GET", "/v1/status")] {
            let req = axum::http::Request::builder()
                .method(method)
                .uri(uri)
                .header("content-length", (MAX_BODY_BYTES + 1).to_string())
                .body(Body::from(vec![b' '; MAX_BODY_BYTES + 1]))
                .expect("request");
            let resp = app.clone().oneshot(req).await.expect("answer");
            assert_eq!(
                resp.status(),
                StatusCode::PAYLOAD_TOO_LARGE,
                "{method} {uri}"
            );
            assert_eq!(error_code(resp).await, "too_large", "{method} {uri}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    async fn error_code(resp: Response) -> String {
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .expect("body");
        let v: Value = serde_json::from_slice(&body).expect("a JSON error");
        v["error"]["code"].as_str().expect("a code").to_string()
    }

    /// A client that never finishes its body holds nothing past the timeout.
    #[tokio::test(start_paused = true)]
    async fn a_request_that_never_ends_times_out() {
        let dir = std::env::temp_dir().join(format!("cloison-timeout-{}", std::process::id()));
        let app = router(agent(&dir), None);
        let never = futures_util::stream::pending::<Result<Vec<u8>, std::io::Error>>();
        let req = axum::http::Request::put("/v1/hosts/hv1")
            .body(Body::from_stream(never))
            .expect("request");
        let resp = app.oneshot(req).await.expect("answer");
        assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(error_code(resp).await, "timeout");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn openapi_json_is_served() {
        let dir = std::env::temp_dir().join(format!("cloison-openapi-s-{}", std::process::id()));
        let app = router(agent(&dir), None);
        let req = axum::http::Request::get("/v1/openapi.json")
            .body(Body::empty())
            .expect("request");
        let resp = app.oneshot(req).await.expect("answer");
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let served: openapiv3::OpenAPI = serde_json::from_slice(&bytes).expect("OpenAPI 3");
        assert_eq!(served, doc());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
