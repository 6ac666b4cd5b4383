//! Translates a model's query from the dialect it is written in to the dialect of the engine
//! that runs it, where the two disagree on meaning or spelling — what SQLMesh does by rendering
//! every query for its gateway. Only the differences between the dialects sluice's engines run
//! are covered; a query in the engine's own dialect is left as written.

use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, CastKind, DataType, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList,
    FunctionArguments, Ident, ObjectName, Query, Value, visit_expressions_mut,
};

/// Rewrites `query`, written in `from`, so that `to` computes the same rows.
pub fn translate(query: &mut Query, from: &str, to: &str) {
    if is_duckdb(from) && is_postgres(to) {
        let _ = visit_expressions_mut(query, |expr| {
            duckdb_to_postgres(expr);
            ControlFlow::<()>::Continue(())
        });
    }
}

/// Postgres' time format patterns and the strftime directives they stand for (sqlglot's, as
/// SQLMesh reads a postgres model's `time_column` format).
const POSTGRES_TIME_PATTERNS: &[(&str, &str)] = &[
    ("FMHH12", "%-I"),
    ("FMHH24", "%-H"),
    ("TMMonth", "%B"),
    ("FMDDD", "%-j"),
    ("TMDay", "%A"),
    ("FMDD", "%-d"),
    ("FMMI", "%-M"),
    ("FMMM", "%-m"),
    ("FMSS", "%-S"),
    ("TMMon", "%b"),
    ("HH12", "%I"),
    ("HH24", "%H"),
    ("TMDy", "%a"),
    ("yyyy", "%Y"),
    ("YYYY", "%Y"),
    ("ddd", "%j"),
    ("DDD", "%j"),
    ("dd", "%d"),
    ("DD", "%d"),
    ("mi", "%M"),
    ("MI", "%M"),
    ("mm", "%m"),
    ("MM", "%m"),
    ("OF", "%z"),
    ("ss", "%S"),
    ("SS", "%S"),
    ("TZ", "%Z"),
    ("US", "%f"),
    ("ww", "%U"),
    ("WW", "%U"),
    ("yy", "%y"),
    ("YY", "%y"),
    ("d", "%u"),
    ("D", "%u"),
];

/// A `time_column` format written in `dialect`'s convention as a strftime format: a postgres
/// model writes `YYYYMMDD` (each pattern replaced, longest first, as SQLMesh reads it); DuckDB
/// and the others write strftime already.
pub fn time_format_as_strftime(dialect: &str, format: &str) -> String {
    if !is_postgres(dialect) {
        return format.to_string();
    }
    let mut converted = String::with_capacity(format.len() + 8);
    let mut rest = format;
    'scan: while let Some(first) = rest.chars().next() {
        for (pattern, directive) in POSTGRES_TIME_PATTERNS {
            if let Some(after) = rest.strip_prefix(pattern) {
                converted.push_str(directive);
                rest = after;
                continue 'scan;
            }
        }
        converted.push(first);
        rest = &rest[first.len_utf8()..];
    }
    converted
}

fn is_duckdb(dialect: &str) -> bool {
    dialect.eq_ignore_ascii_case("duckdb")
}

fn is_postgres(dialect: &str) -> bool {
    dialect.eq_ignore_ascii_case("postgres") || dialect.eq_ignore_ascii_case("postgresql")
}

