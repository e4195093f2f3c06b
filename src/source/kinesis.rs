//! The Kinesis source: every shard of a stream, each one a source of its own.
//!
//! Names and positions. A shard is the source `kinesis:<stream>/<shard id>`; its
//! position is the count of its records read (the record at offset `n` ends at
//! `n + 1`), which orders records inside the dataflow and continues across restarts.
//! Where a shard resumes is its checkpoint, committed with the epoch that read its
//! records: `after:<sequence number>` (decimal strings of up to 128 digits, which fit
//! no integer) or `end` once a closed shard has been read to its end. The stream
//! itself (`kinesis:<stream>`) checkpoints where this deployment started:
//! `trim_horizon` or `at:<Unix ms>` (`latest` is fixed as the instant of the first
//! start), so a shard without a checkpoint of its own (new since, or without a
//! committed record yet) starts there, at every restart alike.
//!
//! Reading. One task per shard on a tokio runtime of `--workers` threads;
//! GetRecords of up to 10,000 records, again at once while the shard is behind (at
//! most five calls a second, the service's limit per shard), every `poll_interval`
//! once caught up. In a cluster the shards' tasks are spread over the processes
//! ([`super::remote`]); the coordinator and the merge stay on process 0.
//! Throttling and transient failures back off (doubling, 0.2 s to 10 s, jittered)
//! and retry; an expired iterator is renewed from the last record read. A task reads
//! at most [`READ_AHEAD`] batches ahead of the merge.
//!
//! Merging (watermark alignment). The coordinator merges the shards' records by
//! event time: the next record out is the oldest of the shards' next records, and
//! while a shard that is not idle has nothing read, the merge waits for it. The
//! watermark is global (the largest event time read, minus the lateness): read one
//! shard ahead of another and the other's records would turn `late`. Merged, a
//! backlog comes out in one order whatever the timing of the calls. An idle shard
//! (an empty answer, nothing behind) holds nothing back; a slow or throttled one
//! holds the stream back, as it must. Lines go to the run loop through one bounded
//! channel, so a slow pipeline stops every shard (backpressure).
//!
//! Resharding. A shard is started only once its parents (the split shard, or both
//! merged ones) have been read to their end, so a key's records keep their order
//! across a split or merge; the closed parent's end makes the reader list the shards
//! again and start the children. A parent no longer listed (past the retention) is
//! taken as read.
//!
//! End of input (`run --until-eof`): once every shard is read to its end or has
//! answered empty with nothing behind. With an end instant (`--kinesis-end`), a
//! shard's first record that arrived at or after it ends the shard: it is not
//! read, and the shard is checkpointed `end` (a resumed replay reads no further).
//! Reading goes on until the run stops.
//!
//! Redelivery: the service's at-least-once reads, and a restart between reading and
//! committing, re-read records; event-id dedup counts them once.

use super::merge::{jitter, merge, Known, Partitions, Report, State, READ_AHEAD};
use super::{decode, Line, Names, Resume, SourceError, SourceMsg};
use crate::model::Millis;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::types::ShardIteratorType;
use crossbeam_channel::Sender;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Records a GetRecords call asks for (the service's maximum).
const GET_LIMIT: i32 = 10_000;
/// The least time between two GetRecords calls on a shard (five a second).
const MIN_GAP: Duration = Duration::from_millis(200);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Where a deployment without checkpoints starts reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StartAt {
    /// The oldest record kept (the default: nothing retained is left out).
    TrimHorizon,
    /// Records that arrive from the first start on.
    Latest,
    /// Records that arrived at or after this instant (AT_TIMESTAMP).
    At(Millis),
}

impl std::str::FromStr for StartAt {
    type Err = String;

    /// `trim_horizon`, `latest`, or an RFC 3339 instant.
    fn from_str(s: &str) -> Result<StartAt, String> {
        match s {
            "trim_horizon" => Ok(StartAt::TrimHorizon),
            "latest" => Ok(StartAt::Latest),
            _ => chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| StartAt::At(t.timestamp_millis()))
                .map_err(|_| format!("'{s}' is not trim_horizon, latest or an RFC 3339 instant")),
        }
    }
}

