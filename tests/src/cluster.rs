//! A private Kubernetes control plane, one per test: etcd, kube-apiserver and
//! kube-controller-manager as child processes, the way controller-runtime's
//! envtest runs one.
//!
//! Warren is used through `helm install`, `kubectl apply` and annotated
//! workloads, so its Kubernetes side is proven against a real API server:
//! real admission (CEL rules, the webhook, Pod validation), real RBAC, real
//! watches, real controllers turning a Deployment into Pods. There is no
//! kubelet and no scheduler: Pods are admitted, mutated, validated and
//! stored, and stay Pending.
//!
//! Each [`ControlPlane`] has
//! - its own ports (etcd client and peer, the API server's secure port) and
//!   temp dir (etcd data, certificates, kubeconfigs, logs, helm's state);
//! - a throw-away CA made with `rcgen` that signs the API server's serving
//!   certificate and the admin's client certificate (`warren-admin` in group
//!   `system:masters`), and a service-account signing key;
//! - `--authorization-mode=Node,RBAC`, so a client authenticated as a
//!   ServiceAccount ([`ControlPlane::service_account_kubeconfig`], a
//!   TokenRequest token) has exactly the permissions RBAC grants it.
//!
//! The binaries come from `scripts/k8s-build` (built from source through the
//! Go module proxy and cached per machine), kubectl and helm from
//! `scripts/k8s-tools`; `WARREN_K8S_BIN_DIR` and `WARREN_K8S_TOOLS_DIR` point
//! at them, and without those variables the scripts are run (instant when
//! cached).
//!
//! Like [`crate::RabbitNode`], lifecycle calls block, and the processes are
//! tied to the test process (`PR_SET_PDEATHSIG`) and killed by pid on drop.
//! [`ControlPlane::start_detached`] is the variant behind `scripts/cluster
//! up`: processes in their own session that outlive the caller, stopped by
//! [`stop_detached`] from the pids it recorded.

use std::fmt;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tempfile::TempDir;

use crate::node::spawn_tied_to_process;
use crate::operator::repo_root;
use crate::ports::{PortReservation, reserve_port};
use crate::tls::write_private;

/// How long the API server may take to answer `/readyz` ok. It takes 5-10 s
/// on an idle 2-core machine; much longer while test binaries compile.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The controllers kube-controller-manager runs: what turns workloads into
/// Pods and Jobs, cleans up after owners and namespaces, and gives every
/// namespace its `default` ServiceAccount, tokens and `kube-root-ca.crt`.
pub const CONTROLLERS: &[&str] = &[
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "job-controller",
    "ttl-after-finished-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "persistentvolumeclaim-protection-controller",
    "root-ca-certificate-publisher-controller",
];

/// The Service CIDR of the control plane (no proxy implements it).
const SERVICE_CIDR: &str = "10.0.0.0/24";

/// The process names, in start order.
const ETCD: &str = "etcd";
const APISERVER: &str = "kube-apiserver";
const CONTROLLER_MANAGER: &str = "kube-controller-manager";

/// One child process of the control plane.
struct Proc {
    /// `etcd`, `kube-apiserver` or `kube-controller-manager`.
    name: &'static str,
    /// The process while not reaped; `None` for a detached start.
    child: Option<Child>,
    /// Its pid.
    pid: u32,
    /// Where its stdout and stderr go.
    log: PathBuf,
}

/// The reserved ports, held for the control plane's life.
struct Ports {
    etcd_client: PortReservation,
    etcd_peer: PortReservation,
    apiserver: PortReservation,
}

