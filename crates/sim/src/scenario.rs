//! One seed's run: the project, the processes (coordinators, workers, promoters with their
//! reconcilers), the operator (apply, resume, a second plan) and the chaos (crashes, lost keys,
//! aborts, purges, janitor passes); then the invariants.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use sluice_coordinator::{ApplyConfig, CoordinatorDeps, OrphanReconciler, Progress, ProgressTotals};
use sluice_core::interval::{IntervalSet, Timestamp};
use sluice_core::names::{EnvironmentName, PlanId, RunId};
use sluice_core::plan::Plan;
use sluice_core::project::load_project;
use sluice_core::task_graph::{TaskGraph, finished_tasks, task_tables};
use sluice_promoter::notify::Notifier;
use sluice_promoter::{PromoterDeps, RunSummary};
use sluice_queue::{DependencyGate, EventBus, TaskQueue};
use sluice_state::host::Clock;
use sluice_state::{RunStatus, StateStore};
use sluice_worker::retry::RetryPolicy;
use sluice_worker::{WorkerConfig, WorkerDeps};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::project::{START, Shape};
use crate::queue::SimQueue;
use crate::services::{SimEvents, SimGate};
use crate::state::SimState;
use crate::warehouse::SimWarehouses;
use crate::world::{DAY, Shared, TableInfo, WHOLE, World, day_cells};

/// What one seed did.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub trace_hash: u64,
    pub steps: u64,
    pub violations: Vec<String>,
    /// The last events of the run, for reading a failing seed.
    pub log: Vec<String>,
    pub summary: String,
}

/// Runs one seed on a fresh single-threaded runtime with a paused clock.
pub fn run_seed(seed: u64) -> Outcome {
    quiet_simulated_crashes();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build() {
        Ok(runtime) => runtime,
        Err(error) => {
            return Outcome {
                seed,
                trace_hash: 0,
                steps: 0,
                violations: vec![format!("no runtime: {error}")],
                log: Vec::new(),
                summary: String::new(),
            };
        }
    };
    runtime.block_on(simulate(seed))
}

/// Virtual wall time: the plan's `now` plus the runtime's (paused, advanced) clock.
struct VirtualClock {
    base: Timestamp,
    started: tokio::time::Instant,
}

impl Clock for VirtualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.base.0 + self.started.elapsed().as_secs() as i64)
    }
}

struct Quiet;

impl Progress for Quiet {
    fn started(&self, _: &Plan, _: &RunId, _: ProgressTotals) {}
    fn task_done(&self, _: u32, _: bool, _: bool) {}
    fn task_failed(&self, _: &str, _: &str, _: &str) {}
    fn message(&self, _: &str) {}
    fn finished(&self) {}
}

/// Counts notifications per run.
struct CountingNotifier {
    world: Shared,
}

#[async_trait::async_trait]
impl Notifier for CountingNotifier {
    async fn notify(&self, summary: &RunSummary, _webhook: Option<&str>) {
        self.world.note(&format!("notified {} {}", summary.run_id, summary.outcome));
    }
}

/// The services every process shares, as each sees them (faults included).
#[derive(Clone)]
struct Services {
    world: Shared,
    state: Arc<dyn StateStore>,
    queue: Arc<SimQueue>,
    gate: Arc<SimGate>,
    events: Arc<SimEvents>,
    warehouses: Arc<SimWarehouses>,
    clock: Arc<dyn Clock>,
}

impl Services {
    fn coordinator(&self) -> CoordinatorDeps {
        CoordinatorDeps {
            state: Arc::clone(&self.state),
            queue: Arc::clone(&self.queue) as Arc<dyn TaskQueue>,
            gate: Arc::clone(&self.gate) as Arc<dyn DependencyGate>,
            events: Arc::clone(&self.events) as Arc<dyn EventBus>,
            gateways: Arc::clone(&self.warehouses) as _,
            clock: Arc::clone(&self.clock),
        }
    }

