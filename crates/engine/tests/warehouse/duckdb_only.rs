//! DuckDB-only behaviour: one shared database per file (or in-memory project) per process; conflicts are transient.

use crate::support::duckdb_gateway;

const ITEMS: &str = "CREATE TABLE items (id INT, v INT); INSERT INTO items VALUES (1, 0), (2, 0), (3, 0)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warehouses_on_one_file_share_one_database() {
    let project = tempfile::tempdir().unwrap();
    let mut first = sluice_engine::connect(&duckdb_gateway("data/warehouse.duckdb"), project.path()).await.unwrap();
    let mut second =
        sluice_engine::connect(&duckdb_gateway("./data/../data/warehouse.duckdb"), project.path()).await.unwrap();
    first.execute(ITEMS).await.unwrap();
    assert_eq!(second.query_i64("SELECT COUNT(*) FROM items").await.unwrap(), Some(3));
    assert!(project.path().join("data/warehouse.duckdb").exists());

    // Once every warehouse is gone the file is closed; opening it again finds the data.
    drop(first);
    drop(second);
    let mut reopened = sluice_engine::connect(&duckdb_gateway("data/warehouse.duckdb"), project.path()).await.unwrap();
    assert_eq!(reopened.query_i64("SELECT COUNT(*) FROM items").await.unwrap(), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_databases_are_shared_within_one_project() {
    let (project, other_project) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut first = sluice_engine::connect(&duckdb_gateway(":memory:"), project.path()).await.unwrap();
    let mut second = sluice_engine::connect(&duckdb_gateway(":memory:"), project.path()).await.unwrap();
    let mut elsewhere = sluice_engine::connect(&duckdb_gateway(":memory:"), other_project.path()).await.unwrap();
    first.execute(ITEMS).await.unwrap();
    assert_eq!(second.query_i64("SELECT COUNT(*) FROM items").await.unwrap(), Some(3));
    assert!(!elsewhere.query_i64("SELECT COUNT(*) FROM items").await.unwrap_err().is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_write_conflict_is_transient() {
    let project = tempfile::tempdir().unwrap();
    let gateway = duckdb_gateway("warehouse.duckdb");
    let mut first = sluice_engine::connect(&gateway, project.path()).await.unwrap();
    let mut second = sluice_engine::connect(&gateway, project.path()).await.unwrap();
    first.execute(ITEMS).await.unwrap();

    first.execute("BEGIN TRANSACTION; UPDATE items SET v = 1 WHERE id = 1").await.unwrap();
    let error = second.execute("UPDATE items SET v = 2 WHERE id = 1").await.unwrap_err();
    assert!(error.is_transient(), "a write-write conflict is transient: {error:?}");
    first.execute("COMMIT").await.unwrap();

    // The losing connection is usable again, and a retry succeeds.
    second.execute("UPDATE items SET v = 2 WHERE id = 1").await.unwrap();
    assert_eq!(first.query_i64("SELECT v FROM items WHERE id = 1").await.unwrap(), Some(2));
}
