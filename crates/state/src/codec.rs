//! Conversions shared by both stores: rows of plain columns to domain records, JSON bodies, and
//! the interval compaction computed before a write.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_core::interval::{Interval, IntervalSet, Timestamp};
use sluice_core::names::{EnvironmentName, ModelName, PlanId, SnapshotId, TaskId, Version};
use sluice_core::plan::{EnvironmentState, Plan};
use sluice_core::snapshot::Snapshot;

use crate::error::StateError;
use crate::types::{
    AuditEntry, EnvironmentLease, EnvironmentRecord, IntervalKey, IntervalRecord, PlanSummary, RunId, RunRecord,
    RunStatus, TaskFailure,
};

pub(crate) fn to_json<T: Serialize>(what: &str, value: &T) -> Result<String, StateError> {
    serde_json::to_string(value)
        .map_err(|error| StateError::Invalid { reason: format!("cannot encode {what}: {error}") })
}

pub(crate) fn from_json<T: DeserializeOwned>(what: impl FnOnce() -> String, text: &str) -> Result<T, StateError> {
    serde_json::from_str(text).map_err(|error| StateError::corrupt(what(), error.to_string()))
}

pub(crate) fn decode_snapshot(id: &str, body: &str) -> Result<Snapshot, StateError> {
    let snapshot: Snapshot = from_json(|| format!("snapshot {id}"), body)?;
    if snapshot.id.0 != id {
        return Err(StateError::corrupt(format!("snapshot {id}"), format!("its body has id {}", snapshot.id)));
    }
    Ok(snapshot)
}

pub(crate) fn decode_plan(id: &str, body: &str) -> Result<Plan, StateError> {
    from_json(|| format!("plan {id}"), body)
}

pub(crate) fn model_name(text: &str) -> Result<ModelName, StateError> {
    ModelName::parse(text).map_err(|reason| StateError::corrupt("model name", reason))
}

pub(crate) fn environment_name(text: &str) -> Result<EnvironmentName, StateError> {
    EnvironmentName::parse(text).map_err(|reason| StateError::corrupt("environment name", reason))
}

pub(crate) fn task_id(bytes: &[u8]) -> Result<TaskId, StateError> {
    let array: [u8; 16] = bytes
        .try_into()
        .map_err(|_| StateError::corrupt("task id", format!("expected 16 bytes, found {}", bytes.len())))?;
    Ok(TaskId(array))
}

/// A counter as stored (SQL has no unsigned 64-bit integers).
pub(crate) fn to_stored_count(value: u64, what: &str) -> Result<i64, StateError> {
    i64::try_from(value)
        .map_err(|_| StateError::Invalid { reason: format!("{what} {value} does not fit a 64-bit counter") })
}

pub(crate) fn from_stored_count(value: i64, what: &str) -> Result<u64, StateError> {
    u64::try_from(value).map_err(|_| StateError::corrupt(what, format!("negative count {value}")))
}

/// `now + ttl`, refusing a negative or overflowing lease.
pub(crate) fn lease_expiry(now: Timestamp, ttl_seconds: i64) -> Result<Timestamp, StateError> {
    if ttl_seconds <= 0 {
        return Err(StateError::Invalid { reason: format!("a lease must last a positive time, not {ttl_seconds}s") });
    }
    now.0
        .checked_add(ttl_seconds)
        .map(Timestamp)
        .ok_or_else(|| StateError::Invalid { reason: format!("lease of {ttl_seconds}s overflows the clock") })
}

/// The same plan id or the same absence.
pub(crate) fn same_plan(expected: Option<&PlanId>, actual: Option<&str>) -> bool {
    expected.map(|plan| plan.0.as_str()) == actual
}

/// Tombstone rows as keys, in key order.
pub(crate) fn tombstone_keys(rows: Vec<(String, String)>) -> Result<BTreeSet<IntervalKey>, StateError> {
    let mut keys = BTreeSet::new();
    for (name, version) in rows {
        keys.insert((model_name(&name)?, Version(version)));
    }
    Ok(keys)
}

/// The claim's check of the running runs (`running`: the ids of every run stored as running)
/// against what the janitor read: `Contention` unless they are the same set.
pub(crate) fn check_running_seen(running: Vec<String>, seen: &[RunId]) -> Result<(), StateError> {
    let running: BTreeSet<String> = running.into_iter().collect();
    let seen: BTreeSet<&str> = seen.iter().map(|run| run.0.as_str()).collect();
    if !running.iter().map(String::as_str).eq(seen.iter().copied()) {
        return Err(StateError::Contention { what: "the running runs".to_string() });
    }
    Ok(())
}

