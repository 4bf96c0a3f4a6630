//! The forwarder: moves messages from the outbox to the broker.
//!
//! One connection, one publishing channel in confirm mode, a window of up to
//! `confirm_window` messages awaiting their confirm. Every message is
//! published persistent, `mandatory`, with its `message_id`. A message
//! leaves the outbox only when the broker acks it without returning it.
//!
//! Anything else — a nack, a `basic.return`, a channel error, a lost
//! connection — leaves the message in the outbox:
//!
//! - a lost connection or a silent one (missed heartbeats, or no confirm for
//!   `confirm_timeout`) ends the session; everything in flight is sent again
//!   on the next connection (consumers see a duplicate, never a gap);
//! - a refusal that belongs to one message (nack, return, an exchange that
//!   does not exist or may not be used) puts that message on a retry
//!   schedule with exponential backoff and jitter, so the messages behind it
//!   keep flowing; after `dead_letter_after` of failures it moves to the
//!   outbox's dead-letter area, still on disk.
//!
//! Before the first message to an exchange on a connection, the forwarder
//! checks the exchange with a passive declare on a separate channel: a
//! missing exchange then costs a probe, not the publishing channel and the
//! whole window in flight.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Event, ExchangeKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, BrokerSettings, ConnectError, backoff, describe, jittered};
use crate::metrics::{ConnLabels, ConnResult, FailReason, Metrics};
use crate::outbox::{Outbox, OutboxError, PendingEntry, StoreError};
use crate::status::BrokerStatus;

/// Settings of the forwarder.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// amqp:// or amqps:// URL, credentials included.
    pub url: String,
    /// PEM CA bundle for amqps://, if not the system roots.
    pub tls_ca_pem: Option<String>,
    /// Most unconfirmed messages at once.
    pub window: usize,
    /// No confirm for this long while some are outstanding: connection dead.
    pub confirm_timeout: Duration,
    /// AMQP heartbeat interval.
    pub heartbeat: Duration,
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
    /// Reconnect backoff bounds.
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Backoff bounds for resending a refused message.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Refused for this long: move to the dead-letter area.
    pub dead_letter_after: Duration,
}

/// Why a forwarding session ended.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("broker connection event stream ended")]
    EventsEnded,
    #[error("broker connection lost: {0}")]
    Lost(lapin::Error),
    #[error("no publisher confirm for {0:?} with messages in flight; connection presumed dead")]
    ConfirmTimeout(Duration),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Failure state of one refused message.
#[derive(Debug, Clone)]
struct RetryState {
    attempts: u32,
    first_failure: Instant,
    next_try: Instant,
}

type ConfirmFuture = Pin<Box<dyn Future<Output = (u64, u64, lapin::Result<Confirmation>)> + Send>>;

/// The forwarder task. Create with [`Forwarder::new`], drive with
/// [`Forwarder::run`].
pub struct Forwarder {
    outbox: Arc<Outbox>,
    cfg: ForwarderConfig,
    status: BrokerStatus,
    metrics: Arc<Metrics>,
    /// Refused messages waiting for their next attempt, by sequence.
    retries: HashMap<u64, RetryState>,
    /// The same, ordered by when they are due.
    due: BTreeSet<(Instant, u64)>,
    /// Confirmed sequences not yet removed from the outbox.
    done: Vec<(u64, u64)>,
}

/// State of one connection's publishing session.
struct Session {
    channel: Channel,
    probe: Option<Channel>,
    /// Exchanges known to exist on this connection.
    verified: HashSet<String>,
    /// Exchanges recently found missing or refused, with the broker's text.
    refused: HashMap<String, (Instant, String)>,
    inflight: FuturesUnordered<ConfirmFuture>,
    /// In-flight sequence → exchange, for blame after a channel error.
    inflight_exchange: HashMap<u64, String>,
    /// Next sequence to read from the outbox.
    cursor: u64,
    /// Read from the outbox, not yet published.
    ready: VecDeque<PendingEntry>,
    /// Set while the broker blocks publishing (resource alarm).
    blocked: Arc<AtomicBool>,
    /// Last confirm received (or unblock): measures a silent broker.
    last_progress: Instant,
}

