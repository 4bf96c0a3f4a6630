//! Tests of the fault-injecting proxy against a local echo server.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use warren_testkit::{Proxy, init_tracing};

/// What the echo server saw on one connection.
#[derive(Debug, PartialEq)]
enum ServerEvent {
    /// A connection was accepted.
    Accepted,
    /// The client side closed (EOF) or failed.
    Closed,
}

/// An echo server on 127.0.0.1 that reports accepts and closes.
async fn echo_server() -> (SocketAddr, mpsc::UnboundedReceiver<ServerEvent>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            let _ = tx.send(ServerEvent::Accepted);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if sock.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = tx.send(ServerEvent::Closed);
            });
        }
    });
    (addr, rx)
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<ServerEvent>) -> ServerEvent {
    timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("server event")
        .expect("server alive")
}

/// Send `msg` and read the echo back.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(buf, msg);
}

/// Nothing arrives within `wait`.
async fn assert_silent(s: &mut TcpStream, wait: Duration) {
    let mut buf = [0u8; 64];
    match timeout(wait, s.read(&mut buf)).await {
        Err(_) => {}
        Ok(r) => panic!("expected silence, got {r:?}"),
    }
}

#[tokio::test]
async fn forwards_both_ways_and_half_closes() {
    init_tracing();
    let (target, mut events) = echo_server().await;
    let proxy = Proxy::start(target).await;
    assert!(
        proxy
            .amqp_url()
            .ends_with(&format!(":{}/%2f", proxy.port()))
    );

    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut a, b"hello").await;
    round_trip(&mut b, &vec![7u8; 200_000]).await;
    assert_eq!(proxy.connection_count(), 2);
    assert_eq!(proxy.accepted_count(), 2);
    assert_eq!(next_event(&mut events).await, ServerEvent::Accepted);
    assert_eq!(next_event(&mut events).await, ServerEvent::Accepted);

    // Client half-close reaches the server, whose close comes back.
    a.shutdown().await.unwrap();
    assert_eq!(next_event(&mut events).await, ServerEvent::Closed);
    let mut buf = [0u8; 8];
    assert_eq!(
        timeout(Duration::from_secs(5), a.read(&mut buf))
            .await
            .unwrap()
            .unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(proxy.connection_count(), 1);
}

#[tokio::test]
async fn cut_closes_cleanly_and_keeps_accepting() {
    init_tracing();
    let (target, mut events) = echo_server().await;
    let proxy = Proxy::start(target).await;
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut c, b"before").await;

    proxy.cut().await;
    assert_eq!(proxy.connection_count(), 0);
    // Clean EOF for the client (not a reset) and for the server.
    let mut buf = [0u8; 8];
    assert_eq!(
        timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap(),
        0
    );
    assert_eq!(next_event(&mut events).await, ServerEvent::Accepted);
    assert_eq!(next_event(&mut events).await, ServerEvent::Closed);

    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut again, b"after").await;
}

#[tokio::test]
async fn reset_gives_the_client_econnreset() {
    init_tracing();
    let (target, mut events) = echo_server().await;
    let proxy = Proxy::start(target).await;
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut c, b"before").await;

    proxy.reset().await;
    let mut buf = [0u8; 8];
    let err = timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    // The upstream connection is closed too.
    assert_eq!(next_event(&mut events).await, ServerEvent::Accepted);
    assert_eq!(next_event(&mut events).await, ServerEvent::Closed);

    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut again, b"after").await;
}

#[tokio::test]
async fn stall_holds_bytes_until_resume() {
    init_tracing();
    let (target, mut events) = echo_server().await;
    let proxy = Proxy::start(target).await;
    let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut old, b"warm").await;
    assert_eq!(next_event(&mut events).await, ServerEvent::Accepted);

    proxy.stall().await;
    old.write_all(b"held").await.unwrap();
    assert_silent(&mut old, Duration::from_millis(500)).await;
    // A new connection is accepted but never reaches the server.
    let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
    new.write_all(b"new").await.unwrap();
    assert_silent(&mut new, Duration::from_millis(300)).await;
    assert!(
        timeout(Duration::from_millis(200), events.recv())
            .await
            .is_err(),
        "server saw a connection"
    );

    proxy.resume().await;
    let mut buf = [0u8; 4];
    timeout(Duration::from_secs(5), old.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"held");
    let mut buf = [0u8; 3];
    timeout(Duration::from_secs(5), new.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"new");
    assert_eq!(next_event(&mut events).await, ServerEvent::Accepted);
}

#[tokio::test]
async fn refuse_rejects_new_connections_only() {
    init_tracing();
    let (target, _events) = echo_server().await;
    let proxy = Proxy::start(target).await;
    let mut old = TcpStream::connect(proxy.addr()).await.unwrap();

    proxy.refuse().await;
    let err = TcpStream::connect(proxy.addr()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    round_trip(&mut old, b"still here").await;

    proxy.resume().await;
    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut again, b"back").await;
}

#[tokio::test]
async fn cut_and_reset_also_end_stalled_connections() {
    init_tracing();
    let (target, _events) = echo_server().await;
    let proxy = Proxy::start(target).await;
    proxy.stall().await;
    let mut pending = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut established = TcpStream::connect(proxy.addr()).await.unwrap();
    // Wait until both are registered.
    while proxy.connection_count() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.cut().await;
    let mut buf = [0u8; 8];
    assert_eq!(
        timeout(Duration::from_secs(5), pending.read(&mut buf))
            .await
            .unwrap()
            .unwrap(),
        0
    );
    assert_eq!(
        timeout(Duration::from_secs(5), established.read(&mut buf))
            .await
            .unwrap()
            .unwrap(),
        0
    );

    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    while proxy.connection_count() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.reset().await;
    let err = timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn an_unreachable_upstream_resets_the_client() {
    init_tracing();
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = Proxy::start(dead).await;
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut buf = [0u8; 8];
    let r = timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn dropping_the_proxy_closes_everything() {
    init_tracing();
    let (target, mut events) = echo_server().await;
    let proxy = Proxy::start(target).await;
    let addr = proxy.addr();
    let mut c = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut c, b"x").await;
    drop(proxy);
    let mut buf = [0u8; 8];
    let r = timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(r, Ok(0)) || r.is_err(),
        "connection survived the proxy: {r:?}"
    );
    assert_eq!(next_event(&mut events).await, ServerEvent::Accepted);
    assert_eq!(next_event(&mut events).await, ServerEvent::Closed);
    // Give the aborted accept task a moment to drop its listener.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(addr).await.is_err());
}
