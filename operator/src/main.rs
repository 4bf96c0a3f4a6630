use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen { out_dir: Some(dir) } => warren_operator::crdgen::write(&dir),
        Command::Crdgen { out_dir: None } => {
            for (_, yaml) in warren_operator::crdgen::crds() {
                print!("---\n{yaml}");
            }
            Ok(())
        }
    }
}
