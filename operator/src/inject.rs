//! Sidecar injection as a pure function: a pod spec, its labels and
//! annotations and the ReliableQueues and RetryPolicies they name in; the
//! same pod spec with the sidecar, its outbox volume, its broker
//! credentials and its rendered consumer configuration out.
//!
//! The admission webhook ([`crate::admission`]) calls it on every Pod
//! CREATE, and `warren-operator inject -f` calls it on the pod templates of
//! Deployments and StatefulSets and on Pods, so both print the same thing.
//! Injecting twice gives the same result as injecting once: the sidecar
//! container is rendered anew and replaces the one already there.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use warren_crds::duration::HumanDuration;
use warren_crds::reliable_queue::ReliableQueue;
use warren_crds::retry::RetryPolicySpec;
use warren_crds::retry_policy::RetryPolicy;
use warren_crds::sidecar_config::{AppEndpoint, ConsumeQueue, SidecarConfig};

/// The opt-in, a label (what the webhook's `objectSelector` matches; the
/// annotation of the same name is accepted too): `enabled` injects the
/// sidecar, `disabled` opts out.
pub const INJECT: &str = "warren.dev/inject";
/// Comma-separated ReliableQueues (same namespace) the app uses.
pub const QUEUES: &str = "warren.dev/queues";
/// Comma-separated subset of [`QUEUES`] the sidecar consumes for the app.
pub const CONSUME: &str = "warren.dev/consume";
/// The app's port for deliveries.
pub const APP_PORT: &str = "warren.dev/app-port";
/// The path deliveries are POSTed to (default `/`).
pub const APP_PATH: &str = "warren.dev/app-path";
/// Most unacknowledged deliveries of each consumed queue at once, 1-65535
/// (default 16): the consumer's AMQP prefetch.
pub const CONSUMER_PREFETCH: &str = "warren.dev/consumer-prefetch";
/// Most deliveries the app is handed at once, over all consumed queues,
/// 1-1000 (default 16).
pub const CONSUMER_CONCURRENCY: &str = "warren.dev/consumer-concurrency";
/// How long the app has to answer one delivery before it counts as failed
/// and is retried, from 1ms to 14m (default 30s).
pub const DELIVERY_TIMEOUT: &str = "warren.dev/delivery-timeout";
/// `native` (init container with `restartPolicy: Always`) or `container`.
pub const SIDECAR_MODE: &str = "warren.dev/sidecar-mode";
/// Where the outbox lives: `claim` (a PersistentVolumeClaim that outlives
/// the pod; the default) or `emptyDir` (gone with the pod).
pub const OUTBOX: &str = "warren.dev/outbox";
/// `<secret>/<key>` (or `<secret>`, key `url`): the Secret key holding the
/// PostgreSQL URL of the app's database; the sidecar relays committed rows
/// of its transactional outbox table (`WARREN_RELAY_POSTGRES`).
pub const RELAY_POSTGRES_SECRET: &str = "warren.dev/relay-postgres-secret";
/// The app's outbox table (default `warren_outbox`).
pub const RELAY_TABLE: &str = "warren.dev/relay-table";
/// A column whose rows are relayed in order per value (e.g. an aggregate id).
pub const RELAY_ORDER_BY: &str = "warren.dev/relay-order-by";
/// Set on injected pods and templates.
pub const INJECTED: &str = "warren.dev/injected";
/// Label on a pod naming the outbox claim it holds.
pub const CLAIM_LABEL: &str = "warren.dev/outbox-claim";

/// The sidecar container's name.
pub const CONTAINER: &str = "warren-sidecar";
/// The outbox volume's name (and a StatefulSet's claim template's).
pub const VOLUME: &str = "warren-outbox";
/// Where the outbox volume is mounted.
pub const DATA_DIR: &str = "/var/lib/warren";
/// The sidecar's app-facing port (localhost only).
pub const API_PORT: i32 = 7171;
/// The sidecar's admin port (probes and metrics).
pub const ADMIN_PORT: i32 = 7172;
/// The user the sidecar runs as (distroless `nonroot`).
pub const SIDECAR_UID: i64 = 65532;

/// Operator-wide injection settings (`--injection-config`, a ConfigMap the
/// Helm chart renders from `sidecar` values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct InjectionConfig {
    /// The sidecar image.
    pub image: String,
    /// Its pull policy.
    pub image_pull_policy: String,
    /// The sidecar container's resources.
    pub resources: Option<ResourceRequirements>,
    /// Time the sidecar has on SIGTERM to forward what its outbox holds.
    pub drain_timeout: HumanDuration,
    /// The pod's termination grace is raised to at least this many
    /// seconds, so the sidecar can drain before it is killed.
    pub termination_grace_period_seconds: i64,
    /// Outbox claims.
    pub outbox: OutboxSettings,
}

impl Default for InjectionConfig {
    fn default() -> Self {
        Self {
            image: format!(
                "ghcr.io/warren-dev/warren-sidecar:{}",
                env!("CARGO_PKG_VERSION")
            ),
            image_pull_policy: "IfNotPresent".into(),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".into(), Quantity("50m".into())),
                    ("memory".into(), Quantity("64Mi".into())),
                ])),
                limits: Some(BTreeMap::from([(
                    "memory".into(),
                    Quantity("256Mi".into()),
                )])),
                ..Default::default()
            }),
            drain_timeout: HumanDuration::from_secs(30),
            termination_grace_period_seconds: 45,
            outbox: OutboxSettings::default(),
        }
    }
}

/// How outbox claims are made and looked after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OutboxSettings {
    /// Storage class of new claims; none: the cluster's default.
    pub storage_class_name: Option<String>,
    /// Size of new claims.
    pub size: String,
    /// Access modes of new claims.
    pub access_modes: Vec<String>,
    /// A claim no pod has held for this long (counted from when the pool
    /// keeper first saw it released) is drained by a Job.
    pub idle_before_drain: HumanDuration,
    /// Finished drain Jobs are removed after this long.
    pub drain_job_ttl: HumanDuration,
    /// A drain Job still running after this long is stopped and counts as
    /// failed (its `activeDeadlineSeconds`).
    pub drain_deadline: HumanDuration,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            storage_class_name: None,
            size: "1Gi".into(),
            access_modes: vec!["ReadWriteOnce".into()],
            idle_before_drain: HumanDuration::from_secs(120),
            drain_job_ttl: HumanDuration::from_secs(600),
            drain_deadline: HumanDuration::from_secs(1800),
        }
    }
}

impl OutboxSettings {
    /// The sidecar's `--max-outbox-bytes` for a claim of [`Self::size`]:
    /// what the volume holds besides the outbox engine's own bytes, with
    /// the sidecar's default segment size and message limit.
    pub fn max_outbox_bytes(&self) -> Result<u64, String> {
        use warren_crds::outbox::{
            DEFAULT_MAX_MESSAGES, DEFAULT_SEGMENT_BYTES, EngineKind, max_bytes_for_volume,
            parse_bytes_quantity,
        };
        let volume = parse_bytes_quantity(&self.size).map_err(|e| format!("outbox.size: {e}"))?;
        max_bytes_for_volume(
            volume,
            EngineKind::Segment,
            DEFAULT_SEGMENT_BYTES,
            DEFAULT_MAX_MESSAGES,
        )
        .ok_or_else(|| {
            format!(
                "outbox.size {} is too small for an outbox: the sidecar needs room for two \
                 {} MiB segments and its frames besides the messages (at least 256Mi)",
                self.size,
                DEFAULT_SEGMENT_BYTES >> 20
            )
        })
    }
}

