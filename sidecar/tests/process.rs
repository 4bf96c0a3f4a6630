//! The sidecar as a separate process: killed with SIGKILL mid-stream,
//! stopped with SIGTERM, restarted on the same data dir.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use warren_sidecar::metrics::Metrics;
use warren_sidecar::outbox::{Durability, Engine, Limits, Outbox, SegmentOptions, open_store};
use warren_testkit::{Account, init_tracing};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecar_kill9_mid_stream_loses_nothing() {
    init_tracing();
    let node = start_node().await;
    declare_topology(&node).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("outbox");
    let mut sidecar = SidecarProcess::start(&data, &node.amqp_url(), &[]).await;
    let account = Account::new();
    let producers = Producers::start(
        &sidecar.api,
        &account,
        "sk9",
        8,
        u64::MAX,
        Duration::from_millis(2),
    );
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        sidecar.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        sidecar.restart().await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    producers.stop().await;
    wait_drained(&sidecar.api, Duration::from_secs(60)).await;
    consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(60)).await;
    let report = account.report();
    println!("sidecar kill -9 x3: {report}");
    account.assert_no_loss();
    assert!(report.acked > 1000, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buffered_sidecar_killed_with_sigkill_loses_nothing() {
    init_tracing();
    let node = start_node().await;
    declare_topology(&node).await;
    // Broker down while the kills happen, so the messages sit in the outbox
    // (written to the kernel, not yet synced) when the process dies.
    let node = on_node(node, |n| n.stop()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("outbox");
    let mut sidecar = SidecarProcess::start(
        &data,
        &node.amqp_url(),
        &["--durability=buffered", "--flush-interval=10s"],
    )
    .await;
    let account = Account::new();
    let producers = Producers::start(
        &sidecar.api,
        &account,
        "bk9",
        8,
        u64::MAX,
        Duration::from_millis(1),
    );
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        sidecar.kill9();
        tokio::time::sleep(Duration::from_millis(200)).await;
        sidecar.restart().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    producers.stop().await;
    let node = on_node(node, |n| n.start_again()).await;
    wait_drained(&sidecar.api, Duration::from_secs(60)).await;
    consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(60)).await;
    let report = account.report();
    println!("buffered sidecar kill -9 x3: {report}");
    account.assert_no_loss();
    assert!(report.acked > 1000, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_refuses_new_work_keeps_the_rest_and_restart_forwards_it_first_in_order() {
    init_tracing();
    let node = start_node().await;
    declare_topology(&node).await;
    let node = on_node(node, |n| n.stop()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("outbox");
    let mut sidecar = SidecarProcess::start(&data, &node.amqp_url(), &["--drain-timeout=3s"]).await;
    let http = client();
    let account = Account::new();
    publish_acked(&sidecar.api, "old", 200, &account).await;

    // SIGTERM with the broker down: new publishes get 503 while the sidecar
    // tries to drain, then it exits cleanly with the messages on disk.
    let pid = sidecar.pid();
    // SAFETY: plain kill(2) on our own child.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let api = sidecar.api.clone();
    let admin = sidecar.admin.clone();
    wait_until(
        Duration::from_secs(2),
        "publishes to be refused with 503",
        || {
            let (http, api) = (http.clone(), api.clone());
            async move {
                let resp = http
                    .post(format!("{api}/v1/publish/{EXCHANGE}/{KEY}"))
                    .body("late")
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == 503 => {
                        let body: serde_json::Value = r.json().await.unwrap();
                        assert_eq!(body["error"], "shutting_down");
                        true
                    }
                    Ok(r) => {
                        assert_eq!(r.status(), 202, "only 202 or 503 while shutting down");
                        false
                    }
                    Err(e) => {
                        panic!("the sidecar stopped listening before the drain deadline: {e}")
                    }
                }
            }
        },
    )
    .await;
    let ready = http.get(format!("{admin}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "not ready while shutting down");
    let status = sidecar.terminate(Duration::from_secs(10)).await;
    assert!(
        status.success(),
        "clean exit after the drain deadline: {status:?}"
    );

    // Everything is still on disk.
    {
        let store = open_store(
            Engine::Segment,
            &data,
            SegmentOptions::default(),
            1 << 20,
            None,
        )
        .unwrap();
        let outbox = Outbox::open(
            store,
            Limits {
                max_messages: u64::MAX,
                max_bytes: u64::MAX,
            },
            Durability::Flush,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        assert!(outbox.stats().pending >= 200, "{:?}", outbox.stats());
    }

    // Broker back, sidecar restarted: the old messages go first, in order,
    // before anything published after the restart.
    let node = on_node(node, |n| n.start_again()).await;
    sidecar.restart().await;
    publish_acked(&sidecar.api, "new", 100, &account).await;
    wait_drained(&sidecar.api, Duration::from_secs(60)).await;
    let received = consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(30)).await;
    println!("SIGTERM + restart: {}", account.report());
    account.assert_no_loss();
    let old: Vec<&str> = received
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| id.starts_with("old-"))
        .collect();
    let mut sorted = old.clone();
    sorted.sort();
    assert_eq!(
        old, sorted,
        "left-over messages are forwarded in outbox order"
    );
    let first_new = received
        .iter()
        .position(|(id, _)| id.starts_with("new-"))
        .unwrap();
    let last_old = received
        .iter()
        .rposition(|(id, _)| id.starts_with("old-"))
        .unwrap();
    assert!(
        last_old < first_new,
        "left-over messages go before new ones"
    );

    // With the broker up, SIGTERM drains everything before exiting.
    for i in 0..300 {
        let id = format!("drain-{i}");
        assert!(
            publish(
                &http,
                &sidecar.api,
                EXCHANGE,
                KEY,
                &id,
                id.as_bytes().to_vec()
            )
            .await
            .unwrap()
        );
        account.record_acked(id);
    }
    let status = sidecar.terminate(Duration::from_secs(20)).await;
    assert!(status.success());
    let store = open_store(
        Engine::Segment,
        &data,
        SegmentOptions::default(),
        1 << 20,
        None,
    )
    .unwrap();
    let outbox = Outbox::open(
        store,
        Limits {
            max_messages: u64::MAX,
            max_bytes: u64::MAX,
        },
        Durability::Flush,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    assert_eq!(
        outbox.stats().pending,
        0,
        "SIGTERM with a reachable broker drains the outbox"
    );
    consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(30)).await;
    account.assert_no_loss();
}

/// Runs `warren-sidecar --drain` on `data` the way the operator's drain Job
/// does: broker settings from the environment variables an injected
/// sidecar gets from a Cluster Operator Secret. Returns the exit status and
/// how long it ran.
async fn run_drain(data: &std::path::Path, amqp_port: u16) -> (std::process::ExitStatus, Duration) {
    let log = std::fs::File::create(data.with_extension("drain.log")).unwrap();
    let started = std::time::Instant::now();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren-sidecar"))
        .arg("--drain")
        .env("WARREN_DATA_DIR", data)
        .env("WARREN_LISTEN", "127.0.0.1:0")
        .env("WARREN_ADMIN_LISTEN", "127.0.0.1:0")
        .env("WARREN_BROKER_URI", "")
        .env("WARREN_BROKER_HOST", "127.0.0.1")
        .env("WARREN_BROKER_PORT", amqp_port.to_string())
        .env("WARREN_BROKER_USERNAME", "guest")
        .env("WARREN_BROKER_PASSWORD", "guest")
        .env("WARREN_BROKER_VHOST", "/")
        .env("WARREN_RECONNECT_MAX", "500ms")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn warren-sidecar --drain");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "drain did not finish in 60 s\n{}",
                std::fs::read_to_string(data.with_extension("drain.log")).unwrap_or_default()
            )
        })
        .unwrap();
    (status, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_mode_forwards_what_a_killed_sidecar_left_and_exits() {
    init_tracing();
    let node = start_node().await;
    declare_topology(&node).await;
    let node = on_node(node, |n| n.stop()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("outbox");

    // A pod's sidecar accepts messages while the broker is down, then the
    // pod is deleted (SIGKILL): the messages stay on its volume.
    let mut sidecar = SidecarProcess::start(&data, &node.amqp_url(), &[]).await;
    let account = Account::new();
    publish_acked(&sidecar.api, "orphan", 300, &account).await;
    sidecar.kill9();

    // The broker comes back; a drain run on the volume forwards everything
    // and exits 0.
    let node = on_node(node, |n| n.start_again()).await;
    let (status, took) = run_drain(&data, node.amqp_port()).await;
    assert!(status.success(), "drain exit status {status:?}");
    consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(30)).await;
    let report = account.report();
    println!("drain of a killed sidecar's outbox: {report} in {took:?}");
    account.assert_no_loss();

    // Draining an empty outbox is quick and also succeeds.
    let (status, took) = run_drain(&data, node.amqp_port()).await;
    assert!(status.success(), "drain exit status {status:?}");
    assert!(took < Duration::from_secs(15), "empty drain took {took:?}");
}

/// SIGTERM while the broker blocks publishing (a memory alarm), with the
/// forwarder in the middle of handing a large message to a connection the
/// broker no longer reads: the sidecar still exits within its drain
/// deadline, and what it could not forward is on disk and delivered after
/// a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_a_memory_alarm_exits_within_the_drain_deadline() {
    init_tracing();
    let node = start_node().await;
    declare_topology(&node).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("outbox");
    let mut sidecar = SidecarProcess::start(&data, &node.amqp_url(), &["--drain-timeout=2s"]).await;
    let node = on_node(node, |n| n.set_memory_alarm()).await;
    let http = client();
    let account = Account::new();
    // Large messages fill the socket the broker stopped reading, so a
    // publish is left waiting inside the client library.
    for i in 0..100 {
        let id = format!("blocked-{i:03}");
        let mut body = id.clone().into_bytes();
        body.resize(256 * 1024, b'.');
        assert!(
            publish(&http, &sidecar.api, EXCHANGE, KEY, &id, body)
                .await
                .unwrap()
        );
        account.record_acked(id);
    }
    let api = sidecar.api.clone();
    wait_until(
        Duration::from_secs(10),
        "the sidecar to see connection.blocked",
        || async { outbox_report(&api).await["broker"]["state"] == "blocked" },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let status = sidecar.terminate(Duration::from_secs(15)).await;
    let took = started.elapsed();
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM took {took:?} with a 2s drain deadline\n{}",
        sidecar.log_tail()
    );

    let node = on_node(node, |n| n.clear_memory_alarm()).await;
    sidecar.restart().await;
    wait_drained(&sidecar.api, Duration::from_secs(60)).await;
    let received = consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(30)).await;
    println!("sigterm while blocked: {}", account.report());
    account.assert_no_loss();
    for (id, body) in &received {
        assert!(body.starts_with(id.as_bytes()), "{id} arrived intact");
    }
    sidecar.terminate(Duration::from_secs(10)).await;
}
