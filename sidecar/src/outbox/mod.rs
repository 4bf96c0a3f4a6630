//! The durable outbox: what the app handed over, kept on disk until the
//! broker has confirmed it.
//!
//! Writes take a sequence number under one lock and are applied to the store
//! in that order, so sequence order is outbox order and the forwarder can scan
//! forward with a cursor. In [`Durability::Flush`] mode an append returns
//! only after a store flush that started after its write has succeeded; in
//! [`Durability::Buffered`] mode once the write has reached the operating
//! system. Concurrent appends share both: one thread writes (and syncs) on
//! behalf of every writer that queued up while the previous round ran
//! (group commit).
//!
//! A failed write or flush poisons the outbox: it refuses every later write,
//! because after a failed fsync nobody can say what is on disk. Messages
//! already stored keep being forwarded. The flush thread asks the store to
//! recover now and then; an engine that can (the segment log rewrites what
//! was not known durable) lifts the poison without a restart.
//!
//! Engines: [`segment`] (default, an append-only log with group commit),
//! sled ([`store::SledStore`]) and fjall ([`fjall_store::FjallStore`]), all
//! behind [`Store`].

pub mod fjall_store;
pub mod record;
pub mod segment;
pub mod store;

use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};

pub use fjall_store::{FJALL_DIR, FjallStore};
pub use record::{DeadEntry, DecodeError, EncodeError, Message};
pub use segment::{LogFile, LogFs, RealFs, SegmentOptions, SegmentStore};
pub use store::{Area, Op, SledStore, Store, StoreError, Summary};

use crate::metrics::Metrics;

/// When an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Answer only after the flush covering the message has returned (default).
    Flush,
    /// Answer once the message has been written to the operating system
    /// (the store syncs in the background). A crash of the sidecar process
    /// loses nothing; a crash of the host can lose the last moments of
    /// accepted messages. With sled, whose writes stay in its own memory
    /// until a flush, this is the same as `flush`.
    Buffered,
}

/// Which storage engine holds the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The append-only segment log (default).
    Segment,
    /// sled, as before the segment log.
    Sled,
    /// fjall, a maintained log-structured key-value store.
    Fjall,
}

/// Where the segment log lives inside the data directory (sled's files stay
/// at the top level, so an upgraded directory holds both for a moment).
pub const SEGMENT_DIR: &str = "log";

/// Opens the outbox store of `engine` in `data_dir`.
///
/// The segment engine first moves what a sled outbox left in the directory
/// into the log, so an upgrade forwards it instead of stranding it: the log
/// is built in a temporary directory, synced, renamed into place, and only
/// then are sled's files removed (a crash in between repeats the copy into a
/// fresh temporary directory).
pub fn open_store(
    engine: Engine,
    data_dir: &Path,
    opts: SegmentOptions,
    sled_cache_bytes: u64,
    sled_flush_every: Option<Duration>,
) -> Result<Arc<dyn Store>, StoreError> {
    warn_about_other_engines(engine, data_dir);
    match engine {
        Engine::Sled => Ok(Arc::new(SledStore::open(
            data_dir,
            sled_cache_bytes,
            sled_flush_every,
        )?)),
        Engine::Fjall => Ok(Arc::new(FjallStore::open(
            &data_dir.join(FJALL_DIR),
            sled_cache_bytes,
        )?)),
        Engine::Segment => {
            let log = data_dir.join(SEGMENT_DIR);
            let has_sled = has_sled_outbox(data_dir);
            if has_sled && !log.exists() {
                migrate_sled(data_dir, &log, opts, sled_cache_bytes)?;
            }
            if has_sled {
                remove_sled_files(data_dir)?;
            }
            Ok(Arc::new(SegmentStore::open(&log, opts)?))
        }
    }
}

/// Says so when the data directory holds an outbox of an engine that
/// `engine` does not read: what it holds is not forwarded until that engine
/// runs again.
fn warn_about_other_engines(engine: Engine, data_dir: &Path) {
    for other in other_engines(engine, data_dir) {
        tracing::warn!(
            dir = %data_dir.display(),
            found = ?other,
            using = ?engine,
            "an outbox of another engine is in the data directory; this engine does not read it, so what it holds is not forwarded until that engine runs again"
        );
    }
}

