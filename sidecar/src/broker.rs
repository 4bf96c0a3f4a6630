//! What the forwarder and the consumer share about talking to the broker:
//! the broker addresses (one node or several of a cluster), opening a
//! connection (heartbeat, deadline, TLS), the one reconnect loop both run
//! ([`stay_connected`]), the backoff schedule, and describing lapin errors in
//! the broker's own words.
//!
//! # Failover
//! Given several addresses, a round of connection attempts tries them in
//! turn, starting with the one after the node last lost, so a node that went
//! away is tried last. After a lost connection the next round follows the
//! schedule's first (short) delay; rounds in which no address answers back
//! off further. Quorum queues and
//! their messages live on a majority of nodes, so any node reached serves the
//! same queues.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use warren_crds::backoff::Backoff;

use crate::config::redact_url;

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// amqp:// or amqps:// URLs, credentials included (redacted in `Debug`),
    /// tried in turn; see [`parse_urls`].
    pub urls: Vec<SecretString>,
    /// PEM CA bundle for amqps://, if not the system roots.
    pub tls_ca_pem: Option<String>,
    /// AMQP heartbeat interval.
    pub heartbeat: Duration,
    /// Deadline for establishing one connection.
    pub connect_timeout: Duration,
    /// Delay between rounds of attempts when no address answers.
    pub reconnect: Backoff,
}

/// Reconnect and retry delays: `initial × 2^attempt` capped at `max`, plus up
/// to half again at random, so that many clients spread out but none comes
/// back sooner than the schedule says.
pub fn schedule(initial: Duration, max: Duration) -> Backoff {
    Backoff {
        initial,
        multiplier: 2.0,
        max,
        jitter: 0.5,
    }
}

/// The delay before attempt `attempt` (0-based) of `schedule`, with jitter.
pub fn delay(schedule: &Backoff, attempt: u32) -> Duration {
    schedule.jittered_delay(attempt, rand::random::<f64>())
}

/// Why no connection could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to the broker: {0}")]
    Failed(String),
    #[error("connection attempt timed out after {0:?}")]
    TimedOut(Duration),
    #[error("cannot connect to any broker address: {}", .0.iter().map(|(url, e)| format!("{url}: {e}")).collect::<Vec<_>>().join("; "))]
    NoneAnswered(Vec<(String, ConnectError)>),
}

/// An open connection and which address it went to.
pub struct Connected {
    /// Shared with the tasks that use it (the consumer's subscriptions).
    pub conn: Arc<Connection>,
    /// Index of the address in [`BrokerSettings::urls`].
    pub index: usize,
    /// That address without its password.
    pub url: String,
}

/// Splits a broker address setting into URLs. Accepted forms, which may be
/// mixed:
///
/// - several URLs separated by commas:
///   `amqp://u:p@rabbit-0:5672/v,amqp://u:p@rabbit-1:5672/v`;
/// - one URL with several hosts: `amqp://u:p@rabbit-0:5672,rabbit-1,rabbit-2:5673/v?heartbeat=5`
///   gives each host the URL's scheme, credentials, virtual host and query
///   (a host without a port gets the scheme's default port).
///
/// Whitespace around entries is ignored; an empty entry or a URL that is not
/// amqp:// or amqps:// is an error naming it (without its password).
pub fn parse_urls(setting: &str) -> Result<Vec<String>, String> {
    // Group the comma-separated pieces: a piece with a scheme starts a URL,
    // one without is another host of the URL before it.
    let mut groups: Vec<Vec<&str>> = Vec::new();
    for piece in setting.split(',').map(str::trim) {
        if piece.is_empty() {
            return Err("empty entry in the list of broker addresses".into());
        }
        if piece.contains("://") {
            groups.push(vec![piece]);
        } else {
            match groups.last_mut() {
                Some(group) => group.push(piece),
                None => {
                    return Err(format!(
                        "broker address {piece:?} has no amqp:// or amqps:// scheme"
                    ));
                }
            }
        }
    }
    let mut urls = Vec::new();
    for group in groups {
        let (scheme, rest) = group[0].split_once("://").expect("grouped by scheme");
        if !matches!(scheme, "amqp" | "amqps") {
            return Err(format!(
                "broker URL {} must start with amqp:// or amqps://",
                redact_url(group[0])
            ));
        }
        if group.len() == 1 {
            urls.push(group[0].to_owned());
            continue;
        }
        // The credentials come with the first host; the path and query with
        // the last (`…,host-n:port/vhost?query`) and apply to every host.
        let (userinfo, first_host) = match rest.rsplit_once('@') {
            Some((userinfo, host)) => (format!("{userinfo}@"), host),
            None => (String::new(), rest),
        };
        let last = group[group.len() - 1];
        let tail_at = last.find(['/', '?']).unwrap_or(last.len());
        let tail = &last[tail_at..];
        let mut hosts: Vec<&str> = vec![first_host];
        hosts.extend(&group[1..group.len() - 1]);
        hosts.push(&last[..tail_at]);
        for host in hosts {
            if host.is_empty() || host.contains(['/', '?', '@']) {
                return Err(format!(
                    "broker address {host:?} in a multi-host URL is not a host[:port]"
                ));
            }
            urls.push(format!("{scheme}://{userinfo}{host}{tail}"));
        }
    }
    for url in &urls {
        url.parse::<AMQPUri>()
            .map_err(|e| format!("invalid broker URL {}: {e}", redact_url(url)))?;
    }
    Ok(urls)
}

