//! The embedded store in `--state-dir`: a redb database (copy-on-write
//! B-trees, each commit durable when it returns), so an acknowledged write
//! survives a kill -9 at any moment. One table of objects keyed
//! `kind/name`, and the global generation.
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;

use crate::desired::{Desired, Kind, Record};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const GENERATION: &str = "generation";

#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

pub struct Store {
    db: Database,
}

/// A committed change: what to write (`Some`) or delete (`None`).
pub struct Change<'a> {
    pub kind: Kind,
    pub name: &'a str,
    pub record: Option<&'a Record>,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(err)?;
        let db = Database::create(dir.join("cloisond.redb")).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(OBJECTS).map_err(err)?;
        tx.open_table(META).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(Store { db })
    }

    /// Everything stored, and the generation of the last write.
    pub fn load(&self) -> Result<(Desired, u64), StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let objects = tx.open_table(OBJECTS).map_err(err)?;
        let mut d = Desired::default();
        for entry in objects.iter().map_err(err)? {
            let (k, v) = entry.map_err(err)?;
            let (kind, name) = k
                .value()
                .split_once('/')
                .and_then(|(k, n)| Some((Kind::from_path(k)?, n.to_string())))
                .ok_or_else(|| err(format!("bad key {:?}", k.value())))?;
            let mut stored: Value = serde_json::from_slice(v.value()).map_err(err)?;
            let generation = stored
                .get("generation")
                .and_then(Value::as_u64)
                .ok_or_else(|| err(format!("{} without a generation", k.value())))?;
            if let Value::Object(m) = &mut stored {
                m.remove("generation");
            }
            d.put(
                kind,
                &name,
                Record {
                    generation,
                    object: stored,
                },
            );
        }
        let meta = tx.open_table(META).map_err(err)?;
        let generation = meta.get(GENERATION).map_err(err)?.map_or(0, |g| g.value());
        Ok((d, generation))
    }

    /// Writes one change and the new generation in one durable transaction.
    pub fn commit(&self, change: Change<'_>, generation: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut objects = tx.open_table(OBJECTS).map_err(err)?;
            let key = format!("{}/{}", change.kind.path(), change.name);
            match change.record {
                Some(r) => {
                    let bytes = serde_json::to_vec(&r.to_json()).map_err(err)?;
                    objects
                        .insert(key.as_str(), bytes.as_slice())
                        .map_err(err)?;
                }
                None => {
                    objects.remove(key.as_str()).map_err(err)?;
                }
            }
            let mut meta = tx.open_table(META).map_err(err)?;
            meta.insert(GENERATION, generation).map_err(err)?;
        }
        tx.commit().map_err(err)
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
            let s = Store::open(&dir).unwrap();
            let rec = Record {
                generation: 1,
                object: serde_json::json!({"name": "hv1", "underlay_ip": "192.0.2.1"}),
            };
            s.commit(
                Change {
                    kind: Kind::Host,
                    name: "hv1",
                    record: Some(&rec),
                },
                1,
            )
            .unwrap();
            let rec2 = Record {
                generation: 2,
                ..rec.clone()
            };
            s.commit(
                Change {
                    kind: Kind::Host,
                    name: "hv2",
                    record: Some(&rec2),
                },
                2,
            )
            .unwrap();
            s.commit(
                Change {
                    kind: Kind::Host,
                    name: "hv2",
                    record: None,
                },
                3,
            )
            .unwrap();
        }
        let (d, g) = Store::open(&dir).unwrap().load().unwrap();
        assert_eq!(g, 3);
        assert_eq!(d.list(Kind::Host).count(), 1);
        assert_eq!(d.get(Kind::Host, "hv1").unwrap().generation, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
