//! Real Redis servers for tests: `redis-server` processes on free loopback ports, with
//! their own directories, stopped when dropped. `scripts/deps.sh` (run by
//! `scripts/test.sh`) installs the Debian package; without it these panic and say so.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn need(bin: &str) -> PathBuf {
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join(bin);
        if p.is_file() {
            return p;
        }
    }
    panic!("{bin} not found on PATH: run `bash scripts/deps.sh` (scripts/test.sh does)");
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `redis-server`, durable (AOF, fsync always) so restarts keep what was written.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// With extra `redis-server` arguments (`--cluster-enabled yes`, TLS, ACL users).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        RedisServer::start_on(free_port(), extra)
    }

    /// On a given port (TLS only when `extra` has `--tls-cert-file`).
    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        let mut s = RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let tls = self.extra.iter().any(|a| a == "--tls-cert-file");
        let port = self.port.to_string();
        let log = self.dir.path().join("redis.log");
        let _ = std::fs::remove_file(&log);
        let mut cmd = Command::new(need("redis-server"));
        if tls {
            cmd.args(["--port", "0", "--tls-port", &port]);
        } else {
            cmd.args(["--port", &port]);
        }
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ])
        .arg("--logfile")
        .arg(&log)
        .arg("--dir")
        .arg(self.dir.path())
        .args(&self.extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("start redis-server"));
        if tls {
            // Readiness shows in the log; the TLS port cannot be probed in plain text.
            wait(&format!("redis-server (TLS) on {port}"), || {
                std::fs::read_to_string(&log)
                    .map(|l| l.contains("Ready to accept connections"))
                    .unwrap_or(false)
            });
        } else {
            let p = self.port;
            wait(&format!("redis-server on {port}"), || {
                cli(p, &["PING"]).is_some_and(|o| o.trim() == "PONG")
            });
        }
    }

    /// Stops the server (SIGKILL when `hard`, else SIGTERM: a clean shutdown).
    pub fn stop(&mut self, hard: bool) {
        if let Some(mut c) = self.child.take() {
            let sig = if hard { "-KILL" } else { "-TERM" };
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Starts it again, stopped, on the same port and directory (the AOF brings the
    /// data back).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// `redis-cli` against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args).unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// `redis-cli -p port args...`; `None` when it cannot connect.
pub fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new(need("redis-cli"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
}

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Redis Cluster of three masters, slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(need("redis-cli"))
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for n in &nodes {
            let p = n.port;
            wait("cluster_state:ok", || {
                cli(p, &["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok"))
            });
        }
        RedisCluster { nodes }
    }

    /// The seed-node URLs, comma-separated (what `--redis` takes with `--redis-cluster`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `redis-cli -c` (follows redirects) against the first node.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(need("redis-cli"))
            .args([
                "-c",
                "-h",
                "127.0.0.1",
                "-p",
                &self.nodes[0].port.to_string(),
            ])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
