//! The broker in the simulation: per-gateway task queues that duplicate, reorder and delay what
//! is published, lose acks (the task comes back), return a dead consumer's tasks, dead-letter a
//! task delivered too often, and can be purged by hand.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use sluice_queue::{Acknowledger, Delivery, QueueError, TaskMessage, TaskQueue};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::world::Shared;

/// Deliveries of one message before the broker dead-letters it (RabbitMQ's `x-delivery-limit`).
pub const DELIVERY_LIMIT: u32 = 4;

struct Entry {
    task: TaskMessage,
    redelivered: bool,
    deliveries: u32,
    visible_at: Instant,
}

#[derive(Default)]
struct Queues {
    queues: BTreeMap<String, VecDeque<Entry>>,
    dead_letters: Vec<TaskMessage>,
    shut_down: bool,
}

#[derive(Clone)]
pub struct SimQueue {
    world: Shared,
    queues: Arc<Mutex<Queues>>,
    notify: Arc<Notify>,
}

fn lock(queues: &Mutex<Queues>) -> MutexGuard<'_, Queues> {
    queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SimQueue {
    pub fn new(world: Shared) -> SimQueue {
        SimQueue { world, queues: Arc::default(), notify: Arc::new(Notify::new()) }
    }

    /// Empties a gateway's queue, as `rabbitmqctl purge_queue` does.
    pub fn purge(&self, gateway: &str) -> usize {
        let mut queues = lock(&self.queues);
        queues.queues.get_mut(gateway).map_or(0, |queue| queue.drain(..).count())
    }

    pub fn dead_letters(&self) -> Vec<TaskMessage> {
        lock(&self.queues).dead_letters.clone()
    }

    pub fn total_queued(&self) -> usize {
        lock(&self.queues).queues.values().map(VecDeque::len).sum()
    }

    /// Puts a message back (a lost ack, a requeue, a dead consumer), or dead-letters it once it
    /// was delivered too often.
    fn put_back(world: &Shared, queues: &Mutex<Queues>, notify: &Notify, task: TaskMessage, deliveries: u32) {
        let mut state = lock(queues);
        if deliveries >= DELIVERY_LIMIT {
            world.note(&format!("dead-letter task {} of {}", task.task_index, task.run_id));
            state.dead_letters.push(task);
            return;
        }
        let gateway = task.gateway.clone();
        let entry = Entry { task, redelivered: true, deliveries, visible_at: Instant::now() };
        state.queues.entry(gateway).or_default().push_back(entry);
        drop(state);
        notify.notify_waiters();
    }
}

struct SimAcknowledger {
    world: Shared,
    queues: Arc<Mutex<Queues>>,
    notify: Arc<Notify>,
    task: TaskMessage,
    deliveries: u32,
}

#[async_trait]
impl Acknowledger for SimAcknowledger {
    async fn ack(&self) -> Result<(), QueueError> {
        self.world.pause().await;
        let lost = {
            let mut world = self.world.lock();
            let rate = world.faults.ack_lost;
            world.chance(rate)
        };
        if lost {
            self.world.note(&format!("ack lost for task {}", self.task.task_index));
            SimQueue::put_back(&self.world, &self.queues, &self.notify, self.task.clone(), self.deliveries);
        }
        Ok(())
    }

    async fn requeue(&self) -> Result<(), QueueError> {
        SimQueue::put_back(&self.world, &self.queues, &self.notify, self.task.clone(), self.deliveries);
        Ok(())
    }

    async fn reject(&self) -> Result<(), QueueError> {
        lock(&self.queues).dead_letters.push(self.task.clone());
        Ok(())
    }
}

struct DeadLetterAcknowledger {
    queues: Arc<Mutex<Queues>>,
    task: TaskMessage,
}

#[async_trait]
impl Acknowledger for DeadLetterAcknowledger {
    async fn ack(&self) -> Result<(), QueueError> {
        Ok(())
    }

    async fn requeue(&self) -> Result<(), QueueError> {
        lock(&self.queues).dead_letters.push(self.task.clone());
        Ok(())
    }

    async fn reject(&self) -> Result<(), QueueError> {
        lock(&self.queues).dead_letters.push(self.task.clone());
        Ok(())
    }
}

