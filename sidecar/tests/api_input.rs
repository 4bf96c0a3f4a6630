//! Bad input gets a clear JSON error and stores nothing; good input is
//! stored exactly as given. No broker is needed: the sidecar points at a
//! closed port and keeps everything in its outbox.

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use warren_sidecar::Running;
use warren_sidecar::outbox::Message;

async fn sidecar(dir: &std::path::Path) -> (Running, String) {
    let url = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        warren_testkit::free_port()
    );
    let mut cfg = test_config(&url, dir);
    cfg.max_message_bytes = 1024;
    cfg.max_batch_bytes = 64 * 1024;
    cfg.max_batch_messages = 10;
    cfg.drain_timeout = Duration::from_millis(500);
    let running = warren_sidecar::start(cfg).await.unwrap();
    let api = format!("http://{}", running.api_addr);
    (running, api)
}

async fn expect_error(resp: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(resp.status(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], code, "{body}");
    assert!(!body["message"].as_str().unwrap().is_empty(), "{body}");
    body
}

fn stored(running: &Running) -> Vec<Message> {
    running
        .outbox
        .read_pending(0, 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.message.unwrap())
        .collect()
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (running, api) = sidecar(dir.path()).await;
    let http = client();
    let post = |path: String| http.post(format!("{api}{path}"));

    let long = "k".repeat(256);
    expect_error(
        post(format!("/v1/publish/orders/{long}"))
            .body("x")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        post(format!("/v1/publish/{long}/key"))
            .body("x")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    // Percent-encoded bytes that are not UTF-8.
    expect_error(
        post("/v1/publish/orders/%FF%FE".into())
            .body("x")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    // Control characters in a routing key.
    expect_error(
        post("/v1/publish/orders/a%0Ab".into())
            .body("x")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        post("/v1/publish/orders/k".into())
            .body(vec![0u8; 1025])
            .send()
            .await
            .unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    )
    .await;
    // Oversized without a Content-Length (chunked).
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..5).map(|_| Ok(vec![1u8; 400])).collect();
    let stream = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    expect_error(
        post("/v1/publish/orders/k".into())
            .body(stream)
            .send()
            .await
            .unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    )
    .await;
    let non_utf8 = reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap();
    expect_error(
        post("/v1/publish/orders/k".into())
            .header("X-Warren-Header-Tenant", non_utf8)
            .body("x")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        post("/v1/publish/orders/k".into())
            .header("X-Warren-Headers-Tenant", "typo")
            .body("x")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        post("/v1/publish/orders/k".into())
            .header("X-Warren-Message-Id", "i".repeat(300))
            .body("x")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;

    // Batches: malformed JSON, unknown fields, empty, too many, one bad
    // message (nothing of the batch is stored, the index is reported).
    expect_error(
        post("/v1/batch".into())
            .body("{not json")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        post("/v1/batch".into())
            .json(&json!({"messages": [{"exchange": "o", "bogus": 1}]}))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        post("/v1/batch".into())
            .json(&json!({"messages": []}))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    let eleven: Vec<Value> = (0..11)
        .map(|i| json!({"exchange": "orders", "body": i.to_string()}))
        .collect();
    expect_error(
        post("/v1/batch".into())
            .json(&json!({"messages": eleven}))
            .send()
            .await
            .unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    )
    .await;
    let body = expect_error(
        post("/v1/batch".into())
            .json(&json!({"messages": [
                {"exchange": "orders", "routing_key": "a", "body": "ok"},
                {"exchange": "orders", "routing_key": long, "body": "bad"},
            ]}))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    assert_eq!(body["index"], 1);
    assert!(body["message"].as_str().unwrap().starts_with("messages[1]"));
    expect_error(
        post("/v1/batch".into())
            .json(&json!({"messages": [{"exchange": "o", "body": "a", "body_base64": "YQ=="}]}))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        post("/v1/batch".into())
            .json(&json!({"messages": [{"exchange": "o", "body_base64": "***"}]}))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        post("/v1/batch".into())
            .json(&json!({"messages": [{"exchange": "o", "body": "x".repeat(2000)}]}))
            .send()
            .await
            .unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    )
    .await;

    expect_error(
        http.get(format!("{api}/v1/nothing")).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        http.get(format!("{api}/v1/publish/orders/k"))
            .send()
            .await
            .unwrap(),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;

    assert!(
        stored(&running).is_empty(),
        "a refused request stored something"
    );
    assert_eq!(outbox_report(&api).await["pending"], 0);
    let metrics = metrics_text(&format!("http://{}", running.admin_addr)).await;
    assert!(
        metrics.contains("warren_sidecar_publish_rejected_total{reason=\"invalid\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("warren_sidecar_publish_rejected_total{reason=\"too_large\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("warren_sidecar_publish_accepted_total 0"),
        "{metrics}"
    );
    running.shutdown();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn good_requests_are_stored_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (running, api) = sidecar(dir.path()).await;
    let http = client();

    let resp = http
        .post(format!("{api}/v1/publish/orders/eu%2Fcreated"))
        .header("Content-Type", "application/json")
        .header("X-Warren-Message-Id", "order-17")
        .header("X-Warren-Header-Tenant", "acme")
        .header("X-Warren-Header-Trace", "t-1")
        .body(r#"{"id":17}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["id"], "order-17");
    let first_seq = body["seq"].as_u64().unwrap();

    // The default exchange, an empty routing key, and an assigned id.
    let resp = http
        .post(format!("{api}/v1/publish/amq.default/jobs"))
        .body(vec![0u8, 255, 1])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let assigned: Value = resp.json().await.unwrap();
    let assigned_id = assigned["id"].as_str().unwrap().to_owned();
    assert_eq!(
        uuid::Uuid::parse_str(&assigned_id)
            .unwrap()
            .get_version_num(),
        7
    );
    let resp = http
        .post(format!("{api}/v1/publish/fanout.events/"))
        .body("e")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);

    let resp = http
        .post(format!("{api}/v1/batch"))
        .json(&json!({"messages": [
            {"exchange": "orders", "routing_key": "a", "body": "text", "message_id": "b-1", "headers": {"k": "v"}, "content_type": "text/plain"},
            {"exchange": "orders", "routing_key": "b", "body_base64": "AAEC"},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let batch: Value = resp.json().await.unwrap();
    let results = batch["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["id"], "b-1");
    assert!(results[1]["seq"].as_u64().unwrap() > results[0]["seq"].as_u64().unwrap());

    let msgs = stored(&running);
    assert_eq!(msgs.len(), 5);
    let m = &msgs[0];
    assert_eq!(
        (
            m.exchange.as_str(),
            m.routing_key.as_str(),
            m.message_id.as_str()
        ),
        ("orders", "eu/created", "order-17")
    );
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    let mut headers = m.headers.clone();
    headers.sort();
    assert_eq!(
        headers,
        vec![
            ("tenant".to_owned(), "acme".to_owned()),
            ("trace".to_owned(), "t-1".to_owned())
        ]
    );
    assert_eq!(&m.body[..], br#"{"id":17}"#);
    assert_eq!(
        (msgs[1].exchange.as_str(), msgs[1].routing_key.as_str()),
        ("", "jobs")
    );
    assert_eq!(msgs[1].message_id, assigned_id);
    assert_eq!(&msgs[1].body[..], &[0u8, 255, 1]);
    assert_eq!(
        (msgs[2].exchange.as_str(), msgs[2].routing_key.as_str()),
        ("fanout.events", "")
    );
    assert_eq!(msgs[3].headers, vec![("k".to_owned(), "v".to_owned())]);
    assert_eq!(&msgs[4].body[..], &[0u8, 1, 2]);

    let report = outbox_report(&api).await;
    assert_eq!(report["pending"], 5);
    assert_eq!(report["durability"], "flush");
    assert_eq!(report["accepting"], true);
    assert!(report["pending_bytes"].as_u64().unwrap() > 0);
    assert!(first_seq >= 1);
    let metrics = metrics_text(&format!("http://{}", running.admin_addr)).await;
    assert!(
        metrics.contains("warren_sidecar_publish_accepted_total 5"),
        "{metrics}"
    );

    // Health and readiness, with the broker unreachable.
    let admin = format!("http://{}", running.admin_addr);
    assert_eq!(
        http.get(format!("{admin}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    running.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let left = running.wait().await.unwrap();
    assert_eq!(
        left.pending, 5,
        "what could not be forwarded stays in the outbox"
    );
}
