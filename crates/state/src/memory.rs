//! `MemoryState`: the state store held entirely in memory, for the deterministic protocol
//! simulation.
//!
//! The simulation runs every role on one single-threaded tokio runtime with a paused clock,
//! driven by one seed, so that a failing interleaving can be replayed exactly. SQLite cannot be
//! used there: sqlx-sqlite runs each connection on its own OS thread, so when a state call
//! completes depends on the operating system's scheduler, not on the seed. This store never
//! leaves the calling task:
//!
//! - every table is a `BTreeMap`, `BTreeSet` or `Vec`, so iteration order is fixed (no
//!   `HashMap`/`HashSet` iteration anywhere);
//! - no threads, no `spawn_blocking`, no timers, no reading of the system clock: every time
//!   comes in through an argument (`now`, `finished_at`, ...);
//! - all state sits behind one `std::sync::Mutex`, taken once per trait method and never held
//!   across an `.await` (the methods await nothing). A trait method is one transaction: it
//!   checks everything that can fail before it changes anything, so an error writes nothing.
//!
//! Semantics are those of [`crate::SqliteState`], including which `StateError` each failure
//! returns and the order of results; the conformance suite (`conformance.rs`) runs the same
//! checks against this store, SQLite and PostgreSQL. Cloning a `MemoryState` shares the same
//! tables, so two roles can hold one store. Snapshots and plans are kept as values (clones).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use sluice_core::interval::{Interval, IntervalSet, Timestamp};
use sluice_core::names::{EnvironmentName, PlanId, SnapshotId, TaskId};
use sluice_core::plan::{EnvironmentState, Plan};
use sluice_core::snapshot::Snapshot;

use crate::codec::{lease_expiry, to_stored_count};
use crate::error::StateError;
use crate::store::{
    AuditLog, BreakerStore, DropStore, EnvironmentStore, IntervalStore, LeaseStore, PlanStore, RunStore, SnapshotStore,
    TaskStore,
};
use crate::types::{
    AuditEntry, EnvironmentLease, EnvironmentPromotion, EnvironmentRecord, FinishedTask, IntervalKey, IntervalRecord,
    PlanSummary, RunFinalization, RunId, RunOutcome, RunProgress, RunRecord, RunStart, RunStatus, TaskFailure,
    TaskOutlook,
};

/// The state store in memory. `Clone` shares the tables (they sit behind one `Arc<Mutex<_>>`).
#[derive(Clone, Default)]
pub struct MemoryState {
    tables: Arc<Mutex<MemoryTables>>,
}

impl std::fmt::Debug for MemoryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryState").finish_non_exhaustive()
    }
}

impl MemoryState {
    /// An empty store: no snapshots, environments, plans, runs or intervals.
    pub fn new() -> MemoryState {
        MemoryState::default()
    }

    /// Takes the one lock. A poisoned lock means a call panicked halfway through a change, so
    /// the tables cannot be trusted any more: every later call fails with `Corrupt`.
    fn lock_tables(&self) -> Result<MutexGuard<'_, MemoryTables>, StateError> {
        self.tables
            .lock()
            .map_err(|_| StateError::corrupt("memory state", "a call panicked while it held the state lock"))
    }
}

/// Every table of the store. Methods that change something check first and write last, so a
/// method returning an error has changed nothing.
#[derive(Default)]
struct MemoryTables {
    /// `sluice_snapshots`: by id.
    snapshots: BTreeMap<SnapshotId, Snapshot>,
    /// `sluice_plans`: by id, each with the order it was stored in.
    plans: BTreeMap<PlanId, StoredPlan>,
    next_plan_sequence: u64,
    /// `sluice_environments` and `sluice_environment_snapshots`: by name.
    environments: BTreeMap<EnvironmentName, StoredEnvironment>,
    /// `sluice_leases`: by environment.
    leases: BTreeMap<EnvironmentName, EnvironmentLease>,
    /// `sluice_runs` (with `sluice_tasks_done` and `sluice_task_failures` inside each run), in
    /// the order they were begun; runs are never deleted, so a position stays valid.
    runs: Vec<StoredRun>,
    /// Where each run sits in `runs`.
    run_positions: BTreeMap<RunId, usize>,
    /// `sluice_intervals`: the compacted ranges of each (model, version).
    intervals: BTreeMap<IntervalKey, IntervalSet>,
    /// `sluice_tables_being_dropped`: the janitor's tombstones.
    tables_being_dropped: BTreeSet<IntervalKey>,
    /// `sluice_breakers`: the reason each tripped breaker was tripped for.
    breakers: BTreeMap<PlanId, String>,
    /// `sluice_audit_log`, oldest first.
    audit_entries: Vec<AuditEntry>,
}

struct StoredPlan {
    /// Breaks ties between plans created at the same time: the later stored is listed first.
    sequence: u64,
    plan: Plan,
}

/// One generation (current or previous) of an environment: the plan it shows and the ids of
/// its snapshots, in order. Snapshot bodies are read from the snapshot table.
struct StoredGeneration {
    plan_id: Option<PlanId>,
    snapshot_ids: Vec<SnapshotId>,
}

