//! A job's training sessions on this worker ([`JobRunner`], owned by the job's OS thread): one
//! session per assignment, ending in an [`Outcome`], with the replica kept in memory from one
//! membership epoch of the job to the next.
//!
//! A session: the job's data (`setup.rs`, once per job) → the group (`RingGroup` over a clone of
//! the agent's collective listener; a world of one needs none) → the state sync
//! (`state_source_rank` streams its whole state, after loading the job's newest checkpoint up to
//! `resume_step` when told to resume from one, or starting from the seed; every replica's step
//! must then be `resume_step`) → the shared step loop with the agent's sink (`sink.rs`) →
//! rank 0's end of a finished job (`finish.rs`). Schedules depend on the job's global batch
//! only; each member trains its `G / W` share of every step. The outcome's failure report goes
//! out, and only then does the worker describe itself as idle, with its replica's hash (empty
//! when a failure left the replica half-updated).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protodino_collectives::{CollectiveError, GroupOptions, GroupSpec, RingGroup};
use protodino_proto::v1::{Assignment, FailureReport, WorkerPhase};

use super::audit::{AuditLine, AuditLog};
use super::finish::LeaderEnd;
use super::job::JobShared;
use super::metrics::{JobMetrics, Metrics};
use super::outcome::Outcome;
use super::queue::{Report, ReportSender};
use super::setup::{JobData, check_assignment, prepare};
use super::sink::{AgentSink, Leader};
use crate::dist::{Dist, SyncError, tensor_reducer};
use crate::train::reporter::Reporter;
use crate::train::{
    Cadence, LoopEnd, LoopError, LoopSpec, Trainer, build_job_trainer, checkpoints, run_steps,
    state_hash,
};

/// Progress deadline of the state broadcast and of the barrier around rank 0's checkpoints:
/// long enough to write a large model's state, short enough that a member stuck there behind
/// a hung peer is free for the next group within minutes.
const SLOW_PHASE_DEADLINE: Duration = Duration::from_secs(120);

/// What every session of this worker needs from the agent.
#[derive(Clone)]
pub struct SessionContext {
    pub reports: ReportSender,
    pub metrics: Arc<Metrics>,
    /// The collective listener bound at start; every group uses a clone.
    pub listener: Arc<TcpListener>,
    pub data_root: PathBuf,
    pub checkpoint_root: PathBuf,
    /// libtorch threads (`--threads`), else the configuration's.
    pub threads: Option<i32>,
    /// Progress deadline of the step's collectives (`--collective-timeout-ms`).
    pub collective_timeout: Duration,
    /// Wakes the heartbeat loop when a session ends.
    pub wake: Arc<tokio::sync::Notify>,
    /// The test-only perturbation hook (`PROTODINO_TEST_PERTURB_AT_STEP`).
    pub perturb_at: Option<i64>,
}

struct Replica {
    trainer: Trainer,
    /// False when a failure left it half-updated: it is rebuilt (and re-synced) next time.
    valid: bool,
}

pub struct JobRunner {
    ctx: SessionContext,
    shared: Arc<JobShared>,
    data: Option<JobData>,
    replica: Option<Replica>,
    /// Audit lines of steps done but not yet committed when the last session ended.
    audit_carry: Vec<AuditLine>,
    /// The job's `/metrics` series.
    metrics: JobMetrics,
    /// How this worker's previous session of the job ended (the reason label of the regroup
    /// that follows it).
    last_end: Option<&'static str>,
}

/// The `reason` label of the regroup after a session that ended in `o`.
fn end_label(o: &Outcome) -> &'static str {
    match o {
        Outcome::Finished => "finished",
        Outcome::Stopped => "stopped",
        Outcome::PeerLost { .. } => "peer_lost",
        Outcome::Failed { .. } => "failed",
    }
}

impl JobRunner {
    pub fn new(ctx: SessionContext, shared: Arc<JobShared>) -> Self {
        let metrics = ctx.metrics.job(&shared.job_id);
        Self {
            metrics,
            last_end: None,
            ctx,
            shared,
            data: None,
            replica: None,
            audit_carry: Vec::new(),
        }
    }

