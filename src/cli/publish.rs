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
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// JSON Lines events: a file, or `-` for stdin.
    pub input: PathBuf,
    /// Where to send them. (The Kinesis and Fluvio targets come with those sources.)
    #[arg(long, value_enum, default_value = "grpc")]
    pub to: Target,
    /// The server: http://HOST:PORT, or https://HOST:PORT for TLS.
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
    let key = std::env::var("TALLY_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .context("set TALLY_API_KEY to an ingest key (tally keys add --ingest)")?;
    let key: tonic::metadata::MetadataValue<_> = format!("Bearer {key}")
        .parse()
        .context("TALLY_API_KEY is not a valid header value")?;
    let (reader, size): (Box<dyn BufRead + Send>, Option<u64>) = if a.input.as_os_str() == "-" {
        (Box::new(std::io::BufReader::new(std::io::stdin())), None)
    } else {
        let f = std::fs::File::open(&a.input)
            .with_context(|| format!("opening {}", a.input.display()))?;
        let size = f.metadata().ok().map(|m| m.len());
        (
            Box::new(std::io::BufReader::with_capacity(1 << 20, f)),
            size,
        )
    };
    let bar = progress_bar(size, a.quiet);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
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
    mut reader: Box<dyn BufRead + Send>,
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
        let bar = bar.clone();
        let lines = std::sync::Arc::clone(&lines);
        let input = a.input.display().to_string();
        std::thread::Builder::new()
            .name("tally-publish-read".into())
            .spawn(move || -> Result<u64> {
                let mut line = Vec::new();
                let mut n = 0u64;
                loop {
                    line.clear();
                    let read = reader
                        .read_until(b'\n', &mut line)
                        .with_context(|| format!("reading {input} after line {n}"))?;
                    if read == 0 {
                        return Ok(n);
                    }
                    bar.inc(read as u64);
                    n += 1;
                    lines.store(n, std::sync::atomic::Ordering::Relaxed);
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    let msg = pb::PublishRequest {
                        sequence: n,
                        event: line.clone(),
                    };
                    if tx.blocking_send(msg).is_err() {
                        // The call ended early; the error comes from the acks.
                        return Ok(n - 1);
                    }
                }
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
