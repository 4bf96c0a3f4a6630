//! Private PostgreSQL clusters, one per test.
//!
//! The relay's promise (every committed row reaches the broker, none is
//! lost through database restarts and crashes) can only be tested against
//! a database the test may stop, `kill -9` and start again on the same data.
//! So each test runs its own cluster from Debian's `postgresql` package:
//!
//! - `initdb` into a temp dir, then the `postgres` server itself as the
//!   child (no `pg_ctl` daemonising), so the testkit owns its pid;
//! - bound to 127.0.0.1 on a port reserved for the cluster's whole life
//!   (a restart finds it free), its unix socket in the temp dir;
//! - PostgreSQL refuses to run as root, so `initdb` and the server run as
//!   `nobody` (or `WARREN_PG_USER`'s uid) when the tests run as root;
//! - user `postgres` with password `postgres` over TCP (scram-sha-256), so
//!   tests can also present a wrong password;
//! - optionally TLS ([`PgCluster::start_with_tls`]) with a [`crate::TestCa`]
//!   server certificate.
//!
//! Like [`crate::RabbitNode`], lifecycle calls block, the server runs in its
//! own process group (a `kill -9` takes the backends too) and is spawned
//! with `PR_SET_PDEATHSIG`, and dropping the cluster kills it by pid and
//! removes its dir, printing the log's tail if the test panicked.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tempfile::TempDir;

use crate::node::spawn_tied_to_process;
use crate::ports::{PortReservation, reserve_port};

/// The superuser and its password.
pub const PG_USER: &str = "postgres";
/// The superuser's password.
pub const PG_PASSWORD: &str = "postgres";

/// How long a start may take (crash recovery included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the server is killed instead.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The line the server logs once it accepts connections.
const READY_LINE: &str = "database system is ready to accept connections";

