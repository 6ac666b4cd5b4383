//! The RabbitMQ backend (feature `rabbitmq`, lapin): task queues and run events.
//!
//! Topology, every name under the configured prefix (`sluice` by default):
//!
//! | name | kind | holds |
//! | --- | --- | --- |
//! | `<prefix>.tasks.<gateway>` | durable quorum queue, `x-delivery-limit`, dead-letters to the next | one gateway's tasks |
//! | `<prefix>.dead.<gateway>` | durable quorum queue | tasks rejected as undecodable or delivered too often |
//! | `<prefix>.events` | durable topic exchange | every run event, routing key `task.done`, `run.settled`, … |
//! | `<prefix>.runs.done` | durable quorum queue bound to `run.settled` | settled runs, one promoter each |
//!
//! Tasks and settled runs are persistent and published with `mandatory` on a confirm channel;
//! a batch is published first and its confirms awaited after (pipelined), so `publish` returns
//! once every message is durable. Progress events are transient and unconfirmed: losing one
//! costs a progress tick, never work (followers also poll the state store).
//!
//! A lost connection is replaced by the next call that needs one (callers retry with backoff):
//! a new connection, new channels, the topology declared again, consumers started again. (Not
//! lapin's automatic recovery: after a broker restart it left consumers that neither delivered
//! nor stopped.) An ack that fails because its channel was lost is not an error: the broker
//! delivers the message again, and every step of a worker is idempotent.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use sluice_core::config::redact_url;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::wire::{event_from_wire, event_to_wire, task_from_wire, task_to_wire};
use crate::{Acknowledger, Delivery, EventBus, EventStream, QueueError, RunEvent, SettledRun, TaskMessage, TaskQueue};

/// Persistent delivery mode.
const PERSISTENT: u8 = 2;

/// Where the broker is and how the topology is named.
#[derive(Clone)]
pub struct RabbitConfig {
    /// `amqp://user:password@host:port/vhost`; never printed.
    pub url: String,
    /// Every queue and exchange name starts with `<prefix>.`.
    pub prefix: String,
    /// Deliveries of one task before the broker dead-letters it (the Debian RabbitMQ 3.10 sets
    /// no default, so a poison task would loop forever).
    pub delivery_limit: u32,
    /// Unacked tasks one consumer holds (the worker's concurrency).
    pub prefetch: u16,
}

impl std::fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("delivery_limit", &self.delivery_limit)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

impl RabbitConfig {
    pub fn new(url: &str) -> RabbitConfig {
        RabbitConfig { url: url.to_string(), prefix: "sluice".to_string(), delivery_limit: 10, prefetch: 1 }
    }

    pub fn task_queue(&self, gateway: &str) -> String {
        format!("{}.tasks.{gateway}", self.prefix)
    }

    pub fn dead_queue(&self, gateway: &str) -> String {
        format!("{}.dead.{gateway}", self.prefix)
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    pub fn settled_queue(&self) -> String {
        format!("{}.runs.done", self.prefix)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One gateway's consumer: its channel (with the gateway's prefetch) and the delivery stream.
struct GatewayConsumer {
    channel: Channel,
    /// The connection it was started on (see `RabbitBroker::generation`).
    generation: u64,
    tag: String,
    stream: tokio::sync::Mutex<lapin::Consumer>,
}

/// One connection and its two shared channels.
struct Link {
    connection: Connection,
    /// Confirm-mode channel for tasks and settled runs.
    confirmed: Channel,
    /// Channel for transient progress events and declarations.
    plain: Channel,
}

impl Link {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.confirmed.status().connected() && self.plain.status().connected()
    }
}

/// How long opening a connection and its channels may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens a connection with its confirm channel and its plain channel.
async fn open_link(url: &str) -> Result<(Connection, Channel, Channel), lapin::Error> {
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("sluice-{}", std::process::id())));
    let connection = Connection::connect(url, properties).await?;
    let confirmed = connection.create_channel().await?;
    confirmed.confirm_select(ConfirmSelectOptions::default()).await?;
    let plain = connection.create_channel().await?;
    Ok((connection, confirmed, plain))
}

