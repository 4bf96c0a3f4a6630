//! Turning a row of the app's outbox table into an outbox [`Message`], or
//! the reason it cannot be relayed (which sends it to the dead-letter table).

use bytes::Bytes;

use crate::api::DEFAULT_EXCHANGE_ALIAS;
use crate::outbox::Message;

/// AMQP short strings: exchange, routing key, message id, header names.
const SHORT_STRING_MAX: usize = 255;

/// A row as read by the claim statement, before any checks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawRow {
    /// The row's primary key.
    pub id: i64,
    /// `message_id`; `None` if the column was NULL.
    pub message_id: Option<String>,
    /// `exchange`; empty or `amq.default` is the default exchange.
    pub exchange: Option<String>,
    /// `routing_key`.
    pub routing_key: Option<String>,
    /// `payload`.
    pub payload: Option<Vec<u8>>,
    /// `headers` as JSON text, if any.
    pub headers: Option<String>,
    /// `content_type`, if any.
    pub content_type: Option<String>,
    /// `created_at` in ms since the Unix epoch.
    pub created_at_ms: Option<f64>,
}

/// Why a row cannot become a message. The text is stored in the
/// dead-letter table's `reason` column; it never quotes the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// A required column is NULL.
    #[error("{0} is NULL")]
    Null(&'static str),
    /// A short string over 255 bytes.
    #[error("{what} is {len} bytes; AMQP allows at most {SHORT_STRING_MAX}")]
    TooLong {
        /// Which column.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// Control characters where AMQP short strings cannot carry them.
    #[error("{0} contains control characters")]
    Control(&'static str),
    /// The message id is empty.
    #[error("message_id is empty")]
    EmptyId,
    /// The headers are not valid JSON, or not an object of scalars.
    #[error("headers: {0}")]
    Headers(String),
    /// The payload is larger than the sidecar accepts.
    #[error("payload is {len} bytes; the limit (--max-message-bytes) is {max}")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// The limit.
        max: usize,
    },
}

fn short(what: &'static str, v: &str) -> Result<(), RowError> {
    if v.len() > SHORT_STRING_MAX {
        return Err(RowError::TooLong { what, len: v.len() });
    }
    if v.chars().any(char::is_control) {
        return Err(RowError::Control(what));
    }
    Ok(())
}

/// Parses the `headers` column: a JSON object whose values are strings,
/// numbers or booleans (AMQP headers carry them as strings), or JSON null.
pub fn parse_headers(text: &str) -> Result<Vec<(String, String)>, RowError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| RowError::Headers(format!("invalid JSON: {e}")))?;
    let map = match value {
        serde_json::Value::Null => return Ok(Vec::new()),
        serde_json::Value::Object(map) => map,
        other => {
            return Err(RowError::Headers(format!(
                "must be a JSON object, not {}",
                json_kind(&other)
            )));
        }
    };
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        if k.is_empty() {
            return Err(RowError::Headers("empty header name".into()));
        }
        short("header name", &k)?;
        let v = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            other => {
                return Err(RowError::Headers(format!(
                    "header {k:?} is {}; values must be strings, numbers or booleans",
                    json_kind(&other)
                )));
            }
        };
        if v.chars().any(|c| c.is_control() && c != '\t') {
            return Err(RowError::Headers(format!(
                "header {k:?} contains control characters"
            )));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Checks a row and builds the message the outbox will hold.
pub fn to_message(row: RawRow, max_payload: usize, now_ms: u64) -> Result<Message, RowError> {
    let message_id = row.message_id.ok_or(RowError::Null("message_id"))?;
    if message_id.is_empty() {
        return Err(RowError::EmptyId);
    }
    short("message_id", &message_id)?;
    let exchange = row.exchange.ok_or(RowError::Null("exchange"))?;
    short("exchange", &exchange)?;
    let exchange = if exchange == DEFAULT_EXCHANGE_ALIAS {
        String::new()
    } else {
        exchange
    };
    let routing_key = row.routing_key.ok_or(RowError::Null("routing_key"))?;
    short("routing_key", &routing_key)?;
    let payload = row.payload.ok_or(RowError::Null("payload"))?;
    if payload.len() > max_payload {
        return Err(RowError::TooLarge {
            len: payload.len(),
            max: max_payload,
        });
    }
    let content_type = row.content_type.filter(|c| !c.is_empty());
    if let Some(c) = &content_type {
        short("content_type", c)?;
    }
    let headers = match &row.headers {
        Some(text) => parse_headers(text)?,
        None => Vec::new(),
    };
    if headers.len() > u16::MAX as usize {
        return Err(RowError::Headers("too many headers".into()));
    }
    Ok(Message {
        message_id,
        exchange,
        routing_key,
        content_type,
        headers,
        body: Bytes::from(payload),
        enqueued_at_ms: now_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> RawRow {
        RawRow {
            id: 1,
            message_id: Some("m-1".into()),
            exchange: Some("orders".into()),
            routing_key: Some("created".into()),
            payload: Some(b"{}".to_vec()),
            headers: Some(r#"{"tenant":"a","n":3,"ok":true}"#.into()),
            content_type: Some("application/json".into()),
            created_at_ms: Some(1.0),
        }
    }

    #[test]
    fn a_good_row_becomes_a_message() {
        let m = to_message(row(), 1024, 7).unwrap();
        assert_eq!(m.message_id, "m-1");
        assert_eq!(m.exchange, "orders");
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            m.headers,
            vec![
                ("n".into(), "3".into()),
                ("ok".into(), "true".into()),
                ("tenant".into(), "a".into())
            ]
        );
        assert_eq!(m.enqueued_at_ms, 7);
    }

    #[test]
    fn default_exchange_names() {
        for name in ["", "amq.default"] {
            let m = to_message(
                RawRow {
                    exchange: Some(name.into()),
                    headers: None,
                    ..row()
                },
                1024,
                0,
            )
            .unwrap();
            assert_eq!(m.exchange, "");
        }
    }

    #[test]
    fn poison_rows_say_why() {
        let long = "x".repeat(256);
        let cases: Vec<(RawRow, &str)> = vec![
            (
                RawRow {
                    exchange: Some(long.clone()),
                    ..row()
                },
                "exchange is 256 bytes",
            ),
            (
                RawRow {
                    headers: Some("{not json".into()),
                    ..row()
                },
                "invalid JSON",
            ),
            (
                RawRow {
                    headers: Some("[1]".into()),
                    ..row()
                },
                "must be a JSON object",
            ),
            (
                RawRow {
                    headers: Some(r#"{"a":{"b":1}}"#.into()),
                    ..row()
                },
                "values must be strings",
            ),
            (
                RawRow {
                    message_id: None,
                    ..row()
                },
                "message_id is NULL",
            ),
            (
                RawRow {
                    message_id: Some(String::new()),
                    ..row()
                },
                "message_id is empty",
            ),
            (
                RawRow {
                    payload: Some(vec![0; 2000]),
                    ..row()
                },
                "payload is 2000 bytes",
            ),
        ];
        for (r, want) in cases {
            let e = to_message(r, 1024, 0).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }
}
