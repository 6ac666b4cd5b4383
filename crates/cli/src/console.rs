//! What the binary tells its operator on stderr: plain lines in the text log format, log events
//! (target `sluice::console`) in the JSON one, so that every stderr line of a JSON-logging
//! process parses and carries the span's ids.

use std::sync::OnceLock;

static JSON: OnceLock<bool> = OnceLock::new();

/// Chooses the JSON form for the rest of the process (set once, at start).
pub fn use_json(json: bool) {
    let _ = JSON.set(json);
}

pub fn json() -> bool {
    JSON.get().copied().unwrap_or(false)
}

/// A line for the operator.
pub fn say(text: &str) {
    if json() {
        tracing::info!(target: "sluice::console", "{text}");
    } else {
        eprintln!("{text}");
    }
}

/// An error for the operator.
pub fn error(text: &str) {
    if json() {
        tracing::error!(target: "sluice::console", "{text}");
    } else {
        eprintln!("error: {text}");
    }
}

/// A command's result line: stdout in the text format; in the JSON one a log event on stderr,
/// so that a JSON-logging role's output is all JSON (`kubectl logs` interleaves both streams).
pub fn result(text: &str) {
    if json() {
        tracing::info!(target: "sluice::console", "{text}");
    } else {
        println!("{text}");
    }
}
