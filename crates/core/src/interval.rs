//! UTC timestamps, half-open intervals, compacted interval sets and SQLMesh time macro rendering.
//!
//! Everything here is in UTC and in whole seconds since the Unix epoch. The calendar arithmetic
//! is done by hand (proleptic Gregorian, days-from-civil) so that formatting and parsing are
//! total functions that never panic and never allocate more than the returned string.

use std::fmt;

const SECONDS_PER_MINUTE: i64 = 60;
const SECONDS_PER_HOUR: i64 = 3_600;
const SECONDS_PER_DAY: i64 = 86_400;
const MICROSECONDS_PER_SECOND: u32 = 1_000_000;

/// Why a text could not be read as a [`Timestamp`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimeParseError {
    #[error("expected a date like 2024-01-01 or a timestamp like 2024-01-01 00:00:00, found {text:?}")]
    UnrecognisedFormat { text: String },
    #[error("expected a real calendar date and time of day, found {text:?}")]
    NotACalendarDateTime { text: String },
    #[error("expected an epoch in milliseconds that fits in a 64-bit integer, found {text:?}")]
    EpochMillisecondsOutOfRange { text: String },
}

/// Seconds since the Unix epoch, UTC.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Timestamp(pub i64);

/// Whether `format` is a strftime format (every `%` directive known): what `time_column (col,
/// 'FORMAT')` may give.
pub fn is_time_format(format: &str) -> bool {
    use chrono::format::{Item, StrftimeItems};
    StrftimeItems::new(format).all(|item| !matches!(item, Item::Error))
}

impl Timestamp {
    /// The time written in a strftime `format` (`%Y%m%d`: `20240101`), `micros` microseconds
    /// after it: how a text or numeric time column with a format holds it.
    pub fn formatted(&self, format: &str, micros: u32) -> String {
        chrono::DateTime::from_timestamp(self.0, micros * 1_000)
            .map(|time| time.format(format).to_string())
            .unwrap_or_default()
    }

    /// The earliest representable timestamp; also used as "no such time" by cron searches.
    pub const MIN: Timestamp = Timestamp(i64::MIN);
    /// The latest representable timestamp; also used as "no such time" by cron searches.
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    /// Reads a timestamp the way SQLMesh accepts them on the command line and in model files.
    ///
    /// Accepted forms (surrounding whitespace is ignored):
    /// - `2024-01-01` (midnight UTC)
    /// - `2024-01-01 05:00`, `2024-01-01 05:00:00`, `2024-01-01T05:00:00`, with optional
    ///   fractional seconds (truncated to the whole second)
    /// - any of the timestamp forms followed by `Z` or an offset like `+05:30`, `-0800` or `+01`
    ///   (converted to UTC)
    /// - `20240101` (eight digits, like SQLMesh's `%Y%m%d`)
    /// - an epoch in milliseconds of ten or more digits (floored to the whole second)
    pub fn parse(text: &str) -> Result<Timestamp, TimeParseError> {
        let trimmed = text.trim();
        let bytes = trimmed.as_bytes();
        if !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit) {
            return parse_all_digit_timestamp(text, bytes);
        }
        let unrecognised = || TimeParseError::UnrecognisedFormat { text: text.to_string() };
        let not_a_calendar_date_time = || TimeParseError::NotACalendarDateTime { text: text.to_string() };

        let mut cursor = ByteCursor { bytes, position: 0 };
        let year = cursor.fixed_digits(4).ok_or_else(unrecognised)?;
        cursor.literal(b'-').ok_or_else(unrecognised)?;
        let month = cursor.fixed_digits(2).ok_or_else(unrecognised)?;
        cursor.literal(b'-').ok_or_else(unrecognised)?;
        let day = cursor.fixed_digits(2).ok_or_else(unrecognised)?;
        if !is_calendar_date(year, month, day) {
            return Err(not_a_calendar_date_time());
        }
        let days = days_from_civil(year, month, day);
        if cursor.is_at_end() {
            return Ok(Timestamp(days * SECONDS_PER_DAY));
        }

        match cursor.next_byte() {
            Some(b' ' | b'T' | b't') => {}
            _ => return Err(unrecognised()),
        }
        let hour = cursor.fixed_digits(2).ok_or_else(unrecognised)?;
        cursor.literal(b':').ok_or_else(unrecognised)?;
        let minute = cursor.fixed_digits(2).ok_or_else(unrecognised)?;
        let mut second = 0;
        if cursor.peek() == Some(b':') {
            cursor.literal(b':').ok_or_else(unrecognised)?;
            second = cursor.fixed_digits(2).ok_or_else(unrecognised)?;
            if cursor.peek() == Some(b'.') {
                cursor.literal(b'.').ok_or_else(unrecognised)?;
                let fraction_digit_count = cursor.skip_digits();
                if fraction_digit_count == 0 {
                    return Err(unrecognised());
                }
            }
        }
        if hour > 23 || minute > 59 || second > 59 {
            return Err(not_a_calendar_date_time());
        }