impl InjectionConfig {
    /// Reads the settings file; a missing file means the defaults.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let cfg: Self = serde_yaml_ng::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("invalid injection config {}: {e}", path.display())
                })?;
                cfg.outbox.max_outbox_bytes().map_err(|e| {
                    anyhow::anyhow!("invalid injection config {}: {e}", path.display())
                })?;
                Ok(cfg)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(anyhow::anyhow!(
                "cannot read injection config {}: {e}",
                path.display()
            )),
        }
    }

    /// The spec of a new outbox claim.
    pub fn claim_spec(&self) -> PersistentVolumeClaimSpec {
        PersistentVolumeClaimSpec {
            access_modes: Some(self.outbox.access_modes.clone()),
            storage_class_name: self.outbox.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".into(),
                    Quantity(self.outbox.size.clone()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Why a pod cannot be injected. The webhook answers with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("annotation {key}: {message}")]
    Annotation { key: &'static str, message: String },
    #[error("label {key}: {message}")]
    Label { key: &'static str, message: String },
    #[error("ReliableQueue {0:?} (named in {QUEUES}) does not exist in this namespace")]
    MissingQueue(String),
    #[error(
        "RetryPolicy {policy:?} (retryPolicyRef of ReliableQueue {queue:?}) does not exist in this namespace"
    )]
    MissingPolicy { queue: String, policy: String },
    #[error("the ReliableQueues in {QUEUES} must share one broker; {0}")]
    MixedBrokers(String),
    #[error("invalid consumer configuration: {0}")]
    Config(String),
}

fn annotation_error(key: &'static str, message: impl Into<String>) -> InjectError {
    InjectError::Annotation {
        key,
        message: message.into(),
    }
}

/// How the sidecar is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+):
    /// it starts before and stops after the app's containers.
    Native,
    /// A regular container next to the app's.
    Container,
}

/// Where the outbox lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxMode {
    /// A PersistentVolumeClaim that outlives the pod.
    Claim,
    /// An emptyDir: acknowledged messages still in it are lost with the pod.
    EmptyDir,
}

/// How the sidecar consumes for the app, as the pod's annotations set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// Prefetch of each consumed queue ([`CONSUMER_PREFETCH`]).
    pub prefetch: u16,
    /// Deliveries at the app at once ([`CONSUMER_CONCURRENCY`]).
    pub concurrency: u32,
    /// Deadline of one delivery ([`DELIVERY_TIMEOUT`]).
    pub timeout: HumanDuration,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            prefetch: 16,
            concurrency: 16,
            timeout: HumanDuration::from_secs(30),
        }
    }
}

/// Largest [`CONSUMER_CONCURRENCY`].
pub const MAX_CONCURRENCY: u32 = 1000;
/// Longest [`DELIVERY_TIMEOUT`]: a delivery is held for the app call and
/// its republish, each bounded by the timeout, and must be settled before
/// the broker's default `consumer_timeout` (30m) closes the channel.
pub const MAX_DELIVERY_TIMEOUT: HumanDuration = HumanDuration::from_secs(14 * 60);

/// A whole number from 1 to `max` in annotation `key`; `None` when absent
/// or empty.
fn count(
    annotations: &BTreeMap<String, String>,
    key: &'static str,
    max: u32,
) -> Result<Option<u32>, InjectError> {
    let value = match annotations.get(key).map(|v| v.trim()) {
        None | Some("") => return Ok(None),
        Some(v) => v,
    };
    match value.parse::<u32>() {
        Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
        _ => Err(annotation_error(
            key,
            format!("{value:?} is not a whole number from 1 to {max}"),
        )),
    }
}

fn parse_consumer(annotations: &BTreeMap<String, String>) -> Result<ConsumerSettings, InjectError> {
    let default = ConsumerSettings::default();
    let prefetch = count(annotations, CONSUMER_PREFETCH, u32::from(u16::MAX))?
        .map(|n| u16::try_from(n).expect("at most u16::MAX"))
        .unwrap_or(default.prefetch);
    let concurrency =
        count(annotations, CONSUMER_CONCURRENCY, MAX_CONCURRENCY)?.unwrap_or(default.concurrency);
    let timeout = match annotations.get(DELIVERY_TIMEOUT).map(|v| v.trim()) {
        None | Some("") => default.timeout,
        Some(v) => match v.parse::<HumanDuration>() {
            Ok(d) if !d.0.is_zero() && d <= MAX_DELIVERY_TIMEOUT => d,
            _ => {
                return Err(annotation_error(
                    DELIVERY_TIMEOUT,
                    format!(
                        "{v:?} is not a duration from 1ms to {MAX_DELIVERY_TIMEOUT} \
                         (a number with a unit ms, s, m or h, e.g. \"30s\")"
                    ),
                ));
            }
        },
    };
    Ok(ConsumerSettings {
        prefetch,
        concurrency,
        timeout,
    })
}

/// What a pod's annotations ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub queues: Vec<String>,
    pub consume: Vec<String>,
    pub app_port: Option<u16>,
    pub app_path: String,
    pub mode: SidecarMode,
    pub outbox: OutboxMode,
    /// The transactional outbox relay, when asked for.
    pub relay: Option<RelayRequest>,
    /// Prefetch, concurrency and delivery timeout of the consumed queues.
    pub consumer: ConsumerSettings,
}

/// Where the relay's database URL comes from, and how it relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayRequest {
    /// The Secret holding the URL.
    pub secret: String,
    /// Its key.
    pub key: String,
    /// `--relay-table`, when not the default.
    pub table: Option<String>,
    /// `--relay-order-by`, when ordering by key.
    pub order_by: Option<String>,
}

