//! Data-driven plan tests: a small project written inline and an environment in, the printed
//! plan out. Update the expectations with `UPDATE_EXPECT=1 cargo test -p sluice-core --test plans`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use expect_test::{Expect, expect};
use sluice_core::interval::{IntervalSet, Timestamp};
use sluice_core::names::{EnvironmentName, ModelName, SnapshotId, Version};
use sluice_core::plan::{BackfillWindow, Change, EnvironmentState, Plan, PlanContext, build_plan, plan_base};
use sluice_core::plan_text::format_plan;
use sluice_core::project::{Project, ProjectFiles, load_project};
use sluice_core::selection::{select_models, unbuilt_in_prod};
use sluice_core::snapshot::{ChangeCategory, Snapshot};
use sluice_core::task_graph::TaskGraph;

const CONFIG: &str = "
gateways:
  local:
    connection:
      type: duckdb
      database: warehouse.duckdb
model_defaults:
  dialect: duckdb
  start: 2024-01-01
  cron: '@daily'
";

const ORDERS: &str = "
MODEL (
  name shop.orders,
  kind INCREMENTAL_BY_TIME_RANGE (time_column ds),
  end '2024-01-05'
);
SELECT id, ds, amount FROM raw.events WHERE ds BETWEEN @start_ds AND @end_ds
";

const DAILY: &str = "
MODEL (
  name shop.daily,
  kind INCREMENTAL_BY_TIME_RANGE (time_column ds, batch_size 2),
  end '2024-01-05'
);
SELECT ds, SUM(amount) AS total
FROM shop.orders
WHERE ds BETWEEN @start_ds AND @end_ds
GROUP BY ds
";

const SUMMARY: &str = "
MODEL (name shop.summary, kind FULL, end '2024-01-05');
SELECT COUNT(*) AS n FROM shop.daily
";

/// A project's files: a config and its models, by path.
fn files(config: &str, models: &[(&str, &str)]) -> ProjectFiles {
    ProjectFiles {
        config: Some(config.to_string()),
        models: models.iter().map(|(path, text)| (path.to_string(), text.to_string())).collect(),
        ..ProjectFiles::default()
    }
}

fn project(models: &[(&str, &str)]) -> Project {
    match load_project(&files(CONFIG, models)) {
        Ok(project) => project,
        Err(errors) => panic!("{errors}"),
    }
}

fn shop(daily: &str) -> Project {
    project(&[("models/orders.sql", ORDERS), ("models/daily.sql", daily), ("models/summary.sql", SUMMARY)])
}

/// A state store in memory: what applying plans leaves behind.
#[derive(Default)]
struct State {
    environments: BTreeMap<EnvironmentName, EnvironmentState>,
    known: BTreeMap<SnapshotId, Snapshot>,
    recorded: BTreeMap<(ModelName, Version), IntervalSet>,
}

impl State {
    fn plan(&self, project: &Project, environment: &str, forward_only: bool) -> Plan {
        self.plan_within(project, environment, forward_only, BackfillWindow::default())
    }

    fn plan_within(&self, project: &Project, environment: &str, forward_only: bool, window: BackfillWindow) -> Plan {
        self.try_build(project, environment, forward_only, window, None).unwrap()
    }

    /// The plan against this state; with `selectors`, a `--select-model` plan of the project as
    /// `select_models` makes it (a prod plan that would show a table unbuilt is an error).
    fn try_build(
        &self,
        project: &Project,
        environment: &str,
        forward_only: bool,
        window: BackfillWindow,
        selectors: Option<&[&str]>,
    ) -> Result<Plan, String> {
        let environment = EnvironmentName::parse(environment).unwrap();
        let current = self.environments.get(&environment);
        let prod = if environment.is_prod() { None } else { self.environments.get(&EnvironmentName::prod()) };
        let base = plan_base(&environment, current, prod);
        let selection = match selectors {
            Some(selectors) => {
                let selectors: Vec<String> = selectors.iter().map(ToString::to_string).collect();
                Some(select_models(project, base.as_ref(), &selectors)?)
            }
            None => None,
        };
        let project = selection.as_ref().map_or(project, |selection| &selection.project);
        let plan = build_plan(
            project,
            PlanContext {
                environment: &environment,
                current,
                base: base.as_ref(),
                prod,
                known_snapshots: &self.known,
                recorded_intervals: &self.recorded,
                now: Timestamp::parse("2024-01-10").unwrap(),
                forward_only,
                window,
                skip_backfill: false,
                selected: selection.as_ref().map(|selection| &selection.selected),
            },
        );
        let unbuilt = selection
            .as_ref()
            .map(|selection| unbuilt_in_prod(&plan, &selection.project, &selection.selected))
            .unwrap_or_default();
        if unbuilt.is_empty() { Ok(plan) } else { Err(format!("unbuilt: {}", unbuilt.join(", "))) }
    }

    /// A `--select-model` plan.
    fn plan_selecting(&self, project: &Project, environment: &str, selectors: &[&str]) -> Result<Plan, String> {
        self.try_build(project, environment, false, BackfillWindow::default(), Some(selectors))
    }

    fn print(&self, plan: &Plan, expected: Expect) {
        let graph = TaskGraph::build(plan);
        expected.assert_eq(&format_plan(plan, self.environments.get(&plan.environment), Some(&graph)));
    }

    /// Records every batch as done and points the environment at the plan's snapshots.
    fn apply(&mut self, plan: &Plan) {
        for planned in &plan.snapshots {
            let key = (planned.snapshot.name.clone(), planned.snapshot.version.clone());
            let recorded = self.recorded.entry(key).or_default();
            for batch in &planned.batches {
                recorded.insert(batch.interval);
            }
            self.known.insert(planned.snapshot.id.clone(), planned.snapshot.clone());
        }
        self.environments.insert(plan.environment.clone(), plan.environment_state());
    }
}

