//! The PostgreSQL warehouse: one `PgConnection` per worker, held for the run and reopened only after it was lost.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::config::Secret;
use sluice_core::interval::Interval;
use sluice_core::model::SeedData;
use sluice_core::names::PhysicalTable;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgDatabaseError, PgRow};
use sqlx::{AssertSqlSafe, Column, Connection, Row, TypeInfo};

use crate::sql::{self, Dialect, ROWS_ALIAS};
use crate::{
    AuditCheck, Canceller, EngineError, GatewayPromotion, PromotionOutcome, TableChecksum, TimeColumn, ViewUpdate,
    Warehouse,
};

const ENGINE: &str = "postgres";

/// How long opening a connection may take before it counts as a (transient) timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The transaction-level advisory lock every DDL transaction of sluice takes first, so concurrent
/// `CREATE SCHEMA/TABLE IF NOT EXISTS` from several workers never collide on the catalog's unique indexes.
const DDL_LOCK_KEY: i64 = 0x736c_7569_6365_0001;

/// Where a PostgreSQL warehouse lives; built from a gateway's fields, never from a URL.
#[derive(Clone, Debug)]
pub struct PostgresSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Secret,
    pub database: String,
}

/// A PostgreSQL warehouse held by one worker.
///
/// Generated writes are single statements or multi-statement simple queries, which PostgreSQL runs as one implicit
/// transaction: one round trip, all or nothing. After a connection-level failure the connection is dropped and
/// the next call opens a new one, so a retried task does not need a new `Warehouse`.
pub struct PostgresWarehouse {
    gateway: String,
    options: PgConnectOptions,
    connection: Option<PgConnection>,
    /// The server process of `connection` (0 while none is open), for cancel requests.
    backend_pid: Arc<AtomicI32>,
}

/// Cancels the running statement of a PostgreSQL connection with `pg_cancel_backend`, sent on
/// a connection of its own.
struct PostgresCanceller {
    gateway: String,
    options: PgConnectOptions,
    backend_pid: Arc<AtomicI32>,
}

#[async_trait]
impl Canceller for PostgresCanceller {
    async fn cancel(&self) {
        let pid = self.backend_pid.load(Ordering::SeqCst);
        if pid == 0 {
            return;
        }
        let result = async {
            let mut connection = open_connection(&self.options).await?;
            let cancelled = sqlx::query("SELECT pg_cancel_backend($1)").bind(pid).execute(&mut connection).await;
            let _ = connection.close().await;
            cancelled.map_err(classify)
        }
        .await;
        match result {
            Ok(_) => tracing::info!(gateway = %self.gateway, pid, "cancelled the statement in flight"),
            Err(error) => {
                tracing::warn!(gateway = %self.gateway, error = %error, "cancelling the statement in flight failed")
            }
        }
    }
}

impl fmt::Debug for PostgresWarehouse {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("PostgresWarehouse")
            .field("gateway", &self.gateway)
            .field("host", &self.options.get_host())
            .field("port", &self.options.get_port())
            .field("database", &self.options.get_database())
            .field("connected", &self.connection.is_some())
            .finish()
    }
}

impl PostgresWarehouse {
    /// Connects to the gateway's database. Sessions run in UTC so TIMESTAMPTZ comparisons are deterministic.
    pub async fn connect(gateway: &str, settings: PostgresSettings) -> Result<PostgresWarehouse, EngineError> {
        let options = PgConnectOptions::new_without_pgpass()
            .host(&settings.host)
            .port(settings.port)
            .username(&settings.user)
            .password(settings.password.expose())
            .database(&settings.database)
            .application_name("sluice")
            .options([("TimeZone", "UTC")]);
        let mut warehouse = PostgresWarehouse {
            gateway: gateway.to_string(),
            options,
            connection: None,
            backend_pid: Arc::new(AtomicI32::new(0)),
        };
        warehouse.connection().await?;
        Ok(warehouse)
    }

    /// The open connection, opening a new one when the previous one was lost.
    async fn connection(&mut self) -> Result<&mut PgConnection, EngineError> {
        let connection = match self.connection.take() {
            Some(connection) => connection,
            None => {
                let mut connection =
                    open_connection(&self.options).await.map_err(|error| error.for_gateway(&self.gateway))?;
                let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                    .fetch_one(&mut connection)
                    .await
                    .map_err(|error| classify(error).for_gateway(&self.gateway))?;
                self.backend_pid.store(pid, Ordering::SeqCst);
                connection
            }
        };
        Ok(self.connection.insert(connection))
    }

