//! What the benchmarks share: a `redis-server` and kinesalite on free loopback
//! ports, and the generated input file. Each benchmark uses its part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// A `redis-server` on a free loopback port, killed on drop (its directory with it).
pub struct Redis {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// With `aof`: the append-only file on, `appendfsync everysec` (a store as
    /// deployed); without: no persistence (reads only).
    pub fn start(aof: bool) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]);
        if aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "everysec"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (bash scripts/deps.sh installs it)");
        let r = Redis {
            child,
            port,
            _dir: dir,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed().as_secs() < 20, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// JSON Lines from the generator (seed 1, default options), cached under the target
/// directory.
pub fn data_file(events: u64) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()),
    )
    .join("bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("gen-seed1-{events}.jsonl"));
    if !path.exists() {
        let tmp = path.with_extension("tmp");
        use std::io::Write;
        let mut w =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).unwrap());
        for l in tally::source::gen::Generator::new(tally::source::gen::GenOptions {
            seed: 1,
            events: Some(events),
            ..tally::source::gen::GenOptions::default()
        }) {
            w.write_all(&l).unwrap();
            w.write_all(b"\n").unwrap();
        }
        w.flush().unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

/// kinesalite (scripts/kinesalite.js, from the node_modules `scripts/deps.sh`
/// installs in `$TALLY_NODE`) on a free loopback port, killed on drop.
pub struct Kinesalite {
    child: std::process::Child,
    pub port: u16,
}

impl Kinesalite {
    pub fn start() -> Kinesalite {
        let node = std::env::var("TALLY_NODE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| {
                std::path::PathBuf::from(std::env::var("HOME").expect("HOME"))
                    .join(".cache/tally-node")
            });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("node")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/kinesalite.js"
            ))
            .arg(port.to_string())
            .env("NODE_PATH", node.join("node_modules"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("node with kinesalite (bash scripts/deps.sh installs it)");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed().as_secs() < 30, "kinesalite did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Kinesalite { child, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Kinesalite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
