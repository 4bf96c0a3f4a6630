//! The outbox under a fault-injecting store, checked against a model of the
//! store's durability contract: nothing answered as stored is lost after a
//! crash and reopen, a failed flush is never answered as stored, and the
//! outbox refuses writes after a storage failure.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use warren_sidecar::metrics::Metrics;
use warren_sidecar::outbox::{
    Area, Durability, Limits, Message, Op, Outbox, OutboxError, SledStore, Store, StoreError,
};

/// An in-memory store that keeps what a crash would keep: `live` is what
/// reads see, `durable` what survives [`ModelStore::crash`]. It can fail the
/// n-th apply or the n-th flush; a failed flush persists a random subset of
/// the unflushed changes, as a torn fsync might.
#[derive(Default)]
struct ModelStore {
    state: Mutex<ModelState>,
    applies: AtomicUsize,
    flushes: AtomicUsize,
    fail_apply_at: Option<usize>,
    fail_flush_at: Option<usize>,
    flush_delay: Duration,
}

#[derive(Default)]
struct ModelState {
    live: BTreeMap<(Area, u64), Vec<u8>>,
    durable: BTreeMap<(Area, u64), Vec<u8>>,
    /// Ops applied since the last flush, in order.
    unflushed: Vec<Op>,
    rng_seed: u64,
}

fn apply_op(map: &mut BTreeMap<(Area, u64), Vec<u8>>, op: &Op) {
    match op {
        Op::Put { area, key, value } => {
            map.insert((*area, *key), value.clone());
        }
        Op::Delete { area, key } => {
            map.remove(&(*area, *key));
        }
    }
}

impl ModelStore {
    fn crash(&self) {
        let mut s = self.state.lock().unwrap();
        s.live = s.durable.clone();
        s.unflushed.clear();
    }
}

impl Store for ModelStore {
    fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let n = self.applies.fetch_add(1, Ordering::SeqCst);
        if self.fail_apply_at == Some(n) {
            return Err(StoreError("injected write failure".into()));
        }
        let mut s = self.state.lock().unwrap();
        for op in &ops {
            apply_op(&mut s.live, op);
        }
        s.unflushed.extend(ops);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        if !self.flush_delay.is_zero() {
            std::thread::sleep(self.flush_delay);
        }
        let n = self.flushes.fetch_add(1, Ordering::SeqCst);
        let mut s = self.state.lock().unwrap();
        let ops = std::mem::take(&mut s.unflushed);
        if self.fail_flush_at == Some(n) {
            // A torn flush: some prefix of the changes made it to disk.
            let mut rng = StdRng::seed_from_u64(s.rng_seed);
            let keep = rng.random_range(0..=ops.len());
            for op in &ops[..keep] {
                apply_op(&mut s.durable, op);
            }
            return Err(StoreError("injected fsync failure".into()));
        }
        for op in &ops {
            apply_op(&mut s.durable, op);
        }
        Ok(())
    }

    fn scan(&self, area: Area, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let s = self.state.lock().unwrap();
        Ok(s.live
            .range((area, from)..=(area, u64::MAX))
            .take(limit)
            .map(|((_, k), v)| (*k, v.clone()))
            .collect())
    }

    fn get(&self, area: Area, key: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state.lock().unwrap().live.get(&(area, key)).cloned())
    }
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