/// How long closing a connection or cancelling a consumer may take (a dead peer never answers).
const GOODBYE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection to RabbitMQ serving as [`TaskQueue`] and [`EventBus`]. Cheap to share behind an
/// `Arc`; one per process.
pub struct RabbitBroker {
    config: RabbitConfig,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    declared: Mutex<HashSet<String>>,
    consumers: tokio::sync::Mutex<HashMap<String, Arc<GatewayConsumer>>>,
    settled: tokio::sync::Mutex<Option<Arc<GatewayConsumer>>>,
    /// Bumped by every new connection: a consumer of an older one is replaced.
    generation: std::sync::atomic::AtomicU64,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBroker").field("config", &self.config).finish()
    }
}

impl RabbitBroker {
    /// Connects, opens the channels and declares the events exchange and the settled-runs queue.
    pub async fn connect(config: RabbitConfig) -> Result<RabbitBroker, QueueError> {
        let broker = RabbitBroker {
            config,
            link: tokio::sync::Mutex::new(None),
            declared: Mutex::new(HashSet::new()),
            consumers: tokio::sync::Mutex::new(HashMap::new()),
            settled: tokio::sync::Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
            shutdown: CancellationToken::new(),
        };
        broker.link().await?;
        Ok(broker)
    }

    /// The current connection, or a new one (with the topology declared again) when it was lost.
    async fn link(&self) -> Result<Arc<Link>, QueueError> {
        let mut guard = self.link.lock().await;
        if let Some(link) = guard.as_ref()
            && link.usable()
        {
            return Ok(Arc::clone(link));
        }
        if self.shutdown.is_cancelled() {
            return Err(QueueError::Closed);
        }
        let reconnecting = guard.is_some();
        if reconnecting {
            warn!("the RabbitMQ connection was lost; connecting again");
        }
        let where_to = redact_url(&self.config.url);
        // A broker that is starting accepts the TCP connection and never answers the handshake:
        // the attempt is bounded, and the caller retries.
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, open_link(&self.config.url)).await;
        let (connection, confirmed, plain) = match opened {
            Ok(Ok(parts)) => parts,
            Ok(Err(error)) => {
                return Err(QueueError::Backend(format!("cannot connect to RabbitMQ at {where_to}: {error}")));
            }
            Err(_) => {
                return Err(QueueError::Backend(format!(
                    "cannot connect to RabbitMQ at {where_to}: no answer within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        let link = Arc::new(Link { connection, confirmed, plain });
        // Everything declared or consumed on the old connection is declared again on demand.
        // (The consumer maps are not touched here: their holders may be the ones calling.)
        lock(&self.declared).clear();
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        declare_events(&link.plain, &self.config).await?;
        *guard = Some(Arc::clone(&link));
        if reconnecting {
            metrics::counter!(sluice_ops::metrics::RECONNECTS, "service" => "rabbitmq").increment(1);
        }
        Ok(link)
    }

    pub fn config(&self) -> &RabbitConfig {
        &self.config
    }

    /// Whether the broker answers: the current connection is usable, else a new one opens (a
    /// readiness check).
    pub async fn check(&self) -> Result<(), QueueError> {
        self.link().await.map(|_| ())
    }

    /// Declares a gateway's task queue and its dead-letter queue (once per process); returns the
    /// task queue's ready-message count.
    /// Consumers attached to a gateway's task queue (workers ready to take tasks).
    pub async fn consumers(&self, gateway: &str) -> Result<u32, QueueError> {
        Ok(self.declare_gateway(gateway).await?.consumer_count())
    }

    async fn declare_gateway(&self, gateway: &str) -> Result<lapin::Queue, QueueError> {
        let link = self.link().await?;
        let dead = self.config.dead_queue(gateway);
        let tasks = self.config.task_queue(gateway);
        if !lock(&self.declared).contains(gateway) {
            link.plain
                .queue_declare(dead.as_str().into(), QueueDeclareOptions::durable(), quorum())
                .await
                .map_err(backend)?;
        }
        let mut arguments = quorum();
        arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(self.config.delivery_limit)));
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(dead.as_str().into()));
        let queue = link
            .plain
            .queue_declare(tasks.as_str().into(), QueueDeclareOptions::durable(), arguments)
            .await
            .map_err(backend)?;
        lock(&self.declared).insert(gateway.to_string());
        Ok(queue)
    }

    /// Messages waiting in a gateway's dead-letter queue.
    pub async fn dead_letters(&self, gateway: &str) -> Result<u32, QueueError> {
        self.declare_gateway(gateway).await?;
        let link = self.link().await?;
        let dead = self.config.dead_queue(gateway);
        let queue = link
            .plain
            .queue_declare(dead.as_str().into(), QueueDeclareOptions::durable(), quorum())
            .await
            .map_err(backend)?;
        Ok(queue.message_count())
    }

    /// Takes the oldest message of a gateway's dead-letter queue, waiting for one: its bytes.
    pub async fn take_dead_letter(&self, gateway: &str) -> Result<Vec<u8>, QueueError> {
        self.declare_gateway(gateway).await?;
        let consumer = self.consume(&self.config.dead_queue(gateway), 1).await?;
        let delivery = self.next_delivery(&consumer).await?;
        let _ = consumer.channel.basic_cancel(consumer.tag.as_str().into(), BasicCancelOptions::default()).await;
        let delivery = delivery.ok_or(QueueError::Closed)?;
        delivery.acker.ack(BasicAckOptions::default()).await.map_err(backend)?;
        let _ = consumer.channel.close(200, "sluice: dead letter taken".into()).await;
        Ok(delivery.data)
    }

    /// Publishes raw bytes to a gateway's task queue (operators' tools and poison tests).
    pub async fn publish_raw(&self, gateway: &str, payload: &[u8]) -> Result<(), QueueError> {
        self.declare_gateway(gateway).await?;
        let queue = self.config.task_queue(gateway);
        let confirm = self.publish_confirmed("", &queue, payload).await?;
        confirmed(confirm, &queue).await
    }

    /// Deletes the gateways' queues and the events topology (tests clean up after themselves).
    pub async fn delete_topology(&self, gateways: &[&str]) -> Result<(), QueueError> {
        let link = self.link().await?;
        for gateway in gateways {
            for queue in [self.config.task_queue(gateway), self.config.dead_queue(gateway)] {
                link.plain.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.map_err(backend)?;
            }
        }
        let settled = self.config.settled_queue();
        link.plain.queue_delete(settled.as_str().into(), QueueDeleteOptions::default()).await.map_err(backend)?;
        let exchange = self.config.events_exchange();
        link.plain.exchange_delete(exchange.as_str().into(), Default::default()).await.map_err(backend)?;
        Ok(())
    }

    /// Closes the connection: unacked deliveries go back to their queues.
    pub async fn close(&self) {
        self.shutdown.cancel();
        let link = self.link.lock().await.take();
        if let Some(link) = link {
            match tokio::time::timeout(GOODBYE_TIMEOUT, link.connection.close(200, "sluice: shutting down".into()))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(error)) => debug!(error = %error, "closing the RabbitMQ connection"),
                Err(_) => debug!("closing the RabbitMQ connection timed out"),
            }
        }
    }

    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
    ) -> Result<lapin::PublisherConfirm, QueueError> {
        let link = self.link().await?;
        link.confirmed
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                payload,
                BasicProperties::default().with_delivery_mode(PERSISTENT),
            )
            .await
            .map_err(backend)
    }

    async fn gateway_consumer(&self, gateway: &str) -> Result<Arc<GatewayConsumer>, QueueError> {
        let mut consumers = self.consumers.lock().await;
        if let Some(consumer) = consumers.get(gateway)
            && consumer.generation == self.generation.load(std::sync::atomic::Ordering::SeqCst)
            && consumer.channel.status().connected()
        {
            return Ok(Arc::clone(consumer));
        }
        self.declare_gateway(gateway).await?;
        let queue = self.config.task_queue(gateway);
        let consumer = self.consume(&queue, self.config.prefetch).await?;
        consumers.insert(gateway.to_string(), Arc::clone(&consumer));
        Ok(consumer)
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Arc<GatewayConsumer>, QueueError> {
        let link = self.link().await?;
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let channel = link.connection.create_channel().await.map_err(backend)?;
        channel.basic_qos(prefetch.max(1), BasicQosOptions::default()).await.map_err(backend)?;
        let tag = format!("sluice-{}-{queue}", std::process::id());
        let stream = channel
            .basic_consume(queue.into(), tag.as_str().into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(backend)?;
        Ok(Arc::new(GatewayConsumer { channel, generation, tag, stream: tokio::sync::Mutex::new(stream) }))
    }

    /// The next delivery of a consumer; `None` once shut down. A lost connection is waited out;
    /// a consumer the broker cancelled (its queue deleted) is forgotten so the next call
    /// declares and consumes again.
    async fn next_delivery(&self, consumer: &GatewayConsumer) -> Result<Option<lapin::message::Delivery>, QueueError> {
        let mut stream = consumer.stream.lock().await;
        let item = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(None),
            item = stream.next() => item,
        };
        drop(stream);
        match item {
            Some(Ok(delivery)) => Ok(Some(delivery)),
            Some(Err(error)) => {
                warn!(error = %error, "RabbitMQ consumer failed; consuming again on a new channel");
                Err(backend(error))
            }
            None if self.shutdown.is_cancelled() => Ok(None),
            None => Err(QueueError::Backend("the broker cancelled the consumer".to_string())),
        }
    }
}

