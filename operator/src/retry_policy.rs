//! The RetryPolicy controller: checks each policy as the planner would and
//! writes what it found into the policy's status.
//!
//! - `status.conditions`: one condition `Valid`, `True` (reason `Valid`) or
//!   `False` (reason `InvalidSpec`, the planner's own refusal as message),
//!   with `observedGeneration` and a `lastTransitionTime` that only moves
//!   when the condition's status does;
//! - `status.tiers`: the delay tiers the plan of a queue using the policy
//!   creates (`ttlTiers`), written as the tier queues' names end (`4s`);
//! - `status.observedGeneration`.
//!
//! The status is a pure function of the spec ([`status_for`]), written by
//! server-side apply under the field manager `warren-operator`, and only
//! when it differs from what is stored. The controller is triggered by
//! generation changes only, so its own status writes never trigger it.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use warren_crds::names;
use warren_crds::reliable_queue::Condition;
use warren_crds::retry::DelayStrategy;
use warren_crds::retry_policy::{RetryPolicy, RetryPolicyStatus};

use crate::controller::{Context, FIELD_MANAGER};

/// The condition this controller keeps.
pub const VALID: &str = "Valid";

/// Why writing a RetryPolicy's status failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the RetryPolicy has no namespace")]
    NoNamespace,
}

impl Error {
    /// A fixed label per kind, for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "retry_policy_kube",
            Error::NoNamespace => "retry_policy_no_namespace",
        }
    }
}

/// The status `policy` should have; `now` (RFC 3339) becomes the
/// condition's transition time when its status changes.
pub fn status_for(policy: &RetryPolicy, now: &str) -> RetryPolicyStatus {
    let generation = policy.metadata.generation;
    let spec = &policy.spec;
    let (ok, reason, message, tiers) = match spec.validate() {
        Err(e) => (
            "False",
            "InvalidSpec",
            format!("invalid retry policy: {e}"),
            Vec::new(),
        ),
        Ok(()) => match spec.delay_strategy {
            DelayStrategy::TtlTiers => {
                let tiers: Vec<String> =
                    spec.tiers().into_iter().map(names::format_delay).collect();
                let message = if tiers.is_empty() {
                    "ttlTiers: no delay tiers (maxRetries is 0: failures are parked at once)"
                        .to_owned()
                } else {
                    format!(
                        "ttlTiers: {} delay tier{} ({})",
                        tiers.len(),
                        if tiers.len() == 1 { "" } else { "s" },
                        tiers.join(", ")
                    )
                };
                ("True", "Valid", message, tiers)
            }
            DelayStrategy::DelayedMessageExchange => (
                "True",
                "Valid",
                format!(
                    "delayedMessageExchange: delays from {} to {}, no delay tiers",
                    spec.backoff.initial, spec.backoff.max
                ),
                Vec::new(),
            ),
        },
    };
    let previous = policy
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.kind == VALID));
    let last_transition_time = match previous {
        Some(p) if p.status == ok => p.last_transition_time.clone(),
        _ => Some(now.to_owned()),
    };
    RetryPolicyStatus {
        observed_generation: generation,
        conditions: vec![Condition {
            kind: VALID.into(),
            status: ok.into(),
            reason: reason.into(),
            message,
            last_transition_time,
            observed_generation: generation,
        }],
        tiers,
    }
}

/// Whether `new` differs from the stored status (a write is needed).
pub fn changed(stored: Option<&RetryPolicyStatus>, new: &RetryPolicyStatus) -> bool {
    stored != Some(new)
}

/// Writes the status of one RetryPolicy when it changed.
pub async fn reconcile(policy: Arc<RetryPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = policy.namespace().ok_or(Error::NoNamespace)?;
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let status = status_for(&policy, &now);
    if !changed(policy.status.as_ref(), &status) {
        return Ok(Action::await_change());
    }
    let api: Api<RetryPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "RetryPolicy",
        "status": status,
    });
    api.patch_status(
        &policy.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    let valid = &status.conditions[0];
    tracing::info!(
        namespace = %ns,
        name = %policy.name_any(),
        valid = %valid.status,
        tiers = ?status.tiers,
        "RetryPolicy status written"
    );
    Ok(Action::await_change())
}

/// Retries a failed status write and counts the failure.
pub fn error_policy(policy: Arc<RetryPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %policy.name_any(), %error, "RetryPolicy status not written");
    ctx.metrics.reconcile_error(error.metric_label());
    Action::requeue(ctx.retry)
}

