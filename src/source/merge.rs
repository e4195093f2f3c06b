//! Merging a partitioned source's partitions by event time (watermark alignment),
//! shared by the Kinesis shards and the Fluvio partitions.
//!
//! Each partition's task reads batches ahead (at most [`READ_AHEAD`]) and reports
//! them; the coordinator queues them per partition and [`merge`] sends the records
//! out in one order: the next record is always the oldest head among the partitions,
//! and while a partition that is not idle has nothing queued, the merge waits for it.
//! So the watermark (the largest event time read, minus the lateness) does not run
//! ahead on one partition and make another's records `late`, and a backlog comes
//! out in the same order whatever the timing of the reads. An idle partition (caught
//! up: nothing behind) holds nothing back; a slow one holds the source back, as it
//! must.

use super::{Line, SourceMsg};
use crate::model::Millis;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// What the merge needs of a source: where to send, and how it names its partitions
/// and their resume points.
pub(super) trait Partitions: Send + Sync {
    fn tx(&self) -> &tokio::sync::mpsc::Sender<SourceMsg>;
    /// The source index of partition `id`.
    fn source(&self, id: &str) -> u32;
    /// The checkpoint after a record with resume token `token` (`None`: the source's
    /// positions are numbers, committed without one).
    fn checkpoint(&self, token: &str) -> Option<String>;
    /// The checkpoint of a partition read to its end, if it ever ends.
    fn ended(&self) -> Option<String>;
}

/// What a shard's task tells the coordinator.
pub(super) enum Report {
    /// Records read, each with its resume token (a Kinesis sequence number); the task holds one of the
    /// shard's permits for them until they are merged out.
    Batch(String, Vec<(Line, String)>),
    /// Nothing more to read for now: an empty answer with nothing behind.
    Idle(String),
    /// Closed, and read to its end.
    Ended(String),
    /// It cannot be read any more, and why (the source fails with this reason).
    Failed(String),
}

#[derive(PartialEq, Eq)]
pub(super) enum State {
    /// Not started: a parent is still being read (Kinesis resharding).
    Waiting,
    Reading,
    /// Its task is done; what it read is still being merged out.
    Closing,
    Ended,
}

/// Batches a partition's task may read ahead of the merge.
pub(super) const READ_AHEAD: usize = 2;

pub(super) struct Known {
    pub(super) parents: Vec<String>,
    pub(super) state: State,
    /// Read, not yet merged out: batches of (line, resume token).
    pub(super) queue: std::collections::VecDeque<std::collections::VecDeque<(Line, String)>>,
    /// The last report said there is nothing to read.
    pub(super) idle: bool,
    pub(super) permits: Arc<tokio::sync::Semaphore>,
}

impl Known {
    /// The merge must wait for this shard: it may still have older records.
    pub(super) fn blocks(&self) -> bool {
        self.queue.is_empty()
            && match self.state {
                State::Reading => !self.idle,
                State::Waiting | State::Closing | State::Ended => false,
            }
    }

    /// The event time that orders this shard's next record (a record that did not
    /// decode has none, and goes first).
    fn head(&self) -> Option<Millis> {
        let (line, _) = self.queue.front()?.front()?;
        Some(line.decoded.as_ref().map_or(Millis::MIN, |e| e.ts))
    }
}

