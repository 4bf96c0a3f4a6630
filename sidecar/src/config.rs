//! Command-line configuration; every flag has a `WARREN_*` environment
//! fallback so the operator can render it into a pod spec.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use warren_crds::sidecar_config::SidecarConfig;

use crate::outbox::{Durability, Engine};

/// Flags take durations in the same grammar as manifests and config files
/// (`500ms`, `4s`, `1m30s`).
fn duration(s: &str) -> Result<Duration, String> {
    s.parse::<warren_crds::duration::HumanDuration>()
        .map(Duration::from)
        .map_err(|e| e.to_string())
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
#[derive(Clone, Parser)]
#[command(name = "warren-sidecar", version, about)]
pub struct Config {
    /// Broker URL, amqp:// or amqps:// (credentials may be embedded). For a
    /// cluster, several URLs separated by commas, or one URL with several
    /// hosts (`amqp://u:p@rabbit-0,rabbit-1,rabbit-2/vhost`): they are tried
    /// in turn. Without it the URL comes from `--broker-uri`, else
    /// `--broker-connection-string`, else `--broker-host` and its fellows
    /// (the keys of a RabbitMQ Cluster Operator Secret).
    #[arg(
        long,
        env = "WARREN_BROKER_URL",
        hide_env_values = true,
        default_value = ""
    )]
    pub broker_url: String,

    /// Broker URL from a Secret's `uri` key.
    #[arg(long, env = "WARREN_BROKER_URI", hide_env_values = true)]
    pub broker_uri: Option<String>,

    /// Broker URL from a Secret's `connection_string` key.
    #[arg(long, env = "WARREN_BROKER_CONNECTION_STRING", hide_env_values = true)]
    pub broker_connection_string: Option<String>,

    /// Broker host, when no URL is given.
    #[arg(long, env = "WARREN_BROKER_HOST")]
    pub broker_host: Option<String>,

    /// Broker port, when no URL is given (default 5672, or 5671 with TLS).
    #[arg(long, env = "WARREN_BROKER_PORT")]
    pub broker_port: Option<u16>,

    /// Broker user name, when no URL is given.
    #[arg(long, env = "WARREN_BROKER_USERNAME", hide_env_values = true)]
    pub broker_username: Option<String>,

    /// Broker password, when no URL is given.
    #[arg(long, env = "WARREN_BROKER_PASSWORD", hide_env_values = true)]
    pub broker_password: Option<String>,

    /// Virtual host; replaces the URL's when set.
    #[arg(long, env = "WARREN_BROKER_VHOST")]
    pub broker_vhost: Option<String>,

    /// Use amqps:// when the URL is built from `--broker-host` (also implied
    /// by port 5671).
    #[arg(long, env = "WARREN_BROKER_TLS")]
    pub broker_tls: bool,

    /// Directory of the durable outbox (a persistent volume in Kubernetes).
    #[arg(long, env = "WARREN_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Address of the app-facing HTTP API.
    #[arg(long, env = "WARREN_LISTEN", default_value = "127.0.0.1:7171")]
    pub listen: SocketAddr,

    /// Address of the admin endpoints (/healthz, /readyz, /metrics).
    #[arg(long, env = "WARREN_ADMIN_LISTEN", default_value = "0.0.0.0:7172")]
    pub admin_listen: SocketAddr,

    /// When a publish is answered: after the fdatasync covering it
    /// (`flush`), or once it has been written to the operating system
    /// (`buffered`: survives a sidecar crash, not a host crash).
    #[arg(long, env = "WARREN_DURABILITY", value_enum, default_value = "flush")]
    pub durability: Durability,

    /// Storage engine of the outbox: the append-only segment log
    /// (`segment`), `sled` or `fjall`. A sled outbox found in the data
    /// directory is moved into the segment log on start.
    #[arg(
        long,
        env = "WARREN_OUTBOX_ENGINE",
        value_enum,
        default_value = "segment"
    )]
    pub outbox_engine: Engine,

    /// Size at which an outbox segment file is sealed and a new one started.
    #[arg(long, env = "WARREN_OUTBOX_SEGMENT_BYTES", default_value_t = 64 << 20)]
    pub outbox_segment_bytes: u64,

    /// Background flush interval in buffered mode.
    #[arg(long, env = "WARREN_FLUSH_INTERVAL", value_parser = duration, default_value = "100ms")]
    pub flush_interval: Duration,

    /// Most messages the outbox holds (pending and dead-lettered) before
    /// publishes are answered 507.
    #[arg(long, env = "WARREN_MAX_OUTBOX_MESSAGES", default_value_t = 1_000_000)]
    pub max_outbox_messages: u64,

    /// Most encoded bytes the outbox holds before publishes are answered
    /// 507. Unset: what the data dir's filesystem can hold besides the
    /// engine's own bytes, at most 1 GiB (see `docs/outbox-format.md`).
    #[arg(long, env = "WARREN_MAX_OUTBOX_BYTES")]
    pub max_outbox_bytes: Option<u64>,

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
    /// dead-letter area (kept on disk, listed by GET /v1/outbox/dead,
    /// replayed by POST /v1/outbox/dead/retry).
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

    /// Memory the sled or fjall engine may use as cache, in bytes (not
    /// used by the segment log).
    #[arg(long, env = "WARREN_OUTBOX_CACHE_BYTES", default_value_t = 16 << 20)]
    pub outbox_cache_bytes: u64,

    /// Consumer configuration file (YAML or JSON): the queues to consume,
    /// the app's delivery URL and the retry policies. Without it the
    /// sidecar only publishes.
    #[arg(long, env = "WARREN_CONFIG")]
    pub config: Option<PathBuf>,

    /// The consumer configuration as JSON in the environment (how the
    /// injection webhook renders it; takes precedence over `--config`).
    #[arg(long, env = "WARREN_CONFIG_JSON", hide_env_values = true)]
    pub config_json: Option<String>,

    /// Drain mode: forward what the outbox holds, accept no publishes and
    /// consume nothing, and exit once the outbox is empty (status 0), or
    /// with status 3 when messages refused by the broker remain in its
    /// dead-letter area. Used by the operator's drain Jobs.
    #[arg(long, env = "WARREN_DRAIN")]
    pub drain: bool,

    /// PostgreSQL URL of the app's database: relay committed rows of its
    /// outbox table (`--relay-table`) into the local outbox. Either a URL
    /// (`postgres://user:password@host:5432/db`, several hosts allowed:
    /// `host=a,b` fails over) or a libpq key=value string.
    #[arg(long, env = "WARREN_RELAY_POSTGRES", hide_env_values = true)]
    pub relay_postgres: Option<String>,

    /// The app's outbox table (`schema.table` or `table`); the DDL ships as
    /// `sidecar/sql/warren_outbox.sql`.
    #[arg(long, env = "WARREN_RELAY_TABLE", default_value = "warren_outbox")]
    pub relay_table: String,

    /// Where rows that cannot be relayed go, with their reason (default:
    /// the table's name with `_dead` appended).
    #[arg(long, env = "WARREN_RELAY_DEAD_TABLE")]
    pub relay_dead_table: Option<String>,

    /// Relay rows with the same value in this column in order (e.g. an
    /// aggregate id): per key, one row at a time, each broker-confirmed
    /// before the next leaves the table. Without it rows leave in batches,
    /// in no particular order.
    #[arg(long, env = "WARREN_RELAY_ORDER_BY")]
    pub relay_order_by: Option<String>,

    /// Most rows claimed per relay transaction.
    #[arg(long, env = "WARREN_RELAY_BATCH", default_value_t = 256)]
    pub relay_batch: u32,

    /// How the relay learns of new rows.
    #[arg(
        long,
        env = "WARREN_RELAY_WAKEUP",
        value_enum,
        default_value = "listen"
    )]
    pub relay_wakeup: crate::relay::Wakeup,

    /// The NOTIFY channel the table's trigger signals.
    #[arg(long, env = "WARREN_RELAY_CHANNEL", default_value = "warren_outbox")]
    pub relay_channel: String,

    /// Longest wait between two looks at the table (the fallback for lost
    /// notifications, and the only wake-up with `--relay-wakeup poll`).
    #[arg(long, env = "WARREN_RELAY_POLL_INTERVAL", value_parser = duration, default_value = "1s")]
    pub relay_poll_interval: Duration,

    /// PEM file of CA certificates trusted for TLS to the relay's database
    /// (default: the system's roots). TLS follows the URL's `sslmode`.
    #[arg(long, env = "WARREN_RELAY_TLS_CA_FILE")]
    pub relay_tls_ca_file: Option<PathBuf>,

    /// The consumer configuration itself, for embedding (takes precedence
    /// over `--config-json` and `--config`).
    #[arg(skip)]
    pub consumer: Option<SidecarConfig>,

    /// Log format.
    #[arg(long, env = "WARREN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Every field, with the broker URLs and the relay's connection string