/// The claim's check of the environments (`rows`: every stored (name, plan id)) against what the
/// janitor read: `Contention` for the first, by name, that is missing from `seen` or shows
/// another plan there.
pub(crate) fn check_environments_seen(
    rows: Vec<(String, Option<String>)>,
    seen: &BTreeMap<EnvironmentName, Option<PlanId>>,
) -> Result<(), StateError> {
    let mut stored = BTreeMap::new();
    for (name, plan) in rows {
        stored.insert(environment_name(&name)?, plan);
    }
    for (name, plan) in stored {
        let matches = seen.get(&name).is_some_and(|expected| same_plan(expected.as_ref(), plan.as_deref()));
        if !matches {
            return Err(StateError::Contention { what: format!("environment {name}") });
        }
    }
    Ok(())
}

/// An environment row and its snapshot rows, from either store.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct EnvironmentRow {
    pub name: String,
    pub plan_id: Option<String>,
    pub has_previous: bool,
    pub previous_plan_id: Option<String>,
    pub expires_at: Option<i64>,
    pub updated_at: i64,
    /// `current` or `previous`; `None` for an environment without snapshots.
    pub generation: Option<String>,
    pub snapshot_id: Option<String>,
    pub body: Option<String>,
}

/// Folds rows ordered by environment, generation and position into records.
pub(crate) fn environments_from_rows(rows: Vec<EnvironmentRow>) -> Result<Vec<EnvironmentRecord>, StateError> {
    let mut records: Vec<EnvironmentRecord> = Vec::new();
    for row in rows {
        let starts_new = records.last().is_none_or(|record| record.state.name.as_str() != row.name);
        if starts_new {
            let name = environment_name(&row.name)?;
            let previous = row.has_previous.then(|| EnvironmentState {
                name: name.clone(),
                plan_id: row.previous_plan_id.clone().map(PlanId),
                snapshots: Vec::new(),
            });
            records.push(EnvironmentRecord {
                state: EnvironmentState { name, plan_id: row.plan_id.clone().map(PlanId), snapshots: Vec::new() },
                previous,
                expires_at: row.expires_at.map(Timestamp),
                updated_at: Timestamp(row.updated_at),
            });
        }
        let (Some(generation), Some(snapshot_id), Some(body)) = (&row.generation, &row.snapshot_id, &row.body) else {
            continue;
        };
        let snapshot = decode_snapshot(snapshot_id, body)?;
        let Some(record) = records.last_mut() else { continue };
        match generation.as_str() {
            "current" => record.state.snapshots.push(snapshot),
            "previous" => match &mut record.previous {
                Some(previous) => previous.snapshots.push(snapshot),
                None => {
                    return Err(StateError::corrupt(
                        format!("environment {}", row.name),
                        "it has previous snapshots but no previous state",
                    ));
                }
            },
            other => {
                return Err(StateError::corrupt(
                    format!("environment {}", row.name),
                    format!("unknown generation {other}"),
                ));
            }
        }
    }
    Ok(records)
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct LeaseRow {
    pub environment: String,
    pub plan_id: String,
    pub run_id: String,
    pub expires_at: i64,
}

impl LeaseRow {
    pub fn into_lease(self) -> Result<EnvironmentLease, StateError> {
        Ok(EnvironmentLease {
            environment: environment_name(&self.environment)?,
            plan_id: PlanId(self.plan_id),
            run_id: RunId(self.run_id),
            expires_at: Timestamp(self.expires_at),
        })
    }

    /// The refusal a caller gets while this lease is held by someone else.
    pub fn held_error(self) -> Result<StateError, StateError> {
        let lease = self.into_lease()?;
        Ok(StateError::LeaseHeld {
            environment: lease.environment,
            holder_plan: lease.plan_id,
            holder_run: lease.run_id,
            expires_at: lease.expires_at,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RunRow {
    pub id: String,
    pub plan_id: String,
    pub environment: String,
    pub status: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub intervals_done: i64,
    pub tasks_done: i64,
    pub retries: i64,
    pub error: Option<String>,
    pub user_name: String,
    pub promoting: bool,
}

impl RunRow {
    pub fn into_record(self) -> Result<RunRecord, StateError> {
        let what = || format!("run {}", self.id);
        let status = RunStatus::parse(&self.status)
            .ok_or_else(|| StateError::corrupt(what(), format!("unknown status {:?}", self.status)))?;
        Ok(RunRecord {
            environment: environment_name(&self.environment)?,
            status,
            started_at: Timestamp(self.started_at),
            finished_at: self.finished_at.map(Timestamp),
            intervals_done: from_stored_count(self.intervals_done, "run intervals_done")?,
            tasks_done: from_stored_count(self.tasks_done, "run tasks_done")?,
            retries: from_stored_count(self.retries, "run retries")?,
            error: self.error,
            user: self.user_name,
            promoting: self.promoting,
            plan_id: PlanId(self.plan_id),
            id: RunId(self.id),
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct TaskFailureRow {
    pub task_id: Vec<u8>,
    pub model: String,
    pub interval_start: i64,
    pub interval_end: i64,
    pub error: String,
    pub attempts: i64,
}

impl TaskFailureRow {
    pub fn into_failure(self) -> Result<TaskFailure, StateError> {
        let attempts = u32::try_from(self.attempts)
            .map_err(|_| StateError::corrupt("task failure", format!("attempts {} out of range", self.attempts)))?;
        Ok(TaskFailure {
            task_id: task_id(&self.task_id)?,
            model: model_name(&self.model)?,
            interval: Interval { start: Timestamp(self.interval_start), end: Timestamp(self.interval_end) },
            error: self.error,
            attempts,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct PlanSummaryRow {
    pub id: String,
    pub environment: String,
    pub previous_plan_id: Option<String>,
    pub created_at: i64,
}

impl PlanSummaryRow {
    pub fn into_summary(self) -> Result<PlanSummary, StateError> {
        Ok(PlanSummary {
            environment: environment_name(&self.environment)?,
            id: PlanId(self.id),
            previous_plan_id: self.previous_plan_id.map(PlanId),
            created_at: Timestamp(self.created_at),
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct AuditRow {
    pub plan_id: String,
    pub run_id: String,
    pub environment: String,
    pub user_name: String,
    pub started_at: i64,
    pub finished_at: i64,
    pub intervals: i64,
    pub models: i64,
    pub retries: i64,
    pub outcome: String,
}

impl AuditRow {
    pub fn into_entry(self) -> Result<AuditEntry, StateError> {
        Ok(AuditEntry {
            plan_id: PlanId(self.plan_id),
            run_id: RunId(self.run_id),
            environment: environment_name(&self.environment)?,
            user: self.user_name,
            started_at: Timestamp(self.started_at),
            finished_at: Timestamp(self.finished_at),
            intervals: from_stored_count(self.intervals, "audit intervals")?,
            models: from_stored_count(self.models, "audit models")?,
            retries: from_stored_count(self.retries, "audit retries")?,
            outcome: self.outcome,
        })
    }
}

/// One stored interval row read for a write: `write_index` is the position, in the batch's
/// `IntervalWrite` list, of the key it was read for (so no name or version is sent back).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct IntervalRow {
    pub write_index: i64,
    pub id: i64,
    pub start_ts: i64,
    pub end_ts: i64,
}

/// The new intervals of one key in a record batch, compacted, and the envelope
/// `[low, high]` (first start, last end) in which stored rows can touch them.
#[derive(Debug)]
pub(crate) struct IntervalWrite {
    pub name: String,
    pub version: String,
    pub new: IntervalSet,
    pub low: i64,
    pub high: i64,
}

/// Groups and compacts a batch of records per key; empty intervals are dropped, and an inverted
/// one (`start > end`) is refused.
pub(crate) fn group_interval_records(records: &[IntervalRecord]) -> Result<Vec<IntervalWrite>, StateError> {
    let mut by_key: BTreeMap<(String, String), Vec<Interval>> = BTreeMap::new();
    for record in records {
        if record.interval.start > record.interval.end {
            return Err(StateError::Invalid {
                reason: format!("interval {} of {} ends before it starts", record.interval, record.name),
            });
        }
        by_key.entry((record.name.to_string(), record.version.0.clone())).or_default().push(record.interval);
    }
    let mut writes = Vec::with_capacity(by_key.len());
    for ((name, version), intervals) in by_key {
        let new = IntervalSet::from_intervals(intervals);
        let (Some(first), Some(last)) = (new.ranges().first(), new.ranges().last()) else { continue };
        let (low, high) = (first.start.0, last.end.0);
        writes.push(IntervalWrite { name, version, new, low, high });
    }
    Ok(writes)
}

/// What to write for a batch: stored rows to delete and ranges to insert. Stored rows and new
/// ranges that overlap or touch form groups; a group with a new range is replaced by one row,
/// its union, unless that union is already one stored row (then nothing is written). Every
/// deleted range lies inside an inserted one, so nothing recorded is lost even when a
/// concurrent writer read the same rows; groups without a new range are left alone, so a write
/// costs what it merges, not how many rows the key has.
#[derive(Debug, Default)]
pub(crate) struct IntervalRewrite {
    pub delete_ids: Vec<i64>,
    /// (name, version, start, end)
    pub insert: Vec<(String, String, i64, i64)>,
}

impl IntervalRewrite {
    pub fn is_empty(&self) -> bool {
        self.delete_ids.is_empty() && self.insert.is_empty()
    }
}

pub(crate) fn plan_interval_rewrite(writes: &[IntervalWrite], stored: Vec<IntervalRow>) -> IntervalRewrite {
    let mut stored_by_write: BTreeMap<i64, Vec<IntervalRow>> = BTreeMap::new();
    for row in stored {
        stored_by_write.entry(row.write_index).or_default().push(row);
    }
    let mut rewrite = IntervalRewrite::default();
    for (write_index, write) in (0_i64..).zip(writes) {
        let rows = stored_by_write.remove(&write_index).unwrap_or_default();
        // (start, end, stored row id or None for a new range), swept in start order.
        let mut items: Vec<(i64, i64, Option<i64>)> =
            write.new.ranges().iter().map(|range| (range.start.0, range.end.0, None)).collect();
        items.extend(rows.iter().map(|row| (row.start_ts, row.end_ts, Some(row.id))));
        items.sort_unstable();
        let mut index = 0;
        while index < items.len() {
            let (group_start, mut group_end, _) = items[index];
            let mut group_ids = Vec::new();
            let mut single_row_bounds = None;
            let mut has_new = false;
            while let Some(&(start, end, id)) = items.get(index)
                && start <= group_end
            {
                group_end = group_end.max(end);
                match id {
                    Some(id) => {
                        group_ids.push(id);
                        single_row_bounds = Some((start, end));
                    }
                    None => has_new = true,
                }
                index += 1;
            }
            let already_stored = group_ids.len() == 1 && single_row_bounds == Some((group_start, group_end));
            if !has_new || already_stored {
                continue;
            }
            rewrite.delete_ids.extend(group_ids);
            rewrite.insert.push((write.name.clone(), write.version.clone(), group_start, group_end));
        }
    }
    rewrite.delete_ids.sort_unstable();
    rewrite.delete_ids.dedup();
    rewrite
}

/// The intervals a restatement plan forgets (`Plan::restatements`), grouped like a record batch.
pub(crate) fn restated_interval_writes(plan: &Plan) -> Result<Vec<IntervalWrite>, StateError> {
    let records: Vec<IntervalRecord> = plan
        .restatements
        .iter()
        .map(|restatement| IntervalRecord {
            name: restatement.name.clone(),
            version: restatement.version.clone(),
            interval: restatement.interval,
        })
        .collect();
    group_interval_records(&records)
}

/// What to write to forget intervals: every stored row that a removed range overlaps is deleted,
/// and what it holds outside the removed ranges is inserted again. Rows that only touch a removed
/// range stay as they are.
pub(crate) fn plan_interval_removal(removals: &[IntervalWrite], stored: Vec<IntervalRow>) -> IntervalRewrite {
    let mut rewrite = IntervalRewrite::default();
    for row in stored {
        let Some(removal) = usize::try_from(row.write_index).ok().and_then(|index| removals.get(index)) else {
            continue;
        };
        let whole = Interval { start: Timestamp(row.start_ts), end: Timestamp(row.end_ts) };
        let mut kept = IntervalSet::from_intervals([whole]);
        for range in removal.new.ranges() {
            kept.remove(*range);
        }
        if kept.ranges() == [whole] {
            continue;
        }
        rewrite.delete_ids.push(row.id);
        for range in kept.ranges() {
            rewrite.insert.push((removal.name.clone(), removal.version.clone(), range.start.0, range.end.0));
        }
    }
    rewrite.delete_ids.sort_unstable();
    rewrite.delete_ids.dedup();
    rewrite
}

/// Folds stored interval rows into one set per requested key (empty when nothing is recorded).
pub(crate) fn interval_sets_from_rows(
    keys: &[IntervalKey],
    rows: Vec<(String, String, i64, i64)>,
) -> BTreeMap<IntervalKey, IntervalSet> {
    let mut by_text: BTreeMap<(String, String), Vec<Interval>> = BTreeMap::new();
    for (name, version, start, end) in rows {
        by_text.entry((name, version)).or_default().push(Interval { start: Timestamp(start), end: Timestamp(end) });
    }
    let mut sets = BTreeMap::new();
    for (name, version) in keys {
        let intervals = by_text.remove(&(name.to_string(), version.0.clone())).unwrap_or_default();
        sets.insert((name.clone(), version.clone()), IntervalSet::from_intervals(intervals));
    }
    sets
}

/// Keys as two parallel text columns, deduplicated and sorted.
pub(crate) fn interval_key_columns(keys: &[IntervalKey]) -> (Vec<String>, Vec<String>) {
    let mut unique: Vec<(String, String)> =
        keys.iter().map(|(name, version)| (name.to_string(), version.0.clone())).collect();
    unique.sort_unstable();
    unique.dedup();
    unique.into_iter().unzip()
}

/// Snapshots as insert columns (id, name, version, body), deduplicated and sorted by id so that
/// concurrent inserts lock rows in the same order.
pub(crate) fn snapshot_columns(snapshots: &[Snapshot]) -> Result<Vec<(String, String, String, String)>, StateError> {
    let mut by_id: BTreeMap<&SnapshotId, &Snapshot> = BTreeMap::new();
    for snapshot in snapshots {
        by_id.entry(&snapshot.id).or_insert(snapshot);
    }
    let mut columns = Vec::with_capacity(by_id.len());
    for (id, snapshot) in by_id {
        let body = to_json("snapshot", snapshot)?;
        columns.push((id.0.clone(), snapshot.name.to_string(), snapshot.version.0.clone(), body));
    }
    Ok(columns)
}

/// Deduplicated, sorted snapshot ids as text.
pub(crate) fn snapshot_id_texts(ids: &[SnapshotId]) -> Vec<String> {
    let mut texts: Vec<String> = ids.iter().map(|id| id.0.clone()).collect();
    texts.sort_unstable();
    texts.dedup();
    texts
}

#[cfg(test)]
mod tests {
    use super::*;

    use sluice_core::names::Version;

    fn record(start: i64, end: i64) -> IntervalRecord {
        IntervalRecord {
            name: ModelName::parse("a.b").unwrap(),
            version: Version("v1".to_string()),
            interval: Interval { start: Timestamp(start), end: Timestamp(end) },
        }
    }

    fn row(id: i64, start_ts: i64, end_ts: i64) -> IntervalRow {
        IntervalRow { write_index: 0, id, start_ts, end_ts }
    }

    fn inserted(rewrite: &IntervalRewrite) -> Vec<(i64, i64)> {
        rewrite.insert.iter().map(|(_, _, start, end)| (*start, *end)).collect()
    }

    #[test]
    fn rewrite_merges_touching_rows_and_leaves_the_rest() {
        let writes = group_interval_records(&[record(10, 20), record(20, 30), record(50, 60)]).unwrap();
        assert_eq!(writes.len(), 1);
        assert_eq!((writes[0].low, writes[0].high), (10, 60));
        let rewrite = plan_interval_rewrite(&writes, vec![row(7, 0, 10), row(3, 40, 45)]);
        assert_eq!(rewrite.delete_ids, vec![7]);
        assert_eq!(inserted(&rewrite), vec![(0, 30), (50, 60)]);
    }

    #[test]
    fn rewrite_follows_chains_of_overlapping_rows() {
        // [0, 6) touches [10, 20) only through [5, 12), a row left overlapping by a race.
        let writes = group_interval_records(&[record(10, 20)]).unwrap();
        let rewrite = plan_interval_rewrite(&writes, vec![row(1, 0, 6), row(2, 5, 12), row(3, 30, 40)]);
        assert_eq!(rewrite.delete_ids, vec![1, 2]);
        assert_eq!(inserted(&rewrite), vec![(0, 20)]);
    }

    #[test]
    fn recording_what_is_stored_writes_nothing() {
        let writes = group_interval_records(&[record(10, 20), record(30, 40)]).unwrap();
        let rewrite = plan_interval_rewrite(&writes, vec![row(1, 0, 100)]);
        assert!(rewrite.is_empty(), "{rewrite:?}");
        // Two overlapping rows that cover it are compacted into one.
        let rewrite = plan_interval_rewrite(&writes, vec![row(1, 0, 100), row(2, 50, 60)]);
        assert_eq!(rewrite.delete_ids, vec![1, 2]);
        assert_eq!(inserted(&rewrite), vec![(0, 100)]);
    }

    #[test]
    fn inverted_intervals_are_refused_and_empty_ones_dropped() {
        assert!(group_interval_records(&[record(20, 10)]).is_err());
        assert!(group_interval_records(&[record(10, 10)]).unwrap().is_empty());
    }
}
