//! The single-process trainer end to end on real data (Fashion-MNIST, provisioned by
//! `cargo xtask data`): train, resume, analyse the checkpoint, replay a batch, evaluate.

use protodino_tests::{json_lines, protodino, repo_root};

/// A small configuration over the CPU demo preset: few steps, small batches, quick analysis.
const SMALL: &str = r#"
[head]
out_dim = 256
hidden_dim = 128
[data]
limit = 640
[train]
epochs = 2
batch_size_per_worker = 32
checkpoint_every_steps = 10
log_every_steps = 1
[eval]
analysis_every_steps = 10
usage_images = 200
"#;

#[test]
fn train_resume_analyse_and_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("small.toml");
    std::fs::write(&cfg, SMALL).unwrap();
    let demo = repo_root().join("configs/cpu-demo.toml");
    let out_dir = dir.path().join("run");
    let (demo, cfg_s, out_s) = (
        demo.to_str().unwrap(),
        cfg.to_str().unwrap(),
        out_dir.to_str().unwrap(),
    );
    let common = [
        "--config",
        demo,
        "--config",
        cfg_s,
        "--output-dir",
        out_s,
        "--json",
        "--knn-train-limit",
        "1000",
        "--knn-test-limit",
        "300",
    ];

    // 25 steps, then resume to 40 (2 epochs of 20 steps).
    let first = json_lines(&protodino(
        dir.path(),
        &[&["train", "--max-steps", "25"], &common[..]].concat(),
    ));
    let steps: Vec<_> = first.iter().filter(|r| r["kind"] == "step").collect();
    assert_eq!(steps.len(), 25);
    // The DINO loss is the targets' entropy (which rises early on, as the centre flattens the
    // teacher's targets) plus KL(teacher ‖ student), the part the student learns to lower.
    let kl = |r: &serde_json::Value| {
        r["dino_loss"].as_f64().unwrap() - r["teacher_entropy"].as_f64().unwrap()
    };
    let early: f64 = steps[..5].iter().map(|r| kl(r)).sum::<f64>() / 5.0;
    let late: f64 = steps[20..].iter().map(|r| kl(r)).sum::<f64>() / 5.0;
    assert!(
        late < 0.9 * early,
        "the student should learn the teacher's targets on real data: mean KL over the first \
         5 steps {early:.4}, over the last 5 {late:.4}"
    );
    assert!(
        first.iter().any(|r| r["kind"] == "collapse"),
        "collapse figures every 10 steps"
    );

    let second = json_lines(&protodino(dir.path(), &[&["train"], &common[..]].concat()));
    let fin = second
        .iter()
        .find(|r| r["kind"] == "final")
        .expect("final report");
    assert_eq!(fin["step"], 40);
    assert_eq!(
        fin["steps_run"], 15,
        "resumed from the final checkpoint of the first run (step 25)"
    );
    let counts = &fin["collapse"]["report"]["counts"];
    assert!(counts[0]["greedy"].as_i64().unwrap() >= 1);
    let usage = &fin["collapse"]["usage"];
    assert_eq!(usage["n_samples"], 200);
    let used = usage["used_clusters"].as_i64().unwrap();
    assert!((1..=200).contains(&used), "clusters used {used}");
    let mass: Vec<f64> = usage["grouped"]["mass_sorted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_f64().unwrap())
        .collect();
    assert!((mass.iter().sum::<f64>() - 1.0).abs() < 1e-6);
    assert!(mass.windows(2).all(|w| w[0] >= w[1]));
    let top1 = fin["knn"]["results"][0]["top1"].as_f64().unwrap();
    assert!(
        top1 > 30.0,
        "k-NN on Fashion-MNIST should beat chance (10%) clearly, got {top1}%"
    );

    // The checkpoint alone: unique prototypes.
    let ckpt = fin["checkpoint"].as_str().unwrap().to_string();
    let protos = json_lines(&protodino(
        dir.path(),
        &["prototypes", &ckpt, "--eps", "0.025,0.5", "--json"],
    ));
    assert_eq!(protos[0]["report"]["k"], 256);
    assert_eq!(protos[0]["report"]["counts"].as_array().unwrap().len(), 2);

    // k-NN from the checkpoint's own configuration.
    let knn = json_lines(&protodino(
        dir.path(),
        &[
            "knn",
            &ckpt,
            "--k",
            "20",
            "--train-limit",
            "1000",
            "--test-limit",
            "300",
            "--json",
        ],
    ));
    let again = knn[0]["results"][0]["top1"].as_f64().unwrap();
    assert!(
        (again - top1).abs() < 1e-9,
        "the checkpoint evaluates like the trainer that wrote it: {again} vs {top1}"
    );
}
