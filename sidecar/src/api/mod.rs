//! The sidecar's HTTP surface: the app-facing API (on localhost) and the
//! admin endpoints.
//!
//! Every refusal is a JSON body `{"error": <code>, "message": <text>}` with a
//! status that tells the app what to do: 400 fix the request, 413 make it
//! smaller, 507 wait `Retry-After` seconds, 503 go to another instance or
//! retry later, 500 the outbox's storage failed. Nothing is stored unless
//! the answer is 202.
//!
//! Layout:
//! - this module: the shared state, the error body, the two routers;
//! - [`app`]: what the app calls to hand over messages (single publish,
//!   batch);
//! - [`admin`]: what operators and probes read or do (outbox report, dead
//!   letters and their replay, consumer and relay status, readiness,
//!   metrics).

mod admin;
mod app;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;

use crate::consumer::ConsumerState;
use crate::metrics::{Metrics, RejectReason};
use crate::outbox::{Limits, Outbox};
use crate::relay::RelayStatus;
use crate::status::BrokerStatus;

pub use admin::OutboxReport;

/// The name the API uses for AMQP's default (nameless) exchange.
pub const DEFAULT_EXCHANGE_ALIAS: &str = "amq.default";

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
        .route(
            "/v1/publish/{exchange}/{routing_key}",
            post(app::publish_one),
        )
        // An empty routing key leaves an empty last segment.
        .route("/v1/publish/{exchange}/", post(app::publish_one_empty_key))
        .route("/v1/batch", post(app::publish_batch))
        // The admin reads and replays are served on the app port too.
        .route("/v1/outbox", get(admin::outbox_status))
        .route("/v1/outbox/dead", get(admin::dead_list))
        .route("/v1/outbox/dead/retry", post(admin::dead_retry_matching))
        .route("/v1/outbox/dead/{seq}/retry", post(admin::dead_retry))
        .route("/v1/consumer", get(admin::consumer_status))
        .route("/v1/relay", get(admin::relay_status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Builds the admin router: health, readiness, metrics.
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(admin::metrics))
        .fallback(not_found)
        .with_state(state)
}

/// 404 for every path neither router knows.
async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see the sidecar API reference",
    )
}

/// 405 for a known path with the wrong method.
async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

/// Refuses with 503 once shutdown has started.
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