    /// Converts a driver result, forgetting the connection when the failure means it is gone.
    fn settle<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, EngineError> {
        match result {
            Ok(value) => Ok(value),
            Err(error) => {
                let error = classify(error);
                if matches!(error, EngineError::Unavailable { .. }) {
                    tracing::warn!(gateway = %self.gateway, error = %error, "postgres connection lost; reconnecting on next use");
                    self.connection = None;
                    self.backend_pid.store(0, Ordering::SeqCst);
                }
                Err(error)
            }
        }
    }

    /// Runs `sql` (one or more statements, one implicit transaction) and returns the rows it affected.
    async fn run(&mut self, sql: String) -> Result<u64, EngineError> {
        let connection = self.connection().await?;
        let result = sqlx::raw_sql(AssertSqlSafe(sql)).execute(connection).await;
        self.settle(result).map(|done| done.rows_affected())
    }

    /// Runs `lock` (one `SELECT pg_advisory_xact_lock(…)`) then `statement` as one implicit
    /// transaction; returns the rows the statement affected.
    async fn run_locked(&mut self, lock: String, statement: String) -> Result<u64, EngineError> {
        // The lock's SELECT reports one row.
        self.run(format!("{lock};\n{statement}")).await.map(|rows| rows.saturating_sub(1))
    }

    /// `run_locked`, then `checks` in the same transaction: the first that counts a row rolls
    /// the transaction back and is the error. Without checks, exactly `run_locked`.
    async fn run_checked(
        &mut self,
        lock: String,
        statement: String,
        checks: &[AuditCheck],
    ) -> Result<u64, EngineError> {
        if checks.is_empty() {
            return self.run_locked(lock, statement).await;
        }
        let connection = self.connection().await?;
        let result = write_checked(connection, format!("{lock};\n{statement}"), checks).await;
        self.settle(result)?
    }

    /// Runs `sql` and returns its first row.
    async fn first_row(&mut self, sql: String) -> Result<Option<PgRow>, EngineError> {
        let connection = self.connection().await?;
        let result = sqlx::raw_sql(AssertSqlSafe(sql)).fetch_optional(connection).await;
        self.settle(result)
    }
}

async fn open_connection(options: &PgConnectOptions) -> Result<PgConnection, EngineError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(classify(error)),
        Err(_) => Err(EngineError::Timeout {
            engine: ENGINE,
            message: format!("connecting took longer than {} seconds", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

/// The transaction-level advisory lock a data write takes first, keyed by its table and
/// interval (the whole table for full and upsert writes). Two deliveries of one task running at
/// once (a redelivery while the first worker still runs it) then write one after the other: the
/// second statement's snapshot, taken once it holds the lock, sees the first's rows and replaces
/// them, where without the lock both deletes would see nothing and both inserts would stay.
fn write_lock(table: &PhysicalTable, interval: Option<Interval>) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"sluice write lock\0");
    hasher.update(table.schema.as_bytes());
    hasher.update(b".");
    hasher.update(table.table.as_bytes());
    if let Some(interval) = interval {
        hasher.update(&interval.start.0.to_le_bytes());
        hasher.update(&interval.end.0.to_le_bytes());
    }
    let mut key = [0u8; 8];
    key.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    format!("SELECT pg_advisory_xact_lock({})", i64::from_le_bytes(key))
}

/// One transaction: `script` (the lock and the write), then each check's count; commits only
/// when every count is zero. The inner result is the write's rows or the failed audit.
async fn write_checked(
    connection: &mut PgConnection,
    script: String,
    checks: &[AuditCheck],
) -> Result<Result<u64, EngineError>, sqlx::Error> {
    let mut transaction = connection.begin().await?;
    // The lock's SELECT reports one row.
    let rows = sqlx::raw_sql(AssertSqlSafe(script)).execute(&mut *transaction).await?.rows_affected().saturating_sub(1);
    for check in checks {
        let count: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(check.count_query.clone())).fetch_one(&mut *transaction).await?;
        if let Some(failure) = check.failure(count) {
            transaction.rollback().await?;
            return Ok(Err(failure));
        }
    }
    transaction.commit().await?;
    Ok(Ok(rows))
}

