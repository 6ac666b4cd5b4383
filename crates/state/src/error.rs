//! `StateError`: every way a state-store call fails, and whether retrying can help.

use sluice_core::interval::Timestamp;
use sluice_core::names::{EnvironmentName, PhysicalTable, PlanId, SnapshotId};

use crate::types::{IntervalKey, RunId, RunStatus};

/// Every failure of the state store. Messages are lowercase and never contain a connection
/// URL or password. `is_transient` says whether the caller should retry with backoff.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The store could not be reached or opened. `target` is the address without credentials,
    /// `reason` the driver's message with any password removed.
    #[error("cannot open the state store at {target}: {reason}")]
    Connect { target: String, reason: String, transient: bool },

    /// A statement failed in the database or on the way to it.
    #[error("state store query failed: {0}")]
    Database(#[source] sqlx::Error),

    /// The schema migrations could not be applied.
    #[error("state store migration failed: {0}")]
    Migration(#[source] sqlx::migrate::MigrateError),

    /// Another run holds the environment's lease and it has not expired.
    #[error(
        "environment {environment} is being applied by run {holder_run} of plan {holder_plan} (its lease expires at {expires_at} utc)"
    )]
    LeaseHeld { environment: EnvironmentName, holder_plan: PlanId, holder_run: RunId, expires_at: Timestamp },

    /// The environment shows another plan than the caller expected: the plan is stale.
    #[error(
        "environment {environment} moved: expected it to show {}, but it shows {}",
        describe_plan(.expected.as_ref()),
        describe_plan(.actual.as_ref())
    )]
    StaleEnvironment { environment: EnvironmentName, expected: Option<PlanId>, actual: Option<PlanId> },

    /// Something the call refers to does not exist.
    #[error("{what} not found")]
    NotFound { what: String },

    /// A run with this id already exists.
    #[error("run {run} already exists")]
    RunExists { run: RunId },

    /// The run already finished with another status.
    #[error("run {run} already finished as {status}")]
    RunFinished { run: RunId, status: RunStatus },

    /// A snapshot cannot be deleted while an environment (or its rollback state) shows it.
    #[error("snapshot {snapshot} is still used by environment {environment}")]
    SnapshotInUse { snapshot: SnapshotId, environment: EnvironmentName },

    /// The janitor claimed a physical table (`schema.table`) the call would use or record an
    /// interval for, and is dropping it: retrying once the janitor is done can succeed.
    #[error("the janitor is dropping table {table} that this plan uses; apply again once it is done")]
    TableBeingDropped { table: String },

    /// `begin_run` would supersede a run whose promotion has begun; it ends promoted first.
    #[error("run {run} of environment {environment} is being promoted; apply again once it has finished")]
    RunPromoting { run: RunId, environment: EnvironmentName },

    /// A row changed hands too often while this call tried to read it; retry.
    #[error("{what} changed concurrently, retry")]
    Contention { what: String },

    /// The caller passed something the store cannot accept.
    #[error("invalid state store call: {reason}")]
    Invalid { reason: String },

    /// A stored value cannot be read back.
    #[error("stored {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
}

fn describe_plan(plan: Option<&PlanId>) -> String {
    match plan {
        Some(plan) => format!("plan {plan}"),
        None => "no plan".to_string(),
    }
}

