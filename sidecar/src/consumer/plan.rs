//! The consumer's decisions, free of I/O: what the app is told about a
//! delivery, what an app answer means under the queue's retry policy, and
//! the copy that is republished for a retry or parked.
//!
//! Headers Warren reads and writes on the broker:
//!
//! | header | meaning |
//! | --- | --- |
//! | `x-retries` | retries so far (0 or absent on the first delivery) |
//! | `x-warren-last-error` | the last failure, JSON `{"attempt","status","reason","at"}` |
//! | `x-warren-history` | every failure so far (the most recent [`HISTORY_LIMIT`]), same JSON, oldest first |
//! | `x-warren-original-exchange`, `x-warren-original-routing-key` | where the message was first published |
//! | `x-warren-parked-reason` | `non-retryable` or `retries-exhausted` (parked copies) |
//! | `x-warren-parked-from`, `x-warren-parked-at` | the work queue and the time of parking |
//!
//! A republished copy drops the broker's `x-death`, `x-first-death-*` and
//! `x-last-death-*` headers: RabbitMQ drops a dead-lettered message whose
//! `x-death` shows a cycle without a rejection, and the retry path (work
//! queue → delay queue → work queue) is such a cycle by design.

use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use serde::Serialize;
use warren_crds::backoff::{Backoff, tier_for};
use warren_crds::names;
use warren_crds::retry::{DelayStrategy, RetryPolicySpec, Verdict};

pub const RETRIES: &str = "x-retries";
pub const LAST_ERROR: &str = "x-warren-last-error";
pub const HISTORY: &str = "x-warren-history";
pub const ORIGINAL_EXCHANGE: &str = "x-warren-original-exchange";
pub const ORIGINAL_ROUTING_KEY: &str = "x-warren-original-routing-key";
pub const PARKED_REASON: &str = "x-warren-parked-reason";
pub const PARKED_FROM: &str = "x-warren-parked-from";
pub const PARKED_AT: &str = "x-warren-parked-at";
/// Set by the `delayedMessageExchange` strategy.
pub const X_DELAY: &str = "x-delay";

/// Failures kept in `x-warren-history`, most recent last.
pub const HISTORY_LIMIT: usize = 25;

/// Longest excerpt of the app's answer kept as a failure reason.
pub const REASON_LIMIT: usize = 256;

/// How one delivery attempt to the app ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The app answered with this status; `excerpt` is the start of its
    /// body, for the failure record.
    Answered { status: u16, excerpt: String },
    /// No answer within the delivery timeout.
    TimedOut(Duration),
    /// The app could not be reached (connection refused, reset, …).
    Unreachable(String),
}

impl Attempt {
    /// The HTTP status, if the app answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Attempt::Answered { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A short description for logs and failure records.
    pub fn reason(&self) -> String {
        match self {
            Attempt::Answered { status, excerpt } if excerpt.is_empty() => {
                format!("app answered {status}")
            }
            Attempt::Answered { status, excerpt } => format!("app answered {status}: {excerpt}"),
            Attempt::TimedOut(t) => format!(
                "app did not answer within {}",
                humantime::format_duration(*t)
            ),
            Attempt::Unreachable(e) => format!("app unreachable: {e}"),
        }
    }
}

/// Why a message went to the parking lot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkReason {
    /// The app's answer is not retryable under the policy.
    NonRetryable,
    /// It failed once more after `maxRetries` retries.
    RetriesExhausted,
}

impl ParkReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ParkReason::NonRetryable => "non-retryable",
            ParkReason::RetriesExhausted => "retries-exhausted",
        }
    }
}

/// Where a retry copy is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub exchange: String,
    pub routing_key: String,
    /// `x-delay` in milliseconds (delayed-message exchange only).
    pub x_delay_ms: Option<u64>,
    /// Whether to publish `mandatory`: always, except to a delayed-message
    /// exchange, which routes only when the delay is over and would return
    /// every message.
    pub mandatory: bool,
}

