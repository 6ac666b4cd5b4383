//! Applying plans end to end in one process, through the real `sluice` binary: first apply,
//! dev changes, reuse in prod, failure and resume, abort and resume, stale plans, rollback and
//! janitor. Every test runs twice: embedded (DuckDB + SQLite state) and against PostgreSQL
//! (warehouse and state, each test its own databases).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{Backend, Sandbox, wait_for};

const NOW: &str = "2024-05-01";
const ORDERS_PER_DAY: i64 = 20;
const DAYS: i64 = 91;

/// The example's revenue of one day, in cents: order n has quantity n % 4 + 1 of item (3n % 5) + 1.
fn expected_daily_revenue_cents() -> i64 {
    let prices_cents = [450, 600, 250, 300, 1200];
    (0..ORDERS_PER_DAY).map(|n| (n % 4 + 1) * prices_cents[((n * 3) % 5) as usize]).sum()
}

async fn first_apply_fills_everything_and_promotes_prod(backend: Backend) {
    let sandbox = Sandbox::new(backend).await;
    let (url, posted) = support::webhook();
    let config = sandbox.read("config.yaml");
    sandbox.write("config.yaml", &format!("{config}notification_webhook: {url}\n"));
    let run = sandbox.sluice(&["plan", "--auto-apply", "--now", NOW]);
    run.success();
    assert!(run.contains("succeeded"), "{run:?}");
    let summary = posted.recv_timeout(Duration::from_secs(30)).expect("the webhook got the run summary");
    assert!(summary.contains("\"outcome\":\"promoted\""), "{summary}");
    assert!(summary.contains("\"environment\":\"prod\""), "{summary}");
    assert_eq!(sandbox.count("sushi.orders").await, DAYS * ORDERS_PER_DAY);
    assert_eq!(sandbox.count("sushi.daily_revenue").await, DAYS);
    assert_eq!(sandbox.count("sushi.items").await, 5);
    assert_eq!(sandbox.count("sushi.customer_totals").await, 7);
    assert_eq!(sandbox.count("sushi.top_customers").await, 3);
    let mut warehouse = sandbox.warehouse().await;
    let revenue = warehouse
        .query_i64(
            "SELECT CAST(ROUND(revenue * 100) AS BIGINT) FROM sushi.daily_revenue WHERE order_date = '2024-02-29'",
        )
        .await
        .unwrap();
    assert_eq!(revenue, Some(expected_daily_revenue_cents()));
    let orders = warehouse.query_i64("SELECT SUM(order_count) FROM sushi.customer_totals").await.unwrap();
    assert_eq!(orders, Some(DAYS * ORDERS_PER_DAY));
    drop(warehouse);
    // The embedded model has no view; the others point at physical tables.
    assert_eq!(sandbox.view_target("sushi", "item_prices").await, None);
    let orders_table = run.physical_of("sushi.orders");
    assert_eq!(sandbox.view_target("sushi", "orders").await.as_deref(), Some(orders_table.as_str()));
    // Nothing left to do.
    let again = sandbox.sluice(&["plan", "--auto-apply", "--now", NOW]);
    again.success();
    assert!(again.stdout.contains("Nothing to do"), "{again:?}");
}

const BREAKING_WHERE: &str = "WHERE o.order_date BETWEEN @start_ds AND @end_ds AND o.quantity > 1";

async fn breaking_change_in_dev_backfills_only_descendants_and_prod_reuses_it(backend: Backend) {
    let sandbox = Sandbox::new(backend).await;
    let first = sandbox.sluice(&["plan", "--auto-apply", "--now", NOW]);
    first.success();
    let prod_revenue_table = first.physical_of("sushi.daily_revenue");
    let revenue = sandbox.read("models/daily_revenue.sql");
    sandbox.write(
        "models/daily_revenue.sql",
        &revenue.replace("WHERE o.order_date BETWEEN @start_ds AND @end_ds", BREAKING_WHERE),
    );

    let dev = sandbox.sluice(&["plan", "dev", "--auto-apply", "--now", NOW]);
    dev.success();
    assert!(dev.stdout.contains("~ sushi.daily_revenue: directly modified, breaking"), "{dev:?}");
    let backfill: Vec<&str> = dev
        .stdout
        .lines()
        .skip_while(|line| !line.starts_with("Backfill"))
        .take_while(|line| !line.is_empty())
        .collect();
    assert_eq!(backfill.len(), 2, "only daily_revenue is backfilled: {backfill:?}");
    assert!(backfill[1].contains("sushi.daily_revenue"), "{backfill:?}");
    let dev_revenue_table = dev.physical_of("sushi__dev.daily_revenue");
    assert_ne!(dev_revenue_table, prod_revenue_table);
    // Prod is untouched; dev shows only what differs from prod (SQLMesh's default), and its new
    // table read prod's unchanged ones.
    assert_eq!(sandbox.view_target("sushi", "daily_revenue").await.as_deref(), Some(prod_revenue_table.as_str()));
    assert_eq!(sandbox.view_target("sushi__dev", "daily_revenue").await.as_deref(), Some(dev_revenue_table.as_str()));
    assert_eq!(sandbox.view_target("sushi__dev", "orders").await, None);
    assert!(sandbox.view_target("sushi", "orders").await.is_some());
    assert!(sandbox.count("sushi__dev.daily_revenue").await > 0);

    // The same change in prod: dev's table is reused, nothing is backfilled.
    let prod = sandbox.sluice(&["plan", "--auto-apply", "--now", NOW]);
    prod.success();
    assert!(prod.stdout.contains("Backfill: nothing to backfill"), "{prod:?}");
    assert!(prod.contains("0 tasks"), "{prod:?}");
    assert_eq!(sandbox.view_target("sushi", "daily_revenue").await.as_deref(), Some(dev_revenue_table.as_str()));
}