#[async_trait]
impl TaskQueue for SimQueue {
    async fn publish(&self, tasks: &[TaskMessage]) -> Result<(), QueueError> {
        self.world.pause().await;
        let mut wake_at = Vec::new();
        let confirm_lost = {
            let mut world = self.world.lock();
            let rates = world.faults.clone();
            let mut queues = lock(&self.queues);
            if queues.shut_down {
                return Err(QueueError::Closed);
            }
            for task in tasks {
                let copies = if world.chance(rates.duplicate_delivery) { 2 } else { 1 };
                for _ in 0..copies {
                    let delay = if world.chance(rates.delay_delivery) { world.below(3_000) } else { 0 };
                    let visible_at = Instant::now() + Duration::from_millis(delay);
                    if delay > 0 {
                        wake_at.push(visible_at);
                    }
                    let entry = Entry { task: task.clone(), redelivered: false, deliveries: 0, visible_at };
                    let queue = queues.queues.entry(task.gateway.clone()).or_default();
                    let position = if world.chance(rates.reorder_delivery) {
                        world.below(queue.len() as u64 + 1) as usize
                    } else {
                        queue.len()
                    };
                    queue.insert(position, entry);
                    world.note(&format!("queued task {} of {} ({copies}, +{delay} ms)", task.task_index, task.run_id));
                }
            }
            world.chance(rates.publish_confirm_lost)
        };
        for at in wake_at {
            let notify = Arc::clone(&self.notify);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                notify.notify_waiters();
            });
        }
        self.notify.notify_waiters();
        self.world.pause().await;
        if confirm_lost {
            self.world.note("publish confirm lost");
            return Err(QueueError::Backend("simulated: publisher confirm lost".into()));
        }
        Ok(())
    }

    async fn next(&self, gateway: &str) -> Result<Option<Delivery>, QueueError> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut queues = lock(&self.queues);
                if queues.shut_down {
                    return Ok(None);
                }
                let now = Instant::now();
                let found = queues.queues.get_mut(gateway).and_then(|queue| {
                    queue.iter().position(|entry| entry.visible_at <= now).and_then(|i| queue.remove(i))
                });
                if let Some(entry) = found {
                    drop(queues);
                    let deliveries = entry.deliveries + 1;
                    self.world.note(&format!(
                        "deliver task {} of {} (delivery {deliveries})",
                        entry.task.task_index, entry.task.run_id
                    ));
                    let acknowledger = SimAcknowledger {
                        world: self.world.clone(),
                        queues: Arc::clone(&self.queues),
                        notify: Arc::clone(&self.notify),
                        task: entry.task.clone(),
                        deliveries,
                    };
                    let (world, queues, notify, task) =
                        (self.world.clone(), Arc::clone(&self.queues), Arc::clone(&self.notify), entry.task.clone());
                    let on_drop: Box<dyn FnOnce() + Send> = Box::new(move || {
                        world.note(&format!("unanswered delivery of task {} returns", task.task_index));
                        SimQueue::put_back(&world, &queues, &notify, task, deliveries);
                    });
                    return Ok(Some(Delivery::new(
                        entry.task,
                        entry.redelivered,
                        Box::new(acknowledger),
                        Some(on_drop),
                    )));
                }
            }
            notified.await;
        }
    }

    async fn queued(&self, gateway: &str) -> Result<u64, QueueError> {
        self.world.pause().await;
        Ok(lock(&self.queues).queues.get(gateway).map_or(0, VecDeque::len) as u64)
    }

    async fn take_dead_letters(&self, gateway: &str, max: usize) -> Result<Vec<Delivery>, QueueError> {
        self.world.pause().await;
        let mut queues = lock(&self.queues);
        let mut taken = Vec::new();
        let mut index = 0;
        while index < queues.dead_letters.len() && taken.len() < max {
            if queues.dead_letters[index].gateway == gateway {
                taken.push(queues.dead_letters.remove(index));
            } else {
                index += 1;
            }
        }
        drop(queues);
        Ok(taken
            .into_iter()
            .map(|task| {
                self.world.note(&format!("dead letter taken: task {} of {}", task.task_index, task.run_id));
                let back = Arc::clone(&self.queues);
                let again = task.clone();
                let on_drop: Box<dyn FnOnce() + Send> = Box::new(move || lock(&back).dead_letters.push(again));
                let acknowledger = DeadLetterAcknowledger { queues: Arc::clone(&self.queues), task: task.clone() };
                Delivery::new(task, true, Box::new(acknowledger), Some(on_drop))
            })
            .collect())
    }

    async fn shut_down(&self) {
        lock(&self.queues).shut_down = true;
        self.notify.notify_waiters();
    }
}
