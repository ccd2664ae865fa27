//! Scheduling: ending stopped groups, the FIFO queue, and rendezvous.
//!
//! [`Core::schedule`] runs after every operation and on every tick. It first ends each
//! stopping membership whose members have all stopped (idle or lost) and whose reports can no
//! longer commit a step. Then it walks the jobs that need a group in submission order (FIFO,
//! strictly: a job that cannot start holds back the jobs behind it, so a large job is not
//! starved by small ones) and forms a membership for each in turn while idle workers allow.
//! A job that waits says why in its message.

use std::collections::HashMap;
use std::time::Instant;

use protodino_proto::v1::JobState;

use crate::core::ledger::{Membership, Phase};
use crate::core::pool::Replica;
use crate::core::quorum::{self, Candidate, Holding};
use crate::core::recovery::{self, Origin, Regroup};
use crate::core::{Changes, Core, Secrets, WorkerState, assign, job_fsm};
use crate::error::Error;

impl Core {
    /// Expire silent workers, then schedule.
    pub fn tick(&mut self, now: Instant, secrets: Secrets, ch: &mut Changes) -> Result<(), Error> {
        for (id, was) in self.pool.expire(now, self.cfg.heartbeat_timeout) {
            let reason = format!(
                "worker {id} lost: no heartbeat for {} ms",
                self.cfg.heartbeat_timeout.as_millis()
            );
            ch.note(&id, &reason);
            if let Some((job, epoch)) = was.session() {
                let job = job.to_string();
                self.member_left(
                    now,
                    &job,
                    epoch,
                    &id,
                    Regroup::HeartbeatExpired,
                    &reason,
                    ch,
                )?;
            }
        }
        self.expire_silent_stopping_members(now, ch);
        self.schedule(now, secrets, ch)
    }

    /// Members of stopping groups still running but silent for `stop_grace` are lost.
    fn expire_silent_stopping_members(&mut self, now: Instant, ch: &mut Changes) {
        let grace = self.cfg.stop_grace;
        let mut silent = Vec::new();
        for e in self.active.iter().filter_map(|id| self.jobs.get(id)) {
            let Some(m) = &e.ledger.membership else {
                continue;
            };
            if !matches!(m.phase, Phase::Stopping(_)) {
                continue;
            }
            let id = &e.record.job_id;
            for w in &m.members {
                let running = self.pool.member_status(w, id, m.epoch)
                    == crate::core::pool::MemberStatus::Running;
                if running && self.pool.silent_for(w, now).is_some_and(|s| s > grace) {
                    silent.push((id.clone(), w.clone()));
                }
            }
        }
        for (job, w) in silent {
            if self.pool.lose(&w) {
                let text = format!(
                    "worker {w} lost: silent for {} ms while its group of {job} stops",
                    grace.as_millis()
                );
                ch.note(&w, &text);
                ch.note(&job, text);
            }
        }
    }

    pub fn schedule(
        &mut self,
        now: Instant,
        secrets: Secrets,
        ch: &mut Changes,
    ) -> Result<(), Error> {
        self.end_stopped_groups(ch);
        let waiting: Vec<String> = self
            .active
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .filter(|e| !e.is_final())
            .filter(|e| e.ledger.membership.as_ref().is_none_or(|m| !m.is_live()))
            .map(|e| e.record.job_id.clone())
            .collect();
        let mut blocked_by: Option<String> = None;
        for id in waiting {
            if let Some(head) = &blocked_by {
                let text = match self.jobs.get(&id).map(|e| e.state()) {
                    Some(JobState::Queued) => format!("queued: behind {head}"),
                    _ => format!("regrouping: queued behind {head}"),
                };
                self.wait_message(&id, &text, ch);
                continue;
            }
            if let Some((epoch, reason, running)) = self.stopping_members(&id) {
                self.wait_message(
                    &id,
                    &format!(
                        "regrouping: {reason}; waiting for {running} member(s) of epoch {epoch} \
                         to stop"
                    ),
                    ch,
                );
                blocked_by = Some(id);
                continue;
            }
            if let Err(reason) = self.form(now, &id, secrets, ch)? {
                self.wait_message(&id, &reason, ch);
                blocked_by = Some(id);
            }
        }
        if blocked_by.is_none() {
            self.grow(now, ch)?;
        }
        ch.scheduled = true;
        Ok(())
    }

