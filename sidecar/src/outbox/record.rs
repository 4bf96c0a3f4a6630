//! The on-disk framing of outbox entries, documented in one place.
//!
//! A pending entry (area `Pending`, key = sequence number):
//!
//! ```text
//! u8   version (= 2; version 1, still read, had a u16 header count)
//! u64  enqueued_at, milliseconds since the Unix epoch
//! u8   len + message_id      (UTF-8, ≤ 255 bytes: an AMQP short string)
//! u8   len + exchange        ("" is the default exchange)
//! u8   len + routing_key
//! u8   len + content_type    (len 0 = none)
//! u32  header count, then per header: u8 len + name, u32 len + value (UTF-8)
//! u32  len + body
//! ```
//!
//! [`Message::check`] refuses what these length fields cannot hold (and
//! records over [`MAX_RECORD_BYTES`]), so nothing is ever stored wrapped.
//!
//! A dead entry (area `Dead`) wraps the pending bytes unchanged, so a dead
//! message can be replayed exactly as it was accepted:
//!
//! ```text
//! u8   version (= 1)
//! u64  dead_at, milliseconds since the Unix epoch
//! u32  attempts
//! u16  len + reason (UTF-8, the broker's own text where there was one)
//! u32  len + the pending entry's bytes
//! ```
//!
//! All integers are big-endian. The engines frame and checksum these
//! records themselves (the segment log's framing is in
//! `docs/outbox-format.md`; sled checksums its own log).

use bytes::Bytes;

/// Version written for pending entries.
const VERSION: u8 = 2;
/// The first version, with a `u16` header count.
const VERSION_U16_HEADERS: u8 = 1;
/// Version of dead entries.
const DEAD_VERSION: u8 = 1;
/// Largest encoded record the outbox stores.
pub const MAX_RECORD_BYTES: usize = 256 << 20;

/// A message as the app handed it to the sidecar.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Idempotency key; becomes the AMQP `message_id`.
    pub message_id: String,
    /// Target exchange; `""` is the default exchange.
    pub exchange: String,
    /// AMQP routing key.
    pub routing_key: String,
    /// AMQP `content_type`, if the app sent one.
    pub content_type: Option<String>,
    /// Application headers, forwarded as AMQP string headers.
    pub headers: Vec<(String, String)>,
    /// The payload, forwarded unchanged.
    pub body: Bytes,
    /// When the outbox accepted it, ms since the Unix epoch.
    pub enqueued_at_ms: u64,
}

/// A message the forwarder moved aside, with why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadEntry {
    /// When it was moved aside, ms since the Unix epoch.
    pub dead_at_ms: u64,
    /// How many forwarding attempts failed.
    pub attempts: u32,
    /// The last failure, in the broker's words where it gave any.
    pub reason: String,
    /// The pending entry as it was stored.
    pub raw: Vec<u8>,
}

/// A message that cannot be stored as it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("message cannot be stored: {0}")]
pub struct EncodeError(String);

