//! The three roles in one process through their real `run`/`apply` functions: coordinator,
//! workers and promoter over the in-process queue, SQLite state and a PostgreSQL warehouse on
//! the local server (a fresh database per test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use sluice_state::host::SystemClock;

use async_trait::async_trait;
use sluice_coordinator::{ApplyConfig, ApplyOutcome, CoordinatorDeps, GatewayCheck, Progress, ProgressTotals};
use sluice_core::config::{Connection, Gateway, Secret};
use sluice_core::interval::Timestamp;
use sluice_core::names::{EnvironmentName, RunId};
use sluice_core::plan::{Plan, PlanContext, build_plan};
use sluice_core::project::{ProjectFiles, load_project};
use sluice_engine::{EngineError, Warehouse, WarehouseFactory};
use sluice_promoter::PromoterDeps;
use sluice_promoter::notify::StandardNotifier;
use sluice_queue::memory::{MemoryEvents, MemoryGate, MemoryQueue};
use sluice_state::{RunStatus, StateStore};
use sluice_worker::retry::RetryPolicy;
use sluice_worker::{WorkerConfig, WorkerDeps};
use sqlx::Connection as _;
use tokio_util::sync::CancellationToken;

struct Warehouses(Gateway);

#[async_trait]
impl WarehouseFactory for Warehouses {
    async fn connect(&self, _gateway: &str) -> Result<Box<dyn Warehouse>, EngineError> {
        sluice_engine::connect(&self.0, &PathBuf::from(".")).await
    }
}

#[async_trait]
impl GatewayCheck for Warehouses {
    async fn check(&self, _gateway: &str) -> Result<(), String> {
        let mut warehouse = self.connect("pg").await.map_err(|e| e.to_string())?;
        warehouse.ping().await.map_err(|e| e.to_string())
    }

    async fn run_statements(&self, _gateway: &str, statements: &[String]) -> Result<(), String> {
        let mut warehouse = self.connect("pg").await.map_err(|e| e.to_string())?;
        warehouse.execute(&sluice_engine::transaction_script(statements)).await.map_err(|e| e.to_string())
    }
}

struct Quiet;

impl Progress for Quiet {
    fn started(&self, _: &Plan, _: &RunId, _: ProgressTotals) {}
    fn task_done(&self, _: u32, _: bool, _: bool) {}
    fn task_failed(&self, _: &str, _: &str, _: &str) {}
    fn message(&self, _: &str) {}
    fn finished(&self) {}
}

const CONFIG: &str = "gateways:\n  pg:\n    connection:\n      type: postgres\n      database: DATABASE\nmodel_defaults:\n  dialect: postgres\n  start: 2024-01-01\n  cron: '@daily'\n";

const ORDERS: &str =
    "MODEL (name shop.orders, kind INCREMENTAL_BY_TIME_RANGE (time_column ds, batch_size 1), end '2024-01-31');
SELECT CAST(d.day AS DATE) AS ds, g.n AS amount
FROM generate_series(CAST(@start_ds AS TIMESTAMP), CAST(@end_ds AS TIMESTAMP), INTERVAL '1 day') AS d(day)
CROSS JOIN generate_series(1, 3) AS g(n)";

const DAILY: &str =
    "MODEL (name shop.daily, kind INCREMENTAL_BY_TIME_RANGE (time_column ds, batch_size 4), end '2024-01-31');
SELECT ds, SUM(amount) AS total FROM shop.orders WHERE ds BETWEEN @start_ds AND @end_ds GROUP BY ds";

const SUMMARY: &str = "MODEL (name shop.summary, kind FULL, end '2024-01-31');
SELECT COUNT(*) AS days, SUM(total) AS total FROM shop.daily";

