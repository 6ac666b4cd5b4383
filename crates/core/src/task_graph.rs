//! The task graph: one task per (snapshot, interval batch), edges from the parent tasks each
//! task waits for, and in-degree counters so that readiness is O(1) per completion.
//!
//! A time-range child's batch waits only for the parent batches whose intervals overlap it
//! (interval-level pipelining). A FULL, VIEW, SEED, unique-key or self-referencing child waits
//! for all of its parents' tasks; the batches of unique-key and self-referencing models run in
//! order. Tasks are numbered parents first, so the numbering is itself a topological order.

use std::collections::BTreeMap;

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::interval::{Interval, IntervalSet};
use crate::model::ModelKind;
use crate::names::{ModelName, TaskId, Version};
use crate::plan::Plan;

/// One unit of backfill work.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub id: TaskId,
    /// Index into `Plan::snapshots`.
    pub snapshot: u32,
    pub interval: Interval,
    pub interval_count: u32,
}

/// Tasks and their dependencies.
#[derive(Debug)]
pub struct TaskGraph {
    pub tasks: Vec<Task>,
    graph: DiGraph<(), (), u32>,
    /// Per snapshot, the range of its tasks' indices.
    snapshot_tasks: Vec<std::ops::Range<u32>>,
}

/// How a child's batches relate to one parent's.
fn waits_for_all_parent_tasks(child: &ModelKind, child_self_referencing: bool, parent: &ModelKind) -> bool {
    !(child.is_time_range() && parent.is_time_range() && !child_self_referencing)
}

impl TaskGraph {
    /// Builds the graph of a plan's batches.
    pub fn build(plan: &Plan) -> TaskGraph {
        let task_count = plan.task_count();
        let mut tasks = Vec::with_capacity(task_count);
        let mut graph: DiGraph<(), (), u32> = DiGraph::with_capacity(task_count, task_count * 2);
        let mut snapshot_tasks = Vec::with_capacity(plan.snapshots.len());
        for (snapshot_index, planned) in plan.snapshots.iter().enumerate() {
            let first = tasks.len() as u32;
            for batch in &planned.batches {
                tasks.push(Task {
                    id: TaskId::compute(&planned.snapshot.id, batch.interval.start.0, batch.interval.end.0),
                    snapshot: snapshot_index as u32,
                    interval: batch.interval,
                    interval_count: batch.interval_count,
                });
                graph.add_node(());
            }
            snapshot_tasks.push(first..tasks.len() as u32);
        }
        for (snapshot_index, planned) in plan.snapshots.iter().enumerate() {
            let own = snapshot_tasks[snapshot_index].clone();
            if own.is_empty() {
                continue;
            }
            let kind = &planned.snapshot.kind;
            // Batches that add by key, replace partitions or append run in order.
            let sequential = planned.snapshot.self_referencing || (kind.is_incremental() && !kind.is_time_range());
            if sequential {
                for task in own.start + 1..own.end {
                    graph.add_edge(NodeIndex::new(task as usize - 1), NodeIndex::new(task as usize), ());
                }
            }
            for &parent_index in &planned.materialized_parents {
                let parent = &plan.snapshots[parent_index as usize];
                let parent_range = snapshot_tasks[parent_index as usize].clone();
                if parent_range.is_empty() {
                    continue;
                }
                if waits_for_all_parent_tasks(kind, planned.snapshot.self_referencing, &parent.snapshot.kind) {
                    // With sequential batches the first one carries the wait for the rest.
                    let waiting: std::ops::Range<u32> = if sequential { own.start..own.start + 1 } else { own.clone() };
                    for child in waiting {
                        for parent_task in parent_range.clone() {
                            graph.add_edge(NodeIndex::new(parent_task as usize), NodeIndex::new(child as usize), ());
                        }
                    }
                    continue;
                }
                // Overlap: parent batches are sorted and disjoint, so binary search the first one
                // ending after the child's start and walk while they start before its end.
                let parent_tasks = &tasks[parent_range.start as usize..parent_range.end as usize];
                for child in own.clone() {
                    let child_interval = tasks[child as usize].interval;
                    let first = parent_tasks.partition_point(|task| task.interval.end <= child_interval.start);
                    for (offset, parent_task) in parent_tasks[first..].iter().enumerate() {
                        if parent_task.interval.start >= child_interval.end {
                            break;
                        }
                        let parent_node = parent_range.start as usize + first + offset;
                        graph.add_edge(NodeIndex::new(parent_node), NodeIndex::new(child as usize), ());
                    }
                }
            }
        }
        TaskGraph { tasks, graph, snapshot_tasks }
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    pub fn edge_count(&self) -> usize {
        self.graph.edge_count()
    }

    /// The tasks of one snapshot (by its index in the plan).
    pub fn snapshot_tasks(&self, snapshot_index: usize) -> std::ops::Range<u32> {
        self.snapshot_tasks[snapshot_index].clone()
    }

    /// Tasks that wait for `task`.
    pub fn children(&self, task: u32) -> impl Iterator<Item = u32> + '_ {
        self.graph
            .neighbors_directed(NodeIndex::new(task as usize), Direction::Outgoing)
            .map(|node| node.index() as u32)
    }

