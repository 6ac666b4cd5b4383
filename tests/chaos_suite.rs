//! The fault scenarios that disturb a shared service: RabbitMQ restarted, Redis flushed or
//! restarted, the broker's consumer timeout lowered. `scripts/test.sh` runs this binary alone,
//! one test at a time, after every other test; each brings its service back before it ends,
//! pass or fail. Only services on 127.0.0.1 are touched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::fault::{
    EVENTS, Scenario, TABLES, TASKS, recovered, task_index, tasks_run_at_once, timeline_after, worker_timeline,
};
use support::{Backend, Roles, Sandbox, Services, free_port, get, wait_for};

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn answers(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).output().is_ok_and(|output| output.status.success())
}

fn redis_up() -> bool {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379", "ping"])
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("PONG"))
}

fn start_redis() {
    if !redis_up() {
        // As scripts/services.sh starts it: nothing on disk.
        run(
            "redis-server",
            &[
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "-::1",
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                "/var/lib/redis",
                "--logfile",
                "/var/log/redis/ci.log",
            ],
        );
        wait_for("Redis to answer", Duration::from_secs(60), redis_up);
    }
}

fn start_rabbitmq() {
    if !answers("rabbitmq-diagnostics", &["-q", "check_running"]) {
        let _ = Command::new("rabbitmqctl").args(["-q", "start_app"]).output();
        wait_for("RabbitMQ to run", Duration::from_secs(120), || {
            answers("rabbitmq-diagnostics", &["-q", "check_running"])
        });
    }
}

const DEFAULT_CONSUMER_TIMEOUT_MS: &str = "1800000";
/// How often a channel checks its consumers' timeouts, by default (RabbitMQ 3.10).
const DEFAULT_CHANNEL_TICK_MS: &str = "60000";

