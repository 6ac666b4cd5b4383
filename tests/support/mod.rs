//! Test sandboxes: a copy of the example project in a temporary folder, run with the real
//! `sluice` binary against embedded DuckDB + SQLite state, or against a PostgreSQL gateway and
//! PostgreSQL state on the local server (a fresh database for each test).

#![allow(dead_code)]

pub mod fault;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sluice_core::config::parse_config;
use sluice_engine::Warehouse;
use sqlx::Connection;

pub const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// DuckDB warehouse, SQLite state in `.sluice/`.
    Embedded,
    /// PostgreSQL warehouse and PostgreSQL state, each in a fresh database.
    Postgres,
}

pub struct Sandbox {
    pub folder: tempfile::TempDir,
    pub project: PathBuf,
    pub backend: Backend,
    databases: Vec<String>,
}

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.ends_with(".duckdb") || name.ends_with(".wal") {
            continue;
        }
        let target = to.join(&*name);
        if entry.path().is_dir() {
            copy_folder(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub async fn create_database(name: &str) {
    let mut admin =
        sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await.expect("PostgreSQL must run on 127.0.0.1:5432");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&mut admin).await.unwrap();
}

pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

impl Sandbox {
    /// A copy of `examples/sushi` for `backend`.
    pub async fn new(backend: Backend) -> Sandbox {
        let folder = tempfile::tempdir().unwrap();
        let project = folder.path().join("sushi");
        copy_folder(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/sushi"), &project);
        let mut databases = Vec::new();
        if backend == Backend::Postgres {
            let warehouse = unique("sluice_e2e_wh");
            let state = unique("sluice_e2e_state");
            create_database(&warehouse).await;
            create_database(&state).await;
            let config = std::fs::read_to_string(project.join("config.yaml")).unwrap();
            let config = config
                .replace(
                    "      type: duckdb\n      database: warehouse.duckdb\n",
                    &format!(
                        "      type: postgres\n      host: 127.0.0.1\n      port: 5432\n      user: postgres\n      database: {warehouse}\n    state_connection:\n      type: postgres\n      host: 127.0.0.1\n      port: 5432\n      user: postgres\n      database: {state}\n"
                    ),
                )
                .replace("dialect: duckdb", "dialect: postgres");
            assert!(config.contains("type: postgres"), "{config}");
            std::fs::write(project.join("config.yaml"), config).unwrap();
            databases = vec![warehouse, state];
        }
        Sandbox { folder, project, backend, databases }
    }

    /// The PostgreSQL URL of the sandbox's warehouse database (PostgreSQL backend only).
    pub fn warehouse_url(&self) -> String {
        assert_eq!(self.backend, Backend::Postgres, "only the PostgreSQL sandbox has a warehouse database");
        format!("postgres://postgres@127.0.0.1:5432/{}", self.databases[0])
    }

    /// The sandbox's databases: warehouse, then state (PostgreSQL backend only).
    pub fn databases(&self) -> Vec<String> {
        self.databases.clone()
    }

    /// The PostgreSQL URL of the sandbox's state database (PostgreSQL backend only).
    pub fn state_url(&self) -> String {
        assert_eq!(self.backend, Backend::Postgres, "only the PostgreSQL sandbox has a state database");
        format!("postgres://postgres@127.0.0.1:5432/{}", self.databases[1])
    }

    pub fn write(&self, relative: &str, text: &str) {
        let path = self.project.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.project.join(relative)).unwrap()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command.arg("--project").arg(&self.project).args(args).env("SLUICE_LOG", "warn").env_remove("SLUICE_STATE_URL");
        command
    }

    /// Runs `sluice` to completion.
    pub fn sluice(&self, args: &[&str]) -> Run {
        let output = self.command(args).stdin(Stdio::null()).output().unwrap();
        Run::from(output)
    }

    /// Starts `sluice` in the background.
    pub fn spawn(&self, args: &[&str]) -> Spawned {
        Spawned::start(self, self.command(args))
    }

    /// The tasks the plan's running run has finished, from `sluice status PLAN`.
    pub fn running_tasks_done(&self, plan: &str) -> Option<u64> {
        let status = self.sluice(&["status", plan]).stdout;
        let line = status.lines().find(|line| line.contains(": running ("))?;
        let before = line.split(" tasks").next()?;
        before.rsplit(' ').next()?.parse().ok()
    }

    /// A connection to the project's warehouse (drop it before running `sluice` again: DuckDB
    /// allows one process per file).
    pub async fn warehouse(&self) -> Box<dyn Warehouse> {
        let config = parse_config("config.yaml", &self.read("config.yaml")).config.unwrap();
        let gateway = &config.gateways[&config.default_gateway];
        sluice_engine::connect(gateway, &self.project).await.unwrap()
    }

    pub async fn count(&self, relation: &str) -> i64 {
        let mut warehouse = self.warehouse().await;
        warehouse.query_i64(&format!("SELECT COUNT(*) FROM {relation}")).await.unwrap().unwrap()
    }

    pub async fn view_target(&self, schema: &str, name: &str) -> Option<String> {
        let mut warehouse = self.warehouse().await;
        warehouse.view_target(schema, name).await.unwrap()
    }

    pub async fn table_exists(&self, schema: &str, table: &str) -> bool {
        let mut warehouse = self.warehouse().await;
        let sql = format!(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = '{schema}' AND table_name = '{table}'"
        );
        warehouse.query_i64(&sql).await.unwrap() == Some(1)
    }

    pub async fn execute(&self, sql: &str) {
        let mut warehouse = self.warehouse().await;
        warehouse.execute(sql).await.unwrap();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // SLUICE_TEST_KEEP=1 keeps a failed test's folder (logs, project) and databases.
        if std::thread::panicking() && std::env::var_os("SLUICE_TEST_KEEP").is_some() {
            let folder = std::mem::replace(&mut self.folder, tempfile::tempdir().unwrap());
            eprintln!("kept {} and databases {:?}", folder.keep().display(), self.databases);
            return;
        }
        drop_databases(std::mem::take(&mut self.databases));
    }
}

/// Drops test databases, best effort: a fresh runtime on another thread, since a `Drop` calling
/// this may run inside one.
pub fn drop_databases(databases: Vec<String>) {
    if databases.is_empty() {
        return;
    }
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            if let Ok(mut admin) = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await {
                for database in databases {
                    let statement = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut admin).await;
                }
            }
        });
    })
    .join();
}

