//! `WorkerService` (workers, join token): register, heartbeat, and the step, checkpoint,
//! failure and result reports. Each call is one operation on the scheduler; the decisions and
//! their status codes live in the core (`core/workers.rs`, `core/reports.rs`).

use std::sync::Arc;
use std::time::Duration;

use protodino_proto::v1::worker_service_server::WorkerService;
use protodino_proto::v1::{
    CheckpointAck, CheckpointReport, FailureAck, FailureReport, HeartbeatRequest,
    HeartbeatResponse, RegisterRequest, RegisterResponse, ResultAck, ResultReport, StepAck,
    StepReport,
};
use tonic::{Request, Response, Status};

use crate::core::Registration;
use crate::scheduler::Scheduler;

pub struct WorkersApi {
    scheduler: Arc<Scheduler>,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
}

impl WorkersApi {
    pub fn new(
        scheduler: Arc<Scheduler>,
        heartbeat_interval: Duration,
        heartbeat_timeout: Duration,
    ) -> Self {
        Self {
            scheduler,
            heartbeat_interval,
            heartbeat_timeout,
        }
    }
}

/// A fresh worker id (random; a worker keeps it across coordinator restarts).
fn new_worker_id() -> String {
    format!("w-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

#[tonic::async_trait]
impl WorkerService for WorkersApi {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let r = req.into_inner();
        let reg = Registration {
            name: r.worker_name,
            caps: r.capabilities.unwrap_or_default(),
            worker_id: r.worker_id,
            job_id: r.job_id,
            membership_epoch: r.membership_epoch,
            committed_step: r.committed_step,
        };
        let fresh = new_worker_id();
        let worker_id = self
            .scheduler
            .apply(move |core, now, secrets, ch| core.register(now, reg, &fresh, secrets, ch))
            .await?;
        Ok(Response::new(RegisterResponse {
            worker_id,
            heartbeat_interval_ms: self.heartbeat_interval.as_millis() as i64,
            heartbeat_timeout_ms: self.heartbeat_timeout.as_millis() as i64,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let resp = self
            .scheduler
            .apply(move |core, now, secrets, ch| core.heartbeat(now, &r, secrets, ch))
            .await?;
        Ok(Response::new(resp))
    }

    async fn report_step(&self, req: Request<StepReport>) -> Result<Response<StepAck>, Status> {
        let r = req.into_inner();
        let ack = self
            .scheduler
            .apply(move |core, now, _, ch| core.report_step(now, &r, ch))
            .await?;
        Ok(Response::new(ack))
    }

    async fn report_checkpoint(
        &self,
        req: Request<CheckpointReport>,
    ) -> Result<Response<CheckpointAck>, Status> {
        let r = req.into_inner();
        self.scheduler
            .apply(move |core, now, _, ch| core.report_checkpoint(now, &r, ch))
            .await?;
        Ok(Response::new(CheckpointAck {}))
    }

    async fn report_failure(
        &self,
        req: Request<FailureReport>,
    ) -> Result<Response<FailureAck>, Status> {
        let r = req.into_inner();
        self.scheduler
            .apply(move |core, now, _, ch| core.report_failure(now, &r, ch))
            .await?;
        Ok(Response::new(FailureAck {}))
    }

    async fn report_result(
        &self,
        req: Request<ResultReport>,
    ) -> Result<Response<ResultAck>, Status> {
        let r = req.into_inner();
        self.scheduler
            .apply(move |core, now, _, ch| core.report_result(now, &r, ch))
            .await?;
        Ok(Response::new(ResultAck {}))
    }
}
