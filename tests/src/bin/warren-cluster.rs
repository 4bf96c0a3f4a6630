//! `warren-cluster`: a local Kubernetes control plane for development, like
//! `kind create cluster` without containers (`scripts/cluster up|down`).
//!
//! `up` starts etcd, kube-apiserver and kube-controller-manager (see
//! `warren_testkit::cluster`) in their own session, so they outlive this
//! command, waits until `/readyz` answers ok and the controllers run, and
//! prints the `export` lines for the shell. `down` stops every process `up`
//! started, by the pids it recorded, and removes the directory.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warren_crds::error_chain::error_chain;
use warren_testkit::cluster::{self, ControlPlane};

/// A local Kubernetes control plane (no kubelet, no scheduler: pods are
/// admitted, mutated, validated and stored, and stay Pending).
#[derive(Debug, Parser)]
#[command(name = "warren-cluster", version, about)]
struct Args {
    /// Directory of the control plane (certificates, etcd data, logs,
    /// kubeconfig, pids).
    #[arg(
        long,
        env = "WARREN_CLUSTER_DIR",
        default_value = "/tmp/warren-cluster",
        global = true
    )]
    dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the control plane; prints `export KUBECONFIG=...`.
    Up,
    /// Stop the control plane started by `up` and remove its directory.
    Down,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Cmd::Up => up(&args.dir),
        Cmd::Down => cluster::stop_detached(&args.dir).map(|stopped| {
            for p in stopped {
                eprintln!("stopped {p}");
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-cluster: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn up(dir: &std::path::Path) -> anyhow::Result<()> {
    if dir.join("pids").exists() {
        anyhow::bail!(
            "a control plane already runs in {} (`scripts/cluster down` stops it)",
            dir.display()
        );
    }
    let kubeconfig = ControlPlane::start_detached(dir)?;
    let tools = cluster::k8s_tools_dir()?;
    eprintln!(
        "control plane ready; logs in {}",
        dir.join("logs").display()
    );
    println!("export KUBECONFIG={}", kubeconfig.display());
    println!("export PATH={}:$PATH", tools.display());
    Ok(())
}
