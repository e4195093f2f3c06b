//! Window sizes and window assignment. Pure functions, no I/O.
//!
//! Minute and hour windows are tumbling and aligned to the Unix epoch (UTC).
//! Day windows are the provider's local calendar days in its IANA time zone:
//! a Bogota day starts at 05:00 UTC; days across a DST change last 23 or 25 h.

use super::Millis;
use chrono::{LocalResult, NaiveDate, TimeZone};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::fmt;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// A window size of a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WindowSize {
    /// A fixed length in milliseconds that divides a day, aligned to the Unix epoch.
    Fixed(i64),
    /// The provider's local calendar day.
    LocalDay,
}

impl WindowSize {
    /// Parses `Nm` (minutes), `Nh` (hours) or `1d`; fixed sizes must divide 24 h.
    pub fn parse(s: &str) -> Result<WindowSize, String> {
        let bad = || {
            format!("unknown window size '{s}': expected minutes or hours that divide a day (1m, 5m, 15m, 1h, 6h) or 1d")
        };
        if s == "1d" {
            return Ok(WindowSize::LocalDay);
        }
        let (num, unit) = s.split_at(s.len().saturating_sub(1));
        let n: i64 = num.parse().map_err(|_| bad())?;
        let ms = match unit {
            "m" => n.checked_mul(MINUTE),
            "h" => n.checked_mul(HOUR),
            _ => None,
        }
        .ok_or_else(bad)?;
        if n <= 0 || num.starts_with('0') || DAY % ms != 0 {
            return Err(bad());
        }
        Ok(WindowSize::Fixed(ms))
    }

    /// The label used in exports, keys and the API: `1m`, `15m`, `1h`, `1d`.
    pub fn label(self) -> String {
        match self {
            WindowSize::LocalDay => "1d".to_owned(),
            WindowSize::Fixed(MINUTE) => "1m".to_owned(),
            WindowSize::Fixed(HOUR) => "1h".to_owned(),
            WindowSize::Fixed(ms) if ms % HOUR == 0 => format!("{}h", ms / HOUR),
            WindowSize::Fixed(ms) => format!("{}m", ms / MINUTE),
        }
    }

    /// The longest a window of this size can last (25 h for a local day).
    pub fn max_len(self) -> i64 {
        match self {
            WindowSize::Fixed(ms) => ms,
            WindowSize::LocalDay => DAY + HOUR,
        }
    }
}

impl fmt::Display for WindowSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// A window: `[start, end)` in UTC milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: Millis,
    pub end: Millis,
}

/// Assigns event times to windows. Remembers the last local day per zone so the
/// common case (many events of the same day) costs two comparisons.
#[derive(Default)]
pub struct Assigner {
    last_day: Vec<(Tz, Window)>,
}

impl Assigner {
    pub fn window(&mut self, size: WindowSize, tz: Tz, ts: Millis) -> Window {
        match size {
            WindowSize::Fixed(len) => {
                let start = ts.div_euclid(len) * len;
                Window {
                    start,
                    end: start + len,
                }
            }
            WindowSize::LocalDay => {
                if let Some((_, w)) = self
                    .last_day
                    .iter()
                    .find(|(z, w)| *z == tz && w.start <= ts && ts < w.end)
                {
                    return *w;
                }
                let w = local_day(tz, ts);
                match self.last_day.iter_mut().find(|(z, _)| *z == tz) {
                    Some(slot) => slot.1 = w,
                    None => self.last_day.push((tz, w)),
                }
                w
            }
        }
    }
}

/// The local calendar day of `ts` in `tz`, as UTC instants.
pub fn local_day(tz: Tz, ts: Millis) -> Window {
    let utc = chrono::DateTime::from_timestamp_millis(ts).expect("decoded times are representable");
    let date = utc.with_timezone(&tz).date_naive();
    let start = midnight(tz, date);
    let end = midnight(tz, date.succ_opt().expect("date in range"));
    Window { start, end }
}

/// The first instant of a local date. Where midnight falls in a DST gap (some zones
/// change clocks at 00:00), the day starts at the first local time that exists.
fn midnight(tz: Tz, date: NaiveDate) -> Millis {
    let mut t = date.and_hms_opt(0, 0, 0).expect("midnight exists");
    for _ in 0..(24 * 4) {
        match tz.from_local_datetime(&t) {
            LocalResult::Single(x) => return x.timestamp_millis(),
            LocalResult::Ambiguous(a, b) => return a.timestamp_millis().min(b.timestamp_millis()),
            LocalResult::None => t += chrono::Duration::minutes(15),
        }
    }
    unreachable!("no zone skips a whole day")
}

/// RFC 3339 UTC with `Z` and no fraction, as in exports: `2026-11-22T05:00:00Z`.
pub fn rfc3339(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("window starts are representable")
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Millis {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn bogota_day_starts_at_five_utc() {
        let w = local_day(chrono_tz::America::Bogota, at("2026-11-22T04:59:59Z"));
        assert_eq!(rfc3339(w.start), "2026-11-21T05:00:00Z");
        assert_eq!(rfc3339(w.end), "2026-11-22T05:00:00Z");
    }

    #[test]
    fn dst_days_last_23_and_25_hours() {
        let ny = chrono_tz::America::New_York;
        let spring = local_day(ny, at("2026-03-08T12:00:00Z"));
        assert_eq!(spring.end - spring.start, 23 * HOUR);
        let autumn = local_day(ny, at("2026-11-01T12:00:00Z"));
        assert_eq!(autumn.end - autumn.start, 25 * HOUR);
    }

    #[test]
    fn midnight_in_a_dst_gap_starts_at_first_existing_time() {
        // Chile skips 00:00-01:00 local on 2026-09-06.
        let w = local_day(chrono_tz::America::Santiago, at("2026-09-06T12:00:00Z"));
        assert_eq!(rfc3339(w.start), "2026-09-06T04:00:00Z");
    }

    #[test]
    fn sizes_parse_and_label() {
        assert_eq!(WindowSize::parse("1m").unwrap().label(), "1m");
        assert_eq!(WindowSize::parse("15m").unwrap().label(), "15m");
        assert_eq!(WindowSize::parse("1h").unwrap().label(), "1h");
        assert_eq!(WindowSize::parse("1d").unwrap(), WindowSize::LocalDay);
        for bad in ["7m", "0m", "2d", "1s", "", "h", "05m", "25h"] {
            assert!(WindowSize::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fixed_windows_align_below_zero_too() {
        let mut a = Assigner::default();
        let w = a.window(WindowSize::Fixed(MINUTE), Tz::UTC, -1);
        assert_eq!((w.start, w.end), (-MINUTE, 0));
    }
}
