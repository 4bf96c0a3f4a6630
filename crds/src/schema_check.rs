//! Test helpers for the CRD schemas: find a property's schema, read its CEL
//! rules, and evaluate them the way the API server would (defaults applied
//! first, transition rules only when an old object is given).

use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::Value;

/// The `openAPIV3Schema` of `K`'s CRD, as JSON.
pub fn schema<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("a derived CRD has an openAPIV3Schema");
    serde_json::to_value(schema).expect("a schema serialises")
}

/// The schema of the property at `path` (`"spec.queue.name"`); `""` is the
/// root. Panics with the path when it does not exist.
pub fn node<'a>(schema: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .filter(|p| !p.is_empty())
        .fold(schema, |s, p| {
            s.pointer(&format!("/properties/{p}"))
                .unwrap_or_else(|| panic!("no property {p:?} on the way to {path:?}"))
        })
}

/// The `(rule, message)` pairs of a schema node's `x-kubernetes-validations`.
pub fn rules(node: &Value) -> Vec<(String, String)> {
    node.get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .map(|rules| {
            rules
                .iter()
                .map(|r| {
                    let text = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    (text("rule"), text("message"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Evaluates every CEL rule of `K`'s schema on `new` (an update from `old`
/// when given, else a create); the failure messages, `"<path>: <message>"`.
pub fn check<K: CustomResourceExt>(new: &Value, old: Option<&Value>) -> Result<(), Vec<String>> {
    Validator::new()
        .validate(&schema::<K>(), new, old)
        .map_err(|errors| errors.iter().map(|e| e.to_string()).collect())
}
