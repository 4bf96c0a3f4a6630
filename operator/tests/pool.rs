//! Outbox claims against an in-memory API server behind kube-rs's mocked
//! service: pods racing for a claim, a freed claim taken again, a named
//! claim refused while drained, and an idle claim drained by a Job (idle
//! counted from its release) and then removed as the pool shrinks.

mod fake;

use std::collections::BTreeSet;

use fake::FakeApi;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};
use warren_operator::inject::{BrokerBinding, InjectionConfig, broker_env};
use warren_operator::pool::{
    CLAIMED_AT, ClaimPool, ClaimSource, DRAINED_AT, DRAINING, PoolAction, PoolError, PoolKeeper,
    RELEASED_AT, SIDECAR_ENV, Workload,
};

fn source() -> ClaimSource {
    ClaimSource::Pool {
        key: "deployment-orders-api".into(),
        workload: Workload {
            kind: "Deployment".into(),
            name: "orders-api".into(),
        },
    }
}

fn claim(name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name, "namespace": "shop",
            "labels": {"app.kubernetes.io/managed-by": "warren", "warren.dev/pool": "deployment-orders-api"},
            "annotations": annotations,
        },
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    })
}

fn pod(name: &str, claim: &str, phase: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"warren.dev/outbox-claim": claim}},
        "spec": {"containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": phase},
    })
}

fn ago(secs: i64) -> String {
    (Timestamp::now() - SignedDuration::from_secs(secs)).to_string()
}

fn env() -> Vec<k8s_openapi::api::core::v1::EnvVar> {
    broker_env(&BrokerBinding {
        secret_name: "rabbit".into(),
        vhost: "/".into(),
    })
}

