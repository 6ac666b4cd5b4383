//! Warehouse adapters: one trait, one implementation per engine (DuckDB first).

pub mod duckdb_adapter;