/// A Kinesis stream to read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KinesisSpec {
    /// The stream's name (not its ARN).
    pub stream: String,
    pub start: StartAt,
    /// Default: the standard AWS chain (AWS_REGION, the profile).
    pub region: Option<String>,
    /// Another endpoint than AWS's (a local server).
    pub endpoint: Option<String>,
    /// How long a caught-up shard waits before asking again.
    pub poll_interval: Duration,
    /// Read each shard only up to the records that arrived before this instant
    /// (their ApproximateArrivalTimestamp): a bounded read, for a replay of a time
    /// range. A shard read up to it counts as read to its end.
    pub end: Option<Millis>,
}

impl KinesisSpec {
    pub fn new(stream: &str) -> KinesisSpec {
        KinesisSpec {
            stream: stream.to_owned(),
            start: StartAt::TrimHorizon,
            region: None,
            endpoint: None,
            poll_interval: Duration::from_millis(250),
            end: None,
        }
    }

    /// The stream's own source name (its start is checkpointed there).
    pub fn source_name(&self) -> String {
        format!("kinesis:{}", self.stream)
    }

    fn shard_name(&self, shard: &str) -> String {
        format!("kinesis:{}/{shard}", self.stream)
    }
}

/// An SDK client: credentials from the standard AWS chain, `region` and `endpoint`
/// when given. Retries are left to the caller (`retries: false`), which backs off
/// and counts them itself.
pub async fn client(
    region: Option<&str>,
    endpoint: Option<&str>,
    retries: bool,
) -> Result<aws_sdk_kinesis::Client, String> {
    crate::install_crypto();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(10))
            .operation_attempt_timeout(Duration::from_secs(30))
            .build(),
    );
    if !retries {
        loader = loader.retry_config(aws_config::retry::RetryConfig::disabled());
    }
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r.to_owned()));
    }
    if let Some(e) = endpoint {
        loader = loader.endpoint_url(e);
    }
    let conf = loader.load().await;
    if conf.region().is_none() {
        return Err("no AWS region: set AWS_REGION (or the source's region)".into());
    }
    Ok(aws_sdk_kinesis::Client::new(&conf))
}

/// Checks that `stream` exists and can be described; the error names why not.
pub async fn check_stream(client: &aws_sdk_kinesis::Client, stream: &str) -> Result<(), String> {
    client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| match classify(&e) {
            Failure::NotFound => "it does not exist".to_owned(),
            Failure::Denied => "access denied".to_owned(),
            _ => aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string(),
        })
}

/// What a failed call means for the reader.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// Over the shard's or the account's rate: back off, retry.
    Throttled,
    /// The network, a timeout, or a 5xx: back off, retry.
    Transient,
    /// The shard iterator is too old: get a new one.
    Expired,
    NotFound,
    Denied,
    /// Retrying does not help.
    Fatal,
}

fn classify<E, R>(e: &SdkError<E, R>) -> Failure
where
    E: ProvideErrorMetadata,
{
    match e {
        SdkError::ServiceError(_) => match e.code() {
            Some(
                "ProvisionedThroughputExceededException"
                | "LimitExceededException"
                | "KMSThrottlingException"
                | "ThrottlingException",
            ) => Failure::Throttled,
            Some("ExpiredIteratorException") => Failure::Expired,
            Some("ResourceNotFoundException") => Failure::NotFound,
            Some("AccessDeniedException" | "KMSAccessDeniedException") => Failure::Denied,
            Some("InternalFailureException" | "ServiceUnavailable" | "InternalFailure") => {
                Failure::Transient
            }
            _ => Failure::Fatal,
        },
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Failure::Transient
        }
        _ => Failure::Fatal,
    }
}

/// Where a deployment starts reading (`latest` is fixed as an instant), committed as
/// the stream's own checkpoint: also where a shard without a checkpoint starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Origin {
    TrimHorizon,
    At(Millis),
}

impl Origin {
    /// As a checkpoint: `trim_horizon` or `at:<ms>`.
    fn checkpoint(self) -> String {
        match self {
            Origin::TrimHorizon => "trim_horizon".into(),
            Origin::At(ms) => format!("at:{ms}"),
        }
    }

    fn parse(s: &str) -> Option<Origin> {
        match s {
            "trim_horizon" => Some(Origin::TrimHorizon),
            _ => s.strip_prefix("at:")?.parse().ok().map(Origin::At),
        }
    }
}

/// Where a shard's reading starts: the deployment's origin, or after a record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum From {
    Origin(Origin),
    After(String),
}

/// One shard to read on another process of a cluster ([`super::remote`]).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct ShardWork {
    spec: KinesisSpec,
    shard: String,
    from: From,
    /// Its records committed so far: the next record's offset.
    count: u64,
}

