//! The consuming side against real private brokers and a small HTTP app:
//! retries with backoff through the delay tiers, the parking lot,
//! non-retryable answers, a hung app, a missing queue, and consumption that
//! resumes by itself after the broker is killed or stopped.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren_crds::duration::HumanDuration;
use warren_crds::reliable_queue::{
    BindingSpec, BrokerRef, DeletionPolicy, ExchangeKind, ExchangeSpec, ParkingLotSpec, QueueSpec,
    ReliableQueueSpec,
};
use warren_crds::retry::RetryPolicySpec;
use warren_crds::sidecar_config::{AppEndpoint, ConsumeQueue, SidecarConfig};
use warren_operator::apply::Broker;
use warren_operator::plan::{Topology, plan};
use warren_sidecar::Running;
use warren_sidecar::consumer::state::SubscriptionState;
use warren_testkit::{Account, RabbitNode, Reply, TestApp, init_tracing};

fn policy(max_retries: u32, initial_ms: u64, multiplier: f64, max_ms: u64) -> RetryPolicySpec {
    let mut p = RetryPolicySpec {
        max_retries,
        ..Default::default()
    };
    p.backoff.initial = HumanDuration::from_millis(initial_ms);
    p.backoff.multiplier = multiplier;
    p.backoff.max = HumanDuration::from_millis(max_ms);
    p.backoff.jitter = 0.0;
    p
}

/// Declares the `orders` ReliableQueue with warren-operator's planner and
/// applier, as `warren-operator apply` would.
async fn declare(node: &RabbitNode, policy: &RetryPolicySpec) -> Topology {
    let spec = ReliableQueueSpec {
        broker: BrokerRef {
            secret_name: "unused".into(),
            vhost: "/".into(),
            management_url: None,
        },
        exchange: ExchangeSpec {
            name: EXCHANGE.into(),
            kind: ExchangeKind::Direct,
        },
        queue: QueueSpec {
            bindings: vec![BindingSpec {
                routing_key: KEY.into(),
            }],
            ..Default::default()
        },
        retry_policy_ref: None,
        parking_lot: ParkingLotSpec::default(),
        deletion_policy: DeletionPolicy::Retain,
    };
    let topology = plan(QUEUE, &spec, policy).expect("plan");
    let broker = Broker::new(&node.management_url(), "guest", "guest").unwrap();
    let report = broker.apply(&topology).await.expect("apply topology");
    assert!(report.conflicts.is_empty(), "{:?}", report.conflicts);
    topology
}

fn consumer_config(app: &TestApp, policy: &RetryPolicySpec, timeout: Duration) -> SidecarConfig {
    SidecarConfig {
        app: Some(AppEndpoint {
            url: app.url.clone(),
            timeout: HumanDuration(timeout),
            concurrency: 8,
        }),
        queues: vec![ConsumeQueue {
            name: QUEUE.into(),
            prefetch: 16,
            parking_lot: None,
            url: None,
            retry_policy: policy.clone(),
        }],
        ..Default::default()
    }
}

struct Fixture {
    node: RabbitNode,
    topo: Topology,
    sidecar: Running,
    api: String,
    _dir: tempfile::TempDir,
}

/// A private node with the queue's topology, and a sidecar that publishes
/// to it and consumes `orders` for `app`.
async fn setup(policy: &RetryPolicySpec, app: &TestApp, timeout: Duration) -> Fixture {
    init_tracing();
    let node = start_node().await;
    let topo = declare(&node, policy).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&node.amqp_url(), dir.path());
    cfg.consumer = Some(consumer_config(app, policy, timeout));
    let sidecar = warren_sidecar::start(cfg).await.unwrap();
    let api = format!("http://{}", sidecar.api_addr);
    Fixture {
        node,
        topo,
        sidecar,
        api,
        _dir: dir,
    }
}

