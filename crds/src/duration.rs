//! Durations as people write them in manifests and config: `250ms`, `4s`,
//! `5m`, `1h30m`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A [`Duration`] written as a humane string (`"1s"`, `"1m30s"`) in YAML,
/// JSON and CRDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }
}

/// A duration string that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: expected a number with a unit (ms, s, m, h), e.g. \"500ms\", \"4s\" or \"1m30s\""
)]
pub struct ParseDurationError {
    input: String,
}

impl FromStr for HumanDuration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDurationError {
            input: s.to_owned(),
        };
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(err());
        }
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
            if digits == 0 {
                return Err(err());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| err())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit_ms: u64 = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                _ => return Err(err()),
            };
            rest = &rest[unit_len..];
            let ms = n.checked_mul(unit_ms).ok_or_else(err)?;
            total = total
                .checked_add(Duration::from_millis(ms))
                .ok_or_else(err)?;
        }
        Ok(Self(total))
    }
}

impl fmt::Display for HumanDuration {
    /// The largest units that add up exactly: `1h30m`, `4s`, `1s500ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Duration {
        d.0
    }
}

#[cfg(feature = "kube")]
impl schemars::JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HumanDuration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(ms|s|m|h))+$",
            // Bounds the cost the API server estimates for CEL rules that
            // parse it with `duration()`.
            "maxLength": 64,
            "description": "A duration: numbers with units ms, s, m, h, e.g. \"500ms\", \"4s\", \"1m30s\"."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        let p = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(p("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(p("4s"), Ok(Duration::from_secs(4)));
        assert_eq!(p("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(p("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(p("1s500ms"), Ok(Duration::from_millis(1500)));
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "-1s",
            "1d",
            "1 s",
            "99999999999999999999h",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn display_round_trips() {
        for ms in [
            0u64, 1, 250, 1000, 1500, 60_000, 90_000, 3_600_000, 5_430_250,
        ] {
            let d = HumanDuration::from_millis(ms);
            assert_eq!(d.to_string().parse::<HumanDuration>(), Ok(d), "{d}");
        }
        assert_eq!(HumanDuration::from_secs(90).to_string(), "1m30s");
    }

    #[test]
    fn serde_uses_strings() {
        let d: HumanDuration = serde_json::from_str("\"1m\"").unwrap();
        assert_eq!(d, HumanDuration::from_secs(60));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1m\"");
        let e = serde_json::from_str::<HumanDuration>("\"soon\"").unwrap_err();
        assert!(e.to_string().contains("invalid duration \"soon\""), "{e}");
    }
}
