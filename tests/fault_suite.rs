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

use std::time::Instant;

use sluice_core::names::PlanId;
use sluice_core::task_graph::TaskGraph;
use sluice_queue::TaskMessage;
use sqlx::Connection;
use support::fault::{
    DAILY, EVENTS, NOW, SUMMARY, Scenario, TASKS, kill_9, recovered, sample_views, task_index, tasks_run_at_once,
    worker_timeline,
};
use support::{Sandbox, Spawned, wait_for};

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
async fn kill_9_the_coordinator_before_it_queued_its_tasks() {
    let mut scenario = Scenario::new("kill-coordinator-early", 3).await;
    // A promoter that reconciles every second, and a lease of 3 s: the orphaned run is noticed
    // soon after the coordinator stops renewing it.
    kill_9(scenario.roles.pid("promoter"));
    scenario.roles.forget("promoter");
    let promoter = ["promoter", "--reconcile-every", "1", "--orphan-stall", "3"];
    scenario.roles.start(&scenario.sandbox, &scenario.services, "promoter", &promoter);
    // The coordinator stops at its fault point just before it publishes the ready tasks.
    let mut command = scenario.command(&["--lease-ttl", "3", "plan", "--auto-apply", "--now", NOW]);
    command.env("FAILPOINTS", "coordinator-before-publish=pause");
    let mut coordinator = Spawned::start(&scenario.sandbox, command);
    let plan = coordinator.read_plan_id();
    // The run is begun and its counters loaded (the line is printed before the fault point):
    // from here on, nothing it could still do publishes a task.
    coordinator.wait_for_stderr("applying plan");
    let fault = Instant::now();
    kill_9(coordinator.pid());
    let status = scenario.wait_for_end(&plan);
    recovered("kill-coordinator-early", fault);
    assert!(status.contains(&format!("run {plan}-1: succeeded")), "{status}");
    drop(coordinator);
    // The promoter's reconciler queued the work nobody had queued.
    let log = std::fs::read_to_string(scenario.roles.log("promoter")).unwrap();
    assert!(
        log.contains("a run no coordinator follows had lost its counters or stalled; rebuilt them from state")
            && log.contains(&format!("{plan}-1")),
        "{log}"
    );
    scenario.verify(&plan, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_the_promoter_mid_promotion_of_a_second_plan() {
    let mut scenario = Scenario::new("kill-promoter", 3).await;
    let (first, first_plan) = scenario.start_apply();
    let promoted = first.wait();
    assert_eq!(promoted.code, Some(0), "{promoted:?}");
    let mut warehouse = sqlx::PgConnection::connect(&scenario.sandbox.warehouse_url()).await.unwrap();
    let first_views = sample_views(&mut warehouse).await;
    assert_eq!(first_views.len(), 3, "{first_views:?}");
    scenario.earlier_views.push(first_views);
    // A second plan: the daily readings counted another way (the same rows), so new versions of
    // the daily and summary tables, and their two views to move.
    scenario
        .sandbox
        .write("models/fault/daily.sql", &DAILY.replace("COUNT(*) AS readings", "COUNT(reading) AS readings"));
    // No promoter while it runs: the run settles and waits for one.
    kill_9(scenario.roles.pid("promoter"));
    scenario.roles.forget("promoter");
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, SECOND_PLAN_TASKS as u64);
    // A reader of the summary view in an open transaction: the promotion's statements on that
    // view (the last one it moves) wait for it, after the daily view's statements have run.
    sqlx::raw_sql("BEGIN; SELECT * FROM fault.summary LIMIT 0").execute(&mut warehouse).await.unwrap();
    scenario.roles.start(&scenario.sandbox, &scenario.services, "promoter", &["promoter"]);
    let warehouse_database = scenario.sandbox.databases()[0].clone();
    let mut admin = sqlx::PgConnection::connect(support::POSTGRES_ADMIN_URL).await.unwrap();
    let runtime = tokio::runtime::Handle::current();
    wait_for("the promotion to wait at the summary view", std::time::Duration::from_secs(120), || {
        let waiting: i64 = tokio::task::block_in_place(|| {
            runtime.block_on(
                sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock' \
                     AND wait_event = 'relation' AND query LIKE '%DROP VIEW IF EXISTS \"fault\".\"summary\"%'",
                )
                .bind(&warehouse_database)
                .fetch_one(&mut admin),
            )
        })
        .unwrap();
        waiting == 1
    });
    let fault = Instant::now();
    kill_9(scenario.roles.pid("promoter"));
    scenario.roles.forget("promoter");
    sqlx::raw_sql("ROLLBACK").execute(&mut warehouse).await.unwrap();
    warehouse.close().await.unwrap();
    admin.close().await.unwrap();
    // `status` shows where the promotion stands: every task done, no gateway moved yet.
    let status = scenario.sluice(&["status", &plan]).stdout;
    let pending = format!("promotion waiting for a promoter: 0 of 1 gateways moved (local: shows plan {first_plan})");
    assert!(status.contains(&pending), "{status}");
    scenario.roles.start(&scenario.sandbox, &scenario.services, "promoter again", &["promoter"]);
    let run = coordinator.wait();
    assert_eq!(run.code, Some(0), "{run:?}");
    recovered("kill-promoter", fault);
    scenario.verify_with(&plan, 0, 3, SECOND_PLAN_TASKS).await;
}

