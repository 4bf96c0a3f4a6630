//! A small HTTP app that receives the sidecar's deliveries, answers as a
//! test tells it to, and records every delivery it saw.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use tokio::task::JoinHandle;

/// How the app answers one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Answer with this status.
    Status(u16),
    /// Never answer.
    Hang,
    /// Answer with this status after a pause.
    After(std::time::Duration, u16),
}

/// One delivery the app received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `X-Warren-Message-Id`.
    pub id: String,
    /// `X-Warren-Retries`.
    pub retries: u32,
    /// `X-Warren-Redelivered`.
    pub redelivered: bool,
    /// When it arrived.
    pub at: Instant,
    /// What the app answered (`None`: it hung).
    pub reply: Reply,
    pub headers: HeaderMap,
    pub body: Bytes,
}

type Behavior = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

struct Inner {
    behavior: Box<Behavior>,
    log: Mutex<Vec<Seen>>,
}

/// The running app.
pub struct TestApp {
    /// Where deliveries go: `http://127.0.0.1:PORT/deliver`.
    pub url: String,
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    server: JoinHandle<()>,
}

impl TestApp {
    /// Starts the app. `behavior` gets each delivery and how many times the
    /// same message id was seen before (0 on the first delivery).
    pub async fn start(
        behavior: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
    ) -> TestApp {
        let inner = Arc::new(Inner {
            behavior: Box::new(behavior),
            log: Mutex::new(Vec::new()),
        });
        let router = axum::Router::new()
            .route("/deliver", post(deliver))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test app");
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        TestApp {
            url: format!("http://{addr}/deliver"),
            addr,
            inner,
            server,
        }
    }

    /// Every delivery so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.log.lock().unwrap().clone()
    }

    /// Deliveries so far.
    pub fn deliveries(&self) -> usize {
        self.inner.log.lock().unwrap().len()
    }

    /// How many 2xx answers the app gave, per message id.
    pub fn successes(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for s in self.inner.log.lock().unwrap().iter() {
            if matches!(s.reply, Reply::Status(c) | Reply::After(_, c) if (200..300).contains(&c)) {
                *out.entry(s.id.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    /// The deliveries of one message id, in order.
    pub fn attempts(&self, id: &str) -> Vec<Seen> {
        self.inner
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.id == id)
            .cloned()
            .collect()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn deliver(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let text = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut seen = Seen {
        id: text("x-warren-message-id"),
        retries: text("x-warren-retries").parse().unwrap_or(u32::MAX),
        redelivered: text("x-warren-redelivered") == "true",
        at: Instant::now(),
        reply: Reply::Hang,
        headers: headers.clone(),
        body,
    };
    let reply = {
        let mut log = inner.log.lock().unwrap();
        let before = log.iter().filter(|s| s.id == seen.id).count();
        seen.reply = (inner.behavior)(&seen, before);
        log.push(seen.clone());
        seen.reply
    };
    match reply {
        Reply::Status(code) => StatusCode::from_u16(code).expect("valid status"),
        Reply::Hang => std::future::pending().await,
        Reply::After(pause, code) => {
            tokio::time::sleep(pause).await;
            StatusCode::from_u16(code).expect("valid status")
        }
    }
}
