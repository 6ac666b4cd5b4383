//! Distributed mode: each role its own process, meeting on RabbitMQ (task queues, run events),
//! Redis (dependency counters) and the state store (PostgreSQL). Chosen by `--amqp-url` /
//! `SLUICE_AMQP_URL`; `--redis-url` / `SLUICE_REDIS_URL` is then required.

use std::sync::Arc;

use sluice_state::host::SystemClock;
use std::time::Duration;

use anyhow::{Result, anyhow};
use sluice_coordinator::{ApplyConfig, ApplyOutcome, CoordinatorDeps, OrphanReconciler};
use sluice_core::config::redact_url;
use sluice_core::names::PlanId;
use sluice_promoter::PromoterDeps;
use sluice_promoter::notify::StandardNotifier;
use sluice_queue::rabbitmq::{RabbitBroker, RabbitConfig};
use sluice_queue::redis_gate::RedisGate;
use sluice_state::StateStore;
use sluice_worker::{WorkerConfig, WorkerDeps};
use tokio_util::sync::CancellationToken;

use crate::context::ProjectWarehouses;
use crate::progress::ConsoleProgress;

/// How long a run's dependency counters live in Redis after they were loaded. A run that
/// outlives it has its counters rebuilt from state by its coordinator.
const COUNTER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where the distributed services are. The URLs may hold passwords: never printed.
#[derive(Clone)]
pub struct Services {
    pub amqp_url: String,
    pub redis_url: String,
    /// Names every queue, exchange (`<prefix>.tasks.<gateway>`, …) and Redis key (`<prefix>:…`).
    pub prefix: String,
    /// How long a coordinator's environment lease lasts without renewal: a run whose lease
    /// expired has no following coordinator, and the promoter reconciles it.
    pub lease_ttl_seconds: i64,
}

/// How the promoter process reconciles runs no coordinator follows.
#[derive(Clone, Copy, Debug)]
pub struct Reconciling {
    pub every: Duration,
    pub stall_after: Duration,
}

impl Services {
    /// The services when an AMQP URL is given (distributed mode), `None` for embedded mode.
    pub fn from_flags(
        amqp_url: Option<&str>,
        redis_url: Option<&str>,
        prefix: &str,
        lease_ttl_seconds: u64,
    ) -> Result<Option<Services>> {
        let Some(amqp_url) = amqp_url else {
            if redis_url.is_some() {
                return Err(anyhow!(
                    "--redis-url / SLUICE_REDIS_URL is set but --amqp-url / SLUICE_AMQP_URL is not: distributed mode needs both"
                ));
            }
            return Ok(None);
        };
        let Some(redis_url) = redis_url else {
            return Err(anyhow!(
                "--amqp-url / SLUICE_AMQP_URL is set but --redis-url / SLUICE_REDIS_URL is not: distributed mode needs both"
            ));
        };
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            return Err(anyhow!("--queue-prefix {prefix:?}: expected letters, digits, '-', '_' or '.'"));
        }
        if lease_ttl_seconds < 3 {
            return Err(anyhow!(
                "--lease-ttl {lease_ttl_seconds}: expected at least 3 seconds (it is renewed every third)"
            ));
        }
        Ok(Some(Services {
            amqp_url: amqp_url.to_string(),
            redis_url: redis_url.to_string(),
            prefix: prefix.to_string(),
            lease_ttl_seconds: i64::try_from(lease_ttl_seconds).unwrap_or(i64::MAX),
        }))
    }

    async fn broker(&self, prefetch: usize) -> Result<Arc<RabbitBroker>> {
        let mut config = RabbitConfig::new(&self.amqp_url);
        config.prefix = self.prefix.clone();
        config.prefetch = u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX);
        let broker = RabbitBroker::connect(config).await.map_err(|error| anyhow!("{error}"))?;
        Ok(Arc::new(broker))
    }

    async fn gate(&self) -> Result<Arc<RedisGate>> {
        let gate = RedisGate::connect(&self.redis_url, &self.prefix, COUNTER_TTL)
            .await
            .map_err(|error| anyhow!("while connecting to Redis at {}: {error}", redact_url(&self.redis_url)))?;
        Ok(Arc::new(gate))
    }
}

/// A token cancelled on SIGTERM (a Kubernetes scale-down) or SIGINT.
fn stop_signal() -> Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: stopping"),
        }
        cancel.cancel();
    });
    Ok(token)
}

pub struct DistributedApply {
    pub user: String,
    pub detach: bool,
}

