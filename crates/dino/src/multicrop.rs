//! The models crate's `MultiCrop` (backbone + DINO head) as a [`DinoNetwork`], and the
//! constructors and replay entry point the binaries call.

use std::path::Path;

use protodino_config::TrainConfig;
use protodino_models::{ForwardCtx, MultiCrop};
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
}

impl DinoTrainer<MultiCrop> {
    /// The trainer of a configuration with the models crate's backbones and DINO head.
    pub fn from_config(cfg: TrainConfig, niter_per_epoch: i64, world_size: usize) -> Result<Self> {
        let model = cfg.model.clone();
        let head = cfg.head.clone();
        DinoTrainer::new(cfg, niter_per_epoch, world_size, move |p, student| {
            MultiCrop::new(p, &model, &head, student)
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
    let model = cfg.model.clone();
    let head = cfg.head.clone();
    replay(
        cfg,
        checkpoint,
        batch_path,
        overrides,
        out,
        move |p, student| MultiCrop::new(p, &model, &head, student),
    )
}
