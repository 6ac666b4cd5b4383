//! The subcommands that read and change state: plan, apply, abort, status, rollback, janitor,
//! environments.

use std::collections::BTreeSet;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use sluice_coordinator::ApplyOutcome;
use sluice_core::interval::Timestamp;
use sluice_core::names::{EnvironmentName, PlanId};
use sluice_core::plan::{BackfillWindow, Plan};
use sluice_core::plan_text::format_plan;
use sluice_core::task_graph::TaskGraph;
use sluice_engine::WarehouseFactory;
use sluice_state::{RunStatus, StateStore};
use sluice_worker::retry::RetryPolicy;

use crate::context::{ProjectContext, ProjectWarehouses, open_state, state_location};
use crate::distributed::{DistributedApply, Services};
use crate::embedded::{EmbeddedApply, apply as apply_embedded};

/// Settings every state-touching command shares.
pub struct Common<'a> {
    pub project: &'a Path,
    pub state: Option<&'a str>,
    pub workers: usize,
    /// Distributed mode's services; `None` runs every role in this process.
    pub services: Option<Services>,
    /// The readiness checks of a long-running role served on `--listen`, if any.
    pub health: Option<sluice_ops::health::Health>,
}

pub fn now() -> Timestamp {
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Timestamp(seconds as i64)
}

fn user() -> String {
    std::env::var("SLUICE_USER").or_else(|_| std::env::var("USER")).unwrap_or_else(|_| "unknown".to_string())
}

/// The exit status of an apply: 0 promoted or nothing to do, 1 failed, 2 aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyExit {
    Success,
    Failed,
    Aborted,
}

pub struct PlanOptions<'a> {
    pub environment: &'a str,
    pub explain: bool,
    pub forward_only: bool,
    pub now: Timestamp,
    pub auto_apply: bool,
    /// `--start`/`--end`: a development environment's backfill window.
    pub window: BackfillWindow,
    /// `--skip-unsupported`: leave out the models sluice cannot run.
    pub skip_unsupported: bool,
    /// `--skip-backfill`: promote the new tables empty.
    pub skip_backfill: bool,
    /// `--select-model`: only these models' local changes.
    pub select_model: Vec<String>,
}

fn open_context(common: &Common<'_>) -> Result<ProjectContext> {
    ProjectContext::load(common.project)
}

async fn state_of(common: &Common<'_>, context: Option<&ProjectContext>) -> Result<Arc<dyn StateStore>> {
    let config = context.map(|context| &context.project.config);
    let location = state_location(common.state, config, common.project)?;
    open_state(&location).await
}

fn warehouses(context: &ProjectContext) -> Arc<ProjectWarehouses> {
    Arc::new(ProjectWarehouses { gateways: context.project.config.gateways.clone(), root: context.root.clone() })
}

pub async fn plan(common: &Common<'_>, options: &PlanOptions<'_>) -> Result<ApplyExit> {
    let environment =
        EnvironmentName::parse(options.environment).map_err(|message| anyhow!("environment: {message}"))?;
    let context = open_context(common)?;
    let state = state_of(common, Some(&context)).await?;
    let project = &context.project;
    if let Some(errors) = project.unsupported_errors() {
        let listed = errors.to_string();
        if !options.skip_unsupported {
            bail!(
                "{}\nsluice cannot run these models (nor the models that read them); plan the others with --skip-unsupported",
                listed.trim_end()
            );
        }
        let names: Vec<&str> = project.unsupported.iter().filter_map(|model| model.name.as_deref()).collect();
        println!("Left out (--skip-unsupported): {}\n", names.join(", "));
    }
    if options.skip_backfill && environment.is_prod() {
        crate::console::say(
            "warning: skipping the backfill in prod leaves the tables everyone reads empty or with gaps; a development environment shows a change without it",
        );
    }
    let current = state.get_environment(&environment).await?;
    let current_state = current.as_ref().map(|record| record.state.clone());
    let plan = sluice_coordinator::plan_against_state(
        state.as_ref(),
        project,
        &environment,
        options.now,
        &sluice_coordinator::PlanOptions {
            forward_only: options.forward_only,
            window: options.window,
            skip_backfill: options.skip_backfill,
            select: options.select_model.clone(),
        },
    )
    .await?;
    let graph = options.explain.then(|| TaskGraph::build(&plan));
    print!("{}", format_plan(&plan, current_state.as_ref(), graph.as_ref()));
    if plan.has_nothing_to_do(current_state.as_ref()) {
        println!("\nNothing to do: environment {environment} already matches the project.");
        return Ok(ApplyExit::Success);
    }
    confirm_and_apply(common, &context, state, &plan, options.auto_apply).await
}