/// A record that cannot be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("corrupt outbox record: {0}")]
pub struct DecodeError(&'static str);

fn put_str8(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= u8::MAX as usize);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

impl Message {
    /// The encoded size, used for the outbox's byte accounting.
    pub fn encoded_len(&self) -> usize {
        1 + 8
            + 1
            + self.message_id.len()
            + 1
            + self.exchange.len()
            + 1
            + self.routing_key.len()
            + 1
            + self.content_type.as_ref().map_or(0, |c| c.len())
            + 4
            + self
                .headers
                .iter()
                .map(|(k, v)| 1 + k.len() + 4 + v.len())
                .sum::<usize>()
            + 4
            + self.body.len()
    }

    /// Checks that every field fits its length prefix, so that
    /// [`Message::encode`] cannot wrap a length or a count.
    pub fn check(&self) -> Result<(), EncodeError> {
        for (what, v) in [
            ("message id", self.message_id.as_str()),
            ("exchange", &self.exchange),
            ("routing key", &self.routing_key),
            ("content type", self.content_type.as_deref().unwrap_or("")),
        ] {
            if v.len() > u8::MAX as usize {
                return Err(EncodeError(format!(
                    "{what} is {} bytes, at most 255 fit",
                    v.len()
                )));
            }
        }
        if u32::try_from(self.headers.len()).is_err() {
            return Err(EncodeError(format!(
                "{} headers, at most {} fit",
                self.headers.len(),
                u32::MAX
            )));
        }
        for (k, v) in &self.headers {
            if k.len() > u8::MAX as usize {
                return Err(EncodeError(format!(
                    "header name of {} bytes, at most 255 fit",
                    k.len()
                )));
            }
            if u32::try_from(v.len()).is_err() {
                return Err(EncodeError(format!("header {k} is too long")));
            }
        }
        let len = self.encoded_len();
        if len > MAX_RECORD_BYTES {
            return Err(EncodeError(format!(
                "encoded message of {len} bytes exceeds the outbox's limit of {MAX_RECORD_BYTES}"
            )));
        }
        Ok(())
    }

    /// Encodes the message. [`Message::check`] must have passed (the outbox
    /// checks before it appends).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(VERSION);
        out.extend_from_slice(&self.enqueued_at_ms.to_be_bytes());
        put_str8(&mut out, &self.message_id);
        put_str8(&mut out, &self.exchange);
        put_str8(&mut out, &self.routing_key);
        put_str8(&mut out, self.content_type.as_deref().unwrap_or(""));
        out.extend_from_slice(&(self.headers.len() as u32).to_be_bytes());
        for (k, v) in &self.headers {
            put_str8(&mut out, k);
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes a pending entry.
    pub fn decode(raw: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_with(raw, Bytes::copy_from_slice)
    }

    /// Decodes a pending entry held in `raw`, sharing its body with `raw`
    /// instead of copying it.
    pub fn decode_shared(raw: &Bytes) -> Result<Self, DecodeError> {
        Self::decode_with(raw, |body| raw.slice_ref(body))
    }

    fn decode_with(raw: &[u8], body: impl FnOnce(&[u8]) -> Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader(raw);
        let version = r.u8()?;
        if version != VERSION && version != VERSION_U16_HEADERS {
            return Err(DecodeError("unknown record version"));
        }
        let enqueued_at_ms = r.u64()?;
        let message_id = r.str8()?;
        let exchange = r.str8()?;
        let routing_key = r.str8()?;
        let content_type = Some(r.str8()?).filter(|c| !c.is_empty());
        let count = match version {
            VERSION_U16_HEADERS => r.u16()? as usize,
            _ => r.u32()? as usize,
        };
        // Each header takes at least five bytes: a count larger than what
        // is left is corrupt, not a reason to allocate.
        if count > r.0.len() / 5 {
            return Err(DecodeError("header count exceeds the record"));
        }
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            let k = r.str8()?;
            let len = r.u32()? as usize;
            let v = r.utf8(len)?;
            headers.push((k, v));
        }
        let len = r.u32()? as usize;
        let body = body(r.take(len)?);
        if !r.0.is_empty() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(Message {
            message_id,
            exchange,
            routing_key,
            content_type,
            headers,
            body,
            enqueued_at_ms,
        })
    }

    /// Reads only the enqueue time of an encoded pending entry.
    pub fn peek_enqueued_at(raw: &[u8]) -> Option<u64> {
        let mut r = Reader(raw);
        let v = r.u8().ok()?;
        (v == VERSION || v == VERSION_U16_HEADERS).then_some(())?;
        r.u64().ok()
    }
}

impl DeadEntry {
    /// Encodes the dead entry.
    pub fn encode(&self) -> Vec<u8> {
        let reason = truncate_utf8(&self.reason, u16::MAX as usize);
        let mut out = Vec::with_capacity(1 + 8 + 4 + 2 + reason.len() + 4 + self.raw.len());
        out.push(DEAD_VERSION);
        out.extend_from_slice(&self.dead_at_ms.to_be_bytes());
        out.extend_from_slice(&self.attempts.to_be_bytes());
        out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(&(self.raw.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.raw);
        out
    }

    /// Decodes a dead entry.
    pub fn decode(raw: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(raw);
        if r.u8()? != DEAD_VERSION {
            return Err(DecodeError("unknown record version"));
        }
        let dead_at_ms = r.u64()?;
        let attempts = r.u32()?;
        let len = r.u16()? as usize;
        let reason = r.utf8(len)?;
        let len = r.u32()? as usize;
        let raw = r.take(len)?.to_vec();
        Ok(DeadEntry {
            dead_at_ms,
            attempts,
            reason,
            raw,
        })
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated record"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn utf8(&mut self, n: usize) -> Result<String, DecodeError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError("invalid UTF-8"))
    }
    fn str8(&mut self) -> Result<String, DecodeError> {
        let n = self.u8()? as usize;
        self.utf8(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message {
            message_id: "01931f7e-id".into(),
            exchange: "orders".into(),
            routing_key: "created.eu".into(),
            content_type: Some("application/json".into()),
            headers: vec![
                ("tenant".into(), "acme".into()),
                ("trace".into(), "é✓".into()),
            ],
            body: Bytes::from_static(b"{\"id\":1}\x00\xff"),
            enqueued_at_ms: 1_763_700_000_123,
        }
    }

    #[test]
    fn message_round_trips() {
        let m = sample();
        let raw = m.encode();
        assert_eq!(raw.len(), m.encoded_len());
        assert_eq!(Message::decode(&raw).unwrap(), m);
        assert_eq!(Message::peek_enqueued_at(&raw), Some(m.enqueued_at_ms));
        let bare = Message {
            content_type: None,
            headers: vec![],
            body: Bytes::new(),
            exchange: String::new(),
            ..m
        };
        assert_eq!(Message::decode(&bare.encode()).unwrap(), bare);
    }

    #[test]
    fn dead_entry_round_trips_and_keeps_the_message() {
        let raw = sample().encode();
        let dead = DeadEntry {
            dead_at_ms: 5,
            attempts: 9,
            reason: "NOT_FOUND - no exchange 'x' in vhost '/'".into(),
            raw: raw.clone(),
        };
        let back = DeadEntry::decode(&dead.encode()).unwrap();
        assert_eq!(back, dead);
        assert_eq!(Message::decode(&back.raw).unwrap(), sample());
    }

    #[test]
    fn every_truncation_is_detected() {
        let raw = sample().encode();
        for cut in 0..raw.len() {
            assert!(
                Message::decode(&raw[..cut]).is_err(),
                "cut at {cut} decoded"
            );
        }
        let mut extra = raw.clone();
        extra.push(0);
        assert!(Message::decode(&extra).is_err());
        let mut version = raw;
        version[0] = 9;
        assert!(Message::decode(&version).is_err());
    }

    #[test]
    fn header_counts_beyond_u16_round_trip() {
        let m = Message {
            headers: (0..70_000)
                .map(|i| (format!("h{i}"), String::new()))
                .collect(),
            ..sample()
        };
        m.check().unwrap();
        let raw = m.encode();
        assert_eq!(raw.len(), m.encoded_len());
        assert_eq!(Message::decode(&raw).unwrap().headers.len(), 70_000);
    }

    #[test]
    fn version_1_records_still_decode() {
        let m = sample();
        let v2 = m.encode();
        // Rewrite as version 1: a u16 header count.
        let at = 1
            + 8
            + [&m.message_id, &m.exchange, &m.routing_key]
                .iter()
                .map(|s| 1 + s.len())
                .sum::<usize>()
            + 1
            + m.content_type.as_ref().unwrap().len();
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&v2[1..at]);
        v1.extend_from_slice(&(m.headers.len() as u16).to_be_bytes());
        v1.extend_from_slice(&v2[at + 4..]);
        assert_eq!(Message::decode(&v1).unwrap(), m);
    }

    #[test]
    fn what_cannot_be_stored_is_refused() {
        let long = "x".repeat(256);
        for m in [
            Message {
                message_id: long.clone(),
                ..sample()
            },
            Message {
                headers: vec![(long.clone(), "v".into())],
                ..sample()
            },
            Message {
                body: Bytes::from(vec![0u8; MAX_RECORD_BYTES]),
                ..sample()
            },
        ] {
            assert!(m.check().is_err());
        }
    }

    #[test]
    fn long_reasons_are_cut_on_char_boundaries() {
        let s = "é".repeat(40_000);
        let cut = truncate_utf8(&s, u16::MAX as usize);
        assert!(cut.len() <= u16::MAX as usize);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn shared_decoding_borrows_the_body() {
        let m = sample();
        let raw = Bytes::from(m.encode());
        let back = Message::decode_shared(&raw).unwrap();
        assert_eq!(back, m);
        assert!(raw.as_ptr_range().contains(&back.body.as_ptr()));
        assert!(Message::decode_shared(&raw.slice(..raw.len() - 1)).is_err());
    }
}
