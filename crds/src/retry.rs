//! A retry policy: how often and how fast a failed delivery is retried, how
//! the delay is realised on the broker, and which app answers are worth a
//! retry. The `RetryPolicy` resource's spec, and the part of the sidecar's
//! config that drives its retries.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::backoff::{Backoff, BackoffError};
use crate::duration::HumanDuration;

/// Most retries a policy may ask for: each distinct delay is a queue, and a
/// message retried more often than this belongs in the parking lot.
pub const MAX_RETRIES_LIMIT: u32 = 100;

/// How failed deliveries are retried: how often, how fast, how the delay is
/// realised on the broker, and which app answers are worth a retry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "warren.dev",
        version = "v1alpha1",
        kind = "RetryPolicy",
        namespaced,
        shortname = "rp",
        status = "crate::retry_policy::RetryPolicyStatus",
        printcolumn = r#"{"name":"Max Retries","type":"integer","jsonPath":".spec.maxRetries"}"#,
        printcolumn = r#"{"name":"Strategy","type":"string","jsonPath":".spec.delayStrategy"}"#,
        printcolumn = r#"{"name":"Tiers","type":"string","jsonPath":".status.tiers"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicySpec {
    /// Retries after the first delivery; a message that fails once more is
    /// parked. 0 parks on the first failure; at most 100.
    #[serde(default = "default_max_retries")]
    #[cfg_attr(feature = "kube", schemars(range(max = MAX_RETRIES_LIMIT)))]
    pub max_retries: u32,
    /// The delay before each retry.
    #[serde(default)]
    pub backoff: BackoffSpec,
    /// How the delay is realised on the broker.
    #[serde(default)]
    pub delay_strategy: DelayStrategy,
    /// App answers that retry even though `nonRetryableStatuses` matches
    /// them. Default: `408` and `429`.
    #[serde(default = "default_retryable")]
    pub retryable_statuses: Vec<StatusPattern>,
    /// App answers that park the message at once. Default: `4xx`. Every
    /// other non-2xx answer, a timeout and a refused connection are retried.
    #[serde(default = "default_non_retryable")]
    pub non_retryable_statuses: Vec<StatusPattern>,
}

fn default_max_retries() -> u32 {
    5
}

fn default_retryable() -> Vec<StatusPattern> {
    vec![StatusPattern::Exact(408), StatusPattern::Exact(429)]
}

fn default_non_retryable() -> Vec<StatusPattern> {
    vec![StatusPattern::Class(4)]
}

impl Default for RetryPolicySpec {
    fn default() -> Self {
        Self {
            max_retries: default_max_retries(),
            backoff: BackoffSpec::default(),
            delay_strategy: DelayStrategy::default(),
            retryable_statuses: default_retryable(),
            non_retryable_statuses: default_non_retryable(),
        }
    }
}

/// Exponential backoff as written in a policy: delay = initial ×
/// multiplier^attempt, capped at max, plus up to `jitter` × delay at random.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(kube::KubeSchema))]
#[serde(rename_all = "camelCase")]
// The schema's copy of `Backoff::validate`'s cross-field checks. CEL's
// `duration()` reads Go duration strings, of which HumanDuration's syntax
// (`500ms`, `1m30s`) is a subset.
#[cfg_attr(
    feature = "kube",
    x_kube(
        validation = Rule::new("duration(self.initial) > duration('0s')")
            .message("backoff.initial must be greater than zero"),
        validation = Rule::new("duration(self.max) >= duration(self.initial)")
            .message("backoff.max must be at least backoff.initial"),
    )
)]
pub struct BackoffSpec {
    /// Delay before the first retry, > 0. Default `1s`.
    #[serde(default = "default_initial")]
    pub initial: HumanDuration,
    /// Growth factor between retries, ≥ 1. Default 2.
    #[serde(default = "default_multiplier")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1.0)))]
    pub multiplier: f64,
    /// Longest delay, ≥ `initial`. Default `5m`.
    #[serde(default = "default_max")]
    pub max: HumanDuration,
    /// Random fraction (0..=1) added to each delay. Default 0.1. Applied by
    /// the `delayedMessageExchange` strategy; `ttlTiers` releases a tier's
    /// messages at its fixed TTL and does not apply jitter.
    #[serde(default = "default_jitter")]
    #[cfg_attr(feature = "kube", schemars(range(min = 0.0, max = 1.0)))]
    pub jitter: f64,
}

