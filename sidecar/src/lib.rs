//! warren-sidecar: a durable local outbox in front of RabbitMQ.
//!
//! The app publishes over HTTP on localhost ([`api`]); each message is
//! written to the [`outbox`] on a persistent volume and answered `202` only
//! once it is durable. The [`forwarder`] moves messages to the broker with
//! publisher confirms and deletes each one only after the broker's ack, so
//! broker outages, network cuts, and crashes or restarts of the sidecar
//! delay messages but do not lose them.
//!
//! With a consumer configuration (`--config`), the [`consumer`] also
//! consumes queues for the app: it POSTs each message to the app and turns
//! failures into retries with backoff and, in the end, a parked copy.
//!
//! Layout:
//! - [`config`]: flags and `WARREN_*` environment fallbacks;
//! - [`outbox`]: the storage trait, the segment-log and sled engines, the
//!   record framing and the outbox with group commit and limits;
//! - [`broker`]: connecting to the broker, shared by both directions;
//! - [`forwarder`]: connection management, confirms, retry and dead-letter;
//! - [`consumer`]: consumes queues for the app, delivers over HTTP, retries
//!   with backoff and parks what cannot be processed;
//! - [`relay`]: the transactional outbox relay, moving rows the app
//!   committed in its own PostgreSQL table into the outbox;
//! - [`api`]: the app-facing API and the admin endpoints;
//! - [`status`], [`metrics`]: what the sidecar reports about itself.

pub mod api;
pub mod broker;
pub mod config;
pub mod consumer;
pub mod forwarder;
pub mod metrics;
pub mod outbox;
pub mod relay;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren_crds::sidecar_config::SidecarConfig;

use crate::api::{AppState, RequestLimits};
use crate::broker::BrokerSettings;
use crate::config::{Config, redact_url};
use crate::consumer::{Consumer, ConsumerSettings, ConsumerState};
use crate::forwarder::{Forwarder, ForwarderConfig};
use crate::metrics::Metrics;
use crate::outbox::{Durability, Engine, Limits, Outbox, SegmentOptions, Stats, Store};
use crate::relay::{Relay, RelayStatus};
use crate::status::BrokerStatus;

/// A running sidecar.
pub struct Running {
    /// Where the app-facing API listens.
    pub api_addr: SocketAddr,
    /// Where the admin endpoints listen.
    pub admin_addr: SocketAddr,
    /// The outbox, for inspection.
    pub outbox: Arc<Outbox>,
    /// The broker connection state.
    pub status: BrokerStatus,
    /// The consumer's subscriptions.
    pub consumer: ConsumerState,
    /// The transactional outbox relay, when `--relay-postgres` is set.
    pub relay: Option<RelayStatus>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<Stats>>,
}

impl Running {
    /// Starts the graceful shutdown: publishes are refused with 503, the
    /// outbox drains for up to the drain timeout, then everything stops.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for the sidecar to stop; returns what was left in the outbox.
    pub async fn wait(self) -> anyhow::Result<Stats> {
        self.task.await.context("sidecar task panicked")?
    }
}

/// Opens the outbox, starts the forwarder and both HTTP servers.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    start_with(cfg, None).await
}

