//! The outbox over the segment log on a fault-injecting file system, checked
//! against a model of what a crash keeps: nothing answered as stored is lost
//! after a crash and reopen, nothing half-written is read back, a failed
//! write, sync or rename is never answered as stored, and the outbox refuses
//! writes after a storage failure until the log has recovered by itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use warren_sidecar::metrics::Metrics;
use warren_sidecar::outbox::{
    Area, Durability, Engine, Limits, LogFile, LogFs, Message, Op, Outbox, OutboxError,
    SegmentOptions, SegmentStore, SledStore, Store, open_store,
};

/// Which operation fails, and at which count (0-based).
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    write_at: Option<usize>,
    sync_at: Option<usize>,
    rename_at: Option<usize>,
    /// Allocating ahead always fails (a file system without room for it).
    no_allocate: bool,
}

/// One file: what reads see, and how much of it a host crash keeps.
#[derive(Default)]
struct FileData {
    bytes: Vec<u8>,
    durable: usize,
}

/// An in-memory file system. A failed write stores only part of its buffer,
/// as a short write on a full disk does. [`FaultFs::crash_image`] returns
/// what survives a crash: of each file, the synced prefix and (for a host
/// crash) a random part of the rest, with its last kept byte flipped now and
/// then, as a torn sector.
struct FaultFs {
    files: Mutex<HashMap<PathBuf, Arc<FaultFile>>>,
    faults: Faults,
    writes: Arc<AtomicUsize>,
    syncs: Arc<AtomicUsize>,
    renames: AtomicUsize,
    sync_delay: Duration,
    /// While set, every write and sync fails with ENOSPC.
    full: Arc<AtomicBool>,
}

struct FaultFile {
    data: Mutex<FileData>,
    faults: Faults,
    full: Arc<AtomicBool>,
    writes: Arc<AtomicUsize>,
    syncs: Arc<AtomicUsize>,
    sync_delay: Duration,
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl LogFile for FaultFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        let mut d = self.data.lock().unwrap();
        let (buf, fail) = if self.faults.write_at == Some(n) || self.full.load(Ordering::SeqCst) {
            (&buf[..buf.len() / 2], true)
        } else {
            (buf, false)
        };
        let end = offset as usize + buf.len();
        if d.bytes.len() < end {
            d.bytes.resize(end, 0);
        }
        d.bytes[offset as usize..end].copy_from_slice(buf);
        if fail { Err(enospc()) } else { Ok(()) }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let d = self.data.lock().unwrap();
        let start = (offset as usize).min(d.bytes.len());
        let n = buf.len().min(d.bytes.len() - start);
        buf[..n].copy_from_slice(&d.bytes[start..start + n]);
        Ok(n)
    }
    fn sync_data(&self) -> io::Result<()> {
        if !self.sync_delay.is_zero() {
            std::thread::sleep(self.sync_delay);
        }
        let n = self.syncs.fetch_add(1, Ordering::SeqCst);
        if self.full.load(Ordering::SeqCst) {
            return Err(enospc());
        }
        if self.faults.sync_at == Some(n) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let mut d = self.data.lock().unwrap();
        d.durable = d.bytes.len();
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut d = self.data.lock().unwrap();
        d.bytes.resize(len as usize, 0);
        d.durable = d.durable.min(len as usize);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.data.lock().unwrap().bytes.len() as u64)
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) || self.faults.no_allocate {
            return Err(enospc());
        }
        let mut d = self.data.lock().unwrap();
        if d.bytes.len() < len as usize {
            d.bytes.resize(len as usize, 0);
        }
        Ok(())
    }
}

impl FaultFs {
    fn new(faults: Faults) -> Arc<Self> {
        Arc::new(Self {
            files: Mutex::default(),
            faults,
            writes: Arc::default(),
            syncs: Arc::default(),
            renames: AtomicUsize::new(0),
            sync_delay: Duration::ZERO,
            full: Arc::default(),
        })
    }

