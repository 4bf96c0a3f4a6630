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
//!    pauses;
//! 3. [`Rig::settle`] heals everything, stops the producers, waits until
//!    every acknowledged message arrived (or a timeout) and returns the
//!    [`Outcome`]; [`Outcome::check`] fails on any loss.
//!
//! Producers publish unique ids (`X-Warren-Message-Id`, the body is the id)
//! and record an id as acknowledged only on `202`. A `507` (outbox full), a
//! `503` or a refused connection (sidecar down) is no acknowledgement: the
//! producer backs off and publishes the same id again.
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

/// An endless, seeded sequence of steps: rounds of every [`Fault`] in a
/// random order, with random hold and pause times. The same seed gives the
/// same steps.
#[derive(Debug, Clone)]
pub struct Schedule {
    seed: u64,
    rng: StdRng,
    /// What is left of the current round.
    round: Vec<Fault>,
}

impl Schedule {
    pub fn new(seed: u64) -> Schedule {
        Schedule {
            seed,
            rng: StdRng::seed_from_u64(seed),
            round: Vec::new(),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl Iterator for Schedule {
    type Item = Step;

    fn next(&mut self) -> Option<Step> {
        if self.round.is_empty() {
            self.round = Fault::ALL.to_vec();
            self.round.shuffle(&mut self.rng);
        }
        let fault = self.round.pop().expect("a round is never empty");
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
    async fn apply(&self, how: &Apply, node: &RabbitNode, console: &Console) -> anyhow::Result<()> {
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
    /// Publishes not answered `202` (each retried later with the same id).
    pub unacked_attempts: AtomicU64,
    /// `507` answers (outbox full).
    pub full: AtomicU64,
    /// `503` answers and failed requests (sidecar down or restarting).
    pub unavailable: AtomicU64,
    /// Any other answer (a bug: the request is well-formed).
    pub other: AtomicU64,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

struct Producers {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Producers {
    fn start(
        clients: usize,
        url: String,
        pace: Duration,
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
                        let id = format!("p{c}-{n:08}");
                        let resp = http
                            .post(&url)
                            .header("X-Warren-Message-Id", &id)
                            .header("Content-Type", "text/plain")
                            .body(id.clone())
                            .send()
                            .await;
                        let counter = match resp.map(|r| r.status().as_u16()) {
                            Ok(202) => {
                                account.record_acked(id);
                                stats.acked.fetch_add(1, Ordering::Relaxed);
                                n += 1;
                                backoff = Duration::from_millis(20);
                                tokio::time::sleep(pace).await;
                                continue;
                            }
                            Ok(507) => &stats.full,
                            Ok(503) | Err(_) => &stats.unavailable,
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
    /// `--max-outbox-messages` of the producing sidecar (small, so that a
    /// broker outage fills it).
    pub max_outbox_messages: u64,
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
            max_outbox_messages: 2_000,
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
    node: RabbitNode,
    producers: Option<Producers>,
    progress: Option<JoinHandle<()>>,
    /// What is being done right now, for the progress line.
    current: Arc<Mutex<String>>,
    /// Steps played so far, for reports.
    played: Vec<Step>,
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
        console.say(format!(
            "broker {} up (AMQP 127.0.0.1:{}, management {})",
            node.node_name(),
            node.amqp_port(),
            node.management_url()
        ));
        workload.apply(&opts.apply, &node, &console).await?;
        // RabbitMQ 3.10 keeps a new quorum queue's registration in a lazily
        // synced table: a SIGKILL within minutes of the declaration can lose
        // it, and the single-node queue never finds its leader again. A
        // clean restart writes it out (as sidecar/tests/broker_faults.rs
        // does before killing its broker).
        console.say("restarting the broker cleanly once, so that the new queues survive a kill -9");
        tokio::task::block_in_place(|| {
            node.stop()?;
            node.start_again()
        })?;
        let proxy = Proxy::start(node.amqp_addr()).await;
        let account = Account::new();
        let app = CountingApp::start(account.clone()).await?;
        let dir = tempfile::Builder::new()
            .prefix("warren-scenario-")
            .tempdir()?;
        let mut producer = SidecarProcess::start(
            SidecarOptions::new(proxy.amqp_url(), dir.path().join("producer-outbox"))
                .arg(format!(
                    "--max-outbox-messages={}",
                    opts.max_outbox_messages
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
        console.say(format!(
            "producer sidecar {} and consumer sidecar {} ready, both through proxy 127.0.0.1:{}",
            producer.api_url(),
            consumer.api_url(),
            proxy.port()
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
        let producers = Producers::start(opts.producers, url, opts.pace, &account, &stats);
        let mut rig = Rig {
            schedule: Schedule::new(opts.seed),
            opts,
            workload,
            account,
            stats,
            app,
            producer,
            consumer,
            proxy,
            node,
            producers: Some(producers),
            progress: None,
            current: Arc::new(Mutex::new("warming up".into())),
            played: Vec::new(),
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

    fn set_current(&self, what: impl Into<String>) {
        *self.current.lock().unwrap() = what.into();
    }

    fn spawn_progress(&self, every: Duration) -> JoinHandle<()> {
        let console = self.opts.console.clone();
        let (account, stats, current) = (
            self.account.clone(),
            self.stats.clone(),
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
                    "acked {acked} ({rate:.0}/s) | delivered {} (dup {}) | pending in outbox {pending} | 507s {} | {}",
                    report.acked - report.lost,
                    report.duplicated,
                    load(&stats.full),
                    current.lock().unwrap()
                ));
            }
        })
    }

    /// Play steps of the schedule: `steps` of them, or until `until`,
    /// whichever comes first (a step that started runs to its end).
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
            let step = self.schedule.next().expect("the schedule is endless");
            self.play(step).await.with_context(|| {
                format!(
                    "step {} ({step}), seed {}",
                    self.played.len() + 1,
                    self.opts.seed
                )
            })?;
            self.played.push(step);
        }
        Ok(())
    }

    async fn play(&mut self, step: Step) -> anyhow::Result<()> {
        let console = self.opts.console.clone();
        let n = self.played.len() + 1;
        console.say(format!("step {n}: {step}"));
        self.set_current(format!("fault: {}", step.fault));
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
                let before = load(&self.stats.full);
                tokio::task::block_in_place(|| self.node.stop())?;
                let deadline = Instant::now() + Duration::from_secs(90);
                while load(&self.stats.full) == before {
                    if Instant::now() > deadline {
                        bail!("the outbox did not fill up within 90 s of the broker stopping");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                console.say(format!(
                    "  outbox full: publishes answered 507 ({} so far)",
                    load(&self.stats.full)
                ));
                tokio::time::sleep(step.hold).await;
                self.broker_start()?;
            }
        }
        self.set_current(format!("healing: {}", step.fault));
        let flowing = self.wait_flowing(Duration::from_secs(30)).await;
        if !flowing && step.fault == Fault::BrokerKill9 {
            // RabbitMQ 3.10 sometimes leaves a single-node quorum queue
            // without a leader after SIGKILL ("leader call - leader not
            // known"); a graceful restart recovers it. The sidecars keep
            // every message meanwhile.
            console.say("  the broker's quorum queue did not recover after kill -9 (RabbitMQ 3.10); restarting the broker gracefully");
            tokio::task::block_in_place(|| {
                self.node.stop()?;
                self.node.start_again()
            })?;
        }
        if !flowing && !self.wait_flowing(Duration::from_secs(60)).await {
            console.say(format!(
                "  WARNING: messages do not flow after healing {}",
                step.fault
            ));
        }
        self.set_current("calm");
        tokio::time::sleep(step.pause).await;
        Ok(())
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
        if !self.node.is_running() {
            self.broker_start()?;
        }
        for sidecar in [&mut self.producer, &mut self.consumer] {
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
        let pending = self
            .producer
            .outbox()
            .await
            .map(|v| v.to_string())
            .unwrap_or_else(|e| format!("unavailable: {e:#}"));
        Ok(Outcome {
            seed: self.opts.seed,
            report,
            delivered: self.account.acked_and_received(),
            unacked_attempts: load(&self.stats.unacked_attempts),
            full: load(&self.stats.full),
            unavailable: load(&self.stats.unavailable),
            other_status: load(&self.stats.other),
            lost_ids: self.account.lost_ids(),
            corrupted: self.app.shared.corrupted.lock().unwrap().clone(),
            played: self.played.clone(),
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
    /// Publishes not answered `202` (and published again).
    pub unacked_attempts: u64,
    /// Of which `507` (outbox full).
    pub full: u64,
    /// Of which `503` or no answer (sidecar down).
    pub unavailable: u64,
    /// Of which any other status (should be 0).
    pub other_status: u64,
    /// Acknowledged, never received.
    pub lost_ids: Vec<String>,
    /// Received with a body other than the one published.
    pub corrupted: Vec<String>,
    pub played: Vec<Step>,
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
             unacked_attempts={} (507={} unavailable={} other={}) corrupted={} faults={} \
             duration={:.0}s seed={}",
            r.acked,
            self.delivered,
            r.duplicated,
            r.lost,
            r.unexpected,
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
            lost_ids: account.lost_ids(),
            corrupted: Vec::new(),
            played: Schedule::new(1234).take(2).collect(),
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
