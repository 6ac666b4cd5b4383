//! The `sluice` binary: every subcommand.

mod bench;
mod bench_apply;
mod commands;
mod console;
mod context;
mod distributed;
mod embedded;
mod progress;
mod project_files;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use sluice_core::interval::{Interval, Timestamp};
use sluice_core::names::ModelName;
use sluice_core::plan::{BackfillWindow, effective_starts, first_plan};
use sluice_core::project::load_project;
use sluice_core::query::QueryTemplate;

#[derive(Parser, Debug)]
#[command(name = "sluice", version, about = "Apply reviewed SQLMesh-format plans to SQL warehouses, at any scale")]
struct Cli {
    /// The project folder (with config.yaml and models/).
    #[arg(long, short = 'p', global = true, default_value = ".", env = "SLUICE_PROJECT")]
    project: PathBuf,
    /// The state store: a PostgreSQL URL or a SQLite file (default: the default gateway's
    /// state_connection, else .sluice/state.db in the project).
    #[arg(long, global = true, env = "SLUICE_STATE_URL", hide_env_values = true)]
    state: Option<String>,
    /// Workers per gateway in embedded mode (default: the number of cores).
    #[arg(long, global = true, env = "SLUICE_WORKERS")]
    workers: Option<usize>,
    /// Serve `/healthz`, `/readyz` and `/metrics` on this address (`0.0.0.0:9090`, say) while a
    /// long-running role runs: worker, promoter, and apply (also `plan --auto-apply` and `run`).
    /// Short commands ignore it.
    #[arg(long, global = true, env = "SLUICE_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// RabbitMQ, for distributed mode: `amqp://user:password@host:5672/vhost`. Without it,
    /// `apply` runs every role in its own process (embedded mode).
    #[arg(long, global = true, env = "SLUICE_AMQP_URL", hide_env_values = true)]
    amqp_url: Option<String>,
    /// Redis, for distributed mode's dependency counters: `redis://[:password@]host:6379[/db]`.
    #[arg(long, global = true, env = "SLUICE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Names the RabbitMQ queues and exchange (`<prefix>.tasks.<gateway>`, …) and the Redis
    /// keys (`<prefix>:…`) of distributed mode; deployments sharing a broker pick their own.
    #[arg(long, global = true, env = "SLUICE_QUEUE_PREFIX", default_value = "sluice")]
    queue_prefix: String,
    /// Distributed mode: seconds an environment lease lasts without renewal (the coordinator
    /// renews it every third). A run whose lease expired — a detached apply, a coordinator that
    /// died — is reconciled by the promoter.
    #[arg(long, global = true, env = "SLUICE_LEASE_TTL", default_value_t = 60)]
    lease_ttl: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the plan of the project against an environment.
    Plan {
        /// The environment (default prod).
        #[arg(default_value = "prod", env = "SLUICE_ENVIRONMENT")]
        environment: String,
        /// Add the task-graph summary: tasks per model, critical path.
        #[arg(long, env = "SLUICE_EXPLAIN")]
        explain: bool,
        /// Make every change forward-only.
        #[arg(long, env = "SLUICE_FORWARD_ONLY")]
        forward_only: bool,
        /// The plan's time (default now): intervals end at or before it. A date or timestamp, UTC.
        #[arg(long, env = "SLUICE_NOW")]
        now: Option<String>,
        /// Apply without asking.
        #[arg(long, env = "SLUICE_AUTO_APPLY")]
        auto_apply: bool,
        /// A development environment's backfill starts here (a date or timestamp, UTC).
        #[arg(long, env = "SLUICE_START")]
        start: Option<String>,
        /// A development environment's backfill ends here (a date includes its day).
        #[arg(long, env = "SLUICE_END")]
        end: Option<String>,
        /// Plan the models sluice can run and leave out those it cannot (Python, Jinja, kinds
        /// and macros not built) with every model that reads them; the environment keeps
        /// showing what it showed of them.
        #[arg(long, env = "SLUICE_SKIP_UNSUPPORTED")]
        skip_unsupported: bool,
        /// Backfill nothing: new tables are promoted empty (VIEW and SEED models are built); a
        /// later plan or `run` fills them.
        #[arg(long, env = "SLUICE_SKIP_BACKFILL")]
        skip_backfill: bool,
        /// Run these models of the environment again, with every model downstream of them, over
        /// `--start`/`--end` (default: all their history). A name, a glob (`sales.*`) or
        /// `tag:NAME`; repeatable. Local changes play no part in a restatement plan.
        #[arg(long = "restate-model", value_name = "SELECTOR", env = "SLUICE_RESTATE_MODEL", value_delimiter = ',')]
        restate_model: Vec<String>,
        /// Take only these models' local changes (as `--restate-model` selects, plus `+M` for M
        /// and its upstream, `M+` for M and its downstream); every other model keeps what the
        /// environment shows. Only they and what they read are backfilled; repeatable.
        #[arg(long = "select-model", value_name = "SELECTOR", env = "SLUICE_SELECT_MODEL", value_delimiter = ',')]
        select_model: Vec<String>,
    },
    /// Run an environment's models as they are: every interval whose cron has elapsed since it
    /// was last run, through the same tasks (and, with an AMQP URL, the same queues) as a plan.
    Run {
        /// The environment (default prod).
        #[arg(default_value = "prod", env = "SLUICE_ENVIRONMENT")]
        environment: String,
        /// The run's time (default now): intervals end at or before it. A date or timestamp, UTC.
        #[arg(long, env = "SLUICE_NOW")]
        now: Option<String>,
    },
    /// Apply a stored plan (or resume one that failed or was aborted). With an AMQP URL this is
    /// the distributed coordinator: it queues the ready tasks and follows the run.
    Apply {
        /// The stored plan's id.
        #[arg(env = "SLUICE_PLAN_ID")]
        plan_id: String,
        /// Distributed mode: return once the ready tasks are queued; workers and the promoter
        /// carry the run to its end.
        #[arg(long, env = "SLUICE_DETACH")]
        detach: bool,
    },
    /// Distributed mode: run one gateway's tasks until SIGTERM (then finish the tasks in hand).
    Worker {
        /// The gateway (of config.yaml) whose queue this worker consumes.
        #[arg(long, env = "SLUICE_GATEWAY")]
        gateway: String,
        /// Tasks run at once (default: the number of cores).
        #[arg(long, env = "SLUICE_CONCURRENCY")]
        concurrency: Option<usize>,
        /// After SIGTERM, seconds the tasks in hand may run on; past them their statements are
        /// cancelled and the tasks returned to the queue (default: no limit). Set it below the
        /// pod's terminationGracePeriodSeconds.
        #[arg(long, env = "SLUICE_STOP_DEADLINE")]
        stop_deadline: Option<u64>,
        /// Seconds the warehouse may be unreachable before `/readyz` says not ready.
        #[arg(long, env = "SLUICE_WAREHOUSE_GRACE", default_value_t = 30)]
        warehouse_grace: u64,
    },
    /// Distributed mode: promote every run whose tasks are all done, until SIGTERM. Also
    /// reconciles the runs no coordinator follows (lease expired): lost counters are rebuilt
    /// from state and the ready tasks queued again.
    Promoter {
        /// Seconds between two reconciling passes.
        #[arg(long, env = "SLUICE_RECONCILE_EVERY", default_value_t = 5)]
        reconcile_every: u64,
        /// Seconds a run no coordinator follows may show work outstanding, nothing queued and
        /// no task finishing before its ready tasks are queued again.
        #[arg(long, env = "SLUICE_ORPHAN_STALL", default_value_t = 30)]
        orphan_stall: u64,
    },
    /// Stop a plan's run between intervals: trips its breaker and drains its queued tasks.
    Abort {
        #[arg(env = "SLUICE_PLAN_ID")]
        plan_id: String,
    },
    /// A plan's runs and failures, or (without an id) the environments and recent runs.
    Status {
        #[arg(env = "SLUICE_PLAN_ID")]
        plan_id: Option<String>,
    },
    /// Point an environment's views back at the plan it showed before (no backfill).
    Rollback {
        #[arg(env = "SLUICE_ENVIRONMENT")]
        environment: String,
    },
    /// Drop expired environments and physical tables nothing references.
    Janitor,
    /// List the environments.
    Environments,
    /// Print a model's executable SQL for one interval (physical tables, embedded models inlined).
    Render {
        /// The model, schema.table.
        model: String,
        /// The interval's start (default: the model's first interval).
        #[arg(long)]
        start: Option<String>,
        /// The interval's end (default: one cron tick after the start).
        #[arg(long)]
        end: Option<String>,
    },
    /// Benchmarks anyone can rerun.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Plan a synthetic project (default: 100 models x 10,000 hourly intervals = a million tasks).
    Plan {
        #[arg(long, default_value_t = 100)]
        models: usize,
        #[arg(long, default_value_t = 4)]
        layers: usize,
        #[arg(long, default_value_t = 10_000)]
        intervals: usize,
        /// Recorded intervals for the missing-interval measurement.
        #[arg(long, default_value_t = 1_000_000)]
        recorded: usize,
        /// Also load the counters into Redis and publish the ready tasks to RabbitMQ (the
        /// global --amqp-url and --redis-url, else the local defaults), as the coordinator does.
        #[arg(long)]
        services: bool,
    },
    /// The raw floor (the same statements on one connection) against sluice embedded and
    /// distributed, on a synthetic project; prints wall time, tasks/s, ratio to the floor,
    /// per-task overhead and peak RSS, and checks every run's tables equal to the floor's.
    Apply {
        #[arg(long, default_value_t = 10)]
        models: usize,
        #[arg(long, default_value_t = 3)]
        layers: usize,
        /// Daily intervals per model.
        #[arg(long, default_value_t = 365)]
        days: usize,
        /// Rows per interval of the first layer's models.
        #[arg(long, default_value_t = 100)]
        rows: usize,
        #[arg(long, default_value_t = 1)]
        batch_size: u32,
        /// Models that select one row and read nothing (the per-task overhead measurement).
        #[arg(long)]
        noop: bool,
        #[arg(long, value_enum, default_value = "postgres")]
        engine: bench_apply::BenchEngine,
        /// Worker counts to measure, for embedded and distributed mode each.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        workers: Vec<usize>,
        /// Leave out embedded mode.
        #[arg(long)]
        no_embedded: bool,
        /// Leave out distributed mode.
        #[arg(long)]
        no_distributed: bool,
        #[command(flatten)]
        postgres: bench_apply::PgArgs,
        /// Keep the databases, queues and project folders.
        #[arg(long)]
        keep: bool,
        /// Runs of each configuration, each after a run of its fair floor; the table shows the
        /// medians and the spread.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// Promote N views in one transaction on PostgreSQL (create them, then point them all at
    /// new tables), timing each promotion.
    Promote {
        #[arg(long, default_value_t = 500)]
        views: usize,
        #[command(flatten)]
        postgres: bench_apply::PgArgs,
    },
}

fn now_or(text: Option<&str>) -> Result<Timestamp> {
    match text {
        Some(text) => Timestamp::parse(text).map_err(|error| anyhow!("--now: {error}")),
        None => {
            let seconds = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .context("while reading the clock")?
                .as_secs();
            Ok(Timestamp(seconds as i64))
        }
    }
}

fn render_command(cli: &Cli, model: &str, start: Option<&str>, end: Option<&str>) -> Result<()> {
    let name = ModelName::parse(model).map_err(|message| anyhow!("model: {message}"))?;
    let files = project_files::read_project_files(&cli.project)?;
    let project = load_project(&files).map_err(|errors| anyhow!("{}", errors.to_string().trim_end()))?;
    let Some(model) = project.models.get(&name) else {
        if let Some(unsupported) = project.unsupported.iter().find(|m| m.name.as_deref() == Some(&name.to_string())) {
            let reasons: Vec<String> = unsupported.errors.iter().map(ToString::to_string).collect();
            return Err(anyhow!("sluice cannot run {name}:\n  {}", reasons.join("\n  ")));
        }
        let known: Vec<String> = project.models.keys().map(ToString::to_string).collect();
        return Err(anyhow!("no model {name}; the project has {}", known.join(", ")));
    };
    let start = match start {
        Some(text) => Timestamp::parse(text).map_err(|error| anyhow!("--start: {error}"))?,
        None => model.cron.tick_at_or_after(effective_starts(&project, commands::now())[&name]),
    };
    let end = match end {
        Some(text) => Timestamp::parse(text).map_err(|error| anyhow!("--end: {error}"))?,
        None => model.cron.next_tick_after(start),
    };
    if end <= start {
        return Err(anyhow!("--end must be after --start"));
    }
    let plan = first_plan(&project, end);
    let Some(planned) = plan.snapshots.iter().find(|planned| planned.snapshot.name == name) else {
        return Err(anyhow!("{name} is not in the plan"));
    };
    let Some(rendered) = &planned.snapshot.rendered_query else {
        return Err(anyhow!("{name} is a {} model and has no query", planned.snapshot.kind.name()));
    };
    let template = QueryTemplate::from_sql(rendered);
    println!("{}", template.fill(Interval::new(start, end), end));
    Ok(())
}

/// The benchmarks' broker: --amqp-url, else the local RabbitMQ.
fn bench_amqp_url(cli: &Cli) -> String {
    cli.amqp_url.clone().unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// The benchmarks' Redis: --redis-url, else the local one.
fn bench_redis_url(cli: &Cli) -> String {
    cli.redis_url.clone().unwrap_or_else(|| "redis://127.0.0.1:6379".to_string())
}

/// The process's role, as its JSON log lines name it; `true` for the long-running ones, which
/// serve `--listen`.
fn role(command: &Command) -> (&'static str, bool) {
    match command {
        Command::Worker { .. } => ("worker", true),
        Command::Promoter { .. } => ("promoter", true),
        Command::Apply { .. } | Command::Run { .. } => ("coordinator", true),
        Command::Plan { auto_apply: true, .. } => ("coordinator", true),
        _ => ("cli", false),
    }
}

/// Starts the probe and metrics endpoint of a long-running role on `--listen`; its readiness
/// checks are registered by the role as it connects.
async fn serve_probes(cli: &Cli) -> Result<Option<sluice_ops::health::Health>> {
    let Some(address) = cli.listen else { return Ok(None) };
    if !role(&cli.command).1 {
        return Ok(None);
    }
    let metrics = sluice_ops::health::install_recorder().map_err(|error| anyhow!(error))?;
    // Lives as long as the process: the endpoint answers until the role has stopped.
    let stop = tokio_util::sync::CancellationToken::new();
    let health = sluice_ops::health::Health::start(stop.clone());
    sluice_ops::health::serve(address, health.clone(), metrics, stop).await.map_err(|error| anyhow!(error))?;
    tracing::info!(%address, "serving /healthz, /readyz and /metrics");
    Ok(Some(health))
}

async fn run(cli: &Cli) -> Result<ExitCode> {
    let workers = cli.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let services = distributed::Services::from_flags(
        cli.amqp_url.as_deref(),
        cli.redis_url.as_deref(),
        &cli.queue_prefix,
        cli.lease_ttl,
    )?;
    let health = serve_probes(cli).await?;
    let common = commands::Common { project: &cli.project, state: cli.state.as_deref(), workers, services, health };
    let exit = |outcome: commands::ApplyExit| match outcome {
        commands::ApplyExit::Success => ExitCode::SUCCESS,
        commands::ApplyExit::Failed => ExitCode::from(1),
        commands::ApplyExit::Aborted => ExitCode::from(2),
    };
    let done = |result: Result<()>| result.map(|()| ExitCode::SUCCESS);
    match &cli.command {
        Command::Run { environment, now } => {
            commands::run(&common, environment, now_or(now.as_deref())?).await.map(exit)
        }
        Command::Plan {
            environment,
            explain,
            now,
            auto_apply,
            start,
            end,
            restate_model,
            forward_only,
            select_model,
            ..
        } if !restate_model.is_empty() => {
            if *forward_only {
                bail!(
                    "--forward-only categorizes changes; a restatement plan (--restate-model) runs the environment's models as they are"
                );
            }
            if !select_model.is_empty() {
                bail!(
                    "--select-model picks local changes; a restatement plan (--restate-model) runs the environment's models as they are"
                );
            }
            let parse = |flag: &str, text: &Option<String>, read: fn(&str) -> Result<Timestamp, _>| {
                text.as_deref().map(|text| read(text).map_err(|error| anyhow!("{flag}: {error}"))).transpose()
            };
            let options = commands::RestateOptions {
                environment,
                selectors: restate_model,
                start: parse("--start", start, Timestamp::parse)?,
                end: parse("--end", end, Timestamp::parse_end)?,
                now: now_or(now.as_deref())?,
                explain: *explain,
                auto_apply: *auto_apply,
            };
            commands::restate(&common, &options).await.map(exit)
        }
        Command::Plan {
            environment,
            explain,
            forward_only,
            now,
            auto_apply,
            start,
            end,
            skip_unsupported,
            skip_backfill,
            select_model,
            ..
        } => {
            let now = now_or(now.as_deref())?;
            let target = sluice_core::names::EnvironmentName::parse(environment)
                .map_err(|message| anyhow!("environment: {message}"))?;
            let window = BackfillWindow::parse(start.as_deref(), end.as_deref(), &target, now)
                .map_err(|message| anyhow!(message))?;
            let options = commands::PlanOptions {
                environment,
                explain: *explain,
                forward_only: *forward_only,
                now,
                auto_apply: *auto_apply,
                window,
                skip_unsupported: *skip_unsupported,
                skip_backfill: *skip_backfill,
                select_model: select_model.clone(),
            };
            commands::plan(&common, &options).await.map(exit)
        }
        Command::Apply { plan_id, detach } => commands::apply(&common, plan_id, *detach).await.map(exit),
        Command::Worker { gateway, concurrency, stop_deadline, warehouse_grace } => {
            let settings = distributed::WorkerSettings {
                concurrency: concurrency.unwrap_or(workers),
                stop_deadline: stop_deadline.map(std::time::Duration::from_secs),
                warehouse_grace: std::time::Duration::from_secs(*warehouse_grace),
                health: common.health.clone(),
            };
            done(commands::worker(&common, gateway, settings).await)
        }
        Command::Promoter { reconcile_every, orphan_stall } => {
            let reconciling = distributed::Reconciling {
                every: std::time::Duration::from_secs((*reconcile_every).max(1)),
                stall_after: std::time::Duration::from_secs(*orphan_stall),
            };
            done(commands::promoter(&common, reconciling).await)
        }
        Command::Abort { plan_id } => done(commands::abort(&common, plan_id).await),
        Command::Status { plan_id } => done(commands::status(&common, plan_id.as_deref()).await),
        Command::Rollback { environment } => done(commands::rollback(&common, environment).await),
        Command::Janitor => done(commands::janitor(&common).await),
        Command::Environments => done(commands::list_environments(&common).await),
        Command::Render { model, start, end } => done(render_command(cli, model, start.as_deref(), end.as_deref())),
        Command::Bench(BenchCommand::Plan { models, layers, intervals, recorded, services }) => done(
            bench::bench_plan(bench::PlanBenchConfig {
                models: *models,
                layers: *layers,
                intervals: *intervals,
                recorded: *recorded,
                services: services.then(|| (bench_amqp_url(cli), bench_redis_url(cli))),
            })
            .await,
        ),
        Command::Bench(BenchCommand::Apply {
            models,
            layers,
            days,
            rows,
            batch_size,
            noop,
            engine,
            workers,
            no_embedded,
            no_distributed,
            postgres,
            keep,
            repeats,
        }) => {
            let config = bench_apply::ApplyBenchConfig {
                models: *models,
                layers: *layers,
                days: *days,
                rows: *rows,
                batch_size: *batch_size,
                noop: *noop,
                engine: *engine,
                postgres: postgres.server(),
                workers: workers.clone(),
                embedded: !no_embedded,
                distributed: !no_distributed,
                amqp_url: bench_amqp_url(cli),
                redis_url: bench_redis_url(cli),
                keep: *keep,
                repeats: *repeats,
            };
            done(bench_apply::bench_apply(config).await)
        }
        Command::Bench(BenchCommand::Promote { views, postgres }) => {
            done(bench_apply::bench_promote(&postgres.server(), *views).await)
        }
    }
}

fn main() -> ExitCode {
    // The fault suite's fault points (`FAILPOINTS=name=action;…`), in test builds only.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let format = match sluice_ops::logging::LogFormat::from_env() {
        Ok(format) => format,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    console::use_json(format == sluice_ops::logging::LogFormat::Json);
    // The operator's lines (`sluice::console`) show at the default level in both formats.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| "warn,sqlx::query=error,sluice::console=info".into());
    sluice_ops::logging::init(format, filter, role(&cli.command).0);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            console::error(&format!("could not start the async runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(code) => code,
        Err(error) => {
            console::error(&format!("{error:#}"));
            ExitCode::FAILURE
        }
    }
}
