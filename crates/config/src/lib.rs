//! Training configuration for protodino.
//!
//! One typed tree ([`TrainConfig`]) describes a DINO + KoLeo-proto run: the backbone, the
//! projection head, the loss temperatures, centring and objective (DINO or iBOT, with iBOT's
//! masking and patch-head knobs in [`IbotConfig`]), KoLeo-proto, the optimiser and its
//! schedules, the multi-crop augmentation, the data set, and the run itself.
//!
//! Layers, later ones winning (docs/algorithm.md §1.9 for the numbers):
//! 1. `configs/default.toml` — the official DINO *code defaults*, compiled into this crate so the
//!    file in the repository is the single source of truth;
//! 2. zero or more TOML files given by the user (presets such as `configs/cpu-demo.toml`);
//! 3. environment variables `PROTODINO__SECTION__KEY=value` (e.g. `PROTODINO__OPTIM__LR=1e-3`;
//!    lists are comma separated).
//!
//! Every struct denies unknown fields, so a typo in a file or a variable is an error that names
//! the key, never a silently ignored setting. [`TrainConfig::validate`] then checks bounds and
//! cross-field rules and names the offending field (`optim.lr`, `crops.local_crops_number`, …);
//! the coordinator reuses it to reject job specs with `INVALID_ARGUMENT`.

use std::path::Path;

use serde::{Deserialize, Serialize};

mod validate;

pub use validate::FieldError;

/// The defaults file, embedded at build time.
pub const DEFAULT_TOML: &str = include_str!("../../../configs/default.toml");

/// Prefix of environment overrides: `PROTODINO__OPTIM__LR=1e-3`.
pub const ENV_PREFIX: &str = "PROTODINO";

/// Errors while loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file is missing, not TOML, or has a key or value of the wrong type / unknown name.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// The values parsed but break a bound or a rule.
    #[error(transparent)]
    Invalid(#[from] FieldError),
}

/// The whole configuration of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub head: HeadConfig,
    pub loss: LossConfig,
    pub koleo: KoleoConfig,
    pub optim: OptimConfig,
    pub crops: CropsConfig,
    pub data: DataConfig,
    pub train: RunConfig,
    pub eval: EvalConfig,
    /// iBOT's masked-patch objective (`loss.objective = "ibot"`); ignored for DINO. Every key
    /// has iBOT's official code default, so the section may be left out or given in part.
    #[serde(default)]
    pub ibot: IbotConfig,
}

/// Backbone architecture names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    VitTiny,
    VitSmall,
    VitBase,
    Resnet18,
    Resnet50,
}

impl Arch {
    pub fn is_vit(self) -> bool {
        matches!(self, Arch::VitTiny | Arch::VitSmall | Arch::VitBase)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    /// ViT patch size (16 or 8 for the official models; 4 for 32 px small-image variants).
    pub patch_size: i64,
    /// Image size the position embedding is created for (224 official; 32–96 for small data).
    pub img_size: i64,
    /// Stochastic-depth rate of the last student block (linearly increasing from 0). Teacher: 0.
    pub drop_path_rate: f64,
    /// ResNet only: CIFAR-style stem (3×3 stride-1 conv, no max-pool) for 32–96 px inputs.
    pub small_input_stem: bool,
    /// ViT only: number of blocks; 0 = the architecture's (12). Fewer blocks make the
    /// small-image variants that train on two CPU cores.
    pub depth: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// K, the number of prototypes.
    pub out_dim: i64,
    pub hidden_dim: i64,
    pub bottleneck_dim: i64,
    pub nlayers: i64,
    pub use_bn: bool,
    /// Freeze `weight_g` at 1 (unit-norm prototypes) in the student.
    pub norm_last_layer: bool,
    /// How the prototypes enter the logits: `normalised` (DINO: the plain dot product) or `vmf`
    /// (DINO-vMF: each prototype is a von Mises–Fisher component, `κ_k = ‖w_k‖/τ`, and the
    /// logits get `log C_d(κ_k)`; needs `norm_last_layer = false`). docs/algorithm.md §1.10.
    #[serde(default)]
    pub prototypes: PrototypeKind,
}

/// `head.prototypes`: how the prototype layer's rows are read (docs/algorithm.md §1.10).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrototypeKind {
    /// DINO: logits are `w_k·y` (unit-norm rows when `norm_last_layer`).
    #[default]
    Normalised,
    /// DINO-vMF: unnormalised rows read as vMF components, with the log-normaliser
    /// `log C_d(‖w_k‖/τ)` added to the logits at each temperature τ.
    Vmf,
}

