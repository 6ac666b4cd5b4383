//! SCD_TYPE_2 writes: the statement that rebuilds a slowly-changing-dimension table from its
//! rows and a run's query, as SQLMesh computes it. Engine-neutral SQL (PostgreSQL and DuckDB):
//! each engine's `Warehouse::rebuild` runs it so that it reads the table as it was.
//!
//! The table holds every version of every key: the query's columns, then `valid_from` and
//! `valid_to` (NULL on the current version). One run keeps the closed versions, closes the
//! current versions that changed (and, with `invalidate_hard_deletes`, those whose key is gone
//! from the query), adds a current version for each changed or new key, and dates them by
//! SQLMesh's rules: a key seen for the first time is valid from 1970-01-01 by time (or from its
//! `updated_at` with `updated_at_as_valid_from`), by column from the execution time except on
//! the table's first run; a changed key's new version is valid from its `updated_at` (by time)
//! or the execution time (by column).

use sluice_core::interval::Timestamp;
use sluice_core::model::{ScdChange, ScdType2};
use sluice_core::names::PhysicalTable;

use crate::error::EngineError;
use crate::sql::{physical_name, query_body, quote_identifier, timestamp_literal};

const EPOCH: &str = "CAST('1970-01-01 00:00:00' AS TIMESTAMP)";

/// The query a new SCD_TYPE_2 table takes its shape from: the model's query with the two
/// validity columns after its own (what `ensure_table` creates it from).
pub fn scd_type_2_shape(scd: &ScdType2, query: &str) -> String {
    format!(
        "SELECT *, CAST(NULL AS TIMESTAMP) AS {}, CAST(NULL AS TIMESTAMP) AS {} FROM ({}) AS \"sluice_scd_source\"",
        quote_identifier(&scd.valid_from),
        quote_identifier(&scd.valid_to),
        query_body(query)
    )
}

/// Declared columns with the validity columns SQLMesh adds (by time, `updated_at` typed as
/// a timestamp).
pub fn scd_type_2_columns(scd: &ScdType2, declared: &[(String, String)]) -> Vec<(String, String)> {
    if declared.is_empty() {
        return Vec::new();
    }
    let mut columns: Vec<(String, String)> = declared.to_vec();
    if let ScdChange::ByTime { updated_at, .. } = &scd.change {
        for (name, column_type) in &mut columns {
            if name.eq_ignore_ascii_case(updated_at) {
                *column_type = "TIMESTAMP".to_string();
            }
        }
    }
    columns.push((scd.valid_from.clone(), "TIMESTAMP".to_string()));
    columns.push((scd.valid_to.clone(), "TIMESTAMP".to_string()));
    columns
}