/// Brings the services back when a test ends, pass or fail.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        start_redis();
        start_rabbitmq();
        let _ = Command::new("rabbitmqctl")
            .args([
                "-q",
                "eval",
                &format!("application:set_env(rabbit, consumer_timeout, {DEFAULT_CONSUMER_TIMEOUT_MS})."),
            ])
            .output();
        let _ = Command::new("rabbitmqctl")
            .args([
                "-q",
                "eval",
                &format!("application:set_env(rabbit, channel_tick_interval, {DEFAULT_CHANNEL_TICK_MS})."),
            ])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_restarted_mid_run() {
    let _restore = Restore;
    let scenario = Scenario::new("rabbit-restart", 3).await;
    // Each hour's readings take 50 ms: after the restart some 15 s of work remain for six
    // slots, far longer than a worker's longest pause between reconnects (5 s), so that every
    // worker that comes back finds work.
    let paced = EVENTS.replace(
        "FROM generate_series(0, 9) AS g (n)",
        "FROM generate_series(0, 9) AS g (n), (SELECT pg_sleep(0.05)) AS pace",
    );
    assert_ne!(paced, EVENTS);
    scenario.sandbox.write("models/fault/events.sql", &paced);
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 200);
    let fault = Instant::now();
    run("rabbitmqctl", &["-q", "stop_app"]);
    // Where each worker's log stood with the broker down: what follows was written after.
    let workers = ["worker 0", "worker 1", "worker 2"];
    let offsets: Vec<usize> =
        workers.iter().map(|worker| std::fs::metadata(scenario.roles.log(worker)).unwrap().len() as usize).collect();
    run("rabbitmqctl", &["-q", "start_app"]);
    let finished = coordinator.wait_within(Duration::from_secs(300));
    assert_eq!(finished.code, Some(0), "{finished:?}");
    recovered("rabbit-restart", fault);
    // Every worker came back and took work: more tasks began in each after the restart than
    // it could have held from before it (its prefetch of 4).
    for (worker, offset) in workers.iter().zip(offsets) {
        let started = timeline_after(&scenario.roles.log(worker), offset).iter().filter(|event| event.started).count();
        assert!(started > 4, "{worker} began {started} tasks after the restart");
    }
    scenario.verify(&plan, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_flushed_mid_run() {
    let _restore = Restore;
    let scenario = Scenario::new("redis-flush", 3).await;
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 300);
    let fault = Instant::now();
    run("redis-cli", &["-h", "127.0.0.1", "-p", "6379", "flushall"]);
    let finished = coordinator.wait();
    assert_eq!(finished.code, Some(0), "{finished:?}");
    assert!(finished.contains("dependency counters rebuilt from state"), "{finished:?}");
    recovered("redis-flush", fault);
    scenario.verify(&plan, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restarted_mid_run() {
    let _restore = Restore;
    let scenario = Scenario::plain("redis-restart", 3).await;
    let (mut coordinator, plan) = scenario.start_apply();
    scenario.wait_for_tasks(&mut coordinator, &plan, 300);
    let fault = Instant::now();
    // Without persistence a restarted Redis comes back empty.
    let _ = Command::new("redis-cli").args(["-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"]).output();
    wait_for("Redis to stop", Duration::from_secs(30), || !redis_up());
    start_redis();
    let finished = coordinator.wait();
    assert_eq!(finished.code, Some(0), "{finished:?}");
    assert!(finished.contains("dependency counters rebuilt from state"), "{finished:?}");
    recovered("redis-restart", fault);
    scenario.verify(&plan, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_longer_than_the_consumer_timeout_is_written_once() {
    let _restore = Restore;
    run("rabbitmqctl", &["-q", "eval", "application:set_env(rabbit, consumer_timeout, 3000)."]);
    // Channels check the timeout every half second instead of every minute (channels opened
    // from now on), so that it surely strikes while a slow task runs.
    run("rabbitmqctl", &["-q", "eval", "application:set_env(rabbit, channel_tick_interval, 500)."]);
    let scenario = Scenario::new("consumer-timeout", 3).await;
    // Two intervals that each run longer than the lowered consumer timeout, and one that keeps
    // the run going until a copy redelivered during the first two could have committed (without
    // the write lock it would add its rows to the first copy's).
    scenario.sandbox.write("models/fault/slow.sql", &support::sleeping_model("fault.slow", 2, 8));
    scenario.sandbox.write("models/fault/slower.sql", &support::sleeping_model("fault.slower", 1, 18));
    let (coordinator, plan) = scenario.start_apply();
    let finished = coordinator.wait();
    assert_eq!(finished.code, Some(0), "{finished:?}");
    let mut warehouse = scenario.sandbox.warehouse().await;
    let rows = warehouse.query_i64("SELECT COUNT(*) FROM fault.slow").await.unwrap();
    assert_eq!(rows, Some(2), "each slow interval written once");
    let rows = warehouse.query_i64("SELECT COUNT(*) FROM fault.slower").await.unwrap();
    assert_eq!(rows, Some(1), "the slower interval written once");
    drop(warehouse);
    // The broker took a slow task back from its worker and delivered it again while the first
    // copy still ran: a redelivered copy began work, and two copies of one task ran at once.
    let timeline = worker_timeline(&scenario.sandbox);
    assert!(timeline.iter().any(|event| event.started && event.redelivered), "no redelivered task began");
    let slow = [
        task_index(&scenario.sandbox, &plan, "fault.slow", "2024-01-01").await,
        task_index(&scenario.sandbox, &plan, "fault.slow", "2024-01-02").await,
        task_index(&scenario.sandbox, &plan, "fault.slower", "2024-01-01").await,
    ];
    let at_once = tasks_run_at_once(&timeline);
    assert!(slow.iter().any(|task| at_once.contains(task)), "no two copies of a slow task ran at once: {at_once:?}");
    // The slow models are not part of the plain-SQL reference; the rest must match it.
    scenario.verify_with(&plan, 0, TABLES.len() + 2, TASKS + 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_follows_the_broker_down_and_back() {
    let _restore = Restore;
    let sandbox = Sandbox::new(Backend::Postgres).await;
    let services = Services::new("readyz");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut roles = Roles::default();
    roles.start(
        &sandbox,
        &services,
        "worker",
        &["--listen", &listen, "worker", "--gateway", "local", "--concurrency", "1"],
    );
    let ready = || get(port, "/readyz").is_some_and(|(status, _)| status == 200);
    wait_for("the worker to be ready", Duration::from_secs(60), ready);

    run("rabbitmqctl", &["-q", "stop_app"]);
    let mut answer = None;
    wait_for("/readyz to say not ready", Duration::from_secs(60), || {
        answer = get(port, "/readyz");
        answer.as_ref().is_some_and(|(status, _)| *status == 503)
    });
    let (_, body) = answer.unwrap();
    assert!(body.contains("rabbitmq: unreachable"), "{body}");
    assert!(!body.contains("redis") && !body.contains("state") && !body.contains("warehouse"), "{body}");
    // Alive all along: only readiness follows the broker.
    assert_eq!(get(port, "/healthz").unwrap().0, 200);

    run("rabbitmqctl", &["-q", "start_app"]);
    wait_for("the worker to be ready again", Duration::from_secs(120), ready);
    roles.stop();
}
