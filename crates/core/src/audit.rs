//! Audits: queries returning the rows that break an assertion about a model's table, run after
//! each of the model's writes. A model names its audits in its `audits (...)` property; their
//! definitions come from the model file's own `AUDIT (...)` blocks, the project's
//! `audits/*.sql` files, and sluice's built-ins (SQLMesh's names, arguments and meaning, each
//! also as `<name>_non_blocking`). This module reads definitions; `model_file` renders a
//! model's calls of them.

use std::collections::BTreeMap;

use sqlparser::dialect::GenericDialect;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use crate::error::{ErrorSink, ProjectError, SourceLocation};
use crate::model_file::{
    FileReader, is_word, join_tokens, significant, spaced_tokens, split_statements, split_top_level_commas,
};

/// One audit's definition.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditDefinition {
    /// Lower-cased, as models call it.
    pub name: String,
    /// Where it is defined (`audits/x.sql`, a model file, or `built-in audit NAME`).
    pub file: String,
    /// A failing blocking audit fails the write; a non-blocking one is reported and the run goes on.
    pub blocking: bool,
    /// Defined but never run (SQLMesh's `skip true`).
    pub skip: bool,
    pub dialect: Option<String>,
    /// Values of arguments a call may leave out, as SQL text, by lower-cased name.
    pub defaults: BTreeMap<String, String>,
    /// The query's tokens, spans as in the defining file.
    pub query: Vec<TokenWithSpan>,
}

/// Reads the `AUDIT (...)` property tokens (whitespace dropped, parentheses excluded) and the
/// query that follows into a definition; `None` after reporting an error.
pub(crate) fn read_definition(
    reader: &mut FileReader,
    at: &TokenWithSpan,
    properties: &[&TokenWithSpan],
    query: Option<&[TokenWithSpan]>,
) -> Option<AuditDefinition> {
    let mut name = None;
    let mut blocking = true;
    let mut skip = false;
    let mut dialect = None;
    let mut defaults = BTreeMap::new();
    let mut ok = true;
    for item in split_top_level_commas(properties) {
        let Some((key, value)) = item.split_first() else { continue };
        let Token::Word(word) = &key.token else {
            reader.error(key, format!("expected an audit property name, found {}", key.token));
            ok = false;
            continue;
        };
        match word.value.to_ascii_lowercase().as_str() {
            "name" => name = reader.scalar(key, value).map(|name| name.to_ascii_lowercase()),
            "blocking" => blocking = reader.boolean(key, value).unwrap_or(blocking),
            "skip" => skip = reader.boolean(key, value).unwrap_or(skip),
            "dialect" => dialect = reader.scalar(key, value).map(|dialect| dialect.to_ascii_lowercase()),
            "standalone" => {
                if reader.boolean(key, value) == Some(true) {
                    reader.error(key, "standalone audits are not run by sluice yet; attach the audit to a model");
                    ok = false;
                }
            }
            "defaults" => match defaults_of(reader, key, value) {
                Some(values) => defaults = values,
                None => ok = false,
            },
            "description" | "owner" | "tags" => {}
            other => {
                reader.error(
                    key,
                    format!(
                        "unknown audit property {other}; expected name, blocking, skip, dialect, defaults or standalone"
                    ),
                );
                ok = false;
            }
        }
    }
    let Some(name) = name else {
        reader.error(at, "the AUDIT block has no name property; expected name audit_name");
        return None;
    };
    let query = match query {
        Some(tokens) if !significant(tokens).is_empty() => tokens.to_vec(),
        _ => {
            reader.error(at, format!("audit {name} has no query; expected a SELECT after its AUDIT block"));
            return None;
        }
    };
    ok.then(|| AuditDefinition { name, file: reader.file.to_string(), blocking, skip, dialect, defaults, query })
}

