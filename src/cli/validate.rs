//! `tally validate FILE`: a data-quality report.
//!
//! The file goes through the pipeline's full rules (decode, redeliveries, conflicting
//! duplicates, voids, lateness) in a scratch directory with one worker; the report
//! counts dead letters per reason, with the first examples by line number.

use super::{load_pipeline, Exit};
use crate::ingest::{self, RunConfig};
use crate::source::Input;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub fn validate(file: &Path, pipeline: Option<&Path>, examples: usize) -> Result<Exit> {
    let pipeline = Arc::new(load_pipeline(pipeline)?);
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let line_starts: Vec<u64> = std::iter::once(0)
        .chain(
            bytes
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i as u64 + 1),
        )
        .collect();
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let dl_path = scratch.path().join(&pipeline.dead_letters);
    let cfg = RunConfig {
        pipeline,
        store: Default::default(),
        data_dir: scratch.path().to_owned(),
        workers: 1,
        inputs: vec![Input::Path(file.to_owned())],
        follow: false,
        until_eof: true,
        stop: Arc::new(AtomicBool::new(false)),
        feed: None,
        cluster: None,
    };
    let summary = ingest::run(cfg, |_| {})?;
    let store = crate::store::embedded::EmbeddedStore::open(scratch.path())?;
    let counters = crate::store::Store::meta(&store).counters.clone();

    let mut by_reason: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    let text = std::fs::read_to_string(&dl_path).unwrap_or_default();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).context("reading back dead letters")?;
        let reason = v["reason"].as_str().unwrap_or("?").to_owned();
        let offset = v["offset"].as_u64().unwrap_or(0);
        let line = line_starts.partition_point(|s| *s <= offset) as u64;
        let raw = v["raw"].as_str().unwrap_or("").to_owned();
        let raw = if v["raw_base64"].as_bool() == Some(true) {
            format!("(base64) {raw}")
        } else {
            raw
        };
        by_reason.entry(reason).or_default().push((line, raw));
    }
    let bad: usize = by_reason.values().map(Vec::len).sum();
    let mut w = std::io::stdout().lock();
    println!(
        "{}: {} records, {} good, {} bad",
        file.display(),
        summary.records,
        summary.records as usize - bad,
        bad
    );
    if counters.duplicates > 0 {
        println!(
            "  {} redeliveries counted once (not errors)",
            counters.duplicates
        );
    }
    let orphans: u64 = counters.orphans_by_provider.values().sum();
    if orphans > 0 {
        writeln!(
            w,
            "  {orphans} voids whose target never came within the dedup horizon (dropped)"
        )?;
    }
    for (reason, mut items) in by_reason {
        items.sort();
        let why = crate::decode::Reason::from_code(&reason).map_or("", |r| r.describe());
        writeln!(w, "  {reason:<26} {:>8}  {why}", items.len())?;
        for (line, raw) in items.iter().take(examples) {
            let mut shown: String = raw.chars().take(120).collect();
            if shown.len() < raw.len() {
                shown.push('…');
            }
            writeln!(w, "      line {line}: {shown}")?;
        }
    }
    Ok(if bad > 0 { Exit::BadRecords } else { Exit::Ok })
}
