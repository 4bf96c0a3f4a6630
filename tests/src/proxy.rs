//! A TCP proxy for injecting network faults between a client and a broker.
//!
//! Killing the broker tests one kind of failure; the network fails in others
//! that a client must survive too: a connection closed under it, a reset, a
//! peer that silently stops answering, a port that refuses. The [`Proxy`]
//! sits between the sidecar and a [`crate::RabbitNode`] and produces each of
//! those on demand, in-process and deterministically:
//!
//! | method     | existing connections              | new connections         |
//! |------------|-----------------------------------|-------------------------|
//! | [`Proxy::cut`]    | FIN to both sides              | accepted normally       |
//! | [`Proxy::reset`]  | RST to the client, FIN upstream | accepted normally       |
//! | [`Proxy::stall`]  | no byte forwarded either way   | accepted, not forwarded |
//! | [`Proxy::refuse`] | untouched                      | refused (ECONNREFUSED)  |
//! | [`Proxy::resume`] | forwarding again               | accepted normally       |
//!
//! A stall loses nothing: bytes wait in the kernel's socket buffers and are
//! delivered on [`Proxy::resume`], unless an endpoint gave up meanwhile (the
//! broker's heartbeat timeout closes its side; the proxy then forwards that
//! close once resumed). The proxy mirrors an upstream reset (the broker was
//! killed) as a reset to the client.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};

use crate::ports::{PortReservation, reserve_port};

/// How long a cut connection keeps draining input so that closing it sends a
/// FIN and not an RST (Linux resets sockets closed with unread data).
const CUT_LINGER: Duration = Duration::from_secs(5);

/// How a live connection is to be ended, with an acknowledgement sent once
/// the close is on the wire.
enum Kill {
    /// FIN to both sides.
    Cut(oneshot::Sender<()>),
    /// RST to the client, ordinary close upstream.
    Reset(oneshot::Sender<()>),
}

/// Orders to the accept loop, acknowledged once carried out.
enum AcceptCmd {
    /// Close the listening socket.
    Refuse(oneshot::Sender<()>),
    /// Listen again (no-op when listening).
    Listen(oneshot::Sender<io::Result<()>>),
}

/// Handle on one proxied connection.
struct ConnHandle {
    /// Ends the connection on [`Proxy::cut`] or [`Proxy::reset`].
    kill: oneshot::Sender<Kill>,
    /// Stops its task when the proxy is dropped.
    abort: AbortHandle,
}

/// State shared by the proxy handle, its accept loop and its connections.
struct Shared {
    /// Where connections are forwarded.
    target: SocketAddr,
    /// `true` while stalled: nothing is read or forwarded.
    stalled: watch::Sender<bool>,
    /// `true` once the proxy is dropped; lingering tasks end early.
    closed: watch::Sender<bool>,
    /// Live connections by id.
    conns: Mutex<HashMap<u64, ConnHandle>>,
    /// Id of the next connection.
    next_id: AtomicU64,
    /// Connections accepted since start, for diagnostics.
    accepted: AtomicU64,
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ConnHandle>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An in-process TCP proxy with fault injection; see the module docs.
///
/// Its tasks run on the tokio runtime that called [`Proxy::start`]; dropping
/// the proxy stops them and closes every socket.
pub struct Proxy {
    /// Listen address, 127.0.0.1 on a reserved port (reserved so that
    /// listening again after [`Proxy::refuse`] finds it free).
    addr: SocketAddr,
    /// Keeps the listen port reserved for the proxy's lifetime.
    _port: PortReservation,
    /// State shared with the tasks.
    shared: Arc<Shared>,
    /// Orders to the accept loop.
    cmds: mpsc::UnboundedSender<AcceptCmd>,
    /// The accept loop.
    accept_task: JoinHandle<()>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("target", &self.shared.target)
            .field("connections", &self.connection_count())
            .finish()
    }
}

