//! Weighted k-NN classification exactly as DINO's `eval_knn.py` (docs/algorithm.md §4.1).
//!
//! Train and test features are L2-normalised (F.normalize, eps 1e-12); for each test feature
//! the cosine similarities to all train features are computed, the top-k neighbours taken,
//! each weighted by `exp(s/T)`, the weights summed per class, and the classes ranked by score;
//! top-1 and top-5 accuracies (percent) are reported. The test set is processed in chunks of
//! `n_test / num_chunks` rows (DINO: 100 chunks), and one top-`max(k)` search serves every k of
//! the list (the first k of a sorted top-k are the top-k).
//!
//! Ranking of classes uses a *stable* descending sort, so classes with equal scores (in
//! practice: classes that received no vote) are ranked by class index. DINO's unstable
//! `sort` may order such ties differently; this only matters for top-5 when fewer than five
//! classes received votes.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{AnalysisError, Result};
use crate::prototypes::l2_normalize_rows;
use crate::stats::positive;

/// Options of [`knn_classify`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnnOptions {
    /// Neighbour counts to evaluate (DINO prints 10, 20, 100, 200; 20 is the headline).
    pub ks: Vec<i64>,
    /// Temperature `T` of the weights `exp(s/T)`.
    pub temperature: f64,
    /// The test set is processed in this many chunks.
    pub num_chunks: i64,
}

impl Default for KnnOptions {
    fn default() -> Self {
        KnnOptions {
            ks: vec![10, 20, 100, 200],
            temperature: 0.07,
            num_chunks: 100,
        }
    }
}

/// Accuracy at one k (percent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnnResult {
    pub k: i64,
    pub top1: f64,
    pub top5: f64,
    /// Top-1 accuracy (percent) of each class's test images, indexed by label; `None` for a
    /// label with no test image. Long-tailed studies read head and tail accuracy from it.
    #[serde(default)]
    pub per_class_top1: Vec<Option<f64>>,
}

/// The JSON-serialisable k-NN report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnnReport {
    pub n_train: i64,
    pub n_test: i64,
    pub num_classes: i64,
    pub temperature: f64,
    pub results: Vec<KnnResult>,
}

/// Check `[N]` integer labels against `n` rows; returns the largest label.
pub(crate) fn check_labels(labels: &Tensor, n: i64, what: &str) -> Result<i64> {
    if labels.size() != [n] {
        return Err(AnalysisError::Shape(format!(
            "{what} labels must be [{n}], found {:?}",
            labels.size()
        )));
    }
    if labels.is_floating_point() || labels.kind() == Kind::Bool {
        return Err(AnalysisError::Labels(format!(
            "{what} labels must be integers, found {:?}",
            labels.kind()
        )));
    }
    if n == 0 {
        return Ok(-1);
    }
    let min = labels.f_min()?.f_int64_value(&[])?;
    if min < 0 {
        return Err(AnalysisError::Labels(format!(
            "{what} labels contain {min} (must be ≥ 0)"
        )));
    }
    Ok(labels.f_max()?.f_int64_value(&[])?)
}

/// Check a `[N, D]` feature matrix; returns N.
pub(crate) fn check_features(x: &Tensor, what: &str, dim: Option<i64>) -> Result<i64> {
    let size = x.size();
    if size.len() != 2 || dim.is_some_and(|d| size[1] != d) {
        return Err(AnalysisError::Shape(format!(
            "{what} features must be [N, {}], found {size:?}",
            dim.map_or("D".to_string(), |d| d.to_string())
        )));
    }
    Ok(size[0])
}