async fn publish_all(api: &str, ids: &[String]) {
    let http = client();
    for id in ids {
        assert!(
            publish(
                &http,
                api,
                EXCHANGE,
                KEY,
                id,
                format!("body of {id}").into_bytes()
            )
            .await
            .unwrap(),
            "publish of {id} refused"
        );
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Takes every message out of `queue`.
async fn get_all(url: &str, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        out.push((m.delivery.properties.clone(), m.delivery.data.clone()));
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

fn header(props: &BasicProperties, name: &str) -> Option<AMQPValue> {
    props.headers().as_ref()?.inner().get(name).cloned()
}

fn header_str(props: &BasicProperties, name: &str) -> String {
    match header(props, name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {name} is {other:?}"),
    }
}

/// Asserts that the work queue and every delay queue are empty.
async fn assert_nothing_left(f: &Fixture) {
    for q in std::iter::once(QUEUE).chain(f.topo.tier_queues()) {
        assert_eq!(
            f.node.queue_message_count(q).await.unwrap(),
            0,
            "{q} still holds messages"
        );
    }
    wait_until(Duration::from_secs(5), "no delivery in flight", || async {
        f.sidecar.consumer.snapshot().in_flight == 0
    })
    .await;
}

async fn metrics(f: &Fixture) -> String {
    metrics_text(&format!("http://{}", f.sidecar.admin_addr)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_deliveries_are_retried_with_backoff_until_they_succeed() {
    // Each message fails twice (503, then 429), then succeeds.
    let app = TestApp::start(|_, before| match before {
        0 => Reply::Status(503),
        1 => Reply::Status(429),
        _ => Reply::Status(200),
    })
    .await;
    let policy = policy(4, 500, 2.0, 4000);
    let f = setup(&policy, &app, Duration::from_secs(5)).await;
    let messages = ids("retry", 40);
    publish_all(&f.api, &messages).await;

    wait_until(
        Duration::from_secs(60),
        "every message to succeed",
        || async { app.successes().len() == messages.len() },
    )
    .await;
    // Nothing further may arrive once all succeeded.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let successes = app.successes();
    for id in &messages {
        assert_eq!(
            successes.get(id),
            Some(&1),
            "{id} succeeded more than once or never"
        );
        let attempts = app.attempts(id);
        let retries: Vec<u32> = attempts.iter().map(|s| s.retries).collect();
        assert_eq!(retries, vec![0, 1, 2], "{id}: x-retries must count up");
        // The policy's delays: 500 ms before the first retry, 1 s before
        // the second; the broker releases a tier's messages at its TTL.
        for (n, want) in [(1, 500u64), (2, 1000)] {
            let gap = attempts[n].at - attempts[n - 1].at;
            let want = Duration::from_millis(want);
            assert!(
                gap >= want - Duration::from_millis(50)
                    && gap <= want + Duration::from_millis(2500),
                "{id}: retry {n} came after {gap:?}, policy says {want:?}"
            );
        }
        let last_error = attempts[2]
            .headers
            .get("x-warren-header-x-warren-last-error")
            .expect("retries carry the last error")
            .to_str()
            .unwrap();
        let last_error: serde_json::Value = serde_json::from_str(last_error).unwrap();
        assert_eq!(last_error["status"], 429);
        assert_eq!(last_error["attempt"], 1);
        assert_eq!(attempts[0].body, format!("body of {id}").as_bytes());
        assert_eq!(
            attempts[2].body, attempts[0].body,
            "a retry carries the same body"
        );
        assert_eq!(
            attempts[2].headers["x-warren-queue"], QUEUE,
            "deliveries name their queue"
        );
    }
    assert_nothing_left(&f).await;
    assert_eq!(
        f.node
            .queue_message_count(&warren_crds::names::parking_lot(QUEUE))
            .await
            .unwrap(),
        0
    );
    let m = metrics(&f).await;
    for line in [
        "warren_sidecar_delivery_retries_total{queue=\"orders\",attempt=\"1\"} 40",
        "warren_sidecar_delivery_retries_total{queue=\"orders\",attempt=\"2\"} 40",
        "warren_sidecar_delivery_outcomes_total{queue=\"orders\",outcome=\"acked\"} 40",
        "warren_sidecar_deliveries_total{queue=\"orders\"} 120",
        "warren_sidecar_app_latency_seconds_count{queue=\"orders\"} 120",
    ] {
        assert!(m.contains(line), "metrics lack {line}:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn always_failing_messages_are_parked_with_their_history() {
    let app = TestApp::start(|_, _| Reply::Status(500)).await;
    // One tier used again and again: the copy's history must not look like
    // a dead-letter cycle to the broker.
    let policy = policy(3, 300, 1.0, 300);
    let f = setup(&policy, &app, Duration::from_secs(5)).await;
    let messages = ids("doomed", 20);
    publish_all(&f.api, &messages).await;
    let parked_queue = warren_crds::names::parking_lot(QUEUE);
    wait_until(
        Duration::from_secs(60),
        "every message to be parked",
        || async {
            f.node.queue_message_count(&parked_queue).await.unwrap() == messages.len() as u64
        },
    )
    .await;
    assert_nothing_left(&f).await;

    let parked = get_all(&f.node.amqp_url(), &parked_queue).await;
    let mut by_id: HashMap<String, (BasicProperties, Vec<u8>)> = HashMap::new();
    for (props, body) in parked {
        let id = props.message_id().as_ref().unwrap().to_string();
        assert!(by_id.insert(id, (props, body)).is_none(), "parked twice");
    }
    for id in &messages {
        let (props, body) = by_id.get(id).unwrap_or_else(|| panic!("{id} lost"));
        assert_eq!(body, format!("body of {id}").as_bytes());
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(header(props, "x-retries"), Some(AMQPValue::LongLongInt(3)));
        assert_eq!(
            header_str(props, "x-warren-parked-reason"),
            "retries-exhausted"
        );
        assert_eq!(header_str(props, "x-warren-parked-from"), QUEUE);
        assert_eq!(header_str(props, "x-warren-original-exchange"), EXCHANGE);
        assert_eq!(header_str(props, "x-warren-original-routing-key"), KEY);
        assert!(
            header(props, "x-death").is_none(),
            "x-death must be dropped"
        );
        let Some(AMQPValue::FieldArray(history)) = header(props, "x-warren-history") else {
            panic!("{id}: no history")
        };
        let attempts: Vec<u64> = history
            .as_slice()
            .iter()
            .map(|v| match v {
                AMQPValue::LongString(s) => {
                    let j: serde_json::Value = serde_json::from_slice(s.as_bytes()).unwrap();
                    assert_eq!(j["status"], 500);
                    j["attempt"].as_u64().unwrap()
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(attempts, vec![0, 1, 2, 3], "{id}: one entry per failure");
        assert_eq!(
            app.attempts(id).len(),
            4,
            "{id}: first delivery + 3 retries"
        );
    }
    let m = metrics(&f).await;
    let line = "warren_sidecar_parked_total{queue=\"orders\",reason=\"retries_exhausted\"} 20";
    assert!(m.contains(line), "metrics lack {line}:\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_retryable_answers_park_at_once_and_retryable_ones_retry() {
    let app = TestApp::start(|seen, before| {
        if seen.id.starts_with("bad") {
            Reply::Status(422)
        } else if seen.id.starts_with("busy") && before == 0 {
            Reply::Status(429)
        } else {
            Reply::Status(204)
        }
    })
    .await;
    let policy = policy(5, 200, 2.0, 2000);
    let f = setup(&policy, &app, Duration::from_secs(5)).await;
    let bad = ids("bad", 10);
    let busy = ids("busy", 10);
    publish_all(&f.api, &bad).await;
    publish_all(&f.api, &busy).await;
    let parked_queue = warren_crds::names::parking_lot(QUEUE);
    wait_until(
        Duration::from_secs(30),
        "bad messages parked, busy ones done",
        || async {
            f.node.queue_message_count(&parked_queue).await.unwrap() == bad.len() as u64
                && app.successes().len() == busy.len()
        },
    )
    .await;
    for id in &bad {
        assert_eq!(app.attempts(id).len(), 1, "{id}: a 422 is not retried");
    }
    for id in &busy {
        assert_eq!(app.attempts(id).len(), 2, "{id}: a 429 is retried");
    }
    for (props, _) in get_all(&f.node.amqp_url(), &parked_queue).await {
        assert_eq!(
            header_str(&props, "x-warren-parked-reason"),
            "non-retryable"
        );
        assert_eq!(header(&props, "x-retries"), Some(AMQPValue::LongLongInt(0)));
        let last: serde_json::Value =
            serde_json::from_str(&header_str(&props, "x-warren-last-error")).unwrap();
        assert_eq!(last["status"], 422);
    }
    assert_nothing_left(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_app_times_out_into_the_retry_path_and_the_channel_survives() {
    let app = TestApp::start(|seen, _| {
        if seen.id.starts_with("hang") {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let policy = policy(1, 200, 2.0, 1000);
    let f = setup(&policy, &app, Duration::from_millis(700)).await;
    let hang = ids("hang", 10);
    let fine = ids("fine", 10);
    publish_all(&f.api, &hang).await;
    publish_all(&f.api, &fine).await;
    let parked_queue = warren_crds::names::parking_lot(QUEUE);
    wait_until(
        Duration::from_secs(30),
        "hung deliveries parked",
        || async {
            f.node.queue_message_count(&parked_queue).await.unwrap() == hang.len() as u64
                && app.successes().len() == fine.len()
        },
    )
    .await;
    for id in &hang {
        assert_eq!(app.attempts(id).len(), 2, "{id}: first delivery + 1 retry");
    }
    for (props, _) in get_all(&f.node.amqp_url(), &parked_queue).await {
        let last = header_str(&props, "x-warren-last-error");
        assert!(last.contains("did not answer within 700ms"), "{last}");
    }
    // The subscription never broke, and it still works.
    let later = ids("later", 5);
    publish_all(&f.api, &later).await;
    wait_until(
        Duration::from_secs(15),
        "later messages delivered",
        || async { app.successes().len() == fine.len() + later.len() },
    )
    .await;
    let snapshot = f.sidecar.consumer.snapshot();
    assert_eq!(snapshot.queues[0].subscriptions, 1, "{snapshot:?}");
    assert!(snapshot.queues[0].last_error.is_none(), "{snapshot:?}");
    assert_nothing_left(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_never_wait_past_the_consumer_timeout_budget() {
    init_tracing();
    // One delivery at the app at a time, 600 ms each, ten prefetched: the
    // later ones would wait seconds for their turn. With a 1 s timeout and
    // an 8 s consumerTimeout a delivery may wait 1 s (8 - 2 x 1 - 5); those
    // that waited longer go back to the broker and come again.
    let app = TestApp::start(|_, _| Reply::After(Duration::from_millis(600), 200)).await;
    let policy = policy(2, 200, 2.0, 1000);
    let node = start_node().await;
    declare(&node, &policy).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&node.amqp_url(), dir.path());
    let mut consumer = consumer_config(&app, &policy, Duration::from_secs(1));
    consumer.app.as_mut().unwrap().concurrency = 1;
    consumer.queues[0].prefetch = 10;
    consumer.consumer_timeout = HumanDuration::from_secs(8);
    cfg.consumer = Some(consumer);
    let sidecar = warren_sidecar::start(cfg).await.unwrap();
    let api = format!("http://{}", sidecar.api_addr);
    let messages = ids("queued", 10);
    publish_all(&api, &messages).await;
    wait_until(
        Duration::from_secs(60),
        "every message processed",
        || async { app.successes().len() == messages.len() },
    )
    .await;
    let metrics = metrics_text(&format!("http://{}", sidecar.admin_addr)).await;
    let requeued: u64 = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                "warren_sidecar_delivery_outcomes_total{queue=\"orders\",outcome=\"requeued\"}",
            )
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        requeued > 0,
        "deliveries that waited too long are handed back:\n{metrics}"
    );
    assert!(
        app.seen().iter().any(|s| s.redelivered),
        "handed-back deliveries come again, marked redelivered"
    );
    let snapshot = sidecar.consumer.snapshot();
    assert_eq!(
        snapshot.queues[0].subscriptions, 1,
        "the channel was never closed: {snapshot:?}"
    );
    println!("handed back before the consumer timeout: {requeued}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_queue_is_reported_and_consumed_once_it_exists() {
    init_tracing();
    let app = TestApp::start(|_, _| Reply::Status(200)).await;
    let policy = policy(2, 200, 2.0, 1000);
    let node = start_node().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&node.amqp_url(), dir.path());
    cfg.consumer = Some(consumer_config(&app, &policy, Duration::from_secs(5)));
    let sidecar = warren_sidecar::start(cfg).await.unwrap();
    let api = format!("http://{}", sidecar.api_addr);
    wait_until(
        Duration::from_secs(10),
        "the missing queue reported",
        || async {
            let r: serde_json::Value = client()
                .get(format!("{api}/v1/consumer"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["queues"][0]["state"] == "failing"
                && r["queues"][0]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("NOT_FOUND") && e.contains("no queue 'orders'"))
        },
    )
    .await;
    declare(&node, &policy).await;
    let messages = ids("late", 5);
    publish_all(&api, &messages).await;
    wait_until(
        Duration::from_secs(20),
        "messages delivered once the queue exists",
        || async { app.successes().len() == messages.len() },
    )
    .await;
    assert_eq!(
        sidecar.consumer.snapshot().queues[0].state,
        SubscriptionState::Consuming
    );

    // The broker cancels the subscription when the queue is deleted; the
    // sidecar subscribes again once it is back.
    node.delete_queue(QUEUE).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "the cancelled subscription reported",
        || async { sidecar.consumer.snapshot().queues[0].state == SubscriptionState::Failing },
    )
    .await;
    declare(&node, &policy).await;
    let again = ids("again", 5);
    publish_all(&api, &again).await;
    wait_until(
        Duration::from_secs(20),
        "messages delivered after re-subscribing",
        || async { app.successes().len() == messages.len() + again.len() },
    )
    .await;
    let snapshot = sidecar.consumer.snapshot();
    assert_eq!(snapshot.queues[0].subscriptions, 2, "{snapshot:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumption_resumes_after_broker_kill9_and_graceful_stop() {
    // One message in eight fails its first delivery, so the retry path is
    // in use while the broker goes down.
    let app = TestApp::start(|seen, before| {
        let n: usize = seen.id.rsplit('-').next().unwrap().parse().unwrap_or(0);
        if n.is_multiple_of(8) && before == 0 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let policy = policy(5, 200, 2.0, 2000);
    let f = setup(&policy, &app, Duration::from_secs(5)).await;
    // RabbitMQ 3.10 only: a clean restart after declaring, or a SIGKILL can
    // lose the young quorum queue's leader (see
    // `RabbitNode::needs_quorum_registration_restart`).
    let mut node = on_node(f.node, |n| n.settle_new_quorum_queues().map(drop)).await;
    let account = Account::new();
    let producers = Producers::start(
        &f.api,
        &account,
        "c",
        4,
        u64::MAX,
        Duration::from_millis(10),
    );
    let mut resumed_after = Vec::new();
    for fault in ["kill -9", "graceful stop"] {
        tokio::time::sleep(Duration::from_secs(2)).await;
        node = on_node(node, move |n| {
            if fault == "kill -9" {
                n.kill9()
            } else {
                n.stop()
            }
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        node = on_node(node, |n| n.start_again()).await;
        let back = Instant::now();
        let before = app.deliveries();
        wait_until(Duration::from_secs(45), "consumption to resume", || async {
            app.deliveries() > before + 20
        })
        .await;
        resumed_after.push((fault, back.elapsed()));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    producers.stop().await;
    wait_until(
        Duration::from_secs(90),
        "every acknowledged message processed",
        || async {
            let successes = app.successes();
            account.report().acked as usize <= successes.len()
                && account
                    .lost_ids()
                    .iter()
                    .all(|id| successes.contains_key(id))
        },
    )
    .await;
    for (id, n) in app.successes() {
        for _ in 0..n {
            account.record_received(id.clone());
        }
    }
    let report = account.report();
    println!("consumer across broker kill -9 and graceful stop: {report}");
    for (fault, took) in &resumed_after {
        println!("consumption resumed {took:?} after the broker was back from {fault}");
    }
    account.assert_no_loss();
    assert!(
        report.acked > 200,
        "too few messages to mean anything: {report}"
    );
    let snapshot = f.sidecar.consumer.snapshot();
    assert!(
        snapshot.queues[0].subscriptions >= 3,
        "the sidecar re-subscribed by itself: {snapshot:?}"
    );
    drop(node);
}

/// Retry copies and parking copies republished at the same time by
/// concurrent deliveries, the parking ones unroutable (the parking lot is
/// gone): an unroutable copy is never taken as confirmed, so no original is
/// acked without a copy somewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unroutable_copy_never_releases_its_original() {
    let app = TestApp::start(|seen, _| {
        if seen.id.starts_with("park") {
            Reply::Status(422)
        } else {
            Reply::Status(503)
        }
    })
    .await;
    let policy = policy(100, 200, 1.0, 200);
    let f = setup(&policy, &app, Duration::from_secs(5)).await;
    let parked_queue = warren_crds::names::parking_lot(QUEUE);
    f.node.delete_queue(&parked_queue).await.unwrap();
    let messages: Vec<String> = (0..40)
        .map(|i| match i % 2 {
            0 => format!("park-{i}"),
            _ => format!("retry-{i}"),
        })
        .collect();
    publish_all(&f.api, &messages).await;
    // Parking copies are returned and their originals handed back; retry
    // copies cycle through the delay tier. Let that run for a while.
    wait_until(Duration::from_secs(45), "many republishes", || async {
        messages
            .iter()
            .map(|id| app.attempts(id).len())
            .sum::<usize>()
            >= 300
    })
    .await;
    let Fixture {
        node,
        topo,
        sidecar,
        _dir,
        ..
    } = f;
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
    // What sits in a delay queue comes back to the work queue.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut found: HashMap<String, usize> = HashMap::new();
    for q in std::iter::once(QUEUE).chain(topo.tier_queues()) {
        for (props, _) in get_all(&node.amqp_url(), q).await {
            *found
                .entry(props.message_id().as_ref().unwrap().to_string())
                .or_default() += 1;
        }
    }
    let missing: Vec<&String> = messages
        .iter()
        .filter(|id| !found.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "originals acked without a copy: {missing:?}"
    );
}

/// A message published without a `message_id` (straight to the broker, not
/// through the sidecar) reaches the app under one `X-Warren-Message-Id`
/// however often it comes: handed back to the broker and redelivered (its
/// parking copy had nowhere to go), then retried through a delay tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_without_an_id_keeps_its_derived_id_across_redelivery_and_retry() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let deliveries = Arc::new(AtomicUsize::new(0));
    let app = TestApp::start({
        let deliveries = deliveries.clone();
        move |_, _| match deliveries.fetch_add(1, Ordering::SeqCst) {
            // Non-retryable: parked, but the parking lot is gone, so the
            // original is handed back and redelivered.
            0 => Reply::Status(422),
            // Retryable: a copy goes through the delay tier.
            1 => Reply::Status(503),
            _ => Reply::Status(200),
        }
    })
    .await;
    let policy = policy(3, 200, 1.0, 200);
    let f = setup(&policy, &app, Duration::from_secs(5)).await;
    f.node
        .delete_queue(&warren_crds::names::parking_lot(QUEUE))
        .await
        .unwrap();

    let conn = Connection::connect(&f.node.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = lapin::types::FieldTable::default();
    headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
    let confirm = ch
        .basic_publish(
            EXCHANGE.into(),
            KEY.into(),
            lapin::options::BasicPublishOptions::default(),
            b"no id of its own",
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("text/plain".into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let _ = conn.close(200, "done".into()).await;

    wait_until(
        Duration::from_secs(30),
        "the message to succeed",
        || async {
            app.seen()
                .iter()
                .any(|s| matches!(s.reply, Reply::Status(200)))
        },
    )
    .await;
    let seen = app.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen[1].redelivered, "the second delivery is a redelivery");
    assert_eq!(seen[2].retries, 1, "the third delivery is the retry copy");
    let id = &seen[0].id;
    for s in &seen {
        assert_eq!(&s.id, id, "every delivery carries the same message id");
        assert_eq!(s.body.as_ref(), b"no id of its own");
    }
    assert_eq!(
        uuid::Uuid::parse_str(id).map(|u| u.get_version_num()),
        Ok(5),
        "a derived id is a UUIDv5: {id}"
    );
    assert_nothing_left(&f).await;
}
