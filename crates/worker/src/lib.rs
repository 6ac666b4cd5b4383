//! The worker role: consume one gateway's queue, execute each task's interval batch in the
//! warehouse, record it in state, then release the tasks that waited for it.
//!
//! Per delivery, in its slot: breaker tripped → drop it (the run is being aborted); a
//! redelivery (or a task queued again by a reconcile) whose interval is recorded already → skip
//! the warehouse; else execute with retries for transient failures. Then the task is *settled*
//! while the slot takes its next delivery: the interval, the task done and the run's progress
//! are recorded in one state transaction shared with the other tasks finishing at that moment
//! (group commit); the task is completed in the dependency gate; the children now ready (and
//! the settled run when nothing is outstanding) are published; only then is it acked. A crash
//! between any two steps is repaired by redelivery: every step is idempotent.

pub mod retry;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use metrics::{counter, histogram};
use sluice_core::interval::{Interval, Timestamp};
use sluice_core::model::ModelKind;
use sluice_core::names::PlanId;
use sluice_core::plan::Plan;
use sluice_core::query::QueryTemplate;
use sluice_core::task_graph::TaskGraph;
use sluice_engine::{AuditCheck, EngineError, TimeColumn, Warehouse, WarehouseFactory, audit_count_query};
use sluice_ops::metrics as metric;
use sluice_queue::{Delivery, DependencyGate, EventBus, QueueError, RunEvent, RunId, TaskMessage, TaskQueue};
use sluice_state::host::offload;
use sluice_state::{FinishedTask, IntervalKey, IntervalRecord, RunStatus, StateError, StateStore, TaskFailure};
use tokio::sync::{OnceCell, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use crate::retry::{RetryPolicy, RetrySchedule};

/// The tracing target of the task timeline: one event as a task's work begins, one as it ends.
pub const TIMELINE: &str = "sluice::timeline";

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub gateway: String,
    /// Tasks run at once by this worker (one warehouse connection each).
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// While a task runs, how often the worker reports it alive (`TaskRunning`) and checks the
    /// run's breaker, cancelling the query in flight once it is tripped.
    pub heartbeat: std::time::Duration,
    /// After `shutdown`, how long the tasks in hand may run on; past it their statements are
    /// cancelled and their deliveries returned to the queue unacked (`None`: no limit).
    pub stop_deadline: Option<std::time::Duration>,
}

impl WorkerConfig {
    pub fn new(gateway: &str, concurrency: usize) -> WorkerConfig {
        WorkerConfig {
            gateway: gateway.to_string(),
            concurrency,
            retry: RetryPolicy::default(),
            heartbeat: std::time::Duration::from_secs(2),
            stop_deadline: None,
        }
    }
}

#[derive(Clone)]
pub struct WorkerDeps {
    pub state: Arc<dyn StateStore>,
    pub queue: Arc<dyn TaskQueue>,
    pub gate: Arc<dyn DependencyGate>,
    pub events: Arc<dyn EventBus>,
    pub warehouses: Arc<dyn WarehouseFactory>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("state store: {0}")]
    State(#[from] StateError),
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("plan {0} is not in the state store")]
    UnknownPlan(PlanId),
    #[error("run {0} is not in the state store")]
    UnknownRun(RunId),
    #[error("task {index} of run {run} does not match the plan's task graph")]
    UnknownTask { run: RunId, index: u32 },
    #[error("state store: {0}")]
    Finish(Arc<StateError>),
    #[error("worker slot failed: {0}")]
    Join(String),
}

impl WorkerError {
    fn is_transient(&self) -> bool {
        match self {
            WorkerError::State(error) => error.is_transient(),
            WorkerError::Finish(error) => error.is_transient(),
            WorkerError::Queue(error) => error.is_transient(),
            _ => false,
        }
    }
}

/// The most finished tasks one state transaction records.
const MAX_FINISH_BATCH: usize = 256;

type FinishReply = oneshot::Sender<Result<(), Arc<StateError>>>;