async fn declare_events(plain: &Channel, config: &RabbitConfig) -> Result<(), QueueError> {
    let exchange = config.events_exchange();
    plain
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
        .map_err(backend)?;
    let settled = config.settled_queue();
    plain.queue_declare(settled.as_str().into(), QueueDeclareOptions::durable(), quorum()).await.map_err(backend)?;
    plain
        .queue_bind(
            settled.as_str().into(),
            exchange.as_str().into(),
            "run.settled".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(backend)?;
    Ok(())
}

fn quorum() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments
}

fn backend(error: lapin::Error) -> QueueError {
    QueueError::Backend(format!("rabbitmq: {error}"))
}

/// How long a publisher confirm or an acknowledgement may take. After a broker restart a
/// confirm of the old channel may never come: waiting longer would hold the settle (and a
/// stopping worker) forever; the task is delivered again instead, and its copy only settles.
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits for a publisher confirm (at most `CONFIRM_TIMEOUT`) and checks it.
async fn confirmed(confirm: lapin::PublisherConfirm, routing_key: &str) -> Result<(), QueueError> {
    let result = wait_confirmed(confirm, routing_key).await;
    let outcome = match &result {
        Ok(()) => "ack",
        Err(QueueError::Backend(message)) if message.contains("(nack)") => "nack",
        Err(_) => "error",
    };
    metrics::counter!(sluice_ops::metrics::PUBLISH_CONFIRMS, "outcome" => outcome).increment(1);
    result
}

