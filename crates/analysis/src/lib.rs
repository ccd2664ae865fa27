//! Prototype-collapse analysis and evaluation for protodino (docs/algorithm.md §3, §4). Works on
//! tensors only: the caller extracts features and logits with its models; this crate never
//! builds a network.
//!
//! Module map:
//! * [`prototypes`] — find a head's prototype layer (`…head.last_layer.weight_v` / `weight_g`)
//!   among named tensors or in a safetensors file; effective normalised prototypes and their
//!   norms (the vMF concentrations times τ).
//! * [`unique`] — unique-prototype counts over ε (greedy leader grouping and connected
//!   components), group assignments, nearest-neighbour statistics, KoLeo-proto value;
//!   blockwise, no K×K matrix.
//! * [`heads`] — the figures of one head in one call: unique counts, NN statistics and
//!   KoLeo-proto value, and the [`displacement`] from the head's initial prototypes
//!   (`1 − cos(μ_k(t), μ_k(0))`).
//! * [`sharpness`] — the teacher's mean per-sample target entropy against `ln K`.
//! * [`usage`] — streaming prototype-usage statistics over a data set: soft / hard / grouped
//!   MLCD, entropies and effective numbers of clusters, used clusters and groups.
//! * [`knn`] — weighted k-NN classification exactly as DINO's `eval_knn`.
//! * [`linear`] — linear probe on frozen features (SGD + momentum, cosine schedule).
//! * [`fewshot`] — MSN-style few-shot logistic regression over labelled subsets and seeds,
//!   solved by [`lbfgs`].
//! * [`report`] — what the CLI prints: [`report::prototype_report`], `Display` renderings,
//!   options from a `TrainConfig`.
//! * [`stats`], [`rng`] — entropy / quantile helpers and the seeded generator all random choices
//!   use; `error` — [`AnalysisError`].

pub mod displacement;
pub mod error;
pub mod fewshot;
pub mod heads;
pub mod knn;
pub mod lbfgs;
pub mod linear;
pub mod prototypes;
pub mod report;
pub mod rng;
pub mod sharpness;
pub mod stats;
mod union_find;
pub mod unique;
pub mod usage;

pub use displacement::{Displacement, displacement};
pub use error::{AnalysisError, Result};
pub use fewshot::{FewShotOptions, FewShotReport, fewshot_eval};
pub use heads::{HeadAnalysis, HeadFigures, analyze_head};
pub use knn::{KnnOptions, KnnReport, knn_classify};
pub use linear::{LinearProbeOptions, LinearProbeReport, linear_probe};
pub use prototypes::{Head, NormStats, PrototypeSource, Prototypes};
pub use report::{PrototypeReport, prototype_report, prototype_report_from_named};
pub use sharpness::Sharpness;
pub use unique::{UniqueAnalysis, UniqueCount, UniqueOptions, UniqueReport, analyze_unique};
pub use usage::{Assignment, Grouping, UsageAccumulator, UsageReport};
