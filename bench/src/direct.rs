//! The baselines: publishing straight to the broker with lapin and publisher
//! confirms, and the disk's single-fsync rate. Also the broker's version,
//! for the report's header.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPClass, connection};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Results of a publishing run.
#[derive(Debug, Clone)]
pub struct Run {
    /// Messages confirmed.
    pub messages: u64,
    /// Wall time from the first publish to the last confirm.
    pub elapsed: Duration,
    /// Per-message latency (publish to confirm), sorted; empty when not
    /// measured per message.
    pub latencies: Vec<Duration>,
}

impl Run {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
}

/// A publisher with confirms on its own connection.
pub struct Publisher {
    conn: Connection,
    channel: Channel,
    body: Vec<u8>,
    next_id: u64,
}

impl Publisher {
    /// Connects and puts a channel into confirm mode.
    pub async fn connect(url: &str, body: Vec<u8>) -> anyhow::Result<Publisher> {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher {
            conn,
            channel,
            body,
            next_id: 0,
        })
    }

    /// Publishes one persistent, mandatory message with a message id, as the
    /// sidecar's forwarder does, and returns the pending confirm.
    async fn publish(&mut self, queue: &str) -> anyhow::Result<lapin::PublisherConfirm> {
        self.next_id += 1;
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("direct-{}", self.next_id).into());
        Ok(self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &self.body,
                props,
            )
            .await?)
    }

    /// `n` messages, each awaited before the next (window 1).
    pub async fn synchronous(&mut self, queue: &str, n: u64) -> anyhow::Result<Run> {
        let mut latencies = Vec::with_capacity(n as usize);
        let start = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            let confirm = self.publish(queue).await?;
            check(confirm.await?)?;
            latencies.push(t.elapsed());
        }
        let elapsed = start.elapsed();
        latencies.sort();
        Ok(Run {
            messages: n,
            elapsed,
            latencies,
        })
    }

    /// `n` messages with up to `window` awaiting their confirm.
    pub async fn pipelined(&mut self, queue: &str, n: u64, window: usize) -> anyhow::Result<Run> {
        let mut inflight = FuturesUnordered::new();
        let start = Instant::now();
        let mut sent = 0;
        while sent < n || !inflight.is_empty() {
            if sent < n && inflight.len() < window {
                let confirm = self.publish(queue).await?;
                inflight.push(confirm);
                sent += 1;
                continue;
            }
            if let Some(c) = inflight.next().await {
                check(c?)?;
            }
        }
        Ok(Run {
            messages: n,
            elapsed: start.elapsed(),
            latencies: Vec::new(),
        })
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.conn.close(200, "bench done".into()).await;
    }
}

fn check(c: Confirmation) -> anyhow::Result<()> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => {
            bail!("message returned: {} {}", r.reply_code, r.reply_text)
        }
        other => bail!("message not confirmed: {other:?}"),
    }
}

/// Counts a queue's messages with passive declares on one long-lived
/// connection (reopened after a broker restart).
pub struct QueueCounter {
    url: String,
    conn: Option<(Connection, Channel)>,
}

impl QueueCounter {
    /// A counter for the broker at `url`.
    pub fn new(url: &str) -> Self {
        QueueCounter {
            url: url.to_owned(),
            conn: None,
        }
    }

    /// Messages ready in `queue` now.
    pub async fn count(&mut self, queue: &str) -> anyhow::Result<u64> {
        if self
            .conn
            .as_ref()
            .is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected())
        {
            let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            self.conn = Some((conn, ch));
        }
        let (_, ch) = self.conn.as_ref().expect("just connected");
        let res = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match res {
            Ok(q) => Ok(u64::from(q.message_count())),
            Err(e) => {
                self.conn = None;
                Err(e.into())
            }
        }
    }

    /// Waits until `queue` holds at least `n` messages; returns when it did.
    pub async fn wait_for(
        &mut self,
        queue: &str,
        n: u64,
        timeout: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(c) = self.count(queue).await
                && c >= n
            {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                let c = self.count(queue).await.unwrap_or(0);
                bail!("{queue} holds {c} of {n} messages after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The disk's rate of single fsyncs: `n` times write a small record to a
/// file in `dir` and fsync it. Returns fsyncs per second.
pub fn fsync_rate(dir: &Path, n: u64) -> anyhow::Result<f64> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("bench-fsync.dat");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let record = [0x5au8; 64];
    // Warm up: allocate the first blocks.
    for _ in 0..10 {
        f.write_all(&record)?;
        f.sync_all()?;
    }
    let start = Instant::now();
    for _ in 0..n {
        f.write_all(&record)?;
        f.sync_all()?;
    }
    let elapsed = start.elapsed();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(n as f64 / elapsed.as_secs_f64())
}

/// The broker's version: the `version` key of the server properties it
/// sends in `connection.start`. lapin does not keep those properties, so
/// this opens a connection of its own, reads that first frame and hangs up
/// before authenticating.
pub async fn broker_version(url: &str) -> anyhow::Result<String> {
    let uri: AMQPUri = url.parse().map_err(|e: String| anyhow!("{e}"))?;
    let read = async {
        let addr = (uri.authority.host.as_str(), uri.authority.port);
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
        // A frame: type (1 = method), channel (2 bytes), payload size (4
        // bytes), the payload, and a frame-end octet.
        let mut head = [0u8; 7];
        stream.read_exact(&mut head).await?;
        anyhow::ensure!(
            head[0] == 1,
            "the broker answered with frame type {}, not connection.start",
            head[0]
        );
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        anyhow::ensure!(size <= 1 << 20, "connection.start of {size} bytes");
        let mut payload = vec![0u8; size + 1];
        stream.read_exact(&mut payload).await?;
        payload.truncate(size);
        anyhow::Ok(payload)
    };
    let payload = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .context("the broker sent no connection.start within 10 s")??;
    let (_, class) = lapin::protocol::parse_class(payload.as_slice())
        .map_err(|e| anyhow!("cannot parse connection.start: {e:?}"))?;
    let AMQPClass::Connection(connection::AMQPMethod::Start(start)) = class else {
        bail!("the broker's first method is not connection.start: {class:?}");
    };
    match start.server_properties.inner().get("version") {
        Some(AMQPValue::LongString(v)) => Ok(v.to_string()),
        Some(AMQPValue::ShortString(v)) => Ok(v.to_string()),
        Some(other) => bail!("the broker's version is not a string: {other:?}"),
        None => bail!("the broker's server properties hold no version"),
    }
}