    fn promoter(&self) -> PromoterDeps {
        PromoterDeps {
            state: Arc::clone(&self.state),
            events: Arc::clone(&self.events) as Arc<dyn EventBus>,
            warehouses: Arc::clone(&self.warehouses) as _,
            notifier: Arc::new(CountingNotifier { world: self.world.clone() }),
            clock: Arc::clone(&self.clock),
        }
    }

    fn worker(&self) -> WorkerDeps {
        WorkerDeps {
            state: Arc::clone(&self.state),
            queue: Arc::clone(&self.queue) as Arc<dyn TaskQueue>,
            gate: Arc::clone(&self.gate) as Arc<dyn DependencyGate>,
            events: Arc::clone(&self.events) as Arc<dyn EventBus>,
            warehouses: Arc::clone(&self.warehouses) as _,
        }
    }
}

fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        initial_interval: Duration::from_millis(50),
        max_interval: Duration::from_secs(2),
        max_elapsed: Duration::from_secs(60),
        jitter: 0.0,
    }
}

/// Keeps the panics of simulated crashes out of the output (other panics are reported as usual).
fn quiet_simulated_crashes() {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<crate::world::SimulatedCrash>() {
                report(info);
            }
        }));
    });
}

/// Starts (or restarts) a process.
type Starter = Box<dyn Fn() -> JoinHandle<()> + Send>;

/// A long-running role: restarted when it stops (as a container is), killed on a crash.
struct Process {
    name: String,
    handle: Option<JoinHandle<()>>,
}