impl ShardWork {
    pub(super) fn name(&self) -> String {
        self.spec.shard_name(&self.shard)
    }

    /// Reads the shard here with a client of this process's own (credentials from
    /// its AWS chain; the region and endpoint as process 0 was given them), until
    /// it ends, fails or `stop`.
    pub(super) async fn read(
        self,
        report: tokio::sync::mpsc::UnboundedSender<Report>,
        permits: Arc<tokio::sync::Semaphore>,
        stop: Arc<AtomicBool>,
    ) {
        let ShardWork {
            spec,
            shard,
            from,
            count,
        } = self;
        let client = match client(spec.region.as_deref(), spec.endpoint.as_deref(), false).await {
            Ok(c) => c,
            Err(e) => {
                let _ = report.send(Report::Failed(format!("shard {shard}: {e}")));
                return;
            }
        };
        // Nothing is sent here: the reports go to process 0. Held open while reading
        // (a closed channel stops the reader).
        let (tx, _held) = tokio::sync::mpsc::channel(1);
        let ctx = Arc::new(Ctx {
            spec,
            client,
            names: Names::default(),
            start: Origin::TrimHorizon,
            stop,
            tx,
            remote: None,
        });
        read_shard(ctx, shard, from, count, report, permits).await;
    }
}

/// A stream opened for reading, ready to start.
pub struct Reader {
    spec: KinesisSpec,
    rt: tokio::runtime::Runtime,
    client: aws_sdk_kinesis::Client,
    names: Names,
    /// Where this deployment started (fixed at its first start).
    start: Origin,
    /// Committed shard checkpoints and record counts, by shard id.
    resume: BTreeMap<String, (String, u64)>,
    /// The cluster's other processes, which read some of the shards.
    remote: Option<Arc<super::remote::Remote>>,
}

impl Reader {
    /// Connects and checks the stream: a missing stream or denied access fails here.
    pub(crate) fn open(
        spec: &KinesisSpec,
        resume: &Resume,
        names: Names,
        remote: Option<Arc<super::remote::Remote>>,
        threads: usize,
    ) -> Result<Reader, SourceError> {
        let fail = |reason: String| SourceError::Kinesis {
            stream: spec.stream.clone(),
            reason,
        };
        let rt = super::merge::runtime("tally-kinesis", threads)
            .map_err(|e| fail(format!("starting its runtime: {e}")))?;
        let client = rt
            .block_on(client(
                spec.region.as_deref(),
                spec.endpoint.as_deref(),
                false,
            ))
            .map_err(fail)?;
        rt.block_on(check_stream(&client, &spec.stream))
            .map_err(fail)?;
        let stream_name = spec.source_name();
        let start = match resume.checkpoints.get(&stream_name) {
            Some(c) => {
                let origin = Origin::parse(c).ok_or_else(|| {
                    fail(format!(
                        "the committed start '{c}' is not one this version writes"
                    ))
                })?;
                let asked = match spec.start {
                    StartAt::TrimHorizon => Some(Origin::TrimHorizon),
                    StartAt::At(ms) => Some(Origin::At(ms)),
                    StartAt::Latest => None,
                };
                if asked.is_some_and(|a| a != origin) {
                    tracing::warn!(
                        stream = %spec.stream,
                        committed = %c,
                        "the stream's start was fixed at its first run; the configured start applies to new deployments only"
                    );
                }
                origin
            }
            None => match spec.start {
                StartAt::TrimHorizon => Origin::TrimHorizon,
                StartAt::At(ms) => Origin::At(ms),
                StartAt::Latest => Origin::At(chrono::Utc::now().timestamp_millis()),
            },
        };
        let prefix = format!("{stream_name}/");
        let shards = resume
            .checkpoints
            .iter()
            .filter_map(|(name, c)| {
                let shard = name.strip_prefix(&prefix)?;
                let count = resume.positions.get(name).copied().unwrap_or(0);
                Some((shard.to_owned(), (c.clone(), count)))
            })
            .collect();
        Ok(Reader {
            spec: spec.clone(),
            rt,
            client,
            names,
            start,
            resume: shards,
            remote,
        })
    }

