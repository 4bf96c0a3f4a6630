//! The `RetryPolicy` resource: its spec is [`RetryPolicySpec`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::reliable_queue::Condition;
pub use crate::retry::{RetryPolicy, RetryPolicySpec};

/// What the operator observed about a RetryPolicy.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Valid`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The delay tiers (`ttlTiers`), e.g. `["1s", "2s", "4s"]`.
    #[serde(default)]
    pub tiers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::retry::MAX_RETRIES_LIMIT;
    use crate::schema_check::{check, node, rules, schema};

    fn rp(spec: Value) -> Value {
        json!({
            "apiVersion": "warren.dev/v1alpha1",
            "kind": "RetryPolicy",
            "metadata": {"name": "default", "namespace": "shop"},
            "spec": spec,
        })
    }

    fn create(spec: Value) -> Result<(), Vec<String>> {
        check::<RetryPolicy>(&rp(spec), None)
    }

    /// The same spec as the sidecar reads it.
    fn parse(spec: &Value) -> RetryPolicySpec {
        serde_json::from_value(spec.clone()).unwrap()
    }

    #[test]
    fn the_schema_carries_the_backoff_rules_and_bounds() {
        let s = schema::<RetryPolicy>();
        assert_eq!(
            rules(node(&s, "spec.backoff")),
            [
                (
                    "duration(self.initial) > duration('0s')",
                    "backoff.initial must be greater than zero"
                ),
                (
                    "duration(self.max) >= duration(self.initial)",
                    "backoff.max must be at least backoff.initial"
                ),
            ]
            .map(|(r, m)| (r.to_owned(), m.to_owned()))
        );
        let max_retries = node(&s, "spec.maxRetries");
        assert_eq!(max_retries["minimum"], json!(0.0));
        assert_eq!(max_retries["maximum"], json!(f64::from(MAX_RETRIES_LIMIT)));
        assert_eq!(node(&s, "spec.backoff.multiplier")["minimum"], json!(1.0));
        assert!(node(&s, "spec.backoff.multiplier").get("maximum").is_none());
        assert_eq!(node(&s, "spec.backoff.jitter")["minimum"], json!(0.0));
        assert_eq!(node(&s, "spec.backoff.jitter")["maximum"], json!(1.0));
        for d in ["spec.backoff.initial", "spec.backoff.max"] {
            assert_eq!(node(&s, d)["maxLength"], 64, "{d}");
        }
        // A 2xx pattern means success; the schema refuses it as validate() does.
        let pattern = node(&s, "spec.nonRetryableStatuses")["items"]["pattern"]
            .as_str()
            .unwrap();
        assert_eq!(pattern, "^[1345]([0-9][0-9]|xx|XX)$");
    }

    #[test]
    fn backoff_rules_agree_with_validate() {
        // (spec, the CEL message it fails with; "" when valid). Each spec must
        // get the same verdict from the schema's rules and from validate().
        const MAX: &str = "max must be at least";
        const ZERO: &str = "initial must be greater than zero";
        let cases = [
            (r#"{}"#, ""),
            (r#"{"backoff": {"initial": "500ms", "max": "1s"}}"#, ""),
            (r#"{"backoff": {"initial": "1m30s", "max": "90s"}}"#, ""),
            (r#"{"backoff": {"initial": "90s", "max": "1m30s"}}"#, ""),
            (r#"{"backoff": {"initial": "1s500ms", "max": "2h"}}"#, ""),
            // The default max is 5m.
            (r#"{"backoff": {"initial": "10m"}}"#, MAX),
            (r#"{"backoff": {"initial": "2s", "max": "1999ms"}}"#, MAX),
            (r#"{"backoff": {"initial": "1h", "max": "59m59s"}}"#, MAX),
            (r#"{"backoff": {"initial": "0s"}}"#, ZERO),
            (r#"{"backoff": {"initial": "0ms", "max": "0s"}}"#, ZERO),
        ];
        for (text, failure) in cases {
            let spec: Value = serde_json::from_str(text).unwrap();
            let cel = create(spec.clone());
            let rust = parse(&spec).validate();
            if failure.is_empty() {
                assert_eq!(cel, Ok(()), "{spec}");
                assert_eq!(rust, Ok(()), "{spec}");
            } else {
                let errors = cel.expect_err(text);
                assert!(
                    errors.len() == 1 && errors[0].starts_with("spec.backoff: backoff."),
                    "{spec}: {errors:?}"
                );
                assert!(errors[0].contains(failure), "{spec}: {errors:?}");
                assert!(rust.is_err(), "{spec}: validate() accepted it");
            }
        }
    }

    #[test]
    fn updates_are_checked_like_creates() {
        let good = rp(json!({"backoff": {"initial": "1s", "max": "10s"}}));
        let bad = rp(json!({"backoff": {"initial": "1s", "max": "500ms"}}));
        check::<RetryPolicy>(&good, Some(&bad)).unwrap();
        let errors = check::<RetryPolicy>(&bad, Some(&good)).unwrap_err();
        assert!(
            errors[0].contains("backoff.max must be at least"),
            "{errors:?}"
        );
    }
}
