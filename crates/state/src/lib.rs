//! sluice's state store: snapshots, environments and their leases, recorded intervals, plans,
//! runs, task bookkeeping, circuit breakers and the audit log, behind small capability traits
//! with a SQLite implementation (embedded mode), a PostgreSQL one (distributed mode) and an
//! in-memory one (the deterministic protocol simulation).

mod codec;
mod error;
pub mod host;
mod memory;
mod postgres;
mod sqlite;
mod store;
mod types;

#[cfg(test)]
mod conformance;

use std::sync::Arc;

pub use error::StateError;
pub use memory::MemoryState;
pub use postgres::PostgresState;
pub use sqlite::SqliteState;
pub use store::{
    AuditLog, BreakerStore, DropStore, EnvironmentStore, IntervalStore, LeaseStore, PlanStore, RunStore, SnapshotStore,
    StateStore, TaskStore,
};
pub use types::{
    AuditEntry, EnvironmentLease, EnvironmentPromotion, EnvironmentRecord, FinishedTask, IntervalKey, IntervalRecord,
    PlanSummary, RunFinalization, RunId, RunOutcome, RunProgress, RunRecord, RunStart, RunStatus, TaskFailure,
    TaskOutlook,
};

/// Where embedded mode keeps its state, relative to the project folder.
pub const EMBEDDED_STATE_PATH: &str = ".sluice/state.db";

/// Opens the state store `url_or_path` names: a `postgres://` or `postgresql://` URL connects to
/// PostgreSQL; `sqlite://<path>`, `sqlite:<path>` or a plain path opens (creating) a SQLite file
/// (`sqlite:///abs/state.db` is absolute). Migrations run before it returns.
pub async fn open_state(url_or_path: &str) -> Result<Arc<dyn StateStore>, StateError> {
    if url_or_path.starts_with("postgres://") || url_or_path.starts_with("postgresql://") {
        return Ok(Arc::new(PostgresState::connect(url_or_path).await?));
    }
    let path =
        url_or_path.strip_prefix("sqlite://").or_else(|| url_or_path.strip_prefix("sqlite:")).unwrap_or(url_or_path);
    if path.is_empty() {
        return Err(StateError::Invalid { reason: "expected a state url or a sqlite file path, found nothing".into() });
    }
    Ok(Arc::new(SqliteState::open(path).await?))
}
