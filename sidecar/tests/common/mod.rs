//! Helpers shared by the sidecar's integration tests: topology, a consumer
//! that feeds the account, HTTP producers, and the sidecar as an in-process
//! server or as a separate process.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::task::JoinHandle;
use warren_sidecar::config::Config;
use warren_testkit::{Account, RabbitNode};

pub const EXCHANGE: &str = "orders";
pub const QUEUE: &str = "orders";
pub const KEY: &str = "created";

/// Declares the work exchange, a quorum queue and the binding tests use.
pub async fn declare_topology(node: &RabbitNode) {
    node.declare_exchange(EXCHANGE, "direct")
        .await
        .expect("declare exchange");
    node.declare_quorum_queue(QUEUE)
        .await
        .expect("declare queue");
    node.bind(EXCHANGE, QUEUE, KEY).await.expect("bind");
}

/// Runs a blocking node operation (start, kill, restart) off the runtime's
/// worker threads, so the in-process sidecar keeps running meanwhile.
pub async fn on_node(
    mut node: RabbitNode,
    f: impl FnOnce(&mut RabbitNode) -> anyhow::Result<()> + Send + 'static,
) -> RabbitNode {
    tokio::task::spawn_blocking(move || {
        f(&mut node).expect("node operation");
        node
    })
    .await
    .expect("node operation panicked")
}

/// Starts a private node off the runtime's worker threads.
pub async fn start_node() -> RabbitNode {
    tokio::task::spawn_blocking(|| RabbitNode::start().expect("start private RabbitMQ node"))
        .await
        .unwrap()
}

