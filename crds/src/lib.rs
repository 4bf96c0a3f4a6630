//! Warren's API contract, shared by `warren-operator` and `warren-sidecar`.
//!
//! - [`names`]: the names of the broker objects Warren owns for a queue
//!   (`Q`, `Q.retry`, `Q.retry.<delay>`, `Q.parked`). The operator declares
//!   them and the sidecar publishes to them, so both must derive them from
//!   one place.
//! - [`backoff`]: the retry delay schedule of a retry policy, and the delay
//!   tiers (one queue per distinct delay) it turns into.
//! - [`retry`]: a retry policy (`RetryPolicy`'s spec): retries, backoff,
//!   delay strategy and which app answers are retried.
//! - [`sidecar_config`]: the sidecar's consumer configuration.
//! - [`duration`]: durations written as `4s` or `1m30s`.
//! - [`error_chain`]: an error with its causes on one line, as both the
//!   operator and the sidecar report errors.
//! - [`outbox`]: how many bytes an outbox volume of a given size can hold.
//! - with the `kube` feature, the custom resources: [`reliable_queue`]
//!   (`ReliableQueue`) and [`retry_policy`] (`RetryPolicy`), group
//!   `warren.dev`, version `v1alpha1`.

pub mod backoff;
pub mod duration;
pub mod error_chain;
pub mod names;
pub mod outbox;
#[cfg(feature = "kube")]
pub mod reliable_queue;
pub mod retry;
#[cfg(feature = "kube")]
pub mod retry_policy;
#[cfg(all(test, feature = "kube"))]
mod schema_check;
pub mod sidecar_config;
