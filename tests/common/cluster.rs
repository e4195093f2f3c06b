//! A timely cluster of `tally run` processes on loopback, for the tests.

use super::redis::free_port;
use super::tally;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A hosts file of `n` free loopback ports.
pub fn hosts_file(dir: &Path, n: usize) -> std::path::PathBuf {
    let path = dir.join("hosts");
    let lines: Vec<String> = (0..n)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    std::fs::write(&path, format!("# test cluster\n{}\n", lines.join("\n"))).unwrap();
    path
}

/// `tally run --processes N --process I --hosts H --workers W` plus `extra`, started.
pub fn spawn_process(hosts: &Path, n: usize, i: usize, workers: usize, extra: &[&str]) -> Child {
    process(hosts, n, i, workers, extra)
        .spawn()
        .expect("tally starts")
}

/// The command of [`spawn_process`].
pub fn process(hosts: &Path, n: usize, i: usize, workers: usize, extra: &[&str]) -> Command {
    let mut c = tally();
    c.args([
        "run",
        "--processes",
        &n.to_string(),
        "--process",
        &i.to_string(),
    ])
    .args(["--hosts", hosts.to_str().unwrap()])
    .args([
        "--workers",
        &workers.to_string(),
        "--cluster-timeout",
        "60s",
    ])
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

/// Waits (bounded) for a process to exit and returns its output.
pub fn finish(child: Child, what: &str, limit: Duration) -> Output {
    let pid = child.id();
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{what} did not exit within {:?}", start.elapsed());
        }
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
