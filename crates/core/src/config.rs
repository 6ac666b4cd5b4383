//! `config.yaml`: gateways, the default gateway, model defaults, variables and the environment TTL.
//!
//! The file is read by the caller; this module turns its text into a [`Config`], reporting
//! every problem with the field path, and every key SQLMesh accepts that sluice does not use
//! yet as a warning.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::{Mapping, Value};

use crate::cron::Cron;
use crate::error::{ErrorSink, ProjectError, SourceLocation};
use crate::interval::Timestamp;
use crate::names::{IDENTIFIER_EXPECTATION, is_valid_identifier};

pub const CONFIG_FILE: &str = "config.yaml";

/// The project's config file among the files of its root folder: `config.yaml` or
/// `config.yml` (SQLMesh reads either); both, or only a Python config, is an error.
pub fn config_file_name(root_files: &[&str]) -> Result<Option<&'static str>, String> {
    let has = |name: &str| root_files.contains(&name);
    match (has("config.yaml"), has("config.yml")) {
        (true, true) => Err("the project has both config.yaml and config.yml; keep one".to_string()),
        (true, false) => Ok(Some("config.yaml")),
        (false, true) => Ok(Some("config.yml")),
        (false, false) if has("config.py") => {
            Err("config.py is a Python config, which sluice cannot run; write the same settings to config.yaml"
                .to_string())
        }
        (false, false) => Ok(None),
    }
}

/// The password of a `scheme://user:password@host/…` URL (as written, not decoded): what must
/// never reach a message.
pub fn url_password(url: &str) -> Option<&str> {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme.split(['/', '?']).next().unwrap_or(after_scheme);
    let (user_info, _host) = authority.rsplit_once('@')?;
    let (_user, password) = user_info.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

/// A URL fit for a message: its password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match url_password(url) {
        Some(password) => url.replacen(&format!(":{password}@"), ":***@", 1),
        None => url.to_string(),
    }
}

/// `text` with every non-empty secret replaced by `***` (a driver message may quote a URL).
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut redacted = text.to_string();
    for secret in secrets {
        if !secret.is_empty() && redacted.contains(secret.as_str()) {
            redacted = redacted.replace(secret.as_str(), "***");
        }
    }
    redacted
}

/// A secret from configuration. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that hands it to a driver.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How to reach one warehouse or state database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connection {
    /// An embedded DuckDB file, relative to the project folder (or `:memory:`).
    DuckDb {
        database: String,
    },
    Postgres {
        host: String,
        port: u16,
        user: String,
        password: Secret,
        database: String,
    },
    MySql {
        host: String,
        port: u16,
        user: String,
        password: Secret,
        database: String,
    },
}

impl Connection {
    pub fn type_name(&self) -> &'static str {
        match self {
            Connection::DuckDb { .. } => "duckdb",
            Connection::Postgres { .. } => "postgres",
            Connection::MySql { .. } => "mysql",
        }
    }

    /// The catalog a connection's tables live in, lower-cased, as a three-part name writes it:
    /// a DuckDB file's stem (DuckDB names the catalog after the file), a PostgreSQL database;
    /// MySQL has none.
    pub fn catalog(&self) -> Option<String> {
        match self {
            Connection::DuckDb { database } if database == ":memory:" => Some("memory".to_string()),
            Connection::DuckDb { database } => {
                let stem = std::path::Path::new(database).file_stem()?.to_string_lossy().to_ascii_lowercase();
                (!stem.is_empty()).then_some(stem)
            }
            Connection::Postgres { database, .. } => Some(database.to_ascii_lowercase()),
            Connection::MySql { .. } => None,
        }
    }

    /// The SQL dialect models default to on this connection.
    pub fn default_dialect(&self) -> &'static str {
        match self {
            Connection::DuckDb { .. } => "duckdb",
            Connection::Postgres { .. } => "postgres",
            Connection::MySql { .. } => "mysql",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gateway {
    pub name: String,
    pub connection: Connection,
    pub state_connection: Option<Connection>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelDefaults {
    pub dialect: Option<String>,
    pub start: Option<Timestamp>,
    pub cron: Option<Cron>,
    /// A default kind, as written (`FULL`, `VIEW`, ...).
    pub kind: Option<String>,
}

/// A value of `variables`, as `@VAR` renders it into SQL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VariableValue {
    Text(String),
    Number(String),
    Boolean(bool),
    Null,
}

impl VariableValue {
    /// The SQL literal for this value.
    pub fn to_sql(&self) -> String {
        match self {
            VariableValue::Text(text) => format!("'{}'", text.replace('\'', "''")),
            VariableValue::Number(number) => number.clone(),
            VariableValue::Boolean(true) => "TRUE".to_string(),
            VariableValue::Boolean(false) => "FALSE".to_string(),
            VariableValue::Null => "NULL".to_string(),
        }
    }
}

pub const DEFAULT_ENVIRONMENT_TTL_SECONDS: i64 = 7 * 24 * 3600;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub gateways: BTreeMap<String, Gateway>,
    pub default_gateway: String,
    pub model_defaults: ModelDefaults,
    pub variables: BTreeMap<String, VariableValue>,
    /// How long a non-prod environment lives after its last apply.
    pub environment_ttl_seconds: i64,
    /// Where run summaries are posted, when set.
    pub notification_webhook: Option<String>,
    /// Statements run on the default gateway before a plan's first task (`before_all`) and once
    /// its environment is promoted (`after_all`), plain SQL.
    pub before_all: Vec<String>,
    pub after_all: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        let gateway = Gateway {
            name: "local".to_string(),
            connection: Connection::DuckDb { database: "db.duckdb".to_string() },
            state_connection: None,
        };
        Config {
            gateways: BTreeMap::from([("local".to_string(), gateway)]),
            default_gateway: "local".to_string(),
            model_defaults: ModelDefaults::default(),
            variables: BTreeMap::new(),
            environment_ttl_seconds: DEFAULT_ENVIRONMENT_TTL_SECONDS,
            notification_webhook: None,
            before_all: Vec::new(),
            after_all: Vec::new(),
        }
    }
}

