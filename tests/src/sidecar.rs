//! The `warren-sidecar` binary run as a separate process, so a test (or the
//! demo, or a benchmark) can kill it with SIGKILL, stop it with SIGTERM and
//! start it again on the same outbox.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use warren_testkit::{SidecarOptions, SidecarProcess};
//! let mut sidecar = SidecarProcess::start(SidecarOptions::new(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//!     "/tmp/outbox",
//! ))?;
//! sidecar.wait_ready().await?;
//! let publish = format!("{}/v1/publish/amq.default/jobs", sidecar.api_url());
//! sidecar.kill9();
//! sidecar.restart().await?; // same data dir, same ports
//! # Ok(()) }
//! ```
//!
//! # Which binary
//! [`sidecar_bin`] resolves it once per process: `WARREN_SIDECAR_BIN` if
//! set; else, when the caller is a test binary run by nextest (in
//! `target/<profile>/deps`), `cargo build -p warren-sidecar` first (a no-op
//! when it is fresh: a test of another package does not rebuild it
//! otherwise) and the binary of that profile; else the binary next to the
//! running executable (or next to its `deps` dir), then `target/debug` and
//! `target/release` of this workspace, building it when none exists.
//!
//! Sidecars are spawned like [`crate::RabbitNode`]s: tied to this process
//! with `PR_SET_PDEATHSIG`, so a test killed outright takes them along.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tempfile::TempDir;
use warren_crds::error_chain::error_chain;

use crate::node::spawn_tied_to_process;
use crate::ports::free_port;

/// How long a (re)started sidecar may take to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Flags added unless the caller's `args` set them: reconnects and failure
/// detection quick enough for tests that break the broker every few seconds.
const TEST_TUNING: &[(&str, &str)] = &[
    ("--reconnect-initial", "100ms"),
    ("--reconnect-max", "500ms"),
    ("--heartbeat", "2s"),
    ("--confirm-timeout", "5s"),
    ("--connect-timeout", "3s"),
];

/// How to start a sidecar.
#[derive(Debug, Clone)]
pub struct SidecarOptions {
    /// `--broker-url`.
    pub broker_url: String,
    /// `--data-dir`: the outbox, kept across restarts.
    pub data_dir: PathBuf,
    /// Consumer configuration (YAML, see `warren_crds::sidecar_config`),
    /// written to a file and passed as `--config`.
    pub consumer_config: Option<String>,
    /// More flags (`--max-outbox-messages=100`); a flag given here replaces
    /// the test tuning's value of the same flag.
    pub args: Vec<String>,
    /// Environment; `RUST_LOG` defaults to `info`.
    pub env: Vec<(String, String)>,
    /// Add quick reconnects and a 2 s heartbeat (on by default).
    pub test_tuning: bool,
}

impl SidecarOptions {
    /// A publishing sidecar with test tuning and nothing else.
    pub fn new(broker_url: impl Into<String>, data_dir: impl Into<PathBuf>) -> SidecarOptions {
        SidecarOptions {
            broker_url: broker_url.into(),
            data_dir: data_dir.into(),
            consumer_config: None,
            args: Vec::new(),
            env: Vec::new(),
            test_tuning: true,
        }
    }

    /// Consume as configured by `yaml`.
    pub fn consumer_config(mut self, yaml: impl Into<String>) -> SidecarOptions {
        self.consumer_config = Some(yaml.into());
        self
    }

    /// Add a flag, e.g. `"--max-outbox-messages=100"`.
    pub fn arg(mut self, arg: impl Into<String>) -> SidecarOptions {
        self.args.push(arg.into());
        self
    }

