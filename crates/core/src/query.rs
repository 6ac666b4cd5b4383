//! A model's query: parsed once with sqlparser, its table references, the rewrite of model
//! references to physical tables, and the pre-split template whose only per-interval work is
//! filling in time literals.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Ident, ObjectName, ObjectNamePart, Query, SetExpr, Statement, TableAlias, TableFactor, Visit, VisitMut, Visitor,
    VisitorMut,
};
use sqlparser::dialect::{Dialect, dialect_from_str};
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError, ParserOptions};
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use crate::interval::{Interval, TimeMacro, Timestamp, render_time_macro};

/// Time macros are parsed as string literals `'__sluice_tm_<name>__'` and filled per interval.
pub const TIME_PLACEHOLDER_PREFIX: &str = "__sluice_tm_";
const TIME_PLACEHOLDER_SUFFIX: &str = "__";

/// The string literal standing for a time macro while the query is parsed and rewritten.
pub fn time_placeholder(time_macro: TimeMacro) -> String {
    format!("'{TIME_PLACEHOLDER_PREFIX}{}{TIME_PLACEHOLDER_SUFFIX}'", time_macro.name())
}

/// Shows time placeholders as the macros they stand for (`@start_ds`), for people to read.
pub fn display_macros(sql: &str) -> String {
    let opening = format!("'{TIME_PLACEHOLDER_PREFIX}");
    let mut shown = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(position) = rest.find(&opening) {
        let after = &rest[position + opening.len()..];
        let Some(end) = after.find(&format!("{TIME_PLACEHOLDER_SUFFIX}'")) else { break };
        shown.push_str(&rest[..position]);
        shown.push('@');
        shown.push_str(&after[..end]);
        rest = &after[end + TIME_PLACEHOLDER_SUFFIX.len() + 1..];
    }
    shown.push_str(rest);
    shown
}

/// The sqlparser dialect for a SQLMesh dialect name.
pub fn dialect_for(name: &str) -> Option<Box<dyn Dialect>> {
    dialect_from_str(match name {
        "postgres" | "postgresql" => "postgresql",
        "mysql" | "mariadb" => "mysql",
        other => other,
    })
}

/// A parsed model query.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelQuery {
    pub query: Box<Query>,
    /// The query printed back on one line with comments and extra whitespace gone: what is fingerprinted.
    pub normalized: String,
    /// The query printed over several lines, for diffs in a plan.
    pub pretty: String,
    /// Every table the query reads, lower-cased dotted names, without its CTEs, sorted.
    pub references: Vec<String>,
}

/// A query parse failure with the position sqlparser reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryParseError {
    pub line: u64,
    pub column: u64,
    pub message: String,
}

fn split_parser_message(message: &str) -> QueryParseError {
    // sqlparser appends " at Line: L, Column: C" to its messages.
    if let Some((head, tail)) = message.rsplit_once(" at Line: ")
        && let Some((line, column)) = tail.split_once(", Column: ")
        && let (Ok(line), Ok(column)) = (line.trim().parse(), column.trim().parse())
    {
        return QueryParseError { line, column, message: head.to_string() };
    }
    QueryParseError { line: 0, column: 0, message: message.to_string() }
}

/// Normalizes a table name the way the warehouse resolves it: unquoted parts are lower-cased.
pub fn object_name_key(name: &ObjectName) -> String {
    let mut parts = Vec::with_capacity(name.0.len());
    for part in &name.0 {
        match part {
            ObjectNamePart::Identifier(ident) if ident.quote_style.is_none() => {
                parts.push(ident.value.to_ascii_lowercase())
            }
            ObjectNamePart::Identifier(ident) => parts.push(ident.value.clone()),
            ObjectNamePart::Function(function) => parts.push(function.name.value.clone()),
        }
    }
    parts.join(".")
}

#[derive(Default)]
struct ReferenceCollector {
    ctes: BTreeSet<String>,
    tables: BTreeSet<String>,
}

impl Visitor for ReferenceCollector {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(cte.alias.name.value.to_ascii_lowercase());
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, table_factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table { name, args: None, .. } = table_factor {
            self.tables.insert(object_name_key(name));
        }
        ControlFlow::Continue(())
    }
}