struct StoredEnvironment {
    current: StoredGeneration,
    previous: Option<StoredGeneration>,
    expires_at: Option<Timestamp>,
    updated_at: Timestamp,
}

struct StoredRun {
    record: RunRecord,
    done_tasks: BTreeSet<TaskId>,
    /// In the order first recorded; a repeated failure of a task replaces its entry in place.
    failures: Vec<TaskFailure>,
}

fn run_not_found(id: &RunId) -> StateError {
    StateError::not_found(format!("run {id}"))
}

fn lease_held_error(lease: &EnvironmentLease) -> StateError {
    StateError::LeaseHeld {
        environment: lease.environment.clone(),
        holder_plan: lease.plan_id.clone(),
        holder_run: lease.run_id.clone(),
        expires_at: lease.expires_at,
    }
}

/// Refuses an interval that ends before it starts, as SQLite's store does before writing.
fn check_interval_records(records: &[IntervalRecord]) -> Result<(), StateError> {
    for record in records {
        if record.interval.start > record.interval.end {
            return Err(StateError::Invalid {
                reason: format!("interval {} of {} ends before it starts", record.interval, record.name),
            });
        }
    }
    Ok(())
}

/// Refuses an audit entry whose counters do not fit the stored 64-bit signed columns, as
/// SQLite's store does before writing.
fn check_audit_entry(entry: &AuditEntry) -> Result<(), StateError> {
    to_stored_count(entry.intervals, "intervals")?;
    to_stored_count(entry.models, "models")?;
    to_stored_count(entry.retries, "retries")?;
    Ok(())
}

/// The audit row of a run that `begin_run` of `new_run` aborts at `now`.
fn superseded_audit(run: &RunRecord, new_run: &RunId, now: Timestamp) -> AuditEntry {
    AuditEntry {
        plan_id: run.plan_id.clone(),
        run_id: run.id.clone(),
        environment: run.environment.clone(),
        user: run.user.clone(),
        started_at: run.started_at,
        finished_at: now,
        intervals: run.intervals_done,
        models: 0,
        retries: run.retries,
        outcome: format!("aborted: superseded by run {new_run}"),
    }
}

/// `current + gained`, refused when the sum no longer fits the stored 64-bit signed counter.
fn add_counter(current: u64, gained: u64, what: &str) -> Result<u64, StateError> {
    to_stored_count(gained, what)?;
    let sum = current
        .checked_add(gained)
        .ok_or_else(|| StateError::Invalid { reason: format!("{what} overflows its 64-bit counter") })?;
    to_stored_count(sum, what)?;
    Ok(sum)
}

/// A run's counters after adding `progress`, or the error that refuses the addition.
fn progressed_counters(record: &RunRecord, progress: RunProgress) -> Result<RunProgress, StateError> {
    Ok(RunProgress {
        tasks_done: add_counter(record.tasks_done, progress.tasks_done, "tasks_done")?,
        intervals_done: add_counter(record.intervals_done, progress.intervals_done, "intervals_done")?,
        retries: add_counter(record.retries, progress.retries, "retries")?,
    })
}

/// Ends a running run with `outcome`.
fn record_outcome(record: &mut RunRecord, outcome: &RunOutcome) {
    record.status = outcome.status;
    record.error = outcome.error.clone();
    record.finished_at = Some(outcome.finished_at);
}

fn set_counters(record: &mut RunRecord, counters: RunProgress) {
    record.tasks_done = counters.tasks_done;
    record.intervals_done = counters.intervals_done;
    record.retries = counters.retries;
}

impl MemoryTables {
    fn insert_snapshots_if_absent(&mut self, snapshots: &[Snapshot]) {
        for snapshot in snapshots {
            if !self.snapshots.contains_key(&snapshot.id) {
                self.snapshots.insert(snapshot.id.clone(), snapshot.clone());
            }
        }
    }

    fn insert_plan_if_absent(&mut self, plan: &Plan) {
        if self.plans.contains_key(&plan.id) {
            return;
        }
        let sequence = self.next_plan_sequence;
        self.next_plan_sequence += 1;
        self.plans.insert(plan.id.clone(), StoredPlan { sequence, plan: plan.clone() });
    }

