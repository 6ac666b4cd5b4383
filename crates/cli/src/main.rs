//! The `sluice` binary: every subcommand.

mod bench;
mod project_files;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use sluice_core::interval::{Interval, Timestamp};
use sluice_core::names::{EnvironmentName, ModelName};
use sluice_core::plan::{PlanContext, build_plan};
use sluice_core::plan_text::format_plan;
use sluice_core::project::load_project;
use sluice_core::query::QueryTemplate;
use sluice_core::task_graph::TaskGraph;

#[derive(Parser, Debug)]
#[command(name = "sluice", version, about = "Apply reviewed SQLMesh-format plans to SQL warehouses, at any scale")]
struct Cli {
    /// The project folder (with config.yaml and models/).
    #[arg(long, short = 'p', global = true, default_value = ".", env = "SLUICE_PROJECT")]
    project: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the plan of the project against an environment.
    Plan {
        /// The environment (default prod).
        #[arg(default_value = "prod")]
        environment: String,
        /// Add the task-graph summary: tasks per model, critical path.
        #[arg(long)]
        explain: bool,
        /// Make every change forward-only.
        #[arg(long)]
        forward_only: bool,
        /// The plan's time (default now): intervals end at or before it. A date or timestamp, UTC.
        #[arg(long)]
        now: Option<String>,
    },
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

fn plan_command(cli: &Cli, environment: &str, explain: bool, forward_only: bool, now: Option<&str>) -> Result<()> {
    let environment = EnvironmentName::parse(environment).map_err(|message| anyhow!("environment: {message}"))?;
    let files = project_files::read_project_files(&cli.project)?;
    let project = load_project(&files).map_err(|errors| anyhow!("{}", errors.to_string().trim_end()))?;
    for warning in &project.warnings {
        tracing::warn!("{warning}");
    }
    let now = now_or(now)?;
    // State arrives with the embedded-apply work; until then every environment is planned as new.
    let known = BTreeMap::new();
    let recorded = BTreeMap::new();
    let context = PlanContext {
        environment: &environment,
        current: None,
        base: None,
        known_snapshots: &known,
        recorded_intervals: &recorded,
        now,
        forward_only,
    };
    let plan = build_plan(&project, context);
    let graph = explain.then(|| TaskGraph::build(&plan));
    print!("{}", format_plan(&plan, None, graph.as_ref()));
    Ok(())
}

fn render_command(cli: &Cli, model: &str, start: Option<&str>, end: Option<&str>) -> Result<()> {
    let name = ModelName::parse(model).map_err(|message| anyhow!("model: {message}"))?;
    let files = project_files::read_project_files(&cli.project)?;
    let project = load_project(&files).map_err(|errors| anyhow!("{}", errors.to_string().trim_end()))?;
    let Some(model) = project.models.get(&name) else {
        let known: Vec<String> = project.models.keys().map(ToString::to_string).collect();
        return Err(anyhow!("no model {name}; the project has {}", known.join(", ")));
    };
    let start = match start {
        Some(text) => Timestamp::parse(text).map_err(|error| anyhow!("--start: {error}"))?,
        None => model.cron.tick_at_or_after(model.start),
    };
    let end = match end {
        Some(text) => Timestamp::parse(text).map_err(|error| anyhow!("--end: {error}"))?,
        None => model.cron.next_tick_after(start),
    };
    if end <= start {
        return Err(anyhow!("--end must be after --start"));
    }
    let known = BTreeMap::new();
    let recorded = BTreeMap::new();
    let environment = EnvironmentName::prod();
    let context = PlanContext {
        environment: &environment,
        current: None,
        base: None,
        known_snapshots: &known,
        recorded_intervals: &recorded,
        now: end,
        forward_only: false,
    };
    let plan = build_plan(&project, context);
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

fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Plan { environment, explain, forward_only, now } => {
            plan_command(cli, environment, *explain, *forward_only, now.as_deref())
        }
        Command::Render { model, start, end } => render_command(cli, model, start.as_deref(), end.as_deref()),
        Command::Bench(BenchCommand::Plan { models, layers, intervals, recorded }) => {
            bench::bench_plan(bench::PlanBenchConfig {
                models: *models,
                layers: *layers,
                intervals: *intervals,
                recorded: *recorded,
            })
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
