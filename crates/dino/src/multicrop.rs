//! The models crate's `MultiCrop` (backbone + DINO or iBOT head) as a [`DinoNetwork`], and the
//! constructors and replay entry point the binaries call.

use std::path::Path;

use protodino_config::TrainConfig;
use protodino_models::{ForwardCtx, IbotLogits, MultiCrop};
use tch::Tensor;

use crate::error::Result;
use crate::network::DinoNetwork;
use crate::replay::{ReplayOverrides, ReplayReport, replay};
use crate::step::DinoTrainer;

impl DinoNetwork for MultiCrop {
    fn forward(&self, crops: &[Tensor], ctx: &ForwardCtx) -> Tensor {
        MultiCrop::forward(self, crops, ctx)
    }

    fn prototypes(&self) -> Tensor {
        self.head.prototypes()
    }

    fn forward_ibot(
        &self,
        crops: &[Tensor],
        n_global: usize,
        masks: Option<&[Tensor]>,
        ctx: &ForwardCtx,
    ) -> Option<IbotLogits> {
        MultiCrop::forward_ibot(self, crops, n_global, masks, ctx)
    }

    fn separate_patch_prototypes(&self) -> Option<Tensor> {
        self.last_layer2.as_ref().map(|l| l.prototypes())
    }
}

/// The network of `cfg` for student (`true`) or teacher: iBOT's (mask token on the student,
/// `last_layer2` unless shared) when `loss.objective = "ibot"`, else DINO's.
pub fn build_network(p: &tch::nn::Path, cfg: &TrainConfig, student: bool) -> MultiCrop {
    if cfg.is_ibot()
        && let Some(n) = MultiCrop::new_ibot(p, &cfg.model, &cfg.head, &cfg.ibot, student)
    {
        return n;
    }
    MultiCrop::new(p, &cfg.model, &cfg.head, student)
}

impl DinoTrainer<MultiCrop> {
    /// The trainer of a configuration with the models crate's backbones and DINO head.
    /// With `loss.objective = "ibot"` the networks are iBOT's ([`build_network`]).
    pub fn from_config(cfg: TrainConfig, niter_per_epoch: i64, world_size: usize) -> Result<Self> {
        let net_cfg = cfg.clone();
        DinoTrainer::new(cfg, niter_per_epoch, world_size, move |p, student| {
            build_network(p, &net_cfg, student)
        })
    }
}

/// [`replay`] with the models crate's networks (what `protodino replay` calls).
pub fn replay_multicrop(
    cfg: TrainConfig,
    checkpoint: &Path,
    batch_path: &Path,
    overrides: ReplayOverrides,
    out: Option<&Path>,
) -> Result<ReplayReport> {
    let net_cfg = cfg.clone();
    replay(
        cfg,
        checkpoint,
        batch_path,
        overrides,
        out,
        move |p, student| build_network(p, &net_cfg, student),
    )
}
