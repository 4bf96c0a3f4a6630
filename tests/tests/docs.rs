//! The documentation is kept true by running it.
//!
//! - Every command in a `sh` block of `README.md` and `docs/*.md` is run by
//!   a test or by `.ci/run`: [`RUNS`] says which, and the tests that run
//!   one read its text from the document. A command added to the
//!   documentation without a test that runs it fails here.
//! - The sidecar's quick start (docs/sidecar.md) and the operator's `apply`
//!   and `inject` commands run here as written, against a private broker;
//!   the documented request bodies of the HTTP API are sent to the sidecar.
//! - The reference tables are checked against the programs: every flag of
//!   `warren-sidecar` and `warren-operator run`, every metric either
//!   exposes, every `warren.dev/` key the operator writes or reads, every
//!   field of the CRDs; and nothing is documented that does not exist.
//! - The YAML shown in the README is the examples' (which the manifest
//!   checks and the cluster tier apply), and the consumer configuration in
//!   docs/consumer.md is accepted by the sidecar's parser.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use serde_json::Value;
use warren_testkit::docs::{self, Block};
use warren_testkit::operator::repo_root;
use warren_testkit::sidecar::workspace_bin;
use warren_testkit::{RabbitNode, free_port, init_tracing, sidecar_bin};

/// Where a documented command runs.
enum Runs {
    /// A line of `.ci/run`.
    Ci,
    /// A test (file, function) that reads the command from the document
    /// with `warren_testkit::docs`.
    Test(&'static str, &'static str),
}

/// Every documented command, by the start of its text (the longest
/// matching start wins), grouped by where it runs.
const RUNS: &[(Runs, &[&str])] = &[
    (Runs::Ci, &["bash scripts/test"]),
    (
        Runs::Test(
            "tests/tests/faults.rs",
            "the_demo_rides_out_broker_outages_and_shows_the_full_outbox_on_its_own",
        ),
        &["scripts/demo"],
    ),
    (
        Runs::Test("tests/src/operator.rs", "install_chart"),
        &[
            "helm install warren charts/warren --namespace",
            "kubectl wait --for=condition=Established",
        ],
    ),
    (
        Runs::Test(
            "tests/tests/cluster.rs",
            "chart_installs_and_the_api_server_enforces_the_crds",
        ),
        &["kubectl apply -f examples/orders.yaml -f examples/orders-app.yaml"],
    ),
    (
        Runs::Test(
            "tests/tests/docs.rs",
            "the_sidecar_quick_start_runs_as_written",
        ),
        &["cargo run --release -p warren-sidecar --", "curl "],
    ),
    (
        Runs::Test("tests/tests/docs.rs", "apply_and_inject_run_as_written"),
        &[
            "cargo run -p warren-operator -- apply",
            "cargo run -p warren-operator -- inject",
        ],
    ),
    (
        Runs::Test(
            "bench/tests/quick.rs",
            "quick_run_reports_every_figure_and_target",
        ),
        &["scripts/bench --quick"],
    ),
    // docs/cluster.md: a local control plane, up and down.
    (
        Runs::Test("tests/tests/cluster.rs", "scripts_cluster_up_and_down"),
        &[
            "eval \"$(scripts/cluster up)\"",
            "kubectl get --raw /readyz",
            "kubectl get namespaces",
            "scripts/cluster down",
        ],
    ),
    // docs/cluster.md: the operator run against it.
    (
        Runs::Test(
            "tests/tests/cluster.rs",
            "the_operator_runs_against_a_local_plane_as_docs_cluster_md_shows",
        ),
        &[
            "helm install warren charts/warren -n warren-system --create-namespace --set webhook.externalName=localhost",
            "kubectl create token warren",
            "kubectl get configmap warren-injection",
            "cp \"$KUBECONFIG\"",
            "export KUBECONFIG=",
            "kubectl config ",
            "kubectl auth whoami",
            "POD_NAMESPACE=warren-system",
        ],
    ),
];