/// `SELECT pg_advisory_xact_lock(…)`, the first statement of every DDL transaction.
/// A gateway's share of a promotion in one transaction, under the DDL lock: the marker read
/// with a row lock, then (when it shows the expected plan or none) the views and the marker.
async fn promote_guarded(
    connection: &mut PgConnection,
    promotion: &GatewayPromotion,
) -> Result<PromotionOutcome, sqlx::Error> {
    let mut transaction = connection.begin().await?;
    let [schema, table] = sql::create_promotion_marker();
    sqlx::raw_sql(AssertSqlSafe(format!("{};\n{schema};\n{table}", ddl_lock()))).execute(&mut *transaction).await?;
    let shown: Option<String> =
        sqlx::query_scalar(AssertSqlSafe(sql::select_promotion_marker(&promotion.environment, true)))
            .fetch_optional(&mut *transaction)
            .await?;
    let outcome = PromotionOutcome::decide(shown.as_deref(), promotion);
    if outcome != PromotionOutcome::Applied {
        transaction.rollback().await?;
        return Ok(outcome);
    }
    let mut script = Vec::new();
    for schema in sql::view_schemas(&promotion.updates) {
        script.push(sql::create_schema(schema));
    }
    for update in &promotion.updates {
        script.extend(sql::view_update_statements(update));
    }
    script.extend(sql::set_promotion_marker(&promotion.environment, promotion.plan.as_deref()));
    sqlx::raw_sql(AssertSqlSafe(script.join(";\n"))).execute(&mut *transaction).await?;
    transaction.commit().await?;
    Ok(outcome)
}

fn ddl_lock() -> String {
    format!("SELECT pg_advisory_xact_lock({DDL_LOCK_KEY})")
}

/// Sorts a driver error into transient and persistent failures by SQLSTATE and kind.
fn classify(error: sqlx::Error) -> EngineError {
    match error {
        sqlx::Error::Database(database_error) => {
            let mut message = database_error.message().to_string();
            if let Some(detail) = database_error.try_downcast_ref::<PgDatabaseError>().and_then(|e| e.detail()) {
                message.push_str(&format!(" ({detail})"));
            }
            let code = database_error.code().map(|code| code.into_owned());
            classify_sql_state(code, message)
        }
        sqlx::Error::Io(io_error) => {
            if io_error.kind() == std::io::ErrorKind::TimedOut {
                EngineError::Timeout { engine: ENGINE, message: io_error.to_string() }
            } else {
                EngineError::Unavailable { engine: ENGINE, message: io_error.to_string() }
            }
        }
        sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed | sqlx::Error::PoolClosed => {
            EngineError::Unavailable { engine: ENGINE, message: error.to_string() }
        }
        sqlx::Error::PoolTimedOut => EngineError::Timeout { engine: ENGINE, message: error.to_string() },
        sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => {
            EngineError::Configuration { engine: ENGINE, message: error.to_string() }
        }
        other => EngineError::UnexpectedResult { engine: ENGINE, message: other.to_string() },
    }
}

/// Transient SQLSTATEs: 40001 serialization failure, 40P01 deadlock, class 08 connection exceptions, 57P01–57P03
/// shutdowns, 53300 too many connections, 57014 statement timeout or cancel, 55P03 lock timeout.
fn classify_sql_state(code: Option<String>, message: String) -> EngineError {
    let Some(code) = code else {
        return EngineError::Statement { engine: ENGINE, code: None, message };
    };
    match code.as_str() {
        "40001" | "40P01" => EngineError::Conflict { engine: ENGINE, message: format!("{message} (SQLSTATE {code})") },
        "57P01" | "57P02" | "57P03" | "53300" => {
            EngineError::Unavailable { engine: ENGINE, message: format!("{message} (SQLSTATE {code})") }
        }
        "57014" | "55P03" => EngineError::Timeout { engine: ENGINE, message: format!("{message} (SQLSTATE {code})") },
        _ if code.starts_with("08") => {
            EngineError::Unavailable { engine: ENGINE, message: format!("{message} (SQLSTATE {code})") }
        }
        _ => EngineError::Statement { engine: ENGINE, code: Some(code), message },
    }
}

