//! protodino data pipeline: image records in, the crops of one DINO step out.
//!
//! Module map (data flows top to bottom):
//! * [`dataset`] — the `Dataset` trait (records by sample id), decoding, skipped records.
//! * [`folder`] — ImageFolder trees and file lists (ImageNet text lists, iNaturalist-2018 JSON).
//! * [`shard`] (+ [`crc32`]) — the packed shard format, its writer/converter and reader.
//! * [`idx`] — MNIST/Fashion-MNIST IDX files → shards; [`longtail`] — the long-tailed subset.
//! * [`open`] — opening what a `DataConfig` names; provisioned default locations.
//! * [`rng`] — counter-based randomness from (seed, epoch, sample id); `epoch_permutation`.
//! * [`plan`] — a job's data plan: the samples of every step, members' shares, sample digests.
//! * [`image`] — the 8-bit RGB image and the final normalisation.
//! * [`resample`] — crop + bicubic resize in one pass, bit-exact with Pillow.
//! * [`color`], [`blur`] — photometric transforms with torchvision/Pillow semantics;
//!   `simd` compiles their hot loops a second time for AVX2 (chosen at run time).
//! * [`augment`] — DINO's per-crop parameter sampling and application; the eval transform.
//! * [`multicrop`] — `MultiCropBatch` and filling one batch on a thread pool.
//! * [`eval`] — `[N, 3, S, S]` evaluation batches for k-NN features.
//! * [`loader`] — the `Loader` the worker drives: thread pool + bounded prefetch queue.
//!
//! The crate is free of libtorch on purpose: it builds fast and hands the worker contiguous
//! `f32` buffers in the layout DINO's multi-crop wrapper uses.

pub mod augment;
pub mod blur;
pub mod color;
pub mod crc32;
pub mod dataset;
pub mod error;
pub mod eval;
pub mod folder;
pub mod idx;
pub mod image;
pub mod loader;
pub mod longtail;
pub mod multicrop;
pub mod open;
pub mod plan;
pub mod resample;
pub mod rng;
pub mod shard;
mod simd;

pub use dataset::{
    Dataset, DecodeError, Location, Record, RecordError, RecordKind, SharedDataset, SkippedRecord,
};
pub use error::DataError;
pub use eval::EvalBatch;
pub use loader::{EpochStream, Loader};
pub use multicrop::{MultiCrop, MultiCropBatch};
pub use open::{open_dataset, open_eval, open_train, resolve_data_path};
pub use plan::{DataPlan, member_share, sample_digest};
pub use rng::{CounterRng, epoch_permutation};
