//! Cron schedules in UTC, the intervals between their ticks, missing intervals and batching.
//!
//! A model's `cron` splits time into intervals `[tick, next tick)`. Fixed-period schedules
//! (every minute, hour, day or week) are computed with integer arithmetic; every other
//! five-field expression is evaluated by the `croner` crate in UTC.

use std::fmt;
use std::iter::FusedIterator;

use chrono::{DateTime, Utc};

use crate::interval::{Interval, IntervalSet, Timestamp};

const SECONDS_PER_MINUTE: i64 = 60;
const SECONDS_PER_HOUR: i64 = 3_600;
const SECONDS_PER_DAY: i64 = 86_400;
const SECONDS_PER_WEEK: i64 = 7 * SECONDS_PER_DAY;
/// 1970-01-01 was a Thursday; the first Sunday 00:00 UTC after the epoch is 1970-01-04.
const FIRST_SUNDAY_AFTER_EPOCH: i64 = 3 * SECONDS_PER_DAY;

/// Why a text is not a usable cron schedule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("expected @hourly, @daily, @weekly, @monthly or a five-field cron expression, found {text:?}: {reason}")]
    InvalidExpression { text: String, reason: String },
    #[error("expected a cron expression that fires at least once, found {text:?}, which never fires")]
    NeverFires { text: String },
}

/// A parsed cron schedule, evaluated in UTC.
///
/// Equality compares the original text, so `@daily` and `0 0 * * *` are different values even
/// though they tick at the same times.
#[derive(Clone, Debug)]
pub struct Cron {
    text: String,
    schedule: CronSchedule,
}

#[derive(Clone, Debug)]
enum CronSchedule {
    /// Ticks at every `offset_seconds + k * period_seconds`, for every integer `k`.
    FixedPeriod { period_seconds: i64, offset_seconds: i64 },
    /// Anything else, evaluated by croner in UTC.
    General(Box<croner::Cron>),
}

impl PartialEq for Cron {
    fn eq(&self, other: &Cron) -> bool {
        self.text == other.text
    }
}

impl Eq for Cron {}

impl fmt::Display for Cron {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.text)
    }
}

impl Cron {
    /// Parses `@hourly`, `@daily` (or `@midnight`), `@weekly` (Sunday 00:00), `@monthly`,
    /// `@yearly`/`@annually` (case-insensitive) or any five-field cron expression.
    pub fn parse(text: &str) -> Result<Cron, CronError> {
        Cron::parse_with_fast_paths(text, true)
    }

    fn parse_with_fast_paths(text: &str, use_fast_paths: bool) -> Result<Cron, CronError> {
        let trimmed = text.trim();
        let expression = expand_nickname(trimmed).unwrap_or(trimmed);
        if use_fast_paths && let Some(schedule) = recognise_fixed_period(expression) {
            return Ok(Cron { text: text.to_string(), schedule });
        }
        if let Some(reason) = describe_shape_problem(expression) {
            return Err(CronError::InvalidExpression { text: text.to_string(), reason });
        }
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .year(croner::parser::Year::Disallowed)
            .build();
        let parsed = parser.parse(expression).map_err(|error| CronError::InvalidExpression {
            text: text.to_string(),
            reason: lowercase_reason(&error.to_string()),
        })?;
        // A five-field expression has no year, so one that fires at all fires within a few
        // years of any start (29 February is at most eight years away).
        let epoch = DateTime::<Utc>::UNIX_EPOCH;
        if parsed.find_next_occurrence(&epoch, true).is_err() {
            return Err(CronError::NeverFires { text: text.to_string() });
        }
        Ok(Cron { text: text.to_string(), schedule: CronSchedule::General(Box::new(parsed)) })
    }

    /// The text this schedule was parsed from, unchanged.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether this schedule is computed with integer arithmetic rather than croner.
    pub fn is_fixed_period(&self) -> bool {
        matches!(self.schedule, CronSchedule::FixedPeriod { .. })
    }