/// Reads an integer from the first column, whatever integer (or integral NUMERIC) type it has.
fn integer_column(row: &PgRow) -> Result<Option<i64>, EngineError> {
    let unexpected = |message: String| EngineError::UnexpectedResult { engine: ENGINE, message };
    let Some(column) = row.columns().first() else {
        return Err(unexpected("the query returned no column".to_string()));
    };
    let type_name = column.type_info().name().to_string();
    let decoded = match type_name.as_str() {
        "INT8" => row.try_get::<Option<i64>, _>(0),
        "INT4" => row.try_get::<Option<i32>, _>(0).map(|value| value.map(i64::from)),
        "INT2" => row.try_get::<Option<i16>, _>(0).map(|value| value.map(i64::from)),
        "NUMERIC" => {
            // `raw_sql` uses the simple query protocol, whose values are always text; parse the decimal digits.
            let text = row.try_get_unchecked::<Option<String>, _>(0).map_err(|error| unexpected(error.to_string()))?;
            return match text {
                None => Ok(None),
                Some(text) => text
                    .parse::<i64>()
                    .map(Some)
                    .map_err(|_| unexpected(format!("expected an integer, found the NUMERIC {text}"))),
            };
        }
        other => return Err(unexpected(format!("expected an integer column, found type {other}"))),
    };
    decoded.map_err(|error| unexpected(error.to_string()))
}

