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
    assert_eq!(queue.queued("a").await.unwrap(), 2);
    let first = queue.next("a").await.unwrap().unwrap();
    assert_eq!(first.task, task(&run, 0, "a"));
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
    assert_eq!(last.task.task_index, 0);
    assert!(last.redelivered);
    last.ack().await.unwrap();
    assert_eq!(queue.queued("a").await.unwrap(), 0);
}

pub async fn gateways_are_independent(queue: &dyn TaskQueue) {
    let one = RunId("r-one".into());
    let two = RunId("r-two".into());
    queue.publish(&[task(&one, 0, "slow"), task(&two, 1, "slow"), task(&one, 2, "fast")]).await.unwrap();
    // Nobody consumes "slow": "fast" is served all the same.
    let fast = queue.next("fast").await.unwrap().unwrap();
    assert_eq!(fast.task, task(&one, 2, "fast"));
    fast.ack().await.unwrap();
    assert_eq!(queue.queued("fast").await.unwrap(), 0);
    assert_eq!(queue.queued("slow").await.unwrap(), 2);
    let slow = queue.next("slow").await.unwrap().unwrap();
    assert_eq!(slow.task, task(&one, 0, "slow"));
    slow.ack().await.unwrap();
    let slow = queue.next("slow").await.unwrap().unwrap();
    assert_eq!(slow.task, task(&two, 1, "slow"));
    slow.ack().await.unwrap();
}

pub async fn consumers_wake_on_publish_and_stop_on_shut_down(queue: std::sync::Arc<dyn TaskQueue>) {
    let run = RunId("r-wake".into());
    let (taken, taken_receiver) = tokio::sync::oneshot::channel();
    let consumer = {
        let queue = std::sync::Arc::clone(&queue);
        tokio::spawn(async move {
            let delivery = queue.next("g").await.unwrap().unwrap();
            let index = delivery.task.task_index;
            delivery.ack().await.unwrap();
            taken.send(index).unwrap();
            queue.next("g").await.unwrap().is_none()
        })
    };
    queue.publish(&[task(&run, 7, "g")]).await.unwrap();
    assert_eq!(taken_receiver.await.unwrap(), 7);
    queue.shut_down().await;
    assert!(consumer.await.unwrap(), "next returns None once the queue is shut down");
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
    let settled = events.next_settled().await.unwrap().unwrap();
    assert_eq!((&settled.run_id, &settled.plan_id), (&run, &PlanId("p".into())));
    drop(settled); // a promoter that died before finalizing the run
    let again = events.next_settled().await.unwrap().unwrap();
    assert_eq!(again.run_id, run);
    again.ack().await.unwrap();
    events.shut_down().await;
    assert!(events.next_settled().await.unwrap().is_none());
}

