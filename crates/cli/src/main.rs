//! The `sluice` binary: every subcommand.

mod bench;
mod project_files;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use sluice_core::interval::Timestamp;
use sluice_core::names::EnvironmentName;
use sluice_core::plan::{PlanContext, build_plan};
use sluice_core::plan_text::format_plan;
use sluice_core::project::load_project;
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

fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Plan { environment, explain, forward_only, now } => {
            plan_command(cli, environment, *explain, *forward_only, now.as_deref())
        }
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
