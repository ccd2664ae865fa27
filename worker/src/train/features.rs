//! Teacher features of labelled images and the weighted k-NN of the final report (also used by
//! `protodino knn | linear | fewshot`): the evaluation transform (resize + centre crop), chunks of
//! 256 images, unreadable records left out.

use anyhow::Result;
use protodino_analysis::{KnnOptions, KnnReport, knn_classify};
use protodino_config::TrainConfig;
use protodino_data::{Loader, SharedDataset};
use protodino_models::ForwardCtx;
use tch::Tensor;

use super::model::Trainer;

/// Run `f(images [n, 3, S, S] on the trainer's device, labels)` over `ids` in chunks of 256,
/// with the evaluation transform; unreadable records are left out.
pub fn for_each_eval_batch(
    trainer: &Trainer,
    loader: &Loader,
    ids: &[u64],
    mut f: impl FnMut(&Tensor, &[i64]) -> Result<()>,
) -> Result<()> {
    for chunk in ids.chunks(256) {
        let b = loader.eval_batch(chunk);
        let n = b.sample_ids.len() as i64;
        if n == 0 {
            continue;
        }
        let s = b.size as i64;
        let x = Tensor::from_slice(&b.images)
            .view([n, 3, s, s])
            .to_device(trainer.device);
        f(&x, &b.labels)?;
    }
    Ok(())
}

/// Teacher-backbone features of `ids` and their labels, L2-normalisation left to the caller:
/// `probe = None` → the DINO feature (CLS after the final norm), else
/// `forward_probe(n_last_blocks, avgpool)`. Returns `(features [N, D], labels [N])`.
pub fn extract_features(
    trainer: &Trainer,
    loader: &Loader,
    ids: &[u64],
    probe: Option<(i64, bool)>,
) -> Result<(Tensor, Tensor)> {
    let mut feats = Vec::new();
    let mut labels = Vec::new();
    let backbone = &trainer.teacher.backbone;
    for_each_eval_batch(trainer, loader, ids, |x, y| {
        let f = tch::no_grad(|| match probe {
            None => backbone.forward(x, &ForwardCtx::eval()),
            Some((k, avg)) => backbone.forward_probe(x, k, avg),
        });
        feats.push(f.to_device(tch::Device::Cpu));
        labels.extend_from_slice(y);
        Ok(())
    })?;
    anyhow::ensure!(!feats.is_empty(), "no readable evaluation image");
    Ok((Tensor::cat(&feats, 0), Tensor::from_slice(&labels)))
}

/// An evenly spaced subset of at most `limit` of `n` ids (all when `limit` is 0 or larger):
/// deterministic and class-balanced on shuffled sets.
pub fn spaced_ids(n: usize, limit: usize) -> Vec<u64> {
    let n = n as u64;
    if limit == 0 || limit as u64 >= n {
        return (0..n).collect();
    }
    (0..limit as u64).map(|i| i * n / limit as u64).collect()
}

/// Weighted k-NN (k = `eval.knn_k`, T = `eval.knn_temperature`) on the teacher's features, over
/// at most `limits = (train, test)` images of each set.
pub fn knn_eval(
    trainer: &Trainer,
    cfg: &TrainConfig,
    train: &SharedDataset,
    test: &SharedDataset,
    limits: (usize, usize),
) -> Result<KnnReport> {
    let mk = |ds: &SharedDataset| Loader::new(ds.clone(), &cfg.crops, &cfg.data, cfg.train.seed);
    let (train_loader, test_loader) = (mk(train)?, mk(test)?);
    let train_ids = spaced_ids(train.len(), limits.0);
    let test_ids = spaced_ids(test.len(), limits.1);
    let (ftr, ltr) = extract_features(trainer, &train_loader, &train_ids, None)?;
    let (fte, lte) = extract_features(trainer, &test_loader, &test_ids, None)?;
    let opts = KnnOptions {
        ks: vec![cfg.eval.knn_k],
        temperature: cfg.eval.knn_temperature,
        ..KnnOptions::default()
    };
    Ok(knn_classify(&ftr, &ltr, &fte, &lte, &opts)?)
}
