//! Worker operations on the core: registering (fresh, or re-attaching after a coordinator
//! restart) and heartbeats.
//!
//! Heartbeat answers:
//! - `TRAINING` for a session of a job that is final, unknown, or whose group is stopping (or
//!   that this worker no longer belongs to) → `stop`; an epoch that is not the job's newest →
//!   `ABORTED` (that group no longer exists); otherwise `keep_going`.
//! - `IDLE` never gets `ABORTED`: its epoch describes the replica the worker keeps. A replica of
//!   a final job → `stop` (drop it). A worker whose group has a place for it → `assign` (the
//!   assignment goes out only to an idle worker, so a session is never asked to start while
//!   another runs). Otherwise `keep_going`. An idle heartbeat from a member means its session
//!   ended, which stops the group unless training is complete and it is not rank 0.

use std::time::Instant;

use protodino_proto::v1::heartbeat_response::Action;
use protodino_proto::v1::{Capabilities, HeartbeatRequest, HeartbeatResponse, WorkerPhase};

use crate::core::jobs::bounded;
use crate::core::pool::{Replica, Worker};
use crate::core::recovery::Regroup;
use crate::core::{Changes, Core, Secrets, WorkerState};
use crate::error::Error;

/// A `Register` call, decoded.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub name: String,
    pub caps: Capabilities,
    /// The id this worker had (empty for a fresh worker).
    pub worker_id: String,
    /// The session it still runs (empty / 0 for none).
    pub job_id: String,
    pub membership_epoch: i64,
    pub committed_step: i64,
}

fn respond(action: Action) -> HeartbeatResponse {
    HeartbeatResponse {
        action: Some(action),
    }
}

