//! The webhook's answer to a Pod CREATE: the pod with the sidecar
//! ([`crate::inject`]) and an outbox claim ([`crate::pool`]), as a JSON
//! patch.
//!
//! A pod that asks for injection but cannot get it (a bad annotation, a
//! ReliableQueue that does not exist, no claim to be had) is refused with
//! the reason, rather than started without a durable outbox. Anything else
//! (other kinds, other operations, pods that did not opt in) is allowed
//! unchanged; whether a pod opted in is read from the object as the API
//! server sent it, so such a pod is never parsed. The patch is computed
//! against that object too, so fields newer than this crate's Kubernetes
//! types survive it. On a dry run no claim is taken: the answer shows the
//! sidecar with a placeholder volume.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::{Client, ResourceExt};
use serde_json::Value;
use warren_crds::reliable_queue::ReliableQueue;
use warren_crds::retry_policy::RetryPolicy;

use crate::inject::{self, InjectionConfig, Outcome, Resources};
use crate::pool::{ClaimPool, claim_source};

/// Answers Pod admissions.
#[derive(Clone)]
pub struct PodInjector {
    client: Client,
    config: InjectionConfig,
    pool: ClaimPool,
}

impl PodInjector {
    pub fn new(client: Client, config: InjectionConfig) -> Self {
        Self {
            pool: ClaimPool::new(client.clone(), config.clone()),
            client,
            config,
        }
    }

    /// The ReliableQueues a pod names and the RetryPolicies they refer to.
    async fn resources(&self, namespace: &str, pod: &Pod) -> Result<Resources, String> {
        let request = match inject::parse_request(pod.labels(), pod.annotations()) {
            Ok(Some(r)) => r,
            // Errors are reported by `inject` itself.
            _ => return Ok(Resources::default()),
        };
        let queues: Api<ReliableQueue> = Api::namespaced(self.client.clone(), namespace);
        let policies: Api<RetryPolicy> = Api::namespaced(self.client.clone(), namespace);
        let mut resources = Resources::default();
        for name in &request.queues {
            let Some(rq) = queues
                .get_opt(name)
                .await
                .map_err(|e| format!("cannot read ReliableQueue {name:?}: {e}"))?
            else {
                continue;
            };
            if let Some(p) = rq.spec.retry_policy_ref.clone()
                && !resources.policies.contains_key(&p)
                && let Some(policy) = policies
                    .get_opt(&p)
                    .await
                    .map_err(|e| format!("cannot read RetryPolicy {p:?}: {e}"))?
            {
                resources.policies.insert(p, policy);
            }
            resources.queues.insert(name.clone(), rq);
        }
        Ok(resources)
    }

    /// The pod as it should be created, or why it cannot be.
    pub async fn mutate(
        &self,
        namespace: &str,
        mut pod: Pod,
        dry_run: bool,
    ) -> Result<(Pod, Outcome), String> {
        let resources = self.resources(namespace, &pod).await?;
        let spec = pod.spec.as_mut().ok_or("the Pod has no spec")?;
        let outcome = inject::inject(&mut pod.metadata, spec, &resources, &self.config, true)
            .map_err(|e| format!("warren: {e}"))?;
        if outcome == Outcome::Skipped {
            return Ok((pod, outcome));
        }
        let spec = pod.spec.as_mut().expect("checked above");
        if inject::needs_claim(&pod.metadata, spec) && !dry_run {
            let source = claim_source(&pod.metadata).map_err(|e| format!("warren: {e}"))?;
            let env = spec
                .init_containers
                .iter()
                .flatten()
                .chain(spec.containers.iter())
                .find(|c| c.name == inject::CONTAINER)
                .and_then(|c| c.env.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.name.starts_with("WARREN_BROKER_"))
                .collect::<Vec<_>>();
            let claim = self
                .pool
                .acquire(namespace, &source, &env, Timestamp::now())
                .await
                .map_err(|e| format!("warren: no outbox claim: {e}"))?;
            inject::bind_claim(&mut pod.metadata, spec, &claim);
        }
        Ok((pod, outcome))
    }

