//! The app-facing HTTP API (on localhost) and the admin endpoints.
//!
//! Every refusal is a JSON body `{"error": <code>, "message": <text>}` with a
//! status that tells the app what to do: 400 fix the request, 413 make it
//! smaller, 507 wait `Retry-After` seconds, 503 go to another instance or
//! retry later, 500 the outbox's storage failed. Nothing is stored unless
//! the answer is 202.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::consumer::{ConsumerSnapshot, ConsumerState};
use crate::metrics::{AreaLabel, AreaLabels, Metrics, RejectReason};
use crate::outbox::{Durability, Limits, Message, Outbox, OutboxError, now_ms};
use crate::relay::RelayStatus;
use crate::status::{BrokerSnapshot, BrokerStatus, ConnState};

/// The name the API uses for AMQP's default (nameless) exchange.
pub const DEFAULT_EXCHANGE_ALIAS: &str = "amq.default";
const MESSAGE_ID_HEADER: &str = "x-warren-message-id";
const HEADER_PREFIX: &str = "x-warren-header-";
/// AMQP short strings (exchange, routing key, message id, header names).
const SHORT_STRING_MAX: usize = 255;

/// Request size limits.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest single message body.
    pub max_message_bytes: usize,
    /// Largest batch request body.
    pub max_batch_bytes: usize,
    /// Most messages per batch.
    pub max_batch_messages: usize,
}

/// State shared by all handlers.
pub struct AppState {
    /// The outbox publishes go into.
    pub outbox: Arc<Outbox>,
    /// The forwarder's view of the broker.
    pub status: BrokerStatus,
    /// Exported metrics.
    pub metrics: Arc<Metrics>,
    /// Cleared when shutdown starts: publishes are answered 503 from then on.
    pub accepting: AtomicBool,
    /// Request size limits.
    pub limits: RequestLimits,
    /// Outbox limits, reported by `GET /v1/outbox`.
    pub outbox_limits: Limits,
    /// The consumer's subscriptions (no queues when none are configured).
    pub consumer: ConsumerState,
    /// The transactional outbox relay, when configured.
    pub relay: Option<RelayStatus>,
}