/// Runs concurrent writers against a store that fails at a chosen point,
/// then crashes and reopens, and checks the contract.
async fn run_case(seed: u64, fail_apply_at: Option<usize>, fail_flush_at: Option<usize>) {
    let store = Arc::new(ModelStore {
        fail_apply_at,
        fail_flush_at,
        state: Mutex::new(ModelState {
            rng_seed: seed,
            ..Default::default()
        }),
        ..Default::default()
    });
    let outbox = Outbox::open(
        store.clone(),
        limits(),
        Durability::Flush,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let acked: Arc<Mutex<HashMap<u64, Message>>> = Default::default();
    let attempted: Arc<Mutex<HashMap<String, Message>>> = Default::default();
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let outbox = outbox.clone();
        let acked = acked.clone();
        let attempted = attempted.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed * 1000 + w);
            let mut poisoned_seen = false;
            for round in 0..25u64 {
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
                        assert!(
                            !poisoned_seen,
                            "a write was accepted after the outbox reported poison"
                        );
                        assert_eq!(seqs.len(), batch.len());
                        let mut a = acked.lock().unwrap();
                        for (s, m) in seqs.into_iter().zip(batch) {
                            a.insert(s, m);
                        }
                    }
                    Err(OutboxError::Poisoned(_)) => poisoned_seen = true,
                    Err(OutboxError::Store(_)) => {}
                    Err(e) => panic!("unexpected error {e}"),
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let injected = fail_apply_at.is_some_and(|n| store.applies.load(Ordering::SeqCst) > n)
        || fail_flush_at.is_some_and(|n| store.flushes.load(Ordering::SeqCst) > n);
    assert_eq!(
        outbox.poisoned().is_some(),
        injected,
        "seed {seed}: poison state"
    );
    if injected {
        let err = outbox
            .append(vec![msg(9, &mut StdRng::seed_from_u64(1))])
            .await
            .unwrap_err();
        assert!(
            matches!(err, OutboxError::Poisoned(_)),
            "seed {seed}: {err}"
        );
    }
    drop(outbox);

    store.crash();
    let healthy = Arc::new(ModelStore {
        state: Mutex::new(std::mem::take(&mut *store.state.lock().unwrap())),
        ..Default::default()
    });
    let reopened = Outbox::open(
        healthy,
        limits(),
        Durability::Flush,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let found = all_pending(&reopened);
    let acked = acked.lock().unwrap().clone();
    for (seq, m) in acked.iter() {
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
            "seed {seed}: outbox holds a message nobody sent"
        );
    }
    let stats = reopened.stats();
    assert_eq!(stats.pending as usize, found.len());
    // New writes after reopen get fresh sequence numbers.
    let next = reopened
        .append(vec![msg(1, &mut StdRng::seed_from_u64(2))])
        .await
        .unwrap()[0];
    assert!(found.keys().all(|s| *s < next));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_fault_keeps_everything() {
    run_case(1, None, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_writes_are_never_acknowledged_and_nothing_acknowledged_is_lost() {
    for seed in 0..40u64 {
        run_case(seed, Some((seed as usize * 7) % 150), None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_flushes_are_never_acknowledged_and_nothing_acknowledged_is_lost() {
    for seed in 0..40u64 {
        run_case(seed, None, Some((seed as usize * 3) % 60)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_flushes() {
    let store = Arc::new(ModelStore {
        flush_delay: Duration::from_millis(3),
        ..Default::default()
    });
    let outbox = Outbox::open(
        store.clone(),
        limits(),
        Durability::Flush,
        Arc::new(Metrics::new()),
    )
    .unwrap();
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
    let flushes = store.flushes.load(Ordering::SeqCst);
    assert!(
        flushes * 4 < 640,
        "640 appends needed {flushes} flushes: no group commit"
    );
    assert_eq!(outbox.stats().pending, 640);
}

#[tokio::test]
async fn buffered_mode_answers_before_flushing() {
    let store = Arc::new(ModelStore::default());
    let outbox = Outbox::open(
        store.clone(),
        limits(),
        Durability::Buffered,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    outbox
        .append(vec![msg(1, &mut StdRng::seed_from_u64(1))])
        .await
        .unwrap();
    assert_eq!(store.flushes.load(Ordering::SeqCst), 0);
    outbox.sync().await.unwrap();
    assert_eq!(store.flushes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn limits_refuse_and_recover() {
    let store = Arc::new(ModelStore::default());
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
    // A refused batch stores nothing.
    assert_eq!(outbox.stats().pending, 5);
    let entries = outbox.read_pending(0, 10).unwrap();
    outbox.remove(&[(seqs[0], entries[0].size)]).unwrap();
    outbox.append(vec![msg(6, &mut rng)]).await.unwrap();
    assert_eq!(outbox.stats().pending, 5);

    let small = Limits {
        max_messages: 100,
        max_bytes: 200,
    };
    let outbox = Outbox::open(
        Arc::new(ModelStore::default()),
        small,
        Durability::Flush,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let big = Message {
        body: Bytes::from(vec![0u8; 500]),
        ..msg(1, &mut rng)
    };
    let err = outbox.append(vec![big]).await.unwrap_err();
    assert!(
        matches!(err, OutboxError::Full { what: "byte", .. }),
        "{err}"
    );
}

#[tokio::test]
async fn dead_letters_are_kept_counted_and_can_be_requeued() {
    let store = Arc::new(ModelStore::default());
    let outbox = Outbox::open(
        store.clone(),
        limits(),
        Durability::Flush,
        Arc::new(Metrics::new()),
    )
    .unwrap();
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
    // Durable: survives a crash.
    store.crash();
    let outbox = Outbox::open(
        store.clone(),
        limits(),
        Durability::Flush,
        Arc::new(Metrics::new()),
    )
    .unwrap();
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
