//! The controller's reconcile against kube-rs's mocked API server
//! (tower-test): every request it makes is checked in order, and answered
//! as the API server would. Where a broker is needed, it is a real private
//! node, reached through the Secret the ReliableQueue names.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};
use warren_crds::reliable_queue::ReliableQueue;
use warren_crds::retry::RetryPolicySpec;
use warren_crds::retry_policy::RetryPolicy;
use warren_operator::apply::Broker;
use warren_operator::controller::{self, Context, Error};
use warren_operator::metrics::Metrics;
use warren_operator::plan;
use warren_testkit::{RabbitNode, init_tracing};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn context() -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "warren-operator".into(),
            instance: None,
        },
    );
    let ctx = Arc::new(Context {
        client,
        recorder,
        metrics: Arc::new(Metrics::new()),
        requeue: Duration::from_secs(60),
        retry: Duration::from_secs(10),
    });
    (ctx, handle)
}

fn queue(extra: Value) -> ReliableQueue {
    let mut rq = json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "ReliableQueue",
        "metadata": {"name": "orders", "namespace": "shop", "uid": "u-1", "generation": 3, "resourceVersion": "7"},
        "spec": {
            "broker": {"secretName": "rabbit"},
            "exchange": {"name": "shop", "type": "topic"},
            "queue": {"bindings": [{"routingKey": "order.created"}]}
        }
    });
    merge(&mut rq, extra);
    serde_json::from_value(rq).unwrap()
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// One request the reconcile made.
struct Call {
    method: Method,
    path: String,
    body: Value,
    respond: tower_test::mock::SendResponse<Response<Body>>,
}

impl Call {
    fn reply(self, status: StatusCode, body: Value) {
        self.respond.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }
}

async fn next(handle: &mut Handle) -> Call {
    let (request, respond) = tokio::time::timeout(Duration::from_secs(20), handle.next_request())
        .await
        .expect("the reconcile made no further request")
        .expect("service dropped");
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    println!("{method} {path} {body}");
    Call {
        method,
        path,
        body,
        respond,
    }
}

fn not_found(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": format!("{what} not found"), "reason": "NotFound", "code": 404})
}

fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {status}"))
}

/// Answers an event publication, if the next request is one.
async fn expect_event(handle: &mut Handle, reason: &str) {
    let call = next(handle).await;
    assert_eq!(call.method, Method::POST);
    assert!(call.path.ends_with("/events"), "{}", call.path);
    assert_eq!(call.body["reason"], reason);
    let body = call.body.clone();
    call.reply(StatusCode::CREATED, body);
}