    /// The admission answer. `object` is the request's object exactly as
    /// the API server sent it: whether the pod opted in is read from it
    /// first, so a pod that did not is allowed untouched without being
    /// parsed; the patch is computed against it, so fields this crate's
    /// `Pod` does not know are kept (see [`merge_typed_change`]).
    pub async fn admit(
        &self,
        request: AdmissionRequest<DynamicObject>,
        object: Option<Value>,
    ) -> AdmissionResponse {
        let response = AdmissionResponse::from(&request);
        if request.kind.kind != "Pod" || request.operation != Operation::Create {
            return response;
        }
        let Some(raw) = object else {
            return response.deny("warren: the admission request carries no Pod");
        };
        if !asks_for_injection(&raw) {
            return response;
        }
        let pod: Pod = match serde_json::from_value(raw.clone()) {
            Ok(p) => p,
            Err(e) => return response.deny(format!("warren: cannot read the Pod: {e}")),
        };
        // What the typed Pod serialises to before the change: the base the
        // change is measured against.
        let before = serde_json::to_value(&pod).expect("a Pod serialises");
        let namespace = request
            .namespace
            .clone()
            .or_else(|| pod.namespace())
            .unwrap_or_else(|| "default".into());
        let who = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.clone())
            .unwrap_or_default();
        match self.mutate(&namespace, pod, request.dry_run).await {
            Ok((_, Outcome::Skipped)) => response,
            Ok((pod, Outcome::Injected)) => {
                let after = serde_json::to_value(&pod).expect("a Pod serialises");
                let merged = merge_typed_change(&raw, &before, &after);
                let patch = json_patch::diff(&raw, &merged);
                tracing::info!(%namespace, pod = %who, claim = ?pod.labels().get(inject::CLAIM_LABEL), "sidecar injected");
                match response.with_patch(patch) {
                    Ok(r) => r,
                    Err(e) => AdmissionResponse::from(&request)
                        .deny(format!("warren: cannot encode the patch: {e}")),
                }
            }
            Err(message) => {
                tracing::warn!(%namespace, pod = %who, %message, "pod refused");
                response.deny(message)
            }
        }
    }
}

