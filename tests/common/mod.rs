//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cluster;
pub mod conformance;
pub mod grpc;
pub mod kinesis;
pub mod proxy;
pub mod redis;
pub mod reference;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The built `tally` binary.
pub fn tally() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
    c.env("TALLY_LOG", "warn");
    c
}

/// Runs `tally` with arguments and returns its output; panics with stderr if it fails.
pub fn ok(args: &[&str]) -> Output {
    let out = tally().args(args).output().expect("tally runs");
    assert!(
        out.status.success(),
        "tally {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn scenarios() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios")
}

/// Waits (bounded) until `cond` holds, polling; panics with `what` on timeout.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Bytes committed to the embedded store's log so far.
pub fn committed_bytes(data_dir: &Path) -> u64 {
    std::fs::metadata(data_dir.join("store/wal.bin")).map_or(0, |m| m.len())
}

/// Dead letters as (line number in `input`, reason), sorted.
pub fn dead_letters_by_line(data_dir: &Path, input: &Path) -> Vec<(usize, String)> {
    let bytes = std::fs::read(input).unwrap();
    let starts: Vec<u64> = std::iter::once(0)
        .chain(
            bytes
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i as u64 + 1),
        )
        .collect();
    let text = std::fs::read_to_string(data_dir.join("dead-letters.jsonl")).unwrap_or_default();
    let mut out: Vec<(usize, String)> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let offset = v["offset"].as_u64().unwrap();
            (
                starts.partition_point(|s| *s <= offset),
                v["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

/// `tally run INPUT --until-eof --data-dir DATA`, at `workers` (the default when
/// `None`), with a pipeline and an export when given; panics if it fails.
pub fn run_until_eof(
    input: &Path,
    data: &Path,
    workers: Option<u32>,
    pipeline: Option<&Path>,
    export: Option<&Path>,
) -> Output {
    run_until_eof_with(input, data, workers, pipeline, export, &[])
}

/// [`run_until_eof`] with `extra` arguments (e.g. `--redis URL`).
pub fn run_until_eof_with(
    input: &Path,
    data: &Path,
    workers: Option<u32>,
    pipeline: Option<&Path>,
    export: Option<&Path>,
    extra: &[&str],
) -> Output {
    let path = |p: &Path| p.to_str().expect("UTF-8 test paths").to_owned();
    let mut args = vec![
        "run".to_owned(),
        path(input),
        "--until-eof".into(),
        "--data-dir".into(),
        path(data),
    ];
    if let Some(w) = workers {
        args.extend(["--workers".to_owned(), w.to_string()]);
    }
    if let Some(p) = pipeline {
        args.extend(["--pipeline".to_owned(), path(p)]);
    }
    if let Some(e) = export {
        args.extend(["--export".to_owned(), path(e)]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `tally gen ... --out OUT`; panics if it fails.
pub fn gen_to(out: &Path, options: &[&str]) {
    let mut args = vec!["gen"];
    args.extend_from_slice(options);
    args.extend(["--out", out.to_str().expect("UTF-8 test paths")]);
    ok(&args);
}

/// The venv's Python (grpcio-tools, duckdb, moto; installed by scripts/deps.sh).
pub fn python() -> PathBuf {
    let venv = venv();
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "no Python venv at {}: run `bash scripts/deps.sh` (scripts/test.sh does)",
        venv.display()
    );
    py
}

/// The venv of scripts/deps.sh.
pub fn venv() -> PathBuf {
    std::env::var("TALLY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/tally-venv"))
}

/// `GET /metrics` from a running tally.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: tally\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// The value of a sample (`name` with its labels, as exported); panics if absent.
pub fn metric(text: &str, name: &str) -> f64 {
    find_metric(text, name).unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// The value of a sample, if the text has it (a counter appears at its first count).
pub fn find_metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// A test CA (`ca.crt`, `ca.key`) and a certificate for 127.0.0.1 signed by it
/// (`server.crt`, `server.key`) in `d`, made with openssl (scripts/deps.sh installs it).
pub fn tls_files(d: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .expect("openssl (scripts/deps.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ca = "-keyout ca.key -out ca.crt";
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    ];
    args.extend(ca.split(' '));
    openssl(&args);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
}
