//! The webhook's Pod handler on AdmissionReview fixtures as the API server
//! sends them, with ReliableQueues, RetryPolicies and claims in an
//! in-memory API server: the patch it answers, the claim it takes, what a
//! dry run and a bad pod get.

mod fake;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

use fake::FakeApi;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::{Value, json};
use warren_operator::admission::PodInjector;
use warren_operator::certs::{self, ServerCerts};
use warren_operator::inject::InjectionConfig;
use warren_operator::webhook::{self, Handler};

fn review() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/inject/review-deployment-pod.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn request(review: Value) -> AdmissionRequest<DynamicObject> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(review).unwrap();
    review.try_into().unwrap()
}

/// The injector's answer to a review, given its object as sent.
async fn admit(injector: &PodInjector, review: Value) -> AdmissionResponse {
    let object = Some(review["request"]["object"].clone()).filter(|o| !o.is_null());
    injector.admit(request(review), object).await
}

/// The example's ReliableQueue and RetryPolicy, in namespace `shop`.
fn api_with_examples() -> FakeApi {
    let api = FakeApi::new();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/orders.yaml"),
    )
    .unwrap();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let mut v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        v["metadata"]["namespace"] = json!("shop");
        match v["kind"].as_str().unwrap() {
            "ReliableQueue" => api.put("reliablequeues", v),
            "RetryPolicy" => api.put("retrypolicies", v),
            _ => {}
        }
    }
    api
}

/// The object after the response's patch.
fn patched(review: &Value, response: &AdmissionResponse) -> Value {
    let mut pod = review["request"]["object"].clone();
    if let Some(bytes) = &response.patch {
        let patch: json_patch::Patch = serde_json::from_slice(bytes).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();
    }
    pod
}

fn sidecar(pod: &Value) -> &Value {
    pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "warren-sidecar")
        .expect("sidecar injected")
}

fn outbox(pod: &Value) -> &Value {
    pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "warren-outbox")
        .expect("outbox volume")
}

