//! kinesalite (npm: the Kinesis API in memory) on a free loopback port, started
//! through scripts/kinesalite.js from the node_modules scripts/deps.sh installs
//! (`$TALLY_NODE`, default `~/.cache/tally-node`), and an SDK client for it.

use super::redis::free_port;
use super::tally;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Credentials and region kinesalite accepts (it checks only that they are there).
pub const ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "tally-test"),
    ("AWS_SECRET_ACCESS_KEY", "tally-test"),
    ("AWS_REGION", "us-east-1"),
];

pub struct Kinesalite {
    child: Child,
    pub port: u16,
    /// Its standard output (`throttled K` lines).
    out: tempfile::NamedTempFile,
}

impl Kinesalite {
    pub fn start() -> Kinesalite {
        Kinesalite::start_with(&[])
    }

    /// With scripts/kinesalite.js's options, e.g. `--throttle-get-records 3`.
    pub fn start_with(options: &[&str]) -> Kinesalite {
        let node_dir = std::env::var("TALLY_NODE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/tally-node")
            });
        let modules = node_dir.join("node_modules");
        assert!(
            modules.join("kinesalite").is_dir(),
            "kinesalite is not installed in {}: run `bash scripts/deps.sh` (scripts/test.sh does)",
            modules.display()
        );
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kinesalite.js");
        let port = free_port();
        let out = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("node")
            .arg(&script)
            .arg(port.to_string())
            .args(options)
            .env("NODE_PATH", &modules)
            .stdout(Stdio::from(out.reopen().unwrap()))
            .spawn()
            .expect("node (scripts/deps.sh installs it)");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "kinesalite did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Kinesalite { child, port, out }
    }

    /// GetRecords calls answered as throttled so far (`--throttle-get-records`).
    pub fn throttled(&self) -> usize {
        std::fs::read_to_string(self.out.path())
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("throttled "))
            .count()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An SDK client for this server.
    pub fn client(&self) -> aws_sdk_kinesis::Client {
        let creds =
            aws_sdk_kinesis::config::Credentials::new(ENV[0].1, ENV[1].1, None, None, "test");
        let conf = aws_sdk_kinesis::Config::builder()
            .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
            .region(aws_sdk_kinesis::config::Region::new(ENV[2].1))
            .credentials_provider(creds)
            .endpoint_url(self.endpoint())
            .build();
        aws_sdk_kinesis::Client::from_conf(conf)
    }

    /// `tally publish FILE --to kinesis --stream STREAM` here; panics if it fails.
    pub fn publish(&self, stream: &str, file: &Path) {
        let out = tally()
            .args(["publish", file.to_str().unwrap(), "--to", "kinesis"])
            .args(["--stream", stream, "--endpoint", &self.endpoint()])
            .envs(ENV)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "publish: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates a stream of `shards` shards and waits until it is ACTIVE.
    pub async fn create_stream(&self, name: &str, shards: i32) {
        let c = self.client();
        c.create_stream()
            .stream_name(name)
            .shard_count(shards)
            .send()
            .await
            .expect("CreateStream");
        self.wait_active(name).await;
    }

    /// Waits until `name` is ACTIVE (after a create or a reshard).
    pub async fn wait_active(&self, name: &str) {
        let c = self.client();
        let start = Instant::now();
        loop {
            let d = c
                .describe_stream_summary()
                .stream_name(name)
                .send()
                .await
                .expect("DescribeStreamSummary");
            let status = d
                .stream_description_summary()
                .map(|s| s.stream_status().clone());
            if status == Some(aws_sdk_kinesis::types::StreamStatus::Active) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name} never ACTIVE"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The shards: (id, open), in id order.
    pub async fn shards(&self, name: &str) -> Vec<(String, bool)> {
        self.list(name)
            .await
            .iter()
            .map(|s| {
                let open = s
                    .sequence_number_range()
                    .is_none_or(|r| r.ending_sequence_number().is_none());
                (s.shard_id().to_owned(), open)
            })
            .collect()
    }

    /// ListShards of `name` (one page: the tests' streams are small).
    async fn list(&self, name: &str) -> Vec<aws_sdk_kinesis::types::Shard> {
        let out = self
            .client()
            .list_shards()
            .stream_name(name)
            .send()
            .await
            .expect("ListShards");
        out.shards.unwrap_or_default()
    }

    /// Splits `shard` in the middle of its hash-key range; waits until ACTIVE.
    pub async fn split(&self, name: &str, shard: &str) {
        let shards = self.list(name).await;
        let s = shards
            .iter()
            .find(|s| s.shard_id() == shard)
            .expect("the shard is listed");
        let range = s.hash_key_range().expect("a hash-key range");
        let lo: u128 = range.starting_hash_key().parse().unwrap();
        let hi: u128 = range.ending_hash_key().parse().unwrap();
        self.client()
            .split_shard()
            .stream_name(name)
            .shard_to_split(shard)
            .new_starting_hash_key((lo + (hi - lo) / 2).to_string())
            .send()
            .await
            .expect("SplitShard");
        self.wait_active(name).await;
    }

    /// Merges two adjacent shards; waits until ACTIVE.
    pub async fn merge(&self, name: &str, a: &str, b: &str) {
        self.client()
            .merge_shards()
            .stream_name(name)
            .shard_to_merge(a)
            .adjacent_shard_to_merge(b)
            .send()
            .await
            .expect("MergeShards");
        self.wait_active(name).await;
    }

    /// Every record of every shard, from the start: (shard id, partition key, data).
    pub async fn read_all(&self, name: &str) -> Vec<(String, String, Vec<u8>)> {
        let c = self.client();
        let mut out = Vec::new();
        for s in self.list(name).await {
            let mut it = c
                .get_shard_iterator()
                .stream_name(name)
                .shard_id(s.shard_id())
                .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("GetShardIterator")
                .shard_iterator
                .expect("an iterator");
            loop {
                let r = c
                    .get_records()
                    .shard_iterator(&it)
                    .limit(10_000)
                    .send()
                    .await
                    .expect("GetRecords");
                for rec in r.records() {
                    out.push((
                        s.shard_id().to_owned(),
                        rec.partition_key().unwrap_or_default().to_owned(),
                        rec.data().as_ref().to_vec(),
                    ));
                }
                // An open shard always has a next iterator: stop once caught up.
                if r.records().is_empty() {
                    break;
                }
                match r.next_shard_iterator() {
                    Some(n) => it = n.to_owned(),
                    None => break,
                }
            }
        }
        out
    }
}

impl Drop for Kinesalite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
