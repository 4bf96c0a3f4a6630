//! The transactional outbox relay against a private PostgreSQL cluster and
//! a private RabbitMQ node, with an account by `message_id`: a row counts
//! as acknowledged when the writer's transaction committed, and every
//! acknowledged row must be consumed from the queue (lost = 0). Rows of
//! rolled-back transactions must never arrive (unexpected = 0 where no
//! commit was ambiguous).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    EXCHANGE, KEY, QUEUE, consume_all, declare_topology, on_node, start_node, wait_until,
};
use tokio::task::JoinHandle;
use warren_sidecar::Running;
use warren_testkit::{Account, PgCluster, RabbitNode, SidecarOptions, SidecarProcess, TestCa};

/// The DDL the project ships.
const DDL: &str = include_str!("../sql/warren_outbox.sql");

/// A business table the writers change in the same transactions.
const BUSINESS: &str = "CREATE TABLE orders (id bigserial PRIMARY KEY, note text NOT NULL);
    CREATE TABLE aggregates (id text PRIMARY KEY, version bigint NOT NULL DEFAULT 0);
    ALTER TABLE warren_outbox ADD COLUMN aggregate_id text, ADD COLUMN seq bigint;
    CREATE INDEX warren_outbox_aggregate_id ON warren_outbox (aggregate_id, id);";

async fn start_pg() -> PgCluster {
    let pg = tokio::task::spawn_blocking(|| PgCluster::start().expect("start PostgreSQL"))
        .await
        .unwrap();
    let c = pg.client().await.unwrap();
    c.batch_execute(DDL).await.expect("shipped DDL applies");
    c.batch_execute(DDL)
        .await
        .expect("shipped DDL is idempotent");
    c.batch_execute(BUSINESS).await.unwrap();
    pg
}

async fn on_pg(
    mut pg: PgCluster,
    f: impl FnOnce(&mut PgCluster) -> anyhow::Result<()> + Send + 'static,
) -> PgCluster {
    tokio::task::spawn_blocking(move || {
        f(&mut pg).expect("postgres operation");
        pg
    })
    .await
    .unwrap()
}

/// An in-process sidecar relaying from `pg_url`.
async fn relay_sidecar(broker: &str, dir: &Path, pg_url: &str, order_by: Option<&str>) -> Running {
    let mut c = common::test_config(broker, dir);
    c.relay_postgres = Some(pg_url.to_owned());
    c.relay_order_by = order_by.map(str::to_owned);
    c.relay_poll_interval = Duration::from_millis(500);
    c.relay_batch = 100;
    warren_sidecar::start(c).await.expect("sidecar starts")
}