impl Proxy {
    /// Listen on 127.0.0.1 and forward every connection to `target`.
    ///
    /// Must be called inside a tokio runtime, which runs the proxy's tasks.
    ///
    /// # Panics
    /// When no local port can be bound, which leaves the test nothing to do.
    pub async fn start(target: SocketAddr) -> Proxy {
        let mut last_err = None;
        for _ in 0..5 {
            let port = reserve_port().expect("reserving a port for the proxy");
            let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port.port()));
            match TcpListener::bind(addr).await {
                Ok(listener) => return Proxy::run(listener, addr, port, target),
                Err(e) => last_err = Some(e),
            }
        }
        panic!("proxy could not bind a local port: {last_err:?}");
    }

    fn run(
        listener: TcpListener,
        addr: SocketAddr,
        port: PortReservation,
        target: SocketAddr,
    ) -> Proxy {
        let shared = Arc::new(Shared {
            target,
            stalled: watch::Sender::new(false),
            closed: watch::Sender::new(false),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let (cmds, rx) = mpsc::unbounded_channel();
        let accept_task = tokio::spawn(accept_loop(Some(listener), addr, shared.clone(), rx));
        tracing::debug!(%addr, %target, "proxy listening");
        Proxy {
            addr,
            _port: port,
            shared,
            cmds,
            accept_task,
        }
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients should connect to (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`: a broker URL through the proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port())
    }

    /// Number of live proxied connections.
    pub fn connection_count(&self) -> usize {
        self.shared.conns().len()
    }

    /// Number of connections accepted since the proxy started.
    pub fn accepted_count(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Close every current connection cleanly (FIN to client and broker),
    /// as a broker-side load balancer or a NAT timeout would. New
    /// connections are accepted as usual. Returns once the FINs are sent.
    pub async fn cut(&self) {
        self.kill_all(Kill::Cut).await;
    }

    /// Abort every current connection: the client gets an RST (reads fail
    /// with ECONNRESET), the broker sees the connection close. New
    /// connections are accepted as usual. Returns once the RSTs are sent.
    pub async fn reset(&self) {
        self.kill_all(Kill::Reset).await;
    }

    async fn kill_all(&self, make: fn(oneshot::Sender<()>) -> Kill) {
        let conns: Vec<ConnHandle> = self.shared.conns().drain().map(|(_, c)| c).collect();
        let mut acks = Vec::with_capacity(conns.len());
        for conn in conns {
            let (tx, rx) = oneshot::channel();
            // A connection that ended meanwhile drops the order: nothing to do.
            if conn.kill.send(make(tx)).is_ok() {
                acks.push(rx);
            }
        }
        for ack in acks {
            let _ = ack.await;
        }
    }

    /// Black-hole the proxy: existing connections stop forwarding in both
    /// directions and new connections are accepted but not connected
    /// upstream, so clients see a silent peer, as when a network drops
    /// packets. Nothing is lost: [`Proxy::resume`] delivers what waited.
    pub async fn stall(&self) {
        self.shared.stalled.send_replace(true);
    }

    /// Close the listening socket so new connections fail with
    /// ECONNREFUSED, as when the broker is down; existing connections are
    /// left alone, including any whose `connect()` already returned but
    /// that the proxy had not yet accepted. Returns once the socket is
    /// closed.
    pub async fn refuse(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(AcceptCmd::Refuse(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Undo [`Proxy::stall`] and [`Proxy::refuse`]: forward and accept as
    /// usual. Returns once the proxy listens again.
    ///
    /// # Panics
    /// When the listen port cannot be bound again (something outside the
    /// testkit took it).
    pub async fn resume(&self) {
        self.shared.stalled.send_replace(false);
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(AcceptCmd::Listen(tx)).is_ok() {
            match rx.await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(e)) => panic!("proxy could not listen on {} again: {e}", self.addr),
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.closed.send_replace(true);
        self.accept_task.abort();
        for (_, conn) in self.shared.conns().drain() {
            conn.abort.abort();
        }
    }
}

async fn accept_loop(
    mut listener: Option<TcpListener>,
    addr: SocketAddr,
    shared: Arc<Shared>,
    mut cmds: mpsc::UnboundedReceiver<AcceptCmd>,
) {
    loop {
        let cmd = match &listener {
            Some(l) => tokio::select! {
                cmd = cmds.recv() => cmd,
                accepted = l.accept() => {
                    match accepted {
                        Ok((sock, peer)) => spawn_conn(&shared, sock, peer),
                        Err(e) => {
                            // EMFILE and friends: back off rather than spin.
                            tracing::warn!(error = %e, "proxy accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    continue;
                }
            },
            None => cmds.recv().await,
        };
        match cmd {
            None => return, // proxy dropped
            Some(AcceptCmd::Refuse(ack)) => {
                if let Some(l) = listener.take() {
                    adopt_backlog(l, &shared);
                }
                let _ = ack.send(());
            }
            Some(AcceptCmd::Listen(ack)) => {
                let result = if listener.is_some() {
                    Ok(())
                } else {
                    match listen_again(addr).await {
                        Ok(l) => {
                            listener = Some(l);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                };
                let _ = ack.send(result);
            }
        }
    }
}

/// Close the listener, but first take over the connections in its backlog:
/// their `connect()` already succeeded, so for the client they exist, and
/// closing the listener would reset them. Uses plain syscalls because the
/// reactor may not have noticed them yet.
fn adopt_backlog(listener: TcpListener, shared: &Arc<Shared>) {
    let Ok(listener) = listener.into_std() else {
        return;
    };
    // `into_std` leaves the socket non-blocking: accept until WouldBlock.
    while let Ok((sock, peer)) = listener.accept() {
        let adopted = sock
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(sock));
        if let Ok(sock) = adopted {
            spawn_conn(shared, sock, peer);
        }
    }
}

/// Bind the proxy's port again, retrying briefly in case the kernel has not
/// released it yet.
async fn listen_again(addr: SocketAddr) -> io::Result<TcpListener> {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if tries < 20 => {
                tries += 1;
                tracing::debug!(error = %e, "proxy rebind failed, retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Removes a connection from the registry when its task ends (or is aborted).
struct Deregister {
    /// Connection id.
    id: u64,
    /// Registry owner.
    shared: Arc<Shared>,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        self.shared.conns().remove(&self.id);
    }
}

fn spawn_conn(shared: &Arc<Shared>, client: TcpStream, peer: SocketAddr) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared.accepted.fetch_add(1, Ordering::Relaxed);
    let (kill_tx, kill_rx) = oneshot::channel();
    // Hold the registry lock while spawning so the task cannot deregister
    // before it is registered.
    let mut conns = shared.conns();
    let task = tokio::spawn(run_conn(id, client, shared.clone(), kill_rx));
    conns.insert(
        id,
        ConnHandle {
            kill: kill_tx,
            abort: task.abort_handle(),
        },
    );
    tracing::debug!(id, %peer, "proxy accepted connection");
}

async fn run_conn(
    id: u64,
    mut client: TcpStream,
    shared: Arc<Shared>,
    mut kill: oneshot::Receiver<Kill>,
) {
    let _deregister = Deregister {
        id,
        shared: shared.clone(),
    };
    let _ = client.set_nodelay(true);

    // While stalled, a new connection gets no upstream: a black hole does
    // not answer, and the broker would time out a silent connection anyway.
    let mut stalled = shared.stalled.subscribe();
    let order = tokio::select! {
        order = &mut kill => Some(order),
        _ = until(&mut stalled, false) => None,
    };
    if let Some(order) = order {
        return end_without_upstream(client, order, &shared).await;
    }
    let connected = tokio::select! {
        order = &mut kill => Err(order),
        up = TcpStream::connect(shared.target) => Ok(up),
    };
    let mut upstream = match connected {
        Err(order) => return end_without_upstream(client, order, &shared).await,
        Ok(Ok(up)) => up,
        Ok(Err(e)) => {
            // Mirror an unreachable broker with a reset.
            tracing::debug!(id, error = %e, "proxy could not reach upstream");
            set_zero_linger(&client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);

    let outcome = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let c2u = pump(&mut cr, &mut uw, shared.stalled.subscribe());
        let u2c = pump(&mut ur, &mut cw, shared.stalled.subscribe());
        tokio::select! {
            order = &mut kill => Outcome::Killed(order.ok()),
            done = async { tokio::try_join!(c2u, u2c) } => match done {
                Ok(_) => Outcome::Closed,
                Err(e) => Outcome::Failed(e),
            },
        }
    };
    match outcome {
        Outcome::Closed => {}
        Outcome::Failed(e) => {
            // One side reset or failed: pass the abort on to the client.
            tracing::debug!(id, error = %e, "proxied connection failed");
            set_zero_linger(&client);
        }
        Outcome::Killed(None) => {} // proxy dropped
        Outcome::Killed(Some(Kill::Reset(ack))) => {
            set_zero_linger(&client);
            drop(client);
            drop(upstream);
            let _ = ack.send(());
        }
        Outcome::Killed(Some(Kill::Cut(ack))) => {
            let _ = client.shutdown().await;
            let _ = upstream.shutdown().await;
            let _ = ack.send(());
            let mut closed = shared.closed.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(CUT_LINGER) => {}
                _ = until(&mut closed, true) => {}
                _ = async { tokio::join!(drain(&mut client), drain(&mut upstream)) } => {}
            }
        }
    }
}

/// How the forwarding phase of a connection ended.
enum Outcome {
    /// Both directions reached EOF and were half-closed in turn.
    Closed,
    /// A read or write failed (typically a reset by one side).
    Failed(io::Error),
    /// Ordered to end; `None` when the proxy itself went away.
    Killed(Option<Kill>),
}

async fn end_without_upstream(
    mut client: TcpStream,
    order: Result<Kill, oneshot::error::RecvError>,
    shared: &Shared,
) {
    match order {
        Ok(Kill::Reset(ack)) => {
            set_zero_linger(&client);
            drop(client);
            let _ = ack.send(());
        }
        Ok(Kill::Cut(ack)) => {
            let _ = client.shutdown().await;
            let _ = ack.send(());
            let mut closed = shared.closed.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(CUT_LINGER) => {}
                _ = until(&mut closed, true) => {}
                _ = drain(&mut client) => {}
            }
        }
        Err(_) => {}
    }
}

/// Copy bytes from `r` to `w` until EOF, then half-close `w`. Never reads
/// while stalled, and holds bytes read just before a stall until it ends.
async fn pump<R, W>(r: &mut R, w: &mut W, mut stalled: watch::Receiver<bool>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !until(&mut stalled, false).await {
            return Ok(()); // proxy gone
        }
        let n = tokio::select! {
            biased;
            _ = until(&mut stalled, true) => continue,
            n = r.read(&mut buf) => n?,
        };
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        if !until(&mut stalled, false).await {
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
    }
}

/// Wait until the flag equals `want`; `false` if its sender is gone.
/// (Wraps `wait_for` so no non-`Send` borrow guard lives across an await.)
async fn until(rx: &mut watch::Receiver<bool>, want: bool) -> bool {
    rx.wait_for(|v| *v == want).await.is_ok()
}

/// Read and discard until EOF or error.
async fn drain(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Make closing the socket send an RST instead of a FIN.
fn set_zero_linger(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own with a correctly sized value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
