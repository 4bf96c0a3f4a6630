//! warren-operator: reconciles `ReliableQueue` and `RetryPolicy` resources
//! into RabbitMQ topology and injects the sidecar into annotated pods.
//!
//! The broker object names and the retry delay schedule it plans from live
//! in [`warren_crds`], shared with the sidecar.

pub use warren_crds::{backoff, names};
