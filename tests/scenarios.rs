//! Scenario tests: small event files with hand-computed expected exports, run through
//! the built binary straight, and again with a kill -9 in the middle (while more input
//! is arriving) and a restart at another worker count. Both must give the expected
//! export and the expected dead letters, exactly once.

mod common;

use common::{
    committed_bytes, dead_letters_by_line, gen_to, run_until_eof, run_until_eof_with, scenarios,
    tally, wait_for,
};
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

fn expected_dead(dir: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(dir.join("expected_dead.txt")).unwrap();
    let mut v: Vec<(usize, String)> = text
        .lines()
        .map(|l| {
            let (n, r) = l.split_once(' ').unwrap();
            (n.parse().unwrap(), r.to_owned())
        })
        .collect();
    v.sort();
    v
}

/// The export at `out` and the dead letters in `data` are the scenario's expected ones.
fn assert_expected(name: &str, data: &Path, input: &Path, out: &Path, when: &str) {
    let dir = scenarios().join(name);
    let got = std::fs::read_to_string(out).unwrap();
    let want = std::fs::read_to_string(dir.join("expected.jsonl")).unwrap();
    assert_eq!(got, want, "{name}: export {when} differs");
    assert_eq!(
        dead_letters_by_line(data, input),
        expected_dead(&dir),
        "{name}: dead letters {when} differ"
    );
}

fn straight(name: &str) {
    let dir = scenarios().join(name);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let out = tmp.path().join("out.jsonl");
    let events = dir.join("events.jsonl");
    let pipeline = scenarios().join("pipeline.toml");
    run_until_eof(&events, &data, Some(1), Some(&pipeline), Some(&out));
    assert_expected(name, &data, &events, &out, "of a straight run");
}

