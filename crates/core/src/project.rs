//! A whole project: config, models and external models, checked together, with the model
//! dependency graph in topological order. Files are read by the caller and passed in as text.

use std::collections::{BTreeMap, BTreeSet};

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use serde_yaml_ng::Value;

use crate::config::{CONFIG_FILE, Config, parse_config};
use crate::error::{ErrorSink, ProjectError, ProjectErrors, SourceLocation};
use crate::model::{Model, ModelKind};
use crate::model_file::{ModelFileContext, declared_name, declares_external, expand_blueprints, parse_model_file};
use crate::names::ModelName;

pub const EXTERNAL_MODELS_FILE: &str = "external_models.yaml";

/// The text of a project's files, keyed by project-relative path with `/` separators.
#[derive(Clone, Debug, Default)]
pub struct ProjectFiles {
    /// The project's config (`config.yaml` or `config.yml`), when it has one.
    pub config: Option<String>,
    /// The config's file name, for messages; `None` reads as `config.yaml`.
    pub config_file: Option<String>,
    /// Every `models/**/*.sql` file.
    pub models: BTreeMap<String, String>,
    /// Every `audits/**/*.sql` file.
    pub audits: BTreeMap<String, String>,
    /// Every CSV file (seeds).
    pub csv_files: BTreeMap<String, String>,
    /// `external_models.yaml`, when present.
    pub external_models: Option<String>,
    /// Every Python file under `models/` (Python models) and `macros/` (Python macros): sluice
    /// cannot run them, but names them in its errors.
    pub python_files: BTreeMap<String, String>,
}

/// Python macros by lower-cased name, with the file defining each: every `def NAME(` that
/// follows a `@macro` decorator.
fn python_macros(files: &ProjectFiles) -> BTreeMap<String, String> {
    let mut macros = BTreeMap::new();
    for (path, text) in files.python_files.iter().filter(|(path, _)| path.starts_with("macros/")) {
        let mut decorated = false;
        for line in text.lines().map(str::trim_start) {
            if line.starts_with("@macro") {
                decorated = true;
            } else if decorated
                && let Some(rest) = line.strip_prefix("def ").or_else(|| line.strip_prefix("async def "))
                && let Some((name, _)) = rest.split_once('(')
            {
                macros.insert(name.trim().to_ascii_lowercase(), path.clone());
                decorated = false;
            }
        }
    }
    macros
}

/// Whether a Python file under `models/` defines a model (a `@model(` decorator); helpers and
/// `__init__.py` files do not.
fn defines_python_model(text: &str) -> bool {
    text.lines().any(|line| line.trim_start().starts_with("@model("))
}

/// One unsupported model per Python model: sluice runs SQL models only.
fn python_models(files: &ProjectFiles) -> Vec<UnsupportedModel> {
    let models =
        files.python_files.iter().filter(|(path, text)| path.starts_with("models/") && defines_python_model(text));
    let mut unsupported = Vec::new();
    for (path, text) in models {
        // The model's name, when `@model("schema.name", ...)` gives it plainly.
        let name = text
            .split_once("@model(")
            .map(|(_, rest)| rest.trim_start())
            .and_then(|rest| rest.strip_prefix('"').or_else(|| rest.strip_prefix('\'')))
            .and_then(|rest| rest.split(['"', '\'']).next())
            .map(str::to_ascii_lowercase);
        let shown = name.as_ref().map(|name| format!(" ({name})")).unwrap_or_default();
        let error = ProjectError::unsupported(
            SourceLocation::file(path),
            format!(
                "a Python model{shown}, which sluice cannot run; rewrite it as a SQL model in models/*.sql, or remove it and declare its table in {EXTERNAL_MODELS_FILE}"
            ),
        );
        unsupported.push(UnsupportedModel { name, errors: vec![error] });
    }
    unsupported
}

/// A model sluice cannot run (it needs Python, Jinja, or a kind or macro not built), or one that
/// reads such a model: left out of a plan made with `--skip-unsupported`, refused otherwise.
#[derive(Clone, Debug, PartialEq)]
pub struct UnsupportedModel {
    /// Lower-cased `schema.name`, when the file declares it readably.
    pub name: Option<String>,
    /// Why, each naming the file (and the macro, kind or parent).
    pub errors: Vec<ProjectError>,
}