/// Runs the RetryPolicy controller until `shutdown` resolves. Only new
/// generations (and the first sight of each policy) trigger a reconcile:
/// status writes do not.
pub async fn run(
    client: kube::Client,
    ctx: Arc<Context>,
    scope: crate::controller::Scope,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::StreamExt;
    use futures::future::FutureExt;
    use kube::runtime::{Controller, WatchStreamExt, predicates, reflector, watcher};
    let shutdown = shutdown.shared();
    let controllers = scope
        .apis::<RetryPolicy>(&client)
        .into_iter()
        .map(|policies| {
            let (reader, writer) = reflector::store();
            let trigger = watcher(policies, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .applied_objects()
                .predicate_filter(predicates::generation, Default::default());
            Controller::for_stream(trigger, reader)
                .graceful_shutdown_on(shutdown.clone())
                .run(reconcile, error_policy, ctx.clone())
                .for_each(|_| async {})
        });
    futures::future::join_all(controllers).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_crds::retry::RetryPolicySpec;

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-01T00:05:00Z";

    fn policy(spec: serde_json::Value, generation: i64) -> RetryPolicy {
        let spec: RetryPolicySpec = serde_json::from_value(spec).unwrap();
        let mut p = RetryPolicy::new("standard", spec);
        p.metadata.namespace = Some("shop".into());
        p.metadata.generation = Some(generation);
        p
    }

    #[test]
    fn a_valid_policy_lists_the_tiers_the_plan_creates() {
        let p = policy(
            json!({"maxRetries": 6, "backoff": {"initial": "500ms", "max": "4s"}}),
            3,
        );
        let s = status_for(&p, T0);
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.tiers, ["500ms", "1s", "2s", "4s"]);
        let c = &s.conditions[0];
        assert_eq!(
            (c.kind.as_str(), c.status.as_str(), c.reason.as_str()),
            ("Valid", "True", "Valid")
        );
        assert_eq!(c.message, "ttlTiers: 4 delay tiers (500ms, 1s, 2s, 4s)");
        assert_eq!(c.observed_generation, Some(3));
        assert_eq!(c.last_transition_time.as_deref(), Some(T0));

        // The tiers are the delay queues the planner declares for a queue.
        let rq: warren_crds::reliable_queue::ReliableQueueSpec = serde_json::from_value(
            json!({"broker": {"secretName": "b"}, "exchange": {"name": "orders"}}),
        )
        .unwrap();
        let topology = crate::plan::plan("orders", &rq, &p.spec).unwrap();
        let planned: Vec<String> = topology
            .tier_queues()
            .iter()
            .map(|q| q.strip_prefix("orders.retry.").unwrap().to_owned())
            .collect();
        assert_eq!(planned, s.tiers);
    }

    #[test]
    fn the_default_policy_and_its_edge_cases() {
        let s = status_for(&policy(json!({}), 1), T0);
        assert_eq!(s.tiers, ["1s", "2s", "4s", "8s", "16s"]);
        let none = status_for(&policy(json!({"maxRetries": 0}), 1), T0);
        assert!(none.tiers.is_empty());
        assert_eq!(none.conditions[0].status, "True");
        assert!(
            none.conditions[0].message.contains("no delay tiers"),
            "{:?}",
            none.conditions[0]
        );
        let dme = status_for(
            &policy(
                json!({"delayStrategy": "delayedMessageExchange", "backoff": {"max": "1m"}}),
                1,
            ),
            T0,
        );
        assert!(dme.tiers.is_empty(), "{dme:?}");
        assert_eq!(dme.conditions[0].status, "True");
        assert_eq!(
            dme.conditions[0].message,
            "delayedMessageExchange: delays from 1s to 1m, no delay tiers"
        );
    }

    #[test]
    fn an_invalid_policy_is_not_valid_with_the_planners_reason() {
        let mut p = policy(json!({}), 2);
        p.spec.backoff.multiplier = 0.5;
        let s = status_for(&p, T0);
        let c = &s.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "InvalidSpec")
        );
        let planner = crate::plan::plan(
            "orders",
            &serde_json::from_value(
                json!({"broker": {"secretName": "b"}, "exchange": {"name": "orders"}}),
            )
            .unwrap(),
            &p.spec,
        )
        .unwrap_err();
        assert_eq!(c.message, planner.to_string());
        assert!(c.message.contains("multiplier"), "{}", c.message);
        assert!(s.tiers.is_empty());
        assert_eq!(s.observed_generation, Some(2));

        let mut p = policy(json!({}), 2);
        p.spec.max_retries = 101;
        let c = &status_for(&p, T0).conditions[0];
        assert_eq!(c.status, "False");
        assert!(
            c.message.contains("maxRetries must be at most 100"),
            "{c:?}"
        );
    }

    #[test]
    fn an_unchanged_policy_needs_no_write() {
        let mut p = policy(json!({"maxRetries": 2}), 1);
        let first = status_for(&p, T0);
        assert!(changed(None, &first));
        p.status = Some(first.clone());
        // Looked at again later: same status, same transition time.
        let again = status_for(&p, T1);
        assert_eq!(again, first);
        assert!(!changed(p.status.as_ref(), &again));

        // A new generation with the same verdict: written, transition kept.
        p.metadata.generation = Some(2);
        p.spec.max_retries = 3;
        let next = status_for(&p, T1);
        assert!(changed(p.status.as_ref(), &next));
        assert_eq!(next.tiers, ["1s", "2s", "4s"]);
        assert_eq!(next.conditions[0].last_transition_time.as_deref(), Some(T0));
        p.status = Some(next);

        // Valid becomes False: the transition time moves.
        p.metadata.generation = Some(3);
        p.spec.backoff.jitter = 2.0;
        let bad = status_for(&p, T1);
        assert_eq!(bad.conditions[0].status, "False");
        assert_eq!(bad.conditions[0].last_transition_time.as_deref(), Some(T1));
    }
}