    /// Idle workers no waiting job needs join running groups below their `max_world_size`, in
    /// submission order: the group is stopped at its next step boundary (`joined`) and re-forms
    /// with the newcomers, which receive the state. Only a group that has committed a step in
    /// its epoch grows, and not within `join_cooldown` of the job's last failure. A worker
    /// holding another unfinished job's replica is kept for that job.
    fn grow(&mut self, now: Instant, ch: &mut Changes) -> Result<(), Error> {
        let jobs = &self.jobs;
        let spare_for = |job: &str| -> Vec<String> {
            self.pool
                .idle()
                .filter(|w| match &w.replica {
                    None => true,
                    Some(r) => r.job_id == job || jobs.get(&r.job_id).is_none_or(|e| e.is_final()),
                })
                .map(|w| w.id.clone())
                .collect()
        };
        let mut claimed: Vec<String> = Vec::new();
        let mut grows: Vec<(String, String)> = Vec::new();
        for entry in self.active.iter().filter_map(|id| self.jobs.get(id)) {
            let Some(m) = entry.ledger.membership.as_ref().filter(|m| m.is_live()) else {
                continue;
            };
            if entry.state() != JobState::Running
                || entry
                    .last_failure
                    .is_some_and(|t| now.saturating_duration_since(t) < self.cfg.join_cooldown)
            {
                continue;
            }
            let id = &entry.record.job_id;
            let cap = quorum::world_size(
                entry.ledger.min_world_size,
                entry.ledger.max_world_size,
                entry.ledger.plan.global_batch,
                usize::MAX,
            )
            .unwrap_or(0);
            let room = cap.saturating_sub(m.members.len());
            let joining: Vec<String> = spare_for(id)
                .into_iter()
                .filter(|w| !claimed.contains(w))
                .take(room)
                .collect();
            if joining.is_empty() {
                continue;
            }
            let reason = format!(
                "{} join{} (world {} → {})",
                joining.join(", "),
                if joining.len() == 1 { "s" } else { "" },
                m.members.len(),
                m.members.len() + joining.len()
            );
            claimed.extend(joining);
            grows.push((id.clone(), reason));
        }
        for (id, reason) in grows {
            self.stop_group(now, &id, Regroup::Joined, &reason, ch)?;
        }
        Ok(())
    }

    /// End every stopping membership whose members all stopped and can commit nothing more.
    fn end_stopped_groups(&mut self, ch: &mut Changes) {
        for id in &self.active {
            let Some(entry) = self.jobs.get_mut(id) else {
                continue;
            };
            let Some(m) = &entry.ledger.membership else {
                continue;
            };
            let Phase::Stopping(reason) = &m.phase else {
                continue;
            };
            let status = |w: &str| self.pool.member_status(w, id, m.epoch);
            let all_stopped = m
                .members
                .iter()
                .all(|w| status(w) != crate::core::pool::MemberStatus::Running);
            if !all_stopped || entry.ledger.can_still_commit(status) {
                continue;
            }
            ch.note(
                id,
                format!(
                    "epoch {} ended at step {}: {reason}",
                    m.epoch, entry.ledger.committed_step
                ),
            );
            if let Some(m) = &mut entry.ledger.membership {
                m.phase = Phase::Ended;
            }
            ch.ledger(id);
        }
    }

    /// If the group of `id` is stopping: its epoch, why, and how many members may still run.
    fn stopping_members(&self, id: &str) -> Option<(i64, String, usize)> {
        let m = self.jobs.get(id)?.ledger.membership.as_ref()?;
        let Phase::Stopping(reason) = &m.phase else {
            return None;
        };
        let running = m
            .members
            .iter()
            .filter(|w| {
                self.pool.member_status(w, id, m.epoch) == crate::core::pool::MemberStatus::Running
            })
            .count();
        Some((m.epoch, reason.clone(), running))
    }

    fn wait_message(&mut self, id: &str, text: &str, ch: &mut Changes) {
        if let Some(e) = self.jobs.get_mut(id)
            && job_fsm::set_message(&mut e.record, text)
        {
            ch.job(id);
            ch.note(id, text);
        }
    }