        let offset_seconds = match cursor.next_byte() {
            None => 0,
            Some(b'Z' | b'z') => 0,
            Some(sign @ (b'+' | b'-')) => {
                let offset_hours = cursor.fixed_digits(2).ok_or_else(unrecognised)?;
                let offset_minutes = if cursor.is_at_end() {
                    0
                } else {
                    if cursor.peek() == Some(b':') {
                        cursor.literal(b':').ok_or_else(unrecognised)?;
                    }
                    cursor.fixed_digits(2).ok_or_else(unrecognised)?
                };
                if offset_hours > 23 || offset_minutes > 59 {
                    return Err(not_a_calendar_date_time());
                }
                let magnitude = offset_hours * SECONDS_PER_HOUR + offset_minutes * SECONDS_PER_MINUTE;
                if sign == b'-' { -magnitude } else { magnitude }
            }
            Some(_) => return Err(unrecognised()),
        };
        if !cursor.is_at_end() {
            return Err(unrecognised());
        }

        let local_seconds = days * SECONDS_PER_DAY + hour * SECONDS_PER_HOUR + minute * SECONDS_PER_MINUTE + second;
        Ok(Timestamp(local_seconds - offset_seconds))
    }

    /// Reads an `end` boundary as SQLMesh does: a date without a time of day ends with that
    /// day (`2024-01-31` is exclusive `2024-02-01`); with a time it is the exclusive end itself.
    pub fn parse_end(text: &str) -> Result<Timestamp, TimeParseError> {
        let parsed = Timestamp::parse(text)?;
        let trimmed = text.trim();
        let date_only = trimmed.len() == 10 || (trimmed.len() == 8 && trimmed.bytes().all(|b| b.is_ascii_digit()));
        Ok(if date_only { Timestamp(parsed.0 + SECONDS_PER_DAY) } else { parsed })
    }

    /// The UTC calendar date, like `2024-01-01`.
    pub fn date_string(&self) -> String {
        let mut text = String::with_capacity(10);
        // Writing into a String cannot fail.
        let _ = write_date(&mut text, &CivilDateTime::from_epoch_seconds(self.0));
        text
    }
}

impl fmt::Display for Timestamp {
    /// Formats like `2024-01-01 00:00:00` (UTC).
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_date_time(formatter, &CivilDateTime::from_epoch_seconds(self.0), 0)
    }
}

/// Reads the all-digit forms: eight digits as `%Y%m%d`, ten or more as epoch milliseconds.
fn parse_all_digit_timestamp(text: &str, digits: &[u8]) -> Result<Timestamp, TimeParseError> {
    if digits.len() == 8 {
        let mut cursor = ByteCursor { bytes: digits, position: 0 };
        let parts = (cursor.fixed_digits(4), cursor.fixed_digits(2), cursor.fixed_digits(2));
        if let (Some(year), Some(month), Some(day)) = parts
            && is_calendar_date(year, month, day)
        {
            return Ok(Timestamp(days_from_civil(year, month, day) * SECONDS_PER_DAY));
        }
        return Err(TimeParseError::NotACalendarDateTime { text: text.to_string() });
    }
    if digits.len() < 10 {
        return Err(TimeParseError::UnrecognisedFormat { text: text.to_string() });
    }
    let mut epoch_milliseconds: i64 = 0;
    for digit in digits {
        epoch_milliseconds = epoch_milliseconds
            .checked_mul(10)
            .and_then(|value| value.checked_add(i64::from(digit - b'0')))
            .ok_or_else(|| TimeParseError::EpochMillisecondsOutOfRange { text: text.to_string() })?;
    }
    Ok(Timestamp(epoch_milliseconds.div_euclid(1000)))
}

/// A tiny forward-only reader over ASCII bytes.
struct ByteCursor<'text> {
    bytes: &'text [u8],
    position: usize,
}

impl ByteCursor<'_> {
    fn is_at_end(&self) -> bool {
        self.position >= self.bytes.len()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    fn next_byte(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.position += 1;
        Some(byte)
    }

    fn literal(&mut self, expected: u8) -> Option<()> {
        if self.peek()? == expected {
            self.position += 1;
            Some(())
        } else {
            None
        }
    }

    /// Reads exactly `count` ASCII digits as a number.
    fn fixed_digits(&mut self, count: usize) -> Option<i64> {
        let mut value: i64 = 0;
        for _ in 0..count {
            let byte = self.peek()?;
            if !byte.is_ascii_digit() {
                return None;
            }
            value = value * 10 + i64::from(byte - b'0');
            self.position += 1;
        }
        Some(value)
    }

    /// Skips any run of ASCII digits and returns how many there were.
    fn skip_digits(&mut self) -> usize {
        let start = self.position;
        while self.peek().is_some_and(|byte| byte.is_ascii_digit()) {
            self.position += 1;
        }
        self.position - start
    }
}

fn is_leap_year(year: i64) -> bool {
    year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 0,
    }
}