async fn wait_confirmed(confirm: lapin::PublisherConfirm, routing_key: &str) -> Result<(), QueueError> {
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Ok(confirmation) => check_confirmation(confirmation.map_err(backend)?, routing_key),
        Err(_) => Err(QueueError::Backend(format!(
            "the broker did not confirm a message for {routing_key} within {} s",
            CONFIRM_TIMEOUT.as_secs()
        ))),
    }
}

fn check_confirmation(confirmation: lapin::Confirmation, routing_key: &str) -> Result<(), QueueError> {
    if confirmation.is_nack() {
        return Err(QueueError::Backend(format!("the broker refused a message for {routing_key} (nack)")));
    }
    if let Some(returned) = confirmation.take_message() {
        return Err(QueueError::Backend(format!(
            "a message for {routing_key} was returned unroutable: {} {}",
            returned.reply_code, returned.reply_text
        )));
    }
    Ok(())
}

fn routing_key(event: &RunEvent) -> &'static str {
    match event {
        RunEvent::TaskRunning { .. } => "task.running",
        RunEvent::TaskDone { .. } => "task.done",
        RunEvent::TaskFailed { .. } => "task.failed",
        RunEvent::TaskAborted { .. } => "task.aborted",
        RunEvent::RunSettled { .. } => "run.settled",
        RunEvent::RunFinished { .. } => "run.finished",
    }
}