/// The rows an SCD_TYPE_2 table holds after a run: its closed versions, its current versions
/// (closed where they changed) and the new current versions. `columns` are the table's, in
/// order; `first` says the table has no run recorded (its rows are then ignored, as SQLMesh
/// truncates it).
pub fn scd_type_2_query(
    table: &PhysicalTable,
    scd: &ScdType2,
    columns: &[String],
    query: &str,
    execution_time: Timestamp,
    first: bool,
) -> Result<String, EngineError> {
    let q = |name: &str| quote_identifier(name);
    let has = |name: &str| columns.iter().any(|column| column.eq_ignore_ascii_case(name));
    for needed in [&scd.valid_from, &scd.valid_to].into_iter().chain(&scd.unique_key) {
        if !has(needed) {
            return Err(EngineError::invalid_input(format!(
                "SCD_TYPE_2 table {table} has no column {needed:?} (its columns: {})",
                columns.join(", ")
            )));
        }
    }
    let managed = |column: &String| column == &scd.valid_from || column == &scd.valid_to;
    let plain: Vec<&String> = columns.iter().filter(|column| !managed(column)).collect();
    let (from, to) = (q(&scd.valid_from), q(&scd.valid_to));
    let joined = |column: &str| format!("\"joined\".{}", q(column));
    let old = |column: &str| format!("\"joined\".{}", q(&format!("t_{column}")));
    let all = columns.iter().map(|column| q(column)).collect::<Vec<_>>().join(", ");
    let keys = scd.unique_key.iter().map(|key| q(key)).collect::<Vec<_>>().join(", ");
    let key_match = |left: &str, right: &str| {
        scd.unique_key
            .iter()
            .map(|key| format!("\"{left}\".{} = \"{right}\".{}", q(key), q(key)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let execution = timestamp_literal(execution_time);
    let deleted = scd.invalidate_hard_deletes.then_some("\"joined\".\"_exists\" IS NULL");

    // Per kind: the source's columns, when a row changed, its closing and opening times.
    let (source_columns, changed, valid_to, valid_from, inserted_from) = match &scd.change {
        ScdChange::ByTime { updated_at, updated_at_as_valid_from } => {
            if !has(updated_at) {
                return Err(EngineError::invalid_input(format!(
                    "SCD_TYPE_2_BY_TIME table {table} has no updated_at column {updated_at:?}"
                )));
            }
            let source = plain
                .iter()
                .map(|column| {
                    if *column == updated_at {
                        format!("CAST({} AS TIMESTAMP) AS {}", q(column), q(column))
                    } else {
                        q(column)
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            let changed = format!("{} > {}", joined(updated_at), old(updated_at));
            let deleted_case = deleted.map(|test| format!(" WHEN {test} THEN {execution}")).unwrap_or_default();
            let valid_to = format!(
                "CASE WHEN {changed} THEN {} {deleted_case} ELSE {} END",
                joined(updated_at),
                old(&scd.valid_to)
            );
            let start = if *updated_at_as_valid_from { joined(updated_at) } else { EPOCH.to_string() };
            let valid_from = format!(
                "CASE WHEN {t_from} IS NULL AND \"latest_deleted\".\"_exists\" IS NOT NULL THEN \
                 CASE WHEN \"latest_deleted\".{to} > {u} THEN \"latest_deleted\".{to} ELSE {u} END \
                 WHEN {t_from} IS NULL THEN {start} ELSE {t_from} END",
                t_from = old(&scd.valid_from),
                u = joined(updated_at),
            );
            (source, changed, valid_to, valid_from, joined(updated_at))
        }
        ScdChange::ByColumn { columns: checked, execution_time_as_valid_from, updated_at } => {
            let checked: Vec<&String> = match checked {
                Some(checked) => checked.iter().collect(),
                None => plain.clone(),
            };
            for column in &checked {
                if !has(column) {
                    return Err(EngineError::invalid_input(format!(
                        "SCD_TYPE_2_BY_COLUMN table {table} has no column {column:?} to compare"
                    )));
                }
            }
            let source = plain.iter().map(|column| q(column)).collect::<Vec<_>>().join(", ");
            let differs = checked
                .iter()
                .map(|column| {
                    let (new, old) = (joined(column), old(column));
                    format!(
                        "{new} <> {old} OR ({old} IS NULL AND {new} IS NOT NULL) OR ({old} IS NOT NULL AND {new} IS NULL)"
                    )
                })
                .collect::<Vec<_>>()
                .join(" OR ");
            let keyed = scd
                .unique_key
                .iter()
                .map(|key| format!("{} IS NOT NULL AND {} IS NOT NULL", old(key), joined(key)))
                .collect::<Vec<_>>()
                .join(" AND ");
            let changed = format!("({keyed}) AND ({differs})");
            let time = match updated_at {
                Some(column) => format!("CAST({} AS TIMESTAMP)", joined(column)),
                None => execution.clone(),
            };
            let closes = match deleted {
                Some(test) => format!("{test} OR ({changed})"),
                None => changed.clone(),
            };
            let valid_to = format!("CASE WHEN {closes} THEN {time} ELSE {} END", old(&scd.valid_to));
            let start = if *execution_time_as_valid_from || !first { time.clone() } else { EPOCH.to_string() };
            let valid_from = format!("COALESCE({}, {start})", old(&scd.valid_from));
            (source, changed, valid_to, valid_from, time)
        }
    };

    let existing_filter = if first { " WHERE FALSE" } else { "" };
    let prefixed = columns.iter().map(|column| format!("\"latest\".{} AS {}", q(column), q(&format!("t_{column}"))));
    let from_source = plain.iter().map(|column| format!("\"source\".{} AS {}", q(column), q(column)));
    let joined_columns = std::iter::once("\"source\".\"_exists\" AS \"_exists\"".to_string())
        .chain(prefixed)
        .chain(from_source)
        .collect::<Vec<_>>()
        .join(", ");
    let kept = plain
        .iter()
        .map(|column| format!("COALESCE({}, {}) AS {}", old(column), joined(column), q(column)))
        .collect::<Vec<_>>()
        .join(", ");
    let inserted = plain.iter().map(|column| q(column)).collect::<Vec<_>>().join(", ");
    let deleted_keys = scd
        .unique_key
        .iter()
        .enumerate()
        .map(|(index, key)| format!("{} AS \"_key{index}\"", q(key)))
        .collect::<Vec<_>>()
        .join(", ");
    let deleted_match = scd
        .unique_key
        .iter()
        .enumerate()
        .map(|(index, key)| format!("{} = \"latest_deleted\".\"_key{index}\"", joined(key)))
        .collect::<Vec<_>>()
        .join(" AND ");
    Ok(format!(
        "WITH \"source\" AS (SELECT DISTINCT ON ({keys}) TRUE AS \"_exists\", {source_columns} FROM ({query}) AS \"raw_source\"), \
         \"existing\" AS (SELECT {all}, TRUE AS \"_exists\" FROM {target}{existing_filter}), \
         \"static\" AS (SELECT * FROM \"existing\" WHERE {to} IS NOT NULL), \
         \"latest\" AS (SELECT * FROM \"existing\" WHERE {to} IS NULL), \
         \"latest_deleted\" AS (SELECT TRUE AS \"_exists\", {deleted_keys}, MAX({to}) AS {to} FROM \"static\" GROUP BY {keys}), \
         \"joined\" AS (SELECT {joined_columns} FROM \"latest\" LEFT JOIN \"source\" ON {on} \
           UNION ALL SELECT {joined_columns} FROM \"latest\" RIGHT JOIN \"source\" ON {on} WHERE \"latest\".\"_exists\" IS NULL), \
         \"updated_rows\" AS (SELECT {kept}, {valid_from} AS {from}, {valid_to} AS {to} \
           FROM \"joined\" LEFT JOIN \"latest_deleted\" ON {deleted_match}), \
         \"inserted_rows\" AS (SELECT {inserted}, {inserted_from} AS {from}, CAST(NULL AS TIMESTAMP) AS {to} \
           FROM \"joined\" WHERE {changed}) \
         SELECT {all} FROM \"static\" UNION ALL SELECT {all} FROM \"updated_rows\" UNION ALL SELECT {all} FROM \"inserted_rows\"",
        query = query_body(query),
        target = physical_name(table),
        on = key_match("latest", "source"),
    ))
}
