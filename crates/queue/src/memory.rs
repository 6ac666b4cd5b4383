//! In-process queue, gate and event bus for embedded mode: the same contract as RabbitMQ and
//! Redis, kept in memory behind one mutex each.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use sluice_core::names::PlanId;
use tokio::sync::{Notify, broadcast};

use crate::{
    Acknowledger, Completion, Delivery, DependencyGate, EventBus, EventStream, QueueError, RunEvent, RunId, SettledRun,
    TaskMessage, TaskQueue,
};

/// Locks a mutex; a panic while holding it cannot leave these structures half-updated in a way
/// that matters more than losing the process, so a poisoned lock is taken over.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
struct QueueState {
    queues: HashMap<String, VecDeque<(TaskMessage, bool)>>,
    dead_letters: Vec<TaskMessage>,
    shut_down: bool,
}

/// Per-gateway FIFO queues in memory.
#[derive(Clone, Default)]
pub struct MemoryQueue {
    state: Arc<Mutex<QueueState>>,
    notify: Arc<Notify>,
}

impl std::fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryQueue")
    }
}

impl MemoryQueue {
    pub fn new() -> MemoryQueue {
        MemoryQueue::default()
    }

    /// Messages rejected by consumers.
    pub fn dead_letters(&self) -> Vec<TaskMessage> {
        lock(&self.state).dead_letters.clone()
    }

    /// Tasks waiting in a gateway's queue (not in flight).
    pub fn depth(&self, gateway: &str) -> usize {
        lock(&self.state).queues.get(gateway).map_or(0, VecDeque::len)
    }
}

struct MemoryAcknowledger {
    state: Arc<Mutex<QueueState>>,
    notify: Arc<Notify>,
    task: TaskMessage,
}

#[async_trait]
impl Acknowledger for MemoryAcknowledger {
    async fn ack(&self) -> Result<(), QueueError> {
        Ok(())
    }

    async fn requeue(&self) -> Result<(), QueueError> {
        let mut state = lock(&self.state);
        state.queues.entry(self.task.gateway.clone()).or_default().push_back((self.task.clone(), true));
        drop(state);
        self.notify.notify_waiters();
        Ok(())
    }

    async fn reject(&self) -> Result<(), QueueError> {
        let mut state = lock(&self.state);
        state.dead_letters.push(self.task.clone());
        Ok(())
    }
}

/// Answers a dead letter: acked, it is gone; requeued or rejected, it stays a dead letter.
struct DeadLetterAcknowledger {
    state: Arc<Mutex<QueueState>>,
    task: TaskMessage,
}

#[async_trait]
impl Acknowledger for DeadLetterAcknowledger {
    async fn ack(&self) -> Result<(), QueueError> {
        Ok(())
    }

    async fn requeue(&self) -> Result<(), QueueError> {
        lock(&self.state).dead_letters.push(self.task.clone());
        Ok(())
    }

    async fn reject(&self) -> Result<(), QueueError> {
        lock(&self.state).dead_letters.push(self.task.clone());
        Ok(())
    }
}

#[async_trait]
impl TaskQueue for MemoryQueue {
    async fn publish(&self, tasks: &[TaskMessage]) -> Result<(), QueueError> {
        let mut state = lock(&self.state);
        if state.shut_down {
            return Err(QueueError::Closed);
        }
        for task in tasks {
            state.queues.entry(task.gateway.clone()).or_default().push_back((task.clone(), false));
        }
        drop(state);
        self.notify.notify_waiters();
        Ok(())
    }

