//! Fault-injection scenarios: a real broker, a producer and a consumer
//! sidecar (separate processes, both reaching the broker through a
//! [`Proxy`]), a stream of messages, and a seeded schedule of faults, with
//! an [`Account`] of every message at the end.
//!
//! Both the fault-injection suite (`tests/tests/faults.rs`) and the demo
//! (`warren-demo`) run on this engine:
//!
//! 1. [`Rig::start`] starts a private [`RabbitNode`], applies a
//!    ReliableQueue manifest (with the operator's planner and applier, or
//!    with the `warren-operator apply` binary), restarts the node once
//!    cleanly, and starts the proxy, the consuming app ([`CountingApp`]),
//!    both sidecars and N concurrent HTTP producers;
//! 2. [`Rig::run`] plays [`Step`]s of a [`Schedule`]: each step injects a
//!    [`Fault`], holds it, heals it, waits until messages flow again and
//!    pauses, and reports what the fault did to acceptance and delivery
//!    (a [`StepReport`]);
//! 3. [`Rig::settle`] heals everything, stops the producers, waits until
//!    every acknowledged message arrived (or a timeout) and returns the
//!    [`Outcome`]; [`Outcome::check`] fails on any loss.
//!
//! Producers publish unique ids (`X-Warren-Message-Id`, the body is the id)
//! and record an id as acknowledged only on `202`. A `507` (outbox full), a
//! `503` or a refused connection (sidecar down) is no acknowledgement: the
//! producer backs off and publishes the same id again.
//!
//! The producing sidecar has a realistic outbox (the sidecar's default
//! limit unless [`RigOptions::max_outbox_messages`] says otherwise), so
//! broker and network outages are absorbed: publishes keep being answered
//! `202`. The full outbox is played on its own: [`Fault::OutboxFull`] cuts a
//! second producing sidecar with a small outbox
//! ([`RigOptions::capped_outbox_messages`], its own proxy) off the broker
//! and publishes to it until it answers `507`. Its publishers treat a
//! `507` as the app should: the message was refused, not stored; they wait
//! `Retry-After` and go on with the next message. Refused ids are kept
//! apart: they are not acknowledged, so not lost, and must never arrive.
//!
//! The schedule is a pure function of its seed: replaying a seed replays
//! the same faults with the same hold and pause times.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use warren_crds::duration::HumanDuration;
use warren_crds::error_chain::error_chain;
use warren_crds::retry::RetryPolicySpec;
use warren_crds::sidecar_config::{AppEndpoint, ConsumeQueue, SidecarConfig};
use warren_operator::apply::Broker;
use warren_operator::manifests::Manifests;
use warren_operator::plan::{Topology, plan};

use crate::{Account, AccountReport, Proxy, RabbitNode, SidecarOptions, SidecarProcess};

/// The manifest scenarios use unless told otherwise: `examples/orders.yaml`.
pub fn example_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("orders.yaml")
}

// ---------------------------------------------------------------- faults

/// One kind of fault a step injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// SIGKILL the broker; start it again after the hold.
    BrokerKill9,
    /// Stop the broker gracefully (320 CONNECTION_FORCED); start it again.
    BrokerStop,
    /// Refuse new connections and close the live ones with a FIN.
    NetworkCut,
    /// Forward nothing either way (a black hole, noticed by heartbeats).
    NetworkStall,
    /// Refuse new connections and reset the live ones (RST).
    NetworkReset,
    /// SIGKILL the producing sidecar; restart it on the same outbox.
    ProducerKill9,
    /// SIGKILL the consuming sidecar (deliveries in flight come again).
    ConsumerKill9,
    /// Stop the broker until the producing sidecar's outbox is full and
    /// publishes are answered `507`.
    OutboxFull,
}

impl Fault {
    /// The name `--faults` takes (`broker-kill9`, `outbox-full`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Fault::BrokerKill9 => "broker-kill9",
            Fault::BrokerStop => "broker-stop",
            Fault::NetworkCut => "network-cut",
            Fault::NetworkStall => "network-stall",
            Fault::NetworkReset => "network-reset",
            Fault::ProducerKill9 => "producer-kill9",
            Fault::ConsumerKill9 => "consumer-kill9",
            Fault::OutboxFull => "outbox-full",
        }
    }

    /// Every kind; each round of a [`Schedule`] is a permutation of these.
    pub const ALL: [Fault; 8] = [
        Fault::BrokerKill9,
        Fault::BrokerStop,
        Fault::NetworkCut,
        Fault::NetworkStall,
        Fault::NetworkReset,
        Fault::ProducerKill9,
        Fault::ConsumerKill9,
        Fault::OutboxFull,
    ];

    /// Bounds of the hold time in ms. A stall is held past two heartbeats
    /// (2 s each in the rig) so that it is detected as a dead peer.
    fn hold_ms(self) -> (u64, u64) {
        match self {
            Fault::NetworkStall => (3_000, 7_000),
            Fault::ProducerKill9 | Fault::ConsumerKill9 => (300, 2_500),
            _ => (1_000, 4_000),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::BrokerKill9 => "broker kill -9",
            Fault::BrokerStop => "broker graceful stop",
            Fault::NetworkCut => "network cut",
            Fault::NetworkStall => "network stall",
            Fault::NetworkReset => "network reset",
            Fault::ProducerKill9 => "producer sidecar kill -9",
            Fault::ConsumerKill9 => "consumer sidecar kill -9",
            Fault::OutboxFull => "outbox full",
        })
    }
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Fault, String> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown fault {s:?} (one of {})", names.join(", "))
            })
    }
}

/// One step: inject `fault`, hold it, heal it, wait for messages to flow,
/// then pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub fault: Fault,
    /// How long the fault stays (for [`Fault::OutboxFull`]: after the
    /// first `507`).
    pub hold: Duration,
    /// Calm time after healing.
    pub pause: Duration,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (hold {:.1}s, pause {:.1}s)",
            self.fault,
            self.hold.as_secs_f64(),
            self.pause.as_secs_f64()
        )
    }
}

/// A seeded sequence of steps: endless rounds of every [`Fault`] in a
/// random order ([`Schedule::new`]), or given faults in a given order
/// ([`Schedule::of`]); hold and pause times are random. The same seed (and
/// list) gives the same steps.
#[derive(Debug, Clone)]
pub struct Schedule {
    seed: u64,
    rng: StdRng,
    /// What is left of the current round, last first.
    round: Vec<Fault>,
    /// Start a new round when this one is done.
    endless: bool,
}

