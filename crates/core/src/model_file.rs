//! Reads one SQLMesh model file: the `MODEL (...)` block, statements before and after the
//! query, `@DEF` locals and every macro, into a [`Model`].

use std::collections::{BTreeMap, BTreeSet};

use sqlparser::dialect::GenericDialect;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer, Whitespace};

use crate::audit::{self, AuditCall, AuditDefinition};
use crate::config::{Config, Connection, VariableValue};
use crate::cron::Cron;
use crate::error::{ErrorSink, ProjectError, SourceLocation};
use crate::interval::{TimeMacro, Timestamp};
use crate::macro_functions::{self, MacroFunction};
use crate::model::{Model, ModelAudit, ModelKind, ScdChange, ScdType2, SeedData};
use crate::names::{IDENTIFIER_EXPECTATION, ModelName, is_valid_identifier};
use crate::query::{dialect_for, parse_query, time_placeholder};

/// What a model file is read against: the config and the project's CSV files by project-relative path.
#[derive(Debug, Clone, Copy)]
pub struct ModelFileContext<'a> {
    pub config: &'a Config,
    /// The project's audits (`audits/*.sql`) by name.
    pub audits: &'a BTreeMap<String, AuditDefinition>,
    pub csv_files: &'a BTreeMap<String, String>,
    /// Python macros of the project's `macros/` folder by lower-cased name, with their file.
    pub python_macros: &'a BTreeMap<String, String>,
}

/// A model and the warnings its file produced.
#[derive(Debug)]
pub struct ParsedModel {
    pub model: Model,
    pub warnings: Vec<ProjectError>,
}

/// Model properties sluice reads.
const PROPERTIES: &[&str] = &[
    "name",
    "kind",
    "cron",
    "start",
    "end",
    "owner",
    "description",
    "grain",
    "grains",
    "gateway",
    "dialect",
    "tags",
    "columns",
    "enabled",
    "depends_on",
    "audits",
    "partitioned_by",
];
/// Properties SQLMesh accepts that sluice does not use yet: a warning, not an error.
const SQLMESH_ONLY_PROPERTIES: &[&str] = &[
    "references",
    "clustered_by",
    "storage_format",
    "physical_properties",
    "virtual_properties",
    "session_properties",
    "allow_partials",
    "signals",
    "table_format",
    "stamp",
    "optimize_query",
    "formatting",
    "ignored_rules",
    "column_descriptions",
    "interval_unit",
    "physical_version",
    "project",
    "validate_query",
    "enabled_audits",
    "cron_tz",
];

/// Non-whitespace tokens of a slice, with their index in it.
pub(crate) fn significant(tokens: &[TokenWithSpan]) -> Vec<&TokenWithSpan> {
    tokens.iter().filter(|token| !matches!(token.token, Token::Whitespace(_))).collect()
}

pub(crate) fn is_word(token: &Token, expected: &str) -> bool {
    matches!(token, Token::Word(word) if word.quote_style.is_none() && word.value.eq_ignore_ascii_case(expected))
}

/// Splits tokens at commas that are not inside parentheses or brackets.
pub(crate) fn split_top_level_commas<'t>(tokens: &[&'t TokenWithSpan]) -> Vec<Vec<&'t TokenWithSpan>> {
    let mut items = Vec::new();
    let mut current = Vec::new();
    let mut depth = 0i32;
    for token in tokens {
        match token.token {
            Token::LParen | Token::LBracket => depth += 1,
            Token::RParen | Token::RBracket => depth -= 1,
            Token::Comma if depth == 0 => {
                items.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(*token);
    }
    if !current.is_empty() {
        items.push(current);
    }
    items
}

/// Joins tokens back into text without the spaces the tokenizer dropped around punctuation.
pub(crate) fn join_tokens(tokens: &[&TokenWithSpan]) -> String {
    let mut text = String::new();
    let mut previous: Option<&Token> = None;
    for token in tokens {
        // `(` follows a function or type name directly, anything else with a space.
        let call = matches!(token.token, Token::LParen) && matches!(previous, Some(Token::Word(_)));
        let glue = call
            || matches!(token.token, Token::RParen | Token::RBracket | Token::Comma | Token::Period)
            || matches!(previous, Some(Token::LParen | Token::LBracket | Token::Period) | None);
        if !glue {
            text.push(' ');
        }
        text.push_str(&token.token.to_string());
        previous = Some(&token.token);
    }
    text
}

pub(crate) struct FileReader<'a> {
    pub(crate) file: &'a str,
    pub(crate) errors: ErrorSink,
    pub(crate) warnings: Vec<ProjectError>,
}

impl<'a> FileReader<'a> {
    pub(crate) fn new(file: &'a str) -> FileReader<'a> {
        FileReader { file, errors: ErrorSink::default(), warnings: Vec::new() }
    }

    pub(crate) fn at(&self, token: &TokenWithSpan) -> SourceLocation {
        SourceLocation::new(self.file, token.span.start.line, token.span.start.column)
    }

    pub(crate) fn error(&mut self, token: &TokenWithSpan, message: impl Into<String>) {
        let location = self.at(token);
        self.errors.push(location, message);
    }

    /// Valid SQLMesh that sluice cannot run: the model may be left out of a plan.
    pub(crate) fn unsupported(&mut self, token: &TokenWithSpan, message: impl Into<String>) {
        let location = self.at(token);
        self.errors.push_unsupported(location, message);
    }

    pub(crate) fn warn(&mut self, token: &TokenWithSpan, message: impl Into<String>) {
        let location = self.at(token);
        self.warnings.push(ProjectError::new(location, message));
    }

    /// A scalar property value: a string, a number, a word or a dotted name.
    pub(crate) fn scalar(&mut self, key: &TokenWithSpan, value: &[&TokenWithSpan]) -> Option<String> {
        let expected = "expected a string, a number or a name";
        let Some(first) = value.first() else {
            self.error(key, format!("{expected} after {}", key.token));
            return None;
        };
        if value.len() == 1 {
            return match &first.token {
                Token::SingleQuotedString(text) | Token::DoubleQuotedString(text) => Some(text.replace("''", "'")),
                Token::Number(number, _) => Some(number.clone()),
                Token::Word(word) => Some(word.value.clone()),
                other => {
                    self.error(first, format!("{expected}, found {other}"));
                    None
                }
            };
        }
        // A dotted name: word (. word)*
        let mut parts = Vec::new();
        for (index, token) in value.iter().enumerate() {
            match (&token.token, index % 2) {
                (Token::Word(word), 0) => parts.push(word.value.clone()),
                (Token::Period, 1) => {}
                (other, _) => {
                    self.error(token, format!("{expected}, found {other}"));
                    return None;
                }
            }
        }
        Some(parts.join("."))
    }

    /// A list value: `[a, b]`, `(a, b)` or a single scalar.
    pub(crate) fn list(&mut self, key: &TokenWithSpan, value: &[&TokenWithSpan]) -> Option<Vec<String>> {
        let inner = match (value.first().map(|t| &t.token), value.last().map(|t| &t.token)) {
            (Some(Token::LBracket), Some(Token::RBracket)) | (Some(Token::LParen), Some(Token::RParen)) => {
                &value[1..value.len() - 1]
            }
            _ => return self.scalar(key, value).map(|item| vec![item]),
        };
        let mut items = Vec::new();
        for item in split_top_level_commas(inner) {
            items.push(self.scalar(key, &item)?);
        }
        Some(items)
    }

    pub(crate) fn boolean(&mut self, key: &TokenWithSpan, value: &[&TokenWithSpan]) -> Option<bool> {
        let text = self.scalar(key, value)?;
        match text.to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => {
                self.error(value[0], format!("expected true or false, found {text}"));
                None
            }
        }
    }

    fn count(&mut self, key: &TokenWithSpan, value: &[&TokenWithSpan], minimum: u32) -> Option<u32> {
        let text = self.scalar(key, value)?;
        match text.parse::<u32>() {
            Ok(number) if number >= minimum => Some(number),
            _ => {
                self.error(
                    value[0],
                    format!("expected a whole number of at least {minimum} for {}, found {text}", key.token),
                );
                None
            }
        }
    }

    /// A timestamp; `end` reads a date without a time as the end of that day, as SQLMesh does.
    fn timestamp(&mut self, key: &TokenWithSpan, value: &[&TokenWithSpan]) -> Option<Timestamp> {
        let text = self.scalar(key, value)?;
        let is_end = matches!(&key.token, Token::Word(word) if word.value.eq_ignore_ascii_case("end"));
        match if is_end { Timestamp::parse_end(&text) } else { Timestamp::parse(&text) } {
            Ok(timestamp) => Some(timestamp),
            Err(error) => {
                self.error(value[0], error.to_string());
                None
            }
        }
    }
}

