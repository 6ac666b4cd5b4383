//! The model: one `MODEL (...)` block and its query, as read from a project file.

use serde::{Deserialize, Serialize};

use crate::cron::Cron;
use crate::interval::Timestamp;
use crate::names::ModelName;
use crate::query::ModelQuery;

/// How a model's data is materialized, as SQLMesh's `kind` property says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelKind {
    /// A view over its query; nothing is stored.
    View,
    /// The whole table is rebuilt from the query on every run.
    Full,
    /// One cron interval at a time: each run replaces the rows whose `time_column` lies in the interval.
    IncrementalByTimeRange {
        time_column: String,
        /// `time_column (col, 'FORMAT')`: how a text or numeric column writes times (a strftime
        /// format); `None`: SQLMesh's default, `%Y-%m-%d`, or a DATE/TIMESTAMP column.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        time_format: Option<String>,
        batch_size: Option<u32>,
        batch_concurrency: Option<u32>,
        lookback: u32,
        forward_only: bool,
    },
    /// Rows are upserted by `unique_key`.
    IncrementalByUniqueKey { unique_key: Vec<String>, batch_size: Option<u32>, forward_only: bool },
    /// Each run's rows replace the partitions (values of `partitioned_by`) they hold; always
    /// forward-only, as in SQLMesh.
    IncrementalByPartition { partitioned_by: Vec<String>, batch_size: Option<u32> },
    /// Each run's rows are appended (`insert_overwrite`: they replace the partitions, values of
    /// `partitioned_by`, they hold); forward-only unless `forward_only false`.
    IncrementalUnmanaged { insert_overwrite: bool, partitioned_by: Vec<String>, forward_only: bool },
    /// A slowly changing dimension, type 2: each run sets the query's rows against the
    /// table's current ones by `unique_key` and keeps every version, dated by `valid_from` and
    /// `valid_to` (the table is rebuilt from its rows and the query's, as SQLMesh does).
    ScdType2(ScdType2),
    /// Loaded from a CSV file.
    Seed { path: String, batch_size: Option<u32> },
    /// Never stored: inlined into the queries that read it.
    Embedded,
}

impl ModelKind {
    /// The SQLMesh name of the kind, as `@model_kind_name` renders it.
    pub fn name(&self) -> &'static str {
        match self {
            ModelKind::View => "VIEW",
            ModelKind::Full => "FULL",
            ModelKind::IncrementalByTimeRange { .. } => "INCREMENTAL_BY_TIME_RANGE",
            ModelKind::IncrementalByUniqueKey { .. } => "INCREMENTAL_BY_UNIQUE_KEY",
            ModelKind::IncrementalByPartition { .. } => "INCREMENTAL_BY_PARTITION",
            ModelKind::IncrementalUnmanaged { .. } => "INCREMENTAL_UNMANAGED",
            ModelKind::ScdType2(ScdType2 { change: ScdChange::ByTime { .. }, .. }) => "SCD_TYPE_2_BY_TIME",
            ModelKind::ScdType2(ScdType2 { change: ScdChange::ByColumn { .. }, .. }) => "SCD_TYPE_2_BY_COLUMN",
            ModelKind::Seed { .. } => "SEED",
            ModelKind::Embedded => "EMBEDDED",
        }
    }

    pub fn is_time_range(&self) -> bool {
        matches!(self, ModelKind::IncrementalByTimeRange { .. })
    }

    pub fn batch_size(&self) -> Option<u32> {
        match self {
            ModelKind::IncrementalByTimeRange { batch_size, .. }
            | ModelKind::IncrementalByUniqueKey { batch_size, .. }
            | ModelKind::IncrementalByPartition { batch_size, .. }
            | ModelKind::Seed { batch_size, .. } => *batch_size,
            ModelKind::ScdType2(scd) => scd.batch_size,
            _ => None,
        }
    }

    pub fn lookback(&self) -> u32 {
        match self {
            ModelKind::IncrementalByTimeRange { lookback, .. } => *lookback,
            _ => 0,
        }
    }

    pub fn is_forward_only(&self) -> bool {
        matches!(
            self,
            ModelKind::IncrementalByTimeRange { forward_only: true, .. }
                | ModelKind::IncrementalByUniqueKey { forward_only: true, .. }
                | ModelKind::IncrementalByPartition { .. }
                | ModelKind::IncrementalUnmanaged { forward_only: true, .. }
                | ModelKind::ScdType2(ScdType2 { forward_only: true, .. })
        )
    }

    /// Whether the kind adds to its table interval by interval (what a restated parent passes on
    /// to its children).
    pub fn is_incremental(&self) -> bool {
        matches!(
            self,
            ModelKind::IncrementalByTimeRange { .. }
                | ModelKind::IncrementalByUniqueKey { .. }
                | ModelKind::IncrementalByPartition { .. }
                | ModelKind::IncrementalUnmanaged { .. }
                | ModelKind::ScdType2(_)
        )
    }

    /// Whether the kind can only be restated over its whole history (SQLMesh's rule): it is
    /// rebuilt whole, or adds by key, by partition or by appending.
    pub fn restates_whole_history(&self) -> bool {
        matches!(self, ModelKind::Full | ModelKind::View) || (self.is_incremental() && !self.is_time_range())
    }

    /// SQLMesh's default `disable_restatement`: the kinds whose history cannot be rebuilt.
    pub fn disables_restatement_by_default(&self) -> bool {
        matches!(self, ModelKind::IncrementalUnmanaged { .. } | ModelKind::ScdType2(_))
    }

    /// Whether the model's snapshot has a physical table (or view) of its own.
    pub fn is_materialized(&self) -> bool {
        !matches!(self, ModelKind::Embedded)
    }
}

