//! The built binary against real Redis servers, through faults: kill -9 at twenty
//! random moments (one Redis) and five (a Cluster), Redis stopped twice mid-run,
//! Redis unreachable at start, TLS with an ACL user, and a second writer taking
//! over. After each, the export equals an uninterrupted embedded run's, exactly.

mod common;

use common::redis::{free_port, RedisCluster, RedisServer};
use common::{dead_letters_by_line, gen_to, metric, run_until_eof, scrape, tally, wait_for};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn p(x: &Path) -> String {
    x.to_str().expect("UTF-8 test paths").to_owned()
}

/// The committed meta (JSON) of namespace `tally` on the server at `port`.
fn meta(port: u16) -> Option<serde_json::Value> {
    let out = common::redis::cli(port, &["HGET", "tally:{tally}:meta", "meta"])?;
    serde_json::from_str(out.trim()).ok()
}

fn committed_epoch(port: u16) -> u64 {
    meta(port).map_or(0, |m| m["epoch"].as_u64().unwrap_or(0))
}

fn committed_offset(port: u16, input: &Path) -> u64 {
    meta(port).map_or(0, |m| m["positions"][p(input)].as_u64().unwrap_or(0))
}

/// `tally export --redis URLS [--redis-cluster]` into a string.
fn export_redis(urls: &str, cluster: bool) -> String {
    let mut args = vec!["export", "--redis", urls];
    if cluster {
        args.push("--redis-cluster");
    }
    let out = common::ok(&args);
    String::from_utf8(out.stdout).unwrap()
}

/// The default pipeline with small epochs (2,000 records or 50 ms), so that a run
/// commits often and a kill lands between, during or after commits. Epoch sizes
/// never change results.
fn small_epochs(dir: &Path) -> std::path::PathBuf {
    let text = tally::pipeline::DEFAULT_PIPELINE
        .replace("max_events = 100000", "max_events = 2000")
        .replace("max_duration = \"200ms\"", "max_duration = \"50ms\"");
    assert!(text.contains("max_events = 2000") && text.contains("\"50ms\""));
    let path = dir.join("small-epochs.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The uninterrupted embedded run's export of `input` (its data directory: `dir/ref`).
fn reference(input: &Path, dir: &Path) -> String {
    let out = dir.join("ref.jsonl");
    run_until_eof(input, &dir.join("ref"), Some(2), None, Some(&out));
    std::fs::read_to_string(out).unwrap()
}

fn spawn_run(input: &Path, data: &Path, urls: &str, cluster: bool, workers: &str) -> Child {
    let mut c = tally();
    c.args(["run", &p(input), "--until-eof", "--data-dir", &p(data)])
        .args(["--workers", workers, "--redis", urls])
        .args(["--pipeline", &p(&small_epochs(input.parent().unwrap()))]);
    if cluster {
        c.arg("--redis-cluster");
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Kills runs at random moments after each has committed something, then lets one
/// finish; returns the number of runs actually killed.
fn kill_repeatedly(
    input: &Path,
    data: &Path,
    urls: &str,
    cluster: bool,
    rounds: usize,
    progress: &dyn Fn() -> u64,
) -> usize {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(rounds as u64);
    let mut kills = 0;
    for round in 0..rounds {
        let mut child = spawn_run(input, data, urls, cluster, ["1", "2"][round % 2]);
        let before = progress();
        let start = Instant::now();
        while progress() == before
            && child.try_wait().unwrap().is_none()
            && start.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..250)));
        if child.try_wait().unwrap().is_none() {
            kills += 1;
        }
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
    }
    let status = spawn_run(input, data, urls, cluster, "2").wait().unwrap();
    assert!(status.success(), "the last run failed");
    kills
}

/// Kills `rounds` runs against `urls` (at least `min_kills` mid-run), lets one
/// finish, and checks the export and dead letters against an uninterrupted
/// embedded run of the same generated stream.
fn kills_give_the_uninterrupted_export(
    events: &str,
    seed: &str,
    urls: &str,
    cluster: bool,
    (rounds, min_kills): (usize, usize),
    progress: &dyn Fn() -> u64,
) {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("events.jsonl");
    gen_to(
        &input,
        &["--events", events, "--seed", seed, "--bad-rate", "0.003"],
    );
    let expected = reference(&input, tmp.path());
    let data = tmp.path().join("redis-run");
    let kills = kill_repeatedly(&input, &data, urls, cluster, rounds, progress);
    assert!(
        kills >= min_kills,
        "only {kills} of {rounds} runs were killed mid-run"
    );
    assert!(expected.lines().count() > 10_000);
    assert!(
        export_redis(urls, cluster) == expected,
        "export after {kills} kills differs from the uninterrupted run (cluster={cluster})"
    );
    assert_eq!(
        dead_letters_by_line(&data, &input),
        dead_letters_by_line(&tmp.path().join("ref"), &input),
        "dead letters differ"
    );
}

#[test]
fn kill_9_at_twenty_random_moments_gives_the_uninterrupted_export() {
    let redis = RedisServer::start();
    let port = redis.port;
    kills_give_the_uninterrupted_export("400000", "21", &redis.url(), false, (20, 15), &|| {
        committed_epoch(port)
    });
}

#[test]
fn kill_9_on_a_cluster_gives_the_uninterrupted_export() {
    let cluster = RedisCluster::start();
    kills_give_the_uninterrupted_export("150000", "22", &cluster.urls(), true, (5, 3), &|| {
        cluster
            .cli(&["HGET", "tally:{tally}:meta", "epoch"])
            .trim()
            .parse()
            .unwrap_or(0)
    });
}

/// Appends lines (raw bytes: some bad records are not UTF-8) to `input`.
fn append(input: &Path, lines: &[&[u8]]) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(input)
        .unwrap();
    for l in lines {
        f.write_all(l).unwrap();
        f.write_all(b"\n").unwrap();
    }
}