/// A refusal, rendered as a JSON error body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
    index: Option<usize>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            index: None,
        }
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    fn reason(&self) -> RejectReason {
        match self.status {
            StatusCode::PAYLOAD_TOO_LARGE => RejectReason::TooLarge,
            StatusCode::INSUFFICIENT_STORAGE => RejectReason::OutboxFull,
            StatusCode::SERVICE_UNAVAILABLE => RejectReason::ShuttingDown,
            StatusCode::INTERNAL_SERVER_ERROR => RejectReason::StorageFailed,
            _ => RejectReason::Invalid,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let Some(i) = self.index {
            body["index"] = json!(i);
        }
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Builds the app-facing router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/publish/{exchange}/{routing_key}", post(publish_one))
        // An empty routing key leaves an empty last segment.
        .route("/v1/publish/{exchange}/", post(publish_one_empty_key))
        .route("/v1/batch", post(publish_batch))
        .route("/v1/outbox", get(outbox_status))
        .route("/v1/outbox/dead", get(dead_list))
        .route("/v1/outbox/dead/retry", post(dead_retry_matching))
        .route("/v1/outbox/dead/{seq}/retry", post(dead_retry))
        .route("/v1/consumer", get(consumer_status))
        .route("/v1/relay", get(relay_status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Builds the admin router: health, readiness, metrics.
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see the sidecar API reference",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

fn check_accepting(state: &AppState) -> Result<(), ApiError> {
    if state.accepting.load(Ordering::Acquire) {
        Ok(())
    } else {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the sidecar is shutting down and accepts no new messages",
        );
        e.retry_after = Some(1);
        Err(e)
    }
}

/// Checks an AMQP short string: at most 255 bytes, no control characters.
fn short_string(what: &str, value: &str, allow_empty: bool) -> Result<(), ApiError> {
    if value.is_empty() && !allow_empty {
        return Err(ApiError::invalid(format!("{what} must not be empty")));
    }
    if value.len() > SHORT_STRING_MAX {
        return Err(ApiError::invalid(format!(
            "{what} is {} bytes; AMQP allows at most {SHORT_STRING_MAX}",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    Ok(())
}

fn header_value(what: &str, v: &str) -> Result<(), ApiError> {
    if v.chars().any(|c| c.is_control() && c != '\t') {
        return Err(ApiError::invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    Ok(())
}

/// Maps the API's exchange name to AMQP's.
fn amqp_exchange(name: &str) -> Result<String, ApiError> {
    short_string("exchange", name, false)?;
    Ok(if name == DEFAULT_EXCHANGE_ALIAS {
        String::new()
    } else {
        name.to_owned()
    })
}

fn message_id(given: Option<String>) -> Result<String, ApiError> {
    match given {
        Some(id) => {
            short_string("message id", &id, false)?;
            Ok(id)
        }
        None => Ok(uuid::Uuid::now_v7().to_string()),
    }
}

/// Reads a request body up to `limit` bytes, answering 413 beyond it.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body exceeds the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        if inner.is::<http_body_util::LengthLimitError>() {
            too_large()
        } else {
            ApiError::invalid(format!("cannot read request body: {inner}"))
        }
    })
}

/// What the request headers of a single publish say about the message.
struct PublishHeaders {
    id: Option<String>,
    content_type: Option<String>,
    headers: Vec<(String, String)>,
}

/// Interprets the request headers of a single publish.
fn message_from_headers(headers: &HeaderMap) -> Result<PublishHeaders, ApiError> {
    let mut id = None;
    let mut content_type = None;
    let mut amqp_headers = Vec::new();
    for (name, value) in headers {
        let name = name.as_str();
        let text = || {
            std::str::from_utf8(value.as_bytes())
                .map(str::to_owned)
                .map_err(|_| ApiError::invalid(format!("header {name} is not valid UTF-8")))
        };
        if name == header::CONTENT_TYPE.as_str() {
            let v = text()?;
            short_string("Content-Type", &v, false)?;
            content_type = Some(v);
        } else if name == MESSAGE_ID_HEADER {
            id = Some(text()?);
        } else if let Some(h) = name.strip_prefix(HEADER_PREFIX) {
            short_string("header name", h, false)?;
            let v = text()?;
            header_value(&format!("header {h}"), &v)?;
            amqp_headers.push((h.to_owned(), v));
        } else if name.starts_with("x-warren-") {
            return Err(ApiError::invalid(format!(
                "unknown header {name}; use X-Warren-Message-Id or X-Warren-Header-<name>"
            )));
        }
    }
    Ok(PublishHeaders {
        id,
        content_type,
        headers: amqp_headers,
    })
}

#[derive(Serialize)]
struct Accepted {
    id: String,
    seq: u64,
}

async fn publish_one(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let (exchange, routing_key) = path
        .map_err(|e| ApiError::invalid(format!("malformed path: {e}")))?
        .0;
    publish(&state, exchange, routing_key, req).await
}

async fn publish_one_empty_key(
    State(state): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let exchange = path
        .map_err(|e| ApiError::invalid(format!("malformed path: {e}")))?
        .0;
    publish(&state, exchange, String::new(), req).await
}

async fn publish(
    state: &AppState,
    exchange: String,
    routing_key: String,
    req: Request,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let result = async {
        check_accepting(state)?;
        let exchange = amqp_exchange(&exchange)?;
        short_string("routing key", &routing_key, true)?;
        let (parts, body) = req.into_parts();
        let PublishHeaders {
            id,
            content_type,
            headers,
        } = message_from_headers(&parts.headers)?;
        let message_id = message_id(id)?;
        let body = read_body(body, &parts.headers, state.limits.max_message_bytes).await?;
        let msg = Message {
            message_id,
            exchange,
            routing_key,
            content_type,
            headers,
            body,
            enqueued_at_ms: now_ms(),
        };
        let id = msg.message_id.clone();
        let seqs = append(state, vec![msg]).await?;
        Ok((StatusCode::ACCEPTED, Json(Accepted { id, seq: seqs[0] })))
    }
    .await;
    count(state, &result, 1);
    result
}

fn count<T>(state: &AppState, result: &Result<T, ApiError>, n: u64) {
    match result {
        Ok(_) => {
            state.metrics.accepted.inc_by(n);
        }
        Err(e) => state.metrics.reject(e.reason()),
    }
}

async fn append(state: &AppState, messages: Vec<Message>) -> Result<Vec<u64>, ApiError> {
    state.outbox.append(messages).await.map_err(|e| match e {
        OutboxError::Full { .. } => {
            let connected = matches!(state.status.snapshot().state, ConnState::Connected);
            let mut err = ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "outbox_full",
                e.to_string(),
            );
            err.retry_after = Some(if connected { 1 } else { 5 });
            err
        }
        OutboxError::Invalid(_) => ApiError::invalid(e.to_string()),
        OutboxError::Poisoned(_) | OutboxError::Store(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "outbox_failed",
            e.to_string(),
        ),
    })
}

/// One message of a batch request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchMessage {
    exchange: String,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_base64: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    message_id: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    messages: Vec<BatchMessage>,
}

#[derive(Serialize)]
struct BatchAccepted {
    results: Vec<Accepted>,
}

impl BatchMessage {
    fn into_message(self, now: u64) -> Result<Message, ApiError> {
        let exchange = amqp_exchange(&self.exchange)?;
        short_string("routing_key", &self.routing_key, true)?;
        let body = match (self.body, self.body_base64) {
            (Some(text), None) => Bytes::from(text),
            (None, Some(b64)) => Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|e| {
                        ApiError::invalid(format!("body_base64 is not valid base64: {e}"))
                    })?,
            ),
            (None, None) => Bytes::new(),
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "give either body or body_base64, not both",
                ));
            }
        };
        if let Some(ct) = &self.content_type {
            short_string("content_type", ct, false)?;
        }
        let mut headers = Vec::with_capacity(self.headers.len());
        for (k, v) in self.headers {
            short_string("header name", &k, false)?;
            header_value(&format!("header {k}"), &v)?;
            headers.push((k, v));
        }
        Ok(Message {
            message_id: message_id(self.message_id)?,
            exchange,
            routing_key: self.routing_key,
            content_type: self.content_type,
            headers,
            body,
            enqueued_at_ms: now,
        })
    }
}