/// `defaults (a = 1, b = (x, y))`: each value as SQL text.
fn defaults_of(
    reader: &mut FileReader,
    key: &TokenWithSpan,
    value: &[&TokenWithSpan],
) -> Option<BTreeMap<String, String>> {
    let wrapped = matches!(value.first().map(|t| &t.token), Some(Token::LParen))
        && matches!(value.last().map(|t| &t.token), Some(Token::RParen));
    if !wrapped {
        reader.error(key, "expected defaults (name = value, ...)");
        return None;
    }
    let mut defaults = BTreeMap::new();
    for item in split_top_level_commas(&value[1..value.len() - 1]) {
        match item.as_slice() {
            [argument, assign, rest @ ..]
                if matches!(argument.token, Token::Word(_))
                    && matches!(assign.token, Token::Eq | Token::Assignment)
                    && !rest.is_empty() =>
            {
                let Token::Word(word) = &argument.token else { continue };
                let text: String = spaced_tokens(rest).iter().map(|t| t.token.to_string()).collect();
                defaults.insert(word.value.to_ascii_lowercase(), text);
            }
            _ => {
                let first = item.first().copied().unwrap_or(key);
                reader.error(first, "expected a default as name = value");
                return None;
            }
        }
    }
    Some(defaults)
}

/// Reads an `audits/*.sql` file: one or more `AUDIT (...)` blocks, each followed by its query.
pub fn parse_audit_file(file: &str, text: &str) -> Result<Vec<AuditDefinition>, Vec<ProjectError>> {
    let mut reader = FileReader::new(file);
    let tokens = match Tokenizer::new(&GenericDialect {}, text).with_unescape(false).tokenize_with_location() {
        Ok(tokens) => tokens,
        Err(error) => {
            let location = SourceLocation::new(file, error.location.line, error.location.column);
            return Err(vec![ProjectError::new(location, format!("cannot read SQL: {}", error.message))]);
        }
    };
    let mut definitions = Vec::new();
    let statements = split_statements(&tokens);
    let mut statements = statements.into_iter().filter(|statement| !significant(statement).is_empty());
    while let Some(statement) = statements.next() {
        let head = significant(statement);
        let Some((properties, at)) = audit_block(&head) else {
            reader.error(head[0], "expected an AUDIT (name ..., ...) block");
            break;
        };
        if let Some(definition) = read_definition(&mut reader, at, &properties, statements.next()) {
            definitions.push(definition);
        }
    }
    if definitions.is_empty() && reader.errors.is_empty() {
        reader.errors.push(SourceLocation::file(file), "no AUDIT block in this file");
    }
    let FileReader { errors, .. } = reader;
    errors.finish(definitions).map_err(|errors| errors.0)
}

/// The property tokens of a statement that is an `AUDIT (...)` block, and its first token.
pub(crate) fn audit_block<'t>(head: &[&'t TokenWithSpan]) -> Option<(Vec<&'t TokenWithSpan>, &'t TokenWithSpan)> {
    let (first, rest) = head.split_first()?;
    let wrapped = is_word(&first.token, "AUDIT")
        && matches!(rest.first().map(|t| &t.token), Some(Token::LParen))
        && matches!(rest.last().map(|t| &t.token), Some(Token::RParen));
    wrapped.then(|| (rest[1..rest.len() - 1].to_vec(), *first))
}

/// One model's call of an audit: `not_null(columns := [id])` in its `audits (...)` property.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditCall {
    pub name: String,
    /// Argument name (lower-cased) and value tokens, in the order written.
    pub arguments: Vec<(String, Vec<TokenWithSpan>)>,
    /// The call as written, for messages.
    pub text: String,
}