/// The setting with every password replaced, for logs and `Debug`.
pub fn redact_setting(setting: &str) -> String {
    match parse_urls(setting) {
        Ok(urls) => urls
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(","),
        Err(_) => redact_url(setting),
    }
}

/// Opens a connection named `name` (shown in the management UI) to the
/// first address that answers, trying them in turn from `first`.
pub async fn connect(
    settings: &BrokerSettings,
    name: &str,
    first: usize,
) -> Result<Connected, ConnectError> {
    let n = settings.urls.len();
    let mut errors = Vec::new();
    for k in 0..n.max(1) {
        let index = (first + k) % n.max(1);
        let Some(url) = settings.urls.get(index) else {
            return Err(ConnectError::Failed("no broker address configured".into()));
        };
        match connect_one(settings, url, name).await {
            Ok(conn) => {
                return Ok(Connected {
                    conn: Arc::new(conn),
                    index,
                    url: redact_url(url.expose_secret()),
                });
            }
            Err(e) => {
                let url = redact_url(url.expose_secret());
                if n > 1 {
                    tracing::warn!(broker = %url, error = %e, "broker address does not answer; trying the next");
                }
                errors.push((url, e));
            }
        }
    }
    if errors.len() == 1 {
        return Err(errors.pop().expect("one error").1);
    }
    Err(ConnectError::NoneAnswered(errors))
}

async fn connect_one(
    settings: &BrokerSettings,
    url: &SecretString,
    name: &str,
) -> Result<Connection, ConnectError> {
    let mut uri: AMQPUri = url
        .expose_secret()
        .parse()
        .map_err(|e: String| ConnectError::Failed(format!("invalid broker URL: {e}")))?;
    uri.query
        .heartbeat
        .get_or_insert(settings.heartbeat.as_secs().clamp(1, u16::MAX as u64) as u16);
    uri.query
        .connection_timeout
        .get_or_insert(settings.connect_timeout.as_millis() as u64);
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: settings.tls_ca_pem.clone(),
    };
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let runtime =
        lapin::runtime::default_runtime().map_err(|e| ConnectError::Failed(e.to_string()))?;
    let connect = Connection::connect_uri_with_config(uri, props, tls, runtime);
    match tokio::time::timeout(settings.connect_timeout, connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(ConnectError::Failed(describe(&e))),
        Err(_) => Err(ConnectError::TimedOut(settings.connect_timeout)),
    }
}

/// A part of the sidecar that keeps a broker connection: the forwarder or
/// the consumer. [`stay_connected`] drives it.
pub trait Link: Send {
    /// Name of the connection in the broker's management UI.
    const NAME: &'static str;

    /// A round of connection attempts begins.
    fn connecting(&mut self) {}

    /// A connection is open.
    fn connected(&mut self, broker: &Connected);

