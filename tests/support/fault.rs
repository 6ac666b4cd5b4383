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
  end '2024-03-24',
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
  end '2024-03-24',
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
  end '2024-03-24',
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
    url: String,
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
                match try_sample_views(&mut connection).await {
                    Ok(rows) => {
                        recorded.lock().unwrap().insert(rows);
                    }
                    // A view dropped between the catalog read and its definition's (a swap
                    // committed during the query): no moment was seen, nothing is recorded.
                    Err(error) if error.to_string().contains("could not open relation with OID") => {}
                    Err(error) => panic!("sampling the views: {error}"),
                }
                // A sampling period, not a synchronisation: every moment is as good as another.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        ViewWatcher { url: sandbox.warehouse_url(), samples, stop, task }
    }

    /// Stops sampling; asserts every sample showed no view, every view of an earlier plan
    /// (`earlier`: each one a whole environment, all of which must have been seen), or every
    /// view on its final table.
    pub async fn check(self, views: usize, earlier: &[ViewSample]) {
        self.stop.cancel();
        self.task.await.unwrap();
        let samples = self.samples.lock().unwrap().clone();
        let mut connection = sqlx::PgConnection::connect(&self.url).await.unwrap();
        let last = sample_views(&mut connection).await;
        connection.close().await.unwrap();
        assert_eq!(last.len(), views, "every view is there in the end: {last:?}");
        for before in earlier {
            assert_ne!(*before, last, "the earlier environment differs from the final one");
            assert!(samples.contains(before), "the earlier environment was seen: {before:?}");
        }
        for sample in &samples {
            assert!(
                sample.is_empty() || *sample == last || earlier.contains(sample),
                "a mixed environment was visible: {sample:?}"
            );
        }
    }
}

/// One look at the fault project's views.
pub async fn sample_views(connection: &mut sqlx::PgConnection) -> ViewSample {
    try_sample_views(connection).await.unwrap()
}

async fn try_sample_views(connection: &mut sqlx::PgConnection) -> Result<ViewSample, sqlx::Error> {
    sqlx::query_as("SELECT viewname::text, definition FROM pg_views WHERE schemaname = 'fault' ORDER BY viewname")
        .fetch_all(connection)
        .await
}

/// One scenario: a sandbox with the fault project, its services, roles and view watcher.
pub struct Scenario {
    pub name: String,
    pub sandbox: Sandbox,
    pub services: Services,
    pub roles: Roles,
    pub watcher: Option<ViewWatcher>,
    /// Whole environments of earlier plans the watcher may also have seen (see `ViewWatcher::check`).
    pub earlier_views: Vec<ViewSample>,
}

/// The password of the RabbitMQ and Redis users every fault scenario's processes connect as:
/// `verify` checks that no line those processes wrote contains it (the local PostgreSQL trusts
/// 127.0.0.1, so it gets none).
pub const SECRET: &str = "Fault-Suite-Pw-93xq";

/// `SLUICE_LOG` of every fault-suite process: info, and the workers' task timeline.
const LOG: &str = "info,sluice::timeline=debug";
pub const SECRET_USER: &str = "sluice_fault_suite";

