//! `sluice bench apply`: the raw floor against sluice embedded and distributed, on the same
//! synthetic project and data.
//!
//! - **fair floor, N connections**: what a skilled engineer hand-writes with the same
//!   parallelism: N connections, each task one round trip and one transaction
//!   (`BEGIN; DELETE …; INSERT … SELECT …; COMMIT`), a task started as soon as the tasks it
//!   reads are done (interval-level pipelining), tables created before the clock;
//! - **serial floor**: the same statements, two round trips per task, one connection, model by
//!   model (a secondary line);
//! - **embedded N**: `sluice apply --workers N` (SQLite state, in-process queue), a child
//!   process;
//! - **distributed N**: N `sluice worker --concurrency 1` processes, a promoter and the
//!   coordinator (`sluice apply`), on RabbitMQ, Redis and PostgreSQL state.
//!
//! Each configuration runs `--repeats` times, interleaved with its fair floor (floor, sluice,
//! floor, sluice, …); the table shows medians, the spread (fastest to slowest) and the 1-minute
//! load average when the configuration began, so a reader can judge the noise. Every run
//! starts from an empty warehouse database (and state); its tables are checked equal (row
//! counts and checksums) to the serial floor's. Wall time is the apply process's, from start to
//! exit (promotion included); peak RSS is each process's VmHWM, sampled while it runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sluice_core::config::{Secret, redact, url_password};
use sluice_core::interval::{Interval, Timestamp};
use sluice_core::model::ModelKind;
use sluice_core::names::PhysicalTable;
use sluice_core::plan::{Plan, first_plan};
use sluice_core::project::load_project;
use sluice_core::query::QueryTemplate;
use sluice_core::synthetic::{SYNTHETIC_START, SyntheticProject};
use sluice_core::task_graph::{Readiness, TaskGraph};
use sluice_engine::postgres_adapter::{PostgresSettings, PostgresWarehouse};
use sluice_engine::{TableChecksum, ViewUpdate, Warehouse};
use sluice_queue::rabbitmq::{RabbitBroker, RabbitConfig};

use crate::bench::peak_rss_mib;

const GATEWAY: &str = "bench";

/// The warehouse engine the benchmark writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchEngine {
    Postgres,
    Duckdb,
}

/// The PostgreSQL server the benchmarks create their databases on (and drop them from).
#[derive(clap::Args, Clone, Debug)]
pub struct PgArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub pg_host: String,
    #[arg(long, default_value_t = 5432)]
    pub pg_port: u16,
    #[arg(long, default_value = "postgres")]
    pub pg_user: String,
    #[arg(long, env = "SLUICE_BENCH_PG_PASSWORD", hide_env_values = true)]
    pub pg_password: Option<String>,
}

impl PgArgs {
    pub fn server(&self) -> PgServer {
        PgServer {
            host: self.pg_host.clone(),
            port: self.pg_port,
            user: self.pg_user.clone(),
            password: self.pg_password.clone(),
        }
    }
}

/// A PostgreSQL server the benchmark may create and drop databases on.
#[derive(Clone, Debug)]
pub struct PgServer {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
}

impl PgServer {
    fn settings(&self, database: &str) -> PostgresSettings {
        PostgresSettings {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            password: Secret::new(self.password.clone().unwrap_or_default()),
            database: database.to_string(),
        }
    }

    fn url(&self, database: &str) -> String {
        let password = self.password.as_deref().map(|password| format!(":{password}")).unwrap_or_default();
        format!("postgres://{}{password}@{}:{}/{database}", self.user, self.host, self.port)
    }

    fn connection_yaml(&self, database: &str) -> String {
        let mut yaml = format!(
            "      type: postgres\n      host: '{}'\n      port: {}\n      user: '{}'\n      database: '{database}'\n",
            self.host, self.port, self.user
        );
        if let Some(password) = &self.password {
            yaml.push_str(&format!("      password: '{password}'\n"));
        }
        yaml
    }

    async fn connect(&self, database: &str) -> Result<PostgresWarehouse> {
        PostgresWarehouse::connect(GATEWAY, self.settings(database))
            .await
            .with_context(|| format!("connecting to PostgreSQL database {database} on {}:{}", self.host, self.port))
    }
}

