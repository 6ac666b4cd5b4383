//! `SqliteState`: the state store of embedded mode, one SQLite file (`.sluice/state.db`) in WAL
//! mode. Every write transaction starts with `BEGIN IMMEDIATE`, so writers queue on SQLite's
//! write lock (with a busy timeout) instead of failing on a lock upgrade; that also makes every
//! read-check-write sequence here serial. Lists of keys travel as one JSON parameter read with
//! `json_each`, so a batch is one statement.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::interval::{Interval, IntervalSet, Timestamp};
use sluice_core::names::{EnvironmentName, PlanId, SnapshotId, TaskId};
use sluice_core::plan::Plan;
use sluice_core::snapshot::Snapshot;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use crate::codec::{
    AuditRow, EnvironmentRow, IntervalRewrite, IntervalRow, IntervalWrite, LeaseRow, PlanSummaryRow, RunRow,
    TaskFailureRow, check_environments_seen, check_running_seen, decode_plan, decode_snapshot, environment_name,
    environments_from_rows, group_interval_records, interval_key_columns, interval_sets_from_rows, lease_expiry,
    plan_interval_removal, plan_interval_rewrite, restated_interval_writes, same_plan, snapshot_columns,
    snapshot_id_texts, task_id, to_json, to_stored_count, tombstone_keys,
};
use crate::error::{StateError, is_foreign_key_violation, is_transient_sqlx, is_unique_violation};
use crate::store::{
    AuditLog, BreakerStore, DropStore, EnvironmentStore, IntervalStore, LeaseStore, PlanStore, RunStore, SnapshotStore,
    TaskStore,
};
use crate::types::{
    AuditEntry, EnvironmentLease, EnvironmentPromotion, EnvironmentRecord, FinishedTask, IntervalKey, IntervalRecord,
    PlanSummary, RunFinalization, RunId, RunOutcome, RunProgress, RunRecord, RunStart, RunStatus, TaskFailure,
    TaskOutlook,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a writer waits for SQLite's write lock before giving up with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections in the pool: WAL lets readers run beside the one writer.
const MAX_CONNECTIONS: u32 = 8;

/// The state store in one SQLite file.
#[derive(Clone)]
pub struct SqliteState {
    pool: SqlitePool,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteState").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SqliteState {
    /// Opens (creating the folder and the file if needed) the state file at `path` and brings
    /// its schema up to date. WAL journal, full sync, foreign keys on.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteState, StateError> {
        let path = path.as_ref().to_path_buf();
        let connect_error = |reason: String, transient: bool| StateError::Connect {
            target: format!("sqlite file {}", path.display()),
            reason,
            transient,
        };
        if let Some(folder) = path.parent().filter(|folder| !folder.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(folder)
                .await
                .map_err(|error| connect_error(format!("cannot create folder {}: {error}", folder.display()), false))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(|error| connect_error(error.to_string(), is_transient_sqlx(&error)))?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteState { pool, path })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StateError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

fn json_list<T: serde::Serialize>(values: &T) -> Result<String, StateError> {
    to_json("key list", values)
}

/// Fails with `TableBeingDropped` if any of the (name, version) pairs has a tombstone, inside
/// the caller's write transaction (`BEGIN IMMEDIATE` makes the check and the caller's writes
/// one step for the janitor's claim).
async fn check_not_being_dropped(connection: &mut SqliteConnection, keys: &[(&str, &str)]) -> Result<(), StateError> {
    if keys.is_empty() {
        return Ok(());
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT d.name, d.version
         FROM json_each(?1) AS k JOIN sluice_tables_being_dropped AS d
           ON d.name = k.value ->> 0 AND d.version = k.value ->> 1",
    )
    .bind(json_list(&keys)?)
    .fetch_all(&mut *connection)
    .await?;
    let claimed = tombstone_keys(rows)?;
    match StateError::table_being_dropped(&claimed) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Records intervals inside the caller's transaction, merged with the stored ranges they touch;
/// fails with `TableBeingDropped` (writing nothing) if a table has a tombstone.
async fn write_intervals(connection: &mut SqliteConnection, records: &[IntervalRecord]) -> Result<(), StateError> {
    let writes = group_interval_records(records)?;
    if writes.is_empty() {
        return Ok(());
    }
    let keys: Vec<(&str, &str)> = writes.iter().map(|write| (write.name.as_str(), write.version.as_str())).collect();
    check_not_being_dropped(&mut *connection, &keys).await?;
    let stored = touching_interval_rows(&mut *connection, &writes).await?;
    apply_interval_rewrite(connection, plan_interval_rewrite(&writes, stored)).await
}

/// Forgets the intervals of a restatement plan inside the caller's transaction (`begin_run` of
/// the plan's first run, after its checks).
async fn forget_intervals(connection: &mut SqliteConnection, removals: &[IntervalWrite]) -> Result<(), StateError> {
    if removals.is_empty() {
        return Ok(());
    }
    let stored = touching_interval_rows(&mut *connection, removals).await?;
    apply_interval_rewrite(connection, plan_interval_removal(removals, stored)).await
}

/// The stored rows of each write's key that overlap or touch its envelope.
async fn touching_interval_rows(
    connection: &mut SqliteConnection,
    writes: &[IntervalWrite],
) -> Result<Vec<IntervalRow>, StateError> {
    let envelopes: Vec<(&str, &str, i64, i64)> =
        writes.iter().map(|write| (write.name.as_str(), write.version.as_str(), write.low, write.high)).collect();
    let stored = sqlx::query_as::<_, IntervalRow>(
        "SELECT k.key AS write_index, i.id, i.start_ts, i.end_ts
         FROM json_each(?1) AS k CROSS JOIN sluice_intervals AS i
         WHERE i.name = k.value ->> 0 AND i.version = k.value ->> 1
           AND i.start_ts <= k.value ->> 3 AND i.end_ts >= k.value ->> 2",
    )
    .bind(json_list(&envelopes)?)
    .fetch_all(&mut *connection)
    .await?;
    Ok(stored)
}

async fn apply_interval_rewrite(connection: &mut SqliteConnection, rewrite: IntervalRewrite) -> Result<(), StateError> {
    if rewrite.is_empty() {
        return Ok(());
    }
    if !rewrite.delete_ids.is_empty() {
        sqlx::query("DELETE FROM sluice_intervals WHERE id IN (SELECT value FROM json_each(?1))")
            .bind(json_list(&rewrite.delete_ids)?)
            .execute(&mut *connection)
            .await?;
    }
    sqlx::query(
        "INSERT INTO sluice_intervals (name, version, start_ts, end_ts)
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?1)",
    )
    .bind(json_list(&rewrite.insert)?)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

async fn plan_has_run(connection: &mut SqliteConnection, plan_id: &PlanId) -> Result<bool, StateError> {
    let row = sqlx::query("SELECT EXISTS (SELECT 1 FROM sluice_runs WHERE plan_id = ?1) AS ran")
        .bind(&plan_id.0)
        .fetch_one(&mut *connection)
        .await?;
    Ok(row.try_get::<i64, _>("ran")? != 0)
}

async fn insert_snapshots(connection: &mut SqliteConnection, snapshots: &[Snapshot]) -> Result<(), StateError> {
    for (id, name, version, body) in snapshot_columns(snapshots)? {
        sqlx::query(
            "INSERT INTO sluice_snapshots (id, name, version, body) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(name)
        .bind(version)
        .bind(body)
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}

/// The plan id the environment shows: `None` if it does not exist, `Some(None)` if it shows none.
async fn environment_plan(
    connection: &mut SqliteConnection,
    name: &EnvironmentName,
) -> Result<Option<Option<String>>, StateError> {
    let row = sqlx::query("SELECT plan_id FROM sluice_environments WHERE name = ?1")
        .bind(name.as_str())
        .fetch_optional(&mut *connection)
        .await?;
    match row {
        Some(row) => Ok(Some(row.try_get::<Option<String>, _>("plan_id")?)),
        None => Ok(None),
    }
}

async fn select_lease(
    connection: &mut SqliteConnection,
    environment: &EnvironmentName,
) -> Result<Option<LeaseRow>, StateError> {
    Ok(sqlx::query_as::<_, LeaseRow>(
        "SELECT environment, plan_id, run_id, expires_at FROM sluice_leases WHERE environment = ?1",
    )
    .bind(environment.as_str())
    .fetch_optional(&mut *connection)
    .await?)
}

async fn select_run(connection: &mut SqliteConnection, id: &RunId) -> Result<Option<RunRecord>, StateError> {
    let row = sqlx::query_as::<_, RunRow>(
        "SELECT id, plan_id, environment, status, started_at, finished_at, intervals_done, tasks_done, retries, error, user_name, promoting
         FROM sluice_runs WHERE id = ?1",
    )
    .bind(&id.0)
    .fetch_optional(&mut *connection)
    .await?;
    row.map(RunRow::into_record).transpose()
}

/// The error of a compare-and-swap that found the environment showing `actual`.
fn stale_environment(promotion: &EnvironmentPromotion<'_>, actual: Option<String>) -> StateError {
    StateError::StaleEnvironment {
        environment: promotion.state.name.clone(),
        expected: promotion.expected_plan.cloned(),
        actual: actual.map(PlanId),
    }
}

/// Whether the environment (as [`environment_plan`] read it) exists and shows `plan`.
fn environment_shows(current: Option<&Option<String>>, plan: Option<&PlanId>) -> bool {
    current.is_some_and(|shown| same_plan(plan, shown.as_deref()))
}

/// The compare-and-swap of [`EnvironmentStore::promote_environment`] inside the caller's write
/// transaction, on the environment as [`environment_plan`] read it there (`current`): fails with
/// `StaleEnvironment` (having written nothing) unless it shows `promotion.expected_plan`;
/// otherwise the state shown becomes `previous`, and the new state's snapshots are inserted if
/// absent.
async fn promote_in(
    connection: &mut SqliteConnection,
    promotion: &EnvironmentPromotion<'_>,
    current: Option<Option<String>>,
) -> Result<(), StateError> {
    let state = promotion.state;
    let name = &state.name;
    let snapshot_ids: Vec<&str> = state.snapshots.iter().map(|snapshot| snapshot.id.0.as_str()).collect();
    let snapshot_list = json_list(&snapshot_ids)?;
    let exists = current.is_some();
    let actual = current.flatten();
    if !same_plan(promotion.expected_plan, actual.as_deref()) {
        return Err(stale_environment(promotion, actual));
    }
    insert_snapshots(&mut *connection, &state.snapshots).await?;
    let plan_id = state.plan_id.as_ref().map(|plan| plan.0.as_str());
    let expires_at = promotion.expires_at.map(|time| time.0);
    if exists {
        sqlx::query("DELETE FROM sluice_environment_snapshots WHERE environment = ?1 AND generation = 'previous'")
            .bind(name.as_str())
            .execute(&mut *connection)
            .await?;
        sqlx::query(
            "UPDATE sluice_environment_snapshots SET generation = 'previous'
             WHERE environment = ?1 AND generation = 'current'",
        )
        .bind(name.as_str())
        .execute(&mut *connection)
        .await?;
        sqlx::query(
            "UPDATE sluice_environments
             SET previous_plan_id = plan_id, has_previous = 1, plan_id = ?2, expires_at = ?3, updated_at = ?4
             WHERE name = ?1",
        )
        .bind(name.as_str())
        .bind(plan_id)
        .bind(expires_at)
        .bind(promotion.now.0)
        .execute(&mut *connection)
        .await?;
    } else {
        sqlx::query(
            "INSERT INTO sluice_environments (name, plan_id, has_previous, previous_plan_id, expires_at, updated_at)
             VALUES (?1, ?2, 0, NULL, ?3, ?4)",
        )
        .bind(name.as_str())
        .bind(plan_id)
        .bind(expires_at)
        .bind(promotion.now.0)
        .execute(&mut *connection)
        .await?;
    }
    sqlx::query(
        "INSERT INTO sluice_environment_snapshots (environment, generation, position, snapshot_id)
         SELECT ?1, 'current', key, value FROM json_each(?2)",
    )
    .bind(name.as_str())
    .bind(&snapshot_list)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Records a running run's outcome inside the caller's transaction; `false` if the run does not
/// exist or is not running (then nothing changed).
async fn record_outcome(
    connection: &mut SqliteConnection,
    id: &RunId,
    outcome: &RunOutcome,
) -> Result<bool, StateError> {
    let updated = sqlx::query(
        "UPDATE sluice_runs SET status = ?2, error = ?3, finished_at = ?4 WHERE id = ?1 AND status = 'running'",
    )
    .bind(&id.0)
    .bind(outcome.status.as_str())
    .bind(&outcome.error)
    .bind(outcome.finished_at.0)
    .execute(&mut *connection)
    .await?;
    Ok(updated.rows_affected() > 0)
}

/// Deletes the environment's lease if `run_id` holds it, inside the caller's transaction.
async fn delete_lease(
    connection: &mut SqliteConnection,
    environment: &EnvironmentName,
    run_id: &RunId,
) -> Result<(), StateError> {
    sqlx::query("DELETE FROM sluice_leases WHERE environment = ?1 AND run_id = ?2")
        .bind(environment.as_str())
        .bind(&run_id.0)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// Appends one audit row inside the caller's transaction.
async fn insert_audit(connection: &mut SqliteConnection, entry: &AuditEntry) -> Result<(), StateError> {
    sqlx::query(
        "INSERT INTO sluice_audit_log
            (plan_id, run_id, environment, user_name, started_at, finished_at, intervals, models, retries, outcome)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .bind(&entry.plan_id.0)
    .bind(&entry.run_id.0)
    .bind(entry.environment.as_str())
    .bind(&entry.user)
    .bind(entry.started_at.0)
    .bind(entry.finished_at.0)
    .bind(to_stored_count(entry.intervals, "intervals")?)
    .bind(to_stored_count(entry.models, "models")?)
    .bind(to_stored_count(entry.retries, "retries")?)
    .bind(&entry.outcome)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Closes the plan's circuit breaker inside the caller's transaction.
async fn delete_breaker(connection: &mut SqliteConnection, plan_id: &PlanId) -> Result<(), StateError> {
    sqlx::query("DELETE FROM sluice_breakers WHERE plan_id = ?1").bind(&plan_id.0).execute(&mut *connection).await?;
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

/// Marks every running run of the environment aborted, superseded by `start.run_id`, and appends
/// each one's audit row, inside `begin_run`'s transaction. Returns how many runs it aborted.
async fn supersede_runs(connection: &mut SqliteConnection, start: &RunStart<'_>) -> Result<usize, StateError> {
    let environment = &start.plan.environment;
    let rows = sqlx::query_as::<_, RunRow>(
        "SELECT id, plan_id, environment, status, started_at, finished_at, intervals_done, tasks_done, retries, error, user_name, promoting
         FROM sluice_runs WHERE environment = ?1 AND status = 'running' ORDER BY seq",
    )
    .bind(environment.as_str())
    .fetch_all(&mut *connection)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let runs = rows.into_iter().map(RunRow::into_record).collect::<Result<Vec<_>, _>>()?;
    // A promoting run is never superseded; the error rolls back `begin_run`'s transaction.
    if let Some(promoting) = runs.iter().find(|run| run.promoting) {
        return Err(StateError::RunPromoting { run: promoting.id.clone(), environment: promoting.environment.clone() });
    }
    sqlx::query(
        "UPDATE sluice_runs SET status = 'aborted', finished_at = ?2, error = ?3
         WHERE environment = ?1 AND status = 'running'",
    )
    .bind(environment.as_str())
    .bind(start.now.0)
    .bind(format!("lease taken over by run {}", start.run_id))
    .execute(&mut *connection)
    .await?;
    let superseded = runs.len();
    for run in runs {
        insert_audit(&mut *connection, &superseded_audit(&run, start.run_id, start.now)).await?;
    }
    Ok(superseded)
}

#[async_trait]
impl SnapshotStore for SqliteState {
    async fn put_snapshots(&self, snapshots: &[Snapshot]) -> Result<(), StateError> {
        if snapshots.is_empty() {
            return Ok(());
        }
        let mut transaction = self.begin_write().await?;
        insert_snapshots(&mut transaction, snapshots).await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn get_snapshots(&self, ids: &[SnapshotId]) -> Result<BTreeMap<SnapshotId, Snapshot>, StateError> {
        let mut snapshots = BTreeMap::new();
        if ids.is_empty() {
            return Ok(snapshots);
        }
        let rows = sqlx::query("SELECT id, body FROM sluice_snapshots WHERE id IN (SELECT value FROM json_each(?1))")
            .bind(json_list(&snapshot_id_texts(ids))?)
            .fetch_all(&self.pool)
            .await?;
        for row in rows {
            let id: String = row.try_get("id")?;
            let body: String = row.try_get("body")?;
            let snapshot = decode_snapshot(&id, &body)?;
            snapshots.insert(snapshot.id.clone(), snapshot);
        }
        Ok(snapshots)
    }

    async fn all_snapshots(&self) -> Result<Vec<Snapshot>, StateError> {
        let rows = sqlx::query("SELECT id, body FROM sluice_snapshots ORDER BY id").fetch_all(&self.pool).await?;
        let mut snapshots = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            let body: String = row.try_get("body")?;
            snapshots.push(decode_snapshot(&id, &body)?);
        }
        Ok(snapshots)
    }

    async fn delete_snapshots(&self, ids: &[SnapshotId]) -> Result<(), StateError> {
        if ids.is_empty() {
            return Ok(());
        }
        let list = json_list(&snapshot_id_texts(ids))?;
        let mut transaction = self.begin_write().await?;
        let in_use = sqlx::query(
            "SELECT snapshot_id, environment FROM sluice_environment_snapshots
             WHERE snapshot_id IN (SELECT value FROM json_each(?1))
             ORDER BY snapshot_id, environment LIMIT 1",
        )
        .bind(&list)
        .fetch_optional(&mut *transaction)
        .await?;
        if let Some(row) = in_use {
            let snapshot: String = row.try_get("snapshot_id")?;
            let environment: String = row.try_get("environment")?;
            return Err(StateError::SnapshotInUse {
                snapshot: SnapshotId(snapshot),
                environment: environment_name(&environment)?,
            });
        }
        sqlx::query("DELETE FROM sluice_snapshots WHERE id IN (SELECT value FROM json_each(?1))")
            .bind(&list)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }
}

const ENVIRONMENT_BY_NAME: &str =
    "SELECT e.name, e.plan_id, e.has_previous, e.previous_plan_id, e.expires_at, e.updated_at,
        es.generation, es.snapshot_id, s.body
 FROM sluice_environments e
 LEFT JOIN sluice_environment_snapshots es ON es.environment = e.name
 LEFT JOIN sluice_snapshots s ON s.id = es.snapshot_id
 WHERE e.name = ?1
 ORDER BY e.name, es.generation, es.position";

const ALL_ENVIRONMENTS: &str =
    "SELECT e.name, e.plan_id, e.has_previous, e.previous_plan_id, e.expires_at, e.updated_at,
        es.generation, es.snapshot_id, s.body
 FROM sluice_environments e
 LEFT JOIN sluice_environment_snapshots es ON es.environment = e.name
 LEFT JOIN sluice_snapshots s ON s.id = es.snapshot_id
 ORDER BY e.name, es.generation, es.position";

#[async_trait]
impl EnvironmentStore for SqliteState {
    async fn get_environment(&self, name: &EnvironmentName) -> Result<Option<EnvironmentRecord>, StateError> {
        let rows =
            sqlx::query_as::<_, EnvironmentRow>(ENVIRONMENT_BY_NAME).bind(name.as_str()).fetch_all(&self.pool).await?;
        Ok(environments_from_rows(rows)?.into_iter().next())
    }

    async fn list_environments(&self) -> Result<Vec<EnvironmentRecord>, StateError> {
        let rows = sqlx::query_as::<_, EnvironmentRow>(ALL_ENVIRONMENTS).fetch_all(&self.pool).await?;
        environments_from_rows(rows)
    }

    async fn promote_environment(&self, promotion: EnvironmentPromotion<'_>) -> Result<(), StateError> {
        let mut transaction = self.begin_write().await?;
        let current = environment_plan(&mut transaction, &promotion.state.name).await?;
        promote_in(&mut transaction, &promotion, current).await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn delete_environment(&self, name: &EnvironmentName) -> Result<(), StateError> {
        sqlx::query("DELETE FROM sluice_environments WHERE name = ?1").bind(name.as_str()).execute(&self.pool).await?;
        Ok(())
    }
}

#[async_trait]
impl LeaseStore for SqliteState {
    async fn get_lease(&self, environment: &EnvironmentName) -> Result<Option<EnvironmentLease>, StateError> {
        let mut connection = self.pool.acquire().await?;
        select_lease(&mut connection, environment).await?.map(LeaseRow::into_lease).transpose()
    }

    async fn renew_lease(
        &self,
        environment: &EnvironmentName,
        run_id: &RunId,
        ttl_seconds: i64,
        now: Timestamp,
    ) -> Result<EnvironmentLease, StateError> {
        let expires_at = lease_expiry(now, ttl_seconds)?;
        let mut connection = self.pool.acquire().await?;
        let renewed = sqlx::query_as::<_, LeaseRow>(
            "UPDATE sluice_leases SET expires_at = ?3 WHERE environment = ?1 AND run_id = ?2
             RETURNING environment, plan_id, run_id, expires_at",
        )
        .bind(environment.as_str())
        .bind(&run_id.0)
        .bind(expires_at.0)
        .fetch_optional(&mut *connection)
        .await?;
        if let Some(lease) = renewed {
            return lease.into_lease();
        }
        match select_lease(&mut connection, environment).await? {
            Some(holder) => Err(holder.held_error()?),
            None => Err(StateError::not_found(format!("lease of environment {environment}"))),
        }
    }

    async fn release_lease(&self, environment: &EnvironmentName, run_id: &RunId) -> Result<(), StateError> {
        let mut connection = self.pool.acquire().await?;
        delete_lease(&mut connection, environment, run_id).await
    }
}

#[async_trait]
impl IntervalStore for SqliteState {
    async fn record_intervals(&self, records: &[IntervalRecord]) -> Result<(), StateError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut transaction = self.begin_write().await?;
        write_intervals(&mut transaction, records).await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn get_intervals(&self, keys: &[IntervalKey]) -> Result<BTreeMap<IntervalKey, IntervalSet>, StateError> {
        if keys.is_empty() {
            return Ok(BTreeMap::new());
        }
        let (names, versions) = interval_key_columns(keys);
        let pairs: Vec<(&String, &String)> = names.iter().zip(versions.iter()).collect();
        let rows = sqlx::query(
            "SELECT i.name, i.version, i.start_ts, i.end_ts
             FROM json_each(?1) AS k CROSS JOIN sluice_intervals AS i
             WHERE i.name = k.value ->> 0 AND i.version = k.value ->> 1",
        )
        .bind(json_list(&pairs)?)
        .fetch_all(&self.pool)
        .await?;
        let mut columns = Vec::with_capacity(rows.len());
        for row in rows {
            columns.push((
                row.try_get("name")?,
                row.try_get("version")?,
                row.try_get("start_ts")?,
                row.try_get("end_ts")?,
            ));
        }
        Ok(interval_sets_from_rows(keys, columns))
    }

    async fn remove_intervals(&self, keys: &[IntervalKey]) -> Result<(), StateError> {
        if keys.is_empty() {
            return Ok(());
        }
        let (names, versions) = interval_key_columns(keys);
        let pairs: Vec<(&String, &String)> = names.iter().zip(versions.iter()).collect();
        sqlx::query(
            "DELETE FROM sluice_intervals
             WHERE (name, version) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?1))",
        )
        .bind(json_list(&pairs)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

async fn insert_plan(connection: &mut SqliteConnection, plan: &Plan) -> Result<(), StateError> {
    sqlx::query(
        "INSERT INTO sluice_plans (id, environment, previous_plan_id, created_at, body) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&plan.id.0)
    .bind(plan.environment.as_str())
    .bind(plan.previous_plan_id.as_ref().map(|plan| plan.0.as_str()))
    .bind(plan.created_at.0)
    .bind(to_json("plan", plan)?)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

#[async_trait]
impl PlanStore for SqliteState {
    async fn put_plan(&self, plan: &Plan) -> Result<(), StateError> {
        let mut connection = self.pool.acquire().await?;
        insert_plan(&mut connection, plan).await
    }

    async fn get_plan(&self, id: &PlanId) -> Result<Option<Plan>, StateError> {
        let row =
            sqlx::query("SELECT body FROM sluice_plans WHERE id = ?1").bind(&id.0).fetch_optional(&self.pool).await?;
        match row {
            Some(row) => Ok(Some(decode_plan(&id.0, &row.try_get::<String, _>("body")?)?)),
            None => Ok(None),
        }
    }

    async fn list_plans(&self, environment: &EnvironmentName) -> Result<Vec<PlanSummary>, StateError> {
        let rows = sqlx::query_as::<_, PlanSummaryRow>(
            "SELECT id, environment, previous_plan_id, created_at FROM sluice_plans
             WHERE environment = ?1 ORDER BY created_at DESC, seq DESC",
        )
        .bind(environment.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(PlanSummaryRow::into_summary).collect()
    }
}

#[async_trait]
impl RunStore for SqliteState {
    async fn begin_run(&self, start: RunStart<'_>) -> Result<RunRecord, StateError> {
        let plan = start.plan;
        let environment = &plan.environment;
        let expires_at = lease_expiry(start.now, start.lease_ttl_seconds)?;
        let mut transaction = self.begin_write().await?;

        let actual = environment_plan(&mut transaction, environment).await?.flatten();
        if !same_plan(plan.previous_plan_id.as_ref(), actual.as_deref()) {
            return Err(StateError::StaleEnvironment {
                environment: environment.clone(),
                expected: plan.previous_plan_id.clone(),
                actual: actual.map(PlanId),
            });
        }
        // Under the write lock, so a janitor's claim commits wholly before or after this run.
        let plan_tables: Vec<(String, &str)> = plan
            .snapshots
            .iter()
            .map(|planned| (planned.snapshot.name.to_string(), planned.snapshot.version.0.as_str()))
            .collect();
        let plan_keys: Vec<(&str, &str)> =
            plan_tables.iter().map(|(name, version)| (name.as_str(), *version)).collect();
        check_not_being_dropped(&mut transaction, &plan_keys).await?;
        insert_plan(&mut transaction, plan).await?;
        insert_snapshots(&mut transaction, start.snapshots).await?;

        let taken = sqlx::query(
            "INSERT INTO sluice_leases (environment, plan_id, run_id, expires_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (environment) DO UPDATE
                SET plan_id = excluded.plan_id, run_id = excluded.run_id, expires_at = excluded.expires_at
                WHERE sluice_leases.expires_at <= ?5 OR sluice_leases.plan_id = excluded.plan_id
             RETURNING run_id",
        )
        .bind(environment.as_str())
        .bind(&plan.id.0)
        .bind(&start.run_id.0)
        .bind(expires_at.0)
        .bind(start.now.0)
        .fetch_optional(&mut *transaction)
        .await?;
        if taken.is_none() {
            return match select_lease(&mut transaction, environment).await? {
                Some(holder) => Err(holder.held_error()?),
                None => Err(StateError::Contention { what: format!("lease of environment {environment}") }),
            };
        }
        // A restatement forgets its intervals when the plan first runs, never on a resume.
        if !plan.restatements.is_empty() && !plan_has_run(&mut transaction, &plan.id).await? {
            forget_intervals(&mut transaction, &restated_interval_writes(plan)?).await?;
        }

        let superseded = supersede_runs(&mut transaction, &start).await?;
        if superseded > 0 {
            tracing::info!(environment = %environment, run_id = %start.run_id, "took over the lease of an unfinished run");
        }
        // A resume closes the breaker only now that it has taken over the old run.
        delete_breaker(&mut transaction, &plan.id).await?;

        let inserted = sqlx::query(
            "INSERT INTO sluice_runs (id, plan_id, environment, status, started_at, user_name)
             VALUES (?1, ?2, ?3, 'running', ?4, ?5)",
        )
        .bind(&start.run_id.0)
        .bind(&plan.id.0)
        .bind(environment.as_str())
        .bind(start.now.0)
        .bind(start.user)
        .execute(&mut *transaction)
        .await;
        if let Err(error) = inserted {
            if is_unique_violation(&error) {
                return Err(StateError::RunExists { run: start.run_id.clone() });
            }
            return Err(error.into());
        }
        transaction.commit().await?;
        Ok(RunRecord {
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
        })
    }

    async fn get_run(&self, id: &RunId) -> Result<Option<RunRecord>, StateError> {
        let mut connection = self.pool.acquire().await?;
        select_run(&mut connection, id).await
    }

    async fn runs_of_plan(&self, plan_id: &PlanId) -> Result<Vec<RunRecord>, StateError> {
        let rows = sqlx::query_as::<_, RunRow>(
            "SELECT id, plan_id, environment, status, started_at, finished_at, intervals_done, tasks_done, retries, error, user_name, promoting
             FROM sluice_runs WHERE plan_id = ?1 ORDER BY seq",
        )
        .bind(&plan_id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(RunRow::into_record).collect()
    }

    async fn running_runs(&self) -> Result<Vec<RunRecord>, StateError> {
        let rows = sqlx::query_as::<_, RunRow>(
            "SELECT id, plan_id, environment, status, started_at, finished_at, intervals_done, tasks_done, retries, error, user_name, promoting
             FROM sluice_runs WHERE status = 'running' ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(RunRow::into_record).collect()
    }

    async fn latest_run(&self, plan_id: &PlanId) -> Result<Option<RunRecord>, StateError> {
        let row = sqlx::query_as::<_, RunRow>(
            "SELECT id, plan_id, environment, status, started_at, finished_at, intervals_done, tasks_done, retries, error, user_name, promoting
             FROM sluice_runs WHERE plan_id = ?1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(&plan_id.0)
        .fetch_optional(&self.pool)
        .await?;
        row.map(RunRow::into_record).transpose()
    }

    async fn finish_run(&self, id: &RunId, outcome: RunOutcome) -> Result<(), StateError> {
        if outcome.status == RunStatus::Running {
            return Err(StateError::Invalid { reason: format!("run {id} cannot finish as running") });
        }
        let mut connection = self.pool.acquire().await?;
        if record_outcome(&mut connection, id, &outcome).await? {
            return Ok(());
        }
        match select_run(&mut connection, id).await? {
            None => Err(StateError::not_found(format!("run {id}"))),
            Some(run) if run.status == outcome.status => Ok(()),
            Some(run) => Err(StateError::RunFinished { run: id.clone(), status: run.status }),
        }
    }

    async fn finalize_run(&self, finalization: RunFinalization<'_>) -> Result<RunRecord, StateError> {
        let id = finalization.run_id;
        let outcome = finalization.outcome;
        if outcome.status == RunStatus::Running {
            return Err(StateError::Invalid { reason: format!("run {id} cannot finish as running") });
        }
        // `BEGIN IMMEDIATE`: a concurrent finalization waits here and then finds the run finished.
        let mut transaction = self.begin_write().await?;
        let Some(run) = select_run(&mut transaction, id).await? else {
            return Err(StateError::not_found(format!("run {id}")));
        };
        if run.status != RunStatus::Running {
            // Finished already: the first outcome wins, nothing is written.
            return Ok(run);
        }
        if run.promoting && outcome.status != RunStatus::Succeeded {
            // Its views are moving: it ends promoted, whatever was decided before that began.
            return Ok(run);
        }
        if let Some(promotion) = &finalization.promotion {
            let current = environment_plan(&mut transaction, &promotion.state.name).await?;
            // An environment showing the plan already was promoted by an earlier attempt.
            if !environment_shows(current.as_ref(), promotion.state.plan_id.as_ref()) {
                promote_in(&mut transaction, promotion, current).await?;
            }
        }
        if !record_outcome(&mut transaction, id, outcome).await? {
            return Err(StateError::Contention { what: format!("run {id}") });
        }
        delete_lease(&mut transaction, &run.environment, id).await?;
        insert_audit(&mut transaction, finalization.audit).await?;
        let Some(finished) = select_run(&mut transaction, id).await? else {
            return Err(StateError::not_found(format!("run {id}")));
        };
        transaction.commit().await?;
        Ok(finished)
    }

    async fn begin_promotion(&self, run_id: &RunId, plan_id: &PlanId) -> Result<bool, StateError> {
        let marked = sqlx::query(
            "UPDATE sluice_runs SET promoting = 1
             WHERE id = ?1 AND status = 'running'
               AND (promoting OR NOT EXISTS (SELECT 1 FROM sluice_breakers WHERE plan_id = ?2))",
        )
        .bind(&run_id.0)
        .bind(&plan_id.0)
        .execute(&self.pool)
        .await?;
        Ok(marked.rows_affected() == 1)
    }

    async fn add_run_progress(&self, id: &RunId, progress: RunProgress) -> Result<(), StateError> {
        let updated = sqlx::query(
            "UPDATE sluice_runs
             SET tasks_done = tasks_done + ?2, intervals_done = intervals_done + ?3, retries = retries + ?4
             WHERE id = ?1",
        )
        .bind(&id.0)
        .bind(to_stored_count(progress.tasks_done, "tasks_done")?)
        .bind(to_stored_count(progress.intervals_done, "intervals_done")?)
        .bind(to_stored_count(progress.retries, "retries")?)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(StateError::not_found(format!("run {id}")));
        }
        Ok(())
    }
}

/// One row of the `task_outlook` statement: the run's status and the breaker's reason (repeated
/// on every row), and one recorded range of the key overlapping the interval, if any.
type OutlookRow = (Option<String>, Option<String>, Option<i64>, Option<i64>);

/// Folds the rows of the `task_outlook` statement; the ranges are merged as `get_intervals`
/// merges them.
fn outlook_from_rows(run_id: &RunId, rows: Vec<OutlookRow>, interval: Interval) -> Result<TaskOutlook, StateError> {
    let mut run = None;
    let mut breaker = None;
    let mut ranges = Vec::with_capacity(rows.len());
    for (status, reason, start, end) in rows {
        if let Some(status) = status {
            let parsed = RunStatus::parse(&status)
                .ok_or_else(|| StateError::corrupt(format!("run {run_id}"), format!("unknown status {status:?}")))?;
            run = Some(parsed);
        }
        if reason.is_some() {
            breaker = reason;
        }
        if let (Some(start), Some(end)) = (start, end) {
            ranges.push(Interval { start: Timestamp(start), end: Timestamp(end) });
        }
    }
    let recorded = IntervalSet::from_intervals(ranges).covers(interval);
    Ok(TaskOutlook { run, breaker, recorded })
}

#[async_trait]
impl TaskStore for SqliteState {
    async fn record_task_done(&self, run_id: &RunId, tasks: &[TaskId]) -> Result<(), StateError> {
        if tasks.is_empty() {
            return Ok(());
        }
        let hex: Vec<String> = tasks.iter().map(TaskId::to_string).collect();
        let mut connection = self.pool.acquire().await?;
        let inserted = sqlx::query(
            "INSERT INTO sluice_tasks_done (run_id, plan_id, task_id)
             SELECT r.id, r.plan_id, unhex(t.value) FROM sluice_runs AS r, json_each(?2) AS t WHERE r.id = ?1
             ON CONFLICT (run_id, task_id) DO NOTHING",
        )
        .bind(&run_id.0)
        .bind(json_list(&hex)?)
        .execute(&mut *connection)
        .await?;
        if inserted.rows_affected() == 0 && select_run(&mut connection, run_id).await?.is_none() {
            return Err(StateError::not_found(format!("run {run_id}")));
        }
        Ok(())
    }

    async fn finish_tasks(&self, finished: &[FinishedTask]) -> Result<(), StateError> {
        if finished.is_empty() {
            return Ok(());
        }
        let records: Vec<IntervalRecord> = finished.iter().filter_map(|task| task.interval.clone()).collect();
        let rows: Vec<(&str, String)> =
            finished.iter().map(|task| (task.run_id.0.as_str(), task.task_id.to_string())).collect();
        let mut transaction = self.begin_write().await?;
        write_intervals(&mut transaction, &records).await?;
        let inserted: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "INSERT INTO sluice_tasks_done (run_id, plan_id, task_id)
             SELECT r.id, r.plan_id, unhex(t.value ->> 1)
             FROM json_each(?1) AS t JOIN sluice_runs AS r ON r.id = t.value ->> 0 WHERE true
             ON CONFLICT (run_id, task_id) DO NOTHING
             RETURNING run_id, task_id",
        )
        .bind(json_list(&rows)?)
        .fetch_all(&mut *transaction)
        .await?;
        // What each run gained: its tasks just inserted (a task listed twice counts once).
        let inserted: BTreeSet<(String, TaskId)> =
            inserted.into_iter().map(|(run, bytes)| Ok((run, task_id(&bytes)?))).collect::<Result<_, StateError>>()?;
        let mut gained: BTreeMap<&str, RunProgress> = BTreeMap::new();
        let mut counted = BTreeSet::new();
        for task in finished {
            let key = (task.run_id.0.clone(), task.task_id);
            if inserted.contains(&key) && counted.insert(key) {
                let progress = gained.entry(task.run_id.0.as_str()).or_default();
                progress.tasks_done += 1;
                progress.intervals_done += task.intervals;
                progress.retries += task.retries;
            }
        }
        let runs: BTreeSet<&str> = finished.iter().map(|task| task.run_id.0.as_str()).collect();
        for run in runs {
            let progress = gained.get(run).copied().unwrap_or_default();
            let updated = sqlx::query(
                "UPDATE sluice_runs
                 SET tasks_done = tasks_done + ?2, intervals_done = intervals_done + ?3, retries = retries + ?4
                 WHERE id = ?1",
            )
            .bind(run)
            .bind(to_stored_count(progress.tasks_done, "tasks_done")?)
            .bind(to_stored_count(progress.intervals_done, "intervals_done")?)
            .bind(to_stored_count(progress.retries, "retries")?)
            .execute(&mut *transaction)
            .await?;
            if updated.rows_affected() == 0 {
                return Err(StateError::not_found(format!("run {run}")));
            }
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn done_tasks(&self, run_id: &RunId) -> Result<BTreeSet<TaskId>, StateError> {
        let rows = sqlx::query("SELECT task_id FROM sluice_tasks_done WHERE run_id = ?1")
            .bind(&run_id.0)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| task_id(&row.try_get::<Vec<u8>, _>("task_id")?)).collect()
    }

    async fn done_tasks_of_plan(&self, plan_id: &PlanId) -> Result<BTreeSet<TaskId>, StateError> {
        let rows = sqlx::query("SELECT DISTINCT task_id FROM sluice_tasks_done WHERE plan_id = ?1")
            .bind(&plan_id.0)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| task_id(&row.try_get::<Vec<u8>, _>("task_id")?)).collect()
    }

    async fn record_task_failure(&self, run_id: &RunId, failure: &TaskFailure) -> Result<(), StateError> {
        let recorded = sqlx::query(
            "INSERT INTO sluice_task_failures (run_id, task_id, model, interval_start, interval_end, error, attempts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (run_id, task_id) DO UPDATE
                SET model = excluded.model, interval_start = excluded.interval_start,
                    interval_end = excluded.interval_end, error = excluded.error, attempts = excluded.attempts",
        )
        .bind(&run_id.0)
        .bind(failure.task_id.0.to_vec())
        .bind(failure.model.to_string())
        .bind(failure.interval.start.0)
        .bind(failure.interval.end.0)
        .bind(&failure.error)
        .bind(i64::from(failure.attempts))
        .execute(&self.pool)
        .await;
        match recorded {
            Ok(_) => Ok(()),
            Err(error) if is_foreign_key_violation(&error) => Err(StateError::not_found(format!("run {run_id}"))),
            Err(error) => Err(error.into()),
        }
    }

    async fn task_failures(&self, run_id: &RunId) -> Result<Vec<TaskFailure>, StateError> {
        let rows = sqlx::query_as::<_, TaskFailureRow>(
            "SELECT task_id, model, interval_start, interval_end, error, attempts
             FROM sluice_task_failures WHERE run_id = ?1 ORDER BY seq",
        )
        .bind(&run_id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TaskFailureRow::into_failure).collect()
    }

    async fn task_outlook(
        &self,
        run_id: &RunId,
        plan_id: &PlanId,
        key: &IntervalKey,
        interval: Interval,
    ) -> Result<TaskOutlook, StateError> {
        // One statement, so one read transaction: the run, the breaker and the key's rows that
        // overlap the interval (found through `sluice_intervals_key`), one output row per
        // interval row, or one row of NULLs when none overlaps. A row that only touches the
        // interval holds none of its instants, so the overlapping rows alone decide coverage.
        let rows: Vec<OutlookRow> = sqlx::query_as(
            "SELECT r.status, b.reason, i.start_ts, i.end_ts
             FROM (SELECT 1) AS one
             LEFT JOIN sluice_runs AS r ON r.id = ?1
             LEFT JOIN sluice_breakers AS b ON b.plan_id = ?2
             LEFT JOIN sluice_intervals AS i
                ON i.name = ?3 AND i.version = ?4 AND i.start_ts < ?6 AND i.end_ts > ?5",
        )
        .bind(&run_id.0)
        .bind(&plan_id.0)
        .bind(key.0.to_string())
        .bind(&key.1.0)
        .bind(interval.start.0)
        .bind(interval.end.0)
        .fetch_all(&self.pool)
        .await?;
        outlook_from_rows(run_id, rows, interval)
    }
}

#[async_trait]
impl DropStore for SqliteState {
    async fn claim_tables_for_drop(
        &self,
        tables: &[IntervalKey],
        running_seen: &[RunId],
        environments_seen: &BTreeMap<EnvironmentName, Option<PlanId>>,
    ) -> Result<(), StateError> {
        // `BEGIN IMMEDIATE`: no `begin_run`, promotion or interval write commits between the
        // checks and the writes below.
        let mut transaction = self.begin_write().await?;
        let running: Vec<String> = sqlx::query_scalar("SELECT id FROM sluice_runs WHERE status = 'running'")
            .fetch_all(&mut *transaction)
            .await?;
        check_running_seen(running, running_seen)?;
        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT name, plan_id FROM sluice_environments").fetch_all(&mut *transaction).await?;
        check_environments_seen(rows, environments_seen)?;

        let (names, versions) = interval_key_columns(tables);
        let pairs: Vec<(&String, &String)> = names.iter().zip(versions.iter()).collect();
        if !pairs.is_empty() {
            let list = json_list(&pairs)?;
            sqlx::query(
                "INSERT INTO sluice_tables_being_dropped (name, version)
                 SELECT value ->> 0, value ->> 1 FROM json_each(?1) WHERE true
                 ON CONFLICT (name, version) DO NOTHING",
            )
            .bind(&list)
            .execute(&mut *transaction)
            .await?;
            sqlx::query(
                "DELETE FROM sluice_intervals
                 WHERE (name, version) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?1))",
            )
            .bind(&list)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn tables_being_dropped(&self) -> Result<Vec<IntervalKey>, StateError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT name, version FROM sluice_tables_being_dropped").fetch_all(&self.pool).await?;
        Ok(tombstone_keys(rows)?.into_iter().collect())
    }

    async fn release_dropped_tables(&self, tables: &[IntervalKey]) -> Result<(), StateError> {
        if tables.is_empty() {
            return Ok(());
        }
        let (names, versions) = interval_key_columns(tables);
        let pairs: Vec<(&String, &String)> = names.iter().zip(versions.iter()).collect();
        sqlx::query(
            "DELETE FROM sluice_tables_being_dropped
             WHERE (name, version) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?1))",
        )
        .bind(json_list(&pairs)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl BreakerStore for SqliteState {
    async fn trip_breaker(&self, plan_id: &PlanId, reason: &str) -> Result<(), StateError> {
        sqlx::query("INSERT INTO sluice_breakers (plan_id, reason) VALUES (?1, ?2) ON CONFLICT (plan_id) DO NOTHING")
            .bind(&plan_id.0)
            .bind(reason)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn breaker(&self, plan_id: &PlanId) -> Result<Option<String>, StateError> {
        let row = sqlx::query("SELECT reason FROM sluice_breakers WHERE plan_id = ?1")
            .bind(&plan_id.0)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| row.try_get::<String, _>("reason")).transpose().map_err(StateError::from)
    }

    async fn reset_breaker(&self, plan_id: &PlanId) -> Result<(), StateError> {
        let mut connection = self.pool.acquire().await?;
        delete_breaker(&mut connection, plan_id).await
    }
}

#[async_trait]
impl AuditLog for SqliteState {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StateError> {
        let mut connection = self.pool.acquire().await?;
        insert_audit(&mut connection, entry).await
    }

    async fn list_audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StateError> {
        let rows = sqlx::query_as::<_, AuditRow>(
            "SELECT plan_id, run_id, environment, user_name, started_at, finished_at, intervals, models, retries, outcome
             FROM sluice_audit_log ORDER BY seq DESC LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(AuditRow::into_entry).collect()
    }
}

#[cfg(test)]
impl SqliteState {
    /// Rows in one of this store's tables, for tests that check the physical layout.
    pub(crate) async fn count_rows_for_tests(&self, table: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Inserts interval rows as they are, without merging them with the stored ones: the
    /// overlapping or adjacent rows concurrent writers can leave behind.
    pub(crate) async fn insert_interval_rows_for_tests(&self, key: &IntervalKey, ranges: &[Interval]) {
        for range in ranges {
            sqlx::query("INSERT INTO sluice_intervals (name, version, start_ts, end_ts) VALUES (?1, ?2, ?3, ?4)")
                .bind(key.0.to_string())
                .bind(&key.1.0)
                .bind(range.start.0)
                .bind(range.end.0)
                .execute(&self.pool)
                .await
                .unwrap();
        }
    }
}
