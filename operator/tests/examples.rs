//! Every manifest in `examples/` reads into the types the operator works
//! with: ReliableQueues and RetryPolicies into Warren's (and the planner
//! accepts them), Secrets into Kubernetes', in one of the two broker Secret
//! formats. The schema side
//! (CRD `openAPIV3Schema`, Kubernetes' own schemas) is checked by
//! `scripts/validate-manifests`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use serde_json::Value;
use warren_crds::reliable_queue::ReliableQueue;
use warren_crds::retry_policy::RetryPolicy;
use warren_operator::plan::plan;

/// One YAML document of an example file.
struct Doc {
    /// `file#index`, for messages.
    at: String,
    value: Value,
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every document of every `examples/*.yaml`, in file order.
fn documents() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .expect("examples/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples found");
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (i, de) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let at = format!("{name}#{i}");
            let value = Value::deserialize(de).unwrap_or_else(|e| panic!("{at}: {e}"));
            assert!(value.is_object(), "{at}: not a manifest: {value}");
            docs.push(Doc { at, value });
        }
    }
    docs
}

fn kind(doc: &Doc) -> &str {
    doc.value["kind"].as_str().unwrap_or_default()
}

/// Paths of `original` that `round_trip` lacks: fields the type does not
/// know (a typo in an example would otherwise be dropped in silence).
fn unknown_fields(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(o), Value::Object(r)) => {
            for (k, v) in o {
                let here = format!("{path}.{k}");
                match r.get(k) {
                    Some(rv) => unknown_fields(v, rv, &here, out),
                    None => out.push(here),
                }
            }
        }
        (Value::Array(o), Value::Array(r)) => {
            for (i, (v, rv)) in o.iter().zip(r).enumerate() {
                unknown_fields(v, rv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Reads `doc` as `T`, refusing fields that `T` does not know.
fn try_read<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Doc) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut unknown = Vec::new();
    unknown_fields(&doc.value, &back, "", &mut unknown);
    if unknown.is_empty() {
        Ok(typed)
    } else {
        Err(format!("unknown fields {unknown:?}"))
    }
}

fn read<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Doc) -> T {
    try_read(doc).unwrap_or_else(|e| panic!("{}: {e}", doc.at))
}

#[test]
fn every_example_reads_into_its_type() {
    let docs = documents();
    let mut secrets = BTreeMap::new();
    let mut policies = BTreeMap::new();
    let mut queues = Vec::new();
    for doc in &docs {
        match kind(doc) {
            "ReliableQueue" => {
                assert_eq!(doc.value["apiVersion"], "warren.dev/v1alpha1", "{}", doc.at);
                queues.push((doc.at.clone(), read::<ReliableQueue>(doc)));
            }
            "RetryPolicy" => {
                assert_eq!(doc.value["apiVersion"], "warren.dev/v1alpha1", "{}", doc.at);
                let policy: RetryPolicy = read(doc);
                policy
                    .spec
                    .validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", doc.at));
                policies.insert(policy.metadata.name.clone().unwrap(), policy);
            }
            "Secret" => {
                assert_eq!(doc.value["apiVersion"], "v1", "{}", doc.at);
                let secret: Secret = read(doc);
                secrets.insert(
                    secret.metadata.name.clone().unwrap(),
                    (doc.at.clone(), secret),
                );
            }
            // Apps annotated for injection (`warren-operator inject`
            // checks them; `scripts/validate-manifests` validates them).
            "Deployment" => {
                read::<k8s_openapi::api::apps::v1::Deployment>(doc);
            }
            "StatefulSet" => {
                read::<k8s_openapi::api::apps::v1::StatefulSet>(doc);
            }
            other => panic!("{}: unexpected kind {other:?}", doc.at),
        }
    }
    assert!(
        queues.len() >= 2,
        "expected at least two ReliableQueue examples"
    );
    assert!(!policies.is_empty(), "expected a RetryPolicy example");

    // Every reference resolves within the examples.
    for (at, rq) in &queues {
        let secret = &rq.spec.broker.secret_name;
        assert!(
            secrets.contains_key(secret),
            "{at}: no example Secret {secret:?}"
        );
        if let Some(policy) = &rq.spec.retry_policy_ref {
            assert!(
                policies.contains_key(policy),
                "{at}: no example RetryPolicy {policy:?}"
            );
        }
    }
    // The planner takes every queue with its policy (or the default one).
    for (at, rq) in &queues {
        let policy = rq
            .spec
            .retry_policy_ref
            .as_ref()
            .map(|name| policies[name].spec.clone())
            .unwrap_or_default();
        plan(&rq.queue_name(), &rq.spec, &policy).unwrap_or_else(|e| panic!("{at}: {e}"));
    }
    // And every Secret is in a format the operator reads.
    for (at, secret) in secrets.values() {
        broker_secret_format(at, secret);
    }
}

/// Which of the two broker Secret formats `secret` is in.
fn broker_secret_format(at: &str, secret: &Secret) -> &'static str {
    let keys: Vec<&str> = secret
        .string_data
        .iter()
        .flat_map(|d| d.keys())
        .chain(secret.data.iter().flat_map(|d| d.keys()))
        .map(String::as_str)
        .collect();
    let value = |k: &str| {
        secret
            .string_data
            .as_ref()
            .and_then(|d| d.get(k).cloned())
            .unwrap_or_default()
    };
    if keys == ["uri"] {
        let uri = value("uri");
        assert!(
            uri.starts_with("amqp://") || uri.starts_with("amqps://"),
            "{at}: uri {uri:?} is not an AMQP URI"
        );
        "uri"
    } else {
        for k in ["username", "password", "host", "port"] {
            assert!(keys.contains(&k), "{at}: neither `uri` alone nor key {k:?}");
        }
        let port = value("port");
        assert!(port.parse::<u16>().is_ok(), "{at}: port {port:?}");
        "default-user"
    }
}

#[test]
fn the_examples_show_both_secret_formats_and_a_defaults_only_queue() {
    let docs = documents();
    let formats: Vec<&str> = docs
        .iter()
        .filter(|d| kind(d) == "Secret")
        .map(|d| broker_secret_format(&d.at, &read::<Secret>(d)))
        .collect();
    assert!(formats.contains(&"uri"), "{formats:?}");
    assert!(formats.contains(&"default-user"), "{formats:?}");

    // One ReliableQueue gives only what has no default.
    let minimal = docs.iter().filter(|d| kind(d) == "ReliableQueue").any(|d| {
        let spec = d.value["spec"].as_object().unwrap();
        let mut keys: Vec<&str> = spec.keys().map(String::as_str).collect();
        keys.sort();
        keys == ["broker", "exchange"]
            && d.value["spec"]["broker"].as_object().unwrap().len() == 1
            && d.value["spec"]["exchange"].as_object().unwrap().len() == 1
    });
    assert!(
        minimal,
        "no ReliableQueue example that relies on the defaults"
    );
}

#[test]
fn a_typo_in_a_manifest_is_caught() {
    // The check above would be worthless if unknown fields slipped through.
    let doc = Doc {
        at: "inline".into(),
        value: serde_json::json!({
            "apiVersion": "warren.dev/v1alpha1",
            "kind": "ReliableQueue",
            "metadata": {"name": "orders"},
            "spec": {
                "broker": {"secretName": "s"},
                "exchange": {"name": "shop"},
                "queue": {"deliverylimit": 5},
            },
        }),
    };
    let err = try_read::<ReliableQueue>(&doc).unwrap_err();
    assert_eq!(err, r#"unknown fields [".spec.queue.deliverylimit"]"#);
}