fn is_calendar_date(year: i64, month: i64, day: i64) -> bool {
    (1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year_from_march = if month <= 2 { year - 1 } else { year };
    let era = year_from_march.div_euclid(400);
    let year_of_era = year_from_march.rem_euclid(400);
    let month_from_march = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// A UTC wall clock reading split into calendar parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CivilDateTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl CivilDateTime {
    /// Splits epoch seconds into calendar parts (Howard Hinnant's `civil_from_days`).
    fn from_epoch_seconds(epoch_seconds: i64) -> CivilDateTime {
        let days = epoch_seconds.div_euclid(SECONDS_PER_DAY);
        let second_of_day = epoch_seconds.rem_euclid(SECONDS_PER_DAY);
        // `days` is at most i64::MAX / 86400, so adding the shift cannot overflow.
        let shifted_days = days + 719_468;
        let era = shifted_days.div_euclid(146_097);
        let day_of_era = shifted_days.rem_euclid(146_097);
        let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let month_from_march = (5 * day_of_year + 2) / 153;
        let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
        let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        // Every narrowed value below is bounded by the arithmetic above (day <= 31,
        // month <= 12, second_of_day < 86400), so the casts are lossless.
        CivilDateTime {
            year,
            month: month as u32,
            day: day as u32,
            hour: (second_of_day / SECONDS_PER_HOUR) as u32,
            minute: (second_of_day % SECONDS_PER_HOUR / SECONDS_PER_MINUTE) as u32,
            second: (second_of_day % SECONDS_PER_MINUTE) as u32,
        }
    }
}

/// Puts two ASCII digits of `value` (< 100) at `buffer[at..at + 2]`.
fn put_two_digits(buffer: &mut [u8], at: usize, value: u32) {
    if let Some(slot) = buffer.get_mut(at..at + 2) {
        slot[0] = b'0' + (value / 10 % 10) as u8;
        slot[1] = b'0' + (value % 10) as u8;
    }
}

/// Writes `2024-01-01`.
fn write_date<W: fmt::Write>(out: &mut W, civil: &CivilDateTime) -> fmt::Result {
    if !(0..=9999).contains(&civil.year) {
        return write!(out, "{:04}-{:02}-{:02}", civil.year, civil.month, civil.day);
    }
    let mut buffer = *b"0000-00-00";
    let year = civil.year as u32; // checked to be in 0..=9999 above
    put_two_digits(&mut buffer, 0, year / 100);
    put_two_digits(&mut buffer, 2, year % 100);
    put_two_digits(&mut buffer, 5, civil.month);
    put_two_digits(&mut buffer, 8, civil.day);
    out.write_str(std::str::from_utf8(&buffer).map_err(|_| fmt::Error)?)
}

/// Writes `2024-01-01 05:00:00`, followed by `.ffffff` when `microseconds` is not zero.
fn write_date_time<W: fmt::Write>(out: &mut W, civil: &CivilDateTime, microseconds: u32) -> fmt::Result {
    write_date(out, civil)?;
    let mut buffer = *b" 00:00:00.000000";
    put_two_digits(&mut buffer, 1, civil.hour);
    put_two_digits(&mut buffer, 4, civil.minute);
    put_two_digits(&mut buffer, 7, civil.second);
    let length = if microseconds == 0 {
        9
    } else {
        let microseconds = microseconds % MICROSECONDS_PER_SECOND;
        put_two_digits(&mut buffer, 10, microseconds / 10_000);
        put_two_digits(&mut buffer, 12, microseconds / 100 % 100);
        put_two_digits(&mut buffer, 14, microseconds % 100);
        buffer.len()
    };
    let text = buffer.get(..length).ok_or(fmt::Error)?;
    out.write_str(std::str::from_utf8(text).map_err(|_| fmt::Error)?)
}

/// A half-open time range `[start, end)`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Interval {
    pub start: Timestamp,
    pub end: Timestamp,
}

impl Interval {
    /// `[start, end)`; `start` must be before `end`.
    pub fn new(start: Timestamp, end: Timestamp) -> Interval {
        debug_assert!(start < end, "an interval must start before it ends: [{start}, {end})");
        Interval { start, end }
    }

    /// Whether the interval holds no time at all (`start >= end`).
    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    /// Length in seconds (zero for an empty interval).
    pub fn duration_seconds(&self) -> i64 {
        if self.is_empty() { 0 } else { self.end.0.saturating_sub(self.start.0) }
    }
}

impl fmt::Display for Interval {
    /// Formats like `[2024-01-01 00:00:00, 2024-01-02 00:00:00)`.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "[{}, {})", self.start, self.end)
    }
}

/// A compacted set of time: sorted, disjoint, non-adjacent half-open ranges.
///
/// Touching ranges are merged, so a million consecutive hourly intervals are stored as one
/// range. Serialised as the plain list of its ranges; deserialising compacts whatever list it
/// is given.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "Vec<Interval>", into = "Vec<Interval>")]
pub struct IntervalSet {
    ranges: Vec<Interval>,
}

impl IntervalSet {
    pub fn new() -> IntervalSet {
        IntervalSet { ranges: Vec::new() }
    }

    /// Builds a compacted set from intervals in any order; empty intervals are ignored.
    pub fn from_intervals(intervals: impl IntoIterator<Item = Interval>) -> IntervalSet {
        let mut unsorted: Vec<Interval> = intervals.into_iter().filter(|interval| !interval.is_empty()).collect();
        unsorted.sort_unstable();
        let mut ranges: Vec<Interval> = Vec::with_capacity(unsorted.len().min(16));
        for interval in unsorted {
            match ranges.last_mut() {
                Some(last) if interval.start <= last.end => {
                    last.end = last.end.max(interval.end);
                }
                _ => ranges.push(interval),
            }
        }
        IntervalSet { ranges }
    }

