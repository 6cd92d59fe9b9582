//! Fleet mode's watch and local copy against a real etcd (loopback, no
//! root): a burst of transactions written straight into etcd (600 ports in
//! three, then 100 of them deleted in one) reaches the agent's published
//! state whole, whatever batches its watch made of them; and the local redb
//! copy it writes when the watch goes quiet is that same state, deletions
//! included, when opened again after the agent is gone.
use std::{sync::Arc, time::Duration};

use cloison_control::{
    desired::{Desired, Kind},
    reconcile::Applied,
    store::{Etcd, EtcdConfig, Redb, Store},
};
use cloison_testkit::etcd::LocalEtcd;
use etcd_client::{Client, Txn, TxnOp};
use serde_json::json;
use tokio::sync::watch;

const STATE: &str = "/cloison/state";

fn object(kind: &str, name: &str, v: serde_json::Value) -> TxnOp {
    let mut v = v;
    v["name"] = name.into();
    TxnOp::put(
        format!("{STATE}/objects/{kind}/{name}"),
        v.to_string(),
        None,
    )
}

/// `ops` in one transaction that also moves `state/generation`, as the
/// agents' writes do: its revision.
async fn txn(c: &mut Client, mut ops: Vec<TxnOp>) -> u64 {
    ops.push(TxnOp::put(format!("{STATE}/generation"), "test", None));
    let r = c.txn(Txn::new().and_then(ops)).await.expect("txn");
    r.header().expect("a header").revision() as u64
}

fn port(i: usize) -> serde_json::Value {
    json!({"network": "n", "host": format!("hv{}", i % 3), "interface": format!("tap{i}"),
        "mac": format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff),
        "ips": [format!("10.0.{}.{}", i / 200, 1 + i % 200)]})
}

fn names(d: &Desired, kind: Kind) -> Vec<(String, u64)> {
    d.list(kind)
        .map(|r| (r.name().to_string(), r.generation))
        .collect()
}

#[test]
fn a_burst_reaches_the_state_whole_and_the_local_copy_follows() {
    let dir = std::env::temp_dir().join(format!("cloison-fleet-copy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let etcd = LocalEtcd::start(&dir.join("etcd"), false, &["--max-txn-ops", "1000"])
        .expect("a local etcd");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut store = rt
        .block_on(Etcd::connect(
            EtcdConfig::new(&etcd.url, "hv0"),
            Redb::open(&dir.join("hv0")).unwrap(),
        ))
        .expect("an etcd store");
    let (desired_tx, mut desired) = watch::channel(Arc::new(Desired::default()));
    let (_applied_tx, applied) = watch::channel(Applied::default());
    store.start(desired_tx, applied).expect("started");

    let last = rt.block_on(async {
        let mut c = Client::connect([etcd.url.as_str()], None).await.unwrap();
        let mut base: Vec<TxnOp> = (0..3)
            .map(|h| {
                object(
                    "hosts",
                    &format!("hv{h}"),
                    json!({"underlay_ip": format!("192.0.2.{}", 1 + h)}),
                )
            })
            .collect();
        base.push(object(
            "networks",
            "n",
            json!({"tenant": "t", "vni": 10, "subnets": ["10.0.0.0/16"]}),
        ));
        txn(&mut c, base).await;
        for chunk in (0..600).collect::<Vec<_>>().chunks(200) {
            let ops = chunk
                .iter()
                .map(|&i| object("ports", &format!("p{i}"), port(i)))
                .collect();
            txn(&mut c, ops).await;
        }
        let deletes = (500..600)
            .map(|i| TxnOp::delete(format!("{STATE}/objects/ports/p{i}"), None))
            .collect();
        txn(&mut c, deletes).await
    });

    let state = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                desired.wait_for(|d| d.generation >= last),
            )
            .await
            .map(|r| r.map(|d| d.clone()))
        })
        .expect("the agent published the last revision in time")
        .expect("the store runs");
    assert_eq!(state.generation, last);
    assert!(state.valid.is_ok(), "{:?}", state.valid);
    let ports = names(&state, Kind::Port);
    assert_eq!(ports.len(), 500, "600 written, 100 deleted");
    assert!(ports
        .iter()
        .all(|(n, _)| n[1..].parse::<usize>().unwrap() < 500));
    assert_eq!(names(&state, Kind::Host).len(), 3);

    // Quiet now: the local copy follows within a fraction of a second.
    std::thread::sleep(Duration::from_millis(1500));
    drop(store);
    drop(rt);
    let copy = Redb::open(&dir.join("hv0")).unwrap().load().unwrap();
    assert_eq!(copy.generation, state.generation);
    for kind in Kind::ALL {
        assert_eq!(names(&copy, kind), names(&state, kind), "{kind}");
    }
    assert_eq!(
        copy.get(Kind::Port, "p7").map(|r| &r.object),
        state.get(Kind::Port, "p7").map(|r| &r.object)
    );
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}
