//! The trainer of a configuration and the step's view of a data-pipeline batch.
//!
//! Two ways to build one: [`build_trainer`] for `protodino train` (schedules of
//! `batch_size_per_worker × world`, as the rank was started) and [`build_job_trainer`] for an
//! agent session, whose schedules depend on the job's global batch `G` alone, never on the
//! membership, so a group of `W` members with `G / W` samples each follows one process with
//! batch `G` whatever `W` is at any moment.

use anyhow::Result;
use protodino_config::TrainConfig;
use protodino_data::MultiCropBatch;
use protodino_dino::{Batch, DinoTrainer};
use protodino_models::MultiCrop;
use tch::Tensor;

pub type Trainer = DinoTrainer<MultiCrop>;

/// Build the trainer of a configuration (student and teacher `MultiCrop`s).
pub fn build_trainer(
    cfg: &TrainConfig,
    steps_per_epoch: i64,
    world_size: usize,
) -> Result<Trainer> {
    let (model, head) = (cfg.model.clone(), cfg.head.clone());
    Ok(DinoTrainer::new(
        cfg.clone(),
        steps_per_epoch,
        world_size,
        move |p, student| MultiCrop::new(p, &model, &head, student),
    )?)
}

/// The trainer of a job whose global batch is `global_batch`: its configuration records
/// `batch_size_per_worker = G` with a world of one, which is what the schedules (linear lr
/// scaling with `G`) and the checkpoint metadata then describe; the reducer's own world size
/// still averages the gradients over the actual members.
pub fn build_job_trainer(
    cfg: &TrainConfig,
    steps_per_epoch: i64,
    global_batch: i64,
) -> Result<Trainer> {
    let mut job_cfg = cfg.clone();
    job_cfg.train.batch_size_per_worker = global_batch;
    build_trainer(&job_cfg, steps_per_epoch, 1)
}

/// A data-pipeline batch as the step's tensors (crop-major, `[B, 3, S, S]` per crop).
pub fn to_batch(b: &MultiCropBatch) -> Batch {
    let shape = |s: [usize; 5]| s.map(|d| d as i64);
    let global = Tensor::from_slice(&b.global_crops).view(shape(b.global_shape()));
    let local = if b.n_local > 0 {
        Tensor::from_slice(&b.local_crops)
            .view(shape(b.local_shape()))
            .unbind(0)
    } else {
        Vec::new()
    };
    Batch {
        global_crops: global.unbind(0),
        local_crops: local,
        sample_ids: b.sample_ids.clone(),
    }
}