    /// Adds an interval, merging it with every range it overlaps or touches.
    ///
    /// Empty intervals are ignored. Appending at or after the last range is O(1); inserting
    /// elsewhere costs a binary search plus moving the ranges after it.
    pub fn insert(&mut self, interval: Interval) {
        if interval.is_empty() {
            return;
        }
        match self.ranges.last_mut() {
            None => {
                self.ranges.push(interval);
                return;
            }
            Some(last) if interval.start > last.end => {
                self.ranges.push(interval);
                return;
            }
            Some(last) if interval.start >= last.start => {
                last.end = last.end.max(interval.end);
                return;
            }
            Some(_) => {}
        }
        // First range that overlaps or touches the new interval, or comes after it.
        let first_touching = self.ranges.partition_point(|range| range.end < interval.start);
        // One past the last range that overlaps or touches the new interval.
        let past_last_touching = self.ranges.partition_point(|range| range.start <= interval.end);
        if first_touching >= past_last_touching {
            self.ranges.insert(first_touching, interval);
            return;
        }
        let merged_start =
            self.ranges.get(first_touching).map_or(interval.start, |range| range.start.min(interval.start));
        let merged_end =
            self.ranges.get(past_last_touching - 1).map_or(interval.end, |range| range.end.max(interval.end));
        if let Some(slot) = self.ranges.get_mut(first_touching) {
            *slot = Interval { start: merged_start, end: merged_end };
        }
        self.ranges.drain(first_touching + 1..past_last_touching);
    }

    /// Takes `interval` out of the set: ranges it covers go, ranges it cuts keep what lies
    /// outside it. Empty intervals remove nothing.
    pub fn remove(&mut self, interval: Interval) {
        if interval.is_empty() {
            return;
        }
        // The ranges that overlap the interval (touching is not overlapping for half-open ranges).
        let first = self.ranges.partition_point(|range| range.end <= interval.start);
        let past_last = self.ranges.partition_point(|range| range.start < interval.end);
        if first >= past_last {
            return;
        }
        let mut kept = Vec::with_capacity(2);
        if self.ranges[first].start < interval.start {
            kept.push(Interval { start: self.ranges[first].start, end: interval.start });
        }
        if self.ranges[past_last - 1].end > interval.end {
            kept.push(Interval { start: interval.end, end: self.ranges[past_last - 1].end });
        }
        self.ranges.splice(first..past_last, kept);
    }

    /// Whether every instant of `interval` is in the set (always true for an empty interval).
    pub fn covers(&self, interval: Interval) -> bool {
        if interval.is_empty() {
            return true;
        }
        let candidate = self.ranges.partition_point(|range| range.end <= interval.start);
        self.ranges.get(candidate).is_some_and(|range| range.start <= interval.start && interval.end <= range.end)
    }

    /// The compacted ranges: sorted, disjoint and non-adjacent.
    pub fn ranges(&self) -> &[Interval] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Total number of seconds in the set (saturating).
    pub fn total_seconds(&self) -> i64 {
        self.ranges.iter().fold(0_i64, |total, range| total.saturating_add(range.duration_seconds()))
    }
}

impl From<Vec<Interval>> for IntervalSet {
    fn from(intervals: Vec<Interval>) -> IntervalSet {
        IntervalSet::from_intervals(intervals)
    }
}

impl From<IntervalSet> for Vec<Interval> {
    fn from(set: IntervalSet) -> Vec<Interval> {
        set.ranges
    }
}

impl FromIterator<Interval> for IntervalSet {
    fn from_iter<I: IntoIterator<Item = Interval>>(intervals: I) -> IntervalSet {
        IntervalSet::from_intervals(intervals)
    }
}

/// Which instant a SQLMesh time macro reads: `@start_*`, `@end_*` or `@execution_*`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum TimeMacroPrefix {
    /// The interval's start.
    Start,
    /// The interval's end minus one microsecond (an inclusive end).
    End,
    /// The plan's execution time.
    Execution,
}

impl TimeMacroPrefix {
    pub const ALL: [TimeMacroPrefix; 3] = [TimeMacroPrefix::Start, TimeMacroPrefix::End, TimeMacroPrefix::Execution];

    /// The prefix as written in a macro name, like `start`.
    pub fn name(self) -> &'static str {
        match self {
            TimeMacroPrefix::Start => "start",
            TimeMacroPrefix::End => "end",
            TimeMacroPrefix::Execution => "execution",
        }
    }
}

/// How a SQLMesh time macro renders its instant: `@*_dt`, `@*_ds`, `@*_epoch` and so on.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum TimeMacroSuffix {
    /// `CAST('2024-01-01 00:00:00+00:00' AS TIMESTAMPTZ)`
    Dt,
    /// `CAST('2024-01-01 00:00:00' AS TIMESTAMP)`
    Dtntz,
    /// `CAST('2024-01-01' AS DATE)`
    Date,
    /// `'2024-01-01'`
    Ds,
    /// `'2024-01-01 00:00:00'`
    Ts,
    /// `'2024-01-01 00:00:00+00:00'`
    Tstz,
    /// Whole seconds since the epoch, floored.
    Epoch,
    /// Whole milliseconds since the epoch, floored.
    Millis,
    /// Hour of the day, 0 to 23.
    Hour,
}

impl TimeMacroSuffix {
    pub const ALL: [TimeMacroSuffix; 9] = [
        TimeMacroSuffix::Dt,
        TimeMacroSuffix::Dtntz,
        TimeMacroSuffix::Date,
        TimeMacroSuffix::Ds,
        TimeMacroSuffix::Ts,
        TimeMacroSuffix::Tstz,
        TimeMacroSuffix::Epoch,
        TimeMacroSuffix::Millis,
        TimeMacroSuffix::Hour,
    ];

