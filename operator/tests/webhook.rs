//! The admission webhook as the API server sees it: HTTPS with a generated
//! certificate, reached by the Service's DNS name (resolved to 127.0.0.1),
//! AdmissionReview fixtures in `fixtures/admission/`, certificates swapped
//! at run time, and the caBundle / CA Secret handling against kube-rs's
//! mocked API server (tower-test).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::FutureExt;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse};
use serde_json::{Value, json};
use warren_operator::certs::{self, CertInfo, GeneratedCerts, ServerCerts};
use warren_operator::webhook::{self, Handler, WebhookSettings};

const SERVICE: &str = "warren-webhook";
const NAMESPACE: &str = "warren-system";
const HOST: &str = "warren-webhook.warren-system.svc";
const CONFIG_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/warren";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("{s:?} is not base64: {e}"))
}

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/admission/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// What the test handler saw.
#[derive(Debug, Clone)]
struct Seen {
    uid: String,
    name: String,
    generate_name: Option<String>,
    dry_run: bool,
}

/// The patch the test handler answers `uid` with.
fn patch_for(uid: &str) -> Value {
    json!([
        {"op": "add", "path": "/metadata/annotations/warren.dev~1injected", "value": "true"},
        {"op": "add", "path": "/metadata/labels", "value": {"warren.dev/review": uid}}
    ])
}

/// A handler that records requests and patches every pod; a pod named
/// `panic-me` makes it panic.
fn test_handler() -> (Handler, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let handler: Handler = Arc::new(move |req: AdmissionRequest<DynamicObject>, _| {
        let log = log.clone();
        async move {
            let object = req.object.as_ref().expect("a CREATE carries the object");
            if object.metadata.name.as_deref() == Some("panic-me") {
                panic!("injection failed on purpose");
            }
            log.lock().unwrap().push(Seen {
                uid: req.uid.clone(),
                name: req.name.clone(),
                generate_name: object.metadata.generate_name.clone(),
                dry_run: req.dry_run,
            });
            let patch: json_patch::Patch = serde_json::from_value(patch_for(&req.uid)).unwrap();
            AdmissionResponse::from(&req).with_patch(patch).unwrap()
        }
        .boxed()
    });
    (handler, seen)
}

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(certs: Arc<ServerCerts>, handler: Handler) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(webhook::serve(listener, certs, handler, stopped));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{HOST}:{}{path}", self.addr.port())
    }
}

fn serving(g: &GeneratedCerts) -> Arc<ServerCerts> {
    Arc::new(ServerCerts::from_pem(g.cert_pem.as_bytes(), g.key_pem.as_bytes()).unwrap())
}

