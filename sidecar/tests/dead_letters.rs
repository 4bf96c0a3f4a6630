//! The local dead-letter area: replaying one message or many, concurrently,
//! moves each dead-lettered message back exactly once, keeps the counters
//! exact and delivers every replayed message once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
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
    dead_letters(api)
        .await
        .into_iter()
        .map(|e| (e["id"].as_str().unwrap().to_owned(), e))
        .collect()
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

    // Bulk replays racing single retries of the same messages.
    let second = ids("raced", 20);
    publish_to(&api, "missing-b", KEY, &second, &account).await;
    wait_dead(&api, second.len() as u64).await;
    make_routable(&node, "missing-b").await;
    let seqs: Vec<u64> = dead_by_id(&api)
        .await
        .values()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    let mut singles = Vec::new();
    let mut bulks = Vec::new();
    for round in 0..4 {
        if round % 2 == 0 {
            bulks.push(tokio::spawn(post_json(
                format!("{api}/v1/outbox/dead/retry"),
                json!({"exchange": "missing-b"}),
            )));
        }
        for &seq in &seqs {
            let url = format!("{api}/v1/outbox/dead/{seq}/retry");
            singles.push(tokio::spawn(async move {
                let resp = client().post(url).send().await.unwrap();
                (seq, resp.status())
            }));
        }
        if round % 2 == 1 {
            bulks.push(tokio::spawn(post_json(
                format!("{api}/v1/outbox/dead/retry"),
                json!({"all": true}),
            )));
        }
    }
    let mut moved: Vec<u64> = Vec::new();
    for call in singles {
        let (seq, status) = call.await.unwrap();
        match status {
            StatusCode::ACCEPTED => moved.push(seq),
            StatusCode::NOT_FOUND => {}
            other => panic!("retry of {seq} answered {other}"),
        }
    }
    for call in bulks {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let listed = body["messages"].as_array().unwrap();
        assert_eq!(body["requeued"], listed.len(), "{body}");
        moved.extend(listed.iter().map(|m| m["seq"].as_u64().unwrap()));
    }
    moved.sort_unstable();
    assert_eq!(moved, seqs, "every dead letter is requeued exactly once");
    wait_drained(&api, Duration::from_secs(20)).await;
    assert_counters(&api, &admin, 0).await;

    assert_delivered_once(&node, &account).await;
    running.shutdown();
    running.wait().await.unwrap();
}