/// Stores a plan and, once confirmed (or with `--auto-apply`), applies it.
async fn confirm_and_apply(
    common: &Common<'_>,
    context: &ProjectContext,
    state: Arc<dyn StateStore>,
    plan: &Plan,
    auto_apply: bool,
) -> Result<ApplyExit> {
    state.put_plan(plan).await?;
    println!("\nStored as plan {}; apply it later with `sluice apply {}`.", plan.id, plan.id);
    if !plan.uncategorized().is_empty() {
        return Ok(ApplyExit::Success);
    }
    let confirmed = if auto_apply {
        true
    } else if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        print!("Apply? [y/N] ");
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        matches!(answer.trim(), "y" | "Y" | "yes")
    } else {
        false
    };
    if !confirmed {
        return Ok(ApplyExit::Success);
    }
    run_apply(common, warehouses(context), state, &plan.id, false).await
}

pub struct RestateOptions<'a> {
    pub environment: &'a str,
    /// `--restate-model`: names, globs, `tag:NAME`.
    pub selectors: &'a [String],
    pub start: Option<Timestamp>,
    /// Exclusive (a date-only `--end` includes its day).
    pub end: Option<Timestamp>,
    pub now: Timestamp,
    pub explain: bool,
    pub auto_apply: bool,
}

/// `sluice plan ENV --restate-model M`: the environment's models as they are, the selected ones
/// and their descendants run again over the restated time; stored and applied like any plan.
pub async fn restate(common: &Common<'_>, options: &RestateOptions<'_>) -> Result<ApplyExit> {
    let environment =
        EnvironmentName::parse(options.environment).map_err(|message| anyhow!("environment: {message}"))?;
    let context = open_context(common)?;
    let state = state_of(common, Some(&context)).await?;
    let current = state.get_environment(&environment).await?.map(|record| record.state);
    let restatement = sluice_coordinator::restatement_plan_against_state(
        state.as_ref(),
        &context.project.config,
        &environment,
        options.now,
        options.selectors,
        options.start,
        options.end,
    )
    .await?;
    for warning in &restatement.warnings {
        crate::console::say(&format!("warning: {warning}"));
    }
    let plan = restatement.plan;
    let graph = options.explain.then(|| TaskGraph::build(&plan));
    print!("{}", format_plan(&plan, current.as_ref(), graph.as_ref()));
    if plan.restatements.is_empty() {
        println!("\nNothing to restate in environment {environment}.");
        return Ok(ApplyExit::Success);
    }
    confirm_and_apply(common, &context, state, &plan, options.auto_apply).await
}

/// `sluice run ENV`: the environment's models as they are, every interval their crons have
/// completed since they last ran; the run's plan is stored and applied like any plan.
pub async fn run(common: &Common<'_>, environment: &str, now: Timestamp) -> Result<ApplyExit> {
    let environment = EnvironmentName::parse(environment).map_err(|message| anyhow!("environment: {message}"))?;
    let context = open_context(common)?;
    let state = state_of(common, Some(&context)).await?;
    let current = state.get_environment(&environment).await?.map(|record| record.state);
    let plan =
        sluice_coordinator::run_plan_against_state(state.as_ref(), &context.project.config, &environment, now).await?;
    if plan.has_nothing_to_do(current.as_ref()) {
        println!("Nothing to run: every interval of {environment} up to {now} is done.");
        return Ok(ApplyExit::Success);
    }
    print!("{}", format_plan(&plan, current.as_ref(), None));
    state.put_plan(&plan).await?;
    println!("\nStored as plan {}.", plan.id);
    run_apply(common, warehouses(&context), state, &plan.id, false).await
}