/// The engines other than `engine` whose outbox is in `data_dir` and that
/// `engine` does not read (the segment log moves a sled outbox into itself).
fn other_engines(engine: Engine, data_dir: &Path) -> Vec<Engine> {
    let sled = has_sled_outbox(data_dir);
    [
        (Engine::Segment, data_dir.join(SEGMENT_DIR).exists()),
        (Engine::Sled, sled && engine != Engine::Segment),
        (Engine::Fjall, data_dir.join(FJALL_DIR).exists()),
    ]
    .into_iter()
    .filter(|&(other, present)| present && other != engine)
    .map(|(other, _)| other)
    .collect()
}

/// Whether sled's files are in `data_dir`.
fn has_sled_outbox(data_dir: &Path) -> bool {
    data_dir.join("conf").exists() && data_dir.join("db").exists()
}

fn migrate_sled(
    data_dir: &Path,
    log: &Path,
    opts: SegmentOptions,
    sled_cache_bytes: u64,
) -> Result<(), StoreError> {
    let tmp = data_dir.join(format!("{SEGMENT_DIR}.migrating"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .map_err(|e| StoreError(format!("cannot remove {}: {e}", tmp.display())))?;
    }
    let started = Instant::now();
    let sled = SledStore::open(data_dir, sled_cache_bytes, None)?;
    let (mut pending, mut dead) = (0u64, 0u64);
    {
        let seg = SegmentStore::open(&tmp, opts)?;
        for area in [Area::Pending, Area::Dead] {
            let mut from = 0;
            loop {
                let chunk = sled.scan(area, from, 4096)?;
                let Some(&(last, _)) = chunk.last() else {
                    break;
                };
                match area {
                    Area::Pending => pending += chunk.len() as u64,
                    Area::Dead => dead += chunk.len() as u64,
                }
                let ops = chunk
                    .into_iter()
                    .map(|(key, value)| Op::Put { area, key, value })
                    .collect();
                seg.apply(ops)?;
                if last == u64::MAX {
                    break;
                }
                from = last + 1;
            }
        }
        seg.flush()?;
    }
    drop(sled);
    std::fs::rename(&tmp, log)
        .and_then(|()| std::fs::File::open(data_dir)?.sync_all())
        .map_err(|e| StoreError(format!("cannot move the migrated outbox into place: {e}")))?;
    tracing::info!(
        pending,
        dead,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "moved a sled outbox into the segment log"
    );
    Ok(())
}

/// Removes what sled keeps in a data directory, once the log holds it.
fn remove_sled_files(data_dir: &Path) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(data_dir)
        .map_err(|e| StoreError(format!("cannot list {}: {e}", data_dir.display())))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let res = match name.as_str() {
            "conf" | "db" => std::fs::remove_file(&path),
            "blobs" => std::fs::remove_dir_all(&path),
            n if n.starts_with("snap.") => std::fs::remove_file(&path),
            _ => Ok(()),
        };
        res.map_err(|err| StoreError(format!("cannot remove {}: {err}", path.display())))?;
    }
    Ok(())
}

/// Bounds on what the outbox holds (pending and dead together), so a long
/// broker outage fills a known amount of disk and then pushes back.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most messages held at once.
    pub max_messages: u64,
    /// Most encoded bytes held at once.
    pub max_bytes: u64,
}

/// Why an append or a move failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OutboxError {
    /// Accepting the messages would exceed a limit; nothing was stored.
    #[error("outbox full: {what} limit of {limit} reached")]
    Full { what: &'static str, limit: u64 },
    /// An earlier storage failure made the outbox refuse writes.
    #[error("outbox refuses writes after a storage failure: {0}")]
    Poisoned(String),
    /// The store failed this operation (the outbox is now poisoned).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A message that cannot be stored as it is; nothing was stored.
    #[error(transparent)]
    Invalid(#[from] EncodeError),
}

/// A dead-letter entry with its sequence number, or why it cannot be decoded.
pub type DeadRecord = (u64, Result<DeadEntry, DecodeError>);

/// A pending entry read back for forwarding.
#[derive(Debug, Clone)]
pub struct PendingEntry {
    /// Its sequence number (outbox order).
    pub seq: u64,
    /// Its encoded size, for the byte accounting.
    pub size: u64,
    /// The stored bytes, kept so a dead-lettered entry is stored unchanged
    /// (the decoded body shares them).
    pub raw: Bytes,
    /// The decoded message, or why it could not be decoded.
    pub message: Result<Message, DecodeError>,
}

/// Counts and sizes, for `GET /v1/outbox` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages waiting to be forwarded.
    pub pending: u64,
    /// Their encoded bytes.
    pub pending_bytes: u64,
    /// Messages in the dead-letter area.
    pub dead: u64,
    /// Their encoded bytes.
    pub dead_bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    next_seq: u64,
    stats: Stats,
}

