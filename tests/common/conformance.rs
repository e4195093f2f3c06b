//! The source conformance suite: what every partitioned broker source must do,
//! whatever the broker. `tests/kinesis.rs` runs it against kinesalite on every
//! run; `tests/fluvio.rs` runs it against the Fluvio cluster `FLUVIO_SC_ADDR` names.
//!
//! - positions and resume: a run killed (-9) mid-stream and run again to the end
//!   commits every record once and gives the export and dead letters of the file
//!   that was published; the partitions' committed positions add up to the
//!   records; a third run reads nothing new;
//! - reconnect: a run whose connections to the broker are all cut mid-stream (and
//!   new ones refused for a few seconds) backs off, reconnects and ends with the
//!   same export, every record once;
//! - scale-out: a cluster of 2 processes x 2 workers reads the partitions on both
//!   processes, stops on a SIGTERM mid-stream, resumes, and gives the same export.

use super::cluster::{finish, hosts_file, process, stderr};
use super::proxy::Proxy;
use super::{gen_to, run_until_eof, tally, wait_for};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A broker holding streams (topics) of partitions, as the suite drives it.
pub trait Broker {
    /// A new stream of `partitions` partitions, named for `test`; its name.
    fn create(&self, test: &str, partitions: u32) -> String;
    /// Puts every line of `file` to `name` with `tally publish`.
    fn publish(&self, name: &str, file: &Path);
    /// Where the source connects (`host:port`): the broker, or a proxy in front.
    fn addr(&self) -> String;
    /// The `tally run` flags that read `name` from the broker at `addr`.
    fn read_args(&self, name: &str, addr: &str) -> Vec<String>;
    /// What a reading process needs in its environment (credentials).
    fn env(&self) -> Vec<(&'static str, &'static str)>;
    /// The source name of partitions of `name`, up to the partition: `kinesis:NAME/`.
    fn partition_prefix(&self, name: &str) -> String;
}

/// `tally run` reading `name` through `addr` into `data`, with `extra`.
pub fn run(b: &dyn Broker, name: &str, addr: &str, data: &Path, extra: &[&str]) -> Command {
    let mut c = tally();
    c.arg("run")
        .args(b.read_args(name, addr))
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .envs(b.env());
    c
}

