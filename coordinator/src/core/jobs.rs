//! Job-level operations on the core: submitting, cancelling, finishing, and stopping a group.
//!
//! Stopping a group and ending a job are the two ways a membership stops:
//! - [`Core::stop_group`] (a lost member, a peer failure, a replica mismatch, a join): the
//!   membership is `Stopping`, its members are told `stop` in their next heartbeat or step
//!   acknowledgement, their remaining reports still commit, and the job waits in `RECOVERING`
//!   (a failure) or `RENDEZVOUS` (a join, or a group that never started) for the next group;
//! - [`Core::finish`] (succeeded, failed, cancelled): the job is final, and in the same change
//!   every member is freed (idle in the pool) and every later call of theirs is answered `stop`.

use std::time::Instant;

use protodino_proto::v1::{Job, JobSpec, JobState, Progress};

use crate::core::ledger::{Ledger, Phase};
use crate::core::recovery::{self, Regroup};
use crate::core::{Changes, Core, JobEntry, job_fsm};
use crate::error::Error;

/// A validated submission, ready to be queued.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub record: Job,
    pub ledger: Ledger,
}

impl NewJob {
    /// A queued job over `ledger` (its plan, world sizes and directory).
    pub fn new(
        job_id: String,
        spec: JobSpec,
        resolved_config: String,
        ledger: Ledger,
        created_at: prost_types::Timestamp,
    ) -> Self {
        let record = Job {
            job_id,
            spec: Some(spec),
            state: JobState::Queued as i32,
            progress: Some(Progress {
                total_steps: ledger.plan.total_steps as i64,
                unique_prototypes: -1,
                ..Default::default()
            }),
            message: "queued: waiting for workers".into(),
            created_at: Some(created_at),
            updated_at: Some(created_at),
            resolved_config,
            ..Default::default()
        };
        Self { record, ledger }
    }
}

impl Core {
    /// Queue a job. A repeated idempotency key returns the first job when the spec is the
    /// same, and is `ALREADY_EXISTS` when it is not (the key names another request).
    pub fn submit(&mut self, new: NewJob, ch: &mut Changes) -> Result<Job, Error> {
        let spec = new.record.spec.clone().unwrap_or_default();
        if let Some(first) = self.resubmitted(&spec)? {
            return Ok(first.record.clone());
        }
        let key = Some(spec.idempotency_key).filter(|k| !k.is_empty());
        let id = new.record.job_id.clone();
        if self.jobs.contains_key(&id) {
            return Err(Error::AlreadyExists(format!("job {id} exists")));
        }
        if let Some(k) = key {
            self.idempotency.insert(k.clone(), id.clone());
            ch.idempotency.push((k, id.clone()));
        }
        ch.note(
            &id,
            format!(
                "queued: {} steps of {} samples over {} images",
                new.ledger.plan.total_steps,
                new.ledger.plan.global_batch,
                new.ledger.plan.dataset_size
            ),
        );
        let record = new.record.clone();
        self.jobs
            .insert(id.clone(), JobEntry::new(new.record, new.ledger));
        self.active.insert(id.clone());
        ch.job(&id);
        ch.ledger(&id);
        Ok(record)
    }

    /// Cancel a job that is not final; its members are freed in the same change.
    pub fn cancel(&mut self, id: &str, reason: &str, ch: &mut Changes) -> Result<Job, Error> {
        let entry = self.lookup(id)?;
        if entry.is_final() {
            return Err(Error::FailedPrecondition(format!(
                "job {id} is already {}",
                job_fsm::state_name(entry.state())
            )));
        }
        let why = if reason.trim().is_empty() {
            "cancelled by the user".to_string()
        } else {
            format!("cancelled: {}", bounded(reason.trim(), 1024))
        };
        self.finish(id, JobState::Cancelled, &why, ch)?;
        self.lookup(id).map(|e| e.record.clone())
    }

