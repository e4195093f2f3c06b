//! Scale-out: one timely cluster of several `tally run` processes on loopback, with
//! timely's own networking. Its export must equal a single process's, also after a
//! process dies and the run restarts in another shape; a mismatched deployment must
//! fail at once, naming what differs.

mod common;

use common::cluster::{finish, hosts_file, spawn_process, stderr};
use common::redis::free_port;
use common::{gen_to, run_until_eof, tally, wait_for};
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;

/// Dead letters without their epoch (epochs are cut by time, so they may differ).
fn dead_letters(data: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(data.join("dead-letters.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("epoch");
            v.to_string()
        })
        .collect()
}

/// The status the standard gRPC health service at `addr` gives the whole server.
fn health(addr: &str) -> Option<i32> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .ok()?
            .connect()
            .await
            .ok()?;
        let reply = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        Some(reply.into_inner().status)
    })
}

/// A generated input, its export from one uninterrupted process, and a hosts file
/// and data directory for a 2-process cluster to be interrupted over it.
struct Interrupted {
    tmp: tempfile::TempDir,
    events: std::path::PathBuf,
    want: std::path::PathBuf,
    hosts: std::path::PathBuf,
    data: std::path::PathBuf,
}

impl Interrupted {
    fn new(events: &str, seed: &str) -> Interrupted {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("events.jsonl");
        gen_to(&input, &["--events", events, "--seed", seed]);
        let want = tmp.path().join("single.jsonl");
        run_until_eof(
            &input,
            &tmp.path().join("single"),
            Some(1),
            None,
            Some(&want),
        );
        Interrupted {
            hosts: hosts_file(tmp.path(), 2),
            data: tmp.path().join("cluster"),
            events: input,
            want,
            tmp,
        }
    }