#[derive(Clone, Debug)]
pub struct ApplyBenchConfig {
    pub models: usize,
    pub layers: usize,
    pub days: usize,
    pub rows: usize,
    pub batch_size: u32,
    pub noop: bool,
    pub engine: BenchEngine,
    pub postgres: PgServer,
    pub workers: Vec<usize>,
    pub embedded: bool,
    pub distributed: bool,
    pub amqp_url: String,
    pub redis_url: String,
    /// Keep the databases, queues and project folders (for inspection).
    pub keep: bool,
    /// Runs of each configuration (and of its fair floor), interleaved.
    pub repeats: usize,
}

/// One measured run.
struct Measured {
    label: String,
    wall: Duration,
    /// Peak RSS per process, MiB.
    peaks: Vec<(String, f64)>,
}

/// Databases and folders to remove when the benchmark ends.
#[derive(Default)]
struct Leftovers {
    databases: Vec<String>,
    folders: Vec<PathBuf>,
    prefixes: Vec<String>,
}

pub async fn bench_apply(mut config: ApplyBenchConfig) -> Result<()> {
    if config.distributed && config.engine == BenchEngine::Duckdb {
        println!("distributed runs left out: they need a warehouse every worker process can reach (--engine postgres)");
        config.distributed = false;
    }
    let tag = format!("sluice_bench_{}", std::process::id());
    let root = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let mut leftovers = Leftovers { folders: vec![root.clone()], ..Leftovers::default() };
    let result = measure_all(&config, &tag, &root, &mut leftovers).await;
    if config.keep {
        println!("kept: databases {:?}, folder {}", leftovers.databases, root.display());
    } else if let Err(error) = clean_up(&config, &leftovers).await {
        eprintln!("warning: cleaning up the benchmark's databases failed: {error:#}");
    }
    result
}

