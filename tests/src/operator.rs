//! Warren installed into a [`ControlPlane`] with its own Helm chart, and
//! `warren-operator run` as a process outside the cluster.
//!
//! There is no kubelet, so the chart's operator pods stay Pending; the
//! operator runs here instead, configured as the chart configures its
//! container: the plain `value` environment of the chart's Deployment, the
//! injection config from the chart's ConfigMap, and a token of the chart's
//! ServiceAccount, so it has exactly the RBAC the chart grants. The chart's
//! `webhook.externalName=localhost` makes the webhook Service an
//! ExternalName Service, through which the API server calls the webhook
//! listening on 127.0.0.1 (the certificate still names
//! `<service>.<namespace>.svc`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cluster::ControlPlane;
use crate::docs;
use crate::node::{spawn_tied_to_process, tail_lines};
use crate::ports::{PortReservation, reserve_port};
use crate::sidecar::workspace_bin;

/// Namespace the tests install the chart into.
pub const NAMESPACE: &str = "warren-system";
/// Release name; the chart's full name (`warren`) is derived from it.
pub const RELEASE: &str = "warren";

/// The chart installed into a control plane.
#[derive(Debug)]
pub struct Installed {
    /// The port of the webhook Service, which the first operator listens on.
    pub webhook_port: PortReservation,
}

/// `helm install` the chart of this repository into `plane` with the
/// command of `docs/install.md` (and of `README.md`, which must say the
/// same) as it is written there, which installs release [`RELEASE`] into
/// namespace [`NAMESPACE`], plus `--set` values that reach the webhook
/// through `localhost` and `values` (`key=value` as for `--set`). Then the
/// documented `kubectl wait` for the CRDs to be established, with a
/// timeout.
pub fn install_chart(plane: &ControlPlane, values: &[&str]) -> anyhow::Result<Installed> {
    let install = docs::command("docs/install.md", "helm install warren charts/warren");
    let readme = docs::command("README.md", "helm install warren charts/warren");
    anyhow::ensure!(
        install == readme,
        "README.md and docs/install.md install differently:\n  {readme}\n  {install}"
    );
    check_release_and_namespace(&install)?;
    let webhook_port = reserve_port()?;
    let mut script = install;
    let port = format!("webhook.servicePort={}", webhook_port.port());
    for v in ["webhook.externalName=localhost", port.as_str()]
        .into_iter()
        .chain(values.iter().copied())
    {
        script.push_str(" --set ");
        script.push_str(&shell_quote(v));
    }
    plane.shell_ok(&script)?;
    let wait = docs::command("docs/install.md", "kubectl wait");
    plane.shell_ok(&format!("{wait} --timeout=60s"))?;
    Ok(Installed { webhook_port })
}

/// Fails unless the documented `helm install` names release [`RELEASE`]
/// and namespace [`NAMESPACE`], which the tests and the operator's
/// defaults assume.
fn check_release_and_namespace(install: &str) -> anyhow::Result<()> {
    let words: Vec<&str> = install.split_whitespace().collect();
    let release = words.get(2).copied().unwrap_or_default();
    let namespace = words.iter().enumerate().find_map(|(i, w)| {
        if *w == "--namespace" || *w == "-n" {
            words.get(i + 1).copied()
        } else {
            w.strip_prefix("--namespace=")
        }
    });
    anyhow::ensure!(
        release == RELEASE && namespace == Some(NAMESPACE),
        "the documented `{install}` must install release {RELEASE} into namespace \
         {NAMESPACE} (the tests and the operator's defaults assume them); it names release \
         {release:?} and namespace {namespace:?}"
    );
    Ok(())
}

/// `value` quoted for bash.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// Wait until the chart's MutatingWebhookConfiguration carries a CA bundle
/// (the operator patches in its own CA at start): before that, the API
/// server cannot verify the webhook, and opted-in pods are refused.
pub fn wait_for_ca_bundle(plane: &ControlPlane, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let bundle = plane.kubectl_ok(&[
            "get",
            "mutatingwebhookconfiguration",
            RELEASE,
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ])?;
        if !bundle.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no caBundle in MutatingWebhookConfiguration {RELEASE} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The repository (the testkit is `tests/` in it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testkit lives in the repository")
        .to_path_buf()
}

/// `warren-operator run` outside the cluster, as the chart runs it.
pub struct OperatorProcess {
    /// Lease identity (POD_NAME).
    identity: String,
    /// The process while not reaped.
    child: Option<Child>,
    /// stdout and stderr.
    log: PathBuf,
    /// The admin endpoint's port (/healthz, /readyz, /metrics).
    admin_port: PortReservation,
    /// Holds the log, the injection config; removed on drop.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for OperatorProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorProcess")
            .field("identity", &self.identity)
            .field("pid", &self.pid())
            .finish()
    }
}