/// Group commit of finished tasks. Slots hand a finished task over and wait; one writer records
/// everything handed over since its last write in one state transaction (`finish_tasks`), so
/// that N slots pay about one commit between them rather than N. A batch that fails is written
/// again task by task, so that one task's failure (a run that vanished) is not another's.
struct Finisher {
    sender: mpsc::UnboundedSender<(FinishedTask, FinishReply)>,
    /// The writer dies with the worker (a crashed worker writes nothing more).
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for Finisher {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

impl Finisher {
    fn start(state: Arc<dyn StateStore>) -> Finisher {
        let (sender, mut receiver) = mpsc::unbounded_channel::<(FinishedTask, FinishReply)>();
        let writer = tokio::spawn(async move {
            while let Some(first) = receiver.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_FINISH_BATCH {
                    match receiver.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let (tasks, replies): (Vec<FinishedTask>, Vec<FinishReply>) = batch.into_iter().unzip();
                match state.finish_tasks(&tasks).await {
                    Ok(()) => {
                        for reply in replies {
                            let _ = reply.send(Ok(()));
                        }
                    }
                    Err(error) if tasks.len() == 1 => {
                        if let Some(reply) = replies.into_iter().next() {
                            let _ = reply.send(Err(Arc::new(error)));
                        }
                    }
                    Err(_) => {
                        for (task, reply) in tasks.iter().zip(replies) {
                            let outcome = state.finish_tasks(std::slice::from_ref(task)).await.map_err(Arc::new);
                            let _ = reply.send(outcome);
                        }
                    }
                }
            }
        });
        Finisher { sender, writer }
    }

    async fn finish(&self, task: FinishedTask) -> Result<(), WorkerError> {
        let stopped = || WorkerError::Join("the state writer stopped".to_string());
        let (reply, answer) = oneshot::channel();
        self.sender.send((task, reply)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?.map_err(WorkerError::Finish)
    }
}

/// What a worker needs of one run, built once per run and shared by its slots.
struct RunContext {
    plan: Plan,
    graph: TaskGraph,
    /// Per snapshot: the executable query and statements, pre-split at their time literals.
    queries: Vec<Option<QueryTemplate>>,
    pre_statements: Vec<Vec<QueryTemplate>>,
    post_statements: Vec<Vec<QueryTemplate>>,
    /// Per snapshot: its audits (blocking or not) and their queries, pre-split.
    audits: Vec<Vec<(bool, String, QueryTemplate)>>,
    /// Per snapshot: the start of the batch that replaces its table (`Plan::replacing_batch_starts`).
    replacing_batch_starts: Vec<Option<Timestamp>>,
    /// Tasks this worker already settled without success (aborted or below a failure), so that
    /// draining a large aborted run does not walk the same descendants again and again.
    settled: Mutex<BTreeSet<u32>>,
}

impl RunContext {
    fn build(plan: Plan) -> RunContext {
        let graph = TaskGraph::build(&plan);
        let queries = plan
            .snapshots
            .iter()
            .map(|planned| planned.snapshot.rendered_query.as_deref().map(QueryTemplate::from_sql))
            .collect();
        let templates = |statements: &Vec<String>| statements.iter().map(|s| QueryTemplate::from_sql(s)).collect();
        let pre_statements = plan.snapshots.iter().map(|p| templates(&p.snapshot.pre_statements)).collect();
        let post_statements = plan.snapshots.iter().map(|p| templates(&p.snapshot.post_statements)).collect();
        let audits = plan
            .snapshots
            .iter()
            .map(|planned| {
                let audits = &planned.snapshot.audits;
                audits.iter().map(|a| (a.blocking, a.call.clone(), QueryTemplate::from_sql(&a.query))).collect()
            })
            .collect();
        let replacing_batch_starts = plan.replacing_batch_starts();
        RunContext {
            plan,
            graph,
            queries,
            pre_statements,
            post_statements,
            audits,
            replacing_batch_starts,
            settled: Mutex::default(),
        }
    }

    /// `task` and every task that transitively waits for it, leaving out (and not walking
    /// below) the tasks in `settled`, which it then adds them to.
    fn with_descendants(&self, task: u32, settled: &Mutex<BTreeSet<u32>>) -> Vec<u32> {
        let mut settled = settled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut found = vec![task];
        settled.insert(task);
        let mut pending = VecDeque::from([task]);
        while let Some(next) = pending.pop_front() {
            for child in self.graph.children(next) {
                if settled.insert(child) {
                    found.push(child);
                    pending.push_back(child);
                }
            }
        }
        found
    }
}

type ContextCell = Arc<OnceCell<Arc<RunContext>>>;

struct Shared {
    config: WorkerConfig,
    deps: WorkerDeps,
    contexts: Mutex<HashMap<PlanId, ContextCell>>,
    /// Runs seen in the state store (a run, once started, stays there).
    known_runs: Mutex<HashSet<RunId>>,
    finisher: Finisher,
    /// Tasks being settled while their slots run the next ones (one permit each).
    settling: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    /// Whether the state store holds the run (asked once per run).
    async fn run_known(&self, run_id: &RunId) -> Result<bool, WorkerError> {
        if self.known_runs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(run_id) {
            return Ok(true);
        }
        let state = &self.deps.state;
        let record = durable(self.config.retry, "run", || async { Ok(state.get_run(run_id).await?) }).await?;
        if record.is_some() {
            self.known_runs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(run_id.clone());
        }
        Ok(record.is_some())
    }

    async fn context(&self, plan_id: &PlanId) -> Result<Arc<RunContext>, WorkerError> {
        let cell = {
            let mut contexts = self.contexts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(contexts.entry(plan_id.clone()).or_default())
        };
        let context = cell
            .get_or_try_init(|| async {
                let plan = self
                    .deps
                    .state
                    .get_plan(plan_id)
                    .await?
                    .ok_or_else(|| WorkerError::UnknownPlan(plan_id.clone()))?;
                let context = offload(move || RunContext::build(plan)).await.map_err(WorkerError::Join)?;
                Ok::<_, WorkerError>(Arc::new(context))
            })
            .await?;
        Ok(Arc::clone(context))
    }
}

/// The outcome of executing one task in the warehouse.
enum Execution {
    Done {
        rows: u64,
        retries: u32,
    },
    Failed {
        error: String,
        attempts: u32,
    },
    /// Before a retry, state said the task must not run: its interval was recorded meanwhile
    /// (another copy finished it), or its run stopped.
    Stopped(Outlook),
}

/// What state says of a task about to run, read from state now (never from a cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outlook {
    /// Its run is finished or was superseded by a resume: no more work for it.
    RunOver,
    /// Its plan's breaker is tripped: drain it.
    Aborted,
    /// Its interval is recorded: never executed again.
    Recorded,
    Go,
}

impl Shared {
    async fn outlook(
        &self,
        message: &TaskMessage,
        key: &IntervalKey,
        interval: Interval,
    ) -> Result<Outlook, WorkerError> {
        // One read, one moment: the run, the breaker and the interval (one round trip).
        let state = &self.deps.state;
        let (run_id, plan_id) = (&message.run_id, &message.plan_id);
        let outlook = durable(self.config.retry, "task outlook", || async {
            Ok(state.task_outlook(run_id, plan_id, key, interval).await?)
        })
        .await?;
        if outlook.run != Some(RunStatus::Running) {
            return Ok(Outlook::RunOver);
        }
        if outlook.breaker.is_some() {
            return Ok(Outlook::Aborted);
        }
        if outlook.recorded {
            return Ok(Outlook::Recorded);
        }
        Ok(Outlook::Go)
    }
}

/// Retries a state or queue step while its failure is transient.
async fn durable<T, F, Fut>(policy: RetryPolicy, what: &str, mut step: F) -> Result<T, WorkerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, WorkerError>>,
{
    let mut schedule = RetrySchedule::new(policy);
    loop {
        match step().await {
            Ok(value) => return Ok(value),
            Err(error) if error.is_transient() => match schedule.next_delay() {
                Some(delay) => {
                    warn!(step = what, error = %error, "transient failure, retrying");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(error),
            },
            Err(error) => return Err(error),
        }
    }
}

/// What a gate call said, once the run's state is taken into account.
enum Gated<T> {
    Answer(T),
    /// The run is finished: its tasks release nothing any more.
    RunClosed,
    /// The state store has no such run: the task is not one of ours (dead-letter it).
    RunUnknown,
}

/// Calls the gate, retrying transient failures. A run the gate does not know lost its counters
/// (the coordinator rebuilds them from state, so waiting is the answer) — unless the run is no
/// longer running in state: then a stale task (a duplicate queued by a rebuild, a redelivery
/// after the run finished) has nothing to release.
async fn gated<T, F, Fut>(shared: &Shared, run_id: &RunId, mut call: F) -> Result<Gated<T>, WorkerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let mut schedule = RetrySchedule::new(shared.config.retry);
    loop {
        let error = match call().await {
            Ok(answer) => return Ok(Gated::Answer(answer)),
            Err(QueueError::UnknownRun(run)) => {
                let state = &shared.deps.state;
                let record = durable(shared.config.retry, "run", || async { Ok(state.get_run(run_id).await?) }).await?;
                match record {
                    None => return Ok(Gated::RunUnknown),
                    Some(record) if record.status != RunStatus::Running => return Ok(Gated::RunClosed),
                    Some(_) => {}
                }
                QueueError::UnknownRun(run)
            }
            Err(error) if error.is_transient() => error,
            Err(error) => return Err(error.into()),
        };
        match schedule.next_delay() {
            Some(delay) => {
                warn!(error = %error, "dependency gate unavailable, retrying");
                tokio::time::sleep(delay).await;
            }
            None => return Err(error.into()),
        }
    }
}

/// Runs audit checks after a write has committed; the first that counts a row is the error.
async fn audit_after(warehouse: &mut dyn Warehouse, checks: &[AuditCheck]) -> Result<(), EngineError> {
    for check in checks {
        if let Some(failure) = check.failure(warehouse.query_i64(&check.count_query).await?) {
            return Err(failure);
        }
    }
    Ok(())
}

/// Counts a delivery rejected to the dead-letter queue.
fn dead_lettered(gateway: &str) {
    counter!(metric::DEAD_LETTERS, "gateway" => gateway.to_string()).increment(1);
}

/// Times warehouse calls into `sluice_warehouse_statement_duration_seconds`.
struct Timed<'a>(&'a str);

impl Timed<'_> {
    async fn call<T>(&self, operation: &'static str, call: impl std::future::Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let result = call.await;
        histogram!(metric::WAREHOUSE_STATEMENT_DURATION, "gateway" => self.0.to_string(), "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        result
    }
}

/// One worker slot: a warehouse connection, reopened after a lost connection.
struct Slot {
    shared: Arc<Shared>,
    /// The settles in flight, owned by the worker's slots (not by `Shared`, which the settles
    /// hold): when the worker stops or crashes, dropping them aborts every one.
    settles: Arc<Mutex<tokio::task::JoinSet<()>>>,
    warehouse: Option<Box<dyn Warehouse>>,
    /// Whether the slot had a connection before (a new one is then a reconnect).
    connected_before: bool,
    /// Physical tables this connection has made sure exist.
    ensured: BTreeSet<String>,
}

impl Slot {
    async fn warehouse(&mut self) -> Result<&mut Box<dyn Warehouse>, EngineError> {
        if let Some(warehouse) = self.warehouse.take() {
            return Ok(self.warehouse.insert(warehouse));
        }
        let warehouse = self.shared.deps.warehouses.connect(&self.shared.config.gateway).await?;
        if self.connected_before {
            counter!(metric::RECONNECTS, "service" => "warehouse").increment(1);
        }
        self.connected_before = true;
        Ok(self.warehouse.insert(warehouse))
    }

