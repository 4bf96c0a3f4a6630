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
