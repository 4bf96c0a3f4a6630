//! `warren-operator inject -f` as a user runs it on the example apps and
//! the fixtures: what it adds, that a second run adds nothing, and that a
//! workload it cannot inject is an error with nothing printed.
//! (`scripts/validate-manifests` validates the same output against the
//! Kubernetes schemas.)

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn inject(files: &[&Path]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren-operator"));
    cmd.arg("inject");
    for f in files {
        cmd.arg("-f").arg(f);
    }
    let out = cmd.output().expect("run warren-operator inject");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} in the output"))
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {container}"))
}

#[test]
fn example_apps_get_the_sidecar_outbox_and_config() {
    let orders = root().join("examples/orders.yaml");
    let apps = root().join("examples/orders-app.yaml");
    let (ok, out, err) = inject(&[&orders, &apps]);
    assert!(ok, "{err}");
    assert!(
        err.contains("Deployment/orders-api: sidecar injected"),
        "{err}"
    );
    assert!(
        err.contains("StatefulSet/order-ledger: sidecar injected"),
        "{err}"
    );
    assert!(
        !err.contains("annotation only"),
        "the examples carry the opt-in label: {err}"
    );
    let docs = docs(&out);
    // Every input document is printed, Warren's own unchanged.
    assert_eq!(docs.len(), 5);
    let rq = find(&docs, "ReliableQueue", "orders");
    assert_eq!(rq["spec"]["retryPolicyRef"], "orders-retry");

    // The Deployment: a native sidecar, first among the init containers,
    // consuming "orders" for the app; a placeholder outbox volume that the
    // webhook binds to a pool claim at Pod CREATE.
    let d = find(&docs, "Deployment", "orders-api");
    let template = &d["spec"]["template"];
    assert_eq!(
        template["metadata"]["annotations"]["warren.dev/injected"],
        "true"
    );
    let sidecar = &template["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "warren-sidecar");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(
        sidecar["image"],
        format!(
            "ghcr.io/warren-dev/warren-sidecar:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    let config: Value = serde_json::from_str(
        env(sidecar, "WARREN_CONFIG_JSON")["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(config["app"]["url"], "http://127.0.0.1:8080/messages");
    assert_eq!(config["queues"][0]["name"], "orders");
    assert_eq!(config["queues"][0]["parkingLot"], "orders.parked");
    assert_eq!(
        config["queues"][0]["retryPolicy"]["maxRetries"], 8,
        "from RetryPolicy orders-retry"
    );
    let secret = &env(sidecar, "WARREN_BROKER_PASSWORD")["valueFrom"]["secretKeyRef"];
    assert_eq!(secret["name"], "shop-rabbit-default-user");
    assert_eq!(secret["key"], "password");
    let volumes = template["spec"]["volumes"].as_array().unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["name"] == "warren-outbox" && v["emptyDir"].is_object())
    );
    let app = &template["spec"]["containers"][0];
    assert_eq!(env(app, "WARREN_URL")["value"], "http://127.0.0.1:7171");
    assert_eq!(template["spec"]["terminationGracePeriodSeconds"], 45);

    // The StatefulSet: one claim per ordinal through a claim template, no
    // consumer config (it only publishes).
    let s = find(&docs, "StatefulSet", "order-ledger");
    let claim = &s["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"], "warren-outbox");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "1Gi");
    assert!(
        s["spec"]["template"]["spec"]["volumes"].is_null(),
        "the template provides the volume"
    );
    let sidecar = &s["spec"]["template"]["spec"]["initContainers"][0];
    assert!(
        sidecar["env"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["name"] != "WARREN_CONFIG_JSON")
    );

    // Injecting the output again changes nothing.
    let dir = tempfile::tempdir().unwrap();
    let once = dir.path().join("once.yaml");
    std::fs::write(&once, &out).unwrap();
    let (ok, twice, err) = inject(&[&once]);
    assert!(ok, "{err}");
    assert_eq!(docs, self::docs(&twice));
}

