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
//! Refusals are attributed by structure, never by parsing the broker's
//! text:
//!
//! - before the first message to an exchange on a connection, the forwarder
//!   checks the exchange with a passive declare on a separate channel: a
//!   missing exchange then costs a probe, not a publishing channel;
//! - each exchange is published on a channel of its own, so a channel the
//!   broker closes (a publish it refuses) concerns only the messages in
//!   flight to that exchange; messages to other exchanges keep flowing and
//!   keep their clocks;
//! - nacks and returns are matched to their messages by delivery tag and by
//!   what a return carries.

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

use warren_crds::backoff::Backoff;

use crate::broker::{self, BrokerSettings, ConnectError, Connected, Link, describe};
use crate::metrics::{ConnLabels, ConnResult, FailReason, Metrics};
use crate::outbox::{Outbox, OutboxError, PendingEntry, StoreError};
use crate::status::BrokerStatus;

/// Settings of the forwarder.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// The broker's addresses, connection settings and reconnect backoff.
    pub broker: BrokerSettings,
    /// Most unconfirmed messages at once.
    pub window: usize,
    /// No confirm for this long while some are outstanding: connection dead.
    pub confirm_timeout: Duration,
    /// Backoff for resending a refused message.
    pub retry: Backoff,
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

/// Most publishing channels open at once; beyond it, the channel of an
/// exchange with nothing in flight is closed to make room.
const MAX_CHANNELS: usize = 64;

/// How long an exchange the broker refused (404, 403) is not tried again:
/// messages to it fail at once meanwhile.
const REFUSAL_HOLD: Duration = Duration::from_secs(1);

