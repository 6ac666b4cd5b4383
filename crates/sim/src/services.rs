//! The dependency gate and the event bus in the simulation: the in-process ones behind latency,
//! failed calls, lost keys (Redis flushed or restarted, for one run or all) and duplicated
//! `RunSettled` messages.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sluice_queue::memory::{MemoryEvents, MemoryGate};
use sluice_queue::{Completion, DependencyGate, EventBus, EventStream, QueueError, RunEvent, RunId, SettledRun};

use crate::world::Shared;

#[derive(Clone)]
pub struct SimGate {
    world: Shared,
    inner: MemoryGate,
    /// Runs loaded at least once (what "lose every key" forgets).
    known: Arc<Mutex<BTreeSet<RunId>>>,
}

impl SimGate {
    pub fn new(world: Shared) -> SimGate {
        SimGate { world, inner: MemoryGate::new(), known: Arc::default() }
    }

    /// Forgets one run's keys, or every run's.
    pub async fn lose(&self, run: Option<&RunId>) {
        let runs: Vec<RunId> = match run {
            Some(run) => vec![run.clone()],
            None => self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect(),
        };
        for run in runs {
            self.world.note(&format!("gate loses the keys of {run}"));
            let _ = self.inner.clear(&run).await;
        }
    }

    async fn before(&self, run: &RunId, name: &str) -> Result<(), QueueError> {
        self.world.pause().await;
        let (fail, lose_run, lose_all) = {
            let mut world = self.world.lock();
            let rates = world.faults.clone();
            world.note(&format!("gate {name} {run}"));
            (world.chance(rates.gate_fails), world.chance(rates.gate_loses_run), world.chance(rates.gate_loses_all))
        };
        if lose_all {
            self.lose(None).await;
        } else if lose_run {
            self.lose(Some(run)).await;
        }
        if fail {
            self.world.note("gate call failed");
            return Err(QueueError::Backend("simulated: redis connection lost".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl DependencyGate for SimGate {
    async fn load(&self, run_id: &RunId, unfinished_parents: &[u32], done: &[bool]) -> Result<(), QueueError> {
        self.before(run_id, "load").await?;
        self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(run_id.clone());
        self.inner.load(run_id, unfinished_parents, done).await
    }

    async fn complete(&self, run_id: &RunId, task: u32, children: &[u32]) -> Result<Completion, QueueError> {
        self.before(run_id, "complete").await?;
        let outcome = self.inner.complete(run_id, task, children).await;
        self.world.pause().await;
        outcome
    }

    async fn skip(&self, run_id: &RunId, tasks: &[u32]) -> Result<bool, QueueError> {
        self.before(run_id, "skip").await?;
        let outcome = self.inner.skip(run_id, tasks).await;
        self.world.pause().await;
        outcome
    }

    async fn outstanding(&self, run_id: &RunId) -> Result<Option<u64>, QueueError> {
        self.before(run_id, "outstanding").await?;
        self.inner.outstanding(run_id).await
    }

    async fn clear(&self, run_id: &RunId) -> Result<(), QueueError> {
        self.before(run_id, "clear").await?;
        self.inner.clear(run_id).await
    }
}

#[derive(Clone)]
pub struct SimEvents {
    world: Shared,
    inner: MemoryEvents,
}

impl SimEvents {
    pub fn new(world: Shared) -> SimEvents {
        SimEvents { world, inner: MemoryEvents::new() }
    }
}

#[async_trait]
impl EventBus for SimEvents {
    async fn publish(&self, event: RunEvent) -> Result<(), QueueError> {
        self.world.pause().await;
        let twice = matches!(event, RunEvent::RunSettled { .. }) && {
            let mut world = self.world.lock();
            let rate = world.faults.duplicate_settled;
            world.chance(rate)
        };
        if let RunEvent::RunSettled { run_id, .. } | RunEvent::RunFinished { run_id, .. } = &event {
            self.world.note(&format!("event {event:?} for {run_id}{}", if twice { " (twice)" } else { "" }));
        }
        if twice {
            self.inner.publish(event.clone()).await?;
        }
        self.inner.publish(event).await
    }

    async fn subscribe(&self) -> Result<EventStream, QueueError> {
        self.inner.subscribe().await
    }

    async fn next_settled(&self) -> Result<Option<SettledRun>, QueueError> {
        self.inner.next_settled().await
    }

    async fn shut_down(&self) {
        self.inner.shut_down().await;
    }
}
