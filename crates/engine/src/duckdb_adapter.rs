//! The embedded DuckDB warehouse: one file per gateway, opened once per worker.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("could not open duckdb database {path}: {source}")]
    Open { path: String, source: duckdb::Error },
    #[error("duckdb statement failed: {0}")]
    Statement(#[from] duckdb::Error),
}

/// A DuckDB connection held for the life of a worker.
pub struct DuckDbWarehouse {
    connection: duckdb::Connection,
}

impl DuckDbWarehouse {
    /// Opens (creating if needed) the database file at `path`; `:memory:` opens an in-memory one.
    pub fn open(path: &str) -> Result<Self, EngineError> {
        let connection =
            if path == ":memory:" { duckdb::Connection::open_in_memory() } else { duckdb::Connection::open(path) }
                .map_err(|source| EngineError::Open { path: path.to_string(), source })?;
        Ok(Self { connection })
    }

    /// Runs one query that returns a single integer, e.g. a row count.
    pub fn query_i64(&self, sql: &str) -> Result<i64, EngineError> {
        Ok(self.connection.query_row(sql, [], |row| row.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_a_file_database_and_answers_a_query() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.duckdb");
        let warehouse = DuckDbWarehouse::open(path.to_str().unwrap()).unwrap();
        assert_eq!(warehouse.query_i64("SELECT 40 + 2").unwrap(), 42);
        assert!(path.exists());
    }
}