    /// Tasks `task` waits for.
    pub fn parents(&self, task: u32) -> impl Iterator<Item = u32> + '_ {
        self.graph
            .neighbors_directed(NodeIndex::new(task as usize), Direction::Incoming)
            .map(|node| node.index() as u32)
    }

    /// `roots` and every task that transitively waits for one of them, each once, roots first.
    pub fn with_descendants(&self, roots: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut seen = vec![false; self.len()];
        let mut found = Vec::new();
        let mut pending: std::collections::VecDeque<u32> = roots.into_iter().collect();
        while let Some(task) = pending.pop_front() {
            if std::mem::replace(&mut seen[task as usize], true) {
                continue;
            }
            found.push(task);
            pending.extend(self.children(task));
        }
        found
    }

    /// Each task's number of parents: the counters a dependency gate starts from.
    pub fn parent_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.tasks.len()];
        for edge in self.graph.raw_edges() {
            counts[edge.target().index()] += 1;
        }
        counts
    }

    /// The longest chain of tasks, counted in tasks (0 for an empty graph).
    pub fn critical_path_length(&self) -> u32 {
        // Task numbering is topological: every edge goes from a lower to a higher index.
        let mut longest = vec![1u32; self.tasks.len()];
        let mut best = 0;
        for task in 0..self.tasks.len() {
            let length = longest[task];
            best = best.max(length);
            for child in self.children(task as u32) {
                let slot = &mut longest[child as usize];
                *slot = (*slot).max(length + 1);
            }
        }
        best
    }

    /// Whether the graph has a topological order (it always should: tasks only wait for earlier tasks).
    pub fn is_acyclic(&self) -> bool {
        petgraph::algo::toposort(&self.graph, None).is_ok()
    }
}

/// The physical tables (model, version) a plan's tasks write.
pub fn task_tables(plan: &Plan) -> Vec<(ModelName, Version)> {
    plan.snapshots
        .iter()
        .filter(|planned| !planned.batches.is_empty())
        .map(|planned| (planned.snapshot.name.clone(), planned.snapshot.version.clone()))
        .collect()
}

/// Which tasks are finished: their interval is recorded for their physical table (by any plan
/// sharing it). Every task records its interval when it finishes, and the janitor removes a
/// dropped table's intervals with it; a done-task record is progress bookkeeping only, so that a
/// record can never outlive the table it describes.
pub fn finished_tasks(
    plan: &Plan,
    graph: &TaskGraph,
    recorded: &BTreeMap<(ModelName, Version), IntervalSet>,
) -> Vec<bool> {
    graph
        .tasks
        .iter()
        .map(|task| {
            let snapshot = &plan.snapshots[task.snapshot as usize].snapshot;
            let key = (snapshot.name.clone(), snapshot.version.clone());
            recorded.get(&key).is_some_and(|set| set.covers(task.interval))
        })
        .collect()
}

/// In-degree counters: completing a task returns the children it made ready, in O(children).
#[derive(Debug, Clone)]
pub struct Readiness {
    remaining: Vec<u32>,
    done: Vec<bool>,
    outstanding: usize,
}

impl Readiness {
    pub fn new(graph: &TaskGraph) -> Readiness {
        Readiness { remaining: graph.parent_counts(), done: vec![false; graph.len()], outstanding: graph.len() }
    }

    /// Tasks with no unfinished parent and not done.
    pub fn ready(&self) -> Vec<u32> {
        (0..self.remaining.len() as u32)
            .filter(|task| self.remaining[*task as usize] == 0 && !self.done[*task as usize])
            .collect()
    }

