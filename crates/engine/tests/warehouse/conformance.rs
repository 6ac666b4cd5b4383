//! The conformance suite: every case runs unchanged against DuckDB and PostgreSQL through `dyn Warehouse`.

use sluice_core::interval::{Interval, Timestamp};
use sluice_core::model::SeedData;
use sluice_core::names::PhysicalTable;
use sluice_engine::{
    AuditCheck, EngineError, GatewayPromotion, PromotionOutcome, TimeColumn, ViewUpdate, Warehouse, audit_count_query,
};

use crate::support::{Fixture, table};

/// Expands every case into one test per engine: `postgres::<case>` and `duckdb::<case>`.
macro_rules! conformance_suite {
    ($($case:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::support::run_on_postgres(super::$case).await;
                }
            )*
        }

        #[cfg(feature = "duckdb")]
        mod duckdb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::support::run_on_duckdb(super::$case).await;
                }
            )*
        }
    };
}

conformance_suite!(
    ensure_table_is_idempotent_and_race_safe,
    declared_columns_create_the_table_a_self_reading_query_needs,
    a_statement_in_flight_is_cancelled,
    two_writes_of_one_interval_at_once_leave_it_written_once,
    replace_interval_replaces_only_its_interval,
    replace_interval_filters_timestamp_columns_half_open,
    replace_all_replaces_every_row,
    append_adds_rows_and_a_failing_audit_adds_none,
    rebuild_reads_the_table_as_it_was,
    upsert_replaces_rows_by_key,
    a_failing_blocking_audit_rolls_the_write_back,
    seed_loads_with_declared_types,
    seed_loads_text_columns_without_declared_types,
    seed_refuses_an_unsafe_type,
    physical_view_is_created_and_replaced,
    promote_creates_swaps_and_drops_views,
    failed_promote_leaves_every_view_as_it_was,
    environment_promotion_moves_the_marker_with_the_views,
    checksum_compares_contents,
    errors_are_classified_and_the_connection_survives,
    drop_table_drops_tables_and_views,
    query_i64_reads_integers_and_nothing,
    identifiers_are_quoted,
);

const EVENTS: &str = "CREATE SCHEMA IF NOT EXISTS raw; \
    CREATE TABLE raw.events (ds DATE, item_id INT, amount INT); \
    INSERT INTO raw.events VALUES ('2024-01-01', 1, 10), ('2024-01-01', 2, 20), ('2024-01-02', 1, 30), \
    ('2024-01-03', 3, 40)";
const EVENTS_QUERY: &str = "SELECT ds, item_id, amount FROM raw.events";

const ITEMS: &str = "CREATE SCHEMA IF NOT EXISTS raw; \
    CREATE TABLE raw.items (id INT, name TEXT); \
    INSERT INTO raw.items VALUES (1, 'apple'), (2, 'pear'), (3, 'plum')";
const ITEMS_QUERY: &str = "SELECT id, name FROM raw.items";

fn day(date: &str) -> Timestamp {
    Timestamp::parse(date).unwrap()
}

fn days(start: &str, end: &str) -> Interval {
    Interval::new(day(start), day(end))
}

fn versioned(name: &str, version: &str) -> PhysicalTable {
    PhysicalTable { schema: "sluice__shop".to_string(), table: format!("shop__{name}__{version}") }
}

fn view(schema: &str, name: &str, target: Option<&PhysicalTable>) -> ViewUpdate {
    ViewUpdate { schema: schema.to_string(), name: name.to_string(), target: target.cloned() }
}

async fn scalar(warehouse: &mut dyn Warehouse, sql: &str) -> Option<i64> {
    warehouse.query_i64(sql).await.unwrap_or_else(|error| panic!("{sql}: {error}"))
}

async fn count(warehouse: &mut dyn Warehouse, relation: &str) -> i64 {
    scalar(warehouse, &format!("SELECT COUNT(*) FROM {relation}")).await.unwrap()
}

async fn ensure_table_is_idempotent_and_race_safe(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    assert!(["duckdb", "postgres"].contains(&warehouse.engine_name()));
    warehouse.execute(EVENTS).await.unwrap();
    let events = table("events");
    warehouse.ensure_table(&events, &[], EVENTS_QUERY).await.unwrap();
    warehouse.ensure_table(&events, &[], EVENTS_QUERY).await.unwrap();
    assert_eq!(count(warehouse.as_mut(), "sluice__shop.shop__events__v1").await, 0);
    assert_eq!(
        scalar(warehouse.as_mut(), "SELECT COUNT(*) FROM sluice__shop.shop__events__v1 WHERE ds IS NULL OR amount > 0")
            .await,
        Some(0),
        "the table has the query's columns"
    );

    // Ensuring again keeps the rows already written.
    warehouse.replace_all(&events, EVENTS_QUERY, &[]).await.unwrap();
    warehouse.ensure_table(&events, &[], EVENTS_QUERY).await.unwrap();
    assert_eq!(count(warehouse.as_mut(), "sluice__shop.shop__events__v1").await, 4);

    // Two workers creating the same new schema and table at once both succeed.
    let raced = PhysicalTable { schema: "sluice__race".to_string(), table: "race__events__v1".to_string() };
    let mut first = fixture.open().await;
    let mut second = fixture.open().await;
    let (first_result, second_result) =
        tokio::join!(first.ensure_table(&raced, &[], EVENTS_QUERY), second.ensure_table(&raced, &[], EVENTS_QUERY));
    first_result.unwrap();
    second_result.unwrap();
    assert_eq!(count(warehouse.as_mut(), "sluice__race.race__events__v1").await, 0);
}