    /// The first tick strictly after `t`.
    ///
    /// Returns [`Timestamp::MAX`] when there is none (past year 5000 for general expressions,
    /// or past the end of `i64` seconds).
    pub fn next_tick_after(&self, t: Timestamp) -> Timestamp {
        match &self.schedule {
            CronSchedule::FixedPeriod { period_seconds, offset_seconds } => {
                let floor = fixed_floor(i128::from(t.0), *period_seconds, *offset_seconds);
                saturate(floor + i128::from(*period_seconds))
            }
            CronSchedule::General(parsed) => croner_search(parsed, t, false, croner::Direction::Forward),
        }
    }

    /// The first tick at or after `t`; [`Timestamp::MAX`] when there is none.
    pub fn tick_at_or_after(&self, t: Timestamp) -> Timestamp {
        match &self.schedule {
            CronSchedule::FixedPeriod { period_seconds, offset_seconds } => {
                let floor = fixed_floor(i128::from(t.0), *period_seconds, *offset_seconds);
                if floor == i128::from(t.0) { t } else { saturate(floor + i128::from(*period_seconds)) }
            }
            CronSchedule::General(parsed) => croner_search(parsed, t, true, croner::Direction::Forward),
        }
    }

    /// The latest tick at or before `t`; [`Timestamp::MIN`] when there is none (before year 1
    /// for general expressions, or before the start of `i64` seconds).
    pub fn tick_at_or_before(&self, t: Timestamp) -> Timestamp {
        match &self.schedule {
            CronSchedule::FixedPeriod { period_seconds, offset_seconds } => {
                saturate(fixed_floor(i128::from(t.0), *period_seconds, *offset_seconds))
            }
            CronSchedule::General(parsed) => croner_search(parsed, t, true, croner::Direction::Backward),
        }
    }

    /// Whether `t` is a tick.
    pub fn is_tick(&self, t: Timestamp) -> bool {
        match &self.schedule {
            CronSchedule::FixedPeriod { period_seconds, offset_seconds } => {
                fixed_floor(i128::from(t.0), *period_seconds, *offset_seconds) == i128::from(t.0)
            }
            CronSchedule::General(parsed) => {
                to_chrono(t).is_some_and(|instant| parsed.is_time_matching(&instant).unwrap_or(false))
            }
        }
    }

    /// The intervals `[tick, next tick)` from `tick_at_or_after(start)` for as long as they end
    /// at or before `end`.
    pub fn intervals(&self, start: Timestamp, end: Timestamp) -> CronIntervals<'_> {
        CronIntervals { cron: self, next_start: self.tick_at_or_after(start), end, finished: false }
    }

    /// Walks up to `count` ticks forward from the tick `from` without passing `limit`; returns
    /// the tick reached and how many steps were taken.
    fn advance_ticks(&self, from: Timestamp, count: u32, limit: Timestamp) -> (Timestamp, u32) {
        match &self.schedule {
            CronSchedule::FixedPeriod { period_seconds, .. } => {
                let room = (i128::from(limit.0) - i128::from(from.0)) / i128::from(*period_seconds);
                let steps = room.clamp(0, i128::from(count));
                let reached = saturate(i128::from(from.0) + steps * i128::from(*period_seconds));
                // `steps` is clamped to `0..=count`, so it fits in u32.
                (reached, u32::try_from(steps).unwrap_or(count))
            }
            CronSchedule::General(_) => {
                let mut reached = from;
                let mut steps = 0;
                while steps < count {
                    let next = self.next_tick_after(reached);
                    if next > limit || next <= reached {
                        break;
                    }
                    reached = next;
                    steps += 1;
                }
                (reached, steps)
            }
        }
    }

    /// Walks up to `count` ticks back from the tick `from`, stopping at the tick `floor`.
    fn retreat_ticks(&self, from: Timestamp, count: u32, floor: Timestamp) -> Timestamp {
        match &self.schedule {
            CronSchedule::FixedPeriod { period_seconds, .. } => {
                let target = i128::from(from.0) - i128::from(count) * i128::from(*period_seconds);
                saturate(target.max(i128::from(floor.0)))
            }
            CronSchedule::General(_) => {
                let mut reached = from;
                for _ in 0..count {
                    if reached <= floor || reached == Timestamp::MIN {
                        break;
                    }
                    let previous = self.tick_at_or_before(Timestamp(reached.0 - 1));
                    if previous >= reached {
                        break;
                    }
                    reached = previous;
                }
                reached.max(floor)
            }
        }
    }
}

