//! The run loop: sources -> epochs -> dataflow -> committer -> store.
//!
//! Epochs. The loop stamps records with the current epoch and closes it after
//! `epoch.max_duration` or `epoch.max_events` records, whichever comes first. Each
//! record carries the watermark at its arrival (largest event time read before it,
//! minus the allowed lateness); the epoch's clock (largest event time read so far)
//! goes to every worker when the epoch closes.
//!
//! Commit. The committer commits epoch `e` once the loop has closed it and every
//! worker has reported it, in this order: the staging log frame (fsync), the dead
//! letters (fsync), then one atomic store commit carrying rows, positions, counters
//! and the two file lengths. A crash anywhere leaves the store at `e - 1` or `e`; at
//! the next start the staging log and dead-letter file are cut back to the lengths the
//! store holds, the staging log is replayed through the dataflow (rebuilding its state
//! without committing anything; epochs whose effects have all expired are skipped),
//! and reading resumes at the committed positions.
//!
//! Backpressure. At most [`IN_FLIGHT_RECORDS`] records (and [`IN_FLIGHT_EPOCHS`]
//! epochs) may be closed but not committed; the loop blocks after that, and bounded
//! channels block the readers in turn. The limit is in records because what an
//! uncommitted epoch holds grows with its records, and because the committer works in
//! bursts (a lake flush, a store snapshot) that the worker should run through: four
//! epochs cut by time under load held too little of it. While the store is unavailable
//! (Redis down), the committer retries the same epoch with backoff, so the same limit
//! stops reading until it is back.
//!
//! Shutdown (`stop` set, or all input read with `until_eof`): stop reading, close the
//! open epoch, wait for the workers to finish and the committer to commit everything.