fn default_initial() -> HumanDuration {
    HumanDuration::from_secs(1)
}

fn default_multiplier() -> f64 {
    2.0
}

fn default_max() -> HumanDuration {
    HumanDuration::from_secs(300)
}

fn default_jitter() -> f64 {
    0.1
}

impl Default for BackoffSpec {
    fn default() -> Self {
        Self {
            initial: default_initial(),
            multiplier: default_multiplier(),
            max: default_max(),
            jitter: default_jitter(),
        }
    }
}

impl From<BackoffSpec> for Backoff {
    fn from(b: BackoffSpec) -> Backoff {
        Backoff {
            initial: b.initial.0,
            multiplier: b.multiplier,
            max: b.max.0,
            jitter: b.jitter,
        }
    }
}

/// How a retry's delay is realised on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum DelayStrategy {
    /// One quorum queue per distinct delay (`Q.retry.<delay>`) with that
    /// queue-level TTL, dead-lettering back to `Q`. Needs no plugin.
    #[default]
    TtlTiers,
    /// `Q.retry` is an `x-delayed-message` exchange; the sidecar sets
    /// `x-delay`. Needs the delayed-message plugin.
    DelayedMessageExchange,
}

/// What to do after the app answered a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: acknowledge.
    Done,
    /// Retry with backoff (or park when retries are used up).
    Retry,
    /// Park now.
    Park,
}

/// Why a retry policy is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RetryPolicyError {
    #[error(transparent)]
    Backoff(#[from] BackoffError),
    #[error("maxRetries must be at most {MAX_RETRIES_LIMIT}, got {0}")]
    TooManyRetries(u32),
    #[error("status pattern {0} matches 2xx answers, which always mean success")]
    SuccessPattern(StatusPattern),
}

impl RetryPolicySpec {
    /// Checks the policy; the other methods assume a valid one.
    pub fn validate(&self) -> Result<(), RetryPolicyError> {
        Backoff::from(self.backoff).validate()?;
        if self.max_retries > MAX_RETRIES_LIMIT {
            return Err(RetryPolicyError::TooManyRetries(self.max_retries));
        }
        for p in self
            .retryable_statuses
            .iter()
            .chain(&self.non_retryable_statuses)
        {
            if (200..300).any(|s| p.matches(s)) {
                return Err(RetryPolicyError::SuccessPattern(*p));
            }
        }
        Ok(())
    }

    /// What an HTTP answer with `status` means under this policy.
    pub fn verdict(&self, status: u16) -> Verdict {
        if (200..300).contains(&status) {
            Verdict::Done
        } else if self.retryable_statuses.iter().any(|p| p.matches(status)) {
            Verdict::Retry
        } else if self
            .non_retryable_statuses
            .iter()
            .any(|p| p.matches(status))
        {
            Verdict::Park
        } else {
            Verdict::Retry
        }
    }

    /// The delay tiers (one queue each) of the `ttlTiers` strategy.
    pub fn tiers(&self) -> Vec<Duration> {
        Backoff::from(self.backoff).tiers(self.max_retries)
    }
}

/// An HTTP status code (`503`) or a class of them (`5xx`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusPattern {
    /// One status code.
    Exact(u16),
    /// Every code of a class: `4` is `4xx`.
    Class(u8),
}

impl StatusPattern {
    /// Whether `status` is matched.
    pub fn matches(&self, status: u16) -> bool {
        match *self {
            StatusPattern::Exact(s) => s == status,
            StatusPattern::Class(c) => status / 100 == c as u16,
        }
    }
}

/// A status pattern that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid status pattern {0:?}: expected a code between 100 and 599 (\"503\") or a class (\"5xx\")"
)]
pub struct ParseStatusError(String);

impl FromStr for StatusPattern {
    type Err = ParseStatusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseStatusError(s.to_owned());
        let b = s.as_bytes();
        if b.len() != 3 || !(b'1'..=b'5').contains(&b[0]) {
            return Err(err());
        }
        if b[1..].eq_ignore_ascii_case(b"xx") {
            return Ok(StatusPattern::Class(b[0] - b'0'));
        }
        let code: u16 = s.parse().map_err(|_| err())?;
        Ok(StatusPattern::Exact(code))
    }
}