/// What a waiter asks the group-commit thread for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlushKind {
    /// Hand the applied changes to the OS.
    Write,
    /// Make them durable.
    Sync,
}

type FlushReply = (FlushKind, oneshot::Sender<Result<(), StoreError>>);

/// Why the outbox refuses writes, shared with the flush thread (which
/// clears it when the store recovers).
type Poison = Arc<Mutex<Option<String>>>;

/// How often the flush thread runs the store's background work.
const TICK: Duration = Duration::from_millis(20);
/// How often a failed store is asked to recover.
const RECOVER_EVERY: Duration = Duration::from_millis(500);

/// The outbox. Cheap to share behind an `Arc`.
pub struct Outbox {
    /// The engine.
    store: Arc<dyn Store>,
    /// Sequence numbers and counts, under the lock that orders appends.
    counters: Mutex<Counters>,
    /// Bounds on what it holds.
    limits: Limits,
    /// When appends are answered.
    durability: Durability,
    /// Queue of the group-commit thread; `None` only while dropping.
    flusher: Option<mpsc::Sender<FlushReply>>,
    /// The group-commit thread.
    flush_thread: Option<std::thread::JoinHandle<()>>,
    /// Why writes are refused, while they are.
    poisoned: Poison,
    /// Woken whenever new pending entries are written.
    new_entries: Notify,
    metrics: Arc<Metrics>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Outbox {
    /// Opens the outbox over `store`, counting what a previous run left.
    pub fn open(
        store: Arc<dyn Store>,
        limits: Limits,
        durability: Durability,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let sum = store.summary()?;
        let counters = Counters {
            next_seq: sum.next_seq.max(1),
            stats: Stats {
                pending: sum.pending,
                pending_bytes: sum.pending_bytes,
                dead: sum.dead,
                dead_bytes: sum.dead_bytes,
            },
        };

        let (tx, rx) = mpsc::channel::<FlushReply>();
        let flush_store = store.clone();
        let flush_metrics = metrics.clone();
        let poisoned: Poison = Arc::default();
        let flush_poison = poisoned.clone();
        let flush_thread = std::thread::Builder::new()
            .name("warren-outbox-flush".into())
            .spawn(move || flush_loop(flush_store, rx, flush_metrics, flush_poison))
            .map_err(|e| StoreError(format!("cannot start the flush thread: {e}")))?;

        Ok(Arc::new(Self {
            store,
            counters: Mutex::new(counters),
            limits,
            durability,
            flusher: Some(tx),
            flush_thread: Some(flush_thread),
            poisoned,
            new_entries: Notify::new(),
            metrics,
        }))
    }

    /// The durability mode appends are acknowledged under.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The storage failure that poisoned the outbox, if any.
    pub fn poisoned(&self) -> Option<String> {
        self.poisoned.lock().unwrap().clone()
    }

    fn poison(&self, err: &StoreError) {
        let mut p = self.poisoned.lock().unwrap();
        if p.is_none() {
            tracing::error!(error = %err, "outbox storage failed; refusing further writes");
            *p = Some(err.0.clone());
        }
    }

    fn check_poison(&self) -> Result<(), OutboxError> {
        match self.poisoned() {
            Some(e) => Err(OutboxError::Poisoned(e)),
            None => Ok(()),
        }
    }

    /// Stores `messages` as one atomic unit and returns their sequence
    /// numbers once they are as durable as the durability mode promises.
    /// On error nothing was acknowledged; the caller must report failure.
    pub async fn append(&self, messages: Vec<Message>) -> Result<Vec<u64>, OutboxError> {
        self.check_poison()?;
        for m in &messages {
            m.check()?;
        }
        let encoded: Vec<Vec<u8>> = messages.iter().map(Message::encode).collect();
        let bytes: u64 = encoded.iter().map(|e| e.len() as u64).sum();
        let count = encoded.len() as u64;
        let seqs = {
            let mut c = self.counters.lock().unwrap();
            let held = c.stats.pending + c.stats.dead;
            let held_bytes = c.stats.pending_bytes + c.stats.dead_bytes;
            if held + count > self.limits.max_messages {
                return Err(OutboxError::Full {
                    what: "message",
                    limit: self.limits.max_messages,
                });
            }
            if held_bytes + bytes > self.limits.max_bytes {
                return Err(OutboxError::Full {
                    what: "byte",
                    limit: self.limits.max_bytes,
                });
            }
            let first = c.next_seq;
            let ops = encoded
                .into_iter()
                .enumerate()
                .map(|(i, value)| Op::Put {
                    area: Area::Pending,
                    key: first + i as u64,
                    value,
                })
                .collect();
            // Applied under the lock so that sequence order is store order.
            if let Err(e) = self.store.apply(ops) {
                drop(c);
                self.poison(&e);
                return Err(e.into());
            }
            c.next_seq += count;
            c.stats.pending += count;
            c.stats.pending_bytes += bytes;
            (first..first + count).collect::<Vec<u64>>()
        };
        self.new_entries.notify_one();
        match self.durability {
            Durability::Flush => self.sync().await?,
            Durability::Buffered => self.request(FlushKind::Write).await?,
        }
        Ok(seqs)
    }

    /// Waits for a flush that covers every change made before this call.
    pub async fn sync(&self) -> Result<(), OutboxError> {
        self.request(FlushKind::Sync).await
    }

    async fn request(&self, kind: FlushKind) -> Result<(), OutboxError> {
        let (tx, rx) = oneshot::channel();
        let sent = self
            .flusher
            .as_ref()
            .is_some_and(|f| f.send((kind, tx)).is_ok());
        let res = match sent {
            true => rx
                .await
                .unwrap_or_else(|_| Err(StoreError("flush thread stopped".into()))),
            false => Err(StoreError("flush thread stopped".into())),
        };
        res.map_err(|e| {
            self.poison(&e);
            OutboxError::Store(e)
        })
    }

    /// Waits until new entries may have been appended.
    pub async fn wait_for_new(&self) {
        self.new_entries.notified().await
    }

    /// Up to `limit` pending entries with sequence ≥ `from`, in order.
    pub fn read_pending(&self, from: u64, limit: usize) -> Result<Vec<PendingEntry>, StoreError> {
        Ok(self
            .store
            .scan(Area::Pending, from, limit)?
            .into_iter()
            .map(|(seq, raw)| pending_entry(seq, raw))
            .collect())
    }

    /// The pending entry `seq`, if it is still pending.
    pub fn read_one(&self, seq: u64) -> Result<Option<PendingEntry>, StoreError> {
        Ok(self
            .store
            .get(Area::Pending, seq)?
            .map(|raw| pending_entry(seq, raw)))
    }

    /// Removes entries the broker has confirmed. Not flushed by itself: a
    /// crash before the next flush only means they are sent again, and every
    /// message carries its id so consumers can drop the duplicate.
    pub fn remove(&self, done: &[(u64, u64)]) -> Result<(), StoreError> {
        if done.is_empty() {
            return Ok(());
        }
        let ops = done
            .iter()
            .map(|&(key, _)| Op::Delete {
                area: Area::Pending,
                key,
            })
            .collect();
        if let Err(e) = self.store.apply(ops) {
            self.poison(&e);
            return Err(e);
        }
        let bytes: u64 = done.iter().map(|&(_, s)| s).sum();
        let mut c = self.counters.lock().unwrap();
        c.stats.pending -= done.len() as u64;
        c.stats.pending_bytes -= bytes;
        Ok(())
    }

    /// Moves a pending entry to the dead-letter area, durably.
    pub async fn dead_letter(
        &self,
        entry: &PendingEntry,
        reason: &str,
        attempts: u32,
    ) -> Result<(), OutboxError> {
        let dead = DeadEntry {
            dead_at_ms: now_ms(),
            attempts,
            reason: reason.to_owned(),
            raw: entry.raw.to_vec(),
        }
        .encode();
        let dead_len = dead.len() as u64;
        {
            let mut c = self.counters.lock().unwrap();
            let ops = vec![
                Op::Put {
                    area: Area::Dead,
                    key: entry.seq,
                    value: dead,
                },
                Op::Delete {
                    area: Area::Pending,
                    key: entry.seq,
                },
            ];
            if let Err(e) = self.store.apply(ops) {
                drop(c);
                self.poison(&e);
                return Err(e.into());
            }
            c.stats.pending -= 1;
            c.stats.pending_bytes -= entry.size;
            c.stats.dead += 1;
            c.stats.dead_bytes += dead_len;
        }
        self.metrics.dead_lettered.inc();
        self.sync().await
    }

    /// Up to `limit` dead entries with sequence ≥ `from`.
    pub fn dead(&self, from: u64, limit: usize) -> Result<Vec<DeadRecord>, StoreError> {
        Ok(self
            .store
            .scan(Area::Dead, from, limit)?
            .into_iter()
            .map(|(seq, raw)| (seq, DeadEntry::decode(&raw)))
            .collect())
    }

    /// Moves dead entry `seq` back to the end of the pending queue, for
    /// another round of forwarding. Returns its new sequence number, or
    /// `None` if there is no such dead entry. Of concurrent calls for the
    /// same entry exactly one moves it; the others find it gone.
    pub async fn requeue_dead(&self, seq: u64) -> Result<Option<u64>, OutboxError> {
        self.check_poison()?;
        let new_seq = self.move_dead(seq)?;
        if new_seq.is_some() {
            self.new_entries.notify_one();
            self.sync().await?;
        }
        Ok(new_seq)
    }

    /// Moves every dead entry that `matches` accepts back to the end of the
    /// pending queue, in sequence order, with one flush for all of them.
    /// Returns the moved entries as `(old seq, new seq)`. An entry that
    /// cannot be decoded is not offered to `matches` and stays. Safe against
    /// concurrent requeues: an entry another call moved first is skipped.
    pub async fn requeue_dead_matching(
        &self,
        mut matches: impl FnMut(u64, &DeadEntry) -> bool,
    ) -> Result<Vec<(u64, u64)>, OutboxError> {
        self.check_poison()?;
        let mut moved = Vec::new();
        let mut from = 0;
        loop {
            let page = self.store.scan(Area::Dead, from, 256)?;
            let Some(&(last, _)) = page.last() else {
                break;
            };
            for (seq, raw) in page {
                let chosen = DeadEntry::decode(&raw).is_ok_and(|dead| matches(seq, &dead));
                if !chosen {
                    continue;
                }
                // Read again under the lock: a concurrent call may have
                // moved it since the scan.
                match self.move_dead(seq) {
                    Ok(Some(new_seq)) => moved.push((seq, new_seq)),
                    Ok(None) => {}
                    Err(e) => {
                        if !moved.is_empty() {
                            self.new_entries.notify_one();
                        }
                        return Err(e);
                    }
                }
            }
            let Some(next) = last.checked_add(1) else {
                break;
            };
            from = next;
        }
        if !moved.is_empty() {
            self.new_entries.notify_one();
            self.sync().await?;
        }
        Ok(moved)
    }

    /// Moves dead entry `seq` to the end of the pending queue (not flushed).
    /// The entry is read under the lock every move out of the dead area
    /// holds, so two concurrent moves of one entry cannot both find it.
    fn move_dead(&self, seq: u64) -> Result<Option<u64>, OutboxError> {
        let mut c = self.counters.lock().unwrap();
        let Some(raw) = self.store.get(Area::Dead, seq)? else {
            return Ok(None);
        };
        let dead = DeadEntry::decode(&raw).map_err(|e| StoreError(e.to_string()))?;
        let new_seq = c.next_seq;
        let pending_len = dead.raw.len() as u64;
        let ops = vec![
            Op::Delete {
                area: Area::Dead,
                key: seq,
            },
            Op::Put {
                area: Area::Pending,
                key: new_seq,
                value: dead.raw,
            },
        ];
        if let Err(e) = self.store.apply(ops) {
            drop(c);
            self.poison(&e);
            return Err(e.into());
        }
        c.next_seq += 1;
        c.stats.dead -= 1;
        c.stats.dead_bytes -= raw.len() as u64;
        c.stats.pending += 1;
        c.stats.pending_bytes += pending_len;
        Ok(Some(new_seq))
    }

    /// Current counts and sizes.
    pub fn stats(&self) -> Stats {
        self.counters.lock().unwrap().stats
    }

    /// Enqueue time of the oldest pending entry, if any.
    pub fn oldest_pending_ms(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .store
            .scan(Area::Pending, 0, 1)?
            .first()
            .and_then(|(_, raw)| Message::peek_enqueued_at(raw)))
    }
}

