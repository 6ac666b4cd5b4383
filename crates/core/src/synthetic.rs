//! Synthetic projects for benchmarks and property tests: M models in L layers, each model of
//! layer k > 0 reading one or two models of layer k − 1, every model incremental by time range.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::project::ProjectFiles;

/// The shape of a synthetic project.
#[derive(Clone, Debug)]
pub struct SyntheticProject {
    pub models: usize,
    pub layers: usize,
    /// Number of cron intervals from the start.
    pub intervals: usize,
    /// `true` for `@hourly`, `false` for `@daily`.
    pub hourly: bool,
    pub rows_per_interval: usize,
    /// Every model selects one row per interval and reads nothing: the per-task overhead
    /// measurement.
    pub noop: bool,
    pub batch_size: Option<u32>,
    /// The gateway's connection as YAML lines under `connection:` (indented by six spaces).
    pub connection_yaml: String,
    pub dialect: String,
}

pub const SYNTHETIC_START: &str = "2024-01-01";

impl SyntheticProject {
    /// A DuckDB project of the given shape.
    pub fn duckdb(models: usize, layers: usize, intervals: usize, hourly: bool) -> SyntheticProject {
        SyntheticProject {
            models,
            layers,
            intervals,
            hourly,
            rows_per_interval: 1,
            noop: false,
            batch_size: Some(1),
            connection_yaml: "      type: duckdb\n      database: warehouse.duckdb\n".to_string(),
            dialect: "duckdb".to_string(),
        }
    }

    /// A PostgreSQL project of the given shape; `connection_yaml` as for the field.
    pub fn postgres(
        models: usize,
        layers: usize,
        intervals: usize,
        hourly: bool,
        connection_yaml: String,
    ) -> SyntheticProject {
        SyntheticProject {
            connection_yaml,
            dialect: "postgres".to_string(),
            ..SyntheticProject::duckdb(models, layers, intervals, hourly)
        }
    }

    /// The end of the last interval, in seconds after the start.
    pub fn span_seconds(&self) -> i64 {
        self.intervals as i64 * if self.hourly { 3600 } else { 86_400 }
    }

    /// Model names by layer: layer k holds models `bench.m<k>_<i>`.
    pub fn layout(&self) -> Vec<Vec<String>> {
        let layers = self.layers.max(1);
        let mut layout = vec![Vec::new(); layers];
        for index in 0..self.models {
            let layer = index * layers / self.models.max(1);
            let position = layout[layer].len();
            layout[layer].push(format!("bench.m{layer}_{position}"));
        }
        layout.retain(|layer| !layer.is_empty());
        layout
    }

    /// The project's files.
    pub fn files(&self) -> ProjectFiles {
        let (cron, step) = if self.hourly { ("@hourly", "1 hour") } else { ("@daily", "1 day") };
        let end_seconds = self.span_seconds();
        let start_seconds = 1_704_067_200; // 2024-01-01 00:00:00 UTC
        let end = crate::interval::Timestamp(start_seconds + end_seconds);
        let config = format!(
            "gateways:\n  bench:\n    connection:\n{}default_gateway: bench\nmodel_defaults:\n  dialect: {}\n  start: '{SYNTHETIC_START}'\n  cron: '{cron}'\n",
            self.connection_yaml, self.dialect
        );
        let batch = self.batch_size.map(|size| format!(", batch_size {size}")).unwrap_or_default();
        let mut models = BTreeMap::new();
        let layout = self.layout();
        for (layer, names) in layout.iter().enumerate() {
            for (position, name) in names.iter().enumerate() {
                let mut text = String::new();
                let _ = writeln!(
                    text,
                    "MODEL (\n  name {name},\n  kind INCREMENTAL_BY_TIME_RANGE (time_column ts{batch}),\n  end '{end}',\n  grain id\n);\n"
                );
                if self.noop {
                    let _ = writeln!(text, "SELECT {position} AS id, CAST(@start_ts AS TIMESTAMP) AS ts, 0 AS value");
                } else if layer == 0 {
                    let rows = self.rows_per_interval.max(1);
                    let _ = writeln!(
                        text,
                        "SELECT\n  CAST(EXTRACT(epoch FROM t.ts) AS BIGINT) * 1000 + g.n AS id,\n  t.ts AS ts,\n  g.n + {position} AS value\nFROM generate_series(CAST(@start_ts AS TIMESTAMP), CAST(@end_ts AS TIMESTAMP), INTERVAL '{step}') AS t(ts)\nCROSS JOIN generate_series(0, {}) AS g(n)",
                        rows - 1
                    );
                } else {
                    let previous = &layout[layer - 1];
                    let first = &previous[position % previous.len()];
                    let second = &previous[(position + 1) % previous.len()];
                    if first == second || position % 2 == 1 {
                        let _ = writeln!(
                            text,
                            "SELECT a.id, a.ts, a.value + 1 AS value\nFROM {first} AS a\nWHERE a.ts BETWEEN @start_ts AND @end_ts"
                        );
                    } else {
                        let _ = writeln!(
                            text,
                            "SELECT a.id, a.ts, a.value + b.value AS value\nFROM {first} AS a\nJOIN {second} AS b ON a.id = b.id\nWHERE a.ts BETWEEN @start_ts AND @end_ts"
                        );
                    }
                }
                let file = format!("models/{}.sql", name.replace('.', "_"));
                models.insert(file, text);
            }
        }
        ProjectFiles { config: Some(config), models, ..ProjectFiles::default() }
    }
}
