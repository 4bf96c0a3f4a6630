use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use warren_operator::apply::Broker;
use warren_operator::manifests::{BrokerUrl, Manifests};
use warren_operator::plan;

/// warren-operator: ReliableQueue and RetryPolicy resources reconciled into
/// RabbitMQ topology.
#[derive(Debug, Parser)]
#[command(name = "warren-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
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
        #[arg(long, env = "WARREN_BROKER_URL", hide_env_values = true)]
        broker_url: String,
        /// Management API URL; default: the broker's host on port 15672.
        #[arg(long, env = "WARREN_MANAGEMENT_URL")]
        management_url: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            admin_listen,
            resync,
            retry,
            lease_namespace,
            identity,
        } => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run(admin_listen, resync, retry, lease_namespace, identity)))
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
        Command::Apply {
            files,
            broker_url,
            management_url,
        } => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(apply(files, broker_url, management_url))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn apply(
    files: Vec<PathBuf>,
    broker_url: String,
    management_url: Option<String>,
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
    let url = BrokerUrl::parse(&broker_url).map_err(anyhow::Error::msg)?;
    let management_url = management_url.unwrap_or_else(|| url.default_management_url());
    let broker = Broker::new(&management_url, &url.username, &url.password)?;
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

async fn run(
    admin_listen: SocketAddr,
    resync: Duration,
    retry: Duration,
    lease_namespace: String,
    identity: String,
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
    let admin = {
        let metrics = metrics.clone();
        axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route("/readyz", axum::routing::get(|| async { "ok" }))
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
    let (mut leader, _lease) = manager.watch().await;
    tracing::info!("warren-operator started; waiting for the leader lease");
    loop {
        while !*leader.borrow_and_update() {
            tokio::select! {
                changed = leader.changed() => changed?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
        tracing::info!("leader lease acquired; reconciling");
        metrics.leader.set(1);
        let mut watch = leader.clone();
        let lost = async move {
            while watch.changed().await.is_ok() {
                if !*watch.borrow() {
                    break;
                }
            }
        };
        tokio::select! {
            () = controller::run(client.clone(), ctx.clone(), lost) => {
                tracing::warn!("leader lease lost; standing by");
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        metrics.leader.set(0);
    }
}