    /// Gives up the task in hand at a stop past its deadline: the statement in flight is
    /// cancelled in the warehouse and the connection dropped, so its transaction rolls back.
    async fn abandon(&mut self) {
        if let Some(warehouse) = self.warehouse.take() {
            warehouse.canceller().cancel().await;
        }
        self.ensured.clear();
    }

    /// Runs the task's statements once; the caller retries.
    async fn execute_once(
        &mut self,
        context: &RunContext,
        task_index: u32,
        execution_time: Timestamp,
    ) -> Result<u64, EngineError> {
        let task = context.graph.tasks[task_index as usize];
        let snapshot_index = task.snapshot as usize;
        let snapshot = &context.plan.snapshots[snapshot_index].snapshot;
        let interval = task.interval;
        let fill = |template: &QueryTemplate| template.fill(interval, execution_time);
        let query = context.queries[snapshot_index].as_ref().map(fill);
        let pre: Vec<String> = context.pre_statements[snapshot_index].iter().map(fill).collect();
        let post: Vec<String> = context.post_statements[snapshot_index].iter().map(fill).collect();
        let Some(table) = snapshot.physical_table() else {
            return Ok(0);
        };
        let table_key = table.to_string();
        let ensured = self.ensured.contains(&table_key);
        let gateway = self.shared.config.gateway.clone();
        let timed = Timed(&gateway);
        let warehouse = self.warehouse().await?;
        for statement in &pre {
            timed.call("pre_statement", warehouse.execute(statement)).await?;
        }
        let query_text = query.as_deref().unwrap_or("");
        let needs_table = !matches!(snapshot.kind, ModelKind::View | ModelKind::Seed { .. });
        if needs_table && !ensured {
            let ensure = match &snapshot.kind {
                ModelKind::ScdType2(scd) => {
                    let columns = sluice_engine::scd_type_2_columns(scd, &snapshot.columns);
                    let shape = sluice_engine::scd_type_2_shape(scd, query_text);
                    timed.call("ensure_table", warehouse.ensure_table(&table, &columns, &shape)).await
                }
                _ => timed.call("ensure_table", warehouse.ensure_table(&table, &snapshot.columns, query_text)).await,
            };
            ensure?;
        }
        // Audits read the rows the write covers: an incremental-by-time model's interval, else
        // the table. Blocking ones run inside the write's transaction (a failure rolls it back);
        // the others after it commits, reported and not failing the task.
        let time_filter = match &snapshot.kind {
            ModelKind::IncrementalByTimeRange { time_column, time_format: None, .. } => {
                Some(TimeColumn::Native(time_column))
            }
            // A format applies to a text or numeric column: the table says which it is.
            ModelKind::IncrementalByTimeRange { time_column, time_format: Some(format), .. } => {
                let columns = timed.call("table_columns", warehouse.table_columns(&table)).await?;
                let data_type = columns.iter().find(|(name, _)| name.eq_ignore_ascii_case(time_column));
                Some(TimeColumn::for_type(time_column, format, data_type.map_or("", |(_, data_type)| data_type)))
            }
            _ => None,
        };
        let mut blocking = Vec::new();
        let mut reported = Vec::new();
        for (is_blocking, call, template) in &context.audits[snapshot_index] {
            let audit_query = template.fill(interval, execution_time);
            let check = AuditCheck {
                audit: call.clone(),
                count_query: audit_count_query(&table, time_filter, interval, &audit_query),
            };
            if *is_blocking { blocking.push(check) } else { reported.push(check) }
        }
        let replacing = context.replacing_batch_starts[snapshot_index] == Some(interval.start);
        let rows = match &snapshot.kind {
            // Rebuilt from its own rows and the query's; its first run (or a restatement) from
            // the query's alone.
            ModelKind::ScdType2(scd) => {
                let columns: Vec<String> = timed
                    .call("table_columns", warehouse.table_columns(&table))
                    .await?
                    .into_iter()
                    .map(|(name, _)| name)
                    .collect();
                let first = replacing || interval.start <= snapshot.start;
                let rebuilt =
                    sluice_engine::scd_type_2_query(&table, scd, &columns, query_text, execution_time, first)?;
                timed.call("rebuild", warehouse.rebuild(&table, &rebuilt, &blocking)).await?
            }
            _ if replacing => timed.call("replace_all", warehouse.replace_all(&table, query_text, &blocking)).await?,
            ModelKind::IncrementalByTimeRange { time_column, .. } => {
                let time_column = time_filter.unwrap_or(TimeColumn::Native(time_column));
                let write = warehouse.replace_interval(&table, time_column, interval, query_text, &blocking);
                timed.call("replace_interval", write).await?
            }
            ModelKind::Full => timed.call("replace_all", warehouse.replace_all(&table, query_text, &blocking)).await?,
            ModelKind::IncrementalByUniqueKey { unique_key, .. } => {
                timed.call("upsert", warehouse.upsert(&table, unique_key, query_text, &blocking)).await?
            }
            // A run's partitions replace those the table holds (SQL `=`, as the unique key).
            ModelKind::IncrementalByPartition { partitioned_by, .. }
            | ModelKind::IncrementalUnmanaged { insert_overwrite: true, partitioned_by, .. } => {
                timed.call("upsert", warehouse.upsert(&table, partitioned_by, query_text, &blocking)).await?
            }
            ModelKind::IncrementalUnmanaged { .. } => {
                timed.call("append", warehouse.append(&table, query_text, &blocking)).await?
            }
            // A view or seed is built by DDL: its blocking audits run after the build, which
            // nothing shows before the environment is promoted.
            ModelKind::View => {
                timed.call("create_view", warehouse.create_physical_view(&table, query_text)).await?;
                audit_after(warehouse.as_mut(), &blocking).await?;
                0
            }
            ModelKind::Seed { .. } => {
                let rows = match &snapshot.seed {
                    Some(seed) => timed.call("load_seed", warehouse.load_seed(&table, &snapshot.columns, seed)).await?,
                    None => 0,
                };
                audit_after(warehouse.as_mut(), &blocking).await?;
                rows
            }
            ModelKind::Embedded => 0,
        };
        for check in &reported {
            match audit_after(warehouse.as_mut(), std::slice::from_ref(check)).await {
                Err(EngineError::AuditFailed { audit, rows }) => warn!(
                    model = %snapshot.name,
                    interval = %interval,
                    audit = %audit,
                    rows,
                    "non-blocking audit failed: {rows} row(s) break it"
                ),
                other => other?,
            }
        }
        for statement in &post {
            timed.call("post_statement", warehouse.execute(statement)).await?;
        }
        if needs_table {
            self.ensured.insert(table_key);
        }
        Ok(rows)
    }

