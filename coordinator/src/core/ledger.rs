//! The exactly-once ledger of one job: its data plan, the committed-step watermark, the
//! current membership, and the step reports that have not committed yet.
//!
//! Steps are counted as the proto counts them: `StepReport.step = s` means `s` steps are done,
//! so the step just finished has index `s - 1` and its global batch is
//! `plan.global_ids(s - 1)`. The watermark `committed_step` is the number of committed steps.
//! Step `s` commits when every member of the current membership has reported it, and steps
//! commit in order. A repeated `(worker, epoch, step)` changes nothing; a report whose sample
//! digest differs from the plan's is refused before anything is recorded, so a worker that
//! computed another plan can never commit a step.
//!
//! Pending reports belong to the current membership only: forming a new membership drops them
//! (those steps never committed; their samples go back to the plan and are redone).

use std::collections::BTreeMap;

use protodino_data::{DataPlan, sample_digest};
use protodino_proto::v1::{Assignment, Progress};

use crate::core::pool::MemberStatus;
use crate::error::Error;

/// What fixes the samples of every step: chosen at submission, never changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    pub seed: u64,
    pub dataset_size: u64,
    pub global_batch: u64,
    pub total_steps: u64,
}

impl Plan {
    /// `epochs × steps_per_epoch` steps (`drop_last`), at most `max_steps` when that is > 0.
    pub fn new(
        seed: u64,
        dataset_size: u64,
        global_batch: u64,
        epochs: i64,
        max_steps: i64,
    ) -> Result<Plan, Error> {
        let spe = DataPlan {
            seed,
            dataset_size,
            global_batch,
        }
        .steps_per_epoch();
        if spe == 0 {
            return Err(Error::invalid(
                "spec.global_batch_size",
                format!("the global batch {global_batch} exceeds the {dataset_size} images"),
            ));
        }
        let all = spe.saturating_mul(epochs.max(0) as u64);
        let total = if max_steps > 0 {
            all.min(max_steps as u64)
        } else {
            all
        };
        if total == 0 {
            return Err(Error::invalid("spec.epochs", "the job would run no step"));
        }
        Ok(Plan {
            seed,
            dataset_size,
            global_batch,
            total_steps: total,
        })
    }

    pub fn data(&self) -> DataPlan {
        DataPlan {
            seed: self.seed,
            dataset_size: self.dataset_size,
            global_batch: self.global_batch,
        }
    }

    /// The epoch the `done`-th step (index `done - 1`) lies in; 0 before any step.
    pub fn epoch_after(&self, done: u64) -> u64 {
        self.data().epoch_of(done.saturating_sub(1))
    }
}

/// Where a membership stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Forming or training.
    Live,
    /// Told to stop (the reason); its reports still commit until it has ended.
    Stopping(String),
    /// Every member stopped (or the job is final); kept for the members' old ranks.
    Ended,
}

/// One group of a job under one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Membership {
    pub epoch: i64,
    /// Worker ids in rank order.
    pub members: Vec<String>,
    pub source_rank: usize,
    pub resume_step: u64,
    pub resume_from_checkpoint: bool,
    pub phase: Phase,
    /// Each member's assignment, by rank. In memory only (it holds the group secret): empty
    /// after a restart, when the members already hold theirs.
    pub assignments: Vec<Assignment>,
}

impl Membership {
    pub fn rank_of(&self, worker_id: &str) -> Option<usize> {
        self.members.iter().position(|m| m == worker_id)
    }

    pub fn is_live(&self) -> bool {
        self.phase == Phase::Live
    }
}

/// One member's report of one step, kept until the step commits.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingReport {
    pub progress: Progress,
    pub state_hash: Vec<u8>,
    pub step_seconds: f64,
}

/// A step that committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// The watermark after this commit.
    pub step: u64,
    /// Rank 0's report (its losses describe the global batch).
    pub rank0: PendingReport,
    /// Every member's hash (rank order) when all reported one and they differ.
    pub mismatch: Option<Vec<(String, Vec<u8>)>>,
}

