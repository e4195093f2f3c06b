//! Kinesis against kinesalite (a real Kinesis API server, in memory, on loopback):
//! `tally publish --to kinesis` puts every line once, keyed by provider; `tally run
//! --kinesis` reads every shard to the same export as the file it was published
//! from, across a kill, a split and a merge, and throttling.

mod common;

use common::conformance::{self, assert_same, line_count, meta, outcome, Broker};
use common::kinesis::{Kinesalite, ENV};
use common::{gen_to, tally};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A generated file with bad records, put to a 2-shard stream: every line arrives
/// once (bad ones too, for Tally to dead-letter), keyed by its provider_id (`-`
/// without one), and each provider's records share one shard.
#[test]
fn publish_puts_every_line_once_keyed_by_provider() {
    let (b, _tmp, events) = two_shards(
        &[],
        "events.jsonl",
        &["--events", "3000", "--bad-rate", "0.02"],
    );
    let (k, rt) = (&b.k, &b.rt);
    let out = tally()
        .args(["publish", events.to_str().unwrap(), "--to", "kinesis"])
        .args(["--stream", "sales", "--endpoint", &k.endpoint()])
        .envs(ENV)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("3000 records put to Kinesis stream sales in "),
        "{text}"
    );

    let got = rt.block_on(k.read_all("sales"));
    let raw = std::fs::read(&events).unwrap();
    let mut want: Vec<&[u8]> = raw.split(|b| *b == b'\n').collect();
    want.pop(); // after the last newline
    assert_eq!(want.len(), 3000);
    let mut got_lines: Vec<&[u8]> = got.iter().map(|(_, _, d)| d.as_slice()).collect();
    got_lines.sort();
    want.sort();
    assert!(
        got_lines == want,
        "the stream's records differ from the file's lines"
    );

    let mut shard_of: BTreeMap<&str, &str> = BTreeMap::new();
    let mut unkeyed = 0;
    for (shard, key, data) in &got {
        let v: Option<serde_json::Value> = serde_json::from_slice(data).ok();
        match v
            .as_ref()
            .and_then(|v| v["provider_id"].as_str())
            .filter(|p| !p.is_empty())
        {
            Some(p) => assert_eq!(key, p),
            None => {
                assert_eq!(key, "-");
                unkeyed += 1;
            }
        }
        let first = shard_of.entry(key.as_str()).or_insert(shard.as_str());
        assert_eq!(*first, shard.as_str(), "{key} spans shards");
    }
    assert!(unkeyed >= 5, "bad records were sent too: {unkeyed}");
    let shards: std::collections::BTreeSet<&&str> = shard_of.values().collect();
    assert_eq!(shards.len(), 2, "12 providers over 2 shards use both");
}

/// A stream that does not exist is named, and nothing is sent.
#[test]
fn publish_names_a_missing_stream() {
    let k = Kinesalite::start();
    let tmp = tempfile::tempdir().unwrap();
    let events = tmp.path().join("events.jsonl");
    gen_to(&events, &["--events", "10"]);
    let out = tally()
        .args(["publish", events.to_str().unwrap(), "--to", "kinesis"])
        .args(["--stream", "nope", "--endpoint", &k.endpoint()])
        .envs(ENV)
        .output()
        .unwrap();
    assert_names_nope(&out);
}

/// A kinesalite (with `options`) holding the 2-shard stream `sales`, a scratch
/// directory, and `tally gen ARGS` in it as `name`.
fn two_shards(
    options: &[&str],
    name: &str,
    gen_args: &[&str],
) -> (Kinesis, tempfile::TempDir, std::path::PathBuf) {
    let b = Kinesis::start_with(options);
    b.rt.block_on(b.k.create_stream("sales", 2));
    let tmp = tempfile::tempdir().unwrap();
    let events = tmp.path().join(name);
    gen_to(&events, gen_args);
    (b, tmp, events)
}

