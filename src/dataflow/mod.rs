//! The timely dataflow: the only module that imports timely and differential.
//!
//! ```text
//! records (epoch e) ──exchange(event_id)──> admit   dedup, conflicting duplicates, lateness
//!        ──exchange(target id)──> voids   voids before or after targets, void of void,
//!                                         cross-provider voids, orphans
//!        ── counted deltas (event, ±1) ──> explode (local pre-aggregation per epoch)
//!        ──exchange(row)──> rows          absolute row values, top-k, sealing
//!        ──> sink: one EpochOutput per worker per epoch
//! ticks (epoch e: the event-time clock) are broadcast to every worker and drive expiry.
//! ```
//!
//! Invariants:
//! - Every keyed stage processes an epoch only once both its inputs have passed it, and
//!   inside an epoch in source-position order, so results do not depend on the worker
//!   count nor on where epochs were cut (for one ordered source).
//! - State expires by event time (`clock`), and expiry never emits anything: a sealed
//!   window's committed row is never changed or deleted by expiry.
//! - Aggregates travel as differences (see [`aggregate::Sums`], a differential
//!   `Abelian`); the rows stage turns them into absolute values for the store.
//!
//! Callers: `ingest` drives [`Dataflow`] through channels; the committer consumes
//! [`EpochOutput`]s.

mod admit;
pub mod aggregate;
pub mod cluster;
pub(crate) mod table;
mod voids;

use crate::decode::Reason;
use crate::model::{Event, Millis, Position};
use crate::pipeline::Pipeline;
use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use timely::dataflow::channels::pact::{Exchange, ParallelizationContract, Pipeline as Local};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::{InputHandleVec as InputHandle, Stream};

pub use aggregate::{RowKey, RowUpdate, RowValue, Sums};
pub use cluster::{Cluster, ClusterError};

/// Logical time: the epoch number.
pub type Epoch = u64;

/// A decoded record entering the dataflow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Boxed: records move through several exchanges and sorts; a pointer moves cheaply.
    pub event: Box<Event>,
    pub pos: Position,
    /// The watermark when the record arrived: (largest event time read before it) -
    /// allowed lateness. A sale or refund older than this is late.
    pub wm: Millis,
    /// The record as read, for dead letters (shared with the staging log).
    pub raw: Arc<str>,
}

impl Record {
    /// The clock when the record was read: the largest event time read before it
    /// (`Millis::MIN` for the first), from its watermark. What a record finds in the
    /// dedup horizon's state is judged by this clock, not by the clock at the end of its
    /// epoch, so it does not depend on where epochs were cut. (A record replayed from
    /// the staging log keeps the watermark it was read with; after a change of the
    /// pipeline's lateness its clock is told with the new one.)
    pub fn clock(&self, lateness: Millis) -> Millis {
        if self.wm == Millis::MIN {
            Millis::MIN
        } else {
            self.wm.saturating_add(lateness)
        }
    }

    /// Whether something whose event time is `ts` is past the dedup horizon for this
    /// record: forgotten, as if the epoch it is forgotten at had ended before it.
    fn outlived(&self, ts: Millis, rules: &Rules) -> bool {
        ts.saturating_add(rules.horizon) < self.clock(rules.lateness)
    }
}

/// A record the dataflow rejected, with why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub reason: Reason,
    pub pos: Position,
    pub provider: String,
    pub raw: Arc<str>,
}

/// What the dataflow reports for an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Out {
    /// Boxed, like `Dead`: outputs share streams with per-event items, which stay small.
    Row(Box<RowUpdate>),
    Dead(Box<DeadLetter>),
    /// A void whose target did not come within the dedup horizon.
    Orphan {
        provider: String,
    },
    /// A redelivery dropped silently.
    Duplicate,
    /// A change to the set of counted events, for the archive (`archive::facts`).
    Fact(Box<Fact>),
}

/// A change to the set of counted events, as the archive keeps it: a sale or refund
/// counted, or a void that cancels one (whether it came after its target or before).
/// Applying a day's facts as sets (an event by id, a void by its target's id) gives
/// the day's counted events; applying them twice changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fact {
    Counted {
        event: Event,
        pos: Position,
    },
    /// `void` cancels `void.ref_event_id`, whose event time is `target_ts`.
    Voided {
        void: Event,
        pos: Position,
        target_ts: Millis,
    },
}

/// Everything one worker produced for one epoch (possibly nothing).
#[derive(Debug)]
pub struct EpochOutput {
    pub epoch: Epoch,
    pub worker: usize,
    pub out: Vec<Out>,
}

