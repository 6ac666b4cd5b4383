//! The plan: a project against one environment's snapshots. Which models are added, removed,
//! directly or indirectly modified (with a category), which version each snapshot writes, the
//! missing intervals to backfill in batches, and the views that change. A plan is a value:
//! printing, storing and applying it are other modules' jobs.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sqlparser::ast::Query;

use crate::cron::{Cron, batch_intervals, missing_intervals};
use crate::dialect::translate;
use crate::interval::{Interval, IntervalSet, TimeParseError, Timestamp};
use crate::model::{Model, ModelKind};
use crate::names::{EnvironmentName, ModelName, PhysicalTable, PlanId, SnapshotId, Version, short_hash};
use crate::project::Project;
use crate::query::{Replacement, only_adds_projections, rewrite_references};
use crate::snapshot::{ChangeCategory, Fingerprint, Snapshot, SnapshotAudit, THIS_MODEL, fingerprint_project};

/// An environment as the state store knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentState {
    pub name: EnvironmentName,
    /// The plan whose snapshots the environment's views show.
    pub plan_id: Option<PlanId>,
    pub snapshots: Vec<Snapshot>,
}

/// What a plan is computed against; every value comes from the caller (core does no I/O).
#[derive(Clone, Copy, Debug)]
pub struct PlanContext<'a> {
    pub environment: &'a EnvironmentName,
    /// The environment's own state; `None` when it does not exist yet.
    pub current: Option<&'a EnvironmentState>,
    /// What changes are computed against: `current` over prod's state (a development
    /// environment holds only the models that differ from prod), or prod's for a new one.
    pub base: Option<&'a EnvironmentState>,
    /// Prod's state, for a development environment: only models whose version differs from
    /// prod's get a view there, as SQLMesh does by default.
    pub prod: Option<&'a EnvironmentState>,
    /// Snapshots the state store already holds, by id, from any environment: a snapshot with
    /// the same fingerprint is reused with its physical table.
    pub known_snapshots: &'a BTreeMap<SnapshotId, Snapshot>,
    /// Intervals recorded per physical table.
    pub recorded_intervals: &'a BTreeMap<(ModelName, Version), IntervalSet>,
    /// The plan's time: intervals end at or before it.
    pub now: Timestamp,
    /// `--forward-only`: every direct change is forward-only.
    pub forward_only: bool,
    /// `--start`/`--end` of a development environment: backfill only inside it.
    pub window: BackfillWindow,
    /// `--skip-backfill`: no table is backfilled (SEED models are still loaded, as in SQLMesh);
    /// new tables are created empty, and new views, at promotion.
    pub skip_backfill: bool,
    /// `--select-model`: the models selected (the project is then `selection::select_models`'s):
    /// only they and their ancestors are backfilled, and a development environment shows only
    /// them and what it showed before at the same snapshot.
    pub selected: Option<&'a BTreeSet<ModelName>>,
}

/// A development plan's backfill window (`plan dev --start S --end E`): every snapshot's
/// backfill is clipped to `[start, end)`, as SQLMesh limits a development environment's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillWindow {
    pub start: Option<Timestamp>,
    /// Exclusive (a date-only `--end` includes its day).
    pub end: Option<Timestamp>,
}

impl BackfillWindow {
    pub fn is_unbounded(&self) -> bool {
        self.start.is_none() && self.end.is_none()
    }

    /// The window of `--start` and `--end` as written (an end without a time includes its day),
    /// refusing what SQLMesh refuses: a window on prod (which would leave gaps in the tables
    /// everyone reads), a start not before the end, an end (as written) after the plan's time.
    pub fn parse(
        start: Option<&str>,
        end: Option<&str>,
        environment: &EnvironmentName,
        now: Timestamp,
    ) -> Result<BackfillWindow, String> {
        let parse = |flag: &str, text: Option<&str>, read: fn(&str) -> Result<Timestamp, TimeParseError>| {
            text.map(|text| read(text).map_err(|error| format!("{flag}: {error}"))).transpose()
        };
        let window = BackfillWindow {
            start: parse("--start", start, Timestamp::parse)?,
            end: parse("--end", end, Timestamp::parse_end)?,
        };
        if window.is_unbounded() {
            return Ok(window);
        }
        if environment.is_prod() {
            return Err(
                "--start and --end limit a development environment's backfill; a prod plan backfills every missing interval"
                    .to_string(),
            );
        }
        if let (Some(start), Some(end)) = (window.start, window.end)
            && start >= end
        {
            return Err(format!("--start {start} is not before --end {end}"));
        }
        if let Some(written) = parse("--end", end, Timestamp::parse)?
            && written > now
        {
            return Err(format!("--end {written} is after the plan's time {now}"));
        }
        Ok(window)
    }
}

/// How a model changed against the base environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Unchanged,
    Added,
    Direct(ChangeCategory),
    /// A parent changed; `breaking` when a parent's table changed, `via` the directly modified ancestors.
    Indirect {
        breaking: bool,
        via: Vec<ModelName>,
    },
}

/// Up to `batch_size` contiguous intervals of one snapshot: one task.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillBatch {
    pub interval: Interval,
    pub interval_count: u32,
}

/// One model's part of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedSnapshot {
    pub snapshot: Snapshot,
    pub change: Change,
    /// The base environment's snapshot of the same model.
    pub previous: Option<Snapshot>,
    /// Missing intervals, merged into ranges.
    pub missing_ranges: Vec<Interval>,
    pub missing_interval_count: u64,
    /// The tasks to run for this snapshot.
    pub batches: Vec<BackfillBatch>,
    /// Indices (into `Plan::snapshots`) of the materialized snapshots this one's tasks wait for.
    pub materialized_parents: Vec<u32>,
    /// Whether the environment shows this model: always in prod; in a development environment
    /// when its version differs from prod's or the environment showed it already (plans stored
    /// before this field: all shown).
    #[serde(default = "shown_by_default")]
    pub promoted: bool,
}

fn shown_by_default() -> bool {
    true
}

/// A change of one view of the environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ViewChange {
    /// Create or replace the view `name` in the environment to read `table`.
    Point { name: ModelName, table: PhysicalTable },
    /// Drop the view of a removed model.
    Drop { name: ModelName },
}