async fn publish_batch(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<(StatusCode, Json<BatchAccepted>), ApiError> {
    let mut n = 1;
    let result = async {
        check_accepting(&state)?;
        let (parts, body) = req.into_parts();
        let raw = read_body(body, &parts.headers, state.limits.max_batch_bytes).await?;
        let batch: BatchRequest = serde_json::from_slice(&raw)
            .map_err(|e| ApiError::invalid(format!("malformed batch: {e}")))?;
        if batch.messages.is_empty() {
            return Err(ApiError::invalid("batch holds no messages"));
        }
        if batch.messages.len() > state.limits.max_batch_messages {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "batch holds {} messages; the limit is {}",
                    batch.messages.len(),
                    state.limits.max_batch_messages
                ),
            ));
        }
        n = batch.messages.len() as u64;
        let now = now_ms();
        let mut messages = Vec::with_capacity(batch.messages.len());
        for (i, m) in batch.messages.into_iter().enumerate() {
            let msg = m.into_message(now).map_err(|mut e| {
                e.message = format!("messages[{i}]: {}", e.message);
                e.index = Some(i);
                e
            })?;
            if msg.body.len() > state.limits.max_message_bytes {
                let mut e = ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!(
                        "messages[{i}]: body exceeds the limit of {} bytes",
                        state.limits.max_message_bytes
                    ),
                );
                e.index = Some(i);
                return Err(e);
            }
            messages.push(msg);
        }
        let ids: Vec<String> = messages.iter().map(|m| m.message_id.clone()).collect();
        let seqs = append(&state, messages).await?;
        let results = ids
            .into_iter()
            .zip(seqs)
            .map(|(id, seq)| Accepted { id, seq })
            .collect();
        Ok((StatusCode::ACCEPTED, Json(BatchAccepted { results })))
    }
    .await;
    count(&state, &result, n);
    result
}

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

async fn consumer_status(State(state): State<Arc<AppState>>) -> Json<ConsumerSnapshot> {
    Json(state.consumer.snapshot())
}

/// The relay's state and counters, or `{"enabled": false}`.
async fn relay_status(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    match &state.relay {
        Some(relay) => {
            let mut v = serde_json::to_value(relay.snapshot()).unwrap_or_default();
            v["enabled"] = json!(true);
            Json(v)
        }
        None => Json(json!({ "enabled": false })),
    }
}

async fn outbox_status(State(state): State<Arc<AppState>>) -> Result<Json<OutboxReport>, ApiError> {
    report(&state).map(Json)
}

#[derive(Debug, Deserialize)]
struct DeadQuery {
    #[serde(default)]
    from: u64,
    #[serde(default = "default_dead_limit")]
    limit: usize,
}

fn default_dead_limit() -> usize {
    100
}

async fn dead_list(
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

async fn dead_retry(
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

async fn dead_retry_matching(
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

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
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

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
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
