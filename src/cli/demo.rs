//! `tally demo`: a live generated stream through the whole pipeline on the embedded
//! store, narrated once a second, with what to try next at the end.

use super::{default_workers, load_pipeline, now_ms, Exit};
use crate::ingest::{self, EpochReport, RunConfig};
use crate::source::gen::GenOptions;
use crate::source::Input;
use crate::store::embedded::EmbeddedStore;
use crate::store::{export, Counters, Store};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How long to run (0: until Ctrl-C).
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Events per second in the generated stream.
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Keep the store here (default: a scratch directory, removed at the end).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub workers: Option<usize>,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

pub fn demo(a: DemoArgs) -> Result<Exit> {
    let pipeline = Arc::new(load_pipeline(None)?);
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| scratch.path().to_owned());
    let workers = a.workers.unwrap_or_else(default_workers);
    println!(
        "Tally demo: {} events/s of generated sales, refunds and voids from 12 providers,",
        a.rate
    );
    println!("with redeliveries, voids sent before their sale, late events and 0.5% bad records.");
    println!(
        "Pipeline: {} views ({}), {workers} workers, embedded store in {}.",
        pipeline.views.len(),
        pipeline
            .views
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        data_dir.display()
    );
    println!();

    let stop = super::stop_on_signal(None);
    if a.seconds > 0 {
        let s = Arc::clone(&stop);
        let secs = a.seconds;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            s.store(true, Ordering::SeqCst);
        });
    }
    let gen = GenOptions {
        seed: a.seed,
        events: None,
        start: now_ms() - 3_600_000,
        events_per_second: a.rate,
        bad_rate: 0.005,
        rate: Some(a.rate),
        ..GenOptions::default()
    };
    let started = Instant::now();
    let window = Arc::new(Mutex::new((
        Counters::default(),
        0usize,
        0u64,
        Duration::ZERO,
        Instant::now(),
    )));
    let w = Arc::clone(&window);
    let report = move |r: &EpochReport| {
        let mut g = w.lock().expect("demo state");
        g.0.add(&r.counters);
        g.1 += r.rows_changed;
        g.2 += 1;
        g.3 = g.3.max(r.commit_latency);
        if g.4.elapsed() >= Duration::from_secs(1) {
            let c = &g.0;
            let mut reasons: Vec<_> = c.dead_letters.iter().collect();
            reasons.sort_by(|x, y| y.1.cmp(x.1));
            let top: Vec<String> = reasons
                .iter()
                .take(3)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!(
                "t+{:>3}s  epoch {:>4}  {:>6} read  {:>6} counted  {:>4} redelivered  {:>3} dead letters ({})  {:>6} rows updated  commit ≤ {:.0} ms",
                started.elapsed().as_secs(), r.epoch, c.records, c.accepted, c.duplicates, c.dead_letter_total(), top.join(", "), g.1, g.3.as_secs_f64() * 1e3
            );
            *g = (Counters::default(), 0, 0, Duration::ZERO, Instant::now());
        }
    };
    let cfg = RunConfig {
        pipeline,
        store: Default::default(),
        data_dir: data_dir.clone(),
        workers,
        inputs: vec![Input::Generated(gen)],
        follow: false,
        until_eof: false,
        stop: Arc::clone(&stop),
        feed: None,
    };
    let summary = ingest::run(cfg, report)?;

    let mut store = EmbeddedStore::open(&data_dir)?;
    let meta = store.meta().clone();
    let c = &meta.counters;
    println!();
    println!("Stopped after {} epochs: {} records read, {} counted, {} redeliveries dropped, {} dead letters.",
        summary.committed_epochs, c.records, c.accepted, c.duplicates, c.dead_letter_total());
    let rows = store.rows()?;
    let n = rows.len();
    let mut out = Vec::new();
    export::write(&meta, rows, &mut out)?;
    let text = String::from_utf8(out).expect("export is UTF-8");
    println!("The store holds {n} rows. Today's top products of the busiest provider:");
    let busiest = text
        .lines()
        .filter(|l| l.contains("\"view\":\"provider_window\"") && l.contains("\"window\":\"1d\""))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .max_by_key(|v| v["sales_count"].as_i64().unwrap_or(0));
    if let Some(b) = busiest {
        let (p, d) = (
            b["provider_id"].as_str().unwrap_or(""),
            b["window_start"].as_str().unwrap_or(""),
        );
        println!(
            "  {p} on the day starting {d}: {} sales, net {} {}, {} customers",
            b["sales_count"],
            b["net_amount"].as_str().unwrap_or(""),
            b["currency"].as_str().unwrap_or(""),
            b["distinct_customers"]
        );
        for l in text.lines().filter(|l| {
            l.contains("\"view\":\"top_products\"")
                && l.contains(&format!("\"provider_id\":\"{p}\""))
                && l.contains(d)
        }) {
            let v: serde_json::Value = serde_json::from_str(l)?;
            println!(
                "    #{} {:<10} net {}",
                v["rank"],
                v["product_id"].as_str().unwrap_or(""),
                v["net_amount"].as_str().unwrap_or("")
            );
        }
    }
    println!();
    println!("Try next (from the source tree, `cargo run --release --` in place of `tally`):");
    println!("  tally gen --events 100000 --bad-rate 0.01 --out events.jsonl");
    println!("  tally validate events.jsonl                 # data-quality report per reason");
    println!("  tally run events.jsonl --until-eof --data-dir d --export out.jsonl");
    println!("  # kill it mid-run (kill -9) and run it again: the export is the same");
    println!("  tally export --data-dir d | head");
    Ok(Exit::Ok)
}
