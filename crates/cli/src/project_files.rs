//! Reads a project folder from disk into `ProjectFiles`: the only file reads of planning.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use sluice_core::project::{EXTERNAL_MODELS_FILE, ProjectFiles};

/// Folders never read as part of a project.
const SKIPPED_FOLDERS: &[&str] = &[".sluice", "target", ".git", "node_modules", ".cache"];

fn walk(root: &Path, folder: &Path, found: &mut Vec<String>) -> Result<()> {
    let entries = fs::read_dir(folder).with_context(|| format!("while listing {}", folder.display()))?;
    let mut paths: Vec<_> = entries.filter_map(|entry| entry.ok().map(|entry| entry.path())).collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
        if path.is_dir() {
            if !SKIPPED_FOLDERS.contains(&name) && !name.starts_with('.') {
                walk(root, &path, found)?;
            }
            continue;
        }
        let relative = path.strip_prefix(root).unwrap_or(&path);
        let relative: Vec<String> =
            relative.components().map(|component| component.as_os_str().to_string_lossy().into_owned()).collect();
        found.push(relative.join("/"));
    }
    Ok(())
}

fn read(root: &Path, relative: &str) -> Result<String> {
    let path = root.join(relative);
    fs::read_to_string(&path).with_context(|| format!("while reading {}", path.display()))
}

/// The project's config file name (`config.yaml` or `config.yml`), if it has one.
pub fn config_file(root: &Path) -> Result<Option<&'static str>> {
    let present: Vec<&str> =
        ["config.yaml", "config.yml", "config.py"].into_iter().filter(|name| root.join(name).is_file()).collect();
    sluice_core::config::config_file_name(&present).map_err(|message| anyhow::anyhow!("{}: {message}", root.display()))
}

/// The config file's text with its `{{ env_var('NAME') }}` rendered from the environment.
pub fn read_config(root: &Path, name: &str) -> Result<String> {
    let text = read(root, name)?;
    sluice_core::config::render_config_env(name, &text, |variable| std::env::var(variable).ok())
        .map_err(|error| anyhow::anyhow!("{error}"))
}

/// Reads `config.yaml` (or `config.yml`), `external_models.yaml`, `models/**/*.sql`, `audits/**/*.sql` and every CSV file of the project.
pub fn read_project_files(root: &Path) -> Result<ProjectFiles> {
    if !root.is_dir() {
        bail!("project folder {} does not exist", root.display());
    }
    let mut files = ProjectFiles::default();
    if let Some(name) = config_file(root)? {
        files.config = Some(read_config(root, name)?);
        files.config_file = Some(name.to_string());
    }
    if root.join(EXTERNAL_MODELS_FILE).is_file() {
        files.external_models = Some(read(root, EXTERNAL_MODELS_FILE)?);
    }
    let mut paths = Vec::new();
    walk(root, root, &mut paths)?;
    let mut models = BTreeMap::new();
    let mut csv_files = BTreeMap::new();
    for path in paths {
        if path.starts_with("models/") && path.ends_with(".sql") {
            models.insert(path.clone(), read(root, &path)?);
        } else if path.starts_with("audits/") && path.ends_with(".sql") {
            files.audits.insert(path.clone(), read(root, &path)?);
        } else if (path.starts_with("models/") || path.starts_with("macros/")) && path.ends_with(".py") {
            files.python_files.insert(path.clone(), read(root, &path)?);
        } else if path.ends_with(".csv") {
            csv_files.insert(path.clone(), read(root, &path)?);
        }
    }
    if models.is_empty() {
        bail!("project folder {} has no models/*.sql files", root.display());
    }
    files.models = models;
    files.csv_files = csv_files;
    Ok(files)
}