/// [`start`], over `store` instead of the engine `--outbox-engine` names
/// (tests use it to put a fault-injecting store under a whole sidecar).
pub async fn start_with(cfg: Config, store: Option<Arc<dyn Store>>) -> anyhow::Result<Running> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let metrics = Arc::new(Metrics::new());
    let (outbox, limits) = open_outbox(&cfg, store, &metrics)?;

    let tls_ca_pem = read_tls_ca(&cfg)?;
    let consumer_config = cfg.consumer_config()?;
    let (status, broker) = broker_settings(&cfg, tls_ca_pem, &metrics)?;
    let forwarder = start_forwarder(&cfg, &outbox, broker.clone(), &status, &metrics);
    let consumer_state = ConsumerState::new(
        consumer_config
            .iter()
            .flat_map(|c| c.queues.iter().map(|q| q.name.as_str())),
    );
    let consumer = start_consumer(&cfg, consumer_config, broker, &metrics, &consumer_state)?;
    let (relay_status, relay) = start_relay(&cfg, &outbox, &metrics)?;

    let state = Arc::new(AppState {
        outbox: outbox.clone(),
        status: status.clone(),
        metrics: metrics.clone(),
        // A draining sidecar only forwards what it holds.
        accepting: AtomicBool::new(!cfg.drain),
        limits: RequestLimits {
            max_message_bytes: cfg.max_message_bytes,
            max_batch_bytes: cfg.max_batch_bytes,
            max_batch_messages: cfg.max_batch_messages,
        },
        outbox_limits: limits,
        consumer: consumer_state.clone(),
        relay: relay_status.clone(),
    });
    let servers = serve_apis(&cfg, &state).await?;
    let (api_addr, admin_addr) = (servers.api_addr, servers.admin_addr);
    tracing::info!(%api_addr, %admin_addr, data_dir = %cfg.data_dir.display(), durability = ?cfg.durability, engine = ?cfg.outbox_engine, "warren-sidecar started");

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(stop_on(
        shutdown.clone(),
        Parts {
            state,
            outbox: outbox.clone(),
            forwarder,
            consumer,
            relay,
            servers,
            drain_timeout: cfg.drain_timeout,
        },
    ));
    Ok(Running {
        api_addr,
        admin_addr,
        outbox,
        status,
        consumer: consumer_state,
        relay: relay_status,
        shutdown,
        task,
    })
}

/// Opens the outbox over `store`, or over the engine `--outbox-engine`
/// names, with the limits that apply (also returned, for `GET
/// /v1/outbox`).
fn open_outbox(
    cfg: &Config,
    store: Option<Arc<dyn Store>>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<Outbox>, Limits)> {
    let flush_every = match cfg.durability {
        Durability::Flush => Duration::from_millis(500),
        Durability::Buffered => cfg.flush_interval,
    };
    let opts = SegmentOptions {
        segment_bytes: cfg.outbox_segment_bytes,
        sync_interval: flush_every,
        ..SegmentOptions::default()
    };
    let store = match store {
        Some(s) => s,
        None => outbox::open_store(
            cfg.outbox_engine,
            &cfg.data_dir,
            opts,
            cfg.outbox_cache_bytes,
            Some(flush_every),
        )?,
    };
    let limits = Limits {
        max_messages: cfg.max_outbox_messages,
        max_bytes: outbox_byte_limit(cfg)?,
    };
    let outbox = Outbox::open(store, limits, cfg.durability, metrics.clone())?;
    let left = outbox.stats();
    if left.pending > 0 || left.dead > 0 {
        tracing::info!(
            pending = left.pending,
            dead = left.dead,
            "outbox holds messages from a previous run; forwarding them first"
        );
    }
    Ok((outbox, limits))
}

/// The CA certificate `--tls-ca-file` names, when set.
fn read_tls_ca(cfg: &Config) -> anyhow::Result<Option<String>> {
    let Some(path) = &cfg.tls_ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --tls-ca-file {}", path.display()))?;
    Ok(Some(pem))
}

