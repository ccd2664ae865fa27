//! Regroups of a running job and what they cost: why a group stopped ([`Regroup`]), and the
//! [`Recovery`] records of the job (reason, members before and after, where the new group
//! resumed from, steps redone, seconds from detection to the next committed step).
//!
//! A record opens when a live group is stopped, is completed when the next group forms
//! ([`complete_formation`]) and closes at that group's first committed step ([`close`]). The
//! time of detection lives in memory only (`JobEntry::recovering_since`): after a coordinator
//! restart mid-recovery the record keeps `seconds = -1`. Failures put the job in `RECOVERING`
//! until that first commit; a join is a planned regroup and shows as `RENDEZVOUS`.

use std::time::Instant;

use protodino_proto::v1::{Job, Recovery};

/// Records kept per job (oldest dropped first).
pub const MAX_RECORDS: usize = 100;

/// Why a live group stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regroup {
    /// A member's collective failed (`PEER_LOST`).
    PeerLost,
    /// A member cannot go on (`WORKER`).
    WorkerFailed,
    /// A member's heartbeats stopped.
    HeartbeatExpired,
    /// A member's session ended (idle, or registered again without it).
    Left,
    /// The members' replica hashes differ.
    ReplicaMismatch,
    /// Idle workers join a group below `max_world_size`.
    Joined,
}

impl Regroup {
    pub fn name(self) -> &'static str {
        match self {
            Regroup::PeerLost => "peer_lost",
            Regroup::WorkerFailed => "worker_failed",
            Regroup::HeartbeatExpired => "heartbeat_expired",
            Regroup::Left => "left",
            Regroup::ReplicaMismatch => "replica_mismatch",
            Regroup::Joined => "joined",
        }
    }

    pub const ALL: [Regroup; 6] = [
        Regroup::PeerLost,
        Regroup::WorkerFailed,
        Regroup::HeartbeatExpired,
        Regroup::Left,
        Regroup::ReplicaMismatch,
        Regroup::Joined,
    ];

    /// Failures make the job `RECOVERING`; a join does not.
    pub fn is_failure(self) -> bool {
        self != Regroup::Joined
    }
}

/// Opens a record for the stop of epoch `epoch` (members in rank order).
pub fn open(job: &mut Job, kind: Regroup, detail: &str, epoch: i64, members: &[String]) {
    job.recoveries.push(Recovery {
        reason: kind.name().into(),
        detail: detail.chars().take(512).collect(),
        epoch_before: epoch,
        members_before: members.to_vec(),
        seconds: -1.0,
        ..Default::default()
    });
    let excess = job.recoveries.len().saturating_sub(MAX_RECORDS);
    job.recoveries.drain(..excess);
}

/// Where a new group resumes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Replica,
    Checkpoint,
    Seed,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::Replica => "replica",
            Origin::Checkpoint => "checkpoint",
            Origin::Seed => "seed",
        }
    }
}

/// Fills the open record (if any) with the group that formed: `computed` is the highest step
/// any member of the old group reported (committed or not), `resume_step` where the new group
/// starts. Returns whether a record was open.
pub fn complete_formation(
    job: &mut Job,
    epoch: i64,
    members: &[String],
    origin: Origin,
    resume_step: u64,
    computed: u64,
) -> bool {
    let Some(r) = job.recoveries.last_mut().filter(|r| r.epoch_after == 0) else {
        return false;
    };
    r.epoch_after = epoch;
    r.members_after = members.to_vec();
    r.resumed_from = origin.name().into();
    r.resume_step = resume_step as i64;
    r.steps_redone = computed.saturating_sub(resume_step) as i64;
    true
}

