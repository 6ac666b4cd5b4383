//! A deterministic simulation of sluice's apply protocol. One seed decides a project's shape,
//! the services' faults (latency, failed and half-failed calls, duplicated, reordered, delayed
//! and redelivered tasks, lost gate keys, duplicated settled runs) and the operator's and the
//! chaos's actions (crashes and restarts of every role, aborts, resumes, purges, janitor passes,
//! a second plan, a concurrent apply); the real coordinator, worker and promoter code runs on a
//! single-threaded runtime with a paused clock, so a seed replays exactly. The invariants are
//! checked where they can break (a write, a promotion) and once everything is quiet.

pub mod project;
pub mod queue;
pub mod scenario;
pub mod services;
pub mod state;
pub mod warehouse;
pub mod world;

pub use scenario::{Outcome, run_seed};