async fn relay_report(api: std::net::SocketAddr) -> serde_json::Value {
    common::client()
        .get(format!("http://{api}/v1/relay"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn count(c: &tokio_postgres::Client, table: &str) -> i64 {
    c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Inserts one outbox row (and a business row) in `tx`.
async fn insert_row(
    tx: &tokio_postgres::Transaction<'_>,
    id: &str,
    aggregate: Option<(&str, i64)>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute("INSERT INTO orders (note) VALUES ($1)", &[&id])
        .await?;
    let (agg, seq) = aggregate.unzip();
    tx.execute(
        "INSERT INTO warren_outbox (message_id, exchange, routing_key, payload, headers, content_type, aggregate_id, seq) \
         VALUES ($1, $2, $3, $4, '{\"source\":\"test\"}', 'text/plain', $5, $6)",
        &[&id, &EXCHANGE, &KEY, &id.as_bytes(), &agg, &seq],
    )
    .await?;
    Ok(())
}

/// Writers that commit business and outbox rows together and roll back
/// every `rollback_every`-th transaction; they reconnect after failures.
struct Writers {
    tasks: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// Transactions committed.
    committed: Arc<AtomicU64>,
    /// Ids of rolled-back transactions: must never arrive.
    rolled_back: Arc<std::sync::Mutex<HashSet<String>>>,
    /// Commits whose outcome is unknown (connection lost during COMMIT).
    ambiguous: Arc<AtomicU64>,
}

impl Writers {
    fn start(
        url: &str,
        account: &Account,
        prefix: &str,
        writers: usize,
        per_writer: usize,
        rollback_every: usize,
        pace: Duration,
    ) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let ambiguous = Arc::new(AtomicU64::new(0));
        let rolled_back = Arc::new(std::sync::Mutex::new(HashSet::new()));
        let tasks = (0..writers)
            .map(|w| {
                let (url, account, prefix) = (url.to_owned(), account.clone(), prefix.to_owned());
                let (stop, committed, ambiguous, rolled_back) = (
                    stop.clone(),
                    committed.clone(),
                    ambiguous.clone(),
                    rolled_back.clone(),
                );
                tokio::spawn(async move {
                    let mut client: Option<tokio_postgres::Client> = None;
                    let mut i = 0;
                    while i < per_writer && !stop.load(Ordering::Relaxed) {
                        if client.as_ref().is_none_or(|c| c.is_closed()) {
                            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                                Ok((c, conn)) => {
                                    tokio::spawn(conn);
                                    client = Some(c);
                                }
                                Err(_) => {
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    continue;
                                }
                            }
                        }
                        let c = client.as_mut().expect("connected above");
                        let id = format!("{prefix}-{w}-{i}");
                        let rollback =
                            rollback_every > 0 && i % rollback_every == rollback_every - 1;
                        let Ok(tx) = c.transaction().await else {
                            client = None;
                            continue;
                        };
                        if insert_row(&tx, &id, None).await.is_err() {
                            drop(tx);
                            client = None;
                            continue; // never committed: retried under a new id
                        }
                        if rollback {
                            rolled_back.lock().unwrap().insert(id.clone());
                            let _ = tx.rollback().await;
                        } else {
                            match tx.commit().await {
                                Ok(()) => {
                                    account.record_acked(id);
                                    committed.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(_) => {
                                    // Committed or not: nobody can say. If it
                                    // arrives it counts as unexpected.
                                    ambiguous.fetch_add(1, Ordering::Relaxed);
                                    client = None;
                                }
                            }
                        }
                        i += 1;
                        if !pace.is_zero() {
                            tokio::time::sleep(pace).await;
                        }
                    }
                })
            })
            .collect();
        Writers {
            tasks,
            stop,
            committed,
            rolled_back,
            ambiguous,
        }
    }

    async fn finish(mut self) -> Self {
        for t in self.tasks.iter_mut() {
            t.await.unwrap();
        }
        self
    }
}

/// Checks that no rolled-back id arrived.
fn assert_no_rolled_back(
    account: &Account,
    rolled_back: &HashSet<String>,
    received: &[(String, Vec<u8>)],
) {
    let leaked: Vec<&String> = received
        .iter()
        .map(|(id, _)| id)
        .filter(|id| rolled_back.contains(*id))
        .collect();
    assert!(
        leaked.is_empty(),
        "rows of rolled-back transactions arrived: {leaked:?} ({})",
        account.report()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_rows_arrive_and_rolled_back_rows_never_do() {
    warren_testkit::init_tracing();
    let (node, pg) = tokio::join!(start_node(), start_pg());
    declare_topology(&node).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = relay_sidecar(&node.amqp_url(), dir.path(), &pg.url(), None).await;
    let account = Account::new();
    let writers = Writers::start(&pg.url(), &account, "tx", 4, 150, 3, Duration::ZERO)
        .finish()
        .await;
    let received = consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(60)).await;
    let report = account.report();
    println!(
        "committed+rolled back: {report}, rolled back {}",
        writers.rolled_back.lock().unwrap().len()
    );
    account.assert_no_loss();
    assert_eq!(report.acked, 400);
    assert_eq!(report.unexpected, 0, "{report}");
    assert_no_rolled_back(&account, &writers.rolled_back.lock().unwrap(), &received);
    let c = pg.client().await.unwrap();
    wait_until(Duration::from_secs(10), "the table to drain", || async {
        count(&c, "warren_outbox").await == 0
    })
    .await;
    assert_eq!(
        count(&c, "orders").await,
        400,
        "business rows commit with their messages"
    );
    let r = relay_report(sidecar.api_addr).await;
    assert_eq!(r["enabled"], true);
    assert_eq!(r["state"], "connected");
    assert!(r["relayed"].as_u64().unwrap() >= 400, "{r}");
    assert_eq!(r["dead_lettered"], 0);
    let metrics = common::metrics_text(&format!("http://{}", sidecar.admin_addr)).await;
    assert!(
        metrics.contains("warren_sidecar_relay_relayed_total"),
        "{metrics}"
    );
    assert!(metrics.contains("warren_sidecar_relay_oldest_row_age_seconds"));
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_of_transactions_that_commit_out_of_id_order_are_relayed() {
    warren_testkit::init_tracing();
    let (node, pg) = tokio::join!(start_node(), start_pg());
    declare_topology(&node).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = relay_sidecar(&node.amqp_url(), dir.path(), &pg.url(), None).await;
    let account = Account::new();
    let mut early = pg.client().await.unwrap();
    let mut late = pg.client().await.unwrap();
    // `early` takes the lower id but commits last: a relay with an
    // `id > last_id` cursor would have moved past it.
    let t1 = early.transaction().await.unwrap();
    insert_row(&t1, "early", None).await.unwrap();
    let t2 = late.transaction().await.unwrap();
    insert_row(&t2, "late", None).await.unwrap();
    t2.commit().await.unwrap();
    account.record_acked("late");
    let c = pg.client().await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "the later id to be relayed",
        || async {
            c.query_opt("SELECT 1 FROM warren_outbox WHERE message_id = 'late'", &[])
                .await
                .unwrap()
                .is_none()
        },
    )
    .await;
    // More committed rows with higher ids go past meanwhile.
    for i in 0..20 {
        let tx = late.transaction().await.unwrap();
        insert_row(&tx, &format!("after-{i}"), None).await.unwrap();
        tx.commit().await.unwrap();
        account.record_acked(format!("after-{i}"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    t1.commit().await.unwrap();
    account.record_acked("early");
    let received = consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(30)).await;
    println!("out-of-order commits: {}", account.report());
    account.assert_no_loss();
    let pos = |id: &str| received.iter().position(|(r, _)| r == id).unwrap();
    assert!(
        pos("late") < pos("early"),
        "the row committed first left first"
    );
    assert_eq!(count(&c, "warren_outbox").await, 0);
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_rows_go_to_the_dead_letter_table_and_the_rows_behind_flow() {
    warren_testkit::init_tracing();
    let (node, pg) = tokio::join!(start_node(), start_pg());
    declare_topology(&node).await;
    let c = pg.client().await.unwrap();
    // Any table with the columns works; a text `headers` column can hold
    // JSON that does not parse.
    c.batch_execute("ALTER TABLE warren_outbox ALTER COLUMN headers TYPE text USING headers::text")
        .await
        .unwrap();
    let account = Account::new();
    let long_exchange = "x".repeat(300);
    c.execute(
        "INSERT INTO warren_outbox (message_id, exchange, routing_key, payload, headers) VALUES \
         ('good-0', $1, $2, 'a', NULL), \
         ('bad-json', $1, $2, 'b', '{not json'), \
         ('bad-exchange', $3, $2, 'c', NULL), \
         ('bad-header-value', $1, $2, 'd', '{\"a\":[1]}')",
        &[&EXCHANGE, &KEY, &long_exchange],
    )
    .await
    .unwrap();
    account.record_acked("good-0");
    for i in 1..=50 {
        c.execute(
            "INSERT INTO warren_outbox (message_id, exchange, routing_key, payload, headers) VALUES ($1, $2, $3, 'x', '{\"n\":1}')",
            &[&format!("good-{i}"), &EXCHANGE, &KEY],
        )
        .await
        .unwrap();
        account.record_acked(format!("good-{i}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let sidecar = relay_sidecar(&node.amqp_url(), dir.path(), &pg.url(), None).await;
    let received = consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(30)).await;
    println!("poison rows: {}", account.report());
    account.assert_no_loss();
    assert_eq!(account.report().unexpected, 0);
    assert!(received.iter().all(|(id, _)| id.starts_with("good-")));
    let dead: BTreeMap<String, String> = c
        .query("SELECT message_id, reason FROM warren_outbox_dead", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    println!("dead-lettered: {dead:?}");
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(dead["bad-json"].contains("invalid JSON"), "{dead:?}");
    assert!(
        dead["bad-exchange"].contains("exchange is 300 bytes"),
        "{dead:?}"
    );
    assert!(
        dead["bad-header-value"].contains("values must be strings"),
        "{dead:?}"
    );
    assert_eq!(count(&c, "warren_outbox").await, 0);
    let r = relay_report(sidecar.api_addr).await;
    assert_eq!(r["dead_lettered"], 3, "{r}");
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_relays_share_one_table_without_sending_a_row_twice() {
    warren_testkit::init_tracing();
    let (node, pg) = tokio::join!(start_node(), start_pg());
    declare_topology(&node).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut relays = Vec::new();
    for d in &dirs {
        relays.push(relay_sidecar(&node.amqp_url(), d.path(), &pg.url(), None).await);
    }
    let account = Account::new();
    Writers::start(&pg.url(), &account, "shared", 6, 300, 0, Duration::ZERO)
        .finish()
        .await;
    let _ = consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(90)).await;
    let report = account.report();
    let mut shares = Vec::new();
    for r in &relays {
        shares.push(relay_report(r.api_addr).await["relayed"].as_u64().unwrap());
    }
    println!("three relays: {report}; rows relayed per relay: {shares:?}");
    account.assert_no_loss();
    assert_eq!(report.acked, 1800);
    assert_eq!(
        report.duplicated, 0,
        "no row sent twice while nothing failed: {report}"
    );
    assert_eq!(shares.iter().sum::<u64>(), 1800);
    assert!(
        shares.iter().filter(|&&s| s > 0).count() >= 2,
        "the work is shared: {shares:?}"
    );
    for r in relays {
        r.shutdown();
        r.wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_outages_and_wrong_credentials_are_reported_and_retried() {
    warren_testkit::init_tracing();
    let (node, pg) = tokio::join!(start_node(), start_pg());
    declare_topology(&node).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = relay_sidecar(
        &node.amqp_url(),
        dir.path(),
        &pg.url_with_password("wrong"),
        None,
    )
    .await;
    wait_until(
        Duration::from_secs(15),
        "an authentication error",
        || async { relay_report(sidecar.api_addr).await["last_error_kind"] == "auth" },
    )
    .await;
    let r = relay_report(sidecar.api_addr).await;
    assert!(
        !r.to_string().contains("wrong"),
        "no credentials in the report: {r}"
    );
    assert!(
        r["last_error"].as_str().unwrap().contains("password"),
        "{r}"
    );
    // The sidecar itself keeps serving.
    let ready = common::client()
        .get(format!("http://{}/readyz", sidecar.admin_addr))
        .send()
        .await
        .unwrap();
    assert!(ready.status().is_success());
    sidecar.shutdown();
    sidecar.wait().await.unwrap();

    // With the right password, a stopped database is a connect error,
    // retried until it is back. The URL lists a dead address first, as a
    // failover list does: the relay goes on to the next host.
    let dir = tempfile::tempdir().unwrap();
    let dead = warren_testkit::free_port();
    let url = format!(
        "postgres://postgres:postgres@127.0.0.1:{dead},127.0.0.1:{}/postgres",
        pg.port()
    );
    let sidecar = relay_sidecar(&node.amqp_url(), dir.path(), &url, None).await;
    wait_until(Duration::from_secs(15), "the relay to connect", || async {
        relay_report(sidecar.api_addr).await["state"] == "connected"
    })
    .await;
    let pg = on_pg(pg, |pg| pg.stop()).await;
    wait_until(Duration::from_secs(15), "a connect error", || async {
        let r = relay_report(sidecar.api_addr).await;
        r["state"] != "connected" && r["last_error_kind"] == "connect"
    })
    .await;
    let pg = on_pg(pg, |pg| pg.start_again()).await;
    let account = Account::new();
    Writers::start(&pg.url(), &account, "after", 1, 20, 0, Duration::ZERO)
        .finish()
        .await;
    let _ = consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(30)).await;
    account.assert_no_loss();
    let metrics = common::metrics_text(&format!("http://{}", sidecar.admin_addr)).await;
    assert!(
        metrics.contains("warren_sidecar_relay_errors_total{kind=\"connect\"}"),
        "{metrics}"
    );
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

/// Starts a relaying sidecar process (so it can be killed with SIGKILL).
async fn relay_process(
    node: &RabbitNode,
    dir: &Path,
    pg: &PgCluster,
    extra: &[&str],
) -> SidecarProcess {
    let mut opts = SidecarOptions::new(node.amqp_url(), dir)
        .arg(format!("--relay-postgres={}", pg.url()))
        .arg("--relay-poll-interval=500ms")
        .arg("--relay-batch=100");
    for a in extra {
        opts = opts.arg(*a);
    }
    let mut p = SidecarProcess::start(opts).expect("sidecar process starts");
    p.wait_ready().await.expect("sidecar ready");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_committed_row_is_lost_when_postgres_the_broker_and_the_sidecar_crash() {
    warren_testkit::init_tracing();
    let (node, pg) = tokio::join!(start_node(), start_pg());
    declare_topology(&node).await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut a = relay_process(&node, dirs[0].path(), &pg, &[]).await;
    let mut b = relay_process(&node, dirs[1].path(), &pg, &[]).await;
    let account = Account::new();
    let writers = Writers::start(
        &pg.url(),
        &account,
        "fault",
        4,
        100_000,
        4,
        Duration::from_millis(2),
    );
    let settle = Duration::from_millis(1500);
    tokio::time::sleep(settle).await;

    println!("fault: postgres fast restart");
    let pg = on_pg(pg, |pg| pg.restart()).await;
    tokio::time::sleep(settle).await;

    println!("fault: postgres kill -9");
    let pg = on_pg(pg, |pg| {
        pg.kill9()?;
        std::thread::sleep(Duration::from_millis(500));
        pg.start_again()
    })
    .await;
    tokio::time::sleep(settle).await;

    println!("fault: broker kill -9");
    let node = on_node(node, |n| {
        n.kill9()?;
        std::thread::sleep(Duration::from_millis(500));
        n.start_again()
    })
    .await;
    tokio::time::sleep(settle).await;

    println!("fault: sidecar kill -9 mid-batch");
    a.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.restart().await.expect("sidecar restarts on its outbox");
    tokio::time::sleep(settle).await;
    b.kill9();
    b.restart().await.expect("sidecar restarts on its outbox");
    tokio::time::sleep(settle).await;

    writers.stop.store(true, Ordering::Relaxed);
    let writers = writers.finish().await;
    let received = consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(120)).await;
    let report = account.report();
    println!(
        "faults: {report}; committed {} rolled back {} ambiguous commits {}",
        writers.committed.load(Ordering::Relaxed),
        writers.rolled_back.lock().unwrap().len(),
        writers.ambiguous.load(Ordering::Relaxed)
    );
    account.assert_no_loss();
    assert!(report.acked > 500, "writers made progress: {report}");
    assert!(
        report.unexpected <= writers.ambiguous.load(Ordering::Relaxed),
        "{report}"
    );
    assert_no_rolled_back(&account, &writers.rolled_back.lock().unwrap(), &received);
    let c = pg.client().await.unwrap();
    assert_eq!(count(&c, "warren_outbox").await, 0);
    for p in [&mut a, &mut b] {
        p.terminate(Duration::from_secs(20)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_of_one_key_arrive_in_commit_order_across_relays_restarts_and_kills() {
    warren_testkit::init_tracing();
    let (node, pg) = tokio::join!(start_node(), start_pg());
    declare_topology(&node).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = relay_sidecar(
        &node.amqp_url(),
        dirs[0].path(),
        &pg.url(),
        Some("aggregate_id"),
    )
    .await;
    let mut b = Some(
        relay_sidecar(
            &node.amqp_url(),
            dirs[1].path(),
            &pg.url(),
            Some("aggregate_id"),
        )
        .await,
    );
    // A third relay runs as a process, to be killed with SIGKILL mid-flow.
    let mut killed = relay_process(
        &node,
        dirs[2].path(),
        &pg,
        &["--relay-order-by=aggregate_id"],
    )
    .await;
    let account = Account::new();
    const KEYS: usize = 6;
    const EVENTS: i64 = 60;
    let c = pg.client().await.unwrap();
    for k in 0..KEYS {
        c.execute(
            "INSERT INTO aggregates (id) VALUES ($1)",
            &[&format!("agg-{k}")],
        )
        .await
        .unwrap();
    }
    // Two writers per key; each event is written under the aggregate's row
    // lock, so one key's events commit one after another and their ids and
    // versions follow commit order.
    let mut tasks = Vec::new();
    for w in 0..KEYS * 2 {
        let (url, account) = (pg.url(), account.clone());
        tasks.push(tokio::spawn(async move {
            let (mut c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let agg = format!("agg-{}", w % KEYS);
            for _ in 0..EVENTS / 2 {
                let tx = c.transaction().await.unwrap();
                let version: i64 = tx
                    .query_one(
                        "UPDATE aggregates SET version = version + 1 WHERE id = $1 RETURNING version",
                        &[&agg],
                    )
                    .await
                    .unwrap()
                    .get(0);
                let id = format!("{agg}-{version:04}");
                insert_row(&tx, &id, Some((&agg, version))).await.unwrap();
                tx.commit().await.unwrap();
                account.record_acked(id);
            }
        }));
    }
    // A relay stops and comes back while the keys flow.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = b.take().unwrap();
    stopped.shutdown();
    stopped.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    b = Some(
        relay_sidecar(
            &node.amqp_url(),
            dirs[1].path(),
            &pg.url(),
            Some("aggregate_id"),
        )
        .await,
    );
    killed.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    killed
        .restart()
        .await
        .expect("the killed relay restarts on its outbox");
    for t in tasks {
        t.await.unwrap();
    }
    let received = consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(120)).await;
    let report = account.report();
    println!("ordered by key: {report}");
    account.assert_no_loss();
    assert_eq!(report.acked, (KEYS as u64) * EVENTS as u64);
    // Per key, the order of first arrivals is the commit order.
    let mut seen = HashSet::new();
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (id, _) in &received {
        if !seen.insert(id.clone()) {
            continue; // a duplicate after a restart
        }
        let (agg, version) = id.rsplit_once('-').unwrap();
        per_key
            .entry(agg.to_owned())
            .or_default()
            .push(version.parse().unwrap());
    }
    for (agg, versions) in &per_key {
        let want: Vec<i64> = (1..=EVENTS).collect();
        assert_eq!(versions, &want, "{agg} arrived out of commit order");
    }
    let relayed_by_b = relay_report(b.as_ref().unwrap().api_addr).await["relayed"]
        .as_u64()
        .unwrap();
    println!("ordered by key: relayed by the restarted relay {relayed_by_b}");
    killed.terminate(Duration::from_secs(20)).await.unwrap();
    let started = Instant::now();
    a.shutdown();
    a.wait().await.unwrap();
    let b = b.unwrap();
    b.shutdown();
    b.wait().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_are_relayed_over_verified_tls() {
    warren_testkit::init_tracing();
    let ca = TestCa::generate().unwrap();
    // A second CA, which did not sign the server's certificate.
    let server_ca = TestCa::generate().unwrap();
    let pg = tokio::task::block_in_place(|| PgCluster::start_with_tls(&ca))
        .expect("start PostgreSQL with TLS");
    let node = start_node().await;
    declare_topology(&node).await;
    let c = pg.client().await.unwrap();
    c.batch_execute(DDL).await.unwrap();
    c.batch_execute(BUSINESS).await.unwrap();
    let url = format!("{}?sslmode=require", pg.url());

    // A CA that did not sign the server's certificate: refused, reported.
    let wrong = tempfile::tempdir().unwrap();
    let mut cfg = common::test_config(&node.amqp_url(), wrong.path());
    cfg.relay_postgres = Some(url.clone());
    cfg.relay_tls_ca_file = Some(server_ca.ca_cert_path());
    let refused = warren_sidecar::start(cfg).await.unwrap();
    wait_until(
        Duration::from_secs(15),
        "a TLS verification error",
        || async {
            let r = relay_report(refused.api_addr).await;
            r["last_error_kind"] == "connect"
                && r["last_error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("certificate")
        },
    )
    .await;
    refused.shutdown();
    refused.wait().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::test_config(&node.amqp_url(), dir.path());
    cfg.relay_postgres = Some(url);
    cfg.relay_tls_ca_file = Some(ca.ca_cert_path());
    let sidecar = warren_sidecar::start(cfg).await.unwrap();
    let account = Account::new();
    Writers::start(&pg.url(), &account, "tls", 2, 25, 0, Duration::ZERO)
        .finish()
        .await;
    let _ = consume_all(&node.amqp_url(), QUEUE, &account, Duration::from_secs(30)).await;
    println!("over TLS: {}", account.report());
    account.assert_no_loss();
    let ssl: bool = c
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'warren-sidecar relay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the relay's session is encrypted");
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}
