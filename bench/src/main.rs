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
//! default `segment,sled`), side by side in one run.
//! The transactional outbox relay, from a private PostgreSQL cluster:
//! rows per second end to end, and commit-to-consumer latency at low load.
//!
//! All messages carry a 1 KiB body, are persistent, and go to one quorum
//! queue; the queue is purged and the path warmed up before each measurement.

mod direct;
mod load;
mod relay;
mod report;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use warren_testkit::{NodeOptions, RabbitNode, SidecarOptions, SidecarProcess, reserve_port};

use crate::direct::{Publisher, QueueCounter};
use crate::report::{Report, percentile_ms};

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
    #[arg(long, value_delimiter = ',', default_value = "segment,sled")]
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

async fn run(args: &Args, bin: &Path) -> anyhow::Result<Report> {
    let sizes = Sizes::from(args);
    let mut r = Report::default();
    let work = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::Builder::new()
                .prefix("warren-bench-")
                .tempdir_in(d)?
        }
        None => tempfile::Builder::new().prefix("warren-bench-").tempdir()?,
    };
    let outbox_dir = work.path().join("outbox");
    r.setting("sidecar", bin.display().to_string());
    r.setting("work_dir", work.path().display().to_string());
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
    let body = payload();

    // -- the disk ------------------------------------------------------
    progress(format!(
        "disk: {} write+fsync in {}",
        sizes.fsyncs,
        outbox_dir.display()
    ));
    let fsync = direct::fsync_rate(&outbox_dir, sizes.fsyncs)?;
    r.baseline(
        "fsync_per_s",
        "disk: single write+fsync rate",
        fsync,
        "fsync/s",
    );

    // -- the broker ----------------------------------------------------
    progress("starting a private RabbitMQ node");
    let mut node = tokio::task::block_in_place(|| {
        RabbitNode::start_with(NodeOptions {
            tls: false,
            management: false,
        })
    })?;
    node.declare_quorum_queue(QUEUE).await?;
    let url = node.amqp_url();
    let mut counter = QueueCounter::new(&url);

    // -- direct baselines ----------------------------------------------
    let mut publisher = Publisher::connect(&url, body.as_bytes().to_vec()).await?;
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
    publisher.close().await;
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

    // -- the transactional outbox relay ---------------------------------
    progress(format!(
        "relay: {} rows committed in PostgreSQL, then {} rows one per transaction",
        sizes.pipelined, sizes.relay_samples
    ));
    let relayed = relay::measure(
        &url,
        QUEUE,
        work.path(),
        body.as_bytes(),
        &node,
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

    for (i, engine) in args.engines.iter().enumerate() {
        let suffix = if i == 0 {
            String::new()
        } else {
            format!("_{engine}")
        };
        let engine_dir = work.path().join(format!("engine-{engine}"));
        engine_phases(
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

    // -- targets (issue #13), for the first engine -------------------------
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
    Ok(r)
}

/// One engine's part of the run.
struct EngineRun<'a> {
    /// `--outbox-engine` value.
    engine: &'a str,
    /// Appended to every figure's key.
    suffix: &'a str,
    /// Where its outboxes live.
    dir: &'a Path,
    sizes: &'a Sizes,
    args: &'a Args,
    body: &'a str,
}

/// Everything measured through the sidecar, for one engine.
async fn engine_phases(
    r: &mut Report,
    run: EngineRun<'_>,
    node: &mut RabbitNode,
    counter: &mut QueueCounter,
) -> anyhow::Result<()> {
    let EngineRun {
        engine,
        suffix,
        dir,
        sizes,
        args,
        body,
    } = run;
    let label = |l: &str| format!("[{engine}] {l}");
    let body = body.to_owned();
    // -- through the sidecar -------------------------------------------
    progress(format!("starting warren-sidecar, engine {engine}"));
    let url = node.amqp_url();
    let engine_flag = format!("--outbox-engine={engine}");
    let mut sidecar = start_sidecar(
        &url,
        &dir.join("outbox"),
        std::slice::from_ref(&engine_flag),
    )
    .await?;
    wait_broker_state(&sidecar, true, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_mib(&sidecar)?;
    r.budgeted(
        key("sidecar_idle_rss_mib", suffix),
        &label("sidecar: RSS idle (connected, empty outbox)"),
        idle_rss,
        "MiB",
        RSS_BUDGET_MIB,
    );
    let api = sidecar.api_url();
    let http = load::client(128);
    let raw = Bytes::from(body.clone());

    // Warm-up of both publish paths.
    load::single(&http, &api, QUEUE, raw.clone(), 4, 500).await?;
    let warm_batch = load::batch_body(QUEUE, &body, args.batch_size as usize);
    load::batches(&http, &api, warm_batch.clone(), args.batch_size, 1, 2).await?;
    settle(&sidecar, counter, node, 500 + 2 * args.batch_size).await?;

    progress(format!(
        "sidecar single publishes, 1 client: {}",
        sizes.single1
    ));
    let one = load::single(&http, &api, QUEUE, raw.clone(), 1, sizes.single1).await?;
    settle(&sidecar, counter, node, sizes.single1).await?;
    r.compared(
        key("sidecar_single1_msgs_per_s", suffix),
        &label("sidecar single publish, 1 client: accepted"),
        one.rate(),
        "msg/s",
        "direct_sync_msgs_per_s",
    );
    r.compared(
        key("sidecar_single1_p50_ms", suffix),
        &label("sidecar single publish, 1 client: p50 HTTP"),
        percentile_ms(&one.latencies, 50.0),
        "ms",
        "direct_sync_p50_ms",
    );
    r.compared(
        key("sidecar_single1_p99_ms", suffix),
        &label("sidecar single publish, 1 client: p99 HTTP"),
        percentile_ms(&one.latencies, 99.0),
        "ms",
        "direct_sync_p99_ms",
    );

    progress(format!(
        "sidecar single publishes, 64 clients: {}",
        sizes.single64
    ));
    load::single(&http, &api, QUEUE, raw.clone(), 64, 640).await?;
    settle(&sidecar, counter, node, 640).await?;
    let many = load::single(&http, &api, QUEUE, raw.clone(), 64, sizes.single64).await?;
    settle(&sidecar, counter, node, sizes.single64).await?;
    r.compared(
        key("sidecar_single64_msgs_per_s", suffix),
        &label("sidecar single publish, 64 clients: accepted"),
        many.rate(),
        "msg/s",
        "direct_pipelined_msgs_per_s",
    );
    r.compared(
        key("sidecar_single64_p50_ms", suffix),
        &label("sidecar single publish, 64 clients: p50 HTTP"),
        percentile_ms(&many.latencies, 50.0),
        "ms",
        "direct_sync_p50_ms",
    );
    r.compared(
        key("sidecar_single64_p99_ms", suffix),
        &label("sidecar single publish, 64 clients: p99 HTTP"),
        percentile_ms(&many.latencies, 99.0),
        "ms",
        "direct_sync_p99_ms",
    );

    progress(format!(
        "sidecar batches end to end: {} messages in batches of {}",
        sizes.batch, args.batch_size
    ));
    let batch_body = load::batch_body(QUEUE, &body, args.batch_size as usize);
    let sidecar_pid = sidecar.pid().context("the sidecar is not running")?;
    let cpu_before = cpu_seconds(sidecar_pid);
    let start = Instant::now();
    let accepted = load::batches(
        &http,
        &api,
        batch_body.clone(),
        args.batch_size,
        args.batch_clients,
        sizes.batch / args.batch_size,
    )
    .await?;
    let done = drained(&sidecar, counter, sizes.batch).await?;
    let e2e = sizes.batch as f64 / (done - start).as_secs_f64();
    let batch_cpu = cpu_seconds(sidecar_pid) - cpu_before;
    node.purge(QUEUE).await?;
    r.compared(
        key("sidecar_batch_e2e_msgs_per_s", suffix),
        &label(&format!(
            "sidecar batch ({}/request): broker-confirmed, end to end",
            args.batch_size
        )),
        e2e,
        "msg/s",
        "direct_pipelined_msgs_per_s",
    );
    r.compared(
        key("sidecar_batch_accept_msgs_per_s", suffix),
        &label(&format!(
            "sidecar batch ({}/request): accepted",
            args.batch_size
        )),
        accepted.rate(),
        "msg/s",
        "direct_pipelined_msgs_per_s",
    );
    r.compared(
        key("sidecar_batch_cpu_us_per_msg", suffix),
        &label("sidecar batch: sidecar CPU per message (accept+forward)"),
        batch_cpu * 1e6 / sizes.batch as f64,
        "us",
        "direct_pipelined_cpu_us_per_msg",
    );

    // -- outage ----------------------------------------------------------
    progress("outage: stopping the broker gracefully");
    tokio::task::block_in_place(|| node.stop())?;
    wait_broker_state(&sidecar, false, Duration::from_secs(30)).await?;
    load::single(&http, &api, QUEUE, raw.clone(), 64, 640).await?;
    progress(format!(
        "outage: {} single publishes from 64 clients",
        sizes.backlog
    ));
    let outage = load::single(&http, &api, QUEUE, raw.clone(), 64, sizes.backlog).await?;
    r.compared(
        key("outage_accept_msgs_per_s", suffix),
        &label("broker down: accepted into the outbox, 64 clients"),
        outage.rate(),
        "msg/s",
        "fsync_per_s",
    );
    let backlog = pending(&sidecar).await?;
    anyhow::ensure!(
        backlog >= sizes.backlog,
        "outbox holds {backlog} messages, expected at least {}",
        sizes.backlog
    );
    progress(format!(
        "outage: starting the broker again, draining {backlog}"
    ));
    tokio::task::block_in_place(|| node.start_again())?;
    let cpu_before = cpu_seconds(sidecar_pid);
    let back = Instant::now();
    wait_broker_state(&sidecar, true, Duration::from_secs(60)).await?;
    let reconnected = Instant::now();
    let done = drained(&sidecar, counter, backlog).await?;
    let drain = backlog as f64 / (done - back).as_secs_f64();
    let drain_cpu = cpu_seconds(sidecar_pid) - cpu_before;
    node.purge(QUEUE).await?;
    r.compared(
        key("drain_msgs_per_s", suffix),
        &label(&format!("backlog of {backlog} drained, from broker back")),
        drain,
        "msg/s",
        "direct_pipelined_msgs_per_s",
    );
    r.compared(
        key("drain_cpu_us_per_msg", suffix),
        &label("drain: sidecar CPU per message (forward)"),
        drain_cpu * 1e6 / backlog as f64,
        "us",
        "direct_pipelined_cpu_us_per_msg",
    );
    r.baseline(
        key("reconnect_ms", suffix),
        &label("sidecar reconnected, after broker back"),
        (reconnected - back).as_secs_f64() * 1000.0,
        "ms",
    );
    sidecar.terminate(Duration::from_secs(60)).await?;

    // -- memory with a large backlog --------------------------------------
    progress(format!(
        "memory: buffering {} messages with the broker unreachable",
        sizes.buffered
    ));
    let closed = reserve_port()?;
    let down_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed.port());
    let buffered_dir = dir.join("outbox-buffered");
    let mut buffered = start_sidecar(
        &down_url,
        &buffered_dir,
        &[
            engine_flag.clone(),
            format!("--max-outbox-messages={}", sizes.buffered * 2),
            format!("--max-outbox-bytes={}", sizes.buffered * 4096),
        ],
    )
    .await?;
    let api = buffered.api_url();
    let fill = load::batches(
        &http,
        &api,
        batch_body,
        args.batch_size,
        args.batch_clients,
        sizes.buffered / args.batch_size,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = pending(&buffered).await?;
    anyhow::ensure!(
        held == sizes.buffered,
        "outbox holds {held} messages, expected {}",
        sizes.buffered
    );
    let rss = rss_mib(&buffered)?;
    r.compared(
        key("outage_batch_accept_msgs_per_s", suffix),
        &label(&format!(
            "broker down: batches ({}/request) accepted",
            args.batch_size
        )),
        fill.rate(),
        "msg/s",
        "fsync_per_s",
    );
    r.budgeted(
        key("sidecar_buffered_rss_mib", suffix),
        &label(&format!(
            "sidecar: RSS with {} messages buffered",
            sizes.buffered
        )),
        rss,
        "MiB",
        RSS_BUDGET_MIB,
    );
    let on_disk = dir_bytes(&buffered_dir);
    r.budgeted(
        key("sidecar_buffered_disk_ratio", suffix),
        &label(&format!(
            "outbox on disk / payload, {} messages buffered",
            sizes.buffered
        )),
        on_disk as f64 / (sizes.buffered as f64 * BODY_BYTES as f64),
        "x",
        1.1,
    );
    // Restart after kill -9 with the backlog: until it is ready and its
    // API reports the backlog.
    buffered.kill9();
    let restart = Instant::now();
    buffered.restart().await?;
    let held = pending(&buffered).await?;
    let restart_ms = restart.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(
        held == sizes.buffered,
        "after the restart the outbox holds {held} messages, expected {}",
        sizes.buffered
    );
    r.budgeted(
        key("sidecar_restart_ms", suffix),
        &label(&format!(
            "restart (kill -9) with {} buffered, until it serves",
            sizes.buffered
        )),
        restart_ms,
        "ms",
        1000.0,
    );
    buffered.kill9();
    drop(closed);

    Ok(())
}

pub(crate) async fn start_sidecar(
    broker_url: &str,
    data_dir: &Path,
    extra: &[String],
) -> anyhow::Result<SidecarProcess> {
    let mut options = SidecarOptions::new(broker_url, data_dir).env("RUST_LOG", "warn");
    options.test_tuning = false;
    options = options
        .arg("--reconnect-initial=100ms")
        .arg("--reconnect-max=500ms");
    for a in extra {
        options = options.arg(a.clone());
    }
    let mut sidecar = SidecarProcess::start(options)?;
    sidecar.wait_ready().await?;
    Ok(sidecar)
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn rss_mib(sidecar: &SidecarProcess) -> anyhow::Result<f64> {
    let bytes = sidecar
        .rss_bytes()
        .context("cannot read the sidecar's RSS")?;
    Ok(bytes as f64 / MIB)
}

async fn pending(sidecar: &SidecarProcess) -> anyhow::Result<u64> {
    sidecar.outbox().await?["pending"]
        .as_u64()
        .context("GET /v1/outbox without pending")
}

/// Waits until the sidecar reports the broker connected (or not).
async fn wait_broker_state(
    sidecar: &SidecarProcess,
    connected: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let state = sidecar.outbox().await?["broker"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if (state == "connected") == connected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the sidecar's broker state is still {state} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the outbox is empty and the queue holds `n` messages; returns
/// when both were first seen.
async fn drained(
    sidecar: &SidecarProcess,
    counter: &mut QueueCounter,
    n: u64,
) -> anyhow::Result<Instant> {
    let timeout = Duration::from_secs(120 + n / 500);
    let at = counter.wait_for(QUEUE, n, timeout).await?;
    let deadline = Instant::now() + timeout;
    while pending(sidecar).await? > 0 {
        if Instant::now() > deadline {
            bail!("the outbox did not drain within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = Instant::now().max(at);
    let c = counter.count(QUEUE).await?;
    anyhow::ensure!(c == n, "{QUEUE} holds {c} messages, expected {n}");
    Ok(done)
}

/// Waits for `n` messages to arrive, then purges the queue.
async fn settle(
    sidecar: &SidecarProcess,
    counter: &mut QueueCounter,
    node: &RabbitNode,
    n: u64,
) -> anyhow::Result<()> {
    drained(sidecar, counter, n).await?;
    node.purge(QUEUE).await?;
    Ok(())
}
