//! sluice's pure core: project files in, plans and task graphs out. Nothing here does I/O.

pub mod audit;
pub mod config;
pub mod cron;
pub mod dialect;
pub mod error;
pub mod interval;
pub mod macro_functions;
pub mod model;
pub mod model_file;
pub mod names;
pub mod plan;
pub mod plan_text;
pub mod project;
pub mod query;
pub mod selection;
pub mod selector;
pub mod snapshot;
pub mod synthetic;
pub mod task_graph;
pub mod trace;
