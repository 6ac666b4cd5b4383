//! SQL text shared by the adapters: identifier quoting, literals, interval filters, seed and view statements.

use std::collections::BTreeSet;

use sluice_core::interval::{Interval, Timestamp};
use sluice_core::model::SeedData;
use sluice_core::names::PhysicalTable;

use crate::{EngineError, TimeColumn, ViewUpdate};

/// The subquery alias every generated statement gives the model's query.
pub(crate) const ROWS_ALIAS: &str = "\"sluice_rows\"";

/// Seed rows per `INSERT … VALUES` statement, so a large seed never becomes one giant statement.
const SEED_ROWS_PER_INSERT: usize = 500;

/// Which engine a statement is written for, where their SQL differs (declared column types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    #[cfg_attr(not(feature = "duckdb"), allow(dead_code))]
    DuckDb,
    Postgres,
}

/// `name` as a double-quoted identifier (embedded quotes doubled), so no name can inject SQL.
pub(crate) fn quote_identifier(name: &str) -> String {
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('"');
    for character in name.chars() {
        if character == '"' {
            quoted.push('"');
        }
        quoted.push(character);
    }
    quoted.push('"');
    quoted
}

/// `"schema"."name"`.
pub(crate) fn qualified_name(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_identifier(schema), quote_identifier(name))
}

/// The quoted `"schema"."table"` of a physical table.
pub(crate) fn physical_name(table: &PhysicalTable) -> String {
    qualified_name(&table.schema, &table.table)
}

/// `text` as a single-quoted SQL string literal (embedded quotes doubled).
pub(crate) fn string_literal(text: &str) -> String {
    let mut literal = String::with_capacity(text.len() + 2);
    literal.push('\'');
    for character in text.chars() {
        if character == '\'' {
            literal.push('\'');
        }
        literal.push(character);
    }
    literal.push('\'');
    literal
}

/// `CAST('2024-01-01 00:00:00' AS TIMESTAMP)`: compares with DATE and TIMESTAMP columns on every engine.
pub(crate) fn timestamp_literal(timestamp: Timestamp) -> String {
    format!("CAST('{timestamp}' AS TIMESTAMP)")
}

/// The query without trailing semicolons and whitespace, ready to be wrapped in a subquery.
pub(crate) fn query_body(query: &str) -> &str {
    query.trim().trim_end_matches(|c: char| c == ';' || c.is_whitespace())
}

/// `"column" >= 'start' AND "column" < 'end'`. Bounds at midnight are plain `'YYYY-MM-DD'`
/// strings, which the engine reads as the column's type: a DATE or TIMESTAMP column compares
/// them as times, a text column holding `YYYY-MM-DD` dates (SQLMesh's default time format) as
/// text, with the same rows. Other bounds are `CAST('…' AS TIMESTAMP)`.
pub(crate) fn interval_filter(time_column: TimeColumn<'_>, interval: Interval) -> String {
    let column = quote_identifier(time_column.name());
    if let TimeColumn::Formatted { format, numeric, .. } = time_column {
        // SQLMesh's comparison: BETWEEN the start and the end less a microsecond, formatted.
        let last = Timestamp(interval.end.0 - 1);
        let (low, high) = (interval.start.formatted(format, 0), last.formatted(format, 999_999));
        let literal = |text: String| if numeric { text } else { string_literal(&text) };
        if numeric && [&low, &high].iter().any(|bound| bound.parse::<f64>().is_err()) {
            // Not a number in this format: nothing compares (SQLMesh's statement would fail).
            return "FALSE".to_string();
        }
        return format!("{column} BETWEEN {} AND {}", literal(low), literal(high));
    }
    let midnight = |timestamp: Timestamp| timestamp.0.rem_euclid(86_400) == 0;
    let bound = |timestamp: Timestamp| {
        if midnight(interval.start) && midnight(interval.end) {
            format!("'{}'", timestamp.date_string())
        } else {
            timestamp_literal(timestamp)
        }
    };
    format!("{column} >= {} AND {column} < {}", bound(interval.start), bound(interval.end))
}

pub(crate) fn create_schema(schema: &str) -> String {
    format!("CREATE SCHEMA IF NOT EXISTS {}", quote_identifier(schema))
}