/// The string entries of `metadata.<field>` of a raw object.
fn string_map(raw: &Value, field: &str) -> BTreeMap<String, String> {
    raw.pointer(&format!("/metadata/{field}"))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a raw pod asks for the sidecar (or asks in a way that is an
/// error, which injection then reports): read from its labels and
/// annotations only.
pub fn asks_for_injection(raw: &Value) -> bool {
    inject::opted_in(&string_map(raw, "labels"), &string_map(raw, "annotations")).unwrap_or(true)
}

/// The raw object with the change from `before` to `after` applied, where
/// `before` and `after` are a typed rendering of `raw` before and after a
/// mutation: a three-way merge.
///
/// - A value unchanged between `before` and `after` is taken from `raw`
///   as it is, with whatever fields the typed rendering dropped.
/// - Objects are merged key by key: keys only `raw` has (unknown to the
///   typed rendering) are kept, keys the change removed are removed, keys
///   it added are added.
/// - Lists whose elements all carry a distinct `name` (containers,
///   volumes, env, ports…) are matched by name, so the unknown fields of
///   an element that moved or changed survive; the order is `after`'s.
///   Other lists of the same length are merged element by element; any
///   other changed list is `after`'s.
pub fn merge_typed_change(raw: &Value, before: &Value, after: &Value) -> Value {
    if before == after {
        return raw.clone();
    }
    match (raw, before, after) {
        (Value::Object(r), Value::Object(b), Value::Object(a)) => {
            let mut out = r.clone();
            for key in b.keys() {
                if !a.contains_key(key) {
                    out.remove(key);
                }
            }
            for (key, new) in a {
                let merged = match (r.get(key), b.get(key)) {
                    (Some(rv), Some(bv)) => merge_typed_change(rv, bv, new),
                    _ => new.clone(),
                };
                out.insert(key.clone(), merged);
            }
            Value::Object(out)
        }
        (Value::Array(r), Value::Array(b), Value::Array(a)) => {
            match (names(r), names(b), names(a)) {
                (Some(rn), Some(bn), Some(an)) => Value::Array(
                    a.iter()
                        .zip(&an)
                        .map(|(new, name)| {
                            let old = bn.iter().position(|n| n == name).map(|i| &b[i]);
                            let sent = rn.iter().position(|n| n == name).map(|i| &r[i]);
                            match (sent, old) {
                                (Some(rv), Some(bv)) => merge_typed_change(rv, bv, new),
                                _ => new.clone(),
                            }
                        })
                        .collect(),
                ),
                _ if r.len() == b.len() && b.len() == a.len() => Value::Array(
                    r.iter()
                        .zip(b)
                        .zip(a)
                        .map(|((rv, bv), av)| merge_typed_change(rv, bv, av))
                        .collect(),
                ),
                _ => after.clone(),
            }
        }
        _ => after.clone(),
    }
}

/// The `name` of each element, if every element is an object with a
/// string `name` and no two share one.
fn names(list: &[Value]) -> Option<Vec<&str>> {
    let names: Vec<&str> = list
        .iter()
        .map(|v| v.get("name").and_then(Value::as_str))
        .collect::<Option<_>>()?;
    let distinct: std::collections::BTreeSet<&&str> = names.iter().collect();
    (distinct.len() == names.len()).then_some(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_survive_a_typed_change() {
        let raw = json!({
            "metadata": {"name": "p", "futureMeta": {"x": 1}, "labels": {"a": "b"}},
            "spec": {
                "futureSpec": true,
                "containers": [
                    {"name": "app", "image": "i", "futureField": "keep",
                     "env": [{"name": "A", "value": "1", "futureEnv": 2}]},
                    {"name": "other", "image": "j"}
                ],
                "volumes": [{"name": "v", "emptyDir": {}, "futureVolume": 3}]
            }
        });
        // The typed rendering: the unknown fields are gone.
        let before = json!({
            "metadata": {"name": "p", "labels": {"a": "b"}},
            "spec": {
                "containers": [
                    {"name": "app", "image": "i", "env": [{"name": "A", "value": "1"}]},
                    {"name": "other", "image": "j"}
                ],
                "volumes": [{"name": "v", "emptyDir": {}}]
            }
        });
        // A sidecar first, an env var added, a volume replaced, a label
        // removed and one added.
        let after = json!({
            "metadata": {"name": "p", "labels": {"c": "d"}},
            "spec": {
                "initContainers": [{"name": "sidecar", "image": "s"}],
                "containers": [
                    {"name": "app", "image": "i",
                     "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                    {"name": "other", "image": "j"}
                ],
                "volumes": [{"name": "w", "emptyDir": {}}, {"name": "v", "persistentVolumeClaim": {"claimName": "c"}}]
            }
        });
        let merged = merge_typed_change(&raw, &before, &after);
        assert_eq!(
            merged,
            json!({
                "metadata": {"name": "p", "futureMeta": {"x": 1}, "labels": {"c": "d"}},
                "spec": {
                    "futureSpec": true,
                    "initContainers": [{"name": "sidecar", "image": "s"}],
                    "containers": [
                        {"name": "app", "image": "i", "futureField": "keep",
                         "env": [{"name": "A", "value": "1", "futureEnv": 2}, {"name": "B", "value": "2"}]},
                        {"name": "other", "image": "j"}
                    ],
                    "volumes": [
                        {"name": "w", "emptyDir": {}},
                        {"name": "v", "persistentVolumeClaim": {"claimName": "c"}, "futureVolume": 3}
                    ]
                }
            })
        );
        // Applying the patch to what the API server sent gives exactly that.
        let mut patched = raw.clone();
        json_patch::patch(&mut patched, &json_patch::diff(&raw, &merged)).unwrap();
        assert_eq!(patched, merged);
        // No change: the raw object as it is.
        assert_eq!(merge_typed_change(&raw, &before, &before), raw);
    }

    #[test]
    fn lists_without_names_merge_by_position_or_are_replaced() {
        let raw = json!({"ports": [{"containerPort": 80, "future": 1}]});
        let before = json!({"ports": [{"containerPort": 80}]});
        let after = json!({"ports": [{"containerPort": 81}]});
        assert_eq!(
            merge_typed_change(&raw, &before, &after),
            json!({"ports": [{"containerPort": 81, "future": 1}]})
        );
        let longer = json!({"ports": [{"containerPort": 80}, {"containerPort": 81}]});
        assert_eq!(merge_typed_change(&raw, &before, &longer), longer);
    }

    #[test]
    fn the_opt_in_is_read_from_the_raw_labels_and_annotations() {
        let pod = |labels: Value, annotations: Value| json!({"metadata": {"labels": labels, "annotations": annotations}, "spec": "not a PodSpec"});
        assert!(asks_for_injection(&pod(
            json!({"warren.dev/inject": "enabled"}),
            json!({})
        )));
        assert!(asks_for_injection(&pod(
            json!({}),
            json!({"warren.dev/inject": "enabled"})
        )));
        // An invalid value is for injection to report.
        assert!(asks_for_injection(&pod(
            json!({}),
            json!({"warren.dev/inject": "yes"})
        )));
        assert!(!asks_for_injection(&pod(json!({"app": "x"}), json!({}))));
        assert!(!asks_for_injection(&json!({"metadata": {}})));
        assert!(!asks_for_injection(&pod(
            json!({"warren.dev/inject": "enabled"}),
            json!({"warren.dev/inject": "disabled"})
        )));
    }
}
