//! Simulated workers: each a tokio task speaking `WorkerService` as the agent does, with no
//! training behind it.
//!
//! - `Register` once (at its slot of the ramp), with a fake collective address
//!   `127.0.0.1:<10000 + i>` (nothing dials it: no real group ever forms a ring);
//! - `Heartbeat` every interval the registration names, at a phase spread evenly over the
//!   interval. `IDLE` describes the replica the worker keeps (the job, epoch and step of its
//!   last session); `TRAINING` names the session;
//! - `assign` (to an idle worker) starts a session at the assignment's resume step; with step
//!   reports on, every `step_every` the member reports the next step with the sample digest of
//!   the plan's global batch (so steps commit once every member reported them) and the same
//!   replica hash as its peers every `hash_every_steps`;
//! - `stop` (heartbeat or step acknowledgement) or `ABORTED` (a stale epoch) ends the session
//!   and the worker heartbeats `IDLE` at once; `stop` while idle drops the replica; `NOT_FOUND`
//!   registers again with the same id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protodino_data::{DataPlan, sample_digest};
use protodino_proto::v1::heartbeat_response::Action;
use protodino_proto::v1::worker_service_client::WorkerServiceClient;
use protodino_proto::v1::{
    Assignment, Capabilities, HeartbeatRequest, Progress, RegisterRequest, StepReport, WorkerPhase,
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::stats::Rpc;
use super::{Bearer, Recorder};

type Client = WorkerServiceClient<InterceptedService<Channel, Bearer>>;

pub struct FleetConfig {
    pub workers: usize,
    /// Registrations are spread over this.
    pub ramp: Duration,
    /// How often a training member reports a step (`None`: never).
    pub step_every: Option<Duration>,
}

/// What the fleet saw, summed over the workers.
#[derive(Debug, Default)]
pub struct FleetCounts {
    pub registered: AtomicU64,
    pub reregistered: AtomicU64,
    pub assignments: AtomicU64,
    /// Sessions ended by `stop`.
    pub stopped: AtomicU64,
    /// Sessions ended by `ABORTED`.
    pub stale: AtomicU64,
    pub steps_reported: AtomicU64,
    /// An assignment received by a worker that was training (never expected).
    pub assigned_while_training: AtomicU64,
}

impl FleetCounts {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Sample digests by (seed, dataset size, global batch, step): every job shares a few plans.
type Digests = Mutex<HashMap<(u64, u64, u64, u64), [u8; 32]>>;

struct Shared {
    rec: Arc<Recorder>,
    counts: FleetCounts,
    digests: Digests,
    step_every: Option<Duration>,
}

pub struct Fleet {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Fleet {
    /// Spawns the workers over `channels` (round robin); they run until `stop` turns true.
    pub fn start(
        cfg: FleetConfig,
        channels: &[Channel],
        auth: Bearer,
        rec: Arc<Recorder>,
        stop: watch::Receiver<bool>,
    ) -> Fleet {
        let shared = Arc::new(Shared {
            rec,
            counts: FleetCounts::default(),
            digests: Mutex::new(HashMap::new()),
            step_every: cfg.step_every,
        });
        let t0 = Instant::now();
        let n = cfg.workers;
        let tasks = (0..n)
            .map(|i| {
                let client = WorkerServiceClient::with_interceptor(
                    channels[i % channels.len()].clone(),
                    auth.clone(),
                );
                let sim = Sim {
                    index: i,
                    client,
                    shared: shared.clone(),
                    worker_id: String::new(),
                    session: None,
                    replica: None,
                };
                let at = t0 + cfg.ramp.mul_f64(i as f64 / n as f64);
                let phase = i as f64 / n as f64;
                tokio::spawn(sim.run(at, phase, stop.clone()))
            })
            .collect();
        Fleet { tasks, shared }
    }

    /// Waits for every worker to stop; the counts.
    pub async fn join(self) -> FleetCounts {
        for t in self.tasks {
            let _ = t.await;
        }
        match Arc::try_unwrap(self.shared) {
            Ok(s) => s.counts,
            Err(s) => {
                let c = &s.counts;
                let g = FleetCounts::get;
                FleetCounts {
                    registered: g(&c.registered).into(),
                    reregistered: g(&c.reregistered).into(),
                    assignments: g(&c.assignments).into(),
                    stopped: g(&c.stopped).into(),
                    stale: g(&c.stale).into(),
                    steps_reported: g(&c.steps_reported).into(),
                    assigned_while_training: g(&c.assigned_while_training).into(),
                }
            }
        }
    }
}

/// A running session.
struct Session {
    job_id: String,
    epoch: i64,
    plan: DataPlan,
    total_steps: u64,
    hash_every: u64,
    /// Steps done.
    step: u64,
    hash: Vec<u8>,
    next_step: Instant,
}

/// What an idle worker keeps from its last session.
struct Replica {
    job_id: String,
    epoch: i64,
    step: u64,
    hash: Vec<u8>,
}

struct Sim {
    index: usize,
    client: Client,
    shared: Arc<Shared>,
    worker_id: String,
    session: Option<Session>,
    replica: Option<Replica>,
}

/// The seed of an assignment's plan, from its resolved configuration (`train.seed`).
fn seed_of(a: &Assignment) -> u64 {
    serde_json::from_str::<serde_json::Value>(&a.resolved_config)
        .ok()
        .and_then(|v| v["train"]["seed"].as_u64())
        .unwrap_or(0)
}

impl Sim {
    async fn run(mut self, at: Instant, phase: f64, mut stop: watch::Receiver<bool>) {
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = stop.changed() => return,
        }
        let mut interval = loop {
            match self.register().await {
                Some(i) => break i,
                None => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        };
        self.shared
            .counts
            .registered
            .fetch_add(1, Ordering::Relaxed);
        let mut next_hb = Instant::now() + interval.mul_f64(phase);
        loop {
            let due = match &self.session {
                Some(s) if self.steps_left(s) => next_hb.min(s.next_step),
                _ => next_hb,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = stop.changed() => return,
            }
            let now = Instant::now();
            if self
                .session
                .as_ref()
                .is_some_and(|s| self.steps_left(s) && s.next_step <= now)
                && self.report_step().await
            {
                // The session ended: say so at once.
                next_hb = Instant::now();
            }
            if next_hb <= Instant::now() {
                let (again, new_interval) = self.heartbeat().await;
                if let Some(i) = new_interval {
                    interval = i;
                }
                next_hb = if again {
                    Instant::now()
                } else {
                    // Keep the phase; a worker that fell behind does not burst to catch up.
                    (next_hb + interval).max(Instant::now())
                };
            }
        }
    }

    fn steps_left(&self, s: &Session) -> bool {
        self.shared.step_every.is_some() && s.step < s.total_steps
    }

    fn register_request(&self) -> RegisterRequest {
        let i = self.index;
        // A worker registering again names the session it still runs.
        let (job_id, membership_epoch, committed_step) = match &self.session {
            Some(s) => (s.job_id.clone(), s.epoch, s.step as i64),
            None => (String::new(), 0, 0),
        };
        RegisterRequest {
            worker_name: format!("sim-{i}"),
            capabilities: Some(Capabilities {
                hostname: format!("loadgen-{}", i / 8),
                cpu_threads: 1,
                cuda_devices: 0,
                libtorch_version: "2.11.0".into(),
                collective_address: format!("127.0.0.1:{}", 10_000 + i),
            }),
            worker_id: self.worker_id.clone(),
            job_id,
            membership_epoch,
            committed_step,
        }
    }

    /// Registers (again, with the id it has, if any); the heartbeat interval.
    async fn register(&mut self) -> Option<Duration> {
        let req = self.register_request();
        let mut c = self.client.clone();
        let r = self
            .shared
            .rec
            .call(Rpc::Register, c.register(req))
            .await
            .ok()?;
        self.worker_id = r.worker_id;
        Some(Duration::from_millis(r.heartbeat_interval_ms.max(1) as u64))
    }

    fn heartbeat_request(&self) -> HeartbeatRequest {
        let mut req = HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            phase: WorkerPhase::Idle as i32,
            ..Default::default()
        };
        if let Some(s) = &self.session {
            req.job_id = s.job_id.clone();
            req.membership_epoch = s.epoch;
            req.committed_step = s.step as i64;
            req.state_hash = s.hash.clone();
            req.phase = WorkerPhase::Training as i32;
        } else if let Some(r) = &self.replica {
            req.job_id = r.job_id.clone();
            req.membership_epoch = r.epoch;
            req.committed_step = r.step as i64;
            req.state_hash = r.hash.clone();
        }
        req
    }

    /// Ends the session; its state becomes the replica an idle heartbeat describes.
    fn end_session(&mut self) {
        if let Some(s) = self.session.take() {
            self.replica = Some(Replica {
                job_id: s.job_id,
                epoch: s.epoch,
                step: s.step,
                hash: s.hash,
            });
        }
    }

    /// One heartbeat: whether to heartbeat again at once, and a new interval after a
    /// re-registration.
    async fn heartbeat(&mut self) -> (bool, Option<Duration>) {
        let req = self.heartbeat_request();
        let mut c = self.client.clone();
        let counts = &self.shared.counts;
        match self.shared.rec.call(Rpc::Heartbeat, c.heartbeat(req)).await {
            Ok(r) => match r.action {
                Some(Action::Assign(a)) => {
                    counts.assignments.fetch_add(1, Ordering::Relaxed);
                    if self.session.is_some() {
                        counts
                            .assigned_while_training
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    let plan = DataPlan {
                        seed: seed_of(&a),
                        dataset_size: a.dataset_size.max(0) as u64,
                        global_batch: a.global_batch.max(0) as u64,
                    };
                    let first = self.shared.step_every.map_or(Duration::ZERO, |e| {
                        e.mul_f64(0.5 + self.index as f64 % 7.0 / 14.0)
                    });
                    self.session = Some(Session {
                        job_id: a.job_id,
                        epoch: a.membership_epoch,
                        plan,
                        total_steps: a.total_steps.max(0) as u64,
                        hash_every: a.hash_every_steps.max(0) as u64,
                        step: a.resume_step.max(0) as u64,
                        hash: Vec::new(),
                        next_step: Instant::now() + first,
                    });
                    self.replica = None;
                    (false, None)
                }
                Some(Action::Stop(_)) => {
                    if self.session.is_some() {
                        counts.stopped.fetch_add(1, Ordering::Relaxed);
                        self.end_session();
                        (true, None)
                    } else {
                        self.replica = None;
                        (false, None)
                    }
                }
                Some(Action::KeepGoing(_)) | None => (false, None),
            },
            Err(s) if s.code() == tonic::Code::Aborted => {
                counts.stale.fetch_add(1, Ordering::Relaxed);
                self.end_session();
                (true, None)
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                counts.reregistered.fetch_add(1, Ordering::Relaxed);
                (false, self.register().await)
            }
            Err(_) => (false, None),
        }
    }

    fn digest(&self, plan: &DataPlan, step: u64) -> [u8; 32] {
        let key = (plan.seed, plan.dataset_size, plan.global_batch, step);
        if let Some(d) = self.shared.digests.lock().unwrap().get(&key) {
            return *d;
        }
        let d = sample_digest(&plan.global_ids(step.saturating_sub(1)));
        self.shared.digests.lock().unwrap().insert(key, d);
        d
    }

    /// Reports the next step of the session; whether the session ended.
    async fn report_step(&mut self) -> bool {
        let Some(s) = &self.session else {
            return false;
        };
        let step = s.step + 1;
        let hash = if s.hash_every > 0 && step.is_multiple_of(s.hash_every) {
            let mut h = Sha256::new();
            h.update(s.job_id.as_bytes());
            h.update(step.to_le_bytes());
            h.finalize().to_vec()
        } else {
            Vec::new()
        };
        let req = StepReport {
            worker_id: self.worker_id.clone(),
            job_id: s.job_id.clone(),
            membership_epoch: s.epoch,
            step: step as i64,
            epoch: s.plan.epoch_of(step - 1) as i64,
            progress: Some(Progress {
                step: step as i64,
                dino_loss: 8.0 / (1.0 + step as f64).ln_1p(),
                unique_prototypes: -1,
                ..Default::default()
            }),
            state_hash: hash.clone(),
            sample_digest: self.digest(&s.plan, step).to_vec(),
            step_seconds: self.shared.step_every.map_or(0.0, |d| d.as_secs_f64()),
        };
        let every = self.shared.step_every.unwrap_or(Duration::from_secs(1));
        let mut c = self.client.clone();
        let res = self
            .shared
            .rec
            .call(Rpc::ReportStep, c.report_step(req))
            .await;
        self.shared
            .counts
            .steps_reported
            .fetch_add(1, Ordering::Relaxed);
        let Some(s) = self.session.as_mut() else {
            return false;
        };
        s.next_step += every;
        match res {
            Ok(ack) => {
                s.step = step;
                if !hash.is_empty() {
                    s.hash = hash;
                }
                if ack.stop {
                    self.shared.counts.stopped.fetch_add(1, Ordering::Relaxed);
                    self.end_session();
                    return true;
                }
                false
            }
            Err(e) if e.code() == tonic::Code::Aborted => {
                self.shared.counts.stale.fetch_add(1, Ordering::Relaxed);
                self.end_session();
                true
            }
            // Anything else was counted as unexpected; try the step again next time.
            Err(_) => false,
        }
    }
}