    /// The suffix as written in a macro name, like `ds`.
    pub fn name(self) -> &'static str {
        match self {
            TimeMacroSuffix::Dt => "dt",
            TimeMacroSuffix::Dtntz => "dtntz",
            TimeMacroSuffix::Date => "date",
            TimeMacroSuffix::Ds => "ds",
            TimeMacroSuffix::Ts => "ts",
            TimeMacroSuffix::Tstz => "tstz",
            TimeMacroSuffix::Epoch => "epoch",
            TimeMacroSuffix::Millis => "millis",
            TimeMacroSuffix::Hour => "hour",
        }
    }
}

/// Full macro names, indexed by prefix then suffix, in the order of the `ALL` arrays.
const TIME_MACRO_NAMES: [[&str; 9]; 3] = [
    [
        "start_dt",
        "start_dtntz",
        "start_date",
        "start_ds",
        "start_ts",
        "start_tstz",
        "start_epoch",
        "start_millis",
        "start_hour",
    ],
    ["end_dt", "end_dtntz", "end_date", "end_ds", "end_ts", "end_tstz", "end_epoch", "end_millis", "end_hour"],
    [
        "execution_dt",
        "execution_dtntz",
        "execution_date",
        "execution_ds",
        "execution_ts",
        "execution_tstz",
        "execution_epoch",
        "execution_millis",
        "execution_hour",
    ],
];

/// One SQLMesh time macro, like `@start_ds`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct TimeMacro {
    pub prefix: TimeMacroPrefix,
    pub suffix: TimeMacroSuffix,
}

impl TimeMacro {
    /// Every time macro, prefix-major.
    pub const ALL: [TimeMacro; 27] = {
        let mut all = [TimeMacro { prefix: TimeMacroPrefix::Start, suffix: TimeMacroSuffix::Dt }; 27];
        let mut prefix_index = 0;
        while prefix_index < 3 {
            let mut suffix_index = 0;
            while suffix_index < 9 {
                all[prefix_index * 9 + suffix_index] = TimeMacro {
                    prefix: TimeMacroPrefix::ALL[prefix_index],
                    suffix: TimeMacroSuffix::ALL[suffix_index],
                };
                suffix_index += 1;
            }
            prefix_index += 1;
        }
        all
    };

    /// Recognises a macro name without the `@`, case-insensitively: `start_ds`, `END_TS`.
    pub fn from_name(name: &str) -> Option<TimeMacro> {
        let (prefix_text, suffix_text) = name.split_once('_')?;
        let prefix = TimeMacroPrefix::ALL.into_iter().find(|prefix| prefix.name().eq_ignore_ascii_case(prefix_text))?;
        let suffix = TimeMacroSuffix::ALL.into_iter().find(|suffix| suffix.name().eq_ignore_ascii_case(suffix_text))?;
        Some(TimeMacro { prefix, suffix })
    }

    /// The lowercase name without the `@`, like `start_ds`.
    pub fn name(self) -> &'static str {
        // The enums' discriminants are exactly the indexes of their `ALL` arrays.
        TIME_MACRO_NAMES[self.prefix as usize][self.suffix as usize]
    }
}