/// Keys SQLMesh accepts at the top of `config.yaml` that sluice reads.
const USED_KEYS: &[&str] = &[
    "gateways",
    "default_gateway",
    "model_defaults",
    "variables",
    "environment_ttl",
    "notification_webhook",
    "before_all",
    "after_all",
];
/// Keys SQLMesh accepts that sluice does not use yet: a warning, not an error.
const SQLMESH_ONLY_KEYS: &[&str] = &[
    "project",
    "notification_targets",
    "users",
    "ui",
    "format",
    "plan",
    "run",
    "migration",
    "linter",
    "cicd_bot",
    "physical_schema_override",
    "physical_schema_mapping",
    "environment_suffix_target",
    "environment_catalog_mapping",
    "default_connection",
    "default_test_connection",
    "default_scheduler",
    "default_target_environment",
    "pinned_environments",
    "snapshot_ttl",
    "ignore_patterns",
    "time_column_format",
    "log_limit",
    "model_naming",
    "janitor",
    "cache_dir",
    "gateway_managed_virtual_layer",
    "infer_python_dependencies",
];

/// The result of reading `config.yaml`: the config, or every error, and warnings either way.
#[derive(Debug)]
pub struct ConfigOutcome {
    pub config: Option<Config>,
    pub errors: Vec<ProjectError>,
    pub warnings: Vec<ProjectError>,
}

struct Reader<'a> {
    file: &'a str,
    errors: ErrorSink,
    warnings: Vec<ProjectError>,
}