/// One expression, its children already translated.
fn duckdb_to_postgres(expr: &mut Expr) {
    match expr {
        // DuckDB's `/` divides as floating point and gives NULL for a zero divisor; PostgreSQL's
        // divides integers as integers and fails on zero.
        Expr::BinaryOp { left, op: BinaryOperator::Divide, right } => {
            let numerator = std::mem::replace(left.as_mut(), Expr::value(Value::Null));
            **left = Expr::Cast {
                kind: CastKind::Cast,
                expr: Box::new(numerator),
                data_type: DataType::DoublePrecision,
                format: None,
            };
            let denominator = std::mem::replace(right.as_mut(), Expr::value(Value::Null));
            **right = call("NULLIF", vec![denominator, Expr::value(Value::Number("0".to_string(), false))]);
        }
        // `a // b`: integer division.
        Expr::BinaryOp { left, op: BinaryOperator::DuckIntegerDivide, right } => {
            let numerator = std::mem::replace(left.as_mut(), Expr::value(Value::Null));
            let denominator = std::mem::replace(right.as_mut(), Expr::value(Value::Null));
            *expr = call("DIV", vec![numerator, denominator]);
        }
        Expr::Cast { data_type, .. } => {
            if let Some(translated) = postgres_type(data_type) {
                *data_type = translated;
            }
        }
        _ => {}
    }
}

/// DuckDB type names PostgreSQL spells differently (or reads as another width).
fn postgres_type(data_type: &DataType) -> Option<DataType> {
    Some(match data_type {
        DataType::Double(_) | DataType::Float8 | DataType::Float64 => DataType::DoublePrecision,
        // DuckDB's FLOAT is four bytes; PostgreSQL's is eight.
        DataType::Float(_) | DataType::Float4 | DataType::Float32 => DataType::Real,
        DataType::TinyInt(_) => DataType::SmallInt(None),
        DataType::Int64 => DataType::BigInt(None),
        DataType::String(_) => DataType::Text,
        DataType::Blob(_) => DataType::Bytea,
        DataType::Datetime(_) => DataType::Timestamp(None, sqlparser::ast::TimezoneInfo::None),
        _ => return None,
    })
}

fn call(name: &str, arguments: Vec<Expr>) -> Expr {
    Expr::Function(Function {
        name: ObjectName::from(vec![Ident::new(name)]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(FunctionArgumentList {
            duplicate_treatment: None,
            args: arguments.into_iter().map(|argument| FunctionArg::Unnamed(FunctionArgExpr::Expr(argument))).collect(),
            clauses: Vec::new(),
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_time_formats_read_as_strftime() {
        assert_eq!(time_format_as_strftime("postgres", "YYYYMMDD"), "%Y%m%d");
        assert_eq!(time_format_as_strftime("postgres", "YYYY/MM/DD HH24:MI"), "%Y/%m/%d %H:%M");
        assert_eq!(time_format_as_strftime("postgres", "FMDD.FMMM.YY"), "%-d.%-m.%y");
        assert_eq!(time_format_as_strftime("duckdb", "%Y%m%d"), "%Y%m%d");
    }
    use crate::query::parse_query;

    fn translated(sql: &str, from: &str, to: &str) -> String {
        let mut query = parse_query(sql, from).unwrap().query;
        translate(&mut query, from, to);
        query.to_string()
    }

    /// The expectations are what SQLMesh 0.236's sqlglot prints for the same transpilation.
    #[test]
    fn duckdb_division_and_types_read_the_same_on_postgres() {
        assert_eq!(
            translated(
                "SELECT a / b, SUM(a) / COUNT(*), x::DOUBLE, CAST(y AS FLOAT), a // b FROM t",
                "duckdb",
                "postgres"
            ),
            "SELECT CAST(a AS DOUBLE PRECISION) / NULLIF(b, 0), CAST(SUM(a) AS DOUBLE PRECISION) / NULLIF(COUNT(*), 0), \
             x::DOUBLE PRECISION, CAST(y AS REAL), DIV(a, b) FROM t"
        );
    }

    #[test]
    fn a_query_in_the_engines_own_dialect_is_left_as_written() {
        let sql = "SELECT a / b, CAST(x AS DOUBLE PRECISION) FROM t";
        assert_eq!(translated(sql, "postgres", "postgres"), sql);
        assert_eq!(translated("SELECT a / b FROM t", "duckdb", "duckdb"), "SELECT a / b FROM t");
    }
}
