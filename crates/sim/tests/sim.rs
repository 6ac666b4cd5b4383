//! The protocol simulation over many seeds (2,000 by default; `SLUICE_SIM_SEEDS=N` for more,
//! `SLUICE_SIM_SEED=N` for one), and the proof that a seed replays exactly.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_sim::{Outcome, run_seed};

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("SLUICE_SIM_SEED") {
        return vec![seed.trim().parse().unwrap_or_else(|_| panic!("SLUICE_SIM_SEED must be a number, got {seed:?}"))];
    }
    let count: u64 = std::env::var("SLUICE_SIM_SEEDS")
        .ok()
        .map(|count| {
            count.trim().parse().unwrap_or_else(|_| panic!("SLUICE_SIM_SEEDS must be a number, got {count:?}"))
        })
        .unwrap_or(2_000);
    (0..count).collect()
}

fn describe(outcome: &Outcome) -> String {
    // One seed replayed: its whole log (the last 4,000 events); many: the last 60 of each.
    let keep = if std::env::var("SLUICE_SIM_SEED").is_ok() { usize::MAX } else { 60 };
    let tail: Vec<&String> = outcome.log.iter().rev().take(keep).collect::<Vec<_>>().into_iter().rev().collect();
    format!(
        "seed {} failed (replay: SLUICE_SIM_SEED={} cargo test -p sluice-sim --test sim):\n  {}\nlast events:\n{}",
        outcome.seed,
        outcome.seed,
        outcome.violations.join("\n  "),
        tail.iter().map(|line| format!("    {line}")).collect::<Vec<_>>().join("\n")
    )
}

#[test]
fn every_seed_keeps_every_invariant() {
    let seeds = seeds();
    let next = AtomicU64::new(0);
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let steps = AtomicU64::new(0);
    let started = std::time::Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(4);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst) as usize;
                    let Some(seed) = seeds.get(index) else { break };
                    let outcome = run_seed(*seed);
                    steps.fetch_add(outcome.steps, Ordering::SeqCst);
                    if !outcome.violations.is_empty() {
                        failures.lock().unwrap().push(describe(&outcome));
                    }
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "simulated {} seeds in {seconds:.1} s ({:.0} seeds/s, {} steps)",
        seeds.len(),
        seeds.len() as f64 / seconds,
        steps.load(Ordering::SeqCst)
    );
    let failures = failures.into_inner().unwrap();
    for failure in &failures {
        println!("{}", failure.lines().take(3).collect::<Vec<_>>().join(" | "));
    }
    assert!(failures.is_empty(), "{} of {} seeds failed; first:\n{}", failures.len(), seeds.len(), failures[0]);
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [1, 7, 42, 1234] {
        let first = run_seed(seed);
        let second = run_seed(seed);
        assert!(first.steps > 50, "seed {seed} did almost nothing: {} steps", first.steps);
        assert_eq!(
            (first.trace_hash, first.steps),
            (second.trace_hash, second.steps),
            "seed {seed} did not replay the same run"
        );
    }
}
