//! `tally publish`: sends JSON Lines events to a running Tally, as an upstream
//! system without a broker would (bulk import, upstream simulation).
//!
//! Over gRPC it streams every line of the input through `Ingest.Publish` (the line
//! number is the sequence) and waits for each acknowledgement: COMMITTED once the
//! epoch holding the event is committed, or DEAD_LETTER with the reason. It prints a
//! summary with the first dead letters by line, and exits 1 when any record was a
//! dead letter. If the connection ends before every event is acknowledged, it says
//! how many were not: publishing the file again is safe, since a redelivery counts
//! once.
//!
//! To Kinesis it puts every line as one record (PutRecords, up to 500 records or
//! 5 MiB a call), with the event's provider_id as the partition key, so that a
//! provider's events share a shard. Lines without a usable provider_id (bad records:
//! Tally dead-letters them when it reads the stream) go under the key `-`. Records
//! the stream refuses for throughput are put again with backoff. Every line is sent,
//! in order within a call; a retried record may land after later ones (Tally's
//! semantics do not depend on arrival order, beyond lateness).
//!
//! To Fluvio it sends every line as one record of the topic (--topic) keyed by its
//! provider_id (the same key rule), so the cluster's partitioner puts a provider's
//! events in one partition, in order; the producer batches them and is flushed at
//! the end.

use super::Exit;
use crate::query::pb;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

/// Where `tally publish` sends events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// A Tally server's Ingest.Publish (`run --grpc-addr`), with an ingest key.
    Grpc,
    /// An AWS Kinesis stream (--stream); credentials and region from the standard
    /// AWS chain (environment, profile, instance or pod role).
    Kinesis,
    /// A Fluvio topic (--topic) on the cluster of --fluvio-endpoint or the current
    /// Fluvio profile.
    Fluvio,
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// JSON Lines events: a file, or `-` for stdin.
    pub input: PathBuf,
    /// Where to send them.
    #[arg(long, value_enum, default_value = "grpc")]
    pub to: Target,
    /// Fluvio: the topic.
    #[arg(long, required_if_eq("to", "fluvio"))]
    pub topic: Option<String>,
    /// Fluvio: the cluster's SC address (host:port). Default: the current Fluvio profile.
    #[arg(long, env = "TALLY_FLUVIO_ENDPOINT")]
    pub fluvio_endpoint: Option<String>,
    /// Kinesis: the stream's name.
    #[arg(long, required_if_eq("to", "kinesis"))]
    pub stream: Option<String>,
    /// Kinesis: the AWS region (default: from AWS_REGION or the profile).
    #[arg(long)]
    pub region: Option<String>,
    /// Kinesis: another endpoint than AWS's, e.g. a local server
    /// (http://127.0.0.1:4567). Also AWS_ENDPOINT_URL_KINESIS.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// gRPC: the server, http://HOST:PORT, or https://HOST:PORT for TLS.
    #[arg(long, env = "TALLY_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// PEM file of the CA that signed the server's certificate (https).
    #[arg(long, env = "TALLY_CA")]
    pub ca: Option<PathBuf>,
    /// Dead letters listed in the summary, at most.
    #[arg(long, default_value_t = 10)]
    pub examples: usize,
    /// No progress bar (it is drawn only on a terminal anyway).
    #[arg(long)]
    pub quiet: bool,
}

/// What the server acknowledged.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    committed: u64,
    dead: BTreeMap<String, u64>,
    examples: Vec<(u64, String)>,
}