#[tokio::test]
async fn a_new_queue_gets_the_finalizer_first() {
    let (ctx, mut handle) = context();
    let rq = Arc::new(queue(json!({})));
    let task = tokio::spawn(controller::reconcile(rq, ctx));
    let call = next(&mut handle).await;
    assert_eq!(call.method, Method::PATCH);
    assert_eq!(
        call.path,
        "/apis/warren.dev/v1alpha1/namespaces/shop/reliablequeues/orders"
    );
    let patch = call.body.to_string();
    assert!(patch.contains("warren.dev/cleanup"), "{patch}");
    let mut updated = serde_json::to_value(queue(json!({}))).unwrap();
    updated["metadata"]["finalizers"] = json!(["warren.dev/cleanup"]);
    call.reply(StatusCode::OK, updated);
    let action = task.await.unwrap().unwrap();
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_missing_secret_becomes_a_condition_not_a_crash() {
    let (ctx, mut handle) = context();
    let rq = Arc::new(queue(
        json!({"metadata": {"finalizers": ["warren.dev/cleanup"]}}),
    ));
    let task = tokio::spawn(controller::reconcile(rq, ctx));
    let call = next(&mut handle).await;
    assert_eq!(call.method, Method::GET);
    assert_eq!(call.path, "/api/v1/namespaces/shop/secrets/rabbit");
    call.reply(StatusCode::NOT_FOUND, not_found("secrets \"rabbit\""));

    let call = next(&mut handle).await;
    assert_eq!(call.method, Method::PATCH);
    assert_eq!(
        call.path,
        "/apis/warren.dev/v1alpha1/namespaces/shop/reliablequeues/orders/status"
    );
    let status = call.body["status"].clone();
    let broker = condition(&status, "BrokerReachable");
    assert_eq!(broker["status"], "False");
    assert_eq!(broker["reason"], "SecretNotFound");
    assert_eq!(broker["message"], "Secret shop/rabbit does not exist");
    assert_eq!(condition(&status, "Ready")["status"], "False");
    assert_eq!(condition(&status, "TopologyReady")["status"], "Unknown");
    assert_eq!(status["observedGeneration"], 3);
    call.reply(
        StatusCode::OK,
        serde_json::to_value(queue(json!({}))).unwrap(),
    );
    expect_event(&mut handle, "NotReady").await;
    let action = task.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn retain_lets_go_without_touching_the_broker() {
    let (ctx, mut handle) = context();
    let rq = Arc::new(queue(json!({
        "metadata": {"finalizers": ["warren.dev/cleanup"], "deletionTimestamp": "2026-11-21T10:00:00Z"},
        "spec": {"deletionPolicy": "Retain"}
    })));
    let task = tokio::spawn(controller::reconcile(rq, ctx));
    let call = next(&mut handle).await;
    assert_eq!(call.method, Method::PATCH);
    assert_eq!(
        call.path,
        "/apis/warren.dev/v1alpha1/namespaces/shop/reliablequeues/orders"
    );
    let patch = call.body.to_string();
    assert!(
        patch.contains("\"remove\""),
        "the finalizer is removed: {patch}"
    );
    call.reply(
        StatusCode::OK,
        serde_json::to_value(queue(json!({}))).unwrap(),
    );
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
}

fn secret_for(node: &RabbitNode) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "rabbit", "namespace": "shop"},
        "stringData": {"uri": node.amqp_url()},
    })
}

