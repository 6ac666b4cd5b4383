//! Checks every queue, gate and event-bus backend must pass; run here against the in-process
//! ones (the RabbitMQ and Redis backends run the same functions).

use std::collections::BTreeSet;

use sluice_core::names::{PlanId, TaskId};

use crate::memory::{MemoryEvents, MemoryGate, MemoryQueue};
use crate::{DependencyGate, EventBus, RunEvent, RunId, TaskMessage, TaskQueue};

fn task(run: &RunId, index: u32, gateway: &str) -> TaskMessage {
    TaskMessage {
        plan_id: PlanId("plan".into()),
        run_id: run.clone(),
        task_index: index,
        task_id: TaskId([index as u8; 16]),
        gateway: gateway.into(),
        attempt: 0,
    }
}

pub async fn unacked_deliveries_come_back(queue: &dyn TaskQueue) {
    let run = RunId("r-1".into());
    queue.publish(&[task(&run, 0, "a"), task(&run, 1, "a")]).await.unwrap();
    assert_eq!(queue.pending(&run).await.unwrap(), 2);
    let first = queue.next("a").await.unwrap().unwrap();
    assert_eq!(first.task.task_index, 0);
    assert!(!first.redelivered);
    drop(first); // a consumer that died mid-task
    let second = queue.next("a").await.unwrap().unwrap();
    assert_eq!(second.task.task_index, 1);
    second.ack().await.unwrap();
    let again = queue.next("a").await.unwrap().unwrap();
    assert_eq!(again.task.task_index, 0);
    assert!(again.redelivered);
    again.requeue().await.unwrap();
    let last = queue.next("a").await.unwrap().unwrap();
    assert!(last.redelivered);
    last.ack().await.unwrap();
    assert_eq!(queue.pending(&run).await.unwrap(), 0);
}

pub async fn gateways_are_independent_and_purge_takes_one_run(queue: &dyn TaskQueue) {
    let kept = RunId("r-kept".into());
    let purged = RunId("r-purged".into());
    queue.publish(&[task(&purged, 0, "slow"), task(&kept, 1, "slow"), task(&purged, 2, "fast")]).await.unwrap();
    let fast = queue.next("fast").await.unwrap().unwrap();
    assert_eq!(fast.task.task_index, 2);
    assert_eq!(queue.purge_run(&purged).await.unwrap(), 1);
    // In flight is not purged: it is the consumer's to finish.
    assert_eq!(queue.pending(&purged).await.unwrap(), 1);
    fast.ack().await.unwrap();
    let slow = queue.next("slow").await.unwrap().unwrap();
    assert_eq!(slow.task.run_id, kept);
    slow.ack().await.unwrap();
}

pub async fn consumers_wake_on_publish_and_stop_on_shut_down(queue: std::sync::Arc<dyn TaskQueue>) {
    let run = RunId("r-wake".into());
    let consumer = {
        let queue = std::sync::Arc::clone(&queue);
        tokio::spawn(async move {
            let delivery = queue.next("g").await.unwrap().unwrap();
            let index = delivery.task.task_index;
            delivery.ack().await.unwrap();
            let after = queue.next("g").await.unwrap();
            (index, after.is_none())
        })
    };
    queue.publish(&[task(&run, 7, "g")]).await.unwrap();
    // Shut down once the consumer has taken the task (pending drops to zero when it acks).
    while queue.pending(&run).await.unwrap() > 0 {
        tokio::task::yield_now().await;
    }
    queue.shut_down().await;
    assert_eq!(consumer.await.unwrap(), (7, true));
}

