//! Benchmarks of the Parquet lake (see benches/README.md for the commands and numbers).
//!
//! - `compact --events N [--runs R]`: JSON Lines from `tally gen` (seed 1, cached under
//!   the target directory, as the pipeline benchmark's) run to committed aggregates on
//!   the embedded store with staging on and the schedule off; then every staged day
//!   compacted in this process: rows/s, the bytes per event of the Parquet events
//!   files against the JSON Lines input, and a rerun (a no-op) timed too.

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

fn main() {
    tally::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "compact") {
        eprintln!("usage: cargo bench --bench archive -- compact [--events N] [--runs R]");
        return;
    }
    let events = arg(&args, "--events", 2_000_000);
    let runs = arg(&args, "--runs", 1);
    let file = common::data_file(events);
    let input_bytes = file.metadata().unwrap().len();
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Pipeline::parse("sales.toml", DEFAULT_PIPELINE).unwrap();
        p.archive.schedule = false;
        let p = Arc::new(p);
        let started = Instant::now();
        ingest::run(
            RunConfig {
                pipeline: Arc::clone(&p),
                store: StoreConfig::Embedded,
                data_dir: dir.path().to_owned(),
                workers: 1,
                inputs: vec![Input::Path(file.clone())],
                follow: false,
                until_eof: true,
                stop: Arc::new(AtomicBool::new(false)),
                feed: None,
                cluster: None,
            },
            |_| {},
        )
        .unwrap();
        let run_secs = started.elapsed().as_secs_f64();
        let lake_dir = dir.path().join("lake");
        let staged_bytes = dir_bytes(&lake_dir.join("staging"));
        let lake = Lake::open("lake", dir.path()).unwrap();
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
        let rows = StoreConfig::Embedded
            .open_reader(dir.path())
            .unwrap()
            .rows()
            .unwrap();
        let (mut secs, mut published, mut unchanged_secs) = (0.0, 0u64, 0.0);
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
