//! The records the state store reads and writes besides core's snapshots and plans: environment
//! records and leases, runs, task bookkeeping, recorded intervals and audit entries.

use std::fmt;

use serde::{Deserialize, Serialize};
use sluice_core::interval::{Interval, Timestamp};
use sluice_core::names::{EnvironmentName, ModelName, PlanId, TaskId, Version};
use sluice_core::plan::{EnvironmentState, Plan};
use sluice_core::snapshot::Snapshot;

/// One environment as stored: what its views show, what a rollback returns to, and when it expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvironmentRecord {
    pub state: EnvironmentState,
    /// The state this one replaced: what a rollback promotes again. `None` for a new environment.
    pub previous: Option<EnvironmentState>,
    /// When the janitor may delete the environment; `None` for never (prod).
    pub expires_at: Option<Timestamp>,
    pub updated_at: Timestamp,
}

/// A compare-and-swap of an environment: `state` replaces what the environment shows only if it
/// still shows `expected_plan` (`None`: the environment shows no plan or does not exist).
#[derive(Clone, Copy, Debug)]
pub struct EnvironmentPromotion<'a> {
    pub state: &'a EnvironmentState,
    pub expected_plan: Option<&'a PlanId>,
    pub expires_at: Option<Timestamp>,
    pub now: Timestamp,
}

/// The lease that makes one run the only writer of an environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvironmentLease {
    pub environment: EnvironmentName,
    pub plan_id: PlanId,
    pub run_id: RunId,
    /// The lease is held while `now < expires_at`; the holder renews it well before.
    pub expires_at: Timestamp,
}

/// One run's id: `<plan id>-<attempt>` (see [`RunId::for_attempt`]).
pub use sluice_core::names::RunId;

/// Where a run stands. Only `Running` runs change; the other three are final.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    /// Stopped on purpose (`sluice abort`, a purged queue) or superseded by a newer run.
    Aborted,
}

impl RunStatus {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Aborted => "aborted",
        }
    }

    pub fn parse(text: &str) -> Option<RunStatus> {
        match text {
            "running" => Some(RunStatus::Running),
            "succeeded" => Some(RunStatus::Succeeded),
            "failed" => Some(RunStatus::Failed),
            "aborted" => Some(RunStatus::Aborted),
            _ => None,
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One attempt to apply one plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRecord {
    pub id: RunId,
    pub plan_id: PlanId,
    pub environment: EnvironmentName,
    pub status: RunStatus,
    pub started_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    pub intervals_done: u64,
    pub tasks_done: u64,
    pub retries: u64,
    pub error: Option<String>,
    pub user: String,
    /// The promoter has begun moving the environment's views to this run's plan (the promotion's
    /// intent, recorded before the first gateway moves): from then on the run can only end
    /// promoted, rolled forward by whichever promoter finalizes it.
    pub promoting: bool,
}

/// What `begin_run` pushes in one transaction: the plan, its snapshots, the lease and the run.
#[derive(Clone, Copy, Debug)]
pub struct RunStart<'a> {
    pub plan: &'a Plan,
    pub run_id: &'a RunId,
    /// The snapshots the run needs (normally every snapshot of the plan); inserted if absent.
    pub snapshots: &'a [Snapshot],
    /// How long the lease lasts without a renewal.
    pub lease_ttl_seconds: i64,
    pub now: Timestamp,
    pub user: &'a str,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    /// `Succeeded`, `Failed` or `Aborted`.
    pub status: RunStatus,
    pub error: Option<String>,
    pub finished_at: Timestamp,
}

/// Everything that ends a run, written in one transaction by [`crate::RunStore::finalize_run`]:
/// its outcome, the environment promotion of a promoted run, the lease released and the audit row.
#[derive(Clone, Copy, Debug)]
pub struct RunFinalization<'a> {
    pub run_id: &'a RunId,
    pub outcome: &'a RunOutcome,
    /// For a promoted run: the environment's compare-and-swap, committed with the outcome.
    pub promotion: Option<EnvironmentPromotion<'a>>,
    pub audit: &'a AuditEntry,
}

/// Counters to add to a run's totals.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RunProgress {
    pub tasks_done: u64,
    pub intervals_done: u64,
    pub retries: u64,
}

/// A task a worker finished: what [`crate::TaskStore::finish_tasks`] records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinishedTask {
    pub run_id: RunId,
    pub task_id: TaskId,
    /// The interval the task wrote; `None` when it found the interval recorded already.
    pub interval: Option<IntervalRecord>,
    /// What the run's progress gains, if the task was not recorded done in the run before.
    pub intervals: u64,
    pub retries: u64,
}

/// A task that failed for good in a run, with the error text a human needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskFailure {
    pub task_id: TaskId,
    pub model: ModelName,
    pub interval: Interval,
    pub error: String,
    pub attempts: u32,
}

/// What a worker must know before it runs a task, read at one moment by
/// [`crate::TaskStore::task_outlook`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskOutlook {
    /// The run's status; `None` when there is no such run.
    pub run: Option<RunStatus>,
    /// The reason the plan's circuit breaker was tripped; `None` when it is closed.
    pub breaker: Option<String>,
    /// Whether the task's interval is recorded for its physical table (covered by the recorded
    /// ranges, merged as [`crate::IntervalStore::get_intervals`] merges them).
    pub recorded: bool,
}

/// One interval of one physical table (model name and version) that holds its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntervalRecord {
    pub name: ModelName,
    pub version: Version,
    pub interval: Interval,
}

/// The key intervals are recorded under: one physical table.
pub type IntervalKey = (ModelName, Version);

/// A stored plan in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanSummary {
    pub id: PlanId,
    pub environment: EnvironmentName,
    pub previous_plan_id: Option<PlanId>,
    pub created_at: Timestamp,
}

/// One finished run, as the audit log keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub plan_id: PlanId,
    pub run_id: RunId,
    pub environment: EnvironmentName,
    pub user: String,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub intervals: u64,
    pub models: u64,
    pub retries: u64,
    /// `succeeded`, `failed: <reason>`, `aborted`, ...
    pub outcome: String,
}
