//! The fault-suite harness: a 2,101-task project, a scenario (sandbox, services, roles, view
//! watcher) and the checks every scenario ends with. Used by `fault_suite.rs` and
//! `chaos_suite.rs`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Connection;

use super::{Backend, Roles, Run, Sandbox, Services, Spawned, wait_for};

pub const NOW: &str = "2024-04-01";

/// 84 days of hourly readings (2,016 tasks), their daily totals (84 tasks) and a FULL summary.
pub const EVENTS: &str = "MODEL (
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

pub const DAILY: &str = "MODEL (
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

pub const SUMMARY: &str = "MODEL (
  name fault.summary,
  kind FULL,
  start '2024-01-01',
  end '2024-03-25',
  cron '@daily'
);

SELECT COUNT(*) AS days, SUM(readings) AS readings, SUM(total) AS total FROM fault.daily
";

/// The same data written by plain SQL, no sluice: what every run must produce.
pub const EXPECTED: &str = "CREATE SCHEMA IF NOT EXISTS expected;
CREATE TABLE expected.events AS
  SELECT h AS hour, CAST(g.n AS INT) AS device, CAST(EXTRACT(EPOCH FROM h) AS BIGINT) % 1000 + g.n AS reading
  FROM generate_series(TIMESTAMP '2024-01-01', TIMESTAMP '2024-03-24 23:00', INTERVAL '1 hour') AS h,
       generate_series(0, 9) AS g (n);
CREATE TABLE expected.daily AS
  SELECT CAST(hour AS DATE) AS day, COUNT(*) AS readings, SUM(reading) AS total
  FROM expected.events GROUP BY CAST(hour AS DATE);
CREATE TABLE expected.summary AS
  SELECT COUNT(*) AS days, SUM(readings) AS readings, SUM(total) AS total FROM expected.daily";

pub const TABLES: [&str; 3] = ["events", "daily", "summary"];
pub const TASKS: usize = 2016 + 84 + 1;

/// One look at the environment's views: (view, definition) pairs.
pub type ViewSample = Vec<(String, String)>;

/// Samples the environment's views while a run goes: each sample is one snapshot of pg_views.
pub struct ViewWatcher {
    samples: Arc<Mutex<BTreeSet<ViewSample>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ViewWatcher {
    pub async fn start(sandbox: &Sandbox) -> ViewWatcher {
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
    pub async fn check(self, views: usize) {
        self.stop.cancel();
        self.task.await.unwrap();
        let samples = self.samples.lock().unwrap().clone();
        let last = samples.iter().max_by_key(|sample| sample.len()).cloned().unwrap_or_default();
        assert_eq!(last.len(), views, "every view is there in the end: {last:?}");
        for sample in &samples {
            assert!(sample.is_empty() || *sample == last, "a mixed environment was visible: {sample:?}");
        }
    }
}

/// One scenario: a sandbox with the fault project, its services, roles and view watcher.
pub struct Scenario {
    pub name: String,
    pub sandbox: Sandbox,
    pub services: Services,
    pub roles: Roles,
    pub watcher: Option<ViewWatcher>,
}

/// The password of the RabbitMQ and Redis users every fault scenario's processes connect as:
/// `verify` checks that no line those processes wrote contains it (the local PostgreSQL trusts
/// 127.0.0.1, so it gets none).
pub const SECRET: &str = "Fault-Suite-Pw-93xq";
const SECRET_USER: &str = "sluice_fault_suite";

fn run_ok(program: &str, args: &[&str]) {
    let output = std::process::Command::new(program).args(args).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// The RabbitMQ and Redis users with `SECRET` (idempotent; concurrent scenarios set the same).
fn ensure_secret_users() {
    let _ = std::process::Command::new("rabbitmqctl").args(["-q", "add_user", SECRET_USER, SECRET]).output();
    run_ok("rabbitmqctl", &["-q", "change_password", SECRET_USER, SECRET]);
    run_ok("rabbitmqctl", &["-q", "set_permissions", "-p", "/", SECRET_USER, ".*", ".*", ".*"]);
    let acl = ["-h", "127.0.0.1", "ACL", "SETUSER", SECRET_USER, "on", &format!(">{SECRET}"), "~*", "+@all"];
    run_ok("redis-cli", &acl);
}

impl Scenario {
    /// The sandbox, the expected tables, the promoter and `workers` worker processes, which
    /// connect to RabbitMQ and Redis with a password and log at info level, so that `verify`
    /// can check that none of their lines shows it.
    pub async fn new(name: &str, workers: usize) -> Scenario {
        ensure_secret_users();
        let mut services = Services::new(name);
        services.amqp_url = format!("amqp://{SECRET_USER}:{SECRET}@127.0.0.1:5672/%2f");
        services.redis_url = format!("redis://{SECRET_USER}:{SECRET}@127.0.0.1:6379");
        services.log = Some("info".to_string());
        Scenario::with_services(name, workers, services).await
    }

    /// `new` with the default (passwordless) users: for scenarios that restart Redis, which
    /// keeps no ACL user across a restart.
    pub async fn plain(name: &str, workers: usize) -> Scenario {
        Scenario::with_services(name, workers, Services::new(name)).await
    }

    async fn with_services(name: &str, workers: usize, services: Services) -> Scenario {
        let sandbox = Sandbox::new(Backend::Postgres).await;
        std::fs::remove_dir_all(sandbox.project.join("models")).unwrap();
        sandbox.write("models/fault/events.sql", EVENTS);
        sandbox.write("models/fault/daily.sql", DAILY);
        sandbox.write("models/fault/summary.sql", SUMMARY);
        sandbox.execute(EXPECTED).await;
        let roles = Roles::cluster(&sandbox, &services, workers, 2);
        let watcher = Some(ViewWatcher::start(&sandbox).await);
        Scenario { name: name.to_string(), sandbox, services, roles, watcher }
    }

    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = self.sandbox.command(args);
        self.services.apply_to(&mut command);
        command
    }

    pub fn sluice(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).stdin(std::process::Stdio::null()).output().unwrap())
    }

