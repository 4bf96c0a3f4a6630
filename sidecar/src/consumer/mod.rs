//! The consuming side: the sidecar consumes the configured queues for the
//! app, delivers each message to it over HTTP and owns the retries.
//!
//! - One connection of its own (separate from the forwarder's, so a publish
//!   block or a publishing channel error does not stop consumption), one
//!   channel per queue with `basic.qos(prefetch)` and manual acks, and one
//!   confirm-mode channel for republishing.
//! - Each delivery is POSTed to the app with a deadline; at most
//!   `app.concurrency` deliveries are at the app at once.
//! - 2xx: ack. Otherwise the queue's retry policy decides ([`plan::decide`]):
//!   a copy goes to the retry exchange (`x-retries` + 1) or to the parking
//!   lot, and the original is acked only after the broker confirmed the
//!   copy. When the copy is not confirmed, the original is handed back with
//!   `basic.nack(requeue)` after a pause, so nothing is lost.
//! - A delivery is never held past the broker's `consumer_timeout`: one
//!   that waited too long for a slot is handed back unprocessed.
//! - Subscriptions come back by themselves: after a lost connection (with
//!   reconnect backoff), a graceful broker shutdown, a channel error or a
//!   cancellation by the broker; a queue that does not exist is reported
//!   (`GET /v1/consumer`, logs) and tried again.
//!
//! The sidecar declares no topology: the work queue, the retry exchange
//! with its delay queues and the parking lot are the operator's.

pub mod app;
pub mod plan;
pub mod state;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection, Event};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren_crds::sidecar_config::{ConsumeQueue, HOLD_MARGIN, SidecarConfig};

use warren_crds::backoff::Backoff;

use crate::broker::{self, BrokerSettings, ConnectError, Connected, Link, describe};
use crate::metrics::{Metrics, Outcome, ParkLabel, ParkLabels, QueueLabels, RetryLabels};
use app::{AppClient, Request};
use plan::{Action, Attempt, Copy, Failure, Original, ParkReason};
pub use state::{ConsumerSnapshot, ConsumerState};

/// Settings of the consumer.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// The broker's addresses, connection settings and the reconnect
    /// backoff (also used between attempts to re-subscribe a queue).
    pub broker: BrokerSettings,
    /// Queues, app endpoint and retry policies; must be valid and non-empty.
    pub config: SidecarConfig,
}

/// What every delivery task needs.
struct Shared {
    metrics: Arc<Metrics>,
    state: ConsumerState,
    app: AppClient,
    /// Deliveries at the app at once.
    slots: Arc<Semaphore>,
    /// Delivery tasks, waited for on shutdown.
    tracker: TaskTracker,
    app_url: String,
    timeout: Duration,
    /// Longest a delivery may wait for a slot before it is handed back.
    max_wait: Duration,
    /// Between attempts to re-subscribe a queue.
    resubscribe: Backoff,
}

/// The consumer task. Create with [`Consumer::new`], drive with
/// [`Consumer::run`].
pub struct Consumer {
    settings: ConsumerSettings,
    shared: Arc<Shared>,
    /// How long deliveries in hand may take to finish when stopping.
    drain: Duration,
}

impl Consumer {
    /// A consumer; `state` is where it reports its subscriptions.
    pub fn new(
        settings: ConsumerSettings,
        metrics: Arc<Metrics>,
        state: ConsumerState,
    ) -> anyhow::Result<Self> {
        settings.config.validate()?;
        let app = settings
            .config
            .app
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the consumer needs app.url"))?;
        let timeout = app.timeout.0;
        let max_wait = settings
            .config
            .consumer_timeout
            .0
            .saturating_sub(timeout * 2 + HOLD_MARGIN);
        let shared = Arc::new(Shared {
            metrics,
            state,
            app: AppClient::new()?,
            slots: Arc::new(Semaphore::new(app.concurrency as usize)),
            tracker: TaskTracker::new(),
            app_url: app.url,
            timeout,
            max_wait,
            resubscribe: settings.broker.reconnect,
        });
        Ok(Self {
            settings,
            shared,
            drain: Duration::ZERO,
        })
    }