/// Replaces a cron nickname by its five-field expression.
fn expand_nickname(trimmed: &str) -> Option<&'static str> {
    const NICKNAMES: [(&str, &str); 7] = [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
    ];
    NICKNAMES.iter().find(|(nickname, _)| nickname.eq_ignore_ascii_case(trimmed)).map(|(_, expression)| *expression)
}

/// Says what is wrong with an expression that is not even shaped like five cron fields.
fn describe_shape_problem(expression: &str) -> Option<String> {
    if expression.is_empty() {
        return Some("the text is empty".to_string());
    }
    if expression.starts_with('@') {
        return Some(format!(
            "{expression} is not one of @hourly, @daily, @midnight, @weekly, @monthly, @yearly, @annually"
        ));
    }
    match expression.split_whitespace().count() {
        5 => None,
        1 => Some("it has 1 field".to_string()),
        count => Some(format!("it has {count} fields")),
    }
}

/// Recognises the fixed-period expressions computed without croner.
fn recognise_fixed_period(expression: &str) -> Option<CronSchedule> {
    let mut fields = expression.split_whitespace();
    let five: [&str; 5] = [fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?];
    if fields.next().is_some() {
        return None;
    }
    let (period_seconds, offset_seconds) = match five {
        ["*", "*", "*", "*", "*"] => (SECONDS_PER_MINUTE, 0),
        ["0", "*", "*", "*", "*"] => (SECONDS_PER_HOUR, 0),
        ["0", "0", "*", "*", "*"] => (SECONDS_PER_DAY, 0),
        ["0", "0", "*", "*", day_of_week]
            if day_of_week == "0" || day_of_week == "7" || day_of_week.eq_ignore_ascii_case("sun") =>
        {
            (SECONDS_PER_WEEK, FIRST_SUNDAY_AFTER_EPOCH)
        }
        _ => return None,
    };
    Some(CronSchedule::FixedPeriod { period_seconds, offset_seconds })
}

/// The latest `offset + k * period` at or before `t`.
fn fixed_floor(t: i128, period_seconds: i64, offset_seconds: i64) -> i128 {
    t - (t - i128::from(offset_seconds)).rem_euclid(i128::from(period_seconds))
}

fn saturate(value: i128) -> Timestamp {
    Timestamp(i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX }))
}

fn to_chrono(t: Timestamp) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp(t.0, 0)
}

/// One croner search; a failed search answers with the sentinel for its direction.
fn croner_search(parsed: &croner::Cron, t: Timestamp, inclusive: bool, direction: croner::Direction) -> Timestamp {
    let not_found = match direction {
        croner::Direction::Forward => Timestamp::MAX,
        croner::Direction::Backward => Timestamp::MIN,
    };
    let Some(instant) = to_chrono(t) else {
        return not_found;
    };
    let found = match direction {
        croner::Direction::Forward => parsed.find_next_occurrence(&instant, inclusive),
        croner::Direction::Backward => parsed.find_previous_occurrence(&instant, inclusive),
    };
    found.map_or(not_found, |tick| Timestamp(tick.timestamp()))
}

/// Croner's messages start with a capital and end with a period; ours do neither.
fn lowercase_reason(reason: &str) -> String {
    let trimmed = reason.trim().trim_end_matches('.');
    let mut characters = trimmed.chars();
    match characters.next() {
        Some(first) => first.to_lowercase().chain(characters).collect(),
        None => String::new(),
    }
}

/// The intervals between consecutive ticks of a [`Cron`]; see [`Cron::intervals`].
#[derive(Clone, Debug)]
pub struct CronIntervals<'cron> {
    cron: &'cron Cron,
    next_start: Timestamp,
    end: Timestamp,
    finished: bool,
}

