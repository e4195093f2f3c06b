//! Ingest.Publish: a client stream of events into the run loop's in-process source,
//! each acknowledged once the epoch holding it is committed.
//!
//! The service reads the client's messages in batches (whatever has arrived, up to
//! [`BATCH`]), registers each event's source offset with the hub, then hands the
//! batch to the [`Feeder`] on a blocking thread (it blocks while the pipeline is
//! busy: backpressure to the client). The hub acknowledges events as commits cover
//! their offsets: COMMITTED, or DEAD_LETTER with the reason (a bad record, `late`,
//! `conflicting_duplicate`, ...). The response stream ends once the client has closed
//! its side and every event is acknowledged; if the server stops first, it ends with
//! UNAVAILABLE and the events not acknowledged must be sent again (a redelivery
//! counts once).

use super::hub::{Ack, Publisher, Waiting};
use super::pb::{self, ingest_server::Ingest};
use super::Api;
use crate::source::channel::Feeder;
use futures_core::Stream;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};

/// Events handed over at once.
pub const BATCH: usize = 1024;

/// The ingest source the service feeds.
pub type IngestHandle = Feeder;

pub struct IngestService {
    api: Arc<Api>,
}

impl IngestService {
    pub fn new(api: Arc<Api>) -> IngestService {
        IngestService { api }
    }
}

fn ack(a: Ack) -> pb::PublishAck {
    let (status, reason) = match a.reason {
        None => (pb::publish_ack::Status::Committed, String::new()),
        Some(r) => (pb::publish_ack::Status::DeadLetter, r.to_owned()),
    };
    pb::PublishAck {
        sequence: a.sequence,
        status: status as i32,
        reason,
        epoch: a.epoch,
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::PublishAck, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type PublishStream = AckStream;

    async fn publish(
        &self,
        req: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let feeder = self
            .api
            .ingest
            .clone()
            .ok_or_else(|| Status::unavailable("this server does not take events"))?;
        let mut input = req.into_inner();
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
        let publisher = Arc::new(Mutex::new(Publisher {
            source: feeder.name().to_owned(),
            waiting: VecDeque::new(),
            tx: ack_tx,
        }));
        self.api.hub.register(Arc::clone(&publisher));
        let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Result<pb::PublishAck, Status>>(64);
        let (done_tx, mut done_rx) = tokio::sync::watch::channel(None::<Status>);

        // Client -> feeder.
        let reader_pub = Arc::clone(&publisher);
        tokio::spawn(async move {
            let end = loop {
                let first = match input.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                };
                let mut batch = vec![first];
                // Whatever else has already arrived, without waiting.
                while batch.len() < BATCH {
                    match futures_util::FutureExt::now_or_never(input.message()) {
                        Some(Ok(Some(m))) => batch.push(m),
                        _ => break,
                    }
                }
                let f = feeder.clone();
                let p = Arc::clone(&reader_pub);
                let submitted = tokio::task::spawn_blocking(move || {
                    let sequences: Vec<u64> = batch.iter().map(|m| m.sequence).collect();
                    let events = batch.into_iter().map(|m| m.event).collect();
                    f.submit(events, Duration::from_secs(30), |first| {
                        let mut p = p.lock().expect("lock");
                        for (i, sequence) in sequences.into_iter().enumerate() {
                            p.waiting.push_back(Waiting {
                                offset: first + i as u64,
                                sequence,
                            });
                        }
                    })
                })
                .await;
                match submitted {
                    Ok(Ok(())) => {}
                    Ok(Err(closed)) => break Some(Status::unavailable(closed.to_string())),
                    Err(e) => break Some(Status::internal(e.to_string())),
                }
            };
            let _ = done_tx.send(Some(end.unwrap_or_else(|| Status::ok(""))));
        });

        // Hub -> client.
        let mut closing = self.api.closing.clone();
        tokio::spawn(async move {
            let mut ended: Option<Status> = None;
            loop {
                if let Some(end) = &ended {
                    let idle = publisher.lock().expect("lock").waiting.is_empty();
                    if idle || end.code() != tonic::Code::Ok {
                        while let Ok(a) = ack_rx.try_recv() {
                            let _ = out_tx.send(Ok(ack(a))).await;
                        }
                        if end.code() != tonic::Code::Ok {
                            let _ = out_tx.send(Err(end.clone())).await;
                        }
                        return;
                    }
                }
                tokio::select! {
                    a = ack_rx.recv() => match a {
                        Some(a) => if out_tx.send(Ok(ack(a))).await.is_err() { return },
                        None => return,
                    },
                    _ = done_rx.changed(), if ended.is_none() => {
                        ended = done_rx.borrow().clone();
                    }
                    _ = async { let _ = closing.wait_for(|c| *c).await; } => {
                        while let Ok(a) = ack_rx.try_recv() {
                            let _ = out_tx.send(Ok(ack(a))).await;
                        }
                        let _ = out_tx
                            .send(Err(Status::unavailable(
                                "the server is shutting down; send the events not acknowledged again",
                            )))
                            .await;
                        return;
                    }
                    _ = out_tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }
}
