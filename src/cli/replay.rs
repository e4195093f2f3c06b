//! `tally replay`: a backfill into a shadow store, verified against the live store,
//! swapped in with `--swap`.
//!
//! 1. Build. The inputs (files, Kinesis streams, or the lake's compacted days with
//!    `--from-archive`) run through the same pipeline as `tally run --until-eof`,
//!    committing to the shadow: the Redis namespace `--into` beside the live one, or
//!    the embedded store in `<data dir>/replay/<into>/`. The shadow is an ordinary
//!    store with its own positions, staging log and dead letters (in that
//!    directory), so an interrupted replay resumes where it stopped when run again,
//!    and a finished one reads nothing more.
//! 2. Verify. The shadow's windows inside `[--since, --until)` that the live store
//!    has sealed are compared row by row with the live store's (see
//!    [`crate::store::swap`]); every difference goes to `<work dir>/verify.json`.
//! 3. Swap (`--swap`). Where they differ, the shadow's rows replace the live ones:
//!    on Redis in one transaction beside the running live writer; on the embedded
//!    store as one commit while the live run is stopped (its lock refuses otherwise).
//!    A difference stops the swap unless `--accept-differences` is given. With the
//!    live lake on, the swapped provider-days' facts (staged by the shadow to its own
//!    lake) are staged in the live lake first, and the days already published are
//!    compacted again for those providers after the store is written.

use super::{load_pipeline, stop_on_signal, Exit, StoreArgs};
use crate::archive::columns;
use crate::archive::compact::{day_bounds, manifest, parse_date};
use crate::archive::lake::Lake;
use crate::archive::staging::{StagedEpoch, StagingLog};
use crate::ingest::{self, RunConfig};
use crate::model::Millis;
use crate::pipeline::Pipeline;
use crate::source::Input;
use crate::store::swap::{self, Comparison, Range};
use crate::store::{Commit, Counters, Store, StoreConfig};
use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Inputs to replay: JSON Lines files or directories (read in name order).
    pub inputs: Vec<PathBuf>,
    /// Pipeline file: the live deployment's. Default: the built-in one.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// The live deployment's data directory: its embedded store, its lake by
    /// default, and the replay's work directory `replay/<into>/`.
    #[arg(long, default_value = "tally-data")]
    pub data_dir: PathBuf,
    /// The shadow's name: a Redis namespace beside --redis-namespace (with --redis),
    /// and the work directory under --data-dir/replay/.
    #[arg(long, default_value = "replay")]
    pub into: String,
    /// Replay every shard of a Kinesis stream, from --kinesis-start to its current end.
    #[command(flatten)]
    pub kinesis: super::KinesisArgs,
    /// Replay every partition of a Fluvio topic, from --fluvio-start to its current end.
    #[command(flatten)]
    pub fluvio: super::FluvioArgs,
    /// Replay the lake's compacted days instead: `D` or `D1..D2` (YYYY-MM-DD,
    /// provider-local). Each provider's windows of those days are verified and swapped.
    #[arg(long, value_name = "DATES", conflicts_with_all = ["inputs", "kinesis", "topics", "since", "until"])]
    pub from_archive: Option<String>,
    /// The live deployment's lake (read by --from-archive; a swap restages the
    /// swapped days there). Default: the pipeline's [archive] lake.
    #[arg(long, env = "TALLY_LAKE")]
    pub lake: Option<String>,
    /// The live deployment keeps no lake (`run --no-archive`): nothing is restaged.
    #[arg(long, conflicts_with_all = ["lake", "from_archive"])]
    pub no_archive: bool,
    /// Verify and swap only windows starting at or after this instant (RFC 3339, or
    /// YYYY-MM-DD for UTC midnight). Default: from the first.
    #[arg(long)]
    pub since: Option<String>,
    /// ... and ending at or before this one. Default: to the last.
    #[arg(long)]
    pub until: Option<String>,
    /// Only these providers' windows (repeat for several). Default: every provider.
    #[arg(long = "provider", value_name = "PROVIDER")]
    pub providers: Vec<String>,
    /// Swap the shadow's windows into the live store after verifying them.
    #[arg(long)]
    pub swap: bool,
    /// Swap even where the shadow differs from the live store (a backfill of events
    /// the live pipeline never got). Without it a difference stops the swap (exit 1).
    #[arg(long, requires = "swap")]
    pub accept_differences: bool,
    /// Dataflow worker threads. Default: the number of cores.
    #[arg(long)]
    pub workers: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// The live store (the shadow is derived from it).
    #[command(flatten)]
    pub store: StoreArgs,
}