/// Messages from ingest to one worker.
pub enum ToWorker {
    /// Records of the epoch the worker's input is at.
    Records(Epoch, Vec<Record>),
    /// The epoch is complete; `clock` is the largest event time read so far.
    Close { epoch: Epoch, clock: Millis },
}

/// Semantic parameters shared by every worker.
#[derive(Clone, Debug)]
pub struct Rules {
    pub lateness: Millis,
    pub horizon: Millis,
    /// Whether the voids stage tells each change to the counted set as an [`Out::Fact`]
    /// (for the archive's staging; see `archive::facts`).
    pub archive: bool,
    /// The attributes some view groups or ranks by: the only ones a counted target
    /// keeps in the voids stage's state (its other attributes no row reads).
    pub attrs: Arc<[String]>,
}

impl Rules {
    pub fn of(p: &Pipeline) -> Rules {
        use crate::pipeline::GroupField;
        let mut attrs: Vec<String> = p
            .views
            .iter()
            .flat_map(|v| v.group_by.iter().chain(v.top_k.as_ref().map(|t| &t.key)))
            .filter_map(|f| match f {
                GroupField::Attr(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        attrs.sort();
        attrs.dedup();
        Rules {
            lateness: p.allowed_lateness.as_millis() as Millis,
            horizon: p.dedup_horizon.as_millis() as Millis,
            archive: p.archive.enabled,
            attrs: attrs.into(),
        }
    }
}

/// A running dataflow on `workers` threads (per process, in a cluster).
pub struct Dataflow {
    inputs: Vec<Sender<ToWorker>>,
    next: usize,
    guards: Option<timely::communication::initialize::WorkerGuards<()>>,
    /// The cluster's reader links, until taken.
    links: Vec<(usize, std::net::TcpStream)>,
}

impl Dataflow {
    /// Starts the workers; their inputs begin at epoch `first`. Each worker sends one
    /// [`EpochOutput`] per epoch to `outputs`.
    ///
    /// In a cluster (see [`cluster`]) this first connects to every other process. On
    /// the leader (process 0) the returned handle takes records as in one process, and
    /// every epoch's outputs reach `outputs` (all of them through worker 0, each local
    /// worker still reporting every epoch). On the other processes it takes no
    /// records; [`Dataflow::join`] returns once the leader has finished.
    pub fn start(
        pipeline: Arc<Pipeline>,
        workers: usize,
        first: Epoch,
        outputs: Sender<EpochOutput>,
        cluster: Option<&Cluster>,
    ) -> Result<Dataflow, ClusterError> {
        use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};
        let workers = workers.max(1);
        cluster::watch_failures();
        let leader = cluster.is_none_or(|c| c.process == 0);
        let mut links = Vec::new();
        let (builders, others): (Vec<AllocatorBuilder>, Box<dyn std::any::Any + Send>) =
            match cluster {
                None => timely::CommunicationConfig::Process(workers)
                    .try_build()
                    .expect("timely process allocators"),
                Some(c) => {
                    let connected = c.connect(workers, semantics_digest(&pipeline))?;
                    links = connected.links;
                    let sockets = connected.sockets;
                    let hooks = timely::communication::Hooks::default();
                    let local = ProcessBuilder::new_typed_vector(
                        workers,
                        hooks.refill.clone(),
                        hooks.spill.clone(),
                    );
                    let (tcp, guard) = timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets(
                        local, sockets, c.process, workers, hooks,
                    )
                    .map_err(|e| ClusterError::Connect {
                        process: c.process,
                        reason: format!("starting timely networking: {e}"),
                    })?;
                    (
                        tcp.into_iter().map(AllocatorBuilder::Tcp).collect(),
                        Box::new(guard),
                    )
                }
            };
        let to_leader = cluster.is_some();
        SHAPE[0].store(cluster.map_or(1, |c| c.processes()), Ordering::Relaxed);
        SHAPE[1].store(workers, Ordering::Relaxed);
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..if leader { workers } else { 0 })
            .map(|_| crossbeam_channel::bounded::<ToWorker>(64))
            .unzip();
        let rxs: Arc<Vec<Receiver<ToWorker>>> = Arc::new(rxs);
        let guards = timely::execute::execute_from(
            builders,
            others,
            timely::WorkerConfig::default(),
            move |worker| {
                let index = worker.index();
                // The leader's workers are 0..workers; the others take no input.
                let rx = rxs.get(index).cloned();
                let outputs = outputs.clone();
                let mut records: InputHandle<Epoch, Record> = InputHandle::new();
                let mut ticks: InputHandle<Epoch, Millis> = InputHandle::new();
                let pipeline = Arc::clone(&pipeline);
                worker.dataflow::<Epoch, _, _>(|scope| {
                    use timely::dataflow::operators::vec::Broadcast;
                    let recs = records.to_stream(scope);
                    // Worker 0 alone sends each epoch's clock; every worker gets it.
                    let clock = ticks.to_stream(scope).broadcast();
                    let out = build(&pipeline, recs, clock.clone());
                    if to_leader {
                        sink(out, clock, Exchange::new(|_: &Out| 0), index, outputs);
                    } else {
                        sink(out, clock, Local, index, outputs);
                    }
                });
                let Some(rx) = rx else {
                    drop(records);
                    drop(ticks);
                    while worker.step_or_park(None) {}
                    return;
                };
                records.advance_to(first);
                ticks.advance_to(first);
                let mut open = true;
                while open {
                    loop {
                        match rx.try_recv() {
                            Ok(ToWorker::Records(e, mut batch)) => {
                                debug_assert_eq!(e, *records.time());
                                records.send_batch(&mut batch);
                            }
                            Ok(ToWorker::Close { epoch, clock }) => {
                                if index == 0 {
                                    ticks.send(clock);
                                }
                                records.advance_to(epoch + 1);
                                ticks.advance_to(epoch + 1);
                            }
                            Err(crossbeam_channel::TryRecvError::Empty) => break,
                            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                                open = false;
                                break;
                            }
                        }
                    }
                    worker.step_or_park(Some(Duration::from_millis(1)));
                }
                drop(records);
                drop(ticks);
                while worker.step() {}
            },
        )
        .expect("timely workers start");
        Ok(Dataflow {
            inputs: txs,
            next: 0,
            guards: Some(guards),
            links,
        })
    }

