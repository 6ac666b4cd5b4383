//! Probes and metrics over HTTP: `/healthz` (the process's event loop turns), `/readyz` (every
//! dependency answered within its grace) and `/metrics` (Prometheus text format).
//!
//! Readiness is computed from background checks, one loop per dependency, so that a probe is
//! answered at once and a slow dependency never stalls the kubelet. A dependency is healthy
//! when its last successful check is younger than its grace; reasons name the dependency and
//! how long it has been failing, never an error text (which may hold a host or user name).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tokio_util::sync::CancellationToken;

use crate::metrics::{DURATION_BUCKETS, READY, describe};

/// Installs the process's Prometheus recorder (once) and describes every metric.
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), DURATION_BUCKETS)
        .map_err(|error| format!("metric buckets: {error}"))?
        // A gauge nobody sets for ten minutes (an ended run's outstanding tasks) is dropped,
        // so that the series of past runs do not pile up.
        .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
        .install_recorder()
        .map_err(|error| format!("installing the metrics recorder: {error}"))?;
    describe();
    Ok(handle)
}

struct Dependency {
    name: &'static str,
    grace: Duration,
    /// When the last check succeeded (`None`: never yet).
    last_ok: Mutex<Option<Instant>>,
}

struct Inner {
    /// Set by the role once every check it needs is registered: before, it is not ready.
    started: std::sync::atomic::AtomicBool,
    dependencies: Mutex<Vec<Arc<Dependency>>>,
    /// Bumped by a ticker task every `TICK`: a stalled runtime stops bumping it.
    last_tick: Mutex<Instant>,
    stop: CancellationToken,
}

/// How long a gauge may go unset before it leaves `/metrics`.
const GAUGE_IDLE: Duration = Duration::from_secs(600);

/// How often the liveness ticker turns, and how stale it may be before `/healthz` fails.
const TICK: Duration = Duration::from_secs(1);
const STALL: Duration = Duration::from_secs(15);
/// How long one dependency check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The process's health: its dependencies' checks and its liveness ticker. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

impl Health {
    /// Starts the liveness ticker (on the current runtime); stopped with `stop`.
    pub fn start(stop: CancellationToken) -> Health {
        let inner = Arc::new(Inner {
            started: std::sync::atomic::AtomicBool::new(false),
            dependencies: Mutex::new(Vec::new()),
            last_tick: Mutex::new(Instant::now()),
            stop,
        });
        let ticking = Arc::clone(&inner);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(TICK);
            loop {
                tokio::select! {
                    _ = ticking.stop.cancelled() => return,
                    _ = ticker.tick() => *lock(&ticking.last_tick) = Instant::now(),
                }
            }
        });
        Health { inner }
    }

    /// Checks `name` every `every` with `check`; the process is not ready while the last
    /// success is older than `grace` (or there was none yet).
    pub fn watch<F, Fut>(&self, name: &'static str, every: Duration, grace: Duration, mut check: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let dependency = Arc::new(Dependency { name, grace, last_ok: Mutex::new(None) });
        lock(&self.inner.dependencies).push(Arc::clone(&dependency));
        let stop = self.inner.stop.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                    Ok(Ok(())) => {
                        *lock(&dependency.last_ok) = Some(Instant::now());
                        if failing {
                            tracing::info!(dependency = name, "reachable again");
                        }
                        failing = false;
                    }
                    Ok(Err(error)) => {
                        if !failing {
                            tracing::warn!(dependency = name, error = %error, "readiness check failed");
                        }
                        failing = true;
                    }
                    Err(_) => {
                        if !failing {
                            tracing::warn!(dependency = name, "readiness check timed out");
                        }
                        failing = true;
                    }
                }
            }
        });
    }

    /// The role has registered every check it needs (until then it is not ready).
    pub fn started(&self) {
        self.inner.started.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// `Ok` when the role has started and every dependency is healthy, else one reason per
    /// unhealthy one.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let now = Instant::now();
        let starting = (!self.inner.started.load(std::sync::atomic::Ordering::SeqCst))
            .then(|| "starting: connecting to its dependencies".to_string());
        let reasons: Vec<String> = starting
            .into_iter()
            .chain(lock(&self.inner.dependencies).iter().filter_map(|dependency| match *lock(&dependency.last_ok) {
                None => Some(format!("{}: not reached yet", dependency.name)),
                Some(at) if now.duration_since(at) > dependency.grace => Some(format!(
                    "{}: unreachable for {} s (grace {} s)",
                    dependency.name,
                    now.duration_since(at).as_secs(),
                    dependency.grace.as_secs()
                )),
                Some(_) => None,
            }))
            .collect();
        metrics::gauge!(READY).set(if reasons.is_empty() { 1.0 } else { 0.0 });
        if reasons.is_empty() { Ok(()) } else { Err(reasons) }
    }

    /// `Ok` while the runtime turns (the ticker ran within `STALL`).
    pub fn liveness(&self) -> Result<(), String> {
        let since = lock(&self.inner.last_tick).elapsed();
        if since > STALL { Err(format!("the event loop has not turned for {} s", since.as_secs())) } else { Ok(()) }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Clone)]
struct Endpoint {
    health: Health,
    metrics: PrometheusHandle,
}

/// Binds `address` (so that a taken port fails the role at start) and serves the probes and
/// metrics until `stop`.
pub async fn serve(
    address: SocketAddr,
    health: Health,
    metrics: PrometheusHandle,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let listener =
        tokio::net::TcpListener::bind(address).await.map_err(|error| format!("--listen {address}: {error}"))?;
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Endpoint { health, metrics });
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await;
        if let Err(error) = served {
            tracing::warn!(error = %error, "the probe endpoint stopped");
        }
    }))
}

async fn healthz(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    match endpoint.health.liveness() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

async fn readyz(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    match endpoint.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reasons) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{}\n", reasons.join("\n"))),
    }
}

async fn metrics_text(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    // Refreshes the readiness gauge before the scrape reads it.
    let _ = endpoint.health.readiness();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], endpoint.metrics.render())
}
