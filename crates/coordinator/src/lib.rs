//! The coordinator role: apply a stored plan and follow it to its end.
//!
//! 1. validate: the plan exists, has no uncategorized change, is not stale (the environment
//!    still shows the plan it was made against), has work to do, and every involved gateway
//!    answers;
//! 2. push state in one transaction (`begin_run`: plan, snapshots, environment lease, run);
//! 3. build the task graph, mark what earlier runs finished (tasks done, intervals recorded),
//!    load the dependency counters and publish the ready tasks;
//! 4. follow the run's events until the promoter finishes it, renewing the lease. An abort
//!    (`sluice abort`, or Ctrl-C in embedded mode) trips the plan's breaker and the workers drain
//!    the run. The follower also reconciles: counters lost by the gate are rebuilt from state
//!    and the ready tasks queued again; a run with work outstanding but nothing queued, running
//!    or heard of for a while had its queue purged, and is settled as aborted.

mod dead_letters;

pub use dead_letters::settle_dead_letters;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::config::Config;
use sluice_core::interval::Timestamp;
use sluice_core::names::{EnvironmentName, ModelName, PlanId, RunId, SnapshotId, TaskId};
use sluice_core::plan::{
    BackfillWindow, Change, EnvironmentStatements, Plan, PlanContext, RestatementPlan, RestatementRequest, build_plan,
    build_restatement_plan, build_run_plan, development_restatements, plan_base,
};
use sluice_core::project::Project;
use sluice_core::selection::{select_models, unbuilt_in_prod};
use sluice_core::selector::{Selectable, select};
use sluice_core::snapshot::fingerprint_project;
use sluice_core::task_graph::{TaskGraph, finished_tasks, task_tables};
use sluice_queue::{DependencyGate, EventBus, QueueError, RunEvent, TaskMessage, TaskQueue};
use sluice_state::host::{Clock, offload};
use sluice_state::{RunRecord, RunStart, RunStatus, StateError, StateStore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

/// A gateway's warehouse as the coordinator reaches it (the CLI implements it with the engine
/// adapters): whether it answers, and the project's `before_all` statements.
#[async_trait]
pub trait GatewayCheck: Send + Sync {
    async fn check(&self, gateway: &str) -> Result<(), String>;

    /// Runs `statements` on the gateway in order, in one transaction.
    async fn run_statements(&self, gateway: &str, statements: &[String]) -> Result<(), String>;
}

/// The size of a run when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgressTotals {
    pub tasks: u64,
    /// Tasks finished by earlier runs of the plan.
    pub tasks_done: u64,
    pub intervals: u64,
    /// Models with at least one task.
    pub models: u64,
}

/// Receives progress while a run is followed (an indicatif bar on a terminal, log lines otherwise).
pub trait Progress: Send + Sync {
    fn started(&self, plan: &Plan, run_id: &RunId, total: ProgressTotals);
    /// A task finished; `model_finished` when it was its model's last one.
    fn task_done(&self, intervals: u32, skipped: bool, model_finished: bool);
    fn task_failed(&self, model: &str, interval: &str, error: &str);
    fn message(&self, text: &str);
    fn finished(&self);
}

#[derive(Clone, Debug)]
pub struct ApplyConfig {
    /// How long the environment lease lasts without renewal (renewed every third of it).
    pub lease_ttl_seconds: i64,
    pub user: String,
    /// Return once the ready tasks are published instead of following the run.
    pub detach: bool,
    /// Whether an interrupt (Ctrl-C) aborts the run (embedded mode: the workers die with this
    /// process) or only stops following it (distributed mode: the run goes on without us).
    pub interrupt_aborts: bool,
    /// How long a run may show outstanding tasks with none queued, none running and no event
    /// before the coordinator concludes its queued tasks were purged (and settles it aborted).
    pub stall_after: Duration,
    /// A task reported running (`TaskRunning`) counts as in flight for this long after its
    /// last heartbeat.
    pub heartbeat_timeout: Duration,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            lease_ttl_seconds: 60,
            user: "sluice".to_string(),
            detach: false,
            interrupt_aborts: true,
            stall_after: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
pub struct CoordinatorDeps {
    pub state: Arc<dyn StateStore>,
    pub queue: Arc<dyn TaskQueue>,
    pub gate: Arc<dyn DependencyGate>,
    pub events: Arc<dyn EventBus>,
    pub gateways: Arc<dyn GatewayCheck>,
    /// The time written into state (run start, lease expiry).
    pub clock: Arc<dyn Clock>,
}

#[derive(Debug)]
pub enum ApplyOutcome {
    /// Nothing to change; the reason says why.
    NothingToDo(String),
    /// The run ended (promoted, failed or aborted): its record.
    Finished(RunRecord),
    /// `detach`, or an interrupt in distributed mode: tasks are queued and the run goes on
    /// without this process.
    Detached(RunId),
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("no plan {0} in the state store; `sluice plan` prints the id of each plan it stores")]
    UnknownPlan(PlanId),
    #[error(
        "plan {plan} has uncategorized changes ({models}); plan again with --forward-only or make the change comparable"
    )]
    Uncategorized { plan: PlanId, models: String },
    #[error(
        "plan {plan} is stale: it was made against plan {expected} of environment {environment}, which now shows plan {actual}; plan again"
    )]
    Stale { plan: PlanId, environment: EnvironmentName, expected: String, actual: String },
    #[error("gateway {gateway} does not answer: {reason}")]
    GatewayUnreachable { gateway: String, reason: String },
    #[error("before_all on gateway {gateway} failed, nothing was run: {reason}")]
    BeforeAll { gateway: String, reason: String },
    #[error("state store: {0}")]
    State(#[from] StateError),
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("the event stream ended before the run finished")]
    EventsClosed,
    #[error("building the task graph failed: {0}")]
    Join(String),
}

