//! The Fluvio source and `publish --to fluvio`, against a real cluster: the one
//! `FLUVIO_SC_ADDR` names (host:port of its SC). No Fluvio cluster can be installed
//! from the package registries this project's test command uses, so without that
//! variable every test here prints, loudly, that it did NOT run, and passes having
//! checked nothing; README "Fluvio" says how to run them against a local cluster.
//!
//! The merge of partitions by event time, resume from committed positions and
//! backoff are shared with the Kinesis source (`source::merge`), which
//! `tests/kinesis.rs` checks against kinesalite on every run.

mod common;

use common::tally;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// The cluster, or `None` after saying loudly that the test does not run.
fn cluster(test: &str) -> Option<String> {
    match std::env::var("FLUVIO_SC_ADDR") {
        Ok(a) if !a.is_empty() => Some(a),
        _ => {
            // Straight to stderr, past the test harness's capture of eprintln!.
            let msg = format!(
                "\n!!!!!!!!!!\n!!! {test}: NOT RUN. FLUVIO_SC_ADDR is not set, so nothing about \
                 the Fluvio source was checked against a cluster.\n!!! Set it to a cluster's SC \
                 address (README \"Fluvio\") to run tests/fluvio.rs.\n!!!!!!!!!!\n"
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
            None
        }
    }
}

/// A new topic with `partitions` partitions, named for this test and this moment.
fn topic(addr: &str, test: &str, partitions: u32) -> String {
    use fluvio::metadata::topic::TopicSpec;
    let name = format!(
        "tally-{test}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let f = tally::source::fluvio::connect(Some(addr)).await.unwrap();
        f.admin()
            .await
            .create(
                name.clone(),
                false,
                TopicSpec::new_computed(partitions, 1, None),
            )
            .await
            .unwrap();
    });
    common::wait_for("the topic's partitions", Duration::from_secs(60), || {
        rt.block_on(async {
            let f = tally::source::fluvio::connect(Some(addr)).await.unwrap();
            tally::source::fluvio::partitions(&f, &name).await == Ok(partitions)
        })
    });
    name
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn outcome(data: &Path) -> String {
    String::from_utf8(common::ok(&["export", "--data-dir", s(data)]).stdout).unwrap()
}

fn meta(data: &Path) -> tally::store::Meta {
    let st = tally::store::embedded::EmbeddedStore::open_reader(data).unwrap();
    tally::store::Store::meta(&st).clone()
}

#[test]
fn a_topic_gives_the_files_export_across_a_kill_resuming_at_offsets() {
    let Some(addr) = cluster("a_topic_gives_the_files_export_across_a_kill_resuming_at_offsets")
    else {
        return;
    };
    let t = topic(&addr, "kill", 2);
    let tmp = tempfile::tempdir().unwrap();
    let events = tmp.path().join("events.jsonl");
    common::gen_to(
        &events,
        &["--events", "30000", "--seed", "7", "--bad-rate", "0.01"],
    );
    let lines = std::fs::read_to_string(&events).unwrap().lines().count() as u64;
    let out = common::ok(&[
        "publish",
        s(&events),
        "--to",
        "fluvio",
        "--topic",
        &t,
        "--fluvio-endpoint",
        &addr,
        "--quiet",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{lines} records sent")));
    let file_run = tmp.path().join("file-run");
    common::run_until_eof(&events, &file_run, Some(1), None, None);
    let want = outcome(&file_run);

    let data = tmp.path().join("d");
    let run = |extra: &[&str]| {
        let mut c = tally();
        c.args([
            "run",
            "--fluvio",
            &t,
            "--fluvio-endpoint",
            &addr,
            "--data-dir",
            s(&data),
        ])
        .args(extra);
        c
    };
    let mut child = run(&["--until-eof", "--workers", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for("a first commit", Duration::from_secs(120), || {
        data.join("store").is_dir() && meta(&data).counters.records > 0
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        meta(&data).counters.records < lines,
        "the kill landed mid-run"
    );

    let done = run(&["--until-eof", "--workers", "1"]).output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(outcome(&data), want);
    let m = meta(&data);
    assert_eq!(m.counters.records, lines, "every record committed once");
    let offsets: u64 = (0..2)
        .map(|p| m.positions[&format!("fluvio:{t}/{p}")])
        .sum();
    assert_eq!(
        offsets, lines,
        "the partitions' next offsets add up to the records"
    );

    // Nothing new: another run commits nothing.
    let again = run(&["--until-eof"]).output().unwrap();
    assert!(again.status.success());
    assert_eq!(meta(&data).counters.records, lines);
    assert_eq!(outcome(&data), want);
}

/// `run --fluvio TOPIC` against `addr` until the end, in a scratch directory.
fn run_topic(addr: &str, topic: &str) -> std::process::Output {
    let tmp = tempfile::tempdir().unwrap();
    tally()
        .args([
            "run",
            "--fluvio",
            topic,
            "--fluvio-endpoint",
            addr,
            "--until-eof",
        ])
        .args(["--data-dir", s(&tmp.path().join("d"))])
        .output()
        .unwrap()
}

/// Asserts that a command failed (exit code 3) with `what` in its error.
fn assert_fails_saying(out: &std::process::Output, what: &str) {
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(what), "{err}");
}

#[test]
fn a_missing_topic_is_named() {
    let Some(addr) = cluster("a_missing_topic_is_named") else {
        return;
    };
    let out = run_topic(&addr, "tally-nope");
    assert_fails_saying(&out, "Fluvio topic 'tally-nope': no such topic");
}

/// Runs without a cluster: a cluster that cannot be reached fails the start, naming
/// the topic and the address, for `run` and for `publish`.
#[test]
fn an_unreachable_cluster_is_named_at_the_start() {
    let port = common::redis::free_port();
    let addr = format!("127.0.0.1:{port}");
    let what = format!("Fluvio topic 'sales': connecting to {addr}");
    assert_fails_saying(&run_topic(&addr, "sales"), &what);
    let tmp = tempfile::tempdir().unwrap();
    let events = tmp.path().join("e.jsonl");
    common::gen_to(&events, &["--events", "10"]);
    let out = tally()
        .args(["publish", s(&events), "--to", "fluvio", "--topic", "sales"])
        .args(["--fluvio-endpoint", &addr, "--quiet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&what));
}
