//! The cluster tier: Warren's chart, CRDs, operator and webhook against a
//! real control plane (etcd, kube-apiserver and kube-controller-manager
//! built from source), driven with the real `helm` and `kubectl`, and a
//! private RabbitMQ node.
//!
//! Each test starts its own control plane. There is no kubelet: pods are
//! admitted, mutated, validated and stored, and stay Pending; where a test
//! needs a pod to have finished, it sets the pod's status as a kubelet
//! would, and says so.
//!
//! scripts/test runs this binary only where the control plane can be built
//! (Go is installed), and says so when it skips it.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::Value;
use warren_testkit::cluster::ControlPlane;
use warren_testkit::operator::{
    NAMESPACE, OperatorProcess, install_chart, repo_root, wait_for_ca_bundle,
};
use warren_testkit::{RabbitNode, docs, init_tracing};

/// Poll `f` every 500 ms until it returns `Some`, or panic after `timeout`
/// with `what` and the last value seen.
fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Like [`eventually`], for async checks.
async fn eventually_async<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// `kubectl ARGS -o json` as the admin, parsed.
fn get_json(plane: &ControlPlane, args: &[&str]) -> Result<Value, String> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = plane.kubectl_ok(&all).map_err(|e| format!("{e:#}"))?;
    serde_json::from_str(&out).map_err(|e| e.to_string())
}

fn start_plane() -> ControlPlane {
    init_tracing();
    tokio::task::block_in_place(ControlPlane::start).expect("control plane starts")
}

/// A Secret with the node's URI and the RetryPolicy + ReliableQueue
/// manifests, in namespace `ns`.
fn broker_secret(ns: &str, node: &RabbitNode) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: broker\n  namespace: {ns}\n\
         stringData:\n  uri: amqp://guest:guest@127.0.0.1:{port}/\n",
        port = node.amqp_port()
    )
}

fn reliable_queue(ns: &str, name: &str, node: &RabbitNode, extra: &str) -> String {
    format!(
        "apiVersion: warren.dev/v1alpha1\nkind: ReliableQueue\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
         spec:\n  broker:\n    secretName: broker\n    managementUrl: {mgmt}\n\
         \x20 exchange:\n    name: {name}\n{extra}",
        mgmt = node.management_url()
    )
}

/// Names of the queues on the node's default vhost.
async fn broker_queues(node: &RabbitNode) -> BTreeSet<String> {
    let queues = node
        .management_get("/api/queues/%2f?columns=name")
        .await
        .expect("management API lists queues");
    queues
        .as_array()
        .expect("a list of queues")
        .iter()
        .filter_map(|q| q["name"].as_str().map(str::to_string))
        .collect()
}

fn broker_queues_blocking(node: &RabbitNode) -> BTreeSet<String> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(broker_queues(node)))
}

fn wait_ready(plane: &ControlPlane, ns: &str, rq: &str, timeout: Duration) {
    let t = format!("--timeout={}s", timeout.as_secs());
    if let Err(e) = plane.kubectl_ok(&[
        "wait",
        "--for=condition=Ready",
        &t,
        "-n",
        ns,
        &format!("reliablequeue/{rq}"),
    ]) {
        let status = get_json(plane, &["get", "rq", rq, "-n", ns]);
        panic!("ReliableQueue {ns}/{rq} not Ready: {e:#}\n{status:?}");
    }
}

/// The fragment the API server's refusal must contain: the file's
/// `# api-server: ...` line.
fn expected_refusal(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("# api-server: "))
        .unwrap_or_else(|| panic!("{} has no `# api-server:` line", path.display()))
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn chart_installs_and_the_api_server_enforces_the_crds() {
    let plane = start_plane();
    install_chart(&plane, &[]).expect("helm install");

    // What the chart installed.
    let crds = get_json(&plane, &["get", "crd"]).unwrap();
    let names: BTreeSet<&str> = crds["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["metadata"]["name"].as_str())
        .collect();
    assert!(names.contains("reliablequeues.warren.dev"), "{names:?}");
    assert!(names.contains("retrypolicies.warren.dev"), "{names:?}");
    for kind in [
        "deployment/warren",
        "service/warren-webhook",
        "serviceaccount/warren",
        "configmap/warren-injection",
    ] {
        plane
            .kubectl_ok(&["get", "-n", NAMESPACE, kind])
            .unwrap_or_else(|e| panic!("{kind}: {e:#}"));
    }
    plane
        .kubectl_ok(&["get", "mutatingwebhookconfiguration", "warren"])
        .expect("the webhook configuration");

    // README's first queue and app, with its command as written.
    let first = docs::command("README.md", "kubectl apply -f examples/orders.yaml");
    let out = plane
        .shell_ok(&first)
        .unwrap_or_else(|e| panic!("{first}: {e:#}"));
    for created in [
        "reliablequeue.warren.dev/orders created",
        "deployment.apps/orders-api created",
    ] {
        assert!(out.contains(created), "{first}: no {created:?} in {out}");
    }

    // Every example is accepted as it is (the Deployment and StatefulSet
    // too: their pods are what the webhook sees, not the workloads); the
    // README's are there already.
    let examples = repo_root().join("examples");
    let out = plane
        .kubectl_ok(&["apply", "-f", examples.to_str().unwrap()])
        .expect("kubectl apply -f examples/");
    assert!(
        out.contains("reliablequeue.warren.dev/orders unchanged")
            || out.contains("reliablequeue.warren.dev/orders configured"),
        "{out}"
    );
    assert!(out.contains("retrypolicy.warren.dev/"), "{out}");

    // Every invalid manifest is refused by the API server, in its words.
    let mut refused = 0;
    for dir in ["invalid-manifests", "invalid-manifests-api"] {
        let dir = repo_root().join("scripts/testdata").join(dir);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for path in files {
            let expected = expected_refusal(&path);
            let file = path.to_str().unwrap();
            let err = match plane.kubectl_ok(&["apply", "--dry-run=server", "-f", file]) {
                Ok(out) => panic!("{} was accepted: {out}", path.display()),
                Err(e) => format!("{e:#}"),
            };
            assert!(
                err.contains(&expected),
                "{}: refusal does not say {expected:?}: {err}",
                path.display()
            );
            refused += 1;
        }
    }
    assert!(refused >= 16, "only {refused} invalid manifests were tried");

    // The CEL rules for immutable fields hold on update.
    let mut orders = get_json(&plane, &["get", "rq", "orders"]).unwrap();
    let meta = orders["metadata"].as_object_mut().unwrap();
    for server_side in [
        "managedFields",
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "generation",
        "annotations",
    ] {
        meta.remove(server_side);
    }
    let mut changed = orders.clone();
    changed["spec"]["queue"]["type"] = "classic".into();
    let err = plane
        .apply_yaml(&serde_json::to_string(&changed).unwrap())
        .expect_err("queue.type changed on a live ReliableQueue");
    assert!(
        format!("{err:#}").contains("queue.type is immutable"),
        "{err:#}"
    );
    let mut renamed = orders.clone();
    renamed["spec"]["exchange"]["name"] = "shop2".into();
    let err = plane
        .apply_yaml(&serde_json::to_string(&renamed).unwrap())
        .expect_err("exchange.name changed on a live ReliableQueue");
    assert!(
        format!("{err:#}").contains("exchange.name is immutable"),
        "{err:#}"
    );

    // Printer columns, with values from the spec (status is the
    // operator's; see the reconcile test).
    let rp = plane.kubectl_ok(&["get", "rp"]).unwrap();
    let header: Vec<&str> = rp.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "MAX", "RETRIES", "STRATEGY", "TIERS", "AGE"],
        "{rp}"
    );
    assert!(
        rp.lines()
            .any(|l| l.starts_with("orders-retry") && l.contains(" 8 ") && l.contains("ttlTiers")),
        "{rp}"
    );
    let rq = plane.kubectl_ok(&["get", "rq"]).unwrap();
    let header: Vec<&str> = rq.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "QUEUE",
            "READY",
            "MESSAGES",
            "CONSUMERS",
            "PARKED",
            "AGE"
        ],
        "{rq}"
    );
    assert!(rq.lines().any(|l| l.starts_with("orders ")), "{rq}");
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_reconciles_with_the_charts_rbac() {
    let plane = start_plane();
    let installed = install_chart(&plane, &[]).expect("helm install");
    let node = tokio::task::block_in_place(RabbitNode::start).expect("rabbitmq node");
    let _op = OperatorProcess::start(&plane, "op-a", installed.webhook_port.port(), &[])
        .await
        .expect("warren-operator run");

    let ns = "shop";
    plane.apply_yaml(&broker_secret(ns, &node)).unwrap();
    let policy = "apiVersion: warren.dev/v1alpha1\nkind: RetryPolicy\nmetadata:\n  name: standard\n  namespace: shop\n\
                  spec:\n  maxRetries: 3\n  backoff:\n    initial: 1s\n    multiplier: 2\n    max: 1m\n";
    plane.apply_yaml(policy).unwrap();
    let retry = "  retryPolicyRef: standard\n";
    plane
        .apply_yaml(&reliable_queue(
            ns,
            "orders",
            &node,
            &format!("{retry}  deletionPolicy: Delete\n"),
        ))
        .unwrap();
    plane
        .apply_yaml(&reliable_queue(
            ns,
            "invoices",
            &node,
            &format!("{retry}  deletionPolicy: Retain\n"),
        ))
        .unwrap();
    wait_ready(&plane, ns, "orders", Duration::from_secs(120));
    wait_ready(&plane, ns, "invoices", Duration::from_secs(60));

    // The broker objects exist.
    let queues = broker_queues(&node).await;
    for q in [
        "orders",
        "orders.parked",
        "orders.retry.1s",
        "orders.retry.2s",
        "orders.retry.4s",
        "invoices",
        "invoices.parked",
        "invoices.retry.1s",
    ] {
        assert!(queues.contains(q), "{q} missing on the broker: {queues:?}");
    }
    // kubectl shows the operator's status in the printer columns.
    eventually(Duration::from_secs(60), "status columns of orders", || {
        let out = plane
            .kubectl_ok(&["get", "rq", "-n", ns])
            .map_err(|e| format!("{e:#}"))?;
        let line = out.lines().find(|l| l.starts_with("orders ")).unwrap_or("");
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 6 && cols[..6] == ["orders", "orders", "True", "0", "0", "0"] {
            Ok(())
        } else {
            Err(out)
        }
    });

    // A spec change reaches the live policy.
    plane
        .kubectl_ok(&[
            "patch",
            "rq",
            "orders",
            "-n",
            ns,
            "--type=merge",
            "-p",
            r#"{"spec":{"queue":{"maxLength":500}}}"#,
        ])
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "max-length 500 in the live policy",
        || {
            let policy = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(node.management_get("/api/policies/%2f/warren.orders"))
            })
            .map_err(|e| format!("{e:#}"))?;
            match policy["definition"]["max-length"].as_i64() {
                Some(500) => Ok(()),
                other => Err(format!("{other:?} in {policy}")),
            }
        },
    );

    // A RetryPolicy change reaches every queue that uses it.
    plane
        .kubectl_ok(&[
            "patch",
            "rp",
            "standard",
            "-n",
            ns,
            "--type=merge",
            "-p",
            r#"{"spec":{"backoff":{"initial":"3s"}}}"#,
        ])
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the new tiers on both queues",
        || {
            let queues = broker_queues_blocking(&node);
            let want = [
                "orders.retry.3s",
                "orders.retry.6s",
                "orders.retry.12s",
                "invoices.retry.3s",
                "invoices.retry.12s",
            ];
            let gone = ["orders.retry.1s", "invoices.retry.1s"];
            if want.iter().all(|q| queues.contains(*q)) && gone.iter().all(|q| !queues.contains(*q))
            {
                Ok(())
            } else {
                Err(format!("{queues:?}"))
            }
        },
    );

    // deletionPolicy Delete: the broker objects and the resource go.
    plane
        .kubectl_ok(&["delete", "rq", "orders", "-n", ns, "--timeout=60s"])
        .expect("the finalizer is released");
    let queues = broker_queues(&node).await;
    assert!(
        !queues
            .iter()
            .any(|q| q == "orders" || q.starts_with("orders.")),
        "orders' queues left on the broker: {queues:?}"
    );
    // deletionPolicy Retain: the resource goes, the broker objects stay.
    plane
        .kubectl_ok(&["delete", "rq", "invoices", "-n", ns, "--timeout=60s"])
        .expect("the finalizer is released");
    let queues = broker_queues(&node).await;
    for q in ["invoices", "invoices.parked", "invoices.retry.3s"] {
        assert!(queues.contains(q), "{q} was not retained: {queues:?}");
    }
    let left = plane
        .kubectl_ok(&["get", "rq", "-n", ns, "-o", "name"])
        .unwrap();
    assert_eq!(left.trim(), "", "ReliableQueues left: {left}");
}

