//! The transactional outbox relay: moves rows the app committed into its
//! own PostgreSQL outbox table into the sidecar's local outbox.
//!
//! One round is one database transaction:
//!
//! 1. claim up to `--relay-batch` committed rows with
//!    `SELECT … ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED` — never an
//!    `id > last_id` cursor, which skips rows of transactions that commit
//!    out of id order; rows another relay holds are skipped, not waited for,
//!    so several sidecars on one table share the work;
//! 2. append the good rows to the local outbox (durable per its mode);
//! 3. copy rows that cannot be relayed to the dead-letter table with their
//!    reason, so the rows behind them flow;
//! 4. delete every claimed row and commit.
//!
//! A crash or a lost connection between 2 and 4 rolls the transaction back:
//! the rows stay and are relayed again with the same `message_id` — a
//! duplicate, never a loss.
//!
//! With `--relay-order-by COLUMN`, only the oldest row (lowest id) of each
//! key is a candidate, and the round waits until the broker has confirmed
//! what it appended before it commits. While a key's oldest row is locked
//! no relay can claim the key's next row, so per key, rows reach the broker
//! in id order, one at a time.
//!
//! Wake-ups come from `LISTEN` on the trigger's channel, with polling every
//! `--relay-poll-interval` as the fallback (notifications are lost while
//! disconnected). Connection, authentication and query errors are reported
//! (`GET /v1/relay`, metrics) and retried with backoff; nothing here stops
//! the sidecar.

pub mod row;
pub mod sql;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;
use warren_crds::error_chain::error_chain;

use crate::metrics::{Metrics, RelayErrorKind};
use crate::outbox::{Outbox, OutboxError, now_ms};

use self::row::RawRow;
use self::sql::{NameError, Statements, quote_column, quote_name};

/// How the relay learns of new rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Wakeup {
    /// `LISTEN` on the trigger's channel, polling as the fallback.
    Listen,
    /// Polling only (for poolers such as PgBouncer in transaction mode,
    /// which do not carry notifications).
    Poll,
}

/// What the relay needs to know.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Connection string (URL or key=value); holds credentials, never logged.
    pub url: SecretString,
    /// The table as configured, for reports.
    pub table: String,
    /// The dead-letter table as configured, for reports.
    pub dead_table: String,
    /// The ordering column as configured, if any.
    pub order_by: Option<String>,
    /// The statements built from the quoted names.
    pub statements: Statements,
    /// Most rows per round.
    pub batch: u32,
    /// How new rows are noticed.
    pub wakeup: Wakeup,
    /// NOTIFY channel.
    pub channel: String,
    /// Longest wait between two rounds.
    pub poll_interval: Duration,
    /// First delay before reconnecting; doubles up to `reconnect_max`.
    pub reconnect_initial: Duration,
    /// Longest delay between reconnection attempts.
    pub reconnect_max: Duration,
    /// Largest payload relayed; larger rows are dead-lettered.
    pub max_message_bytes: usize,
    /// PEM CA certificates trusted for TLS to the database (default: the
    /// system's roots).
    pub tls_ca_pem: Option<String>,
}

impl RelaySettings {
    /// Settings for `url` and the given names, with defaults for the rest.
    pub fn new(
        url: &str,
        table: &str,
        dead_table: Option<&str>,
        order_by: Option<&str>,
    ) -> Result<Self, NameError> {
        let dead_table = dead_table
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{table}_dead"));
        let quoted_table = quote_name("--relay-table", table)?;
        let quoted_dead = quote_name("--relay-dead-table", &dead_table)?;
        let quoted_key = order_by
            .map(|k| quote_column("--relay-order-by", k))
            .transpose()?;
        Ok(Self {
            url: url.into(),
            table: table.to_owned(),
            dead_table,
            order_by: order_by.map(str::to_owned),
            statements: Statements::new(&quoted_table, &quoted_dead, quoted_key.as_deref()),
            batch: 256,
            wakeup: Wakeup::Listen,
            channel: "warren_outbox".into(),
            poll_interval: Duration::from_secs(1),
            reconnect_initial: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(5),
            max_message_bytes: 1 << 20,
            tls_ca_pem: None,
        })
    }
}