/// Closes the newest record at the new group's first commit with the seconds since `since`
/// (the first detection of this recovery). Returns the record; `None` when no formed record is
/// open. (Records of a recovery interrupted by a coordinator restart are never closed: their
/// detection time is gone, and they keep `seconds = -1`.)
pub fn close(job: &mut Job, since: Instant, now: Instant) -> Option<Recovery> {
    let r = job
        .recoveries
        .last_mut()
        .filter(|r| r.epoch_after > 0 && r.seconds < 0.0)?;
    r.seconds = now.saturating_duration_since(since).as_secs_f64();
    Some(r.clone())
}

/// Counts of the recoveries for `/metrics`: regroups by reason (rebuilt from the records after
/// a restart), the seconds of the closed ones, and the seconds of every group's rendezvous (from
/// its formation to its first committed step, the first group of a job included); the
/// histograms count since the start only.
#[derive(Debug, Clone)]
pub struct RecoveryStats {
    pub by_reason: std::collections::BTreeMap<&'static str, u64>,
    pub seconds: prometheus_client::metrics::histogram::Histogram,
    pub rendezvous_seconds: prometheus_client::metrics::histogram::Histogram,
}

/// Buckets of `protodino_recovery_seconds`.
pub const SECONDS_BUCKETS: [f64; 10] = [0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0];

impl Default for RecoveryStats {
    fn default() -> Self {
        Self {
            by_reason: Regroup::ALL.iter().map(|r| (r.name(), 0)).collect(),
            seconds: prometheus_client::metrics::histogram::Histogram::new(SECONDS_BUCKETS),
            rendezvous_seconds: prometheus_client::metrics::histogram::Histogram::new(
                SECONDS_BUCKETS,
            ),
        }
    }
}

impl RecoveryStats {
    pub fn count(&mut self, reason: &str) {
        if let Some(n) = Regroup::ALL
            .iter()
            .find(|r| r.name() == reason)
            .and_then(|r| self.by_reason.get_mut(r.name()))
        {
            *n += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_record_opens_forms_and_closes() {
        let mut job = Job::default();
        let before = vec!["a".to_string(), "b".into(), "c".into()];
        open(&mut job, Regroup::PeerLost, "b lost a peer", 1, &before);
        assert_eq!(job.recoveries[0].seconds, -1.0);
        // Not formed yet: nothing to close.
        let t0 = Instant::now();
        assert!(close(&mut job, t0, t0).is_none());
        let after = vec!["a".to_string(), "c".into()];
        assert!(complete_formation(
            &mut job,
            2,
            &after,
            Origin::Replica,
            7,
            8
        ));
        let r = close(&mut job, t0, t0 + Duration::from_millis(1500)).unwrap();
        assert_eq!(r.reason, "peer_lost");
        assert_eq!((r.epoch_before, r.epoch_after), (1, 2));
        assert_eq!(r.members_after, after);
        assert_eq!((r.resumed_from.as_str(), r.resume_step), ("replica", 7));
        assert_eq!(r.steps_redone, 1);
        assert!((r.seconds - 1.5).abs() < 1e-9);
        // Closed once.
        assert!(close(&mut job, t0, t0 + Duration::from_secs(9)).is_none());
        // A formation without an open record changes nothing.
        assert!(!complete_formation(&mut job, 3, &after, Origin::Seed, 0, 0));
    }

    #[test]
    fn a_checkpoint_restart_redoes_the_steps_after_the_checkpoint() {
        let mut job = Job::default();
        open(&mut job, Regroup::HeartbeatExpired, "all lost", 2, &[]);
        complete_formation(&mut job, 3, &[], Origin::Checkpoint, 10, 14);
        assert_eq!(job.recoveries[0].steps_redone, 4);
    }

    #[test]
    fn only_the_newest_records_are_kept() {
        let mut job = Job::default();
        for e in 0..(MAX_RECORDS as i64 + 5) {
            open(&mut job, Regroup::Joined, "", e, &[]);
        }
        assert_eq!(job.recoveries.len(), MAX_RECORDS);
        assert_eq!(job.recoveries[0].epoch_before, 5);
        assert!(!Regroup::Joined.is_failure() && Regroup::Left.is_failure());
    }
}