impl Forwarder {
    /// A forwarder over `outbox`.
    pub fn new(
        outbox: Arc<Outbox>,
        cfg: ForwarderConfig,
        status: BrokerStatus,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            outbox,
            cfg,
            status,
            metrics,
            retries: HashMap::new(),
            due: BTreeSet::new(),
            done: Vec::new(),
        }
    }

    /// Forwards until `stop` is cancelled, reconnecting as needed. Messages
    /// in flight when it stops stay in the outbox.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut attempt: u32 = 0;
        while !stop.is_cancelled() {
            self.status.connecting();
            let result = tokio::select! {
                r = self.connect() => r,
                _ = stop.cancelled() => break,
            };
            match result {
                Ok(conn) => {
                    attempt = 0;
                    self.metrics
                        .connections
                        .get_or_create(&ConnLabels {
                            result: ConnResult::Connected,
                        })
                        .inc();
                    self.status.connected();
                    tracing::info!(broker = %self.status.snapshot().url, "connected to broker");
                    let end = self.session(&conn, &stop).await;
                    if let Err(e) = self.flush_done() {
                        tracing::error!(error = %e, "cannot remove confirmed messages from the outbox");
                    }
                    self.metrics.inflight.set(0);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        conn.close(200, "warren-sidecar closing".into()),
                    )
                    .await;
                    match end {
                        Ok(()) => break,
                        Err(e) => {
                            self.metrics.connection_losses.inc();
                            tracing::warn!(error = %e, "forwarding session ended; reconnecting");
                            self.status.disconnected(e.to_string());
                        }
                    }
                }
                Err(e) => {
                    self.metrics
                        .connections
                        .get_or_create(&ConnLabels {
                            result: ConnResult::Failed,
                        })
                        .inc();
                    tracing::warn!(error = %e, attempt, "broker connection failed");
                    self.status.disconnected(e.to_string());
                }
            }
            let delay = jittered(backoff(
                self.cfg.reconnect_initial,
                self.cfg.reconnect_max,
                attempt,
            ));
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => break,
            }
        }
        self.status.stopped();
    }

    async fn connect(&self) -> Result<Connection, ForwardError> {
        let settings = BrokerSettings {
            url: self.cfg.url.clone(),
            tls_ca_pem: self.cfg.tls_ca_pem.clone(),
            heartbeat: self.cfg.heartbeat,
            connect_timeout: self.cfg.connect_timeout,
        };
        Ok(broker::connect(&settings, "warren-sidecar").await?)
    }

    async fn session(
        &mut self,
        conn: &Connection,
        stop: &CancellationToken,
    ) -> Result<(), ForwardError> {
        // Connection events are watched by a task of their own: a publish
        // issued just before the broker blocks the connection waits inside
        // lapin until it is unblocked, and the block must be visible (status,
        // metrics) meanwhile.
        let blocked = Arc::new(AtomicBool::new(false));
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let watcher = AbortOnDrop(tokio::spawn(watch_events(
            conn.events_listener(),
            self.status.clone(),
            blocked.clone(),
            ev_tx,
        )));
        let channel = conn.create_channel().await.map_err(ForwardError::Lost)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(ForwardError::Lost)?;
        let mut s = Session {
            channel,
            probe: None,
            verified: HashSet::from([String::new()]),
            refused: HashMap::new(),
            inflight: FuturesUnordered::new(),
            inflight_exchange: HashMap::new(),
            cursor: 0,
            ready: VecDeque::new(),
            blocked,
            last_progress: Instant::now(),
        };
        let _watcher = watcher;
        loop {
            self.fill(conn, &mut s).await?;
            self.flush_done()?;
            self.metrics.inflight.set(s.inflight.len() as i64);

            let room = s.inflight.len() < self.cfg.window;
            let is_blocked = s.blocked.load(Ordering::Acquire);
            let retry_at = self.due.first().map(|(t, _)| *t);
            let silent_at = (!is_blocked && !s.inflight.is_empty())
                .then(|| s.last_progress + self.cfg.confirm_timeout);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                Some((seq, size, res)) = s.inflight.next(), if !s.inflight.is_empty() => {
                    s.last_progress = Instant::now();
                    self.on_confirm(&mut s, seq, size, res).await?;
                    // Take every confirm that is already there, so the outbox
                    // removes them in one batch.
                    while let Some(Some((seq, size, res))) = s.inflight.next().now_or_never() {
                        self.on_confirm(&mut s, seq, size, res).await?;
                    }
                }
                ev = ev_rx.recv() => match ev {
                    Some(Event::ConnectionUnblocked) => s.last_progress = Instant::now(),
                    // Channel-level errors surface where the channel is used
                    // (probe, publish, confirm); only connection errors end
                    // the session here.
                    Some(Event::Error(e)) if !e.is_amqp_soft_error() => return Err(ForwardError::Lost(e)),
                    Some(_) => {}
                    None => return Err(ForwardError::EventsEnded),
                },
                _ = self.outbox.wait_for_new(), if room && !is_blocked && s.ready.is_empty() => {}
                _ = sleep_until_opt(retry_at), if retry_at.is_some() && room && !is_blocked => {}
                _ = sleep_until_opt(silent_at), if silent_at.is_some() => {
                    return Err(ForwardError::ConfirmTimeout(self.cfg.confirm_timeout));
                }
            }
        }
    }

    /// Publishes until the window is full or nothing is ready.
    async fn fill(&mut self, conn: &Connection, s: &mut Session) -> Result<(), ForwardError> {
        while s.inflight.len() < self.cfg.window && !s.blocked.load(Ordering::Acquire) {
            let Some(entry) = self.next_candidate(s)? else {
                break;
            };
            let msg = match &entry.message {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(seq = entry.seq, error = %e, "outbox record cannot be decoded; moving it to the dead-letter area");
                    self.metrics.forward_failed(FailReason::Corrupt);
                    self.retries.remove(&entry.seq);
                    self.outbox.dead_letter(&entry, &e.to_string(), 0).await?;
                    continue;
                }
            };
            if !s.verified.contains(&msg.exchange) {
                let now = Instant::now();
                if let Some((until, reason)) = s
                    .refused
                    .get(&msg.exchange)
                    .filter(|(until, _)| *until > now)
                {
                    let _ = until;
                    let reason = reason.clone();
                    self.fail(entry.seq, &reason, FailReason::Exchange).await?;
                    continue;
                }
                match self.probe(conn, s, &msg.exchange).await? {
                    None => {
                        s.verified.insert(msg.exchange.clone());
                    }
                    Some(reason) => {
                        tracing::warn!(exchange = %msg.exchange, %reason, "exchange refused; message kept for retry");
                        s.refused.insert(
                            msg.exchange.clone(),
                            (now + Duration::from_secs(1), reason.clone()),
                        );
                        self.fail(entry.seq, &reason, FailReason::Exchange).await?;
                        continue;
                    }
                }
            }
            let confirm = s
                .channel
                .basic_publish(
                    ShortString::from(msg.exchange.as_str()),
                    ShortString::from(msg.routing_key.as_str()),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &msg.body,
                    properties(msg),
                )
                .await
                .map_err(ForwardError::Lost)?;
            if s.inflight.is_empty() {
                s.last_progress = Instant::now();
            }
            s.inflight_exchange.insert(entry.seq, msg.exchange.clone());
            let (seq, size) = (entry.seq, entry.size);
            s.inflight
                .push(Box::pin(async move { (seq, size, confirm.await) }));
        }
        Ok(())
    }

    /// The next message to publish: a refused one whose retry is due, else
    /// the next one in outbox order that is neither waiting nor in flight.
    fn next_candidate(&mut self, s: &mut Session) -> Result<Option<PendingEntry>, StoreError> {
        let now = Instant::now();
        while let Some(&(at, seq)) = self.due.first() {
            if at > now {
                break;
            }
            self.due.pop_first();
            if s.inflight_exchange.contains_key(&seq) {
                continue;
            }
            match self.outbox.read_one(seq)? {
                Some(entry) => return Ok(Some(entry)),
                None => {
                    self.retries.remove(&seq);
                }
            }
        }
        loop {
            if s.ready.is_empty() {
                let batch = self.outbox.read_pending(s.cursor, 512)?;
                let Some(last) = batch.last() else {
                    return Ok(None);
                };
                s.cursor = last.seq + 1;
                s.ready.extend(batch);
            }
            while let Some(entry) = s.ready.pop_front() {
                if !self.retries.contains_key(&entry.seq)
                    && !s.inflight_exchange.contains_key(&entry.seq)
                {
                    return Ok(Some(entry));
                }
            }
        }
    }

    /// Checks that `exchange` exists: `Ok(None)` if it does, `Ok(Some(text))`
    /// with the broker's refusal if not; `Err` if the connection failed.
    async fn probe(
        &self,
        conn: &Connection,
        s: &mut Session,
        exchange: &str,
    ) -> Result<Option<String>, ForwardError> {
        if s.probe.as_ref().is_none_or(|c| !c.status().connected()) {
            s.probe = Some(conn.create_channel().await.map_err(ForwardError::Lost)?);
        }
        let probe = s.probe.as_ref().expect("probe channel just opened");
        let res = probe
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match res {
            Ok(()) => Ok(None),
            Err(e) if e.is_amqp_soft_error() => {
                s.probe = None;
                Ok(Some(describe(&e)))
            }
            Err(e) => Err(ForwardError::Lost(e)),
        }
    }

    async fn on_confirm(
        &mut self,
        s: &mut Session,
        seq: u64,
        size: u64,
        res: lapin::Result<Confirmation>,
    ) -> Result<(), ForwardError> {
        let exchange = s.inflight_exchange.remove(&seq);
        match res {
            Ok(Confirmation::Ack(None)) => {
                self.done.push((seq, size));
                self.retries.remove(&seq);
            }
            Ok(Confirmation::Ack(Some(ret))) | Ok(Confirmation::Nack(Some(ret))) => {
                let reason = format!(
                    "message returned by the broker as unroutable: {} {} (exchange {:?}, routing key {:?})",
                    ret.reply_code,
                    ret.reply_text,
                    exchange.unwrap_or_default(),
                    ret.delivery.routing_key.as_str()
                );
                self.fail(seq, &reason, FailReason::Unroutable).await?;
            }
            Ok(Confirmation::Nack(None)) | Ok(Confirmation::NotRequested) => {
                self.fail(seq, "message nacked by the broker", FailReason::Nack)
                    .await?;
            }
            Err(e) => {
                // The channel or connection closed with messages in flight.
                // Blame only what the broker's text points at; everything
                // else in flight is simply sent again.
                if e.is_amqp_soft_error() {
                    let text = describe(&e);
                    let blamed: Vec<u64> = match exchange_in(&text) {
                        Some(name) => {
                            s.verified.remove(name);
                            s.inflight_exchange
                                .iter()
                                .filter(|(_, ex)| ex.as_str() == name)
                                .map(|(seq, _)| *seq)
                                .chain(exchange.as_deref().filter(|ex| *ex == name).map(|_| seq))
                                .collect()
                        }
                        None => s.inflight_exchange.keys().copied().chain([seq]).collect(),
                    };
                    for b in blamed {
                        self.fail(b, &text, FailReason::ChannelError).await?;
                    }
                }
                return Err(ForwardError::Lost(e));
            }
        }
        if !self.done.is_empty() && self.done.len() >= 256 {
            self.flush_done()?;
        }
        Ok(())
    }

    /// Records a refused attempt of `seq`: schedule a retry, or move the
    /// message to the dead-letter area once it has been refused long enough.
    async fn fail(&mut self, seq: u64, reason: &str, kind: FailReason) -> Result<(), ForwardError> {
        self.metrics.forward_failed(kind);
        self.status.error(reason.to_owned());
        let now = Instant::now();
        let st = self.retries.entry(seq).or_insert(RetryState {
            attempts: 0,
            first_failure: now,
            next_try: now,
        });
        st.attempts += 1;
        self.due.remove(&(st.next_try, seq));
        if now.duration_since(st.first_failure) >= self.cfg.dead_letter_after {
            let attempts = st.attempts;
            self.retries.remove(&seq);
            if let Some(entry) = self.outbox.read_one(seq)? {
                tracing::error!(seq, attempts, %reason, "message refused for too long; moved to the dead-letter area");
                self.outbox.dead_letter(&entry, reason, attempts).await?;
            }
            return Ok(());
        }
        st.next_try = now
            + jittered(backoff(
                self.cfg.retry_initial,
                self.cfg.retry_max,
                st.attempts - 1,
            ));
        tracing::debug!(seq, attempts = st.attempts, %reason, "message refused; will retry");
        self.due.insert((st.next_try, seq));
        Ok(())
    }

    fn flush_done(&mut self) -> Result<(), StoreError> {
        if self.done.is_empty() {
            return Ok(());
        }
        self.outbox.remove(&self.done)?;
        self.metrics.forwarded.inc_by(self.done.len() as u64);
        self.done.clear();
        Ok(())
    }
}