/// Why a relay round or connection failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RelayError {
    /// The database could not be reached or the connection broke.
    #[error("cannot reach the database: {0}")]
    Connect(String),
    /// The database refused the credentials.
    #[error("the database refused authentication: {0}")]
    Auth(String),
    /// A statement failed (missing table or column, permissions, ...).
    #[error("query failed: {0}")]
    Query(String),
    /// The local outbox refused the rows (full or failed storage); they
    /// stay in the table.
    #[error("local outbox refused the rows: {0}")]
    Outbox(#[from] OutboxError),
}

impl RelayError {
    /// The fixed metric label of the error.
    pub fn kind(&self) -> RelayErrorKind {
        match self {
            RelayError::Connect(_) => RelayErrorKind::Connect,
            RelayError::Auth(_) => RelayErrorKind::Auth,
            RelayError::Query(_) => RelayErrorKind::Query,
            RelayError::Outbox(_) => RelayErrorKind::Outbox,
        }
    }

    /// Classifies a client error: credentials, connectivity or statement.
    fn from_pg(e: tokio_postgres::Error, connecting: bool) -> Self {
        let text = pg_text(&e);
        match e.code() {
            Some(c)
                if *c == SqlState::INVALID_PASSWORD
                    || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
            {
                RelayError::Auth(text)
            }
            // The server going away mid-session: shutdown, crash recovery,
            // an administrator's kill.
            Some(c)
                if *c == SqlState::ADMIN_SHUTDOWN
                    || *c == SqlState::CRASH_SHUTDOWN
                    || *c == SqlState::CANNOT_CONNECT_NOW
                    || c.code().starts_with("08") =>
            {
                RelayError::Connect(text)
            }
            Some(_) => RelayError::Query(text),
            None if connecting || e.is_closed() || e.as_db_error().is_none() => {
                RelayError::Connect(text)
            }
            None => RelayError::Query(text),
        }
    }
}