/// The parsed `kind` property.
/// `disable_restatement` (an argument of the incremental kinds) is set when the kind gives it.
fn read_kind(
    reader: &mut FileReader,
    key: &TokenWithSpan,
    value: &[&TokenWithSpan],
    disable_restatement: &mut Option<bool>,
) -> Option<ModelKind> {
    const KINDS: &str = "VIEW, FULL, INCREMENTAL_BY_TIME_RANGE, INCREMENTAL_BY_UNIQUE_KEY, INCREMENTAL_BY_PARTITION, INCREMENTAL_UNMANAGED, SCD_TYPE_2_BY_TIME, SCD_TYPE_2_BY_COLUMN, SEED or EMBEDDED";
    let Some(first) = value.first() else {
        reader.error(key, format!("expected a model kind ({KINDS})"));
        return None;
    };
    let Token::Word(word) = &first.token else {
        reader.error(first, format!("expected a model kind ({KINDS}), found {}", first.token));
        return None;
    };
    let kind_name = word.value.to_ascii_uppercase();
    let mut arguments: BTreeMap<String, (&TokenWithSpan, Vec<&TokenWithSpan>)> = BTreeMap::new();
    if value.len() > 1 {
        let well_formed =
            matches!(value[1].token, Token::LParen) && matches!(value.last().map(|t| &t.token), Some(Token::RParen));
        if !well_formed {
            reader.error(value[1], format!("expected ( after {kind_name} for its arguments, found {}", value[1].token));
            return None;
        }
        for item in split_top_level_commas(&value[2..value.len() - 1]) {
            let Some((argument_key, argument_value)) = item.split_first() else { continue };
            let Token::Word(argument_word) = &argument_key.token else {
                reader
                    .error(argument_key, format!("expected a {kind_name} argument name, found {}", argument_key.token));
                continue;
            };
            arguments.insert(argument_word.value.to_ascii_lowercase(), (*argument_key, argument_value.to_vec()));
        }
    }
    let mut take = |name: &str| arguments.remove(name);
    if matches!(
        kind_name.as_str(),
        "INCREMENTAL_BY_TIME_RANGE"
            | "INCREMENTAL_BY_UNIQUE_KEY"
            | "INCREMENTAL_BY_PARTITION"
            | "INCREMENTAL_UNMANAGED"
            | "SCD_TYPE_2"
            | "SCD_TYPE_2_BY_TIME"
            | "SCD_TYPE_2_BY_COLUMN"
    ) && let Some((token, tokens)) = take("disable_restatement")
    {
        *disable_restatement = reader.boolean(token, &tokens);
    }
    let kind = match kind_name.as_str() {
        "VIEW" => {
            if let Some((token, _)) = take("materialized") {
                reader.warn(token, "VIEW argument materialized is accepted by SQLMesh but not used by sluice yet");
            }
            ModelKind::View
        }
        "FULL" => ModelKind::Full,
        "EMBEDDED" => ModelKind::Embedded,
        "INCREMENTAL_BY_TIME_RANGE" => {
            let mut time_format = None;
            let time_column = match take("time_column") {
                Some((token, tokens)) => {
                    // `time_column ds` or `time_column (ds, '%Y%m%d')`: a text or numeric column
                    // writes times in the format (SQLMesh's default: `%Y-%m-%d`); a DATE or
                    // TIMESTAMP column ignores it.
                    let column_tokens = match tokens.first().map(|t| &t.token) {
                        Some(Token::LParen) => {
                            let mut items = split_top_level_commas(&tokens[1..tokens.len().saturating_sub(1)]);
                            if let Some(format) = items.get(1) {
                                match &format[..] {
                                    [t] if matches!(&t.token, Token::SingleQuotedString(f) if f == "%Y-%m-%d") => {}
                                    [t] if matches!(&t.token, Token::SingleQuotedString(f) if crate::interval::is_time_format(f)) => {
                                        if let Token::SingleQuotedString(f) = &t.token {
                                            time_format = Some(f.clone());
                                        }
                                    }
                                    _ => {
                                        reader.error(
                                            format.first().copied().unwrap_or(token),
                                            format!(
                                                "time_column format {} is not a time format; expected a quoted strftime format such as '%Y%m%d'",
                                                join_tokens(format)
                                            ),
                                        );
                                        return None;
                                    }
                                }
                            }
                            items.drain(..).next().unwrap_or_default()
                        }
                        _ => tokens.clone(),
                    };
                    reader.scalar(token, &column_tokens)?.to_ascii_lowercase()
                }
                None => {
                    reader.error(first, "INCREMENTAL_BY_TIME_RANGE needs a time_column argument");
                    return None;
                }
            };
            let batch_size = take("batch_size").and_then(|(t, v)| reader.count(t, &v, 1));
            let batch_concurrency = take("batch_concurrency").and_then(|(t, v)| reader.count(t, &v, 1));
            let lookback = take("lookback").and_then(|(t, v)| reader.count(t, &v, 0)).unwrap_or(0);
            let forward_only = take("forward_only").and_then(|(t, v)| reader.boolean(t, &v)).unwrap_or(false);
            ModelKind::IncrementalByTimeRange {
                time_column,
                time_format,
                batch_size,
                batch_concurrency,
                lookback,
                forward_only,
            }
        }
        "INCREMENTAL_BY_UNIQUE_KEY" => {
            let unique_key = match take("unique_key") {
                Some((token, tokens)) => reader.list(token, &tokens)?,
                None => {
                    reader.error(first, "INCREMENTAL_BY_UNIQUE_KEY needs a unique_key argument");
                    return None;
                }
            };
            let batch_size = take("batch_size").and_then(|(t, v)| reader.count(t, &v, 1));
            let forward_only = take("forward_only").and_then(|(t, v)| reader.boolean(t, &v)).unwrap_or(false);
            let unique_key = unique_key.into_iter().map(|column| column.to_ascii_lowercase()).collect();
            ModelKind::IncrementalByUniqueKey { unique_key, batch_size, forward_only }
        }
        // Its columns come from the model's `partitioned_by` property (filled in by the caller).
        "INCREMENTAL_BY_PARTITION" => {
            ModelKind::IncrementalByPartition { partitioned_by: Vec::new(), batch_size: None }
        }
        "INCREMENTAL_UNMANAGED" => {
            let insert_overwrite = take("insert_overwrite").and_then(|(t, v)| reader.boolean(t, &v)).unwrap_or(false);
            let forward_only = take("forward_only").and_then(|(t, v)| reader.boolean(t, &v)).unwrap_or(true);
            ModelKind::IncrementalUnmanaged { insert_overwrite, partitioned_by: Vec::new(), forward_only }
        }
        "SEED" => {
            let path = match take("path") {
                Some((token, tokens)) => reader.scalar(token, &tokens)?,
                None => {
                    reader.error(first, "SEED needs a path argument naming its CSV file");
                    return None;
                }
            };
            let batch_size = take("batch_size").and_then(|(t, v)| reader.count(t, &v, 1));
            ModelKind::Seed { path, batch_size }
        }
        "CUSTOM" => {
            reader.unsupported(
                first,
                format!("CUSTOM kinds run a Python materialization, which sluice cannot run; use one of the kinds sluice runs ({KINDS})"),
            );
            return None;
        }
        "SCD_TYPE_2" | "SCD_TYPE_2_BY_TIME" | "SCD_TYPE_2_BY_COLUMN" => {
            let by_column = kind_name == "SCD_TYPE_2_BY_COLUMN";
            let unique_key = match take("unique_key") {
                Some((token, tokens)) => reader.list(token, &tokens)?,
                None => {
                    reader.error(first, format!("{kind_name} needs a unique_key argument"));
                    return None;
                }
            };
            let lower =
                |names: Vec<String>| names.into_iter().map(|name| name.to_ascii_lowercase()).collect::<Vec<_>>();
            let mut column = |reader: &mut FileReader, name: &str| -> Option<Option<String>> {
                match take(name) {
                    Some((token, tokens)) => Some(Some(reader.scalar(token, &tokens)?.to_ascii_lowercase())),
                    None => Some(None),
                }
            };
            let valid_from = column(reader, "valid_from_name")?.unwrap_or_else(|| "valid_from".to_string());
            let valid_to = column(reader, "valid_to_name")?.unwrap_or_else(|| "valid_to".to_string());
            let updated_at = column(reader, "updated_at_name")?;
            if let Some((token, tokens)) = take("time_data_type")
                && !matches!(&tokens[..], [t] if is_word(&t.token, "TIMESTAMP"))
            {
                reader.error(
                    token,
                    format!(
                        "{kind_name} time_data_type {} is not read by sluice yet; expected TIMESTAMP (the default)",
                        join_tokens(&tokens)
                    ),
                );
                return None;
            }
            let mut flag = |reader: &mut FileReader, name: &str, default: bool| {
                take(name).and_then(|(t, v)| reader.boolean(t, &v)).unwrap_or(default)
            };
            let invalidate_hard_deletes = flag(reader, "invalidate_hard_deletes", false);
            let forward_only = flag(reader, "forward_only", true);
            let change = if by_column {
                let execution_time_as_valid_from = flag(reader, "execution_time_as_valid_from", false);
                let columns = match take("columns") {
                    Some((_, tokens)) if matches!(&tokens[..], [t] if matches!(t.token, Token::Mul)) => None,
                    Some((token, tokens)) => Some(lower(reader.list(token, &tokens)?)),
                    None => {
                        reader.error(first, "SCD_TYPE_2_BY_COLUMN needs a columns argument (a list, or *)");
                        return None;
                    }
                };
                ScdChange::ByColumn { columns, execution_time_as_valid_from, updated_at }
            } else {
                let updated_at_as_valid_from = flag(reader, "updated_at_as_valid_from", false);
                ScdChange::ByTime {
                    updated_at: updated_at.unwrap_or_else(|| "updated_at".to_string()),
                    updated_at_as_valid_from,
                }
            };
            let batch_size = take("batch_size").and_then(|(t, v)| reader.count(t, &v, 1));
            ModelKind::ScdType2(ScdType2 {
                unique_key: lower(unique_key),
                valid_from,
                valid_to,
                invalidate_hard_deletes,
                change,
                batch_size,
                forward_only,
            })
        }
        "EXTERNAL" | "MANAGED" => {
            reader
                .unsupported(first, format!("{kind_name} is a SQLMesh kind sluice does not run yet; expected {KINDS}"));
            return None;
        }
        _ => {
            reader.error(first, format!("unknown model kind {}; expected {KINDS}", word.value));
            return None;
        }
    };
    const SQLMESH_ONLY_KIND_ARGUMENTS: &[&str] = &[
        "on_destructive_change",
        "on_additive_change",
        "auto_restatement_cron",
        "auto_restatement_intervals",
        "partition_by_time_column",
        "when_matched",
        "merge_filter",
        "csv_settings",
        "min_interval_end_offset",
    ];
    for (name, (token, _)) in arguments {
        if SQLMESH_ONLY_KIND_ARGUMENTS.contains(&name.as_str()) {
            reader
                .warn(token, format!("{kind_name} argument {name} is accepted by SQLMesh but not used by sluice yet"));
        } else {
            reader.error(token, format!("unknown {kind_name} argument {name}"));
        }
    }
    Some(kind)
}

/// Resolves `relative` against the folder of `file`, both project-relative with `/` separators;
/// a path starting with `$root/` is relative to the project's folder, as in SQLMesh.
fn resolve_relative(file: &str, relative: &str) -> Option<String> {
    let (mut parts, relative): (Vec<&str>, &str) = match relative.strip_prefix("$root/") {
        Some(from_root) => (Vec::new(), from_root),
        None => {
            let mut parts: Vec<&str> = file.split('/').collect();
            parts.pop();
            (parts, relative)
        }
    };
    for part in relative.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    Some(parts.join("/"))
}

fn read_seed(text: &str) -> Result<SeedData, String> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
    let columns: Vec<String> = reader
        .headers()
        .map_err(|error| format!("not valid CSV: {error}"))?
        .iter()
        .map(|column| column.trim().to_ascii_lowercase())
        .collect();
    for column in &columns {
        if !is_valid_identifier(column) {
            return Err(format!("CSV header {column:?} is not {IDENTIFIER_EXPECTATION}"));
        }
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|error| format!("not valid CSV: {error}"))?;
        rows.push(record.iter().map(str::to_string).collect());
    }
    Ok(SeedData { columns, rows })
}

/// Values the macros of one model render to.
struct MacroScope<'a> {
    model_name: Option<&'a ModelName>,
    gateway: &'a str,
    kind_name: &'a str,
    variables: &'a BTreeMap<String, VariableValue>,
    locals: BTreeMap<String, String>,
    /// `@DEF(name, x -> …)`: macros the model defines as lambdas, called as `@name(…)`.
    lambdas: BTreeMap<String, Lambda>,
    python_macros: &'a BTreeMap<String, String>,
}

/// SQLMesh's built-in macro functions and variables that sluice does not evaluate yet.
const SQLMESH_MACROS: &[&str] = &[
    "star",
    "union",
    "haversine_distance",
    "pivot",
    "deduplicate",
    "date_spine",
    "resolve_template",
    "with",
    "join",
    "where",
    "group_by",
    "having",
    "order_by",
    "limit",
    "columns_to_types",
    "schema",
    "table_name",
    "this_env",
    "blueprint",
    "blueprint_var",
    "environment_naming",
    "resolve_table",
    "func",
];

/// The arguments of a macro call whose `(` is the next significant token at or after `start`:
/// each argument's tokens (whitespace kept), and the index after the closing `)`.
fn call_arguments(tokens: &[TokenWithSpan], start: usize) -> Option<(Vec<Vec<TokenWithSpan>>, usize)> {
    let open = start + tokens.get(start..)?.iter().position(|t| !matches!(t.token, Token::Whitespace(_)))?;
    if !matches!(tokens[open].token, Token::LParen) {
        return None;
    }
    let mut depth = 0usize;
    let mut arguments = vec![Vec::new()];
    for (index, token) in tokens.iter().enumerate().skip(open) {
        match token.token {
            Token::LParen | Token::LBracket | Token::LBrace => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            Token::RParen | Token::RBracket | Token::RBrace => {
                depth -= 1;
                if depth == 0 {
                    return Some((arguments, index + 1));
                }
            }
            Token::Comma if depth == 1 => {
                arguments.push(Vec::new());
                continue;
            }
            _ => {}
        }
        if let Some(argument) = arguments.last_mut() {
            argument.push(token.clone());
        }
    }
    None
}