/// A client trusting only the CA(s) in `ca_pem`, resolving the Service's
/// name to `addr`, on a fresh connection.
fn client(ca_pem: &[u8], addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem).unwrap())
        .resolve(HOST, addr)
        .tls_info(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The serial of the certificate the server presents to a client trusting
/// `ca_pem`.
async fn served_serial(ca_pem: &[u8], addr: SocketAddr) -> Result<String, reqwest::Error> {
    let response = client(ca_pem, addr)
        .get(format!("https://{HOST}:{}/healthz", addr.port()))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let info = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("tls info");
    let der = info.peer_certificate().expect("a peer certificate");
    Ok(CertInfo::from_der(der).unwrap().serial)
}

async fn post(client: &reqwest::Client, server: &Server, body: Vec<u8>) -> (StatusCode, String) {
    let response = client
        .post(server.url("/mutate"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn reviews_are_answered_over_https_with_the_handlers_patch() {
    let g = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let (handler, seen) = test_handler();
    let server = Server::start(serving(&g), handler).await;
    let client = client(g.ca_pem.as_bytes(), server.addr);

    let health = client.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.unwrap(), "ok");

    for name in [
        "pod-create-replicaset.json",
        "pod-create-bare.json",
        "pod-create-dry-run.json",
    ] {
        let review = fixture(name);
        let uid = review["request"]["uid"].as_str().unwrap().to_string();
        let (status, body) = post(&client, &server, serde_json::to_vec(&review).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        println!("{name}: {answer}");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{name}");
        assert_eq!(answer["kind"], "AdmissionReview", "{name}");
        assert!(answer.get("request").is_none(), "{name}");
        let response = &answer["response"];
        assert_eq!(response["uid"], uid.as_str(), "{name}");
        assert_eq!(response["allowed"], true, "{name}");
        assert_eq!(response["patchType"], "JSONPatch", "{name}");
        let patch: Value =
            serde_json::from_slice(&unb64(response["patch"].as_str().unwrap())).unwrap();
        assert_eq!(patch, patch_for(&uid), "{name}");
    }

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    // The ReplicaSet's pod has no name yet, only generateName.
    assert_eq!(seen[0].uid, "0a6c3f1e-5b2d-4c8e-9f7a-1d2e3f4a5b6c");
    assert_eq!(seen[0].name, "");
    assert_eq!(
        seen[0].generate_name.as_deref(),
        Some("orders-api-7d9c6b5f4-")
    );
    assert!(!seen[0].dry_run);
    assert_eq!(seen[1].name, "debug-shell");
    assert_eq!(seen[1].generate_name, None);
    assert_eq!(seen[2].name, "orders-worker");
    assert!(seen[2].dry_run);
}

#[tokio::test]
async fn what_is_not_an_admission_review_is_refused_with_400() {
    let g = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let (handler, seen) = test_handler();
    let server = Server::start(serving(&g), handler).await;
    let client = client(g.ca_pem.as_bytes(), server.addr);

    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "not JSON",
            b"{\"kind\": \"AdmissionRev".to_vec(),
            "not JSON",
        ),
        (
            "wrong kind",
            serde_json::to_vec(&fixture("review-wrong-kind.json")).unwrap(),
            "kind \"Pod\"",
        ),
        (
            "v1beta1",
            serde_json::to_vec(&fixture("review-v1beta1.json")).unwrap(),
            "apiVersion \"admission.k8s.io/v1beta1\"",
        ),
        (
            "no request",
            serde_json::to_vec(&fixture("review-no-request.json")).unwrap(),
            "has no request",
        ),
    ];
    for (what, body, says) in cases {
        let (status, text) = post(&client, &server, body).await;
        println!("{what}: {status} {text}");
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {text}");
        assert!(text.contains(says), "{what}: {text:?} should say {says:?}");
    }
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_unreadable_object_or_a_panicking_handler_refuses_the_pod_and_the_server_lives_on() {
    let g = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let (handler, seen) = test_handler();
    let server = Server::start(serving(&g), handler).await;
    let client = client(g.ca_pem.as_bytes(), server.addr);

    let review = fixture("pod-create-malformed-object.json");
    let (status, body) = post(&client, &server, serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    println!("malformed object: {answer}");
    assert_eq!(
        answer["response"]["uid"],
        "5f4e3d2c-1b0a-4f9e-8d7c-6b5a4f3e2d1c"
    );
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("cannot be read"), "{message}");
    assert!(answer["response"].get("patch").is_none());

    let mut review = fixture("pod-create-bare.json");
    review["request"]["uid"] = json!("11111111-2222-4333-8444-555555555555");
    review["request"]["name"] = json!("panic-me");
    review["request"]["object"]["metadata"]["name"] = json!("panic-me");
    let (status, body) = post(&client, &server, serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    println!("panicking handler: {answer}");
    assert_eq!(
        answer["response"]["uid"],
        "11111111-2222-4333-8444-555555555555"
    );
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("internal error") && message.contains("injection failed on purpose"),
        "{message}"
    );

    // Still serving, on the same and on new connections.
    let review = fixture("pod-create-bare.json");
    let (status, body) = post(&client, &server, serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let fresh = self::client(g.ca_pem.as_bytes(), server.addr);
    let (status, _) = post(&fresh, &server, serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_client_not_trusting_the_ca_fails_the_handshake() {
    let g = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let other = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let (handler, seen) = test_handler();
    let server = Server::start(serving(&g), handler).await;

    let stranger = client(other.ca_pem.as_bytes(), server.addr);
    let err = stranger
        .post(server.url("/mutate"))
        .body(serde_json::to_vec(&fixture("pod-create-bare.json")).unwrap())
        .send()
        .await
        .expect_err("a client trusting another CA must not get through");
    let chain = format!("{err:?}");
    assert!(
        err.is_connect() && chain.contains("InvalidCertificate(UnknownIssuer)"),
        "{chain}"
    );
    assert!(seen.lock().unwrap().is_empty());
    // The right CA still gets through.
    assert!(
        served_serial(g.ca_pem.as_bytes(), server.addr)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_stalled_tls_client_does_not_block_others() {
    let g = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let (handler, _seen) = test_handler();
    let server = Server::start(serving(&g), handler).await;
    // Connections that never send a ClientHello.
    let mut stalled = Vec::new();
    for _ in 0..5 {
        stalled.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let started = Instant::now();
    let client = client(g.ca_pem.as_bytes(), server.addr);
    let (status, _) = post(
        &client,
        &server,
        serde_json::to_vec(&fixture("pod-create-bare.json")).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(stalled);
}

#[tokio::test]
async fn a_stalled_tls_client_is_dropped_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let g = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let (handler, _seen) = test_handler();
    let server = Server::start(serving(&g), handler).await;
    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    // The server closes the connection: end of stream, or a reset.
    let read = tokio::time::timeout(
        webhook::HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        stalled.read(&mut buf),
    )
    .await
    .expect("the server closes a connection that sends no ClientHello");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(
        waited >= webhook::HANDSHAKE_TIMEOUT - Duration::from_millis(500),
        "{waited:?}"
    );
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let g = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let (handler, _seen) = test_handler();
    let mut server = Server::start(serving(&g), handler).await;
    assert!(
        served_serial(g.ca_pem.as_bytes(), server.addr)
            .await
            .is_ok()
    );
    server.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), &mut server.task)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(
        served_serial(g.ca_pem.as_bytes(), server.addr)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_request_in_flight_at_shutdown_is_answered() {
    let g = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let entered = Arc::new(tokio::sync::Notify::new());
    let signal = entered.clone();
    let handler: Handler = Arc::new(move |req: AdmissionRequest<DynamicObject>, _| {
        let signal = signal.clone();
        async move {
            signal.notify_one();
            tokio::time::sleep(Duration::from_millis(500)).await;
            AdmissionResponse::from(&req)
        }
        .boxed()
    });
    let mut server = Server::start(serving(&g), handler).await;
    let client = client(g.ca_pem.as_bytes(), server.addr);
    let in_flight = tokio::spawn({
        let url = server.url("/mutate");
        let body = serde_json::to_vec(&fixture("pod-create-bare.json")).unwrap();
        async move {
            client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
        }
    });
    entered.notified().await;
    server.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), &mut server.task)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    let response = in_flight.await.unwrap().expect("the request is answered");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        served_serial(g.ca_pem.as_bytes(), server.addr)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_swapped_certificate_is_served_to_new_connections() {
    let a = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let b = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(7200)).unwrap();
    let served = serving(&a);
    let (handler, _seen) = test_handler();
    let server = Server::start(served.clone(), handler).await;

    let serial_a = served_serial(a.ca_pem.as_bytes(), server.addr)
        .await
        .unwrap();
    assert_eq!(serial_a, served.info().serial);
    assert!(
        served_serial(b.ca_pem.as_bytes(), server.addr)
            .await
            .is_err()
    );

    let info_b = served
        .swap_pem(b.cert_pem.as_bytes(), b.key_pem.as_bytes())
        .unwrap();
    let serial_b = served_serial(b.ca_pem.as_bytes(), server.addr)
        .await
        .unwrap();
    assert_eq!(serial_b, info_b.serial);
    assert_ne!(serial_a, serial_b);
    assert_eq!(info_b.not_after, b.not_after);
    assert!(
        served_serial(a.ca_pem.as_bytes(), server.addr)
            .await
            .is_err()
    );
}

// ---- caBundle and CA Secret against the mocked API server ----

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn mock_client() -> (kube::Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

struct Call {
    method: Method,
    path: String,
    content_type: String,
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

async fn next(handle: &mut Handle) -> Option<Call> {
    let (request, respond) = handle.next_request().await?;
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let content_type = request
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Some(Call {
        method,
        path,
        content_type,
        body,
        respond,
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn webhook_config(bundles: [Option<&[u8]>; 2]) -> Value {
    let hook = |name: &str, bundle: Option<&[u8]>| {
        let mut client_config = json!({"service": {"name": SERVICE, "namespace": NAMESPACE, "path": "/mutate", "port": 443}});
        if let Some(b) = bundle {
            client_config["caBundle"] = json!(b64(b));
        }
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "clientConfig": client_config,
            "failurePolicy": "Fail",
            "sideEffects": "NoneOnDryRun",
            "timeoutSeconds": 10,
            "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]}]},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}]
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "warren", "resourceVersion": "41", "uid": "c0ffee00-0000-4000-8000-000000000001",
                     "labels": {"app.kubernetes.io/name": "warren"}},
        "webhooks": [hook("pods.warren.dev", bundles[0]), hook("pods-ordinal.warren.dev", bundles[1])]
    })
}

#[tokio::test]
async fn ca_bundle_is_patched_into_every_webhook_and_nothing_else() {
    let (client, mut handle) = mock_client();
    let ca = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600))
        .unwrap()
        .ca_pem;
    let task = tokio::spawn({
        let ca = ca.clone();
        async move { certs::patch_ca_bundle(client, "warren", ca.as_bytes()).await }
    });
    let before = webhook_config([Some(&b"-----BEGIN CERTIFICATE-----\nold\n"[..]), None]);

    let get = next(&mut handle).await.unwrap();
    assert_eq!(get.method, Method::GET);
    assert_eq!(get.path, CONFIG_PATH);
    get.reply(StatusCode::OK, before.clone());

    let patch = next(&mut handle).await.unwrap();
    println!("{} {} {}", patch.method, patch.path, patch.body);
    assert_eq!(patch.method, Method::PATCH);
    assert_eq!(patch.path, CONFIG_PATH);
    assert_eq!(patch.content_type, "application/json-patch+json");
    let ops: json_patch::Patch = serde_json::from_value(patch.body.clone()).unwrap();
    let mut after = before.clone();
    json_patch::patch(&mut after, &ops).expect("the patch applies to what was read");
    for hook in after["webhooks"].as_array().unwrap() {
        let bundle = unb64(hook["clientConfig"]["caBundle"].as_str().unwrap());
        assert_eq!(bundle, ca.as_bytes(), "{}", hook["name"]);
    }
    // Only the caBundles changed.
    let mut expected = before.clone();
    for hook in expected["webhooks"].as_array_mut().unwrap() {
        hook["clientConfig"]["caBundle"] = json!(b64(ca.as_bytes()));
    }
    assert_eq!(after, expected);
    patch.reply(StatusCode::OK, after);
    assert_eq!(task.await.unwrap().unwrap(), 2);
}

#[tokio::test]
async fn an_up_to_date_ca_bundle_is_not_written() {
    let (client, mut handle) = mock_client();
    let ca = b"-----BEGIN CERTIFICATE-----\ncurrent\n".to_vec();
    let task = tokio::spawn({
        let ca = ca.clone();
        async move { certs::patch_ca_bundle(client, "warren", &ca).await }
    });
    let get = next(&mut handle).await.unwrap();
    assert_eq!(get.method, Method::GET);
    get.reply(
        StatusCode::OK,
        webhook_config([Some(ca.as_slice()), Some(ca.as_slice())]),
    );
    assert_eq!(task.await.unwrap().unwrap(), 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), next(&mut handle))
            .await
            .map(|c| c.is_none())
            .unwrap_or(true),
        "no further request"
    );
}

#[tokio::test]
async fn a_missing_webhook_configuration_is_a_clear_error() {
    let (client, mut handle) = mock_client();
    let task = tokio::spawn(async move { certs::patch_ca_bundle(client, "warren", b"ca").await });
    let get = next(&mut handle).await.unwrap();
    assert_eq!(get.path, CONFIG_PATH);
    get.reply(
        StatusCode::NOT_FOUND,
        status(
            404,
            "NotFound",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io \"warren\" not found",
        ),
    );
    let err = task.await.unwrap().unwrap_err();
    let message = format!("{err:#}");
    println!("{message}");
    assert!(
        message.contains("MutatingWebhookConfiguration \"warren\" not found"),
        "{message}"
    );
}

/// An in-memory API server for Secrets in one namespace and the webhook
/// configuration: enough for several replicas' self-managed certificates.
#[derive(Default)]
struct Fake {
    secrets: BTreeMap<String, Value>,
    config: Option<Value>,
    resource_version: u64,
    /// Every caBundle patched into the first webhook, in order.
    bundles: Vec<Vec<u8>>,
}

fn serve_fake(mut handle: Handle, fake: Arc<Mutex<Fake>>) -> tokio::task::JoinHandle<()> {
    let secrets = format!("/api/v1/namespaces/{NAMESPACE}/secrets");
    tokio::spawn(async move {
        while let Some(call) = next(&mut handle).await {
            let mut f = fake.lock().unwrap();
            f.resource_version += 1;
            let rv = f.resource_version.to_string();
            let name = call.path.rsplit('/').next().unwrap().to_string();
            match (&call.method, call.path.as_str()) {
                (&Method::GET, p) if p.starts_with(&secrets) => match f.secrets.get(&name) {
                    Some(s) => call.reply(StatusCode::OK, s.clone()),
                    None => call.reply(StatusCode::NOT_FOUND, status(404, "NotFound", "no")),
                },
                (&Method::POST, p) if p == secrets => {
                    let name = call.body["metadata"]["name"].as_str().unwrap().to_string();
                    match f.secrets.entry(name) {
                        std::collections::btree_map::Entry::Occupied(_) => {
                            call.reply(StatusCode::CONFLICT, status(409, "AlreadyExists", "exists"))
                        }
                        std::collections::btree_map::Entry::Vacant(slot) => {
                            let mut s = call.body.clone();
                            s["metadata"]["resourceVersion"] = json!(rv);
                            slot.insert(s.clone());
                            call.reply(StatusCode::CREATED, s);
                        }
                    }
                }
                (&Method::PUT, p) if p.starts_with(&secrets) => {
                    let current = f
                        .secrets
                        .get(&name)
                        .map(|s| s["metadata"]["resourceVersion"].clone());
                    if current != Some(call.body["metadata"]["resourceVersion"].clone()) {
                        call.reply(StatusCode::CONFLICT, status(409, "Conflict", "changed"));
                    } else {
                        let mut s = call.body.clone();
                        s["metadata"]["resourceVersion"] = json!(rv);
                        f.secrets.insert(name, s.clone());
                        call.reply(StatusCode::OK, s);
                    }
                }
                (&Method::GET, CONFIG_PATH) => match &f.config {
                    Some(c) => call.reply(StatusCode::OK, c.clone()),
                    None => call.reply(StatusCode::NOT_FOUND, status(404, "NotFound", "no")),
                },
                (&Method::PATCH, CONFIG_PATH) => {
                    let ops: json_patch::Patch = serde_json::from_value(call.body.clone()).unwrap();
                    let mut c = f.config.clone().unwrap();
                    match json_patch::patch(&mut c, &ops) {
                        Ok(()) => {
                            c["metadata"]["resourceVersion"] = json!(rv);
                            let bundle = unb64(
                                c["webhooks"][0]["clientConfig"]["caBundle"]
                                    .as_str()
                                    .unwrap(),
                            );
                            f.bundles.push(bundle);
                            f.config = Some(c.clone());
                            call.reply(StatusCode::OK, c);
                        }
                        Err(e) => call.reply(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            status(422, "Invalid", &e.to_string()),
                        ),
                    }
                }
                (m, p) => panic!("unexpected {m} {p}"),
            }
        }
    })
}

fn settings(validity: Duration, renew_before: Duration, poll: Duration) -> WebhookSettings {
    let mut s = WebhookSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        None,
        SERVICE,
        NAMESPACE,
        "warren",
    );
    s.validity = validity;
    s.renew_before = renew_before;
    s.poll_interval = poll;
    s
}

fn current_bundle(fake: &Arc<Mutex<Fake>>) -> Vec<u8> {
    let f = fake.lock().unwrap();
    let c = f.config.as_ref().unwrap();
    let first = unb64(
        c["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .unwrap(),
    );
    let second = unb64(
        c["webhooks"][1]["clientConfig"]["caBundle"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(first, second, "every webhook carries the same bundle");
    first
}

fn cert_count(pem: &[u8]) -> usize {
    String::from_utf8_lossy(pem)
        .matches("BEGIN CERTIFICATE")
        .count()
}

#[tokio::test]
async fn replicas_share_one_ca_and_the_bundle_trusts_each_of_them() {
    let (client, handle) = mock_client();
    let fake = Arc::new(Mutex::new(Fake {
        config: Some(webhook_config([None, None])),
        ..Default::default()
    }));
    let api = serve_fake(handle, fake.clone());
    let s = settings(
        Duration::from_secs(365 * 86400),
        Duration::from_secs(30 * 86400),
        Duration::from_secs(30),
    );
    let (h1, _) = test_handler();
    let (h2, _) = test_handler();
    let (one, two) = tokio::join!(
        webhook::start_webhook(s.clone(), client.clone(), h1),
        webhook::start_webhook(s.clone(), client.clone(), h2),
    );
    let (one, two) = (one.unwrap(), two.unwrap());
    assert_ne!(one.certs.info().serial, two.certs.info().serial);

    let bundle = current_bundle(&fake);
    assert_eq!(cert_count(&bundle), 1, "one CA");
    let secret = fake.lock().unwrap().secrets["warren-ca"].clone();
    assert_eq!(
        unb64(secret["data"]["ca.crt"].as_str().unwrap()),
        bundle,
        "the bundle is the Secret's CA"
    );
    assert!(secret["data"]["ca.key"].is_string());
    for w in [&one, &two] {
        let serial = served_serial(&bundle, w.local_addr).await.unwrap();
        assert_eq!(serial, w.certs.info().serial);
    }
    // Nothing to write again: both replicas patched the same bundle.
    assert!(fake.lock().unwrap().bundles.iter().all(|b| *b == bundle));
    one.task.abort();
    two.task.abort();
    drop(client);
    api.abort();
}

#[tokio::test]
async fn certificates_are_renewed_and_the_bundle_follows() {
    let (client, handle) = mock_client();
    let fake = Arc::new(Mutex::new(Fake {
        config: Some(webhook_config([None, None])),
        ..Default::default()
    }));
    let api = serve_fake(handle, fake.clone());
    // CA rotated with less than 2 × 2 s left, certificate renewed with 2 s.
    let s = settings(
        Duration::from_secs(8),
        Duration::from_secs(2),
        Duration::from_millis(250),
    );
    let (handler, _) = test_handler();
    let w = webhook::start_webhook(s, client.clone(), handler)
        .await
        .unwrap();
    let first = w.certs.info();
    let first_bundle = current_bundle(&fake);
    assert_eq!(
        served_serial(&first_bundle, w.local_addr).await.unwrap(),
        first.serial
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let renewed = loop {
        let now = w.certs.info();
        if now.serial != first.serial {
            break now;
        }
        assert!(Instant::now() < deadline, "the certificate was not renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("renewed: {first:?} -> {renewed:?}");
    // The bundle is re-patched: the new CA first, the replaced one after it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let bundle = loop {
        let b = current_bundle(&fake);
        if b != first_bundle && cert_count(&b) == 2 {
            break b;
        }
        assert!(Instant::now() < deadline, "caBundle not re-patched");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        String::from_utf8_lossy(&bundle).ends_with(String::from_utf8_lossy(&first_bundle).as_ref()),
        "the previous CA stays in the bundle"
    );
    assert!(fake.lock().unwrap().bundles.len() >= 2);
    // What is served now is trusted by the new bundle, and not by the first
    // CA alone.
    let serial = served_serial(&current_bundle(&fake), w.local_addr)
        .await
        .unwrap();
    assert_eq!(serial, w.certs.info().serial);
    assert!(served_serial(&first_bundle, w.local_addr).await.is_err());
    let secret = fake.lock().unwrap().secrets["warren-ca"].clone();
    assert!(secret["data"]["previous-ca.crt"].is_string());
    w.task.abort();
    drop(client);
    api.abort();
}

#[tokio::test]
async fn a_missing_configuration_does_not_stop_serving_and_is_patched_once_it_exists() {
    let (client, handle) = mock_client();
    let fake = Arc::new(Mutex::new(Fake::default()));
    let api = serve_fake(handle, fake.clone());
    let s = settings(
        Duration::from_secs(365 * 86400),
        Duration::from_secs(30 * 86400),
        Duration::from_millis(200),
    );
    let (handler, _) = test_handler();
    let w = webhook::start_webhook(s, client.clone(), handler)
        .await
        .unwrap();
    fake.lock().unwrap().config = Some(webhook_config([None, None]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.lock().unwrap().bundles.is_empty() {
        assert!(Instant::now() < deadline, "caBundle never patched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bundle = current_bundle(&fake);
    assert_eq!(
        served_serial(&bundle, w.local_addr).await.unwrap(),
        w.certs.info().serial
    );
    w.task.abort();
    drop(client);
    api.abort();
}

// ---- cert-dir (cert-manager) ----

fn write_pair(dir: &std::path::Path, g: &GeneratedCerts) {
    std::fs::write(dir.join("tls.crt"), &g.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &g.key_pem).unwrap();
}

#[tokio::test]
async fn a_cert_dir_is_reloaded_and_an_invalid_pair_keeps_the_old_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let a = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let b = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let c = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    write_pair(dir.path(), &a);
    let (client, _handle) = mock_client(); // cert-dir mode never calls the API
    let mut s = settings(
        Duration::from_secs(3600),
        Duration::from_secs(60),
        Duration::from_millis(100),
    );
    s.cert_dir = Some(dir.path().to_path_buf());
    let (handler, _) = test_handler();
    let w = webhook::start_webhook(s, client, handler).await.unwrap();
    let serial_a = served_serial(a.ca_pem.as_bytes(), w.local_addr)
        .await
        .unwrap();

    write_pair(dir.path(), &b);
    let deadline = Instant::now() + Duration::from_secs(10);
    let serial_b = loop {
        if let Ok(s) = served_serial(b.ca_pem.as_bytes(), w.local_addr).await {
            break s;
        }
        assert!(Instant::now() < deadline, "new pair not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(serial_a, serial_b);
    assert_eq!(w.certs.info().serial, serial_b);

    // A key that does not match, then garbage, then no files: b stays.
    std::fs::write(dir.path().join("tls.crt"), &c.cert_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        served_serial(b.ca_pem.as_bytes(), w.local_addr)
            .await
            .unwrap(),
        serial_b
    );
    std::fs::write(dir.path().join("tls.crt"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        served_serial(b.ca_pem.as_bytes(), w.local_addr)
            .await
            .unwrap(),
        serial_b
    );
    std::fs::remove_file(dir.path().join("tls.key")).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        served_serial(b.ca_pem.as_bytes(), w.local_addr)
            .await
            .unwrap(),
        serial_b
    );
    // A good pair again is picked up.
    write_pair(dir.path(), &c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_serial(c.ca_pem.as_bytes(), w.local_addr)
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "valid pair not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.task.abort();
}

#[tokio::test]
async fn a_cert_dir_without_a_valid_pair_fails_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (client, _handle) = mock_client();
    let mut s = settings(
        Duration::from_secs(3600),
        Duration::from_secs(60),
        Duration::from_millis(100),
    );
    s.cert_dir = Some(dir.path().to_path_buf());
    let (handler, _) = test_handler();
    let err = webhook::start_webhook(s.clone(), client.clone(), handler.clone())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("tls.crt"), "{err:#}");
    let a = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    let b = certs::generate(SERVICE, NAMESPACE, Duration::from_secs(3600)).unwrap();
    std::fs::write(dir.path().join("tls.crt"), &a.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &b.key_pem).unwrap();
    let err = webhook::start_webhook(s, client, handler)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("does not fit"), "{err:#}");
}