#[tokio::test]
async fn two_pods_racing_for_one_free_claim_get_different_claims() {
    let mut api = FakeApi::new();
    api.put(
        "persistentvolumeclaims",
        claim(
            "warren-outbox-deployment-orders-api-0",
            json!({CLAIMED_AT: ago(3600)}),
        ),
    );
    // Both admissions list the pool before either writes: both see claim 0
    // free and both try to take it.
    api.hold_claim_lists = 2;
    let (client, _server) = api.client();
    let pool = ClaimPool::new(client, InjectionConfig::default());
    let (source, env) = (source(), env());
    let (a, b) = tokio::join!(
        pool.acquire("shop", &source, &env, Timestamp::now()),
        pool.acquire("shop", &source, &env, Timestamp::now()),
    );
    let got: BTreeSet<String> = [a.unwrap(), b.unwrap()].into();
    assert_eq!(
        got,
        BTreeSet::from([
            "warren-outbox-deployment-orders-api-0".to_string(),
            "warren-outbox-deployment-orders-api-1".to_string()
        ])
    );
    let log = api.log();
    let conflicts = log.iter().filter(|s| s.status == 409).count();
    assert_eq!(conflicts, 1, "exactly one write lost the race: {log:#?}");
    // The winner's write carried the resourceVersion it had read.
    let patch = log
        .iter()
        .find(|s| s.method == http::Method::PATCH)
        .unwrap();
    assert!(
        patch.body["metadata"]["resourceVersion"].is_string(),
        "{:?}",
        patch.body
    );
    // The new claim is a proper claim of the pool, with the broker env for
    // a later drain.
    let new = api
        .get(
            "persistentvolumeclaims",
            "shop",
            "warren-outbox-deployment-orders-api-1",
        )
        .unwrap();
    assert_eq!(
        new["metadata"]["labels"]["warren.dev/pool"],
        "deployment-orders-api"
    );
    assert_eq!(
        new["metadata"]["annotations"]["warren.dev/workload"],
        "Deployment/orders-api"
    );
    assert_eq!(new["spec"]["resources"]["requests"]["storage"], "1Gi");
    let recorded: Vec<k8s_openapi::api::core::v1::EnvVar> = serde_json::from_str(
        new["metadata"]["annotations"][SIDECAR_ENV]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(recorded, env);
}

#[tokio::test]
async fn a_freed_claim_is_taken_by_the_next_pod() {
    let api = FakeApi::new();
    api.put(
        "persistentvolumeclaims",
        claim(
            "warren-outbox-deployment-orders-api-0",
            json!({CLAIMED_AT: ago(3600)}),
        ),
    );
    api.put(
        "persistentvolumeclaims",
        claim(
            "warren-outbox-deployment-orders-api-1",
            json!({CLAIMED_AT: ago(3600)}),
        ),
    );
    api.put(
        "pods",
        pod(
            "orders-api-abc",
            "warren-outbox-deployment-orders-api-0",
            "Running",
        ),
    );
    api.put(
        "pods",
        pod(
            "orders-api-def",
            "warren-outbox-deployment-orders-api-1",
            "Running",
        ),
    );
    let (client, _server) = api.client();
    let pool = ClaimPool::new(client, InjectionConfig::default());

    // Both claims held: a third pod gets a new claim.
    let third = pool
        .acquire("shop", &source(), &env(), Timestamp::now())
        .await
        .unwrap();
    assert_eq!(third, "warren-outbox-deployment-orders-api-2");
    // A claim handed out a moment ago counts as held even before its pod
    // shows up.
    api.put("pods", pod("orders-api-ghi", &third, "Pending"));

    // The pod holding claim 1 is deleted (rolling update): the next pod
    // takes claim 1, and no new claim is made.
    api.remove("pods", "shop", "orders-api-def");
    let next = pool
        .acquire("shop", &source(), &env(), Timestamp::now())
        .await
        .unwrap();
    assert_eq!(next, "warren-outbox-deployment-orders-api-1");
    assert_eq!(api.all("persistentvolumeclaims").len(), 3);
    let c1 = api.get("persistentvolumeclaims", "shop", &next).unwrap();
    let claimed: Timestamp = c1["metadata"]["annotations"][CLAIMED_AT]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(Timestamp::now().duration_since(claimed) < SignedDuration::from_secs(60));

    // Just handed out: not handed out again, even with no pod holding it
    // yet.
    let after = pool
        .acquire("shop", &source(), &env(), Timestamp::now())
        .await
        .unwrap();
    assert_eq!(after, "warren-outbox-deployment-orders-api-3");

    // A claim being drained is not handed out either.
    api.put(
        "persistentvolumeclaims",
        claim(
            "warren-outbox-deployment-orders-api-9",
            json!({CLAIMED_AT: ago(3600), DRAINING: "job"}),
        ),
    );
    let skip = pool
        .acquire("shop", &source(), &env(), Timestamp::now())
        .await
        .unwrap();
    assert_eq!(skip, "warren-outbox-deployment-orders-api-4");
}

#[tokio::test]
async fn a_statefulset_pod_gets_the_claim_of_its_ordinal() {
    let api = FakeApi::new();
    let (client, _server) = api.client();
    let pool = ClaimPool::new(client, InjectionConfig::default());
    let named = ClaimSource::Named("warren-outbox-ledger-1".into());
    assert_eq!(
        pool.acquire("shop", &named, &env(), Timestamp::now())
            .await
            .unwrap(),
        "warren-outbox-ledger-1"
    );
    let first = api
        .get("persistentvolumeclaims", "shop", "warren-outbox-ledger-1")
        .unwrap();
    // The same ordinal again (pod recreated): the same claim, not a new one.
    assert_eq!(
        pool.acquire("shop", &named, &env(), Timestamp::now())
            .await
            .unwrap(),
        "warren-outbox-ledger-1"
    );
    assert_eq!(api.all("persistentvolumeclaims").len(), 1);
    let again = api
        .get("persistentvolumeclaims", "shop", "warren-outbox-ledger-1")
        .unwrap();
    assert_eq!(first["metadata"]["uid"], again["metadata"]["uid"]);
    assert_ne!(
        first["metadata"]["resourceVersion"], again["metadata"]["resourceVersion"],
        "handed out again, by a write"
    );
}

#[tokio::test]
async fn a_named_claim_being_drained_is_refused_and_handed_out_once_drained() {
    let api = FakeApi::new();
    let mut c = claim(
        "warren-outbox-ledger-0",
        json!({CLAIMED_AT: ago(900), RELEASED_AT: ago(600), DRAINING: "warren-drain-warren-outbox-ledger-0"}),
    );
    c["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": "warren"});
    api.put("persistentvolumeclaims", c);
    let (client, _server) = api.client();
    let pool = ClaimPool::new(client, InjectionConfig::default());
    let named = ClaimSource::Named("warren-outbox-ledger-0".into());
    let before = api
        .get("persistentvolumeclaims", "shop", "warren-outbox-ledger-0")
        .unwrap();
    let e = pool
        .acquire("shop", &named, &env(), Timestamp::now())
        .await
        .unwrap_err();
    assert!(matches!(e, PoolError::Draining { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("is being drained by Job warren-drain-warren-outbox-ledger-0"),
        "{e}"
    );
    let untouched = api
        .get("persistentvolumeclaims", "shop", "warren-outbox-ledger-0")
        .unwrap();
    assert_eq!(untouched, before, "a refused pod writes nothing");

    // The drain ended (the keeper removed the mark): the pod gets it, and
    // the release no longer counts.
    let mut drained = untouched.clone();
    drained["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(DRAINING);
    api.put("persistentvolumeclaims", drained);
    let now = Timestamp::now();
    pool.acquire("shop", &named, &env(), now).await.unwrap();
    let taken = api
        .get("persistentvolumeclaims", "shop", "warren-outbox-ledger-0")
        .unwrap();
    assert_eq!(
        taken["metadata"]["annotations"][CLAIMED_AT],
        now.to_string()
    );
    assert!(
        taken["metadata"]["annotations"][RELEASED_AT].is_null(),
        "{taken}"
    );
}

fn deployment(replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "orders-api", "namespace": "shop"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "a"}},
                 "template": {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "a", "image": "a"}]}}},
    })
}

