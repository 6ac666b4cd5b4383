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
use sluice_ops::health::Health;
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

    /// A role's broker (with `prefetch`) and gate, its readiness checks registered on `health`
    /// (with a worker's warehouse: gateway and grace) and the role then marked started.
    async fn connect_role(
        &self,
        prefetch: usize,
        health: Option<&Health>,
        state: &Arc<dyn StateStore>,
        warehouse: Option<(&Arc<ProjectWarehouses>, &str, Duration)>,
    ) -> Result<(Arc<RabbitBroker>, Arc<RedisGate>)> {
        let broker = self.broker(prefetch).await?;
        let gate = self.gate().await?;
        if let Some(health) = health {
            watch_services(health, &broker, &gate, state);
            if let Some((warehouses, gateway, grace)) = warehouse {
                watch_warehouse(health, warehouses, gateway, grace);
            }
            health.started();
        }
        Ok((broker, gate))
    }

    async fn gate(&self) -> Result<Arc<RedisGate>> {
        let gate = RedisGate::connect(&self.redis_url, &self.prefix, COUNTER_TTL)
            .await
            .map_err(|error| anyhow!("while connecting to Redis at {}: {error}", redact_url(&self.redis_url)))?;
        Ok(Arc::new(gate))
    }
}

/// The gate the role's logic calls: the Redis gate, its calls counted.
fn metered(gate: &Arc<RedisGate>) -> Arc<dyn sluice_queue::DependencyGate> {
    Arc::new(sluice_queue::metered::MeteredGate::new(Arc::clone(gate) as _))
}

/// How often a role checks that its broker, gate, state store (and a worker its warehouse)
/// answer, and how long one may stay silent before the role is not ready.
const CHECK_EVERY: Duration = Duration::from_secs(2);
const SERVICE_GRACE: Duration = Duration::from_secs(6);
/// How long a worker's warehouse ping may take before its connection is replaced.
const WAREHOUSE_PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Registers the readiness checks every distributed role shares: the broker, the gate and the
/// state store.
fn watch_services(health: &Health, broker: &Arc<RabbitBroker>, gate: &Arc<RedisGate>, state: &Arc<dyn StateStore>) {
    let broker = Arc::clone(broker);
    health.watch("rabbitmq", CHECK_EVERY, SERVICE_GRACE, move || {
        let broker = Arc::clone(&broker);
        async move { broker.check().await.map_err(|error| error.to_string()) }
    });
    let gate = Arc::clone(gate);
    health.watch("redis", CHECK_EVERY, SERVICE_GRACE, move || {
        let gate = Arc::clone(&gate);
        async move { gate.check().await.map_err(|error| error.to_string()) }
    });
    watch_state(health, state);
}

/// Registers the state store's readiness check.
pub fn watch_state(health: &Health, state: &Arc<dyn StateStore>) {
    let state = Arc::clone(state);
    health.watch("state", CHECK_EVERY, SERVICE_GRACE, move || {
        let state = Arc::clone(&state);
        async move { state.list_environments().await.map(|_| ()).map_err(|error| error.to_string()) }
    });
}

