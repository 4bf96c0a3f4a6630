//! The planner: a ReliableQueue and its retry policy in, the broker topology
//! they need out. Pure: no broker, no Kubernetes, unit-tested.
//!
//! Queues are declared with only the arguments that define them and never
//! change (the type; a delay tier's TTL and dead-letter route, which its
//! name encodes). Everything a user may change later (length limit, TTL,
//! delivery limit, dead-lettering of the work queue, parking-lot retention)
//! goes into one Warren-managed policy per queue, which RabbitMQ applies to
//! the live queue without recreating it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use warren_crds::duration::HumanDuration;
use warren_crds::names;
use warren_crds::reliable_queue::{ExchangeKind, QueueKind, QueueSpec, ReliableQueueSpec};
use warren_crds::retry::{DelayStrategy, RetryPolicySpec};

/// Priority of Warren's policies: above the default 0 of hand-made ones, so
/// Warren's settings win on the queues it owns.
pub const POLICY_PRIORITY: i32 = 100;

/// Name prefix of every Warren-managed policy.
pub const POLICY_PREFIX: &str = "warren.";

/// What a queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Work,
    DelayTier,
    ParkingLot,
}

/// A queue to declare.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueDecl {
    pub name: String,
    pub kind: QueueKind,
    /// The declaration's arguments (`x-queue-type` included).
    pub arguments: BTreeMap<String, Value>,
    pub role: Role,
}

/// An exchange to declare.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeDecl {
    pub name: String,
    /// `direct`, `topic`, `fanout`, `headers` or `x-delayed-message`.
    pub kind: String,
    pub arguments: BTreeMap<String, Value>,
    /// Whether the ReliableQueue owns it (the work exchange may be shared
    /// by several queues, so it is declared but never deleted).
    pub owned: bool,
}

/// A binding of a queue to an exchange.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BindingDecl {
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
}

/// A Warren-managed policy on exactly one queue.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyDecl {
    pub name: String,
    /// The queue's name as an anchored, escaped regex.
    pub pattern: String,
    pub definition: BTreeMap<String, Value>,
}

/// Everything one ReliableQueue needs on the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub vhost: String,
    pub queue: String,
    pub parking_lot: String,
    pub retry_exchange: String,
    pub delay_strategy: DelayStrategy,
    pub exchanges: Vec<ExchangeDecl>,
    pub queues: Vec<QueueDecl>,
    pub bindings: Vec<BindingDecl>,
    pub policies: Vec<PolicyDecl>,
}

impl Topology {
    /// The names of every broker object the ReliableQueue owns.
    pub fn owned_names(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        (
            self.exchanges
                .iter()
                .filter(|e| e.owned)
                .map(|e| e.name.clone())
                .collect(),
            self.queues.iter().map(|q| q.name.clone()).collect(),
            self.policies.iter().map(|p| p.name.clone()).collect(),
        )
    }

    /// The delay-tier queue names.
    pub fn tier_queues(&self) -> Vec<&str> {
        self.queues
            .iter()
            .filter(|q| q.role == Role::DelayTier)
            .map(|q| q.name.as_str())
            .collect()
    }
}

