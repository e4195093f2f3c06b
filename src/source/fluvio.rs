//! The Fluvio source: every partition of a topic, each one a source of its own.
//!
//! Names and positions. Partition `p` of topic `T` is the source `fluvio:T/p`; its
//! position is the next offset to read (the record at offset `n` ends at `n + 1`), a
//! number committed with the aggregates like a file's byte offset, so a restart
//! resumes exactly there. A partition with nothing committed yet starts where the
//! deployment started: `beginning`, an absolute `offset`, or `end`. `end` is fixed at
//! the first start as each partition's end offset, checkpointed as `from:<offset>`
//! on the partition (committed with the first epoch), so records that arrive before
//! a partition's first commit are still read after a restart.
//!
//! Reading. One task per partition on a tokio runtime of `--workers` threads (in a
//! cluster, spread over the processes: [`super::remote`]). Each fetch streams from
//! the next offset to the partition's current end (`disable_continuous`); a fetch that
//! ends with nothing new means the partition is caught up (idle), and the task asks
//! again every `poll_interval`. Connection and fetch failures back off (doubling,
//! 0.2 s to 10 s, jittered), reconnect, and resume from the last record read. A task
//! reads at most `merge::READ_AHEAD` batches ahead of the merge, which orders the
//! partitions' records by event time (see [`super::merge`]). The records behind each
//! partition's end are the `tally_source_lag_records` gauge, read from the cluster's
//! partition status every few seconds.
//!
//! End of input (`run --until-eof`): once every partition has been read to its end.
//! Redelivery: a restart between reading and committing reads records again; event-id
//! dedup counts them once.

use super::merge::{jitter, merge, Known, Partitions, Report, State, READ_AHEAD};
use super::{decode, Line, Names, Resume, SourceError, SourceMsg};
use crossbeam_channel::Sender;
use fluvio::consumer::{ConsumerConfigExtBuilder, OffsetManagementStrategy};
use fluvio::metadata::partition::PartitionSpec;
use fluvio::metadata::topic::TopicSpec;
use fluvio::{Fluvio, FluvioConfig, Offset};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Records per batch handed to the merge.
const BATCH: usize = 1024;
/// How often the lag per partition is read from the cluster.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Where a partition with nothing committed starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FluvioStart {
    Beginning,
    /// The partition's end at the deployment's first start.
    End,
    /// This absolute offset, in every partition.
    Offset(u64),
}

impl std::str::FromStr for FluvioStart {
    type Err = String;

    /// `beginning`, `end`, or an offset.
    fn from_str(s: &str) -> Result<FluvioStart, String> {
        match s {
            "beginning" => Ok(FluvioStart::Beginning),
            "end" => Ok(FluvioStart::End),
            _ => s
                .parse()
                .map(FluvioStart::Offset)
                .map_err(|_| format!("'{s}' is not beginning, end or an offset")),
        }
    }
}

/// A Fluvio topic to read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FluvioSpec {
    pub topic: String,
    pub start: FluvioStart,
    /// The cluster's SC address (`host:port`); default: the current Fluvio profile
    /// (`~/.fluvio/config`).
    pub endpoint: Option<String>,
    /// How long a caught-up partition waits before asking again.
    pub poll_interval: Duration,
}

impl FluvioSpec {
    pub fn new(topic: &str) -> FluvioSpec {
        FluvioSpec {
            topic: topic.to_owned(),
            start: FluvioStart::Beginning,
            endpoint: None,
            poll_interval: Duration::from_millis(250),
        }
    }

    /// The topic's own source name.
    pub fn source_name(&self) -> String {
        format!("fluvio:{}", self.topic)
    }

    pub fn partition_name(&self, p: u32) -> String {
        format!("fluvio:{}/{p}", self.topic)
    }
}

/// One partition to read on another process of a cluster ([`super::remote`]).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct PartitionWork {
    spec: FluvioSpec,
    partition: u32,
    /// The next offset to read.
    offset: u64,
}

