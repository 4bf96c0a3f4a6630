//! warren-bench: measures the sidecar against baselines taken in the same run
//! on the same machine and the same private broker, and prints every figure
//! as a ratio to its baseline.
//!
//! Baselines: a lapin publisher with confirms, synchronous (window 1) and
//! pipelined (window 1000), and the disk's single-fsync rate in the
//! directory the outbox uses. Through the `warren-sidecar` binary (a
//! separate process, default durability `flush`): single publishes from 1
//! and 64 clients, batches end to end (until the queue holds them all), the
//! accept rate with the broker down, the drain of that backlog once the
//! broker is back, the sidecar's memory idle and with a large backlog, the
//! backlog's size on disk and the restart with it after `kill -9`. Every
//! sidecar figure is measured once per outbox engine (`--engines`,
//! default `segment,sled,fjall`), side by side in one run.
//! The transactional outbox relay, from a private PostgreSQL cluster:
//! rows per second end to end, and commit-to-consumer latency at low load.
//!
//! All messages carry a 1 KiB body, are persistent, and go to one quorum
//! queue; the queue is purged and the path warmed up before each measurement.
//! The header names the broker's version, as the broker announces it.
//!
//! Layout: this file runs the phases in order and measures the baselines
//! (one function per figure group); [`sidecar`] measures through the
//! sidecar, per engine; [`direct`], [`load`] and [`relay`] drive the
//! broker, the sidecar's HTTP API and the relay; [`report`] prints.

mod direct;
mod load;
mod relay;
mod report;
mod sidecar;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use warren_testkit::{NodeOptions, RabbitNode};

use crate::direct::{Publisher, QueueCounter};
use crate::report::{Report, percentile_ms};
use crate::sidecar::EngineRun;

const QUEUE: &str = "warren-bench";
const BODY_BYTES: usize = 1024;
const RSS_BUDGET_MIB: f64 = 32.0;
/// The bound on the relay's median commit-to-broker latency.
const RELAY_P50_BUDGET_MS: f64 = 50.0;
const MIB: f64 = 1024.0 * 1024.0;

/// warren-bench: the sidecar's throughput, latency, outage behaviour and
/// memory, each as a ratio to a baseline measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "warren-bench", version, about)]
struct Args {
    /// The warren-sidecar binary (default: next to this executable).
    #[arg(long, env = "WARREN_SIDECAR_BIN")]
    sidecar_bin: Option<PathBuf>,
    /// Scale: messages of the pipelined baseline, the batch run and the
    /// outage backlog (default 100000; 5000 with --quick).
    #[arg(long)]
    messages: Option<u64>,
    /// Messages buffered with the broker down for the memory figure
    /// (default 1000000; 20000 with --quick).
    #[arg(long)]
    buffered: Option<u64>,
    /// Messages per batch request.
    #[arg(long, default_value_t = 1000)]
    batch_size: u64,
    /// Concurrent batch publishers.
    #[arg(long, default_value_t = 4)]
    batch_clients: usize,
    /// Small sizes for a smoke run (well under two minutes).
    #[arg(long)]
    quick: bool,
    /// Print the report as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Exit with status 1 when a target is missed.
    #[arg(long)]
    strict: bool,
    /// Where the outboxes and the fsync probe live (default: a temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Outbox engines to measure, side by side (the first one's figures
    /// carry the plain keys and the targets; the others' keys end in
    /// `_<engine>`).
    #[arg(long, value_delimiter = ',', default_value = "segment,sled,fjall")]
    engines: Vec<String>,
}

/// `base` for the first engine, `base_<engine>` for the others.
fn key(base: &'static str, suffix: &str) -> &'static str {
    if suffix.is_empty() {
        base
    } else {
        // A handful of keys per run; the report wants `'static` keys.
        Box::leak(format!("{base}{suffix}").into_boxed_str())
    }
}

/// Sizes of every phase.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    fsyncs: u64,
    sync: u64,
    pipelined: u64,
    single1: u64,
    single64: u64,
    batch: u64,
    backlog: u64,
    buffered: u64,
    relay_samples: u64,
}

