//! Task queues, dependency gates and run events: the traits, and in-process implementations.
//!
//! The contract every backend keeps (the in-process one here, RabbitMQ + Redis later):
//! - a delivered task stays owned by its consumer until acked; a delivery dropped or requeued
//!   without an ack is delivered again (at-least-once);
//! - completing a task in the gate is idempotent: it marks the task done once, decrements its
//!   children once, and returns the children that have no unfinished parent and are not done —
//!   a repeated call re-reports the same children, so a crash between the gate and the publish
//!   loses nothing;
//! - the gate says when the run has nothing outstanding.

pub mod memory;
pub mod metered;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis_gate;
#[cfg(feature = "rabbitmq")]
pub mod wire;

#[cfg(test)]
mod conformance;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
pub use sluice_core::names::RunId;
use sluice_core::names::{PlanId, TaskId};

/// One task on a gateway's queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMessage {
    pub plan_id: PlanId,
    pub run_id: RunId,
    /// The task's index in the plan's task graph.
    pub task_index: u32,
    pub task_id: TaskId,
    pub gateway: String,
    /// How many times the task was published for this run before (republished after a reconcile).
    pub attempt: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is closed")]
    Closed,
    #[error("unknown run {0}")]
    UnknownRun(String),
    #[error("queue backend failed: {0}")]
    Backend(String),
}

impl QueueError {
    /// Whether retrying may succeed (a broker or Redis connection was lost).
    pub fn is_transient(&self) -> bool {
        matches!(self, QueueError::Backend(_))
    }
}

/// What a consumer does with a delivery once it has handled it.
#[async_trait]
pub trait Acknowledger: Send + Sync {
    /// The work is durable: forget the message.
    async fn ack(&self) -> Result<(), QueueError>;
    /// Put the message back for another consumer.
    async fn requeue(&self) -> Result<(), QueueError>;
    /// Never deliver it again (dead-letter it).
    async fn reject(&self) -> Result<(), QueueError>;
}

/// How a consumer answers one message, and what happens when it does not (the message is
/// dropped unanswered): shared by [`Delivery`] and [`SettledRun`].
struct Answer {
    acknowledger: Option<Box<dyn Acknowledger>>,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

#[derive(Clone, Copy)]
enum Verdict {
    Ack,
    Requeue,
    Reject,
}

impl Answer {
    async fn give(mut self, verdict: Verdict) -> Result<(), QueueError> {
        self.on_drop = None;
        let Some(acknowledger) = self.acknowledger.take() else { return Ok(()) };
        match verdict {
            Verdict::Ack => acknowledger.ack().await,
            Verdict::Requeue => acknowledger.requeue().await,
            Verdict::Reject => acknowledger.reject().await,
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(on_drop) = self.on_drop.take() {
            on_drop();
        }
    }
}

/// A task taken from a queue. Dropping it without acking, requeueing or rejecting puts it back.
pub struct Delivery {
    pub task: TaskMessage,
    pub redelivered: bool,
    answer: Answer,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("task", &self.task).field("redelivered", &self.redelivered).finish()
    }
}

impl Delivery {
    pub fn new(
        task: TaskMessage,
        redelivered: bool,
        acknowledger: Box<dyn Acknowledger>,
        on_drop: Option<Box<dyn FnOnce() + Send>>,
    ) -> Delivery {
        Delivery { task, redelivered, answer: Answer { acknowledger: Some(acknowledger), on_drop } }
    }

    pub async fn ack(self) -> Result<(), QueueError> {
        self.answer.give(Verdict::Ack).await
    }

    pub async fn requeue(self) -> Result<(), QueueError> {
        self.answer.give(Verdict::Requeue).await
    }

    pub async fn reject(self) -> Result<(), QueueError> {
        self.answer.give(Verdict::Reject).await
    }
}

/// Durable per-gateway task queues: RabbitMQ quorum queues `sluice.tasks.<gateway>` in
/// distributed mode, [`memory::MemoryQueue`] in embedded mode.
#[async_trait]
pub trait TaskQueue: Send + Sync {
    /// Publishes tasks to their gateways' queues; returns once every one is durable (confirmed).
    async fn publish(&self, tasks: &[TaskMessage]) -> Result<(), QueueError>;
    /// Waits for the next task of a gateway's queue; `None` once the queue is shut down.
    async fn next(&self, gateway: &str) -> Result<Option<Delivery>, QueueError>;
    /// Tasks waiting in a gateway's queue, of every run (delivered ones are not counted).
    /// There is no per-run purge: a queue is shared by the runs of its gateway, so an aborted
    /// run's tasks are drained by the workers, which drop them once the run's breaker is tripped.
    async fn queued(&self, gateway: &str) -> Result<u64, QueueError>;
    /// Takes up to `max` tasks the broker dead-lettered from a gateway's queue — delivered more
    /// often than the delivery limit (every worker that took it died or could not answer), or
    /// rejected by a worker — without waiting. Each is acked once its run has been told; one
    /// dropped unanswered goes back to the dead-letter queue.
    async fn take_dead_letters(&self, gateway: &str, max: usize) -> Result<Vec<Delivery>, QueueError>;
    /// Stops every consumer: `next` returns `None` from now on.
    async fn shut_down(&self);
}

/// What completing a task in the gate says.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Completion {
    /// False when the task was already done (a duplicate completion decremented nothing).
    pub newly_done: bool,
    /// Children with no unfinished parent that are not done yet.
    pub ready: Vec<u32>,
    /// Nothing of the run is outstanding any more.
    pub run_complete: bool,
}

