//! Snapshots: a model at one fingerprint. The fingerprint hashes what defines the data and the
//! metadata, and the same of every parent, over the normalized definition (whitespace and
//! comments do not count).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::interval::Timestamp;
use crate::model::{Model, ModelKind, SeedData};
use crate::names::{ModelName, PhysicalTable, SnapshotId, Version, short_hash};
use crate::project::Project;

/// The four hashes that identify a snapshot (16 hex digits each).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fingerprint {
    pub data_hash: String,
    pub metadata_hash: String,
    pub parent_data_hash: String,
    pub parent_metadata_hash: String,
}

impl Fingerprint {
    pub fn snapshot_id(&self, name: &ModelName) -> SnapshotId {
        let mut hasher = blake3::Hasher::new();
        for part in [&self.data_hash, &self.metadata_hash, &self.parent_data_hash, &self.parent_metadata_hash] {
            hasher.update(part.as_bytes());
            hasher.update(&[0]);
        }
        SnapshotId(format!("{name}@{}", short_hash(&hasher.finalize(), 8)))
    }

    /// The version a breaking change gets: a hash of the data hashes alone.
    pub fn new_version(&self) -> Version {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.data_hash.as_bytes());
        hasher.update(&[0]);
        hasher.update(self.parent_data_hash.as_bytes());
        Version(short_hash(&hasher.finalize(), 5))
    }
}

/// Hashes named fields with their lengths, so that no two different field lists collide by concatenation.
struct FieldHasher(blake3::Hasher);

impl FieldHasher {
    fn new() -> Self {
        FieldHasher(blake3::Hasher::new())
    }

    fn field(&mut self, name: &str, value: &str) -> &mut Self {
        for part in [name, value] {
            self.0.update(&(part.len() as u64).to_le_bytes());
            self.0.update(part.as_bytes());
        }
        self
    }

    fn finish(&self) -> String {
        short_hash(&self.0.finalize(), 8)
    }
}

fn data_hash(model: &Model) -> String {
    if let Some(stored) = &model.stored {
        return stored.data_hash.clone();
    }
    let mut hasher = FieldHasher::new();
    hasher.field("kind", model.kind.name()).field("gateway", &model.gateway).field("dialect", &model.dialect);
    match &model.kind {
        ModelKind::IncrementalByTimeRange { time_column, time_format, .. } => {
            hasher.field("time_column", time_column);
            // Hashed only when set, so earlier fingerprints stand.
            if let Some(format) = time_format {
                hasher.field("time_format", format);
            }
        }
        ModelKind::IncrementalByUniqueKey { unique_key, .. } => {
            hasher.field("unique_key", &unique_key.join(","));
        }
        ModelKind::IncrementalByPartition { partitioned_by, .. } => {
            hasher.field("partitioned_by", &partitioned_by.join(","));
        }
        ModelKind::IncrementalUnmanaged { insert_overwrite, partitioned_by, .. } => {
            hasher.field("insert_overwrite", if *insert_overwrite { "1" } else { "0" });
            hasher.field("partitioned_by", &partitioned_by.join(","));
        }
        ModelKind::ScdType2(scd) => {
            let flag = |value: bool| if value { "1" } else { "0" };
            hasher
                .field("unique_key", &scd.unique_key.join(","))
                .field("valid_from", &scd.valid_from)
                .field("valid_to", &scd.valid_to)
                .field("invalidate_hard_deletes", flag(scd.invalidate_hard_deletes));
            match &scd.change {
                crate::model::ScdChange::ByTime { updated_at, updated_at_as_valid_from } => {
                    hasher
                        .field("updated_at", updated_at)
                        .field("updated_at_as_valid_from", flag(*updated_at_as_valid_from));
                }
                crate::model::ScdChange::ByColumn { columns, execution_time_as_valid_from, updated_at } => {
                    hasher
                        .field("columns", &columns.as_ref().map_or("*".to_string(), |columns| columns.join(",")))
                        .field("execution_time_as_valid_from", flag(*execution_time_as_valid_from))
                        .field("updated_at", updated_at.as_deref().unwrap_or(""));
                }
            }
        }
        _ => {}
    }
    if let Some(query) = &model.query {
        hasher.field("query", &query.normalized);
    }
    for statement in &model.pre_statements {
        hasher.field("pre", statement);
    }
    for statement in &model.post_statements {
        hasher.field("post", statement);
    }
    for (column, column_type) in &model.columns {
        hasher.field("column", column).field("type", column_type);
    }
    if let Some(seed) = &model.seed {
        hasher.field("seed_columns", &seed.columns.join(","));
        for row in &seed.rows {
            hasher.field("row", &row.join("\u{1f}"));
        }
    }
    hasher.finish()
}