    /// Form the next membership of `id` from idle workers: `Ok(Err(reason))` when it cannot.
    fn form(
        &mut self,
        now: Instant,
        id: &str,
        secrets: Secrets,
        ch: &mut Changes,
    ) -> Result<Result<(), String>, Error> {
        let Some(entry) = self.jobs.get(id) else {
            return Ok(Err(format!("job {id} vanished")));
        };
        let ledger = &entry.ledger;
        let old_ranks: HashMap<&str, usize> = ledger
            .membership
            .as_ref()
            .map(|m| {
                m.members
                    .iter()
                    .enumerate()
                    .map(|(r, w)| (w.as_str(), r))
                    .collect()
            })
            .unwrap_or_default();
        let holding = |r: &Option<Replica>| match r {
            Some(r)
                if r.job_id == id
                    && r.committed_step >= ledger.committed_step
                    && r.committed_step <= ledger.plan.total_steps
                    && !r.state_hash.is_empty() =>
            {
                Holding::Valid {
                    step: r.committed_step,
                    hash: r.state_hash.clone(),
                }
            }
            Some(r)
                if r.job_id != id && self.jobs.get(&r.job_id).is_some_and(|e| !e.is_final()) =>
            {
                Holding::Other
            }
            _ => Holding::Nothing,
        };
        let candidates: Vec<Candidate> = self
            .pool
            .idle()
            .map(|w| Candidate {
                id: w.id.clone(),
                old_rank: old_ranks.get(w.id.as_str()).copied(),
                holding: holding(&w.replica),
            })
            .collect();
        let q = match quorum::choose(
            ledger.min_world_size,
            ledger.max_world_size,
            ledger.plan.global_batch,
            candidates,
        ) {
            Ok(q) => q,
            Err(reason) => return Ok(Err(reason)),
        };
        let secret = match secrets() {
            Ok(s) => s,
            Err(e) => return Ok(Err(format!("cannot draw a group secret: {e}"))),
        };

        // Where the group starts: the surviving replica, else the newest checkpoint at or below
        // the watermark (steps up to the watermark are then redone and acknowledged as already
        // committed), else the seed.
        let watermark = ledger.committed_step;
        let (resume_step, origin, text) = if let Some(step) = q.source_step {
            (step, Origin::Replica, format!("replica of step {step}"))
        } else if watermark == 0 {
            (0, Origin::Seed, "the seed".to_string())
        } else {
            match entry
                .record
                .checkpoints
                .iter()
                .filter(|c| c.step >= 0 && c.step as u64 <= watermark)
                .max_by_key(|c| c.step)
            {
                Some(c) => (
                    c.step as u64,
                    Origin::Checkpoint,
                    format!(
                        "no replica of step {watermark} survives: checkpoint of step {}",
                        c.step
                    ),
                ),
                None => (
                    0,
                    Origin::Seed,
                    format!("no replica of step {watermark} and no checkpoint: the seed"),
                ),
            }
        };
        let from_checkpoint = origin == Origin::Checkpoint;
        // The highest step any member of the old group reported: what it had computed.
        let computed = ledger
            .pending
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(watermark);
        let peers: Vec<String> = q
            .members
            .iter()
            .map(|w| {
                self.pool
                    .get(w)
                    .map(|w| w.caps.collective_address.clone())
                    .unwrap_or_default()
            })
            .collect();
        let epoch = ledger.last_epoch + 1;
        let mut m = Membership {
            epoch,
            members: q.members.clone(),
            source_rank: q.source_rank,
            resume_step,
            resume_from_checkpoint: from_checkpoint,
            phase: Phase::Live,
            assignments: Vec::new(),
        };
        m.assignments = assign::assignments(
            &entry.record,
            ledger,
            &m,
            &peers,
            &secret,
            self.cfg.hash_every_steps,
            q.in_sync,
        );
        let recovering = entry.state() == JobState::Recovering;
        let reason = format!(
            "{}: epoch {epoch}, {} workers ({}), from {text}",
            if recovering {
                "recovering"
            } else {
                "rendezvous"
            },
            m.members.len(),
            m.members.join(", ")
        );
        for w in &m.members {
            if let Some(w) = self.pool.get_mut(w) {
                w.state = WorkerState::Assigned {
                    job_id: id.to_string(),
                    epoch,
                    delivered: false,
                };
            }
        }
        let Some(entry) = self.jobs.get_mut(id) else {
            return Ok(Err(format!("job {id} vanished")));
        };
        if resume_step > watermark {
            // The source completed these steps with every member of its group (each took part
            // in the step's gradient all-reduce), but not every report arrived: they are done.
            entry.ledger.commit_through(resume_step);
            if let Some(p) = entry.record.progress.as_mut() {
                p.step = resume_step as i64;
                p.epoch = entry.ledger.plan.epoch_after(resume_step) as i64;
                p.committed_samples = (resume_step * entry.ledger.plan.global_batch) as i64;
            }
            ch.note(
                id,
                format!(
                    "steps {}..={resume_step} committed: the surviving replicas completed them",
                    watermark + 1
                ),
            );
        }
        let to = if recovering {
            JobState::Recovering
        } else {
            JobState::Rendezvous
        };
        job_fsm::transition(&mut entry.record, to, &reason)?;
        recovery::complete_formation(
            &mut entry.record,
            epoch,
            &m.members,
            origin,
            resume_step,
            computed,
        );
        entry.record.workers = m.members.clone();
        let progress = entry.record.progress.get_or_insert_with(Default::default);
        progress.membership_epoch = epoch;
        progress.world_size = m.members.len() as i32;
        entry.ledger.last_epoch = epoch;
        entry.ledger.pending.clear();
        entry.ledger.membership = Some(m);
        entry.formed_at = Some(now);
        ch.job(id);
        ch.ledger(id);
        ch.note(id, reason);
        Ok(Ok(()))
    }
}
