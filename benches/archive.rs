//! Benchmarks of the Parquet lake (see benches/README.md for the commands and numbers).
//!
//! - `compact --events N [--runs R]`: JSON Lines from `tally gen` (seed 1, cached under
//!   the target directory, as the pipeline benchmark's) run to committed aggregates on
//!   the embedded store with staging on and the schedule off; then every staged day
//!   compacted in this process: rows/s, the bytes per event of the Parquet events
//!   files against the JSON Lines input, and a rerun (a no-op) timed too.
//! - `history [--events N] [--days D] [--iters I]`: N generated events over D days of
//!   event time, run and compacted as above, then the reads a query past the Redis
//!   retention makes of the lake (`archive::history::History::rows`): a day of hour
//!   windows, a day of minute windows, a day's top products, every day window. Cold:
//!   a fresh `History` (manifest and Parquet read and decoded; the files are in the
//!   OS page cache); warm: the same read again (decoded files cached), I times.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
use tally::archive::compact::{self, Outcome};
use tally::archive::lake::Lake;
use tally::ingest::{self, RunConfig};
use tally::pipeline::{Pipeline, DEFAULT_PIPELINE};
use tally::source::Input;
use tally::store::StoreConfig;

mod common;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn dir_bytes(d: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(d) else {
        return 0;
    };
    rd.map(|e| {
        let p = e.unwrap().path();
        if p.is_dir() {
            dir_bytes(&p)
        } else {
            p.metadata().unwrap().len()
        }
    })
    .sum()
}

/// The dates the lake has staging files for.
fn staged_dates(lake: &Lake) -> Vec<String> {
    let mut dates: Vec<String> = lake
        .list("staging")
        .unwrap()
        .into_iter()
        .filter_map(|(path, _)| {
            let d = path.strip_prefix("staging/date=")?.split('/').next()?;
            Some(d.to_owned())
        })
        .collect();
    dates.dedup();
    dates
}

/// Runs `file` to committed aggregates in `dir` (embedded store, staging on, the
/// schedule off); returns the pipeline.
fn run_staged(file: &Path, dir: &Path) -> Arc<Pipeline> {
    let mut p = Pipeline::parse("sales.toml", DEFAULT_PIPELINE).unwrap();
    p.archive.schedule = false;
    let p = Arc::new(p);
    ingest::run(
        RunConfig {
            pipeline: Arc::clone(&p),
            store: StoreConfig::Embedded,
            data_dir: dir.to_owned(),
            workers: 1,
            inputs: vec![Input::Path(file.to_owned())],
            follow: false,
            until_eof: true,
            stop: Arc::new(AtomicBool::new(false)),
            feed: None,
            cluster: None,
        },
        |_| {},
    )
    .unwrap();
    p
}

/// [`run_staged`], then every staged day compacted; returns the pipeline and the dates.
fn run_and_compact(file: &Path, dir: &Path) -> (Arc<Pipeline>, Vec<String>) {
    let p = run_staged(file, dir);
    let lake = Lake::open("lake", dir).unwrap();
    let rows = StoreConfig::Embedded
        .open_reader(dir)
        .unwrap()
        .rows()
        .unwrap();
    let dates = staged_dates(&lake);
    for d in &dates {
        let s = compact::compact_day(&lake, &p, &rows, d, None, |_| {}).unwrap();
        assert_eq!(s.mismatches(), 0, "{d}");
    }
    (p, dates)
}

