//! The `Assignment` every member of a new group receives in its next heartbeat response.
//!
//! All members get the same membership epoch, peers (collective addresses in rank order),
//! group secret, plan and resume point; only `rank` differs.
//!
//! `nccl_unique_id` is always empty, CUDA groups included: a unique id is made by NCCL itself
//! (`ncclGetUniqueId`) on the process that will be rank 0, and the coordinator neither links
//! NCCL nor runs on a GPU host. Rank 0 of a CUDA group generates it and broadcasts it to the
//! others over the TCP ring that every group forms first (authenticated by the group secret),
//! which is also what a re-formed group needs after a communicator abort.

use protodino_proto::v1::{Assignment, Job};

use crate::core::ledger::{Ledger, Membership};

/// The assignments of `m`, by rank. `peers` are the members' collective addresses in rank
/// order.
pub fn assignments(
    job: &Job,
    ledger: &Ledger,
    m: &Membership,
    peers: &[String],
    secret: &[u8; 32],
    hash_every_steps: i64,
    replicas_in_sync: bool,
) -> Vec<Assignment> {
    (0..m.members.len())
        .map(|rank| Assignment {
            job_id: job.job_id.clone(),
            membership_epoch: m.epoch,
            rank: rank as i32,
            world_size: m.members.len() as i32,
            peers: peers.to_vec(),
            nccl_unique_id: Vec::new(),
            group_secret: secret.to_vec(),
            spec: job.spec.clone(),
            resume_step: m.resume_step as i64,
            state_source_rank: m.source_rank as i32,
            resolved_config: job.resolved_config.clone(),
            total_steps: ledger.plan.total_steps as i64,
            dataset_size: ledger.plan.dataset_size as i64,
            global_batch: ledger.plan.global_batch as i64,
            hash_every_steps: hash_every_steps.max(0),
            checkpoint_dir: ledger.checkpoint_dir.clone(),
            resume_from_checkpoint: m.resume_from_checkpoint,
            replicas_in_sync,
        })
        .collect()
}