#[test]
fn redis_stopped_twice_mid_run_pauses_commits_then_catches_up_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full.jsonl");
    gen_to(
        &full,
        &["--events", "120000", "--seed", "23", "--bad-rate", "0.003"],
    );
    let expected = reference(&full, tmp.path());
    let bytes = std::fs::read(&full).unwrap();
    let lines = lines_of(&bytes);
    let chunks: Vec<&[&[u8]]> = lines.chunks(lines.len() / 6 + 1).collect();

    let mut redis = RedisServer::start();
    let port = redis.port;
    let input = tmp.path().join("growing.jsonl");
    let data = tmp.path().join("d");
    let log = tmp.path().join("tally.log");
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    append(&input, chunks[0]);
    let mut child = tally()
        .args(["run", &p(&input), "--follow", "--data-dir", &p(&data)])
        .args(["--redis", &redis.url(), "--workers", "2"])
        .args(["--metrics-addr", &metrics_addr])
        .env("TALLY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let caught_up = |what: &str| {
        let len = std::fs::metadata(&input).unwrap().len();
        wait_for(what, Duration::from_secs(60), || {
            committed_offset(port, &input) == len
        });
    };
    caught_up("the first chunk committed");
    for (i, hard) in [(1, false), (3, true)] {
        // Redis goes away (a clean shutdown, then a SIGKILL); input keeps coming.
        redis.stop(hard);
        append(&input, chunks[i]);
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            child.try_wait().unwrap().is_none(),
            "tally died in the outage"
        );
        redis.start_again();
        caught_up("the epochs held during the outage committed");
        append(&input, chunks[i + 1]);
        caught_up("reading again after the outage");
    }
    append(&input, &chunks[5..].concat());
    caught_up("everything committed");
    // The metrics count an epoch just after the store holds it.
    wait_for(
        "the metrics to count every record",
        Duration::from_secs(10),
        || metric(&scrape(&metrics_addr), "tally_records_total") == lines.len() as f64,
    );
    let m = scrape(&metrics_addr);
    assert_eq!(metric(&m, "tally_store_up"), 1.0, "{m}");
    assert_eq!(metric(&m, "tally_store_outage_seconds_count"), 2.0, "{m}");
    // Redis was down 1.5 s each time; an outage counts from the first commit that
    // fails (up to an epoch, 200 ms, plus the commit after the stop) to the one that
    // lands after the restart: over 1 s each, whatever the timing.
    assert!(metric(&m, "tally_store_outage_seconds_sum") >= 2.0, "{m}");
    assert_eq!(metric(&m, "tally_epochs_pending"), 0.0, "{m}");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    let got = export_redis(&redis.url(), false);
    assert!(got == expected, "export after two Redis outages differs");
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        log.matches("store unavailable; commits paused").count(),
        2,
        "{log}"
    );
    assert_eq!(log.matches("store reachable again").count(), 2, "{log}");
}