impl PartitionWork {
    pub(super) fn name(&self) -> String {
        self.spec.partition_name(self.partition)
    }

    /// Reads the partition here, over this process's own connection to the Fluvio
    /// cluster process 0 reads (its SC address as process 0 was given it), until
    /// `stop`.
    pub(super) async fn read(
        self,
        report: tokio::sync::mpsc::UnboundedSender<Report>,
        permits: Arc<tokio::sync::Semaphore>,
        stop: Arc<AtomicBool>,
    ) {
        let fluvio = loop {
            match connect(self.spec.endpoint.as_deref()).await {
                Ok(f) => break f,
                Err(e) => {
                    tracing::warn!(topic = %self.spec.topic, error = %e, "connecting failed; retrying");
                    if !super::merge::pause(BACKOFF_MAX, &|| stop.load(Ordering::Relaxed)).await {
                        return;
                    }
                }
            }
        };
        // Nothing is sent here: the reports go to process 0. Held open while reading
        // (a closed channel stops the reader).
        let (tx, _held) = tokio::sync::mpsc::channel(1);
        let ctx = Arc::new(Ctx {
            spec: self.spec,
            fluvio: Arc::new(fluvio),
            names: Names::default(),
            stop,
            tx,
            remote: None,
        });
        let next = Arc::new(AtomicU64::new(self.offset));
        read_partition(ctx, self.partition, next, report, permits).await;
    }
}

/// Connects to the cluster `endpoint` names (or the current profile's).
pub async fn connect(endpoint: Option<&str>) -> Result<Fluvio, String> {
    crate::install_crypto();
    let r = match endpoint {
        Some(addr) => Fluvio::connect_with_config(&FluvioConfig::new(addr)).await,
        None => Fluvio::connect().await,
    };
    r.map_err(|e| {
        format!(
            "connecting to {}: {e:#}",
            endpoint.unwrap_or("the cluster of the current Fluvio profile")
        )
    })
}

/// The topic's partition count; a clear error when it does not exist.
pub async fn partitions(fluvio: &Fluvio, topic: &str) -> Result<u32, String> {
    let admin = fluvio.admin().await;
    let topics = admin
        .list::<TopicSpec, String>(vec![topic.to_owned()])
        .await
        .map_err(|e| format!("listing topics: {e:#}"))?;
    let t = topics
        .into_iter()
        .find(|t| t.name == topic)
        .ok_or_else(|| "no such topic (create it, or check --fluvio-endpoint)".to_owned())?;
    Ok(t.spec.partitions())
}

pub struct Reader {
    spec: FluvioSpec,
    rt: tokio::runtime::Runtime,
    fluvio: Arc<Fluvio>,
    names: Names,
    /// Per partition: where it resumes, and whether that is only a start checkpoint.
    from: BTreeMap<u32, (u64, bool)>,
    /// The cluster's other processes, which read some of the partitions.
    remote: Option<Arc<super::remote::Remote>>,
}