impl Sizes {
    fn from(args: &Args) -> Sizes {
        let messages = args
            .messages
            .unwrap_or(if args.quick { 5_000 } else { 100_000 })
            .max(100);
        let buffered = args
            .buffered
            .unwrap_or(if args.quick { 20_000 } else { 1_000_000 });
        let small = if args.quick {
            200
        } else {
            (messages / 50).clamp(200, 5_000)
        };
        let round = |n: u64| n.div_ceil(args.batch_size).max(1) * args.batch_size;
        Sizes {
            fsyncs: if args.quick { 200 } else { 2_000 },
            sync: small,
            pipelined: messages,
            single1: small,
            single64: if args.quick { 2_000 } else { messages / 5 },
            batch: round(messages),
            backlog: messages,
            buffered: round(buffered),
            relay_samples: if args.quick { 50 } else { 500 },
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(args.batch_clients > 0, "--batch-clients must be at least 1");
    let bin = match &args.sidecar_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .join("warren-sidecar"),
    };
    anyhow::ensure!(
        bin.is_file(),
        "warren-sidecar not found at {} (build it, or pass --sidecar-bin / WARREN_SIDECAR_BIN)",
        bin.display()
    );
    // SAFETY: no other thread exists yet; the runtime starts below.
    unsafe { std::env::set_var("WARREN_SIDECAR_BIN", &bin) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(run(&args, &bin))?;
    let text = report.text();
    if args.json {
        eprintln!("{text}");
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{text}");
    }
    if args.strict && !report.all_pass() {
        std::process::exit(1);
    }
    Ok(())
}

/// CPU time (user + system, all threads) used so far by process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // The command name may hold spaces; fields after it are plain.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // utime and stime: fields 14 and 15 of stat, indexes 11 and 12 after the name.
    match (ticks(11), ticks(12)) {
        // SAFETY: sysconf has no preconditions.
        (Some(u), Some(s)) => (u + s) / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64,
        _ => f64::NAN,
    }
}

/// The 1, 5 and 15 minute load averages: the benchmark shares the machine,
/// and the figures mean less when something else was busy.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn progress(msg: impl std::fmt::Display) {
    eprintln!("[warren-bench] {msg}");
}

fn payload() -> String {
    // ASCII, so the same bytes travel as a raw body and as a JSON string.
    (0..BODY_BYTES)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect()
}

/// The whole run: settings, the disk, the broker, the direct baselines and
/// the relay, every engine's sidecar phases, then the targets.
async fn run(args: &Args, bin: &Path) -> anyhow::Result<Report> {
    let sizes = Sizes::from(args);
    let mut r = Report::default();
    let work = work_dir(args)?;
    record_settings(&mut r, args, &sizes, bin, work.path());
    let body = payload();

    let fsync = disk_phase(&mut r, &work.path().join("outbox"), &sizes)?;

    progress("starting a private RabbitMQ node");
    let mut node = tokio::task::block_in_place(|| {
        RabbitNode::start_with(NodeOptions {
            tls: false,
            management: false,
        })
    })?;
    node.declare_quorum_queue(QUEUE).await?;
    let url = node.amqp_url();
    r.setting(
        "broker_version",
        direct::broker_version(&url)
            .await
            .unwrap_or_else(|e| format!("unknown ({e:#})")),
    );
    let mut counter = QueueCounter::new(&url);

    let mut publisher = Publisher::connect(&url, body.as_bytes().to_vec()).await?;
    direct_sync_phase(&mut r, &mut publisher, &node, &sizes).await?;
    direct_pipelined_phase(&mut r, &mut publisher, &node, &sizes).await?;
    publisher.close().await;

    relay_phase(&mut r, &node, work.path(), &body, &sizes).await?;

    for (i, engine) in args.engines.iter().enumerate() {
        let suffix = if i == 0 {
            String::new()
        } else {
            format!("_{engine}")
        };
        let engine_dir = work.path().join(format!("engine-{engine}"));
        sidecar::engine_phases(
            &mut r,
            EngineRun {
                engine,
                suffix: &suffix,
                dir: &engine_dir,
                sizes: &sizes,
                args,
                body: &body,
            },
            &mut node,
            &mut counter,
        )
        .await?;
    }
    let _ = tokio::task::block_in_place(|| node.shutdown());

    r.setting("load_average_at_end", load_average());
    targets(&mut r, fsync);
    Ok(r)
}