impl PrototypeKind {
    /// Every configuration name.
    pub const NAMES: &'static [&'static str] = &["normalised", "vmf"];

    /// The configuration name (`normalised`, `vmf`).
    pub fn name(self) -> &'static str {
        match self {
            PrototypeKind::Normalised => "normalised",
            PrototypeKind::Vmf => "vmf",
        }
    }

    /// The variant of a configuration name.
    pub fn from_name(s: &str) -> Option<Self> {
        [PrototypeKind::Normalised, PrototypeKind::Vmf]
            .into_iter()
            .find(|v| v.name() == s)
    }
}

impl<'de> Deserialize<'de> for PrototypeKind {
    /// From its name; any other is an error listing the names (the loader adds the key).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_name(&s).ok_or_else(|| serde::de::Error::unknown_variant(&s, Self::NAMES))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    pub student_temp: f64,
    pub teacher_temp: f64,
    pub warmup_teacher_temp: f64,
    pub warmup_teacher_temp_epochs: i64,
    pub center_momentum: f64,
    /// How the teacher's targets are centred: `ema` (DINO: an EMA centre subtracted from the
    /// logits) or `sinkhorn` (DINOv2's three Sinkhorn-Knopp iterations over the global batch).
    /// docs/algorithm.md §1.6.
    #[serde(default)]
    pub centering: Centering,
    /// What is trained: `dino` (the CLS objective) or `ibot` (DINO's CLS objective plus iBOT's
    /// masked-patch objective, configured in `[ibot]`). docs/algorithm.md §5.
    #[serde(default)]
    pub objective: Objective,
}

/// `loss.objective`: the self-supervised objective (docs/algorithm.md §5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// DINO: cross-entropy between the teacher's and the student's CLS outputs.
    #[default]
    Dino,
    /// iBOT: DINO's CLS term plus the masked-patch term (student sees masked global crops).
    Ibot,
}

impl Objective {
    /// Every configuration name.
    pub const NAMES: &'static [&'static str] = &["dino", "ibot"];

    /// The configuration name (`dino`, `ibot`).
    pub fn name(self) -> &'static str {
        match self {
            Objective::Dino => "dino",
            Objective::Ibot => "ibot",
        }
    }

    /// The variant of a configuration name.
    pub fn from_name(s: &str) -> Option<Self> {
        [Objective::Dino, Objective::Ibot]
            .into_iter()
            .find(|v| v.name() == s)
    }
}

impl<'de> Deserialize<'de> for Objective {
    /// From its name; any other is an error listing the names (the loader adds the key).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_name(&s).ok_or_else(|| serde::de::Error::unknown_variant(&s, Self::NAMES))
    }
}

/// `ibot.pred_shape`: the shape of iBOT's masks (docs/algorithm.md §5.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PredShape {
    /// BEiT-style blockwise masking: rectangles of random area and aspect ratio.
    #[default]
    Block,
    /// `int(r·h·w)` patches chosen uniformly at random.
    Rand,
}

impl PredShape {
    /// Every configuration name.
    pub const NAMES: &'static [&'static str] = &["block", "rand"];

    /// The configuration name (`block`, `rand`).
    pub fn name(self) -> &'static str {
        match self {
            PredShape::Block => "block",
            PredShape::Rand => "rand",
        }
    }

    /// The variant of a configuration name.
    pub fn from_name(s: &str) -> Option<Self> {
        [PredShape::Block, PredShape::Rand]
            .into_iter()
            .find(|v| v.name() == s)
    }
}