fn read_repo(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn every_command_in_the_docs_is_run_by_a_test_or_by_ci() {
    let ci = read_repo(".ci/run");
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    let commands = docs::all_commands();
    assert!(
        commands.len() >= 10,
        "the documents' commands were not found: {commands:?}"
    );
    let entries: Vec<(&str, &Runs)> = RUNS
        .iter()
        .flat_map(|(runs, prefixes)| prefixes.iter().map(move |p| (*p, runs)))
        .collect();
    for (doc, command) in &commands {
        let Some((i, (_, runs))) = entries
            .iter()
            .enumerate()
            .filter(|(_, (prefix, _))| command.starts_with(prefix))
            .max_by_key(|(_, (prefix, _))| prefix.len())
        else {
            problems.push(format!(
                "{doc}: `{command}` is run by no test and not by .ci/run (add the test, then list it in RUNS)"
            ));
            continue;
        };
        used.insert(i);
        match runs {
            Runs::Ci => {
                if !ci.lines().any(|l| l.trim() == command) {
                    problems.push(format!("{doc}: `{command}` is not a line of .ci/run"));
                }
            }
            Runs::Test(file, name) => {
                let text = read_repo(file);
                if !text.contains(&format!("fn {name}(")) {
                    problems.push(format!("{doc}: `{command}`: {file} has no fn {name}"));
                } else if !text.contains("docs::") {
                    problems.push(format!(
                        "{doc}: `{command}`: {file} does not read the documents' commands"
                    ));
                }
            }
        }
    }
    for (i, (prefix, _)) in entries.iter().enumerate() {
        if !used.contains(&i) {
            problems.push(format!(
                "RUNS lists `{prefix}…`, which no document has any more"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Kills the process on drop (by pid, with SIGKILL) and reaps it.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_http_ok(url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", url])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "{url} did not answer in time");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_ok(script: &str) -> String {
    let out = docs::bash(script).output().expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{script}` failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The broker URL the documents use, which tests replace by a private
/// node's.
const DOC_BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The one block of `lang` in `doc` that contains `needle`.
fn block_with(doc: &str, lang: &str, needle: &str) -> String {
    let found: Vec<Block> = docs::blocks(&docs::read(doc))
        .into_iter()
        .filter(|b| b.lang == lang && b.text.contains(needle))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{doc}: expected one {lang} block containing {needle:?}"
    );
    found[0].text.clone()
}

/// The names of the metric families in Prometheus text: counters as
/// `<name>_total`, as they are sampled and documented.
fn metric_families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next().unwrap_or_default();
            match parts.next() {
                Some("counter") if !name.ends_with("_total") => format!("{name}_total"),
                _ => name.to_string(),
            }
        })
        .collect()
}

/// The metric names `docs/metrics.md` lists with `prefix`.
fn documented_metrics(prefix: &str) -> BTreeSet<String> {
    let text = docs::read("docs/metrics.md");
    text.lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1))
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// The names registered in `source` (a metrics module), with `prefix`:
/// the string literal after each `registry.register(`.
fn registered_metrics(source: &str, prefix: &str) -> BTreeSet<String> {
    source
        .split("registry.register(")
        .skip(1)
        .filter_map(|rest| rest.split('"').nth(1))
        .map(|name| format!("{prefix}{name}"))
        .collect()
}

/// Every metric `exposed` (live, with its type) is documented, and the
/// documented ones are exactly those the program registers in `source`
/// (a labelled family shows only once it has a sample, so the live set can
/// be smaller).
fn assert_metrics_documented(exposed: &BTreeSet<String>, prefix: &str, source: &str) {
    let documented = documented_metrics(prefix);
    let base = |n: &String| n.strip_suffix("_total").unwrap_or(n).to_string();
    let registered = registered_metrics(&read_repo(source), prefix);
    assert!(registered.len() >= 5, "{source}: {registered:?}");
    let documented_base: BTreeSet<String> = documented.iter().map(base).collect();
    let missing: Vec<_> = exposed.difference(&documented).collect();
    let unregistered: Vec<_> = registered.difference(&documented_base).collect();
    let stale: Vec<_> = documented_base.difference(&registered).collect();
    assert!(
        missing.is_empty() && unregistered.is_empty() && stale.is_empty(),
        "docs/metrics.md: exposed but not documented (as exposed): {missing:?}; registered in {source} but not documented: {unregistered:?}; documented but not registered: {stale:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sidecar_quick_start_runs_as_written() {
    init_tracing();
    let node = tokio::task::spawn_blocking(RabbitNode::start)
        .await
        .unwrap()
        .expect("start node");
    // "declare it first"
    node.declare_quorum_queue("jobs").await.unwrap();

    let sidecar = sidecar_bin().unwrap();
    let help = Command::new(sidecar).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(
        help.contains("[default: 127.0.0.1:7171]") && help.contains("[default: 0.0.0.0:7172]"),
        "the documented ports are the defaults: {help}"
    );

    let start = docs::command(
        "docs/sidecar.md",
        "cargo run --release -p warren-sidecar --",
    );
    assert!(start.contains(DOC_BROKER_URL), "{start}");
    let data = tempfile::tempdir().unwrap();
    let (api, admin) = (free_port(), free_port());
    let start = start
        .replace(
            "cargo run --release -p warren-sidecar --",
            &format!("exec {}", sidecar.display()),
        )
        .replace(DOC_BROKER_URL, &node.amqp_url())
        .replace("/tmp/warren-outbox", &data.path().display().to_string());
    let start = format!("{start} --listen 127.0.0.1:{api} --admin-listen 127.0.0.1:{admin}");
    let _sidecar = Killed(
        docs::bash(&start)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin_url = format!("http://127.0.0.1:{admin}");
    tokio::task::block_in_place(|| {
        wait_http_ok(&format!("{admin_url}/healthz"), Duration::from_secs(30))
    });

    let ports = |c: &str| {
        c.replace("127.0.0.1:7171", &format!("127.0.0.1:{api}"))
            .replace("127.0.0.1:7172", &format!("127.0.0.1:{admin}"))
    };
    let publish = docs::command("docs/sidecar.md", "curl -i -X POST");
    let answer = tokio::task::block_in_place(|| run_ok(&ports(&publish)));
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert!(answer.contains("\"seq\""), "{answer}");

    // The message reaches the queue with its id and body.
    let conn = node.amqp_connection().await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let message = loop {
        if let Some(m) = channel
            .basic_get("jobs".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            break m;
        }
        assert!(Instant::now() < deadline, "job-1 never reached the queue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        message
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("job-1")
    );
    assert_eq!(message.delivery.data, br#"{"hello":"world"}"#);

    let outbox = docs::command("docs/sidecar.md", "curl -s http://127.0.0.1:7171/v1/outbox");
    let outbox: Value =
        serde_json::from_str(&tokio::task::block_in_place(|| run_ok(&ports(&outbox)))).unwrap();
    assert_eq!(outbox["pending"], 0, "{outbox}");
    assert_eq!(outbox["broker"]["state"], "connected", "{outbox}");

    let metrics = docs::command("docs/sidecar.md", "curl -s http://127.0.0.1:7172/metrics");
    let metrics = tokio::task::block_in_place(|| run_ok(&ports(&metrics)));
    assert!(
        metrics.contains("warren_sidecar_publish_accepted_total 1"),
        "{metrics}"
    );
    assert_metrics_documented(
        &metric_families(&metrics),
        "warren_sidecar_",
        "sidecar/src/metrics.rs",
    );

    // The request bodies docs/api.md shows are accepted as shown.
    let client = reqwest::Client::new();
    let batch = block_with("docs/api.md", "json", "\"messages\"");
    let answer = client
        .post(format!("http://127.0.0.1:{api}/v1/batch"))
        .header("content-type", "application/json")
        .body(batch)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(
        answer["results"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
    let filter = block_with("docs/api.md", "json", "reason_contains");
    let answer = client
        .post(format!("http://127.0.0.1:{api}/v1/outbox/dead/retry"))
        .header("content-type", "application/json")
        .body(filter)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["requeued"], 0, "{answer}");

    drop(_sidecar);
    tokio::task::spawn_blocking(move || node.shutdown())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_and_inject_run_as_written() {
    init_tracing();
    let node = tokio::task::spawn_blocking(RabbitNode::start)
        .await
        .unwrap()
        .expect("start node");
    let operator = workspace_bin("warren-operator", "warren-operator").unwrap();
    let bin = |c: &str, sub: &str| {
        c.replace(
            &format!("cargo run -p warren-operator -- {sub}"),
            &format!("{} {sub}", operator.display()),
        )
    };

    let apply = docs::command("docs/apply.md", "cargo run -p warren-operator -- apply");
    assert!(apply.contains(DOC_BROKER_URL), "{apply}");
    let apply = format!(
        "WARREN_MANAGEMENT_URL={} {}",
        node.management_url(),
        bin(&apply, "apply").replace(DOC_BROKER_URL, &node.amqp_url())
    );
    let first = tokio::task::block_in_place(|| run_ok(&apply));
    assert!(
        first.contains("created queue orders.parked") && first.contains("created queue orders"),
        "{first}"
    );
    let again = tokio::task::block_in_place(|| run_ok(&apply));
    assert!(
        again.contains("unchanged") && !again.contains("created"),
        "{again}"
    );

    let inject = docs::command(
        "docs/injection.md",
        "cargo run -p warren-operator -- inject",
    );
    let out = tokio::task::block_in_place(|| run_ok(&bin(&inject, "inject")));
    let deployment = serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "orders-api")
        .unwrap_or_else(|| panic!("no Deployment orders-api in\n{out}"));
    let init = deployment["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .expect("init containers");
    assert!(
        init.iter().any(|c| c["name"] == "warren-sidecar"),
        "{deployment}"
    );

    tokio::task::spawn_blocking(move || node.shutdown())
        .await
        .unwrap()
        .unwrap();
}

/// The `--flags` and their environment variables in a clap `--help`.
fn help_flags(help: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for line in help.lines() {
        let t = line.trim_start();
        let t = t
            .strip_prefix("-")
            .filter(|r| !r.starts_with('-'))
            .map_or(t, |r| r.get(3..).unwrap_or(""));
        if let Some(rest) = t.strip_prefix("--") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if name != "help" && name != "version" {
                flags.insert(format!("--{name}"));
            }
        }
        let mut rest = line;
        while let Some(i) = rest.find("[env: ") {
            rest = &rest[i + 6..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            envs.insert(name);
        }
    }
    (flags, envs)
}

/// The `--flags` in the first column of the rows of `doc`'s tables.
fn documented_flags(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with("| `--"))
        .flat_map(|l| {
            l.split('|')
                .nth(1)
                .unwrap_or("")
                .split('`')
                .filter(|s| s.starts_with("--"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn assert_flags_documented(help: &str, doc: &str) {
    let (flags, envs) = help_flags(help);
    assert!(!flags.is_empty(), "no flags found in\n{help}");
    let text = docs::read(doc);
    let documented = documented_flags(&text);
    let missing: Vec<_> = flags.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&flags).collect();
    let missing_env: Vec<_> = envs
        .iter()
        .filter(|e| !text.contains(&format!("`{e}`")))
        .collect();
    assert!(
        missing.is_empty() && stale.is_empty() && missing_env.is_empty(),
        "{doc}: flags not documented: {missing:?}; documented but unknown: {stale:?}; environment variables not documented: {missing_env:?}"
    );
}

fn help_of(bin: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    assert!(out.status.success(), "{} {args:?} --help", bin.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_flag_tables_list_every_flag_and_nothing_else() {
    let sidecar = sidecar_bin().unwrap();
    assert_flags_documented(&help_of(sidecar, &["--help"]), "docs/sidecar.md");
    let operator = workspace_bin("warren-operator", "warren-operator").unwrap();
    assert_flags_documented(&help_of(&operator, &["run", "--help"]), "docs/operator.md");
}

#[test]
fn every_operator_metric_is_documented() {
    let metrics = warren_operator::metrics::Metrics::new();
    // Families with labels are exposed once they have a sample.
    metrics.observe_reconcile(Duration::from_millis(1), true);
    metrics.reconcile_error("kube");
    let exposed = metric_families(&metrics.encode());
    assert!(exposed.len() >= 5, "{exposed:?}");
    assert_metrics_documented(&exposed, "warren_operator_", "operator/src/metrics.rs");
}

/// Every `"warren.dev/…"` string literal in `dir`'s Rust files.
fn warren_keys(dir: &std::path::Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            warren_keys(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            let mut rest = text.as_str();
            while let Some(i) = rest.find("\"warren.dev/") {
                rest = &rest[i + 1..];
                let key: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '/'))
                    .collect::<String>();
                // A key as a whole literal, not the start of a message
                // such as "warren.dev/queues: name at least one".
                if rest[key.len()..].starts_with('"') {
                    out.insert(key);
                }
            }
        }
    }
}

#[test]
fn every_label_annotation_and_finalizer_is_documented() {
    let mut keys = BTreeSet::new();
    for dir in ["operator/src", "sidecar/src", "crds/src"] {
        warren_keys(&repo_root().join(dir), &mut keys);
    }
    keys.remove("warren.dev/v1alpha1"); // the API version, not a key
    assert!(
        keys.contains("warren.dev/queues") && keys.len() >= 20,
        "{keys:?}"
    );
    let injection = docs::read("docs/injection.md");
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !injection.contains(&format!("`{k}`")))
        .collect();
    // And every key in the first column of a table there exists.
    let documented: BTreeSet<String> = injection
        .lines()
        .filter(|l| l.starts_with("| `warren.dev/"))
        .filter_map(|l| l.split('`').nth(1))
        .map(str::to_string)
        .collect();
    let stale: Vec<_> = documented.difference(&keys).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/injection.md: not documented: {missing:?}; documented but unknown: {stale:?}"
    );
}

/// The field paths of a CRD's schema under `root` (`spec`, `status`):
/// `spec.queue.bindings[].routingKey`.
fn schema_paths(node: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = node["properties"].as_object() {
        for (k, v) in props {
            schema_paths(v, &format!("{path}.{k}"), out);
        }
    } else if node["items"]["properties"].is_object() {
        schema_paths(&node["items"], &format!("{path}[]"), out);
    } else {
        out.push(path.to_string());
    }
}

/// The part of `text` from the heading starting `## {from}` to the next
/// `## ` heading.
fn section<'a>(text: &'a str, from: &str) -> &'a str {
    let start = text
        .find(&format!("\n## {from}"))
        .unwrap_or_else(|| panic!("no section {from:?}"));
    let body = &text[start + 1..];
    match body[3..].find("\n## ") {
        Some(end) => &body[..end + 3],
        None => body,
    }
}

#[test]
fn every_field_of_the_crds_is_documented() {
    let text = docs::read("docs/resources.md");
    for (file, heading) in [
        ("crds/reliablequeue.yaml", "ReliableQueue"),
        ("crds/retrypolicy.yaml", "RetryPolicy"),
    ] {
        let crd: Value = serde_yaml_ng::from_str(&read_repo(file)).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        let doc = section(&text, heading);
        let mut spec = Vec::new();
        schema_paths(&schema["spec"], "spec", &mut spec);
        let mut status = Vec::new();
        schema_paths(&schema["status"], "status", &mut status);
        assert!(spec.len() >= 5 && !status.is_empty(), "{file}: {spec:?}");
        let mut missing: Vec<String> = spec
            .iter()
            .filter(|p| !doc.contains(&format!("`{p}`")))
            .cloned()
            .collect();
        // Status: its top-level fields by path, the fields below them by
        // name.
        for p in &status {
            let mut parts = p.splitn(3, '.');
            let top = format!(
                "status.{}",
                parts.nth(1).unwrap_or_default().trim_end_matches("[]")
            );
            if !doc.contains(&format!("`{top}")) {
                missing.push(top);
            }
            if let Some(leaf) = p.rsplit('.').next().filter(|_| p.matches('.').count() > 1)
                && !doc.contains(&format!("`{leaf}`"))
            {
                missing.push(p.clone());
            }
        }
        let known: BTreeSet<&str> = spec.iter().map(String::as_str).collect();
        let stale: Vec<&str> = doc
            .lines()
            .filter(|l| l.starts_with("| `spec."))
            .filter_map(|l| l.split('`').nth(1))
            .filter(|p| !known.contains(p))
            .collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "docs/resources.md, {heading}: not documented: {missing:?}; documented but not in {file}: {stale:?}"
        );
    }
}

/// Every document of every file in `examples/`.
fn example_documents() -> Vec<Value> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("examples"))
        .unwrap()
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(doc).unwrap();
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

#[test]
fn the_readme_shows_the_examples_as_they_are() {
    let examples = example_documents();
    let readme = docs::read("README.md");
    let shown: Vec<Block> = docs::blocks(&readme)
        .into_iter()
        .filter(|b| b.lang == "yaml")
        .collect();
    assert!(shown.len() >= 2, "the README shows a queue and an app");
    for block in shown {
        let v: Value = serde_yaml_ng::from_str(&block.text).unwrap();
        assert!(
            examples.contains(&v),
            "this README block is not a document of examples/ (the examples are what the tests apply):\n{}",
            block.text
        );
    }
}

#[test]
fn the_documented_consumer_configuration_is_accepted() {
    let text = block_with("docs/consumer.md", "yaml", "consumerTimeout");
    let config: warren_crds::sidecar_config::SidecarConfig =
        serde_yaml_ng::from_str(&text).expect("docs/consumer.md's configuration parses");
    config.validate().expect("and is valid");
    assert_eq!(config.queues.len(), 1);
}