/// A fresh directory for the outboxes and the fsync probe, under
/// `--work-dir` if given.
fn work_dir(args: &Args) -> anyhow::Result<tempfile::TempDir> {
    Ok(match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::Builder::new()
                .prefix("warren-bench-")
                .tempdir_in(d)?
        }
        None => tempfile::Builder::new().prefix("warren-bench-").tempdir()?,
    })
}

/// The settings shown in the report's header (the broker's version is
/// added once the broker runs).
fn record_settings(r: &mut Report, args: &Args, sizes: &Sizes, bin: &Path, work: &Path) {
    r.setting("sidecar", bin.display().to_string());
    r.setting("work_dir", work.display().to_string());
    r.setting(
        "cpus",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    r.setting("load_average_at_start", load_average());
    r.setting("message_bytes", BODY_BYTES);
    r.setting("queue", "quorum, durable; messages persistent, mandatory");
    r.setting(
        "sidecar_flags",
        format!(
            "default durability (flush), confirm window 1000; --reconnect-initial=100ms --reconnect-max=500ms; engines {}",
            args.engines.join(",")
        ),
    );
    r.setting(
        "sizes",
        format!(
            "fsyncs {}, sync {}, pipelined {}, single(1) {}, single(64) {}, batch {} in batches of {} from {} clients, backlog {}, buffered {}",
            sizes.fsyncs,
            sizes.sync,
            sizes.pipelined,
            sizes.single1,
            sizes.single64,
            sizes.batch,
            args.batch_size,
            args.batch_clients,
            sizes.backlog,
            sizes.buffered
        ),
    );
}

/// `fsync_per_s`: the disk's single write+fsync rate where the outbox
/// lives. Returns it (the outage targets are bounded by it).
fn disk_phase(r: &mut Report, outbox_dir: &Path, sizes: &Sizes) -> anyhow::Result<f64> {
    progress(format!(
        "disk: {} write+fsync in {}",
        sizes.fsyncs,
        outbox_dir.display()
    ));
    let fsync = direct::fsync_rate(outbox_dir, sizes.fsyncs)?;
    r.baseline(
        "fsync_per_s",
        "disk: single write+fsync rate",
        fsync,
        "fsync/s",
    );
    Ok(fsync)
}

/// `direct_sync_*`: lapin with confirms, one message at a time.
async fn direct_sync_phase(
    r: &mut Report,
    publisher: &mut Publisher,
    node: &RabbitNode,
    sizes: &Sizes,
) -> anyhow::Result<()> {
    progress(format!("direct synchronous: {} messages", sizes.sync));
    publisher.synchronous(QUEUE, 100).await?;
    node.purge(QUEUE).await?;
    let sync = publisher.synchronous(QUEUE, sizes.sync).await?;
    node.purge(QUEUE).await?;
    r.baseline(
        "direct_sync_msgs_per_s",
        "direct lapin, confirms, window 1: throughput",
        sync.rate(),
        "msg/s",
    );
    r.baseline(
        "direct_sync_p50_ms",
        "direct lapin, window 1: p50 publish->confirm",
        percentile_ms(&sync.latencies, 50.0),
        "ms",
    );
    r.baseline(
        "direct_sync_p99_ms",
        "direct lapin, window 1: p99 publish->confirm",
        percentile_ms(&sync.latencies, 99.0),
        "ms",
    );
    Ok(())
}

/// `direct_pipelined_*`: lapin with confirms, 1000 messages in flight, and
/// the client's CPU per message.
async fn direct_pipelined_phase(
    r: &mut Report,
    publisher: &mut Publisher,
    node: &RabbitNode,
    sizes: &Sizes,
) -> anyhow::Result<()> {
    progress(format!(
        "direct pipelined (window 1000): {} messages",
        sizes.pipelined
    ));
    publisher
        .pipelined(QUEUE, (sizes.pipelined / 10).clamp(1_000, 10_000), 1000)
        .await?;
    node.purge(QUEUE).await?;
    let cpu_before = cpu_seconds(std::process::id());
    let pipelined = publisher.pipelined(QUEUE, sizes.pipelined, 1000).await?;
    let direct_cpu = cpu_seconds(std::process::id()) - cpu_before;
    node.purge(QUEUE).await?;
    r.baseline(
        "direct_pipelined_msgs_per_s",
        "direct lapin, confirms, window 1000: throughput",
        pipelined.rate(),
        "msg/s",
    );
    r.baseline(
        "direct_pipelined_cpu_us_per_msg",
        "direct lapin, window 1000: client CPU per message",
        direct_cpu * 1e6 / sizes.pipelined as f64,
        "us",
    );
    Ok(())
}

/// `relay_*`: the transactional outbox relay, end to end and at low load.
async fn relay_phase(
    r: &mut Report,
    node: &RabbitNode,
    work: &Path,
    body: &str,
    sizes: &Sizes,
) -> anyhow::Result<()> {
    progress(format!(
        "relay: {} rows committed in PostgreSQL, then {} rows one per transaction",
        sizes.pipelined, sizes.relay_samples
    ));
    let relayed = relay::measure(
        &node.amqp_url(),
        QUEUE,
        work,
        body.as_bytes(),
        node,
        sizes.pipelined,
        sizes.relay_samples,
    )
    .await?;
    node.purge(QUEUE).await?;
    r.compared(
        "relay_e2e_msgs_per_s",
        "relay: rows committed in PostgreSQL, broker-confirmed, end to end",
        relayed.rate,
        "msg/s",
        "direct_pipelined_msgs_per_s",
    );
    r.budgeted(
        "relay_commit_to_broker_p50_ms",
        "relay, one row per transaction every 20 ms: p50 commit->consumer",
        percentile_ms(&relayed.latencies, 50.0),
        "ms",
        RELAY_P50_BUDGET_MS,
    );
    r.baseline(
        "relay_commit_to_broker_p99_ms",
        "relay, one row per transaction every 20 ms: p99 commit->consumer",
        percentile_ms(&relayed.latencies, 99.0),
        "ms",
    );
    Ok(())
}

/// The targets (issue #13), checked for the first engine's figures.
fn targets(r: &mut Report, fsync: f64) {
    let pipelined = r.value("direct_pipelined_msgs_per_s").unwrap_or(f64::NAN);
    let sync_p50 = r.value("direct_sync_p50_ms").unwrap_or(f64::NAN);
    let direct_cpu = r
        .value("direct_pipelined_cpu_us_per_msg")
        .unwrap_or(f64::NAN);
    r.target(
        "outage accept rate (64 clients) >= 10x single-fsync rate",
        "outage_accept_msgs_per_s",
        fsync,
        ">=",
        10.0,
    );
    r.target(
        "single publishes (64 clients) >= 1.0x direct pipelined",
        "sidecar_single64_msgs_per_s",
        pipelined,
        ">=",
        1.0,
    );
    r.target(
        "batch throughput (end to end) >= 1.0x direct pipelined",
        "sidecar_batch_e2e_msgs_per_s",
        pipelined,
        ">=",
        1.0,
    );
    r.target(
        "single-publish p50 (1 client) <= 0.5x direct synchronous p50",
        "sidecar_single1_p50_ms",
        sync_p50,
        "<=",
        0.5,
    );
    r.target(
        "sidecar CPU per forwarded message <= 1.0x direct client",
        "drain_cpu_us_per_msg",
        direct_cpu,
        "<=",
        1.0,
    );
    r.target(
        "RSS with the buffered backlog <= 32 MiB",
        "sidecar_buffered_rss_mib",
        RSS_BUDGET_MIB,
        "<=",
        1.0,
    );
    r.target(
        "outbox on disk <= 1.1x payload",
        "sidecar_buffered_disk_ratio",
        1.0,
        "<=",
        1.1,
    );
    r.target(
        "restart with the backlog until it serves <= 1 s",
        "sidecar_restart_ms",
        1000.0,
        "<=",
        1.0,
    );
    r.target(
        "relay throughput (end to end) >= 0.5x direct pipelined",
        "relay_e2e_msgs_per_s",
        pipelined,
        ">=",
        0.5,
    );
    r.target(
        "relay p50 commit->broker (LISTEN/NOTIFY, low load) <= 50 ms",
        "relay_commit_to_broker_p50_ms",
        RELAY_P50_BUDGET_MS,
        "<=",
        1.0,
    );
}
