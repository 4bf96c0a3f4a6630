//! The admin API: what operators and probes read or do. The outbox's
//! report, the dead letters and their replay, the consumer's and the
//! relay's status (on the app port, under `/v1/`), and readiness and
//! metrics (on the admin port).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ApiError, AppState, DEFAULT_EXCHANGE_ALIAS, check_accepting, read_body};
use crate::consumer::ConsumerSnapshot;
use crate::metrics::{AreaLabel, AreaLabels, Metrics};
use crate::outbox::{Durability, Message, Outbox, now_ms};
use crate::status::BrokerSnapshot;

/// The body of `GET /v1/outbox`.
#[derive(Debug, Serialize, Deserialize)]
pub struct OutboxReport {
    /// Messages waiting to be forwarded.
    pub pending: u64,
    /// Their encoded size.
    pub pending_bytes: u64,
    /// Age of the oldest pending message, if any.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Messages in the local dead-letter area.
    pub dead_lettered: u64,
    /// Their encoded size.
    pub dead_lettered_bytes: u64,
    /// `flush` or `buffered`.
    pub durability: String,
    /// False while shutting down or after a storage failure.
    pub accepting: bool,
    /// The storage failure that stopped writes, if any.
    pub storage_error: Option<String>,
    /// Configured bounds.
    pub max_messages: u64,
    pub max_bytes: u64,
    /// The broker connection.
    pub broker: serde_json::Value,
}

fn report(state: &AppState) -> Result<OutboxReport, ApiError> {
    let stats = state.outbox.stats();
    let oldest = state.outbox.oldest_pending_ms().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "outbox_failed",
            e.to_string(),
        )
    })?;
    let storage_error = state.outbox.poisoned();
    let broker: BrokerSnapshot = state.status.snapshot();
    Ok(OutboxReport {
        pending: stats.pending,
        pending_bytes: stats.pending_bytes,
        oldest_pending_age_seconds: oldest.map(|t| now_ms().saturating_sub(t) as f64 / 1000.0),
        dead_lettered: stats.dead,
        dead_lettered_bytes: stats.dead_bytes,
        durability: match state.outbox.durability() {
            Durability::Flush => "flush",
            Durability::Buffered => "buffered",
        }
        .into(),
        accepting: state.accepting.load(Ordering::Acquire) && storage_error.is_none(),
        storage_error,
        max_messages: state.outbox_limits.max_messages,
        max_bytes: state.outbox_limits.max_bytes,
        broker: serde_json::to_value(broker).unwrap_or_default(),
    })
}

pub(super) async fn consumer_status(State(state): State<Arc<AppState>>) -> Json<ConsumerSnapshot> {
    Json(state.consumer.snapshot())
}

/// The relay's state and counters, or `{"enabled": false}`.
pub(super) async fn relay_status(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    match &state.relay {
        Some(relay) => {
            let mut v = serde_json::to_value(relay.snapshot()).unwrap_or_default();
            v["enabled"] = json!(true);
            Json(v)
        }
        None => Json(json!({ "enabled": false })),
    }
}

pub(super) async fn outbox_status(
    State(state): State<Arc<AppState>>,
) -> Result<Json<OutboxReport>, ApiError> {
    report(&state).map(Json)
}

#[derive(Debug, Deserialize)]
pub(super) struct DeadQuery {
    #[serde(default)]
    from: u64,
    #[serde(default = "default_dead_limit")]
    limit: usize,
}

fn default_dead_limit() -> usize {
    100
}

pub(super) async fn dead_list(
    State(state): State<Arc<AppState>>,
    query: Result<Query<DeadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("malformed query: {e}")))?;
    let limit = q.limit.clamp(1, 1000);
    let entries = state.outbox.dead(q.from, limit + 1).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "outbox_failed",
            e.to_string(),
        )
    })?;
    let next = entries.get(limit).map(|(seq, _)| *seq);
    let messages: Vec<serde_json::Value> = entries
        .into_iter()
        .take(limit)
        .map(|(seq, entry)| match entry {
            Ok(d) => match Message::decode(&d.raw) {
                Ok(m) => json!({
                    "seq": seq,
                    "id": m.message_id,
                    "exchange": if m.exchange.is_empty() { DEFAULT_EXCHANGE_ALIAS } else { m.exchange.as_str() },
                    "routing_key": m.routing_key,
                    "body_bytes": m.body.len(),
                    "enqueued_at_ms": m.enqueued_at_ms,
                    "dead_at_ms": d.dead_at_ms,
                    "attempts": d.attempts,
                    "reason": d.reason,
                }),
                Err(e) => json!({ "seq": seq, "dead_at_ms": d.dead_at_ms, "reason": d.reason, "corrupt": e.to_string() }),
            },
            Err(e) => json!({ "seq": seq, "corrupt": e.to_string() }),
        })
        .collect();
    Ok(Json(json!({ "messages": messages, "next": next })))
}

pub(super) async fn dead_retry(
    State(state): State<Arc<AppState>>,
    path: Result<Path<u64>, PathRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let seq = path
        .map_err(|e| ApiError::invalid(format!("malformed path: {e}")))?
        .0;
    match state.outbox.requeue_dead(seq).await {
        Ok(Some(new_seq)) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "seq": seq, "new_seq": new_seq })),
        )),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no dead-lettered message with seq {seq}"),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "outbox_failed",
            e.to_string(),
        )),
    }
}