/// Answers one delivery. A failed ack (its channel was lost) means the message comes back.
struct RabbitAcknowledger {
    acker: lapin::Acker,
}

#[async_trait]
impl Acknowledger for RabbitAcknowledger {
    async fn ack(&self) -> Result<(), QueueError> {
        match tokio::time::timeout(CONFIRM_TIMEOUT, self.acker.ack(BasicAckOptions::default())).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => debug!("ack on a lost channel: the broker will deliver the message again"),
            Ok(Err(error)) => warn!(error = %error, "ack failed: the broker will deliver the message again"),
            Err(_) => warn!("ack not written in time: the broker will deliver the message again"),
        }
        Ok(())
    }

    async fn requeue(&self) -> Result<(), QueueError> {
        let nack = self.acker.nack(BasicNackOptions { requeue: true, multiple: false });
        tokio::time::timeout(CONFIRM_TIMEOUT, nack)
            .await
            .map_err(|_| QueueError::Backend("requeueing a message timed out".to_string()))?
            .map_err(backend)?;
        Ok(())
    }

    async fn reject(&self) -> Result<(), QueueError> {
        let reject = self.acker.reject(BasicRejectOptions { requeue: false });
        tokio::time::timeout(CONFIRM_TIMEOUT, reject)
            .await
            .map_err(|_| QueueError::Backend("rejecting a message timed out".to_string()))?
            .map_err(backend)?;
        Ok(())
    }
}

/// What to do with a delivery dropped unanswered: requeue it (in the background).
fn requeue_on_drop(acker: lapin::Acker) -> Option<Box<dyn FnOnce() + Send>> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    Some(Box::new(move || {
        handle.spawn(async move {
            if let Err(error) = acker.nack(BasicNackOptions { requeue: true, multiple: false }).await {
                debug!(error = %error, "requeueing a dropped delivery failed; the broker returns it when the channel closes");
            }
        });
    }))
}

/// Batches up to this size are published by the caller's task alone.
const PUBLISH_LANE_MIN: usize = 64;
/// Concurrent publishers of a larger batch.
const PUBLISH_LANES: usize = 8;

