//! Load through the sidecar's HTTP API: single publishes from concurrent
//! clients, and batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;

/// Results of an HTTP load run.
#[derive(Debug, Clone)]
pub struct HttpRun {
    /// Messages accepted (202).
    pub messages: u64,
    /// Wall time from the first request to the last answer.
    pub elapsed: Duration,
    /// Per-request latency, sorted.
    pub latencies: Vec<Duration>,
}

impl HttpRun {
    /// Accepted messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
}

/// An HTTP client with a connection per concurrent publisher.
pub fn client(connections: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()
        .expect("http client")
}

/// `total` single publishes of `body` to `amq.default/<queue>`, from
/// `clients` concurrent publishers, each waiting for its answer before the
/// next request.
pub async fn single(
    http: &reqwest::Client,
    api: &str,
    queue: &str,
    body: Bytes,
    clients: usize,
    total: u64,
) -> anyhow::Result<HttpRun> {
    let url = format!("{api}/v1/publish/amq.default/{queue}");
    let (latencies, elapsed) = post_all(
        http,
        url,
        "application/octet-stream",
        body,
        clients,
        total,
        "publish",
    )
    .await?;
    Ok(HttpRun {
        messages: latencies.len() as u64,
        elapsed,
        latencies,
    })
}

/// `requests` POSTs of `body` to `url`, from `clients` concurrent
/// senders, each waiting for its answer (which must be 202) before the next
/// request. Returns the sorted latencies and the wall time.
async fn post_all(
    http: &reqwest::Client,
    url: String,
    content_type: &'static str,
    body: Bytes,
    clients: usize,
    requests: u64,
    what: &'static str,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let url = Arc::new(url);
    let left = Arc::new(AtomicU64::new(requests));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, left, body) = (http.clone(), url.clone(), left.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
            {
                let t = Instant::now();
                let resp = http
                    .post(url.as_str())
                    .header("content-type", content_type)
                    .body(body.clone())
                    .send()
                    .await
                    .with_context(|| format!("{what} request"))?;
                let status = resp.status();
                let text = resp
                    .bytes()
                    .await
                    .with_context(|| format!("{what} answer"))?;
                if status.as_u16() != 202 {
                    bail!(
                        "{what} answered {status}: {}",
                        String::from_utf8_lossy(&text[..text.len().min(300)])
                    );
                }
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut latencies = Vec::with_capacity(requests as usize);
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    Ok((latencies, elapsed))
}

/// The JSON body of a batch of `n` messages to `amq.default/<queue>`.
pub fn batch_body(queue: &str, payload: &str, n: usize) -> Bytes {
    let one = format!(
        r#"{{"exchange":"amq.default","routing_key":"{queue}","content_type":"text/plain","body":"{payload}"}}"#
    );
    let mut s = String::with_capacity(16 + n * (one.len() + 1));
    s.push_str(r#"{"messages":["#);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&one);
    }
    s.push_str("]}");
    Bytes::from(s)
}

/// `batches` batch requests of `per_batch` messages each (the same
/// prepared body), from `clients` concurrent publishers.
pub async fn batches(
    http: &reqwest::Client,
    api: &str,
    body: Bytes,
    per_batch: u64,
    clients: usize,
    batches: u64,
) -> anyhow::Result<HttpRun> {
    let url = format!("{api}/v1/batch");
    let (latencies, elapsed) = post_all(
        http,
        url,
        "application/json",
        body,
        clients,
        batches,
        "batch",
    )
    .await?;
    Ok(HttpRun {
        messages: latencies.len() as u64 * per_batch,
        elapsed,
        latencies,
    })
}
