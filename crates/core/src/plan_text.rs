//! The printed plan: what a reviewer needs to approve it.

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::interval::{Interval, Timestamp};
use crate::model::ModelKind;
use crate::names::{ModelName, Version};
use crate::plan::{Change, EnvironmentState, Plan, ViewChange};
use crate::snapshot::ChangeCategory;
use crate::task_graph::TaskGraph;

fn time(timestamp: Timestamp) -> String {
    if timestamp.0.rem_euclid(86_400) == 0 { timestamp.date_string() } else { timestamp.to_string() }
}

fn range(interval: Interval) -> String {
    format!("[{}, {})", time(interval.start), time(interval.end))
}

fn plural(count: u64, word: &str) -> String {
    match (count, word.strip_suffix('y')) {
        (1, _) => format!("1 {word}"),
        (_, Some(stem)) => format!("{count} {stem}ies"),
        (_, None) => format!("{count} {word}s"),
    }
}

/// Prints `plan`; `graph` adds the task-graph summary (`--explain`).
pub fn format_plan(plan: &Plan, current: Option<&EnvironmentState>, graph: Option<&TaskGraph>) -> String {
    let mut out = String::new();
    let previous = plan.previous_plan_id.as_ref().map_or("none".to_string(), ToString::to_string);
    let _ = writeln!(out, "Plan {} for environment {} (replaces plan {previous})", plan.id, plan.environment);
    if plan.forward_only {
        let _ = writeln!(out, "All changes are forward-only.");
    }
    if !plan.window.is_unbounded() {
        let start = plan.window.start.map_or("each model's start".to_string(), |start| start.to_string());
        let end = plan.window.end.map_or("the plan's time".to_string(), |end| end.to_string());
        let _ = writeln!(out, "Backfill window: from {start} to {end} (exclusive).");
    }
    if plan.skip_backfill {
        let _ = writeln!(out, "Backfill skipped (--skip-backfill): new tables are shown empty.");
    }
    if !plan.restatements.is_empty() {
        let _ = writeln!(out, "Restating (recorded intervals forgotten when the plan first runs, then run again):");
        let planned: BTreeSet<(&ModelName, &Version)> =
            plan.snapshots.iter().map(|planned| (&planned.snapshot.name, &planned.snapshot.version)).collect();
        for restatement in &plan.restatements {
            let note = if planned.contains(&(&restatement.name, &restatement.version)) {
                String::new()
            } else {
                format!(
                    " (development version {}: forgotten only; its environment's next plan or run fills it)",
                    restatement.version
                )
            };
            let _ = writeln!(out, "  {}: {}{note}", restatement.name, range(restatement.interval));
        }
    }

    let _ = writeln!(out, "\nModels:");
    let mut unchanged = 0;
    for planned in &plan.snapshots {
        let name = &planned.snapshot.name;
        let line = match &planned.change {
            Change::Unchanged => {
                unchanged += 1;
                continue;
            }
            Change::Added => format!("  + {name}: added ({})", planned.snapshot.kind.name()),
            Change::Direct(category) => format!("  ~ {name}: directly modified, {}", category.label()),
            Change::Indirect { breaking, via } => {
                let via: Vec<String> = via.iter().map(ToString::to_string).collect();
                let label = if *breaking { "breaking" } else { "non-breaking" };
                format!("  ~ {name}: indirectly modified, {label} (via {})", via.join(", "))
            }
        };
        let _ = writeln!(out, "{line}");
    }
    for snapshot in &plan.removed {
        let _ = writeln!(out, "  - {}: removed", snapshot.name);
    }
    if unchanged > 0 {
        let _ = writeln!(out, "  = {} unchanged", plural(unchanged, "model"));
    }
    let uncategorized = plan.uncategorized();
    if !uncategorized.is_empty() {
        let names: Vec<String> = uncategorized.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "  ! uncategorized changes block apply: {} (plan again with --forward-only, or make the change comparable)",
            names.join(", ")
        );
    }

    let mut wrote_diff_header = false;
    for planned in &plan.snapshots {
        let (Change::Direct(category), Some(previous)) = (&planned.change, &planned.previous) else { continue };
        if *category == ChangeCategory::MetadataOnly {
            continue;
        }
        let old = previous.pretty_query.as_deref().unwrap_or("");
        let new = planned.snapshot.pretty_query.as_deref().unwrap_or("");
        if !wrote_diff_header {
            let _ = writeln!(out, "\nDiffs:");
            wrote_diff_header = true;
        }
        let _ = writeln!(out, "  {}:", planned.snapshot.name);
        let diff = similar::TextDiff::from_lines(old, new);
        let unified = diff.unified_diff().context_radius(3).header("current", "planned").to_string();
        let unified = if unified.is_empty() {
            "(the query is unchanged; other data properties changed)\n".to_string()
        } else {
            unified
        };
        for line in unified.lines() {
            let _ = writeln!(out, "    {line}");
        }
    }

    let task_count = plan.task_count() as u64;
    let interval_count = plan.interval_count();
    if task_count == 0 {
        let _ = writeln!(out, "\nBackfill: nothing to backfill");
    } else {
        let _ = writeln!(out, "\nBackfill: {} in {}", plural(interval_count, "interval"), plural(task_count, "task"));
        let width = plan.snapshots.iter().map(|p| p.snapshot.name.to_string().len()).max().unwrap_or(0);
        for planned in &plan.snapshots {
            if planned.batches.is_empty() {
                continue;
            }
            let ranges: Vec<String> = planned.missing_ranges.iter().map(|r| range(*r)).collect();
            let shown = if ranges.len() > 3 {
                format!("{} ... {} ({} ranges)", ranges[0], ranges[ranges.len() - 1], ranges.len())
            } else {
                ranges.join(", ")
            };
            let work = match planned.snapshot.kind {
                ModelKind::View | ModelKind::Seed { .. } => "created once".to_string(),
                ModelKind::Full => format!("{}, rebuilt in full", plural(planned.missing_interval_count, "interval")),
                _ => format!(
                    "{} in {} ({shown})",
                    plural(planned.missing_interval_count, "interval"),
                    plural(planned.batches.len() as u64, "task")
                ),
            };
            let _ = writeln!(
                out,
                "  {:width$}  {:<25}  {work}",
                planned.snapshot.name.to_string(),
                planned.snapshot.kind.name(),
            );
        }
    }

    let view_changes = plan.view_changes(current);
    if view_changes.is_empty() {
        let _ = writeln!(out, "\nViews: no change");
    } else {
        let _ = writeln!(out, "\nViews:");
        for change in &view_changes {
            match change {
                ViewChange::Point { name, table } => {
                    let schema = plan.environment.view_schema(&name.schema);
                    let _ = writeln!(out, "  {schema}.{} -> {table}", name.table);
                }
                ViewChange::Drop { name } => {
                    let schema = plan.environment.view_schema(&name.schema);
                    let _ = writeln!(out, "  drop {schema}.{}", name.table);
                }
            }
        }
    }

    if let Some(graph) = graph {
        let _ = writeln!(
            out,
            "\nTask graph: {}, {}, critical path {}",
            plural(graph.len() as u64, "task"),
            plural(graph.edge_count() as u64, "dependency"),
            plural(graph.critical_path_length() as u64, "task")
        );
        for (index, planned) in plan.snapshots.iter().enumerate() {
            let tasks = graph.snapshot_tasks(index);
            if tasks.is_empty() {
                continue;
            }
            let waits: Vec<String> = planned
                .materialized_parents
                .iter()
                .map(|parent| plan.snapshots[*parent as usize].snapshot.name.to_string())
                .collect();
            let waits = if waits.is_empty() { String::new() } else { format!(", after {}", waits.join(", ")) };
            let _ = writeln!(out, "  {}: {}{waits}", planned.snapshot.name, plural(tasks.len() as u64, "task"));
        }
    }
    out
}
