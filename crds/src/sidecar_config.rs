//! The sidecar's consumer configuration (`--config` / `WARREN_CONFIG`): the
//! queues it consumes for the app, where it delivers them and the retry
//! policy of each. The operator renders it; people may write it by hand.
//!
//! ```yaml
//! app:
//!   url: http://127.0.0.1:8080/messages
//!   timeout: 30s
//!   concurrency: 16
//! queues:
//!   - name: orders
//!     prefetch: 16
//!     retryPolicy: {maxRetries: 5, backoff: {initial: 1s, multiplier: 2, max: 5m}}
//! ```

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;
use crate::names;
use crate::retry::{RetryPolicyError, RetryPolicySpec};

/// Time kept in reserve between the longest a delivery may be held (app
/// call plus republish) and the broker's `consumer_timeout`.
pub const HOLD_MARGIN: Duration = Duration::from_secs(5);

/// The whole consumer configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    /// Where messages are delivered. Required when `queues` is not empty.
    #[serde(default)]
    pub app: Option<AppEndpoint>,
    /// The queues to consume.
    #[serde(default)]
    pub queues: Vec<ConsumeQueue>,
    /// The broker's `consumer_timeout` (RabbitMQ's default: 30m). A delivery
    /// is never held longer than this minus a margin: one that waited too
    /// long for its turn is handed back to the broker unprocessed.
    #[serde(default = "default_consumer_timeout")]
    pub consumer_timeout: HumanDuration,
}

fn default_consumer_timeout() -> HumanDuration {
    HumanDuration::from_secs(30 * 60)
}

impl Default for SidecarConfig {
    fn default() -> Self {
        Self {
            app: None,
            queues: Vec::new(),
            consumer_timeout: default_consumer_timeout(),
        }
    }
}

/// The app's delivery endpoint. Its `Debug` hides the URL's user info.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppEndpoint {
    /// `http://` URL each message is POSTed to.
    pub url: String,
    /// Per-delivery deadline; an answer later than this counts as a failure
    /// and takes the retry path. Default `30s`.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Most deliveries the app handles at once, over all queues. Default 16.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
}

impl std::fmt::Debug for AppEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppEndpoint")
            .field("url", &redact_user_info(&self.url))
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}

fn default_concurrency() -> u32 {
    16
}

/// One consumed queue. Its `Debug` hides the user info of its `url`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumeQueue {
    /// The work queue `Q`.
    pub name: String,
    /// Most unacknowledged deliveries from this queue. Default 16.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// The parking lot; default `Q.parked`.
    #[serde(default)]
    pub parking_lot: Option<String>,
    /// Overrides `app.url` for this queue.
    #[serde(default)]
    pub url: Option<String>,
    /// Retries of this queue's failed deliveries.
    #[serde(default)]
    pub retry_policy: RetryPolicySpec,
}

fn default_prefetch() -> u16 {
    16
}

impl std::fmt::Debug for ConsumeQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumeQueue")
            .field("name", &self.name)
            .field("prefetch", &self.prefetch)
            .field("parking_lot", &self.parking_lot)
            .field("url", &self.url.as_deref().map(redact_user_info))
            .field("retry_policy", &self.retry_policy)
            .finish()
    }
}

/// `url` with everything up to its last `@` after the scheme replaced by
/// `***`, for logs and errors: user info (a password) never shows, even
/// one with an unencoded `/` in it, at the price of hiding a path before
/// an `@`.
pub fn redact_user_info(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    match rest.rsplit_once('@') {
        Some((_, host_and_path)) => format!("{scheme}***@{host_and_path}"),
        None => url.to_owned(),
    }
}

impl ConsumeQueue {
    /// The parking lot's name.
    pub fn parking_lot(&self) -> String {
        self.parking_lot
            .clone()
            .unwrap_or_else(|| names::parking_lot(&self.name))
    }
}

/// Why a sidecar configuration is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("queues are configured but `app.url` is missing")]
    NoApp,
    #[error("{0}: URL must start with http:// or https://, got {1:?}")]
    Url(String, String),
    #[error("app.timeout must be greater than zero")]
    ZeroTimeout,
    #[error("app.concurrency must be at least 1")]
    ZeroConcurrency,
    #[error(
        "app.timeout ({timeout}) plus a {margin:?} margin must be below consumerTimeout ({consumer_timeout}), or the broker closes the channel under a slow delivery"
    )]
    TimeoutTooLong {
        timeout: HumanDuration,
        consumer_timeout: HumanDuration,
        margin: Duration,
    },
    #[error("a queue has an empty name")]
    EmptyName,
    #[error("queue {0:?} is listed twice")]
    Duplicate(String),
    #[error("queue {0:?}: prefetch must be at least 1")]
    ZeroPrefetch(String),
    #[error("queue {0:?}: its parking lot must be another queue")]
    ParkInSelf(String),
    #[error("queue {queue:?}: {source}")]
    Policy {
        queue: String,
        source: RetryPolicyError,
    },
}