/// The index after an `AS alias` and then a `,` that follow `start` (each when present).
fn skip_alias_and_comma(tokens: &[TokenWithSpan], start: usize) -> usize {
    let next = |from: usize| (from..tokens.len()).find(|&i| !matches!(tokens[i].token, Token::Whitespace(_)));
    let mut index = start;
    if let Some(as_index) = next(index)
        && is_word(&tokens[as_index].token, "AS")
        && let Some(alias) = next(as_index + 1)
        && matches!(tokens[alias].token, Token::Word(_))
    {
        index = alias + 1;
    }
    match next(index) {
        Some(comma) if matches!(tokens[comma].token, Token::Comma) => comma + 1,
        _ => index,
    }
}

/// A lambda argument: `x -> body` or `(x, y) -> body`.
struct Lambda {
    parameters: Vec<String>,
    body: Vec<TokenWithSpan>,
}

fn read_lambda(tokens: &[TokenWithSpan]) -> Option<Lambda> {
    let arrow = tokens.iter().position(|t| matches!(t.token, Token::Arrow))?;
    let parameters = tokens[..arrow]
        .iter()
        .filter_map(|t| match &t.token {
            Token::Word(word) => Some(Ok(word.value.to_ascii_lowercase())),
            Token::Whitespace(_) | Token::LParen | Token::RParen | Token::Comma => None,
            _ => Some(Err(())),
        })
        .collect::<Result<Vec<_>, ()>>()
        .ok()?;
    (!parameters.is_empty()).then(|| Lambda { parameters, body: tokens[arrow + 1..].to_vec() })
}

/// Evaluates one call of a macro function; `None` after reporting an error.
fn call_function(
    reader: &mut FileReader,
    at: &TokenWithSpan,
    function: MacroFunction,
    arguments: &[Vec<TokenWithSpan>],
    scope: &MacroScope,
) -> Option<String> {
    if function.takes_lambda() {
        return call_list_function(reader, at, function, arguments, scope).map(|items| items.join(", "));
    }
    let mut rendered = Vec::with_capacity(arguments.len());
    let mut hash_function = "MD5".to_string();
    for argument in arguments {
        let significant = significant(argument);
        let kinds: Vec<&Token> = significant.iter().map(|t| &t.token).collect();
        // `hash_function := 'SHA256'` (GENERATE_SURROGATE_KEY's keyword argument).
        if let [name, Token::Assignment, Token::SingleQuotedString(value)] = kinds[..]
            && is_word(name, "hash_function")
        {
            hash_function = value.clone();
            continue;
        }
        if function == MacroFunction::Sql
            && let [Token::SingleQuotedString(sql)] = kinds[..]
        {
            rendered.push(sql.replace("''", "'"));
            continue;
        }
        rendered.push(render_statement(reader, argument, scope)?.trim().to_string());
    }
    let arity_error = |reader: &mut FileReader, expected: &str| {
        reader.error(at, format!("{} takes {expected}", at.token));
        None
    };
    let evaluated = |reader: &mut FileReader, sql: &str| match macro_functions::evaluate(sql) {
        Ok(value) => Some(value),
        Err(message) => {
            reader.error(at, format!("{}: {message}", at.token));
            None
        }
    };
    match function {
        MacroFunction::If => match rendered.as_slice() {
            [condition, then] => {
                Some(if evaluated(reader, condition)?.is_true() { then.clone() } else { String::new() })
            }
            [condition, then, otherwise] => {
                Some(if evaluated(reader, condition)?.is_true() { then.clone() } else { otherwise.clone() })
            }
            _ => arity_error(reader, "a condition, a value and an optional other value"),
        },
        MacroFunction::Sql => match rendered.as_slice() {
            [sql] => Some(sql.clone()),
            _ => arity_error(reader, "one string of SQL"),
        },
        MacroFunction::Eval => match rendered.as_slice() {
            [sql] => Some(evaluated(reader, sql)?.to_sql()),
            _ => arity_error(reader, "one expression"),
        },
        MacroFunction::SafeAdd if !rendered.is_empty() => Some(macro_functions::safe_arithmetic(&rendered, "+")),
        MacroFunction::SafeSub if !rendered.is_empty() => Some(macro_functions::safe_arithmetic(&rendered, "-")),
        MacroFunction::SafeAdd | MacroFunction::SafeSub => arity_error(reader, "one or more fields"),
        MacroFunction::SafeDiv => match rendered.as_slice() {
            [numerator, denominator] => Some(macro_functions::safe_div(numerator, denominator)),
            _ => arity_error(reader, "a numerator and a denominator"),
        },
        MacroFunction::And => Some(macro_functions::connective(&rendered, "AND")),
        MacroFunction::Or => Some(macro_functions::connective(&rendered, "OR")),
        MacroFunction::GenerateSurrogateKey if !rendered.is_empty() => {
            Some(macro_functions::surrogate_key(&rendered, &hash_function))
        }
        MacroFunction::GenerateSurrogateKey => arity_error(reader, "one or more fields"),
        MacroFunction::Each | MacroFunction::Filter | MacroFunction::Reduce => None,
    }
}

/// Substitutes a lambda's parameters (as words or `@name`) by `values` in its body and renders it.
fn apply_lambda(reader: &mut FileReader, lambda: &Lambda, values: &[&str], scope: &MacroScope) -> Option<String> {
    let body: Vec<TokenWithSpan> = lambda
        .body
        .iter()
        .map(|token| match &token.token {
            Token::Word(word) if word.quote_style.is_none() => {
                let name = word.value.trim_start_matches('@').to_ascii_lowercase();
                match lambda.parameters.iter().position(|parameter| *parameter == name) {
                    Some(position) => {
                        let value = macro_functions::operand(values.get(position).copied().unwrap_or("NULL"));
                        TokenWithSpan::new(Token::make_word(&value, None), token.span)
                    }
                    None => token.clone(),
                }
            }
            _ => token.clone(),
        })
        .collect();
    render_statement(reader, &body, scope).map(|text| text.trim().to_string())
}

/// `@EACH`, `@FILTER` and `@REDUCE`: items (an array `[a, b]`, a tuple, a nested `@EACH` or
/// `@FILTER`, or the arguments before the lambda) and the lambda applied to them.
fn call_list_function(
    reader: &mut FileReader,
    at: &TokenWithSpan,
    function: MacroFunction,
    arguments: &[Vec<TokenWithSpan>],
    scope: &MacroScope,
) -> Option<Vec<String>> {
    let lambda = arguments.split_last().and_then(|(last, items)| Some((read_lambda(last)?, items)));
    let Some((lambda, item_arguments)) = lambda else {
        reader
            .error(at, format!("{}'s last argument must be a lambda such as x -> x + 1 or (x, y) -> x + y", at.token));
        return None;
    };
    let items = list_items(reader, item_arguments, scope)?;
    match function {
        MacroFunction::Each => items.iter().map(|item| apply_lambda(reader, &lambda, &[item], scope)).collect(),
        MacroFunction::Filter => {
            let mut kept = Vec::new();
            for item in &items {
                let condition = apply_lambda(reader, &lambda, &[item], scope)?;
                match macro_functions::evaluate(&condition) {
                    Ok(value) if value.is_true() => kept.push(item.clone()),
                    Ok(_) => {}
                    Err(message) => {
                        reader.error(at, format!("{}: {message}", at.token));
                        return None;
                    }
                }
            }
            Some(kept)
        }
        _ => {
            let mut items = items.into_iter();
            let first = items.next()?;
            let reduced = items.try_fold(first, |acc, item| apply_lambda(reader, &lambda, &[&acc, &item], scope))?;
            Some(vec![reduced])
        }
    }
}

fn list_items(reader: &mut FileReader, arguments: &[Vec<TokenWithSpan>], scope: &MacroScope) -> Option<Vec<String>> {
    if let [argument] = arguments {
        let significant = significant(argument);
        let bracketed = matches!(
            (significant.first().map(|t| &t.token), significant.last().map(|t| &t.token)),
            (Some(Token::LBracket), Some(Token::RBracket)) | (Some(Token::LParen), Some(Token::RParen))
        );
        if bracketed {
            let inner: Vec<&TokenWithSpan> = significant[1..significant.len() - 1].to_vec();
            let mut items = Vec::new();
            for item in split_top_level_commas(&inner) {
                items.push(render_statement(reader, &spaced_tokens(&item), scope)?.trim().to_string());
            }
            return Some(items);
        }
        if let Some(first) = significant.first()
            && let Token::Word(word) = &first.token
            && let Some(function @ (MacroFunction::Each | MacroFunction::Filter)) =
                word.value.strip_prefix('@').and_then(|name| MacroFunction::from_name(&name.to_ascii_lowercase()))
        {
            let start = argument.iter().position(|t| std::ptr::eq(t, *first))? + 1;
            let (nested, _) = call_arguments(argument, start)?;
            return call_list_function(reader, first, function, &nested, scope);
        }
    }
    let mut items = Vec::new();
    for argument in arguments {
        items.push(render_statement(reader, argument, scope)?.trim().to_string());
    }
    // One argument that renders to an array or a tuple (a @DEF, a variable or an audit's
    // argument holding `[a, b]` or `(a, b)`): its items.
    if let [only] = items.as_slice()
        && let Some(inner) = only
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .or_else(|| only.strip_prefix('(').and_then(|rest| rest.strip_suffix(')')))
        && let Ok(tokens) = Tokenizer::new(&GenericDialect {}, inner).with_unescape(false).tokenize_with_location()
    {
        let significant = significant(&tokens);
        return Some(split_top_level_commas(&significant).iter().map(|item| join_tokens(item)).collect());
    }
    Some(items)
}

/// Tokens with single spaces between them (for tokens whose whitespace was dropped).
pub(crate) fn spaced_tokens(tokens: &[&TokenWithSpan]) -> Vec<TokenWithSpan> {
    let mut spaced = Vec::with_capacity(tokens.len() * 2);
    for (position, token) in tokens.iter().enumerate() {
        if position > 0 {
            spaced.push(TokenWithSpan::wrap(Token::Whitespace(Whitespace::Space)));
        }
        spaced.push((*token).clone());
    }
    spaced
}

/// `@{name}` starting at `index`: a word ending in `@` (the text before it kept), then `{`, a
/// name and `}` (or, at a word's start, the word `@{name` and `}`). Returns the text before
/// the `@`, the lower-cased name and the index after `}`.
fn interpolation(tokens: &[TokenWithSpan], index: usize) -> Option<(String, String, usize)> {
    let Token::Word(word) = &tokens.get(index)?.token else { return None };
    if word.quote_style.is_some() {
        return None;
    }
    // At a word's start the tokenizer reads `@{name` as one word.
    if let Some(name) = word.value.strip_prefix("@{")
        && matches!(tokens.get(index + 1).map(|t| &t.token), Some(Token::RBrace))
    {
        return Some((String::new(), name.to_ascii_lowercase(), index + 2));
    }
    let before = word.value.strip_suffix('@')?;
    match (&tokens.get(index + 1)?.token, &tokens.get(index + 2)?.token, &tokens.get(index + 3)?.token) {
        (Token::LBrace, Token::Word(name), Token::RBrace) => {
            Some((before.to_string(), name.value.to_ascii_lowercase(), index + 4))
        }
        _ => None,
    }
}

/// A value interpolated into an identifier: a string's text without its quotes.
fn as_identifier(value: &str) -> String {
    let value = value.trim();
    match value.strip_prefix('\'').and_then(|rest| rest.strip_suffix('\'')) {
        Some(text) => text.replace("''", "'"),
        None => value.to_string(),
    }
}