/// The tasks of the second plan of the promoter scenario: the daily totals and the summary.
const SECOND_PLAN_TASKS: usize = 84 + 1;

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

/// A pre-statement that fails two calls out of three with a serialization failure (the
/// sequence is created before the run: `CREATE SEQUENCE IF NOT EXISTS` races with itself).
const FLAKY: &str = "DO $$ BEGIN IF nextval('public.flaky') % 3 <> 0 THEN RAISE EXCEPTION 'injected' USING ERRCODE = '40001'; END IF; END $$;
";

#[tokio::test(flavor = "multi_thread")]
async fn transient_warehouse_failures_are_retried_and_counted() {
    let scenario = Scenario::new("transient", 3).await;
    let daily = DAILY.replace("SELECT CAST(@start_ds", &format!("{FLAKY}\nSELECT CAST(@start_ds"));
    scenario.sandbox.write("models/fault/daily.sql", &daily);
    scenario.sandbox.execute("CREATE SEQUENCE public.flaky").await;
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
async fn a_persistent_failure_fails_the_run_keeps_finished_work_and_resumes_after_the_fix() {
    let scenario = Scenario::new("persistent", 3).await;
    // One day's data is broken: its daily total divides by zero until the data is fixed.
    scenario
        .sandbox
        .execute("CREATE TABLE public.broken_days (day DATE); INSERT INTO public.broken_days VALUES ('2024-02-10')")
        .await;
    let daily = DAILY.replace(
        "SUM(reading) AS total",
        "SUM(reading) / (CASE WHEN EXISTS (SELECT 1 FROM public.broken_days AS b WHERE b.day = CAST(@start_ds AS DATE)) THEN 0 ELSE 1 END) AS total",
    );
    assert_ne!(daily, DAILY);
    scenario.sandbox.write("models/fault/daily.sql", &daily);
    let (coordinator, plan) = scenario.start_apply();
    let failed = coordinator.wait();
    assert_eq!(failed.code, Some(1), "{failed:?}");
    let status = scenario.sandbox.sluice(&["status", &plan]).stdout;
    assert!(status.contains(&format!("run {plan}-1: failed")), "{status}");
    assert!(
        status.contains("fault.daily") && status.contains("2024-02-10") && status.contains("division by zero"),
        "{status}"
    );
    // Finished work is kept: every hourly task and every other day.
    let done = scenario.sandbox.running_tasks_done(&plan);
    assert!(done.is_none(), "the run is over");
    let fault = Instant::now();
    scenario.sandbox.execute("DELETE FROM public.broken_days").await;
    let resumed = scenario.sluice(&["apply", &plan]);
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    // Only the failed day and what waited for it ran again.
    assert!(
        resumed.stderr.contains(&format!("{TASKS} tasks over 3 models, {} already done", TASKS - 2)),
        "{resumed:?}"
    );
    assert!(resumed.stdout.contains("succeeded — 2 tasks"), "{resumed:?}");
    recovered("persistent", fault);
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

/// The hour whose readings wait for the test in the duplicate scenario.
const HELD_HOUR: &str = "2024-01-10 05:00:00";

#[tokio::test(flavor = "multi_thread")]
async fn the_same_tasks_delivered_twice_at_once_are_written_once() {
    let scenario = Scenario::new("twice", 3).await;
    // Each hour's readings take a shared lock of their own hour inside the write; the test holds
    // one hour's lock, so that hour's task stays in the middle of its write until released.
    let hour_key = |ts: &str| format!("CAST(EXTRACT(EPOCH FROM CAST({ts} AS TIMESTAMP)) / 3600 AS INT)");
    let events = EVENTS.replace(
        "FROM generate_series(0, 9) AS g (n)",
        &format!(
            "FROM generate_series(0, 9) AS g (n), (SELECT pg_advisory_xact_lock_shared(7, {})) AS held",
            hour_key("@start_ts")
        ),
    );
    assert_ne!(events, EVENTS);
    scenario.sandbox.write("models/fault/events.sql", &events);
    let mut holder = sqlx::PgConnection::connect(&scenario.sandbox.warehouse_url()).await.unwrap();
    let hold = format!("SELECT pg_advisory_lock(7, {})", hour_key(&format!("'{HELD_HOUR}'")));
    sqlx::raw_sql(sqlx::AssertSqlSafe(hold)).execute(&mut holder).await.unwrap();

    let (mut coordinator, plan) = scenario.start_apply();
    let waiting_writes = |count: i64| {
        let database = scenario.sandbox.databases()[0].clone();
        let runtime = tokio::runtime::Handle::current();
        move || {
            let waiting: i64 = tokio::task::block_in_place(|| {
                runtime.block_on(async {
                    let mut admin = sqlx::PgConnection::connect(support::POSTGRES_ADMIN_URL).await.unwrap();
                    sqlx::query_scalar(
                        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock' \
                         AND query LIKE '%pg_advisory_xact_lock_shared%' AND query LIKE $2",
                    )
                    .bind(&database)
                    .bind(format!("%'{HELD_HOUR}'%"))
                    .fetch_one(&mut admin)
                    .await
                })
            })
            .unwrap();
            waiting >= count
        }
    };
    wait_for("the held hour's write to wait", std::time::Duration::from_secs(300), waiting_writes(1));
    coordinator.assert_running("the held hour's write");
    // Every hourly task published a second time while the first copies are being worked on;
    // the held hour's copy finds its first copy mid-write.
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
    wait_for("both copies of the held hour to be mid-write", std::time::Duration::from_secs(300), waiting_writes(2));
    sqlx::raw_sql("SELECT pg_advisory_unlock_all()").execute(&mut holder).await.unwrap();
    holder.close().await.unwrap();
    let run = coordinator.wait();
    assert_eq!(run.code, Some(0), "{run:?}");
    // The timeline shows the held hour's two copies executing at the same moment.
    let held = task_index(&scenario.sandbox, &plan, "fault.events", HELD_HOUR).await;
    let at_once = tasks_run_at_once(&worker_timeline(&scenario.sandbox));
    assert!(at_once.contains(&held), "the held hour's copies (task {held}) did not run at once: {at_once:?}");
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
async fn purging_the_task_queue_by_hand_aborts_then_resume_completes() {
    let scenario = Scenario::new("purge", 3).await;
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 100);
    let fault = Instant::now();
    let queue = format!("{}.tasks.local", scenario.services.prefix);
    let purge = std::process::Command::new("rabbitmqctl").args(["-q", "purge_queue", &queue]).output().unwrap();
    assert!(purge.status.success(), "rabbitmqctl purge_queue: {}", String::from_utf8_lossy(&purge.stderr));
    let aborted = coordinator.wait();
    assert_eq!(aborted.code, Some(2), "{aborted:?}");
    assert!(aborted.contains("purged by hand"), "{aborted:?}");
    let resumed = scenario.sluice(&["apply", &plan]);
    resumed.success();
    recovered("purge", fault);
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
