//! Unit tests of the pure core, driven like the scheduler drives it (one operation, then a
//! scheduling pass) with a made-up clock and fixed group secrets: no sleeps, no sockets.

mod ledger;
mod lifecycle;
mod membership;
mod scheduling;

use std::time::{Duration, Instant};

use protodino_data::sample_digest;
use protodino_proto::v1::heartbeat_response::Action;
use protodino_proto::v1::{
    Assignment, Capabilities, CheckpointRef, CheckpointReport, HeartbeatRequest, HeartbeatResponse,
    JobSpec, JobState, Progress, StepAck, StepReport, WorkerPhase,
};

use crate::core::{Changes, Core, CoreConfig, Ledger, NewJob, Plan, Registration};
use crate::error::Error;

pub const TIMEOUT: Duration = Duration::from_secs(10);
pub const COOLDOWN: Duration = Duration::from_secs(30);
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// A core, a clock and a counter of drawn secrets.
pub struct World {
    pub core: Core,
    pub t0: Instant,
    pub now: Instant,
    pub drawn: u8,
}

impl World {
    pub fn new() -> Self {
        let t0 = Instant::now();
        World {
            core: Core::new(CoreConfig {
                heartbeat_timeout: TIMEOUT,
                stop_grace: STOP_GRACE,
                hash_every_steps: 2,
                join_cooldown: COOLDOWN,
            }),
            t0,
            now: t0,
            drawn: 0,
        }
    }

    /// Move the clock to `ms` after the start.
    pub fn at(&mut self, ms: u64) {
        self.now = self.t0 + Duration::from_millis(ms);
    }

    /// Run `op` as the scheduler does: the operation, then a scheduling pass.
    pub fn apply<R>(
        &mut self,
        op: impl FnOnce(&mut Core, Instant, crate::core::Secrets, &mut Changes) -> Result<R, Error>,
    ) -> (Result<R, Error>, Changes) {
        let mut ch = Changes::default();
        let drawn = &mut self.drawn;
        let mut secrets = || {
            *drawn += 1;
            Ok([*drawn; 32])
        };
        let r = op(&mut self.core, self.now, &mut secrets, &mut ch);
        self.core
            .schedule(self.now, &mut secrets, &mut ch)
            .expect("scheduling");
        (r, ch)
    }

    /// Submit `id` over `images` images for `epochs` epochs with global batch `g`.
    pub fn submit(&mut self, id: &str, min: i32, max: i32, g: u64, images: u64, epochs: i64) {
        let plan = Plan::new(11, images, g, epochs, 0).expect("plan");
        let mut ledger = Ledger::new(plan, min, max, format!("jobs/{id}"));
        ledger.checkpoint_keep = 2;
        let new = NewJob::new(
            id.into(),
            JobSpec {
                preset: "cpu-demo".into(),
                ..Default::default()
            },
            "{}".into(),
            ledger,
            prost_types::Timestamp::default(),
        );
        self.apply(|c, _, _, ch| c.submit(new, ch))
            .0
            .expect("submit");
    }

    /// Register a fresh worker `w-<name>` with address `<name>:7000`, and send its first
    /// (idle) heartbeat, which makes it schedulable.
    pub fn register(&mut self, name: &str) -> String {
        let id = self
            .register_as(
                Registration {
                    name: name.into(),
                    caps: caps(name),
                    ..Default::default()
                },
                &format!("w-{name}"),
            )
            .expect("register");
        self.idle(&id, "", 0, 0, &[]).expect("first heartbeat");
        id
    }

    pub fn register_as(&mut self, r: Registration, fresh: &str) -> Result<String, Error> {
        self.apply(|c, now, s, ch| c.register(now, r, fresh, s, ch))
            .0
    }

    pub fn heartbeat(&mut self, req: HeartbeatRequest) -> Result<HeartbeatResponse, Error> {
        self.apply(|c, now, s, ch| c.heartbeat(now, &req, s, ch)).0
    }

    /// An IDLE heartbeat describing a replica of `(job, epoch)` at `step` with `hash`.
    pub fn idle(
        &mut self,
        w: &str,
        job: &str,
        epoch: i64,
        step: i64,
        hash: &[u8],
    ) -> Result<HeartbeatResponse, Error> {
        self.heartbeat(HeartbeatRequest {
            worker_id: w.into(),
            job_id: job.into(),
            membership_epoch: epoch,
            committed_step: step,
            state_hash: hash.to_vec(),
            phase: WorkerPhase::Idle as i32,
        })
    }

