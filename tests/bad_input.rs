//! Bad input, one test each: a clear error that names the file, line or field, and no change to
//! the state store or the warehouse. Run against a PostgreSQL gateway and PostgreSQL state (a
//! fresh database of each per test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use sqlx::Connection;
use support::{Backend, Run, Sandbox};

/// Rows in the state store's tables (0 when they were never created), and sluice's schemas in
/// the warehouse: what any accepted command would have changed.
async fn footprint(sandbox: &Sandbox) -> (i64, i64) {
    let mut state = sqlx::PgConnection::connect(&sandbox.state_url()).await.unwrap();
    let mut rows = 0;
    for table in ["sluice_plans", "sluice_runs", "sluice_snapshots", "sluice_environments", "sluice_intervals"] {
        let exists: bool =
            sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL").bind(table).fetch_one(&mut state).await.unwrap();
        if exists {
            let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&mut state)
                .await
                .unwrap();
            rows += count;
        }
    }
    let mut warehouse = sqlx::PgConnection::connect(&sandbox.warehouse_url()).await.unwrap();
    let schemas: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name LIKE 'sluice__%' OR schema_name LIKE 'sushi%'",
    )
    .fetch_one(&mut warehouse)
    .await
    .unwrap();
    (rows, schemas)
}

/// Runs `args`, expects exit 1 with every `expected` text in stderr, and no footprint at all.
async fn refused(sandbox: &Sandbox, args: &[&str], expected: &[&str]) -> Run {
    let run = sandbox.sluice(args);
    assert_eq!(run.code, Some(1), "{args:?} was not refused: {run:?}");
    for text in expected {
        assert!(run.stderr.contains(text), "{args:?}: expected {text:?} in:\n{}", run.stderr);
    }
    assert_eq!(footprint(sandbox).await, (0, 0), "{args:?} changed state or warehouse");
    run
}

const NOW: &str = "2024-01-03";

#[tokio::test]
async fn a_malformed_model_file_is_located() {
    let sandbox = Sandbox::new(Backend::Postgres).await;
    sandbox
        .write("models/broken.sql", "MODEL (\n  name sushi.broken,\n  kind INCREMENTAL_BY_TIME_RANGE (\n);\nSELECT 1");
    refused(&sandbox, &["plan", "--auto-apply", "--now", NOW], &["models/broken.sql:"]).await;
}

#[tokio::test]
async fn a_dependency_cycle_is_named() {
    let sandbox = Sandbox::new(Backend::Postgres).await;
    sandbox.write("models/cycle_a.sql", "MODEL (name sushi.cycle_a, kind FULL);\nSELECT x FROM sushi.cycle_b");
    sandbox.write("models/cycle_b.sql", "MODEL (name sushi.cycle_b, kind FULL);\nSELECT x FROM sushi.cycle_a");
    refused(&sandbox, &["plan", "--auto-apply", "--now", NOW], &["cycle", "sushi.cycle_a", "sushi.cycle_b"]).await;
}

#[tokio::test]
async fn an_unknown_gateway_is_located() {
    let sandbox = Sandbox::new(Backend::Postgres).await;
    sandbox.write("models/elsewhere.sql", "MODEL (name sushi.elsewhere, kind FULL, gateway nowhere);\nSELECT 1 AS x");
    refused(
        &sandbox,
        &["plan", "--auto-apply", "--now", NOW],
        &["models/elsewhere.sql:1:", "unknown gateway \"nowhere\""],
    )
    .await;
}

#[tokio::test]
async fn a_model_name_carrying_sql_is_refused() {
    let sandbox = Sandbox::new(Backend::Postgres).await;
    for (index, name) in [
        "sushi.x'; DROP TABLE sushi.orders; --",
        "sushi.\"x\"\"; DROP TABLE sushi.orders; --\"",
        "sushi.x/*",
        "sushi.x;",
    ]
    .iter()
    .enumerate()
    {
        let file = format!("models/injected_{index}.sql");
        sandbox.write(&file, &format!("MODEL (name {name}, kind FULL);\nSELECT 1 AS x"));
        refused(&sandbox, &["plan", "--auto-apply", "--now", NOW], &[&format!("{file}:")]).await;
        std::fs::remove_file(sandbox.project.join(&file)).unwrap();
    }
}

#[tokio::test]
async fn an_environment_name_carrying_sql_is_refused() {
    let sandbox = Sandbox::new(Backend::Postgres).await;
    for name in ["dev'; DROP TABLE x; --", "dev\"", "dev/*", "dev;"] {
        refused(&sandbox, &["plan", name, "--auto-apply", "--now", NOW], &["expected an environment name"]).await;
    }
}