fn parse_relay(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<RelayRequest>, InjectError> {
    let nonempty = |k: &str| {
        annotations
            .get(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let Some(value) = nonempty(RELAY_POSTGRES_SECRET) else {
        for k in [RELAY_TABLE, RELAY_ORDER_BY] {
            if nonempty(k).is_some() {
                return Err(annotation_error(
                    RELAY_POSTGRES_SECRET,
                    format!("needed with {k}"),
                ));
            }
        }
        return Ok(None);
    };
    let (secret, key) = match value.split_once('/') {
        Some((s, k)) => (s.trim().to_owned(), k.trim().to_owned()),
        None => (value.clone(), "url".to_owned()),
    };
    if !is_dns_subdomain(&secret) {
        return Err(annotation_error(
            RELAY_POSTGRES_SECRET,
            format!("{secret:?} is not a valid Secret name (want <secret>/<key>)"),
        ));
    }
    let key_ok = !key.is_empty()
        && key.len() <= 253
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !key_ok {
        return Err(annotation_error(
            RELAY_POSTGRES_SECRET,
            format!("{key:?} is not a valid Secret key"),
        ));
    }
    Ok(Some(RelayRequest {
        secret,
        key,
        table: nonempty(RELAY_TABLE),
        order_by: nonempty(RELAY_ORDER_BY),
    }))
}

/// The sidecar's relay environment: the URL from the Secret (required, so
/// a missing key keeps the pod from starting rather than relaying nothing).
pub fn relay_env(relay: &RelayRequest) -> Vec<EnvVar> {
    let mut out = vec![EnvVar {
        name: "WARREN_RELAY_POSTGRES".into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: relay.secret.clone(),
                key: relay.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    }];
    if let Some(t) = &relay.table {
        out.push(env("WARREN_RELAY_TABLE", t.clone()));
    }
    if let Some(k) = &relay.order_by {
        out.push(env("WARREN_RELAY_ORDER_BY", k.clone()));
    }
    out
}

fn list(value: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !out.iter().any(|o| o == item) {
            out.push(item.to_owned());
        }
    }
    out
}

/// Whether a pod (or pod template) asks for the sidecar: the label or the
/// annotation [`INJECT`] says `enabled`, and neither says `disabled` (an
/// opt-out wins). Any other value of either is an error.
pub fn opted_in(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Result<bool, InjectError> {
    let label = match labels.get(INJECT).map(|v| v.trim()) {
        None => None,
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        Some(other) => {
            return Err(InjectError::Label {
                key: INJECT,
                message: format!("{other:?} is neither \"enabled\" nor \"disabled\""),
            });
        }
    };
    let annotation = annotations
        .contains_key(INJECT)
        .then(|| {
            choice(
                annotations,
                INJECT,
                [("enabled", true), ("disabled", false)],
                false,
            )
        })
        .transpose()?;
    Ok(match (label, annotation) {
        (Some(false), _) | (_, Some(false)) => false,
        (l, a) => l.or(a).unwrap_or(false),
    })
}

/// Reads what a pod asks for: `Ok(None)` when injection is not asked for
/// (see [`opted_in`]); the settings come from the annotations.
pub fn parse_request(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<Request>, InjectError> {
    if !opted_in(labels, annotations)? {
        return Ok(None);
    }
    let queues = annotations.get(QUEUES).map(|v| list(v)).unwrap_or_default();
    if queues.is_empty() {
        return Err(annotation_error(
            QUEUES,
            "name at least one ReliableQueue the app uses",
        ));
    }
    for q in &queues {
        if !is_dns_subdomain(q) {
            return Err(annotation_error(
                QUEUES,
                format!("{q:?} is not a valid resource name"),
            ));
        }
    }
    let app_port = match annotations.get(APP_PORT).map(|v| v.trim()) {
        None | Some("") => None,
        Some(p) => match p.parse::<u16>() {
            Ok(port)
                if port > 0 && i32::from(port) != API_PORT && i32::from(port) != ADMIN_PORT =>
            {
                Some(port)
            }
            Ok(port) if port > 0 => {
                return Err(annotation_error(
                    APP_PORT,
                    format!("{port} is the sidecar's own port"),
                ));
            }
            _ => {
                return Err(annotation_error(
                    APP_PORT,
                    format!("{p:?} is not a port number (1-65535)"),
                ));
            }
        },
    };
    let consume = match annotations.get(CONSUME) {
        Some(v) => list(v),
        None if app_port.is_some() => queues.clone(),
        None => Vec::new(),
    };
    if let Some(stray) = consume.iter().find(|c| !queues.contains(c)) {
        return Err(annotation_error(
            CONSUME,
            format!("{stray:?} is not one of {QUEUES}"),
        ));
    }
    if !consume.is_empty() && app_port.is_none() {
        return Err(annotation_error(
            APP_PORT,
            format!(
                "needed to deliver the consumed queues ({})",
                consume.join(", ")
            ),
        ));
    }
    let app_path = annotations
        .get(APP_PATH)
        .map(|p| p.trim().to_owned())
        .unwrap_or_else(|| "/".into());
    if !app_path.starts_with('/') || app_path.contains(char::is_whitespace) {
        return Err(annotation_error(
            APP_PATH,
            format!("{app_path:?} must be a path starting with /"),
        ));
    }
    let mode = choice(
        annotations,
        SIDECAR_MODE,
        [
            ("native", SidecarMode::Native),
            ("container", SidecarMode::Container),
        ],
        SidecarMode::Native,
    )?;
    let outbox = choice(
        annotations,
        OUTBOX,
        [
            ("claim", OutboxMode::Claim),
            ("emptyDir", OutboxMode::EmptyDir),
        ],
        OutboxMode::Claim,
    )?;
    let relay = parse_relay(annotations)?;
    let consumer = parse_consumer(annotations)?;
    if consume.is_empty()
        && let Some(key) = [CONSUMER_PREFETCH, CONSUMER_CONCURRENCY, DELIVERY_TIMEOUT]
            .into_iter()
            .find(|k| annotations.get(*k).is_some_and(|v| !v.trim().is_empty()))
    {
        return Err(annotation_error(
            key,
            format!(
                "applies to consumed queues, and the pod consumes none (see {APP_PORT} and {CONSUME})"
            ),
        ));
    }
    Ok(Some(Request {
        queues,
        consume,
        app_port,
        app_path,
        mode,
        outbox,
        relay,
        consumer,
    }))
}

/// The value of a two-way annotation; `default` when it is absent.
fn choice<T: Copy>(
    annotations: &BTreeMap<String, String>,
    key: &'static str,
    options: [(&str, T); 2],
    default: T,
) -> Result<T, InjectError> {
    let Some(value) = annotations.get(key).map(|v| v.trim()) else {
        return Ok(default);
    };
    options
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            annotation_error(
                key,
                format!(
                    "{value:?} is neither \"{}\" nor \"{}\"",
                    options[0].0, options[1].0
                ),
            )
        })
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The Warren resources of one namespace that injection reads.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub queues: BTreeMap<String, ReliableQueue>,
    pub policies: BTreeMap<String, RetryPolicy>,
}

/// The broker Secret and vhost every named queue shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerBinding {
    pub secret_name: String,
    pub vhost: String,
}

/// Everything the sidecar container needs, resolved from the resources.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub broker: BrokerBinding,
    pub config: SidecarConfig,
}

