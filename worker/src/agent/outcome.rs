//! How a session ends, and the one place where errors become outcomes: a lost or hung peer is
//! `PeerLost` (the coordinator regroups), a problem of the job itself (a non-finite loss, data
//! that does not match the plan) fails the job, anything else fails this worker. The failure
//! report a session sends is built from its outcome here too.

use protodino_collectives::CollectiveError;
use protodino_proto::v1::FailureKind;

use crate::train::LoopError;
use crate::train::step_loop::describe_non_finite;

/// Whose fault a failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureScope {
    /// The job cannot go on anywhere (non-finite loss, bad configuration or data).
    Job,
    /// This worker cannot go on (a broken device, a missing file, a bug).
    Worker,
}

/// How one session (one assignment) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The planned last step is done (rank 0 has sent the result).
    Finished,
    /// The group voted to stop (cancel, regroup, a new assignment) after the same step.
    Stopped,
    /// A member of the group died, hung or never came; `rank` when the error names it.
    PeerLost {
        rank: Option<usize>,
        reason: String,
    },
    Failed {
        scope: FailureScope,
        reason: String,
    },
}

impl Outcome {
    pub fn job(reason: impl Into<String>) -> Self {
        Self::Failed {
            scope: FailureScope::Job,
            reason: reason.into(),
        }
    }

    pub fn worker(reason: impl Into<String>) -> Self {
        Self::Failed {
            scope: FailureScope::Worker,
            reason: reason.into(),
        }
    }

    /// A collective failure while `during`: the peer's fault when a peer died, hung or could
    /// not be reached (forming the group included), else this worker's.
    pub fn collective(during: &str, e: &CollectiveError) -> Self {
        let peer = e.is_peer_failure()
            || matches!(
                e,
                CollectiveError::Connect(_) | CollectiveError::Auth { .. }
            );
        let reason = format!("{during}: {e}");
        if peer {
            Self::PeerLost {
                rank: named_rank(e),
                reason,
            }
        } else {
            Self::worker(reason)
        }
    }

    /// A failed step loop, and whether the replica is still whole.
    pub fn from_loop(e: &LoopError) -> (Self, bool) {
        match e {
            LoopError::NonFinite(n) => (Self::job(describe_non_finite(n)), true),
            LoopError::Collective {
                during,
                source,
                replica_valid,
            } => (Self::collective(during, source), *replica_valid),
            LoopError::Other(e) => (Self::worker(format!("{e:#}")), false),
        }
    }

    /// The failure report's kind and reason (None for the ends that report nothing).
    pub fn failure(&self) -> Option<(FailureKind, &str)> {
        match self {
            Self::Finished | Self::Stopped => None,
            Self::PeerLost { reason, .. } => Some((FailureKind::PeerLost, reason)),
            Self::Failed { scope, reason } => Some((
                match scope {
                    FailureScope::Job => FailureKind::Job,
                    FailureScope::Worker => FailureKind::Worker,
                },
                reason,
            )),
        }
    }
}

fn named_rank(e: &CollectiveError) -> Option<usize> {
    match e {
        CollectiveError::PeerLost { rank, .. }
        | CollectiveError::Io { rank, .. }
        | CollectiveError::Mismatch { rank, .. }
        | CollectiveError::Protocol { rank, .. } => Some(*rank),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn peers_are_told_from_bugs_and_failures_map_to_kinds() {
        let lost = CollectiveError::PeerLost {
            rank: 1,
            during: "all_reduce",
        };
        let (o, valid) = Outcome::from_loop(&LoopError::Collective {
            during: "gradient all-reduce",
            source: lost,
            replica_valid: true,
        });
        assert!(valid);
        assert!(
            matches!(o, Outcome::PeerLost { rank: Some(1), .. }),
            "{o:?}"
        );
        assert_eq!(o.failure().map(|f| f.0), Some(FailureKind::PeerLost));

        let hung = CollectiveError::Timeout {
            timeout: Duration::from_secs(10),
            during: "all_reduce",
        };
        let (o, valid) = Outcome::from_loop(&LoopError::Collective {
            during: "centre all-reduce",
            source: hung,
            replica_valid: false,
        });
        assert!(!valid, "failed after the optimiser step");
        assert!(matches!(o, Outcome::PeerLost { rank: None, .. }));

        let bug = CollectiveError::InvalidArgument("lengths".into());
        assert!(matches!(
            Outcome::collective("x", &bug),
            Outcome::Failed {
                scope: FailureScope::Worker,
                ..
            }
        ));
        let never = CollectiveError::Connect("rank 1 did not connect in time".into());
        assert!(matches!(
            Outcome::collective("forming the group", &never),
            Outcome::PeerLost { .. }
        ));
        assert_eq!(Outcome::Stopped.failure(), None);
        assert_eq!(
            Outcome::job("bad data").failure(),
            Some((FailureKind::Job, "bad data"))
        );
    }
}