/// A worker's warehouse check: one connection kept for it, reopened after a failure.
fn watch_warehouse(health: &Health, warehouses: &Arc<ProjectWarehouses>, gateway: &str, grace: Duration) {
    use sluice_engine::WarehouseFactory;
    let connection: Arc<tokio::sync::Mutex<Option<Box<dyn sluice_engine::Warehouse>>>> = Arc::default();
    let (warehouses, gateway) = (Arc::clone(warehouses), gateway.to_string());
    health.watch("warehouse", CHECK_EVERY, grace, move || {
        let (connection, warehouses, gateway) = (Arc::clone(&connection), Arc::clone(&warehouses), gateway.clone());
        async move {
            let mut connection = connection.lock().await;
            if connection.is_none() {
                *connection = Some(warehouses.connect(&gateway).await.map_err(|error| error.to_string())?);
            }
            // Bounded here (below the check's own timeout) so that a connection that stopped
            // answering is dropped and the next check opens a new one.
            let answer = match connection.as_mut() {
                Some(warehouse) => match tokio::time::timeout(WAREHOUSE_PING_TIMEOUT, warehouse.ping()).await {
                    Ok(answer) => answer.map_err(|error| error.to_string()),
                    Err(_) => Err("no answer to a ping".to_string()),
                },
                None => Ok(()),
            };
            if answer.is_err() {
                *connection = None;
            }
            answer
        }
    });
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
    pub health: Option<Health>,
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
    let (broker, gate) = services.connect_role(1, settings.health.as_ref(), &state, None).await?;
    let deps = CoordinatorDeps {
        state,
        queue: Arc::clone(&broker) as _,
        gate: metered(&gate),
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
    // SIGTERM or Ctrl-C: stop following and leave the run as it is (the promoter adopts it once
    // the lease lapses); `sluice abort` is what stops a run.
    let interrupted = stop_signal()?;
    let outcome =
        sluice_coordinator::apply(plan_id, &config, &deps, Arc::new(ConsoleProgress::new()), interrupted).await;
    broker.close().await;
    Ok(outcome?)
}

/// How a worker runs, beyond its gateway.
pub struct WorkerSettings {
    pub concurrency: usize,
    /// After SIGTERM, how long the tasks in hand may run before they are cancelled and returned.
    pub stop_deadline: Option<Duration>,
    /// How long the warehouse may be unreachable before the worker is not ready.
    pub warehouse_grace: Duration,
    pub health: Option<Health>,
}

/// A worker: consumes one gateway's queue until SIGTERM, then finishes the tasks in hand (or,
/// past the stop deadline, cancels them and returns them to the queue).
pub async fn worker(
    services: &Services,
    state: Arc<dyn StateStore>,
    warehouses: Arc<ProjectWarehouses>,
    gateway: &str,
    settings: WorkerSettings,
) -> Result<()> {
    let concurrency = settings.concurrency;
    if !warehouses.gateways.contains_key(gateway) {
        let known: Vec<&str> = warehouses.gateways.keys().map(String::as_str).collect();
        return Err(anyhow!("--gateway {gateway}: config.yaml has no such gateway (it has {})", known.join(", ")));
    }
    let stop = stop_signal()?;
    // Twice the slots: a slot takes its next task while its last one is being settled (acked).
    let warehouse = Some((&warehouses, gateway, settings.warehouse_grace));
    let (broker, gate) = services.connect_role(concurrency * 2, settings.health.as_ref(), &state, warehouse).await?;
    let deps = WorkerDeps {
        state,
        queue: Arc::clone(&broker) as _,
        gate: metered(&gate),
        events: Arc::clone(&broker) as _,
        warehouses,
    };
    crate::console::say(&format!(
        "sluice worker: consuming {} with {concurrency} slots",
        broker.config().task_queue(gateway)
    ));
    let config = WorkerConfig { stop_deadline: settings.stop_deadline, ..WorkerConfig::new(gateway, concurrency) };
    let result = sluice_worker::run(config, deps, stop).await;
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
    health: Option<Health>,
) -> Result<()> {
    let stop = stop_signal()?;
    let (broker, gate) = services.connect_role(1, health.as_ref(), &state, None).await?;
    let coordinator = CoordinatorDeps {
        state: Arc::clone(&state),
        queue: Arc::clone(&broker) as _,
        gate: metered(&gate),
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
    crate::console::say(&format!("sluice promoter: consuming {}", broker.config().settled_queue()));
    let reconciler_stop = stop.clone();
    let reconciler = tokio::spawn(async move {
        let mut reconciler = OrphanReconciler::new(reconciling.stall_after);
        let mut exported = sluice_coordinator::ExportedRuns::new();
        let mut ticker = tokio::time::interval(reconciling.every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = reconciler_stop.cancelled() => return,
                _ = ticker.tick() => {
                    if let Err(error) = sluice_coordinator::export_outstanding(&coordinator, &mut exported).await {
                        tracing::warn!(error = %error, "reading the runs' outstanding tasks failed; retrying");
                    }
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
