//! Dead-lettered tasks end their run instead of stalling it. The broker dead-letters a task
//! delivered more often than its delivery limit (every worker that took it died, or could not
//! answer, that many times); nobody would run it again, so its run would wait forever and at
//! last look purged. Whoever follows or reconciles runs takes the dead letters of their
//! gateways: a task whose interval is recorded finished after all (only its acks were lost) and
//! is completed; any other fails its run naming the task, its interval and why. Dead letters of
//! runs that are not running (or unknown) stay where they are, for an operator.

use std::collections::BTreeMap;
use std::sync::Arc;

use sluice_core::names::PlanId;
use sluice_core::task_graph::TaskGraph;
use sluice_queue::{RunEvent, TaskMessage};
use sluice_state::host::offload;
use sluice_state::{RunStatus, TaskFailure};
use tracing::warn;

use crate::{ApplyError, CoordinatorDeps};

/// The most dead letters taken from one gateway per call.
const DEAD_LETTERS_PER_CALL: usize = 64;

/// Takes the gateways' dead letters and tells their runs; returns how many were handled.
pub async fn settle_dead_letters<'a>(
    deps: &CoordinatorDeps,
    gateways: impl IntoIterator<Item = &'a str>,
) -> Result<usize, ApplyError> {
    let mut graphs: BTreeMap<PlanId, Arc<(sluice_core::plan::Plan, TaskGraph)>> = BTreeMap::new();
    let mut handled = 0;
    for gateway in gateways {
        for delivery in deps.queue.take_dead_letters(gateway, DEAD_LETTERS_PER_CALL).await? {
            let message = delivery.task.clone();
            let run = deps.state.get_run(&message.run_id).await?;
            if run.is_none_or(|run| run.status != RunStatus::Running) {
                // A task of a finished or unknown run: nothing waits for it; it stays a dead
                // letter for an operator to look at.
                delivery.requeue().await?;
                continue;
            }
            let graph = match graphs.get(&message.plan_id) {
                Some(graph) => Arc::clone(graph),
                None => {
                    let Some(plan) = deps.state.get_plan(&message.plan_id).await? else {
                        delivery.requeue().await?;
                        continue;
                    };
                    let built = offload(move || {
                        let graph = TaskGraph::build(&plan);
                        (plan, graph)
                    })
                    .await
                    .map_err(ApplyError::Join)?;
                    let built = Arc::new(built);
                    graphs.insert(message.plan_id.clone(), Arc::clone(&built));
                    built
                }
            };
            match settle_one(deps, &graph.0, &graph.1, &message).await {
                Ok(()) => {
                    delivery.ack().await?;
                    handled += 1;
                }
                Err(error) => {
                    // The gate lost the run (its rebuild settles the task) or a service is down:
                    // the dead letter goes back and is taken again later.
                    warn!(run_id = %message.run_id, error = %error, "handling a dead letter failed; it is kept for later");
                    drop(delivery);
                    break;
                }
            }
        }
    }
    Ok(handled)
}

async fn settle_one(
    deps: &CoordinatorDeps,
    plan: &sluice_core::plan::Plan,
    graph: &TaskGraph,
    message: &TaskMessage,
) -> Result<(), ApplyError> {
    let index = message.task_index;
    let Some(task) = graph.tasks.get(index as usize).copied() else { return Ok(()) };
    let snapshot = &plan.snapshots[task.snapshot as usize].snapshot;
    let key = (snapshot.name.clone(), snapshot.version.clone());
    let recorded = deps.state.get_intervals(std::slice::from_ref(&key)).await?;
    let run_complete = if recorded.get(&key).is_some_and(|set| set.covers(task.interval)) {
        // It finished; only its acks were lost. Release what waits for it.
        let children: Vec<u32> = graph.children(index).collect();
        let completion = deps.gate.complete(&message.run_id, index, &children).await?;
        let ready: Vec<TaskMessage> = completion
            .ready
            .iter()
            .map(|child| {
                let child_task = graph.tasks[*child as usize];
                TaskMessage {
                    plan_id: message.plan_id.clone(),
                    run_id: message.run_id.clone(),
                    task_index: *child,
                    task_id: child_task.id,
                    gateway: plan.snapshots[child_task.snapshot as usize].snapshot.gateway.clone(),
                    attempt: 1,
                }
            })
            .collect();
        if !ready.is_empty() {
            deps.queue.publish(&ready).await?;
        }
        completion.run_complete
    } else {
        warn!(run_id = %message.run_id, model = %snapshot.name, interval = %task.interval, "a task was dead-lettered; its run fails");
        let failure = TaskFailure {
            task_id: task.id,
            model: snapshot.name.clone(),
            interval: task.interval,
            error: "delivered too many times: every worker that took it died or could not answer, and the broker \
                    dead-lettered it"
                .to_string(),
            attempts: 0,
        };
        deps.state.record_task_failure(&message.run_id, &failure).await?;
        let settled = graph.with_descendants([index]);
        deps.gate.skip(&message.run_id, &settled).await?
    };
    if run_complete {
        deps.events
            .publish(RunEvent::RunSettled { run_id: message.run_id.clone(), plan_id: message.plan_id.clone() })
            .await?;
    }
    Ok(())
}
