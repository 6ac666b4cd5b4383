//! What the roles take from their host: the time they write into state (lease expiry, run start
//! and end) — the system clock in production, a virtual one in the protocol simulation — and
//! threads for CPU-heavy work (building a task graph).

use sluice_core::interval::Timestamp;

/// Wall-clock time in whole seconds since the epoch, UTC.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The machine's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Timestamp(seconds as i64)
    }
}

/// Runs CPU-heavy work off the async executor (`spawn_blocking`), except on a current-thread
/// runtime — the protocol simulation's — where it runs inline: a blocking thread would finish at a
/// moment the simulation's seed does not decide.
pub async fn offload<T, F>(work: F) -> Result<T, String>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
        return Ok(work());
    }
    tokio::task::spawn_blocking(work).await.map_err(|error| error.to_string())
}
