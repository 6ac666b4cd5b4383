//! The retry schedule for transient failures: exponential backoff with jitter from the `backoff`
//! crate. The only module that names `backoff`, so that replacing it (RUSTSEC-2025-0012) is a
//! one-file change.

use std::time::Duration;

use backoff::backoff::Backoff;

/// How transient failures are retried.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub initial_interval: Duration,
    pub max_interval: Duration,
    /// Give up once this much time has passed since the first failure.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_interval: Duration::from_millis(50),
            max_interval: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(120),
        }
    }
}

/// The delays before successive retries of one operation.
pub struct RetrySchedule {
    backoff: backoff::ExponentialBackoff,
}

impl RetrySchedule {
    pub fn new(policy: RetryPolicy) -> RetrySchedule {
        let backoff = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(policy.initial_interval)
            .with_max_interval(policy.max_interval)
            .with_max_elapsed_time(Some(policy.max_elapsed))
            .build();
        RetrySchedule { backoff }
    }

    /// The wait before the next attempt, or `None` when it is time to give up.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.backoff.next_backoff()
    }
}
