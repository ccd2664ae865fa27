//! Linear probe on frozen features (docs/algorithm.md §4.2, DINO `eval_linear.py`).
//!
//! One `Linear(D, C)` (weight `N(0, 0.01)`, bias 0) trained with cross-entropy by SGD with
//! momentum 0.9 (PyTorch semantics: `buf = m·buf + g`, `p −= lr·buf`, no dampening, no
//! Nesterov), **no weight decay**, the learning rate annealed by a cosine to 0 over the epochs
//! and stepped per epoch (`CosineAnnealingLR`), mini-batches of 128 over a seeded shuffle, the
//! last partial batch kept (DINO's loader has no `drop_last`). The validation set is scored
//! after every epoch and the best top-1 is reported.
//!
//! The features are the caller's: which blocks to concatenate (ViT-S: last-4 CLS; ViT-B: CLS +
//! mean patch token) and whether the training images were augmented (DINO: RandomResizedCrop +
//! flip, features recomputed every epoch) is decided where the features are extracted. This
//! module trains on the fixed tensors it is given; features are not normalised (as in DINO).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{AnalysisError, Result};
use crate::knn::{check_features, check_labels};
use crate::rng::SplitMix64;
use crate::stats::positive;

/// Options of [`linear_probe`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearProbeOptions {
    /// DINO: 100.
    pub epochs: i64,
    /// Peak learning rate. DINO's default is `0.001 · B_g/256` and should be swept per
    /// checkpoint (pitfall 15); the caller applies any batch scaling.
    pub lr: f64,
    pub batch_size: i64,
    pub momentum: f64,
    /// Seeds the weight init and the per-epoch shuffles.
    pub seed: u64,
}

impl Default for LinearProbeOptions {
    fn default() -> Self {
        LinearProbeOptions {
            epochs: 100,
            lr: 0.001,
            batch_size: 128,
            momentum: 0.9,
            seed: 0,
        }
    }
}

/// One epoch of the probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearEpoch {
    pub epoch: i64,
    pub lr: f64,
    pub train_loss: f64,
    pub val_top1: f64,
    pub val_top5: f64,
}

/// The JSON-serialisable linear-probe report (accuracies in percent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearProbeReport {
    pub n_train: i64,
    pub n_val: i64,
    pub dim: i64,
    pub num_classes: i64,
    pub best_top1: f64,
    pub best_epoch: i64,
    pub final_top1: f64,
    pub epochs: Vec<LinearEpoch>,
}

/// The cosine-annealed learning rate of epoch `e` of `epochs` (to 0).
pub fn cosine_lr(lr: f64, e: i64, epochs: i64) -> f64 {
    0.5 * lr * (1.0 + (std::f64::consts::PI * e as f64 / epochs as f64).cos())
}

