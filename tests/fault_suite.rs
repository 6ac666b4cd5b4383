//! The fault suite: a backfill of more than 2,000 interval tasks applied in distributed mode by
//! three worker processes, a fault injected mid-run, recovery the way an operator would do it,
//! then the same checks every time:
//! - every table equal to what the same SQL gives without sluice (checksums);
//! - every task recorded done once;
//! - nothing dead-lettered (unless the scenario is about poison);
//! - the environment's views sampled all along: all old or all new, never mixed;
//! - nothing left behind: processes stopped cleanly, no connection to the test's databases,
//!   no Redis key of the run without an expiry.
//!
//! Each scenario has its own databases, queue prefix and Redis key prefix, so scenarios run in
//! parallel with each other and with the rest of the tests. Scenarios that restart a shared
//! service live in `chaos_suite.rs`, run alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::names::PlanId;
use sluice_core::task_graph::TaskGraph;
use sluice_queue::TaskMessage;
use sqlx::Connection;
use support::{Backend, Roles, Run, Sandbox, Services, Spawned, wait_for};

const NOW: &str = "2024-04-01";

/// 84 days of hourly readings (2,016 tasks), their daily totals (84 tasks) and a FULL summary.
const EVENTS: &str = "MODEL (
  name fault.events,
  kind INCREMENTAL_BY_TIME_RANGE (
    time_column hour,
    batch_size 1
  ),
  start '2024-01-01',
  end '2024-03-25',
  cron '@hourly',
  columns (hour TIMESTAMP, device INT, reading BIGINT)
);

SELECT
  CAST(@start_ts AS TIMESTAMP) AS hour,
  CAST(g.n AS INT) AS device,
  CAST(@start_epoch AS BIGINT) % 1000 + g.n AS reading
FROM generate_series(0, 9) AS g (n)
";

const DAILY: &str = "MODEL (
  name fault.daily,
  kind INCREMENTAL_BY_TIME_RANGE (
    time_column day,
    batch_size 1
  ),
  start '2024-01-01',
  end '2024-03-25',
  cron '@daily',
  columns (day DATE, readings BIGINT, total BIGINT)
);

SELECT CAST(@start_ds AS DATE) AS day, COUNT(*) AS readings, SUM(reading) AS total
FROM fault.events
WHERE hour BETWEEN CAST(@start_ts AS TIMESTAMP) AND CAST(@end_ts AS TIMESTAMP)
";

const SUMMARY: &str = "MODEL (
  name fault.summary,
  kind FULL,
  start '2024-01-01',
  end '2024-03-25',
  cron '@daily'
);

SELECT COUNT(*) AS days, SUM(readings) AS readings, SUM(total) AS total FROM fault.daily
";

/// The same data written by plain SQL, no sluice: what every run must produce.
const EXPECTED: &str = "CREATE SCHEMA IF NOT EXISTS expected;
CREATE TABLE expected.events AS
  SELECT h AS hour, CAST(g.n AS INT) AS device, CAST(EXTRACT(EPOCH FROM h) AS BIGINT) % 1000 + g.n AS reading
  FROM generate_series(TIMESTAMP '2024-01-01', TIMESTAMP '2024-03-24 23:00', INTERVAL '1 hour') AS h,
       generate_series(0, 9) AS g (n);
CREATE TABLE expected.daily AS
  SELECT CAST(hour AS DATE) AS day, COUNT(*) AS readings, SUM(reading) AS total
  FROM expected.events GROUP BY CAST(hour AS DATE);
CREATE TABLE expected.summary AS
  SELECT COUNT(*) AS days, SUM(readings) AS readings, SUM(total) AS total FROM expected.daily";

const TABLES: [&str; 3] = ["events", "daily", "summary"];
const TASKS: usize = 2016 + 84 + 1;

/// One look at the environment's views: (view, definition) pairs.
type ViewSample = Vec<(String, String)>;