    /// Consumes until `stop` is cancelled; then stops taking deliveries,
    /// gives those in hand up to `drain` to finish and closes. Whatever is
    /// not acknowledged by then goes back to the queue.
    pub async fn run(mut self, stop: CancellationToken, drain: Duration) {
        self.drain = drain;
        let broker = self.settings.broker.clone();
        broker::stay_connected(&broker, &mut self, &stop).await;
        self.shared.tracker.close();
        let _ = tokio::time::timeout(drain, self.shared.tracker.wait()).await;
        self.shared.state.stopped();
    }

    /// One connection: a subscription task per queue; ends with `Err` when
    /// the connection fails, `Ok` when stopped.
    async fn consume(
        &self,
        conn: &Arc<Connection>,
        stop: &CancellationToken,
        drain: Duration,
    ) -> Result<(), String> {
        let mut events = std::pin::pin!(conn.events_listener());
        let publisher = Arc::new(Republisher::new(conn.clone()));
        let unsubscribe = CancellationToken::new();
        let _unsubscribe_on_exit = unsubscribe.clone().drop_guard();
        let mut subscriptions = JoinSet::new();
        for queue in &self.settings.config.queues {
            subscriptions.spawn(subscribe_loop(
                self.shared.clone(),
                conn.clone(),
                Arc::new(queue.clone()),
                publisher.clone(),
                unsubscribe.clone(),
            ));
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    // Stop taking deliveries, let those in hand finish on
                    // this connection (their acks need it), then close.
                    unsubscribe.cancel();
                    while subscriptions.join_next().await.is_some() {}
                    self.shared.tracker.close();
                    if tokio::time::timeout(drain, self.shared.tracker.wait()).await.is_err() {
                        tracing::warn!("drain deadline reached; unacknowledged deliveries return to their queues");
                    }
                    return Ok(());
                }
                ev = events.next() => match ev {
                    Some(Event::Error(e)) if !e.is_amqp_soft_error() => return Err(describe(&e)),
                    Some(_) => {}
                    None => return Err("broker connection event stream ended".into()),
                },
            }
        }
    }
}

/// Keeps one queue subscribed for as long as the connection lives.
async fn subscribe_loop(
    shared: Arc<Shared>,
    conn: Arc<Connection>,
    queue: Arc<ConsumeQueue>,
    publisher: Arc<Republisher>,
    stop: CancellationToken,
) {
    let name = queue.name.as_str();
    let labels = QueueLabels {
        queue: name.to_owned(),
    };
    let mut failures: u32 = 0;
    let mut subscribed_before = false;
    while !stop.is_cancelled() && conn.status().connected() {
        shared.state.subscribing(name);
        let error = match subscribe(&conn, &queue).await {
            Ok((channel, consumer)) => {
                failures = 0;
                shared.state.consuming(name);
                if subscribed_before {
                    shared.metrics.resubscriptions.get_or_create(&labels).inc();
                }
                subscribed_before = true;
                shared.metrics.subscribed.get_or_create(&labels).set(1);
                tracing::info!(queue = name, prefetch = queue.prefetch, "consuming");
                let end = consume(&shared, &channel, consumer, &queue, &publisher, &stop).await;
                shared.metrics.subscribed.get_or_create(&labels).set(0);
                match end {
                    None => return,
                    Some(e) => e,
                }
            }
            Err(e) => e,
        };
        if !conn.status().connected() {
            // The session notices and reconnects.
            return;
        }
        tracing::error!(queue = name, %error, "cannot consume queue; trying again");
        shared.state.failing(name, error);
        let delay = broker::delay(&shared.resubscribe, failures);
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Opens a channel on `queue` and subscribes with manual acks.
async fn subscribe(
    conn: &Connection,
    queue: &ConsumeQueue,
) -> Result<(Channel, lapin::Consumer), String> {
    let channel = conn.create_channel().await.map_err(|e| describe(&e))?;
    channel
        .basic_qos(queue.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| describe(&e))?;
    let consumer = channel
        .basic_consume(
            queue.name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| describe(&e))?;
    Ok((channel, consumer))
}

/// Hands deliveries to delivery tasks until the subscription ends (`Some`
/// with the reason) or `stop` (`None`).
async fn consume(
    shared: &Arc<Shared>,
    channel: &Channel,
    mut consumer: lapin::Consumer,
    queue: &Arc<ConsumeQueue>,
    publisher: &Arc<Republisher>,
    stop: &CancellationToken,
) -> Option<String> {
    let labels = QueueLabels {
        queue: queue.name.clone(),
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await;
                return None;
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    shared.metrics.deliveries.get_or_create(&labels).inc();
                    let task = handle(
                        shared.clone(),
                        channel.clone(),
                        queue.clone(),
                        publisher.clone(),
                        delivery,
                        Instant::now(),
                    );
                    shared.tracker.spawn(task);
                }
                Some(Err(e)) => return Some(describe(&e)),
                None => return Some("subscription cancelled by the broker (queue deleted?)".into()),
            },
        }
    }
}

