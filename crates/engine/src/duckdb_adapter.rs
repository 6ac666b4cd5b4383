//! The embedded DuckDB warehouse: one shared database per file per process, one cloned connection per worker.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use async_trait::async_trait;
use duckdb::OptionalExt;
use sluice_core::interval::Interval;
use sluice_core::model::SeedData;
use sluice_core::names::PhysicalTable;

use crate::sql::{self, Dialect};
use crate::{
    AuditCheck, Canceller, EngineError, GatewayPromotion, PromotionOutcome, TableChecksum, TimeColumn, ViewUpdate,
    Warehouse,
};

const ENGINE: &str = "duckdb";

/// The temporary table an upsert stages the query's rows in (per connection, dropped before commit).
const UPSERT_ROWS: &str = "\"sluice_upsert_rows\"";

/// Where a DuckDB database lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DuckDbLocation {
    /// A database file (created with its folder when absent).
    File(PathBuf),
    /// An in-memory database, shared by every warehouse of the same project in this process while any is open.
    InMemory { project_root: PathBuf },
}

impl DuckDbLocation {
    /// A gateway's `database` setting: `:memory:`, or a path relative to the project folder.
    pub fn resolve(database: &str, project_root: &Path) -> DuckDbLocation {
        if database == ":memory:" {
            return DuckDbLocation::InMemory { project_root: project_root.to_path_buf() };
        }
        DuckDbLocation::File(project_root.join(database))
    }

    /// The process-wide registry key: the canonical path, so every spelling of one file shares one database.
    fn registry_key(&self) -> Result<String, EngineError> {
        let io_error = |path: &Path, error: std::io::Error| EngineError::Unavailable {
            engine: ENGINE,
            message: format!("cannot resolve {}: {error}", path.display()),
        };
        match self {
            DuckDbLocation::InMemory { project_root } => {
                let root = project_root.canonicalize().unwrap_or_else(|_| project_root.clone());
                Ok(format!(":memory:{}", root.display()))
            }
            DuckDbLocation::File(path) => {
                let Some(file_name) = path.file_name() else {
                    return Err(EngineError::invalid_input(format!(
                        "duckdb database path {} does not name a file",
                        path.display()
                    )));
                };
                let parent = match path.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                std::fs::create_dir_all(&parent).map_err(|error| io_error(&parent, error))?;
                let parent = parent.canonicalize().map_err(|error| io_error(&parent, error))?;
                let file = parent.join(file_name);
                let canonical = file.canonicalize().unwrap_or(file);
                Ok(canonical.display().to_string())
            }
        }
    }
}

impl fmt::Display for DuckDbLocation {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DuckDbLocation::File(path) => write!(formatter, "{}", path.display()),
            DuckDbLocation::InMemory { .. } => formatter.write_str(":memory:"),
        }
    }
}

/// One open DuckDB database, shared by every warehouse of the process that uses the same file.
struct SharedDatabase {
    /// The connection the others are cloned from.
    root: Mutex<duckdb::Connection>,
    /// Serializes sluice's DDL transactions (the in-process stand-in for PostgreSQL's advisory lock), so racing
    /// `CREATE … IF NOT EXISTS` from several workers never meet as catalog conflicts.
    ddl: Mutex<()>,
    /// Striped locks a data write holds for its transaction, keyed by its table and interval (the
    /// in-process stand-in for PostgreSQL's write lock): two deliveries of one task running at
    /// once write one after the other, so the second replaces the first's rows. (Optimistic
    /// transactions alone let both a delete of nothing and an insert succeed.)
    writes: [Mutex<()>; WRITE_STRIPES],
}

const WRITE_STRIPES: usize = 64;

impl SharedDatabase {
    fn write_stripe(&self, table: &PhysicalTable, interval: Option<Interval>) -> &Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        table.schema.hash(&mut hasher);
        table.table.hash(&mut hasher);
        if let Some(interval) = interval {
            interval.start.0.hash(&mut hasher);
            interval.end.0.hash(&mut hasher);
        }
        &self.writes[(hasher.finish() % WRITE_STRIPES as u64) as usize]
    }
}