/// `before_all` / `after_all` of config.yaml as the plan runs them on `gateway` (the default
/// one): before its first task (the coordinator, before the run begins; every apply of the plan)
/// and once its environment is promoted (the promoter that finalizes the run, once).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentStatements {
    pub gateway: String,
    pub before_all: Vec<String>,
    pub after_all: Vec<String>,
}

impl EnvironmentStatements {
    pub fn of(config: &crate::config::Config) -> EnvironmentStatements {
        EnvironmentStatements {
            gateway: config.default_gateway.clone(),
            before_all: config.before_all.clone(),
            after_all: config.after_all.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.before_all.is_empty() && self.after_all.is_empty()
    }
}

/// Recorded intervals of one physical table that a restatement plan forgets when its first run
/// begins (in the run's own state transaction), so that its tasks run them again. Resuming the
/// plan forgets nothing more: what its earlier runs wrote again stays recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restatement {
    pub name: ModelName,
    pub version: Version,
    pub interval: Interval,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub id: PlanId,
    pub environment: EnvironmentName,
    /// The plan the environment showed when this plan was made; apply refuses if it moved.
    pub previous_plan_id: Option<PlanId>,
    pub created_at: Timestamp,
    pub forward_only: bool,
    /// Every enabled model's snapshot, parents before children.
    pub snapshots: Vec<PlannedSnapshot>,
    /// Snapshots of the base environment whose models no longer exist.
    pub removed: Vec<Snapshot>,
    /// Whether the environment exists yet.
    pub environment_exists: bool,
    /// How long the environment lives after this plan is applied (`None` for prod: forever).
    pub environment_ttl_seconds: Option<i64>,
    /// Where the run summary is posted when the plan has been applied.
    pub notification_webhook: Option<String>,
    /// The development environment's backfill window (unbounded: every missing interval).
    #[serde(default)]
    pub window: BackfillWindow,
    /// `plan --restate-model`: the intervals to forget before running them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restatements: Vec<Restatement>,
    /// `before_all` / `after_all`.
    #[serde(default, skip_serializing_if = "EnvironmentStatements::is_empty")]
    pub statements: EnvironmentStatements,
    /// `--skip-backfill`: tables are promoted empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_backfill: bool,
}

impl Plan {
    pub fn uncategorized(&self) -> Vec<&ModelName> {
        self.snapshots
            .iter()
            .filter(|planned| planned.change == Change::Direct(ChangeCategory::Uncategorized))
            .map(|planned| &planned.snapshot.name)
            .collect()
    }

    pub fn task_count(&self) -> usize {
        self.snapshots.iter().map(|planned| planned.batches.len()).sum()
    }

    /// The intervals the plan's tasks backfill: what a run of it reports as done. A VIEW or
    /// SEED is built once, whatever its cron, and counts none.
    pub fn interval_count(&self) -> u64 {
        self.snapshots.iter().flat_map(|planned| &planned.batches).map(|batch| u64::from(batch.interval_count)).sum()
    }

    /// Per snapshot, the start of the batch that replaces its table's rows instead of adding to
    /// them: the first batch of a restated model that adds by key, by partition or by appending
    /// (its whole history is restated), as SQLMesh's first insert into a table whose intervals
    /// were all forgotten replaces it. Computed once per run (workers read it per task).
    pub fn replacing_batch_starts(&self) -> Vec<Option<Timestamp>> {
        let restated: BTreeSet<(&ModelName, &Version)> =
            self.restatements.iter().map(|restatement| (&restatement.name, &restatement.version)).collect();
        self.snapshots
            .iter()
            .map(|planned| {
                let snapshot = &planned.snapshot;
                let keyed = snapshot.kind.is_incremental() && !snapshot.kind.is_time_range();
                let first = planned.batches.first().map(|batch| batch.interval.start);
                first.filter(|_| keyed && restated.contains(&(&snapshot.name, &snapshot.version)))
            })
            .collect()
    }

    /// The promoted snapshots whose tables (or physical views) this plan shows without building
    /// them (no task: a `--skip-backfill` plan, a model whose first interval has not ended),
    /// parents first: the promoter creates each, a table empty, before moving any view to it.
    pub fn tables_to_create(&self, current: Option<&EnvironmentState>) -> Vec<&Snapshot> {
        let moved: BTreeSet<ModelName> = self
            .view_changes(current)
            .into_iter()
            .filter_map(|change| match change {
                ViewChange::Point { name, .. } => Some(name),
                ViewChange::Drop { .. } => None,
            })
            .collect();
        self.snapshots
            .iter()
            .filter(|planned| planned.batches.is_empty() && moved.contains(&planned.snapshot.name))
            .map(|planned| &planned.snapshot)
            .filter(|snapshot| !matches!(snapshot.kind, ModelKind::Seed { .. } | ModelKind::Embedded))
            .collect()
    }

    /// The environment's state once the plan is promoted: the snapshots it shows (in a
    /// development environment, only those that differ from prod).
    pub fn environment_state(&self) -> EnvironmentState {
        EnvironmentState {
            name: self.environment.clone(),
            plan_id: Some(self.id.clone()),
            snapshots: self.snapshots.iter().filter(|planned| planned.promoted).map(|p| p.snapshot.clone()).collect(),
        }
    }

    /// The views to create, replace or drop when the plan is promoted.
    pub fn view_changes(&self, current: Option<&EnvironmentState>) -> Vec<ViewChange> {
        let current_versions: BTreeMap<&ModelName, &Version> =
            current.map(|state| state.snapshots.iter().map(|s| (&s.name, &s.version)).collect()).unwrap_or_default();
        let mut changes = Vec::new();
        for planned in self.snapshots.iter().filter(|planned| planned.promoted) {
            let Some(table) = planned.snapshot.physical_table() else { continue };
            if current_versions.get(&planned.snapshot.name) != Some(&&planned.snapshot.version) {
                changes.push(ViewChange::Point { name: planned.snapshot.name.clone(), table });
            }
        }
        let planned_names: BTreeSet<&ModelName> =
            self.snapshots.iter().filter(|planned| planned.promoted).map(|p| &p.snapshot.name).collect();
        if let Some(current) = current {
            for snapshot in &current.snapshots {
                if !planned_names.contains(&snapshot.name) && snapshot.kind.is_materialized() {
                    changes.push(ViewChange::Drop { name: snapshot.name.clone() });
                }
            }
        }
        changes
    }

