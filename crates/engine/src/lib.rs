//! Warehouse adapters behind one trait, `Warehouse`: embedded DuckDB and PostgreSQL (MySQL/MariaDB not yet).

use std::path::Path;

use async_trait::async_trait;
use sluice_core::config::{Connection, Gateway};
use sluice_core::interval::Interval;
use sluice_core::model::SeedData;
use sluice_core::names::PhysicalTable;

#[cfg(feature = "duckdb")]
pub mod duckdb_adapter;
mod error;
mod factory;
pub mod postgres_adapter;
mod scd;
mod sql;

pub use error::EngineError;
pub use factory::WarehouseFactory;
pub use scd::{scd_type_2_columns, scd_type_2_query, scd_type_2_shape};

/// The two statements an interval write amounts to, without sluice's lock or transaction:
/// delete the interval's rows, then insert the query's rows of the interval. The benchmark's
/// raw floor runs exactly these, back to back on one connection.
pub fn interval_statements(
    table: &PhysicalTable,
    time_column: TimeColumn<'_>,
    interval: Interval,
    query: &str,
) -> [String; 2] {
    [sql::delete_interval(table, time_column, interval), sql::insert_interval(table, time_column, interval, query)]
}

/// How an incremental model's time column is compared with an interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeColumn<'a> {
    /// A DATE or TIMESTAMP column, or text holding `YYYY-MM-DD` dates: `>= start AND < end`.
    Native(&'a str),
    /// Text or numbers written in a strftime format (`time_column (col, '%Y%m%d')`): between the
    /// interval's start and its last microsecond, both written in the format, as SQLMesh
    /// compares them.
    Formatted { column: &'a str, format: &'a str, numeric: bool },
}

impl<'a> TimeColumn<'a> {
    pub fn name(&self) -> &'a str {
        match self {
            TimeColumn::Native(column) | TimeColumn::Formatted { column, .. } => column,
        }
    }

    /// The comparison for a column whose engine type is `data_type` (as the information
    /// schema names it), written in `format`: a DATE or TIMESTAMP column ignores the format.
    pub fn for_type(column: &'a str, format: &'a str, data_type: &str) -> TimeColumn<'a> {
        let data_type = data_type.to_ascii_lowercase();
        let text = ["char", "text", "string"].iter().any(|name| data_type.contains(name));
        let numeric =
            ["int", "numeric", "decimal", "double", "real", "float"].iter().any(|name| data_type.contains(name));
        if text || numeric { TimeColumn::Formatted { column, format, numeric } } else { TimeColumn::Native(column) }
    }
}

/// A blocking audit, run inside a write's transaction after the write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditCheck {
    /// The audit as the model calls it, for the error.
    pub audit: String,
    /// One statement returning one integer: the rows that break the audit ([`audit_count_query`]).
    pub count_query: String,
}

impl AuditCheck {
    /// The error for the count the check's query returned: none when no row breaks the audit.
    pub fn failure(&self, count: Option<i64>) -> Option<EngineError> {
        let rows = count.unwrap_or(0);
        (rows > 0).then(|| EngineError::AuditFailed { audit: self.audit.clone(), rows })
    }
}

/// `statements` as one script in one transaction (`execute` rolls it back when one fails).
pub fn transaction_script(statements: &[String]) -> String {
    let mut script = String::from("BEGIN;\n");
    for statement in statements {
        script.push_str(statement);
        script.push_str(";\n");
    }
    script.push_str("COMMIT");
    script
}

/// The statement counting the rows that break an audit of `table`'s model. The audit reads the
/// model as `sluice_this_model` (`sluice_core::snapshot::THIS_MODEL`): here the rows the write
/// covers, that is the interval's rows when `time_column` is given, else the whole table.
pub fn audit_count_query(
    table: &PhysicalTable,
    time_column: Option<TimeColumn<'_>>,
    interval: Interval,
    audit: &str,
) -> String {
    let filter = time_column.map(|column| format!(" WHERE {}", sql::interval_filter(column, interval)));
    format!(
        "WITH {} AS (SELECT * FROM {}{}) SELECT COUNT(*) FROM ({}) AS \"sluice_audit\"",
        sql::quote_identifier(sluice_core::snapshot::THIS_MODEL),
        sql::physical_name(table),
        filter.unwrap_or_default(),
        sql::query_body(audit)
    )
}

/// Cancels the statement a warehouse connection is running, from another task (an aborted
/// run's query in flight). Cancelling an idle connection does nothing.
#[async_trait]
pub trait Canceller: Send + Sync {
    async fn cancel(&self);
}