    /// Starts `plan --auto-apply` and waits until the coordinator has queued the ready tasks;
    /// returns the coordinator and the plan id.
    pub fn start_apply(&self) -> (Spawned, String) {
        let mut coordinator = Spawned::start(&self.sandbox, self.command(&["plan", "--auto-apply", "--now", NOW]));
        let plan = coordinator.read_plan_id();
        coordinator.wait_for_stderr("ready tasks queued");
        (coordinator, plan)
    }

    /// Waits until the plan's current run has finished at least `tasks` tasks.
    pub fn wait_for_tasks(&self, coordinator: &mut Spawned, plan: &str, tasks: u64) {
        let what = format!("{tasks} tasks done");
        wait_for(&what, Duration::from_secs(300), || {
            coordinator.assert_running(&what);
            self.sandbox.running_tasks_done(plan).is_some_and(|done| done >= tasks)
        });
    }

    /// Waits until the plan's latest run is no longer running; returns `sluice status PLAN`.
    pub fn wait_for_end(&self, plan: &str) -> String {
        let mut status = String::new();
        wait_for("the run to end", Duration::from_secs(300), || {
            status = self.sandbox.sluice(&["status", plan]).stdout;
            !status.contains(": running (") && status.contains(" run ")
        });
        status
    }

    /// The checks every scenario ends with; `dead_letters` is what the scenario put there.
    pub async fn verify(self, plan: &str, dead_letters: u32) {
        self.verify_with(plan, dead_letters, 0, 0).await;
    }

    /// `verify` for a project with `extra_models` more models, of `extra_tasks` tasks, than the
    /// fault project (they are not compared with the plain-SQL tables).
    pub async fn verify_with(mut self, plan: &str, dead_letters: u32, extra_models: usize, extra_tasks: usize) {
        // Every table equals the plain-SQL one, through the promoted views.
        let mut warehouse = self.sandbox.warehouse().await;
        for table in TABLES {
            let expected = warehouse.checksum("expected", table).await.unwrap();
            let actual = warehouse.checksum("fault", table).await.unwrap();
            assert_eq!(actual, expected, "fault.{table} differs from the undisturbed result");
        }
        drop(warehouse);
        if let Some(watcher) = self.watcher.take() {
            watcher.check(TABLES.len() + extra_models).await;
        }
        // Every task of the plan recorded done once, over all its runs.
        let mut state = sqlx::PgConnection::connect(&self.sandbox.state_url()).await.unwrap();
        let (rows, distinct): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT task_id) FROM sluice_tasks_done WHERE plan_id = $1")
                .bind(plan)
                .fetch_one(&mut state)
                .await
                .unwrap();
        let tasks = (TASKS + extra_tasks) as i64;
        assert_eq!((rows, distinct), (tasks, tasks), "each task recorded done once");
        state.close().await.unwrap();
        let broker = self.services.broker().await;
        let runtime = tokio::runtime::Handle::current();
        // Stale copies (a scenario's duplicates) are drained by the workers after the run.
        wait_for("the task queue to drain", Duration::from_secs(60), || {
            tokio::task::block_in_place(|| runtime.block_on(sluice_queue::TaskQueue::queued(&broker, "local"))).unwrap()
                == 0
        });
        // A follower or reconciler may be holding the dead letters it just looked at (it puts
        // back those of runs that are not running; a process that exits returns them): wait for
        // them to be back, then nothing more may come.
        let mut found = 0;
        wait_for("the dead letters to be back in their queue", Duration::from_secs(30), || {
            found = tokio::task::block_in_place(|| runtime.block_on(broker.dead_letters("local"))).unwrap();
            found >= dead_letters
        });
        assert_eq!(found, dead_letters, "dead letters");
        broker.close().await;

        // Nothing left behind.
        self.roles.stop();
        // No line any process of the scenario wrote shows a password.
        for entry in std::fs::read_dir(self.sandbox.folder.path()).unwrap() {
            let path = entry.unwrap().path();
            let is_log = path.extension().is_some_and(|extension| extension == "log" || extension == "stderr");
            if is_log {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                assert!(!text.contains(SECRET), "{} shows the password:\n{text}", path.display());
            }
        }
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
        let mut admin = sqlx::PgConnection::connect(super::POSTGRES_ADMIN_URL).await.unwrap();
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

pub fn kill_9(pid: u32) {
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
}

/// Prints how long recovery took (for the table; never asserted).
pub fn recovered(scenario: &str, since: Instant) {
    eprintln!("scenario {scenario}: recovered in {:.1} s", since.elapsed().as_secs_f64());
}