    pub fn shared(&self) -> &Arc<JobShared> {
        &self.shared
    }

    /// One session of assignment `a`, its outcome reported.
    pub fn run(&mut self, a: &Assignment) {
        tracing::info!(
            "job {} membership {}: rank {} of {}, resuming at step {} (state from rank {})",
            a.job_id,
            a.membership_epoch,
            a.rank,
            a.world_size,
            a.resume_step,
            a.state_source_rank
        );
        let completed = self
            .replica
            .as_ref()
            .map_or(a.resume_step, |r| r.trainer.step);
        self.shared.update_status(|s| {
            s.phase = WorkerPhase::Training;
            s.membership_epoch = a.membership_epoch;
            s.completed_step = completed;
            s.state_hash.clear();
        });
        self.shared.observe_watermark(a.resume_step);
        if a.membership_epoch > 1 {
            // The job regrouped (or its first group never trained): this session is part of
            // the new group.
            self.metrics
                .record_recovery(self.last_end.unwrap_or("joined"));
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.session(a)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                // Nothing is known about a replica a panic interrupted.
                if let Some(r) = self.replica.as_mut() {
                    r.valid = false;
                }
                Outcome::worker(format!("the session panicked: {what}"))
            });
        self.last_end = Some(end_label(&outcome));
        if self.replica.as_ref().is_some_and(|r| !r.valid) {
            self.replica = None;
        }
        let (step, hash) = match &self.replica {
            Some(r) => (r.trainer.step, state_hash(&r.trainer).map(|h| h.to_vec())),
            None => (completed, Ok(Vec::new())),
        };
        let hash = hash.unwrap_or_else(|e| {
            tracing::error!("hashing the replica: {e:#}");
            Vec::new()
        });
        match outcome.failure() {
            Some((kind, reason)) => {
                tracing::warn!(
                    "job {} membership {}: {reason}",
                    a.job_id,
                    a.membership_epoch
                );
                self.ctx.reports.send(
                    &self.shared,
                    Report::Failure(FailureReport {
                        worker_id: String::new(),
                        job_id: a.job_id.clone(),
                        membership_epoch: a.membership_epoch,
                        last_committed_step: step,
                        state_hash: hash.clone(),
                        reason: reason.to_string(),
                        kind: kind as i32,
                    }),
                );
            }
            None => tracing::info!(
                "job {} membership {}: {:?} at step {step}",
                a.job_id,
                a.membership_epoch,
                outcome
            ),
        }
        // Idle only once this session's reports have left (see `ReportSender::then`).
        let (shared, wake, epoch) = (
            self.shared.clone(),
            self.ctx.wake.clone(),
            a.membership_epoch,
        );
        self.ctx.reports.then(
            &self.shared,
            Box::new(move || {
                shared.update_status(|s| {
                    // A newer assignment already handed over keeps describing itself.
                    if s.membership_epoch == epoch {
                        s.phase = WorkerPhase::Idle;
                        s.completed_step = step;
                        s.state_hash = hash;
                    }
                });
                wake.notify_one();
            }),
        );
    }

    fn session(&mut self, a: &Assignment) -> Outcome {
        if self.data.is_none() {
            match prepare(&self.ctx, a) {
                Ok(d) => self.data = Some(d),
                Err(o) => return o,
            }
        }
        let Some(data) = &self.data else {
            return Outcome::worker("the job's data is not prepared");
        };
        if let Err(o) = check_assignment(a, &data.plan) {
            return o;
        }
        let threads = self.ctx.threads.map_or(data.cfg.train.threads, i64::from);
        if threads > 0 {
            tch::set_num_threads(threads as i32);
        }
        let metrics = &self.metrics;
        let dist = match form_group(&self.ctx.listener, a, self.ctx.collective_timeout, metrics) {
            Ok(d) => d,
            Err(o) => return o,
        };
        let rank = dist.rank;
        if self.replica.as_ref().is_none_or(|r| !r.valid) {
            let spe = data.plan.steps_per_epoch() as i64;
            match build_job_trainer(&data.cfg, spe, a.global_batch) {
                Ok(trainer) => {
                    self.replica = Some(Replica {
                        trainer,
                        valid: true,
                    })
                }
                Err(e) => return Outcome::worker(format!("building the model: {e:#}")),
            }
        }
        let Some(replica) = self.replica.as_mut() else {
            return Outcome::worker("no replica");
        };
        replica
            .trainer
            .set_failure_dir(data.job_dir.join("failures").join(format!("rank-{rank}")));
        if let Err(o) = sync_state(replica, data, a, &dist, metrics) {
            return o;
        }
        replica.valid = true;
        let reducer = match tensor_reducer(&dist, replica.trainer.device, &a.nccl_unique_id) {
            Ok(r) => r,
            Err(e) => {
                return match e.downcast_ref::<CollectiveError>() {
                    Some(c) => {
                        metrics.record_collective_error(c);
                        Outcome::collective("joining the NCCL group", c)
                    }
                    None => Outcome::worker(format!("{e:#}")),
                };
            }
        };
        let leader = match (rank == 0).then(|| open_leader(data, a)).transpose() {
            Ok(l) => l,
            Err(e) => return Outcome::worker(format!("{e:#}")),
        };
        let mut sink = AgentSink {
            ctx: &self.ctx,
            shared: &self.shared,
            metrics,
            membership_epoch: a.membership_epoch,
            world: dist.world,
            total_steps: a.total_steps,
            plan: data.plan,
            job_dir_rel: data.job_dir_rel.clone(),
            leader,
            last_report: None,
        };
        if let Some(l) = &mut sink.leader {
            l.audit.adopt(std::mem::take(&mut self.audit_carry));
            if let Err(e) = l.audit.write_committed(self.shared.watermark(), &data.plan) {
                return Outcome::worker(format!("{e:#}"));
            }
        }
        let spec = LoopSpec {
            plan: data.plan,
            total_steps: a.total_steps,
            cadence: Cadence {
                hash_every: a.hash_every_steps,
                ..Cadence::of(&data.cfg)
            },
            loader: &data.loader,
            checkpoint_dir: &data.job_dir,
            checkpoint_keep: data.cfg.train.checkpoint_keep as usize,
        };
        let started = Instant::now();
        let result = run_steps(
            &mut replica.trainer,
            &dist,
            reducer.as_reducer(),
            &spec,
            &mut sink,
        );
        // The group is no longer needed: peers that are done may go.
        drop(reducer);
        drop(dist);
        let outcome = match result {
            Ok((LoopEnd::Stopped, _)) => Outcome::Stopped,
            Ok((LoopEnd::Finished, stats)) => match &mut sink.leader {
                None => Outcome::Finished,
                Some(leader) => {
                    let last = sink.last_report.clone();
                    let ctx = LeaderEnd {
                        ctx: &self.ctx,
                        shared: &self.shared,
                        metrics,
                        data,
                        a,
                    };
                    match ctx.finish(&replica.trainer, leader, last, &stats, started) {
                        Ok(()) => Outcome::Finished,
                        Err(e) => Outcome::worker(format!("the final report: {e:#}")),
                    }
                }
            },
            Err(e) => {
                if let LoopError::Collective { source, .. } = &e {
                    metrics.record_collective_error(source);
                }
                let (o, valid) = Outcome::from_loop(&e);
                replica.valid &= valid;
                o
            }
        };
        if let Some(mut l) = sink.leader.take() {
            let written = l.audit.write_committed(self.shared.watermark(), &data.plan);
            match written.and_then(|_| l.audit.close()) {
                Ok(carry) => self.audit_carry = carry,
                Err(e) => tracing::error!("job {}: the audit file: {e:#}", a.job_id),
            }
        }
        outcome
    }
}

