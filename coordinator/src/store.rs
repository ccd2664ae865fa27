//! The embedded store (redb): everything the coordinator must not forget.
//!
//! Tables:
//! - `jobs`: job id → the encoded `Job` message (state, message, progress, the checkpoint
//!   catalogue, the result);
//! - `ledgers`: job id → [`LedgerRecord`] (plan, world sizes, watermark, newest epoch, the
//!   membership without its secret, the pending step reports);
//! - `idempotency_keys`: key → job id.
//!
//! [`Store::write`] puts one [`Batch`] (every record one operation changed) in one committed
//! write transaction, so a coordinator killed with `-9` at any point restarts with every change
//! it acknowledged and none half-written. [`Store::load`] reads it all back at start-up.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;

use prost::Message;
use protodino_proto::v1::{Job, Progress};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::core::History;
use crate::core::job_fsm;
use crate::core::ledger::{Ledger, Membership, PendingReport, Phase, Plan};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const LEDGERS: TableDefinition<&str, &[u8]> = TableDefinition::new("ledgers");
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency_keys");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store: {0}")]
    Db(String),
    #[error("job store holds an undecodable record for {0}")]
    Corrupt(String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The durable part of a job's ledger, as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LedgerRecord {
    #[prost(uint64, tag = "1")]
    pub seed: u64,
    #[prost(uint64, tag = "2")]
    pub dataset_size: u64,
    #[prost(uint64, tag = "3")]
    pub global_batch: u64,
    #[prost(uint64, tag = "4")]
    pub total_steps: u64,
    #[prost(int32, tag = "5")]
    pub min_world_size: i32,
    #[prost(int32, tag = "6")]
    pub max_world_size: i32,
    #[prost(string, tag = "7")]
    pub checkpoint_dir: String,
    #[prost(uint64, tag = "8")]
    pub checkpoint_keep: u64,
    #[prost(uint64, tag = "9")]
    pub committed_step: u64,
    #[prost(int64, tag = "10")]
    pub last_epoch: i64,
    #[prost(message, optional, tag = "11")]
    pub membership: Option<MembershipRecord>,
    #[prost(message, repeated, tag = "12")]
    pub pending: Vec<PendingRecord>,
}