    /// Reads every shard until `stop`, sending lines as source `idx`'s shards. Sends
    /// the stream's start checkpoint first, its end of input once caught up, and
    /// [`SourceMsg::Failed`] when the stream cannot be read any more.
    pub(crate) fn read(self, idx: u32, tx: &Sender<SourceMsg>, stop: &Arc<AtomicBool>) {
        let (atx, arx) = tokio::sync::mpsc::channel::<SourceMsg>(16);
        let start = SourceMsg::Lines {
            source: idx,
            lines: Vec::new(),
            checkpoint: Some(self.start.checkpoint()),
        };
        if tx.send(start).is_err() {
            return;
        }
        let Reader {
            spec,
            rt,
            client,
            names,
            start,
            resume,
            remote,
        } = self;
        let ctx = Arc::new(Ctx {
            spec,
            client,
            names,
            start,
            stop: Arc::clone(stop),
            tx: atx,
            remote,
        });
        rt.spawn(coordinate(ctx, resume));
        super::merge::forward(rt, arx, tx, stop);
    }
}

struct Ctx {
    spec: KinesisSpec,
    client: aws_sdk_kinesis::Client,
    names: Names,
    start: Origin,
    stop: Arc<AtomicBool>,
    tx: tokio::sync::mpsc::Sender<SourceMsg>,
    remote: Option<Arc<super::remote::Remote>>,
}

impl Partitions for Ctx {
    fn tx(&self) -> &tokio::sync::mpsc::Sender<SourceMsg> {
        &self.tx
    }
    fn source(&self, shard: &str) -> u32 {
        self.names.index(&self.spec.shard_name(shard))
    }
    fn checkpoint(&self, seq: &str) -> Option<String> {
        Some(format!("after:{seq}"))
    }
    fn ended(&self) -> Option<String> {
        Some("end".into())
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
            .send(SourceMsg::Failed(SourceError::Kinesis {
                stream: self.spec.stream.clone(),
                reason,
            }))
            .await;
    }
}

