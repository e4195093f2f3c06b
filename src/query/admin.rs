//! Admin.Status: where the pipeline stands, for operators.

use super::pb::{self, admin_server::Admin};
use super::{timestamp, Api};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AdminService {
    api: Arc<Api>,
}

impl AdminService {
    pub fn new(api: Arc<Api>) -> AdminService {
        AdminService { api }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.api.ready().await?;
        let s = self.api.hub.status();
        let lateness = self.api.pipeline.allowed_lateness.as_millis() as i64;
        let known = s.clock != crate::model::Millis::MIN && s.epoch > 0;
        let (processes, workers) = crate::dataflow::shape();
        Ok(Response::new(pb::StatusResponse {
            pipeline: self.api.pipeline.name.clone(),
            epoch: s.epoch,
            committed_at: s.committed_at.map(prost_types::Timestamp::from),
            positions: s.positions.into_iter().collect(),
            clock: known.then(|| timestamp(s.clock)),
            watermark: known.then(|| timestamp(s.clock.saturating_sub(lateness))),
            commit_lag_seconds: s
                .committing_since
                .map_or(0.0, |t| t.elapsed().as_secs_f64()),
            records: s.counters.records,
            accepted: s.counters.accepted,
            duplicates: s.counters.duplicates,
            dead_letters: s.counters.dead_letters.into_iter().collect(),
            state_entries: crate::dataflow::state_entries()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            store: Some(pb::Store {
                kind: self.api.store.0.clone(),
                location: self.api.store.1.clone(),
                up: s.store_up,
            }),
            processes: processes as u32,
            workers_per_process: workers as u32,
        }))
    }
}