impl Schedule {
    pub fn new(seed: u64) -> Schedule {
        Schedule {
            seed,
            rng: StdRng::seed_from_u64(seed),
            round: Vec::new(),
            endless: true,
        }
    }

    /// `faults`, once each in this order, then the end.
    pub fn of(seed: u64, faults: &[Fault]) -> Schedule {
        Schedule {
            seed,
            rng: StdRng::seed_from_u64(seed),
            round: faults.iter().rev().copied().collect(),
            endless: false,
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl Iterator for Schedule {
    type Item = Step;

    fn next(&mut self) -> Option<Step> {
        if self.round.is_empty() && self.endless {
            self.round = Fault::ALL.to_vec();
            self.round.shuffle(&mut self.rng);
        }
        let fault = self.round.pop()?;
        let (lo, hi) = fault.hold_ms();
        let hold = Duration::from_millis(self.rng.random_range(lo..=hi));
        let pause = Duration::from_millis(self.rng.random_range(1_000..=3_000));
        Some(Step { fault, hold, pause })
    }
}

/// The seed in the environment variable `var`, else a random one.
///
/// # Panics
/// When `var` is set but not a number.
pub fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={s:?} is not a u64")),
        Err(_) => rand::rng().random(),
    }
}

// ---------------------------------------------------------------- output

/// Where a scenario reports: one timestamped line per event, and a progress
/// line that is rewritten in place on a terminal (`\r`) and printed as a
/// line of its own elsewhere.
#[derive(Debug, Clone)]
pub struct Console {
    start: Instant,
    tty: bool,
}

impl Console {
    /// `tty`: rewrite the progress line in place.
    pub fn new(tty: bool) -> Console {
        Console {
            start: Instant::now(),
            tty,
        }
    }

    /// Print one event line.
    pub fn say(&self, msg: impl fmt::Display) {
        let mut out = std::io::stdout().lock();
        let clear = if self.tty { "\r\x1b[K" } else { "" };
        let _ = writeln!(
            out,
            "{clear}[{:>6.1}s] {msg}",
            self.start.elapsed().as_secs_f64()
        );
        let _ = out.flush();
    }

    fn progress(&self, line: &str) {
        if self.tty {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\r\x1b[K{line}");
            let _ = out.flush();
        } else {
            self.say(line);
        }
    }
}

// ---------------------------------------------------------------- workload

/// How the rig declares the topology of the manifest's ReliableQueues.
#[derive(Debug, Clone)]
pub enum Apply {
    /// In-process, with `warren_operator::plan` and `warren_operator::apply`.
    Library,
    /// By running `warren-operator apply -f MANIFEST --broker-url ...
    /// --management-url ...` (this binary), its output shown.
    Cli(PathBuf),
}

/// The messaging set-up a manifest describes: where producers publish,
/// which queue the consumer consumes, with which retry policy.
#[derive(Debug)]
pub struct Workload {
    pub manifest: PathBuf,
    pub exchange: String,
    pub routing_key: String,
    pub queue: String,
    pub parking_lot: String,
    topologies: Vec<Topology>,
    policy: RetryPolicySpec,
}

impl Workload {
    /// Read the manifest; its first ReliableQueue is the one exercised.
    pub fn from_manifest(path: &Path) -> anyhow::Result<Workload> {
        let manifests = Manifests::read(&[path.to_path_buf()])?;
        let policy_of = |r: &Option<String>| -> anyhow::Result<RetryPolicySpec> {
            match r {
                Some(name) => manifests
                    .policies
                    .get(name)
                    .map(|p| p.spec.clone())
                    .ok_or_else(|| anyhow!("RetryPolicy {name:?} is not in {}", path.display())),
                None => Ok(RetryPolicySpec::default()),
            }
        };
        let mut topologies = Vec::new();
        for rq in &manifests.queues {
            let policy = policy_of(&rq.spec.retry_policy_ref)?;
            topologies.push(plan(&rq.queue_name(), &rq.spec, &policy)?);
        }
        let rq = manifests
            .queues
            .first()
            .ok_or_else(|| anyhow!("no ReliableQueue in {}", path.display()))?;
        let queue = rq.queue_name();
        let routing_key = rq
            .spec
            .queue
            .bindings
            .first()
            .map(|b| b.routing_key.clone())
            .unwrap_or_else(|| queue.clone());
        Ok(Workload {
            manifest: path.to_path_buf(),
            exchange: rq.spec.exchange.name.clone(),
            routing_key,
            parking_lot: rq.parking_lot_name(),
            queue,
            policy: policy_of(&rq.spec.retry_policy_ref)?,
            topologies,
        })
    }

    /// The consumer sidecar's `--config` (YAML): the queue with the
    /// manifest's retry policy, delivered to `app_url`.
    pub fn consumer_config(&self, app_url: &str) -> String {
        let config = SidecarConfig {
            app: Some(AppEndpoint {
                url: app_url.to_owned(),
                timeout: HumanDuration::from_secs(10),
                concurrency: 16,
            }),
            queues: vec![ConsumeQueue {
                name: self.queue.clone(),
                prefetch: 32,
                parking_lot: Some(self.parking_lot.clone()),
                url: None,
                retry_policy: self.policy.clone(),
            }],
            ..Default::default()
        };
        serde_yaml_ng::to_string(&config).expect("the consumer config serializes")
    }