/// Handles one delivery from start to acknowledgement.
async fn handle(
    shared: Arc<Shared>,
    // Keeps the channel open until this delivery is acknowledged.
    _channel: Channel,
    queue: Arc<ConsumeQueue>,
    publisher: Arc<Republisher>,
    delivery: lapin::message::Delivery,
    received: Instant,
) {
    shared.metrics.deliveries_in_flight.inc();
    shared.state.add_in_flight(1);
    let outcome = process(&shared, &queue, &publisher, &delivery, received).await;
    shared.metrics.delivery_outcome(&queue.name, outcome);
    shared.metrics.deliveries_in_flight.dec();
    shared.state.add_in_flight(-1);
}

/// One delivery: waits for a slot at the app, delivers, and acts on the
/// answer as the queue's retry policy decides. A failed delivery's
/// original is acked only after the broker confirmed its copy.
async fn process(
    shared: &Shared,
    queue: &ConsumeQueue,
    publisher: &Republisher,
    delivery: &lapin::message::Delivery,
    received: Instant,
) -> Outcome {
    let name = queue.name.as_str();
    let Some(_slot) = wait_for_slot(shared, name, received).await else {
        return requeue(delivery).await;
    };
    let props = &delivery.properties;
    let message_id = plan::message_id_of(
        props,
        delivery.exchange.as_str(),
        delivery.routing_key.as_str(),
        &delivery.data,
    );
    let retries = plan::retries_of(props);
    let attempt = call_app(shared, queue, delivery, &message_id, retries).await;

    let policy = &queue.retry_policy;
    let action = plan::decide(policy, name, retries, &attempt, rand::random());
    if action == Action::Ack {
        return ack(delivery).await.unwrap_or(Outcome::AckFailed);
    }
    let original = Original {
        properties: props,
        exchange: delivery.exchange.as_str(),
        routing_key: delivery.routing_key.as_str(),
        message_id: &message_id,
    };
    let parking_lot = queue.parking_lot();
    let copy = copy_of_failed(name, &action, original, retries, &attempt, &parking_lot);
    let published = publisher
        .publish(
            copy.exchange,
            copy.routing_key,
            copy.mandatory,
            &delivery.data,
            copy.properties,
            shared.timeout,
        )
        .await;
    match published {
        Ok(()) => {
            count_copy(&shared.metrics, name, &action);
            ack(delivery)
                .await
                .map_or(Outcome::AckFailed, |_| copy.outcome)
        }
        Err(e) => {
            tracing::error!(queue = name, %message_id, exchange = copy.exchange, routing_key = copy.routing_key, error = %e, "republish not confirmed; handing the message back to the broker");
            requeue_after_pause(shared, delivery, received).await
        }
    }
}

/// A slot at the app, or `None` (with a warning) when the delivery waited
/// so long for one that it must go back before the broker's
/// `consumer_timeout`.
async fn wait_for_slot<'a>(
    shared: &'a Shared,
    queue: &str,
    received: Instant,
) -> Option<SemaphorePermit<'a>> {
    tokio::select! {
        slot = shared.slots.acquire() => Some(slot.expect("the slot semaphore is never closed")),
        _ = tokio::time::sleep_until(received + shared.max_wait) => {
            tracing::warn!(queue, "delivery waited too long for a slot; handing it back before the broker's consumer timeout");
            None
        }
    }
}