    /// True when applying would change nothing: no model changes, nothing to backfill, no view to move.
    pub fn has_nothing_to_do(&self, current: Option<&EnvironmentState>) -> bool {
        self.removed.is_empty()
            && self.snapshots.iter().all(|planned| planned.change == Change::Unchanged && planned.batches.is_empty())
            && self.view_changes(current).is_empty()
    }
}

/// The cron intervals a snapshot covers up to `now`: `[first tick, last end)`, or `None` when empty.
fn covered_range(cron: &Cron, start: Timestamp, end: Option<Timestamp>, now: Timestamp) -> Option<Interval> {
    let bound = end.map_or(now, |end| end.min(now));
    let first = cron.tick_at_or_after(start);
    let last = cron.tick_at_or_before(bound);
    (first < last).then(|| Interval::new(first, last))
}

struct Backfill {
    missing_ranges: Vec<Interval>,
    missing_interval_count: u64,
    batches: Vec<BackfillBatch>,
}

fn compute_backfill(
    snapshot: &Snapshot,
    cron: &Cron,
    start: Timestamp,
    recorded: Option<&IntervalSet>,
    now: Timestamp,
    window: BackfillWindow,
) -> Backfill {
    let empty = IntervalSet::new();
    let recorded = recorded.unwrap_or(&empty);
    let nothing = Backfill { missing_ranges: Vec::new(), missing_interval_count: 0, batches: Vec::new() };
    let start = window.start.map_or(start, |window_start| window_start.max(start));
    let end = match (snapshot.end, window.end) {
        (Some(end), Some(window_end)) => Some(end.min(window_end)),
        (end, window_end) => end.or(window_end),
    };
    let Some(range) = covered_range(cron, start, end, now) else {
        return nothing;
    };
    match &snapshot.kind {
        ModelKind::Embedded => nothing,
        ModelKind::View | ModelKind::Seed { .. } | ModelKind::Full => {
            let missing = missing_intervals(cron, range.start, range.end, recorded);
            // Views and seeds are built once per version; a FULL model is rebuilt whenever an interval is missing.
            let build =
                if matches!(snapshot.kind, ModelKind::Full) { !missing.is_empty() } else { recorded.is_empty() };
            if !build {
                return nothing;
            }
            let count = missing.len() as u64;
            // A VIEW or SEED is built once: its task backfills no interval (the plan and the
            // run both count it as none).
            let backfilled =
                if matches!(snapshot.kind, ModelKind::Full) { count.min(u32::MAX as u64) as u32 } else { 0 };
            Backfill {
                missing_ranges: IntervalSet::from_intervals(missing).ranges().to_vec(),
                missing_interval_count: count,
                batches: vec![BackfillBatch { interval: range, interval_count: backfilled }],
            }
        }
        ModelKind::IncrementalByTimeRange { batch_size, lookback, .. } => {
            let missing = missing_intervals(cron, range.start, range.end, recorded);
            let batches = batch_intervals(cron, &missing, *batch_size, *lookback, range.start);
            Backfill {
                missing_interval_count: missing.len() as u64,
                missing_ranges: IntervalSet::from_intervals(missing).ranges().to_vec(),
                batches: batches
                    .into_iter()
                    .map(|batch| BackfillBatch { interval: batch.interval, interval_count: batch.interval_count })
                    .collect(),
            }
        }
        ModelKind::IncrementalByUniqueKey { .. }
        | ModelKind::IncrementalByPartition { .. }
        | ModelKind::IncrementalUnmanaged { .. }
        | ModelKind::ScdType2(_) => {
            let missing = missing_intervals(cron, range.start, range.end, recorded);
            let batches = batch_intervals(cron, &missing, snapshot.kind.batch_size(), 0, range.start);
            Backfill {
                missing_interval_count: missing.len() as u64,
                missing_ranges: IntervalSet::from_intervals(missing).ranges().to_vec(),
                batches: batches
                    .into_iter()
                    .map(|batch| BackfillBatch { interval: batch.interval, interval_count: batch.interval_count })
                    .collect(),
            }
        }
    }
}

/// Categorizes a direct change of `model` against the base snapshot `old`.
fn categorize(model: &Model, new: &Fingerprint, old: &Snapshot, forward_only: bool) -> ChangeCategory {
    if new.data_hash == old.fingerprint.data_hash {
        return ChangeCategory::MetadataOnly;
    }
    if forward_only || model.kind.is_forward_only() {
        return ChangeCategory::ForwardOnly;
    }
    if model.kind != old.kind && model.kind.name() != old.kind.name() {
        return ChangeCategory::Breaking;
    }
    match (&model.query, &old.normalized_query) {
        (Some(new_query), Some(old_query)) => {
            let same_statements =
                model.pre_statements == old.pre_statements && model.post_statements == old.post_statements;
            match only_adds_projections(old_query, new_query, &model.dialect) {
                Some(true) if same_statements && model.columns.is_empty() => ChangeCategory::NonBreaking,
                Some(_) => ChangeCategory::Breaking,
                None => ChangeCategory::Uncategorized,
            }
        }
        (None, None) => ChangeCategory::Breaking,
        _ => ChangeCategory::Uncategorized,
    }
}

/// The plan of `sluice run`: the environment's own snapshots, unchanged, with every interval
/// their crons have completed since they were last run (up to `now`) as tasks — a plan like any
/// other, so it is stored, applied, resumed and promoted (moving no view) the same way.
/// `environment_ttl_seconds` and `notification_webhook` come from the project's config.
pub fn build_run_plan(
    state: &EnvironmentState,
    recorded_intervals: &BTreeMap<(ModelName, Version), IntervalSet>,
    now: Timestamp,
    environment_ttl_seconds: i64,
    notification_webhook: Option<String>,
) -> Result<Plan, String> {
    let backfill = |snapshot: &Snapshot, cron: &Cron| {
        let recorded = recorded_intervals.get(&(snapshot.name.clone(), snapshot.version.clone()));
        compute_backfill(snapshot, cron, snapshot.start, recorded, now, BackfillWindow::default())
    };
    let mut plan = environment_plan(state, now, backfill)?;
    plan.environment_ttl_seconds = (!state.name.is_prod()).then_some(environment_ttl_seconds);
    plan.notification_webhook = notification_webhook;
    Ok(plan)
}

