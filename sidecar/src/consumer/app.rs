//! Delivering one message to the app over HTTP.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use warren_crds::error_chain::error_chain;

use super::plan::{Attempt, REASON_LIMIT, excerpt};

/// The HTTP client the consumer delivers with.
#[derive(Clone)]
pub struct AppClient {
    http: reqwest::Client,
}

/// One delivery to make.
pub struct Request<'a> {
    pub url: &'a str,
    pub headers: &'a [(String, String)],
    pub content_type: Option<&'a str>,
    pub body: Bytes,
    pub timeout: Duration,
}

impl AppClient {
    /// A client that never follows redirects (a redirect is an answer, not
    /// a success) and keeps connections to the app alive.
    pub fn new() -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("warren-sidecar/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http })
    }

    /// POSTs the message; the whole exchange, answer body included, is
    /// bounded by `timeout`.
    pub async fn deliver(&self, req: Request<'_>) -> Attempt {
        let mut builder = self.http.post(req.url).body(req.body);
        for (k, v) in req.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        builder = builder.header(
            reqwest::header::CONTENT_TYPE,
            req.content_type.unwrap_or("application/octet-stream"),
        );
        let exchange = async {
            let resp = builder.send().await?;
            let status = resp.status().as_u16();
            // Keep only the start of the body as the failure reason, but
            // read it all so the connection can be reused.
            let mut head = Vec::new();
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                if head.len() < REASON_LIMIT * 4 {
                    head.extend_from_slice(
                        &chunk[..chunk.len().min(REASON_LIMIT * 4 - head.len())],
                    );
                }
            }
            Ok::<_, reqwest::Error>(Attempt::Answered {
                status,
                excerpt: if (200..300).contains(&status) {
                    String::new()
                } else {
                    excerpt(&head)
                },
            })
        };
        match tokio::time::timeout(req.timeout, exchange).await {
            Ok(Ok(attempt)) => attempt,
            Ok(Err(e)) if e.is_timeout() => Attempt::TimedOut(req.timeout),
            Ok(Err(e)) => Attempt::Unreachable(error_chain(&e)),
            Err(_) => Attempt::TimedOut(req.timeout),
        }
    }
}