    /// Uses the connection until it fails (`Err` with the reason: a
    /// reconnect follows) or `stop` is cancelled (`Ok`).
    fn session(
        &mut self,
        broker: &Connected,
        stop: &CancellationToken,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// No address answered (`attempt` counts rounds since the last success).
    fn unreachable(&mut self, error: &ConnectError, attempt: u32);

    /// An open connection was lost.
    fn lost(&mut self, broker: &Connected, error: &str);
}

/// Connects, runs sessions and reconnects with backoff until `stop` is
/// cancelled. After a lost connection the next round starts with the next
/// address, so a cluster node that went away is tried last.
pub async fn stay_connected<L: Link>(
    settings: &BrokerSettings,
    link: &mut L,
    stop: &CancellationToken,
) {
    let mut attempt: u32 = 0;
    let mut first = 0;
    while !stop.is_cancelled() {
        link.connecting();
        let connected = tokio::select! {
            c = connect(settings, L::NAME, first) => c,
            _ = stop.cancelled() => break,
        };
        match connected {
            Ok(broker) => {
                attempt = 0;
                link.connected(&broker);
                let end = link.session(&broker, stop).await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    broker.conn.close(200, "warren-sidecar closing".into()),
                )
                .await;
                match end {
                    Ok(()) => break,
                    Err(e) => {
                        link.lost(&broker, &e);
                        // Another node may well be up: the next round starts
                        // with it, after the schedule's first (short) delay,
                        // so a session that fails at once cannot spin.
                        first = (broker.index + 1) % settings.urls.len().max(1);
                    }
                }
            }
            Err(e) => link.unreachable(&e, attempt),
        }
        let wait = delay(&settings.reconnect, attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => break,
        }
    }
}

/// The error with the broker's own reply text where there is one.
pub fn describe(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            format!("{} {}", amqp.get_id(), amqp.get_message())
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_doubles_caps_and_never_comes_back_early() {
        let s = schedule(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(s.delay(0), Duration::from_millis(100));
        assert_eq!(s.delay(3), Duration::from_millis(800));
        assert_eq!(s.delay(4), Duration::from_secs(1));
        assert_eq!(s.delay(u32::MAX), Duration::from_secs(1));
        for attempt in [0, 2, 9] {
            for _ in 0..500 {
                let d = delay(&s, attempt);
                let base = s.delay(attempt);
                assert!(d >= base && d <= base + base / 2, "{d:?} for {base:?}");
            }
        }
    }

    #[test]
    fn one_url_is_one_address() {
        assert_eq!(
            parse_urls("amqp://u:p@h:5672/%2f").unwrap(),
            ["amqp://u:p@h:5672/%2f"]
        );
    }

    #[test]
    fn a_list_of_urls_keeps_each_as_given() {
        assert_eq!(
            parse_urls(" amqp://a:1@r0:5672/v , amqps://b:2@r1:5671/w?heartbeat=5").unwrap(),
            ["amqp://a:1@r0:5672/v", "amqps://b:2@r1:5671/w?heartbeat=5"]
        );
    }

    #[test]
    fn one_url_with_several_hosts_shares_credentials_vhost_and_query() {
        assert_eq!(
            parse_urls("amqp://app:s%2Fcret@r0:5672,r1,r2:5673/orders?heartbeat=5").unwrap(),
            [
                "amqp://app:s%2Fcret@r0:5672/orders?heartbeat=5",
                "amqp://app:s%2Fcret@r1/orders?heartbeat=5",
                "amqp://app:s%2Fcret@r2:5673/orders?heartbeat=5",
            ]
        );
        // Without a vhost or credentials.
        assert_eq!(
            parse_urls("amqp://r0,r1").unwrap(),
            ["amqp://r0", "amqp://r1"]
        );
    }

    #[test]
    fn bad_addresses_are_refused_without_showing_the_password() {
        for (setting, want) in [
            ("amqp://u:hunter2@r0,,r1", "empty entry"),
            (
                "r0:5672,amqp://u:hunter2@r1",
                "no amqp:// or amqps:// scheme",
            ),
            ("http://u:hunter2@r0", "must start with amqp://"),
            ("amqp://u:hunter2@r0,r1/v,r2", "is not a host"),
        ] {
            let e = parse_urls(setting).unwrap_err();
            assert!(e.contains(want), "{setting}: {e}");
            assert!(!e.contains("hunter2"), "{setting}: {e}");
        }
    }
}
