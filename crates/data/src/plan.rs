//! The data plan of a job: which samples every step of every epoch uses.
//!
//! The coordinator owns the plan (it fixes `seed`, the dataset size and the global batch when a
//! job starts and keeps the committed-step watermark in its ledger); workers compute the same
//! pure function to find their share of a step, so no sample list ever crosses the network.
//!
//! Step `s` (counted from the start of the job) lies in epoch `s / steps_per_epoch`; its global
//! batch is the entries `i·G .. (i+1)·G` of that epoch's seeded permutation (`i` = the step's
//! index inside the epoch, `G` the global batch); the `n mod G` remainder of an epoch is dropped
//! (`drop_last`, as official DINO). Member `r` of a group of `W` takes entries `r, r+W, r+2W, …`
//! of the global batch: the deal of PyTorch's `DistributedSampler`, so a group of `W` with
//! `G / W` per member follows one process with batch `G`.

use crate::rng::epoch_permutation;

/// The samples of every step of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPlan {
    pub seed: u64,
    /// Images in the (limited) training set.
    pub dataset_size: u64,
    /// Samples per step over the whole group.
    pub global_batch: u64,
}

impl DataPlan {
    /// Steps per epoch (`drop_last`); 0 when the set is smaller than one global batch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.dataset_size
            .checked_div(self.global_batch)
            .unwrap_or(0)
    }

    /// Epoch of step `step`.
    pub fn epoch_of(&self, step: u64) -> u64 {
        step.checked_div(self.steps_per_epoch()).unwrap_or(0)
    }

    /// The global batch of step `step`, given its epoch's permutation (see [`Self::permutation`]).
    pub fn global_ids_in(&self, perm: &[u64], step: u64) -> Vec<u64> {
        let spe = self.steps_per_epoch().max(1);
        let i = (step % spe) as usize;
        let g = self.global_batch as usize;
        perm[i * g..(i + 1) * g].to_vec()
    }

    /// The seeded permutation of `epoch`.
    pub fn permutation(&self, epoch: u64) -> Vec<u64> {
        epoch_permutation(self.seed, epoch, self.dataset_size)
    }

    /// The global batch of step `step` (computes the epoch's permutation; cache it with
    /// [`Self::permutation`] + [`Self::global_ids_in`] in loops).
    pub fn global_ids(&self, step: u64) -> Vec<u64> {
        self.global_ids_in(&self.permutation(self.epoch_of(step)), step)
    }
}

/// Member `rank`'s share of a global batch in a group of `world`: entries `rank, rank + world, …`.
pub fn member_share(global: &[u64], world: usize, rank: usize) -> Vec<u64> {
    global
        .iter()
        .skip(rank)
        .step_by(world.max(1))
        .copied()
        .collect()
}

/// SHA-256 of a list of sample ids (little-endian u64s): what a step report carries so the
/// coordinator can check the samples against its own plan.
pub fn sample_digest(ids: &[u64]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_uses_each_sample_once_and_drops_the_remainder() {
        let plan = DataPlan {
            seed: 3,
            dataset_size: 103,
            global_batch: 10,
        };
        assert_eq!(plan.steps_per_epoch(), 10);
        for epoch in 0..3 {
            let mut seen: Vec<u64> = (0..10)
                .flat_map(|i| plan.global_ids(epoch * 10 + i))
                .collect();
            assert_eq!(seen.len(), 100);
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), 100, "epoch {epoch} repeats a sample");
        }
        assert_ne!(plan.global_ids(0), plan.global_ids(10), "epochs reshuffle");
    }

    #[test]
    fn shares_partition_the_global_batch_like_distributed_sampler() {
        let g: Vec<u64> = (100..112).collect();
        assert_eq!(member_share(&g, 3, 0), vec![100, 103, 106, 109]);
        assert_eq!(member_share(&g, 3, 2), vec![102, 105, 108, 111]);
        let mut all: Vec<u64> = (0..3).flat_map(|r| member_share(&g, 3, r)).collect();
        all.sort();
        assert_eq!(all, g);
        // Uneven shares when the world does not divide the batch.
        assert_eq!(member_share(&g[..11], 3, 2).len(), 3);
    }

    #[test]
    fn digests_tell_lists_apart() {
        assert_eq!(sample_digest(&[1, 2]), sample_digest(&[1, 2]));
        assert_ne!(sample_digest(&[1, 2]), sample_digest(&[2, 1]));
    }
}