/// How the forwarder and the consumer reach the broker, and the status
/// the forwarder reports its connection in.
fn broker_settings(
    cfg: &Config,
    tls_ca_pem: Option<String>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(BrokerStatus, BrokerSettings)> {
    let urls =
        broker::parse_urls(&cfg.broker_url).map_err(|e| anyhow::anyhow!("--broker-url: {e}"))?;
    let status = BrokerStatus::new(
        urls.iter().map(|u| redact_url(u)).collect(),
        metrics.clone(),
    );
    let settings = BrokerSettings {
        urls: urls.into_iter().map(Into::into).collect(),
        tls_ca_pem,
        heartbeat: cfg.heartbeat,
        connect_timeout: cfg.connect_timeout,
        reconnect: broker::schedule(cfg.reconnect_initial, cfg.reconnect_max),
    };
    Ok((status, settings))
}

/// A task of the sidecar and the token that stops it.
struct Task {
    /// Cancelled to stop it.
    stop: CancellationToken,
    /// Ends when the task has stopped.
    handle: JoinHandle<()>,
}

impl Task {
    /// Spawns `run` with a token of its own.
    fn spawn<F>(run: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(run(stop.clone()));
        Self { stop, handle }
    }

    /// Stops the task and waits for it to end.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.handle.await;
    }
}

/// Starts moving the outbox to the broker.
fn start_forwarder(
    cfg: &Config,
    outbox: &Arc<Outbox>,
    broker: BrokerSettings,
    status: &BrokerStatus,
    metrics: &Arc<Metrics>,
) -> Task {
    let forwarder = Forwarder::new(
        outbox.clone(),
        ForwarderConfig {
            broker,
            window: cfg.confirm_window,
            confirm_timeout: cfg.confirm_timeout,
            retry: broker::schedule(cfg.retry_initial, cfg.retry_max),
            dead_letter_after: cfg.dead_letter_after,
        },
        status.clone(),
        metrics.clone(),
    );
    Task::spawn(|stop| forwarder.run(stop))
}

/// Starts consuming for the app, when a consumer is configured.
fn start_consumer(
    cfg: &Config,
    config: Option<SidecarConfig>,
    broker: BrokerSettings,
    metrics: &Arc<Metrics>,
    state: &ConsumerState,
) -> anyhow::Result<Option<Task>> {
    let Some(config) = config else {
        return Ok(None);
    };
    let consumer = Consumer::new(
        ConsumerSettings { broker, config },
        metrics.clone(),
        state.clone(),
    )?;
    let drain = cfg.drain_timeout;
    Ok(Some(Task::spawn(|stop| consumer.run(stop, drain))))
}

/// Starts the transactional outbox relay, when `--relay-postgres` is set.
fn start_relay(
    cfg: &Config,
    outbox: &Arc<Outbox>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Option<RelayStatus>, Option<Task>)> {
    let Some(settings) = cfg.relay_settings()? else {
        return Ok((None, None));
    };
    let relay = Relay::new(settings, outbox.clone(), metrics.clone());
    let status = relay.status();
    Ok((Some(status), Some(Task::spawn(|stop| relay.run(stop)))))
}

/// The app-facing API and the admin endpoints, served until `stop`.
struct Servers {
    /// Where the app-facing API listens.
    api_addr: SocketAddr,
    /// Where the admin endpoints listen.
    admin_addr: SocketAddr,
    /// Cancelled to stop both, gracefully.
    stop: CancellationToken,
    /// The app-facing API server.
    api: JoinHandle<std::io::Result<()>>,
    /// The admin server.
    admin: JoinHandle<std::io::Result<()>>,
}

impl Servers {
    /// Stops both servers and waits for them to end.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.api.await;
        let _ = self.admin.await;
    }
}

/// Binds `--listen` and `--admin-listen` and serves the APIs on them.
async fn serve_apis(cfg: &Config, state: &Arc<AppState>) -> anyhow::Result<Servers> {
    let api_listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.admin_listen))?;
    let api_addr = api_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let stop = CancellationToken::new();
    let api = tokio::spawn(
        axum::serve(api_listener, api::router(state.clone()))
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );
    let admin = tokio::spawn(
        axum::serve(admin_listener, api::admin_router(state.clone()))
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );
    Ok(Servers {
        api_addr,
        admin_addr,
        stop,
        api,
        admin,
    })
}