/// Why a spec cannot be planned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("the queue has no name: set spec.queue.name or metadata.name")]
    NoQueueName,
    #[error("spec.exchange.name must not be empty")]
    NoExchange,
    #[error("the exchange {0:?} is a RabbitMQ built-in; publish to an exchange of your own")]
    ReservedExchange(String),
    #[error("{what} name {name:?} is longer than 255 bytes")]
    NameTooLong { what: &'static str, name: String },
    #[error("the parking lot must be another queue than {0:?}")]
    ParkInSelf(String),
    #[error("spec.queue.deliveryLimit applies to quorum queues only")]
    DeliveryLimitOnClassic,
    #[error("{field} must be at least 1, got {value}")]
    NotPositive { field: &'static str, value: i64 },
    #[error("invalid retry policy: {0}")]
    Policy(#[from] warren_crds::retry::RetryPolicyError),
}

/// Plans the topology of a ReliableQueue whose work queue is `queue`.
///
/// The steps: refuse what cannot be planned (`check`); the work side
/// (the app's exchange, the work queue and its parking lot); the retry side
/// (TTL delay tiers or one delayed-message exchange); the policies that
/// carry every changeable setting.
pub fn plan(
    queue: &str,
    spec: &ReliableQueueSpec,
    policy: &RetryPolicySpec,
) -> Result<Topology, PlanError> {
    let parking_lot = check(queue, spec, policy)?;
    let retry_exchange = names::retry_exchange(queue);

    let mut decls = work_part(queue, spec, &parking_lot);
    decls.extend(match policy.delay_strategy {
        DelayStrategy::TtlTiers => ttl_tiers_part(queue, &retry_exchange, &policy.tiers()),
        DelayStrategy::DelayedMessageExchange => delayed_exchange_part(queue, &retry_exchange),
    });
    let Decls {
        exchanges,
        queues,
        mut bindings,
    } = decls;
    bindings.sort();
    bindings.dedup();

    let mut policies = vec![work_policy(queue, &spec.queue, &parking_lot)];
    policies.extend(parking_lot_policy(&parking_lot, spec.parking_lot.retention));

    Ok(Topology {
        vhost: spec.broker.vhost.clone(),
        queue: queue.to_owned(),
        parking_lot,
        retry_exchange,
        delay_strategy: policy.delay_strategy,
        exchanges,
        queues,
        bindings,
        policies,
    })
}

/// Refuses a spec that cannot be planned, with the first reason found;
/// returns the parking lot's name.
fn check(
    queue: &str,
    spec: &ReliableQueueSpec,
    policy: &RetryPolicySpec,
) -> Result<String, PlanError> {
    if queue.is_empty() {
        return Err(PlanError::NoQueueName);
    }
    if spec.exchange.name.is_empty() {
        return Err(PlanError::NoExchange);
    }
    if spec.exchange.name.starts_with("amq.") {
        return Err(PlanError::ReservedExchange(spec.exchange.name.clone()));
    }
    policy.validate()?;
    let parking_lot = spec
        .parking_lot
        .name
        .clone()
        .unwrap_or_else(|| names::parking_lot(queue));
    if parking_lot == queue {
        return Err(PlanError::ParkInSelf(queue.to_owned()));
    }
    check_name_lengths(queue, &parking_lot, &spec.exchange.name, &policy.tiers())?;
    check_queue_settings(&spec.queue)?;
    Ok(parking_lot)
}

/// Every name the topology uses fits an AMQP short string.
fn check_name_lengths(
    queue: &str,
    parking_lot: &str,
    exchange: &str,
    tiers: &[Duration],
) -> Result<(), PlanError> {
    let tier_queues: Vec<String> = tiers
        .iter()
        .map(|d| names::retry_tier_queue(queue, *d))
        .collect();
    let fixed = [
        ("queue", queue),
        ("parking lot", parking_lot),
        ("exchange", exchange),
    ];
    let tiered = tier_queues.iter().map(|n| ("delay queue", n.as_str()));
    for (what, name) in fixed.into_iter().chain(tiered) {
        if name.len() > 255 {
            return Err(PlanError::NameTooLong {
                what,
                name: name.to_owned(),
            });
        }
    }
    Ok(())
}

/// The work queue's numbers are positive, and a delivery limit asks for a
/// quorum queue.
fn check_queue_settings(q: &QueueSpec) -> Result<(), PlanError> {
    for (field, value) in [
        ("spec.queue.maxLength", q.max_length),
        ("spec.queue.deliveryLimit", q.delivery_limit),
    ] {
        if let Some(v) = value.filter(|v| *v < 1) {
            return Err(PlanError::NotPositive { field, value: v });
        }
    }
    if q.delivery_limit.is_some() && q.kind == QueueKind::Classic {
        return Err(PlanError::DeliveryLimitOnClassic);
    }
    Ok(())
}

/// Declarations collected part by part, in declaration order.
#[derive(Default)]
struct Decls {
    exchanges: Vec<ExchangeDecl>,
    queues: Vec<QueueDecl>,
    bindings: Vec<BindingDecl>,
}

impl Decls {
    fn extend(&mut self, other: Decls) {
        self.exchanges.extend(other.exchanges);
        self.queues.extend(other.queues);
        self.bindings.extend(other.bindings);
    }
}

/// The work side: the app's exchange (declared, not owned), the work queue
/// with its bindings, and the parking lot (always a quorum queue).
fn work_part(queue: &str, spec: &ReliableQueueSpec, parking_lot: &str) -> Decls {
    let kind = spec.queue.kind;
    Decls {
        exchanges: vec![ExchangeDecl {
            name: spec.exchange.name.clone(),
            kind: spec.exchange.kind.as_str().to_owned(),
            arguments: BTreeMap::new(),
            owned: false,
        }],
        queues: vec![
            QueueDecl {
                name: queue.to_owned(),
                kind,
                arguments: type_args(kind),
                role: Role::Work,
            },
            QueueDecl {
                name: parking_lot.to_owned(),
                kind: QueueKind::Quorum,
                arguments: type_args(QueueKind::Quorum),
                role: Role::ParkingLot,
            },
        ],
        bindings: work_keys(queue, spec)
            .into_iter()
            .map(|routing_key| BindingDecl {
                exchange: spec.exchange.name.clone(),
                queue: queue.to_owned(),
                routing_key,
            })
            .collect(),
    }
}

/// The retry side with TTL tiers: a direct retry exchange and one quorum
/// queue per delay, whose messages expire back into the work queue.
fn ttl_tiers_part(queue: &str, retry_exchange: &str, tiers: &[Duration]) -> Decls {
    let mut decls = Decls {
        exchanges: vec![ExchangeDecl {
            name: retry_exchange.to_owned(),
            kind: "direct".into(),
            arguments: BTreeMap::new(),
            owned: true,
        }],
        ..Decls::default()
    };
    for delay in tiers {
        let name = names::retry_tier_queue(queue, *delay);
        decls.bindings.push(BindingDecl {
            exchange: retry_exchange.to_owned(),
            queue: name.clone(),
            routing_key: names::retry_tier_routing_key(*delay),
        });
        decls.queues.push(QueueDecl {
            name,
            kind: QueueKind::Quorum,
            arguments: tier_args(queue, *delay),
            role: Role::DelayTier,
        });
    }
    decls
}

/// A delay tier's declaration arguments: its TTL and the dead-letter route
/// back to the work queue (both encoded in its name, so never changed).
fn tier_args(queue: &str, delay: Duration) -> BTreeMap<String, Value> {
    let mut arguments = type_args(QueueKind::Quorum);
    arguments.insert("x-message-ttl".into(), json!(delay.as_millis() as u64));
    arguments.insert("x-dead-letter-exchange".into(), json!(""));
    arguments.insert("x-dead-letter-routing-key".into(), json!(queue));
    arguments.insert("x-dead-letter-strategy".into(), json!("at-least-once"));
    arguments.insert("x-overflow".into(), json!("reject-publish"));
    arguments
}

/// The retry side with the delayed-message plugin: one delayed exchange
/// bound straight to the work queue.
fn delayed_exchange_part(queue: &str, retry_exchange: &str) -> Decls {
    Decls {
        exchanges: vec![ExchangeDecl {
            name: retry_exchange.to_owned(),
            kind: "x-delayed-message".into(),
            arguments: BTreeMap::from([("x-delayed-type".into(), json!("direct"))]),
            owned: true,
        }],
        queues: Vec::new(),
        bindings: vec![BindingDecl {
            exchange: retry_exchange.to_owned(),
            queue: queue.to_owned(),
            routing_key: queue.to_owned(),
        }],
    }
}

/// The work queue's changeable settings: dead-lettering to the parking
/// lot, overflow, and the spec's limits.
fn work_policy(queue: &str, q: &QueueSpec, parking_lot: &str) -> PolicyDecl {
    let mut work = BTreeMap::new();
    work.insert("dead-letter-exchange".into(), json!(""));
    work.insert("dead-letter-routing-key".into(), json!(parking_lot));
    if q.kind == QueueKind::Quorum {
        // At-least-once dead-lettering to the parking lot; it requires
        // reject-publish overflow.
        work.insert("dead-letter-strategy".into(), json!("at-least-once"));
        work.insert("overflow".into(), json!("reject-publish"));
    } else {
        work.insert("overflow".into(), json!("reject-publish"));
    }
    if let Some(n) = q.max_length {
        work.insert("max-length".into(), json!(n));
    }
    if let Some(ttl) = q.message_ttl {
        work.insert("message-ttl".into(), json!(ttl.0.as_millis() as u64));
    }
    if let Some(n) = q.delivery_limit {
        work.insert("delivery-limit".into(), json!(n));
    }
    PolicyDecl {
        name: policy_name(queue),
        pattern: exact_pattern(queue),
        definition: work,
    }
}

/// The parking lot's retention, when the spec sets one.
fn parking_lot_policy(parking_lot: &str, retention: Option<HumanDuration>) -> Option<PolicyDecl> {
    let retention = retention?;
    Some(PolicyDecl {
        name: policy_name(parking_lot),
        pattern: exact_pattern(parking_lot),
        definition: BTreeMap::from([("message-ttl".into(), json!(retention.0.as_millis() as u64))]),
    })
}

/// The Warren-managed policy of queue `queue`: `warren.<queue>`.
pub fn policy_name(queue: &str) -> String {
    format!("{POLICY_PREFIX}{queue}")
}

/// A regex matching exactly `name`.
pub fn exact_pattern(name: &str) -> String {
    let mut out = String::from("^");
    for c in name.chars() {
        if "\\^$.|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('$');
    out
}

fn type_args(kind: QueueKind) -> BTreeMap<String, Value> {
    BTreeMap::from([("x-queue-type".into(), json!(kind.as_str()))])
}

/// The work queue's binding keys: the spec's, else the queue's name (direct
/// and topic exchanges) or an empty key (fanout and headers).
fn work_keys(queue: &str, spec: &ReliableQueueSpec) -> Vec<String> {
    if !spec.queue.bindings.is_empty() {
        return spec
            .queue
            .bindings
            .iter()
            .map(|b| b.routing_key.clone())
            .collect();
    }
    match spec.exchange.kind {
        ExchangeKind::Direct | ExchangeKind::Topic => vec![queue.to_owned()],
        ExchangeKind::Fanout | ExchangeKind::Headers => vec![String::new()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_crds::duration::HumanDuration;
    use warren_crds::reliable_queue::{
        BindingSpec, BrokerRef, DeletionPolicy, ExchangeSpec, ParkingLotSpec, QueueSpec,
    };

    fn spec() -> ReliableQueueSpec {
        ReliableQueueSpec {
            broker: BrokerRef {
                secret_name: "rabbit".into(),
                vhost: "/".into(),
                management_url: None,
            },
            exchange: ExchangeSpec {
                name: "shop".into(),
                kind: ExchangeKind::Topic,
            },
            queue: QueueSpec {
                bindings: vec![
                    BindingSpec {
                        routing_key: "order.created".into(),
                    },
                    BindingSpec {
                        routing_key: "order.updated".into(),
                    },
                ],
                ..Default::default()
            },
            retry_policy_ref: None,
            parking_lot: ParkingLotSpec::default(),
            deletion_policy: DeletionPolicy::Retain,
        }
    }

    fn policy() -> RetryPolicySpec {
        let mut p = RetryPolicySpec {
            max_retries: 5,
            ..Default::default()
        };
        p.backoff.initial = HumanDuration::from_secs(1);
        p.backoff.max = HumanDuration::from_secs(10);
        p
    }

    fn queue<'a>(t: &'a Topology, name: &str) -> &'a QueueDecl {
        t.queues
            .iter()
            .find(|q| q.name == name)
            .unwrap_or_else(|| panic!("no queue {name}"))
    }

    #[test]
    fn ttl_tiers_topology_follows_the_design() {
        let t = plan("orders", &spec(), &policy()).unwrap();
        let names: Vec<&str> = t.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "orders",
                "orders.parked",
                "orders.retry.1s",
                "orders.retry.2s",
                "orders.retry.4s",
                "orders.retry.8s",
                "orders.retry.10s"
            ]
        );
        // The work queue is declared with its type only.
        assert_eq!(
            queue(&t, "orders").arguments,
            BTreeMap::from([("x-queue-type".into(), json!("quorum"))])
        );
        let tier = &queue(&t, "orders.retry.4s").arguments;
        assert_eq!(tier["x-message-ttl"], json!(4000));
        assert_eq!(tier["x-dead-letter-exchange"], json!(""));
        assert_eq!(tier["x-dead-letter-routing-key"], json!("orders"));
        assert_eq!(tier["x-dead-letter-strategy"], json!("at-least-once"));
        assert_eq!(tier["x-overflow"], json!("reject-publish"));
        assert_eq!(tier["x-queue-type"], json!("quorum"));
        assert!(t.bindings.contains(&BindingDecl {
            exchange: "orders.retry".into(),
            queue: "orders.retry.4s".into(),
            routing_key: "4s".into(),
        }));
        assert!(t.bindings.contains(&BindingDecl {
            exchange: "shop".into(),
            queue: "orders".into(),
            routing_key: "order.updated".into(),
        }));
        assert_eq!(t.bindings.len(), 2 + 5);
        let ex: Vec<(&str, &str, bool)> = t
            .exchanges
            .iter()
            .map(|e| (e.name.as_str(), e.kind.as_str(), e.owned))
            .collect();
        assert_eq!(
            ex,
            [("shop", "topic", false), ("orders.retry", "direct", true)]
        );
        let (owned_exchanges, owned_queues, owned_policies) = t.owned_names();
        assert_eq!(owned_exchanges, ["orders.retry"]);
        assert_eq!(owned_queues.len(), 7);
        assert_eq!(owned_policies, ["warren.orders"]);
    }

    #[test]
    fn changeable_settings_go_into_the_policy() {
        let mut s = spec();
        s.queue.max_length = Some(10_000);
        s.queue.message_ttl = Some(HumanDuration::from_secs(3600));
        s.queue.delivery_limit = Some(20);
        s.parking_lot.retention = Some(HumanDuration::from_secs(7 * 24 * 3600));
        let t = plan("orders", &s, &policy()).unwrap();
        let work = &t.policies[0];
        assert_eq!(work.name, "warren.orders");
        assert_eq!(work.pattern, "^orders$");
        assert_eq!(work.definition["max-length"], json!(10_000));
        assert_eq!(work.definition["message-ttl"], json!(3_600_000));
        assert_eq!(work.definition["delivery-limit"], json!(20));
        assert_eq!(work.definition["dead-letter-exchange"], json!(""));
        assert_eq!(
            work.definition["dead-letter-routing-key"],
            json!("orders.parked")
        );
        assert_eq!(
            work.definition["dead-letter-strategy"],
            json!("at-least-once")
        );
        assert_eq!(work.definition["overflow"], json!("reject-publish"));
        let parked = &t.policies[1];
        assert_eq!(parked.name, "warren.orders.parked");
        assert_eq!(parked.pattern, "^orders\\.parked$");
        assert_eq!(parked.definition["message-ttl"], json!(604_800_000));
        // None of it is a queue argument.
        assert_eq!(queue(&t, "orders").arguments.len(), 1);
    }

    #[test]
    fn delayed_message_exchange_needs_no_tiers() {
        let mut p = policy();
        p.delay_strategy = DelayStrategy::DelayedMessageExchange;
        let t = plan("orders", &spec(), &p).unwrap();
        assert!(t.tier_queues().is_empty());
        let retry = &t.exchanges[1];
        assert_eq!(retry.kind, "x-delayed-message");
        assert_eq!(retry.arguments["x-delayed-type"], json!("direct"));
        assert!(t.bindings.contains(&BindingDecl {
            exchange: "orders.retry".into(),
            queue: "orders".into(),
            routing_key: "orders".into(),
        }));
    }

    #[test]
    fn defaults_fill_bindings_and_names() {
        let mut s = spec();
        s.queue.bindings.clear();
        s.exchange.kind = ExchangeKind::Direct;
        s.parking_lot.name = Some("orders-dlq".into());
        let t = plan("orders", &s, &policy()).unwrap();
        assert_eq!(t.parking_lot, "orders-dlq");
        assert!(t.bindings.contains(&BindingDecl {
            exchange: "shop".into(),
            queue: "orders".into(),
            routing_key: "orders".into(),
        }));
        s.exchange.kind = ExchangeKind::Fanout;
        let t = plan("orders", &s, &policy()).unwrap();
        assert!(
            t.bindings
                .iter()
                .any(|b| b.exchange == "shop" && b.routing_key.is_empty())
        );
    }

    #[test]
    fn classic_work_queues_have_no_delivery_limit() {
        let mut s = spec();
        s.queue.kind = QueueKind::Classic;
        let t = plan("orders", &s, &policy()).unwrap();
        assert_eq!(
            queue(&t, "orders").arguments["x-queue-type"],
            json!("classic")
        );
        assert!(
            !t.policies[0]
                .definition
                .contains_key("dead-letter-strategy")
        );
        s.queue.delivery_limit = Some(3);
        assert_eq!(
            plan("orders", &s, &policy()),
            Err(PlanError::DeliveryLimitOnClassic)
        );
    }

    #[test]
    fn zero_retries_means_no_tiers() {
        let p = RetryPolicySpec {
            max_retries: 0,
            ..Default::default()
        };
        let t = plan("orders", &spec(), &p).unwrap();
        assert!(t.tier_queues().is_empty());
        assert_eq!(t.exchanges.len(), 2, "the retry exchange still exists");
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        let mut s = spec();
        assert_eq!(plan("", &s, &policy()), Err(PlanError::NoQueueName));
        s.exchange.name = "amq.topic".into();
        assert!(matches!(
            plan("q", &s, &policy()),
            Err(PlanError::ReservedExchange(_))
        ));
        let mut s = spec();
        s.parking_lot.name = Some("q".into());
        assert_eq!(
            plan("q", &s, &policy()),
            Err(PlanError::ParkInSelf("q".into()))
        );
        let mut s = spec();
        s.queue.max_length = Some(0);
        assert!(matches!(
            plan("q", &s, &policy()),
            Err(PlanError::NotPositive { .. })
        ));
        let long = "x".repeat(250);
        assert!(matches!(
            plan(&long, &spec(), &policy()),
            Err(PlanError::NameTooLong { .. })
        ));
        let mut p = policy();
        p.backoff.multiplier = 0.1;
        assert!(matches!(plan("q", &spec(), &p), Err(PlanError::Policy(_))));
    }

    #[test]
    fn patterns_match_only_the_queue() {
        assert_eq!(exact_pattern("a.b*c"), "^a\\.b\\*c$");
    }
}