/// Samples the environment's views while a run goes: each sample is one snapshot of pg_views.
struct ViewWatcher {
    samples: Arc<Mutex<BTreeSet<ViewSample>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ViewWatcher {
    async fn start(sandbox: &Sandbox) -> ViewWatcher {
        let url = sandbox.warehouse_url();
        let samples = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (recorded, stopping) = (Arc::clone(&samples), stop.clone());
        let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
        let task = tokio::spawn(async move {
            while !stopping.is_cancelled() {
                let rows: ViewSample = sqlx::query_as(
                    "SELECT viewname::text, definition FROM pg_views WHERE schemaname = 'fault' ORDER BY viewname",
                )
                .fetch_all(&mut connection)
                .await
                .unwrap();
                recorded.lock().unwrap().insert(rows);
                // A sampling period, not a synchronisation: every moment is as good as another.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        ViewWatcher { samples, stop, task }
    }

    /// Stops sampling; asserts every sample showed no view or every view on its final table.
    async fn check(self) {
        self.stop.cancel();
        self.task.await.unwrap();
        let samples = self.samples.lock().unwrap().clone();
        let last = samples.iter().max_by_key(|sample| sample.len()).cloned().unwrap_or_default();
        assert_eq!(last.len(), TABLES.len(), "every view is there in the end: {last:?}");
        for sample in &samples {
            assert!(sample.is_empty() || *sample == last, "a mixed environment was visible: {sample:?}");
        }
    }
}

/// One scenario: a sandbox with the fault project, its services, roles and view watcher.
struct Scenario {
    name: String,
    sandbox: Sandbox,
    services: Services,
    roles: Roles,
    watcher: Option<ViewWatcher>,
}

impl Scenario {
    /// The sandbox, the expected tables, the promoter and `workers` worker processes.
    async fn new(name: &str, workers: usize) -> Scenario {
        let sandbox = Sandbox::new(Backend::Postgres).await;
        std::fs::remove_dir_all(sandbox.project.join("models")).unwrap();
        sandbox.write("models/fault/events.sql", EVENTS);
        sandbox.write("models/fault/daily.sql", DAILY);
        sandbox.write("models/fault/summary.sql", SUMMARY);
        sandbox.execute(EXPECTED).await;
        let services = Services::new(name);
        let roles = Roles::cluster(&sandbox, &services, workers, 2);
        let watcher = Some(ViewWatcher::start(&sandbox).await);
        Scenario { name: name.to_string(), sandbox, services, roles, watcher }
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = self.sandbox.command(args);
        self.services.apply_to(&mut command);
        command
    }

    fn sluice(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).stdin(std::process::Stdio::null()).output().unwrap())
    }

    /// Starts `plan --auto-apply`; returns the coordinator and the plan id.
    fn start_apply(&self) -> (Spawned, String) {
        let mut coordinator = Spawned::start(&self.sandbox, self.command(&["plan", "--auto-apply", "--now", NOW]));
        let stored = coordinator.read_until("Stored as plan ");
        let plan = stored.trim_start_matches("Stored as plan ").split(';').next().unwrap().to_string();
        (coordinator, plan)
    }

    /// Waits until the plan's current run has finished at least `tasks` tasks.
    fn wait_for_tasks(&self, coordinator: &mut Spawned, plan: &str, tasks: u64) {
        let what = format!("{tasks} tasks done");
        wait_for(&what, Duration::from_secs(300), || {
            coordinator.assert_running(&what);
            tasks_done(&self.sandbox.sluice(&["status", plan]).stdout).is_some_and(|done| done >= tasks)
        });
    }

    /// Waits until the plan's latest run is no longer running; returns `sluice status PLAN`.
    fn wait_for_end(&self, plan: &str) -> String {
        let mut status = String::new();
        wait_for("the run to end", Duration::from_secs(300), || {
            status = self.sandbox.sluice(&["status", plan]).stdout;
            !status.contains(": running (") && status.contains(" run ")
        });
        status
    }

    /// The checks every scenario ends with; `dead_letters` is what the scenario put there.
    async fn verify(mut self, plan: &str, dead_letters: u32) {
        // Every table equals the plain-SQL one, through the promoted views.
        let mut warehouse = self.sandbox.warehouse().await;
        for table in TABLES {
            let expected = warehouse.checksum("expected", table).await.unwrap();
            let actual = warehouse.checksum("fault", table).await.unwrap();
            assert_eq!(actual, expected, "fault.{table} differs from the undisturbed result");
        }
        drop(warehouse);
        if let Some(watcher) = self.watcher.take() {
            watcher.check().await;
        }
        // Every task of the plan recorded done once, over all its runs.
        let mut state = sqlx::PgConnection::connect(&self.sandbox.state_url()).await.unwrap();
        let (rows, distinct): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT task_id) FROM sluice_tasks_done WHERE plan_id = $1")
                .bind(plan)
                .fetch_one(&mut state)
                .await
                .unwrap();
        assert_eq!((rows, distinct), (TASKS as i64, TASKS as i64), "each task recorded done once");
        state.close().await.unwrap();
        let broker = self.services.broker().await;
        let runtime = tokio::runtime::Handle::current();
        // Stale copies (a scenario's duplicates) are drained by the workers after the run.
        wait_for("the task queue to drain", Duration::from_secs(60), || {
            tokio::task::block_in_place(|| runtime.block_on(sluice_queue::TaskQueue::queued(&broker, "local"))).unwrap()
                == 0
        });
        assert_eq!(broker.dead_letters("local").await.unwrap(), dead_letters, "dead letters");
        broker.close().await;

        // Nothing left behind.
        self.roles.stop();
        let keys = std::process::Command::new("redis-cli")
            .args(["-u", &self.services.redis_url, "--scan", "--pattern", &format!("{}:*", self.services.prefix)])
            .output()
            .unwrap();
        for key in String::from_utf8_lossy(&keys.stdout).lines() {
            let ttl = std::process::Command::new("redis-cli")
                .args(["-u", &self.services.redis_url, "ttl", key])
                .output()
                .unwrap();
            let ttl: i64 = String::from_utf8_lossy(&ttl.stdout).trim().parse().unwrap();
            assert!(ttl > 0, "{key} never expires");
        }
        let mut admin = sqlx::PgConnection::connect(support::POSTGRES_ADMIN_URL).await.unwrap();
        let databases = self.sandbox.databases();
        wait_for("the roles' connections to close", Duration::from_secs(30), || {
            let runtime = tokio::runtime::Handle::current();
            let open: i64 = tokio::task::block_in_place(|| {
                runtime.block_on(
                    sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = ANY($1)")
                        .bind(&databases)
                        .fetch_one(&mut admin),
                )
            })
            .unwrap();
            open == 0
        });
        eprintln!("scenario {}: verified", self.name);
    }
}

/// The tasks the running run has finished, from `sluice status PLAN`.
fn tasks_done(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.contains(": running ("))?;
    let before = line.split(" tasks").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

fn kill_9(pid: u32) {
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
}

/// Prints how long recovery took (for the table; never asserted).
fn recovered(scenario: &str, since: Instant) {
    eprintln!("scenario {scenario}: recovered in {:.1} s", since.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_one_worker_mid_task() {
    let scenario = Scenario::new("kill-one", 3).await;
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 200);
    let fault = Instant::now();
    kill_9(scenario.roles.pid("worker 0"));
    let run = coordinator.wait();
    assert_eq!(run.code, Some(0), "{run:?}");
    recovered("kill-one", fault);
    let mut scenario = scenario;
    scenario.roles.forget("worker 0");
    scenario.verify(&plan, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_every_worker_then_start_new_ones() {
    let mut scenario = Scenario::new("kill-all", 3).await;
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 200);
    let fault = Instant::now();
    for index in 0..3 {
        let name = format!("worker {index}");
        kill_9(scenario.roles.pid(&name));
        scenario.roles.forget(&name);
    }
    scenario.roles.add_workers(&scenario.sandbox, &scenario.services, 3, 2);
    let run = coordinator.wait();
    assert_eq!(run.code, Some(0), "{run:?}");
    recovered("kill-all", fault);
    scenario.verify(&plan, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_the_coordinator_after_it_published() {
    let scenario = Scenario::new("kill-coordinator", 3).await;
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 100);
    let fault = Instant::now();
    kill_9(coordinator.pid());
    let status = scenario.wait_for_end(&plan);
    recovered("kill-coordinator", fault);
    assert!(status.contains(&format!("run {plan}-1: succeeded")), "{status}");
    drop(coordinator);
    scenario.verify(&plan, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_the_promoter_then_restart_it() {
    let mut scenario = Scenario::new("kill-promoter", 3).await;
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 100);
    kill_9(scenario.roles.pid("promoter"));
    scenario.roles.forget("promoter");
    // Without a promoter the run settles and waits, views untouched.
    scenario.wait_for_tasks(&mut coordinator, &plan, TASKS as u64);
    let fault = Instant::now();
    scenario.roles.start(&scenario.sandbox, &scenario.services, "promoter again", &["promoter"]);
    let run = coordinator.wait();
    assert_eq!(run.code, Some(0), "{run:?}");
    recovered("kill-promoter", fault);
    scenario.verify(&plan, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn state_connections_terminated_mid_run_are_retried() {
    let scenario = Scenario::new("terminate-state", 3).await;
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 200);
    let fault = Instant::now();
    let mut admin = sqlx::PgConnection::connect(support::POSTGRES_ADMIN_URL).await.unwrap();
    let state_database = scenario.sandbox.databases()[1].clone();
    let terminated: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&state_database)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!terminated.is_empty(), "the roles hold state connections");
    let run = coordinator.wait();
    assert_eq!(run.code, Some(0), "{run:?}");
    recovered("terminate-state", fault);
    scenario.verify(&plan, 0).await;
}

/// A pre-statement that fails two calls out of three with a serialization failure.
const FLAKY: &str = "CREATE SEQUENCE IF NOT EXISTS public.flaky;
DO $$ BEGIN IF nextval('public.flaky') % 3 <> 0 THEN RAISE EXCEPTION 'injected' USING ERRCODE = '40001'; END IF; END $$;
";

#[tokio::test(flavor = "multi_thread")]
async fn transient_warehouse_failures_are_retried_and_counted() {
    let scenario = Scenario::new("transient", 3).await;
    let daily = DAILY.replace("SELECT CAST(@start_ds", &format!("{FLAKY}\nSELECT CAST(@start_ds"));
    scenario.sandbox.write("models/fault/daily.sql", &daily);
    let (coordinator, plan) = scenario.start_apply();
    let run = coordinator.wait();
    assert_eq!(run.code, Some(0), "{run:?}");
    let status = scenario.sandbox.sluice(&["status", &plan]);
    let words: Vec<&str> = status.stdout.split_whitespace().collect();
    let retries: u64 = words
        .windows(2)
        .find_map(|pair| pair[1].starts_with("retries").then(|| pair[0].parse().ok()).flatten())
        .unwrap_or_else(|| panic!("no retry figure in {status:?}"));
    assert!(retries >= 84, "every daily task failed at least once before it succeeded: {retries} retries");
    scenario.verify(&plan, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_dead_lettered_and_the_run_completes() {
    let scenario = Scenario::new("poison", 3).await;
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 100);
    let broker = scenario.services.broker().await;
    broker.publish_raw("local", b"not a task at all").await.unwrap();
    broker.publish_raw("local", &[42, 1, 2, 3]).await.unwrap();
    let stranger = TaskMessage {
        plan_id: PlanId(plan.clone()),
        run_id: sluice_core::names::RunId(format!("{plan}-99")),
        task_index: 0,
        task_id: task_ids(&scenario.sandbox, &plan).await[0],
        gateway: "local".to_string(),
        attempt: 0,
    };
    sluice_queue::TaskQueue::publish(&broker, &[stranger]).await.unwrap();
    broker.close().await;
    let run = coordinator.wait();
    assert_eq!(run.code, Some(0), "{run:?}");
    scenario.verify(&plan, 3).await;
}

/// The task ids of a stored plan, in graph order.
async fn task_ids(sandbox: &Sandbox, plan: &str) -> Vec<sluice_core::names::TaskId> {
    let state = sluice_state::open_state(&sandbox.state_url()).await.unwrap();
    let plan = state.get_plan(&PlanId(plan.to_string())).await.unwrap().unwrap();
    TaskGraph::build(&plan).tasks.iter().map(|task| task.id).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_tasks_delivered_twice_at_once_are_written_once() {
    let scenario = Scenario::new("twice", 3).await;
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 1);
    // Every hourly task published a second time while the first copies are being worked on.
    let ids = task_ids(&scenario.sandbox, &plan).await;
    let duplicates: Vec<TaskMessage> = ids[..2016]
        .iter()
        .enumerate()
        .map(|(index, id)| TaskMessage {
            plan_id: PlanId(plan.clone()),
            run_id: sluice_core::names::RunId(format!("{plan}-1")),
            task_index: index as u32,
            task_id: *id,
            gateway: "local".to_string(),
            attempt: 1,
        })
        .collect();
    let broker = scenario.services.broker().await;
    sluice_queue::TaskQueue::publish(&broker, &duplicates).await.unwrap();
    broker.close().await;
    let run = coordinator.wait();
    assert_eq!(run.code, Some(0), "{run:?}");
    scenario.verify(&plan, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_applies_to_one_environment_at_once_one_runs() {
    let scenario = Scenario::new("two-applies", 3).await;
    let (coordinator, plan) = scenario.start_apply();
    let other =
        scenario.sandbox.read("models/fault/summary.sql").replace("SUM(total) AS total", "SUM(total) AS total, 1 AS v");
    scenario.sandbox.write("models/fault/summary.sql", &other);
    let refused = scenario.sluice(&["plan", "--auto-apply", "--now", NOW]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains(&format!("environment prod is being applied by run {plan}-1")), "{refused:?}");
    scenario.sandbox.write("models/fault/summary.sql", SUMMARY);
    let run = coordinator.wait();
    assert_eq!(run.code, Some(0), "{run:?}");
    // Now the environment shows the plan, and the other plan (made against none) is stale.
    let stale_plan = refused.plan_id();
    let stale = scenario.sluice(&["apply", &stale_plan]);
    assert_eq!(stale.code, Some(1), "{stale:?}");
    assert!(stale.stderr.contains(&format!("plan {stale_plan} is stale")), "{stale:?}");
    scenario.verify(&plan, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_then_resume_writes_each_interval_once() {
    let scenario = Scenario::new("abort", 3).await;
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 200);
    let fault = Instant::now();
    scenario.sluice(&["abort", &plan]).success();
    let aborted = coordinator.wait();
    assert_eq!(aborted.code, Some(2), "{aborted:?}");
    let resumed = scenario.sluice(&["apply", &plan]);
    resumed.success();
    recovered("abort", fault);
    scenario.verify(&plan, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_a_worker_finishes_its_task_and_loses_nothing() {
    let mut scenario = Scenario::new("sigterm", 3).await;
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 200);
    scenario.roles.stop_one("worker 1");
    let run = coordinator.wait();
    assert_eq!(run.code, Some(0), "{run:?}");
    scenario.verify(&plan, 0).await;
}