impl Reader<'_> {
    fn error(&mut self, field: &str, message: impl fmt::Display) {
        self.errors.push(SourceLocation::file(self.file), format!("{field}: {message}"));
    }

    fn warn(&mut self, field: &str, message: impl fmt::Display) {
        self.warnings.push(ProjectError::new(SourceLocation::file(self.file), format!("{field}: {message}")));
    }

    fn string(&mut self, field: &str, value: &Value) -> Option<String> {
        match value {
            Value::String(text) => Some(text.clone()),
            Value::Number(number) => Some(number.to_string()),
            Value::Bool(boolean) => Some(boolean.to_string()),
            _ => {
                self.error(field, format!("expected a string, found {}", describe(value)));
                None
            }
        }
    }

    /// A list of SQL statements. Macros are not rendered in them: a statement naming one is
    /// refused, never run as written.
    fn statements(&mut self, field: &str, value: &Value) -> Vec<String> {
        let Value::Sequence(items) = value else {
            self.error(field, format!("expected a list of SQL statements, found {}", describe(value)));
            return Vec::new();
        };
        let mut statements = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let entry = format!("{field}[{index}]");
            let Some(text) = self.string(&entry, item) else { continue };
            if let Some(at) = text.find('@') {
                let name: String =
                    text[at..].chars().take_while(|c| *c == '@' || c.is_alphanumeric() || *c == '_').collect();
                self.error(
                    &entry,
                    format!(
                        "{name}: macros are not rendered in {field} by sluice yet; write the statement in plain SQL"
                    ),
                );
                continue;
            }
            statements.push(text.trim().trim_end_matches(';').to_string());
        }
        statements
    }

    fn mapping<'v>(&mut self, field: &str, value: &'v Value) -> Option<&'v Mapping> {
        match value {
            Value::Mapping(mapping) => Some(mapping),
            _ => {
                self.error(field, format!("expected a mapping, found {}", describe(value)));
                None
            }
        }
    }

    fn connection(&mut self, field: &str, value: &Value) -> Option<Connection> {
        let mapping = self.mapping(field, value)?;
        let mut fields: BTreeMap<String, Value> = BTreeMap::new();
        for (key, value) in mapping {
            let Some(key) = key.as_str() else {
                self.error(field, "expected string keys");
                continue;
            };
            fields.insert(key.to_string(), value.clone());
        }
        let Some(type_value) = fields.remove("type") else {
            self.error(&format!("{field}.type"), "missing; expected one of duckdb, postgres, mysql");
            return None;
        };
        let type_name = self.string(&format!("{field}.type"), &type_value)?;
        let mut take = |reader: &mut Reader, key: &str, default: Option<&str>| -> Option<String> {
            match fields.remove(key) {
                Some(value) => reader.string(&format!("{field}.{key}"), &value),
                None => match default {
                    Some(default) => Some(default.to_string()),
                    None => {
                        reader.error(&format!("{field}.{key}"), "missing");
                        None
                    }
                },
            }
        };
        let connection = match type_name.as_str() {
            "duckdb" => {
                let database = take(self, "database", Some("db.duckdb"))?;
                Connection::DuckDb { database }
            }
            "postgres" | "mysql" => {
                let default_port = if type_name == "postgres" { "5432" } else { "3306" };
                let host = take(self, "host", Some("127.0.0.1"));
                let port_text = take(self, "port", Some(default_port));
                let user = take(self, "user", Some(if type_name == "postgres" { "postgres" } else { "root" }));
                let password = take(self, "password", Some(""));
                let database = take(self, "database", None);
                let port = match port_text.as_deref().map(str::parse::<u16>) {
                    Some(Ok(port)) => Some(port),
                    Some(Err(_)) => {
                        self.error(&format!("{field}.port"), "expected a port number from 1 to 65535");
                        None
                    }
                    None => None,
                };
                let (host, port, user, password, database) = (host?, port?, user?, Secret(password?), database?);
                if type_name == "postgres" {
                    Connection::Postgres { host, port, user, password, database }
                } else {
                    Connection::MySql { host, port, user, password, database }
                }
            }
            other => {
                self.error(
                    &format!("{field}.type"),
                    format!("expected one of duckdb, postgres, mysql, found {other:?}"),
                );
                return None;
            }
        };
        for key in fields.keys() {
            self.warn(&format!("{field}.{key}"), "accepted by SQLMesh but not used by sluice yet");
        }
        Some(connection)
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Parses `in 1 week`, `2 days`, `12 hours` into seconds.
pub fn parse_duration_seconds(text: &str) -> Result<i64, String> {
    let expected = || format!("expected a duration like \"in 1 week\", \"3 days\" or \"12 hours\", found {text:?}");
    let words: Vec<&str> = text.split_whitespace().collect();
    let words = match words.as_slice() {
        ["in", rest @ ..] => rest,
        all => all,
    };
    let [count, unit] = words else {
        return Err(expected());
    };
    let count: i64 = count.parse().map_err(|_| expected())?;
    let unit_seconds = match unit.trim_end_matches('s') {
        "second" => 1,
        "minute" => 60,
        "hour" => 3600,
        "day" => 86_400,
        "week" => 7 * 86_400,
        _ => return Err(expected()),
    };
    Ok(count * unit_seconds)
}

/// Reads the text of `config.yaml` (`file` is its path for messages).
/// Renders config.yaml's Jinja expressions before it is parsed, as SQLMesh does, with
/// `env_var('NAME')` and `env_var('NAME', 'default')` reading the process's environment
/// through `lookup`: a password can come from a Kubernetes Secret rather than sit in the file.
/// Text without `{{` or `{%` is returned as it is. An error names the file, the line and the
/// variable, never a value.
pub fn render_config_env(
    file: &str,
    text: &str,
    lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
) -> Result<String, ProjectError> {
    if !text.contains("{{") && !text.contains("{%") {
        return Ok(text.to_string());
    }
    let mut environment = minijinja::Environment::new();
    environment.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    environment.add_function("env_var", move |name: String, default: Option<String>| match lookup(&name).or(default) {
        Some(value) => Ok(value),
        None => Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("environment variable {name} is not set (env_var('{name}', 'default') gives a default)"),
        )),
    });
    environment.render_str(text, minijinja::context! {}).map_err(|error| {
        let line = error.line().unwrap_or(0) as u64;
        let detail = error.detail().map_or_else(|| error.kind().to_string(), ToString::to_string);
        ProjectError::new(SourceLocation::new(file, line, 0), format!("cannot render the config's Jinja: {detail}"))
    })
}

