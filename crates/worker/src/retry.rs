//! The retry schedule for transient failures: exponential backoff with jitter from the `backoff`
//! crate. The only module that names `backoff`, so that replacing it (RUSTSEC-2025-0012) is a
//! one-file change.

use std::time::Duration;

use backoff::Clock as _;
use backoff::backoff::Backoff;

/// How transient failures are retried.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub initial_interval: Duration,
    pub max_interval: Duration,
    /// Give up once this much time has passed since the first failure.
    pub max_elapsed: Duration,
    /// Each delay is drawn from `delay × [1 − jitter, 1 + jitter]` so that failing workers do
    /// not retry in lockstep; the protocol simulation sets 0 (its seed decides every delay).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_interval: Duration::from_millis(50),
            max_interval: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(120),
            jitter: 0.5,
        }
    }
}

/// The runtime's clock for the schedule's elapsed time: tokio's (paused and advanced by the
/// protocol simulation, the machine's monotonic clock otherwise).
#[derive(Clone, Copy, Debug, Default)]
pub struct RuntimeClock;

impl backoff::Clock for RuntimeClock {
    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// The delays before successive retries of one operation.
pub struct RetrySchedule {
    backoff: backoff::exponential::ExponentialBackoff<RuntimeClock>,
}

impl RetrySchedule {
    pub fn new(policy: RetryPolicy) -> RetrySchedule {
        let mut backoff = backoff::exponential::ExponentialBackoff {
            current_interval: policy.initial_interval,
            initial_interval: policy.initial_interval,
            randomization_factor: policy.jitter,
            multiplier: backoff::default::MULTIPLIER,
            max_interval: policy.max_interval,
            start_time: RuntimeClock.now(),
            max_elapsed_time: Some(policy.max_elapsed),
            clock: RuntimeClock,
        };
        backoff.reset();
        RetrySchedule { backoff }
    }

    /// The wait before the next attempt, or `None` when it is time to give up.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.backoff.next_backoff()
    }
}