    async fn execute(&mut self, context: &RunContext, message: &TaskMessage) -> Execution {
        let task_index = message.task_index;
        let mut schedule = RetrySchedule::new(self.shared.config.retry);
        let mut retries = 0;
        let execution_time = context.plan.created_at;
        let task = context.graph.tasks[task_index as usize];
        let snapshot = &context.plan.snapshots[task.snapshot as usize].snapshot;
        let key = (snapshot.name.clone(), snapshot.version.clone());
        loop {
            if retries > 0 {
                // Time passed since the last look at state: another copy may have finished the
                // interval, or the run may have stopped.
                match self.shared.outlook(message, &key, task.interval).await {
                    Ok(Outlook::Go) => {}
                    Ok(stop) => return Execution::Stopped(stop),
                    Err(error) => return Execution::Failed { error: error.to_string(), attempts: retries },
                }
            }
            match self.execute_once(context, task_index, execution_time).await {
                Ok(rows) => return Execution::Done { rows, retries },
                Err(error) if error.is_transient() => {
                    // A lost connection is reopened on the next attempt.
                    self.warehouse = None;
                    self.ensured.clear();
                    match schedule.next_delay() {
                        Some(delay) => {
                            retries += 1;
                            counter!(metric::TASK_RETRIES, "gateway" => self.shared.config.gateway.clone(), "model" => snapshot.name.to_string()).increment(1);
                            warn!(task_index, retries, error = %error, "transient warehouse failure, retrying");
                            tokio::time::sleep(delay).await;
                        }
                        None => return Execution::Failed { error: error.to_string(), attempts: retries + 1 },
                    }
                }
                Err(error) => return Execution::Failed { error: error.to_string(), attempts: retries + 1 },
            }
        }
    }

