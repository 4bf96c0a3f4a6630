//! Prometheus metrics, prefixed `warren_sidecar_`, with fixed low-cardinality
//! labels (never exchange names, ids or error text).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Why a publish request was refused.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RejectReason {
    /// Malformed path, header, body or batch.
    Invalid,
    /// Body or batch over the configured size.
    TooLarge,
    /// Outbox at its message or byte limit.
    OutboxFull,
    /// The sidecar is draining for shutdown.
    ShuttingDown,
    /// The outbox could not store or flush.
    StorageFailed,
}

/// Why a forwarding attempt did not get a broker ack.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum FailReason {
    /// The broker answered basic.nack.
    Nack,
    /// The broker returned the message (mandatory, no queue bound).
    Unroutable,
    /// The exchange does not exist or may not be used (404/403).
    Exchange,
    /// The channel was closed by a broker error while it was in flight.
    ChannelError,
    /// The message's record could not be decoded.
    Corrupt,
}

/// Outcome of a connection attempt.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ConnResult {
    Connected,
    Failed,
}

/// Outbox area for size gauges.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum AreaLabel {
    Pending,
    Dead,
}

/// What became of a delivery.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// The app answered 2xx; acknowledged.
    Acked,
    /// Republished for a retry, then acknowledged.
    Retried,
    /// Republished to the parking lot, then acknowledged.
    Parked,
    /// Handed back to the broker unprocessed or after a failed republish
    /// (`basic.nack` with requeue); the broker delivers it again.
    Requeued,
    /// The acknowledgement could not be sent (channel gone); the broker
    /// delivers it again.
    AckFailed,
}

/// Why a message was parked.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ParkLabel {
    NonRetryable,
    RetriesExhausted,
}

/// What kind of failure interrupted the transactional outbox relay.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayErrorKind {
    /// The database was unreachable or the connection broke.
    Connect,
    /// The database refused the credentials.
    Auth,
    /// A statement failed.
    Query,
    /// The local outbox refused the rows.
    Outbox,
}

/// Label values are snake_case, as Prometheus conventions expect.
macro_rules! snake_case_label {
    ($ty:ty { $($variant:ident => $text:literal),* $(,)? }) => {
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                use std::fmt::Write;
                encoder.write_str(match self { $(Self::$variant => $text),* })
            }
        }
    };
}

