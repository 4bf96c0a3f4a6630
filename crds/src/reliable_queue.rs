//! The `ReliableQueue` resource: a work queue with its exchange, bindings,
//! retry path and parking lot, reconciled by warren-operator.

use kube::{CustomResource, KubeSchema};
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
    #[schemars(length(min = 1, max = 253))]
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
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// The virtual host. Default `/`.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1))]
    pub vhost: String,
    /// The management API's URL; default `http://<host>:15672`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub management_url: Option<String>,
}

fn default_vhost() -> String {
    "/".into()
}

/// The work exchange. Name and type are immutable: an exchange cannot be
/// redeclared with another type, and a new name would strand the
/// producers of the old one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeSpec {
    /// Exchange name (immutable); not `amq.*`, which RabbitMQ reserves.
    #[schemars(length(min = 1, max = MAX_NAME_LEN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("exchange.name is immutable"))]
    #[x_kube(validation = Rule::new("!self.startsWith('amq.')")
        .message("exchange.name must not start with 'amq.' (reserved by RabbitMQ)"))]
    pub name: String,
    /// Exchange type (immutable). Default `direct`.
    #[serde(default, rename = "type")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("exchange.type is immutable"))]
    pub kind: ExchangeKind,
}

/// The longest exchange or queue name RabbitMQ accepts (an AMQP short
/// string, in bytes; the schema counts characters).
pub const MAX_NAME_LEN: u32 = 255;

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

/// The work queue. Name and type are immutable: queue arguments cannot
/// change on the broker, and a new name would leave the old queue and its
/// messages behind.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
// `name` is optional, and a rule on an optional field only runs when both
// the old and the new object have it; so the rule lives here, where it also
// sees the field being added or removed.
#[x_kube(validation = Rule::new(
    "has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name)"
).message("queue.name is immutable: it cannot be set, changed or removed after creation"))]
#[x_kube(validation = Rule::new("self.type == 'quorum' || !has(self.deliveryLimit)")
    .message("queue.deliveryLimit applies to quorum queues only"))]
pub struct QueueSpec {
    /// Queue name (immutable). Default: the resource's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NAME_LEN))]
    pub name: Option<String>,
    /// Queue type (immutable). Default `quorum` (confirms only after a
    /// majority fsync).
    #[serde(default, rename = "type")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("queue.type is immutable"))]
    pub kind: QueueKind,
    /// Routing keys binding the queue to the exchange. None: the queue's
    /// name (for a direct exchange) or an empty key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<BindingSpec>,
    /// Most messages held; beyond it new publishes are refused (the
    /// publisher's confirm fails, the sidecar retries). At least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_length: Option<i64>,
    /// Age after which a message moves to the parking lot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_ttl: Option<HumanDuration>,
    /// Deliveries after which the broker moves a message to the parking lot
    /// (quorum queues only). At least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
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
    #[schemars(length(max = MAX_NAME_LEN))]
    pub routing_key: String,
}

/// The parking lot. Its name is immutable: a new name would leave the
/// parked messages behind.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
// On the parent for the same reason as `QueueSpec`'s name rule.
#[x_kube(validation = Rule::new(
    "has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name)"
).message("parkingLot.name is immutable: it cannot be set, changed or removed after creation"))]
pub struct ParkingLotSpec {
    /// Queue name (immutable). Default `<queue>.parked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NAME_LEN))]
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::schema_check::{check, node, rules, schema};

    /// A ReliableQueue as a client would send it, with `spec` merged over a
    /// minimal valid one.
    fn rq(spec: Value) -> Value {
        let mut base = json!({
            "broker": {"secretName": "shop-default-user"},
            "exchange": {"name": "shop"},
        });
        merge(&mut base, spec);
        json!({
            "apiVersion": "warren.dev/v1alpha1",
            "kind": "ReliableQueue",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": base,
        })
    }

    fn merge(base: &mut Value, over: Value) {
        match (base, over) {
            (Value::Object(b), Value::Object(o)) => {
                for (k, v) in o {
                    merge(b.entry(k).or_insert(Value::Null), v);
                }
            }
            (b, o) => *b = o,
        }
    }

    fn update(old: Value, new: Value) -> Result<(), Vec<String>> {
        check::<ReliableQueue>(&rq(new), Some(&rq(old)))
    }