    /// What a crash leaves: `host` loses what was never synced (tearing
    /// part of it), a process crash keeps everything written.
    fn crash_image(&self, host: bool, rng: &mut StdRng) -> Arc<FaultFs> {
        let image = FaultFs::new(Faults::default());
        let files = self.files.lock().unwrap();
        let mut out = image.files.lock().unwrap();
        let mut paths: Vec<&PathBuf> = files.keys().collect();
        paths.sort();
        for path in paths {
            let d = files[path].data.lock().unwrap();
            let mut bytes = d.bytes.clone();
            if host && bytes.len() > d.durable {
                let keep = d.durable + rng.random_range(0..=bytes.len() - d.durable);
                bytes.truncate(keep);
                if keep > d.durable && rng.random_bool(0.3) {
                    let last = bytes.len() - 1;
                    bytes[last] ^= 0x5a;
                }
            }
            let durable = bytes.len();
            out.insert(
                path.clone(),
                Arc::new(FaultFile {
                    data: Mutex::new(FileData { bytes, durable }),
                    faults: Faults::default(),
                    full: image.full.clone(),
                    writes: image.writes.clone(),
                    syncs: image.syncs.clone(),
                    sync_delay: Duration::ZERO,
                }),
            );
        }
        drop(out);
        image
    }
}

impl LogFs for FaultFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn LogFile>> {
        let mut files = self.files.lock().unwrap();
        if let Some(f) = files.get(path) {
            return Ok(f.clone());
        }
        if !create {
            return Err(io::ErrorKind::NotFound.into());
        }
        let f = Arc::new(FaultFile {
            data: Mutex::default(),
            faults: self.faults,
            full: self.full.clone(),
            writes: self.writes.clone(),
            syncs: self.syncs.clone(),
            sync_delay: self.sync_delay,
        });
        files.insert(path.to_owned(), f.clone());
        Ok(f)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let n = self.renames.fetch_add(1, Ordering::SeqCst);
        if self.faults.rename_at == Some(n) {
            return Err(enospc());
        }
        let mut files = self.files.lock().unwrap();
        let f = files.remove(from).ok_or(io::ErrorKind::NotFound)?;
        files.insert(to.to_owned(), f);
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.files.lock().unwrap().remove(path);
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(self
            .files
            .lock()
            .unwrap()
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }
    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}

fn dir() -> PathBuf {
    PathBuf::from("/outbox")
}

/// Small segments, so that rotation, deletion and compaction all happen.
fn opts() -> SegmentOptions {
    SegmentOptions {
        segment_bytes: 8 << 10,
        sync_interval: Duration::from_millis(2),
        checkpoint_interval: Duration::ZERO,
        straggler_age: Duration::ZERO,
    }
}

fn open(fs: &Arc<FaultFs>, durability: Durability) -> (Arc<SegmentStore>, Arc<Outbox>) {
    let store = Arc::new(SegmentStore::open_with_fs(&dir(), opts(), fs.clone()).unwrap());
    let outbox = Outbox::open(
        store.clone(),
        limits(),
        durability,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    (store, outbox)
}

fn limits() -> Limits {
    Limits {
        max_messages: 1_000_000,
        max_bytes: 1 << 30,
    }
}

fn msg(i: u64, rng: &mut StdRng) -> Message {
    let len = rng.random_range(0..300);
    Message {
        message_id: format!("m-{i}"),
        exchange: "orders".into(),
        routing_key: format!("k.{}", i % 7),
        content_type: i.is_multiple_of(2).then(|| "application/json".into()),
        headers: vec![("n".into(), i.to_string())],
        body: Bytes::from(
            (0..len)
                .map(|b| (b as u8).wrapping_add(i as u8))
                .collect::<Vec<u8>>(),
        ),
        enqueued_at_ms: 1_700_000_000_000 + i,
    }
}

fn all_pending(outbox: &Outbox) -> BTreeMap<u64, Message> {
    outbox
        .read_pending(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.message.expect("stored record decodes")))
        .collect()
}