snake_case_label!(RejectReason {
    Invalid => "invalid",
    TooLarge => "too_large",
    OutboxFull => "outbox_full",
    ShuttingDown => "shutting_down",
    StorageFailed => "storage_failed",
});
snake_case_label!(FailReason {
    Nack => "nack",
    Unroutable => "unroutable",
    Exchange => "exchange",
    ChannelError => "channel_error",
    Corrupt => "corrupt",
});
snake_case_label!(Outcome {
    Acked => "acked",
    Retried => "retried",
    Parked => "parked",
    Requeued => "requeued",
    AckFailed => "ack_failed",
});
snake_case_label!(ParkLabel {
    NonRetryable => "non_retryable",
    RetriesExhausted => "retries_exhausted",
});
snake_case_label!(RelayErrorKind {
    Connect => "connect",
    Auth => "auth",
    Query => "query",
    Outbox => "outbox",
});
snake_case_label!(ConnResult { Connected => "connected", Failed => "failed" });
snake_case_label!(AreaLabel { Pending => "pending", Dead => "dead" });

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub reason: RejectReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailLabels {
    pub reason: FailReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayErrorLabels {
    pub kind: RelayErrorKind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub result: ConnResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AreaLabels {
    pub area: AreaLabel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub queue: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub queue: String,
    /// The retry number (1 for the first retry); bounded by the policy's
    /// `maxRetries`.
    pub attempt: u32,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ParkLabels {
    pub queue: String,
    pub reason: ParkLabel,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric the sidecar exports.
pub struct Metrics {
    registry: Registry,
    /// Messages answered 202.
    pub accepted: Counter,
    /// Publish requests refused, by reason.
    pub rejected: Family<RejectLabels, Counter>,
    /// Messages confirmed by the broker and removed from the outbox.
    pub forwarded: Counter,
    /// Forwarding attempts that failed, by reason.
    pub forward_failures: Family<FailLabels, Counter>,
    /// Messages moved to the dead-letter area.
    pub dead_lettered: Counter,
    /// Connection attempts, by result.
    pub connections: Family<ConnLabels, Counter>,
    /// Established connections that were lost.
    pub connection_losses: Counter,
    /// 1 while connected to the broker.
    pub broker_connected: Gauge,
    /// 1 while the broker blocks publishing (resource alarm).
    pub broker_blocked: Gauge,
    /// Messages published and awaiting their confirm.
    pub inflight: Gauge,
    /// Messages and bytes held, by area.
    pub outbox_messages: Family<AreaLabels, Gauge>,
    pub outbox_bytes: Family<AreaLabels, Gauge>,
    /// Age of the oldest pending message.
    pub oldest_pending_age: Gauge<f64, AtomicU64>,
    /// Duration of outbox flushes.
    pub flush_duration: Histogram,
    /// Writers served per flush (group commit width).
    pub flush_batch: Histogram,
    /// Deliveries received from the broker, by queue.
    pub deliveries: Family<QueueLabels, Counter>,
    /// What became of deliveries, by queue and outcome.
    pub delivery_outcomes: Family<OutcomeLabels, Counter>,
    /// Retries scheduled, by queue and retry number.
    pub retries: Family<RetryLabels, Counter>,
    /// Messages parked, by queue and reason.
    pub parked: Family<ParkLabels, Counter>,
    /// Time the app took to answer a delivery (or to time out).
    pub app_latency: HistogramFamily<QueueLabels>,
    /// Deliveries being handled (waiting for a slot, at the app, or being
    /// republished).
    pub deliveries_in_flight: Gauge,
    /// 1 while the queue's subscription is active.
    pub subscribed: Family<QueueLabels, Gauge>,
    /// Subscriptions re-established after they ended.
    pub resubscriptions: Family<QueueLabels, Counter>,
    /// Rows the relay moved from the app's table into the outbox.
    pub relay_relayed: Counter,
    /// Rows the relay moved to the dead-letter table.
    pub relay_dead_lettered: Counter,
    /// Relay failures, by kind.
    pub relay_errors: Family<RelayErrorLabels, Counter>,
    /// Time from a row's `created_at` to the local outbox.
    pub relay_lag: Histogram,
    /// Age of the oldest row still in the app's table.
    pub relay_oldest_row_age: Gauge<f64, AtomicU64>,
    /// 1 while the relay is connected to the database.
    pub relay_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("warren_sidecar");
        let m = Metrics {
            accepted: Counter::default(),
            rejected: Family::default(),
            forwarded: Counter::default(),
            forward_failures: Family::default(),
            dead_lettered: Counter::default(),
            connections: Family::default(),
            connection_losses: Counter::default(),
            broker_connected: Gauge::default(),
            broker_blocked: Gauge::default(),
            inflight: Gauge::default(),
            outbox_messages: Family::default(),
            outbox_bytes: Family::default(),
            oldest_pending_age: Gauge::default(),
            flush_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            flush_batch: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            deliveries: Family::default(),
            delivery_outcomes: Family::default(),
            retries: Family::default(),
            parked: Family::default(),
            app_latency: Family::new_with_constructor(latency_histogram),
            deliveries_in_flight: Gauge::default(),
            subscribed: Family::default(),
            resubscriptions: Family::default(),
            relay_relayed: Counter::default(),
            relay_dead_lettered: Counter::default(),
            relay_errors: Family::default(),
            relay_lag: latency_histogram(),
            relay_oldest_row_age: Gauge::default(),
            relay_connected: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "publish_accepted",
            "Messages answered 202 (durable in the outbox)",
            m.accepted.clone(),
        );
        registry.register(
            "publish_rejected",
            "Publish requests refused, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "forwarded",
            "Messages confirmed by the broker and removed from the outbox",
            m.forwarded.clone(),
        );
        registry.register(
            "forward_failures",
            "Forwarding attempts that failed, by reason",
            m.forward_failures.clone(),
        );
        registry.register(
            "dead_lettered",
            "Messages moved to the local dead-letter area",
            m.dead_lettered.clone(),
        );
        registry.register(
            "broker_connection_attempts",
            "Broker connection attempts, by result",
            m.connections.clone(),
        );
        registry.register(
            "broker_connection_losses",
            "Established broker connections that were lost",
            m.connection_losses.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while connected to the broker",
            m.broker_connected.clone(),
        );
        registry.register(
            "broker_blocked",
            "1 while the broker blocks publishing",
            m.broker_blocked.clone(),
        );
        registry.register(
            "inflight_messages",
            "Messages published and awaiting a confirm",
            m.inflight.clone(),
        );
        registry.register(
            "outbox_messages",
            "Messages held in the outbox, by area",
            m.outbox_messages.clone(),
        );
        registry.register(
            "outbox_bytes",
            "Encoded bytes held in the outbox, by area",
            m.outbox_bytes.clone(),
        );
        registry.register(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest pending message",
            m.oldest_pending_age.clone(),
        );
        registry.register(
            "outbox_flush_duration_seconds",
            "Duration of outbox flushes",
            m.flush_duration.clone(),
        );
        registry.register(
            "outbox_flush_batch_size",
            "Writers served by one flush",
            m.flush_batch.clone(),
        );
        registry.register(
            "deliveries",
            "Deliveries received from the broker, by queue",
            m.deliveries.clone(),
        );
        registry.register(
            "delivery_outcomes",
            "What became of deliveries, by queue and outcome",
            m.delivery_outcomes.clone(),
        );
        registry.register(
            "delivery_retries",
            "Retries scheduled, by queue and retry number",
            m.retries.clone(),
        );
        registry.register(
            "parked",
            "Messages moved to the parking lot, by queue and reason",
            m.parked.clone(),
        );
        registry.register(
            "app_latency_seconds",
            "Time the app took to answer a delivery, by queue",
            m.app_latency.clone(),
        );
        registry.register(
            "deliveries_in_flight",
            "Deliveries being handled",
            m.deliveries_in_flight.clone(),
        );
        registry.register(
            "subscribed",
            "1 while the queue's subscription is active",
            m.subscribed.clone(),
        );
        registry.register(
            "resubscriptions",
            "Subscriptions re-established after they ended, by queue",
            m.resubscriptions.clone(),
        );
        registry.register(
            "relay_relayed",
            "Rows moved from the app's outbox table into the local outbox",
            m.relay_relayed.clone(),
        );
        registry.register(
            "relay_dead_lettered",
            "Rows moved to the relay's dead-letter table",
            m.relay_dead_lettered.clone(),
        );
        registry.register(
            "relay_errors",
            "Relay failures (all retried), by kind",
            m.relay_errors.clone(),
        );
        registry.register(
            "relay_lag_seconds",
            "Time from a row's created_at to the local outbox",
            m.relay_lag.clone(),
        );
        registry.register(
            "relay_oldest_row_age_seconds",
            "Age of the oldest row still in the app's outbox table",
            m.relay_oldest_row_age.clone(),
        );
        registry.register(
            "relay_connected",
            "1 while the relay is connected to the database",
            m.relay_connected.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Records one group-commit flush.
    pub fn observe_flush(&self, took: Duration, waiters: usize) {
        self.flush_duration.observe(took.as_secs_f64());
        self.flush_batch.observe(waiters as f64);
    }

    /// Counts a refused publish.
    pub fn reject(&self, reason: RejectReason) {
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
    }

    /// Counts a relay failure.
    pub fn relay_error(&self, kind: RelayErrorKind) {
        self.relay_errors
            .get_or_create(&RelayErrorLabels { kind })
            .inc();
    }

    /// Counts a failed forwarding attempt.
    pub fn forward_failed(&self, reason: FailReason) {
        self.forward_failures
            .get_or_create(&FailLabels { reason })
            .inc();
    }

    /// Counts what became of a delivery from `queue`.
    pub fn delivery_outcome(&self, queue: &str, outcome: Outcome) {
        self.delivery_outcomes
            .get_or_create(&OutcomeLabels {
                queue: queue.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Renders the OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