/// Aborts a task when dropped, so a session's helper tasks end with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows a connection's events: records blocks and unblocks at once, and
/// passes every event on to the session.
async fn watch_events(
    events: impl futures::Stream<Item = Event> + Send + 'static,
    status: BrokerStatus,
    blocked: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<Event>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(ev) = events.next().await {
        match &ev {
            Event::ConnectionBlocked(reason) => {
                tracing::warn!(%reason, "broker blocked publishing; holding messages in the outbox");
                blocked.store(true, Ordering::Release);
                status.blocked(reason.clone());
            }
            Event::ConnectionUnblocked => {
                tracing::info!("broker unblocked publishing");
                blocked.store(false, Ordering::Release);
                status.unblocked();
            }
            _ => {}
        }
        if tx.send(ev).is_err() {
            break;
        }
    }
}

/// AMQP properties of a forwarded message.
fn properties(msg: &crate::outbox::Message) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(msg.message_id.as_str().into())
        .with_timestamp(msg.enqueued_at_ms / 1000);
    if let Some(ct) = &msg.content_type {
        props = props.with_content_type(ct.as_str().into());
    }
    if !msg.headers.is_empty() {
        let mut table = FieldTable::default();
        for (k, v) in &msg.headers {
            table.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
        }
        props = props.with_headers(table);
    }
    props
}

/// The exchange name in a broker error text such as
/// `NOT_FOUND - no exchange 'orders' in vhost '/'`.
fn exchange_in(text: &str) -> Option<&str> {
    let start = text.find("exchange '")? + "exchange '".len();
    let len = text[start..].find('\'')?;
    Some(&text[start..start + len])
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_names_are_found_in_broker_text() {
        assert_eq!(
            exchange_in("NOT_FOUND - no exchange 'orders.v2' in vhost '/'"),
            Some("orders.v2")
        );
        assert_eq!(
            exchange_in(
                "ACCESS_REFUSED - access to exchange 'billing' in vhost '/' refused for user 'app'"
            ),
            Some("billing")
        );
        assert_eq!(
            exchange_in("PRECONDITION_FAILED - message size 5 is larger"),
            None
        );
    }
}
