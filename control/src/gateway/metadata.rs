//! The instance metadata service, `http://169.254.169.254/`, for each VM:
//! a smoltcp TCP stack per port (made on the port's first request, dropped
//! once idle), fed with the IPv4 packets its VM sends there, so the VM's
//! identity is the port the packets entered by, whatever addresses two
//! tenants share. Answered from the port object, or proxied to
//! `--metadata-upstream` with OpenStack's headers (`X-Instance-ID`,
//! `X-Tenant-ID`, `X-Forwarded-For`, `X-Instance-ID-Signature`: hex
//! HMAC-SHA256 of the instance id with the shared secret), as Neutron's
//! metadata proxy does.
use std::{
    collections::{HashMap, VecDeque},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant as StdInstant},
};

use cloison_abi::{steer_mac, METADATA_IP};
use hmac::{Hmac, Mac};
use smoltcp::{
    iface::{Config as IfaceConfig, Interface, PollIngressSingleResult, SocketHandle, SocketSet},
    phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken},
    socket::tcp,
    time::Instant,
    wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address, Ipv4Packet},
};
use tokio::sync::mpsc;

use super::serve::Local;

/// Where requests go, if not answered from the port.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// `http://host:port` (a path prefix is kept).
    pub upstream: Option<Upstream>,
}

#[derive(Clone, Debug)]
pub struct Upstream {
    pub authority: String,
    pub path_prefix: String,
    pub secret: Vec<u8>,
}

impl Upstream {
    /// `url` must be `http://HOST[:PORT][/PREFIX]`.
    pub fn parse(url: &str, secret: Vec<u8>) -> Result<Upstream, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("--metadata-upstream {url:?}: an http:// URL"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("--metadata-upstream {url:?}: no host"));
        }
        let authority = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Upstream {
            authority,
            path_prefix: path.to_string(),
            secret,
        })
    }
}

/// Connections a VM may have open to the service at once.
pub const MAX_CONNECTIONS: usize = 8;
/// A request's head (request line and headers) at most.
pub const MAX_REQUEST: usize = 8192;
/// A stack with no connection is dropped after this long.
const IDLE: Duration = Duration::from_secs(60);
/// A connection is reset this long after it was accepted, whatever it is
/// doing (a metadata request takes milliseconds; a VM holding its
/// connections open would hold its own slots only, but for ever).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// The upstream's whole answer: within this time, at most this size.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
const UPSTREAM_MAX_BODY: usize = 1 << 20;
const SOCKET_BUFFER: usize = 16 * 1024;

/// HMAC-SHA256 of `instance_id` with `secret`, in hex.
pub fn signature(secret: &[u8], instance_id: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(instance_id.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// IPv4 packets in and out of one port's stack.
#[derive(Default)]
struct Queue {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        self.0.push_back(b);
        r
    }
}

impl Device for Queue {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = self.mtu;
        c
    }
}

enum Conn {
    /// Reading the request head.
    Reading(Vec<u8>),
    /// Waiting for the upstream's answer: which request, and its task
    /// (aborted if the connection goes first).
    Waiting(u64, tokio::task::AbortHandle),
    /// Writing the answer: bytes, how many sent.
    Writing(Vec<u8>, usize),
}

/// A socket of a port's stack: what its connection is doing, and since
/// when it was accepted (none while it listens).
struct Slot {
    conn: Conn,
    accepted: Option<StdInstant>,
}

impl Slot {
    fn listening() -> Slot {
        Slot {
            conn: Conn::Reading(Vec::new()),
            accepted: None,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Conn::Waiting(_, task) = &self.conn {
            task.abort();
        }
    }
}

struct Stack {
    local: Arc<Local>,
    iface: Interface,
    queue: Queue,
    sockets: SocketSet<'static>,
    conns: HashMap<SocketHandle, Slot>,
    last_used: StdInstant,
    /// Ids of the requests sent upstream (an answer finds its request by
    /// it, never a newer connection that took the same socket).
    next_request: u64,
}

/// An upstream answer for a connection.
pub struct Done {
    ifindex: u32,
    socket: SocketHandle,
    request: u64,
    answer: Vec<u8>,
}

pub struct Metadata {
    cfg: Config,
    stacks: HashMap<u32, Stack>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    epoch: StdInstant,
}

fn listener() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
    );
    s.set_timeout(Some(smoltcp::time::Duration::from_secs(30)));
    s.listen(80).expect("port 80 is valid");
    s
}