impl<'de> Deserialize<'de> for PredShape {
    /// From its name; any other is an error listing the names (the loader adds the key).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_name(&s).ok_or_else(|| serde::de::Error::unknown_variant(&s, Self::NAMES))
    }
}

/// A number or a list of numbers (iBOT's `nargs='+'` arguments); always held as a list.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(f64),
        Many(Vec<f64>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(v) => vec![v],
        OneOrMany::Many(v) => v,
    })
}

/// iBOT's knobs (`main_ibot.py` arguments), with the official code defaults
/// (docs/algorithm.md §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IbotConfig {
    /// Masked share of a global crop's patches: one value, or several of which each image
    /// picks one uniformly (official `--pred_ratio 0 0.3`: half of the images unmasked).
    #[serde(deserialize_with = "one_or_many")]
    pub pred_ratio: Vec<f64>,
    /// Half-width of the uniform jitter of each `pred_ratio` entry (one value for all, or
    /// one per entry); 0 keeps the entry exact.
    #[serde(deserialize_with = "one_or_many")]
    pub pred_ratio_var: Vec<f64>,
    /// Aspect-ratio range of the blocks of blockwise masking (drawn log-uniformly).
    pub pred_aspect_ratio: [f64; 2],
    pub pred_shape: PredShape,
    /// Epochs before masking starts (no patch is masked before it; the patch teacher
    /// temperature's warm-up is delayed by as much).
    pub pred_start_epoch: i64,
    /// K₂, the patch head's prototypes (ignored with a shared head, which uses `head.out_dim`).
    pub patch_out_dim: i64,
    /// The student's patch tokens use the CLS prototype layer (`last_layer`) instead of their
    /// own `last_layer2`.
    pub shared_head: bool,
    /// The same for the teacher.
    pub shared_head_teacher: bool,
    /// Teacher temperature of the patch targets after the warm-up.
    pub teacher_patch_temp: f64,
    /// ... and at the start of its warm-up (over `loss.warmup_teacher_temp_epochs`).
    pub warmup_teacher_patch_temp: f64,
    /// EMA momentum of the patch centre `center2`.
    pub center_momentum2: f64,
    /// Weight of the CLS term.
    pub lambda1: f64,
    /// Weight of the masked-patch term.
    pub lambda2: f64,
}

impl Default for IbotConfig {
    /// The defaults of `main_ibot.py`.
    fn default() -> Self {
        IbotConfig {
            pred_ratio: vec![0.3],
            pred_ratio_var: vec![0.0],
            pred_aspect_ratio: [0.3, 1.0 / 0.3],
            pred_shape: PredShape::Block,
            pred_start_epoch: 0,
            patch_out_dim: 8192,
            shared_head: false,
            shared_head_teacher: true,
            teacher_patch_temp: 0.07,
            warmup_teacher_patch_temp: 0.04,
            center_momentum2: 0.9,
            lambda1: 1.0,
            lambda2: 1.0,
        }
    }
}

impl IbotConfig {
    /// K₂ of the student's patch logits (`head.out_dim` when the head is shared).
    pub fn student_patch_dim(&self, out_dim: i64) -> i64 {
        if self.shared_head {
            out_dim
        } else {
            self.patch_out_dim
        }
    }

    /// The `pred_ratio_var` of every `pred_ratio` entry (one value is broadcast).
    pub fn ratio_vars(&self) -> Vec<f64> {
        if self.pred_ratio_var.len() == 1 {
            vec![self.pred_ratio_var[0]; self.pred_ratio.len()]
        } else {
            self.pred_ratio_var.clone()
        }
    }
}

/// `loss.centering`: how the teacher's targets are centred (docs/algorithm.md §1.6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Centering {
    /// DINO: `softmax((z − c)/τ_t)` with the EMA centre `c` of the raw teacher logits.
    #[default]
    Ema,
    /// DINOv2's `sinkhorn_knopp_teacher`: three Sinkhorn-Knopp iterations on `exp(z/τ_t)`,
    /// prototype totals summed over the group; no centre is kept.
    Sinkhorn,
}

