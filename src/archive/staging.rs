//! The staging log: every decoded record that entered the dataflow, per committed epoch,
//! with its position, watermark and the epoch's clock. Replaying it through the
//! dataflow (same epochs, same order, same clocks) rebuilds every operator's state as it
//! was, which is how a restart resumes without losing or double counting. Epochs whose
//! effects have all expired by the committed clock are skipped (see `ingest`): they
//! could only rebuild state that would be dropped again, and the committer deletes
//! the files that hold nothing else ([`StagingLog::trim`]), so the log on disk stays
//! about the horizon's worth of epochs on an endless stream.
//!
//! Files `<data dir>/staging/log.bin`, then `log.<start>.<epoch>.<clock>.bin` once
//! each has reached the pipeline's `[staging] segment_size` (64 MiB, about two million
//! `tally gen` events, by default): one byte sequence, cut into files, one frame per epoch,
//! `len u32 | xxh3 u64 | zstd(bincode(StagedEpoch))` (see `store::frame`; logs
//! written before compression hold plain `bincode(StagedEpoch)` frames, and still
//! read). The committer appends and fsyncs an epoch's frame before committing the
//! epoch to the store, and the store records the log's length (its end, counted from
//! the first byte ever written); at open, anything past that length (an epoch that
//! never committed) is cut.

use crate::dataflow::Epoch;
use crate::model::{Millis, Position};
use crate::store::frame;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// One record as staged: where it was read, its watermark, and its bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StagedRecord {
    /// Index into [`StagedEpoch::sources`].
    pub source: u32,
    pub offset: u64,
    pub wm: Millis,
    pub raw: std::sync::Arc<str>,
}

/// One epoch of dataflow input.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StagedEpoch {
    pub epoch: Epoch,
    pub clock: Millis,
    /// Names of the sources the records came from.
    pub sources: Vec<String>,
    pub records: Vec<StagedRecord>,
}

impl StagedEpoch {
    /// Adds a record, naming its source in the epoch's table.
    pub fn push(&mut self, source: &str, pos: Position, wm: Millis, raw: std::sync::Arc<str>) {
        let idx = match self.sources.iter().position(|s| s == source) {
            Some(i) => i,
            None => {
                self.sources.push(source.to_owned());
                self.sources.len() - 1
            }
        };
        self.records.push(StagedRecord {
            source: idx as u32,
            offset: pos.offset,
            wm,
            raw,
        });
    }
}

/// One file of the log, holding its bytes from `base` on: `log.bin` from 0, then
/// `log.<base>.<first epoch>.<that epoch's clock>.bin`, so that trimming needs no read.
#[derive(Debug)]
struct Segment {
    base: u64,
    path: PathBuf,
    /// The first epoch in it and that epoch's clock (`None` for `log.bin`).
    first: Option<(Epoch, Millis)>,
}

fn segment_name(base: u64, epoch: Epoch, clock: Millis) -> String {
    format!("log.{base:020}.{epoch}.{clock}.bin")
}

fn parse_segment(name: &str) -> Option<(u64, Option<(Epoch, Millis)>)> {
    if name == "log.bin" {
        return Some((0, None));
    }
    let mut parts = name.strip_prefix("log.")?.strip_suffix(".bin")?.split('.');
    let base = parts.next()?.parse().ok()?;
    let epoch = parts.next()?.parse().ok()?;
    let clock = parts.next()?.parse().ok()?;
    match parts.next() {
        None => Some((base, Some((epoch, clock)))),
        Some(_) => None,
    }
}

/// The log's files in `dir`, in order, each with its length, and apart the files
/// before a gap: a trim deletes files oldest first, and a crash in the middle of one
/// can leave an older file after a newer one is gone.
#[allow(clippy::type_complexity)]
fn segments(dir: &Path) -> io::Result<(Vec<(Segment, u64)>, Vec<Segment>)> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((found, Vec::new())),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some((base, first)) = name.to_str().and_then(parse_segment) else {
            continue;
        };
        let len = entry.metadata()?.len();
        found.push((
            Segment {
                base,
                path: entry.path(),
                first,
            },
            len,
        ));
    }
    found.sort_by_key(|(s, _)| s.base);
    let start = (1..found.len())
        .rev()
        .find(|&i| found[i - 1].0.base + found[i - 1].1 != found[i].0.base)
        .unwrap_or(0);
    let kept = found.split_off(start);
    Ok((kept, found.into_iter().map(|(s, _)| s).collect()))
}