#[tokio::test]
async fn a_deployment_pod_gets_the_sidecar_and_a_pool_claim() {
    let api = api_with_examples();
    let (client, _server) = api.client();
    let injector = PodInjector::new(client, InjectionConfig::default());
    let review = review();
    let response = admit(&injector, review.clone()).await;
    assert!(response.allowed, "{:?}", response.result);
    assert_eq!(response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
    let pod = patched(&review, &response);
    let s = sidecar(&pod);
    assert_eq!(s["restartPolicy"], "Always");
    let config: Value = serde_json::from_str(
        s["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "WARREN_CONFIG_JSON")
            .unwrap()["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(config["app"]["url"], "http://127.0.0.1:8080/messages");
    assert_eq!(config["queues"][0]["retryPolicy"]["maxRetries"], 8);
    // The outbox is a claim from the Deployment's pool, and the pod says so.
    assert_eq!(
        outbox(&pod)["persistentVolumeClaim"]["claimName"],
        "warren-outbox-deployment-orders-api-0"
    );
    assert_eq!(
        pod["metadata"]["labels"]["warren.dev/outbox-claim"],
        "warren-outbox-deployment-orders-api-0"
    );
    let claim = api
        .get(
            "persistentvolumeclaims",
            "shop",
            "warren-outbox-deployment-orders-api-0",
        )
        .expect("claim created");
    assert_eq!(
        claim["metadata"]["annotations"]["warren.dev/workload"],
        "Deployment/orders-api"
    );
    // What the ServiceAccount plugin added before us is left alone.
    assert!(
        pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "kube-api-access-x7k2p")
    );
    assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 45);

    // The same pod admitted again (a reinvocation): nothing more to do, and
    // no second claim.
    let mut again = review.clone();
    again["request"]["object"] = pod.clone();
    let response = admit(&injector, again.clone()).await;
    assert!(response.allowed);
    assert_eq!(patched(&again, &response), pod);
    assert_eq!(api.all("persistentvolumeclaims").len(), 1);
}

#[tokio::test]
async fn a_dry_run_takes_no_claim() {
    let api = api_with_examples();
    let (client, _server) = api.client();
    let injector = PodInjector::new(client, InjectionConfig::default());
    let mut review = review();
    review["request"]["dryRun"] = json!(true);
    let response = admit(&injector, review.clone()).await;
    assert!(response.allowed);
    let pod = patched(&review, &response);
    sidecar(&pod);
    assert!(
        outbox(&pod)["emptyDir"].is_object(),
        "a placeholder on a dry run"
    );
    assert!(
        api.all("persistentvolumeclaims").is_empty(),
        "no side effect on a dry run"
    );
}

#[tokio::test]
async fn a_pod_that_cannot_be_injected_is_refused_with_the_reason() {
    let api = FakeApi::new(); // no ReliableQueue "orders"
    let (client, _server) = api.client();
    let injector = PodInjector::new(client, InjectionConfig::default());
    let response = admit(&injector, review()).await;
    assert!(!response.allowed);
    assert!(response.patch.is_none());
    let message = response.result.message.clone();
    assert!(message.contains("ReliableQueue \"orders\""), "{message}");
    assert!(api.all("persistentvolumeclaims").is_empty());

    let api = api_with_examples();
    let (client, _server) = api.client();
    let injector = PodInjector::new(client, InjectionConfig::default());
    let mut bad = review();
    bad["request"]["object"]["metadata"]["annotations"]["warren.dev/app-port"] = json!("eighty");
    let response = admit(&injector, bad).await;
    assert!(!response.allowed);
    assert!(
        response.result.message.contains("warren.dev/app-port"),
        "{}",
        response.result.message
    );
}

#[tokio::test]
async fn other_pods_kinds_and_operations_pass_unchanged() {
    let api = api_with_examples();
    let (client, _server) = api.client();
    let injector = PodInjector::new(client, InjectionConfig::default());

    let mut plain = review();
    plain["request"]["object"]["metadata"]["annotations"] = json!({});
    plain["request"]["object"]["metadata"]["labels"] = json!({"app": "orders-api"});
    let response = admit(&injector, plain).await;
    assert!(response.allowed && response.patch.is_none());

    let mut opted_out = review();
    opted_out["request"]["object"]["metadata"]["annotations"]["warren.dev/inject"] =
        json!("disabled");
    let response = admit(&injector, opted_out).await;
    assert!(response.allowed && response.patch.is_none());

    let mut update = review();
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = update["request"]["object"].clone();
    let response = admit(&injector, update).await;
    assert!(response.allowed && response.patch.is_none());
    assert!(api.all("persistentvolumeclaims").is_empty());
    assert!(
        api.log().iter().all(|s| s.method == http::Method::GET),
        "nothing written"
    );
}

/// The webhook's HTTPS server with the real injector behind it, and a
/// client that reaches it by the Service's name.
struct Webhook {
    http: reqwest::Client,
    url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Webhook {
    async fn start(injector: PodInjector) -> Webhook {
        let injector = Arc::new(injector);
        let handler: Handler = Arc::new(move |request, object| {
            let injector = injector.clone();
            Box::pin(async move { injector.admit(request, object).await })
        });
        let generated =
            certs::generate("warren-webhook", "warren-system", Duration::from_secs(3600)).unwrap();
        let served = Arc::new(
            ServerCerts::from_pem(generated.cert_pem.as_bytes(), generated.key_pem.as_bytes())
                .unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(webhook::serve(listener, served, handler, async {
            let _ = stopped.await;
        }));
        let host = "warren-webhook.warren-system.svc";
        let http = reqwest::Client::builder()
            .tls_certs_only(
                reqwest::Certificate::from_pem_bundle(generated.ca_pem.as_bytes()).unwrap(),
            )
            .resolve(host, addr)
            .build()
            .unwrap();
        Webhook {
            http,
            url: format!("https://{host}:{}/mutate", addr.port()),
            _stop: stop,
        }
    }

    /// The review's answer, checked to be a v1 AdmissionReview for its uid.
    async fn review(&self, review: &Value) -> Value {
        let answer: Value = self
            .http
            .post(&self.url)
            .json(review)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
        answer["response"].clone()
    }
}

/// The JSON patch of an answer.
fn patch_of(response: &Value) -> json_patch::Patch {
    assert_eq!(response["patchType"], "JSONPatch");
    serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().expect("a patch"))
            .unwrap(),
    )
    .unwrap()
}

/// The whole path the API server takes: HTTPS to the webhook's Service
/// name, the AdmissionReview fixture, the real injector behind it.
#[tokio::test]
async fn the_api_server_gets_the_patch_over_https() {
    let api = api_with_examples();
    let (client, _server) = api.client();
    let server = Webhook::start(PodInjector::new(client, InjectionConfig::default())).await;
    let review = review();
    let response = server.review(&review).await;
    assert_eq!(response["allowed"], true);
    let patch = patch_of(&response);
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    assert_eq!(
        sidecar(&pod)["image"],
        format!(
            "ghcr.io/warren-dev/warren-sidecar:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(
        outbox(&pod)["persistentVolumeClaim"]["claimName"],
        "warren-outbox-deployment-orders-api-0"
    );
}

/// A pod from an API server newer than this crate's Kubernetes types:
/// fields it does not know, at the spec's level, inside the app's
/// container, inside a volume the webhook leaves alone and in the
/// metadata. The patch is computed against the pod as sent, so applying
/// it keeps every one of them.
#[tokio::test]
async fn fields_newer_than_the_crate_survive_the_patch() {
    let api = api_with_examples();
    let (client, _server) = api.client();
    let server = Webhook::start(PodInjector::new(client, InjectionConfig::default())).await;
    let mut review = review();
    let object = &mut review["request"]["object"];
    object["metadata"]["futureMetadata"] = json!({"shard": "b", "weight": 3});
    object["spec"]["futureSchedulingHints"] = json!({"gangSize": 4, "preferSameRack": true});
    object["spec"]["containers"][0]["futureRestartRules"] =
        json!([{"action": "Restart", "exitCodes": {"operator": "In", "values": [42]}}]);
    object["spec"]["containers"][0]["env"] =
        json!([{"name": "MODE", "value": "fast", "futureEnvSource": {"kind": "Node"}}]);
    object["spec"]["volumes"][0]["futureVolumeFlag"] = json!("keep-me");
    let sent = object.clone();

    let response = server.review(&review).await;
    assert_eq!(response["allowed"], true, "{response}");
    let patch = patch_of(&response);
    let mut pod = sent.clone();
    json_patch::patch(&mut pod, &patch).unwrap();

    // Injected…
    sidecar(&pod);
    assert_eq!(
        outbox(&pod)["persistentVolumeClaim"]["claimName"],
        "warren-outbox-deployment-orders-api-0"
    );
    let app = &pod["spec"]["containers"][0];
    assert!(
        app["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "WARREN_URL"),
        "{app}"
    );
    // …and nothing the crate does not know is lost.
    assert_eq!(
        pod["metadata"]["futureMetadata"],
        sent["metadata"]["futureMetadata"]
    );
    assert_eq!(
        pod["spec"]["futureSchedulingHints"],
        sent["spec"]["futureSchedulingHints"]
    );
    assert_eq!(
        app["futureRestartRules"],
        sent["spec"]["containers"][0]["futureRestartRules"]
    );
    assert_eq!(
        app["env"][0],
        json!({"name": "MODE", "value": "fast", "futureEnvSource": {"kind": "Node"}})
    );
    let token = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "kube-api-access-x7k2p")
        .unwrap();
    assert_eq!(token["futureVolumeFlag"], "keep-me");
    // The patch never removes or rewrites what was sent: it only adds.
    let ops = serde_json::to_value(&patch).unwrap();
    for op in ops.as_array().unwrap() {
        let path = op["path"].as_str().unwrap();
        assert!(
            op["op"] != "remove" && !path.contains("future"),
            "the patch touches what it should keep: {op}"
        );
    }
}

/// A pod that did not opt in is allowed untouched, without being read
/// as a Pod: not even a body no Pod type could parse is refused, and
/// Kubernetes is not asked anything.
#[tokio::test]
async fn a_pod_that_did_not_opt_in_is_allowed_unread() {
    let api = api_with_examples();
    let (client, _server) = api.client();
    let server = Webhook::start(PodInjector::new(client, InjectionConfig::default())).await;
    let unparsable = json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": "plain", "namespace": "shop", "labels": {"app": "plain"}},
        "spec": {"containers": "one, from the future", "priority": "very high"}
    });
    let mut review = review();
    review["request"]["object"] = unparsable.clone();
    assert!(
        serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(unparsable.clone()).is_err(),
        "the body must not parse as a Pod for this test to mean anything"
    );
    let response = server.review(&review).await;
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("patch").is_none(), "{response}");

    // Opted out by the label, though annotated: the same.
    let mut opted_out = unparsable.clone();
    opted_out["metadata"]["labels"]["warren.dev/inject"] = json!("disabled");
    opted_out["metadata"]["annotations"] = json!({"warren.dev/inject": "enabled"});
    review["request"]["object"] = opted_out;
    let response = server.review(&review).await;
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("patch").is_none(), "{response}");
    assert!(api.log().is_empty(), "nothing asked of Kubernetes");

    // Opted in, the same body is refused with the reason: it cannot be
    // injected as it is.
    let mut opted_in = unparsable;
    opted_in["metadata"]["labels"]["warren.dev/inject"] = json!("enabled");
    review["request"]["object"] = opted_in;
    let response = server.review(&review).await;
    assert_eq!(response["allowed"], false, "{response}");
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.contains("cannot read the Pod"), "{message}");
}