#[tokio::test]
async fn an_orphan_claim_is_drained_by_a_job_and_then_the_pool_shrinks() {
    let api = FakeApi::new();
    let env_json = serde_json::to_string(&env()).unwrap();
    api.put("deployments", deployment(1));
    // Claim 0 is held; claim 1 was left by a pod deleted 10 minutes ago,
    // perhaps with messages in it.
    api.put(
        "persistentvolumeclaims",
        claim(
            "warren-outbox-deployment-orders-api-0",
            json!({CLAIMED_AT: ago(3600), SIDECAR_ENV: env_json}),
        ),
    );
    api.put(
        "persistentvolumeclaims",
        claim(
            "warren-outbox-deployment-orders-api-1",
            json!({CLAIMED_AT: ago(600), SIDECAR_ENV: env_json}),
        ),
    );
    api.put(
        "pods",
        pod(
            "orders-api-abc",
            "warren-outbox-deployment-orders-api-0",
            "Running",
        ),
    );
    let (client, _server) = api.client();
    let keeper = PoolKeeper {
        scope: Default::default(),
        client,
        config: InjectionConfig::default(),
    };

    // Pass 1: the keeper sees the orphan released: it records when, and
    // drains nothing yet, although its hand-out is 10 minutes old.
    let actions = keeper.run_once(Timestamp::now()).await.unwrap();
    assert_eq!(
        actions,
        vec![PoolAction::Released {
            namespace: "shop".into(),
            claim: "warren-outbox-deployment-orders-api-1".into()
        }]
    );
    assert!(api.all("jobs").is_empty());
    let released = api
        .get(
            "persistentvolumeclaims",
            "shop",
            "warren-outbox-deployment-orders-api-1",
        )
        .unwrap();
    assert!(released["metadata"]["annotations"][RELEASED_AT].is_string());
    assert_eq!(keeper.run_once(Timestamp::now()).await.unwrap(), vec![]);

    // idleBeforeDrain (2 minutes) after the release: a drain Job for the
    // orphan; the claim is marked first.
    let later = Timestamp::now() + SignedDuration::from_secs(121);
    let actions = keeper.run_once(later).await.unwrap();
    assert_eq!(
        actions,
        vec![PoolAction::Drain {
            namespace: "shop".into(),
            claim: "warren-outbox-deployment-orders-api-1".into()
        }]
    );
    let jobs = api.all("jobs");
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    let pod_spec = &job["spec"]["template"]["spec"];
    assert_eq!(pod_spec["containers"][0]["args"], json!(["--drain"]));
    assert_eq!(
        pod_spec["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "warren-outbox-deployment-orders-api-1"
    );
    let env_names: Vec<&str> = pod_spec["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        env_names.contains(&"WARREN_BROKER_USERNAME") && env_names.contains(&"WARREN_DATA_DIR"),
        "{env_names:?}"
    );
    assert_eq!(
        job["spec"]["template"]["metadata"]["annotations"]["warren.dev/inject"],
        "disabled"
    );
    let marked = api
        .get(
            "persistentvolumeclaims",
            "shop",
            "warren-outbox-deployment-orders-api-1",
        )
        .unwrap();
    assert_eq!(
        marked["metadata"]["annotations"][DRAINING],
        job["metadata"]["name"]
    );

    assert_eq!(
        job["spec"]["activeDeadlineSeconds"], 1800,
        "the default drainDeadline"
    );

    // The Job has not finished: nothing new.
    assert_eq!(keeper.run_once(later).await.unwrap(), vec![]);
    assert_eq!(api.all("jobs").len(), 1);

    // The Job completes: the claim is marked drained…
    let mut done = job.clone();
    done["status"] =
        json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
    api.put("jobs", done);
    let actions = keeper.run_once(later).await.unwrap();
    assert!(
        matches!(&actions[..], [PoolAction::Drained { ok: true, .. }]),
        "{actions:?}"
    );
    let drained = api
        .get(
            "persistentvolumeclaims",
            "shop",
            "warren-outbox-deployment-orders-api-1",
        )
        .unwrap();
    assert!(drained["metadata"]["annotations"][DRAINED_AT].is_string());
    assert!(drained["metadata"]["annotations"][DRAINING].is_null());

    // …and, the Deployment wanting one replica, deleted on the next pass.
    let actions = keeper.run_once(later).await.unwrap();
    assert_eq!(
        actions,
        vec![PoolAction::Delete {
            namespace: "shop".into(),
            claim: "warren-outbox-deployment-orders-api-1".into()
        }]
    );
    assert!(
        api.get(
            "persistentvolumeclaims",
            "shop",
            "warren-outbox-deployment-orders-api-1"
        )
        .is_none()
    );
    assert!(
        api.get(
            "persistentvolumeclaims",
            "shop",
            "warren-outbox-deployment-orders-api-0"
        )
        .is_some(),
        "the held claim stays"
    );
}

#[tokio::test]
async fn a_failed_drain_keeps_the_claim() {
    let api = FakeApi::new();
    api.put("deployments", deployment(0));
    api.put(
        "persistentvolumeclaims",
        claim(
            "warren-outbox-deployment-orders-api-0",
            json!({CLAIMED_AT: ago(600)}),
        ),
    );
    let (client, _server) = api.client();
    let keeper = PoolKeeper {
        scope: Default::default(),
        client,
        config: InjectionConfig::default(),
    };
    keeper.run_once(Timestamp::now()).await.unwrap();
    let later = Timestamp::now() + SignedDuration::from_secs(121);
    keeper.run_once(later).await.unwrap();
    let mut job = api.all("jobs").remove(0);
    job["status"] = json!({"failed": 4, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]});
    api.put("jobs", job);
    keeper.run_once(later).await.unwrap();
    // Further passes neither delete it (it holds what the broker refused)
    // nor start Job after Job.
    for _ in 0..2 {
        assert_eq!(keeper.run_once(later).await.unwrap(), vec![]);
    }
    let kept = api
        .get(
            "persistentvolumeclaims",
            "shop",
            "warren-outbox-deployment-orders-api-0",
        )
        .unwrap();
    assert_eq!(
        kept["metadata"]["annotations"]["warren.dev/drain-failed"],
        "Job has reached the specified backoff limit"
    );
}