impl Process {
    fn kill(&mut self, world: &Shared) {
        if let Some(handle) = self.handle.take() {
            world.note(&format!("crash {}", self.name));
            handle.abort();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

fn spawn_worker(services: &Services, gateway: String, concurrency: usize) -> JoinHandle<()> {
    let services = services.clone();
    tokio::spawn(async move {
        loop {
            let config = WorkerConfig {
                retry: retry_policy(),
                heartbeat: Duration::from_secs(2),
                ..WorkerConfig::new(&gateway, concurrency)
            };
            let outcome = sluice_worker::run(config, services.worker(), CancellationToken::new()).await;
            services.world.note(&format!("worker of {gateway} stopped: {outcome:?}"));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

fn spawn_promoter(services: &Services) -> JoinHandle<()> {
    let services = services.clone();
    tokio::spawn(async move {
        let reconciling = services.clone();
        let reconciler = async move {
            let mut reconciler = OrphanReconciler::new(Duration::from_secs(20));
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let _ = reconciler.pass(&reconciling.coordinator()).await;
            }
        };
        let promoting = async {
            loop {
                let outcome = sluice_promoter::run(services.promoter(), CancellationToken::new()).await;
                services.world.note(&format!("promoter stopped: {outcome:?}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        tokio::select! {
            biased;
            () = reconciler => {}
            () = promoting => {}
        }
    })
}

fn spawn_coordinator(services: &Services, plan_id: PlanId, detach: bool) -> JoinHandle<()> {
    let services = services.clone();
    tokio::spawn(async move {
        let config = ApplyConfig {
            lease_ttl_seconds: 30,
            detach,
            interrupt_aborts: false,
            stall_after: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(10),
            ..ApplyConfig::default()
        };
        let outcome = sluice_coordinator::apply(
            &plan_id,
            &config,
            &services.coordinator(),
            Arc::new(Quiet),
            CancellationToken::new(),
        )
        .await;
        let said = match outcome {
            Ok(outcome) => format!("{outcome:?}").chars().take(40).collect::<String>(),
            Err(error) => format!("error {error}"),
        };
        services.world.note(&format!("apply {plan_id} returned: {said}"));
    })
}

/// Adds a plan's physical tables to what the world knows (how plain SQL fills them).
fn register(world: &Shared, plan: &Plan) {
    let graph = TaskGraph::build(plan);
    let mut world = world.lock();
    let table_of: BTreeMap<_, _> = plan
        .snapshots
        .iter()
        .filter_map(|p| p.snapshot.physical_table().map(|t| (p.snapshot.id.clone(), t.to_string())))
        .collect();
    for (index, planned) in plan.snapshots.iter().enumerate() {
        let snapshot = &planned.snapshot;
        let Some(table) = snapshot.physical_table() else { continue };
        let name = table.to_string();
        let mut intervals = IntervalSet::new();
        for task in graph.snapshot_tasks(index) {
            intervals.insert(graph.tasks[task as usize].interval);
        }
        let query = {
            use std::hash::{DefaultHasher, Hash, Hasher};
            let mut hasher = DefaultHasher::new();
            snapshot.rendered_query.hash(&mut hasher);
            hasher.finish()
        };
        let info = world.registry.entry(name).or_insert_with(|| TableInfo {
            gateway: snapshot.gateway.clone(),
            key: (snapshot.name.clone(), snapshot.version.clone()),
            full: matches!(snapshot.kind, sluice_core::model::ModelKind::Full),
            parents: snapshot.parents.iter().filter_map(|id| table_of.get(id).cloned()).collect(),
            query,
            planned: BTreeMap::new(),
            poisoned: false,
            crashes: false,
        });
        if !intervals.is_empty() {
            info.planned.insert(plan.id.clone(), intervals);
        }
    }
}

async fn latest_status(truth: &dyn StateStore, plan_id: &PlanId) -> Option<RunStatus> {
    truth.latest_run(plan_id).await.ok().flatten().map(|run| run.status)
}

async fn simulate(seed: u64) -> Outcome {
    let world = Shared::new(World::new(seed));
    let truth: Arc<dyn StateStore> = Arc::new(world.lock().truth.clone());
    let shape = Shape::draw(&mut world.lock());
    let now = Timestamp(shape.end().0 + DAY);
    let services = Services {
        world: world.clone(),
        state: Arc::new(SimState::new(world.clone())),
        queue: Arc::new(SimQueue::new(world.clone())),
        gate: Arc::new(SimGate::new(world.clone())),
        events: Arc::new(SimEvents::new(world.clone())),
        warehouses: Arc::new(SimWarehouses::new(world.clone())),
        clock: Arc::new(VirtualClock { base: now, started: tokio::time::Instant::now() }),
    };
    let environment = EnvironmentName::prod();

    // The long-running processes.
    let mut processes: Vec<(Process, Starter)> = Vec::new();
    for gateway in 0..shape.gateways {
        let workers = 1 + world.lock().below(2);
        for number in 0..workers {
            let concurrency = 1 + world.lock().below(3) as usize;
            let services = services.clone();
            let name = format!("g{gateway}");
            let start: Starter = Box::new(move || spawn_worker(&services, name.clone(), concurrency));
            processes.push((Process { name: format!("worker g{gateway}.{number}"), handle: Some(start()) }, start));
        }
    }
    let promoters = 1 + world.lock().below(2);
    for number in 0..promoters {
        let services = services.clone();
        let start: Starter = Box::new(move || spawn_promoter(&services));
        processes.push((Process { name: format!("promoter {number}"), handle: Some(start()) }, start));
    }

    // The chaos, while the operator works.
    let chaos_stop = CancellationToken::new();
    let current_plan: Arc<std::sync::Mutex<Option<PlanId>>> = Arc::default();
    let chaos = {
        let services = services.clone();
        let stop = chaos_stop.clone();
        let current_plan = Arc::clone(&current_plan);
        let gateways = shape.gateways;
        async move {
            let mut aborts = 0;
            let mut restarts: Vec<(tokio::time::Instant, usize)> = Vec::new();
            loop {
                let wait = Duration::from_millis(200 + services.world.lock().below(4_000));
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
                // Restart what crashed a while ago.
                let now = tokio::time::Instant::now();
                for (at, index) in std::mem::take(&mut restarts) {
                    if at <= now {
                        let (process, start) = &mut processes[index];
                        services.world.note(&format!("restart {}", process.name));
                        process.handle = Some(start());
                    } else {
                        restarts.push((at, index));
                    }
                }
                let action = services.world.lock().below(100);
                match action {
                    0..=11 => {
                        let index = services.world.lock().below(processes.len() as u64) as usize;
                        if processes[index].0.handle.is_some() {
                            processes[index].0.kill(&services.world);
                            let back = Duration::from_millis(services.world.lock().below(8_000));
                            restarts.push((tokio::time::Instant::now() + back, index));
                        }
                    }
                    12..=13 => services.gate.lose(None).await,
                    14..=16 if aborts < 2 => {
                        let plan = current_plan.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                        if let Some(plan) = plan {
                            aborts += 1;
                            services.world.note(&format!("operator aborts {plan}"));
                            services.world.lock().operator_aborted.insert(plan.clone());
                            let _ =
                                sluice_coordinator::abort(services.state.as_ref(), &plan, "aborted by the simulation")
                                    .await;
                        }
                    }
                    17 => {
                        let gateway = services.world.lock().below(gateways as u64);
                        let purged = services.queue.purge(&format!("g{gateway}"));
                        services.world.lock().purged = true;
                        services.world.note(&format!("operator purges g{gateway}: {purged} tasks"));
                    }
                    18..=20 => {
                        services.world.note("janitor pass");
                        let now = services.clock.now();
                        let _ = sluice_promoter::janitor(&services.state, services.warehouses.as_ref(), now).await;
                    }
                    _ => {}
                }
            }
            // Everything crashed comes back, so that every run can end.
            for (_, index) in restarts {
                let (process, start) = &mut processes[index];
                process.handle = Some(start());
            }
            processes
        }
    };
    let chaos = tokio::spawn(chaos);

    // The operator: plan, apply, resume what failed or was aborted, maybe change a model.
    let mut shapes = vec![shape.clone()];
    if world.lock().chance(0.5) {
        let model = world.lock().below(shape.models.len() as u64) as usize;
        shapes.push(shape.changed(model));
    }
    let poison =
        if world.lock().chance(0.15) { Some(world.lock().below(shape.models.len() as u64) as usize) } else { None };
    // Whether the poisoned model fails its writes or crashes the slot running them.
    let crashes = world.lock().chance(0.5);
    let mut coordinators: Vec<JoinHandle<()>> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3 * 3600);
    let mut summary = Vec::new();
    for (step, shape) in shapes.iter().enumerate() {
        let project = match load_project(&shape.files()) {
            Ok(project) => project,
            Err(errors) => {
                world.lock().violation(format!("the generated project does not load: {errors:?}"));
                break;
            }
        };
        let plan = match sluice_coordinator::plan_against_state(
            truth.as_ref(),
            &project,
            &environment,
            now,
            &Default::default(),
        )
        .await
        {
            Ok(plan) => plan,
            Err(error) => {
                world.lock().violation(format!("planning failed: {error}"));
                break;
            }
        };
        if plan.has_nothing_to_do(truth.get_environment(&environment).await.ok().flatten().as_ref().map(|r| &r.state)) {
            break;
        }
        let _ = truth.put_plan(&plan).await;
        register(&world, &plan);
        if step == 0
            && let Some(model) = poison
        {
            let table = plan.snapshots.iter().find(|p| p.snapshot.name.table == format!("m{model}"));
            if let Some(table) = table.and_then(|p| p.snapshot.physical_table())
                && let Some(info) = world.lock().registry.get_mut(&table.to_string())
            {
                if crashes {
                    info.crashes = true;
                } else {
                    info.poisoned = true;
                }
            }
        }
        *current_plan.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(plan.id.clone());
        world.note(&format!("operator plans {} ({} tasks)", plan.id, plan.task_count()));
        let mut applies = 0;
        loop {
            applies += 1;
            let detach = world.lock().chance(0.3);
            world.note(&format!("operator applies {} (detach {detach})", plan.id));
            coordinators.push(spawn_coordinator(&services, plan.id.clone(), detach));
            if world.lock().chance(0.1) {
                world.note("a second operator applies the same plan");
                coordinators.push(spawn_coordinator(&services, plan.id.clone(), false));
            }
            if world.lock().chance(0.2) {
                let after = Duration::from_millis(world.lock().below(10_000));
                tokio::time::sleep(after).await;
                if let Some(last) = coordinators.last() {
                    world.note("crash the coordinator");
                    last.abort();
                }
            }
            // Wait until the plan's newest run has ended (or nothing runs it any more).
            let status = loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let running = truth.running_runs().await.unwrap_or_default();
                let mine = running.iter().any(|run| run.plan_id == plan.id);
                let status = latest_status(truth.as_ref(), &plan.id).await;
                if !mine && coordinators.iter().all(JoinHandle::is_finished) {
                    break status;
                }
                if tokio::time::Instant::now() > deadline {
                    break status;
                }
            };
            world.note(&format!("operator sees {} {status:?}", plan.id));
            if status == Some(RunStatus::Succeeded) || applies >= 5 || tokio::time::Instant::now() > deadline {
                summary.push(format!("{status:?}"));
                break;
            }
            // The fix for a poisoned model lands before the resume.
            for info in world.lock().registry.values_mut() {
                info.poisoned = false;
                info.crashes = false;
            }
        }
        if latest_status(truth.as_ref(), &plan.id).await != Some(RunStatus::Succeeded) {
            break;
        }
    }

    // No more chaos; everything comes back; every run must end.
    chaos_stop.cancel();
    let processes = chaos.await.ok();
    loop {
        let running = truth.running_runs().await.unwrap_or_default();
        if running.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline + Duration::from_secs(3600) {
            let ids: Vec<String> = running.iter().map(|run| run.id.to_string()).collect();
            world.lock().violation(format!("runs left running: {}", ids.join(", ")));
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Let the last finalizations (and stalled promotions) settle, then stop every process.
    tokio::time::sleep(Duration::from_secs(150)).await;
    drop(processes);
    for coordinator in coordinators {
        coordinator.abort();
    }
    check_end(&world, truth.as_ref(), &environment).await;
    let world = world.lock();
    Outcome {
        seed,
        trace_hash: world.trace_hash(),
        steps: world.steps,
        violations: world.violations.clone(),
        log: world.log.iter().cloned().collect(),
        summary: summary.join(","),
    }
}

/// The invariants once everything is quiet.
async fn check_end(world: &Shared, truth: &dyn StateStore, environment: &EnvironmentName) {
    let mut problems = Vec::new();
    let plans: BTreeSet<PlanId> =
        world.lock().registry.values().flat_map(|info| info.planned.keys().cloned()).collect();
    let audit = truth.list_audit(100_000).await.unwrap_or_default();
    let mut succeeded_plans = BTreeSet::new();
    for plan_id in &plans {
        let runs = truth.runs_of_plan(plan_id).await.unwrap_or_default();
        let succeeded = runs.iter().filter(|run| run.status == RunStatus::Succeeded).count();
        if succeeded > 1 {
            problems.push(format!("plan {plan_id} has {succeeded} succeeded runs"));
        }
        if succeeded == 1 {
            succeeded_plans.insert(plan_id.clone());
        }
        for run in &runs {
            // The outcome matches what happened: an abort needs an operator's abort, a purge, or
            // a resume that superseded the run.
            if run.status == RunStatus::Aborted {
                let error = run.error.clone().unwrap_or_default();
                let (aborted_by_operator, purged) = {
                    let world = world.lock();
                    (world.operator_aborted.contains(plan_id), world.purged)
                };
                let superseded = error.contains("taken over") || error.contains("superseded");
                if !aborted_by_operator && !purged && !superseded {
                    problems.push(format!("run {} was aborted though nobody aborted or purged it: {error}", run.id));
                }
            }
            let rows = audit.iter().filter(|entry| entry.run_id == run.id).count();
            if run.status != RunStatus::Running && rows != 1 {
                problems.push(format!("run {} ({}) has {rows} audit rows", run.id, run.status));
            }
        }
        // A task counts as finished only while its table holds its interval.
        if let Ok(Some(plan)) = truth.get_plan(plan_id).await {
            let graph = TaskGraph::build(&plan);
            let recorded = truth.get_intervals(&task_tables(&plan)).await.unwrap_or_default();
            for (index, finished) in finished_tasks(&plan, &graph, &recorded).into_iter().enumerate() {
                let snapshot = &plan.snapshots[graph.tasks[index].snapshot as usize].snapshot;
                let Some(table) = snapshot.physical_table() else { continue };
                if finished && !world.lock().tables.contains_key(&table.to_string()) {
                    problems.push(format!("plan {plan_id} counts a task of {table} finished, but the table is gone"));
                    break;
                }
            }
        }
    }
    let record = truth.get_environment(environment).await.ok().flatten();
    if let Some(record) = &record {
        if let Some(plan_id) = &record.state.plan_id
            && !succeeded_plans.contains(plan_id)
        {
            problems.push(format!("environment shows plan {plan_id}, which has no succeeded run"));
        }
        let world_views = world.lock().views.clone();
        for snapshot in &record.state.snapshots {
            let Some(table) = snapshot.physical_table() else { continue };
            let key =
                (snapshot.gateway.clone(), environment.view_schema(&snapshot.name.schema), snapshot.name.table.clone());
            if world_views.get(&key) != Some(&table.to_string()) {
                problems.push(format!(
                    "view {}.{} on {} shows {:?}, the environment says {table}",
                    key.1,
                    key.2,
                    key.0,
                    world_views.get(&key)
                ));
            }
        }
    }
    for plan_id in &succeeded_plans {
        let shown = record.as_ref().and_then(|r| r.state.plan_id.clone());
        let later = shown.is_some_and(|shown| &shown != plan_id);
        if !later && record.as_ref().and_then(|r| r.state.plan_id.as_ref()) != Some(plan_id) {
            problems.push(format!("plan {plan_id} succeeded but the environment does not show it"));
        }
    }
    // Every recorded interval holds what plain SQL gives.
    let registry = world.lock().registry.clone();
    for (table, info) in &registry {
        let recorded = truth.get_intervals(std::slice::from_ref(&info.key)).await.unwrap_or_default();
        let Some(set) = recorded.get(&info.key) else { continue };
        if set.is_empty() {
            continue;
        }
        let world = world.lock();
        let Some(cells) = world.tables.get(table) else {
            problems.push(format!("{table} has recorded intervals but no table"));
            continue;
        };
        let spans: Vec<(i64, sluice_core::interval::Interval)> = if info.full {
            set.ranges().iter().map(|range| (WHOLE, *range)).take(1).collect()
        } else {
            set.ranges().iter().flat_map(|range| day_cells(*range)).collect()
        };
        for (cell, span) in spans {
            let expected = world.expected_cell(table, cell, span);
            match cells.cells.get(&cell) {
                Some(actual) if *actual == expected => {}
                Some(_) => problems.push(format!("{table} cell {cell} holds rows plain SQL would not give")),
                None => problems.push(format!("{table} cell {cell} is recorded but holds nothing")),
            }
        }
    }
    let _ = START;
    let mut world = world.lock();
    for problem in problems {
        world.violation(problem);
    }
}