/// Looks up the named queues and their policies and renders the consumer
/// configuration.
pub fn resolve(request: &Request, resources: &Resources) -> Result<Resolved, InjectError> {
    let mut broker: Option<(String, BrokerBinding)> = None;
    let mut queues = Vec::new();
    for name in &request.queues {
        let rq = resources
            .queues
            .get(name)
            .ok_or_else(|| InjectError::MissingQueue(name.clone()))?;
        let this = BrokerBinding {
            secret_name: rq.spec.broker.secret_name.clone(),
            vhost: rq.spec.broker.vhost.clone(),
        };
        match &broker {
            None => broker = Some((name.clone(), this)),
            Some((first, b)) if *b != this => {
                return Err(InjectError::MixedBrokers(format!(
                    "{first:?} uses Secret {:?} vhost {:?}, {name:?} uses Secret {:?} vhost {:?}",
                    b.secret_name, b.vhost, this.secret_name, this.vhost
                )));
            }
            Some(_) => {}
        }
        if !request.consume.contains(name) {
            continue;
        }
        let retry_policy: RetryPolicySpec = match &rq.spec.retry_policy_ref {
            Some(p) => resources
                .policies
                .get(p)
                .map(|p| p.spec.clone())
                .ok_or_else(|| InjectError::MissingPolicy {
                    queue: name.clone(),
                    policy: p.clone(),
                })?,
            None => RetryPolicySpec::default(),
        };
        queues.push(ConsumeQueue {
            name: rq.queue_name(),
            prefetch: request.consumer.prefetch,
            parking_lot: Some(rq.parking_lot_name()),
            url: None,
            retry_policy,
        });
    }
    let config = SidecarConfig {
        app: request.app_port.map(|port| AppEndpoint {
            url: format!("http://127.0.0.1:{port}{}", request.app_path),
            timeout: request.consumer.timeout,
            concurrency: request.consumer.concurrency,
        }),
        queues,
        ..SidecarConfig::default()
    };
    config
        .validate()
        .map_err(|e| InjectError::Config(e.to_string()))?;
    Ok(Resolved {
        broker: broker.expect("at least one queue").1,
        config,
    })
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(true),
            }),
            ..Default::default()
        }),
    }
}

/// The sidecar's broker environment: every key a broker Secret may have,
/// each optional (a `uri` Secret and a Cluster Operator Secret both work),
/// plus the vhost. The drain Job uses the same.
pub fn broker_env(broker: &BrokerBinding) -> Vec<EnvVar> {
    let s = broker.secret_name.as_str();
    vec![
        secret_env("WARREN_BROKER_URI", s, "uri"),
        secret_env("WARREN_BROKER_CONNECTION_STRING", s, "connection_string"),
        secret_env("WARREN_BROKER_HOST", s, "host"),
        secret_env("WARREN_BROKER_PORT", s, "port"),
        secret_env("WARREN_BROKER_USERNAME", s, "username"),
        secret_env("WARREN_BROKER_PASSWORD", s, "password"),
        env("WARREN_BROKER_VHOST", broker.vhost.clone()),
    ]
}

/// The hardened security context of Warren's containers.
pub fn security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(SIDECAR_UID),
        run_as_group: Some(SIDECAR_UID),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// The pod-level settings that make the outbox volume writable by the