/// Lists the shards, starts each once its parents have ended, and merges what the
/// shards' tasks read into one stream by event time: the next record is always the
/// oldest head of the shards, and while a shard that is not idle has nothing read,
/// the merge waits for it (watermark alignment). So a backlog is read in one order,
/// whatever the timing of the calls, and the watermark (the largest event time
/// read, minus the lateness) does not run ahead on one shard and make another's
/// records late. Lists again when a shard ends, and sends the end of input once
/// every shard is idle or ended.
async fn coordinate(ctx: Arc<Ctx>, mut resume: BTreeMap<String, (String, u64)>) {
    let (rtx, mut rrx) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let mut known: BTreeMap<String, Known> = BTreeMap::new();
    let mut eof_sent = false;
    let mut relist = true;
    let mut backoff = BACKOFF_MIN;
    while !ctx.stopped() {
        if relist {
            match list_shards(&ctx).await {
                Ok(shards) => {
                    backoff = BACKOFF_MIN;
                    relist = false;
                    for s in shards {
                        if known.contains_key(&s.shard_id) {
                            continue;
                        }
                        let parents: Vec<String> = [s.parent_shard_id, s.adjacent_parent_shard_id]
                            .into_iter()
                            .flatten()
                            .collect();
                        let state = match resume.get(&s.shard_id) {
                            Some((c, _)) if c == "end" => State::Ended,
                            _ => State::Waiting,
                        };
                        known.insert(
                            s.shard_id,
                            Known {
                                parents,
                                state,
                                queue: Default::default(),
                                idle: false,
                                permits: Arc::new(tokio::sync::Semaphore::new(READ_AHEAD)),
                            },
                        );
                    }
                }
                Err((Failure::Throttled | Failure::Transient, why)) => {
                    tracing::warn!(stream = %ctx.spec.stream, error = %why, "listing shards failed; retrying");
                    if !ctx.pause(jitter(backoff)).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
                Err((_, why)) => return ctx.fail(format!("listing its shards: {why}")).await,
            }
        }
        // Start every waiting shard whose parents have ended (or are gone).
        let ready: Vec<String> = known
            .iter()
            .filter(|(_, k)| k.state == State::Waiting)
            .filter(|(_, k)| {
                k.parents
                    .iter()
                    .all(|p| known.get(p).is_none_or(|pk| pk.state == State::Ended))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ready {
            let (from, count) = match resume.remove(&id) {
                Some((c, count)) => match c.strip_prefix("after:") {
                    Some(seq) => (From::After(seq.to_owned()), count),
                    None => {
                        return ctx
                            .fail(format!("shard {id}: the committed checkpoint '{c}' is not one this version writes"))
                            .await
                    }
                },
                None => (From::Origin(ctx.start), 0),
            };
            let k = known.get_mut(&id).expect("known");
            k.state = State::Reading;
            tracing::debug!(stream = %ctx.spec.stream, shard = %id, ?from, "reading shard");
            let permits = Arc::clone(&k.permits);
            match ctx.remote.as_ref().and_then(|r| Some((r, r.place()?))) {
                Some((remote, link)) => {
                    let work = ShardWork {
                        spec: ctx.spec.clone(),
                        shard: id.clone(),
                        from,
                        count,
                    };
                    let work = super::remote::Work::Kinesis(work);
                    remote.start_on(link, work, id, rtx.clone(), permits, None);
                }
                None => {
                    tokio::spawn(read_shard(
                        Arc::clone(&ctx),
                        id,
                        from,
                        count,
                        rtx.clone(),
                        permits,
                    ));
                }
            }
        }
        match merge(&*ctx, &mut known).await {
            Ok(ended) => relist |= ended,
            Err(()) => return,
        }
        if !eof_sent
            && known.values().all(|k| {
                k.state == State::Ended || k.state == State::Reading && k.idle && k.queue.is_empty()
            })
        {
            eof_sent = true;
            if ctx.tx.send(SourceMsg::Eof).await.is_err() {
                return;
            }
        }
        if relist {
            continue;
        }
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(200), rrx.recv()).await {
            if let Some(why) = super::merge::note(&mut known, r) {
                return ctx.fail(why).await;
            }
        }
    }
}

async fn list_shards(ctx: &Ctx) -> Result<Vec<aws_sdk_kinesis::types::Shard>, (Failure, String)> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        // With a token the stream is not named again (the service refuses both).
        let req = match &token {
            Some(t) => ctx.client.list_shards().next_token(t),
            None => ctx.client.list_shards().stream_name(&ctx.spec.stream),
        };
        let page = req.send().await.map_err(|e| {
            (
                classify(&e),
                aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string(),
            )
        })?;
        out.extend(page.shards.unwrap_or_default());
        match page.next_token {
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

/// A shard iterator at `from`.
async fn iterator(ctx: &Ctx, shard: &str, from: &From) -> Result<String, (Failure, String)> {
    let req = ctx
        .client
        .get_shard_iterator()
        .stream_name(&ctx.spec.stream)
        .shard_id(shard);
    let req = match from {
        From::Origin(Origin::TrimHorizon) => {
            req.shard_iterator_type(ShardIteratorType::TrimHorizon)
        }
        From::Origin(Origin::At(ms)) => req
            .shard_iterator_type(ShardIteratorType::AtTimestamp)
            .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(*ms)),
        From::After(seq) => req
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(seq),
    };
    let out = req.send().await.map_err(|e| {
        (
            classify(&e),
            aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string(),
        )
    })?;
    out.shard_iterator
        .ok_or_else(|| (Failure::Fatal, "no iterator returned".to_owned()))
}

/// Reads one shard from `from` until it ends or the run stops. `count` is the number
/// of its records committed so far (the next record's offset).
async fn read_shard(
    ctx: Arc<Ctx>,
    shard: String,
    mut from: From,
    mut count: u64,
    report: tokio::sync::mpsc::UnboundedSender<Report>,
    permits: Arc<tokio::sync::Semaphore>,
) {
    use crate::metrics as m;
    let name = ctx.spec.shard_name(&shard);
    let throttled = metrics::counter!(m::SOURCE_THROTTLED, "source" => name.clone());
    let lag = metrics::gauge!(m::SOURCE_LAG_SECONDS, "source" => name.clone());
    let mut it: Option<String> = None;
    let mut backoff = BACKOFF_MIN;
    let mut last_call = Instant::now() - MIN_GAP;
    let mut caught_up = false;
    while !ctx.stopped() {
        // Retries and renewals share one backoff: a failure waits, then goes round.
        let failure = match &it {
            None => match iterator(&ctx, &shard, &from).await {
                Ok(i) => {
                    it = Some(i);
                    continue;
                }
                Err(f) => f,
            },
            Some(i) => {
                let gap = MIN_GAP.saturating_sub(last_call.elapsed());
                if !gap.is_zero() && !ctx.pause(gap).await {
                    return;
                }
                last_call = Instant::now();
                match ctx
                    .client
                    .get_records()
                    .shard_iterator(i)
                    .limit(GET_LIMIT)
                    .send()
                    .await
                {
                    Ok(out) => {
                        backoff = BACKOFF_MIN;
                        let behind = out.millis_behind_latest.unwrap_or(0);
                        lag.set(behind as f64 / 1000.0);
                        let mut records = out.records;
                        let empty = records.is_empty();
                        // With an end instant: the records that arrived before it.
                        let past_end = ctx.spec.end.and_then(|end| {
                            records.iter().position(|r| {
                                r.approximate_arrival_timestamp
                                    .and_then(|t| t.to_millis().ok())
                                    .is_some_and(|t| t >= end)
                            })
                        });
                        if let Some(cut) = past_end {
                            records.truncate(cut);
                        }
                        if let Some(last) = records.last() {
                            from = From::After(last.sequence_number.clone());
                            let lines: Vec<(Line, String)> = records
                                .into_iter()
                                .map(|r| {
                                    let raw = r.data.into_inner();
                                    let decoded = decode(&raw);
                                    count += 1;
                                    let line = Line {
                                        offset: count - 1,
                                        end: count,
                                        raw,
                                        decoded,
                                    };
                                    (line, r.sequence_number)
                                })
                                .collect();
                            // Read ahead of the merge by at most READ_AHEAD batches.
                            let Ok(permit) = permits.acquire().await else {
                                return;
                            };
                            permit.forget();
                            caught_up = false;
                            if report.send(Report::Batch(shard.clone(), lines)).is_err() {
                                return;
                            }
                        }
                        if past_end.is_some() {
                            tracing::debug!(stream = %ctx.spec.stream, %shard, "read up to the end instant");
                            lag.set(0.0);
                            let _ = report.send(Report::Ended(shard));
                            return;
                        }
                        match out.next_shard_iterator {
                            None => {
                                // Closed and read to its end: its children may start
                                // once the merge has sent what it read.
                                lag.set(0.0);
                                let _ = report.send(Report::Ended(shard));
                                return;
                            }
                            Some(next) => it = Some(next),
                        }
                        if empty && behind == 0 {
                            if !caught_up {
                                caught_up = true;
                                let _ = report.send(Report::Idle(shard.clone()));
                            }
                            if !ctx.pause(ctx.spec.poll_interval).await {
                                return;
                            }
                        }
                        continue;
                    }
                    Err(e) => (
                        classify(&e),
                        aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string(),
                    ),
                }
            }
        };
        match failure {
            (Failure::Throttled, _) => {
                throttled.increment(1);
                tracing::debug!(stream = %ctx.spec.stream, %shard, "throttled; backing off");
            }
            (Failure::Transient, why) => {
                tracing::warn!(stream = %ctx.spec.stream, %shard, error = %why, "reading failed; retrying")
            }
            (Failure::Expired, _) => {
                // A new iterator from the last record read (or the start).
                it = None;
                continue;
            }
            (Failure::NotFound, _) if it.is_none() => {
                // Gone past the retention since it was listed: nothing left to read.
                tracing::warn!(stream = %ctx.spec.stream, %shard, "shard no longer exists; taken as read");
                let _ = report.send(Report::Ended(shard));
                return;
            }
            (_, why) => {
                let _ = report.send(Report::Failed(format!("shard {shard}: {why}")));
                return;
            }
        }
        if !ctx.pause(jitter(backoff)).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_parse_and_checkpoints_round_trip() {
        assert_eq!("trim_horizon".parse(), Ok(StartAt::TrimHorizon));
        assert_eq!("latest".parse(), Ok(StartAt::Latest));
        assert_eq!(
            "2026-11-22T05:00:00Z".parse(),
            Ok(StartAt::At(1_795_323_600_000))
        );
        let err = "yesterday".parse::<StartAt>().unwrap_err();
        assert!(err.contains("'yesterday'"), "{err}");
        for origin in [Origin::TrimHorizon, Origin::At(1_795_323_600_000)] {
            assert_eq!(Origin::parse(&origin.checkpoint()), Some(origin));
        }
        assert_eq!(Origin::parse("after:1"), None);
        assert_eq!(Origin::parse("at:soon"), None);
    }

    #[test]
    fn jitter_stays_within_half_to_whole() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(1));
            assert!(j >= Duration::from_millis(500) && j < Duration::from_secs(1));
        }
    }
}
