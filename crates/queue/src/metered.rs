//! A dependency gate that counts its calls: `sluice_gate_operations_total{operation, outcome}`
//! for every role that holds it, whatever gate it wraps.

use std::sync::Arc;

use async_trait::async_trait;
use sluice_core::names::RunId;
use sluice_ops::metrics::GATE_OPERATIONS;

use crate::{Completion, DependencyGate, QueueError};

/// Wraps a gate; every call is counted with its operation and outcome.
pub struct MeteredGate {
    inner: Arc<dyn DependencyGate>,
}

impl MeteredGate {
    pub fn new(inner: Arc<dyn DependencyGate>) -> MeteredGate {
        MeteredGate { inner }
    }
}

fn counted<T>(operation: &'static str, result: Result<T, QueueError>) -> Result<T, QueueError> {
    let outcome = match &result {
        Ok(_) => "ok",
        Err(QueueError::UnknownRun(_)) => "unknown_run",
        Err(_) => "error",
    };
    metrics::counter!(GATE_OPERATIONS, "operation" => operation, "outcome" => outcome).increment(1);
    result
}

#[async_trait]
impl DependencyGate for MeteredGate {
    async fn load(&self, run_id: &RunId, unfinished_parents: &[u32], done: &[bool]) -> Result<(), QueueError> {
        counted("load", self.inner.load(run_id, unfinished_parents, done).await)
    }

    async fn complete(&self, run_id: &RunId, task: u32, children: &[u32]) -> Result<Completion, QueueError> {
        counted("complete", self.inner.complete(run_id, task, children).await)
    }

    async fn skip(&self, run_id: &RunId, tasks: &[u32]) -> Result<bool, QueueError> {
        counted("skip", self.inner.skip(run_id, tasks).await)
    }

    async fn outstanding(&self, run_id: &RunId) -> Result<Option<u64>, QueueError> {
        counted("outstanding", self.inner.outstanding(run_id).await)
    }

    async fn clear(&self, run_id: &RunId) -> Result<(), QueueError> {
        counted("clear", self.inner.clear(run_id).await)
    }
}