/// The claim name of a stored pod's outbox volume.
fn claim_of(pod: &Value) -> Option<String> {
    pod["spec"]["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == "warren-outbox")?["persistentVolumeClaim"]["claimName"]
        .as_str()
        .map(str::to_string)
}

fn pods(plane: &ControlPlane, ns: &str, selector: &str) -> Vec<Value> {
    get_json(plane, &["get", "pods", "-n", ns, "-l", selector])
        .map(|v| v["items"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
}

/// A Deployment; with `inject`, its pod template opts in: the label the
/// webhook's objectSelector matches (and the annotation, which
/// `warren-operator inject` also accepts) plus the settings.
fn deployment(ns: &str, name: &str, replicas: u32, inject: bool) -> String {
    let (opt_in, annotations) = if inject {
        (
            ", warren.dev/inject: enabled",
            "      annotations:\n        warren.dev/inject: enabled\n        warren.dev/queues: orders\n\
             \x20       warren.dev/app-port: \"8080\"\n\
             \x20       warren.dev/relay-postgres-secret: shop-db/url\n",
        )
    } else {
        ("", "")
    };
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
         spec:\n  replicas: {replicas}\n  selector:\n    matchLabels: {{app: {name}}}\n\
         \x20 template:\n    metadata:\n      labels: {{app: {name}{opt_in}}}\n{annotations}\
         \x20   spec:\n      containers:\n        - name: app\n          image: registry.example.com/{name}:1\n"
    )
}

/// Warren as the webhook and claim tests need it: a control plane with the
/// chart (plus `values`), a broker, one operator whose CA is in the webhook
/// configuration, and namespace `shop` with the broker Secret, the
/// ReliableQueue `orders` and its default ServiceAccount (pods need it).
struct Shop {
    plane: ControlPlane,
    _node: RabbitNode,
    _operator: OperatorProcess,
}

const SHOP: &str = "shop";

async fn shop(values: &[&str]) -> Shop {
    let plane = start_plane();
    let installed = install_chart(&plane, values).expect("helm install");
    let node = tokio::task::block_in_place(RabbitNode::start).expect("rabbitmq node");
    let operator = OperatorProcess::start(&plane, "op-a", installed.webhook_port.port(), &[])
        .await
        .expect("warren-operator run");
    wait_for_ca_bundle(&plane, Duration::from_secs(30)).unwrap();
    plane.apply_yaml(&broker_secret(SHOP, &node)).unwrap();
    plane
        .apply_yaml(&reliable_queue(SHOP, "orders", &node, ""))
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the default ServiceAccount",
        || {
            plane
                .kubectl_ok(&["get", "sa", "default", "-n", SHOP])
                .map_err(|e| format!("{e:#}"))
        },
    );
    Shop {
        plane,
        _node: node,
        _operator: operator,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_injects_pods_the_controllers_create() {
    // Holds the broker and the operator until the end of the test.
    let shop = shop(&[]).await;
    let plane = &shop.plane;
    let ns = SHOP;

    // A plain pod is untouched.
    plane
        .apply_yaml(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: plain\n  namespace: shop\n\
             spec:\n  containers:\n    - name: app\n      image: registry.example.com/plain:1\n",
        )
        .expect("a plain pod is created");
    let plain = get_json(plane, &["get", "pod", "plain", "-n", ns]).unwrap();
    assert!(plain["spec"]["initContainers"].is_null(), "{plain}");
    assert_eq!(plain["spec"]["containers"].as_array().unwrap().len(), 1);
    assert!(claim_of(&plain).is_none());

    // A Deployment with the opt-in: the controllers make a ReplicaSet and
    // pods, and the API server stores them with the sidecar.
    plane.apply_yaml(&deployment(ns, "api", 3, true)).unwrap();
    let stored = eventually(Duration::from_secs(60), "3 pods of api", || {
        let p = pods(plane, ns, "app=api");
        if p.len() == 3 {
            Ok(p)
        } else {
            Err(format!("{} pods", p.len()))
        }
    });
    let mut claims = BTreeSet::new();
    for pod in &stored {
        let name = pod["metadata"]["name"].as_str().unwrap();
        let init = pod["spec"]["initContainers"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has no init containers: {pod}"));
        let sidecar = init
            .iter()
            .find(|c| c["name"] == "warren-sidecar")
            .unwrap_or_else(|| panic!("{name} has no sidecar: {pod}"));
        assert_eq!(
            sidecar["restartPolicy"], "Always",
            "native sidecar: {sidecar}"
        );
        // The transactional outbox relay's database URL, from its Secret.
        let relay = sidecar["env"]
            .as_array()
            .and_then(|env| env.iter().find(|e| e["name"] == "WARREN_RELAY_POSTGRES"))
            .unwrap_or_else(|| panic!("{name}'s sidecar has no relay URL: {sidecar}"));
        assert_eq!(
            relay["valueFrom"]["secretKeyRef"]["name"], "shop-db",
            "{relay}"
        );
        assert_eq!(relay["valueFrom"]["secretKeyRef"]["key"], "url", "{relay}");
        let claim = claim_of(pod).unwrap_or_else(|| panic!("{name} has no outbox claim"));
        assert_eq!(
            pod["metadata"]["labels"]["warren.dev/outbox-claim"],
            claim.as_str(),
            "{name}'s claim label"
        );
        assert_eq!(pod["status"]["phase"], "Pending");
        claims.insert(claim);
    }
    assert_eq!(
        claims.len(),
        3,
        "three pods, three different claims: {claims:?}"
    );
    let pvcs = get_json(plane, &["get", "pvc", "-n", ns]).unwrap();
    let pvc_names: BTreeSet<String> = pvcs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pvc_names, claims, "the claims exist");

    // The claim of a deleted pod goes to the next pod. A claim handed out
    // less than a minute ago counts as held (its pod may not be stored
    // yet), so the hand-over is tried after that.
    std::thread::sleep(warren_operator::pool::CLAIM_GRACE + Duration::from_secs(2));
    plane
        .kubectl_ok(&["scale", "deployment/api", "-n", ns, "--replicas=2"])
        .unwrap();
    let left = eventually(Duration::from_secs(30), "2 pods of api", || {
        let p = pods(plane, ns, "app=api");
        if p.len() == 2 {
            Ok(p)
        } else {
            Err(format!("{} pods", p.len()))
        }
    });
    let held: BTreeSet<String> = left.iter().filter_map(claim_of).collect();
    let freed: Vec<&String> = claims.difference(&held).collect();
    assert_eq!(freed.len(), 1, "one claim freed: {freed:?}");
    plane
        .kubectl_ok(&["scale", "deployment/api", "-n", ns, "--replicas=3"])
        .unwrap();
    let now = eventually(Duration::from_secs(30), "3 pods of api again", || {
        let p = pods(plane, ns, "app=api");
        if p.len() == 3 {
            Ok(p)
        } else {
            Err(format!("{} pods", p.len()))
        }
    });
    let now_claims: BTreeSet<String> = now.iter().filter_map(claim_of).collect();
    assert_eq!(
        now_claims, claims,
        "the new pod took the freed claim {freed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_other_operator_takes_over_when_the_leader_is_killed() {
    let plane = start_plane();
    let installed = install_chart(&plane, &[]).expect("helm install");
    let node = tokio::task::block_in_place(RabbitNode::start).expect("rabbitmq node");
    let other_port = warren_testkit::reserve_port().unwrap();
    let mut a = OperatorProcess::start(&plane, "op-a", installed.webhook_port.port(), &[])
        .await
        .expect("operator a");
    let mut b = OperatorProcess::start(&plane, "op-b", other_port.port(), &[])
        .await
        .expect("operator b");
    let holder = || lease_holder(&plane);
    let first = eventually(Duration::from_secs(60), "a lease holder", || {
        holder().and_then(|h| {
            if h.is_empty() {
                Err("none".into())
            } else {
                Ok(h)
            }
        })
    });
    let ns = "shop";
    plane.apply_yaml(&broker_secret(ns, &node)).unwrap();
    plane
        .apply_yaml(&reliable_queue(ns, "first", &node, ""))
        .unwrap();
    wait_ready(&plane, ns, "first", Duration::from_secs(120));

    let (leader, survivor) = if first == a.identity() {
        (&mut a, "op-b")
    } else {
        assert_eq!(first, b.identity());
        (&mut b, "op-a")
    };
    leader.kill9().unwrap();
    let killed = Instant::now();
    plane
        .apply_yaml(&reliable_queue(ns, "second", &node, ""))
        .unwrap();
    wait_ready(&plane, ns, "second", Duration::from_secs(90));
    let took = killed.elapsed();
    // The lease lasts 15 s; the survivor must take it and reconcile within
    // that plus a margin for a loaded machine.
    assert!(took < Duration::from_secs(45), "took over after {took:?}");
    assert_eq!(holder().unwrap(), survivor);
    assert!(broker_queues(&node).await.contains("second"));
    eprintln!("failover: the second ReliableQueue was Ready {took:?} after the leader's kill -9");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_claim_gets_a_drain_job_and_goes_when_drained() {
    // Holds the broker and the operator until the end of the test.
    let shop = shop(&[
        "sidecar.outbox.idleBeforeDrain=5s",
        "operator.poolInterval=2s",
    ])
    .await;
    let plane = &shop.plane;
    let ns = SHOP;
    plane
        .apply_yaml(&deployment(ns, "ledger", 1, true))
        .unwrap();
    let pod = eventually(Duration::from_secs(60), "the ledger pod", || {
        pods(plane, ns, "app=ledger")
            .into_iter()
            .next()
            .ok_or_else(|| "no pod".to_string())
    });
    let claim = claim_of(&pod).expect("the pod has a claim");
    // The workload goes away; its claim may still hold messages.
    plane
        .kubectl_ok(&["scale", "deployment/ledger", "-n", ns, "--replicas=0"])
        .unwrap();

    let job = eventually(
        Duration::from_secs(150),
        "a drain Job for the claim",
        || {
            let jobs = get_json(
                plane,
                &[
                    "get",
                    "jobs",
                    "-n",
                    ns,
                    "-l",
                    &format!("warren.dev/drain-claim={claim}"),
                ],
            )?;
            jobs["items"]
                .as_array()
                .and_then(|j| j.first().cloned())
                .ok_or_else(|| "no job".to_string())
        },
    );
    let job_name = job["metadata"]["name"].as_str().unwrap().to_string();
    let volumes = &job["spec"]["template"]["spec"]["volumes"];
    assert!(
        volumes
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["persistentVolumeClaim"]["claimName"] == claim.as_str()),
        "the Job mounts the claim: {volumes}"
    );
    let args = job["spec"]["template"]["spec"]["containers"][0].to_string();
    assert!(args.contains("--drain"), "{args}");

    // No kubelet runs the Job's pod: mark it Succeeded as a kubelet would
    // after `warren-sidecar --drain` exited 0; the job controller then
    // completes the Job.
    let job_pod = eventually(Duration::from_secs(60), "the drain Job's pod", || {
        pods(plane, ns, &format!("job-name={job_name}"))
            .into_iter()
            .next()
            .ok_or_else(|| "no pod".to_string())
    });
    let pod_name = job_pod["metadata"]["name"].as_str().unwrap();
    let container = job_pod["spec"]["containers"][0]["name"].as_str().unwrap();
    let status = serde_json::json!({"status": {
        "phase": "Succeeded",
        "containerStatuses": [{
            "name": container, "image": job_pod["spec"]["containers"][0]["image"],
            "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}
        }]
    }});
    plane
        .kubectl_ok(&[
            "patch",
            "pod",
            pod_name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])
        .expect("pod status set");
    eventually(Duration::from_secs(60), "the Job to complete", || {
        let j = get_json(plane, &["get", "job", &job_name, "-n", ns])?;
        if j["status"]["succeeded"] == 1 {
            Ok(())
        } else {
            Err(j["status"].to_string())
        }
    });
    // Drained, and beyond the workload's replicas (0): the claim goes.
    eventually(
        Duration::from_secs(90),
        "the drained claim to be deleted",
        || match plane.kubectl_ok(&["get", "pvc", &claim, "-n", ns, "-o", "name"]) {
            Err(e) if format!("{e:#}").contains("NotFound") => Ok(()),
            Err(e) => Err(format!("{e:#}")),
            Ok(out) => Err(format!("still there: {out}")),
        },
    );
}

/// A bare Pod named `name` in `ns`; with `opt_in`, labelled
/// `warren.dev/inject: enabled` and annotated with its settings; with
/// `annotated_only`, annotated but not labelled.
fn bare_pod(ns: &str, name: &str, opt_in: bool, annotated_only: bool) -> String {
    let labels = if opt_in {
        "  labels:\n    warren.dev/inject: enabled\n"
    } else {
        ""
    };
    let annotations = if opt_in || annotated_only {
        "  annotations:\n    warren.dev/inject: enabled\n    warren.dev/queues: orders\n"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n{labels}{annotations}\
         spec:\n  containers:\n    - name: app\n      image: registry.example.com/{name}:1\n"
    )
}

fn wait_default_service_account(plane: &ControlPlane, ns: &str) {
    eventually(
        Duration::from_secs(30),
        "the default ServiceAccount",
        || {
            plane
                .kubectl_ok(&["get", "sa", "default", "-n", ns])
                .map_err(|e| format!("{e:#}"))
        },
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_operator_down_only_opted_in_pods_are_refused() {
    let plane = start_plane();
    let installed = install_chart(&plane, &[]).expect("helm install");
    let mut operator = OperatorProcess::start(&plane, "op-a", installed.webhook_port.port(), &[])
        .await
        .expect("warren-operator run");
    wait_for_ca_bundle(&plane, Duration::from_secs(30)).unwrap();
    let hook = get_json(&plane, &["get", "mutatingwebhookconfiguration", "warren"]).unwrap();
    assert_eq!(hook["webhooks"][0]["failurePolicy"], "Fail");
    assert_eq!(
        hook["webhooks"][0]["objectSelector"]["matchLabels"]["warren.dev/inject"], "enabled",
        "{hook}"
    );
    for ns in ["shop", "elsewhere"] {
        plane
            .apply_yaml(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"
            ))
            .unwrap();
        wait_default_service_account(&plane, ns);
    }

    // No operator: nothing answers the webhook's Service.
    operator.kill9().unwrap();
    assert!(operator.pid().is_none());

    // A pod that did not ask for Warren, in another namespace, is created.
    plane
        .apply_yaml(&bare_pod("elsewhere", "plain", false, false))
        .expect("a plain pod is created with the operator down");
    let plain = get_json(&plane, &["get", "pod", "plain", "-n", "elsewhere"]).unwrap();
    assert!(plain["spec"]["initContainers"].is_null(), "{plain}");
    // So is one in the namespace of opted-in pods, and one annotated but
    // not labelled: only the label brings a pod to the webhook.
    plane
        .apply_yaml(&bare_pod("shop", "plain", false, false))
        .expect("a plain pod in shop is created");
    plane
        .apply_yaml(&bare_pod("shop", "annotated", false, true))
        .expect("an annotated, unlabelled pod is created");
    let annotated = get_json(&plane, &["get", "pod", "annotated", "-n", "shop"]).unwrap();
    assert!(
        annotated["spec"]["initContainers"].is_null(),
        "the webhook never saw it: {annotated}"
    );

    // An opted-in pod is refused by the API server (failurePolicy Fail),
    // not created without its sidecar.
    let err = plane
        .apply_yaml(&bare_pod("shop", "opted-in", true, false))
        .expect_err("an opted-in pod was created with the operator down");
    let err = format!("{err:#}");
    assert!(
        err.contains("failed calling webhook") && err.contains("inject.warren.dev"),
        "{err}"
    );
    match plane.kubectl_ok(&["get", "pod", "opted-in", "-n", "shop", "-o", "name"]) {
        Err(e) => assert!(format!("{e:#}").contains("NotFound"), "{e:#}"),
        Ok(out) => panic!("the opted-in pod exists: {out}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_named_claim_drains_only_when_idle_since_its_release_and_is_refused_while_draining() {
    const IDLE: Duration = Duration::from_secs(15);
    // Holds the broker and the operator until the end of the test.
    let shop = shop(&[
        "sidecar.outbox.idleBeforeDrain=15s",
        "sidecar.outbox.drainDeadline=7m",
        "operator.poolInterval=2s",
    ])
    .await;
    let plane = &shop.plane;
    let ns = SHOP;
    let claim_name = "warren-outbox-ledger";
    let claim = || get_json(plane, &["get", "pvc", claim_name, "-n", ns]);
    let annotation = |c: &Value, key: &str| {
        c["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_string)
    };
    let time = |t: &str| {
        t.parse::<k8s_openapi::jiff::Timestamp>()
            .expect("an RFC 3339 time")
    };
    let drain_jobs = || {
        get_json(
            plane,
            &[
                "get",
                "jobs",
                "-n",
                ns,
                "-l",
                &format!("warren.dev/drain-claim={claim_name}"),
            ],
        )
        .map(|j| j["items"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
    };

    // A named pod gets its own claim, and holds it longer than
    // idleBeforeDrain (and than the minute after a hand-out during which a
    // claim counts as held whatever the pods say).
    plane
        .apply_yaml(&bare_pod(ns, "ledger", true, false))
        .expect("the opted-in pod is created");
    let pod = get_json(plane, &["get", "pod", "ledger", "-n", ns]).unwrap();
    assert_eq!(claim_of(&pod).as_deref(), Some(claim_name), "{pod}");
    std::thread::sleep(IDLE.max(warren_operator::pool::CLAIM_GRACE) + Duration::from_secs(3));
    assert!(drain_jobs().is_empty(), "a held claim is not drained");
    let claimed_at = time(&annotation(&claim().unwrap(), "warren.dev/claimed-at").unwrap());

    // The pod goes. The keeper records the release…
    plane
        .kubectl_ok(&["delete", "pod", "ledger", "-n", ns, "--wait=true"])
        .unwrap();
    let deleted = k8s_openapi::jiff::Timestamp::now();
    let released = eventually(Duration::from_secs(20), "the release recorded", || {
        let c = claim()?;
        annotation(&c, "warren.dev/released-at").ok_or_else(|| c.to_string())
    });
    let released = time(&released);
    assert!(
        released > claimed_at + k8s_openapi::jiff::SignedDuration::try_from(IDLE).unwrap(),
        "the claim was held longer than idleBeforeDrain: claimed {claimed_at}, released {released}"
    );
    // …and does not drain it before idleBeforeDrain has passed since then,
    // although it was handed out longer ago than that.
    while k8s_openapi::jiff::Timestamp::now()
        < deleted + k8s_openapi::jiff::SignedDuration::from_secs(10)
    {
        assert!(
            drain_jobs().is_empty(),
            "drained within idleBeforeDrain of its release (released {released})"
        );
        let c = claim().unwrap();
        assert!(annotation(&c, "warren.dev/draining").is_none(), "{c}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Then it does, with a deadline.
    let job = eventually(Duration::from_secs(60), "a drain Job for the claim", || {
        drain_jobs()
            .into_iter()
            .next()
            .ok_or_else(|| "no job".to_string())
    });
    let created = time(job["metadata"]["creationTimestamp"].as_str().unwrap());
    // creationTimestamp has whole seconds.
    assert!(
        created + k8s_openapi::jiff::SignedDuration::from_secs(1)
            >= released + k8s_openapi::jiff::SignedDuration::try_from(IDLE).unwrap(),
        "the Job was created at {created}, less than idleBeforeDrain after the release at {released}"
    );
    assert_eq!(job["spec"]["activeDeadlineSeconds"], 420, "{}", job["spec"]);
    let job_name = job["metadata"]["name"].as_str().unwrap().to_string();
    eventually(
        Duration::from_secs(10),
        "the claim marked as draining",
        || {
            let c = claim()?;
            match annotation(&c, "warren.dev/draining") {
                Some(j) if j == job_name => Ok(()),
                _ => Err(c.to_string()),
            }
        },
    );

    // While the Job holds the claim, the pod is refused with the reason.
    let err = plane
        .apply_yaml(&bare_pod(ns, "ledger", true, false))
        .expect_err("the pod was given a claim a drain Job holds");
    let err = format!("{err:#}");
    assert!(
        err.contains(&format!(
            "outbox claim {claim_name} is being drained by Job {job_name}"
        )),
        "{err}"
    );
    assert!(
        plane
            .kubectl_ok(&["get", "pod", "ledger", "-n", ns, "-o", "name"])
            .is_err(),
        "the refused pod does not exist"
    );

    // The drain ends (no kubelet: the Job's pod is marked Succeeded as a
    // kubelet would); then the pod gets its claim back.
    let job_pod = eventually(Duration::from_secs(60), "the drain Job's pod", || {
        pods(plane, ns, &format!("job-name={job_name}"))
            .into_iter()
            .next()
            .ok_or_else(|| "no pod".to_string())
    });
    let status = serde_json::json!({"status": {
        "phase": "Succeeded",
        "containerStatuses": [{
            "name": job_pod["spec"]["containers"][0]["name"], "image": job_pod["spec"]["containers"][0]["image"],
            "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}
        }]
    }});
    plane
        .kubectl_ok(&[
            "patch",
            "pod",
            job_pod["metadata"]["name"].as_str().unwrap(),
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])
        .expect("pod status set");
    eventually(Duration::from_secs(60), "the claim drained", || {
        let c = claim()?;
        if annotation(&c, "warren.dev/draining").is_none()
            && annotation(&c, "warren.dev/drained-at").is_some()
        {
            Ok(())
        } else {
            Err(c.to_string())
        }
    });
    plane
        .apply_yaml(&bare_pod(ns, "ledger", true, false))
        .expect("the pod is created once the drain has ended");
    let pod = get_json(plane, &["get", "pod", "ledger", "-n", ns]).unwrap();
    assert_eq!(claim_of(&pod).as_deref(), Some(claim_name), "{pod}");
}

/// The control plane's processes a `pids` file lists (`<pid> <name>`
/// lines), among other output.
fn plane_pids(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [pid, "etcd" | "kube-apiserver" | "kube-controller-manager"] => pid.parse().ok(),
            _ => None,
        })
        .collect()
}

/// Runs `scripts/cluster down` for `dir` on drop if a plane still runs
/// there (a documented block that failed before its own `down`).
struct ClusterDown<'a> {
    dir: &'a Path,
    bin: &'a Path,
}

impl Drop for ClusterDown<'_> {
    fn drop(&mut self) {
        if self.dir.join("pids").exists() {
            let _ = docs::bash("bash scripts/cluster down")
                .env("WARREN_CLUSTER_DIR", self.dir)
                .env("WARREN_CLUSTER_BIN", self.bin)
                .status();
        }
    }
}

#[test]
fn scripts_cluster_up_and_down() {
    init_tracing();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("cluster");
    let bin = warren_testkit::sidecar::workspace_bin("warren-testkit", "warren-cluster").unwrap();
    let _down = ClusterDown {
        dir: &dir,
        bin: &bin,
    };
    // docs/cluster.md's first block as written; the test only adds the
    // recorded pids after `up`, to check them once `down` has run.
    let mut block = docs::block_with("docs/cluster.md", "scripts/cluster down");
    assert_eq!(block[0], r#"eval "$(scripts/cluster up)""#, "{block:?}");
    assert_eq!(
        block.last().map(String::as_str),
        Some("scripts/cluster down"),
        "{block:?}"
    );
    block.insert(1, r#"cat "$WARREN_CLUSTER_DIR/pids""#.to_string());
    let script = format!("set -euo pipefail\n{}\n", block.join("\n"));
    let out = docs::bash(&script)
        .env("WARREN_CLUSTER_DIR", &dir)
        .env("WARREN_CLUSTER_BIN", &bin)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let pids = plane_pids(&stdout);
    assert_eq!(
        pids.len(),
        3,
        "etcd, kube-apiserver, kube-controller-manager in {stdout}"
    );
    assert!(
        // `kubectl get --raw` prints the body without a newline.
        stdout.lines().any(|l| l.starts_with("ok")),
        "no ok from /readyz in {stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("default ")),
        "no namespace default in {stdout}"
    );
    for pid in &pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "pid {pid} still runs after down: {stderr}"
        );
    }
    assert!(!dir.exists(), "scripts/cluster down removes its directory");
}

/// A documented script running in its own process group, with a control
/// plane from `scripts/cluster up` in `dir`. On drop: SIGTERM to the
/// group, SIGKILL after 10 s, then `scripts/cluster down`.
struct DocScript {
    child: Option<std::process::Child>,
    log: std::path::PathBuf,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl DocScript {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the script's output if it has exited.
    fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("the script was started");
        if let Some(status) = child.try_wait().unwrap() {
            self.child = None;
            panic!("the documented script exited ({status}):\n{}", self.log());
        }
    }

    fn group_alive(pgid: libc::pid_t) -> bool {
        // SAFETY: signal 0 only checks that the group has a process.
        unsafe { libc::kill(-pgid, 0) == 0 }
    }
}

impl Drop for DocScript {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("output of the documented script:\n{}", self.log());
        }
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as libc::pid_t;
            // SAFETY: signals to the process group this test created.
            unsafe {
                libc::kill(-pgid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut reaped = false;
            while Instant::now() < deadline {
                reaped = reaped || child.try_wait().is_ok_and(|s| s.is_some());
                if reaped && !Self::group_alive(pgid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // SAFETY: as above.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
        if self.dir.join("pids").exists() {
            let _ = docs::bash("bash scripts/cluster down")
                .env("WARREN_CLUSTER_DIR", &self.dir)
                .env("WARREN_CLUSTER_BIN", &self.bin)
                .status();
        }
    }
}

/// `script` with `from` replaced by `to`; panics if `script` does not
/// contain `from` (the document changed under the test).
fn substitute(script: &str, from: &str, to: &str) -> String {
    assert!(
        script.contains(from),
        "the documented commands no longer contain {from:?}:\n{script}"
    );
    script.replace(from, to)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_runs_against_a_local_plane_as_docs_cluster_md_shows() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let helm = tmp.path().join("helm");
    let cluster_bin =
        warren_testkit::sidecar::workspace_bin("warren-testkit", "warren-cluster").unwrap();
    let operator_bin =
        warren_testkit::sidecar::workspace_bin("warren-operator", "warren-operator").unwrap();
    let webhook = warren_testkit::reserve_port().unwrap();
    let admin = warren_testkit::reserve_port().unwrap();

    // The section "Run the operator against it": its two blocks, as one
    // script. Only what a test must change is changed: the ports, /tmp/,
    // and the operator built already instead of `cargo run`.
    let mut commands = docs::block_with("docs/cluster.md", "helm install warren charts/warren");
    assert_eq!(
        commands[0], r#"eval "$(scripts/cluster up)""#,
        "{commands:?}"
    );
    commands.extend(docs::block_commands(
        "docs/cluster.md",
        "kubectl create token warren",
    ));
    let script = format!("set -euo pipefail\n{}\n", commands.join("\n"));
    let script = substitute(&script, "9443", &webhook.port().to_string());
    let script = substitute(&script, "8080", &admin.port().to_string());
    let script = substitute(&script, "/tmp/", &format!("{}/", tmp.path().display()));
    // Last, so that nothing above rewrites the binary's path.
    let script = substitute(
        &script,
        "cargo run -p warren-operator --",
        &format!("'{}'", operator_bin.display()),
    );
    assert!(
        script.trim_end().ends_with(" run"),
        "the section ends with the operator in the foreground:\n{script}"
    );

    let log = tmp.path().join("script.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = docs::bash(&script);
    cmd.env("WARREN_CLUSTER_DIR", &dir)
        .env("WARREN_CLUSTER_BIN", &cluster_bin)
        .env("HELM_CACHE_HOME", helm.join("cache"))
        .env("HELM_CONFIG_HOME", helm.join("config"))
        .env("HELM_DATA_HOME", helm.join("data"))
        .env_remove("KUBECONFIG")
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut running = DocScript {
        child: Some(cmd.spawn().expect("bash")),
        log,
        dir: dir.clone(),
        bin: cluster_bin.clone(),
    };

    // The operator in the foreground: ready once /readyz answers 200.
    let readyz = format!("http://127.0.0.1:{}/readyz", admin.port());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        running.assert_running();
        if reqwest::get(&readyz)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{readyz} did not answer 200 within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let tools = warren_testkit::cluster::k8s_tools_dir().unwrap();
    // As the admin (the kubeconfig `up` wrote), not as the operator.
    let admin_kubectl = |args: &[&str]| -> Result<String, String> {
        let out = std::process::Command::new(tools.join("kubectl"))
            .args(args)
            .env("KUBECONFIG", dir.join("kubeconfig"))
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    eventually(
        Duration::from_secs(30),
        "the operator's CA in the webhook configuration",
        || {
            let bundle = admin_kubectl(&[
                "get",
                "mutatingwebhookconfiguration",
                "warren",
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ])?;
            if bundle.trim().is_empty() {
                return Err("empty caBundle".into());
            }
            Ok(())
        },
    );
    eventually(Duration::from_secs(30), "dev holding the Lease", || {
        let holder = admin_kubectl(&[
            "get",
            "lease",
            "warren-operator",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])?;
        if holder != "dev" {
            return Err(format!("holder {holder:?}"));
        }
        Ok(())
    });
    let output = running.log();
    assert!(
        output.contains("system:serviceaccount:warren-system:warren"),
        "kubectl auth whoami did not name the chart's ServiceAccount:\n{output}"
    );
    drop(running);
    assert!(!dir.exists(), "scripts/cluster down removes its directory");
}

/// `kubectl auth can-i --list -n NS` as the operator's ServiceAccount, as
/// `resource [names] verb` lines (one per verb; the permissions every
/// authenticated user has are left out).
fn operator_permissions(plane: &ControlPlane, ns: &str) -> BTreeSet<String> {
    let out = plane
        .kubectl_ok(&[
            "auth",
            "can-i",
            "--list",
            "-n",
            ns,
            &format!("--as=system:serviceaccount:{NAMESPACE}:warren"),
        ])
        .expect("kubectl auth can-i --list");
    let mut rows = BTreeSet::new();
    for line in out.lines().skip(1) {
        // Non-resource URLs are indented (no resource column).
        if line.starts_with(char::is_whitespace) {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let resource = fields[0];
        if resource.starts_with("selfsubject") {
            continue; // system:basic-user
        }
        let rest = fields[1..].join(" ");
        let groups: Vec<&str> = rest
            .split(']')
            .map(|g| g.trim().trim_start_matches('['))
            .collect();
        // [non-resource URLs] [resource names] [verbs]
        let names = groups.get(1).copied().unwrap_or("");
        for verb in groups.get(2).copied().unwrap_or("").split_whitespace() {
            rows.insert(format!("{resource} [{names}] {verb}"));
        }
    }
    rows
}

/// What the operator's code does in a namespace it works in: every verb
/// it calls, and nothing else.
fn namespaced_permissions() -> BTreeSet<String> {
    [
        ("reliablequeues.warren.dev", "get list watch patch"),
        ("retrypolicies.warren.dev", "get list watch"),
        ("reliablequeues.warren.dev/status", "patch"),
        ("retrypolicies.warren.dev/status", "patch"),
        ("secrets", "get"),
        ("events.events.k8s.io", "create patch"),
        ("pods", "list"),
        ("persistentvolumeclaims", "get list create patch delete"),
        ("jobs.batch", "list create"),
        ("deployments.apps", "get"),
        ("statefulsets.apps", "get"),
    ]
    .iter()
    .flat_map(|(resource, verbs)| {
        verbs
            .split_whitespace()
            .map(move |v| format!("{resource} [] {v}"))
    })
    .collect()
}

/// The cluster-scoped rights: the release's webhook configuration by name.
fn webhook_config_permissions() -> BTreeSet<String> {
    ["get", "patch"]
        .iter()
        .map(|v| format!("mutatingwebhookconfigurations.admissionregistration.k8s.io [warren] {v}"))
        .collect()
}

/// The release namespace's extras: the Lease and the webhook CA Secret.
fn release_namespace_permissions() -> BTreeSet<String> {
    [
        "leases.coordination.k8s.io [] get",
        "leases.coordination.k8s.io [] create",
        "leases.coordination.k8s.io [] patch",
        "secrets [] create",
        "secrets [warren-ca] get",
        "secrets [warren-ca] update",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn assert_permissions(actual: BTreeSet<String>, expected: BTreeSet<String>, what: &str) {
    let extra: Vec<&String> = actual.difference(&expected).collect();
    let missing: Vec<&String> = expected.difference(&actual).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{what}: the chart grants permissions the operator does not use: {extra:#?}\n\
         or lacks ones it uses: {missing:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_holds_exactly_the_permissions_it_uses() {
    let plane = start_plane();
    let installed = install_chart(&plane, &[]).expect("helm install");
    let node = tokio::task::block_in_place(RabbitNode::start).expect("rabbitmq node");

    // Every namespace (the default): a ClusterRole with what the code uses.
    let everywhere = &namespaced_permissions() | &webhook_config_permissions();
    for ns in ["shop", "default"] {
        assert_permissions(
            operator_permissions(&plane, ns),
            everywhere.clone(),
            &format!("cluster-wide, namespace {ns}"),
        );
    }
    assert_permissions(
        operator_permissions(&plane, NAMESPACE),
        &everywhere | &release_namespace_permissions(),
        "cluster-wide, the release namespace",
    );
    // Secrets are read by name, never listed: `get` without `list`.
    let list_secrets = plane
        .kubectl()
        .args([
            "auth",
            "can-i",
            "list",
            "secrets",
            "--all-namespaces",
            &format!("--as=system:serviceaccount:{NAMESPACE}:warren"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&list_secrets.stdout).trim(),
        "no",
        "the operator must not list Secrets"
    );

    // watchNamespaces: Roles in the listed namespaces, nothing elsewhere.
    plane.apply_yaml(&broker_secret("shop", &node)).unwrap();
    plane.apply_yaml(&broker_secret("other", &node)).unwrap();
    plane
        .helm_ok(&[
            "upgrade",
            "warren",
            &repo_root().join("charts/warren").display().to_string(),
            "-n",
            NAMESPACE,
            "--reuse-values",
            "--set",
            "operator.watchNamespaces={shop}",
            "--wait=false",
        ])
        .expect("helm upgrade with watchNamespaces");
    assert_permissions(
        operator_permissions(&plane, "shop"),
        &namespaced_permissions() | &webhook_config_permissions(),
        "watchNamespaces, a listed namespace",
    );
    assert_permissions(
        operator_permissions(&plane, "other"),
        webhook_config_permissions(),
        "watchNamespaces, a namespace not listed",
    );
    let webhook = get_json(&plane, &["get", "mutatingwebhookconfiguration", "warren"]).unwrap();
    let selector = webhook["webhooks"][0]["namespaceSelector"].to_string();
    assert!(
        selector.contains(r#""operator":"In""#) && selector.contains(r#""shop""#),
        "the webhook sees only the listed namespaces: {selector}"
    );

    // The operator works with exactly these rights, in its namespaces only.
    let operator = OperatorProcess::start(&plane, "op-a", installed.webhook_port.port(), &[])
        .await
        .expect("warren-operator run");
    plane
        .apply_yaml(&reliable_queue("shop", "orders", &node, ""))
        .unwrap();
    plane
        .apply_yaml(&reliable_queue("other", "stray", &node, ""))
        .unwrap();
    wait_ready(&plane, "shop", "orders", Duration::from_secs(120));
    assert!(broker_queues(&node).await.contains("orders"));
    std::thread::sleep(Duration::from_secs(5));
    let stray = get_json(&plane, &["get", "rq", "stray", "-n", "other"]).unwrap();
    assert!(
        stray["status"].is_null() && stray["metadata"]["finalizers"].is_null(),
        "a ReliableQueue outside watchNamespaces is left alone: {stray}"
    );
    assert!(!broker_queues(&node).await.contains("stray"));
    let log = operator.log_tail(400);
    assert!(
        !log.contains("forbidden"),
        "the operator was refused something:\n{log}"
    );
}

fn lease_holder(plane: &ControlPlane) -> Result<String, String> {
    plane
        .kubectl_ok(&[
            "get",
            "lease",
            "warren-operator",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .map_err(|e| format!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_waits_for_the_api_and_sigterm_gives_up_the_lease_at_once() {
    let plane = start_plane();
    let installed = install_chart(&plane, &[]).expect("helm install");

    // Started while the API server does not answer: alive, not ready, and
    // saying what it waits for.
    let mut a =
        OperatorProcess::spawn_with(&plane, "op-a", installed.webhook_port.port(), &[], || {
            plane.signal("kube-apiserver", libc::SIGSTOP)
        })
        .await
        .expect("warren-operator run");
    let frozen = async {
        let (code, body) =
            eventually_async(Duration::from_secs(30), "/readyz to answer", || a.readyz()).await;
        assert_eq!(
            code, 503,
            "not ready while the API server is frozen: {body}"
        );
        assert!(body.contains("certificate"), "{body}");
        // Still not ready a while later: nothing but the API server can
        // make it ready.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (code, body) = a.readyz().await.unwrap();
        assert_eq!(code, 503, "{body}");
    };
    let outcome = AssertUnwindSafe(frozen).catch_unwind().await;
    plane.signal("kube-apiserver", libc::SIGCONT).unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    let mut b = OperatorProcess::start(
        &plane,
        "op-b",
        warren_testkit::reserve_port().unwrap().port(),
        &[],
    )
    .await
    .expect("operator b");
    for op in [&a, &b] {
        eventually_async(Duration::from_secs(60), "/readyz ok", || async {
            match op.readyz().await {
                Ok((200, body)) => Ok(body),
                other => Err(anyhow::anyhow!("{other:?}")),
            }
        })
        .await;
    }
    let first = eventually(Duration::from_secs(60), "a lease holder", || {
        lease_holder(&plane).and_then(|h| {
            if h.is_empty() {
                Err("none".into())
            } else {
                Ok(h)
            }
        })
    });
    let (leader, other) = if first == a.identity() {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };

    // SIGTERM: the leader stops its controllers, gives the Lease up and
    // exits promptly, with success.
    let (took, status) = leader.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after SIGTERM"
    );
    let right_after = lease_holder(&plane).unwrap();
    assert_ne!(
        right_after, first,
        "the Lease is given up at exit, not left to expire"
    );
    let released = Instant::now();
    eventually(
        Duration::from_secs(30),
        "the other replica to lead",
        || match lease_holder(&plane)? {
            h if h == other.identity() => Ok(()),
            h => Err(h),
        },
    );
    eprintln!(
        "SIGTERM: exited after {took:?}; the other replica led {:?} later",
        released.elapsed()
    );
}

/// An HTTP/1.1 pass-through that counts the requests sent through it.
struct CountingProxy {
    port: u16,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start(upstream: std::net::SocketAddr) -> CountingProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        // A request line ends in " HTTP/1.1\r\n"; it may
                        // straddle two reads.
                        let mut tail: Vec<u8> = Vec::new();
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let mut seen = std::mem::take(&mut tail);
                            seen.extend_from_slice(&buf[..n]);
                            let needle = b" HTTP/1.1\r\n";
                            let count = seen.windows(needle.len()).filter(|w| w == needle).count();
                            counter.fetch_add(count as u64, Ordering::Relaxed);
                            let keep = seen.len().min(needle.len() - 1);
                            tail = seen[seen.len() - keep..].to_vec();
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        CountingProxy {
            port,
            requests,
            task,
        }
    }

    fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `warren_operator_<name>` summed over its labels, from /metrics.
async fn operator_metric(op: &OperatorProcess, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", op.admin_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("warren_operator_{name}")) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn reconciles_api_writes_and_management_calls_stay_bounded() {
    const RESYNC: u64 = 10;
    const WINDOW: Duration = Duration::from_secs(120);
    let plane = start_plane();
    let installed = install_chart(&plane, &["operator.resync=10s"]).expect("helm install");
    let node = tokio::task::block_in_place(RabbitNode::start).expect("rabbitmq node");
    let management: std::net::SocketAddr = node
        .management_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("the management address");
    let proxy = CountingProxy::start(management).await;
    let operator = OperatorProcess::start(&plane, "op-a", installed.webhook_port.port(), &[])
        .await
        .expect("warren-operator run");
    let ns = "storm";
    plane.apply_yaml(&broker_secret(ns, &node)).unwrap();
    for name in ["idle", "busy"] {
        let rq = reliable_queue(ns, name, &node, "").replace(
            &node.management_url(),
            &format!("http://127.0.0.1:{}", proxy.port),
        );
        plane.apply_yaml(&rq).unwrap();
    }
    for name in ["idle", "busy"] {
        wait_ready(&plane, ns, name, Duration::from_secs(120));
    }

    // Every change of the ReliableQueues, as a watcher sees it.
    let events_file = tempfile::NamedTempFile::new().unwrap();
    let mut watch = plane
        .kubectl()
        .args([
            "get",
            "rq",
            "-n",
            ns,
            "--watch-only",
            "--output-watch-events",
            "-o",
            "name",
        ])
        .stdout(events_file.reopen().unwrap())
        .spawn()
        .expect("kubectl get --watch");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reconciles_before = operator_metric(&operator, "reconciliations_total").await;
    let requests_before = proxy.requests();

    // A steady stream into `busy`: its counts change all the time.
    let connection = node.amqp_connection().await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let started = Instant::now();
    let mut published = 0u64;
    while started.elapsed() < WINDOW {
        channel
            .basic_publish(
                "busy".into(),
                // The work queue's default binding key: its name.
                "busy".into(),
                lapin::options::BasicPublishOptions::default(),
                b"tick",
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
        published += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reconciles = operator_metric(&operator, "reconciliations_total").await - reconciles_before;
    let requests = proxy.requests() - requests_before;
    let _ = watch.kill();
    let _ = watch.wait();
    // One line per change seen (`reliablequeue.warren.dev/busy`); nothing
    // is created or deleted meanwhile, so each is a write.
    let writes = std::fs::read_to_string(events_file.path())
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("reliablequeue"))
        .count() as f64;
    let busy = get_json(&plane, &["get", "rq", "busy", "-n", ns]).unwrap();
    eprintln!(
        "over {WINDOW:?} with {published} messages published: {reconciles} reconciles, \
         {writes} ReliableQueue writes, {requests} management API requests; counts {}",
        busy["status"]["counts"]
    );
    // Each queue is looked at every RESYNC; a little slack for the watch
    // restarting. A status write that triggered the next reconcile would
    // give hundreds.
    let per_queue = (WINDOW.as_secs() / RESYNC + 2) as f64;
    assert!(
        reconciles <= 2.0 * per_queue,
        "{reconciles} reconciles in {WINDOW:?}"
    );
    assert!(writes <= 2.0 * per_queue, "{writes} writes in {WINDOW:?}");
    // The busy queue's counts are written on each re-check.
    assert!(
        writes >= (WINDOW.as_secs() / RESYNC - 2) as f64,
        "the counts of the busy queue are refreshed every {RESYNC}s: {writes} writes"
    );
    assert!(
        reconciles >= 2.0 * (WINDOW.as_secs() / RESYNC - 2) as f64,
        "the queues are still re-checked every {RESYNC}s: {reconciles}"
    );
    // The management API: what those reconciles need, and no more.
    let per_reconcile = requests as f64 / reconciles.max(1.0);
    assert!(
        per_reconcile < 40.0 && (requests as f64) <= 2.0 * per_queue * 40.0,
        "{requests} management requests for {reconciles} reconciles"
    );
    // The counts are fresh within a re-check interval.
    let ready = busy["status"]["counts"]["ready"].as_i64().unwrap_or(0) as u64;
    assert!(
        ready + 20 * RESYNC * 2 >= published,
        "counts lag: {ready} of {published}"
    );
}

/// The `BrokerObjectsLeft` events (events.k8s.io) in namespace `ns`.
fn objects_left_events(plane: &ControlPlane, ns: &str) -> Result<Vec<Value>, String> {
    let events = get_json(plane, &["get", "events.events.k8s.io", "-n", ns])?;
    Ok(events["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["reason"] == warren_operator::controller::OBJECTS_LEFT)
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn deletions_finish_without_the_broker_secret() {
    let plane = start_plane();
    let installed = install_chart(&plane, &[]).expect("helm install");
    let node = tokio::task::block_in_place(RabbitNode::start).expect("rabbitmq node");
    let op = OperatorProcess::start(&plane, "op-a", installed.webhook_port.port(), &[])
        .await
        .expect("warren-operator run");
    // `ledger` is deleted with its namespace, `audit` with the
    // force-delete annotation; both lose their Secret first.
    for (ns, name, annotations) in [
        ("doomed", "ledger", ""),
        (
            "forced",
            "audit",
            "  annotations:\n    warren.dev/force-delete: \"true\"\n",
        ),
    ] {
        plane.apply_yaml(&broker_secret(ns, &node)).unwrap();
        let rq = reliable_queue(ns, name, &node, "  deletionPolicy: Delete\n").replacen(
            "\nspec:",
            &format!("\n{annotations}spec:"),
            1,
        );
        plane.apply_yaml(&rq).unwrap();
        wait_ready(&plane, ns, name, Duration::from_secs(120));
    }
    assert!(broker_queues(&node).await.contains("ledger"));

    // What `kubectl delete namespace` may do: the Secret goes first.
    plane
        .kubectl_ok(&["delete", "secret", "broker", "-n", "doomed"])
        .unwrap();
    let started = Instant::now();
    plane
        .kubectl_ok(&["delete", "namespace", "doomed", "--wait=false"])
        .unwrap();
    eventually(
        Duration::from_secs(120),
        "namespace doomed to be gone",
        || match plane.kubectl_ok(&["get", "namespace", "doomed", "-o", "name"]) {
            Err(e) if format!("{e:#}").contains("NotFound") => Ok(()),
            Err(e) => Err(format!("{e:#}")),
            Ok(out) => Err(format!(
                "still there: {out}; operator log:\n{}",
                op.log_tail(20)
            )),
        },
    );
    let took = started.elapsed();
    eprintln!("namespace doomed was deleted in {took:?}");
    assert!(took < Duration::from_secs(90), "took {took:?}");
    // No event can be created in a namespace being deleted: the warning
    // is on the Namespace, in `default`.
    let events = eventually(Duration::from_secs(10), "the warning", || {
        let e = objects_left_events(&plane, "default")?;
        if e.is_empty() {
            Err("none".into())
        } else {
            Ok(e)
        }
    });
    let event = &events[0];
    assert_eq!(event["type"], "Warning", "{event}");
    assert_eq!(event["regarding"]["kind"], "Namespace", "{event}");
    assert_eq!(event["regarding"]["name"], "doomed", "{event}");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with("ReliableQueue doomed/ledger: Secret doomed/broker does not exist")
            && note.contains("queues ledger, ledger.parked, ledger.retry.")
            && note.contains("exchanges ledger.retry"),
        "{note}"
    );
    // Left, as the event says.
    let queues = broker_queues(&node).await;
    assert!(
        queues.contains("ledger") && queues.contains("ledger.parked"),
        "{queues:?}"
    );

    // force-delete without the Secret: the resource goes, the event is
    // on it.
    plane
        .kubectl_ok(&["delete", "secret", "broker", "-n", "forced"])
        .unwrap();
    plane
        .kubectl_ok(&["delete", "rq", "audit", "-n", "forced", "--timeout=60s"])
        .expect("the finalizer is released");
    let events = objects_left_events(&plane, "forced").unwrap();
    let event = events.first().expect("a BrokerObjectsLeft event");
    assert_eq!(event["regarding"]["kind"], "ReliableQueue", "{event}");
    assert_eq!(event["regarding"]["name"], "audit", "{event}");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with("Secret forced/broker does not exist")
            && note.contains("queues audit, audit.parked"),
        "{note}"
    );
}

/// The status of RetryPolicy `name` in `shop` once the operator has written
/// the given generation, as (Valid status, tiers); `Err` until then.
fn rp_status(plane: &ControlPlane, name: &str, generation: i64) -> Result<(Value, Value), String> {
    let rp = get_json(plane, &["get", "rp", name, "-n", SHOP])?;
    let status = &rp["status"];
    if status["observedGeneration"] != generation {
        return Err(rp.to_string());
    }
    let valid = status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Valid"))
        .cloned()
        .ok_or_else(|| rp.to_string())?;
    Ok((valid, status["tiers"].clone()))
}

/// The row of RetryPolicy `name` in `kubectl get rp` without its name and
/// age: Max Retries, Strategy and Tiers.
fn rp_row(plane: &ControlPlane, name: &str) -> Result<String, String> {
    let out = plane
        .kubectl_ok(&["get", "rp", "-n", SHOP])
        .map_err(|e| format!("{e:#}"))?;
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    if header != ["NAME", "MAX", "RETRIES", "STRATEGY", "TIERS", "AGE"] {
        return Err(format!("unexpected header: {out}"));
    }
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .ok_or_else(|| out.clone())?;
    let cols: Vec<&str> = line.split_whitespace().collect();
    Ok(cols[1..cols.len() - 1].join(" "))
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_policy_status_and_consumer_settings_from_annotations() {
    // The operator runs as the chart's ServiceAccount, with its RBAC only.
    let shop = shop(&[]).await;
    let plane = &shop.plane;
    let ns = SHOP;

    // A RetryPolicy gets Valid=True and the tiers its plan creates.
    plane
        .apply_yaml(
            "apiVersion: warren.dev/v1alpha1\nkind: RetryPolicy\nmetadata:\n  name: standard\n  namespace: shop\n\
             spec:\n  maxRetries: 3\n  backoff:\n    initial: 1s\n    multiplier: 2\n    max: 1m\n",
        )
        .unwrap();
    let (valid, tiers) = eventually(Duration::from_secs(60), "the status of standard", || {
        rp_status(plane, "standard", 1)
    });
    assert_eq!(valid["status"], "True", "{valid}");
    assert_eq!(valid["reason"], "Valid", "{valid}");
    assert_eq!(valid["observedGeneration"], 1, "{valid}");
    assert_eq!(tiers, serde_json::json!(["1s", "2s", "4s"]));
    assert_eq!(
        rp_row(plane, "standard").unwrap(),
        r#"3 ttlTiers ["1s","2s","4s"]"#
    );
    // Written by server-side apply under the operator's field manager.
    let rp = get_json(
        plane,
        &["get", "rp", "standard", "-n", ns, "--show-managed-fields"],
    )
    .unwrap();
    assert!(
        rp["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["manager"] == "warren-operator"
                && m["operation"] == "Apply"
                && m["subresource"] == "status"),
        "{rp}"
    );
    // Written once: its own write does not make the operator write again.
    let version = rp["metadata"]["resourceVersion"].clone();
    std::thread::sleep(Duration::from_secs(5));
    let again = get_json(plane, &["get", "rp", "standard", "-n", ns]).unwrap();
    assert_eq!(
        again["metadata"]["resourceVersion"], version,
        "the status was written again: {again}"
    );

    // A change of the policy updates the tiers (and the column).
    plane
        .kubectl_ok(&[
            "patch",
            "rp",
            "standard",
            "-n",
            ns,
            "--type=merge",
            "-p",
            r#"{"spec":{"maxRetries":5,"backoff":{"initial":"500ms","max":"4s"}}}"#,
        ])
        .unwrap();
    let (valid, tiers) = eventually(Duration::from_secs(60), "the new tiers", || {
        rp_status(plane, "standard", 2)
    });
    assert_eq!(valid["status"], "True", "{valid}");
    assert_eq!(tiers, serde_json::json!(["500ms", "1s", "2s", "4s"]));
    assert_eq!(
        rp_row(plane, "standard").unwrap(),
        r#"5 ttlTiers ["500ms","1s","2s","4s"]"#
    );

    // The delayed-message strategy has no tiers.
    plane
        .apply_yaml(
            "apiVersion: warren.dev/v1alpha1\nkind: RetryPolicy\nmetadata:\n  name: delayed\n  namespace: shop\n\
             spec:\n  delayStrategy: delayedMessageExchange\n",
        )
        .unwrap();
    let (valid, tiers) = eventually(Duration::from_secs(60), "the status of delayed", || {
        rp_status(plane, "delayed", 1)
    });
    assert_eq!(valid["status"], "True", "{valid}");
    assert_eq!(tiers, serde_json::json!([]), "{valid}");
    // Every policy the planner refuses is refused by the schema before the
    // operator sees it.
    let refused = plane
        .apply_yaml(
            "apiVersion: warren.dev/v1alpha1\nkind: RetryPolicy\nmetadata:\n  name: broken\n  namespace: shop\n\
             spec:\n  backoff:\n    initial: 10s\n    max: 1s\n",
        )
        .expect_err("max below initial is refused");
    assert!(
        format!("{refused:#}").contains("backoff.max must be at least backoff.initial"),
        "{refused:#}"
    );

    // Consumer settings per workload: a Deployment's annotations reach the
    // injected sidecar's config. Opted in by label and annotation alike.
    let template_meta = |name: &str, settings: &str| {
        format!(
            "      labels: {{app: {name}, warren.dev/inject: enabled}}\n      annotations:\n\
             \x20       warren.dev/inject: enabled\n        warren.dev/queues: orders\n\
             \x20       warren.dev/app-port: \"8080\"\n{settings}"
        )
    };
    let settings = "        warren.dev/consumer-prefetch: \"40\"\n\
                    \x20       warren.dev/consumer-concurrency: \"3\"\n\
                    \x20       warren.dev/delivery-timeout: 45s\n";
    plane
        .apply_yaml(&format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: tuned\n  namespace: shop\n\
             spec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: tuned}}\n\
             \x20 template:\n    metadata:\n{}    spec:\n      containers:\n\
             \x20       - name: app\n          image: registry.example.com/tuned:1\n",
            template_meta("tuned", settings)
        ))
        .unwrap();
    let pod = eventually(Duration::from_secs(60), "the pod of tuned", || {
        pods(plane, ns, "app=tuned")
            .into_iter()
            .next()
            .ok_or_else(|| "no pod".to_string())
    });
    let sidecar = pod["spec"]["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "warren-sidecar"))
        .unwrap_or_else(|| panic!("no sidecar: {pod}"));
    let config = sidecar["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "WARREN_CONFIG_JSON"))
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("no consumer config: {sidecar}"));
    let config: Value = serde_json::from_str(config).unwrap();
    assert_eq!(config["app"]["concurrency"], 3, "{config}");
    assert_eq!(config["app"]["timeout"], "45s", "{config}");
    assert_eq!(config["queues"][0]["name"], "orders", "{config}");
    assert_eq!(config["queues"][0]["prefetch"], 40, "{config}");

    // A bad value: the API server refuses the pod with the webhook's
    // message, which names the annotation and the accepted range.
    let bad = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: impatient\n  namespace: shop\n{}\
         spec:\n  containers:\n    - name: app\n      image: registry.example.com/tuned:1\n",
        template_meta(
            "impatient",
            "        warren.dev/delivery-timeout: forever\n"
        )
        .lines()
        .map(|l| format!("{}\n", &l[4..]))
        .collect::<String>()
    );
    let refused = plane.apply_yaml(&bad).expect_err("the pod is refused");
    let text = format!("{refused:#}");
    assert!(
        text.contains("admission webhook")
            && text.contains("annotation warren.dev/delivery-timeout: ")
            && text.contains("forever")
            && text.contains("is not a duration from 1ms to 14m"),
        "{text}"
    );
    let gone = plane.kubectl_ok(&["get", "pod", "impatient", "-n", ns]);
    assert!(gone.is_err(), "the refused pod exists: {gone:?}");
}
