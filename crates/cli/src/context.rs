//! What every command opens: the project, the state store, and warehouse connections per gateway.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use async_trait::async_trait;
use sluice_coordinator::GatewayCheck;
use sluice_core::config::{Config, Connection, Gateway};
use sluice_core::project::{Project, load_project};
use sluice_engine::{EngineError, Warehouse, WarehouseFactory};
use sluice_state::StateStore;

use crate::project_files::read_project_files;

/// A loaded project and where it lives.
pub struct ProjectContext {
    pub root: PathBuf,
    pub project: Project,
}

impl ProjectContext {
    pub fn load(root: &Path) -> Result<ProjectContext> {
        let files = read_project_files(root)?;
        let project = load_project(&files).map_err(|errors| anyhow!("{}", errors.to_string().trim_end()))?;
        for warning in &project.warnings {
            tracing::warn!("{warning}");
        }
        Ok(ProjectContext { root: root.to_path_buf(), project })
    }
}

/// Reads `config.yaml` (or `config.yml`) alone (what the long-running roles need).
pub fn load_config(root: &Path) -> Result<Config> {
    let name = crate::project_files::config_file(root)?
        .ok_or_else(|| anyhow!("{} has no config.yaml (or config.yml)", root.display()))?;
    let path = root.join(name);
    let text = crate::project_files::read_config(root, name)?;
    let outcome = sluice_core::config::parse_config(&path.to_string_lossy(), &text);
    for warning in &outcome.warnings {
        tracing::warn!("{warning}");
    }
    match outcome.config {
        Some(config) if outcome.errors.is_empty() => Ok(config),
        _ => {
            let errors: Vec<String> = outcome.errors.iter().map(ToString::to_string).collect();
            Err(anyhow!("{}", errors.join("\n")))
        }
    }
}

/// The PostgreSQL URL of a connection, for the state store; the password is percent-encoded.
fn postgres_url(connection: &Connection) -> Option<String> {
    let Connection::Postgres { host, port, user, password, database } = connection else { return None };
    let encode = |text: &str| -> String {
        text.bytes()
            .map(|byte| match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (byte as char).to_string(),
                other => format!("%{other:02X}"),
            })
            .collect()
    };
    let credentials = if password.expose().is_empty() {
        encode(user)
    } else {
        format!("{}:{}", encode(user), encode(password.expose()))
    };
    Some(format!("postgres://{credentials}@{host}:{port}/{}", encode(database)))
}

/// Where state lives: `--state`/`SLUICE_STATE_URL`, else the default gateway's
/// `state_connection`, else `.sluice/state.db` in the project.
pub fn state_location(explicit: Option<&str>, config: Option<&Config>, root: &Path) -> Result<String> {
    if let Some(url) = explicit {
        return Ok(url.to_string());
    }
    if let Some(config) = config
        && let Some(gateway) = config.gateways.get(&config.default_gateway)
        && let Some(connection) = &gateway.state_connection
    {
        return match connection {
            Connection::Postgres { .. } => postgres_url(connection).context("while reading state_connection"),
            Connection::DuckDb { .. } | Connection::MySql { .. } => Err(anyhow!(
                "gateways.{}.state_connection: only postgres is supported as a state connection (embedded state is SQLite in .sluice/)",
                gateway.name
            )),
        };
    }
    Ok(root.join(".sluice").join("state.db").to_string_lossy().into_owned())
}

pub async fn open_state(location: &str) -> Result<Arc<dyn StateStore>> {
    // The location may hold a password: it is never printed.
    sluice_state::open_state(location).await.map_err(|error| anyhow!("while opening the state store: {error}"))
}

/// Opens warehouse connections from the project's gateways.
pub struct ProjectWarehouses {
    pub gateways: BTreeMap<String, Gateway>,
    pub root: PathBuf,
}

#[async_trait]
impl WarehouseFactory for ProjectWarehouses {
    async fn connect(&self, gateway: &str) -> Result<Box<dyn Warehouse>, EngineError> {
        let Some(config) = self.gateways.get(gateway) else {
            return Err(EngineError::Unsupported {
                gateway: gateway.to_string(),
                what: "the gateway is not in config.yaml".to_string(),
            });
        };
        sluice_engine::connect(config, &self.root).await
    }
}

#[async_trait]
impl GatewayCheck for ProjectWarehouses {
    async fn check(&self, gateway: &str) -> Result<(), String> {
        let mut warehouse = self.connect(gateway).await.map_err(|error| error.to_string())?;
        warehouse.ping().await.map_err(|error| error.to_string())
    }

    async fn run_statements(&self, gateway: &str, statements: &[String]) -> Result<(), String> {
        let mut warehouse = self.connect(gateway).await.map_err(|error| error.to_string())?;
        warehouse.execute(&sluice_engine::transaction_script(statements)).await.map_err(|error| error.to_string())
    }
}