fn metadata_hash(model: &Model) -> String {
    if let Some(stored) = &model.stored {
        return stored.metadata_hash.clone();
    }
    let mut hasher = FieldHasher::new();
    hasher
        .field("cron", model.cron.text())
        .field("start", &model.start.map(|start| start.0.to_string()).unwrap_or_default())
        .field("end", &model.end.map(|end| end.0.to_string()).unwrap_or_default())
        .field("owner", model.owner.as_deref().unwrap_or(""))
        .field("description", model.description.as_deref().unwrap_or(""))
        .field("grain", &model.grain.join(","))
        .field("tags", &model.tags.join(","))
        .field("batch_size", &model.kind.batch_size().map(|b| b.to_string()).unwrap_or_default())
        .field("lookback", &model.kind.lookback().to_string())
        .field("forward_only", if model.kind.is_forward_only() { "1" } else { "0" });
    // Audits decide whether a write stands, not what it writes: a change is metadata only.
    for audit in &model.audits {
        hasher
            .field("audit", &audit.call)
            .field("blocking", if audit.blocking { "1" } else { "0" })
            .field("audit_query", &audit.query.normalized);
    }
    if let ModelKind::IncrementalByTimeRange { batch_concurrency: Some(concurrency), .. } = &model.kind {
        hasher.field("batch_concurrency", &concurrency.to_string());
    }
    // Hashed only where it differs from the kind's default, so earlier fingerprints stand.
    if model.disable_restatement != model.kind.disables_restatement_by_default() {
        hasher.field("disable_restatement", if model.disable_restatement { "1" } else { "0" });
    }
    hasher.finish()
}

/// A model's own hashes (data, metadata), its parents left out: what `--select-model` compares
/// to tell a model changed in its file from one changed only through its parents.
pub fn own_hashes(model: &Model) -> (String, String) {
    (data_hash(model), metadata_hash(model))
}

/// Every model's fingerprint, parents before children.
pub fn fingerprint_project(project: &Project) -> BTreeMap<ModelName, Fingerprint> {
    let mut fingerprints: BTreeMap<ModelName, Fingerprint> = BTreeMap::new();
    for name in &project.order {
        let model = &project.models[name];
        let mut parent_data = FieldHasher::new();
        let mut parent_metadata = FieldHasher::new();
        for parent in project.parents.get(name).into_iter().flatten() {
            let fingerprint = &fingerprints[parent];
            parent_data.field(&parent.to_string(), &fingerprint.data_hash).field("", &fingerprint.parent_data_hash);
            parent_metadata
                .field(&parent.to_string(), &fingerprint.metadata_hash)
                .field("", &fingerprint.parent_metadata_hash);
        }
        let fingerprint = Fingerprint {
            data_hash: data_hash(model),
            metadata_hash: metadata_hash(model),
            parent_data_hash: parent_data.finish(),
            parent_metadata_hash: parent_metadata.finish(),
        };
        fingerprints.insert(name.clone(), fingerprint);
    }
    fingerprints
}

/// How a directly modified snapshot's change was categorized.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeCategory {
    /// Downstream data may change: the model and every descendant get new tables.
    Breaking,
    /// Only projections were added: the model gets a new table, its descendants keep theirs.
    NonBreaking,
    /// Applied to new intervals only, in the existing table.
    ForwardOnly,
    /// Only metadata (owner, description, cron, ...) changed: nothing is rebuilt.
    MetadataOnly,
    /// The rules cannot decide; apply refuses until the change is categorized.
    Uncategorized,
}

impl ChangeCategory {
    pub fn label(&self) -> &'static str {
        match self {
            ChangeCategory::Breaking => "breaking",
            ChangeCategory::NonBreaking => "non-breaking",
            ChangeCategory::ForwardOnly => "forward-only",
            ChangeCategory::MetadataOnly => "metadata-only",
            ChangeCategory::Uncategorized => "uncategorized",
        }
    }
}

/// Everything needed to execute and promote one snapshot without the project's files: what
/// the state store keeps and what a stateless worker reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub name: ModelName,
    pub fingerprint: Fingerprint,
    pub version: Version,
    pub kind: ModelKind,
    /// The model's `disable_restatement` (snapshots stored before it: false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disable_restatement: bool,
    pub cron: String,
    pub start: Timestamp,
    pub end: Option<Timestamp>,
    pub gateway: String,
    pub dialect: String,
    pub columns: Vec<(String, String)>,
    pub owner: Option<String>,
    pub description: Option<String>,
    pub tags: Vec<String>,
    pub grain: Vec<String>,
    /// Snapshot ids of the parent models (embedded ones included).
    pub parents: Vec<SnapshotId>,
    /// The query as written, normalized (macros as placeholders, model names as written).
    pub normalized_query: Option<String>,
    /// The same, over several lines, for plan diffs.
    pub pretty_query: Option<String>,
    /// The executable query: model references rewritten to physical tables, embedded models
    /// inlined, time macros as placeholders (see `QueryTemplate`).
    pub rendered_query: Option<String>,
    pub pre_statements: Vec<String>,
    pub post_statements: Vec<String>,
    pub seed: Option<SeedData>,
    /// How this snapshot's change was categorized when it was first planned.
    pub change_category: Option<ChangeCategory>,
    /// Whether the query reads the model's own table: its batches then run in order.
    pub self_referencing: bool,
    /// The audits run after each write (snapshots stored before audits existed: none).
    #[serde(default)]
    pub audits: Vec<SnapshotAudit>,
}

/// One audit of a snapshot, ready to run (see `sluice_engine::audit_check`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAudit {
    /// The call as the model writes it: `not_null(columns := [id])`.
    pub call: String,
    pub blocking: bool,
    /// The query returning the rows that break the audit, model references rewritten as in
    /// `rendered_query` and time macros as placeholders; the model's own table is read as
    /// [`THIS_MODEL`], which the write defines as the rows it wrote (the interval's rows of an
    /// incremental-by-time model, else the whole table).
    pub query: String,
}

/// The relation an audit's query reads for the audited model's rows.
pub const THIS_MODEL: &str = "sluice_this_model";

impl Snapshot {
    pub fn physical_table(&self) -> Option<PhysicalTable> {
        self.kind.is_materialized().then(|| PhysicalTable::of(&self.name, &self.version))
    }
}
