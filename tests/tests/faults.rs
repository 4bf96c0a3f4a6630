//! The fault-injection suite: a stream of messages from a producer sidecar
//! to a consumer sidecar (separate processes, both through a fault-injecting
//! proxy) while a seeded random schedule breaks the broker, the network and
//! the sidecars; every acknowledged message must arrive.
//!
//! `WARREN_FAULT_SEED=N` replays a schedule (the seed is printed at the
//! start and in every failure); `WARREN_SOAK_DURATION=30m` plays faults for
//! that long instead of one round of every fault (`scripts/soak`).

use std::time::{Duration, Instant};

use warren_crds::duration::HumanDuration;
use warren_testkit::scenario::{Console, Fault, Rig, RigOptions, seed_from_env};
use warren_testkit::sidecar::{sidecar_bin, workspace_bin};
use warren_testkit::{docs, init_tracing};

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
    // With a realistic outbox, no outage fills the main producer's.
    assert_eq!(
        outcome.full,
        0,
        "the main producer got 507s: {outcome}\n{}",
        outcome.effects_text()
    );
    let played = |f: Fault| outcome.played.iter().any(|s| s.fault == f);
    if played(Fault::OutboxFull) {
        assert!(
            outcome.refused > 0,
            "no 507 while the capped outbox was full: {outcome}"
        );
        assert_eq!(outcome.full_without_retry_after, 0, "{outcome}");
        assert!(
            outcome.refused_delivered.is_empty(),
            "messages refused with 507 arrived: {:?}",
            outcome.refused_delivered
        );
    }
    if played(Fault::ProducerKill9) {
        assert!(
            outcome.unavailable > 0,
            "no producer noticed the sidecar down: {outcome}"
        );
    }
}

/// The README's `scripts/demo`, with `--faults
/// broker-kill9,broker-stop,outbox-full`: the header names the broker's version; through
/// both broker outages publishes are still answered 202 (no 507 from the
/// main producer, whose outbox has a realistic limit); the full outbox,
/// played on its own by the capped sidecar, answers 507 with
/// `Retry-After`, and what it refused is accounted as refused (never
/// delivered, not lost); the demo exits 0 with an account that lost
/// nothing.
#[test]
fn the_demo_rides_out_broker_outages_and_shows_the_full_outbox_on_its_own() {
    let demo = docs::command("README.md", "scripts/demo");
    assert_eq!(demo, docs::command("docs/testing.md", "scripts/demo"));
    let mut run = docs::bash(&format!(
        "{demo} --faults broker-kill9,broker-stop,outbox-full"
    ));
    // The script builds the binaries it runs; here it runs those of this
    // test run instead (the ones `scripts/test` names, or found or built
    // the way every other test finds them): a second cargo build beside
    // the running tests would rebuild with the package's own feature set
    // and relink binaries other tests are running.
    let operator = workspace_bin("warren-operator", "warren-operator").unwrap();
    let sidecar = sidecar_bin().unwrap();
    run.env("WARREN_DEMO_PREBUILT", "1")
        .env("WARREN_OPERATOR_BIN", operator)
        .env("WARREN_SIDECAR_BIN", sidecar)
        .env("WARREN_DEMO_BIN", env!("CARGO_BIN_EXE_warren-demo"));
    let started = Instant::now();
    let out = run.output().expect("running scripts/demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "scripts/demo failed: {:?}",
        out.status
    );

    let header = stdout
        .lines()
        .find(|l| l.contains("== Warren demo on RabbitMQ "))
        .expect("the header names the broker");
    let version = header
        .split("RabbitMQ ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_default();
    assert!(
        version.starts_with(|c: char| c.is_ascii_digit()) && version.contains('.'),
        "no broker version in the header: {header}"
    );
    if std::env::var("WARREN_RABBITMQ_BIN_DIR").is_ok_and(|d| d.contains("/4-")) {
        assert!(version.starts_with("4."), "{header}");
    }
    assert!(
        stdout.contains("ReliableQueue orders:"),
        "the operator's output is shown"
    );

    // The per-fault summary at the end.
    let effect = |name: &str| -> &str {
        stdout
            .lines()
            .skip_while(|l| !l.starts_with("what each fault did:"))
            .find(|l| {
                l.trim_start()
                    .split_once(". ")
                    .is_some_and(|(_, r)| r.starts_with(name))
            })
            .unwrap_or_else(|| panic!("no summary of {name:?}:\n{stdout}"))
    };
    for outage in ["broker kill -9:", "broker graceful stop:"] {
        let line = effect(outage);
        assert!(
            number_after(line, "publishes answered 202: ") > 0,
            "publishes were not answered 202 during the outage: {line}"
        );
        assert_eq!(
            number_after(line, ", refused: "),
            0,
            "publishes were refused during the outage: {line}"
        );
        assert!(line.ends_with("resumed") && !line.contains("NOT"), "{line}");
    }
    let full = effect("outbox full:");
    assert!(number_after(full, "refused 507: ") > 0, "{full}");
    assert!(!full.contains("Retry-After: missing"), "{full}");
    assert!(full.contains("accepting again after draining"), "{full}");
    assert!(
        number_after(full, "; main producer publishes answered 202: ") > 0,
        "the main producer was not answered 202 meanwhile: {full}"
    );
    assert_eq!(number_after(full, ", refused: "), 0, "{full}");

    let account = stdout
        .lines()
        .find(|l| l.starts_with("account:"))
        .expect("the demo prints its account");
    assert!(account.contains(" lost=0 "), "{account}");
    assert!(
        account.contains("(507=0 "),
        "the main producer got 507s: {account}"
    );
    assert!(
        number_after(account, " refused=") > 0,
        "nothing refused is accounted: {account}"
    );
    assert!(account.contains("delivered anyway: 0)"), "{account}");
    assert!(number_after(account, "acknowledged=") > 500, "{account}");
    println!("demo took {:.0?}", started.elapsed());
}

/// The number (`12,345` or `12345`) right after the first `prefix` in
/// `line`.
fn number_after(line: &str, prefix: &str) -> u64 {
    let rest = line
        .split_once(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in {line}"))
        .1;
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in {line}"))
}
