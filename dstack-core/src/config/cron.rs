//! Cron expressions, as `schedule.cron` takes them: five fields (minute, hour, day of month,
//! month, day of week), read in UTC.
//!
//! Each field is a comma-separated list of items; an item is `*`, a value or a range
//! `low-high`, optionally followed by a step `/n` (`*/15`, `1-31/2`; `5/15` is `5-max/15`).
//! Months may be written `jan`…`dec` and days of the week `sun`…`sat` (any case); day of the
//! week `0` and `7` are both Sunday. As in standard cron, when both the day of month and the
//! day of week are restricted, a day matches if *either* does (`0 0 1 * mon`: the 1st and every
//! Monday); when one of them allows every value, only the other one counts. A field is
//! unrestricted when it allows every value of its range (`*`, `*/1`, `0-6` for days of the
//! week). Nicknames (`@daily`), seconds and the `L`, `W`, `#` and `?` extensions are not
//! accepted, nor is an expression that can never fire (`0 0 30 2 *`).
//!
//! ```
//! use dstack_core::config::cron::{utc_text, Cron};
//!
//! let cron: Cron = "30 8 * * mon-fri".parse().unwrap();
//! // Saturday 2026-12-05 12:00 UTC → Monday 08:30.
//! let next = cron.next_after(1_796_472_000_000).unwrap();
//! assert_eq!(utc_text(next), "2026-12-07 08:30 UTC");
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use super::de::{Cx, Decode, Path};
use super::error::ErrorCode;
use super::yaml::Node;

const MINUTE_MS: u64 = 60_000;
const DAY_MINUTES: u64 = 1440;
/// Days searched for the next match: a whole Gregorian cycle, so any expression that can
/// fire at all is found.
const CYCLE_DAYS: u64 = 146_097;

/// One of the five fields of a cron expression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// Minute of the hour, 0–59.
    Minute,
    /// Hour of the day, 0–23.
    Hour,
    /// Day of the month, 1–31.
    DayOfMonth,
    /// Month, 1–12 or `jan`–`dec`.
    Month,
    /// Day of the week, 0–7 (0 and 7 are Sunday) or `sun`–`sat`.
    DayOfWeek,
}

impl Field {
    const ALL: [Field; 5] = [
        Field::Minute,
        Field::Hour,
        Field::DayOfMonth,
        Field::Month,
        Field::DayOfWeek,
    ];

    /// The lowest and highest value written in this field.
    fn bounds(self) -> (u32, u32) {
        match self {
            Field::Minute => (0, 59),
            Field::Hour => (0, 23),
            Field::DayOfMonth => (1, 31),
            Field::Month => (1, 12),
            Field::DayOfWeek => (0, 7),
        }
    }

    /// The highest value `*` stands for (Sunday is 0, not also 7).
    fn star_max(self) -> u32 {
        match self {
            Field::DayOfWeek => 6,
            other => other.bounds().1,
        }
    }

    /// The names this field accepts, from its lowest value on.
    fn names(self) -> &'static [&'static str] {
        match self {
            Field::Month => &[
                "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
            ],
            Field::DayOfWeek => &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
            _ => &[],
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day of month",
            Field::Month => "month",
            Field::DayOfWeek => "day of week",
        })
    }
}

/// Why a cron expression was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    /// Not five fields.
    #[error("expected five fields (minute hour day-of-month month day-of-week), found {0}")]
    FieldCount(usize),
    /// A field that is not a list of `*`, values, ranges and steps.
    #[error("{field} field `{text}`: expected *, a value, a range a-b or a step /n, or a comma-separated list of them")]
    Syntax {
        /// The field.
        field: Field,
        /// The part that could not be read.
        text: String,
    },
    /// A value outside its field's range.
    #[error("{field} field: {value} is out of range {min}-{max}")]
    OutOfRange {
        /// The field.
        field: Field,
        /// The value as written.
        value: String,
        /// The lowest allowed value.
        min: u32,
        /// The highest allowed value.
        max: u32,
    },
    /// A range whose low end is above its high end.
    #[error("{field} field: range {low}-{high} ends below its start")]
    Inverted {
        /// The field.
        field: Field,
        /// The low end as written.
        low: String,
        /// The high end as written.
        high: String,
    },
    /// A step of zero.
    #[error("{field} field: a step must be at least 1")]
    ZeroStep {
        /// The field.
        field: Field,
    },
    /// Days of the month that no allowed month has (`30 2`: February 30th).
    #[error("never fires: none of its days of the month exists in its months")]
    Never,
}

