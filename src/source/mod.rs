//! Sources: where records come from, each with a position (source name, byte offset).
//!
//! An input is a JSON Lines file, a directory of them (read in name order), stdin,
//! the built-in generator ([`gen`]), records the process hands over itself
//! ([`channel`], for gRPC Publish; its position is a record count), a Kinesis
//! stream ([`kinesis`]: one source per shard, numbered by record, resumed from the
//! sequence number committed as its checkpoint), or a Fluvio topic ([`fluvio`]: one
//! source per partition, positioned by offset). The partitions of a Kinesis stream or
//! a Fluvio topic are merged by event time ([`merge`]); in a cluster they are read
//! over every process ([`remote`]). Source names are indexed in one
//! [`Names`] registry, which grows as shards appear. Each input is
//! read by its own thread, which splits lines, decodes them (decode is pure and per
//! line, so it runs beside the dataflow) and sends batches to the ingest loop over a
//! bounded channel: a slow dataflow blocks the readers (backpressure). A reader starts at the committed offset of each of its files.
//! With `follow`, the last file of an input is tailed as it grows; an incomplete last
//! line is only read once its newline arrives.

pub mod channel;
pub mod fluvio;
pub mod gen;
pub mod kinesis;
mod merge;
pub mod remote;

use crate::decode::{decode, Reason};
use crate::model::Event;
use crossbeam_channel::{Receiver, Sender};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Something to read.
#[derive(Clone, Debug)]
pub enum Input {
    /// A file, or a directory whose files are read in name order.
    Path(PathBuf),
    Stdin,
    /// Generated events (demo, tests, benchmarks).
    Generated(gen::GenOptions),
    /// Records the process hands over itself (gRPC Publish).
    Channel(channel::Feeder),
    /// Every shard of a Kinesis stream.
    Kinesis(kinesis::KinesisSpec),
    /// Every partition of a Fluvio topic.
    Fluvio(fluvio::FluvioSpec),
}

/// A source could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("input {path}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("input {path}: the committed position {offset} is past the end of the file ({len} bytes); was it truncated or replaced?")]
    Shrunk { path: String, offset: u64, len: u64 },
    /// A Kinesis stream cannot be read: missing, access denied, misconfigured, or a
    /// failure retrying does not mend.
    #[error("Kinesis stream '{stream}': {reason}")]
    Kinesis { stream: String, reason: String },
    /// A Fluvio topic cannot be read: missing, the cluster unreachable or refusing.
    #[error("Fluvio topic '{topic}': {reason}")]
    Fluvio { topic: String, reason: String },
}

/// One record read: where, its bytes (without the newline) and what decoding made of it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Line {
    pub offset: u64,
    /// The offset just after the record (and its newline).
    pub end: u64,
    pub raw: Vec<u8>,
    pub decoded: Result<Event, Reason>,
}

pub enum SourceMsg {
    Lines {
        source: u32,
        lines: Vec<Line>,
        /// Where the source resumes after these lines, for a source whose position
        /// is not a number (committed with them); may come with no lines.
        checkpoint: Option<String>,
    },
    /// An input has been read to its end (never sent while following).
    Eof,
    Failed(SourceError),
}

/// Source names by index, shared by the readers and the run loop: file paths as
/// given, `-` for stdin, `gen:<seed>`, `grpc`, `kinesis:<stream>/<shard>`. A name
/// keeps its index for the whole run; new ones (shards after a reshard, names read
/// back from the staging log) are added at the end.
#[derive(Clone, Debug, Default)]
pub struct Names(Arc<Mutex<Vec<String>>>);

impl Names {
    /// The index of `name`, added if new.
    pub fn index(&self, name: &str) -> u32 {
        let mut names = self.0.lock().expect("names lock");
        match names.iter().position(|n| n == name) {
            Some(i) => i as u32,
            None => {
                names.push(name.to_owned());
                (names.len() - 1) as u32
            }
        }
    }

    /// Every name so far, by index.
    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().expect("names lock").clone()
    }
}

/// Running readers.
pub struct Sources {
    pub names: Names,
    pub rx: Receiver<SourceMsg>,
    pub inputs: usize,
}

/// Where the committed epochs left each source.
#[derive(Clone, Debug, Default)]
pub struct Resume {
    /// Per source name, the offset after the last committed record.
    pub positions: BTreeMap<String, u64>,
    /// Per source name, its committed checkpoint (sources whose position is not a number).
    pub checkpoints: BTreeMap<String, String>,
}

const BATCH: usize = 1024;

enum Unit {
    File(PathBuf),
    Stdin,
    Gen(gen::GenOptions),
    Channel(channel::Feeder),
    Kinesis(Box<kinesis::Reader>),
    Fluvio(Box<fluvio::Reader>),
}