const MACRO_EXPECTATION: &str = "expected a time macro such as @start_ds or @end_ts, @this_model, @gateway, @model_kind_name, @VAR('name') or a name defined with @DEF";

/// Renders one statement's tokens to SQL text with every macro replaced, keeping line numbers.
fn render_statement(reader: &mut FileReader, tokens: &[TokenWithSpan], scope: &MacroScope) -> Option<String> {
    let mut text = String::new();
    let mut index = 0;
    let mut ok = true;
    while index < tokens.len() {
        // `@{name}`: the value of a @DEF or a config variable, as (part of) an identifier.
        if let Some((before, name, after)) = interpolation(tokens, index) {
            let value = scope.locals.get(&name).cloned().or_else(|| scope.variables.get(&name).map(|v| v.to_sql()));
            match value {
                Some(value) => text.push_str(&format!("{before}{}", as_identifier(&value))),
                None => {
                    reader
                        .error(&tokens[index], format!("unknown variable {name} in @{{{name}}}; {MACRO_EXPECTATION}"));
                    ok = false;
                }
            }
            index = after;
            continue;
        }
        let token = &tokens[index];
        index += 1;
        match &token.token {
            Token::Whitespace(Whitespace::SingleLineComment { comment, .. }) => {
                text.push_str(&"\n".repeat(comment.matches('\n').count()));
            }
            Token::Whitespace(Whitespace::MultiLineComment(comment)) => {
                let newlines = comment.matches('\n').count();
                text.push_str(if newlines == 0 { " " } else { "" });
                text.push_str(&"\n".repeat(newlines));
            }
            Token::SingleQuotedString(_) => text.push_str(&token.token.to_string()),
            Token::Word(word) if word.quote_style.is_none() && word.value.starts_with('@') => {
                let name = word.value[1..].to_ascii_lowercase();
                if let Some(time_macro) = TimeMacro::from_name(&name) {
                    text.push_str(&time_placeholder(time_macro));
                } else if name == "this_model" {
                    match scope.model_name {
                        Some(model_name) => text.push_str(&model_name.to_string()),
                        None => {
                            reader.error(token, "@this_model needs the model's name");
                            ok = false;
                        }
                    }
                } else if name == "gateway" {
                    text.push_str(&format!("'{}'", scope.gateway));
                } else if name == "model_kind_name" {
                    text.push_str(&format!("'{}'", scope.kind_name));
                } else if name == "var" {
                    // @VAR('name') or @VAR('name', default)
                    let rest: Vec<(usize, &TokenWithSpan)> = tokens[index..]
                        .iter()
                        .enumerate()
                        .filter(|(_, t)| !matches!(t.token, Token::Whitespace(_)))
                        .collect();
                    let Some(close) = rest.iter().position(|(_, t)| matches!(t.token, Token::RParen)) else {
                        reader.error(token, "expected @VAR('name') with a closing parenthesis");
                        return None;
                    };
                    let arguments: Vec<&TokenWithSpan> = rest[..close].iter().map(|(_, t)| *t).collect();
                    index += rest[close].0 + 1;
                    let (Some(Token::LParen), Some(Token::SingleQuotedString(variable))) =
                        (arguments.first().map(|t| &t.token), arguments.get(1).map(|t| &t.token))
                    else {
                        reader.error(token, "expected @VAR('name') or @VAR('name', default)");
                        ok = false;
                        continue;
                    };
                    match scope.variables.get(&variable.to_ascii_lowercase()) {
                        Some(value) => text.push_str(&value.to_sql()),
                        None if arguments.len() > 3 => text.push_str(&join_tokens(&arguments[3..])),
                        None => {
                            reader.error(
                                token,
                                format!("unknown variable {variable:?}; expected a key of variables in config.yaml"),
                            );
                            ok = false;
                        }
                    }
                } else if let Some(function) = MacroFunction::from_name(&name)
                    && let Some((arguments, after)) = call_arguments(tokens, index)
                {
                    index = after;
                    match call_function(reader, token, function, &arguments, scope) {
                        // Nothing (an @IF whose condition is false): as in SQLMesh, the expression
                        // goes with its alias and its place in the list.
                        Some(expansion) if expansion.is_empty() => index = skip_alias_and_comma(tokens, index),
                        Some(expansion) => text.push_str(&expansion),
                        None => ok = false,
                    }
                } else if let Some(lambda) = scope.lambdas.get(&name)
                    && let Some((arguments, after)) = call_arguments(tokens, index)
                {
                    index = after;
                    let mut values = Vec::with_capacity(arguments.len());
                    for argument in &arguments {
                        match render_statement(reader, argument, scope) {
                            Some(value) => values.push(value.trim().to_string()),
                            None => ok = false,
                        }
                    }
                    let values: Vec<&str> = values.iter().map(String::as_str).collect();
                    match apply_lambda(reader, lambda, &values, scope) {
                        Some(expansion) if ok => text.push_str(&expansion),
                        _ => ok = false,
                    }
                } else if let Some(value) = scope.locals.get(&name) {
                    text.push_str(value);
                } else if let Some(value) = scope.variables.get(&name) {
                    // A config variable by its bare name, as SQLMesh allows besides @VAR('name').
                    text.push_str(&value.to_sql());
                } else if let Some(python_file) = scope.python_macros.get(&name) {
                    reader.unsupported(
                        token,
                        format!(
                            "{} is a Python macro ({python_file}), which sluice cannot run; write its SQL in the model, or as a @DEF",
                            word.value
                        ),
                    );
                    ok = false;
                } else if SQLMESH_MACROS.contains(&name.as_str()) {
                    reader.unsupported(
                        token,
                        format!(
                            "{} is a SQLMesh macro sluice does not evaluate yet; write its SQL out in the model",
                            word.value
                        ),
                    );
                    ok = false;
                } else {
                    reader.error(token, format!("unknown macro {}; {MACRO_EXPECTATION}", word.value));
                    ok = false;
                }
            }
            other => text.push_str(&other.to_string()),
        }
    }
    ok.then_some(text)
}