    #[instrument(skip_all, fields(
        plan_id = %delivery.task.plan_id,
        run_id = %delivery.task.run_id,
        trace_id = %sluice_core::trace::trace_id(&delivery.task.run_id),
        task = delivery.task.task_index,
        gateway = %delivery.task.gateway,
        model = tracing::field::Empty,
        interval = tracing::field::Empty,
    ))]
    async fn handle(&mut self, delivery: Delivery) -> Result<(), WorkerError> {
        let message = delivery.task.clone();
        let gateway = self.shared.config.gateway.clone();
        if delivery.redelivered {
            counter!(metric::REDELIVERIES, "gateway" => gateway.clone()).increment(1);
        }
        let context = match self.shared.context(&message.plan_id).await {
            Ok(context) => context,
            Err(WorkerError::UnknownPlan(plan)) => {
                warn!("a task of a plan the state store does not hold; dead-lettering it");
                dead_lettered(&gateway);
                delivery.reject().await?;
                return Err(WorkerError::UnknownPlan(plan));
            }
            Err(error) => return Err(error),
        };
        if !self.shared.run_known(&message.run_id).await? {
            warn!("a task of a run the state store does not hold; dead-lettering it");
            dead_lettered(&gateway);
            delivery.reject().await?;
            return Err(WorkerError::UnknownRun(message.run_id));
        }
        let index = message.task_index;
        let Some(task) = context.graph.tasks.get(index as usize).copied() else {
            warn!("task index outside the plan's graph, dead-lettering");
            dead_lettered(&gateway);
            delivery.reject().await?;
            return Err(WorkerError::UnknownTask { run: message.run_id, index });
        };
        if task.id != message.task_id {
            warn!("task id does not match the plan's graph, dead-lettering");
            dead_lettered(&gateway);
            delivery.reject().await?;
            return Err(WorkerError::UnknownTask { run: message.run_id, index });
        }
        let planned = &context.plan.snapshots[task.snapshot as usize];
        let snapshot = &planned.snapshot;
        let span = tracing::Span::current();
        span.record("model", tracing::field::display(&snapshot.name));
        span.record("interval", tracing::field::display(&task.interval));
        let labels = [("gateway", gateway.clone()), ("model", snapshot.name.to_string())];

        // Before any work, from state as it is now (never from a cache): a run that is finished
        // or was superseded by a resume takes no more work (a stale copy must not rewrite an
        // interval of a promoted table); an aborted run's tasks are drained; an interval that is
        // recorded is never executed again, whoever queued the task and however often.
        let key = (snapshot.name.clone(), snapshot.version.clone());
        let already_recorded = match self.shared.outlook(&message, &key, task.interval).await? {
            Outlook::RunOver => {
                debug!("a task of a run that is no longer running: dropped without work");
                delivery.ack().await?;
                return Ok(());
            }
            Outlook::Aborted => return self.drop_aborted(delivery, &context).await,
            Outlook::Recorded => true,
            Outlook::Go => false,
        };
        let (rows, retries, skipped) = if already_recorded {
            (0, 0, true)
        } else {
            // The task timeline (`SLUICE_LOG=sluice::timeline=debug`): when each delivery's work
            // began and ended (the process is the log's); the fault suite reads it to show that
            // two copies of a task really ran at once.
            debug!(target: TIMELINE, redelivered = delivery.redelivered, attempt = message.attempt, "task started");
            counter!(metric::TASKS_STARTED, &labels).increment(1);
            let started = std::time::Instant::now();
            let execution = self.execute_watched(&context, &message).await;
            debug!(target: TIMELINE, "task finished");
            match execution {
                Some(Execution::Done { rows, retries }) => {
                    histogram!(metric::TASK_DURATION, &labels).record(started.elapsed().as_secs_f64());
                    (rows, retries, false)
                }
                Some(Execution::Failed { error, attempts }) => {
                    return self.fail(delivery, &context, index, task.interval, error, attempts).await;
                }
                Some(Execution::Stopped(Outlook::Recorded)) => (0, 0, true),
                Some(Execution::Stopped(Outlook::RunOver)) => {
                    delivery.ack().await?;
                    return Ok(());
                }
                Some(Execution::Stopped(Outlook::Aborted | Outlook::Go)) | None => {
                    return self.drop_aborted(delivery, &context).await;
                }
            }
        };

        // The slot takes its next task while this one is settled (recorded, released, acked):
        // the round trips of settling overlap the next task's warehouse work.
        let permit = Arc::clone(&self.shared.settling)
            .acquire_owned()
            .await
            .map_err(|_| WorkerError::Join("the worker is stopping".to_string()))?;
        let counted = if skipped { metric::TASKS_SKIPPED } else { metric::TASKS_SUCCEEDED };
        let settled = Settled {
            shared: Arc::clone(&self.shared),
            context,
            delivery,
            rows,
            retries,
            skipped,
            counted,
            labels,
            written_at: std::time::Instant::now(),
        };
        let mut settles = self.settles.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while settles.try_join_next().is_some() {}
        settles.spawn(async move {
            if let Err(error) = settled.settle().await {
                warn!(error = %error, "settling a finished task failed; the task will be delivered again");
            }
            drop(permit);
        });
        Ok(())
    }

    /// Executes the task while reporting it alive and watching the run's breaker: `None` when
    /// the breaker tripped, in which case the statement in flight was cancelled (in the
    /// warehouse, then its connection dropped, so its transaction rolls back) and nothing was
    /// recorded.
    async fn execute_watched(&mut self, context: &RunContext, message: &TaskMessage) -> Option<Execution> {
        let deps = self.shared.deps.clone();
        let heartbeat = self.shared.config.heartbeat;
        let index = message.task_index;
        // Connected first, so that the statement in flight can be cancelled from here.
        let canceller = self.warehouse().await.ok().map(|warehouse| warehouse.canceller());
        let outcome = {
            let run = self.execute(context, message);
            tokio::pin!(run);
            // The first beat after one period: a task shorter than that reports only its end, so
            // the hot path pays no extra publish and no second breaker read.
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    execution = &mut run => break Some(execution),
                    _ = ticker.tick() => {
                        let alive = RunEvent::TaskRunning { run_id: message.run_id.clone(), task_index: index };
                        if let Err(error) = deps.events.publish(alive).await {
                            warn!(error = %error, "reporting the task alive failed");
                        }
                        let superseded = matches!(
                            deps.state.get_run(&message.run_id).await,
                            Ok(Some(run)) if run.status != RunStatus::Running
                        );
                        let breaker = deps.state.breaker(&message.plan_id).await.ok().flatten();
                        if superseded || breaker.is_some() {
                            let reason = breaker.unwrap_or_else(|| "the run is no longer running".to_string());
                            info!(reason = %reason, "the run was aborted: cancelling the task in flight");
                            if let Some(canceller) = &canceller {
                                canceller.cancel().await;
                            }
                            break None;
                        }
                    }
                }
            }
        };
        if outcome.is_none() {
            self.warehouse = None;
            self.ensured.clear();
        }
        outcome
    }

    /// Drops a task of an aborted run: it and every task waiting for it are settled without
    /// success in the gate (the last worker to do so publishes the settled run), then acked.
    async fn drop_aborted(&mut self, delivery: Delivery, context: &RunContext) -> Result<(), WorkerError> {
        let deps = self.shared.deps.clone();
        counter!(metric::TASKS_ABORTED, "gateway" => self.shared.config.gateway.clone()).increment(1);
        let message = delivery.task.clone();
        let settled_tasks = context.with_descendants(message.task_index, &context.settled);
        let run_complete =
            match gated(&self.shared, &message.run_id, || deps.gate.skip(&message.run_id, &settled_tasks)).await? {
                Gated::Answer(complete) => complete,
                Gated::RunClosed | Gated::RunUnknown => false,
            };
        if run_complete {
            let settled = RunEvent::RunSettled { run_id: message.run_id.clone(), plan_id: message.plan_id.clone() };
            durable(self.shared.config.retry, "settled", || async { Ok(deps.events.publish(settled.clone()).await?) })
                .await?;
        }
        delivery.ack().await?;
        deps.events.publish(RunEvent::TaskAborted { run_id: message.run_id, task_index: message.task_index }).await?;
        Ok(())
    }

    async fn fail(
        &mut self,
        delivery: Delivery,
        context: &RunContext,
        index: u32,
        interval: Interval,
        error: String,
        attempts: u32,
    ) -> Result<(), WorkerError> {
        let deps = self.shared.deps.clone();
        let message = delivery.task.clone();
        let snapshot = &context.plan.snapshots[context.graph.tasks[index as usize].snapshot as usize].snapshot;
        warn!(model = %snapshot.name, interval = %interval, error = %error, "task failed");
        let labels = [("gateway", self.shared.config.gateway.clone()), ("model", snapshot.name.to_string())];
        counter!(metric::TASKS_FAILED, &labels).increment(1);
        let failure = TaskFailure {
            task_id: message.task_id,
            model: snapshot.name.clone(),
            interval,
            error: error.clone(),
            attempts,
        };
        durable(self.shared.config.retry, "record failure", || async {
            deps.state.record_task_failure(&message.run_id, &failure).await?;
            Ok(())
        })
        .await?;
        // The failed task and everything waiting for it will not run in this attempt.
        let settled_tasks = context.with_descendants(index, &context.settled);
        let run_complete =
            match gated(&self.shared, &message.run_id, || deps.gate.skip(&message.run_id, &settled_tasks)).await? {
                Gated::Answer(complete) => complete,
                Gated::RunClosed | Gated::RunUnknown => false,
            };
        if run_complete {
            deps.events
                .publish(RunEvent::RunSettled { run_id: message.run_id.clone(), plan_id: message.plan_id.clone() })
                .await?;
        }
        delivery.ack().await?;
        deps.events.publish(RunEvent::TaskFailed { run_id: message.run_id.clone(), task_index: index, error }).await?;
        Ok(())
    }
}

