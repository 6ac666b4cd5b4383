//! `PostgresState`: the state store of distributed mode, the only truth the coordinator, workers
//! and promoter share. Batches travel as arrays (`unnest`), so a batch is one statement.
//!
//! Races are settled by locks taken in one fixed order — the drop-claim advisory lock, then the
//! rows: environment row, plan, snapshots (sorted by id), lease row, runs — so concurrent calls
//! wait for each other instead of deadlocking. The drop-claim lock ([`DROP_CLAIM_LOCK`], a
//! transaction-level advisory lock) is always the first lock of its transaction, taken before
//! any row is touched: exclusive by the janitor's `claim_tables_for_drop`, shared by
//! `begin_run` and by every transaction that records intervals (`record_intervals`,
//! `finish_tasks`), so a claim never interleaves with any of them while those never wait for
//! each other. A promotion locks the environment row `FOR UPDATE`; `begin_run` locks it
//! `FOR SHARE`, then takes the lease with `INSERT ... ON CONFLICT DO UPDATE ... WHERE`, which
//! waits for a concurrent insert of the same lease and decides against the committed row.
//! `finalize_run` locks the environment row it promotes `FOR UPDATE`, then the lease row of the
//! run's environment and the run row, both `FOR UPDATE`; a second finalization of the same run
//! waits for the first to commit and then finds the run finished.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::interval::{Interval, IntervalSet, Timestamp};
use sluice_core::names::{EnvironmentName, PlanId, SnapshotId, TaskId};
use sluice_core::plan::Plan;
use sluice_core::snapshot::Snapshot;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres, Row, Transaction};

use crate::codec::{
    AuditRow, EnvironmentRow, IntervalRewrite, IntervalRow, IntervalWrite, LeaseRow, PlanSummaryRow, RunRow,
    TaskFailureRow, check_environments_seen, check_running_seen, decode_plan, decode_snapshot, environment_name,
    environments_from_rows, group_interval_records, interval_key_columns, interval_sets_from_rows, lease_expiry,
    plan_interval_removal, plan_interval_rewrite, restated_interval_writes, same_plan, snapshot_columns,
    snapshot_id_texts, task_id, to_json, to_stored_count, tombstone_keys,
};
use sluice_core::config::{redact, url_password};

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

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections per process: a worker uses one at a time, the coordinator a few.
const MAX_CONNECTIONS: u32 = 16;

/// How long a call waits for a free connection before failing with a (transient) pool timeout.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often `begin_run` retries when the lease row vanishes between its two statements.
const LEASE_ATTEMPTS: usize = 3;

/// The key of the transaction-level advisory lock that keeps the janitor's claim
/// (`claim_tables_for_drop`, exclusive) apart from `begin_run` and from interval writes (both
/// shared); first in the module's lock order. The bytes spell `sluicedr`. Advisory locks are
/// per database, so only this store's own transactions can meet it.
const DROP_CLAIM_LOCK: i64 = 0x736c_7569_6365_6472;

/// The state store in a PostgreSQL database.
#[derive(Clone)]
pub struct PostgresState {
    pool: PgPool,
    /// `postgresql://user@host:port/database`, without the password.
    target: String,
}

impl std::fmt::Debug for PostgresState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresState").field("target", &self.target).finish_non_exhaustive()
    }
}

/// `%XX` escapes decoded, as the driver decodes a URL's password.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| text.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// What must never appear in a message: the URL's password as written and as decoded.
fn url_secrets(url: &str) -> Vec<String> {
    match url_password(url) {
        Some(password) => vec![password.to_string(), percent_decode(password)],
        None => Vec::new(),
    }
}

fn describe_target(options: &PgConnectOptions) -> String {
    let database = options.get_database().unwrap_or(options.get_username());
    format!("postgresql://{}@{}:{}/{}", options.get_username(), options.get_host(), options.get_port(), database)
}

impl PostgresState {
    /// Connects to the database `url` names and brings its schema up to date. One connection is
    /// opened right away, so an unreachable server or a wrong password fails here, with a
    /// message that names the server but never the password. The pool does not ping before
    /// handing out a connection: a dropped connection shows up as a transient error instead.
    pub async fn connect(url: &str) -> Result<PostgresState, StateError> {
        let secrets = url_secrets(url);
        let options: PgConnectOptions = url.parse().map_err(|error: sqlx::Error| StateError::Connect {
            target: "postgresql".to_string(),
            reason: redact(&error.to_string(), &secrets),
            transient: false,
        })?;
        let options = options.application_name("sluice");
        let target = describe_target(&options);
        let connect_error = |error: sqlx::Error| StateError::Connect {
            target: target.clone(),
            reason: redact(&error.to_string(), &secrets),
            transient: is_transient_sqlx(&error),
        };
        let mut connection = PgConnection::connect_with(&options).await.map_err(connect_error)?;
        MIGRATOR.run(&mut connection).await?;
        if let Err(error) = connection.close().await {
            tracing::debug!(%error, "closing the migration connection failed");
        }
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Ok(PostgresState { pool, target })
    }