/// A finished `sluice` process.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Run {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn success(&self) -> &Run {
        assert_eq!(self.code, Some(0), "stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }

    /// The id `plan` stored the plan under.
    pub fn plan_id(&self) -> String {
        let line = self.stdout.lines().find(|line| line.starts_with("Stored as plan ")).unwrap_or_else(|| {
            panic!("no stored plan in:\n{}\n{}", self.stdout, self.stderr);
        });
        line.trim_start_matches("Stored as plan ").split(';').next().unwrap().to_string()
    }

    /// The physical table a plan points `view` at (`schema.table -> physical`).
    pub fn physical_of(&self, view: &str) -> String {
        let prefix = format!("  {view} -> ");
        let line = self.stdout.lines().find(|line| line.starts_with(&prefix)).unwrap_or_else(|| {
            panic!("no view line for {view} in:\n{}", self.stdout);
        });
        line.trim_start_matches(&prefix).to_string()
    }

    pub fn contains(&self, text: &str) -> bool {
        self.stdout.contains(text) || self.stderr.contains(text)
    }
}

/// A `sluice` process running in the background, its stdout and stderr each in a file of the
/// sandbox's folder (a pipe nobody reads would block a chatty process; the files stay for the
/// fault suite's credential scan).
pub struct Spawned {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Spawned {
    pub fn start(sandbox: &Sandbox, mut command: Command) -> Spawned {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let index = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stdout = sandbox.folder.path().join(format!("spawned-{index}.stdout"));
        let stderr = sandbox.folder.path().join(format!("spawned-{index}.stderr"));
        let (out, err) = (std::fs::File::create(&stdout).unwrap(), std::fs::File::create(&stderr).unwrap());
        let child = command.stdin(Stdio::null()).stdout(out).stderr(err).spawn().unwrap();
        Spawned { child, stdout, stderr }
    }

    /// Waits until the process has written a line starting with `prefix` to stdout; returns it.
    pub fn read_until(&mut self, prefix: &str) -> String {
        let what = format!("a line starting with {prefix:?} on stdout");
        let path = self.stdout.clone();
        let mut found = None;
        self.wait_for_output(&what, || {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            found = text.lines().find(|line| line.starts_with(prefix)).map(str::to_string);
            found.is_some()
        });
        found.unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the process has written `text` to stderr (panics if it exits first).
    pub fn wait_for_stderr(&mut self, text: &str) {
        let what = format!("{text:?} on stderr");
        let path = self.stderr.clone();
        self.wait_for_output(&what, || std::fs::read_to_string(&path).unwrap_or_default().contains(text));
    }

    /// Waits until `written` holds; panics with stderr if the process exits without it.
    fn wait_for_output(&mut self, what: &str, mut written: impl FnMut() -> bool) {
        wait_for(what, Duration::from_secs(300), || {
            // Whether it had exited before the look: what it wrote by then is all it wrote.
            let exited = self.child.try_wait().unwrap();
            if written() {
                return true;
            }
            if let Some(status) = exited {
                let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
                panic!("the process exited ({status}) while waiting for {what}:\n{stderr}");
            }
            false
        });
    }

    /// Panics with the process's stderr if it has exited (a wait for it to make progress
    /// would never end).
    pub fn assert_running(&mut self, waiting_for: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            panic!("the process exited ({status}) while waiting for {waiting_for}:\n{stderr}");
        }
    }