/// Reads the value of an `audits` property: `(a, b(x := 1), ...)` or a single call.
pub(crate) fn read_calls(
    reader: &mut FileReader,
    key: &TokenWithSpan,
    value: &[&TokenWithSpan],
) -> Option<Vec<AuditCall>> {
    let wrapped = matches!(value.first().map(|t| &t.token), Some(Token::LParen | Token::LBracket))
        && matches!(value.last().map(|t| &t.token), Some(Token::RParen | Token::RBracket));
    let items = if wrapped { split_top_level_commas(&value[1..value.len() - 1]) } else { vec![value.to_vec()] };
    let mut calls = Vec::new();
    for item in items {
        let Some((first, rest)) = item.split_first() else { continue };
        let Token::Word(word) = &first.token else {
            reader.error(first, format!("expected an audit name, found {}", first.token));
            return None;
        };
        let mut arguments = Vec::new();
        if !rest.is_empty() {
            let call_wrapped = matches!(rest.first().map(|t| &t.token), Some(Token::LParen))
                && matches!(rest.last().map(|t| &t.token), Some(Token::RParen));
            if !call_wrapped {
                reader.error(rest[0], format!("expected ( after audit {} for its arguments", word.value));
                return None;
            }
            for argument in split_top_level_commas(&rest[1..rest.len() - 1]) {
                match argument.as_slice() {
                    [name, assign, value @ ..]
                        if matches!(name.token, Token::Word(_))
                            && matches!(assign.token, Token::Assignment | Token::Eq)
                            && !value.is_empty() =>
                    {
                        let Token::Word(name) = &name.token else { continue };
                        arguments.push((name.value.to_ascii_lowercase(), spaced_tokens(value)));
                    }
                    _ => {
                        let at = argument.first().copied().unwrap_or(key);
                        reader.error(at, format!("expected audit {}'s arguments as name := value", word.value));
                        return None;
                    }
                }
            }
        }
        let text = join_tokens(&item);
        calls.push(AuditCall { name: word.value.to_ascii_lowercase(), arguments, text });
    }
    Some(calls)
}

/// SQLMesh built-ins sluice does not provide (yet): a call names them in its error.
pub const BUILTINS_NOT_PROVIDED: &[&str] = &[
    "sequential_values",
    "mutually_exclusive_ranges",
    "valid_uuid",
    "valid_url",
    "valid_http_method",
    "valid_email",
    "match_regex_pattern_list",
    "not_match_regex_pattern_list",
    "match_like_pattern_list",
    "not_match_like_pattern_list",
    "z_score",
    "kl_divergence",
    "chi_square",
];

