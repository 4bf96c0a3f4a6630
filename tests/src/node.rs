//! Private RabbitMQ nodes, one per test.
//!
//! Warren's promise is "no acknowledged message is lost", and the only way to
//! test that honestly is against a real broker that tests may `kill -9`, stop
//! gracefully, restart on the same data and push into a memory alarm. A shared
//! broker cannot be abused like that, so each test starts its own node from the
//! OS package `rabbitmq-server`:
//!
//! - its own node name (`warren-test-<pid>-<n>-<random>@localhost`), Erlang
//!   cookie (`HOME` points into the node's dir) and ports, all on 127.0.0.1;
//! - its own temp dir holding the config, data (mnesia), logs and pid file,
//!   removed when the node is dropped;
//! - none of the machine's configuration: `/etc/rabbitmq/rabbitmq-env.conf`,
//!   `rabbitmq.conf`, `conf.d` and `advanced.config` are all redirected to
//!   files in the temp dir, because the system broker's settings (its node
//!   name, its listener on 5672) would otherwise leak into the test node.
//!
//! # Blocking by design
//! Lifecycle methods ([`RabbitNode::start`], [`RabbitNode::kill9`],
//! [`RabbitNode::stop`], [`RabbitNode::restart`], ...) are plain blocking
//! functions: they wait for an OS process and shell out to `rabbitmqctl`, and
//! blocking calls work from sync tests as they are. From an async test, call
//! them inside `tokio::task::block_in_place` on a multi-thread runtime
//! (`#[tokio::test(flavor = "multi_thread")]`) so the tasks under test keep
//! running while the node restarts, or move the node into
//! `tokio::task::spawn_blocking`. The queue helpers (`declare_quorum_queue`,
//! `queue_message_count`, ...) talk AMQP and HTTP and are `async`.
//!
//! # Process handling
//! The server script is told to `exec` the Erlang VM (`RABBITMQ_ALLOW_INPUT`
//! with an explicit `-noinput`), so the spawned child *is* the beam process
//! and this process reaps it: no shell wrapper, no zombies. The child runs in
//! its own process group; killing the group also takes `erl_child_setup` and
//! anything the VM spawned. The shared `epmd` daemonizes into its own session
//! and is never touched.
//!
//! A test process killed outright (a nextest timeout) runs no `Drop`, so
//! nodes are also spawned with `PR_SET_PDEATHSIG = SIGKILL`: the kernel kills
//! them when the test process dies. Their temp dirs are removed by the next
//! test process that starts a node.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use rand::Rng;
use tempfile::TempDir;
use warren_crds::error_chain::error_chain;

use crate::ports::{PortReservation, reserve_port};
use crate::tls::TestCa;

/// Where the Debian/Ubuntu package installs the scripts; overridable with
/// `WARREN_RABBITMQ_BIN_DIR` for other layouts.
const DEFAULT_BIN_DIR: &str = "/usr/lib/rabbitmq/bin";

/// How long a node may take to boot. A boot takes 5-8 s on an idle 2-core
/// machine; several nodes booting at once while the test binaries compile can
/// take many times that.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a graceful stop may take before the node is killed instead.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Attempts at a first start; each retry picks fresh ports, so a port taken
/// by a process outside the testkit between reservation and bind is survived.
const START_ATTEMPTS: u32 = 3;

/// Attempts at a restart on the same ports (they cannot change: clients and
/// proxies point at them).
const RESTART_ATTEMPTS: u32 = 5;

/// Boot attempts of [`RabbitNode::start_again`] for failures other than a
/// busy port.
const BOOT_ATTEMPTS_AFTER_CRASH: u32 = 3;

/// Default `vm_memory_high_watermark`, restored by [`RabbitNode::clear_memory_alarm`].
const DEFAULT_WATERMARK: &str = "0.4";

/// Guest credentials; `loopback_users = none` lets them in over 127.0.0.1.
const USER: &str = "guest";
const PASSWORD: &str = "guest";

/// Per-process counter that makes node names unique within a test binary.
static NODE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// What a test needs from its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeOptions {
    /// Also listen for AMQPS with a certificate from a fresh [`TestCa`]
    /// (SANs `localhost` and `127.0.0.1`; no client certificates required).
    pub tls: bool,
    /// Enable the management plugin (HTTP API on 127.0.0.1). On by default;
    /// turning it off saves about a second of boot, some memory, and 5 s on
    /// every graceful stop (3.10's management agent delays the `rabbit` app's
    /// shutdown by 5 s).
    pub management: bool,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            tls: false,
            management: true,
        }
    }
}

/// The ports a node listens on, reserved for its whole life so that a
/// restart finds them free.
#[derive(Debug)]
struct NodePorts {
    /// AMQP 0-9-1, plain TCP.
    amqp: PortReservation,
    /// Erlang distribution (what `rabbitmqctl` connects to, via epmd).
    dist: PortReservation,
    /// Management HTTP API, when enabled.
    management: Option<PortReservation>,
    /// AMQPS, when TLS is enabled.
    tls: Option<PortReservation>,
}

