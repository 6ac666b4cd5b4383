//! Distributed apply end to end: the coordinator (`sluice apply`), three `sluice worker`
//! processes and `sluice promoter`, each a separate OS process of the real binary, meeting on
//! the local RabbitMQ, Redis and PostgreSQL (each test its own queue prefix, key prefix and
//! databases). The warehouse is PostgreSQL: DuckDB is a file one process owns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_core::names::PlanId;
use sluice_core::task_graph::TaskGraph;
use sqlx::Connection;
use support::{Backend, Roles, Sandbox, Services, Spawned, wait_for};

const NOW: &str = "2024-05-01";
const ORDERS_PER_DAY: i64 = 20;

/// A self-referencing (so strictly sequential) daily model and a daily child of it: the child's
/// batches can only overlap the parent's if intervals are pipelined.
const LEDGER: &str = "MODEL (
  name pipe.ledger,
  kind INCREMENTAL_BY_TIME_RANGE (
    time_column day,
    batch_size 1
  ),
  start '2024-01-01',
  end '2024-01-31',
  cron '@daily',
  columns (day DATE, entries BIGINT)
);

SELECT CAST(@start_ds AS DATE) AS day, (SELECT COUNT(*) FROM pipe.ledger) + 1 AS entries
";

const LEDGER_REPORT: &str = "MODEL (
  name pipe.ledger_report,
  kind INCREMENTAL_BY_TIME_RANGE (
    time_column day,
    batch_size 1
  ),
  start '2024-01-01',
  end '2024-01-31',
  cron '@daily'
);

SELECT day, entries * 10 AS points FROM pipe.ledger WHERE day BETWEEN @start_ds AND @end_ds
";

/// Every relation the example (plus the ledger models) shows in prod.
const VIEWS: [(&str, &str); 7] = [
    ("sushi", "items"),
    ("sushi", "orders"),
    ("sushi", "daily_revenue"),
    ("sushi", "customer_totals"),
    ("sushi", "top_customers"),
    ("pipe", "ledger"),
    ("pipe", "ledger_report"),
];

async fn sandbox_with_ledger() -> Sandbox {
    let sandbox = Sandbox::new(Backend::Postgres).await;
    sandbox.write("models/pipe/ledger.sql", LEDGER);
    sandbox.write("models/pipe/ledger_report.sql", LEDGER_REPORT);
    sandbox
}

/// Runs `sluice` in distributed mode to completion.
fn distributed(sandbox: &Sandbox, services: &Services, args: &[&str]) -> support::Run {
    let mut command = sandbox.command(args);
    services.apply_to(&mut command);
    support::Run::from(command.stdin(std::process::Stdio::null()).output().unwrap())
}

/// The 600 s naps (`sleeping_model`) running in the sandbox's warehouse now.
fn naps_running(
    sandbox: &Sandbox,
    runtime: &tokio::runtime::Handle,
) -> Result<Option<i64>, sluice_engine::EngineError> {
    let naps = "SELECT COUNT(*) FROM pg_stat_activity \
        WHERE state = 'active' AND query LIKE '%pg_sleep(600)%' AND pid <> pg_backend_pid()";
    tokio::task::block_in_place(|| runtime.block_on(async { sandbox.warehouse().await.query_i64(naps).await }))
}

fn spawn_distributed(sandbox: &Sandbox, services: &Services, args: &[&str]) -> Spawned {
    let mut command = sandbox.command(args);
    services.apply_to(&mut command);
    Spawned::start(sandbox, command)
}

