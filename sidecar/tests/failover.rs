//! Broker failover: a sidecar given several broker addresses moves to the
//! next one when its node goes away, says which node it is on, and loses
//! nothing it acknowledged. (The three-node cluster scenario builds on this;
//! here two separate nodes stand in for a cluster's members, so where each
//! message went can be counted per node.)

mod common;

use std::time::Duration;

use common::*;
use tokio::task::{block_in_place, spawn_blocking};
use warren_testkit::{Account, RabbitNode, init_tracing};

fn port_of(url: &serde_json::Value) -> u16 {
    let url = url.as_str().expect("a url");
    let authority = url.split("://").nth(1).unwrap().split('/').next().unwrap();
    authority.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sidecar_moves_to_the_next_address_when_its_node_dies() {
    init_tracing();
    let a = spawn_blocking(|| RabbitNode::start().expect("node a"));
    let b = spawn_blocking(|| RabbitNode::start().expect("node b"));
    let (mut a, b) = (a.await.unwrap(), b.await.unwrap());
    declare_topology(&a).await;
    declare_topology(&b).await;

    let dir = tempfile::tempdir().unwrap();
    // A dead address first: it is skipped, not waited on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let setting = format!(
        "amqp://guest:guest@127.0.0.1:{dead},127.0.0.1:{}/%2f,{}",
        a.amqp_port(),
        b.amqp_url()
    );
    let running = warren_sidecar::start(test_config(&setting, dir.path()))
        .await
        .unwrap();
    let api = format!("http://{}", running.api_addr);
    let account = Account::new();

    publish_acked(&api, "first", 200, &account).await;
    wait_drained(&api, Duration::from_secs(30)).await;
    let report = outbox_report(&api).await;
    let broker = &report["broker"];
    assert_eq!(port_of(&broker["url"]), a.amqp_port(), "{broker}");
    assert_eq!(broker["addresses"].as_array().unwrap().len(), 3, "{broker}");
    assert!(
        broker["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u.as_str().unwrap().contains("guest:***@")),
        "passwords hidden: {broker}"
    );

    // What went to node a is taken from it while it is up.
    consume_all(&a.amqp_url(), QUEUE, &account, Duration::from_secs(10)).await;
    assert_eq!(account.acked_and_received(), 200, "{}", account.report());

    // The node the sidecar is on dies; publishing goes on, answered 202,
    // and the sidecar moves on to the next address that answers.
    block_in_place(|| a.kill9()).unwrap();
    publish_acked(&api, "second", 200, &account).await;
    wait_drained(&api, Duration::from_secs(60)).await;
    let broker = outbox_report(&api).await["broker"].clone();
    assert_eq!(broker["state"], "connected", "{broker}");
    assert_eq!(port_of(&broker["url"]), b.amqp_port(), "{broker}");

    // Every acknowledged message is on the node it went to.
    consume_all(&b.amqp_url(), QUEUE, &account, Duration::from_secs(10)).await;
    println!("failover: {}", account.report());
    account.assert_no_loss();
    running.shutdown();
}

/// An address setting that cannot be used is refused at start with a clear
/// error that shows no password.
#[tokio::test]
async fn unusable_address_lists_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for setting in [
        "amqp://u:hunter2@r0,,r1",
        "amqp://u:hunter2@r0,http://u:hunter2@r1",
    ] {
        let e = match warren_sidecar::start(test_config(setting, dir.path())).await {
            Ok(_) => panic!("{setting} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains("--broker-url"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