    pub fn training(&mut self, w: &str, job: &str, epoch: i64) -> Result<HeartbeatResponse, Error> {
        self.heartbeat(HeartbeatRequest {
            worker_id: w.into(),
            job_id: job.into(),
            membership_epoch: epoch,
            phase: WorkerPhase::Training as i32,
            ..Default::default()
        })
    }

    /// The assignment of an idle worker with no replica.
    pub fn assignment(&mut self, w: &str) -> Assignment {
        match self.idle(w, "", 0, 0, &[]).expect("heartbeat").action {
            Some(Action::Assign(a)) => a,
            other => panic!("{w}: expected an assignment, got {other:?}"),
        }
    }

    /// The digest of the `step`-th step of `job`'s plan.
    pub fn digest(&self, job: &str, step: u64) -> Vec<u8> {
        let plan = self.core.job(job).expect("job").ledger.plan.data();
        sample_digest(&plan.global_ids(step - 1)).to_vec()
    }

    pub fn report(
        &mut self,
        w: &str,
        job: &str,
        epoch: i64,
        step: i64,
        hash: &[u8],
    ) -> Result<StepAck, Error> {
        let r = StepReport {
            worker_id: w.into(),
            job_id: job.into(),
            membership_epoch: epoch,
            step,
            epoch: 0,
            progress: Some(Progress {
                dino_loss: 5.0 + step as f64,
                ..Default::default()
            }),
            state_hash: hash.to_vec(),
            sample_digest: self.digest(job, step.max(1) as u64),
            step_seconds: 0.5,
        };
        self.apply(|c, now, _, ch| c.report_step(now, &r, ch)).0
    }

    pub fn state(&self, job: &str) -> JobState {
        self.core.job(job).expect("job").state()
    }

    pub fn message(&self, job: &str) -> String {
        self.core.job(job).expect("job").record.message.clone()
    }

    pub fn watermark(&self, job: &str) -> u64 {
        self.core.job(job).expect("job").ledger.committed_step
    }

    pub fn worker_state(&self, w: &str) -> &'static str {
        self.core.pool().get(w).map_or("absent", |w| w.state.name())
    }

    /// Form a group of `workers` for `job` and have every member pick up its assignment and
    /// start training; returns the member ids in rank order.
    pub fn start_group(&mut self, job: &str, workers: &[&str]) -> (i64, Vec<String>) {
        let epochs: Vec<i64> = workers
            .iter()
            .map(|w| self.assignment(w).membership_epoch)
            .collect();
        let epoch = epochs[0];
        assert!(epochs.iter().all(|e| *e == epoch), "{epochs:?}");
        let members = self.core.job(job).expect("job").record.workers.clone();
        for m in &members {
            assert_eq!(keep_going(), self.training(m, job, epoch).unwrap());
        }
        (epoch, members)
    }
}

pub fn caps(name: &str) -> Capabilities {
    Capabilities {
        hostname: name.into(),
        collective_address: format!("{name}:7000"),
        cpu_threads: 2,
        ..Default::default()
    }
}

pub fn keep_going() -> HeartbeatResponse {
    HeartbeatResponse {
        action: Some(Action::KeepGoing(true)),
    }
}

pub fn stop() -> HeartbeatResponse {
    HeartbeatResponse {
        action: Some(Action::Stop(true)),
    }
}

pub fn code(e: &Error) -> &'static str {
    match e {
        Error::InvalidArgument { .. } => "INVALID_ARGUMENT",
        Error::NotFound(_) => "NOT_FOUND",
        Error::AlreadyExists(_) => "ALREADY_EXISTS",
        Error::FailedPrecondition(_) => "FAILED_PRECONDITION",
        Error::Aborted(_) => "ABORTED",
        Error::Unauthenticated(_) => "UNAUTHENTICATED",
        Error::Internal(_) | Error::Store(_) => "INTERNAL",
    }
}

/// `w-a`'s report of a checkpoint of `job-a` at `step` (epoch `e`), its file named with the
/// step in `digits` digits.
pub fn checkpoint_report(e: i64, step: i64, digits: usize, sha_byte: &str) -> CheckpointReport {
    CheckpointReport {
        worker_id: "w-a".into(),
        job_id: "job-a".into(),
        membership_epoch: e,
        checkpoint: Some(CheckpointRef {
            step,
            epoch: 0,
            uri: format!("jobs/job-a/checkpoint-{step:0digits$}.safetensors"),
            sha256: sha_byte.repeat(32),
        }),
    }
}
