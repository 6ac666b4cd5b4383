//! Every metric sluice exports, by name, with its help text and labels. The roles record
//! through the `metrics` facade (a no-op until the binary installs a recorder); the binary
//! serves them on `/metrics` in Prometheus's text format.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Tasks a worker began executing. Labels: gateway, model.
pub const TASKS_STARTED: &str = "sluice_tasks_started_total";
/// Tasks whose interval was written and recorded. Labels: gateway, model.
pub const TASKS_SUCCEEDED: &str = "sluice_tasks_succeeded_total";
/// Tasks that failed for good (their run fails). Labels: gateway, model.
pub const TASKS_FAILED: &str = "sluice_tasks_failed_total";
/// Transient warehouse failures retried inside a task. Labels: gateway, model.
pub const TASK_RETRIES: &str = "sluice_task_retries_total";
/// Tasks settled without work: their interval was already recorded. Labels: gateway, model.
pub const TASKS_SKIPPED: &str = "sluice_tasks_skipped_total";
/// Tasks of an aborted run dropped or cancelled in flight. Labels: gateway.
pub const TASKS_ABORTED: &str = "sluice_tasks_aborted_total";
/// Seconds from a task's start to its interval written (retries included). Labels: gateway, model.
pub const TASK_DURATION: &str = "sluice_task_duration_seconds";
/// Seconds one warehouse call took. Labels: gateway, operation.
pub const WAREHOUSE_STATEMENT_DURATION: &str = "sluice_warehouse_statement_duration_seconds";
/// Seconds from a task's interval written to its delivery acked (recorded, released, published).
/// Labels: gateway.
pub const SETTLE_DURATION: &str = "sluice_settle_duration_seconds";
/// Calls to the dependency gate. Labels: operation (load, complete, skip, …), outcome (ok, error).
pub const GATE_OPERATIONS: &str = "sluice_gate_operations_total";
/// Publishes confirmed (or refused) by the broker. Labels: outcome (ack, nack, error).
pub const PUBLISH_CONFIRMS: &str = "sluice_publish_confirms_total";
/// Deliveries the broker marked as redelivered. Labels: gateway.
pub const REDELIVERIES: &str = "sluice_redeliveries_total";
/// Deliveries rejected to the dead-letter queue. Labels: gateway.
pub const DEAD_LETTERS: &str = "sluice_dead_letters_total";
/// Runs finished by this process. Labels: outcome (promoted, failed, aborted).
pub const RUNS: &str = "sluice_runs_total";
/// Seconds a promotion took (views swapped, environment recorded).
pub const PROMOTION_DURATION: &str = "sluice_promotion_duration_seconds";
/// Tasks of a running run not yet settled. Labels: plan_id, run_id, environment.
pub const RUN_OUTSTANDING_TASKS: &str = "sluice_run_outstanding_tasks";
/// Tasks of every running run not yet settled: what a backfill still has to do, ready or not.
pub const OUTSTANDING_TASKS: &str = "sluice_outstanding_tasks";
/// Breakers tripped by this process (a run stopped between intervals). Labels: reason.
pub const BREAKER_TRIPS: &str = "sluice_breaker_trips_total";
/// Connections opened again after one was lost. Labels: service (rabbitmq, redis, warehouse).
pub const RECONNECTS: &str = "sluice_reconnects_total";
/// 1 while the process is ready (every dependency reachable), else 0.
pub const READY: &str = "sluice_ready";

/// Registers every metric's help text and unit with the installed recorder.
pub fn describe() {
    describe_counter!(TASKS_STARTED, "Tasks a worker began executing");
    describe_counter!(TASKS_SUCCEEDED, "Tasks whose interval was written and recorded");
    describe_counter!(TASKS_FAILED, "Tasks that failed for good");
    describe_counter!(TASK_RETRIES, "Transient warehouse failures retried inside a task");
    describe_counter!(TASKS_SKIPPED, "Tasks settled without work (interval already recorded)");
    describe_counter!(TASKS_ABORTED, "Tasks of an aborted run dropped or cancelled in flight");
    describe_histogram!(TASK_DURATION, Unit::Seconds, "Task execution time, retries included");
    describe_histogram!(WAREHOUSE_STATEMENT_DURATION, Unit::Seconds, "Duration of one warehouse call");
    describe_histogram!(SETTLE_DURATION, Unit::Seconds, "Interval written to delivery acked");
    describe_counter!(GATE_OPERATIONS, "Dependency gate calls");
    describe_counter!(PUBLISH_CONFIRMS, "Broker publish confirms");
    describe_counter!(REDELIVERIES, "Deliveries marked redelivered by the broker");
    describe_counter!(DEAD_LETTERS, "Deliveries rejected to the dead-letter queue");
    describe_counter!(RUNS, "Runs finished, by outcome");
    describe_histogram!(PROMOTION_DURATION, Unit::Seconds, "Promotion time");
    describe_gauge!(RUN_OUTSTANDING_TASKS, "Tasks of a running run not yet settled");
    describe_gauge!(OUTSTANDING_TASKS, "Tasks of every running run not yet settled");
    describe_counter!(BREAKER_TRIPS, "Breakers tripped");
    describe_counter!(RECONNECTS, "Connections opened again after one was lost");
    describe_gauge!(READY, "1 while every dependency is reachable");
}

/// Histogram buckets (seconds) for tasks, statements, settles and promotions: 1 ms to 1 h.
pub const DURATION_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];
