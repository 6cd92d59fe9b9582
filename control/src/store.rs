//! Where the desired state is kept: the [`Store`] seam under the API. The
//! embedded store ([`Redb`], `--store embedded`) lives in `--state-dir`: a
//! redb database (copy-on-write B-trees, each commit durable when it
//! returns), so an acknowledged write survives a kill -9 at any moment. One
//! table of objects keyed `kind/name`, and the global generation.
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::desired::{stored_record, Desired, Kind, Record};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const GENERATION: &str = "generation";

#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// A committed change: what to write (`Some`) or delete (`None`).
pub struct Change<'a> {
    pub kind: Kind,
    pub name: &'a str,
    pub record: Option<&'a Record>,
}

/// The desired state's durable home. A write is acknowledged to the caller
/// only once `commit` returned.
pub trait Store: Send + 'static {
    /// Everything stored, as a validated state.
    fn load(&self) -> Result<Desired, StoreError>;
    /// Writes one change and the new generation, durably, at once.
    fn commit(&mut self, change: Change<'_>, generation: u64) -> Result<(), StoreError>;
    /// What `GET /v1/status` says of it.
    fn describe(&self) -> String;
}

pub struct Redb {
    db: Database,
}

impl Redb {
    pub fn open(dir: &Path) -> Result<Redb, StoreError> {
        std::fs::create_dir_all(dir).map_err(err)?;
        let db = Database::create(dir.join("cloisond.redb")).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(OBJECTS).map_err(err)?;
        tx.open_table(META).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(Redb { db })
    }
}

impl Store for Redb {
    fn load(&self) -> Result<Desired, StoreError> {
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

    fn describe(&self) -> String {
        "embedded".into()
    }

    fn commit(&mut self, change: Change<'_>, generation: u64) -> Result<(), StoreError> {
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
        let d = Redb::open(&dir).unwrap().load().unwrap();
        assert_eq!(d.generation, 3);
        assert!(d.valid.is_ok());
        assert_eq!(d.list(Kind::Host).count(), 1);
        assert_eq!(d.get(Kind::Host, "hv1").unwrap().generation, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
