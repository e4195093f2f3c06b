//! Summarize's plan: the coarsest windows that tile a range. Pure functions.
//!
//! A range `[from, to)` is tiled greedily from the largest window size down: the
//! windows of the largest size that lie wholly inside the range, then the two edges
//! left over are tiled with the next size, and so on. A three-week lookback of a view
//! with 1d, 1h and 1m windows is 20 days in the middle, hours next to them and
//! minutes at the ends. What the smallest size cannot tile (less than a minute at
//! either edge) is left out, and the response says which part was covered.
//!
//! Day windows are the provider's local days. The windows of smaller sizes tile the
//! edges without gaps when their boundaries fall on the larger sizes' boundaries:
//! always for UTC-aligned minutes and hours, and for local days in zones whose offset
//! is a whole number of the smaller size (every zone, for minutes).

use crate::model::window::{local_day, WindowSize};
use crate::model::Millis;
use chrono_tz::Tz;

/// One window of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub size: WindowSize,
    pub start: Millis,
    pub end: Millis,
}

/// The window of `size` that starts at or after `t`.
fn first_at_or_after(size: WindowSize, tz: Tz, t: Millis) -> (Millis, Millis) {
    match size {
        WindowSize::Fixed(len) => {
            let s = t.div_euclid(len) * len;
            let s = if s < t { s + len } else { s };
            (s, s + len)
        }
        WindowSize::LocalDay => {
            let d = local_day(tz, t);
            if d.start >= t {
                (d.start, d.end)
            } else {
                let n = local_day(tz, d.end);
                (n.start, n.end)
            }
        }
    }
}

fn cover(sizes: &[WindowSize], tz: Tz, from: Millis, to: Millis, out: &mut Vec<Tile>) {
    let Some((&size, smaller)) = sizes.split_first() else {
        return;
    };
    if from >= to {
        return;
    }
    let mut tiles = Vec::new();
    let (mut s, mut e) = first_at_or_after(size, tz, from);
    while e <= to {
        tiles.push(Tile {
            size,
            start: s,
            end: e,
        });
        (s, e) = first_at_or_after(size, tz, e);
    }
    match (tiles.first(), tiles.last()) {
        (Some(first), Some(last)) => {
            let (a, b) = (first.start, last.end);
            cover(smaller, tz, from, a, out);
            out.extend(tiles);
            cover(smaller, tz, b, to, out);
        }
        _ => cover(smaller, tz, from, to, out),
    }
}

/// The windows that tile `[from, to)`, in time order; sizes in any order.
pub fn tile(sizes: &[WindowSize], tz: Tz, from: Millis, to: Millis) -> Vec<Tile> {
    let mut sizes = sizes.to_vec();
    sizes.sort_by_key(|s| std::cmp::Reverse(s.max_len()));
    sizes.dedup();
    let mut out = Vec::new();
    cover(&sizes, tz, from, to, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i64 = 60_000;
    const H: i64 = 60 * M;
    const D: i64 = 24 * H;

    fn sizes() -> Vec<WindowSize> {
        ["1m", "1h", "1d"]
            .iter()
            .map(|s| WindowSize::parse(s).unwrap())
            .collect()
    }

    /// The tiles are contiguous and inside the range, and count per size as expected.
    fn check(tiles: &[Tile], from: Millis, to: Millis) -> (Millis, Millis) {
        for w in tiles.windows(2) {
            assert_eq!(w[0].end, w[1].start, "gap or overlap: {w:?}");
        }
        let (a, b) = (tiles[0].start, tiles.last().unwrap().end);
        assert!(from <= a && b <= to);
        (a, b)
    }

    #[test]
    fn three_weeks_of_minutes_hours_days_utc() {
        // 2026-11-01T10:30:20Z to 2026-11-22T07:15:00Z.
        let base = 1_793_491_200_000; // 2026-11-01T00:00:00Z
        let from = base + 10 * H + 30 * M + 20_000;
        let to = base + 21 * D + 7 * H + 15 * M;
        let t = tile(&sizes(), chrono_tz::UTC, from, to);
        let (a, b) = check(&t, from, to);
        assert_eq!((a, b), (base + 10 * H + 31 * M, to));
        let n = |s: &str| {
            let s = WindowSize::parse(s).unwrap();
            t.iter().filter(|x| x.size == s).count()
        };
        // Days 2..=21 whole; hours 11..23 of day 1 and 0..6 of day 22; minutes 31..59
        // of 10:xx and 0..14 of 07:xx.
        assert_eq!((n("1d"), n("1h"), n("1m")), (20, 13 + 7, 29 + 15));
    }

    #[test]
    fn local_days_of_bogota() {
        let tz: Tz = "America/Bogota".parse().unwrap();
        let base = 1_793_491_200_000; // 2026-11-01T00:00:00Z = 2026-10-31T19:00 in Bogota
        let t = tile(&sizes(), tz, base, base + 3 * D);
        check(&t, base, base + 3 * D);
        let days: Vec<_> = t
            .iter()
            .filter(|x| x.size == WindowSize::LocalDay)
            .collect();
        assert_eq!(days.len(), 2);
        assert_eq!(days[0].start, base + 5 * H);
        // Only days: a day-only view covers whole local days and no more.
        let t = tile(&[WindowSize::LocalDay], tz, base, base + 3 * D);
        assert_eq!(t.len(), 2);
        // A range shorter than a minute has no tiles.
        assert!(tile(&sizes(), tz, base + 1, base + M).is_empty());
    }
}