/// Printable ASCII without spaces, as ids in logs and metrics must be.
fn check_id(field: &str, id: &str) -> Result<(), Error> {
    if id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(
            field,
            "at most 128 printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

/// `host:port` with a numeric port: peers dial it as given.
fn check_address(addr: &str) -> Result<(), Error> {
    let field = "capabilities.collective_address";
    let ok = addr.len() <= 256
        && addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
    if !ok {
        return Err(Error::invalid(
            field,
            format!("{:?} is not host:port", bounded(addr, 64)),
        ));
    }
    Ok(())
}

impl Core {
    /// Register a worker; `fresh_id` is used when it brings no id or its id is taken. A worker
    /// that names its old id and a session of the stored membership it belongs to is taken back
    /// as that member; any other becomes idle. Returns the id it goes by.
    pub fn register(
        &mut self,
        now: Instant,
        r: Registration,
        fresh_id: &str,
        secrets: Secrets,
        ch: &mut Changes,
    ) -> Result<String, Error> {
        check_address(&r.caps.collective_address)?;
        check_id("worker_id", &r.worker_id)?;
        check_id("job_id", &r.job_id)?;
        if r.name.len() > 256 {
            return Err(Error::invalid("worker_name", "at most 256 bytes"));
        }
        if r.membership_epoch < 0 || r.committed_step < 0 {
            return Err(Error::invalid(
                "membership_epoch",
                "membership_epoch and committed_step are never negative",
            ));
        }
        let old = (!r.worker_id.is_empty() && self.pool.is_free(&r.worker_id))
            .then(|| r.worker_id.clone());
        let rejoins = old.as_ref().is_some_and(|id| {
            self.jobs.get(&r.job_id).is_some_and(|e| {
                !e.is_final()
                    && e.ledger.membership.as_ref().is_some_and(|m| {
                        m.epoch == r.membership_epoch
                            && m.phase != crate::core::Phase::Ended
                            && m.rank_of(id).is_some()
                    })
            })
        });
        // A restored member that comes back without its session leaves its group.
        let abandoned = old
            .as_ref()
            .and_then(|id| self.pool.get(id))
            .filter(|w| !w.attached)
            .and_then(|w| w.state.session().map(|(j, e)| (j.to_string(), e)));
        let id = old.unwrap_or_else(|| fresh_id.to_string());
        if !r.worker_id.is_empty() && id != r.worker_id {
            ch.note(
                &id,
                format!("the id {} is in use; registered as {id}", r.worker_id),
            );
        }
        let state = if rejoins {
            WorkerState::Training {
                job_id: r.job_id.clone(),
                epoch: r.membership_epoch,
            }
        } else {
            WorkerState::Idle
        };
        self.pool.insert(Worker {
            id: id.clone(),
            name: r.name.clone(),
            caps: r.caps.clone(),
            state,
            attached: true,
            described: rejoins,
            last_seen: now,
            replica: None,
        });
        if rejoins {
            ch.note(
                &id,
                format!(
                    "re-attached to epoch {} of {} at step {}",
                    r.membership_epoch, r.job_id, r.committed_step
                ),
            );
        } else {
            ch.note(
                &id,
                format!("registered ({}, {})", r.name, r.caps.collective_address),
            );
            if let Some((job, epoch)) = abandoned {
                let reason = format!("{id} registered again without its session of epoch {epoch}");
                self.member_left(now, &job, epoch, &id, Regroup::Left, &reason, ch)?;
            }
        }
        self.schedule(now, secrets, ch)?;
        Ok(id)
    }

    pub fn heartbeat(
        &mut self,
        now: Instant,
        req: &HeartbeatRequest,
        secrets: Secrets,
        ch: &mut Changes,
    ) -> Result<HeartbeatResponse, Error> {
        let phase = WorkerPhase::try_from(req.phase)
            .ok()
            .filter(|p| *p != WorkerPhase::Unspecified)
            .ok_or_else(|| Error::invalid("phase", "must be IDLE or TRAINING"))?;
        if req.committed_step < 0 {
            return Err(Error::invalid("committed_step", "must not be negative"));
        }
        if req.state_hash.len() > 64 {
            return Err(Error::invalid("state_hash", "at most 64 bytes"));
        }
        let w = self.pool.live_mut(&req.worker_id)?;
        w.last_seen = now;
        w.described = true;
        match phase {
            WorkerPhase::Training => self.training_heartbeat(req),
            _ => self.idle_heartbeat(now, req, secrets, ch),
        }
    }

    fn training_heartbeat(&mut self, req: &HeartbeatRequest) -> Result<HeartbeatResponse, Error> {
        if req.job_id.is_empty() {
            return Err(Error::invalid(
                "job_id",
                "a TRAINING heartbeat names its session's job",
            ));
        }
        let Some(entry) = self.jobs.get(&req.job_id) else {
            return Ok(respond(Action::Stop(true)));
        };
        if entry.is_final() {
            return Ok(respond(Action::Stop(true)));
        }
        check_epoch(&req.job_id, entry.ledger.last_epoch, req.membership_epoch)?;
        let live = entry
            .ledger
            .membership
            .as_ref()
            .is_some_and(|m| m.is_live());
        let Some(w) = self.pool.get_mut(&req.worker_id) else {
            return Err(Error::NotFound(format!("worker {:?}", req.worker_id)));
        };
        if !live || !w.in_session(&req.job_id, req.membership_epoch) {
            return Ok(respond(Action::Stop(true)));
        }
        w.state = WorkerState::Training {
            job_id: req.job_id.clone(),
            epoch: req.membership_epoch,
        };
        Ok(respond(Action::KeepGoing(true)))
    }

    fn idle_heartbeat(
        &mut self,
        now: Instant,
        req: &HeartbeatRequest,
        secrets: Secrets,
        ch: &mut Changes,
    ) -> Result<HeartbeatResponse, Error> {
        let id = req.worker_id.as_str();
        let final_replica =
            !req.job_id.is_empty() && self.jobs.get(&req.job_id).is_none_or(|e| e.is_final());
        let Some(w) = self.pool.get_mut(id) else {
            return Err(Error::NotFound(format!("worker {id:?}")));
        };
        w.replica = (!req.job_id.is_empty() && !final_replica).then(|| Replica {
            job_id: req.job_id.clone(),
            epoch: req.membership_epoch,
            committed_step: req.committed_step as u64,
            state_hash: req.state_hash.clone(),
        });
        let reports_session =
            |job: &str, epoch: i64| req.job_id == job && req.membership_epoch == epoch;
        // Which session, if any, this heartbeat says has ended.
        let ended = match &w.state {
            WorkerState::Assigned {
                job_id,
                epoch,
                delivered: true,
            } if reports_session(job_id, *epoch) => Some((job_id.clone(), *epoch)),
            WorkerState::Training { job_id, epoch } => Some((job_id.clone(), *epoch)),
            _ => None,
        };
        if let Some((job, epoch)) = ended {
            w.state = WorkerState::Idle;
            let reason = format!(
                "{id} left epoch {epoch} (idle at step {})",
                req.committed_step
            );
            self.member_left(now, &job, epoch, id, Regroup::Left, &reason, ch)?;
        }
        self.schedule(now, secrets, ch)?;
        if final_replica {
            return Ok(respond(Action::Stop(true)));
        }
        let Some(w) = self.pool.get_mut(id) else {
            return Err(Error::NotFound(format!("worker {id:?}")));
        };
        let WorkerState::Assigned { job_id, epoch, .. } = w.state.clone() else {
            return Ok(respond(Action::KeepGoing(true)));
        };
        // An assigned worker that is still idle has not received its assignment (or the
        // response was lost): (re)send it.
        let assignment = self
            .jobs
            .get(&job_id)
            .and_then(|e| e.ledger.membership.as_ref())
            .filter(|m| m.epoch == epoch && m.is_live())
            .and_then(|m| m.rank_of(id).and_then(|r| m.assignments.get(r)))
            .cloned();
        let Some(assignment) = assignment else {
            // The group stopped before this worker confirmed its assignment (the response
            // carrying it may have been lost): the assignment is void, the worker idle, and
            // the stopped group no longer waits for it.
            w.state = WorkerState::Idle;
            ch.note(
                id,
                format!("its assignment to epoch {epoch} of {job_id} lapsed with the group"),
            );
            // The stopped group may end now: the caller's scheduling pass decides it.
            ch.scheduled = false;
            return Ok(respond(Action::KeepGoing(true)));
        };
        w.state = WorkerState::Assigned {
            job_id,
            epoch,
            delivered: true,
        };
        Ok(respond(Action::Assign(assignment)))
    }
}

/// `ABORTED` unless `epoch` is the job's newest membership epoch.
pub(crate) fn check_epoch(job_id: &str, latest: i64, epoch: i64) -> Result<(), Error> {
    if epoch == latest && latest > 0 {
        return Ok(());
    }
    Err(Error::Aborted(if epoch < latest {
        format!("membership epoch {epoch} of {job_id} is stale (the current one is {latest})")
    } else {
        format!("membership epoch {epoch} of {job_id} was never formed (the newest is {latest})")
    }))
}