/// sidecar's user: the volume's group is the sidecar's.
pub fn outbox_pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        fs_group: Some(SIDECAR_UID),
        fs_group_change_policy: Some("OnRootMismatch".into()),
        ..Default::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(ADMIN_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// The sidecar container.
pub fn sidecar_container(
    resolved: &Resolved,
    mode: SidecarMode,
    cfg: &InjectionConfig,
) -> Container {
    let mut env_vars = vec![
        env("WARREN_DATA_DIR", DATA_DIR),
        env("WARREN_LISTEN", format!("127.0.0.1:{API_PORT}")),
        env("WARREN_ADMIN_LISTEN", format!("0.0.0.0:{ADMIN_PORT}")),
        env("WARREN_DRAIN_TIMEOUT", cfg.drain_timeout.to_string()),
        env("WARREN_LOG_FORMAT", "json"),
    ];
    // Checked when the settings are loaded; the sidecar's own default
    // (derived from the volume it finds) applies otherwise.
    if let Ok(limit) = cfg.outbox.max_outbox_bytes() {
        env_vars.push(env("WARREN_MAX_OUTBOX_BYTES", limit.to_string()));
    }
    env_vars.extend(broker_env(&resolved.broker));
    if !resolved.config.queues.is_empty() {
        env_vars.push(env(
            "WARREN_CONFIG_JSON",
            serde_json::to_string(&resolved.config).expect("config serialises"),
        ));
    }
    Container {
        name: CONTAINER.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        restart_policy: (mode == SidecarMode::Native).then(|| "Always".into()),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some("warren-admin".into()),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: cfg.resources.clone(),
        security_context: Some(security_context()),
        startup_probe: Some(probe("/healthz", 1, 60)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        volume_mounts: Some(vec![VolumeMount {
            name: VOLUME.into(),
            mount_path: DATA_DIR.into(),
            ..Default::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// What injection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The pod spec now holds the sidecar.
    Injected,
    /// Not asked for (no annotation, or `disabled`): nothing changed.
    Skipped,
}

/// Injects the sidecar into a pod (or pod template): `meta` holds the
/// annotations and gets [`INJECTED`]; `spec` gets the sidecar, the outbox
/// volume (an emptyDir placeholder until a claim is bound, unless
/// `outbox_volume` is false: a StatefulSet's claim template provides it),
/// `WARREN_URL` in the app's containers, and a termination grace long
/// enough to drain.
pub fn inject(
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
    resources: &Resources,
    cfg: &InjectionConfig,
    outbox_volume: bool,
) -> Result<Outcome, InjectError> {
    let annotations = meta.annotations.clone().unwrap_or_default();
    let labels = meta.labels.clone().unwrap_or_default();
    let Some(request) = parse_request(&labels, &annotations)? else {
        return Ok(Outcome::Skipped);
    };
    let resolved = resolve(&request, resources)?;
    let mut container = sidecar_container(&resolved, request.mode, cfg);
    if let Some(relay) = &request.relay {
        container
            .env
            .get_or_insert_with(Vec::new)
            .extend(relay_env(relay));
    }

    // Render anew: drop a sidecar from an earlier injection wherever it is.
    spec.containers.retain(|c| c.name != CONTAINER);
    if let Some(init) = spec.init_containers.as_mut() {
        init.retain(|c| c.name != CONTAINER);
    }
    for c in spec.containers.iter_mut() {
        let env = c.env.get_or_insert_with(Vec::new);
        if !env.iter().any(|e| e.name == "WARREN_URL") {
            env.push(self::env(
                "WARREN_URL",
                format!("http://127.0.0.1:{API_PORT}"),
            ));
        }
    }
    match request.mode {
        // First, so that the app's own init containers can publish too.
        SidecarMode::Native => spec
            .init_containers
            .get_or_insert_with(Vec::new)
            .insert(0, container),
        SidecarMode::Container => spec.containers.push(container),
    }
    if spec.init_containers.as_ref().is_some_and(Vec::is_empty) {
        spec.init_containers = None;
    }

    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    let existing = volumes.iter().position(|v| v.name == VOLUME);
    match (request.outbox, existing) {
        (OutboxMode::EmptyDir, Some(i)) => volumes[i] = empty_dir_volume(),
        (OutboxMode::EmptyDir, None) => volumes.push(empty_dir_volume()),
        // A bound claim (or a placeholder) from an earlier injection stays.
        (OutboxMode::Claim, Some(_)) => {}
        (OutboxMode::Claim, None) if outbox_volume => volumes.push(empty_dir_volume()),
        (OutboxMode::Claim, None) => {}
    }
    let bound = volumes
        .iter()
        .find(|v| v.name == VOLUME)
        .and_then(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.clone());
    if volumes.is_empty() {
        spec.volumes = None;
    }
    if let Some(claim) = bound {
        // A claim bound before (a StatefulSet's claim template): the pod
        // is labelled with it, so the claim counts as held.
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(CLAIM_LABEL.into(), claim);
    }

    // A claim's file system belongs to root unless the pod names a group
    // for its volumes; the sidecar's user must be able to write it. A group
    // the pod already names is kept: every container gets it.
    let pod_security = spec
        .security_context
        .get_or_insert_with(PodSecurityContext::default);
    if pod_security.fs_group.is_none() {
        let wanted = outbox_pod_security_context();
        pod_security.fs_group = wanted.fs_group;
        pod_security.fs_group_change_policy = pod_security
            .fs_group_change_policy
            .take()
            .or(wanted.fs_group_change_policy);
    }

    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
    spec.termination_grace_period_seconds = Some(grace.max(cfg.termination_grace_period_seconds));
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED.into(), "true".into());
    // Opted in by the annotation alone, a template's pods would not reach
    // the webhook (it sees labelled pods only) and would run with the
    // placeholder outbox: the label makes them.
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECT.into(), "enabled".into());
    Ok(Outcome::Injected)
}

fn empty_dir_volume() -> Volume {
    Volume {
        name: VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }
}

/// What a pod (or template) asks for, if it asks and the ask is valid.
pub fn request_of(meta: &ObjectMeta) -> Option<Request> {
    let empty = BTreeMap::new();
    parse_request(
        meta.labels.as_ref().unwrap_or(&empty),
        meta.annotations.as_ref().unwrap_or(&empty),
    )
    .ok()
    .flatten()
}

/// Whether the pod's outbox volume still needs a claim bound to it.
pub fn needs_claim(meta: &ObjectMeta, spec: &PodSpec) -> bool {
    let wants_claim = request_of(meta).is_some_and(|r| r.outbox == OutboxMode::Claim);
    wants_claim
        && spec
            .volumes
            .iter()
            .flatten()
            .any(|v| v.name == VOLUME && v.persistent_volume_claim.is_none())
}

/// Points the outbox volume at `claim` and labels the pod with it.
pub fn bind_claim(meta: &mut ObjectMeta, spec: &mut PodSpec, claim: &str) {
    for v in spec.volumes.iter_mut().flatten() {
        if v.name == VOLUME {
            *v = Volume {
                name: VOLUME.into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.into(),
                    read_only: None,
                }),
                ..Default::default()
            };
        }
    }
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(CLAIM_LABEL.into(), claim.into());
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_crds::reliable_queue::ReliableQueueSpec;

    fn queue(name: &str, secret: &str, policy: Option<&str>) -> ReliableQueue {
        let mut spec: ReliableQueueSpec = serde_json::from_value(serde_json::json!({
            "broker": {"secretName": secret},
            "exchange": {"name": "shop"},
            "queue": {"bindings": [{"routingKey": name}]},
        }))
        .unwrap();
        spec.retry_policy_ref = policy.map(Into::into);
        let mut rq = ReliableQueue::new(name, spec);
        rq.metadata.namespace = Some("shop".into());
        rq
    }

    fn resources() -> Resources {
        let policy: RetryPolicy = RetryPolicy::new(
            "patient",
            serde_json::from_value(serde_json::json!({"maxRetries": 9})).unwrap(),
        );
        Resources {
            queues: BTreeMap::from([
                (
                    "orders".into(),
                    queue("orders", "rabbit-default-user", Some("patient")),
                ),
                (
                    "payments".into(),
                    queue("payments", "rabbit-default-user", None),
                ),
                ("audit".into(), queue("audit", "other-broker", None)),
                (
                    "dangling".into(),
                    queue("dangling", "rabbit-default-user", Some("nope")),
                ),
            ]),
            policies: BTreeMap::from([("patient".into(), policy)]),
        }
    }

    fn pod(annotations: &[(&str, &str)]) -> (ObjectMeta, PodSpec) {
        let meta = ObjectMeta {
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        };
        let spec = PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("shop/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        (meta, spec)
    }

    fn run(annotations: &[(&str, &str)]) -> Result<(Outcome, ObjectMeta, PodSpec), InjectError> {
        let (mut meta, mut spec) = pod(annotations);
        let outcome = inject(
            &mut meta,
            &mut spec,
            &resources(),
            &InjectionConfig::default(),
            true,
        )?;
        Ok((outcome, meta, spec))
    }

    fn env_of(c: &Container, name: &str) -> Option<EnvVar> {
        c.env.iter().flatten().find(|e| e.name == name).cloned()
    }

    fn sidecar(spec: &PodSpec) -> &Container {
        spec.init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .find(|c| c.name == CONTAINER)
            .expect("sidecar injected")
    }

    #[test]
    fn the_relay_annotation_renders_the_database_url_from_its_secret() {
        let (_, _, spec) = run(&[
            (INJECT, "enabled"),
            (QUEUES, "orders"),
            (RELAY_POSTGRES_SECRET, "shop-db/relay-url"),
            (RELAY_ORDER_BY, "aggregate_id"),
        ])
        .unwrap();
        let s = sidecar(&spec);
        let url = env_of(s, "WARREN_RELAY_POSTGRES").expect("relay URL rendered");
        assert_eq!(url.value, None, "never inline: {url:?}");
        let r = url.value_from.unwrap().secret_key_ref.unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), ("shop-db", "relay-url"));
        assert_eq!(r.optional, Some(false));
        assert_eq!(
            env_of(s, "WARREN_RELAY_ORDER_BY").unwrap().value.as_deref(),
            Some("aggregate_id")
        );
        assert!(env_of(s, "WARREN_RELAY_TABLE").is_none());
        // The key defaults to `url`.
        let (_, _, spec) = run(&[
            (INJECT, "enabled"),
            (QUEUES, "orders"),
            (RELAY_POSTGRES_SECRET, "shop-db"),
        ])
        .unwrap();
        let r = env_of(sidecar(&spec), "WARREN_RELAY_POSTGRES")
            .unwrap()
            .value_from
            .unwrap()
            .secret_key_ref
            .unwrap();
        assert_eq!(r.key, "url");
        // Without the annotation there is no relay.
        let (_, _, spec) = run(&[(INJECT, "enabled"), (QUEUES, "orders")]).unwrap();
        assert!(env_of(sidecar(&spec), "WARREN_RELAY_POSTGRES").is_none());
        for bad in [
            &[(RELAY_POSTGRES_SECRET, "Not_A_Name/url")][..],
            &[(RELAY_POSTGRES_SECRET, "db/bad key")][..],
            &[(RELAY_TABLE, "outbox")][..],
        ] {
            let mut a = vec![(INJECT, "enabled"), (QUEUES, "orders")];
            a.extend_from_slice(bad);
            let e = run(&a).unwrap_err().to_string();
            assert!(e.contains(RELAY_POSTGRES_SECRET), "{e}");
        }
    }

    #[test]
    fn the_label_opts_in_and_an_opt_out_anywhere_wins() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        type Pairs<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Pairs, Pairs, bool)] = &[
            (&[(INJECT, "enabled")], &[], true),
            (&[], &[(INJECT, "enabled")], true),
            (&[(INJECT, "enabled")], &[(INJECT, "enabled")], true),
            (&[(INJECT, "disabled")], &[(INJECT, "enabled")], false),
            (&[(INJECT, "enabled")], &[(INJECT, "disabled")], false),
            (&[], &[], false),
        ];
        for (labels, annotations, want) in cases {
            assert_eq!(
                opted_in(&map(labels), &map(annotations)).unwrap(),
                *want,
                "{labels:?} {annotations:?}"
            );
        }
        let e = opted_in(&map(&[(INJECT, "true")]), &map(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("label warren.dev/inject: \"true\""), "{e}");

        // Labelled, with the settings in annotations: injected.
        let (mut meta, mut spec) = pod(&[(QUEUES, "orders")]);
        meta.labels = Some(map(&[(INJECT, "enabled")]));
        let outcome = inject(
            &mut meta,
            &mut spec,
            &resources(),
            &InjectionConfig::default(),
            true,
        )
        .unwrap();
        assert_eq!(outcome, Outcome::Injected);
        // Annotated only: injected, and labelled so its pods reach the
        // webhook.
        let (_, meta, _) = run(&[(INJECT, "enabled"), (QUEUES, "orders")]).unwrap();
        assert_eq!(meta.labels.unwrap()[INJECT], "enabled");
    }

    #[test]
    fn no_annotation_or_opt_out_changes_nothing() {
        for annotations in [&[][..], &[(INJECT, "disabled"), (QUEUES, "orders")][..]] {
            let (outcome, meta, spec) = run(annotations).unwrap();
            assert_eq!(outcome, Outcome::Skipped);
            assert_eq!((meta, spec), pod(annotations));
        }
    }

    #[test]
    fn native_sidecar_with_volume_credentials_probes_and_hardening() {
        let (outcome, meta, spec) = run(&[(INJECT, "enabled"), (QUEUES, "orders")]).unwrap();
        assert_eq!(outcome, Outcome::Injected);
        assert_eq!(meta.annotations.unwrap()[INJECTED], "true");
        let init = spec.init_containers.as_ref().unwrap();
        assert_eq!(init[0].name, CONTAINER, "the sidecar starts first");
        let s = &init[0];
        assert_eq!(s.restart_policy.as_deref(), Some("Always"));
        assert!(!spec.containers.iter().any(|c| c.name == CONTAINER));
        // Outbox volume, mounted at the data dir.
        let vol = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == VOLUME)
            .unwrap();
        assert!(
            vol.empty_dir.is_some(),
            "a placeholder until a claim is bound"
        );
        assert_eq!(s.volume_mounts.as_ref().unwrap()[0].mount_path, DATA_DIR);
        assert_eq!(
            env_of(s, "WARREN_DATA_DIR").unwrap().value.as_deref(),
            Some(DATA_DIR)
        );
        // Credentials by reference only, every key optional.
        for (var, key) in [
            ("WARREN_BROKER_URI", "uri"),
            ("WARREN_BROKER_USERNAME", "username"),
            ("WARREN_BROKER_PASSWORD", "password"),
            ("WARREN_BROKER_HOST", "host"),
            ("WARREN_BROKER_PORT", "port"),
        ] {
            let e = env_of(s, var).unwrap();
            assert!(e.value.is_none(), "{var} must not carry a value");
            let r = e.value_from.unwrap().secret_key_ref.unwrap();
            assert_eq!(
                (r.name.as_str(), r.key.as_str(), r.optional),
                ("rabbit-default-user", key, Some(true))
            );
        }
        assert_eq!(
            env_of(s, "WARREN_BROKER_VHOST").unwrap().value.as_deref(),
            Some("/")
        );
        // No app port: the sidecar only publishes.
        assert!(env_of(s, "WARREN_CONFIG_JSON").is_none());
        // Probes on the admin port.
        let get = |p: &Option<Probe>| p.as_ref().unwrap().http_get.clone().unwrap();
        assert_eq!(get(&s.readiness_probe).path.as_deref(), Some("/readyz"));
        assert_eq!(get(&s.liveness_probe).path.as_deref(), Some("/healthz"));
        assert_eq!(get(&s.startup_probe).port, IntOrString::Int(ADMIN_PORT));
        // Hardening.
        let sc = s.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert!(s.resources.as_ref().unwrap().limits.is_some());
        // The app finds the sidecar, and the pod has time to drain.
        assert_eq!(
            env_of(&spec.containers[0], "WARREN_URL")
                .unwrap()
                .value
                .as_deref(),
            Some("http://127.0.0.1:7171")
        );
        assert_eq!(spec.termination_grace_period_seconds, Some(45));
        // The claim is writable by the sidecar's user.
        assert_eq!(spec.security_context.unwrap().fs_group, Some(SIDECAR_UID));
    }

    #[test]
    fn consumed_queues_render_the_consumer_config() {
        let (_, _, spec) = run(&[
            (INJECT, "enabled"),
            (QUEUES, "orders, payments"),
            (APP_PORT, "8080"),
            (APP_PATH, "/messages"),
        ])
        .unwrap();
        let json = env_of(sidecar(&spec), "WARREN_CONFIG_JSON")
            .unwrap()
            .value
            .unwrap();
        let config: SidecarConfig = serde_json::from_str(&json).unwrap();
        config.validate().unwrap();
        assert_eq!(config.app.unwrap().url, "http://127.0.0.1:8080/messages");
        let names: Vec<_> = config.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["orders", "payments"]);
        assert_eq!(
            config.queues[0].retry_policy.max_retries, 9,
            "the referenced policy"
        );
        assert_eq!(config.queues[1].retry_policy, RetryPolicySpec::default());
        assert_eq!(
            config.queues[0].parking_lot.as_deref(),
            Some("orders.parked")
        );

        // warren.dev/consume narrows it.
        let (_, _, spec) = run(&[
            (INJECT, "enabled"),
            (QUEUES, "orders,payments"),
            (CONSUME, "payments"),
            (APP_PORT, "8080"),
        ])
        .unwrap();
        let json = env_of(sidecar(&spec), "WARREN_CONFIG_JSON")
            .unwrap()
            .value
            .unwrap();
        let config: SidecarConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(config.queues.len(), 1);
        assert_eq!(config.queues[0].name, "payments");
        assert_eq!(config.app.unwrap().url, "http://127.0.0.1:8080/");
    }

    fn rendered_config(spec: &PodSpec) -> SidecarConfig {
        let json = env_of(sidecar(spec), "WARREN_CONFIG_JSON")
            .expect("a consumer config")
            .value
            .unwrap();
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn consumer_settings_come_from_the_pods_annotations() {
        let consuming = [
            (INJECT, "enabled"),
            (QUEUES, "orders,payments"),
            (APP_PORT, "8080"),
        ];
        // Without the annotations: the defaults.
        let (_, _, spec) = run(&consuming).unwrap();
        let config = rendered_config(&spec);
        let app = config.app.as_ref().unwrap();
        assert_eq!(
            (app.concurrency, app.timeout),
            (16, HumanDuration::from_secs(30))
        );
        assert!(config.queues.iter().all(|q| q.prefetch == 16));

        let with = |extra: &[(&'static str, &'static str)]| {
            let mut a = consuming.to_vec();
            a.extend_from_slice(extra);
            let (_, _, spec) = run(&a).unwrap();
            let config = rendered_config(&spec);
            config.validate().unwrap();
            config
        };
        let config = with(&[
            (CONSUMER_PREFETCH, "50"),
            (CONSUMER_CONCURRENCY, " 4 "),
            (DELIVERY_TIMEOUT, "1m30s"),
        ]);
        let app = config.app.as_ref().unwrap();
        assert_eq!(app.concurrency, 4);
        assert_eq!(app.timeout, HumanDuration::from_secs(90));
        let prefetch: Vec<(&str, u16)> = config
            .queues
            .iter()
            .map(|q| (q.name.as_str(), q.prefetch))
            .collect();
        assert_eq!(prefetch, [("orders", 50), ("payments", 50)]);

        // The bounds are accepted, and the sidecar accepts what they render.
        let config = with(&[
            (CONSUMER_PREFETCH, "65535"),
            (CONSUMER_CONCURRENCY, "1000"),
            (DELIVERY_TIMEOUT, "14m"),
        ]);
        assert_eq!(config.queues[0].prefetch, u16::MAX);
        let app = config.app.as_ref().unwrap();
        assert_eq!(app.concurrency, MAX_CONCURRENCY);
        assert_eq!(app.timeout, MAX_DELIVERY_TIMEOUT);
        let config = with(&[
            (CONSUMER_PREFETCH, "1"),
            (CONSUMER_CONCURRENCY, "1"),
            (DELIVERY_TIMEOUT, "1ms"),
        ]);
        assert_eq!(config.queues[0].prefetch, 1);
        assert_eq!(config.app.unwrap().timeout, HumanDuration::from_millis(1));
    }

    #[test]
    fn bad_consumer_settings_are_refused_naming_the_annotation_and_range() {
        let cases: &[(&str, &str, &str)] = &[
            (
                CONSUMER_PREFETCH,
                "lots",
                "\"lots\" is not a whole number from 1 to 65535",
            ),
            (
                CONSUMER_PREFETCH,
                "0",
                "\"0\" is not a whole number from 1 to 65535",
            ),
            (CONSUMER_PREFETCH, "65536", "from 1 to 65535"),
            (CONSUMER_PREFETCH, "-1", "from 1 to 65535"),
            (CONSUMER_PREFETCH, "2.5", "from 1 to 65535"),
            (
                CONSUMER_CONCURRENCY,
                "0",
                "\"0\" is not a whole number from 1 to 1000",
            ),
            (CONSUMER_CONCURRENCY, "1001", "from 1 to 1000"),
            (CONSUMER_CONCURRENCY, "many", "from 1 to 1000"),
            (
                DELIVERY_TIMEOUT,
                "30",
                "\"30\" is not a duration from 1ms to 14m",
            ),
            (DELIVERY_TIMEOUT, "0s", "from 1ms to 14m"),
            (DELIVERY_TIMEOUT, "15m", "from 1ms to 14m"),
            (DELIVERY_TIMEOUT, "1d", "from 1ms to 14m"),
            (DELIVERY_TIMEOUT, "soon", "e.g. \"30s\""),
        ];
        for (key, value, expected) in cases {
            let annotations = [
                (INJECT, "enabled"),
                (QUEUES, "orders"),
                (APP_PORT, "8080"),
                (*key, *value),
            ];
            let (mut meta, mut spec) = pod(&annotations);
            let before = spec.clone();
            let e = inject(
                &mut meta,
                &mut spec,
                &resources(),
                &InjectionConfig::default(),
                true,
            )
            .unwrap_err();
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("annotation {key}: ")),
                "{key}={value}: {text}"
            );
            assert!(text.contains(expected), "{key}={value}: {text}");
            assert_eq!(spec, before, "a failed injection changes nothing");
        }
        // A setting for a pod that consumes nothing would have no effect.
        let e = run(&[
            (INJECT, "enabled"),
            (QUEUES, "orders"),
            (CONSUMER_CONCURRENCY, "4"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("annotation warren.dev/consumer-concurrency: applies to consumed queues"),
            "{e}"
        );
        assert!(e.contains(APP_PORT), "{e}");
    }

    #[test]
    fn container_mode_and_empty_dir_outbox() {
        let (_, _, spec) = run(&[
            (INJECT, "enabled"),
            (QUEUES, "orders"),
            (SIDECAR_MODE, "container"),
            (OUTBOX, "emptyDir"),
        ])
        .unwrap();
        assert!(spec.init_containers.is_none());
        let s = spec
            .containers
            .iter()
            .find(|c| c.name == CONTAINER)
            .unwrap();
        assert_eq!(
            s.restart_policy, None,
            "regular containers take the pod's policy"
        );
        let vol = spec
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == VOLUME)
            .unwrap();
        assert!(vol.empty_dir.is_some());
    }

    #[test]
    fn injecting_twice_is_the_same_as_once() {
        for mode in ["native", "container"] {
            let (mut meta, mut spec) = pod(&[
                (INJECT, "enabled"),
                (QUEUES, "orders"),
                (APP_PORT, "8080"),
                (SIDECAR_MODE, mode),
            ]);
            let (res, cfg) = (resources(), InjectionConfig::default());
            inject(&mut meta, &mut spec, &res, &cfg, true).unwrap();
            let once = (meta.clone(), spec.clone());
            inject(&mut meta, &mut spec, &res, &cfg, true).unwrap();
            assert_eq!((meta.clone(), spec.clone()), once, "{mode}");
            // A bound claim survives re-injection.
            bind_claim(&mut meta, &mut spec, "warren-outbox-x-0");
            let bound = (meta.clone(), spec.clone());
            inject(&mut meta, &mut spec, &res, &cfg, true).unwrap();
            assert_eq!((meta.clone(), spec.clone()), bound, "{mode}");
            assert!(!needs_claim(&meta, &spec));
        }
        // Switching mode moves the sidecar instead of adding a second one.
        let (mut meta, mut spec) = pod(&[(INJECT, "enabled"), (QUEUES, "orders")]);
        let (res, cfg) = (resources(), InjectionConfig::default());
        inject(&mut meta, &mut spec, &res, &cfg, true).unwrap();
        meta.annotations
            .as_mut()
            .unwrap()
            .insert(SIDECAR_MODE.into(), "container".into());
        inject(&mut meta, &mut spec, &res, &cfg, true).unwrap();
        let count = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .filter(|c| c.name == CONTAINER)
            .count();
        assert_eq!(count, 1);
    }

    #[test]
    fn the_pods_longer_grace_own_warren_url_and_own_fs_group_are_kept() {
        let (mut meta, mut spec) = pod(&[(INJECT, "enabled"), (QUEUES, "orders")]);
        spec.termination_grace_period_seconds = Some(120);
        spec.security_context = Some(PodSecurityContext {
            fs_group: Some(2000),
            ..Default::default()
        });
        spec.containers[0].env = Some(vec![env("WARREN_URL", "http://127.0.0.1:9999")]);
        inject(
            &mut meta,
            &mut spec,
            &resources(),
            &InjectionConfig::default(),
            true,
        )
        .unwrap();
        assert_eq!(spec.termination_grace_period_seconds, Some(120));
        assert_eq!(spec.containers[0].env.as_ref().unwrap().len(), 1);
        assert_eq!(spec.security_context.unwrap().fs_group, Some(2000));
    }

    #[test]
    fn a_claim_binding_replaces_the_placeholder_and_labels_the_pod() {
        let (_, mut meta, mut spec) = run(&[(INJECT, "enabled"), (QUEUES, "orders")]).unwrap();
        assert!(needs_claim(&meta, &spec));
        bind_claim(&mut meta, &mut spec, "warren-outbox-shop-0");
        let vol = spec
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == VOLUME)
            .unwrap();
        assert_eq!(
            vol.persistent_volume_claim.unwrap().claim_name,
            "warren-outbox-shop-0"
        );
        assert!(vol.empty_dir.is_none());
        assert_eq!(meta.labels.unwrap()[CLAIM_LABEL], "warren-outbox-shop-0");
        let (_, meta, spec) = run(&[
            (INJECT, "enabled"),
            (QUEUES, "orders"),
            (OUTBOX, "emptyDir"),
        ])
        .unwrap();
        assert!(!needs_claim(&meta, &spec));
    }

    #[test]
    fn bad_annotations_and_references_are_clear_errors() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[(INJECT, "yes"), (QUEUES, "orders")],
                "warren.dev/inject: \"yes\" is neither",
            ),
            (
                &[(INJECT, "enabled")],
                "warren.dev/queues: name at least one",
            ),
            (
                &[(INJECT, "enabled"), (QUEUES, "Orders!")],
                "is not a valid resource name",
            ),
            (
                &[(INJECT, "enabled"), (QUEUES, "orders"), (APP_PORT, "http")],
                "\"http\" is not a port number",
            ),
            (
                &[(INJECT, "enabled"), (QUEUES, "orders"), (APP_PORT, "7171")],
                "the sidecar's own port",
            ),
            (
                &[(INJECT, "enabled"), (QUEUES, "orders"), (CONSUME, "orders")],
                "warren.dev/app-port: needed to deliver",
            ),
            (
                &[
                    (INJECT, "enabled"),
                    (QUEUES, "orders"),
                    (CONSUME, "payments"),
                    (APP_PORT, "80"),
                ],
                "\"payments\" is not one of",
            ),
            (
                &[
                    (INJECT, "enabled"),
                    (QUEUES, "orders"),
                    (APP_PORT, "80"),
                    (APP_PATH, "x"),
                ],
                "must be a path",
            ),
            (
                &[
                    (INJECT, "enabled"),
                    (QUEUES, "orders"),
                    (SIDECAR_MODE, "sidecar"),
                ],
                "neither \"native\" nor \"container\"",
            ),
            (
                &[(INJECT, "enabled"), (QUEUES, "orders"), (OUTBOX, "pvc")],
                "neither \"claim\" nor \"emptyDir\"",
            ),
            (
                &[(INJECT, "enabled"), (QUEUES, "missing")],
                "ReliableQueue \"missing\"",
            ),
            (
                &[(INJECT, "enabled"), (QUEUES, "orders,audit")],
                "must share one broker",
            ),
            (
                &[(INJECT, "enabled"), (QUEUES, "dangling"), (APP_PORT, "80")],
                "RetryPolicy \"nope\"",
            ),
        ];
        for (annotations, expected) in cases {
            let (mut meta, mut spec) = pod(annotations);
            let before = spec.clone();
            let e = inject(
                &mut meta,
                &mut spec,
                &resources(),
                &InjectionConfig::default(),
                true,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(expected), "{annotations:?}: {e}");
            assert_eq!(spec, before, "a failed injection changes nothing");
        }
        // A queue that is used but not consumed needs no policy.
        run(&[(INJECT, "enabled"), (QUEUES, "dangling")]).unwrap();
    }

    #[test]
    fn injection_config_reads_chart_values_and_rejects_typos() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("injection.yaml");
        assert_eq!(
            InjectionConfig::load(&path).unwrap(),
            InjectionConfig::default()
        );
        std::fs::write(
            &path,
            "image: registry.local/warren-sidecar:9\nresources:\n  requests: {cpu: 10m}\noutbox:\n  storageClassName: fast\n  size: 5Gi\n",
        )
        .unwrap();
        let cfg = InjectionConfig::load(&path).unwrap();
        assert_eq!(cfg.image, "registry.local/warren-sidecar:9");
        assert_eq!(cfg.outbox.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(cfg.outbox.idle_before_drain, HumanDuration::from_secs(120));
        let claim = cfg.claim_spec();
        assert_eq!(
            claim.resources.unwrap().requests.unwrap()["storage"].0,
            "5Gi"
        );
        std::fs::write(&path, "imagee: x\n").unwrap();
        let e = InjectionConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("imagee"), "{e}");
        for (size, why) in [("5GB", "not a quantity"), ("100Mi", "too small")] {
            std::fs::write(&path, format!("outbox:\n  size: {size}\n")).unwrap();
            let e = InjectionConfig::load(&path).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(size), "{size}: {e}");
        }
    }

    #[test]
    fn the_sidecar_is_told_the_limit_its_claim_holds() {
        let mut cfg = InjectionConfig::default();
        let limit_of = |cfg: &InjectionConfig| -> u64 {
            let (mut meta, mut spec) = pod(&[(INJECT, "enabled"), (QUEUES, "orders")]);
            inject(&mut meta, &mut spec, &resources(), cfg, true).unwrap();
            env_of(sidecar(&spec), "WARREN_MAX_OUTBOX_BYTES")
                .and_then(|e| e.value)
                .expect("WARREN_MAX_OUTBOX_BYTES")
                .parse()
                .unwrap()
        };
        // The chart's default claim: the limit and the engine's own bytes
        // fit in what the filesystem leaves of it.
        let gib = 1u64 << 30;
        let default = limit_of(&cfg);
        let engine = warren_crds::outbox::FRAME_OVERHEAD
            * warren_crds::outbox::DEFAULT_MAX_MESSAGES
            + 2 * warren_crds::outbox::DEFAULT_SEGMENT_BYTES;
        assert!(default + engine <= gib - gib / 10, "{default}");
        assert!(default >= gib / 2, "{default}");
        // A bigger claim, a bigger limit.
        cfg.outbox.size = "10Gi".into();
        assert!(limit_of(&cfg) > 9 * default, "{}", limit_of(&cfg));
    }
}