pub fn replay(a: ReplayArgs) -> Result<Exit> {
    let mut pipeline = load_pipeline(a.pipeline.as_deref())?;
    if let Some(l) = &a.lake {
        pipeline.archive.lake = l.clone();
    }
    if a.no_archive {
        pipeline.archive.enabled = false;
    }
    anyhow::ensure!(
        !a.into.is_empty()
            && a.into
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')),
        "--into '{}' must be non-empty [A-Za-z0-9_.-]",
        a.into
    );
    let live_cfg = a.store.config(Some(&pipeline))?;
    let work = a.data_dir.join("replay").join(&a.into);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let shadow_cfg = match &live_cfg {
        StoreConfig::Embedded => StoreConfig::Embedded,
        StoreConfig::Redis(c) => {
            anyhow::ensure!(
                a.into != c.namespace,
                "--into '{}' is the live namespace: name another one for the shadow",
                a.into
            );
            let mut s = (**c).clone();
            s.namespace.clone_from(&a.into);
            s.changes_stream = None;
            StoreConfig::Redis(Box::new(s))
        }
    };

    // What to replay, and the windows that take part, per provider.
    let (inputs, ranges) = match &a.from_archive {
        Some(dates) => {
            let lake = Lake::open(&pipeline.archive.lake, &a.data_dir)?;
            let (file, ranges) = archive_input(&lake, &pipeline, dates, &a.providers, &work)?;
            (vec![Input::Path(file)], Ranges::PerProvider(ranges))
        }
        None => {
            let mut inputs: Vec<Input> = a.inputs.iter().cloned().map(Input::Path).collect();
            inputs.extend(a.kinesis.inputs()?);
            inputs.extend(a.fluvio.inputs()?);
            anyhow::ensure!(
                !inputs.is_empty(),
                "nothing to replay: name files or directories, --kinesis STREAM, --fluvio TOPIC, or --from-archive DATES"
            );
            let range = Range {
                since: a
                    .since
                    .as_deref()
                    .map_or(Ok(Millis::MIN), |s| instant("--since", s))?,
                until: a
                    .until
                    .as_deref()
                    .map_or(Ok(Millis::MAX), |s| instant("--until", s))?,
            };
            anyhow::ensure!(range.since < range.until, "--since must be before --until");
            (inputs, Ranges::All(range, a.providers.clone()))
        }
    };

    // 1. Build (or resume) the shadow. With the live lake on, the shadow stages its
    // facts to a lake of its own (`<work dir>/lake`), for the swap to restage.
    let mut shadow_pipeline = pipeline.clone();
    shadow_pipeline.archive.lake = "lake".into();
    shadow_pipeline.archive.schedule = false;
    let bar = progress(&inputs, a.quiet);
    let observed = bar.clone();
    let failpoint = std::env::var("TALLY_FAILPOINT").ok();
    let summary = ingest::run(
        RunConfig {
            pipeline: Arc::new(shadow_pipeline),
            data_dir: work.clone(),
            store: shadow_cfg.clone(),
            workers: a.workers.unwrap_or_else(crate::cores),
            inputs,
            follow: false,
            until_eof: true,
            stop: stop_on_signal(None),
            feed: None,
            cluster: None,
        },
        move |r| {
            observed.set_position(r.positions.values().sum());
            observed.set_message(format!("epoch {}", r.epoch));
            // A test's way to interrupt the build as a crash would.
            if failpoint.as_deref() == Some(&format!("replay:epoch:{}", r.epoch)) {
                eprintln!("tally: failpoint replay:epoch:{}: aborting", r.epoch);
                std::process::abort();
            }
        },
    )
    .context("building the shadow store")?;
    bar.finish_and_clear();

    // 2. Verify.
    let mut shadow = shadow_cfg.open_reader(&work)?;
    let mut live = live_cfg.open_reader(&a.data_dir)?;
    anyhow::ensure!(
        live.meta().epoch > 0,
        "the live store ({}) holds no commits: check --data-dir, --redis and --redis-namespace",
        describe(&live_cfg, &a.data_dir)
    );
    swap::check_views(&live.meta().views, &shadow.meta().views)?;
    let live_clock = live.meta().clock;
    let (live_rows, shadow_rows) = (live.rows()?, shadow.rows()?);
    let ranges = &ranges;
    let keep = |p: &str| ranges.of(p);
    let (live_rows, shadow_rows) = (
        live_rows
            .into_iter()
            .filter(|r| keep(&r.0 .0.group[0]).is_some()),
        shadow_rows
            .into_iter()
            .filter(|r| keep(&r.0 .0.group[0]).is_some()),
    );
    let ttl = match &live_cfg {
        StoreConfig::Redis(c) => Some(c.as_ref().clone()),
        StoreConfig::Embedded => None,
    };
    let retention = ttl
        .as_ref()
        .map(|c| move |s: crate::model::window::WindowSize| c.ttl(s));
    let comparison = swap::compare(
        &pipeline,
        live_clock,
        retention
            .as_ref()
            .map(|f| f as &dyn Fn(crate::model::window::WindowSize) -> std::time::Duration),
        live_rows.collect(),
        shadow_rows.collect(),
        &keep,
    );
    let report = work.join("verify.json");
    std::fs::write(
        &report,
        serde_json::to_vec_pretty(&comparison).expect("the comparison serializes"),
    )
    .with_context(|| format!("writing {}", report.display()))?;
    print_comparison(
        &a,
        &summary,
        shadow.meta().epoch,
        live.meta().epoch,
        live_clock,
        &comparison,
        &report,
    );

    // 3. Swap.
    if !a.swap {
        return Ok(Exit::Ok);
    }
    if comparison.differing() > 0 && !a.accept_differences {
        eprintln!(
            "not swapped: {} window(s) differ from the live store (see {}); give --accept-differences to swap them in anyway",
            comparison.differing(),
            report.display()
        );
        return Ok(Exit::Mismatch);
    }
    if comparison.changes.is_empty() {
        println!("swap: nothing to change, the live store already holds the shadow's windows");
        return Ok(Exit::Ok);
    }
    drop(live);
    // The lake first: the swapped days' facts staged beside the live run's, so a
    // crash after it leaves the swap to a rerun (staging again writes the same files).
    let days = swapped_days(&pipeline, &comparison);
    let lakes = if pipeline.archive.enabled {
        let live_lake = Lake::open(&pipeline.archive.lake, &a.data_dir)?;
        let shadow_lake = Lake::open("lake", &work)?;
        let staged = restage(&live_lake, &shadow_lake, &days, &a.into)?;
        Some((live_lake, staged))
    } else {
        None
    };
    swap_in(&live_cfg, &a.data_dir, &comparison)?;
    let deleted = comparison
        .changes
        .iter()
        .filter(|c| c.value.is_none())
        .count();
    println!(
        "swap: {} window(s) of the live store replaced ({} rows written, {deleted} deleted)",
        comparison.differing(),
        comparison.changes.len() - deleted
    );
    let Some((lake, staged)) = lakes else {
        return Ok(Exit::Ok);
    };
    // Days already published are compacted again, for the swapped providers only;
    // the others are compacted as they close, the restaged facts with them.
    let rows = live_cfg.open_reader(&a.data_dir)?.rows()?;
    let mut failed = 0;
    for (date, providers) in &days {
        if manifest(&lake, date)?.is_none() {
            continue;
        }
        for p in providers {
            let s = crate::archive::compact::compact_day(
                &lake,
                &pipeline,
                &rows,
                date,
                Some(p),
                |_| {},
            )
            .with_context(|| format!("compacting {date} for {p} again"))?;
            for (p, o) in &s.providers {
                println!("lake: {date} {p}: {}", o.label());
            }
            failed += s.mismatches();
        }
    }
    println!(
        "lake: {staged} staged facts of {} swapped provider-day(s) restaged in {}",
        days.values().map(|p| p.len()).sum::<usize>(),
        lake.name()
    );
    Ok(if failed > 0 { Exit::Mismatch } else { Exit::Ok })
}

