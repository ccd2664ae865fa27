//! Few-shot evaluation, MSN protocol (docs/algorithm.md §4.3): a few labelled images per class,
//! multinomial logistic regression on frozen features, mean ± std of top-1 over seeds.
//!
//! * **Subsets**: for a seed, one seeded permutation of the training set is scanned and the
//!   first `shots` samples of every class are taken. The same permutation serves every shot
//!   count, so the 1-shot subset is contained in the 2-shot one and that in the 5-shot one (as
//!   with growing MSN-style file lists). A class with fewer samples contributes all it has.
//!   Fixed file lists (MSN's `imagenet_subsets`) go through [`fewshot_run`] directly.
//! * **Preprocessing** (cyanure's, as MSN uses it): centre the columns with the mean of the
//!   labelled training features, then L2-normalise every row; the test features are centred
//!   with the *training* mean and normalised the same way.
//! * **Classifier**: `W ∈ R^{C×D}`, no intercept, minimising
//!   `(1/N) Σ_i [logsumexp(W x_i) − (W x_i)_{y_i}] + (λ/2)‖W‖²` with `λ = lambd / N`
//!   (MSN: `lambd = 0.00025`). This is scikit-learn's multinomial `LogisticRegression` with
//!   `C = 1/lambd` and `fit_intercept=False`. Solved in f64 by full-batch L-BFGS
//!   ([`crate::lbfgs`]) to `‖∇‖_∞ ≤ grad_tol` (cyanure stops at a relative duality gap of 1e-3
//!   instead; a tighter gradient tolerance gives the same or a more exact optimum).
//! * **Report**: top-1 (percent) per seed and mean ± population std (ddof 0) over the seeds.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{AnalysisError, Result};
use crate::knn::{check_features, check_labels};
use crate::lbfgs::{LbfgsOptions, minimize};
use crate::linear::accuracy;
use crate::prototypes::l2_normalize_rows;
use crate::rng::SplitMix64;
use crate::stats::{MeanStd, positive};

/// Options of [`fewshot_eval`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FewShotOptions {
    /// Labelled images per class (MSN: 1, 2, 5).
    pub shots: Vec<usize>,
    /// One subset per seed (MSN: three splits).
    pub seeds: Vec<u64>,
    /// Regularisation before division by N (MSN default 0.00025).
    pub lambd: f64,
    pub solver: LbfgsOptions,
}

impl Default for FewShotOptions {
    fn default() -> Self {
        FewShotOptions {
            shots: vec![1, 2, 5],
            seeds: vec![0, 1, 2],
            lambd: 0.00025,
            solver: LbfgsOptions::default(),
        }
    }
}

/// One fit on one labelled subset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FewShotRun {
    pub seed: u64,
    pub n_train: usize,
    pub top1: f64,
    pub iterations: usize,
    pub converged: bool,
    pub grad_inf_norm: f64,
    pub objective: f64,
}

/// All seeds at one shot count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FewShotResult {
    pub shots: usize,
    pub runs: Vec<FewShotRun>,
    /// Mean ± std (ddof 0) of top-1 over the seeds.
    pub top1: MeanStd,
}

/// The JSON-serialisable few-shot report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FewShotReport {
    pub lambd: f64,
    pub num_classes: i64,
    pub n_test: i64,
    pub results: Vec<FewShotResult>,
}

/// A fitted classifier: `W` `[C, D]` (f64) and the training mean used for centring.
#[derive(Debug)]
pub struct LogisticModel {
    pub weight: Tensor,
    pub mean: Tensor,
    pub iterations: usize,
    pub converged: bool,
    pub grad_inf_norm: f64,
    pub objective: f64,
}

/// Indices of the labelled subset for `shots` per class under `seed` (see the module doc).
pub fn fewshot_subset(labels: &[i64], shots: usize, seed: u64) -> Vec<usize> {
    let order = SplitMix64::derive(seed, &[0xf5_5e7]).permutation(labels.len());
    let mut taken: std::collections::HashMap<i64, usize> = Default::default();
    let mut subset = Vec::new();
    for i in order {
        let t = taken.entry(labels[i]).or_insert(0);
        if *t < shots {
            *t += 1;
            subset.push(i);
        }
    }
    subset.sort_unstable();
    subset
}

/// `(x − mean)` then rows L2-normalised.
fn preprocess(x: &Tensor, mean: &Tensor) -> Result<Tensor> {
    l2_normalize_rows(&x.f_sub(mean)?)
}