impl CronError {
    /// The configuration error code this error is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            CronError::OutOfRange { .. } | CronError::Inverted { .. } => ErrorCode::OutOfRange,
            _ => ErrorCode::InvalidValue,
        }
    }
}

/// A parsed cron expression: the set of values each field allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    /// The expression as written.
    text: String,
    /// Bit `m`: minute `m`.
    minutes: u64,
    /// Bit `h`: hour `h`.
    hours: u32,
    /// Bit `d`: day of month `d` (1–31).
    days: u32,
    /// Bit `m`: month `m` (1–12).
    months: u16,
    /// Bit `w`: day of week `w` (0–6, Sunday 0).
    weekdays: u8,
}

const ALL_DAYS: u32 = 0xFFFF_FFFE;
const ALL_WEEKDAYS: u8 = 0x7F;

impl Cron {
    /// Parses a five-field expression.
    pub fn parse(text: &str) -> Result<Cron, CronError> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != Field::ALL.len() {
            return Err(CronError::FieldCount(fields.len()));
        }
        let mut sets = [0u64; 5];
        for ((set, field), written) in sets.iter_mut().zip(Field::ALL).zip(&fields) {
            *set = parse_field(field, written)?;
        }
        // Sunday written as 7 is Sunday.
        let weekdays = (sets[4] & 0x7F) | ((sets[4] >> 7) & 1);
        let cron = Cron {
            text: text.to_string(),
            minutes: sets[0],
            hours: sets[1] as u32,
            days: sets[2] as u32,
            months: sets[3] as u16,
            weekdays: weekdays as u8,
        };
        if !cron.can_fire() {
            return Err(CronError::Never);
        }
        Ok(cron)
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first minute strictly after `after_ms` (Unix ms) that the expression matches, in
    /// UTC, as Unix ms; `None` past the range of dates this computes (year 9999 and later).
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        let first = after_ms / MINUTE_MS + 1;
        let first_day = first / DAY_MINUTES;
        for day in first_day..first_day + CYCLE_DAYS {
            let date = civil(day);
            if date.0 > 9999 {
                return None;
            }
            // The first day from the first minute after `after_ms`, the others from midnight.
            let from = if day == first_day {
                (first % DAY_MINUTES) as u32
            } else {
                0
            };
            if self.day_matches(date, weekday(day)) {
                if let Some(minute) = self.first_minute_from(from) {
                    return Some((day * DAY_MINUTES + u64::from(minute)) * MINUTE_MS);
                }
            }
        }
        None
    }

    /// Whether the date `(year, month, day)`, a `weekday`, is one the expression fires on.
    fn day_matches(&self, (_, month, day): (u64, u32, u32), weekday: u32) -> bool {
        if self.months & (1 << month) == 0 {
            return false;
        }
        let by_day = self.days & (1 << day) != 0;
        let by_weekday = self.weekdays & (1 << weekday) != 0;
        match (self.days == ALL_DAYS, self.weekdays == ALL_WEEKDAYS) {
            (false, false) => by_day || by_weekday,
            (true, _) => by_weekday,
            (false, true) => by_day,
        }
    }

    /// The first minute of the day, at or after minute `from`, that the expression matches.
    fn first_minute_from(&self, from: u32) -> Option<u32> {
        let (hour, minute) = (from / 60, from % 60);
        for h in hour..24 {
            if self.hours & (1 << h) == 0 {
                continue;
            }
            let start = if h == hour { minute } else { 0 };
            let left = self.minutes >> start << start;
            if left != 0 {
                return Some(h * 60 + left.trailing_zeros());
            }
        }
        None
    }

    /// Whether some date matches: any day of the week occurs in every month, so only an
    /// expression restricted by day of month alone can miss (February 30th).
    fn can_fire(&self) -> bool {
        if self.weekdays != ALL_WEEKDAYS {
            return true;
        }
        (1..=12u32).any(|month| {
            self.months & (1 << month) != 0
                && (1..=days_in_month(month, true)).any(|d| self.days & (1 << d) != 0)
        })
    }
}