/// A checked project.
#[derive(Clone, Debug)]
pub struct Project {
    pub config: Config,
    /// Enabled models by name.
    pub models: BTreeMap<ModelName, Model>,
    /// Model names, parents before children.
    pub order: Vec<ModelName>,
    /// Each model's parent models (other models it reads, embedded ones included; itself excluded).
    pub parents: BTreeMap<ModelName, Vec<ModelName>>,
    /// Tables declared in `external_models.yaml`.
    pub external_models: BTreeSet<String>,
    pub warnings: Vec<ProjectError>,
    /// Models sluice cannot run, and the models that read them: not in `models`.
    pub unsupported: Vec<UnsupportedModel>,
}

impl Project {
    /// Every unsupported model's errors, as one error listing them all: what a plan shows
    /// unless it is made with `--skip-unsupported`.
    pub fn unsupported_errors(&self) -> Option<ProjectErrors> {
        let mut errors: Vec<ProjectError> =
            self.unsupported.iter().flat_map(|model| model.errors.iter().cloned()).collect();
        errors.sort();
        errors.dedup();
        (!errors.is_empty()).then_some(ProjectErrors(errors))
    }

    /// Whether `name` (lower-cased `schema.name`) is a model sluice leaves out.
    pub fn is_unsupported(&self, name: &str) -> bool {
        self.unsupported.iter().any(|model| model.name.as_deref() == Some(name))
    }
}

impl Project {
    /// The materialized models a model's tasks wait for: its parents, with EMBEDDED parents
    /// replaced by their own parents, transitively.
    pub fn materialized_parents(&self, name: &ModelName) -> Vec<ModelName> {
        let mut result = BTreeSet::new();
        let mut pending: Vec<&ModelName> = self.parents.get(name).map(|p| p.iter().collect()).unwrap_or_default();
        let mut seen = BTreeSet::new();
        while let Some(parent) = pending.pop() {
            if !seen.insert(parent) {
                continue;
            }
            match self.models.get(parent).map(|model| &model.kind) {
                Some(ModelKind::Embedded) => pending.extend(self.parents.get(parent).into_iter().flatten()),
                Some(_) => {
                    result.insert(parent.clone());
                }
                None => {}
            }
        }
        result.into_iter().collect()
    }
}

fn read_external_models(text: &str, errors: &mut ErrorSink) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let document: Value = match serde_yaml_ng::from_str(text) {
        Ok(document) => document,
        Err(error) => {
            let (line, column) = error.location().map(|l| (l.line() as u64, l.column() as u64)).unwrap_or((0, 0));
            errors.push(SourceLocation::new(EXTERNAL_MODELS_FILE, line, column), format!("not valid YAML: {error}"));
            return names;
        }
    };
    let Value::Sequence(entries) = document else {
        if !document.is_null() {
            errors.push(SourceLocation::file(EXTERNAL_MODELS_FILE), "expected a list of tables, each with a name");
        }
        return names;
    };
    for (index, entry) in entries.iter().enumerate() {
        match entry.get("name").and_then(Value::as_str) {
            Some(name) => {
                names.insert(name.to_ascii_lowercase());
            }
            None => {
                errors.push(SourceLocation::file(EXTERNAL_MODELS_FILE), format!("entry {}: expected a name", index + 1))
            }
        }
    }
    names
}

/// The models of `parents` (each model's parents), parents before children: Kahn's order,
/// smallest name first so that it is stable. Models on a cycle are left out.
pub(crate) fn topological_order(parents: &BTreeMap<ModelName, Vec<ModelName>>) -> Vec<ModelName> {
    let mut waiting: BTreeMap<&ModelName, usize> = parents.iter().map(|(name, p)| (name, p.len())).collect();
    let mut children: BTreeMap<&ModelName, Vec<&ModelName>> = BTreeMap::new();
    for (child, child_parents) in parents {
        for parent in child_parents {
            children.entry(parent).or_default().push(child);
        }
    }
    let mut ready: BTreeSet<&ModelName> =
        waiting.iter().filter(|(_, count)| **count == 0).map(|(name, _)| *name).collect();
    let mut order = Vec::with_capacity(parents.len());
    while let Some(name) = ready.pop_first() {
        order.push(name.clone());
        for child in children.get(name).into_iter().flatten() {
            if let Some(count) = waiting.get_mut(child) {
                *count -= 1;
                if *count == 0 {
                    ready.insert(child);
                }
            }
        }
    }
    order
}

