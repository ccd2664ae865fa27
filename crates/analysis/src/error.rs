//! The one error type of this crate: every fallible analysis returns [`AnalysisError`].

use std::path::PathBuf;

/// Errors of the collapse analysis and the evaluations.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// libtorch refused an operation (shape mismatch, bad file, out of memory…).
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
    /// A weights file could not be read.
    #[error("cannot read weights from {path}: {reason}")]
    ReadWeights { path: PathBuf, reason: String },
    /// No tensor named `…head.last_layer.weight_v` for the requested head.
    #[error(
        "no prototype layer for the {head} head (looked for `[module.]{head}.[module.]head.last_layer.weight_v` or a bare `head.last_layer.weight_v`); prototype layers present: [{available}]"
    )]
    NoPrototypeLayer { head: String, available: String },
    /// More than one candidate layer matched and the choice would be a guess.
    #[error("ambiguous prototype layer for the {head} head: [{candidates}]")]
    AmbiguousPrototypeLayer { head: String, candidates: String },
    /// A tensor has the wrong rank, size or dtype for what it is used for.
    #[error("bad shape: {0}")]
    Shape(String),
    /// An argument is out of its valid range (ε ≤ 0, k = 0, empty data, …).
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument { name: &'static str, reason: String },
    /// A label is negative or not an integer class index.
    #[error("invalid labels: {0}")]
    Labels(String),
}

impl AnalysisError {
    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        AnalysisError::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = AnalysisError> = std::result::Result<T, E>;
