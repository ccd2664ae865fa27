//! The worker pool: who is registered, what each worker is doing, and who is alive.
//!
//! A worker is `Idle`, `Assigned` (its group's assignment is out or waiting to go out in its
//! next heartbeat response), `Training`, or `Lost` (silent for the heartbeat timeout). Besides
//! that state the pool remembers what a worker last said about the replica it keeps between
//! sessions (job, epoch, committed step, hash), because the next group of that job is built
//! from those replicas.
//!
//! The pool is in memory only: after a coordinator restart, the members of stored memberships
//! are entered as *placeholders* (not attached) until they register again; everyone else simply
//! registers again. Liveness changes never touch the store.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use protodino_proto::v1::Capabilities;

use crate::error::Error;

/// Lost workers are forgotten this long after their last heartbeat, so that churn (pods with
/// fresh ids) does not grow the pool without bound.
pub const LOST_RETENTION: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerState {
    Idle,
    /// A member of membership `epoch` of `job_id` whose session has not been seen running yet;
    /// `delivered` once the assignment went out in a heartbeat response.
    Assigned {
        job_id: String,
        epoch: i64,
        delivered: bool,
    },
    /// Runs the session of membership `epoch` of `job_id`.
    Training {
        job_id: String,
        epoch: i64,
    },
    Lost,
}

impl WorkerState {
    /// The membership this worker belongs to, if any.
    pub fn session(&self) -> Option<(&str, i64)> {
        match self {
            WorkerState::Assigned { job_id, epoch, .. }
            | WorkerState::Training { job_id, epoch } => Some((job_id.as_str(), *epoch)),
            WorkerState::Idle | WorkerState::Lost => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Assigned { .. } => "assigned",
            WorkerState::Training { .. } => "training",
            WorkerState::Lost => "lost",
        }
    }
}

/// What an idle worker keeps in memory between sessions (from its IDLE heartbeat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub job_id: String,
    pub epoch: i64,
    pub committed_step: u64,
    pub state_hash: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Worker {
    pub id: String,
    pub name: String,
    pub caps: Capabilities,
    pub state: WorkerState,
    /// False for a member restored from the store that has not registered again.
    pub attached: bool,
    /// Whether a heartbeat has described this worker's replica since it registered. Only
    /// described workers join groups: a worker registering after a coordinator restart may hold
    /// a replica that its first IDLE heartbeat names, and a group formed before that would
    /// reload a checkpoint the replica makes unnecessary.
    pub described: bool,
    pub last_seen: Instant,
    pub replica: Option<Replica>,
}

impl Worker {
    /// Registered, attached and not lost: the only workers whose calls are served.
    pub fn is_live(&self) -> bool {
        self.attached && self.state != WorkerState::Lost
    }

    /// Whether this worker belongs to membership `epoch` of `job_id` and may be running it.
    pub fn in_session(&self, job_id: &str, epoch: i64) -> bool {
        self.state.session() == Some((job_id, epoch))
    }
}

/// How a member of a group that is being stopped stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberStatus {
    /// May still run the session (or, for a placeholder, may still come back).
    Running,
    /// Its session ended; `Some(step)` when its replica of that session reached `step`.
    Ended(Option<u64>),
    Lost,
}

#[derive(Debug, Default)]
pub struct Pool {
    workers: BTreeMap<String, Worker>,
}

