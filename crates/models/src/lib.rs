//! Backbones and the DINO head of protodino, written in `tch` so that parameter paths equal the
//! official PyTorch `state_dict` names (`cls_token`, `pos_embed`, `patch_embed.proj.weight`,
//! `blocks.0.attn.qkv.weight`, … for the DINO ViT; torchvision names for ResNet;
//! `head.mlp.0.weight` … `head.last_layer.weight_g/weight_v` for the head).
//!
//! The interface the DINO step uses is [`MultiCrop`] (built by [`MultiCrop::new`] from the
//! configuration), [`Backbone`] and [`build_backbone`]. Module map:
//!
//! * [`vit`] — the DINO Vision Transformer ([`VisionTransformer`], [`VitParams`]), bicubic
//!   position-embedding interpolation, intermediate layers for the linear probe, iBOT's
//!   masked forward with the mask token `masked_embed` returning every token;
//! * [`resnet`] — torchvision ResNet-18/50 ([`ResNet`], [`ResNetParams`]), small-input stem;
//! * [`head`] — the DINO projection head with the weight-normalised prototype layer ([`DinoHead`]),
//!   and iBOT's separate patch prototype layer `last_layer2` ([`PrototypeLayer`]);
//! * [`multicrop`] — the multi-crop wrapper, crops grouped by resolution, crop-major rows; iBOT's
//!   forward ([`MultiCrop::new_ibot`], [`MultiCrop::forward_ibot`]): CLS logits of every crop and
//!   patch logits of the (masked) global crops;
//! * [`drop_path`] — stochastic depth from a counter-based hash of (seed, step, sample, crop, block);
//! * [`layers`] — Linear / LayerNorm / BatchNorm / Conv2d with PyTorch names and inits;
//! * [`weights`] — safetensors files with metadata (atomic writes) and loading into a VarStore.

use protodino_config::{Arch, ModelConfig};
use tch::{Tensor, nn};

pub mod drop_path;
pub mod head;
pub mod layers;
pub mod multicrop;
pub mod resnet;
pub mod vit;
pub mod weights;

pub use head::{DinoHead, PrototypeLayer};
pub use multicrop::{IbotLogits, MultiCrop};
pub use resnet::{ResNet, ResNetParams};
pub use vit::{VisionTransformer, VitParams};
pub use weights::WeightsError;

/// Per-forward context. Stochastic depth draws its per-sample keep mask from
/// `(seed, step, sample_id, crop, block)` only (see [`drop_path`]), so a sample gets the same mask whichever worker and
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
    /// iBOT: every token after the final norm, `[N, 1 + P, D]` (CLS first), with the patch
    /// embeddings where `mask` (`[N, h, w]` bool) is true replaced by the mask token. `None` for
    /// backbones without patch tokens (ResNets).
    fn forward_all_tokens(
        &self,
        _x: &Tensor,
        _mask: Option<&Tensor>,
        _ctx: &ForwardCtx,
    ) -> Option<Tensor> {
        None
    }
    /// Whether the backbone owns iBOT's mask token (`backbone.masked_embed`).
    fn has_mask_token(&self) -> bool {
        false
    }
}

/// The ViT hyper-parameters of a configuration (None for ResNets); `model.depth > 0` overrides
/// the architecture's 12 blocks. `drop_path` selects the
/// student's schedule (`model.drop_path_rate`); the teacher gets 0.
pub fn vit_params(cfg: &ModelConfig, drop_path: bool) -> Option<VitParams> {
    let mut p = match cfg.arch {
        Arch::VitTiny => VitParams::tiny(cfg.patch_size, cfg.img_size),
        Arch::VitSmall => VitParams::small(cfg.patch_size, cfg.img_size),
        Arch::VitBase => VitParams::base(cfg.patch_size, cfg.img_size),
        Arch::Resnet18 | Arch::Resnet50 => return None,
    };
    if cfg.depth > 0 {
        p.depth = cfg.depth;
    }
    if cfg.depth > 0 {
        p.depth = cfg.depth;
    }
    p.drop_path_rate = if drop_path { cfg.drop_path_rate } else { 0.0 };
    Some(p)
}

/// [`build_backbone`] for iBOT: a ViT with the mask token `masked_embed` when `mask_token` (the
/// student); `None` for a ResNet (iBOT masks patch tokens).
pub fn build_masked_backbone(
    vs: &nn::Path,
    cfg: &ModelConfig,
    drop_path: bool,
    mask_token: bool,
) -> Option<Box<dyn Backbone>> {
    let p = vit_params(cfg, drop_path)?;
    Some(Box::new(VisionTransformer::with_mask_token(
        vs, &p, mask_token,
    )))
}

/// The backbone of a configuration, its variables created under `vs` (e.g. `student/backbone`).
/// `drop_path`: student (true, rate from the config) or teacher (false, rate 0). ResNets have no
/// drop path.
pub fn build_backbone(vs: &nn::Path, cfg: &ModelConfig, drop_path: bool) -> Box<dyn Backbone> {
    match cfg.arch {
        Arch::Resnet18 => Box::new(ResNet::new(
            vs,
            &ResNetParams::resnet18(cfg.small_input_stem),
        )),
        Arch::Resnet50 => Box::new(ResNet::new(
            vs,
            &ResNetParams::resnet50(cfg.small_input_stem),
        )),
        _ => {
            let p = vit_params(cfg, drop_path).expect("a ViT architecture");
            Box::new(VisionTransformer::new(vs, &p))
        }
    }
}