/// The coordinator: validate, push state, load counters, publish the ready tasks, then follow
/// the run until the promoter finishes it (or return at once with `detach`).
pub async fn apply(
    services: &Services,
    settings: &DistributedApply,
    state: Arc<dyn StateStore>,
    warehouses: Arc<ProjectWarehouses>,
    plan_id: &PlanId,
) -> Result<ApplyOutcome> {
    let broker = services.broker(1).await?;
    let gate = services.gate().await?;
    let deps = CoordinatorDeps {
        state,
        queue: Arc::clone(&broker) as _,
        gate,
        events: Arc::clone(&broker) as _,
        gateways: warehouses,
        clock: Arc::new(SystemClock),
    };
    let config = ApplyConfig {
        user: settings.user.clone(),
        detach: settings.detach,
        interrupt_aborts: false,
        lease_ttl_seconds: services.lease_ttl_seconds,
        ..ApplyConfig::default()
    };
    let interrupted = CancellationToken::new();
    let ctrl_c = interrupted.clone();
    let watch = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            ctrl_c.cancel();
        }
    });
    let outcome =
        sluice_coordinator::apply(plan_id, &config, &deps, Arc::new(ConsoleProgress::new()), interrupted).await;
    watch.abort();
    broker.close().await;
    Ok(outcome?)
}

/// A worker: consumes one gateway's queue until SIGTERM, then finishes the tasks in hand.
pub async fn worker(
    services: &Services,
    state: Arc<dyn StateStore>,
    warehouses: Arc<ProjectWarehouses>,
    gateway: &str,
    concurrency: usize,
) -> Result<()> {
    if !warehouses.gateways.contains_key(gateway) {
        let known: Vec<&str> = warehouses.gateways.keys().map(String::as_str).collect();
        return Err(anyhow!("--gateway {gateway}: config.yaml has no such gateway (it has {})", known.join(", ")));
    }
    let stop = stop_signal()?;
    // Twice the slots: a slot takes its next task while its last one is being settled (acked).
    let broker = services.broker(concurrency * 2).await?;
    let gate = services.gate().await?;
    let deps =
        WorkerDeps { state, queue: Arc::clone(&broker) as _, gate, events: Arc::clone(&broker) as _, warehouses };
    eprintln!("sluice worker: consuming {} with {concurrency} slots", broker.config().task_queue(gateway));
    let result = sluice_worker::run(WorkerConfig::new(gateway, concurrency), deps, stop).await;
    sluice_queue::TaskQueue::shut_down(broker.as_ref()).await;
    broker.close().await;
    result.map_err(|error| anyhow!("worker: {error}"))
}

/// The promoter: finalizes every settled run until SIGTERM, and reconciles the runs no
/// coordinator follows.
pub async fn promoter(
    services: &Services,
    state: Arc<dyn StateStore>,
    warehouses: Arc<ProjectWarehouses>,
    reconciling: Reconciling,
) -> Result<()> {
    let stop = stop_signal()?;
    let broker = services.broker(1).await?;
    let gate = services.gate().await?;
    let coordinator = CoordinatorDeps {
        state: Arc::clone(&state),
        queue: Arc::clone(&broker) as _,
        gate,
        events: Arc::clone(&broker) as _,
        gateways: Arc::clone(&warehouses) as _,
        clock: Arc::new(SystemClock),
    };
    let deps = PromoterDeps {
        state,
        events: Arc::clone(&broker) as _,
        warehouses,
        notifier: Arc::new(StandardNotifier),
        clock: Arc::new(SystemClock),
    };
    eprintln!("sluice promoter: consuming {}", broker.config().settled_queue());
    let reconciler_stop = stop.clone();
    let reconciler = tokio::spawn(async move {
        let mut reconciler = OrphanReconciler::new(reconciling.stall_after);
        let mut ticker = tokio::time::interval(reconciling.every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = reconciler_stop.cancelled() => return,
                _ = ticker.tick() => {
                    // A lost service is retried on the next tick.
                    if let Err(error) = reconciler.pass(&coordinator).await {
                        tracing::warn!(error = %error, "reconciling runs no coordinator follows failed; retrying");
                    }
                }
            }
        }
    });
    let result = sluice_promoter::run(deps, stop).await;
    reconciler.abort();
    sluice_queue::EventBus::shut_down(broker.as_ref()).await;
    broker.close().await;
    result.map_err(|error| anyhow!("promoter: {error}"))
}