/// Fit the L2-regularised multinomial logistic regression (no intercept) on raw features:
/// centring and normalisation included, `λ = lambd / N`.
pub fn fit_logistic(
    features: &Tensor,
    labels: &Tensor,
    num_classes: i64,
    lambd: f64,
    solver: &LbfgsOptions,
) -> Result<LogisticModel> {
    let n = check_features(features, "train", None)?;
    check_labels(labels, n, "train")?;
    if n == 0 || num_classes < 1 || !positive(lambd) {
        return Err(AnalysisError::invalid(
            "fit_logistic",
            "needs samples, ≥ 1 class and lambd > 0",
        ));
    }
    let _guard = tch::no_grad_guard();
    let cpu = tch::Device::Cpu;
    let x = features.f_to_device(cpu)?.f_to_kind(Kind::Double)?;
    let mean = x.f_mean_dim([0i64].as_slice(), true, Kind::Double)?;
    let x = preprocess(&x, &mean)?;
    let d = x.size()[1];
    let y = labels.f_to_device(cpu)?.f_to_kind(Kind::Int64)?;
    let onehot = y.f_one_hot(num_classes)?.f_to_kind(Kind::Double)?;
    let lam = lambd / n as f64;
    let nf = n as f64;
    let objective = |w: &Tensor| -> Result<(f64, Tensor)> {
        let w = w.f_reshape([num_classes, d])?;
        let z = x.f_mm(&w.f_tr()?)?;
        let lse = z.f_logsumexp([1i64].as_slice(), false)?;
        let picked = z
            .f_mul(&onehot)?
            .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?;
        let data = lse
            .f_sub(&picked)?
            .f_mean(Kind::Double)?
            .f_double_value(&[])?;
        let reg = 0.5 * lam * w.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
        let p = z.f_softmax(1, Kind::Double)?;
        let grad = p
            .f_sub(&onehot)?
            .f_tr()?
            .f_mm(&x)?
            .f_div_scalar(nf)?
            .f_add(&w.f_mul_scalar(lam)?)?;
        Ok((data + reg, grad.f_reshape([-1])?))
    };
    let w0 = Tensor::f_zeros([num_classes * d], (Kind::Double, cpu))?;
    let r = minimize(objective, &w0, solver)?;
    Ok(LogisticModel {
        weight: r.x.f_reshape([num_classes, d])?,
        mean,
        iterations: r.iterations,
        converged: r.converged,
        grad_inf_norm: r.grad_inf_norm,
        objective: r.value,
    })
}

impl LogisticModel {
    /// Logits `[N, C]` of raw features (centred with the training mean, normalised).
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        let x = features
            .f_to_device(tch::Device::Cpu)?
            .f_to_kind(Kind::Double)?;
        Ok(preprocess(&x, &self.mean)?.f_mm(&self.weight.f_tr()?)?)
    }
}

/// Features `[N, D]` with their labels `[N]`.
#[derive(Debug, Clone, Copy)]
pub struct Labelled<'a> {
    pub features: &'a Tensor,
    pub labels: &'a Tensor,
}

/// Fit on the rows `subset` of `train` (e.g. an MSN file list) and score `test`; returns the
/// model and the test top-1 (percent).
pub fn fewshot_run(
    train: Labelled<'_>,
    subset: &[usize],
    test: Labelled<'_>,
    num_classes: i64,
    lambd: f64,
    solver: &LbfgsOptions,
) -> Result<(LogisticModel, f64)> {
    let n = check_features(train.features, "train", None)?;
    if let Some(bad) = subset.iter().find(|&&i| i as i64 >= n) {
        return Err(AnalysisError::invalid(
            "subset",
            format!("index {bad} ≥ {n} training samples"),
        ));
    }
    let idx = Tensor::from_slice(&subset.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let model = fit_logistic(
        &train.features.f_index_select(0, &idx)?,
        &train.labels.f_index_select(0, &idx)?,
        num_classes,
        lambd,
        solver,
    )?;
    let n_test = check_features(test.features, "test", Some(train.features.size()[1]))?;
    check_labels(test.labels, n_test, "test")?;
    let _guard = tch::no_grad_guard();
    let (top1, _) = accuracy(
        &model.logits(test.features)?,
        &test.labels.f_to_kind(Kind::Int64)?,
    )?;
    Ok((model, top1))
}

/// The few-shot protocol over every shot count and seed.
pub fn fewshot_eval(
    train_features: &Tensor,
    train_labels: &Tensor,
    test_features: &Tensor,
    test_labels: &Tensor,
    opts: &FewShotOptions,
) -> Result<FewShotReport> {
    let n_train = check_features(train_features, "train", None)?;
    let dim = train_features.size()[1];
    let n_test = check_features(test_features, "test", Some(dim))?;
    let max_train = check_labels(train_labels, n_train, "train")?;
    let max_test = check_labels(test_labels, n_test, "test")?;
    if n_train == 0 || n_test == 0 || opts.shots.is_empty() || opts.seeds.is_empty() {
        return Err(AnalysisError::invalid(
            "fewshot",
            "needs train and test samples, shots and seeds",
        ));
    }
    if opts.shots.contains(&0) {
        return Err(AnalysisError::invalid("shots", "must be ≥ 1"));
    }
    let num_classes = max_train.max(max_test) + 1;
    let labels = Vec::<i64>::try_from(&train_labels.f_to_kind(Kind::Int64)?)?;
    let mut results = Vec::new();
    for &shots in &opts.shots {
        let mut runs = Vec::new();
        for &seed in &opts.seeds {
            let subset = fewshot_subset(&labels, shots, seed);
            let (model, top1) = fewshot_run(
                Labelled {
                    features: train_features,
                    labels: train_labels,
                },
                &subset,
                Labelled {
                    features: test_features,
                    labels: test_labels,
                },
                num_classes,
                opts.lambd,
                &opts.solver,
            )?;
            runs.push(FewShotRun {
                seed,
                n_train: subset.len(),
                top1,
                iterations: model.iterations,
                converged: model.converged,
                grad_inf_norm: model.grad_inf_norm,
                objective: model.objective,
            });
        }
        let top1 = MeanStd::of(&runs.iter().map(|r| r.top1).collect::<Vec<_>>());
        results.push(FewShotResult { shots, runs, top1 });
    }
    Ok(FewShotReport {
        lambd: opts.lambd,
        num_classes,
        n_test,
        results,
    })
}