/// The provider-local days whose day windows the swap replaces, with their providers.
fn swapped_days(
    pipeline: &Pipeline,
    c: &Comparison,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut days: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for u in &c.changes {
        if u.key.size != crate::model::window::WindowSize::LocalDay {
            continue;
        }
        let provider = u.key.group[0].as_str();
        let date = crate::archive::stage::local_date(pipeline, provider, u.key.start);
        days.entry(date).or_default().insert(provider.to_owned());
    }
    days
}

/// Copies the shadow's staged facts of the swapped provider-days into the live
/// lake's staging, one file per day named for the shadow (written again, the same
/// file). Compaction applies facts as sets, so facts both runs staged count once.
fn restage(
    live: &Lake,
    shadow: &Lake,
    days: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    into: &str,
) -> Result<u64> {
    let mut staged = 0;
    for (date, providers) in days {
        let mut rows = Vec::new();
        for path in crate::archive::compact::staging_files(shadow, date)? {
            let bytes = shadow.get(&path)?.ok_or_else(|| {
                anyhow::anyhow!("{path} is listed but gone from the shadow's lake")
            })?;
            for b in columns::read_parquet(bytes).with_context(|| format!("reading {path}"))? {
                let r = columns::from_batch(columns::STAGING, &b, None)
                    .map_err(|e| anyhow::anyhow!("{path}: column {}: {}", e.column, e.reason))?;
                rows.extend(
                    r.into_iter()
                        .filter(|r| providers.contains(r.event.provider_id.as_str())),
                );
            }
        }
        if rows.is_empty() {
            continue;
        }
        staged += rows.len() as u64;
        let batch = columns::to_batch(columns::STAGING, &rows);
        let bytes = columns::write_parquet(&[batch], columns::props(1, 1 << 20))
            .with_context(|| format!("staging {date}"))?;
        live.put(&format!("staging/date={date}/replay-{into}.parquet"), bytes)?;
    }
    Ok(staged)
}