async fn measure_all(config: &ApplyBenchConfig, tag: &str, root: &Path, leftovers: &mut Leftovers) -> Result<()> {
    let exe = std::env::current_exe().context("locating the sluice binary")?;
    let shape = |database: &str| -> SyntheticProject {
        let mut shape = match config.engine {
            BenchEngine::Postgres => SyntheticProject::postgres(
                config.models,
                config.layers,
                config.days,
                false,
                config.postgres.connection_yaml(database),
            ),
            BenchEngine::Duckdb => SyntheticProject::duckdb(config.models, config.layers, config.days, false),
        };
        shape.rows_per_interval = config.rows;
        shape.noop = config.noop;
        shape.batch_size = Some(config.batch_size);
        shape
    };
    let start = Timestamp::parse(SYNTHETIC_START).map_err(|error| anyhow!("{error}"))?;
    let now = Timestamp(start.0 + shape("x").span_seconds());
    let now_text = now.to_string();

    // The floor.
    let floor_database = format!("{tag}_floor");
    let floor_dir = root.join("floor");
    let floor_shape = shape(&floor_database);
    write_project(&floor_dir, &floor_shape)?;
    let mut floor_warehouse = open_warehouse(config, leftovers, &floor_database, &floor_dir).await?;
    let (plan, graph) = plan_of(&floor_shape, now)?;
    let tasks = graph.len();
    println!(
        "sluice bench apply: {} models in {} layers x {} daily intervals x {} rows{}, batch_size {}, {} tasks, {} warehouse",
        config.models,
        config.layers,
        config.days,
        config.rows,
        if config.noop { " (no-op models: one row)" } else { "" },
        config.batch_size,
        tasks,
        match config.engine {
            BenchEngine::Postgres => "PostgreSQL",
            BenchEngine::Duckdb => "DuckDB",
        }
    );
    let floor_wall = run_floor(floor_warehouse.as_mut(), &plan, &graph, now).await?;
    let expected = floor_checksums(floor_warehouse.as_mut(), &plan).await?;
    drop(floor_warehouse);
    let serial = Measured {
        label: "serial floor (1 connection)".to_string(),
        wall: floor_wall,
        peaks: vec![("bench".to_string(), peak_rss_mib().unwrap_or(0.0))],
    };
    print_row(&serial, floor_wall, tasks);
    let mut rows = vec![Row::of(std::slice::from_ref(&serial), None, load_average())];

    let repeats = config.repeats.max(1);
    for &workers in &config.workers {
        let load = load_average();
        let plural = if workers == 1 { "" } else { "s" };
        let floor_label = format!("fair floor, {workers} connection{plural}");
        let embedded_label = format!("embedded, {workers} worker{plural}");
        let distributed_label =
            format!("distributed, {workers} worker process{}", if workers == 1 { "" } else { "es" });
        let mut floors = Vec::new();
        let mut embedded = Vec::new();
        let mut distributed = Vec::new();
        for round in 0..repeats {
            let database = format!("{tag}_f{workers}_{round}");
            let dir = root.join(format!("floor_{workers}_{round}"));
            write_project(&dir, &shape(&database))?;
            let mut connections = vec![open_warehouse(config, leftovers, &database, &dir).await?];
            for _ in 1..workers {
                connections.push(open_warehouse_again(config, &database, &dir).await?);
            }
            let wall = run_fair_floor(connections, &plan, &graph, now).await?;
            let mut warehouse = open_warehouse_again(config, &database, &dir).await?;
            verify_tables(warehouse.as_mut(), &plan, &expected, &floor_label).await?;
            drop(warehouse);
            let measured = Measured { label: floor_label.clone(), wall, peaks: Vec::new() };
            print_row(&measured, floor_wall, tasks);
            floors.push(measured);

            if config.embedded {
                let database = format!("{tag}_e{workers}_{round}");
                let dir = root.join(format!("embedded_{workers}_{round}"));
                write_project(&dir, &shape(&database))?;
                drop(open_warehouse(config, leftovers, &database, &dir).await?);
                let run = Runner { exe: &exe, dir: &dir, state: None, services: None };
                let plan_id = run.plan(&now_text).await?;
                let measured = run.embedded_apply(&embedded_label, &plan_id, workers).await?;
                let mut warehouse = open_warehouse_again(config, &database, &dir).await?;
                verify(warehouse.as_mut(), &plan, &expected, &embedded_label).await?;
                print_row(&measured, floor_wall, tasks);
                embedded.push(measured);
            }
            if config.distributed {
                let database = format!("{tag}_d{workers}_{round}");
                let state_database = format!("{database}_state");
                let prefix = database.clone();
                let dir = root.join(format!("distributed_{workers}_{round}"));
                write_project(&dir, &shape(&database))?;
                drop(open_warehouse(config, leftovers, &database, &dir).await?);
                drop(open_warehouse(config, leftovers, &state_database, &dir).await?);
                leftovers.prefixes.push(prefix.clone());
                let services = Services { amqp_url: &config.amqp_url, redis_url: &config.redis_url, prefix: &prefix };
                let state_url = config.postgres.url(&state_database);
                let run = Runner { exe: &exe, dir: &dir, state: Some(&state_url), services: Some(services) };
                let measured = run.distributed_apply(&distributed_label, &now_text, workers).await?;
                let mut warehouse = open_warehouse_again(config, &database, &dir).await?;
                verify(warehouse.as_mut(), &plan, &expected, &distributed_label).await?;
                print_row(&measured, floor_wall, tasks);
                distributed.push(measured);
            }
        }
        let floor_median = median(&floors.iter().map(|measured| measured.wall).collect::<Vec<_>>());
        rows.push(Row::of(&floors, None, load));
        for runs in [embedded, distributed] {
            if !runs.is_empty() {
                rows.push(Row::of(&runs, Some(floor_median), load));
            }
        }
    }
    println!();
    print_table(&rows, tasks);
    Ok(())
}

/// One line of the table: a configuration's runs.
struct Row {
    label: String,
    walls: Vec<Duration>,
    /// The median of the fair floor with the same parallelism (none for the floors).
    floor: Option<Duration>,
    /// The 1-minute load average when the configuration began.
    load: Option<f64>,
    /// Each process's highest peak over the runs.
    peaks: Vec<(String, f64)>,
}

impl Row {
    fn of(runs: &[Measured], floor: Option<Duration>, load: Option<f64>) -> Row {
        let mut peaks: Vec<(String, f64)> = Vec::new();
        for (name, mib) in runs.iter().flat_map(|measured| &measured.peaks) {
            match peaks.iter_mut().find(|(known, _)| known == name) {
                Some((_, highest)) => *highest = highest.max(*mib),
                None => peaks.push((name.clone(), *mib)),
            }
        }
        Row {
            label: runs.first().map(|measured| measured.label.clone()).unwrap_or_default(),
            walls: runs.iter().map(|measured| measured.wall).collect(),
            floor,
            load,
            peaks,
        }
    }
}

/// The middle of the durations (the mean of the two middle ones for an even count).
fn median(walls: &[Duration]) -> Duration {
    let mut sorted = walls.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => Duration::ZERO,
        count if count % 2 == 1 => sorted[count / 2],
        count => (sorted[count / 2 - 1] + sorted[count / 2]) / 2,
    }
}