/// A diamond: 0 → 1, 0 → 2, {1, 2} → 3.
pub async fn completion_is_idempotent_and_rereports_ready_children(gate: &dyn DependencyGate) {
    let run = RunId("r-gate".into());
    gate.load(&run, &[0, 1, 1, 2], &[false; 4]).await.unwrap();
    let first = gate.complete(&run, 0, &[1, 2]).await.unwrap();
    assert!(first.newly_done);
    assert_eq!(first.ready.iter().copied().collect::<BTreeSet<_>>(), BTreeSet::from([1, 2]));
    // A retry after a crash: nothing decremented twice, the same children reported.
    let retry = gate.complete(&run, 0, &[1, 2]).await.unwrap();
    assert!(!retry.newly_done);
    assert_eq!(retry.ready.iter().copied().collect::<BTreeSet<_>>(), BTreeSet::from([1, 2]));
    assert!(gate.complete(&run, 1, &[3]).await.unwrap().ready.is_empty());
    assert!(gate.complete(&run, 1, &[3]).await.unwrap().ready.is_empty());
    let two = gate.complete(&run, 2, &[3]).await.unwrap();
    assert_eq!(two.ready, vec![3]);
    assert!(!two.run_complete);
    assert_eq!(gate.outstanding(&run).await.unwrap(), Some(1));
    let last = gate.complete(&run, 3, &[]).await.unwrap();
    assert!(last.run_complete);
    gate.clear(&run).await.unwrap();
    assert_eq!(gate.outstanding(&run).await.unwrap(), None);
}

pub async fn loading_done_tasks_and_skipping_failed_branches_settles_the_run(gate: &dyn DependencyGate) {
    let run = RunId("r-resume".into());
    // 0 done before; 1 and 2 wait for 0; 3 waits for 1.
    gate.load(&run, &[0, 0, 0, 1], &[true, false, false, false]).await.unwrap();
    assert_eq!(gate.outstanding(&run).await.unwrap(), Some(3));
    // Task 1 failed: it and its descendant 3 are skipped.
    assert!(!gate.skip(&run, &[1, 3]).await.unwrap());
    let completion = gate.complete(&run, 2, &[]).await.unwrap();
    assert!(completion.run_complete);
}

pub async fn settled_runs_reach_one_promoter_and_events_reach_subscribers(events: &dyn EventBus) {
    let mut stream = events.subscribe().await.unwrap();
    let run = RunId("r-events".into());
    events.publish(RunEvent::TaskFailed { run_id: run.clone(), task_index: 1, error: "boom".into() }).await.unwrap();
    events.publish(RunEvent::RunSettled { run_id: run.clone(), plan_id: PlanId("p".into()) }).await.unwrap();
    assert!(matches!(stream.next().await, Some(RunEvent::TaskFailed { .. })));
    assert!(matches!(stream.next().await, Some(RunEvent::RunSettled { .. })));
    assert_eq!(events.next_settled().await.unwrap(), Some((run, PlanId("p".into()))));
    events.shut_down().await;
    assert_eq!(events.next_settled().await.unwrap(), None);
}

macro_rules! memory_conformance {
    ($($check:ident => $backend:expr),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                super::$check($backend).await;
            }
        )*
    };
}

mod memory {
    use super::*;

    memory_conformance! {
        unacked_deliveries_come_back => &MemoryQueue::new(),
        gateways_are_independent_and_purge_takes_one_run => &MemoryQueue::new(),
        consumers_wake_on_publish_and_stop_on_shut_down => std::sync::Arc::new(MemoryQueue::new()),
        completion_is_idempotent_and_rereports_ready_children => &MemoryGate::new(),
        loading_done_tasks_and_skipping_failed_branches_settles_the_run => &MemoryGate::new(),
        settled_runs_reach_one_promoter_and_events_reach_subscribers => &MemoryEvents::new(),
    }
}

/// The gate checks against the Redis at 127.0.0.1:6379 (`SLUICE_TEST_REDIS_URL` to move it), each
/// under its own key prefix; they fail, never skip, when Redis is unreachable.
#[cfg(feature = "redis")]
mod redis {
    macro_rules! redis_gate_conformance {
        ($($check:ident),* $(,)?) => {
            $(
                #[tokio::test]
                async fn $check() {
                    let gate = crate::redis_gate::test_support::gate().await;
                    super::$check(&gate).await;
                    crate::redis_gate::test_support::delete_all(&gate).await;
                }
            )*
        };
    }

    redis_gate_conformance! {
        completion_is_idempotent_and_rereports_ready_children,
        loading_done_tasks_and_skipping_failed_branches_settles_the_run,
    }
}