    /// The server and database, without credentials.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StateError> {
        Ok(self.pool.begin().await?)
    }
}

/// Takes the drop-claim lock ([`DROP_CLAIM_LOCK`]) until the caller's transaction ends. It must
/// be the transaction's first lock, and a statement of its own: under READ COMMITTED a statement
/// reads the snapshot taken when it started, so a check folded into the statement that waited
/// for the lock would not see what the holder committed meanwhile; the statements after this
/// one do.
async fn lock_drop_claim(connection: &mut PgConnection, exclusive: bool) -> Result<(), StateError> {
    let sql = if exclusive { "SELECT pg_advisory_xact_lock($1)" } else { "SELECT pg_advisory_xact_lock_shared($1)" };
    sqlx::query(sql).bind(DROP_CLAIM_LOCK).execute(&mut *connection).await?;
    Ok(())
}

/// Fails with `TableBeingDropped` if any (name, version) of the two columns has a tombstone.
/// The caller holds the drop-claim lock (shared), so no claim commits until it ends.
async fn check_not_being_dropped(
    connection: &mut PgConnection,
    names: &[&str],
    versions: &[&str],
) -> Result<(), StateError> {
    if names.is_empty() {
        return Ok(());
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT d.name, d.version
         FROM unnest($1::text[], $2::text[]) AS k(name, version)
         JOIN sluice_tables_being_dropped d ON d.name = k.name AND d.version = k.version",
    )
    .bind(names)
    .bind(versions)
    .fetch_all(&mut *connection)
    .await?;
    let claimed = tombstone_keys(rows)?;
    match StateError::table_being_dropped(&claimed) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Records intervals inside the caller's transaction, merged with the stored ranges they touch;
/// fails with `TableBeingDropped` (the caller rolls back) if a table has a tombstone. Must run
/// before anything else in the transaction: it takes the drop-claim lock first.
async fn write_intervals(connection: &mut PgConnection, records: &[IntervalRecord]) -> Result<(), StateError> {
    let writes = group_interval_records(records)?;
    if writes.is_empty() {
        return Ok(());
    }
    // A claim commits its tombstones and the removal of the tables' intervals together; this
    // write must either see the tombstone or have its rows seen (and removed) by the claim's
    // delete. `SELECT ... FOR SHARE` on tombstone rows cannot give that: a tombstone inserted
    // after the check has no row to lock yet, and the claim's delete does not see rows inserted
    // by a transaction still in progress. The shared advisory lock does, cheaply: writers never
    // wait for each other on it (only for a claim, which is rare and short), and it is one
    // statement on an in-memory lock table; the check after it reads a tiny, nearly always
    // empty table by its primary key.
    lock_drop_claim(&mut *connection, false).await?;
    let names: Vec<&str> = writes.iter().map(|write| write.name.as_str()).collect();
    let versions: Vec<&str> = writes.iter().map(|write| write.version.as_str()).collect();
    check_not_being_dropped(&mut *connection, &names, &versions).await?;
    let stored = touching_interval_rows(&mut *connection, &writes).await?;
    apply_interval_rewrite(connection, plan_interval_rewrite(&writes, stored)).await
}

/// Forgets the intervals of a restatement plan inside the caller's transaction (`begin_run` of
/// the plan's first run, after its checks).
async fn forget_intervals(connection: &mut PgConnection, removals: &[IntervalWrite]) -> Result<(), StateError> {
    if removals.is_empty() {
        return Ok(());
    }
    let stored = touching_interval_rows(&mut *connection, removals).await?;
    apply_interval_rewrite(connection, plan_interval_removal(removals, stored)).await
}

/// The stored rows of each write's key that overlap or touch its envelope.
async fn touching_interval_rows(
    connection: &mut PgConnection,
    writes: &[IntervalWrite],
) -> Result<Vec<IntervalRow>, StateError> {
    let names: Vec<&str> = writes.iter().map(|write| write.name.as_str()).collect();
    let versions: Vec<&str> = writes.iter().map(|write| write.version.as_str()).collect();
    let lows: Vec<i64> = writes.iter().map(|write| write.low).collect();
    let highs: Vec<i64> = writes.iter().map(|write| write.high).collect();
    let stored = sqlx::query_as::<_, IntervalRow>(
        "SELECT k.ordinality - 1 AS write_index, i.id, i.start_ts, i.end_ts
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
              WITH ORDINALITY AS k(name, version, low, high, ordinality)
         JOIN sluice_intervals i
           ON i.name = k.name AND i.version = k.version AND i.start_ts <= k.high AND i.end_ts >= k.low",
    )
    .bind(names)
    .bind(versions)
    .bind(lows)
    .bind(highs)
    .fetch_all(&mut *connection)
    .await?;
    Ok(stored)
}

async fn apply_interval_rewrite(connection: &mut PgConnection, rewrite: IntervalRewrite) -> Result<(), StateError> {
    if rewrite.is_empty() {
        return Ok(());
    }
    if !rewrite.delete_ids.is_empty() {
        sqlx::query("DELETE FROM sluice_intervals WHERE id = ANY($1)")
            .bind(rewrite.delete_ids)
            .execute(&mut *connection)
            .await?;
    }
    let mut names = Vec::with_capacity(rewrite.insert.len());
    let mut versions = Vec::with_capacity(rewrite.insert.len());
    let mut starts = Vec::with_capacity(rewrite.insert.len());
    let mut ends = Vec::with_capacity(rewrite.insert.len());
    for (name, version, start, end) in rewrite.insert {
        names.push(name);
        versions.push(version);
        starts.push(start);
        ends.push(end);
    }
    sqlx::query(
        "INSERT INTO sluice_intervals (name, version, start_ts, end_ts)
         SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])",
    )
    .bind(names)
    .bind(versions)
    .bind(starts)
    .bind(ends)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

