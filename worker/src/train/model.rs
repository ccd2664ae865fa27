//! The trainer of a configuration and the step's view of a data-pipeline batch.
//!
//! Two ways to build one: [`build_trainer`] for `protodino train` (schedules of
//! `batch_size_per_worker × world`, as the rank was started) and [`build_job_trainer`] for an
//! agent session, whose schedules depend on the job's global batch `G` alone, never on the
//! membership, so a group of `W` members with `G / W` samples each follows one process with
//! batch `G` whatever `W` is at any moment.
//!
//! With `loss.objective = "ibot"` the networks are iBOT's (`protodino_dino::build_network`) and
//! a batch carries the student's masks of its global crops, a function of (seed, epoch, sample
//! id, crop) only ([`to_batch_for`]; a batch without them gets the same masks from the trainer).

use anyhow::Result;
use protodino_config::TrainConfig;
use protodino_data::MultiCropBatch;
use protodino_dino::{Batch, DinoTrainer, build_network};
use protodino_models::MultiCrop;
use tch::Tensor;

pub type Trainer = DinoTrainer<MultiCrop>;

/// Build the trainer of a configuration (student and teacher `MultiCrop`s; iBOT's networks
/// with `loss.objective = "ibot"`).
pub fn build_trainer(
    cfg: &TrainConfig,
    steps_per_epoch: i64,
    world_size: usize,
) -> Result<Trainer> {
    let net_cfg = cfg.clone();
    Ok(DinoTrainer::new(
        cfg.clone(),
        steps_per_epoch,
        world_size,
        move |p, student| build_network(p, &net_cfg, student),
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
        masks: None,
    }
}

/// [`to_batch`] with iBOT's masks of the global crops when `cfg` selects the iBOT objective:
/// drawn from the batch's sample ids, its epoch and `cfg.train.seed` (the job's seed), so a
/// sample's masks do not depend on which member or which step share holds it. What the step
/// loop trains on.
pub fn to_batch_for(b: &MultiCropBatch, cfg: &TrainConfig) -> Batch {
    to_batch(b).with_ibot_masks(cfg, b.epoch as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ibot_batches_carry_the_masks_the_trainer_would_derive() {
        let mut cfg = protodino_config::TrainConfig::from_toml_str(
            "[model]\narch = \"vit_tiny\"\npatch_size = 8\nimg_size = 32\n\
             [head]\nout_dim = 64\n[loss]\nobjective = \"ibot\"\n[ibot]\nshared_head = true\n\
             [crops]\nglobal_crop_size = 32\nlocal_crop_size = 16\nlocal_crops_number = 0\n",
        )
        .unwrap();
        cfg.train.seed = 11;
        let mb = MultiCropBatch {
            epoch: 3,
            batch_size: 2,
            global_size: 32,
            local_size: 16,
            n_local: 0,
            global_crops: vec![0.0; 2 * 2 * 3 * 32 * 32],
            sample_ids: vec![5, 9],
            ..MultiCropBatch::default()
        };
        let b = to_batch_for(&mb, &cfg);
        let masks = b.masks.expect("iBOT masks");
        let want = protodino_dino::ibot_masks(&cfg, 3, &[5, 9]);
        assert_eq!(masks[0].size(), [2, 4, 4]);
        assert!(masks.iter().zip(&want).all(|(a, b)| a.equal(b)));
        cfg.loss.objective = protodino_config::Objective::Dino;
        assert!(to_batch_for(&mb, &cfg).masks.is_none());
    }
}