/// Open databases by canonical path. Weak: a database closes when its last warehouse is dropped.
static DATABASES: Mutex<BTreeMap<String, Weak<SharedDatabase>>> = Mutex::new(BTreeMap::new());

/// A mutex guard even after a panic elsewhere: every critical section here leaves its data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The shared database of `location` (opening it when no warehouse has it open) and a new connection to it.
fn shared_database(location: &DuckDbLocation) -> Result<(Arc<SharedDatabase>, duckdb::Connection), EngineError> {
    let key = location.registry_key()?;
    let mut databases = lock(&DATABASES);
    databases.retain(|_, database| database.strong_count() > 0);
    let database = match databases.get(&key).and_then(Weak::upgrade) {
        Some(database) => database,
        None => {
            let root = match location {
                DuckDbLocation::File(_) => duckdb::Connection::open(&key),
                DuckDbLocation::InMemory { .. } => duckdb::Connection::open_in_memory(),
            }
            .map_err(classify)?;
            tracing::debug!(database = %key, "opened duckdb database");
            let database = Arc::new(SharedDatabase {
                root: Mutex::new(root),
                ddl: Mutex::new(()),
                writes: std::array::from_fn(|_| Mutex::new(())),
            });
            databases.insert(key, Arc::downgrade(&database));
            database
        }
    };
    let connection = lock(&database.root).try_clone().map_err(classify)?;
    Ok((database, connection))
}

/// A DuckDB warehouse held by one worker: its own connection (a `try_clone` of the database's shared one), used
/// only from `spawn_blocking`. Transactions are DuckDB's optimistic ones; a write-write conflict is transient.
pub struct DuckDbWarehouse {
    location: DuckDbLocation,
    database: Arc<SharedDatabase>,
    connection: Arc<Mutex<duckdb::Connection>>,
    interrupt: Arc<duckdb::InterruptHandle>,
}

/// Interrupts the statement a DuckDB connection runs.
struct DuckDbCanceller {
    interrupt: Arc<duckdb::InterruptHandle>,
}

#[async_trait]
impl Canceller for DuckDbCanceller {
    async fn cancel(&self) {
        self.interrupt.interrupt();
    }
}

impl fmt::Debug for DuckDbWarehouse {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("DuckDbWarehouse").field("location", &self.location).finish()
    }
}

impl DuckDbWarehouse {
    /// Opens the database at `location`, or joins it when this process already has it open.
    pub async fn open(location: DuckDbLocation) -> Result<DuckDbWarehouse, EngineError> {
        let opening = location.clone();
        let (database, connection) = tokio::task::spawn_blocking(move || shared_database(&opening))
            .await
            .map_err(|error| EngineError::BlockingCall { engine: ENGINE, message: error.to_string() })??;
        let interrupt = connection.interrupt_handle();
        Ok(DuckDbWarehouse { location, database, connection: Arc::new(Mutex::new(connection)), interrupt })
    }

    /// Runs `work` with this warehouse's connection on a blocking thread.
    async fn call<T, F>(&self, work: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&mut duckdb::Connection, &SharedDatabase) -> Result<T, EngineError> + Send + 'static,
    {
        let connection = Arc::clone(&self.connection);
        let database = Arc::clone(&self.database);
        tokio::task::spawn_blocking(move || {
            let mut connection = lock(&connection);
            work(&mut connection, &database)
        })
        .await
        .map_err(|error| EngineError::BlockingCall { engine: ENGINE, message: error.to_string() })?
    }

    /// Runs `statements` in one transaction, holding the database's DDL lock.
    async fn ddl_transaction(&self, statements: Vec<String>) -> Result<(), EngineError> {
        self.call(move |connection, database| {
            let _ddl = lock(&database.ddl);
            in_transaction(connection, |transaction| {
                for statement in &statements {
                    transaction.execute_batch(statement)?;
                }
                Ok(())
            })
        })
        .await
    }
}