/// `CREATE TABLE IF NOT EXISTS t AS SELECT * FROM (query) AS q WHERE 1 = 0`: the query's shape, no rows.
pub(crate) fn create_table_from_query(table: &PhysicalTable, query: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} AS SELECT * FROM ({}) AS {ROWS_ALIAS} WHERE 1 = 0",
        physical_name(table),
        query_body(query)
    )
}

/// The statement creating a model's physical table if it does not exist: from its declared
/// columns when it has some (a self-referencing model reads its own table, so the table must
/// exist before its query first runs), else from the query's shape.
pub(crate) fn create_table(
    dialect: Dialect,
    table: &PhysicalTable,
    columns: &[(String, String)],
    query: &str,
) -> Result<String, EngineError> {
    if columns.is_empty() {
        return Ok(create_table_from_query(table, query));
    }
    let mut definitions = Vec::with_capacity(columns.len());
    for (name, declared) in columns {
        let sql_type = column_type(dialect, declared)
            .map_err(|expectation| EngineError::invalid_input(format!("column {name:?} of {table}: {expectation}")))?;
        definitions.push(format!("{} {sql_type}", quote_identifier(name)));
    }
    Ok(format!("CREATE TABLE IF NOT EXISTS {} ({})", physical_name(table), definitions.join(", ")))
}

pub(crate) fn delete_interval(table: &PhysicalTable, time_column: TimeColumn<'_>, interval: Interval) -> String {
    format!("DELETE FROM {} WHERE {}", physical_name(table), interval_filter(time_column, interval))
}

pub(crate) fn insert_interval(
    table: &PhysicalTable,
    time_column: TimeColumn<'_>,
    interval: Interval,
    query: &str,
) -> String {
    format!(
        "INSERT INTO {} SELECT * FROM ({}) AS {ROWS_ALIAS} WHERE {}",
        physical_name(table),
        query_body(query),
        interval_filter(time_column, interval)
    )
}

pub(crate) fn insert_all(table: &PhysicalTable, query: &str) -> String {
    format!("INSERT INTO {} SELECT * FROM ({}) AS {ROWS_ALIAS}", physical_name(table), query_body(query))
}

/// `"sluice_target"."k1" = <source>."k1" AND …` for an upsert's `DELETE … USING`.
pub(crate) fn unique_key_match(
    table: &PhysicalTable,
    unique_key: &[String],
    source: &str,
) -> Result<String, EngineError> {
    if unique_key.is_empty() {
        return Err(EngineError::invalid_input(format!("upsert into {table} needs at least one unique key column")));
    }
    let mut conditions = Vec::with_capacity(unique_key.len());
    for column in unique_key {
        let column = quote_identifier(column);
        conditions.push(format!("\"sluice_target\".{column} = {source}.{column}"));
    }
    Ok(conditions.join(" AND "))
}

/// The view statements of one promote update: drop the view if it exists, then create it when it has a target.
pub(crate) fn view_update_statements(update: &ViewUpdate) -> Vec<String> {
    let view = qualified_name(&update.schema, &update.name);
    let mut statements = vec![format!("DROP VIEW IF EXISTS {view}")];
    if let Some(target) = &update.target {
        statements.push(format!("CREATE VIEW {view} AS SELECT * FROM {}", physical_name(target)));
    }
    statements
}

/// The distinct schemas a promote creates, in first-seen order.
pub(crate) fn view_schemas(updates: &[ViewUpdate]) -> Vec<&str> {
    let mut seen = BTreeSet::new();
    let mut schemas = Vec::new();
    for update in updates {
        if seen.insert(update.schema.as_str()) {
            schemas.push(update.schema.as_str());
        }
    }
    schemas
}

/// A declared column type checked to be a plain type name — words, an optional `(precision, scale)` of digits,
/// optional `[]` — and translated to the engine's spelling (`DOUBLE` is `DOUBLE PRECISION` on PostgreSQL).
pub(crate) fn column_type(dialect: Dialect, declared: &str) -> Result<String, String> {
    let declared = declared.trim();
    if !is_plain_type(declared) {
        return Err(format!(
            "expected a plain column type such as INT, DOUBLE, DECIMAL(10, 2) or VARCHAR(20), found {declared:?}"
        ));
    }
    if dialect == Dialect::DuckDb {
        return Ok(declared.to_string());
    }
    let translated = match declared.to_ascii_uppercase().as_str() {
        "DOUBLE" => "DOUBLE PRECISION",
        "STRING" => "TEXT",
        "DATETIME" => "TIMESTAMP",
        "TINYINT" => "SMALLINT",
        "BLOB" => "BYTEA",
        "HUGEINT" => "NUMERIC(38, 0)",
        _ => declared,
    };
    Ok(translated.to_string())
}