/// A private Kubernetes control plane; see the module docs.
pub struct ControlPlane {
    /// Certificates, data, logs, kubeconfigs; `None` once detached.
    dir: Option<TempDir>,
    /// The same path, also valid for a detached plane.
    root: PathBuf,
    /// Directory of kube-apiserver, kube-controller-manager and etcd.
    bins: PathBuf,
    /// Directory of kubectl and helm.
    tools: PathBuf,
    /// Reserved ports (released when the plane is dropped).
    ports: Ports,
    /// The processes, in start order.
    procs: Vec<Proc>,
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server", &self.server_url())
            .field("dir", &self.root)
            .field(
                "pids",
                &self
                    .procs
                    .iter()
                    .map(|p| (p.name, p.pid))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A directory named by `var`, else the last line `script` prints (the
/// scripts print their cache directory, building it first if needed).
fn dir_from(var: &str, script: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(var) {
        return Ok(PathBuf::from(dir));
    }
    let path = repo_root().join("scripts").join(script);
    let out = Command::new("bash")
        .arg(&path)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}); set {var} to skip it",
            path.display(),
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout.lines().last().unwrap_or_default().trim();
    anyhow::ensure!(!dir.is_empty(), "{} printed no directory", path.display());
    Ok(PathBuf::from(dir))
}

/// The directory of the control-plane binaries (`WARREN_K8S_BIN_DIR`, else
/// `scripts/k8s-build`).
pub fn k8s_bin_dir() -> anyhow::Result<PathBuf> {
    dir_from("WARREN_K8S_BIN_DIR", "k8s-build")
}

/// The directory of kubectl and helm (`WARREN_K8S_TOOLS_DIR`, else
/// `scripts/k8s-tools`).
pub fn k8s_tools_dir() -> anyhow::Result<PathBuf> {
    dir_from("WARREN_K8S_TOOLS_DIR", "k8s-tools")
}

/// The CA, the API server's serving certificate, the admin's client
/// certificate and the service-account key pair, as files in `pki`.
fn write_pki(pki: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(pki)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "warren control plane CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    write_private(&pki.join("ca.crt"), &ca_cert.pem())?;
    let issuer = Issuer::new(ca, ca_key);

    // The API server answers on 127.0.0.1 and, for in-cluster clients, as
    // the `kubernetes` Service (its first address in the Service CIDR).
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
    ])?;
    server
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    server
        .subject_alt_names
        .push(SanType::IpAddress([10, 0, 0, 1].into()));
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer)?;
    write_private(&pki.join("apiserver.crt"), &server_cert.pem())?;
    write_private(&pki.join("apiserver.key"), &server_key.serialize_pem())?;

    // The client certificate's CN is the user name, its O the groups.
    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin
        .distinguished_name
        .push(DnType::CommonName, "warren-admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &issuer)?;
    write_private(&pki.join("admin.crt"), &admin_cert.pem())?;
    write_private(&pki.join("admin.key"), &admin_key.serialize_pem())?;

    let sa_key = KeyPair::generate()?;
    write_private(&pki.join("sa.key"), &sa_key.serialize_pem())?;
    write_private(&pki.join("sa.pub"), &sa_key.public_key_pem())?;
    Ok(())
}

/// A kubeconfig for `server` that trusts `ca` and authenticates with
/// `user` (a `users[].user` mapping as YAML lines, indented by 4).
fn kubeconfig(server: &str, ca: &Path, user: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: warren\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n\
         - name: user\n  user:\n{user}\
         contexts:\n\
         - name: warren\n  context:\n    cluster: warren\n    user: user\n    namespace: default\n\
         current-context: warren\n",
        ca = ca.display(),
    )
}

impl ControlPlane {
    /// Start etcd, kube-apiserver and kube-controller-manager, tied to this
    /// process, and wait until the API server is ready and the controllers
    /// run (the `default` ServiceAccount exists). Blocks for 10-30 s.
    pub fn start() -> anyhow::Result<ControlPlane> {
        let mut plane = ControlPlane::prepare(None)?;
        plane.boot(false)?;
        Ok(plane)
    }

