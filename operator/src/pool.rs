//! Outbox volumes that outlive pods.
//!
//! A pod's outbox holds messages the app was told are safe. If the pod is
//! deleted while the broker is down, they must survive it, so the outbox
//! lives on a PersistentVolumeClaim, not in the pod:
//!
//! - **Pools.** Pods of a Deployment (or of another controller that names
//!   its pods at random) share a pool of claims labelled
//!   `warren.dev/pool=<kind>-<name>`. At Pod CREATE the webhook gives the
//!   new pod a free claim: one that no live pod holds (pods are labelled
//!   with the claim they hold), that was not handed out in the last minute
//!   (a pod admitted but not yet stored), and that is not being drained.
//!   Handing a claim out is a write with the claim's `resourceVersion` as
//!   a precondition, so of two pods racing for one claim exactly one wins;
//!   the other takes the next free claim or a new one. A freed claim is
//!   taken by the next pod, whose sidecar forwards what it holds before
//!   anything new.
//! - **Named claims.** A StatefulSet's pod (and a bare pod with a fixed
//!   name) gets the claim `warren-outbox-<pod>`, created when missing: one
//!   claim per ordinal, as a volume claim template would give.
//!   Taking it is the same compare-and-swap; a named claim a drain Job
//!   holds is not handed out: the pod is refused with the reason, and its
//!   controller (the StatefulSet's) tries again.
//! - **Drain Jobs.** The leader checks every claim periodically. The first
//!   pass that finds a claim no longer held records the time
//!   (`warren.dev/released-at`); a claim released `idleBeforeDrain` ago may
//!   still hold messages; a Job running `warren-sidecar --drain` on it
//!   forwards them and exits, within `drainDeadline`
//!   (`activeDeadlineSeconds`). Marking a claim for a drain is a
//!   compare-and-swap too, so a pod and a drain never both get it. A
//!   drained pool claim beyond the workload's replica count is deleted, so
//!   the pool shrinks with the workload; a claim whose drain failed is
//!   kept (it holds messages the broker refused) and reported.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodSpec,
    PodTemplateSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::inject::{self, CLAIM_LABEL, InjectionConfig};

/// Label of every object Warren manages.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGER: &str = "warren";
/// Label of a pool claim: its pool.
pub const POOL_LABEL: &str = "warren.dev/pool";
/// When the claim was last handed to a pod (RFC 3339).
pub const CLAIMED_AT: &str = "warren.dev/claimed-at";
/// When the pool keeper first saw the claim no longer held after its last
/// hand-out (RFC 3339); valid only if newer than [`CLAIMED_AT`]. A claim's
/// idle time counts from here.
pub const RELEASED_AT: &str = "warren.dev/released-at";
/// The drain Job working on the claim.
pub const DRAINING: &str = "warren.dev/draining";
/// When the claim was last drained completely.
pub const DRAINED_AT: &str = "warren.dev/drained-at";
/// Why the last drain failed; the claim is kept.
pub const DRAIN_FAILED: &str = "warren.dev/drain-failed";
/// The workload of a pool, `Kind/name`.
pub const WORKLOAD: &str = "warren.dev/workload";
/// The broker environment (Secret references only) a drain Job needs.
pub const SIDECAR_ENV: &str = "warren.dev/sidecar-env";
/// Label of a drain Job: the claim it drains.
pub const DRAIN_LABEL: &str = "warren.dev/drain-claim";

/// A claim handed out this recently counts as held: its pod may not be
/// stored (and visible) yet.
pub const CLAIM_GRACE: Duration = Duration::from_secs(60);
/// Attempts at handing out a claim before giving up.
const ATTEMPTS: usize = 8;

/// The workload a pool serves.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

/// Where a new pod's outbox claim comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimSource {
    /// A pool shared by the pods of one workload.
    Pool { key: String, workload: Workload },
    /// A claim of its own, by name (StatefulSet ordinals, named pods).
    Named(String),
}

/// Why no claim could be found.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "cannot tell which outbox claim the pod should get: it has neither a controller, a name nor a generateName"
    )]
    Anonymous,
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error(
        "no outbox claim could be taken in pool {0:?} after {ATTEMPTS} attempts (too many pods racing)"
    )]
    Contended(String),
    #[error(
        "outbox claim {claim} is being drained by Job {job}; the pod can have it once the drain has ended"
    )]
    Draining { claim: String, job: String },
    #[error("outbox claim {0} is being deleted; the pod can have a new one once it is gone")]
    Deleting(String),
}

/// A label value: at most 63 characters; longer names are cut and given a
/// hash of the whole, so two long names never share a pool.
pub fn label_value(s: &str) -> String {
    if s.len() <= 63 {
        return s.to_owned();
    }
    // FNV-1a: stable across releases, unlike std's hasher.
    let hash = s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let head: String = s.chars().take(54).collect();
    format!("{}-{:08x}", head.trim_end_matches(['-', '.']), hash as u32)
}

