//! The simulated world one seed drives: its random source, fault rates, the trace that proves a
//! replay is exact, the modelled warehouse contents and the violations found.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_core::interval::{Interval, IntervalSet};
use sluice_core::names::{ModelName, PlanId, RunId, Version};
use sluice_state::MemoryState;

/// How often each fault strikes, per opportunity.
#[derive(Clone, Debug)]
pub struct FaultRates {
    /// Longest latency of one call to a service, in milliseconds.
    pub max_latency_ms: u64,
    /// A state call fails before doing anything.
    pub state_fails: f64,
    /// A state write commits but reports a (transient) error.
    pub state_commit_lost: f64,
    /// A gate call fails before doing anything.
    pub gate_fails: f64,
    /// The gate loses one run's keys (before a call).
    pub gate_loses_run: f64,
    /// The gate loses every key (before a call).
    pub gate_loses_all: f64,
    /// A published task is queued twice.
    pub duplicate_delivery: f64,
    /// A published task is queued at a random place instead of the back.
    pub reorder_delivery: f64,
    /// A published task becomes visible only after a delay.
    pub delay_delivery: f64,
    /// A publish reports an error after queueing (its confirm was lost).
    pub publish_confirm_lost: f64,
    /// An ack is lost: the task is delivered again.
    pub ack_lost: f64,
    /// A `RunSettled` is published twice.
    pub duplicate_settled: f64,
    /// A warehouse call fails transiently.
    pub warehouse_fails: f64,
    /// A promotion stalls (up to two minutes) before it reads the gateway's marker: a late
    /// promoter, still holding a plan that another promoter finished long ago.
    pub promotion_stalls: f64,
    /// The janitor stalls (up to half a minute) between its reads and its claim.
    pub janitor_stalls: f64,
}

impl FaultRates {
    pub fn draw(rng: &mut ChaCha8Rng) -> FaultRates {
        let mut rate = |high: f64| if rng.gen_bool(0.5) { rng.gen_range(0.0..high) } else { 0.0 };
        FaultRates {
            max_latency_ms: 0,
            state_fails: rate(0.03),
            state_commit_lost: rate(0.03),
            gate_fails: rate(0.03),
            gate_loses_run: rate(0.02),
            gate_loses_all: rate(0.01),
            duplicate_delivery: rate(0.15),
            reorder_delivery: rate(0.3),
            delay_delivery: rate(0.1),
            publish_confirm_lost: rate(0.03),
            ack_lost: rate(0.08),
            duplicate_settled: rate(0.5),
            warehouse_fails: rate(0.05),
            promotion_stalls: rate(0.5),
            janitor_stalls: rate(0.6),
        }
        .with_latency(rng.gen_range(0..60))
    }

    fn with_latency(mut self, max_latency_ms: u64) -> FaultRates {
        self.max_latency_ms = max_latency_ms;
        self
    }
}

/// What the simulation knows of one physical table: how plain SQL would fill it.
#[derive(Clone, Debug)]
pub struct TableInfo {
    pub gateway: String,
    pub key: (ModelName, Version),
    /// A FULL model: one cell for the whole table.
    pub full: bool,
    /// The physical tables its query reads.
    pub parents: Vec<String>,
    /// Identifies the query (its rendered text).
    pub query: u64,
    /// Per plan that writes it: the intervals the plan's tasks cover.
    pub planned: BTreeMap<PlanId, IntervalSet>,
    /// Writes fail with an SQL error while this is set (a poison model).
    pub poisoned: bool,
    /// Writes crash the worker slot running them while this is set (a model whose query brings
    /// its worker down): the delivery comes back until the queue dead-letters it.
    pub crashes: bool,
}

/// One table's modelled contents: a value per day (`start` of the day), or one cell (`-1`) for a
/// FULL table.
#[derive(Clone, Debug, Default)]
pub struct TableCells {
    pub cells: BTreeMap<i64, u64>,
}

pub const WHOLE: i64 = -1;

/// The panic payload of a simulated crash of a worker slot (kept out of the test's output).
pub struct SimulatedCrash;
pub const DAY: i64 = 86_400;

pub struct World {
    rng: ChaCha8Rng,
    pub faults: FaultRates,
    trace: DefaultHasher,
    pub steps: u64,
    moments: u64,
    pub violations: Vec<String>,
    pub log: std::collections::VecDeque<String>,
    pub tables: BTreeMap<String, TableCells>,
    pub registry: BTreeMap<String, TableInfo>,
    /// `(gateway, environment)` → the plan the gateway's promotion marker shows.
    pub markers: BTreeMap<(String, String), String>,
    /// `(gateway, schema, view)` → the physical table it selects from.
    pub views: BTreeMap<(String, String, String), String>,
    /// The state store as it is, without faults: what the checks read.
    pub truth: MemoryState,
    /// Physical tables the janitor dropped.
    pub dropped: BTreeSet<String>,
    /// Plans the operator aborted, and whether a queue was ever purged by hand.
    pub operator_aborted: BTreeSet<PlanId>,
    pub purged: bool,
    /// When (logical clock) each run stopped being live (finished or superseded).
    pub ended_at: BTreeMap<RunId, u64>,
    /// When each plan's breaker was tripped (forgotten when a resume resets it).
    pub tripped_at: BTreeMap<PlanId, u64>,
    /// Per tokio task (a worker slot): when it last read intervals, a run and a breaker from
    /// state, the moments its decision to write was taken on.
    pub reads: BTreeMap<u64, Reads>,
    /// When each recorded interval (by table and start) was first recorded.
    pub recorded_at: BTreeMap<(ModelName, Version, i64), u64>,
}

