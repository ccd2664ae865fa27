//! Report operations on the core: steps (the ledger), checkpoints (the catalogue), failures and
//! rank 0's final result.
//!
//! Every report names `(worker, job, membership_epoch)`. An unregistered worker is `NOT_FOUND`
//! (it registers again, then resends), an unknown job `NOT_FOUND`, an epoch other than the job's
//! newest `ABORTED`, a worker outside that membership `FAILED_PRECONDITION`. A report of a job
//! that became final is answered without effect (`stop` in a step acknowledgement), so a group
//! racing a cancel ends quietly.

use std::path::{Component, Path};
use std::time::Instant;

use protodino_proto::v1::{
    CheckpointReport, FailureKind, FailureReport, JobState, Progress, ResultReport, StepAck,
    StepReport,
};

use crate::core::jobs::bounded;
use crate::core::ledger::{Commit, PendingReport, Recorded};
use crate::core::recovery::{self, Regroup};
use crate::core::workers::check_epoch;
use crate::core::{Changes, Core, JobEntry, Membership, WorkerState, job_fsm};
use crate::error::Error;

/// Largest final report accepted (JSON of collapse figures and k-NN).
pub const MAX_RESULT_BYTES: usize = 1 << 20;

/// The membership `epoch` of `entry` if it is the newest and `worker` is in it.
fn membership_of<'a>(
    entry: &'a JobEntry,
    worker: &str,
    epoch: i64,
) -> Result<(&'a Membership, usize), Error> {
    let id = &entry.record.job_id;
    check_epoch(id, entry.ledger.last_epoch, epoch)?;
    let m = entry
        .ledger
        .membership
        .as_ref()
        .filter(|m| m.epoch == epoch)
        .ok_or_else(|| Error::Internal(format!("{id}: epoch {epoch} is newest but not stored")))?;
    let rank = m.rank_of(worker).ok_or_else(|| {
        Error::FailedPrecondition(format!("{worker} is not a member of epoch {epoch} of {id}"))
    })?;
    Ok((m, rank))
}

impl Core {
    /// A member's report of a completed step; commits what it completes.
    pub fn report_step(
        &mut self,
        now: Instant,
        r: &StepReport,
        ch: &mut Changes,
    ) -> Result<StepAck, Error> {
        self.pool.live_mut(&r.worker_id)?.last_seen = now;
        let entry = self.lookup(&r.job_id)?;
        if entry.is_final() {
            return Ok(StepAck {
                stop: true,
                committed_step: entry.ledger.committed_step as i64,
            });
        }
        let (m, _) = membership_of(entry, &r.worker_id, r.membership_epoch)?;
        let live = m.is_live();
        if r.state_hash.len() > 64 {
            return Err(Error::invalid("state_hash", "at most 64 bytes"));
        }
        if r.step < 1 {
            return Err(Error::invalid("step", format!("{} < 1", r.step)));
        }
        let report = PendingReport {
            progress: r.progress.unwrap_or_default(),
            state_hash: r.state_hash.clone(),
            step_seconds: r.step_seconds,
        };
        let id = r.job_id.clone();
        let Some(entry) = self.jobs.get_mut(&id) else {
            return Err(Error::NotFound(format!("no job {id:?}")));
        };
        let recorded =
            entry
                .ledger
                .record(&r.worker_id, r.step as u64, &r.sample_digest, report)?;
        // A report proves the session runs.
        if let Some(w) = self.pool.get_mut(&r.worker_id)
            && matches!(&w.state, WorkerState::Assigned { job_id, epoch, .. }
                if *job_id == id && *epoch == r.membership_epoch)
        {
            w.state = WorkerState::Training {
                job_id: id.clone(),
                epoch: r.membership_epoch,
            };
        }
        if let Recorded::New(commits) = recorded {
            ch.ledger(&id);
            for c in commits {
                self.apply_commit(now, &id, c, ch)?;
            }
        }
        let entry = self.lookup(&id)?;
        let still_live = entry
            .ledger
            .membership
            .as_ref()
            .is_some_and(|m| m.epoch == r.membership_epoch && m.is_live());
        Ok(StepAck {
            stop: !live || !still_live || entry.is_final(),
            committed_step: entry.ledger.committed_step as i64,
        })
    }

