//! The fjall engine (`--outbox-engine fjall`): the outbox in fjall, a
//! maintained log-structured key-value store, kept to be measured against
//! the segment log in the benchmark.
//!
//! Each [`Area`] is a fjall keyspace with big-endian sequence numbers as
//! keys, so byte order is sequence order. An [`Store::apply`] is one fjall
//! write batch (atomic through fjall's journal), kept in the journal's
//! buffer; [`Store::flush`] is `persist(SyncData)`, one `write` and one
//! `fdatasync` of the journal covering every batch before it;
//! [`Store::write_out`] hands the journal's buffer to the kernel.
//! Memory is bounded by the memtable size and the block cache
//! (`--outbox-cache-bytes`), not by the backlog.

use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::store::{Area, Op, Store, StoreError, Summary, pin_mmap_threshold};

/// Largest memtable before fjall writes it out as a table. fjall's default
/// (64 MiB per keyspace) would hold that much of a backlog in memory.
const MEMTABLE_BYTES: u64 = 8 << 20;

/// Journal bytes fjall keeps before it writes memtables out to tables
/// (its default is 512 MiB).
const JOURNAL_BYTES: u64 = 64 << 20;

/// Where the fjall engine keeps its files inside the data directory.
pub const FJALL_DIR: &str = "fjall";

/// The outbox's two areas in one fjall database.
pub struct FjallStore {
    db: Database,
    pending: Keyspace,
    dead: Keyspace,
}

fn err(what: &str) -> impl Fn(fjall::Error) -> StoreError + '_ {
    move |e| StoreError(format!("{what}: {e}"))
}

impl FjallStore {
    /// Opens (or creates) the store in `dir`, with `cache_bytes` of block
    /// cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        pin_mmap_threshold();
        let db = Database::builder(dir)
            .cache_size(cache_bytes)
            .max_journaling_size(JOURNAL_BYTES)
            // Batches stay in the journal's buffer until the outbox's flush
            // thread persists them, once for every batch waiting (group
            // commit), instead of one `write` each.
            .manual_journal_persist(true)
            .worker_threads(1)
            .open()
            .map_err(|e| StoreError(format!("cannot open outbox in {}: {e}", dir.display())))?;
        let keyspace = |name: &'static str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
            })
            .map_err(err("cannot open the outbox keyspace"))
        };
        let pending = keyspace("pending")?;
        let dead = keyspace("dead")?;
        Ok(Self { db, pending, dead })
    }

    fn keyspace(&self, area: Area) -> &Keyspace {
        match area {
            Area::Pending => &self.pending,
            Area::Dead => &self.dead,
        }
    }
}

fn decode_key(raw: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = raw
        .try_into()
        .map_err(|_| StoreError(format!("malformed outbox key of {} bytes", raw.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

impl Store for FjallStore {
    fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for op in ops {
            match op {
                Op::Put { area, key, value } => {
                    batch.insert(self.keyspace(area), key.to_be_bytes(), value)
                }
                Op::Delete { area, key } => batch.remove(self.keyspace(area), key.to_be_bytes()),
            }
        }
        batch.commit().map_err(err("cannot write the outbox"))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db
            .persist(PersistMode::SyncData)
            .map_err(err("cannot sync the outbox"))
    }

    fn write_out(&self) -> Result<(), StoreError> {
        self.db
            .persist(PersistMode::Buffer)
            .map_err(err("cannot write the outbox"))
    }

    fn scan(&self, area: Area, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(4096));
        for guard in self.keyspace(area).range(from.to_be_bytes()..).take(limit) {
            let (k, v) = guard.into_inner().map_err(err("cannot read the outbox"))?;
            out.push((decode_key(&k)?, v.to_vec()));
        }
        Ok(out)
    }

    fn get(&self, area: Area, key: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.keyspace(area)
            .get(key.to_be_bytes())
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(err("cannot read the outbox"))
    }

    /// Counts keys and value sizes without copying the values out.
    fn summary(&self) -> Result<Summary, StoreError> {
        let mut sum = Summary::empty();
        for area in [Area::Pending, Area::Dead] {
            for guard in self.keyspace(area).iter() {
                let (k, v) = guard.into_inner().map_err(err("cannot read the outbox"))?;
                sum.count(area, decode_key(&k)?, v.len() as u64);
            }
        }
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::super::store::tests::{check_areas_are_separate_and_ordered, put};
    use super::*;

    #[test]
    fn areas_are_separate_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        check_areas_are_separate_and_ordered(&FjallStore::open(dir.path(), 1 << 20).unwrap());
    }

    #[test]
    fn flushed_batches_survive_reopen_and_deletes_stay_deleted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FjallStore::open(dir.path(), 1 << 20).unwrap();
            store
                .apply(
                    (1..=100)
                        .map(|k| put(Area::Pending, k, &[k as u8; 100]))
                        .collect(),
                )
                .unwrap();
            store
                .apply(
                    (1..=40)
                        .map(|key| Op::Delete {
                            area: Area::Pending,
                            key,
                        })
                        .chain([put(Area::Dead, 7, b"moved")])
                        .collect(),
                )
                .unwrap();
            store.flush().unwrap();
        }
        let store = FjallStore::open(dir.path(), 1 << 20).unwrap();
        let pending = store.scan(Area::Pending, 0, 1000).unwrap();
        assert_eq!(pending.len(), 60);
        assert_eq!(pending[0], (41, vec![41u8; 100]));
        assert_eq!(store.get(Area::Dead, 7).unwrap(), Some(b"moved".to_vec()));
        assert_eq!(store.summary().unwrap().next_seq, 101);
    }
}