impl Centering {
    /// Every configuration name.
    pub const NAMES: &'static [&'static str] = &["ema", "sinkhorn"];

    /// The configuration name (`ema`, `sinkhorn`).
    pub fn name(self) -> &'static str {
        match self {
            Centering::Ema => "ema",
            Centering::Sinkhorn => "sinkhorn",
        }
    }

    /// The variant of a configuration name.
    pub fn from_name(s: &str) -> Option<Self> {
        [Centering::Ema, Centering::Sinkhorn]
            .into_iter()
            .find(|v| v.name() == s)
    }
}

impl<'de> Deserialize<'de> for Centering {
    /// From its name; any other is an error listing the names (the loader adds the key).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_name(&s).ok_or_else(|| serde::de::Error::unknown_variant(&s, Self::NAMES))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KoleoConfig {
    /// λ, the weight of KoLeo-proto in the total loss. 0 disables it (plain DINO).
    pub weight: f64,
    /// ε inside the log of the nearest-neighbour distance.
    pub eps: f64,
    /// Recompute nearest-neighbour indices every N steps (1 = every step, the default).
    pub nn_refresh_interval: i64,
    /// Rows per block of the blockwise similarity search (bounds memory at K×block floats).
    pub block_rows: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Adamw,
    Sgd,
    Lars,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub optimizer: OptimizerKind,
    /// Peak learning rate per 256 images (linear scaling with the global batch).
    pub lr: f64,
    /// Final learning rate of the cosine schedule (not scaled).
    pub min_lr: f64,
    pub warmup_epochs: i64,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    /// Per-parameter gradient-norm clip; 0 disables.
    pub clip_grad: f64,
    /// Epochs during which the last layer is skipped by the optimiser entirely.
    pub freeze_last_layer: i64,
    /// Initial teacher EMA momentum (cosine to 1).
    pub momentum_teacher: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CropsConfig {
    pub global_crop_size: i64,
    pub global_crops_scale: [f64; 2],
    pub local_crops_number: i64,
    pub local_crop_size: i64,
    pub local_crops_scale: [f64; 2],
    /// Gaussian-blur probability of global-1, global-2, each local crop.
    pub blur_prob: [f64; 3],
    /// Solarisation probability of global-2.
    pub solarize_prob: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// `root/<class>/<file>` (JPEG/PNG).
    ImageFolder,
    /// A text file of `relative/path label` lines (ImageNet / iNaturalist lists).
    FileList,
    /// protodino packed shard files with an index.
    Shards,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub format: DatasetFormat,
    /// Training images (a directory, a list file, or a shard directory). Empty: the data set
    /// that `cargo xtask data` provisions is used.
    pub train: String,
    /// Labelled evaluation images for k-NN (same format). Empty: no evaluation.
    pub eval_train: String,
    pub eval_test: String,
    /// Use only N evenly spaced training images of the (deterministically ordered) set, which
    /// keeps a class-ordered set's class proportions; 0 = all.
    pub limit: i64,
    /// Decode/augment threads.
    pub num_threads: i64,
    /// Batches prepared ahead of the training step.
    pub prefetch_batches: i64,
    /// Evaluation transform: resize the shorter side to this, then centre-crop `eval_crop_size`.
    pub eval_resize: i64,
    pub eval_crop_size: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    /// bf16 autocast on CUDA (softmaxes and KoLeo stay fp32).
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub epochs: i64,
    pub batch_size_per_worker: i64,
    /// Stop after this many optimiser steps (0 = run all epochs); for demos and tests.
    pub max_steps: i64,
    pub seed: u64,
    /// libtorch intra-op threads (0 = libtorch's default).
    pub threads: i64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub precision: Precision,
    pub output_dir: String,
    pub checkpoint_every_steps: i64,
    pub checkpoint_keep: i64,
    pub log_every_steps: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    pub knn_k: i64,
    pub knn_temperature: f64,
    /// ε thresholds for unique-prototype counts (the first is the headline figure).
    pub unique_eps: Vec<f64>,
    /// Compute collapse figures every N steps (0 = only at the end).
    pub analysis_every_steps: i64,
    /// Training images (evenly spaced, eval transform) whose teacher assignments give the
    /// prototype-usage figures of each analysis (MLCD, entropy, clusters used); 0 = none.
    pub usage_images: i64,
    /// Labelled training images of the end-of-run k-NN (an evenly spaced subset; 0 = all).
    pub knn_train_images: i64,
    /// Test images of the end-of-run k-NN (0 = all).
    pub knn_test_images: i64,
}

impl TrainConfig {
    /// The compiled-in defaults alone.
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::load_layers::<&Path>(&[], false)
    }