impl NodePorts {
    fn reserve(options: NodeOptions) -> anyhow::Result<NodePorts> {
        Ok(NodePorts {
            amqp: reserve_port()?,
            dist: reserve_port()?,
            management: options.management.then(reserve_port).transpose()?,
            tls: options.tls.then(reserve_port).transpose()?,
        })
    }
}

/// A private RabbitMQ node for one test; see the module docs.
///
/// Dropping it kills the node (`SIGKILL` to its process group) and removes
/// its temp dir, also when the test panics; a panicking test additionally
/// gets the tail of the node's logs on stderr.
pub struct RabbitNode {
    /// Erlang node name, `warren-test-...@localhost`.
    name: String,
    /// Options the node was started with.
    options: NodeOptions,
    /// Reserved listener ports.
    ports: NodePorts,
    /// Config, data and logs; `None` only after [`RabbitNode::shutdown`].
    dir: Option<TempDir>,
    /// TLS material when `options.tls` or `management_tls`.
    ca: Option<TestCa>,
    /// The management API listens on HTTPS only (its port is
    /// `ports.management`), with a certificate from `ca`.
    management_tls: bool,
    /// The beam process while it has not been reaped. Invariant: `Some` means
    /// the pid (= process group id) still belongs to our node, so signalling
    /// the group is safe.
    child: Option<Child>,
    /// OS pid of the running beam process, from the pid file.
    pid: Option<u32>,
    /// The Erlang cookie; the same for every node of a cluster.
    cookie: String,
}

impl fmt::Debug for RabbitNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitNode")
            .field("name", &self.name)
            .field("amqp_port", &self.amqp_port())
            .field("pid", &self.pid)
            .field("dir", &self.dir.as_ref().map(|d| d.path().to_path_buf()))
            .finish()
    }
}

/// A random Erlang cookie.
pub(crate) fn new_cookie() -> String {
    let mut rng = rand::rng();
    (0..32)
        .map(|_| char::from(rng.random_range(b'A'..=b'Z')))
        .collect()
}