    async fn next(&self, gateway: &str) -> Result<Option<Delivery>, QueueError> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = lock(&self.state);
                if state.shut_down {
                    return Ok(None);
                }
                let popped = state.queues.get_mut(gateway).and_then(VecDeque::pop_front);
                if let Some((task, redelivered)) = popped {
                    drop(state);
                    let acknowledger = MemoryAcknowledger {
                        state: Arc::clone(&self.state),
                        notify: Arc::clone(&self.notify),
                        task: task.clone(),
                    };
                    // Dropped without an answer: back to the queue, marked redelivered.
                    let requeue_state = Arc::clone(&self.state);
                    let requeue_notify = Arc::clone(&self.notify);
                    let requeue_task = task.clone();
                    let on_drop: Box<dyn FnOnce() + Send> = Box::new(move || {
                        let mut state = lock(&requeue_state);
                        let gateway = requeue_task.gateway.clone();
                        state.queues.entry(gateway).or_default().push_back((requeue_task, true));
                        drop(state);
                        requeue_notify.notify_waiters();
                    });
                    return Ok(Some(Delivery::new(task, redelivered, Box::new(acknowledger), Some(on_drop))));
                }
            }
            notified.await;
        }
    }

    async fn queued(&self, gateway: &str) -> Result<u64, QueueError> {
        Ok(self.depth(gateway) as u64)
    }

    async fn take_dead_letters(&self, gateway: &str, max: usize) -> Result<Vec<Delivery>, QueueError> {
        let mut state = lock(&self.state);
        let mut taken = Vec::new();
        let mut index = 0;
        while index < state.dead_letters.len() && taken.len() < max {
            if state.dead_letters[index].gateway == gateway {
                taken.push(state.dead_letters.remove(index));
            } else {
                index += 1;
            }
        }
        drop(state);
        Ok(taken
            .into_iter()
            .map(|task| {
                let back = Arc::clone(&self.state);
                let again = task.clone();
                let on_drop: Box<dyn FnOnce() + Send> = Box::new(move || lock(&back).dead_letters.push(again));
                let acknowledger = DeadLetterAcknowledger { state: Arc::clone(&self.state), task: task.clone() };
                Delivery::new(task, true, Box::new(acknowledger), Some(on_drop))
            })
            .collect())
    }

    async fn shut_down(&self) {
        lock(&self.state).shut_down = true;
        self.notify.notify_waiters();
    }
}

struct GateRun {
    unfinished_parents: Vec<u32>,
    done: Vec<bool>,
    outstanding: u64,
}

/// In-degree counters in memory.
#[derive(Clone, Default)]
pub struct MemoryGate {
    runs: Arc<Mutex<HashMap<RunId, GateRun>>>,
}

impl std::fmt::Debug for MemoryGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryGate")
    }
}

impl MemoryGate {
    pub fn new() -> MemoryGate {
        MemoryGate::default()
    }
}

#[async_trait]
impl DependencyGate for MemoryGate {
    async fn load(&self, run_id: &RunId, unfinished_parents: &[u32], done: &[bool]) -> Result<(), QueueError> {
        let outstanding = done.iter().filter(|done| !**done).count() as u64;
        let run = GateRun { unfinished_parents: unfinished_parents.to_vec(), done: done.to_vec(), outstanding };
        lock(&self.runs).insert(run_id.clone(), run);
        Ok(())
    }

    async fn complete(&self, run_id: &RunId, task: u32, children: &[u32]) -> Result<Completion, QueueError> {
        let mut runs = lock(&self.runs);
        let run = runs.get_mut(run_id).ok_or_else(|| QueueError::UnknownRun(run_id.to_string()))?;
        let index = task as usize;
        if index >= run.done.len() {
            return Err(QueueError::Backend(format!("task {task} is not in run {run_id}")));
        }
        let newly_done = !run.done[index];
        if newly_done {
            run.done[index] = true;
            run.outstanding -= 1;
            for child in children {
                if let Some(count) = run.unfinished_parents.get_mut(*child as usize) {
                    *count = count.saturating_sub(1);
                }
            }
        }
        let ready = children
            .iter()
            .copied()
            .filter(|child| {
                let child = *child as usize;
                run.unfinished_parents.get(child) == Some(&0) && run.done.get(child) == Some(&false)
            })
            .collect();
        Ok(Completion { newly_done, ready, run_complete: run.outstanding == 0 })
    }

