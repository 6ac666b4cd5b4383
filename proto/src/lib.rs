//! Wire messages between sluice's processes: plain serde types with primitive fields, encoded as
//! one format-version byte followed by the body (see `codec`).
//!
//! These are not the domain types: `sluice-queue` converts `TaskMessage`, `Completion` and
//! `RunEvent` to and from them at the edge, so the domain can change without changing the wire.
//! Decoding never panics: bytes that do not decode give a [`DecodeError`], and the consumer
//! dead-letters the message with a log line.

mod codec;

use serde::{Deserialize, Serialize};

/// The format version written as the first byte of every message.
pub const FORMAT_VERSION: u8 = 1;

/// One task on a gateway's queue (`sluice.tasks.<gateway>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTask {
    pub plan_id: String,
    pub run_id: String,
    /// The task's index in the plan's task graph.
    pub task_index: u32,
    /// The task's 16-byte content hash (snapshot and interval batch).
    pub task_id: [u8; 16],
    pub gateway: String,
    /// How many times the task was published for this run before.
    pub attempt: u32,
    /// A W3C `traceparent` (or similar) to follow the plan across processes.
    pub trace_context: Option<String>,
}

/// What completing a task in the dependency gate said, mirroring `sluice_queue::Completion`
/// together with the task it is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireCompletion {
    pub run_id: String,
    pub task_index: u32,
    /// False when the task was already done (a duplicate completion).
    pub newly_done: bool,
    /// Children with no unfinished parent that are not done yet.
    pub ready: Vec<u32>,
    /// Nothing of the run is outstanding any more.
    pub run_complete: bool,
}

/// What happens during a run, mirroring `sluice_queue::RunEvent` variant for variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireRunEvent {
    TaskDone {
        run_id: String,
        task_index: u32,
        intervals: u32,
        rows: u64,
        retries: u32,
        skipped: bool,
    },
    TaskFailed {
        run_id: String,
        task_index: u32,
        error: String,
    },
    /// A delivery was dropped because the run's breaker was tripped.
    TaskAborted {
        run_id: String,
        task_index: u32,
    },
    /// Nothing of the run is outstanding: the promoter takes over (`sluice.runs.done`).
    RunSettled {
        run_id: String,
        plan_id: String,
    },
    /// The promoter finished the run: promoted, failed or aborted.
    RunFinished {
        run_id: String,
        outcome: String,
    },
    /// A worker is executing the task (sent when it starts and then as a heartbeat).
    TaskRunning {
        run_id: String,
        task_index: u32,
    },
}

/// Bytes that are not a message of this format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("unknown wire format version {0} (this build reads version 1)")]
    UnknownVersion(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
}

pub fn encode_task(task: &WireTask) -> Vec<u8> {
    encode(task)
}

pub fn decode_task(bytes: &[u8]) -> Result<WireTask, DecodeError> {
    decode(bytes)
}

pub fn encode_completion(completion: &WireCompletion) -> Vec<u8> {
    encode(completion)
}

pub fn decode_completion(bytes: &[u8]) -> Result<WireCompletion, DecodeError> {
    decode(bytes)
}

pub fn encode_run_event(event: &WireRunEvent) -> Vec<u8> {
    encode(event)
}

pub fn decode_run_event(bytes: &[u8]) -> Result<WireRunEvent, DecodeError> {
    decode(bytes)
}

fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut bytes = vec![FORMAT_VERSION];
    codec::encode_body(message, &mut bytes);
    bytes
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let Some((&version, body)) = bytes.split_first() else {
        return Err(DecodeError::Empty);
    };
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    codec::decode_body(body).map_err(DecodeError::Malformed)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn task() -> WireTask {
        WireTask {
            plan_id: "plan-1".into(),
            run_id: "plan-1-0".into(),
            task_index: 42,
            task_id: [7; 16],
            gateway: "warehouse".into(),
            attempt: 2,
            trace_context: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    fn events() -> Vec<WireRunEvent> {
        let run_id = String::from("plan-1-0");
        vec![
            WireRunEvent::TaskDone {
                run_id: run_id.clone(),
                task_index: 3,
                intervals: 24,
                rows: u64::MAX,
                retries: 1,
                skipped: false,
            },
            WireRunEvent::TaskFailed {
                run_id: run_id.clone(),
                task_index: 4,
                error: "relation \"x\" does not exist".into(),
            },
            WireRunEvent::TaskAborted { run_id: run_id.clone(), task_index: 5 },
            WireRunEvent::RunSettled { run_id: run_id.clone(), plan_id: "plan-1".into() },
            WireRunEvent::RunFinished { run_id: run_id.clone(), outcome: "promoted".into() },
            WireRunEvent::TaskRunning { run_id, task_index: 6 },
        ]
    }

    #[test]
    fn messages_round_trip_behind_the_version_byte() {
        let task = task();
        let bytes = encode_task(&task);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode_task(&bytes), Ok(task.clone()));
        let untraced = WireTask { trace_context: None, ..task };
        assert_eq!(decode_task(&encode_task(&untraced)), Ok(untraced));

        let completion = WireCompletion {
            run_id: "plan-1-0".into(),
            task_index: 0,
            newly_done: true,
            ready: vec![1, 2, u32::MAX],
            run_complete: false,
        };
        assert_eq!(decode_completion(&encode_completion(&completion)), Ok(completion));

        for event in events() {
            assert_eq!(decode_run_event(&encode_run_event(&event)), Ok(event));
        }
    }

    #[test]
    fn empty_and_unknown_versions_are_refused() {
        assert_eq!(decode_task(&[]), Err(DecodeError::Empty));
        let mut bytes = encode_task(&task());
        for version in [0, 2, 255] {
            bytes[0] = version;
            assert_eq!(decode_task(&bytes), Err(DecodeError::UnknownVersion(version)));
        }
    }

    #[test]
    fn truncated_and_padded_messages_are_malformed() {
        let task_bytes = encode_task(&task());
        for length in 1..task_bytes.len() {
            assert!(matches!(decode_task(&task_bytes[..length]), Err(DecodeError::Malformed(_))), "{length}");
        }
        for event in events() {
            let bytes = encode_run_event(&event);
            for length in 1..bytes.len() {
                assert!(matches!(decode_run_event(&bytes[..length]), Err(DecodeError::Malformed(_))), "{event:?}");
            }
        }
        let mut padded = encode_task(&task());
        padded.push(0);
        assert!(matches!(decode_task(&padded), Err(DecodeError::Malformed(message)) if message.contains("trailing")));
    }

    #[test]
    fn a_message_of_another_type_does_not_pass_as_a_task() {
        let bytes = encode_run_event(&WireRunEvent::TaskAborted { run_id: "r".into(), task_index: 1 });
        assert!(decode_task(&bytes).is_err());
    }

    #[test]
    fn a_huge_length_prefix_is_refused_without_allocating_it() {
        // Version, then a varint length of u64::MAX for `plan_id`.
        let bytes = [FORMAT_VERSION, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(matches!(decode_task(&bytes), Err(DecodeError::Malformed(_))));
    }

    fn wire_task() -> impl Strategy<Value = WireTask> {
        (
            ".{0,20}",
            ".{0,20}",
            any::<u32>(),
            any::<[u8; 16]>(),
            "[a-z_]{0,12}",
            any::<u32>(),
            proptest::option::of(".{0,60}"),
        )
            .prop_map(|(plan_id, run_id, task_index, task_id, gateway, attempt, trace_context)| WireTask {
                plan_id,
                run_id,
                task_index,
                task_id,
                gateway,
                attempt,
                trace_context,
            })
    }

    proptest! {
        #[test]
        fn any_task_round_trips(task in wire_task()) {
            prop_assert_eq!(decode_task(&encode_task(&task)), Ok(task));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_task(&bytes);
            let _ = decode_completion(&bytes);
            let _ = decode_run_event(&bytes);
        }

        #[test]
        fn arbitrary_bodies_behind_a_valid_version_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = vec![FORMAT_VERSION];
            bytes.extend(body);
            let _ = decode_task(&bytes);
            let _ = decode_completion(&bytes);
            let _ = decode_run_event(&bytes);
        }
    }
}
