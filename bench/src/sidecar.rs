//! Everything measured through the `warren-sidecar` binary, once per outbox
//! engine: idle memory, single publishes from 1 and 64 clients, batches end
//! to end, accepting during a broker outage and draining the backlog after
//! it, and a large backlog's memory, size on disk and restart. One function
//! per figure group, run in that order by [`engine_phases`].

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use warren_testkit::{PortReservation, RabbitNode, SidecarOptions, SidecarProcess, reserve_port};

use crate::direct::QueueCounter;
use crate::report::{Report, percentile_ms};
use crate::{
    Args, BODY_BYTES, MIB, QUEUE, RSS_BUDGET_MIB, Sizes, cpu_seconds, key, load, progress,
};

/// One engine's part of the run.
pub(crate) struct EngineRun<'a> {
    /// `--outbox-engine` value.
    pub engine: &'a str,
    /// Appended to every figure's key.
    pub suffix: &'a str,
    /// Where its outboxes live.
    pub dir: &'a Path,
    pub sizes: &'a Sizes,
    pub args: &'a Args,
    pub body: &'a str,
}

/// What the phases of one engine share.
struct Phase<'a> {
    /// `--outbox-engine` value.
    engine: &'a str,
    /// Appended to every figure's key.
    suffix: &'a str,
    sizes: &'a Sizes,
    args: &'a Args,
    /// The `--outbox-engine` flag.
    engine_flag: String,
    /// A client with a connection per concurrent publisher.
    http: reqwest::Client,
    /// One message's body, for single publishes.
    raw: Bytes,
    /// One batch request (`--batch-size` messages).
    batch_body: Bytes,
}

impl Phase<'_> {
    /// The figure's key for this engine.
    fn key(&self, base: &'static str) -> &'static str {
        key(base, self.suffix)
    }

    /// The figure's label, with the engine.
    fn label(&self, l: &str) -> String {
        format!("[{}] {l}", self.engine)
    }
}

/// Everything measured through the sidecar, for one engine.
pub(crate) async fn engine_phases(
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
    let p = Phase {
        engine,
        suffix,
        sizes,
        args,
        engine_flag: format!("--outbox-engine={engine}"),
        http: load::client(128),
        raw: Bytes::from(body.to_owned()),
        batch_body: load::batch_body(QUEUE, body, args.batch_size as usize),
    };
    progress(format!("starting warren-sidecar, engine {engine}"));
    let mut sidecar = start_sidecar(
        &node.amqp_url(),
        &dir.join("outbox"),
        std::slice::from_ref(&p.engine_flag),
    )
    .await?;
    idle_rss(r, &p, &sidecar).await?;
    warm_up(&p, &sidecar, node, counter).await?;
    single1(r, &p, &sidecar, node, counter).await?;
    single64(r, &p, &sidecar, node, counter).await?;
    batch_e2e(r, &p, &sidecar, node, counter).await?;
    let backlog = outage_accept(r, &p, &sidecar, node).await?;
    drain(r, &p, &sidecar, node, counter, backlog).await?;
    sidecar.terminate(Duration::from_secs(60)).await?;

    progress(format!(
        "memory: buffering {} messages with the broker unreachable",
        sizes.buffered
    ));
    let closed = reserve_port()?;
    let mut buffered = buffered_backlog(r, &p, &closed, &dir.join("outbox-buffered")).await?;
    restart_with_backlog(r, &p, &mut buffered).await?;
    buffered.kill9();
    drop(closed);
    Ok(())
}

