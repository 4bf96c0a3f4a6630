//! `warren-demo`: Warren riding out failures, in a minute.
//!
//! Starts a private RabbitMQ node (its version in the header), declares the
//! topology of a ReliableQueue manifest with `warren-operator apply`, runs a
//! producer sidecar and a consumer sidecar (delivering to a small built-in
//! app), publishes a stream of messages and kills, stops and restarts the
//! broker, the network and the sidecars on a seeded schedule; a second,
//! capped producer sidecar plays the full outbox. After each fault it says
//! what the fault did to acceptance and delivery. Ends with the account of
//! every message; exits 0 only when nothing acknowledged was lost.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use warren_crds::duration::HumanDuration;
use warren_crds::error_chain::error_chain;
use warren_testkit::scenario::{Apply, Console, Fault, Outcome, Rig, RigOptions};
use warren_testkit::sidecar::workspace_bin;

/// Warren's demo: a message stream through two sidecars while the broker,
/// the network and the sidecars fail.
#[derive(Debug, Parser)]
#[command(name = "warren-demo", version, about)]
struct Args {
    /// How long faults are injected (setup and the final drain come on top).
    #[arg(long, default_value = "40s")]
    duration: HumanDuration,
    /// Play these faults once each, in this order, instead of faults for
    /// `--duration` (broker-kill9, broker-stop, network-cut, network-stall,
    /// network-reset, producer-kill9, consumer-kill9, outbox-full).
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<Fault>>,
    /// Seed of the fault schedule (default: random; printed either way).
    #[arg(long, env = "WARREN_FAULT_SEED")]
    seed: Option<u64>,
    /// The ReliableQueue manifest to apply (default: examples/orders.yaml).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Concurrent HTTP producers.
    #[arg(long, default_value_t = 4)]
    producers: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async move {
        let seed = args.seed.unwrap_or_else(rand::random);
        let console = Console::new(std::io::stdout().is_terminal());
        let what = match &args.faults {
            Some(faults) => faults
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(", "),
            None => format!("{} of faults", args.duration),
        };
        console.say(format!(
            "Warren demo: {what}, seed {seed} (replay with --seed {seed})"
        ));
        let mut demo = tokio::spawn(demo(args, seed, console.clone()));
        tokio::select! {
            done = &mut demo => match done {
                Ok(Ok(outcome)) => {
                    console.say("done");
                    println!("what each fault did:\n{}", outcome.effects_text());
                    println!("{outcome}");
                    match outcome.check() {
                        Ok(()) => {
                            println!("every acknowledged message was delivered (lost=0)");
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("{}", error_chain(e.as_ref()));
                            ExitCode::FAILURE
                        }
                    }
                }
                Ok(Err(e)) => {
                    eprintln!("error: {}", error_chain(e.as_ref()));
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
            _ = interrupted() => {
                console.say("interrupted: stopping the broker and the sidecars");
                // The broker and the sidecars go with the rig when the task
                // is dropped at its next await, their temp dirs with them.
                // They are also tied to this process, so they die with it
                // in any case.
                demo.abort();
                let _ = tokio::time::timeout(Duration::from_secs(60), demo).await;
                ExitCode::from(130)
            }
        }
    })
}

/// Ctrl-C or SIGTERM.
async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn demo(args: Args, seed: u64, console: Console) -> anyhow::Result<Outcome> {
    let operator = workspace_bin("warren-operator", "warren-operator")?;
    let mut opts = RigOptions::new(seed, console.clone());
    opts.apply = Apply::Cli(operator);
    opts.producers = args.producers;
    if let Some(m) = args.manifest {
        opts.manifest = m;
    }
    let until = match &args.faults {
        Some(_) => None,
        None => Some(Instant::now() + args.duration.0),
    };
    opts.faults = args.faults;
    let mut rig = Rig::start(opts).await?;
    console.say(format!(
        "== Warren demo on {}: faults begin; after each one, what it did to acceptance and delivery",
        rig.broker_version()
    ));
    rig.run(None, until).await?;
    rig.settle(Duration::from_secs(120)).await
}
