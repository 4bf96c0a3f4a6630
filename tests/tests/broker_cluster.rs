//! Warren on a three-node RabbitMQ cluster: a producer and a consumer
//! sidecar (processes) given all three addresses ride out the loss of any
//! node. Quorum queues confirm a publish only once a majority holds it, so
//! no acknowledged message may be lost while one node at a time is down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::task::{block_in_place, spawn_blocking};
use warren_testkit::scenario::{Apply, Console, CountingApp, Workload, example_manifest};
use warren_testkit::{Account, RabbitCluster, SidecarOptions, SidecarProcess, init_tracing};

/// The AMQP port of the address a sidecar's status names.
fn port_in(url: &serde_json::Value) -> Option<u16> {
    let authority = url.as_str()?.split("://").nth(1)?.split('/').next()?;
    authority.rsplit(':').next()?.parse().ok()
}

/// The member a sidecar's forwarder is connected to.
async fn producer_node(cluster: &RabbitCluster, producer: &SidecarProcess) -> Option<usize> {
    let outbox = producer.outbox().await.ok()?;
    if outbox["broker"]["state"] != "connected" {
        return None;
    }
    cluster.index_of_port(port_in(&outbox["broker"]["url"])?)
}

async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecars_ride_out_the_loss_of_any_node_of_a_cluster() {
    init_tracing();
    let mut cluster = spawn_blocking(|| RabbitCluster::start(3).expect("a three-node cluster"))
        .await
        .unwrap();
    let workload = Workload::from_manifest(&example_manifest()).unwrap();
    workload
        .apply(&Apply::Library, &cluster.nodes()[0], &Console::new(false))
        .await
        .unwrap();
    let queue_type = cluster.nodes()[0]
        .management_get(&format!("/api/queues/%2F/{}", workload.queue))
        .await
        .unwrap();
    assert_eq!(queue_type["type"], "quorum");

    let account = Account::new();
    let app = CountingApp::start(account.clone()).await.unwrap();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut producer =
        SidecarProcess::start(SidecarOptions::new(cluster.amqp_url(), dirs.0.path())).unwrap();
    let mut consumer = SidecarProcess::start(
        SidecarOptions::new(cluster.amqp_url(), dirs.1.path())
            .consumer_config(workload.consumer_config(&app.url)),
    )
    .unwrap();
    producer.wait_ready().await.unwrap();
    consumer.wait_ready().await.unwrap();

    // One publisher, paced, recording every 202.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, account) = (stop.clone(), account.clone());
        let url = format!(
            "{}/v1/publish/{}/{}",
            producer.api_url(),
            workload.exchange,
            workload.routing_key
        );
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("c-{n:06}");
                let ok = http
                    .post(&url)
                    .header("X-Warren-Message-Id", &id)
                    .header("Content-Type", "application/octet-stream")
                    .body(id.clone())
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == reqwest::StatusCode::ACCEPTED);
                if ok {
                    account.record_acked(id);
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let flowing = |after: u64| {
        let account = account.clone();
        async move {
            wait_for(Duration::from_secs(90), "messages to flow", || {
                let got = account.acked_and_received();
                async move { (got > after).then_some(got) }
            })
            .await
        }
    };
    flowing(200).await;
    let mut hit = Vec::new();

    // 1. kill -9 of the node that leads the work queue.
    let leader = cluster.leader_of(&workload.queue).await.unwrap();
    println!(
        "kill -9 of {} (leads {})",
        cluster.nodes()[leader].node_name(),
        workload.queue
    );
    block_in_place(|| cluster.node_mut(leader).kill9()).unwrap();
    hit.push(leader);
    let base = account.acked_and_received();
    flowing(base + 300).await;
    block_in_place(|| cluster.node_mut(leader).start_again()).unwrap();
    block_in_place(|| cluster.wait_running(3, Duration::from_secs(90))).unwrap();

    // 2. kill -9 of the node the producer is connected to; its status then
    //    names another member.
    let on = wait_for(
        Duration::from_secs(30),
        "the producer to be connected",
        || producer_node(&cluster, &producer),
    )
    .await;
    println!(
        "kill -9 of {} (the producer's node)",
        cluster.nodes()[on].node_name()
    );
    block_in_place(|| cluster.node_mut(on).kill9()).unwrap();
    hit.push(on);
    let moved = wait_for(Duration::from_secs(60), "the producer to move", || async {
        producer_node(&cluster, &producer)
            .await
            .filter(|&n| n != on)
    })
    .await;
    println!("producer moved to {}", cluster.nodes()[moved].node_name());
    let base = account.acked_and_received();
    flowing(base + 300).await;
    block_in_place(|| cluster.node_mut(on).start_again()).unwrap();
    block_in_place(|| cluster.wait_running(3, Duration::from_secs(90))).unwrap();

    // 3. graceful stop of a node not hit yet (or any other than the last).
    let third = (0..3).find(|i| !hit.contains(i)).unwrap_or((on + 1) % 3);
    println!("graceful stop of {}", cluster.nodes()[third].node_name());
    block_in_place(|| cluster.node_mut(third).stop()).unwrap();
    let base = account.acked_and_received();
    flowing(base + 300).await;
    block_in_place(|| cluster.node_mut(third).start_again()).unwrap();

    // Stop publishing; everything acknowledged arrives.
    stop.store(true, Ordering::Relaxed);
    publisher.await.unwrap();
    let acked = account.report().acked;
    wait_for(
        Duration::from_secs(120),
        "every acknowledged message",
        || {
            let done = account.acked_and_received() == acked;
            async move { done.then_some(()) }
        },
    )
    .await;
    let consumer_status: serde_json::Value =
        reqwest::get(format!("{}/v1/consumer", consumer.api_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert!(
        consumer_status["broker"]
            .as_str()
            .is_some_and(|b| b.contains("127.0.0.1:")),
        "{consumer_status}"
    );
    println!("cluster: {}", account.report());
    account.assert_no_loss();
    assert!(acked > 1_000, "too few messages to mean anything: {acked}");
}