/// A membership without its group secret (the members hold it; a new epoch draws a new one).
#[derive(Clone, PartialEq, prost::Message)]
pub struct MembershipRecord {
    #[prost(int64, tag = "1")]
    pub epoch: i64,
    #[prost(string, repeated, tag = "2")]
    pub members: Vec<String>,
    #[prost(uint32, tag = "3")]
    pub source_rank: u32,
    #[prost(uint64, tag = "4")]
    pub resume_step: u64,
    #[prost(bool, tag = "5")]
    pub resume_from_checkpoint: bool,
    /// 0 live, 1 stopping, 2 ended.
    #[prost(uint32, tag = "6")]
    pub phase: u32,
    #[prost(string, tag = "7")]
    pub stop_reason: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PendingRecord {
    #[prost(uint64, tag = "1")]
    pub step: u64,
    #[prost(string, tag = "2")]
    pub worker_id: String,
    #[prost(message, optional, tag = "3")]
    pub progress: Option<Progress>,
    #[prost(bytes = "vec", tag = "4")]
    pub state_hash: Vec<u8>,
    #[prost(double, tag = "5")]
    pub step_seconds: f64,
}

impl From<&Ledger> for LedgerRecord {
    fn from(l: &Ledger) -> Self {
        LedgerRecord {
            seed: l.plan.seed,
            dataset_size: l.plan.dataset_size,
            global_batch: l.plan.global_batch,
            total_steps: l.plan.total_steps,
            min_world_size: l.min_world_size,
            max_world_size: l.max_world_size,
            checkpoint_dir: l.checkpoint_dir.clone(),
            checkpoint_keep: l.checkpoint_keep as u64,
            committed_step: l.committed_step,
            last_epoch: l.last_epoch,
            membership: l.membership.as_ref().map(|m| {
                let (phase, stop_reason) = match &m.phase {
                    Phase::Live => (0, String::new()),
                    Phase::Stopping(r) => (1, r.clone()),
                    Phase::Ended => (2, String::new()),
                };
                MembershipRecord {
                    epoch: m.epoch,
                    members: m.members.clone(),
                    source_rank: m.source_rank as u32,
                    resume_step: m.resume_step,
                    resume_from_checkpoint: m.resume_from_checkpoint,
                    phase,
                    stop_reason,
                }
            }),
            pending: l
                .pending
                .iter()
                .flat_map(|(step, reports)| {
                    reports.iter().map(|(w, r)| PendingRecord {
                        step: *step,
                        worker_id: w.clone(),
                        progress: Some(r.progress),
                        state_hash: r.state_hash.clone(),
                        step_seconds: r.step_seconds,
                    })
                })
                .collect(),
        }
    }
}

impl LedgerRecord {
    /// Back to a ledger, checking the invariants the core relies on.
    pub fn into_ledger(self, id: &str) -> Result<Ledger, StoreError> {
        let corrupt = |why: &str| StoreError::Corrupt(format!("ledger of {id} ({why})"));
        let plan = Plan {
            seed: self.seed,
            dataset_size: self.dataset_size,
            global_batch: self.global_batch,
            total_steps: self.total_steps,
        };
        if self.total_steps > 0 && (self.global_batch == 0 || self.global_batch > self.dataset_size)
        {
            return Err(corrupt("the plan has no step"));
        }
        let mut l = Ledger::new(
            plan,
            self.min_world_size,
            self.max_world_size,
            self.checkpoint_dir,
        );
        l.checkpoint_keep = self.checkpoint_keep as usize;
        l.committed_step = self.committed_step;
        l.last_epoch = self.last_epoch;
        if let Some(m) = self.membership {
            let phase = match m.phase {
                0 => Phase::Live,
                1 => Phase::Stopping(m.stop_reason),
                2 => Phase::Ended,
                _ => return Err(corrupt("unknown membership phase")),
            };
            if m.members.is_empty() || m.source_rank as usize >= m.members.len() {
                return Err(corrupt("membership without its source"));
            }
            l.membership = Some(Membership {
                epoch: m.epoch,
                members: m.members,
                source_rank: m.source_rank as usize,
                resume_step: m.resume_step,
                resume_from_checkpoint: m.resume_from_checkpoint,
                phase,
                assignments: Vec::new(),
            });
        }
        for p in self.pending {
            l.pending.entry(p.step).or_default().insert(
                p.worker_id,
                PendingReport {
                    progress: p.progress.unwrap_or_default(),
                    state_hash: p.state_hash,
                    step_seconds: p.step_seconds,
                },
            );
        }
        Ok(l)
    }
}

/// Every record one operation changed.
#[derive(Debug, Default)]
pub struct Batch {
    pub jobs: Vec<Job>,
    pub ledgers: Vec<(String, LedgerRecord)>,
    pub idempotency: Vec<(String, String)>,
}

/// What [`Store::load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The unfinished jobs and the newest finished ones, in id order, with their ledgers
    /// (none for a job stored by an older coordinator).
    pub jobs: Vec<(Job, Option<Ledger>)>,
    /// The idempotency keys of those jobs.
    pub idempotency: HashMap<String, String>,
    /// The figures of the other finished jobs.
    pub history: History,
}

pub struct Store {
    db: Database,
}