/// A private PostgreSQL cluster for one test; see the module docs.
pub struct PgCluster {
    /// Data dir, socket dir and log; removed on drop.
    dir: TempDir,
    /// The TCP port, reserved for the cluster's life.
    port: PortReservation,
    /// The server binaries.
    bin: PathBuf,
    /// Who the server runs as (`None`: as this process's user).
    run_as: Option<(u32, u32)>,
    /// The postmaster while it runs. `Some` means its pid (= process group)
    /// is still ours to signal.
    child: Option<Child>,
    /// Serve TLS with the certificate and key copied into the data dir.
    tls: bool,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("port", &self.port.port())
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin`, or `WARREN_PG_BIN_DIR`.
fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("WARREN_PG_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .context("/usr/lib/postgresql not found: install the `postgresql` OS package")?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| anyhow!("no initdb under /usr/lib/postgresql/*/bin"))
}

/// The uid and gid to run PostgreSQL as: none unless we are root.
fn run_as() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: plain syscalls without arguments.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let user = std::env::var("WARREN_PG_USER").unwrap_or_else(|_| "nobody".into());
    let out = Command::new("id")
        .args(["-u", &user])
        .output()
        .context("running id")?;
    let uid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("no user {user:?} to run PostgreSQL as"))?;
    let out = Command::new("id").args(["-g", &user]).output()?;
    let gid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok(Some((uid, gid)))
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

impl PgCluster {
    /// Creates a cluster with `initdb` and starts it; blocks until it
    /// accepts connections (a few seconds).
    pub fn start() -> anyhow::Result<PgCluster> {
        PgCluster::start_inner(None)
    }

    /// Like [`PgCluster::start`], also serving TLS (`ssl=on`) with the
    /// server certificate of `ca` (SANs `localhost` and `127.0.0.1`).
    pub fn start_with_tls(ca: &crate::TestCa) -> anyhow::Result<PgCluster> {
        PgCluster::start_inner(Some(ca))
    }

    fn start_inner(ca: Option<&crate::TestCa>) -> anyhow::Result<PgCluster> {
        let bin = bin_dir()?;
        let run_as = run_as()?;
        let dir = tempfile::Builder::new()
            .prefix("warren-pg-")
            .tempdir()
            .context("creating the cluster's temp dir")?;
        // The server's user must reach its data dir inside ours.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        for d in [&data, &sock] {
            fs::create_dir(d)?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o700))?;
            chown(d, run_as)?;
        }
        let pwfile = dir.path().join("pwfile");
        fs::write(&pwfile, format!("{PG_PASSWORD}\n"))?;
        chown(&pwfile, run_as)?;
        let mut cluster = PgCluster {
            dir,
            port: reserve_port()?,
            bin,
            run_as,
            child: None,
            tls: ca.is_some(),
        };
        let mut initdb = cluster.command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                PG_USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if let Some(ca) = ca {
            // The server insists that its key belongs to it, mode 0600.
            for (from, to) in [
                (ca.server_cert_path(), "server.crt"),
                (ca.server_key_path(), "server.key"),
            ] {
                let to = data.join(to);
                fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
                fs::set_permissions(&to, fs::Permissions::from_mode(0o600))?;
                chown(&to, run_as)?;
            }
        }
        cluster.start_again()?;
        tracing::info!(port = cluster.port(), "postgresql cluster started");
        Ok(cluster)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(self.dir.path())
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid).env("HOME", self.dir.path());
        }
        cmd
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port.port()
    }

    /// A URL for the superuser on database `postgres`.
    pub fn url(&self) -> String {
        self.url_with_password(PG_PASSWORD)
    }

    /// The same URL with another password (to provoke authentication errors).
    pub fn url_with_password(&self, password: &str) -> String {
        format!(
            "postgres://{PG_USER}:{password}@127.0.0.1:{}/postgres",
            self.port()
        )
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the server on the existing data (after a stop or a kill) and
    /// waits until it accepts connections; crash recovery runs first.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the cluster is already running");
        }
        let log_path = self.log_path();
        let before = count_ready(&log_path);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        writeln!(log, "==== warren-testkit: starting postgres ====")?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port().to_string(), "-c"])
            .arg("listen_addresses=127.0.0.1")
            .arg("-k")
            .arg(self.dir.path().join("sock"))
            .args(["-c", "max_connections=100", "-c", "shared_buffers=32MB"])
            .args(if self.tls {
                &["-c", "ssl=on"][..]
            } else {
                &[][..]
            })
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let child = spawn_tied_to_process(cmd).context("spawning postgres")?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "postgres exited during start ({status})\n{}",
                    self.log_tail()
                );
            }
            if count_ready(&log_path) > before && accepts(self.port()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill_process();
                bail!(
                    "postgres not ready after {START_TIMEOUT:?}\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fast shutdown (SIGINT: sessions are terminated, a checkpoint is
    /// written), as a database restart or failover does.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("the cluster is not running");
        };
        // SAFETY: plain syscall; the child is not reaped, so the pid is ours.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGINT);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if child.try_wait()?.is_some() {
                self.child = None;
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill_process();
                bail!("postgres did not stop within {STOP_TIMEOUT:?}; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL to the server and all its backends, as a crash or an OOM
    /// kill would; committed data survives (fsync is on).
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if self.child.is_none() {
            bail!("the cluster is not running");
        }
        self.kill_process();
        Ok(())
    }

    /// Fast shutdown, then start on the same data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_again()
    }

    fn kill_process(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as libc::pid_t;
            // SAFETY: plain syscall; the child is not reaped yet, so its
            // process group id is still ours.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Connects as the superuser; the connection is driven by a spawned
    /// task (call from a tokio runtime).
    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .context("connecting to the test cluster")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "warren-testkit: test panicked; postgres log (port {}):\n{}",
                self.port(),
                self.log_tail()
            );
        }
        self.kill_process();
    }
}

fn count_ready(log: &Path) -> usize {
    fs::read_to_string(log)
        .map(|t| t.matches(READY_LINE).count())
        .unwrap_or(0)
}

fn accepts(port: u16) -> bool {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Start, write, kill -9, start again: committed data survives.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_cluster_survives_kill9_with_its_data() {
        let mut pg = tokio::task::block_in_place(PgCluster::start).unwrap();
        let c = pg.client().await.unwrap();
        c.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
            .await
            .unwrap();
        tokio::task::block_in_place(|| pg.kill9()).unwrap();
        // The killed backend may not have been scheduled to die yet when
        // the first query goes out; the connection must fail soon after.
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.simple_query("SELECT 1").await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "the connection outlived kill -9 of the cluster"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::task::block_in_place(|| pg.start_again()).unwrap();
        let c = pg.client().await.unwrap();
        let n: i64 = c
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
        tokio::task::block_in_place(|| pg.restart()).unwrap();
        let bad = tokio_postgres::connect(&pg.url_with_password("wrong"), tokio_postgres::NoTls)
            .await
            .err()
            .expect("a wrong password is refused");
        let msg = bad.as_db_error().map(|e| e.message().to_owned());
        assert!(
            msg.as_deref().is_some_and(|m| m.contains("password")),
            "{bad:?}"
        );
    }
}