use crate::archive::staging::{StagedEpoch, StagingLog};
use crate::dataflow::{
    Cluster, ClusterError, Dataflow, DeadLetter, Epoch, EpochOutput, Fact, Out, Record, RowUpdate,
};
use crate::decode::{decode, Reason};
use crate::model::{Millis, Position};
use crate::pipeline::Pipeline;
use crate::source::{Input, SourceError, SourceMsg, Sources};
use crate::store::{Commit, Counters, Meta, Store, StoreConfig, StoreError, StoredRow};
use base64::Engine;
use crossbeam_channel::{select, Receiver};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Closed but uncommitted records allowed before reading pauses (an epoch larger than
/// this still goes through, alone). Measured on the 2M-event benchmark at 1 worker:
/// four epochs in flight (200,000 records with epochs cut by time) left the worker
/// waiting on the committer's bursts; twice that and more did not (benches/README,
/// session 14).
pub const IN_FLIGHT_RECORDS: u64 = 500_000;
/// The records one permit stands for: an epoch takes one per this many records or
/// part of them, so at most [`IN_FLIGHT_EPOCHS`] epochs wait however small they are.
const PERMIT_RECORDS: u64 = 25_000;
/// Closed but uncommitted epochs allowed before reading pauses.
pub const IN_FLIGHT_EPOCHS: usize = (IN_FLIGHT_RECORDS / PERMIT_RECORDS) as usize;

/// The permits an epoch of `records` records holds from its close to its commit.
fn permits_for(records: u64) -> usize {
    records
        .div_ceil(PERMIT_RECORDS)
        .clamp(1, IN_FLIGHT_EPOCHS as u64) as usize
}

/// How a run is set up.
pub struct RunConfig {
    pub pipeline: Arc<Pipeline>,
    pub data_dir: PathBuf,
    /// Where epochs are committed.
    pub store: StoreConfig,
    pub workers: usize,
    pub inputs: Vec<Input>,
    pub follow: bool,
    /// Stop once every input is read and committed.
    pub until_eof: bool,
    /// Set to stop gracefully (signals).
    pub stop: Arc<AtomicBool>,
    /// Told of the store and of every commit (the gRPC API).
    pub feed: Option<Arc<dyn Feed>>,
    /// The timely cluster this process leads (process 0), if it spans several
    /// processes; `workers` is then the count per process. See [`follow`] for the others.
    pub cluster: Option<Cluster>,
}

/// What the run loop tells the rest of the process (the gRPC API) as it goes. Called
/// from the committer thread, in commit order: keep it short.
pub trait Feed: Send + Sync {
    /// Whether [`Feed::opened`] needs the store's rows (an in-memory index does).
    fn wants_rows(&self) -> bool {
        false
    }
    /// The store is open: its last commit, and its rows when asked for.
    fn opened(&self, meta: &Meta, rows: Vec<StoredRow>);
    /// The commit of an epoch that closed at `closed_at` starts (lag runs from there).
    fn committing(&self, _epoch: Epoch, _closed_at: Instant) {}
    /// The store stopped or started answering.
    fn store_up(&self, _up: bool) {}
    /// The committer is between two commits (after a commit, and every 100 ms while
    /// idle): `store` holds exactly the last committed epoch, and nothing commits
    /// until this returns (Admin.Snapshot reads here).
    fn between(&self, _store: &mut dyn Store) {}
    /// An epoch is committed; `dead` holds its dead letters: (source name, offset,
    /// reason code); `alerts` its events at or above their alert threshold that are
    /// not dead letters (a redelivery of an earlier one may be among them).
    fn committed(&self, commit: &Commit, dead: &[(String, u64, &'static str)], alerts: &[Alert]);
}

/// A sale or refund at or above its provider's threshold (pipeline `[alerts]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub event_id: compact_str::CompactString,
    pub provider_id: compact_str::CompactString,
    pub product_id: compact_str::CompactString,
    pub customer_id: compact_str::CompactString,
    pub kind: crate::model::Kind,
    /// Hundredths.
    pub amount: i64,
    pub currency: String,
    pub ts: Millis,
    /// Hundredths.
    pub threshold: i64,
    pub epoch: Epoch,
    /// Where it was read.
    pos: Position,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A worker failed; in a cluster, also another process dying.
    #[error("{0}")]
    Dataflow(String),
    #[error(transparent)]
    Lake(#[from] crate::archive::lake::LakeError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// What one committed epoch did, for progress output.
#[derive(Clone, Debug)]
pub struct EpochReport {
    pub epoch: Epoch,
    /// The largest event time read up to this epoch.
    pub clock: Millis,
    pub counters: Counters,
    pub rows_changed: usize,
    /// From the epoch's close to its commit.
    pub commit_latency: Duration,
    /// Inside the store's commit alone (retries during an outage included).
    pub store_latency: Duration,
    /// Per source name, the byte offset just after the last record committed.
    pub positions: BTreeMap<String, u64>,
}

/// What a finished run did.
#[derive(Debug)]
pub struct RunSummary {
    /// Staging-log epochs whose effects had all expired, not replayed.
    pub skipped_epochs: u64,
    pub replayed_epochs: u64,
    pub committed_epochs: u64,
    pub records: u64,
    pub first_epoch: Epoch,
    pub last_epoch: Epoch,
}

/// Everything the loop hands the committer for an epoch.
struct EpochMeta {
    epoch: Epoch,
    clock: Millis,
    replay: bool,
    positions: BTreeMap<String, u64>,
    checkpoints: BTreeMap<String, String>,
    staged: StagedEpoch,
    line_dead: Vec<(Position, Reason, Vec<u8>)>,
    alerts: Vec<Alert>,
    /// Source names by position index.
    names: Arc<Vec<String>>,
    records: u64,
    decoded: u64,
    closed_at: Instant,
}

/// Which staged epochs a restart need not replay: every effect of theirs has expired
/// by the committed clock (each window they touched is sealed; their ids, targets and
/// waiting voids are past the horizon), and the lake holds their facts. Replaying them
/// could only rebuild state that would be dropped again, so a restart costs the
/// horizon, not the whole history, and the committer deletes the staging log's files
/// that hold only such epochs.
#[derive(Clone, Copy, Debug)]
struct Spent {
    /// How long after an epoch's clock its effects can last.
    reach: Millis,
}

impl Spent {
    fn of(p: &Pipeline, rules: &crate::dataflow::Rules) -> Spent {
        let longest_window = p
            .views
            .iter()
            .flat_map(|v| &v.windows)
            .map(|w| w.max_len())
            .max()
            .unwrap_or(0);
        Spent {
            reach: rules
                .lateness
                .max(rules.horizon)
                .saturating_add(longest_window),
        }
    }

    /// Whether epoch `epoch`, closed at `clock`, is spent once the store is committed
    /// at `committed_clock` and the lake holds the facts of epochs up to `staged`.
    fn skips(&self, epoch: Epoch, clock: Millis, committed_clock: Millis, staged: Epoch) -> bool {
        clock != Millis::MIN
            && clock.saturating_add(self.reach) < committed_clock
            && epoch <= staged
    }
}

/// Runs a pipeline until stopped (or, with `until_eof`, until all input is committed).
/// `observe` sees every committed epoch.
pub fn run(
    cfg: RunConfig,
    observe: impl FnMut(&EpochReport) + Send + 'static,
) -> Result<RunSummary, RunError> {
    // A shared store (Redis) is checked against this data directory before this
    // process takes it over: a mismatch must not stop the writer already there.
    if let StoreConfig::Redis(_) = &cfg.store {
        let committed = cfg.store.open_reader(&cfg.data_dir)?.meta().staging_len;
        StagingLog::check(&cfg.data_dir, committed).map_err(|source| RunError::Io {
            what: "staging log",
            path: cfg.data_dir.join("staging").display().to_string(),
            source,
        })?;
    }
    let mut store = cfg.store.open(&cfg.data_dir)?;
    store.bind_views(&cfg.pipeline.views)?;
    if let Some(f) = &cfg.feed {
        let rows = if f.wants_rows() {
            store.rows()?
        } else {
            Vec::new()
        };
        f.opened(store.meta(), rows);
    }
    metrics::gauge!(crate::metrics::STORE_UP).set(1.0);
    metrics::gauge!(crate::metrics::LAST_EPOCH).set(store.meta().epoch as f64);
    let meta = store.meta().clone();
    let staging = StagingLog::open(&cfg.data_dir, meta.staging_len)
        .map_err(|source| RunError::Io {
            what: "staging log",
            path: cfg.data_dir.join("staging").display().to_string(),
            source,
        })?
        .with_segment_size(cfg.pipeline.staging.segment_size);
    let dl_path = cfg.data_dir.join(&cfg.pipeline.dead_letters);
    let dead =
        DeadLetterFile::open(&dl_path, meta.dead_letters_len).map_err(|source| RunError::Io {
            what: "dead letters",
            path: dl_path.display().to_string(),
            source,
        })?;

    // The archive's staging: facts of epochs past the lake's last flush are told again
    // by the replay below, so none is skipped.
    let stager = if cfg.pipeline.archive.enabled {
        let lake = crate::archive::lake::Lake::open(&cfg.pipeline.archive.lake, &cfg.data_dir)?;
        Some(crate::archive::stage::Stager::open(
            lake,
            Arc::clone(&cfg.pipeline),
        )?)
    } else {
        None
    };
    let staged_epoch = stager.as_ref().map_or(Epoch::MAX, |s| s.staged());
    let scheduler = if cfg.pipeline.archive.enabled && cfg.pipeline.archive.schedule {
        let lake = crate::archive::lake::Lake::open(&cfg.pipeline.archive.lake, &cfg.data_dir)?;
        Some(crate::archive::schedule::Scheduler::start(
            Arc::clone(&cfg.pipeline),
            lake,
        )?)
    } else {
        None
    };

    // Epochs to replay, to rebuild dataflow state: streamed, never held whole.
    let staging_path = staging.path().display().to_string();
    let staging_err = |source| RunError::Io {
        what: "staging log",
        path: staging_path.clone(),
        source,
    };
    let mut staged = staging.read().map_err(staging_err)?.peekable();
    let rules = crate::dataflow::Rules::of(&cfg.pipeline);
    let spent = Spent::of(&cfg.pipeline, &rules);
    let mut skipped = 0u64;
    while let Some(Ok(s)) = staged.peek() {
        if spent.skips(s.epoch, s.clock, meta.clock, staged_epoch) {
            staged.next();
            skipped += 1;
        } else {
            break;
        }
    }
    let first_epoch = match staged.peek() {
        Some(Ok(s)) => s.epoch,
        _ => meta.epoch + 1,
    };
    if first_epoch <= meta.epoch || skipped > 0 {
        tracing::info!(
            skipped,
            from = first_epoch,
            to = meta.epoch,
            "replaying the staging log to rebuild state"
        );
    }

    let stop = Arc::clone(&cfg.stop);
    let resume = crate::source::Resume {
        positions: meta.positions.clone(),
        checkpoints: meta.checkpoints.clone(),
    };
    let (out_tx, out_rx) = crossbeam_channel::unbounded::<EpochOutput>();
    let (meta_tx, meta_rx) = crossbeam_channel::unbounded::<EpochMeta>();
    let (permit_tx, permit_rx) = crossbeam_channel::bounded::<()>(IN_FLIGHT_EPOCHS);
    // The cluster forms first: the sources read partitions over its reader links.
    let mut df = Dataflow::start(
        Arc::clone(&cfg.pipeline),
        cfg.workers,
        first_epoch,
        out_tx,
        cfg.cluster.as_ref(),
    )?;
    let remote =
        crate::source::remote::Remote::start(df.take_links()).map_err(|source| RunError::Io {
            what: "reader links",
            path: "the cluster".into(),
            source,
        });
    let sources = match remote.and_then(|remote| {
        Sources::start(
            &cfg.inputs,
            &resume,
            cfg.follow,
            Arc::clone(&stop),
            remote,
            cfg.workers,
        )
        .map_err(RunError::from)
    }) {
        Ok(s) => s,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            let _ = df.join();
            return Err(e);
        }
    };
    let registry = sources.names.clone();
    let committer = {
        let workers = df.workers();
        let committed = meta.epoch;
        let feed = cfg.feed.clone();
        std::thread::Builder::new()
            .name("tally-committer".into())
            .spawn(move || {
                let mut archive = Archive { stager, scheduler };
                let r = commit_loop(
                    store,
                    (staging, spent),
                    dead,
                    &mut archive,
                    workers,
                    committed,
                    meta_rx,
                    out_rx,
                    permit_rx,
                    feed,
                    observe,
                );
                if let Some(s) = archive.scheduler {
                    s.finish();
                }
                r
            })
            .expect("spawn committer")
    };

    let mut replayed = 0;
    for s in staged {
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                // Stop cleanly: nothing more was committed, the next start tries again.
                stop.store(true, Ordering::Relaxed);
                drop(df);
                drop(meta_tx);
                let _ = committer.join();
                return Err(staging_err(e));
            }
        };
        let idx: Vec<u32> = s.sources.iter().map(|n| registry.index(n)).collect();
        let records: Vec<Record> = s
            .records
            .into_iter()
            .filter_map(|r| {
                let event = decode(r.raw.as_bytes()).ok()?;
                Some(Record {
                    event: Box::new(event),
                    pos: Position {
                        source: idx[r.source as usize],
                        offset: r.offset,
                    },
                    wm: r.wm,
                    raw: r.raw,
                })
            })
            .collect();
        df.send(s.epoch, records);
        df.close(s.epoch, s.clock);
        let _ = meta_tx.send(EpochMeta {
            epoch: s.epoch,
            clock: s.clock,
            replay: true,
            positions: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            staged: StagedEpoch::default(),
            line_dead: Vec::new(),
            alerts: Vec::new(),
            // The archive names a replayed fact's source.
            names: if s.epoch > staged_epoch {
                Arc::new(registry.snapshot())
            } else {
                Arc::new(Vec::new())
            },
            records: 0,
            decoded: 0,
            closed_at: Instant::now(),
        });
        replayed += 1;
    }

    // Live reading. Names by index, taken again when a source shows a new one.
    let mut names = Arc::new(registry.snapshot());
    let mut epoch = meta.epoch + 1;
    // No event time read yet on a fresh store (0 would be a real instant: 1970).
    let mut clock = if meta.epoch == 0 {
        Millis::MIN
    } else {
        meta.clock
    };
    let mut positions = meta.positions.clone();
    let mut checkpoints = meta.checkpoints.clone();
    let mut open = Open::new(epoch, clock);
    let mut pending: Vec<Record> = Vec::new();
    let mut eofs = 0;
    let mut total_records = 0u64;
    let mut committed_epochs = 0u64;
    let mut failure: Option<RunError> = None;
    let max_events = cfg.pipeline.epoch_max_events;
    let alerts = &cfg.pipeline.alerts;
    let max_duration = cfg.pipeline.epoch_max_duration;
    let mut deadline = Instant::now() + max_duration;

    loop {
        if stop.load(Ordering::Relaxed) || committer.is_finished() {
            break;
        }
        let mut close = false;
        let mut done = false;
        match sources.rx.recv_deadline(deadline) {
            Ok(SourceMsg::Lines {
                source,
                lines,
                checkpoint,
            }) => {
                if source as usize >= names.len() {
                    names = Arc::new(registry.snapshot());
                }
                let name = &names[source as usize];
                read_counters(name, &lines);
                let mut end = None;
                for line in lines {
                    let pos = Position {
                        source,
                        offset: line.offset,
                    };
                    open.records += 1;
                    total_records += 1;
                    match line.decoded {
                        Ok(event) => {
                            let wm = if clock == Millis::MIN {
                                Millis::MIN
                            } else {
                                clock.saturating_sub(rules.lateness)
                            };
                            clock = clock.max(event.ts);
                            let raw: Arc<str> = String::from_utf8(line.raw)
                                .expect("decoded records are UTF-8")
                                .into();
                            open.staged.push(name, pos, wm, Arc::clone(&raw));
                            open.decoded += 1;
                            if !alerts.is_empty() {
                                if let Some(a) = alert_of(alerts, &event, pos) {
                                    open.alerts.push(a);
                                }
                            }
                            pending.push(Record {
                                event: Box::new(event),
                                pos,
                                wm,
                                raw,
                            });
                            if pending.len() >= 1024 {
                                df.send(epoch, std::mem::take(&mut pending));
                            }
                        }
                        Err(reason) => open.line_dead.push((pos, reason, line.raw)),
                    }
                    end = Some(line.end);
                }
                if let Some(end) = end {
                    positions.insert(name.clone(), end);
                }
                if let Some(c) = checkpoint {
                    checkpoints.insert(name.clone(), c);
                }
                // A busy channel never times out: the time limit is checked here too.
                close = open.records >= max_events as u64 || Instant::now() >= deadline;
            }
            Ok(SourceMsg::Eof) => {
                eofs += 1;
                if eofs == sources.inputs && cfg.until_eof {
                    close = true;
                    done = true;
                }
            }
            Ok(SourceMsg::Failed(e)) => {
                failure = Some(e.into());
                break;
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                close = true;
                deadline = Instant::now() + max_duration;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                if cfg.until_eof {
                    close = true;
                    done = true;
                } else {
                    // Nothing more will come; wait for a stop.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        if close && open.records > 0 {
            df.send(epoch, std::mem::take(&mut pending));
            df.close(epoch, clock);
            let closed = std::mem::replace(&mut open, Open::new(epoch + 1, clock));
            let permits = permits_for(closed.records);
            let _ = meta_tx.send(closed.into_meta(
                epoch,
                clock,
                (positions.clone(), checkpoints.clone()),
                &names,
            ));
            metrics::gauge!(crate::metrics::EPOCHS_PENDING).increment(1.0);
            committed_epochs += 1;
            epoch += 1;
            deadline = Instant::now() + max_duration;
            // The committer hands them back as it commits; it is gone if they fail.
            if (0..permits).any(|_| permit_tx.send(()).is_err()) {
                break;
            }
        }
        if done {
            break;
        }
    }
    // Graceful end: close what is open, drain, commit.
    if open.records > 0 && failure.is_none() && !committer.is_finished() {
        df.send(epoch, std::mem::take(&mut pending));
        df.close(epoch, clock);
        let _ = meta_tx.send(open.into_meta(epoch, clock, (positions, checkpoints), &names));
        metrics::gauge!(crate::metrics::EPOCHS_PENDING).increment(1.0);
        committed_epochs += 1;
        epoch += 1;
    }
    stop.store(true, Ordering::Relaxed);
    drop(permit_tx);
    // Metas first: the committer takes outputs ending before them for a failure.
    drop(meta_tx);
    let joined = df.join();
    let result = committer.join().expect("committer thread");
    if let Some(f) = failure {
        return Err(f);
    }
    joined.map_err(RunError::Dataflow)?;
    result?;
    Ok(RunSummary {
        skipped_epochs: skipped,
        replayed_epochs: replayed,
        committed_epochs,
        records: total_records,
        first_epoch: meta.epoch + 1,
        last_epoch: epoch - 1,
    })
}

/// Runs a process of a cluster other than the leader: its workers' share of the
/// dataflow, until the leader finishes (or the cluster breaks: the error says how).
/// It reads no input and commits nothing; the leader's replay rebuilds its state.
/// `formed` is called once the cluster has formed.
pub fn follow(
    pipeline: Arc<Pipeline>,
    workers: usize,
    cluster: &Cluster,
    formed: impl FnOnce(),
) -> Result<(), RunError> {
    let (outputs, unread) = crossbeam_channel::unbounded();
    // Only the leader's outputs are committed; a follower's workers report empty epochs.
    drop(unread);
    let mut df = Dataflow::start(pipeline, workers, 1, outputs, Some(cluster))?;
    // The partitions process 0 gives this process to read, until it closes the link.
    for (_, link) in df.take_links() {
        std::thread::Builder::new()
            .name("tally-reader-link".into())
            .spawn(move || {
                if let Err(e) = crate::source::remote::serve(link, workers) {
                    tracing::warn!(error = %e, "the reader link to process 0 broke");
                }
            })
            .expect("spawn reader link");
    }
    formed();
    df.join().map_err(RunError::Dataflow)
}

/// An alert for `e` when it is a sale or refund at or above its threshold.
fn alert_of(
    alerts: &crate::pipeline::Alerts,
    e: &crate::model::Event,
    pos: Position,
) -> Option<Alert> {
    use crate::model::Kind;
    let amount = e.amount?.hundredths();
    if e.kind == Kind::Void {
        return None;
    }
    let threshold = alerts.threshold(&e.provider_id, e.currency.as_str())?;
    (amount >= threshold).then(|| Alert {
        event_id: e.event_id.clone(),
        provider_id: e.provider_id.clone(),
        product_id: e.product_id.clone(),
        customer_id: e.customer_id.clone(),
        kind: e.kind,
        amount,
        currency: e.currency.as_str().to_owned(),
        ts: e.ts,
        threshold,
        epoch: 0,
        pos,
    })
}

/// The epoch being filled.
struct Open {
    staged: StagedEpoch,
    line_dead: Vec<(Position, Reason, Vec<u8>)>,
    alerts: Vec<Alert>,
    records: u64,
    decoded: u64,
}

impl Open {
    /// What the committer needs to commit this epoch.
    fn into_meta(
        mut self,
        epoch: Epoch,
        clock: Millis,
        (positions, checkpoints): (BTreeMap<String, u64>, BTreeMap<String, String>),
        names: &Arc<Vec<String>>,
    ) -> EpochMeta {
        self.staged.epoch = epoch;
        self.staged.clock = clock;
        EpochMeta {
            epoch,
            clock,
            replay: false,
            positions,
            checkpoints,
            staged: self.staged,
            line_dead: self.line_dead,
            alerts: self.alerts,
            names: Arc::clone(names),
            records: self.records,
            decoded: self.decoded,
            closed_at: Instant::now(),
        }
    }

    fn new(epoch: Epoch, clock: Millis) -> Open {
        Open {
            staged: StagedEpoch {
                epoch,
                clock,
                ..Default::default()
            },
            line_dead: Vec::new(),
            alerts: Vec::new(),
            records: 0,
            decoded: 0,
        }
    }
}

struct PendingEpoch {
    meta: Option<EpochMeta>,
    out: Vec<Out>,
    reported: usize,
}

#[allow(clippy::too_many_arguments)]
fn commit_loop(
    mut store: Box<dyn Store>,
    (mut staging, spent): (StagingLog, Spent),
    mut dead: DeadLetterFile,
    archive: &mut Archive,
    workers: usize,
    committed: Epoch,
    metas: Receiver<EpochMeta>,
    outputs: Receiver<EpochOutput>,
    permits: Receiver<()>,
    feed: Option<Arc<dyn Feed>>,
    mut observe: impl FnMut(&EpochReport),
) -> Result<(), RunError> {
    let mut pending: BTreeMap<Epoch, PendingEpoch> = BTreeMap::new();
    let mut last_clock: Option<Millis> = None;
    // Each committed epoch's facts, on their way to the lake's stager.
    let mut facts: Vec<Fact> = Vec::new();
    // The row changes' vector, emptied after each commit for the next.
    let mut changes: Vec<RowUpdate> = Vec::new();
    let mut metas_open = true;
    let mut outputs_open = true;
    // Once both channels are closed nothing more can arrive: an epoch still pending
    // then never closed (the run stopped before it), and is not committed.
    while metas_open || outputs_open {
        let fresh = || PendingEpoch {
            meta: None,
            out: Vec::new(),
            reported: 0,
        };
        // A closed channel would be ready forever: wait on the other one only.
        let (never_m, never_o) = (crossbeam_channel::never(), crossbeam_channel::never());
        let metas_now = if metas_open { &metas } else { &never_m };
        let outputs_now = if outputs_open { &outputs } else { &never_o };
        select! {
            recv(metas_now) -> m => match m {
                Ok(m) => {
                    let e = m.epoch;
                    pending.entry(e).or_insert_with(fresh).meta = Some(m);
                }
                Err(_) => metas_open = false,
            },
            recv(outputs_now) -> o => match o {
                Ok(o) => {
                    let p = pending.entry(o.epoch).or_insert_with(fresh);
                    // The first worker's vector is kept as it is: extending an empty
                    // one copied every output into fresh pages.
                    if p.out.is_empty() {
                        p.out = o.out;
                    } else {
                        p.out.extend(o.out);
                    }
                    p.reported += 1;
                }
                Err(_) => {
                    outputs_open = false;
                    // The run loop hangs up the metas before it lets the workers
                    // end, so they are all queued by now. If it has not, the workers
                    // ended on their own: they failed (the run reports why from
                    // joining them). Stop, committing nothing more.
                    while metas_open {
                        match metas.try_recv() {
                            Ok(m) => {
                                let e = m.epoch;
                                pending.entry(e).or_insert_with(fresh).meta = Some(m);
                            }
                            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                                metas_open = false
                            }
                            Err(crossbeam_channel::TryRecvError::Empty) => {
                                return Err(RunError::Dataflow("the dataflow stopped".into()));
                            }
                        }
                    }
                }
            },
            // Idle: a pass between commits all the same (see `Feed::between`).
            default(Duration::from_millis(100)) => {}
        }
        while let Some(first) = pending.first_entry() {
            let ready = first.get().meta.is_some() && first.get().reported == workers;
            if !ready {
                break;
            }
            let p = first.remove();
            let m = p.meta.expect("ready");
            // The facts leave the epoch's output in place, into a buffer kept from
            // epoch to epoch: no vector is allocated for either part.
            let mut out = p.out;
            facts.extend(
                out.extract_if(.., |o| matches!(o, Out::Fact(_)))
                    .map(|o| match o {
                        Out::Fact(f) => *f,
                        _ => unreachable!("only facts are extracted"),
                    }),
            );
            let (epoch, names) = (m.epoch, Arc::clone(&m.names));
            if m.replay || m.epoch <= committed {
                if let Some(st) = &mut archive.stager {
                    st.add(epoch, facts.drain(..), &names);
                }
                facts.clear();
                continue;
            }
            // Only the epochs the run loop read and closed took permits; replayed ones none.
            let permits_held = permits_for(m.records);
            let report = commit_epoch(
                &mut *store,
                &mut staging,
                &mut dead,
                m,
                out,
                &mut changes,
                feed.as_deref(),
            )?;
            archive.committed(&mut *store, epoch, report.clock, &mut facts, &names, false)?;
            // The log's oldest files whose epochs a restart would skip now go.
            let staged = archive.stager.as_ref().map_or(Epoch::MAX, |s| s.staged());
            if let Err(e) = staging.trim(|e, clock| spent.skips(e, clock, report.clock, staged)) {
                tracing::warn!(error = %e, path = %staging.path().display(), "trimming the staging log failed; tried again after the next commit");
            }
            last_clock = Some(report.clock);
            record(&report);
            for _ in 0..permits_held {
                let _ = permits.try_recv();
            }
            observe(&report);
        }
        if let Some(f) = &feed {
            f.between(&mut *store);
        }
    }
    // Stage what is buffered, and compact the days closed by now.
    if let Some(clock) = last_clock {
        archive.committed(&mut *store, 0, clock, &mut Vec::new(), &[], true)?;
    } else if let Some(st) = &mut archive.stager {
        if let Err(e) = st.flush() {
            tracing::warn!(error = %e, "staging to the lake failed at shutdown; the next start stages it again");
        }
    }
    Ok(())
}

/// The committer's side of the lake: staging, and the compaction schedule.
struct Archive {
    stager: Option<crate::archive::stage::Stager>,
    scheduler: Option<crate::archive::schedule::Scheduler>,
}

impl Archive {
    /// After epoch `epoch` committed: stage its facts, flush when due (or `now`), and
    /// hand the days that closed by `clock` to the compactor with the store as it is.
    fn committed(
        &mut self,
        store: &mut dyn Store,
        epoch: Epoch,
        clock: Millis,
        facts: &mut Vec<Fact>,
        names: &[String],
        now: bool,
    ) -> Result<(), RunError> {
        let Some(st) = &mut self.stager else {
            facts.clear();
            return Ok(());
        };
        st.add(epoch, facts.drain(..), names);
        let due = self
            .scheduler
            .as_ref()
            .map(|s| s.due(clock))
            .unwrap_or_default();
        if !now && !st.due(clock) && due.is_empty() {
            return Ok(());
        }
        match st.flush() {
            Ok(dates) => {
                if let Some(s) = &mut self.scheduler {
                    s.staged(dates);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "staging to the lake failed; kept, tried again at the next flush");
                return Ok(());
            }
        }
        let Some(sched) = &mut self.scheduler else {
            return Ok(());
        };
        let due = sched.due(clock);
        if due.is_empty() {
            return Ok(());
        }
        // Everything committed is staged now: the store's rows and the staging files
        // listed here describe the same epoch. Only the rows of the due days' windows
        // are copied for the compactor (it reads no others).
        let span = crate::archive::compact::days_span(&due)
            .expect("the scheduler's dates are formatted dates")
            .expect("due is not empty");
        let rows = Arc::new(store.rows_starting(span)?);
        for date in due {
            match crate::archive::compact::staging_files(st.lake(), &date) {
                Ok(files) => sched.submit(date, files, Arc::clone(&rows)),
                Err(e) => {
                    tracing::warn!(%date, error = %e, "listing the day's staging failed; compaction tried again later")
                }
            }
        }
        Ok(())
    }
}

fn commit_epoch(
    store: &mut dyn Store,
    staging: &mut StagingLog,
    dead: &mut DeadLetterFile,
    m: EpochMeta,
    out: Vec<Out>,
    spare: &mut Vec<RowUpdate>,
    feed: Option<&dyn Feed>,
) -> Result<EpochReport, RunError> {
    let mut counters = Counters {
        records: m.records,
        ..Counters::default()
    };
    // Sized once, in the vector of the epoch before: an epoch of 100,000 records
    // changes about 86,000 rows. Grown by doubling, it copied them into fresh pages
    // (6% of the committer's samples at 10M events, session 14); allocated anew each
    // epoch, it was still written into freshly faulted pages (6.5%, session 15).
    let mut changes = std::mem::take(spare);
    changes.clear();
    changes.reserve(out.iter().filter(|o| matches!(o, Out::Row(_))).count());
    let mut letters: Vec<DeadLetter> = Vec::new();
    let mut rejected_decoded = 0u64;
    for o in out {
        match o {
            Out::Row(u) => changes.push(*u),
            Out::Dead(d) => {
                if matches!(d.reason, Reason::Late | Reason::ConflictingDuplicate) {
                    rejected_decoded += 1;
                }
                letters.push(*d);
            }
            Out::Orphan { provider } => {
                *counters.orphans_by_provider.entry(provider).or_default() += 1
            }
            Out::Duplicate => {
                counters.duplicates += 1;
                rejected_decoded += 1;
            }
            // Split off by the commit loop.
            Out::Fact(_) => {}
        }
    }
    counters.accepted = m.decoded.saturating_sub(rejected_decoded);
    let staging_len = staging.append(&m.staged).map_err(|source| RunError::Io {
        what: "staging log",
        path: staging.path().display().to_string(),
        source,
    })?;
    let mut lines: Vec<(Position, String)> = Vec::with_capacity(letters.len() + m.line_dead.len());
    for (pos, reason, raw) in &m.line_dead {
        *counters
            .dead_letters
            .entry(reason.code().to_owned())
            .or_default() += 1;
        lines.push((
            *pos,
            dead_letter_line(*reason, m.epoch, &m.names, *pos, None, raw),
        ));
    }
    for d in &letters {
        *counters
            .dead_letters
            .entry(d.reason.code().to_owned())
            .or_default() += 1;
        if d.reason == Reason::Late {
            *counters
                .late_by_provider
                .entry(d.provider.clone())
                .or_default() += 1;
        }
        lines.push((
            d.pos,
            dead_letter_line(
                d.reason,
                m.epoch,
                &m.names,
                d.pos,
                Some(&d.provider),
                d.raw.as_bytes(),
            ),
        ));
    }
    lines.sort();
    let dead_letters_len =
        dead.append(lines.iter().map(|(_, l)| l.as_str()))
            .map_err(|source| RunError::Io {
                what: "dead letters",
                path: dead.path.display().to_string(),
                source,
            })?;
    let mut commit = Commit {
        epoch: m.epoch,
        clock: m.clock,
        positions: m.positions,
        checkpoints: m.checkpoints,
        staging_len,
        dead_letters_len,
        counters,
        changes,
    };
    let (epoch, clock, rows_changed, counters) = (
        commit.epoch,
        commit.clock,
        commit.changes.len(),
        commit.counters.clone(),
    );
    let store_started = Instant::now();
    if let Some(f) = feed {
        f.committing(commit.epoch, m.closed_at);
    }
    commit_with_retry(store, &commit, m.closed_at, feed)?;
    let store_latency = store_started.elapsed();
    if let Some(f) = feed {
        let dead_at: std::collections::HashSet<Position> = letters.iter().map(|d| d.pos).collect();
        let alerts: Vec<Alert> = m
            .alerts
            .iter()
            .filter(|a| !dead_at.contains(&a.pos))
            .map(|a| Alert {
                epoch: commit.epoch,
                ..a.clone()
            })
            .collect();
        let dead: Vec<(String, u64, &'static str)> = m
            .line_dead
            .iter()
            .map(|(pos, reason, _)| (*pos, *reason))
            .chain(letters.iter().map(|d| (d.pos, d.reason)))
            .map(|(pos, reason)| {
                let name = m
                    .names
                    .get(pos.source as usize)
                    .cloned()
                    .unwrap_or_default();
                (name, pos.offset, reason.code())
            })
            .collect();
        f.committed(&commit, &dead, &alerts);
    }
    *spare = std::mem::take(&mut commit.changes);
    spare.clear();
    Ok(EpochReport {
        store_latency,
        positions: commit.positions,
        epoch,
        clock,
        rows_changed,
        counters,
        commit_latency: m.closed_at.elapsed(),
    })
}

/// Commits, retrying with backoff while the store is unavailable. Meanwhile no permit
/// comes back, so reading stops after [`IN_FLIGHT_RECORDS`]: backpressure reaches the
/// sources, and nothing is lost or read twice.
fn commit_with_retry(
    store: &mut dyn Store,
    commit: &Commit,
    closed_at: Instant,
    feed: Option<&dyn Feed>,
) -> Result<(), StoreError> {
    use crate::metrics as m;
    let mut pause = Duration::from_millis(100);
    let mut outage: Option<Instant> = None;
    loop {
        metrics::gauge!(m::COMMIT_LAG).set(closed_at.elapsed().as_secs_f64());
        match store.commit(commit) {
            Ok(()) => {
                if let Some(t) = outage {
                    metrics::gauge!(m::STORE_UP).set(1.0);
                    if let Some(f) = feed {
                        f.store_up(true);
                    }
                    metrics::histogram!(m::STORE_OUTAGE_SECONDS).record(t.elapsed().as_secs_f64());
                    tracing::warn!(
                        epoch = commit.epoch,
                        outage_ms = t.elapsed().as_millis() as u64,
                        "store reachable again; pending epochs commit now"
                    );
                }
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                metrics::counter!(m::STORE_ERRORS, "kind" => "unavailable").increment(1);
                if outage.is_none() {
                    metrics::gauge!(m::STORE_UP).set(0.0);
                    if let Some(f) = feed {
                        f.store_up(false);
                    }
                    tracing::error!(epoch = commit.epoch, error = %e, "store unavailable; commits paused, reading stops once {IN_FLIGHT_RECORDS} records or {IN_FLIGHT_EPOCHS} epochs wait");
                    outage = Some(Instant::now());
                } else {
                    tracing::debug!(epoch = commit.epoch, error = %e, "store still unavailable");
                }
                // The lag gauge keeps moving while the commit waits.
                let until = Instant::now() + pause;
                while Instant::now() < until {
                    std::thread::sleep(
                        Duration::from_millis(100)
                            .min(until.saturating_duration_since(Instant::now())),
                    );
                    metrics::gauge!(m::COMMIT_LAG).set(closed_at.elapsed().as_secs_f64());
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                metrics::counter!(m::STORE_ERRORS, "kind" => "refused").increment(1);
                return Err(e);
            }
        }
    }
}

/// Counts records and bytes as a source hands them over (per batch).
fn read_counters(name: &str, lines: &[crate::source::Line]) {
    use crate::metrics as m;
    if lines.is_empty() {
        return;
    }
    let bytes: usize = lines.iter().map(|l| l.raw.len()).sum();
    metrics::counter!(m::SOURCE_RECORDS, "source" => name.to_owned()).increment(lines.len() as u64);
    metrics::counter!(m::SOURCE_BYTES, "source" => name.to_owned()).increment(bytes as u64);
}

/// Counts a committed epoch in the metrics.
fn record(r: &EpochReport) {
    use crate::metrics as m;
    metrics::gauge!(m::EPOCHS_PENDING).decrement(1.0);
    metrics::counter!(m::EPOCHS_COMMITTED).increment(1);
    metrics::gauge!(m::LAST_EPOCH).set(r.epoch as f64);
    metrics::counter!(m::RECORDS).increment(r.counters.records);
    metrics::counter!(m::ACCEPTED).increment(r.counters.accepted);
    metrics::counter!(m::DUPLICATES).increment(r.counters.duplicates);
    for (reason, n) in &r.counters.dead_letters {
        metrics::counter!(m::DEAD_LETTERS, "reason" => reason.clone()).increment(*n);
    }
    metrics::histogram!(m::COMMIT_SECONDS).record(r.commit_latency.as_secs_f64());
    metrics::histogram!(m::STORE_COMMIT_SECONDS).record(r.store_latency.as_secs_f64());
    metrics::gauge!(m::COMMIT_LAG).set(0.0);
    if r.clock != Millis::MIN {
        metrics::gauge!(m::EVENT_TIME).set(r.clock as f64 / 1000.0);
        let now = chrono::Utc::now().timestamp_millis();
        metrics::gauge!(m::FRESHNESS).set(now.saturating_sub(r.clock) as f64 / 1000.0);
    }
    // Bytes not yet committed, for inputs that are files (stdin and generated input
    // have no size). Kept last: a scraper that sees a file's lag reach 0 sees every
    // metric of the epoch that read its end.
    for (name, offset) in &r.positions {
        if let Ok(md) = std::fs::metadata(name) {
            if md.is_file() {
                metrics::gauge!(m::SOURCE_LAG_BYTES, "source" => name.clone())
                    .set(md.len().saturating_sub(*offset) as f64);
            }
        }
    }
}

/// One dead letter as a JSON line: reason, epoch, source name and offset, provider when
/// known, and the raw record (base64 with `raw_base64: true` when it is not UTF-8).
fn dead_letter_line(
    reason: Reason,
    epoch: Epoch,
    names: &[String],
    pos: Position,
    provider: Option<&str>,
    raw: &[u8],
) -> String {
    let source = names.get(pos.source as usize).map_or("", String::as_str);
    let mut v = serde_json::json!({
        "reason": reason.code(),
        "epoch": epoch,
        "source": source,
        "offset": pos.offset,
    });
    let o = v.as_object_mut().expect("object");
    if let Some(p) = provider {
        o.insert("provider_id".into(), p.into());
    }
    match std::str::from_utf8(raw) {
        Ok(s) => {
            o.insert("raw".into(), s.into());
        }
        Err(_) => {
            o.insert(
                "raw".into(),
                base64::engine::general_purpose::STANDARD.encode(raw).into(),
            );
            o.insert("raw_base64".into(), true.into());
        }
    }
    v.to_string()
}

/// The dead-letter file: JSON Lines, appended per committed epoch.
struct DeadLetterFile {
    path: PathBuf,
    file: File,
    len: u64,
}

impl DeadLetterFile {
    /// Opens the file and cuts it back to the committed length.
    fn open(path: &Path, committed_len: u64) -> std::io::Result<DeadLetterFile> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .append(true)
            .open(path)?;
        let len = file.metadata()?.len();
        if len < committed_len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("shorter ({len} bytes) than committed ({committed_len})"),
            ));
        }
        file.set_len(committed_len)?;
        Ok(DeadLetterFile {
            path: path.to_owned(),
            file,
            len: committed_len,
        })
    }

    fn append<'a>(&mut self, lines: impl Iterator<Item = &'a str>) -> std::io::Result<u64> {
        let mut buf = String::new();
        for l in lines {
            buf.push_str(l);
            buf.push('\n');
        }
        if buf.is_empty() {
            return Ok(self.len);
        }
        if let Err(e) = self
            .file
            .write_all(buf.as_bytes())
            .and_then(|()| self.file.sync_data())
        {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += buf.len() as u64;
        Ok(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_holds_permits_by_its_records() {
        assert_eq!(permits_for(0), 1);
        assert_eq!(permits_for(1), 1);
        assert_eq!(permits_for(PERMIT_RECORDS), 1);
        assert_eq!(permits_for(PERMIT_RECORDS + 1), 2);
        // Epochs cut by time under load (about 50,000 records): ten may wait.
        assert_eq!(IN_FLIGHT_EPOCHS / permits_for(50_000), 10);
        // Larger than the whole budget: it takes every permit, and goes through alone.
        assert_eq!(permits_for(IN_FLIGHT_RECORDS * 3), IN_FLIGHT_EPOCHS);
    }
}
