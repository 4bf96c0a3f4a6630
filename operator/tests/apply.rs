//! The planner and applier against a real private RabbitMQ node, through
//! its management API: create, idempotence, live changes, removals, drift
//! repair, conflicts and an unreachable broker.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren_crds::duration::HumanDuration;
use warren_crds::reliable_queue::{
    BindingSpec, BrokerRef, DeletionPolicy, ExchangeKind, ExchangeSpec, ParkingLotSpec, QueueKind,
    QueueSpec, ReliableQueueSpec,
};
use warren_crds::retry::{DelayStrategy, RetryPolicySpec};
use warren_operator::apply::{Broker, BrokerError, Change, QueueDeletion, Report};
use warren_operator::plan::{Topology, plan};
use warren_testkit::{RabbitNode, init_tracing};

fn spec() -> ReliableQueueSpec {
    ReliableQueueSpec {
        broker: BrokerRef {
            secret_name: "rabbit".into(),
            vhost: "/".into(),
            management_url: None,
        },
        exchange: ExchangeSpec {
            name: "shop".into(),
            kind: ExchangeKind::Topic,
        },
        queue: QueueSpec {
            bindings: vec![
                BindingSpec {
                    routing_key: "order.created".into(),
                },
                BindingSpec {
                    routing_key: "order.updated".into(),
                },
            ],
            ..Default::default()
        },
        retry_policy_ref: None,
        parking_lot: ParkingLotSpec::default(),
        deletion_policy: DeletionPolicy::Retain,
    }
}

fn policy() -> RetryPolicySpec {
    let mut p = RetryPolicySpec {
        max_retries: 4,
        ..Default::default()
    };
    p.backoff.initial = HumanDuration::from_secs(1);
    p.backoff.max = HumanDuration::from_secs(8);
    p
}

async fn start() -> (RabbitNode, Broker) {
    init_tracing();
    let node = tokio::task::spawn_blocking(|| RabbitNode::start().expect("start node"))
        .await
        .unwrap();
    let broker = Broker::new(&node.management_url(), "guest", "guest").unwrap();
    (node, broker)
}

async fn apply(broker: &Broker, t: &Topology) -> Report {
    let report = broker.apply(t).await.expect("apply");
    println!("{report:#?}");
    report
}

fn created(report: &Report) -> Vec<String> {
    report
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::Created(o) => Some(o.clone()),
            _ => None,
        })
        .collect()
}