/// Weighted k-NN accuracy of `test` against `train` (features `[N, D]`, labels `[N]` i64).
pub fn knn_classify(
    train_features: &Tensor,
    train_labels: &Tensor,
    test_features: &Tensor,
    test_labels: &Tensor,
    opts: &KnnOptions,
) -> Result<KnnReport> {
    let n_train = check_features(train_features, "train", None)?;
    let dim = train_features.size()[1];
    let n_test = check_features(test_features, "test", Some(dim))?;
    let max_train = check_labels(train_labels, n_train, "train")?;
    let max_test = check_labels(test_labels, n_test, "test")?;
    if n_train == 0 || n_test == 0 {
        return Err(AnalysisError::invalid(
            "features",
            "train and test must be non-empty",
        ));
    }
    if opts.ks.is_empty() || opts.ks.iter().any(|&k| k < 1 || k > n_train) {
        return Err(AnalysisError::invalid(
            "ks",
            format!("each k must be in 1..={n_train}, got {:?}", opts.ks),
        ));
    }
    if !positive(opts.temperature) || opts.num_chunks < 1 {
        return Err(AnalysisError::invalid(
            "temperature/num_chunks",
            "temperature must be > 0 and num_chunks ≥ 1",
        ));
    }
    let num_classes = max_train.max(max_test) + 1;
    let k_max = *opts.ks.iter().max().unwrap_or(&1);
    let _guard = tch::no_grad_guard();
    let cpu = tch::Device::Cpu;
    let train = l2_normalize_rows(&train_features.f_to_device(cpu)?.f_to_kind(Kind::Float)?)?;
    let train_t = train.f_tr()?.f_contiguous()?;
    let test = l2_normalize_rows(&test_features.f_to_device(cpu)?.f_to_kind(Kind::Float)?)?;
    let train_labels = train_labels.f_to_device(cpu)?.f_to_kind(Kind::Int64)?;
    let test_labels = test_labels.f_to_device(cpu)?.f_to_kind(Kind::Int64)?;

    let per_chunk = (n_test / opts.num_chunks).max(1);
    let mut top1 = vec![0i64; opts.ks.len()];
    let mut top5 = vec![0i64; opts.ks.len()];
    let mut class_correct = vec![vec![0i64; num_classes as usize]; opts.ks.len()];
    let class_count: Vec<i64> = Vec::<i64>::try_from(
        &test_labels
            .f_bincount(None::<&Tensor>, num_classes)?
            .f_to_kind(Kind::Int64)?,
    )?;
    let mut start = 0;
    while start < n_test {
        let b = per_chunk.min(n_test - start);
        let features = test.f_narrow(0, start, b)?;
        let targets = test_labels.f_narrow(0, start, b)?.f_reshape([b, 1])?;
        let similarity = features.f_mm(&train_t)?;
        let (distances, indices) = similarity.f_topk(k_max, 1, true, true)?;
        let neighbours = train_labels.f_index_select(0, &indices.f_reshape([-1])?)?;
        let neighbours = neighbours.f_reshape([b, k_max])?;
        let weights = distances.f_div_scalar(opts.temperature)?.f_exp()?;
        for (i, &k) in opts.ks.iter().enumerate() {
            let scores = Tensor::f_zeros([b, num_classes], (Kind::Float, cpu))?.f_scatter_add(
                1,
                &neighbours.f_narrow(1, 0, k)?,
                &weights.f_narrow(1, 0, k)?,
            )?;
            let (_, predictions) = scores.f_sort_stable(true, 1, true)?;
            let correct = predictions.f_eq_tensor(&targets)?;
            let first = correct.f_narrow(1, 0, 1)?.f_reshape([b])?;
            top1[i] += first.f_sum(Kind::Int64)?.f_int64_value(&[])?;
            let hits = Tensor::f_zeros([num_classes], (Kind::Int64, cpu))?.f_scatter_add(
                0,
                &targets.f_reshape([b])?,
                &first.f_to_kind(Kind::Int64)?,
            )?;
            for (c, h) in Vec::<i64>::try_from(&hits)?.into_iter().enumerate() {
                class_correct[i][c] += h;
            }
            let five = 5.min(k).min(num_classes);
            top5[i] += correct
                .f_narrow(1, 0, five)?
                .f_sum(Kind::Int64)?
                .f_int64_value(&[])?;
        }
        start += b;
    }
    let pct = |c: i64| c as f64 * 100.0 / n_test as f64;
    Ok(KnnReport {
        n_train,
        n_test,
        num_classes,
        temperature: opts.temperature,
        results: opts
            .ks
            .iter()
            .enumerate()
            .map(|(i, &k)| KnnResult {
                k,
                top1: pct(top1[i]),
                top5: pct(top5[i]),
                per_class_top1: class_correct[i]
                    .iter()
                    .zip(&class_count)
                    .map(|(&c, &n)| (n > 0).then(|| c as f64 * 100.0 / n as f64))
                    .collect(),
            })
            .collect(),
    })
}
