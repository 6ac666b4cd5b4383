//! Conversion between the domain's messages and the wire's (`sluice-proto`), at the edge where
//! bytes leave or enter a process.

use sluice_core::names::{PlanId, RunId, TaskId};
use sluice_proto::{WireRunEvent, WireTask};

use crate::{RunEvent, TaskMessage};

pub fn task_to_wire(task: &TaskMessage) -> WireTask {
    WireTask {
        plan_id: task.plan_id.0.clone(),
        run_id: task.run_id.0.clone(),
        task_index: task.task_index,
        task_id: task.task_id.0,
        gateway: task.gateway.clone(),
        attempt: task.attempt,
        trace_context: Some(sluice_core::trace::task_traceparent(&task.run_id, task.task_index)),
    }
}

pub fn task_from_wire(task: WireTask) -> TaskMessage {
    TaskMessage {
        plan_id: PlanId(task.plan_id),
        run_id: RunId(task.run_id),
        task_index: task.task_index,
        task_id: TaskId(task.task_id),
        gateway: task.gateway,
        attempt: task.attempt,
    }
}

pub fn event_to_wire(event: &RunEvent) -> WireRunEvent {
    match event.clone() {
        RunEvent::TaskRunning { run_id, task_index } => WireRunEvent::TaskRunning { run_id: run_id.0, task_index },
        RunEvent::TaskDone { run_id, task_index, intervals, rows, retries, skipped } => {
            WireRunEvent::TaskDone { run_id: run_id.0, task_index, intervals, rows, retries, skipped }
        }
        RunEvent::TaskFailed { run_id, task_index, error } => {
            WireRunEvent::TaskFailed { run_id: run_id.0, task_index, error }
        }
        RunEvent::TaskAborted { run_id, task_index } => WireRunEvent::TaskAborted { run_id: run_id.0, task_index },
        RunEvent::RunSettled { run_id, plan_id } => WireRunEvent::RunSettled { run_id: run_id.0, plan_id: plan_id.0 },
        RunEvent::RunFinished { run_id, outcome } => WireRunEvent::RunFinished { run_id: run_id.0, outcome },
    }
}

pub fn event_from_wire(event: WireRunEvent) -> RunEvent {
    match event {
        WireRunEvent::TaskRunning { run_id, task_index } => RunEvent::TaskRunning { run_id: RunId(run_id), task_index },
        WireRunEvent::TaskDone { run_id, task_index, intervals, rows, retries, skipped } => {
            RunEvent::TaskDone { run_id: RunId(run_id), task_index, intervals, rows, retries, skipped }
        }
        WireRunEvent::TaskFailed { run_id, task_index, error } => {
            RunEvent::TaskFailed { run_id: RunId(run_id), task_index, error }
        }
        WireRunEvent::TaskAborted { run_id, task_index } => RunEvent::TaskAborted { run_id: RunId(run_id), task_index },
        WireRunEvent::RunSettled { run_id, plan_id } => {
            RunEvent::RunSettled { run_id: RunId(run_id), plan_id: PlanId(plan_id) }
        }
        WireRunEvent::RunFinished { run_id, outcome } => RunEvent::RunFinished { run_id: RunId(run_id), outcome },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_and_events_survive_the_wire() {
        let task = TaskMessage {
            plan_id: PlanId("p".into()),
            run_id: RunId("p-1".into()),
            task_index: 9,
            task_id: TaskId([3; 16]),
            gateway: "warehouse".into(),
            attempt: 1,
        };
        let bytes = sluice_proto::encode_task(&task_to_wire(&task));
        assert_eq!(task_from_wire(sluice_proto::decode_task(&bytes).unwrap()), task);
        let run_id = RunId("p-1".into());
        let events = [
            RunEvent::TaskRunning { run_id: run_id.clone(), task_index: 1 },
            RunEvent::TaskDone {
                run_id: run_id.clone(),
                task_index: 2,
                intervals: 3,
                rows: 4,
                retries: 5,
                skipped: true,
            },
            RunEvent::TaskFailed { run_id: run_id.clone(), task_index: 6, error: "boom".into() },
            RunEvent::TaskAborted { run_id: run_id.clone(), task_index: 7 },
            RunEvent::RunSettled { run_id: run_id.clone(), plan_id: PlanId("p".into()) },
            RunEvent::RunFinished { run_id, outcome: "promoted".into() },
        ];
        for event in events {
            let bytes = sluice_proto::encode_run_event(&event_to_wire(&event));
            assert_eq!(event_from_wire(sluice_proto::decode_run_event(&bytes).unwrap()), event);
        }
    }
}
