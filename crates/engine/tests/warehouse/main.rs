//! Integration tests of the warehouse adapters against the real DuckDB and the real local PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;
#[cfg(feature = "duckdb")]
mod duckdb_only;
mod postgres_only;
mod support;