const FRAGILE: &str = "MODEL (
  name sushi.fragile,
  kind INCREMENTAL_BY_TIME_RANGE (time_column order_date, batch_size 1),
  start '2024-01-01',
  end '2024-01-10',
  cron '@daily'
);

SELECT
  o.order_date,
  COUNT(*) + CAST(CASE WHEN o.order_date = DATE '2024-01-05' THEN (SELECT flag FROM raw.guard) ELSE '0' END AS INT) AS n
FROM sushi.orders AS o
WHERE o.order_date BETWEEN @start_ds AND @end_ds
GROUP BY o.order_date
";

async fn failing_model_keeps_finished_intervals_and_resumes_after_the_fix(backend: Backend) {
    let sandbox = Sandbox::new(backend).await;
    sandbox.write("models/fragile.sql", FRAGILE);
    sandbox.execute("CREATE SCHEMA IF NOT EXISTS raw").await;
    sandbox.execute("CREATE TABLE raw.guard (flag TEXT)").await;
    sandbox.execute("INSERT INTO raw.guard VALUES ('not a number')").await;

    let failed = sandbox.sluice(&["plan", "--auto-apply", "--now", NOW]);
    assert_eq!(failed.code, Some(1), "{failed:?}");
    assert!(failed.contains("sushi.fragile"), "{failed:?}");
    assert!(failed.contains("2024-01-05"), "{failed:?}");
    let plan = failed.plan_id();
    // No view was created: the environment is exactly as before (it did not exist).
    assert_eq!(sandbox.view_target("sushi", "orders").await, None);
    // Every finished interval is kept: all orders, and nine of ten fragile days.
    let orders_table = failed.physical_of("sushi.orders");
    let fragile_table = failed.physical_of("sushi.fragile");
    assert_eq!(sandbox.count(&orders_table).await, DAYS * ORDERS_PER_DAY);
    assert_eq!(sandbox.count(&fragile_table).await, 9);
    let status = sandbox.sluice(&["status", &plan]);
    status.success();
    assert!(status.stdout.contains("failed sushi.fragile [2024-01-05"), "{status:?}");

    // Fix the data and apply the same plan: only the failed interval runs.
    sandbox.execute("UPDATE raw.guard SET flag = '0'").await;
    let resumed = sandbox.sluice(&["apply", &plan]);
    resumed.success();
    assert!(resumed.stdout.contains(&format!("run {plan}-2: succeeded — 1 tasks, 1 intervals")), "{resumed:?}");
    assert_eq!(sandbox.count("sushi.fragile").await, 10);
    assert_eq!(sandbox.count("sushi.orders").await, DAYS * ORDERS_PER_DAY);
}

async fn abort_stops_between_intervals_and_apply_resumes(backend: Backend) {
    let sandbox = Sandbox::new(backend).await;
    // Two years of daily orders: long enough to abort in the middle.
    let orders = sandbox.read("models/orders.sql").replace("end '2024-03-31'", "end '2026-01-01'");
    sandbox.write("models/orders.sql", &orders);
    let mut child = sandbox.spawn(&["plan", "--auto-apply", "--now", "2026-01-01", "--workers", "1"]);
    let plan = child.read_plan_id();
    wait_for("some intervals to finish", Duration::from_secs(120), || {
        sandbox.running_tasks_done(&plan).is_some_and(|done| done >= 5)
    });
    // A second apply to the same environment is refused while this one holds it.
    let other = sandbox.read("models/orders.sql").replace("owner 'data-eng'", "owner 'another-team'");
    sandbox.write("models/orders.sql", &other);
    let refused = sandbox.sluice(&["plan", "--auto-apply", "--now", "2026-01-01"]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains(&format!("environment prod is being applied by run {plan}-1")), "{refused:?}");
    sandbox.write("models/orders.sql", &orders);
    sandbox.sluice(&["abort", &plan]).success();
    let aborted = child.wait();
    assert_eq!(aborted.code, Some(2), "{aborted:?}");
    let status = sandbox.sluice(&["status", &plan]);
    assert!(status.stdout.contains(&format!("run {plan}-1: aborted")), "{status:?}");
    assert_eq!(sandbox.view_target("sushi", "orders").await, None, "an aborted run promotes nothing");

    let resumed = sandbox.sluice(&["apply", &plan]);
    resumed.success();
    let days = 731; // 2024-01-01 to 2026-01-01
    assert_eq!(sandbox.count("sushi.orders").await, days * ORDERS_PER_DAY, "every interval written once");
}