/// `plan --restate-model`: which models, and the time to restate (`--start`, `--end`, as parsed).
#[derive(Clone, Debug, Default)]
pub struct RestatementRequest {
    /// The selected models; their descendants are restated with them.
    pub selected: BTreeSet<ModelName>,
    pub start: Option<Timestamp>,
    /// Exclusive (a date-only `--end` includes its day).
    pub end: Option<Timestamp>,
}

/// A restatement plan and what it had to leave out, to be shown to the user.
#[derive(Clone, Debug)]
pub struct RestatementPlan {
    pub plan: Plan,
    pub warnings: Vec<String>,
}

/// The plan of `plan --restate-model`: the environment's own snapshots, as they are (local
/// changes play no part, as in SQLMesh), with the selected models and every model downstream of
/// them run again over the restated time. SQLMesh's rules: the time is `[start, end)` widened to
/// whole cron intervals, from the earliest start (or recorded interval) of the environment to
/// `now` unless given; a model that can only be rebuilt whole (FULL, INCREMENTAL_BY_UNIQUE_KEY)
/// restates its whole recorded history up to `now`, and a self-referencing one up to `now`; a
/// child restates at least what its incremental parents restate; SEED models are not restated;
/// in a development environment, a model whose version prod uses is left out with a warning
/// (restate it in prod). The forgotten intervals travel in the plan (`Plan::restatements`).
pub fn build_restatement_plan(
    state: &EnvironmentState,
    prod: Option<&EnvironmentState>,
    recorded_intervals: &BTreeMap<(ModelName, Version), IntervalSet>,
    now: Timestamp,
    request: &RestatementRequest,
) -> Result<RestatementPlan, String> {
    let order = parents_first(state);
    let empty = IntervalSet::new();
    let recorded_of = |snapshot: &Snapshot| {
        recorded_intervals.get(&(snapshot.name.clone(), snapshot.version.clone())).unwrap_or(&empty)
    };
    let earliest = state
        .snapshots
        .iter()
        .map(|snapshot| snapshot.start)
        .chain(state.snapshots.iter().filter_map(|snapshot| recorded_of(snapshot).ranges().first().map(|r| r.start)))
        .min()
        .unwrap_or(now);
    let start = request.start.unwrap_or(earliest);
    let end = request.end.unwrap_or(now);
    if start >= end {
        return Err(format!("the restatement's start {start} is not before its end {end}"));
    }
    let prod_versions: BTreeMap<&ModelName, &Version> =
        prod.map(|prod| prod.snapshots.iter().map(|s| (&s.name, &s.version)).collect()).unwrap_or_default();
    let mut warnings = Vec::new();
    let mut restated: BTreeMap<&SnapshotId, Interval> = BTreeMap::new();
    let by_id: BTreeMap<&SnapshotId, &Snapshot> = state.snapshots.iter().map(|s| (&s.id, s)).collect();
    for index in order {
        let snapshot = &state.snapshots[index];
        let restating_parents: Vec<&SnapshotId> =
            snapshot.parents.iter().filter(|parent| restated.contains_key(parent)).collect();
        if restating_parents.is_empty() && !request.selected.contains(&snapshot.name) {
            continue;
        }
        if !state.name.is_prod() && prod_versions.get(&snapshot.name) == Some(&&snapshot.version) {
            warnings
                .push(format!("{} is not restated: prod uses its version; restate it in prod instead", snapshot.name));
            continue;
        }
        if snapshot.disable_restatement {
            warnings.push(format!("{} is not restated: its kind sets disable_restatement", snapshot.name));
            continue;
        }
        if matches!(snapshot.kind, ModelKind::Seed { .. }) {
            continue;
        }
        let cron = Cron::parse(&snapshot.cron).map_err(|error| format!("{}: stored cron: {error}", snapshot.name))?;
        // A model that can only be rebuilt whole, or reads itself, depends on everything before:
        // it restates up to `now`, and the whole one from its first recorded interval.
        let whole_history = snapshot.kind.restates_whole_history();
        let mut low = cron.tick_at_or_before(start);
        let mut high = cron.tick_at_or_after(if snapshot.self_referencing || whole_history { now } else { end });
        if whole_history && let Some(first) = recorded_of(snapshot).ranges().first() {
            low = cron.tick_at_or_before(first.start);
        }
        for parent in restating_parents {
            if by_id.get(parent).is_some_and(|parent| parent.kind.is_incremental()) {
                low = low.min(cron.tick_at_or_before(restated[parent].start));
                high = high.max(cron.tick_at_or_after(restated[parent].end));
            }
        }
        // A window wholly after `now` restates nothing of a model that stops at `now`.
        if low < high {
            restated.insert(&snapshot.id, Interval::new(low, high));
        }
    }
    // What is forgotten, and what stays recorded of each restated table once it is.
    let mut restatements = Vec::new();
    let mut remaining: BTreeMap<&SnapshotId, IntervalSet> = BTreeMap::new();
    for snapshot in &state.snapshots {
        let Some(&interval) = restated.get(&snapshot.id) else { continue };
        if !snapshot.kind.is_materialized() || matches!(snapshot.kind, ModelKind::View) {
            continue;
        }
        restatements.push(Restatement { name: snapshot.name.clone(), version: snapshot.version.clone(), interval });
        let mut set = recorded_of(snapshot).clone();
        set.remove(interval);
        remaining.insert(&snapshot.id, set);
    }
    let backfill = |snapshot: &Snapshot, cron: &Cron| {
        let nothing = Backfill { missing_ranges: Vec::new(), missing_interval_count: 0, batches: Vec::new() };
        let Some(recorded) = remaining.get(&snapshot.id) else { return nothing };
        // A FULL model is rebuilt whole once anything is missing; an incremental one runs the
        // restated intervals again.
        let window = match snapshot.kind {
            ModelKind::Full => BackfillWindow::default(),
            _ => {
                let interval = restated[&snapshot.id];
                BackfillWindow { start: Some(interval.start), end: Some(interval.end) }
            }
        };
        compute_backfill(snapshot, cron, snapshot.start, Some(recorded), now, window)
    };
    let mut plan = environment_plan(state, now, backfill)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(plan.id.0.as_bytes());
    for restatement in &restatements {
        hasher.update(restatement.name.to_string().as_bytes());
        hasher.update(&restatement.interval.start.0.to_le_bytes());
        hasher.update(&restatement.interval.end.0.to_le_bytes());
    }
    plan.id = PlanId(short_hash(&hasher.finalize(), 6));
    plan.restatements = restatements;
    Ok(RestatementPlan { plan, warnings })
}