impl StateError {
    /// True when the failure is temporary (connection lost or refused, pool timeout,
    /// serialization failure, deadlock, server shutdown, SQLite busy or locked): retrying the
    /// same call with backoff can succeed. Everything else needs a different call or a human.
    pub fn is_transient(&self) -> bool {
        match self {
            StateError::Connect { transient, .. } => *transient,
            StateError::Contention { .. } => true,
            StateError::TableBeingDropped { .. } => true,
            StateError::RunPromoting { .. } => true,
            StateError::Database(error) => is_transient_sqlx(error),
            StateError::Migration(sqlx::migrate::MigrateError::Execute(error))
            | StateError::Migration(sqlx::migrate::MigrateError::ExecuteMigration(error, _)) => {
                is_transient_sqlx(error)
            }
            _ => false,
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> StateError {
        StateError::NotFound { what: what.into() }
    }

    /// `TableBeingDropped` for the first key (in key order) among `claimed`, if any: the
    /// keys a call would use that have a tombstone.
    pub(crate) fn table_being_dropped<'a>(claimed: impl IntoIterator<Item = &'a IntervalKey>) -> Option<StateError> {
        let (name, version) = claimed.into_iter().min()?;
        Some(StateError::TableBeingDropped { table: PhysicalTable::of(name, version).to_string() })
    }

    pub(crate) fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> StateError {
        StateError::Corrupt { what: what.into(), reason: reason.into() }
    }
}

impl From<sqlx::Error> for StateError {
    fn from(error: sqlx::Error) -> StateError {
        StateError::Database(error)
    }
}

impl From<sqlx::migrate::MigrateError> for StateError {
    fn from(error: sqlx::migrate::MigrateError) -> StateError {
        StateError::Migration(error)
    }
}

/// PostgreSQL SQLSTATEs worth a retry: serialization failure, deadlock, lock timeout, too many
/// connections, server shutting down or starting up, and the whole connection-exception class.
fn is_transient_postgres_code(code: &str) -> bool {
    matches!(code, "40001" | "40P01" | "55P03" | "53300" | "57P01" | "57P02" | "57P03") || code.starts_with("08")
}

/// SQLite primary result codes worth a retry: `SQLITE_BUSY` (5) and `SQLITE_LOCKED` (6).
fn is_transient_sqlite_code(extended_code: i32) -> bool {
    matches!(extended_code & 0xff, 5 | 6)
}

pub(crate) fn is_transient_sqlx(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(database_error) => {
            if let Some(postgres) = database_error.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                return is_transient_postgres_code(postgres.code());
            }
            if database_error.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                let code = database_error.code().and_then(|code| code.parse::<i32>().ok());
                return code.is_some_and(is_transient_sqlite_code);
            }
            false
        }
        _ => false,
    }
}

/// Whether the error is a unique or primary-key violation.
pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database_error) if database_error.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

/// Whether the error is a foreign-key violation.
pub(crate) fn is_foreign_key_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database_error) if database_error.kind() == sqlx::error::ErrorKind::ForeignKeyViolation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_codes_are_classified() {
        assert!(is_transient_postgres_code("40001"));
        assert!(is_transient_postgres_code("40P01"));
        assert!(is_transient_postgres_code("57P01"));
        assert!(is_transient_postgres_code("08006"));
        assert!(!is_transient_postgres_code("42P01"));
        assert!(!is_transient_postgres_code("23505"));
        assert!(is_transient_sqlite_code(5));
        assert!(is_transient_sqlite_code(517));
        assert!(is_transient_sqlite_code(6));
        assert!(!is_transient_sqlite_code(19));
        assert!(is_transient_sqlx(&sqlx::Error::PoolTimedOut));
        assert!(!is_transient_sqlx(&sqlx::Error::RowNotFound));
    }

    #[test]
    fn stale_environment_names_both_plans() {
        let error = StateError::StaleEnvironment {
            environment: EnvironmentName::prod(),
            expected: Some(PlanId("p1".to_string())),
            actual: None,
        };
        assert_eq!(error.to_string(), "environment prod moved: expected it to show plan p1, but it shows no plan");
        assert!(!error.is_transient());
    }

    #[test]
    fn table_being_dropped_names_the_first_table_and_is_transient() {
        let key = |name: &str, version: &str| {
            (sluice_core::names::ModelName::parse(name).unwrap(), sluice_core::names::Version(version.to_string()))
        };
        let keys = [key("sushi.orders", "bbbb"), key("sushi.items", "cccc"), key("sushi.orders", "aaaa")];
        let error = StateError::table_being_dropped(&keys).unwrap();
        assert_eq!(
            error.to_string(),
            "the janitor is dropping table sluice__sushi.sushi__items__cccc that this plan uses; apply again once it is done"
        );
        assert!(error.is_transient());
        assert!(StateError::table_being_dropped(&[]).is_none());
    }
}