/// `tally run --kinesis STREAM` against `b` on `data`, with `extra` arguments.
fn run_stream(b: &Kinesis, stream: &str, data: &Path, extra: &[&str]) -> Command {
    conformance::run(b, stream, &b.addr(), data, extra)
}

/// Asserts that a command failed (exit code 3) naming the missing stream `nope`.
fn assert_names_nope(out: &std::process::Output) {
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Kinesis stream 'nope': it does not exist"),
        "{err}"
    );
}

/// The outcome of a plain file run of `input` (with `pipeline`, or the default).
fn file_outcome(
    input: &Path,
    scratch: &Path,
    pipeline: Option<&Path>,
) -> (String, Vec<(String, String)>) {
    let data = scratch.join("file-run");
    common::run_until_eof(input, &data, Some(1), pipeline, None);
    outcome(&data)
}

/// Waits until the run scraped on `addr` has committed `n` records.
fn wait_committed(addr: &str, n: u64) {
    common::wait_for(
        &format!("{n} records committed"),
        Duration::from_secs(120),
        || {
            std::net::TcpStream::connect(addr).is_ok()
                && common::find_metric(&common::scrape(addr), "tally_records_total")
                    == Some(n as f64)
        },
    );
}

/// SIGTERM, then the exit: it must be 0.
fn stop(child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// kinesalite as the conformance suite's broker; each test starts its own.
struct Kinesis {
    k: Kinesalite,
    rt: tokio::runtime::Runtime,
}

impl Kinesis {
    fn start() -> Kinesis {
        Kinesis::start_with(&[])
    }

    /// With scripts/kinesalite.js's `options`.
    fn start_with(options: &[&str]) -> Kinesis {
        Kinesis {
            k: Kinesalite::start_with(options),
            rt: rt(),
        }
    }
}

impl Broker for Kinesis {
    fn create(&self, test: &str, partitions: u32) -> String {
        self.rt
            .block_on(self.k.create_stream(test, partitions as i32));
        test.to_owned()
    }
    fn publish(&self, name: &str, file: &Path) {
        self.k.publish(name, file)
    }
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.k.port)
    }
    fn read_args(&self, name: &str, addr: &str) -> Vec<String> {
        [
            "--kinesis",
            name,
            "--kinesis-endpoint",
            &format!("http://{addr}"),
        ]
        .map(String::from)
        .to_vec()
    }
    fn env(&self) -> Vec<(&'static str, &'static str)> {
        ENV.to_vec()
    }
    fn partition_prefix(&self, name: &str) -> String {
        format!("kinesis:{name}/")
    }
}

/// The conformance suite's positions and resume on a 2-shard stream, and where
/// Kinesis resumes: the stream's start and each shard's sequence number.
#[test]
fn a_stream_gives_the_files_export_across_a_kill_resuming_at_sequence_numbers() {
    let m = conformance::resumes_exactly_across_a_kill(&Kinesis::start());
    assert_eq!(m.checkpoints["kinesis:kill"], "trim_horizon");
    let shards: Vec<&String> = m
        .checkpoints
        .keys()
        .filter(|n| n.starts_with("kinesis:kill/"))
        .collect();
    assert_eq!(shards.len(), 2, "{:?}", m.checkpoints);
    for name in shards {
        assert!(m.checkpoints[name].starts_with("after:"), "{name}");
    }
}

/// The conformance suite's network cut: GetRecords fails, backs off and retries.
#[test]
fn a_stream_is_read_exactly_across_a_network_cut() {
    let log = conformance::reconnects_after_a_network_cut(&Kinesis::start());
    assert!(log.contains("reading failed; retrying"), "{log}");
}

/// The conformance suite's scale-out: a 4-shard stream over 2 processes.
#[test]
fn a_cluster_reads_the_shards_on_every_process_and_exports_the_file() {
    conformance::spreads_over_a_cluster(&Kinesis::start());
}