fn bin_dir() -> PathBuf {
    std::env::var_os("WARREN_RABBITMQ_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN_DIR))
}

impl RabbitNode {
    /// Start a node with default options (management on, no TLS) and wait
    /// until it accepts AMQP connections. Blocks for 5-10 s typically.
    pub fn start() -> anyhow::Result<RabbitNode> {
        RabbitNode::start_with(NodeOptions::default())
    }

    /// Start a node with the given options and wait until it is ready.
    ///
    /// A start that fails because a port was taken in the meantime is retried
    /// on fresh ports. Errors carry the tail of the node's logs.
    pub fn start_with(options: NodeOptions) -> anyhow::Result<RabbitNode> {
        RabbitNode::start_inner(options, false, "")
    }

    /// Start a node with default options and `extra` added to its
    /// `rabbitmq.conf` (sysctl format, e.g. `max_message_size = 8192`):
    /// settings a running node only reads at boot.
    pub fn start_with_config(extra: &str) -> anyhow::Result<RabbitNode> {
        RabbitNode::start_inner(NodeOptions::default(), false, extra)
    }

    /// Start a node that serves AMQPS (as with `tls`) and the management
    /// API over HTTPS only (`management.ssl.*`), both with a certificate
    /// from the node's [`TestCa`]: [`RabbitNode::management_url`] is then
    /// `https://localhost:PORT`, trusted through
    /// [`RabbitNode::ca_cert_pem_path`].
    pub fn start_with_management_tls() -> anyhow::Result<RabbitNode> {
        RabbitNode::start_inner(
            NodeOptions {
                tls: true,
                management: true,
            },
            true,
            "",
        )
    }

    fn start_inner(
        options: NodeOptions,
        management_tls: bool,
        extra_config: &str,
    ) -> anyhow::Result<RabbitNode> {
        let server = bin_dir().join("rabbitmq-server");
        if !server.exists() {
            bail!(
                "{} not found: install the `rabbitmq-server` OS package \
                 (or point WARREN_RABBITMQ_BIN_DIR at its scripts)",
                server.display()
            );
        }
        let mut last_err = None;
        for attempt in 1..=START_ATTEMPTS {
            let mut node = RabbitNode::prepare(options, management_tls, None)?;
            if !extra_config.is_empty() {
                fs::write(node.dir().join("conf.d/50-test.conf"), extra_config)
                    .context("writing the extra config")?;
            }
            match node.boot() {
                Ok(()) => {
                    tracing::info!(node = %node.name, amqp_port = node.amqp_port(), pid = ?node.pid, "rabbitmq node started");
                    return Ok(node);
                }
                Err(e) if is_port_conflict(&e) && attempt < START_ATTEMPTS => {
                    tracing::warn!(node = %node.name, attempt, "port conflict starting rabbitmq node, retrying on new ports");
                    last_err = Some(e);
                    // dropping `node` kills what is left and removes its dir
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("node did not start")))
    }

    /// Create the temp dir, config files and cookie (a fresh one unless
    /// given: nodes of one cluster share theirs) for a new node.
    pub(crate) fn prepare(
        options: NodeOptions,
        management_tls: bool,
        cookie: Option<&str>,
    ) -> anyhow::Result<RabbitNode> {
        let suffix: u32 = rand::rng().random_range(0..0x10000);
        let name = format!(
            "warren-test-{}-{}-{:04x}@localhost",
            std::process::id(),
            NODE_COUNTER.fetch_add(1, Ordering::Relaxed),
            suffix
        );
        sweep_stale_dirs();
        let ports = NodePorts::reserve(options)?;
        let dir = tempfile::Builder::new()
            .prefix("warren-rabbit-")
            .tempdir()
            .context("creating the node's temp dir")?;
        let ca = if options.tls || management_tls {
            Some(TestCa::generate()?)
        } else {
            None
        };
        let node = RabbitNode {
            name,
            options,
            ports,
            dir: Some(dir),
            ca,
            management_tls,
            child: None,
            pid: None,
            cookie: cookie.map_or_else(new_cookie, str::to_owned),
        };
        node.write_files()?;
        Ok(node)
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("node dir exists until shutdown")
            .path()
    }

    fn pid_file(&self) -> PathBuf {
        self.dir().join("node.pid")
    }

    /// stdout/stderr of the VM: boot banners and crash reports that happen
    /// before the logger is up land here, not in the log file.
    fn console_log(&self) -> PathBuf {
        self.dir().join("console.log")
    }

    /// The node's main log file.
    fn log_file(&self) -> PathBuf {
        self.dir().join("log").join("rabbit.log")
    }

    fn write_files(&self) -> anyhow::Result<()> {
        let dir = self.dir();
        for sub in ["home", "mnesia", "log", "conf.d"] {
            fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {sub}"))?;
        }
        // Erlang refuses a cookie file readable by others.
        let cookie = &self.cookie;
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o400)
            .open(dir.join("home/.erlang.cookie"))
            .context("writing the erlang cookie")?;
        f.write_all(cookie.as_bytes())?;

        // Lets a later test process remove this dir if we die without
        // running `Drop` (see `sweep_stale_dirs`).
        fs::write(dir.join(OWNER_FILE), std::process::id().to_string())?;

        // An empty env file instead of /etc/rabbitmq/rabbitmq-env.conf, which
        // sets the system broker's NODENAME.
        fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let plugins = if self.options.management {
            "[rabbitmq_management].\n"
        } else {
            "[].\n"
        };
        fs::write(dir.join("enabled_plugins"), plugins)?;
        fs::write(dir.join("rabbitmq.conf"), self.config())?;
        Ok(())
    }

    /// `rabbitmq.conf` in the new-style (sysctl) format.
    fn config(&self) -> String {
        let mut c = String::new();
        let line = |c: &mut String, s: String| {
            c.push_str(&s);
            c.push('\n');
        };
        line(
            &mut c,
            format!("listeners.tcp.1 = 127.0.0.1:{}", self.amqp_port()),
        );
        // guest may only log in over loopback by default; we are on loopback,
        // but proxies and TLS connections make the check more trouble than
        // it is worth in tests.
        line(&mut c, "loopback_users = none".into());
        // Keep a full /tmp from turning into a confusing disk alarm.
        line(&mut c, "disk_free_limit.absolute = 1MB".into());
        // Stats (and so /api/nodes' mem_alarm) refresh every second instead of 5.
        line(&mut c, "collect_statistics_interval = 1000".into());
        match (&self.ports.management, &self.ca) {
            // management.* keys only validate when the plugin is enabled.
            (Some(p), Some(ca)) if self.management_tls => {
                // With only `management.ssl.*` set there is no plain
                // HTTP listener.
                line(&mut c, format!("management.ssl.port = {}", p.port()));
                line(&mut c, "management.ssl.ip = 127.0.0.1".into());
                line(
                    &mut c,
                    format!(
                        "management.ssl.cacertfile = {}",
                        ca.ca_cert_path().display()
                    ),
                );
                line(
                    &mut c,
                    format!(
                        "management.ssl.certfile = {}",
                        ca.server_cert_path().display()
                    ),
                );
                line(
                    &mut c,
                    format!(
                        "management.ssl.keyfile = {}",
                        ca.server_key_path().display()
                    ),
                );
            }
            (Some(p), _) => {
                line(&mut c, format!("management.tcp.port = {}", p.port()));
                line(&mut c, "management.tcp.ip = 127.0.0.1".into());
            }
            (None, _) => {}
        }
        if let (Some(p), Some(ca)) = (&self.ports.tls, &self.ca) {
            line(&mut c, format!("listeners.ssl.1 = 127.0.0.1:{}", p.port()));
            line(
                &mut c,
                format!("ssl_options.cacertfile = {}", ca.ca_cert_path().display()),
            );
            line(
                &mut c,
                format!("ssl_options.certfile = {}", ca.server_cert_path().display()),
            );
            line(
                &mut c,
                format!("ssl_options.keyfile = {}", ca.server_key_path().display()),
            );
            line(&mut c, "ssl_options.verify = verify_none".into());
            line(&mut c, "ssl_options.fail_if_no_peer_cert = false".into());
        }
        c
    }

    /// Environment for both the server and `rabbitmqctl`.
    fn common_env(&self) -> Vec<(&'static str, String)> {
        let dir = self.dir();
        let p = |sub: &str| dir.join(sub).display().to_string();
        vec![
            // The Erlang cookie lives in $HOME; a private HOME gives the node
            // and our rabbitmqctl calls a private cookie.
            ("HOME", p("home")),
            ("RABBITMQ_CONF_ENV_FILE", p("rabbitmq-env.conf")),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
        ]
    }

    /// Environment of the server process (see the module docs for why each
    /// system default is redirected).
    fn server_env(&self) -> Vec<(&'static str, String)> {
        let dir = self.dir();
        let p = |sub: &str| dir.join(sub).display().to_string();
        let mut env = self.common_env();
        env.extend([
            ("RABBITMQ_NODENAME", self.name.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", self.amqp_port().to_string()),
            ("RABBITMQ_DIST_PORT", self.ports.dist.port().to_string()),
            ("RABBITMQ_MNESIA_BASE", p("mnesia")),
            ("RABBITMQ_LOG_BASE", p("log")),
            ("RABBITMQ_LOGS", p("log/rabbit.log")),
            ("RABBITMQ_PID_FILE", p("node.pid")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins")),
            // RabbitMQ 3.10 and 4.0 both accept the path with its `.conf`
            // extension.
            ("RABBITMQ_CONFIG_FILE", p("rabbitmq.conf")),
            ("RABBITMQ_CONFIG_FILES", p("conf.d")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", p("advanced.config")),
            // Make the script `exec` the VM instead of running it as a child
            // of a signal-forwarding shell; -noinput restores what the script
            // would otherwise pass. The dist listener binds 0.0.0.0 unless told.
            ("RABBITMQ_ALLOW_INPUT", "1".into()),
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-noinput -kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
        ]);
        env
    }

    /// A `rabbitmqctl` command aimed at this node.
    fn ctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin_dir().join("rabbitmqctl"));
        clear_rabbitmq_env(&mut cmd);
        cmd.envs(self.common_env())
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Spawn the server and wait until `rabbitmqctl wait` says the broker and
    /// its plugins run. On error the node is left not running.
    pub(crate) fn boot(&mut self) -> anyhow::Result<()> {
        debug_assert!(self.child.is_none());
        let _ = fs::remove_file(self.pid_file()); // a stale pid file would fool `wait`
        let mut console = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.console_log())
            .context("opening the console log")?;
        writeln!(console, "==== warren-testkit: starting {} ====", self.name)?;

        let mut cmd = Command::new(bin_dir().join("rabbitmq-server"));
        clear_rabbitmq_env(&mut cmd);
        cmd.envs(self.server_env())
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .process_group(0);
        let child = spawn_tied_to_process(cmd).context("spawning rabbitmq-server")?;
        self.child = Some(child);
        self.pid = None;

        match self.wait_booted() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.kill_process();
                // The cause goes first: the log tails after it are long, and
                // a test report that cuts its output keeps the head.
                Err(anyhow!(
                    "starting {}: {}\n{}",
                    self.name,
                    error_chain(e.as_ref()),
                    self.log_tail()
                ))
            }
        }
    }

    fn wait_booted(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let pid_file = self.pid_file().display().to_string();
        let timeout = BOOT_TIMEOUT.as_secs().to_string();
        let mut wait = self
            .ctl_command(&["wait", &pid_file, "--timeout", &timeout])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning rabbitmqctl wait")?;
        let result = loop {
            if let Some(status) = self.child_exited()? {
                break Err(anyhow!("rabbitmq-server exited during boot ({status})"));
            }
            if let Some(status) = wait.try_wait()? {
                if status.success() {
                    break Ok(());
                }
                let mut out = String::new();
                if let Some(mut s) = wait.stdout.take() {
                    let _ = s.read_to_string(&mut out);
                }
                if let Some(mut s) = wait.stderr.take() {
                    let _ = s.read_to_string(&mut out);
                }
                break Err(anyhow!(
                    "rabbitmqctl wait failed ({status}): {}",
                    out.trim()
                ));
            }
            if Instant::now() > deadline {
                break Err(anyhow!("node not up after {BOOT_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if result.is_err() {
            let _ = wait.kill();
        }
        let _ = wait.wait();
        result?;

        let pid_text = fs::read_to_string(self.pid_file()).context("reading the pid file")?;
        let pid: u32 = pid_text
            .trim()
            .parse()
            .with_context(|| format!("pid file says {pid_text:?}"))?;
        let child_pid = self.child.as_ref().map(Child::id);
        if child_pid != Some(pid) {
            tracing::warn!(pid, ?child_pid, "beam pid differs from the spawned process");
        }
        self.pid = Some(pid);

        // `wait` returns once the apps run; the listeners are up by then, but
        // make the promise explicit.
        let mut ports = vec![self.amqp_port()];
        ports.extend(self.ports.management.as_ref().map(PortReservation::port));
        ports.extend(self.ports.tls.as_ref().map(PortReservation::port));
        for port in ports {
            wait_until(deadline, || accepts(port))
                .with_context(|| format!("port {port} does not accept connections"))?;
        }
        Ok(())
    }

    /// Reap the child if it exited; `Some(status)` then, and `child` is cleared.
    fn child_exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait().context("checking rabbitmq-server")?;
        if status.is_some() {
            self.child = None;
            self.pid = None;
        }
        Ok(status)
    }

    /// SIGKILL the node's process group and reap the beam process.
    fn kill_process(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as libc::pid_t;
            // SAFETY: plain syscall. The child is not reaped yet, so the
            // process group id cannot have been reused by someone else.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.pid = None;
    }

    /// Kill the node with SIGKILL, as a crash or OOM kill would, and wait
    /// until the process is gone and the AMQP port refuses connections.
    /// Data written to disk survives; use [`RabbitNode::start_again`] to
    /// bring the node back.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if self.child.is_none() {
            bail!("{} is not running", self.name);
        }
        self.kill_process();
        self.wait_port_closed()
    }

    /// Stop the node gracefully (`rabbitmqctl stop`): connected clients get
    /// `connection.close` 320 CONNECTION_FORCED, as in a rolling upgrade.
    /// Waits until the process has exited; a node that does not stop within
    /// 60 s is killed and an error returned.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.child.is_none() {
            return Ok(());
        }
        let stop_result = self.ctl(&["stop"]);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if self.child_exited()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                let tail = self.log_tail();
                self.kill_process();
                let ctl = stop_result
                    .err()
                    .map(|e| error_chain(e.as_ref()))
                    .unwrap_or_default();
                bail!(
                    "{} did not stop within {STOP_TIMEOUT:?} (killed it); {ctl}\n{tail}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_port_closed()
    }

    /// Start the node again after [`RabbitNode::kill9`] or
    /// [`RabbitNode::stop`]: same name, data dir and ports, so durable queues
    /// and messages come back and clients can reconnect to the same URL.
    /// After it returns, [`RabbitNode::pid`] is the new process.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.boot() {
                Ok(()) => {
                    tracing::info!(node = %self.name, pid = ?self.pid, "rabbitmq node restarted");
                    return Ok(());
                }
                // Listeners use SO_REUSEADDR, so TIME_WAIT is no obstacle,
                // but give a briefly lingering socket a chance anyway.
                Err(e) if is_port_conflict(&e) && attempt < RESTART_ATTEMPTS => {
                    tracing::warn!(node = %self.name, attempt, "port still busy, retrying restart");
                    std::thread::sleep(Duration::from_secs(1));
                }
                // A broker that fails to boot once after a crash is started
                // again, as a pod's restart policy would; the tests are about
                // clients riding out the outage, and a broker that never
                // comes back still fails them after the last attempt.
                Err(e) if attempt < BOOT_ATTEMPTS_AFTER_CRASH => {
                    let cause = error_chain(e.as_ref());
                    let cause = cause.lines().next().unwrap_or_default();
                    tracing::warn!(node = %self.name, attempt, cause, "restart failed, starting the node again");
                    println!(
                        "{}: restart attempt {attempt} failed ({cause}); starting it again",
                        self.name
                    );
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stop gracefully (if running) and start again on the same data and
    /// ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Freeze the node with SIGSTOP: sockets stay open but nothing answers,
    /// so clients only notice through heartbeats or timeouts. Undo with
    /// [`RabbitNode::thaw`]; a frozen node can still be killed or dropped.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal_group(libc::SIGSTOP)
    }

    /// Resume a node frozen by [`RabbitNode::freeze`].
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal_group(libc::SIGCONT)
    }

    fn signal_group(&self, sig: libc::c_int) -> anyhow::Result<()> {
        let Some(child) = &self.child else {
            bail!("{} is not running", self.name)
        };
        // SAFETY: plain syscall on our own unreaped child's process group.
        let rc = unsafe { libc::kill(-(child.id() as libc::pid_t), sig) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("signalling the node");
        }
        Ok(())
    }

    /// Kill the node (if running) and remove its temp dir, reporting errors
    /// that `Drop` has to swallow.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.kill_process();
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            dir.close()
                .with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }

    fn wait_port_closed(&self) -> anyhow::Result<()> {
        let port = self.amqp_port();
        wait_until(Instant::now() + Duration::from_secs(10), || !accepts(port))
            .with_context(|| format!("AMQP port {port} still accepts after the node went down"))
    }

    /// Run `rabbitmqctl -n <node> <args>` and return its stdout; on failure
    /// the error carries stdout and stderr. Takes about half a second (the
    /// CLI is an Erlang VM too), so do not poll it in tight loops.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .ctl_command(args)
            .output()
            .with_context(|| format!("running rabbitmqctl {}", args.join(" ")))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "rabbitmqctl {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }

    /// Raise a memory alarm by setting the high watermark to almost nothing:
    /// the broker then blocks every publishing connection
    /// (`connection.blocked`). Returns once the alarm is in force.
    pub fn set_memory_alarm(&self) -> anyhow::Result<()> {
        self.ctl(&["set_vm_memory_high_watermark", "0.000001"])?;
        wait_until(Instant::now() + Duration::from_secs(30), || {
            self.memory_alarm_active().unwrap_or(false)
        })
        .context("memory alarm did not go off")
    }

    /// Restore the default watermark (0.4) and return once the memory alarm
    /// has cleared, so blocked publishers get `connection.unblocked`.
    pub fn clear_memory_alarm(&self) -> anyhow::Result<()> {
        self.ctl(&["set_vm_memory_high_watermark", DEFAULT_WATERMARK])?;
        wait_until(Instant::now() + Duration::from_secs(30), || {
            matches!(self.memory_alarm_active(), Ok(false))
        })
        .context("memory alarm did not clear")
    }

    /// Whether the node currently has a memory alarm, asked from the broker
    /// itself (the management API lags by a statistics interval).
    pub fn memory_alarm_active(&self) -> anyhow::Result<bool> {
        let alarms = self.ctl(&["eval", "rabbit_alarm:get_alarms()."])?;
        Ok(alarms.contains("memory"))
    }

    /// The broker's version, e.g. `4.0.5` (asks `rabbitmqctl`).
    pub fn version(&self) -> anyhow::Result<String> {
        Ok(self.ctl(&["version"])?.trim().to_owned())
    }

    /// The broker's `(major, minor)` version, e.g. `(3, 10)` or `(4, 0)`
    /// (asks `rabbitmqctl`).
    pub fn major_minor(&self) -> anyhow::Result<(u32, u32)> {
        let version = self.version()?;
        parse_major_minor(&version)
            .with_context(|| format!("unexpected broker version {version:?}"))
    }

    /// Whether quorum queues declared on this node need a clean restart of
    /// the broker before a test may `kill -9` it. True on RabbitMQ 3.10
    /// (anything before 4.0) only.
    ///
    /// RabbitMQ 3.10 keeps a new quorum queue's registration in a lazily
    /// synced table: a SIGKILL within minutes of the declaration can lose
    /// it, and the single-node queue then never finds its leader again
    /// (`leader call - leader not known`), while a graceful stop writes it
    /// out. Even then, 3.10 sometimes leaves such a queue without a leader
    /// after a SIGKILL, until a graceful restart; tests that kill the broker
    /// restart it gracefully then, on 3.10 only. RabbitMQ 4.0 needs neither:
    /// its kill -9 tests run without both restarts.
    pub fn needs_quorum_registration_restart(&self) -> anyhow::Result<bool> {
        Ok(self.major_minor()? < (4, 0))
    }

    /// Before a test kills this node: on a broker that
    /// [needs it](Self::needs_quorum_registration_restart) (RabbitMQ 3.10),
    /// restart it cleanly so that the quorum queues just declared survive
    /// a SIGKILL, and say so; on 4.0, nothing. Returns whether it
    /// restarted.
    pub fn settle_new_quorum_queues(&mut self) -> anyhow::Result<bool> {
        if !self.needs_quorum_registration_restart()? {
            return Ok(false);
        }
        println!(
            "RabbitMQ {}: restarting the broker cleanly before killing it",
            self.version()?
        );
        self.stop()?;
        self.start_again()?;
        Ok(true)
    }

    /// The Erlang node name, e.g. for `rabbitmqctl -n`.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// OS pid of the beam process while the node runs; changes on restart.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Whether the node's process is alive (it may still be booting or
    /// frozen).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child_exited(), Ok(None)) && self.child.is_some()
    }

    /// Plain AMQP port on 127.0.0.1.
    pub fn amqp_port(&self) -> u16 {
        self.ports.amqp.port()
    }

    /// Plain AMQP address, e.g. to aim a [`crate::Proxy`] at.
    pub fn amqp_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.amqp_port()))
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`
    pub fn amqp_url(&self) -> String {
        format!(
            "amqp://{USER}:{PASSWORD}@127.0.0.1:{}/%2f",
            self.amqp_port()
        )
    }

    /// Management API base URL, `http://127.0.0.1:PORT` (guest:guest), or
    /// `https://localhost:PORT` for a node from
    /// [`RabbitNode::start_with_management_tls`] (`localhost` so that
    /// hostname verification against the test certificate is exercised).
    ///
    /// # Panics
    /// When the node was started with `management: false`.
    pub fn management_url(&self) -> String {
        let port = self
            .ports
            .management
            .as_ref()
            .expect("node was started without management")
            .port();
        if self.management_tls {
            format!("https://localhost:{port}")
        } else {
            format!("http://127.0.0.1:{port}")
        }
    }

    /// AMQPS port.
    ///
    /// # Panics
    /// When the node was started without `tls`.
    pub fn amqps_port(&self) -> u16 {
        self.ports
            .tls
            .as_ref()
            .expect("node was started without tls")
            .port()
    }

    /// `amqps://guest:guest@localhost:PORT/%2f`; `localhost` so that
    /// hostname verification against the test certificate is exercised.
    ///
    /// # Panics
    /// When the node was started without `tls`.
    pub fn amqps_url(&self) -> String {
        format!(
            "amqps://{USER}:{PASSWORD}@localhost:{}/%2f",
            self.amqps_port()
        )
    }

    /// PEM file of the CA that signed the node's certificate.
    ///
    /// # Panics
    /// When the node was started without `tls`.
    pub fn ca_cert_pem_path(&self) -> PathBuf {
        self.test_ca().ca_cert_path()
    }

    /// The TLS material of the node.
    ///
    /// # Panics
    /// When the node was started without `tls`.
    pub fn test_ca(&self) -> &TestCa {
        self.ca.as_ref().expect("node was started without tls")
    }

    /// The options the node was started with.
    pub fn options(&self) -> NodeOptions {
        self.options
    }

    /// Directory holding the node's config, data and logs.
    pub fn data_dir(&self) -> &Path {
        self.dir()
    }

    /// The last lines of the console output and of the node log, for
    /// failure messages.
    pub fn log_tail(&self) -> String {
        format!(
            "--- {} (tail) ---\n{}--- {} (tail) ---\n{}",
            self.console_log().display(),
            tail_lines(&self.console_log(), 40),
            self.log_file().display(),
            tail_lines(&self.log_file(), 40)
        )
    }

    // ---- queue helpers over AMQP (exact, unlike management statistics) ----

    /// Open an AMQP connection to this node (plain, direct, guest).
    pub async fn amqp_connection(&self) -> anyhow::Result<Connection> {
        Connection::connect(&self.amqp_url(), ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to {}", self.amqp_url()))
    }

    /// A fresh connection and channel for one helper call.
    async fn open_channel(&self) -> anyhow::Result<(Connection, Channel)> {
        let conn = self.amqp_connection().await?;
        let channel = conn.create_channel().await.context("opening a channel")?;
        Ok((conn, channel))
    }

    /// Declare a durable quorum queue (idempotent).
    pub async fn declare_quorum_queue(&self, name: &str) -> anyhow::Result<()> {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let (conn, ch) = self.open_channel().await?;
        let result = ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await;
        close(conn).await;
        result
            .map(drop)
            .with_context(|| format!("declaring quorum queue {name}"))
    }

    /// Declare a durable classic queue (idempotent).
    pub async fn declare_classic_queue(&self, name: &str) -> anyhow::Result<()> {
        let (conn, ch) = self.open_channel().await?;
        let result = ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        close(conn).await;
        result
            .map(drop)
            .with_context(|| format!("declaring classic queue {name}"))
    }

    /// Declare a durable exchange; `kind` is `direct`, `fanout`, `topic`,
    /// `headers` or a plugin's type name.
    pub async fn declare_exchange(&self, name: &str, kind: &str) -> anyhow::Result<()> {
        let kind = match kind {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            other => ExchangeKind::Custom(other.to_string()),
        };
        let (conn, ch) = self.open_channel().await?;
        let result = ch
            .exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        close(conn).await;
        result.with_context(|| format!("declaring exchange {name}"))
    }

    /// Bind `queue` to `exchange` with `routing_key`.
    pub async fn bind(&self, exchange: &str, queue: &str, routing_key: &str) -> anyhow::Result<()> {
        let (conn, ch) = self.open_channel().await?;
        let result = ch
            .queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        close(conn).await;
        result.with_context(|| format!("binding {queue} to {exchange} with {routing_key:?}"))
    }

    /// Delete an exchange (no error if it does not exist), e.g. to make the
    /// broker reject publishes with 404.
    pub async fn delete_exchange(&self, name: &str) -> anyhow::Result<()> {
        let (conn, ch) = self.open_channel().await?;
        let result = ch
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await;
        close(conn).await;
        result.with_context(|| format!("deleting exchange {name}"))
    }

    /// Delete a queue, returning how many messages it held.
    pub async fn delete_queue(&self, name: &str) -> anyhow::Result<u64> {
        let (conn, ch) = self.open_channel().await?;
        let result = ch
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
        close(conn).await;
        result
            .map(u64::from)
            .with_context(|| format!("deleting queue {name}"))
    }

    /// Messages ready in a queue, from a passive `queue.declare`: exact at
    /// the moment of asking (management statistics lag by seconds).
    pub async fn queue_message_count(&self, name: &str) -> anyhow::Result<u64> {
        let (conn, ch) = self.open_channel().await?;
        let result = ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        close(conn).await;
        result
            .map(|q| u64::from(q.message_count()))
            .with_context(|| format!("counting messages in {name}"))
    }

    /// Remove all ready messages from a queue, returning how many there were.
    pub async fn purge(&self, name: &str) -> anyhow::Result<u64> {
        let (conn, ch) = self.open_channel().await?;
        let result = ch
            .queue_purge(name.into(), QueuePurgeOptions::default())
            .await;
        close(conn).await;
        result
            .map(u64::from)
            .with_context(|| format!("purging {name}"))
    }

    /// `GET` a management API path (e.g. `/api/overview`) as guest and parse
    /// the JSON answer.
    pub async fn management_get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{}", self.management_url(), path);
        let mut client = reqwest::Client::builder();
        if self.management_tls {
            let ca = reqwest::Certificate::from_pem(self.test_ca().ca_cert_pem().as_bytes())?;
            client = client.tls_certs_only([ca]);
        }
        let resp = client
            .build()?
            .get(&url)
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            bail!("GET {url}: {status}: {body}");
        }
        resp.json()
            .await
            .with_context(|| format!("GET {url}: parsing JSON"))
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if self.dir.is_none() {
            return; // shut down explicitly
        }
        if std::thread::panicking() {
            eprintln!(
                "warren-testkit: test panicked; logs of {}:\n{}",
                self.name,
                self.log_tail()
            );
        }
        self.kill_process();
        if std::env::var_os("WARREN_TESTKIT_KEEP_DIRS").is_some()
            && let Some(dir) = self.dir.take()
        {
            let _ = fs::remove_file(dir.path().join(OWNER_FILE)); // not for the sweeper
            eprintln!(
                "warren-testkit: keeping {} for {}",
                dir.keep().display(),
                self.name
            );
        }
    }
}