    /// A committed step: progress from rank 0's report, the replica-hash check, and success.
    fn apply_commit(
        &mut self,
        now: Instant,
        id: &str,
        c: Commit,
        ch: &mut Changes,
    ) -> Result<(), Error> {
        let Some(entry) = self.jobs.get_mut(id) else {
            return Err(Error::Internal(format!("commit for the missing job {id}")));
        };
        let plan = entry.ledger.plan;
        let (epoch, world, live) = entry
            .ledger
            .membership
            .as_ref()
            .map_or((0, 0, false), |m| (m.epoch, m.members.len(), m.is_live()));
        let old = entry.record.progress.unwrap_or_default();
        let p = &c.rank0.progress;
        let images_per_second = if p.images_per_second > 0.0 {
            p.images_per_second
        } else if c.rank0.step_seconds > 0.0 {
            plan.global_batch as f64 / c.rank0.step_seconds
        } else {
            0.0
        };
        entry.record.progress = Some(Progress {
            step: c.step as i64,
            epoch: plan.epoch_after(c.step) as i64,
            dino_loss: p.dino_loss,
            koleo_proto: p.koleo_proto,
            // Measured only at analysis steps (-1 or 0 otherwise): keep the last measurement.
            unique_prototypes: if p.unique_prototypes > 0 {
                p.unique_prototypes
            } else {
                old.unique_prototypes
            },
            images_per_second,
            committed_samples: (c.step * plan.global_batch) as i64,
            world_size: world as i32,
            total_steps: plan.total_steps as i64,
            membership_epoch: epoch,
            teacher_entropy: p.teacher_entropy,
            replica_mismatches: old.replica_mismatches,
        });
        ch.job(id);
        if live && matches!(entry.state(), JobState::Rendezvous | JobState::Recovering) {
            job_fsm::transition(
                &mut entry.record,
                JobState::Running,
                format!(
                    "running: epoch {epoch}, {world} workers, step {}/{}",
                    c.step, plan.total_steps
                ),
            )?;
            ch.note(
                id,
                format!("running: epoch {epoch}, first commit at step {}", c.step),
            );
            if let Some(formed) = entry.formed_at.take() {
                let seconds = now.saturating_duration_since(formed).as_secs_f64();
                self.recoveries.rendezvous_seconds.observe(seconds);
            }
            if let Some(since) = entry.recovering_since.take()
                && let Some(r) = recovery::close(&mut entry.record, since, now)
            {
                self.recoveries.seconds.observe(r.seconds);
                ch.recovered(id, r);
            }
        } else if live {
            job_fsm::set_message(
                &mut entry.record,
                &format!("running: step {}/{}", c.step, plan.total_steps),
            );
        }
        if let Some(hashes) = c.mismatch {
            if let Some(p) = entry.record.progress.as_mut() {
                p.replica_mismatches += 1;
            }
            let listed: Vec<String> = hashes
                .iter()
                .map(|(w, h)| format!("{w}={}", hex::encode(h)))
                .collect();
            let reason = format!(
                "replica hashes differ at step {}: {}; re-syncing from the majority",
                c.step,
                listed.join(", ")
            );
            ch.note(id, &reason);
            self.stop_group(now, id, Regroup::ReplicaMismatch, &reason, ch)?;
        }
        self.maybe_succeed(id, ch)
    }

    /// `SUCCEEDED` once every step is committed and rank 0's result is in.
    fn maybe_succeed(&mut self, id: &str, ch: &mut Changes) -> Result<(), Error> {
        let Some(entry) = self.jobs.get_mut(id) else {
            return Ok(());
        };
        if entry.is_final() || !entry.ledger.is_complete() {
            return Ok(());
        }
        if entry.record.result.is_empty() {
            let text = format!(
                "all {} steps committed; waiting for rank 0's final report",
                entry.ledger.plan.total_steps
            );
            if job_fsm::set_message(&mut entry.record, &text) {
                ch.job(id);
            }
            return Ok(());
        }
        let reason = format!("succeeded: {} steps", entry.ledger.plan.total_steps);
        self.finish(id, JobState::Succeeded, &reason, ch)
    }