/// A built-in audit: name, defaults (argument, SQL), query.
type Builtin = (&'static str, &'static [(&'static str, &'static str)], &'static str);

/// The built-in audits: name, defaults, query. Each query returns the violating rows (or one
/// row when a whole-table condition fails); `@condition` narrows the rows looked at.
const BUILTINS: &[Builtin] = &[
    (
        "not_null",
        &[("condition", "TRUE")],
        "SELECT * FROM @this_model WHERE (@condition) AND (@REDUCE(@EACH(@columns, c -> c IS NULL), (a, b) -> a OR b))",
    ),
    (
        // A row breaks it when an earlier row (any order) has the same value in one of the
        // columns; NULLs count as equal, as in PARTITION BY.
        "unique_values",
        &[("condition", "TRUE")],
        "SELECT * FROM (@REDUCE(@EACH(@columns, c -> SELECT 1 AS sluice_repeat FROM (SELECT ROW_NUMBER() OVER (PARTITION BY c) AS sluice_position FROM @this_model WHERE @condition) AS sluice_numbered WHERE sluice_position > 1), (a, b) -> a UNION ALL b)) AS sluice_repeats",
    ),
    (
        "accepted_values",
        &[("condition", "TRUE")],
        "SELECT * FROM @this_model WHERE (@condition) AND @column NOT IN (@EACH(@is_in, v -> v))",
    ),
    (
        "not_accepted_values",
        &[("condition", "TRUE")],
        "SELECT * FROM @this_model WHERE (@condition) AND @column IN (@EACH(@is_in, v -> v))",
    ),
    (
        // One row when the table has at most `threshold` rows.
        "number_of_rows",
        &[("condition", "TRUE")],
        "SELECT sluice_rows FROM (SELECT COUNT(*) AS sluice_rows FROM (SELECT 1 AS sluice_row FROM @this_model WHERE @condition LIMIT @threshold + 1) AS sluice_capped) AS sluice_counted WHERE sluice_rows <= @threshold",
    ),
    (
        "forall",
        &[("condition", "TRUE")],
        "SELECT * FROM @this_model WHERE (@condition) AND (@REDUCE(@EACH(@criteria, c -> NOT (c)), (a, b) -> a OR b))",
    ),
    (
        "accepted_range",
        &[("min_v", "NULL"), ("max_v", "NULL"), ("inclusive", "TRUE"), ("condition", "TRUE")],
        "SELECT * FROM @this_model WHERE (@condition) AND CASE WHEN @inclusive THEN @column < @min_v OR @column > @max_v ELSE @column <= @min_v OR @column >= @max_v END",
    ),
    (
        // One row when the rows looked at exist and all have NULL in the column.
        "at_least_one",
        &[("condition", "TRUE")],
        "SELECT 1 AS sluice_all_null FROM @this_model WHERE @condition HAVING COUNT(*) > 0 AND COUNT(@column) = 0",
    ),
    (
        "not_constant",
        &[("condition", "TRUE")],
        "SELECT sluice_values FROM (SELECT COUNT(DISTINCT @column) AS sluice_values FROM @this_model WHERE @condition) AS sluice_distinct WHERE sluice_values <= 1",
    ),
    ("not_empty_string", &[("condition", "TRUE")], "SELECT * FROM @this_model WHERE (@condition) AND @column = ''"),
    (
        "not_null_proportion",
        &[("condition", "TRUE")],
        "SELECT * FROM (SELECT COUNT(*) AS sluice_all, COUNT(@column) AS sluice_present FROM @this_model WHERE @condition) AS sluice_counts WHERE sluice_present <= sluice_all * @threshold",
    ),
    (
        "unique_combination_of_columns",
        &[("condition", "TRUE")],
        "SELECT @EACH(@columns, c -> c) FROM @this_model WHERE @condition GROUP BY @EACH(@columns, c -> c) HAVING COUNT(*) > 1",
    ),
    (
        "string_length_between",
        &[("min_v", "NULL"), ("max_v", "NULL"), ("inclusive", "TRUE"), ("condition", "TRUE")],
        "SELECT * FROM @this_model WHERE (@condition) AND CASE WHEN @inclusive THEN LENGTH(@column) < @min_v OR LENGTH(@column) > @max_v ELSE LENGTH(@column) <= @min_v OR LENGTH(@column) >= @max_v END",
    ),
    (
        "string_length_equal",
        &[("condition", "TRUE")],
        "SELECT * FROM @this_model WHERE (@condition) AND LENGTH(@column) <> @v",
    ),
    (
        "mean_in_range",
        &[("min_v", "NULL"), ("max_v", "NULL"), ("inclusive", "TRUE"), ("condition", "TRUE")],
        "SELECT * FROM (SELECT AVG(@column) AS sluice_mean FROM @this_model WHERE @condition) AS sluice_stats WHERE CASE WHEN @inclusive THEN sluice_mean < @min_v OR sluice_mean > @max_v ELSE sluice_mean <= @min_v OR sluice_mean >= @max_v END",
    ),
    (
        "stddev_in_range",
        &[("min_v", "NULL"), ("max_v", "NULL"), ("inclusive", "TRUE"), ("condition", "TRUE")],
        "SELECT * FROM (SELECT STDDEV(@column) AS sluice_stddev FROM @this_model WHERE @condition) AS sluice_stats WHERE CASE WHEN @inclusive THEN sluice_stddev < @min_v OR sluice_stddev > @max_v ELSE sluice_stddev <= @min_v OR sluice_stddev >= @max_v END",
    ),
];

/// The built-in audit of that (lower-cased) name; `NAME_non_blocking` is `NAME`, not blocking.
pub fn builtin(name: &str) -> Option<AuditDefinition> {
    let (base, blocking) = match name.strip_suffix("_non_blocking") {
        Some(base) => (base, false),
        None => (name, true),
    };
    let (_, defaults, query) = BUILTINS.iter().find(|(builtin, _, _)| *builtin == base)?;
    let tokens = Tokenizer::new(&GenericDialect {}, query).with_unescape(false).tokenize_with_location().ok()?;
    Some(AuditDefinition {
        name: name.to_string(),
        file: format!("built-in audit {name}"),
        blocking,
        skip: false,
        dialect: None,
        defaults: defaults.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect(),
        query: tokens,
    })
}

/// Every project audit by name, and the errors of their files (a name defined twice included).
pub fn project_audits(files: &BTreeMap<String, String>, errors: &mut ErrorSink) -> BTreeMap<String, AuditDefinition> {
    let mut audits: BTreeMap<String, AuditDefinition> = BTreeMap::new();
    for (file, text) in files {
        match parse_audit_file(file, text) {
            Ok(definitions) => {
                for definition in definitions {
                    if let Some(existing) = audits.get(&definition.name) {
                        errors.push(
                            SourceLocation::file(file),
                            format!("duplicate audit name {}; {} already defines it", definition.name, existing.file),
                        );
                        continue;
                    }
                    audits.insert(definition.name.clone(), definition);
                }
            }
            Err(file_errors) => {
                for error in file_errors {
                    errors.push_error(error);
                }
            }
        }
    }
    audits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_reads_and_has_a_non_blocking_twin() {
        for (name, _, _) in BUILTINS {
            let blocking = builtin(name).unwrap();
            assert!(blocking.blocking, "{name}");
            assert!(!significant(&blocking.query).is_empty());
            let twin = builtin(&format!("{name}_non_blocking")).unwrap();
            assert!(!twin.blocking);
            assert_eq!(twin.query, blocking.query);
        }
        assert!(builtin("no_such_audit").is_none());
    }

    #[test]
    fn audit_files_hold_blocks_and_queries() {
        let text = "-- checks\nAUDIT (name positive_amounts, blocking false, defaults (floor = 0));\nSELECT * FROM @this_model WHERE amount < @floor;\n\nAUDIT (\n  name Has_Rows\n);\nSELECT 1 FROM @this_model HAVING COUNT(*) = 0;\n";
        let definitions = parse_audit_file("audits/checks.sql", text).unwrap();
        assert_eq!(definitions.len(), 2);
        assert_eq!(definitions[0].name, "positive_amounts");
        assert!(!definitions[0].blocking);
        assert_eq!(definitions[0].defaults["floor"], "0");
        assert_eq!(definitions[1].name, "has_rows");
        assert!(definitions[1].blocking);
        assert_eq!(
            definitions[1].query.iter().find(|t| !matches!(t.token, Token::Whitespace(_))).unwrap().span.start.line,
            8
        );
    }

    #[test]
    fn audit_file_errors_name_the_place() {
        let error = |text: &str| parse_audit_file("audits/a.sql", text).unwrap_err()[0].to_string();
        assert_eq!(error("SELECT 1"), "audits/a.sql:1:1: expected an AUDIT (name ..., ...) block");
        assert_eq!(
            error("AUDIT (blocking false);\nSELECT 1"),
            "audits/a.sql:1:1: the AUDIT block has no name property; expected name audit_name"
        );
        assert_eq!(
            error("AUDIT (name a);"),
            "audits/a.sql:1:1: audit a has no query; expected a SELECT after its AUDIT block"
        );
        assert_eq!(
            error("AUDIT (name a, standalone true);\nSELECT 1"),
            "audits/a.sql:1:16: standalone audits are not run by sluice yet; attach the audit to a model"
        );
        assert_eq!(
            error("AUDIT (name a, colour red);\nSELECT 1"),
            "audits/a.sql:1:16: unknown audit property colour; expected name, blocking, skip, dialect, defaults or standalone"
        );
    }
}