    /// Process 0 (1 worker) over the input, with `extra` flags.
    fn leader(&self, extra: &[&str]) -> Child {
        let mut args = vec![
            self.events.to_str().unwrap(),
            "--data-dir",
            self.data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        spawn_process(&self.hosts, 2, 0, 1, &args)
    }

    fn wait_for_a_commit(&self) {
        wait_for(
            "a first commit of the cluster",
            Duration::from_secs(60),
            || common::committed_bytes(&self.data) > 0,
        );
    }

    /// One process of `workers` resumes on the cluster's data directory and must
    /// export exactly what the uninterrupted run did.
    fn assert_resumes_exactly(&self, workers: u32, after: &str) {
        let got = self.tmp.path().join("restarted.jsonl");
        run_until_eof(&self.events, &self.data, Some(workers), None, Some(&got));
        assert_eq!(
            std::fs::read_to_string(&got).unwrap(),
            std::fs::read_to_string(&self.want).unwrap(),
            "after {after} and a restart in one process, the export differs"
        );
    }
}

#[test]
fn two_processes_of_two_workers_equal_one_process_of_one() {
    let tmp = tempfile::tempdir().unwrap();
    let events = tmp.path().join("events.jsonl");
    gen_to(
        &events,
        &["--events", "40000", "--seed", "7", "--bad-rate", "0.01"],
    );
    let single = tmp.path().join("single");
    let want = tmp.path().join("single.jsonl");
    run_until_eof(&events, &single, Some(1), None, Some(&want));

    let hosts = hosts_file(tmp.path(), 2);
    let data = tmp.path().join("cluster");
    let got = tmp.path().join("cluster.jsonl");
    // The follower first: the leader's connection attempts wait for it either way.
    let follower = spawn_process(&hosts, 2, 1, 2, &[]);
    let leader = spawn_process(
        &hosts,
        2,
        0,
        2,
        &[
            events.to_str().unwrap(),
            "--until-eof",
            "--data-dir",
            data.to_str().unwrap(),
            "--export",
            got.to_str().unwrap(),
        ],
    );
    let l = finish(leader, "the leader", Duration::from_secs(120));
    assert!(l.status.success(), "leader failed: {}", stderr(&l));
    let f = finish(follower, "the follower", Duration::from_secs(30));
    assert!(f.status.success(), "follower failed: {}", stderr(&f));

    let want_rows = std::fs::read_to_string(&want).unwrap();
    assert!(want_rows.lines().count() > 1000, "a real export");
    assert_eq!(
        std::fs::read_to_string(&got).unwrap(),
        want_rows,
        "2 processes x 2 workers: the export differs from 1 process x 1 worker"
    );
    let dead = dead_letters(&data);
    assert!(
        dead.len() > 100,
        "bad records and rejected duplicates were sent"
    );
    assert_eq!(dead, dead_letters(&single), "the dead letters differ");
}

#[test]
fn a_lost_process_stops_the_cluster_and_a_restart_in_another_shape_is_exact() {
    let c = Interrupted::new("400000", "11");
    // The follower serves the health service alone: NOT_SERVING until the cluster forms.
    let health_addr = format!("127.0.0.1:{}", free_port());
    let follower = spawn_process(&c.hosts, 2, 1, 1, &["--grpc-addr", &health_addr]);
    wait_for(
        "the follower's health service",
        Duration::from_secs(30),
        || health(&health_addr).is_some(),
    );
    assert_eq!(health(&health_addr), Some(ServingStatus::NotServing as i32));
    // `--follow`: the leader keeps waiting for more input, so it is still running
    // when killed however fast it reads. With `--until-eof` it could finish the
    // input, and the follower with it, before the checks below.
    let mut leader = c.leader(&["--follow"]);
    c.wait_for_a_commit();
    assert_eq!(health(&health_addr), Some(ServingStatus::Serving as i32));
    // The leader dies mid-run; the follower, alone, must stop by itself.
    assert!(
        leader.try_wait().unwrap().is_none(),
        "the leader was still running"
    );
    leader.kill().unwrap();
    let _ = leader.wait();
    let f = finish(
        follower,
        "the follower after the leader died",
        Duration::from_secs(30),
    );
    assert_eq!(
        f.status.code(),
        Some(4),
        "the follower's exit: {}",
        stderr(&f)
    );
    assert!(
        stderr(&f).contains("lost the connection to another cluster process"),
        "{}",
        stderr(&f)
    );
    // One process of 2 workers on the same data directory.
    c.assert_resumes_exactly(2, "the cluster died");
}

#[test]
fn a_mismatched_cluster_fails_at_once_naming_the_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let hosts = hosts_file(tmp.path(), 2);
    let data = tmp.path().join("d");
    let events = tmp.path().join("events.jsonl");
    gen_to(&events, &["--events", "100"]);
    let follower = spawn_process(&hosts, 2, 1, 1, &[]);
    let leader = spawn_process(
        &hosts,
        2,
        0,
        2,
        &[
            events.to_str().unwrap(),
            "--until-eof",
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );
    let l = finish(leader, "the mismatched leader", Duration::from_secs(30));
    let f = finish(follower, "the mismatched follower", Duration::from_secs(30));
    assert!(!l.status.success() && !f.status.success());
    assert!(
        stderr(&l).contains("process 1 from 127.0.0.1")
            && stderr(&l).contains("it runs 1 workers, this process 2"),
        "leader: {}",
        stderr(&l)
    );
    assert!(
        stderr(&f).contains("every process needs the same --workers"),
        "follower: {}",
        stderr(&f)
    );
    assert!(!data.join("store").exists() || common::committed_bytes(&data) == 0);
}

#[test]
fn a_missing_process_is_named_when_the_wait_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let hosts = hosts_file(tmp.path(), 3);
    let events = tmp.path().join("events.jsonl");
    gen_to(&events, &["--events", "10"]);
    let out = tally()
        .args(["run", events.to_str().unwrap(), "--until-eof"])
        .args(["--data-dir", tmp.path().join("d").to_str().unwrap()])
        .args(["--processes", "3", "--process", "0"])
        .args([
            "--hosts",
            hosts.to_str().unwrap(),
            "--cluster-timeout",
            "1s",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = stderr(&out);
    let ports: Vec<String> = std::fs::read_to_string(&hosts)
        .unwrap()
        .lines()
        .skip(1)
        .map(str::to_owned)
        .collect();
    assert!(
        text.contains(&format!(
            "processes 1 ({}), 2 ({}) did not connect within 1s",
            ports[1], ports[2]
        )),
        "{text}"
    );
    // Flags that cannot form a cluster are refused before anything starts.
    let out = tally()
        .args(["run", events.to_str().unwrap(), "--processes", "2"])
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("--processes 2 needs --hosts FILE"),
        "{}",
        stderr(&out)
    );
}

/// SIGTERM, as Kubernetes sends every pod: a follower keeps computing while the
/// leader runs; the leader stops reading, commits what it read and ends the
/// cluster; both exit 0. A restart in one process then finishes the input exactly.
#[test]
fn sigterm_drains_the_cluster_and_a_restart_is_exact() {
    let c = Interrupted::new("200000", "5");
    let keys = c.tmp.path().join("keys.json");
    let admin = String::from_utf8(
        common::ok(&["keys", "add", "--admin", "--keys", keys.to_str().unwrap()]).stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    let grpc = format!("127.0.0.1:{}", free_port());
    let mut follower = spawn_process(&c.hosts, 2, 1, 1, &[]);
    let leader = c.leader(&[
        "--follow",
        "--grpc-addr",
        &grpc,
        "--keys",
        keys.to_str().unwrap(),
    ]);
    c.wait_for_a_commit();
    // Admin.Status tells the cluster's shape.
    let status = tally()
        .args([
            "query",
            "--addr",
            &format!("http://{grpc}"),
            "--json",
            "status",
        ])
        .env("TALLY_API_KEY", &admin)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", stderr(&status));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        (&status["processes"], &status["workers_per_process"]),
        (&serde_json::json!(2), &serde_json::json!(1)),
        "{status}"
    );
    let term = |c: &Child| {
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
    };
    term(&follower);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        follower.try_wait().unwrap().is_none(),
        "a follower waits for the leader"
    );
    term(&leader);
    let l = finish(leader, "the leader after SIGTERM", Duration::from_secs(60));
    assert!(l.status.success(), "leader: {}", stderr(&l));
    let f = finish(
        follower,
        "the follower after the leader",
        Duration::from_secs(30),
    );
    assert!(f.status.success(), "follower: {}", stderr(&f));

    c.assert_resumes_exactly(1, "a SIGTERM of the cluster");
}