impl ApplyError {
    /// Whether trying again later may succeed (a lost connection to a service).
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::State(error) => error.is_transient(),
            ApplyError::Queue(error) => error.is_transient(),
            _ => false,
        }
    }
}

fn plan_label(id: Option<&PlanId>) -> String {
    id.map_or_else(|| "none".to_string(), ToString::to_string)
}

/// How a plan is made beyond the project and the environment (`plan`'s options).
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// Every change forward-only.
    pub forward_only: bool,
    /// A development environment's backfill window.
    pub window: BackfillWindow,
    /// Backfill nothing (SEED models are loaded).
    pub skip_backfill: bool,
    /// `--select-model`: only these models' local changes (empty: every change).
    pub select: Vec<String>,
}

/// Plans `project` against what the state store holds for `environment` (its state, or prod's
/// for a new environment; the snapshots known by fingerprint; the intervals recorded for the
/// plan's tables) at `now`. The plan is not stored.
pub async fn plan_against_state(
    state: &dyn StateStore,
    project: &Project,
    environment: &EnvironmentName,
    now: Timestamp,
    options: &PlanOptions,
) -> Result<Plan, StateError> {
    let current = state.get_environment(environment).await?;
    let prod = if environment.is_prod() { None } else { state.get_environment(&EnvironmentName::prod()).await? };
    let current_state = current.map(|record| record.state);
    let prod_state = prod.map(|record| record.state);
    let base = plan_base(environment, current_state.as_ref(), prod_state.as_ref());
    let selection = if options.select.is_empty() {
        None
    } else {
        Some(select_models(project, base.as_ref(), &options.select).map_err(|reason| StateError::Invalid { reason })?)
    };
    let project = selection.as_ref().map_or(project, |selection| &selection.project);
    let ids: Vec<_> =
        fingerprint_project(project).iter().map(|(name, fingerprint)| fingerprint.snapshot_id(name)).collect();
    let known = state.get_snapshots(&ids).await?;
    // Versions are decided by the plan: plan once to learn them, then with their intervals.
    let make = |recorded: &BTreeMap<_, _>| {
        build_plan(
            project,
            PlanContext {
                environment,
                current: current_state.as_ref(),
                base: base.as_ref(),
                prod: prod_state.as_ref(),
                known_snapshots: &known,
                recorded_intervals: recorded,
                now,
                forward_only: options.forward_only,
                window: options.window,
                skip_backfill: options.skip_backfill,
                selected: selection.as_ref().map(|selection| &selection.selected),
            },
        )
    };
    let draft = make(&BTreeMap::new());
    let keys: Vec<_> = draft
        .snapshots
        .iter()
        .map(|planned| (planned.snapshot.name.clone(), planned.snapshot.version.clone()))
        .collect();
    let recorded = state.get_intervals(&keys).await?;
    let plan = make(&recorded);
    if let Some(selection) = &selection {
        let unbuilt = unbuilt_in_prod(&plan, project, &selection.selected);
        if !unbuilt.is_empty() {
            return Err(StateError::Invalid {
                reason: format!(
                    "--select-model: {} would get new tables in prod that this plan does not build (they read a selected model that changes); select them too, for example with `MODEL+`",
                    unbuilt.join(", ")
                ),
            });
        }
    }
    Ok(plan)
}

/// The plan of `sluice run` for `environment` at `now` (`build_run_plan`), against what the state
/// store records for it. The plan is not stored.
pub async fn run_plan_against_state(
    state: &dyn StateStore,
    config: &Config,
    environment: &EnvironmentName,
    now: Timestamp,
) -> Result<Plan, StateError> {
    let Some(current) = state.get_environment(environment).await? else {
        return Err(StateError::NotFound {
            what: format!("environment {environment}: plan and apply it before running it"),
        });
    };
    let keys: Vec<_> =
        current.state.snapshots.iter().map(|snapshot| (snapshot.name.clone(), snapshot.version.clone())).collect();
    let recorded = state.get_intervals(&keys).await?;
    let mut plan = build_run_plan(
        &current.state,
        &recorded,
        now,
        config.environment_ttl_seconds,
        config.notification_webhook.clone(),
    )
    .map_err(|reason| StateError::Invalid { reason })?;
    plan.statements = EnvironmentStatements::of(config);
    Ok(plan)
}

