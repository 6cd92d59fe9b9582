//! `cloisond`: the agent every hypervisor runs (docs/api.md, docs/operations.md).
use std::{future::IntoFuture, os::unix::fs::PermissionsExt, path::PathBuf, sync::Arc};

use anyhow::{bail, Context, Result};
use clap::Parser;
use cloison_control::{
    client::Endpoint,
    reconcile,
    server::{router, Agent},
    store::{Etcd, EtcdConfig, EtcdTls, Redb, Store},
};
use cloison_dataplane::{loader::DEFAULT_PIN_ROOT, Dataplane, UplinkHook};

#[derive(Parser, Debug)]
#[command(about = "Cloison's per-host agent: the northbound API, a durable store, the reconciler")]
struct Args {
    /// This host's name: its VTEP is the underlay_ip of the host object so named.
    #[arg(long)]
    name: String,
    /// The interface facing the underlay.
    #[arg(long)]
    uplink: Option<String>,
    /// unix:PATH (mode 0600) or tcp:ADDR (needs --token-file); repeatable.
    #[arg(long)]
    listen: Vec<Endpoint>,
    /// File holding the bearer token the TCP listener requires.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// PEM certificate (chain) of the TCP listeners: they speak TLS. A TCP
    /// listener off loopback requires it.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Where the embedded store lives (default /var/lib/cloison/NAME).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// embedded (default): this host's own state in --state-dir; etcd: fleet
    /// mode, one state for every agent (docs/fleet.md).
    #[arg(long, default_value = "embedded")]
    store: String,
    /// etcd's client URLs, comma-separated (http://… or https://…).
    #[arg(long)]
    etcd_endpoints: Option<String>,
    /// Every key of the fleet lives under it.
    #[arg(long, default_value = "/cloison")]
    etcd_prefix: String,
    /// PEM CA of etcd's server certificates (for https:// endpoints).
    #[arg(long)]
    etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate for etcd (its CN is the etcd user, for RBAC).
    #[arg(long, requires = "etcd_key_file")]
    etcd_cert_file: Option<PathBuf>,
    /// PEM private key of --etcd-cert-file.
    #[arg(long, requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
    /// auto (XDP where the driver has native XDP), xdp or tc.
    #[arg(long, default_value = "auto")]
    uplink_hook: UplinkHook,
    /// Where floating-IP and SNAT traffic leaves and enters the host
    /// (default: the uplink).
    #[arg(long)]
    external_interface: Option<String>,
    /// Where maps and links are pinned (a bpffs directory).
    #[arg(long, default_value = DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// Entries of the conntrack table when it is first created (kept across
    /// restarts; each tenant gets an equal share of 7/8 of it).
    #[arg(long, default_value_t = cloison_abi::MAX_CONNTRACK)]
    conntrack_entries: u32,
    /// The instance metadata service VMs' requests to 169.254.169.254 are
    /// proxied to (http://HOST:PORT), with OpenStack's headers; without
    /// it, the agent answers from the port object.
    #[arg(long, requires = "metadata_secret_file")]
    metadata_upstream: Option<String>,
    /// The secret shared with the upstream, for X-Instance-ID-Signature.
    #[arg(long, requires = "metadata_upstream")]
    metadata_secret_file: Option<PathBuf>,
    /// Frames a second each port may send to the gateway services (DHCP,
    /// router solicitations, metadata); beyond it they are dropped and
    /// counted (service_rate_limited). 0: no limit (benchmarks only).
    #[arg(long, default_value_t = cloison_dataplane::service::RATE_PER_SEC)]
    gateway_rate: u64,
    /// How many frames a port may send at once above that rate.
    #[arg(long, default_value_t = cloison_dataplane::service::BURST)]
    gateway_burst: u64,
    /// Events each CPU may stream a second to `cloisonctl monitor` while
    /// someone watches (drops, new flows); past it they are counted lost.
    #[arg(long, default_value_t = cloison_control::monitor::DEFAULT_SETTINGS.rate)]
    monitor_rate: u32,
    /// One new flow in N is streamed to the monitor (1: each, within the rate).
    #[arg(long, default_value_t = cloison_control::monitor::DEFAULT_SETTINGS.sample)]
    monitor_sample: u32,
    /// This host's X.509 certificate (PEM), for a host whose `encryption`
    /// is `ipsec`: its subjectAltName is the host's underlay address (its
    /// IKE identity), signed by --ipsec-ca.
    #[arg(long, requires_all = ["ipsec_key", "ipsec_ca"])]
    ipsec_cert: Option<PathBuf>,
    /// The private key of --ipsec-cert (PEM).
    #[arg(long, requires_all = ["ipsec_cert", "ipsec_ca"])]
    ipsec_key: Option<PathBuf>,
    /// The fleet's CA (PEM): peers' certificates must be signed by it.
    #[arg(long, requires_all = ["ipsec_cert", "ipsec_key"])]
    ipsec_ca: Option<PathBuf>,
    /// charon's VICI socket (strongSwan with kernel-libipsec: docs/encryption.md).
    #[arg(long, default_value = "/run/charon.vici")]
    ipsec_vici: PathBuf,
    /// charon's IPsec device (kernel-libipsec's TUN device).
    #[arg(long, default_value = "ipsec0")]
    ipsec_interface: String,
    /// How often the ESP keys with each peer are renegotiated (seconds; the
    /// IKE SA's every 4 times that). At least 60.
    #[arg(long, default_value_t = 3600)]
    ipsec_rekey_seconds: u64,
    /// Remove everything this host's agent pinned (programs detach) and exit.
    #[arg(long)]
    purge: bool,
    /// Logs as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("cloisond: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    if args.purge {
        Dataplane::purge(&args.name, &args.pin_root)?;
        cloison_dataplane::service::ServiceTap::remove(&args.name)?;
        println!("cloisond: purged the dataplane of {}", args.name);
        return Ok(());
    }
    let fleet = match args.store.as_str() {
        "embedded" => {
            if args.etcd_endpoints.is_some() {
                bail!("--etcd-endpoints is for --store etcd");
            }
            None
        }
        "etcd" => {
            let eps = args
                .etcd_endpoints
                .as_deref()
                .context("--store etcd needs --etcd-endpoints URLS")?;
            let mut cfg = EtcdConfig::new(eps, &args.name);
            cfg.prefix = args.etcd_prefix.clone();
            if !cfg.prefix.starts_with('/') {
                bail!("--etcd-prefix {:?}: it starts with /", cfg.prefix);
            }
            cfg.tls = match (
                &args.etcd_ca_file,
                &args.etcd_cert_file,
                &args.etcd_key_file,
            ) {
                (None, None, None) => None,
                (Some(ca), cert, key) => Some(EtcdTls {
                    ca: ca.clone(),
                    cert: cert.clone().zip(key.clone()),
                }),
                (None, ..) => bail!("--etcd-cert-file needs --etcd-ca-file"),
            };
            Some(cfg)
        }
        other => bail!("--store {other}: expected embedded or etcd"),
    };
    let uplink = args.uplink.clone().context("--uplink is required")?;
    if args.monitor_sample == 0 || args.monitor_rate > 1_000_000 {
        bail!(
            "--monitor-rate {} --monitor-sample {}: a rate of at most 1000000 events a second, a sample of at least 1",
            args.monitor_rate,
            args.monitor_sample
        );
    }
    if args.gateway_rate > 1_000_000 {
        bail!(
            "--gateway-rate {}: at most 1000000 frames a second (0: no limit)",
            args.gateway_rate
        );
    }
    let metadata = match (&args.metadata_upstream, &args.metadata_secret_file) {
        (Some(url), Some(f)) => {
            let secret = std::fs::read(f)
                .with_context(|| format!("read the metadata secret {}", f.display()))?;
            let secret = String::from_utf8_lossy(&secret).trim().as_bytes().to_vec();
            if secret.is_empty() {
                bail!("the metadata secret in {} is empty", f.display());
            }
            let up = cloison_control::gateway::metadata::Upstream::parse(url, secret)
                .map_err(anyhow::Error::msg)?;
            cloison_control::gateway::metadata::Config { upstream: Some(up) }
        }
        _ => Default::default(),
    };
    if args.listen.is_empty() {
        bail!("at least one --listen unix:PATH or tcp:ADDR is required");
    }
    if args.ipsec_rekey_seconds < 60 {
        bail!(
            "--ipsec-rekey-seconds {}: at least 60",
            args.ipsec_rekey_seconds
        );
    }
    let ipsec = match (&args.ipsec_cert, &args.ipsec_key, &args.ipsec_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            for f in [cert, key, ca] {
                std::fs::metadata(f).with_context(|| format!("--ipsec-*: {}", f.display()))?;
            }
            Some(cloison_control::ipsec::Settings {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                vici: args.ipsec_vici.clone(),
                rekey: std::time::Duration::from_secs(args.ipsec_rekey_seconds),
            })
        }
        _ => None,
    };
    for ep in &args.listen {
        if let Endpoint::Https(addr, _) = ep {
            bail!("--listen https:{addr}: listen on tcp:{addr} with --tls-cert and --tls-key");
        }
        if let Endpoint::Tcp(addr) = ep {
            let loopback = addr
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip().is_loopback());
            if args.tls_cert.is_none() && !loopback {
                bail!(
                    "--listen tcp:{addr} is off loopback: it needs --tls-cert and --tls-key (the bearer token must not cross a network in clear)"
                );
            }
        }
    }
    // Before anything is served: pins that die with this process would stop
    // all traffic the moment it does.
    cloison_dataplane::bpffs::prepare(&args.pin_root)?;
    let token = match &args.token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("read token file {}", f.display()))?;
            let t = t.trim().to_string();
            if t.len() < 16 {
                bail!("the token in {} is shorter than 16 characters", f.display());
            }
            Some(Arc::new(t))
        }
        None => None,
    };
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/cloison").join(&args.name));
    let local = Redb::open(&state_dir)
        .with_context(|| format!("open the store in {}", state_dir.display()))?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(cloison_control::tls::server_config(c, k)?),
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let store: Box<dyn Store> = match fleet {
        None => Box::new(local),
        Some(cfg) => Box::new(rt.block_on(Etcd::connect(cfg, local))?),
    };
    let (agent, side) = {
        let _in_rt = rt.enter();
        Agent::new(args.name.clone(), store, args.pin_root.clone())?
    };
    agent.set_uplink(&uplink);
    agent.monitor.configure(cloison_control::monitor::Settings {
        rate: args.monitor_rate,
        sample: args.monitor_sample,
    });
    // The gateway services' tap: what the port programs steer to the agent.
    let tap = cloison_dataplane::service::ServiceTap::open(&args.name)
        .context("create the service tap (DHCP, router advertisements, metadata)")?;
    let external = args
        .external_interface
        .clone()
        .unwrap_or_else(|| uplink.clone());
    let cfg = reconcile::Config {
        host: args.name.clone(),
        uplink,
        hook: args.uplink_hook,
        pin_root: args.pin_root.clone(),
        conntrack_entries: args.conntrack_entries,
        service_tap: Some((
            tap.name.clone(),
            tap.ifindex,
            cloison_dataplane::service::config(tap.ifindex, args.gateway_rate, args.gateway_burst),
        )),
        external: Some(external),
        ipsec_device: args.ipsec_interface.clone(),
    };
    let service = {
        let _in_rt = rt.enter();
        cloison_control::gateway::Service::new(
            tap.fd,
            side.desired.clone(),
            side.applied.subscribe(),
            agent.gateway.clone(),
            metadata,
        )?
    };
    rt.spawn(async move {
        if let Err(e) = service.run().await {
            // Unexpected (the tap is the agent's own): a restart opens it
            // again, and the dataplane keeps forwarding meanwhile.
            tracing::error!(error = %e, "the gateway services' tap failed: exiting");
            eprintln!("cloisond: the gateway services' tap failed: {e}");
            std::process::exit(1);
        }
    });
    rt.spawn(cloison_control::ipsec::run(
        args.name.clone(),
        ipsec,
        side.desired.clone(),
        agent.ipsec.clone(),
    ));
    let (links_tx, links_rx) = tokio::sync::mpsc::unbounded_channel();
    reconcile::watch_links(links_tx).context("watch link events (netlink)")?;
    reconcile::spawn(cfg, side.desired, side.applied, links_rx)?;

    rt.block_on(async move {
        let mut servers = tokio::task::JoinSet::new();
        for ep in &args.listen {
            match ep {
                Endpoint::Unix(path) => {
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    let _ = std::fs::remove_file(path);
                    // Created 0600 (umask), not chmod-ed after: no window.
                    let old = unsafe { libc::umask(0o177) };
                    let l = tokio::net::UnixListener::bind(path);
                    unsafe { libc::umask(old) };
                    let l = l.with_context(|| format!("listen on {}", path.display()))?;
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                    tracing::info!(socket = %path.display(), "listening");
                    servers.spawn(
                        axum::serve(l, router(agent.clone(), None))
                            .with_graceful_shutdown(shutdown())
                            .into_future(),
                    );
                }
                Endpoint::Https(..) => unreachable!("refused above"),
                Endpoint::Tcp(addr) => {
                    let Some(token) = token.clone() else {
                        bail!("--listen tcp:{addr} needs --token-file");
                    };
                    let l = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("listen on {addr}"))?;
                    let app = router(agent.clone(), Some(token));
                    match &tls {
                        Some(config) => {
                            tracing::info!(%addr, "listening, TLS (bearer token required)");
                            let l = cloison_control::tls::TlsListener::new(l, config.clone())?;
                            servers.spawn(
                                axum::serve(l, app)
                                    .with_graceful_shutdown(shutdown())
                                    .into_future(),
                            );
                        }
                        None => {
                            tracing::info!(%addr, "listening on loopback, no TLS (bearer token required)");
                            servers.spawn(
                                axum::serve(l, app)
                                    .with_graceful_shutdown(shutdown())
                                    .into_future(),
                            );
                        }
                    }
                }
            }
        }
        while let Some(r) = servers.join_next().await {
            r??;
        }
        // The dataplane stays: maps and links are pinned, traffic flows on,
        // and the next start takes them over.
        tracing::info!("stopped; the dataplane keeps running");
        Ok(())
    })
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
