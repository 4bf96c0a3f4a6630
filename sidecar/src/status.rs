//! What the sidecar knows about its broker connection, shared between the
//! forwarder (which writes it) and the HTTP and metrics endpoints (which
//! report it).

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::metrics::Metrics;
use crate::outbox::now_ms;

/// The forwarder's connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    /// Trying to (re)connect.
    Connecting,
    /// Connected and publishing.
    Connected,
    /// Connected, but the broker blocks publishing (resource alarm).
    Blocked,
    /// Not connected; waiting before the next attempt.
    Disconnected,
    /// Stopped for shutdown.
    Stopped,
}

/// A snapshot of the broker connection, as `GET /v1/outbox` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerSnapshot {
    /// Current state.
    pub state: ConnState,
    /// The broker address in use (or last tried), without its password:
    /// with several addresses, the node the sidecar is connected to.
    pub url: String,
    /// Every configured broker address, without passwords, in the order
    /// they are tried.
    pub addresses: Vec<String>,
    /// The last connection or publishing error, in the broker's or the
    /// network's own words.
    pub last_error: Option<String>,
    /// When `last_error` happened, ms since the Unix epoch.
    pub last_error_at_ms: Option<u64>,
    /// Since when the current connection is up, ms since the Unix epoch.
    pub connected_since_ms: Option<u64>,
    /// Why the broker blocks publishing, while it does.
    pub blocked_reason: Option<String>,
}

/// Shared, cheaply cloned handle on the connection state.
#[derive(Clone)]
pub struct BrokerStatus {
    inner: Arc<Mutex<BrokerSnapshot>>,
    metrics: Arc<Metrics>,
}

impl BrokerStatus {
    /// A fresh status for the broker addresses `redacted_urls` (without
    /// passwords), in state `Connecting`.
    pub fn new(redacted_urls: Vec<String>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(BrokerSnapshot {
                state: ConnState::Connecting,
                url: redacted_urls.first().cloned().unwrap_or_default(),
                addresses: redacted_urls,
                last_error: None,
                last_error_at_ms: None,
                connected_since_ms: None,
                blocked_reason: None,
            })),
            metrics,
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> BrokerSnapshot {
        self.inner.lock().unwrap().clone()
    }

    fn update(&self, f: impl FnOnce(&mut BrokerSnapshot)) {
        let mut s = self.inner.lock().unwrap();
        f(&mut s);
        self.metrics
            .broker_connected
            .set(matches!(s.state, ConnState::Connected | ConnState::Blocked) as i64);
        self.metrics
            .broker_blocked
            .set((s.state == ConnState::Blocked) as i64);
    }

    pub(crate) fn connecting(&self) {
        self.update(|s| {
            s.state = ConnState::Connecting;
            s.connected_since_ms = None;
            s.blocked_reason = None;
        });
    }

    /// Connected to `url` (without its password).
    pub(crate) fn connected(&self, url: &str) {
        self.update(|s| {
            s.state = ConnState::Connected;
            s.url = url.to_owned();
            s.connected_since_ms = Some(now_ms());
            s.blocked_reason = None;
        });
    }

    pub(crate) fn blocked(&self, reason: String) {
        self.update(|s| {
            s.state = ConnState::Blocked;
            s.blocked_reason = Some(reason);
        });
    }

    pub(crate) fn unblocked(&self) {
        self.update(|s| {
            s.state = ConnState::Connected;
            s.blocked_reason = None;
        });
    }

    /// Records an error without changing the state (a refused message).
    pub(crate) fn error(&self, error: String) {
        self.update(|s| {
            s.last_error = Some(error);
            s.last_error_at_ms = Some(now_ms());
        });
    }

    pub(crate) fn disconnected(&self, error: String) {
        self.update(|s| {
            s.state = ConnState::Disconnected;
            s.connected_since_ms = None;
            s.blocked_reason = None;
            s.last_error = Some(error);
            s.last_error_at_ms = Some(now_ms());
        });
    }

    pub(crate) fn stopped(&self) {
        self.update(|s| {
            s.state = ConnState::Stopped;
            s.connected_since_ms = None;
        });
    }
}