/// Takes a gateway's dead letters once the broker has routed some there (dead-lettering is
/// asynchronous in RabbitMQ), waiting up to five seconds.
async fn take_dead_letters_eventually(queue: &dyn TaskQueue, gateway: &str) -> Vec<crate::Delivery> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let taken = queue.take_dead_letters(gateway, 10).await.unwrap();
        if !taken.is_empty() || tokio::time::Instant::now() > deadline {
            return taken;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub async fn rejected_tasks_are_taken_from_the_dead_letters(queue: &dyn TaskQueue) {
    let run = RunId("r-dead".into());
    queue.publish(&[task(&run, 3, "d"), task(&run, 4, "other")]).await.unwrap();
    assert!(queue.take_dead_letters("d", 10).await.unwrap().is_empty());
    let delivery = queue.next("d").await.unwrap().unwrap();
    delivery.reject().await.unwrap();
    let taken = take_dead_letters_eventually(queue, "d").await;
    assert_eq!(taken.iter().map(|dead| dead.task.clone()).collect::<Vec<_>>(), vec![task(&run, 3, "d")]);
    // Not answered for good: it stays a dead letter.
    for dead in taken {
        dead.requeue().await.unwrap();
    }
    let again = take_dead_letters_eventually(queue, "d").await;
    assert_eq!(again.len(), 1, "a requeued dead letter is taken again");
    for dead in again {
        dead.ack().await.unwrap();
    }
    assert!(queue.take_dead_letters("d", 10).await.unwrap().is_empty(), "an acked dead letter is gone");
    assert!(queue.take_dead_letters("other", 10).await.unwrap().is_empty(), "other gateways have none");
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
        gateways_are_independent => &MemoryQueue::new(),
        consumers_wake_on_publish_and_stop_on_shut_down => std::sync::Arc::new(MemoryQueue::new()),
        rejected_tasks_are_taken_from_the_dead_letters => &MemoryQueue::new(),
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

/// The queue and event checks against the RabbitMQ at 127.0.0.1:5672, each under its own name
/// prefix, plus what only a broker does: dead-lettering and the delivery limit.
#[cfg(feature = "rabbitmq")]
mod rabbitmq {
    use std::sync::Arc;

    use super::*;
    use crate::rabbitmq::RabbitBroker;
    use crate::rabbitmq::test_support::broker;

    async fn cleanup(broker: &RabbitBroker, gateways: &[&str]) {
        broker.delete_topology(gateways).await.unwrap();
        broker.close().await;
    }

    #[tokio::test]
    async fn unacked_deliveries_come_back() {
        let broker = broker(2).await;
        super::unacked_deliveries_come_back(&broker).await;
        cleanup(&broker, &["a"]).await;
    }

    #[tokio::test]
    async fn gateways_are_independent() {
        let broker = broker(1).await;
        super::gateways_are_independent(&broker).await;
        cleanup(&broker, &["slow", "fast"]).await;
    }

    #[tokio::test]
    async fn consumers_wake_on_publish_and_stop_on_shut_down() {
        let broker = Arc::new(broker(1).await);
        super::consumers_wake_on_publish_and_stop_on_shut_down(Arc::clone(&broker) as Arc<dyn TaskQueue>).await;
        cleanup(&broker, &["g"]).await;
    }

    #[tokio::test]
    async fn rejected_tasks_are_taken_from_the_dead_letters() {
        let broker = broker(1).await;
        super::rejected_tasks_are_taken_from_the_dead_letters(&broker).await;
        cleanup(&broker, &["d", "other"]).await;
    }

    #[tokio::test]
    async fn settled_runs_reach_one_promoter_and_events_reach_subscribers() {
        let broker = broker(1).await;
        super::settled_runs_reach_one_promoter_and_events_reach_subscribers(&broker).await;
        cleanup(&broker, &[]).await;
    }

    #[tokio::test]
    async fn poison_messages_are_dead_lettered_and_the_consumer_goes_on() {
        let broker = broker(1).await;
        let run = RunId("r-poison".into());
        let poison: [&[u8]; 3] = [b"", &[99, 1, 2, 3], &[sluice_proto::FORMAT_VERSION, 0xFF, 0xFF]];
        for bytes in poison {
            broker.publish_raw("p", bytes).await.unwrap();
        }
        TaskQueue::publish(&broker, &[task(&run, 5, "p")]).await.unwrap();
        let delivery = broker.next("p").await.unwrap().unwrap();
        assert_eq!(delivery.task, task(&run, 5, "p"));
        delivery.ack().await.unwrap();
        for bytes in poison {
            assert_eq!(broker.take_dead_letter("p").await.unwrap(), bytes);
        }
        cleanup(&broker, &["p"]).await;
    }

    #[tokio::test]
    async fn a_task_delivered_too_often_is_dead_lettered() {
        let broker = broker(1).await;
        let run = RunId("r-limit".into());
        TaskQueue::publish(&broker, &[task(&run, 1, "l")]).await.unwrap();
        // Returned again and again (a worker crashing on it): the broker gives up after the limit.
        let mut deliveries = 0;
        let dead = broker.take_dead_letter("l");
        tokio::pin!(dead);
        let dead = loop {
            tokio::select! {
                dead = &mut dead => break dead.unwrap(),
                delivery = broker.next("l") => {
                    deliveries += 1;
                    assert!(deliveries <= 10, "the delivery limit is not enforced");
                    delivery.unwrap().unwrap().requeue().await.unwrap();
                }
            }
        };
        assert_eq!(sluice_proto::decode_task(&dead).map(crate::wire::task_from_wire), Ok(task(&run, 1, "l")));
        assert!(deliveries >= 3, "dead-lettered after {deliveries} deliveries, the limit is 3");
        cleanup(&broker, &["l"]).await;
    }
}
