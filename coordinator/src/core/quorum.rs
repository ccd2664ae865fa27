//! Which idle workers form a job's next group, at which world size, and whose state the others
//! receive. Pure functions over a list of candidates: no pool, no clock.
//!
//! - World size: the largest `W` in `[min_world_size, min(max_world_size, idle)]` that divides
//!   the global batch (every member then takes `G / W` samples a step; uneven shares are the
//!   fault-tolerance work).
//! - Source: a *valid* replica is one of this job at the watermark with a hash. Valid replicas
//!   are grouped by hash; the largest class wins (ties: the class holding the lowest old rank),
//!   and its member with the lowest old rank is the source. Without a valid replica the group
//!   starts from rank 0 (from the seed, or from a checkpoint; the caller decides).
//! - Order: valid replicas of the winning class by old rank, then other valid replicas, then
//!   workers without a replica of this job, then workers holding another job's replica (taking
//!   those destroys a replica someone else may need, so they come last). The source is therefore
//!   rank 0 whenever a replica survives, and old rank 0 keeps rank 0 when it is in the majority.

use std::collections::BTreeMap;

/// What an idle worker holds, as far as this job is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holding {
    /// A replica of this job at the watermark, with its hash.
    Valid(Vec<u8>),
    /// Nothing usable for this job (no replica, or one of this job that is not at the watermark).
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
    /// Whether the source holds a valid replica (else the group starts from rank 0's own state).
    pub from_replica: bool,
}

/// The world size to form with `idle` workers, or why none.
pub fn world_size(min: i32, max: i32, global_batch: u64, idle: usize) -> Result<usize, String> {
    let min = min.max(1) as usize;
    let max = max.max(1) as usize;
    if idle < min {
        return Err(format!("waiting for workers: {idle} idle, needs {min}"));
    }
    let top = max.min(idle);
    (min..=top)
        .rev()
        .find(|w| global_batch.is_multiple_of(*w as u64))
        .ok_or_else(|| {
            format!(
                "waiting for workers: {idle} idle, but no world size in [{min}, {top}] divides \
                 the global batch {global_batch}"
            )
        })
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

    // The winning class of equal hashes.
    let mut classes: BTreeMap<&[u8], Vec<&Candidate>> = BTreeMap::new();
    for c in &candidates {
        if let Holding::Valid(h) = &c.holding {
            classes.entry(h.as_slice()).or_default().push(c);
        }
    }
    let winner: Option<Vec<u8>> = classes
        .iter()
        .min_by_key(|(_, cs)| {
            let lowest = cs.iter().map(|c| (old(c), c.id.clone())).min();
            (std::cmp::Reverse(cs.len()), lowest)
        })
        .map(|(h, _)| h.to_vec());

    let tier = |c: &Candidate| match (&c.holding, &winner) {
        (Holding::Valid(h), Some(win)) if h == win => 0,
        (Holding::Valid(_), _) => 1,
        (Holding::Nothing, _) => 2,
        (Holding::Other, _) => 3,
    };
    let mut ordered = candidates;
    ordered.sort_by(|a, b| (tier(a), old(a), &a.id).cmp(&(tier(b), old(b), &b.id)));
    ordered.truncate(w);
    Ok(Quorum {
        from_replica: winner.is_some(),
        source_rank: 0,
        members: ordered.into_iter().map(|c| c.id).collect(),
    })
}
