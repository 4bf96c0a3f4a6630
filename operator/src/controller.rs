//! The Kubernetes controller: reconciles ReliableQueues into broker
//! topology and reports what it found.
//!
//! - Watches ReliableQueues and the RetryPolicies they refer to (a policy
//!   change re-reconciles every queue using it). A status write does not
//!   trigger a reconcile (see [`trigger_hash`]); Secrets are read, never
//!   listed or watched.
//! - Each reconcile resolves the broker Secret and the RetryPolicy, plans,
//!   applies through the management API and writes the status with
//!   server-side apply (field manager `warren-operator`): conditions
//!   `BrokerReachable`, `TopologyReady` and `Ready` with the broker's own
//!   text on failure, `observedGeneration`, the owned object names and live
//!   counts. Events are published when `Ready` changes.
//! - A periodic re-check (every `requeue` while ready) repairs drift, such
//!   as a queue deleted in the management UI; a failing queue is retried
//!   sooner, with a delay that grows with the length of a broker outage.
//! - The finalizer `warren.dev/cleanup` honours `deletionPolicy`: `Retain`
//!   leaves the broker alone; `Delete` removes what the queue owns, but
//!   keeps (and keeps the finalizer on) a queue that still holds messages
//!   unless the resource carries `warren.dev/force-delete: "true"`. A
//!   deletion never waits for ever for a broker it cannot ask: without the
//!   Secret it lets go at once, with an unreachable broker after
//!   [`CLEANUP_GRACE`], and says in an event what it left there.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use warren_crds::reliable_queue::{
    Condition, Counts, DeletionPolicy, OwnedObjects, ReliableQueue, ReliableQueueStatus,
};
use warren_crds::retry::RetryPolicySpec;
use warren_crds::retry_policy::RetryPolicy;

use crate::apply::{Broker, BrokerError};
use crate::broker_url::BrokerUrl;
use crate::metrics::Metrics;
use crate::plan::{self, Topology};

/// The finalizer Warren puts on every ReliableQueue.
pub const FINALIZER: &str = "warren.dev/cleanup";
/// Field manager of the status writes.
pub const FIELD_MANAGER: &str = "warren-operator";
/// `"true"` lets `deletionPolicy: Delete` drop queues that hold messages.
pub const FORCE_DELETE: &str = "warren.dev/force-delete";

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("cleanup blocked: {0}")]
    CleanupBlocked(String),
    #[error("the ReliableQueue has no namespace")]
    NoNamespace,
}

impl Error {
    /// A fixed label per kind, for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::CleanupBlocked(_) => "cleanup_blocked",
            Error::NoNamespace => "no_namespace",
        }
    }
}

/// What reconciles share.
pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Re-check interval of a ready queue (drift repair).
    pub requeue: Duration,
    /// Retry interval of a queue that is not ready.
    pub retry: Duration,
}

/// The broker a ReliableQueue's Secret points at (`Debug` shows no
/// password).
#[derive(Debug, Clone)]
pub struct BrokerAccess {
    pub management_url: String,
    pub username: String,
    pub password: SecretString,
    /// PEM CA certificates the management API's certificate must chain
    /// to (the Secret's `ca.crt` key); else the system's roots.
    pub ca_pem: Option<String>,
}

impl BrokerAccess {
    /// A management API client.
    pub fn broker(&self) -> Result<Broker, BrokerError> {
        Broker::with_ca(
            &self.management_url,
            &self.username,
            self.password.expose_secret(),
            self.ca_pem.as_deref(),
        )
    }
}

/// The Secret key holding the CA certificate(s) of a TLS broker, as
/// cert-manager and the RabbitMQ Cluster Operator name it.
pub const CA_KEY: &str = "ca.crt";

/// Why a Secret gives no way to the broker.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The Secret lacks a key or holds a malformed value.
    #[error("{0}")]
    Secret(String),
    /// The management URL cannot be used with this broker.
    #[error(transparent)]
    Management(#[from] BrokerError),
}

