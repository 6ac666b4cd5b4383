//! Operating sluice on a cluster: the metrics every role records ([`metrics`]), and with the
//! `server` feature what the binary serves and prints: `/healthz`, `/readyz` and `/metrics`
//! ([`health`]) and the text or JSON log format ([`logging`]).

pub mod metrics;

#[cfg(feature = "server")]
pub mod health;
#[cfg(feature = "server")]
pub mod logging;
