//! The state store's capability traits and `StateStore`, the sum every role holds as
//! `Arc<dyn StateStore>`.
//!
//! Every trait has three implementations: [`crate::SqliteState`] (embedded mode, `.sluice/state.db`),
//! [`crate::PostgresState`] (distributed mode, `SLUICE_STATE_URL`) and [`crate::MemoryState`] (the
//! protocol simulation's). The conformance suite in `conformance.rs` runs the same checks against all three.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use sluice_core::interval::{Interval, IntervalSet, Timestamp};
use sluice_core::names::{EnvironmentName, PlanId, SnapshotId, TaskId};
use sluice_core::plan::Plan;
use sluice_core::snapshot::Snapshot;

use crate::error::StateError;
use crate::types::{
    AuditEntry, EnvironmentLease, EnvironmentPromotion, EnvironmentRecord, FinishedTask, IntervalKey, IntervalRecord,
    PlanSummary, RunFinalization, RunId, RunOutcome, RunProgress, RunRecord, RunStart, TaskFailure, TaskOutlook,
};

/// Snapshots by id, stored once and shared by every plan and environment that uses them.
/// Backed by the `sluice_snapshots` table of SQLite (embedded) or PostgreSQL (distributed).
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// Inserts the snapshots that are not stored yet; a stored id is left as it is (idempotent).
    async fn put_snapshots(&self, snapshots: &[Snapshot]) -> Result<(), StateError>;

    /// The stored snapshots among `ids`; unknown ids are absent from the map.
    async fn get_snapshots(&self, ids: &[SnapshotId]) -> Result<BTreeMap<SnapshotId, Snapshot>, StateError>;

    /// Every stored snapshot, by id: the planner's "known snapshots" and the janitor's inventory.
    async fn all_snapshots(&self) -> Result<Vec<Snapshot>, StateError>;

    /// Deletes snapshots; fails with `SnapshotInUse` if an environment (or its rollback state)
    /// still shows one of them, and then deletes none. Recorded intervals are not touched.
    async fn delete_snapshots(&self, ids: &[SnapshotId]) -> Result<(), StateError>;
}

/// Environments: which snapshots each one's views show, what a rollback returns to, and when it
/// expires. Backed by the `sluice_environments` and `sluice_environment_snapshots` tables of
/// SQLite or PostgreSQL; a promotion is a compare-and-swap on the plan id under a row lock.
#[async_trait]
pub trait EnvironmentStore: Send + Sync {
    async fn get_environment(&self, name: &EnvironmentName) -> Result<Option<EnvironmentRecord>, StateError>;

    /// Every environment, by name.
    async fn list_environments(&self) -> Result<Vec<EnvironmentRecord>, StateError>;

    /// Points the environment at `promotion.state` if it still shows `promotion.expected_plan`,
    /// else fails with `StaleEnvironment` and changes nothing. The replaced state is kept as
    /// `previous`. Snapshots of the new state are inserted if absent.
    async fn promote_environment(&self, promotion: EnvironmentPromotion<'_>) -> Result<(), StateError>;

    /// Forgets the environment (not its lease, snapshots or intervals); absent is fine.
    async fn delete_environment(&self, name: &EnvironmentName) -> Result<(), StateError>;
}

/// The per-environment lease that makes one run the only one applying a plan to an environment.
/// Backed by the `sluice_leases` table of SQLite or PostgreSQL; taken by [`RunStore::begin_run`].
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// The current lease of the environment, expired or not.
    async fn get_lease(&self, environment: &EnvironmentName) -> Result<Option<EnvironmentLease>, StateError>;

    /// Extends the lease held by `run_id` to `now + ttl_seconds`. Fails with `LeaseHeld` if
    /// another run took it over (this run must stop), `NotFound` if there is no lease.
    async fn renew_lease(
        &self,
        environment: &EnvironmentName,
        run_id: &RunId,
        ttl_seconds: i64,
        now: Timestamp,
    ) -> Result<EnvironmentLease, StateError>;

    /// Gives up the lease if `run_id` holds it; nothing happens otherwise (idempotent).
    async fn release_lease(&self, environment: &EnvironmentName, run_id: &RunId) -> Result<(), StateError>;
}

/// Which physical tables hold which intervals, compacted into ranges per (model, version).
/// Backed by the `sluice_intervals` table of SQLite or PostgreSQL: the hot path of every worker.
#[async_trait]
pub trait IntervalStore: Send + Sync {
    /// Records intervals in one transaction, merging them with the overlapping or adjacent
    /// stored ranges of the same (model, version). A recorded interval is never lost, also
    /// under concurrent writers (which may leave overlapping rows that reads merge). Fails with
    /// `TableBeingDropped` if a (model, version) with a non-empty interval has a tombstone
    /// ([`DropStore`]), and then records nothing.
    async fn record_intervals(&self, records: &[IntervalRecord]) -> Result<(), StateError>;