async fn start_node() -> RabbitNode {
    init_tracing();
    tokio::task::spawn_blocking(|| RabbitNode::start().expect("start node"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_what_the_broker_has() {
    let node = start_node().await;
    let (ctx, mut handle) = context();
    let rq = Arc::new(queue(json!({
        "metadata": {"finalizers": ["warren.dev/cleanup"]},
        "spec": {"broker": {"managementUrl": node.management_url()}, "retryPolicyRef": "quick"}
    })));
    let task = tokio::spawn(controller::reconcile(rq, ctx));
    let call = next(&mut handle).await;
    assert_eq!(call.path, "/api/v1/namespaces/shop/secrets/rabbit");
    call.reply(StatusCode::OK, secret_for(&node));
    let call = next(&mut handle).await;
    assert_eq!(
        call.path,
        "/apis/warren.dev/v1alpha1/namespaces/shop/retrypolicies/quick"
    );
    call.reply(
        StatusCode::OK,
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "RetryPolicy",
               "metadata": {"name": "quick", "namespace": "shop"},
               "spec": {"maxRetries": 2, "backoff": {"initial": "1s"}}}),
    );
    let call = next(&mut handle).await;
    assert!(call.path.ends_with("/reliablequeues/orders/status"));
    let status = call.body["status"].clone();
    assert_eq!(condition(&status, "Ready")["status"], "True", "{status}");
    assert_eq!(condition(&status, "BrokerReachable")["reason"], "Connected");
    let topology = condition(&status, "TopologyReady");
    assert_eq!(topology["reason"], "Applied");
    assert!(
        topology["message"]
            .as_str()
            .unwrap()
            .contains("created queue orders"),
        "{topology}"
    );
    assert_eq!(
        status["objects"]["queues"],
        json!([
            "orders",
            "orders.parked",
            "orders.retry.1s",
            "orders.retry.2s"
        ])
    );
    assert_eq!(status["objects"]["exchanges"], json!(["orders.retry"]));
    assert_eq!(status["counts"]["ready"], 0);
    assert_eq!(status["queue"], "orders");
    call.reply(
        StatusCode::OK,
        serde_json::to_value(queue(json!({}))).unwrap(),
    );
    expect_event(&mut handle, "Ready").await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(60))
    );
    assert!(
        node.management_get("/api/queues/%2F/orders.retry.2s")
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_broker_objects_but_not_messages_unless_forced() {
    let node = start_node().await;
    // The queue exists on the broker and holds a message.
    let broker = Broker::new(&node.management_url(), "guest", "guest").unwrap();
    let rq = queue(json!({}));
    let topology = plan::plan("orders", &rq.spec, &RetryPolicySpec::default()).unwrap();
    broker.apply(&topology).await.unwrap();
    {
        let conn = lapin::Connection::connect(&node.amqp_url(), Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        ch.basic_publish(
            "shop".into(),
            "order.created".into(),
            Default::default(),
            b"keep me",
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let _ = conn.close(200, "done".into()).await;
    }
    let deleting = |force: bool| {
        let annotations = if force {
            json!({"warren.dev/force-delete": "true"})
        } else {
            json!({})
        };
        Arc::new(queue(json!({
            "metadata": {"finalizers": ["warren.dev/cleanup"], "deletionTimestamp": "2026-11-21T10:00:00Z",
                         "annotations": annotations},
            "spec": {"deletionPolicy": "Delete", "broker": {"managementUrl": node.management_url()}}
        })))
    };

    // Not forced: everything else goes, the queue with its message stays,
    // and so does the finalizer.
    let (ctx, mut handle) = context();
    let task = tokio::spawn(controller::reconcile(deleting(false), ctx));
    let call = next(&mut handle).await;
    assert_eq!(call.path, "/api/v1/namespaces/shop/secrets/rabbit");
    call.reply(StatusCode::OK, secret_for(&node));
    expect_event(&mut handle, "DeletionBlocked").await;
    let err = task.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::Finalizer(_)) && err.to_string().contains("finalizer"),
        "{err}"
    );
    assert_eq!(node.queue_message_count("orders").await.unwrap(), 1);
    assert!(
        node.management_get("/api/queues/%2F/orders.parked")
            .await
            .is_err()
    );
    assert!(
        node.management_get("/api/exchanges/%2F/orders.retry")
            .await
            .is_err()
    );

    // Forced: the queue goes, then the finalizer.
    let (ctx, mut handle) = context();
    let task = tokio::spawn(controller::reconcile(deleting(true), ctx));
    let call = next(&mut handle).await;
    call.reply(StatusCode::OK, secret_for(&node));
    let call = next(&mut handle).await;
    assert_eq!(call.method, Method::PATCH);
    assert!(
        call.body.to_string().contains("\"remove\""),
        "{}",
        call.body
    );
    call.reply(
        StatusCode::OK,
        serde_json::to_value(queue(json!({}))).unwrap(),
    );
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert!(node.management_get("/api/queues/%2F/orders").await.is_err());
    assert!(
        node.management_get("/api/exchanges/%2F/shop").await.is_ok(),
        "the shared work exchange stays"
    );
}

#[test]
fn a_policy_change_reaches_every_queue_using_it() {
    let q = |name: &str, ns: &str, policy: Option<&str>| {
        let mut v = json!({"metadata": {"name": name, "namespace": ns}});
        if let Some(p) = policy {
            v["spec"] = json!({"retryPolicyRef": p});
        }
        Arc::new(queue(v))
    };
    let queues = vec![
        q("a", "shop", Some("fast")),
        q("b", "shop", Some("slow")),
        q("c", "shop", Some("fast")),
        q("d", "other", Some("fast")),
        q("e", "shop", None),
    ];
    let policy: RetryPolicy = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "RetryPolicy",
        "metadata": {"name": "fast", "namespace": "shop"}, "spec": {}
    }))
    .unwrap();
    let hit: Vec<String> = controller::queues_using_policy(&queues, &policy)
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(hit, ["a", "c"]);
}