#[tokio::test]
async fn a_plan_id_that_does_not_exist_is_refused() {
    let sandbox = Sandbox::new(Backend::Postgres).await;
    let run = sandbox.sluice(&["apply", "no-such-plan"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("no plan no-such-plan in the state store"), "{}", run.stderr);
    // Opening the state store may create its tables, but nothing is recorded.
    assert_eq!(footprint(&sandbox).await, (0, 0));
}

#[tokio::test]
async fn a_state_store_that_refuses_the_connection_hides_its_password() {
    let sandbox = Sandbox::new(Backend::Postgres).await;
    let url = "postgres://postgres:Stat3Secret@127.0.0.1:1/sluice";
    let run = refused(&sandbox, &["--state", url, "plan", "--auto-apply", "--now", NOW], &["127.0.0.1:1"]).await;
    assert!(!run.stderr.contains("Stat3Secret") && !run.stdout.contains("Stat3Secret"), "{run:?}");
}

#[tokio::test]
async fn a_gateway_that_refuses_the_connection_hides_its_password() {
    let sandbox = Sandbox::new(Backend::Postgres).await;
    let config = sandbox.read("config.yaml");
    let broken = config.replacen(
        "      port: 5432\n      user: postgres\n",
        "      port: 1\n      user: postgres\n      password: G4tewaySecret\n",
        1,
    );
    assert_ne!(broken, config);
    sandbox.write("config.yaml", &broken);
    let plan = sandbox.sluice(&["plan", "--now", NOW]);
    assert_eq!(plan.code, Some(0), "{plan:?}");
    let run = sandbox.sluice(&["apply", &plan.plan_id()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("gateway local does not answer"), "{}", run.stderr);
    assert!(!run.stderr.contains("G4tewaySecret") && !run.stdout.contains("G4tewaySecret"), "{run:?}");
    // The plan is stored (`sluice plan` did that); the refused apply recorded no run and made no table.
    assert_eq!(runs(&sandbox).await, 0);
}

/// Runs recorded in the state store (none when its tables were never created).
async fn runs(sandbox: &Sandbox) -> i64 {
    let mut state = sqlx::PgConnection::connect(&sandbox.state_url()).await.unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('sluice_runs') IS NOT NULL").fetch_one(&mut state).await.unwrap();
    if !exists {
        return 0;
    }
    sqlx::query_scalar("SELECT COUNT(*) FROM sluice_runs").fetch_one(&mut state).await.unwrap()
}

/// A distributed `plan --auto-apply` on these services: refused, showing `shown` (the URL with
/// its password hidden) and never `secret`, and no run started.
async fn refused_by_a_service(amqp_url: &str, redis_url: &str, prefix: &str, shown: &str, secret: &str) {
    let sandbox = Sandbox::new(Backend::Postgres).await;
    let output = sandbox
        .command(&["--amqp-url", amqp_url, "--redis-url", redis_url, "--queue-prefix", prefix])
        .args(["plan", "--auto-apply", "--now", NOW])
        .output()
        .unwrap();
    let run = Run::from(output);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains(shown), "{}", run.stderr);
    assert!(!run.stderr.contains(secret) && !run.stdout.contains(secret), "{run:?}");
    assert_eq!(runs(&sandbox).await, 0);
}

#[tokio::test]
async fn a_wrong_broker_password_is_refused_without_showing_it() {
    let amqp = "amqp://guest:Br0kerSecret@127.0.0.1:5672/%2f";
    refused_by_a_service(
        amqp,
        "redis://127.0.0.1:6379",
        "sluice_bad_input",
        "amqp://guest:***@127.0.0.1:5672",
        "Br0kerSecret",
    )
    .await;
}

#[tokio::test]
async fn a_wrong_redis_password_is_refused_without_showing_it() {
    let amqp = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let prefix = "sluice_bad_input_redis";
    refused_by_a_service(
        amqp,
        "redis://:R3disSecret@127.0.0.1:6379",
        prefix,
        "redis://:***@127.0.0.1:6379",
        "R3disSecret",
    )
    .await;
    // The broker accepted the connection first and declared the topology: remove it.
    let mut config = sluice_queue::rabbitmq::RabbitConfig::new(amqp);
    config.prefix = prefix.to_string();
    let broker = sluice_queue::rabbitmq::RabbitBroker::connect(config).await.unwrap();
    broker.delete_topology(&[]).await.unwrap();
    broker.close().await;
}