fn pending_entry(seq: u64, raw: Vec<u8>) -> PendingEntry {
    let raw = Bytes::from(raw);
    PendingEntry {
        seq,
        size: raw.len() as u64,
        message: Message::decode_shared(&raw),
        raw,
    }
}

impl Drop for Outbox {
    /// Stops the flush thread and waits for it, so that the store is closed
    /// (and its directory unlocked) when the outbox is gone.
    fn drop(&mut self) {
        self.flusher.take();
        if let Some(t) = self.flush_thread.take() {
            let _ = t.join();
        }
    }
}

/// The group-commit loop: one write (and, if anyone asked, one sync) serves
/// every request queued before it started; in between it runs the store's
/// background work.
///
/// A failed write or flush is not forgotten by a later success. After a
/// failed fsync the kernel may have dropped the dirty data it could not
/// write, so a later flush that succeeds says nothing about changes made
/// before the failure: every request gets the failure until the store has
/// recovered (rewritten what was not known durable, see [`Store::recover`]).
fn flush_loop(
    store: Arc<dyn Store>,
    rx: mpsc::Receiver<FlushReply>,
    metrics: Arc<Metrics>,
    poison: Poison,
) {
    let mut last_try = Instant::now();
    let mut last_tick = Instant::now();
    let set_poison = |e: &StoreError| {
        let mut p = poison.lock().unwrap();
        if p.is_none() {
            tracing::error!(error = %e, "outbox storage failed; refusing further writes");
            *p = Some(e.0.clone());
        }
    };
    loop {
        let mut waiters = Vec::new();
        match rx.recv_timeout(TICK) {
            Ok(first) => {
                waiters.push(first);
                while let Ok(more) = rx.try_recv() {
                    waiters.push(more);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let failed = poison.lock().unwrap().clone();
        if let Some(reason) = failed {
            if last_try.elapsed() >= RECOVER_EVERY {
                last_try = Instant::now();
                match store.recover() {
                    Ok(()) => {
                        tracing::info!(%reason, "outbox storage recovered; accepting writes again");
                        *poison.lock().unwrap() = None;
                    }
                    Err(e) => tracing::debug!(error = %e, "outbox storage has not recovered yet"),
                }
            }
            // Requests made before the recovery may cover changes the
            // failure dropped: they fail.
            for (_, w) in waiters {
                let _ = w.send(Err(StoreError(reason.clone())));
            }
            continue;
        }
        if !waiters.is_empty() {
            let sync = waiters.iter().any(|(k, _)| *k == FlushKind::Sync);
            let started = Instant::now();
            let res = if sync {
                store.flush()
            } else {
                store.write_out()
            };
            if sync {
                metrics.observe_flush(started.elapsed(), waiters.len());
            }
            if let Err(e) = &res {
                set_poison(e);
                last_try = Instant::now();
            }
            for (_, w) in waiters {
                let _ = w.send(res.clone());
            }
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            if let Err(e) = store.tick() {
                set_poison(&e);
                last_try = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outbox_another_engine_left_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(other_engines(Engine::Fjall, dir.path()).is_empty());
        std::fs::create_dir(dir.path().join(SEGMENT_DIR)).unwrap();
        assert_eq!(
            other_engines(Engine::Fjall, dir.path()),
            vec![Engine::Segment]
        );
        assert_eq!(
            other_engines(Engine::Sled, dir.path()),
            vec![Engine::Segment]
        );
        assert!(other_engines(Engine::Segment, dir.path()).is_empty());
        std::fs::create_dir(dir.path().join(FJALL_DIR)).unwrap();
        std::fs::write(dir.path().join("conf"), b"").unwrap();
        std::fs::write(dir.path().join("db"), b"").unwrap();
        // The segment log moves sled's outbox into itself: not named.
        assert_eq!(
            other_engines(Engine::Segment, dir.path()),
            vec![Engine::Fjall]
        );
        assert_eq!(
            other_engines(Engine::Fjall, dir.path()),
            vec![Engine::Segment, Engine::Sled]
        );
    }
}
