//! The Fluvio source and `publish --to fluvio`, against a real cluster: the one
//! `FLUVIO_SC_ADDR` names (host:port of its SC). No Fluvio cluster can be installed
//! from the package registries this project's test command uses, so without that
//! variable every test here prints, loudly, that it did NOT run, and passes having
//! checked nothing; README "Fluvio" says how to run them against a local cluster.
//!
//! The source conformance suite (`common::conformance`: positions and resume,
//! reconnect, scale-out over a cluster) runs here against that cluster, and on
//! every run against kinesalite in `tests/kinesis.rs`. The merge of partitions by
//! event time and the backoff are shared with the Kinesis source
//! (`source::merge`).

mod common;

use common::conformance::{self, Broker};
use common::tally;
use std::path::Path;
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

/// The cluster at `FLUVIO_SC_ADDR` as the conformance suite's broker. The suite's
/// network cut goes through a proxy in front of the SC only: the SC hands the
/// consumer its SPUs' own addresses, so the cut breaks the SC connection and not
/// the SPU's stream.
struct Fluvio {
    addr: String,
}

impl Broker for Fluvio {
    fn create(&self, test: &str, partitions: u32) -> String {
        topic(&self.addr, test, partitions)
    }
    fn publish(&self, name: &str, file: &Path) {
        let lines = conformance::line_count(file);
        let out = common::ok(&[
            "publish",
            s(file),
            "--to",
            "fluvio",
            "--topic",
            name,
            "--fluvio-endpoint",
            &self.addr,
            "--quiet",
        ]);
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{lines} records sent")));
    }
    fn addr(&self) -> String {
        self.addr.clone()
    }
    fn read_args(&self, name: &str, addr: &str) -> Vec<String> {
        ["--fluvio", name, "--fluvio-endpoint", addr]
            .map(String::from)
            .to_vec()
    }
    fn env(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }
    fn partition_prefix(&self, name: &str) -> String {
        format!("fluvio:{name}/")
    }
}

/// The conformance suite's positions and resume on a 2-partition topic.
#[test]
fn a_topic_gives_the_files_export_across_a_kill_resuming_at_offsets() {
    let Some(addr) = cluster("a_topic_gives_the_files_export_across_a_kill_resuming_at_offsets")
    else {
        return;
    };
    conformance::resumes_exactly_across_a_kill(&Fluvio { addr });
}

/// The conformance suite's network cut (of the SC connection).
#[test]
fn a_topic_is_read_exactly_across_a_network_cut() {
    let Some(addr) = cluster("a_topic_is_read_exactly_across_a_network_cut") else {
        return;
    };
    conformance::reconnects_after_a_network_cut(&Fluvio { addr });
}

/// The conformance suite's scale-out: a 4-partition topic over 2 processes.
#[test]
fn a_cluster_reads_the_partitions_on_every_process_and_exports_the_file() {
    let Some(addr) =
        cluster("a_cluster_reads_the_partitions_on_every_process_and_exports_the_file")
    else {
        return;
    };
    conformance::spreads_over_a_cluster(&Fluvio { addr });
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
