//! What the service scenarios share: the tiny deterministic recipe, a runtime, state
//! predicates, waiting for idle workers, and the undisturbed single-process reference that
//! every disturbed run must end equal to.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use protodino_proto::v1::{Job, JobState};

use crate::cluster::{Coordinator, load_f32, metric, state};
use crate::{protodino, repo_root};

/// Tiny and deterministic: 160 images, global batch 16 → 10 steps per epoch; no stochastic
/// depth; one thread per worker.
pub const BASE: &str = r#"
[model]
drop_path_rate = 0.0
[head]
out_dim = 256
hidden_dim = 128
[data]
limit = 160
[eval]
analysis_every_steps = 5
usage_images = 64
knn_train_images = 200
knn_test_images = 100
[train]
epochs = 2
threads = 1
checkpoint_every_steps = 10
log_every_steps = 1
"#;

pub const MINUTES: Duration = Duration::from_secs(60);

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn is_state(s: JobState) -> impl Fn(&Job) -> bool {
    move |j| state(j) == s
}

/// Committed steps of a job (0 before the first).
pub fn step_of(job: &Job) -> i64 {
    job.progress.as_ref().map_or(0, |p| p.step)
}

/// Waits until the coordinator counts at least `n` idle workers (their first heartbeat
/// described them, so a job submitted now gets them all).
pub fn wait_idle(coordinator: &Coordinator, n: usize) {
    let deadline = Instant::now() + MINUTES;
    loop {
        let idle =
            metric(&coordinator.metrics(), "protodino_workers{state=\"idle\"}").unwrap_or(0.0);
        if idle >= n as f64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {idle} idle workers after a minute"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Drops the key third of every `attn.qkv.bias` (parameter, teacher copy, optimiser moments).
/// Softmax attention is invariant to the key bias, so its exact gradient is zero and what it
/// holds is summation noise that Adam normalises up to the size of a step: it differs between
/// any two summation orders (two static-peer ranks against one process too), not only here.
pub fn without_key_bias(mut t: BTreeMap<String, Vec<f32>>) -> BTreeMap<String, Vec<f32>> {
    for (name, v) in t.iter_mut() {
        if name.ends_with("attn.qkv.bias") {
            let d = v.len() / 3;
            v.drain(d..2 * d);
        }
    }
    t
}

/// The final checkpoint of `BASE` (+ `extra` TOML) trained for `steps` steps by one process
/// with the global batch `global_batch`: the undisturbed run (key bias dropped).
pub fn single_process(
    dir: &Path,
    extra: &str,
    global_batch: usize,
    steps: usize,
) -> BTreeMap<String, Vec<f32>> {
    let cfg = dir.join("single.toml");
    std::fs::write(
        &cfg,
        format!("{BASE}batch_size_per_worker = {global_batch}\n{extra}"),
    )
    .unwrap();
    let out = dir.join("single");
    let demo = repo_root().join("configs/cpu-demo.toml");
    protodino(
        dir,
        &[
            "train",
            "--config",
            demo.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--max-steps",
            &steps.to_string(),
            "--json",
        ],
    );
    without_key_bias(load_f32(
        &out.join(format!("checkpoint-{steps:08}.safetensors")),
    ))
}