impl Reader {
    /// Connects and checks the topic: a missing topic or a refused connection fails here.
    pub(crate) fn open(
        spec: &FluvioSpec,
        resume: &Resume,
        names: Names,
        remote: Option<Arc<super::remote::Remote>>,
        threads: usize,
    ) -> Result<Reader, SourceError> {
        let fail = |reason: String| SourceError::Fluvio {
            topic: spec.topic.clone(),
            reason,
        };
        let rt = super::merge::runtime("tally-fluvio", threads)
            .map_err(|e| fail(format!("starting its runtime: {e}")))?;
        let fluvio = rt
            .block_on(connect(spec.endpoint.as_deref()))
            .map_err(fail)?;
        let n = rt
            .block_on(partitions(&fluvio, &spec.topic))
            .map_err(fail)?;
        let ends = if spec.start == FluvioStart::End {
            rt.block_on(ends(&fluvio, &spec.topic)).map_err(fail)?
        } else {
            BTreeMap::new()
        };
        let mut from = BTreeMap::new();
        for p in 0..n {
            let name = spec.partition_name(p);
            let at = match (resume.positions.get(&name), resume.checkpoints.get(&name)) {
                (Some(pos), _) => (*pos, false),
                (None, Some(c)) => {
                    let o = c.strip_prefix("from:").and_then(|o| o.parse().ok()).ok_or_else(|| {
                        fail(format!(
                            "partition {p}: the committed checkpoint '{c}' is not one this version writes"
                        ))
                    })?;
                    (o, true)
                }
                (None, None) => match spec.start {
                    FluvioStart::Beginning => (0, true),
                    FluvioStart::Offset(o) => (o, true),
                    FluvioStart::End => (ends.get(&p).copied().unwrap_or(0), true),
                },
            };
            from.insert(p, at);
        }
        Ok(Reader {
            spec: spec.clone(),
            rt,
            fluvio: Arc::new(fluvio),
            names,
            from,
            remote,
        })
    }

    /// Reads every partition until `stop`, sending lines as the partitions' sources,
    /// the end of input once every partition is caught up, and
    /// [`SourceMsg::Failed`] when the topic cannot be read any more.
    pub(crate) fn read(self, tx: &Sender<SourceMsg>, stop: &Arc<AtomicBool>) {
        let (atx, arx) = tokio::sync::mpsc::channel::<SourceMsg>(16);
        let Reader {
            spec,
            rt,
            fluvio,
            names,
            from,
            remote,
        } = self;
        // Each partition's start, committed with the first epoch.
        for (p, (offset, start)) in &from {
            if *start {
                let m = SourceMsg::Lines {
                    source: names.index(&spec.partition_name(*p)),
                    lines: Vec::new(),
                    checkpoint: Some(format!("from:{offset}")),
                };
                if tx.send(m).is_err() {
                    return;
                }
            }
        }
        let ctx = Arc::new(Ctx {
            spec,
            fluvio,
            names,
            stop: Arc::clone(stop),
            tx: atx,
            remote,
        });
        rt.spawn(coordinate(ctx, from));
        super::merge::forward(rt, arx, tx, stop);
    }
}

/// Each partition's end offset (the next offset to be written).
async fn ends(fluvio: &Fluvio, topic: &str) -> Result<BTreeMap<u32, u64>, String> {
    let admin = fluvio.admin().await;
    let parts = admin
        .list::<PartitionSpec, String>(vec![])
        .await
        .map_err(|e| format!("listing partitions: {e:#}"))?;
    let prefix = format!("{topic}-");
    Ok(parts
        .into_iter()
        .filter_map(|p| {
            let n: u32 = p.name.strip_prefix(&prefix)?.parse().ok()?;
            Some((n, p.status.leader.leo.max(0) as u64))
        })
        .collect())
}

struct Ctx {
    spec: FluvioSpec,
    fluvio: Arc<Fluvio>,
    names: Names,
    stop: Arc<AtomicBool>,
    tx: tokio::sync::mpsc::Sender<SourceMsg>,
    remote: Option<Arc<super::remote::Remote>>,
}

impl Partitions for Ctx {
    fn tx(&self) -> &tokio::sync::mpsc::Sender<SourceMsg> {
        &self.tx
    }
    fn source(&self, p: &str) -> u32 {
        self.names.index(&format!("fluvio:{}/{p}", self.spec.topic))
    }
    fn checkpoint(&self, _: &str) -> Option<String> {
        None
    }
    fn ended(&self) -> Option<String> {
        None
    }
}