    /// Set an environment variable of the process.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> SidecarOptions {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A `warren-sidecar` process; see the module docs. Dropping it kills the
/// process (and prints the log tail when the thread is panicking).
pub struct SidecarProcess {
    /// The running process, `None` after [`SidecarProcess::kill9`] or
    /// [`SidecarProcess::terminate`].
    child: Option<Child>,
    api_port: u16,
    admin_port: u16,
    data_dir: PathBuf,
    /// Full command line (without the binary).
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Holds the config file and the log.
    files: TempDir,
}

impl std::fmt::Debug for SidecarProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarProcess")
            .field("pid", &self.pid())
            .field("api", &self.api_url())
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

impl SidecarProcess {
    /// Spawn the sidecar on fresh ports (127.0.0.1); does not wait for it:
    /// call [`SidecarProcess::wait_ready`].
    pub fn start(options: SidecarOptions) -> anyhow::Result<SidecarProcess> {
        let files = tempfile::Builder::new()
            .prefix("warren-sidecar-")
            .tempdir()
            .context("creating the sidecar's temp dir")?;
        let (api_port, admin_port) = (free_port(), free_port());
        let mut args = vec![
            format!("--broker-url={}", options.broker_url),
            format!("--data-dir={}", options.data_dir.display()),
            format!("--listen=127.0.0.1:{api_port}"),
            format!("--admin-listen=127.0.0.1:{admin_port}"),
        ];
        if let Some(yaml) = &options.consumer_config {
            let path = files.path().join("consumer.yaml");
            std::fs::write(&path, yaml).context("writing the consumer config")?;
            args.push(format!("--config={}", path.display()));
        }
        if options.test_tuning {
            for (flag, value) in TEST_TUNING {
                let overridden = options
                    .args
                    .iter()
                    .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
                if !overridden {
                    args.push(format!("{flag}={value}"));
                }
            }
        }
        args.extend(options.args.iter().cloned());
        let mut env = options.env.clone();
        if !env.iter().any(|(k, _)| k == "RUST_LOG") {
            env.push(("RUST_LOG".into(), "info".into()));
        }
        let mut p = SidecarProcess {
            child: None,
            api_port,
            admin_port,
            data_dir: options.data_dir,
            args,
            env,
            files,
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = sidecar_bin()?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening the sidecar log")?;
        let mut cmd = Command::new(bin);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child =
            spawn_tied_to_process(cmd).with_context(|| format!("spawning {}", bin.display()))?;
        tracing::debug!(pid = child.id(), api = %self.api_url(), "sidecar started");
        self.child = Some(child);
        Ok(())
    }

    /// Wait until `/readyz` answers 200 (at most 60 s). Fails at once, with
    /// the log's tail, when the process exits meanwhile.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let url = format!("{}/readyz", self.admin_url());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_exited()? {
                bail!(
                    "sidecar exited ({status}) before it was ready\n{}",
                    self.log_tail()
                );
            }
            if http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "sidecar not ready within {READY_TIMEOUT:?}\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reap the child if it exited; `Some(status)` then.
    fn try_exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(child) = &mut self.child else {
            return Err(anyhow!("sidecar is not running"));
        };
        let status = child.try_wait()?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// `http://127.0.0.1:PORT`: the app-facing API.
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// `http://127.0.0.1:PORT`: `/healthz`, `/readyz`, `/metrics`.
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// The outbox directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where stdout and stderr of every run go (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.files.path().join("sidecar.log")
    }

    /// The last 40 lines of the log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_exited(), Ok(None))
    }

    /// Resident memory (`VmRSS` of `/proc/PID/status`) while it runs.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        parse_vm_rss(&status)
    }

    /// SIGKILL, as a crash or an OOM kill would, and reap. No-op when not
    /// running.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait up to `timeout` for the exit (the sidecar drains
    /// its outbox until its `--drain-timeout`); killed with SIGKILL and an
    /// error returned when it takes longer.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("sidecar is not running"))?;
        // SAFETY: kill(2) on our own unreaped child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "sidecar did not exit within {timeout:?} of SIGTERM\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Start the same command again (same data dir, ports and config) and
    /// wait until it is ready; a still running process is killed first.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()?;
        self.wait_ready().await
    }

    /// `GET /v1/outbox` as JSON (`pending`, `bytes`, `broker`, ...).
    pub async fn outbox(&self) -> anyhow::Result<serde_json::Value> {
        let body = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?
            .get(format!("{}/v1/outbox", self.api_url()))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(body)
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- sidecar {} log tail ---\n{}",
                self.api_url(),
                self.log_tail()
            );
        }
        self.kill9();
    }
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The `warren-sidecar` binary to run; see the module docs for the order.
/// Resolved (and built, if need be) once per process.
pub fn sidecar_bin() -> anyhow::Result<&'static Path> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        workspace_bin("warren-sidecar", "warren-sidecar").map_err(|e| error_chain(e.as_ref()))
    })
    .as_ref()
    .map(PathBuf::as_path)
    .map_err(|e| anyhow!("{e}"))
}