    fn rejected(old: Value, new: Value, message: &str) {
        let errors = update(old.clone(), new.clone())
            .expect_err(&format!("update {old} -> {new} was accepted"));
        assert!(
            errors.len() == 1 && errors[0].contains(message),
            "update {old} -> {new}: expected only {message:?}, got {errors:?}"
        );
    }

    const IMMUTABLE_NAME: &str =
        "has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name)";

    #[test]
    fn the_schema_carries_the_immutability_rules() {
        let s = schema::<ReliableQueue>();
        let same = |msg: &str| vec![("self == oldSelf".to_owned(), msg.to_owned())];
        assert_eq!(
            rules(node(&s, "spec.exchange.name"))[..1],
            same("exchange.name is immutable")
        );
        assert_eq!(
            rules(node(&s, "spec.exchange.type")),
            same("exchange.type is immutable")
        );
        assert_eq!(
            rules(node(&s, "spec.queue.type")),
            same("queue.type is immutable")
        );
        // Optional names: the rule sits on the parent, which always exists
        // (it has a default), so adding or removing the name is caught too.
        for (parent, field) in [("spec.queue", "queue"), ("spec.parkingLot", "parkingLot")] {
            assert_eq!(
                rules(node(&s, parent))[0],
                (
                    IMMUTABLE_NAME.to_owned(),
                    format!(
                        "{field}.name is immutable: it cannot be set, changed or removed after creation"
                    )
                ),
                "{parent}"
            );
            assert!(node(&s, parent).get("default").is_some(), "{parent}");
            assert!(rules(node(&s, &format!("{parent}.name"))).is_empty());
        }
        assert_eq!(rules(node(&s, "spec.parkingLot")).len(), 1);
        assert_eq!(
            rules(node(&s, "spec.queue"))[1..],
            [(
                "self.type == 'quorum' || !has(self.deliveryLimit)".to_owned(),
                "queue.deliveryLimit applies to quorum queues only".to_owned()
            )]
        );
        // Everything else may change.
        for mutable in [
            "spec",
            "spec.broker",
            "spec.exchange",
            "spec.queue.bindings",
            "spec.queue.maxLength",
            "spec.queue.messageTtl",
            "spec.queue.deliveryLimit",
            "spec.parkingLot.retention",
            "spec.retryPolicyRef",
            "spec.deletionPolicy",
        ] {
            assert!(rules(node(&s, mutable)).is_empty(), "{mutable}");
        }
    }

    #[test]
    fn the_schema_bounds_counts_and_names() {
        let s = schema::<ReliableQueue>();
        for count in ["spec.queue.maxLength", "spec.queue.deliveryLimit"] {
            assert_eq!(node(&s, count)["minimum"], json!(1.0), "{count}");
            assert_eq!(node(&s, count)["type"], "integer", "{count}");
        }
        for name in [
            "spec.exchange.name",
            "spec.queue.name",
            "spec.parkingLot.name",
        ] {
            assert_eq!(node(&s, name)["minLength"], 1, "{name}");
            assert_eq!(node(&s, name)["maxLength"], MAX_NAME_LEN, "{name}");
        }
        for name in [
            "spec.broker.secretName",
            "spec.broker.vhost",
            "spec.broker.managementUrl",
            "spec.retryPolicyRef",
        ] {
            assert_eq!(node(&s, name)["minLength"], 1, "{name}");
        }
        assert_eq!(node(&s, "spec.broker.secretName")["maxLength"], 253);
    }

    #[test]
    fn creating_any_valid_queue_passes_the_rules() {
        // Transition rules do not run on create.
        let full = json!({
            "exchange": {"name": "shop", "type": "topic"},
            "queue": {"name": "orders-v2", "type": "classic", "maxLength": 10},
            "parkingLot": {"name": "orders.dead", "retention": "168h"},
        });
        check::<ReliableQueue>(&rq(full), None).unwrap();
        check::<ReliableQueue>(&rq(json!({})), None).unwrap();
    }

    #[test]
    fn delivery_limits_need_a_quorum_queue() {
        let limited = |kind: Option<&str>| {
            let mut queue = json!({"deliveryLimit": 5});
            if let Some(k) = kind {
                queue["type"] = json!(k);
            }
            check::<ReliableQueue>(&rq(json!({ "queue": queue })), None)
        };
        limited(None).unwrap();
        limited(Some("quorum")).unwrap();
        assert_eq!(
            limited(Some("classic")),
            Err(vec![
                "spec.queue: queue.deliveryLimit applies to quorum queues only".to_owned()
            ])
        );
        check::<ReliableQueue>(&rq(json!({"queue": {"type": "classic"}})), None).unwrap();
    }