/// `* EXCEPT (…)` is DuckDB's `* EXCLUDE (…)` (SQLMesh reads one as the other).
fn star_except_as_exclude(tokens: &mut [TokenWithSpan]) {
    let mut previous_star = false;
    for token in tokens.iter_mut() {
        match &token.token {
            Token::Whitespace(_) => continue,
            Token::Word(word) if previous_star && word.quote_style.is_none() && word.keyword == Keyword::EXCEPT => {
                token.token = Token::make_keyword("EXCLUDE");
            }
            _ => {}
        }
        previous_star = matches!(token.token, Token::Mul);
    }
}

/// Parses `text` (macros already replaced) as one query in `dialect`.
pub fn parse_query(text: &str, dialect_name: &str) -> Result<ModelQuery, QueryParseError> {
    let Some(dialect) = dialect_for(dialect_name) else {
        return Err(QueryParseError { line: 0, column: 0, message: format!("unknown dialect {dialect_name:?}") });
    };
    // As lenient as SQLMesh: a trailing comma before FROM (or in any list) is accepted in every
    // dialect; printing the query back drops it.
    let options = ParserOptions::new().with_trailing_commas(true);
    let statements = Tokenizer::new(dialect.as_ref(), text)
        .tokenize_with_location()
        .map_err(ParserError::from)
        .and_then(|mut tokens| {
            if dialect_name == "duckdb" {
                star_except_as_exclude(&mut tokens);
            }
            Parser::new(dialect.as_ref()).with_options(options).with_tokens_with_locations(tokens).parse_statements()
        })
        .map_err(|error| {
            let message = error.to_string();
            split_parser_message(message.strip_prefix("sql parser error: ").unwrap_or(&message))
        })?;
    let mut statements = statements.into_iter();
    let (Some(statement), None) = (statements.next(), statements.next()) else {
        return Err(QueryParseError { line: 0, column: 0, message: "expected exactly one query".to_string() });
    };
    let Statement::Query(query) = statement else {
        return Err(QueryParseError {
            line: 0,
            column: 0,
            message: "expected a query (SELECT, WITH, VALUES, ...), found another statement".to_string(),
        });
    };
    Ok(model_query_from(query))
}

impl ModelQuery {
    /// The query with `catalog.` dropped from every three-part table name in that catalog (the
    /// gateway's own), so that `catalog.schema.table` and `schema.table` name the same model.
    pub fn without_catalog(self, catalog: &str) -> ModelQuery {
        let mut query = self.query;
        let _ = VisitMut::visit(query.as_mut(), &mut CatalogStripper { catalog });
        model_query_from(query)
    }
}

struct CatalogStripper<'a> {
    catalog: &'a str,
}

impl VisitorMut for CatalogStripper<'_> {
    type Break = ();

    fn post_visit_table_factor(&mut self, table_factor: &mut TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table { name, args: None, .. } = table_factor
            && name.0.len() == 3
            && let Some(ObjectNamePart::Identifier(first)) = name.0.first()
            && first.value.to_ascii_lowercase() == self.catalog
        {
            name.0.remove(0);
        }
        ControlFlow::Continue(())
    }
}

fn model_query_from(query: Box<Query>) -> ModelQuery {
    let mut collector = ReferenceCollector::default();
    let _ = query.visit(&mut collector);
    let references =
        collector.tables.into_iter().filter(|table| table.contains('.') || !collector.ctes.contains(table)).collect();
    let normalized = query.to_string();
    let pretty = display_macros(&format!("{:#}", Statement::Query(query.clone()))) + "\n";
    ModelQuery { query, normalized, pretty, references }
}

/// What a table reference becomes in the executable query.
#[derive(Clone, Debug)]
pub enum Replacement {
    /// Another table: `schema.table`, aliased with the original table name when no alias was given.
    Table { schema: String, table: String },
    /// An EMBEDDED model, inlined as a subquery (already rendered).
    Subquery(Box<Query>),
    /// A relation of the statement run around the query (a CTE), by its unqualified name.
    Relation(String),
}

struct ReferenceRewriter<'a, F: Fn(&str) -> Option<Replacement>> {
    resolve: &'a F,
}

