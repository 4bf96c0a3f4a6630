//! `warren-bench --quick` end to end: every figure and every target is
//! reported with a finite value. Timing targets are not asserted (a smoke
//! run on a shared machine proves nothing about them).

use std::process::Command;

use warren_testkit::docs;

const FIGURES: &[&str] = &[
    "fsync_per_s",
    "direct_sync_msgs_per_s",
    "direct_sync_p50_ms",
    "direct_sync_p99_ms",
    "direct_pipelined_msgs_per_s",
    "direct_pipelined_cpu_us_per_msg",
    "sidecar_idle_rss_mib",
    "sidecar_single1_msgs_per_s",
    "sidecar_single1_p50_ms",
    "sidecar_single1_p99_ms",
    "sidecar_single64_msgs_per_s",
    "sidecar_single64_p50_ms",
    "sidecar_single64_p99_ms",
    "sidecar_batch_e2e_msgs_per_s",
    "sidecar_batch_accept_msgs_per_s",
    "sidecar_batch_cpu_us_per_msg",
    "outage_accept_msgs_per_s",
    "drain_msgs_per_s",
    "drain_cpu_us_per_msg",
    "reconnect_ms",
    "outage_batch_accept_msgs_per_s",
    "sidecar_buffered_rss_mib",
    "sidecar_buffered_disk_ratio",
    "sidecar_restart_ms",
    "relay_e2e_msgs_per_s",
    "relay_commit_to_broker_p50_ms",
    "relay_commit_to_broker_p99_ms",
];

#[test]
fn quick_run_reports_every_figure_and_target() {
    let sidecar = warren_testkit::sidecar_bin().expect("warren-sidecar binary");
    // The smoke run docs/benchmark.md shows, with the binary that
    // `scripts/bench` builds and runs, smaller sizes and a JSON report.
    let documented = docs::command("docs/benchmark.md", "scripts/bench --quick");
    let args: Vec<&str> = documented
        .strip_prefix("scripts/bench")
        .expect("scripts/bench")
        .split_whitespace()
        .collect();
    assert!(args.contains(&"--quick"), "{documented}");
    let out = Command::new(env!("CARGO_BIN_EXE_warren-bench"))
        .args(&args)
        .args([
            "--json",
            "--messages=3000",
            "--buffered=10000",
            "--batch-size=500",
        ])
        .arg(format!("--sidecar-bin={}", sidecar.display()))
        .output()
        .expect("run warren-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "warren-bench failed: {stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the report is JSON on stdout");

    let figures = report["figures"].as_array().expect("figures");
    for key in FIGURES {
        let f = figures
            .iter()
            .find(|f| f["key"] == *key)
            .unwrap_or_else(|| panic!("figure {key} missing: {report:#}"));
        let v = f["value"].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{key} = {v}: {report:#}");
        if f["baseline"].is_string() || f["baseline_label"].is_string() {
            let r = f["ratio"].as_f64().unwrap_or(f64::NAN);
            assert!(r.is_finite() && r > 0.0, "ratio of {key} = {r}");
        }
        // The table on stderr shows it too.
        let label = f["label"].as_str().unwrap();
        assert!(
            stderr.contains(label),
            "{label} not in the table:\n{stderr}"
        );
    }
    assert_eq!(
        figures.len(),
        FIGURES.len(),
        "unexpected figures: {report:#}"
    );

    let targets = report["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 10, "{report:#}");
    for t in targets {
        let r = t["ratio"].as_f64().unwrap_or(f64::NAN);
        assert!(r.is_finite() && r > 0.0, "target {t}");
        let verdict = if t["pass"].as_bool().unwrap() {
            "PASS"
        } else {
            "MISS"
        };
        let name = t["name"].as_str().unwrap();
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(name) && l.ends_with(verdict)),
            "{name} {verdict} not in the table:\n{stderr}"
        );
    }
}