async fn run_apply(
    common: &Common<'_>,
    warehouses: Arc<ProjectWarehouses>,
    state: Arc<dyn StateStore>,
    plan_id: &PlanId,
    detach: bool,
) -> Result<ApplyExit> {
    let outcome = match &common.services {
        Some(services) => {
            refuse_file_warehouses(&warehouses, state.as_ref(), plan_id).await?;
            let settings = DistributedApply { user: user(), detach, health: common.health.clone() };
            crate::distributed::apply(services, &settings, state, warehouses, plan_id).await?
        }
        None => {
            if detach {
                return Err(anyhow!(
                    "--detach needs distributed mode (--amqp-url and --redis-url): in embedded mode the run lives in this process"
                ));
            }
            let settings = EmbeddedApply { workers: common.workers, user: user(), retry: RetryPolicy::default() };
            if let Some(health) = &common.health {
                crate::distributed::watch_state(health, &state);
                health.started();
            }
            apply_embedded(&settings, state, warehouses, plan_id).await?
        }
    };
    match outcome {
        ApplyOutcome::NothingToDo(reason) => {
            crate::console::result(&reason);
            Ok(ApplyExit::Success)
        }
        ApplyOutcome::Detached(run) => {
            let _run = run_span(plan_id, &run);
            crate::console::result(&format!(
                "run {run} continues without this process; `sluice status {plan_id}` follows it"
            ));
            Ok(ApplyExit::Success)
        }
        ApplyOutcome::Finished(run) => {
            let _run = run_span(plan_id, &run.id);
            let seconds = run.finished_at.map_or(0, |end| end.0 - run.started_at.0);
            crate::console::result(&format!(
                "run {}: {} — {} tasks, {} intervals, {} retries, {seconds} s",
                run.id, run.status, run.tasks_done, run.intervals_done, run.retries
            ));
            match run.status {
                RunStatus::Succeeded => Ok(ApplyExit::Success),
                RunStatus::Aborted => {
                    crate::console::result(&format!("the run was aborted; `sluice apply {}` resumes it", run.plan_id));
                    Ok(ApplyExit::Aborted)
                }
                RunStatus::Failed | RunStatus::Running => {
                    if let Some(error) = &run.error {
                        crate::console::error(error);
                    }
                    crate::console::result(&format!(
                        "finished intervals are kept; fix the cause and `sluice apply {}` resumes",
                        run.plan_id
                    ));
                    Ok(ApplyExit::Failed)
                }
            }
        }
    }
}

/// The span of a run's result lines (the coordinator's own lines are in one of the same name),
/// so that JSON logs join them by run_id.
fn run_span(plan_id: &PlanId, run_id: &sluice_state::RunId) -> tracing::span::EnteredSpan {
    tracing::info_span!("run", plan_id = %plan_id, run_id = %run_id, trace_id = %sluice_core::trace::trace_id(run_id))
        .entered()
}

/// Distributed mode runs roles in several processes: a DuckDB file, which one process owns,
/// cannot be the warehouse of a model the plan holds.
async fn refuse_file_warehouses(
    warehouses: &ProjectWarehouses,
    state: &dyn StateStore,
    plan_id: &PlanId,
) -> Result<()> {
    // An unknown plan is the coordinator's to report.
    let Some(plan) = state.get_plan(plan_id).await? else { return Ok(()) };
    for planned in &plan.snapshots {
        if let Some(gateway) = warehouses.gateways.get(&planned.snapshot.gateway)
            && matches!(gateway.connection, sluice_core::config::Connection::DuckDb { .. })
        {
            return Err(anyhow!(
                "gateways.{}: a DuckDB warehouse is a file one process owns, so distributed mode (SLUICE_AMQP_URL) cannot apply to it; use a postgres gateway, or unset SLUICE_AMQP_URL for embedded mode",
                gateway.name
            ));
        }
    }
    Ok(())
}