impl fmt::Display for TimeMacro {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// Renders a time macro as the SQL literal SQLMesh would substitute.
///
/// `start` reads `interval.start`, `end` reads `interval.end` minus one microsecond and
/// `execution` reads `execution_time`; see [`TimeMacroSuffix`] for the shapes.
pub fn render_time_macro(time_macro: TimeMacro, interval: Interval, execution_time: Timestamp) -> String {
    let mut rendered = String::with_capacity(48);
    // Writing into a String cannot fail.
    let _ = write_time_macro(&mut rendered, time_macro, interval, execution_time);
    rendered
}

/// Like [`render_time_macro`], appending to any writer (reuse one buffer to avoid allocating).
pub fn write_time_macro<W: fmt::Write>(
    out: &mut W,
    time_macro: TimeMacro,
    interval: Interval,
    execution_time: Timestamp,
) -> fmt::Result {
    // (whole seconds, microseconds within the second)
    let (epoch_seconds, microseconds) = match time_macro.prefix {
        TimeMacroPrefix::Start => (interval.start.0, 0),
        TimeMacroPrefix::End => (interval.end.0.saturating_sub(1), MICROSECONDS_PER_SECOND - 1),
        TimeMacroPrefix::Execution => (execution_time.0, 0),
    };
    let civil = CivilDateTime::from_epoch_seconds(epoch_seconds);
    match time_macro.suffix {
        TimeMacroSuffix::Dt => {
            out.write_str("CAST('")?;
            write_date_time(out, &civil, microseconds)?;
            out.write_str("+00:00' AS TIMESTAMPTZ)")
        }
        TimeMacroSuffix::Dtntz => {
            out.write_str("CAST('")?;
            write_date_time(out, &civil, microseconds)?;
            out.write_str("' AS TIMESTAMP)")
        }
        TimeMacroSuffix::Date => {
            out.write_str("CAST('")?;
            write_date(out, &civil)?;
            out.write_str("' AS DATE)")
        }
        TimeMacroSuffix::Ds => {
            out.write_char('\'')?;
            write_date(out, &civil)?;
            out.write_char('\'')
        }
        TimeMacroSuffix::Ts => {
            out.write_char('\'')?;
            write_date_time(out, &civil, microseconds)?;
            out.write_char('\'')
        }
        TimeMacroSuffix::Tstz => {
            out.write_char('\'')?;
            write_date_time(out, &civil, microseconds)?;
            out.write_str("+00:00'")
        }
        TimeMacroSuffix::Epoch => write!(out, "{epoch_seconds}"),
        TimeMacroSuffix::Millis => {
            let epoch_milliseconds = i128::from(epoch_seconds) * 1000 + i128::from(microseconds / 1000);
            write!(out, "{epoch_milliseconds}")
        }
        TimeMacroSuffix::Hour => write!(out, "{}", civil.hour),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn timestamp(text: &str) -> Timestamp {
        Timestamp::parse(text).unwrap()
    }

    fn interval(start: i64, end: i64) -> Interval {
        Interval::new(Timestamp(start), Timestamp(end))
    }

    #[test]
    fn removing_cuts_and_drops_ranges() {
        let mut set = IntervalSet::from_intervals([interval(0, 10), interval(20, 30), interval(40, 50)]);
        set.remove(interval(5, 25));
        assert_eq!(set.ranges(), &[interval(0, 5), interval(25, 30), interval(40, 50)]);
        set.remove(interval(30, 40));
        assert_eq!(set.ranges(), &[interval(0, 5), interval(25, 30), interval(40, 50)]);
        set.remove(interval(42, 44));
        assert_eq!(set.ranges(), &[interval(0, 5), interval(25, 30), interval(40, 42), interval(44, 50)]);
        set.remove(interval(-1, 100));
        assert!(set.is_empty());
    }

    proptest! {
        #[test]
        fn removing_leaves_exactly_the_instants_outside(
            ranges in proptest::collection::vec((0_i64..60, 1_i64..10), 0..8),
            cut in (0_i64..70, 0_i64..20),
        ) {
            let mut set = IntervalSet::from_intervals(ranges.iter().map(|(start, length)| interval(*start, start + length)));
            let before = set.clone();
            let cut = Interval { start: Timestamp(cut.0), end: Timestamp(cut.0 + cut.1) };
            set.remove(cut);
            for instant in -1..80 {
                let unit = interval(instant, instant + 1);
                let expected = before.covers(unit) && !(cut.start.0 <= instant && instant < cut.end.0);
                prop_assert_eq!(set.covers(unit), expected, "instant {}", instant);
            }
            prop_assert_eq!(&IntervalSet::from_intervals(set.ranges().to_vec()), &set);
        }
    }

    #[test]
    fn parses_dates_and_timestamps() {
        let cases: &[(&str, i64)] = &[
            ("1970-01-01", 0),
            ("2024-01-01", 1_704_067_200),
            ("  2024-01-01  ", 1_704_067_200),
            ("2024-01-01 05:00:00", 1_704_085_200),
            ("2024-01-01T05:00:00", 1_704_085_200),
            ("2024-01-01t05:00:00", 1_704_085_200),
            ("2024-01-01 05:00", 1_704_085_200),
            ("2024-01-01 05:00:00Z", 1_704_085_200),
            ("2024-01-01T05:00:00z", 1_704_085_200),
            ("2024-01-01 05:00:00+00:00", 1_704_085_200),
            ("2024-01-01 05:00:00-00:00", 1_704_085_200),
            ("2024-01-01 07:30:00+02:30", 1_704_085_200),
            ("2024-01-01T00:00:00-05:00", 1_704_085_200),
            ("2024-01-01T00:00:00-0500", 1_704_085_200),
            ("2024-01-01T00:00:00-05", 1_704_085_200),
            ("2024-01-01 05:00:00.999999", 1_704_085_200),
            ("2024-01-01 05:00:00.5+00:00", 1_704_085_200),
            ("2024-02-29", 1_709_164_800),
            ("2000-02-29 23:59:59", 951_868_799),
            ("1969-12-31 23:59:59", -1),
            ("1900-01-01", -2_208_988_800),
            ("20240101", 1_704_067_200),
            ("1704067200000", 1_704_067_200),
            ("1704067200999", 1_704_067_200),
            ("0000000001", 0),
        ];
        for (text, expected) in cases {
            assert_eq!(Timestamp::parse(text), Ok(Timestamp(*expected)), "parsing {text:?}");
        }
    }

    #[test]
    fn rejects_malformed_timestamps_saying_what_was_expected() {
        let unrecognised = [
            "",
            "x",
            "2024",
            "2024-1-01",
            "2024-01-01 5:00",
            "2024-01-01 05",
            "2024-01-01 05:00:00.",
            "2024-01-01 05:00:00 UTC",
            "2024-01-01 05:00:00+5",
            "2024-01-01 05:00:00+05:00:00",
            "2024/01/01",
            "yesterday",
            "123",
            "-1704067200000",
        ];
        for text in unrecognised {
            assert_eq!(
                Timestamp::parse(text),
                Err(TimeParseError::UnrecognisedFormat { text: text.to_string() }),
                "parsing {text:?}"
            );
        }
        let not_calendar = [
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-04-31",
            "2024-01-01 24:00:00",
            "2024-01-01 23:60:00",
            "2024-01-01 23:59:60",
            "2024-01-01 00:00:00+24:00",
            "20241301",
        ];
        for text in not_calendar {
            assert_eq!(
                Timestamp::parse(text),
                Err(TimeParseError::NotACalendarDateTime { text: text.to_string() }),
                "parsing {text:?}"
            );
        }
        assert!(matches!(
            Timestamp::parse("99999999999999999999999"),
            Err(TimeParseError::EpochMillisecondsOutOfRange { .. })
        ));
        assert_eq!(
            Timestamp::parse("x").unwrap_err().to_string(),
            "expected a date like 2024-01-01 or a timestamp like 2024-01-01 00:00:00, found \"x\""
        );
    }

    #[test]
    fn displays_utc_timestamps_and_intervals() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01 00:00:00");
        assert_eq!(Timestamp(1_704_085_200).to_string(), "2024-01-01 05:00:00");
        assert_eq!(Timestamp(-1).to_string(), "1969-12-31 23:59:59");
        assert_eq!(Timestamp(1_709_164_800).date_string(), "2024-02-29");
        assert_eq!(interval(1_704_067_200, 1_704_153_600).to_string(), "[2024-01-01 00:00:00, 2024-01-02 00:00:00)");
        // Far outside four-digit years the output is still well-formed, just longer.
        assert_eq!(timestamp("0001-01-01").date_string(), "0001-01-01");
        assert!(Timestamp::MAX.to_string().starts_with("292277026596-12-04"));
        assert!(!Timestamp::MIN.to_string().is_empty());
    }

    #[test]
    fn renders_every_time_macro() {
        let day = Interval::new(timestamp("2024-01-01"), timestamp("2024-01-02"));
        let execution = timestamp("2024-01-02 03:04:05");
        let cases: &[(&str, &str)] = &[
            ("start_dt", "CAST('2024-01-01 00:00:00+00:00' AS TIMESTAMPTZ)"),
            ("start_dtntz", "CAST('2024-01-01 00:00:00' AS TIMESTAMP)"),
            ("start_date", "CAST('2024-01-01' AS DATE)"),
            ("start_ds", "'2024-01-01'"),
            ("start_ts", "'2024-01-01 00:00:00'"),
            ("start_tstz", "'2024-01-01 00:00:00+00:00'"),
            ("start_epoch", "1704067200"),
            ("start_millis", "1704067200000"),
            ("start_hour", "0"),
            ("end_dt", "CAST('2024-01-01 23:59:59.999999+00:00' AS TIMESTAMPTZ)"),
            ("end_dtntz", "CAST('2024-01-01 23:59:59.999999' AS TIMESTAMP)"),
            ("end_date", "CAST('2024-01-01' AS DATE)"),
            ("end_ds", "'2024-01-01'"),
            ("end_ts", "'2024-01-01 23:59:59.999999'"),
            ("end_tstz", "'2024-01-01 23:59:59.999999+00:00'"),
            ("end_epoch", "1704153599"),
            ("end_millis", "1704153599999"),
            ("end_hour", "23"),
            ("execution_dt", "CAST('2024-01-02 03:04:05+00:00' AS TIMESTAMPTZ)"),
            ("execution_dtntz", "CAST('2024-01-02 03:04:05' AS TIMESTAMP)"),
            ("execution_date", "CAST('2024-01-02' AS DATE)"),
            ("execution_ds", "'2024-01-02'"),
            ("execution_ts", "'2024-01-02 03:04:05'"),
            ("execution_tstz", "'2024-01-02 03:04:05+00:00'"),
            ("execution_epoch", "1704164645"),
            ("execution_millis", "1704164645000"),
            ("execution_hour", "3"),
        ];
        assert_eq!(cases.len(), TimeMacro::ALL.len());
        for (name, expected) in cases {
            let time_macro = TimeMacro::from_name(name).unwrap();
            assert_eq!(time_macro.name(), *name);
            assert_eq!(render_time_macro(time_macro, day, execution), *expected, "rendering @{name}");
        }
        for time_macro in TimeMacro::ALL {
            assert!(cases.iter().any(|(name, _)| *name == time_macro.name()));
        }
    }

    #[test]
    fn renders_the_epoch_day_end_as_the_spec_says() {
        let first_day = interval(0, 86_400);
        let end =
            |suffix| render_time_macro(TimeMacro { prefix: TimeMacroPrefix::End, suffix }, first_day, Timestamp(0));
        assert_eq!(end(TimeMacroSuffix::Epoch), "86399");
        assert_eq!(end(TimeMacroSuffix::Millis), "86399999");
        assert_eq!(end(TimeMacroSuffix::Hour), "23");
        // Before the epoch the epoch values floor rather than truncate.
        let day_before = interval(-86_400, 0);
        let before =
            |suffix| render_time_macro(TimeMacro { prefix: TimeMacroPrefix::End, suffix }, day_before, Timestamp(0));
        assert_eq!(before(TimeMacroSuffix::Epoch), "-1");
        assert_eq!(before(TimeMacroSuffix::Millis), "-1");
        assert_eq!(before(TimeMacroSuffix::Ts), "'1969-12-31 23:59:59.999999'");
    }

    #[test]
    fn time_macro_names_are_case_insensitive_and_strict() {
        assert_eq!(
            TimeMacro::from_name("START_DS"),
            Some(TimeMacro { prefix: TimeMacroPrefix::Start, suffix: TimeMacroSuffix::Ds })
        );
        assert_eq!(
            TimeMacro::from_name("Execution_Millis"),
            Some(TimeMacro { prefix: TimeMacroPrefix::Execution, suffix: TimeMacroSuffix::Millis })
        );
        for name in ["start", "start_", "_ds", "@start_ds", "start_ds_x", "latest_ds", "startds"] {
            assert_eq!(TimeMacro::from_name(name), None, "{name:?}");
        }
    }

    #[test]
    fn interval_set_merges_touching_and_overlapping_ranges() {
        let mut set = IntervalSet::new();
        assert!(set.is_empty());
        set.insert(interval(10, 20));
        set.insert(interval(30, 40));
        set.insert(interval(20, 25));
        assert_eq!(set.ranges(), &[interval(10, 25), interval(30, 40)]);
        set.insert(interval(0, 5));
        set.insert(interval(5, 10));
        assert_eq!(set.ranges(), &[interval(0, 25), interval(30, 40)]);
        set.insert(interval(24, 31));
        assert_eq!(set.ranges(), &[interval(0, 40)]);
        set.insert(Interval { start: Timestamp(50), end: Timestamp(50) });
        assert_eq!(set.ranges(), &[interval(0, 40)]);
        assert_eq!(set.total_seconds(), 40);
        assert!(set.covers(interval(0, 40)));
        assert!(!set.covers(interval(0, 41)));
        assert_eq!(IntervalSet::from_intervals([interval(30, 40), interval(0, 30)]), set);
    }

    #[test]
    fn interval_set_serialises_as_a_plain_compacted_list() {
        let set = IntervalSet::from_intervals([interval(0, 10), interval(10, 20), interval(30, 40)]);
        let json = serde_json_like(&set);
        assert_eq!(json, vec![interval(0, 20), interval(30, 40)]);
    }

    /// Round-trips through the serde `into`/`from` conversions without a format crate.
    fn serde_json_like(set: &IntervalSet) -> Vec<Interval> {
        let list: Vec<Interval> = set.clone().into();
        let back: IntervalSet = list.clone().into();
        assert_eq!(&back, set);
        list
    }

    #[test]
    fn a_million_hourly_inserts_compact() {
        let mut set = IntervalSet::new();
        for hour in 0..1_000_000_i64 {
            set.insert(interval(hour * 3_600, (hour + 1) * 3_600));
        }
        assert_eq!(set.ranges().len(), 1);
        // Every other hour: 500,000 ranges, still appended in O(1) each.
        let mut fragmented = IntervalSet::new();
        for hour in (0..1_000_000_i64).step_by(2) {
            fragmented.insert(interval(hour * 3_600, (hour + 1) * 3_600));
        }
        assert_eq!(fragmented.ranges().len(), 500_000);
        assert!(fragmented.covers(interval(3_600 * 1_000, 3_600 * 1_001)));
        assert!(!fragmented.covers(interval(3_600 * 1_001, 3_600 * 1_002)));
    }

    /// Checks the invariants: every range non-empty, sorted, disjoint and non-adjacent.
    fn assert_compacted(set: &IntervalSet) {
        for range in set.ranges() {
            assert!(range.start < range.end, "empty range {range:?}");
        }
        for pair in set.ranges().windows(2) {
            assert!(pair[0].end < pair[1].start, "ranges not separated: {pair:?}");
        }
    }

    proptest! {
        #[test]
        fn interval_set_matches_a_naive_bitmap(
            inserts in prop::collection::vec((0_i64..200, 1_i64..30), 0..60),
            queries in prop::collection::vec((0_i64..230, 0_i64..40), 0..40),
        ) {
            let mut set = IntervalSet::new();
            let mut naive = [false; 256];
            for (start, length) in &inserts {
                set.insert(interval(*start, start + length));
                for second in *start..start + length {
                    naive[second as usize] = true;
                }
                assert_compacted(&set);
            }
            prop_assert_eq!(
                &set,
                &IntervalSet::from_intervals(inserts.iter().map(|(s, l)| interval(*s, s + l)))
            );
            prop_assert_eq!(set.total_seconds(), naive.iter().filter(|b| **b).count() as i64);
            for (start, length) in queries {
                let query = Interval { start: Timestamp(start), end: Timestamp(start + length) };
                let naive_covers = (start..start + length).all(|second| naive[second as usize]);
                prop_assert_eq!(set.covers(query), naive_covers, "query {:?}", query);
            }
        }

        #[test]
        fn display_parses_back(seconds in -62_135_596_800_i64..253_402_300_800) {
            let stamp = Timestamp(seconds);
            prop_assert_eq!(Timestamp::parse(&stamp.to_string()), Ok(stamp));
            let date = Timestamp::parse(&stamp.date_string()).unwrap();
            prop_assert!(date <= stamp && stamp.0 - date.0 < SECONDS_PER_DAY);
        }

        #[test]
        fn civil_arithmetic_round_trips(days in -1_000_000_i64..1_000_000) {
            let civil = CivilDateTime::from_epoch_seconds(days * SECONDS_PER_DAY);
            prop_assert!(is_calendar_date(civil.year, civil.month.into(), civil.day.into()));
            prop_assert_eq!(
                days_from_civil(civil.year, civil.month.into(), civil.day.into()),
                days
            );
        }
    }

    /// SQLMesh 0.236 plans `end '2026-11-25'` on a daily model through 2026-11-25 and
    /// `end '2026-11-29 05:00'` on an hourly one up to 04:59:59 (observed with `sqlmesh plan`).
    #[test]
    fn a_date_only_end_includes_its_day() {
        let day = |text: &str| Timestamp::parse(text).unwrap();
        assert_eq!(Timestamp::parse_end("2026-11-25").unwrap(), day("2026-11-26"));
        assert_eq!(Timestamp::parse_end("20261125").unwrap(), day("2026-11-26"));
        assert_eq!(Timestamp::parse_end("2026-11-29 05:00").unwrap(), day("2026-11-29 05:00"));
        assert!(Timestamp::parse_end("2026-11-31").is_err());
    }
}