impl Metadata {
    pub fn new(cfg: Config) -> Metadata {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Metadata {
            cfg,
            stacks: HashMap::new(),
            done_tx,
            done_rx,
            epoch: StdInstant::now(),
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Takes a frame the VM of port `ifindex` sent to the metadata address.
    pub fn receive(
        &mut self,
        ifindex: u32,
        local: &Arc<Local>,
        frame: &[u8],
    ) -> Result<(), &'static str> {
        if frame.get(6..12) != Some(&local.port.mac.0[..]) {
            return Err("not_the_ports_mac");
        }
        let ip = frame.get(14..).ok_or("malformed")?;
        let p = Ipv4Packet::new_checked(ip).map_err(|_| "malformed")?;
        if p.dst_addr() != Ipv4Address::from(METADATA_IP) {
            return Err("malformed");
        }
        let now = self.now();
        let stack = match self.stacks.get_mut(&ifindex) {
            // The same port, same generation of it: its stack; a port
            // replaced on the interface gets a new one.
            Some(s) if s.local.port == local.port => s,
            _ => {
                self.stacks.insert(ifindex, Stack::new(local.clone(), now));
                self.stacks.get_mut(&ifindex).expect("just made")
            }
        };
        if stack.queue.rx.len() >= 256 {
            return Err("queue_full");
        }
        let len = usize::from(p.total_len());
        stack.queue.rx.push_back(ip[..len].to_vec());
        stack.last_used = StdInstant::now();
        Ok(())
    }

    /// How long until a stack needs polling (retransmissions, timeouts).
    pub fn next_poll(&mut self) -> Duration {
        let now = self.now();
        let mut wake = Duration::from_secs(1);
        for s in self.stacks.values_mut() {
            if let Some(d) = s.iface.poll_delay(now, &s.sockets) {
                wake = wake.min(Duration::from_micros(d.total_micros()));
            }
        }
        wake
    }

    pub async fn finished(&mut self) -> Option<Done> {
        self.done_rx.recv().await
    }

    /// An upstream answer, to the connection that asked.
    pub fn deliver(&mut self, d: Done) {
        if let Some(s) = self.stacks.get_mut(&d.ifindex) {
            if let Some(slot) = s.conns.get_mut(&d.socket) {
                if matches!(slot.conn, Conn::Waiting(id, _) if id == d.request) {
                    slot.conn = Conn::Writing(d.answer, 0);
                }
            }
        }
    }

    /// Runs every stack: what they send, as Ethernet frames for the tap
    /// (the port's ifindex in the source MAC): (ifindex, frame).
    pub fn poll(&mut self) -> Vec<(u32, Vec<u8>)> {
        let now = self.now();
        let mut out = Vec::new();
        let upstream = self.cfg.upstream.clone();
        let done = self.done_tx.clone();
        self.stacks.retain(|ifindex, s| {
            s.run(now, *ifindex, upstream.as_ref(), &done);
            for p in s.queue.tx.drain(..) {
                let mut f = Vec::with_capacity(14 + p.len());
                f.extend(s.local.port.mac.0);
                f.extend(steer_mac(*ifindex));
                f.extend(0x0800u16.to_be_bytes());
                f.extend(p);
                out.push((*ifindex, f));
            }
            s.conns.values().any(|c| c.accepted.is_some()) || s.last_used.elapsed() < IDLE
        });
        out
    }
}

impl Stack {
    fn new(local: Arc<Local>, now: Instant) -> Stack {
        let mut queue = Queue {
            mtu: local.network.mtu as usize,
            ..Default::default()
        };
        let mut config = IfaceConfig::new(HardwareAddress::Ip);
        // Initial sequence numbers a VM cannot predict.
        config.random_seed = random_seed();
        let mut iface = Interface::new(config, &mut queue, now);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(METADATA_IP.into()), 32))
                .expect("one address");
        });
        // Everything goes back to the VM, which the medium reaches without
        // a next hop: a default route makes every address routable.
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::from(METADATA_IP))
            .expect("one route");
        let mut sockets = SocketSet::new(vec![]);
        let h = sockets.add(listener());
        let mut conns = HashMap::new();
        conns.insert(h, Slot::listening());
        Stack {
            local,
            iface,
            queue,
            sockets,
            conns,
            last_used: StdInstant::now(),
            next_request: 0,
        }
    }

    fn run(
        &mut self,
        now: Instant,
        ifindex: u32,
        upstream: Option<&Upstream>,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        // One packet at a time, the connections looked after between two:
        // a VM that closes a connection and opens the next finds the
        // first one's slot free and a socket listening.
        self.iface.poll_maintenance(now);
        loop {
            let r = self
                .iface
                .poll_ingress_single(now, &mut self.queue, &mut self.sockets);
            self.serve(ifindex, upstream, done);
            if r == PollIngressSingleResult::None {
                break;
            }
        }
        // What the connections have to send, at once.
        self.iface
            .poll_egress(now, &mut self.queue, &mut self.sockets);
    }

    fn serve(
        &mut self,
        ifindex: u32,
        upstream: Option<&Upstream>,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        let mut listening = 0;
        let mut closed = Vec::new();
        for (h, slot) in self.conns.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if s.state() == tcp::State::Listen {
                listening += 1;
                continue;
            }
            // Done: closed, or waiting out TIME-WAIT (the service closes
            // first, so every connection ends there): its slot is free.
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                closed.push(*h);
                continue;
            }
            let accepted = *slot.accepted.get_or_insert_with(StdInstant::now);
            if accepted.elapsed() > CONNECTION_LIFETIME {
                s.abort();
                closed.push(*h);
                continue;
            }
            let conn = &mut slot.conn;
            match conn {
                Conn::Reading(head) => {
                    let mut buf = [0u8; 2048];
                    while s.can_recv() {
                        match s.recv_slice(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend(&buf[..n]),
                        }
                    }
                    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                        if head.len() > MAX_REQUEST {
                            *conn = Conn::Writing(
                                response(431, "text/plain", b"request too large\n"),
                                0,
                            );
                        } else if s.state() == tcp::State::CloseWait {
                            // The VM closed before a whole request.
                            s.close();
                        }
                        continue;
                    };
                    let peer = match s.remote_endpoint().map(|e| e.addr) {
                        Some(IpAddress::Ipv4(a)) => a,
                        _ => Ipv4Addr::UNSPECIFIED,
                    };
                    let req = String::from_utf8_lossy(&head[..end]).into_owned();
                    match (parse_request(&req), upstream) {
                        (Err(code), _) => {
                            *conn = Conn::Writing(response(code, "text/plain", b"bad request\n"), 0)
                        }
                        (Ok((method, path)), Some(up)) => {
                            self.next_request += 1;
                            let request = self.next_request;
                            let (local, up, done, h) =
                                (self.local.clone(), up.clone(), done.clone(), *h);
                            let task = tokio::spawn(async move {
                                let answer = proxy(&up, &local, peer, &method, &path).await;
                                let _ = done.send(Done {
                                    ifindex,
                                    socket: h,
                                    request,
                                    answer,
                                });
                            });
                            *conn = Conn::Waiting(request, task.abort_handle());
                        }
                        (Ok((method, path)), None) => {
                            *conn = Conn::Writing(from_port(&self.local, &method, &path), 0)
                        }
                    }
                }
                Conn::Waiting(..) => {}
                Conn::Writing(bytes, sent) => {
                    while *sent < bytes.len() && s.can_send() {
                        match s.send_slice(&bytes[*sent..]) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => *sent += n,
                        }
                    }
                    if *sent == bytes.len() {
                        s.close();
                    }
                }
            }
        }
        for h in closed {
            self.conns.remove(&h);
            self.sockets.remove(h);
        }
        // Always one socket listening, while the VM has fewer connections
        // than its share: further SYNs are refused (reset).
        if listening == 0 && self.conns.len() < MAX_CONNECTIONS {
            let h = self.sockets.add(listener());
            self.conns.insert(h, Slot::listening());
        }
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // getrandom(2) never fails for 8 bytes once the pool is initialised.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        return t.map_or(0, |d| d.as_nanos() as u64) ^ std::process::id() as u64;
    }
    u64::from_ne_bytes(b)
}