async fn insert_snapshots(connection: &mut PgConnection, snapshots: &[Snapshot]) -> Result<(), StateError> {
    let columns = snapshot_columns(snapshots)?;
    if columns.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(columns.len());
    let mut names = Vec::with_capacity(columns.len());
    let mut versions = Vec::with_capacity(columns.len());
    let mut bodies = Vec::with_capacity(columns.len());
    for (id, name, version, body) in columns {
        ids.push(id);
        names.push(name);
        versions.push(version);
        bodies.push(body);
    }
    sqlx::query(
        "INSERT INTO sluice_snapshots (id, name, version, body)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(ids)
    .bind(names)
    .bind(versions)
    .bind(bodies)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Locks the environment row (`FOR UPDATE` or `FOR SHARE`) and returns the plan id it shows:
/// `None` if it does not exist, `Some(None)` if it shows no plan.
async fn lock_environment(
    connection: &mut PgConnection,
    name: &EnvironmentName,
    exclusive: bool,
) -> Result<Option<Option<String>>, StateError> {
    let sql = if exclusive {
        "SELECT plan_id FROM sluice_environments WHERE name = $1 FOR UPDATE"
    } else {
        "SELECT plan_id FROM sluice_environments WHERE name = $1 FOR SHARE"
    };
    let row = sqlx::query(sql).bind(name.as_str()).fetch_optional(&mut *connection).await?;
    match row {
        Some(row) => Ok(Some(row.try_get::<Option<String>, _>("plan_id")?)),
        None => Ok(None),
    }
}

async fn select_lease(
    connection: &mut PgConnection,
    environment: &EnvironmentName,
) -> Result<Option<LeaseRow>, StateError> {
    Ok(sqlx::query_as::<_, LeaseRow>(
        "SELECT environment, plan_id, run_id, expires_at FROM sluice_leases WHERE environment = $1",
    )
    .bind(environment.as_str())
    .fetch_optional(&mut *connection)
    .await?)
}

async fn select_run(connection: &mut PgConnection, id: &RunId) -> Result<Option<RunRecord>, StateError> {
    let row = sqlx::query_as::<_, RunRow>(
        "SELECT id, plan_id, environment, status, started_at, finished_at, intervals_done, tasks_done, retries, error, user_name, promoting
         FROM sluice_runs WHERE id = $1",
    )
    .bind(&id.0)
    .fetch_optional(&mut *connection)
    .await?;
    row.map(RunRow::into_record).transpose()
}

/// The run, its row locked `FOR UPDATE` until the transaction ends.
async fn lock_run(connection: &mut PgConnection, id: &RunId) -> Result<Option<RunRecord>, StateError> {
    let row = sqlx::query_as::<_, RunRow>(
        "SELECT id, plan_id, environment, status, started_at, finished_at, intervals_done, tasks_done, retries, error, user_name, promoting
         FROM sluice_runs WHERE id = $1 FOR UPDATE",
    )
    .bind(&id.0)
    .fetch_optional(&mut *connection)
    .await?;
    row.map(RunRow::into_record).transpose()
}

/// Locks the environment's lease row `FOR UPDATE`, if there is one.
async fn lock_lease(connection: &mut PgConnection, environment: &EnvironmentName) -> Result<(), StateError> {
    sqlx::query("SELECT environment FROM sluice_leases WHERE environment = $1 FOR UPDATE")
        .bind(environment.as_str())
        .fetch_optional(&mut *connection)
        .await?;
    Ok(())
}

/// The error of a compare-and-swap that found the environment showing `actual`.
fn stale_environment(promotion: &EnvironmentPromotion<'_>, actual: Option<String>) -> StateError {
    StateError::StaleEnvironment {
        environment: promotion.state.name.clone(),
        expected: promotion.expected_plan.cloned(),
        actual: actual.map(PlanId),
    }
}

/// Whether the environment (as [`lock_environment`] read it) exists and shows `plan`.
fn environment_shows(current: Option<&Option<String>>, plan: Option<&PlanId>) -> bool {
    current.is_some_and(|shown| same_plan(plan, shown.as_deref()))
}

/// The compare-and-swap of [`EnvironmentStore::promote_environment`] inside the caller's
/// transaction, on an environment row the caller locked `FOR UPDATE` and read as `current`
/// (`None`: no row): fails with `StaleEnvironment` unless it shows `promotion.expected_plan`;
/// otherwise the state shown becomes `previous`, and the new state's snapshots are inserted if
/// absent. On an error the caller must roll back.
async fn promote_in(
    connection: &mut PgConnection,
    promotion: &EnvironmentPromotion<'_>,
    current: Option<Option<String>>,
) -> Result<(), StateError> {
    let state = promotion.state;
    let name = &state.name;
    let snapshot_ids: Vec<String> = state.snapshots.iter().map(|snapshot| snapshot.id.0.clone()).collect();
    let plan_id = state.plan_id.as_ref().map(|plan| plan.0.as_str());
    let expires_at = promotion.expires_at.map(|time| time.0);
    let exists = current.is_some();
    let actual = current.flatten();
    if !same_plan(promotion.expected_plan, actual.as_deref()) {
        return Err(stale_environment(promotion, actual));
    }
    insert_snapshots(&mut *connection, &state.snapshots).await?;
    if exists {
        sqlx::query("DELETE FROM sluice_environment_snapshots WHERE environment = $1 AND generation = 'previous'")
            .bind(name.as_str())
            .execute(&mut *connection)
            .await?;
        sqlx::query(
            "UPDATE sluice_environment_snapshots SET generation = 'previous'
             WHERE environment = $1 AND generation = 'current'",
        )
        .bind(name.as_str())
        .execute(&mut *connection)
        .await?;
        sqlx::query(
            "UPDATE sluice_environments
             SET previous_plan_id = plan_id, has_previous = TRUE, plan_id = $2, expires_at = $3, updated_at = $4
             WHERE name = $1",
        )
        .bind(name.as_str())
        .bind(plan_id)
        .bind(expires_at)
        .bind(promotion.now.0)
        .execute(&mut *connection)
        .await?;
    } else {
        let inserted = sqlx::query(
            "INSERT INTO sluice_environments (name, plan_id, has_previous, previous_plan_id, expires_at, updated_at)
             VALUES ($1, $2, FALSE, NULL, $3, $4)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name.as_str())
        .bind(plan_id)
        .bind(expires_at)
        .bind(promotion.now.0)
        .execute(&mut *connection)
        .await?;
        if inserted.rows_affected() == 0 {
            // Another promotion created the environment after our read: it moved.
            let actual = lock_environment(&mut *connection, name, false).await?.flatten();
            return Err(stale_environment(promotion, actual));
        }
    }
    sqlx::query(
        "INSERT INTO sluice_environment_snapshots (environment, generation, position, snapshot_id)
         SELECT $1, 'current', t.ordinality - 1, t.id FROM unnest($2::text[]) WITH ORDINALITY AS t(id, ordinality)",
    )
    .bind(name.as_str())
    .bind(snapshot_ids)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Records a running run's outcome inside the caller's transaction; `false` if the run does not
/// exist or is not running (then nothing changed).
async fn record_outcome(connection: &mut PgConnection, id: &RunId, outcome: &RunOutcome) -> Result<bool, StateError> {
    let updated = sqlx::query(
        "UPDATE sluice_runs SET status = $2, error = $3, finished_at = $4 WHERE id = $1 AND status = 'running'",
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
    connection: &mut PgConnection,
    environment: &EnvironmentName,
    run_id: &RunId,
) -> Result<(), StateError> {
    sqlx::query("DELETE FROM sluice_leases WHERE environment = $1 AND run_id = $2")
        .bind(environment.as_str())
        .bind(&run_id.0)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// Appends one audit row inside the caller's transaction.
async fn insert_audit(connection: &mut PgConnection, entry: &AuditEntry) -> Result<(), StateError> {
    sqlx::query(
        "INSERT INTO sluice_audit_log
            (plan_id, run_id, environment, user_name, started_at, finished_at, intervals, models, retries, outcome)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
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
async fn delete_breaker(connection: &mut PgConnection, plan_id: &PlanId) -> Result<(), StateError> {
    sqlx::query("DELETE FROM sluice_breakers WHERE plan_id = $1").bind(&plan_id.0).execute(&mut *connection).await?;
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
/// each one's audit row (oldest run first), inside `begin_run`'s transaction. Returns how many
/// runs it aborted.
async fn supersede_runs(connection: &mut PgConnection, start: &RunStart<'_>) -> Result<usize, StateError> {
    let rows = sqlx::query_as::<_, RunRow>(
        "WITH superseded AS (
             UPDATE sluice_runs SET status = 'aborted', finished_at = $2, error = $3
             WHERE environment = $1 AND status = 'running'
             RETURNING seq, id, plan_id, environment, status, started_at, finished_at, intervals_done, tasks_done,
                       retries, error, user_name, promoting
         )
         SELECT id, plan_id, environment, status, started_at, finished_at, intervals_done, tasks_done, retries, error, user_name, promoting
         FROM superseded ORDER BY seq",
    )
    .bind(start.plan.environment.as_str())
    .bind(start.now.0)
    .bind(format!("lease taken over by run {}", start.run_id))
    .fetch_all(&mut *connection)
    .await?;
    let superseded = rows.len();
    let runs = rows.into_iter().map(RunRow::into_record).collect::<Result<Vec<_>, _>>()?;
    // A promoting run is never superseded; the error rolls back `begin_run`'s transaction.
    if let Some(promoting) = runs.iter().find(|run| run.promoting) {
        return Err(StateError::RunPromoting { run: promoting.id.clone(), environment: promoting.environment.clone() });
    }
    for run in runs {
        insert_audit(&mut *connection, &superseded_audit(&run, start.run_id, start.now)).await?;
    }
    Ok(superseded)
}

#[async_trait]
impl SnapshotStore for PostgresState {
    async fn put_snapshots(&self, snapshots: &[Snapshot]) -> Result<(), StateError> {
        let mut connection = self.pool.acquire().await?;
        insert_snapshots(&mut connection, snapshots).await
    }

    async fn get_snapshots(&self, ids: &[SnapshotId]) -> Result<BTreeMap<SnapshotId, Snapshot>, StateError> {
        let mut snapshots = BTreeMap::new();
        if ids.is_empty() {
            return Ok(snapshots);
        }
        let rows = sqlx::query("SELECT id, body FROM sluice_snapshots WHERE id = ANY($1)")
            .bind(snapshot_id_texts(ids))
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
        let ids = snapshot_id_texts(ids);
        let mut transaction = self.begin().await?;
        let in_use = sqlx::query(
            "SELECT snapshot_id, environment FROM sluice_environment_snapshots
             WHERE snapshot_id = ANY($1) ORDER BY snapshot_id, environment LIMIT 1",
        )
        .bind(&ids)
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
        let deleted =
            sqlx::query("DELETE FROM sluice_snapshots WHERE id = ANY($1)").bind(&ids).execute(&mut *transaction).await;
        match deleted {
            Ok(_) => {}
            // An environment started to show one of them after the check above.
            Err(error) if is_foreign_key_violation(&error) => {
                return Err(StateError::Contention { what: "snapshots being deleted".to_string() });
            }
            Err(error) => return Err(error.into()),
        }
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
 WHERE e.name = $1
 ORDER BY e.name, es.generation, es.position";

const ALL_ENVIRONMENTS: &str =
    "SELECT e.name, e.plan_id, e.has_previous, e.previous_plan_id, e.expires_at, e.updated_at,
        es.generation, es.snapshot_id, s.body
 FROM sluice_environments e
 LEFT JOIN sluice_environment_snapshots es ON es.environment = e.name
 LEFT JOIN sluice_snapshots s ON s.id = es.snapshot_id
 ORDER BY e.name, es.generation, es.position";

#[async_trait]
impl EnvironmentStore for PostgresState {
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
        let mut transaction = self.begin().await?;
        let current = lock_environment(&mut transaction, &promotion.state.name, true).await?;
        promote_in(&mut transaction, &promotion, current).await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn delete_environment(&self, name: &EnvironmentName) -> Result<(), StateError> {
        sqlx::query("DELETE FROM sluice_environments WHERE name = $1").bind(name.as_str()).execute(&self.pool).await?;
        Ok(())
    }
}

#[async_trait]
impl LeaseStore for PostgresState {
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
            "UPDATE sluice_leases SET expires_at = $3 WHERE environment = $1 AND run_id = $2
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
impl IntervalStore for PostgresState {
    async fn record_intervals(&self, records: &[IntervalRecord]) -> Result<(), StateError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut transaction = self.begin().await?;
        write_intervals(&mut transaction, records).await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn get_intervals(&self, keys: &[IntervalKey]) -> Result<BTreeMap<IntervalKey, IntervalSet>, StateError> {
        if keys.is_empty() {
            return Ok(BTreeMap::new());
        }
        let (names, versions) = interval_key_columns(keys);
        let rows = sqlx::query(
            "SELECT i.name, i.version, i.start_ts, i.end_ts
             FROM unnest($1::text[], $2::text[]) AS k(name, version)
             JOIN sluice_intervals i ON i.name = k.name AND i.version = k.version",
        )
        .bind(names)
        .bind(versions)
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
        sqlx::query(
            "DELETE FROM sluice_intervals i
             USING unnest($1::text[], $2::text[]) AS k(name, version)
             WHERE i.name = k.name AND i.version = k.version",
        )
        .bind(names)
        .bind(versions)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

async fn plan_has_run(connection: &mut PgConnection, plan_id: &PlanId) -> Result<bool, StateError> {
    let row = sqlx::query("SELECT EXISTS (SELECT 1 FROM sluice_runs WHERE plan_id = $1) AS ran")
        .bind(&plan_id.0)
        .fetch_one(&mut *connection)
        .await?;
    Ok(row.try_get("ran")?)
}

async fn insert_plan(connection: &mut PgConnection, plan: &Plan) -> Result<(), StateError> {
    sqlx::query(
        "INSERT INTO sluice_plans (id, environment, previous_plan_id, created_at, body) VALUES ($1, $2, $3, $4, $5)
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
impl PlanStore for PostgresState {
    async fn put_plan(&self, plan: &Plan) -> Result<(), StateError> {
        let mut connection = self.pool.acquire().await?;
        insert_plan(&mut connection, plan).await
    }

    async fn get_plan(&self, id: &PlanId) -> Result<Option<Plan>, StateError> {
        let row =
            sqlx::query("SELECT body FROM sluice_plans WHERE id = $1").bind(&id.0).fetch_optional(&self.pool).await?;
        match row {
            Some(row) => Ok(Some(decode_plan(&id.0, &row.try_get::<String, _>("body")?)?)),
            None => Ok(None),
        }
    }

    async fn list_plans(&self, environment: &EnvironmentName) -> Result<Vec<PlanSummary>, StateError> {
        let rows = sqlx::query_as::<_, PlanSummaryRow>(
            "SELECT id, environment, previous_plan_id, created_at FROM sluice_plans
             WHERE environment = $1 ORDER BY created_at DESC, seq DESC",
        )
        .bind(environment.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(PlanSummaryRow::into_summary).collect()
    }
}

/// Takes the environment's lease for the run if it is free, expired or held by the same plan;
/// otherwise names the holder. Runs inside `begin_run`'s transaction.
async fn take_lease(
    connection: &mut PgConnection,
    start: &RunStart<'_>,
    expires_at: Timestamp,
) -> Result<(), StateError> {
    let plan = start.plan;
    let environment = &plan.environment;
    for _ in 0..LEASE_ATTEMPTS {
        let taken = sqlx::query(
            "INSERT INTO sluice_leases (environment, plan_id, run_id, expires_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (environment) DO UPDATE
                SET plan_id = EXCLUDED.plan_id, run_id = EXCLUDED.run_id, expires_at = EXCLUDED.expires_at
                WHERE sluice_leases.expires_at <= $5 OR sluice_leases.plan_id = EXCLUDED.plan_id
             RETURNING run_id",
        )
        .bind(environment.as_str())
        .bind(&plan.id.0)
        .bind(&start.run_id.0)
        .bind(expires_at.0)
        .bind(start.now.0)
        .fetch_optional(&mut *connection)
        .await?;
        if taken.is_some() {
            return Ok(());
        }
        if let Some(holder) = select_lease(connection, environment).await? {
            return Err(holder.held_error()?);
        }
        // The holder released the lease between the two statements: try again.
    }
    Err(StateError::Contention { what: format!("lease of environment {environment}") })
}

#[async_trait]
impl RunStore for PostgresState {
    async fn begin_run(&self, start: RunStart<'_>) -> Result<RunRecord, StateError> {
        let plan = start.plan;
        let environment = &plan.environment;
        let expires_at = lease_expiry(start.now, start.lease_ttl_seconds)?;
        let mut transaction = self.begin().await?;
        // First: a janitor's claim commits wholly before this run (its tombstones are seen
        // below) or after it (it sees this run among the running ones and gives up).
        lock_drop_claim(&mut transaction, false).await?;

        let actual = lock_environment(&mut transaction, environment, false).await?.flatten();
        if !same_plan(plan.previous_plan_id.as_ref(), actual.as_deref()) {
            return Err(StateError::StaleEnvironment {
                environment: environment.clone(),
                expected: plan.previous_plan_id.clone(),
                actual: actual.map(PlanId),
            });
        }
        let names: Vec<String> = plan.snapshots.iter().map(|planned| planned.snapshot.name.to_string()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let versions: Vec<&str> = plan.snapshots.iter().map(|planned| planned.snapshot.version.0.as_str()).collect();
        check_not_being_dropped(&mut transaction, &names, &versions).await?;
        insert_plan(&mut transaction, plan).await?;
        insert_snapshots(&mut transaction, start.snapshots).await?;
        take_lease(&mut transaction, &start, expires_at).await?;
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
             VALUES ($1, $2, $3, 'running', $4, $5)",
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
             FROM sluice_runs WHERE plan_id = $1 ORDER BY seq",
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
             FROM sluice_runs WHERE plan_id = $1 ORDER BY seq DESC LIMIT 1",
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
        let mut transaction = self.begin().await?;
        // An unlocked read names the run's environment; the locks follow in the module's order:
        // environment row, lease row, run row.
        let Some(unlocked) = select_run(&mut transaction, id).await? else {
            return Err(StateError::not_found(format!("run {id}")));
        };
        let current = match &finalization.promotion {
            Some(promotion) => Some(lock_environment(&mut transaction, &promotion.state.name, true).await?),
            None => None,
        };
        lock_lease(&mut transaction, &unlocked.environment).await?;
        let Some(run) = lock_run(&mut transaction, id).await? else {
            return Err(StateError::not_found(format!("run {id}")));
        };
        if run.status != RunStatus::Running {
            // Finished already (maybe by a finalization we waited for): the first outcome wins.
            return Ok(run);
        }
        if run.promoting && outcome.status != RunStatus::Succeeded {
            // Its views are moving: it ends promoted, whatever was decided before that began.
            return Ok(run);
        }
        if let (Some(promotion), Some(current)) = (&finalization.promotion, current) {
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
            "UPDATE sluice_runs SET promoting = TRUE
             WHERE id = $1 AND status = 'running'
               AND (promoting OR NOT EXISTS (SELECT 1 FROM sluice_breakers WHERE plan_id = $2))",
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
             SET tasks_done = tasks_done + $2, intervals_done = intervals_done + $3, retries = retries + $4
             WHERE id = $1",
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

#[async_trait]
impl TaskStore for PostgresState {
    async fn record_task_done(&self, run_id: &RunId, tasks: &[TaskId]) -> Result<(), StateError> {
        if tasks.is_empty() {
            return Ok(());
        }
        let mut unique: Vec<TaskId> = tasks.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let bytes: Vec<Vec<u8>> = unique.iter().map(|task| task.0.to_vec()).collect();
        let mut connection = self.pool.acquire().await?;
        let inserted = sqlx::query(
            "INSERT INTO sluice_tasks_done (run_id, plan_id, task_id)
             SELECT r.id, r.plan_id, t.task_id FROM sluice_runs r CROSS JOIN unnest($2::bytea[]) AS t(task_id)
             WHERE r.id = $1
             ON CONFLICT (run_id, task_id) DO NOTHING",
        )
        .bind(&run_id.0)
        .bind(bytes)
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
        let runs: Vec<&str> = finished.iter().map(|task| task.run_id.0.as_str()).collect();
        let tasks: Vec<Vec<u8>> = finished.iter().map(|task| task.task_id.0.to_vec()).collect();
        let intervals =
            finished.iter().map(|task| to_stored_count(task.intervals, "intervals")).collect::<Result<Vec<_>, _>>()?;
        let retries =
            finished.iter().map(|task| to_stored_count(task.retries, "retries")).collect::<Result<Vec<_>, _>>()?;
        let mut transaction = self.begin().await?;
        write_intervals(&mut transaction, &records).await?;
        // One statement: the tasks not done yet are inserted, and what they gained is added to
        // their runs; the runs that do not exist are returned.
        let missing: Vec<String> = sqlx::query_scalar(
            "WITH finished AS (
                 SELECT DISTINCT ON (run_id, task_id) run_id, task_id, intervals, retries
                 FROM unnest($1::text[], $2::bytea[], $3::bigint[], $4::bigint[]) AS f(run_id, task_id, intervals, retries)
             ),
             inserted AS (
                 INSERT INTO sluice_tasks_done (run_id, plan_id, task_id)
                 SELECT r.id, r.plan_id, f.task_id FROM finished f JOIN sluice_runs r ON r.id = f.run_id
                 ON CONFLICT (run_id, task_id) DO NOTHING
                 RETURNING run_id, task_id
             ),
             gained AS (
                 SELECT f.run_id, COUNT(*) AS tasks, SUM(f.intervals) AS intervals, SUM(f.retries) AS retries
                 FROM inserted i JOIN finished f ON f.run_id = i.run_id AND f.task_id = i.task_id
                 GROUP BY f.run_id
             ),
             updated AS (
                 UPDATE sluice_runs r
                 SET tasks_done = r.tasks_done + g.tasks, intervals_done = r.intervals_done + g.intervals,
                     retries = r.retries + g.retries
                 FROM gained g WHERE r.id = g.run_id
                 RETURNING r.id
             )
             SELECT DISTINCT f.run_id FROM finished f WHERE NOT EXISTS (SELECT 1 FROM sluice_runs r WHERE r.id = f.run_id)",
        )
        .bind(runs)
        .bind(tasks)
        .bind(intervals)
        .bind(retries)
        .fetch_all(&mut *transaction)
        .await?;
        if let Some(run) = missing.first() {
            return Err(StateError::not_found(format!("run {run}")));
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn done_tasks(&self, run_id: &RunId) -> Result<BTreeSet<TaskId>, StateError> {
        let rows = sqlx::query("SELECT task_id FROM sluice_tasks_done WHERE run_id = $1")
            .bind(&run_id.0)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| task_id(&row.try_get::<Vec<u8>, _>("task_id")?)).collect()
    }

    async fn done_tasks_of_plan(&self, plan_id: &PlanId) -> Result<BTreeSet<TaskId>, StateError> {
        let rows = sqlx::query("SELECT DISTINCT task_id FROM sluice_tasks_done WHERE plan_id = $1")
            .bind(&plan_id.0)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| task_id(&row.try_get::<Vec<u8>, _>("task_id")?)).collect()
    }

    async fn record_task_failure(&self, run_id: &RunId, failure: &TaskFailure) -> Result<(), StateError> {
        let recorded = sqlx::query(
            "INSERT INTO sluice_task_failures (run_id, task_id, model, interval_start, interval_end, error, attempts)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (run_id, task_id) DO UPDATE
                SET model = EXCLUDED.model, interval_start = EXCLUDED.interval_start,
                    interval_end = EXCLUDED.interval_end, error = EXCLUDED.error, attempts = EXCLUDED.attempts",
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
             FROM sluice_task_failures WHERE run_id = $1 ORDER BY seq",
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
        // One statement, so one snapshot: the run, the breaker and the key's rows that overlap
        // the interval (found through `sluice_intervals_key`), one output row per interval row,
        // or one row of NULLs when none overlaps. A row that only touches the interval holds
        // none of its instants, so the overlapping rows alone decide coverage.
        let rows: Vec<OutlookRow> = sqlx::query_as(
            "SELECT r.status, b.reason, i.start_ts, i.end_ts
             FROM (SELECT 1) AS one
             LEFT JOIN sluice_runs r ON r.id = $1
             LEFT JOIN sluice_breakers b ON b.plan_id = $2
             LEFT JOIN sluice_intervals i
                ON i.name = $3 AND i.version = $4 AND i.start_ts < $6 AND i.end_ts > $5",
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
impl DropStore for PostgresState {
    async fn claim_tables_for_drop(
        &self,
        tables: &[IntervalKey],
        running_seen: &[RunId],
        environments_seen: &BTreeMap<EnvironmentName, Option<PlanId>>,
    ) -> Result<(), StateError> {
        let mut transaction = self.begin().await?;
        // Exclusive: waits for every `begin_run` and interval write in progress to end, and
        // holds off new ones until this commits. The reads below are statements of their own,
        // so they see everything those committed.
        lock_drop_claim(&mut transaction, true).await?;
        let running: Vec<String> = sqlx::query_scalar("SELECT id FROM sluice_runs WHERE status = 'running'")
            .fetch_all(&mut *transaction)
            .await?;
        check_running_seen(running, running_seen)?;
        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT name, plan_id FROM sluice_environments").fetch_all(&mut *transaction).await?;
        check_environments_seen(rows, environments_seen)?;

        let (names, versions) = interval_key_columns(tables);
        if !names.is_empty() {
            sqlx::query(
                "INSERT INTO sluice_tables_being_dropped (name, version)
                 SELECT * FROM unnest($1::text[], $2::text[])
                 ON CONFLICT (name, version) DO NOTHING",
            )
            .bind(&names)
            .bind(&versions)
            .execute(&mut *transaction)
            .await?;
            sqlx::query(
                "DELETE FROM sluice_intervals i
                 USING unnest($1::text[], $2::text[]) AS k(name, version)
                 WHERE i.name = k.name AND i.version = k.version",
            )
            .bind(&names)
            .bind(&versions)
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
        sqlx::query(
            "DELETE FROM sluice_tables_being_dropped d
             USING unnest($1::text[], $2::text[]) AS k(name, version)
             WHERE d.name = k.name AND d.version = k.version",
        )
        .bind(names)
        .bind(versions)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl BreakerStore for PostgresState {
    async fn trip_breaker(&self, plan_id: &PlanId, reason: &str) -> Result<(), StateError> {
        sqlx::query("INSERT INTO sluice_breakers (plan_id, reason) VALUES ($1, $2) ON CONFLICT (plan_id) DO NOTHING")
            .bind(&plan_id.0)
            .bind(reason)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn breaker(&self, plan_id: &PlanId) -> Result<Option<String>, StateError> {
        let row = sqlx::query("SELECT reason FROM sluice_breakers WHERE plan_id = $1")
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
impl AuditLog for PostgresState {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StateError> {
        let mut connection = self.pool.acquire().await?;
        insert_audit(&mut connection, entry).await
    }

    async fn list_audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StateError> {
        let rows = sqlx::query_as::<_, AuditRow>(
            "SELECT plan_id, run_id, environment, user_name, started_at, finished_at, intervals, models, retries, outcome
             FROM sluice_audit_log ORDER BY seq DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(AuditRow::into_entry).collect()
    }
}

#[cfg(test)]
impl PostgresState {
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
            sqlx::query("INSERT INTO sluice_intervals (name, version, start_ts, end_ts) VALUES ($1, $2, $3, $4)")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_found_in_urls() {
        assert_eq!(url_secrets("postgresql://u:p%40ss@host/db"), vec!["p%40ss".to_string(), "p@ss".to_string()]);
    }
}