/// redb's page cache. Its default (1 GiB) would let the coordinator's memory grow with the
/// store file for as long as it runs; the hot pages are few (the unfinished jobs' records and
/// ledgers, written again and again), and finished jobs are read rarely.
pub const CACHE_BYTES: usize = 4 << 20;

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(JOBS)?;
        tx.open_table(LEDGERS)?;
        tx.open_table(IDEMPOTENCY)?;
        tx.commit()?;
        Ok(Self { db })
    }

    /// Write `batch` in one durable transaction.
    pub fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut jobs = tx.open_table(JOBS)?;
            for job in &batch.jobs {
                jobs.insert(job.job_id.as_str(), job.encode_to_vec().as_slice())?;
            }
            let mut ledgers = tx.open_table(LEDGERS)?;
            for (id, l) in &batch.ledgers {
                ledgers.insert(id.as_str(), l.encode_to_vec().as_slice())?;
            }
            let mut keys = tx.open_table(IDEMPOTENCY)?;
            for (k, id) in &batch.idempotency {
                keys.insert(k.as_str(), id.as_str())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let tx = self.db.begin_read()?;
        let jobs = tx.open_table(JOBS)?;
        match jobs.get(id)? {
            Some(v) => Job::decode(v.value())
                .map(Some)
                .map_err(|_| StoreError::Corrupt(id.into())),
            None => Ok(None),
        }
    }

    /// The job that idempotency key `key` names, if any.
    pub fn job_of_key(&self, key: &str) -> Result<Option<Job>, StoreError> {
        let tx = self.db.begin_read()?;
        let keys = tx.open_table(IDEMPOTENCY)?;
        let Some(id) = keys.get(key)?.map(|v| v.value().to_string()) else {
            return Ok(None);
        };
        let jobs = tx.open_table(JOBS)?;
        match jobs.get(id.as_str())? {
            Some(v) => Job::decode(v.value())
                .map(Some)
                .map_err(|_| StoreError::Corrupt(id)),
            None => Ok(None),
        }
    }

    /// At most `limit` jobs with ids after `after` (all when empty), in id order, in state
    /// `state` (any when 0). Reads only as far as the page needs.
    pub fn list(&self, state: i32, after: &str, limit: usize) -> Result<Vec<Job>, StoreError> {
        let tx = self.db.begin_read()?;
        let jobs = tx.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in jobs.range(after..)? {
            if out.len() == limit {
                break;
            }
            let (k, v) = row?;
            let id = k.value();
            if id == after {
                continue;
            }
            let job = Job::decode(v.value()).map_err(|_| StoreError::Corrupt(id.into()))?;
            if state == 0 || job.state == state {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// What the start-up needs: every unfinished job and the newest `retain_finished`
    /// finished ones with their ledgers and keys; the figures of the other finished jobs.
    pub fn load(&self, retain_finished: usize) -> Result<Loaded, StoreError> {
        let tx = self.db.begin_read()?;
        let jobs = tx.open_table(JOBS)?;
        let ledgers = tx.open_table(LEDGERS)?;
        let keys = tx.open_table(IDEMPOTENCY)?;
        let mut out = Loaded::default();
        // The newest finished jobs seen so far.
        let mut finished: VecDeque<(Job, Option<Ledger>)> = VecDeque::new();
        for row in jobs.iter()? {
            let (k, v) = row?;
            let id = k.value();
            let job = Job::decode(v.value()).map_err(|_| StoreError::Corrupt(id.into()))?;
            let ledger = match ledgers.get(id)? {
                Some(l) => Some(
                    LedgerRecord::decode(l.value())
                        .map_err(|_| StoreError::Corrupt(format!("ledger of {id}")))?
                        .into_ledger(id)?,
                ),
                None => None,
            };
            if !job_fsm::is_final(job_fsm::state_of(&job)) {
                out.jobs.push((job, ledger));
                continue;
            }
            finished.push_back((job, ledger));
            if finished.len() > retain_finished
                && let Some((job, ledger)) = finished.pop_front()
            {
                out.history
                    .add(&job, ledger.map_or(0, |l| l.committed_step));
            }
        }
        out.jobs.extend(finished);
        out.jobs.sort_by(|a, b| a.0.job_id.cmp(&b.0.job_id));
        let ids: HashSet<&str> = out.jobs.iter().map(|(j, _)| j.job_id.as_str()).collect();
        for row in keys.iter()? {
            let (k, v) = row?;
            if ids.contains(v.value()) {
                out.idempotency
                    .insert(k.value().to_string(), v.value().to_string());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protodino_proto::v1::JobState;

    #[test]
    fn jobs_and_ledgers_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let plan = Plan {
            seed: 7,
            dataset_size: 16,
            global_batch: 4,
            total_steps: 4,
        };
        let mut ledger = Ledger::new(plan, 1, 2, "jobs/j1".into());
        ledger.committed_step = 2;
        ledger.last_epoch = 3;
        ledger.checkpoint_keep = 3;
        ledger.membership = Some(Membership {
            epoch: 3,
            members: vec!["w-a".into(), "w-b".into()],
            source_rank: 1,
            resume_step: 1,
            resume_from_checkpoint: false,
            phase: Phase::Stopping("why".into()),
            assignments: Vec::new(),
        });
        ledger.pending.entry(3).or_default().insert(
            "w-a".into(),
            PendingReport {
                progress: Progress {
                    dino_loss: 1.5,
                    ..Default::default()
                },
                state_hash: vec![1, 2],
                step_seconds: 0.5,
            },
        );
        {
            let s = Store::open(&path).unwrap();
            let job = Job {
                job_id: "j1".into(),
                message: "hello".into(),
                ..Default::default()
            };
            s.write(&Batch {
                jobs: vec![job],
                ledgers: vec![("j1".into(), LedgerRecord::from(&ledger))],
                idempotency: vec![("key-1".into(), "j1".into())],
            })
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.get("j1").unwrap().unwrap().message, "hello");
        assert!(s.get("nope").unwrap().is_none());
        let loaded = s.load(10).unwrap();
        assert_eq!(
            loaded.idempotency.get("key-1").map(String::as_str),
            Some("j1")
        );
        assert_eq!(loaded.jobs.len(), 1);
        assert_eq!(loaded.jobs[0].1.as_ref(), Some(&ledger));
    }

    #[test]
    fn the_start_up_loads_unfinished_and_newest_finished_jobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("store.redb")).unwrap();
        let job = |i: usize, state: JobState| Job {
            job_id: format!("j{i}"),
            state: state as i32,
            ..Default::default()
        };
        let mut batch = Batch::default();
        for i in 0..6 {
            let state = if i == 1 {
                JobState::Running
            } else {
                JobState::Succeeded
            };
            batch.jobs.push(job(i, state));
            batch.idempotency.push((format!("k{i}"), format!("j{i}")));
        }
        s.write(&batch).unwrap();
        let loaded = s.load(2).unwrap();
        let ids: Vec<_> = loaded.jobs.iter().map(|(j, _)| j.job_id.as_str()).collect();
        assert_eq!(ids, ["j1", "j4", "j5"]);
        assert_eq!(loaded.history.count(JobState::Succeeded), 3);
        let mut keys: Vec<_> = loaded.idempotency.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["k1", "k4", "k5"]);
        assert_eq!(s.job_of_key("k0").unwrap().unwrap().job_id, "j0");
        assert!(s.job_of_key("nope").unwrap().is_none());
        let page: Vec<_> = s
            .list(0, "j2", 2)
            .unwrap()
            .into_iter()
            .map(|j| j.job_id)
            .collect();
        assert_eq!(page, ["j3", "j4"]);
        let running = s.list(JobState::Running as i32, "", 10).unwrap();
        assert_eq!(running.len(), 1);
    }

    #[test]
    fn an_inconsistent_ledger_is_refused() {
        let r = LedgerRecord {
            total_steps: 1,
            dataset_size: 2,
            global_batch: 2,
            membership: Some(MembershipRecord {
                epoch: 1,
                members: vec!["w".into()],
                source_rank: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(r.into_ledger("j"), Err(StoreError::Corrupt(_))));
    }
}