/// The arguments of an SCD_TYPE_2 kind (SQLMesh's defaults: `valid_from`, `valid_to`,
/// `updated_at`, hard deletes not invalidated, forward-only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScdType2 {
    pub unique_key: Vec<String>,
    pub valid_from: String,
    pub valid_to: String,
    /// A key gone from the query's rows closes its current version at the execution time.
    pub invalidate_hard_deletes: bool,
    pub change: ScdChange,
    pub batch_size: Option<u32>,
    pub forward_only: bool,
}

/// How an SCD_TYPE_2 kind tells that a row changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScdChange {
    /// SCD_TYPE_2 / SCD_TYPE_2_BY_TIME: a newer `updated_at`; a new version is valid from it.
    ByTime { updated_at: String, updated_at_as_valid_from: bool },
    /// SCD_TYPE_2_BY_COLUMN: a value of `columns` differs (`None`: every column); a new version is
    /// valid from the execution time (or from the `updated_at` column when one is named).
    ByColumn { columns: Option<Vec<String>>, execution_time_as_valid_from: bool, updated_at: Option<String> },
}

/// The rows of a SEED model's CSV file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedData {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl SeedData {
    /// The type SQLMesh gives each column when none is declared (pandas' inference): BIGINT when
    /// every value is a whole number, DOUBLE when every value is a number or some are missing
    /// from a numeric column (or all are), BOOLEAN when every value is true or false, else TEXT.
    pub fn inferred_types(&self) -> Vec<&'static str> {
        (0..self.columns.len())
            .map(|index| {
                let values: Vec<&str> =
                    self.rows.iter().filter_map(|row| row.get(index)).map(|value| value.trim()).collect();
                let present: Vec<&str> = values.iter().copied().filter(|value| !value.is_empty()).collect();
                let missing = present.len() < values.len();
                if present.is_empty() {
                    "DOUBLE"
                } else if present.iter().all(|value| value.parse::<i64>().is_ok()) {
                    if missing { "DOUBLE" } else { "BIGINT" }
                } else if present.iter().all(|value| value.parse::<f64>().is_ok_and(f64::is_finite)) {
                    "DOUBLE"
                } else if !missing
                    && present
                        .iter()
                        .all(|value| value.eq_ignore_ascii_case("true") || value.eq_ignore_ascii_case("false"))
                {
                    "BOOLEAN"
                } else {
                    "TEXT"
                }
            })
            .collect()
    }
}

