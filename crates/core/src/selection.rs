//! `plan --select-model`: a plan that takes only the selected models' local changes. As SQLMesh
//! does it: the selectors pick models among the local ones and the environment's; a selected
//! model is planned from its file (a selected model that is gone from the project is removed);
//! an unselected one keeps the definition the environment shows (read back from its stored
//! snapshot), so it changes only through a selected parent; a new model that is not selected
//! stays out of the plan. Only the selected models and their ancestors are backfilled, and a
//! development environment shows only the selected models and what it already showed.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::Model;
use crate::names::ModelName;
use crate::plan::EnvironmentState;
use crate::project::{Project, topological_order};
use crate::selector::{Selectable, select};
use crate::snapshot::{Snapshot, own_hashes};

/// The project a selective plan is made from, and what was selected.
#[derive(Clone, Debug)]
pub struct Selection {
    /// The local project with every unselected model as the environment shows it.
    pub project: Project,
    /// The models the selectors picked (local or the environment's).
    pub selected: BTreeSet<ModelName>,
}

/// Applies `selectors` to `project` planned against `base` (the environment as a plan sees it:
/// a development environment over prod). Fails on a selector that matches nothing, and where
/// the selection cannot be planned (a planned model reading one the selection leaves out).
pub fn select_models(
    project: &Project,
    base: Option<&EnvironmentState>,
    selectors: &[String],
) -> Result<Selection, String> {
    let stored: BTreeMap<&ModelName, &Snapshot> =
        base.into_iter().flat_map(|base| &base.snapshots).map(|snapshot| (&snapshot.name, snapshot)).collect();
    let by_id: BTreeMap<&str, &Snapshot> =
        stored.values().map(|snapshot| (snapshot.id.0.as_str(), *snapshot)).collect();
    let stored_parents = |snapshot: &Snapshot| -> Vec<&Snapshot> {
        snapshot.parents.iter().filter_map(|id| by_id.get(id.0.as_str()).copied()).collect()
    };

    // Select among the local models and the environment's, along the local graph (SQLMesh's).
    let mut graph = project.parents.clone();
    for (name, snapshot) in &stored {
        if !project.models.contains_key(*name) {
            graph.insert((*name).clone(), stored_parents(snapshot).iter().map(|parent| parent.name.clone()).collect());
        }
    }
    let local = project.models.values().map(|model| Selectable { name: &model.name, tags: &model.tags });
    let stored_only = stored
        .values()
        .filter(|snapshot| !project.models.contains_key(&snapshot.name))
        .map(|snapshot| Selectable { name: &snapshot.name, tags: &snapshot.tags });
    let candidates: Vec<Selectable> = local.chain(stored_only).collect();
    let selected = select(candidates.iter().copied(), &graph, selectors)?;

    let mut models: BTreeMap<ModelName, Model> = BTreeMap::new();
    let mut parents: BTreeMap<ModelName, Vec<ModelName>> = BTreeMap::new();
    let names: BTreeSet<&ModelName> = project.models.keys().chain(stored.keys().copied()).collect();
    for name in names {
        if project.is_unsupported(&name.to_string()) {
            continue; // `--skip-unsupported` carries it as the environment shows it
        }
        let model = project.models.get(name);
        match (selected.contains(name), model, stored.get(name)) {
            // Selected and local: from its file. Selected and gone: removed by the plan.
            (true, Some(model), _) => {
                models.insert(name.clone(), model.clone());
                parents.insert(name.clone(), project.parents.get(name).cloned().unwrap_or_default());
            }
            (true, None, _) => {}
            // Unselected and shown: the environment's definition, unless the file says the same.
            (false, model, Some(snapshot)) => {
                let unchanged = model.is_some_and(|model| {
                    own_hashes(model)
                        == (snapshot.fingerprint.data_hash.clone(), snapshot.fingerprint.metadata_hash.clone())
                });
                if let (true, Some(model)) = (unchanged, model) {
                    models.insert(name.clone(), model.clone());
                    parents.insert(name.clone(), project.parents.get(name).cloned().unwrap_or_default());
                } else {
                    let its_parents = stored_parents(snapshot);
                    models.insert(name.clone(), Model::from_snapshot(snapshot, &its_parents)?);
                    parents.insert(name.clone(), its_parents.iter().map(|parent| parent.name.clone()).collect());
                }
            }
            // Unselected and new: not in this plan.
            (false, _, None) => {}
        }
    }
    for (child, its_parents) in &parents {
        if let Some(parent) = its_parents.iter().find(|parent| !models.contains_key(*parent)) {
            let why = if project.models.contains_key(parent) && !selected.contains(parent) {
                "a new model the selection leaves out"
            } else {
                "a model this plan removes"
            };
            return Err(format!("--select-model: {child} reads {parent}, {why}; select both (or neither) of them"));
        }
    }
    let order = topological_order(&parents);
    if order.len() < parents.len() {
        return Err(
            "--select-model: the selected definitions and the environment's read each other in a cycle; select the models on it together"
                .to_string(),
        );
    }
    let mut selection_project = project.clone();
    selection_project.models = models;
    selection_project.parents = parents;
    selection_project.order = order;
    Ok(Selection { project: selection_project, selected })
}

/// The models a selective plan backfills: the selected ones and every ancestor (SQLMesh
/// backfills what the selected models read, so that they can be built).
pub fn backfilled_models(project: &Project, selected: &BTreeSet<ModelName>) -> BTreeSet<ModelName> {
    let mut found: BTreeSet<ModelName> = BTreeSet::new();
    let mut pending: Vec<&ModelName> = selected.iter().filter(|name| project.models.contains_key(*name)).collect();
    while let Some(name) = pending.pop() {
        if found.insert(name.clone()) {
            pending.extend(project.parents.get(name).into_iter().flatten());
        }
    }
    found
}

/// The models a selective prod plan would show without building them: a changed model left
/// out of the selection that reads a selected one gets a new table, which only its own plan
/// fills. SQLMesh fails such a plan while moving the views; sluice refuses it before anything
/// is written.
pub fn unbuilt_in_prod(plan: &crate::plan::Plan, project: &Project, selected: &BTreeSet<ModelName>) -> Vec<String> {
    if !plan.environment.is_prod() {
        return Vec::new();
    }
    let backfilled = backfilled_models(project, selected);
    plan.snapshots
        .iter()
        .filter(|planned| !backfilled.contains(&planned.snapshot.name) && !planned.batches.is_empty())
        .map(|planned| planned.snapshot.name.to_string())
        .collect()
}