/// What a prod restatement also forgets in development versions, as SQLMesh clears them so
/// that each development environment's next plan or run fills them again with the restated
/// data: in every development environment (`developments`, each as a plan sees it, over prod)
/// showing a restated model, that model and every model downstream of it there, at versions
/// prod does not use (prod's own are restated by the plan itself), over the model's restated
/// interval; then every other stored version of those models (`stored`) that prod does not
/// use, over the widest interval restated for its name. Models that disable restatement, views,
/// seeds and embedded models are left alone, as in the plan itself.
pub fn development_restatements(
    prod_restatements: &[Restatement],
    prod: &EnvironmentState,
    developments: &[EnvironmentState],
    stored: &[Snapshot],
) -> Vec<Restatement> {
    let in_prod: BTreeSet<(&ModelName, &Version)> = prod.snapshots.iter().map(|s| (&s.name, &s.version)).collect();
    let mut restated: BTreeMap<&ModelName, Interval> = BTreeMap::new();
    for restatement in prod_restatements {
        let entry = restated.entry(&restatement.name).or_insert(restatement.interval);
        *entry = Interval::new(entry.start.min(restatement.interval.start), entry.end.max(restatement.interval.end));
    }
    let forgettable = |snapshot: &Snapshot| {
        !snapshot.disable_restatement
            && snapshot.kind.is_materialized()
            && !matches!(snapshot.kind, ModelKind::View | ModelKind::Seed { .. })
            && !in_prod.contains(&(&snapshot.name, &snapshot.version))
    };
    let mut cleared: BTreeMap<(ModelName, Version), Interval> = BTreeMap::new();
    fn widen(cleared: &mut BTreeMap<(ModelName, Version), Interval>, snapshot: &Snapshot, interval: Interval) {
        let entry = cleared.entry((snapshot.name.clone(), snapshot.version.clone())).or_insert(interval);
        *entry = Interval::new(entry.start.min(interval.start), entry.end.max(interval.end));
    }
    for development in developments {
        let by_name: BTreeMap<&ModelName, &Snapshot> = development.snapshots.iter().map(|s| (&s.name, s)).collect();
        let name_of: BTreeMap<&SnapshotId, &ModelName> =
            development.snapshots.iter().map(|s| (&s.id, &s.name)).collect();
        let mut children: BTreeMap<&ModelName, Vec<&ModelName>> = BTreeMap::new();
        for snapshot in &development.snapshots {
            for parent in snapshot.parents.iter().filter_map(|id| name_of.get(id)) {
                children.entry(parent).or_default().push(&snapshot.name);
            }
        }
        for (name, interval) in &restated {
            if !by_name.contains_key(name) {
                continue;
            }
            let mut pending = vec![*name];
            let mut seen = BTreeSet::new();
            while let Some(model) = pending.pop() {
                if !seen.insert(model) {
                    continue;
                }
                let Some(snapshot) = by_name.get(model) else { continue };
                if snapshot.disable_restatement {
                    continue;
                }
                if forgettable(snapshot) {
                    widen(&mut cleared, snapshot, *interval);
                }
                pending.extend(children.get(model).into_iter().flatten());
            }
        }
    }
    // Versions no environment shows: the widest interval forgotten for their name.
    let mut widest: BTreeMap<ModelName, Interval> = BTreeMap::new();
    for ((name, _), interval) in &cleared {
        let entry = widest.entry(name.clone()).or_insert(*interval);
        *entry = Interval::new(entry.start.min(interval.start), entry.end.max(interval.end));
    }
    for snapshot in stored.iter().filter(|snapshot| forgettable(snapshot)) {
        if let Some(interval) = widest.get(&snapshot.name)
            && !cleared.contains_key(&(snapshot.name.clone(), snapshot.version.clone()))
        {
            let interval = *interval;
            widen(&mut cleared, snapshot, interval);
        }
    }
    cleared.into_iter().map(|((name, version), interval)| Restatement { name, version, interval }).collect()
}

impl Plan {
    /// Adds what a prod restatement also forgets in development versions
    /// (`development_restatements`); they are part of the plan's id.
    pub fn forget_in_development(&mut self, restatements: Vec<Restatement>) {
        if restatements.is_empty() {
            return;
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.id.0.as_bytes());
        for restatement in &restatements {
            hasher.update(restatement.name.to_string().as_bytes());
            hasher.update(restatement.version.0.as_bytes());
            hasher.update(&restatement.interval.start.0.to_le_bytes());
            hasher.update(&restatement.interval.end.0.to_le_bytes());
        }
        self.id = PlanId(short_hash(&hasher.finalize(), 6));
        self.restatements.extend(restatements);
    }
}

/// The environment's snapshots, parents before children (the stored snapshots name their
/// parents by id; a parent outside the environment, such as prod's table read by a development
/// environment, is already built).
fn parents_first(state: &EnvironmentState) -> Vec<usize> {
    let index_by_id: BTreeMap<&SnapshotId, usize> =
        state.snapshots.iter().enumerate().map(|(index, snapshot)| (&snapshot.id, index)).collect();
    let mut order: Vec<usize> = Vec::with_capacity(state.snapshots.len());
    let mut placed = vec![false; state.snapshots.len()];
    fn place(
        index: usize,
        state: &EnvironmentState,
        index_by_id: &BTreeMap<&SnapshotId, usize>,
        placed: &mut Vec<bool>,
        order: &mut Vec<usize>,
        depth: usize,
    ) {
        if placed[index] || depth > state.snapshots.len() {
            return;
        }
        for parent in &state.snapshots[index].parents {
            if let Some(&parent_index) = index_by_id.get(parent) {
                place(parent_index, state, index_by_id, placed, order, depth + 1);
            }
        }
        if !placed[index] {
            placed[index] = true;
            order.push(index);
        }
    }
    for index in 0..state.snapshots.len() {
        place(index, state, &index_by_id, &mut placed, &mut order, 0);
    }
    order
}

