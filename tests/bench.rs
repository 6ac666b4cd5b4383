//! The benchmarks run end to end on a small shape, so that the README's commands keep working:
//! every run's tables equal the floor's, and everything the benchmark made is removed. The
//! figures themselves are not asserted (they are measured, not tested).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn sluice(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env_remove("SLUICE_STATE_URL")
        .env_remove("SLUICE_AMQP_URL")
        .env_remove("SLUICE_REDIS_URL")
        .output()
        .expect("the sluice binary runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Databases named like the benchmark's, left on the local PostgreSQL by the process `pid`.
fn leftover_databases(pid: &str) -> Vec<String> {
    let output = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-tAc"])
        .arg(format!("SELECT datname FROM pg_database WHERE datname LIKE 'sluice_bench_{pid}%'"))
        .output()
        .expect("psql runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_string).collect()
}

#[test]
fn bench_apply_measures_floor_embedded_and_distributed_on_equal_data() {
    let (code, stdout, stderr) = sluice(&[
        "bench",
        "apply",
        "--models",
        "4",
        "--layers",
        "2",
        "--days",
        "6",
        "--rows",
        "3",
        "--workers",
        "1,2",
        "--repeats",
        "2",
    ]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("4 models in 2 layers x 6 daily intervals x 3 rows, batch_size 1, 24 tasks"), "{stdout}");
    // Each configuration ran twice after its own fair floor; the serial floor once.
    for (run, runs) in [
        ("| serial floor (1 connection) |", 1),
        ("| fair floor, 1 connection |", 2),
        ("| fair floor, 2 connections |", 2),
        ("| embedded, 1 worker |", 2),
        ("| embedded, 2 workers |", 2),
        ("| distributed, 1 worker process |", 2),
        ("| distributed, 2 worker processes |", 2),
    ] {
        let row =
            stdout.lines().find(|line| line.starts_with(run)).unwrap_or_else(|| panic!("no row {run} in:\n{stdout}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[4], runs.to_string(), "{row}");
    }
    // Peak RSS is reported for every process of a distributed run.
    assert!(
        stdout.contains("coordinator ") && stdout.contains("worker 2 ") && stdout.contains("promoter "),
        "{stdout}"
    );
}

#[test]
fn bench_apply_names_an_unreachable_server() {
    // The error names the server; there is nothing to clean up.
    let (code, stdout, stderr) = sluice(&[
        "bench",
        "apply",
        "--models",
        "2",
        "--layers",
        "1",
        "--days",
        "2",
        "--workers",
        "1",
        "--no-distributed",
        "--pg-port",
        "1",
    ]);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("connecting to PostgreSQL database postgres on 127.0.0.1:1"), "{stderr}");
}

#[test]
fn bench_promote_and_bench_plan_with_services_run() {
    let (code, stdout, stderr) = sluice(&["bench", "promote", "--views", "20"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("point 20 views at new tables"), "{stdout}");
    let (code, stdout, stderr) = sluice(&[
        "bench",
        "plan",
        "--models",
        "8",
        "--layers",
        "2",
        "--intervals",
        "50",
        "--recorded",
        "1000",
        "--services",
    ]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("task graph (400 tasks"), "{stdout}");
    assert!(stdout.contains("ready tasks published to RabbitMQ") && stdout.contains("(200 confirmed)"), "{stdout}");
}

#[test]
fn the_benchmark_leaves_no_database_queue_or_key_behind() {
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "bench",
            "apply",
            "--models",
            "2",
            "--layers",
            "1",
            "--days",
            "2",
            "--rows",
            "1",
            "--workers",
            "1",
            "--repeats",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the sluice binary runs");
    let pid = child.id().to_string();
    let output = child.wait_with_output().expect("the benchmark finishes");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(leftover_databases(&pid), Vec::<String>::new());
    let queues = Command::new("rabbitmqctl").args(["list_queues", "-q", "name"]).output().expect("rabbitmqctl runs");
    let queues = String::from_utf8_lossy(&queues.stdout);
    assert!(!queues.contains(&format!("sluice_bench_{pid}")), "queues left behind:\n{queues}");
    let keys = Command::new("redis-cli")
        .args(["--scan", "--pattern", &format!("sluice_bench_{pid}*")])
        .output()
        .expect("redis-cli runs");
    assert_eq!(String::from_utf8_lossy(&keys.stdout).trim(), "", "Redis keys left behind");
}

#[cfg(feature = "duckdb")]
#[test]
fn bench_apply_on_duckdb_measures_floor_and_embedded() {
    let (code, stdout, stderr) = sluice(&[
        "bench",
        "apply",
        "--engine",
        "duckdb",
        "--models",
        "3",
        "--layers",
        "2",
        "--days",
        "4",
        "--rows",
        "2",
        "--workers",
        "1,2",
        "--repeats",
        "1",
    ]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("DuckDB warehouse"), "{stdout}");
    assert!(stdout.contains("| embedded, 2 workers |"), "{stdout}");
    assert!(stdout.contains("distributed runs left out") && !stdout.contains("| distributed"), "{stdout}");
}