#[test]
fn redis_unreachable_at_start_is_retried_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("events.jsonl");
    gen_to(&input, &["--events", "5000", "--seed", "24"]);
    let expected = reference(&input, tmp.path());
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let run = |data: &str, timeout: &str| {
        let mut c = tally();
        c.args(["run", &p(&input), "--until-eof", "--data-dir"])
            .arg(tmp.path().join(data))
            .args(["--redis", &url, "--redis-start-timeout", timeout])
            .args(["--redis-backoff-max", "200ms"]);
        c
    };
    // Nobody there: retried with warnings, then a clear failure (exit 3).
    let started = Instant::now();
    let out = run("a", "1500ms").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("Redis unreachable; retrying"), "{err}");
    assert!(
        err.contains("still unreachable after") && err.contains(&url),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // Redis comes up while tally waits: it connects and runs normally.
    let child = run("b", "60s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let redis = RedisServer::start_on(port, &[]);
    let out = exit_within(child, Duration::from_secs(60), "tally waiting for Redis");
    assert!(out.status.success());
    assert!(export_redis(&redis.url(), false) == expected);
    // A namespace nobody wrote: said, not an empty export.
    let out = tally()
        .args(["export", "--redis", &url, "--redis-namespace", "nobody"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("(namespace nobody) holds no commits"), "{err}");
}

/// The child's output once it exits; panics (killing it) if it runs past `limit`.
fn exit_within(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The lines of a JSON Lines file's bytes (some bad records are not UTF-8).
fn lines_of(bytes: &[u8]) -> Vec<&[u8]> {
    bytes
        .strip_suffix(b"\n")
        .unwrap_or(bytes)
        .split(|b| *b == b'\n')
        .collect()
}

#[test]
fn tls_with_an_acl_user_and_wrong_credentials_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    common::tls_files(d);
    let f = |n: &str| p(&d.join(n));
    let (cert, key, ca) = (f("server.crt"), f("server.key"), f("ca.crt"));
    let redis = RedisServer::start_with(&[
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
        "--user",
        "tally",
        "on",
        ">s3cret",
        "~*",
        "&*",
        "+@all",
        "--user",
        "default",
        "off",
    ]);
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let input = d.join("events.jsonl");
    gen_to(&input, &["--events", "20000", "--seed", "25"]);
    let expected = reference(&input, d);
    let run = |password: &str| {
        tally()
            .args(["run", &p(&input), "--until-eof", "--data-dir"])
            .arg(d.join(format!("data-{password}")))
            .args(["--redis", &url, "--redis-ca", &ca])
            .env("TALLY_REDIS_USERNAME", "tally")
            .env("TALLY_REDIS_PASSWORD", password)
            .output()
            .unwrap()
    };
    let out = run("Not-The-Pw-7");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&url) && err.to_lowercase().contains("authentication failed"),
        "{err}"
    );
    assert!(!err.contains("Not-The-Pw-7"), "the password leaked: {err}");
    let out = run("s3cret");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported = tally()
        .args(["export", "--redis", &url, "--redis-ca", &ca])
        .env("TALLY_REDIS_USERNAME", "tally")
        .env("TALLY_REDIS_PASSWORD", "s3cret")
        .output()
        .unwrap();
    assert!(exported.status.success());
    assert!(String::from_utf8(exported.stdout).unwrap() == expected);
}