/// What the shutdown stops.
struct Parts {
    /// The APIs' state; its `accepting` flag is cleared first.
    state: Arc<AppState>,
    /// The outbox, drained and flushed.
    outbox: Arc<Outbox>,
    /// Stopped once the outbox is drained or the drain timeout passed.
    forwarder: Task,
    /// Stopped before the outbox drains; waited for after.
    consumer: Option<Task>,
    /// Stopped first.
    relay: Option<Task>,
    /// Stopped last.
    servers: Servers,
    /// How long the outbox may take to drain.
    drain_timeout: Duration,
}

/// Waits for `shutdown`, then stops the sidecar: publishes are refused,
/// the relay stops, the consumer finishes what it holds while the outbox
/// drains (up to the drain timeout), then the forwarder stops, the outbox
/// is flushed and the servers stop. Returns what was left in the outbox.
async fn stop_on(shutdown: CancellationToken, parts: Parts) -> anyhow::Result<Stats> {
    let Parts {
        state,
        outbox,
        forwarder,
        consumer,
        relay,
        servers,
        drain_timeout,
    } = parts;
    shutdown.cancelled().await;
    state.accepting.store(false, Ordering::Release);
    tracing::info!(
        pending = outbox.stats().pending,
        ?drain_timeout,
        "shutting down; draining the outbox"
    );
    // The relay takes no new rows: what it has not moved stays in the
    // app's table for the next sidecar.
    if let Some(relay) = relay {
        relay.stop().await;
    }
    // The consumer stops taking deliveries and finishes those in hand
    // while the outbox drains.
    if let Some(consumer) = &consumer {
        consumer.stop.cancel();
    }
    let deadline = Instant::now() + drain_timeout;
    while outbox.stats().pending > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(consumer) = consumer {
        let _ = consumer.handle.await;
    }
    forwarder.stop().await;
    outbox.sync().await.context("final outbox flush failed")?;
    servers.stop().await;
    let left = outbox.stats();
    if left.pending > 0 {
        tracing::warn!(
            pending = left.pending,
            "drain deadline reached; the rest stays in the outbox for the next start"
        );
    }
    tracing::info!(
        pending = left.pending,
        dead = left.dead,
        "warren-sidecar stopped"
    );
    Ok(left)
}

/// `--max-outbox-bytes`, or what the data dir's filesystem can hold. A
/// limit above what the volume holds would turn 507 (full, retry later)
/// into disk-full errors: the smaller one applies, with a warning.
fn outbox_byte_limit(cfg: &Config) -> anyhow::Result<u64> {
    use warren_crds::outbox::{DEFAULT_MAX_BYTES, EngineKind, max_bytes_for_volume};
    let engine = match cfg.outbox_engine {
        Engine::Segment => EngineKind::Segment,
        Engine::Sled => EngineKind::Sled,
        Engine::Fjall => EngineKind::Fjall,
    };
    let volume = filesystem_bytes(&cfg.data_dir)
        .with_context(|| format!("cannot read the size of {}", cfg.data_dir.display()))?;
    let Some(fits) = max_bytes_for_volume(
        volume,
        engine,
        cfg.outbox_segment_bytes,
        cfg.max_outbox_messages,
    ) else {
        anyhow::bail!(
            "the {volume}-byte filesystem of {} is too small for an outbox with \
             --outbox-segment-bytes {} and --max-outbox-messages {}",
            cfg.data_dir.display(),
            cfg.outbox_segment_bytes,
            cfg.max_outbox_messages
        );
    };
    Ok(match cfg.max_outbox_bytes {
        Some(asked) if asked > fits => {
            tracing::warn!(
                asked,
                limit = fits,
                volume,
                "--max-outbox-bytes does not fit on the data dir's filesystem with the outbox engine's own bytes; using the most it holds"
            );
            fits
        }
        Some(asked) => asked,
        None => fits.min(DEFAULT_MAX_BYTES),
    })
}

/// Size of the filesystem `dir` is on.
fn filesystem_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs struct to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_blocks as u64).saturating_mul(st.f_frsize as u64))
}
