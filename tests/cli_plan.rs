//! End-to-end: the real `sluice` binary plans the example project and rejects bad input with
//! errors that name the file, line and column.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/sushi")
}

/// Runs the binary with its state in a fresh temporary folder (never in the repository's example).
fn sluice(args: &[&str]) -> Output {
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("state.db");
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .arg("--state")
        .arg(&state_file)
        .env("SLUICE_LOG", "warn")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn plan_prints_every_model_the_backfill_and_the_views_of_the_example() {
    let project = example();
    let output = sluice(&["plan", "--project", project.to_str().unwrap(), "--explain", "--now", "2024-05-01"]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "stderr: {}", text(&output.stderr));
    for expected in [
        "for environment prod",
        "+ sushi.items: added (SEED)",
        "+ sushi.item_prices: added (EMBEDDED)",
        "+ sushi.orders: added (INCREMENTAL_BY_TIME_RANGE)",
        "+ sushi.daily_revenue: added (INCREMENTAL_BY_TIME_RANGE)",
        "+ sushi.customer_totals: added (FULL)",
        "+ sushi.top_customers: added (VIEW)",
        "91 intervals in 91 tasks ([2024-01-01, 2024-04-01))",
        "91 intervals in 13 tasks ([2024-01-01, 2024-04-01))",
        "Task graph: 107 tasks",
        "sushi.daily_revenue: 13 tasks, after sushi.items, sushi.orders",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    // The embedded model has no view of its own.
    assert!(!stdout.contains("sushi.item_prices ->"), "{stdout}");
    assert!(stdout.contains("sushi.orders -> sluice__sushi.sushi__orders__"), "{stdout}");
}

#[test]
fn plan_into_dev_names_the_dev_schemas() {
    let project = example();
    let output = sluice(&["plan", "dev", "--project", project.to_str().unwrap(), "--now", "2024-05-01"]);
    assert!(output.status.success(), "stderr: {}", text(&output.stderr));
    assert!(text(&output.stdout).contains("sushi__dev.orders -> sluice__sushi.sushi__orders__"));
}

#[test]
fn malformed_projects_fail_with_every_error_located() {
    let folder = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(folder.path().join("models")).unwrap();
    std::fs::write(folder.path().join("config.yaml"), "model_defaults:\n  start: 2024-01-01\n").unwrap();
    std::fs::write(folder.path().join("models/a.sql"), "MODEL (name s.a, kind FULL);\n\nSELECT FROM WHERE").unwrap();
    std::fs::write(folder.path().join("models/b.sql"), "MODEL (name s.b, kind FULL, gateway nowhere);\nSELECT 1 AS x")
        .unwrap();
    let output = sluice(&["plan", "--project", folder.path().to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("the project has 2 errors"), "{stderr}");
    assert!(stderr.contains("models/a.sql:3:"), "{stderr}");
    assert!(stderr.contains("models/b.sql:1:37: unknown gateway \"nowhere\""), "{stderr}");
}

#[test]
fn environment_names_carrying_sql_are_refused() {
    let project = example();
    for name in ["dev'; DROP TABLE x; --", "dev\"", "dev/*", "Prod"] {
        let output = sluice(&["plan", name, "--project", project.to_str().unwrap()]);
        assert!(!output.status.success(), "{name} was accepted");
        assert!(text(&output.stderr).contains("expected an environment name"), "{}", text(&output.stderr));
    }
}

#[test]
fn a_missing_project_folder_is_named() {
    let output = sluice(&["plan", "--project", "/nonexistent/sluice-project"]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("/nonexistent/sluice-project does not exist"));
}

/// A project with models sluice cannot run: `plan` names each (with the models that read them)
/// and stops; `--skip-unsupported` plans and applies the others, saying what it left out.
#[test]
fn models_sluice_cannot_run_stop_the_plan_unless_left_out() {
    let folder = tempfile::tempdir().unwrap();
    let project = folder.path();
    std::fs::create_dir_all(project.join("models")).unwrap();
    std::fs::create_dir_all(project.join("macros")).unwrap();
    std::fs::write(
        project.join("config.yaml"),
        "gateways:\n  local:\n    connection:\n      type: duckdb\n      database: wh.duckdb\nmodel_defaults:\n  dialect: duckdb\n  start: '2024-01-01'\n",
    )
    .unwrap();
    std::fs::write(
        project.join("macros/util.py"),
        "from sqlmesh import macro\n\n@macro()\ndef twice(evaluator, x):\n    return x\n",
    )
    .unwrap();
    std::fs::write(project.join("models/a.sql"), "MODEL (name s.a, kind FULL);\nSELECT @twice(1) AS x").unwrap();
    std::fs::write(project.join("models/b.sql"), "MODEL (name s.b, kind FULL);\nSELECT x FROM s.a").unwrap();
    std::fs::write(project.join("models/c.sql"), "MODEL (name s.c, kind FULL);\nSELECT 1 AS x").unwrap();
    let path = project.to_str().unwrap();

    let refused = sluice(&["plan", "--project", path, "--now", "2024-01-03"]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    for expected in [
        "models/a.sql:2:8: @twice is a Python macro (macros/util.py), which sluice cannot run",
        "models/b.sql: s.b reads s.a, which sluice cannot run (models/a.sql)",
        "plan the others with --skip-unsupported",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }

    let applied = sluice(&["plan", "--project", path, "--now", "2024-01-03", "--skip-unsupported", "--auto-apply"]);
    let stdout = text(&applied.stdout);
    assert!(applied.status.success(), "{stdout}{}", text(&applied.stderr));
    assert!(stdout.contains("Left out (--skip-unsupported): s.a, s.b"), "{stdout}");
    assert!(stdout.contains("+ s.c: added (FULL)"), "{stdout}");
    assert!(!stdout.contains("+ s.a"), "{stdout}");

    // A backfill window is for development environments.
    let windowed = sluice(&["plan", "--project", path, "--now", "2024-01-03", "--start", "2024-01-02"]);
    assert!(!windowed.status.success());
    assert!(
        text(&windowed.stderr).contains("--start and --end limit a development environment's backfill"),
        "{}",
        text(&windowed.stderr)
    );
}