/// The plan of `plan --restate-model` for `environment` at `now` (`build_restatement_plan`): the
/// models the selectors pick in the environment (names, globs, `tag:`), restated with their
/// descendants over `[start, end)`. The plan is not stored.
pub async fn restatement_plan_against_state(
    state: &dyn StateStore,
    config: &Config,
    environment: &EnvironmentName,
    now: Timestamp,
    selectors: &[String],
    start: Option<Timestamp>,
    end: Option<Timestamp>,
) -> Result<RestatementPlan, StateError> {
    let Some(current) = state.get_environment(environment).await? else {
        return Err(StateError::NotFound {
            what: format!("environment {environment}: plan and apply it before restating its models"),
        });
    };
    let prod = if environment.is_prod() { None } else { state.get_environment(&EnvironmentName::prod()).await? };
    let selectable =
        current.state.snapshots.iter().map(|snapshot| Selectable { name: &snapshot.name, tags: &snapshot.tags });
    let names: BTreeMap<&SnapshotId, &ModelName> =
        current.state.snapshots.iter().map(|snapshot| (&snapshot.id, &snapshot.name)).collect();
    let parents = current
        .state
        .snapshots
        .iter()
        .map(|snapshot| {
            let its_parents = snapshot.parents.iter().filter_map(|id| names.get(id).map(|name| (*name).clone()));
            (snapshot.name.clone(), its_parents.collect())
        })
        .collect();
    let selected = select(selectable, &parents, selectors).map_err(|reason| StateError::Invalid { reason })?;
    let keys: Vec<_> =
        current.state.snapshots.iter().map(|snapshot| (snapshot.name.clone(), snapshot.version.clone())).collect();
    let recorded = state.get_intervals(&keys).await?;
    let request = RestatementRequest { selected, start, end };
    let mut restatement =
        build_restatement_plan(&current.state, prod.as_ref().map(|record| &record.state), &recorded, now, &request)
            .map_err(|reason| StateError::Invalid { reason })?;
    if environment.is_prod() {
        // What the restatement also forgets in development versions (SQLMesh's rule).
        let mut developments = Vec::new();
        for record in state.list_environments().await? {
            if record.state.name.is_prod() || record.expires_at.is_some_and(|expires| expires <= now) {
                continue;
            }
            developments.extend(plan_base(&record.state.name, Some(&record.state), Some(&current.state)));
        }
        let stored = state.all_snapshots().await?;
        let extra = development_restatements(&restatement.plan.restatements, &current.state, &developments, &stored);
        restatement.plan.forget_in_development(extra);
    }
    restatement.plan.environment_ttl_seconds = (!environment.is_prod()).then_some(config.environment_ttl_seconds);
    restatement.plan.notification_webhook = config.notification_webhook.clone();
    restatement.plan.statements = EnvironmentStatements::of(config);
    Ok(restatement)
}

/// Validation before any work: returns the plan, or why it must not (or need not) be applied.
pub async fn validate(deps: &CoordinatorDeps, plan_id: &PlanId) -> Result<Result<Plan, String>, ApplyError> {
    let plan = deps.state.get_plan(plan_id).await?.ok_or_else(|| ApplyError::UnknownPlan(plan_id.clone()))?;
    let uncategorized = plan.uncategorized();
    if !uncategorized.is_empty() {
        let models = uncategorized.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        return Err(ApplyError::Uncategorized { plan: plan.id.clone(), models });
    }
    let environment = deps.state.get_environment(&plan.environment).await?;
    let current_plan = environment.as_ref().and_then(|record| record.state.plan_id.clone());
    if current_plan.as_ref() == Some(&plan.id) {
        return Ok(Err(format!("plan {} is already applied to environment {}", plan.id, plan.environment)));
    }
    if current_plan != plan.previous_plan_id {
        return Err(ApplyError::Stale {
            plan: plan.id.clone(),
            environment: plan.environment.clone(),
            expected: plan_label(plan.previous_plan_id.as_ref()),
            actual: plan_label(current_plan.as_ref()),
        });
    }
    if plan.has_nothing_to_do(environment.as_ref().map(|record| &record.state)) {
        return Ok(Err(format!("plan {} changes nothing in environment {}", plan.id, plan.environment)));
    }
    // Another run applying this environment is refused before any gateway is touched (an
    // embedded DuckDB file can only be opened by the process that holds it). `begin_run`
    // checks again, atomically.
    if let Some(lease) = deps.state.get_lease(&plan.environment).await?
        && lease.expires_at > deps.clock.now()
        && lease.plan_id != plan.id
    {
        return Err(ApplyError::State(StateError::LeaseHeld {
            environment: plan.environment.clone(),
            holder_plan: lease.plan_id,
            holder_run: lease.run_id,
            expires_at: lease.expires_at,
        }));
    }
    let mut gateways = BTreeSet::new();
    for planned in &plan.snapshots {
        if planned.change != Change::Unchanged || !planned.batches.is_empty() || !plan.environment_exists {
            gateways.insert(planned.snapshot.gateway.clone());
        }
    }
    for snapshot in &plan.removed {
        gateways.insert(snapshot.gateway.clone());
    }
    for gateway in gateways {
        if let Err(reason) = deps.gateways.check(&gateway).await {
            return Err(ApplyError::GatewayUnreachable { gateway, reason });
        }
    }
    Ok(Ok(plan))
}