async fn wait_recovered(outbox: &Outbox, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbox.poisoned().is_some() {
        assert!(
            Instant::now() < deadline,
            "{what}: outbox did not recover: {:?}",
            outbox.poisoned()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Concurrent writers and a remover run against a log that fails at a
/// chosen point; a crash image is taken mid-run and reopened, and checked
/// against what was answered.
async fn run_case(seed: u64, faults: Faults, durability: Durability, host_crash: bool) {
    let fs = FaultFs::new(faults);
    let (_store, outbox) = open(&fs, durability);
    let acked: Arc<Mutex<HashMap<u64, Message>>> = Default::default();
    let removed: Arc<Mutex<HashSet<u64>>> = Default::default();
    let attempted: Arc<Mutex<HashMap<String, Message>>> = Default::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let outbox = outbox.clone();
        let acked = acked.clone();
        let attempted = attempted.clone();
        let refused = refused.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed * 1000 + w);
            for round in 0..40u64 {
                let n = rng.random_range(1..4);
                let batch: Vec<Message> = (0..n)
                    .map(|j| msg(w * 100_000 + round * 10 + j, &mut rng))
                    .collect();
                for m in &batch {
                    attempted
                        .lock()
                        .unwrap()
                        .insert(m.message_id.clone(), m.clone());
                }
                match outbox.append(batch.clone()).await {
                    Ok(seqs) => {
                        assert_eq!(seqs.len(), batch.len());
                        let mut a = acked.lock().unwrap();
                        for (s, m) in seqs.into_iter().zip(batch) {
                            assert!(a.insert(s, m).is_none(), "seed {seed}: seq {s} given twice");
                        }
                    }
                    Err(OutboxError::Poisoned(_) | OutboxError::Store(_)) => {
                        refused.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    // The forwarder's part: remove (acknowledge) most of what is stored,
    // leaving some stragglers behind.
    {
        let outbox = outbox.clone();
        let removed = removed.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed + 77);
            for _ in 0..40 {
                let entries = outbox.read_pending(0, 64).unwrap();
                let done: Vec<(u64, u64)> = entries
                    .iter()
                    .filter(|_| rng.random_bool(0.9))
                    .map(|e| (e.seq, e.size))
                    .collect();
                outbox.remove(&done).unwrap();
                removed.lock().unwrap().extend(done.iter().map(|d| d.0));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc0ffee);
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
    // Acknowledged before the crash: must survive it.
    let must_keep = acked.lock().unwrap().clone();
    let image = fs.crash_image(host_crash, &mut rng);
    let removed_by_crash = removed.lock().unwrap().clone();
    for t in tasks {
        t.await.unwrap();
    }
    let injected = faults
        .write_at
        .is_some_and(|n| fs.writes.load(Ordering::SeqCst) > n)
        || faults
            .sync_at
            .is_some_and(|n| fs.syncs.load(Ordering::SeqCst) > n);
    if injected {
        // The log recovers by itself, without a restart, and accepts again.
        wait_recovered(&outbox, &format!("seed {seed}")).await;
        outbox
            .append(vec![msg(999_999, &mut rng)])
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: append after recovery: {e}"));
    }
    // Everything ever answered must still be readable in the running
    // outbox, unless removed.
    let live = all_pending(&outbox);
    let removed_all = removed.lock().unwrap().clone();
    for (seq, m) in acked.lock().unwrap().iter() {
        if !removed_all.contains(seq) {
            assert_eq!(live.get(seq), Some(m), "seed {seed}: seq {seq} unreadable");
        }
    }
    drop(outbox);

    let (_s, reopened) = open(&image, Durability::Flush);
    let found = all_pending(&reopened);
    for (seq, m) in &must_keep {
        if removed_by_crash.contains(seq) {
            continue;
        }
        assert_eq!(
            found.get(seq),
            Some(m),
            "seed {seed}: acknowledged seq {seq} lost or changed after crash"
        );
    }
    let attempted = attempted.lock().unwrap().clone();
    for m in found.values() {
        assert_eq!(
            attempted.get(&m.message_id),
            Some(m),
            "seed {seed}: outbox holds a message nobody sent (or a half-written one)"
        );
    }
    assert_eq!(
        reopened.stats().pending as usize,
        found.len(),
        "seed {seed}"
    );
    // New writes after reopen never reuse a sequence number.
    let next = reopened
        .append(vec![msg(1, &mut StdRng::seed_from_u64(2))])
        .await
        .unwrap()[0];
    assert!(
        must_keep.keys().chain(found.keys()).all(|s| *s < next),
        "seed {seed}: seq {next} reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_fault_keeps_everything_through_host_and_process_crashes() {
    for seed in 0..6 {
        run_case(seed, Faults::default(), Durability::Flush, true).await;
        run_case(seed, Faults::default(), Durability::Buffered, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_writes_are_never_acknowledged_and_nothing_acknowledged_is_lost() {
    for seed in 0..30u64 {
        let faults = Faults {
            write_at: Some((seed as usize * 7) % 120),
            ..Faults::default()
        };
        run_case(seed, faults, Durability::Flush, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_syncs_are_never_acknowledged_and_nothing_acknowledged_is_lost() {
    for seed in 0..30u64 {
        let faults = Faults {
            sync_at: Some((seed as usize * 3) % 60),
            ..Faults::default()
        };
        run_case(seed, faults, Durability::Flush, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_renames_lose_nothing() {
    for seed in 0..20u64 {
        let faults = Faults {
            rename_at: Some(seed as usize % 10),
            ..Faults::default()
        };
        run_case(seed, faults, Durability::Flush, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buffered_failures_recover_and_lose_nothing_a_process_crash_keeps() {
    for seed in 0..20u64 {
        let faults = Faults {
            write_at: (seed % 2 == 0).then_some(seed as usize * 5 % 80),
            sync_at: (seed % 2 == 1).then_some(seed as usize % 20),
            ..Faults::default()
        };
        run_case(seed, faults, Durability::Buffered, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_one_write_and_one_sync() {
    let fs = Arc::new(FaultFs {
        sync_delay: Duration::from_millis(3),
        ..Arc::into_inner(FaultFs::new(Faults::default())).unwrap()
    });
    let (_store, outbox) = open(&fs, Durability::Flush);
    let mut tasks = Vec::new();
    for w in 0..64u64 {
        let outbox = outbox.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w);
            for i in 0..10 {
                outbox
                    .append(vec![msg(w * 100 + i, &mut rng)])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let syncs = fs.syncs.load(Ordering::SeqCst);
    let writes = fs.writes.load(Ordering::SeqCst);
    assert!(
        syncs * 4 < 640 && writes * 4 < 640,
        "640 appends needed {syncs} syncs and {writes} writes: no group commit"
    );
    assert_eq!(outbox.stats().pending, 640);
}

#[tokio::test]
async fn buffered_mode_answers_after_the_write_before_the_sync() {
    let fs = FaultFs::new(Faults::default());
    let store = Arc::new(
        SegmentStore::open_with_fs(
            &dir(),
            SegmentOptions {
                sync_interval: Duration::from_secs(3600),
                ..opts()
            },
            fs.clone(),
        )
        .unwrap(),
    );
    let outbox = Outbox::open(
        store,
        limits(),
        Durability::Buffered,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let syncs = fs.syncs.load(Ordering::SeqCst);
    let seq = outbox
        .append(vec![msg(1, &mut StdRng::seed_from_u64(1))])
        .await
        .unwrap()[0];
    assert_eq!(
        fs.syncs.load(Ordering::SeqCst),
        syncs,
        "no sync before the answer"
    );
    // A process crash right after the answer keeps it.
    let image = fs.crash_image(false, &mut StdRng::seed_from_u64(1));
    let (_s, reopened) = open(&image, Durability::Flush);
    assert!(all_pending(&reopened).contains_key(&seq));
    outbox.sync().await.unwrap();
    assert!(fs.syncs.load(Ordering::SeqCst) > syncs);
}

#[tokio::test]
async fn a_log_that_cannot_allocate_ahead_still_stores_everything() {
    let fs = FaultFs::new(Faults {
        no_allocate: true,
        ..Faults::default()
    });
    let (_store, outbox) = open(&fs, Durability::Flush);
    let mut rng = StdRng::seed_from_u64(12);
    let sent: Vec<Message> = (0..300).map(|i| msg(i, &mut rng)).collect();
    for chunk in sent.chunks(30) {
        outbox.append(chunk.to_vec()).await.unwrap();
    }
    assert!(outbox.poisoned().is_none());
    let image = fs.crash_image(true, &mut rng);
    let (_s, reopened) = open(&image, Durability::Flush);
    let found: Vec<Message> = all_pending(&reopened).into_values().collect();
    assert_eq!(found, sent);
}

#[tokio::test]
async fn torn_and_corrupt_tails_are_cut_and_the_log_goes_on() {
    let fs = FaultFs::new(Faults::default());
    let (_store, outbox) = open(&fs, Durability::Flush);
    let mut rng = StdRng::seed_from_u64(9);
    let sent: Vec<Message> = (0..200).map(|i| msg(i, &mut rng)).collect();
    for chunk in sent.chunks(10) {
        outbox.append(chunk.to_vec()).await.unwrap();
    }
    for cut in [1usize, 7, 17, 100] {
        let image = fs.crash_image(false, &mut rng);
        // Tear the newest segment: drop the last `cut` bytes of its frames
        // (the zeros of the space allocated ahead go first) and append
        // garbage that looks like the start of a frame, followed by
        // allocated space or not.
        {
            let files = image.files.lock().unwrap();
            let newest = files
                .keys()
                .filter(|p| p.extension().is_some_and(|e| e == "seg"))
                .max()
                .unwrap();
            let mut d = files[newest].data.lock().unwrap();
            let frames_end = d.bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
            d.bytes.truncate(frames_end.saturating_sub(cut));
            d.bytes.extend_from_slice(&[0, 0, 1, 0, 0xde, 0xad]);
            if cut % 2 == 1 {
                let len = d.bytes.len();
                d.bytes.resize(len + 4096, 0);
            }
        }
        let (_s, reopened) = open(&image, Durability::Flush);
        let found: Vec<Message> = all_pending(&reopened).into_values().collect();
        // Everything but the torn last record is there, in order.
        assert_eq!(found.len(), sent.len() - 1, "cut {cut}");
        assert_eq!(found[..], sent[..sent.len() - 1], "cut {cut}");
        reopened.append(vec![msg(500, &mut rng)]).await.unwrap();
    }
}

#[tokio::test]
async fn acknowledged_segments_are_deleted_and_stragglers_do_not_pin_them() {
    let fs = FaultFs::new(Faults::default());
    let (store, outbox) = open(&fs, Durability::Flush);
    let mut rng = StdRng::seed_from_u64(11);
    for chunk in (0..2000)
        .map(|i| msg(i, &mut rng))
        .collect::<Vec<_>>()
        .chunks(50)
    {
        outbox.append(chunk.to_vec()).await.unwrap();
    }
    let many = store.segment_count();
    assert!(many > 20, "{many} segments");
    // Acknowledge everything but three early stragglers.
    let entries = outbox.read_pending(0, usize::MAX).unwrap();
    let keep: Vec<u64> = [3usize, 40, 41].iter().map(|&i| entries[i].seq).collect();
    let done: Vec<(u64, u64)> = entries
        .iter()
        .filter(|e| !keep.contains(&e.seq))
        .map(|e| (e.seq, e.size))
        .collect();
    outbox.remove(&done).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.segment_count() > 3 {
        assert!(
            Instant::now() < deadline,
            "{} segments left",
            store.segment_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<u64> = all_pending(&outbox).into_keys().collect();
    assert_eq!(left, keep);
    for &seq in &keep {
        assert!(outbox.read_one(seq).unwrap().is_some());
    }
    // The stragglers survive a host crash after their rewrite.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let image = fs.crash_image(true, &mut rng);
    let (_s, reopened) = open(&image, Durability::Flush);
    let after: Vec<u64> = all_pending(&reopened).into_keys().collect();
    assert_eq!(after, keep);
}

#[tokio::test]
async fn a_clean_restart_reads_the_checkpoint_and_counts_right() {
    let fs = FaultFs::new(Faults::default());
    let mut rng = StdRng::seed_from_u64(12);
    let stats = {
        let (_store, outbox) = open(&fs, Durability::Flush);
        for chunk in (0..600)
            .map(|i| msg(i, &mut rng))
            .collect::<Vec<_>>()
            .chunks(20)
        {
            outbox.append(chunk.to_vec()).await.unwrap();
        }
        let entries = outbox.read_pending(0, 250).unwrap();
        let done: Vec<(u64, u64)> = entries.iter().map(|e| (e.seq, e.size)).collect();
        outbox.remove(&done).unwrap();
        outbox.stats()
    };
    let (_s, reopened) = open(&fs, Durability::Flush);
    assert_eq!(reopened.stats(), stats);
    assert_eq!(all_pending(&reopened).len(), 350);
}

#[tokio::test]
async fn dead_letters_are_kept_counted_and_can_be_requeued() {
    let fs = FaultFs::new(Faults::default());
    let (_store, outbox) = open(&fs, Durability::Flush);
    let mut rng = StdRng::seed_from_u64(4);
    let m = msg(1, &mut rng);
    let seq = outbox
        .append(vec![m.clone(), msg(2, &mut rng)])
        .await
        .unwrap()[0];
    let entry = outbox.read_one(seq).unwrap().unwrap();
    outbox
        .dead_letter(&entry, "NOT_FOUND - no exchange 'orders' in vhost '/'", 3)
        .await
        .unwrap();
    let s = outbox.stats();
    assert_eq!((s.pending, s.dead), (1, 1));
    // Durable: survives a host crash, and the dead one is not pending again.
    let image = fs.crash_image(true, &mut rng);
    let (_s, outbox) = open(&image, Durability::Flush);
    assert_eq!((outbox.stats().pending, outbox.stats().dead), (1, 1));
    let dead = outbox.dead(0, 10).unwrap();
    assert_eq!(dead.len(), 1);
    let d = dead[0].1.as_ref().unwrap();
    assert_eq!(d.attempts, 3);
    assert!(d.reason.contains("no exchange"));
    assert_eq!(Message::decode(&d.raw).unwrap(), m);
    let new_seq = outbox.requeue_dead(seq).await.unwrap().unwrap();
    assert!(new_seq > seq);
    assert_eq!(
        outbox.read_one(new_seq).unwrap().unwrap().message.unwrap(),
        m
    );
    assert_eq!(outbox.stats().dead, 0);
    assert_eq!(outbox.requeue_dead(seq).await.unwrap(), None);
}

#[tokio::test]
async fn limits_refuse_and_recover() {
    let fs = FaultFs::new(Faults::default());
    let store = Arc::new(SegmentStore::open_with_fs(&dir(), opts(), fs).unwrap());
    let lim = Limits {
        max_messages: 5,
        max_bytes: 1 << 20,
    };
    let outbox = Outbox::open(store, lim, Durability::Flush, Arc::new(Metrics::new())).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let seqs = outbox
        .append((0..5).map(|i| msg(i, &mut rng)).collect())
        .await
        .unwrap();
    let err = outbox.append(vec![msg(5, &mut rng)]).await.unwrap_err();
    assert!(
        matches!(
            err,
            OutboxError::Full {
                what: "message",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(outbox.stats().pending, 5);
    let entries = outbox.read_pending(0, 10).unwrap();
    outbox.remove(&[(seqs[0], entries[0].size)]).unwrap();
    outbox.append(vec![msg(6, &mut rng)]).await.unwrap();
    assert_eq!(outbox.stats().pending, 5);
}

#[tokio::test]
async fn unstorable_messages_are_refused_not_stored() {
    let fs = FaultFs::new(Faults::default());
    let (_store, outbox) = open(&fs, Durability::Flush);
    let bad = Message {
        headers: vec![("h".repeat(300), "v".into())],
        ..msg(1, &mut StdRng::seed_from_u64(1))
    };
    let err = outbox.append(vec![bad]).await.unwrap_err();
    assert!(matches!(err, OutboxError::Invalid(_)), "{err}");
    assert_eq!(outbox.stats().pending, 0);
}

#[tokio::test]
async fn sled_outbox_survives_reopen_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let sent: Vec<Message> = (0..500).map(|i| msg(i, &mut rng)).collect();
    {
        let store = SledStore::open(dir.path(), 1 << 20, None).unwrap();
        let outbox = Outbox::open(
            Arc::new(store),
            limits(),
            Durability::Flush,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        for chunk in sent.chunks(50) {
            outbox.append(chunk.to_vec()).await.unwrap();
        }
    }
    let store = SledStore::open(dir.path(), 1 << 20, None).unwrap();
    let outbox = Outbox::open(
        Arc::new(store),
        limits(),
        Durability::Flush,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let found: Vec<Message> = all_pending(&outbox).into_values().collect();
    assert_eq!(found, sent);
}

/// The outbox over `engine` in `dir`, as the sidecar opens it.
fn open_engine(engine: Engine, dir: &Path) -> Arc<Outbox> {
    let store = open_store(engine, dir, SegmentOptions::default(), 1 << 20, None).unwrap();
    Outbox::open(store, limits(), Durability::Flush, Arc::new(Metrics::new())).unwrap()
}

#[tokio::test]
async fn fjall_outbox_keeps_pending_and_dead_entries_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let sent: Vec<Message> = (0..400).map(|i| msg(i, &mut rng)).collect();
    let open_fjall = || open_engine(Engine::Fjall, dir.path());
    let (seqs, removed) = {
        let outbox = open_fjall();
        let mut seqs = Vec::new();
        for chunk in sent.chunks(40) {
            seqs.extend(outbox.append(chunk.to_vec()).await.unwrap());
        }
        // Confirmed ones go, one is dead-lettered.
        let first: Vec<_> = outbox.read_pending(0, 10).unwrap();
        outbox
            .remove(
                &first[..5]
                    .iter()
                    .map(|e| (e.seq, e.size))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        outbox.dead_letter(&first[5], "refused", 3).await.unwrap();
        outbox.sync().await.unwrap();
        (seqs, 6)
    };
    assert!(dir.path().join("fjall").is_dir());
    let outbox = open_fjall();
    let found = all_pending(&outbox);
    assert_eq!(found.keys().copied().collect::<Vec<_>>(), seqs[removed..]);
    assert_eq!(found.into_values().collect::<Vec<_>>(), sent[removed..]);
    assert_eq!(outbox.stats().pending, 400 - removed as u64);
    assert_eq!(outbox.stats().dead, 1);
    assert_eq!(outbox.dead(0, 10).unwrap()[0].0, seqs[5]);
    let next = outbox.append(vec![msg(1000, &mut rng)]).await.unwrap()[0];
    assert!(next > *seqs.last().unwrap());
}

#[tokio::test]
async fn a_sled_outbox_is_moved_into_the_segment_log_on_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(6);
    let sent: Vec<Message> = (0..300).map(|i| msg(i, &mut rng)).collect();
    let (seqs, dead_seq) = {
        let store = SledStore::open(dir.path(), 1 << 20, None).unwrap();
        let outbox = Outbox::open(
            Arc::new(store),
            limits(),
            Durability::Flush,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let mut seqs = Vec::new();
        for chunk in sent.chunks(50) {
            seqs.extend(outbox.append(chunk.to_vec()).await.unwrap());
        }
        let first = outbox.read_one(seqs[0]).unwrap().unwrap();
        outbox.dead_letter(&first, "refused", 2).await.unwrap();
        let first_seq = seqs[0];
        (seqs, first_seq)
    };
    let open_segment = || open_engine(Engine::Segment, dir.path());
    let outbox = open_segment();
    let found = all_pending(&outbox);
    assert_eq!(found.keys().copied().collect::<Vec<_>>(), seqs[1..]);
    assert_eq!(found.into_values().collect::<Vec<_>>(), sent[1..]);
    assert_eq!(outbox.dead(0, 10).unwrap()[0].0, dead_seq);
    assert!(!dir.path().join("db").exists(), "sled's files are gone");
    let next = outbox.append(vec![msg(1000, &mut rng)]).await.unwrap()[0];
    assert!(next > *seqs.last().unwrap());
    drop(outbox);
    // And it stays moved.
    let outbox = open_segment();
    assert_eq!(outbox.stats().pending, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_the_reason_is_unready_and_recovers_without_restart() {
    let fs = FaultFs::new(Faults::default());
    let store = Arc::new(SegmentStore::open_with_fs(&dir(), opts(), fs.clone()).unwrap());
    let data = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: the broker stays unreachable, which must
    // not matter to readiness.
    let cfg = warren_sidecar::config::Config::for_local("amqp://127.0.0.1:1", data.path().into());
    let running = warren_sidecar::start_with(cfg, Some(store)).await.unwrap();
    let api = format!("http://{}", running.api_addr);
    let admin = format!("http://{}", running.admin_addr);
    let http = reqwest::Client::new();
    let publish = |body: &'static str| {
        let http = http.clone();
        let url = format!("{api}/v1/publish/orders/k");
        async move { http.post(url).body(body).send().await.unwrap() }
    };
    let ready = || {
        let http = http.clone();
        let url = format!("{admin}/readyz");
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(publish("before").await.status(), 202);
    assert_eq!(ready().await, 200);

    fs.full.store(true, Ordering::SeqCst);
    let r = publish("while full").await;
    assert_eq!(r.status(), 500);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "outbox_failed");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("No space left on device")
            || body.to_string().contains("No space left on device"),
        "{body}"
    );
    assert_eq!(ready().await, 503);
    // Still refused a while later: the log does not trust a half-done write.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(publish("still full").await.status(), 500);
    assert_eq!(ready().await, 503);

    // Space returns: ready again by itself, and publishes are accepted.
    fs.full.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ready().await != 200 {
        assert!(Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(publish("after").await.status(), 202);
    let ids: Vec<String> = all_pending(&running.outbox)
        .into_values()
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect();
    assert_eq!(ids.first().map(String::as_str), Some("before"));
    assert_eq!(ids.last().map(String::as_str), Some("after"));
    running.shutdown();
    let _ = running.wait().await;
}

#[test]
fn store_trait_is_object_safe_over_both_engines() {
    fn takes(_: &dyn Store) {}
    let fs = FaultFs::new(Faults::default());
    let s = SegmentStore::open_with_fs(&dir(), opts(), fs).unwrap();
    takes(&s);
    s.apply(vec![Op::Put {
        area: Area::Pending,
        key: 1,
        value: vec![1],
    }])
    .unwrap();
    assert_eq!(s.get(Area::Pending, 1).unwrap(), Some(vec![1]));
}