/// The body of `POST /v1/outbox/dead/retry`: which dead-lettered messages
/// to move back to the pending queue. The criteria combine (all must hold);
/// `all` replays every one and stands alone.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadFilter {
    #[serde(default)]
    all: bool,
    /// The exchange the message was published to (`amq.default` for the
    /// default exchange).
    exchange: Option<String>,
    /// A substring of the refusal reason.
    reason_contains: Option<String>,
    /// Dead-lettered before this time (ms since the Unix epoch).
    dead_before_ms: Option<u64>,
    /// Dead-lettered at least this long ago (`30s`, `5m`, `2h`).
    older_than: Option<String>,
}

/// Most `(seq, new_seq)` pairs a bulk replay lists; the count is complete.
const REPLAY_LISTED_MAX: usize = 1000;

pub(super) async fn dead_retry_matching(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let (parts, body) = req.into_parts();
    let raw = read_body(body, &parts.headers, 64 * 1024).await?;
    let missing = || {
        ApiError::invalid(
            "a filter is required: any of exchange, reason_contains, dead_before_ms, \
             older_than, or {\"all\": true} to replay every dead-lettered message",
        )
    };
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(missing());
    }
    let f: DeadFilter = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::invalid(format!("malformed filter: {e}")))?;
    let narrowed = f.exchange.is_some()
        || f.reason_contains.is_some()
        || f.dead_before_ms.is_some()
        || f.older_than.is_some();
    if f.all && narrowed {
        return Err(ApiError::invalid(
            "\"all\": true replays every dead-lettered message and cannot be combined with a filter",
        ));
    }
    if !f.all && !narrowed {
        return Err(missing());
    }
    let exchange = match f.exchange.as_deref() {
        Some("") => {
            return Err(ApiError::invalid(format!(
                "exchange must not be empty; the default exchange is {DEFAULT_EXCHANGE_ALIAS}"
            )));
        }
        Some(DEFAULT_EXCHANGE_ALIAS) => Some(""),
        other => other,
    };
    if f.reason_contains.as_deref() == Some("") {
        return Err(ApiError::invalid("reason_contains must not be empty"));
    }
    let now = now_ms();
    let older_cutoff = match f.older_than.as_deref() {
        Some(text) => {
            let age: std::time::Duration = text
                .parse::<warren_crds::duration::HumanDuration>()
                .map_err(|e| ApiError::invalid(format!("older_than: {e}")))?
                .into();
            Some(now.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)))
        }
        None => None,
    };
    let mut corrupt = 0u64;
    let moved = state
        .outbox
        .requeue_dead_matching(|_, dead| {
            if f.dead_before_ms.is_some_and(|t| dead.dead_at_ms >= t)
                || older_cutoff.is_some_and(|t| dead.dead_at_ms > t)
                || f.reason_contains
                    .as_deref()
                    .is_some_and(|r| !dead.reason.contains(r))
            {
                return false;
            }
            let Some(exchange) = exchange else {
                return true;
            };
            match Message::decode(&dead.raw) {
                Ok(m) => m.exchange == exchange,
                Err(_) => {
                    corrupt += 1;
                    false
                }
            }
        })
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "outbox_failed",
                e.to_string(),
            )
        })?;
    let listed: Vec<serde_json::Value> = moved
        .iter()
        .take(REPLAY_LISTED_MAX)
        .map(|(seq, new_seq)| json!({ "seq": seq, "new_seq": new_seq }))
        .collect();
    let mut body = json!({
        "requeued": moved.len(),
        "messages": listed,
        "truncated": moved.len() > REPLAY_LISTED_MAX,
    });
    if corrupt > 0 {
        body["skipped_corrupt"] = json!(corrupt);
    }
    Ok((StatusCode::ACCEPTED, Json(body)))
}

pub(super) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if let Some(err) = state.outbox.poisoned() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "outbox_failed", err)
            .into_response();
    }
    if let Err(e) = check_accepting(&state) {
        return e.into_response();
    }
    // A broker outage does not make the sidecar unready: the outbox still
    // accepts, which is the point of having it.
    (StatusCode::OK, "ready").into_response()
}

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    update_gauges(&state.metrics, &state.outbox);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

fn update_gauges(metrics: &Metrics, outbox: &Outbox) {
    let s = outbox.stats();
    for (area, n, b) in [
        (AreaLabel::Pending, s.pending, s.pending_bytes),
        (AreaLabel::Dead, s.dead, s.dead_bytes),
    ] {
        metrics
            .outbox_messages
            .get_or_create(&AreaLabels { area })
            .set(n as i64);
        metrics
            .outbox_bytes
            .get_or_create(&AreaLabels { area })
            .set(b as i64);
    }
    let age = outbox
        .oldest_pending_ms()
        .ok()
        .flatten()
        .map_or(0.0, |t| now_ms().saturating_sub(t) as f64 / 1000.0);
    metrics.oldest_pending_age.set(age);
}
