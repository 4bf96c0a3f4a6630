//! Command-line configuration; every flag has a `WARREN_*` environment
//! fallback so the operator can render it into a pod spec.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use warren_crds::sidecar_config::SidecarConfig;

use crate::outbox::Durability;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// How the sidecar logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// warren-sidecar: accepts messages on localhost, keeps them in a durable
/// outbox and forwards them to RabbitMQ with publisher confirms.
#[derive(Debug, Clone, Parser)]
#[command(name = "warren-sidecar", version, about)]
pub struct Config {
    /// Broker URL, amqp:// or amqps:// (credentials may be embedded).
    #[arg(long, env = "WARREN_BROKER_URL", hide_env_values = true)]
    pub broker_url: String,

    /// Directory of the durable outbox (a persistent volume in Kubernetes).
    #[arg(long, env = "WARREN_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Address of the app-facing HTTP API.
    #[arg(long, env = "WARREN_LISTEN", default_value = "127.0.0.1:7171")]
    pub listen: SocketAddr,

    /// Address of the admin endpoints (/healthz, /readyz, /metrics).
    #[arg(long, env = "WARREN_ADMIN_LISTEN", default_value = "0.0.0.0:7172")]
    pub admin_listen: SocketAddr,

    /// When a publish is answered: after the outbox flush covering it
    /// (`flush`), or once it is in the outbox's memory (`buffered`).
    #[arg(long, env = "WARREN_DURABILITY", value_enum, default_value = "flush")]
    pub durability: Durability,

    /// Background flush interval in buffered mode.
    #[arg(long, env = "WARREN_FLUSH_INTERVAL", value_parser = duration, default_value = "100ms")]
    pub flush_interval: Duration,

    /// Most messages the outbox holds (pending and dead-lettered) before
    /// publishes are answered 507.
    #[arg(long, env = "WARREN_MAX_OUTBOX_MESSAGES", default_value_t = 1_000_000)]
    pub max_outbox_messages: u64,

    /// Most encoded bytes the outbox holds before publishes are answered 507.
    #[arg(long, env = "WARREN_MAX_OUTBOX_BYTES", default_value_t = 1 << 30)]
    pub max_outbox_bytes: u64,

    /// Largest accepted message body, in bytes (larger: 413).
    #[arg(long, env = "WARREN_MAX_MESSAGE_BYTES", default_value_t = 4 << 20)]
    pub max_message_bytes: usize,

    /// Largest accepted batch request body, in bytes (larger: 413).
    #[arg(long, env = "WARREN_MAX_BATCH_BYTES", default_value_t = 32 << 20)]
    pub max_batch_bytes: usize,

    /// Most messages in one batch request.
    #[arg(long, env = "WARREN_MAX_BATCH_MESSAGES", default_value_t = 10_000)]
    pub max_batch_messages: usize,

    /// Most messages published and awaiting a broker confirm at once.
    #[arg(long, env = "WARREN_CONFIRM_WINDOW", default_value_t = 1000)]
    pub confirm_window: usize,

    /// A confirm not received within this time marks the connection dead.
    #[arg(long, env = "WARREN_CONFIRM_TIMEOUT", value_parser = duration, default_value = "30s")]
    pub confirm_timeout: Duration,

    /// AMQP heartbeat interval (a silent peer is detected after about two).
    #[arg(long, env = "WARREN_HEARTBEAT", value_parser = duration, default_value = "5s")]
    pub heartbeat: Duration,

    /// Time allowed for establishing a broker connection.
    #[arg(long, env = "WARREN_CONNECT_TIMEOUT", value_parser = duration, default_value = "10s")]
    pub connect_timeout: Duration,

    /// First delay before reconnecting; doubles up to --reconnect-max.
    #[arg(long, env = "WARREN_RECONNECT_INITIAL", value_parser = duration, default_value = "200ms")]
    pub reconnect_initial: Duration,

    /// Longest delay between reconnection attempts.
    #[arg(long, env = "WARREN_RECONNECT_MAX", value_parser = duration, default_value = "5s")]
    pub reconnect_max: Duration,

    /// First delay before resending a message the broker refused; doubles up
    /// to --retry-max, with jitter.
    #[arg(long, env = "WARREN_RETRY_INITIAL", value_parser = duration, default_value = "1s")]
    pub retry_initial: Duration,

    /// Longest delay between attempts for one refused message.
    #[arg(long, env = "WARREN_RETRY_MAX", value_parser = duration, default_value = "60s")]
    pub retry_max: Duration,

    /// A message refused by the broker for this long moves to the local
    /// dead-letter area (kept on disk, listed by GET /v1/outbox/dead).
    #[arg(long, env = "WARREN_DEAD_LETTER_AFTER", value_parser = duration, default_value = "10m")]
    pub dead_letter_after: Duration,

    /// On SIGTERM, time allowed to drain the outbox before exiting (what is
    /// left stays on disk for the next start).
    #[arg(long, env = "WARREN_DRAIN_TIMEOUT", value_parser = duration, default_value = "20s")]
    pub drain_timeout: Duration,

    /// PEM file of CA certificates trusted for amqps:// (default: the
    /// system's roots).
    #[arg(long, env = "WARREN_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,

    /// Memory sled may use as cache, in bytes.
    #[arg(long, env = "WARREN_OUTBOX_CACHE_BYTES", default_value_t = 16 << 20)]
    pub outbox_cache_bytes: u64,