#[async_trait]
impl TaskQueue for RabbitBroker {
    async fn publish(&self, tasks: &[TaskMessage]) -> Result<(), QueueError> {
        let mut gateways: Vec<&str> = tasks.iter().map(|task| task.gateway.as_str()).collect();
        gateways.sort_unstable();
        gateways.dedup();
        for gateway in gateways {
            if !lock(&self.declared).contains(gateway) {
                self.declare_gateway(gateway).await?;
            }
        }
        // Pipelined: every publish first, then every confirm.
        if tasks.len() <= PUBLISH_LANE_MIN {
            let mut confirms = Vec::with_capacity(tasks.len());
            for task in tasks {
                let queue = self.config.task_queue(&task.gateway);
                let payload = sluice_proto::encode_task(&task_to_wire(task));
                confirms.push((self.publish_confirmed("", &queue, &payload).await?, queue));
            }
            for (confirm, queue) in confirms {
                confirmed(confirm, &queue).await?;
            }
            return Ok(());
        }
        // A large batch (a run's first ready tasks): lapin hands each publish to its I/O loop and
        // waits until it is written, so one publisher pays a thread hand-off per message. Several
        // lanes publishing at once let the I/O loop write many messages per wake-up.
        let channel = self.link().await?.confirmed.clone();
        let encoded: Vec<(String, Vec<u8>)> = tasks
            .iter()
            .map(|task| (self.config.task_queue(&task.gateway), sluice_proto::encode_task(&task_to_wire(task))))
            .collect();
        let lane_size = encoded.len().div_ceil(PUBLISH_LANES);
        let mut lanes = Vec::with_capacity(PUBLISH_LANES);
        let mut remaining = encoded.into_iter();
        loop {
            let lane: Vec<(String, Vec<u8>)> = remaining.by_ref().take(lane_size).collect();
            if lane.is_empty() {
                break;
            }
            let channel = channel.clone();
            lanes.push(tokio::spawn(async move {
                let mut confirms = Vec::with_capacity(lane.len());
                for (queue, payload) in lane {
                    let confirm = channel
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                            &payload,
                            BasicProperties::default().with_delivery_mode(PERSISTENT),
                        )
                        .await?;
                    confirms.push((confirm, queue));
                }
                Ok::<_, lapin::Error>(confirms)
            }));
        }
        for lane in lanes {
            let confirms = lane.await.map_err(|error| QueueError::Backend(format!("publishing: {error}")))?;
            for (confirm, queue) in confirms.map_err(backend)? {
                confirmed(confirm, &queue).await?;
            }
        }
        Ok(())
    }

    async fn next(&self, gateway: &str) -> Result<Option<Delivery>, QueueError> {
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(None);
            }
            let consumer = self.gateway_consumer(gateway).await?;
            let delivery = match self.next_delivery(&consumer).await {
                Ok(Some(delivery)) => delivery,
                Ok(None) => return Ok(None),
                Err(error) => {
                    self.consumers.lock().await.remove(gateway);
                    lock(&self.declared).remove(gateway);
                    return Err(error);
                }
            };
            match sluice_proto::decode_task(&delivery.data) {
                Ok(wire) => {
                    let task = task_from_wire(wire);
                    let on_drop = requeue_on_drop(delivery.acker.clone());
                    let acknowledger = Box::new(RabbitAcknowledger { acker: delivery.acker });
                    return Ok(Some(Delivery::new(task, delivery.redelivered, acknowledger, on_drop)));
                }
                Err(error) => {
                    warn!(
                        queue = %self.config.task_queue(gateway),
                        bytes = delivery.data.len(),
                        error = %error,
                        "a message on the task queue is not a task; dead-lettering it"
                    );
                    if let Err(error) = delivery.acker.reject(BasicRejectOptions { requeue: false }).await {
                        warn!(error = %error, "dead-lettering failed; the message comes back");
                    }
                }
            }
        }
    }

    async fn queued(&self, gateway: &str) -> Result<u64, QueueError> {
        Ok(u64::from(self.declare_gateway(gateway).await?.message_count()))
    }

    async fn take_dead_letters(&self, gateway: &str, max: usize) -> Result<Vec<Delivery>, QueueError> {
        self.declare_gateway(gateway).await?;
        let link = self.link().await?;
        let dead = self.config.dead_queue(gateway);
        let mut taken = Vec::new();
        while taken.len() < max {
            let got =
                link.plain.basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false }).await.map_err(backend)?;
            let Some(message) = got else { break };
            let delivery = message.delivery;
            match sluice_proto::decode_task(&delivery.data) {
                Ok(wire) => {
                    let on_drop = requeue_on_drop(delivery.acker.clone());
                    let acknowledger = Box::new(RabbitAcknowledger { acker: delivery.acker });
                    taken.push(Delivery::new(task_from_wire(wire), true, acknowledger, on_drop));
                }
                Err(error) => {
                    // Logged when it was dead-lettered too; nothing can act on it.
                    warn!(queue = %dead, bytes = delivery.data.len(), error = %error, "dropping a dead letter that is not a task");
                    if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
                        warn!(error = %error, "acking an undecodable dead letter failed");
                    }
                }
            }
        }
        Ok(taken)
    }

    async fn shut_down(&self) {
        self.shutdown.cancel();
        let consumers: Vec<Arc<GatewayConsumer>> = self.consumers.lock().await.values().cloned().collect();
        let settled = self.settled.lock().await.clone();
        for consumer in consumers.iter().chain(settled.iter()) {
            // In-flight deliveries stay on their channel to be acked; the prefetched rest go back
            // to the queue when the connection closes.
            let cancel = consumer.channel.basic_cancel(consumer.tag.as_str().into(), BasicCancelOptions::default());
            match tokio::time::timeout(GOODBYE_TIMEOUT, cancel).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => debug!(error = %error, "cancelling a consumer"),
                Err(_) => debug!("cancelling a consumer timed out"),
            }
        }
    }
}

