//! Backbones of protodino, written in `tch` so that parameter paths equal the official PyTorch
//! `state_dict` names (`cls_token`, `pos_embed`, `patch_embed.proj.weight`,
//! `blocks.0.attn.qkv.weight`, … for the DINO ViT; torchvision names for ResNet).
//!
//! The interface the DINO step uses is [`Backbone`] and [`build_backbone`]; everything else in
//! this crate is an implementation of it.

use tch::Tensor;

/// Per-forward context. Stochastic depth draws its per-sample keep mask from
/// `(seed, step, sample_id, block)` only, so a sample gets the same mask whichever worker and
/// batch slot processes it, and results do not depend on how a batch is split over workers.
#[derive(Debug, Clone, Copy)]
pub struct ForwardCtx<'a> {
    /// Training mode (drop path active, BatchNorm in batch-statistics mode).
    pub train: bool,
    pub seed: u64,
    pub step: i64,
    /// One id per row of the input batch (for multi-crop groups: the image id of each row;
    /// `crop` distinguishes crops of the same image).
    pub sample_ids: &'a [i64],
    /// Index of the crop (0 = global-1, 1 = global-2, 2.. = locals) of the rows, or of the first
    /// crop of a concatenated group (rows are crop-major: `crop + row / n_images`).
    pub crop: i64,
}

impl ForwardCtx<'_> {
    /// Inference context: no drop path, eval-mode BatchNorm.
    pub fn eval() -> ForwardCtx<'static> {
        ForwardCtx {
            train: false,
            seed: 0,
            step: 0,
            sample_ids: &[],
            crop: 0,
        }
    }
}

/// A backbone: images `[N, 3, H, W]` (any H, W the architecture accepts) → features `[N, D]`.
pub trait Backbone: Send + std::fmt::Debug {
    /// Output feature dimension D (384 for ViT-S, 2048 for ResNet-50).
    fn embed_dim(&self) -> i64;
    /// The DINO feature: ViT → CLS token after the final LayerNorm; ResNet → pooled features.
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Tensor;
    /// Linear-probe features: ViT → CLS tokens (after the final norm) of the last `n` blocks
    /// concatenated, plus the mean patch token of the last block when `avgpool`; ResNet → pooled.
    fn forward_probe(&self, x: &Tensor, n_last_blocks: i64, avgpool: bool) -> Tensor;
}
