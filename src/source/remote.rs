//! Partition readers spread over the processes of a cluster.
//!
//! A Kinesis stream's shards and a Fluvio topic's partitions are read by tasks placed
//! round robin over the cluster's processes: the first on process 0, the next on
//! process 1, and so on. A task on another process reads and decodes its partition
//! there (the network reads and the JSON parsing, the costly part of a source) and
//! sends its batches over a reader link to process 0. There they join the merge by
//! event time like a local task's: the merge, the watermark, the epochs, the staging
//! log and the commit stay in one place, so results do not depend on where a
//! partition was read (see [`super::merge`]).
//!
//! The link is one TCP connection from each other process to process 0, opened and
//! checked with the timely connections ([`crate::dataflow::Cluster`]). Process 0 sends
//! `Start` (what to read, from where) and `Credit` (one more batch may be read
//! ahead); the reader sends its reports. All read-ahead permits come from process 0:
//! a remote task starts with none, and each batch the merge takes out returns one, so
//! a remote partition reads at most [`super::merge::READ_AHEAD`] batches ahead, as a
//! local one does. Frames are a 4-byte big-endian length and a bincode body; both
//! ends run the same build (the cluster's hello checks it).
//!
//! Failures. A remote task's failure (a stream that cannot be read any more) reaches
//! the merge as the local task's would, and fails the run naming the partition. A
//! broken link fails every partition read over it; the cluster breaks with it (timely
//! loses the same process), and every process resumes from the store at the next
//! start. When process 0 closes the link, the other process stops its tasks.

use super::merge::Report;
use super::Line;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::Semaphore;

/// What a remote task reads: a source's own description of one partition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) enum Work {
    Kinesis(super::kinesis::ShardWork),
    Fluvio(super::fluvio::PartitionWork),
}

impl Work {
    fn partition(&self) -> String {
        match self {
            Work::Kinesis(w) => w.name(),
            Work::Fluvio(w) => w.name(),
        }
    }
}

/// Process 0 to a reader.
#[derive(Debug, Serialize, Deserialize)]
enum ToReader {
    Start {
        task: u64,
        work: Work,
    },
    /// One more batch of `task` may be read ahead of the merge.
    Credit {
        task: u64,
    },
}

/// A reader to process 0: a task's reports.
#[derive(Serialize, Deserialize)]
enum ToLeader {
    Batch {
        task: u64,
        lines: Vec<(Line, String)>,
    },
    Idle {
        task: u64,
    },
    Ended {
        task: u64,
    },
    Failed {
        task: u64,
        reason: String,
    },
}

/// The largest frame either end accepts (a batch of 10,000 records of at most a
/// megabyte each stays far below).
const MAX_FRAME: usize = 1 << 30;

async fn write_frame<T: Serialize>(
    w: &mut (impl AsyncWriteExt + Unpin),
    msg: &T,
) -> std::io::Result<()> {
    let body = bincode::serialize(msg).map_err(std::io::Error::other)?;
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(&body).await
}

/// The next frame, or `None` at a clean end of the connection.
async fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut (impl AsyncReadExt + Unpin),
) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    bincode::deserialize(&body)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A task read over a link, as process 0 knows it.
struct Placed {
    /// The partition's id in its source's merge.
    id: String,
    report: UnboundedSender<Report>,
    permits: Arc<Semaphore>,
    /// Set to the end of the last record received (the Fluvio lag reads it).
    progress: Option<Arc<AtomicU64>>,
}

/// Process 0's end of one other process's reader link.
pub(super) struct Link {
    process: usize,
    out: UnboundedSender<ToReader>,
    placed: Arc<Mutex<HashMap<u64, Placed>>>,
    handle: tokio::runtime::Handle,
}

/// Every reader link of process 0, and where the next partition goes.
pub struct Remote {
    links: Vec<Link>,
    next_place: AtomicUsize,
    next_task: AtomicU64,
    rt: Option<tokio::runtime::Runtime>,
}