    /// `TableBeingDropped` if a non-empty interval of `records` is for a table with a tombstone
    /// (empty intervals are never stored, so they are not checked, as in SQLite).
    fn check_not_being_dropped(&self, records: &[IntervalRecord]) -> Result<(), StateError> {
        let mut claimed = BTreeSet::new();
        for record in records {
            if record.interval.is_empty() {
                continue;
            }
            let key = (record.name.clone(), record.version.clone());
            if self.tables_being_dropped.contains(&key) {
                claimed.insert(key);
            }
        }
        match StateError::table_being_dropped(&claimed) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Merges intervals into the stored ranges of their keys; the records were checked already.
    fn insert_intervals(&mut self, records: &[IntervalRecord]) {
        for record in records {
            if record.interval.is_empty() {
                continue;
            }
            let key = (record.name.clone(), record.version.clone());
            self.intervals.entry(key).or_default().insert(record.interval);
        }
    }

    fn run(&self, id: &RunId) -> Option<&StoredRun> {
        self.run_positions.get(id).and_then(|&position| self.runs.get(position))
    }

    fn run_mut(&mut self, id: &RunId) -> Option<&mut StoredRun> {
        let position = *self.run_positions.get(id)?;
        self.runs.get_mut(position)
    }

    /// A stored generation with its snapshot bodies read from the snapshot table.
    fn environment_state(
        &self,
        name: &EnvironmentName,
        generation: &StoredGeneration,
    ) -> Result<EnvironmentState, StateError> {
        let mut snapshots = Vec::with_capacity(generation.snapshot_ids.len());
        for id in &generation.snapshot_ids {
            // Impossible while `delete_snapshots` refuses snapshots an environment shows.
            let Some(snapshot) = self.snapshots.get(id) else {
                return Err(StateError::corrupt(format!("environment {name}"), format!("snapshot {id} is missing")));
            };
            snapshots.push(snapshot.clone());
        }
        Ok(EnvironmentState { name: name.clone(), plan_id: generation.plan_id.clone(), snapshots })
    }

    fn environment_record(
        &self,
        name: &EnvironmentName,
        environment: &StoredEnvironment,
    ) -> Result<EnvironmentRecord, StateError> {
        let previous = match &environment.previous {
            Some(generation) => Some(self.environment_state(name, generation)?),
            None => None,
        };
        Ok(EnvironmentRecord {
            state: self.environment_state(name, &environment.current)?,
            previous,
            expires_at: environment.expires_at,
            updated_at: environment.updated_at,
        })
    }

    // --- snapshots ----------------------------------------------------------------------------

    fn get_snapshots(&self, ids: &[SnapshotId]) -> BTreeMap<SnapshotId, Snapshot> {
        let mut found = BTreeMap::new();
        for id in ids {
            if let Some(snapshot) = self.snapshots.get(id) {
                found.insert(snapshot.id.clone(), snapshot.clone());
            }
        }
        found
    }

    fn delete_snapshots(&mut self, ids: &[SnapshotId]) -> Result<(), StateError> {
        let unique_ids: BTreeSet<&SnapshotId> = ids.iter().collect();
        // The first (snapshot id, environment name) in use refuses the whole call.
        for id in &unique_ids {
            for (name, environment) in &self.environments {
                let in_current = environment.current.snapshot_ids.contains(id);
                let in_previous =
                    environment.previous.as_ref().is_some_and(|previous| previous.snapshot_ids.contains(id));
                if in_current || in_previous {
                    return Err(StateError::SnapshotInUse { snapshot: (*id).clone(), environment: name.clone() });
                }
            }
        }
        for id in unique_ids {
            self.snapshots.remove(id);
        }
        Ok(())
    }

    // --- environments -------------------------------------------------------------------------

    fn list_environments(&self) -> Result<Vec<EnvironmentRecord>, StateError> {
        let mut records = Vec::with_capacity(self.environments.len());
        for (name, environment) in &self.environments {
            records.push(self.environment_record(name, environment)?);
        }
        Ok(records)
    }

    fn promote_environment(&mut self, promotion: EnvironmentPromotion<'_>) -> Result<(), StateError> {
        self.check_promotion(&promotion)?;
        self.swap_environment(&promotion);
        Ok(())
    }

    /// The compare-and-swap's check: `StaleEnvironment` unless the environment shows
    /// `promotion.expected_plan` (`None`: no plan, or no environment).
    fn check_promotion(&self, promotion: &EnvironmentPromotion<'_>) -> Result<(), StateError> {
        let name = &promotion.state.name;
        let actual = self.environments.get(name).and_then(|environment| environment.current.plan_id.clone());
        if promotion.expected_plan != actual.as_ref() {
            return Err(StateError::StaleEnvironment {
                environment: name.clone(),
                expected: promotion.expected_plan.cloned(),
                actual,
            });
        }
        Ok(())
    }

    /// Whether the environment exists and shows `plan` already.
    fn environment_shows(&self, name: &EnvironmentName, plan: Option<&PlanId>) -> bool {
        self.environments.get(name).is_some_and(|environment| environment.current.plan_id.as_ref() == plan)
    }

    /// The compare-and-swap's write, once [`MemoryTables::check_promotion`] passed: the state
    /// shown becomes `previous`, the new state's snapshots are inserted if absent.
    fn swap_environment(&mut self, promotion: &EnvironmentPromotion<'_>) {
        let state = promotion.state;
        let name = &state.name;
        self.insert_snapshots_if_absent(&state.snapshots);
        let current = StoredGeneration {
            plan_id: state.plan_id.clone(),
            snapshot_ids: state.snapshots.iter().map(|snapshot| snapshot.id.clone()).collect(),
        };
        match self.environments.get_mut(name) {
            Some(environment) => {
                let replaced = std::mem::replace(&mut environment.current, current);
                environment.previous = Some(replaced);
                environment.expires_at = promotion.expires_at;
                environment.updated_at = promotion.now;
            }
            None => {
                let environment = StoredEnvironment {
                    current,
                    previous: None,
                    expires_at: promotion.expires_at,
                    updated_at: promotion.now,
                };
                self.environments.insert(name.clone(), environment);
            }
        }
    }

    // --- leases -------------------------------------------------------------------------------

    fn renew_lease(
        &mut self,
        environment: &EnvironmentName,
        run_id: &RunId,
        ttl_seconds: i64,
        now: Timestamp,
    ) -> Result<EnvironmentLease, StateError> {
        let expires_at = lease_expiry(now, ttl_seconds)?;
        let Some(lease) = self.leases.get_mut(environment) else {
            return Err(StateError::not_found(format!("lease of environment {environment}")));
        };
        if &lease.run_id != run_id {
            return Err(lease_held_error(lease));
        }
        lease.expires_at = expires_at;
        Ok(lease.clone())
    }

    fn release_lease(&mut self, environment: &EnvironmentName, run_id: &RunId) {
        let held_by_run = self.leases.get(environment).is_some_and(|lease| &lease.run_id == run_id);
        if held_by_run {
            self.leases.remove(environment);
        }
    }

    // --- intervals ----------------------------------------------------------------------------

    fn get_intervals(&self, keys: &[IntervalKey]) -> BTreeMap<IntervalKey, IntervalSet> {
        let mut found = BTreeMap::new();
        for key in keys {
            let recorded = self.intervals.get(key).cloned().unwrap_or_default();
            found.insert(key.clone(), recorded);
        }
        found
    }

    fn remove_intervals(&mut self, keys: &[IntervalKey]) {
        for key in keys {
            self.intervals.remove(key);
        }
    }

    // --- plans --------------------------------------------------------------------------------

    fn list_plans(&self, environment: &EnvironmentName) -> Vec<PlanSummary> {
        let mut stored: Vec<&StoredPlan> =
            self.plans.values().filter(|stored| &stored.plan.environment == environment).collect();
        // Newest first: by creation time, then by the order they were stored.
        stored.sort_by_key(|stored| std::cmp::Reverse((stored.plan.created_at, stored.sequence)));
        let mut summaries = Vec::with_capacity(stored.len());
        for stored in stored {
            summaries.push(PlanSummary {
                id: stored.plan.id.clone(),
                environment: stored.plan.environment.clone(),
                previous_plan_id: stored.plan.previous_plan_id.clone(),
                created_at: stored.plan.created_at,
            });
        }
        summaries
    }

    // --- runs ---------------------------------------------------------------------------------

    fn begin_run(&mut self, start: RunStart<'_>) -> Result<RunRecord, StateError> {
        let plan = start.plan;
        let environment = &plan.environment;
        let expires_at = lease_expiry(start.now, start.lease_ttl_seconds)?;

        // Checks, in SQLite's order: stale environment, a table being dropped, held lease,
        // existing run.
        let actual = self.environments.get(environment).and_then(|stored| stored.current.plan_id.clone());
        if plan.previous_plan_id != actual {
            return Err(StateError::StaleEnvironment {
                environment: environment.clone(),
                expected: plan.previous_plan_id.clone(),
                actual,
            });
        }
        let mut claimed = BTreeSet::new();
        for planned in &plan.snapshots {
            let key = (planned.snapshot.name.clone(), planned.snapshot.version.clone());
            if self.tables_being_dropped.contains(&key) {
                claimed.insert(key);
            }
        }
        if let Some(error) = StateError::table_being_dropped(&claimed) {
            return Err(error);
        }
        if let Some(lease) = self.leases.get(environment) {
            let can_take_over = lease.expires_at <= start.now || lease.plan_id == plan.id;
            if !can_take_over {
                return Err(lease_held_error(lease));
            }
        }
        if let Some(promoting) = self.runs.iter().map(|stored| &stored.record).find(|record| {
            &record.environment == environment && record.status == RunStatus::Running && record.promoting
        }) {
            return Err(StateError::RunPromoting { run: promoting.id.clone(), environment: environment.clone() });
        }
        if self.run_positions.contains_key(start.run_id) {
            return Err(StateError::RunExists { run: start.run_id.clone() });
        }

        // Writes: nothing below can fail.
        self.insert_plan_if_absent(plan);
        self.insert_snapshots_if_absent(start.snapshots);
        self.leases.insert(
            environment.clone(),
            EnvironmentLease {
                environment: environment.clone(),
                plan_id: plan.id.clone(),
                run_id: start.run_id.clone(),
                expires_at,
            },
        );
        // A restatement forgets its intervals when the plan first runs, never on a resume.
        if !self.runs.iter().any(|stored| stored.record.plan_id == plan.id) {
            for restatement in &plan.restatements {
                let key = (restatement.name.clone(), restatement.version.clone());
                if let Some(set) = self.intervals.get_mut(&key) {
                    set.remove(restatement.interval);
                }
            }
        }
        // Every superseded run is aborted with its audit row (oldest run first); stored counters
        // fit their columns, so the audit rows need no check.
        let mut superseded_runs = 0_usize;
        for stored in &mut self.runs {
            let record = &mut stored.record;
            if &record.environment == environment && record.status == RunStatus::Running {
                record.status = RunStatus::Aborted;
                record.finished_at = Some(start.now);
                record.error = Some(format!("lease taken over by run {}", start.run_id));
                self.audit_entries.push(superseded_audit(record, start.run_id, start.now));
                superseded_runs += 1;
            }
        }
        if superseded_runs > 0 {
            tracing::info!(environment = %environment, run_id = %start.run_id, "took over the lease of an unfinished run");
        }
        // A resume closes the breaker only now that it has taken over the old run.
        self.breakers.remove(&plan.id);
        let record = RunRecord {
            id: start.run_id.clone(),
            plan_id: plan.id.clone(),
            environment: environment.clone(),
            status: RunStatus::Running,
            started_at: start.now,
            finished_at: None,
            intervals_done: 0,
            tasks_done: 0,
            retries: 0,
            error: None,
            user: start.user.to_string(),
            promoting: false,
        };
        self.run_positions.insert(start.run_id.clone(), self.runs.len());
        self.runs.push(StoredRun { record: record.clone(), done_tasks: BTreeSet::new(), failures: Vec::new() });
        Ok(record)
    }

    fn runs_of_plan(&self, plan_id: &PlanId) -> Vec<RunRecord> {
        let mut runs = Vec::new();
        for stored in &self.runs {
            if &stored.record.plan_id == plan_id {
                runs.push(stored.record.clone());
            }
        }
        runs
    }

    fn running_runs(&self) -> Vec<RunRecord> {
        let mut runs = Vec::new();
        for stored in &self.runs {
            if stored.record.status == RunStatus::Running {
                runs.push(stored.record.clone());
            }
        }
        runs
    }

    fn latest_run(&self, plan_id: &PlanId) -> Option<RunRecord> {
        self.runs.iter().rev().find(|stored| &stored.record.plan_id == plan_id).map(|stored| stored.record.clone())
    }

    fn finish_run(&mut self, id: &RunId, outcome: RunOutcome) -> Result<(), StateError> {
        if outcome.status == RunStatus::Running {
            return Err(StateError::Invalid { reason: format!("run {id} cannot finish as running") });
        }
        let Some(stored) = self.run_mut(id) else {
            return Err(run_not_found(id));
        };
        let record = &mut stored.record;
        if record.status == RunStatus::Running {
            record_outcome(record, &outcome);
            return Ok(());
        }
        if record.status == outcome.status {
            return Ok(());
        }
        Err(StateError::RunFinished { run: id.clone(), status: record.status })
    }

    fn finalize_run(&mut self, finalization: RunFinalization<'_>) -> Result<RunRecord, StateError> {
        let id = finalization.run_id;
        let outcome = finalization.outcome;
        if outcome.status == RunStatus::Running {
            return Err(StateError::Invalid { reason: format!("run {id} cannot finish as running") });
        }
        let Some(stored) = self.run(id) else {
            return Err(run_not_found(id));
        };
        if stored.record.status != RunStatus::Running
            || (stored.record.promoting && outcome.status != RunStatus::Succeeded)
        {
            // Finished already: the first outcome wins, nothing is written. A promoting run's
            // views are moving: it ends promoted, whatever was decided before that began.
            return Ok(stored.record.clone());
        }
        let environment = stored.record.environment.clone();
        // An environment showing the plan already was promoted by an earlier attempt.
        let promotion = finalization
            .promotion
            .filter(|promotion| !self.environment_shows(&promotion.state.name, promotion.state.plan_id.as_ref()));
        if let Some(promotion) = &promotion {
            self.check_promotion(promotion)?;
        }
        check_audit_entry(finalization.audit)?;

        // Writes: the run first (found above, so this lookup cannot fail), then the rest.
        let Some(stored) = self.run_mut(id) else {
            return Err(run_not_found(id));
        };
        record_outcome(&mut stored.record, outcome);
        let finished = stored.record.clone();
        if let Some(promotion) = &promotion {
            self.swap_environment(promotion);
        }
        self.release_lease(&environment, id);
        self.audit_entries.push(finalization.audit.clone());
        Ok(finished)
    }

    fn add_run_progress(&mut self, id: &RunId, progress: RunProgress) -> Result<(), StateError> {
        // As in SQLite, counters too large to store are refused before the run is looked up.
        to_stored_count(progress.tasks_done, "tasks_done")?;
        to_stored_count(progress.intervals_done, "intervals_done")?;
        to_stored_count(progress.retries, "retries")?;
        let Some(stored) = self.run_mut(id) else {
            return Err(run_not_found(id));
        };
        let counters = progressed_counters(&stored.record, progress)?;
        set_counters(&mut stored.record, counters);
        Ok(())
    }

    // --- tasks --------------------------------------------------------------------------------

    fn record_task_done(&mut self, run_id: &RunId, tasks: &[TaskId]) -> Result<(), StateError> {
        if tasks.is_empty() {
            return Ok(());
        }
        let Some(stored) = self.run_mut(run_id) else {
            return Err(run_not_found(run_id));
        };
        stored.done_tasks.extend(tasks.iter().copied());
        Ok(())
    }

    fn finish_tasks(&mut self, finished: &[FinishedTask]) -> Result<(), StateError> {
        if finished.is_empty() {
            return Ok(());
        }
        let records: Vec<IntervalRecord> = finished.iter().filter_map(|task| task.interval.clone()).collect();
        check_interval_records(&records)?;
        self.check_not_being_dropped(&records)?;
        // Every run must exist; the first missing one, by id, is reported.
        let run_ids: BTreeSet<&RunId> = finished.iter().map(|task| &task.run_id).collect();
        for run_id in &run_ids {
            if !self.run_positions.contains_key(*run_id) {
                return Err(run_not_found(run_id));
            }
        }
        // What each run gains: its tasks not done before (a task listed twice counts once,
        // with the numbers of its first listing).
        let mut newly_done: BTreeSet<(&RunId, TaskId)> = BTreeSet::new();
        let mut gained: BTreeMap<&RunId, RunProgress> = BTreeMap::new();
        for task in finished {
            let done_before = self.run(&task.run_id).is_some_and(|stored| stored.done_tasks.contains(&task.task_id));
            if done_before || !newly_done.insert((&task.run_id, task.task_id)) {
                continue;
            }
            let progress = gained.entry(&task.run_id).or_default();
            // Saturating: a sum beyond a stored counter is refused below, never wrapped.
            progress.tasks_done = progress.tasks_done.saturating_add(1);
            progress.intervals_done = progress.intervals_done.saturating_add(task.intervals);
            progress.retries = progress.retries.saturating_add(task.retries);
        }
        let mut new_counters: BTreeMap<&RunId, RunProgress> = BTreeMap::new();
        for (run_id, progress) in &gained {
            let Some(stored) = self.run(run_id) else {
                return Err(run_not_found(run_id));
            };
            new_counters.insert(*run_id, progressed_counters(&stored.record, *progress)?);
        }

        // Writes: nothing below can fail.
        self.insert_intervals(&records);
        for (run_id, task_id) in newly_done {
            if let Some(stored) = self.run_mut(run_id) {
                stored.done_tasks.insert(task_id);
            }
        }
        for (run_id, counters) in new_counters {
            if let Some(stored) = self.run_mut(run_id) {
                set_counters(&mut stored.record, counters);
            }
        }
        Ok(())
    }

    fn done_tasks(&self, run_id: &RunId) -> BTreeSet<TaskId> {
        self.run(run_id).map(|stored| stored.done_tasks.clone()).unwrap_or_default()
    }

    fn done_tasks_of_plan(&self, plan_id: &PlanId) -> BTreeSet<TaskId> {
        let mut done = BTreeSet::new();
        for stored in &self.runs {
            if &stored.record.plan_id == plan_id {
                done.extend(stored.done_tasks.iter().copied());
            }
        }
        done
    }

    fn record_task_failure(&mut self, run_id: &RunId, failure: &TaskFailure) -> Result<(), StateError> {
        let Some(stored) = self.run_mut(run_id) else {
            return Err(run_not_found(run_id));
        };
        match stored.failures.iter_mut().find(|recorded| recorded.task_id == failure.task_id) {
            Some(recorded) => *recorded = failure.clone(),
            None => stored.failures.push(failure.clone()),
        }
        Ok(())
    }

    fn task_outlook(&self, run_id: &RunId, plan_id: &PlanId, key: &IntervalKey, interval: Interval) -> TaskOutlook {
        // A key with nothing recorded reads as the empty set, as `get_intervals` returns it
        // (which covers an empty interval).
        let recorded = match self.intervals.get(key) {
            Some(set) => set.covers(interval),
            None => IntervalSet::new().covers(interval),
        };
        TaskOutlook {
            run: self.run(run_id).map(|stored| stored.record.status),
            breaker: self.breakers.get(plan_id).cloned(),
            recorded,
        }
    }

    // --- drops --------------------------------------------------------------------------------

    fn claim_tables_for_drop(
        &mut self,
        tables: &[IntervalKey],
        running_seen: &[RunId],
        environments_seen: &BTreeMap<EnvironmentName, Option<PlanId>>,
    ) -> Result<(), StateError> {
        let running: BTreeSet<&RunId> = self
            .runs
            .iter()
            .filter(|stored| stored.record.status == RunStatus::Running)
            .map(|stored| &stored.record.id)
            .collect();
        let seen: BTreeSet<&RunId> = running_seen.iter().collect();
        if running != seen {
            return Err(StateError::Contention { what: "the running runs".to_string() });
        }
        for (name, environment) in &self.environments {
            if environments_seen.get(name) != Some(&environment.current.plan_id) {
                return Err(StateError::Contention { what: format!("environment {name}") });
            }
        }
        for key in tables {
            self.intervals.remove(key);
            self.tables_being_dropped.insert(key.clone());
        }
        Ok(())
    }

    fn release_dropped_tables(&mut self, tables: &[IntervalKey]) {
        for key in tables {
            self.tables_being_dropped.remove(key);
        }
    }

    // --- audit --------------------------------------------------------------------------------

    fn append_audit(&mut self, entry: &AuditEntry) -> Result<(), StateError> {
        check_audit_entry(entry)?;
        self.audit_entries.push(entry.clone());
        Ok(())
    }

    fn list_audit(&self, limit: u32) -> Vec<AuditEntry> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        self.audit_entries.iter().rev().take(limit).cloned().collect()
    }
}