    /// Reads stdout until `plan` reports the plan it stored; returns its id.
    pub fn read_plan_id(&mut self) -> String {
        let stored = self.read_until("Stored as plan ");
        stored.trim_start_matches("Stored as plan ").split(';').next().unwrap().to_string()
    }

    /// `wait`, but panics (after killing the process) if it has not ended within `deadline`: a
    /// scenario whose recovery failed ends red instead of hanging.
    pub fn wait_within(mut self, deadline: Duration) -> Run {
        let pid = self.child.id();
        let (sender, receiver) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let status = self.child.wait();
            let _ = sender.send(());
            (self, status)
        });
        if receiver.recv_timeout(deadline).is_err() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let (spawned, _) = waiter.join().unwrap();
            let stderr = std::fs::read_to_string(&spawned.stderr).unwrap_or_default();
            panic!("the process did not end within {deadline:?}:\n{stderr}");
        }
        let (spawned, status) = waiter.join().unwrap();
        spawned.ended(status.unwrap())
    }

    /// Waits for the process; its exit code, stdout and stderr.
    pub fn wait(mut self) -> Run {
        let status = self.child.wait().unwrap();
        self.ended(status)
    }

    fn ended(&self, status: std::process::ExitStatus) -> Run {
        Run {
            code: status.code(),
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }
}

/// Waits for `condition` to hold, checking again after each check, up to `deadline`.
pub fn wait_for(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < deadline, "timed out waiting for {what}");
    }
}

/// A one-request HTTP endpoint on 127.0.0.1: returns its URL and a receiver of the request body.
pub fn webhook() -> (String, std::sync::mpsc::Receiver<String>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let read = stream.read(&mut buffer).unwrap();
            if read == 0 {
                break;
            }
            request.extend_from_slice(&buffer[..read]);
            let text = String::from_utf8_lossy(&request).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|line| {
                        line.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
                    sender.send(body.to_string()).unwrap();
                    break;
                }
            }
        }
    });
    (url, receiver)
}

/// Distributed mode's services for one test: the local RabbitMQ and Redis, under a queue and
/// key prefix of the test's own.
pub struct Services {
    pub amqp_url: String,
    pub redis_url: String,
    pub prefix: String,
    /// `SLUICE_LOG` for the processes (default: the sandbox's `warn`).
    pub log: Option<String>,
}

impl Services {
    pub fn new(name: &str) -> Services {
        Services {
            amqp_url: std::env::var("SLUICE_TEST_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string()),
            redis_url: std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string()),
            prefix: unique(&format!("t{name}")).replace('_', "-"),
            log: None,
        }
    }

    /// The environment that puts `sluice` in distributed mode on these services.
    pub fn apply_to(&self, command: &mut Command) {
        command
            .env("SLUICE_AMQP_URL", &self.amqp_url)
            .env("SLUICE_REDIS_URL", &self.redis_url)
            .env("SLUICE_QUEUE_PREFIX", &self.prefix);
        if let Some(log) = &self.log {
            command.env("SLUICE_LOG", log);
        }
    }

    /// A broker connection under the test's prefix (to inspect or clean the queues).
    pub async fn broker(&self) -> sluice_queue::rabbitmq::RabbitBroker {
        let mut config = sluice_queue::rabbitmq::RabbitConfig::new(&self.amqp_url);
        config.prefix = self.prefix.clone();
        sluice_queue::rabbitmq::RabbitBroker::connect(config).await.expect("RabbitMQ must run on 127.0.0.1:5672")
    }
}

impl Drop for Services {
    /// Deletes the test's queues and exchange (gateway `local`), pass or fail.
    fn drop(&mut self) {
        let mut config = sluice_queue::rabbitmq::RabbitConfig::new(&self.amqp_url);
        config.prefix = self.prefix.clone();
        // A fresh runtime on another thread, since drop may run inside one.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                if let Ok(broker) = sluice_queue::rabbitmq::RabbitBroker::connect(config).await {
                    let _ = broker.delete_topology(&["local"]).await;
                    broker.close().await;
                }
            });
        })
        .join();
    }
}

/// Long-running `sluice` roles of a test; stopped with SIGTERM when dropped.
#[derive(Default)]
pub struct Roles {
    children: Vec<(String, Child, PathBuf)>,
}