/// A shard read on another process that cannot be read there (that process has no
/// AWS region) fails the run on process 0, naming the stream and the shard (exit
/// code 3), instead of leaving the shard unread.
#[test]
fn a_shard_that_fails_on_another_process_fails_the_run_naming_it() {
    use common::cluster::{finish, hosts_file, process, stderr};
    let k = Kinesalite::start();
    rt().block_on(k.create_stream("sales", 2));
    let tmp = tempfile::tempdir().unwrap();
    let hosts = hosts_file(tmp.path(), 2);
    let mut follower = process(&hosts, 2, 1, 1, &[]);
    for (name, _) in ENV {
        follower.env_remove(name);
    }
    let follower = follower
        .env_remove("AWS_DEFAULT_REGION")
        .env("AWS_CONFIG_FILE", tmp.path().join("none"))
        .spawn()
        .unwrap();
    let data = tmp.path().join("d");
    let leader = process(
        &hosts,
        2,
        0,
        1,
        &[
            "--kinesis",
            "sales",
            "--kinesis-endpoint",
            &k.endpoint(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
    )
    .envs(ENV)
    .spawn()
    .unwrap();
    let l = finish(leader, "the leader", Duration::from_secs(60));
    let err = stderr(&l);
    assert_eq!(l.status.code(), Some(3), "{err}");
    assert!(
        err.contains("Kinesis stream 'sales': shard shardId-") && err.contains("no AWS region"),
        "{err}"
    );
    // The leader ends the cluster as it fails; the follower then ends too.
    finish(follower, "the follower", Duration::from_secs(30));
}

/// Resharding: a split before the run and a merge during it. Each provider's records
/// move from a parent to its children; copies of earlier events with other fields
/// (conflicting duplicates) put after the split must lose to the originals in the
/// parent, which they do only if the parent is read to its end before its children.
/// The children are found when the parent ends, mid-run, and everything read equals
/// the file of all three parts.
#[test]
fn a_split_and_a_merge_read_parents_first_and_lose_nothing() {
    let (b, tmp, all) = two_shards(
        &[],
        "all.jsonl",
        &["--events", "9000", "--seed", "11", "--bad-rate", "0.01"],
    );
    let (k, rt) = (&b.k, &b.rt);
    let bytes = std::fs::read(&all).unwrap();
    let lines: Vec<&[u8]> = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 9000);
    let (p1, rest) = lines.split_at(3000);
    let (p2, p3) = rest.split_at(3000);
    // Each provider's last sale of part 1 again, with another customer and a minute
    // older: a copy that would win (be counted, the original refused) if it were
    // read first, as an event-time merge of parent and children would read it.
    let mut last: BTreeMap<String, (serde_json::Value, i64)> = BTreeMap::new();
    for l in p1 {
        if let Ok(e) = tally::decode::decode(l) {
            if e.kind == tally::model::Kind::Sale {
                let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                last.insert(e.provider_id.to_string(), (v, e.ts));
            }
        }
    }
    let conflicts: Vec<Vec<u8>> = last
        .into_values()
        .map(|(mut v, ts)| {
            let customer = format!("x-{}", v["customer_id"].as_str().unwrap());
            v["customer_id"] = customer.into();
            v["ts"] = (ts - 60_000).into();
            serde_json::to_vec(&v).unwrap()
        })
        .collect();
    assert!(conflicts.len() >= 10, "{}", conflicts.len());
    let write = |name: &str, parts: &[&[&[u8]]]| {
        let p = tmp.path().join(name);
        let mut body = Vec::new();
        for part in parts {
            for l in *part {
                body.extend_from_slice(l);
                body.push(b'\n');
            }
        }
        std::fs::write(&p, body).unwrap();
        p
    };
    let c: Vec<&[u8]> = conflicts.iter().map(Vec::as_slice).collect();
    let part1 = write("p1.jsonl", &[p1]);
    let part2 = write("p2.jsonl", &[&c, p2]);
    let part3 = write("p3.jsonl", &[p3]);
    let whole = write("whole.jsonl", &[p1, &c, p2, p3]);
    // Epochs of 50 records: inside one epoch the dataflow orders copies by source
    // and offset (a parent's index is the lower), so only small epochs let reading
    // order show.
    let pipeline = tmp.path().join("small-epochs.toml");
    let text = tally::pipeline::DEFAULT_PIPELINE.replace("max_events = 100000", "max_events = 50");
    assert_ne!(text, tally::pipeline::DEFAULT_PIPELINE);
    std::fs::write(&pipeline, text).unwrap();
    let want = file_outcome(&whole, tmp.path(), Some(&pipeline));
    for c in &conflicts {
        let raw = std::str::from_utf8(c).unwrap();
        assert!(
            want.1.iter().any(|(_, r)| r == raw),
            "the later copy loses in the file: {raw}"
        );
    }

    k.publish("sales", &part1);
    rt.block_on(k.split("sales", "shardId-000000000000"));
    k.publish("sales", &part2);

    let data = tmp.path().join("d");
    let addr = format!("127.0.0.1:{}", common::redis::free_port());
    let args = [
        "--metrics-addr",
        &addr,
        "--pipeline",
        pipeline.to_str().unwrap(),
    ];
    let child = run_stream(&b, "sales", &data, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_committed(&addr, line_count(&part1) + line_count(&part2));
    // Merge the split's two children while the run reads them.
    let shards = rt.block_on(k.shards("sales"));
    let open: Vec<&str> = shards
        .iter()
        .filter(|(id, open)| *open && id != "shardId-000000000001")
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(open.len(), 2, "{shards:?}");
    rt.block_on(k.merge("sales", open[0], open[1]));
    k.publish("sales", &part3);
    wait_committed(&addr, line_count(&whole));
    stop(child);

    assert_same(&outcome(&data), &want);
    let m = meta(&data);
    let ends: Vec<&str> = m
        .checkpoints
        .iter()
        .filter(|(_, c)| *c == "end")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        ends,
        [
            "kinesis:sales/shardId-000000000000",
            "kinesis:sales/shardId-000000000002",
            "kinesis:sales/shardId-000000000003"
        ],
        "the split shard and both children were read to their ends"
    );
    assert!(m.checkpoints["kinesis:sales/shardId-000000000004"].starts_with("after:"));
}

/// Every third GetRecords call throttled: the reader backs off, counts each one in
/// `tally_source_throttled_total`, and loses nothing.
#[test]
fn throttled_reads_back_off_and_lose_nothing() {
    let (b, tmp, events) = two_shards(
        &["--throttle-get-records", "3"],
        "events.jsonl",
        &["--events", "6000", "--seed", "5", "--bad-rate", "0.01"],
    );
    let k = &b.k;
    k.publish("sales", &events);
    let want = file_outcome(&events, tmp.path(), None);

    let data = tmp.path().join("d");
    let addr = format!("127.0.0.1:{}", common::redis::free_port());
    let child = run_stream(&b, "sales", &data, &["--metrics-addr", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_committed(&addr, line_count(&events));
    let injected_before = k.throttled();
    let m = common::scrape(&addr);
    let counted: f64 = m
        .lines()
        .filter(|l| l.starts_with("tally_source_throttled_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    stop(child);
    assert!(injected_before >= 1, "kinesalite throttled no call");
    assert!(
        counted >= 1.0 && counted <= k.throttled() as f64,
        "{counted} throttles counted, {} injected",
        k.throttled()
    );
    assert_same(&outcome(&data), &want);
    assert_eq!(meta(&data).counters.records, line_count(&events));
}

/// `lines` written to `dir/name` as a JSON Lines file.
fn part(dir: &Path, name: &str, lines: &[&str]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    p
}

/// `--kinesis-end`: a bounded read. Of records put before and after an instant,
/// only those that arrived before it are read; each shard read up to it is
/// checkpointed `end`, so a rerun (with more records put) reads nothing more.
#[test]
fn an_end_instant_bounds_the_read() {
    let (b, tmp, all) = two_shards(&[], "all.jsonl", &["--events", "2000", "--seed", "5"]);
    let text = std::fs::read_to_string(&all).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let part = |name: &str, ls: &[&str]| part(tmp.path(), name, ls);
    let (before, after) = (
        part("before.jsonl", &lines[..1200]),
        part("after.jsonl", &lines[1200..]),
    );
    b.k.publish("sales", &before);
    // kinesalite stamps arrivals with this machine's clock, in milliseconds.
    std::thread::sleep(Duration::from_millis(1100));
    let end = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    std::thread::sleep(Duration::from_millis(1100));
    b.k.publish("sales", &after);

    let data = tmp.path().join("d");
    conformance::run_to_end(&b, "sales", &data, &["--kinesis-end", &end]);
    let want = file_outcome(&before, tmp.path(), None);
    assert_same(&outcome(&data), &want);
    let m = meta(&data);
    assert_eq!(m.counters.records, 1200);
    let ends: Vec<&String> = m
        .checkpoints
        .iter()
        .filter(|(n, _)| n.starts_with("kinesis:sales/"))
        .map(|(_, c)| c)
        .collect();
    assert_eq!(ends, ["end", "end"], "{:?}", m.checkpoints);

    b.k.publish("sales", &after);
    conformance::run_to_end(&b, "sales", &data, &["--kinesis-end", &end]);
    assert_eq!(meta(&data).counters.records, 1200);
    assert_same(&outcome(&data), &want);

    let bad = run_stream(&b, "sales", &data, &["--kinesis-end", "yesterday"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("'yesterday'") && err.contains("--kinesis-end") && err.contains("RFC 3339"),
        "{err}"
    );
}

/// `--kinesis-start latest`: records put before the first start are not read, those
/// put after are; a restart resumes from the committed sequence numbers (not from
/// the new latest), so what was put while it was down is read too.
#[test]
fn latest_starts_at_the_first_run_and_restarts_resume() {
    let (b, tmp, all) = two_shards(&[], "all.jsonl", &["--events", "3000", "--seed", "3"]);
    let k = &b.k;
    let text = std::fs::read_to_string(&all).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let part = |name: &str, ls: &[&str]| part(tmp.path(), name, ls);
    let (old, new) = (
        part("old.jsonl", &lines[..1000]),
        part("new.jsonl", &lines[1000..2000]),
    );
    let later = part("later.jsonl", &lines[2000..]);
    let read = part("read.jsonl", &lines[1000..]);
    k.publish("sales", &old);

    let data = tmp.path().join("d");
    let addr = format!("127.0.0.1:{}", common::redis::free_port());
    let args = ["--metrics-addr", &addr, "--kinesis-start", "latest"];
    let child = run_stream(&b, "sales", &data, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Both shards are being read once each has answered (its lag gauge is set).
    common::wait_for("both shards read", Duration::from_secs(60), || {
        std::net::TcpStream::connect(&addr).is_ok()
            && common::scrape(&addr)
                .lines()
                .filter(|l| l.starts_with("tally_source_lag_seconds{"))
                .count()
                == 2
    });
    k.publish("sales", &new);
    wait_committed(&addr, 1000);
    stop(child);
    k.publish("sales", &later);
    conformance::run_to_end(&b, "sales", &data, &["--kinesis-start", "latest"]);
    assert_same(&outcome(&data), &file_outcome(&read, tmp.path(), None));
    let m = meta(&data);
    assert_eq!(m.counters.records, 2000);
    assert!(m.checkpoints["kinesis:sales"].starts_with("at:"));
}

/// A stream that does not exist fails the start, naming it (exit code 3).
#[test]
fn run_names_a_missing_stream() {
    let b = Kinesis::start();
    let tmp = tempfile::tempdir().unwrap();
    let out = run_stream(&b, "nope", &tmp.path().join("d"), &["--until-eof"])
        .output()
        .unwrap();
    assert_names_nope(&out);
}