    /// Marks `task` done (idempotently) and returns the children that became ready.
    pub fn complete(&mut self, graph: &TaskGraph, task: u32) -> Vec<u32> {
        if std::mem::replace(&mut self.done[task as usize], true) {
            return Vec::new();
        }
        self.outstanding -= 1;
        let mut ready = Vec::new();
        for child in graph.children(task) {
            let slot = &mut self.remaining[child as usize];
            *slot -= 1;
            if *slot == 0 {
                ready.push(child);
            }
        }
        ready
    }

    /// Tasks not yet done.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::interval::{IntervalSet, Timestamp};
    use crate::names::EnvironmentName;
    use crate::plan::{PlanContext, build_plan};
    use crate::project::{ProjectFiles, load_project};
    use crate::synthetic::SyntheticProject;

    fn plan_of(
        files: &ProjectFiles,
        recorded: &BTreeMap<(crate::names::ModelName, crate::names::Version), IntervalSet>,
        now: Timestamp,
    ) -> Plan {
        let project = load_project(files).unwrap();
        let known = BTreeMap::new();
        build_plan(
            &project,
            PlanContext {
                environment: &EnvironmentName::prod(),
                current: None,
                base: None,
                prod: None,
                known_snapshots: &known,
                recorded_intervals: recorded,
                now,
                forward_only: false,
                window: Default::default(),
                skip_backfill: false,
                selected: None,
            },
        )
    }

    #[test]
    fn descendants_are_every_task_reachable_from_the_roots_once() {
        let shape = SyntheticProject::duckdb(6, 3, 4, false);
        let start = Timestamp::parse("2024-01-01").unwrap();
        let plan = plan_of(&shape.files(), &BTreeMap::new(), Timestamp(start.0 + shape.span_seconds() + 86_400));
        let graph = TaskGraph::build(&plan);
        for roots in [vec![0u32], vec![0, 1], vec![(graph.len() - 1) as u32]] {
            let found = graph.with_descendants(roots.clone());
            // Reachable means: a root, or a child of something reachable (a fixpoint).
            let mut reachable: BTreeSet<u32> = roots.iter().copied().collect();
            loop {
                let more: BTreeSet<u32> = reachable.iter().flat_map(|task| graph.children(*task)).collect();
                let before = reachable.len();
                reachable.extend(more);
                if reachable.len() == before {
                    break;
                }
            }
            assert_eq!(found.iter().copied().collect::<BTreeSet<_>>(), reachable);
            assert_eq!(found.len(), reachable.len(), "each task once");
            assert_eq!(&found[..roots.len()], &roots[..], "roots first");
        }
    }

    /// Runs the graph to completion with in-degree counters, returning the completion order.
    fn drain(graph: &TaskGraph) -> Vec<u32> {
        let mut readiness = Readiness::new(graph);
        let mut queue = readiness.ready();
        let mut order = Vec::new();
        while let Some(task) = queue.pop() {
            order.push(task);
            queue.extend(readiness.complete(graph, task));
            // A duplicate completion is a no-op.
            assert!(readiness.complete(graph, task).is_empty());
        }
        assert_eq!(readiness.outstanding(), 0);
        order
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn synthetic_graphs_are_acyclic_pipelined_and_drain(
            models in 1usize..10,
            layers in 1usize..4,
            intervals in 1usize..30,
            hourly in any::<bool>(),
            batch_size in proptest::option::of(1u32..5),
            recorded_mask in proptest::collection::vec(any::<bool>(), 30),
        ) {
            let shape = SyntheticProject { batch_size, ..SyntheticProject::duckdb(models, layers, intervals, hourly) };
            let files = shape.files();
            let start = Timestamp::parse("2024-01-01").unwrap();
            let now = Timestamp(start.0 + shape.span_seconds() + 7200);
            let first = plan_of(&files, &BTreeMap::new(), now);
            // Record a random subset of every model's intervals, then plan again.
            let step = if hourly { 3600 } else { 86_400 };
            let mut recorded = BTreeMap::new();
            for planned in &first.snapshots {
                let mut set = IntervalSet::new();
                for (index, keep) in recorded_mask.iter().enumerate().take(intervals) {
                    if *keep {
                        let begin = start.0 + index as i64 * step;
                        set.insert(Interval::new(Timestamp(begin), Timestamp(begin + step)));
                    }
                }
                recorded.insert((planned.snapshot.name.clone(), planned.snapshot.version.clone()), set);
            }
            let plan = plan_of(&files, &recorded, now);
            let graph = TaskGraph::build(&plan);

            prop_assert!(graph.is_acyclic());
            prop_assert_eq!(graph.len(), plan.task_count());
            for task in 0..graph.len() as u32 {
                for parent in graph.parents(task) {
                    // Parents exist and come first: the numbering is a topological order.
                    prop_assert!(parent < task);
                }
            }
            // Batches cover exactly what is missing.
            for planned in &plan.snapshots {
                let key = (planned.snapshot.name.clone(), planned.snapshot.version.clone());
                let mut covered = recorded[&key].clone();
                for batch in &planned.batches {
                    for interval in covered.ranges() {
                        prop_assert!(interval.end <= batch.interval.start || interval.start >= batch.interval.end,
                            "batch {} overlaps recorded {}", batch.interval, interval);
                    }
                    covered.insert(batch.interval);
                }
                let all = Interval::new(start, Timestamp(start.0 + shape.span_seconds()));
                prop_assert!(covered.covers(all));
            }
            // A time-range child's batch waits for exactly the parent batches that overlap it.
            for (index, planned) in plan.snapshots.iter().enumerate() {
                for child in graph.snapshot_tasks(index) {
                    let child_interval = graph.tasks[child as usize].interval;
                    let actual: BTreeSet<u32> = graph.parents(child).collect();
                    let mut expected = BTreeSet::new();
                    for parent_index in &planned.materialized_parents {
                        for parent_task in graph.snapshot_tasks(*parent_index as usize) {
                            let parent_interval = graph.tasks[parent_task as usize].interval;
                            if parent_interval.start < child_interval.end && child_interval.start < parent_interval.end {
                                expected.insert(parent_task);
                            }
                        }
                    }
                    prop_assert_eq!(actual, expected);
                }
            }
            let order = drain(&graph);
            prop_assert_eq!(order.len(), graph.len());
            prop_assert_eq!(order.iter().collect::<BTreeSet<_>>().len(), graph.len());
            prop_assert!(graph.critical_path_length() as usize <= graph.len());
        }
    }

