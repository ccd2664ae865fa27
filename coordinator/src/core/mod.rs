//! The coordinator's pure decision core: every scheduling, membership and ledger decision, with
//! no tokio, no network and no store.
//!
//! [`Core`] is the whole mutable state of the service (jobs with their ledgers, the worker pool,
//! idempotency keys). Each operation takes the time as an `Instant` and, where a group may form,
//! a source of group secrets, so unit tests drive it with made-up clocks and fixed bytes. An
//! operation records what it changed in [`Changes`]: the job records and ledgers that must be
//! written (the scheduler writes them in one transaction before answering) and the reasons of
//! its decisions (the scheduler logs them; the job-level ones are also the job's `message`).
//!
//! Files:
//! - [`pool`]: workers, their states (`Idle / Assigned / Training / Lost`), heartbeat expiry;
//! - [`ledger`]: the data plan, the committed-step watermark, memberships, pending reports;
//! - [`quorum`]: which idle workers form a group, at which world size, with which source;
//! - [`assign`]: the `Assignment` each member receives;
//! - [`job_fsm`]: the job state machine (allowed transitions, each with a reason);
//! - [`recovery`]: why a group regroups, and the recovery records (cost, seconds);
//! - [`history`]: finished jobs leave memory; the figures kept of them;
//! - `workers.rs`, `reports.rs`, `jobs.rs`, `schedule.rs`: the operations on [`Core`] (register
//!   and heartbeats; step, checkpoint, failure and result reports; submit and cancel; forming
//!   groups and ending them).

pub mod assign;
pub mod history;
pub mod job_fsm;
pub mod ledger;
pub mod pool;
pub mod quorum;
pub mod recovery;

mod jobs;
mod reports;
mod schedule;
mod workers;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use protodino_proto::v1::{Job, JobSpec, JobState, Recovery};

pub use history::{History, RETAIN_FINISHED};
pub use jobs::NewJob;
pub use ledger::{Ledger, Membership, Phase, Plan};
pub use pool::{Pool, Worker, WorkerState};
pub use workers::Registration;

use crate::error::Error;

/// Draws a fresh 32-byte group secret. The service passes the OS generator; tests pass fixed
/// bytes so every rendezvous is reproducible.
pub type Secrets<'a> = &'a mut dyn FnMut() -> Result<[u8; 32], String>;

/// Settings of the decisions (from the coordinator's flags).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// A worker silent this long is `LOST` and leaves its group.
    pub heartbeat_timeout: Duration,
    /// A member of a stopping group that is still running but silent this long is `LOST`
    /// (its peers already reported the group broken: waiting for the full heartbeat timeout
    /// would only delay the recovery; live members beat every heartbeat interval).
    pub stop_grace: Duration,
    /// Members report a replica hash every this many steps (0: never).
    pub hash_every_steps: i64,
    /// Idle workers join a running group below `max_world_size` at its next step boundary,
    /// but not within this long of the job's last failure (a worker that fails as it joins
    /// cannot stall the job by regrouping it over and over).
    pub join_cooldown: Duration,
}

/// One job: its durable record (what users see) and its durable ledger, and two instants
/// kept in memory only.
#[derive(Debug, Clone)]
pub struct JobEntry {
    pub record: Job,
    pub ledger: Ledger,
    /// When the open recovery was first detected (closed at the next group's first commit).
    pub recovering_since: Option<Instant>,
    /// The last failure-driven regroup (joins wait `join_cooldown` after it).
    pub last_failure: Option<Instant>,
    /// When the current group formed, until its first commit (`protodino_rendezvous_seconds`).
    pub formed_at: Option<Instant>,
}

impl JobEntry {
    pub fn new(record: Job, ledger: Ledger) -> Self {
        Self {
            record,
            ledger,
            recovering_since: None,
            last_failure: None,
            formed_at: None,
        }
    }

    pub fn state(&self) -> JobState {
        job_fsm::state_of(&self.record)
    }

    pub fn is_final(&self) -> bool {
        job_fsm::is_final(self.state())
    }
}

/// A decision and its reason, for the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    /// The job or worker the decision is about.
    pub subject: String,
    pub text: String,
}

/// What one operation changed. The durable part (`jobs`, `ledgers`, `idempotency`) is written
/// in one store transaction; liveness (heartbeat times, delivered assignments) never is.
#[derive(Debug, Default)]
pub struct Changes {
    /// Jobs whose record changed: written, then broadcast to watchers.
    pub jobs: BTreeSet<String>,
    /// Jobs whose ledger (plan, watermark, membership, pending reports) changed.
    pub ledgers: BTreeSet<String>,
    /// New idempotency keys (key, job id).
    pub idempotency: Vec<(String, String)>,
    pub notes: Vec<Note>,
    /// Recoveries that closed (the new group's first commit): logged and counted.
    pub recovered: Vec<(String, Recovery)>,
    /// The operation ended with a scheduling pass of its own (registering, idle heartbeats):
    /// the caller's pass after it would decide nothing new.
    pub scheduled: bool,
}