/// State of one connection's publishing session.
struct Session {
    /// Publishing channels in confirm mode, one per exchange.
    channels: HashMap<String, Channel>,
    probe: Option<Channel>,
    /// Exchanges known to exist on this connection.
    verified: HashSet<String>,
    /// Exchanges recently found missing or refused, with the broker's text.
    refused: HashMap<String, (Instant, String)>,
    inflight: FuturesUnordered<ConfirmFuture>,
    /// In-flight sequence → where it went and its id: blames a channel
    /// error on an exchange, and finds the owner of a returned message.
    inflight_meta: HashMap<u64, Published>,
    /// In-flight sequences known to have been returned as unroutable, with
    /// the reason; they fail when their own confirm is settled.
    returned: HashMap<u64, String>,
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
        let broker = self.cfg.broker.clone();
        broker::stay_connected(&broker, &mut self, &stop).await;
        self.status.stopped();
    }

    /// Forwards over one connection until it fails or `stop` is cancelled.
    async fn forward(
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
        let mut s = Session {
            channels: HashMap::new(),
            probe: None,
            verified: HashSet::from([String::new()]),
            refused: HashMap::new(),
            inflight: FuturesUnordered::new(),
            inflight_meta: HashMap::new(),
            returned: HashMap::new(),
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
                    // Take every confirm that is already there: the outbox
                    // removes them in one batch, and a return is matched
                    // against all of them.
                    let mut batch = vec![(seq, size, res)];
                    while let Some(Some(c)) = s.inflight.next().now_or_never() {
                        batch.push(c);
                    }
                    self.on_confirms(&mut s, batch).await?;
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
                        s.refused
                            .insert(msg.exchange.clone(), (now + REFUSAL_HOLD, reason.clone()));
                        self.fail(entry.seq, &reason, FailReason::Exchange).await?;
                        continue;
                    }
                }
            }
            let Some(channel) = publishing_channel(conn, s, &msg.exchange).await? else {
                // Every channel is busy: wait for confirms to free one.
                s.ready.push_front(entry);
                break;
            };
            let published = channel
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
                .await;
            let confirm = match published {
                Ok(confirm) => confirm,
                Err(_) if conn.status().connected() && !channel.status().connected() => {
                    // The broker closed this exchange's channel over an
                    // earlier message; that one is blamed when its confirm
                    // fails. This one was not sent: it goes again at once.
                    s.channels.remove(&msg.exchange);
                    s.ready.push_front(entry);
                    continue;
                }
                Err(e) => return Err(ForwardError::Lost(e)),
            };
            if s.inflight.is_empty() {
                s.last_progress = Instant::now();
            }
            let (seq, size) = (entry.seq, entry.size);
            if let Ok(m) = entry.message {
                // Sent: its names move to the in-flight record, where a
                // return is matched against them.
                s.inflight_meta.insert(
                    seq,
                    Published {
                        exchange: m.exchange,
                        routing_key: m.routing_key,
                        message_id: m.message_id,
                    },
                );
            }
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
            if s.inflight_meta.contains_key(&seq) {
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
                    && !s.inflight_meta.contains_key(&entry.seq)
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

    /// Settles a batch of confirms. Returns are attributed first, while
    /// every message of the batch still counts as in flight.
    async fn on_confirms(
        &mut self,
        s: &mut Session,
        batch: Vec<(u64, u64, lapin::Result<Confirmation>)>,
    ) -> Result<(), ForwardError> {
        let mut settled = Vec::with_capacity(batch.len());
        for (seq, size, res) in batch {
            let res = match res {
                Ok(Confirmation::Ack(Some(ret))) => {
                    attribute_return(s, seq, &ret);
                    Ok(Confirmation::Ack(None))
                }
                Ok(Confirmation::Nack(Some(ret))) => {
                    attribute_return(s, seq, &ret);
                    Ok(Confirmation::Nack(None))
                }
                other => other,
            };
            settled.push((seq, size, res));
        }
        for (seq, size, res) in settled {
            self.on_confirm(s, seq, size, res).await?;
        }
        Ok(())
    }

    /// Settles one confirm whose return, if any, was already attributed.
    async fn on_confirm(
        &mut self,
        s: &mut Session,
        seq: u64,
        size: u64,
        res: lapin::Result<Confirmation>,
    ) -> Result<(), ForwardError> {
        let exchange = s.inflight_meta.remove(&seq).map(|m| m.exchange);
        if let Some(reason) = s.returned.remove(&seq) {
            // Returned: its ack says only that the broker is done with it,
            // not that a queue took it.
            if res.is_ok() {
                self.fail(seq, &reason, FailReason::Unroutable).await?;
                return self.flush_if_many();
            }
        }
        match res {
            Ok(Confirmation::Ack(_)) => {
                self.done.push((seq, size));
                self.retries.remove(&seq);
            }
            Ok(Confirmation::Nack(_)) | Ok(Confirmation::NotRequested) => {
                self.fail(seq, "message nacked by the broker", FailReason::Nack)
                    .await?;
            }
            Err(e) if e.is_amqp_soft_error() => {
                // The broker closed the channel of this message's exchange:
                // every message in flight on it fails with it, and only
                // those. Other exchanges' channels go on.
                let text = describe(&e);
                if let Some(ex) = &exchange {
                    if s.channels.get(ex).is_some_and(|c| !c.status().connected()) {
                        s.channels.remove(ex);
                    }
                    s.verified.remove(ex);
                    if refuses_the_exchange(&e) {
                        s.refused
                            .insert(ex.clone(), (Instant::now() + REFUSAL_HOLD, text.clone()));
                    }
                }
                self.fail(seq, &text, FailReason::ChannelError).await?;
            }
            Err(e) => {
                return Err(ForwardError::Lost(e));
            }
        }
        self.flush_if_many()
    }

    fn flush_if_many(&mut self) -> Result<(), ForwardError> {
        if self.done.len() >= 256 {
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
        st.next_try = now + broker::delay(&self.cfg.retry, st.attempts - 1);
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

/// Finds which message a `basic.return` belongs to and records it in
/// `s.returned`. The broker sends a message's return just before its
/// confirm, but one confirm may cover several messages (`multiple`), and
/// lapin hands the return to whichever of them it completes first. The
/// return carries the message's exchange, routing key and `message_id`: the
/// owner is the message in flight that matches them.
fn attribute_return(s: &mut Session, carrier: u64, ret: &lapin::message::BasicReturnMessage) {
    let key = Published::of_return(ret);
    let reason = format!(
        "message returned by the broker as unroutable: {} {} (exchange {:?}, routing key {:?})",
        ret.reply_code, ret.reply_text, key.exchange, key.routing_key
    );
    let owner = owner_of_return(&key, carrier, &s.inflight_meta, &s.returned);
    if owner != carrier {
        tracing::debug!(owner, carrier, "basic.return attributed by message id");
    }
    s.returned.insert(owner, reason);
}

/// The in-flight message a return published as `key` belongs to: the
/// carrier if it matches, else the lowest matching sequence not already
/// known to be returned. If nothing matches, the carrier: at worst it is
/// sent twice.
fn owner_of_return(
    key: &Published,
    carrier: u64,
    inflight: &HashMap<u64, Published>,
    returned: &HashMap<u64, String>,
) -> u64 {
    let free = |seq: &u64| !returned.contains_key(seq);
    if inflight.get(&carrier) == Some(key) && free(&carrier) {
        return carrier;
    }
    inflight
        .iter()
        .filter(|(seq, m)| *m == key && free(seq))
        .map(|(seq, _)| *seq)
        .min()
        .unwrap_or_else(|| {
            tracing::warn!(carrier, message_id = %key.message_id, "returned message matches nothing in flight; retrying the message it came with");
            carrier
        })
}

/// Where a message in flight was published, and its id: what a
/// `basic.return` carries to tell whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Published {
    exchange: String,
    routing_key: String,
    message_id: String,
}

impl Published {
    fn of_return(ret: &lapin::message::BasicReturnMessage) -> Self {
        Self {
            exchange: ret.delivery.exchange.to_string(),
            routing_key: ret.delivery.routing_key.to_string(),
            message_id: ret
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default(),
        }
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

/// The publishing channel of `exchange`, opened in confirm mode on first
/// use. `None` when [`MAX_CHANNELS`] are open and every one has messages in
/// flight.
async fn publishing_channel(
    conn: &Connection,
    s: &mut Session,
    exchange: &str,
) -> Result<Option<Channel>, ForwardError> {
    if let Some(ch) = s.channels.get(exchange) {
        if ch.status().connected() {
            return Ok(Some(ch.clone()));
        }
        s.channels.remove(exchange);
    }
    if s.channels.len() >= MAX_CHANNELS {
        let busy: HashSet<&str> = s
            .inflight_meta
            .values()
            .map(|m| m.exchange.as_str())
            .collect();
        let Some(idle) = s
            .channels
            .keys()
            .find(|ex| !busy.contains(ex.as_str()))
            .cloned()
        else {
            return Ok(None);
        };
        // Dropping the last handle closes the channel.
        s.channels.remove(&idle);
    }
    let ch = conn.create_channel().await.map_err(ForwardError::Lost)?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(ForwardError::Lost)?;
    s.channels.insert(exchange.to_owned(), ch.clone());
    Ok(Some(ch))
}

/// Whether a channel error refuses the exchange itself (it does not exist,
/// or the user may not publish to it), rather than one message.
fn refuses_the_exchange(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND | AMQPSoftError::ACCESSREFUSED)
            )
    )
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The forwarder's side of the shared reconnect loop.
impl Link for Forwarder {
    const NAME: &'static str = "warren-sidecar";

    fn connecting(&mut self) {
        self.status.connecting();
    }

    fn connected(&mut self, broker: &Connected) {
        self.metrics
            .connections
            .get_or_create(&ConnLabels {
                result: ConnResult::Connected,
            })
            .inc();
        self.status.connected(&broker.url);
        tracing::info!(broker = %broker.url, "connected to broker");
    }

    async fn session(
        &mut self,
        broker: &Connected,
        stop: &CancellationToken,
    ) -> Result<(), String> {
        // Every await of a session may hang while the broker blocks the
        // connection (it stops reading the socket, so a publish never
        // finishes writing): stopping must not wait for any of them. What
        // was not confirmed stays in the outbox.
        let end = tokio::select! {
            r = self.forward(&broker.conn, stop) => r,
            _ = stop.cancelled() => Ok(()),
        };
        if let Err(e) = self.flush_done() {
            tracing::error!(error = %e, "cannot remove confirmed messages from the outbox");
        }
        self.metrics.inflight.set(0);
        end.map_err(|e| e.to_string())
    }

    fn unreachable(&mut self, error: &ConnectError, attempt: u32) {
        self.metrics
            .connections
            .get_or_create(&ConnLabels {
                result: ConnResult::Failed,
            })
            .inc();
        tracing::warn!(%error, attempt, "broker connection failed");
        self.status.disconnected(error.to_string());
    }

    fn lost(&mut self, broker: &Connected, error: &str) {
        self.metrics.connection_losses.inc();
        tracing::warn!(broker = %broker.url, %error, "forwarding session ended; reconnecting");
        self.status.disconnected(error.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(exchange: &str, routing_key: &str, id: &str) -> Published {
        Published {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            message_id: id.into(),
        }
    }

    #[test]
    fn a_return_belongs_to_the_message_it_names_not_the_one_it_came_with() {
        let inflight = HashMap::from([
            (5, published("orders", "created", "a")),
            (6, published("orders", "nowhere", "b")),
            (7, published("orders", "nowhere", "b")),
            (8, published("orders", "created", "c")),
        ]);
        let mut returned = HashMap::new();
        let b = published("orders", "nowhere", "b");
        // Handed to 5's confirm (one `multiple` ack covering 5..8): it is 6's.
        assert_eq!(owner_of_return(&b, 5, &inflight, &returned), 6);
        returned.insert(6, String::new());
        // A second return of the same message id: the other copy.
        assert_eq!(owner_of_return(&b, 8, &inflight, &returned), 7);
        // Carried by its own confirm.
        returned.clear();
        assert_eq!(owner_of_return(&b, 7, &inflight, &returned), 7);
        // Matches nothing in flight: the carrier.
        let stray = published("orders", "created", "zzz");
        assert_eq!(owner_of_return(&stray, 8, &inflight, &returned), 8);
    }
}
