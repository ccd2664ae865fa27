//! Finished jobs leave memory: what the core keeps of them.
//!
//! A job that ends stays in memory while it is among the [`RETAIN_FINISHED`] most recently
//! finished (so late reports of its members are answered from memory, and `GetJob` right after
//! the end needs no read). Older ones live only in the store, which already holds every record;
//! what `/metrics` needs of them — counts by final state, committed steps, replica mismatches,
//! recoveries by reason — is folded into a [`History`] of fixed size. So the coordinator's
//! memory follows the jobs that run, not every job ever submitted.

use std::collections::{BTreeMap, VecDeque};

use protodino_proto::v1::{Job, JobState};

use crate::core::job_fsm;

/// Finished jobs kept in memory.
pub const RETAIN_FINISHED: usize = 128;

/// The figures of the finished jobs that are no longer in memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub by_state: BTreeMap<i32, i64>,
    pub committed_steps: u64,
    /// Samples of the committed steps (each step's global batch).
    pub committed_samples: u64,
    pub replica_mismatches: u64,
    /// Recoveries by reason name.
    pub recoveries: BTreeMap<String, u64>,
}

impl History {
    /// Fold one finished job (its record and its ledger's watermark) into the figures.
    pub fn add(&mut self, record: &Job, committed_step: u64) {
        *self
            .by_state
            .entry(job_fsm::state_of(record) as i32)
            .or_default() += 1;
        self.committed_steps += committed_step;
        self.committed_samples += record
            .progress
            .as_ref()
            .map_or(0, |p| p.committed_samples.max(0) as u64);
        self.replica_mismatches += record
            .progress
            .as_ref()
            .map_or(0, |p| p.replica_mismatches.max(0) as u64);
        for r in &record.recoveries {
            *self.recoveries.entry(r.reason.clone()).or_default() += 1;
        }
    }

    pub fn count(&self, state: JobState) -> i64 {
        self.by_state.get(&(state as i32)).copied().unwrap_or(0)
    }
}

/// The finished jobs still in memory, in the order they ended.
#[derive(Debug, Default)]
pub struct Retained {
    order: VecDeque<String>,
}

impl Retained {
    pub fn push(&mut self, id: &str) {
        self.order.push_back(id.to_string());
    }

    /// The ids beyond the newest `keep`, oldest first, removed from the list.
    pub fn overflow(&mut self, keep: usize) -> Vec<String> {
        let n = self.order.len().saturating_sub(keep);
        self.order.drain(..n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protodino_proto::v1::{Progress, Recovery};

    #[test]
    fn figures_fold_and_overflow_is_oldest_first() {
        let mut h = History::default();
        let job = Job {
            state: JobState::Succeeded as i32,
            progress: Some(Progress {
                replica_mismatches: 2,
                committed_samples: 112,
                ..Default::default()
            }),
            recoveries: vec![Recovery {
                reason: "peer_lost".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        h.add(&job, 7);
        h.add(&job, 3);
        assert_eq!(h.count(JobState::Succeeded), 2);
        assert_eq!(h.count(JobState::Failed), 0);
        assert_eq!((h.committed_steps, h.replica_mismatches), (10, 4));
        assert_eq!(h.committed_samples, 224);
        assert_eq!(h.recoveries["peer_lost"], 2);

        let mut r = Retained::default();
        for id in ["a", "b", "c"] {
            r.push(id);
        }
        assert_eq!(r.overflow(5), Vec::<String>::new());
        assert_eq!(r.overflow(1), vec!["a".to_string(), "b".into()]);
        assert_eq!(r.overflow(0), vec!["c".to_string()]);
    }
}