    /// The recorded intervals of each key, in one query; a key with nothing recorded maps to
    /// an empty set.
    async fn get_intervals(&self, keys: &[IntervalKey]) -> Result<BTreeMap<IntervalKey, IntervalSet>, StateError>;

    /// Forgets every interval of the keys (their tables were dropped or must be rebuilt).
    async fn remove_intervals(&self, keys: &[IntervalKey]) -> Result<(), StateError>;
}

/// The janitor's claim on the physical tables it drops, serialized with [`RunStore::begin_run`]
/// so that no run starts using a table between the janitor's reads and its drops. Backed by the
/// `sluice_tables_being_dropped` table (a tombstone per claimed (model, version)) of SQLite or
/// PostgreSQL, read with `sluice_runs`, `sluice_environments` and `sluice_intervals`. While a
/// table has a tombstone, `begin_run` refuses a plan using it and `record_intervals` /
/// `finish_tasks` refuse to record an interval for it, both with `TableBeingDropped`.
#[async_trait]
pub trait DropStore: Send + Sync {
    /// The janitor's claim, in one transaction, serialized with `begin_run`: fails with
    /// `StateError::Contention` if the running runs are not exactly `running_seen` (a run
    /// started or ended since the janitor read them) or any environment shows another plan than
    /// in `environments_seen` (name → plan id; an environment absent from the map must not
    /// exist; one in the map that no longer exists is fine, deleting it only dropped
    /// references), and then changes nothing; else marks every table of `tables` as being
    /// dropped (a tombstone) and removes its recorded intervals. Idempotent for tables already
    /// claimed.
    async fn claim_tables_for_drop(
        &self,
        tables: &[IntervalKey],
        running_seen: &[RunId],
        environments_seen: &BTreeMap<EnvironmentName, Option<PlanId>>,
    ) -> Result<(), StateError>;

    /// The tables claimed and not yet released, in key order (a janitor that died mid-way leaves
    /// some): the next janitor drops them first.
    async fn tables_being_dropped(&self) -> Result<Vec<IntervalKey>, StateError>;

    /// The janitor dropped these tables: their tombstones go (unclaimed ones are ignored).
    async fn release_dropped_tables(&self, tables: &[IntervalKey]) -> Result<(), StateError>;
}

/// Plans as reviewed: stored once by id. Backed by the `sluice_plans` table of SQLite or PostgreSQL.
#[async_trait]
pub trait PlanStore: Send + Sync {
    /// Stores the plan unless its id is stored already (idempotent).
    async fn put_plan(&self, plan: &Plan) -> Result<(), StateError>;

    async fn get_plan(&self, id: &PlanId) -> Result<Option<Plan>, StateError>;

    /// The plans made for an environment, newest first.
    async fn list_plans(&self, environment: &EnvironmentName) -> Result<Vec<PlanSummary>, StateError>;
}

