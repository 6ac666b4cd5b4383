//! Run progress: an indicatif bar on a terminal (models done/total, intervals done/total, rate,
//! ETA), plain log lines otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use sluice_coordinator::{Progress, ProgressTotals};
use sluice_core::names::RunId;
use sluice_core::plan::Plan;

struct Counts {
    tasks_total: u64,
    tasks_done: u64,
    intervals_total: u64,
    intervals_done: u64,
    models_total: u64,
    models_done: u64,
    started: Instant,
    last_line: Instant,
}

/// Prints progress to stderr.
pub struct ConsoleProgress {
    bar: Option<ProgressBar>,
    counts: Mutex<Counts>,
}

impl ConsoleProgress {
    pub fn new() -> ConsoleProgress {
        let bar = (std::io::stderr().is_terminal() && !crate::console::json()).then(|| {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} tasks {msg} ({per_sec}, ETA {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        let now = Instant::now();
        ConsoleProgress {
            bar,
            counts: Mutex::new(Counts {
                tasks_total: 0,
                tasks_done: 0,
                intervals_total: 0,
                intervals_done: 0,
                models_total: 0,
                models_done: 0,
                started: now,
                last_line: now,
            }),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Progress for ConsoleProgress {
    fn started(&self, plan: &Plan, run_id: &RunId, total: ProgressTotals) {
        let mut counts = self.counts();
        counts.tasks_total = total.tasks;
        counts.tasks_done = total.tasks_done;
        counts.intervals_total = total.intervals;
        counts.models_total = total.models;
        crate::console::say(&format!(
            "applying plan {} to {} (run {run_id}): {} tasks over {} models, {} already done",
            plan.id, plan.environment, total.tasks, total.models, total.tasks_done
        ));
        if let Some(bar) = &self.bar {
            bar.set_length(total.tasks);
            bar.set_position(total.tasks_done);
        }
    }

    fn task_done(&self, intervals: u32, skipped: bool, model_finished: bool) {
        let mut counts = self.counts();
        counts.tasks_done += 1;
        if model_finished {
            counts.models_done += 1;
        }
        if !skipped {
            counts.intervals_done += u64::from(intervals);
        }
        let message = format!(
            "{}/{} models, {}/{} intervals",
            counts.models_done, counts.models_total, counts.intervals_done, counts.intervals_total
        );
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                bar.set_message(message);
            }
            None => {
                // One line every two seconds at most, and the last one.
                if counts.last_line.elapsed().as_secs() >= 2 || counts.tasks_done == counts.tasks_total {
                    counts.last_line = Instant::now();
                    crate::console::say(&format!(
                        "progress: {}/{} tasks, {message}, {:.1} s",
                        counts.tasks_done,
                        counts.tasks_total,
                        counts.started.elapsed().as_secs_f64()
                    ));
                }
            }
        }
    }

    fn task_failed(&self, model: &str, interval: &str, error: &str) {
        self.message(&format!("FAILED {model} {interval}: {error}"));
    }

    fn message(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => crate::console::say(text),
        }
    }

    fn finished(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