pub async fn apply(common: &Common<'_>, plan_id: &str, detach: bool) -> Result<ApplyExit> {
    if plan_id.trim().is_empty() {
        return Err(anyhow!(
            "the plan id is empty (PLAN_ID / SLUICE_PLAN_ID): set it to the id `sluice plan` printed when it stored the plan"
        ));
    }
    // The plan is in the state store: `config.yaml` alone is read (the models need not be there).
    let (state, warehouses) = role_context(common).await?;
    run_apply(common, warehouses, state, &PlanId(plan_id.to_string()), detach).await
}

/// The services of distributed mode, or an error naming what a role needs.
fn services_for<'a>(common: &'a Common<'_>, role: &str) -> Result<&'a Services> {
    common.services.as_ref().ok_or_else(|| {
        anyhow!("`sluice {role}` is a role of distributed mode: set --amqp-url / SLUICE_AMQP_URL and --redis-url / SLUICE_REDIS_URL")
    })
}

/// The state store and warehouses of a long-running role, from config.yaml alone (plans come
/// from the state store, so the role needs no model file).
async fn role_context(common: &Common<'_>) -> Result<(Arc<dyn StateStore>, Arc<ProjectWarehouses>)> {
    let config = crate::context::load_config(common.project)?;
    let location = state_location(common.state, Some(&config), common.project)?;
    let state = open_state(&location).await?;
    let warehouses =
        Arc::new(ProjectWarehouses { gateways: config.gateways.clone(), root: common.project.to_path_buf() });
    Ok((state, warehouses))
}

pub async fn worker(common: &Common<'_>, gateway: &str, settings: crate::distributed::WorkerSettings) -> Result<()> {
    let services = services_for(common, "worker")?;
    let (state, warehouses) = role_context(common).await?;
    crate::distributed::worker(services, state, warehouses, gateway, settings).await
}

pub async fn promoter(common: &Common<'_>, reconciling: crate::distributed::Reconciling) -> Result<()> {
    let services = services_for(common, "promoter")?;
    let (state, warehouses) = role_context(common).await?;
    crate::distributed::promoter(services, state, warehouses, reconciling, common.health.clone()).await
}

pub async fn abort(common: &Common<'_>, plan_id: &str) -> Result<()> {
    let context = open_context(common).ok();
    let state = state_of(common, context.as_ref()).await?;
    let run =
        sluice_coordinator::abort(state.as_ref(), &PlanId(plan_id.to_string()), "aborted by `sluice abort`").await?;
    match run {
        Some(run) if run.promoting => {
            println!("plan {plan_id}: run {} is already being promoted; too late to abort, it ends promoted", run.id)
        }
        Some(run) => println!("plan {plan_id}: breaker tripped; run {} stops between intervals", run.id),
        None => println!("plan {plan_id}: breaker tripped; it has no run yet"),
    }
    Ok(())
}

pub async fn status(common: &Common<'_>, plan_id: Option<&str>) -> Result<()> {
    let context = open_context(common).ok();
    let state = state_of(common, context.as_ref()).await?;
    match plan_id {
        Some(plan_id) => {
            let plan_id = PlanId(plan_id.to_string());
            let Some(plan) = state.get_plan(&plan_id).await? else {
                return Err(anyhow!("no plan {plan_id} in the state store"));
            };
            println!("plan {} for environment {} ({} tasks)", plan.id, plan.environment, plan.task_count());
            if let Some(reason) = state.breaker(&plan.id).await? {
                println!("  breaker tripped: {reason}");
            }
            let runs = state.runs_of_plan(&plan.id).await?;
            if runs.is_empty() {
                println!("  not applied yet");
            }
            for run in runs {
                println!(
                    "  run {}: {} (started {}, {} tasks, {} intervals, {} retries){}",
                    run.id,
                    run.status,
                    run.started_at,
                    run.tasks_done,
                    run.intervals_done,
                    run.retries,
                    run.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
                );
                if run.status == RunStatus::Running {
                    promotion_status(state.as_ref(), context.as_ref(), &plan).await?;
                }
                for failure in state.task_failures(&run.id).await? {
                    println!(
                        "    failed {} {} after {} attempts: {}",
                        failure.model, failure.interval, failure.attempts, failure.error
                    );
                }
            }
        }
        None => {
            environments(&state).await?;
            println!("\nrecent runs:");
            for entry in state.list_audit(10).await? {
                println!(
                    "  {} plan {} run {} on {}: {} ({} intervals, {} retries)",
                    entry.finished_at,
                    entry.plan_id,
                    entry.run_id,
                    entry.environment,
                    entry.outcome,
                    entry.intervals,
                    entry.retries
                );
            }
        }
    }
    Ok(())
}