impl fmt::Display for StatusPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusPattern::Exact(s) => write!(f, "{s}"),
            StatusPattern::Class(c) => write!(f, "{c}xx"),
        }
    }
}

impl Serialize for StatusPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusPattern {
    /// Accepts `"5xx"`, `"503"` and a bare `503`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Code(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Code(n) => n.to_string(),
            Raw::Text(s) => s,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "kube")]
impl schemars::JsonSchema for StatusPattern {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "StatusPattern".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            // 2xx always means success; `RetryPolicySpec::validate` refuses it too.
            "pattern": "^[1345]([0-9][0-9]|xx|XX)$",
            "description": "An HTTP status code (\"503\") or a class (\"5xx\"); not 2xx."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_follows_the_contract() {
        let p = RetryPolicySpec::default();
        p.validate().unwrap();
        assert_eq!(p.verdict(200), Verdict::Done);
        assert_eq!(p.verdict(204), Verdict::Done);
        for park in [400, 401, 404, 409, 422, 499] {
            assert_eq!(p.verdict(park), Verdict::Park, "{park}");
        }
        for retry in [408, 429, 500, 502, 503, 504, 301, 100] {
            assert_eq!(p.verdict(retry), Verdict::Retry, "{retry}");
        }
    }

    #[test]
    fn policies_read_from_yaml_like_json() {
        let p: RetryPolicySpec = serde_json::from_str(
            r#"{"maxRetries": 3, "backoff": {"initial": "200ms", "max": "1s"},
                "delayStrategy": "delayedMessageExchange",
                "retryableStatuses": ["409"], "nonRetryableStatuses": ["4xx", 501]}"#,
        )
        .unwrap();
        p.validate().unwrap();
        assert_eq!(p.max_retries, 3);
        assert_eq!(p.backoff.initial, HumanDuration::from_millis(200));
        assert_eq!(p.backoff.multiplier, 2.0);
        assert_eq!(p.delay_strategy, DelayStrategy::DelayedMessageExchange);
        assert_eq!(p.verdict(409), Verdict::Retry);
        assert_eq!(p.verdict(408), Verdict::Park);
        assert_eq!(p.verdict(501), Verdict::Park);
        assert_eq!(p.verdict(500), Verdict::Retry);
        assert_eq!(
            p.tiers(),
            [200, 400, 800].map(Duration::from_millis).to_vec()
        );
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        let e = serde_json::from_str::<RetryPolicySpec>(r#"{"nonRetryableStatuses": ["4x"]}"#)
            .unwrap_err();
        assert!(
            e.to_string().contains("invalid status pattern \"4x\""),
            "{e}"
        );
        let e =
            serde_json::from_str::<RetryPolicySpec>(r#"{"retryableStatuses": [600]}"#).unwrap_err();
        assert!(e.to_string().contains("\"600\""), "{e}");
        let ok = RetryPolicySpec::default();
        let success = RetryPolicySpec {
            non_retryable_statuses: vec![StatusPattern::Class(2)],
            ..ok.clone()
        };
        assert_eq!(
            success.validate(),
            Err(RetryPolicyError::SuccessPattern(StatusPattern::Class(2)))
        );
        let many = RetryPolicySpec {
            max_retries: 1000,
            ..ok.clone()
        };
        assert_eq!(many.validate(), Err(RetryPolicyError::TooManyRetries(1000)));
        let mut slow = ok;
        slow.backoff.multiplier = 0.5;
        assert!(matches!(
            slow.validate(),
            Err(RetryPolicyError::Backoff(BackoffError::Multiplier(_)))
        ));
    }

    #[test]
    fn patterns_round_trip() {
        for s in ["5xx", "404", "1xx", "599"] {
            assert_eq!(s.parse::<StatusPattern>().unwrap().to_string(), s);
        }
        for bad in ["6xx", "99", "1000", "abc", "x5x", ""] {
            assert!(bad.parse::<StatusPattern>().is_err(), "{bad}");
        }
    }
}