/// A plan of the environment's own snapshots, unchanged, each with the tasks `backfill` gives
/// it: what `run` and restatements share. Its id derives from the environment, its current plan
/// and `now`; the caller sets what the project's config decides.
fn environment_plan(
    state: &EnvironmentState,
    now: Timestamp,
    mut backfill: impl FnMut(&Snapshot, &Cron) -> Backfill,
) -> Result<Plan, String> {
    let index_by_id: BTreeMap<&SnapshotId, usize> =
        state.snapshots.iter().enumerate().map(|(index, snapshot)| (&snapshot.id, index)).collect();
    let mut position: BTreeMap<&SnapshotId, usize> = BTreeMap::new();
    let mut planned: Vec<PlannedSnapshot> = Vec::with_capacity(state.snapshots.len());
    for index in parents_first(state) {
        let snapshot = &state.snapshots[index];
        let cron = Cron::parse(&snapshot.cron).map_err(|error| format!("{}: stored cron: {error}", snapshot.name))?;
        let backfill = backfill(snapshot, &cron);
        // The materialized snapshots this one waits for: parents, through EMBEDDED ones.
        let mut materialized = BTreeSet::new();
        let mut pending: Vec<&SnapshotId> = snapshot.parents.iter().collect();
        while let Some(parent) = pending.pop() {
            let Some(&parent_index) = index_by_id.get(parent) else { continue };
            let parent_snapshot = &state.snapshots[parent_index];
            if matches!(parent_snapshot.kind, ModelKind::Embedded) {
                pending.extend(parent_snapshot.parents.iter());
            } else if let Some(&parent_position) = position.get(parent) {
                materialized.insert(parent_position as u32);
            }
        }
        position.insert(&snapshot.id, planned.len());
        planned.push(PlannedSnapshot {
            snapshot: snapshot.clone(),
            change: Change::Unchanged,
            previous: Some(snapshot.clone()),
            missing_ranges: backfill.missing_ranges,
            missing_interval_count: backfill.missing_interval_count,
            batches: backfill.batches,
            materialized_parents: materialized.into_iter().collect(),
            promoted: true,
        });
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"run\0");
    hasher.update(state.name.as_str().as_bytes());
    hasher.update(&[0]);
    hasher.update(state.plan_id.as_ref().map_or("", |id| id.0.as_str()).as_bytes());
    hasher.update(&now.0.to_le_bytes());
    Ok(Plan {
        id: PlanId(short_hash(&hasher.finalize(), 6)),
        environment: state.name.clone(),
        previous_plan_id: state.plan_id.clone(),
        created_at: now,
        forward_only: false,
        snapshots: planned,
        removed: Vec::new(),
        environment_exists: true,
        environment_ttl_seconds: None,
        notification_webhook: None,
        window: BackfillWindow::default(),
        restatements: Vec::new(),
        statements: EnvironmentStatements::default(),
        skip_backfill: false,
    })
}

/// What a plan of `environment` compares against: prod's state for prod or a new environment;
/// for an existing development environment, its own snapshots over prod's (it records only the
/// models that differ from prod).
pub fn plan_base(
    environment: &EnvironmentName,
    current: Option<&EnvironmentState>,
    prod: Option<&EnvironmentState>,
) -> Option<EnvironmentState> {
    let Some(current) = current else { return prod.cloned() };
    let mut base = current.clone();
    if !environment.is_prod()
        && let Some(prod) = prod
    {
        let own: BTreeSet<&ModelName> = current.snapshots.iter().map(|snapshot| &snapshot.name).collect();
        base.snapshots.extend(prod.snapshots.iter().filter(|snapshot| !own.contains(&snapshot.name)).cloned());
    }
    Some(base)
}

/// The plan of a project against an empty state: a first apply to prod at `now` (what the
/// benchmarks and `sluice render` plan, with nothing stored to compare with).
pub fn first_plan(project: &Project, now: Timestamp) -> Plan {
    let known = BTreeMap::new();
    let recorded = BTreeMap::new();
    let environment = EnvironmentName::prod();
    let context = PlanContext {
        environment: &environment,
        current: None,
        base: None,
        prod: None,
        known_snapshots: &known,
        recorded_intervals: &recorded,
        now,
        forward_only: false,
        window: BackfillWindow::default(),
        skip_backfill: false,
        selected: None,
    };
    build_plan(project, context)
}

/// Every model's start: its own (or `model_defaults.start`), else the earliest of its parents'
/// starts, else the cron tick before the last one at or before `now` — SQLMesh's rule, so a
/// model without a start backfills its last complete interval, or from its parents' start.
pub fn effective_starts(project: &Project, now: Timestamp) -> BTreeMap<ModelName, Timestamp> {
    let mut starts: BTreeMap<ModelName, Timestamp> = BTreeMap::new();
    for name in &project.order {
        let model = &project.models[name];
        let start = model.start.unwrap_or_else(|| {
            let parents = project.parents.get(name).into_iter().flatten();
            parents.filter_map(|parent| starts.get(parent).copied()).min().unwrap_or_else(|| {
                let floor = model.cron.tick_at_or_before(now);
                model.cron.tick_at_or_before(Timestamp(floor.0 - 1))
            })
        });
        starts.insert(name.clone(), start);
    }
    starts
}