/// For a running run whose every task is done: where its promotion stands, gateway by gateway
/// (each gateway's promotion marker is the journal the promoter rolls forward).
async fn promotion_status(state: &dyn StateStore, context: Option<&ProjectContext>, plan: &Plan) -> Result<()> {
    let done = state.done_tasks_of_plan(&plan.id).await?.len();
    if done < plan.task_count() {
        return Ok(());
    }
    let gateways: BTreeSet<&str> = plan.snapshots.iter().map(|planned| planned.snapshot.gateway.as_str()).collect();
    let Some(context) = context else {
        println!("    promotion: every task is done; the views move once a promoter finalizes the run");
        return Ok(());
    };
    let warehouses = warehouses(context);
    let mut shown = Vec::new();
    let mut moved = 0;
    for gateway in &gateways {
        let marker = match warehouses.connect(gateway).await {
            Ok(mut warehouse) => warehouse.shown_plan(plan.environment.as_str()).await,
            Err(error) => Err(error),
        };
        shown.push(match marker {
            Ok(Some(shown)) if shown == plan.id.0 => {
                moved += 1;
                format!("{gateway}: moved")
            }
            Ok(Some(other)) => format!("{gateway}: shows plan {other}"),
            Ok(None) => format!("{gateway}: shows no plan yet"),
            Err(error) => format!("{gateway}: marker unreadable ({error})"),
        });
    }
    let stage = if moved == 0 { "waiting for a promoter" } else { "in progress, rolled forward by the promoter" };
    println!("    promotion {stage}: {moved} of {} gateways moved ({})", gateways.len(), shown.join("; "));
    Ok(())
}

async fn environments(state: &Arc<dyn StateStore>) -> Result<()> {
    let records = state.list_environments().await?;
    if records.is_empty() {
        println!("no environments yet");
    }
    for record in records {
        let expires = record.expires_at.map_or("never".to_string(), |at| at.to_string());
        println!(
            "{}: plan {}, {} models, updated {}, expires {expires}",
            record.state.name,
            record.state.plan_id.as_ref().map_or("none".to_string(), ToString::to_string),
            record.state.snapshots.len(),
            record.updated_at
        );
    }
    Ok(())
}

pub async fn list_environments(common: &Common<'_>) -> Result<()> {
    let context = open_context(common).ok();
    let state = state_of(common, context.as_ref()).await?;
    environments(&state).await
}

pub async fn rollback(common: &Common<'_>, environment: &str) -> Result<()> {
    let environment = EnvironmentName::parse(environment).map_err(|message| anyhow!("environment: {message}"))?;
    // What the environment showed is in the state store: config.yaml alone is read.
    let (state, warehouses) = role_context(common).await?;
    let restored = sluice_promoter::rollback(&state, warehouses.as_ref(), &environment, now()).await?;
    println!(
        "environment {environment} points at plan {} again",
        restored.map_or("none".to_string(), |id| id.to_string())
    );
    Ok(())
}

pub async fn janitor(common: &Common<'_>) -> Result<()> {
    // Everything it drops is named in the state store: config.yaml alone is read (the janitor
    // CronJob mounts no model).
    let (state, warehouses) = role_context(common).await?;
    let report = sluice_promoter::janitor(&state, warehouses.as_ref(), now()).await?;
    println!(
        "janitor: {} expired environments removed, {} physical tables dropped",
        report.environments_removed, report.tables_dropped
    );
    Ok(())
}