async fn declared_columns_create_the_table_a_self_reading_query_needs(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    let ledger = table("ledger");
    let relation = "sluice__shop.shop__ledger__v1";
    // The query reads the table it fills: only declared columns can create it first.
    let query = format!("SELECT CAST('2024-01-01' AS DATE) AS day, (SELECT COUNT(*) FROM {relation}) + 1 AS entries");
    let columns = [("day".to_string(), "DATE".to_string()), ("entries".to_string(), "BIGINT".to_string())];
    warehouse.ensure_table(&ledger, &columns, &query).await.unwrap();
    warehouse.ensure_table(&ledger, &columns, &query).await.unwrap();
    assert_eq!(
        warehouse
            .replace_interval(&ledger, TimeColumn::Native("day"), days("2024-01-01", "2024-01-02"), &query, &[])
            .await
            .unwrap(),
        1
    );
    assert_eq!(scalar(warehouse.as_mut(), &format!("SELECT entries FROM {relation}")).await, Some(1));
    let unsafe_type = [("day".to_string(), "DATE); DROP TABLE x; --".to_string())];
    let refused = warehouse.ensure_table(&table("odd"), &unsafe_type, &query).await.unwrap_err();
    assert!(refused.to_string().contains("expected a plain column type"), "{refused}");
}

