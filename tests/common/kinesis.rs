//! kinesalite (npm: the Kinesis API in memory) on a free loopback port, started
//! through scripts/kinesalite.js from the node_modules scripts/deps.sh installs
//! (`$TALLY_NODE`, default `~/.cache/tally-node`), and an SDK client for it.

use super::redis::free_port;
use std::path::PathBuf;
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
}

impl Kinesalite {
    pub fn start() -> Kinesalite {
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
        let child = Command::new("node")
            .arg(&script)
            .arg(port.to_string())
            .env("NODE_PATH", &modules)
            .stdout(Stdio::null())
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
        Kinesalite { child, port }
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

    /// Creates a stream of `shards` shards and waits until it is ACTIVE.
    pub async fn create_stream(&self, name: &str, shards: i32) {
        let c = self.client();
        c.create_stream()
            .stream_name(name)
            .shard_count(shards)
            .send()
            .await
            .expect("CreateStream");
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

    /// Every record of every shard, from the start: (shard id, partition key, data).
    pub async fn read_all(&self, name: &str) -> Vec<(String, String, Vec<u8>)> {
        let c = self.client();
        let shards = c
            .list_shards()
            .stream_name(name)
            .send()
            .await
            .expect("ListShards");
        let mut out = Vec::new();
        for s in shards.shards() {
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
