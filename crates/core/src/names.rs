//! Validated names and ids: model names, environment names, versions and the hash-based ids.

use std::fmt;

use serde::{Deserialize, Serialize};

/// True for a plain SQL identifier sluice accepts everywhere without quoting:
/// a lowercase ASCII letter or underscore, then letters, digits or underscores, at most 63 bytes.
pub fn is_valid_identifier(text: &str) -> bool {
    let mut characters = text.chars();
    let Some(first) = characters.next() else {
        return false;
    };
    if !(first.is_ascii_lowercase() || first == '_') {
        return false;
    }
    text.len() <= 63 && characters.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// What an identifier must look like, for error messages.
pub const IDENTIFIER_EXPECTATION: &str = "a lowercase identifier of letters, digits and underscores that starts with a letter or underscore (at most 63 characters)";

/// A model's name `schema.table`, both parts validated identifiers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModelName {
    pub schema: String,
    pub table: String,
}

impl ModelName {
    /// Parses `schema.table`; upper-case letters are folded to lower case as SQL does for unquoted names.
    pub fn parse(text: &str) -> Result<ModelName, String> {
        let folded = text.trim().to_ascii_lowercase();
        let parts: Vec<&str> = folded.split('.').collect();
        if parts.len() != 2 {
            return Err(format!("expected a model name of the form schema.table, found {text:?}"));
        }
        for part in &parts {
            if !is_valid_identifier(part) || part.contains("__") {
                return Err(format!(
                    "expected a model name of the form schema.table where each part is {IDENTIFIER_EXPECTATION} without a double underscore, found {text:?}"
                ));
            }
        }
        Ok(ModelName { schema: parts[0].to_string(), table: parts[1].to_string() })
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// An environment name: `prod` or any validated identifier.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EnvironmentName(String);

impl EnvironmentName {
    pub fn parse(text: &str) -> Result<EnvironmentName, String> {
        if !is_valid_identifier(text) || text.contains("__") {
            return Err(format!(
                "expected an environment name that is {IDENTIFIER_EXPECTATION} without a double underscore, found {text:?}"
            ));
        }
        Ok(EnvironmentName(text.to_string()))
    }

    pub fn prod() -> EnvironmentName {
        EnvironmentName("prod".to_string())
    }

    pub fn is_prod(&self) -> bool {
        self.0 == "prod"
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The schema holding this environment's view of `schema`: `schema` for prod, `schema__env` otherwise.
    pub fn view_schema(&self, schema: &str) -> String {
        if self.is_prod() { schema.to_string() } else { format!("{schema}__{}", self.0) }
    }
}

impl fmt::Display for EnvironmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which physical table a snapshot writes; shared by snapshots whose changes keep the data compatible.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version(pub String);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The physical table of one model version: `sluice__<schema>.<schema>__<table>__<version>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PhysicalTable {
    pub schema: String,
    pub table: String,
}

impl PhysicalTable {
    pub fn of(name: &ModelName, version: &Version) -> PhysicalTable {
        PhysicalTable {
            schema: format!("sluice__{}", name.schema),
            table: format!("{}__{}__{}", name.schema, name.table, version.0),
        }
    }
}

impl fmt::Display for PhysicalTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Hex of the first `bytes` bytes of a blake3 hash.
pub(crate) fn short_hash(hash: &blake3::Hash, bytes: usize) -> String {
    let mut text = String::with_capacity(bytes * 2);
    for byte in &hash.as_bytes()[..bytes] {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// A snapshot's id: the model name and its fingerprint's short hash, e.g. `sushi.orders@1a2b3c4d5e6f7a8b`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SnapshotId(pub String);

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A plan's id: a hash of what the plan does and when it was made.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PlanId(pub String);

impl fmt::Display for PlanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A run's id: one attempt to apply one plan, `<plan id>-<attempt>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RunId(pub String);

impl RunId {
    pub fn for_attempt(plan: &PlanId, attempt: u32) -> RunId {
        RunId(format!("{plan}-{attempt}"))
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A task's id: 16 bytes of blake3 over its snapshot id and its interval batch, so that the
/// same work always has the same id.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId(pub [u8; 16]);

impl TaskId {
    pub fn compute(snapshot: &SnapshotId, start: i64, end: i64) -> TaskId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(snapshot.0.as_bytes());
        hasher.update(&[0]);
        hasher.update(&start.to_le_bytes());
        hasher.update(&end.to_le_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        TaskId(bytes)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_validated_and_folded() {
        assert_eq!(ModelName::parse("Sushi.Orders").unwrap().to_string(), "sushi.orders");
        assert!(ModelName::parse("orders").is_err());
        assert!(ModelName::parse("a.b.c").is_err());
        assert!(ModelName::parse("sushi.orders; drop table x").is_err());
        assert!(ModelName::parse("sushi.\"x\"").is_err());
        assert!(ModelName::parse("sushi.a__b").is_err());
        assert!(ModelName::parse("1sushi.a").is_err());
    }

    #[test]
    fn environment_names_reject_injection() {
        assert!(EnvironmentName::parse("dev").is_ok());
        assert!(EnvironmentName::parse("dev'; --").is_err());
        assert_eq!(EnvironmentName::parse("dev").unwrap().view_schema("sushi"), "sushi__dev");
        assert_eq!(EnvironmentName::prod().view_schema("sushi"), "sushi");
    }

    #[test]
    fn task_ids_are_stable_and_distinct() {
        let snapshot = SnapshotId("a.b@00".to_string());
        assert_eq!(TaskId::compute(&snapshot, 0, 10), TaskId::compute(&snapshot, 0, 10));
        assert_ne!(TaskId::compute(&snapshot, 0, 10), TaskId::compute(&snapshot, 0, 11));
        assert_eq!(TaskId::compute(&snapshot, 0, 10).to_string().len(), 32);
    }
}