    /// Declare the topology on `node` as `how` says; returns what was shown.
    pub async fn apply(
        &self,
        how: &Apply,
        node: &RabbitNode,
        console: &Console,
    ) -> anyhow::Result<()> {
        match how {
            Apply::Library => {
                let broker = Broker::new(&node.management_url(), "guest", "guest")?;
                for t in &self.topologies {
                    let report = broker.apply(t).await?;
                    if !report.conflicts.is_empty() {
                        bail!("applying {}: {:?}", t.queue, report.conflicts);
                    }
                    console.say(format!(
                        "topology of {} applied ({} changes)",
                        t.queue,
                        report.changes.len()
                    ));
                }
            }
            Apply::Cli(bin) => {
                let mut cmd = Command::new(bin);
                cmd.arg("apply")
                    .arg("-f")
                    .arg(&self.manifest)
                    .arg("--broker-url")
                    .arg(node.amqp_url())
                    .arg("--management-url")
                    .arg(node.management_url());
                console.say(format!(
                    "$ warren-operator apply -f {} --broker-url {} --management-url {}",
                    self.manifest.display(),
                    node.amqp_url(),
                    node.management_url()
                ));
                let out = tokio::task::block_in_place(|| cmd.output())
                    .with_context(|| format!("running {}", bin.display()))?;
                for line in String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .chain(String::from_utf8_lossy(&out.stderr).lines())
                {
                    console.say(format!("  {line}"));
                }
                if !out.status.success() {
                    bail!("warren-operator apply failed ({})", out.status);
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- the app

/// The consuming app: answers every delivery `200` and records its id in
/// the account. (Unlike [`crate::TestApp`] it keeps no per-delivery log, so
/// it stays cheap over hundreds of thousands of deliveries.)
pub struct CountingApp {
    /// `http://127.0.0.1:PORT/deliver`.
    pub url: String,
    shared: Arc<AppShared>,
    server: JoinHandle<()>,
}

struct AppShared {
    account: Account,
    deliveries: AtomicU64,
    /// Ids whose body was not the id.
    corrupted: Mutex<Vec<String>>,
}

impl CountingApp {
    pub async fn start(account: Account) -> anyhow::Result<CountingApp> {
        let shared = Arc::new(AppShared {
            account,
            deliveries: AtomicU64::new(0),
            corrupted: Mutex::new(Vec::new()),
        });
        let router = axum::Router::new()
            .route("/deliver", axum::routing::post(deliver))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(CountingApp {
            url: format!("http://{addr}/deliver"),
            shared,
            server,
        })
    }

    /// Deliveries so far, duplicates included.
    pub fn deliveries(&self) -> u64 {
        self.shared.deliveries.load(Ordering::Relaxed)
    }
}

impl Drop for CountingApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn deliver(State(app): State<Arc<AppShared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let id = headers
        .get("x-warren-message-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if body != id.as_bytes() {
        app.corrupted.lock().unwrap().push(id.clone());
    }
    app.account.record_received(id);
    app.deliveries.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}

// ---------------------------------------------------------------- producers

/// What the producers saw.
#[derive(Debug, Default)]
pub struct ProduceStats {
    /// `202` answers.
    pub acked: AtomicU64,
    /// Publishes not answered `202` (each retried later with the same id,
    /// except by [`OnFull::Refuse`] publishers on `507`).
    pub unacked_attempts: AtomicU64,
    /// `507` answers (outbox full).
    pub full: AtomicU64,
    /// `507` answers without a `Retry-After` header (should be 0).
    pub full_without_retry_after: AtomicU64,
    /// The last `Retry-After` of a `507`, in seconds.
    pub retry_after: AtomicU64,
    /// `503` answers and failed requests (sidecar down or restarting).
    pub unavailable: AtomicU64,
    /// Any other answer (a bug: the request is well-formed).
    pub other: AtomicU64,
    /// Ids answered `507` and given up ([`OnFull::Refuse`]).
    pub refused_ids: Mutex<Vec<String>>,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// What a publisher does with a `507`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnFull {
    /// Back off and publish the same id again.
    Retry,
    /// The message was refused: record its id as refused, wait
    /// `Retry-After` (at most a second) and go on with the next id.
    Refuse,
}

struct Producers {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Producers {
    /// `clients` publishers of ids `{prefix}{client}-{n}` to `url`.
    fn start(
        clients: usize,
        prefix: &'static str,
        url: String,
        pace: Duration,
        on_full: OnFull,
        account: &Account,
        stats: &Arc<ProduceStats>,
    ) -> Producers {
        let stop = Arc::new(AtomicBool::new(false));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client");
        let tasks = (0..clients)
            .map(|c| {
                let (stop, url, http) = (stop.clone(), url.clone(), http.clone());
                let (account, stats) = (account.clone(), stats.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    let mut backoff = Duration::from_millis(20);
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("{prefix}{c}-{n:08}");
                        let resp = http
                            .post(&url)
                            .header("X-Warren-Message-Id", &id)
                            .header("Content-Type", "text/plain")
                            .body(id.clone())
                            .send()
                            .await;
                        let resp = resp.map(|r| {
                            let retry_after = r
                                .headers()
                                .get(reqwest::header::RETRY_AFTER)
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse::<u64>().ok());
                            (r.status().as_u16(), retry_after)
                        });
                        let counter = match resp {
                            Ok((202, _)) => {
                                account.record_acked(id);
                                stats.acked.fetch_add(1, Ordering::Relaxed);
                                n += 1;
                                backoff = Duration::from_millis(20);
                                tokio::time::sleep(pace).await;
                                continue;
                            }
                            Ok((507, retry_after)) => {
                                match retry_after {
                                    Some(secs) => stats.retry_after.store(secs, Ordering::Relaxed),
                                    None => {
                                        stats
                                            .full_without_retry_after
                                            .fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                if on_full == OnFull::Refuse {
                                    stats.full.fetch_add(1, Ordering::Relaxed);
                                    stats.unacked_attempts.fetch_add(1, Ordering::Relaxed);
                                    stats.refused_ids.lock().unwrap().push(id);
                                    n += 1;
                                    let wait = Duration::from_secs(retry_after.unwrap_or(1));
                                    tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
                                    continue;
                                }
                                &stats.full
                            }
                            Ok((503, _)) | Err(_) => &stats.unavailable,
                            Ok(_) => &stats.other,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        stats.unacked_attempts.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                })
            })
            .collect();
        Producers { stop, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// A snapshot of [`ProduceStats`], to tell what happened during a step.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    acked: u64,
    full: u64,
    unavailable: u64,
}

impl Counts {
    fn of(stats: &ProduceStats) -> Counts {
        Counts {
            acked: load(&stats.acked),
            full: load(&stats.full),
            unavailable: load(&stats.unavailable),
        }
    }

    fn since(self, before: Counts) -> Counts {
        Counts {
            acked: self.acked - before.acked,
            full: self.full - before.full,
            unavailable: self.unavailable - before.unavailable,
        }
    }
}

/// `12345` as `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// Measures the longest stretch without a delivery to the app while it
/// runs.
struct PauseMeter {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Duration>,
}

impl PauseMeter {
    fn start(app: Arc<AppShared>) -> PauseMeter {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut seen = app.deliveries.load(Ordering::Relaxed);
                let mut since = Instant::now();
                let mut longest = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let now = app.deliveries.load(Ordering::Relaxed);
                    if now != seen {
                        seen = now;
                        since = Instant::now();
                    }
                    longest = longest.max(since.elapsed());
                }
                longest
            }
        });
        PauseMeter { stop, task }
    }

    async fn finish(self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// What one step did to acceptance and delivery.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: Step,
    /// From injecting the fault to healing it (broker started again,
    /// network resumed, sidecar restarted).
    pub down: Duration,
    /// The main producers' publishes from injecting the fault until
    /// messages flowed again: answered `202`.
    pub accepted: u64,
    /// ... answered `507`.
    pub refused: u64,
    /// ... answered `503` or not at all (sidecar down).
    pub unavailable: u64,
    /// The longest stretch without a delivery to the app.
    pub delivery_paused: Duration,
    /// Messages flowed again after healing.
    pub resumed: bool,
    /// [`Fault::OutboxFull`] only: what the capped sidecar answered.
    pub capped: Option<CappedReport>,
}

/// What the capped producing sidecar answered during [`Fault::OutboxFull`].
#[derive(Debug, Clone, Copy)]
pub struct CappedReport {
    /// How long it was cut off the broker.
    pub cut_off: Duration,
    /// Its `--max-outbox-messages`.
    pub limit: u64,
    /// Publishes answered `202`.
    pub accepted: u64,
    /// Publishes answered `507` (refused: not stored, not acknowledged).
    pub refused: u64,
    /// The `Retry-After` of its `507`s, in seconds.
    pub retry_after: Option<u64>,
    /// It answered `202` again after its outbox drained.
    pub accepts_again: bool,
}

impl fmt::Display for StepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
        match &self.capped {
            Some(c) => write!(
                f,
                "{}: capped sidecar ({} messages) cut off the broker {}: answered 202: {}, \
                 refused 507: {} (Retry-After: {}), {}; main producer",
                self.step.fault,
                thousands(c.limit),
                secs(self.down),
                thousands(c.accepted),
                thousands(c.refused),
                c.retry_after.map_or("missing".into(), |s| format!("{s} s")),
                if c.accepts_again {
                    "accepting again after draining"
                } else {
                    "NOT accepting again"
                }
            )?,
            None => {
                let what = match self.step.fault {
                    Fault::BrokerKill9 | Fault::BrokerStop => "down",
                    Fault::ProducerKill9 | Fault::ConsumerKill9 => "dead",
                    _ => "broken",
                };
                write!(f, "{}: {} {what},", self.step.fault, secs(self.down))?;
            }
        }
        write!(
            f,
            " publishes answered 202: {}, refused: {}",
            thousands(self.accepted),
            thousands(self.refused)
        )?;
        if self.unavailable > 0 {
            write!(
                f,
                ", unanswered (sidecar down): {}",
                thousands(self.unavailable)
            )?;
        }
        write!(
            f,
            "; delivery paused {}, {}",
            secs(self.delivery_paused),
            if self.resumed {
                "resumed"
            } else {
                "NOT resumed"
            }
        )
    }
}

// ---------------------------------------------------------------- the rig

/// How to set up a [`Rig`].
#[derive(Debug, Clone)]
pub struct RigOptions {
    /// The seed of the schedule, printed in every report.
    pub seed: u64,
    /// ReliableQueue manifest (default: `examples/orders.yaml`).
    pub manifest: PathBuf,
    /// How its topology is declared.
    pub apply: Apply,
    /// Concurrent HTTP producers.
    pub producers: usize,
    /// Pause of each producer after a `202`.
    pub pace: Duration,
    /// `--max-outbox-messages` of the producing sidecar; `None`: the
    /// sidecar's default (1,000,000 messages, and what the volume holds).
    pub max_outbox_messages: Option<u64>,
    /// `--max-outbox-messages` of the second, capped producing sidecar that
    /// [`Fault::OutboxFull`] fills.
    pub capped_outbox_messages: u64,
    /// Play these faults once each, in this order, instead of endless
    /// seeded rounds of every fault.
    pub faults: Option<Vec<Fault>>,
    /// Period of the progress line; `None`: no progress line.
    pub progress_every: Option<Duration>,
    pub console: Console,
}

impl RigOptions {
    pub fn new(seed: u64, console: Console) -> RigOptions {
        RigOptions {
            seed,
            manifest: example_manifest(),
            apply: Apply::Library,
            producers: 4,
            pace: Duration::from_millis(4),
            max_outbox_messages: None,
            capped_outbox_messages: 500,
            faults: None,
            progress_every: Some(Duration::from_secs(1)),
            console,
        }
    }
}

/// Broker, proxy, app, both sidecars and the producers; see the module docs.
pub struct Rig {
    opts: RigOptions,
    workload: Workload,
    account: Account,
    stats: Arc<ProduceStats>,
    app: CountingApp,
    producer: SidecarProcess,
    consumer: SidecarProcess,
    proxy: Proxy,
    /// The second, capped producing sidecar and its own proxy, which only
    /// [`Fault::OutboxFull`] uses and cuts.
    capped: SidecarProcess,
    capped_proxy: Proxy,
    /// What the capped sidecar's publishers saw.
    capped_stats: Arc<ProduceStats>,
    node: RabbitNode,
    /// `RabbitMQ 4.0.5 (Erlang 27.3.4)`, from the management API.
    broker_version: String,
    producers: Option<Producers>,
    progress: Option<JoinHandle<()>>,
    /// What is being done right now, for the progress line.
    current: Arc<Mutex<String>>,
    /// Steps played so far, for reports.
    played: Vec<Step>,
    /// What each of them did.
    reports: Vec<StepReport>,
    schedule: Schedule,
    started: Instant,
    _dir: TempDir,
}

impl Rig {
    /// Set everything up and start producing (see the module docs).
    pub async fn start(opts: RigOptions) -> anyhow::Result<Rig> {
        let console = opts.console.clone();
        let started = Instant::now();
        let workload = Workload::from_manifest(&opts.manifest)?;
        console.say("starting a private RabbitMQ node");
        let mut node = tokio::task::block_in_place(RabbitNode::start)?;
        let broker_version = match node.management_get("/api/overview").await {
            Ok(v) => format!(
                "RabbitMQ {} (Erlang {})",
                v["rabbitmq_version"].as_str().unwrap_or("?"),
                v["erlang_version"].as_str().unwrap_or("?")
            ),
            Err(e) => format!("RabbitMQ, version unknown ({})", error_chain(e.as_ref())),
        };
        console.say(format!(
            "broker: {broker_version}, node {} (AMQP 127.0.0.1:{}, management {})",
            node.node_name(),
            node.amqp_port(),
            node.management_url()
        ));
        workload.apply(&opts.apply, &node, &console).await?;
        // RabbitMQ 3.10 only: a clean restart writes out the new quorum
        // queues' registrations, which a SIGKILL within minutes of the
        // declaration could otherwise lose (see
        // `RabbitNode::needs_quorum_registration_restart`).
        if tokio::task::block_in_place(|| node.needs_quorum_registration_restart())? {
            console.say(format!(
                "{broker_version}: restarting the broker cleanly once, so that the new queues survive a kill -9"
            ));
            tokio::task::block_in_place(|| {
                node.stop()?;
                node.start_again()
            })?;
        }
        let proxy = Proxy::start(node.amqp_addr()).await;
        let capped_proxy = Proxy::start(node.amqp_addr()).await;
        let account = Account::new();
        let app = CountingApp::start(account.clone()).await?;
        let dir = tempfile::Builder::new()
            .prefix("warren-scenario-")
            .tempdir()?;
        let mut producer_opts =
            SidecarOptions::new(proxy.amqp_url(), dir.path().join("producer-outbox"))
                .arg("--drain-timeout=2s");
        if let Some(max) = opts.max_outbox_messages {
            producer_opts = producer_opts.arg(format!("--max-outbox-messages={max}"));
        }
        let mut producer = SidecarProcess::start(producer_opts)?;
        let mut capped = SidecarProcess::start(
            SidecarOptions::new(capped_proxy.amqp_url(), dir.path().join("capped-outbox"))
                .arg(format!(
                    "--max-outbox-messages={}",
                    opts.capped_outbox_messages
                ))
                .arg("--drain-timeout=2s"),
        )?;
        let mut consumer = SidecarProcess::start(
            SidecarOptions::new(proxy.amqp_url(), dir.path().join("consumer-outbox"))
                .consumer_config(workload.consumer_config(&app.url))
                .arg("--drain-timeout=2s"),
        )?;
        producer.wait_ready().await?;
        consumer.wait_ready().await?;
        capped.wait_ready().await?;
        console.say(format!(
            "producer sidecar {} ({}) and consumer sidecar {} ready, both through proxy 127.0.0.1:{}",
            producer.api_url(),
            match opts.max_outbox_messages {
                Some(max) => format!("outbox of {} messages", thousands(max)),
                None => "default outbox limit".into(),
            },
            consumer.api_url(),
            proxy.port()
        ));
        console.say(format!(
            "capped producer sidecar {} (outbox of {} messages, for the full-outbox fault) through proxy 127.0.0.1:{}",
            capped.api_url(),
            thousands(opts.capped_outbox_messages),
            capped_proxy.port()
        ));
        let stats = Arc::new(ProduceStats::default());
        let url = format!(
            "{}/v1/publish/{}/{}",
            producer.api_url(),
            workload.exchange,
            workload.routing_key
        );
        console.say(format!(
            "{} producers publishing to exchange {:?}, routing key {:?}; the consumer delivers queue {:?} to {}",
            opts.producers, workload.exchange, workload.routing_key, workload.queue, app.url
        ));
        let producers = Producers::start(
            opts.producers,
            "p",
            url,
            opts.pace,
            OnFull::Retry,
            &account,
            &stats,
        );
        let schedule = match &opts.faults {
            Some(faults) => Schedule::of(opts.seed, faults),
            None => Schedule::new(opts.seed),
        };
        let mut rig = Rig {
            schedule,
            opts,
            workload,
            account,
            stats,
            app,
            producer,
            consumer,
            proxy,
            capped,
            capped_proxy,
            capped_stats: Arc::new(ProduceStats::default()),
            node,
            broker_version,
            producers: Some(producers),
            progress: None,
            current: Arc::new(Mutex::new("warming up".into())),
            played: Vec::new(),
            reports: Vec::new(),
            started,
            _dir: dir,
        };
        rig.progress = rig
            .opts
            .progress_every
            .map(|every| rig.spawn_progress(every));
        Ok(rig)
    }

    /// The account producers and app write to.
    pub fn account(&self) -> &Account {
        &self.account
    }

    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    pub fn stats(&self) -> &ProduceStats {
        &self.stats
    }

    /// Steps played so far.
    pub fn played(&self) -> &[Step] {
        &self.played
    }

    /// `RabbitMQ 4.0.5 (Erlang 27.3.4)`: the broker's version, from its
    /// management API.
    pub fn broker_version(&self) -> &str {
        &self.broker_version
    }

    fn set_current(&self, what: impl Into<String>) {
        *self.current.lock().unwrap() = what.into();
    }

    fn spawn_progress(&self, every: Duration) -> JoinHandle<()> {
        let console = self.opts.console.clone();
        let (account, stats, capped_stats, current) = (
            self.account.clone(),
            self.stats.clone(),
            self.capped_stats.clone(),
            self.current.clone(),
        );
        let outbox_url = format!("{}/v1/outbox", self.producer.api_url());
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_millis(500))
                .build()
                .expect("an HTTP client");
            let mut last = (Instant::now(), load(&stats.acked));
            loop {
                tokio::time::sleep(every).await;
                let pending = match http.get(&outbox_url).send().await {
                    Ok(r) => r
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|v| v["pending"].as_u64())
                        .map_or("?".into(), |p| p.to_string()),
                    Err(_) => "-".into(),
                };
                let acked = load(&stats.acked);
                let rate = (acked - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), acked);
                let report = account.report();
                console.progress(&format!(
                    "acked {acked} ({rate:.0}/s) | delivered {} (dup {}) | pending in outbox {pending} | 507s {} (capped sidecar {}) | {}",
                    report.acked - report.lost,
                    report.duplicated,
                    load(&stats.full),
                    load(&capped_stats.full),
                    current.lock().unwrap()
                ));
            }
        })
    }

