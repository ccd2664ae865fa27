//! Linear probe and few-shot logistic regression: a separable problem is learnt, and the
//! logistic-regression optimum equals scikit-learn's (golden from `reference/golden_eval.py`).

mod support;

use std::path::Path;

use protodino_analysis::fewshot::{
    FewShotOptions, Labelled, fewshot_eval, fewshot_run, fewshot_subset, fit_logistic,
};
use protodino_analysis::lbfgs::LbfgsOptions;
use protodino_analysis::linear::{LinearProbeOptions, cosine_lr, linear_probe, linear_probe_sweep};
use support::*;
use tch::{Kind, Tensor};

/// `n` samples of `classes` well separated Gaussian blobs in `d` dimensions.
fn blobs(n: usize, classes: usize, d: usize, spread: f64, seed: u64) -> (Tensor, Tensor) {
    let means = gaussian(classes, d, 1000);
    let noise = gaussian(n, d, seed);
    let labels: Vec<i64> = (0..n).map(|i| (i % classes) as i64).collect();
    let x: Vec<Vec<f64>> = labels
        .iter()
        .zip(&noise)
        .map(|(&l, z)| {
            means[l as usize]
                .iter()
                .zip(z)
                .map(|(m, e)| 3.0 * m + spread * e)
                .collect()
        })
        .collect();
    (to_tensor_f32(&x), Tensor::from_slice(&labels))
}

#[test]
fn linear_probe_learns_a_separable_problem() {
    let (x, y) = blobs(300, 3, 8, 0.3, 1);
    let (xv, yv) = blobs(90, 3, 8, 0.3, 2);
    let opts = LinearProbeOptions {
        epochs: 20,
        lr: 0.05,
        ..Default::default()
    };
    let r = linear_probe(&x, &y, &xv, &yv, &opts).unwrap();
    assert_eq!(r.best_top1, 100.0, "{r:?}");
    assert_eq!(r.epochs.len(), 20);
    assert!(r.epochs[19].train_loss < r.epochs[0].train_loss / 5.0);
    assert_eq!(r.epochs[0].lr, 0.05);
    assert!((r.epochs[10].lr - 0.025).abs() < 1e-12);
    // Deterministic for a seed.
    let again = linear_probe(&x, &y, &xv, &yv, &opts).unwrap();
    assert_eq!(r, again);
    // An untrained-looking run (tiny lr, 1 epoch) is far from perfect: the test can fail.
    let weak = linear_probe(
        &x,
        &y,
        &xv,
        &yv,
        &LinearProbeOptions {
            epochs: 1,
            lr: 1e-7,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(weak.best_top1 < 90.0, "{weak:?}");
}

#[test]
fn lr_sweep_picks_the_learning_rate_that_learns() {
    let (x, y) = blobs(150, 3, 8, 0.3, 5);
    let (xv, yv) = blobs(60, 3, 8, 0.3, 6);
    let base = LinearProbeOptions {
        epochs: 5,
        ..Default::default()
    };
    let r = linear_probe_sweep(&x, &y, &xv, &yv, &[1e-7, 0.05], &base).unwrap();
    assert_eq!(r.runs.len(), 2);
    assert_eq!(r.best_lr, 0.05, "{r:?}");
    assert_eq!(r.best_top1, r.runs[1].best_top1);
}

/// The whole SGD trajectory against torch.optim.SGD + CosineAnnealingLR (same init and shuffles,
/// drawn from the same SplitMix64 streams by the Python reference).
#[test]
fn linear_probe_matches_pytorch_trajectory() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tensors = Tensor::read_safetensors(dir.join("linear_golden.safetensors")).unwrap();
    let get = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .unwrap()
    };
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("linear_golden.json")).unwrap())
            .unwrap();
    let opts = LinearProbeOptions {
        epochs: golden["epochs"].as_i64().unwrap(),
        lr: golden["lr"].as_f64().unwrap(),
        batch_size: golden["batch"].as_i64().unwrap(),
        momentum: 0.9,
        seed: golden["seed"].as_u64().unwrap(),
    };
    let r = linear_probe(
        &get("train_features"),
        &get("train_labels"),
        &get("val_features"),
        &get("val_labels"),
        &opts,
    )
    .unwrap();
    let expect = golden["epochs_log"].as_array().unwrap();
    assert_eq!(r.epochs.len(), expect.len());
    let mut worst = 0.0f64;
    for (got, e) in r.epochs.iter().zip(expect) {
        let loss = e["train_loss"].as_f64().unwrap();
        worst = worst.max((got.train_loss - loss).abs() / loss);
        assert!((got.val_top1 - e["val_top1"].as_f64().unwrap()).abs() < 1e-9);
        assert!((got.val_top5 - e["val_top5"].as_f64().unwrap()).abs() < 1e-9);
    }
    eprintln!("linear probe vs PyTorch: worst relative train-loss error {worst:e}");
    assert!(worst < 1e-5, "worst relative train-loss error {worst}");
}

