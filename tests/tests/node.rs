//! Tests of the harness's private RabbitMQ nodes against the real broker.
//!
//! Each test starts its own node(s), so they run in parallel; a node start
//! costs 5-8 s, so one test walks a node through its whole lifecycle rather
//! than starting one per property.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::block_in_place;
use warren_testkit::{NodeOptions, Proxy, RabbitNode, init_tracing};

/// The AMQP 0-9-1 protocol header a client sends first.
const AMQP_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

/// Whether a peer speaks AMQP: after the protocol header the broker answers
/// with a method frame (type 1) on channel 0, `connection.start`.
fn assert_speaks_amqp(mut reply: &[u8]) {
    assert!(reply.len() >= 11, "short reply: {reply:?}");
    assert_eq!(reply[0], 1, "expected a method frame, got {reply:?}");
    assert_eq!(&reply[1..3], &[0, 0], "expected channel 0");
    reply = &reply[7..11];
    assert_eq!(reply, &[0, 10, 0, 10], "expected connection.start (10, 10)");
}

fn amqp_handshake_plain(port: u16) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the AMQP port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(AMQP_HEADER).unwrap();
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

async fn wait_for_mem_alarm(node: &RabbitNode, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = node.management_get("/api/nodes").await.unwrap();
        let alarm = nodes[0]["mem_alarm"].as_bool();
        if alarm == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/api/nodes mem_alarm never became {want}: {alarm:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn next_event(
    events: &mut (impl futures::Stream<Item = Event> + Unpin),
    what: &str,
) -> Event {
    tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .unwrap_or_else(|_| panic!("no event while waiting for {what}"))
        .expect("event stream ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_lifecycle_keeps_durable_data() {
    init_tracing();
    let mut node = block_in_place(RabbitNode::start).expect("starting a node");
    assert!(node.node_name().starts_with("warren-test-"));
    assert!(node.node_name().ends_with("@localhost"));
    assert_ne!(node.amqp_port(), 5672);
    let first_pid = node.pid().expect("a running node has a pid");

    // The AMQP port speaks AMQP, the management API answers as guest.
    assert_speaks_amqp(&amqp_handshake_plain(node.amqp_port()));
    let overview = node.management_get("/api/overview").await.unwrap();
    assert_eq!(overview["node"].as_str(), Some(node.node_name()));
    // The version the management API reports is the one of the scripts the
    // node was started from (3.10 or 4.x, see scripts/rabbitmq).
    let version = block_in_place(|| node.ctl(&["version"])).unwrap();
    assert_eq!(overview["rabbitmq_version"].as_str(), Some(version.trim()));

    // A durable quorum queue declared through the management API, holding
    // one persistent message.
    let http = reqwest::Client::new();
    let resp = http
        .put(format!(
            "{}/api/queues/%2f/durable-q",
            node.management_url()
        ))
        .basic_auth("guest", Some("guest"))
        .json(&serde_json::json!({"durable": true, "arguments": {"x-queue-type": "quorum"}}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "declare: {}", resp.status());
    let conn = node.amqp_connection().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            "durable-q".into(),
            BasicPublishOptions::default(),
            b"survives",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    assert_eq!(node.queue_message_count("durable-q").await.unwrap(), 1);

    // Memory alarm: the broker blocks the publishing connection and says so,
    // and the management API agrees.
    let mut events = conn.events_listener();
    block_in_place(|| node.set_memory_alarm()).unwrap();
    assert!(block_in_place(|| node.memory_alarm_active()).unwrap());
    // The broker notifies a connection once it publishes during the alarm.
    let _blocked_publish = ch
        .basic_publish(
            "".into(),
            "durable-q".into(),
            BasicPublishOptions::default(),
            b"blocked",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    loop {
        match next_event(&mut events, "connection.blocked").await {
            Event::ConnectionBlocked(reason) => {
                assert!(reason.contains("memory"), "blocked for {reason}");
                break;
            }
            other => tracing::info!(?other, "event before connection.blocked"),
        }
    }
    wait_for_mem_alarm(&node, true).await;
    block_in_place(|| node.clear_memory_alarm()).unwrap();
    assert!(!block_in_place(|| node.memory_alarm_active()).unwrap());
    loop {
        match next_event(&mut events, "connection.unblocked").await {
            Event::ConnectionUnblocked => break,
            other => tracing::info!(?other, "event before connection.unblocked"),
        }
    }
    wait_for_mem_alarm(&node, false).await;
    // The publish held back by the alarm went through once it cleared.
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.queue_message_count("durable-q").await.unwrap() != 2 {
        assert!(Instant::now() < deadline, "held publish never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    drop(events);

    // kill -9: the port closes at once, the pid is gone; a restart brings
    // the queue and both messages back under a new pid.
    block_in_place(|| node.kill9()).unwrap();
    assert_eq!(node.pid(), None);
    assert!(!node.is_running());
    assert!(TcpStream::connect(("127.0.0.1", node.amqp_port())).is_err());
    assert!(
        std::fs::metadata(format!("/proc/{first_pid}")).is_err(),
        "beam {first_pid} still exists"
    );
    block_in_place(|| node.start_again()).expect("restarting after kill -9");
    let second_pid = node.pid().unwrap();
    assert_ne!(second_pid, first_pid);
    assert_eq!(node.queue_message_count("durable-q").await.unwrap(), 2);

    // Graceful stop: a connected client is told CONNECTION_FORCED (320).
    // (lapin logs that close frame but its event stream only reports the
    // socket reset that follows, so a minimal raw client checks the frame.)
    let mut raw = RawAmqp::open(node.amqp_port());
    block_in_place(|| node.stop()).unwrap();
    assert_eq!(node.pid(), None);
    assert!(TcpStream::connect(("127.0.0.1", node.amqp_port())).is_err());
    assert_eq!(raw.wait_for_close(), 320);

    // restart() of a stopped node just starts it (of a running one it is
    // stop() + start_again(), both covered above; a graceful stop with
    // management enabled costs 5 s, so it is not repeated here).
    block_in_place(|| node.restart()).unwrap();
    assert_eq!(node.queue_message_count("durable-q").await.unwrap(), 2);

    // Helpers: exchange + binding route, purge empties, delete works.
    node.declare_exchange("ex", "topic").await.unwrap();
    node.declare_quorum_queue("routed").await.unwrap();
    node.bind("ex", "routed", "a.#").await.unwrap();
    let conn = node.amqp_connection().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for key in ["a.b", "a.c", "b.a"] {
        ch.basic_publish(
            "ex".into(),
            key.into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    assert_eq!(node.queue_message_count("routed").await.unwrap(), 2);
    assert_eq!(node.purge("routed").await.unwrap(), 2);
    assert_eq!(node.queue_message_count("routed").await.unwrap(), 0);
    node.delete_exchange("ex").await.unwrap();
    assert!(node.queue_message_count("no-such-queue").await.is_err());
    let _ = conn.close(200, "bye".into()).await;

    // AMQP through the fault proxy: a reset reaches the client as an error.
    let proxy = Proxy::start(node.amqp_addr()).await;
    let conn = lapin::Connection::connect(&proxy.amqp_url(), Default::default())
        .await
        .unwrap();
    conn.create_channel().await.unwrap();
    assert_eq!(proxy.connection_count(), 1);
    let mut events = conn.events_listener();
    proxy.reset().await;
    loop {
        match next_event(&mut events, "the reset").await {
            Event::Error(e) => {
                assert!(e.to_string().contains("reset"), "{e}");
                break;
            }
            other => tracing::info!(?other, "event before the reset"),
        }
    }
    drop(proxy);

    // ctl reaches this node and not the system broker.
    let status = block_in_place(|| node.ctl(&["status"])).unwrap();
    assert!(status.contains(node.node_name()), "{status}");

    let dir = node.data_dir().to_path_buf();
    let last_pid = node.pid().unwrap();
    block_in_place(|| node.shutdown()).unwrap();
    assert!(!dir.exists(), "temp dir left behind");
    assert!(
        std::fs::metadata(format!("/proc/{last_pid}")).is_err(),
        "beam {last_pid} left running"
    );
}

#[test]
fn dropping_a_node_kills_it_and_removes_its_dir() {
    init_tracing();
    let node = RabbitNode::start_with(NodeOptions {
        management: false,
        ..Default::default()
    })
    .unwrap();
    let pid = node.pid().unwrap();
    let dir = node.data_dir().to_path_buf();
    let port = node.amqp_port();
    assert!(
        std::fs::read_to_string(dir.join("enabled_plugins"))
            .unwrap()
            .contains("[].")
    );
    assert_speaks_amqp(&amqp_handshake_plain(port));
    drop(node);
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_err(),
        "beam {pid} survived drop"
    );
    assert!(!dir.exists());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_node_serves_amqps_with_the_test_ca() {
    init_tracing();
    let node = block_in_place(|| {
        RabbitNode::start_with(NodeOptions {
            tls: true,
            management: false,
        })
    })
    .unwrap();
    assert!(
        node.amqps_url()
            .starts_with("amqps://guest:guest@localhost:")
    );

    let pem = std::fs::read(node.ca_cert_pem_path()).unwrap();
    assert_eq!(pem, node.test_ca().ca_cert_pem().as_bytes());

    // Trusting the test CA, a client verifies the broker as `localhost`.
    let reply = tls_handshake(&node, Some(node.test_ca().ca_cert_pem()), "localhost")
        .await
        .unwrap();
    assert_speaks_amqp(&reply);
    // ... and as 127.0.0.1 (IP SAN).
    let reply = tls_handshake(&node, Some(node.test_ca().ca_cert_pem()), "127.0.0.1")
        .await
        .unwrap();
    assert_speaks_amqp(&reply);
    // Without the CA the certificate is rejected.
    let err = tls_handshake(&node, None, "localhost").await.unwrap_err();
    assert!(
        err.to_string().contains("UnknownIssuer") || err.to_string().contains("issuer"),
        "{err}"
    );
}

/// TLS handshake with the node's AMQPS port, then the AMQP header; returns the
/// broker's first bytes.
async fn tls_handshake(
    node: &RabbitNode,
    ca_pem: Option<&str>,
    server_name: &str,
) -> anyhow::Result<Vec<u8>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};

    let mut roots = RootCertStore::empty();
    if let Some(pem) = ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert?)?;
        }
    }
    let config = ClientConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", node.amqps_port())).await?;
    let name = ServerName::try_from(server_name.to_string())?;
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(AMQP_HEADER).await?;
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await??;
    buf.truncate(n);
    Ok(buf)
}

/// Just enough of an AMQP 0-9-1 client to open a connection and read the
/// reply code of the broker's `connection.close`.
struct RawAmqp {
    stream: TcpStream,
}

impl RawAmqp {
    fn open(port: u16) -> RawAmqp {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut c = RawAmqp { stream };
        c.stream.write_all(AMQP_HEADER).unwrap();
        c.expect_method(10, 10); // start
        let mut start_ok = Vec::new();
        start_ok.extend(0u32.to_be_bytes()); // empty client-properties
        short_str(&mut start_ok, "PLAIN");
        let response = b"\0guest\0guest";
        start_ok.extend((response.len() as u32).to_be_bytes());
        start_ok.extend(response);
        short_str(&mut start_ok, "en_US");
        c.send_method(10, 11, &start_ok);
        let tune = c.expect_method(10, 30);
        let mut tune_ok = tune[..6].to_vec(); // channel-max, frame-max as offered
        tune_ok.extend(0u16.to_be_bytes()); // no heartbeats
        c.send_method(10, 31, &tune_ok);
        let mut open = Vec::new();
        short_str(&mut open, "/");
        short_str(&mut open, "");
        open.push(0);
        c.send_method(10, 40, &open);
        c.expect_method(10, 41); // open-ok
        c
    }

    fn send_method(&mut self, class: u16, method: u16, args: &[u8]) {
        let mut payload = Vec::new();
        payload.extend(class.to_be_bytes());
        payload.extend(method.to_be_bytes());
        payload.extend(args);
        let mut frame = vec![1, 0, 0];
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend(payload);
        frame.push(0xCE);
        self.stream.write_all(&frame).unwrap();
    }

    /// Next method frame on channel 0: (class, method, arguments).
    fn read_method(&mut self) -> (u16, u16, Vec<u8>) {
        loop {
            let mut header = [0u8; 7];
            self.stream.read_exact(&mut header).unwrap();
            let size = u32::from_be_bytes(header[3..7].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; size + 1];
            self.stream.read_exact(&mut payload).unwrap();
            assert_eq!(payload[size], 0xCE, "bad frame end");
            if header[0] != 1 {
                continue; // heartbeat or content
            }
            let class = u16::from_be_bytes([payload[0], payload[1]]);
            let method = u16::from_be_bytes([payload[2], payload[3]]);
            return (class, method, payload[4..size].to_vec());
        }
    }

    fn expect_method(&mut self, class: u16, method: u16) -> Vec<u8> {
        let (c, m, args) = self.read_method();
        assert_eq!((c, m), (class, method), "unexpected method");
        args
    }

    /// Reply code of the broker's `connection.close`.
    fn wait_for_close(&mut self) -> u16 {
        let args = self.expect_method(10, 50);
        u16::from_be_bytes([args[0], args[1]])
    }
}

fn short_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(s.len() as u8);
    buf.extend(s.as_bytes());
}