    /// Play steps of the schedule: `steps` of them, or until `until`, or
    /// until a schedule of given faults ends, whichever comes first (a step
    /// that started runs to its end).
    pub async fn run(
        &mut self,
        steps: Option<usize>,
        until: Option<Instant>,
    ) -> anyhow::Result<()> {
        self.set_current("calm");
        // Let the stream start before the first fault.
        tokio::time::sleep(Duration::from_secs(2)).await;
        while steps.is_none_or(|n| self.played.len() < n)
            && until.is_none_or(|t| Instant::now() < t)
        {
            let Some(step) = self.schedule.next() else {
                break;
            };
            let report = self.play(step).await.with_context(|| {
                format!(
                    "step {} ({step}), seed {}",
                    self.played.len() + 1,
                    self.opts.seed
                )
            })?;
            self.played.push(step);
            self.reports.push(report);
        }
        Ok(())
    }

    async fn play(&mut self, step: Step) -> anyhow::Result<StepReport> {
        let console = self.opts.console.clone();
        let n = self.played.len() + 1;
        console.say(format!("step {n}: {step}"));
        self.set_current(format!("fault: {}", step.fault));
        let before = Counts::of(&self.stats);
        let pause = PauseMeter::start(self.app.shared.clone());
        let injected = Instant::now();
        let mut capped = None;
        match step.fault {
            Fault::BrokerKill9 => {
                tokio::task::block_in_place(|| self.node.kill9())?;
                tokio::time::sleep(step.hold).await;
                self.broker_start()?;
            }
            Fault::BrokerStop => {
                tokio::task::block_in_place(|| self.node.stop())?;
                tokio::time::sleep(step.hold).await;
                self.broker_start()?;
            }
            Fault::NetworkCut | Fault::NetworkReset => {
                // Refuse first, so the sidecars cannot reconnect between
                // the cut and the refusal.
                self.proxy.refuse().await;
                if step.fault == Fault::NetworkCut {
                    self.proxy.cut().await;
                } else {
                    self.proxy.reset().await;
                }
                tokio::time::sleep(step.hold).await;
                self.proxy.resume().await;
            }
            Fault::NetworkStall => {
                self.proxy.stall().await;
                tokio::time::sleep(step.hold).await;
                self.proxy.resume().await;
            }
            Fault::ProducerKill9 => {
                self.producer.kill9();
                tokio::time::sleep(step.hold).await;
                self.producer.restart().await?;
            }
            Fault::ConsumerKill9 => {
                self.consumer.kill9();
                tokio::time::sleep(step.hold).await;
                self.consumer.restart().await?;
            }
            Fault::OutboxFull => {
                capped = Some(self.fill_capped_outbox(step.hold).await?);
            }
        }
        let down = capped.map_or_else(|| injected.elapsed(), |c| c.cut_off);
        self.set_current(format!("healing: {}", step.fault));
        let mut flowing = self.wait_flowing(Duration::from_secs(30)).await;
        if !flowing && step.fault == Fault::BrokerKill9 {
            // RabbitMQ 3.10 only: it sometimes leaves a single-node quorum
            // queue without a leader after SIGKILL ("leader call - leader
            // not known"); a graceful restart recovers it. The sidecars keep
            // every message meanwhile. On 4.0 the queue must recover by
            // itself.
            if tokio::task::block_in_place(|| self.node.needs_quorum_registration_restart())? {
                console.say(format!(
                    "  {}: the broker's quorum queue did not recover after kill -9; restarting the broker gracefully",
                    self.broker_version
                ));
                tokio::task::block_in_place(|| {
                    self.node.stop()?;
                    self.node.start_again()
                })?;
            } else {
                console.say(format!(
                    "  {}: the broker's quorum queue has not recovered 30 s after kill -9; waiting on, without a restart",
                    self.broker_version
                ));
            }
        }
        if !flowing {
            flowing = self.wait_flowing(Duration::from_secs(60)).await;
        }
        if !flowing {
            console.say(format!(
                "  WARNING: messages do not flow after healing {}",
                step.fault
            ));
        }
        let during = Counts::of(&self.stats).since(before);
        let report = StepReport {
            step,
            down,
            accepted: during.acked,
            refused: during.full,
            unavailable: during.unavailable,
            delivery_paused: pause.finish().await,
            resumed: flowing,
            capped,
        };
        console.say(format!("  {report}"));
        self.set_current("calm");
        tokio::time::sleep(step.pause).await;
        Ok(report)
    }

