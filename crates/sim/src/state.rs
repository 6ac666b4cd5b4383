//! The state store as the roles see it in the simulation: the in-memory store behind latency,
//! calls that fail before doing anything, and writes that commit but report an error.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use sluice_core::interval::{Interval, IntervalSet, Timestamp};
use sluice_core::names::{EnvironmentName, PlanId, SnapshotId, TaskId};
use sluice_core::plan::Plan;
use sluice_core::snapshot::Snapshot;
use sluice_state::{
    AuditEntry, AuditLog, BreakerStore, DropStore, EnvironmentLease, EnvironmentPromotion, EnvironmentRecord,
    EnvironmentStore, FinishedTask, IntervalKey, IntervalRecord, IntervalStore, LeaseStore, MemoryState, PlanStore,
    PlanSummary, RunFinalization, RunId, RunOutcome, RunProgress, RunRecord, RunStart, RunStatus, RunStore,
    SnapshotStore, StateError, TaskFailure, TaskOutlook, TaskStore,
};

use crate::world::{Shared, current_task};

#[derive(Clone)]
pub struct SimState {
    world: Shared,
    inner: MemoryState,
}

impl SimState {
    pub fn new(world: Shared) -> SimState {
        let inner = world.lock().truth.clone();
        SimState { world, inner }
    }

    async fn call<T, F>(&self, write: bool, name: &str, op: F) -> Result<T, StateError>
    where
        F: std::future::Future<Output = Result<T, StateError>>,
    {
        self.world.pause().await;
        let (fail_before, fail_after) = {
            let mut world = self.world.lock();
            let rates = world.faults.clone();
            world.note(name);
            (world.chance(rates.state_fails), write && world.chance(rates.state_commit_lost))
        };
        if fail_before {
            self.world.note("state call failed");
            return Err(injected());
        }
        let outcome = op.await;
        self.world.pause().await;
        if fail_after && outcome.is_ok() {
            self.world.note("state commit reported lost");
            return Err(injected());
        }
        outcome
    }
}

impl SimState {
    /// Runs a write that records intervals, then notes when each was first recorded.
    async fn record_times<F>(&self, records: &[IntervalRecord], write: F) -> Result<(), StateError>
    where
        F: std::future::Future<Output = Result<(), StateError>>,
    {
        write.await?;
        let mut world = self.world.lock();
        let now = world.tick();
        for record in records {
            let key = (record.name.clone(), record.version.clone(), record.interval.start.0);
            world.recorded_at.entry(key).or_insert(now);
        }
        Ok(())
    }
}

fn injected() -> StateError {
    StateError::Connect { target: "simulated state".into(), reason: "injected fault".into(), transient: true }
}

#[async_trait]
impl SnapshotStore for SimState {
    async fn put_snapshots(&self, snapshots: &[Snapshot]) -> Result<(), StateError> {
        self.call(true, "put_snapshots", self.inner.put_snapshots(snapshots)).await
    }
    async fn get_snapshots(&self, ids: &[SnapshotId]) -> Result<BTreeMap<SnapshotId, Snapshot>, StateError> {
        self.call(false, "get_snapshots", self.inner.get_snapshots(ids)).await
    }
    async fn all_snapshots(&self) -> Result<Vec<Snapshot>, StateError> {
        self.call(false, "all_snapshots", self.inner.all_snapshots()).await
    }
    async fn delete_snapshots(&self, ids: &[SnapshotId]) -> Result<(), StateError> {
        self.call(true, "delete_snapshots", self.inner.delete_snapshots(ids)).await
    }
}

#[async_trait]
impl EnvironmentStore for SimState {
    async fn get_environment(&self, name: &EnvironmentName) -> Result<Option<EnvironmentRecord>, StateError> {
        self.call(false, "get_environment", self.inner.get_environment(name)).await
    }
    async fn list_environments(&self) -> Result<Vec<EnvironmentRecord>, StateError> {
        self.call(false, "list_environments", self.inner.list_environments()).await
    }
    async fn promote_environment(&self, promotion: EnvironmentPromotion<'_>) -> Result<(), StateError> {
        self.call(true, "promote_environment", self.inner.promote_environment(promotion)).await
    }
    async fn delete_environment(&self, name: &EnvironmentName) -> Result<(), StateError> {
        self.call(true, "delete_environment", self.inner.delete_environment(name)).await
    }
}

#[async_trait]
impl LeaseStore for SimState {
    async fn get_lease(&self, environment: &EnvironmentName) -> Result<Option<EnvironmentLease>, StateError> {
        self.call(false, "get_lease", self.inner.get_lease(environment)).await
    }
    async fn renew_lease(
        &self,
        environment: &EnvironmentName,
        run_id: &RunId,
        ttl_seconds: i64,
        now: Timestamp,
    ) -> Result<EnvironmentLease, StateError> {
        self.call(true, "renew_lease", self.inner.renew_lease(environment, run_id, ttl_seconds, now)).await
    }
    async fn release_lease(&self, environment: &EnvironmentName, run_id: &RunId) -> Result<(), StateError> {
        self.call(true, "release_lease", self.inner.release_lease(environment, run_id)).await
    }
}

