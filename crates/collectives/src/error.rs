//! The one error type of the crate.
//!
//! Every failure of a collective is one of these variants, so the worker can tell a lost peer
//! (regroup) from a bug in the caller (mismatched calls, wrong lengths). After any error other than
//! [`CollectiveError::InvalidArgument`] the group is poisoned: every later call returns
//! [`CollectiveError::Poisoned`] and the group must be rebuilt.

use std::time::Duration;

/// Result alias used throughout the crate.
pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// Why a collective (or building a group) failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The caller passed something inconsistent (lengths, ranks, an empty peer list). The group is
    /// not poisoned by this: nothing was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The peer closed its connection or reset it (it died or gave up after its own error).
    #[error("peer rank {rank} disconnected during {during}")]
    PeerLost { rank: usize, during: &'static str },
    /// No byte moved for the whole progress deadline (a hung or stopped peer).
    #[error("no progress for {timeout:?} during {during} (peer hung or too slow)")]
    Timeout {
        timeout: Duration,
        during: &'static str,
    },
    /// The peers entered different collectives (or the same one with different shapes).
    #[error("mismatched collective: this rank expected {expected}, peer rank {rank} sent {got}")]
    Mismatch {
        rank: usize,
        expected: String,
        got: String,
    },
    /// A peer broke the wire protocol (bad magic, data where none was due).
    #[error("protocol error from peer rank {rank}: {detail}")]
    Protocol { rank: usize, detail: String },
    /// The handshake failed: the other side did not prove the group secret, or claimed a rank
    /// that is not the expected neighbour.
    #[error("authentication failed with {peer}: {detail}")]
    Auth { peer: String, detail: String },
    /// The group could not be formed before the connect deadline.
    #[error("could not form the group: {0}")]
    Connect(String),
    /// An earlier error left this group unusable; build a new one.
    #[error("group is poisoned by an earlier error; rebuild it")]
    Poisoned,
    /// The broadcast source or sink (the caller's reader/writer) failed.
    #[error("broadcast stream: {0}")]
    Stream(#[source] std::io::Error),
    /// An operating-system error on a socket.
    #[error("socket error with peer rank {rank}: {source}")]
    Io {
        rank: usize,
        #[source]
        source: std::io::Error,
    },
    /// NCCL or the CUDA driver reported an error (code formatted, since cudarc prints only a name).
    #[error("nccl: {0}")]
    Nccl(String),
    /// The NCCL or CUDA library is not installed on this machine.
    #[error("nccl backend unavailable: {0}")]
    Unavailable(String),
}

impl CollectiveError {
    /// True for the errors that a missing, dead or hung peer causes: the signal to regroup.
    pub fn is_peer_failure(&self) -> bool {
        matches!(
            self,
            Self::PeerLost { .. } | Self::Timeout { .. } | Self::Io { .. } | Self::Nccl(_)
        )
    }
}
