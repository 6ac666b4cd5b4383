//! The project shapes a seed draws: models in layers, incremental (batched or not) or FULL,
//! spread over one to three gateways; and the change a second plan makes.

use std::collections::BTreeMap;
use std::fmt::Write;

use sluice_core::interval::Timestamp;
use sluice_core::project::ProjectFiles;

use crate::world::{DAY, World};

/// 2024-01-01T00:00:00Z: where every model starts.
pub const START: Timestamp = Timestamp(1_704_067_200);

#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub parents: Vec<usize>,
    pub full: bool,
    pub batch_size: Option<u32>,
    pub gateway: usize,
    /// Changing it is a breaking change of the model's query.
    pub variant: u32,
}

#[derive(Clone, Debug)]
pub struct Shape {
    pub models: Vec<ModelSpec>,
    pub gateways: usize,
    pub days: i64,
}

impl Shape {
    pub fn draw(world: &mut World) -> Shape {
        let gateways = 1 + world.below(3) as usize;
        let count = 2 + world.below(6) as usize;
        let days = 2 + world.below(9) as i64;
        let mut models = Vec::with_capacity(count);
        for index in 0..count {
            let mut parents = Vec::new();
            if index > 0 {
                let wanted = world.below(3);
                for _ in 0..wanted {
                    let parent = world.below(index as u64) as usize;
                    if !parents.contains(&parent) {
                        parents.push(parent);
                    }
                }
            }
            let full = index > 0 && world.chance(0.2);
            let batch_size = match world.below(4) {
                0 => None,
                size => Some(size as u32),
            };
            models.push(ModelSpec {
                parents,
                full,
                batch_size,
                gateway: world.below(gateways as u64) as usize,
                variant: 0,
            });
        }
        Shape { models, gateways, days }
    }

    /// The end of the last interval: every model is backfilled up to it.
    pub fn end(&self) -> Timestamp {
        Timestamp(START.0 + self.days * DAY)
    }

    /// The same project with one model's query changed (a breaking change).
    pub fn changed(&self, model: usize) -> Shape {
        let mut shape = self.clone();
        shape.models[model].variant += 1;
        shape
    }

    pub fn files(&self) -> ProjectFiles {
        let mut config = String::from("gateways:\n");
        for gateway in 0..self.gateways {
            let _ = write!(
                config,
                "  g{gateway}:\n    connection:\n      type: duckdb\n      database: wh{gateway}.duckdb\n"
            );
        }
        config.push_str(
            "default_gateway: g0\nmodel_defaults:\n  dialect: duckdb\n  start: '2024-01-01'\n  cron: '@daily'\n",
        );
        let end = self.end().to_string();
        let mut models = BTreeMap::new();
        for (index, model) in self.models.iter().enumerate() {
            let mut text = String::new();
            let kind = if model.full {
                "FULL".to_string()
            } else {
                let batch = model.batch_size.map(|size| format!(", batch_size {size}")).unwrap_or_default();
                format!("INCREMENTAL_BY_TIME_RANGE (time_column ds{batch})")
            };
            let _ = writeln!(text, "MODEL (name sim.m{index}, kind {kind}, end '{end}', gateway g{});", model.gateway);
            let variant = model.variant;
            match (model.full, model.parents.as_slice()) {
                (true, parents) => {
                    let sources: Vec<String> =
                        parents.iter().map(|p| format!("(SELECT COUNT(*) FROM sim.m{p})")).collect();
                    let sum = if sources.is_empty() { "0".to_string() } else { sources.join(" + ") };
                    let _ = writeln!(text, "SELECT {sum} + {variant} AS n");
                }
                (false, []) => {
                    let _ = writeln!(text, "SELECT CAST(@start_ds AS DATE) AS ds, {variant} AS v");
                }
                (false, [first, rest @ ..]) => {
                    let _ = write!(text, "SELECT a.ds, a.v + {variant} AS v FROM sim.m{first} AS a");
                    for (position, parent) in rest.iter().enumerate() {
                        let _ = write!(
                            text,
                            " CROSS JOIN (SELECT COUNT(*) AS c{position} FROM sim.m{parent}) AS p{position}"
                        );
                    }
                    let _ = writeln!(text, "\nWHERE a.ds BETWEEN @start_ds AND @end_ds");
                }
            }
            models.insert(format!("models/m{index}.sql"), text);
        }
        ProjectFiles { config: Some(config), models, ..ProjectFiles::default() }
    }
}