#[async_trait]
impl IntervalStore for SimState {
    async fn record_intervals(&self, records: &[IntervalRecord]) -> Result<(), StateError> {
        self.call(true, "record_intervals", self.record_times(records, self.inner.record_intervals(records))).await
    }
    async fn get_intervals(&self, keys: &[IntervalKey]) -> Result<BTreeMap<IntervalKey, IntervalSet>, StateError> {
        let op = async {
            let answer = self.inner.get_intervals(keys).await?;
            let mut world = self.world.lock();
            let now = world.tick();
            world.reads.entry(current_task()).or_default().intervals = Some(now);
            Ok(answer)
        };
        self.call(false, "get_intervals", op).await
    }
    async fn remove_intervals(&self, keys: &[IntervalKey]) -> Result<(), StateError> {
        let op = async {
            self.inner.remove_intervals(keys).await?;
            let mut world = self.world.lock();
            world.recorded_at.retain(|(name, version, _), _| !keys.iter().any(|(n, v)| n == name && v == version));
            Ok(())
        };
        self.call(true, "remove_intervals", op).await
    }
}

#[async_trait]
impl PlanStore for SimState {
    async fn put_plan(&self, plan: &Plan) -> Result<(), StateError> {
        self.call(true, "put_plan", self.inner.put_plan(plan)).await
    }
    async fn get_plan(&self, id: &PlanId) -> Result<Option<Plan>, StateError> {
        self.call(false, "get_plan", self.inner.get_plan(id)).await
    }
    async fn list_plans(&self, environment: &EnvironmentName) -> Result<Vec<PlanSummary>, StateError> {
        self.call(false, "list_plans", self.inner.list_plans(environment)).await
    }
}

#[async_trait]
impl RunStore for SimState {
    async fn begin_run(&self, start: RunStart<'_>) -> Result<RunRecord, StateError> {
        let plan_id = start.plan.id.clone();
        let op = async {
            let running = self.inner.running_runs().await?;
            let record = self.inner.begin_run(start).await?;
            let mut ended = Vec::new();
            for run in running {
                if let Ok(Some(after)) = self.inner.get_run(&run.id).await
                    && after.status != RunStatus::Running
                {
                    ended.push(run.id);
                }
            }
            let mut world = self.world.lock();
            let now = world.tick();
            for run in ended {
                world.ended_at.entry(run).or_insert(now);
            }
            world.tripped_at.remove(&plan_id);
            Ok(record)
        };
        self.call(true, "begin_run", op).await
    }
    async fn get_run(&self, id: &RunId) -> Result<Option<RunRecord>, StateError> {
        let op = async {
            let answer = self.inner.get_run(id).await?;
            let mut world = self.world.lock();
            let now = world.tick();
            world.reads.entry(current_task()).or_default().run = Some(now);
            Ok(answer)
        };
        self.call(false, "get_run", op).await
    }
    async fn runs_of_plan(&self, plan_id: &PlanId) -> Result<Vec<RunRecord>, StateError> {
        self.call(false, "runs_of_plan", self.inner.runs_of_plan(plan_id)).await
    }
    async fn running_runs(&self) -> Result<Vec<RunRecord>, StateError> {
        self.call(false, "running_runs", self.inner.running_runs()).await
    }
    async fn latest_run(&self, plan_id: &PlanId) -> Result<Option<RunRecord>, StateError> {
        self.call(false, "latest_run", self.inner.latest_run(plan_id)).await
    }
    async fn finish_run(&self, id: &RunId, outcome: RunOutcome) -> Result<(), StateError> {
        let op = async {
            self.inner.finish_run(id, outcome).await?;
            let mut world = self.world.lock();
            let now = world.tick();
            world.ended_at.entry(id.clone()).or_insert(now);
            Ok(())
        };
        self.call(true, "finish_run", op).await
    }
    async fn finalize_run(&self, finalization: RunFinalization<'_>) -> Result<RunRecord, StateError> {
        let run_id = finalization.run_id.clone();
        let op = async {
            let record = self.inner.finalize_run(finalization).await?;
            let mut world = self.world.lock();
            let now = world.tick();
            if record.status != RunStatus::Running {
                world.ended_at.entry(run_id).or_insert(now);
            }
            Ok(record)
        };
        self.call(true, "finalize_run", op).await
    }
    async fn begin_promotion(&self, run_id: &RunId, plan_id: &PlanId) -> Result<bool, StateError> {
        self.call(true, "begin_promotion", self.inner.begin_promotion(run_id, plan_id)).await
    }
    async fn add_run_progress(&self, id: &RunId, progress: RunProgress) -> Result<(), StateError> {
        self.call(true, "add_run_progress", self.inner.add_run_progress(id, progress)).await
    }
}