#[async_trait]
impl SnapshotStore for MemoryState {
    async fn put_snapshots(&self, snapshots: &[Snapshot]) -> Result<(), StateError> {
        self.lock_tables()?.insert_snapshots_if_absent(snapshots);
        Ok(())
    }

    async fn get_snapshots(&self, ids: &[SnapshotId]) -> Result<BTreeMap<SnapshotId, Snapshot>, StateError> {
        Ok(self.lock_tables()?.get_snapshots(ids))
    }

    async fn all_snapshots(&self) -> Result<Vec<Snapshot>, StateError> {
        Ok(self.lock_tables()?.snapshots.values().cloned().collect())
    }

    async fn delete_snapshots(&self, ids: &[SnapshotId]) -> Result<(), StateError> {
        self.lock_tables()?.delete_snapshots(ids)
    }
}

#[async_trait]
impl EnvironmentStore for MemoryState {
    async fn get_environment(&self, name: &EnvironmentName) -> Result<Option<EnvironmentRecord>, StateError> {
        let tables = self.lock_tables()?;
        match tables.environments.get(name) {
            Some(environment) => Ok(Some(tables.environment_record(name, environment)?)),
            None => Ok(None),
        }
    }

    async fn list_environments(&self) -> Result<Vec<EnvironmentRecord>, StateError> {
        self.lock_tables()?.list_environments()
    }