async fn publish(node: &RabbitNode, key: &str, n: usize) {
    let conn = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    for i in 0..n {
        ch.basic_publish(
            "shop".into(),
            key.into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let _ = conn.close(200, "done".into()).await;
}

async fn bindings_of(node: &RabbitNode, queue: &str) -> Vec<(String, String)> {
    let b = node
        .management_get(&format!("/api/queues/%2F/{queue}/bindings"))
        .await
        .unwrap();
    b.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["source"].as_str().unwrap().to_owned(),
                b["routing_key"].as_str().unwrap().to_owned(),
            )
        })
        .filter(|(s, _)| !s.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_everything_and_is_idempotent() {
    let (node, broker) = start().await;
    let t = plan("orders", &spec(), &policy()).unwrap();
    let first = apply(&broker, &t).await;
    assert!(first.conflicts.is_empty(), "{:?}", first.conflicts);
    let made = created(&first);
    for object in [
        "exchange shop",
        "exchange orders.retry",
        "queue orders",
        "queue orders.parked",
        "queue orders.retry.1s",
        "queue orders.retry.8s",
        "policy warren.orders",
        "binding shop -> orders (\"order.created\")",
        "binding orders.retry -> orders.retry.4s (\"4s\")",
    ] {
        assert!(
            made.iter().any(|m| m == object),
            "{object} not created: {made:?}"
        );
    }
    let q = node.management_get("/api/queues/%2F/orders").await.unwrap();
    assert_eq!(q["type"], "quorum");
    let policy = node
        .management_get("/api/policies/%2F/warren.orders")
        .await
        .unwrap();
    assert_eq!(policy["pattern"], "^orders$");
    assert_eq!(policy["apply-to"], "queues");
    let tier = node
        .management_get("/api/queues/%2F/orders.retry.4s")
        .await
        .unwrap();
    assert_eq!(tier["arguments"]["x-message-ttl"], 4000);
    assert_eq!(tier["arguments"]["x-dead-letter-routing-key"], "orders");

    let second = apply(&broker, &t).await;
    assert_eq!(second, Report::default(), "a second apply changes nothing");

    // Messages flow: published to the work exchange, they reach the queue.
    publish(&node, "order.created", 3).await;
    assert_eq!(node.queue_message_count("orders").await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_apply_live_and_removals_follow_the_spec() {
    let (node, broker) = start().await;
    let t = plan("orders", &spec(), &policy()).unwrap();
    apply(&broker, &t).await;
    publish(&node, "order.created", 5).await;

    // Limits change on the live queue: the policy changes, the queue and its
    // messages stay.
    let mut s = spec();
    s.queue.max_length = Some(1000);
    s.queue.message_ttl = Some(HumanDuration::from_secs(3600));
    s.queue.delivery_limit = Some(7);
    s.parking_lot.retention = Some(HumanDuration::from_secs(86_400));
    // One binding and the two longest tiers go.
    s.queue.bindings.pop();
    let mut p = policy();
    p.max_retries = 2;
    let t2 = plan("orders", &s, &p).unwrap();
    let report = apply(&broker, &t2).await;
    assert!(report.conflicts.is_empty(), "{:?}", report.conflicts);
    for change in [
        Change::Updated("policy warren.orders".into()),
        Change::Created("policy warren.orders.parked".into()),
        Change::Deleted("binding shop -> orders (\"order.updated\")".into()),
        Change::Deleted("queue orders.retry.4s".into()),
        Change::Deleted("queue orders.retry.8s".into()),
    ] {
        assert!(report.changes.contains(&change), "missing {change:?}");
    }
    assert_eq!(
        node.queue_message_count("orders").await.unwrap(),
        5,
        "messages survive"
    );
    // The queue's own view of its policy (statistics lag by seconds).
    let mut effective = serde_json::Value::Null;
    for _ in 0..100 {
        let q = node.management_get("/api/queues/%2F/orders").await.unwrap();
        effective = q["effective_policy_definition"].clone();
        if effective["max-length"] == 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(effective["max-length"], 1000, "{effective}");
    assert_eq!(effective["message-ttl"], 3_600_000);
    assert_eq!(effective["delivery-limit"], 7);
    assert_eq!(
        bindings_of(&node, "orders").await,
        [("shop".to_owned(), "order.created".to_owned())]
    );
    let gone = node.management_get("/api/queues/%2F/orders.retry.4s").await;
    assert!(gone.is_err(), "tier 4s must be gone");

    // Retention removed: its policy goes.
    s.parking_lot.retention = None;
    let t3 = plan("orders", &s, &p).unwrap();
    let report = apply(&broker, &t3).await;
    assert_eq!(
        report.changes,
        [Change::Deleted("policy warren.orders.parked".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_and_conflicts_carry_the_broker_text() {
    let (node, broker) = start().await;
    let t = plan("orders", &spec(), &policy()).unwrap();
    apply(&broker, &t).await;

    // Deleted behind Warren's back: declared again, bindings included.
    node.delete_queue("orders").await.unwrap();
    node.delete_queue("orders.retry.2s").await.unwrap();
    let report = apply(&broker, &t).await;
    let made = created(&report);
    for object in [
        "queue orders",
        "queue orders.retry.2s",
        "binding shop -> orders (\"order.created\")",
        "binding orders.retry -> orders.retry.2s (\"2s\")",
    ] {
        assert!(
            made.iter().any(|m| m == object),
            "{object} not recreated: {made:?}"
        );
    }

    // A type change cannot be applied in place: reported with the broker's
    // words, nothing touched.
    let mut s = spec();
    s.queue.kind = QueueKind::Classic;
    let classic = plan("orders", &s, &policy()).unwrap();
    let report = apply(&broker, &classic).await;
    let conflict = report
        .conflicts
        .iter()
        .find(|c| c.object == "queue orders")
        .expect("type change reported");
    assert!(
        conflict.message.contains("inequivalent arg 'x-queue-type'"),
        "{conflict}"
    );
    let q = node.management_get("/api/queues/%2F/orders").await.unwrap();
    assert_eq!(q["type"], "quorum", "the queue was not touched");

    // An exchange of another type: same.
    let mut s = spec();
    s.exchange.kind = ExchangeKind::Direct;
    let report = apply(&broker, &plan("orders", &s, &policy()).unwrap()).await;
    let conflict = report
        .conflicts
        .iter()
        .find(|c| c.object == "exchange shop")
        .expect("exchange type change reported");
    assert!(
        conflict.message.contains("inequivalent arg 'type'"),
        "{conflict}"
    );

    // The delayed-message strategy on a broker without the plugin.
    let mut p = policy();
    p.delay_strategy = DelayStrategy::DelayedMessageExchange;
    let report = apply(&broker, &plan("billing", &spec(), &p).unwrap()).await;
    let conflict = report
        .conflicts
        .iter()
        .find(|c| c.object == "exchange billing.retry")
        .expect("missing plugin reported");
    assert!(
        conflict
            .message
            .contains("rabbitmq_delayed_message_exchange"),
        "{conflict}"
    );

    // A virtual host that does not exist: the broker's text.
    let mut s = spec();
    s.broker.vhost = "nowhere".into();
    let err = broker
        .apply(&plan("orders", &s, &policy()).unwrap())
        .await
        .unwrap_err();
    println!("{err}");
    assert!(matches!(err, BrokerError::Refused { .. }), "{err}");
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_keeps_queues_with_messages_unless_forced() {
    let (node, broker) = start().await;
    let t = plan("orders", &spec(), &policy()).unwrap();
    apply(&broker, &t).await;
    publish(&node, "order.created", 2).await;
    let report = broker.delete(&t, false).await.unwrap();
    assert_eq!(report.conflicts.len(), 1, "{report:?}");
    assert_eq!(report.conflicts[0].object, "queue orders");
    assert!(
        report
            .changes
            .contains(&Change::Deleted("queue orders.parked".into()))
    );
    assert!(
        report
            .changes
            .contains(&Change::Deleted("exchange orders.retry".into()))
    );
    assert!(
        node.management_get("/api/exchanges/%2F/shop").await.is_ok(),
        "the shared work exchange stays"
    );
    assert_eq!(node.queue_message_count("orders").await.unwrap(), 2);
    // The kept queue keeps its policy (dead-lettering to the parking lot,
    // the delivery limit) and its fence.
    assert!(
        node.management_get("/api/policies/%2F/warren.orders")
            .await
            .is_ok()
    );
    let report = broker.delete(&t, true).await.unwrap();
    assert_eq!(
        report.changes,
        [
            Change::Deleted("queue orders".into()),
            Change::Deleted("policy warren.orders".into()),
            Change::Deleted("policy warren-deleting.orders".into()),
        ]
    );
}

#[tokio::test]
async fn an_unreachable_broker_is_an_error_not_a_crash() {
    let port = warren_testkit::free_port();
    let broker = Broker::new(&format!("http://127.0.0.1:{port}"), "guest", "guest").unwrap();
    let t = plan("orders", &spec(), &policy()).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(60), broker.apply(&t))
        .await
        .expect("fails, does not hang")
        .unwrap_err();
    assert!(matches!(err, BrokerError::Unreachable { .. }), "{err}");
}

/// The management statistics' count of `queue` (seconds old).
async fn stats_count(node: &RabbitNode, queue: &str) -> Option<u64> {
    let q = node
        .management_get(&format!("/api/queues/%2F/{queue}"))
        .await
        .ok()?;
    q["messages"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_lets_the_broker_refuse_and_never_consumes() {
    let (node, broker) = start().await;
    let t = plan("orders", &spec(), &policy()).unwrap();
    apply(&broker, &t).await;
    publish(&node, "order.created", 1).await;

    // A classic queue: the broker's own if-empty refuses, in its words.
    node.declare_classic_queue("audit").await.unwrap();
    node.bind("shop", "audit", "audit.created").await.unwrap();
    publish(&node, "audit.created", 1).await;
    match broker.delete_queue_if_empty("/", "audit").await.unwrap() {
        QueueDeletion::Kept(why) => assert!(why.contains("not empty"), "{why}"),
        other => panic!("audit: {other:?}"),
    }
    assert_eq!(node.queue_message_count("audit").await.unwrap(), 1);

    // The quorum work queue, at once after the publish (its statistics
    // do not show the message yet): fenced, counted once the statistics
    // caught up, kept.
    let report = broker.delete(&t, false).await.unwrap();
    println!("{report:#?}");
    assert_eq!(report.conflicts.len(), 1, "{report:?}");
    assert_eq!(report.conflicts[0].object, "queue orders");
    assert!(
        report.conflicts[0].message.contains("holds 1 message(s)"),
        "{}",
        report.conflicts[0]
    );
    for gone in [
        "queue orders.parked",
        "queue orders.retry.1s",
        "exchange orders.retry",
    ] {
        assert!(
            report.changes.contains(&Change::Deleted(gone.into())),
            "{gone} not deleted: {report:?}"
        );
    }
    // Fenced: a new message is refused (the publisher's confirm fails, so
    // a sidecar keeps it), not taken into a queue on its way out.
    let conn = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            "orders".into(),
            BasicPublishOptions::default(),
            b"late",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_nack(), "{confirm:?}");
    // Asked again (the fence is there already: no wait): still kept.
    let report = broker.delete(&t, false).await.unwrap();
    assert_eq!(report.conflicts.len(), 1, "{report:?}");

    // Nothing was consumed: the message was never delivered, so it comes
    // first-hand, without a delivery count.
    let get = |ch: lapin::Channel| async move {
        ch.basic_get("orders".into(), Default::default())
            .await
            .unwrap()
            .expect("the message is still there")
    };
    let m = get(ch.clone()).await;
    let count = |m: &lapin::message::BasicGetMessage| {
        m.delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned())
            .map_or(0, |v| match v {
                lapin::types::AMQPValue::LongLongInt(n) => n,
                lapin::types::AMQPValue::LongInt(n) => n.into(),
                other => panic!("x-delivery-count {other:?}"),
            })
    };
    assert!(!m.delivery.redelivered, "the message was handed out before");
    assert_eq!(count(&m), 0, "the message was handed out before");
    assert_eq!(m.delivery.data, b"m0");
    // What a peek (a get handed back) would have done, for comparison.
    m.delivery
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let m = get(ch.clone()).await;
    assert!(m.delivery.redelivered);
    assert_eq!(count(&m), 1, "a returned message is counted");
    m.delivery.ack(Default::default()).await.unwrap();
    let _ = conn.close(200, "done".into()).await;

    // Empty now (once the statistics say so): deleted, with its policy
    // and fence.
    for _ in 0..200 {
        if stats_count(&node, "orders").await == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        broker.delete_queue_if_empty("/", "orders").await.unwrap(),
        QueueDeletion::Deleted
    );
    let report = broker.delete(&t, false).await.unwrap();
    assert!(report.conflicts.is_empty(), "{report:?}");
    let policies = node.management_get("/api/policies/%2F").await.unwrap();
    assert_eq!(policies, serde_json::json!([]), "no policy left");
    // The classic queue, emptied: the broker deletes it.
    node.purge("audit").await.unwrap();
    assert_eq!(
        broker.delete_queue_if_empty("/", "audit").await.unwrap(),
        QueueDeletion::Deleted
    );
    assert_eq!(
        broker.delete_queue_if_empty("/", "audit").await.unwrap(),
        QueueDeletion::Missing
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_over_https_needs_the_right_ca() {
    init_tracing();
    let node = tokio::task::spawn_blocking(|| {
        RabbitNode::start_with_management_tls().expect("start node")
    })
    .await
    .unwrap();
    let url = node.management_url();
    assert!(url.starts_with("https://localhost:"), "{url}");
    let ca = node.test_ca().ca_cert_pem();
    let broker = Broker::with_ca(&url, "guest", "guest", Some(ca)).unwrap();
    broker.ping().await.expect("https with the node's CA");
    let t = plan("orders", &spec(), &policy()).unwrap();
    let report = apply(&broker, &t).await;
    assert!(created(&report).contains(&"queue orders".to_owned()));

    let other = warren_testkit::TestCa::generate().unwrap();
    for (what, broker) in [
        ("no CA", Broker::new(&url, "guest", "guest").unwrap()),
        (
            "another CA",
            Broker::with_ca(&url, "guest", "guest", Some(other.ca_cert_pem())).unwrap(),
        ),
    ] {
        let err = broker.ping().await.unwrap_err();
        println!("{what}: {err}");
        assert_eq!(err.reason(), "BrokerTlsFailed", "{what}: {err}");
        assert!(
            err.to_string().contains("invalid peer certificate"),
            "{what}: {err}"
        );
    }
    // Plain HTTP on the HTTPS port is no way round it.
    let plain = url.replace("https://", "http://");
    let err = Broker::new(&plain, "guest", "guest")
        .unwrap()
        .ping()
        .await
        .unwrap_err();
    println!("plain: {err}");
}

/// RabbitMQ 4 gives quorum queues a delivery limit of 20 by default: a
/// message handed back (nack with requeue) more often than that is
/// dead-lettered. The work queue's policy dead-letters into its parking lot,
/// so such a message is parked, never dropped — on 3.10 (no default limit)
/// as soon as the spec's own limit is passed, on 4.x at the broker's default
/// as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_handed_back_past_the_delivery_limit_is_parked_not_dropped() {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions};

    let (node, broker) = start().await;
    let version = tokio::task::block_in_place(|| node.version()).unwrap();
    let mut s = spec();
    // No limit of Warren's own on 4.x: the broker's default applies.
    let on_4 = !version.starts_with("3.");
    s.queue.delivery_limit = if on_4 { None } else { Some(5) };
    let t = plan("orders", &s, &policy()).unwrap();
    let report = apply(&broker, &t).await;
    assert!(report.conflicts.is_empty(), "{:?}", report.conflicts);
    publish(&node, "order.created", 1).await;

    let conn = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut deliveries = ch
        .basic_consume(
            "orders".into(),
            "hand-back".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut handed_back = 0;
    while handed_back < 100 {
        match tokio::time::timeout(Duration::from_secs(3), deliveries.next()).await {
            Ok(Some(Ok(d))) => {
                d.nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .unwrap();
                handed_back += 1;
            }
            // No more deliveries: the broker stopped handing it out.
            Err(_) => break,
            Ok(other) => panic!("consumer ended: {other:?}"),
        }
    }
    let _ = conn.close(200, "done".into()).await;
    println!("RabbitMQ {version}: handed back {handed_back} times");
    let limit = if on_4 { 20 } else { 5 };
    assert!(
        (limit..=limit + 1).contains(&handed_back),
        "handed back {handed_back} times before the limit of {limit} took it away"
    );
    let mut parked = 0;
    for _ in 0..50 {
        parked = node.queue_message_count("orders.parked").await.unwrap();
        if parked == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(parked, 1, "the message went to the parking lot");
    assert_eq!(node.queue_message_count("orders").await.unwrap(), 0);
}
