//! Weighted k-NN against a brute-force implementation and against the PyTorch golden of
//! `reference/golden_eval.py` (DINO's eval_knn written from the spec).

mod support;

use std::path::Path;

use protodino_analysis::knn::{KnnOptions, knn_classify};
use support::*;
use tch::{Kind, Tensor};

/// The definition, one test sample at a time, in f64.
fn brute_force(
    train: &[Vec<f64>],
    train_y: &[i64],
    test: &[Vec<f64>],
    test_y: &[i64],
    k: usize,
    t: f64,
    classes: usize,
) -> (f64, f64, Vec<Option<f64>>) {
    let train: Vec<Vec<f64>> = train.iter().map(|v| normalize(v)).collect();
    let (mut top1, mut top5) = (0, 0);
    let (mut hit, mut count) = (vec![0usize; classes], vec![0usize; classes]);
    for (x, &y) in test.iter().zip(test_y) {
        let x = normalize(x);
        let mut sims: Vec<(f64, usize)> = train
            .iter()
            .enumerate()
            .map(|(i, v)| (x.iter().zip(v).map(|(a, b)| a * b).sum(), i))
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut score = vec![0.0; classes];
        for &(s, i) in &sims[..k] {
            score[train_y[i] as usize] += (s / t).exp();
        }
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| score[b].total_cmp(&score[a])); // stable: ties by index
        top1 += (order[0] as i64 == y) as usize;
        count[y as usize] += 1;
        hit[y as usize] += (order[0] as i64 == y) as usize;
        top5 += order[..5.min(k).min(classes)].contains(&(y as usize)) as usize;
    }
    let n = test.len() as f64;
    let per_class = hit
        .iter()
        .zip(&count)
        .map(|(&h, &c)| (c > 0).then(|| h as f64 * 100.0 / c as f64))
        .collect();
    (top1 as f64 * 100.0 / n, top5 as f64 * 100.0 / n, per_class)
}

#[test]
fn matches_brute_force() {
    let classes = 7;
    let means = gaussian(classes, 24, 1);
    let mut r = protodino_analysis::rng::SplitMix64::new(2);
    let mut make = |n: usize, seed: u64| {
        let noise = gaussian(n, 24, seed);
        let labels: Vec<i64> = (0..n).map(|_| r.below(classes as u64) as i64).collect();
        let x: Vec<Vec<f64>> = labels
            .iter()
            .zip(&noise)
            .map(|(&l, z)| {
                means[l as usize]
                    .iter()
                    .zip(z)
                    .map(|(m, e)| m + 1.2 * e)
                    .collect()
            })
            .collect();
        (x, labels)
    };
    let (train, train_y) = make(300, 3);
    let (test, test_y) = make(123, 4);
    let opts = KnnOptions {
        ks: vec![1, 3, 20, 100],
        temperature: 0.07,
        num_chunks: 10,
    };
    let report = knn_classify(
        &to_tensor_f32(&train),
        &Tensor::from_slice(&train_y),
        &to_tensor_f32(&test),
        &Tensor::from_slice(&test_y),
        &opts,
    )
    .unwrap();
    assert_eq!(report.num_classes, classes as i64);
    for r in &report.results {
        let (t1, t5, per_class) = brute_force(
            &train,
            &train_y,
            &test,
            &test_y,
            r.k as usize,
            0.07,
            classes,
        );
        assert_eq!((r.top1, r.top5), (t1, t5), "k = {}", r.k);
        assert_eq!(r.per_class_top1.len(), classes);
        for (c, (a, b)) in r.per_class_top1.iter().zip(&per_class).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-9, "class {c}: {a} vs {b}"),
                _ => assert_eq!(a, b, "class {c}"),
            }
        }
    }
    assert!(report.results[2].top1 > 30.0 && report.results[2].top1 < 100.0);
}

#[test]
fn matches_pytorch_golden() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tensors = Tensor::read_safetensors(dir.join("knn_golden.safetensors")).unwrap();
    let get = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .unwrap()
    };
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("knn_golden.json")).unwrap())
            .unwrap();
    let report = knn_classify(
        &get("train_features"),
        &get("train_labels"),
        &get("test_features"),
        &get("test_labels"),
        &KnnOptions::default(),
    )
    .unwrap();
    let expect = golden["results"].as_array().unwrap();
    assert_eq!(report.results.len(), expect.len());
    for (r, e) in report.results.iter().zip(expect) {
        assert_eq!(r.k, e["k"].as_i64().unwrap());
        // Exact counts; the tolerance only absorbs JSON float parsing (1 ulp).
        let same = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(
            same(r.top1, e["top1"].as_f64().unwrap()),
            "top1 at k = {}",
            r.k
        );
        assert!(
            same(r.top5, e["top5"].as_f64().unwrap()),
            "top5 at k = {}",
            r.k
        );
    }
}

#[test]
fn rejects_bad_inputs() {
    let x = Tensor::randn([10, 4], (Kind::Float, tch::Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 0, 1, 0, 1, 0, 1, 0, 1]);
    let opts = KnnOptions::default(); // k up to 200 > 10 train samples
    assert!(knn_classify(&x, &y, &x, &y, &opts).is_err());
    let neg = Tensor::from_slice(&[0i64, -1, 0, 1, 0, 1, 0, 1, 0, 1]);
    let small = KnnOptions {
        ks: vec![3],
        ..Default::default()
    };
    assert!(knn_classify(&x, &neg, &x, &y, &small).is_err());
    assert!(knn_classify(&x, &y.to_kind(Kind::Float), &x, &y, &small).is_err());
    assert!(knn_classify(&x, &y, &x, &y, &small).is_ok());
}