/// The 1-minute load average (`/proc/loadavg`), where the system has one.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

fn write_project(dir: &Path, shape: &SyntheticProject) -> Result<()> {
    let files = shape.files();
    std::fs::create_dir_all(dir.join("models")).with_context(|| format!("creating {}", dir.display()))?;
    let config = files.config.as_deref().unwrap_or_default();
    std::fs::write(dir.join("config.yaml"), config)
        .with_context(|| format!("writing {}/config.yaml", dir.display()))?;
    for (path, text) in &files.models {
        std::fs::write(dir.join(path), text).with_context(|| format!("writing {}/{path}", dir.display()))?;
    }
    Ok(())
}

/// A fresh warehouse: a new PostgreSQL database (recorded for clean-up), or the project's
/// DuckDB file.
async fn open_warehouse(
    config: &ApplyBenchConfig,
    leftovers: &mut Leftovers,
    database: &str,
    dir: &Path,
) -> Result<Box<dyn Warehouse>> {
    if config.engine == BenchEngine::Postgres {
        let mut admin = config.postgres.connect("postgres").await?;
        admin
            .execute(&format!("CREATE DATABASE \"{database}\""))
            .await
            .with_context(|| format!("creating database {database}"))?;
        leftovers.databases.push(database.to_string());
    }
    open_warehouse_again(config, database, dir).await
}

async fn open_warehouse_again(config: &ApplyBenchConfig, database: &str, dir: &Path) -> Result<Box<dyn Warehouse>> {
    match config.engine {
        BenchEngine::Postgres => Ok(Box::new(config.postgres.connect(database).await?)),
        BenchEngine::Duckdb => {
            let files = sluice_core::project::ProjectFiles {
                config: Some(std::fs::read_to_string(dir.join("config.yaml"))?),
                ..sluice_core::project::ProjectFiles::default()
            };
            let project = load_project(&files).map_err(|errors| anyhow!("{errors}"))?;
            let gateway = project.config.gateways.get(GATEWAY).ok_or_else(|| anyhow!("no bench gateway"))?;
            sluice_engine::connect(gateway, dir).await.context("opening the DuckDB warehouse")
        }
    }
}

fn plan_of(shape: &SyntheticProject, now: Timestamp) -> Result<(Plan, TaskGraph)> {
    let project = load_project(&shape.files()).map_err(|errors| anyhow!("{errors}"))?;
    let plan = first_plan(&project, now);
    let graph = TaskGraph::build(&plan);
    Ok((plan, graph))
}

/// Every snapshot's table (created here, not timed), time column and query template: what
/// both floors run.
async fn floor_statements(
    warehouse: &mut dyn Warehouse,
    plan: &Plan,
    now: Timestamp,
) -> Result<Vec<(PhysicalTable, String, QueryTemplate)>> {
    let mut statements = Vec::with_capacity(plan.snapshots.len());
    for planned in &plan.snapshots {
        let snapshot = &planned.snapshot;
        let table = snapshot.physical_table().ok_or_else(|| anyhow!("{} is not materialized", snapshot.name))?;
        let query = snapshot.rendered_query.clone().ok_or_else(|| anyhow!("{} has no query", snapshot.name))?;
        let template = QueryTemplate::from_sql(&query);
        let first = template.fill(sluice_core::interval::Interval::new(snapshot.start, now), now);
        warehouse.ensure_table(&table, &snapshot.columns, &first).await?;
        let ModelKind::IncrementalByTimeRange { time_column, .. } = &snapshot.kind else {
            bail!("{} is not incremental by time range", snapshot.name);
        };
        statements.push((table, time_column.clone(), template));
    }
    Ok(statements)
}

