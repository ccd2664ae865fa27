//! The multi-crop wrapper: backbone + DINO head of one network (student or teacher).
//!
//! Official `MultiCropWrapper` semantics: consecutive crops of equal resolution are
//! concatenated along the batch axis and run through the backbone once per group (so BatchNorm
//! sees per-resolution batches, as in the official code), then the head runs once on the
//! concatenation of all features. Output rows are crop-major: `[crop 0 of every image; crop 1 …]`.
//!
//! iBOT ([`MultiCrop::new_ibot`], [`MultiCrop::forward_ibot`]): the global crops run through the
//! backbone together, masked for the student, returning every token; the head's MLP runs on
//! every token, `last_layer` gives the CLS logits and `last_layer2` (or `last_layer` when the
//! head is shared) the patch logits. Local crops contribute their CLS logits only: the official
//! code runs them unmasked through the same head and keeps the CLS output, which is the same
//! numbers since the head acts on each token alone.

use protodino_config::{HeadConfig, IbotConfig, ModelConfig};
use tch::{Tensor, nn};

use crate::head::{DinoHead, PrototypeLayer};
use crate::{Backbone, ForwardCtx, build_backbone, build_masked_backbone};

/// One DINO network: `backbone.*` and `head.*` under its VarStore path.
#[derive(Debug)]
pub struct MultiCrop {
    pub backbone: Box<dyn Backbone>,
    pub head: DinoHead,
    /// iBOT's patch prototype layer `head.last_layer2` when the network's head is not shared.
    pub last_layer2: Option<PrototypeLayer>,
}

/// iBOT's outputs of one network.
#[derive(Debug)]
pub struct IbotLogits {
    /// CLS logits `[Σ N_crop, K]` of every crop given, crop-major.
    pub cls: Tensor,
    /// Patch logits `[n_global·B, P, K₂]` of the global crops (P = h·w patches).
    pub patch: Tensor,
}

impl MultiCrop {
    /// `vs` is e.g. `root / "student"`; creates `vs/"backbone"` and `vs/"head"`. student=true: drop path on
    /// and head.norm_last_layer from cfg; student=false (teacher): drop path 0, norm_last_layer=true.
    pub fn new(vs: &nn::Path, model: &ModelConfig, head: &HeadConfig, student: bool) -> Self {
        let backbone = build_backbone(&(vs / "backbone"), model, student);
        let norm_last_layer = if student { head.norm_last_layer } else { true };
        let head = DinoHead::new(&(vs / "head"), backbone.embed_dim(), head, norm_last_layer);
        MultiCrop {
            backbone,
            head,
            last_layer2: None,
        }
    }

    /// iBOT's network (`iBOTHead` behind the multi-crop wrapper). The student's ViT owns the
    /// mask token `backbone.masked_embed`; `head.last_layer2` (K₂ = `ibot.patch_out_dim` rows)
    /// exists unless the head is shared (`ibot.shared_head` for the student,
    /// `ibot.shared_head_teacher` for the teacher), with its gain frozen under the same rule as
    /// `last_layer`'s. Variables are created in the official order: backbone, MLP,
    /// `last_layer`, `last_layer2`. `None` for a backbone without patch tokens (ResNet).
    pub fn new_ibot(
        vs: &nn::Path,
        model: &ModelConfig,
        head: &HeadConfig,
        ibot: &IbotConfig,
        student: bool,
    ) -> Option<Self> {
        let backbone = build_masked_backbone(&(vs / "backbone"), model, student, student)?;
        let norm_last_layer = if student { head.norm_last_layer } else { true };
        let h = vs / "head";
        let dino_head = DinoHead::new(&h, backbone.embed_dim(), head, norm_last_layer);
        let shared = if student {
            ibot.shared_head
        } else {
            ibot.shared_head_teacher
        };
        let last_layer2 = (!shared).then(|| {
            PrototypeLayer::new(
                &(&h / "last_layer2"),
                ibot.patch_out_dim,
                head.bottleneck_dim,
                norm_last_layer,
            )
        });
        Some(MultiCrop {
            backbone,
            head: dino_head,
            last_layer2,
        })
    }