/// Reads and checks a whole project; every error of every file is reported together.
pub fn load_project(files: &ProjectFiles) -> Result<Project, ProjectErrors> {
    let mut errors = ErrorSink::default();
    let mut warnings = Vec::new();
    let config = match &files.config {
        Some(text) => {
            let outcome = parse_config(files.config_file.as_deref().unwrap_or(CONFIG_FILE), text);
            warnings.extend(outcome.warnings);
            for error in outcome.errors {
                errors.push_error(error);
            }
            outcome.config
        }
        None => Some(Config::default()),
    };
    let Some(config) = config else {
        return errors.finish(unreachable_project());
    };
    let mut unsupported = python_models(files);
    let python_macros = python_macros(files);
    let audits = crate::audit::project_audits(&files.audits, &mut errors);
    let context = ModelFileContext {
        config: &config,
        audits: &audits,
        csv_files: &files.csv_files,
        python_macros: &python_macros,
    };
    let mut models: BTreeMap<ModelName, Model> = BTreeMap::new();
    let texts = files.models.iter().flat_map(|(path, text)| match expand_blueprints(path, text) {
        Ok(texts) => texts.into_iter().map(|text| (path, Ok(text))).collect::<Vec<_>>(),
        Err(file_errors) => vec![(path, Err(file_errors))],
    });
    let mut declared_external = BTreeSet::new();
    for (path, text) in texts {
        let name = text.as_ref().ok().and_then(|text| declared_name(text));
        if let (Ok(text), Some(name)) = (&text, &name)
            && declares_external(text)
        {
            // A table outside the project, read as it is: never built, no view.
            declared_external.insert(name.to_string());
            continue;
        }
        match text.and_then(|text| parse_model_file(path, &text, context)) {
            Ok(parsed) => {
                warnings.extend(parsed.warnings);
                let model = parsed.model;
                if let Some(existing) = models.get(&model.name) {
                    errors.push(
                        SourceLocation::file(path),
                        format!("duplicate model name {}; {} already defines it", model.name, existing.file),
                    );
                    continue;
                }
                if model.enabled {
                    models.insert(model.name.clone(), model);
                }
            }
            // Valid SQLMesh sluice cannot run: the model is left out, by name.
            Err(file_errors) if name.is_some() && file_errors.iter().all(|error| error.unsupported) => {
                unsupported.push(UnsupportedModel { name: name.map(|name| name.to_string()), errors: file_errors });
            }
            Err(file_errors) => {
                for error in file_errors {
                    errors.push_error(error);
                }
            }
        }
    }
    leave_out_readers_of_unsupported(&mut models, &mut unsupported);
    let mut external_models = match &files.external_models {
        Some(text) => read_external_models(text, &mut errors),
        None => BTreeSet::new(),
    };
    external_models.extend(declared_external);

    // Parents: table references that name another model.
    let by_key: BTreeMap<String, ModelName> = models.keys().map(|name| (name.to_string(), name.clone())).collect();
    let mut parents: BTreeMap<ModelName, Vec<ModelName>> = BTreeMap::new();
    for (name, model) in &models {
        let mut model_parents = Vec::new();
        let references = model.query.iter().flat_map(|query| &query.references).chain(&model.depends_on);
        for reference in references {
            match by_key.get(reference) {
                Some(parent) if parent != name && !model_parents.contains(parent) => model_parents.push(parent.clone()),
                Some(_) => {}
                None if external_models.contains(reference) || files.external_models.is_none() => {}
                None => warnings.push(ProjectError::new(
                    SourceLocation::file(&model.file),
                    format!(
                        "{reference} is neither a model nor declared in {EXTERNAL_MODELS_FILE}; it is read as written"
                    ),
                )),
            }
        }
        if model.is_self_referencing()
            && !model.kind.is_time_range()
            && !matches!(model.kind, ModelKind::IncrementalByUniqueKey { .. })
        {
            errors.push(
                SourceLocation::file(&model.file),
                format!("{name} reads itself; only incremental models may reference their own table"),
            );
        }
        if matches!(model.kind, ModelKind::Embedded) && model.is_self_referencing() {
            errors.push(SourceLocation::file(&model.file), format!("the EMBEDDED model {name} cannot read itself"));
        }
        parents.insert(name.clone(), model_parents);
    }

    let order = topological_order(&parents);
    if order.len() < models.len() {
        report_cycles(&models, &parents, &mut errors);
    }
    warnings.sort();
    if !errors.is_empty() {
        // The project does not load: its unsupported models are listed with the other errors.
        for error in unsupported.into_iter().flat_map(|model| model.errors) {
            errors.push_error(error);
        }
        return errors.finish(unreachable_project());
    }
    errors.finish(Project { config, models, order, parents, external_models, warnings, unsupported })
}