impl AccessError {
    /// A fixed condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            AccessError::Secret(_) => "SecretInvalid",
            AccessError::Management(e) => e.reason(),
        }
    }
}

/// Reads broker credentials from a Secret: a `uri` key, or the RabbitMQ
/// Cluster Operator's `username`, `password`, `host` and `port`; plus
/// `ca.crt` for a TLS broker. The management URL is `management_url`, or
/// derived from the broker's host (`https://…:15671` when the Secret says
/// TLS: an `amqps://` URI or port 5671); a plain `http://` one for a TLS
/// broker is refused (see [`crate::apply::management_url`]).
pub fn broker_access(
    secret: &Secret,
    management_url: Option<&str>,
) -> Result<BrokerAccess, AccessError> {
    let mut data: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in secret.data.iter().flatten() {
        let text = String::from_utf8(v.0.clone())
            .map_err(|_| AccessError::Secret(format!("key {k:?} is not UTF-8")))?;
        data.insert(k.clone(), text);
    }
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone());
    }
    let get = |k: &str| {
        data.get(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let mut url = if let Some(uri) = get("uri").or_else(|| get("connection_string")) {
        BrokerUrl::parse(&uri).map_err(AccessError::Secret)?
    } else {
        let need = |k: &str| {
            get(k).ok_or_else(|| AccessError::Secret(format!("has neither a `uri` key nor `{k}`")))
        };
        BrokerUrl {
            username: need("username")?,
            password: need("password")?.into(),
            host: need("host")?,
            port: None,
            tls: false,
        }
    };
    if let Some(p) = get("port") {
        let port = p
            .parse::<u16>()
            .map_err(|_| AccessError::Secret(format!("key `port` ({p:?}) is not a port number")))?;
        url.port = url.port.or(Some(port));
    }
    Ok(BrokerAccess {
        management_url: crate::apply::management_url(management_url, &url)?,
        username: url.username,
        password: url.password,
        ca_pem: get(CA_KEY),
    })
}

/// The ReliableQueues (from the controller's cache) that refer to
/// `policy`: they are reconciled again when it changes.
pub fn queues_using_policy(
    queues: &[Arc<ReliableQueue>],
    policy: &RetryPolicy,
) -> Vec<ObjectRef<ReliableQueue>> {
    queues
        .iter()
        .filter(|q| {
            q.namespace() == policy.namespace()
                && q.spec.retry_policy_ref.as_deref() == Some(policy.name_any().as_str())
        })
        .map(|q| ObjectRef::from_obj(q.as_ref()))
        .collect()
}

/// The controller's reconcile function.
pub async fn reconcile(rq: Arc<ReliableQueue>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = rq.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<ReliableQueue> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, rq, |event| async {
        match event {
            Finalizer::Apply(rq) => apply(rq, &ctx).await,
            Finalizer::Cleanup(rq) => cleanup(rq, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.is_ok());
    result
}

/// Requeues a failed reconcile and counts the failure.
pub fn error_policy(rq: Arc<ReliableQueue>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %rq.name_any(), %error, "reconcile failed");
    ctx.metrics.reconcile_error(error.metric_label());
    Action::requeue(ctx.retry)
}

/// What one look at the broker found.
struct Observed {
    broker: Condition,
    topology: Condition,
    objects: Option<OwnedObjects>,
    counts: Option<Counts>,
}

fn condition(kind: &str, ok: Option<bool>, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        kind: kind.into(),
        status: match ok {
            Some(true) => "True",
            Some(false) => "False",
            None => "Unknown",
        }
        .into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: None,
        observed_generation: None,
    }
}

async fn resolve(
    rq: &ReliableQueue,
    ctx: &Context,
) -> Result<(BrokerAccess, RetryPolicySpec), Observed> {
    let ns = rq.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = &rq.spec.broker.secret_name;
    let unknown_topology = || {
        condition(
            "TopologyReady",
            None,
            "BrokerUnknown",
            "the broker could not be reached",
        )
    };
    let failed = |reason: &str, message: String| Observed {
        broker: condition("BrokerReachable", Some(false), reason, message),
        topology: unknown_topology(),
        objects: None,
        counts: None,
    };
    let secret = match secrets.get_opt(name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(failed(
                "SecretNotFound",
                format!("Secret {ns}/{name} does not exist"),
            ));
        }
        Err(e) => {
            return Err(failed(
                "SecretUnreadable",
                format!("Secret {ns}/{name}: {e}"),
            ));
        }
    };
    let access = broker_access(&secret, rq.spec.broker.management_url.as_deref()).map_err(|e| {
        let message = match &e {
            AccessError::Secret(m) => format!("Secret {ns}/{name} {m}"),
            AccessError::Management(m) => format!("Secret {ns}/{name}: {m}"),
        };
        failed(e.reason(), message)
    })?;
    let policy = match &rq.spec.retry_policy_ref {
        None => RetryPolicySpec::default(),
        Some(p) => {
            let policies: Api<RetryPolicy> = Api::namespaced(ctx.client.clone(), &ns);
            match policies.get_opt(p).await {
                Ok(Some(policy)) => policy.spec,
                Ok(None) => {
                    return Err(Observed {
                        broker: condition("BrokerReachable", None, "NotChecked", ""),
                        topology: condition(
                            "TopologyReady",
                            Some(false),
                            "RetryPolicyNotFound",
                            format!("RetryPolicy {ns}/{p} does not exist"),
                        ),
                        objects: None,
                        counts: None,
                    });
                }
                Err(e) => {
                    return Err(Observed {
                        broker: condition("BrokerReachable", None, "NotChecked", ""),
                        topology: condition(
                            "TopologyReady",
                            Some(false),
                            "RetryPolicyUnreadable",
                            format!("RetryPolicy {ns}/{p}: {e}"),
                        ),
                        objects: None,
                        counts: None,
                    });
                }
            }
        }
    };
    Ok((access, policy))
}