impl<F: Fn(&str) -> Option<Replacement>> VisitorMut for ReferenceRewriter<'_, F> {
    type Break = ();

    fn post_visit_table_factor(&mut self, table_factor: &mut TableFactor) -> ControlFlow<()> {
        let TableFactor::Table { name, alias, args: None, .. } = table_factor else {
            return ControlFlow::Continue(());
        };
        let Some(replacement) = (self.resolve)(&object_name_key(name)) else {
            return ControlFlow::Continue(());
        };
        let alias = alias.take().unwrap_or_else(|| {
            let last = match name.0.last() {
                Some(ObjectNamePart::Identifier(ident)) => ident.clone(),
                _ => Ident::new("t"),
            };
            TableAlias { explicit: true, name: last, columns: Vec::new(), at: None }
        });
        match replacement {
            Replacement::Table { schema, table } => {
                *name = ObjectName(vec![
                    ObjectNamePart::Identifier(Ident::new(schema)),
                    ObjectNamePart::Identifier(Ident::new(table)),
                ]);
                if let TableFactor::Table { alias: slot, .. } = table_factor {
                    *slot = Some(alias);
                }
            }
            Replacement::Relation(relation) => {
                *name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(relation))]);
                if let TableFactor::Table { alias: slot, .. } = table_factor {
                    *slot = Some(alias);
                }
            }
            Replacement::Subquery(subquery) => {
                *table_factor = TableFactor::Derived { lateral: false, subquery, alias: Some(alias), sample: None };
            }
        }
        ControlFlow::Continue(())
    }
}

/// Rewrites every table reference `resolve` knows; leaves the rest (external tables) as written.
pub fn rewrite_references(query: &Query, resolve: &impl Fn(&str) -> Option<Replacement>) -> Box<Query> {
    let mut rewritten = Box::new(query.clone());
    let _ = VisitMut::visit(rewritten.as_mut(), &mut ReferenceRewriter { resolve });
    rewritten
}

/// One piece of a pre-split query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Text(String),
    Time(TimeMacro),
}

/// An executable query split at its time literals; filling it is the only per-interval work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryTemplate {
    pub segments: Vec<Segment>,
    text_length: usize,
}

impl QueryTemplate {
    /// Splits `sql` at every time placeholder.
    pub fn from_sql(sql: &str) -> QueryTemplate {
        let mut segments = Vec::new();
        let mut rest = sql;
        let opening = format!("'{TIME_PLACEHOLDER_PREFIX}");
        while let Some(position) = rest.find(&opening) {
            let after = &rest[position + opening.len()..];
            let Some(end) = after.find(&format!("{TIME_PLACEHOLDER_SUFFIX}'")) else { break };
            let Some(time_macro) = TimeMacro::from_name(&after[..end]) else { break };
            if position > 0 {
                segments.push(Segment::Text(rest[..position].to_string()));
            }
            segments.push(Segment::Time(time_macro));
            rest = &after[end + TIME_PLACEHOLDER_SUFFIX.len() + 1..];
        }
        if !rest.is_empty() {
            segments.push(Segment::Text(rest.to_string()));
        }
        let text_length = segments.iter().map(|s| if let Segment::Text(t) = s { t.len() } else { 48 }).sum();
        QueryTemplate { segments, text_length }
    }

    /// The executable SQL for one interval.
    pub fn fill(&self, interval: Interval, execution_time: Timestamp) -> String {
        let mut sql = String::with_capacity(self.text_length);
        for segment in &self.segments {
            match segment {
                Segment::Text(text) => sql.push_str(text),
                Segment::Time(time_macro) => sql.push_str(&render_time_macro(*time_macro, interval, execution_time)),
            }
        }
        sql
    }

    /// Whether the query reads any time macro (an interval changes what it selects).
    pub fn uses_time(&self) -> bool {
        self.segments.iter().any(|segment| matches!(segment, Segment::Time(_)))
    }
}

