//! The promoter role: finalize settled runs. A run whose every task is done is promoted — the
//! environment's views swapped to the plan's physical tables in one transaction per gateway,
//! then the environment record compare-and-swapped — and a failed or aborted one is closed
//! without touching a view. Either way the lease is released, an audit row written and the
//! summary sent to the notifier.

pub mod notify;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sluice_core::cron::Cron;
use sluice_core::interval::{Interval, Timestamp};
use sluice_core::model::ModelKind;
use sluice_core::names::{EnvironmentName, ModelName, PhysicalTable, PlanId};
use sluice_core::plan::{EnvironmentState, Plan, ViewChange};
use sluice_core::query::QueryTemplate;
use sluice_core::snapshot::Snapshot;
use sluice_core::task_graph::{TaskGraph, finished_tasks, task_tables};
use sluice_engine::{EngineError, GatewayPromotion, PromotionOutcome, ViewUpdate, Warehouse, WarehouseFactory};
use sluice_queue::{EventBus, QueueError, RunEvent, RunId};
use sluice_state::host::{Clock, offload};
use sluice_state::{
    AuditEntry, EnvironmentPromotion, IntervalKey, RunFinalization, RunOutcome, RunRecord, RunStatus, StateError,
    StateStore,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::notify::Notifier;

#[derive(Clone)]
pub struct PromoterDeps {
    pub state: Arc<dyn StateStore>,
    pub events: Arc<dyn EventBus>,
    pub warehouses: Arc<dyn WarehouseFactory>,
    pub notifier: Arc<dyn Notifier>,
    /// The time written into state (run end, environment expiry).
    pub clock: Arc<dyn Clock>,
}

#[derive(Debug, thiserror::Error)]
pub enum PromoterError {
    #[error("state store: {0}")]
    State(#[from] StateError),
    #[error("events: {0}")]
    Queue(#[from] QueueError),
    #[error("gateway {gateway}: {source}")]
    Warehouse { gateway: String, source: EngineError },
    #[error("run {0} is not in the state store")]
    UnknownRun(RunId),
    #[error("plan {0} is not in the state store")]
    UnknownPlan(PlanId),
    #[error("building the task graph failed: {0}")]
    Join(String),
    /// Some gateways show the new plan, another failed: rolled forward by trying again.
    #[error("promotion in progress: gateways {done} show the new plan; the next failed: {error}")]
    PartialPromotion { done: String, error: String },
    /// The run's promotion has begun (its intent is recorded): it is rolled forward, never
    /// ended otherwise.
    #[error("promotion underway, rolled forward: {error}")]
    Underway { error: String },
    /// The run was aborted (or ended) before its promotion could begin: no view moved.
    #[error("the run was aborted before its promotion began")]
    NotBegun,
}

impl PromoterError {
    /// Whether finalizing again later may succeed (a lost connection, not a wrong run).
    pub fn is_transient(&self) -> bool {
        match self {
            PromoterError::State(error) => error.is_transient(),
            PromoterError::Queue(error) => error.is_transient(),
            PromoterError::Warehouse { source, .. } => source.is_transient(),
            // Rolled forward: giving up would leave the environment split across gateways.
            PromoterError::PartialPromotion { .. } | PromoterError::Underway { .. } => true,
            _ => false,
        }
    }
}

/// What a finished run did, as printed and sent to notification targets.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RunSummary {
    pub plan_id: String,
    pub run_id: String,
    pub environment: String,
    /// `promoted`, `failed` or `aborted`.
    pub outcome: String,
    pub started_at: i64,
    pub finished_at: i64,
    pub tasks: u64,
    pub intervals: u64,
    pub models: u64,
    pub retries: u64,
    pub error: Option<String>,
}

fn summary(run: &RunRecord, plan: &Plan, outcome: &str, error: Option<String>, finished_at: Timestamp) -> RunSummary {
    let models = plan.snapshots.iter().filter(|planned| !planned.batches.is_empty()).count() as u64;
    RunSummary {
        plan_id: plan.id.to_string(),
        run_id: run.id.to_string(),
        environment: plan.environment.to_string(),
        outcome: outcome.to_string(),
        started_at: run.started_at.0,
        finished_at: finished_at.0,
        tasks: run.tasks_done,
        intervals: run.intervals_done,
        models,
        retries: run.retries,
        error,
    }
}

/// The view updates of a plan, grouped by the gateway whose warehouse holds them.
fn updates_by_gateway(plan: &Plan, current: Option<&EnvironmentState>) -> BTreeMap<String, Vec<ViewUpdate>> {
    let gateway_of_current: BTreeMap<&ModelName, &str> = current
        .map(|state| state.snapshots.iter().map(|s| (&s.name, s.gateway.as_str())).collect())
        .unwrap_or_default();
    let gateway_of_planned: BTreeMap<&ModelName, &str> =
        plan.snapshots.iter().map(|p| (&p.snapshot.name, p.snapshot.gateway.as_str())).collect();
    // Every gateway the environment touches before or after gets its share, also an empty one:
    // its promotion marker moves to the new plan with the others.
    let mut updates: BTreeMap<String, Vec<ViewUpdate>> = BTreeMap::new();
    for gateway in gateway_of_current.values().chain(gateway_of_planned.values()) {
        updates.entry((*gateway).to_string()).or_default();
    }
    for change in plan.view_changes(current) {
        let (name, target) = match change {
            ViewChange::Point { name, table } => (name, Some(table)),
            ViewChange::Drop { name } => (name, None),
        };
        let gateway = match &target {
            Some(_) => gateway_of_planned.get(&name).copied(),
            None => gateway_of_current.get(&name).copied(),
        };
        let Some(gateway) = gateway else { continue };
        let update =
            ViewUpdate { schema: plan.environment.view_schema(&name.schema), name: name.table.clone(), target };
        updates.entry(gateway.to_string()).or_default().push(update);
    }
    // A model moved to another gateway leaves a view behind on the old one: drop it there.
    if let Some(current) = current {
        for snapshot in &current.snapshots {
            if let Some(planned_gateway) = gateway_of_planned.get(&snapshot.name)
                && *planned_gateway != snapshot.gateway
                && snapshot.kind.is_materialized()
            {
                let update = ViewUpdate {
                    schema: plan.environment.view_schema(&snapshot.name.schema),
                    name: snapshot.name.table.clone(),
                    target: None,
                };
                updates.entry(snapshot.gateway.clone()).or_default().push(update);
            }
        }
    }
    updates
}

fn outcome_name(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Succeeded => "promoted",
        RunStatus::Failed => "failed",
        RunStatus::Aborted => "aborted",
        RunStatus::Running => "running",
    }
}

/// What a run's end will be, once decided and before it is written.
struct Decision {
    status: RunStatus,
    error: Option<String>,
    /// For a promoted run: the environment state to compare-and-swap with the outcome.
    promotion: Option<(EnvironmentState, Option<Timestamp>)>,
}

/// Finalizes one settled run. Idempotent: a run already finished is only summarized again, and
/// two promoters finalizing the same run at once write one outcome and one audit row (the
/// outcome, the environment's promotion, the lease and the audit row are one state transaction;
/// the first to commit wins and the other reports what it wrote).
#[instrument(skip_all, fields(run_id = %run_id, plan_id = %plan_id, trace_id = %sluice_core::trace::trace_id(run_id)))]
pub async fn finalize_run(deps: &PromoterDeps, run_id: &RunId, plan_id: &PlanId) -> Result<RunSummary, PromoterError> {
    let state = &deps.state;
    let run = state.get_run(run_id).await?.ok_or_else(|| PromoterError::UnknownRun(run_id.clone()))?;
    let plan = state.get_plan(plan_id).await?.ok_or_else(|| PromoterError::UnknownPlan(plan_id.clone()))?;
    if run.status != RunStatus::Running {
        let outcome = outcome_name(run.status);
        return Ok(summary(&run, &plan, outcome, run.error.clone(), run.finished_at.unwrap_or(run.started_at)));
    }

    // A run whose promotion has begun is rolled forward whatever happened since (an abort, a
    // promoter that died between gateways): it can only end promoted.
    let breaker = if run.promoting { None } else { state.breaker(plan_id).await? };
    let decision = if let Some(reason) = breaker {
        Decision { status: RunStatus::Aborted, error: Some(reason), promotion: None }
    } else {
        let failures = state.task_failures(run_id).await?;
        if let Some(first) = failures.first() {
            let error = format!(
                "{} failed for {} ({} attempts): {}{}",
                first.model,
                first.interval,
                first.attempts,
                first.error,
                if failures.len() > 1 { format!(" (and {} more failures)", failures.len() - 1) } else { String::new() }
            );
            Decision { status: RunStatus::Failed, error: Some(error), promotion: None }
        } else {
            let promoting = std::time::Instant::now();
            let promoted = promote(deps, &plan, run_id).await;
            metrics::histogram!(sluice_ops::metrics::PROMOTION_DURATION).record(promoting.elapsed().as_secs_f64());
            match promoted {
                Ok(promotion) => Decision { status: RunStatus::Succeeded, error: None, promotion: Some(promotion) },
                Err(PromoterError::NotBegun) => {
                    let reason = state.breaker(plan_id).await?;
                    let reason = reason.unwrap_or_else(|| "the run ended before its promotion began".to_string());
                    Decision { status: RunStatus::Aborted, error: Some(reason), promotion: None }
                }
                // A lost connection is tried again (the settled run is delivered again); the
                // run stays running meanwhile.
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => {
                    warn!(error = %error, "promotion failed; the environment's views are unchanged");
                    Decision {
                        status: RunStatus::Failed,
                        error: Some(format!("promotion failed: {error}")),
                        promotion: None,
                    }
                }
            }
        }
    };
    let finished_at = deps.clock.now();
    let models = plan.snapshots.iter().filter(|planned| !planned.batches.is_empty()).count() as u64;
    let outcome_text = outcome_name(decision.status);
    let audit = AuditEntry {
        plan_id: plan.id.clone(),
        run_id: run_id.clone(),
        environment: plan.environment.clone(),
        user: run.user.clone(),
        started_at: run.started_at,
        finished_at,
        intervals: run.intervals_done,
        models,
        retries: run.retries,
        outcome: outcome_text.to_string(),
    };
    let outcome = RunOutcome { status: decision.status, error: decision.error.clone(), finished_at };
    let promotion = decision.promotion.as_ref().map(|(new_state, expires_at)| EnvironmentPromotion {
        state: new_state,
        expected_plan: plan.previous_plan_id.as_ref(),
        expires_at: *expires_at,
        now: finished_at,
    });
    let record = state.finalize_run(RunFinalization { run_id, outcome: &outcome, promotion, audit: &audit }).await?;
    if record.status == RunStatus::Running {
        // Its promotion began after this promoter decided otherwise: roll it forward instead.
        return Err(PromoterError::Underway { error: format!("run {run_id} is promoting; not ended {outcome_text}") });
    }
    let recorded_outcome = outcome_name(record.status);
    metrics::counter!(sluice_ops::metrics::RUNS, "outcome" => recorded_outcome).increment(1);
    let result =
        summary(&record, &plan, recorded_outcome, record.error.clone(), record.finished_at.unwrap_or(finished_at));
    if record.status != decision.status || record.finished_at != Some(finished_at) {
        // Another promoter finalized the run first: it notified.
        info!(outcome = recorded_outcome, "the run was finalized by another promoter");
        return Ok(result);
    }
    if record.status == RunStatus::Succeeded {
        run_after_all(deps, &plan).await;
    }
    deps.notifier.notify(&result, plan.notification_webhook.as_deref()).await;
    deps.events
        .publish(RunEvent::RunFinished { run_id: run_id.clone(), outcome: recorded_outcome.to_string() })
        .await?;
    info!(outcome = recorded_outcome, "run finalized");
    Ok(result)
}

/// Creates the tables the plan shows without writing them (`Plan::tables_to_create`), empty, from
/// their declared columns or their query's shape (rendered for their first interval), and the
/// physical views, parents first, before the promotion's intent is recorded: a failure leaves
/// every view as it was.
async fn create_empty_tables(
    deps: &PromoterDeps,
    plan: &Plan,
    current: Option<&EnvironmentState>,
) -> Result<(), PromoterError> {
    let candidates = plan.tables_to_create(current);
    if candidates.is_empty() {
        return Ok(());
    }
    // A table with an interval recorded exists (a view switched to a version built before, the
    // common case): only the others are created, one connection per gateway.
    let keys: Vec<_> = candidates.iter().map(|s| (s.name.clone(), s.version.clone())).collect();
    let recorded = deps.state.get_intervals(&keys).await?;
    let mut connections: BTreeMap<&str, Box<dyn Warehouse>> = BTreeMap::new();
    for snapshot in candidates {
        if recorded.get(&(snapshot.name.clone(), snapshot.version.clone())).is_some_and(|set| !set.is_empty()) {
            continue;
        }
        let Some(table) = snapshot.physical_table() else { continue };
        let warehouse_error = |source| PromoterError::Warehouse { gateway: snapshot.gateway.clone(), source };
        let first = match Cron::parse(&snapshot.cron) {
            Ok(cron) => Interval::new(snapshot.start, cron.next_tick_after(snapshot.start)),
            Err(error) => {
                return Err(PromoterError::State(StateError::Invalid {
                    reason: format!("{}: stored cron: {error}", snapshot.name),
                }));
            }
        };
        let now = deps.clock.now();
        let query = snapshot.rendered_query.as_deref().map(|sql| QueryTemplate::from_sql(sql).fill(first, now));
        let query = query.as_deref().unwrap_or("");
        let warehouse = match connections.entry(snapshot.gateway.as_str()) {
            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::btree_map::Entry::Vacant(entry) => {
                entry.insert(deps.warehouses.connect(&snapshot.gateway).await.map_err(warehouse_error)?)
            }
        };
        let created = match snapshot.kind {
            ModelKind::View => warehouse.create_physical_view(&table, query).await,
            _ => warehouse.ensure_table(&table, &snapshot.columns, query).await,
        };
        created.map_err(warehouse_error)?;
    }
    Ok(())
}

/// `after_all`, by the promoter that finalized the run as promoted (at most once: a promoter that
/// dies between the two does not run it). The environment is promoted whatever it does: a
/// failure is logged, naming the gateway.
async fn run_after_all(deps: &PromoterDeps, plan: &Plan) {
    let statements = &plan.statements;
    if statements.after_all.is_empty() {
        return;
    }
    let script = sluice_engine::transaction_script(&statements.after_all);
    let outcome = match deps.warehouses.connect(&statements.gateway).await {
        Ok(mut warehouse) => warehouse.execute(&script).await,
        Err(error) => Err(error),
    };
    match outcome {
        Ok(()) => info!(gateway = %statements.gateway, "after_all ran"),
        Err(error) => {
            warn!(gateway = %statements.gateway, error = %error, "after_all failed; the environment is promoted")
        }
    }
}

/// Checks every task is done and the environment still shows the plan this one was made
/// against (or already shows this one: another promoter got there first), records the
/// promotion's intent (`NotBegun` if the run was aborted first), then swaps the views; returns
/// the environment state to compare-and-swap, with its expiry. Once the intent is recorded every
/// failure is `Underway` or `PartialPromotion`: tried again until every gateway moved.
async fn promote(
    deps: &PromoterDeps,
    plan: &Plan,
    run_id: &RunId,
) -> Result<(EnvironmentState, Option<Timestamp>), PromoterError> {
    let state = &deps.state;
    let graph_plan = plan.clone();
    let graph = offload(move || TaskGraph::build(&graph_plan)).await.map_err(PromoterError::Join)?;
    // A task is finished when its interval is recorded for its physical table (by this plan or
    // another sharing the table).
    let recorded = state.get_intervals(&task_tables(plan)).await?;
    let missing = finished_tasks(plan, &graph, &recorded).iter().filter(|finished| !**finished).count();
    if missing > 0 {
        return Err(PromoterError::State(StateError::NotFound {
            what: format!("{missing} of the plan's tasks are not done; apply the plan again to resume"),
        }));
    }
    let new_state = plan.environment_state();
    let expires_at = plan.environment_ttl_seconds.map(|ttl| Timestamp(deps.clock.now().0 + ttl));
    let current = state.get_environment(&plan.environment).await?;
    let current_plan = current.as_ref().and_then(|record| record.state.plan_id.clone());
    if current_plan.as_ref() == Some(&plan.id) {
        return Ok((new_state, expires_at));
    }
    let current_state = current.as_ref().map(|record| &record.state);
    if current_plan != plan.previous_plan_id {
        return Err(PromoterError::State(StateError::StaleEnvironment {
            environment: plan.environment.clone(),
            expected: plan.previous_plan_id.clone(),
            actual: current_plan,
        }));
    }
    let swap = EnvironmentSwap {
        environment: &plan.environment,
        expected_plan: plan.previous_plan_id.as_ref(),
        plan: Some(&plan.id),
    };
    create_empty_tables(deps, plan, current_state).await?;
    if !state.begin_promotion(run_id, &plan.id).await? {
        return Err(PromoterError::NotBegun);
    }
    swap_views(deps.warehouses.as_ref(), &swap, updates_by_gateway(plan, current_state)).await.map_err(|error| {
        if error.is_transient() { error } else { PromoterError::Underway { error: error.to_string() } }
    })?;
    Ok((new_state, expires_at))
}

/// Runs the promoter until `shutdown`: finalizes every settled run it is handed.
pub async fn run(deps: PromoterDeps, shutdown: CancellationToken) -> Result<(), PromoterError> {
    info!("promoter starting");
    let mut pause = Duration::from_millis(100);
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            next = deps.events.next_settled() => next,
        };
        let settled = match next {
            Ok(Some(settled)) => settled,
            Ok(None) => break,
            Err(error) if error.is_transient() => {
                warn!(error = %error, "settled runs unavailable, retrying");
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        match finalize_run(&deps, &settled.run_id, &settled.plan_id).await {
            Ok(_) => {
                pause = Duration::from_millis(100);
                settled.ack().await?;
            }
            Err(error) if error.is_transient() => {
                // Dropped unacked: the settled run is delivered again (to us or another promoter).
                warn!(run_id = %settled.run_id, error = %error, "finalizing the run failed; it will be retried");
                drop(settled);
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(error) => {
                warn!(run_id = %settled.run_id, error = %error, "finalizing the run failed");
                let run_id = settled.run_id.clone();
                settled.ack().await?;
                deps.events.publish(RunEvent::RunFinished { run_id, outcome: format!("error: {error}") }).await?;
            }
        }
    }
    info!("promoter stopped");
    Ok(())
}

/// An environment's promotion across its gateways: which plan it leaves and which it shows.
struct EnvironmentSwap<'a> {
    environment: &'a EnvironmentName,
    expected_plan: Option<&'a PlanId>,
    plan: Option<&'a PlanId>,
}

/// Applies an environment's view updates, one guarded transaction per gateway (each gateway's
/// promotion marker moves from `expected_plan` to `plan` with its views). A gateway already
/// showing the plan is skipped (a promotion rolled forward again); one showing another plan
/// stops everything with `StaleEnvironment`. A failure once some gateway shows the new plan is
/// `PartialPromotion`: the caller rolls it forward (tries again) instead of giving up, so the
/// environment never stays split across gateways.
async fn swap_views(
    warehouses: &dyn WarehouseFactory,
    swap: &EnvironmentSwap<'_>,
    updates: BTreeMap<String, Vec<ViewUpdate>>,
) -> Result<(), PromoterError> {
    let mut shown_by = Vec::new();
    for (gateway, updates) in updates {
        let promotion = GatewayPromotion {
            environment: swap.environment.to_string(),
            expected_plan: swap.expected_plan.map(ToString::to_string),
            plan: swap.plan.map(ToString::to_string),
            updates,
        };
        let outcome = match promote_gateway(warehouses, &gateway, &promotion).await {
            Ok(outcome) => outcome,
            Err(error) if shown_by.is_empty() => return Err(error),
            Err(error) => {
                return Err(PromoterError::PartialPromotion { done: shown_by.join(", "), error: error.to_string() });
            }
        };
        match outcome {
            PromotionOutcome::Applied => {
                info!(gateway = %gateway, views = promotion.updates.len(), "views swapped");
            }
            PromotionOutcome::AlreadyShown => info!(gateway = %gateway, "the gateway shows the plan already"),
            PromotionOutcome::Stale { shown } => {
                return Err(PromoterError::State(StateError::StaleEnvironment {
                    environment: swap.environment.clone(),
                    expected: swap.expected_plan.cloned(),
                    actual: shown.map(PlanId),
                }));
            }
        }
        shown_by.push(gateway);
    }
    Ok(())
}

async fn promote_gateway(
    warehouses: &dyn WarehouseFactory,
    gateway: &str,
    promotion: &GatewayPromotion,
) -> Result<PromotionOutcome, PromoterError> {
    let failed = |source| PromoterError::Warehouse { gateway: gateway.to_string(), source };
    let mut warehouse = warehouses.connect(gateway).await.map_err(failed)?;
    warehouse.promote_environment(promotion).await.map_err(failed)
}

/// Refuses when another run holds the environment.
async fn ensure_not_leased(
    state: &Arc<dyn StateStore>,
    environment: &EnvironmentName,
    now: Timestamp,
) -> Result<(), PromoterError> {
    if let Some(lease) = state.get_lease(environment).await?
        && lease.expires_at > now
    {
        return Err(PromoterError::State(StateError::LeaseHeld {
            environment: environment.clone(),
            holder_plan: lease.plan_id,
            holder_run: lease.run_id,
            expires_at: lease.expires_at,
        }));
    }
    Ok(())
}

/// Points the environment's views back at the snapshots of the plan it showed before (no
/// backfill: those tables are complete), then compare-and-swaps the record. Returns the plan the
/// environment shows now.
pub async fn rollback(
    state: &Arc<dyn StateStore>,
    warehouses: &dyn WarehouseFactory,
    environment: &EnvironmentName,
    now: Timestamp,
) -> Result<Option<PlanId>, PromoterError> {
    let record = state
        .get_environment(environment)
        .await?
        .ok_or_else(|| StateError::NotFound { what: format!("environment {environment}") })?;
    let previous = record.previous.clone().ok_or_else(|| StateError::NotFound {
        what: format!("an earlier plan of environment {environment} to roll back to"),
    })?;
    ensure_not_leased(state, environment, now).await?;
    let current_versions: BTreeMap<&ModelName, (&sluice_core::names::Version, &str)> =
        record.state.snapshots.iter().map(|s| (&s.name, (&s.version, s.gateway.as_str()))).collect();
    let mut updates: BTreeMap<String, Vec<ViewUpdate>> = BTreeMap::new();
    for snapshot in previous.snapshots.iter().chain(&record.state.snapshots) {
        updates.entry(snapshot.gateway.clone()).or_default();
    }
    for snapshot in &previous.snapshots {
        let Some(table) = snapshot.physical_table() else { continue };
        if current_versions.get(&snapshot.name).map(|(version, _)| *version) != Some(&snapshot.version) {
            updates.entry(snapshot.gateway.clone()).or_default().push(ViewUpdate {
                schema: environment.view_schema(&snapshot.name.schema),
                name: snapshot.name.table.clone(),
                target: Some(table),
            });
        }
    }
    let previous_names: BTreeSet<&ModelName> = previous.snapshots.iter().map(|s| &s.name).collect();
    for snapshot in &record.state.snapshots {
        if !previous_names.contains(&snapshot.name) && snapshot.kind.is_materialized() {
            updates.entry(snapshot.gateway.clone()).or_default().push(ViewUpdate {
                schema: environment.view_schema(&snapshot.name.schema),
                name: snapshot.name.table.clone(),
                target: None,
            });
        }
    }
    let swap =
        EnvironmentSwap { environment, expected_plan: record.state.plan_id.as_ref(), plan: previous.plan_id.as_ref() };
    swap_views(warehouses, &swap, updates).await?;
    let promotion = EnvironmentPromotion {
        state: &previous,
        expected_plan: record.state.plan_id.as_ref(),
        expires_at: record.expires_at,
        now,
    };
    state.promote_environment(promotion).await?;
    Ok(previous.plan_id)
}

/// What the janitor removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JanitorReport {
    pub environments_removed: u64,
    pub tables_dropped: u64,
}