    /// Consumer configuration file (YAML or JSON): the queues to consume,
    /// the app's delivery URL and the retry policies. Without it the
    /// sidecar only publishes.
    #[arg(long, env = "WARREN_CONFIG")]
    pub config: Option<PathBuf>,

    /// The consumer configuration itself, for embedding (takes precedence
    /// over `--config`).
    #[arg(skip)]
    pub consumer: Option<SidecarConfig>,

    /// Log format.
    #[arg(long, env = "WARREN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl Config {
    /// Checks what clap cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        let scheme = self.broker_url.split("://").next().unwrap_or_default();
        anyhow::ensure!(
            matches!(scheme, "amqp" | "amqps") && self.broker_url.contains("://"),
            "--broker-url must start with amqp:// or amqps://"
        );
        anyhow::ensure!(
            self.confirm_window > 0,
            "--confirm-window must be at least 1"
        );
        anyhow::ensure!(
            self.max_batch_messages > 0,
            "--max-batch-messages must be at least 1"
        );
        anyhow::ensure!(
            self.reconnect_max >= self.reconnect_initial && !self.reconnect_initial.is_zero(),
            "--reconnect-max must be >= --reconnect-initial > 0"
        );
        anyhow::ensure!(
            self.retry_max >= self.retry_initial && !self.retry_initial.is_zero(),
            "--retry-max must be >= --retry-initial > 0"
        );
        Ok(())
    }

    /// The consumer configuration: `consumer` if set, else the `--config`
    /// file, else none. Checked as a whole.
    pub fn consumer_config(&self) -> anyhow::Result<Option<SidecarConfig>> {
        let config = match (&self.consumer, &self.config) {
            (Some(c), _) => c.clone(),
            (None, Some(path)) => load_consumer_config(path)?,
            (None, None) => return Ok(None),
        };
        config.validate().map_err(|e| match &self.config {
            Some(path) if self.consumer.is_none() => {
                anyhow::anyhow!("invalid consumer config {}: {e}", path.display())
            }
            _ => anyhow::anyhow!("invalid consumer config: {e}"),
        })?;
        Ok((!config.queues.is_empty()).then_some(config))
    }

    /// A configuration for tests and embedding: loopback listeners on
    /// ephemeral ports and defaults for everything else.
    pub fn for_local(broker_url: &str, data_dir: PathBuf) -> Self {
        let mut c = Config::parse_from([
            "warren-sidecar",
            "--broker-url",
            broker_url,
            "--data-dir",
            &data_dir.to_string_lossy(),
        ]);
        c.listen = "127.0.0.1:0".parse().unwrap();
        c.admin_listen = "127.0.0.1:0".parse().unwrap();
        c
    }
}

/// Reads a consumer configuration file (YAML, of which JSON is a subset).
pub fn load_consumer_config(path: &std::path::Path) -> anyhow::Result<SidecarConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read consumer config {}: {e}", path.display()))?;
    serde_yaml_ng::from_str(&text)
        .map_err(|e| anyhow::anyhow!("cannot parse consumer config {}: {e}", path.display()))
}

/// The broker URL with any password replaced, for logs and status.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<invalid url>".into();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_url("amqp://app:s3cr%40t@rabbit:5672/%2f"),
            "amqp://app:***@rabbit:5672/%2f"
        );
        assert_eq!(redact_url("amqp://rabbit"), "amqp://rabbit");
        assert_eq!(redact_url("garbage"), "<invalid url>");
    }

    #[test]
    fn env_and_flags_parse() {
        let c = Config::try_parse_from([
            "warren-sidecar",
            "--broker-url=amqps://u:p@h/%2f",
            "--data-dir=/tmp/x",
            "--durability=buffered",
            "--dead-letter-after=90s",
        ])
        .unwrap();
        assert_eq!(c.durability, Durability::Buffered);
        assert_eq!(c.dead_letter_after, Duration::from_secs(90));
        assert_eq!(c.listen, "127.0.0.1:7171".parse().unwrap());
        c.validate().unwrap();
        let bad = Config {
            broker_url: "http://x".into(),
            ..c
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn consumer_config_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::for_local("amqp://localhost", dir.path().into());
        assert!(c.consumer_config().unwrap().is_none());

        let path = dir.path().join("warren.yaml");
        std::fs::write(
            &path,
            "app:\n  url: http://127.0.0.1:8080/m\n  timeout: 5s\nqueues:\n  - name: orders\n    retryPolicy:\n      maxRetries: 2\n      backoff: {initial: 500ms}\n",
        )
        .unwrap();
        c.config = Some(path.clone());
        let cfg = c.consumer_config().unwrap().unwrap();
        assert_eq!(cfg.queues[0].name, "orders");
        assert_eq!(cfg.queues[0].retry_policy.max_retries, 2);
        assert_eq!(cfg.app.unwrap().timeout.0, Duration::from_secs(5));

        std::fs::write(
            &path,
            "app: {url: http://x/}\nqueues: [{name: q, prefetch: 0}]\n",
        )
        .unwrap();
        let e = c.consumer_config().unwrap_err().to_string();
        assert!(e.contains("warren.yaml") && e.contains("prefetch"), "{e}");

        std::fs::write(&path, "queues: [{nme: q}]\n").unwrap();
        let e = c.consumer_config().unwrap_err().to_string();
        assert!(e.contains("cannot parse") && e.contains("nme"), "{e}");

        c.config = Some(dir.path().join("missing.yaml"));
        let e = c.consumer_config().unwrap_err().to_string();
        assert!(e.contains("cannot read consumer config"), "{e}");
    }
}
