//! PostgreSQL-only behaviour: a terminated backend is transient and reconnects, connect errors hide the password.

use sluice_core::config::{Connection, Gateway, Secret};
use sluice_engine::EngineError;

use crate::support::{POSTGRES_PORT, postgres_admin, postgres_gateway, run_on_postgres};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_fails_transient_then_reconnects() {
    run_on_postgres(|fixture| async move {
        let mut warehouse = fixture.open().await;
        let backend = warehouse.query_i64("SELECT pg_backend_pid()").await.unwrap().unwrap();

        let mut admin = postgres_admin(fixture.postgres_database().unwrap()).await;
        // With a timeout, pg_terminate_backend waits until the backend has really exited (or returns false).
        let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend(CAST($1 AS INT), 10000)")
            .bind(backend)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert!(terminated, "backend {backend} did not exit");

        let error = warehouse.query_i64("SELECT 1").await.unwrap_err();
        assert!(error.is_transient(), "a terminated connection is transient: {error:?}");

        // The next call opens a new connection.
        warehouse.ping().await.unwrap();
        let new_backend = warehouse.query_i64("SELECT pg_backend_pid()").await.unwrap().unwrap();
        assert_ne!(new_backend, backend);
    })
    .await;
}

#[tokio::test]
async fn a_refused_connection_names_the_gateway_and_hides_the_password() {
    let gateway = postgres_gateway("analytics_pg", 1, "s3cr3tpw", "postgres");
    let error = sluice_engine::connect(&gateway, &std::env::temp_dir()).await.map(|_| ()).unwrap_err();
    assert!(error.is_transient(), "a refused connection is transient: {error:?}");
    let (text, debug) = (error.to_string(), format!("{error:?}"));
    assert!(text.contains("analytics_pg"), "{text}");
    assert!(!text.contains("s3cr3tpw") && !debug.contains("s3cr3tpw"), "{text} / {debug}");
    assert!(!text.contains("postgres://"), "{text}");
}

#[tokio::test]
async fn a_missing_database_is_persistent_and_names_the_gateway() {
    // Touch the server first, so this test fails (rather than passing for the wrong reason) when it is down.
    drop(postgres_admin("postgres").await);
    let gateway = postgres_gateway("analytics_pg", POSTGRES_PORT, "s3cr3tpw", "sluice_engine_test_does_not_exist");
    let error = sluice_engine::connect(&gateway, &std::env::temp_dir()).await.map(|_| ()).unwrap_err();
    assert!(!error.is_transient(), "{error:?}");
    assert_eq!(error.sql_state(), Some("3D000"), "{error:?}");
    assert!(error.to_string().contains("analytics_pg"), "{error}");
    assert!(!format!("{error:?}").contains("s3cr3tpw"));
}

#[tokio::test]
async fn mysql_gateways_are_not_supported_yet() {
    let gateway = Gateway {
        name: "legacy".to_string(),
        connection: Connection::MySql {
            host: "127.0.0.1".to_string(),
            port: 3306,
            user: "root".to_string(),
            password: Secret::new("s3cr3tpw"),
            database: "test".to_string(),
        },
        state_connection: None,
    };
    let error = sluice_engine::connect(&gateway, &std::env::temp_dir()).await.map(|_| ()).unwrap_err();
    assert!(matches!(error, EngineError::Unsupported { .. }), "{error:?}");
    assert!(!error.is_transient());
    assert!(error.to_string().contains("legacy") && error.to_string().contains("not supported yet"), "{error}");
}

#[cfg(not(feature = "duckdb"))]
#[tokio::test]
async fn duckdb_gateways_need_the_duckdb_feature() {
    let gateway = crate::support::duckdb_gateway("warehouse.duckdb");
    let error = sluice_engine::connect(&gateway, &std::env::temp_dir()).await.map(|_| ()).unwrap_err();
    assert!(matches!(error, EngineError::Unsupported { .. }), "{error:?}");
}
