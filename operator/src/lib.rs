//! warren-operator: reconciles `ReliableQueue` and `RetryPolicy` resources
//! into RabbitMQ topology and injects the sidecar into annotated pods.
//!
//! - [`crdgen`]: the CRD manifests generated from [`warren_crds`]' types;
//! - [`plan`]: spec and retry policy in, desired broker topology out (pure);
//! - [`apply`]: makes a broker match a plan over the management HTTP API;
//! - [`manifests`]: Warren resources read from YAML files;
//! - [`broker_url`]: the broker URL's credentials, host and TLS;
//! - [`controller`]: the Kubernetes controller (status, events, finalizer);
//! - [`retry_policy`]: the RetryPolicy controller (its `Valid` condition and tiers);
//! - [`metrics`]: the operator's Prometheus metrics;
//! - [`inject`]: sidecar injection into a pod spec (pure);
//! - [`inject_files`]: `inject -f`, the same injection into YAML files;
//! - [`admission`]: the webhook's Pod handler (injection and claims);
//! - [`pool`]: outbox claims that outlive pods, and their drain Jobs;
//! - [`webhook`]: the HTTPS admission webhook server (`POST /mutate`);
//! - [`certs`]: its TLS certificates (self-managed CA or a cert-manager directory).
//!
//! The broker object names and the retry delay schedule it plans from live
//! in [`warren_crds`], shared with the sidecar.

pub mod admission;
pub mod apply;
pub mod broker_url;
pub mod certs;
pub mod controller;
pub mod crdgen;
pub mod inject;
pub mod inject_files;
pub mod manifests;
pub mod metrics;
pub mod plan;
pub mod pool;
pub mod retry_policy;
pub mod webhook;

pub use warren_crds::{backoff, names};