/// Sends every record the merge can order now, consecutive records of one
/// partition as one batch, with the checkpoint after its last record (if the source
/// has one); closes the partitions whose tasks have ended and whose records are all
/// out. Returns whether
/// one closed (its children may start); `Err` once the run loop has gone.
pub(super) async fn merge(
    ctx: &dyn Partitions,
    known: &mut BTreeMap<String, Known>,
) -> Result<bool, ()> {
    let mut out: Option<(String, Vec<Line>, String)> = None;
    let flush = |out: &mut Option<(String, Vec<Line>, String)>| -> Option<SourceMsg> {
        let (id, lines, seq) = out.take()?;
        Some(SourceMsg::Lines {
            source: ctx.source(&id),
            lines,
            checkpoint: ctx.checkpoint(&seq),
        })
    };
    // A shard starts to block only when its queue runs empty: checked once here,
    // then where that happens.
    let mut blocked = known.values().any(Known::blocks);
    while !blocked {
        let mut next: Option<(&String, Millis)> = None;
        for (id, k) in known.iter() {
            if let Some(t) = k.head() {
                if next.is_none_or(|(_, best)| t < best) {
                    next = Some((id, t));
                }
            }
        }
        let Some((id, _)) = next else { break };
        let id = id.clone();
        if out.as_ref().is_some_and(|(o, _, _)| *o != id) {
            let m = flush(&mut out).expect("a batch");
            ctx.tx().send(m).await.map_err(|_| ())?;
        }
        let k = known.get_mut(&id).expect("known");
        let batch = k.queue.front_mut().expect("a head");
        let (line, seq) = batch.pop_front().expect("a head");
        if batch.is_empty() {
            k.queue.pop_front();
            k.permits.add_permits(1);
            blocked = k.blocks();
        }
        match &mut out {
            Some((_, lines, last)) => {
                lines.push(line);
                *last = seq;
            }
            None => out = Some((id, vec![line], seq)),
        }
    }
    if let Some(m) = flush(&mut out) {
        ctx.tx().send(m).await.map_err(|_| ())?;
    }
    let mut ended = false;
    for (id, k) in known.iter_mut() {
        if k.state == State::Closing && k.queue.is_empty() {
            k.state = State::Ended;
            ended = true;
            if let Some(checkpoint) = ctx.ended() {
                let end = SourceMsg::Lines {
                    source: ctx.source(id),
                    lines: Vec::new(),
                    checkpoint: Some(checkpoint),
                };
                ctx.tx().send(end).await.map_err(|_| ())?;
            }
            tracing::debug!(partition = %id, "read to its end");
        }
    }
    Ok(ended)
}

/// Sleeps `d`, waking early once `stopped`; false if it did.
pub(super) async fn pause(d: Duration, stopped: &(dyn Fn() -> bool + Sync)) -> bool {
    let until = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < until {
        if stopped() {
            return false;
        }
        let step = until.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(step.min(Duration::from_millis(100))).await;
    }
    !stopped()
}

/// `d` scaled by a random factor in [0.5, 1.0): retrying readers spread out.
pub(super) fn jitter(d: Duration) -> Duration {
    let r = getrandom::u32().unwrap_or(u32::MAX / 2);
    d.mul_f64(0.5 + f64::from(r) / (2.0 * (f64::from(u32::MAX) + 1.0)))
}

/// A runtime of `threads` threads for a partitioned source's tasks.
pub(super) fn runtime(name: &str, threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .enable_all()
        .build()
}

/// Forwards what the tasks send to the run loop (blocking while it is busy) until
/// either side is done, then stops the tasks.
pub(super) fn forward(
    rt: tokio::runtime::Runtime,
    mut rx: tokio::sync::mpsc::Receiver<SourceMsg>,
    tx: &crossbeam_channel::Sender<SourceMsg>,
    stop: &std::sync::atomic::AtomicBool,
) {
    while let Some(m) = rx.blocking_recv() {
        if tx.send(m).is_err() {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(rx);
    rt.shutdown_timeout(Duration::from_secs(5));
}

/// Takes in a partition task's report; a failure's reason comes back, for the
/// source to fail with.
pub(super) fn note(known: &mut BTreeMap<String, Known>, report: Report) -> Option<String> {
    match report {
        Report::Batch(id, lines) => {
            if let Some(k) = known.get_mut(&id) {
                k.queue.push_back(lines.into());
                k.idle = false;
            }
        }
        Report::Idle(id) => {
            if let Some(k) = known.get_mut(&id) {
                k.idle = true;
            }
        }
        Report::Ended(id) => {
            if let Some(k) = known.get_mut(&id) {
                k.state = State::Closing;
            }
        }
        Report::Failed(why) => return Some(why),
    }
    None
}
