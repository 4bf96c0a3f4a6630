//! The narrow storage interface under the outbox, and its sled engine (the
//! default engine, the segment log, is in [`super::segment`]).
//!
//! The outbox needs only four things from a storage engine: apply a small set
//! of puts and deletes atomically, make everything applied so far durable,
//! scan one area in key order, and read one key. Keeping the interface that
//! small lets engines be measured side by side, and lets tests inject
//! faults (a write or a flush that fails) below the outbox.
//!
//! Keys are sequence numbers. Each area is a separate key space: `Pending`
//! holds messages still to forward, `Dead` holds messages the forwarder gave
//! up on (kept, never dropped).

use std::path::Path;

/// Which key space an entry lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Area {
    /// Messages waiting to be forwarded to the broker.
    Pending,
    /// Messages the forwarder moved aside after repeated failures.
    Dead,
}

impl Area {
    fn prefix(self) -> u8 {
        match self {
            Area::Pending => b'p',
            Area::Dead => b'd',
        }
    }
}

/// One change in an atomic [`Store::apply`] call.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Insert or overwrite `key` in `area`.
    Put {
        area: Area,
        key: u64,
        value: Vec<u8>,
    },
    /// Remove `key` from `area` (no error if absent).
    Delete { area: Area, key: u64 },
}

/// A storage failure, with the engine's own text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("outbox storage error: {0}")]
pub struct StoreError(pub String);

/// Counts and sizes of what a store holds, and the first sequence number
/// that was never used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Pending entries.
    pub pending: u64,
    /// Their encoded bytes.
    pub pending_bytes: u64,
    /// Dead-letter entries.
    pub dead: u64,
    /// Their encoded bytes.
    pub dead_bytes: u64,
    /// Every sequence number below this may have been used.
    pub next_seq: u64,
}

impl Summary {
    /// Nothing held, sequence numbers from 1.
    pub fn empty() -> Self {
        Self {
            next_seq: 1,
            ..Self::default()
        }
    }

    /// Counts one entry of `area` under `key`, of `bytes` encoded bytes.
    pub fn count(&mut self, area: Area, key: u64, bytes: u64) {
        let (n, b) = match area {
            Area::Pending => (&mut self.pending, &mut self.pending_bytes),
            Area::Dead => (&mut self.dead, &mut self.dead_bytes),
        };
        *n += 1;
        *b += bytes;
        self.next_seq = self.next_seq.max(key.saturating_add(1));
    }
}

/// What the outbox needs from a storage engine.
///
/// Contract: after `flush` returns `Ok`, every `apply` that returned before
/// the `flush` started survives a crash. After `write_out` returns `Ok`, they
/// survive a crash of the process (not of the host). Nothing is promised for
/// changes that were never covered by a successful flush.
pub trait Store: Send + Sync + 'static {
    /// Applies all `ops` atomically: after a crash either all or none of them
    /// are visible.
    fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError>;
    /// Makes every change applied so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Up to `limit` entries of `area` with key ≥ `from`, in key order.
    fn scan(&self, area: Area, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The value of `key` in `area`, if present.
    fn get(&self, area: Area, key: u64) -> Result<Option<Vec<u8>>, StoreError>;

    /// Hands every change applied so far to the operating system, so that
    /// it survives the process being killed. Engines that keep changes in
    /// their own memory until a flush must flush here.
    fn write_out(&self) -> Result<(), StoreError> {
        self.flush()
    }

    /// Counts what the store holds, for opening the outbox. The default
    /// scans both areas.
    fn summary(&self) -> Result<Summary, StoreError> {
        let mut sum = Summary::empty();
        for area in [Area::Pending, Area::Dead] {
            let mut from = 0;
            loop {
                let chunk = self.scan(area, from, 4096)?;
                let Some(&(last, _)) = chunk.last() else {
                    break;
                };
                for (key, v) in &chunk {
                    sum.count(area, *key, v.len() as u64);
                }
                if last == u64::MAX {
                    break;
                }
                from = last + 1;
            }
        }
        Ok(sum)
    }

    /// Background work (periodic sync, checkpoints, deleting what is no
    /// longer needed), called often by the outbox's flush thread.
    fn tick(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// After a failed write or flush: makes the store whole again without
    /// trusting anything the failure may have dropped, so it can accept
    /// writes. Engines that cannot do that say so and stay failed.
    fn recover(&self) -> Result<(), StoreError> {
        Err(StoreError(
            "this outbox engine cannot recover from a storage failure without a restart".into(),
        ))
    }
}

fn encode_key(area: Area, key: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = area.prefix();
    k[1..].copy_from_slice(&key.to_be_bytes());
    k
}

fn decode_key(raw: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = raw
        .get(1..9)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| StoreError(format!("malformed outbox key of {} bytes", raw.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

/// The sled engine: one tree, keys `[area prefix][u64 big-endian]` so that
/// byte order is sequence order within an area.
pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    ///
    /// `flush_every` lets sled flush by itself in the background; the outbox
    /// still calls [`Store::flush`] before it acknowledges in flush mode.
    pub fn open(
        dir: &Path,
        cache_bytes: u64,
        flush_every: Option<std::time::Duration>,
    ) -> Result<Self, StoreError> {
        pin_mmap_threshold();
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(flush_every.map(|d| d.as_millis().max(1) as u64))
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| StoreError(format!("cannot open outbox in {}: {e}", dir.display())))?;
        Ok(Self { db })
    }
}

/// Keeps large allocations out of the heap, so a large backlog does not
/// inflate the process's memory.
///
/// Both engines move large buffers (request bodies of whole batches, write
/// chunks, read chunks). sled allocates and frees segment-sized IO buffers (512 KiB) all the
/// time, and a batch append allocates a few of its own. glibc raises its
/// mmap threshold to the size of every mmapped block freed, after which such
/// buffers come from the heap and fragment it: with a million messages
/// buffered the resident set was about twice what it is with the threshold
/// pinned at glibc's default of 128 KiB (which also stops the adjustment).
pub(crate) fn pin_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator tuning; the allocator
            // stays consistent whatever the value.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            }
        });
    }
}