const DAILY_BREAKING: &str = "
MODEL (
  name shop.daily,
  kind INCREMENTAL_BY_TIME_RANGE (time_column ds, batch_size 2),
  end '2024-01-05'
);
SELECT ds, SUM(amount) AS total
FROM shop.orders
WHERE ds BETWEEN @start_ds AND @end_ds AND amount > 0
GROUP BY ds
";

/// The intervals a plan announces are the ones its run reports: the task graph's, VIEW and SEED
/// counting none.
#[test]
fn the_plans_interval_count_is_its_tasks() {
    let project = project(&[
        ("models/orders.sql", ORDERS),
        ("models/daily.sql", DAILY),
        ("models/summary.sql", SUMMARY),
        ("models/latest.sql", "MODEL (name shop.latest, kind VIEW);\nSELECT * FROM shop.daily"),
    ]);
    let plan = State::default().plan(&project, "prod", false);
    let graph = TaskGraph::build(&plan);
    let run_total: u64 = graph.tasks.iter().map(|task| u64::from(task.interval_count)).sum();
    assert_eq!(plan.interval_count(), run_total);
    assert_eq!(run_total, 15, "orders 5, daily 5, summary 5, the view none");
}

#[test]
fn first_plan_to_prod_backfills_everything() {
    let state = State::default();
    let plan = state.plan(&shop(DAILY), "prod", false);
    state.print(
        &plan,
        expect![[r#"
            Plan bbefcdee7163 for environment prod (replaces plan none)

            Models:
              + shop.orders: added (INCREMENTAL_BY_TIME_RANGE)
              + shop.daily: added (INCREMENTAL_BY_TIME_RANGE)
              + shop.summary: added (FULL)

            Backfill: 15 intervals in 5 tasks
              shop.orders   INCREMENTAL_BY_TIME_RANGE  5 intervals in 1 task ([2024-01-01, 2024-01-06))
              shop.daily    INCREMENTAL_BY_TIME_RANGE  5 intervals in 3 tasks ([2024-01-01, 2024-01-06))
              shop.summary  FULL                       5 intervals, rebuilt in full

            Views:
              shop.orders -> sluice__shop.shop__orders__a8e028a6da
              shop.daily -> sluice__shop.shop__daily__5b2b00213f
              shop.summary -> sluice__shop.shop__summary__8dbc6a7103

            Task graph: 5 tasks, 6 dependencies, critical path 3 tasks
              shop.orders: 1 task
              shop.daily: 3 tasks, after shop.orders
              shop.summary: 1 task, after shop.daily
        "#]],
    );
}

#[test]
fn breaking_change_in_dev_backfills_only_the_model_and_its_descendants_then_prod_reuses_dev() {
    let mut state = State::default();
    state.apply(&state.plan(&shop(DAILY), "prod", false));

    let dev = state.plan(&shop(DAILY_BREAKING), "dev", false);
    state.print(
        &dev,
        expect![[r#"
            Plan 215b41fa612d for environment dev (replaces plan none)

            Models:
              ~ shop.daily: directly modified, breaking
              ~ shop.summary: indirectly modified, breaking (via shop.daily)
              = 1 model unchanged

            Diffs:
              shop.daily:
                --- current
                +++ planned
                @@ -4,6 +4,6 @@
                 FROM
                   shop.orders
                 WHERE
                -  ds BETWEEN @start_ds AND @end_ds
                +  ds BETWEEN @start_ds AND @end_ds AND amount > 0
                 GROUP BY
                   ds

            Backfill: 10 intervals in 4 tasks
              shop.daily    INCREMENTAL_BY_TIME_RANGE  5 intervals in 3 tasks ([2024-01-01, 2024-01-06))
              shop.summary  FULL                       5 intervals, rebuilt in full

            Views:
              shop__dev.daily -> sluice__shop.shop__daily__bc14618129
              shop__dev.summary -> sluice__shop.shop__summary__90df868e0e

            Task graph: 4 tasks, 3 dependencies, critical path 2 tasks
              shop.daily: 3 tasks, after shop.orders
              shop.summary: 1 task, after shop.daily
        "#]],
    );
    state.apply(&dev);

    let prod = state.plan(&shop(DAILY_BREAKING), "prod", false);
    state.print(
        &prod,
        expect![[r#"
            Plan 831afdaba168 for environment prod (replaces plan bbefcdee7163)

            Models:
              ~ shop.daily: directly modified, breaking
              ~ shop.summary: indirectly modified, breaking (via shop.daily)
              = 1 model unchanged

            Diffs:
              shop.daily:
                --- current
                +++ planned
                @@ -4,6 +4,6 @@
                 FROM
                   shop.orders
                 WHERE
                -  ds BETWEEN @start_ds AND @end_ds
                +  ds BETWEEN @start_ds AND @end_ds AND amount > 0
                 GROUP BY
                   ds

            Backfill: nothing to backfill

            Views:
              shop.daily -> sluice__shop.shop__daily__bc14618129
              shop.summary -> sluice__shop.shop__summary__90df868e0e

            Task graph: 0 tasks, 0 dependencies, critical path 0 tasks
        "#]],
    );
}

#[test]
fn added_projection_is_non_breaking_and_children_keep_their_tables() {
    let mut state = State::default();
    state.apply(&state.plan(&shop(DAILY), "prod", false));
    let added_column = DAILY.replace("SUM(amount) AS total", "SUM(amount) AS total, COUNT(*) AS orders");
    let plan = state.plan(&shop(&added_column), "prod", false);
    state.print(
        &plan,
        expect![[r#"
            Plan cbfd44a0185f for environment prod (replaces plan bbefcdee7163)

            Models:
              ~ shop.daily: directly modified, non-breaking
              ~ shop.summary: indirectly modified, non-breaking (via shop.daily)
              = 1 model unchanged

            Diffs:
              shop.daily:
                --- current
                +++ planned
                @@ -1,6 +1,7 @@
                 SELECT
                   ds,
                -  SUM(amount) AS total
                +  SUM(amount) AS total,
                +  COUNT(*) AS orders
                 FROM
                   shop.orders
                 WHERE

            Backfill: 5 intervals in 3 tasks
              shop.daily    INCREMENTAL_BY_TIME_RANGE  5 intervals in 3 tasks ([2024-01-01, 2024-01-06))

            Views:
              shop.daily -> sluice__shop.shop__daily__8ab201eb65

            Task graph: 3 tasks, 0 dependencies, critical path 1 task
              shop.daily: 3 tasks, after shop.orders
        "#]],
    );
}

#[test]
fn metadata_and_whitespace_changes_rebuild_nothing() {
    let mut state = State::default();
    state.apply(&state.plan(&shop(DAILY), "prod", false));
    let reformatted = DAILY.replace("GROUP BY ds", "-- one row a day\n   GROUP   BY ds");
    let plan = state.plan(&shop(&reformatted), "prod", false);
    state.print(
        &plan,
        expect![[r#"
            Plan 823bd8f7f4c7 for environment prod (replaces plan bbefcdee7163)

            Models:
              = 3 models unchanged

            Backfill: nothing to backfill

            Views: no change

            Task graph: 0 tasks, 0 dependencies, critical path 0 tasks
        "#]],
    );
    let owned = ORDERS.replace("end '2024-01-05'", "end '2024-01-05', owner 'jane'");
    let plan = state.plan(
        &project(&[("models/orders.sql", &owned), ("models/daily.sql", DAILY), ("models/summary.sql", SUMMARY)]),
        "prod",
        false,
    );
    state.print(
        &plan,
        expect![[r#"
            Plan b94907032be1 for environment prod (replaces plan bbefcdee7163)

            Models:
              ~ shop.orders: directly modified, metadata-only
              ~ shop.daily: indirectly modified, non-breaking (via shop.orders)
              ~ shop.summary: indirectly modified, non-breaking (via shop.orders)

            Backfill: nothing to backfill

            Views: no change

            Task graph: 0 tasks, 0 dependencies, critical path 0 tasks
        "#]],
    );
}

#[test]
fn forward_only_keeps_the_table_and_backfills_nothing() {
    let mut state = State::default();
    state.apply(&state.plan(&shop(DAILY), "prod", false));
    let plan = state.plan(&shop(DAILY_BREAKING), "prod", true);
    state.print(
        &plan,
        expect![[r#"
            Plan e983a1571cb7 for environment prod (replaces plan bbefcdee7163)
            All changes are forward-only.

            Models:
              ~ shop.daily: directly modified, forward-only
              ~ shop.summary: indirectly modified, non-breaking (via shop.daily)
              = 1 model unchanged

            Diffs:
              shop.daily:
                --- current
                +++ planned
                @@ -4,6 +4,6 @@
                 FROM
                   shop.orders
                 WHERE
                -  ds BETWEEN @start_ds AND @end_ds
                +  ds BETWEEN @start_ds AND @end_ds AND amount > 0
                 GROUP BY
                   ds

            Backfill: nothing to backfill

            Views: no change

            Task graph: 0 tasks, 0 dependencies, critical path 0 tasks
        "#]],
    );
}

#[test]
fn a_change_that_cannot_be_compared_is_uncategorized() {
    let mut state = State::default();
    state.apply(&state.plan(&shop(DAILY), "prod", false));
    // A stored definition this version cannot read back.
    let prod = state.environments.get_mut(&EnvironmentName::prod()).unwrap();
    for snapshot in &mut prod.snapshots {
        if snapshot.name.table == "daily" {
            snapshot.normalized_query = Some("SELECT FROM WHERE (".to_string());
        }
    }
    let plan = state.plan(&shop(DAILY_BREAKING), "prod", false);
    assert_eq!(plan.uncategorized().len(), 1);
    state.print(
        &plan,
        expect![[r#"
            Plan 831afdaba168 for environment prod (replaces plan bbefcdee7163)

            Models:
              ~ shop.daily: directly modified, uncategorized
              ~ shop.summary: indirectly modified, breaking (via shop.daily)
              = 1 model unchanged
              ! uncategorized changes block apply: shop.daily (plan again with --forward-only, or make the change comparable)

            Diffs:
              shop.daily:
                --- current
                +++ planned
                @@ -4,6 +4,6 @@
                 FROM
                   shop.orders
                 WHERE
                -  ds BETWEEN @start_ds AND @end_ds
                +  ds BETWEEN @start_ds AND @end_ds AND amount > 0
                 GROUP BY
                   ds

            Backfill: 10 intervals in 4 tasks
              shop.daily    INCREMENTAL_BY_TIME_RANGE  5 intervals in 3 tasks ([2024-01-01, 2024-01-06))
              shop.summary  FULL                       5 intervals, rebuilt in full

            Views:
              shop.daily -> sluice__shop.shop__daily__bc14618129
              shop.summary -> sluice__shop.shop__summary__90df868e0e

            Task graph: 4 tasks, 3 dependencies, critical path 2 tasks
              shop.daily: 3 tasks, after shop.orders
              shop.summary: 1 task, after shop.daily
        "#]],
    );
}

#[test]
fn removed_models_drop_their_views_and_new_intervals_are_missing() {
    let mut state = State::default();
    state.apply(&state.plan(&shop(DAILY), "prod", false));
    let plan = state.plan(&project(&[("models/orders.sql", ORDERS), ("models/daily.sql", DAILY)]), "prod", false);
    state.print(
        &plan,
        expect![[r#"
            Plan 48c05d91fc54 for environment prod (replaces plan bbefcdee7163)

            Models:
              - shop.summary: removed
              = 2 models unchanged

            Backfill: nothing to backfill

            Views:
              drop shop.summary

            Task graph: 0 tasks, 0 dependencies, critical path 0 tasks
        "#]],
    );
    let unchanged = state.plan(&shop(DAILY), "prod", false);
    assert!(unchanged.has_nothing_to_do(state.environments.get(&EnvironmentName::prod())));
}

fn errors_of(models: &[(&str, &str)], config: &str) -> String {
    match load_project(&files(config, models)) {
        Ok(_) => panic!("the project loaded"),
        Err(errors) => errors.to_string(),
    }
}

#[test]
fn every_error_of_a_project_is_reported_with_file_line_and_column() {
    let text = errors_of(
        &[
            ("models/a.sql", "MODEL (name shop.a, kind SNAPSHOT);\nSELECT 1 AS x"),
            ("models/b.sql", "MODEL (name shop.b, colour 'red');\nSELECT 1 AS x"),
            ("models/c.sql", "MODEL (kind FULL);\nSELECT 1 AS x"),
            ("models/d.sql", "MODEL (name shop.d);\nSELECT @nope AS x"),
            ("models/e.sql", "MODEL (name shop.e);\nSELECT x FROM WHERE"),
            ("models/f.sql", "MODEL (name shop.f, gateway elsewhere);\nSELECT 1 AS x"),
            ("models/g.sql", "MODEL (name \"shop\".\"g; drop table x\");\nSELECT 1 AS x"),
            ("models/h.sql", "MODEL (name shop.h);\nSELECT 1 AS x"),
            ("models/h2.sql", "MODEL (name shop.h);\nSELECT 2 AS x"),
            ("models/i.sql", "MODEL (name shop.i, kind FULL);\nSELECT * FROM shop.j"),
            ("models/j.sql", "MODEL (name shop.j, kind FULL);\nSELECT * FROM shop.k"),
            ("models/k.sql", "MODEL (name shop.k, kind FULL);\nSELECT * FROM shop.i"),
            ("models/l.sql", "SELECT 1"),
        ],
        CONFIG,
    );
    expect![[r#"
        the project has 10 errors:
          models/a.sql:1:26: unknown model kind SNAPSHOT; expected VIEW, FULL, INCREMENTAL_BY_TIME_RANGE, INCREMENTAL_BY_UNIQUE_KEY, INCREMENTAL_BY_PARTITION, INCREMENTAL_UNMANAGED, SCD_TYPE_2_BY_TIME, SCD_TYPE_2_BY_COLUMN, SEED or EMBEDDED
          models/b.sql:1:21: unknown property colour; expected one of name, kind, cron, start, end, owner, description, grain, grains, gateway, dialect, tags, columns, enabled, depends_on, audits, partitioned_by
          models/c.sql:1:1: the MODEL block has no name property; expected name schema.table
          models/d.sql:2:8: unknown macro @nope; expected a time macro such as @start_ds or @end_ts, @this_model, @gateway, @model_kind_name, @VAR('name') or a name defined with @DEF
          models/e.sql:2:15: SQL does not parse (duckdb): Expected: table name, found: WHERE
          models/f.sql:1:29: unknown gateway "elsewhere"; expected one of: local
          models/g.sql:1:13: expected a model name of the form schema.table where each part is a lowercase identifier of letters, digits and underscores that starts with a letter or underscore (at most 63 characters) without a double underscore, found "shop.g; drop table x"
          models/h2.sql: duplicate model name shop.h; models/h.sql already defines it
          models/i.sql: dependency cycle: shop.i -> shop.j -> shop.k -> shop.i (each model reads the next)
          models/l.sql:1:1: expected the file to start with a MODEL (...) block
    "#]]
    .assert_eq(&text);
}

/// Models without a start, as SQLMesh 0.236 plans them (observed with `sqlmesh plan` at the same
/// moment): a root backfills only its last complete interval; a child starts where its earliest
/// parent starts, `depends_on` naming a parent as the query does.
#[test]
fn a_model_without_start_starts_as_sqlmesh_derives_it() {
    let config = "gateways:\n  local:\n    connection:\n      type: duckdb\nmodel_defaults:\n  dialect: duckdb\n";
    let files = files(
        config,
        &[
            (
                "models/a.sql",
                "MODEL (name s.a, kind INCREMENTAL_BY_TIME_RANGE (time_column ds));\nSELECT @start_ds AS ds",
            ),
            (
                "models/b.sql",
                "MODEL (name s.b, kind INCREMENTAL_BY_TIME_RANGE (time_column ds), start '2026-11-20');\nSELECT @start_ds AS ds",
            ),
            (
                "models/c.sql",
                "MODEL (name s.c, kind INCREMENTAL_BY_TIME_RANGE (time_column ds));\nSELECT a.ds FROM s.a AS a JOIN s.b AS b ON a.ds = b.ds",
            ),
            (
                "models/h.sql",
                "MODEL (name s.h, kind INCREMENTAL_BY_TIME_RANGE (time_column ts), cron '@hourly');\nSELECT @start_ts AS ts",
            ),
            ("models/d.sql", "MODEL (name s.d, kind FULL, depends_on [s.b]);\nSELECT 1 AS one"),
        ],
    );
    let project = load_project(&files).unwrap_or_else(|errors| panic!("{errors}"));
    let plan = sluice_core::plan::first_plan(&project, Timestamp::parse("2026-11-30 19:45:12").unwrap());
    let ranges: Vec<String> = plan
        .snapshots
        .iter()
        .map(|planned| {
            let ranges: Vec<String> = planned.missing_ranges.iter().map(ToString::to_string).collect();
            format!("{} {}", planned.snapshot.name, ranges.join(" "))
        })
        .collect();
    expect![[r#"
        [
            "s.a [2026-11-29 00:00:00, 2026-11-30 00:00:00)",
            "s.b [2026-11-20 00:00:00, 2026-11-30 00:00:00)",
            "s.c [2026-11-20 00:00:00, 2026-11-30 00:00:00)",
            "s.d [2026-11-20 00:00:00, 2026-11-30 00:00:00)",
            "s.h [2026-11-30 18:00:00, 2026-11-30 19:00:00)",
        ]
    "#]]
    .assert_debug_eq(&ranges);
}

/// What sluice cannot run is named, each model with the file or macro and what to do, and so
/// is every model that reads one; the others load and plan. Planned without them, an
/// environment keeps showing what it showed of them. An inline AUDIT's query is never taken as
/// a Jinja model's query; a broken model still stops the whole project, with the rest listed.
#[test]
fn models_sluice_cannot_run_are_named_and_left_out_with_their_readers() {
    let python_files: BTreeMap<String, String> = [
        ("macros/util.py", "from sqlmesh import macro\n\n@macro()\ndef add_one(evaluator, value):\n    return value + 1\n"),
        ("models/py_model.py", "from sqlmesh import model\n\n@model(\n    \"s.py_model\",\n    columns={\"x\": \"int\"},\n)\ndef execute(context, **kwargs):\n    pass\n"),
        // Not models: a package marker and a helper module.
        ("models/__init__.py", ""),
        ("models/shared.py", "def helper(x):\n    return x\n"),
    ]
    .iter()
    .map(|(path, text)| (path.to_string(), text.to_string()))
    .collect();
    let project_files = |extra: &[(&str, &str)]| {
        let mut models = vec![
            ("models/a.sql", "MODEL (name s.a, kind FULL);\nSELECT @add_one(1) AS x"),
            (
                "models/b.sql",
                "MODEL (name s.b, kind FULL);\nJINJA_QUERY_BEGIN;\nSELECT {{ x }} AS x;\nJINJA_END;\nAUDIT (name b_ok);\nSELECT 1 AS x",
            ),
            ("models/d.sql", "MODEL (name s.d, kind FULL);\nSELECT @STAR(s.a)"),
            ("models/e.sql", "MODEL (name s.e, kind MANAGED);\nSELECT 1 AS id"),
            ("models/f.sql", "MODEL (name s.f, kind FULL);\nSELECT x FROM s.py_model"),
            ("models/g.sql", "MODEL (name s.g, kind FULL);\nSELECT x FROM s.f"),
            ("models/h.sql", "MODEL (name s.h, kind FULL);\nSELECT 1 AS x"),
        ];
        models.extend(extra);
        ProjectFiles { python_files: python_files.clone(), ..files(CONFIG, &models) }
    };
    let project = load_project(&project_files(&[])).unwrap();
    assert_eq!(project.models.keys().map(ToString::to_string).collect::<Vec<_>>(), vec!["s.h"]);
    expect![[r#"
        the project has 7 errors:
          models/a.sql:2:8: @add_one is a Python macro (macros/util.py), which sluice cannot run; write its SQL in the model, or as a @DEF
          models/b.sql:2:1: Jinja blocks are not rendered by sluice yet; write the model in SQL with SQLMesh macros
          models/d.sql:2:8: @STAR is a SQLMesh macro sluice does not evaluate yet; write its SQL out in the model
          models/e.sql:1:23: MANAGED is a SQLMesh kind sluice does not run yet; expected VIEW, FULL, INCREMENTAL_BY_TIME_RANGE, INCREMENTAL_BY_UNIQUE_KEY, INCREMENTAL_BY_PARTITION, INCREMENTAL_UNMANAGED, SCD_TYPE_2_BY_TIME, SCD_TYPE_2_BY_COLUMN, SEED or EMBEDDED
          models/f.sql: s.f reads s.py_model, which sluice cannot run (models/py_model.py)
          models/g.sql: s.g reads s.f, which sluice cannot run (models/f.sql)
          models/py_model.py: a Python model (s.py_model), which sluice cannot run; rewrite it as a SQL model in models/*.sql, or remove it and declare its table in external_models.yaml
    "#]]
    .assert_eq(&project.unsupported_errors().unwrap().to_string());

    // An environment that shows a model sluice now leaves out keeps showing it: carried
    // unchanged, with nothing to run, and not removed.
    let mut state = State::default();
    let earlier = project_files(&[]);
    let earlier = ProjectFiles {
        models: earlier
            .models
            .into_iter()
            .map(|(path, text)| {
                if path == "models/g.sql" {
                    (path, "MODEL (name s.g, kind FULL);\nSELECT 2 AS x".to_string())
                } else {
                    (path, text)
                }
            })
            .collect(),
        ..earlier
    };
    let earlier = load_project(&earlier).unwrap();
    state.apply(&state.plan(&earlier, "prod", false));
    let plan = state.plan(&project, "prod", false);
    assert!(plan.removed.is_empty());
    let g = plan.snapshots.iter().find(|planned| planned.snapshot.name.to_string() == "s.g").unwrap();
    assert_eq!(g.change, Change::Unchanged);
    assert!(g.batches.is_empty() && g.promoted);
    assert!(plan.view_changes(state.environments.get(&EnvironmentName::prod())).is_empty());

    // A broken model stops the project; the unsupported ones are listed with it.
    let Err(errors) = load_project(&project_files(&[("models/z.sql", "MODEL (name s.z, kind FULL);\nSELEC 1")])) else {
        panic!("the project loaded")
    };
    let listed = errors.to_string();
    assert!(listed.starts_with("the project has 8 errors:"), "{listed}");
    assert!(listed.contains("models/z.sql"), "{listed}");
}

/// `sluice run`: the environment's snapshots unchanged, with the intervals completed since the
/// plan; nothing when none has completed.
#[test]
fn a_run_plans_the_environments_snapshots_with_the_intervals_completed_since() {
    let open_ended = ORDERS.replace("  end '2024-01-05'\n", "");
    let project = project(&[
        ("models/orders.sql", open_ended.as_str()),
        ("models/summary.sql", "MODEL (name shop.summary, kind FULL);\nSELECT COUNT(*) AS n FROM shop.orders"),
    ]);
    let mut state = State::default();
    let first = state.plan(&project, "prod", false);
    state.apply(&first);
    let prod = &state.environments[&EnvironmentName::prod()];
    let later = Timestamp::parse("2024-01-12 06:00").unwrap();
    let run = sluice_core::plan::build_run_plan(prod, &state.recorded, later, 0, None).unwrap();
    assert_eq!(run.previous_plan_id.as_ref(), Some(&first.id));
    assert!(run.snapshots.iter().all(|planned| planned.change == sluice_core::plan::Change::Unchanged));
    assert!(run.view_changes(Some(prod)).is_empty());
    let ranges: Vec<String> = run
        .snapshots
        .iter()
        .map(|planned| {
            format!(
                "{} {:?}",
                planned.snapshot.name,
                planned.missing_ranges.iter().map(ToString::to_string).collect::<Vec<_>>()
            )
        })
        .collect();
    expect![[r#"
        [
            "shop.orders [\"[2024-01-10 00:00:00, 2024-01-12 00:00:00)\"]",
            "shop.summary [\"[2024-01-10 00:00:00, 2024-01-12 00:00:00)\"]",
        ]
    "#]]
    .assert_debug_eq(&ranges);
    assert_eq!(run.snapshots[1].materialized_parents, vec![0]);
    let graph = TaskGraph::build(&run);
    assert_eq!(graph.len(), 2, "one batch of orders (no batch_size), one rebuild of the summary");
    let nothing = sluice_core::plan::build_run_plan(
        prod,
        &state.recorded,
        Timestamp::parse("2024-01-10 23:00").unwrap(),
        0,
        None,
    )
    .unwrap();
    assert!(nothing.has_nothing_to_do(Some(prod)));
}

/// `plan --restate-model`: the selected model over the window widened to whole intervals, its
/// FULL child over all its history up to now; nothing of a version prod uses from a development
/// environment.
#[test]
fn a_restatement_restates_the_selection_and_its_descendants_by_sqlmeshs_rules() {
    use sluice_core::plan::{RestatementRequest, build_restatement_plan};
    let open_ended = ORDERS.replace("  end '2024-01-05'\n", "");
    let project = project(&[
        ("models/orders.sql", open_ended.as_str()),
        ("models/summary.sql", "MODEL (name shop.summary, kind FULL);\nSELECT COUNT(*) AS n FROM shop.orders"),
    ]);
    let mut state = State::default();
    state.apply(&state.plan(&project, "prod", false));
    let prod = &state.environments[&EnvironmentName::prod()];
    let now = Timestamp::parse("2024-01-10").unwrap();
    let orders = ModelName::parse("shop.orders").unwrap();
    let request = |start: &str, end: &str| RestatementRequest {
        selected: [orders.clone()].into(),
        start: Some(Timestamp::parse(start).unwrap()),
        end: Some(Timestamp::parse(end).unwrap()),
    };
    let restated =
        build_restatement_plan(prod, None, &state.recorded, now, &request("2024-01-03 05:00", "2024-01-04 01:00"))
            .unwrap();
    assert!(restated.warnings.is_empty());
    let listed: Vec<String> = restated.plan.restatements.iter().map(|r| format!("{} {}", r.name, r.interval)).collect();
    expect![[r#"
        [
            "shop.orders [2024-01-03 00:00:00, 2024-01-05 00:00:00)",
            "shop.summary [2024-01-01 00:00:00, 2024-01-10 00:00:00)",
        ]
    "#]]
    .assert_debug_eq(&listed);
    let tasks: Vec<usize> = restated.plan.snapshots.iter().map(|planned| planned.batches.len()).collect();
    assert_eq!(tasks, vec![1, 1], "the two days of orders in one batch, the summary rebuilt");
    assert!(restated.plan.view_changes(Some(prod)).is_empty());

    let mut dev = prod.clone();
    dev.name = EnvironmentName::parse("dev").unwrap();
    let from_dev =
        build_restatement_plan(&dev, Some(prod), &state.recorded, now, &request("2024-01-03", "2024-01-04")).unwrap();
    assert!(from_dev.plan.restatements.is_empty());
    assert_eq!(from_dev.warnings, ["shop.orders is not restated: prod uses its version; restate it in prod instead"]);

    // A window after now runs nothing of the incremental model; its FULL child rebuilds.
    let later = build_restatement_plan(prod, None, &state.recorded, now, &request("2024-02-01", "2024-02-02")).unwrap();
    let tasks: Vec<usize> = later.plan.snapshots.iter().map(|planned| planned.batches.len()).collect();
    assert_eq!(tasks, vec![0, 1]);
}

/// A snapshot carries its model's audits rendered against the plan's tables: the model itself
/// read as the write's rows (`sluice_this_model`), every other model as its physical table. A
/// changed audit is a metadata-only change: nothing is rebuilt.
#[test]
fn audits_are_rendered_into_the_snapshot_and_changing_one_rebuilds_nothing() {
    let project = |floor: &str| {
        let audit =
            format!("AUDIT (name above, defaults (floor = {floor}));\nSELECT * FROM @this_model WHERE amount < @floor");
        let files = ProjectFiles {
            audits: [("audits/above.sql".to_string(), audit)].into_iter().collect(),
            ..files(
                CONFIG,
                &[
                    ("models/a.sql", "MODEL (name s.a, kind FULL);\nSELECT 1 AS id, 5 AS amount"),
                    (
                        "models/b.sql",
                        "MODEL (name s.b, kind FULL, audits (above, known));\nSELECT amount FROM s.a;\nAUDIT (name known);\nSELECT * FROM @this_model AS m WHERE m.amount NOT IN (SELECT amount FROM s.a)",
                    ),
                ],
            )
        };
        match load_project(&files) {
            Ok(project) => project,
            Err(errors) => panic!("{errors}"),
        }
    };
    let mut state = State::default();
    let first = state.plan(&project("0"), "prod", false);
    state.apply(&first);
    let b = &first.snapshots[1].snapshot;
    let a_table = first.snapshots[0].snapshot.physical_table().unwrap().to_string();
    let audits: Vec<(&str, bool, String)> = b
        .audits
        .iter()
        .map(|audit| (audit.call.as_str(), audit.blocking, audit.query.replace(&a_table, "<s.a>")))
        .collect();
    assert_eq!(
        audits,
        vec![
            ("above", true, "SELECT * FROM sluice_this_model AS b WHERE amount < 0".to_string()),
            (
                "known",
                true,
                "SELECT * FROM sluice_this_model AS m WHERE m.amount NOT IN (SELECT amount FROM <s.a> AS a)"
                    .to_string()
            ),
        ]
    );
    let second = state.plan(&project("1"), "prod", false);
    let planned = &second.snapshots[1];
    assert_eq!(planned.change, Change::Direct(ChangeCategory::MetadataOnly));
    assert_eq!(planned.snapshot.version, b.version);
    assert!(planned.batches.is_empty());
    assert_eq!(planned.snapshot.audits[0].query, "SELECT * FROM sluice_this_model AS b WHERE amount < 1");
}

/// `plan dev --start --end`: a development environment's backfill is clipped to the window
/// (a date-only end includes its day); prod refuses a window, as do an inverted one and an end
/// after the plan's time.
#[test]
fn a_development_window_clips_the_backfill() {
    let mut state = State::default();
    state.apply(&state.plan(&shop(DAILY), "prod", false));
    let changed = shop(&DAILY.replace("SUM(amount)", "SUM(amount) * 2"));
    let now = Timestamp::parse("2024-01-10").unwrap();
    let prod = EnvironmentName::prod();
    let dev = EnvironmentName::parse("dev").unwrap();
    let window = BackfillWindow::parse(Some("2024-01-02"), Some("2024-01-03"), &dev, now).unwrap();
    let plan = state.plan_within(&changed, "dev", false, window);
    let batches: Vec<String> = plan
        .snapshots
        .iter()
        .flat_map(|planned| {
            planned.batches.iter().map(move |batch| format!("{} {}", planned.snapshot.name, batch.interval))
        })
        .collect();
    assert_eq!(
        batches,
        vec![
            "shop.daily [2024-01-02 00:00:00, 2024-01-04 00:00:00)".to_string(),
            "shop.summary [2024-01-02 00:00:00, 2024-01-04 00:00:00)".to_string(),
        ]
    );
    assert!(
        format_plan(&plan, None, None)
            .contains("Backfill window: from 2024-01-02 00:00:00 to 2024-01-04 00:00:00 (exclusive).")
    );
    let unbounded = state.plan(&changed, "dev", false);
    assert_ne!(unbounded.id, plan.id, "the window is part of the plan's identity");

    let refused = |start: Option<&str>, end: Option<&str>, environment: &EnvironmentName| {
        BackfillWindow::parse(start, end, environment, now).unwrap_err()
    };
    assert_eq!(
        refused(Some("2024-01-02"), None, &prod),
        "--start and --end limit a development environment's backfill; a prod plan backfills every missing interval"
    );
    assert_eq!(BackfillWindow::parse(None, None, &prod, now).unwrap(), BackfillWindow::default());
    assert_eq!(
        refused(Some("2024-01-04"), Some("2024-01-03"), &dev),
        "--start 2024-01-04 00:00:00 is not before --end 2024-01-04 00:00:00"
    );
    assert_eq!(
        refused(None, Some("2024-02-01"), &dev),
        "--end 2024-02-01 00:00:00 is after the plan's time 2024-01-10 00:00:00"
    );
    assert!(refused(Some("yesterday"), None, &dev).starts_with("--start: "));
    // As SQLMesh: an end on the plan's own day is not in the future (it includes that day, up
    // to the plan's time).
    assert!(BackfillWindow::parse(None, Some("2024-01-10"), &dev, now).is_ok());
}

/// Each model's change, whether the environment shows it, and its task count: one line each.
fn summary_of(plan: &Plan) -> Vec<String> {
    plan.snapshots
        .iter()
        .map(|planned| {
            let change = match &planned.change {
                Change::Unchanged => "unchanged".to_string(),
                Change::Added => "added".to_string(),
                Change::Direct(category) => format!("direct {}", category.label()),
                Change::Indirect { breaking, .. } => format!("indirect{}", if *breaking { " breaking" } else { "" }),
            };
            let shown = if planned.promoted { "shown" } else { "hidden" };
            format!("{} {change}, {shown}, {} tasks", planned.snapshot.name, planned.batches.len())
        })
        .collect()
}

/// `--select-model`, by SQLMesh's rules: an unselected model keeps the environment's definition
/// (its local change waits), a new unselected model stays out, only the selection and its
/// ancestors are backfilled, and a development environment shows only the selection. In prod,
/// a changed model the plan would not build is refused; `M+` selects it.
#[test]
fn a_selective_plan_takes_only_the_selected_changes_by_sqlmeshs_rules() {
    let mut state = State::default();
    state.apply(&state.plan(&shop(DAILY), "prod", false));
    let orders_changed = ORDERS.replace("SELECT id, ds, amount", "SELECT id, ds, amount * 2 AS amount");
    let extra = "MODEL (name shop.extra, kind FULL, end '2024-01-05');\nSELECT COUNT(*) AS n FROM shop.orders";
    let changed = project(&[
        ("models/orders.sql", orders_changed.as_str()),
        ("models/daily.sql", DAILY_BREAKING),
        ("models/summary.sql", SUMMARY),
        ("models/extra.sql", extra),
    ]);

    let dev = state.plan_selecting(&changed, "dev", &["shop.daily"]).unwrap();
    expect![[r#"
        [
            "shop.orders unchanged, hidden, 0 tasks",
            "shop.daily direct breaking, shown, 3 tasks",
            "shop.summary indirect breaking, hidden, 0 tasks",
        ]
    "#]]
    .assert_debug_eq(&summary_of(&dev));
    let prod_daily = &state.environments[&EnvironmentName::prod()].snapshots[1];
    assert_eq!(dev.snapshots[0].snapshot.id, state.environments[&EnvironmentName::prod()].snapshots[0].id);
    assert_ne!(dev.snapshots[1].snapshot.version, prod_daily.version);

    let upstream = state.plan_selecting(&changed, "dev", &["+shop.daily"]).unwrap();
    expect![[r#"
        [
            "shop.orders direct breaking, shown, 1 tasks",
            "shop.daily direct breaking, shown, 3 tasks",
            "shop.summary indirect breaking, hidden, 0 tasks",
        ]
    "#]]
    .assert_debug_eq(&summary_of(&upstream));
    assert_ne!(upstream.id, dev.id);

    let error = state.plan_selecting(&changed, "prod", &["shop.daily"]).unwrap_err();
    assert_eq!(error, "unbuilt: shop.summary");
    let prod = state.plan_selecting(&changed, "prod", &["shop.daily+"]).unwrap();
    expect![[r#"
        [
            "shop.orders unchanged, shown, 0 tasks",
            "shop.daily direct breaking, shown, 3 tasks",
            "shop.summary indirect breaking, shown, 1 tasks",
        ]
    "#]]
    .assert_debug_eq(&summary_of(&prod));
    assert!(prod.removed.is_empty(), "an unselected model is not removed");

    let error = state.plan_selecting(&changed, "dev", &["shop.nothing"]).unwrap_err();
    assert!(error.contains("matches no model"), "{error}");
}

/// What a prod restatement forgets in development versions: the restated model and its readers
/// in each development environment at versions prod does not use, over the restated time, and
/// versions no environment shows over the widest time forgotten for their name; never prod's
/// own versions.
#[test]
fn a_prod_restatement_forgets_development_versions_by_sqlmeshs_rules() {
    use sluice_core::interval::Interval;
    use sluice_core::plan::{Restatement, development_restatements};
    let mut state = State::default();
    state.apply(&state.plan(&shop(DAILY), "prod", false));
    state.apply(&state.plan(&shop(DAILY_BREAKING), "dev", false));
    let prod = state.environments[&EnvironmentName::prod()].clone();
    let dev = state.environments[&EnvironmentName::parse("dev").unwrap()].clone();
    let dev_view = plan_base(&dev.name, Some(&dev), Some(&prod)).unwrap();
    let orders = &prod.snapshots[0];
    let window = Interval::new(Timestamp::parse("2024-01-02").unwrap(), Timestamp::parse("2024-01-03").unwrap());
    let restated = [Restatement { name: orders.name.clone(), version: orders.version.clone(), interval: window }];
    // A version of the summary that no environment shows any more.
    let mut orphan = dev.snapshots.iter().find(|s| s.name.to_string() == "shop.summary").unwrap().clone();
    orphan.version = Version("orphan".to_string());
    let stored: Vec<Snapshot> = state.known.values().cloned().chain([orphan]).collect();

    let forgotten = development_restatements(&restated, &prod, std::slice::from_ref(&dev_view), &stored);
    let listed: Vec<String> = forgotten
        .iter()
        .map(|r| format!("{} {} {}", r.name, if r.version.0 == "orphan" { "orphan" } else { "dev" }, r.interval))
        .collect();
    expect![[r#"
        [
            "shop.daily dev [2024-01-02 00:00:00, 2024-01-03 00:00:00)",
            "shop.summary dev [2024-01-02 00:00:00, 2024-01-03 00:00:00)",
            "shop.summary orphan [2024-01-02 00:00:00, 2024-01-03 00:00:00)",
        ]
    "#]]
    .assert_debug_eq(&listed);
    assert!(forgotten.iter().all(|r| !prod.snapshots.iter().any(|p| p.name == r.name && p.version == r.version)));
    // Nothing shown in development reads a restated model: nothing to forget.
    let unrelated =
        [Restatement { name: ModelName::parse("shop.other").unwrap(), version: Version("x".into()), interval: window }];
    assert!(development_restatements(&unrelated, &prod, &[dev_view], &stored).is_empty());
}