fn run_ok(program: &str, args: &[&str]) {
    let output = std::process::Command::new(program).args(args).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// The RabbitMQ and Redis users with `SECRET` (idempotent; concurrent scenarios set the same).
pub fn ensure_secret_users() {
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
        services.log = Some(LOG.to_string());
        Scenario::with_services(name, workers, services).await
    }

    /// `new` with the default (passwordless) users: for scenarios that restart Redis, which
    /// keeps no ACL user across a restart.
    pub async fn plain(name: &str, workers: usize) -> Scenario {
        let mut services = Services::new(name);
        services.log = Some(LOG.to_string());
        Scenario::with_services(name, workers, services).await
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
        Scenario { name: name.to_string(), sandbox, services, roles, watcher, earlier_views: Vec::new() }
    }

    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = self.sandbox.command(args);
        self.services.apply_to(&mut command);
        command
    }

    /// Runs `sluice` with the scenario's services; what it printed is also appended to
    /// `cli.out` in the sandbox's folder, for the credential scan.
    pub fn sluice(&self, args: &[&str]) -> Run {
        self.sluice_command(self.command(args), args)
    }

    fn sluice_command(&self, mut command: std::process::Command, args: &[&str]) -> Run {
        use std::io::Write;
        let run = Run::from(command.stdin(std::process::Stdio::null()).output().unwrap());
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.sandbox.folder.path().join("cli.out"))
            .unwrap();
        writeln!(file, "$ sluice {args:?} -> {:?}\n{}\n{}", run.code, run.stdout, run.stderr).unwrap();
        run
    }

    /// The tasks the plan's running run has finished, from `sluice status PLAN`.
    pub fn running_tasks_done(&self, plan: &str) -> Option<u64> {
        let status = self.sluice(&["status", plan]).stdout;
        let line = status.lines().find(|line| line.contains(": running ("))?;
        let before = line.split(" tasks").next()?;
        before.rsplit(' ').next()?.parse().ok()
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
            self.running_tasks_done(plan).is_some_and(|done| done >= tasks)
        });
    }

    /// Waits until the plan's latest run is no longer running; returns `sluice status PLAN`.
    pub fn wait_for_end(&self, plan: &str) -> String {
        let mut status = String::new();
        wait_for("the run to end", Duration::from_secs(300), || {
            status = self.sluice(&["status", plan]).stdout;
            !status.contains(": running (") && status.contains(" run ")
        });
        status
    }

    /// The checks every scenario ends with; `dead_letters` is what the scenario put there.
    pub async fn verify(self, plan: &str, dead_letters: u32) {
        self.verify_with(plan, dead_letters, TABLES.len(), TASKS).await;
    }

    /// `verify` for an environment of `views` views and a plan of `tasks` tasks (models beyond
    /// the fault project's are not compared with the plain-SQL tables).
    pub async fn verify_with(mut self, plan: &str, dead_letters: u32, views: usize, tasks: usize) {
        // Every table equals the plain-SQL one, through the promoted views.
        let mut warehouse = self.sandbox.warehouse().await;
        for table in TABLES {
            let expected = warehouse.checksum("expected", table).await.unwrap();
            let actual = warehouse.checksum("fault", table).await.unwrap();
            assert_eq!(actual, expected, "fault.{table} differs from the undisturbed result");
        }
        drop(warehouse);
        if let Some(watcher) = self.watcher.take() {
            watcher.check(views, &self.earlier_views).await;
        }
        // Every task of the plan recorded done once, over all its runs.
        let mut state = sqlx::PgConnection::connect(&self.sandbox.state_url()).await.unwrap();
        let (rows, distinct): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT task_id) FROM sluice_tasks_done WHERE plan_id = $1")
                .bind(plan)
                .fetch_one(&mut state)
                .await
                .unwrap();
        let tasks = tasks as i64;
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
        // Connection errors name the address they failed on, with the password masked: a
        // worker pointed at a closed port, once for RabbitMQ and once for Redis.
        let closed_amqp = format!("amqp://{SECRET_USER}:{SECRET}@127.0.0.1:1/%2f");
        let closed_redis = format!("redis://{SECRET_USER}:{SECRET}@127.0.0.1:1");
        if self.services.amqp_url.contains(SECRET) {
            for (variable, url) in [("SLUICE_AMQP_URL", &closed_amqp), ("SLUICE_REDIS_URL", &closed_redis)] {
                let args = ["worker", "--gateway", "local"];
                let mut command = self.command(&args);
                command.env(variable, url);
                let refused = self.sluice_command(command, &args);
                assert_eq!(refused.code, Some(1), "{refused:?}");
                assert!(refused.stderr.contains("***@127.0.0.1:1"), "the error names the address: {refused:?}");
            }
        }
        // No byte any process of the scenario wrote (logs, stdout and stderr of the roles and of
        // every CLI invocation) shows a password.
        let mut scanned = 0;
        scan_for_secret(self.sandbox.folder.path(), &mut scanned);
        assert!(scanned > 0, "the scan read the processes' output");
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

/// Asserts that no file under `folder` contains `SECRET`; counts the bytes read.
fn scan_for_secret(folder: &std::path::Path, scanned: &mut usize) {
    for entry in std::fs::read_dir(folder).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            scan_for_secret(&path, scanned);
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        *scanned += bytes.len();
        let shows = bytes.windows(SECRET.len()).any(|window| window == SECRET.as_bytes());
        assert!(!shows, "{} shows the password:\n{}", path.display(), String::from_utf8_lossy(&bytes));
    }
}