    const CONFIG: &str = "model_defaults:\n  start: 2024-01-01\n  cron: '@daily'\n";

    #[test]
    fn full_unique_key_and_self_referencing_children_wait_for_all_parent_tasks_and_run_in_order() {
        let files = ProjectFiles {
            config: Some(CONFIG.to_string()),
            models: BTreeMap::from([
                (
                    "models/a.sql".to_string(),
                    "MODEL (name s.a, kind INCREMENTAL_BY_TIME_RANGE (time_column ds, batch_size 1), end '2024-01-04');\nSELECT 1 AS ds".to_string(),
                ),
                ("models/f.sql".to_string(), "MODEL (name s.f, kind FULL, end '2024-01-04');\nSELECT * FROM s.a".to_string()),
                (
                    "models/u.sql".to_string(),
                    "MODEL (name s.u, kind INCREMENTAL_BY_UNIQUE_KEY (unique_key id, batch_size 1), end '2024-01-04');\nSELECT * FROM s.a".to_string(),
                ),
                (
                    "models/r.sql".to_string(),
                    "MODEL (name s.r, kind INCREMENTAL_BY_TIME_RANGE (time_column ds, batch_size 1), end '2024-01-04');\nSELECT * FROM s.a UNION ALL SELECT * FROM @this_model".to_string(),
                ),
            ]),
            ..ProjectFiles::default()
        };
        let plan = plan_of(&files, &BTreeMap::new(), Timestamp::parse("2024-02-01").unwrap());
        let graph = TaskGraph::build(&plan);
        let index = |table: &str| plan.snapshots.iter().position(|p| p.snapshot.name.table == table).unwrap();
        let parent_tasks: BTreeSet<u32> = graph.snapshot_tasks(index("a")).collect();
        assert_eq!(parent_tasks.len(), 4);
        let full = graph.snapshot_tasks(index("f"));
        assert_eq!(full.len(), 1);
        assert_eq!(graph.parents(full.start).collect::<BTreeSet<_>>(), parent_tasks);
        for sequential in ["u", "r"] {
            let tasks = graph.snapshot_tasks(index(sequential));
            assert_eq!(tasks.len(), 4, "{sequential}");
            assert_eq!(graph.parents(tasks.start).collect::<BTreeSet<_>>(), parent_tasks, "{sequential}");
            for task in tasks.start + 1..tasks.end {
                assert_eq!(graph.parents(task).collect::<Vec<_>>(), vec![task - 1], "{sequential}");
            }
        }
        assert_eq!(graph.critical_path_length(), 5);
        assert_eq!(drain(&graph).len(), graph.len());
    }
}