impl Pool {
    pub fn get(&self, id: &str) -> Option<&Worker> {
        self.workers.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Worker> {
        self.workers.get_mut(id)
    }

    /// A worker whose calls are served; `NOT_FOUND` (register again) otherwise.
    pub fn live_mut(&mut self, id: &str) -> Result<&mut Worker, Error> {
        match self.workers.get_mut(id) {
            Some(w) if w.is_live() => Ok(w),
            _ => Err(Error::NotFound(format!(
                "worker {id:?} is not registered here (register again)"
            ))),
        }
    }

    /// Whether `id` may be given to a registering worker: unknown, lost, or a placeholder.
    pub fn is_free(&self, id: &str) -> bool {
        self.workers.get(id).is_none_or(|w| !w.is_live())
    }

    pub fn insert(&mut self, w: Worker) {
        self.workers.insert(w.id.clone(), w);
    }

    /// Enter a member of a restored membership; an id already present is left alone.
    pub fn insert_placeholder(&mut self, id: &str, job_id: &str, epoch: i64, now: Instant) {
        self.workers
            .entry(id.to_string())
            .or_insert_with(|| Worker {
                id: id.to_string(),
                name: String::new(),
                caps: Capabilities::default(),
                state: WorkerState::Training {
                    job_id: job_id.to_string(),
                    epoch,
                },
                attached: false,
                described: false,
                last_seen: now,
                replica: None,
            });
    }

    /// Live, described idle workers in id order: the ones a group may take.
    pub fn idle(&self) -> impl Iterator<Item = &Worker> {
        self.workers
            .values()
            .filter(|w| w.is_live() && w.described && w.state == WorkerState::Idle)
    }

    /// A member of `(job_id, epoch)` goes back to idle (its group ended or the job is final).
    pub fn free(&mut self, id: &str, job_id: &str, epoch: i64) {
        if let Some(w) = self.workers.get_mut(id)
            && w.in_session(job_id, epoch)
        {
            w.state = if w.attached {
                WorkerState::Idle
            } else {
                WorkerState::Lost
            };
        }
    }

    /// How member `id` of `(job_id, epoch)` stands while its group is being stopped.
    pub fn member_status(&self, id: &str, job_id: &str, epoch: i64) -> MemberStatus {
        match self.workers.get(id) {
            None => MemberStatus::Lost,
            Some(w) if w.state == WorkerState::Lost => MemberStatus::Lost,
            Some(w) if w.in_session(job_id, epoch) => MemberStatus::Running,
            Some(w) => MemberStatus::Ended(
                w.replica
                    .as_ref()
                    .filter(|r| r.job_id == job_id && r.epoch == epoch)
                    .map(|r| r.committed_step),
            ),
        }
    }

    /// Mark `id` lost (it is silent while its group stops); true when it was not lost yet.
    pub fn lose(&mut self, id: &str) -> bool {
        match self.workers.get_mut(id) {
            Some(w) if w.state != WorkerState::Lost => {
                w.state = WorkerState::Lost;
                w.replica = None;
                true
            }
            _ => false,
        }
    }

    /// When `id` was last heard of.
    pub fn silent_for(&self, id: &str, now: Instant) -> Option<Duration> {
        self.workers
            .get(id)
            .map(|w| now.saturating_duration_since(w.last_seen))
    }

    /// Mark every worker silent for longer than `timeout` as lost; returns each with the state
    /// it had. Forgets workers lost for longer than [`LOST_RETENTION`].
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<(String, WorkerState)> {
        let mut lost = Vec::new();
        self.workers.retain(|_, w| {
            let silent = now.saturating_duration_since(w.last_seen);
            if w.state == WorkerState::Lost {
                return silent <= timeout + LOST_RETENTION;
            }
            if silent > timeout {
                let was = std::mem::replace(&mut w.state, WorkerState::Lost);
                w.replica = None;
                lost.push((w.id.clone(), was));
            }
            true
        });
        lost
    }

    /// Workers by state name, every state present (zero included).
    pub fn counts(&self) -> Vec<(&'static str, i64)> {
        let mut out: Vec<(&'static str, i64)> =
            ["registering", "idle", "assigned", "training", "lost"]
                .iter()
                .map(|s| (*s, 0))
                .collect();
        for w in self.workers.values() {
            // Idle but not yet described by a heartbeat: not schedulable yet.
            let name = match w.state {
                WorkerState::Idle if !w.described => "registering",
                _ => w.state.name(),
            };
            if let Some(slot) = out.iter_mut().find(|(s, _)| *s == name) {
                slot.1 += 1;
            }
        }
        out
    }
}