pub fn parse_config(file: &str, text: &str) -> ConfigOutcome {
    let mut reader = Reader { file, errors: ErrorSink::default(), warnings: Vec::new() };
    let document: Value = match serde_yaml_ng::from_str(text) {
        Ok(document) => document,
        Err(error) => {
            let (line, column) = error.location().map(|l| (l.line() as u64, l.column() as u64)).unwrap_or((0, 0));
            let message = format!("not valid YAML: {error}");
            return ConfigOutcome {
                config: None,
                errors: vec![ProjectError::new(SourceLocation::new(file, line, column), message)],
                warnings: Vec::new(),
            };
        }
    };
    let empty = Mapping::new();
    let top = match &document {
        Value::Null => &empty,
        Value::Mapping(mapping) => mapping,
        other => {
            reader.error("(top level)", format!("expected a mapping, found {}", describe(other)));
            &empty
        }
    };
    let mut config = Config::default();
    for (key, value) in top {
        let Some(key) = key.as_str() else {
            reader.error("(top level)", "expected string keys");
            continue;
        };
        match key {
            "gateways" => {
                config.gateways.clear();
                let Some(gateways) = reader.mapping("gateways", value) else { continue };
                for (name, gateway_value) in gateways {
                    let Some(name) = name.as_str() else {
                        reader.error("gateways", "expected string gateway names");
                        continue;
                    };
                    let field = format!("gateways.{name}");
                    if !is_valid_identifier(name) {
                        reader.error(&field, format!("expected a gateway name that is {IDENTIFIER_EXPECTATION}"));
                        continue;
                    }
                    let Some(gateway_mapping) = reader.mapping(&field, gateway_value) else { continue };
                    let mut connection = None;
                    let mut state_connection = None;
                    for (gateway_key, gateway_field_value) in gateway_mapping {
                        match gateway_key.as_str() {
                            Some("connection") => {
                                connection = reader.connection(&format!("{field}.connection"), gateway_field_value)
                            }
                            Some("state_connection") => {
                                state_connection =
                                    reader.connection(&format!("{field}.state_connection"), gateway_field_value)
                            }
                            Some(other) => reader
                                .warn(&format!("{field}.{other}"), "accepted by SQLMesh but not used by sluice yet"),
                            None => reader.error(&field, "expected string keys"),
                        }
                    }
                    let Some(connection) = connection else {
                        if !gateway_mapping.contains_key("connection") {
                            reader.error(&format!("{field}.connection"), "missing");
                        }
                        continue;
                    };
                    config
                        .gateways
                        .insert(name.to_string(), Gateway { name: name.to_string(), connection, state_connection });
                }
            }
            "default_gateway" => {
                if let Some(name) = reader.string("default_gateway", value) {
                    config.default_gateway = name;
                }
            }
            "model_defaults" => {
                let Some(defaults) = reader.mapping("model_defaults", value) else { continue };
                for (default_key, default_value) in defaults {
                    let field = format!("model_defaults.{}", default_key.as_str().unwrap_or("?"));
                    match default_key.as_str() {
                        Some("dialect") => config.model_defaults.dialect = reader.string(&field, default_value),
                        Some("kind") => config.model_defaults.kind = reader.string(&field, default_value),
                        Some("start") => {
                            if let Some(text) = reader.string(&field, default_value) {
                                match Timestamp::parse(&text) {
                                    Ok(start) => config.model_defaults.start = Some(start),
                                    Err(error) => reader.error(&field, error),
                                }
                            }
                        }
                        Some("cron") => {
                            if let Some(text) = reader.string(&field, default_value) {
                                match Cron::parse(&text) {
                                    Ok(cron) => config.model_defaults.cron = Some(cron),
                                    Err(error) => reader.error(&field, error),
                                }
                            }
                        }
                        _ => reader.warn(&field, "accepted by SQLMesh but not used by sluice yet"),
                    }
                }
            }
            "variables" => {
                let Some(variables) = reader.mapping("variables", value) else { continue };
                for (name, variable) in variables {
                    let Some(name) = name.as_str() else {
                        reader.error("variables", "expected string variable names");
                        continue;
                    };
                    let value = match variable {
                        Value::String(text) => VariableValue::Text(text.clone()),
                        Value::Number(number) => VariableValue::Number(number.to_string()),
                        Value::Bool(boolean) => VariableValue::Boolean(*boolean),
                        Value::Null => VariableValue::Null,
                        other => {
                            reader.error(
                                &format!("variables.{name}"),
                                format!("expected a string, number, boolean or null, found {}", describe(other)),
                            );
                            continue;
                        }
                    };
                    config.variables.insert(name.to_ascii_lowercase(), value);
                }
            }
            "environment_ttl" => {
                if let Some(text) = reader.string("environment_ttl", value) {
                    match parse_duration_seconds(&text) {
                        Ok(seconds) => config.environment_ttl_seconds = seconds,
                        Err(error) => reader.error("environment_ttl", error),
                    }
                }
            }
            "notification_webhook" => config.notification_webhook = reader.string("notification_webhook", value),
            "before_all" => config.before_all = reader.statements("before_all", value),
            "after_all" => config.after_all = reader.statements("after_all", value),
            other if SQLMESH_ONLY_KEYS.contains(&other) => {
                reader.warn(other, "accepted by SQLMesh but not used by sluice yet")
            }
            other => reader.warn(other, format!("unknown key, ignored (sluice reads {})", USED_KEYS.join(", "))),
        }
    }
    if !config.gateways.contains_key(&config.default_gateway) {
        if top.contains_key("default_gateway") {
            let known: Vec<&str> = config.gateways.keys().map(String::as_str).collect();
            reader.error(
                "default_gateway",
                format!("unknown gateway {:?}; expected one of: {}", config.default_gateway, known.join(", ")),
            );
        } else if let Some(first) = config.gateways.keys().next() {
            config.default_gateway = first.clone();
        } else {
            reader.error("gateways", "expected at least one gateway");
        }
    }
    let Reader { errors, warnings, .. } = reader;
    match errors.finish(()) {
        Ok(()) => ConfigOutcome { config: Some(config), errors: Vec::new(), warnings },
        Err(errors) => ConfigOutcome { config: None, errors: errors.0, warnings },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_found_and_redacted() {
        assert_eq!(url_password("postgres://sluice:s3cr3tpw@127.0.0.1:1/x"), Some("s3cr3tpw"));
        assert_eq!(url_password("postgresql://u:p%40ss@host/db?sslmode=disable"), Some("p%40ss"));
        assert_eq!(url_password("postgres://u@host/db"), None);
        assert_eq!(url_password("postgres://host/db"), None);
        assert_eq!(redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact_url("amqp://u:p@ss@h/v"), "amqp://u:***@h/v");
        assert_eq!(redact("postgres://u:pw@h/x failed", &["pw".to_string()]), "postgres://u:***@h/x failed");
        assert_eq!(redact("nothing", &[String::new()]), "nothing");
    }

    #[test]
    fn reads_gateways_defaults_variables_and_warns_on_unused_keys() {
        let text = r#"
gateways:
  local:
    connection:
      type: duckdb
      database: warehouse.duckdb
  pg:
    connection:
      type: postgres
      host: 127.0.0.1
      port: 5432
      user: sluice
      password: hunter2
      database: test
      concurrent_tasks: 4
default_gateway: local
model_defaults:
  dialect: duckdb
  start: 2024-01-01
  cron: '@daily'
variables:
  region: eu
  limit: 10
environment_ttl: in 2 weeks
project: sushi
"#;
        let outcome = parse_config("config.yaml", text);
        assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
        let config = outcome.config.unwrap();
        assert_eq!(config.gateways.len(), 2);
        assert_eq!(config.variables["limit"].to_sql(), "10");
        assert_eq!(config.variables["region"].to_sql(), "'eu'");
        assert_eq!(config.environment_ttl_seconds, 14 * 86_400);
        let warnings: Vec<String> = outcome.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            vec![
                "config.yaml: gateways.pg.connection.concurrent_tasks: accepted by SQLMesh but not used by sluice yet",
                "config.yaml: project: accepted by SQLMesh but not used by sluice yet",
            ]
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "the password leaked into Debug: {debug}");
    }

    #[test]
    fn reports_every_error_with_its_field() {
        let text =
            "gateways:\n  a:\n    connection:\n      type: oracle\ndefault_gateway: nope\nenvironment_ttl: soon\n";
        let outcome = parse_config("config.yaml", text);
        let errors: Vec<String> = outcome.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            vec![
                "config.yaml: default_gateway: unknown gateway \"nope\"; expected one of: ",
                "config.yaml: environment_ttl: expected a duration like \"in 1 week\", \"3 days\" or \"12 hours\", found \"soon\"",
                "config.yaml: gateways.a.connection.type: expected one of duckdb, postgres, mysql, found \"oracle\"",
            ]
        );
    }

    #[test]
    fn before_all_and_after_all_are_plain_sql_lists() {
        let text = "before_all:\n  - CREATE SCHEMA IF NOT EXISTS meta;\n  - '  GRANT USAGE ON SCHEMA meta TO reader '\nafter_all:\n  - \"@grant_select_privileges()\"\n";
        let outcome = parse_config("config.yaml", text);
        let errors: Vec<String> = outcome.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            vec![
                "config.yaml: after_all[0]: @grant_select_privileges: macros are not rendered in after_all by sluice yet; write the statement in plain SQL"
            ]
        );
        let outcome = parse_config("config.yaml", "before_all:\n  - SELECT 1;\nafter_all: SELECT 2\n");
        let errors: Vec<String> = outcome.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors, vec!["config.yaml: after_all: expected a list of SQL statements, found a string"]);
        let text =
            "before_all:\n  - CREATE SCHEMA IF NOT EXISTS meta;\n  - '  GRANT USAGE ON SCHEMA meta TO reader '\n";
        let config = parse_config("config.yaml", text).config.unwrap();
        assert_eq!(config.before_all, vec!["CREATE SCHEMA IF NOT EXISTS meta", "GRANT USAGE ON SCHEMA meta TO reader"]);
        assert!(config.after_all.is_empty());
    }

    #[test]
    fn yaml_syntax_errors_carry_line_and_column() {
        let outcome = parse_config("config.yaml", "gateways:\n  a: [\n");
        assert_eq!(outcome.errors.len(), 1);
        assert!(outcome.errors[0].location.line >= 2, "{:?}", outcome.errors);
    }

    #[test]
    fn the_config_is_config_yaml_or_config_yml_never_both() {
        assert_eq!(config_file_name(&["config.yaml"]), Ok(Some("config.yaml")));
        assert_eq!(config_file_name(&["config.yml"]), Ok(Some("config.yml")));
        assert_eq!(config_file_name(&[]), Ok(None));
        assert_eq!(
            config_file_name(&["config.yaml", "config.yml"]),
            Err("the project has both config.yaml and config.yml; keep one".to_string())
        );
        assert!(config_file_name(&["config.py"]).unwrap_err().starts_with("config.py is a Python config"));
        assert_eq!(config_file_name(&["config.py", "config.yml"]), Ok(Some("config.yml")));
    }

    #[test]
    fn env_var_reads_the_environment_with_an_optional_default() {
        let text = "gateways:\n  pg:\n    connection:\n      type: postgres\n      password: \"{{ env_var('PG_PASSWORD') }}\"\n      user: {{ env_var('PG_USER', 'sluice') }}\n";
        let lookup = |name: &str| (name == "PG_PASSWORD").then(|| "s3cret".to_string());
        let rendered = render_config_env("config.yaml", text, lookup).unwrap();
        assert!(rendered.contains("password: \"s3cret\""), "{rendered}");
        assert!(rendered.contains("user: sluice"), "{rendered}");
        assert_eq!(render_config_env("config.yaml", "a: '{b}'\n", |_| None).unwrap(), "a: '{b}'\n");
    }

    #[test]
    fn a_missing_env_var_names_the_file_line_and_variable() {
        let text = "gateways:\n  pg:\n    connection:\n      password: {{ env_var('NOPE') }}\n";
        let error = render_config_env("config.yaml", text, |_| None).unwrap_err().to_string();
        assert!(error.starts_with("config.yaml:4"), "{error}");
        assert!(error.contains("environment variable NOPE is not set"), "{error}");
    }
}