/// The windows that take part, by provider.
enum Ranges {
    /// One range for every provider (or the listed ones).
    All(Range, Vec<String>),
    /// A range per provider (its local days, for --from-archive).
    PerProvider(std::collections::BTreeMap<String, Range>),
}

impl Ranges {
    fn of(&self, provider: &str) -> Option<Range> {
        match self {
            Ranges::All(r, only) => {
                (only.is_empty() || only.iter().any(|p| p == provider)).then_some(*r)
            }
            Ranges::PerProvider(m) => m.get(provider).copied(),
        }
    }
}

/// Writes the comparison's changes into the live store.
fn swap_in(live_cfg: &StoreConfig, data_dir: &Path, c: &Comparison) -> Result<()> {
    match live_cfg {
        StoreConfig::Redis(cfg) => {
            let mut store = crate::store::redis::RedisStore::open_reader((**cfg).clone())?;
            store.patch(&c.changes)?;
        }
        StoreConfig::Embedded => {
            // The writer's lock: refused while the live run has the store open.
            let mut store = crate::store::embedded::EmbeddedStore::open(data_dir)?;
            let meta = store.meta().clone();
            // An empty staging frame for the swap's epoch keeps the log's epochs
            // contiguous with the store's, as a restart replays them.
            let mut log = StagingLog::open(data_dir, meta.staging_len)
                .with_context(|| format!("the staging log in {}", data_dir.display()))?;
            let epoch = meta.epoch + 1;
            let staging_len = log
                .append(&StagedEpoch {
                    epoch,
                    clock: meta.clock,
                    ..StagedEpoch::default()
                })
                .with_context(|| format!("appending to {}", log.path().display()))?;
            store.commit(&Commit {
                epoch,
                clock: meta.clock,
                positions: Default::default(),
                checkpoints: Default::default(),
                staging_len,
                dead_letters_len: meta.dead_letters_len,
                counters: Counters::default(),
                changes: c.changes.clone(),
            })?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn print_comparison(
    a: &ReplayArgs,
    run: &ingest::RunSummary,
    shadow_epoch: u64,
    live_epoch: u64,
    live_clock: Millis,
    c: &Comparison,
    report: &Path,
) {
    println!(
        "replay: shadow '{}' at epoch {shadow_epoch} ({} records read now, {} epochs committed now); live store at epoch {live_epoch}, clock {}",
        a.into,
        run.records,
        run.committed_epochs,
        crate::model::window::rfc3339(live_clock),
    );
    println!(
        "verify: {} window(s) compared: {} identical, {} differ ({} rows); {} in range not sealed by the live store yet (left alone), {} past its retention; report: {}",
        c.compared,
        c.identical,
        c.differing(),
        c.differences.len(),
        c.unsealed,
        c.expired,
        report.display()
    );
    for d in c.differences.iter().take(10) {
        println!(
            "  {} {} {} {}: shadow {} live {}",
            d.provider,
            d.view,
            d.window,
            d.window_start,
            d.shadow.as_deref().unwrap_or("(none)"),
            d.live.as_deref().unwrap_or("(none)")
        );
    }
}

fn describe(cfg: &StoreConfig, data_dir: &Path) -> String {
    match cfg {
        StoreConfig::Embedded => format!("embedded, in {}", data_dir.display()),
        StoreConfig::Redis(c) => c.describe(),
    }
}

/// `--since`/`--until`: RFC 3339, or a date for UTC midnight.
fn instant(flag: &str, s: &str) -> Result<Millis> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| anyhow::anyhow!("{flag} '{s}': expected RFC 3339 or YYYY-MM-DD"))?;
    Ok(d.and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp_millis())
}

/// A bar over the input files' bytes, or a spinner when the input has no known size.
fn progress(inputs: &[Input], quiet: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let mut total = Some(0u64);
    for i in inputs {
        total = match (total, i) {
            (Some(t), Input::Path(p)) => size_of(p).map(|s| t + s),
            _ => None,
        };
    }
    let bar = match total {
        Some(t) => ProgressBar::new(t).with_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec}, {msg} [{elapsed} elapsed, ETA {eta}]",
            )
            .expect("a valid template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {pos} records, {per_sec}, {msg} [{elapsed}]")
                .expect("a valid template"),
        ),
    };
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}