async fn a_statement_in_flight_is_cancelled(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    let canceller = warehouse.canceller();
    // Long enough that only a cancel ends it within the guard below.
    let statement = match warehouse.engine_name() {
        "postgres" => "SELECT pg_sleep(600)",
        _ => "SELECT SUM(a.range * b.range) FROM range(2000000) AS a, range(2000000) AS b",
    };
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        let run = warehouse.execute(statement);
        tokio::pin!(run);
        // A cancel that arrives before the statement starts cancels nothing: repeat until it ends.
        loop {
            tokio::select! {
                result = &mut run => break result,
                () = canceller.cancel() => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .expect("the statement was not cancelled");
    assert!(outcome.is_err(), "a cancelled statement fails");
    // The connection is usable afterwards.
    assert_eq!(scalar(warehouse.as_mut(), "SELECT 41 + 1").await, Some(42));
}

async fn two_writes_of_one_interval_at_once_leave_it_written_once(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(EVENTS).await.unwrap();
    let events = table("events");
    warehouse.ensure_table(&events, &[], EVENTS_QUERY).await.unwrap();
    // Slow enough on PostgreSQL that the two writes overlap (a redelivery while the first
    // worker still runs the task); DuckDB's optimistic transactions make one of them conflict.
    let query = match warehouse.engine_name() {
        "postgres" => "SELECT ds, item_id, amount FROM raw.events CROSS JOIN (SELECT pg_sleep(0.3)) AS nap",
        _ => EVENTS_QUERY,
    };
    let first_day = days("2024-01-01", "2024-01-02");
    let mut first = fixture.open().await;
    let mut second = fixture.open().await;
    let (one, two) = tokio::join!(
        first.replace_interval(&events, TimeColumn::Native("ds"), first_day, query, &[]),
        second.replace_interval(&events, TimeColumn::Native("ds"), first_day, query, &[])
    );
    for outcome in [one, two] {
        match outcome {
            Ok(rows) => assert_eq!(rows, 2),
            // A write-write conflict is transient: the worker retries it.
            Err(error) => {
                assert!(error.is_transient(), "{error}");
                assert_eq!(
                    first.replace_interval(&events, TimeColumn::Native("ds"), first_day, query, &[]).await.unwrap(),
                    2
                );
            }
        }
    }
    let relation = "sluice__shop.shop__events__v1";
    assert_eq!(count(warehouse.as_mut(), relation).await, 2, "the interval's rows, once");
}

async fn replace_interval_replaces_only_its_interval(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(EVENTS).await.unwrap();
    let events = table("events");
    let relation = "sluice__shop.shop__events__v1";
    warehouse.ensure_table(&events, &[], EVENTS_QUERY).await.unwrap();

    let first_day = days("2024-01-01", "2024-01-02");
    let second_day = days("2024-01-02", "2024-01-03");
    assert_eq!(
        warehouse.replace_interval(&events, TimeColumn::Native("ds"), first_day, EVENTS_QUERY, &[]).await.unwrap(),
        2
    );
    assert_eq!(
        warehouse.replace_interval(&events, TimeColumn::Native("ds"), second_day, EVENTS_QUERY, &[]).await.unwrap(),
        1
    );
    assert_eq!(
        warehouse.replace_interval(&events, TimeColumn::Native("ds"), first_day, EVENTS_QUERY, &[]).await.unwrap(),
        2
    );
    assert_eq!(count(warehouse.as_mut(), relation).await, 3, "replacing an interval twice duplicates nothing");
    let third_day = format!("{relation} WHERE ds = DATE '2024-01-03'");
    assert_eq!(count(warehouse.as_mut(), &third_day).await, 0, "rows outside the interval are not inserted");

    // The source changes on both days; replacing the first day leaves the second as it was.
    warehouse.execute("UPDATE raw.events SET amount = amount + 100").await.unwrap();
    assert_eq!(
        warehouse.replace_interval(&events, TimeColumn::Native("ds"), first_day, EVENTS_QUERY, &[]).await.unwrap(),
        2
    );
    let first_sum = format!("SELECT SUM(amount) FROM {relation} WHERE ds = DATE '2024-01-01'");
    let second_sum = format!("SELECT SUM(amount) FROM {relation} WHERE ds = DATE '2024-01-02'");
    assert_eq!(scalar(warehouse.as_mut(), &first_sum).await, Some(230));
    assert_eq!(scalar(warehouse.as_mut(), &second_sum).await, Some(30));

    // A multi-day batch replaces every day it covers.
    let batch = days("2024-01-01", "2024-01-04");
    assert_eq!(
        warehouse.replace_interval(&events, TimeColumn::Native("ds"), batch, EVENTS_QUERY, &[]).await.unwrap(),
        4
    );
    assert_eq!(count(warehouse.as_mut(), relation).await, 4);
    assert_eq!(scalar(warehouse.as_mut(), &second_sum).await, Some(130));
}

/// Audit checks run inside the write's transaction and see what it wrote: an interval write
/// audits that interval's rows only; the first check that counts a row fails the write and
/// leaves the table exactly as it was, for every kind of write.
async fn a_failing_blocking_audit_rolls_the_write_back(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(EVENTS).await.unwrap();
    warehouse.execute(ITEMS).await.unwrap();
    let events = table("events");
    let relation = "sluice__shop.shop__events__v1";
    warehouse.ensure_table(&events, &[], EVENTS_QUERY).await.unwrap();
    let first_day = days("2024-01-01", "2024-01-02");
    let second_day = days("2024-01-02", "2024-01-03");
    let check =
        |name: &str, table: &PhysicalTable, time_column: Option<TimeColumn>, interval: Interval, audit: &str| {
            AuditCheck { audit: name.to_string(), count_query: audit_count_query(table, time_column, interval, audit) }
        };
    // Two rows on the first day (written unchecked), one on the second: "one item a day" holds
    // for the second day's write, which audits its own interval only, and fails the first's.
    assert_eq!(
        warehouse.replace_interval(&events, TimeColumn::Native("ds"), first_day, EVENTS_QUERY, &[]).await.unwrap(),
        2
    );
    let one_item_a_day = "SELECT ds FROM sluice_this_model GROUP BY ds HAVING COUNT(*) > 1";
    let passes = check("one_item", &events, Some(TimeColumn::Native("ds")), second_day, one_item_a_day);
    assert_eq!(
        warehouse
            .replace_interval(&events, TimeColumn::Native("ds"), second_day, EVENTS_QUERY, &[passes])
            .await
            .unwrap(),
        1
    );
    warehouse.execute("UPDATE raw.events SET amount = amount + 100 WHERE ds = '2024-01-01'").await.unwrap();
    let fails = check("one_item", &events, Some(TimeColumn::Native("ds")), first_day, one_item_a_day);
    let error = warehouse
        .replace_interval(&events, TimeColumn::Native("ds"), first_day, EVENTS_QUERY, &[fails])
        .await
        .unwrap_err();
    assert!(matches!(&error, EngineError::AuditFailed { audit, rows: 1 } if audit == "one_item"), "{error}");
    assert!(!error.is_transient());
    assert_eq!(error.to_string(), "audit one_item failed: 1 row(s) break it; the write was rolled back");
    assert_eq!(count(warehouse.as_mut(), relation).await, 3);
    let first_sum = format!("SELECT SUM(amount) FROM {relation} WHERE ds = DATE '2024-01-01'");
    assert_eq!(scalar(warehouse.as_mut(), &first_sum).await, Some(30), "the failed rewrite was rolled back");

    // A whole-table write, checked against the table as the write leaves it; the first failing
    // check is the error, the ones after it do not run.
    let items = table("items");
    let items_relation = "sluice__shop.shop__items__v1";
    warehouse.ensure_table(&items, &[], ITEMS_QUERY).await.unwrap();
    let whole = Interval::new(Timestamp(0), Timestamp(86_400));
    let no_plum = check("no_plum", &items, None, whole, "SELECT * FROM sluice_this_model AS t WHERE t.name = 'plum'");
    let broken = check("broken", &items, None, whole, "SELECT * FROM no_such_table");
    assert_eq!(
        warehouse
            .replace_all(&items, "SELECT id, name FROM raw.items WHERE id < 3", std::slice::from_ref(&no_plum))
            .await
            .unwrap(),
        2
    );
    let error = warehouse.replace_all(&items, ITEMS_QUERY, &[no_plum.clone(), broken]).await.unwrap_err();
    assert!(matches!(error, EngineError::AuditFailed { rows: 1, .. }), "{error}");
    assert_eq!(count(warehouse.as_mut(), items_relation).await, 2);
    let key = vec!["id".to_string()];
    let error = warehouse.upsert(&items, &key, ITEMS_QUERY, &[no_plum]).await.unwrap_err();
    assert!(matches!(error, EngineError::AuditFailed { rows: 1, .. }), "{error}");
    assert_eq!(count(warehouse.as_mut(), &format!("{items_relation} WHERE name = 'plum'")).await, 0);
    // The connection is usable after a rolled-back write.
    assert_eq!(warehouse.replace_all(&items, ITEMS_QUERY, &[]).await.unwrap(), 3);
}

async fn replace_interval_filters_timestamp_columns_half_open(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse
        .execute(
            "CREATE SCHEMA raw; CREATE TABLE raw.clicks (ts TIMESTAMP, n INT); \
             INSERT INTO raw.clicks VALUES ('2023-12-31 23:59:59', 100), ('2024-01-01 00:00:00', 1), \
             ('2024-01-01 23:59:59', 2), ('2024-01-02 00:00:00', 4)",
        )
        .await
        .unwrap();
    let clicks = table("clicks");
    let query = "SELECT ts, n FROM raw.clicks";
    warehouse.ensure_table(&clicks, &[], query).await.unwrap();
    assert_eq!(
        warehouse
            .replace_interval(&clicks, TimeColumn::Native("ts"), days("2024-01-01", "2024-01-02"), query, &[])
            .await
            .unwrap(),
        2
    );
    assert_eq!(scalar(warehouse.as_mut(), "SELECT SUM(n) FROM sluice__shop.shop__clicks__v1").await, Some(3));
}

async fn replace_all_replaces_every_row(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(ITEMS).await.unwrap();
    let items = table("items");
    let relation = "sluice__shop.shop__items__v1";
    warehouse.ensure_table(&items, &[], ITEMS_QUERY).await.unwrap();
    assert_eq!(warehouse.replace_all(&items, ITEMS_QUERY, &[]).await.unwrap(), 3);
    assert_eq!(warehouse.replace_all(&items, ITEMS_QUERY, &[]).await.unwrap(), 3);
    assert_eq!(count(warehouse.as_mut(), relation).await, 3);
    warehouse.execute("DELETE FROM raw.items WHERE id = 1").await.unwrap();
    assert_eq!(warehouse.replace_all(&items, ITEMS_QUERY, &[]).await.unwrap(), 2);
    assert_eq!(count(warehouse.as_mut(), relation).await, 2);
    assert_eq!(count(warehouse.as_mut(), &format!("{relation} WHERE id = 1")).await, 0);
}

async fn append_adds_rows_and_a_failing_audit_adds_none(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(ITEMS).await.unwrap();
    let items = table("items");
    let relation = "sluice__shop.shop__items__v1";
    warehouse.ensure_table(&items, &[], ITEMS_QUERY).await.unwrap();
    assert_eq!(warehouse.append(&items, ITEMS_QUERY, &[]).await.unwrap(), 3);
    assert_eq!(warehouse.append(&items, "SELECT id, name FROM raw.items WHERE id = 1", &[]).await.unwrap(), 1);
    assert_eq!(count(warehouse.as_mut(), relation).await, 4);
    assert_eq!(count(warehouse.as_mut(), &format!("{relation} WHERE id = 1")).await, 2);
    let whole = Interval::new(Timestamp(0), Timestamp(86_400));
    let once = AuditCheck {
        audit: "once".to_string(),
        count_query: audit_count_query(
            &items,
            None,
            whole,
            "SELECT id FROM sluice_this_model GROUP BY id HAVING COUNT(*) > 2",
        ),
    };
    let error = warehouse.append(&items, "SELECT id, name FROM raw.items WHERE id = 1", &[once]).await.unwrap_err();
    assert!(matches!(&error, EngineError::AuditFailed { audit, rows: 1 } if audit == "once"), "{error}");
    assert_eq!(count(warehouse.as_mut(), relation).await, 4, "the failed append was rolled back");
}

async fn rebuild_reads_the_table_as_it_was(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(ITEMS).await.unwrap();
    let items = table("items");
    let relation = "sluice__shop.shop__items__v1";
    warehouse.ensure_table(&items, &[], ITEMS_QUERY).await.unwrap();
    let columns = warehouse.table_columns(&items).await.unwrap();
    let names: Vec<&str> = columns.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["id", "name"]);
    assert!(columns[0].1.to_lowercase().contains("int") && !columns[1].1.to_lowercase().contains("int"), "{columns:?}");
    assert_eq!(warehouse.append(&items, ITEMS_QUERY, &[]).await.unwrap(), 3);
    // The query reads the table's own rows: every row twice, once as it was and once renamed.
    let doubled = format!("SELECT id, name FROM {relation} UNION ALL SELECT id + 10, name FROM {relation}");
    assert_eq!(warehouse.rebuild(&items, &doubled, &[]).await.unwrap(), 6);
    assert_eq!(count(warehouse.as_mut(), relation).await, 6);
    assert_eq!(count(warehouse.as_mut(), &format!("{relation} WHERE id > 10")).await, 3);
    let whole = Interval::new(Timestamp(0), Timestamp(86_400));
    let never = AuditCheck {
        audit: "never".to_string(),
        count_query: audit_count_query(&items, None, whole, "SELECT id FROM sluice_this_model"),
    };
    let error = warehouse.rebuild(&items, &doubled, &[never]).await.unwrap_err();
    assert!(matches!(&error, EngineError::AuditFailed { audit, .. } if audit == "never"), "{error}");
    assert_eq!(count(warehouse.as_mut(), relation).await, 6, "the failed rebuild was rolled back");
}

async fn upsert_replaces_rows_by_key(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(ITEMS).await.unwrap();
    let items = table("items");
    let relation = "sluice__shop.shop__items__v1";
    let key = vec!["id".to_string()];
    warehouse.ensure_table(&items, &[], ITEMS_QUERY).await.unwrap();
    assert_eq!(warehouse.upsert(&items, &key, ITEMS_QUERY, &[]).await.unwrap(), 3);
    assert_eq!(warehouse.upsert(&items, &key, ITEMS_QUERY, &[]).await.unwrap(), 3);
    assert_eq!(count(warehouse.as_mut(), relation).await, 3, "upserting the same rows twice duplicates nothing");

    warehouse
        .execute(
            "UPDATE raw.items SET name = 'PEAR' WHERE id = 2; INSERT INTO raw.items VALUES (4, 'fig'); \
             DELETE FROM raw.items WHERE id = 1",
        )
        .await
        .unwrap();
    let changed = "SELECT id, name FROM raw.items WHERE id >= 2";
    assert_eq!(warehouse.upsert(&items, &key, changed, &[]).await.unwrap(), 3);
    assert_eq!(count(warehouse.as_mut(), relation).await, 4);
    assert_eq!(count(warehouse.as_mut(), &format!("{relation} WHERE name = 'apple'")).await, 1, "absent keys stay");
    assert_eq!(count(warehouse.as_mut(), &format!("{relation} WHERE name = 'PEAR'")).await, 1);
    assert_eq!(count(warehouse.as_mut(), &format!("{relation} WHERE name = 'pear'")).await, 0);

    // A composite key.
    let pairs = versioned("pairs", "v1");
    let composite = vec!["id".to_string(), "name".to_string()];
    warehouse.ensure_table(&pairs, &[], ITEMS_QUERY).await.unwrap();
    warehouse.upsert(&pairs, &composite, ITEMS_QUERY, &[]).await.unwrap();
    warehouse.upsert(&pairs, &composite, ITEMS_QUERY, &[]).await.unwrap();
    assert_eq!(count(warehouse.as_mut(), "sluice__shop.shop__pairs__v1").await, 3);

    let error = warehouse.upsert(&items, &[], ITEMS_QUERY, &[]).await.unwrap_err();
    assert!(!error.is_transient(), "{error}");
}

async fn seed_loads_with_declared_types(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    let prices = table("prices");
    let relation = "sluice__shop.shop__prices__v1";
    let columns = vec![("item_id".to_string(), "INT".to_string()), ("price".to_string(), "DOUBLE".to_string())];
    let seed = SeedData {
        columns: vec!["item_id".to_string(), "price".to_string()],
        rows: vec![
            vec!["1".to_string(), "2.5".to_string()],
            vec!["2".to_string(), "4.25".to_string()],
            vec!["3".to_string(), String::new()],
        ],
    };
    assert_eq!(warehouse.load_seed(&prices, &columns, &seed).await.unwrap(), 3);
    assert_eq!(
        scalar(warehouse.as_mut(), &format!("SELECT CAST(SUM(price * 100) AS BIGINT) FROM {relation}")).await,
        Some(675)
    );
    assert_eq!(scalar(warehouse.as_mut(), &format!("SELECT SUM(item_id + 1) FROM {relation}")).await, Some(9));
    assert_eq!(count(warehouse.as_mut(), &format!("{relation} WHERE price IS NULL")).await, 1, "empty field is NULL");

    // Loading again replaces the rows.
    let smaller = SeedData { columns: seed.columns.clone(), rows: vec![vec!["7".to_string(), "1.5".to_string()]] };
    assert_eq!(warehouse.load_seed(&prices, &columns, &smaller).await.unwrap(), 1);
    assert_eq!(count(warehouse.as_mut(), relation).await, 1);
    assert_eq!(scalar(warehouse.as_mut(), &format!("SELECT SUM(item_id) FROM {relation}")).await, Some(7));
}

async fn seed_loads_text_columns_without_declared_types(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    let stock = table("stock");
    let relation = "sluice__shop.shop__stock__v1";
    let seed = SeedData {
        columns: vec!["name".to_string(), "qty".to_string()],
        rows: vec![
            vec!["apple".to_string(), "7".to_string()],
            vec!["it's".to_string(), "3".to_string()],
            vec![String::new(), "1".to_string()],
        ],
    };
    assert_eq!(warehouse.load_seed(&stock, &[], &seed).await.unwrap(), 3);
    assert_eq!(count(warehouse.as_mut(), &format!("{relation} WHERE qty = '7'")).await, 1);
    assert_eq!(count(warehouse.as_mut(), &format!("{relation} WHERE name = 'it''s'")).await, 1);
    assert_eq!(count(warehouse.as_mut(), &format!("{relation} WHERE name IS NULL")).await, 1);
    assert_eq!(scalar(warehouse.as_mut(), &format!("SELECT SUM(CAST(qty AS INT)) FROM {relation}")).await, Some(11));
}

async fn seed_refuses_an_unsafe_type(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    let seed = SeedData { columns: vec!["a".to_string()], rows: vec![vec!["1".to_string()]] };
    let columns = vec![("a".to_string(), "INT); DROP SCHEMA raw; --".to_string())];
    let error = warehouse.load_seed(&table("unsafe"), &columns, &seed).await.unwrap_err();
    assert!(!error.is_transient());
    assert!(error.to_string().contains("column \"a\""), "{error}");
}

async fn physical_view_is_created_and_replaced(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(ITEMS).await.unwrap();
    let physical = versioned("expensive", "v1");
    warehouse.create_physical_view(&physical, "SELECT id, name FROM raw.items WHERE id > 1").await.unwrap();
    assert_eq!(count(warehouse.as_mut(), "sluice__shop.shop__expensive__v1").await, 2);
    warehouse.create_physical_view(&physical, "SELECT id, name FROM raw.items WHERE id > 2;").await.unwrap();
    assert_eq!(count(warehouse.as_mut(), "sluice__shop.shop__expensive__v1").await, 1);
    assert_eq!(
        warehouse.view_target("sluice__shop", "shop__expensive__v1").await.unwrap().as_deref(),
        Some("raw.items")
    );
}

async fn promote_creates_swaps_and_drops_views(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(ITEMS).await.unwrap();
    let (v1, v2) = (versioned("items", "v1"), versioned("items", "v2"));
    for version in [&v1, &v2] {
        warehouse.ensure_table(version, &[], ITEMS_QUERY).await.unwrap();
    }
    warehouse.replace_all(&v1, "SELECT id, name FROM raw.items WHERE id = 1", &[]).await.unwrap();
    warehouse.replace_all(&v2, ITEMS_QUERY, &[]).await.unwrap();

    warehouse.promote(&[view("shop", "items", Some(&v1)), view("shop__dev", "items", Some(&v1))]).await.unwrap();
    assert_eq!(warehouse.view_target("shop", "items").await.unwrap().as_deref(), Some("sluice__shop.shop__items__v1"));
    assert_eq!(count(warehouse.as_mut(), "shop.items").await, 1);
    assert_eq!(count(warehouse.as_mut(), "shop__dev.items").await, 1);

    warehouse.promote(&[view("shop", "items", Some(&v2))]).await.unwrap();
    // Another connection (the promoter's, a reader's) sees the swap.
    let mut reader = fixture.open().await;
    assert_eq!(reader.view_target("shop", "items").await.unwrap().as_deref(), Some("sluice__shop.shop__items__v2"));
    assert_eq!(count(reader.as_mut(), "shop.items").await, 3);
    assert_eq!(
        reader.view_target("shop__dev", "items").await.unwrap().as_deref(),
        Some("sluice__shop.shop__items__v1")
    );

    warehouse.promote(&[view("shop__dev", "items", None)]).await.unwrap();
    assert_eq!(warehouse.view_target("shop__dev", "items").await.unwrap(), None);
    assert_eq!(warehouse.view_target("shop", "items").await.unwrap().as_deref(), Some("sluice__shop.shop__items__v2"));
    warehouse.promote(&[view("shop__dev", "items", None)]).await.unwrap();
    warehouse.promote(&[]).await.unwrap();
}

fn promotion(expected: Option<&str>, plan: Option<&str>, updates: Vec<ViewUpdate>) -> GatewayPromotion {
    GatewayPromotion {
        environment: "prod".into(),
        expected_plan: expected.map(str::to_string),
        plan: plan.map(str::to_string),
        updates,
    }
}

async fn environment_promotion_moves_the_marker_with_the_views(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(ITEMS).await.unwrap();
    let (v1, v2) = (versioned("items", "v1"), versioned("items", "v2"));
    for version in [&v1, &v2] {
        warehouse.ensure_table(version, &[], ITEMS_QUERY).await.unwrap();
    }
    assert_eq!(warehouse.shown_plan("prod").await.unwrap(), None, "no marker before the first promotion");
    let first = promotion(None, Some("p1"), vec![view("shop", "items", Some(&v1))]);
    assert_eq!(warehouse.promote_environment(&first).await.unwrap(), PromotionOutcome::Applied);
    assert_eq!(warehouse.shown_plan("prod").await.unwrap().as_deref(), Some("p1"));
    assert_eq!(warehouse.shown_plan("dev").await.unwrap(), None, "each environment has its own marker");
    // Rolled forward again: nothing changes.
    assert_eq!(warehouse.promote_environment(&first).await.unwrap(), PromotionOutcome::AlreadyShown);
    let second = promotion(Some("p1"), Some("p2"), vec![view("shop", "items", Some(&v2))]);
    assert_eq!(warehouse.promote_environment(&second).await.unwrap(), PromotionOutcome::Applied);
    assert_eq!(warehouse.view_target("shop", "items").await.unwrap().as_deref(), Some("sluice__shop.shop__items__v2"));
    // A late promoter of p1 (made against nothing, or against p1) cannot put v1 back.
    for late in [first.clone(), promotion(Some("p0"), Some("p1"), vec![view("shop", "items", Some(&v1))])] {
        assert_eq!(
            warehouse.promote_environment(&late).await.unwrap(),
            PromotionOutcome::Stale { shown: Some("p2".into()) }
        );
    }
    let mut reader = fixture.open().await;
    assert_eq!(reader.view_target("shop", "items").await.unwrap().as_deref(), Some("sluice__shop.shop__items__v2"));
    assert_eq!(reader.shown_plan("prod").await.unwrap().as_deref(), Some("p2"));
    // A share without updates moves the marker all the same; removing the environment clears it.
    let third = promotion(Some("p2"), Some("p3"), Vec::new());
    assert_eq!(warehouse.promote_environment(&third).await.unwrap(), PromotionOutcome::Applied);
    let removed = promotion(Some("p3"), None, vec![view("shop", "items", None)]);
    assert_eq!(warehouse.promote_environment(&removed).await.unwrap(), PromotionOutcome::Applied);
    assert_eq!(reader.view_target("shop", "items").await.unwrap(), None);
    assert_eq!(reader.shown_plan("prod").await.unwrap(), None, "a removed environment shows no plan");
    assert_eq!(warehouse.promote_environment(&first).await.unwrap(), PromotionOutcome::Applied);
}

async fn failed_promote_leaves_every_view_as_it_was(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(ITEMS).await.unwrap();
    let (v1, v2) = (versioned("items", "v1"), versioned("items", "v2"));
    for version in [&v1, &v2] {
        warehouse.ensure_table(version, &[], ITEMS_QUERY).await.unwrap();
    }
    warehouse.replace_all(&v1, "SELECT id, name FROM raw.items WHERE id = 1", &[]).await.unwrap();
    warehouse.replace_all(&v2, ITEMS_QUERY, &[]).await.unwrap();
    warehouse.promote(&[view("shop", "items", Some(&v1)), view("shop", "orders", Some(&v1))]).await.unwrap();

    let missing = versioned("missing", "v9");
    let error = warehouse
        .promote(&[
            view("shop", "items", Some(&v2)),
            view("shop__new", "items", Some(&v2)),
            view("shop", "orders", None),
            view("shop", "missing", Some(&missing)),
        ])
        .await
        .unwrap_err();
    assert!(!error.is_transient(), "a missing table is persistent: {error}");

    assert_eq!(warehouse.view_target("shop", "items").await.unwrap().as_deref(), Some("sluice__shop.shop__items__v1"));
    assert_eq!(count(warehouse.as_mut(), "shop.items").await, 1);
    assert_eq!(warehouse.view_target("shop", "orders").await.unwrap().as_deref(), Some("sluice__shop.shop__items__v1"));
    assert_eq!(count(warehouse.as_mut(), "shop.orders").await, 1);
    assert_eq!(warehouse.view_target("shop__new", "items").await.unwrap(), None);
    assert_eq!(warehouse.view_target("shop", "missing").await.unwrap(), None);
    assert_eq!(
        count(warehouse.as_mut(), "information_schema.schemata WHERE schema_name = 'shop__new'").await,
        0,
        "the new schema was rolled back too"
    );
}

async fn checksum_compares_contents(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(ITEMS).await.unwrap();
    let (ascending, descending, duplicated) = (versioned("a", "v1"), versioned("b", "v1"), versioned("c", "v1"));
    for copy in [&ascending, &descending, &duplicated] {
        warehouse.ensure_table(copy, &[], ITEMS_QUERY).await.unwrap();
    }
    warehouse.replace_all(&ascending, "SELECT id, name FROM raw.items ORDER BY id", &[]).await.unwrap();
    warehouse.replace_all(&descending, "SELECT id, name FROM raw.items ORDER BY id DESC", &[]).await.unwrap();
    warehouse
        .replace_all(
            &duplicated,
            "SELECT id, name FROM raw.items UNION ALL SELECT id, name FROM raw.items WHERE id = 1",
            &[],
        )
        .await
        .unwrap();

    let first = warehouse.checksum("sluice__shop", "shop__a__v1").await.unwrap();
    let second = warehouse.checksum("sluice__shop", "shop__b__v1").await.unwrap();
    assert_eq!(first, second, "insertion order does not matter");
    assert_eq!(first.rows, 3);
    assert_ne!(warehouse.checksum("sluice__shop", "shop__c__v1").await.unwrap(), first, "duplicates count");

    // A view reading the table has the table's checksum.
    warehouse.promote(&[view("shop", "a", Some(&ascending))]).await.unwrap();
    assert_eq!(warehouse.checksum("shop", "a").await.unwrap(), first);

    warehouse.upsert(&descending, &["id".to_string()], "SELECT 2 AS id, 'changed' AS name", &[]).await.unwrap();
    let changed = warehouse.checksum("sluice__shop", "shop__b__v1").await.unwrap();
    assert_eq!(changed.rows, 3);
    assert_ne!(changed.checksum, first.checksum, "one changed value changes the checksum");

    let empty = versioned("empty", "v1");
    warehouse.ensure_table(&empty, &[], ITEMS_QUERY).await.unwrap();
    assert_eq!(warehouse.checksum("sluice__shop", "shop__empty__v1").await.unwrap().rows, 0);
    assert!(!warehouse.checksum("nowhere", "nothing").await.unwrap_err().is_transient());
}

async fn errors_are_classified_and_the_connection_survives(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    let syntax = warehouse.execute("SELEC 1").await.unwrap_err();
    assert!(!syntax.is_transient(), "{syntax}");
    assert!(matches!(syntax, sluice_engine::EngineError::Statement { .. }), "{syntax:?}");

    let missing = warehouse.query_i64("SELECT COUNT(*) FROM nowhere.nothing").await.unwrap_err();
    assert!(!missing.is_transient(), "{missing}");
    assert!(missing.to_string().contains("nothing"), "the engine's text is kept: {missing}");

    let absent_table = warehouse
        .replace_interval(
            &table("absent"),
            TimeColumn::Native("ds"),
            days("2024-01-01", "2024-01-02"),
            "SELECT CAST('2024-01-01' AS DATE) AS ds",
            &[],
        )
        .await
        .unwrap_err();
    assert!(!absent_table.is_transient(), "{absent_table}");

    let type_error = warehouse.query_i64("SELECT CAST('abc' AS INT)").await.unwrap_err();
    assert!(!type_error.is_transient(), "{type_error}");

    // A transaction the failing statements opened does not poison the connection.
    warehouse.execute("BEGIN; CREATE SCHEMA half; SELECT * FROM nowhere.nothing; COMMIT").await.unwrap_err();
    warehouse.ping().await.unwrap();
    assert_eq!(scalar(warehouse.as_mut(), "SELECT 2").await, Some(2));
    assert_eq!(count(warehouse.as_mut(), "information_schema.schemata WHERE schema_name = 'half'").await, 0);
}

async fn drop_table_drops_tables_and_views(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(ITEMS).await.unwrap();
    let items = table("items");
    warehouse.ensure_table(&items, &[], ITEMS_QUERY).await.unwrap();
    warehouse.drop_table(&items).await.unwrap();
    warehouse.drop_table(&items).await.unwrap();
    let remaining = "information_schema.tables WHERE table_schema = 'sluice__shop' AND table_name = 'shop__items__v1'";
    assert_eq!(count(warehouse.as_mut(), remaining).await, 0);

    let physical_view = versioned("cheap", "v1");
    warehouse.create_physical_view(&physical_view, ITEMS_QUERY).await.unwrap();
    assert!(warehouse.view_target("sluice__shop", "shop__cheap__v1").await.unwrap().is_some());
    warehouse.drop_table(&physical_view).await.unwrap();
    assert_eq!(warehouse.view_target("sluice__shop", "shop__cheap__v1").await.unwrap(), None);
    warehouse.drop_table(&versioned("never", "v1")).await.unwrap();
}

async fn query_i64_reads_integers_and_nothing(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    assert_eq!(scalar(warehouse.as_mut(), "SELECT 40 + 2").await, Some(42));
    assert_eq!(scalar(warehouse.as_mut(), "SELECT CAST(7 AS SMALLINT)").await, Some(7));
    assert_eq!(scalar(warehouse.as_mut(), "SELECT CAST(NULL AS BIGINT)").await, None);
    assert_eq!(scalar(warehouse.as_mut(), "SELECT 1 WHERE 1 = 0").await, None);
    assert_eq!(scalar(warehouse.as_mut(), "SELECT SUM(x) FROM (SELECT CAST(5 AS BIGINT) AS x) AS v").await, Some(5));
}

async fn identifiers_are_quoted(fixture: Fixture) {
    let mut warehouse = fixture.open().await;
    warehouse.execute(ITEMS).await.unwrap();
    let odd =
        PhysicalTable { schema: "odd \"schema\"".to_string(), table: "we\"ird; DROP TABLE raw.items; --".to_string() };
    warehouse.ensure_table(&odd, &[], ITEMS_QUERY).await.unwrap();
    assert_eq!(warehouse.replace_all(&odd, ITEMS_QUERY, &[]).await.unwrap(), 3);
    assert_eq!(warehouse.checksum(&odd.schema, &odd.table).await.unwrap().rows, 3);
    warehouse.promote(&[view("odd \"schema\"", "a view", Some(&odd))]).await.unwrap();
    assert_eq!(count(warehouse.as_mut(), "\"odd \"\"schema\"\"\".\"a view\"").await, 3);
    warehouse.drop_table(&PhysicalTable { schema: odd.schema.clone(), table: "a view".to_string() }).await.unwrap();
    warehouse.drop_table(&odd).await.unwrap();
    assert_eq!(count(warehouse.as_mut(), "raw.items").await, 3, "nothing was injected");
}