/// Runs: attempts to apply a plan, their counters and final status. Backed by the `sluice_runs`
/// and `sluice_leases` tables of SQLite or PostgreSQL.
#[async_trait]
pub trait RunStore: Send + Sync {
    /// The state push, in one transaction: inserts the plan and the snapshots if absent, checks
    /// the environment still shows `plan.previous_plan_id` (else `StaleEnvironment`), takes the
    /// environment's lease (else `LeaseHeld`; an expired lease, or one held by another run of
    /// the same plan, is taken over and that run marked aborted), and inserts the run as
    /// `running`. Every run it supersedes (a running run of the environment whose lease it took
    /// over) is finished as aborted with its audit row, and the plan's circuit breaker is reset
    /// (a resume), in the same transaction; a running run of the environment that is promoting
    /// is never superseded (`RunPromoting`). Fails with `TableBeingDropped` if the physical table
    /// (model, version) of any of the plan's snapshots has a tombstone ([`DropStore`]; checked
    /// after the environment). On any error nothing is written.
    async fn begin_run(&self, start: RunStart<'_>) -> Result<RunRecord, StateError>;

    async fn get_run(&self, id: &RunId) -> Result<Option<RunRecord>, StateError>;

    /// Every run of a plan, oldest first.
    async fn runs_of_plan(&self, plan_id: &PlanId) -> Result<Vec<RunRecord>, StateError>;

    /// Every run still marked running, oldest first: what the janitor must not clean up from under.
    async fn running_runs(&self) -> Result<Vec<RunRecord>, StateError>;

    /// The newest run of a plan.
    async fn latest_run(&self, plan_id: &PlanId) -> Result<Option<RunRecord>, StateError>;

    /// Marks a running run finished. Finishing again with the same status is a no-op; with
    /// another status it fails with `RunFinished`. Does not release the lease.
    async fn finish_run(&self, id: &RunId, outcome: RunOutcome) -> Result<(), StateError>;

    /// Records the promotion's intent: marks the run promoting if it is running and its plan's
    /// breaker is not tripped (or it is promoting already), in one statement that orders it
    /// against `trip_breaker` and `finalize_run`. True when the run is (now) promoting: the
    /// promoter may move views, and the run can only end promoted. False when the run has ended
    /// or was aborted first: no view may move.
    async fn begin_promotion(&self, run_id: &RunId, plan_id: &PlanId) -> Result<bool, StateError>;

    /// Ends a running run in one transaction: when `promotion` is given, compare-and-swaps the
    /// environment as [`EnvironmentStore::promote_environment`] does (an environment that already
    /// shows the promotion's plan is left as it is; one that shows another plan than expected
    /// fails with `StaleEnvironment` and nothing is written); then records the outcome, releases
    /// the environment's lease if the run holds it and appends the audit row. A run that is
    /// already finished is left exactly as it is (finalizing is idempotent, and the first
    /// outcome wins); so is a promoting run finalized with any outcome but succeeded (it still
    /// shows `running`: its promotion is rolled forward). Either way the stored record is
    /// returned. `NotFound` for an unknown run.
    async fn finalize_run(&self, finalization: RunFinalization<'_>) -> Result<RunRecord, StateError>;

    /// Adds to the run's counters.
    async fn add_run_progress(&self, id: &RunId, progress: RunProgress) -> Result<(), StateError>;
}

/// Task bookkeeping that lets a resumed run skip finished work and tell a human what failed.
/// Backed by the `sluice_tasks_done` and `sluice_task_failures` tables of SQLite or PostgreSQL.
#[async_trait]
pub trait TaskStore: Send + Sync {
    /// Marks tasks done in a run (idempotent, one statement for the batch).
    async fn record_task_done(&self, run_id: &RunId, tasks: &[TaskId]) -> Result<(), StateError>;
    /// The worker's hot path, in one transaction for a batch of tasks (of any runs): records
    /// their intervals (as `record_intervals`), marks them done (as `record_task_done`), and adds
    /// to each run's progress what its tasks not recorded done before gained, so that a task
    /// finished twice counts once. Fails with `TableBeingDropped` when an interval's table has a
    /// tombstone (as `record_intervals`), else with `NotFound` for a run that does not exist,
    /// and then records nothing.
    async fn finish_tasks(&self, finished: &[FinishedTask]) -> Result<(), StateError>;

    /// The tasks marked done in this run.
    async fn done_tasks(&self, run_id: &RunId) -> Result<BTreeSet<TaskId>, StateError>;

    /// The tasks marked done in any run of the plan: what a resume skips.
    async fn done_tasks_of_plan(&self, plan_id: &PlanId) -> Result<BTreeSet<TaskId>, StateError>;

    /// Records that a task failed for good in a run; a second failure of the same task in the
    /// same run replaces the first.
    async fn record_task_failure(&self, run_id: &RunId, failure: &TaskFailure) -> Result<(), StateError>;

    /// The failures of a run, in the order they were first recorded.
    async fn task_failures(&self, run_id: &RunId) -> Result<Vec<TaskFailure>, StateError>;

    /// What a worker must know before it runs a task, read at one moment in one round trip: the
    /// run's status (`None`: no such run), the plan's breaker (`Some(reason)` when tripped), and
    /// whether the task's interval is recorded for its physical table (covered by the recorded
    /// ranges, merged as `get_intervals` merges them).
    async fn task_outlook(
        &self,
        run_id: &RunId,
        plan_id: &PlanId,
        key: &IntervalKey,
        interval: Interval,
    ) -> Result<TaskOutlook, StateError>;
}

/// The circuit breaker of a plan: once tripped (abort, too many failures), workers stop taking
/// its tasks. Backed by the `sluice_breakers` table of SQLite or PostgreSQL.
#[async_trait]
pub trait BreakerStore: Send + Sync {
    /// Trips the breaker; if it is tripped already, the first reason stays.
    async fn trip_breaker(&self, plan_id: &PlanId, reason: &str) -> Result<(), StateError>;

    /// The reason the breaker was tripped, or `None` when it is closed.
    async fn breaker(&self, plan_id: &PlanId) -> Result<Option<String>, StateError>;

    async fn reset_breaker(&self, plan_id: &PlanId) -> Result<(), StateError>;
}

/// The append-only log of finished runs. Backed by the `sluice_audit_log` table of SQLite or
/// PostgreSQL.
#[async_trait]
pub trait AuditLog: Send + Sync {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StateError>;

    /// The newest `limit` entries, newest first.
    async fn list_audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StateError>;
}

/// Everything the roles need from state; hold it as `Arc<dyn StateStore>`.
pub trait StateStore:
    SnapshotStore
    + EnvironmentStore
    + LeaseStore
    + IntervalStore
    + PlanStore
    + RunStore
    + TaskStore
    + BreakerStore
    + AuditLog
    + DropStore
    + Send
    + Sync
{
}

impl<T> StateStore for T where
    T: SnapshotStore
        + EnvironmentStore
        + LeaseStore
        + IntervalStore
        + PlanStore
        + RunStore
        + TaskStore
        + BreakerStore
        + AuditLog
        + DropStore
        + Send
        + Sync
{
}