/// What to do with a delivery after the app's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Acknowledge it: the app is done with it.
    Ack,
    /// Publish a copy with `x-retries` = `retries` to `target`, which holds
    /// it for `delay`; then acknowledge the original.
    Retry {
        retries: u32,
        delay: Duration,
        target: Target,
    },
    /// Publish a copy to the parking lot; then acknowledge the original.
    Park(ParkReason),
}

/// The action for a delivery of `queue` that had `retries` retries before
/// and ended as `attempt`. `unit` is a random number in `0..1` for jitter.
pub fn decide(
    policy: &RetryPolicySpec,
    queue: &str,
    retries: u32,
    attempt: &Attempt,
    unit: f64,
) -> Action {
    let verdict = match attempt {
        Attempt::Answered { status, .. } => policy.verdict(*status),
        Attempt::TimedOut(_) | Attempt::Unreachable(_) => Verdict::Retry,
    };
    match verdict {
        Verdict::Done => Action::Ack,
        Verdict::Park => Action::Park(ParkReason::NonRetryable),
        Verdict::Retry if retries >= policy.max_retries => {
            Action::Park(ParkReason::RetriesExhausted)
        }
        Verdict::Retry => {
            let backoff = Backoff::from(policy.backoff);
            match policy.delay_strategy {
                DelayStrategy::TtlTiers => {
                    // A tier releases its messages at a fixed TTL, so the
                    // delay is the tier's; jitter cannot apply.
                    let tiers = policy.tiers();
                    let delay = tier_for(&tiers, backoff.delay(retries))
                        .unwrap_or_else(|| backoff.delay(retries));
                    Action::Retry {
                        retries: retries + 1,
                        delay,
                        target: Target {
                            exchange: names::retry_exchange(queue),
                            routing_key: names::retry_tier_routing_key(delay),
                            x_delay_ms: None,
                            mandatory: true,
                        },
                    }
                }
                DelayStrategy::DelayedMessageExchange => {
                    let delay = backoff.jittered_delay(retries, unit);
                    Action::Retry {
                        retries: retries + 1,
                        delay,
                        target: Target {
                            exchange: names::retry_exchange(queue),
                            routing_key: queue.to_owned(),
                            x_delay_ms: Some(delay.as_millis() as u64),
                            mandatory: false,
                        },
                    }
                }
            }
        }
    }
}

/// The retry count a delivery carries in `x-retries` (0 when absent or not
/// a non-negative number).
pub fn retries_of(props: &BasicProperties) -> u32 {
    let Some(v) = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(RETRIES))
    else {
        return 0;
    };
    // Integers of any width, or their decimal text; the same reading as
    // the JSON the app is shown.
    let n: i128 = match to_json(v) {
        serde_json::Value::Number(n) if n.is_i64() => n.as_i64().unwrap_or(0).into(),
        serde_json::Value::Number(n) => n.as_u64().unwrap_or(0).into(),
        serde_json::Value::String(s) => s.trim().parse().unwrap_or(0),
        _ => 0,
    };
    n.clamp(0, u32::MAX as i128) as u32
}

/// One failed attempt, as recorded in `x-warren-last-error` and
/// `x-warren-history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// 0 for the first delivery, then the retry number.
    pub attempt: u32,
    /// The app's HTTP status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// What happened, in the app's or the network's words.
    pub reason: String,
    /// When, RFC 3339 UTC.
    pub at: String,
}

impl Failure {
    /// The failure of attempt number `attempt` that ended as `outcome`, now.
    pub fn now(attempt: u32, outcome: &Attempt) -> Self {
        Self {
            attempt,
            status: outcome.status(),
            reason: outcome.reason(),
            at: rfc3339(SystemTime::now()),
        }
    }

    fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a failure record always serialises")
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// What the republished copy is for.
#[derive(Debug, Clone)]
pub enum Copy<'a> {
    /// A retry with `x-retries` = `retries`, through `target`.
    Retry { retries: u32, target: &'a Target },
    /// A parked copy, out of work queue `queue`.
    Park { reason: ParkReason, queue: &'a str },
}

/// The delivery a copy is made from.
#[derive(Debug, Clone, Copy)]
pub struct Original<'a> {
    pub properties: &'a BasicProperties,
    /// The exchange and routing key it was delivered with.
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// Its message id (assigned by the sidecar if it had none).
    pub message_id: &'a str,
}

/// The properties of a copy of `original` republished after `failure`:
/// persistent, same message id and content, the broker's death headers
/// dropped, Warren's retry headers updated.
pub fn copy_properties(
    original: Original<'_>,
    failure: &Failure,
    copy: Copy<'_>,
) -> BasicProperties {
    let src = original.properties;
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(original.message_id.into());
    // Everything the publisher set travels on, except what would change the
    // copy's fate: `expiration` (a per-message TTL would expire it in a
    // delay queue or the parking lot) and `user_id` (the broker refuses a
    // user id other than the connection's).
    if let Some(v) = src.content_type() {
        props = props.with_content_type(v.clone());
    }
    if let Some(v) = src.content_encoding() {
        props = props.with_content_encoding(v.clone());
    }
    if let Some(v) = src.priority() {
        props = props.with_priority(*v);
    }
    if let Some(v) = src.correlation_id() {
        props = props.with_correlation_id(v.clone());
    }
    if let Some(v) = src.reply_to() {
        props = props.with_reply_to(v.clone());
    }
    if let Some(v) = src.timestamp() {
        props = props.with_timestamp(*v);
    }
    if let Some(v) = src.kind() {
        props = props.with_type(v.clone());
    }
    if let Some(v) = src.app_id() {
        props = props.with_app_id(v.clone());
    }

    let mut headers = FieldTable::default();
    let mut history: Vec<AMQPValue> = Vec::new();
    if let Some(h) = src.headers() {
        for (k, v) in h.inner() {
            let key = k.as_str();
            if key == "x-death"
                || key.starts_with("x-first-death-")
                || key.starts_with("x-last-death-")
                || [RETRIES, LAST_ERROR, X_DELAY].contains(&key)
            {
                continue;
            }
            if key == HISTORY {
                if let AMQPValue::FieldArray(a) = v {
                    history.extend(a.as_slice().iter().cloned());
                }
                continue;
            }
            headers.insert(k.clone(), v.clone());
        }
    }
    history.push(AMQPValue::LongString(failure.to_json().into()));
    if history.len() > HISTORY_LIMIT {
        history.drain(..history.len() - HISTORY_LIMIT);
    }
    headers.insert(
        HISTORY.into(),
        AMQPValue::FieldArray(FieldArray::from(history)),
    );
    headers.insert(
        LAST_ERROR.into(),
        AMQPValue::LongString(failure.to_json().into()),
    );
    if !headers.contains_key(ORIGINAL_EXCHANGE) {
        headers.insert(ORIGINAL_EXCHANGE.into(), long_string(original.exchange));
        headers.insert(
            ORIGINAL_ROUTING_KEY.into(),
            long_string(original.routing_key),
        );
    }
    match copy {
        Copy::Retry { retries, target } => {
            headers.insert(RETRIES.into(), AMQPValue::LongLongInt(retries.into()));
            if let Some(ms) = target.x_delay_ms {
                headers.insert(
                    X_DELAY.into(),
                    AMQPValue::LongLongInt(ms.min(i64::MAX as u64) as i64),
                );
            }
        }
        Copy::Park { reason, queue } => {
            headers.insert(
                RETRIES.into(),
                AMQPValue::LongLongInt(failure.attempt.into()),
            );
            headers.insert(PARKED_REASON.into(), long_string(reason.as_str()));
            headers.insert(PARKED_FROM.into(), long_string(queue));
            headers.insert(PARKED_AT.into(), long_string(&failure.at));
        }
    }
    props.with_headers(headers)
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// The HTTP headers of a delivery to the app, besides `Content-Type`:
/// Warren's own, then each AMQP header as `X-Warren-Header-<name>`.
/// Headers whose name or value HTTP cannot carry are left out and counted
/// in the second value.
pub fn app_headers(
    properties: &BasicProperties,
    queue: &str,
    message_id: &str,
    retries: u32,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
) -> (Vec<(String, String)>, usize) {
    let mut out = vec![
        ("X-Warren-Message-Id".to_owned(), message_id.to_owned()),
        ("X-Warren-Queue".to_owned(), queue.to_owned()),
        ("X-Warren-Retries".to_owned(), retries.to_string()),
        ("X-Warren-Redelivered".to_owned(), redelivered.to_string()),
        ("X-Warren-Exchange".to_owned(), exchange.to_owned()),
        ("X-Warren-Routing-Key".to_owned(), routing_key.to_owned()),
    ];
    if let Some(id) = properties.correlation_id() {
        out.push(("X-Warren-Correlation-Id".to_owned(), id.to_string()));
    }
    let mut skipped = 0;
    if let Some(h) = properties.headers() {
        for (k, v) in h.inner() {
            let name = format!("X-Warren-Header-{}", k.as_str());
            let value = header_text(v);
            if is_token(k.as_str()) && is_field_value(&value) {
                out.push((name, value));
            } else {
                skipped += 1;
            }
        }
    }
    (out, skipped)
}

/// An AMQP header value as HTTP header text: strings as they are, numbers
/// and booleans in decimal, arrays and tables as JSON.
pub fn header_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        other => match to_json(other) {
            serde_json::Value::String(s) => s,
            j => j.to_string(),
        },
    }
}