    /// The cluster's reader links ([`crate::source::remote`]), once: by the other
    /// process's index, every other process's on process 0 and the one to process 0
    /// elsewhere; none in one process.
    pub fn take_links(&mut self) -> Vec<(usize, std::net::TcpStream)> {
        std::mem::take(&mut self.links)
    }

    pub fn workers(&self) -> usize {
        self.inputs.len()
    }

    /// Sends records of the current epoch to the next worker (round robin);
    /// blocks when that worker is behind (backpressure).
    pub fn send(&mut self, epoch: Epoch, batch: Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        let w = self.next % self.inputs.len();
        self.next += 1;
        // A worker only hangs up when it panicked; its panic surfaces at join.
        let _ = self.inputs[w].send(ToWorker::Records(epoch, batch));
    }

    /// Closes `epoch` on every worker.
    pub fn close(&mut self, epoch: Epoch, clock: Millis) {
        for tx in &self.inputs {
            let _ = tx.send(ToWorker::Close { epoch, clock });
        }
    }

    /// Closes the inputs and waits for the workers to finish.
    pub fn finish(mut self) {
        if let Err(e) = self.join() {
            panic!("{e}");
        }
    }

    /// Closes the inputs and waits for the workers to finish; the first worker's
    /// failure (in a cluster: also a lost connection to another process) as an error.
    pub fn join(&mut self) -> Result<(), String> {
        self.inputs.clear();
        let Some(g) = self.guards.take() else {
            return Ok(());
        };
        // Joining also joins timely's network threads, which panics when one failed.
        let failed = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| g.join())) {
            Ok(results) => results.iter().any(|r| r.is_err()),
            Err(_) => true,
        };
        if failed {
            let why = cluster::first_failure().unwrap_or_else(|| "a worker panicked".into());
            return Err(format!("the dataflow failed: {why}"));
        }
        Ok(())
    }
}

/// A digest of what the dataflow's results depend on in a pipeline (views, lateness,
/// horizon, zones), the same in every process of a cluster that runs the same one.
fn semantics_digest(p: &Pipeline) -> u64 {
    let text = format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}",
        p.views, p.allowed_lateness, p.dedup_horizon, p.default_time_zone, p.time_zones
    );
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// The 128-bit digest an id is held under in state (collisions: about 2^-128 a pair).
pub(crate) fn id_digest(id: &str) -> Digest {
    let d = xxhash_rust::xxh3::xxh3_128(id.as_bytes());
    [d as u64, (d >> 64) as u64]
}

/// A 128-bit digest as two words: 8-byte aligned, so hash table entries carry no padding.
pub(crate) type Digest = [u64; 2];