/// Bytes of a file, or of the files in a directory.
fn size_of(p: &Path) -> Option<u64> {
    let m = std::fs::metadata(p).ok()?;
    if m.is_file() {
        return Some(m.len());
    }
    let mut total = 0;
    for e in std::fs::read_dir(p).ok()? {
        let m = e.ok()?.metadata().ok()?;
        if m.is_file() {
            total += m.len();
        }
    }
    Some(total)
}

/// `--from-archive D1..D2`: the days' compacted events as one JSON Lines file in
/// event-time order (written once; a resumed replay reads the same file), and each
/// provider's range: its local days D1 to D2.
fn archive_input(
    lake: &Lake,
    pipeline: &Pipeline,
    dates: &str,
    only: &[String],
    work: &Path,
) -> Result<(PathBuf, std::collections::BTreeMap<String, Range>)> {
    let (first, last) = match dates.split_once("..") {
        Some((a, b)) => (parse_date(a)?, parse_date(b)?),
        None => (parse_date(dates)?, parse_date(dates)?),
    };
    anyhow::ensure!(
        first <= last,
        "--from-archive {dates}: the first date is after the last"
    );
    let file = work.join(format!("archive-{first}..{last}.jsonl"));
    let mut ranges = std::collections::BTreeMap::new();
    let mut events = Vec::new();
    let write = !file.exists();
    let mut day = first;
    while day <= last {
        let date = day.to_string();
        let m = manifest(lake, &date)?.ok_or_else(|| {
            anyhow::anyhow!(
                "the lake {} holds no compacted day {date}: compact it first (tally compact --date {date})",
                lake.name()
            )
        })?;
        for (provider, pd) in &m.providers {
            if !only.is_empty() && !only.contains(provider) {
                continue;
            }
            ranges.insert(
                provider.clone(),
                Range {
                    since: day_bounds(pipeline, provider, first).0,
                    until: day_bounds(pipeline, provider, last).1,
                },
            );
            if !write {
                continue;
            }
            for f in &pd.events {
                let bytes = lake.get(&f.path)?.ok_or_else(|| {
                    anyhow::anyhow!(
                        "{} is listed in day {date}'s manifest but missing from the lake",
                        f.path
                    )
                })?;
                for b in
                    columns::read_parquet(bytes).with_context(|| format!("reading {}", f.path))?
                {
                    let rows =
                        columns::from_batch(columns::EVENTS, &b, Some(provider)).map_err(|e| {
                            anyhow::anyhow!("{}: column {}: {}", f.path, e.column, e.reason)
                        })?;
                    events.extend(rows.into_iter().map(|r| r.event));
                }
            }
        }
        day = day.succ_opt().expect("date in range");
    }
    for p in only {
        anyhow::ensure!(
            ranges.contains_key(p),
            "--provider {p}: the lake holds none of its events from {first} to {last}"
        );
    }
    if write {
        events.sort_by(|a, b| (a.ts, &a.event_id).cmp(&(b.ts, &b.event_id)));
        let tmp = work.join("archive.jsonl.tmp");
        let mut out = String::with_capacity(events.len() * 200);
        for e in &events {
            out.push_str(&event_json(e));
            out.push('\n');
        }
        std::fs::write(&tmp, out).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok((file, ranges))
}

/// An event as an EVENTS.md JSON line.
fn event_json(e: &crate::model::Event) -> String {
    let mut o = serde_json::Map::new();
    o.insert("event_id".into(), e.event_id.as_str().into());
    o.insert("provider_id".into(), e.provider_id.as_str().into());
    o.insert("product_id".into(), e.product_id.as_str().into());
    o.insert("customer_id".into(), e.customer_id.as_str().into());
    o.insert("kind".into(), e.kind.as_str().into());
    if let Some(m) = e.amount {
        o.insert(
            "amount".into(),
            crate::model::format_hundredths(m.hundredths().into()).into(),
        );
    }
    o.insert("currency".into(), e.currency.as_str().into());
    o.insert("ts".into(), e.ts.into());
    if let Some(r) = &e.ref_event_id {
        o.insert("ref_event_id".into(), r.as_str().into());
    }
    if !e.attrs.is_empty() {
        let attrs: serde_json::Map<String, serde_json::Value> = e
            .attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_str().into()))
            .collect();
        o.insert("attrs".into(), attrs.into());
    }
    serde_json::Value::Object(o).to_string()
}