/// Starts `tally run --follow` at 2 workers and waits for its first commit.
fn follow_until_a_commit(input: &Path, pipeline: &Path, data: &Path) -> std::process::Child {
    let child = tally()
        .args([
            "run",
            input.to_str().unwrap(),
            "--follow",
            "--pipeline",
            pipeline.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--workers",
            "2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a first commit", Duration::from_secs(30), || {
        committed_bytes(data) > 0
    });
    child
}

/// Half the file, a follow-mode run, the rest appended, kill -9 at once, then a
/// restart at 3 workers that reads to the end.
fn killed(name: &str) {
    let dir = scenarios().join(name);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let input = tmp.path().join("events.jsonl");
    let out = tmp.path().join("out.jsonl");
    let pipeline = scenarios().join("pipeline.toml");
    let all = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    let lines: Vec<&str> = all.lines().collect();
    let half = lines.len() / 2;
    std::fs::write(
        &input,
        lines[..half]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let mut child = follow_until_a_commit(&input, &pipeline, &data);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .unwrap();
    for l in &lines[half..] {
        writeln!(f, "{l}").unwrap();
    }
    drop(f);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    run_until_eof(&input, &data, Some(3), Some(&pipeline), Some(&out));
    assert_expected(name, &data, &input, &out, "after kill -9 and restart");
}

#[test]
fn sales_refunds_zones() {
    straight("sales_refunds_zones");
    killed("sales_refunds_zones");
}

#[test]
fn voids_and_duplicates() {
    straight("voids_and_duplicates");
    killed("voids_and_duplicates");
}

#[test]
fn lateness() {
    straight("lateness");
    killed("lateness");
}

/// A generated stream (every kind of trouble, bad records of every reason) killed at
/// five random moments, restarted each time at another worker count: the export and
/// the dead letters equal an uninterrupted run's.
#[test]
fn kill_at_random_moments_gives_the_uninterrupted_export() {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("events.jsonl");
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    gen_to(
        &input,
        &["--events", "300000", "--seed", "11", "--bad-rate", "0.003"],
    );
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (out_a, out_b) = (tmp.path().join("a.jsonl"), tmp.path().join("b.jsonl"));
    run_until_eof(&input, &a, Some(1), None, Some(&out_a));
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let mut kills = 0;
    for round in 0..5 {
        let workers = ["1", "2", "3"][round % 3];
        let mut child = tally()
            .args([
                "run",
                &p(&input),
                "--data-dir",
                &p(&b),
                "--workers",
                workers,
                "--until-eof",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let before = committed_bytes(&b);
        // Wait for this run to commit something, then a random moment more.
        let start = std::time::Instant::now();
        while committed_bytes(&b) == before
            && child.try_wait().unwrap().is_none()
            && start.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..150)));
        if child.try_wait().unwrap().is_none() {
            kills += 1;
        }
        let _ = child.kill();
        child.wait().unwrap();
    }
    run_until_eof(&input, &b, Some(2), None, Some(&out_b));
    assert!(
        kills >= 3,
        "the runs finished before they could be killed ({kills} kills)"
    );
    let (ea, eb) = (
        std::fs::read_to_string(&out_a).unwrap(),
        std::fs::read_to_string(&out_b).unwrap(),
    );
    assert!(ea.lines().count() > 10_000);
    assert!(
        ea == eb,
        "export after {kills} kills differs from the uninterrupted run"
    );
    assert_eq!(
        dead_letters_by_line(&a, &input),
        dead_letters_by_line(&b, &input),
        "dead letters differ"
    );
}

/// SIGTERM stops reading, commits what was read and exits 0; a restart then gives the
/// exact expected export.
#[test]
fn sigterm_commits_what_was_read_and_exits_cleanly() {
    let dir = scenarios().join("voids_and_duplicates");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let input = tmp.path().join("events.jsonl");
    let out = tmp.path().join("out.jsonl");
    let pipeline = scenarios().join("pipeline.toml");
    std::fs::copy(dir.join("events.jsonl"), &input).unwrap();
    let len = std::fs::metadata(&input).unwrap().len();
    let child = follow_until_a_commit(&input, &pipeline, &data);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let done = child.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "exit {:?}: {}",
        done.status,
        String::from_utf8_lossy(&done.stderr)
    );
    // The store is consistent and its position is within the file.
    let store = tally::store::embedded::EmbeddedStore::open_reader(&data).unwrap();
    let pos = tally::store::Store::meta(&store)
        .positions
        .get(input.to_str().unwrap())
        .copied()
        .unwrap_or(0);
    assert!(pos > 0 && pos <= len, "committed position {pos} of {len}");
    drop(store);
    run_until_eof(&input, &data, Some(1), Some(&pipeline), Some(&out));
    assert_expected(
        "voids_and_duplicates",
        &data,
        &input,
        &out,
        "after SIGTERM and restart",
    );
}

/// A restart after days of event time replays only the staging-log epochs whose
/// effects may still matter, and the export is still exactly the uninterrupted one.
#[test]
fn a_restart_after_days_skips_expired_epochs_and_stays_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    let all = tmp.path().join("all.jsonl");
    // 60,000 records over about six days of event time.
    gen_to(
        &all,
        &[
            "--events",
            "60000",
            "--seed",
            "21",
            "--events-per-second",
            "0.115",
            "--bad-rate",
            "0.002",
        ],
    );
    let pipeline = tmp.path().join("p.toml");
    std::fs::write(
        &pipeline,
        tally::pipeline::DEFAULT_PIPELINE.replace("max_events = 100000", "max_events = 500"),
    )
    .unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (out_a, out_b) = (tmp.path().join("a.jsonl"), tmp.path().join("b.jsonl"));
    run_until_eof(&all, &a, Some(2), Some(&pipeline), Some(&out_a));

    let bytes = std::fs::read(&all).unwrap();
    // Split after the newline that ends two thirds of the records (bad records are not all UTF-8).
    let newlines: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .collect();
    let cut = newlines[newlines.len() * 2 / 3] + 1;
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, &bytes[..cut]).unwrap();
    run_until_eof(&input, &b, Some(2), Some(&pipeline), None);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .unwrap();
    f.write_all(&bytes[cut..]).unwrap();
    drop(f);
    let out = tally()
        .env("TALLY_LOG", "info")
        .args([
            "run",
            &p(&input),
            "--pipeline",
            &p(&pipeline),
            "--data-dir",
            &p(&b),
            "--until-eof",
            "--workers",
            "1",
            "--export",
            &p(&out_b),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8_lossy(&out.stderr);
    let skipped: u64 = log
        .split("skipped=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no skipped= in the log:\n{log}"));
    assert!(skipped > 10, "only {skipped} epochs skipped:\n{log}");
    assert!(
        std::fs::read_to_string(&out_a).unwrap() == std::fs::read_to_string(&out_b).unwrap(),
        "exports differ"
    );
    assert_eq!(
        dead_letters_by_line(&a, &all),
        dead_letters_by_line(&b, &input)
    );
}