/// The index of `model`'s task whose interval starts at `start`, in a stored plan's graph.
pub async fn task_index(sandbox: &Sandbox, plan: &str, model: &str, start: &str) -> u32 {
    let state = sluice_state::open_state(&sandbox.state_url()).await.unwrap();
    let plan = state.get_plan(&sluice_core::names::PlanId(plan.to_string())).await.unwrap().unwrap();
    let start = sluice_core::interval::Timestamp::parse(start).unwrap();
    let graph = sluice_core::task_graph::TaskGraph::build(&plan);
    let found = graph.tasks.iter().position(|task| {
        plan.snapshots[task.snapshot as usize].snapshot.name.to_string() == model && task.interval.start == start
    });
    found.unwrap_or_else(|| panic!("no task of {model} starts at {start:?}")) as u32
}

pub fn kill_9(pid: u32) {
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
}

/// Prints how long recovery took (for the table; never asserted).
pub fn recovered(scenario: &str, since: Instant) {
    eprintln!("scenario {scenario}: recovered in {:.1} s", since.elapsed().as_secs_f64());
}

/// One event of the workers' task timeline (tracing target `sluice::timeline`), read back from
/// a role's log: a delivery's work on a task began (`started`) or ended.
#[derive(Clone, Debug)]
pub struct TimelineEvent {
    pub log: String,
    /// The log line's UTC timestamp (fixed width: it orders as text).
    pub at: String,
    pub task: u32,
    pub started: bool,
    pub redelivered: bool,
}

/// The timeline events of every worker log in the sandbox's folder.
pub fn worker_timeline(sandbox: &Sandbox) -> Vec<TimelineEvent> {
    let mut events = Vec::new();
    for entry in std::fs::read_dir(sandbox.folder.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("worker") && name.ends_with(".log") {
            events.extend(timeline_after(&path, 0));
        }
    }
    events
}

/// The timeline events of one log, from byte `offset` on.
pub fn timeline_after(log: &std::path::Path, offset: usize) -> Vec<TimelineEvent> {
    let bytes = std::fs::read(log).unwrap();
    let text = strip_ansi(&String::from_utf8_lossy(&bytes[offset.min(bytes.len())..]));
    let name = log.file_name().unwrap().to_string_lossy().into_owned();
    text.lines()
        .filter(|line| line.contains(" sluice::timeline: "))
        .map(|line| {
            let (context, event) = line.split_once(" sluice::timeline: ").unwrap();
            let at = context.split_whitespace().next().unwrap().to_string();
            let task = context.rsplit("task=").next().unwrap();
            let digits: String = task.chars().take_while(char::is_ascii_digit).collect();
            TimelineEvent {
                log: name.clone(),
                at,
                task: digits.parse().unwrap_or_else(|_| panic!("no task index in {line:?}")),
                started: event.starts_with("task started"),
                redelivered: event.contains("redelivered=true"),
            }
        })
        .collect()
}

/// The tasks two of whose executions (in any processes or slots) overlapped in time: one began
/// before the other ended. An execution with no end in the log was still running when the log
/// was read.
pub fn tasks_run_at_once(events: &[TimelineEvent]) -> BTreeSet<u32> {
    use std::collections::BTreeMap;
    // Each log's starts of a task paired with its ends, first in first out.
    let mut open: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
    let mut executions: BTreeMap<u32, Vec<(String, String)>> = BTreeMap::new();
    let mut ordered = events.to_vec();
    ordered.sort_by(|a, b| (&a.log, &a.at).cmp(&(&b.log, &b.at)));
    for event in ordered {
        let starts = open.entry((event.log.clone(), event.task)).or_default();
        if event.started {
            starts.push(event.at);
        } else if !starts.is_empty() {
            let began = starts.remove(0);
            executions.entry(event.task).or_default().push((began, event.at));
        }
    }
    for ((_, task), starts) in open {
        for began in starts {
            executions.entry(task).or_default().push((began, "still running".to_string()));
        }
    }
    let mut overlapping = BTreeSet::new();
    for (task, mut spans) in executions {
        spans.sort();
        let mut latest_end = String::new();
        for (began, ended) in spans {
            if !latest_end.is_empty() && began < latest_end {
                overlapping.insert(task);
            }
            latest_end = latest_end.max(ended);
        }
    }
    overlapping
}

/// `text` without ANSI colour sequences (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for skipped in chars.by_ref() {
                if skipped == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}
