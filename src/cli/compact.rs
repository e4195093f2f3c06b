//! `tally compact`: one day of the lake's staged facts into Parquet, on demand.

use super::{load_pipeline, Exit, StoreArgs};
use crate::archive::compact::{self, Outcome, Step};
use crate::archive::lake::Lake;
use crate::store::StoreConfig;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CompactArgs {
    /// The provider-local day to compact, YYYY-MM-DD.
    #[arg(long)]
    pub date: String,
    /// Only this provider (the day's staging files are then kept for the others).
    #[arg(long)]
    pub provider: Option<String>,
    /// Pipeline file (its views, time zones and [archive]). Default: the built-in one.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// The data directory of the run whose store is verified against.
    #[arg(long, default_value = "tally-data")]
    pub data_dir: PathBuf,
    /// The lake: a directory or s3://bucket/prefix. Default: the pipeline's [archive] lake.
    #[arg(long, env = "TALLY_LAKE")]
    pub lake: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

pub fn compact(a: CompactArgs) -> Result<Exit> {
    let mut pipeline = load_pipeline(a.pipeline.as_deref())?;
    if let Some(l) = &a.lake {
        pipeline.archive.lake = l.clone();
    }
    compact::parse_date(&a.date)?;
    let store_cfg = a.store.config(Some(&pipeline))?;
    if let StoreConfig::Embedded = store_cfg {
        anyhow::ensure!(
            a.data_dir.join("store").is_dir(),
            "no store in {}: compaction verifies against the store of the run (--data-dir, or --redis)",
            a.data_dir.display()
        );
    }
    let mut store = store_cfg.open_reader(&a.data_dir)?;
    let rows = store.rows()?;
    let lake = Lake::open(&pipeline.archive.lake, &a.data_dir)?;
    let staged = crate::archive::stage::staged_epoch(&lake)?;
    let epoch = store.meta().epoch;
    let bar = progress_bar(a.quiet);
    let summary = compact::compact_day(
        &lake,
        &pipeline,
        &rows,
        &a.date,
        a.provider.as_deref(),
        |s| match s {
            Step::Start(n) => bar.set_length(n as u64),
            Step::Done(p, o) => {
                bar.set_message(format!("{p}: {}", o.label()));
                bar.inc(1);
            }
        },
    )
    .with_context(|| format!("compacting {}", a.date))?;
    bar.finish_and_clear();
    let (mut published, mut unchanged, mut rows_out, mut bytes_out) = (0, 0, 0, 0);
    for (p, o) in &summary.providers {
        match o {
            Outcome::Published { rows, bytes, .. } => {
                published += 1;
                rows_out += rows;
                bytes_out += bytes;
            }
            Outcome::Unchanged { .. } => unchanged += 1,
            Outcome::Mismatch { report, diffs } => {
                eprintln!(
                    "{}: {p}: verification failed, {} figure(s) differ from the store; nothing published; report: {report}",
                    a.date,
                    diffs.len()
                );
                for d in diffs.iter().take(5) {
                    eprintln!(
                        "  view {} group {:?}: {} store {} lake {}",
                        d.view, d.group, d.figure, d.store, d.lake
                    );
                }
            }
        }
    }
    println!(
        "{}: {} provider(s): {published} published ({rows_out} events, {bytes_out} bytes), {unchanged} unchanged, {} failed verification; {} staged facts read, {} staging files deleted, in {:.2}s (lake {}, staged to epoch {staged}, store at epoch {epoch})",
        summary.date,
        summary.providers.len(),
        summary.mismatches(),
        summary.facts,
        summary.staging_deleted,
        summary.seconds,
        lake.name(),
    );
    if summary.mismatches() > 0 && staged < epoch {
        eprintln!(
            "note: the lake's staging is at epoch {staged}, the store at {epoch}: a running `tally run` flushes every archive.flush_interval and at shutdown"
        );
    }
    Ok(if summary.mismatches() > 0 {
        Exit::Mismatch
    } else {
        Exit::Ok
    })
}

fn progress_bar(quiet: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} providers, {msg} [{elapsed} elapsed, ETA {eta}]",
        )
        .expect("a valid template"),
    );
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}
