//! The embedded store (`--store embedded`): a redb database in
//! `--state-dir` (copy-on-write B-trees, each commit durable when it
//! returns), so an acknowledged write survives a kill -9 at any moment. One
//! table of objects keyed `kind/name`, and the generation. In fleet mode the
//! same file is the agent's local copy of the fleet's state.
use std::{path::Path, sync::Arc};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::{err, Change, CommitError, Member, Store, StoreError, StoreView};
use crate::{
    desired::{stored_record, Desired, Kind, Record},
    reconcile::Applied,
};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const GENERATION: &str = "generation";

pub struct Redb {
    db: Database,
    desired: Option<watch::Sender<Arc<Desired>>>,
}

impl Redb {
    pub fn open(dir: &Path) -> Result<Redb, StoreError> {
        std::fs::create_dir_all(dir).map_err(err)?;
        let db = Database::create(dir.join("cloisond.redb")).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(OBJECTS).map_err(err)?;
        tx.open_table(META).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(Redb { db, desired: None })
    }

    /// Everything stored, as a validated state.
    pub fn load(&self) -> Result<Desired, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let objects = tx.open_table(OBJECTS).map_err(err)?;
        let mut records = Vec::new();
        for entry in objects.iter().map_err(err)? {
            let (k, v) = entry.map_err(err)?;
            let (kind, name) = k
                .value()
                .split_once('/')
                .and_then(|(k, n)| Some((Kind::from_path(k)?, n.to_string())))
                .ok_or_else(|| err(format!("bad key {:?}", k.value())))?;
            let rec =
                stored_record(kind, v.value()).map_err(|e| err(format!("{}: {e}", k.value())))?;
            records.push((name, rec));
        }
        let meta = tx.open_table(META).map_err(err)?;
        let generation = meta.get(GENERATION).map_err(err)?.map_or(0, |g| g.value());
        Ok(Desired::loaded(records, generation))
    }

    /// Writes `changes` and the generation, durably, at once; with `replace`
    /// everything else stored goes.
    pub fn write(
        &mut self,
        changes: &[Change<'_>],
        generation: u64,
        replace: bool,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut objects = tx.open_table(OBJECTS).map_err(err)?;
            if replace {
                objects.retain(|_, _| false).map_err(err)?;
            }
            for change in changes {
                let key = format!("{}/{}", change.kind.path(), change.name);
                match change.record {
                    Some(r) => {
                        let bytes = r.to_json_bytes();
                        objects
                            .insert(key.as_str(), bytes.as_slice())
                            .map_err(err)?;
                    }
                    None => {
                        objects.remove(key.as_str()).map_err(err)?;
                    }
                }
            }
            let mut meta = tx.open_table(META).map_err(err)?;
            meta.insert(GENERATION, generation).map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// The whole of `state`, in place of what was stored (fleet mode's
    /// local copy after a list).
    pub fn replace(&mut self, state: &Desired) -> Result<(), StoreError> {
        let records: Vec<(Kind, &str, &Record)> = Kind::ALL
            .iter()
            .flat_map(|k| state.list(*k).map(move |r| (*k, r.name(), r)))
            .collect();
        let changes: Vec<Change<'_>> = records
            .iter()
            .map(|(kind, name, r)| Change {
                kind: *kind,
                name,
                record: Some(r),
            })
            .collect();
        self.write(&changes, state.generation, true)
    }
}

struct Local;

impl StoreView for Local {
    fn describe(&self) -> String {
        "embedded".into()
    }

    fn unreachable_since(&self) -> Option<std::time::SystemTime> {
        None
    }

    fn fleet(&self) -> Option<Result<Vec<Member>, String>> {
        None
    }
}

impl Store for Redb {
    fn start(
        &mut self,
        desired: watch::Sender<Arc<Desired>>,
        _applied: watch::Receiver<Applied>,
    ) -> Result<(), StoreError> {
        desired.send_replace(Arc::new(self.load()?));
        self.desired = Some(desired);
        Ok(())
    }

    /// One writer (the agent's lock): the stored state is `base`'s.
    fn commit(
        &mut self,
        _base: &Desired,
        change: Change<'_>,
        next: Desired,
    ) -> Result<u64, CommitError> {
        let generation = next.generation;
        self.write(&[change], generation, false)?;
        if let Some(d) = &self.desired {
            d.send_replace(Arc::new(next));
        }
        Ok(generation)
    }

    fn view(&self) -> Arc<dyn StoreView> {
        Arc::new(Local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("cloison-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let mut s = Redb::open(&dir).unwrap();
            let rec = Record {
                generation: 1,
                object: crate::desired::parse_body(
                    Kind::Host,
                    "hv1",
                    br#"{"underlay_ip": "192.0.2.1"}"#,
                )
                .unwrap(),
            };
            s.write(
                &[Change {
                    kind: Kind::Host,
                    name: "hv1",
                    record: Some(&rec),
                }],
                1,
                false,
            )
            .unwrap();
            let rec2 = Record {
                generation: 2,
                ..rec.clone()
            };
            s.write(
                &[Change {
                    kind: Kind::Host,
                    name: "hv2",
                    record: Some(&rec2),
                }],
                2,
                false,
            )
            .unwrap();
            s.write(
                &[Change {
                    kind: Kind::Host,
                    name: "hv2",
                    record: None,
                }],
                3,
                false,
            )
            .unwrap();
        }
        let d = Redb::open(&dir).unwrap().load().unwrap();
        assert_eq!(d.generation, 3);
        assert!(d.valid.is_ok());
        assert_eq!(d.list(Kind::Host).count(), 1);
        assert_eq!(d.get(Kind::Host, "hv1").unwrap().generation, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
