//! The error type of the DINO library.
//!
//! One enum for the crate: shape / configuration mistakes, checkpoint and batch-file problems,
//! collective (all-reduce) failures reported by a [`crate::Reducer`] — kept typed, so a caller can
//! tell a lost peer ([`protodino_collectives::CollectiveError::is_peer_failure`], regroup) from a
//! bug — and the non-finite-loss abort of a training step, which carries everything needed to
//! replay the step.

use std::path::PathBuf;

/// What went wrong when a step's loss was not finite (docs/algorithm.md §1.8 step 3).
///
/// The trainer's state is left exactly as it was before the step (nothing is updated before the
/// check), so the step can be replayed from the files named here.
#[derive(Debug, Clone, PartialEq)]
pub struct NonFiniteLoss {
    /// Global iteration index of the failed step.
    pub step: i64,
    pub epoch: i64,
    pub dino_loss: f64,
    pub koleo_proto: f64,
    pub total: f64,
    /// Checkpoint of the state before the step, when the trainer had a failure directory.
    pub checkpoint: Option<PathBuf>,
    /// Batch file of the step (`global_crops`, `local_crops`, schedule values in the metadata).
    pub batch: Option<PathBuf>,
}

/// Errors of the DINO library.
#[derive(Debug, thiserror::Error)]
pub enum DinoError {
    /// A tensor had a shape the operation cannot use.
    #[error("shape: {0}")]
    Shape(String),
    /// A configuration value the library cannot run with.
    #[error("configuration: {0}")]
    Config(String),
    /// libtorch raised an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint or batch file lacks a tensor, has a wrong shape, or bad metadata.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// The model-weights layer (safetensors reading and writing) failed.
    #[error("weights: {0}")]
    Weights(String),
    /// A collective operation failed (peer lost, timeout, mismatched call, ...).
    #[error("collective: {0}")]
    Collective(#[from] protodino_collectives::CollectiveError),
    /// The loss of a step was NaN or infinite; the step was not applied.
    #[error(
        "non-finite loss at step {} (epoch {}): dino {} koleo_proto {} total {}",
        .0.step, .0.epoch, .0.dino_loss, .0.koleo_proto, .0.total
    )]
    NonFiniteLoss(Box<NonFiniteLoss>),
}

impl DinoError {
    /// True when a collective failed because a peer died, hung or disconnected: the group must
    /// be re-formed, and nothing is wrong with this process or its inputs.
    pub fn is_peer_failure(&self) -> bool {
        matches!(self, DinoError::Collective(e) if e.is_peer_failure())
    }

    pub(crate) fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        DinoError::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = DinoError> = std::result::Result<T, E>;
