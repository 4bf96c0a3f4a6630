//! What the consumer reports about its subscriptions (`GET /v1/consumer`).

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::outbox::now_ms;

/// The state of one queue's subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionState {
    /// No broker connection yet, or it was lost.
    Disconnected,
    /// Opening the channel and subscribing.
    Subscribing,
    /// Receiving deliveries.
    Consuming,
    /// The broker refused the subscription or ended it (for example the
    /// queue does not exist); it is retried.
    Failing,
    /// Stopped for shutdown.
    Stopped,
}

/// One queue's subscription, as `GET /v1/consumer` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    /// The work queue.
    pub queue: String,
    pub state: SubscriptionState,
    /// Since when the current subscription is up, ms since the Unix epoch.
    pub consuming_since_ms: Option<u64>,
    /// The last error of the subscription, in the broker's words.
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<u64>,
    /// Subscriptions established so far (1 + re-subscriptions).
    pub subscriptions: u64,
}

/// The whole consumer, as `GET /v1/consumer` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerSnapshot {
    /// Whether the consumer's broker connection is up.
    pub connected: bool,
    /// The broker address connected to (or last connected to), without its
    /// password: with several addresses, the node the consumer is on.
    pub broker: Option<String>,
    /// The last connection error.
    pub last_error: Option<String>,
    /// Deliveries being handled right now.
    pub in_flight: u64,
    pub queues: Vec<QueueStatus>,
}

/// Shared, cheaply cloned handle on the consumer's state.
#[derive(Clone)]
pub struct ConsumerState {
    inner: Arc<Mutex<ConsumerSnapshot>>,
}

impl ConsumerState {
    /// The state of a consumer of `queues`, not yet connected.
    pub fn new<'a>(queues: impl IntoIterator<Item = &'a str>) -> Self {
        let queues = queues
            .into_iter()
            .map(|q| QueueStatus {
                queue: q.to_owned(),
                state: SubscriptionState::Disconnected,
                consuming_since_ms: None,
                last_error: None,
                last_error_at_ms: None,
                subscriptions: 0,
            })
            .collect();
        Self {
            inner: Arc::new(Mutex::new(ConsumerSnapshot {
                connected: false,
                broker: None,
                last_error: None,
                in_flight: 0,
                queues,
            })),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> ConsumerSnapshot {
        self.inner.lock().unwrap().clone()
    }

    fn queue(&self, queue: &str, f: impl FnOnce(&mut QueueStatus)) {
        let mut s = self.inner.lock().unwrap();
        if let Some(q) = s.queues.iter_mut().find(|q| q.queue == queue) {
            f(q);
        }
    }

    pub(crate) fn connected(&self, url: &str) {
        let mut s = self.inner.lock().unwrap();
        s.connected = true;
        s.broker = Some(url.to_owned());
    }

    pub(crate) fn disconnected(&self, error: Option<String>) {
        let mut s = self.inner.lock().unwrap();
        s.connected = false;
        if error.is_some() {
            s.last_error = error;
        }
        for q in &mut s.queues {
            if q.state != SubscriptionState::Stopped {
                q.state = SubscriptionState::Disconnected;
                q.consuming_since_ms = None;
            }
        }
    }

    pub(crate) fn subscribing(&self, queue: &str) {
        self.queue(queue, |q| q.state = SubscriptionState::Subscribing);
    }

    pub(crate) fn consuming(&self, queue: &str) {
        self.queue(queue, |q| {
            q.state = SubscriptionState::Consuming;
            q.consuming_since_ms = Some(now_ms());
            q.subscriptions += 1;
        });
    }

    pub(crate) fn failing(&self, queue: &str, error: String) {
        self.queue(queue, |q| {
            q.state = SubscriptionState::Failing;
            q.consuming_since_ms = None;
            q.last_error = Some(error);
            q.last_error_at_ms = Some(now_ms());
        });
    }

    pub(crate) fn stopped(&self) {
        let mut s = self.inner.lock().unwrap();
        s.connected = false;
        for q in &mut s.queues {
            q.state = SubscriptionState::Stopped;
            q.consuming_since_ms = None;
        }
    }

    pub(crate) fn add_in_flight(&self, delta: i64) {
        let mut s = self.inner.lock().unwrap();
        s.in_flight = s.in_flight.saturating_add_signed(delta);
    }
}