/// redacted ([`redact_url`], [`crate::relay::redact_pg`]) and the password
/// and consumer JSON hidden.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field(
                "broker_url",
                &crate::broker::redact_setting(&self.broker_url),
            )
            .field("broker_uri", &self.broker_uri.as_deref().map(redact_url))
            .field(
                "broker_connection_string",
                &self.broker_connection_string.as_deref().map(redact_url),
            )
            .field("broker_host", &self.broker_host)
            .field("broker_port", &self.broker_port)
            .field("broker_username", &self.broker_username)
            .field(
                "broker_password",
                &self.broker_password.as_ref().map(|_| REDACTED),
            )
            .field("broker_vhost", &self.broker_vhost)
            .field("broker_tls", &self.broker_tls)
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("durability", &self.durability)
            .field("outbox_engine", &self.outbox_engine)
            .field("outbox_segment_bytes", &self.outbox_segment_bytes)
            .field("flush_interval", &self.flush_interval)
            .field("max_outbox_messages", &self.max_outbox_messages)
            .field("max_outbox_bytes", &self.max_outbox_bytes)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("max_batch_messages", &self.max_batch_messages)
            .field("confirm_window", &self.confirm_window)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_initial", &self.reconnect_initial)
            .field("reconnect_max", &self.reconnect_max)
            .field("retry_initial", &self.retry_initial)
            .field("retry_max", &self.retry_max)
            .field("dead_letter_after", &self.dead_letter_after)
            .field("drain_timeout", &self.drain_timeout)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("outbox_cache_bytes", &self.outbox_cache_bytes)
            .field("config", &self.config)
            .field(
                "config_json",
                &self
                    .config_json
                    .as_ref()
                    .map(|_| "<consumer configuration>"),
            )
            .field("drain", &self.drain)
            .field(
                "relay_postgres",
                &self.relay_postgres.as_deref().map(crate::relay::redact_pg),
            )
            .field("relay_table", &self.relay_table)
            .field("relay_dead_table", &self.relay_dead_table)
            .field("relay_order_by", &self.relay_order_by)
            .field("relay_batch", &self.relay_batch)
            .field("relay_wakeup", &self.relay_wakeup)
            .field("relay_channel", &self.relay_channel)
            .field("relay_poll_interval", &self.relay_poll_interval)
            .field("relay_tls_ca_file", &self.relay_tls_ca_file)
            .field("consumer", &self.consumer)
            .field("log_format", &self.log_format)
            .finish()
    }
}