impl Remote {
    /// Takes over the links of a cluster's process 0 (by the other process's index);
    /// `None` when there are none (one process).
    pub fn start(links: Vec<(usize, TcpStream)>) -> std::io::Result<Option<Arc<Remote>>> {
        if links.is_empty() {
            return Ok(None);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tally-link")
            .enable_all()
            .build()?;
        let mut out = Vec::new();
        for (process, s) in links {
            s.set_nonblocking(true)?;
            let s = {
                let _guard = rt.enter();
                tokio::net::TcpStream::from_std(s)?
            };
            let (mut rd, mut wr) = s.into_split();
            let (tx, mut rx) = unbounded_channel::<ToReader>();
            let placed: Arc<Mutex<HashMap<u64, Placed>>> = Arc::default();
            rt.spawn(async move {
                while let Some(m) = rx.recv().await {
                    if let Err(e) = write_frame(&mut wr, &m).await {
                        tracing::warn!(process, error = %e, "writing to a reader link failed");
                        return;
                    }
                }
            });
            let tasks = Arc::clone(&placed);
            rt.spawn(async move {
                let why = loop {
                    match read_frame::<ToLeader>(&mut rd).await {
                        Ok(Some(m)) => take(&tasks, m),
                        Ok(None) => break "it closed the link".to_owned(),
                        Err(e) => break e.to_string(),
                    }
                };
                // Every partition read there has failed.
                let gone: Vec<Placed> = tasks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .drain()
                    .map(|(_, p)| p)
                    .collect();
                for p in gone {
                    p.permits.close();
                    let _ = p.report.send(Report::Failed(format!(
                        "partition {}: the reader on process {process} is gone ({why})",
                        p.id
                    )));
                }
            });
            out.push(Link {
                process,
                out: tx,
                placed,
                handle: rt.handle().clone(),
            });
        }
        out.sort_by_key(|l| l.process);
        Ok(Some(Arc::new(Remote {
            links: out,
            next_place: AtomicUsize::new(0),
            next_task: AtomicU64::new(1),
            rt: Some(rt),
        })))
    }

    /// Where the next partition is read: `None` here (process 0), else a link.
    /// Round robin over the processes, so `n` partitions over `p` processes leave
    /// each with `n / p` or one more.
    pub(super) fn place(&self) -> Option<&Link> {
        let i = self.next_place.fetch_add(1, Ordering::Relaxed) % (self.links.len() + 1);
        i.checked_sub(1).map(|i| &self.links[i])
    }

    /// Starts `work` over `link`: its reports reach `report` as partition `id`'s,
    /// and each permit added to `permits` lets it read one more batch ahead.
    pub(super) fn start_on(
        &self,
        link: &Link,
        work: Work,
        id: String,
        report: UnboundedSender<Report>,
        permits: Arc<Semaphore>,
        progress: Option<Arc<AtomicU64>>,
    ) {
        let task = self.next_task.fetch_add(1, Ordering::Relaxed);
        tracing::info!(partition = %work.partition(), process = link.process, "read on another process");
        link.placed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                task,
                Placed {
                    id: id.clone(),
                    report: report.clone(),
                    permits: Arc::clone(&permits),
                    progress,
                },
            );
        if link.out.send(ToReader::Start { task, work }).is_err() {
            let _ = report.send(Report::Failed(format!(
                "partition {id}: the reader link to process {} is closed",
                link.process
            )));
            return;
        }
        // The permits the merge hands back, passed on as credits.
        let out = link.out.clone();
        link.handle.spawn(async move {
            while let Ok(p) = permits.acquire().await {
                p.forget();
                if out.send(ToReader::Credit { task }).is_err() {
                    return;
                }
            }
        });
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Closes the links (their readers stop); allowed on any thread.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Hands a reader's report to its partition's merge.
fn take(tasks: &Mutex<HashMap<u64, Placed>>, m: ToLeader) {
    let mut tasks = tasks.lock().unwrap_or_else(|p| p.into_inner());
    match m {
        ToLeader::Batch { task, lines } => {
            let Some(p) = tasks.get(&task) else { return };
            if let (Some(at), Some((last, _))) = (&p.progress, lines.last()) {
                at.store(last.end, Ordering::Relaxed);
            }
            let _ = p.report.send(Report::Batch(p.id.clone(), lines));
        }
        ToLeader::Idle { task } => {
            if let Some(p) = tasks.get(&task) {
                let _ = p.report.send(Report::Idle(p.id.clone()));
            }
        }
        // The task is done either way: its permits go with it.
        ToLeader::Ended { task } => {
            if let Some(p) = tasks.remove(&task) {
                p.permits.close();
                let _ = p.report.send(Report::Ended(p.id));
            }
        }
        ToLeader::Failed { task, reason } => {
            if let Some(p) = tasks.remove(&task) {
                p.permits.close();
                let _ = p.report.send(Report::Failed(reason));
            }
        }
    }
}

/// Serves a reader link on a process other than 0, until process 0 closes it:
/// starts each task it is sent on a runtime of `threads` threads and sends back
/// what they read. Returns how the link ended.
pub fn serve(link: TcpStream, threads: usize) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("tally-reader")
        .enable_all()
        .build()?;
    link.set_nonblocking(true)?;
    let result = rt.block_on(async move {
        let s = tokio::net::TcpStream::from_std(link)?;
        let (mut rd, mut wr) = s.into_split();
        let (tx, mut rx) = unbounded_channel::<ToLeader>();
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                write_frame(&mut wr, &m).await?;
            }
            Ok::<(), std::io::Error>(())
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut credits: HashMap<u64, Arc<Semaphore>> = HashMap::new();
        let ended = loop {
            match read_frame::<ToReader>(&mut rd).await {
                Ok(Some(ToReader::Start { task, work })) => {
                    let permits = Arc::new(Semaphore::new(0));
                    credits.insert(task, Arc::clone(&permits));
                    tracing::info!(partition = %work.partition(), "reading for process 0");
                    let (rtx, rrx) = unbounded_channel::<Report>();
                    tokio::spawn(forward(task, rrx, tx.clone()));
                    let stop = Arc::clone(&stop);
                    tokio::spawn(async move {
                        match work {
                            Work::Kinesis(w) => w.read(rtx, permits, stop).await,
                            Work::Fluvio(w) => w.read(rtx, permits, stop).await,
                        }
                    });
                }
                Ok(Some(ToReader::Credit { task })) => {
                    if let Some(p) = credits.get(&task) {
                        p.add_permits(1);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        stop.store(true, Ordering::Relaxed);
        for p in credits.values() {
            p.close();
        }
        drop(tx);
        writer.abort();
        ended
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

/// Sends one task's reports over the link.
async fn forward(task: u64, mut rx: UnboundedReceiver<Report>, tx: UnboundedSender<ToLeader>) {
    while let Some(r) = rx.recv().await {
        let m = match r {
            Report::Batch(_, lines) => ToLeader::Batch { task, lines },
            Report::Idle(_) => ToLeader::Idle { task },
            Report::Ended(_) => ToLeader::Ended { task },
            Report::Failed(reason) => ToLeader::Failed { task, reason },
        };
        if tx.send(m).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_lines_and_refuse_garbage() {
        let raw = br#"{"event_id":"e1","provider_id":"p","product_id":"x","customer_id":"c","kind":"sale","amount":"1.50","currency":"USD","ts":1000}"#;
        let line = Line {
            offset: 7,
            end: 8,
            raw: raw.to_vec(),
            decoded: crate::decode::decode(raw),
        };
        let bad = Line {
            offset: 8,
            end: 9,
            raw: b"nope".to_vec(),
            decoded: crate::decode::decode(b"nope"),
        };
        let msg = ToLeader::Batch {
            task: 3,
            lines: vec![(line, "seq-1".into()), (bad, String::new())],
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).await.unwrap();
        let got: ToLeader = read_frame(&mut &buf[..]).await.unwrap().unwrap();
        let ToLeader::Batch { task, lines } = got else {
            panic!("not a batch")
        };
        assert_eq!(task, 3);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].0.raw, raw.to_vec());
        assert_eq!(lines[0].0.decoded, crate::decode::decode(raw));
        assert_eq!((lines[0].0.offset, lines[0].0.end), (7, 8));
        assert_eq!(lines[0].1, "seq-1");
        assert_eq!(lines[1].0.decoded, Err(crate::decode::Reason::InvalidJson));
        // A clean end, then a torn frame and an oversized one.
        assert!(read_frame::<ToLeader>(&mut &[][..])
            .await
            .unwrap()
            .is_none());
        assert!(read_frame::<ToLeader>(&mut &buf[..buf.len() - 1])
            .await
            .is_err());
        let huge = (u32::MAX).to_be_bytes();
        assert!(read_frame::<ToLeader>(&mut &huge[..]).await.is_err());
    }
}