impl Ctx {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.tx.is_closed()
    }

    /// Sleeps `d`, waking early when the run stops; false if it did.
    async fn pause(&self, d: Duration) -> bool {
        super::merge::pause(d, &|| self.stopped()).await
    }

    async fn fail(&self, reason: String) {
        let _ = self
            .tx
            .send(SourceMsg::Failed(SourceError::Fluvio {
                topic: self.spec.topic.clone(),
                reason,
            }))
            .await;
    }
}

/// Starts a task per partition and merges what they read by event time; sends the
/// end of input once every partition is caught up; reads the lag every few seconds.
async fn coordinate(ctx: Arc<Ctx>, from: BTreeMap<u32, (u64, bool)>) {
    let (rtx, mut rrx) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let mut known: BTreeMap<String, Known> = BTreeMap::new();
    let mut next: BTreeMap<u32, Arc<AtomicU64>> = BTreeMap::new();
    for (p, (offset, _)) in from {
        let permits = Arc::new(tokio::sync::Semaphore::new(READ_AHEAD));
        known.insert(
            p.to_string(),
            Known {
                parents: Vec::new(),
                state: State::Reading,
                queue: Default::default(),
                idle: false,
                permits: Arc::clone(&permits),
            },
        );
        let at = Arc::new(AtomicU64::new(offset));
        next.insert(p, Arc::clone(&at));
        match ctx.remote.as_ref().and_then(|r| Some((r, r.place()?))) {
            Some((remote, link)) => {
                let work = PartitionWork {
                    spec: ctx.spec.clone(),
                    partition: p,
                    offset,
                };
                let work = super::remote::Work::Fluvio(work);
                remote.start_on(link, work, p.to_string(), rtx.clone(), permits, Some(at));
            }
            None => {
                tokio::spawn(read_partition(
                    Arc::clone(&ctx),
                    p,
                    at,
                    rtx.clone(),
                    permits,
                ));
            }
        }
    }
    tokio::spawn(watch_lag(Arc::clone(&ctx), next));
    let mut eof_sent = false;
    while !ctx.stopped() {
        if merge(&*ctx, &mut known).await.is_err() {
            return;
        }
        if !eof_sent && known.values().all(|k| k.idle && k.queue.is_empty()) {
            eof_sent = true;
            if ctx.tx.send(SourceMsg::Eof).await.is_err() {
                return;
            }
        }
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(200), rrx.recv()).await {
            if let Some(why) = super::merge::note(&mut known, r) {
                return ctx.fail(why).await;
            }
        }
    }
}

/// What one fetch did.
enum Fetched {
    /// Read to the partition's end; whether anything was new.
    CaughtUp(bool),
    /// The merge or the run has gone.
    Gone,
}

/// Reads one partition from `next` until the run stops.
async fn read_partition(
    ctx: Arc<Ctx>,
    p: u32,
    next: Arc<AtomicU64>,
    report: tokio::sync::mpsc::UnboundedSender<Report>,
    permits: Arc<tokio::sync::Semaphore>,
) {
    let id = p.to_string();
    let name = ctx.spec.partition_name(p);
    let mut backoff = BACKOFF_MIN;
    let mut fluvio = Arc::clone(&ctx.fluvio);
    let mut caught_up = false;
    while !ctx.stopped() {
        match fetch(&ctx, &fluvio, p, &id, &next, &report, &permits).await {
            Ok(Fetched::Gone) => return,
            Ok(Fetched::CaughtUp(new)) => {
                backoff = BACKOFF_MIN;
                if new {
                    caught_up = false;
                }
                if !caught_up {
                    caught_up = true;
                    if report.send(Report::Idle(id.clone())).is_err() {
                        return;
                    }
                }
                if !ctx.pause(ctx.spec.poll_interval).await {
                    return;
                }
            }
            Err(why) => {
                tracing::warn!(topic = %ctx.spec.topic, partition = p, source = %name, error = %why, "reading failed; reconnecting");
                if !ctx.pause(jitter(backoff)).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                match connect(ctx.spec.endpoint.as_deref()).await {
                    Ok(f) => fluvio = Arc::new(f),
                    Err(e) => {
                        tracing::warn!(topic = %ctx.spec.topic, error = %e, "reconnecting failed; retrying")
                    }
                }
            }
        }
    }
}