impl Config {
    /// Checks what clap cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.broker_url.is_empty(),
            "no broker: give --broker-url (WARREN_BROKER_URL), --broker-uri, \
             --broker-connection-string or --broker-host"
        );
        crate::broker::parse_urls(&self.broker_url)
            .map_err(|e| anyhow::anyhow!("--broker-url: {e}"))?;
        anyhow::ensure!(
            self.confirm_window > 0,
            "--confirm-window must be at least 1"
        );
        anyhow::ensure!(
            self.outbox_segment_bytes >= 1 << 20,
            "--outbox-segment-bytes must be at least 1 MiB"
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
        if self.relay_postgres.is_some() {
            anyhow::ensure!(
                (1..=10_000).contains(&self.relay_batch),
                "--relay-batch must be between 1 and 10000"
            );
            anyhow::ensure!(
                !self.relay_poll_interval.is_zero(),
                "--relay-poll-interval must be > 0"
            );
            self.relay_settings()?;
        }
        Ok(())
    }

    /// The relay's settings, when `--relay-postgres` is given.
    pub fn relay_settings(&self) -> anyhow::Result<Option<crate::relay::RelaySettings>> {
        let Some(url) = self.relay_postgres.as_deref().map(str::trim) else {
            return Ok(None);
        };
        if url.is_empty() || self.drain {
            // An optional secretKeyRef of an absent key renders as empty;
            // a draining sidecar takes nothing new.
            return Ok(None);
        }
        let settings = crate::relay::RelaySettings::new(
            url,
            &self.relay_table,
            self.relay_dead_table.as_deref(),
            self.relay_order_by.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("invalid relay settings: {e}"))?;
        Ok(Some(crate::relay::RelaySettings {
            batch: self.relay_batch,
            wakeup: self.relay_wakeup,
            channel: self.relay_channel.clone(),
            poll_interval: self.relay_poll_interval,
            reconnect_initial: self.reconnect_initial,
            reconnect_max: self.reconnect_max,
            max_message_bytes: self.max_message_bytes,
            tls_ca_pem: match &self.relay_tls_ca_file {
                Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read --relay-tls-ca-file {}: {e}", path.display())
                })?),
                None => None,
            },
            ..settings
        }))
    }

    /// Fills `broker_url` from the other broker flags when it is empty:
    /// `--broker-uri`, else `--broker-connection-string`, else a URL built
    /// from host, port, user name and password. `--broker-vhost` replaces
    /// the URL's virtual host.
    pub fn resolve_broker_url(&mut self) -> anyhow::Result<()> {
        fn nonempty(v: &Option<String>) -> Option<&str> {
            v.as_deref().map(str::trim).filter(|v| !v.is_empty())
        }
        let mut url = if !self.broker_url.trim().is_empty() {
            self.broker_url.trim().to_owned()
        } else if let Some(uri) = nonempty(&self.broker_uri) {
            uri.to_owned()
        } else if let Some(uri) = nonempty(&self.broker_connection_string) {
            uri.to_owned()
        } else if let Some(host) = nonempty(&self.broker_host) {
            let tls = self.broker_tls || self.broker_port == Some(5671);
            let scheme = if tls { "amqps" } else { "amqp" };
            let port = self.broker_port.unwrap_or(if tls { 5671 } else { 5672 });
            let userinfo = match (nonempty(&self.broker_username), &self.broker_password) {
                (Some(user), Some(pass)) => {
                    format!("{}:{}@", encode_component(user), encode_component(pass))
                }
                (Some(user), None) => format!("{}@", encode_component(user)),
                (None, _) => String::new(),
            };
            // Several hosts (a cluster's nodes) each get the port.
            let hosts: Vec<String> = host
                .split(',')
                .map(str::trim)
                .map(|h| {
                    if h.contains(':') && !h.ends_with(']') {
                        h.to_owned()
                    } else {
                        format!("{h}:{port}")
                    }
                })
                .collect();
            format!("{scheme}://{userinfo}{}", hosts.join(","))
        } else {
            return Ok(());
        };
        if let Some(vhost) = &self.broker_vhost {
            url = match crate::broker::parse_urls(&url) {
                Ok(urls) => urls
                    .iter()
                    .map(|u| with_vhost(u, vhost))
                    .collect::<Vec<_>>()
                    .join(","),
                // `validate` says what is wrong with it.
                Err(_) => with_vhost(&url, vhost),
            };
        }
        self.broker_url = url;
        Ok(())
    }

    /// The consumer configuration: `consumer` if set, else
    /// `--config-json`, else the `--config` file, else none. Checked as a
    /// whole. Drain mode consumes nothing.
    pub fn consumer_config(&self) -> anyhow::Result<Option<SidecarConfig>> {
        if self.drain {
            return Ok(None);
        }
        let (config, source) = match (&self.consumer, &self.config_json, &self.config) {
            (Some(c), _, _) => (c.clone(), None),
            (None, Some(json), _) => (
                serde_json::from_str(json)
                    .map_err(|e| anyhow::anyhow!("cannot parse WARREN_CONFIG_JSON: {e}"))?,
                Some("WARREN_CONFIG_JSON".to_owned()),
            ),
            (None, None, Some(path)) => (
                load_consumer_config(path)?,
                Some(path.display().to_string()),
            ),
            (None, None, None) => return Ok(None),
        };
        config.validate().map_err(|e| match source {
            Some(source) => anyhow::anyhow!("invalid consumer config {source}: {e}"),
            None => anyhow::anyhow!("invalid consumer config: {e}"),
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

/// Percent-encodes a URL user name, password or virtual host.
fn encode_component(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `url` with its virtual host (the path) replaced by `vhost`; the query
/// stays.
fn with_vhost(url: &str, vhost: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (scheme, rest) = base.split_once("://").unwrap_or(("", base));
    let authority = rest.split('/').next().unwrap_or_default();
    let mut out = format!("{scheme}://{authority}/{}", encode_component(vhost));
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// What stands for a password in logs, status and `Debug` output.
pub const REDACTED: &str = "***";

/// A URL (amqp://, amqps://, postgres://, ...) with its password replaced,
/// for logs and status: the URL is parsed with the `url` crate and the
/// password of its user info and any `password` query parameter are
/// replaced. A URL that does not parse (a password with an unencoded `/`,
/// `?` or `#`, for example) is not shown at all, nor is one whose path,
/// query or fragment holds an `@` (a password's tail after an unencoded
/// `/`).
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url.trim()) else {
        return "<invalid url>".into();
    };
    if parsed.cannot_be_a_base() {
        return "<invalid url>".into();
    }
    let tail = [
        parsed.path(),
        parsed.query().unwrap_or_default(),
        parsed.fragment().unwrap_or_default(),
    ];
    if tail.iter().any(|part| part.contains('@')) {
        return format!("{}://{REDACTED}", parsed.scheme());
    }
    if parsed.password().is_some() && parsed.set_password(Some(REDACTED)).is_err() {
        return format!("{}://{REDACTED}", parsed.scheme());
    }
    if parsed
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"))
    {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    REDACTED.to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.into()
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
    fn flags_take_durations_in_the_manifest_grammar() {
        let parse = |d: &str| {
            Config::try_parse_from([
                "warren-sidecar",
                "--data-dir=/tmp/x",
                &format!("--drain-timeout={d}"),
            ])
            .map(|c| c.drain_timeout)
        };
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        // What a ReliableQueue or RetryPolicy would refuse, a flag refuses.
        for other in ["1min", "2 hours", "1d", "90", "5us"] {
            let e = parse(other).unwrap_err().to_string();
            assert!(e.contains("expected a number with a unit"), "{other}: {e}");
        }
    }

    fn parts(args: &[&str]) -> Config {
        let mut argv = vec!["warren-sidecar", "--data-dir=/tmp/x"];
        argv.extend_from_slice(args);
        let mut c = Config::try_parse_from(argv).unwrap();
        c.resolve_broker_url().unwrap();
        c
    }

    #[test]
    fn broker_url_is_built_from_secret_keys() {
        // A Cluster Operator Secret: host, port, user name and password;
        // characters that mean something in a URL are encoded.
        let c = parts(&[
            "--broker-host=rabbit.ns.svc",
            "--broker-port=5672",
            "--broker-username=app",
            "--broker-password=p@ss/w:rd",
            "--broker-vhost=/",
        ]);
        assert_eq!(
            c.broker_url,
            "amqp://app:p%40ss%2Fw%3Ard@rabbit.ns.svc:5672/%2F"
        );
        c.validate().unwrap();
        // Port 5671 means TLS.
        let c = parts(&[
            "--broker-host=r",
            "--broker-port=5671",
            "--broker-username=u",
            "--broker-password=p",
        ]);
        assert_eq!(c.broker_url, "amqps://u:p@r:5671");
        // A `uri` key wins over host keys, and the vhost replaces its own.
        let c = parts(&[
            "--broker-uri=amqp://u:p@h:5672/%2f?heartbeat=5",
            "--broker-host=ignored",
            "--broker-vhost=orders",
        ]);
        assert_eq!(c.broker_url, "amqp://u:p@h:5672/orders?heartbeat=5");
        let c = parts(&["--broker-connection-string=amqp://u:p@h"]);
        assert_eq!(c.broker_url, "amqp://u:p@h");
        // A cluster's nodes: each host gets the port, each URL the vhost.
        let c = parts(&[
            "--broker-host=r0, r1,r2:5673",
            "--broker-port=5672",
            "--broker-username=u",
            "--broker-password=p",
            "--broker-vhost=orders",
        ]);
        assert_eq!(
            crate::broker::parse_urls(&c.broker_url).unwrap(),
            [
                "amqp://u:p@r0:5672/orders",
                "amqp://u:p@r1:5672/orders",
                "amqp://u:p@r2:5673/orders"
            ]
        );
        let c = parts(&[
            "--broker-url=amqp://u:p@a:1/x,amqp://v:q@b:2/y",
            "--broker-vhost=orders",
        ]);
        assert_eq!(c.broker_url, "amqp://u:p@a:1/orders,amqp://v:q@b:2/orders");
        // An explicit --broker-url wins over everything.
        let c = parts(&["--broker-url=amqp://x", "--broker-uri=amqp://y"]);
        assert_eq!(c.broker_url, "amqp://x");
        // Empty values (optional secretKeyRefs of absent keys) are skipped.
        let c = parts(&[
            "--broker-uri=",
            "--broker-host=h",
            "--broker-username=u",
            "--broker-password=p",
        ]);
        assert_eq!(c.broker_url, "amqp://u:p@h:5672");
        // Nothing at all is a clear error.
        let e = parts(&[]).validate().unwrap_err().to_string();
        assert!(e.contains("no broker"), "{e}");
    }

    #[test]
    fn consumer_config_comes_from_json_in_the_environment() {
        let mut c = Config::for_local("amqp://localhost", "/tmp/x".into());
        c.config_json =
            Some(r#"{"app":{"url":"http://127.0.0.1:8080/"},"queues":[{"name":"orders"}]}"#.into());
        let cfg = c.consumer_config().unwrap().unwrap();
        assert_eq!(cfg.queues[0].name, "orders");
        c.drain = true;
        assert!(
            c.consumer_config().unwrap().is_none(),
            "drain mode consumes nothing"
        );
        c.drain = false;
        c.config_json = Some(
            r#"{"app":{"url":"http://127.0.0.1:8080/"},"queues":[{"name":"orders","prefetch":0}]}"#
                .into(),
        );
        let e = c.consumer_config().unwrap_err().to_string();
        assert!(
            e.contains("WARREN_CONFIG_JSON") && e.contains("prefetch"),
            "{e}"
        );
        c.config_json = Some("{".into());
        let e = c.consumer_config().unwrap_err().to_string();
        assert!(e.contains("cannot parse WARREN_CONFIG_JSON"), "{e}");
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