/// POSTs the delivery to the app (its endpoint for `queue`) and records
/// how long the app took.
async fn call_app(
    shared: &Shared,
    queue: &ConsumeQueue,
    delivery: &lapin::message::Delivery,
    message_id: &str,
    retries: u32,
) -> Attempt {
    let name = queue.name.as_str();
    let props = &delivery.properties;
    let (headers, skipped) = plan::app_headers(
        props,
        name,
        message_id,
        retries,
        delivery.redelivered,
        delivery.exchange.as_str(),
        delivery.routing_key.as_str(),
    );
    if skipped > 0 {
        tracing::debug!(
            queue = name,
            skipped,
            "AMQP headers HTTP cannot carry were left out"
        );
    }
    let started = Instant::now();
    let attempt = shared
        .app
        .deliver(Request {
            url: queue.url.as_deref().unwrap_or(&shared.app_url),
            headers: &headers,
            content_type: props.content_type().as_ref().map(|c| c.as_str()),
            body: Bytes::copy_from_slice(&delivery.data),
            timeout: shared.timeout,
        })
        .await;
    shared
        .metrics
        .app_latency
        .get_or_create(&QueueLabels {
            queue: name.to_owned(),
        })
        .observe(started.elapsed().as_secs_f64());
    attempt
}

/// The copy of a failed delivery to republish, and what the delivery
/// counts as once the copy is confirmed and the original acked.
struct Republish<'a> {
    /// The retry exchange, or the default exchange for the parking lot.
    exchange: &'a str,
    /// The retry routing key, or the parking lot's name.
    routing_key: &'a str,
    /// Whether an unroutable copy comes back as a return.
    mandatory: bool,
    /// The copy's properties, with Warren's retry headers.
    properties: lapin::BasicProperties,
    /// Retried or parked.
    outcome: Outcome,
}

/// The copy `action` (a retry or a park) calls for, logged: to the retry
/// target or to `parking_lot`, carrying the failure of `attempt`.
fn copy_of_failed<'a>(
    queue: &str,
    action: &'a Action,
    original: Original<'_>,
    retries: u32,
    attempt: &Attempt,
    parking_lot: &'a str,
) -> Republish<'a> {
    let failure = Failure::now(retries, attempt);
    let message_id = original.message_id;
    match action {
        Action::Retry {
            retries: next,
            delay,
            target,
        } => {
            tracing::debug!(queue, %message_id, retry = next, ?delay, reason = %attempt.reason(), "delivery failed; retrying later");
            let copy = Copy::Retry {
                retries: *next,
                target,
            };
            Republish {
                exchange: target.exchange.as_str(),
                routing_key: target.routing_key.as_str(),
                mandatory: target.mandatory,
                properties: plan::copy_properties(original, &failure, copy),
                outcome: Outcome::Retried,
            }
        }
        Action::Park(reason) => {
            tracing::warn!(queue, %message_id, retries, reason = %attempt.reason(), why = reason.as_str(), "delivery failed; parking the message");
            let copy = Copy::Park {
                reason: *reason,
                queue,
            };
            Republish {
                exchange: "",
                routing_key: parking_lot,
                mandatory: true,
                properties: plan::copy_properties(original, &failure, copy),
                outcome: Outcome::Parked,
            }
        }
        Action::Ack => unreachable!("an ack needs no copy"),
    }
}

/// Counts a confirmed retry or parked copy.
fn count_copy(metrics: &Metrics, queue: &str, action: &Action) {
    match action {
        Action::Retry { retries: next, .. } => {
            metrics
                .retries
                .get_or_create(&RetryLabels {
                    queue: queue.to_owned(),
                    attempt: *next,
                })
                .inc();
        }
        Action::Park(reason) => {
            metrics
                .parked
                .get_or_create(&ParkLabels {
                    queue: queue.to_owned(),
                    reason: match reason {
                        ParkReason::NonRetryable => ParkLabel::NonRetryable,
                        ParkReason::RetriesExhausted => ParkLabel::RetriesExhausted,
                    },
                })
                .inc();
        }
        Action::Ack => {}
    }
}

/// Hands a delivery whose copy was not confirmed back to the broker after
/// a pause, so a missing retry exchange or parking lot does not turn into
/// a hot redelivery loop; the pause stays within the consumer timeout.
async fn requeue_after_pause(
    shared: &Shared,
    delivery: &lapin::message::Delivery,
    received: Instant,
) -> Outcome {
    let left =
        (received + shared.max_wait + shared.timeout).saturating_duration_since(Instant::now());
    let pause = broker::delay(
        &broker::schedule(Duration::from_secs(1), Duration::from_secs(1)),
        0,
    );
    tokio::time::sleep(pause.min(left)).await;
    requeue(delivery).await
}