/// What recording a report did.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// The step is below the watermark (a replay after a resume, or a retry).
    AlreadyCommitted,
    /// This member already reported this step in this epoch.
    Duplicate,
    /// Recorded; the steps it let commit, in order.
    New(Vec<Commit>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ledger {
    pub plan: Plan,
    pub min_world_size: i32,
    pub max_world_size: i32,
    /// The job's directory below the checkpoint root (`<train.output_dir>/<job_id>`).
    pub checkpoint_dir: String,
    /// Checkpoints the catalogue keeps (`train.checkpoint_keep`: rank 0 deletes older files).
    pub checkpoint_keep: usize,
    pub committed_step: u64,
    /// The newest epoch ever formed for this job (0: none yet); epochs only go up.
    pub last_epoch: i64,
    pub membership: Option<Membership>,
    /// step → worker → report, for the current membership.
    pub pending: BTreeMap<u64, BTreeMap<String, PendingReport>>,
    /// The permutation of one epoch of the plan (recomputing it per report would cost a
    /// shuffle of the whole data set each time).
    perm_cache: Option<(u64, Vec<u64>)>,
}

impl Ledger {
    pub fn new(
        plan: Plan,
        min_world_size: i32,
        max_world_size: i32,
        checkpoint_dir: String,
    ) -> Self {
        Self {
            plan,
            min_world_size,
            max_world_size,
            checkpoint_dir,
            checkpoint_keep: 1,
            committed_step: 0,
            last_epoch: 0,
            membership: None,
            pending: BTreeMap::new(),
            perm_cache: None,
        }
    }

    /// Moves the watermark to `step` (never back) and drops the reports it covers.
    pub fn commit_through(&mut self, step: u64) {
        self.committed_step = self.committed_step.max(step);
        let w = self.committed_step;
        self.pending.retain(|s, _| *s > w);
    }

    /// Drops what only a running job needs (the cached permutation: 8 bytes per image).
    pub fn release_caches(&mut self) {
        self.perm_cache = None;
    }

    pub fn is_complete(&self) -> bool {
        self.committed_step >= self.plan.total_steps
    }

    /// SHA-256 of the global batch of the `step`-th step (index `step - 1`).
    pub fn expected_digest(&mut self, step: u64) -> [u8; 32] {
        let data = self.plan.data();
        let index = step.saturating_sub(1);
        let epoch = data.epoch_of(index);
        let perm = match self.perm_cache.take() {
            Some((e, perm)) if e == epoch => perm,
            _ => data.permutation(epoch),
        };
        let digest = sample_digest(&data.global_ids_in(&perm, index));
        self.perm_cache = Some((epoch, perm));
        digest
    }

    /// Record member `worker`'s report of `step` (the caller checked epoch and membership)
    /// and commit what can commit.
    pub fn record(
        &mut self,
        worker: &str,
        step: u64,
        digest: &[u8],
        report: PendingReport,
    ) -> Result<Recorded, Error> {
        if step < 1 || step > self.plan.total_steps {
            return Err(Error::invalid(
                "step",
                format!("{step} is outside [1, {}]", self.plan.total_steps),
            ));
        }
        if digest.len() != 32 {
            return Err(Error::invalid(
                "sample_digest",
                format!("{} bytes; a SHA-256 has 32", digest.len()),
            ));
        }
        if self.expected_digest(step).as_slice() != digest {
            return Err(Error::FailedPrecondition(format!(
                "the sample digest of step {step} (index {}) differs from the coordinator's \
                 plan (seed {}, {} images, global batch {})",
                step - 1,
                self.plan.seed,
                self.plan.dataset_size,
                self.plan.global_batch
            )));
        }
        if step <= self.committed_step {
            return Ok(Recorded::AlreadyCommitted);
        }
        let reports = self.pending.entry(step).or_default();
        if reports.contains_key(worker) {
            return Ok(Recorded::Duplicate);
        }
        reports.insert(worker.to_string(), report);
        Ok(Recorded::New(self.commit_ready()))
    }

    /// Commit, in order, every step all members have reported.
    fn commit_ready(&mut self) -> Vec<Commit> {
        let Some(m) = &self.membership else {
            return Vec::new();
        };
        let mut commits = Vec::new();
        loop {
            let next = self.committed_step + 1;
            let complete = self
                .pending
                .get(&next)
                .is_some_and(|r| m.members.iter().all(|id| r.contains_key(id)));
            if !complete {
                break;
            }
            let Some(mut reports) = self.pending.remove(&next) else {
                break;
            };
            self.committed_step = next;
            let hashes: Vec<(String, Vec<u8>)> = m
                .members
                .iter()
                .filter_map(|id| reports.get(id).map(|r| (id.clone(), r.state_hash.clone())))
                .collect();
            let all_hashed = hashes.iter().all(|(_, h)| !h.is_empty());
            let mismatch =
                (all_hashed && hashes.windows(2).any(|w| w[0].1 != w[1].1)).then_some(hashes);
            let Some(rank0) = m.members.first().and_then(|id| reports.remove(id)) else {
                break;
            };
            commits.push(Commit {
                step: next,
                rank0,
                mismatch,
            });
        }
        commits
    }

    /// Whether a step of the (stopping) membership may still commit: the next step misses
    /// reports only from members whose replica says they completed it, so those reports are
    /// on their way. A lost member, or one that ended before that step, means it never will.
    pub fn can_still_commit(&self, status: impl Fn(&str) -> MemberStatus) -> bool {
        let Some(m) = &self.membership else {
            return false;
        };
        let next = self.committed_step + 1;
        if next > self.plan.total_steps {
            return false;
        }
        let reported = self.pending.get(&next);
        let missing: Vec<&String> = m
            .members
            .iter()
            .filter(|id| reported.is_none_or(|r| !r.contains_key(*id)))
            .collect();
        !missing.is_empty()
            && missing.iter().all(|id| match status(id) {
                MemberStatus::Running => true,
                MemberStatus::Ended(Some(done)) => done >= next,
                MemberStatus::Ended(None) | MemberStatus::Lost => false,
            })
    }
}
