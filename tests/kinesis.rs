//! Kinesis against kinesalite (a real Kinesis API server, in memory, on loopback):
//! `tally publish --to kinesis` puts every line once, keyed by provider.

mod common;

use common::kinesis::{Kinesalite, ENV};
use common::{gen_to, tally};
use std::collections::BTreeMap;

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
    let k = Kinesalite::start();
    let rt = rt();
    rt.block_on(k.create_stream("sales", 2));
    let tmp = tempfile::tempdir().unwrap();
    let events = tmp.path().join("events.jsonl");
    gen_to(&events, &["--events", "3000", "--bad-rate", "0.02"]);
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
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Kinesis stream 'nope': it does not exist"),
        "{err}"
    );
}