/// Computes the plan of `project` against the environment in `context`.
pub fn build_plan(project: &Project, context: PlanContext) -> Plan {
    let fingerprints = fingerprint_project(project);
    let starts = effective_starts(project, context.now);
    // A development environment keeps showing what it showed (SQLMesh's rule: a model changed
    // back to prod's version keeps its view there, now reading prod's table).
    let shown: BTreeSet<&ModelName> =
        context.current.map(|current| current.snapshots.iter().map(|s| &s.name).collect()).unwrap_or_default();
    let prod_versions: BTreeMap<&ModelName, &Version> =
        context.prod.map(|prod| prod.snapshots.iter().map(|s| (&s.name, &s.version)).collect()).unwrap_or_default();
    let base_by_name: BTreeMap<&ModelName, &Snapshot> =
        context.base.map(|base| base.snapshots.iter().map(|s| (&s.name, s)).collect()).unwrap_or_default();
    let shown_ids: BTreeSet<&SnapshotId> =
        context.current.map(|current| current.snapshots.iter().map(|s| &s.id).collect()).unwrap_or_default();
    let backfilled = context.selected.map(|selected| crate::selection::backfilled_models(project, selected));

    let mut planned: Vec<PlannedSnapshot> = Vec::with_capacity(project.order.len());
    let mut index_of: BTreeMap<&ModelName, usize> = BTreeMap::new();
    let mut embedded_queries: BTreeMap<&ModelName, Box<Query>> = BTreeMap::new();
    for name in &project.order {
        let model = &project.models[name];
        let fingerprint = &fingerprints[name];
        let id = fingerprint.snapshot_id(name);
        let previous = base_by_name.get(name).copied();
        let parents = project.parents.get(name).cloned().unwrap_or_default();

        // The change, against the base environment.
        let direct_parents_changed: Vec<&PlannedSnapshot> = parents
            .iter()
            .filter_map(|parent| index_of.get(parent).map(|i| &planned[*i]))
            .filter(|parent| parent.change != Change::Unchanged)
            .collect();
        let change = match previous {
            None => Change::Added,
            Some(old) if old.id == id => Change::Unchanged,
            Some(old)
                if old.fingerprint.data_hash != fingerprint.data_hash
                    || old.fingerprint.metadata_hash != fingerprint.metadata_hash =>
            {
                Change::Direct(categorize(model, fingerprint, old, context.forward_only))
            }
            Some(_) => {
                let mut via = BTreeSet::new();
                let mut breaking = false;
                for parent in &direct_parents_changed {
                    match &parent.change {
                        Change::Direct(_) | Change::Added => {
                            via.insert(parent.snapshot.name.clone());
                        }
                        Change::Indirect { via: parent_via, .. } => via.extend(parent_via.iter().cloned()),
                        Change::Unchanged => {}
                    }
                    // A child is rebuilt only when a parent's change can change the rows it reads.
                    let parent_breaking = match &parent.change {
                        Change::Added => true,
                        Change::Direct(category) => {
                            matches!(category, ChangeCategory::Breaking | ChangeCategory::Uncategorized)
                        }
                        Change::Indirect { breaking, .. } => *breaking,
                        Change::Unchanged => false,
                    };
                    breaking |= parent_breaking;
                }
                Change::Indirect { breaking, via: via.into_iter().collect() }
            }
        };

        // The version: reuse a known snapshot with this fingerprint, else decide from the change.
        let reused = match previous {
            Some(old) if old.id == id => Some(old.clone()),
            _ => context.known_snapshots.get(&id).cloned(),
        };
        let version = match (&reused, &change, previous) {
            (Some(snapshot), _, _) => snapshot.version.clone(),
            (None, Change::Direct(ChangeCategory::ForwardOnly | ChangeCategory::MetadataOnly), Some(old)) => {
                old.version.clone()
            }
            (None, Change::Indirect { breaking: false, .. }, Some(old)) => old.version.clone(),
            _ => fingerprint.new_version(),
        };

        let snapshot = match reused {
            Some(snapshot) => snapshot,
            None => {
                // Render the executable query against the chosen versions of every model it reads.
                let resolve_parent = |reference: &str| -> Option<Replacement> {
                    let parent = parents.iter().find(|parent| parent.to_string() == reference)?;
                    if let Some(embedded) = embedded_queries.get(parent) {
                        return Some(Replacement::Subquery(embedded.clone()));
                    }
                    let parent_snapshot = &planned[*index_of.get(parent)?].snapshot;
                    let table = parent_snapshot.physical_table()?;
                    Some(Replacement::Table { schema: table.schema, table: table.table })
                };
                let render = |query: &Query, own: Replacement| {
                    let resolve = |reference: &str| -> Option<Replacement> {
                        if reference == name.to_string() {
                            return Some(own.clone());
                        }
                        resolve_parent(reference)
                    };
                    let mut rendered = rewrite_references(query, &resolve);
                    if let Some(gateway) = project.config.gateways.get(&model.gateway) {
                        translate(&mut rendered, &model.dialect, gateway.connection.default_dialect());
                    }
                    rendered
                };
                let own_table = PhysicalTable::of(name, &version);
                let own_table = Replacement::Table { schema: own_table.schema, table: own_table.table };
                let rendered_query = model.query.as_ref().map(|query| render(&query.query, own_table.clone()));
                let mut audits: Vec<SnapshotAudit> = model
                    .audits
                    .iter()
                    .map(|audit| SnapshotAudit {
                        call: audit.call.clone(),
                        blocking: audit.blocking,
                        query: render(&audit.query.query, Replacement::Relation(THIS_MODEL.to_string())).to_string(),
                    })
                    .collect();
                if let Some(stored) = &model.stored {
                    // Rendered when stored: only the parents' tables move.
                    let target = project.config.gateways.get(&model.gateway).map(|g| g.connection.default_dialect());
                    let moved = |reference: &str| -> Option<Replacement> {
                        let parent = stored.parent_tables.get(reference)?;
                        let table = planned[*index_of.get(parent)?].snapshot.physical_table()?;
                        Some(Replacement::Table { schema: table.schema, table: table.table })
                    };
                    for audit in &stored.audits {
                        let query = match crate::query::parse_query(&audit.query, target.unwrap_or(&model.dialect)) {
                            Ok(parsed) => rewrite_references(&parsed.query, &moved).to_string(),
                            Err(_) => audit.query.clone(),
                        };
                        audits.push(SnapshotAudit { query, ..audit.clone() });
                    }
                }
                let category = match &change {
                    Change::Direct(category) => Some(*category),
                    Change::Indirect { breaking: true, .. } | Change::Added => Some(ChangeCategory::Breaking),
                    Change::Indirect { breaking: false, .. } => Some(ChangeCategory::NonBreaking),
                    Change::Unchanged => None,
                };
                if let (ModelKind::Embedded, Some(rendered)) = (&model.kind, &rendered_query) {
                    embedded_queries.insert(name, rendered.clone());
                }
                Snapshot {
                    id: id.clone(),
                    name: name.clone(),
                    fingerprint: fingerprint.clone(),
                    version,
                    kind: model.kind.clone(),
                    disable_restatement: model.disable_restatement,
                    cron: model.cron.text().to_string(),
                    start: starts[name],
                    end: model.end,
                    gateway: model.gateway.clone(),
                    dialect: model.dialect.clone(),
                    columns: model.columns.clone(),
                    owner: model.owner.clone(),
                    description: model.description.clone(),
                    tags: model.tags.clone(),
                    grain: model.grain.clone(),
                    parents: parents.iter().map(|parent| fingerprints[parent].snapshot_id(parent)).collect(),
                    normalized_query: model.query.as_ref().map(|query| query.normalized.clone()),
                    pretty_query: model.query.as_ref().map(|query| query.pretty.clone()),
                    rendered_query: rendered_query.map(|query| query.to_string()),
                    pre_statements: model.pre_statements.clone(),
                    post_statements: model.post_statements.clone(),
                    seed: model.seed.clone(),
                    change_category: category,
                    self_referencing: model.is_self_referencing(),
                    audits,
                }
            }
        };
        if matches!(snapshot.kind, ModelKind::Embedded)
            && !embedded_queries.contains_key(name)
            && let Some(rendered) = &snapshot.rendered_query
            && let Ok(parsed) = crate::query::parse_query(rendered, &snapshot.dialect)
        {
            embedded_queries.insert(name, parsed.query);
        }

        let recorded = context.recorded_intervals.get(&(name.clone(), snapshot.version.clone()));
        let mut backfill =
            compute_backfill(&snapshot, &model.cron, starts[name], recorded, context.now, context.window);
        if context.skip_backfill && !matches!(snapshot.kind, ModelKind::Seed { .. }) {
            backfill = Backfill { missing_ranges: Vec::new(), missing_interval_count: 0, batches: Vec::new() };
        }
        let materialized_parents = project
            .materialized_parents(name)
            .iter()
            .filter_map(|parent| index_of.get(parent).map(|index| *index as u32))
            .collect();
        let promoted = match context.selected {
            // SQLMesh's rule: the selected models, and what the environment showed at this snapshot.
            Some(selected) if !context.environment.is_prod() => {
                selected.contains(name) || shown_ids.contains(&snapshot.id)
            }
            _ => {
                context.environment.is_prod()
                    || prod_versions.get(name) != Some(&&snapshot.version)
                    || shown.contains(name)
            }
        };
        if let Some(backfilled) = &backfilled
            && !backfilled.contains(name)
            && (!context.environment.is_prod() || previous.is_some_and(|old| old.version == snapshot.version))
        {
            // Left to a later plan; in prod a new table outside the selection keeps its tasks and
            // the plan is refused (`selection_gaps`).
            backfill = Backfill { missing_ranges: Vec::new(), missing_interval_count: 0, batches: Vec::new() };
        }
        index_of.insert(name, planned.len());
        planned.push(PlannedSnapshot {
            snapshot,
            change,
            previous: previous.cloned(),
            promoted,
            missing_ranges: backfill.missing_ranges,
            missing_interval_count: backfill.missing_interval_count,
            batches: backfill.batches,
            materialized_parents,
        });
    }

    // Models sluice leaves out (`--skip-unsupported`) keep what the environment shows: carried
    // unchanged with nothing to run, never removed.
    let left_out = context
        .base
        .into_iter()
        .flat_map(|base| &base.snapshots)
        .filter(|s| project.is_unsupported(&s.name.to_string()));
    for snapshot in left_out {
        let promoted = context.environment.is_prod()
            || prod_versions.get(&snapshot.name) != Some(&&snapshot.version)
            || shown.contains(&snapshot.name);
        planned.push(PlannedSnapshot {
            snapshot: snapshot.clone(),
            change: Change::Unchanged,
            previous: Some(snapshot.clone()),
            promoted,
            missing_ranges: Vec::new(),
            missing_interval_count: 0,
            batches: Vec::new(),
            materialized_parents: Vec::new(),
        });
    }
    let removed: Vec<Snapshot> = context
        .base
        .map(|base| {
            let gone =
                |s: &&Snapshot| !project.models.contains_key(&s.name) && !project.is_unsupported(&s.name.to_string());
            base.snapshots.iter().filter(gone).cloned().collect()
        })
        .unwrap_or_default();
    let previous_plan_id = context.current.and_then(|current| current.plan_id.clone());

    let mut hasher = blake3::Hasher::new();
    hasher.update(context.environment.as_str().as_bytes());
    hasher.update(&[0]);
    hasher.update(previous_plan_id.as_ref().map_or("", |id| id.0.as_str()).as_bytes());
    hasher.update(&[0]);
    for planned_snapshot in &planned {
        hasher.update(planned_snapshot.snapshot.id.0.as_bytes());
        hasher.update(planned_snapshot.snapshot.version.0.as_bytes());
        hasher.update(&[0]);
    }
    for snapshot in &removed {
        hasher.update(snapshot.id.0.as_bytes());
    }
    hasher.update(&context.now.0.to_le_bytes());
    hasher.update(&[u8::from(context.forward_only)]);
    if context.skip_backfill {
        hasher.update(b"skip_backfill");
    }
    if let Some(selected) = context.selected {
        hasher.update(b"selected");
        for name in selected {
            hasher.update(name.to_string().as_bytes());
            hasher.update(&[0]);
        }
    }
    // Statements change what applying does, so they are part of the id (none: ids as before).
    for statement in project.config.before_all.iter().chain(&project.config.after_all) {
        hasher.update(statement.as_bytes());
        hasher.update(&[0]);
    }
    if !context.window.is_unbounded() {
        for bound in [context.window.start, context.window.end] {
            hasher.update(&bound.map_or(i64::MIN, |bound| bound.0).to_le_bytes());
        }
    }

    Plan {
        id: PlanId(short_hash(&hasher.finalize(), 6)),
        environment: context.environment.clone(),
        previous_plan_id,
        created_at: context.now,
        forward_only: context.forward_only,
        snapshots: planned,
        removed,
        environment_exists: context.current.is_some(),
        environment_ttl_seconds: (!context.environment.is_prod()).then_some(project.config.environment_ttl_seconds),
        notification_webhook: project.config.notification_webhook.clone(),
        window: context.window,
        restatements: Vec::new(),
        statements: EnvironmentStatements::of(&project.config),
        skip_backfill: context.skip_backfill,
    }
}