/// One warehouse connection, held by one worker (or the promoter) for a whole run.
///
/// Implemented for DuckDB (`duckdb_adapter::DuckDbWarehouse`, embedded, one shared database per file per process)
/// and PostgreSQL (`postgres_adapter::PostgresWarehouse`, one `PgConnection`). Every identifier the adapter puts
/// into SQL is double-quoted; queries are run as given. Each data write is one transaction, so a retried task
/// replaces exactly what it wrote before.
#[async_trait]
pub trait Warehouse: Send {
    /// `duckdb` or `postgres`.
    fn engine_name(&self) -> &'static str;

    /// Checks the connection answers (reconnecting first if it was lost).
    async fn ping(&mut self) -> Result<(), EngineError>;

    /// A handle that cancels what this connection runs, usable while a call is in flight.
    fn canceller(&self) -> std::sync::Arc<dyn Canceller>;

    /// Runs statements as given (a model's pre/post statements).
    async fn execute(&mut self, sql: &str) -> Result<(), EngineError>;

    /// Creates the physical table's schema and the table if it does not exist: from the model's
    /// declared `columns` when it has some, else from the query's shape (`CREATE TABLE IF NOT
    /// EXISTS t AS SELECT * FROM (query) AS q WHERE 1 = 0`). Idempotent and safe when two
    /// workers race.
    async fn ensure_table(
        &mut self,
        table: &PhysicalTable,
        columns: &[(String, String)],
        query: &str,
    ) -> Result<(), EngineError>;

    /// One transaction: delete rows whose `time_column` lies in `[start, end)`, insert the query's rows that lie in
    /// `[start, end)`, then run `checks`. Returns the rows inserted. (Every data write runs its checks the same way:
    /// inside the transaction, after the write; the first that counts a row rolls everything back and is the error,
    /// `EngineError::AuditFailed`.)
    async fn replace_interval(
        &mut self,
        table: &PhysicalTable,
        time_column: TimeColumn<'_>,
        interval: Interval,
        query: &str,
        checks: &[AuditCheck],
    ) -> Result<u64, EngineError>;

    /// One transaction: delete every row, insert the query's rows, run `checks`. Returns the rows inserted.
    async fn replace_all(
        &mut self,
        table: &PhysicalTable,
        query: &str,
        checks: &[AuditCheck],
    ) -> Result<u64, EngineError>;

    /// One transaction: replace every row with the query's rows, the query reading the table as it was before
    /// (an SCD_TYPE_2 table is rebuilt from its own rows), then run `checks`. Returns the rows the table holds.
    async fn rebuild(&mut self, table: &PhysicalTable, query: &str, checks: &[AuditCheck]) -> Result<u64, EngineError>;

    /// The table's columns, in order: each name and its type as the engine's information schema
    /// names it.
    async fn table_columns(&mut self, table: &PhysicalTable) -> Result<Vec<(String, String)>, EngineError>;

    /// One transaction: insert the query's rows after those the table holds, run `checks`. Returns the rows
    /// inserted.
    async fn append(&mut self, table: &PhysicalTable, query: &str, checks: &[AuditCheck]) -> Result<u64, EngineError>;

    /// One transaction: delete rows whose unique key appears in the query's rows (SQL `=`: a NULL key matches
    /// nothing, as in `MERGE`), insert the query's rows, run `checks`. Returns the rows inserted.
    async fn upsert(
        &mut self,
        table: &PhysicalTable,
        unique_key: &[String],
        query: &str,
        checks: &[AuditCheck],
    ) -> Result<u64, EngineError>;

    /// Creates (schema and) the table from the declared columns (or TEXT columns named after the CSV header when
    /// none are declared) if absent, and replaces its rows with the CSV rows cast to the declared types, in one
    /// transaction. An empty CSV field is NULL. Returns the rows loaded.
    async fn load_seed(
        &mut self,
        table: &PhysicalTable,
        columns: &[(String, String)],
        seed: &SeedData,
    ) -> Result<u64, EngineError>;

    /// The physical object of a VIEW model: `CREATE OR REPLACE VIEW` at the physical name (and its schema).
    async fn create_physical_view(&mut self, view: &PhysicalTable, query: &str) -> Result<(), EngineError>;

    /// Environment views, all in one transaction: creates each view schema if absent, then for each update drops
    /// the view if it exists and, when `target` is `Some`, creates `schema.name` as `SELECT * FROM target`. Any
    /// failure rolls everything back: the views stay exactly as they were.
    async fn promote(&mut self, updates: &[ViewUpdate]) -> Result<(), EngineError>;

    /// One gateway's share of an environment's promotion, in one transaction: applies
    /// `promotion.updates` (as `promote`) only if the gateway's promotion marker for the
    /// environment (table `sluice__meta.promotions`, kept in the same transaction) shows
    /// `expected_plan` or nothing, and moves the marker to `plan`. A marker already showing `plan`
    /// changes nothing (a promotion rolled forward again); one showing another plan is `Stale`
    /// and changes nothing either, so a late promoter can never put back older views.
    async fn promote_environment(&mut self, promotion: &GatewayPromotion) -> Result<PromotionOutcome, EngineError>;