impl Store for SledStore {
    fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                Op::Put { area, key, value } => batch.insert(&encode_key(area, key), value),
                Op::Delete { area, key } => batch.remove(&encode_key(area, key)),
            }
        }
        self.db
            .apply_batch(batch)
            .map_err(|e| StoreError(e.to_string()))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| StoreError(e.to_string()))
    }

    fn scan(&self, area: Area, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let start = encode_key(area, from);
        let end = encode_key(area, u64::MAX);
        let mut out = Vec::new();
        for item in self.db.range(start..=end).take(limit) {
            let (k, v) = item.map_err(|e| StoreError(e.to_string()))?;
            out.push((decode_key(&k)?, v.to_vec()));
        }
        Ok(out)
    }

    fn get(&self, area: Area, key: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get(encode_key(area, key))
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| StoreError(e.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn put(area: Area, key: u64, value: &[u8]) -> Op {
        Op::Put {
            area,
            key,
            value: value.to_vec(),
        }
    }

    /// What every engine must do with the two areas: keep them apart, scan
    /// each in key order from any key, delete, and count.
    pub(crate) fn check_areas_are_separate_and_ordered(store: &dyn Store) {
        store
            .apply(vec![
                put(Area::Pending, 300, b"c"),
                put(Area::Pending, 2, b"a"),
                put(Area::Dead, 1, b"dead"),
                put(Area::Pending, 256, b"b"),
            ])
            .unwrap();
        let keys: Vec<u64> = store
            .scan(Area::Pending, 0, 10)
            .unwrap()
            .iter()
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(keys, vec![2, 256, 300]);
        assert_eq!(
            store.scan(Area::Pending, 257, 10).unwrap(),
            vec![(300, b"c".to_vec())]
        );
        assert_eq!(store.scan(Area::Pending, 0, 2).unwrap().len(), 2);
        assert_eq!(
            store.scan(Area::Dead, 0, 10).unwrap(),
            vec![(1, b"dead".to_vec())]
        );
        store
            .apply(vec![Op::Delete {
                area: Area::Pending,
                key: 2,
            }])
            .unwrap();
        assert_eq!(store.get(Area::Pending, 2).unwrap(), None);
        assert_eq!(store.get(Area::Pending, 256).unwrap(), Some(b"b".to_vec()));
        assert_eq!(
            store.summary().unwrap(),
            Summary {
                pending: 2,
                pending_bytes: 2,
                dead: 1,
                dead_bytes: 4,
                next_seq: 301,
            }
        );
    }

    #[test]
    fn areas_are_separate_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        check_areas_are_separate_and_ordered(&SledStore::open(dir.path(), 1 << 20, None).unwrap());
    }

    #[test]
    fn flushed_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 1 << 20, None).unwrap();
            store
                .apply(vec![Op::Put {
                    area: Area::Pending,
                    key: 7,
                    value: b"x".to_vec(),
                }])
                .unwrap();
            store.flush().unwrap();
        }
        let store = SledStore::open(dir.path(), 1 << 20, None).unwrap();
        assert_eq!(store.get(Area::Pending, 7).unwrap(), Some(b"x".to_vec()));
    }
}