impl Roles {
    pub fn start(&mut self, sandbox: &Sandbox, services: &Services, name: &str, args: &[&str]) {
        let mut command = sandbox.command(args);
        services.apply_to(&mut command);
        // The log (stderr) and stdout go to files: a pipe nobody reads would block a chatty
        // role, and the fault suite scans every byte written for credentials.
        // A role started again under a name keeps its first life's files.
        let base = name.replace(' ', "-");
        let file_name = (1..)
            .map(|life| if life == 1 { base.clone() } else { format!("{base}-{life}") })
            .find(|candidate| !sandbox.folder.path().join(format!("{candidate}.log")).exists())
            .unwrap();
        let log = sandbox.folder.path().join(format!("{file_name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let stdout = std::fs::File::create(sandbox.folder.path().join(format!("{file_name}.stdout"))).unwrap();
        let child = command.stdin(Stdio::null()).stdout(stdout).stderr(file).spawn().unwrap();
        self.children.push((name.to_string(), child, log));
    }

    /// Takes a role started by the caller (stopped like the others).
    pub fn adopt(&mut self, name: &str, child: Child, log: PathBuf) {
        self.children.push((name.to_string(), child, log));
    }

    /// The promoter and `workers` worker processes of the `local` gateway.
    pub fn cluster(sandbox: &Sandbox, services: &Services, workers: usize, concurrency: usize) -> Roles {
        let mut roles = Roles::default();
        roles.start(sandbox, services, "promoter", &["promoter"]);
        roles.add_workers(sandbox, services, workers, concurrency);
        roles
    }

    pub fn add_workers(&mut self, sandbox: &Sandbox, services: &Services, workers: usize, concurrency: usize) {
        let concurrency = concurrency.to_string();
        for index in 0..workers {
            let name = format!("worker {index}");
            self.start(sandbox, services, &name, &["worker", "--gateway", "local", "--concurrency", &concurrency]);
        }
    }

    /// The log (stderr) file of a running role.
    pub fn log(&self, name: &str) -> PathBuf {
        self.children.iter().find(|(role, _, _)| role == name).map(|(_, _, log)| log.clone()).unwrap()
    }

    /// The process id of a role.
    pub fn pid(&self, name: &str) -> u32 {
        self.children.iter().find(|(role, _, _)| role == name).map(|(_, child, _)| child.id()).unwrap()
    }

    /// Forgets a role that was killed (reaping it).
    pub fn forget(&mut self, name: &str) {
        let position = self.children.iter().position(|(role, _, _)| role == name).unwrap();
        let (_, mut child, _) = self.children.remove(position);
        let _ = child.wait();
    }

    /// Sends SIGTERM to one role and waits: it must exit successfully (a graceful stop).
    pub fn stop_one(&mut self, name: &str) {
        let position = self.children.iter().position(|(role, _, _)| role == name).unwrap();
        let (name, mut child, log) = self.children.remove(position);
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let status = wait_stopped(&name, &mut child, &log);
        let log = std::fs::read_to_string(log).unwrap_or_default();
        assert!(status.success(), "{name} did not stop cleanly ({status:?}):\n{log}");
    }

    /// Sends SIGTERM to every role and waits: each must exit successfully (a graceful stop).
    pub fn stop(&mut self) {
        for (_, child, _) in &self.children {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        }
        for (name, mut child, log) in self.children.drain(..) {
            let status = wait_stopped(&name, &mut child, &log);
            let log = std::fs::read_to_string(log).unwrap_or_default();
            assert!(status.success(), "{name} did not stop cleanly ({status:?}):\n{log}");
        }
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for a role sent SIGTERM to exit: a role that finishes its tasks in hand must stop
/// within two minutes; one that does not is killed and the test fails with its log.
fn wait_stopped(name: &str, child: &mut Child, log: &Path) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{name} did not stop within 120 s of SIGTERM:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A daily model of `days` intervals from 2024-01-01 whose every interval sleeps `seconds` in
/// PostgreSQL (its columns declared, so creating its table runs no query).
pub fn sleeping_model(name: &str, days: u32, seconds: u32) -> String {
    format!(
        "MODEL (
  name {name},
  kind INCREMENTAL_BY_TIME_RANGE (
    time_column day,
    batch_size 1
  ),
  start '2024-01-01',
  end '2024-01-{end:02}',
  cron '@daily',
  columns (day DATE, one INT)
);

SELECT CAST(@start_ds AS DATE) AS day, (SELECT 1 FROM (SELECT pg_sleep({seconds})) AS s) AS one
",
        end = days
    )
}

/// A port free on 127.0.0.1 now (for a role's --listen).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on 127.0.0.1:port: the status code and the body.
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}
