//! Real frozen features: Fashion-MNIST (or whatever the configuration's `data` section names)
//! through the teacher backbone of a protodino network, two augmented global crops per image.
//!
//! The network is the product's: `DinoTrainer::<MultiCrop>::from_config`, restored from a
//! protodino checkpoint with the product's checkpoint code (its configuration is the one stored
//! in the checkpoint), or left at its seeded random initialisation when no checkpoint is given
//! (the configuration then comes from files, by default the demo's ViT-Tiny/8). Crops come from
//! the product's data pipeline with the DINO augmentation of `crops` (local crops are not made);
//! features are the backbone's CLS output after its final norm, in eval mode — what k-NN uses.
//! They are computed once: the caller caches the [`FeatureSet`] to a safetensors file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use protodino_config::TrainConfig;
use protodino_data::Loader;
use protodino_dino::DinoTrainer;
use protodino_models::{ForwardCtx, MultiCrop};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::features::FeatureSet;

/// Images encoded per forward.
const ENCODE_BATCH: usize = 64;

/// What to encode and with which network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RealSpec {
    /// A protodino checkpoint; None: the seeded random initialisation of `config`.
    pub checkpoint: Option<PathBuf>,
    /// Configuration files layered over the defaults (used without a checkpoint; with one, the
    /// checkpoint's own configuration is used).
    pub config: Vec<PathBuf>,
    /// Images, evenly spaced over the training set (0 = all).
    pub images: usize,
    /// Where `cargo xtask data` put the data sets.
    pub data_root: PathBuf,
}

/// The configuration of the encoder: the checkpoint's when there is one, else the files'.
pub fn encoder_config(spec: &RealSpec) -> Result<TrainConfig> {
    let mut cfg = match &spec.checkpoint {
        Some(path) => {
            let metadata = protodino_dino::io::read_metadata(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let meta = protodino_dino::checkpoint::read_meta(&metadata, path)?
                .with_context(|| format!("{} has no protodino metadata", path.display()))?;
            serde_json::from_value::<TrainConfig>(meta.config)
                .with_context(|| format!("the configuration stored in {}", path.display()))?
        }
        None => TrainConfig::load_files(&spec.config)?,
    };
    cfg.crops.local_crops_number = 0;
    cfg.train.device = "cpu".into();
    cfg.data.num_threads = 1;
    Ok(cfg)
}

/// `n` ids evenly spaced over `0..len` (all when `n` is 0 or larger than `len`).
pub fn evenly_spaced(len: usize, n: usize) -> Vec<u64> {
    let n = if n == 0 { len } else { n.min(len) };
    (0..n as u64).map(|i| i * len as u64 / n as u64).collect()
}

/// Encodes the images of `spec`.
pub fn encode(spec: &RealSpec) -> Result<FeatureSet> {
    let cfg = encoder_config(spec)?;
    let dataset = protodino_data::open_train(&cfg.data, &spec.data_root).with_context(|| {
        format!(
            "opening the training set under {} (run `cargo xtask data`)",
            spec.data_root.display()
        )
    })?;
    let ids = evenly_spaced(dataset.len(), spec.images);
    ensure!(!ids.is_empty(), "the training set is empty");
    let mut trainer = DinoTrainer::<MultiCrop>::from_config(cfg.clone(), 1, 1)?;
    if let Some(path) = &spec.checkpoint {
        trainer
            .load_checkpoint(path)
            .with_context(|| format!("loading {}", path.display()))?;
    }
    let loader = Loader::new(dataset.clone(), &cfg.crops, &cfg.data, cfg.train.seed)?;
    let mut views: [Vec<Tensor>; 2] = [Vec::new(), Vec::new()];
    let mut labels = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(ENCODE_BATCH) {
        let mb = loader.make_batch(0, chunk);
        ensure!(
            mb.skipped.is_empty(),
            "unreadable records while encoding: {:?}",
            mb.skipped
        );
        let g = mb.global_size as i64;
        let crops = Tensor::from_slice(&mb.global_crops).view([2, chunk.len() as i64, 3, g, g]);
        for (v, out) in views.iter_mut().enumerate() {
            let f = tch::no_grad(|| {
                trainer
                    .teacher
                    .backbone
                    .forward(&crops.get(v as i64), &ForwardCtx::eval())
            });
            out.push(f.to_kind(Kind::Float));
        }
        labels.extend(chunk.iter().map(|&id| dataset.label(id)));
    }
    let [v0, v1] = views.map(|v| Tensor::cat(&v, 0));
    let details = serde_json::json!({
        "encoder": format!("{:?} patch {} depth {}", cfg.model.arch, cfg.model.patch_size, cfg.model.depth),
        "checkpoint": spec.checkpoint.as_ref().map(|p| p.display().to_string()),
        "checkpoint_step": trainer.step,
        "random_init": spec.checkpoint.is_none(),
        "global_crop_size": cfg.crops.global_crop_size,
        "global_crops_scale": cfg.crops.global_crops_scale,
        "features": "teacher backbone CLS after the final norm, eval mode",
        "images": ids.len(),
        "seed": cfg.train.seed,
    });
    FeatureSet::new("fashion-mnist", [v0, v1], labels, details)
}

/// The cached features of `spec` at `cache`, encoding and writing them first when absent.
pub fn cached(spec: &RealSpec, cache: &Path) -> Result<FeatureSet> {
    if cache.exists() {
        return FeatureSet::load(cache);
    }
    let set = encode(spec)?;
    set.save(cache)?;
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evenly_spaced_ids() {
        assert_eq!(evenly_spaced(10, 5), vec![0, 2, 4, 6, 8]);
        assert_eq!(evenly_spaced(3, 0), vec![0, 1, 2]);
        assert_eq!(evenly_spaced(3, 10), vec![0, 1, 2]);
    }
}