/// Which claim a pod gets, from its owner references, labels and name.
pub fn claim_source(meta: &ObjectMeta) -> Result<ClaimSource, PoolError> {
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let pool = |kind: &str, name: &str| {
        let workload = Workload {
            kind: kind.into(),
            name: name.into(),
        };
        ClaimSource::Pool {
            key: label_value(&format!("{}-{name}", kind.to_ascii_lowercase())),
            workload,
        }
    };
    match owner {
        Some(o) if o.kind == "StatefulSet" => match &meta.name {
            Some(name) => Ok(ClaimSource::Named(format!("{}-{name}", inject::VOLUME))),
            None => Err(PoolError::Anonymous),
        },
        Some(o) if o.kind == "ReplicaSet" => {
            // A Deployment's ReplicaSet is `<deployment>-<pod-template-hash>`;
            // the pool belongs to the Deployment so rollouts share it.
            let hash = meta
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"));
            match hash.and_then(|h| o.name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) => Ok(pool("Deployment", deployment)),
                None => Ok(pool("ReplicaSet", &o.name)),
            }
        }
        Some(o) => Ok(pool(&o.kind, &o.name)),
        None => match (&meta.name, &meta.generate_name) {
            (Some(name), _) if !name.is_empty() => {
                Ok(ClaimSource::Named(format!("{}-{name}", inject::VOLUME)))
            }
            (_, Some(prefix)) if !prefix.is_empty() => {
                Ok(pool("Pod", prefix.trim_end_matches('-')))
            }
            _ => Err(PoolError::Anonymous),
        },
    }
}

fn annotation<'a>(pvc: &'a PersistentVolumeClaim, key: &str) -> Option<&'a str> {
    pvc.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn timestamp(pvc: &PersistentVolumeClaim, key: &str) -> Option<Timestamp> {
    annotation(pvc, key).and_then(|t| t.parse().ok())
}

fn older_than(t: Option<Timestamp>, now: Timestamp, age: Duration) -> bool {
    match t {
        None => true,
        // A time in the future (clock skew) is not old.
        Some(t) => {
            now.duration_since(t)
                >= k8s_openapi::jiff::SignedDuration::try_from(age)
                    .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX)
        }
    }
}

/// The claims that live pods hold (pods labelled with a claim that have
/// not finished; a terminating pod still holds its claim while its
/// sidecar drains).
pub fn held_claims(pods: &[Pod]) -> BTreeSet<(String, String)> {
    pods.iter()
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .filter_map(|p| {
            let claim = p.labels().get(CLAIM_LABEL)?;
            Some((p.namespace().unwrap_or_default(), claim.clone()))
        })
        .collect()
}

/// A claim of `claims` that can be handed out now, if any (the first by
/// name, so that pools fill from the bottom).
pub fn free_claim<'a>(
    claims: &'a [PersistentVolumeClaim],
    held: &BTreeSet<(String, String)>,
    now: Timestamp,
) -> Option<&'a PersistentVolumeClaim> {
    let mut free: Vec<&PersistentVolumeClaim> = claims
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .filter(|c| !held.contains(&(c.namespace().unwrap_or_default(), c.name_any())))
        .filter(|c| annotation(c, DRAINING).is_none())
        .filter(|c| older_than(timestamp(c, CLAIMED_AT), now, CLAIM_GRACE))
        .collect();
    free.sort_by_key(|c| c.name_any());
    free.into_iter().next()
}

/// Whether an existing named claim may be handed to its pod: not while a
/// drain Job holds it, nor while it is being deleted.
pub fn named_claim_available(pvc: &PersistentVolumeClaim) -> Result<(), PoolError> {
    if let Some(job) = annotation(pvc, DRAINING) {
        return Err(PoolError::Draining {
            claim: pvc.name_any(),
            job: job.to_owned(),
        });
    }
    if pvc.metadata.deletion_timestamp.is_some() {
        return Err(PoolError::Deleting(pvc.name_any()));
    }
    Ok(())
}

/// The merge patch that hands `pvc` to a pod: a compare-and-swap on its
/// `resourceVersion` (a concurrent hand-out or drain makes it fail with
/// 409), the time, the broker environment for a later drain Job, and no
/// release time any more.
pub fn hand_out_patch(
    pvc: &PersistentVolumeClaim,
    env: &[EnvVar],
    now: Timestamp,
) -> serde_json::Value {
    json!({"metadata": {
        "resourceVersion": pvc.resource_version(),
        "annotations": {
            CLAIMED_AT: now.to_string(),
            RELEASED_AT: null,
            SIDECAR_ENV: serde_json::to_string(env).expect("env serialises"),
        },
    }})
}

/// The name of the first `warren-outbox-<key>-<n>` not taken.
pub fn next_claim_name(key: &str, claims: &[PersistentVolumeClaim]) -> String {
    let names: BTreeSet<String> = claims.iter().map(|c| c.name_any()).collect();
    (0..)
        .map(|n| format!("{}-{key}-{n}", inject::VOLUME))
        .find(|n| !names.contains(n))
        .expect("an unused index")
}

/// Hands out outbox claims at Pod CREATE.
#[derive(Clone)]
pub struct ClaimPool {
    client: Client,
    config: InjectionConfig,
}

impl ClaimPool {
    pub fn new(client: Client, config: InjectionConfig) -> Self {
        Self { client, config }
    }

