//! warren-operator: reconciles `ReliableQueue` and `RetryPolicy` resources
//! into RabbitMQ topology and injects the sidecar into annotated pods.
//!
//! - [`crdgen`]: the CRD manifests generated from [`warren_crds`]' types.
//!
//! The broker object names and the retry delay schedule it plans from live
//! in [`warren_crds`], shared with the sidecar.

pub mod crdgen;

pub use warren_crds::{backoff, names};
