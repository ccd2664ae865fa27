//! The partial-prototype-collapse mechanism experiment (docs/mechanism.md): a DINO head trained
//! alone on frozen features, with the product's loss, centring, KoLeo-proto, AdamW, schedules and
//! EMA teacher, and the product's collapse analysis of both heads. With the representation
//! frozen, the only way to match DINO's uniform marginal is through the prototypes themselves —
//! the setting in which the paper argues that duplicating prototypes is a shortcut.
//!
//! Module map:
//! * [`features`] — a set of frozen features with two views per sample; its safetensors cache.
//! * [`synthetic`] — clustered features on the sphere (balanced or long-tailed), noisy views.
//! * [`encoder`] — real features: Fashion-MNIST global crops through a protodino backbone
//!   (a checkpoint's, or a seeded random one).
//! * [`network`] — the product's `DinoHead` on features as a `DinoNetwork`, and the packing of
//!   features into the step's batch.
//! * [`experiment`] — options → product configuration, the training loop, the analyses, the
//!   JSON record.
//! * [`table`] — the short table the binary prints.

pub mod encoder;
pub mod experiment;
pub mod features;
pub mod network;
pub mod synthetic;
pub mod table;

pub use experiment::{AnalysisRecord, MechanismOptions, MechanismRecord, run};
pub use features::{FeatureInfo, FeatureSet};