async fn fresh_database() -> String {
    let name = format!(
        "sluice_roles_{}_{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
    );
    let mut admin = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres").await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&mut admin).await.unwrap();
    name
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_workers_and_promoter_apply_a_plan_then_a_change() {
    let database = fresh_database().await;
    let folder = tempfile::tempdir().unwrap();
    let state: Arc<dyn StateStore> =
        sluice_state::open_state(folder.path().join("state.db").to_str().unwrap()).await.unwrap();
    let gateway = Gateway {
        name: "pg".into(),
        connection: Connection::Postgres {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            password: Secret::new(""),
            database: database.clone(),
        },
        state_connection: None,
    };
    let warehouses = Arc::new(Warehouses(gateway));
    let files = |daily: &str| ProjectFiles {
        config: Some(CONFIG.replace("DATABASE", &database)),
        models: BTreeMap::from([
            ("models/orders.sql".to_string(), ORDERS.to_string()),
            ("models/daily.sql".to_string(), daily.to_string()),
            ("models/summary.sql".to_string(), SUMMARY.to_string()),
        ]),
        ..ProjectFiles::default()
    };

    let queue = Arc::new(MemoryQueue::new());
    let gate = Arc::new(MemoryGate::new());
    let events = Arc::new(MemoryEvents::new());
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(sluice_worker::run(
        WorkerConfig { retry: RetryPolicy::default(), ..WorkerConfig::new("pg", 3) },
        WorkerDeps {
            state: state.clone(),
            queue: queue.clone(),
            gate: gate.clone(),
            events: events.clone(),
            warehouses: warehouses.clone(),
        },
        shutdown.clone(),
    ));
    let promoter = tokio::spawn(sluice_promoter::run(
        PromoterDeps {
            state: state.clone(),
            events: events.clone(),
            warehouses: warehouses.clone(),
            notifier: Arc::new(StandardNotifier),
            clock: Arc::new(SystemClock),
        },
        shutdown.clone(),
    ));
    let deps = CoordinatorDeps {
        state: state.clone(),
        queue: queue.clone(),
        gate,
        events: events.clone(),
        gateways: warehouses.clone(),
        clock: Arc::new(SystemClock),
    };

    let prod = EnvironmentName::prod();
    let plan_and_apply = |daily: String| {
        let state = state.clone();
        let deps = deps.clone();
        let prod = prod.clone();
        let files = files(&daily);
        async move {
            let project = load_project(&files).unwrap();
            let current = state.get_environment(&prod).await.unwrap().map(|record| record.state);
            let known = state.all_snapshots().await.unwrap().into_iter().map(|s| (s.id.clone(), s)).collect();
            let keys: Vec<_> =
                current.iter().flat_map(|c| c.snapshots.iter().map(|s| (s.name.clone(), s.version.clone()))).collect();
            let recorded = state.get_intervals(&keys).await.unwrap();
            let plan = build_plan(
                &project,
                PlanContext {
                    environment: &prod,
                    current: current.as_ref(),
                    base: current.as_ref(),
                    prod: None,
                    known_snapshots: &known,
                    recorded_intervals: &recorded,
                    now: Timestamp::parse("2024-03-01").unwrap(),
                    forward_only: false,
                    window: Default::default(),
                    skip_backfill: false,
                    selected: None,
                },
            );
            state.put_plan(&plan).await.unwrap();
            let outcome = sluice_coordinator::apply(
                &plan.id,
                &ApplyConfig::default(),
                &deps,
                Arc::new(Quiet),
                CancellationToken::new(),
            )
            .await
            .unwrap();
            (plan, outcome)
        }
    };

    let (plan, outcome) = plan_and_apply(DAILY.to_string()).await;
    let ApplyOutcome::Finished(run) = outcome else { panic!("{outcome:?}") };
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.tasks_done, plan.task_count() as u64);
    let mut warehouse = warehouses.connect("pg").await.unwrap();
    assert_eq!(warehouse.query_i64("SELECT COUNT(*) FROM shop.orders").await.unwrap(), Some(31 * 3));
    assert_eq!(warehouse.query_i64("SELECT days FROM shop.summary").await.unwrap(), Some(31));
    assert_eq!(warehouse.query_i64("SELECT total FROM shop.summary").await.unwrap(), Some(31 * 6));

    // A breaking change of daily: daily and summary are rebuilt, orders is not touched.
    let (changed, outcome) = plan_and_apply(DAILY.replace("SUM(amount)", "SUM(amount * 10)")).await;
    let ApplyOutcome::Finished(run) = outcome else { panic!("{outcome:?}") };
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(changed.task_count(), 8 + 1, "8 daily batches and the summary");
    assert_eq!(warehouse.query_i64("SELECT total FROM shop.summary").await.unwrap(), Some(31 * 60));
    let audit = state.list_audit(10).await.unwrap();
    assert_eq!(audit.len(), 2);

    shutdown.cancel();
    queue.shut_down().await;
    use sluice_queue::{EventBus, TaskQueue};
    events.shut_down().await;
    worker.await.unwrap().unwrap();
    promoter.await.unwrap().unwrap();
    drop(warehouse);
    let mut admin = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres").await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)")))
        .execute(&mut admin)
        .await
        .unwrap();
}