#[test]
fn a_status_write_does_not_trigger_a_reconcile_but_a_spec_change_does() {
    let base = queue(json!({"metadata": {"name": "orders", "namespace": "shop"}}));
    let hash = controller::trigger_hash;
    let mut status_only = base.clone();
    status_only.status = Some(
        serde_json::from_value(json!({
            "observedGeneration": 3, "counts": {"ready": 41, "consumers": 1, "parked": 0}
        }))
        .unwrap(),
    );
    status_only.metadata.resource_version = Some("8".into());
    assert_eq!(hash(&base), hash(&status_only), "counts changed");
    let mut spec = base.clone();
    spec.metadata.generation = Some(4);
    assert_ne!(hash(&base), hash(&spec), "generation");
    let mut annotated = base.clone();
    annotated.metadata.annotations =
        Some([("warren.dev/force-delete".to_string(), "true".to_string())].into());
    assert_ne!(hash(&base), hash(&annotated), "force-delete");
    let mut finalized = base.clone();
    finalized.metadata.finalizers = Some(vec![controller::FINALIZER.into()]);
    assert_ne!(hash(&base), hash(&finalized), "finalizer added");
    let mut deleted = base.clone();
    deleted.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    assert_ne!(hash(&base), hash(&deleted), "deletion");
}

fn deleting(deletion_timestamp: &str, extra: Value) -> Arc<ReliableQueue> {
    let mut rq = json!({
        "metadata": {"finalizers": ["warren.dev/cleanup"], "deletionTimestamp": deletion_timestamp},
        "spec": {"deletionPolicy": "Delete"},
        "status": {"objects": {
            "exchanges": ["orders.retry"],
            "queues": ["orders", "orders.parked", "orders.retry.1s"],
            "policies": ["warren.orders"]
        }}
    });
    merge(&mut rq, extra);
    Arc::new(queue(rq))
}

/// Answers the finalizer's removal.
async fn expect_finalizer_released(handle: &mut Handle) {
    let call = next(handle).await;
    assert_eq!(call.method, Method::PATCH);
    assert_eq!(
        call.path,
        "/apis/warren.dev/v1alpha1/namespaces/shop/reliablequeues/orders"
    );
    assert!(
        call.body.to_string().contains("\"remove\""),
        "the finalizer is removed: {}",
        call.body
    );
    call.reply(
        StatusCode::OK,
        serde_json::to_value(queue(json!({}))).unwrap(),
    );
}

#[tokio::test]
async fn without_its_secret_a_deletion_lets_go_and_names_what_it_left() {
    for force in [false, true] {
        let (ctx, mut handle) = context();
        let annotations = json!({"warren.dev/force-delete": force.to_string()});
        let rq = deleting(
            "2099-01-01T00:00:00Z",
            json!({"metadata": {"annotations": annotations}}),
        );
        let task = tokio::spawn(controller::reconcile(rq, ctx));
        let call = next(&mut handle).await;
        assert_eq!(call.path, "/api/v1/namespaces/shop/secrets/rabbit");
        call.reply(StatusCode::NOT_FOUND, not_found("secrets \"rabbit\""));
        // At once, not after a grace: the deletion began "in 2099".
        let call = next(&mut handle).await;
        assert_eq!(call.method, Method::POST);
        assert_eq!(call.path, "/apis/events.k8s.io/v1/namespaces/shop/events");
        assert_eq!(call.body["type"], "Warning");
        assert_eq!(call.body["reason"], controller::OBJECTS_LEFT);
        assert_eq!(call.body["regarding"]["kind"], "ReliableQueue");
        assert_eq!(
            call.body["note"],
            "Secret shop/rabbit does not exist; broker cleanup given up, left on the broker: \
             queues orders, orders.parked, orders.retry.1s; exchanges orders.retry; \
             policies warren.orders"
        );
        let body = call.body.clone();
        call.reply(StatusCode::CREATED, body);
        expect_finalizer_released(&mut handle).await;
        assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    }
}