async fn a_stale_plan_is_refused_naming_both_plans(backend: Backend) {
    let sandbox = Sandbox::new(backend).await;
    let stored = sandbox.sluice(&["plan", "--now", NOW]);
    stored.success();
    let stale = stored.plan_id();
    let owner = sandbox.read("models/orders.sql").replace("owner 'data-eng'", "owner 'someone-else'");
    sandbox.write("models/orders.sql", &owner);
    let applied = sandbox.sluice(&["plan", "--auto-apply", "--now", NOW]);
    applied.success();
    let newer = applied.plan_id();
    let refused = sandbox.sluice(&["apply", &stale]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains(&format!("plan {stale} is stale")), "{refused:?}");
    assert!(refused.stderr.contains(&newer), "{refused:?}");
    let unknown = sandbox.sluice(&["apply", "doesnotexist"]);
    assert_eq!(unknown.code, Some(1));
    assert!(unknown.stderr.contains("no plan doesnotexist"), "{unknown:?}");
}

async fn rollback_restores_views_and_janitor_removes_expired_environments(backend: Backend) {
    let sandbox = Sandbox::new(backend).await;
    let first = sandbox.sluice(&["plan", "--auto-apply", "--now", NOW]);
    first.success();
    let first_table = first.physical_of("sushi.daily_revenue");
    let revenue = sandbox.read("models/daily_revenue.sql");
    sandbox.write(
        "models/daily_revenue.sql",
        &revenue.replace("WHERE o.order_date BETWEEN @start_ds AND @end_ds", BREAKING_WHERE),
    );
    let second = sandbox.sluice(&["plan", "--auto-apply", "--now", NOW]);
    second.success();
    let second_table = second.physical_of("sushi.daily_revenue");
    assert_eq!(sandbox.view_target("sushi", "daily_revenue").await.as_deref(), Some(second_table.as_str()));

    sandbox.sluice(&["rollback", "prod"]).success();
    assert_eq!(sandbox.view_target("sushi", "daily_revenue").await.as_deref(), Some(first_table.as_str()));
    let environments = sandbox.sluice(&["environments"]);
    assert!(environments.stdout.contains(&format!("prod: plan {}", first.plan_id())), "{environments:?}");

    // A dev environment that expires at once, with a table of its own.
    let config = sandbox.read("config.yaml").replace("environment_ttl: in 1 week", "environment_ttl: in 0 seconds");
    sandbox.write("config.yaml", &config);
    sandbox
        .write("models/daily_revenue.sql", &revenue.replace("COUNT(*) AS order_count", "COUNT(*) + 0 AS order_count"));
    let dev = sandbox.sluice(&["plan", "dev", "--auto-apply", "--now", NOW]);
    dev.success();
    let dev_table = dev.physical_of("sushi__dev.daily_revenue");
    let (dev_schema, dev_name) = dev_table.split_once('.').unwrap();
    assert!(sandbox.table_exists(dev_schema, dev_name).await);

    let janitor = sandbox.sluice(&["janitor"]);
    janitor.success();
    assert!(janitor.stdout.contains("1 expired environments removed"), "{janitor:?}");
    assert_eq!(sandbox.view_target("sushi__dev", "daily_revenue").await, None);
    assert!(!sandbox.table_exists(dev_schema, dev_name).await, "dev's own table is dropped");
    // Prod's tables, and the ones a rollback of prod would return to, are kept.
    let (schema, name) = first_table.split_once('.').unwrap();
    assert!(sandbox.table_exists(schema, name).await);
    let (schema, name) = second_table.split_once('.').unwrap();
    assert!(sandbox.table_exists(schema, name).await);
    assert_eq!(sandbox.count("sushi.daily_revenue").await, DAYS);
}

macro_rules! both_backends {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test(super::Backend::Embedded).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

both_backends! {
    first_apply_fills_everything_and_promotes_prod,
    breaking_change_in_dev_backfills_only_descendants_and_prod_reuses_it,
    failing_model_keeps_finished_intervals_and_resumes_after_the_fix,
    abort_stops_between_intervals_and_apply_resumes,
    a_stale_plan_is_refused_naming_both_plans,
    rollback_restores_views_and_janitor_removes_expired_environments,
}
