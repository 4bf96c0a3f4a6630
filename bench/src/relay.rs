//! The transactional outbox relay: rows committed in a private PostgreSQL
//! cluster, relayed by the `warren-sidecar` binary to the same broker as
//! the baselines.
//!
//! - throughput: `n` rows (1 KiB payloads) committed in one transaction,
//!   timed from that commit until the queue holds them all and the
//!   sidecar's outbox is empty (broker-confirmed, end to end);
//! - latency at low load: one row per transaction every 20 ms, each timed
//!   from the return of its COMMIT to its delivery to a consumer of the
//!   queue (LISTEN/NOTIFY wake-ups).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use warren_testkit::{PgCluster, RabbitNode};

use crate::direct::QueueCounter;
use crate::sidecar::start_sidecar;

/// The DDL the project ships.
const DDL: &str = include_str!("../../sidecar/sql/warren_outbox.sql");

/// What the relay phase measured.
pub struct RelayFigures {
    /// Rows per second, commit to all broker-confirmed.
    pub rate: f64,
    /// Commit-to-delivery latencies at low load, sorted.
    pub latencies: Vec<Duration>,
}

/// Runs both relay measurements against `broker_url`'s `queue`.
pub async fn measure(
    broker_url: &str,
    queue: &str,
    work: &Path,
    body: &[u8],
    node: &RabbitNode,
    rows: u64,
    samples: u64,
) -> anyhow::Result<RelayFigures> {
    let pg = tokio::task::block_in_place(PgCluster::start)?;
    let db = pg.client().await?;
    db.batch_execute(DDL).await.context("applying the DDL")?;
    let mut sidecar = start_sidecar(
        broker_url,
        &work.join("outbox-relay"),
        &[
            format!("--relay-postgres={}", pg.url()),
            "--relay-batch=1000".to_owned(),
        ],
    )
    .await?;
    let mut counter = QueueCounter::new(broker_url);

    let insert = |n: u64| {
        format!(
            "INSERT INTO warren_outbox (message_id, exchange, routing_key, payload) \
             SELECT 'bench-' || g, '', '{queue}', $1::bytea FROM generate_series(1, {n}) AS g"
        )
    };
    // Warm-up: connection, statements, the forwarder's channel.
    db.execute(&insert(1000), &[&body]).await?;
    counter
        .wait_for(queue, 1000, Duration::from_secs(60))
        .await?;
    node.purge(queue).await?;

    let start = Instant::now();
    db.execute(&insert(rows), &[&body]).await?;
    let at = counter
        .wait_for(queue, rows, Duration::from_secs(120 + rows / 500))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sidecar.outbox().await?["pending"].as_u64() != Some(0) {
        if Instant::now() > deadline {
            bail!("the relay's outbox did not drain");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rate = rows as f64 / (at - start).as_secs_f64();
    node.purge(queue).await?;

    // Low load: a consumer takes each message as it arrives.
    let conn = Connection::connect(broker_url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "warren-bench-relay".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let consume = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let now = Instant::now();
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            let _ = d.ack(BasicAckOptions::default()).await;
            if tx.send((id, now)).is_err() {
                break;
            }
        }
    });
    let mut committed = HashMap::new();
    for i in 0..samples {
        let id = format!("lat-{i}");
        db.execute(
            "INSERT INTO warren_outbox (message_id, exchange, routing_key, payload) VALUES ($1, '', $2, $3)",
            &[&id, &queue, &body],
        )
        .await?;
        committed.insert(id, Instant::now());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut latencies = Vec::with_capacity(samples as usize);
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.len() < samples as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((id, at))) = tokio::time::timeout(left, rx.recv()).await else {
            bail!(
                "only {} of {samples} latency samples arrived",
                latencies.len()
            );
        };
        if let Some(c) = committed.remove(&id) {
            latencies.push(at.saturating_duration_since(c));
        }
    }
    latencies.sort();
    consume.abort();
    let _ = conn.close(200, "done".into()).await;
    sidecar.terminate(Duration::from_secs(30)).await?;
    drop(pg);
    Ok(RelayFigures { rate, latencies })
}
