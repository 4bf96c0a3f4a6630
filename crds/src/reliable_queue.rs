//! The `ReliableQueue` resource: a work queue with its exchange, bindings,
//! retry path and parking lot, reconciled by warren-operator.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;
use crate::names;

/// A durable work queue with retries and a parking lot. Warren declares its
/// exchange, the quorum work queue, the retry exchange with one delay queue
/// per backoff tier, the parking lot, and one policy per queue for the
/// settings that may change later.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "ReliableQueue",
    namespaced,
    shortname = "rq",
    status = "ReliableQueueStatus",
    printcolumn = r#"{"name":"Queue","type":"string","jsonPath":".status.queue"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Messages","type":"integer","jsonPath":".status.counts.ready"}"#,
    printcolumn = r#"{"name":"Consumers","type":"integer","jsonPath":".status.counts.consumers"}"#,
    printcolumn = r#"{"name":"Parked","type":"integer","jsonPath":".status.counts.parked"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ReliableQueueSpec {
    /// How to reach the broker.
    pub broker: BrokerRef,
    /// The exchange producers publish to.
    pub exchange: ExchangeSpec,
    /// The work queue.
    #[serde(default)]
    pub queue: QueueSpec,
    /// The RetryPolicy (same namespace) for failed deliveries; without one,
    /// the default policy applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy_ref: Option<String>,
    /// Where messages go that cannot be processed.
    #[serde(default)]
    pub parking_lot: ParkingLotSpec,
    /// What happens to the broker objects when the resource is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// The broker connection: a Secret in the resource's namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerRef {
    /// A Secret with either the RabbitMQ Cluster Operator's default-user
    /// keys (`username`, `password`, `host`, `port`, and optionally
    /// `connection_string`) or a single `uri` key (`amqp://user:pass@host`).
    pub secret_name: String,
    /// The virtual host. Default `/`.
    #[serde(default = "default_vhost")]
    pub vhost: String,
    /// The management API's URL; default `http://<host>:15672`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_url: Option<String>,
}

fn default_vhost() -> String {
    "/".into()
}

/// The work exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeSpec {
    /// Exchange name.
    pub name: String,
    /// Exchange type. Default `direct`.
    #[serde(default, rename = "type")]
    pub kind: ExchangeKind,
}

/// AMQP exchange types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    #[default]
    Direct,
    Topic,
    Fanout,
    Headers,
}

impl ExchangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// The work queue.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Queue name. Default: the resource's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Queue type. Default `quorum` (confirms only after a majority fsync).
    #[serde(default, rename = "type")]
    pub kind: QueueKind,
    /// Routing keys binding the queue to the exchange. None: the queue's
    /// name (for a direct exchange) or an empty key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<BindingSpec>,
    /// Most messages held; beyond it new publishes are refused (the
    /// publisher's confirm fails, the sidecar retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<i64>,
    /// Age after which a message moves to the parking lot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_ttl: Option<HumanDuration>,
    /// Deliveries after which the broker moves a message to the parking lot
    /// (quorum queues only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_limit: Option<i64>,
}

/// Queue types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    #[default]
    Quorum,
    Classic,
}

impl QueueKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Quorum => "quorum",
            QueueKind::Classic => "classic",
        }
    }
}

/// One binding of the work queue to the exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BindingSpec {
    /// The routing key (a pattern for topic exchanges).
    #[serde(default)]
    pub routing_key: String,
}

/// The parking lot.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParkingLotSpec {
    /// Queue name. Default `<queue>.parked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// How long parked messages are kept. Default: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<HumanDuration>,
}

/// What deleting the resource does to the broker objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep them (default): deleting a resource never deletes messages.
    #[default]
    Retain,
    /// Delete them; a queue that still holds messages is kept (and said so)
    /// unless the resource carries the `warren.dev/force-delete: "true"`
    /// annotation.
    Delete,
}

/// What the operator observed, as of `observedGeneration`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReliableQueueStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `BrokerReachable`, `TopologyReady`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The work queue's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Every broker object this resource owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<OwnedObjects>,
    /// Live counts, as of the last check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<Counts>,
}

/// A status condition (the Kubernetes convention).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `BrokerReachable` or `TopologyReady`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// Details; on failure, the broker's own error text.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The broker objects of one ReliableQueue.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OwnedObjects {
    pub exchanges: Vec<String>,
    pub queues: Vec<String>,
    pub policies: Vec<String>,
}

/// Live counts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Messages ready in the work queue.
    pub ready: i64,
    /// Consumers of the work queue.
    pub consumers: i64,
    /// Messages in the parking lot.
    pub parked: i64,
}

impl ReliableQueue {
    /// The work queue's name: `spec.queue.name`, else the resource's name.
    pub fn queue_name(&self) -> String {
        self.spec
            .queue
            .name
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default()
    }

    /// The parking lot's name.
    pub fn parking_lot_name(&self) -> String {
        self.spec
            .parking_lot
            .name
            .clone()
            .unwrap_or_else(|| names::parking_lot(&self.queue_name()))
    }
}