pub fn publish(a: PublishArgs) -> Result<Exit> {
    let (reader, size) = open(&a)?;
    let bar = progress_bar(size, a.quiet);
    let reader = Lines {
        reader,
        input: a.input.display().to_string(),
        bar: bar.clone(),
        line: Vec::new(),
        n: 0,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if a.to == Target::Kinesis {
        let stream = a.stream.clone().context("--to kinesis needs --stream")?;
        let k = rt.block_on(kinesis::put(&a, &stream, reader, bar.clone()))?;
        bar.finish_and_clear();
        println!(
            "{} records put to Kinesis stream {stream} in {} calls ({} put again after throttling)",
            k.records, k.calls, k.retried
        );
        return Ok(Exit::Ok);
    }
    if a.to == Target::Fluvio {
        let topic = a.topic.clone().context("--to fluvio needs --topic")?;
        let n = rt.block_on(fluvio::send(&a, &topic, reader, bar.clone()))?;
        bar.finish_and_clear();
        println!("{n} records sent to Fluvio topic {topic}");
        return Ok(Exit::Ok);
    }
    let key = std::env::var("TALLY_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .context("set TALLY_API_KEY to an ingest key (tally keys add --ingest)")?;
    let key: tonic::metadata::MetadataValue<_> = format!("Bearer {key}")
        .parse()
        .context("TALLY_API_KEY is not a valid header value")?;
    let t = rt.block_on(send(&a, key, reader, bar.clone()))?;
    bar.finish_and_clear();
    let dead: u64 = t.dead.values().sum();
    println!(
        "{} events sent to {}: {} committed, {dead} dead letters",
        t.sent, a.addr, t.committed
    );
    if !t.dead.is_empty() {
        println!("dead letters by reason:");
        for (reason, n) in &t.dead {
            println!("  {reason}: {n}");
        }
        println!("first dead letters:");
        for (line, reason) in &t.examples {
            println!("  line {line}: {reason}");
        }
    }
    Ok(if dead > 0 { Exit::BadRecords } else { Exit::Ok })
}

/// The input and its size when known (a file).
fn open(a: &PublishArgs) -> Result<(Box<dyn BufRead + Send>, Option<u64>)> {
    Ok(if a.input.as_os_str() == "-" {
        (Box::new(std::io::BufReader::new(std::io::stdin())), None)
    } else {
        let f = std::fs::File::open(&a.input)
            .with_context(|| format!("opening {}", a.input.display()))?;
        let size = f.metadata().ok().map(|m| m.len());
        (
            Box::new(std::io::BufReader::with_capacity(1 << 20, f)),
            size,
        )
    })
}

/// The input's lines without their newline, counted, the bytes read shown on the bar.
struct Lines {
    reader: Box<dyn BufRead + Send>,
    input: String,
    bar: indicatif::ProgressBar,
    line: Vec<u8>,
    /// Lines read so far.
    n: u64,
}

impl Lines {
    /// The next line, `None` at the end.
    fn next(&mut self) -> Result<Option<&[u8]>> {
        self.line.clear();
        let read = self
            .reader
            .read_until(b'\n', &mut self.line)
            .with_context(|| format!("reading {} after line {}", self.input, self.n))?;
        if read == 0 {
            return Ok(None);
        }
        self.bar.inc(read as u64);
        self.n += 1;
        if self.line.last() == Some(&b'\n') {
            self.line.pop();
        }
        Ok(Some(&self.line))
    }
}

fn progress_bar(size: Option<u64>, quiet: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = match size {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} read, {msg} [{elapsed} elapsed, ETA {eta}]",
            )
            .expect("a valid template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} read, {msg} [{elapsed}]")
                .expect("a valid template"),
        ),
    };
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}

