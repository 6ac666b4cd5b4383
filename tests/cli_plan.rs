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