/// A task the warehouse finished, to be settled: recorded in state, completed in the gate, its
/// ready children published, then acked.
struct Settled {
    shared: Arc<Shared>,
    context: Arc<RunContext>,
    delivery: Delivery,
    rows: u64,
    retries: u32,
    skipped: bool,
    /// The counter the task adds to once it is acked (succeeded or skipped), with its labels.
    counted: &'static str,
    labels: [(&'static str, String); 2],
    /// When its interval was written (or found recorded): the settle latency starts there.
    written_at: std::time::Instant,
}

impl Settled {
    #[instrument(skip_all, fields(
        plan_id = %self.delivery.task.plan_id,
        run_id = %self.delivery.task.run_id,
        trace_id = %sluice_core::trace::trace_id(&self.delivery.task.run_id),
        task = self.delivery.task.task_index,
        gateway = %self.delivery.task.gateway,
    ))]
    async fn settle(self) -> Result<(), WorkerError> {
        let Settled { shared, context, delivery, rows, retries, skipped, counted, labels, written_at } = self;
        let deps = shared.deps.clone();
        let message = delivery.task.clone();
        let index = message.task_index;
        let task = context.graph.tasks[index as usize];
        let snapshot = &context.plan.snapshots[task.snapshot as usize].snapshot;
        // The interval, the task done and the run's progress, in one (group-committed) transaction.
        let finished = FinishedTask {
            run_id: message.run_id.clone(),
            task_id: task.id,
            interval: (!skipped).then(|| IntervalRecord {
                name: snapshot.name.clone(),
                version: snapshot.version.clone(),
                interval: task.interval,
            }),
            intervals: if skipped { 0 } else { u64::from(task.interval_count) },
            retries: u64::from(retries),
        };
        durable(shared.config.retry, "record task", || shared.finisher.finish(finished.clone())).await?;
        let children: Vec<u32> = context.graph.children(index).collect();
        let completion =
            match gated(&shared, &message.run_id, || deps.gate.complete(&message.run_id, index, &children)).await? {
                Gated::Answer(completion) => completion,
                Gated::RunClosed => {
                    debug!("a task of a run that is no longer running: nothing to release");
                    delivery.ack().await?;
                    return Ok(());
                }
                Gated::RunUnknown => {
                    warn!("a task of a run the state store does not hold; dead-lettering it");
                    dead_lettered(&shared.config.gateway);
                    delivery.reject().await?;
                    return Err(WorkerError::UnknownRun(message.run_id));
                }
            };
        // The ready children are published whenever the gate reports them, also for a repeated
        // completion: whoever completed the task first (a copy of this delivery, a rebuild's
        // catch-up) may have died before publishing them. A repeat may publish a child twice;
        // the copy finds its interval recorded and only settles.
        let repeat = !completion.newly_done;
        {
            let ready: Vec<TaskMessage> = completion
                .ready
                .iter()
                .map(|child| {
                    let child_task = context.graph.tasks[*child as usize];
                    TaskMessage {
                        plan_id: message.plan_id.clone(),
                        run_id: message.run_id.clone(),
                        task_index: *child,
                        task_id: child_task.id,
                        gateway: context.plan.snapshots[child_task.snapshot as usize].snapshot.gateway.clone(),
                        attempt: u32::from(repeat || delivery.redelivered || skipped),
                    }
                })
                .collect();
            if !ready.is_empty() {
                durable(shared.config.retry, "publish", || async { Ok(deps.queue.publish(&ready).await?) }).await?;
            }
        }
        if completion.run_complete {
            deps.events
                .publish(RunEvent::RunSettled { run_id: message.run_id.clone(), plan_id: message.plan_id.clone() })
                .await?;
        }
        delivery.ack().await?;
        counter!(counted, &labels).increment(1);
        histogram!(metric::SETTLE_DURATION, "gateway" => labels[0].1.clone())
            .record(written_at.elapsed().as_secs_f64());
        // Progress after the ack, so that a follower that sees it also sees the task settled.
        let done = RunEvent::TaskDone {
            run_id: message.run_id.clone(),
            task_index: index,
            intervals: task.interval_count,
            rows,
            retries,
            skipped,
        };
        deps.events.publish(done).await?;
        Ok(())
    }
}