/// Find (or build) binary `bin` of workspace package `package`, as
/// [`sidecar_bin`] does for the sidecar; the environment variable
/// `<BIN>_BIN` (`WARREN_OPERATOR_BIN`) overrides.
pub fn workspace_bin(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let env_name = format!("{}_BIN", bin.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&env_name) {
        return Ok(PathBuf::from(path));
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    // A test binary run by nextest lives in target/<profile>/deps: build
    // first, then take the binary of the same profile. (Not under `cargo
    // test`, which holds the build lock while the tests run.)
    let under_nextest = std::env::var_os("NEXTEST_RUN_ID").is_some();
    if let Some(dir) = exe_dir
        .as_deref()
        .filter(|d| under_nextest && d.ends_with("deps"))
    {
        let profile_dir = dir.parent().expect("deps has a parent");
        let release = profile_dir.ends_with("release");
        let built = cargo_build(package, bin, release);
        return match (built, existing(profile_dir.join(bin))) {
            (Ok(()), Some(path)) => Ok(path),
            // A source tree that does not build right now (work in
            // progress) still leaves the last good binary to test with.
            (Err(e), Some(path)) => {
                eprintln!(
                    "warren-testkit: {}; using the existing {}",
                    error_chain(e.as_ref()),
                    path.display()
                );
                Ok(path)
            }
            (Err(e), None) => Err(e),
            (Ok(()), None) => Err(anyhow!(
                "cargo built {package} but {bin} is not in {}",
                profile_dir.display()
            )),
        };
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testkit lives in the workspace");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let candidates = exe_dir
        .iter()
        .flat_map(|d| [d.join(bin), d.with_file_name(bin)])
        .chain(["debug", "release"].map(|p| target.join(p).join(bin)));
    for c in candidates {
        if let Some(found) = existing(c) {
            return Ok(found);
        }
    }
    cargo_build(package, bin, false)?;
    existing(target.join("debug").join(bin)).ok_or_else(|| {
        anyhow!(
            "cargo built {package} but {bin} is not in {}",
            target.display()
        )
    })
}

fn existing(path: PathBuf) -> Option<PathBuf> {
    path.is_file().then_some(path)
}

fn cargo_build(package: &str, bin: &str, release: bool) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        cmd.arg("--release");
    }
    tracing::info!(package, release, "building {bin}");
    let status = cmd
        .status()
        .with_context(|| format!("running cargo build -p {package}"))?;
    if !status.success() {
        bail!("cargo build -p {package} --bin {bin} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    /// Against a broker that is not there: the sidecar is ready anyway
    /// (its outbox accepts), keeps what it acknowledged across SIGKILL and
    /// restart on the same ports, and exits on SIGTERM.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn start_kill9_restart_terminate() {
        let dir = tempfile::tempdir().unwrap();
        let nowhere = crate::reserve_port().unwrap();
        let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", nowhere.port());
        let mut sidecar = SidecarProcess::start(
            SidecarOptions::new(url, dir.path().join("outbox")).arg("--drain-timeout=1s"),
        )
        .unwrap();
        sidecar.wait_ready().await.unwrap();
        let first_pid = sidecar.pid().unwrap();
        assert!(sidecar.rss_bytes().unwrap() > 1 << 20);
        let http = reqwest::Client::new();
        let resp = http
            .post(format!("{}/v1/publish/amq.default/q", sidecar.api_url()))
            .header("X-Warren-Message-Id", "m1")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let api = sidecar.api_url();
        sidecar.kill9();
        assert_eq!(sidecar.pid(), None);
        assert!(http.get(format!("{api}/v1/outbox")).send().await.is_err());
        sidecar.restart().await.unwrap();
        assert_ne!(sidecar.pid(), Some(first_pid));
        assert_eq!(sidecar.api_url(), api, "same ports after a restart");
        assert_eq!(sidecar.outbox().await.unwrap()["pending"], 1);
        let status = sidecar.terminate(Duration::from_secs(30)).await.unwrap();
        assert!(status.success(), "{status:?}");
        assert!(!sidecar.log_tail().is_empty(), "the log collects both runs");
    }
}