impl Iterator for CronIntervals<'_> {
    type Item = Interval;

    fn next(&mut self) -> Option<Interval> {
        if self.finished {
            return None;
        }
        let start = self.next_start;
        if start >= self.end {
            self.finished = true;
            return None;
        }
        let next = self.cron.next_tick_after(start);
        if next > self.end || next <= start {
            self.finished = true;
            return None;
        }
        self.next_start = next;
        Some(Interval { start, end: next })
    }
}

impl FusedIterator for CronIntervals<'_> {}

/// How many ranges to step over one by one before falling back to a binary search.
const LINEAR_STEPS_BEFORE_BINARY_SEARCH: usize = 8;

/// The index of the first range that ends after `t`, searching from `from`.
fn first_range_ending_after(ranges: &[Interval], from: usize, t: Timestamp) -> usize {
    let mut index = from;
    for _ in 0..LINEAR_STEPS_BEFORE_BINARY_SEARCH {
        match ranges.get(index) {
            Some(range) if range.end <= t => index += 1,
            _ => return index,
        }
    }
    index + ranges.get(index..).map_or(0, |rest| rest.partition_point(|range| range.end <= t))
}

/// Every interval of `cron.intervals(start, end)` that `recorded` does not fully cover, in order.
///
/// Walks the recorded ranges with a cursor and jumps over a covering range in one step, so the
/// cost grows with the number of missing intervals and recorded ranges in the window, not with
/// the number of covered intervals.
pub fn missing_intervals(cron: &Cron, start: Timestamp, end: Timestamp, recorded: &IntervalSet) -> Vec<Interval> {
    let ranges = recorded.ranges();
    let mut missing = Vec::new();
    let mut range_index = 0;
    let mut current = cron.tick_at_or_after(start);
    while current < end {
        let next = cron.next_tick_after(current);
        if next > end || next <= current {
            break;
        }
        range_index = first_range_ending_after(ranges, range_index, current);
        if let Some(range) = ranges.get(range_index)
            && range.start <= current
            && next <= range.end
        {
            // Every interval ending at or before `range.end` is covered: skip to the last tick
            // inside the range, which is at least `next`.
            current = cron.tick_at_or_before(range.end).max(next);
            continue;
        }
        missing.push(Interval { start: current, end: next });
        current = next;
    }
    missing
}

/// A run of consecutive cron intervals to process in one go.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Batch {
    pub interval: Interval,
    /// How many cron intervals `interval` spans.
    pub interval_count: u32,
}