/// Routes by a stable hash, the same in every process.
pub(crate) fn route(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

fn build<'s>(
    p: &Pipeline,
    records: Stream<'s, Epoch, Vec<Record>>,
    clock: Stream<'s, Epoch, Vec<Millis>>,
) -> Stream<'s, Epoch, Vec<Out>> {
    let rules = Rules::of(p);
    let plan = Arc::new(aggregate::Plan::new(p));
    // Event ids: one table for admission and the voids stage of this worker.
    let ids = voids::SharedIds::default();
    let (accepted, dead) = admit::admit(records, clock.clone(), rules.clone(), ids.clone());
    let (counted, void_out) = voids::voids(accepted, clock.clone(), rules.clone(), ids);
    let partial = aggregate::explode(counted, clock.clone(), Arc::clone(&plan));
    let rows = aggregate::rows(partial, clock, plan, rules);
    use timely::dataflow::operators::Concat;
    rows.concat(dead).concat(void_out)
}

/// Sends each epoch's outputs (possibly none) to the committer once the epoch is done
/// here; `pact` brings them to this worker (in a cluster: every output to worker 0).
fn sink<'s>(
    out: Stream<'s, Epoch, Vec<Out>>,
    clock: Stream<'s, Epoch, Vec<Millis>>,
    pact: impl ParallelizationContract<Epoch, Vec<Out>>,
    worker: usize,
    tx: Sender<EpochOutput>,
) {
    let done = epochs(
        out,
        clock,
        pact,
        "Sink",
        move |epoch, items: &mut Vec<Out>, _clock, _out: &mut Vec<()>| {
            let _ = tx.send(EpochOutput {
                epoch,
                worker,
                out: std::mem::take(items),
            });
        },
    );
    drop(done);
}

/// The shape shared by every stateful stage: stash input by epoch, and once both the
/// data and the clock have passed an epoch, hand its data (in arrival order of
/// containers; stages sort by position themselves) and clock to `logic`, epochs in order.
///
/// `logic` drains the data it is handed (what it leaves is dropped); the emptied stash
/// keeps its capacity for a later epoch, so an epoch's items are not copied into a
/// vector growing from empty (each doubling faulted in fresh pages, measured at a few
/// percent of a run).
pub(crate) fn epochs<'s, I, O, P, L>(
    data: Stream<'s, Epoch, Vec<I>>,
    clock: Stream<'s, Epoch, Vec<Millis>>,
    pact: P,
    name: &str,
    mut logic: L,
) -> Stream<'s, Epoch, Vec<O>>
where
    I: Clone + 'static,
    O: Clone + 'static,
    P: ParallelizationContract<Epoch, Vec<I>>,
    L: FnMut(Epoch, &mut Vec<I>, Millis, &mut Vec<O>) + 'static,
{
    data.binary_frontier(clock, pact, Local, name, move |_cap, _info| {
        struct Pending<I> {
            cap: Capability<Epoch>,
            data: Vec<I>,
            clock: Option<Millis>,
        }
        fn pending<'a, I>(
            stash: &'a mut BTreeMap<Epoch, Pending<I>>,
            spare: &mut Vec<Vec<I>>,
            cap: Capability<Epoch>,
        ) -> &'a mut Pending<I> {
            stash.entry(*cap.time()).or_insert_with(|| Pending {
                cap,
                data: spare.pop().unwrap_or_default(),
                clock: None,
            })
        }
        let mut stash: BTreeMap<Epoch, Pending<I>> = BTreeMap::new();
        // Emptied stashes of finished epochs, reused (two: the epoch being filled and
        // the next one, which can start before the first is done).
        let mut spare: Vec<Vec<I>> = Vec::new();
        let mut produced: Vec<O> = Vec::new();
        move |(data_in, data_frontier), (clock_in, clock_frontier), output| {
            data_in.for_each_stamp(|cap, containers| {
                if let Some(cap) = cap.retain_least(output.output_index()) {
                    let p = pending(&mut stash, &mut spare, cap);
                    for c in containers {
                        p.data.append(c);
                    }
                }
            });
            clock_in.for_each_stamp(|cap, containers| {
                if let Some(cap) = cap.retain_least(output.output_index()) {
                    let p = pending(&mut stash, &mut spare, cap);
                    for c in containers {
                        for t in c.drain(..) {
                            p.clock = Some(p.clock.map_or(t, |x: Millis| x.max(t)));
                        }
                    }
                }
            });
            while let Some((&e, _)) = stash.first_key_value() {
                if data_frontier.less_equal(&e) || clock_frontier.less_equal(&e) {
                    break;
                }
                let mut p = stash.remove(&e).expect("present");
                logic(
                    e,
                    &mut p.data,
                    p.clock.unwrap_or(Millis::MIN),
                    &mut produced,
                );
                if !produced.is_empty() {
                    output.session(&p.cap).give_iterator(produced.drain(..));
                }
                p.data.clear();
                if p.data.capacity() > 0 && spare.len() < 2 {
                    spare.push(p.data);
                }
            }
        }
    })
}