    async fn promote_environment(&self, promotion: EnvironmentPromotion<'_>) -> Result<(), StateError> {
        self.lock_tables()?.promote_environment(promotion)
    }

    async fn delete_environment(&self, name: &EnvironmentName) -> Result<(), StateError> {
        self.lock_tables()?.environments.remove(name);
        Ok(())
    }
}

#[async_trait]
impl LeaseStore for MemoryState {
    async fn get_lease(&self, environment: &EnvironmentName) -> Result<Option<EnvironmentLease>, StateError> {
        Ok(self.lock_tables()?.leases.get(environment).cloned())
    }

    async fn renew_lease(
        &self,
        environment: &EnvironmentName,
        run_id: &RunId,
        ttl_seconds: i64,
        now: Timestamp,
    ) -> Result<EnvironmentLease, StateError> {
        self.lock_tables()?.renew_lease(environment, run_id, ttl_seconds, now)
    }

    async fn release_lease(&self, environment: &EnvironmentName, run_id: &RunId) -> Result<(), StateError> {
        self.lock_tables()?.release_lease(environment, run_id);
        Ok(())
    }
}

#[async_trait]
impl IntervalStore for MemoryState {
    async fn record_intervals(&self, records: &[IntervalRecord]) -> Result<(), StateError> {
        check_interval_records(records)?;
        let mut tables = self.lock_tables()?;
        tables.check_not_being_dropped(records)?;
        tables.insert_intervals(records);
        Ok(())
    }