/// File in a node's dir naming the test process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// Spawn `cmd` so that the kernel kills it (SIGKILL) when this process dies,
/// even by SIGKILL (a nextest timeout, a Ctrl-C'd `cargo test`), when no
/// `Drop` runs. `PR_SET_PDEATHSIG` fires when the *thread* that forked
/// exits, so every spawn happens on one thread that lives as long as the
/// process; a node started from a short-lived thread (`spawn_blocking`)
/// would otherwise die with that thread. The setting survives the script's
/// `exec` of the VM.
pub(crate) fn spawn_tied_to_process(mut cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<std::sync::mpsc::Sender<Job>> = OnceLock::new();

    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe syscalls (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("test process exited"));
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("warren-testkit-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    spawner
        .send((cmd, reply_tx))
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?
}

/// Remove node dirs left by test processes that died without running
/// `Drop` (their nodes died with them, see `spawn_tied_to_process`), so a
/// machine running many test sessions does not fill /tmp. Runs once per
/// process.
fn sweep_stale_dirs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with("warren-rabbit-") {
                continue;
            }
            let Ok(owner) = fs::read_to_string(entry.path().join(OWNER_FILE)) else {
                continue; // being created, or kept on purpose
            };
            let Ok(pid) = owner.trim().parse::<libc::pid_t>() else {
                continue;
            };
            // SAFETY: signal 0 only checks for existence.
            let dead = unsafe { libc::kill(pid, 0) } != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            if dead {
                tracing::debug!(dir = %entry.path().display(), pid, "removing a dead test's node dir");
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// Close a helper's connection; failures are irrelevant to the caller.
async fn close(conn: Connection) {
    let _ = conn.close(200, "bye".into()).await;
}

/// Inherited `RABBITMQ_*` variables would override what we configure.
fn clear_rabbitmq_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RABBITMQ_") {
            cmd.env_remove(key);
        }
    }
}