fn is_plain_type(text: &str) -> bool {
    let Some(first) = text.chars().next() else {
        return false;
    };
    if !first.is_ascii_alphabetic() {
        return false;
    }
    let mut inside_parentheses = false;
    for character in text.chars() {
        match character {
            '(' if !inside_parentheses => inside_parentheses = true,
            ')' if inside_parentheses => inside_parentheses = false,
            '0'..='9' | ',' | ' ' if inside_parentheses => {}
            _ if inside_parentheses => return false,
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | ' ' | '[' | ']' => {}
            _ => return false,
        }
    }
    !inside_parentheses
}

/// The statements that load a seed: create the table if absent, then insert the rows in chunks.
#[derive(Debug)]
pub(crate) struct SeedStatements {
    pub create_table: String,
    pub delete_rows: String,
    pub inserts: Vec<String>,
    pub rows: u64,
}

/// Builds a seed's statements. The table has the declared columns (when none are declared, the CSV
/// header's, typed as SQLMesh infers them: `SeedData::inferred_types`); every CSV value is cast to
/// its column's type, and an empty CSV field is NULL.
pub(crate) fn seed_statements(
    dialect: Dialect,
    table: &PhysicalTable,
    declared: &[(String, String)],
    seed: &SeedData,
) -> Result<SeedStatements, EngineError> {
    let mut table_columns: Vec<(String, Option<String>)> = Vec::new();
    if declared.is_empty() {
        if seed.columns.is_empty() {
            return Err(EngineError::invalid_input(format!("the seed for {table} has no columns")));
        }
        for (column, inferred) in seed.columns.iter().zip(seed.inferred_types()) {
            // TEXT (the default below) needs no cast of its values.
            let sql_type =
                (inferred != "TEXT").then(|| column_type(dialect, inferred)).transpose().map_err(|expectation| {
                    EngineError::invalid_input(format!("column {column:?} of seed {table}: {expectation}"))
                })?;
            table_columns.push((column.clone(), sql_type));
        }
    } else {
        for (name, declared_type) in declared {
            let sql_type = column_type(dialect, declared_type).map_err(|expectation| {
                EngineError::invalid_input(format!("column {name:?} of seed {table}: {expectation}"))
            })?;
            table_columns.push((name.clone(), Some(sql_type)));
        }
    }
    let mut names = BTreeSet::new();
    for (name, _) in &table_columns {
        if !names.insert(name.as_str()) {
            return Err(EngineError::invalid_input(format!("seed {table} names column {name:?} twice")));
        }
    }

    let mut insert_columns: Vec<usize> = Vec::with_capacity(seed.columns.len());
    for seed_column in &seed.columns {
        let position = table_columns
            .iter()
            .position(|(name, _)| name == seed_column)
            .or_else(|| table_columns.iter().position(|(name, _)| name.eq_ignore_ascii_case(seed_column)));
        let Some(position) = position else {
            return Err(EngineError::invalid_input(format!(
                "the CSV of seed {table} has column {seed_column:?}, which is not among its declared columns"
            )));
        };
        if insert_columns.contains(&position) {
            return Err(EngineError::invalid_input(format!(
                "the CSV of seed {table} has column {seed_column:?} twice"
            )));
        }
        insert_columns.push(position);
    }

    let table_name = physical_name(table);
    let mut definitions = Vec::with_capacity(table_columns.len());
    for (name, sql_type) in &table_columns {
        definitions.push(format!("{} {}", quote_identifier(name), sql_type.as_deref().unwrap_or("TEXT")));
    }
    let create_table = format!("CREATE TABLE IF NOT EXISTS {table_name} ({})", definitions.join(", "));
    let column_list: Vec<String> =
        insert_columns.iter().map(|&position| quote_identifier(&table_columns[position].0)).collect();
    let insert_prefix = format!("INSERT INTO {table_name} ({}) VALUES ", column_list.join(", "));

    let mut inserts = Vec::new();
    for (chunk_index, chunk) in seed.rows.chunks(SEED_ROWS_PER_INSERT).enumerate() {
        let mut statement = insert_prefix.clone();
        for (index_in_chunk, row) in chunk.iter().enumerate() {
            if row.len() != insert_columns.len() {
                return Err(EngineError::invalid_input(format!(
                    "row {} of seed {table} has {} values, expected {}",
                    chunk_index * SEED_ROWS_PER_INSERT + index_in_chunk + 1,
                    row.len(),
                    insert_columns.len()
                )));
            }
            if index_in_chunk > 0 {
                statement.push_str(", ");
            }
            statement.push('(');
            for (value_index, (value, &position)) in row.iter().zip(&insert_columns).enumerate() {
                if value_index > 0 {
                    statement.push_str(", ");
                }
                match (&table_columns[position].1, value.is_empty()) {
                    (_, true) => statement.push_str("NULL"),
                    (None, false) => statement.push_str(&string_literal(value)),
                    (Some(sql_type), false) => {
                        statement.push_str(&format!("CAST({} AS {sql_type})", string_literal(value)))
                    }
                }
            }
            statement.push(')');
        }
        inserts.push(statement);
    }
    Ok(SeedStatements {
        create_table,
        delete_rows: format!("DELETE FROM {table_name}"),
        inserts,
        rows: seed.rows.len() as u64,
    })
}