    /// Rank 0's checkpoint, catalogued in the job (newest `train.checkpoint_keep` kept, as the
    /// worker's retention keeps them on disk). `uri` is relative to the checkpoint root and must
    /// lie in the job's directory.
    pub fn report_checkpoint(
        &mut self,
        now: Instant,
        r: &CheckpointReport,
        ch: &mut Changes,
    ) -> Result<(), Error> {
        let (worker, job_id, epoch) = (r.worker_id.as_str(), r.job_id.as_str(), r.membership_epoch);
        self.pool.live_mut(worker)?.last_seen = now;
        let entry = self.lookup(job_id)?;
        if entry.is_final() {
            return Err(Error::FailedPrecondition(format!(
                "job {job_id} is already {}",
                job_fsm::state_name(entry.state())
            )));
        }
        let (_, rank) = membership_of(entry, worker, epoch)?;
        if rank != 0 {
            return Err(Error::FailedPrecondition(format!(
                "{worker} is rank {rank}; only rank 0 writes checkpoints"
            )));
        }
        let c = r
            .checkpoint
            .clone()
            .ok_or_else(|| Error::invalid("checkpoint", "missing"))?;
        let total = entry.ledger.plan.total_steps as i64;
        if !(0..=total).contains(&c.step) {
            return Err(Error::invalid(
                "checkpoint.step",
                format!("{} is outside [0, {total}]", c.step),
            ));
        }
        if c.epoch < 0 {
            return Err(Error::invalid("checkpoint.epoch", "must not be negative"));
        }
        check_in_dir(&c.uri, &entry.ledger.checkpoint_dir)?;
        if c.sha256.len() != 64 || !c.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid(
                "checkpoint.sha256",
                "64 hexadecimal digits (SHA-256)",
            ));
        }
        let Some(entry) = self.jobs.get_mut(job_id) else {
            return Err(Error::NotFound(format!("no job {job_id:?}")));
        };
        let keep = entry.ledger.checkpoint_keep;
        let list = &mut entry.record.checkpoints;
        if list.contains(&c) {
            return Ok(());
        }
        list.retain(|x| x.step != c.step);
        list.push(c.clone());
        list.sort_by_key(|x| x.step);
        let excess = list.len().saturating_sub(keep.max(1));
        list.drain(..excess);
        self.checkpoint_records += 1;
        ch.job(job_id);
        ch.note(
            job_id,
            format!("checkpoint of step {} at {}", c.step, c.uri),
        );
        Ok(())
    }

    /// A member's failure: `JOB` fails the job with the report's reason; `PEER_LOST` and
    /// `WORKER` stop the group so that it re-forms (a `WORKER` failure also drops the
    /// reporter's replica from consideration).
    pub fn report_failure(
        &mut self,
        now: Instant,
        f: &FailureReport,
        ch: &mut Changes,
    ) -> Result<(), Error> {
        self.pool.live_mut(&f.worker_id)?.last_seen = now;
        let kind = FailureKind::try_from(f.kind)
            .ok()
            .filter(|k| *k != FailureKind::Unspecified)
            .ok_or_else(|| Error::invalid("kind", "must be PEER_LOST, JOB or WORKER"))?;
        let entry = self.lookup(&f.job_id)?;
        if entry.is_final() {
            return Ok(());
        }
        membership_of(entry, &f.worker_id, f.membership_epoch)?;
        let reason = bounded(f.reason.trim(), 4096);
        match kind {
            FailureKind::Job => {
                let reason = if reason.is_empty() {
                    format!("{} reported a job failure without a reason", f.worker_id)
                } else {
                    reason
                };
                self.finish(&f.job_id, JobState::Failed, &reason, ch)
            }
            _ => {
                if kind == FailureKind::Worker
                    && let Some(w) = self.pool.get_mut(&f.worker_id)
                {
                    w.replica = None;
                }
                let (what, regroup) = if kind == FailureKind::Worker {
                    ("cannot go on", Regroup::WorkerFailed)
                } else {
                    ("lost a peer", Regroup::PeerLost)
                };
                let why = format!("{} {what}: {reason}", f.worker_id);
                self.stop_group(now, &f.job_id, regroup, &why, ch)
            }
        }
    }

    /// Rank 0's final report. Accepted from rank 0 of the newest membership (also while that
    /// group is stopping); the job succeeds once every step is committed too.
    pub fn report_result(
        &mut self,
        now: Instant,
        r: &ResultReport,
        ch: &mut Changes,
    ) -> Result<(), Error> {
        self.pool.live_mut(&r.worker_id)?.last_seen = now;
        let entry = self.lookup(&r.job_id)?;
        if entry.is_final() {
            if entry.state() == JobState::Succeeded && entry.record.result == r.result {
                return Ok(()); // a retry of the report that finished the job
            }
            return Err(Error::FailedPrecondition(format!(
                "job {} is already {}",
                r.job_id,
                job_fsm::state_name(entry.state())
            )));
        }
        let (_, rank) = membership_of(entry, &r.worker_id, r.membership_epoch)?;
        if rank != 0 {
            return Err(Error::FailedPrecondition(format!(
                "{} is rank {rank}; only rank 0 reports the result",
                r.worker_id
            )));
        }
        if r.result.len() > MAX_RESULT_BYTES {
            return Err(Error::invalid(
                "result",
                format!("{} bytes; at most {MAX_RESULT_BYTES}", r.result.len()),
            ));
        }
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&r.result) {
            return Err(Error::invalid("result", format!("not JSON: {e}")));
        }
        let Some(entry) = self.jobs.get_mut(&r.job_id) else {
            return Err(Error::NotFound(format!("no job {:?}", r.job_id)));
        };
        entry.record.result = r.result.clone();
        ch.job(&r.job_id);
        ch.note(&r.job_id, format!("final report from {}", r.worker_id));
        self.maybe_succeed(&r.job_id, ch)
    }
}

/// `uri` is a relative path without `..` inside `dir` (both relative to the checkpoint root).
fn check_in_dir(uri: &str, dir: &str) -> Result<(), Error> {
    let field = "checkpoint.uri";
    let p = Path::new(uri);
    let plain = !uri.is_empty()
        && uri.len() <= 1024
        && !p.is_absolute()
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(Error::invalid(
            field,
            format!(
                "{:?} must be a path relative to the checkpoint root, without `.` or `..`",
                bounded(uri, 64)
            ),
        ));
    }
    if dir.is_empty() || !p.starts_with(dir) || p == Path::new(dir) {
        return Err(Error::invalid(
            field,
            format!(
                "{:?} is not inside the job's directory {dir:?}",
                bounded(uri, 64)
            ),
        ));
    }
    Ok(())
}