#[async_trait]
impl Warehouse for PostgresWarehouse {
    fn engine_name(&self) -> &'static str {
        ENGINE
    }

    async fn ping(&mut self) -> Result<(), EngineError> {
        let connection = self.connection().await?;
        let result = connection.ping().await;
        self.settle(result)
    }

    fn canceller(&self) -> Arc<dyn Canceller> {
        Arc::new(PostgresCanceller {
            gateway: self.gateway.clone(),
            options: self.options.clone(),
            backend_pid: Arc::clone(&self.backend_pid),
        })
    }

    async fn execute(&mut self, sql: &str) -> Result<(), EngineError> {
        let result = self.run(sql.to_string()).await;
        if let Err(error) = &result
            && !matches!(error, EngineError::Unavailable { .. })
            && let Some(connection) = self.connection.as_mut()
        {
            // Statements as given may have opened a transaction the failure left aborted; outside one this is a
            // no-op warning. Its own failure would only repeat the first error.
            let _ = sqlx::raw_sql("ROLLBACK").execute(connection).await;
        }
        result.map(|_| ())
    }

    async fn ensure_table(
        &mut self,
        table: &PhysicalTable,
        columns: &[(String, String)],
        query: &str,
    ) -> Result<(), EngineError> {
        let create = sql::create_table(Dialect::Postgres, table, columns, query)?;
        let statements = [ddl_lock(), sql::create_schema(&table.schema), create].join(";\n");
        self.run(statements).await.map(|_| ())
    }

    async fn replace_interval(
        &mut self,
        table: &PhysicalTable,
        time_column: TimeColumn<'_>,
        interval: Interval,
        query: &str,
        checks: &[AuditCheck],
    ) -> Result<u64, EngineError> {
        // One statement: the CTE's DELETE and the INSERT see the same snapshot and commit together.
        let statement = format!(
            "WITH \"sluice_deleted\" AS ({}) {}",
            sql::delete_interval(table, time_column, interval),
            sql::insert_interval(table, time_column, interval, query)
        );
        self.run_checked(write_lock(table, Some(interval)), statement, checks).await
    }

    async fn replace_all(
        &mut self,
        table: &PhysicalTable,
        query: &str,
        checks: &[AuditCheck],
    ) -> Result<u64, EngineError> {
        let statement = format!(
            "WITH \"sluice_deleted\" AS (DELETE FROM {}) {}",
            sql::physical_name(table),
            sql::insert_all(table, query)
        );
        self.run_checked(write_lock(table, None), statement, checks).await
    }

    async fn rebuild(&mut self, table: &PhysicalTable, query: &str, checks: &[AuditCheck]) -> Result<u64, EngineError> {
        // One statement: the DELETE and the query read the same snapshot, the rows as they were.
        self.replace_all(table, query, checks).await
    }

    async fn table_columns(&mut self, table: &PhysicalTable) -> Result<Vec<(String, String)>, EngineError> {
        let connection = self.connection().await?;
        let result = sqlx::query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
        )
        .bind(&table.schema)
        .bind(&table.table)
        .fetch_all(connection)
        .await;
        let rows = self.settle(result)?;
        rows.iter()
            .map(|row| Ok::<_, sqlx::Error>((row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| EngineError::UnexpectedResult { engine: ENGINE, message: error.to_string() })
    }

    async fn append(&mut self, table: &PhysicalTable, query: &str, checks: &[AuditCheck]) -> Result<u64, EngineError> {
        self.run_checked(write_lock(table, None), sql::insert_all(table, query), checks).await
    }

    async fn upsert(
        &mut self,
        table: &PhysicalTable,
        unique_key: &[String],
        query: &str,
        checks: &[AuditCheck],
    ) -> Result<u64, EngineError> {
        let key_match = sql::unique_key_match(table, unique_key, ROWS_ALIAS)?;
        let target = sql::physical_name(table);
        // The query runs once (MATERIALIZED); the DELETE and the INSERT read the same rows in one statement.
        let statement = format!(
            "WITH {ROWS_ALIAS} AS MATERIALIZED ({}), \
             \"sluice_deleted\" AS (DELETE FROM {target} AS \"sluice_target\" USING {ROWS_ALIAS} WHERE {key_match}) \
             INSERT INTO {target} SELECT * FROM {ROWS_ALIAS}",
            sql::query_body(query)
        );
        self.run_checked(write_lock(table, None), statement, checks).await
    }

    async fn load_seed(
        &mut self,
        table: &PhysicalTable,
        columns: &[(String, String)],
        seed: &SeedData,
    ) -> Result<u64, EngineError> {
        let statements = sql::seed_statements(Dialect::Postgres, table, columns, seed)?;
        let mut script =
            vec![ddl_lock(), sql::create_schema(&table.schema), statements.create_table, statements.delete_rows];
        script.extend(statements.inserts);
        self.run(script.join(";\n")).await?;
        Ok(statements.rows)
    }

    async fn create_physical_view(&mut self, view: &PhysicalTable, query: &str) -> Result<(), EngineError> {
        let statements = [
            ddl_lock(),
            sql::create_schema(&view.schema),
            format!("CREATE OR REPLACE VIEW {} AS {}", sql::physical_name(view), sql::query_body(query)),
        ];
        self.run(statements.join(";\n")).await.map(|_| ())
    }

    async fn promote(&mut self, updates: &[ViewUpdate]) -> Result<(), EngineError> {
        if updates.is_empty() {
            return Ok(());
        }
        let mut script = vec![ddl_lock()];
        for schema in sql::view_schemas(updates) {
            script.push(sql::create_schema(schema));
        }
        for update in updates {
            script.extend(sql::view_update_statements(update));
        }
        // One simple query: PostgreSQL runs it as one implicit transaction, so any failure rolls back every view.
        self.run(script.join(";\n")).await.map(|_| ())
    }

    async fn promote_environment(&mut self, promotion: &GatewayPromotion) -> Result<PromotionOutcome, EngineError> {
        let connection = self.connection().await?;
        let result = promote_guarded(connection, promotion).await;
        self.settle(result)
    }

    async fn shown_plan(&mut self, environment: &str) -> Result<Option<String>, EngineError> {
        let exists = self.first_row(sql::promotion_marker_exists()).await?;
        let exists: i64 = match exists {
            Some(row) => row
                .try_get(0)
                .map_err(|error| EngineError::UnexpectedResult { engine: ENGINE, message: error.to_string() })?,
            None => 0,
        };
        if exists == 0 {
            return Ok(None);
        }
        let Some(row) = self.first_row(sql::select_promotion_marker(environment, false)).await? else {
            return Ok(None);
        };
        row.try_get::<Option<String>, _>(0)
            .map_err(|error| EngineError::UnexpectedResult { engine: ENGINE, message: error.to_string() })
    }

    async fn drop_table(&mut self, table: &PhysicalTable) -> Result<(), EngineError> {
        let connection = self.connection().await?;
        let result = sqlx::query(
            "SELECT c.relkind::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
        )
        .bind(&table.schema)
        .bind(&table.table)
        .fetch_optional(connection)
        .await;
        let Some(row) = self.settle(result)? else {
            return Ok(());
        };
        let kind: String = row
            .try_get(0)
            .map_err(|error| EngineError::UnexpectedResult { engine: ENGINE, message: error.to_string() })?;
        let object = match kind.as_str() {
            "v" => "VIEW",
            "m" => "MATERIALIZED VIEW",
            "f" => "FOREIGN TABLE",
            _ => "TABLE",
        };
        self.run(format!("DROP {object} IF EXISTS {}", sql::physical_name(table))).await.map(|_| ())
    }

    async fn checksum(&mut self, schema: &str, name: &str) -> Result<TableChecksum, EngineError> {
        // The sum of a 64-bit slice of each row's md5, as NUMERIC (no overflow): order-independent and sensitive
        // to duplicates.
        let statement = format!(
            "SELECT COUNT(*), CAST(COALESCE(SUM(CAST(CAST(CAST('x' || SUBSTR(MD5(CAST(\"sluice_row\" AS TEXT)), 1, 16) \
             AS BIT(64)) AS BIGINT) AS NUMERIC)), 0) AS TEXT) FROM {} AS \"sluice_row\"",
            sql::qualified_name(schema, name)
        );
        let unexpected = |message: String| EngineError::UnexpectedResult { engine: ENGINE, message };
        let Some(row) = self.first_row(statement).await? else {
            return Err(unexpected("the checksum query returned no row".to_string()));
        };
        let rows: i64 = row.try_get(0).map_err(|error| unexpected(error.to_string()))?;
        let checksum: String = row.try_get(1).map_err(|error| unexpected(error.to_string()))?;
        Ok(TableChecksum { rows, checksum })
    }

    async fn query_i64(&mut self, sql: &str) -> Result<Option<i64>, EngineError> {
        match self.first_row(sql.to_string()).await? {
            None => Ok(None),
            Some(row) => integer_column(&row),
        }
    }

    async fn view_target(&mut self, schema: &str, name: &str) -> Result<Option<String>, EngineError> {
        // The relation the view's rewrite rule depends on (pg_depend), or the definition when it reads none.
        let connection = self.connection().await?;
        let result = sqlx::query(
            "SELECT COALESCE(( \
                 SELECT n.nspname || '.' || c.relname \
                 FROM pg_catalog.pg_rewrite r \
                 JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid \
                     AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                 JOIN pg_catalog.pg_class c ON c.oid = d.refobjid AND c.oid <> v.oid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE r.ev_class = v.oid \
                 ORDER BY 1 LIMIT 1), pg_catalog.pg_get_viewdef(v.oid)) \
             FROM pg_catalog.pg_class v \
             JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace \
             WHERE vn.nspname = $1 AND v.relname = $2 AND v.relkind = 'v'",
        )
        .bind(schema)
        .bind(name)
        .fetch_optional(connection)
        .await;
        let Some(row) = self.settle(result)? else {
            return Ok(None);
        };
        row.try_get::<Option<String>, _>(0)
            .map_err(|error| EngineError::UnexpectedResult { engine: ENGINE, message: error.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_states_are_classified() {
        let classify = |code: &str| classify_sql_state(Some(code.to_string()), "boom".to_string());
        for transient in ["40001", "40P01", "08006", "08001", "57P01", "57P02", "57P03", "53300", "57014", "55P03"] {
            assert!(classify(transient).is_transient(), "{transient} should be transient");
        }
        for persistent in ["42601", "42P01", "42703", "22P02", "23505", "3D000"] {
            assert!(!classify(persistent).is_transient(), "{persistent} should be persistent");
        }
        assert_eq!(classify("42P01").sql_state(), Some("42P01"));
        assert!(!classify_sql_state(None, "boom".to_string()).is_transient());
    }

    #[test]
    fn io_errors_are_transient() {
        let refused = classify(sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)));
        assert!(refused.is_transient());
        let timed_out = classify(sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::TimedOut)));
        assert!(matches!(timed_out, EngineError::Timeout { .. }));
    }
}