    async fn get_intervals(&self, keys: &[IntervalKey]) -> Result<BTreeMap<IntervalKey, IntervalSet>, StateError> {
        Ok(self.lock_tables()?.get_intervals(keys))
    }

    async fn remove_intervals(&self, keys: &[IntervalKey]) -> Result<(), StateError> {
        self.lock_tables()?.remove_intervals(keys);
        Ok(())
    }
}

#[async_trait]
impl PlanStore for MemoryState {
    async fn put_plan(&self, plan: &Plan) -> Result<(), StateError> {
        self.lock_tables()?.insert_plan_if_absent(plan);
        Ok(())
    }

    async fn get_plan(&self, id: &PlanId) -> Result<Option<Plan>, StateError> {
        Ok(self.lock_tables()?.plans.get(id).map(|stored| stored.plan.clone()))
    }

    async fn list_plans(&self, environment: &EnvironmentName) -> Result<Vec<PlanSummary>, StateError> {
        Ok(self.lock_tables()?.list_plans(environment))
    }
}

#[async_trait]
impl RunStore for MemoryState {
    async fn begin_run(&self, start: RunStart<'_>) -> Result<RunRecord, StateError> {
        self.lock_tables()?.begin_run(start)
    }

    async fn get_run(&self, id: &RunId) -> Result<Option<RunRecord>, StateError> {
        Ok(self.lock_tables()?.run(id).map(|stored| stored.record.clone()))
    }