impl Changes {
    pub fn job(&mut self, id: &str) {
        self.jobs.insert(id.to_string());
    }

    pub fn ledger(&mut self, id: &str) {
        self.ledgers.insert(id.to_string());
    }

    pub fn recovered(&mut self, id: &str, r: Recovery) {
        self.recovered.push((id.to_string(), r));
    }

    pub fn note(&mut self, subject: &str, text: impl Into<String>) {
        self.notes.push(Note {
            subject: subject.to_string(),
            text: text.into(),
        });
    }

    /// Whether the store must be written.
    pub fn is_durable(&self) -> bool {
        !self.jobs.is_empty() || !self.ledgers.is_empty() || !self.idempotency.is_empty()
    }
}

/// `Ok` when `first`, the job that `spec`'s idempotency key names, was submitted with this
/// very spec; `ALREADY_EXISTS` when the key was used for another.
pub fn same_submission(first: &Job, spec: &JobSpec) -> Result<(), Error> {
    if first.spec.as_ref() != Some(spec) {
        return Err(Error::AlreadyExists(format!(
            "idempotency key {:?} was used for job {} with a different spec",
            spec.idempotency_key, first.job_id
        )));
    }
    Ok(())
}

/// Counts for `/metrics`, taken from memory (a scrape never reads the store).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub jobs_by_state: Vec<(JobState, i64)>,
    pub workers_by_state: Vec<(&'static str, i64)>,
    /// Sum of every job's watermark: monotonic, and right after a restart too.
    pub committed_steps: u64,
    /// Samples of those steps (each step's global batch), counted the same way.
    pub committed_samples: u64,
    /// Checkpoint records added to the catalogue since the start.
    pub checkpoint_records: u64,
    pub replica_mismatches: u64,
    /// (job id, membership epoch, world size) of each non-final job.
    pub active: Vec<(String, i64, i64)>,
    pub recoveries: recovery::RecoveryStats,
}

/// The whole mutable state of the coordinator.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    pool: Pool,
    /// The jobs that are not final, and the most recently finished ones (see [`history`]).
    jobs: BTreeMap<String, JobEntry>,
    /// Ids of the jobs that are not final: what scheduling walks (the history of finished jobs
    /// must not make every heartbeat slower).
    active: BTreeSet<String>,
    /// The finished jobs in `jobs`, in the order they ended.
    retained: history::Retained,
    /// Figures of the finished jobs no longer in memory.
    history: History,
    /// Idempotency keys of the jobs in memory (older keys are in the store).
    idempotency: HashMap<String, String>,
    recoveries: recovery::RecoveryStats,
    /// Checkpoint records catalogued since the start (`/metrics`).
    checkpoint_records: u64,
}

impl Core {
    pub fn new(cfg: CoreConfig) -> Self {
        Self {
            cfg,
            pool: Pool::default(),
            jobs: BTreeMap::new(),
            active: BTreeSet::new(),
            retained: history::Retained::default(),
            history: History::default(),
            idempotency: HashMap::new(),
            recoveries: recovery::RecoveryStats::default(),
            checkpoint_records: 0,
        }
    }

    /// Rebuild the state from the store after a start. A group that was forming or training
    /// keeps its membership: its members are entered as workers that have not re-attached yet
    /// (their heartbeats get `NOT_FOUND` until they register again with their session), and
    /// they expire like any silent worker if they never come back. A non-final job stored
    /// without a ledger (by a coordinator before the scheduler existed) cannot run and fails.
    /// `jobs` are the unfinished jobs and the newest finished ones, `history` the figures of
    /// the finished jobs left in the store.
    pub fn restore(
        cfg: CoreConfig,
        now: Instant,
        jobs: Vec<(Job, Option<Ledger>)>,
        idempotency: HashMap<String, String>,
        history: History,
        ch: &mut Changes,
    ) -> Self {
        let mut core = Core::new(cfg);
        core.idempotency = idempotency;
        for (reason, n) in &history.recoveries {
            for _ in 0..*n {
                core.recoveries.count(reason);
            }
        }
        core.history = history;
        for (record, ledger) in jobs {
            let id = record.job_id.clone();
            let ledger =
                ledger.unwrap_or_else(|| Ledger::new(Plan::default(), 1, 1, String::new()));
            let mut entry = JobEntry::new(record, ledger);
            if !entry.is_final() && entry.ledger.plan.total_steps == 0 {
                let reason = "failed: stored without a data plan by an older coordinator; \
                              submit the job again";
                if job_fsm::transition(&mut entry.record, JobState::Failed, reason).is_ok() {
                    ch.job(&id);
                    ch.note(&id, reason);
                }
            }
            if !entry.is_final()
                && let Some(m) = &entry.ledger.membership
                && m.phase != Phase::Ended
            {
                for member in &m.members {
                    core.pool.insert_placeholder(member, &id, m.epoch, now);
                }
                ch.note(
                    &id,
                    format!(
                        "restored epoch {} ({} members), waiting for them to re-attach",
                        m.epoch,
                        m.members.len()
                    ),
                );
            }
            for r in &entry.record.recoveries {
                core.recoveries.count(&r.reason);
            }
            if entry.is_final() {
                core.retained.push(&id);
            } else {
                core.active.insert(id.clone());
            }
            core.jobs.insert(id, entry);
        }
        core
    }

