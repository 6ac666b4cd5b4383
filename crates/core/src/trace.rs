//! W3C trace context (`traceparent`) for one apply: every process derives the same ids from the
//! run id, so the coordinator's, the workers' and the promoter's lines of one run share a trace
//! id, and each task's message carries its own span under it.
//!
//! `traceparent` = `00-<trace id, 32 hex>-<parent span id, 16 hex>-01` (version 00, sampled).

use crate::names::RunId;

/// The run's trace id: 32 lowercase hex digits, never all zero.
pub fn trace_id(run_id: &RunId) -> String {
    let hash = blake3::hash(format!("sluice-trace:{}", run_id.0).as_bytes());
    nonzero_hex(&hash.as_bytes()[..16])
}

/// A task's span id under its run's trace: 16 lowercase hex digits, never all zero.
pub fn task_span_id(run_id: &RunId, task_index: u32) -> String {
    let hash = blake3::hash(format!("sluice-span:{}:{task_index}", run_id.0).as_bytes());
    nonzero_hex(&hash.as_bytes()[..8])
}

/// The `traceparent` a task's message carries.
pub fn task_traceparent(run_id: &RunId, task_index: u32) -> String {
    format!("00-{}-{}-01", trace_id(run_id), task_span_id(run_id, task_index))
}

/// The trace id of a `traceparent` header, when it is well formed (version 00, ids of the
/// right length in lowercase hex, neither all zero).
pub fn parse_traceparent(header: &str) -> Option<&str> {
    let mut parts = header.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |text: &str, length: usize| {
        text.len() == length && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |text: &str| text.bytes().all(|b| b == b'0');
    let well_formed = parts.next().is_none()
        && version == "00"
        && hex(trace, 32)
        && !zero(trace)
        && hex(span, 16)
        && !zero(span)
        && hex(flags, 2);
    well_formed.then_some(trace)
}

fn nonzero_hex(bytes: &[u8]) -> String {
    let mut text: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    if text.bytes().all(|b| b == b'0') {
        text.replace_range(text.len() - 1.., "1");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tasks_traceparent_is_valid_and_under_its_runs_trace() {
        let run = RunId("run-1".to_string());
        let header = task_traceparent(&run, 7);
        assert_eq!(parse_traceparent(&header), Some(trace_id(&run).as_str()));
        assert_ne!(task_span_id(&run, 7), task_span_id(&run, 8));
        assert_ne!(trace_id(&run), trace_id(&RunId("run-2".to_string())));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for header in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert_eq!(parse_traceparent(header), None, "{header}");
        }
        assert!(parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").is_some());
    }
}