    /// The plan the gateway's promotion marker shows for `environment` (`None` before any
    /// promotion): where a promotion across gateways stands, for `sluice status`.
    async fn shown_plan(&mut self, environment: &str) -> Result<Option<String>, EngineError>;

    /// Drops the table, or the view of that name (VIEW models); nothing when neither exists.
    async fn drop_table(&mut self, table: &PhysicalTable) -> Result<(), EngineError>;

    /// Row count and an order-independent checksum of a table or view, for comparing runs on one engine.
    async fn checksum(&mut self, schema: &str, name: &str) -> Result<TableChecksum, EngineError>;

    /// The first column of the first row as an integer; `None` for no row or NULL.
    async fn query_i64(&mut self, sql: &str) -> Result<Option<i64>, EngineError>;

    /// Which relation the view `schema.name` selects from, as `schema.table` (`None` when the view does not
    /// exist). Used by tests and the promoter's checks.
    async fn view_target(&mut self, schema: &str, name: &str) -> Result<Option<String>, EngineError>;
}

/// One environment view to point at a physical table (`Some`) or to remove (`None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewUpdate {
    pub schema: String,
    pub name: String,
    pub target: Option<PhysicalTable>,
}

/// One gateway's share of an environment's promotion (see [`Warehouse::promote_environment`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayPromotion {
    pub environment: String,
    /// The plan the gateway's views must show now; `None` when none was promoted before.
    pub expected_plan: Option<String>,
    /// The plan they show after; `None` when the environment leaves the gateway (janitor).
    pub plan: Option<String>,
    pub updates: Vec<ViewUpdate>,
}

/// What a gateway's promotion did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromotionOutcome {
    Applied,
    /// The gateway showed the plan already: nothing changed.
    AlreadyShown,
    /// The gateway shows another plan than expected: nothing changed.
    Stale {
        shown: Option<String>,
    },
}

impl PromotionOutcome {
    /// Decides from the marker the gateway shows.
    pub fn decide(shown: Option<&str>, promotion: &GatewayPromotion) -> PromotionOutcome {
        match shown {
            None => PromotionOutcome::Applied,
            Some(shown) if Some(shown) == promotion.plan.as_deref() => PromotionOutcome::AlreadyShown,
            Some(shown) if Some(shown) == promotion.expected_plan.as_deref() => PromotionOutcome::Applied,
            Some(shown) => PromotionOutcome::Stale { shown: Some(shown.to_string()) },
        }
    }
}

/// Where each gateway keeps which plan each environment's views show.
pub const PROMOTION_MARKER_SCHEMA: &str = "sluice__meta";
pub const PROMOTION_MARKER_TABLE: &str = "promotions";

/// A table's row count and an order-independent checksum of its rows (comparable on one engine only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableChecksum {
    pub rows: i64,
    pub checksum: String,
}

/// Opens the gateway's warehouse. A DuckDB path is relative to `project_root` (or `:memory:`). Errors name the
/// gateway and never contain its password.
pub async fn connect(gateway: &Gateway, project_root: &Path) -> Result<Box<dyn Warehouse>, EngineError> {
    match &gateway.connection {
        Connection::DuckDb { database } => connect_duckdb(gateway, database, project_root).await,
        Connection::Postgres { host, port, user, password, database } => {
            let settings = postgres_adapter::PostgresSettings {
                host: host.clone(),
                port: *port,
                user: user.clone(),
                password: password.clone(),
                database: database.clone(),
            };
            let warehouse = postgres_adapter::PostgresWarehouse::connect(&gateway.name, settings).await?;
            Ok(Box::new(warehouse))
        }
        Connection::MySql { .. } => Err(EngineError::Unsupported {
            gateway: gateway.name.clone(),
            what: "mysql/mariadb warehouses are not supported yet".to_string(),
        }),
    }
}

#[cfg(feature = "duckdb")]
async fn connect_duckdb(
    gateway: &Gateway,
    database: &str,
    project_root: &Path,
) -> Result<Box<dyn Warehouse>, EngineError> {
    let location = duckdb_adapter::DuckDbLocation::resolve(database, project_root);
    let warehouse =
        duckdb_adapter::DuckDbWarehouse::open(location).await.map_err(|error| error.for_gateway(&gateway.name))?;
    Ok(Box::new(warehouse))
}

#[cfg(not(feature = "duckdb"))]
async fn connect_duckdb(
    gateway: &Gateway,
    _database: &str,
    _project_root: &Path,
) -> Result<Box<dyn Warehouse>, EngineError> {
    Err(EngineError::Unsupported {
        gateway: gateway.name.clone(),
        what: "this sluice was built without DuckDB (cargo feature `duckdb`)".to_string(),
    })
}