/// Whether `new` differs from `old` only by projections added to the outermost SELECT.
/// `None` when the two cannot be compared (the old definition does not parse).
pub fn only_adds_projections(old_normalized: &str, new: &ModelQuery, dialect_name: &str) -> Option<bool> {
    let old = parse_query(old_normalized, dialect_name).ok()?;
    let (SetExpr::Select(old_select), SetExpr::Select(new_select)) = (old.query.body.as_ref(), new.query.body.as_ref())
    else {
        return Some(false);
    };
    if new_select.projection.len() <= old_select.projection.len() {
        return Some(false);
    }
    // Every old projection must appear in the new list, in order.
    let mut new_items = new_select.projection.iter();
    for old_item in &old_select.projection {
        if !new_items.any(|new_item| new_item == old_item) {
            return Some(false);
        }
    }
    let mut comparable = new.query.clone();
    if let SetExpr::Select(select) = comparable.body.as_mut() {
        select.projection = old_select.projection.clone();
    }
    Some(comparable == old.query)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interval::TimeMacro;

    #[test]
    fn references_exclude_ctes_and_keep_external_tables() {
        let query = parse_query(
            "WITH recent AS (SELECT * FROM Sushi.Orders) SELECT * FROM recent JOIN raw.events e ON TRUE JOIN \"Mixed\".t ON TRUE",
            "duckdb",
        )
        .unwrap();
        assert_eq!(query.references, vec!["Mixed.t", "raw.events", "sushi.orders"]);
    }

    #[test]
    fn whitespace_and_comments_do_not_change_the_normalized_text() {
        let a = parse_query("SELECT a,\n  b -- note\nFROM x.y", "duckdb").unwrap();
        let b = parse_query("select a, b from x.y /* other */", "duckdb").unwrap();
        assert_eq!(a.normalized.to_lowercase(), b.normalized.to_lowercase());
    }

    #[test]
    fn a_trailing_comma_before_from_parses_in_every_dialect_and_is_printed_without() {
        for dialect in ["postgres", "duckdb", "mysql"] {
            let query = parse_query("SELECT\n  a,\n  b,\nFROM x.y", dialect).unwrap();
            assert_eq!(query.normalized, "SELECT a, b FROM x.y", "{dialect}");
        }
    }

    #[test]
    fn star_except_reads_as_duckdbs_star_exclude() {
        let query =
            parse_query("SELECT * EXCEPT (dup), t.* EXCEPT (a, b) FROM t EXCEPT SELECT * FROM u", "duckdb").unwrap();
        assert_eq!(query.normalized, "SELECT * EXCLUDE (dup), t.* EXCLUDE (a, b) FROM t EXCEPT SELECT * FROM u");
    }

    #[test]
    fn rewrites_models_to_physical_tables_and_inlines_embedded_ones() {
        let embedded = parse_query("SELECT 1 AS one", "duckdb").unwrap();
        let query = parse_query("SELECT o.id, one FROM sushi.orders o, sushi.helper, raw.x", "duckdb").unwrap();
        let rewritten = rewrite_references(&query.query, &|name: &str| match name {
            "sushi.orders" => {
                Some(Replacement::Table { schema: "sluice__sushi".into(), table: "sushi__orders__v1".into() })
            }
            "sushi.helper" => Some(Replacement::Subquery(embedded.query.clone())),
            _ => None,
        });
        assert_eq!(
            rewritten.to_string(),
            "SELECT o.id, one FROM sluice__sushi.sushi__orders__v1 o, (SELECT 1 AS one) AS helper, raw.x"
        );
    }

    #[test]
    fn templates_fill_time_literals() {
        let start = time_placeholder(TimeMacro::from_name("start_ds").unwrap());
        let query = parse_query(&format!("SELECT * FROM t WHERE ds BETWEEN {start} AND {start}"), "duckdb").unwrap();
        let template = QueryTemplate::from_sql(&query.normalized);
        assert!(template.uses_time());
        let day = Interval::new(Timestamp(86_400), Timestamp(2 * 86_400));
        assert_eq!(template.fill(day, Timestamp(0)), "SELECT * FROM t WHERE ds BETWEEN '1970-01-02' AND '1970-01-02'");
    }

    #[test]
    fn additive_projection_changes_are_recognized() {
        let old = parse_query("SELECT a, b FROM t WHERE x > 1", "duckdb").unwrap();
        let added = parse_query("SELECT a, b, c + 1 AS c FROM t WHERE x > 1", "duckdb").unwrap();
        let filtered = parse_query("SELECT a, b, c FROM t WHERE x > 2", "duckdb").unwrap();
        let removed = parse_query("SELECT a FROM t WHERE x > 1", "duckdb").unwrap();
        assert_eq!(only_adds_projections(&old.normalized, &added, "duckdb"), Some(true));
        assert_eq!(only_adds_projections(&old.normalized, &filtered, "duckdb"), Some(false));
        assert_eq!(only_adds_projections(&old.normalized, &removed, "duckdb"), Some(false));
        assert_eq!(only_adds_projections("SELEC nonsense", &added, "duckdb"), None);
    }

    #[test]
    fn parse_errors_carry_positions() {
        let error = parse_query("SELECT a FROM\n  WHERE", "duckdb").unwrap_err();
        assert_eq!(error.line, 2, "{error:?}");
    }
}