#[tokio::test]
async fn in_a_terminating_namespace_the_event_goes_to_the_namespace() {
    let (ctx, mut handle) = context();
    let task = tokio::spawn(controller::reconcile(
        deleting("2099-01-01T00:00:00Z", json!({})),
        ctx,
    ));
    let call = next(&mut handle).await;
    call.reply(StatusCode::NOT_FOUND, not_found("secrets \"rabbit\""));
    // What the API server answers for a namespace being deleted.
    let call = next(&mut handle).await;
    assert_eq!(call.path, "/apis/events.k8s.io/v1/namespaces/shop/events");
    call.reply(
        StatusCode::FORBIDDEN,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
               "message": "events.events.k8s.io \"orders.1\" is forbidden: unable to create new content in namespace shop because it is being terminated"}),
    );
    let call = next(&mut handle).await;
    assert_eq!(call.method, Method::POST);
    assert_eq!(
        call.path,
        "/apis/events.k8s.io/v1/namespaces/default/events"
    );
    assert_eq!(call.body["regarding"]["kind"], "Namespace");
    assert_eq!(call.body["regarding"]["name"], "shop");
    assert_eq!(call.body["reason"], controller::OBJECTS_LEFT);
    let note = call.body["note"].as_str().unwrap();
    assert!(
        note.starts_with("ReliableQueue shop/orders: Secret shop/rabbit does not exist;")
            && note.contains("queues orders, orders.parked"),
        "{note}"
    );
    let body = call.body.clone();
    call.reply(StatusCode::CREATED, body);
    expect_finalizer_released(&mut handle).await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
}

#[tokio::test]
async fn an_unreachable_broker_is_retried_for_a_grace_then_let_go() {
    let port = warren_testkit::free_port();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "rabbit", "namespace": "shop"},
        "stringData": {"uri": format!("amqp://guest:guest@127.0.0.1:{port}/%2f")},
    });
    let spec = json!({"spec": {"broker": {"managementUrl": format!("http://127.0.0.1:{port}")}}});
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();

    // Just deleted: retried, the finalizer stays.
    let (ctx, mut handle) = context();
    let task = tokio::spawn(controller::reconcile(deleting(&now, spec.clone()), ctx));
    next(&mut handle)
        .await
        .reply(StatusCode::OK, secret.clone());
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert_eq!(err.metric_label(), "finalizer");

    // Deleted longer ago than the grace: let go, saying why.
    let long_ago =
        std::time::SystemTime::now() - controller::CLEANUP_GRACE - Duration::from_secs(5);
    let long_ago = humantime::format_rfc3339_seconds(long_ago).to_string();
    let (ctx, mut handle) = context();
    let task = tokio::spawn(controller::reconcile(deleting(&long_ago, spec), ctx));
    next(&mut handle).await.reply(StatusCode::OK, secret);
    let call = next(&mut handle).await;
    assert_eq!(call.body["reason"], controller::OBJECTS_LEFT);
    let note = call.body["note"].as_str().unwrap().to_owned();
    assert!(
        note.contains("unreachable") && note.contains("queues orders, orders.parked"),
        "{note}"
    );
    call.reply(StatusCode::CREATED, json!({}));
    expect_finalizer_released(&mut handle).await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
}