/// Runs `work` between BEGIN and COMMIT; any failure rolls back. (The connection's own transaction handle would
/// also send a stray ROLLBACK after every COMMIT.)
fn in_transaction<T>(
    connection: &duckdb::Connection,
    work: impl FnOnce(&duckdb::Connection) -> Result<T, duckdb::Error>,
) -> Result<T, EngineError> {
    in_checked_transaction(connection, &[], work)
}

/// `in_transaction`, running `checks` after `work`: the first that counts a row rolls back and
/// is the error.
fn in_checked_transaction<T>(
    connection: &duckdb::Connection,
    checks: &[AuditCheck],
    work: impl FnOnce(&duckdb::Connection) -> Result<T, duckdb::Error>,
) -> Result<T, EngineError> {
    if connection.execute_batch("BEGIN TRANSACTION").is_err() {
        // A transaction left open by statements run as given (`execute`): end it, then start ours.
        let _ = connection.execute_batch("ROLLBACK");
        connection.execute_batch("BEGIN TRANSACTION").map_err(classify)?;
    }
    let outcome = work(connection).and_then(|value| Ok((value, failed_check(connection, checks)?)));
    let outcome = match outcome {
        Ok((value, None)) => connection.execute_batch("COMMIT").map(|()| value),
        Ok((_, Some(failure))) => {
            let _ = connection.execute_batch("ROLLBACK");
            return Err(failure);
        }
        Err(error) => Err(error),
    };
    match outcome {
        Ok(value) => Ok(value),
        Err(error) => {
            // Fails harmlessly when the engine already ended the transaction (a failed COMMIT).
            let _ = connection.execute_batch("ROLLBACK");
            Err(classify(error))
        }
    }
}

/// The first check that counts a row, as its error.
fn failed_check(connection: &duckdb::Connection, checks: &[AuditCheck]) -> Result<Option<EngineError>, duckdb::Error> {
    for check in checks {
        let count: Option<i64> = connection.query_row(&check.count_query, [], |row| row.get(0))?;
        if let Some(failure) = check.failure(count) {
            return Ok(Some(failure));
        }
    }
    Ok(None)
}

/// DuckDB reports every failure as text: transaction conflicts ("Conflict", "TransactionContext") and a file
/// locked by another process are transient, an interrupted query is a timeout, anything else is the SQL's fault.
fn classify(error: duckdb::Error) -> EngineError {
    let message = error.to_string();
    match error {
        duckdb::Error::DuckDBFailure(..) => classify_message(message),
        duckdb::Error::FromSqlConversionFailure(..)
        | duckdb::Error::IntegralValueOutOfRange(..)
        | duckdb::Error::UnsignedIntegralValueOutOfRange(..)
        | duckdb::Error::InvalidColumnType(..)
        | duckdb::Error::InvalidColumnIndex(..)
        | duckdb::Error::QueryReturnedMoreThanOneRow
        | duckdb::Error::QueryReturnedNoRows => EngineError::UnexpectedResult { engine: ENGINE, message },
        _ => EngineError::Statement { engine: ENGINE, code: None, message },
    }
}

fn classify_message(message: String) -> EngineError {
    if message.contains("Conflict") || message.contains("TransactionContext") {
        EngineError::Conflict { engine: ENGINE, message }
    } else if message.contains("Could not set lock on file") {
        EngineError::Unavailable { engine: ENGINE, message }
    } else if message.contains("INTERRUPT") {
        EngineError::Timeout { engine: ENGINE, message }
    } else {
        EngineError::Statement { engine: ENGINE, code: None, message }
    }
}