    #[test]
    fn reserved_exchange_names_are_refused() {
        let s = schema::<ReliableQueue>();
        assert_eq!(
            rules(node(&s, "spec.exchange.name"))[1..],
            [(
                "!self.startsWith('amq.')".to_owned(),
                "exchange.name must not start with 'amq.' (reserved by RabbitMQ)".to_owned()
            )]
        );
        let named = |n: &str| rq(json!({"exchange": {"name": n}}));
        assert_eq!(
            check::<ReliableQueue>(&named("amq.topic"), None),
            Err(vec![
                "spec.exchange.name: exchange.name must not start with 'amq.' (reserved by RabbitMQ)"
                    .to_owned()
            ])
        );
        check::<ReliableQueue>(&named("amqp.events"), None).unwrap();
        check::<ReliableQueue>(&named("shop.amq.x"), None).unwrap();
    }

    #[test]
    fn names_and_types_cannot_change() {
        rejected(
            json!({"exchange": {"name": "shop"}}),
            json!({"exchange": {"name": "shop2"}}),
            "spec.exchange.name: exchange.name is immutable",
        );
        rejected(
            json!({"exchange": {"type": "topic"}}),
            json!({"exchange": {"type": "fanout"}}),
            "spec.exchange.type: exchange.type is immutable",
        );
        // Defaults count: an omitted type is `direct`, or `quorum`.
        rejected(
            json!({}),
            json!({"exchange": {"type": "topic"}}),
            "exchange.type is immutable",
        );
        rejected(
            json!({}),
            json!({"queue": {"type": "classic"}}),
            "spec.queue.type: queue.type is immutable",
        );
        rejected(
            json!({"queue": {"type": "classic"}}),
            json!({"queue": {"type": "quorum"}}),
            "queue.type is immutable",
        );
    }

    #[test]
    fn optional_names_cannot_be_set_changed_or_removed() {
        for (field, path) in [("queue", "spec.queue"), ("parkingLot", "spec.parkingLot")] {
            let named = |n: &str| json!({ field: {"name": n} });
            let unnamed = json!({ field: {} });
            let msg = format!("{path}: {field}.name is immutable");
            rejected(named("a"), named("b"), &msg);
            rejected(unnamed.clone(), named("a"), &msg);
            rejected(named("a"), unnamed.clone(), &msg);
            // A parent left out entirely is defaulted to `{...}` first.
            rejected(json!({}), named("a"), &msg);
            update(named("a"), named("a")).unwrap();
            update(unnamed.clone(), unnamed).unwrap();
        }
    }

    #[test]
    fn everything_else_may_change() {
        let old = json!({
            "broker": {"secretName": "a", "vhost": "/"},
            "exchange": {"name": "shop", "type": "topic"},
            "queue": {"name": "orders", "bindings": [{"routingKey": "order.created"}]},
            "parkingLot": {"name": "orders.parked", "retention": "1h"},
            "deletionPolicy": "Retain",
        });
        let new = json!({
            "broker": {"secretName": "b", "vhost": "shop", "managementUrl": "http://rabbit:15672"},
            "exchange": {"name": "shop", "type": "topic"},
            "queue": {
                "name": "orders",
                "bindings": [{"routingKey": "order.*"}],
                "maxLength": 1000,
                "messageTtl": "1h",
                "deliveryLimit": 5,
            },
            "retryPolicyRef": "fast",
            "parkingLot": {"name": "orders.parked", "retention": "24h"},
            "deletionPolicy": "Delete",
        });
        update(old.clone(), new.clone()).unwrap();
        update(new, old).unwrap();
    }

    #[test]
    fn typed_resources_are_checked_alike() {
        let spec: ReliableQueueSpec =
            serde_json::from_value(rq(json!({}))["spec"].clone()).unwrap();
        let old = ReliableQueue::new("orders", spec);
        let mut new = old.clone();
        new.spec.queue.name = Some("orders".into());
        kube::core::cel::validate_cel_update(&old, &old).unwrap();
        let errors = kube::core::cel::validate_cel_update(&new, &old).unwrap_err();
        assert!(
            errors.to_string().contains("queue.name is immutable"),
            "{errors}"
        );
    }
}
