//! `sluice bench`: measurements anyone can rerun. `bench plan` times planning a synthetic
//! project (a million tasks by default) and missing-interval computation against a million
//! recorded intervals, and reports peak memory.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use sluice_core::cron::{Cron, missing_intervals};
use sluice_core::interval::{Interval, IntervalSet, Timestamp};
use sluice_core::plan::first_plan;
use sluice_core::project::load_project;
use sluice_core::synthetic::SyntheticProject;
use sluice_core::task_graph::{Readiness, TaskGraph};

/// Peak resident memory of this process so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn seconds(duration: Duration) -> String {
    format!("{:.3} s", duration.as_secs_f64())
}

#[derive(Debug, Clone)]
pub struct PlanBenchConfig {
    pub models: usize,
    pub layers: usize,
    pub intervals: usize,
    pub recorded: usize,
    /// RabbitMQ and Redis URLs: also load the counters into Redis and publish the ready tasks
    /// to RabbitMQ, as the distributed coordinator does.
    pub services: Option<(String, String)>,
}

/// Loads the run's counters into Redis and publishes its ready tasks to RabbitMQ, as the
/// coordinator does; returns the two durations. Everything it made is deleted afterwards.
async fn load_and_publish(
    services: &(String, String),
    plan: &sluice_core::plan::Plan,
    graph: &TaskGraph,
    ready: &[u32],
) -> Result<(Duration, Duration)> {
    use sluice_queue::rabbitmq::{RabbitBroker, RabbitConfig};
    use sluice_queue::redis_gate::RedisGate;
    use sluice_queue::{DependencyGate, TaskMessage, TaskQueue};
    let (amqp_url, redis_url) = services;
    let prefix = format!("sluice_bench_plan_{}", std::process::id());
    let run_id = sluice_core::names::RunId(format!("{}-1", plan.id));
    let gate = RedisGate::connect(redis_url, &prefix, Duration::from_secs(3600)).await?;
    let broker = RabbitBroker::connect(RabbitConfig { prefix: prefix.clone(), ..RabbitConfig::new(amqp_url) }).await?;
    let gateways: Vec<String> = plan
        .snapshots
        .iter()
        .map(|planned| planned.snapshot.gateway.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // The topology exists before the run, as it does once workers run.
    for gateway in &gateways {
        broker.queued(gateway).await?;
    }
    let outcome = async {
        let began = Instant::now();
        let counts = graph.parent_counts();
        gate.load(&run_id, &counts, &vec![false; graph.len()]).await?;
        let loaded = began.elapsed();
        let began = Instant::now();
        let messages: Vec<TaskMessage> = ready
            .iter()
            .map(|&index| {
                let task = graph.tasks[index as usize];
                TaskMessage {
                    plan_id: plan.id.clone(),
                    run_id: run_id.clone(),
                    task_index: index,
                    task_id: task.id,
                    gateway: plan.snapshots[task.snapshot as usize].snapshot.gateway.clone(),
                    attempt: 0,
                }
            })
            .collect();
        broker.publish(&messages).await?;
        Ok::<_, anyhow::Error>((loaded, began.elapsed()))
    }
    .await;
    gate.clear(&run_id).await?;
    let names: Vec<&str> = gateways.iter().map(String::as_str).collect();
    broker.delete_topology(&names).await?;
    broker.close().await;
    outcome
}

pub async fn bench_plan(config: PlanBenchConfig) -> Result<()> {
    let shape = SyntheticProject::duckdb(config.models, config.layers, config.intervals, true);
    let files = shape.files();
    let start = Timestamp::parse(sluice_core::synthetic::SYNTHETIC_START).map_err(|e| anyhow!("{e}"))?;
    let now = Timestamp(start.0 + shape.span_seconds());
    println!(
        "sluice bench plan: {} models in {} layers x {} hourly intervals, batch_size 1",
        config.models, config.layers, config.intervals
    );

    let began = Instant::now();
    let project = load_project(&files).map_err(|errors| anyhow!("{errors}"))?;
    let loaded = began.elapsed();

    let plan_began = Instant::now();
    let plan = first_plan(&project, now);
    let planned = plan_began.elapsed();

    let graph_began = Instant::now();
    let graph = TaskGraph::build(&plan);
    let built = graph_began.elapsed();

    let counters_began = Instant::now();
    let readiness = Readiness::new(&graph);
    let ready = readiness.ready();
    let counted = counters_began.elapsed();
    let mut total = began.elapsed();

    println!("  project loaded (parse, dependencies)   {}", seconds(loaded));
    println!("  plan (fingerprints, missing, batches)  {}", seconds(planned));
    println!("  task graph ({} tasks, {} edges)  {}", graph.len(), graph.edge_count(), seconds(built));
    println!("  counters + ready set ({} ready)        {}", ready.len(), seconds(counted));
    if let Some(services) = &config.services {
        let (loaded, published) = load_and_publish(services, &plan, &graph, &ready).await?;
        println!("  counters loaded into Redis             {}", seconds(loaded));
        println!("  ready tasks published to RabbitMQ      {} ({} confirmed)", seconds(published), ready.len());
        total += loaded + published;
    }
    println!("  total                                  {}", seconds(total));
    println!("  critical path                          {} tasks", graph.critical_path_length());
    if let Some(peak) = peak_rss_mib() {
        println!("  peak RSS                               {peak:.0} MiB");
    }

    // Missing intervals of one model against a million recorded hourly intervals, half of them
    // missing every other hour (the worst case for compaction: 500,000 ranges).
    let hourly = Cron::parse("@hourly").map_err(|e| anyhow!("{e}"))?;
    let mut contiguous = IntervalSet::new();
    let mut fragmented = IntervalSet::new();
    for hour in 0..config.recorded as i64 {
        let interval = Interval::new(Timestamp(start.0 + hour * 3600), Timestamp(start.0 + (hour + 1) * 3600));
        contiguous.insert(interval);
        if hour % 2 == 0 {
            fragmented.insert(interval);
        }
    }
    let end = Timestamp(start.0 + (config.recorded as i64 + 24) * 3600);
    let missing_began = Instant::now();
    let missing_contiguous = missing_intervals(&hourly, start, end, &contiguous);
    let contiguous_time = missing_began.elapsed();
    let missing_began = Instant::now();
    let missing_fragmented = missing_intervals(&hourly, start, end, &fragmented);
    let fragmented_time = missing_began.elapsed();
    println!(
        "  missing vs {} recorded (1 range)      {} ({} missing)",
        config.recorded,
        seconds(contiguous_time),
        missing_contiguous.len()
    );
    println!(
        "  missing vs {} recorded ({} ranges)  {} ({} missing)",
        config.recorded / 2,
        fragmented.ranges().len(),
        seconds(fragmented_time),
        missing_fragmented.len()
    );
    Ok(())
}