/// One model of a project.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub name: ModelName,
    /// The project-relative path of the model's file.
    pub file: String,
    pub kind: ModelKind,
    /// `disable_restatement`: `plan --restate-model` leaves the model (and what only it leads
    /// to) alone, with a warning.
    pub disable_restatement: bool,
    pub cron: Cron,
    /// `None`: derived at plan time as SQLMesh does (see `plan::effective_starts`).
    pub start: Option<Timestamp>,
    pub end: Option<Timestamp>,
    pub owner: Option<String>,
    pub description: Option<String>,
    pub grain: Vec<String>,
    pub gateway: String,
    pub dialect: String,
    pub tags: Vec<String>,
    /// Models (or external tables) named in `depends_on`, lower-cased: parents the query does not name.
    pub depends_on: Vec<String>,
    /// Declared columns, name and type as written.
    pub columns: Vec<(String, String)>,
    pub enabled: bool,
    /// Statements run before the query, macros rendered.
    pub pre_statements: Vec<String>,
    /// Statements run after the query, macros rendered.
    pub post_statements: Vec<String>,
    /// The query; `None` for SEED models.
    pub query: Option<ModelQuery>,
    /// The CSV rows of a SEED model.
    pub seed: Option<SeedData>,
    /// The audits run after each write, in the order the model names them (skipped ones left out).
    pub audits: Vec<ModelAudit>,
    /// `--select-model` left this model out: it keeps the definition the environment shows,
    /// read back from its stored snapshot (`None`: read from its file).
    pub stored: Option<StoredDefinition>,
}

/// What a model read back from a stored snapshot keeps of it that its fields cannot say again:
/// its own hashes (so its fingerprint is the stored one) and its audits as they were rendered.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredDefinition {
    pub data_hash: String,
    pub metadata_hash: String,
    /// Audits as stored: parents read through the physical tables named in `parent_tables`.
    pub audits: Vec<crate::snapshot::SnapshotAudit>,
    /// Each physical table (`schema.table`) of a parent the stored snapshot read, by parent.
    pub parent_tables: std::collections::BTreeMap<String, ModelName>,
}

/// One audit of a model, rendered for it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelAudit {
    /// The call as the model writes it, for messages: `not_null(columns := [id])`.
    pub call: String,
    pub blocking: bool,
    /// Returns the rows that break the audit; `@this_model` reads as the model's own name.
    pub query: ModelQuery,
}

impl Model {
    /// The definition `snapshot` was planned from, as a model (`--select-model` keeps an
    /// unselected model's stored definition); `parents` are the snapshots it read.
    pub fn from_snapshot(
        snapshot: &crate::snapshot::Snapshot,
        parents: &[&crate::snapshot::Snapshot],
    ) -> Result<Model, String> {
        let unreadable = |what: &str, error: String| {
            format!(
                "{}: the environment's definition (snapshot {}) cannot be read back: {what}: {error}",
                snapshot.name, snapshot.id
            )
        };
        let cron = Cron::parse(&snapshot.cron).map_err(|error| unreadable("cron", error.to_string()))?;
        let query = match &snapshot.normalized_query {
            Some(text) => Some(
                crate::query::parse_query(text, &snapshot.dialect)
                    .map_err(|error| unreadable("query", error.message))?,
            ),
            None => None,
        };
        let parent_tables = parents
            .iter()
            .filter_map(|parent| Some((parent.physical_table()?.to_string(), parent.name.clone())))
            .collect();
        Ok(Model {
            name: snapshot.name.clone(),
            file: format!("snapshot {}", snapshot.id),
            kind: snapshot.kind.clone(),
            disable_restatement: snapshot.disable_restatement,
            cron,
            start: Some(snapshot.start),
            end: snapshot.end,
            owner: snapshot.owner.clone(),
            description: snapshot.description.clone(),
            grain: snapshot.grain.clone(),
            gateway: snapshot.gateway.clone(),
            dialect: snapshot.dialect.clone(),
            tags: snapshot.tags.clone(),
            depends_on: Vec::new(),
            columns: snapshot.columns.clone(),
            enabled: true,
            pre_statements: snapshot.pre_statements.clone(),
            post_statements: snapshot.post_statements.clone(),
            query,
            seed: snapshot.seed.clone(),
            audits: Vec::new(),
            stored: Some(StoredDefinition {
                data_hash: snapshot.fingerprint.data_hash.clone(),
                metadata_hash: snapshot.fingerprint.metadata_hash.clone(),
                audits: snapshot.audits.clone(),
                parent_tables,
            }),
        })
    }

    /// Whether the query reads the model's own table (`@this_model` or its own name).
    pub fn is_self_referencing(&self) -> bool {
        self.query
            .as_ref()
            .is_some_and(|query| query.references.iter().any(|reference| reference == &self.name.to_string()))
    }
}
