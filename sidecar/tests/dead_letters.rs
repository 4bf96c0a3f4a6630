//! The local dead-letter area: retrying a dead-lettered message, many times
//! at once, moves it back exactly once, keeps the counters exact and
//! delivers it once.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::Value;
use warren_sidecar::metrics::Metrics;
use warren_sidecar::outbox::{
    Area, Durability, Limits, Message, Op, Outbox, SegmentStore, Store, StoreError,
};
use warren_testkit::{Account, RabbitNode, init_tracing};

/// Publishes one message per id to `exchange` and records it as acked.
async fn publish_to(api: &str, exchange: &str, key: &str, ids: &[String], account: &Account) {
    let http = client();
    for id in ids {
        assert!(
            publish(&http, api, exchange, key, id, id.as_bytes().to_vec())
                .await
                .unwrap(),
            "{id} not accepted"
        );
        account.record_acked(id.clone());
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:02}")).collect()
}

/// The dead-letter area as `id -> entry`.
async fn dead_by_id(api: &str) -> BTreeMap<String, Value> {
    let dead: Value = client()
        .get(format!("{api}/v1/outbox/dead?limit=1000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    dead["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["id"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

async fn metrics_text(admin: &str) -> String {
    client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Asserts the outbox report and the gauges agree on `dead` dead-lettered
/// messages and an empty pending queue.
async fn assert_counters(api: &str, admin: &str, dead: u64) {
    let r = outbox_report(api).await;
    assert_eq!(r["dead_lettered"], dead, "{r}");
    assert_eq!(r["pending"], 0, "{r}");
    assert_eq!(r["pending_bytes"], 0, "{r}");
    if dead == 0 {
        assert_eq!(r["dead_lettered_bytes"], 0, "{r}");
    }
    let m = metrics_text(admin).await;
    for line in [
        format!("warren_sidecar_outbox_messages{{area=\"dead\"}} {dead}"),
        "warren_sidecar_outbox_messages{area=\"pending\"} 0".to_owned(),
        "warren_sidecar_outbox_bytes{area=\"pending\"} 0".to_owned(),
    ] {
        assert!(m.lines().any(|l| l == line), "metrics lack {line:?}:\n{m}");
    }
}

/// Waits until `dead` messages are dead-lettered and nothing is pending.
async fn wait_dead(api: &str, dead: u64) {
    wait_until(
        Duration::from_secs(30),
        "the refused messages to be dead-lettered",
        || async {
            let r = outbox_report(api).await;
            r["dead_lettered"] == dead && r["pending"] == 0
        },
    )
    .await;
}

/// Binds `exchange` (declared now) to the test queue with the test key.
async fn make_routable(node: &RabbitNode, exchange: &str) {
    node.declare_exchange(exchange, "direct").await.unwrap();
    node.bind(exchange, QUEUE, KEY).await.unwrap();
}

async fn start_sidecar(
    node: &RabbitNode,
    dir: &std::path::Path,
) -> (warren_sidecar::Running, String, String) {
    let mut cfg = test_config(&node.amqp_url(), dir);
    cfg.dead_letter_after = Duration::from_secs(1);
    let running = warren_sidecar::start(cfg).await.unwrap();
    let api = format!("http://{}", running.api_addr);
    let admin = format!("http://{}", running.admin_addr);
    (running, api, admin)
}

/// Consumes the test queue and asserts every acked id arrived exactly once.
async fn assert_delivered_once(node: &RabbitNode, account: &Account) {
    consume_all(&node.amqp_url(), QUEUE, account, Duration::from_secs(30)).await;
    let report = account.report();
    println!("dead letters: {report}");
    account.assert_no_loss();
    assert_eq!(
        report.duplicated, 0,
        "a replayed message arrived twice: {report}"
    );
    assert_eq!(report.unexpected, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_requeue_each_dead_letter_once() {
    init_tracing();
    let node = start_node().await;
    declare_topology(&node).await;
    let dir = tempfile::tempdir().unwrap();
    let (running, api, admin) = start_sidecar(&node, dir.path()).await;
    let account = Account::new();

    // Single retries racing single retries: many of the same seq at once.
    let first = ids("single", 6);
    publish_to(&api, "missing-a", KEY, &first, &account).await;
    wait_dead(&api, first.len() as u64).await;
    assert_counters(&api, &admin, first.len() as u64).await;
    make_routable(&node, "missing-a").await;

    let seqs: Vec<u64> = dead_by_id(&api)
        .await
        .values()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    let mut calls = Vec::new();
    for _ in 0..16 {
        for &seq in &seqs {
            let url = format!("{api}/v1/outbox/dead/{seq}/retry");
            calls.push(tokio::spawn(async move {
                let resp = client().post(url).send().await.unwrap();
                let status = resp.status();
                let body: Value = resp.json().await.unwrap();
                (seq, status, body)
            }));
        }
    }
    let mut accepted: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for call in calls {
        let (seq, status, body) = call.await.unwrap();
        match status {
            StatusCode::ACCEPTED => {
                assert_eq!(body["seq"], seq, "{body}");
                accepted
                    .entry(seq)
                    .or_default()
                    .push(body["new_seq"].as_u64().unwrap());
            }
            StatusCode::NOT_FOUND => assert_eq!(body["error"], "not_found", "{body}"),
            other => panic!("retry of {seq} answered {other}: {body}"),
        }
    }
    for &seq in &seqs {
        let got = accepted.get(&seq).map_or(0, Vec::len);
        assert_eq!(got, 1, "seq {seq} was requeued {got} times: {accepted:?}");
    }
    wait_drained(&api, Duration::from_secs(20)).await;
    assert_counters(&api, &admin, 0).await;
    wait_until(
        Duration::from_secs(10),
        "the replayed messages to reach the queue",
        || async { node.queue_message_count(QUEUE).await.unwrap_or(0) >= first.len() as u64 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        node.queue_message_count(QUEUE).await.unwrap(),
        first.len() as u64,
        "each replayed message is queued once"
    );

    assert_delivered_once(&node, &account).await;
    running.shutdown();
    running.wait().await.unwrap();
}

/// A store whose reads of the dead-letter area are slow, so that requeues
/// that read outside the outbox's lock overlap every time.
struct SlowDeadReads(SegmentStore);

impl Store for SlowDeadReads {
    fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        self.0.apply(ops)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.0.flush()
    }
    fn scan(&self, area: Area, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.0.scan(area, from, limit)
    }
    fn get(&self, area: Area, key: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if area == Area::Dead {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.0.get(area, key)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_requeues_a_dead_entry_once_under_concurrent_calls() {
    let dir = tempfile::tempdir().unwrap();
    let store = SlowDeadReads(SegmentStore::open(dir.path(), Default::default()).unwrap());
    let outbox = Outbox::open(
        Arc::new(store),
        Limits {
            max_messages: 100,
            max_bytes: 1 << 20,
        },
        Durability::Flush,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let messages = (0..4)
        .map(|i| Message {
            exchange: "orders".into(),
            routing_key: "created".into(),
            message_id: format!("m-{i}"),
            content_type: None,
            headers: Vec::new(),
            body: vec![b'x'; 10].into(),
            enqueued_at_ms: 0,
        })
        .collect();
    let seqs = outbox.append(messages).await.unwrap();
    for entry in outbox.read_pending(0, 10).unwrap() {
        outbox.dead_letter(&entry, "refused", 3).await.unwrap();
    }
    let full = outbox.stats();
    assert_eq!(full.dead, 4);

    // Four calls per entry, released together.
    let mut moved: BTreeMap<u64, u32> = BTreeMap::new();
    for &seq in &seqs {
        let start = Arc::new(tokio::sync::Barrier::new(4));
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let (outbox, start) = (outbox.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    outbox.requeue_dead(seq).await.unwrap()
                })
            })
            .collect();
        for call in calls {
            if call.await.unwrap().is_some() {
                *moved.entry(seq).or_default() += 1;
            }
        }
    }
    assert_eq!(
        moved,
        seqs.iter().map(|&s| (s, 1)).collect(),
        "each dead entry moves exactly once"
    );
    let stats = outbox.stats();
    assert_eq!((stats.dead, stats.dead_bytes, stats.pending), (0, 0, 4));
    assert_eq!(outbox.read_pending(0, 100).unwrap().len(), 4);
}