/// The staging log in small files and a one-hour dedup horizon: the files whose epochs
/// have all expired are deleted as the run goes, and a later run over more input,
/// rebuilding its state from what is left of the log, exports exactly what one run
/// over all the input does. On both stores.
#[test]
fn a_run_resumed_from_a_trimmed_staging_log_is_exact() {
    resumes_from_a_trimmed_log(None);
}

#[test]
fn a_run_resumed_from_a_trimmed_staging_log_is_exact_on_redis() {
    let redis = common::redis::RedisServer::start();
    resumes_from_a_trimmed_log(Some(&redis.url()));
}

fn resumes_from_a_trimmed_log(redis: Option<&str>) {
    let tmp = tempfile::tempdir().unwrap();
    let all = tmp.path().join("all.jsonl");
    // 120,000 events over about 67 hours of event time.
    gen_to(
        &all,
        &[
            "--events",
            "120000",
            "--seed",
            "21",
            "--events-per-second",
            "0.5",
        ],
    );
    let default =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/sales.toml"))
            .unwrap();
    let short = default
        .replace("dedup_horizon = \"48h\"", "dedup_horizon = \"1h\"")
        .replace("max_events = 100000", "max_events = 2000");
    assert_ne!(short, default);
    let pipeline = tmp.path().join("short.toml");
    std::fs::write(
        &pipeline,
        format!("{short}\n[staging]\nsegment_size = \"64KiB\"\n"),
    )
    .unwrap();

    // On Redis, each run in a namespace of its own (`ns`). Its retention drops old
    // minute windows there, so the straight run is on Redis too.
    let run = |input: &Path, data: &Path, workers: u32, ns: &str, export: Option<&Path>| {
        let extra = match redis {
            Some(url) => vec!["--redis", url, "--redis-namespace", ns],
            None => Vec::new(),
        };
        run_until_eof_with(input, data, Some(workers), Some(&pipeline), export, &extra);
    };
    let want = tmp.path().join("want.jsonl");
    run(&all, &tmp.path().join("one"), 1, "straight", Some(&want));
    // The first two thirds (about 44 hours), then the rest appended to the same file.
    let text = std::fs::read_to_string(&all).unwrap();
    let cut = text.match_indices('\n').nth(79_999).unwrap().0 + 1;
    let input = tmp.path().join("input.jsonl");
    std::fs::write(&input, &text[..cut]).unwrap();
    let data = tmp.path().join("data");
    run(&input, &data, 1, "resumed", None);
    let files: Vec<String> = std::fs::read_dir(data.join("staging"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !files.contains(&"log.bin".to_owned()) && !files.is_empty(),
        "the oldest files are deleted: {files:?}"
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .unwrap()
        .write_all(&text.as_bytes()[cut..])
        .unwrap();
    let got = tmp.path().join("got.jsonl");
    run(&input, &data, 2, "resumed", Some(&got));
    let (got, want) = (
        std::fs::read_to_string(&got).unwrap(),
        std::fs::read_to_string(&want).unwrap(),
    );
    assert!(want.lines().count() > 10_000, "a real export");
    assert!(
        got == want,
        "the export after resuming from a trimmed log differs"
    );
}