    /// Defaults, then each file in order, then `PROTODINO__*` environment variables; validated.
    pub fn load<P: AsRef<Path>>(files: &[P]) -> Result<Self, ConfigError> {
        Self::load_layers(files, true)
    }

    /// Like [`TrainConfig::load`] but without the environment layer (for tests and job specs).
    pub fn load_files<P: AsRef<Path>>(files: &[P]) -> Result<Self, ConfigError> {
        Self::load_layers(files, false)
    }

    /// Parse a TOML string layered over the defaults (no environment), validated.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let cfg = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULT_TOML,
                config::FileFormat::Toml,
            ))
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?
            .try_deserialize::<TrainConfig>()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Defaults, then `files`, then the TOML text `overlay` (a job spec's `config_toml`); no
    /// environment variables. Validated.
    pub fn load_files_with_overlay<P: AsRef<Path>>(
        files: &[P],
        overlay: &str,
    ) -> Result<Self, ConfigError> {
        Self::build_layers(files, Some(overlay), false)
    }

    fn load_layers<P: AsRef<Path>>(files: &[P], env: bool) -> Result<Self, ConfigError> {
        Self::build_layers(files, None, env)
    }

    fn build_layers<P: AsRef<Path>>(
        files: &[P],
        overlay: Option<&str>,
        env: bool,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        for f in files {
            builder = builder.add_source(
                config::File::from(f.as_ref())
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        if let Some(text) = overlay {
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        if env {
            builder = builder.add_source(env_source());
        }
        let cfg = builder.build()?.try_deserialize::<TrainConfig>()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Serialise back to TOML-compatible JSON (recorded in checkpoint metadata).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("configuration is always serialisable")
    }

    /// Number of crops per image, V = 2 + L.
    pub fn n_crops(&self) -> i64 {
        2 + self.crops.local_crops_number
    }

    /// Whether the iBOT objective is selected (`loss.objective = "ibot"`).
    pub fn is_ibot(&self) -> bool {
        self.loss.objective == Objective::Ibot
    }

    /// The patch grid `(h, w)` of a global crop (`global_crop_size / patch_size` each way).
    pub fn global_patch_grid(&self) -> (i64, i64) {
        let side = self.crops.global_crop_size / self.model.patch_size.max(1);
        (side, side)
    }
}

fn env_source() -> config::Environment {
    config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("crops.global_crops_scale")
        .with_list_parse_key("crops.local_crops_scale")
        .with_list_parse_key("crops.blur_prob")
        .with_list_parse_key("eval.unique_eps")
        .with_list_parse_key("ibot.pred_ratio")
        .with_list_parse_key("ibot.pred_ratio_var")
        .with_list_parse_key("ibot.pred_aspect_ratio")
}

/// Root of protodino's download cache, shared by every clone on a machine:
/// `$PROTODINO_CACHE`, else `$XDG_CACHE_HOME/protodino`, else `~/.cache/protodino`.
/// `cargo xtask` provisions libtorch, the data sets and the Python reference environment there.
pub fn cache_root() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(p) = std::env::var_os("PROTODINO_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("protodino");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/protodino")
}

/// Where `cargo xtask data` puts the provisioned data sets.
pub fn data_root() -> std::path::PathBuf {
    cache_root().join("data")
}

#[cfg(test)]
mod tests;