/// Accepts TCP connections on 127.0.0.1 and counts them.
async fn counting_listener() -> (
    u16,
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    let task = tokio::spawn(async move {
        while let Ok((_stream, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (port, count, task)
}

#[tokio::test]
async fn plain_http_to_a_tls_broker_is_refused_before_any_credential_is_sent() {
    let (port, connections, listener) = counting_listener().await;
    // The Secret says TLS twice over (amqps://, port 5671); the spec's
    // management URL is plain HTTP, and something listens there.
    for data in [
        json!({"uri": "amqps://guest:s3cret@localhost:5671/%2f"}),
        json!({"username": "guest", "password": "s3cret", "host": "localhost", "port": "5671"}),
    ] {
        let (ctx, mut handle) = context();
        let rq = Arc::new(queue(json!({
            "metadata": {"finalizers": ["warren.dev/cleanup"]},
            "spec": {"broker": {"managementUrl": format!("http://127.0.0.1:{port}")}}
        })));
        let task = tokio::spawn(controller::reconcile(rq, ctx));
        next(&mut handle).await.reply(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "rabbit", "namespace": "shop"}, "stringData": data}),
        );
        let call = next(&mut handle).await;
        assert!(call.path.ends_with("/reliablequeues/orders/status"));
        let status = call.body["status"].clone();
        let broker = condition(&status, "BrokerReachable");
        assert_eq!(broker["status"], "False");
        assert_eq!(broker["reason"], "InsecureManagementUrl", "{broker}");
        assert!(
            broker["message"]
                .as_str()
                .unwrap()
                .contains("use an https:// management URL"),
            "{broker}"
        );
        call.reply(
            StatusCode::OK,
            serde_json::to_value(queue(json!({}))).unwrap(),
        );
        expect_event(&mut handle, "NotReady").await;
        task.await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing was sent to the plain HTTP URL"
    );
    listener.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_in_the_secret_reaches_a_tls_management_api() {
    init_tracing();
    let node = tokio::task::spawn_blocking(|| {
        RabbitNode::start_with_management_tls().expect("start node")
    })
    .await
    .unwrap();
    assert!(node.management_url().starts_with("https://localhost:"));
    let uri = node.amqps_url();
    let ca = node.test_ca().ca_cert_pem().to_owned();
    let with_ca = json!({"uri": uri, "ca.crt": ca});
    let without_ca = json!({"uri": uri});
    let another_ca =
        json!({"uri": uri, "ca.crt": warren_testkit::TestCa::generate().unwrap().ca_cert_pem()});
    for (data, ready, reason) in [
        (with_ca, "True", "Connected"),
        (without_ca, "False", "BrokerTlsFailed"),
        (another_ca, "False", "BrokerTlsFailed"),
    ] {
        let (ctx, mut handle) = context();
        // The management URL is derived from the amqps:// URI: https, on
        // the node's management port instead of 15671.
        let rq = Arc::new(queue(json!({
            "metadata": {"finalizers": ["warren.dev/cleanup"]},
            "spec": {"broker": {"managementUrl": node.management_url()}}
        })));
        let task = tokio::spawn(controller::reconcile(rq, ctx));
        next(&mut handle).await.reply(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "rabbit", "namespace": "shop"}, "stringData": data}),
        );
        let call = next(&mut handle).await;
        let status = call.body["status"].clone();
        let broker = condition(&status, "BrokerReachable");
        assert_eq!(broker["status"], ready, "{broker}");
        assert_eq!(broker["reason"], reason, "{broker}");
        if ready == "False" {
            let message = broker["message"].as_str().unwrap();
            assert!(message.contains("invalid peer certificate"), "{message}");
        }
        call.reply(
            StatusCode::OK,
            serde_json::to_value(queue(json!({}))).unwrap(),
        );
        expect_event(
            &mut handle,
            if ready == "True" { "Ready" } else { "NotReady" },
        )
        .await;
        task.await.unwrap().unwrap();
    }
    assert!(
        node.management_get("/api/queues/%2F/orders").await.is_ok(),
        "applied over https"
    );
}
