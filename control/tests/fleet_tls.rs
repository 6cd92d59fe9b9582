//! Fleet mode against a real etcd that requires TLS client certificates
//! (`--client-cert-auth`): an agent with the CA and its certificate
//! connects and writes; one without a client certificate, or trusting
//! another CA, is never connected and its writes are refused with 503.
//! Needs no root: etcd on loopback, no dataplane.
mod certs;

use std::{path::Path, sync::Arc, time::Duration};

use cloison_control::{
    desired::{parse_body, Kind},
    server::Agent,
    store::{Etcd, EtcdConfig, EtcdTls, Redb},
};
use cloison_testkit::etcd::LocalEtcd;

/// A certificate for 127.0.0.1 named `cn`, signed by `issuer`, in `dir`.
fn leaf(issuer: &certs::Issuer, cn: &str, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = certs::leaf(issuer, Some(cn), &["127.0.0.1", "localhost"]);
    let (c, k) = (
        dir.join(format!("{cn}.pem")),
        dir.join(format!("{cn}-key.pem")),
    );
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

fn agent(
    rt: &tokio::runtime::Runtime,
    url: &str,
    tls: EtcdTls,
    dir: &Path,
    host: &str,
) -> Arc<Agent> {
    let mut cfg = EtcdConfig::new(url, host);
    cfg.tls = Some(tls);
    let store = rt
        .block_on(Etcd::connect(cfg, Redb::open(&dir.join(host)).unwrap()))
        .expect("an etcd store");
    let _g = rt.enter();
    Agent::new(host.into(), Box::new(store), dir.join("no-pins"))
        .unwrap()
        .0
}

fn put_host(a: &Agent, name: &str) -> Result<u64, String> {
    let o = parse_body(Kind::Host, name, br#"{"underlay_ip": "192.0.2.7"}"#).unwrap();
    a.write_blocking(Kind::Host, name, Some(o))
        .map(|(_, v)| v["generation"].as_u64().unwrap())
        .map_err(|e| e.to_string())
}

#[test]
fn fleet_over_tls_with_client_certificates() {
    let dir = std::env::temp_dir().join(format!("cloison-etcd-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (issuer, ca_pem) = certs::ca("cloison test etcd CA");
    let (_, other_pem) = certs::ca("another CA");
    std::fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
    std::fs::write(dir.join("other-ca.pem"), &other_pem).unwrap();
    let (server_cert, server_key) = leaf(&issuer, "etcd", &dir);
    let (hv1_cert, hv1_key) = leaf(&issuer, "hv1", &dir);
    let s = |p: &Path| p.display().to_string();
    let ca_file = s(&dir.join("ca.pem"));
    let etcd = LocalEtcd::start(
        &dir.join("etcd"),
        true,
        &[
            "--cert-file",
            &s(&server_cert),
            "--key-file",
            &s(&server_key),
            "--client-cert-auth",
            "--trusted-ca-file",
            &ca_file,
        ],
    )
    .expect("etcd with TLS");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let good = agent(
        &rt,
        &etcd.url,
        EtcdTls {
            ca: dir.join("ca.pem"),
            cert: Some((hv1_cert.clone(), hv1_key.clone())),
        },
        &dir,
        "hv1",
    );
    let g = std::thread::spawn({
        let a = good.clone();
        move || put_host(&a, "hv1")
    })
    .join()
    .unwrap()
    .expect("a write over TLS with a client certificate");
    assert!(g > 0);

    // No client certificate: etcd refuses the handshake.
    let anonymous = agent(
        &rt,
        &etcd.url,
        EtcdTls {
            ca: dir.join("ca.pem"),
            cert: None,
        },
        &dir,
        "hv2",
    );
    // Another CA: the agent refuses etcd's certificate.
    let mistrust = agent(
        &rt,
        &etcd.url,
        EtcdTls {
            ca: dir.join("other-ca.pem"),
            cert: Some((hv1_cert, hv1_key)),
        },
        &dir,
        "hv3",
    );
    for (what, a) in [
        ("no client certificate", anonymous),
        ("another CA", mistrust),
    ] {
        let e = std::thread::spawn(move || put_host(&a, "hv9"))
            .join()
            .unwrap()
            .expect_err(what);
        assert!(e.starts_with("503 store_unavailable"), "{what}: {e}");
    }
    // The good agent's copy has its write; the refused ones wrote nothing.
    std::thread::sleep(Duration::from_millis(200));
    let d = good.desired();
    assert!(d.get(Kind::Host, "hv1").is_some());
    assert!(d.get(Kind::Host, "hv9").is_none());
    drop(rt);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}
