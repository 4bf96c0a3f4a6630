//! The on-disk framing of outbox entries, documented in one place.
//!
//! A pending entry (area `Pending`, key = sequence number):
//!
//! ```text
//! u8   version (= 1)
//! u64  enqueued_at, milliseconds since the Unix epoch
//! u8   len + message_id      (UTF-8, ≤ 255 bytes: an AMQP short string)
//! u8   len + exchange        ("" is the default exchange)
//! u8   len + routing_key
//! u8   len + content_type    (len 0 = none)
//! u16  header count, then per header: u8 len + name, u32 len + value (UTF-8)
//! u32  len + body
//! ```
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
//! All integers are big-endian. sled checksums its own log, so the framing
//! carries no checksum of its own.

use bytes::Bytes;

const VERSION: u8 = 1;

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
            + 2
            + self
                .headers
                .iter()
                .map(|(k, v)| 1 + k.len() + 4 + v.len())
                .sum::<usize>()
            + 4
            + self.body.len()
    }

    /// Encodes the message. Field lengths must already be validated (the
    /// HTTP layer rejects anything longer than its length prefix allows).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(VERSION);
        out.extend_from_slice(&self.enqueued_at_ms.to_be_bytes());
        put_str8(&mut out, &self.message_id);
        put_str8(&mut out, &self.exchange);
        put_str8(&mut out, &self.routing_key);
        put_str8(&mut out, self.content_type.as_deref().unwrap_or(""));
        out.extend_from_slice(&(self.headers.len() as u16).to_be_bytes());
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
        if r.u8()? != VERSION {
            return Err(DecodeError("unknown record version"));
        }
        let enqueued_at_ms = r.u64()?;
        let message_id = r.str8()?;
        let exchange = r.str8()?;
        let routing_key = r.str8()?;
        let content_type = Some(r.str8()?).filter(|c| !c.is_empty());
        let count = r.u16()? as usize;
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
        (r.u8().ok()? == VERSION).then_some(())?;
        r.u64().ok()
    }
}

impl DeadEntry {
    /// Encodes the dead entry.
    pub fn encode(&self) -> Vec<u8> {
        let reason = truncate_utf8(&self.reason, u16::MAX as usize);
        let mut out = Vec::with_capacity(1 + 8 + 4 + 2 + reason.len() + 4 + self.raw.len());
        out.push(VERSION);
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
        if r.u8()? != VERSION {
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
