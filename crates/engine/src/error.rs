//! `EngineError`: what went wrong in a warehouse, and whether retrying can help (`is_transient`).

use thiserror::Error;

/// A failure of a warehouse adapter. Every variant keeps the engine's own error text (it is recorded in state for
/// the user) and never a password or a connection URL.
#[derive(Debug, Error)]
pub enum EngineError {
    /// Opening the gateway's connection failed; transient when the reason is.
    #[error("could not connect to gateway {gateway}: {reason}")]
    Connect { gateway: String, reason: Box<EngineError> },
    /// The gateway's engine (or this build) has no adapter.
    #[error("gateway {gateway}: {what}")]
    Unsupported { gateway: String, what: String },
    /// The connection was lost, refused, shut down by an administrator, or the server has no free slot.
    #[error("{engine} connection unavailable: {message}")]
    Unavailable { engine: &'static str, message: String },
    /// A statement or lock wait timed out, or the server cancelled the statement.
    #[error("{engine} timed out: {message}")]
    Timeout { engine: &'static str, message: String },
    /// Serialization failure, deadlock, or DuckDB's optimistic write-write conflict.
    #[error("{engine} transaction conflict: {message}")]
    Conflict { engine: &'static str, message: String },
    /// The engine rejected the statement: SQL error, missing object, type error, constraint violation.
    #[error("{engine} error{}: {message}", code.as_deref().map(|code| format!(" {code}")).unwrap_or_default())]
    Statement { engine: &'static str, code: Option<String>, message: String },
    /// The connection settings cannot work (TLS, options); retrying the same settings cannot help.
    #[error("{engine} configuration error: {message}")]
    Configuration { engine: &'static str, message: String },
    /// A value handed to the adapter cannot be turned into SQL (a bad declared type, a malformed seed).
    #[error("invalid input: {message}")]
    InvalidInput { message: String },
    /// The engine answered something the adapter did not expect (a non-integer for `query_i64`).
    #[error("{engine} returned an unexpected result: {message}")]
    UnexpectedResult { engine: &'static str, message: String },
    /// A blocking audit found rows that break it; the write was rolled back.
    #[error("audit {audit} failed: {rows} row(s) break it; the write was rolled back")]
    AuditFailed { audit: String, rows: i64 },
    /// The blocking thread running a DuckDB call panicked or was cancelled.
    #[error("{engine} call did not complete: {message}")]
    BlockingCall { engine: &'static str, message: String },
}

impl EngineError {
    /// Whether retrying the same work later can succeed: lost or refused connections, timeouts, serialization
    /// failures, deadlocks and transaction conflicts. SQL errors, missing objects and type errors are persistent.
    pub fn is_transient(&self) -> bool {
        match self {
            EngineError::Connect { reason, .. } => reason.is_transient(),
            EngineError::Unavailable { .. } | EngineError::Timeout { .. } | EngineError::Conflict { .. } => true,
            EngineError::Unsupported { .. }
            | EngineError::Statement { .. }
            | EngineError::Configuration { .. }
            | EngineError::InvalidInput { .. }
            | EngineError::UnexpectedResult { .. }
            | EngineError::AuditFailed { .. }
            | EngineError::BlockingCall { .. } => false,
        }
    }

    /// The SQLSTATE (PostgreSQL) of a rejected statement, when the engine reported one.
    pub fn sql_state(&self) -> Option<&str> {
        match self {
            EngineError::Statement { code, .. } => code.as_deref(),
            EngineError::Connect { reason, .. } => reason.sql_state(),
            _ => None,
        }
    }

    pub(crate) fn invalid_input(message: impl Into<String>) -> EngineError {
        EngineError::InvalidInput { message: message.into() }
    }

    pub(crate) fn for_gateway(self, gateway: &str) -> EngineError {
        match self {
            EngineError::Connect { .. } => self,
            reason => EngineError::Connect { gateway: gateway.to_string(), reason: Box::new(reason) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_errors_show_their_code_and_are_persistent() {
        let error = EngineError::Statement {
            engine: "postgres",
            code: Some("42601".to_string()),
            message: "syntax error at or near \"SELEC\"".to_string(),
        };
        assert_eq!(error.to_string(), "postgres error 42601: syntax error at or near \"SELEC\"");
        assert!(!error.is_transient());
        let uncoded = EngineError::Statement { engine: "duckdb", code: None, message: "Parser Error".to_string() };
        assert_eq!(uncoded.to_string(), "duckdb error: Parser Error");
    }

    #[test]
    fn connect_errors_name_the_gateway_and_inherit_transience() {
        let refused = EngineError::Unavailable { engine: "postgres", message: "connection refused".to_string() }
            .for_gateway("warehouse");
        assert!(refused.is_transient());
        assert_eq!(
            refused.to_string(),
            "could not connect to gateway warehouse: postgres connection unavailable: connection refused"
        );
        let missing = EngineError::Statement {
            engine: "postgres",
            code: Some("3D000".to_string()),
            message: "database \"x\" does not exist".to_string(),
        }
        .for_gateway("warehouse");
        assert!(!missing.is_transient());
        assert_eq!(missing.sql_state(), Some("3D000"));
    }
}