/// Applies a stored plan: validate, push state, queue the ready tasks, follow the run.
pub async fn apply(
    plan_id: &PlanId,
    config: &ApplyConfig,
    deps: &CoordinatorDeps,
    progress: Arc<dyn Progress>,
    shutdown: CancellationToken,
) -> Result<ApplyOutcome, ApplyError> {
    let plan = match validate(deps, plan_id).await? {
        Ok(plan) => plan,
        Err(reason) => return Ok(ApplyOutcome::NothingToDo(reason)),
    };
    // `before_all` first, as SQLMesh runs it: a failure leaves nothing begun.
    let statements = &plan.statements;
    if !statements.before_all.is_empty() {
        deps.gateways
            .run_statements(&statements.gateway, &statements.before_all)
            .await
            .map_err(|reason| ApplyError::BeforeAll { gateway: statements.gateway.clone(), reason })?;
    }
    let state = &deps.state;
    // Applying again resumes: `begin_run` resets the plan's breaker in the same transaction
    // that supersedes an earlier run of it, never before.
    let attempt = state.runs_of_plan(&plan.id).await?.len() as u32 + 1;
    let run_id = RunId::for_attempt(&plan.id, attempt);
    let snapshots: Vec<_> = plan.snapshots.iter().map(|planned| planned.snapshot.clone()).collect();
    let started_at = deps.clock.now();
    let run = state
        .begin_run(RunStart {
            plan: &plan,
            run_id: &run_id,
            snapshots: &snapshots,
            lease_ttl_seconds: config.lease_ttl_seconds,
            now: started_at,
            user: &config.user,
        })
        .await?;
    // Every line from here on carries the run's ids (joined across processes by run_id).
    let span = tracing::info_span!(
        "run",
        plan_id = %plan.id,
        run_id = %run.id,
        trace_id = %sluice_core::trace::trace_id(&run.id),
        environment = %plan.environment,
    );
    async move {
    info!("run started");

    // The graph, and what earlier runs already finished.
    let graph_plan = plan.clone();
    let graph = offload(move || TaskGraph::build(&graph_plan)).await.map_err(ApplyError::Join)?;
    let counters = load_counters(deps, &plan, &graph, &run.id).await?;
    let done_count = counters.done.iter().filter(|done| **done).count() as u64;
    let total_intervals: u64 = graph.tasks.iter().map(|task| u64::from(task.interval_count)).sum();
    let models_total = plan.snapshots.iter().filter(|planned| !planned.batches.is_empty()).count() as u64;
    progress.started(
        &plan,
        &run.id,
        ProgressTotals {
            tasks: graph.len() as u64,
            tasks_done: done_count,
            intervals: total_intervals,
            models: models_total,
        },
    );

    // Subscribe before publishing so that no event of this run is missed.
    let stream = deps.events.subscribe().await?;
    let ready = counters.ready_tasks(&plan, &graph, &run.id, 0);
    // The fault suite stops the coordinator here (`pause`) and kills it: a run begun with
    // nothing queued, which the orphan reconciler must queue.
    fail::fail_point!("coordinator-before-publish");
    deps.queue.publish(&ready).await?;
    info!(run_id = %run.id, tasks = graph.len(), done = done_count, ready = ready.len(), "tasks published");
    progress.message(&format!("{} ready tasks queued; the rest follow as their parents finish", ready.len()));
    if done_count == graph.len() as u64 {
        deps.events.publish(RunEvent::RunSettled { run_id: run.id.clone(), plan_id: plan.id.clone() }).await?;
    }
    if config.detach {
        return Ok(ApplyOutcome::Detached(run.id));
    }

    let run_gateways: BTreeSet<String> =
        graph.tasks.iter().map(|task| plan.snapshots[task.snapshot as usize].snapshot.gateway.clone()).collect();
    let mut follower = Follower::new(&plan, &graph, &counters.done);
    let mut watch = Watch {
        renew_every: Duration::from_secs((config.lease_ttl_seconds.max(3) / 3) as u64),
        last_renewal: tokio::time::Instant::now(),
        aborting: None,
        stalled_since: None,
        last_event: tokio::time::Instant::now(),
        settled_by_coordinator: false,
        rebuilding: false,
        gateways: run_gateways,
    };
    let mut ticker = tokio::time::interval(watch.renew_every.min(Duration::from_secs(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = Some(stream);
    loop {
        // Biased, events last: the tick (lease, reconcile) and an interrupt are never starved by
        // a flood of events, and the simulation's seed alone decides the order.
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if watch.aborting.is_none() => {
                if !config.interrupt_aborts {
                    progress.message(&format!(
                        "interrupted: the run goes on without this process; `sluice status` follows it, `sluice abort {}` stops it",
                        plan.id
                    ));
                    progress.finished();
                    return Ok(ApplyOutcome::Detached(run.id));
                }
                watch.aborting = Some("interrupted".to_string());
                progress.message("interrupted: stopping between intervals; apply the plan again to resume");
                state.trip_breaker(&plan.id, "interrupted (Ctrl-C)").await?;
                metrics::counter!(sluice_ops::metrics::BREAKER_TRIPS, "reason" => "interrupted").increment(1);
            }
            _ = ticker.tick() => {
                if events.is_none() {
                    match deps.events.subscribe().await {
                        Ok(stream) => events = Some(stream),
                        Err(error) => warn!(error = %error, "subscribing to the run's events failed; retrying"),
                    }
                }
                match watch.tick(deps, &plan, &graph, &run.id, config, &follower, progress.as_ref()).await {
                    Ok(true) => break,
                    Ok(false) => {}
                    // A lost broker, Redis or state connection: the next tick tries again.
                    Err(error) if error.is_transient() => warn!(error = %error, "following the run; retrying"),
                    Err(error) => return Err(error),
                }
            }
            event = next_event(&mut events) => {
                let Some(event) = event else {
                    // The subscription ended (the broker went away): resubscribe on the next tick;
                    // meanwhile the state store says how the run goes.
                    warn!("the run's event stream ended; subscribing again");
                    events = None;
                    continue;
                };
                if event.run_id() != &run.id {
                    continue;
                }
                watch.last_event = tokio::time::Instant::now();
                watch.stalled_since = None;
                if follower.on_event(event, progress.as_ref()) {
                    break;
                }
            }
        }
    }
    progress.finished();
    if let Err(error) = deps.gate.clear(&run.id).await {
        // The keys expire on their own.
        warn!(error = %error, "clearing the run's dependency counters failed");
    }
    let record = state
        .get_run(&run.id)
        .await?
        .ok_or_else(|| ApplyError::State(StateError::NotFound { what: format!("run {}", run.id) }))?;
    Ok::<ApplyOutcome, ApplyError>(ApplyOutcome::Finished(record))
    }
    .instrument(span)
    .await
}

/// The next event of an optional subscription; never, without one.
async fn next_event(events: &mut Option<sluice_queue::EventStream>) -> Option<RunEvent> {
    match events {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// What the following coordinator checks every tick.
struct Watch {
    renew_every: Duration,
    last_renewal: tokio::time::Instant,
    aborting: Option<String>,
    stalled_since: Option<tokio::time::Instant>,
    last_event: tokio::time::Instant,
    settled_by_coordinator: bool,
    /// A rebuild of the run's counters started and has not queued its ready tasks yet.
    rebuilding: bool,
    gateways: BTreeSet<String>,
}

impl Watch {
    /// Renews the lease, reads the run's record and breaker, and reconciles the gate: true
    /// once the run is finished.
    #[allow(clippy::too_many_arguments)]
    async fn tick(
        &mut self,
        deps: &CoordinatorDeps,
        plan: &Plan,
        graph: &TaskGraph,
        run_id: &RunId,
        config: &ApplyConfig,
        follower: &Follower,
        progress: &dyn Progress,
    ) -> Result<bool, ApplyError> {
        let state = &deps.state;
        if self.last_renewal.elapsed() >= self.renew_every {
            if let Err(error) =
                state.renew_lease(&plan.environment, run_id, config.lease_ttl_seconds, deps.clock.now()).await
            {
                warn!(error = %error, "renewing the environment lease failed");
            }
            self.last_renewal = tokio::time::Instant::now();
        }
        // The promoter's event may be lost (a broker restart): the state store has the truth.
        if let Some(record) = state.get_run(run_id).await?
            && record.status != RunStatus::Running
        {
            return Ok(true);
        }
        if self.aborting.is_none()
            && let Some(reason) = state.breaker(&plan.id).await?
        {
            progress.message(&format!("aborted ({reason}): stopping between intervals"));
            self.aborting = Some(reason);
        }
        if self.settled_by_coordinator {
            return Ok(false);
        }
        let outstanding = deps.gate.outstanding(run_id).await?;
        match outstanding.filter(|_| !self.rebuilding) {
            None => {
                // Redis lost the run's counters (flushed, restarted, expired): rebuild them. Until
                // the ready tasks are queued, a failed step (the counters loaded but the catch-up
                // or the publish failed) means rebuilding again on the next tick.
                self.rebuilding = true;
                let counters = load_counters(deps, plan, graph, run_id).await?;
                let ready = counters.ready_tasks(plan, graph, run_id, 1);
                deps.queue.publish(&ready).await?;
                self.rebuilding = false;
                warn!(run_id = %run_id, republished = ready.len(), "the dependency counters were lost; rebuilt them from state");
                progress
                    .message(&format!("dependency counters rebuilt from state; {} tasks queued again", ready.len()));
                self.stalled_since = None;
            }
            Some(0) => {
                // Everything is settled, yet the run is still running: its settled event was
                // never published (the gate lost the keys as the last task settled and a rebuild
                // settled the rest) or was lost. Published again while the quiet lasts (a
                // finalization is idempotent).
                match self.stalled_since {
                    None => self.stalled_since = Some(tokio::time::Instant::now()),
                    Some(since) if since.elapsed() >= config.stall_after => {
                        warn!(run_id = %run_id, "every task is settled but the run was not finalized; settling it again");
                        deps.events
                            .publish(RunEvent::RunSettled { run_id: run_id.clone(), plan_id: plan.id.clone() })
                            .await?;
                        self.stalled_since = Some(tokio::time::Instant::now());
                    }
                    Some(_) => {}
                }
            }
            Some(outstanding) => {
                let mut queued = 0;
                for gateway in &self.gateways {
                    queued += deps.queue.queued(gateway).await?;
                }
                let mut quiet = queued == 0
                    && !follower.any_running(config.heartbeat_timeout)
                    && self.last_event.elapsed() >= config.stall_after;
                // A quiet run may be waiting on a dead-lettered task: its dead letters first, and
                // only if there were none is the quiet taken for a purge. (Looked at only then:
                // the dead letters of other runs stay untouched while this one moves.)
                if quiet && dead_letters::settle_dead_letters(deps, self.gateways.iter().map(String::as_str)).await? > 0
                {
                    quiet = false;
                }
                if !quiet {
                    self.stalled_since = None;
                } else if self.stalled_since.is_none() {
                    self.stalled_since = Some(tokio::time::Instant::now());
                } else if self.stalled_since.is_some_and(|since| since.elapsed() >= config.stall_after) {
                    // Nothing queued, nothing running, nothing heard, yet work outstanding: the
                    // queued tasks were purged (by `rabbitmqctl purge_queue`, say).
                    let reason = self.aborting.clone().unwrap_or_else(|| {
                        format!(
                            "the task queues were emptied while {outstanding} tasks were outstanding (purged by hand?)"
                        )
                    });
                    if self.aborting.is_none() {
                        state.trip_breaker(&plan.id, &reason).await?;
                        metrics::counter!(sluice_ops::metrics::BREAKER_TRIPS, "reason" => "queues_emptied")
                            .increment(1);
                        progress.message(&format!("aborted: {reason}"));
                        self.aborting = Some(reason);
                    }
                    let everything: Vec<u32> = (0..graph.len() as u32).collect();
                    deps.gate.skip(run_id, &everything).await?;
                    deps.events
                        .publish(RunEvent::RunSettled { run_id: run_id.clone(), plan_id: plan.id.clone() })
                        .await?;
                    self.settled_by_coordinator = true;
                }
            }
        }
        Ok(false)
    }
}

/// A run's dependency counters as loaded into the gate.
struct Counters {
    done: Vec<bool>,
    unfinished_parents: Vec<u32>,
}

impl Counters {
    /// Tasks not done whose parents are all done; `attempt` 0 for the run's first publish, 1 for
    /// a publish again after a reconcile (whose tasks a worker may have finished meanwhile).
    fn ready_tasks(&self, plan: &Plan, graph: &TaskGraph, run_id: &RunId, attempt: u32) -> Vec<TaskMessage> {
        (0..graph.len())
            .filter(|index| !self.done[*index] && self.unfinished_parents[*index] == 0)
            .map(|index| {
                let task = graph.tasks[index];
                TaskMessage {
                    plan_id: plan.id.clone(),
                    run_id: run_id.clone(),
                    task_index: index as u32,
                    task_id: task.id,
                    gateway: plan.snapshots[task.snapshot as usize].snapshot.gateway.clone(),
                    attempt,
                }
            })
            .collect()
    }
}

/// Rebuilds a run's counters from state (the intervals recorded for the plan's tables, by any
/// plan) and loads them into the gate. Redis is never the truth: this is how a run starts,
/// resumes, and recovers from lost counters.
///
/// Reading state and loading the gate are two steps, and a worker may complete a task in the gate
/// in between (its completion would be overwritten by the load). Workers record a task in state
/// before they complete it in the gate, so state is read again after the load and every task
/// finished meanwhile is completed in the gate (idempotent): once this returns, the gate holds
/// every completion recorded before it returned. The returned counters include those catch-up
/// completions, so their ready children are among `ready_tasks`.
async fn load_counters(
    deps: &CoordinatorDeps,
    plan: &Plan,
    graph: &TaskGraph,
    run_id: &RunId,
) -> Result<Counters, ApplyError> {
    let tables = task_tables(plan);
    let recorded = deps.state.get_intervals(&tables).await?;
    let finished = finished_tasks(plan, graph, &recorded);
    let mut unfinished_parents = vec![0u32; graph.len()];
    for (index, slot) in unfinished_parents.iter_mut().enumerate() {
        *slot = graph.parents(index as u32).filter(|parent| !finished[*parent as usize]).count() as u32;
    }
    // Tasks that failed in this run, and everything waiting for them, are settled without
    // success (as the worker that saw the failure settled them): they are not outstanding and
    // release nothing, so a rebuild mid-run does not wait for them forever.
    let mut done = finished;
    let failed: BTreeSet<TaskId> = deps.state.task_failures(run_id).await?.into_iter().map(|f| f.task_id).collect();
    if !failed.is_empty() {
        let mut pending: std::collections::VecDeque<u32> = (0..graph.len() as u32)
            .filter(|index| failed.contains(&graph.tasks[*index as usize].id) && !done[*index as usize])
            .collect();
        while let Some(next) = pending.pop_front() {
            if std::mem::replace(&mut done[next as usize], true) {
                continue;
            }
            pending.extend(graph.children(next));
        }
    }
    deps.gate.load(run_id, &unfinished_parents, &done).await?;
    let recorded_after = deps.state.get_intervals(&tables).await?;
    let done_after = finished_tasks(plan, graph, &recorded_after);
    for index in 0..graph.len() {
        if done[index] || !done_after[index] {
            continue;
        }
        let task = index as u32;
        let children: Vec<u32> = graph.children(task).collect();
        deps.gate.complete(run_id, task, &children).await?;
        done[index] = true;
        for child in children {
            let count = &mut unfinished_parents[child as usize];
            *count = count.saturating_sub(1);
        }
    }
    Ok(Counters { done, unfinished_parents })
}

/// What the coordinator knows of a run from its events: progress per model, tasks running.
struct Follower {
    counted: Vec<bool>,
    left_per_snapshot: BTreeMap<u32, u64>,
    snapshot_of_task: Vec<u32>,
    models: Vec<String>,
    intervals: Vec<sluice_core::interval::Interval>,
    running: BTreeMap<u32, tokio::time::Instant>,
}

impl Follower {
    fn new(plan: &Plan, graph: &TaskGraph, done: &[bool]) -> Follower {
        let mut left_per_snapshot: BTreeMap<u32, u64> = BTreeMap::new();
        for (index, task) in graph.tasks.iter().enumerate() {
            if !done[index] {
                *left_per_snapshot.entry(task.snapshot).or_default() += 1;
            }
        }
        Follower {
            counted: vec![false; graph.len()],
            left_per_snapshot,
            snapshot_of_task: graph.tasks.iter().map(|task| task.snapshot).collect(),
            models: plan.snapshots.iter().map(|planned| planned.snapshot.name.to_string()).collect(),
            intervals: graph.tasks.iter().map(|task| task.interval).collect(),
            running: BTreeMap::new(),
        }
    }

    /// Whether a task reported itself running within `timeout`.
    fn any_running(&self, timeout: Duration) -> bool {
        self.running.values().any(|seen| seen.elapsed() < timeout)
    }

    /// Takes one event of the run; true once the run is finished.
    fn on_event(&mut self, event: RunEvent, progress: &dyn Progress) -> bool {
        match event {
            RunEvent::TaskRunning { task_index, .. } => {
                self.running.insert(task_index, tokio::time::Instant::now());
            }
            RunEvent::TaskDone { task_index, intervals, skipped, .. } => {
                self.running.remove(&task_index);
                // A redelivered task can report twice: count it once.
                let index = task_index as usize;
                if index < self.counted.len() && !std::mem::replace(&mut self.counted[index], true) {
                    let left = self.left_per_snapshot.entry(self.snapshot_of_task[index]).or_default();
                    *left = left.saturating_sub(1);
                    progress.task_done(intervals, skipped, *left == 0);
                }
            }
            RunEvent::TaskFailed { task_index, error, .. } => {
                self.running.remove(&task_index);
                let index = task_index as usize;
                let model =
                    self.snapshot_of_task.get(index).map_or("?", |snapshot| self.models[*snapshot as usize].as_str());
                let interval = self.intervals.get(index).map(ToString::to_string).unwrap_or_default();
                progress.task_failed(model, &interval, &error);
            }
            RunEvent::TaskAborted { task_index, .. } => {
                self.running.remove(&task_index);
            }
            RunEvent::RunSettled { .. } => {}
            RunEvent::RunFinished { .. } => return true,
        }
        false
    }
}

/// Trips the plan's circuit breaker: workers drop the run's queued tasks (settling them and
/// everything waiting for them), cancel the queries in flight, and the last of them hands the
/// run to the promoter, which closes it as aborted. Returns the run it stops.
pub async fn abort(state: &dyn StateStore, plan_id: &PlanId, reason: &str) -> Result<Option<RunRecord>, ApplyError> {
    if state.get_plan(plan_id).await?.is_none() {
        return Err(ApplyError::UnknownPlan(plan_id.clone()));
    }
    state.trip_breaker(plan_id, reason).await?;
    metrics::counter!(sluice_ops::metrics::BREAKER_TRIPS, "reason" => "abort").increment(1);
    Ok(state.latest_run(plan_id).await?)
}

/// Reconciles the runs no coordinator follows — their environment lease expired: a detached
/// apply, or a coordinator that died — from a long-running role (the promoter process). One
/// `pass` at a time, every few seconds. A run being aborted whose queues hold nothing of it and
/// which moved nothing for `stall_after` (purged after the abort, or its counters lost) is
/// settled, so that the promoter closes it as aborted. For each other such run:
///
/// - the gate does not know it (Redis flushed or restarted, or the coordinator died before
///   loading the counters): counters rebuilt from state, ready tasks queued again;
/// - work is outstanding but nothing is queued and no task was recorded done for `stall_after`
///   (the coordinator died while publishing, or the queue was purged): the same;
/// - nothing is outstanding but the run is still running for `stall_after` (its `RunSettled`
///   was lost): `RunSettled` published again (finalizing is idempotent).
///
/// Tasks queued again carry `attempt` 1, so a worker skips an interval already recorded; a task
/// still in flight may run twice, which the write lock makes harmless.
pub struct OrphanReconciler {
    stall_after: Duration,
    /// Per orphaned run: the tasks done last seen, and since when unchanged.
    seen: BTreeMap<RunId, (u64, tokio::time::Instant)>,
}

/// What one reconciling pass did to a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reconciled {
    /// Counters rebuilt from state and this many ready tasks queued again.
    Requeued { run_id: RunId, tasks: usize },
    /// The run's `RunSettled` published again.
    Settled { run_id: RunId },
}

/// Sets the outstanding-task gauges from the dependency gate: per running run
/// (`sluice_run_outstanding_tasks`) and in all (`sluice_outstanding_tasks`): the work a backfill
/// still has to do, ready or not, which the task queues' depth (ready tasks only) under-reports.
/// A run that ended since the last call is set to 0. Returns the total.
pub async fn export_outstanding(deps: &CoordinatorDeps, exported: &mut ExportedRuns) -> Result<u64, ApplyError> {
    use sluice_ops::metrics::{OUTSTANDING_TASKS, RUN_OUTSTANDING_TASKS};
    let running = deps.state.running_runs().await?;
    let mut total = 0;
    let mut now_exported = ExportedRuns::new();
    for run in &running {
        // A run whose counters are not loaded (yet, or lost) is unknown: not exported.
        let Some(outstanding) = deps.gate.outstanding(&run.id).await? else { continue };
        total += outstanding;
        let labels = vec![
            ("plan_id", run.plan_id.to_string()),
            ("run_id", run.id.to_string()),
            ("environment", run.environment.to_string()),
        ];
        metrics::gauge!(RUN_OUTSTANDING_TASKS, &labels).set(outstanding as f64);
        now_exported.insert(run.id.clone(), labels);
    }
    for (run_id, labels) in exported.iter() {
        if !now_exported.contains_key(run_id) {
            metrics::gauge!(RUN_OUTSTANDING_TASKS, labels).set(0.0);
        }
    }
    *exported = now_exported;
    metrics::gauge!(OUTSTANDING_TASKS).set(total as f64);
    Ok(total)
}

/// The runs `export_outstanding` exported last, with their labels.
pub type ExportedRuns = BTreeMap<RunId, Vec<(&'static str, String)>>;

impl OrphanReconciler {
    pub fn new(stall_after: Duration) -> OrphanReconciler {
        OrphanReconciler { stall_after, seen: BTreeMap::new() }
    }

    /// Whether the run made no recorded progress for `stall_after` (tracking starts now).
    fn stalled(&mut self, run: &RunRecord) -> bool {
        let now = tokio::time::Instant::now();
        let entry = self.seen.entry(run.id.clone()).or_insert((run.tasks_done, now));
        if entry.0 != run.tasks_done {
            *entry = (run.tasks_done, now);
        }
        entry.1.elapsed() >= self.stall_after
    }

    pub async fn pass(&mut self, deps: &CoordinatorDeps) -> Result<Vec<Reconciled>, ApplyError> {
        let state = &deps.state;
        let running = state.running_runs().await?;
        self.seen.retain(|id, _| running.iter().any(|run| &run.id == id));
        // The dead letters of the gateways of runs nobody follows (a follower takes its own).
        let mut orphan_gateways: BTreeSet<String> = BTreeSet::new();
        let mut done = Vec::new();
        for run in running {
            let lease = state.get_lease(&run.environment).await?;
            let followed = lease.is_some_and(|lease| lease.run_id == run.id && lease.expires_at > deps.clock.now());
            if followed {
                self.seen.remove(&run.id);
                continue;
            }
            let Some(plan) = state.get_plan(&run.plan_id).await? else {
                continue;
            };
            let gateways: BTreeSet<&str> =
                plan.snapshots.iter().map(|planned| planned.snapshot.gateway.as_str()).collect();
            orphan_gateways.extend(gateways.iter().map(|gateway| gateway.to_string()));
            if state.breaker(&run.plan_id).await?.is_some() {
                // Being aborted: the workers drain it and the last one settles it. If its
                // queued tasks were purged meanwhile (or its counters lost), nobody will: once
                // nothing is queued and nothing moved for `stall_after`, the rest is settled
                // here and the promoter closes the run as aborted.
                let mut queued = 0;
                for gateway in &gateways {
                    queued += deps.queue.queued(gateway).await?;
                }
                if queued == 0 && self.stalled(&run) {
                    let everything: Vec<u32> = (0..plan.task_count() as u32).collect();
                    match deps.gate.skip(&run.id, &everything).await {
                        Ok(_) | Err(QueueError::UnknownRun(_)) => {}
                        Err(error) => return Err(error.into()),
                    }
                    deps.events
                        .publish(RunEvent::RunSettled { run_id: run.id.clone(), plan_id: plan.id.clone() })
                        .await?;
                    warn!(run_id = %run.id, "an aborted run no coordinator follows had nothing left queued; settled it");
                    self.seen.remove(&run.id);
                    done.push(Reconciled::Settled { run_id: run.id.clone() });
                }
                continue;
            }
            let requeue = match deps.gate.outstanding(&run.id).await? {
                None => true,
                Some(0) => {
                    if self.stalled(&run) {
                        deps.events
                            .publish(RunEvent::RunSettled { run_id: run.id.clone(), plan_id: plan.id.clone() })
                            .await?;
                        warn!(run_id = %run.id, "a settled run no coordinator follows was never finalized; settled it again");
                        self.seen.remove(&run.id);
                        done.push(Reconciled::Settled { run_id: run.id.clone() });
                    }
                    false
                }
                Some(_) => {
                    let mut queued = 0;
                    for gateway in &gateways {
                        queued += deps.queue.queued(gateway).await?;
                    }
                    queued == 0 && self.stalled(&run)
                }
            };
            if requeue {
                let graph_plan = plan.clone();
                let graph = offload(move || TaskGraph::build(&graph_plan)).await.map_err(ApplyError::Join)?;
                let counters = load_counters(deps, &plan, &graph, &run.id).await?;
                let ready = counters.ready_tasks(&plan, &graph, &run.id, 1);
                deps.queue.publish(&ready).await?;
                if counters.done.iter().all(|done| *done) {
                    deps.events
                        .publish(RunEvent::RunSettled { run_id: run.id.clone(), plan_id: plan.id.clone() })
                        .await?;
                }
                warn!(run_id = %run.id, requeued = ready.len(), "a run no coordinator follows had lost its counters or stalled; rebuilt them from state");
                self.seen.remove(&run.id);
                done.push(Reconciled::Requeued { run_id: run.id.clone(), tasks: ready.len() });
            }
        }
        dead_letters::settle_dead_letters(deps, orphan_gateways.iter().map(String::as_str)).await?;
        Ok(done)
    }
}
