use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;
use warren_sidecar::config::{Config, LogFormat};

/// Exit status of a drain that left messages in the dead-letter area.
const DRAIN_LEFT_DEAD: u8 = 3;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let mut cfg = Config::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    cfg.resolve_broker_url()?;
    let drain = cfg.drain;
    let running = warren_sidecar::start(cfg).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let outbox = running.outbox.clone();
    let drained = async move {
        if !drain {
            return std::future::pending().await;
        }
        tracing::info!(
            pending = outbox.stats().pending,
            "drain mode: forwarding what the outbox holds"
        );
        while outbox.stats().pending > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
        () = drained => tracing::info!("outbox drained"),
    }
    running.shutdown();
    let left = running.wait().await?;
    if drain && (left.pending > 0 || left.dead > 0) {
        tracing::error!(
            pending = left.pending,
            dead = left.dead,
            "drain incomplete: messages remain in the outbox (the dead-letter area is listed by GET /v1/outbox/dead)"
        );
        return Ok(ExitCode::from(DRAIN_LEFT_DEAD));
    }
    Ok(ExitCode::SUCCESS)
}