/// Drops expired environments (their views, then their records) and the physical tables no
/// environment and no running plan references (then their intervals and snapshots).
///
/// Tables are claimed in state before they are dropped (`DropStore`): the claim checks that no
/// run started or ended and no environment moved since the janitor read what references what,
/// and a run cannot begin on a claimed table, so a table is never dropped under a run that uses
/// it. A claim that finds things moved is read and tried again; a janitor that died after its
/// claim leaves tombstones, whose tables the next pass drops first.
pub async fn janitor(
    state: &Arc<dyn StateStore>,
    warehouses: &dyn WarehouseFactory,
    now: Timestamp,
) -> Result<JanitorReport, PromoterError> {
    let mut report = JanitorReport::default();
    // What a janitor that died mid-way claimed.
    let unfinished = state.tables_being_dropped().await?;
    if !unfinished.is_empty() {
        report.tables_dropped += drop_claimed(state, warehouses, &unfinished).await?;
    }
    for record in state.list_environments().await? {
        let expired = !record.state.name.is_prod() && record.expires_at.is_some_and(|at| at <= now);
        if !expired {
            continue;
        }
        ensure_not_leased(state, &record.state.name, now).await?;
        let mut updates: BTreeMap<String, Vec<ViewUpdate>> = BTreeMap::new();
        for snapshot in &record.state.snapshots {
            updates.entry(snapshot.gateway.clone()).or_default();
        }
        for snapshot in record.state.snapshots.iter().filter(|s| s.kind.is_materialized()) {
            updates.entry(snapshot.gateway.clone()).or_default().push(ViewUpdate {
                schema: record.state.name.view_schema(&snapshot.name.schema),
                name: snapshot.name.table.clone(),
                target: None,
            });
        }
        let swap = EnvironmentSwap {
            environment: &record.state.name,
            expected_plan: record.state.plan_id.as_ref(),
            plan: None,
        };
        swap_views(warehouses, &swap, updates).await?;
        state.delete_environment(&record.state.name).await?;
        report.environments_removed += 1;
    }
    let mut attempts = 0;
    let (doomed, unreferenced_snapshots) = loop {
        attempts += 1;
        let candidates = state.all_snapshots().await?;
        let mut referenced: BTreeSet<(ModelName, sluice_core::names::Version)> = BTreeSet::new();
        let running = state.running_runs().await?;
        for run in &running {
            if let Some(plan) = state.get_plan(&run.plan_id).await? {
                for planned in &plan.snapshots {
                    referenced.insert((planned.snapshot.name.clone(), planned.snapshot.version.clone()));
                }
            }
        }
        let mut environments_seen = BTreeMap::new();
        for record in state.list_environments().await? {
            // What the environment shows, and what a rollback would show.
            for snapshot in
                record.state.snapshots.iter().chain(record.previous.iter().flat_map(|previous| &previous.snapshots))
            {
                referenced.insert((snapshot.name.clone(), snapshot.version.clone()));
            }
            environments_seen.insert(record.state.name.clone(), record.state.plan_id.clone());
        }
        let mut unreferenced_snapshots = Vec::new();
        let mut doomed: BTreeMap<IntervalKey, (String, PhysicalTable)> = BTreeMap::new();
        for snapshot in candidates {
            let key = (snapshot.name.clone(), snapshot.version.clone());
            if referenced.contains(&key) {
                continue;
            }
            if let Some(table) = snapshot.physical_table() {
                doomed.entry(key).or_insert_with(|| (snapshot.gateway.clone(), table));
            }
            unreferenced_snapshots.push(snapshot.id.clone());
        }
        let keys: Vec<IntervalKey> = doomed.keys().cloned().collect();
        let running_seen: Vec<RunId> = running.into_iter().map(|run| run.id).collect();
        match state.claim_tables_for_drop(&keys, &running_seen, &environments_seen).await {
            Ok(()) => break (keys, unreferenced_snapshots),
            Err(StateError::Contention { .. }) if attempts < 3 => {
                info!("runs or environments moved while the janitor read them; reading again");
            }
            Err(error) => return Err(error.into()),
        }
    };
    report.tables_dropped += drop_claimed(state, warehouses, &doomed).await?;
    state.delete_snapshots(&unreferenced_snapshots).await?;
    Ok(report)
}

/// Drops claimed tables (their intervals went with the claim), then releases the claims.
async fn drop_claimed(
    state: &Arc<dyn StateStore>,
    warehouses: &dyn WarehouseFactory,
    keys: &[IntervalKey],
) -> Result<u64, PromoterError> {
    let mut dropped = 0;
    let mut snapshots_by_key: BTreeMap<IntervalKey, Snapshot> = BTreeMap::new();
    for snapshot in state.all_snapshots().await? {
        snapshots_by_key.entry((snapshot.name.clone(), snapshot.version.clone())).or_insert(snapshot);
    }
    for key in keys {
        let Some(snapshot) = snapshots_by_key.get(key) else { continue };
        let Some(table) = snapshot.physical_table() else { continue };
        let gateway = &snapshot.gateway;
        let mut warehouse = warehouses
            .connect(gateway)
            .await
            .map_err(|source| PromoterError::Warehouse { gateway: gateway.clone(), source })?;
        warehouse
            .drop_table(&table)
            .await
            .map_err(|source| PromoterError::Warehouse { gateway: gateway.clone(), source })?;
        dropped += 1;
    }
    state.release_dropped_tables(keys).await?;
    Ok(dropped)
}
