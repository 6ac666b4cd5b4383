//! Embedded mode: the coordinator, one worker pool per gateway and the promoter as tasks of this
//! process, over the in-process queue, gate and event bus.

use std::collections::BTreeSet;
use std::sync::Arc;

use sluice_state::host::SystemClock;

use anyhow::{Result, anyhow};
use sluice_coordinator::{ApplyConfig, ApplyOutcome, CoordinatorDeps};
use sluice_core::names::PlanId;
use sluice_promoter::PromoterDeps;
use sluice_promoter::notify::StandardNotifier;
use sluice_queue::memory::{MemoryEvents, MemoryGate, MemoryQueue};
use sluice_queue::{DependencyGate, EventBus, TaskQueue};
use sluice_state::StateStore;
use sluice_worker::retry::RetryPolicy;
use sluice_worker::{WorkerConfig, WorkerDeps};
use tokio_util::sync::CancellationToken;

use crate::context::ProjectWarehouses;
use crate::progress::ConsoleProgress;

pub struct EmbeddedApply {
    pub workers: usize,
    pub user: String,
    pub retry: RetryPolicy,
}

/// Applies a stored plan with every role in this process.
pub async fn apply(
    settings: &EmbeddedApply,
    state: Arc<dyn StateStore>,
    warehouses: Arc<ProjectWarehouses>,
    plan_id: &PlanId,
) -> Result<ApplyOutcome> {
    let queue: Arc<dyn TaskQueue> = Arc::new(MemoryQueue::new());
    let gate: Arc<dyn DependencyGate> = Arc::new(sluice_queue::metered::MeteredGate::new(Arc::new(MemoryGate::new())));
    let events: Arc<dyn EventBus> = Arc::new(MemoryEvents::new());
    let roles_shutdown = CancellationToken::new();
    let interrupted = CancellationToken::new();

    let gateways: BTreeSet<String> = match state.get_plan(plan_id).await? {
        Some(plan) => plan.snapshots.iter().map(|planned| planned.snapshot.gateway.clone()).collect(),
        None => BTreeSet::new(),
    };
    let mut roles = tokio::task::JoinSet::new();
    for gateway in gateways {
        let config = WorkerConfig { retry: settings.retry, ..WorkerConfig::new(&gateway, settings.workers) };
        let deps = WorkerDeps {
            state: Arc::clone(&state),
            queue: Arc::clone(&queue),
            gate: Arc::clone(&gate),
            events: Arc::clone(&events),
            warehouses: warehouses.clone(),
        };
        let shutdown = roles_shutdown.clone();
        roles
            .spawn(async move { sluice_worker::run(config, deps, shutdown).await.map_err(|e| anyhow!("worker: {e}")) });
    }
    let promoter = PromoterDeps {
        state: Arc::clone(&state),
        events: Arc::clone(&events),
        warehouses: warehouses.clone(),
        notifier: Arc::new(StandardNotifier),
        clock: Arc::new(SystemClock),
    };
    let promoter_shutdown = roles_shutdown.clone();
    roles.spawn(async move {
        sluice_promoter::run(promoter, promoter_shutdown).await.map_err(|e| anyhow!("promoter: {e}"))
    });

    let ctrl_c = interrupted.clone();
    let signal_watch = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            ctrl_c.cancel();
        }
    });

    let deps = CoordinatorDeps {
        state,
        queue: Arc::clone(&queue),
        gate,
        events: Arc::clone(&events),
        gateways: warehouses,
        clock: Arc::new(SystemClock),
    };
    let config = ApplyConfig { user: settings.user.clone(), ..ApplyConfig::default() };
    let outcome =
        sluice_coordinator::apply(plan_id, &config, &deps, Arc::new(ConsoleProgress::new()), interrupted).await;

    signal_watch.abort();
    roles_shutdown.cancel();
    queue.shut_down().await;
    events.shut_down().await;
    while let Some(joined) = roles.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(error = %error, "a role stopped with an error"),
            Err(error) => tracing::warn!(error = %error, "a role panicked"),
        }
    }
    Ok(outcome?)
}
