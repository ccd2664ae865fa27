//! The mechanism experiment end to end on tiny problems: the binary's record (shape and
//! determinism for a seed) and the direction KoLeo-proto moves the prototypes in.

use std::path::Path;
use std::process::Command;

use protodino_mechanism::experiment::{MechanismOptions, run};
use protodino_mechanism::synthetic::{SyntheticSpec, generate};
use serde_json::Value;

fn run_binary(out: &Path, name: &str) -> Value {
    let status = Command::new(env!("CARGO_BIN_EXE_protodino-mechanism"))
        .args([
            "synthetic",
            "--clusters",
            "4",
            "--dim",
            "16",
            "--samples",
            "256",
            "--k",
            "32",
            "--steps",
            "16",
            "--batch",
            "32",
            "--hidden-dim",
            "32",
            "--bottleneck-dim",
            "16",
            "--analysis-every",
            "8",
            "--log-every",
            "4",
            "--probe",
            "128",
            "--lambda",
            "0.1",
            "--eps",
            "0.025,0.1,0.5",
            "--quiet",
            "--name",
            name,
        ])
        .arg("--out")
        .arg(out)
        .output()
        .expect("running protodino-mechanism");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("teacher targets: mean entropy"), "{stdout}");
    let text = std::fs::read_to_string(out.join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The record without its wall-clock timings.
fn without_timings(v: Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.into_iter()
                .filter(|(k, _)| k != "seconds")
                .map(|(k, x)| (k, without_timings(x)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(without_timings).collect()),
        other => other,
    }
}

#[test]
fn binary_writes_a_complete_deterministic_record() {
    let dir = tempfile::tempdir().unwrap();
    let a = run_binary(dir.path(), "a");
    assert_eq!(a["kind"], "mechanism");
    assert_eq!(a["steps_run"], 16);
    assert_eq!(a["features"]["classes"], 4);
    // Steps 4, 8, 12, 16 logged; analyses at 0, 8, 16.
    assert_eq!(a["steps"].as_array().unwrap().len(), 4);
    let steps: Vec<i64> = a["analyses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 8, 16]);
    let f = &a["final"];
    assert_eq!(f["step"], 16);
    for head in ["teacher", "student"] {
        let h = &f[head];
        assert_eq!(h["head"], head);
        assert_eq!(h["report"]["counts"].as_array().unwrap().len(), 3);
        assert!(h["report"]["nn"]["koleo_proto"].is_f64());
        assert!(
            h["displacement"]["mean"].as_f64().unwrap() > 0.0,
            "{head} moved"
        );
        let d0 = a["analyses"][0][head]["displacement"]["mean"]
            .as_f64()
            .unwrap();
        assert!(d0.abs() < 1e-12, "{head} at step 0: {d0}");
    }
    assert!((a["ln_k"].as_f64().unwrap() - 32f64.ln()).abs() < 1e-12);
    assert!(f["sharpness"]["relative"].as_f64().unwrap() <= 1.0 + 1e-9);
    assert_eq!(f["usage"]["n_samples"], 128);
    assert!(f["usage"]["used_clusters"].as_u64().unwrap() >= 1);
    assert!(f["usage"]["grouped"]["used_groups"].as_u64().unwrap() >= 1);
    let mass: f64 = f["grouped_mass_sorted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .sum();
    assert!((mass - 1.0).abs() < 1e-6, "grouped MLCD sums to 1: {mass}");
    // λ > 0: the loss computes KoLeo-proto.
    assert!(a["steps"][0]["koleo_proto"].as_f64().unwrap() != 0.0);

    let b = run_binary(dir.path(), "b");
    assert_eq!(
        without_timings(a),
        without_timings(b),
        "same seed, same record"
    );
}

#[test]
fn koleo_proto_spreads_the_prototypes_and_is_measured_at_lambda_zero() {
    let features = generate(&SyntheticSpec {
        clusters: 4,
        dim: 16,
        samples: 256,
        spread: 0.3,
        view_noise: 0.1,
        imbalance: 1.0,
        seed: 1,
    })
    .unwrap();
    let opts = |lambda: f64| MechanismOptions {
        k: 64,
        lambda,
        steps: 40,
        batch: 64,
        lr: 5e-3,
        warmup_epochs: 0,
        hidden_dim: 32,
        bottleneck_dim: 16,
        analysis_every: 0,
        probe: 64,
        eps: vec![0.025, 0.1],
        ..MechanismOptions::default()
    };
    let plain = run(&features, &opts(0.0), |_| {}).unwrap();
    let kp = run(&features, &opts(1.0), |_| {}).unwrap();
    let nn = |r: &protodino_mechanism::MechanismRecord| r.final_figures.student.report.nn.mean;
    let start = plain.analyses[0].student.report.nn.mean;
    assert_eq!(start, kp.analyses[0].student.report.nn.mean, "same init");
    assert!(
        nn(&kp) > nn(&plain) + 0.02 && nn(&kp) > start,
        "λ = 1 spreads: start {start}, λ = 0 {}, λ = 1 {}",
        nn(&plain),
        nn(&kp)
    );
    // At λ = 0 the loss never computes L_KP, yet the analysis measures it.
    assert!(plain.steps.iter().all(|s| s.koleo_proto == 0.0));
    assert!(
        plain
            .final_figures
            .student
            .report
            .nn
            .koleo_proto
            .is_finite()
    );
    assert!(plain.final_figures.teacher.report.nn.koleo_proto != 0.0);
}
