//! warren-operator: reconciles `ReliableQueue` and `RetryPolicy` resources
//! into RabbitMQ topology and injects the sidecar into annotated pods.
//!
//! - [`crdgen`]: the CRD manifests generated from [`warren_crds`]' types;
//! - [`plan`]: spec and retry policy in, desired broker topology out (pure);
//! - [`apply`]: makes a broker match a plan over the management HTTP API;
//! - [`manifests`]: Warren resources read from YAML files, broker URLs;
//! - [`controller`]: the Kubernetes controller (status, events, finalizer);
//! - [`metrics`]: the operator's Prometheus metrics.
//!
//! The broker object names and the retry delay schedule it plans from live
//! in [`warren_crds`], shared with the sidecar.

pub mod apply;
pub mod controller;
pub mod crdgen;
pub mod manifests;
pub mod metrics;
pub mod plan;

pub use warren_crds::{backoff, names};