async fn post_json(url: String, body: Value) -> (StatusCode, Value) {
    let resp = client().post(url).json(&body).send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_replay_by_exchange_reason_and_age_then_all() {
    init_tracing();
    let node = start_node().await;
    declare_topology(&node).await;
    let dir = tempfile::tempdir().unwrap();
    let (running, api, admin) = start_sidecar(&node, dir.path()).await;
    let account = Account::new();
    let replay = |filter: Value| post_json(format!("{api}/v1/outbox/dead/retry"), filter);

    let to_a = ids("to-a", 4);
    let to_b = ids("to-b", 3);
    let unroutable = ids("unroutable", 2);
    publish_to(&api, "missing-a", KEY, &to_a, &account).await;
    publish_to(&api, "missing-b", KEY, &to_b, &account).await;
    publish_to(&api, EXCHANGE, "unbound-key", &unroutable, &account).await;
    wait_dead(&api, 9).await;
    assert_counters(&api, &admin, 9).await;
    let dead = dead_by_id(&api).await;
    let seqs_of = |prefix: &str| -> BTreeSet<u64> {
        dead.iter()
            .filter(|(id, _)| id.starts_with(prefix))
            .map(|(_, e)| e["seq"].as_u64().unwrap())
            .collect()
    };

    // Nothing matches: nothing moves.
    for filter in [
        json!({"exchange": "no-such"}),
        json!({"older_than": "1h"}),
        json!({"dead_before_ms": 1}),
        json!({"exchange": "missing-a", "reason_contains": "NO_ROUTE"}),
    ] {
        let (status, body) = replay(filter.clone()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{filter}: {body}");
        assert_eq!(body["requeued"], 0, "{filter}: {body}");
    }
    assert_counters(&api, &admin, 9).await;

    // By exchange: only the messages to missing-a move, and are delivered.
    make_routable(&node, "missing-a").await;
    let (status, body) = replay(json!({"exchange": "missing-a", "older_than": "0s"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["requeued"], 4, "{body}");
    assert_eq!(body["truncated"], false, "{body}");
    let moved: BTreeSet<u64> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(moved, seqs_of("to-a"), "{body}");
    wait_drained(&api, Duration::from_secs(20)).await;
    assert_counters(&api, &admin, 5).await;
    let left: BTreeSet<String> = dead_by_id(&api).await.into_keys().collect();
    let expected: BTreeSet<String> = to_b.iter().chain(&unroutable).cloned().collect();
    assert_eq!(left, expected);
    wait_until(
        Duration::from_secs(10),
        "the messages to missing-a to arrive",
        || async { node.queue_message_count(QUEUE).await.unwrap_or(0) == 4 },
    )
    .await;

    // By reason: the unroutable ones, once their key is bound.
    node.bind(EXCHANGE, QUEUE, "unbound-key").await.unwrap();
    let (status, body) = replay(json!({
        "reason_contains": "NO_ROUTE",
        "dead_before_ms": warren_sidecar::outbox::now_ms() + 1,
    }))
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["requeued"], 2, "{body}");
    wait_drained(&api, Duration::from_secs(20)).await;
    assert_counters(&api, &admin, 3).await;

    // All: the rest.
    make_routable(&node, "missing-b").await;
    let (status, body) = replay(json!({"all": true})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["requeued"], 3, "{body}");
    let moved: BTreeSet<u64> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(moved, seqs_of("to-b"), "{body}");
    wait_drained(&api, Duration::from_secs(20)).await;
    assert_counters(&api, &admin, 0).await;
    let (status, body) = replay(json!({"all": true})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["requeued"], 0, "{body}");

    assert_delivered_once(&node, &account).await;
    running.shutdown();
    running.wait().await.unwrap();
}

/// A bulk replay without a filter, or with a bad one, is refused with a
/// JSON 400 and moves nothing. No broker is needed: the messages are
/// dead-lettered through the outbox directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_replay_refuses_missing_and_bad_filters() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        warren_testkit::free_port()
    );
    let mut cfg = test_config(&url, dir.path());
    cfg.drain_timeout = Duration::from_millis(500);
    let running = warren_sidecar::start(cfg).await.unwrap();
    let api = format!("http://{}", running.api_addr);
    let http = client();
    for id in ["one", "two"] {
        assert!(
            publish(&http, &api, EXCHANGE, KEY, id, b"x".to_vec())
                .await
                .unwrap()
        );
    }
    for entry in running.outbox.read_pending(0, 10).unwrap() {
        running
            .outbox
            .dead_letter(&entry, "refused by the test", 1)
            .await
            .unwrap();
    }
    assert_eq!(running.outbox.stats().dead, 2);

    let url = format!("{api}/v1/outbox/dead/retry");
    let raw_bodies: [(&str, &str); 4] = [
        ("", "filter is required"),
        ("  \n", "filter is required"),
        ("not json", "malformed filter"),
        ("[]", "malformed filter"),
    ];
    let json_bodies: Vec<(Value, &str)> = vec![
        (json!({}), "filter is required"),
        (json!({"all": false}), "filter is required"),
        (json!(null), "malformed filter"),
        (json!({"all": "yes"}), "malformed filter"),
        (
            json!({"all": true, "exchange": "orders"}),
            "cannot be combined",
        ),
        (json!({"exchnage": "orders"}), "unknown field"),
        (json!({"exchange": ""}), "must not be empty"),
        (json!({"exchange": 7}), "malformed filter"),
        (json!({"reason_contains": ""}), "must not be empty"),
        (json!({"older_than": "soon"}), "older_than"),
        (json!({"older_than": 5}), "malformed filter"),
        (json!({"dead_before_ms": "yesterday"}), "malformed filter"),
        (json!({"dead_before_ms": -1}), "malformed filter"),
    ];
    let mut requests: Vec<(String, reqwest::RequestBuilder, &str)> = raw_bodies
        .iter()
        .map(|(body, want)| {
            (
                format!("{body:?}"),
                http.post(&url).body(body.to_string()),
                *want,
            )
        })
        .collect();
    requests.extend(
        json_bodies
            .iter()
            .map(|(body, want)| (body.to_string(), http.post(&url).json(body), *want)),
    );
    for (what, req, want) in requests {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(resp.headers()["content-type"], "application/json", "{what}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request", "{what}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(want), "{what}: {message:?} lacks {want:?}");
        assert_eq!(running.outbox.stats().dead, 2, "{what} moved something");
    }
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);

    // The default exchange goes by its alias; a good filter moves them.
    let (status, body) = post_json(url.clone(), json!({"exchange": "amq.default"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["requeued"], 0, "{body}");
    let (status, body) = post_json(url.clone(), json!({"reason_contains": "by the test"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["requeued"], 2, "{body}");
    let stats = running.outbox.stats();
    assert_eq!((stats.dead, stats.dead_bytes, stats.pending), (0, 0, 2));
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

    // Bulk replays racing single requeues of the same entries.
    let pending = outbox.read_pending(0, 100).unwrap();
    for entry in &pending {
        outbox.dead_letter(entry, "refused", 3).await.unwrap();
    }
    let seqs: Vec<u64> = pending.iter().map(|e| e.seq).collect();
    let start = Arc::new(tokio::sync::Barrier::new(2 + 2 * seqs.len()));
    let bulks: Vec<_> = (0..2)
        .map(|_| {
            let (outbox, start) = (outbox.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                outbox.requeue_dead_matching(|_, _| true).await.unwrap()
            })
        })
        .collect();
    let singles: Vec<_> = seqs
        .iter()
        .chain(&seqs)
        .map(|&seq| {
            let (outbox, start) = (outbox.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                (seq, outbox.requeue_dead(seq).await.unwrap())
            })
        })
        .collect();
    let mut moved: Vec<u64> = Vec::new();
    for call in bulks {
        moved.extend(call.await.unwrap().into_iter().map(|(seq, _)| seq));
    }
    for call in singles {
        if let (seq, Some(_)) = call.await.unwrap() {
            moved.push(seq);
        }
    }
    moved.sort_unstable();
    assert_eq!(moved, seqs, "each dead entry moves exactly once");
    let stats = outbox.stats();
    assert_eq!((stats.dead, stats.dead_bytes, stats.pending), (0, 0, 4));
    assert_eq!(outbox.read_pending(0, 100).unwrap().len(), 4);
}