/// Moves every model that reads an unsupported one (through `depends_on` too), transitively,
/// to the unsupported models: its parent would never be built.
fn leave_out_readers_of_unsupported(models: &mut BTreeMap<ModelName, Model>, unsupported: &mut Vec<UnsupportedModel>) {
    loop {
        let left_out: BTreeMap<String, String> = unsupported
            .iter()
            .filter_map(|model| {
                let name = model.name.clone()?;
                let file = model.errors.first().map(|error| error.location.file.clone()).unwrap_or_default();
                Some((name, file))
            })
            .collect();
        let readers: Vec<(ModelName, String, String)> = models
            .iter()
            .filter_map(|(name, model)| {
                let references = model.query.iter().flat_map(|query| &query.references).chain(&model.depends_on);
                let parent = references
                    .filter(|reference| **reference != name.to_string())
                    .find_map(|reference| left_out.get(reference).map(|file| (reference.clone(), file.clone())))?;
                Some((name.clone(), parent.0, parent.1))
            })
            .collect();
        if readers.is_empty() {
            return;
        }
        for (name, parent, parent_file) in readers {
            let Some(model) = models.remove(&name) else { continue };
            let error = ProjectError::unsupported(
                SourceLocation::file(&model.file),
                format!("{name} reads {parent}, which sluice cannot run ({parent_file})"),
            );
            unsupported.push(UnsupportedModel { name: Some(name.to_string()), errors: vec![error] });
        }
    }
}

/// Names every dependency cycle, walking each from its smallest model name.
fn report_cycles(
    models: &BTreeMap<ModelName, Model>,
    parents: &BTreeMap<ModelName, Vec<ModelName>>,
    errors: &mut ErrorSink,
) {
    let mut graph: DiGraph<&ModelName, ()> = DiGraph::new();
    let mut nodes: BTreeMap<&ModelName, NodeIndex> = BTreeMap::new();
    for name in models.keys() {
        nodes.insert(name, graph.add_node(name));
    }
    for (child, child_parents) in parents {
        for parent in child_parents {
            graph.add_edge(nodes[parent], nodes[child], ());
        }
    }
    for component in tarjan_scc(&graph) {
        if component.len() < 2 {
            continue;
        }
        let members: BTreeSet<&ModelName> = component.iter().map(|node| graph[*node]).collect();
        let Some(first) = members.first().copied() else { continue };
        // Follow parent edges inside the component until the walk returns to the first model.
        let mut path = vec![first];
        let mut current = first;
        while path.len() <= members.len() {
            let next = parents
                .get(current)
                .into_iter()
                .flatten()
                .filter(|parent| members.contains(parent))
                .find(|parent| *parent == first || !path.contains(parent));
            let Some(next) = next else { break };
            path.push(next);
            if next == first {
                break;
            }
            current = next;
        }
        let names: Vec<String> = path.iter().map(ToString::to_string).collect();
        errors.push(
            SourceLocation::file(&models[first].file),
            format!("dependency cycle: {} (each model reads the next)", names.join(" -> ")),
        );
    }
}

/// Only returned inside an `Err` (the sink has errors whenever the config failed to read).
fn unreachable_project() -> Project {
    Project {
        config: Config::default(),
        models: BTreeMap::new(),
        order: Vec::new(),
        parents: BTreeMap::new(),
        external_models: BTreeSet::new(),
        warnings: Vec::new(),
        unsupported: Vec::new(),
    }
}