/// The serial floor: tables created first (not timed), then every task's two statements (delete the
/// interval, insert … select), each in its own implicit transaction, model by model in
/// dependency order on one connection.
async fn run_floor(warehouse: &mut dyn Warehouse, plan: &Plan, graph: &TaskGraph, now: Timestamp) -> Result<Duration> {
    let statements = floor_statements(warehouse, plan, now).await?;
    // What a hand-written script does: model by model in dependency order (the plan's order),
    // each model's intervals oldest first.
    let mut order: Vec<u32> = (0..graph.len() as u32).collect();
    order.sort_by_key(|&index| (graph.tasks[index as usize].snapshot, graph.tasks[index as usize].interval.start));
    let mut position = vec![0usize; order.len()];
    for (at, &index) in order.iter().enumerate() {
        position[index as usize] = at;
    }
    if let Some(&late) = order
        .iter()
        .find(|&&index| graph.parents(index).any(|parent| position[parent as usize] > position[index as usize]))
    {
        bail!("the plan's model order is not a dependency order (task {late} runs before a parent)");
    }
    let began = Instant::now();
    for task_index in order {
        let task = graph.tasks[task_index as usize];
        let (table, time_column, template) = &statements[task.snapshot as usize];
        let query = template.fill(task.interval, now);
        for statement in sluice_engine::interval_statements(
            table,
            sluice_engine::TimeColumn::Native(time_column),
            task.interval,
            &query,
        ) {
            warehouse.execute(&statement).await?;
        }
    }
    Ok(began.elapsed())
}

/// The fair floor: tables created first (not timed), then every task as one round trip and one
/// transaction (`BEGIN; DELETE …; INSERT … SELECT …; COMMIT`) on one of the connections, each
/// started as soon as the tasks it reads are done.
async fn run_fair_floor(
    mut connections: Vec<Box<dyn Warehouse>>,
    plan: &Plan,
    graph: &TaskGraph,
    now: Timestamp,
) -> Result<Duration> {
    let first = connections.first_mut().ok_or_else(|| anyhow!("no connection"))?;
    let statements = Arc::new(floor_statements(first.as_mut(), plan, now).await?);
    let (work_sender, work) = tokio::sync::mpsc::unbounded_channel::<(u32, usize, Interval)>();
    let work = Arc::new(tokio::sync::Mutex::new(work));
    let (done_sender, mut done) = tokio::sync::mpsc::unbounded_channel::<Result<u32>>();
    let began = Instant::now();
    let mut slots = Vec::new();
    for mut connection in connections {
        let (work, done, statements) = (work.clone(), done_sender.clone(), statements.clone());
        slots.push(tokio::spawn(async move {
            loop {
                let next = work.lock().await.recv().await;
                let Some((task, snapshot, interval)) = next else { return };
                let (table, time_column, template) = &statements[snapshot];
                let query = template.fill(interval, now);
                let script = sluice_engine::transaction_script(&sluice_engine::interval_statements(
                    table,
                    sluice_engine::TimeColumn::Native(time_column),
                    interval,
                    &query,
                ));
                let outcome = connection.execute(&script).await.map(|()| task).map_err(anyhow::Error::from);
                if done.send(outcome).is_err() {
                    return;
                }
            }
        }));
    }
    drop(done_sender);
    let mut readiness = Readiness::new(graph);
    let send = |task: u32| -> Result<()> {
        let spec = graph.tasks[task as usize];
        work_sender
            .send((task, spec.snapshot as usize, spec.interval))
            .map_err(|_| anyhow!("the floor's slots stopped"))
    };
    for task in readiness.ready() {
        send(task)?;
    }
    while readiness.outstanding() > 0 {
        let task = done.recv().await.ok_or_else(|| anyhow!("the floor's slots stopped"))??;
        for ready in readiness.complete(graph, task) {
            send(ready)?;
        }
    }
    let wall = began.elapsed();
    drop(work_sender);
    for slot in slots {
        slot.await.context("a floor slot panicked")?;
    }
    Ok(wall)
}

async fn floor_checksums(warehouse: &mut dyn Warehouse, plan: &Plan) -> Result<BTreeMap<String, TableChecksum>> {
    let mut sums = BTreeMap::new();
    for planned in &plan.snapshots {
        let snapshot = &planned.snapshot;
        let table = snapshot.physical_table().ok_or_else(|| anyhow!("{} is not materialized", snapshot.name))?;
        sums.insert(snapshot.name.to_string(), warehouse.checksum(&table.schema, &table.table).await?);
    }
    Ok(sums)
}

/// Checks every model's physical table (a floor's) against the serial floor's.
async fn verify_tables(
    warehouse: &mut dyn Warehouse,
    plan: &Plan,
    expected: &BTreeMap<String, TableChecksum>,
    label: &str,
) -> Result<()> {
    let actual = floor_checksums(warehouse, plan).await?;
    for (name, sums) in &actual {
        let floor = &expected[name];
        if sums != floor {
            bail!(
                "{label}: {name} differs from the serial floor: {} rows, checksum {} (serial floor: {} rows, checksum {})",
                sums.rows,
                sums.checksum,
                floor.rows,
                floor.checksum
            );
        }
    }
    Ok(())
}