#[async_trait]
impl TaskStore for SimState {
    async fn record_task_done(&self, run_id: &RunId, tasks: &[TaskId]) -> Result<(), StateError> {
        self.call(true, "record_task_done", self.inner.record_task_done(run_id, tasks)).await
    }
    async fn finish_tasks(&self, finished: &[FinishedTask]) -> Result<(), StateError> {
        let records: Vec<IntervalRecord> = finished.iter().filter_map(|task| task.interval.clone()).collect();
        self.call(true, "finish_tasks", self.record_times(&records, self.inner.finish_tasks(finished))).await
    }
    async fn done_tasks(&self, run_id: &RunId) -> Result<BTreeSet<TaskId>, StateError> {
        self.call(false, "done_tasks", self.inner.done_tasks(run_id)).await
    }
    async fn done_tasks_of_plan(&self, plan_id: &PlanId) -> Result<BTreeSet<TaskId>, StateError> {
        self.call(false, "done_tasks_of_plan", self.inner.done_tasks_of_plan(plan_id)).await
    }
    async fn record_task_failure(&self, run_id: &RunId, failure: &TaskFailure) -> Result<(), StateError> {
        self.call(true, "record_task_failure", self.inner.record_task_failure(run_id, failure)).await
    }
    async fn task_failures(&self, run_id: &RunId) -> Result<Vec<TaskFailure>, StateError> {
        self.call(false, "task_failures", self.inner.task_failures(run_id)).await
    }
    async fn task_outlook(
        &self,
        run_id: &RunId,
        plan_id: &PlanId,
        key: &IntervalKey,
        interval: Interval,
    ) -> Result<TaskOutlook, StateError> {
        let op = async {
            let answer = self.inner.task_outlook(run_id, plan_id, key, interval).await?;
            let mut world = self.world.lock();
            let now = world.tick();
            // One read of all three at one moment.
            let reads = world.reads.entry(current_task()).or_default();
            reads.intervals = Some(now);
            reads.run = Some(now);
            reads.breaker = Some(now);
            Ok(answer)
        };
        self.call(false, "task_outlook", op).await
    }
}

#[async_trait]
impl BreakerStore for SimState {
    async fn trip_breaker(&self, plan_id: &PlanId, reason: &str) -> Result<(), StateError> {
        let op = async {
            self.inner.trip_breaker(plan_id, reason).await?;
            let mut world = self.world.lock();
            let now = world.tick();
            world.tripped_at.entry(plan_id.clone()).or_insert(now);
            Ok(())
        };
        self.call(true, "trip_breaker", op).await
    }
    async fn breaker(&self, plan_id: &PlanId) -> Result<Option<String>, StateError> {
        let op = async {
            let answer = self.inner.breaker(plan_id).await?;
            let mut world = self.world.lock();
            let now = world.tick();
            world.reads.entry(current_task()).or_default().breaker = Some(now);
            Ok(answer)
        };
        self.call(false, "breaker", op).await
    }
    async fn reset_breaker(&self, plan_id: &PlanId) -> Result<(), StateError> {
        let op = async {
            self.inner.reset_breaker(plan_id).await?;
            self.world.lock().tripped_at.remove(plan_id);
            Ok(())
        };
        self.call(true, "reset_breaker", op).await
    }
}

#[async_trait]
impl DropStore for SimState {
    async fn claim_tables_for_drop(
        &self,
        tables: &[IntervalKey],
        running_seen: &[RunId],
        environments_seen: &BTreeMap<EnvironmentName, Option<PlanId>>,
    ) -> Result<(), StateError> {
        // A janitor that stalls between its reads and its claim (up to half a minute): runs may
        // begin and environments move in between, which the claim must notice.
        let stall = {
            let mut world = self.world.lock();
            let stalls = world.faults.janitor_stalls;
            if world.chance(stalls) { Some(std::time::Duration::from_millis(world.below(30_000))) } else { None }
        };
        if let Some(stall) = stall {
            self.world.note(&format!("the janitor stalls {stall:?} before its claim"));
            tokio::time::sleep(stall).await;
        }
        let op = async {
            self.inner.claim_tables_for_drop(tables, running_seen, environments_seen).await?;
            // The claim removes the tables' intervals, as `remove_intervals` does.
            let mut world = self.world.lock();
            world.recorded_at.retain(|(name, version, _), _| !tables.iter().any(|(n, v)| n == name && v == version));
            Ok(())
        };
        self.call(true, "claim_tables_for_drop", op).await
    }
    async fn tables_being_dropped(&self) -> Result<Vec<IntervalKey>, StateError> {
        self.call(false, "tables_being_dropped", self.inner.tables_being_dropped()).await
    }
    async fn release_dropped_tables(&self, tables: &[IntervalKey]) -> Result<(), StateError> {
        self.call(true, "release_dropped_tables", self.inner.release_dropped_tables(tables)).await
    }
}

#[async_trait]
impl AuditLog for SimState {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StateError> {
        self.call(true, "append_audit", self.inner.append_audit(entry)).await
    }
    async fn list_audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StateError> {
        self.call(false, "list_audit", self.inner.list_audit(limit)).await
    }
}
