//! Warren's test harness.
//!
//! Warren promises that a message acknowledged by the sidecar reaches the
//! broker. Tests of that promise need a real broker they can hurt and a way
//! to count every message, so this crate provides:
//!
//! - [`RabbitNode`] (`node.rs`): a private RabbitMQ node per test, on its own
//!   ports and data dir, that can be killed with SIGKILL, stopped gracefully,
//!   restarted on the same data, frozen, and pushed into a memory alarm;
//! - [`ControlPlane`] (`cluster.rs`): a private Kubernetes control plane
//!   (etcd, kube-apiserver, kube-controller-manager built from source) with
//!   an admin and ServiceAccount clients, kubectl and helm;
//! - [`PgCluster`] (`postgres.rs`): a private PostgreSQL cluster per test,
//!   on its own port and data dir, that can be stopped, killed with SIGKILL
//!   and started again on the same data (the relay's tests);
//! - [`Proxy`] (`proxy.rs`): an in-process TCP proxy that cuts, resets,
//!   stalls or refuses connections on demand;
//! - [`SidecarProcess`] (`sidecar.rs`): the `warren-sidecar` binary as a
//!   process that can be killed with SIGKILL, stopped with SIGTERM and
//!   restarted on the same outbox;
//! - [`TestCa`] (`tls.rs`): a CA and server certificate generated at test time;
//! - [`TestApp`] (`app.rs`): an HTTP app that receives the sidecar's
//!   deliveries, answers as told and records them;
//! - [`Account`] (`account.rs`): the ledger of acknowledged and received
//!   message ids that every message-path test asserts on;
//! - [`scenario`]: the fault-injection engine of the suite and the demo
//!   (broker, proxy, producer and consumer sidecars, a seeded schedule of
//!   faults, and the account at the end);
//! - [`free_port`] (`ports.rs`) and [`init_tracing`] for test plumbing.
//!
//! Node lifecycle calls block (see [`node`] for how to call them from async
//! tests); the proxy and the queue helpers are async and need a tokio runtime.

pub mod account;
pub mod app;
pub mod cluster;
pub mod docs;
pub mod node;
pub mod operator;
pub mod ports;
pub mod postgres;
pub mod proxy;
pub mod rabbit_cluster;
pub mod scenario;
pub mod sidecar;
pub mod tls;

pub use account::{Account, AccountReport};
pub use app::{Reply, Seen, TestApp};
pub use cluster::ControlPlane;
pub use node::{NodeOptions, RabbitNode};
pub use ports::{PortReservation, free_port, reserve_port};
pub use postgres::PgCluster;
pub use proxy::Proxy;
pub use rabbit_cluster::RabbitCluster;
pub use sidecar::{SidecarOptions, SidecarProcess, sidecar_bin};
pub use tls::TestCa;

/// Install a `tracing` subscriber that writes through the test harness's
/// capture (so output shows only for failing tests) and honours `RUST_LOG`
/// (default `info`). Safe to call from every test; only the first call in a
/// process installs anything.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

#[cfg(test)]
mod tests {
    /// Handles are moved into spawned tasks and threads by tests.
    #[test]
    fn handles_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<crate::RabbitNode>();
        assert_send_sync::<crate::Proxy>();
        assert_send_sync::<crate::Account>();
        assert_send_sync::<crate::TestCa>();
    }
}