    async fn runs_of_plan(&self, plan_id: &PlanId) -> Result<Vec<RunRecord>, StateError> {
        Ok(self.lock_tables()?.runs_of_plan(plan_id))
    }

    async fn running_runs(&self) -> Result<Vec<RunRecord>, StateError> {
        Ok(self.lock_tables()?.running_runs())
    }

    async fn latest_run(&self, plan_id: &PlanId) -> Result<Option<RunRecord>, StateError> {
        Ok(self.lock_tables()?.latest_run(plan_id))
    }

    async fn finish_run(&self, id: &RunId, outcome: RunOutcome) -> Result<(), StateError> {
        self.lock_tables()?.finish_run(id, outcome)
    }

    async fn finalize_run(&self, finalization: RunFinalization<'_>) -> Result<RunRecord, StateError> {
        self.lock_tables()?.finalize_run(finalization)
    }

    async fn begin_promotion(&self, run_id: &RunId, plan_id: &PlanId) -> Result<bool, StateError> {
        let mut tables = self.lock_tables()?;
        let tripped = tables.breakers.contains_key(plan_id);
        let Some(stored) = tables.run_mut(run_id) else {
            return Ok(false);
        };
        let record = &mut stored.record;
        if record.status != RunStatus::Running || (tripped && !record.promoting) {
            return Ok(false);
        }
        record.promoting = true;
        Ok(true)
    }