    /// Move a job to a final state: its membership ends, its members go idle, pending reports
    /// are dropped (no step commits after a final state).
    pub fn finish(
        &mut self,
        id: &str,
        to: JobState,
        reason: &str,
        ch: &mut Changes,
    ) -> Result<(), Error> {
        let entry = self
            .jobs
            .get_mut(id)
            .ok_or_else(|| Error::Internal(format!("finishing the missing job {id}")))?;
        job_fsm::transition(&mut entry.record, to, reason)?;
        if let Some(m) = &mut entry.ledger.membership {
            for member in &m.members {
                self.pool.free(member, id, m.epoch);
            }
            m.phase = Phase::Ended;
            m.assignments.clear();
        }
        entry.ledger.pending.clear();
        entry.ledger.release_caches();
        self.active.remove(id);
        self.retained.push(id);
        ch.job(id);
        ch.ledger(id);
        ch.note(id, reason);
        Ok(())
    }

    /// Stop the live group of `id` (the members are told `stop`) for `kind`; the job waits in
    /// `RECOVERING` (a failure of a job that had started) or `RENDEZVOUS` with `reason`, and
    /// re-forms once every member has stopped. The stop opens a [`recovery`] record.
    pub fn stop_group(
        &mut self,
        now: Instant,
        id: &str,
        kind: Regroup,
        reason: &str,
        ch: &mut Changes,
    ) -> Result<(), Error> {
        let Some(entry) = self.jobs.get_mut(id) else {
            return Err(Error::Internal(format!(
                "stopping the group of missing job {id}"
            )));
        };
        let started = entry.ledger.committed_step > 0
            || matches!(entry.state(), JobState::Running | JobState::Recovering);
        let Some(m) = entry.ledger.membership.as_mut().filter(|m| m.is_live()) else {
            return Ok(());
        };
        m.phase = Phase::Stopping(reason.to_string());
        m.assignments.clear();
        for member in &m.members {
            // A member that never received its assignment has nothing to stop.
            if let Some(w) = self.pool.get_mut(member)
                && matches!(&w.state, crate::core::WorkerState::Assigned { job_id, epoch, delivered: false }
                    if job_id == id && *epoch == m.epoch)
            {
                w.state = crate::core::WorkerState::Idle;
            }
        }
        let epoch = m.epoch;
        if started {
            recovery::open(&mut entry.record, kind, reason, epoch, &m.members);
            self.recoveries.count(kind.name());
            entry.recovering_since.get_or_insert(now);
        }
        if kind.is_failure() {
            entry.last_failure = Some(now);
        }
        let (to, what) = if started && kind.is_failure() {
            (JobState::Recovering, "recovering")
        } else {
            (JobState::Rendezvous, "regrouping")
        };
        job_fsm::transition(
            &mut entry.record,
            to,
            format!("{what} (epoch {epoch} stops): {reason}"),
        )?;
        ch.job(id);
        ch.ledger(id);
        ch.note(
            id,
            format!("stopping epoch {epoch} ({}): {reason}", kind.name()),
        );
        Ok(())
    }

    /// Member `worker` of `(id, epoch)` is no longer running its session (it went idle, was
    /// lost, or re-registered without it). At the end of training a member other than rank 0
    /// simply leaves (rank 0 still owes the final report); otherwise the group is stopped.
    #[allow(clippy::too_many_arguments)]
    pub fn member_left(
        &mut self,
        now: Instant,
        id: &str,
        epoch: i64,
        worker: &str,
        kind: Regroup,
        reason: &str,
        ch: &mut Changes,
    ) -> Result<(), Error> {
        let Some(entry) = self.jobs.get(id) else {
            return Ok(());
        };
        let Some(m) = entry
            .ledger
            .membership
            .as_ref()
            .filter(|m| m.epoch == epoch)
        else {
            return Ok(());
        };
        if entry.is_final() || !m.is_live() {
            return Ok(());
        }
        if entry.ledger.is_complete() && m.rank_of(worker).is_some_and(|r| r > 0) {
            ch.note(id, format!("{worker} finished its part of epoch {epoch}"));
            return Ok(());
        }
        self.stop_group(now, id, kind, reason, ch)
    }
}

/// At most `max` characters of a client-supplied text.
pub(crate) fn bounded(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}