/// The TLS connector: rustls with the given CA bundle, or the system's
/// roots. The server's certificate and name are always verified; whether
/// TLS is used follows the URL's `sslmode` (`prefer` by default: TLS when
/// the server offers it, `require` insists, `disable` never).
fn tls_connector(
    ca_pem: Option<&str>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, RelayError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert =
                    cert.map_err(|e| RelayError::Connect(format!("invalid TLS CA bundle: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| RelayError::Connect(format!("invalid TLS CA certificate: {e}")))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // One unusable system certificate must not disable TLS.
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| RelayError::Connect(format!("TLS setup failed: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The server's own words for an error, with its SQLSTATE, or the
/// client's error chain. Neither carries the connection string.
fn pg_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    error_chain(e)
}

/// The relay's state, as `GET /v1/relay` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayState {
    /// Connecting to the database.
    Connecting,
    /// Connected and relaying.
    Connected,
    /// Not connected; waiting before the next attempt.
    Disconnected,
    /// Stopped for shutdown.
    Stopped,
}

/// A snapshot of the relay for `GET /v1/relay`.
#[derive(Debug, Clone, Serialize)]
pub struct RelaySnapshot {
    /// Current state.
    pub state: RelayState,
    /// The database, without its password.
    pub database: String,
    /// The app's outbox table.
    pub table: String,
    /// Where poison rows go.
    pub dead_table: String,
    /// The ordering column, when rows leave in order per key.
    pub order_by: Option<String>,
    /// How new rows are noticed.
    pub wakeup: Wakeup,
    /// Rows appended to the local outbox and deleted from the table
    /// (counting rows whose commit failed, which are relayed again).
    pub relayed: u64,
    /// Rows moved to the dead-letter table.
    pub dead_lettered: u64,
    /// Rounds that committed.
    pub rounds: u64,
    /// Errors since start.
    pub errors: u64,
    /// Age of the oldest row still in the table, when last looked at.
    pub oldest_row_age_ms: Option<u64>,
    /// Time from `created_at` to the local outbox of the last relayed row.
    pub last_lag_ms: Option<u64>,
    /// The last error, in the database's or network's own words.
    pub last_error: Option<String>,
    /// Its kind (`connect`, `auth`, `query`, `outbox`).
    pub last_error_kind: Option<RelayErrorKind>,
    /// When it happened, ms since the Unix epoch.
    pub last_error_at_ms: Option<u64>,
    /// Since when the current connection is up, ms since the Unix epoch.
    pub connected_since_ms: Option<u64>,
}

/// Shared handle on the relay's state.
#[derive(Clone)]
pub struct RelayStatus {
    inner: Arc<Mutex<RelaySnapshot>>,
}

impl RelayStatus {
    fn new(s: &RelaySettings) -> Self {
        Self {
            inner: Arc::new(Mutex::new(RelaySnapshot {
                state: RelayState::Connecting,
                database: redact_pg(s.url.expose_secret()),
                table: s.table.clone(),
                dead_table: s.dead_table.clone(),
                order_by: s.order_by.clone(),
                wakeup: s.wakeup,
                relayed: 0,
                dead_lettered: 0,
                rounds: 0,
                errors: 0,
                oldest_row_age_ms: None,
                last_lag_ms: None,
                last_error: None,
                last_error_kind: None,
                last_error_at_ms: None,
                connected_since_ms: None,
            })),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> RelaySnapshot {
        self.inner.lock().unwrap().clone()
    }

    fn update(&self, f: impl FnOnce(&mut RelaySnapshot)) {
        f(&mut self.inner.lock().unwrap());
    }
}

/// The connection string without its password. A URL is parsed with the
/// `url` crate ([`crate::config::redact_url`]); one it cannot parse (several
/// `host:port`s) is parsed by the PostgreSQL client and shown as user,
/// hosts and database only. A libpq key=value string is read by libpq's
/// rules (values in single quotes, backslash escapes) and its `password`
/// value replaced; one that cannot be read is not shown.
pub fn redact_pg(conn: &str) -> String {
    use crate::config::{REDACTED, redact_url};
    let conn = conn.trim();
    if conn.contains("://") {
        let redacted = redact_url(conn);
        if !redacted.starts_with('<') {
            return redacted;
        }
        return match conn.parse::<tokio_postgres::Config>() {
            Ok(c) => {
                let hosts: Vec<String> = c
                    .get_hosts()
                    .iter()
                    .zip(c.get_ports().iter().chain(std::iter::repeat(&5432)))
                    .map(|(h, p)| match h {
                        tokio_postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
                        #[cfg(unix)]
                        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                    })
                    .collect();
                let user = c.get_user().map(|u| format!("{u}@")).unwrap_or_default();
                let db = c.get_dbname().unwrap_or_default();
                format!("postgres://{user}{}/{db}", hosts.join(","))
            }
            Err(_) => redacted,
        };
    }
    match libpq_pairs(conn) {
        Some(pairs) => pairs
            .into_iter()
            .map(|(k, v)| {
                if k.eq_ignore_ascii_case("password") {
                    format!("{k}={REDACTED}")
                } else if !v.is_empty()
                    && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\')
                {
                    format!("{k}={v}")
                } else {
                    format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => "<invalid connection string>".into(),
    }
}

/// The `key=value` pairs of a libpq connection string: values bare up to
/// white space, or in single quotes with `\'` and `\\` escapes.
fn libpq_pairs(conn: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = conn.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') || key.is_empty() {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// The relay task.
pub struct Relay {
    settings: RelaySettings,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    status: RelayStatus,
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy)]
struct Round {
    /// Rows claimed.
    claimed: usize,
}

impl Relay {
    /// A relay from `settings` into `outbox`.
    pub fn new(settings: RelaySettings, outbox: Arc<Outbox>, metrics: Arc<Metrics>) -> Self {
        let status = RelayStatus::new(&settings);
        Self {
            settings,
            outbox,
            metrics,
            status,
        }
    }

    /// The status handle, for the HTTP API.
    pub fn status(&self) -> RelayStatus {
        self.status.clone()
    }

    fn failed(&self, e: &RelayError) {
        let kind = e.kind();
        self.metrics.relay_error(kind);
        let text = e.to_string();
        self.status.update(|s| {
            s.errors += 1;
            s.last_error = Some(text);
            s.last_error_kind = Some(kind);
            s.last_error_at_ms = Some(now_ms());
        });
    }

    /// Relays until `stop` is cancelled; reconnects after every failure.
    pub async fn run(self, stop: CancellationToken) {
        let mut delay = self.settings.reconnect_initial;
        tracing::info!(
            database = %redact_pg(self.settings.url.expose_secret()),
            table = %self.settings.table,
            order_by = ?self.settings.order_by,
            wakeup = ?self.settings.wakeup,
            "relay starting"
        );
        while !stop.is_cancelled() {
            self.status.update(|s| s.state = RelayState::Connecting);
            let started = Instant::now();
            let err = tokio::select! {
                e = self.session() => e,
                () = stop.cancelled() => break,
            };
            self.metrics.relay_connected.set(0);
            tracing::warn!(error = %err, kind = ?err.kind(), "relay interrupted; retrying");
            self.failed(&err);
            self.status.update(|s| {
                s.state = RelayState::Disconnected;
                s.connected_since_ms = None;
            });
            // A session that ran a while earns a fresh backoff.
            if started.elapsed() > self.settings.reconnect_max * 2 {
                delay = self.settings.reconnect_initial;
            }
            let jitter = rand::random_range(0.8..1.2);
            tokio::select! {
                () = tokio::time::sleep(delay.mul_f64(jitter)) => {}
                () = stop.cancelled() => break,
            }
            delay = (delay * 2).min(self.settings.reconnect_max);
        }
        self.metrics.relay_connected.set(0);
        self.status.update(|s| {
            s.state = RelayState::Stopped;
            s.connected_since_ms = None;
        });
        tracing::info!("relay stopped");
    }

    /// One connection's life: connect, listen, relay rounds until an error.
    async fn session(&self) -> RelayError {
        let Connected {
            mut client,
            wake,
            mut lost,
        } = match self.connect().await {
            Ok(c) => c,
            Err(e) => return e,
        };
        self.metrics.relay_connected.set(1);
        self.status.update(|s| {
            s.state = RelayState::Connected;
            s.connected_since_ms = Some(now_ms());
        });
        tracing::info!("relay connected");
        let mut last_backlog: Option<Instant> = None;
        loop {
            let round = match self.round(&mut client).await {
                Ok(r) => r,
                Err(e) => return e,
            };
            let due = last_backlog.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if due || round.claimed == 0 {
                last_backlog = Some(Instant::now());
                if let Err(e) = self.backlog(&client).await {
                    return e;
                }
            }
            if round.claimed >= self.settings.batch as usize {
                continue; // more is waiting
            }
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(self.settings.poll_interval) => {}
                e = &mut lost => return e.unwrap_or_else(|_| RelayError::Connect("connection closed".into())),
            }
        }
    }

    async fn connect(&self) -> Result<Connected, RelayError> {
        let mut config: tokio_postgres::Config = self
            .settings
            .url
            .expose_secret()
            .parse()
            .map_err(|e: tokio_postgres::Error| {
                RelayError::Query(format!("invalid --relay-postgres: {}", pg_text(&e)))
            })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        // A dead peer (a failed-over primary's old address) must be noticed
        // while the relay sits idle between rounds.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.application_name("warren-sidecar relay");
        let tls = tls_connector(self.settings.tls_ca_pem.as_deref())?;
        let (client, connection) = config
            .connect(tls)
            .await
            .map_err(|e| RelayError::from_pg(e, true))?;
        let wake = Arc::new(Notify::new());
        let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
        {
            let wake = wake.clone();
            let mut connection = connection;
            tokio::spawn(async move {
                // Driving the connection also delivers notifications.
                let messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                futures::pin_mut!(messages);
                let end = loop {
                    match messages.next().await {
                        Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                        Some(Ok(AsyncMessage::Notice(n))) => {
                            tracing::debug!(notice = %n.message(), "database notice");
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break RelayError::from_pg(e, false),
                        None => break RelayError::Connect("connection closed".into()),
                    }
                };
                let _ = lost_tx.send(end);
            });
        }
        if self.settings.wakeup == Wakeup::Listen {
            let listen = format!("LISTEN \"{}\"", self.settings.channel.replace('"', "\"\""));
            client
                .batch_execute(&listen)
                .await
                .map_err(|e| RelayError::from_pg(e, false))?;
        }
        Ok(Connected {
            client,
            wake,
            lost: lost_rx,
        })
    }

    /// Looks at the oldest row still in the table, for the age gauge.
    async fn backlog(&self, client: &Client) -> Result<(), RelayError> {
        let row = client
            .query_opt(&self.settings.statements.backlog, &[])
            .await
            .map_err(|e| RelayError::from_pg(e, false))?;
        let age = row
            .and_then(|r| r.get::<_, Option<f64>>(0))
            .map(|a| a.max(0.0));
        self.metrics.relay_oldest_row_age.set(age.unwrap_or(0.0));
        self.status
            .update(|s| s.oldest_row_age_ms = age.map(|a| (a * 1000.0) as u64));
        Ok(())
    }

    /// One transaction: claim, append, dead-letter, delete, commit.
    async fn round(&self, client: &mut Client) -> Result<Round, RelayError> {
        let pg = |e| RelayError::from_pg(e, false);
        let st = &self.settings.statements;
        let tx = client.transaction().await.map_err(pg)?;
        let rows = tx
            .query(&st.claim, &[&i64::from(self.settings.batch)])
            .await
            .map_err(pg)?;
        if rows.is_empty() {
            tx.commit().await.map_err(pg)?;
            return Ok(Round::default());
        }
        let now = now_ms();
        let mut ids = Vec::with_capacity(rows.len());
        let mut good = Vec::with_capacity(rows.len());
        let mut poison = Vec::new();
        let mut newest_created = None::<f64>;
        for r in &rows {
            let raw = RawRow {
                id: r.try_get(0).map_err(pg)?,
                message_id: r.try_get(1).map_err(pg)?,
                exchange: r.try_get(2).map_err(pg)?,
                routing_key: r.try_get(3).map_err(pg)?,
                payload: r.try_get(4).map_err(pg)?,
                headers: r.try_get(5).map_err(pg)?,
                content_type: r.try_get(6).map_err(pg)?,
                created_at_ms: r.try_get(7).map_err(pg)?,
            };
            let id = raw.id;
            ids.push(id);
            let created = raw.created_at_ms;
            match row::to_message(raw, self.settings.max_message_bytes, now) {
                Ok(m) => {
                    if let Some(c) = created {
                        newest_created = Some(newest_created.map_or(c, |n| n.max(c)));
                        self.metrics
                            .relay_lag
                            .observe((now as f64 - c).max(0.0) / 1000.0);
                    }
                    good.push(m);
                }
                Err(reason) => poison.push((id, reason)),
            }
        }
        let relayed = good.len() as u64;
        let seqs = if good.is_empty() {
            Vec::new()
        } else {
            // The durable step: once this returns the rows may go.
            self.outbox.append(good).await?
        };
        for (id, reason) in &poison {
            tracing::warn!(row_id = id, reason = %reason, "row cannot be relayed; moving it to the dead-letter table");
            tx.execute(&st.dead_letter, &[id, &reason.to_string()])
                .await
                .map_err(pg)?;
        }
        tx.execute(&st.delete, &[&ids]).await.map_err(pg)?;
        if self.settings.order_by.is_some() {
            // The key's next row becomes claimable when this commits; it
            // must not overtake this one on the way to the broker.
            self.wait_forwarded(&seqs).await?;
        }
        tx.commit().await.map_err(pg)?;
        let dead = poison.len() as u64;
        self.metrics.relay_relayed.inc_by(relayed);
        self.metrics.relay_dead_lettered.inc_by(dead);
        self.status.update(|s| {
            s.relayed += relayed;
            s.dead_lettered += dead;
            s.rounds += 1;
            if let Some(c) = newest_created {
                s.last_lag_ms = Some((now as f64 - c).max(0.0) as u64);
            }
        });
        tracing::debug!(relayed, dead, "relay round committed");
        Ok(Round { claimed: ids.len() })
    }

    /// Waits until every appended entry has left the local outbox (broker
    /// confirmed, or moved to the outbox's dead-letter area).
    async fn wait_forwarded(&self, seqs: &[u64]) -> Result<(), RelayError> {
        let mut pause = Duration::from_millis(1);
        for &seq in seqs {
            loop {
                let pending = self
                    .outbox
                    .read_one(seq)
                    .map_err(|e| RelayError::Outbox(e.into()))?;
                if pending.is_none() {
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

/// A live connection with its wake-up and loss signals.
struct Connected {
    client: Client,
    wake: Arc<Notify>,
    lost: tokio::sync::oneshot::Receiver<RelayError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_lose_their_passwords() {
        assert_eq!(
            redact_pg("postgres://app:s3cret@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert_eq!(
            redact_pg("host=db user=app password=s3cret dbname=app"),
            "host=db user=app password=*** dbname=app"
        );
    }

    #[test]
    fn dead_table_defaults_to_the_table_name() {
        let s = RelaySettings::new("postgres://x", "app.outbox", None, Some("agg")).unwrap();
        assert_eq!(s.dead_table, "app.outbox_dead");
        assert!(s.statements.dead_letter.contains("\"app\".\"outbox_dead\""));
        assert!(RelaySettings::new("postgres://x", "a.b.c", None, None).is_err());
    }
}