    /// [`Fault::OutboxFull`]: cut the capped sidecar off the broker, publish
    /// to it until it answers `507`, hold that for `hold`, reconnect it and
    /// publish on until it accepted again and its outbox drained.
    async fn fill_capped_outbox(&mut self, hold: Duration) -> anyhow::Result<CappedReport> {
        let console = self.opts.console.clone();
        let before = Counts::of(&self.capped_stats);
        let cut = Instant::now();
        let mut cut_off = Duration::ZERO;
        self.capped_proxy.refuse().await;
        self.capped_proxy.cut().await;
        let url = format!(
            "{}/v1/publish/{}/{}",
            self.capped.api_url(),
            self.workload.exchange,
            self.workload.routing_key
        );
        let publishers = Producers::start(
            2,
            "c",
            url,
            self.opts.pace,
            OnFull::Refuse,
            &self.account,
            &self.capped_stats,
        );
        let result = async {
            let deadline = Instant::now() + Duration::from_secs(60);
            while load(&self.capped_stats.full) == before.full {
                if Instant::now() > deadline {
                    bail!("the capped outbox did not fill up within 60 s of losing the broker");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            console.say(format!(
                "  capped outbox full ({} messages pending): publishes answered 507 with Retry-After",
                thousands(self.capped_stats.acked.load(Ordering::Relaxed) - before.acked)
            ));
            tokio::time::sleep(hold).await;
            self.capped_proxy.resume().await;
            cut_off = cut.elapsed();
            let healed = Counts::of(&self.capped_stats);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let drained = matches!(
                    self.capped.outbox().await,
                    Ok(v) if v["pending"].as_u64() == Some(0)
                );
                let accepting = load(&self.capped_stats.acked) > healed.acked;
                if drained && accepting {
                    return Ok(true);
                }
                if Instant::now() > deadline {
                    return Ok(false);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        .await;
        publishers.stop().await;
        self.capped_proxy.resume().await;
        let accepts_again = result?;
        let during = Counts::of(&self.capped_stats).since(before);
        let retry_after = load(&self.capped_stats.retry_after);
        Ok(CappedReport {
            cut_off,
            limit: self.opts.capped_outbox_messages,
            accepted: during.acked,
            refused: during.full,
            retry_after: (retry_after > 0).then_some(retry_after),
            accepts_again,
        })
    }

    fn broker_start(&mut self) -> anyhow::Result<()> {
        self.set_current("starting the broker");
        tokio::task::block_in_place(|| self.node.start_again())
    }

    /// Whether, within `timeout`, acknowledged messages arrive at the app
    /// again and the producer is connected.
    async fn wait_flowing(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let base = self.app.deliveries();
        while Instant::now() < deadline {
            let connected = match self.producer.outbox().await {
                Ok(v) => v["broker"]["state"] == "connected",
                Err(_) => false,
            };
            if connected && self.app.deliveries() > base {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// Heal everything, stop producing, and wait up to `timeout` for every
    /// acknowledged message to arrive.
    pub async fn settle(&mut self, timeout: Duration) -> anyhow::Result<Outcome> {
        let console = self.opts.console.clone();
        self.set_current("settling");
        self.proxy.resume().await;
        self.capped_proxy.resume().await;
        if !self.node.is_running() {
            self.broker_start()?;
        }
        for sidecar in [&mut self.producer, &mut self.consumer, &mut self.capped] {
            if !sidecar.is_running() {
                sidecar.restart().await?;
            }
        }
        if let Some(p) = self.producers.take() {
            p.stop().await;
        }
        console.say(format!(
            "producers stopped after {} acknowledged messages; waiting for all of them to arrive",
            load(&self.stats.acked)
        ));
        let deadline = Instant::now() + timeout;
        while self.account.report().lost > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Redeliveries that are on their way still count as duplicates.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(p) = self.progress.take() {
            p.abort();
        }
        let report = self.account.report();
        let refused_ids = self.capped_stats.refused_ids.lock().unwrap().clone();
        let pending = self
            .producer
            .outbox()
            .await
            .map(|v| v.to_string())
            .unwrap_or_else(|e| format!("unavailable: {}", error_chain(e.as_ref())));
        Ok(Outcome {
            seed: self.opts.seed,
            report,
            delivered: self.account.acked_and_received(),
            unacked_attempts: load(&self.stats.unacked_attempts),
            full: load(&self.stats.full),
            unavailable: load(&self.stats.unavailable),
            other_status: load(&self.stats.other) + load(&self.capped_stats.other),
            refused: refused_ids.len() as u64,
            refused_delivered: self.account.received_among(&refused_ids),
            full_without_retry_after: load(&self.stats.full_without_retry_after)
                + load(&self.capped_stats.full_without_retry_after),
            lost_ids: self.account.lost_ids(),
            corrupted: self.app.shared.corrupted.lock().unwrap().clone(),
            played: self.played.clone(),
            reports: self.reports.clone(),
            elapsed: self.started.elapsed(),
            producer_outbox: pending,
        })
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(p) = self.producers.take() {
            p.stop.store(true, Ordering::Relaxed);
            p.tasks.iter().for_each(JoinHandle::abort);
        }
        if let Some(p) = self.progress.take() {
            p.abort();
        }
    }
}

// ---------------------------------------------------------------- outcome

/// The account of a scenario.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub report: AccountReport,
    /// Acknowledged ids received at least once.
    pub delivered: u64,
    /// The main producers' publishes not answered `202` (and published
    /// again).
    pub unacked_attempts: u64,
    /// Of which `507` (outbox full; with the default limit: 0).
    pub full: u64,
    /// Of which `503` or no answer (sidecar down).
    pub unavailable: u64,
    /// Publishes of any producer answered with any other status (should
    /// be 0).
    pub other_status: u64,
    /// Messages the capped sidecar refused with `507` during
    /// [`Fault::OutboxFull`]: not acknowledged, so not lost.
    pub refused: u64,
    /// Of which received by the app (should be none: a `507` stores
    /// nothing).
    pub refused_delivered: Vec<String>,
    /// `507`s without `Retry-After` (should be 0).
    pub full_without_retry_after: u64,
    /// Acknowledged, never received.
    pub lost_ids: Vec<String>,
    /// Received with a body other than the one published.
    pub corrupted: Vec<String>,
    pub played: Vec<Step>,
    /// What each step did.
    pub reports: Vec<StepReport>,
    pub elapsed: Duration,
    /// The producing sidecar's `GET /v1/outbox` at the end.
    pub producer_outbox: String,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        write!(
            f,
            "account: acknowledged={} delivered={} duplicated={} lost={} unexpected={} \
             refused={} (507, not acknowledged; delivered anyway: {}) \
             unacked_attempts={} (507={} unavailable={} other={}) corrupted={} faults={} \
             duration={:.0}s seed={}",
            r.acked,
            self.delivered,
            r.duplicated,
            r.lost,
            r.unexpected,
            self.refused,
            self.refused_delivered.len(),
            self.unacked_attempts,
            self.full,
            self.unavailable,
            self.other_status,
            self.corrupted.len(),
            self.played.len(),
            self.elapsed.as_secs_f64(),
            self.seed
        )
    }
}

impl Outcome {
    /// What each step did, one per line.
    pub fn effects_text(&self) -> String {
        self.reports
            .iter()
            .enumerate()
            .map(|(i, r)| format!("  {}. {r}\n", i + 1))
            .collect()
    }

    /// The steps played, one per line.
    pub fn schedule_text(&self) -> String {
        self.played
            .iter()
            .enumerate()
            .map(|(i, s)| format!("  {}. {s}\n", i + 1))
            .collect()
    }

    /// Fail on any lost or corrupted message, or a status no producer
    /// should get; the error names the seed, the schedule and the first
    /// lost ids.
    pub fn check(&self) -> anyhow::Result<()> {
        let shown = |ids: &[String]| {
            let mut s = ids.iter().take(20).cloned().collect::<Vec<_>>().join(", ");
            if ids.len() > 20 {
                s.push_str(", ...");
            }
            s
        };
        let mut problems = Vec::new();
        if !self.lost_ids.is_empty() {
            problems.push(format!(
                "{} acknowledged messages lost: [{}]",
                self.lost_ids.len(),
                shown(&self.lost_ids)
            ));
        }
        if !self.corrupted.is_empty() {
            problems.push(format!(
                "{} messages arrived with another body: [{}]",
                self.corrupted.len(),
                shown(&self.corrupted)
            ));
        }
        if self.other_status > 0 {
            problems.push(format!(
                "{} publishes got a status other than 202, 503 or 507",
                self.other_status
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        bail!(
            "{}\n{self}\nreplay with WARREN_FAULT_SEED={}; schedule:\n{}producer outbox at the end: {}",
            problems.join("\n"),
            self.seed,
            self.schedule_text(),
            self.producer_outbox
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let a: Vec<Step> = Schedule::new(42).take(30).collect();
        let b: Vec<Step> = Schedule::new(42).take(30).collect();
        assert_eq!(a, b);
        let c: Vec<Step> = Schedule::new(43).take(30).collect();
        assert_ne!(a, c, "another seed, another schedule");
    }

    #[test]
    fn every_round_holds_every_fault_once_within_bounds() {
        let steps: Vec<Step> = Schedule::new(7).take(Fault::ALL.len() * 3).collect();
        for round in steps.chunks(Fault::ALL.len()) {
            let mut kinds: Vec<Fault> = round.iter().map(|s| s.fault).collect();
            kinds.sort_by_key(|f| Fault::ALL.iter().position(|g| g == f));
            assert_eq!(kinds, Fault::ALL.to_vec());
        }
        for s in &steps {
            let (lo, hi) = s.fault.hold_ms();
            assert!((lo..=hi).contains(&(s.hold.as_millis() as u64)), "{s}");
            assert!((1000..=3000).contains(&(s.pause.as_millis() as u64)), "{s}");
        }
        let orders: Vec<Vec<Fault>> = (0..5)
            .map(|seed| Schedule::new(seed).take(8).map(|s| s.fault).collect())
            .collect();
        assert!(
            orders.windows(2).any(|w| w[0] != w[1]),
            "the order of faults depends on the seed"
        );
    }

    #[test]
    fn a_schedule_of_given_faults_plays_them_once_in_order() {
        let faults = [Fault::OutboxFull, Fault::BrokerKill9];
        let steps: Vec<Step> = Schedule::of(9, &faults).collect();
        assert_eq!(
            steps.iter().map(|s| s.fault).collect::<Vec<_>>(),
            faults.to_vec()
        );
        let again: Vec<Step> = Schedule::of(9, &faults).collect();
        assert_eq!(steps, again);
    }

    #[test]
    fn faults_parse_from_their_names() {
        for f in Fault::ALL {
            assert_eq!(f.name().parse::<Fault>(), Ok(f));
        }
        let err = "broker-kill".parse::<Fault>().unwrap_err();
        assert!(err.contains("broker-kill9, broker-stop"), "{err}");
    }

    #[test]
    fn a_step_report_says_what_the_fault_did() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(8_200), "8,200");
        assert_eq!(thousands(1_234_567), "1,234,567");
        let step = Step {
            fault: Fault::BrokerKill9,
            hold: Duration::from_secs(2),
            pause: Duration::from_secs(1),
        };
        let mut r = StepReport {
            step,
            down: Duration::from_millis(4_140),
            accepted: 8_200,
            refused: 0,
            unavailable: 0,
            delivery_paused: Duration::from_millis(4_330),
            resumed: true,
            capped: None,
        };
        assert_eq!(
            r.to_string(),
            "broker kill -9: 4.1 s down, publishes answered 202: 8,200, refused: 0; \
             delivery paused 4.3 s, resumed"
        );
        r.step.fault = Fault::OutboxFull;
        r.capped = Some(CappedReport {
            cut_off: Duration::from_millis(3_200),
            limit: 500,
            accepted: 530,
            refused: 12,
            retry_after: Some(5),
            accepts_again: true,
        });
        r.down = Duration::from_millis(3_200);
        r.delivery_paused = Duration::from_millis(100);
        assert_eq!(
            r.to_string(),
            "outbox full: capped sidecar (500 messages) cut off the broker 3.2 s: \
             answered 202: 530, refused 507: 12 (Retry-After: 5 s), accepting again after \
             draining; main producer publishes answered 202: 8,200, refused: 0; \
             delivery paused 0.1 s, resumed"
        );
    }

    #[test]
    fn the_example_manifest_gives_the_workload_and_consumer_config() {
        let w = Workload::from_manifest(&example_manifest()).unwrap();
        assert_eq!(
            (
                w.exchange.as_str(),
                w.routing_key.as_str(),
                w.queue.as_str()
            ),
            ("shop", "order.created", "orders")
        );
        assert_eq!(w.parking_lot, "orders.parked");
        let yaml = w.consumer_config("http://127.0.0.1:1/deliver");
        let back: SidecarConfig = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(back.queues[0].name, "orders");
        assert_eq!(back.queues[0].retry_policy.max_retries, 8);
        assert_eq!(back.app.unwrap().url, "http://127.0.0.1:1/deliver");
    }

    #[test]
    fn a_loss_fails_the_check_with_the_seed() {
        let account = Account::new();
        account.record_acked("a");
        account.record_acked("b");
        account.record_received("a");
        let outcome = Outcome {
            seed: 1234,
            report: account.report(),
            delivered: account.acked_and_received(),
            unacked_attempts: 0,
            full: 0,
            unavailable: 0,
            other_status: 0,
            refused: 0,
            refused_delivered: Vec::new(),
            full_without_retry_after: 0,
            lost_ids: account.lost_ids(),
            corrupted: Vec::new(),
            played: Schedule::new(1234).take(2).collect(),
            reports: Vec::new(),
            elapsed: Duration::from_secs(1),
            producer_outbox: String::new(),
        };
        let err = outcome.check().unwrap_err().to_string();
        assert!(err.contains("1 acknowledged messages lost: [b]"), "{err}");
        assert!(err.contains("WARREN_FAULT_SEED=1234"), "{err}");
        assert!(err.contains("lost=1"), "{err}");
        assert!(err.contains("  2. "), "the schedule is listed: {err}");
    }
}