#[test]
fn cosine_schedule_reaches_zero() {
    assert_eq!(cosine_lr(0.1, 0, 100), 0.1);
    assert!((cosine_lr(0.1, 50, 100) - 0.05).abs() < 1e-15);
    assert!(cosine_lr(0.1, 100, 100).abs() < 1e-15);
}

#[test]
fn logistic_regression_matches_scikit_learn() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tensors = Tensor::read_safetensors(dir.join("logreg_golden.safetensors")).unwrap();
    let get = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .unwrap()
    };
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("logreg_golden.json")).unwrap())
            .unwrap();
    let lambd = golden["lambd"].as_f64().unwrap();
    let classes = golden["num_classes"].as_i64().unwrap();
    let solver = LbfgsOptions {
        grad_tol: 1e-9,
        ..Default::default()
    };
    let model = fit_logistic(
        &get("train_features"),
        &get("train_labels"),
        classes,
        lambd,
        &solver,
    )
    .unwrap();
    assert!(model.converged, "{model:?}");
    let coef = get("coef");
    let err = (&model.weight - &coef).abs().max().double_value(&[]);
    let scale = coef.abs().max().double_value(&[]);
    eprintln!("logistic regression vs scikit-learn: max |ΔW| = {err:e} (max |W| = {scale})");
    assert!(
        err < 1e-6 * scale,
        "max |W − W_sklearn| = {err} (scale {scale})"
    );

    let n = get("train_labels").size()[0] as usize;
    let all: Vec<usize> = (0..n).collect();
    let (train_x, train_y) = (get("train_features"), get("train_labels"));
    let (test_x, test_y) = (get("test_features"), get("test_labels"));
    let (_, top1) = fewshot_run(
        Labelled {
            features: &train_x,
            labels: &train_y,
        },
        &all,
        Labelled {
            features: &test_x,
            labels: &test_y,
        },
        classes,
        lambd,
        &solver,
    )
    .unwrap();
    assert_eq!(top1, golden["test_top1"].as_f64().unwrap());
}

#[test]
fn subsets_are_seeded_nested_and_per_class() {
    let labels: Vec<i64> = (0..100).map(|i| i % 10).collect();
    let one = fewshot_subset(&labels, 1, 0);
    let two = fewshot_subset(&labels, 2, 0);
    let five = fewshot_subset(&labels, 5, 0);
    assert_eq!((one.len(), two.len(), five.len()), (10, 20, 50));
    assert!(one.iter().all(|i| two.contains(i)));
    assert!(two.iter().all(|i| five.contains(i)));
    for c in 0..10 {
        assert_eq!(two.iter().filter(|&&i| labels[i] == c).count(), 2);
    }
    assert_eq!(one, fewshot_subset(&labels, 1, 0));
    assert_ne!(five, fewshot_subset(&labels, 5, 1));
    // A class with fewer samples than shots contributes all it has.
    let skewed = [0i64, 0, 0, 1];
    assert_eq!(fewshot_subset(&skewed, 2, 3).len(), 3);
}

#[test]
fn fewshot_protocol_over_shots_and_seeds() {
    let (x, y) = blobs(200, 5, 16, 1.0, 3);
    let (xt, yt) = blobs(100, 5, 16, 1.0, 4);
    let r = fewshot_eval(&x, &y, &xt, &yt, &FewShotOptions::default()).unwrap();
    assert_eq!(r.results.len(), 3);
    for res in &r.results {
        assert_eq!(res.runs.len(), 3);
        assert!(res.runs.iter().all(|run| run.converged));
        assert_eq!(res.runs[0].n_train, 5 * res.shots);
        assert!(res.top1.mean > 80.0, "{res:?}");
    }
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains("\"shots\":5"));
    assert!(
        fewshot_eval(
            &x,
            &y.to_kind(Kind::Float),
            &xt,
            &yt,
            &FewShotOptions::default()
        )
        .is_err()
    );
}