impl Sources {
    /// Expands inputs and starts one reader thread per input. A Kinesis stream is
    /// checked here (it exists, it can be read), so a bad one fails the start.
    ///
    /// The partitions of a Kinesis stream or a Fluvio topic are read by tasks on
    /// `threads` threads; in a cluster, `remote` holds the links to the other
    /// processes, and the tasks are spread over all of them.
    pub fn start(
        inputs: &[Input],
        resume: &Resume,
        follow: bool,
        stop: Arc<AtomicBool>,
        remote: Option<Arc<remote::Remote>>,
        threads: usize,
    ) -> Result<Sources, SourceError> {
        let registry = Names::default();
        let mut plans: Vec<Vec<(u32, Unit, u64)>> = Vec::new();
        for input in inputs {
            let mut units = Vec::new();
            let mut add = |name: String, unit: Unit| {
                let offset = resume.positions.get(&name).copied().unwrap_or(0);
                units.push((registry.index(&name), unit, offset));
            };
            match input {
                Input::Kinesis(spec) => {
                    let reader = kinesis::Reader::open(
                        spec,
                        resume,
                        registry.clone(),
                        remote.clone(),
                        threads,
                    )?;
                    add(spec.source_name(), Unit::Kinesis(Box::new(reader)))
                }
                Input::Fluvio(spec) => {
                    let reader = fluvio::Reader::open(
                        spec,
                        resume,
                        registry.clone(),
                        remote.clone(),
                        threads,
                    )?;
                    add(spec.source_name(), Unit::Fluvio(Box::new(reader)))
                }
                Input::Stdin => add("-".into(), Unit::Stdin),
                Input::Generated(g) => add(format!("gen:{}", g.seed), Unit::Gen(g.clone())),
                Input::Channel(f) => add(f.name().to_owned(), Unit::Channel(f.clone())),
                Input::Path(p) => {
                    let err = |source| SourceError::Io {
                        path: p.display().to_string(),
                        source,
                    };
                    if p.is_dir() {
                        let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                            .map_err(err)?
                            .filter_map(|e| e.ok().map(|e| e.path()))
                            .filter(|f| {
                                f.is_file()
                                    && !f
                                        .file_name()
                                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                            })
                            .collect();
                        files.sort();
                        for f in files {
                            add(f.display().to_string(), Unit::File(f));
                        }
                    } else {
                        std::fs::metadata(p).map_err(err)?;
                        add(p.display().to_string(), Unit::File(p.clone()));
                    }
                }
            }
            plans.push(units);
        }
        let (tx, rx) = crossbeam_channel::bounded(64);
        let n = plans.len();
        for units in plans {
            let tx = tx.clone();
            let stop = Arc::clone(&stop);
            let names = registry.snapshot();
            std::thread::Builder::new()
                .name("tally-source".into())
                .spawn(move || {
                    let last = units.len().saturating_sub(1);
                    for (i, (idx, unit, offset)) in units.into_iter().enumerate() {
                        let tail = follow && i == last;
                        let res = match unit {
                            Unit::File(path) => read_file(
                                idx,
                                &path,
                                &names[idx as usize],
                                offset,
                                tail,
                                &tx,
                                &stop,
                            ),
                            Unit::Stdin => {
                                read_lines(idx, std::io::stdin().lock(), 0, false, &tx, &stop)
                                    .map_err(|e| SourceError::Io {
                                        path: "-".into(),
                                        source: e,
                                    })
                            }
                            Unit::Gen(g) => {
                                gen::stream(idx, g, offset, &tx, &stop);
                                Ok(())
                            }
                            Unit::Channel(f) => {
                                // Sends its end of input itself, at once.
                                f.read(idx, offset, &tx, &stop);
                                return;
                            }
                            Unit::Kinesis(r) => {
                                // Sends its end of input (caught up) or failure itself.
                                r.read(idx, &tx, &stop);
                                return;
                            }
                            Unit::Fluvio(r) => {
                                // Sends its end of input (caught up) or failure itself.
                                r.read(&tx, &stop);
                                return;
                            }
                        };
                        if let Err(e) = res {
                            let _ = tx.send(SourceMsg::Failed(e));
                            return;
                        }
                    }
                    let _ = tx.send(SourceMsg::Eof);
                })
                .expect("spawn reader");
        }
        Ok(Sources {
            names: registry,
            rx,
            inputs: n,
        })
    }
}

fn read_file(
    idx: u32,
    path: &PathBuf,
    name: &str,
    offset: u64,
    tail: bool,
    tx: &Sender<SourceMsg>,
    stop: &AtomicBool,
) -> Result<(), SourceError> {
    let err = |source| SourceError::Io {
        path: name.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(err)?;
    let len = f.metadata().map_err(err)?.len();
    if offset > len {
        return Err(SourceError::Shrunk {
            path: name.to_owned(),
            offset,
            len,
        });
    }
    f.seek(SeekFrom::Start(offset)).map_err(err)?;
    read_lines(
        idx,
        BufReader::with_capacity(1 << 16, f),
        offset,
        tail,
        tx,
        stop,
    )
    .map_err(err)
}

/// Splits `r` into records and sends them in batches. With `tail`, waits for more
/// at the end instead of returning, until `stop` is set.
pub(crate) fn read_lines(
    idx: u32,
    mut r: impl BufRead,
    mut offset: u64,
    tail: bool,
    tx: &Sender<SourceMsg>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut batch = Vec::with_capacity(BATCH);
    let mut buf = Vec::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let n = r.by_ref().read_until(b'\n', &mut buf)?;
        let complete = buf.last() == Some(&b'\n');
        if n == 0 || (!complete && tail) {
            if !batch.is_empty() {
                let _ = tx.send(SourceMsg::Lines {
                    source: idx,
                    lines: std::mem::take(&mut batch),
                    checkpoint: None,
                });
            }
            if !tail {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let end = offset + buf.len() as u64;
        let mut raw = std::mem::take(&mut buf);
        if complete {
            raw.pop();
        }
        let decoded = decode(&raw);
        batch.push(Line {
            offset,
            end,
            raw,
            decoded,
        });
        offset = end;
        if batch.len() >= BATCH
            && tx
                .send(SourceMsg::Lines {
                    source: idx,
                    lines: std::mem::take(&mut batch),
                    checkpoint: None,
                })
                .is_err()
        {
            break;
        }
    }
    Ok(())
}