/// The relation a view definition selects from, as `schema.table`: the (possibly quoted, possibly qualified) name
/// after the definition's last `FROM`. Used for DuckDB, which keeps the view's SQL text as written.
#[cfg_attr(not(feature = "duckdb"), allow(dead_code))]
pub(crate) fn parse_view_target(definition: &str) -> Option<String> {
    let upper = definition.to_ascii_uppercase();
    let mut from_position = None;
    let mut search_start = 0;
    while let Some(found) = upper[search_start..].find("FROM") {
        let position = search_start + found;
        let before_is_boundary = position == 0 || !is_word_byte(upper.as_bytes()[position - 1]);
        let after = position + 4;
        let after_is_boundary = after >= upper.len() || !is_word_byte(upper.as_bytes()[after]);
        if before_is_boundary && after_is_boundary {
            from_position = Some(after);
        }
        search_start = after;
    }
    let rest = definition[from_position?..].trim_start();
    let mut parts = Vec::new();
    let mut characters = rest.chars().peekable();
    loop {
        let mut part = String::new();
        if characters.peek() == Some(&'"') {
            characters.next();
            loop {
                match characters.next() {
                    Some('"') if characters.peek() == Some(&'"') => {
                        characters.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(character) => part.push(character),
                    None => return None,
                }
            }
        } else {
            while let Some(&character) = characters.peek() {
                if character.is_ascii_alphanumeric() || character == '_' {
                    part.push(character);
                    characters.next();
                } else {
                    break;
                }
            }
            if part.is_empty() {
                return None;
            }
        }
        parts.push(part);
        if characters.peek() == Some(&'.') {
            characters.next();
        } else {
            break;
        }
    }
    let start = parts.len().saturating_sub(2);
    Some(parts[start..].join("."))
}

fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

/// Creates the promotion marker table if absent (`sluice__meta.promotions`: environment → plan).
pub(crate) fn create_promotion_marker() -> [String; 2] {
    let schema = quote_identifier(crate::PROMOTION_MARKER_SCHEMA);
    let table = qualified_name(crate::PROMOTION_MARKER_SCHEMA, crate::PROMOTION_MARKER_TABLE);
    [
        format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
        format!("CREATE TABLE IF NOT EXISTS {table} (environment VARCHAR PRIMARY KEY, plan_id VARCHAR NOT NULL)"),
    ]
}

/// The statements that move an environment's promotion marker to `plan` (or delete it).
pub(crate) fn set_promotion_marker(environment: &str, plan: Option<&str>) -> Vec<String> {
    let table = qualified_name(crate::PROMOTION_MARKER_SCHEMA, crate::PROMOTION_MARKER_TABLE);
    let environment = string_literal(environment);
    let mut statements = vec![format!("DELETE FROM {table} WHERE environment = {environment}")];
    if let Some(plan) = plan {
        statements.push(format!(
            "INSERT INTO {table} (environment, plan_id) VALUES ({environment}, {})",
            string_literal(plan)
        ));
    }
    statements
}

/// Whether the promotion marker table exists (1) or not (0), on either engine.
pub(crate) fn promotion_marker_exists() -> String {
    format!(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = {} AND table_name = {}",
        string_literal(crate::PROMOTION_MARKER_SCHEMA),
        string_literal(crate::PROMOTION_MARKER_TABLE)
    )
}

/// Reads the plan an environment's marker shows.
pub(crate) fn select_promotion_marker(environment: &str, lock: bool) -> String {
    let table = qualified_name(crate::PROMOTION_MARKER_SCHEMA, crate::PROMOTION_MARKER_TABLE);
    format!(
        "SELECT plan_id FROM {table} WHERE environment = {}{}",
        string_literal(environment),
        if lock { " FOR UPDATE" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PhysicalTable {
        PhysicalTable { schema: "sluice__shop".to_string(), table: "shop__items__abc".to_string() }
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(qualified_name("s", "t"), "\"s\".\"t\"");
        assert_eq!(string_literal("it's"), "'it''s'");
        assert_eq!(query_body("  SELECT 1 ;\n; "), "SELECT 1");
    }

    #[test]
    fn interval_statements_filter_half_open() {
        let day = Interval::new(Timestamp(86_400), Timestamp(2 * 86_400));
        assert_eq!(
            delete_interval(&table(), TimeColumn::Native("ds"), day),
            "DELETE FROM \"sluice__shop\".\"shop__items__abc\" WHERE \"ds\" >= '1970-01-02' AND \"ds\" < '1970-01-03'"
        );
        assert!(
            insert_interval(&table(), TimeColumn::Native("ds"), day, "SELECT 1 AS ds;")
                .contains("FROM (SELECT 1 AS ds) AS")
        );
        let hour = Interval::new(Timestamp(3_600), Timestamp(7_200));
        assert!(delete_interval(&table(), TimeColumn::Native("ts"), hour).ends_with(
            "\"ts\" >= CAST('1970-01-01 01:00:00' AS TIMESTAMP) AND \"ts\" < CAST('1970-01-01 02:00:00' AS TIMESTAMP)"
        ));
    }

    #[test]
    fn declared_types_are_checked_and_translated() {
        assert_eq!(column_type(Dialect::Postgres, "double").unwrap(), "DOUBLE PRECISION");
        assert_eq!(column_type(Dialect::DuckDb, "DOUBLE").unwrap(), "DOUBLE");
        assert_eq!(column_type(Dialect::Postgres, "DECIMAL(10, 2)").unwrap(), "DECIMAL(10, 2)");
        assert_eq!(column_type(Dialect::Postgres, "TIMESTAMP WITH TIME ZONE").unwrap(), "TIMESTAMP WITH TIME ZONE");
        assert_eq!(column_type(Dialect::Postgres, "INT[]").unwrap(), "INT[]");
        for bad in ["", "INT; DROP TABLE x", "INT) , (SELECT 1", "DECIMAL(10", "TEXT'", "(1)", "VARCHAR(a)"] {
            assert!(column_type(Dialect::Postgres, bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn seed_statements_cast_declared_columns_and_null_empty_fields() {
        let seed = SeedData {
            columns: vec!["price".to_string(), "item_id".to_string()],
            rows: vec![vec!["1.5".to_string(), "1".to_string()], vec![String::new(), "2".to_string()]],
        };
        let declared = vec![("item_id".to_string(), "INT".to_string()), ("price".to_string(), "DOUBLE".to_string())];
        let statements = seed_statements(Dialect::Postgres, &table(), &declared, &seed).unwrap();
        assert_eq!(
            statements.create_table,
            "CREATE TABLE IF NOT EXISTS \"sluice__shop\".\"shop__items__abc\" (\"item_id\" INT, \"price\" DOUBLE PRECISION)"
        );
        assert_eq!(
            statements.inserts,
            vec![
                "INSERT INTO \"sluice__shop\".\"shop__items__abc\" (\"price\", \"item_id\") VALUES \
                 (CAST('1.5' AS DOUBLE PRECISION), CAST('1' AS INT)), (NULL, CAST('2' AS INT))"
                    .to_string()
            ]
        );
        assert_eq!(statements.rows, 2);
    }

    #[test]
    fn seed_statements_refuse_mismatched_input() {
        let declared = vec![("item_id".to_string(), "INT".to_string())];
        let unknown_column = SeedData { columns: vec!["other".to_string()], rows: vec![] };
        assert!(seed_statements(Dialect::DuckDb, &table(), &declared, &unknown_column).is_err());
        let short_row = SeedData { columns: vec!["item_id".to_string()], rows: vec![vec![]] };
        let error = seed_statements(Dialect::DuckDb, &table(), &declared, &short_row).unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid input: row 1 of seed sluice__shop.shop__items__abc has 0 values, expected 1"
        );
        let bad_type = vec![("item_id".to_string(), "INT; DROP".to_string())];
        assert!(seed_statements(Dialect::DuckDb, &table(), &bad_type, &short_row).is_err());
    }

    /// pandas' inference, which SQLMesh applies to a CSV without declared columns (the BIGINT,
    /// DOUBLE and TEXT cases are checked against SQLMesh by the differential suite).
    #[test]
    fn undeclared_seed_columns_are_typed_as_sqlmesh_types_them() {
        let seed = SeedData {
            columns: ["id", "price", "discount", "name", "flag", "empty"].map(String::from).to_vec(),
            rows: vec![
                ["1", "1.5", "", "apple", "true", ""].map(String::from).to_vec(),
                ["2", "2", "0.5", "", "False", ""].map(String::from).to_vec(),
            ],
        };
        assert_eq!(seed.inferred_types(), vec!["BIGINT", "DOUBLE", "DOUBLE", "TEXT", "BOOLEAN", "DOUBLE"]);
        let statements = seed_statements(Dialect::Postgres, &table(), &[], &seed).unwrap();
        assert!(
            statements.create_table.ends_with(
                "(\"id\" BIGINT, \"price\" DOUBLE PRECISION, \"discount\" DOUBLE PRECISION, \"name\" TEXT, \"flag\" BOOLEAN, \"empty\" DOUBLE PRECISION)"
            ),
            "{}",
            statements.create_table
        );
        assert!(
            statements.inserts[0].contains("(CAST('1' AS BIGINT), CAST('1.5' AS DOUBLE PRECISION), NULL, 'apple',")
        );
    }

    #[test]
    fn seed_rows_are_split_into_chunks() {
        let seed = SeedData {
            columns: vec!["name".to_string()],
            rows: (0..SEED_ROWS_PER_INSERT + 1).map(|index| vec![format!("n{index}")]).collect(),
        };
        let statements = seed_statements(Dialect::DuckDb, &table(), &[], &seed).unwrap();
        assert_eq!(statements.inserts.len(), 2);
        assert!(statements.create_table.ends_with("(\"name\" TEXT)"));
        assert!(statements.inserts[1].ends_with("VALUES ('n500')"));
    }

    #[test]
    fn view_targets_are_read_back_from_definitions() {
        assert_eq!(
            parse_view_target("CREATE VIEW \"shop\".\"items\" AS SELECT * FROM \"sluice__shop\".\"shop__items__abc\";"),
            Some("sluice__shop.shop__items__abc".to_string())
        );
        assert_eq!(parse_view_target("create view v as select * from db.s.t"), Some("s.t".to_string()));
        assert_eq!(parse_view_target("SELECT 1 AS fromage"), None);
    }

    #[test]
    fn view_updates_drop_then_create() {
        let update = ViewUpdate { schema: "shop".to_string(), name: "items".to_string(), target: Some(table()) };
        assert_eq!(
            view_update_statements(&update),
            vec![
                "DROP VIEW IF EXISTS \"shop\".\"items\"".to_string(),
                "CREATE VIEW \"shop\".\"items\" AS SELECT * FROM \"sluice__shop\".\"shop__items__abc\"".to_string()
            ]
        );
        let removal = ViewUpdate { target: None, ..update };
        assert_eq!(view_update_statements(&removal).len(), 1);
    }
}