/// An AMQP value as JSON.
pub fn to_json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        AMQPValue::Boolean(b) => J::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        AMQPValue::Float(f) => serde_json::Number::from_f64((*f).into()).map_or(J::Null, J::Number),
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        AMQPValue::DecimalValue(d) => J::String(format!("{}e-{}", d.value, d.scale)),
        AMQPValue::ShortString(s) => J::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => J::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::FieldArray(a) => J::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::FieldTable(t) => J::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => J::Array(b.as_slice().iter().map(|x| (*x).into()).collect()),
        AMQPValue::Void => J::Null,
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_field_value(s: &str) -> bool {
    s.bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

/// The start of an app's answer body as a one-line excerpt.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(REASON_LIMIT * 4)]);
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(REASON_LIMIT)
        .collect();
    out.truncate(out.trim_end().len());
    out
}

/// The delivery's message id. A delivery without one gets an id derived
/// from the message itself ([`derived_message_id`]), so a redelivery of the
/// same message reaches the app under the same id; its retry and parked
/// copies carry that id as their `message_id`.
pub fn message_id_of(
    props: &BasicProperties,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) -> String {
    props
        .message_id()
        .as_ref()
        .map(ShortString::as_str)
        .filter(|id| !id.is_empty())
        .map_or_else(
            || derived_message_id(props, exchange, routing_key, body).to_string(),
            str::to_owned,
        )
}

/// Whether a header is added by the broker or by Warren on redelivery,
/// retry and dead-lettering, and so is no part of the message's identity.
fn added_on_retry(key: &str) -> bool {
    // A quorum queue counts redeliveries in `x-delivery-count` (RabbitMQ
    // 4 also in `x-acquired-count`).
    key == "x-delivery-count"
        || key == "x-acquired-count"
        || key == "x-death"
        || key.starts_with("x-first-death-")
        || key.starts_with("x-last-death-")
        || key.starts_with("x-warren-")
        || key == RETRIES
        || key == X_DELAY
}