    /// Like [`ControlPlane::start`], but in `dir` (created) and with the
    /// processes in their own session, so they outlive this process; their
    /// pids go to `dir/pids` for [`stop_detached`]. Returns the admin
    /// kubeconfig's path.
    pub fn start_detached(dir: &Path) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut plane = ControlPlane::prepare(Some(dir))?;
        let booted = plane.boot(true);
        if let Err(e) = booted {
            let tails = plane.log_tails();
            plane.kill_all();
            return Err(e.context(tails));
        }
        let pids: String = plane
            .procs
            .iter()
            .map(|p| format!("{} {}\n", p.pid, p.name))
            .collect();
        fs::write(dir.join("pids"), pids)?;
        let kubeconfig = plane.kubeconfig();
        // Nothing to kill or remove on drop any more.
        plane.procs.clear();
        Ok(kubeconfig)
    }

    fn prepare(dir: Option<&Path>) -> anyhow::Result<ControlPlane> {
        let bins = k8s_bin_dir()?;
        let tools = k8s_tools_dir()?;
        for bin in [ETCD, APISERVER, CONTROLLER_MANAGER] {
            anyhow::ensure!(
                bins.join(bin).exists(),
                "{} not found in {} (scripts/k8s-build builds it)",
                bin,
                bins.display()
            );
        }
        let (dir, root) = match dir {
            Some(d) => (None, d.to_path_buf()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("warren-k8s-")
                    .tempdir()
                    .context("creating the control plane's temp dir")?;
                let root = t.path().to_path_buf();
                (Some(t), root)
            }
        };
        let ports = Ports {
            etcd_client: reserve_port()?,
            etcd_peer: reserve_port()?,
            apiserver: reserve_port()?,
        };
        write_pki(&root.join("pki"))?;
        let plane = ControlPlane {
            dir,
            root,
            bins,
            tools,
            ports,
            procs: Vec::new(),
        };
        let pki = plane.root.join("pki");
        let user = format!(
            "    client-certificate: {}\n    client-key: {}\n",
            pki.join("admin.crt").display(),
            pki.join("admin.key").display()
        );
        fs::write(
            plane.kubeconfig(),
            kubeconfig(&plane.server_url(), &pki.join("ca.crt"), &user),
        )?;
        Ok(plane)
    }

    fn boot(&mut self, detached: bool) -> anyhow::Result<()> {
        let etcd = self.etcd_command();
        self.spawn(ETCD, etcd, detached)?;
        let apiserver = self.apiserver_command();
        self.spawn(APISERVER, apiserver, detached)?;
        self.wait_ready()
            .with_context(|| format!("kube-apiserver on port {}", self.ports.apiserver.port()))?;
        let kcm = self.controller_manager_command();
        self.spawn(CONTROLLER_MANAGER, kcm, detached)?;
        // The serviceaccount controller gives `default` its ServiceAccount:
        // proof that kube-controller-manager runs and reaches the API server.
        self.wait_for(READY_TIMEOUT, "the default ServiceAccount", |plane| {
            plane
                .kubectl()
                .args(["get", "serviceaccount", "default", "-n", "default"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .context("kube-controller-manager")?;
        tracing::info!(server = %self.server_url(), dir = %self.root.display(), "control plane ready");
        Ok(())
    }

    fn etcd_command(&self) -> Command {
        let client = format!("http://127.0.0.1:{}", self.ports.etcd_client.port());
        let peer = format!("http://127.0.0.1:{}", self.ports.etcd_peer.port());
        let mut cmd = Command::new(self.bins.join(ETCD));
        cmd.arg("--name=warren")
            .arg(format!("--data-dir={}", self.root.join("etcd").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=warren={peer}"))
            // A test cluster is thrown away; fsync would only slow it down.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        cmd
    }

    fn apiserver_command(&self) -> Command {
        let pki = self.root.join("pki");
        let p = |f: &str| pki.join(f).display().to_string();
        let port = self.ports.apiserver.port();
        let mut cmd = Command::new(self.bins.join(APISERVER));
        cmd.arg(format!(
            "--etcd-servers=http://127.0.0.1:{}",
            self.ports.etcd_client.port()
        ))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={port}"))
        .arg("--advertise-address=127.0.0.1")
        .arg(format!(
            "--cert-dir={}",
            self.root.join("apiserver").display()
        ))
        .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
        .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
        .arg(format!("--client-ca-file={}", p("ca.crt")))
        .arg("--authorization-mode=Node,RBAC")
        .arg("--service-account-issuer=https://kubernetes.default.svc")
        .arg(format!("--service-account-key-file={}", p("sa.pub")))
        .arg(format!(
            "--service-account-signing-key-file={}",
            p("sa.key")
        ))
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
        .arg("--allow-privileged=true")
        // The `kubernetes` Service's endpoint would be 127.0.0.1, which
        // endpoint validation refuses; nothing in the tests needs it.
        .arg("--endpoint-reconciler-type=none")
        .arg("--profiling=false")
        .arg("--v=1");
        cmd
    }

    fn controller_manager_command(&self) -> Command {
        let pki = self.root.join("pki");
        let mut cmd = Command::new(self.bins.join(CONTROLLER_MANAGER));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig().display()))
            .arg(format!(
                "--service-account-private-key-file={}",
                pki.join("sa.key").display()
            ))
            .arg(format!("--root-ca-file={}", pki.join("ca.crt").display()))
            .arg(format!("--controllers={}", CONTROLLERS.join(",")))
            .arg("--leader-elect=false")
            // Nothing scrapes it; not serving avoids one more port.
            .arg("--secure-port=0")
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            // Owner-less clean-up and resyncs as fast as tests want them.
            .arg("--concurrent-gc-syncs=5")
            .arg("--v=1");
        cmd
    }

    fn spawn(
        &mut self,
        name: &'static str,
        mut cmd: Command,
        detached: bool,
    ) -> anyhow::Result<()> {
        let logs = self.root.join("logs");
        fs::create_dir_all(&logs)?;
        let log = logs.join(format!("{name}.log"));
        let out = fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .current_dir(&self.root);
        let child = if detached {
            // SAFETY: setsid is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            cmd.spawn()
        } else {
            spawn_tied_to_process(cmd)
        }
        .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        tracing::debug!(name, pid, "control plane process started");
        self.procs.push(Proc {
            name,
            child: Some(child),
            pid,
            log,
        });
        Ok(())
    }

    /// Poll `cond` every 200 ms until it holds; fail early, with the logs'
    /// tails, when a process of the plane has exited.
    fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        mut cond: impl FnMut(&ControlPlane) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return Ok(());
            }
            for p in &mut self.procs {
                if let Some(child) = &mut p.child
                    && let Ok(Some(status)) = child.try_wait()
                {
                    p.child = None;
                    bail!(
                        "{} exited ({status}) while waiting for {what}:\n{}",
                        p.name,
                        crate::node::tail_lines(&p.log, 30)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}:\n{}", self.log_tails());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        self.wait_for(READY_TIMEOUT, "/readyz", |plane| {
            plane
                .kubectl()
                .args(["get", "--raw", "/readyz"])
                .stderr(Stdio::null())
                .output()
                .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"ok"))
        })
    }

    /// The API server's URL, `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.apiserver.port())
    }

    /// The control plane's directory (certificates, logs, kubeconfigs).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The admin's kubeconfig (client certificate, `system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.root.join("kubeconfig")
    }

    /// The CA that signed the API server's certificate, PEM file.
    pub fn ca_path(&self) -> PathBuf {
        self.root.join("pki").join("ca.crt")
    }

    /// Directory of kubectl and helm.
    pub fn tools_dir(&self) -> &Path {
        &self.tools
    }

    /// `kubectl` as the admin.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.tools.join("kubectl"));
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.root.join("home"))
            .stdin(Stdio::null());
        cmd
    }

    /// `helm` as the admin, with its cache, config and data in the plane's
    /// dir (nothing read from or written to the user's).
    pub fn helm(&self) -> Command {
        let home = self.root.join("helm");
        let mut cmd = Command::new(self.tools.join("helm"));
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .stdin(Stdio::null());
        cmd
    }

    /// `bash -c SCRIPT` in the repository, as a reader runs a documented
    /// command against this plane: the plane's kubectl and helm first on
    /// `PATH`, and `KUBECONFIG`, `HOME` and helm's homes as [`Self::kubectl`]
    /// and [`Self::helm`] set them.
    pub fn shell(&self, script: &str) -> Command {
        let home = self.root.join("helm");
        let path = match std::env::var_os("PATH") {
            Some(p) => {
                let mut dirs = vec![self.tools.clone()];
                dirs.extend(std::env::split_paths(&p));
                std::env::join_paths(dirs).unwrap_or(p)
            }
            None => self.tools.clone().into_os_string(),
        };
        let mut cmd = crate::docs::bash(script);
        cmd.env("PATH", path)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.root.join("home"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// Run [`Self::shell`] of `script`; its stdout, or an error with its
    /// stderr.
    pub fn shell_ok(&self, script: &str) -> anyhow::Result<String> {
        run(&mut self.shell(script), "bash -c", &[script])
    }

    /// Run `kubectl ARGS` as the admin; its stdout, or an error with its
    /// stderr (the API server's own words).
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        run(self.kubectl().args(args), "kubectl", args)
    }

    /// `kubectl apply` of `yaml` as the admin (server-side validation,
    /// strict field validation); its stdout, or an error with the API
    /// server's words.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<String> {
        let path = tempfile::Builder::new()
            .prefix("apply-")
            .suffix(".yaml")
            .tempfile_in(&self.root)?;
        fs::write(path.path(), yaml)?;
        let file = path.path().to_str().context("temp path")?;
        self.kubectl_ok(&["apply", "-f", file])
    }

    /// Run `helm ARGS` as the admin; its stdout, or an error with its stderr.
    pub fn helm_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        run(self.helm().args(args), "helm", args)
    }

    /// A kube-rs client for the admin.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        client_from(&self.kubeconfig()).await
    }

    /// A kubeconfig that authenticates as ServiceAccount `namespace/name`
    /// with a token from the TokenRequest API (valid for a day), so that a
    /// process using it has exactly the permissions RBAC grants the
    /// ServiceAccount. Written into the plane's dir; returns its path.
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<PathBuf> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        use k8s_openapi::api::core::v1::ServiceAccount;
        use kube::api::{Api, PostParams};

        let api: Api<ServiceAccount> = Api::namespaced(self.client().await?, namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(24 * 3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer: TokenRequest = api
            .create_subresource("token", name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for ServiceAccount {namespace}/{name}"))?;
        let token = answer
            .status
            .and_then(|s| s.token)
            .context("TokenRequest answered without a token")?;
        let token_file = self.root.join(format!("token-{namespace}-{name}"));
        write_private(&token_file, &token)?;
        let path = self.root.join(format!("kubeconfig-{namespace}-{name}"));
        let user = format!("    tokenFile: {}\n", token_file.display());
        write_private(
            &path,
            &kubeconfig(&self.server_url(), &self.ca_path(), &user),
        )?;
        Ok(path)
    }

    /// A kube-rs client authenticated as ServiceAccount `namespace/name`
    /// (see [`ControlPlane::service_account_kubeconfig`]).
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<kube::Client> {
        let path = self.service_account_kubeconfig(namespace, name).await?;
        client_from(&path).await
    }

    /// The last lines of every process's log.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for p in &self.procs {
            out.push_str(&format!(
                "--- {} (pid {}) {}:\n{}",
                p.name,
                p.pid,
                p.log.display(),
                crate::node::tail_lines(&p.log, 20)
            ));
        }
        out
    }

    /// Pids of the plane's processes by name.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.procs.iter().map(|p| (p.name, p.pid)).collect()
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to one of
    /// the control plane's processes: `etcd`, `kube-apiserver` or
    /// `kube-controller-manager`.
    pub fn signal(&self, name: &str, signal: i32) -> anyhow::Result<()> {
        let p = self
            .procs
            .iter()
            .find(|p| p.name == name && p.child.is_some())
            .with_context(|| format!("no running {name}"))?;
        // SAFETY: the child is not reaped yet, so its pid is ours.
        if unsafe { libc::kill(p.pid as libc::pid_t, signal) } != 0 {
            anyhow::bail!("kill {signal} {name}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn kill_all(&mut self) {
        // The controller manager first, etcd last: nobody logs a storm of
        // connection errors on the way down.
        for p in self.procs.iter_mut().rev() {
            if let Some(mut child) = p.child.take() {
                // SAFETY: the child is not reaped yet, so its pid is ours.
                unsafe {
                    libc::kill(p.pid as libc::pid_t, libc::SIGKILL);
                }
                let _ = child.wait();
            }
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if self.procs.is_empty() {
            return; // detached, or never started
        }
        if std::thread::panicking() {
            eprintln!(
                "warren-testkit: test panicked; control plane logs:\n{}",
                self.log_tails()
            );
        }
        self.kill_all();
        if std::env::var_os("WARREN_TESTKIT_KEEP_DIRS").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!(
                "warren-testkit: keeping the control plane dir {}",
                dir.keep().display()
            );
        }
    }
}

/// Stop a control plane started by [`ControlPlane::start_detached`] in
/// `dir`: SIGTERM to each recorded pid that is still one of its processes,
/// SIGKILL after 10 s, then remove `dir`. Returns the processes stopped.
pub fn stop_detached(dir: &Path) -> anyhow::Result<Vec<String>> {
    let pids_file = dir.join("pids");
    let text = match fs::read_to_string(&pids_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no control plane in {} (no pids file)", dir.display())
        }
        Err(e) => return Err(e).context(format!("reading {}", pids_file.display())),
    };
    let mut stopped = Vec::new();
    let mut alive = Vec::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(pid), Some(name)) = (parts.next(), parts.next()) else {
            continue;
        };
        let pid: libc::pid_t = pid.parse().context("pid in the pids file")?;
        // Only signal a pid that still runs one of our binaries: the pid
        // may have been reused since.
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe.file_name().and_then(|n| n.to_str()) != Some(name) {
            continue;
        }
        // SAFETY: plain signal to a process checked above.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        alive.push(pid);
        stopped.push(format!("{name} (pid {pid})"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && alive
            .iter()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in alive {
        if Path::new(&format!("/proc/{pid}")).exists() {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(stopped)
}

async fn client_from(path: &Path) -> anyhow::Result<kube::Client> {
    // rustls is built with two providers here, so it has no process default
    // unless one is installed; kube's client asks for the default.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let config = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
            .await
            .context("kubeconfig")?;
    Ok(kube::Client::try_from(config)?)
}

fn run(cmd: &mut Command, tool: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {tool} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{tool} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