impl World {
    pub fn new(seed: u64) -> World {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let faults = FaultRates::draw(&mut rng);
        World {
            rng,
            faults,
            trace: DefaultHasher::new(),
            steps: 0,
            moments: 0,
            violations: Vec::new(),
            log: std::collections::VecDeque::new(),
            tables: BTreeMap::new(),
            registry: BTreeMap::new(),
            views: BTreeMap::new(),
            markers: BTreeMap::new(),
            truth: MemoryState::new(),
            dropped: BTreeSet::new(),
            recorded_at: BTreeMap::new(),
            ended_at: BTreeMap::new(),
            operator_aborted: BTreeSet::new(),
            purged: false,
            tripped_at: BTreeMap::new(),
            reads: BTreeMap::new(),
        }
    }

    /// The next moment of the simulation's logical clock: it orders reads and writes of state
    /// that happen at the same (paused) instant.
    pub fn tick(&mut self) -> u64 {
        self.moments += 1;
        self.moments
    }

    pub fn chance(&mut self, probability: f64) -> bool {
        probability > 0.0 && self.rng.gen_bool(probability.min(1.0))
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 { 0 } else { self.rng.gen_range(0..bound) }
    }

    pub fn latency(&mut self) -> Duration {
        Duration::from_millis(self.below(self.faults.max_latency_ms + 1))
    }

    /// Adds an event to the trace (its hash proves two runs of a seed were the same).
    pub fn note(&mut self, event: &str) {
        event.hash(&mut self.trace);
        self.steps += 1;
        // A replayed seed (SLUICE_SIM_SEED) keeps its whole log; a sweep its last events.
        let cap = if std::env::var_os("SLUICE_SIM_SEED").is_some() { usize::MAX } else { 4000 };
        if self.log.len() >= cap {
            self.log.pop_front();
        }
        self.log.push_back(format!("{:>6} {event}", self.steps));
    }

    pub fn violation(&mut self, text: String) {
        self.note(&format!("VIOLATION {text}"));
        if self.violations.len() < 20 {
            self.violations.push(text);
        }
    }

    pub fn trace_hash(&self) -> u64 {
        self.trace.finish()
    }

    /// The value plain SQL gives for one cell of a table, from the values its parents should hold.
    pub fn expected_cell(&self, table: &str, cell: i64, span: Interval) -> u64 {
        let Some(info) = self.registry.get(table) else { return 0 };
        let mut hasher = DefaultHasher::new();
        (table, cell, info.query).hash(&mut hasher);
        for parent in &info.parents {
            for (parent_cell, parent_span) in self.parent_cells(parent, span) {
                (parent, parent_cell, self.expected_cell(parent, parent_cell, parent_span)).hash(&mut hasher);
            }
        }
        hasher.finish()
    }

    /// The value a write computes for one cell from what its parents hold now.
    pub fn actual_cell(&self, table: &str, cell: i64, span: Interval) -> u64 {
        let Some(info) = self.registry.get(table) else { return 0 };
        let mut hasher = DefaultHasher::new();
        (table, cell, info.query).hash(&mut hasher);
        for parent in &info.parents {
            for (parent_cell, _) in self.parent_cells(parent, span) {
                let value = self.tables.get(parent).and_then(|t| t.cells.get(&parent_cell)).copied();
                (parent, parent_cell, value.unwrap_or(u64::MAX)).hash(&mut hasher);
            }
        }
        hasher.finish()
    }

    /// The cells of `parent` a query over `span` reads, with the span each cell stands for.
    fn parent_cells(&self, parent: &str, span: Interval) -> Vec<(i64, Interval)> {
        match self.registry.get(parent) {
            Some(info) if info.full => {
                let whole = info.planned.values().flat_map(|set| set.ranges().to_vec()).next().unwrap_or(span);
                vec![(WHOLE, whole)]
            }
            Some(_) => day_cells(span),
            None => Vec::new(),
        }
    }
}

/// The day cells of an interval.
pub fn day_cells(span: Interval) -> Vec<(i64, Interval)> {
    let mut cells = Vec::new();
    let mut day = span.start.0 - span.start.0.rem_euclid(DAY);
    while day < span.end.0 {
        cells.push((
            day,
            Interval::new(sluice_core::interval::Timestamp(day), sluice_core::interval::Timestamp(day + DAY)),
        ));
        day += DAY;
    }
    cells
}

/// When one task last read what a write is decided on.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reads {
    pub intervals: Option<u64>,
    pub run: Option<u64>,
    pub breaker: Option<u64>,
}

/// The current tokio task, as a number (the simulation's stand-in for "this worker slot").
pub fn current_task() -> u64 {
    tokio::task::try_id().and_then(|id| id.to_string().parse().ok()).unwrap_or(0)
}

/// The world shared by every simulated component.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<World>>);

impl Shared {
    pub fn new(world: World) -> Shared {
        Shared(Arc::new(Mutex::new(world)))
    }

    pub fn lock(&self) -> MutexGuard<'_, World> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits a latency the seed draws (no wait at all when it draws zero).
    pub async fn pause(&self) {
        let delay = self.lock().latency();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    pub fn chance(&self, probability: f64) -> bool {
        self.lock().chance(probability)
    }

    pub fn note(&self, event: &str) {
        self.lock().note(event);
    }
}