/// A UUIDv5 over what the publisher sent: the exchange and routing key it
/// was first published with (the `x-warren-original-*` headers, else the
/// broker's `x-first-death-exchange`, else the delivery's own), the
/// properties a copy keeps (content type and encoding, priority,
/// correlation id, reply-to, timestamp, type, app id), the headers except
/// those added on redelivery, retry and dead-lettering, and the body. The same message
/// always gets the same id; one differing in any of these gets another.
pub fn derived_message_id(
    props: &BasicProperties,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) -> uuid::Uuid {
    let headers = props.headers().as_ref().map(FieldTable::inner);
    let header_text = |key: &str| match headers.and_then(|h| h.get(key)) {
        Some(v @ (AMQPValue::LongString(_) | AMQPValue::ShortString(_))) => Some(header_text(v)),
        _ => None,
    };
    let exchange = header_text(ORIGINAL_EXCHANGE)
        .or_else(|| header_text("x-first-death-exchange"))
        .unwrap_or_else(|| exchange.to_owned());
    let routing_key = header_text(ORIGINAL_ROUTING_KEY).unwrap_or_else(|| routing_key.to_owned());
    let mut identity = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        identity.insert(k.to_owned(), v);
    };
    put("exchange", exchange.into());
    put("routing_key", routing_key.into());
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned()).into();
    put("content_type", text(props.content_type()));
    put("content_encoding", text(props.content_encoding()));
    put("priority", (*props.priority()).into());
    put("correlation_id", text(props.correlation_id()));
    put("reply_to", text(props.reply_to()));
    put("timestamp", (*props.timestamp()).into());
    put("type", text(props.kind()));
    put("app_id", text(props.app_id()));
    let kept: serde_json::Map<String, serde_json::Value> = headers
        .into_iter()
        .flatten()
        .filter(|(k, _)| !added_on_retry(k.as_str()))
        .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
        .collect();
    put("headers", kept.into());
    // serde_json's map is ordered by key, so the text is canonical.
    let mut name = serde_json::Value::Object(identity).to_string().into_bytes();
    name.push(0);
    name.extend_from_slice(body);
    uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, &name)
}

/// The UUIDv5 namespace of derived message ids.
const MESSAGE_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("6f1d1f0e-6a43-5b0e-9d0a-7761727265e6");

#[cfg(test)]
mod tests {
    use super::*;
    use warren_crds::duration::HumanDuration;
    use warren_crds::retry::StatusPattern;

    fn policy() -> RetryPolicySpec {
        let mut p = RetryPolicySpec {
            max_retries: 4,
            ..Default::default()
        };
        p.backoff.initial = HumanDuration::from_secs(1);
        p.backoff.max = HumanDuration::from_secs(5);
        p.backoff.jitter = 0.5;
        p
    }

    fn answered(status: u16) -> Attempt {
        Attempt::Answered {
            status,
            excerpt: String::new(),
        }
    }

    #[test]
    fn answers_map_to_actions() {
        let p = policy();
        assert_eq!(decide(&p, "q", 0, &answered(200), 0.0), Action::Ack);
        assert_eq!(
            decide(&p, "q", 0, &answered(422), 0.0),
            Action::Park(ParkReason::NonRetryable)
        );
        assert_eq!(
            decide(&p, "q", 4, &answered(503), 0.0),
            Action::Park(ParkReason::RetriesExhausted)
        );
        // A non-retryable answer parks even with retries left, a retryable
        // one never parks before maxRetries.
        for retries in 0..4 {
            for attempt in [
                answered(503),
                answered(429),
                Attempt::TimedOut(Duration::from_secs(1)),
                Attempt::Unreachable("refused".into()),
            ] {
                assert!(matches!(
                    decide(&p, "q", retries, &attempt, 0.0),
                    Action::Retry { retries: r, .. } if r == retries + 1
                ));
            }
        }
    }

