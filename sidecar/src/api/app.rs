//! The app API: what the app calls to hand a message to the outbox, one
//! at a time (`POST /v1/publish/{exchange}/{routing_key}`) or in a batch
//! (`POST /v1/batch`). A message is answered 202 only once it is durable.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState, DEFAULT_EXCHANGE_ALIAS, check_accepting, read_body};
use crate::outbox::{Message, OutboxError, now_ms};
use crate::status::ConnState;

const MESSAGE_ID_HEADER: &str = "x-warren-message-id";
const HEADER_PREFIX: &str = "x-warren-header-";
/// AMQP short strings (exchange, routing key, message id, header names).
const SHORT_STRING_MAX: usize = 255;

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
pub(super) struct Accepted {
    id: String,
    seq: u64,
}

pub(super) async fn publish_one(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let (exchange, routing_key) = path
        .map_err(|e| ApiError::invalid(format!("malformed path: {e}")))?
        .0;
    publish(&state, exchange, routing_key, req).await
}

pub(super) async fn publish_one_empty_key(
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
pub(super) struct BatchAccepted {
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

pub(super) async fn publish_batch(
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