/// Runs to the end of the stream; panics if the run fails.
pub fn run_to_end(b: &dyn Broker, name: &str, data: &Path, extra: &[&str]) {
    let out = run(
        b,
        name,
        &b.addr(),
        data,
        &[&["--until-eof"], extra].concat(),
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The embedded store's meta in `data`.
pub fn meta(data: &Path) -> tally::store::Meta {
    let s = tally::store::embedded::EmbeddedStore::open_reader(data).unwrap();
    tally::store::Store::meta(&s).clone()
}

/// Records committed in `data` so far (0 before the first commit).
fn committed(data: &Path) -> u64 {
    if data.join("store").is_dir() {
        meta(data).counters.records
    } else {
        0
    }
}

/// A generated stream with bad records published to a new stream of
/// `partitions`, and the outcome of one process reading the file itself.
struct Published {
    tmp: tempfile::TempDir,
    name: String,
    lines: u64,
    want: (String, Vec<(String, String)>),
}

fn published(b: &dyn Broker, test: &str, partitions: u32, events: &str) -> Published {
    let name = b.create(test, partitions);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("events.jsonl");
    gen_to(
        &file,
        &["--events", events, "--seed", "7", "--bad-rate", "0.01"],
    );
    b.publish(&name, &file);
    let single = tmp.path().join("file-run");
    run_until_eof(&file, &single, Some(1), None, None);
    Published {
        name,
        lines: line_count(&file),
        want: outcome(&single),
        tmp,
    }
}

impl Published {
    /// Every record committed once, the partitions' positions add up, the outcome
    /// is the file's.
    fn assert_exact(&self, b: &dyn Broker, data: &Path) -> tally::store::Meta {
        assert_same(&outcome(data), &self.want);
        let m = meta(data);
        assert_eq!(
            m.counters.records, self.lines,
            "every record committed once"
        );
        let prefix = b.partition_prefix(&self.name);
        let counted: u64 = m
            .positions
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .map(|(_, p)| *p)
            .sum();
        assert_eq!(
            counted, self.lines,
            "the partitions' positions add up to the records"
        );
        m
    }
}

/// Positions and resume. Returns the final meta, for the source's own checks of
/// its checkpoints.
pub fn resumes_exactly_across_a_kill(b: &dyn Broker) -> tally::store::Meta {
    let p = published(b, "kill", 2, "30000");
    let data = p.tmp.path().join("d");
    let mut child = run(
        b,
        &p.name,
        &b.addr(),
        &data,
        &["--until-eof", "--workers", "2"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    wait_for("a first commit", Duration::from_secs(120), || {
        committed(&data) > 0
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let before = committed(&data);
    assert!(
        before < p.lines,
        "the kill landed mid-run: {before} of {} committed",
        p.lines
    );

    run_to_end(b, &p.name, &data, &["--workers", "1"]);
    p.assert_exact(b, &data);
    // Nothing new: a third run commits nothing and changes nothing.
    run_to_end(b, &p.name, &data, &[]);
    p.assert_exact(b, &data)
}

/// Reconnect: every connection to the broker cut mid-run, and new ones refused
/// for three seconds. Returns the run's log, for the source's own checks.
pub fn reconnects_after_a_network_cut(b: &dyn Broker) -> String {
    let p = published(b, "cut", 2, "60000");
    let proxy = Proxy::start(&b.addr());
    let data = p.tmp.path().join("d");
    let child = run(b, &p.name, &proxy.addr(), &data, &["--until-eof"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a first commit", Duration::from_secs(120), || {
        committed(&data) > 0
    });
    proxy.cut();
    let at_cut = committed(&data);
    assert!(
        at_cut < p.lines,
        "the cut landed mid-run: {at_cut} of {} committed",
        p.lines
    );
    std::thread::sleep(Duration::from_secs(3));
    proxy.restore();
    let out = finish(child, "the run after the cut", Duration::from_secs(180));
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(proxy.refused() > 0, "the cut broke connections");
    p.assert_exact(b, &data);
    log
}

/// Scale-out: 4 partitions read by 2 processes x 2 workers, two on each. The
/// cluster is first stopped by a SIGTERM of process 0 mid-stream (both processes
/// exit 0, having committed what they read), then started again to the end.
pub fn spreads_over_a_cluster(b: &dyn Broker) {
    let p = published(b, "cluster", 4, "60000");
    let hosts = hosts_file(p.tmp.path(), 2);
    let data = p.tmp.path().join("cluster");
    let addr = b.addr();
    let mut read = b.read_args(&p.name, &addr);
    read.extend(["--data-dir".into(), data.display().to_string()]);
    let read: Vec<&str> = read.iter().map(String::as_str).collect();
    // Where each partition is read shows in the logs (info); the credentials reach
    // both processes through the environment, as in a deployment.
    let start = |extra: &[&str]| {
        let follower = process(&hosts, 2, 1, 2, &[])
            .envs(b.env())
            .env("TALLY_LOG", "info")
            .spawn()
            .unwrap();
        let leader = process(&hosts, 2, 0, 2, &[&read[..], extra].concat())
            .envs(b.env())
            .env("TALLY_LOG", "info")
            .spawn()
            .unwrap();
        (leader, follower)
    };
    let finished = |leader, follower, what: &str| {
        let l = finish(leader, "the leader", Duration::from_secs(180));
        assert!(l.status.success(), "leader failed {what}: {}", stderr(&l));
        let f = finish(follower, "the follower", Duration::from_secs(30));
        assert!(f.status.success(), "follower failed {what}: {}", stderr(&f));
        (l, f)
    };

    let (leader, follower) = start(&[]);
    wait_for("a first commit", Duration::from_secs(120), || {
        committed(&data) > 0
    });
    Command::new("kill")
        .args(["-TERM", &leader.id().to_string()])
        .status()
        .unwrap();
    finished(leader, follower, "after SIGTERM");
    let stopped = committed(&data);
    assert!(
        stopped < p.lines,
        "SIGTERM landed mid-run: {stopped} of {} committed",
        p.lines
    );

    let (leader, follower) = start(&["--until-eof"]);
    let (l, f) = finished(leader, follower, "resuming");
    p.assert_exact(b, &data);

    let prefix = b.partition_prefix(&p.name);
    let partitions_in = |log: &str, what: &str| -> std::collections::BTreeSet<String> {
        log.lines()
            .filter(|l| l.contains(what))
            .filter_map(|l| {
                let at = l.find(&prefix)?;
                Some(l[at..].split(char::is_whitespace).next()?.to_owned())
            })
            .collect()
    };
    let remote = partitions_in(&stderr(&f), "reading for process 0");
    assert_eq!(
        remote.len(),
        2,
        "process 1 read two partitions: {}",
        stderr(&f)
    );
    assert_eq!(
        partitions_in(&stderr(&l), "read on another process"),
        remote,
        "process 0 placed those two there"
    );
}

/// What a store holds, to compare runs: the export, and the dead letters as sorted
/// (reason, raw record) (their sources, offsets and epochs differ by design).
pub fn outcome(data: &Path) -> (String, Vec<(String, String)>) {
    let export = super::ok(&["export", "--data-dir", data.to_str().unwrap()]);
    let text = std::fs::read_to_string(data.join("dead-letters.jsonl")).unwrap_or_default();
    let mut dead: Vec<(String, String)> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["reason"].as_str().unwrap().to_owned(),
                v["raw"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    dead.sort();
    (String::from_utf8(export.stdout).unwrap(), dead)
}

/// Asserts two outcomes equal, naming the first differences.
pub fn assert_same(got: &(String, Vec<(String, String)>), want: &(String, Vec<(String, String)>)) {
    let only = |a: &[(String, String)], b: &[(String, String)]| -> Vec<(String, String)> {
        a.iter()
            .filter(|x| !b.contains(x))
            .take(3)
            .cloned()
            .collect()
    };
    assert!(
        got.1 == want.1,
        "dead letters differ: {} against {}; only in the stream's: {:?}; only in the file's: {:?}",
        got.1.len(),
        want.1.len(),
        only(&got.1, &want.1),
        only(&want.1, &got.1)
    );
    let (g, w): (Vec<&str>, Vec<&str>) = (got.0.lines().collect(), want.0.lines().collect());
    let first = g.iter().zip(&w).position(|(a, b)| a != b);
    assert!(
        got.0 == want.0,
        "exports differ: {} rows against {}; first difference at row {first:?}: {:?} against {:?}",
        g.len(),
        w.len(),
        first.map(|i| g[i]),
        first.map(|i| w[i])
    );
}

/// Lines in a file.
pub fn line_count(p: &Path) -> u64 {
    std::fs::read(p)
        .unwrap()
        .iter()
        .filter(|b| **b == b'\n')
        .count() as u64
}