async fn ack(delivery: &lapin::message::Delivery) -> Option<Outcome> {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => Some(Outcome::Acked),
        Ok(false) => {
            tracing::debug!("channel closed before the ack; the broker delivers the message again");
            None
        }
        Err(e) => {
            tracing::debug!(error = %describe(&e), "ack failed; the broker delivers the message again");
            None
        }
    }
}

async fn requeue(delivery: &lapin::message::Delivery) -> Outcome {
    let nack = delivery
        .acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await;
    match nack {
        Ok(true) => Outcome::Requeued,
        _ => Outcome::AckFailed,
    }
}

/// Publishes retry and parking copies on confirm-mode channels, each
/// carrying one publish at a time.
///
/// One publish per channel is what makes a `basic.return` unambiguous: the
/// broker sends it just before the confirm of the same message, but a
/// confirm may cover several messages (`multiple`), and lapin attaches the
/// return to whichever of them it settles first. Were concurrent
/// deliveries to share a channel, an unroutable retry copy could be taken
/// as confirmed, its original acked and the message lost.
struct Republisher {
    conn: Arc<Connection>,
    /// Idle channels in confirm mode, ready for the next publish.
    idle: Mutex<Vec<Channel>>,
}

impl Republisher {
    fn new(conn: Arc<Connection>) -> Self {
        Self {
            conn,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// An idle channel, or a new one.
    async fn take_channel(&self) -> Result<Channel, String> {
        loop {
            let idle = self.idle.lock().unwrap().pop();
            match idle {
                Some(ch) if ch.status().connected() => return Ok(ch),
                Some(_) => continue,
                None => break,
            }
        }
        let ch = self.conn.create_channel().await.map_err(|e| describe(&e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| describe(&e))?;
        Ok(ch)
    }

    /// Puts a channel whose publish is settled back for the next one.
    fn give_back(&self, ch: Channel) {
        if ch.status().connected() {
            self.idle.lock().unwrap().push(ch);
        }
    }

    /// Publishes persistently and waits for the broker's confirm; a return
    /// (`mandatory`), a nack, a channel error or no confirm within `timeout`
    /// is an error.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        props: lapin::BasicProperties,
        timeout: Duration,
    ) -> Result<(), String> {
        let attempt = async {
            let channel = self.take_channel().await?;
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory,
                        immediate: false,
                    },
                    body,
                    props,
                )
                .await
                .map_err(|e| describe(&e))?;
            let settled = confirm.await;
            // Only a settled publish frees the channel: one dropped by the
            // timeout below takes its channel with it.
            self.give_back(channel);
            match settled {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(ret))) | Ok(Confirmation::Nack(Some(ret))) => {
                    Err(format!(
                        "returned by the broker: {} {}",
                        ret.reply_code, ret.reply_text
                    ))
                }
                Ok(Confirmation::Nack(None)) => Err("nacked by the broker".into()),
                Ok(Confirmation::NotRequested) => Err("channel is not in confirm mode".into()),
                Err(e) => Err(describe(&e)),
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("no confirm within {timeout:?}")))
    }
}
/// The consumer's side of the shared reconnect loop.
impl Link for Consumer {
    const NAME: &'static str = "warren-sidecar-consumer";

    fn connected(&mut self, broker: &Connected) {
        self.shared.state.connected(&broker.url);
        tracing::info!(broker = %broker.url, "consumer connected to broker");
    }

    async fn session(
        &mut self,
        broker: &Connected,
        stop: &CancellationToken,
    ) -> Result<(), String> {
        self.consume(&broker.conn, stop, self.drain).await
    }

    fn unreachable(&mut self, error: &ConnectError, attempt: u32) {
        tracing::warn!(%error, attempt, "consumer cannot connect to broker");
        self.shared.state.disconnected(Some(error.to_string()));
    }

    fn lost(&mut self, broker: &Connected, error: &str) {
        tracing::warn!(broker = %broker.url, %error, "consumer connection lost; reconnecting");
        self.shared.state.disconnected(Some(error.to_owned()));
    }
}