/// Splits tokens into statements at `;` outside parentheses.
pub(crate) fn split_statements(tokens: &[TokenWithSpan]) -> Vec<&[TokenWithSpan]> {
    let mut statements = Vec::new();
    let mut start = 0;
    let mut depth = 0i32;
    for (index, token) in tokens.iter().enumerate() {
        match token.token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::SemiColon if depth == 0 => {
                statements.push(&tokens[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    statements.push(&tokens[start..]);
    statements
}

/// Names an audit's query may use besides its arguments.
const AUDIT_MACROS: &[&str] = &["this_model", "gateway", "model_kind_name", "var"];

/// Renders one of the model's audit calls: the arguments in the model's scope, then the
/// definition's query with them (over its defaults) as macro variables; `@this_model` is the
/// model's name. `None` after reporting an error.
fn render_audit(
    reader: &mut FileReader,
    key: &TokenWithSpan,
    call: &AuditCall,
    definition: &AuditDefinition,
    scope: &MacroScope,
    model_dialect: &str,
    catalog: Option<&str>,
) -> Option<ModelAudit> {
    let mut locals = definition.defaults.clone();
    let mut blocking = definition.blocking;
    for (name, value) in &call.arguments {
        let rendered = render_statement(reader, value, scope)?.trim().to_string();
        if name == "blocking" {
            match rendered.to_ascii_lowercase().as_str() {
                "true" => blocking = true,
                "false" => blocking = false,
                other => {
                    reader
                        .error(key, format!("audit {}: expected blocking := true or false, found {other}", call.name));
                    return None;
                }
            }
        } else {
            locals.insert(name.clone(), rendered);
        }
    }
    let missing: BTreeSet<String> = definition
        .query
        .iter()
        .filter_map(|token| match &token.token {
            Token::Word(word) if word.quote_style.is_none() && word.value.starts_with('@') => {
                Some(word.value[1..].to_ascii_lowercase())
            }
            _ => None,
        })
        .filter(|name| {
            !(locals.contains_key(name)
                || scope.variables.contains_key(name)
                || scope.python_macros.contains_key(name)
                || TimeMacro::from_name(name).is_some()
                || MacroFunction::from_name(name).is_some()
                || AUDIT_MACROS.contains(&name.as_str())
                || SQLMESH_MACROS.contains(&name.as_str()))
        })
        .collect();
    if !missing.is_empty() {
        let arguments: Vec<String> = missing.iter().map(|name| format!("{name} := ...")).collect();
        let missing: Vec<&str> = missing.iter().map(String::as_str).collect();
        reader.error(
            key,
            format!(
                "audit {} needs the argument{} {}; call it as {}({})",
                call.name,
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", "),
                call.name,
                arguments.join(", ")
            ),
        );
        return None;
    }
    let audit_scope = MacroScope {
        model_name: scope.model_name,
        gateway: scope.gateway,
        kind_name: scope.kind_name,
        variables: scope.variables,
        locals,
        lambdas: BTreeMap::new(),
        python_macros: scope.python_macros,
    };
    let mut audit_reader = FileReader::new(&definition.file);
    let rendered = render_statement(&mut audit_reader, &definition.query, &audit_scope);
    if let Err(errors) = audit_reader.errors.finish(()) {
        for error in errors.0 {
            reader.errors.push_error(error);
        }
    }
    let rendered = rendered?;
    // Pad so that the parser's line numbers are the defining file's.
    let first_line = definition
        .query
        .iter()
        .find(|token| !matches!(token.token, Token::Whitespace(_)))
        .map(|token| token.span.start.line)
        .unwrap_or(1);
    let leading_lines = definition
        .query
        .iter()
        .take_while(|token| matches!(token.token, Token::Whitespace(_)))
        .map(|token| token.token.to_string().matches('\n').count())
        .sum::<usize>();
    let padding = "\n".repeat((first_line as usize).saturating_sub(1 + leading_lines));
    let dialect = definition.dialect.as_deref().unwrap_or(model_dialect);
    match parse_query(&(padding + &rendered), dialect) {
        Ok(query) => {
            let query = match catalog {
                Some(catalog) => query.without_catalog(catalog),
                None => query,
            };
            Some(ModelAudit { call: call.text.clone(), blocking, query })
        }
        Err(error) => {
            let location = if error.line == 0 {
                SourceLocation::file(&definition.file)
            } else {
                SourceLocation::new(&definition.file, error.line, error.column)
            };
            reader.errors.push(
                location,
                format!(
                    "audit {} (as {} calls it): SQL does not parse ({dialect}): {}",
                    definition.name, reader.file, error.message
                ),
            );
            None
        }
    }
}

/// The tokens of one property of a file's MODEL block (its key, then its value), when the block
/// can be read.
fn declared_property(tokens: &[TokenWithSpan], key: &str) -> Option<Vec<TokenWithSpan>> {
    let significant = significant(tokens);
    let (model, rest) = significant.split_first()?;
    if !is_word(&model.token, "MODEL") || !matches!(rest.first().map(|t| &t.token), Some(Token::LParen)) {
        return None;
    }
    let mut depth = 0i32;
    let mut block = Vec::new();
    for token in rest {
        match token.token {
            Token::LParen | Token::LBracket => depth += 1,
            Token::RParen | Token::RBracket => depth -= 1,
            _ => {}
        }
        if depth == 0 {
            break;
        }
        block.push(*token);
    }
    let items = split_top_level_commas(block.get(1..)?);
    let item = items.into_iter().find(|item| item.first().is_some_and(|first| is_word(&first.token, key)))?;
    Some(item.into_iter().cloned().collect())
}

/// The model name a model file declares (its MODEL block's `name`), when it can be read: what
/// a file sluice cannot run is known by.
pub fn declared_name(text: &str) -> Option<ModelName> {
    let tokens = Tokenizer::new(&GenericDialect {}, text).with_unescape(false).tokenize_with_location().ok()?;
    let property = declared_property(&tokens, "name")?;
    let (key, value) = property.split_first()?;
    let value: Vec<&TokenWithSpan> = value.iter().collect();
    let mut reader = FileReader::new("");
    ModelName::parse(&reader.scalar(key, &value)?).ok()
}

/// Whether a model file declares `kind EXTERNAL`: a table outside the project, which SQLMesh
/// reads as it is (the file's query is never run), as `external_models.yaml` declares one.
pub fn declares_external(text: &str) -> bool {
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, text).with_unescape(false).tokenize_with_location() else {
        return false;
    };
    let Some(property) = declared_property(&tokens, "kind") else { return false };
    matches!(property.as_slice(), [_, kind] if is_word(&kind.token, "EXTERNAL"))
}

/// Reads one model file. `file` is its project-relative path, used in messages and for seed paths.
pub fn parse_model_file(file: &str, text: &str, context: ModelFileContext) -> Result<ParsedModel, Vec<ProjectError>> {
    let mut reader = FileReader { file, errors: ErrorSink::default(), warnings: Vec::new() };
    let tokens = match Tokenizer::new(&GenericDialect {}, text).with_unescape(false).tokenize_with_location() {
        Ok(tokens) => tokens,
        Err(error) => {
            let location = SourceLocation::new(file, error.location.line, error.location.column);
            return Err(vec![ProjectError::new(location, format!("cannot read SQL: {}", error.message))]);
        }
    };
    let all_significant = significant(&tokens);
    let model_start = all_significant.first().copied();
    let opens_with_model = matches!(
        (all_significant.first().map(|t| &t.token), all_significant.get(1).map(|t| &t.token)),
        (Some(first), Some(Token::LParen)) if is_word(first, "MODEL")
    );
    if !opens_with_model {
        let location = model_start.map(|t| reader.at(t)).unwrap_or_else(|| SourceLocation::new(file, 1, 1));
        return Err(vec![ProjectError::new(location, "expected the file to start with a MODEL (...) block")]);
    }
    // Find the closing parenthesis of the MODEL block in the full token list.
    let mut depth = 0i32;
    let mut block_end = None;
    let mut block_tokens = Vec::new();
    let opening_index = tokens.iter().position(|t| matches!(t.token, Token::LParen)).unwrap_or(0);
    for (index, token) in tokens.iter().enumerate().skip(opening_index) {
        match token.token {
            Token::LParen | Token::LBracket => depth += 1,
            Token::RParen | Token::RBracket => depth -= 1,
            _ => {}
        }
        if depth == 0 {
            block_end = Some(index);
            break;
        }
        if index > opening_index && !matches!(token.token, Token::Whitespace(_)) {
            block_tokens.push(token);
        }
    }
    let Some(block_end) = block_end else {
        let location = model_start.map(|t| reader.at(t)).unwrap_or_else(|| SourceLocation::new(file, 1, 1));
        return Err(vec![ProjectError::new(location, "the MODEL block has no closing parenthesis")]);
    };

    // Properties.
    let mut properties: BTreeMap<String, (&TokenWithSpan, Vec<&TokenWithSpan>)> = BTreeMap::new();
    for item in split_top_level_commas(&block_tokens) {
        let Some((key, value)) = item.split_first() else { continue };
        let Token::Word(word) = &key.token else {
            reader.error(key, format!("expected a property name, found {}", key.token));
            continue;
        };
        let name = word.value.to_ascii_lowercase();
        if SQLMESH_ONLY_PROPERTIES.contains(&name.as_str()) {
            reader.warn(key, format!("property {name} is accepted by SQLMesh but not used by sluice yet"));
            continue;
        }
        if !PROPERTIES.contains(&name.as_str()) {
            reader.error(key, format!("unknown property {name}; expected one of {}", PROPERTIES.join(", ")));
            continue;
        }
        if properties.contains_key(&name) {
            reader.error(key, format!("property {name} is given twice"));
            continue;
        }
        properties.insert(name, (*key, value.to_vec()));
    }
    let model_token = model_start.unwrap_or(&tokens[0]);
    let config = context.config;
    let mut take = |name: &str| properties.remove(name);

    // `catalog.schema.table`: the catalog must be the gateway's (checked below, once the
    // gateway is known) and is dropped.
    let mut name_catalog = None;
    let name = match take("name") {
        Some((key, value)) => reader.scalar(key, &value).and_then(|text| {
            let text = match text.split('.').collect::<Vec<_>>().as_slice() {
                [catalog, schema, table] => {
                    name_catalog = Some((catalog.to_ascii_lowercase(), value.first().copied().unwrap_or(key)));
                    format!("{schema}.{table}")
                }
                _ => text,
            };
            match ModelName::parse(&text) {
                Ok(name) => Some(name),
                Err(message) => {
                    reader.error(value.first().copied().unwrap_or(key), message);
                    None
                }
            }
        }),
        None => {
            reader.error(model_token, "the MODEL block has no name property; expected name schema.table");
            None
        }
    };
    let mut disable_restatement = None;
    let kind = match take("kind") {
        Some((key, value)) => read_kind(&mut reader, key, &value, &mut disable_restatement),
        None => match &config.model_defaults.kind {
            Some(default) => match default.to_ascii_uppercase().as_str() {
                "VIEW" => Some(ModelKind::View),
                "FULL" => Some(ModelKind::Full),
                "EMBEDDED" => Some(ModelKind::Embedded),
                other => {
                    reader.error(
                        model_token,
                        format!("model_defaults.kind {other} needs arguments; give kind in the model"),
                    );
                    None
                }
            },
            None => Some(ModelKind::View),
        },
    };
    // `partitioned_by` names an INCREMENTAL_BY_PARTITION model's partition columns; on other
    // kinds it is a storage hint sluice does not use.
    let partition_columns = |reader: &mut FileReader, key, value: &[&TokenWithSpan]| -> Option<Vec<String>> {
        reader.list(key, value).map(|columns| columns.into_iter().map(|c| c.to_ascii_lowercase()).collect())
    };
    let kind = match (kind, take("partitioned_by")) {
        (Some(ModelKind::IncrementalByPartition { batch_size, .. }), Some((key, value))) => {
            partition_columns(&mut reader, key, &value)
                .map(|partitioned_by| ModelKind::IncrementalByPartition { partitioned_by, batch_size })
        }
        (Some(ModelKind::IncrementalByPartition { .. }), None) => {
            reader.error(
                model_token,
                "INCREMENTAL_BY_PARTITION needs a partitioned_by property naming its partition columns",
            );
            None
        }
        (Some(ModelKind::IncrementalUnmanaged { insert_overwrite, forward_only, .. }), Some((key, value))) => {
            partition_columns(&mut reader, key, &value).map(|partitioned_by| ModelKind::IncrementalUnmanaged {
                insert_overwrite,
                partitioned_by,
                forward_only,
            })
        }
        (Some(ModelKind::IncrementalUnmanaged { insert_overwrite: true, .. }), None) => {
            reader.error(model_token, "INCREMENTAL_UNMANAGED with insert_overwrite needs a partitioned_by property naming the partitions it overwrites");
            None
        }
        (kind, Some((key, _))) => {
            reader.warn(key, "property partitioned_by is accepted by SQLMesh but not used by sluice yet");
            kind
        }
        (kind, None) => kind,
    };
    let cron = match take("cron") {
        Some((key, value)) => reader.scalar(key, &value).and_then(|text| match Cron::parse(&text) {
            Ok(cron) => Some(cron),
            Err(error) => {
                reader.error(value[0], error.to_string());
                None
            }
        }),
        None => config.model_defaults.cron.clone().or_else(|| Cron::parse("@daily").ok()),
    };
    // Without a start (here or in model_defaults) the plan derives one as SQLMesh does.
    let start = match take("start") {
        Some((key, value)) => reader.timestamp(key, &value).map(Some),
        None => Some(config.model_defaults.start),
    };
    let end = take("end").and_then(|(key, value)| reader.timestamp(key, &value));
    let owner = take("owner").and_then(|(key, value)| reader.scalar(key, &value));
    let description = take("description").and_then(|(key, value)| reader.scalar(key, &value));
    let grain =
        take("grain").or_else(|| take("grains")).and_then(|(key, value)| reader.list(key, &value)).unwrap_or_default();
    let depends_on: Vec<String> = take("depends_on")
        .and_then(|(key, value)| reader.list(key, &value))
        .unwrap_or_default()
        .into_iter()
        .map(|name| name.to_ascii_lowercase())
        .collect();
    let tags = take("tags").and_then(|(key, value)| reader.list(key, &value)).unwrap_or_default();
    let enabled = take("enabled").and_then(|(key, value)| reader.boolean(key, &value)).unwrap_or(true);
    let gateway = match take("gateway") {
        Some((key, value)) => reader.scalar(key, &value).and_then(|gateway| {
            if config.gateways.contains_key(&gateway) {
                Some(gateway)
            } else {
                let known: Vec<&str> = config.gateways.keys().map(String::as_str).collect();
                reader.error(value[0], format!("unknown gateway {gateway:?}; expected one of: {}", known.join(", ")));
                None
            }
        }),
        None => Some(config.default_gateway.clone()),
    };
    let default_dialect = gateway
        .as_ref()
        .and_then(|gateway| config.gateways.get(gateway))
        .map(|gateway| gateway.connection.default_dialect().to_string());
    let dialect = match take("dialect") {
        Some((key, value)) => reader.scalar(key, &value).map(|dialect| dialect.to_ascii_lowercase()),
        None => config.model_defaults.dialect.clone().or(default_dialect),
    };
    if let Some(dialect_name) = &dialect
        && dialect_for(dialect_name).is_none()
    {
        reader.error(
            model_token,
            format!("unknown dialect {dialect_name:?}; expected duckdb, postgres, mysql or another sqlparser dialect"),
        );
    }
    // A time column's format is written in the model's dialect.
    let kind = match kind {
        Some(ModelKind::IncrementalByTimeRange {
            time_column,
            time_format: Some(format),
            batch_size,
            batch_concurrency,
            lookback,
            forward_only,
        }) => {
            let format = crate::dialect::time_format_as_strftime(dialect.as_deref().unwrap_or(""), &format);
            Some(ModelKind::IncrementalByTimeRange {
                time_column,
                time_format: (format != "%Y-%m-%d").then_some(format),
                batch_size,
                batch_concurrency,
                lookback,
                forward_only,
            })
        }
        kind => kind,
    };
    let catalog =
        gateway.as_ref().and_then(|gateway| config.gateways.get(gateway)).and_then(|g| g.connection.catalog());
    if let (Some((written, at)), Some(gateway)) = (&name_catalog, &gateway)
        && catalog.as_ref() != Some(written)
    {
        let expected = match &catalog {
            Some(catalog) => format!("its catalog is {catalog}"),
            None => "it has no catalogs".to_string(),
        };
        reader.error(
            at,
            format!(
                "catalog {written} is not gateway {gateway}'s ({expected}); sluice writes a model into its gateway's catalog, so name it schema.table or {}.schema.table",
                catalog.as_deref().unwrap_or("CATALOG")
            ),
        );
    }
    // DuckDB names a database file's catalog after the file: a schema of the same name makes
    // every reference to it ambiguous, and promotion would fail.
    if let Some(name) = &name
        && let Some(gateway) = gateway.as_ref().and_then(|gateway| config.gateways.get(gateway))
        && let Connection::DuckDb { database } = &gateway.connection
        && gateway.connection.catalog().is_some_and(|catalog| catalog == name.schema)
    {
        reader.error(
            model_token,
            format!(
                "schema {:?} is also the catalog name DuckDB gives gateway {}'s file {database:?}; rename the file or the schema",
                name.schema, gateway.name
            ),
        );
    }
    let columns = match take("columns") {
        Some((key, value)) => {
            let wrapped = matches!(value.first().map(|t| &t.token), Some(Token::LParen))
                && matches!(value.last().map(|t| &t.token), Some(Token::RParen));
            if !wrapped {
                reader.error(key, "expected columns (name TYPE, ...)");
                Vec::new()
            } else {
                let mut columns = Vec::new();
                for item in split_top_level_commas(&value[1..value.len() - 1]) {
                    match item.split_first() {
                        Some((column, column_type)) if !column_type.is_empty() => {
                            let column_name = match &column.token {
                                Token::Word(word) => word.value.to_ascii_lowercase(),
                                other => other.to_string(),
                            };
                            if !is_valid_identifier(&column_name) {
                                reader.error(
                                    column,
                                    format!("column name {column_name:?} is not {IDENTIFIER_EXPECTATION}"),
                                );
                            }
                            columns.push((column_name, join_tokens(column_type)));
                        }
                        Some((column, _)) => reader.error(column, "expected a column name followed by its type"),
                        None => {}
                    }
                }
                columns
            }
        }
        None => Vec::new(),
    };

    let audit_calls = take("audits").and_then(|(key, value)| Some((key, audit::read_calls(&mut reader, key, &value)?)));

    // Statements after the MODEL block.
    let mut statements = split_statements(&tokens[block_end + 1..]).into_iter();
    let mut inline_audits: BTreeMap<String, AuditDefinition> = BTreeMap::new();
    let kind_name = kind.as_ref().map(ModelKind::name).unwrap_or("VIEW");
    let mut scope = MacroScope {
        model_name: name.as_ref(),
        gateway: gateway.as_deref().unwrap_or(""),
        kind_name,
        variables: &config.variables,
        locals: BTreeMap::new(),
        lambdas: BTreeMap::new(),
        python_macros: context.python_macros,
    };
    let mut pre_statements = Vec::new();
    let mut post_statements = Vec::new();
    let mut query = None;
    let mut query_token = None;
    let mut query_failed = false;
    while let Some(statement) = statements.next() {
        let statement_significant = significant(statement);
        let Some(first) = statement_significant.first() else { continue };
        if is_word(&first.token, "@DEF") {
            // @DEF(name, value)
            let inner = &statement_significant[1..];
            let well_formed = matches!(inner.first().map(|t| &t.token), Some(Token::LParen))
                && matches!(inner.last().map(|t| &t.token), Some(Token::RParen));
            let items = if well_formed { split_top_level_commas(&inner[1..inner.len() - 1]) } else { Vec::new() };
            let [local_name, value] = items.as_slice() else {
                reader.error(first, "expected @DEF(name, value)");
                continue;
            };
            let (Some(Token::Word(local_word)), 1) = (local_name.first().map(|t| &t.token), local_name.len()) else {
                reader.error(first, "expected @DEF(name, value) with a plain name");
                continue;
            };
            let local_key = local_word.value.to_ascii_lowercase();
            // Spaces between value tokens were dropped: render them with single spaces between.
            let spaced = spaced_tokens(value);
            if let Some(lambda) = read_lambda(&spaced) {
                scope.lambdas.insert(local_key, lambda);
                continue;
            }
            if let Some(rendered) = render_statement(&mut reader, &spaced, &scope) {
                scope.locals.insert(local_key, rendered);
            }
            continue;
        }
        // An AUDIT block: the model's own audit, its query the next statement.
        if let Some((properties, at)) = audit::audit_block(&statement_significant) {
            if let Some(definition) = audit::read_definition(&mut reader, at, &properties, statements.next()) {
                inline_audits.insert(definition.name.clone(), definition);
            }
            continue;
        }
        if is_word(&first.token, "AUDIT") {
            reader.error(first, "expected an AUDIT (name ..., ...) block");
            query_failed = true;
            break;
        }
        let opens_jinja = ["JINJA_QUERY_BEGIN", "JINJA_STATEMENT_BEGIN", "JINJA_END"]
            .iter()
            .any(|keyword| is_word(&first.token, keyword))
            || matches!(first.token, Token::LBrace);
        if opens_jinja {
            reader.unsupported(
                first,
                "Jinja blocks are not rendered by sluice yet; write the model in SQL with SQLMesh macros",
            );
            query_failed = true;
            break;
        }
        let starts_query = matches!(first.token, Token::LParen)
            || ["SELECT", "WITH", "FROM", "VALUES"].iter().any(|keyword| is_word(&first.token, keyword));
        let rendered = render_statement(&mut reader, statement, &scope);
        if query_token.is_none() && starts_query && rendered.is_none() {
            query_token = Some(*first);
            query_failed = true;
            continue;
        }
        let Some(rendered) = rendered else { continue };
        if query_token.is_none() && starts_query {
            query_token = Some(*first);
            // Pad so that the parser's line numbers are the file's.
            let first_token = &statement[0];
            let padding = "\n".repeat(first_token.span.start.line.saturating_sub(1) as usize)
                + &" ".repeat(first_token.span.start.column.saturating_sub(1) as usize);
            query = Some(padding + &rendered);
        } else if query_token.is_none() {
            pre_statements.push(rendered.trim().to_string());
        } else {
            post_statements.push(rendered.trim().to_string());
        }
    }

    let mut seed = None;
    let mut model_query = None;
    match (&kind, query, query_token) {
        (Some(ModelKind::Seed { path, .. }), query, _) => {
            if query.is_some() {
                reader.error(model_token, "a SEED model takes its rows from its CSV file and has no query");
            }
            match resolve_relative(file, path)
                .and_then(|resolved| context.csv_files.get(&resolved).map(|t| (resolved, t)))
            {
                Some((resolved, csv_text)) => match read_seed(csv_text) {
                    Ok(data) => seed = Some(data),
                    Err(message) => reader.errors.push(SourceLocation::file(resolved), message),
                },
                None => reader
                    .error(model_token, format!("seed file {path:?} not found (paths are relative to the model file)")),
            }
        }
        (_, None, _) if query_failed => {}
        (_, None, _) => reader.error(
            model_token,
            "the model has no query; expected a SELECT (or WITH ...) statement after the MODEL block",
        ),
        (_, Some(query_text), Some(query_token)) => {
            if let Some(dialect_name) = &dialect
                && dialect_for(dialect_name).is_some()
            {
                match parse_query(&query_text, dialect_name) {
                    Ok(parsed) => {
                        model_query = Some(match &catalog {
                            Some(catalog) => parsed.without_catalog(catalog),
                            None => parsed,
                        })
                    }
                    Err(error) => {
                        let location = if error.line == 0 {
                            reader.at(query_token)
                        } else {
                            SourceLocation::new(file, error.line, error.column)
                        };
                        reader.errors.push(location, format!("SQL does not parse ({dialect_name}): {}", error.message));
                    }
                }
            }
        }
        (_, Some(_), None) => {}
    }

    let mut audits = Vec::new();
    if let Some((key, calls)) = audit_calls {
        if matches!(kind, Some(ModelKind::Embedded)) {
            reader.error(key, "an EMBEDDED model has no table to audit; audit the models that read it");
        } else if let Some(dialect_name) = dialect.as_deref().filter(|dialect| dialect_for(dialect).is_some()) {
            for call in &calls {
                let definition = inline_audits
                    .get(&call.name)
                    .cloned()
                    .or_else(|| context.audits.get(&call.name).cloned())
                    .or_else(|| audit::builtin(&call.name));
                match definition {
                    Some(definition) if definition.skip => {}
                    Some(definition) => {
                        if let Some(rendered) = render_audit(&mut reader, key, call, &definition, &scope, dialect_name, catalog.as_deref()) {
                            audits.push(rendered);
                        }
                    }
                    None if audit::BUILTINS_NOT_PROVIDED.contains(&call.name.trim_end_matches("_non_blocking")) => {
                        reader.unsupported(
                            key,
                            format!(
                                "the built-in audit {} is not provided by sluice yet; write it as an audit in audits/*.sql",
                                call.name
                            ),
                        )
                    }
                    None => reader.error(
                        key,
                        format!(
                            "audit {} is not defined; expected a built-in audit, one in audits/*.sql or an AUDIT block in this file",
                            call.name
                        ),
                    ),
                }
            }
        }
    }

    // `depends_on` names in the gateway's catalog are the models' own names.
    let depends_on: Vec<String> = depends_on
        .into_iter()
        .map(|parent| match (&catalog, parent.split('.').collect::<Vec<_>>().as_slice()) {
            (Some(catalog), [written, schema, table]) if written == catalog => format!("{schema}.{table}"),
            _ => parent,
        })
        .collect();

    let FileReader { errors, warnings, .. } = reader;
    let (Some(name), Some(kind), Some(cron), Some(start), Some(gateway), Some(dialect)) =
        (name, kind, cron, start, gateway, dialect)
    else {
        return Err(errors.finish(()).err().map(|e| e.0).unwrap_or_default());
    };
    // SQLMesh never restates an INCREMENTAL_UNMANAGED model unless told it may.
    let disable_restatement = disable_restatement.unwrap_or(kind.disables_restatement_by_default());
    let model = Model {
        name,
        file: file.to_string(),
        disable_restatement,
        kind,
        cron,
        start,
        end,
        owner,
        description,
        grain,
        gateway,
        dialect,
        tags,
        depends_on,
        columns,
        enabled,
        pre_statements,
        post_statements,
        query: model_query,
        seed,
        audits,
        stored: None,
    };
    errors.finish(ParsedModel { model, warnings }).map_err(|errors| errors.0)
}

/// A model file's texts, one per blueprint: with `blueprints ((name := a.b, v := 1), …)` in its
/// MODEL block, the file is a template, and each blueprint's values replace `@name` and
/// `@BLUEPRINT_VAR('name')` throughout (the property itself removed), as SQLMesh expands it.
/// Without blueprints, the text itself.
pub fn expand_blueprints(file: &str, text: &str) -> Result<Vec<String>, Vec<ProjectError>> {
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, text).with_unescape(false).tokenize_with_location() else {
        return Ok(vec![text.to_string()]);
    };
    // The `blueprints` property: its tokens (key to value's end, with the comma before it).
    let mut depth = 0usize;
    let mut property: Option<(usize, usize)> = None;
    let mut previous_significant: Option<usize> = None;
    for (index, token) in tokens.iter().enumerate() {
        match token.token {
            Token::LParen | Token::LBracket => depth += 1,
            Token::RParen | Token::RBracket => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    break;
                }
            }
            Token::Word(_)
                if depth == 1
                    && is_word(&token.token, "blueprints")
                    && previous_significant
                        .is_some_and(|p| matches!(tokens[p].token, Token::Comma | Token::LParen)) =>
            {
                // From the comma before it (or the key, first in the block) to the end of its value.
                let mut value_depth = 0usize;
                let mut end = tokens.len();
                for (offset, value_token) in tokens[index + 1..].iter().enumerate() {
                    match value_token.token {
                        Token::LParen | Token::LBracket => value_depth += 1,
                        Token::RParen | Token::RBracket if value_depth == 0 => {
                            end = index + 1 + offset;
                            break;
                        }
                        Token::RParen | Token::RBracket => value_depth -= 1,
                        Token::Comma if value_depth == 0 => {
                            end = index + 1 + offset;
                            break;
                        }
                        _ => {}
                    }
                }
                let start = match previous_significant {
                    Some(p) if matches!(tokens[p].token, Token::Comma) => p,
                    _ => index,
                };
                property = Some((start, end));
                break;
            }
            _ => {}
        }
        if !matches!(token.token, Token::Whitespace(_)) {
            previous_significant = Some(index);
        }
    }
    let Some((start, end)) = property else { return Ok(vec![text.to_string()]) };
    let key_index =
        tokens[start..end].iter().position(|t| is_word(&t.token, "blueprints")).map_or(start, |p| start + p);
    let value: Vec<&TokenWithSpan> = significant(&tokens[key_index + 1..end]);
    let location = SourceLocation::new(file, tokens[key_index].span.start.line, tokens[key_index].span.start.column);
    let expected = "expected blueprints ((name := value, …), …)";
    let wrapped = |items: &[&TokenWithSpan]| {
        matches!(
            (items.first().map(|t| &t.token), items.last().map(|t| &t.token)),
            (Some(Token::LParen), Some(Token::RParen)) | (Some(Token::LBracket), Some(Token::RBracket))
        )
    };
    if !wrapped(&value) {
        return Err(vec![ProjectError::new(location, expected)]);
    }
    let mut texts = Vec::new();
    for blueprint in split_top_level_commas(&value[1..value.len() - 1]) {
        if blueprint.is_empty() {
            continue;
        }
        if !wrapped(&blueprint) {
            return Err(vec![ProjectError::new(location.clone(), expected)]);
        }
        let mut values: BTreeMap<String, String> = BTreeMap::new();
        for pair in split_top_level_commas(&blueprint[1..blueprint.len() - 1]) {
            match pair.as_slice() {
                [] => {}
                [key, assign, rest @ ..] if matches!(assign.token, Token::Assignment) && !rest.is_empty() => {
                    let Token::Word(word) = &key.token else {
                        return Err(vec![ProjectError::new(location.clone(), expected)]);
                    };
                    values.insert(word.value.to_ascii_lowercase(), join_tokens(rest));
                }
                _ => return Err(vec![ProjectError::new(location.clone(), expected)]),
            }
        }
        let mut expanded = String::with_capacity(text.len());
        let mut index = 0;
        while index < tokens.len() {
            if index == start {
                index = end;
                continue;
            }
            if let Some((before, name, after)) = interpolation(&tokens, index)
                && let Some(value) = values.get(&name)
            {
                expanded.push_str(&format!("{before}{}", as_identifier(value)));
                index = after;
                continue;
            }
            let token = &tokens[index];
            index += 1;
            if let Token::Word(word) = &token.token
                && word.quote_style.is_none()
                && let Some(name) = word.value.strip_prefix('@').map(str::to_ascii_lowercase)
            {
                if name == "blueprint_var"
                    && let Some((arguments, after)) = call_arguments(&tokens, index)
                    && let [argument] = arguments.as_slice()
                    && let [Token::SingleQuotedString(variable)] =
                        significant(argument).iter().map(|t| &t.token).collect::<Vec<_>>()[..]
                    && let Some(value) = values.get(&variable.to_ascii_lowercase())
                {
                    expanded.push_str(value);
                    index = after;
                    continue;
                }
                if let Some(value) = values.get(&name) {
                    expanded.push_str(value);
                    continue;
                }
            }
            expanded.push_str(&token.token.to_string());
        }
        texts.push(expanded);
    }
    Ok(texts)
}

