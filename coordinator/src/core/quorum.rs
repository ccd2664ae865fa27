//! Which idle workers form a job's next group, at which world size, and whose state the others
//! receive. Pure functions over a list of candidates: no pool, no clock.
//!
//! - World size: the largest `W` in `[min_world_size, min(max_world_size, idle, G)]`. Member
//!   `r` takes entries `r, r + W, …` of the global batch of `G`, so shares differ by at most one
//!   sample; the step weights each member's gradients by its share.
//! - Source: a *valid* replica is one of this job at or past the watermark with a hash. Valid
//!   replicas are grouped by (step, hash); the newest step wins, then the largest class (ties:
//!   the class holding the lowest old rank), and its member with the lowest old rank is the
//!   source. Without a valid replica the group
//!   starts from rank 0 (from the seed, or from a checkpoint; the caller decides).
//! - Order: valid replicas of the winning class by old rank, then other valid replicas, then
//!   workers without a replica of this job, then workers holding another job's replica (taking
//!   those destroys a replica someone else may need, so they come last). The source is therefore
//!   rank 0 whenever a replica survives, and old rank 0 keeps rank 0 when it is in the majority.

use std::collections::BTreeMap;

/// What an idle worker holds, as far as this job is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holding {
    /// A replica of this job at or past the watermark, with its hash. A replica past the
    /// watermark completed steps whose reports did not all arrive (a member died between its
    /// gradient all-reduce and its report): every member contributed to those steps, so they
    /// are done, and the newest replica is the group's state.
    Valid { step: u64, hash: Vec<u8> },
    /// Nothing usable for this job (no replica, or one of this job behind the watermark).
    Nothing,
    /// A replica of another, unfinished job.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    /// Rank in the job's previous membership, if the worker was in it.
    pub old_rank: Option<usize>,
    pub holding: Holding,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quorum {
    /// Worker ids in rank order.
    pub members: Vec<String>,
    pub source_rank: usize,
    /// The step of the source's valid replica (`None`: the group starts from rank 0's own
    /// state, a checkpoint or the seed).
    pub source_step: Option<u64>,
    /// Every member holds the source's (step, hash): no state needs to move.
    pub in_sync: bool,
}

/// The world size to form with `idle` workers, or why none: as many as allowed, at most one
/// per sample of the global batch.
pub fn world_size(min: i32, max: i32, global_batch: u64, idle: usize) -> Result<usize, String> {
    let min = min.max(1) as usize;
    let max = (max.max(1) as usize).min(global_batch.max(1) as usize);
    if idle < min {
        return Err(format!("waiting for workers: {idle} idle, needs {min}"));
    }
    if max < min {
        return Err(format!(
            "no group can form: the global batch {global_batch} is smaller than min_world_size \
             {min}"
        ));
    }
    Ok(max.min(idle))
}

/// Choose the group, or say why it cannot form.
pub fn choose(
    min: i32,
    max: i32,
    global_batch: u64,
    candidates: Vec<Candidate>,
) -> Result<Quorum, String> {
    let w = world_size(min, max, global_batch, candidates.len())?;
    let old = |c: &Candidate| c.old_rank.unwrap_or(usize::MAX);

    // The winning class of equal (step, hash): the newest step, then the most members.
    let mut classes: BTreeMap<(u64, &[u8]), Vec<&Candidate>> = BTreeMap::new();
    for c in &candidates {
        if let Holding::Valid { step, hash } = &c.holding {
            classes.entry((*step, hash.as_slice())).or_default().push(c);
        }
    }
    let winner: Option<(u64, Vec<u8>)> = classes
        .iter()
        .min_by_key(|((step, _), cs)| {
            let lowest = cs.iter().map(|c| (old(c), c.id.clone())).min();
            (
                std::cmp::Reverse(*step),
                std::cmp::Reverse(cs.len()),
                lowest,
            )
        })
        .map(|((step, h), _)| (*step, h.to_vec()));

    let tier = |c: &Candidate| match (&c.holding, &winner) {
        (Holding::Valid { step, hash }, Some((ws, wh))) if step == ws && hash == wh => 0,
        (Holding::Valid { .. }, _) => 1,
        (Holding::Nothing, _) => 2,
        (Holding::Other, _) => 3,
    };
    let mut ordered = candidates;
    ordered.sort_by(|a, b| (tier(a), old(a), &a.id).cmp(&(tier(b), old(b), &b.id)));
    ordered.truncate(w);
    let in_sync = winner.is_some() && ordered.iter().all(|c| tier(c) == 0);
    Ok(Quorum {
        in_sync,
        source_step: winner.map(|(step, _)| step),
        source_rank: 0,
        members: ordered.into_iter().map(|c| c.id).collect(),
    })
}
