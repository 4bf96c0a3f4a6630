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
        max_bytes: outbox_byte_limit(&cfg)?,
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

    let tls_ca_pem = match &cfg.tls_ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --tls-ca-file {}", path.display()))?,
        ),
        None => None,
    };
    let consumer_config = cfg.consumer_config()?;
    let urls =
        broker::parse_urls(&cfg.broker_url).map_err(|e| anyhow::anyhow!("--broker-url: {e}"))?;
    let status = BrokerStatus::new(
        urls.iter().map(|u| redact_url(u)).collect(),
        metrics.clone(),
    );
    let broker_settings = BrokerSettings {
        urls: urls.into_iter().map(Into::into).collect(),
        tls_ca_pem,
        heartbeat: cfg.heartbeat,
        connect_timeout: cfg.connect_timeout,
        reconnect: broker::schedule(cfg.reconnect_initial, cfg.reconnect_max),
    };
    let forwarder = Forwarder::new(
        outbox.clone(),
        ForwarderConfig {
            broker: broker_settings.clone(),
            window: cfg.confirm_window,
            confirm_timeout: cfg.confirm_timeout,
            retry: broker::schedule(cfg.retry_initial, cfg.retry_max),
            dead_letter_after: cfg.dead_letter_after,
        },
        status.clone(),
        metrics.clone(),
    );
    let stop_forwarder = CancellationToken::new();
    let forwarder = tokio::spawn(forwarder.run(stop_forwarder.clone()));

    let consumer_state = ConsumerState::new(
        consumer_config
            .iter()
            .flat_map(|c| c.queues.iter().map(|q| q.name.as_str())),
    );
    let stop_consumer = CancellationToken::new();
    let consumer = match consumer_config {
        Some(config) => {
            let consumer = Consumer::new(
                ConsumerSettings {
                    broker: broker_settings,
                    config,
                },
                metrics.clone(),
                consumer_state.clone(),
            )?;
            Some(tokio::spawn(
                consumer.run(stop_consumer.clone(), cfg.drain_timeout),
            ))
        }
        None => None,
    };

    let stop_relay = CancellationToken::new();
    let (relay_status, relay) = match cfg.relay_settings()? {
        Some(settings) => {
            let relay = Relay::new(settings, outbox.clone(), metrics.clone());
            let status = relay.status();
            (
                Some(status),
                Some(tokio::spawn(relay.run(stop_relay.clone()))),
            )
        }
        None => (None, None),
    };

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
    let api_listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.admin_listen))?;
    let api_addr = api_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let stop_servers = CancellationToken::new();
    let api = tokio::spawn(
        axum::serve(api_listener, api::router(state.clone()))
            .with_graceful_shutdown(stop_servers.clone().cancelled_owned())
            .into_future(),
    );
    let admin = tokio::spawn(
        axum::serve(admin_listener, api::admin_router(state.clone()))
            .with_graceful_shutdown(stop_servers.clone().cancelled_owned())
            .into_future(),
    );
    tracing::info!(%api_addr, %admin_addr, data_dir = %cfg.data_dir.display(), durability = ?cfg.durability, engine = ?cfg.outbox_engine, "warren-sidecar started");

    let shutdown = CancellationToken::new();
    let drain_timeout = cfg.drain_timeout;
    let task = {
        let shutdown = shutdown.clone();
        let outbox = outbox.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            state.accepting.store(false, Ordering::Release);
            tracing::info!(
                pending = outbox.stats().pending,
                ?drain_timeout,
                "shutting down; draining the outbox"
            );
            // The relay takes no new rows: what it has not moved stays in
            // the app's table for the next sidecar.
            stop_relay.cancel();
            if let Some(relay) = relay {
                let _ = relay.await;
            }
            // The consumer stops taking deliveries and finishes those in
            // hand while the outbox drains.
            stop_consumer.cancel();
            let deadline = Instant::now() + drain_timeout;
            while outbox.stats().pending > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Some(consumer) = consumer {
                let _ = consumer.await;
            }
            stop_forwarder.cancel();
            let _ = forwarder.await;
            outbox.sync().await.context("final outbox flush failed")?;
            stop_servers.cancel();
            let _ = api.await;
            let _ = admin.await;
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
        })
    };
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

/// `--max-outbox-bytes`, or what the data dir's filesystem can hold. A
/// limit above what the volume holds would turn 507 (full, retry later)
/// into disk-full errors: the smaller one applies, with a warning.
fn outbox_byte_limit(cfg: &Config) -> anyhow::Result<u64> {
    use warren_crds::outbox::{DEFAULT_MAX_BYTES, EngineKind, max_bytes_for_volume};
    let engine = match cfg.outbox_engine {
        Engine::Segment => EngineKind::Segment,
        Engine::Sled => EngineKind::Sled,
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