impl SidecarConfig {
    /// Checks the configuration as a whole.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.queues.is_empty() {
            return Ok(());
        }
        let app = self.app.as_ref().ok_or(ConfigError::NoApp)?;
        check_url("app.url", &app.url)?;
        if app.timeout.0.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        if app.concurrency == 0 {
            return Err(ConfigError::ZeroConcurrency);
        }
        // A delivery is held for the app call and then the republish, which
        // is bounded by the same timeout.
        if app.timeout.0 * 2 + HOLD_MARGIN >= self.consumer_timeout.0 {
            return Err(ConfigError::TimeoutTooLong {
                timeout: app.timeout,
                consumer_timeout: self.consumer_timeout,
                margin: HOLD_MARGIN,
            });
        }
        let mut seen = HashSet::new();
        for q in &self.queues {
            if q.name.is_empty() {
                return Err(ConfigError::EmptyName);
            }
            if !seen.insert(q.name.as_str()) {
                return Err(ConfigError::Duplicate(q.name.clone()));
            }
            if q.prefetch == 0 {
                return Err(ConfigError::ZeroPrefetch(q.name.clone()));
            }
            if q.parking_lot() == q.name {
                return Err(ConfigError::ParkInSelf(q.name.clone()));
            }
            if let Some(url) = &q.url {
                check_url(&format!("queue {:?} url", q.name), url)?;
            }
            q.retry_policy
                .validate()
                .map_err(|source| ConfigError::Policy {
                    queue: q.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

fn check_url(what: &str, url: &str) -> Result<(), ConfigError> {
    let ok = ["http://", "https://"]
        .iter()
        .any(|s| url.len() > s.len() && url[..s.len()].eq_ignore_ascii_case(s));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Url(what.to_owned(), redact_user_info(url)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> SidecarConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn debug_and_errors_never_show_an_app_password() {
        let c = parse(
            r#"{"app": {"url": "http://app:s3cr%2Ft/x@127.0.0.1:8080/m"},
                "queues": [{"name": "orders", "url": "https://u:pa/ss@q.example/in"}]}"#,
        );
        let shown = format!("{c:?}");
        for secret in ["s3cr", "pa/ss"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("http://***@127.0.0.1:8080/m"), "{shown}");
        assert!(shown.contains("https://***@q.example/in"), "{shown}");
        assert!(shown.contains("orders"), "{shown}");

        let bad = parse(r#"{"app": {"url": "ftp://op:hunter2@h/m"}, "queues": [{"name": "q"}]}"#);
        let err = bad.validate().unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("ftp://***@h/m"), "{err}");

        assert_eq!(redact_user_info("http://h:80/a"), "http://h:80/a");
    }

    #[test]
    fn defaults_fill_a_minimal_config() {
        let c =
            parse(r#"{"app": {"url": "http://127.0.0.1:8080/m"}, "queues": [{"name": "orders"}]}"#);
        c.validate().unwrap();
        let app = c.app.as_ref().unwrap();
        assert_eq!(app.timeout, HumanDuration::from_secs(30));
        assert_eq!(app.concurrency, 16);
        assert_eq!(c.consumer_timeout, HumanDuration::from_secs(1800));
        assert_eq!(c.queues[0].prefetch, 16);
        assert_eq!(c.queues[0].parking_lot(), "orders.parked");
        assert_eq!(c.queues[0].retry_policy, RetryPolicySpec::default());
        assert!(SidecarConfig::default().validate().is_ok());
        assert_eq!(
            SidecarConfig::default().consumer_timeout,
            c.consumer_timeout
        );
    }

    #[test]
    fn typos_are_refused() {
        let e = serde_json::from_str::<SidecarConfig>(r#"{"queue": []}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `queue`"), "{e}");
    }

    #[test]
    fn inconsistent_configs_are_refused() {
        let base = parse(r#"{"app": {"url": "http://a/"}, "queues": [{"name": "q"}]}"#);
        let check = |edit: &dyn Fn(&mut SidecarConfig), want: &str| {
            let mut c = base.clone();
            edit(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        };
        check(&|c| c.app = None, "app.url` is missing");
        check(
            &|c| c.app.as_mut().unwrap().url = "ftp://x".into(),
            "http://",
        );
        check(&|c| c.app.as_mut().unwrap().concurrency = 0, "concurrency");
        check(
            &|c| c.app.as_mut().unwrap().timeout = HumanDuration::from_secs(1000),
            "below consumerTimeout",
        );
        check(&|c| c.queues.push(c.queues[0].clone()), "listed twice");
        check(&|c| c.queues[0].prefetch = 0, "prefetch");
        check(
            &|c| c.queues[0].parking_lot = Some("q".into()),
            "another queue",
        );
        check(
            &|c| c.queues[0].retry_policy.max_retries = 500,
            "queue \"q\": maxRetries",
        );
    }
}