/// The catalog name DuckDB gives a database file: its name without the extension.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;
    use crate::interval::Interval;
    use crate::query::QueryTemplate;

    fn config() -> Config {
        let text = "gateways:\n  wh:\n    connection:\n      type: duckdb\nmodel_defaults:\n  start: 2024-01-01\nvariables:\n  region: eu\n  limit: 5\n";
        parse_config("config.yaml", text).config.unwrap()
    }

    fn parse(text: &str) -> Result<ParsedModel, Vec<ProjectError>> {
        let config = config();
        let csv_files = BTreeMap::from([("seeds/x.csv".to_string(), "id,name\n1,a\n2,b\n".to_string())]);
        parse_model_file(
            "models/m.sql",
            text,
            ModelFileContext {
                config: &config,
                audits: &BTreeMap::new(),
                csv_files: &csv_files,
                python_macros: &BTreeMap::new(),
            },
        )
    }

    fn messages(errors: Vec<ProjectError>) -> Vec<String> {
        errors.into_iter().map(|error| error.to_string()).collect()
    }

    #[test]
    fn renders_every_kind_of_macro() {
        let text = "MODEL (
  name s.m,
  kind INCREMENTAL_BY_TIME_RANGE (time_column ds, lookback 2, batch_size 3),
  cron '0 * * * *',
  owner jane,
  tags [a, 'b'],
  grain (id, ds),
  columns (id INT, amount DECIMAL(10, 2))
);
@DEF(threshold, 10 + 1);
SET threads = 1;
SELECT id, @gateway AS g, @model_kind_name AS k, @VAR('region') AS r, @VAR('missing', 7) AS d,
  @start_ds AS s, @end_ts AS e, @execution_epoch AS x
