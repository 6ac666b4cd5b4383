//! Test fixtures: a fresh PostgreSQL database or a DuckDB file per test, and the runners that clean them up.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_core::config::{Connection, Gateway, Secret};
use sluice_core::names::PhysicalTable;
use sluice_engine::Warehouse;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection as _};

pub const POSTGRES_HOST: &str = "127.0.0.1";
pub const POSTGRES_PORT: u16 = 5432;
pub const POSTGRES_USER: &str = "postgres";

/// How a test reaches its warehouse: a gateway and the project folder its paths are relative to.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub gateway: Gateway,
    pub project_root: PathBuf,
}

impl Fixture {
    /// A new warehouse through the public `connect`, as a worker would open it.
    pub async fn open(&self) -> Box<dyn Warehouse> {
        sluice_engine::connect(&self.gateway, &self.project_root).await.unwrap()
    }

    /// The PostgreSQL database name of this fixture, when it has one.
    pub fn postgres_database(&self) -> Option<&str> {
        match &self.gateway.connection {
            Connection::Postgres { database, .. } => Some(database),
            _ => None,
        }
    }
}

/// A physical table name in the sluice layout.
pub fn table(name: &str) -> PhysicalTable {
    PhysicalTable { schema: "sluice__shop".to_string(), table: format!("shop__{name}__v1") }
}

/// A name no other test (or earlier run) uses.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    format!("{:016x}", hasher.finish())
}

pub fn postgres_options(database: &str) -> PgConnectOptions {
    PgConnectOptions::new_without_pgpass()
        .host(POSTGRES_HOST)
        .port(POSTGRES_PORT)
        .username(POSTGRES_USER)
        .database(database)
}

/// A connection to `database` outside the adapter; panics (failing the test) when PostgreSQL is unreachable.
pub async fn postgres_admin(database: &str) -> PgConnection {
    PgConnection::connect_with(&postgres_options(database)).await.unwrap_or_else(|error| {
        panic!("PostgreSQL at {POSTGRES_HOST}:{POSTGRES_PORT} must be reachable for these tests: {error}")
    })
}

pub fn postgres_gateway(name: &str, port: u16, password: &str, database: &str) -> Gateway {
    Gateway {
        name: name.to_string(),
        connection: Connection::Postgres {
            host: POSTGRES_HOST.to_string(),
            port,
            user: POSTGRES_USER.to_string(),
            password: Secret::new(password),
            database: database.to_string(),
        },
        state_connection: None,
    }
}

/// Runs `case` against a fresh PostgreSQL database, then drops the database even when the case panicked.
pub async fn run_on_postgres<Case, Outcome>(case: Case)
where
    Case: FnOnce(Fixture) -> Outcome,
    Outcome: Future<Output = ()> + Send + 'static,
{
    let database = format!("sluice_engine_test_{}", unique_suffix());
    let mut admin = postgres_admin("postgres").await;
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{database}\""))).execute(&mut admin).await.unwrap();
    let fixture = Fixture {
        gateway: postgres_gateway("warehouse_pg", POSTGRES_PORT, "", &database),
        project_root: std::env::temp_dir(),
    };
    let outcome = tokio::spawn(case(fixture)).await;
    sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)")))
        .execute(&mut admin)
        .await
        .unwrap();
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

/// Runs `case` against a DuckDB file in a fresh temporary project folder.
#[cfg_attr(not(feature = "duckdb"), allow(dead_code))]
pub async fn run_on_duckdb<Case, Outcome>(case: Case)
where
    Case: FnOnce(Fixture) -> Outcome,
    Outcome: Future<Output = ()> + Send + 'static,
{
    let project = tempfile::tempdir().unwrap();
    let fixture = Fixture { gateway: duckdb_gateway("warehouse.duckdb"), project_root: project.path().to_path_buf() };
    let outcome = tokio::spawn(case(fixture)).await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

pub fn duckdb_gateway(database: &str) -> Gateway {
    Gateway {
        name: "warehouse_duckdb".to_string(),
        connection: Connection::DuckDb { database: database.to_string() },
        state_connection: None,
    }
}
