//! The command line, through the built binary: outputs and exit codes.

mod common;

use common::{gen_to, ok, run_until_eof, tally};
use std::time::Duration;

#[test]
fn gen_is_deterministic() {
    // Two separate processes for the same seed: nothing may depend on the run.
    let gen = |seed: &str| {
        ok(&[
            "gen",
            "--events",
            "3000",
            "--seed",
            seed,
            "--bad-rate",
            "0.02",
        ])
        .stdout
    };
    let (a, b, c) = (gen("7"), gen("7"), gen("8"));
    assert_eq!(a.iter().filter(|b| **b == b'\n').count(), 3000);
    assert!(a == b, "same seed, same bytes");
    assert!(a != c, "another seed, other events");
}

#[test]
fn validate_reports_every_reason_and_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("e.jsonl");
    gen_to(
        &f,
        &["--events", "8000", "--seed", "1", "--bad-rate", "0.05"],
    );
    let out = tally()
        .args(["validate", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8(out.stdout).unwrap();
    for r in tally::decode::Reason::all() {
        if r == tally::decode::Reason::Field(
            tally::decode::Field::Attrs,
            tally::decode::Problem::Missing,
        ) {
            continue; // attrs is optional: never missing
        }
        assert!(
            report.contains(&format!("  {} ", r.code())),
            "no {} in the report:\n{report}",
            r.code()
        );
    }
    assert!(report.contains("line "), "examples name their line");
}

#[test]
fn validate_of_a_clean_file_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("e.jsonl");
    gen_to(&f, &["--events", "3000", "--seed", "2", "--late-rate", "0"]);
    let out = tally()
        .args(["validate", f.to_str().unwrap()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(
        report.contains("3000 records, 3000 good, 0 bad"),
        "{report}"
    );
}

#[test]
fn a_bad_pipeline_is_rejected_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("p.toml");
    std::fs::write(&p, "allowed_lateness = \"15m\"\n[[views]]\nname = \"v\"\ngroup_by = [\"provider_id\"]\nwindows = [\"1h\"]\nmetrics = [\"sales_count\", \"median\"]\n").unwrap();
    let e = tmp.path().join("e.jsonl");
    std::fs::write(&e, "").unwrap();
    let out = tally()
        .args([
            "run",
            e.to_str().unwrap(),
            "--pipeline",
            p.to_str().unwrap(),
            "--data-dir",
            tmp.path().join("d").to_str().unwrap(),
            "--until-eof",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.toml:6:") && err.contains("median"), "{err}");
}

#[test]
fn export_without_a_store_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tally()
        .args([
            "export",
            "--data-dir",
            tmp.path().join("none").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no store in"));
}

#[test]
fn help_explains_the_commands() {
    let out = ok(&["--help"]).stdout;
    let help = String::from_utf8(out).unwrap();
    for c in ["run", "export", "gen", "validate", "demo"] {
        assert!(help.contains(c), "{help}");
    }
    let run = String::from_utf8(ok(&["run", "--help"]).stdout).unwrap();
    assert!(
        run.contains("--until-eof") && run.contains("resumes"),
        "{run}"
    );
}

#[test]
fn stdin_is_an_input() {
    use std::io::Write;
    use std::process::Stdio;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let mut child = tally()
        .args([
            "run",
            "-",
            "--data-dir",
            data.to_str().unwrap(),
            "--until-eof",
            "--export",
            tmp.path().join("o.jsonl").to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let line = r#"{"event_id":"1","provider_id":"p","product_id":"x","customer_id":"c","kind":"sale","amount":"2.50","currency":"USD","ts":"2026-11-22T10:00:00Z"}"#;
    writeln!(child.stdin.take().unwrap(), "{line}\nnot json").unwrap();
    assert!(child.wait().unwrap().success());
    let export = std::fs::read_to_string(tmp.path().join("o.jsonl")).unwrap();
    assert!(export.contains(r#""view":"provider_window","window":"1m","window_start":"2026-11-22T10:00:00Z","provider_id":"p","currency":"USD","sales_count":1,"gross_amount":"2.50""#), "{export}");
    let dead = std::fs::read_to_string(data.join("dead-letters.jsonl")).unwrap();
    assert!(
        dead.contains(r#""reason":"line:invalid_json""#) && dead.contains(r#""source":"-""#),
        "{dead}"
    );
}

/// Epochs close by time even when input never pauses (freshness under load).
#[test]
fn epochs_are_cut_by_time_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("e.jsonl");
    gen_to(&f, &["--events", "200000", "--seed", "4"]);
    let p = tmp.path().join("p.toml");
    let pipeline = tally::pipeline::DEFAULT_PIPELINE
        .replace("max_duration = \"200ms\"", "max_duration = \"20ms\"")
        .replace("max_events = 100000", "max_events = 100000000");
    std::fs::write(&p, pipeline).unwrap();
    let data = tmp.path().join("d");
    let started = std::time::Instant::now();
    run_until_eof(&f, &data, Some(1), Some(&p), None);
    let took = started.elapsed();
    let store = tally::store::embedded::EmbeddedStore::open_reader(&data).unwrap();
    let meta = tally::store::Store::meta(&store).clone();
    let staging = tally::archive::staging::StagingLog::open(&data, meta.staging_len).unwrap();
    let sizes: Vec<usize> = staging
        .read()
        .unwrap()
        .map(|e| e.unwrap().records.len())
        .collect();
    let largest = sizes.iter().max().copied().unwrap_or(0);
    // The run takes far longer than 20 ms. Cut only when the input pauses (the bug this
    // guards against), it gave about 6 epochs; cut by time, about 19.
    assert!(took.as_millis() > 500, "too fast to tell: {took:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 200_000);
    assert!(
        sizes.len() as u64 == meta.epoch && sizes.len() >= 12,
        "{} epochs in {took:?}: {sizes:?}",
        sizes.len()
    );
    assert!(largest < 200_000);
}

/// A directory is read file by file in name order: the same export as the files
/// concatenated. Here it comes from the pipeline's [[sources]], with no inputs named.
#[test]
fn a_directory_from_the_pipeline_sources_reads_like_its_files_concatenated() {
    let tmp = tempfile::tempdir().unwrap();
    let all = tmp.path().join("all.jsonl");
    gen_to(
        &all,
        &["--events", "30000", "--seed", "12", "--bad-rate", "0.01"],
    );
    let bytes = std::fs::read(&all).unwrap();
    let newlines: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i + 1)
        .collect();
    let (a, b) = (
        newlines[newlines.len() / 3],
        newlines[newlines.len() * 2 / 3],
    );
    let dir = tmp.path().join("in");
    std::fs::create_dir(&dir).unwrap();
    // Names sort in reading order; a hidden file is ignored.
    std::fs::write(dir.join("2026-11-01.jsonl"), &bytes[..a]).unwrap();
    std::fs::write(dir.join("2026-11-02.jsonl"), &bytes[a..b]).unwrap();
    std::fs::write(dir.join("2026-11-03.jsonl"), &bytes[b..]).unwrap();
    std::fs::write(dir.join(".partial.jsonl"), b"{not json\n").unwrap();
    let pipeline = tmp.path().join("p.toml");
    let sources = format!(
        "[[sources]]\nkind = \"files\"\npaths = [{:?}]\n",
        dir.to_str().unwrap()
    );
    std::fs::write(
        &pipeline,
        tally::pipeline::DEFAULT_PIPELINE.replace("[epoch]", &format!("{sources}\n[epoch]")),
    )
    .unwrap();
    let (d1, d2) = (tmp.path().join("d1"), tmp.path().join("d2"));
    let (o1, o2) = (tmp.path().join("o1.jsonl"), tmp.path().join("o2.jsonl"));
    run_until_eof(&all, &d1, None, None, Some(&o1));
    ok(&[
        "run",
        "--pipeline",
        pipeline.to_str().unwrap(),
        "--data-dir",
        d2.to_str().unwrap(),
        "--until-eof",
        "--export",
        o2.to_str().unwrap(),
    ]);
    let (e1, e2) = (
        std::fs::read_to_string(&o1).unwrap(),
        std::fs::read_to_string(&o2).unwrap(),
    );
    assert!(e1.lines().count() > 1000);
    assert!(
        e1 == e2,
        "a directory must read like its files concatenated"
    );
    let reasons = |d: &std::path::Path| {
        let mut r: Vec<String> = std::fs::read_to_string(d.join("dead-letters.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["reason"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        r.sort();
        r
    };
    assert_eq!(reasons(&d1), reasons(&d2));
}

/// docs/metrics.md and the constants of src/metrics.rs name the same metrics.
#[test]
fn metrics_doc_lists_exactly_the_metrics_in_the_code() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let code = std::fs::read_to_string(root.join("src/metrics.rs")).unwrap();
    let in_code: std::collections::BTreeSet<String> = code
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split('"').nth(1))
        .map(str::to_owned)
        .collect();
    let doc = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let in_doc: std::collections::BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("tally_"))
        .map(str::to_owned)
        .collect();
    assert!(in_code.len() >= 15, "{in_code:?}");
    assert_eq!(in_code, in_doc);
}

/// A run's metrics endpoint, scraped while it runs, counts what was sent.
#[test]
fn metrics_during_a_run_count_what_was_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("events.jsonl");
    common::gen_to(
        &input,
        &["--events", "20000", "--seed", "31", "--bad-rate", "0.01"],
    );
    let lines = std::fs::read(&input)
        .unwrap()
        .iter()
        .filter(|b| **b == b'\n')
        .count();
    let addr = format!("127.0.0.1:{}", common::redis::free_port());
    let data = tmp.path().join("d");
    let mut child = common::tally()
        .args(["run", input.to_str().unwrap(), "--follow", "--data-dir"])
        .arg(&data)
        .args(["--metrics-addr", &addr])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The source's lag is the last thing a commit's metrics update: once it is 0
    // with every record counted, the last epoch's metrics are all in.
    let source = format!("tally_source_lag_bytes{{source=\"{}\"}}", input.display());
    common::wait_for("every record counted", Duration::from_secs(60), || {
        if std::net::TcpStream::connect(&addr).is_err() {
            return false;
        }
        let m = common::scrape(&addr);
        common::find_metric(&m, "tally_records_total") == Some(lines as f64)
            && common::find_metric(&m, &source) == Some(0.0)
    });
    let m = common::scrape(&addr);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    // Against what the run committed and wrote.
    let store = tally::store::embedded::EmbeddedStore::open_reader(&data).unwrap();
    let c = &tally::store::Store::meta(&store).counters;
    assert_eq!(c.records, lines as u64);
    assert_eq!(
        common::metric(&m, "tally_accepted_total"),
        c.accepted as f64
    );
    assert_eq!(
        common::metric(&m, "tally_duplicates_total"),
        c.duplicates as f64
    );
    assert!(c.dead_letters.len() >= 10, "{:?}", c.dead_letters);
    for (reason, n) in &c.dead_letters {
        let name = format!("tally_dead_letters_total{{reason=\"{reason}\"}}");
        assert_eq!(common::metric(&m, &name), *n as f64, "{reason}");
    }
    let dead_lines = std::fs::read_to_string(data.join("dead-letters.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(c.dead_letter_total(), dead_lines as u64);
    assert_eq!(common::metric(&m, "tally_store_up"), 1.0);
    assert_eq!(common::metric(&m, "tally_epochs_pending"), 0.0);
    assert_eq!(common::metric(&m, &source), 0.0);
    assert!(common::metric(&m, "tally_epochs_committed_total") >= 1.0);
    assert!(m.contains("tally_commit_seconds_bucket"), "{m}");
    // Every first copy of an id is held for the horizon (all 20,000 events are
    // within it): the counted ones and the late ones.
    let late = c.dead_letters.get("late").copied().unwrap_or(0);
    assert_eq!(
        common::metric(&m, "tally_state_entries{stage=\"admit\"}"),
        (c.accepted + late) as f64
    );
    assert!(common::metric(&m, "tally_state_entries{stage=\"rows\"}") > 0.0);
    assert!(common::metric(&m, "tally_state_entries{stage=\"voids\"}") > 0.0);
}

/// The main job: `tally demo` publishes a generated stream over gRPC, serves it, asks
/// claro's questions over gRPC, and every event read was acknowledged.
#[test]
fn the_demo_publishes_over_grpc_and_answers_queries() {
    let out = ok(&[
        "demo",
        "--seconds",
        "3",
        "--rate",
        "2000",
        "--grpc-addr",
        "127.0.0.1:0",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    // The numbers of the line that starts with `prefix`.
    let nums = |prefix: &str| -> Vec<u64> {
        let l = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no '{prefix}' in {text}"));
        l.split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect()
    };
    // "Published over gRPC: C events acknowledged as committed, D as dead letters."
    let (committed, dead) = (
        nums("Published over gRPC")[0],
        nums("Published over gRPC")[1],
    );
    // "Stopped after E epochs: R records read, ..."
    let read = nums("Stopped after ")[1];
    assert!(committed > 1000, "{text}");
    assert_eq!(
        committed + dead,
        read,
        "every event read was acknowledged: {text}"
    );
    assert!(
        text.contains("Summarize, last 2 hours") && text.contains("TopProducts today: #1"),
        "{text}"
    );
    assert!(text.contains("tally query windows"), "{text}");
}