/// Runs a worker until `shutdown`: `concurrency` slots consuming the gateway's queue. A slot
/// finishes the task in hand before it stops.
pub async fn run(config: WorkerConfig, deps: WorkerDeps, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let concurrency = config.concurrency.max(1);
    info!(gateway = %config.gateway, concurrency, "worker starting");
    let finisher = Finisher::start(Arc::clone(&deps.state));
    let shared = Arc::new(Shared {
        config,
        deps,
        contexts: Mutex::new(HashMap::new()),
        known_runs: Mutex::default(),
        finisher,
        settling: Arc::new(tokio::sync::Semaphore::new(concurrency)),
    });
    let mut slots = tokio::task::JoinSet::new();
    let settles = Arc::new(Mutex::new(tokio::task::JoinSet::new()));
    // Cancelled `stop_deadline` after `shutdown`: the tasks still in hand are given back.
    let hard_stop = CancellationToken::new();
    let deadline_watch = shared.config.stop_deadline.map(|deadline| {
        let (shutdown, hard_stop) = (shutdown.clone(), hard_stop.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(deadline).await;
            warn!(
                deadline_seconds = deadline.as_secs(),
                "stop deadline passed: cancelling the tasks in hand and returning them to the queue"
            );
            hard_stop.cancel();
        })
    });
    for _ in 0..concurrency {
        let hard_stop = hard_stop.clone();
        let settles = Arc::clone(&settles);
        let shared = Arc::clone(&shared);
        let shutdown = shutdown.clone();
        slots.spawn(async move {
            let mut slot = Slot {
                shared: Arc::clone(&shared),
                settles,
                warehouse: None,
                connected_before: false,
                ensured: BTreeSet::new(),
            };
            let mut pause = RetrySchedule::new(shared.config.retry);
            loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok::<(), WorkerError>(()),
                    next = shared.deps.queue.next(&shared.config.gateway) => next,
                };
                let delivery = match next {
                    Ok(Some(delivery)) => delivery,
                    Ok(None) => return Ok(()),
                    Err(error) if error.is_transient() => {
                        warn!(error = %error, "queue unavailable, retrying");
                        let delay = pause.next_delay().unwrap_or(shared.config.retry.max_interval);
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(delay) => {}
                        }
                        continue;
                    }
                    Err(error) => return Err(error.into()),
                };
                // A failure of the machinery (not of the task's SQL) leaves the delivery unacked:
                // it is dropped here and so delivered again. So does a stop past its deadline.
                let handled = tokio::select! {
                    biased;
                    handled = slot.handle(delivery) => Some(handled),
                    _ = hard_stop.cancelled() => None,
                };
                let Some(handled) = handled else {
                    slot.abandon().await;
                    return Ok(());
                };
                match handled {
                    Ok(()) => pause = RetrySchedule::new(shared.config.retry),
                    Err(error) => {
                        warn!(error = %error, "task handling failed; the task will be delivered again");
                        // Back off before the next delivery so that a broken dependency is not hammered.
                        let delay = pause.next_delay().unwrap_or(shared.config.retry.max_interval);
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        });
    }
    let mut result = Ok(());
    while let Some(joined) = slots.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(error)) => result = Err(error),
            // A slot that panicked dropped its delivery unacked: the task is delivered again.
            Err(error) if error.is_panic() => result = Err(WorkerError::Join("a task slot panicked".to_string())),
            Err(_) => result = Err(WorkerError::Join("a task slot was cancelled".to_string())),
        }
    }
    // The tasks still being settled finish before the worker stops (or, past the stop
    // deadline, are dropped: their deliveries, unacked, are delivered again).
    tokio::select! {
        biased;
        _ = shared.settling.acquire_many(concurrency as u32) => {}
        _ = hard_stop.cancelled() => settles.lock().unwrap_or_else(std::sync::PoisonError::into_inner).abort_all(),
    }
    if let Some(watch) = deadline_watch {
        watch.abort();
    }
    info!("worker stopped");
    result
}