    /// The patch prototypes `[K₂, d]`: `last_layer2`'s, or `last_layer`'s when shared.
    pub fn patch_prototypes(&self) -> Tensor {
        match &self.last_layer2 {
            Some(l) => l.prototypes(),
            None => self.head.prototypes(),
        }
    }

    /// iBOT's forward of `crops` (official order, the first `n_global` of equal size): CLS
    /// logits of every crop and patch logits of the global crops, whose patch embeddings are
    /// replaced by the mask token where `masks` (one `[B, h, w]` bool tensor per global crop)
    /// is true; no masks for the teacher. `None` when the backbone has no patch tokens.
    pub fn forward_ibot(
        &self,
        crops: &[Tensor],
        n_global: usize,
        masks: Option<&[Tensor]>,
        ctx: &ForwardCtx,
    ) -> Option<IbotLogits> {
        let n_global = n_global.min(crops.len());
        let globals = Tensor::cat(&crops[..n_global], 0);
        let mask = masks.map(|m| Tensor::cat(&m[..n_global], 0));
        let tokens = self
            .backbone
            .forward_all_tokens(&globals, mask.as_ref(), ctx)?;
        let y = self.head.bottleneck(&tokens, ctx.train);
        let n_tokens = y.size()[1];
        let mut cls = vec![
            y.select(1, 0)
                .linear::<Tensor>(&self.head.prototypes(), None),
        ];
        let patch_y = y.narrow(1, 1, n_tokens - 1);
        let patch = match &self.last_layer2 {
            Some(l) => l.forward(&patch_y),
            None => patch_y.linear::<Tensor>(&self.head.prototypes(), None),
        };
        if crops.len() > n_global {
            let local_ctx = ForwardCtx {
                crop: ctx.crop + n_global as i64,
                ..*ctx
            };
            let feats = self.backbone_features(&crops[n_global..], &local_ctx);
            cls.push(self.head.forward(&feats, ctx.train));
        }
        Some(IbotLogits {
            cls: Tensor::cat(&cls, 0),
            patch,
        })
    }

    /// Backbone features `[Σ N_crop, D]` of the crops, crop-major, one backbone call per run of
    /// consecutive crops with equal spatial size. Crop `c` of the list is crop index
    /// `ctx.crop + c` for drop path; `ctx.sample_ids` are the image ids (one per row of a crop).
    ///
    /// Grouping compares (H, W) rather than only the width as the official code does; the two
    /// agree whenever the official code runs at all (it cannot concatenate unequal heights).
    pub fn backbone_features(&self, crops: &[Tensor], ctx: &ForwardCtx) -> Tensor {
        let mut outputs = Vec::new();
        let mut start = 0usize;
        while start < crops.len() {
            let size = spatial(&crops[start]);
            let mut end = start + 1;
            while end < crops.len() && spatial(&crops[end]) == size {
                end += 1;
            }
            let group = if end - start == 1 {
                crops[start].shallow_clone()
            } else {
                Tensor::cat(&crops[start..end], 0)
            };
            let group_ctx = ForwardCtx {
                crop: ctx.crop + start as i64,
                ..*ctx
            };
            outputs.push(self.backbone.forward(&group, &group_ctx));
            start = end;
        }
        Tensor::cat(&outputs, 0)
    }

    /// Official MultiCropWrapper semantics: consecutive crops of equal resolution are concatenated and
    /// run through the backbone once per group, then the head once on everything; rows are crop-major.
    pub fn forward(&self, crops: &[Tensor], ctx: &ForwardCtx) -> Tensor {
        let feats = self.backbone_features(crops, ctx);
        self.head.forward(&feats, ctx.train)
    }
}

fn spatial(t: &Tensor) -> (i64, i64) {
    let s = t.size();
    let n = s.len();
    (s[n - 2], s[n - 1])
}