/// `sidecar_idle_rss_mib`: connected, with an empty outbox.
async fn idle_rss(r: &mut Report, p: &Phase<'_>, sidecar: &SidecarProcess) -> anyhow::Result<()> {
    wait_broker_state(sidecar, true, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_mib(sidecar)?;
    r.budgeted(
        p.key("sidecar_idle_rss_mib"),
        &p.label("sidecar: RSS idle (connected, empty outbox)"),
        idle_rss,
        "MiB",
        RSS_BUDGET_MIB,
    );
    Ok(())
}

/// Warms up both publish paths (single and batch).
async fn warm_up(
    p: &Phase<'_>,
    sidecar: &SidecarProcess,
    node: &RabbitNode,
    counter: &mut QueueCounter,
) -> anyhow::Result<()> {
    let api = sidecar.api_url();
    load::single(&p.http, &api, QUEUE, p.raw.clone(), 4, 500).await?;
    load::batches(&p.http, &api, p.batch_body.clone(), p.args.batch_size, 1, 2).await?;
    settle(sidecar, counter, node, 500 + 2 * p.args.batch_size).await
}

/// `sidecar_single1_*`: single publishes from one client, against the
/// synchronous direct publisher.
async fn single1(
    r: &mut Report,
    p: &Phase<'_>,
    sidecar: &SidecarProcess,
    node: &RabbitNode,
    counter: &mut QueueCounter,
) -> anyhow::Result<()> {
    let n = p.sizes.single1;
    progress(format!("sidecar single publishes, 1 client: {n}"));
    let api = sidecar.api_url();
    let one = load::single(&p.http, &api, QUEUE, p.raw.clone(), 1, n).await?;
    settle(sidecar, counter, node, n).await?;
    r.compared(
        p.key("sidecar_single1_msgs_per_s"),
        &p.label("sidecar single publish, 1 client: accepted"),
        one.rate(),
        "msg/s",
        "direct_sync_msgs_per_s",
    );
    r.compared(
        p.key("sidecar_single1_p50_ms"),
        &p.label("sidecar single publish, 1 client: p50 HTTP"),
        percentile_ms(&one.latencies, 50.0),
        "ms",
        "direct_sync_p50_ms",
    );
    r.compared(
        p.key("sidecar_single1_p99_ms"),
        &p.label("sidecar single publish, 1 client: p99 HTTP"),
        percentile_ms(&one.latencies, 99.0),
        "ms",
        "direct_sync_p99_ms",
    );
    Ok(())
}

/// `sidecar_single64_*`: single publishes from 64 clients, against the
/// pipelined direct publisher's throughput.
async fn single64(
    r: &mut Report,
    p: &Phase<'_>,
    sidecar: &SidecarProcess,
    node: &RabbitNode,
    counter: &mut QueueCounter,
) -> anyhow::Result<()> {
    let n = p.sizes.single64;
    progress(format!("sidecar single publishes, 64 clients: {n}"));
    let api = sidecar.api_url();
    load::single(&p.http, &api, QUEUE, p.raw.clone(), 64, 640).await?;
    settle(sidecar, counter, node, 640).await?;
    let many = load::single(&p.http, &api, QUEUE, p.raw.clone(), 64, n).await?;
    settle(sidecar, counter, node, n).await?;
    r.compared(
        p.key("sidecar_single64_msgs_per_s"),
        &p.label("sidecar single publish, 64 clients: accepted"),
        many.rate(),
        "msg/s",
        "direct_pipelined_msgs_per_s",
    );
    r.compared(
        p.key("sidecar_single64_p50_ms"),
        &p.label("sidecar single publish, 64 clients: p50 HTTP"),
        percentile_ms(&many.latencies, 50.0),
        "ms",
        "direct_sync_p50_ms",
    );
    r.compared(
        p.key("sidecar_single64_p99_ms"),
        &p.label("sidecar single publish, 64 clients: p99 HTTP"),
        percentile_ms(&many.latencies, 99.0),
        "ms",
        "direct_sync_p99_ms",
    );
    Ok(())
}

/// `sidecar_batch_*`: batches until the queue holds them all; the accept
/// rate and the sidecar's CPU per message too.
async fn batch_e2e(
    r: &mut Report,
    p: &Phase<'_>,
    sidecar: &SidecarProcess,
    node: &RabbitNode,
    counter: &mut QueueCounter,
) -> anyhow::Result<()> {
    let (n, per_batch) = (p.sizes.batch, p.args.batch_size);
    progress(format!(
        "sidecar batches end to end: {n} messages in batches of {per_batch}"
    ));
    let sidecar_pid = sidecar.pid().context("the sidecar is not running")?;
    let cpu_before = cpu_seconds(sidecar_pid);
    let start = Instant::now();
    let accepted = load::batches(
        &p.http,
        &sidecar.api_url(),
        p.batch_body.clone(),
        per_batch,
        p.args.batch_clients,
        n / per_batch,
    )
    .await?;
    let done = drained(sidecar, counter, n).await?;
    let e2e = n as f64 / (done - start).as_secs_f64();
    let batch_cpu = cpu_seconds(sidecar_pid) - cpu_before;
    node.purge(QUEUE).await?;
    r.compared(
        p.key("sidecar_batch_e2e_msgs_per_s"),
        &p.label(&format!(
            "sidecar batch ({per_batch}/request): broker-confirmed, end to end"
        )),
        e2e,
        "msg/s",
        "direct_pipelined_msgs_per_s",
    );
    r.compared(
        p.key("sidecar_batch_accept_msgs_per_s"),
        &p.label(&format!("sidecar batch ({per_batch}/request): accepted")),
        accepted.rate(),
        "msg/s",
        "direct_pipelined_msgs_per_s",
    );
    r.compared(
        p.key("sidecar_batch_cpu_us_per_msg"),
        &p.label("sidecar batch: sidecar CPU per message (accept+forward)"),
        batch_cpu * 1e6 / n as f64,
        "us",
        "direct_pipelined_cpu_us_per_msg",
    );
    Ok(())
}

/// `outage_accept_msgs_per_s`: stops the broker and publishes singly from
/// 64 clients into the outbox. Returns the backlog it holds then.
async fn outage_accept(
    r: &mut Report,
    p: &Phase<'_>,
    sidecar: &SidecarProcess,
    node: &mut RabbitNode,
) -> anyhow::Result<u64> {
    progress("outage: stopping the broker gracefully");
    tokio::task::block_in_place(|| node.stop())?;
    wait_broker_state(sidecar, false, Duration::from_secs(30)).await?;
    let api = sidecar.api_url();
    load::single(&p.http, &api, QUEUE, p.raw.clone(), 64, 640).await?;
    let n = p.sizes.backlog;
    progress(format!("outage: {n} single publishes from 64 clients"));
    let outage = load::single(&p.http, &api, QUEUE, p.raw.clone(), 64, n).await?;
    r.compared(
        p.key("outage_accept_msgs_per_s"),
        &p.label("broker down: accepted into the outbox, 64 clients"),
        outage.rate(),
        "msg/s",
        "fsync_per_s",
    );
    let backlog = pending(sidecar).await?;
    anyhow::ensure!(
        backlog >= n,
        "outbox holds {backlog} messages, expected at least {n}"
    );
    Ok(backlog)
}

/// `drain_*` and `reconnect_ms`: starts the broker again and times the
/// reconnect and the drain of `backlog`, with the sidecar's CPU per message.
async fn drain(
    r: &mut Report,
    p: &Phase<'_>,
    sidecar: &SidecarProcess,
    node: &mut RabbitNode,
    counter: &mut QueueCounter,
    backlog: u64,
) -> anyhow::Result<()> {
    progress(format!(
        "outage: starting the broker again, draining {backlog}"
    ));
    let sidecar_pid = sidecar.pid().context("the sidecar is not running")?;
    tokio::task::block_in_place(|| node.start_again())?;
    let cpu_before = cpu_seconds(sidecar_pid);
    let back = Instant::now();
    wait_broker_state(sidecar, true, Duration::from_secs(60)).await?;
    let reconnected = Instant::now();
    let done = drained(sidecar, counter, backlog).await?;
    let drain = backlog as f64 / (done - back).as_secs_f64();
    let drain_cpu = cpu_seconds(sidecar_pid) - cpu_before;
    node.purge(QUEUE).await?;
    r.compared(
        p.key("drain_msgs_per_s"),
        &p.label(&format!("backlog of {backlog} drained, from broker back")),
        drain,
        "msg/s",
        "direct_pipelined_msgs_per_s",
    );
    r.compared(
        p.key("drain_cpu_us_per_msg"),
        &p.label("drain: sidecar CPU per message (forward)"),
        drain_cpu * 1e6 / backlog as f64,
        "us",
        "direct_pipelined_cpu_us_per_msg",
    );
    r.baseline(
        p.key("reconnect_ms"),
        &p.label("sidecar reconnected, after broker back"),
        (reconnected - back).as_secs_f64() * 1000.0,
        "ms",
    );
    Ok(())
}

/// `outage_batch_accept_msgs_per_s` and `sidecar_buffered_*`: a sidecar
/// whose broker is unreachable (`closed`, a reserved port nobody listens
/// on) buffers the large backlog in batches; its RSS and the outbox's size
/// on disk. Returns that sidecar, still holding the backlog.
async fn buffered_backlog(
    r: &mut Report,
    p: &Phase<'_>,
    closed: &PortReservation,
    outbox_dir: &Path,
) -> anyhow::Result<SidecarProcess> {
    let n = p.sizes.buffered;
    let down_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed.port());
    let buffered = start_sidecar(
        &down_url,
        outbox_dir,
        &[
            p.engine_flag.clone(),
            format!("--max-outbox-messages={}", n * 2),
            format!("--max-outbox-bytes={}", n * 4096),
        ],
    )
    .await?;
    let fill = load::batches(
        &p.http,
        &buffered.api_url(),
        p.batch_body.clone(),
        p.args.batch_size,
        p.args.batch_clients,
        n / p.args.batch_size,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = pending(&buffered).await?;
    anyhow::ensure!(held == n, "outbox holds {held} messages, expected {n}");
    let rss = rss_mib(&buffered)?;
    r.compared(
        p.key("outage_batch_accept_msgs_per_s"),
        &p.label(&format!(
            "broker down: batches ({}/request) accepted",
            p.args.batch_size
        )),
        fill.rate(),
        "msg/s",
        "fsync_per_s",
    );
    r.budgeted(
        p.key("sidecar_buffered_rss_mib"),
        &p.label(&format!("sidecar: RSS with {n} messages buffered")),
        rss,
        "MiB",
        RSS_BUDGET_MIB,
    );
    let on_disk = dir_bytes(outbox_dir);
    r.budgeted(
        p.key("sidecar_buffered_disk_ratio"),
        &p.label(&format!("outbox on disk / payload, {n} messages buffered")),
        on_disk as f64 / (n as f64 * BODY_BYTES as f64),
        "x",
        1.1,
    );
    Ok(buffered)
}

/// `sidecar_restart_ms`: after `kill -9` with the backlog, until the
/// sidecar is ready and its API reports the backlog.
async fn restart_with_backlog(
    r: &mut Report,
    p: &Phase<'_>,
    buffered: &mut SidecarProcess,
) -> anyhow::Result<()> {
    let n = p.sizes.buffered;
    buffered.kill9();
    let restart = Instant::now();
    buffered.restart().await?;
    let held = pending(buffered).await?;
    let restart_ms = restart.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(
        held == n,
        "after the restart the outbox holds {held} messages, expected {n}"
    );
    r.budgeted(
        p.key("sidecar_restart_ms"),
        &p.label(&format!(
            "restart (kill -9) with {n} buffered, until it serves"
        )),
        restart_ms,
        "ms",
        1000.0,
    );
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