/// Per-run dependency counters: Redis (one Lua script per completion) in distributed mode,
/// [`memory::MemoryGate`] in embedded mode. Never the truth: a resume reloads it from state.
#[async_trait]
pub trait DependencyGate: Send + Sync {
    /// Loads a run's counters: for every task its number of unfinished parents, and which
    /// tasks are already done. Replaces whatever the gate held for the run.
    async fn load(&self, run_id: &RunId, unfinished_parents: &[u32], done: &[bool]) -> Result<(), QueueError>;
    /// Marks `task` done if it is not, decrementing `children` (the task's children in the graph)
    /// and the outstanding count once; returns the ready children and whether the run is complete.
    async fn complete(&self, run_id: &RunId, task: u32, children: &[u32]) -> Result<Completion, QueueError>;
    /// Marks tasks as settled without success (a failed task and its descendants): they count
    /// as no longer outstanding and release no child. Returns whether the run is complete.
    async fn skip(&self, run_id: &RunId, tasks: &[u32]) -> Result<bool, QueueError>;
    /// Outstanding tasks of a run (`None` when the gate does not know the run: lost or never loaded).
    async fn outstanding(&self, run_id: &RunId) -> Result<Option<u64>, QueueError>;
    /// Forgets a run.
    async fn clear(&self, run_id: &RunId) -> Result<(), QueueError>;
}

/// What happens during a run, for progress bars, the coordinator and the promoter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunEvent {
    /// A worker is executing the task: sent when it starts, then as a heartbeat while it runs.
    TaskRunning {
        run_id: RunId,
        task_index: u32,
    },
    TaskDone {
        run_id: RunId,
        task_index: u32,
        intervals: u32,
        rows: u64,
        retries: u32,
        skipped: bool,
    },
    TaskFailed {
        run_id: RunId,
        task_index: u32,
        error: String,
    },
    /// A delivery was dropped because the run's breaker was tripped.
    TaskAborted {
        run_id: RunId,
        task_index: u32,
    },
    /// Nothing of the run is outstanding: the promoter takes over.
    RunSettled {
        run_id: RunId,
        plan_id: PlanId,
    },
    /// The promoter finished the run: promoted, failed or aborted.
    RunFinished {
        run_id: RunId,
        outcome: String,
    },
}

impl RunEvent {
    pub fn run_id(&self) -> &RunId {
        match self {
            RunEvent::TaskRunning { run_id, .. }
            | RunEvent::TaskDone { run_id, .. }
            | RunEvent::TaskFailed { run_id, .. }
            | RunEvent::TaskAborted { run_id, .. }
            | RunEvent::RunSettled { run_id, .. }
            | RunEvent::RunFinished { run_id, .. } => run_id,
        }
    }
}

/// Run events: a topic exchange `sluice.events` plus the durable queue `sluice.runs.done` in
/// distributed mode, [`memory::MemoryEvents`] in embedded mode. `RunSettled` is durable and
/// consumed by exactly one promoter; every event is also broadcast to subscribers.
#[async_trait]
pub trait EventBus: Send + Sync {
    async fn publish(&self, event: RunEvent) -> Result<(), QueueError>;
    /// Every event published from now on.
    async fn subscribe(&self) -> Result<EventStream, QueueError>;
    /// The next settled run for a promoter; `None` once shut down. The promoter acks it once
    /// the run is finalized; dropped unacked, it is delivered again.
    async fn next_settled(&self) -> Result<Option<SettledRun>, QueueError>;
    async fn shut_down(&self);
}

/// A settled run handed to a promoter. Dropped unacked, it is delivered again.
pub struct SettledRun {
    pub run_id: RunId,
    pub plan_id: PlanId,
    answer: Answer,
}

impl std::fmt::Debug for SettledRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettledRun").field("run_id", &self.run_id).field("plan_id", &self.plan_id).finish()
    }
}

impl SettledRun {
    pub fn new(
        run_id: RunId,
        plan_id: PlanId,
        acknowledger: Box<dyn Acknowledger>,
        on_drop: Option<Box<dyn FnOnce() + Send>>,
    ) -> SettledRun {
        SettledRun { run_id, plan_id, answer: Answer { acknowledger: Some(acknowledger), on_drop } }
    }

    /// The run is finalized: forget the message.
    pub async fn ack(self) -> Result<(), QueueError> {
        self.answer.give(Verdict::Ack).await
    }
}

/// A subscription to run events.
pub struct EventStream {
    receiver: tokio::sync::broadcast::Receiver<RunEvent>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventStream")
    }
}

impl EventStream {
    pub fn new(receiver: tokio::sync::broadcast::Receiver<RunEvent>) -> EventStream {
        EventStream { receiver }
    }

    /// The next event; `None` when the bus is gone. A subscriber that falls behind skips what it missed.
    pub async fn next(&mut self) -> Option<RunEvent> {
        loop {
            match self.receiver.recv().await {
                Ok(event) => return Some(event),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event subscriber fell behind");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