/// Streams partition `p` from `next` to its current end, in batches to the merge.
async fn fetch(
    ctx: &Ctx,
    fluvio: &Fluvio,
    p: u32,
    id: &str,
    next: &AtomicU64,
    report: &tokio::sync::mpsc::UnboundedSender<Report>,
    permits: &tokio::sync::Semaphore,
) -> Result<Fetched, String> {
    let from = next.load(Ordering::Relaxed);
    let offset = Offset::absolute(from as i64).map_err(|e| format!("offset {from}: {e}"))?;
    let config = ConsumerConfigExtBuilder::default()
        .topic(ctx.spec.topic.clone())
        .partition(p)
        .offset_start(offset)
        .offset_strategy(OffsetManagementStrategy::None)
        .disable_continuous(true)
        .build()
        .map_err(|e| format!("consumer: {e:#}"))?;
    let mut stream = fluvio
        .consumer_with_config(config)
        .await
        .map_err(|e| format!("partition {p}: {e:#}"))?;
    let mut batch: Vec<(Line, String)> = Vec::new();
    let mut new = false;
    let send = |batch: Vec<(Line, String)>| async {
        // Read ahead of the merge by at most READ_AHEAD batches.
        let Ok(permit) = permits.acquire().await else {
            return false;
        };
        permit.forget();
        report.send(Report::Batch(id.to_owned(), batch)).is_ok()
    };
    while let Some(r) = stream.next().await {
        if ctx.stopped() {
            return Ok(Fetched::Gone);
        }
        let r = r.map_err(|e| format!("partition {p}: {e:?}"))?;
        let off = r.offset().max(0) as u64;
        if off < next.load(Ordering::Relaxed) {
            continue;
        }
        let raw = r.value().to_vec();
        let decoded = decode(&raw);
        batch.push((
            Line {
                offset: off,
                end: off + 1,
                raw,
                decoded,
            },
            String::new(),
        ));
        next.store(off + 1, Ordering::Relaxed);
        new = true;
        if batch.len() >= BATCH && !send(std::mem::take(&mut batch)).await {
            return Ok(Fetched::Gone);
        }
    }
    if !batch.is_empty() && !send(batch).await {
        return Ok(Fetched::Gone);
    }
    Ok(Fetched::CaughtUp(new))
}

/// Sets `tally_source_lag_records` per partition: its end offset minus the next
/// offset to read.
async fn watch_lag(ctx: Arc<Ctx>, next: BTreeMap<u32, Arc<AtomicU64>>) {
    use crate::metrics as m;
    while ctx.pause(LAG_EVERY).await {
        match ends(&ctx.fluvio, &ctx.spec.topic).await {
            Ok(ends) => {
                for (p, at) in &next {
                    let end = ends.get(p).copied().unwrap_or(0);
                    let lag = end.saturating_sub(at.load(Ordering::Relaxed));
                    metrics::gauge!(m::SOURCE_LAG_RECORDS, "source" => ctx.spec.partition_name(*p))
                        .set(lag as f64);
                }
            }
            Err(e) => {
                tracing::debug!(topic = %ctx.spec.topic, error = %e, "reading the lag failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_parse() {
        assert_eq!("beginning".parse(), Ok(FluvioStart::Beginning));
        assert_eq!("end".parse(), Ok(FluvioStart::End));
        assert_eq!("42".parse(), Ok(FluvioStart::Offset(42)));
        assert!("soon".parse::<FluvioStart>().is_err());
    }

    #[test]
    fn names() {
        let s = FluvioSpec::new("sales");
        assert_eq!(s.source_name(), "fluvio:sales");
        assert_eq!(s.partition_name(3), "fluvio:sales/3");
    }
}
