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

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use protodino_proto::v1::{Job, Progress};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

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
    /// Jobs in id order with their ledgers (none for a job stored by an older coordinator).
    pub jobs: Vec<(Job, Option<Ledger>)>,
    pub idempotency: HashMap<String, String>,
}

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
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

    /// Everything, for the start-up.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let tx = self.db.begin_read()?;
        let jobs = tx.open_table(JOBS)?;
        let ledgers = tx.open_table(LEDGERS)?;
        let keys = tx.open_table(IDEMPOTENCY)?;
        let mut out = Loaded::default();
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
            out.jobs.push((job, ledger));
        }
        for row in keys.iter()? {
            let (k, v) = row?;
            out.idempotency
                .insert(k.value().to_string(), v.value().to_string());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let loaded = s.load().unwrap();
        assert_eq!(
            loaded.idempotency.get("key-1").map(String::as_str),
            Some("j1")
        );
        assert_eq!(loaded.jobs.len(), 1);
        assert_eq!(loaded.jobs[0].1.as_ref(), Some(&ledger));
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