FROM @this_model
WHERE amount > @threshold -- a comment
LIMIT @VAR('limit');
ANALYZE;
";
        let parsed = parse(text).unwrap();
        let model = parsed.model;
        assert_eq!(model.name.to_string(), "s.m");
        assert_eq!(
            model.kind,
            ModelKind::IncrementalByTimeRange {
                time_column: "ds".into(),
                time_format: None,
                batch_size: Some(3),
                batch_concurrency: None,
                lookback: 2,
                forward_only: false
            }
        );
        assert_eq!(model.owner.as_deref(), Some("jane"));
        assert_eq!(model.tags, vec!["a", "b"]);
        assert_eq!(model.grain, vec!["id", "ds"]);
        assert_eq!(model.columns, vec![("id".into(), "INT".into()), ("amount".into(), "DECIMAL(10, 2)".into())]);
        assert_eq!(model.pre_statements, vec!["SET threads = 1"]);
        assert_eq!(model.post_statements, vec!["ANALYZE"]);
        assert!(model.is_self_referencing());
        let query = model.query.unwrap();
        let template = QueryTemplate::from_sql(&query.normalized);
        let hour = Interval::new(Timestamp(3600), Timestamp(7200));
        assert_eq!(
            template.fill(hour, Timestamp(10_000)),
            "SELECT id, 'wh' AS g, 'INCREMENTAL_BY_TIME_RANGE' AS k, 'eu' AS r, 7 AS d, '1970-01-01' AS s, \
             '1970-01-01 01:59:59.999999' AS e, 10000 AS x FROM s.m WHERE amount > 10 + 1 LIMIT 5"
        );
        assert!(parsed.warnings.is_empty());
    }

    #[test]
    fn macro_functions_expand_before_the_query_is_parsed() {
        let text = "MODEL (name s.m, kind FULL);
@DEF(columns, [a, b]);
@DEF(scaled, (x, k) -> x * k + 1);
SELECT
  @scaled(a, 3) AS tripled,
  @EACH(@columns, c -> c * 2 AS c),
  @IF(@gateway = 'wh', 1, 2) AS chosen,
  @IF(@VAR('region') = 'us', 'us') AS missing,
  @REDUCE(@FILTER([1, 2, 3], x -> x > 1), (x, y) -> x + y) AS summed,
  @SAFE_DIV(a, b + 1) AS ratio,
  @region AS region,
  @GENERATE_SURROGATE_KEY(a, b) AS key,
  @SQL('a || ''!''') AS shout,
  @EVAL(2 * 3) AS six,
FROM t
WHERE @AND(a > 0, NULL, @OR(b < 1, NULL))";
        let query = parse(text).unwrap().model.query.unwrap();
        assert_eq!(
            query.normalized,
            "SELECT a * 3 + 1 AS tripled, a * 2 AS a, b * 2 AS b, 1 AS chosen, 2 + 3 AS summed, a / NULLIF(b + 1, 0) AS ratio, 'eu' AS region, \
             MD5(CONCAT(COALESCE(CAST(a AS TEXT), '_sqlmesh_surrogate_key_null_'), '|', COALESCE(CAST(b AS TEXT), '_sqlmesh_surrogate_key_null_'))) AS key, \
             a || '!' AS shout, 6 AS six FROM t WHERE (a > 0) AND (b < 1)"
        );
        let errors = messages(parse("MODEL (name s.m, kind FULL);\nSELECT @IF(a > 1, 1) AS x FROM t").unwrap_err());
        assert_eq!(
            errors,
            vec![
                "models/m.sql:2:8: @IF: cannot evaluate \"a > 1\" when the model is read; expected literals, comparisons, AND, OR, NOT and arithmetic"
            ]
        );
    }

    #[test]
    fn blueprints_expand_one_model_file_into_several() {
        let text = "MODEL (\n  name @name,\n  kind FULL,\n  blueprints ((name := s.low, cap := 1), (name := s.high, cap := 'x''y'),)\n);\nSELECT @cap AS cap, @BLUEPRINT_VAR('cap') AS again";
        let texts = expand_blueprints("models/m.sql", text).unwrap();
        assert_eq!(texts.len(), 2);
        let queries: Vec<String> =
            texts.iter().map(|text| parse(text).unwrap().model.query.unwrap().normalized).collect();
        assert_eq!(queries, vec!["SELECT 1 AS cap, 1 AS again", "SELECT 'x''y' AS cap, 'x''y' AS again"]);
        assert_eq!(parse(&texts[1]).unwrap().model.name.to_string(), "s.high");
        assert_eq!(expand_blueprints("models/m.sql", "MODEL (name s.m);\nSELECT 1").unwrap().len(), 1);
        let errors = expand_blueprints("models/m.sql", "MODEL (name @name, blueprints (name := s.a));").unwrap_err();
        assert_eq!(messages(errors), vec!["models/m.sql:1:20: expected blueprints ((name := value, …), …)"]);
    }

    #[test]
    fn a_schema_named_like_the_duckdb_file_is_refused() {
        let text = "gateways:\n  wh:\n    connection:\n      type: duckdb\n      database: data/bench.duckdb\nmodel_defaults:\n  start: 2024-01-01\n";
        let config = parse_config("config.yaml", text).config.unwrap();
        let csv_files = BTreeMap::new();
        let context = ModelFileContext {
            config: &config,
            audits: &BTreeMap::new(),
            csv_files: &csv_files,
            python_macros: &BTreeMap::new(),
        };
        let errors =
            parse_model_file("models/m.sql", "MODEL (name bench.m, kind FULL);\nSELECT 1 AS x", context).unwrap_err();
        assert_eq!(
            messages(errors),
            vec![
                "models/m.sql:1:1: schema \"bench\" is also the catalog name DuckDB gives gateway wh's file \"data/bench.duckdb\"; rename the file or the schema"
            ]
        );
        assert!(parse_model_file("models/m.sql", "MODEL (name other.m, kind FULL);\nSELECT 1 AS x", context).is_ok());
    }

    #[test]
    fn seeds_read_their_csv_relative_to_the_model_file() {
        let parsed = parse("MODEL (name s.seed, kind SEED (path '../seeds/x.csv'));").unwrap();
        let seed = parsed.model.seed.unwrap();
        assert_eq!(seed.columns, vec!["id", "name"]);
        assert_eq!(seed.rows.len(), 2);
        let from_root = parse("MODEL (name s.seed, kind SEED (path '$root/seeds/x.csv'));").unwrap();
        assert_eq!(from_root.model.seed.unwrap().rows.len(), 2);
        let missing = parse("MODEL (name s.seed, kind SEED (path 'nope.csv'));").unwrap_err();
        assert_eq!(
            messages(missing),
            vec!["models/m.sql:1:1: seed file \"nope.csv\" not found (paths are relative to the model file)"]
        );
    }

    #[test]
    fn properties_sqlmesh_has_but_sluice_does_not_use_are_warnings() {
        let parsed = parse(
            "MODEL (name s.m, kind FULL, audits (not_null(columns := [id])), partitioned_by ds);\nSELECT 1 AS id",
        )
        .unwrap();
        let warnings = messages(parsed.warnings);
        assert_eq!(
            warnings,
            vec!["models/m.sql:1:65: property partitioned_by is accepted by SQLMesh but not used by sluice yet"]
        );
    }

    /// `@{name}` interpolates a @DEF, a config variable or a blueprint value into an identifier.
    #[test]
    fn names_are_interpolated_from_defs_variables_and_blueprints() {
        let parsed = parse(
            "MODEL (name s.m, kind FULL);\n@DEF(suffix, 'total');\nSELECT amount_@{suffix}, @{region}_amount AS @{region}_x, a.@{suffix} FROM s.t_@{region} AS a",
        )
        .unwrap();
        assert_eq!(
            parsed.model.query.unwrap().normalized,
            "SELECT amount_total, eu_amount AS eu_x, a.total FROM s.t_eu AS a"
        );
        let texts = expand_blueprints(
            "models/m.sql",
            "MODEL (name @{customer}.orders, kind FULL, blueprints ((customer := shop_a), (customer := 'shop_b')));\nSELECT 1 AS id FROM raw.@{customer}_orders",
        )
        .unwrap();
        assert_eq!(texts.len(), 2);
        assert!(texts[0].contains("name shop_a.orders") && texts[0].contains("raw.shop_a_orders"), "{}", texts[0]);
        assert!(texts[1].contains("name shop_b.orders") && texts[1].contains("raw.shop_b_orders"), "{}", texts[1]);
        let unknown = parse("MODEL (name s.m, kind FULL);\nSELECT @{nothing} AS x").unwrap_err();
        assert!(messages(unknown)[0].starts_with("models/m.sql:2:8: unknown variable nothing in @{nothing}"));
    }

    /// `catalog.schema.table` in the gateway's catalog (a DuckDB file's stem) is `schema.table`,
    /// in a model's name, its query, its audits and `depends_on`; another catalog's table is read
    /// as written, and a model cannot be named into another catalog.
    #[test]
    fn three_part_names_in_the_gateways_catalog_are_the_models_own() {
        let parsed = parse(
            "MODEL (name db.s.m, kind FULL, depends_on [DB.s.p], audits (not_null(columns := [id])));\nSELECT a.id FROM db.s.other AS a JOIN elsewhere.s.x AS b ON a.id = b.id",
        )
        .unwrap();
        let model = parsed.model;
        assert_eq!(model.name.to_string(), "s.m");
        assert_eq!(model.query.unwrap().references, vec!["elsewhere.s.x".to_string(), "s.other".to_string()]);
        assert_eq!(model.depends_on, vec!["s.p".to_string()]);
        assert_eq!(model.audits[0].query.references, vec!["s.m".to_string()]);
        let wrong = parse("MODEL (name other.s.m, kind FULL);\nSELECT 1 AS id").unwrap_err();
        assert_eq!(
            messages(wrong),
            vec![
                "models/m.sql:1:13: catalog other is not gateway wh's (its catalog is db); sluice writes a model into its gateway's catalog, so name it schema.table or db.schema.table"
            ]
        );
    }

    fn parse_with_audits(text: &str, audit_files: &[(&str, &str)]) -> Result<ParsedModel, Vec<ProjectError>> {
        let config = config();
        let files = audit_files.iter().map(|(path, text)| (path.to_string(), text.to_string())).collect();
        let mut errors = ErrorSink::default();
        let audits = audit::project_audits(&files, &mut errors);
        assert!(errors.is_empty());
        let context = ModelFileContext {
            config: &config,
            audits: &audits,
            csv_files: &BTreeMap::new(),
            python_macros: &BTreeMap::new(),
        };
        parse_model_file("models/m.sql", text, context)
    }

    #[test]
    fn audits_render_with_their_arguments_defaults_and_blocking() {
        let text = "MODEL (
  name s.m,
  kind FULL,
  audits (
    not_null(columns := [id, name]),
    accepted_values_non_blocking(column := name, is_in := ('a', 'b')),
    floor_of(column := amount, blocking := false),
    mine,
    quiet
  )
);
SELECT 1 AS id, 'a' AS name, 2 AS amount;