/// Train a linear classifier on `train` features and report accuracy on `val`.
pub fn linear_probe(
    train_features: &Tensor,
    train_labels: &Tensor,
    val_features: &Tensor,
    val_labels: &Tensor,
    opts: &LinearProbeOptions,
) -> Result<LinearProbeReport> {
    let n_train = check_features(train_features, "train", None)?;
    let dim = train_features.size()[1];
    let n_val = check_features(val_features, "val", Some(dim))?;
    let max_train = check_labels(train_labels, n_train, "train")?;
    let max_val = check_labels(val_labels, n_val, "val")?;
    if n_train == 0 || n_val == 0 {
        return Err(AnalysisError::invalid(
            "features",
            "train and val must be non-empty",
        ));
    }
    if opts.epochs < 1 || opts.batch_size < 1 || !positive(opts.lr) {
        return Err(AnalysisError::invalid(
            "epochs/batch_size/lr",
            "epochs and batch_size must be ≥ 1, lr > 0",
        ));
    }
    let num_classes = max_train.max(max_val) + 1;
    let cpu = tch::Device::Cpu;
    let x = train_features.f_to_device(cpu)?.f_to_kind(Kind::Float)?;
    let y = train_labels.f_to_device(cpu)?.f_to_kind(Kind::Int64)?;
    let xv = val_features.f_to_device(cpu)?.f_to_kind(Kind::Float)?;
    let yv = val_labels.f_to_device(cpu)?.f_to_kind(Kind::Int64)?;

    let mut rng = SplitMix64::derive(opts.seed, &[0x11_7e_a2]);
    let init: Vec<f32> = (0..num_classes * dim)
        .map(|_| (rng.normal() * 0.01) as f32)
        .collect();
    let weight = Tensor::from_slice(&init)
        .f_reshape([num_classes, dim])?
        .set_requires_grad(true);
    let bias = Tensor::f_zeros([num_classes], (Kind::Float, cpu))?.set_requires_grad(true);
    let mut buffers: Option<(Tensor, Tensor)> = None;

    let mut epochs = Vec::with_capacity(opts.epochs as usize);
    let (mut best_top1, mut best_epoch) = (f64::NEG_INFINITY, 0);
    for epoch in 0..opts.epochs {
        let lr = cosine_lr(opts.lr, epoch, opts.epochs);
        let order = SplitMix64::derive(opts.seed, &[1, epoch as u64]).permutation(n_train as usize);
        let order = Tensor::from_slice(&order.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let (mut loss_sum, mut seen) = (0.0, 0i64);
        let mut start = 0;
        while start < n_train {
            let b = opts.batch_size.min(n_train - start);
            let idx = order.f_narrow(0, start, b)?;
            let logits = x.f_index_select(0, &idx)?.f_linear(&weight, Some(&bias))?;
            let loss = logits.f_cross_entropy_loss::<Tensor>(
                &y.f_index_select(0, &idx)?,
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            )?;
            let (gw, gb) = {
                let g = Tensor::f_run_backward(&[&loss], &[&weight, &bias], false, false)?;
                (g[0].shallow_clone(), g[1].shallow_clone())
            };
            let _guard = tch::no_grad_guard();
            let (bw, bb) = match buffers.take() {
                None => (gw.copy(), gb.copy()),
                Some((bw, bb)) => (
                    bw.f_mul_scalar(opts.momentum)?.f_add(&gw)?,
                    bb.f_mul_scalar(opts.momentum)?.f_add(&gb)?,
                ),
            };
            let _ = weight.shallow_clone().f_sub_(&bw.f_mul_scalar(lr)?)?;
            let _ = bias.shallow_clone().f_sub_(&bb.f_mul_scalar(lr)?)?;
            buffers = Some((bw, bb));
            loss_sum += loss.f_double_value(&[])? * b as f64;
            seen += b;
            start += b;
        }
        let (val_top1, val_top5) = {
            let _guard = tch::no_grad_guard();
            accuracy(&xv.f_linear(&weight, Some(&bias))?, &yv)?
        };
        if val_top1 > best_top1 {
            best_top1 = val_top1;
            best_epoch = epoch;
        }
        epochs.push(LinearEpoch {
            epoch,
            lr,
            train_loss: loss_sum / seen as f64,
            val_top1,
            val_top5,
        });
    }
    Ok(LinearProbeReport {
        n_train,
        n_val,
        dim,
        num_classes,
        best_top1,
        best_epoch,
        final_top1: epochs.last().map_or(f64::NAN, |e| e.val_top1),
        epochs,
    })
}

/// Top-1 and top-5 accuracy (percent) of logits `[N, C]` against labels `[N]`.
pub(crate) fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<(f64, f64)> {
    let n = logits.size()[0];
    let c = logits.size()[1];
    let (_, top) = logits.f_topk(5.min(c), 1, true, true)?;
    let correct = top.f_eq_tensor(&labels.f_reshape([n, 1])?)?;
    let top1 = correct
        .f_narrow(1, 0, 1)?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
    let top5 = correct.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    Ok((
        top1 as f64 * 100.0 / n as f64,
        top5 as f64 * 100.0 / n as f64,
    ))
}

/// Probes trained with several learning rates (pitfall 15: the best lr depends on the
/// checkpoint; iBOT trains one classifier per lr and keeps the best).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearSweepReport {
    pub best_lr: f64,
    pub best_top1: f64,
    pub runs: Vec<LinearProbeReport>,
}

/// [`linear_probe`] once per learning rate of `lrs` (other options from `base`); the report
/// names the lr with the best validation top-1 (the first on ties).
pub fn linear_probe_sweep(
    train_features: &Tensor,
    train_labels: &Tensor,
    val_features: &Tensor,
    val_labels: &Tensor,
    lrs: &[f64],
    base: &LinearProbeOptions,
) -> Result<LinearSweepReport> {
    if lrs.is_empty() {
        return Err(AnalysisError::invalid(
            "lrs",
            "the learning-rate list is empty",
        ));
    }
    let mut runs = Vec::with_capacity(lrs.len());
    let (mut best_lr, mut best_top1) = (lrs[0], f64::NEG_INFINITY);
    for &lr in lrs {
        let opts = LinearProbeOptions { lr, ..base.clone() };
        let r = linear_probe(
            train_features,
            train_labels,
            val_features,
            val_labels,
            &opts,
        )?;
        if r.best_top1 > best_top1 {
            best_top1 = r.best_top1;
            best_lr = lr;
        }
        runs.push(r);
    }
    Ok(LinearSweepReport {
        best_lr,
        best_top1,
        runs,
    })
}