/// The collective group of the assignment.
fn form_group(
    listener: &TcpListener,
    a: &Assignment,
    timeout: Duration,
    metrics: &JobMetrics,
) -> Result<Dist, Outcome> {
    if a.world_size == 1 {
        return Ok(Dist::solo());
    }
    let listener = listener
        .try_clone()
        .map_err(|e| Outcome::worker(format!("the collective listener: {e}")))?;
    let spec = GroupSpec {
        rank: a.rank as usize,
        world: a.world_size as usize,
        peers: a.peers.clone(),
        secret: a.group_secret.clone(),
    };
    let options = GroupOptions {
        timeout,
        ..GroupOptions::default()
    };
    RingGroup::connect(&spec, listener, options)
        .map(|g| {
            tracing::info!(
                "job {} membership {}: group of {} formed, all-reduce over {:?}",
                a.job_id,
                a.membership_epoch,
                a.world_size,
                g.transport()
            );
            Dist::from_group(g, SLOW_PHASE_DEADLINE)
        })
        .map_err(|e| {
            metrics.record_collective_error(&e);
            Outcome::collective("forming the group", &e)
        })
}

/// Makes every member's replica the source's, then checks it is at `resume_step`.
fn sync_state(
    replica: &mut Replica,
    data: &JobData,
    a: &Assignment,
    dist: &Dist,
    metrics: &JobMetrics,
) -> Result<(), Outcome> {
    let source = a.state_source_rank as usize;
    if dist.rank == source
        && !a.resume_from_checkpoint
        && a.resume_step == 0
        && replica.trainer.step != 0
    {
        // No replica of the job survives anywhere and nothing was checkpointed: the group
        // starts again from the seed, so this old replica goes.
        let spe = data.plan.steps_per_epoch() as i64;
        let failures = data
            .job_dir
            .join("failures")
            .join(format!("rank-{}", dist.rank));
        replica.trainer = build_job_trainer(&data.cfg, spe, a.global_batch)
            .map_err(|e| Outcome::worker(format!("building the model: {e:#}")))?;
        replica.trainer.set_failure_dir(failures);
    }
    let trainer = &mut replica.trainer;
    if dist.rank == source && a.resume_from_checkpoint {
        // The newest checkpoint the resume point covers (a newer file may hold steps that
        // never committed).
        let newest = checkpoints(&data.job_dir)
            .into_iter()
            .rfind(|(step, _)| *step <= a.resume_step);
        match newest {
            Some((_, path)) => {
                trainer.load_checkpoint(&path).map_err(|e| {
                    Outcome::worker(format!("resuming from {}: {e}", path.display()))
                })?;
                tracing::info!("job {}: resumed from {}", a.job_id, path.display());
            }
            None if a.resume_step > 0 => {
                return Err(Outcome::job(format!(
                    "told to resume at step {} from a checkpoint, but {} holds none up to it",
                    a.resume_step,
                    data.job_dir.display()
                )));
            }
            None => {}
        }
    }
    // Replicas in sync (the survivors of a lost peer) need no stream; the step check below
    // still catches a member whose replica is not what it reported.
    if dist.world > 1 && !a.replicas_in_sync {
        let scratch = data.job_dir.join(format!(
            ".sync-{}-rank{}.safetensors",
            a.membership_epoch, dist.rank
        ));
        dist.sync_state(trainer, &scratch, source)
            .map_err(|e| match e {
                SyncError::Collective(e) => {
                    metrics.record_collective_error(&e);
                    Outcome::collective("the state broadcast", &e)
                }
                SyncError::State(e) => {
                    Outcome::worker(format!("syncing the state from rank {source}: {e}"))
                }
            })?;
    }
    if trainer.step != a.resume_step {
        return Err(Outcome::worker(format!(
            "after the state sync the replica is at step {}, the assignment resumes at {}",
            trainer.step, a.resume_step
        )));
    }
    Ok(())
}

/// Rank 0's outputs of a session: the audit file and `metrics.jsonl` in the job directory.
fn open_leader(data: &JobData, a: &Assignment) -> anyhow::Result<Leader> {
    std::fs::write(
        data.job_dir.join("config.json"),
        serde_json::to_string_pretty(&data.cfg.to_json())?,
    )?;
    let audit = AuditLog::open(&data.job_dir.join("steps.jsonl"))?;
    if audit.last_step() > 0 {
        tracing::info!(
            "job {}: steps.jsonl continues after step {}",
            a.job_id,
            audit.last_step()
        );
    }
    let reporter = Reporter::new(&data.job_dir, a.total_steps.max(0) as u64, false)?.silent();
    Ok(Leader { audit, reporter })
}