#[test]
fn a_second_writer_takes_over_and_the_first_stops_saying_why() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("events.jsonl");
    gen_to(&input, &["--events", "3000", "--seed", "26"]);
    let redis = RedisServer::start();
    let port = redis.port;
    let first = tally()
        .args(["run", &p(&input), "--follow", "--data-dir"])
        .arg(tmp.path().join("a"))
        .args(["--redis", &redis.url()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let len = std::fs::metadata(&input).unwrap().len();
    wait_for("the first writer's commit", Duration::from_secs(30), || {
        committed_offset(port, &input) == len
    });
    // A second process with another data directory cannot resume these commits:
    // it says so and leaves the first writer alone.
    let out = tally()
        .args(["run", &p(&input), "--until-eof", "--data-dir"])
        .arg(tmp.path().join("b"))
        .args(["--redis", &redis.url()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("came from another data directory"), "{err}");
    assert_eq!(
        redis.cli(&["HGET", "tally:{tally}:meta", "gen"]).trim(),
        "1"
    );
    // Another writer opens the same namespace (an operator's mistake, a second
    // replica with the right data): it takes over.
    let mut cfg = tally::store::redis::RedisConfig::new(redis.url());
    cfg.namespace = "tally".into();
    let second = tally::store::redis::RedisStore::open(cfg).unwrap();
    assert_eq!(second.generation(), 2);
    // More input: the first writer's next commit is refused, and it stops.
    gen_to(
        &tmp.path().join("more.jsonl"),
        &[
            "--events",
            "100",
            "--seed",
            "27",
            "--start",
            "2026-11-20T00:00:00Z",
        ],
    );
    let more = std::fs::read_to_string(tmp.path().join("more.jsonl")).unwrap();
    append(&input, &more.lines().map(str::as_bytes).collect::<Vec<_>>());
    let out = exit_within(first, Duration::from_secs(30), "the first writer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("another writer (generation 2) took over"),
        "{err}"
    );
}

/// A follow-mode run that has committed the first half of a generated stream,
/// with the second half still to append.
struct HalfWay {
    tmp: tempfile::TempDir,
    /// The whole stream, and the uninterrupted embedded run's export of it.
    full: std::path::PathBuf,
    expected: String,
    /// The file the run follows, and its data directory.
    input: std::path::PathBuf,
    data: std::path::PathBuf,
    rest: Vec<Vec<u8>>,
    redis: RedisServer,
    /// The follow-mode run (taken when a test waits for its exit).
    child: Option<Child>,
}

/// Starts Redis (with `redis_args`) and `tally run --follow` (with `tally_args`) on
/// the first half of `events` generated events, and waits until it is committed.
fn half_way(events: &str, seed: &str, redis_args: &[&str], tally_args: &[&str]) -> HalfWay {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full.jsonl");
    gen_to(&full, &["--events", events, "--seed", seed]);
    let expected = reference(&full, tmp.path());
    let bytes = std::fs::read(&full).unwrap();
    let lines = lines_of(&bytes);
    let (first, rest) = lines.split_at(lines.len() / 2);
    let redis = RedisServer::start_with(redis_args);
    let input = tmp.path().join("growing.jsonl");
    let data = tmp.path().join("d");
    append(&input, first);
    let child = tally()
        .args(["run", &p(&input), "--follow", "--data-dir", &p(&data)])
        .args(["--redis", &redis.url()])
        .args(tally_args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let len = std::fs::metadata(&input).unwrap().len();
    wait_for("the first half committed", Duration::from_secs(30), || {
        committed_offset(redis.port, &input) == len
    });
    let rest = rest.iter().map(|l| l.to_vec()).collect();
    HalfWay {
        tmp,
        full,
        expected,
        input,
        data,
        rest,
        redis,
        child: Some(child),
    }
}

impl HalfWay {
    fn append_rest(&self) {
        append(
            &self.input,
            &self.rest.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        );
    }

    /// A new run to the end of the input: its export and dead letters must be the
    /// uninterrupted run's.
    fn restart_and_check(&self) {
        let status = tally()
            .args([
                "run",
                &p(&self.input),
                "--until-eof",
                "--data-dir",
                &p(&self.data),
            ])
            .args(["--redis", &self.redis.url()])
            .status()
            .unwrap();
        assert!(status.success());
        assert!(export_redis(&self.redis.url(), false) == self.expected);
        assert_eq!(
            dead_letters_by_line(&self.data, &self.input),
            dead_letters_by_line(&self.tmp.path().join("ref"), &self.full)
        );
    }
}

#[test]
fn redis_that_lost_commits_stops_the_writer_and_a_restart_rebuilds_exactly() {
    // No persistence at all: a restart loses everything committed.
    let mut h = half_way("30000", "28", &["--appendonly", "no"], &[]);
    h.redis.stop(true);
    h.redis.start_again();
    assert_eq!(
        committed_epoch(h.redis.port),
        0,
        "the restarted Redis is empty"
    );
    h.append_rest();
    let child = h.child.take().expect("running");
    let out = exit_within(
        child,
        Duration::from_secs(30),
        "the writer facing lost commits",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("lost writes"), "{err}");
    // The restart finds epoch 0 in Redis: it cuts the staging log and the dead
    // letters back to nothing and reads everything again, counting it once.
    h.restart_and_check();
}

#[test]
fn sigterm_during_an_outage_exits_at_the_deadline_and_loses_nothing() {
    let mut h = half_way("20000", "29", &[], &["--shutdown-timeout", "1s"]);
    h.redis.stop(false);
    h.append_rest();
    std::thread::sleep(Duration::from_millis(800));
    let _ = std::process::Command::new("kill")
        .args([
            "-TERM",
            &h.child.as_ref().expect("running").id().to_string(),
        ])
        .status();
    let child = h.child.take().expect("running");
    let out = exit_within(
        child,
        Duration::from_secs(10),
        "tally past its shutdown deadline",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("shutdown deadline of 1s passed"), "{err}");
    h.redis.start_again();
    h.restart_and_check();
}