/// The exchange contract of a keyed stage.
pub(crate) fn keyed<I>(
    key: impl Fn(&I) -> u64 + 'static,
) -> impl ParallelizationContract<Epoch, Vec<I>>
where
    I: timely::ExchangeData,
{
    Exchange::new(move |x: &I| key(x))
}

/// Keys that leave state at an event time, exactly: buckets of one minute holding
/// (offset in the minute, key), so an entry costs its key plus 4 bytes and whole
/// minutes leave at once; only the minute the clock is in is checked entry by entry.
pub(crate) struct Expiry<K> {
    buckets: BTreeMap<i64, Vec<(u32, K)>>,
}

pub(crate) const BUCKET: Millis = 60_000;

impl<K> Default for Expiry<K> {
    fn default() -> Self {
        Expiry {
            buckets: BTreeMap::new(),
        }
    }
}

impl<K> Expiry<K> {
    pub fn at(&mut self, when: Millis, key: K) {
        let b = when.div_euclid(BUCKET);
        let offset = (when - b * BUCKET) as u32;
        self.buckets.entry(b).or_default().push((offset, key));
    }

    /// Removes and returns the keys whose time is before `clock`.
    pub fn due(&mut self, clock: Millis) -> Vec<K> {
        let mut out = Vec::new();
        self.due_with(clock, |_, k| out.push(k));
        out
    }

    /// Removes the keys whose time is before `clock`, handing each to `f` with its time.
    pub fn due_with(&mut self, clock: Millis, mut f: impl FnMut(Millis, K)) {
        while let Some(mut first) = self.buckets.first_entry() {
            let start = first.key().saturating_mul(BUCKET);
            if start.saturating_add(BUCKET) <= clock {
                for (offset, k) in first.remove() {
                    f(start + Millis::from(offset), k);
                }
            } else {
                if start < clock {
                    let cut = (clock - start) as u32;
                    let list = first.get_mut();
                    let mut i = 0;
                    while i < list.len() {
                        if list[i].0 < cut {
                            let (offset, k) = list.swap_remove(i);
                            f(start + Millis::from(offset), k);
                        } else {
                            i += 1;
                        }
                    }
                    if list.is_empty() {
                        first.remove();
                    }
                }
                break;
            }
        }
    }
}

/// Runs the dataflow over in-memory epochs (numbered from 1, each with its records
/// and clock) and returns every worker's outputs: for tests, benchmarks and tools.
pub fn run_epochs(
    pipeline: Arc<Pipeline>,
    workers: usize,
    epochs: Vec<(Vec<Record>, Millis)>,
) -> Vec<EpochOutput> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut df = Dataflow::start(pipeline, workers, 1, tx, None).expect("one process");
    for (i, (records, clock)) in epochs.into_iter().enumerate() {
        let e = i as Epoch + 1;
        for chunk in records.chunks(256) {
            df.send(e, chunk.to_vec());
        }
        df.close(e, clock);
    }
    df.finish();
    rx.into_iter().collect()
}

/// Moves the `tally_state_entries{stage}` gauge by how much a worker's map grew or
/// shrank in one call, so the gauge sums every worker's state.
pub(crate) fn track_state(stage: &'static str, before: usize, after: usize) {
    if before != after {
        let d = after as i64 - before as i64;
        metrics::gauge!(crate::metrics::STATE_ENTRIES, "stage" => stage).increment(d as f64);
        if let Some((_, n)) = STATE.iter().find(|(s, _)| *s == stage) {
            n.fetch_add(d, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Entries held per stage, summed over the workers of this process.
static STATE: [(&str, std::sync::atomic::AtomicI64); 3] = [
    ("admit", std::sync::atomic::AtomicI64::new(0)),
    ("voids", std::sync::atomic::AtomicI64::new(0)),
    ("rows", std::sync::atomic::AtomicI64::new(0)),
];

/// The shape of the dataflow this process last started: (processes, workers per
/// process); (0, 0) before any.
static SHAPE: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

pub fn shape() -> (usize, usize) {
    (
        SHAPE[0].load(Ordering::Relaxed),
        SHAPE[1].load(Ordering::Relaxed),
    )
}

/// Records held in the dataflow's state per stage by this process's workers
/// (`admit`: event ids within the dedup horizon; `voids`: void slots; `rows`:
/// aggregate rows and top-k members).
pub fn state_entries() -> Vec<(&'static str, i64)> {
    STATE
        .iter()
        .map(|(s, n)| (*s, n.load(std::sync::atomic::Ordering::Relaxed)))
        .collect()
}