    #[test]
    fn ttl_tiers_pick_the_tier_queue_by_routing_key() {
        let p = policy();
        let delays: Vec<(Duration, String, String)> = (0..4)
            .map(|r| match decide(&p, "orders", r, &answered(500), 0.99) {
                Action::Retry { delay, target, .. } => {
                    assert!(target.mandatory);
                    assert_eq!(target.x_delay_ms, None);
                    (delay, target.exchange, target.routing_key)
                }
                other => panic!("{other:?}"),
            })
            .collect();
        let want = [(1, "1s"), (2, "2s"), (4, "4s"), (5, "5s")];
        for ((delay, exchange, key), (secs, name)) in delays.into_iter().zip(want) {
            assert_eq!(
                delay,
                Duration::from_secs(secs),
                "jitter must not move the tier"
            );
            assert_eq!(exchange, "orders.retry");
            assert_eq!(key, name);
        }
    }

    #[test]
    fn delayed_exchange_sets_x_delay_with_jitter() {
        let mut p = policy();
        p.delay_strategy = DelayStrategy::DelayedMessageExchange;
        match decide(&p, "orders", 1, &answered(500), 1.0) {
            Action::Retry { delay, target, .. } => {
                assert_eq!(delay, Duration::from_secs(3));
                assert_eq!(target.x_delay_ms, Some(3000));
                assert_eq!(target.routing_key, "orders");
                assert!(!target.mandatory);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn custom_status_lists_apply() {
        let mut p = policy();
        p.retryable_statuses = vec![StatusPattern::Exact(409)];
        p.non_retryable_statuses = vec![StatusPattern::Class(4), StatusPattern::Exact(501)];
        assert!(matches!(
            decide(&p, "q", 0, &answered(409), 0.0),
            Action::Retry { .. }
        ));
        assert_eq!(
            decide(&p, "q", 0, &answered(429), 0.0),
            Action::Park(ParkReason::NonRetryable)
        );
        assert_eq!(
            decide(&p, "q", 0, &answered(501), 0.0),
            Action::Park(ParkReason::NonRetryable)
        );
    }

    #[test]
    fn retry_counts_are_read_from_any_number_type() {
        let with = |v: AMQPValue| {
            let mut h = FieldTable::default();
            h.insert(RETRIES.into(), v);
            retries_of(&BasicProperties::default().with_headers(h))
        };
        assert_eq!(retries_of(&BasicProperties::default()), 0);
        assert_eq!(with(AMQPValue::LongLongInt(3)), 3);
        assert_eq!(with(AMQPValue::ShortShortUInt(2)), 2);
        assert_eq!(with(AMQPValue::LongInt(-5)), 0);
        assert_eq!(with(AMQPValue::LongString("7".into())), 7);
        assert_eq!(with(AMQPValue::Boolean(true)), 0);
    }

    fn delivered_twice() -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        h.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString("orders.retry.1s".into()),
        );
        h.insert(
            "x-last-death-reason".into(),
            AMQPValue::LongString("expired".into()),
        );
        h.insert(RETRIES.into(), AMQPValue::LongLongInt(1));
        h.insert(
            ORIGINAL_EXCHANGE.into(),
            AMQPValue::LongString("shop".into()),
        );
        h.insert(
            ORIGINAL_ROUTING_KEY.into(),
            AMQPValue::LongString("created".into()),
        );
        h.insert(
            HISTORY.into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongString("{\"attempt\":0}".into())].into()),
        );
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_expiration("60000".into())
            .with_user_id("someone".into())
            .with_correlation_id("c-1".into())
            .with_headers(h)
    }

    fn header<'a>(p: &'a BasicProperties, k: &str) -> Option<&'a AMQPValue> {
        p.headers().as_ref().unwrap().inner().get(k)
    }

    #[test]
    fn retry_copies_drop_death_headers_and_carry_history() {
        let props = delivered_twice();
        let failure = Failure::now(1, &answered(503));
        let target = Target {
            exchange: "orders.retry".into(),
            routing_key: "2s".into(),
            x_delay_ms: None,
            mandatory: true,
        };
        let copy = copy_properties(
            Original {
                properties: &props,
                exchange: "",
                routing_key: "orders",
                message_id: "m-1",
            },
            &failure,
            Copy::Retry {
                retries: 2,
                target: &target,
            },
        );
        assert_eq!(copy.delivery_mode(), &Some(2));
        assert_eq!(copy.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(
            copy.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(copy.correlation_id().as_ref().unwrap().as_str(), "c-1");
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.user_id(), &None);
        for gone in [
            "x-death",
            "x-first-death-queue",
            "x-last-death-reason",
            X_DELAY,
        ] {
            assert!(header(&copy, gone).is_none(), "{gone} kept");
        }
        assert_eq!(header(&copy, RETRIES), Some(&AMQPValue::LongLongInt(2)));
        assert_eq!(
            header(&copy, "tenant"),
            Some(&AMQPValue::LongString("acme".into()))
        );
        // The first publish's route is kept, not the dead-lettering route.
        assert_eq!(
            header_text(header(&copy, ORIGINAL_EXCHANGE).unwrap()),
            "shop"
        );
        let Some(AMQPValue::FieldArray(history)) = header(&copy, HISTORY) else {
            panic!("no history")
        };
        assert_eq!(history.as_slice().len(), 2);
        let last: serde_json::Value =
            serde_json::from_str(&header_text(&history.as_slice()[1])).unwrap();
        assert_eq!(last["attempt"], 1);
        assert_eq!(last["status"], 503);
        assert_eq!(
            header_text(header(&copy, LAST_ERROR).unwrap()),
            header_text(&history.as_slice()[1])
        );
    }

    #[test]
    fn parked_copies_say_why_and_where_from() {
        let props = BasicProperties::default();
        let failure = Failure::now(0, &answered(400));
        let copy = copy_properties(
            Original {
                properties: &props,
                exchange: "shop",
                routing_key: "created",
                message_id: "m-2",
            },
            &failure,
            Copy::Park {
                reason: ParkReason::NonRetryable,
                queue: "orders",
            },
        );
        assert_eq!(
            header_text(header(&copy, PARKED_REASON).unwrap()),
            "non-retryable"
        );
        assert_eq!(header_text(header(&copy, PARKED_FROM).unwrap()), "orders");
        assert_eq!(
            header_text(header(&copy, ORIGINAL_ROUTING_KEY).unwrap()),
            "created"
        );
        assert_eq!(header(&copy, RETRIES), Some(&AMQPValue::LongLongInt(0)));
    }

    #[test]
    fn history_is_bounded() {
        let mut props = BasicProperties::default();
        for attempt in 0..(HISTORY_LIMIT as u32 + 10) {
            props = copy_properties(
                Original {
                    properties: &props,
                    exchange: "",
                    routing_key: "q",
                    message_id: "m",
                },
                &Failure::now(attempt, &answered(500)),
                Copy::Park {
                    reason: ParkReason::RetriesExhausted,
                    queue: "q",
                },
            );
        }
        let Some(AMQPValue::FieldArray(history)) = header(&props, HISTORY) else {
            panic!()
        };
        assert_eq!(history.as_slice().len(), HISTORY_LIMIT);
        let last: serde_json::Value =
            serde_json::from_str(&header_text(history.as_slice().last().unwrap())).unwrap();
        assert_eq!(last["attempt"], HISTORY_LIMIT as u32 + 9);
    }

    #[test]
    fn app_headers_carry_the_contract_and_skip_what_http_cannot() {
        let mut h = FieldTable::default();
        h.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        h.insert("count".into(), AMQPValue::LongInt(3));
        h.insert("bad name".into(), AMQPValue::LongString("x".into()));
        h.insert("newline".into(), AMQPValue::LongString("a\nb".into()));
        let props = BasicProperties::default().with_headers(h);
        let (headers, skipped) = app_headers(&props, "orders", "m-1", 2, true, "shop", "created");
        let get = |k: &str| {
            headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("X-Warren-Message-Id"), Some("m-1"));
        assert_eq!(get("X-Warren-Queue"), Some("orders"));
        assert_eq!(get("X-Warren-Retries"), Some("2"));
        assert_eq!(get("X-Warren-Redelivered"), Some("true"));
        assert_eq!(get("X-Warren-Header-tenant"), Some("acme"));
        assert_eq!(get("X-Warren-Header-count"), Some("3"));
        assert_eq!(skipped, 2);
    }

    #[test]
    fn excerpts_are_one_bounded_line() {
        assert_eq!(excerpt(b"out of stock\r\n"), "out of stock");
        assert_eq!(excerpt(&[b'x'; 10_000]).len(), REASON_LIMIT);
        assert_eq!(excerpt(b"a\nb"), "a b");
    }

    #[test]
    fn messages_without_an_id_get_one_derived_from_the_message() {
        // As the publisher sent it: no message id, one header of its own.
        let mut h = FieldTable::default();
        h.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        let sent = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id("c-1".into())
            .with_headers(h);
        let id =
            |p: &BasicProperties, ex: &str, rk: &str, body: &[u8]| message_id_of(p, ex, rk, body);
        let first = id(&sent, "shop", "created", b"{}");
        assert_eq!(
            uuid::Uuid::parse_str(&first).unwrap().get_version_num(),
            5,
            "{first}"
        );
        // The same message, delivered again: the same id.
        assert_eq!(id(&sent, "shop", "created", b"{}"), first);
        // Any difference in what the publisher sent: another id.
        assert_ne!(id(&sent, "shop", "created", b"{ }"), first);
        assert_ne!(id(&sent, "shop", "updated", b"{}"), first);
        assert_ne!(id(&sent, "other", "created", b"{}"), first);
        let mut h = FieldTable::default();
        h.insert("tenant".into(), AMQPValue::LongString("globex".into()));
        assert_ne!(
            id(&sent.clone().with_headers(h), "shop", "created", b"{}"),
            first
        );
        assert_ne!(
            id(&sent.clone().with_priority(3), "shop", "created", b"{}"),
            first
        );
        // What the broker and Warren add on redelivery, retry and
        // dead-lettering (x-delivery-count, x-death, x-first-death-*,
        // x-retries, x-warren-*, the dead-letter
        // route) and what a copy drops (expiration, user id) change nothing.
        let mut dead_lettered = delivered_twice();
        let mut h = dead_lettered.headers().clone().unwrap();
        h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        dead_lettered = dead_lettered.with_headers(h);
        assert_eq!(
            derived_message_id(&dead_lettered, "orders.retry", "1s", b"{}").to_string(),
            first
        );
        let copy = copy_properties(
            Original {
                properties: &dead_lettered,
                exchange: "orders.retry",
                routing_key: "1s",
                message_id: &first,
            },
            &Failure::now(1, &answered(503)),
            Copy::Park {
                reason: ParkReason::RetriesExhausted,
                queue: "orders",
            },
        );
        assert_eq!(
            derived_message_id(&copy, "", "orders.parked", b"{}").to_string(),
            first
        );
        // A message id the publisher set wins.
        assert_eq!(
            id(
                &sent.clone().with_message_id("m-7".into()),
                "shop",
                "created",
                b"{}"
            ),
            "m-7"
        );
        assert_eq!(
            id(&sent.with_message_id("".into()), "shop", "created", b"{}"),
            first
        );
    }

    #[test]
    fn reasons_name_what_happened() {
        assert_eq!(answered(503).reason(), "app answered 503");
        assert_eq!(
            Attempt::TimedOut(Duration::from_millis(1500)).reason(),
            "app did not answer within 1s 500ms"
        );
    }
}