/// When each task of a run was recorded done, by model.
async fn finish_times(sandbox: &Sandbox, plan_id: &str, run_id: &str) -> BTreeMap<String, Vec<f64>> {
    let state = sluice_state::open_state(&sandbox.state_url()).await.unwrap();
    let plan = state.get_plan(&PlanId(plan_id.to_string())).await.unwrap().unwrap();
    let graph = TaskGraph::build(&plan);
    let mut connection = sqlx::PgConnection::connect(&sandbox.state_url()).await.unwrap();
    let rows: Vec<(Vec<u8>, f64)> = sqlx::query_as(
        "SELECT task_id, EXTRACT(EPOCH FROM finished_at)::float8 FROM sluice_tasks_done WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_all(&mut connection)
    .await
    .unwrap();
    let finished: BTreeMap<Vec<u8>, f64> = rows.into_iter().collect();
    let mut by_model: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for task in &graph.tasks {
        let model = plan.snapshots[task.snapshot as usize].snapshot.name.to_string();
        let at = finished.get(task.id.0.as_slice()).copied().unwrap_or_else(|| panic!("{model} task not recorded"));
        by_model.entry(model).or_default().push(at);
    }
    by_model
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_and_a_promoter_produce_what_embedded_mode_produces() {
    let services = Services::new("same");
    let reference = sandbox_with_ledger().await;
    reference.sluice(&["plan", "--auto-apply", "--now", NOW]).success();

    let sandbox = sandbox_with_ledger().await;
    let mut roles = Roles::cluster(&sandbox, &services, 3, 2);
    let run = distributed(&sandbox, &services, &["plan", "--auto-apply", "--now", NOW]);
    run.success();
    assert!(run.contains("succeeded"), "{run:?}");
    let plan_id = run.plan_id();

    // Row for row what embedded mode wrote, through the promoted views.
    let mut expected = reference.warehouse().await;
    let mut actual = sandbox.warehouse().await;
    for (schema, name) in VIEWS {
        let want = expected.checksum(schema, name).await.unwrap();
        let got = actual.checksum(schema, name).await.unwrap();
        assert!(want.rows > 0, "{schema}.{name} is empty");
        assert_eq!(got, want, "{schema}.{name}");
    }
    assert_eq!(sandbox.count("sushi.orders").await, 91 * ORDERS_PER_DAY);
    let entries = actual.query_i64("SELECT MAX(entries) FROM pipe.ledger").await.unwrap();
    assert_eq!(entries, Some(31), "the ledger's batches ran one after the other");

    // Interval-level pipelining: the child's first interval is done before the parent's last.
    let times = finish_times(&sandbox, &plan_id, &format!("{plan_id}-1")).await;
    let parent_last = times["pipe.ledger"].iter().copied().fold(f64::MIN, f64::max);
    let child_first = times["pipe.ledger_report"].iter().copied().fold(f64::MAX, f64::min);
    assert!(child_first < parent_last, "child's first {child_first} after parent's last {parent_last}");

    // Nothing queued or dead afterwards, and every role stops cleanly on SIGTERM.
    let broker = services.broker().await;
    assert_eq!(sluice_queue::TaskQueue::queued(&broker, "local").await.unwrap(), 0);
    assert_eq!(broker.dead_letters("local").await.unwrap(), 0);
    broker.close().await;
    roles.stop();
    let status = sandbox.sluice(&["status", &plan_id]);
    assert!(status.stdout.contains(&format!("run {plan_id}-1: succeeded")), "{status:?}");
}

/// `plan --restate-model` runs through the queues as any plan: the self-referencing ledger
/// restated over three days runs again from them to its end (SQLMesh's rule), its child over
/// the same days, and the views equal embedded mode's after the same restatement.
#[tokio::test(flavor = "multi_thread")]
async fn a_restatement_runs_distributed_as_in_embedded_mode() {
    let services = Services::new("restate");
    let restate = [
        "plan",
        "--restate-model",
        "pipe.ledger",
        "--start",
        "2024-01-10",
        "--end",
        "2024-01-12",
        "--auto-apply",
        "--now",
        NOW,
    ];
    let reference = sandbox_with_ledger().await;
    reference.sluice(&["plan", "--auto-apply", "--now", NOW]).success();
    reference.sluice(&restate).success();

    let sandbox = sandbox_with_ledger().await;
    let mut roles = Roles::cluster(&sandbox, &services, 2, 2);
    distributed(&sandbox, &services, &["plan", "--auto-apply", "--now", NOW]).success();
    let run = distributed(&sandbox, &services, &restate);
    run.success();
    assert!(run.contains("succeeded"), "{run:?}");
    roles.stop();

    let mut expected = reference.warehouse().await;
    let mut actual = sandbox.warehouse().await;
    for (schema, name) in VIEWS {
        assert_eq!(
            actual.checksum(schema, name).await.unwrap(),
            expected.checksum(schema, name).await.unwrap(),
            "{schema}.{name}"
        );
    }
    // From the first restated day on, the ledger ran again (each day reads the table as the
    // write found it: 31 rows, so 32 entries) and so did its child; the earlier days are kept.
    let again = "SELECT COUNT(*) FROM pipe.ledger WHERE day >= '2024-01-10' AND entries = 32";
    assert_eq!(actual.query_i64(again).await.unwrap(), Some(22));
    let kept = "SELECT COUNT(*) FROM pipe.ledger WHERE day < '2024-01-10' AND entries = EXTRACT(DAY FROM day)";
    assert_eq!(actual.query_i64(kept).await.unwrap(), Some(9));
    let points = "SELECT COUNT(*) FROM pipe.ledger_report WHERE day >= '2024-01-10' AND points = 320";
    assert_eq!(actual.query_i64(points).await.unwrap(), Some(22));
}

/// Two years of daily orders: long enough to stop in the middle.
async fn long_backfill() -> Sandbox {
    let sandbox = Sandbox::new(Backend::Postgres).await;
    let orders = sandbox.read("models/orders.sql").replace("end '2024-03-31'", "end '2026-01-01'");
    sandbox.write("models/orders.sql", &orders);
    sandbox
}

const LONG_NOW: &str = "2026-01-01";
const LONG_DAYS: i64 = 731;

#[tokio::test(flavor = "multi_thread")]
async fn abort_drains_the_queue_and_apply_resumes_writing_each_interval_once() {
    let services = Services::new("abort");
    let sandbox = long_backfill().await;
    let mut roles = Roles::cluster(&sandbox, &services, 3, 1);
    let mut coordinator = spawn_distributed(&sandbox, &services, &["plan", "--auto-apply", "--now", LONG_NOW]);
    let plan = coordinator.read_plan_id();
    wait_for("some intervals to finish", Duration::from_secs(120), || {
        sandbox.running_tasks_done(&plan).is_some_and(|done| done >= 5)
    });
    distributed(&sandbox, &services, &["abort", &plan]).success();
    let aborted = coordinator.wait();
    assert_eq!(aborted.code, Some(2), "{aborted:?}");
    let status = sandbox.sluice(&["status", &plan]);
    assert!(status.stdout.contains(&format!("run {plan}-1: aborted")), "{status:?}");
    assert_eq!(sandbox.view_target("sushi", "orders").await, None, "an aborted run promotes nothing");
    let broker = services.broker().await;
    assert_eq!(sluice_queue::TaskQueue::queued(&broker, "local").await.unwrap(), 0, "the workers drained the run");
    assert_eq!(broker.dead_letters("local").await.unwrap(), 0);
    broker.close().await;

    let resumed = distributed(&sandbox, &services, &["apply", &plan]);
    resumed.success();
    assert!(resumed.contains("succeeded"), "{resumed:?}");
    assert!(!resumed.stdout.contains(", 0 already done"), "the resumed run skips finished work: {resumed:?}");
    assert_eq!(sandbox.count("sushi.orders").await, LONG_DAYS * ORDERS_PER_DAY, "every interval written once");
    roles.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_queue_purged_by_hand_aborts_the_run_and_apply_resumes() {
    let services = Services::new("purge");
    let sandbox = long_backfill().await;
    // The promoter only: the tasks wait in the queue for the operator's purge.
    let mut roles = Roles::default();
    roles.start(&sandbox, &services, "promoter", &["promoter"]);
    let mut coordinator = spawn_distributed(&sandbox, &services, &["plan", "--auto-apply", "--now", LONG_NOW]);
    let plan = coordinator.read_plan_id();
    let broker = services.broker().await;
    let runtime = tokio::runtime::Handle::current();
    wait_for("the ready tasks to be queued", Duration::from_secs(60), || {
        tokio::task::block_in_place(|| runtime.block_on(sluice_queue::TaskQueue::queued(&broker, "local")))
            .is_ok_and(|queued| queued > 0)
    });
    let queue = format!("{}.tasks.local", services.prefix);
    let purge = std::process::Command::new("rabbitmqctl").args(["-q", "purge_queue", &queue]).output().unwrap();
    assert!(purge.status.success(), "rabbitmqctl purge_queue: {}", String::from_utf8_lossy(&purge.stderr));

    let aborted = coordinator.wait();
    assert_eq!(aborted.code, Some(2), "{aborted:?}");
    assert!(aborted.contains("purged by hand"), "{aborted:?}");
    let status = sandbox.sluice(&["status", &plan]);
    assert!(status.stdout.contains(&format!("run {plan}-1: aborted")), "{status:?}");
    assert_eq!(sandbox.view_target("sushi", "orders").await, None);

    roles.add_workers(&sandbox, &services, 3, 2);
    let resumed = distributed(&sandbox, &services, &["apply", &plan]);
    resumed.success();
    assert_eq!(sandbox.count("sushi.orders").await, LONG_DAYS * ORDERS_PER_DAY, "every interval written once");
    assert_eq!(broker.dead_letters("local").await.unwrap(), 0);
    broker.close().await;
    roles.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_settings_are_refused_clearly_and_never_print_passwords() {
    let sandbox = Sandbox::new(Backend::Postgres).await;
    let worker = sandbox.sluice(&["worker", "--gateway", "local"]);
    assert_eq!(worker.code, Some(1));
    assert!(worker.stderr.contains("SLUICE_AMQP_URL"), "{worker:?}");

    let mut services = Services::new("secret");
    services.amqp_url = "amqp://guest:hunter2-secret@127.0.0.1:5672/%2f".to_string();
    let mut command = sandbox.command(&["worker", "--gateway", "local"]);
    services.apply_to(&mut command);
    let refused = support::Run::from(command.output().unwrap());
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains("cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1"), "{refused:?}");
    assert!(!refused.stderr.contains("hunter2"), "{refused:?}");

    let embedded = Sandbox::new(Backend::Embedded).await;
    let duckdb = distributed(&embedded, &Services::new("duckdb"), &["plan", "--auto-apply", "--now", NOW]);
    assert_eq!(duckdb.code, Some(1), "{duckdb:?}");
    assert!(duckdb.stderr.contains("gateways.local: a DuckDB warehouse is a file one process owns"), "{duckdb:?}");

    let unknown = distributed(&sandbox, &Services::new("gateway"), &["worker", "--gateway", "nowhere"]);
    assert_eq!(unknown.code, Some(1));
    assert!(
        unknown.stderr.contains("--gateway nowhere: config.yaml has no such gateway (it has local)"),
        "{unknown:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_cancels_the_queries_in_flight() {
    let services = Services::new("cancel");
    let sandbox = Sandbox::new(Backend::Postgres).await;
    sandbox.write("models/slow/nap.sql", &support::sleeping_model("slow.nap", 2, 600));
    let mut roles = Roles::cluster(&sandbox, &services, 1, 2);
    let mut coordinator = spawn_distributed(&sandbox, &services, &["plan", "--auto-apply", "--now", NOW]);
    let plan = coordinator.read_plan_id();
    let runtime = tokio::runtime::Handle::current();
    let sleeping = || naps_running(&sandbox, &runtime);
    wait_for("both naps to be running", Duration::from_secs(120), || sleeping().unwrap() == Some(2));

    distributed(&sandbox, &services, &["abort", &plan]).success();
    let aborted = coordinator.wait();
    assert_eq!(aborted.code, Some(2), "{aborted:?}");
    wait_for("the naps to be cancelled", Duration::from_secs(30), || sleeping().unwrap() == Some(0));
    let status = sandbox.sluice(&["status", &plan]);
    assert!(status.stdout.contains(&format!("run {plan}-1: aborted")), "{status:?}");
    assert_eq!(sandbox.view_target("slow", "nap").await, None, "an aborted run promotes nothing");
    roles.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_dependency_counters_are_rebuilt_from_state() {
    let services = Services::new("counters");
    let sandbox = long_backfill().await;
    let mut roles = Roles::cluster(&sandbox, &services, 3, 1);
    let mut coordinator = spawn_distributed(&sandbox, &services, &["plan", "--auto-apply", "--now", LONG_NOW]);
    let plan = coordinator.read_plan_id();
    wait_for("some intervals to finish", Duration::from_secs(120), || {
        sandbox.running_tasks_done(&plan).is_some_and(|done| done >= 5)
    });
    // Redis loses the run's keys (as after a FLUSHALL or a restart without persistence).
    delete_counters(&services);

    let finished = coordinator.wait();
    assert_eq!(finished.code, Some(0), "{finished:?}");
    assert!(finished.contains("dependency counters rebuilt from state"), "{finished:?}");
    assert_eq!(sandbox.count("sushi.orders").await, LONG_DAYS * ORDERS_PER_DAY, "every interval written once");
    let mut warehouse = sandbox.warehouse().await;
    let distinct = warehouse.query_i64("SELECT COUNT(DISTINCT order_id) FROM sushi.orders").await.unwrap();
    assert_eq!(distinct, Some(LONG_DAYS * ORDERS_PER_DAY));
    roles.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_promoter_repairs_a_detached_run_whose_counters_are_lost() {
    let services = Services::new("orphan");
    let sandbox = long_backfill().await;
    let mut roles = Roles::default();
    roles.start(&sandbox, &services, "promoter", &["promoter", "--reconcile-every", "1", "--orphan-stall", "3"]);
    roles.add_workers(&sandbox, &services, 3, 1);
    // A detached apply: nobody follows the run, and its lease (3 s) runs out.
    let mut planned = spawn_distributed(&sandbox, &services, &["plan", "--now", LONG_NOW]);
    let plan = planned.read_plan_id();
    let planned = planned.wait();
    assert_eq!(planned.code, Some(0), "{planned:?}");
    let detached = spawn_distributed(&sandbox, &services, &["--lease-ttl", "3", "apply", &plan, "--detach"]).wait();
    assert_eq!(detached.code, Some(0), "{detached:?}");
    wait_for("some intervals to finish", Duration::from_secs(120), || {
        sandbox.running_tasks_done(&plan).is_some_and(|done| done >= 5)
    });
    // Redis loses the run's keys; no coordinator is there to notice.
    delete_counters(&services);

    // The promoter rebuilds the counters from state; the run completes and is promoted.
    wait_for("the run to be promoted", Duration::from_secs(180), || {
        let status = sandbox.sluice(&["--state", &sandbox.state_url(), "status", &plan]);
        status.stdout.contains("succeeded")
    });
    roles.stop();
    let log = std::fs::read_to_string(sandbox.folder.path().join("promoter.log")).unwrap();
    assert!(log.contains("rebuilt them from state"), "{log}");
    assert_eq!(sandbox.count("sushi.orders").await, LONG_DAYS * ORDERS_PER_DAY, "every interval written once");
    let mut warehouse = sandbox.warehouse().await;
    let distinct = warehouse.query_i64("SELECT COUNT(DISTINCT order_id) FROM sushi.orders").await.unwrap();
    assert_eq!(distinct, Some(LONG_DAYS * ORDERS_PER_DAY));
}

/// Deletes every Redis key under the test's prefix (a run's counters), as a FLUSHALL would.
fn delete_counters(services: &Services) {
    let keys = std::process::Command::new("redis-cli")
        .args(["-u", &services.redis_url, "--scan", "--pattern", &format!("{}:*", services.prefix)])
        .output()
        .unwrap();
    let keys: Vec<String> = String::from_utf8_lossy(&keys.stdout).lines().map(str::to_string).collect();
    assert!(!keys.is_empty(), "the run's counters are in Redis under the test's prefix");
    let deleted =
        std::process::Command::new("redis-cli").args(["-u", &services.redis_url, "del"]).args(&keys).output().unwrap();
    assert!(deleted.status.success());
}

fn run_ok(program: &str, args: &[&str]) {
    let output = std::process::Command::new(program).args(args).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn no_credential_reaches_a_log_line_or_an_error() {
    // Every service gets a password of its own: the broker and Redis check theirs; the local
    // PostgreSQL trusts 127.0.0.1, so its passwords travel everywhere without being checked.
    let secret = format!("Pw-{}-x9", std::process::id());
    let user = "sluice_secret_user";
    let _ = std::process::Command::new("rabbitmqctl").args(["-q", "add_user", user, &secret]).output();
    run_ok("rabbitmqctl", &["-q", "change_password", user, &secret]);
    run_ok("rabbitmqctl", &["-q", "set_permissions", "-p", "/", user, ".*", ".*", ".*"]);
    run_ok("redis-cli", &["-h", "127.0.0.1", "ACL", "SETUSER", user, "on", &format!(">{secret}"), "~*", "+@all"]);

    let sandbox = sandbox_with_ledger().await;
    let config = sandbox
        .read("config.yaml")
        .replace("      user: postgres\n", &format!("      user: postgres\n      password: {secret}\n"));
    assert_eq!(config.matches(&secret).count(), 2, "{config}");
    sandbox.write("config.yaml", &config);
    let mut services = Services::new("secrets");
    services.amqp_url = format!("amqp://{user}:{secret}@127.0.0.1:5672/%2f");
    services.redis_url = format!("redis://{user}:{secret}@127.0.0.1:6379");
    services.log = Some("info".to_string());
    let state_url = sandbox.state_url().replace("postgres@", &format!("postgres:{secret}@"));

    let mut roles = Roles::default();
    let with_state = |sandbox: &Sandbox, args: &[&str]| {
        let mut command = sandbox.command(args);
        services.apply_to(&mut command);
        command.env("SLUICE_STATE_URL", &state_url);
        command
    };
    for (name, args) in
        [("promoter", vec!["promoter"]), ("worker", vec!["worker", "--gateway", "local", "--concurrency", "2"])]
    {
        let log = sandbox.folder.path().join(format!("{name}.log"));
        let child = with_state(&sandbox, &args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        roles.adopt(name, child, log);
    }
    let applied = support::Run::from(with_state(&sandbox, &["plan", "--auto-apply", "--now", NOW]).output().unwrap());
    applied.success();
    let status = support::Run::from(with_state(&sandbox, &["status"]).output().unwrap());
    status.success();
    // Wrong passwords: refused, and the message does not carry what was tried.
    let wrong = format!("{secret}-wrong");
    let mut bad_redis = Services::new("bad-redis");
    bad_redis.redis_url = format!("redis://{user}:{wrong}@127.0.0.1:6379");
    let mut command = sandbox.command(&["worker", "--gateway", "local"]);
    bad_redis.apply_to(&mut command);
    command.env("SLUICE_STATE_URL", &state_url);
    let refused_redis = support::Run::from(command.output().unwrap());
    assert_eq!(refused_redis.code, Some(1), "{refused_redis:?}");
    assert!(refused_redis.stderr.contains("Redis"), "{refused_redis:?}");
    let mut bad_amqp = Services::new("bad-amqp");
    bad_amqp.amqp_url = format!("amqp://{user}:{wrong}@127.0.0.1:5672/%2f");
    let mut command = sandbox.command(&["worker", "--gateway", "local"]);
    bad_amqp.apply_to(&mut command);
    let refused_amqp = support::Run::from(command.output().unwrap());
    assert_eq!(refused_amqp.code, Some(1), "{refused_amqp:?}");
    roles.stop();

    let mut everything = format!("{applied:?}\n{status:?}\n{refused_redis:?}\n{refused_amqp:?}\n");
    for entry in std::fs::read_dir(sandbox.folder.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|extension| extension == "log") {
            everything.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    assert!(everything.lines().count() > 10, "the roles logged at info level:\n{everything}");
    for line in everything.lines() {
        assert!(!line.contains(&secret), "a credential in: {line}");
    }
    // The queues are deleted (when `services` drops) by the default user: this one goes now.
    services.amqp_url = Services::new("cleanup").amqp_url.clone();
    run_ok("rabbitmqctl", &["-q", "delete_user", user]);
    run_ok("redis-cli", &["-h", "127.0.0.1", "ACL", "DELUSER", user]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_past_its_stop_deadline_cancels_and_returns_its_task() {
    let services = Services::new("deadline");
    let sandbox = Sandbox::new(Backend::Postgres).await;
    std::fs::remove_dir_all(sandbox.project.join("models")).unwrap();
    std::fs::remove_dir_all(sandbox.project.join("seeds")).unwrap();
    sandbox.write("models/slow/nap.sql", &support::sleeping_model("slow.nap", 1, 600));
    let mut roles = Roles::default();
    roles.start(&sandbox, &services, "promoter", &["promoter"]);
    roles.start(
        &sandbox,
        &services,
        "worker",
        &["worker", "--gateway", "local", "--concurrency", "1", "--stop-deadline", "2"],
    );
    let mut coordinator = spawn_distributed(&sandbox, &services, &["plan", "--auto-apply", "--now", NOW]);
    let plan = coordinator.read_plan_id();
    let runtime = tokio::runtime::Handle::current();
    let sleeping = || naps_running(&sandbox, &runtime);
    wait_for("the nap to be running", Duration::from_secs(120), || sleeping().unwrap() == Some(1));

    // SIGTERM: the worker takes nothing more, waits its 2 s deadline for the task in hand (a
    // 600 s nap), then cancels it and exits cleanly.
    // (`stop_one` fails the test if the worker is still running 120 s after SIGTERM.)
    roles.stop_one("worker");
    let log = std::fs::read_to_string(sandbox.folder.path().join("worker.log")).unwrap();
    assert!(log.contains("stop deadline passed"), "{log}");
    wait_for("the nap to be cancelled", Duration::from_secs(30), || sleeping().unwrap() == Some(0));
    // The task is back in the queue, its interval unrecorded, for the next worker to take.
    let broker = services.broker().await;
    let queued = || {
        tokio::task::block_in_place(|| {
            runtime.block_on(async { sluice_queue::TaskQueue::queued(&broker, "local").await.unwrap() })
        })
    };
    wait_for("the returned task to be queued again", Duration::from_secs(30), || queued() == 1);
    broker.close().await;
    // Aborted, the returned task is drained by the next worker to come.
    distributed(&sandbox, &services, &["abort", &plan]).success();
    roles.add_workers(&sandbox, &services, 1, 1);
    let aborted = coordinator.wait_within(Duration::from_secs(120));
    assert_eq!(aborted.code, Some(2), "{aborted:?}");
    roles.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_stopped_by_sigterm_leaves_the_run_to_the_cluster() {
    let services = Services::new("sigterm");
    let sandbox = Sandbox::new(Backend::Postgres).await;
    sandbox.write("models/slow/nap.sql", &support::sleeping_model("slow.nap", 2, 5));
    let mut roles = Roles::cluster(&sandbox, &services, 1, 2);
    let mut coordinator = spawn_distributed(&sandbox, &services, &["plan", "--auto-apply", "--now", NOW]);
    let plan = coordinator.read_plan_id();
    coordinator.wait_for_stderr("ready tasks queued");
    // The naps take 5 s: the run is in flight when the coordinator is told to stop.
    let _ = std::process::Command::new("kill").args(["-TERM", &coordinator.pid().to_string()]).status();
    let stopped = coordinator.wait_within(Duration::from_secs(60));
    assert_eq!(stopped.code, Some(0), "{stopped:?}");
    assert!(stopped.contains("continues without this process"), "{stopped:?}");
    // Untouched by the stop: the workers finish it and the promoter promotes it.
    wait_for("the run to be promoted", Duration::from_secs(180), || {
        distributed(&sandbox, &services, &["status", &plan]).stdout.contains("succeeded")
    });
    assert!(sandbox.view_target("slow", "nap").await.is_some());
    roles.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_cannot_reach_its_warehouse_is_not_ready() {
    let services = Services::new("unready");
    let sandbox = Sandbox::new(Backend::Postgres).await;
    // The warehouse on a port nothing listens on; the state store stays reachable.
    let config = sandbox.read("config.yaml");
    let closed = support::free_port();
    let (gateway, state) = config.split_once("    state_connection:").unwrap();
    sandbox.write(
        "config.yaml",
        &format!("{}    state_connection:{state}", gateway.replace("port: 5432", &format!("port: {closed}"))),
    );
    let port = std::iter::repeat_with(support::free_port).find(|port| *port != closed).unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut roles = Roles::default();
    roles.start(
        &sandbox,
        &services,
        "worker",
        &["--listen", &listen, "worker", "--gateway", "local", "--concurrency", "1", "--warehouse-grace", "1"],
    );
    // Not ready while it starts, then not ready for want of its warehouse.
    let only_the_warehouse = |body: &str| {
        body.contains("warehouse:")
            && !["starting", "rabbitmq", "redis", "state"].iter().any(|other| body.contains(other))
    };
    wait_for("/readyz to name the warehouse alone", Duration::from_secs(60), || {
        support::get(port, "/readyz").is_some_and(|(_, body)| only_the_warehouse(&body))
    });
    // Never ready while the warehouse is unreachable; everything else answers.
    for _ in 0..3 {
        let (status, body) = support::get(port, "/readyz").unwrap();
        assert_eq!(status, 503, "{body}\n{}", std::fs::read_to_string(roles.log("worker")).unwrap());
        assert!(only_the_warehouse(&body), "{body}");
    }
    assert_eq!(support::get(port, "/healthz").unwrap().0, 200);
    roles.stop();
}