    async fn add_run_progress(&self, id: &RunId, progress: RunProgress) -> Result<(), StateError> {
        self.lock_tables()?.add_run_progress(id, progress)
    }
}

#[async_trait]
impl TaskStore for MemoryState {
    async fn record_task_done(&self, run_id: &RunId, tasks: &[TaskId]) -> Result<(), StateError> {
        self.lock_tables()?.record_task_done(run_id, tasks)
    }

    async fn finish_tasks(&self, finished: &[FinishedTask]) -> Result<(), StateError> {
        self.lock_tables()?.finish_tasks(finished)
    }

    async fn done_tasks(&self, run_id: &RunId) -> Result<BTreeSet<TaskId>, StateError> {
        Ok(self.lock_tables()?.done_tasks(run_id))
    }

    async fn done_tasks_of_plan(&self, plan_id: &PlanId) -> Result<BTreeSet<TaskId>, StateError> {
        Ok(self.lock_tables()?.done_tasks_of_plan(plan_id))
    }

    async fn record_task_failure(&self, run_id: &RunId, failure: &TaskFailure) -> Result<(), StateError> {
        self.lock_tables()?.record_task_failure(run_id, failure)
    }

    async fn task_failures(&self, run_id: &RunId) -> Result<Vec<TaskFailure>, StateError> {
        Ok(self.lock_tables()?.run(run_id).map(|stored| stored.failures.clone()).unwrap_or_default())
    }

    async fn task_outlook(
        &self,
        run_id: &RunId,
        plan_id: &PlanId,
        key: &IntervalKey,
        interval: Interval,
    ) -> Result<TaskOutlook, StateError> {
        Ok(self.lock_tables()?.task_outlook(run_id, plan_id, key, interval))
    }
}

#[async_trait]
impl DropStore for MemoryState {
    async fn claim_tables_for_drop(
        &self,
        tables: &[IntervalKey],
        running_seen: &[RunId],
        environments_seen: &BTreeMap<EnvironmentName, Option<PlanId>>,
    ) -> Result<(), StateError> {
        self.lock_tables()?.claim_tables_for_drop(tables, running_seen, environments_seen)
    }

    async fn tables_being_dropped(&self) -> Result<Vec<IntervalKey>, StateError> {
        Ok(self.lock_tables()?.tables_being_dropped.iter().cloned().collect())
    }

    async fn release_dropped_tables(&self, tables: &[IntervalKey]) -> Result<(), StateError> {
        self.lock_tables()?.release_dropped_tables(tables);
        Ok(())
    }
}

#[async_trait]
impl BreakerStore for MemoryState {
    async fn trip_breaker(&self, plan_id: &PlanId, reason: &str) -> Result<(), StateError> {
        self.lock_tables()?.breakers.entry(plan_id.clone()).or_insert_with(|| reason.to_string());
        Ok(())
    }

    async fn breaker(&self, plan_id: &PlanId) -> Result<Option<String>, StateError> {
        Ok(self.lock_tables()?.breakers.get(plan_id).cloned())
    }

    async fn reset_breaker(&self, plan_id: &PlanId) -> Result<(), StateError> {
        self.lock_tables()?.breakers.remove(plan_id);
        Ok(())
    }
}

#[async_trait]
impl AuditLog for MemoryState {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StateError> {
        self.lock_tables()?.append_audit(entry)
    }

    async fn list_audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StateError> {
        Ok(self.lock_tables()?.list_audit(limit))
    }
}

#[cfg(test)]
impl MemoryState {
    /// Stored interval ranges over every key: what SQLite's `sluice_intervals` row count is.
    pub(crate) fn interval_rows_for_tests(&self) -> i64 {
        let tables = self.tables.lock().unwrap();
        let ranges: usize = tables.intervals.values().map(|set| set.ranges().len()).sum();
        i64::try_from(ranges).unwrap()
    }

    /// Stored runs: what SQLite's `sluice_runs` row count is.
    pub(crate) fn run_rows_for_tests(&self) -> i64 {
        i64::try_from(self.tables.lock().unwrap().runs.len()).unwrap()
    }

    /// What SQLite's raw interval rows are here: the store keeps merged ranges only, so the
    /// ranges are merged into the key's set.
    pub(crate) fn insert_interval_rows_for_tests(&self, key: &IntervalKey, ranges: &[Interval]) {
        let mut tables = self.tables.lock().unwrap();
        let set = tables.intervals.entry(key.clone()).or_default();
        for range in ranges {
            set.insert(*range);
        }
    }
}