/// Groups missing intervals into batches.
///
/// `missing` must be sorted cron intervals of `cron` (as [`missing_intervals`] returns). They
/// are split into contiguous runs; each run's start moves back by `lookback` cron intervals,
/// but never before the first tick at or after `earliest_start` (and never later than it was);
/// runs that then overlap or touch are merged. `batch_size: None` makes one batch per run,
/// `Some(n)` cuts each run into consecutive batches of at most `n` intervals (`Some(0)` is
/// treated as `Some(1)`). A run longer than `u32::MAX` intervals is cut at that length.
pub fn batch_intervals(
    cron: &Cron,
    missing: &[Interval],
    batch_size: Option<u32>,
    lookback: u32,
    earliest_start: Timestamp,
) -> Vec<Batch> {
    let floor = cron.tick_at_or_after(earliest_start);
    let mut runs: Vec<Interval> = Vec::new();
    for interval in missing.iter().filter(|interval| !interval.is_empty()) {
        debug_assert!(runs.last().is_none_or(|last| last.start <= interval.start), "missing intervals must be sorted");
        let widened_start = if lookback == 0 || interval.start <= floor {
            interval.start
        } else {
            cron.retreat_ticks(interval.start, lookback, floor)
        };
        match runs.last_mut() {
            Some(last) if widened_start <= last.end => {
                last.end = last.end.max(interval.end);
            }
            _ => runs.push(Interval { start: widened_start, end: interval.end }),
        }
    }

    let chunk_size = batch_size.unwrap_or(u32::MAX).max(1);
    let mut batches = Vec::with_capacity(runs.len());
    for run in runs {
        let mut chunk_start = run.start;
        while chunk_start < run.end {
            let (chunk_end, interval_count) = cron.advance_ticks(chunk_start, chunk_size, run.end);
            if interval_count == 0 {
                // The run does not end on a tick of this schedule; keep its tail as one batch
                // rather than lose it.
                batches.push(Batch { interval: Interval { start: chunk_start, end: run.end }, interval_count: 1 });
                break;
            }
            batches.push(Batch { interval: Interval { start: chunk_start, end: chunk_end }, interval_count });
            chunk_start = chunk_end;
        }
    }
    batches
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn timestamp(text: &str) -> Timestamp {
        Timestamp::parse(text).unwrap()
    }

    fn cron(text: &str) -> Cron {
        Cron::parse(text).unwrap()
    }

    fn croner_only(text: &str) -> Cron {
        Cron::parse_with_fast_paths(text, false).unwrap()
    }

    /// 1970-01-01 to 2100-01-01.
    const TEST_RANGE: std::ops::Range<i64> = 0..4_102_444_800;

    const SCHEDULES: [&str; 9] = [
        "@hourly",
        "@daily",
        "@weekly",
        "@monthly",
        "@yearly",
        "30 2 * * 1-5",
        "*/15 * * * *",
        "0 0 29 2 *",
        "5 4 * * sun",
    ];

    #[test]
    fn parses_nicknames_and_expressions() {
        for text in SCHEDULES {
            assert_eq!(cron(text).text(), text);
        }
        assert!(cron("@hourly").is_fixed_period());
        assert!(cron("@DAILY").is_fixed_period());
        assert!(cron("@weekly").is_fixed_period());
        assert!(cron(" 0  0 * * * ").is_fixed_period());
        assert!(cron("* * * * *").is_fixed_period());
        assert!(!cron("@monthly").is_fixed_period());
        assert!(!cron("30 2 * * 1-5").is_fixed_period());
        assert_eq!(cron("@daily"), cron("@daily"));
        assert_ne!(cron("@daily"), cron("0 0 * * *"));
        assert_eq!(cron("@annually").next_tick_after(timestamp("2024-03-01")), timestamp("2025-01-01"));
    }

    #[test]
    fn rejects_bad_expressions_saying_what_was_expected() {
        for text in ["", "@reboot", "0 0 * *", "0 0 0 * * *", "61 * * * *", "x y z w v", "@every 5m"] {
            let error = Cron::parse(text).unwrap_err();
            let message = error.to_string();
            assert!(
                message.starts_with(&format!(
                    "expected @hourly, @daily, @weekly, @monthly or a five-field cron expression, found {text:?}: "
                )),
                "{message}"
            );
            assert!(!message.ends_with('.'), "{message}");
        }
        let message = |text: &str| Cron::parse(text).unwrap_err().to_string();
        assert_eq!(
            message("0 0 * *"),
            "expected @hourly, @daily, @weekly, @monthly or a five-field cron expression, \
             found \"0 0 * *\": it has 4 fields"
        );
        assert_eq!(
            message("@reboot"),
            "expected @hourly, @daily, @weekly, @monthly or a five-field cron expression, \
             found \"@reboot\": @reboot is not one of @hourly, @daily, @midnight, @weekly, \
             @monthly, @yearly, @annually"
        );
        assert!(message("61 * * * *").ends_with(": component error: Number out of bounds"));
        assert_eq!(Cron::parse("0 0 30 2 *"), Err(CronError::NeverFires { text: "0 0 30 2 *".to_string() }));
    }

    #[test]
    fn ticks_of_known_schedules() {
        let weekly = cron("@weekly");
        // 2024-01-07 was a Sunday.
        assert_eq!(weekly.tick_at_or_after(timestamp("2024-01-03 12:00:00")), timestamp("2024-01-07"));
        assert_eq!(weekly.tick_at_or_before(timestamp("2024-01-07")), timestamp("2024-01-07"));
        assert_eq!(weekly.next_tick_after(timestamp("2024-01-07")), timestamp("2024-01-14"));
        let monthly = cron("@monthly");
        assert_eq!(monthly.next_tick_after(timestamp("2024-01-31 23:59:59")), timestamp("2024-02-01"));
        assert_eq!(monthly.tick_at_or_before(timestamp("2024-03-15")), timestamp("2024-03-01"));
        let weekdays = cron("30 2 * * 1-5");
        // 2024-01-05 is a Friday; the next weekday is Monday 2024-01-08.
        assert_eq!(weekdays.next_tick_after(timestamp("2024-01-05 02:30:00")), timestamp("2024-01-08 02:30:00"));
        let daily = cron("@daily");
        assert_eq!(daily.tick_at_or_before(Timestamp(-1)), Timestamp(-86_400));
        assert!(daily.is_tick(timestamp("2024-01-01")));
        assert!(!daily.is_tick(timestamp("2024-01-01 00:00:01")));
        assert_eq!(daily.next_tick_after(Timestamp::MAX), Timestamp::MAX);
        assert_eq!(daily.tick_at_or_before(Timestamp::MIN), Timestamp::MIN);
    }

    #[test]
    fn intervals_run_between_consecutive_ticks_up_to_the_end() {
        let daily = cron("@daily");
        let days: Vec<Interval> =
            daily.intervals(timestamp("2024-01-01 05:00:00"), timestamp("2024-01-04 12:00:00")).collect();
        assert_eq!(
            days,
            vec![
                Interval::new(timestamp("2024-01-02"), timestamp("2024-01-03")),
                Interval::new(timestamp("2024-01-03"), timestamp("2024-01-04")),
            ]
        );
        assert_eq!(daily.intervals(timestamp("2024-01-01"), timestamp("2024-01-01 23:00:00")).count(), 0);
        assert_eq!(daily.intervals(Timestamp(i64::MAX - 10), Timestamp::MAX).count(), 0);
    }

    #[test]
    fn missing_intervals_skip_recorded_ones() {
        let hourly = cron("@hourly");
        let hour = |n: i64| Timestamp(n * 3_600);
        let recorded = IntervalSet::from_intervals([
            Interval::new(hour(0), hour(3)),
            Interval::new(hour(5), hour(6)),
            Interval::new(Timestamp(6 * 3_600 + 60), hour(8)),
        ]);
        let missing = missing_intervals(&hourly, hour(0), hour(9), &recorded);
        assert_eq!(
            missing,
            vec![
                Interval::new(hour(3), hour(4)),
                Interval::new(hour(4), hour(5)),
                Interval::new(hour(6), hour(7)),
                Interval::new(hour(8), hour(9)),
            ]
        );
    }

    #[test]
    fn missing_intervals_against_a_million_recorded_hours() {
        let hourly = cron("@hourly");
        let mut recorded = IntervalSet::new();
        let mut fragmented = IntervalSet::new();
        for hour in 0..1_000_000_i64 {
            let interval = Interval::new(Timestamp(hour * 3_600), Timestamp((hour + 1) * 3_600));
            recorded.insert(interval);
            if hour % 2 == 0 {
                fragmented.insert(interval);
            }
        }
        let start = Timestamp(990_000 * 3_600);
        let end = Timestamp(1_000_005 * 3_600);
        let missing = missing_intervals(&hourly, start, end, &recorded);
        let missing_from_fragmented = missing_intervals(&hourly, start, end, &fragmented);
        assert_eq!(missing.len(), 5);
        assert_eq!(missing_from_fragmented.len(), 5_000 + 5);
    }

    #[test]
    fn batches_widen_by_lookback_and_split_by_size() {
        let daily = cron("@daily");
        let day = |n: i64| Timestamp(n * 86_400);
        let missing: Vec<Interval> = [3, 4, 5, 9, 10].iter().map(|n| Interval::new(day(*n), day(n + 1))).collect();
        let batch =
            |start, end, interval_count| Batch { interval: Interval::new(day(start), day(end)), interval_count };
        assert_eq!(batch_intervals(&daily, &missing, None, 0, day(0)), vec![batch(3, 6, 3), batch(9, 11, 2)]);
        assert_eq!(
            batch_intervals(&daily, &missing, Some(2), 0, day(0)),
            vec![batch(3, 5, 2), batch(5, 6, 1), batch(9, 11, 2)]
        );
        // A lookback of 2 widens the second run to day 7, which does not touch day 6.
        assert_eq!(batch_intervals(&daily, &missing, None, 2, day(2)), vec![batch(2, 6, 4), batch(7, 11, 4)]);
        // A lookback of 3 makes the runs touch, so they merge.
        assert_eq!(batch_intervals(&daily, &missing, None, 3, day(0)), vec![batch(0, 11, 11)]);
        assert_eq!(
            batch_intervals(&daily, &missing, Some(5), 3, day(0)),
            vec![batch(0, 5, 5), batch(5, 10, 5), batch(10, 11, 1)]
        );
        assert_eq!(batch_intervals(&daily, &[], Some(5), 3, day(0)), vec![]);
    }

    /// Every tick from `from` while it is before `until`, by repeated `next_tick_after`.
    fn ticks(cron: &Cron, from: Timestamp, until: Timestamp) -> Vec<Timestamp> {
        let mut all = Vec::new();
        let mut tick = cron.tick_at_or_after(from);
        while tick < until {
            all.push(tick);
            tick = cron.next_tick_after(tick);
        }
        all
    }

    fn schedule_strategy() -> impl Strategy<Value = &'static str> {
        prop::sample::select(SCHEDULES.to_vec())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn ticks_are_consistent(text in schedule_strategy(), seconds in TEST_RANGE) {
            let cron = cron(text);
            let t = Timestamp(seconds);
            let next = cron.next_tick_after(t);
            let at_or_after = cron.tick_at_or_after(t);
            let at_or_before = cron.tick_at_or_before(t);
            prop_assert!(next > t);
            prop_assert!(cron.is_tick(next));
            prop_assert!(at_or_after >= t && cron.is_tick(at_or_after));
            prop_assert!(at_or_before <= t && cron.is_tick(at_or_before));
            prop_assert!(t < cron.next_tick_after(at_or_before));
            prop_assert_eq!(cron.is_tick(t), at_or_after == t);
            prop_assert_eq!(cron.is_tick(t), at_or_before == t);
            prop_assert_eq!(next, cron.tick_at_or_after(Timestamp(seconds + 1)));
            // No tick lies strictly between `t` and `next`.
            prop_assert_eq!(cron.tick_at_or_before(Timestamp(next.0 - 1)), at_or_before);
        }

        #[test]
        fn fast_paths_agree_with_croner(
            text in prop::sample::select(vec![
                "@hourly", "@daily", "@weekly", "0 * * * *", "0 0 * * *", "* * * * *",
                "0 0 * * 7", "0 0 * * SUN",
            ]),
            seconds in TEST_RANGE,
        ) {
            let fast = cron(text);
            prop_assert!(fast.is_fixed_period());
            let slow = croner_only(text);
            prop_assert!(!slow.is_fixed_period());
            let t = Timestamp(seconds);
            prop_assert_eq!(fast.next_tick_after(t), slow.next_tick_after(t));
            prop_assert_eq!(fast.tick_at_or_after(t), slow.tick_at_or_after(t));
            prop_assert_eq!(fast.tick_at_or_before(t), slow.tick_at_or_before(t));
            prop_assert_eq!(fast.is_tick(t), slow.is_tick(t));
            let aligned = fast.tick_at_or_before(t);
            prop_assert!(slow.is_tick(aligned));
            prop_assert!(slow.is_tick(fast.next_tick_after(t)));
        }

        #[test]
        fn intervals_are_consecutive_ticks(
            text in schedule_strategy(),
            start in TEST_RANGE,
            length in 0_i64..40 * 86_400,
        ) {
            let cron = cron(text);
            let (start, end) = (Timestamp(start), Timestamp(start + length));
            let intervals: Vec<Interval> = cron.intervals(start, end).collect();
            let expected_ticks = ticks(&cron, start, Timestamp(end.0 + 1));
            let expected: Vec<Interval> = expected_ticks
                .windows(2)
                .map(|pair| Interval::new(pair[0], pair[1]))
                .collect();
            prop_assert_eq!(&intervals, &expected);
            for interval in &intervals {
                prop_assert!(cron.is_tick(interval.start) && cron.is_tick(interval.end));
                prop_assert!(interval.start >= start && interval.end <= end);
            }
        }

        #[test]
        fn missing_and_recorded_partition_the_cron_intervals(
            text in prop::sample::select(vec!["@hourly", "*/15 * * * *", "30 2 * * 1-5", "@daily"]),
            recorded_pieces in prop::collection::vec((0_i64..600, 1_i64..80, 0_i64..2), 0..25),
            window_start in 0_i64..60,
            window_length in 0_i64..700,
        ) {
            let cron = cron(text);
            // Work in units of a quarter of the cron's typical period so that pieces sometimes
            // align with ticks and sometimes do not.
            let unit = match text {
                "@hourly" => 900,
                "*/15 * * * *" => 300,
                _ => 21_600,
            };
            let base = 1_704_067_200_i64;
            let recorded = IntervalSet::from_intervals(recorded_pieces.iter().map(
                |(start, length, misalign)| Interval::new(
                    Timestamp(base + start * unit + misalign * 7),
                    Timestamp(base + (start + length) * unit),
                ),
            ));
            let start = Timestamp(base + window_start * unit);
            let end = Timestamp(base + (window_start + window_length) * unit);
            let missing = missing_intervals(&cron, start, end, &recorded);
            let all: Vec<Interval> = cron.intervals(start, end).collect();
            let expected: Vec<Interval> =
                all.iter().copied().filter(|interval| !recorded.covers(*interval)).collect();
            prop_assert_eq!(&missing, &expected);
            for interval in &all {
                prop_assert!(missing.contains(interval) != recorded.covers(*interval));
            }
        }

        #[test]
        fn batches_cover_exactly_the_widened_missing_intervals(
            text in prop::sample::select(vec!["@hourly", "@daily", "30 2 * * 1-5", "*/15 * * * *"]),
            missing_flags in prop::collection::vec(any::<bool>(), 0..80),
            batch_size in prop::option::of(1_u32..6),
            lookback in 0_u32..5,
            earliest_index in 0_usize..20,
        ) {
            let cron = cron(text);
            let window_start = cron.tick_at_or_after(timestamp("2024-01-01 00:00:01"));
            let all: Vec<Interval> = cron
                .intervals(window_start, Timestamp(i64::MAX))
                .take(missing_flags.len().max(earliest_index + 1))
                .collect();
            let earliest_start = all[earliest_index].start;
            let missing: Vec<Interval> = missing_flags
                .iter()
                .enumerate()
                .filter(|(_, flag)| **flag)
                .map(|(index, _)| all[index])
                .collect();
            let batches = batch_intervals(&cron, &missing, batch_size, lookback, earliest_start);

            // The naive model: each missing interval k pulls in the `lookback` intervals before
            // it, but not before the earliest start (unless k itself is earlier).
            let mut needed = vec![false; all.len()];
            for (index, flag) in missing_flags.iter().enumerate() {
                if *flag {
                    let lowest = if index <= earliest_index {
                        index
                    } else {
                        index.saturating_sub(lookback as usize).max(earliest_index)
                    };
                    for slot in &mut needed[lowest..=index] {
                        *slot = true;
                    }
                }
            }
            let mut covered = vec![false; all.len()];
            for batch in &batches {
                let Batch { interval: span, interval_count } = *batch;
                prop_assert!(cron.is_tick(span.start) && cron.is_tick(span.end));
                let inside: Vec<usize> = (0..all.len())
                    .filter(|index| all[*index].start >= span.start && all[*index].end <= span.end)
                    .collect();
                prop_assert_eq!(inside.len(), interval_count as usize);
                prop_assert!(interval_count >= 1);
                if let Some(size) = batch_size {
                    prop_assert!(interval_count <= size);
                }
                for index in inside {
                    prop_assert!(!covered[index], "batches overlap at {}", index);
                    covered[index] = true;
                }
            }
            prop_assert_eq!(&covered, &needed);
            for pair in batches.windows(2) {
                prop_assert!(pair[0].interval.end <= pair[1].interval.start);
                if pair[0].interval.end == pair[1].interval.start {
                    // Touching batches only come from cutting a run at the batch size.
                    prop_assert_eq!(Some(pair[0].interval_count), batch_size);
                }
            }
        }
    }
}