async fn send(
    a: &PublishArgs,
    key: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    mut reader: Lines,
    bar: indicatif::ProgressBar,
) -> Result<Tally> {
    let channel = super::client::connect(&a.addr, a.ca.as_deref()).await?;
    let mut client = pb::ingest_client::IngestClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);

    // Lines are read on a thread of their own; the bounded channel is the backpressure.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PublishRequest>(4096);
    let lines = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reading = {
        let lines = std::sync::Arc::clone(&lines);
        std::thread::Builder::new()
            .name("tally-publish-read".into())
            .spawn(move || -> Result<u64> {
                while let Some(line) = reader.next()? {
                    let event = line.to_vec();
                    let msg = pb::PublishRequest {
                        sequence: reader.n,
                        event,
                    };
                    lines.store(reader.n, std::sync::atomic::Ordering::Relaxed);
                    if tx.blocking_send(msg).is_err() {
                        // The call ended early; the error comes from the acks.
                        return Ok(reader.n - 1);
                    }
                }
                Ok(reader.n)
            })?
    };
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert("authorization", key);
    let mut t = Tally::default();
    let result: Result<()> = async {
        let mut acks = client
            .publish(req)
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        while let Some(ack) = acks
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        {
            if ack.status == pb::publish_ack::Status::Committed as i32 {
                t.committed += 1;
            } else {
                *t.dead.entry(ack.reason.clone()).or_default() += 1;
                if t.examples.len() < a.examples {
                    t.examples.push((ack.sequence, ack.reason));
                }
            }
            let dead: u64 = t.dead.values().sum();
            bar.set_message(format!("{} committed, {dead} dead letters", t.committed));
        }
        Ok(())
    }
    .await;
    t.examples.sort();
    let acked = t.committed + t.dead.values().sum::<u64>();
    if let Err(e) = result {
        // The reader may be blocked on the call's full channel: not joined.
        bar.abandon();
        anyhow::bail!(
            "publishing to {} failed after {acked} of {} events read were acknowledged: {e}. \
             Publishing the same input again is safe: a redelivery counts once",
            a.addr,
            lines.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    // The server ends the call only after the client's side ended: all was read.
    t.sent = reading.join().expect("the reading thread")?;
    anyhow::ensure!(
        acked == t.sent,
        "the server acknowledged {acked} of {} events; publish the same input again \
         (a redelivery counts once)",
        t.sent
    );
    Ok(t)
}

mod fluvio {
    //! `tally publish --to fluvio`.

    use super::PublishArgs;
    use anyhow::Result;

    pub async fn send(
        a: &PublishArgs,
        topic: &str,
        mut reader: super::Lines,
        bar: indicatif::ProgressBar,
    ) -> Result<u64> {
        let fail = |why: String| anyhow::anyhow!("Fluvio topic '{topic}': {why}");
        let client = crate::source::fluvio::connect(a.fluvio_endpoint.as_deref())
            .await
            .map_err(fail)?;
        crate::source::fluvio::partitions(&client, topic)
            .await
            .map_err(fail)?;
        let producer = client
            .topic_producer(topic.to_owned())
            .await
            .map_err(|e| fail(format!("{e:#}")))?;
        let mut n = 0u64;
        while let Some(line) = reader.next()? {
            let key = super::kinesis::partition_key(line);
            producer
                .send(key, line.to_vec())
                .await
                .map_err(|e| fail(format!("sending after {n} records: {e:#}")))?;
            n += 1;
            if n.is_multiple_of(10_000) {
                bar.set_message(format!("{n} records sent"));
            }
        }
        producer
            .flush()
            .await
            .map_err(|e| fail(format!("flushing after {n} records: {e:#}")))?;
        Ok(n)
    }
}

mod kinesis {
    //! `tally publish --to kinesis`.

    use super::PublishArgs;
    use anyhow::{Context, Result};
    use aws_sdk_kinesis::primitives::Blob;
    use aws_sdk_kinesis::types::PutRecordsRequestEntry;
    use std::time::Duration;

    /// PutRecords limits: records and bytes (data and keys) a call.
    const MAX_RECORDS: usize = 500;
    const MAX_BYTES: usize = 5 << 20;
    /// The partition key of a line without a usable provider_id.
    const NO_PROVIDER: &str = "-";

    #[derive(Debug, Default)]
    pub struct Put {
        pub records: u64,
        pub calls: u64,
        pub retried: u64,
    }

    /// The partition key of a line: its provider_id when it has a usable one.
    pub fn partition_key(line: &[u8]) -> String {
        #[derive(serde::Deserialize)]
        struct Provider {
            provider_id: Option<serde_json::Value>,
        }
        match serde_json::from_slice::<Provider>(line) {
            Ok(Provider {
                provider_id: Some(serde_json::Value::String(p)),
            }) if !p.is_empty() && p.chars().count() <= 256 => p,
            _ => NO_PROVIDER.to_owned(),
        }
    }

    pub async fn put(
        a: &PublishArgs,
        stream: &str,
        mut reader: super::Lines,
        bar: indicatif::ProgressBar,
    ) -> Result<Put> {
        let client =
            crate::source::kinesis::client(a.region.as_deref(), a.endpoint.as_deref(), true)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        crate::source::kinesis::check_stream(&client, stream)
            .await
            .map_err(|why| anyhow::anyhow!("Kinesis stream '{stream}': {why}"))?;
        let mut done = Put::default();
        let mut batch: Vec<PutRecordsRequestEntry> = Vec::new();
        let mut bytes = 0usize;
        loop {
            let Some(line) = reader.next()? else {
                if !batch.is_empty() {
                    put_all(&client, stream, batch, &mut done).await?;
                }
                return Ok(done);
            };
            let key = partition_key(line);
            let size = line.len() + key.len();
            if batch.len() == MAX_RECORDS || bytes + size > MAX_BYTES {
                put_all(&client, stream, std::mem::take(&mut batch), &mut done).await?;
                bytes = 0;
                bar.set_message(format!("{} records put", done.records));
            }
            bytes += size;
            batch.push(
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(line.to_vec()))
                    .partition_key(key)
                    .build()
                    .context("a Kinesis record")?,
            );
        }
    }

    /// Puts `records`, putting again (with backoff) those refused for throughput or
    /// an internal failure, until all are in.
    async fn put_all(
        client: &aws_sdk_kinesis::Client,
        stream: &str,
        mut records: Vec<PutRecordsRequestEntry>,
        done: &mut Put,
    ) -> Result<()> {
        let mut backoff = Duration::from_millis(100);
        while !records.is_empty() {
            done.calls += 1;
            let sent = records.len() as u64;
            let out = match client
                .put_records()
                .stream_name(stream)
                .set_records(Some(records.clone()))
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    let throttled = e.as_service_error().is_some_and(|s| {
                        s.is_provisioned_throughput_exceeded_exception()
                            || s.is_internal_failure_exception()
                    });
                    if !throttled {
                        anyhow::bail!(
                            "putting records to Kinesis stream '{stream}' after {} put: {}",
                            done.records,
                            aws_sdk_kinesis::error::DisplayErrorContext(&e)
                        );
                    }
                    done.retried += sent;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if out.failed_record_count().unwrap_or(0) == 0 {
                done.records += sent;
                return Ok(());
            }
            // Keep the refused ones, in their order; the results are in request order.
            let refused: Vec<PutRecordsRequestEntry> = records
                .into_iter()
                .zip(out.records())
                .filter(|(_, r)| r.error_code().is_some())
                .map(|(rec, _)| rec)
                .collect();
            done.records += sent - refused.len() as u64;
            done.retried += refused.len() as u64;
            records = refused;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_partition_key_is_the_provider() {
            let k = super::partition_key;
            assert_eq!(k(br#"{"event_id":"1","provider_id":"claro"}"#), "claro");
            assert_eq!(k(br#"{"provider_id":"Bogot\u00e1"}"#), "Bogot\u{e1}");
            for bad in [
                &br#"{"provider_id":""}"#[..],
                br#"{"provider_id":7}"#,
                br#"{"event_id":"1"}"#,
                b"not json",
                b"[1,2]",
            ] {
                assert_eq!(k(bad), "-", "{}", String::from_utf8_lossy(bad));
            }
            let long = format!(r#"{{"provider_id":"{}"}}"#, "p".repeat(257));
            assert_eq!(k(long.as_bytes()), "-");
        }
    }
}