#[async_trait]
impl Warehouse for DuckDbWarehouse {
    fn engine_name(&self) -> &'static str {
        ENGINE
    }

    async fn ping(&mut self) -> Result<(), EngineError> {
        self.call(|connection, _| connection.execute_batch("SELECT 1").map_err(classify)).await
    }

    fn canceller(&self) -> Arc<dyn Canceller> {
        Arc::new(DuckDbCanceller { interrupt: Arc::clone(&self.interrupt) })
    }

    async fn execute(&mut self, sql: &str) -> Result<(), EngineError> {
        let sql = sql.to_string();
        self.call(move |connection, _| {
            connection.execute_batch(&sql).map_err(|error| {
                // Statements as given may have opened a transaction the failure left aborted.
                let _ = connection.execute_batch("ROLLBACK");
                classify(error)
            })
        })
        .await
    }

    async fn ensure_table(
        &mut self,
        table: &PhysicalTable,
        columns: &[(String, String)],
        query: &str,
    ) -> Result<(), EngineError> {
        let create = sql::create_table(Dialect::DuckDb, table, columns, query)?;
        self.ddl_transaction(vec![sql::create_schema(&table.schema), create]).await
    }

    async fn replace_interval(
        &mut self,
        table: &PhysicalTable,
        time_column: TimeColumn<'_>,
        interval: Interval,
        query: &str,
        checks: &[AuditCheck],
    ) -> Result<u64, EngineError> {
        let delete = sql::delete_interval(table, time_column, interval);
        let insert = sql::insert_interval(table, time_column, interval, query);
        let key = table.clone();
        let checks = checks.to_vec();
        self.call(move |connection, database| {
            let _write = lock(database.write_stripe(&key, Some(interval)));
            in_checked_transaction(connection, &checks, |transaction| {
                transaction.execute(&delete, [])?;
                transaction.execute(&insert, [])
            })
            .map(|inserted| inserted as u64)
        })
        .await
    }

    async fn replace_all(
        &mut self,
        table: &PhysicalTable,
        query: &str,
        checks: &[AuditCheck],
    ) -> Result<u64, EngineError> {
        let delete = format!("DELETE FROM {}", sql::physical_name(table));
        let insert = sql::insert_all(table, query);
        let key = table.clone();
        let checks = checks.to_vec();
        self.call(move |connection, database| {
            let _write = lock(database.write_stripe(&key, None));
            in_checked_transaction(connection, &checks, |transaction| {
                transaction.execute(&delete, [])?;
                transaction.execute(&insert, [])
            })
            .map(|inserted| inserted as u64)
        })
        .await
    }

    async fn rebuild(&mut self, table: &PhysicalTable, query: &str, checks: &[AuditCheck]) -> Result<u64, EngineError> {
        // The query's rows are taken before the table is emptied: it reads the rows as they were.
        let staged = "\"sluice_rebuilt\"";
        let stage = format!("CREATE TEMPORARY TABLE {staged} AS {}", sql::query_body(query));
        let delete = format!("DELETE FROM {}", sql::physical_name(table));
        let insert = format!("INSERT INTO {} SELECT * FROM {staged}", sql::physical_name(table));
        let drop = format!("DROP TABLE {staged}");
        let key = table.clone();
        let checks = checks.to_vec();
        self.call(move |connection, database| {
            let _write = lock(database.write_stripe(&key, None));
            in_checked_transaction(connection, &checks, |transaction| {
                transaction.execute(&stage, [])?;
                transaction.execute(&delete, [])?;
                let inserted = transaction.execute(&insert, [])?;
                transaction.execute(&drop, [])?;
                Ok(inserted)
            })
            .map(|inserted| inserted as u64)
        })
        .await
    }

    async fn table_columns(&mut self, table: &PhysicalTable) -> Result<Vec<(String, String)>, EngineError> {
        let (schema, name) = (table.schema.clone(), table.table.clone());
        self.call(move |connection, _| {
            let mut statement = connection
                .prepare(
                    "SELECT column_name, data_type FROM information_schema.columns \
                     WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
                )
                .map_err(classify)?;
            let rows = statement
                .query_map([&schema, &name], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))
                .map_err(classify)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(classify)
        })
        .await
    }

    async fn append(&mut self, table: &PhysicalTable, query: &str, checks: &[AuditCheck]) -> Result<u64, EngineError> {
        let insert = sql::insert_all(table, query);
        let key = table.clone();
        let checks = checks.to_vec();
        self.call(move |connection, database| {
            let _write = lock(database.write_stripe(&key, None));
            in_checked_transaction(connection, &checks, |transaction| transaction.execute(&insert, []))
                .map(|inserted| inserted as u64)
        })
        .await
    }

    async fn upsert(
        &mut self,
        table: &PhysicalTable,
        unique_key: &[String],
        query: &str,
        checks: &[AuditCheck],
    ) -> Result<u64, EngineError> {
        let key_match = sql::unique_key_match(table, unique_key, UPSERT_ROWS)?;
        let target = sql::physical_name(table);
        // The query runs once, into a temporary table of this connection; both statements read it.
        let stage = format!(
            "CREATE OR REPLACE TEMPORARY TABLE {UPSERT_ROWS} AS SELECT * FROM ({}) AS {}",
            sql::query_body(query),
            sql::ROWS_ALIAS
        );
        let delete = format!("DELETE FROM {target} AS \"sluice_target\" USING {UPSERT_ROWS} WHERE {key_match}");
        let insert = format!("INSERT INTO {target} SELECT * FROM {UPSERT_ROWS}");
        let unstage = format!("DROP TABLE IF EXISTS {UPSERT_ROWS}");
        let key = table.clone();
        let checks = checks.to_vec();
        self.call(move |connection, database| {
            let _write = lock(database.write_stripe(&key, None));
            in_checked_transaction(connection, &checks, |transaction| {
                transaction.execute_batch(&stage)?;
                transaction.execute(&delete, [])?;
                let inserted = transaction.execute(&insert, [])?;
                transaction.execute_batch(&unstage)?;
                Ok(inserted as u64)
            })
        })
        .await
    }

    async fn load_seed(
        &mut self,
        table: &PhysicalTable,
        columns: &[(String, String)],
        seed: &SeedData,
    ) -> Result<u64, EngineError> {
        let statements = sql::seed_statements(Dialect::DuckDb, table, columns, seed)?;
        let rows = statements.rows;
        let mut script = vec![sql::create_schema(&table.schema), statements.create_table, statements.delete_rows];
        script.extend(statements.inserts);
        self.ddl_transaction(script).await?;
        Ok(rows)
    }

    async fn create_physical_view(&mut self, view: &PhysicalTable, query: &str) -> Result<(), EngineError> {
        self.ddl_transaction(vec![
            sql::create_schema(&view.schema),
            format!("CREATE OR REPLACE VIEW {} AS {}", sql::physical_name(view), sql::query_body(query)),
        ])
        .await
    }

    async fn promote(&mut self, updates: &[ViewUpdate]) -> Result<(), EngineError> {
        if updates.is_empty() {
            return Ok(());
        }
        let mut script = Vec::new();
        for schema in sql::view_schemas(updates) {
            script.push(sql::create_schema(schema));
        }
        for update in updates {
            script.extend(sql::view_update_statements(update));
        }
        self.ddl_transaction(script).await
    }

    async fn promote_environment(&mut self, promotion: &GatewayPromotion) -> Result<PromotionOutcome, EngineError> {
        let promotion = promotion.clone();
        self.call(move |connection, database| {
            let _ddl = lock(&database.ddl);
            in_transaction(connection, |transaction| {
                for statement in sql::create_promotion_marker() {
                    transaction.execute_batch(&statement)?;
                }
                let shown: Option<String> = transaction
                    .query_row(&sql::select_promotion_marker(&promotion.environment, false), [], |row| row.get(0))
                    .optional()?;
                let outcome = PromotionOutcome::decide(shown.as_deref(), &promotion);
                if outcome != PromotionOutcome::Applied {
                    return Ok(outcome);
                }
                for schema in sql::view_schemas(&promotion.updates) {
                    transaction.execute_batch(&sql::create_schema(schema))?;
                }
                for update in &promotion.updates {
                    for statement in sql::view_update_statements(update) {
                        transaction.execute_batch(&statement)?;
                    }
                }
                for statement in sql::set_promotion_marker(&promotion.environment, promotion.plan.as_deref()) {
                    transaction.execute_batch(&statement)?;
                }
                Ok(outcome)
            })
        })
        .await
    }

    async fn shown_plan(&mut self, environment: &str) -> Result<Option<String>, EngineError> {
        let environment = environment.to_string();
        self.call(move |connection, _| {
            let exists: i64 =
                connection.query_row(&sql::promotion_marker_exists(), [], |row| row.get(0)).map_err(classify)?;
            if exists == 0 {
                return Ok(None);
            }
            connection
                .query_row(&sql::select_promotion_marker(&environment, false), [], |row| row.get(0))
                .optional()
                .map_err(classify)
        })
        .await
    }

    async fn drop_table(&mut self, table: &PhysicalTable) -> Result<(), EngineError> {
        let table = table.clone();
        self.call(move |connection, database| {
            let _ddl = lock(&database.ddl);
            let kind: Option<String> = connection
                .query_row(
                    "SELECT table_type FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                    [&table.schema, &table.table],
                    |row| row.get(0),
                )
                .optional()
                .map_err(classify)?;
            let object = match kind.as_deref() {
                None => return Ok(()),
                Some("VIEW") => "VIEW",
                Some(_) => "TABLE",
            };
            connection
                .execute_batch(&format!("DROP {object} IF EXISTS {}", sql::physical_name(&table)))
                .map_err(classify)
        })
        .await
    }

    async fn checksum(&mut self, schema: &str, name: &str) -> Result<TableChecksum, EngineError> {
        // The sum of every row's hash (the alias is the whole row), as HUGEINT: order-independent and sensitive to
        // duplicates.
        let statement = format!(
            "SELECT COUNT(*), CAST(COALESCE(SUM(CAST(hash(\"sluice_row\") AS HUGEINT)), 0) AS VARCHAR) \
             FROM {} AS \"sluice_row\"",
            sql::qualified_name(schema, name)
        );
        self.call(move |connection, _| {
            connection
                .query_row(&statement, [], |row| Ok(TableChecksum { rows: row.get(0)?, checksum: row.get(1)? }))
                .map_err(classify)
        })
        .await
    }

    async fn query_i64(&mut self, sql: &str) -> Result<Option<i64>, EngineError> {
        let sql = sql.to_string();
        self.call(move |connection, _| {
            let value: Option<Option<i64>> =
                connection.query_row(&sql, [], |row| row.get(0)).optional().map_err(classify)?;
            Ok(value.flatten())
        })
        .await
    }

    async fn view_target(&mut self, schema: &str, name: &str) -> Result<Option<String>, EngineError> {
        let (schema, name) = (schema.to_string(), name.to_string());
        self.call(move |connection, _| {
            let definition: Option<String> = connection
                .query_row(
                    "SELECT sql FROM duckdb_views() WHERE schema_name = ? AND view_name = ? AND NOT internal",
                    [&schema, &name],
                    |row| row.get(0),
                )
                .optional()
                .map_err(classify)?;
            Ok(definition.map(|definition| sql::parse_view_target(&definition).unwrap_or(definition)))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_are_transient_and_sql_errors_persistent() {
        let conflict =
            classify_message("TransactionContext Error: Catalog write-write conflict on create with \"x\"".to_string());
        assert!(conflict.is_transient());
        assert!(classify_message("Conflict on tuple deletion!".to_string()).is_transient());
        let missing = classify_message("Catalog Error: Table with name nothing does not exist!".to_string());
        assert!(!missing.is_transient());
    }

    #[test]
    fn locations_resolve_relative_to_the_project() {
        let root = Path::new("/project");
        assert_eq!(
            DuckDbLocation::resolve("db.duckdb", root),
            DuckDbLocation::File(PathBuf::from("/project/db.duckdb"))
        );
        assert_eq!(
            DuckDbLocation::resolve(":memory:", root),
            DuckDbLocation::InMemory { project_root: PathBuf::from("/project") }
        );
    }
}