fn is_port_conflict(e: &anyhow::Error) -> bool {
    let text = error_chain(e.as_ref());
    text.contains("eaddrinuse") || text.contains("address already in use")
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
fn accepts(port: u16) -> bool {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Poll `cond` every 100 ms until it holds or `deadline` passes.
/// `(major, minor)` of a version like `3.10.0` or `4.0.5`.
fn parse_major_minor(version: &str) -> anyhow::Result<(u32, u32)> {
    let mut parts = version.trim().split('.');
    let mut next = || -> anyhow::Result<u32> {
        let part = parts.next().ok_or_else(|| anyhow!("too few parts"))?;
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        Ok(digits.parse()?)
    };
    Ok((next()?, next()?))
}

fn wait_until(deadline: Instant, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` lines of a file (reads at most its last 64 KiB).
pub(crate) fn tail_lines(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return "(missing)\n".to_string();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::parse_major_minor;

    #[test]
    fn major_minor_of_broker_versions() {
        assert_eq!(parse_major_minor("3.10.0").unwrap(), (3, 10));
        assert_eq!(parse_major_minor("4.0.5\n").unwrap(), (4, 0));
        assert_eq!(parse_major_minor("4.1.0-rc.1").unwrap(), (4, 1));
        assert!(parse_major_minor("4").is_err());
        assert!(parse_major_minor("").is_err());
        assert!((3, 10) < (4, 0));
    }
}