AUDIT (name mine);
SELECT * FROM @this_model WHERE id > @VAR('limit');
AUDIT (name quiet, skip true);
SELECT 1;
";
        let audit_file =
            "AUDIT (name floor_of, defaults (floor = 0));\nSELECT * FROM @this_model AS t WHERE t.@column < @floor";
        let parsed = parse_with_audits(text, &[("audits/floor.sql", audit_file)]).unwrap();
        assert!(parsed.model.post_statements.is_empty(), "an AUDIT block is not a post-statement");
        let audits: Vec<(&str, bool, &str)> = parsed
            .model
            .audits
            .iter()
            .map(|audit| (audit.call.as_str(), audit.blocking, audit.query.normalized.as_str()))
            .collect();
        assert_eq!(
            audits,
            vec![
                (
                    "not_null(columns := [id, name])",
                    true,
                    "SELECT * FROM s.m WHERE (true) AND ((id IS NULL) OR (name IS NULL))"
                ),
                (
                    "accepted_values_non_blocking(column := name, is_in := ('a', 'b'))",
                    false,
                    "SELECT * FROM s.m WHERE (true) AND name NOT IN ('a', 'b')"
                ),
                ("floor_of(column := amount, blocking := false)", false, "SELECT * FROM s.m AS t WHERE t.amount < 0"),
                ("mine", true, "SELECT * FROM s.m WHERE id > 5"),
            ]
        );
    }

    #[test]
    fn audit_calls_that_cannot_run_are_errors() {
        let errors = |audits: &str| {
            let text = format!("MODEL (name s.m, kind FULL, audits ({audits}));\nSELECT 1 AS id");
            messages(parse_with_audits(&text, &[]).unwrap_err())
        };
        assert_eq!(
            errors("not_null"),
            vec!["models/m.sql:1:29: audit not_null needs the argument columns; call it as not_null(columns := ...)"]
        );
        assert_eq!(
            errors("no_such_audit"),
            vec![
                "models/m.sql:1:29: audit no_such_audit is not defined; expected a built-in audit, one in audits/*.sql or an AUDIT block in this file"
            ]
        );
        assert_eq!(
            errors("valid_email(column := id)"),
            vec![
                "models/m.sql:1:29: the built-in audit valid_email is not provided by sluice yet; write it as an audit in audits/*.sql"
            ]
        );
        assert_eq!(
            errors("not_null(columns := [id], blocking := sometimes)"),
            vec!["models/m.sql:1:29: audit not_null: expected blocking := true or false, found sometimes"]
        );
        let embedded = parse_with_audits(
            "MODEL (name s.m, kind EMBEDDED, audits (not_null(columns := [id])));\nSELECT 1 AS id",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            messages(embedded),
            vec!["models/m.sql:1:33: an EMBEDDED model has no table to audit; audit the models that read it"]
        );
        let broken = parse_with_audits(
            "MODEL (name s.m, kind FULL, audits (broken));\nSELECT 1 AS id",
            &[("audits/broken.sql", "AUDIT (name broken);\n\nSELECT * FROM @this_model WHERE")],
        )
        .unwrap_err();
        assert_eq!(
            messages(broken),
            vec![
                "audits/broken.sql: audit broken (as models/m.sql calls it): SQL does not parse (duckdb): Expected: an expression, found: EOF"
            ]
        );
    }

    #[test]
    fn scd_type_2_kinds_take_sqlmeshs_defaults() {
        use crate::model::{ScdChange, ScdType2};
        let by_time = parse("MODEL (name s.m, kind SCD_TYPE_2 (unique_key [ID]));\nSELECT 1 AS id").unwrap().model;
        assert_eq!(
            by_time.kind,
            ModelKind::ScdType2(ScdType2 {
                unique_key: vec!["id".to_string()],
                valid_from: "valid_from".to_string(),
                valid_to: "valid_to".to_string(),
                invalidate_hard_deletes: false,
                change: ScdChange::ByTime { updated_at: "updated_at".to_string(), updated_at_as_valid_from: false },
                batch_size: None,
                forward_only: true,
            })
        );
        assert!(by_time.disable_restatement && by_time.kind.is_forward_only());
        assert_eq!(by_time.kind.name(), "SCD_TYPE_2_BY_TIME");
        let by_column = parse(
            "MODEL (name s.m, kind SCD_TYPE_2_BY_COLUMN (unique_key id, columns *, valid_to_name until, disable_restatement false));\nSELECT 1 AS id",
        )
        .unwrap()
        .model;
        let ModelKind::ScdType2(scd) = &by_column.kind else { panic!("{:?}", by_column.kind) };
        assert_eq!(
            scd.change,
            ScdChange::ByColumn { columns: None, execution_time_as_valid_from: false, updated_at: None }
        );
        assert_eq!(scd.valid_to, "until");
        assert!(!by_column.disable_restatement);
    }

    #[test]
    fn bad_values_name_their_position_and_what_was_expected() {
        let errors = parse(
            "MODEL (\n  name s.m,\n  kind INCREMENTAL_BY_TIME_RANGE (batch_size 0),\n  cron 'sometimes',\n  start 'yesterday-ish',\n  enabled maybe\n);\nSELECT 1",
        )
        .unwrap_err();
        let errors = messages(errors);
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(
            errors[0].starts_with("models/m.sql:3:8: INCREMENTAL_BY_TIME_RANGE needs a time_column argument"),
            "{errors:#?}"
        );
        assert!(errors[1].starts_with("models/m.sql:4:8: expected @hourly, @daily"), "{errors:#?}");
        let custom = messages(parse("MODEL (name s.m, kind CUSTOM (materialization 'x'));\nSELECT 1").unwrap_err());
        assert!(custom[0].starts_with("models/m.sql:1:23: CUSTOM kinds run a Python materialization"), "{custom:?}");
        let managed = messages(parse("MODEL (name s.m, kind MANAGED);\nSELECT 1").unwrap_err());
        assert!(
            managed[0].starts_with("models/m.sql:1:23: MANAGED is a SQLMesh kind sluice does not run yet"),
            "{managed:?}"
        );
        let format = messages(
            parse("MODEL (name s.m, kind INCREMENTAL_BY_TIME_RANGE (time_column (ds, '%Q')));\nSELECT 1 AS ds")
                .unwrap_err(),
        );
        assert!(format[0].contains("time_column format '%Q' is not a time format"), "{format:?}");
        let scd =
            messages(parse("MODEL (name s.m, kind SCD_TYPE_2_BY_COLUMN (unique_key id));\nSELECT 1").unwrap_err());
        assert!(scd[0].starts_with("models/m.sql:1:23: SCD_TYPE_2_BY_COLUMN needs a columns argument"), "{scd:?}");
        let typed = messages(
            parse("MODEL (name s.m, kind SCD_TYPE_2 (unique_key id, time_data_type DATE));\nSELECT 1").unwrap_err(),
        );
        assert!(typed[0].contains("time_data_type DATE is not read by sluice yet"), "{typed:?}");
        assert!(errors[2].starts_with("models/m.sql:5:9: expected a date"), "{errors:#?}");
        assert!(errors[3].starts_with("models/m.sql:6:11: expected true or false"), "{errors:#?}");
    }
}