#[test]
fn a_pod_with_every_variant_annotation() {
    let orders = root().join("examples/orders.yaml");
    let pod = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject/pod.yaml");
    let (ok, out, err) = inject(&[&orders, &pod]);
    assert!(ok, "{err}");
    let docs = docs(&out);
    let p = find(&docs, "Pod", "orders-debug");
    // Opted in by the annotation alone: the webhook would never see such a
    // pod, so the output carries the label, and stderr says so.
    assert_eq!(p["metadata"]["labels"]["warren.dev/inject"], "enabled");
    assert!(
        err.contains(
            "Pod/orders-debug: opted in by annotation only; labelled warren.dev/inject=enabled"
        ),
        "{err}"
    );
    assert!(p["spec"]["initContainers"].is_null(), "container mode");
    let sidecar = &p["spec"]["containers"][1];
    assert_eq!(sidecar["name"], "warren-sidecar");
    assert!(sidecar["restartPolicy"].is_null());
    assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
    let volume = &p["spec"]["volumes"][0];
    assert_eq!(volume["name"], "warren-outbox");
    assert!(volume["emptyDir"].is_object());
    assert_eq!(
        p["spec"]["terminationGracePeriodSeconds"], 45,
        "raised so the sidecar can drain"
    );
    let config: Value = serde_json::from_str(
        env(sidecar, "WARREN_CONFIG_JSON")["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(config["app"]["url"], "http://127.0.0.1:9000/");
    let cm = find(&docs, "ConfigMap", "untouched");
    assert_eq!(cm["data"]["key"], "value");
}

#[test]
fn a_workload_that_cannot_be_injected_is_an_error_and_nothing_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.yaml");
    std::fs::write(
        &file,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: lost}\nspec:\n  selector: {matchLabels: {app: lost}}\n  template:\n    metadata:\n      labels: {app: lost}\n      annotations: {warren.dev/inject: enabled, warren.dev/queues: nowhere}\n    spec:\n      containers: [{name: app, image: x}]\n",
    )
    .unwrap();
    let (ok, out, err) = inject(&[&file]);
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("Deployment lost") && err.contains("ReliableQueue \"nowhere\""),
        "{err}"
    );

    let (ok, _, err) = inject(&[&dir.path().join("missing.yaml")]);
    assert!(!ok);
    assert!(err.contains("cannot read"), "{err}");
}

/// A Deployment consuming "orders" with the consumer settings `annotations`
/// (YAML lines under the template's annotations).
fn tuned_deployment(dir: &Path, annotations: &str) -> std::path::PathBuf {
    let file = dir.join("tuned.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: tuned}}\nspec:\n  selector: {{matchLabels: {{app: tuned}}}}\n  template:\n    metadata:\n      labels: {{app: tuned, warren.dev/inject: enabled}}\n      annotations:\n        warren.dev/inject: enabled\n        warren.dev/queues: orders\n        warren.dev/app-port: \"8080\"\n{annotations}    spec:\n      containers: [{{name: app, image: x}}]\n"
        ),
    )
    .unwrap();
    file
}

#[test]
fn consumer_settings_annotations_reach_the_rendered_config() {
    let orders = root().join("examples/orders.yaml");
    let dir = tempfile::tempdir().unwrap();
    let file = tuned_deployment(
        dir.path(),
        "        warren.dev/consumer-prefetch: \"40\"\n        warren.dev/consumer-concurrency: \"3\"\n        warren.dev/delivery-timeout: 45s\n",
    );
    let (ok, out, err) = inject(&[&orders, &file]);
    assert!(ok, "{err}");
    let docs = docs(&out);
    let d = find(&docs, "Deployment", "tuned");
    let sidecar = &d["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "warren-sidecar");
    let config: Value = serde_json::from_str(
        env(sidecar, "WARREN_CONFIG_JSON")["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(config["app"]["concurrency"], 3, "{config}");
    assert_eq!(config["app"]["timeout"], "45s", "{config}");
    assert_eq!(config["queues"][0]["name"], "orders");
    assert_eq!(config["queues"][0]["prefetch"], 40, "{config}");

    // Out of range: refused, naming the annotation and the range.
    let file = tuned_deployment(dir.path(), "        warren.dev/consumer-prefetch: \"0\"\n");
    let (ok, out, err) = inject(&[&orders, &file]);
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("Deployment tuned")
            && err.contains(
                "annotation warren.dev/consumer-prefetch: \"0\" is not a whole number from 1 to 65535"
            ),
        "{err}"
    );
}
