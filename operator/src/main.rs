use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;

use clap::{Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use warren_crds::error_chain::error_chain;
use warren_operator::apply::Broker;
use warren_operator::broker_url::BrokerUrl;
use warren_operator::controller::Scope;
use warren_operator::inject::InjectionConfig;
use warren_operator::manifests::Manifests;
use warren_operator::plan;

/// warren-operator: ReliableQueue and RetryPolicy resources reconciled into
/// RabbitMQ topology.
#[derive(Debug, Parser)]
#[command(name = "warren-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How long SIGTERM waits for running reconciles and for the Lease to be
/// given up.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// A flag's value that `Debug` does not show.
fn secret(s: &str) -> Result<SecretString, String> {
    Ok(s.into())
}

/// Flags take durations in the same grammar as manifests and config files
/// (`500ms`, `4s`, `1m30s`).
fn duration(s: &str) -> Result<Duration, String> {
    s.parse::<warren_crds::duration::HumanDuration>()
        .map(Duration::from)
        .map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the controller in Kubernetes (in-cluster or KUBECONFIG config),
    /// with leader election so that several replicas are safe.
    Run {
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, env = "WARREN_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
        admin_listen: SocketAddr,
        /// Re-check interval of a ready ReliableQueue (repairs drift).
        #[arg(long, env = "WARREN_RESYNC", value_parser = duration, default_value = "60s")]
        resync: Duration,
        /// Retry interval of a ReliableQueue that is not ready.
        #[arg(long, env = "WARREN_RETRY", value_parser = duration, default_value = "10s")]
        retry: Duration,
        /// Namespace of the leader-election Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// This replica's identity in the Lease.
        #[arg(long, env = "POD_NAME", default_value = "warren-operator")]
        identity: String,
        /// Namespaces to work in (comma-separated); empty: every namespace.
        /// The chart's `watchNamespaces` sets it and grants namespaced Roles
        /// in those namespaces only.
        #[arg(long, env = "WARREN_WATCH_NAMESPACES", default_value = "")]
        watch_namespaces: String,
        #[command(flatten)]
        webhook: WebhookArgs,
    },
    /// Prints the documents of FILEs with the sidecar injected into the
    /// Pods, Deployments and StatefulSets labelled (or annotated)
    /// `warren.dev/inject: enabled`, exactly as the webhook injects it (the
    /// ReliableQueues and RetryPolicies they name come from the same
    /// files). A workload opted in by the annotation alone gets the label
    /// too (the webhook sees labelled pods only), and stderr says so. Exit
    /// status 1, and nothing printed, when one cannot be injected.
    Inject {
        /// YAML files; documents of other kinds are printed unchanged.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Injection settings (image, resources, outbox claims), as the
        /// chart's ConfigMap holds them; default: built-in defaults.
        #[arg(long, env = "WARREN_INJECTION_CONFIG")]
        injection_config: Option<PathBuf>,
    },
    /// Writes the CRD manifests (`reliablequeue.yaml`, `retrypolicy.yaml`).
    Crdgen {
        /// Directory to write into; without it, print them to stdout.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Plans and applies the topology of the ReliableQueues in FILEs against
    /// a broker, without Kubernetes (RetryPolicies come from the same
    /// files). Idempotent; prints what it changed. Exit status 1 when
    /// something could not be made to match.
    Apply {
        /// YAML files with ReliableQueue and RetryPolicy documents (other
        /// kinds are skipped).
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// amqp:// or amqps:// URL; its credentials are used for the
        /// management API.
        #[arg(long, env = "WARREN_BROKER_URL", hide_env_values = true, value_parser = secret)]
        broker_url: SecretString,
        /// Management API URL; default: the broker's host on port 15672,
        /// or https:// on port 15671 for an amqps:// broker URL (or port
        /// 5671). Plain http:// is refused for such a broker.
        #[arg(long, env = "WARREN_MANAGEMENT_URL")]
        management_url: Option<String>,
        /// PEM file of the CA(s) an https:// management API's certificate
        /// must chain to; default: the system's roots.
        #[arg(long, env = "WARREN_CA_CERT")]
        ca_cert: Option<PathBuf>,
    },
}

/// The admission webhook's flags (`run`).
#[derive(Debug, clap::Args)]
struct WebhookArgs {
    /// HTTPS address of the sidecar injection webhook (`POST /mutate`).
    #[arg(long, env = "WARREN_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    webhook_listen: SocketAddr,
    /// Directory with `tls.crt` and `tls.key` (e.g. a cert-manager
    /// Certificate's Secret), re-read when they change. Without it the
    /// operator makes its own CA and certificate and patches the CA into
    /// the MutatingWebhookConfiguration.
    #[arg(long, env = "WARREN_WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<PathBuf>,
    /// The webhook Service (the certificate's DNS names).
    #[arg(long, env = "WARREN_WEBHOOK_SERVICE", default_value = "warren-webhook")]
    webhook_service: String,
    /// The MutatingWebhookConfiguration whose caBundle the operator keeps.
    #[arg(long, env = "WARREN_WEBHOOK_CONFIG", default_value = "warren")]
    webhook_config: String,
    /// Injection settings (sidecar image, resources, outbox claims).
    #[arg(
        long,
        env = "WARREN_INJECTION_CONFIG",
        default_value = "/etc/warren/injection.yaml"
    )]
    injection_config: PathBuf,
    /// How often the leader checks outbox claims (drains idle ones, shrinks
    /// pools).
    #[arg(long, env = "WARREN_POOL_INTERVAL", value_parser = duration, default_value = "30s")]
    pool_interval: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The workspace builds rustls with both ring and aws-lc-rs, so rustls
    // cannot pick a process default by itself, and kube's client (which
    // asks for the default) would panic at its first TLS connection.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Run {
            admin_listen,
            resync,
            retry,
            lease_namespace,
            identity,
            watch_namespaces,
            webhook,
        } => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                rt.block_on(run(
                    admin_listen,
                    resync,
                    retry,
                    lease_namespace,
                    identity,
                    Scope::parse(&watch_namespaces),
                    webhook,
                ))
            })
            .map(|()| ExitCode::SUCCESS),
        Command::Crdgen { out_dir: Some(dir) } => {
            warren_operator::crdgen::write(&dir).map(|()| ExitCode::SUCCESS)
        }
        Command::Crdgen { out_dir: None } => {
            for (_, yaml) in warren_operator::crdgen::crds() {
                print!("---\n{yaml}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inject {
            files,
            injection_config,
        } => inject(&files, injection_config.as_deref()),
        Command::Apply {
            files,
            broker_url,
            management_url,
            ca_cert,
        } => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(apply(files, broker_url, management_url, ca_cert))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn inject(files: &[PathBuf], config: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let config = match config {
        Some(path) => {
            anyhow::ensure!(path.exists(), "no injection config at {}", path.display());
            InjectionConfig::load(path)?
        }
        None => InjectionConfig::default(),
    };
    let out = warren_operator::inject_files::inject_files(files, &config)?;
    print!("{}", out.yaml);
    for workload in &out.injected {
        eprintln!("{workload}: sidecar injected");
    }
    for workload in &out.labelled {
        eprintln!(
            "{workload}: opted in by annotation only; labelled warren.dev/inject=enabled, as the webhook sees only labelled pods"
        );
    }
    if out.injected.is_empty() {
        eprintln!("nothing labelled or annotated warren.dev/inject: enabled");
    }
    Ok(ExitCode::SUCCESS)
}

async fn apply(
    files: Vec<PathBuf>,
    broker_url: SecretString,
    management_url: Option<String>,
    ca_cert: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let manifests = Manifests::read(&files)?;
    for kind in &manifests.skipped {
        eprintln!("skipped {kind}");
    }
    anyhow::ensure!(
        !manifests.queues.is_empty(),
        "no ReliableQueue in {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let url = BrokerUrl::parse(broker_url.expose_secret()).map_err(anyhow::Error::msg)?;
    let management_url = warren_operator::apply::management_url(management_url.as_deref(), &url)?;
    let ca = match &ca_cert {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading --ca-cert {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let broker = Broker::with_ca(
        &management_url,
        &url.username,
        url.password.expose_secret(),
        ca.as_deref(),
    )?;
    broker.ping().await?;
    let mut failed = false;
    for rq in &manifests.queues {
        let name = rq.metadata.name.clone().unwrap_or_default();
        let policy = match &rq.spec.retry_policy_ref {
            Some(r) => match manifests.policies.get(r) {
                Some(p) => p.spec.clone(),
                None => {
                    println!("ReliableQueue {name}: RetryPolicy {r:?} is not in the given files");
                    failed = true;
                    continue;
                }
            },
            None => Default::default(),
        };
        let topology = match plan::plan(&rq.queue_name(), &rq.spec, &policy) {
            Ok(t) => t,
            Err(e) => {
                println!("ReliableQueue {name}: {e}");
                failed = true;
                continue;
            }
        };
        let report = broker.apply(&topology).await?;
        if report.changes.is_empty() && report.conflicts.is_empty() {
            println!("ReliableQueue {name}: unchanged");
        }
        for c in &report.changes {
            println!("ReliableQueue {name}: {c}");
        }
        for n in &report.notes {
            println!("ReliableQueue {name}: note: {n}");
        }
        for c in &report.conflicts {
            println!("ReliableQueue {name}: CONFLICT {c}");
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// SIGTERM (the operator is PID 1 in its image) or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGTERM; only SIGINT stops the operator");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// What `/readyz` waits for: the webhook's certificate, and on the leader
/// the controller's caches.
#[derive(Default)]
struct Readiness {
    certificate: AtomicBool,
    leader: AtomicBool,
    synced: Arc<AtomicBool>,
}

impl Readiness {
    /// `Ok` when ready, else what is missing.
    fn check(&self) -> Result<(), &'static str> {
        if !self.certificate.load(Ordering::SeqCst) {
            return Err("the webhook certificate is not loaded yet");
        }
        if self.leader.load(Ordering::SeqCst) && !self.synced.load(Ordering::SeqCst) {
            return Err("the controller's caches have not synced yet");
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    admin_listen: SocketAddr,
    resync: Duration,
    retry: Duration,
    lease_namespace: String,
    identity: String,
    scope: Scope,
    webhook: WebhookArgs,
) -> anyhow::Result<()> {
    use kube::runtime::events::{Recorder, Reporter};
    use kube_lease_manager::LeaseManagerBuilder;
    use warren_operator::controller::{self, Context};
    use warren_operator::metrics::Metrics;

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let injection = InjectionConfig::load(&webhook.injection_config)?;
    let readiness = Arc::new(Readiness::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        terminated().await;
        tracing::info!("terminating");
        let _ = stop_tx.send(true);
    });
    let stopped = {
        let stop_rx = stop_rx.clone();
        move || {
            let mut stop = stop_rx.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        }
    };

    // Liveness first: /healthz answers while the rest starts; /readyz
    // says what it waits for.
    let admin = {
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route(
                "/readyz",
                axum::routing::get(move || {
                    let readiness = readiness.clone();
                    async move {
                        match readiness.check() {
                            Ok(()) => (axum::http::StatusCode::OK, "ok"),
                            Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why),
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let metrics = metrics.clone();
                    async move { metrics.encode() }
                }),
            )
    };
    let listener = tokio::net::TcpListener::bind(admin_listen).await?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, admin).await;
    });

    // Every replica answers admissions; only the leader reconciles.
    let injector = Arc::new(warren_operator::admission::PodInjector::new(
        client.clone(),
        injection.clone(),
    ));
    let handler: warren_operator::webhook::Handler = Arc::new(move |request, object| {
        let injector = injector.clone();
        Box::pin(async move { injector.admit(request, object).await })
    });
    let _webhook = tokio::select! {
        started = warren_operator::webhook::start_webhook(
            warren_operator::webhook::WebhookSettings::new(
                webhook.webhook_listen,
                webhook.webhook_cert_dir.clone(),
                webhook.webhook_service.clone(),
                lease_namespace.clone(),
                webhook.webhook_config.clone(),
            ),
            client.clone(),
            handler,
        ) => started?,
        () = stopped() => return Ok(()),
    };
    readiness.certificate.store(true, Ordering::SeqCst);
    let pool_interval = webhook.pool_interval;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "warren-operator".into(),
            instance: Some(identity.clone()),
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder,
        metrics: metrics.clone(),
        requeue: resync,
        retry,
    });
    let manager = LeaseManagerBuilder::new(client.clone(), "warren-operator")
        .with_namespace(lease_namespace)
        .with_identity(identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await?;
    let (mut leader, lease_task) = manager.watch().await;
    tracing::info!("warren-operator started; waiting for the leader lease");
    loop {
        let stop_now = loop {
            if *leader.borrow_and_update() {
                break false;
            }
            tokio::select! {
                changed = leader.changed() => changed?,
                () = stopped() => break true,
            }
        };
        if stop_now {
            break;
        }
        tracing::info!("leader lease acquired; reconciling");
        metrics.leader.set(1);
        readiness.synced.store(false, Ordering::SeqCst);
        readiness.leader.store(true, Ordering::SeqCst);
        // The leader's work ends when the lease is lost or on SIGTERM.
        let mut watch = leader.clone();
        let stop_signal = stopped();
        let end = async move {
            let lost = async move {
                while watch.changed().await.is_ok() {
                    if !*watch.borrow() {
                        break;
                    }
                }
            };
            tokio::select! {
                () = lost => {}
                () = stop_signal => {}
            }
        }
        .shared();
        let keeper = warren_operator::pool::PoolKeeper {
            client: client.clone(),
            config: injection.clone(),
            scope: scope.clone(),
        };
        // The outbox claim keeper runs beside the controller, as long as
        // the lease is held.
        let keeper = tokio::spawn(keeper.run(pool_interval, end.clone()));
        // The RetryPolicy controller runs beside the ReliableQueue
        // controller and stops with it.
        let work = futures::future::join(
            controller::run(
                client.clone(),
                ctx.clone(),
                scope.clone(),
                readiness.synced.clone(),
                end.clone(),
            ),
            warren_operator::retry_policy::run(client.clone(), ctx.clone(), scope.clone(), end),
        )
        .map(drop);
        let stop_signal = stopped();
        tokio::select! {
            () = work => {}
            // A reconcile stuck on an unresponsive broker does not hold up
            // the exit: it is abandoned (the next leader repeats it).
            () = async move {
                stop_signal.await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => tracing::warn!("reconciles still running at shutdown; abandoned"),
        }
        keeper.abort();
        let _ = keeper.await;
        metrics.leader.set(0);
        readiness.leader.store(false, Ordering::SeqCst);
        if *stop_rx.borrow() {
            break;
        }
        tracing::warn!("leader lease lost; standing by");
    }
    // Dropping the last receiver makes the lease manager give the Lease
    // up at once, so another replica takes over without waiting for it to
    // expire.
    drop(leader);
    match tokio::time::timeout(SHUTDOWN_GRACE, lease_task).await {
        Ok(Ok(Ok(_))) => tracing::info!("leader lease released"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the leader lease failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the lease task failed"),
        Err(_) => tracing::warn!("releasing the leader lease timed out"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_url_flag_never_shows_its_password() {
        let cli = Cli::parse_from([
            "warren-operator",
            "apply",
            "-f",
            "queues.yaml",
            "--broker-url=amqp://app:Hunter2%2F%40%3A@rabbit:5672/%2f",
        ]);
        for text in [format!("{cli:?}"), format!("{cli:#?}")] {
            assert!(!text.contains("Hunter2"), "{text}");
        }
    }
}
