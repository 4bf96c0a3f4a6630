//! The fault-injection suite: a stream of messages from a producer sidecar
//! to a consumer sidecar (separate processes, both through a fault-injecting
//! proxy) while a seeded random schedule breaks the broker, the network and
//! the sidecars; every acknowledged message must arrive.
//!
//! `WARREN_FAULT_SEED=N` replays a schedule (the seed is printed at the
//! start and in every failure); `WARREN_SOAK_DURATION=30m` plays faults for
//! that long instead of one round of every fault (`scripts/soak`).

use std::process::Command;
use std::time::{Duration, Instant};

use warren_crds::duration::HumanDuration;
use warren_testkit::init_tracing;
use warren_testkit::scenario::{Console, Fault, Rig, RigOptions, seed_from_env};
use warren_testkit::sidecar::{sidecar_bin, workspace_bin};

fn soak_duration() -> Option<Duration> {
    let s = std::env::var("WARREN_SOAK_DURATION").ok()?;
    let d: HumanDuration = s
        .parse()
        .unwrap_or_else(|e| panic!("WARREN_SOAK_DURATION={s:?}: {e}"));
    Some(d.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seeded_schedule_of_faults_loses_no_acknowledged_message() {
    init_tracing();
    let seed = seed_from_env("WARREN_FAULT_SEED");
    let soak = soak_duration();
    println!("fault schedule seed: {seed} (replay with WARREN_FAULT_SEED={seed})");
    let mut opts = RigOptions::new(seed, Console::new(false));
    opts.progress_every = Some(Duration::from_secs(if soak.is_some() { 10 } else { 5 }));
    let mut rig = Rig::start(opts)
        .await
        .unwrap_or_else(|e| panic!("setting up (seed {seed}): {e:#}"));
    let played = match soak {
        // One round plays every kind of fault once, in the seed's order.
        None => rig.run(Some(Fault::ALL.len()), None).await,
        Some(d) => rig.run(None, Some(Instant::now() + d)).await,
    };
    if let Err(e) = played {
        panic!("{e:#}\nseed {seed}; steps played: {:?}", rig.played());
    }
    let outcome = rig
        .settle(Duration::from_secs(180))
        .await
        .unwrap_or_else(|e| panic!("settling (seed {seed}): {e:#}"));
    println!("{outcome}\nschedule:\n{}", outcome.schedule_text());
    if let Err(e) = outcome.check() {
        panic!("{e:#}");
    }
    // The faults did what they are for.
    assert!(
        outcome.report.acked > 2_000,
        "too few messages to mean anything: {outcome}"
    );
    let played = |f: Fault| outcome.played.iter().any(|s| s.fault == f);
    if played(Fault::OutboxFull) {
        assert!(
            outcome.full > 0,
            "no 507 while the outbox was full: {outcome}"
        );
    }
    if played(Fault::ProducerKill9) {
        assert!(
            outcome.unavailable > 0,
            "no producer noticed the sidecar down: {outcome}"
        );
    }
}

/// `warren-demo --duration 20s`, as `scripts/demo` runs it: exits 0 and
/// ends with an account that lost nothing.
#[test]
fn the_demo_ends_with_an_account_that_lost_nothing() {
    let demo = env!("CARGO_BIN_EXE_warren-demo");
    let operator = workspace_bin("warren-operator", "warren-operator").unwrap();
    let sidecar = sidecar_bin().unwrap();
    let started = Instant::now();
    let out = Command::new(demo)
        .args(["--duration", "20s"])
        .env("WARREN_OPERATOR_BIN", operator)
        .env("WARREN_SIDECAR_BIN", sidecar)
        .output()
        .expect("running warren-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "warren-demo failed: {:?}", out.status);
    let account = stdout
        .lines()
        .find(|l| l.starts_with("account:"))
        .expect("the demo prints its account");
    assert!(account.contains(" lost=0 "), "{account}");
    let acked: u64 = account
        .split_whitespace()
        .find_map(|w| w.strip_prefix("acknowledged="))
        .and_then(|n| n.parse().ok())
        .expect("the account has acknowledged=N");
    assert!(acked > 500, "{account}");
    assert!(
        stdout.contains("ReliableQueue orders:"),
        "the operator's output is shown"
    );
    assert!(stdout.contains("step 1:"), "at least one fault was played");
    println!("demo took {:.0?}", started.elapsed());
}