async fn observe(rq: &ReliableQueue, ctx: &Context) -> Observed {
    let (access, policy) = match resolve(rq, ctx).await {
        Ok(x) => x,
        Err(observed) => return observed,
    };
    let topology: Topology = match plan::plan(&rq.queue_name(), &rq.spec, &policy) {
        Ok(t) => t,
        Err(e) => {
            return Observed {
                broker: condition("BrokerReachable", None, "NotChecked", ""),
                topology: condition("TopologyReady", Some(false), "InvalidSpec", e.to_string()),
                objects: None,
                counts: None,
            };
        }
    };
    let (exchanges, queues, policies) = topology.owned_names();
    let objects = Some(OwnedObjects {
        exchanges,
        queues,
        policies,
    });
    let broker = match access.broker() {
        Ok(b) => b,
        Err(e) => {
            return Observed {
                broker: condition("BrokerReachable", Some(false), e.reason(), e.to_string()),
                topology: condition("TopologyReady", None, "BrokerUnknown", ""),
                objects,
                counts: None,
            };
        }
    };
    match broker.apply(&topology).await {
        Err(e) => Observed {
            broker: broker_failure(&e),
            topology: condition(
                "TopologyReady",
                None,
                "BrokerUnknown",
                "the broker could not be asked",
            ),
            objects,
            counts: None,
        },
        Ok(report) => {
            for c in &report.changes {
                tracing::info!(name = %rq.name_any(), change = %c, "topology changed");
            }
            let topology_ready = if report.conflicts.is_empty() {
                let message = if report.changes.is_empty() {
                    "in sync".to_owned()
                } else {
                    report
                        .changes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                condition("TopologyReady", Some(true), "Applied", message)
            } else {
                let message = report
                    .conflicts
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                condition("TopologyReady", Some(false), "Conflict", message)
            };
            let counts = broker.counts(&topology).await.ok().map(|c| Counts {
                ready: c.ready.min(i64::MAX as u64) as i64,
                consumers: c.consumers.min(i64::MAX as u64) as i64,
                parked: c.parked.min(i64::MAX as u64) as i64,
            });
            Observed {
                broker: condition(
                    "BrokerReachable",
                    Some(true),
                    "Connected",
                    access.management_url.clone(),
                ),
                topology: topology_ready,
                objects,
                counts,
            }
        }
    }
}

fn broker_failure(e: &BrokerError) -> Condition {
    condition("BrokerReachable", Some(false), e.reason(), e.to_string())
}

/// The status for `observed`, keeping the transition times of conditions
/// whose status did not change.
fn status_for(rq: &ReliableQueue, observed: Observed, now: &str) -> ReliableQueueStatus {
    let generation = rq.metadata.generation;
    let ready_ok = observed.broker.status == "True" && observed.topology.status == "True";
    let ready = if ready_ok {
        condition(
            "Ready",
            Some(true),
            "Ready",
            "topology applied and broker reachable",
        )
    } else if observed.broker.status == "False" {
        condition(
            "Ready",
            Some(false),
            &observed.broker.reason,
            observed.broker.message.clone(),
        )
    } else {
        condition(
            "Ready",
            Some(false),
            &observed.topology.reason,
            observed.topology.message.clone(),
        )
    };
    let old = rq
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let conditions = [ready, observed.broker, observed.topology]
        .into_iter()
        .map(|mut c| {
            let previous = old.iter().find(|o| o.kind == c.kind);
            c.last_transition_time = match previous {
                Some(p) if p.status == c.status => p.last_transition_time.clone(),
                _ => Some(now.to_owned()),
            };
            c.observed_generation = generation;
            c
        })
        .collect();
    ReliableQueueStatus {
        observed_generation: generation,
        conditions,
        queue: Some(rq.queue_name()),
        objects: observed.objects,
        counts: observed.counts,
    }
}

fn ready_status(status: Option<&ReliableQueueStatus>) -> Option<String> {
    status?
        .conditions
        .iter()
        .find(|c| c.kind == "Ready")
        .map(|c| c.status.clone())
}

async fn apply(rq: Arc<ReliableQueue>, ctx: &Context) -> Result<Action, Error> {
    let ns = rq.namespace().ok_or(Error::NoNamespace)?;
    let name = rq.name_any();
    let observed = observe(&rq, ctx).await;
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let status = status_for(&rq, observed, &now);
    let was = ready_status(rq.status.as_ref());
    let ready = status
        .conditions
        .iter()
        .find(|c| c.kind == "Ready")
        .cloned();
    // Written only when it changed: an unchanged status costs no API
    // write (and, with `trigger_hash`, no status write causes a reconcile).
    if rq.status.as_ref() != Some(&status) {
        let api: Api<ReliableQueue> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({
            "apiVersion": "warren.dev/v1alpha1",
            "kind": "ReliableQueue",
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        ctx.metrics.status_writes.inc();
    }
    let is_ready = ready.as_ref().is_some_and(|c| c.status == "True");
    if let Some(c) = ready.filter(|c| was.as_deref() != Some(c.status.as_str())) {
        let event = Event {
            type_: if is_ready {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: if is_ready {
                "Ready".into()
            } else {
                "NotReady".into()
            },
            note: Some(truncate(&format!("{}: {}", c.reason, c.message), 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &rq.object_ref(&())).await {
            tracing::debug!(error = %e, "cannot publish event");
        }
    }
    Ok(Action::requeue(if is_ready {
        ctx.requeue
    } else {
        retry_after(&status, std::time::SystemTime::now(), ctx.retry)
    }))
}

/// Longest wait between two attempts on an unreachable broker.
pub const MAX_RETRY: Duration = Duration::from_secs(300);

/// When to look again at a queue that is not ready: `retry`, growing with
/// the length of a broker outage (half the time it has lasted, at most
/// [`MAX_RETRY`]), so a long outage is not hammered. Other failures (a
/// missing Secret, a conflict) are looked at again after `retry`: Secrets
/// are not watched, so this is how a Secret created later is found.
pub fn retry_after(
    status: &ReliableQueueStatus,
    now: std::time::SystemTime,
    retry: Duration,
) -> Duration {
    let down_since = status
        .conditions
        .iter()
        .find(|c| {
            c.kind == "BrokerReachable" && c.status == "False" && c.reason == "BrokerUnreachable"
        })
        .and_then(|c| c.last_transition_time.as_deref())
        .and_then(|t| humantime::parse_rfc3339(t).ok());
    match down_since.and_then(|t| now.duration_since(t).ok()) {
        Some(outage) => (outage / 2).clamp(retry, MAX_RETRY.max(retry)),
        None => retry,
    }
}

/// How long the deletion of a `deletionPolicy: Delete` ReliableQueue keeps
/// trying a broker that cannot be asked (unreachable, refusing the
/// credentials, failing TLS) before it lets go of the resource and reports
/// what it left on the broker. A namespace being deleted waits at most
/// this long (plus one `--retry`) for its ReliableQueues.
pub const CLEANUP_GRACE: Duration = Duration::from_secs(120);

/// Reason of the Warning event that lists what a deletion left on the
/// broker.
pub const OBJECTS_LEFT: &str = "BrokerObjectsLeft";

/// How long ago the deletion of `rq` began.
fn deleting_for(rq: &ReliableQueue) -> Duration {
    let Some(since) = &rq.metadata.deletion_timestamp else {
        return Duration::ZERO;
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    Duration::from_secs(
        (now.as_second() - since.0.as_second())
            .try_into()
            .unwrap_or(0),
    )
}

/// `deletionPolicy: Delete`: removes what the ReliableQueue owns from the
/// broker.
///
/// - A queue that holds messages (or has consumers) is kept, unless
///   forced, and so is the finalizer: retried every `--retry` for as long
///   as it takes, since that protects the messages.
/// - Without the Secret (deleted first, as `kubectl delete namespace` may
///   do) or with one that gives no credentials, the broker cannot be asked
///   at all: the finalizer is released at once.
/// - A broker that cannot be asked is retried for [`CLEANUP_GRACE`] from
///   the deletion's start, then the finalizer is released.
///
/// Whenever the finalizer goes without the broker cleaned up, a Warning
/// event [`OBJECTS_LEFT`] names the objects left there and why.
async fn cleanup(rq: Arc<ReliableQueue>, ctx: &Context) -> Result<Action, Error> {
    if rq.spec.deletion_policy == DeletionPolicy::Retain {
        tracing::info!(name = %rq.name_any(), "deleted with deletionPolicy Retain; broker objects kept");
        return Ok(Action::await_change());
    }
    let ns = rq.namespace().ok_or(Error::NoNamespace)?;
    let force = rq
        .annotations()
        .get(FORCE_DELETE)
        .is_some_and(|v| v == "true");
    let secret_name = &rq.spec.broker.secret_name;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = match secrets.get_opt(secret_name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            let why = format!("Secret {ns}/{secret_name} does not exist");
            return let_go(&rq, ctx, &why, None).await;
        }
        Err(e) => {
            return Err(Error::CleanupBlocked(format!(
                "Secret {ns}/{secret_name}: {e}"
            )));
        }
    };
    let policy = match &rq.spec.retry_policy_ref {
        None => RetryPolicySpec::default(),
        Some(p) => {
            let policies: Api<RetryPolicy> = Api::namespaced(ctx.client.clone(), &ns);
            match policies.get_opt(p).await {
                Ok(Some(policy)) => policy.spec,
                // Gone first (a namespace's deletion has no order): the
                // default plan still names every other object, and the
                // delay tiers it lacks are found on the broker by name.
                Ok(None) => RetryPolicySpec::default(),
                Err(e) => {
                    return Err(Error::CleanupBlocked(format!("RetryPolicy {ns}/{p}: {e}")));
                }
            }
        }
    };
    let topology = match plan::plan(&rq.queue_name(), &rq.spec, &policy) {
        Ok(t) => t,
        Err(e) => return let_go(&rq, ctx, &format!("the spec cannot be planned: {e}"), None).await,
    };
    let access = match broker_access(&secret, rq.spec.broker.management_url.as_deref()) {
        Ok(a) => Ok(a),
        Err(AccessError::Secret(m)) => {
            let why = format!("Secret {ns}/{secret_name} {m}");
            return let_go(&rq, ctx, &why, Some(&topology)).await;
        }
        Err(AccessError::Management(e)) => Err(e),
    };
    let deleted = match access.and_then(|a| a.broker()) {
        Ok(broker) => broker.delete(&topology, force).await,
        Err(e) => Err(e),
    };
    let report = match deleted {
        Ok(report) => report,
        Err(e) if deleting_for(&rq) < CLEANUP_GRACE => {
            return Err(Error::CleanupBlocked(e.to_string()));
        }
        Err(e) => {
            let why = format!(
                "{e} (for {} since the deletion began)",
                humantime::format_duration(CLEANUP_GRACE)
            );
            return let_go(&rq, ctx, &why, Some(&topology)).await;
        }
    };
    if !report.conflicts.is_empty() {
        let message = report
            .conflicts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let event = Event {
            type_: EventType::Warning,
            reason: "DeletionBlocked".into(),
            note: Some(truncate(&message, 1000)),
            action: "Delete".into(),
            secondary: None,
        };
        let _ = ctx.recorder.publish(&event, &rq.object_ref(&())).await;
        return Err(Error::CleanupBlocked(message));
    }
    Ok(Action::await_change())
}

/// What a ReliableQueue owns on the broker, as its status last recorded
/// it, else as `topology` (or the default plan) names it.
fn owned_objects(rq: &ReliableQueue, topology: Option<&Topology>) -> OwnedObjects {
    if let Some(o) = rq.status.as_ref().and_then(|s| s.objects.clone())
        && !o.queues.is_empty()
    {
        return o;
    }
    let planned = topology
        .cloned()
        .or_else(|| plan::plan(&rq.queue_name(), &rq.spec, &RetryPolicySpec::default()).ok());
    match planned {
        Some(t) => {
            let (exchanges, queues, policies) = t.owned_names();
            OwnedObjects {
                exchanges,
                queues,
                policies,
            }
        }
        None => OwnedObjects {
            exchanges: vec![],
            queues: vec![rq.queue_name()],
            policies: vec![],
        },
    }
}

/// The note of an [`OBJECTS_LEFT`] event: why, then every object.
pub fn objects_left_note(why: &str, objects: &OwnedObjects) -> String {
    let mut parts = Vec::new();
    for (kind, names) in [
        ("queues", &objects.queues),
        ("exchanges", &objects.exchanges),
        ("policies", &objects.policies),
    ] {
        if !names.is_empty() {
            parts.push(format!("{kind} {}", names.join(", ")));
        }
    }
    format!(
        "{why}; broker cleanup given up, left on the broker: {}",
        parts.join("; ")
    )
}

/// Releases the finalizer without cleaning up the broker, with a Warning
/// event naming what was left. In a namespace being deleted no event can
/// be created any more; the event then goes to the Namespace (stored in
/// `default`, as for every cluster-scoped object).
async fn let_go(
    rq: &ReliableQueue,
    ctx: &Context,
    why: &str,
    topology: Option<&Topology>,
) -> Result<Action, Error> {
    let note = objects_left_note(why, &owned_objects(rq, topology));
    tracing::warn!(name = %rq.name_any(), %note, "finalizer released without broker cleanup");
    let event = |note: String| Event {
        type_: EventType::Warning,
        reason: OBJECTS_LEFT.into(),
        note: Some(truncate(&note, 1000)),
        action: "Delete".into(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&event(note.clone()), &rq.object_ref(&()))
        .await
    {
        tracing::debug!(error = %e, "cannot publish the event on the ReliableQueue; publishing it on its Namespace");
        let ns = rq.namespace().unwrap_or_default();
        let namespace = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Namespace".into()),
            name: Some(ns.clone()),
            ..Default::default()
        };
        let note = format!("ReliableQueue {ns}/{}: {note}", rq.name_any());
        if let Err(e) = ctx.recorder.publish(&event(note), &namespace).await {
            tracing::warn!(error = %e, "cannot publish the event");
        }
    }
    Ok(Action::await_change())
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// What re-triggers a reconcile of a ReliableQueue: a change of its spec
/// (generation), of its annotations (`warren.dev/force-delete`), of its
/// finalizers, or its deletion. Writing its status changes none of them,
/// so a status write never triggers the next reconcile; live counts are
/// refreshed on the re-check interval.
pub fn trigger_hash(rq: &ReliableQueue) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let meta = &rq.metadata;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    meta.annotations.hash(&mut h);
    meta.finalizers.hash(&mut h);
    Some(h.finish())
}

/// Where the operator works: every namespace, or the listed ones (the
/// chart's `watchNamespaces`, with namespaced Roles instead of a
/// ClusterRole).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Scope {
    #[default]
    Cluster,
    Namespaces(Vec<String>),
}

impl Scope {
    /// From a comma- or space-separated list; empty means the cluster.
    pub fn parse(list: &str) -> Scope {
        let names: Vec<String> = list
            .split([',', ' ', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if names.is_empty() {
            Scope::Cluster
        } else {
            Scope::Namespaces(names)
        }
    }

    /// One `Api` per namespace watched (one cluster-wide `Api` for the
    /// cluster scope).
    pub fn apis<K>(&self, client: &kube::Client) -> Vec<Api<K>>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match self {
            Scope::Cluster => vec![Api::all(client.clone())],
            Scope::Namespaces(names) => names
                .iter()
                .map(|ns| Api::namespaced(client.clone(), ns))
                .collect(),
        }
    }
}

/// Starts the controller (one per namespace of `scope`); returns when
/// `shutdown` resolves. `synced` is set once every controller's cache
/// holds the ReliableQueues.
///
/// Secrets are not watched: the operator may `get` a broker Secret but not
/// list or watch Secrets. A changed Secret is read at the next reconcile:
/// within `retry` of a queue that is not ready, `resync` of one that is.
pub async fn run(
    client: kube::Client,
    ctx: Arc<Context>,
    scope: Scope,
    synced: Arc<std::sync::atomic::AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::StreamExt;
    use futures::future::FutureExt;
    use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
    let shutdown = shutdown.shared();
    let mut controllers = Vec::new();
    let mut stores = Vec::new();
    let queue_apis = scope.apis::<ReliableQueue>(&client);
    let policy_apis = scope.apis::<RetryPolicy>(&client);
    for (queues, policies) in queue_apis.into_iter().zip(policy_apis) {
        let (reader, writer) = reflector::store();
        let trigger = watcher(queues, watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .applied_objects()
            .predicate_filter(trigger_hash, Default::default());
        let store = reader.clone();
        stores.push(reader.clone());
        let shutdown = shutdown.clone();
        let ctx = ctx.clone();
        controllers.push(
            Controller::for_stream(trigger, reader)
                .watches(policies, watcher::Config::default(), move |p| {
                    queues_using_policy(&store.state(), &p)
                })
                .graceful_shutdown_on(shutdown)
                .run(reconcile, error_policy, ctx)
                .for_each(|_| async {}),
        );
    }
    let ready = async move {
        for store in stores {
            if store.wait_until_ready().await.is_err() {
                return;
            }
        }
        synced.store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!("controller caches synced");
    };
    futures::future::join(futures::future::join_all(controllers), ready).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(data: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn secrets_in_both_formats_give_access() {
        let cluster_operator = secret(&[
            ("username", "app"),
            ("password", "pw"),
            ("host", "rabbit.ns.svc"),
            ("port", "5672"),
        ]);
        let a = broker_access(&cluster_operator, None).unwrap();
        assert_eq!(a.management_url, "http://rabbit.ns.svc:15672");
        assert_eq!(
            (a.username.as_str(), a.password.expose_secret()),
            ("app", "pw")
        );
        let uri = secret(&[("uri", "amqp://u:p%40ss@h:5672/%2f")]);
        let a = broker_access(&uri, Some("https://mgmt:15671")).unwrap();
        assert_eq!(a.management_url, "https://mgmt:15671");
        assert_eq!(a.password.expose_secret(), "p@ss");
        let e = broker_access(&secret(&[("username", "x")]), None).unwrap_err();
        assert!(e.to_string().contains("`password`"), "{e}");
        assert_eq!(e.reason(), "SecretInvalid");
    }

    #[test]
    fn a_secret_saying_tls_means_https_with_its_ca() {
        // The Cluster Operator's Secret of a TLS cluster: port 5671.
        let tls_cluster = secret(&[
            ("username", "app"),
            ("password", "pw"),
            ("host", "rabbit.ns.svc"),
            ("port", "5671"),
            ("ca.crt", "-----BEGIN CERTIFICATE-----\n…"),
        ]);
        let a = broker_access(&tls_cluster, None).unwrap();
        assert_eq!(a.management_url, "https://rabbit.ns.svc:15671");
        assert!(a.ca_pem.unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        // An amqps:// URI.
        let a = broker_access(&secret(&[("uri", "amqps://u:p@rabbit/%2f")]), None).unwrap();
        assert_eq!(a.management_url, "https://rabbit:15671");
        assert_eq!(a.ca_pem, None);
        // Plain HTTP to either is refused, whatever the host.
        for s in [&tls_cluster, &secret(&[("uri", "amqps://u:p@rabbit/%2f")])] {
            let e = broker_access(s, Some("http://rabbit:15672")).unwrap_err();
            assert_eq!(e.reason(), "InsecureManagementUrl", "{e}");
            assert!(e.to_string().contains("use an https://"), "{e}");
        }
        assert!(broker_access(&tls_cluster, Some("https://mgmt.example:443")).is_ok());
        // A port that is not one.
        let e = broker_access(
            &secret(&[
                ("username", "u"),
                ("password", "p"),
                ("host", "h"),
                ("port", "amqp"),
            ]),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("`port`"), "{e}");
    }

    #[test]
    fn the_objects_left_are_named() {
        let objects = OwnedObjects {
            exchanges: vec!["orders.retry".into()],
            queues: vec!["orders".into(), "orders.parked".into()],
            policies: vec!["warren.orders".into()],
        };
        assert_eq!(
            objects_left_note("Secret shop/rabbit does not exist", &objects),
            "Secret shop/rabbit does not exist; broker cleanup given up, left on the broker: \
             queues orders, orders.parked; exchanges orders.retry; policies warren.orders"
        );
    }

    #[test]
    fn retries_back_off_with_the_outage() {
        let now = humantime::parse_rfc3339("2026-11-21T12:00:00Z").unwrap();
        let status = |state: &str, since: &str| ReliableQueueStatus {
            conditions: vec![Condition {
                kind: "BrokerReachable".into(),
                status: state.into(),
                reason: "BrokerUnreachable".into(),
                message: String::new(),
                last_transition_time: Some(since.into()),
                observed_generation: None,
            }],
            ..Default::default()
        };
        let retry = Duration::from_secs(10);
        assert_eq!(
            retry_after(&status("False", "2026-11-21T11:59:55Z"), now, retry),
            retry
        );
        assert_eq!(
            retry_after(&status("False", "2026-11-21T11:58:00Z"), now, retry),
            Duration::from_secs(60)
        );
        assert_eq!(
            retry_after(&status("False", "2026-11-21T09:00:00Z"), now, retry),
            MAX_RETRY
        );
        assert_eq!(
            retry_after(&status("True", "2026-11-21T09:00:00Z"), now, retry),
            retry
        );
        let mut missing_secret = status("False", "2026-11-21T09:00:00Z");
        missing_secret.conditions[0].reason = "SecretNotFound".into();
        assert_eq!(retry_after(&missing_secret, now, retry), retry);
    }

    #[test]
    fn long_event_notes_are_cut_on_a_char_boundary() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("ok", 10), "ok");
    }
}