/// The method and path of a request head, or the status to refuse it with.
fn parse_request(head: &str) -> Result<(String, String), u16> {
    let line = head.lines().next().ok_or(400u16)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    if !version.starts_with("HTTP/1.") || !path.starts_with('/') {
        return Err(400);
    }
    if method != "GET" && method != "HEAD" {
        return Err(405);
    }
    Ok((method.to_string(), path.to_string()))
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Bad Gateway",
    }
}

fn response(code: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(code),
        body.len()
    )
    .into_bytes();
    r.extend(body);
    r
}

/// The answer made from the port object itself.
pub fn from_port(local: &Local, method: &str, path: &str) -> Vec<u8> {
    let p = &local.port;
    let hostname = p.hostname.clone().unwrap_or_else(|| p.name.clone());
    let instance_id = p.instance_id.clone().unwrap_or_else(|| p.name.clone());
    let ipv4 = p
        .ips
        .iter()
        .find(|a| a.is_ipv4())
        .map(|a| a.to_string())
        .unwrap_or_default();
    let path = path.split('?').next().unwrap_or("");
    let (code, ty, body): (u16, &str, Vec<u8>) = match path {
        "/" => (200, "text/plain", b"latest\n".to_vec()),
        "/latest" | "/latest/" => (200, "text/plain", b"meta-data/\n".to_vec()),
        "/latest/meta-data" | "/latest/meta-data/" => (
            200,
            "text/plain",
            b"hostname\ninstance-id\nlocal-ipv4\n".to_vec(),
        ),
        "/latest/meta-data/hostname" => (200, "text/plain", hostname.clone().into_bytes()),
        "/latest/meta-data/instance-id" => (200, "text/plain", instance_id.clone().into_bytes()),
        "/latest/meta-data/local-ipv4" => (200, "text/plain", ipv4.into_bytes()),
        "/openstack" | "/openstack/" => (200, "text/plain", b"latest\n".to_vec()),
        "/openstack/latest" | "/openstack/latest/" => {
            (200, "text/plain", b"meta_data.json\n".to_vec())
        }
        "/openstack/latest/meta_data.json" => (
            200,
            "application/json",
            serde_json::to_vec(&serde_json::json!({
                "uuid": instance_id,
                "hostname": hostname,
                "name": p.name,
            }))
            .expect("JSON"),
        ),
        _ => (404, "text/plain", b"not found\n".to_vec()),
    };
    let mut r = response(code, ty, &body);
    if method == "HEAD" {
        let head_end = r.windows(4).position(|w| w == b"\r\n\r\n").expect("a head") + 4;
        r.truncate(head_end);
    }
    r
}

