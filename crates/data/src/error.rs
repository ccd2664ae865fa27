//! The crate's error type for everything that is fatal (configuration, opening a data set,
//! starting threads). Per-record problems are not errors of this kind: they are
//! [`crate::SkippedRecord`]s, reported in the batch.

use crate::folder::FolderError;
use crate::idx::IdxError;
use crate::shard::ShardError;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("invalid data/crops configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Folder(#[from] FolderError),
    #[error(transparent)]
    Idx(#[from] IdxError),
    #[error("could not start the data threads: {0}")]
    Threads(String),
}