pub struct StagingLog {
    dir: PathBuf,
    /// Never empty; the last one is written.
    segments: Vec<Segment>,
    file: File,
    /// The log's length: the end of the last segment.
    len: u64,
    segment_bytes: u64,
    /// The frame body being written, kept between epochs: a busy epoch's frame is over
    /// 10 MB (about 13 MB in the 10M benchmark), and a new buffer each time was faulted
    /// in afresh.
    body: Vec<u8>,
    /// Compresses each frame: the records' JSON shrinks about 7 times, so the log
    /// writes (and keeps on disk) that much less.
    zstd: frame::Zstd,
}

/// Refuses a log shorter than what the store says is committed: the store's
/// commits came from another data directory.
fn check_len(path: &Path, actual: u64, committed_len: u64) -> io::Result<()> {
    if actual < committed_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the staging log in {} is shorter ({actual} bytes) than the store's committed length \
                 ({committed_len}): the store's commits came from another data directory; \
                 run with that one, or commit to a new store (another --redis-namespace)",
                path.display()
            ),
        ));
    }
    Ok(())
}

impl StagingLog {
    /// Checks, without changing anything, that `data_dir` holds a log at least
    /// `committed_len` long (before a writer takes over a store it cannot resume).
    pub fn check(data_dir: &Path, committed_len: u64) -> io::Result<()> {
        let dir = data_dir.join("staging");
        let end = segments(&dir)?.0.last().map_or(0, |(s, len)| s.base + len);
        check_len(&dir, end, committed_len)
    }