#[async_trait]
impl EventBus for RabbitBroker {
    async fn publish(&self, event: RunEvent) -> Result<(), QueueError> {
        let exchange = self.config.events_exchange();
        let key = routing_key(&event);
        let payload = sluice_proto::encode_run_event(&event_to_wire(&event));
        if matches!(event, RunEvent::RunSettled { .. }) {
            let confirm = self.publish_confirmed(&exchange, key, &payload).await?;
            return confirmed(confirm, key).await;
        }
        let link = self.link().await?;
        link.plain
            .basic_publish(
                exchange.as_str().into(),
                key.into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default(),
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn subscribe(&self) -> Result<EventStream, QueueError> {
        let (sender, receiver) = broadcast::channel(1 << 16);
        let link = self.link().await?;
        let channel = link.connection.create_channel().await.map_err(backend)?;
        let queue = channel
            .queue_declare(
                ShortString::from(""),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() },
                FieldTable::default(),
            )
            .await
            .map_err(backend)?;
        let exchange = self.config.events_exchange();
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(backend)?;
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                ShortString::from(""),
                BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                FieldTable::default(),
            )
            .await
            .map_err(backend)?;
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    item = consumer.next() => item,
                };
                match item {
                    Some(Ok(delivery)) => match sluice_proto::decode_run_event(&delivery.data) {
                        Ok(event) => {
                            if sender.send(event_from_wire(event)).is_err() {
                                break; // nobody listens any more
                            }
                        }
                        Err(error) => warn!(error = %error, "an event message does not decode; ignored"),
                    },
                    Some(Err(error)) => {
                        // The stream ends; the subscriber subscribes again.
                        warn!(error = %error, "event subscription failed");
                        break;
                    }
                    None => break,
                }
            }
            if let Ok(Err(error)) =
                tokio::time::timeout(GOODBYE_TIMEOUT, channel.close(200, "sluice: unsubscribed".into())).await
            {
                debug!(error = %error, "closing the event channel");
            }
        });
        Ok(EventStream::new(receiver))
    }

    async fn next_settled(&self) -> Result<Option<SettledRun>, QueueError> {
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(None);
            }
            let consumer = {
                let mut settled = self.settled.lock().await;
                let current = self.generation.load(std::sync::atomic::Ordering::SeqCst);
                match settled.as_ref() {
                    Some(consumer) if consumer.generation == current && consumer.channel.status().connected() => {
                        Arc::clone(consumer)
                    }
                    _ => {
                        let consumer = self.consume(&self.config.settled_queue(), 1).await?;
                        *settled = Some(Arc::clone(&consumer));
                        consumer
                    }
                }
            };
            let delivery = match self.next_delivery(&consumer).await {
                Ok(Some(delivery)) => delivery,
                Ok(None) => return Ok(None),
                Err(error) => {
                    *self.settled.lock().await = None;
                    return Err(error);
                }
            };
            match sluice_proto::decode_run_event(&delivery.data).map(event_from_wire) {
                Ok(RunEvent::RunSettled { run_id, plan_id }) => {
                    let on_drop = requeue_on_drop(delivery.acker.clone());
                    let acknowledger = Box::new(RabbitAcknowledger { acker: delivery.acker });
                    return Ok(Some(SettledRun::new(run_id, plan_id, acknowledger, on_drop)));
                }
                other => {
                    warn!(result = ?other.map(|event| routing_key(&event)), "a message on the settled-runs queue is not a settled run; dropping it");
                    if let Err(error) = delivery.acker.reject(BasicRejectOptions { requeue: false }).await {
                        debug!(error = %error, "rejecting");
                    }
                }
            }
        }
    }

    async fn shut_down(&self) {
        TaskQueue::shut_down(self).await;
    }
}

/// Brokers for tests: the RabbitMQ at 127.0.0.1:5672 (`SLUICE_TEST_AMQP_URL` to move it), each
/// under its own name prefix.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub async fn broker(prefetch: u16) -> RabbitBroker {
        let url =
            std::env::var("SLUICE_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut config = RabbitConfig::new(&url);
        config.prefix = format!("sluice-test-{}-{unique}", std::process::id());
        config.prefetch = prefetch;
        config.delivery_limit = 3;
        RabbitBroker::connect(config).await.unwrap_or_else(|error| panic!("RabbitMQ must run for these tests: {error}"))
    }
}
