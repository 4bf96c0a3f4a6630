//! `warren-operator apply` as a user runs it: against a private node,
//! twice (the second run changes nothing), and with bad input.

use std::process::Command;

use warren_testkit::{RabbitNode, init_tracing};

const MANIFEST: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: rabbit}
stringData: {uri: "amqp://guest:guest@127.0.0.1:5672"}
---
apiVersion: warren.dev/v1alpha1
kind: RetryPolicy
metadata: {name: quick}
spec:
  maxRetries: 3
  backoff: {initial: 500ms, multiplier: 2, max: 2s}
---
apiVersion: warren.dev/v1alpha1
kind: ReliableQueue
metadata: {name: payments}
spec:
  broker: {secretName: rabbit}
  exchange: {name: billing, type: topic}
  queue:
    bindings: [{routingKey: "payment.*"}]
    deliveryLimit: 10
  retryPolicyRef: quick
"#;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_warren-operator"))
        .args(args)
        .output()
        .expect("run warren-operator");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("$ warren-operator {}\n{text}", args.join(" "));
    (out.status.success(), text)
}

#[test]
fn apply_creates_then_changes_nothing() {
    init_tracing();
    let node = RabbitNode::start().expect("start node");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payments.yaml");
    std::fs::write(&file, MANIFEST).unwrap();
    let file = file.to_str().unwrap();
    let url = node.amqp_url();
    let mgmt = node.management_url();
    let args = [
        "apply",
        "-f",
        file,
        "--broker-url",
        &url,
        "--management-url",
        &mgmt,
    ];

    let (ok, out) = run(&args);
    assert!(ok, "{out}");
    for line in [
        "skipped Secret (v1)",
        "ReliableQueue payments: created queue payments",
        "ReliableQueue payments: created queue payments.retry.500ms",
        "ReliableQueue payments: created queue payments.retry.2s",
        "ReliableQueue payments: created binding billing -> payments (\"payment.*\")",
        "ReliableQueue payments: created policy warren.payments",
    ] {
        assert!(out.contains(line), "missing {line:?}");
    }
    let (ok, out) = run(&args);
    assert!(ok, "{out}");
    assert!(out.contains("ReliableQueue payments: unchanged"), "{out}");
    assert!(!out.contains("created"), "{out}");

    // A conflict (the exchange exists as topic) fails the run and says why.
    std::fs::write(file, MANIFEST.replace("type: topic", "type: direct")).unwrap();
    let (ok, out) = run(&args);
    assert!(!ok, "{out}");
    assert!(
        out.contains("CONFLICT exchange billing") && out.contains("inequivalent arg 'type'"),
        "{out}"
    );
}

#[test]
fn apply_refuses_bad_input_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        MANIFEST.replace("retryPolicyRef: quick", "retryPolicyRef: slow"),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    // No broker is needed to find these.
    let port = warren_testkit::free_port();
    let mgmt = format!("http://127.0.0.1:{port}");
    let (ok, out) = run(&[
        "apply",
        "-f",
        file,
        "--broker-url",
        "amqp://127.0.0.1",
        "--management-url",
        &mgmt,
    ]);
    assert!(!ok);
    assert!(out.contains("unreachable"), "{out}");

    let (ok, out) = run(&[
        "apply",
        "-f",
        "/nonexistent.yaml",
        "--broker-url",
        "amqp://127.0.0.1",
    ]);
    assert!(!ok);
    assert!(out.contains("cannot read /nonexistent.yaml"), "{out}");

    let (ok, out) = run(&["apply", "-f", file, "--broker-url", "http://127.0.0.1"]);
    assert!(!ok);
    assert!(out.contains("unsupported broker URL scheme"), "{out}");
}