impl FromStr for Cron {
    type Err = CronError;

    fn from_str(s: &str) -> Result<Cron, CronError> {
        Cron::parse(s)
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Serialized as written.
impl Serialize for Cron {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl Decode for Cron {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let text = String::decode(node, cx, path)?;
        match Cron::parse(&text) {
            Ok(cron) => Some(cron),
            Err(e) => {
                cx.error(
                    node.mark,
                    path,
                    e.code(),
                    format!("invalid cron expression '{text}': {e}"),
                );
                None
            }
        }
    }
}

/// The set of values one field allows, as bits.
fn parse_field(field: Field, written: &str) -> Result<u64, CronError> {
    let mut set = 0u64;
    for item in written.split(',') {
        set |= parse_item(field, item)?;
    }
    Ok(set)
}

fn parse_item(field: Field, item: &str) -> Result<u64, CronError> {
    let syntax = || CronError::Syntax {
        field,
        text: item.to_string(),
    };
    let (base, step) = match item.split_once('/') {
        Some((base, step)) => {
            if step.is_empty() || !step.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            let step: u32 = step.parse().unwrap_or(u32::MAX);
            if step == 0 {
                return Err(CronError::ZeroStep { field });
            }
            (base, Some(step))
        }
        None => (item, None),
    };
    let (low, high) = if base == "*" {
        (field.bounds().0, field.star_max())
    } else if let Some((low, high)) = base.split_once('-') {
        let (l, h) = (value(field, low)?, value(field, high)?);
        if l > h {
            return Err(CronError::Inverted {
                field,
                low: low.to_string(),
                high: high.to_string(),
            });
        }
        (l, h)
    } else {
        let v = value(field, base)?;
        // `5/15` runs from 5 to the end of the range.
        (v, if step.is_some() { field.star_max() } else { v })
    };
    let step = step.unwrap_or(1) as usize;
    Ok((low..=high).step_by(step).fold(0, |set, v| set | (1 << v)))
}

/// One value of `field`: a number within its bounds or one of its names.
fn value(field: Field, text: &str) -> Result<u32, CronError> {
    let (min, max) = field.bounds();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u32>() {
            Ok(v) if (min..=max).contains(&v) => Ok(v),
            _ => Err(CronError::OutOfRange {
                field,
                value: text.to_string(),
                min,
                max,
            }),
        };
    }
    field
        .names()
        .iter()
        .position(|n| n.eq_ignore_ascii_case(text))
        .map(|i| min + i as u32)
        .ok_or_else(|| CronError::Syntax {
            field,
            text: text.to_string(),
        })
}

fn days_in_month(month: u32, leap: bool) -> u32 {
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The date `(year, month, day)` of a day counted from 1970-01-01 (proleptic Gregorian).
fn civil(days: u64) -> (u64, u32, u32) {
    // Days since 0000-03-01, so that a year's leap day is its last day.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The day of the week (Sunday 0) of a day counted from 1970-01-01, a Thursday.
fn weekday(days: u64) -> u32 {
    ((days + 4) % 7) as u32
}

/// `YYYY-MM-DD HH:MM UTC` for a time in Unix ms.
pub fn utc_text(ms: u64) -> String {
    let minutes = ms / MINUTE_MS;
    let (year, month, day) = civil(minutes / DAY_MINUTES);
    let minute = minutes % DAY_MINUTES;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        minute / 60,
        minute % 60
    )
}

/// The first time strictly after `after_ms` that any of `crons` fires (Unix ms).
pub fn next_of(crons: &[Cron], after_ms: u64) -> Option<u64> {
    crons.iter().filter_map(|c| c.next_after(after_ms)).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `year` is a Gregorian leap year.
    fn is_leap(year: u64) -> bool {
        year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
    }

    /// Unix ms of a UTC date and time, the inverse of `civil` (tests only).
    fn at(text: &str) -> u64 {
        // "YYYY-MM-DD HH:MM"
        let n = |r: std::ops::Range<usize>| text[r].parse::<u64>().unwrap();
        let (y, mo, d, h, mi) = (
            n(0..4),
            n(5..7) as u32,
            n(8..10) as u32,
            n(11..13),
            n(14..16),
        );
        let mut days = 0u64;
        for year in 1970..y {
            days += if is_leap(year) { 366 } else { 365 };
        }
        for month in 1..mo {
            days += u64::from(days_in_month(month, is_leap(y)));
        }
        days += u64::from(d - 1);
        ((days * DAY_MINUTES) + h * 60 + mi) * MINUTE_MS
    }

    fn next(cron: &str, after: &str) -> String {
        let cron = Cron::parse(cron).unwrap();
        utc_text(cron.next_after(at(after)).unwrap())
    }

    #[test]
    fn dates_round_trip_through_the_civil_calendar() {
        for text in [
            "1970-01-01 00:00",
            "2000-02-29 23:59",
            "2024-02-29 12:00",
            "2100-03-01 00:00",
            "2026-12-31 23:59",
        ] {
            assert_eq!(utc_text(at(text)), format!("{text} UTC"));
        }
        // 1970-01-01 was a Thursday; 2026-12-07 is a Monday.
        assert_eq!(weekday(0), 4);
        assert_eq!(weekday(at("2026-12-07 00:00") / MINUTE_MS / DAY_MINUTES), 1);
    }

    #[test]
    fn next_times_follow_the_fields() {
        let vectors = [
            // Every minute: the next minute, strictly after.
            ("* * * * *", "2026-12-07 10:15", "2026-12-07 10:16"),
            ("15 23 * * *", "2026-12-07 23:15", "2026-12-08 23:15"),
            ("15 23 * * *", "2026-12-07 23:14", "2026-12-07 23:15"),
            ("*/15 * * * *", "2026-12-07 10:46", "2026-12-07 11:00"),
            ("5/15 * * * *", "2026-12-07 10:51", "2026-12-07 11:05"),
            ("0 9-17/4 * * *", "2026-12-07 13:00", "2026-12-07 17:00"),
            ("0 9-17/4 * * *", "2026-12-07 17:00", "2026-12-08 09:00"),
            ("0,30 8,20 * * *", "2026-12-07 08:30", "2026-12-07 20:00"),
            // Month ends and years.
            ("0 0 31 * *", "2026-04-01 00:00", "2026-05-31 00:00"),
            ("0 0 1 * *", "2026-12-31 23:59", "2027-01-01 00:00"),
            ("59 23 31 12 *", "2026-12-31 23:59", "2027-12-31 23:59"),
            // February 29th: only in leap years; 2100 is not one.
            ("0 12 29 2 *", "2024-03-01 00:00", "2028-02-29 12:00"),
            ("0 12 29 2 *", "2096-03-01 00:00", "2104-02-29 12:00"),
            // Names, any case.
            ("0 6 * JAN,jul mon", "2026-12-07 10:00", "2027-01-04 06:00"),
            ("30 8 * * mon-fri", "2026-12-05 12:00", "2026-12-07 08:30"),
            // Sunday is 0 and 7.
            ("0 0 * * 0", "2026-12-07 00:00", "2026-12-13 00:00"),
            ("0 0 * * 7", "2026-12-07 00:00", "2026-12-13 00:00"),
            ("0 0 * * 5-7", "2026-12-07 00:00", "2026-12-11 00:00"),
            // Day of month and day of week both restricted: either matches.
            ("0 0 13 * fri", "2026-12-07 00:00", "2026-12-11 00:00"),
            ("0 0 8 * fri", "2026-12-07 00:00", "2026-12-08 00:00"),
            // Only one restricted: only that one counts.
            ("0 0 * * fri", "2026-12-07 00:00", "2026-12-11 00:00"),
            ("0 0 13 * *", "2026-12-07 00:00", "2026-12-13 00:00"),
            ("0 0 13 * */1", "2026-12-07 00:00", "2026-12-13 00:00"),
            ("0 0 */1 * fri", "2026-12-07 00:00", "2026-12-11 00:00"),
        ];
        for (cron, after, want) in vectors {
            assert_eq!(
                next(cron, after),
                format!("{want} UTC"),
                "{cron} after {after}"
            );
        }
    }

    #[test]
    fn the_next_time_is_strictly_after_even_within_a_minute() {
        let cron = Cron::parse("* * * * *").unwrap();
        let t = at("2026-12-07 10:15");
        assert_eq!(cron.next_after(t), Some(t + MINUTE_MS));
        assert_eq!(cron.next_after(t + 59_999), Some(t + MINUTE_MS));
    }

    #[test]
    fn the_earliest_of_several_crons_is_next() {
        let crons: Vec<Cron> = ["0 20 * * *", "0 8 * * *", "0 12 * * sun"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let after = at("2026-12-07 09:00");
        assert_eq!(
            utc_text(next_of(&crons, after).unwrap()),
            "2026-12-07 20:00 UTC"
        );
        let after = at("2026-12-07 21:00");
        assert_eq!(
            utc_text(next_of(&crons, after).unwrap()),
            "2026-12-08 08:00 UTC"
        );
        assert_eq!(next_of(&[], after), None);
    }

    #[test]
    fn bad_expressions_are_refused_with_their_reason() {
        let cases: &[(&str, CronError)] = &[
            ("* * * *", CronError::FieldCount(4)),
            ("0 0 * * * *", CronError::FieldCount(6)),
            ("@daily", CronError::FieldCount(1)),
            (
                "60 * * * *",
                CronError::OutOfRange {
                    field: Field::Minute,
                    value: "60".into(),
                    min: 0,
                    max: 59,
                },
            ),
            (
                "0 24 * * *",
                CronError::OutOfRange {
                    field: Field::Hour,
                    value: "24".into(),
                    min: 0,
                    max: 23,
                },
            ),
            (
                "0 0 0 * *",
                CronError::OutOfRange {
                    field: Field::DayOfMonth,
                    value: "0".into(),
                    min: 1,
                    max: 31,
                },
            ),
            (
                "0 0 * 13 *",
                CronError::OutOfRange {
                    field: Field::Month,
                    value: "13".into(),
                    min: 1,
                    max: 12,
                },
            ),
            (
                "0 0 * * 8",
                CronError::OutOfRange {
                    field: Field::DayOfWeek,
                    value: "8".into(),
                    min: 0,
                    max: 7,
                },
            ),
            (
                "0 0 * * 99999999999",
                CronError::OutOfRange {
                    field: Field::DayOfWeek,
                    value: "99999999999".into(),
                    min: 0,
                    max: 7,
                },
            ),
            (
                "30-10 * * * *",
                CronError::Inverted {
                    field: Field::Minute,
                    low: "30".into(),
                    high: "10".into(),
                },
            ),
            (
                "*/0 * * * *",
                CronError::ZeroStep {
                    field: Field::Minute,
                },
            ),
            (
                "*/x * * * *",
                CronError::Syntax {
                    field: Field::Minute,
                    text: "*/x".into(),
                },
            ),
            (
                "1,,2 * * * *",
                CronError::Syntax {
                    field: Field::Minute,
                    text: "".into(),
                },
            ),
            (
                "0 0 * mon *",
                CronError::Syntax {
                    field: Field::Month,
                    text: "mon".into(),
                },
            ),
            (
                "0 0 L * *",
                CronError::Syntax {
                    field: Field::DayOfMonth,
                    text: "L".into(),
                },
            ),
            (
                "0 0 * * 5#2",
                CronError::Syntax {
                    field: Field::DayOfWeek,
                    text: "5#2".into(),
                },
            ),
            (
                "0 0 ? * *",
                CronError::Syntax {
                    field: Field::DayOfMonth,
                    text: "?".into(),
                },
            ),
            ("0 0 30 2 *", CronError::Never),
            ("0 0 31 4,6,9,11 *", CronError::Never),
        ];
        for (text, want) in cases {
            assert_eq!(Cron::parse(text).as_ref(), Err(want), "{text}");
        }
        // A day of week makes any day of month possible again (either matches).
        assert!(Cron::parse("0 0 30 2 mon").is_ok());
        assert_eq!(
            Cron::parse("60 * * * *").unwrap_err().to_string(),
            "minute field: 60 is out of range 0-59"
        );
    }
}
