//! What the forwarder and the consumer share about talking to the broker:
//! opening a connection (heartbeat, deadline, TLS), describing lapin errors
//! in the broker's own words, and reconnect backoff.

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// amqp:// or amqps:// URL, credentials included (redacted in `Debug`).
    pub url: SecretString,
    /// PEM CA bundle for amqps://, if not the system roots.
    pub tls_ca_pem: Option<String>,
    /// AMQP heartbeat interval.
    pub heartbeat: Duration,
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to the broker: {0}")]
    Failed(String),
    #[error("connection attempt timed out after {0:?}")]
    TimedOut(Duration),
}

/// Opens a connection named `name` (shown in the management UI).
pub async fn connect(settings: &BrokerSettings, name: &str) -> Result<Connection, ConnectError> {
    let mut uri: AMQPUri = settings
        .url
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

/// The error with the broker's own reply text where there is one.
pub fn describe(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            format!("{} {}", amqp.get_id(), amqp.get_message())
        }
        _ => e.to_string(),
    }
}

/// `initial × 2^attempt`, capped at `max`.
pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    initial.saturating_mul(1u32 << attempt.min(20)).min(max)
}

/// Equal jitter: half fixed, half random, so many clients spread out but
/// none retries much sooner than asked.
pub fn jittered(d: Duration) -> Duration {
    d / 2 + d.mul_f64(rand::random::<f64>() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff(i, m, 0), Duration::from_millis(100));
        assert_eq!(backoff(i, m, 3), Duration::from_millis(800));
        assert_eq!(backoff(i, m, 4), Duration::from_secs(1));
        assert_eq!(backoff(i, m, u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_half_and_full() {
        for _ in 0..1000 {
            let j = jittered(Duration::from_secs(2));
            assert!(
                j >= Duration::from_secs(1) && j <= Duration::from_secs(2),
                "{j:?}"
            );
        }
    }
}
