//! The multi-crop wrapper: backbone + DINO head of one network (student or teacher).
//!
//! Official `MultiCropWrapper` semantics: consecutive crops of equal resolution are
//! concatenated along the batch axis and run through the backbone once per group (so BatchNorm
//! sees per-resolution batches, as in the official code), then the head runs once on the
//! concatenation of all features. Output rows are crop-major: `[crop 0 of every image; crop 1 …]`.

use protodino_config::{HeadConfig, ModelConfig};
use tch::{Tensor, nn};

use crate::head::DinoHead;
use crate::{Backbone, ForwardCtx, build_backbone};

/// One DINO network: `backbone.*` and `head.*` under its VarStore path.
#[derive(Debug)]
pub struct MultiCrop {
    pub backbone: Box<dyn Backbone>,
    pub head: DinoHead,
}

impl MultiCrop {
    /// `vs` is e.g. `root / "student"`; creates `vs/"backbone"` and `vs/"head"`. student=true: drop path on
    /// and head.norm_last_layer from cfg; student=false (teacher): drop path 0, norm_last_layer=true.
    pub fn new(vs: &nn::Path, model: &ModelConfig, head: &HeadConfig, student: bool) -> Self {
        let backbone = build_backbone(&(vs / "backbone"), model, student);
        let norm_last_layer = if student { head.norm_last_layer } else { true };
        let head = DinoHead::new(&(vs / "head"), backbone.embed_dim(), head, norm_last_layer);
        MultiCrop { backbone, head }
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