/// Microseconds at a quantile of sorted samples.
fn pct(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn history(args: &[String]) {
    use tally::archive::history::History;
    use tally::model::window::WindowSize;
    let events = arg(args, "--events", 1_000_000);
    let days = arg(args, "--days", 6);
    let iters = arg(args, "--iters", 300) as usize;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    {
        let opts = tally::source::gen::GenOptions {
            seed: 3,
            events: Some(events),
            events_per_second: events as f64 / (days as f64 * 86_400.0),
            ..Default::default()
        };
        let mut w = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        for line in tally::source::gen::Generator::new(opts) {
            std::io::Write::write_all(&mut w, &line).unwrap();
            std::io::Write::write_all(&mut w, b"\n").unwrap();
        }
    }
    let (p, dates) = run_and_compact(&file, dir.path());
    // A whole day in the middle, and its busiest provider.
    let date = dates[dates.len() / 2].clone();
    let lake = || Lake::open("lake", dir.path()).unwrap();
    let manifest = compact::manifest(&lake(), &date).unwrap().unwrap();
    let (provider, _) = manifest
        .providers
        .iter()
        .max_by_key(|(_, d)| d.rows)
        .unwrap();
    let day = compact::day_bounds(&p, provider, compact::parse_date(&date).unwrap());
    let view = |name: &str| p.views.iter().position(|v| v.name == name).unwrap() as u16;
    let (first, last) = (
        compact::parse_date(&dates[0]).unwrap(),
        compact::parse_date(dates.last().unwrap()).unwrap(),
    );
    let all_days = (
        compact::day_bounds(&p, provider, first).0,
        compact::day_bounds(&p, provider, last).1,
    );
    let queries = [
        (
            "hours_of_a_day",
            view("provider_window"),
            WindowSize::Fixed(3_600_000),
            day,
        ),
        (
            "minutes_of_a_day",
            view("provider_window"),
            WindowSize::Fixed(60_000),
            day,
        ),
        (
            "top_products_of_a_day",
            view("top_products"),
            WindowSize::LocalDay,
            day,
        ),
        (
            "every_day",
            view("provider_window"),
            WindowSize::LocalDay,
            all_days,
        ),
    ];
    println!(
        "history events={events} days={} provider={provider} date={date} iters={iters}",
        dates.len()
    );
    for (name, v, size, (from, to)) in queries {
        let mut cold = Vec::new();
        let mut n = 0;
        for _ in 0..5 {
            let h = History::new(lake(), Arc::clone(&p));
            let t = Instant::now();
            n = h.rows(provider, v, size, from, to).unwrap().len();
            cold.push(t.elapsed().as_secs_f64() * 1e6);
        }
        assert!(n > 0, "{name}: no rows");
        cold.sort_by(f64::total_cmp);
        let h = History::new(lake(), Arc::clone(&p));
        h.rows(provider, v, size, from, to).unwrap();
        let mut warm: Vec<f64> = (0..iters)
            .map(|_| {
                let t = Instant::now();
                let r = h.rows(provider, v, size, from, to).unwrap();
                std::hint::black_box(r);
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        warm.sort_by(f64::total_cmp);
        println!(
            "history query={name} rows={n} cold_median_us={:.0} warm_p50_us={:.0} warm_p99_us={:.0}",
            pct(&cold, 0.5),
            pct(&warm, 0.5),
            pct(&warm, 0.99),
        );
    }
}

fn main() {
    tally::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "history") {
        return history(&args);
    }
    if !args.iter().any(|a| a == "compact") {
        eprintln!(
            "usage: cargo bench --bench archive -- compact [--events N] [--runs R]\n\
             \x20      cargo bench --bench archive -- history [--events N] [--days D] [--iters I]"
        );
        return;
    }
    let events = arg(&args, "--events", 2_000_000);
    let runs = arg(&args, "--runs", 1);
    let file = common::data_file(events);
    let input_bytes = file.metadata().unwrap().len();
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let p = run_staged(&file, dir.path());
        let run_secs = started.elapsed().as_secs_f64();
        let lake_dir = dir.path().join("lake");
        let staged_bytes = dir_bytes(&lake_dir.join("staging"));
        let lake = Lake::open("lake", dir.path()).unwrap();
        let rows = StoreConfig::Embedded
            .open_reader(dir.path())
            .unwrap()
            .rows()
            .unwrap();
        let (mut secs, mut published, mut unchanged_secs) = (0.0, 0u64, 0.0);
        let dates = staged_dates(&lake);
        for d in &dates {
            let t = Instant::now();
            let s = compact::compact_day(&lake, &p, &rows, d, None, |_| {}).unwrap();
            secs += t.elapsed().as_secs_f64();
            assert_eq!(s.mismatches(), 0, "{d}");
            for (_, o) in &s.providers {
                if let Outcome::Published { rows, .. } = o {
                    published += rows;
                }
            }
            let t = Instant::now();
            compact::compact_day(&lake, &p, &rows, d, None, |_| {}).unwrap();
            unchanged_secs += t.elapsed().as_secs_f64();
        }
        let (ev, audit, agg) = (
            dir_bytes(&lake_dir.join("events")),
            dir_bytes(&lake_dir.join("audit")),
            dir_bytes(&lake_dir.join("aggregates")),
        );
        println!(
            "compact events={events} days={} run_seconds={run_secs:.1} run_events_per_s={:.0} staged_bytes_per_event={:.1} compact_seconds={secs:.2} rows={published} rows_per_s={:.0} parquet_bytes_per_event={:.1} jsonl_bytes_per_event={:.1} audit_bytes={audit} aggregates_bytes={agg} rerun_seconds={unchanged_secs:.2}",
            dates.len(),
            events as f64 / run_secs,
            staged_bytes as f64 / events as f64,
            published as f64 / secs,
            ev as f64 / published.max(1) as f64,
            input_bytes as f64 / events as f64,
        );
    }
}
