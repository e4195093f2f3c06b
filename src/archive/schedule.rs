//! Compaction inside `tally run` (`archive.schedule`): each provider-local day is
//! compacted once every provider staged for it has closed it and the allowed lateness
//! has passed, by event time (the committed clock), and again whenever facts for it
//! are staged later (a void within the dedup horizon).
//!
//! The committer decides, between two commits, so the compaction sees one consistent
//! instant: it flushes the staging, lists the day's staging files and takes the store's
//! rows, all at the same committed epoch, and hands them to the compactor thread, which
//! does the slow part (reading, writing Parquet, verifying) while commits go on.

use super::compact::{self, day_bounds, Outcome};
use super::lake::Lake;
use crate::model::Millis;
use crate::pipeline::Pipeline;
use crate::store::StoredRow;
use crossbeam_channel::Sender;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

struct Job {
    date: String,
    staging: Vec<String>,
    rows: Arc<Vec<StoredRow>>,
}

pub struct Scheduler {
    pipeline: Arc<Pipeline>,
    /// Dates with facts staged since their last compaction, with the event time by
    /// which every provider seen has closed the day, lateness included.
    pending: BTreeMap<String, Millis>,
    jobs: Option<Sender<Job>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the compactor thread on `lake`; dates already staged are pending.
    pub fn start(pipeline: Arc<Pipeline>, lake: Lake) -> Result<Scheduler, super::lake::LakeError> {
        let mut pending = BTreeMap::new();
        // Providers of a day staged before this start are not known: wait for every
        // configured zone (and the default one).
        let zones: BTreeSet<String> = pipeline
            .time_zones
            .keys()
            .cloned()
            .chain(std::iter::once(String::new()))
            .collect();
        for (path, _) in lake.list("staging")? {
            if let Some(date) = path
                .strip_prefix("staging/date=")
                .and_then(|r| r.split('/').next())
            {
                if let Some(at) = closes(&pipeline, date, &zones) {
                    pending.insert(date.to_owned(), at);
                }
            }
        }
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let p = Arc::clone(&pipeline);
        let worker = std::thread::Builder::new()
            .name("tally-compactor".into())
            .spawn(move || {
                background_priority();
                for job in rx {
                    run_job(&lake, &p, job);
                }
            })
            .expect("spawn compactor");
        Ok(Scheduler {
            pipeline,
            pending,
            jobs: Some(tx),
            worker: Some(worker),
        })
    }

    /// Facts were staged for these dates and providers.
    pub fn staged(&mut self, dates: BTreeMap<String, BTreeSet<String>>) {
        for (d, provs) in dates {
            if let Some(at) = closes(&self.pipeline, &d, &provs) {
                let e = self.pending.entry(d).or_insert(at);
                *e = (*e).max(at);
            }
        }
    }

    /// The pending dates every provider has closed by `clock`, lateness included.
    pub fn due(&self, clock: Millis) -> Vec<String> {
        self.pending
            .iter()
            .filter(|(_, at)| **at <= clock)
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// Hands `date` to the compactor with the staging files and rows of this instant.
    pub fn submit(&mut self, date: String, staging: Vec<String>, rows: Arc<Vec<StoredRow>>) {
        self.pending.remove(&date);
        if let Some(tx) = &self.jobs {
            let _ = tx.send(Job {
                date,
                staging,
                rows,
            });
        }
    }

    /// Lets the compactor finish what it was given, then stops it.
    pub fn finish(mut self) {
        self.jobs = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Lowers the calling thread's CPU priority to nice 10, as databases run their
/// compactions: when the cores are busy, the worker and committer (freshness) go first
/// and compaction takes what they leave; on idle cores it runs at full speed. Linux
/// keeps a nice value per thread, so the rest of the process is untouched; the
/// threads a compaction starts for its providers inherit it. A failure
/// (a sandbox that forbids it) leaves the priority as it was; elsewhere than on Linux
/// it does nothing.
#[cfg(target_os = "linux")]
fn background_priority() {
    // SAFETY: plain system calls on the calling thread's own id.
    let r = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10)
    };
    if r != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "the compactor keeps its CPU priority"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn background_priority() {}

/// When the last of `providers` closes `date`, plus the allowed lateness.
fn closes(p: &Pipeline, date: &str, providers: &BTreeSet<String>) -> Option<Millis> {
    let day = compact::parse_date(date).ok()?;
    let lateness = p.allowed_lateness.as_millis() as Millis;
    providers
        .iter()
        .map(|prov| day_bounds(p, prov, day).1.saturating_add(lateness))
        .max()
}

fn run_job(lake: &Lake, p: &Pipeline, job: Job) {
    match compact::compact_day_with(
        lake,
        p,
        &job.rows,
        &job.date,
        None,
        Some(job.staging),
        |_| {},
    ) {
        Ok(s) => {
            let published = s
                .providers
                .iter()
                .filter(|(_, o)| matches!(o, Outcome::Published { .. }))
                .count();
            tracing::info!(
                date = %s.date,
                providers = s.providers.len(),
                published,
                mismatches = s.mismatches(),
                seconds = s.seconds,
                "compacted a day"
            );
        }
        Err(e) => {
            tracing::error!(date = %job.date, error = %e, "compaction failed; the previous version is kept, it is tried again when the day gets new facts or at the next start");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The nice value of the calling thread, from `/proc/thread-self/stat`.
    fn nice() -> i64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the command (which may hold spaces) start at state, field 3.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(19 - 3).unwrap().parse().unwrap()
    }

    #[test]
    fn the_compactor_thread_runs_at_nice_10_and_leaves_the_others_alone() {
        let before = nice();
        let inside = std::thread::spawn(|| {
            super::background_priority();
            nice()
        })
        .join()
        .unwrap();
        assert_eq!(inside, (before + 10).min(19));
        assert_eq!(nice(), before, "the calling thread's priority changed");
    }
}