/// Checks every model's view (prod) against the floor's table.
async fn verify(
    warehouse: &mut dyn Warehouse,
    plan: &Plan,
    expected: &BTreeMap<String, TableChecksum>,
    label: &str,
) -> Result<()> {
    for planned in &plan.snapshots {
        let name = &planned.snapshot.name;
        let actual = warehouse.checksum(&name.schema, &name.table).await?;
        let floor = &expected[&name.to_string()];
        if &actual != floor {
            bail!(
                "{label}: {name} differs from the floor: {} rows, checksum {} (floor: {} rows, checksum {})",
                actual.rows,
                actual.checksum,
                floor.rows,
                floor.checksum
            );
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Services<'a> {
    amqp_url: &'a str,
    redis_url: &'a str,
    prefix: &'a str,
}

/// Runs the sluice binary on one project folder.
struct Runner<'a> {
    exe: &'a Path,
    dir: &'a Path,
    state: Option<&'a str>,
    services: Option<Services<'a>>,
}

/// A child process whose peak RSS is sampled while it runs.
struct Watched {
    name: String,
    child: tokio::process::Child,
    peak_kib: Arc<AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
    stderr: PathBuf,
}

impl Watched {
    async fn wait(mut self) -> Result<(std::process::ExitStatus, (String, f64))> {
        let status = self.child.wait().await?;
        self.sampler.abort();
        let peak = self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0;
        Ok((status, (self.name, peak)))
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn terminate(self) -> Result<(String, f64)> {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        let stderr = self.stderr.clone();
        let name = self.name.clone();
        match tokio::time::timeout(Duration::from_secs(30), self.wait()).await {
            Ok(Ok((status, peak))) if status.success() => Ok(peak),
            Ok(Ok((status, _))) => bail!("{name} exited with {status} after SIGTERM; see {}", stderr.display()),
            Ok(Err(error)) => Err(error),
            Err(_) => bail!("{name} did not stop within 30 s of SIGTERM"),
        }
    }
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Runner<'_> {
    /// Passwords of the URLs handed to the children, kept out of anything printed.
    fn secrets(&self) -> Vec<String> {
        let mut urls: Vec<&str> = self.state.into_iter().collect();
        if let Some(services) = self.services {
            urls.extend([services.amqp_url, services.redis_url]);
        }
        urls.iter().filter_map(|url| url_password(url)).map(str::to_string).collect()
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(self.exe);
        for variable in
            ["SLUICE_STATE_URL", "SLUICE_AMQP_URL", "SLUICE_REDIS_URL", "SLUICE_QUEUE_PREFIX", "SLUICE_PROJECT"]
        {
            command.env_remove(variable);
        }
        command.arg("--project").arg(self.dir);
        if let Some(state) = self.state {
            command.arg("--state").arg(state);
        }
        if let Some(services) = self.services {
            command
                .args(["--amqp-url", services.amqp_url])
                .args(["--redis-url", services.redis_url])
                .args(["--queue-prefix", services.prefix]);
        }
        command.args(args);
        command.kill_on_drop(true);
        command
    }

    fn spawn(&self, name: &str, args: &[&str]) -> Result<Watched> {
        let stderr = self.dir.join(format!("{}.stderr", name.replace(' ', "_")));
        let mut command = self.command(args);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(self.dir.join(format!("{}.stdout", name.replace(' ', "_"))))?))
            .stderr(Stdio::from(std::fs::File::create(&stderr)?));
        let child = command.spawn().with_context(|| format!("starting {}", self.exe.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("{name} exited at once"))?;
        let peak_kib = Arc::new(AtomicU64::new(0));
        let sampled = Arc::clone(&peak_kib);
        let sampler = tokio::spawn(async move {
            // Polling, not synchronisation: VmHWM only grows, so the last sample is the peak up to then.
            while let Some(kib) = vm_hwm_kib(pid) {
                sampled.fetch_max(kib, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Ok(Watched { name: name.to_string(), child, peak_kib, sampler, stderr })
    }

    /// `sluice plan`: stores the plan, returns its id.
    async fn plan(&self, now: &str) -> Result<String> {
        let output = self.command(&["plan", "--now", now]).stdin(Stdio::null()).output().await?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!("sluice plan failed: {}", redact(&String::from_utf8_lossy(&output.stderr), &self.secrets()));
        }
        stdout
            .lines()
            .find_map(|line| line.strip_prefix("Stored as plan "))
            .and_then(|rest| rest.split(';').next())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("sluice plan printed no plan id:\n{stdout}"))
    }

    async fn timed_apply(&self, label: &str, plan_id: &str, extra: &[&str]) -> Result<(Duration, (String, f64))> {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["apply", plan_id]);
        let began = Instant::now();
        let apply = self.spawn("apply", &args)?;
        let stderr = apply.stderr.clone();
        let (status, peak) = apply.wait().await?;
        let wall = began.elapsed();
        if !status.success() {
            let text = std::fs::read_to_string(&stderr).unwrap_or_default();
            bail!("{label}: sluice apply exited with {status}:\n{}", redact(&text, &self.secrets()));
        }
        Ok((wall, peak))
    }

    async fn embedded_apply(&self, label: &str, plan_id: &str, workers: usize) -> Result<Measured> {
        let workers = workers.to_string();
        let (wall, peak) = self.timed_apply(label, plan_id, &["--workers", &workers]).await?;
        Ok(Measured { label: label.to_string(), wall, peaks: vec![peak] })
    }

    async fn distributed_apply(&self, label: &str, now: &str, workers: usize) -> Result<Measured> {
        let services = self.services.ok_or_else(|| anyhow!("no services"))?;
        let mut roles = Vec::new();
        for index in 0..workers {
            roles.push(
                self.spawn(&format!("worker {}", index + 1), &["worker", "--gateway", GATEWAY, "--concurrency", "1"])?,
            );
        }
        roles.push(self.spawn("promoter", &["promoter"])?);
        let outcome = async {
            wait_for_consumers(services, workers, &mut roles).await?;
            let plan_id = self.plan(now).await?;
            self.timed_apply(label, &plan_id, &[]).await
        }
        .await;
        let mut peaks = Vec::new();
        let mut stopped = Ok(());
        for role in roles {
            match role.terminate().await {
                Ok(peak) => peaks.push(peak),
                Err(error) => stopped = Err(error),
            }
        }
        let (wall, coordinator) = outcome?;
        stopped?;
        peaks.insert(0, ("coordinator".to_string(), coordinator.1));
        Ok(Measured { label: label.to_string(), wall, peaks })
    }
}

/// Waits until `workers` consumers are attached to the gateway's task queue, so that worker
/// start-up is not timed.
async fn wait_for_consumers(services: Services<'_>, workers: usize, roles: &mut [Watched]) -> Result<()> {
    let config = RabbitConfig { prefix: services.prefix.to_string(), ..RabbitConfig::new(services.amqp_url) };
    let broker = RabbitBroker::connect(config).await.context("connecting to RabbitMQ")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let consumers = broker.consumers(GATEWAY).await.context("asking RabbitMQ for the task queue's consumers")?;
        if consumers as usize >= workers {
            break;
        }
        for role in roles.iter_mut() {
            if let Some(status) = role.child.try_wait()? {
                bail!("{} exited with {status} while starting:\n{}", role.name, role.stderr_tail());
            }
        }
        if Instant::now() > deadline {
            bail!("only {consumers} of {workers} workers consumed the task queue after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.close().await;
    Ok(())
}

async fn clean_up(config: &ApplyBenchConfig, leftovers: &Leftovers) -> Result<()> {
    for prefix in &leftovers.prefixes {
        let broker_config = RabbitConfig { prefix: prefix.clone(), ..RabbitConfig::new(&config.amqp_url) };
        let broker = RabbitBroker::connect(broker_config).await?;
        broker.delete_topology(&[GATEWAY]).await?;
        broker.close().await;
    }
    if !leftovers.databases.is_empty() {
        let mut admin = config.postgres.connect("postgres").await?;
        for database in &leftovers.databases {
            admin.execute(&format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)")).await?;
        }
    }
    for folder in &leftovers.folders {
        let _ = std::fs::remove_dir_all(folder);
    }
    Ok(())
}

fn row_figures(measured: &Measured, floor: Duration, tasks: usize) -> (f64, f64, f64, f64) {
    let wall = measured.wall.as_secs_f64();
    let rate = tasks as f64 / wall;
    let ratio = wall / floor.as_secs_f64();
    let overhead = (wall - floor.as_secs_f64()) * 1000.0 / tasks as f64;
    (wall, rate, ratio, overhead)
}

fn peaks_text(measured: &Measured) -> String {
    measured.peaks.iter().map(|(name, mib)| format!("{name} {mib:.0}")).collect::<Vec<_>>().join(", ")
}

fn print_row(measured: &Measured, floor: Duration, tasks: usize) {
    let (wall, rate, ratio, overhead) = row_figures(measured, floor, tasks);
    println!(
        "  {:<32} {wall:>8.2} s {rate:>9.0} tasks/s {ratio:>6.2}x serial floor {overhead:>+8.3} ms/task   peak RSS MiB: {}",
        measured.label,
        if measured.peaks.is_empty() { "—".to_string() } else { peaks_text(measured) }
    );
}

/// The results as a Markdown table (the README's): per configuration the median wall time and
/// the spread over its runs, against the median of the fair floor with the same parallelism.
fn print_table(rows: &[Row], tasks: usize) {
    println!(
        "| run | median wall (s) | spread (s) | runs | tasks/s | x fair floor | overhead (ms/task) | load (1 min) | peak RSS (MiB) |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for row in rows {
        let wall = median(&row.walls).as_secs_f64();
        let fastest = row.walls.iter().min().copied().unwrap_or_default().as_secs_f64();
        let slowest = row.walls.iter().max().copied().unwrap_or_default().as_secs_f64();
        let (ratio, overhead) = match row.floor {
            Some(floor) => {
                let floor = floor.as_secs_f64();
                (format!("{:.2}", wall / floor), format!("{:+.3}", (wall - floor) * 1000.0 / tasks as f64))
            }
            None => ("—".to_string(), "—".to_string()),
        };
        let load = row.load.map_or("—".to_string(), |load| format!("{load:.2}"));
        let peaks = row.peaks.iter().map(|(name, mib)| format!("{name} {mib:.0}")).collect::<Vec<_>>().join(", ");
        println!(
            "| {} | {wall:.2} | {fastest:.2}–{slowest:.2} | {} | {:.0} | {ratio} | {overhead} | {load} | {} |",
            row.label,
            row.walls.len(),
            tasks as f64 / wall,
            if peaks.is_empty() { "—".to_string() } else { peaks }
        );
    }
}

/// `sluice bench promote`: promotes `views` views in one transaction on PostgreSQL (creating
/// them), then swaps all of them to other tables (the usual promotion), timing each.
pub async fn bench_promote(postgres: &PgServer, views: usize) -> Result<()> {
    let database = format!("sluice_bench_{}_promote", std::process::id());
    let mut admin = postgres.connect("postgres").await?;
    admin.execute(&format!("CREATE DATABASE \"{database}\"")).await.with_context(|| format!("creating {database}"))?;
    let outcome = async {
        let mut warehouse = postgres.connect(&database).await?;
        let table = |index: usize, version: &str| PhysicalTable {
            schema: "sluice__bench".to_string(),
            table: format!("bench__v{index}__{version}"),
        };
        let mut setup = vec!["CREATE SCHEMA sluice__bench".to_string()];
        for index in 0..views {
            for version in ["a", "b"] {
                let name = table(index, version);
                setup.push(format!("CREATE TABLE {}.{} (id BIGINT, ts TIMESTAMP)", name.schema, name.table));
            }
        }
        warehouse.execute(&setup.join(";\n")).await?;
        let updates = |version: &str| -> Vec<ViewUpdate> {
            (0..views)
                .map(|index| ViewUpdate {
                    schema: "bench".to_string(),
                    name: format!("v{index}"),
                    target: Some(table(index, version)),
                })
                .collect()
        };
        println!("sluice bench promote: {views} views, one transaction each time, PostgreSQL");
        let first = updates("a");
        let began = Instant::now();
        warehouse.promote(&first).await?;
        println!("  create {views} views                       {:.3} s", began.elapsed().as_secs_f64());
        let second = updates("b");
        let began = Instant::now();
        warehouse.promote(&second).await?;
        println!("  point {views} views at new tables          {:.3} s", began.elapsed().as_secs_f64());
        let target = warehouse.view_target("bench", &format!("v{}", views - 1)).await?;
        let expected = table(views - 1, "b");
        if target.as_deref() != Some(format!("{}.{}", expected.schema, expected.table).as_str()) {
            bail!("the last view points at {target:?}, not at {}.{}", expected.schema, expected.table);
        }
        Ok(())
    }
    .await;
    admin.execute(&format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)")).await?;
    outcome
}