/// A sidecar configuration tuned for tests: quick reconnects and retries.
pub fn test_config(broker_url: &str, data_dir: &Path) -> Config {
    let mut c = Config::for_local(broker_url, data_dir.to_path_buf());
    c.reconnect_initial = Duration::from_millis(100);
    c.reconnect_max = Duration::from_millis(500);
    c.retry_initial = Duration::from_millis(100);
    c.retry_max = Duration::from_millis(500);
    c.heartbeat = Duration::from_secs(2);
    c.confirm_timeout = Duration::from_secs(5);
    c.connect_timeout = Duration::from_secs(3);
    c
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// `GET /v1/outbox` as JSON.
pub async fn outbox_report(api: &str) -> serde_json::Value {
    client()
        .get(format!("{api}/v1/outbox"))
        .send()
        .await
        .expect("GET /v1/outbox")
        .json()
        .await
        .expect("outbox report is JSON")
}

/// `POST /v1/batch` with `messages` (each a JSON batch entry).
pub async fn post_batch(api: &str, messages: &[serde_json::Value]) -> reqwest::Response {
    client()
        .post(format!("{api}/v1/batch"))
        .json(&serde_json::json!({ "messages": messages }))
        .send()
        .await
        .expect("POST /v1/batch")
}

/// The entries of the dead-letter area (`GET /v1/outbox/dead`), up to 1000.
pub async fn dead_letters(api: &str) -> Vec<serde_json::Value> {
    let dead: serde_json::Value = client()
        .get(format!("{api}/v1/outbox/dead?limit=1000"))
        .send()
        .await
        .expect("GET /v1/outbox/dead")
        .json()
        .await
        .expect("dead-letter list is JSON");
    dead["messages"].as_array().expect("messages").clone()
}

/// The text of `GET /metrics` on the admin address.
pub async fn metrics_text(admin: &str) -> String {
    client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes one message through the sidecar; true if answered 202.
pub async fn publish(
    http: &reqwest::Client,
    api: &str,
    exchange: &str,
    key: &str,
    id: &str,
    body: Vec<u8>,
) -> Result<bool, reqwest::Error> {
    let resp = http
        .post(format!("{api}/v1/publish/{exchange}/{key}"))
        .header("X-Warren-Message-Id", id)
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await?;
    Ok(resp.status() == reqwest::StatusCode::ACCEPTED)
}

/// Publishes `count` messages with ids `<prefix>-<n>` (the body is the id)
/// one after another, each of which must be answered 202, and records them
/// in `account`.
pub async fn publish_acked(api: &str, prefix: &str, count: usize, account: &Account) {
    let http = client();
    for i in 0..count {
        let id = format!("{prefix}-{i:04}");
        assert!(
            publish(&http, api, EXCHANGE, KEY, &id, id.as_bytes().to_vec())
                .await
                .unwrap(),
            "{id} not accepted"
        );
        account.record_acked(id);
    }
}

/// Concurrent HTTP producers that record every 202 in the account.
pub struct Producers {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    /// Requests answered 202.
    pub acked: Arc<AtomicU64>,
    /// Requests refused or failed (the producer retries them with a new id).
    pub refused: Arc<AtomicU64>,
}

impl Producers {
    /// `clients` tasks, each publishing up to `per_client` messages with ids
    /// `<prefix>-<client>-<n>` to `api`; the body is the id.
    /// `pace` is the pause between two publishes of one client.
    pub fn start(
        api: &str,
        account: &Account,
        prefix: &str,
        clients: usize,
        per_client: u64,
        pace: Duration,
    ) -> Producers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|c| {
                let (stop, acked, refused, account, base) = (
                    stop.clone(),
                    acked.clone(),
                    refused.clone(),
                    account.clone(),
                    api.to_owned(),
                );
                let prefix = prefix.to_owned();
                tokio::spawn(async move {
                    let http = client();
                    let mut n = 0;
                    while n < per_client && !stop.load(Ordering::Relaxed) {
                        let id = format!("{prefix}-{c}-{n}");
                        match publish(&http, &base, EXCHANGE, KEY, &id, id.as_bytes().to_vec())
                            .await
                        {
                            Ok(true) => {
                                account.record_acked(id);
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                        n += 1;
                        if !pace.is_zero() {
                            tokio::time::sleep(pace).await;
                        }
                    }
                })
            })
            .collect();
        Producers {
            stop,
            tasks,
            acked,
            refused,
        }
    }

    /// Waits for all producers to finish their messages.
    pub async fn finish(self) {
        for t in self.tasks {
            t.await.unwrap();
        }
    }

    /// Stops the producers early.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.finish().await;
    }
}

/// Consumes `queue` until every acknowledged id in `account` has been
/// received and the queue has been quiet for a moment, or `timeout` passes.
/// Returns the received ids and bodies in arrival order.
pub async fn consume_all(
    url: &str,
    queue: &str,
    account: &Account,
    timeout: Duration,
) -> Vec<(String, Vec<u8>)> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("consumer connects");
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(500, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "test-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let deadline = Instant::now() + timeout;
    let mut order = Vec::new();
    loop {
        let quiet = if account.report().lost == 0 {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(2)
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(quiet.min(left), consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .expect("every forwarded message carries a message_id");
                assert_eq!(
                    delivery.properties.delivery_mode(),
                    &Some(2),
                    "forwarded messages are persistent"
                );
                account.record_received(id.clone());
                order.push((id, delivery.data.clone()));
                delivery.ack(BasicAckOptions::default()).await.unwrap();
            }
            Ok(Some(Err(e))) => panic!("consumer failed: {e}"),
            Ok(None) => panic!("consumer cancelled"),
            Err(_) => {
                if account.report().lost == 0 || Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    let _ = conn.close(200, "done".into()).await;
    order
}

/// Waits until the sidecar's outbox has nothing pending.
pub async fn wait_drained(api: &str, timeout: Duration) {
    wait_until(timeout, "the outbox to drain", || async {
        let r = outbox_report(api).await;
        r["pending"] == 0
    })
    .await;
}

/// The sidecar binary run as a separate process, so tests can SIGKILL it.
pub struct SidecarProcess {
    child: Option<Child>,
    /// Base URL of its API.
    pub api: String,
    /// Base URL of its admin endpoints.
    pub admin: String,
    args: Vec<String>,
    log: PathBuf,
}

impl SidecarProcess {
    /// Starts `warren-sidecar` with `args` plus listen addresses on fresh
    /// ports, and waits for `/readyz`.
    pub async fn start(data_dir: &Path, broker_url: &str, extra: &[&str]) -> SidecarProcess {
        let api_port = warren_testkit::free_port();
        let admin_port = warren_testkit::free_port();
        let mut args: Vec<String> = vec![
            format!("--broker-url={broker_url}"),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen=127.0.0.1:{api_port}"),
            format!("--admin-listen=127.0.0.1:{admin_port}"),
            "--reconnect-initial=100ms".into(),
            "--reconnect-max=500ms".into(),
            "--heartbeat=2s".into(),
            "--confirm-timeout=5s".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = data_dir.with_extension("log");
        let mut p = SidecarProcess {
            child: None,
            api: format!("http://127.0.0.1:{api_port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            args,
            log,
        };
        p.spawn().await;
        p
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_warren-sidecar"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn warren-sidecar");
        self.child = Some(child);
        let admin = self.admin.clone();
        let http = client();
        wait_until(
            Duration::from_secs(20),
            "the sidecar to become ready",
            || {
                let http = http.clone();
                let url = format!("{admin}/readyz");
                async move {
                    http.get(url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                }
            },
        )
        .await;
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same command again (same data dir and ports).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart needs a stopped sidecar");
        self.spawn().await;
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "sidecar did not exit within {timeout:?} of SIGTERM\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The end of the sidecar's log, for diagnostics.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- sidecar log tail ---\n{}", self.log_tail());
        }
        self.kill9();
    }
}