    fn claim_meta(
        &self,
        name: &str,
        source: &ClaimSource,
        env: &[EnvVar],
        now: Timestamp,
    ) -> ObjectMeta {
        let mut labels = BTreeMap::from([(MANAGED_BY.to_owned(), MANAGER.to_owned())]);
        let mut annotations = BTreeMap::from([
            (CLAIMED_AT.to_owned(), now.to_string()),
            (
                SIDECAR_ENV.to_owned(),
                serde_json::to_string(env).expect("env serialises"),
            ),
        ]);
        if let ClaimSource::Pool { key, workload } = source {
            labels.insert(POOL_LABEL.into(), key.clone());
            annotations.insert(
                WORKLOAD.into(),
                format!("{}/{}", workload.kind, workload.name),
            );
        }
        ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        }
    }

    /// Takes the named claim (a StatefulSet ordinal's, a named pod's), or
    /// creates it. Taking it is a compare-and-swap on its
    /// `resourceVersion`, as for pool claims; a claim a drain Job holds
    /// (marked by the pool keeper with the same compare-and-swap, so the
    /// two never both win) is refused: the pod's controller retries.
    async fn acquire_named(
        &self,
        claims: &Api<PersistentVolumeClaim>,
        name: &str,
        source: &ClaimSource,
        env: &[EnvVar],
        now: Timestamp,
    ) -> Result<String, PoolError> {
        for attempt in 0..ATTEMPTS {
            match claims.get_opt(name).await? {
                Some(pvc) => {
                    named_claim_available(&pvc)?;
                    let patch = hand_out_patch(&pvc, env, now);
                    match claims
                        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(_) => return Ok(name.to_owned()),
                        Err(kube::Error::Api(e)) if e.code == 409 => {
                            tracing::debug!(claim = %name, attempt, "claim changed concurrently; reading it again");
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                None => {
                    let pvc = PersistentVolumeClaim {
                        metadata: self.claim_meta(name, source, env, now),
                        spec: Some(self.config.claim_spec()),
                        ..Default::default()
                    };
                    match claims.create(&PostParams::default(), &pvc).await {
                        Ok(_) => return Ok(name.to_owned()),
                        // Created meanwhile (a retried admission): take it
                        // as any existing claim.
                        Err(kube::Error::Api(e)) if e.code == 409 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(PoolError::Contended(name.to_owned()))
    }

    /// Takes a claim for a new pod in `namespace` and returns its name.
    /// `env` is the sidecar's broker environment, kept on the claim for a
    /// later drain Job.
    pub async fn acquire(
        &self,
        namespace: &str,
        source: &ClaimSource,
        env: &[EnvVar],
        now: Timestamp,
    ) -> Result<String, PoolError> {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        let key = match source {
            ClaimSource::Named(name) => {
                return self.acquire_named(&claims, name, source, env, now).await;
            }
            ClaimSource::Pool { key, .. } => key,
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        for attempt in 0..ATTEMPTS {
            let in_pool = claims
                .list(&ListParams::default().labels(&format!("{POOL_LABEL}={key}")))
                .await?
                .items;
            let held = held_claims(
                &pods
                    .list(&ListParams::default().labels(CLAIM_LABEL))
                    .await?
                    .items,
            );
            if let Some(free) = free_claim(&in_pool, &held, now) {
                let name = free.name_any();
                // The resourceVersion makes this a compare-and-swap: a
                // concurrent admission that took the claim first makes it
                // fail with 409, and this one tries again.
                let patch = hand_out_patch(free, env, now);
                match claims
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => return Ok(name),
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        tracing::debug!(claim = %name, attempt, "claim taken concurrently; trying again");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let name = next_claim_name(key, &in_pool);
            let pvc = PersistentVolumeClaim {
                metadata: self.claim_meta(&name, source, env, now),
                spec: Some(self.config.claim_spec()),
                ..Default::default()
            };
            match claims.create(&PostParams::default(), &pvc).await {
                Ok(_) => return Ok(name),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::debug!(claim = %name, attempt, "claim created concurrently; trying again");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(PoolError::Contended(key.clone()))
    }
}

/// What the pool keeper does to one claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolAction {
    /// Seen no longer held for the first time since its last hand-out:
    /// record the time (its idle time counts from here).
    Released { namespace: String, claim: String },
    /// Idle (released for `idleBeforeDrain`) with possibly undelivered
    /// messages: start a drain Job.
    Drain { namespace: String, claim: String },
    /// Its drain Job ended (`ok`: everything forwarded).
    Drained {
        namespace: String,
        claim: String,
        ok: bool,
        message: String,
    },
    /// Drained and beyond what the workload needs: delete it.
    Delete { namespace: String, claim: String },
}

fn job_name(claim: &str) -> String {
    let name = format!("warren-drain-{claim}");
    if name.len() <= 63 {
        name
    } else {
        label_value(&name)
    }
}

fn job_outcome(job: &Job) -> Option<(bool, String)> {
    let status = job.status.as_ref()?;
    for c in status.conditions.iter().flatten() {
        if c.status == "True" && c.type_ == "Complete" {
            return Some((true, "drained".into()));
        }
        if c.status == "True" && c.type_ == "Failed" {
            return Some((
                false,
                c.message
                    .clone()
                    .or_else(|| c.reason.clone())
                    .unwrap_or_else(|| "drain Job failed".into()),
            ));
        }
    }
    None
}

/// When the claim was released after its last hand-out, if that is
/// recorded: [`RELEASED_AT`], if newer than [`CLAIMED_AT`].
pub fn released_at(pvc: &PersistentVolumeClaim) -> Option<Timestamp> {
    let released = timestamp(pvc, RELEASED_AT)?;
    match timestamp(pvc, CLAIMED_AT) {
        Some(claimed) if claimed >= released => None,
        _ => Some(released),
    }
}

/// Decides what to do with every Warren claim. `replicas` has the desired
/// replica count of each pool's workload (`None`: the workload is gone).
pub fn plan_pools(
    claims: &[PersistentVolumeClaim],
    pods: &[Pod],
    jobs: &[Job],
    replicas: &BTreeMap<(String, String), Option<i32>>,
    now: Timestamp,
    idle_before_drain: Duration,
) -> Vec<PoolAction> {
    let held = held_claims(pods);
    let jobs: BTreeMap<(String, String), &Job> = jobs
        .iter()
        .map(|j| ((j.namespace().unwrap_or_default(), j.name_any()), j))
        .collect();
    let mut actions = Vec::new();
    // Pool → claims that are drained, idle and could go.
    let mut spare: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut pool_sizes: BTreeMap<(String, String), usize> = BTreeMap::new();
    for c in claims {
        if c.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let (ns, name) = (c.namespace().unwrap_or_default(), c.name_any());
        let pool = c.labels().get(POOL_LABEL).map(|p| (ns.clone(), p.clone()));
        if let Some(pool) = &pool {
            *pool_sizes.entry(pool.clone()).or_default() += 1;
        }
        if let Some(job) = annotation(c, DRAINING) {
            match jobs.get(&(ns.clone(), job.to_owned())) {
                Some(j) => {
                    if let Some((ok, message)) = job_outcome(j) {
                        actions.push(PoolAction::Drained {
                            namespace: ns,
                            claim: name,
                            ok,
                            message,
                        });
                    }
                }
                // The Job is gone before its end was seen: drain again.
                None => actions.push(PoolAction::Drained {
                    namespace: ns,
                    claim: name,
                    ok: false,
                    message: format!("drain Job {job} disappeared"),
                }),
            }
            continue;
        }
        if held.contains(&(ns.clone(), name.clone())) {
            continue;
        }
        let claimed = timestamp(c, CLAIMED_AT);
        let drained = timestamp(c, DRAINED_AT);
        let clean = match (drained, claimed) {
            (Some(d), Some(c)) => d >= c,
            (Some(_), None) => true,
            _ => false,
        };
        if clean {
            if let Some(pool) = pool {
                spare.entry(pool).or_default().push(name);
            }
            continue;
        }
        if annotation(c, DRAIN_FAILED).is_some() {
            // Kept with what the broker refused; a person decides.
            continue;
        }
        match released_at(c) {
            // Idle time counts from the release, not from the hand-out: a
            // claim held for days is not drained the moment its pod goes.
            Some(released) => {
                if older_than(Some(released), now, idle_before_drain) {
                    actions.push(PoolAction::Drain {
                        namespace: ns,
                        claim: name,
                    });
                }
            }
            // Handed out moments ago: its pod may not be stored yet.
            None if !older_than(claimed, now, CLAIM_GRACE) => {}
            None => actions.push(PoolAction::Released {
                namespace: ns,
                claim: name,
            }),
        }
    }
    for (pool, mut names) in spare {
        let wanted = replicas.get(&pool).copied().flatten().unwrap_or(0).max(0) as usize;
        let size = pool_sizes.get(&pool).copied().unwrap_or(0);
        let extra = size.saturating_sub(wanted).min(names.len());
        // The highest indexes go first; the pool keeps its low names.
        names.sort_by(|a, b| b.cmp(a));
        for claim in names.into_iter().take(extra) {
            actions.push(PoolAction::Delete {
                namespace: pool.0.clone(),
                claim,
            });
        }
    }
    actions
}

/// The drain Job for `claim`: the sidecar image in drain mode, with the
/// claim mounted and the broker environment recorded on the claim.
pub fn drain_job(claim: &PersistentVolumeClaim, config: &InjectionConfig) -> Job {
    let name = claim.name_any();
    let mut env: Vec<EnvVar> = annotation(claim, SIDECAR_ENV)
        .and_then(|e| serde_json::from_str(e).ok())
        .unwrap_or_default();
    env.retain(|e| e.name.starts_with("WARREN_BROKER_"));
    env.extend([
        EnvVar {
            name: "WARREN_DATA_DIR".into(),
            value: Some(inject::DATA_DIR.into()),
            value_from: None,
        },
        EnvVar {
            name: "WARREN_LOG_FORMAT".into(),
            value: Some("json".into()),
            value_from: None,
        },
    ]);
    let labels = BTreeMap::from([
        (MANAGED_BY.to_owned(), MANAGER.to_owned()),
        (DRAIN_LABEL.to_owned(), label_value(&name)),
        (CLAIM_LABEL.to_owned(), name.clone()),
    ]);
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(&name)),
            namespace: claim.namespace(),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(3),
            // A drain that hangs (a broker that takes the connection but
            // never confirms) ends as failed, and the claim is reported.
            active_deadline_seconds: Some(
                i64::try_from(config.outbox.drain_deadline.0.as_secs()).unwrap_or(i64::MAX),
            ),
            ttl_seconds_after_finished: Some(config.outbox.drain_job_ttl.0.as_secs() as i32),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        inject::INJECT.to_owned(),
                        "disabled".to_owned(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("OnFailure".into()),
                    security_context: Some(inject::outbox_pod_security_context()),
                    containers: vec![Container {
                        name: "drain".into(),
                        image: Some(config.image.clone()),
                        image_pull_policy: Some(config.image_pull_policy.clone()),
                        args: Some(vec!["--drain".into()]),
                        env: Some(env),
                        resources: config.resources.clone(),
                        security_context: Some(inject::security_context()),
                        volume_mounts: Some(vec![VolumeMount {
                            name: inject::VOLUME.into(),
                            mount_path: inject::DATA_DIR.into(),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }],
                    volumes: Some(vec![Volume {
                        name: inject::VOLUME.into(),
                        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                            claim_name: name,
                            read_only: None,
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The leader's periodic pass over every Warren claim.
pub struct PoolKeeper {
    pub client: Client,
    pub config: InjectionConfig,
    /// The namespaces whose claims it looks after.
    pub scope: crate::controller::Scope,
}

impl PoolKeeper {
    async fn replicas(
        &self,
        claims: &[PersistentVolumeClaim],
    ) -> Result<BTreeMap<(String, String), Option<i32>>, kube::Error> {
        let mut out = BTreeMap::new();
        for c in claims {
            let (Some(pool), Some(workload)) =
                (c.labels().get(POOL_LABEL), annotation(c, WORKLOAD))
            else {
                continue;
            };
            let ns = c.namespace().unwrap_or_default();
            let key = (ns.clone(), pool.clone());
            if out.contains_key(&key) {
                continue;
            }
            let (kind, name) = workload.split_once('/').unwrap_or(("", workload));
            let count = match kind {
                "Deployment" => Api::<Deployment>::namespaced(self.client.clone(), &ns)
                    .get_opt(name)
                    .await?
                    .map(|d| d.spec.replicas.unwrap_or(1)),
                "StatefulSet" => Api::<StatefulSet>::namespaced(self.client.clone(), &ns)
                    .get_opt(name)
                    .await?
                    .map(|d| d.spec.replicas.unwrap_or(1)),
                // Other owners (Jobs, DaemonSets, ReplicaSets of their
                // own): a drained claim nobody holds is not kept.
                _ => Some(0),
            };
            out.insert(key, count);
        }
        Ok(out)
    }

    /// The objects of kind `K` selected by `params` in the keeper's scope.
    async fn list<K>(&self, params: &ListParams) -> Result<Vec<K>, kube::Error>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let mut out = Vec::new();
        for api in self.scope.apis::<K>(&self.client) {
            out.extend(api.list(params).await?.items);
        }
        Ok(out)
    }

    /// One pass: plans and carries out the actions; returns them.
    pub async fn run_once(&self, now: Timestamp) -> Result<Vec<PoolAction>, kube::Error> {
        let managed = ListParams::default().labels(&format!("{MANAGED_BY}={MANAGER}"));
        let claims: Vec<PersistentVolumeClaim> = self.list(&managed).await?;
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let pods: Vec<Pod> = self
            .list(&ListParams::default().labels(CLAIM_LABEL))
            .await?;
        let jobs: Vec<Job> = self
            .list(&ListParams::default().labels(DRAIN_LABEL))
            .await?;
        let replicas = self.replicas(&claims).await?;
        let actions = plan_pools(
            &claims,
            &pods,
            &jobs,
            &replicas,
            now,
            self.config.outbox.idle_before_drain.0,
        );
        let by_name: BTreeMap<(String, String), &PersistentVolumeClaim> = claims
            .iter()
            .map(|c| ((c.namespace().unwrap_or_default(), c.name_any()), c))
            .collect();
        for action in &actions {
            if let Err(e) = self.carry_out(action, &by_name, now).await {
                tracing::warn!(?action, error = %e, "outbox claim action failed; next pass retries");
            }
        }
        Ok(actions)
    }

    async fn carry_out(
        &self,
        action: &PoolAction,
        claims: &BTreeMap<(String, String), &PersistentVolumeClaim>,
        now: Timestamp,
    ) -> Result<(), kube::Error> {
        match action {
            PoolAction::Released { namespace, claim } => {
                let pvc = claims[&(namespace.clone(), claim.clone())];
                // With its resourceVersion: a pod that took the claim
                // meanwhile wins, and the claim stays held.
                let patch = json!({"metadata": {
                    "resourceVersion": pvc.resource_version(),
                    "annotations": {RELEASED_AT: now.to_string()},
                }});
                match Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), namespace)
                    .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
                    r => {
                        r?;
                        tracing::info!(%namespace, %claim, "outbox claim released by its pod");
                    }
                }
            }
            PoolAction::Drain { namespace, claim } => {
                let pvc = claims[&(namespace.clone(), claim.clone())];
                let job = drain_job(pvc, &self.config);
                let job_name = job.name_any();
                // Mark the claim first, with its resourceVersion: if a pod
                // took it meanwhile, this fails and no Job starts.
                let patch = json!({"metadata": {
                    "resourceVersion": pvc.resource_version(),
                    "annotations": {DRAINING: job_name},
                }});
                let api: Api<PersistentVolumeClaim> =
                    Api::namespaced(self.client.clone(), namespace);
                match api
                    .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()),
                    r => r.map(drop)?,
                }
                let jobs: Api<Job> = Api::namespaced(self.client.clone(), namespace);
                match jobs.create(&PostParams::default(), &job).await {
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    r => r.map(drop)?,
                }
                tracing::info!(%namespace, %claim, job = %job_name, "idle outbox claim: draining it");
            }
            PoolAction::Drained {
                namespace,
                claim,
                ok,
                message,
            } => {
                let annotations = if *ok {
                    json!({DRAINING: null, DRAIN_FAILED: null, DRAINED_AT: now.to_string()})
                } else {
                    json!({DRAINING: null, DRAIN_FAILED: message})
                };
                if *ok {
                    tracing::info!(%namespace, %claim, "outbox claim drained");
                } else {
                    tracing::error!(%namespace, %claim, %message, "outbox claim could not be drained; it is kept");
                }
                Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), namespace)
                    .patch(
                        claim,
                        &PatchParams::default(),
                        &Patch::Merge(&json!({"metadata": {"annotations": annotations}})),
                    )
                    .await?;
            }
            PoolAction::Delete { namespace, claim } => {
                let pvc = claims[&(namespace.clone(), claim.clone())];
                // Only if unchanged since it was seen drained and idle.
                let params = DeleteParams {
                    preconditions: Some(kube::api::Preconditions {
                        resource_version: pvc.resource_version(),
                        uid: pvc.uid(),
                    }),
                    ..Default::default()
                };
                match Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), namespace)
                    .delete(claim, &params)
                    .await
                {
                    Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
                    r => r.map(drop)?,
                }
                tracing::info!(%namespace, %claim, "drained outbox claim beyond the workload's replicas: deleted");
            }
        }
        Ok(())
    }

    /// Runs passes every `every` until `stop` resolves.
    pub async fn run(self, every: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.run_once(Timestamp::now()).await {
                tracing::warn!(error = %e, "outbox claim pass failed");
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn owned(kind: &str, owner: &str, labels: &[(&str, &str)], name: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: name.map(Into::into),
            generate_name: Some(format!("{owner}-")),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: kind.into(),
                name: owner.into(),
                uid: "u".into(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn pods_find_their_pool_or_their_own_claim() {
        let deployment = Workload {
            kind: "Deployment".into(),
            name: "orders-api".into(),
        };
        assert_eq!(
            claim_source(&owned(
                "ReplicaSet",
                "orders-api-7d9f8c6b5",
                &[("pod-template-hash", "7d9f8c6b5")],
                None
            ))
            .unwrap(),
            ClaimSource::Pool {
                key: "deployment-orders-api".into(),
                workload: deployment
            }
        );
        assert!(matches!(
            claim_source(&owned("ReplicaSet", "bare-rs", &[], None)).unwrap(),
            ClaimSource::Pool { key, .. } if key == "replicaset-bare-rs"
        ));
        assert_eq!(
            claim_source(&owned("StatefulSet", "db", &[], Some("db-2"))).unwrap(),
            ClaimSource::Named("warren-outbox-db-2".into())
        );
        let bare = ObjectMeta {
            name: Some("one-off".into()),
            ..Default::default()
        };
        assert_eq!(
            claim_source(&bare).unwrap(),
            ClaimSource::Named("warren-outbox-one-off".into())
        );
        let generated = ObjectMeta {
            generate_name: Some("batch-".into()),
            ..Default::default()
        };
        assert!(
            matches!(claim_source(&generated).unwrap(), ClaimSource::Pool { key, .. } if key == "pod-batch")
        );
        assert!(matches!(
            claim_source(&ObjectMeta::default()),
            Err(PoolError::Anonymous)
        ));
    }

    #[test]
    fn long_names_make_distinct_valid_labels() {
        let a = label_value(&format!("deployment-{}", "a".repeat(80)));
        let b = label_value(&format!("deployment-{}b", "a".repeat(79)));
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
        assert_eq!(label_value("short"), "short");
    }

    pub(crate) fn claim(
        name: &str,
        pool: &str,
        annotations: &[(&str, String)],
    ) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                resource_version: Some("1".into()),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY.to_owned(), MANAGER.to_owned()),
                    (POOL_LABEL.to_owned(), pool.to_owned()),
                ])),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.clone()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod_holding(claim: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("pod-{claim}")),
                namespace: Some("shop".into()),
                labels: Some(BTreeMap::from([(CLAIM_LABEL.to_owned(), claim.to_owned())])),
                ..Default::default()
            },
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ago(now: Timestamp, secs: i64) -> String {
        (now - k8s_openapi::jiff::SignedDuration::from_secs(secs)).to_string()
    }

    #[test]
    fn a_free_claim_is_unheld_settled_and_not_draining() {
        let now = Timestamp::now();
        let claims = vec![
            claim("warren-outbox-p-0", "p", &[(CLAIMED_AT, ago(now, 3600))]),
            claim("warren-outbox-p-1", "p", &[(CLAIMED_AT, ago(now, 10))]),
            claim("warren-outbox-p-2", "p", &[(DRAINING, "job".into())]),
            claim("warren-outbox-p-3", "p", &[(CLAIMED_AT, ago(now, 3600))]),
        ];
        let held = held_claims(&[pod_holding("warren-outbox-p-0", "Running")]);
        let free = free_claim(&claims, &held, now).unwrap();
        assert_eq!(free.name_any(), "warren-outbox-p-3");
        // A finished pod no longer holds its claim.
        let held = held_claims(&[pod_holding("warren-outbox-p-0", "Succeeded")]);
        assert_eq!(
            free_claim(&claims, &held, now).unwrap().name_any(),
            "warren-outbox-p-0"
        );
        assert_eq!(next_claim_name("p", &claims), "warren-outbox-p-4");
        assert_eq!(next_claim_name("p", &claims[1..]), "warren-outbox-p-0");
    }

    #[test]
    fn a_named_claim_is_handed_out_by_compare_and_swap_and_never_while_drained() {
        let now = Timestamp::now();
        let free = claim(
            "warren-outbox-db-0",
            "",
            &[(CLAIMED_AT, ago(now, 900)), (RELEASED_AT, ago(now, 600))],
        );
        named_claim_available(&free).unwrap();
        let patch = hand_out_patch(&free, &[], now);
        assert_eq!(patch["metadata"]["resourceVersion"], "1", "{patch}");
        assert_eq!(
            patch["metadata"]["annotations"][CLAIMED_AT],
            now.to_string()
        );
        assert!(
            patch["metadata"]["annotations"]
                .as_object()
                .unwrap()
                .get(RELEASED_AT)
                .is_some_and(serde_json::Value::is_null),
            "the release is forgotten: {patch}"
        );
        let draining = claim(
            "warren-outbox-db-0",
            "",
            &[(DRAINING, "warren-drain-warren-outbox-db-0".into())],
        );
        let e = named_claim_available(&draining).unwrap_err().to_string();
        assert!(
            e.contains(
                "warren-outbox-db-0 is being drained by Job warren-drain-warren-outbox-db-0"
            ),
            "{e}"
        );
        let mut deleting = free.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
        assert!(matches!(
            named_claim_available(&deleting),
            Err(PoolError::Deleting(_))
        ));
    }

    #[test]
    fn a_release_counts_only_after_the_last_hand_out() {
        let now = Timestamp::now();
        let c = |ann: &[(&str, String)]| claim("warren-outbox-p-0", "p", ann);
        let at = |secs| now - k8s_openapi::jiff::SignedDuration::from_secs(secs);
        assert_eq!(
            released_at(&c(&[
                (CLAIMED_AT, ago(now, 60)),
                (RELEASED_AT, ago(now, 30))
            ])),
            Some(at(30))
        );
        assert_eq!(
            released_at(&c(&[
                (CLAIMED_AT, ago(now, 30)),
                (RELEASED_AT, ago(now, 60))
            ])),
            None
        );
        assert_eq!(released_at(&c(&[(CLAIMED_AT, ago(now, 30))])), None);
        assert_eq!(
            released_at(&c(&[(RELEASED_AT, ago(now, 30))])),
            Some(at(30))
        );
    }

    fn job(claim: &str, condition: Option<(&str, &str)>) -> Job {
        Job {
            metadata: ObjectMeta {
                name: Some(job_name(claim)),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            status: condition.map(|(t, msg)| k8s_openapi::api::batch::v1::JobStatus {
                conditions: Some(vec![k8s_openapi::api::batch::v1::JobCondition {
                    type_: t.into(),
                    status: "True".into(),
                    message: Some(msg.into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn idle_claims_are_drained_and_spare_drained_ones_deleted() {
        let now = Timestamp::now();
        let idle = Duration::from_secs(120);
        let c = |name: &str, ann: &[(&str, String)]| claim(name, "deployment-api", ann);
        let claims = vec![
            // held by a running pod: left alone
            c(
                "warren-outbox-deployment-api-0",
                &[(CLAIMED_AT, ago(now, 9000))],
            ),
            // released long enough ago: drain
            c(
                "warren-outbox-deployment-api-1",
                &[(CLAIMED_AT, ago(now, 600)), (RELEASED_AT, ago(now, 300))],
            ),
            // held for days, released, but not long enough ago
            c(
                "warren-outbox-deployment-api-2",
                &[
                    (CLAIMED_AT, ago(now, 9 * 86400)),
                    (RELEASED_AT, ago(now, 30)),
                ],
            ),
            // draining, Job complete
            c(
                "warren-outbox-deployment-api-3",
                &[
                    (CLAIMED_AT, ago(now, 900)),
                    (DRAINING, job_name("warren-outbox-deployment-api-3")),
                ],
            ),
            // draining, Job failed
            c(
                "warren-outbox-deployment-api-4",
                &[
                    (CLAIMED_AT, ago(now, 900)),
                    (DRAINING, job_name("warren-outbox-deployment-api-4")),
                ],
            ),
            // drained after its last use: spare
            c(
                "warren-outbox-deployment-api-5",
                &[(CLAIMED_AT, ago(now, 900)), (DRAINED_AT, ago(now, 800))],
            ),
            c(
                "warren-outbox-deployment-api-6",
                &[(CLAIMED_AT, ago(now, 900)), (DRAINED_AT, ago(now, 800))],
            ),
            // a failed drain is kept and not retried
            c(
                "warren-outbox-deployment-api-7",
                &[
                    (CLAIMED_AT, ago(now, 900)),
                    (DRAIN_FAILED, "refused".into()),
                ],
            ),
        ];
        let pods = vec![pod_holding("warren-outbox-deployment-api-0", "Running")];
        let claims = [
            claims,
            vec![
                // released, not seen so before: record the release, no drain
                // even though its hand-out is long past
                c(
                    "warren-outbox-deployment-api-8",
                    &[(CLAIMED_AT, ago(now, 9 * 86400))],
                ),
                // a release older than the last hand-out does not count
                c(
                    "warren-outbox-deployment-api-9",
                    &[(CLAIMED_AT, ago(now, 600)), (RELEASED_AT, ago(now, 900))],
                ),
                // handed out moments ago, its pod not stored yet: left alone
                c(
                    "warren-outbox-deployment-api-10",
                    &[(CLAIMED_AT, ago(now, 5)), (RELEASED_AT, ago(now, 900))],
                ),
            ],
        ]
        .concat();
        let jobs = vec![
            job("warren-outbox-deployment-api-3", Some(("Complete", ""))),
            job(
                "warren-outbox-deployment-api-4",
                Some(("Failed", "BackoffLimitExceeded")),
            ),
        ];
        let key = ("shop".to_owned(), "deployment-api".to_owned());
        // The Deployment wants 10 of the 11: one spare claim goes, the
        // highest.
        let replicas = BTreeMap::from([(key.clone(), Some(10))]);
        let actions = plan_pools(&claims, &pods, &jobs, &replicas, now, idle);
        let ns = || "shop".to_owned();
        assert_eq!(
            actions,
            vec![
                PoolAction::Drain {
                    namespace: ns(),
                    claim: "warren-outbox-deployment-api-1".into()
                },
                PoolAction::Drained {
                    namespace: ns(),
                    claim: "warren-outbox-deployment-api-3".into(),
                    ok: true,
                    message: "drained".into()
                },
                PoolAction::Drained {
                    namespace: ns(),
                    claim: "warren-outbox-deployment-api-4".into(),
                    ok: false,
                    message: "BackoffLimitExceeded".into()
                },
                PoolAction::Released {
                    namespace: ns(),
                    claim: "warren-outbox-deployment-api-8".into()
                },
                PoolAction::Released {
                    namespace: ns(),
                    claim: "warren-outbox-deployment-api-9".into()
                },
                PoolAction::Delete {
                    namespace: ns(),
                    claim: "warren-outbox-deployment-api-6".into()
                },
            ]
        );
        // Once released for idleBeforeDrain, the long-held claim is drained.
        let mut released = claims[2].clone();
        released
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(RELEASED_AT.into(), ago(now, 121));
        assert_eq!(
            plan_pools(&[released], &[], &[], &BTreeMap::new(), now, idle),
            vec![PoolAction::Drain {
                namespace: ns(),
                claim: "warren-outbox-deployment-api-2".into()
            }]
        );
        // The workload is gone: every drained claim goes, nothing else.
        let replicas = BTreeMap::from([(key, None)]);
        let deletes: Vec<_> = plan_pools(&claims, &pods, &jobs, &replicas, now, idle)
            .into_iter()
            .filter(|a| matches!(a, PoolAction::Delete { .. }))
            .collect();
        assert_eq!(deletes.len(), 2);
        // A Job that vanished before its end was seen counts as not drained.
        let actions = plan_pools(&claims[3..4], &[], &[], &BTreeMap::new(), now, idle);
        assert!(matches!(
            &actions[..],
            [PoolAction::Drained { ok: false, .. }]
        ));
    }

    #[test]
    fn drain_jobs_mount_the_claim_with_the_recorded_broker_env() {
        let env = crate::inject::broker_env(&crate::inject::BrokerBinding {
            secret_name: "rabbit".into(),
            vhost: "/".into(),
        });
        let pvc = claim(
            "warren-outbox-deployment-api-1",
            "deployment-api",
            &[(SIDECAR_ENV, serde_json::to_string(&env).unwrap())],
        );
        let mut config = InjectionConfig::default();
        config.outbox.drain_deadline = warren_crds::duration::HumanDuration::from_secs(900);
        let job = drain_job(&pvc, &config);
        assert_eq!(
            job.spec.as_ref().unwrap().active_deadline_seconds,
            Some(900),
            "a hanging drain ends"
        );
        let spec = job.spec.unwrap().template.spec.unwrap();
        let c = &spec.containers[0];
        assert_eq!(c.args.as_deref(), Some(&["--drain".to_string()][..]));
        assert_eq!(
            spec.security_context.as_ref().unwrap().fs_group,
            Some(crate::inject::SIDECAR_UID),
            "the claim is writable by the sidecar's user"
        );
        let names: Vec<_> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert!(
            names.contains(&"WARREN_BROKER_PASSWORD") && names.contains(&"WARREN_DATA_DIR"),
            "{names:?}"
        );
        let pw = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "WARREN_BROKER_PASSWORD")
            .unwrap();
        assert!(pw.value.is_none(), "credentials by reference only");
        assert_eq!(
            spec.volumes.unwrap()[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "warren-outbox-deployment-api-1"
        );
        let labels = job.metadata.labels.unwrap();
        assert_eq!(
            labels[CLAIM_LABEL], "warren-outbox-deployment-api-1",
            "its pod holds the claim"
        );
        assert!(job.metadata.name.unwrap().len() <= 63);
    }
}
