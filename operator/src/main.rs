use std::path::PathBuf;
use std::process::ExitCode;

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

#[derive(Debug, Subcommand)]
enum Command {
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