    /// Drop from memory the finished jobs beyond the newest [`RETAIN_FINISHED`], folding their
    /// figures into the history. The scheduler calls it once their records are in the store.
    /// Returns how many left.
    pub fn retire(&mut self) -> usize {
        let gone = self.retained.overflow(RETAIN_FINISHED);
        for id in &gone {
            if let Some(e) = self.jobs.remove(id) {
                self.history.add(&e.record, e.ledger.committed_step);
                let key = e
                    .record
                    .spec
                    .as_ref()
                    .map(|s| s.idempotency_key.as_str())
                    .unwrap_or_default();
                if self.idempotency.get(key) == Some(id) {
                    self.idempotency.remove(key);
                }
            }
        }
        gone.len()
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    pub fn job(&self, id: &str) -> Option<&JobEntry> {
        self.jobs.get(id)
    }

    /// Like [`Core::job`] but `NOT_FOUND` for an unknown id and `INVALID_ARGUMENT` for none.
    pub fn lookup(&self, id: &str) -> Result<&JobEntry, Error> {
        if id.is_empty() {
            return Err(Error::invalid("job_id", "must not be empty"));
        }
        self.jobs
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("no job {id:?}")))
    }

    /// The job in memory that an earlier submission of `spec` created, by its idempotency key:
    /// `Some` when the key was used for this very spec, `ALREADY_EXISTS` when it was used for
    /// another. `None` also when the key's job has left memory: the caller asks the store
    /// then, and checks what it finds with [`same_submission`].
    pub fn resubmitted(&self, spec: &JobSpec) -> Result<Option<&JobEntry>, Error> {
        let key = &spec.idempotency_key;
        let Some(id) = (!key.is_empty())
            .then(|| self.idempotency.get(key))
            .flatten()
        else {
            return Ok(None);
        };
        let first = self.jobs.get(id).ok_or_else(|| {
            Error::Internal(format!(
                "idempotency key {key:?} names the missing job {id}"
            ))
        })?;
        same_submission(&first.record, spec)?;
        Ok(Some(first))
    }

    /// Jobs in id order (ids sort by submission time).
    pub fn jobs(&self) -> impl Iterator<Item = &JobEntry> {
        self.jobs.values()
    }

    /// Mutable access to a job record, for the scheduler's wall-clock stamps.
    pub fn record_mut(&mut self, id: &str) -> Option<&mut Job> {
        self.jobs.get_mut(id).map(|e| &mut e.record)
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut jobs_by_state: Vec<(JobState, i64)> = job_fsm::ALL_STATES
            .iter()
            .map(|s| (*s, self.history.count(*s)))
            .collect();
        let mut snap = Snapshot {
            committed_steps: self.history.committed_steps,
            committed_samples: self.history.committed_samples,
            checkpoint_records: self.checkpoint_records,
            replica_mismatches: self.history.replica_mismatches,
            ..Default::default()
        };
        for e in self.jobs.values() {
            if let Some(slot) = jobs_by_state.iter_mut().find(|(s, _)| *s == e.state()) {
                slot.1 += 1;
            }
            snap.committed_steps += e.ledger.committed_step;
            snap.committed_samples += e.ledger.committed_step * e.ledger.plan.global_batch;
            snap.replica_mismatches += e
                .record
                .progress
                .as_ref()
                .map_or(0, |p| p.replica_mismatches.max(0) as u64);
            if !e.is_final() {
                let (epoch, world) = match &e.ledger.membership {
                    Some(m) if m.phase != Phase::Ended => (m.epoch, m.members.len() as i64),
                    _ => (e.ledger.last_epoch, 0),
                };
                snap.active.push((e.record.job_id.clone(), epoch, world));
            }
        }
        snap.jobs_by_state = jobs_by_state;
        snap.recoveries = self.recoveries.clone();
        snap.workers_by_state = self.pool.counts();
        snap
    }
}