    async fn skip(&self, run_id: &RunId, tasks: &[u32]) -> Result<bool, QueueError> {
        let mut runs = lock(&self.runs);
        let run = runs.get_mut(run_id).ok_or_else(|| QueueError::UnknownRun(run_id.to_string()))?;
        for task in tasks {
            if let Some(done) = run.done.get_mut(*task as usize)
                && !*done
            {
                *done = true;
                run.outstanding -= 1;
            }
        }
        Ok(run.outstanding == 0)
    }

    async fn outstanding(&self, run_id: &RunId) -> Result<Option<u64>, QueueError> {
        Ok(lock(&self.runs).get(run_id).map(|run| run.outstanding))
    }

    async fn clear(&self, run_id: &RunId) -> Result<(), QueueError> {
        lock(&self.runs).remove(run_id);
        Ok(())
    }
}

/// Acknowledges nothing: an in-process settled run is simply forgotten once acked.
struct NoAcknowledger;

#[async_trait]
impl Acknowledger for NoAcknowledger {
    async fn ack(&self) -> Result<(), QueueError> {
        Ok(())
    }

    async fn requeue(&self) -> Result<(), QueueError> {
        Ok(())
    }

    async fn reject(&self) -> Result<(), QueueError> {
        Ok(())
    }
}

/// Settled runs waiting for a promoter, and whether the bus is shut down.
#[derive(Default)]
struct SettledRuns {
    runs: VecDeque<(RunId, PlanId)>,
    shut_down: bool,
}

/// A broadcast channel for events and a FIFO of settled runs for the promoter.
#[derive(Clone)]
pub struct MemoryEvents {
    sender: broadcast::Sender<RunEvent>,
    settled: Arc<Mutex<SettledRuns>>,
    notify: Arc<Notify>,
}

impl std::fmt::Debug for MemoryEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryEvents")
    }
}

impl Default for MemoryEvents {
    fn default() -> Self {
        MemoryEvents::new()
    }
}

impl MemoryEvents {
    pub fn new() -> MemoryEvents {
        let (sender, _) = broadcast::channel(1 << 16);
        MemoryEvents { sender, settled: Arc::default(), notify: Arc::default() }
    }
}

#[async_trait]
impl EventBus for MemoryEvents {
    async fn publish(&self, event: RunEvent) -> Result<(), QueueError> {
        if let RunEvent::RunSettled { run_id, plan_id } = &event {
            lock(&self.settled).runs.push_back((run_id.clone(), plan_id.clone()));
            self.notify.notify_waiters();
        }
        // No subscriber is not an error.
        let _ = self.sender.send(event);
        Ok(())
    }

    async fn subscribe(&self) -> Result<EventStream, QueueError> {
        Ok(EventStream::new(self.sender.subscribe()))
    }

    async fn next_settled(&self) -> Result<Option<SettledRun>, QueueError> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut settled = lock(&self.settled);
                if settled.shut_down {
                    return Ok(None);
                }
                if let Some((run_id, plan_id)) = settled.runs.pop_front() {
                    // Dropped unacked: back to the front of the line.
                    let state = Arc::clone(&self.settled);
                    let notify = Arc::clone(&self.notify);
                    let again = (run_id.clone(), plan_id.clone());
                    let on_drop: Box<dyn FnOnce() + Send> = Box::new(move || {
                        lock(&state).runs.push_front(again);
                        notify.notify_waiters();
                    });
                    return Ok(Some(SettledRun::new(run_id, plan_id, Box::new(NoAcknowledger), Some(on_drop))));
                }
            }
            notified.await;
        }
    }

    async fn shut_down(&self) {
        lock(&self.settled).shut_down = true;
        self.notify.notify_waiters();
    }
}
