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
    let response = injector.admit(request(review.clone())).await;
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
    let response = injector.admit(request(again.clone())).await;
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
    let response = injector.admit(request(review.clone())).await;
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
    let response = injector.admit(request(review())).await;
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
    let response = injector.admit(request(bad)).await;
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
    let response = injector.admit(request(plain)).await;
    assert!(response.allowed && response.patch.is_none());

    let mut opted_out = review();
    opted_out["request"]["object"]["metadata"]["annotations"]["warren.dev/inject"] =
        json!("disabled");
    let response = injector.admit(request(opted_out)).await;
    assert!(response.allowed && response.patch.is_none());

    let mut update = review();
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = update["request"]["object"].clone();
    let response = injector.admit(request(update)).await;
    assert!(response.allowed && response.patch.is_none());
    assert!(api.all("persistentvolumeclaims").is_empty());
    assert!(
        api.log().iter().all(|s| s.method == http::Method::GET),
        "nothing written"
    );
}

/// The whole path the API server takes: HTTPS to the webhook's Service
/// name, the AdmissionReview fixture, the real injector behind it.
#[tokio::test]
async fn the_api_server_gets_the_patch_over_https() {
    let api = api_with_examples();
    let (client, _server) = api.client();
    let injector = Arc::new(PodInjector::new(client, InjectionConfig::default()));
    let handler: Handler = Arc::new(move |request| {
        let injector = injector.clone();
        Box::pin(async move { injector.admit(request).await })
    });
    let generated =
        certs::generate("warren-webhook", "warren-system", Duration::from_secs(3600)).unwrap();
    let served = Arc::new(
        ServerCerts::from_pem(generated.cert_pem.as_bytes(), generated.key_pem.as_bytes()).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(webhook::serve(listener, served, handler, async {
        let _ = stopped.await;
    }));
    let host = "warren-webhook.warren-system.svc";
    let http = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(generated.ca_pem.as_bytes()).unwrap())
        .resolve(host, addr)
        .build()
        .unwrap();
    let review = review();
    let answer: Value = http
        .post(format!("https://{host}:{}/mutate", addr.port()))
        .json(&review)
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
    let response = &answer["response"];
    assert_eq!(response["uid"], review["request"]["uid"]);
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch: json_patch::Patch = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
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