    /// Opens the log, cutting it to `committed_len` (what the store says is committed):
    /// files that start at or past it are deleted, and the one it ends in is cut there.
    pub fn open(data_dir: &Path, committed_len: u64) -> io::Result<StagingLog> {
        let dir = data_dir.join("staging");
        std::fs::create_dir_all(&dir)?;
        let (mut found, stale) = segments(&dir)?;
        for s in stale {
            tracing::warn!(file = %s.path.display(), "deleting a staging log file left before a gap (a trim cut short)");
            std::fs::remove_file(&s.path)?;
        }
        let end = found.last().map_or(0, |(s, len)| s.base + len);
        check_len(&dir, end, committed_len)?;
        if let Some((first, _)) = found.first() {
            if first.base > committed_len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} starts at byte {}, after the store's committed length \
                         ({committed_len}): the store is older than the log's trimming, \
                         or came from another data directory",
                        first.path.display(),
                        first.base
                    ),
                ));
            }
        }
        while found.len() > 1 && found.last().expect("not empty").0.base >= committed_len {
            let (s, _) = found.pop().expect("not empty");
            std::fs::remove_file(&s.path)?;
        }
        let mut segments: Vec<Segment> = found.into_iter().map(|(s, _)| s).collect();
        if segments.is_empty() {
            segments.push(Segment {
                base: 0,
                path: dir.join("log.bin"),
                first: None,
            });
        }
        let last = segments.last().expect("not empty");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&last.path)?;
        file.set_len(committed_len - last.base)?;
        file.seek(SeekFrom::Start(committed_len - last.base))?;
        let log = StagingLog {
            dir,
            segments,
            file,
            len: committed_len,
            segment_bytes: crate::pipeline::Staging::default().segment_size,
            body: Vec::new(),
            zstd: frame::Zstd::new()?,
        };
        log.report();
        Ok(log)
    }

    /// Starts a new file once the one being written holds `bytes` (`[staging]
    /// segment_size`; 64 MiB unless set).
    pub fn with_segment_size(mut self, bytes: u64) -> StagingLog {
        self.segment_bytes = bytes.max(1);
        self
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.segments.last().expect("never empty").path
    }

    /// The bytes the log's files hold.
    pub fn bytes(&self) -> u64 {
        self.len - self.segments[0].base
    }

    fn report(&self) {
        metrics::gauge!(crate::metrics::STAGING_LOG_BYTES).set(self.bytes() as f64);
    }

    /// Appends one epoch durably; returns the log's new length.
    pub fn append(&mut self, e: &StagedEpoch) -> io::Result<u64> {
        let last = self.segments.last().expect("never empty");
        if self.len - last.base >= self.segment_bytes {
            self.roll(e)?;
        }
        self.body.clear();
        bincode::serialize_into(&mut self.body, e).map_err(io::Error::other)?;
        // The frame writer counts in the file (a failed append is cut back there).
        let base = self.segments.last().expect("never empty").base;
        let mut in_file = self.len - base;
        self.zstd.append(&mut self.file, &mut in_file, &self.body)?;
        self.len = base + in_file;
        self.report();
        Ok(self.len)
    }

    /// Starts a new file at the log's end, for epoch `e` on.
    fn roll(&mut self, e: &StagedEpoch) -> io::Result<()> {
        let path = self.dir.join(segment_name(self.len, e.epoch, e.clock));
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)?;
        // The new name must outlive a crash before the frame's fsync counts.
        File::open(&self.dir)?.sync_all()?;
        self.file = file;
        self.segments.push(Segment {
            base: self.len,
            path,
            first: Some((e.epoch, e.clock)),
        });
        Ok(())
    }

    /// Deletes the oldest files whose every epoch `expired(epoch, clock)` says a replay
    /// would skip, never the file being written; returns how many were deleted.
    /// A file's last epoch is judged with the next file's first clock, which is no
    /// earlier than its own (the clock never goes back).
    pub fn trim(&mut self, expired: impl Fn(Epoch, Millis) -> bool) -> io::Result<usize> {
        let mut n = 0;
        while self.segments.len() > 1 {
            let (next_epoch, next_clock) = self.segments[1].first.expect("named files say it");
            if next_clock == Millis::MIN || !expired(next_epoch.saturating_sub(1), next_clock) {
                break;
            }
            match std::fs::remove_file(&self.segments[0].path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            self.segments.remove(0);
            n += 1;
        }
        if n > 0 {
            self.report();
        }
        Ok(n)
    }

    /// Reads the committed epochs back, in order (opening one file at a time).
    pub fn read(&self) -> io::Result<impl Iterator<Item = io::Result<StagedEpoch>>> {
        let files: Vec<(PathBuf, u64)> = self
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let end = self.segments.get(i + 1).map_or(self.len, |n| n.base);
                (s.path.clone(), end - s.base)
            })
            .collect();
        let mut files = files.into_iter();
        let mut current: Option<(PathBuf, BufReader<io::Take<File>>)> = None;
        Ok(std::iter::from_fn(move || loop {
            if current.is_none() {
                let (path, len) = files.next()?;
                match File::open(&path) {
                    Ok(f) => current = Some((path, BufReader::new(f.take(len)))),
                    Err(e) => {
                        files = Vec::new().into_iter();
                        return Some(Err(io::Error::new(
                            e.kind(),
                            format!("{}: {e}", path.display()),
                        )));
                    }
                }
            }
            let (path, r) = current.as_mut().expect("opened above");
            let corrupt = |what: &str| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {what} inside the committed length", path.display()),
                )
            };
            match frame::read(r) {
                Ok(None) => current = None,
                Ok(Some(body)) => {
                    return Some(bincode::deserialize(&body).map_err(|e| corrupt(&e.to_string())))
                }
                Err(e) => return Some(Err(corrupt(&e.to_string()))),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(n: Epoch, records: usize) -> StagedEpoch {
        let mut e = StagedEpoch {
            epoch: n,
            clock: 1_700_000_000_000 + n as Millis,
            ..StagedEpoch::default()
        };
        for i in 0..records {
            let raw = format!(
                r#"{{"event_id":"e-{n}-{i}","provider_id":"p-{}","kind":"sale","amount":"{i}.25"}}"#,
                i % 3
            );
            e.push(
                "in.jsonl",
                Position {
                    source: 0,
                    offset: (i * 80) as u64,
                },
                e.clock,
                raw.into(),
            );
        }
        e
    }

    fn same(a: &StagedEpoch, b: &StagedEpoch) -> bool {
        a.epoch == b.epoch
            && a.clock == b.clock
            && a.sources == b.sources
            && a.records.len() == b.records.len()
            && a.records.iter().zip(&b.records).all(|(x, y)| {
                x.source == y.source && x.offset == y.offset && x.wm == y.wm && x.raw == y.raw
            })
    }

    /// A log written before frames were compressed (plain bincode frames) is resumed
    /// by this version: its epochs and the new, compressed ones read back alike, and a
    /// new epoch takes a fraction of its plain size.
    #[test]
    fn a_log_from_before_compression_is_resumed_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let first = epoch(1, 500);
        let path = dir.path().join("staging").join("log.bin");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut len = 0;
        let plain = bincode::serialize(&first).unwrap();
        frame::append(&mut file, &mut len, &plain).unwrap();
        drop(file);

        let mut log = StagingLog::open(dir.path(), len).unwrap();
        let second = epoch(2, 500);
        let after = log.append(&second).unwrap();
        assert!(
            after - len < (plain.len() / 4) as u64,
            "epoch 2 took {} bytes; epoch 1, plain, {}",
            after - len,
            plain.len()
        );
        let got: Vec<StagedEpoch> = log.read().unwrap().map(|e| e.unwrap()).collect();
        assert_eq!(got.len(), 2);
        assert!(same(&got[0], &first) && same(&got[1], &second));
        // Reopened at the committed length, it reads the same.
        let log = StagingLog::open(dir.path(), after).unwrap();
        assert_eq!(log.read().unwrap().count(), 2);
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("staging"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort_by_key(|n| parse_segment(n).map(|(base, _)| base));
        names
    }

    fn epochs_in(log: &StagingLog) -> Vec<Epoch> {
        log.read().unwrap().map(|e| e.unwrap().epoch).collect()
    }

    /// Past the segment size the log goes on in a new file, named by where it starts
    /// and its first epoch; reading, reopening and cutting back work across files.
    #[test]
    fn the_log_rolls_into_files_that_read_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = StagingLog::open(dir.path(), 0).unwrap();
        log.segment_bytes = 1;
        let mut ends = Vec::new();
        for n in 1..=5 {
            ends.push(log.append(&epoch(n, 20)).unwrap());
        }
        let names = files(dir.path());
        assert_eq!(names.len(), 5, "{names:?}");
        assert_eq!(names[0], "log.bin");
        let clock2 = epoch(2, 0).clock;
        assert_eq!(names[1], format!("log.{:020}.2.{clock2}.bin", ends[0]));
        assert_eq!(log.bytes(), ends[4]);
        assert_eq!(epochs_in(&log), vec![1, 2, 3, 4, 5]);
        StagingLog::check(dir.path(), ends[4]).unwrap();
        assert!(StagingLog::check(dir.path(), ends[4] + 1).is_err());

        // The store committed only up to epoch 3: epochs 4 and 5 (a crash after they
        // were written) go, their files with them, and the log goes on from 3.
        drop(log);
        let mut log = StagingLog::open(dir.path(), ends[2]).unwrap();
        assert_eq!(files(dir.path()).len(), 3);
        assert_eq!(epochs_in(&log), vec![1, 2, 3]);
        log.segment_bytes = u64::MAX;
        let end = log.append(&epoch(4, 20)).unwrap();
        assert_eq!(files(dir.path()).len(), 3);
        let log = StagingLog::open(dir.path(), end).unwrap();
        assert_eq!(epochs_in(&log), vec![1, 2, 3, 4]);
    }

    /// A new log in `dir` of epochs 1 to `n`, each in a file of its own; and its length.
    fn one_epoch_a_file(dir: &Path, n: Epoch) -> (StagingLog, u64) {
        let mut log = StagingLog::open(dir, 0).unwrap().with_segment_size(1);
        let mut end = 0;
        for e in 1..=n {
            end = log.append(&epoch(e, 20)).unwrap();
        }
        (log, end)
    }

    /// Trimming deletes the oldest files whose epochs have all expired, never the one
    /// written; the log then reads and reopens from the first file kept.
    #[test]
    fn trimming_deletes_whole_files_of_expired_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, end) = one_epoch_a_file(dir.path(), 6);
        let before = log.bytes();
        // Epochs up to 3 have expired. File i holds epoch i alone: files 1 to 3 go.
        let asked = std::cell::RefCell::new(Vec::new());
        let n = log
            .trim(|e, clock| {
                asked.borrow_mut().push(e);
                // The next file's first clock stands for this file's last.
                assert_eq!(clock, epoch(e + 1, 0).clock);
                e <= 3
            })
            .unwrap();
        assert_eq!(n, 3);
        assert_eq!(asked.into_inner(), vec![1, 2, 3, 4]);
        assert!(!files(dir.path()).contains(&"log.bin".to_string()));
        assert_eq!(files(dir.path()).len(), 3);
        assert!(log.bytes() < before);
        assert_eq!(epochs_in(&log), vec![4, 5, 6]);
        // Everything expired: the file being written stays.
        assert_eq!(log.trim(|_, _| true).unwrap(), 2);
        assert_eq!(epochs_in(&log), vec![6]);
        drop(log);
        let mut log = StagingLog::open(dir.path(), end).unwrap();
        assert_eq!(epochs_in(&log), vec![6]);
        let end = log.append(&epoch(7, 20)).unwrap();
        StagingLog::check(dir.path(), end).unwrap();
        // A store from before the trimming (its length inside a deleted file) is refused.
        let err = StagingLog::open(dir.path(), 10).err().unwrap();
        assert!(
            err.to_string()
                .contains("after the store's committed length"),
            "{err}"
        );
    }

    /// A crash in the middle of a trim can leave an older file after a newer one is
    /// gone: the files before the gap are no part of the log, and are deleted.
    #[test]
    fn files_before_a_gap_are_not_part_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (log, end) = one_epoch_a_file(dir.path(), 4);
        drop(log);
        let second = files(dir.path())[1].clone();
        std::fs::remove_file(dir.path().join("staging").join(second)).unwrap();
        let log = StagingLog::open(dir.path(), end).unwrap();
        assert_eq!(epochs_in(&log), vec![3, 4]);
        assert_eq!(files(dir.path()).len(), 2);
        assert!(!files(dir.path()).contains(&"log.bin".to_string()));
    }
}