/// The upstream's answer to the VM's request, with the OpenStack headers
/// naming the port's instance (502 if it cannot be reached).
async fn proxy(up: &Upstream, local: &Local, peer: Ipv4Addr, method: &str, path: &str) -> Vec<u8> {
    let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, proxy_inner(up, local, peer, method, path))
        .await
        .unwrap_or_else(|_| Err("no whole answer in time".into()));
    match answer {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, upstream = %up.authority, "metadata upstream");
            response(502, "text/plain", b"metadata upstream unreachable\n")
        }
    }
}

async fn proxy_inner(
    up: &Upstream,
    local: &Local,
    peer: Ipv4Addr,
    method: &str,
    path: &str,
) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
    use http_body_util::{BodyExt, Empty, Limited};
    let instance_id = local
        .port
        .instance_id
        .clone()
        .unwrap_or_else(|| local.port.name.clone());
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&up.authority),
    )
    .await??;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", up.path_prefix))
        .header("Host", &up.authority)
        .header("X-Instance-ID", &instance_id)
        .header("X-Tenant-ID", &local.network.tenant)
        .header("X-Forwarded-For", peer.to_string())
        .header(
            "X-Instance-ID-Signature",
            signature(&up.secret, &instance_id),
        )
        .body(Empty::<hyper::body::Bytes>::new())?;
    let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??;
    let code = res.status().as_u16();
    let ty = res
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain")
        .to_string();
    let body = Limited::new(res.into_body(), UPSTREAM_MAX_BODY)
        .collect()
        .await?
        .to_bytes();
    Ok(response(code, &ty, &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Arc<Local> {
        let network: cloison_dataplane::Network = serde_json::from_value(serde_json::json!({
            "name": "n", "tenant": "t", "vni": 1001, "subnets": ["10.0.0.0/24"]
        }))
        .unwrap();
        let port: cloison_dataplane::Port = serde_json::from_value(serde_json::json!({
            "name": "vm1", "network": "n", "host": "hv1", "interface": "tap1",
            "mac": "02:00:00:00:00:05", "ips": ["10.0.0.5"], "instance_id": "i-123"
        }))
        .unwrap();
        Arc::new(Local { port, network })
    }

    /// A VM's TCP stack (smoltcp's own) fetching `path` through the
    /// service, frames carried both ways as the tap would: the answer.
    fn fetch(m: &mut Metadata, local: &Arc<Local>, path: &str) -> String {
        // Each connection from a port of its own, as a VM's kernel picks.
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(40000);
        let client_port = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut q = Queue {
            mtu: 1450,
            ..Default::default()
        };
        let t0 = Instant::from_millis(0);
        let mut iface = Interface::new(IfaceConfig::new(HardwareAddress::Ip), &mut q, t0);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(10, 0, 0, 5), 24)).unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(10, 0, 0, 254))
            .unwrap();
        let mut sockets = SocketSet::new(vec![]);
        let h = sockets.add(tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 4096]),
            tcp::SocketBuffer::new(vec![0; 4096]),
        ));
        sockets
            .get_mut::<tcp::Socket>(h)
            .connect(
                iface.context(),
                (IpAddress::v4(169, 254, 169, 254), 80),
                client_port,
            )
            .unwrap();
        let (mut sent, mut got) = (false, Vec::new());
        for i in 0..200 {
            let now = Instant::from_millis(i * 10);
            iface.poll(now, &mut q, &mut sockets);
            let s = sockets.get_mut::<tcp::Socket>(h);
            if s.may_send() && !sent {
                s.send_slice(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                    .unwrap();
                sent = true;
            }
            while s.can_recv() {
                let mut b = [0u8; 1024];
                let n = s.recv_slice(&mut b).unwrap();
                got.extend(&b[..n]);
            }
            if sent && !s.may_recv() {
                // The answer is whole: the VM closes its end too.
                s.close();
                if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                    break;
                }
            }
            iface.poll(now, &mut q, &mut sockets);
            for p in q.tx.drain(..) {
                let mut f = vec![2, 0xc1, 0x0a, 0, 3, 0xe9];
                f.extend(local.port.mac.0);
                f.extend([8, 0]);
                f.extend(p);
                m.receive(7, local, &f).unwrap();
            }
            for (ifindex, f) in m.poll() {
                assert_eq!(ifindex, 7);
                assert_eq!(&f[..6], &local.port.mac.0, "to the VM");
                assert_eq!(&f[6..12], &steer_mac(7), "naming its port");
                q.rx.push_back(f[14..].to_vec());
            }
        }
        String::from_utf8(got).unwrap()
    }

    #[test]
    fn a_vm_gets_its_ports_answers_over_tcp() {
        let (mut m, local) = (Metadata::new(Config::default()), local());
        let a = fetch(&mut m, &local, "/latest/meta-data/instance-id");
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(a.ends_with("\r\n\r\ni-123"), "{a}");
        let a = fetch(&mut m, &local, "/openstack/latest/meta_data.json");
        assert!(a.contains(r#""uuid":"i-123""#), "{a}");
        assert!(fetch(&mut m, &local, "/nothing").starts_with("HTTP/1.1 404"));
        // More connections, one after the other, than a VM may have open
        // at once: each one's slot is free once it is done.
        for i in 0..3 * MAX_CONNECTIONS {
            let a = fetch(&mut m, &local, "/latest/meta-data/hostname");
            assert!(a.ends_with("\r\n\r\nvm1"), "connection {i}: {a:?}");
        }
    }

    #[test]
    fn the_signature_is_openstacks() {
        // Neutron: hmac.new(secret, instance_id, hashlib.sha256).hexdigest()
        // (RFC 4231 test case 2's key and data).
        assert_eq!(
            signature(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn requests_are_parsed_and_refused() {
        assert_eq!(
            parse_request("GET /latest/meta-data/ HTTP/1.1\r\nHost: x"),
            Ok(("GET".into(), "/latest/meta-data/".into()))
        );
        assert_eq!(parse_request("POST / HTTP/1.1"), Err(405));
        assert_eq!(parse_request("GET nothing HTTP/1.1"), Err(400));
        assert_eq!(parse_request("hello"), Err(400));
        assert!(Upstream::parse("https://x", vec![]).is_err());
        let u = Upstream::parse("http://127.0.0.1:8775/prefix/", vec![]).unwrap();
        assert_eq!(
            (u.authority.as_str(), u.path_prefix.as_str()),
            ("127.0.0.1:8775", "/prefix")
        );
    }
}