impl OperatorProcess {
    /// Start `warren-operator run` with the environment of the chart's
    /// Deployment, authenticated as the chart's ServiceAccount, its webhook
    /// on 127.0.0.1:`webhook_port`. `extra_env` comes last (overrides).
    /// Returns at once; [`OperatorProcess::start`] waits for `/healthz`.
    pub async fn spawn(
        plane: &ControlPlane,
        identity: &str,
        webhook_port: u16,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<OperatorProcess> {
        Self::spawn_with(plane, identity, webhook_port, extra_env, || Ok(())).await
    }

    /// [`OperatorProcess::spawn`], calling `before_launch` once everything
    /// it reads from the API server has been read, right before the
    /// process starts (to freeze the API server under a starting operator).
    pub async fn spawn_with(
        plane: &ControlPlane,
        identity: &str,
        webhook_port: u16,
        extra_env: &[(&str, &str)],
        before_launch: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<OperatorProcess> {
        let dir = tempfile::Builder::new()
            .prefix("warren-operator-")
            .tempdir()?;
        let deployment: serde_json::Value = serde_json::from_str(&plane.kubectl_ok(&[
            "get",
            "deployment",
            RELEASE,
            "-n",
            NAMESPACE,
            "-o",
            "json",
        ])?)?;
        let mut env = chart_env(&deployment)?;
        // The chart mounts its ConfigMap at /etc/warren/; here it is a file.
        let injection = plane.kubectl_ok(&[
            "get",
            "configmap",
            &format!("{RELEASE}-injection"),
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.data.injection\\.yaml}",
        ])?;
        let injection_path = dir.path().join("injection.yaml");
        fs::write(&injection_path, injection)?;
        let account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .context("the chart's Deployment names no ServiceAccount")?
            .to_string();
        let kubeconfig = plane
            .service_account_kubeconfig(NAMESPACE, &account)
            .await?;
        let admin_port = reserve_port()?;
        env.insert(
            "WARREN_INJECTION_CONFIG".into(),
            injection_path.display().to_string(),
        );
        env.insert(
            "WARREN_ADMIN_LISTEN".into(),
            format!("127.0.0.1:{}", admin_port.port()),
        );
        env.insert(
            "WARREN_WEBHOOK_LISTEN".into(),
            format!("127.0.0.1:{webhook_port}"),
        );
        env.insert("POD_NAMESPACE".into(), NAMESPACE.into());
        env.insert("POD_NAME".into(), identity.into());
        env.insert("KUBECONFIG".into(), kubeconfig.display().to_string());
        for (k, v) in extra_env {
            env.insert((*k).into(), (*v).into());
        }
        let bin = workspace_bin("warren-operator", "warren-operator")?;
        let log = dir.path().join("operator.log");
        let out = fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        before_launch()?;
        let child = spawn_tied_to_process(cmd).context("starting warren-operator run")?;
        Ok(OperatorProcess {
            identity: identity.to_string(),
            child: Some(child),
            log,
            admin_port,
            _dir: dir,
        })
    }

    /// [`OperatorProcess::spawn`], then wait until `/healthz` answers.
    pub async fn start(
        plane: &ControlPlane,
        identity: &str,
        webhook_port: u16,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<OperatorProcess> {
        let mut op = Self::spawn(plane, identity, webhook_port, extra_env).await?;
        op.wait_healthy(Duration::from_secs(60)).await?;
        Ok(op)
    }

    /// `GET /readyz`: its status code and body.
    pub async fn readyz(&self) -> anyhow::Result<(u16, String)> {
        let r = reqwest::get(format!("{}/readyz", self.admin_url())).await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    /// SIGTERM, as the kubelet stops a container; waits up to `timeout`
    /// for the exit and returns how long it took and the exit status.
    pub fn terminate(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(Duration, std::process::ExitStatus)> {
        let mut child = self.child.take().context("the operator is not running")?;
        let started = Instant::now();
        // SAFETY: kill(2) on the pid of a child this process has not reaped.
        if unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) } != 0 {
            bail!("kill -TERM: {}", std::io::Error::last_os_error());
        }
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((started.elapsed(), status));
            }
            if started.elapsed() > timeout {
                child.kill()?;
                child.wait()?;
                bail!(
                    "warren-operator still running {timeout:?} after SIGTERM:\n{}",
                    tail_lines(&self.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/healthz", self.admin_port.port());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "warren-operator exited ({status}):\n{}",
                    tail_lines(&self.log, 40)
                );
            }
            if reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "warren-operator not healthy after {timeout:?}:\n{}",
                    tail_lines(&self.log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its Lease identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The admin endpoint (`http://127.0.0.1:<port>`).
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port.port())
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.log, n)
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "warren-testkit: test panicked; log of warren-operator {}:\n{}",
                self.identity,
                tail_lines(&self.log, 60)
            );
        }
        let _ = self.kill9();
    }
}

/// The `value` environment variables of the first container of a
/// Deployment (those from `valueFrom` are the caller's to set).
fn chart_env(deployment: &serde_json::Value) -> anyhow::Result<BTreeMap<String, String>> {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .context("Deployment without containers")?;
    let env = containers
        .first()
        .and_then(|c| c["env"].as_array())
        .context("the operator container has no env")?;
    Ok(env
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect())
}
