//! The trainer end to end on the tiny network: bit-identical resume, importing official-style
//! checkpoints (`module.` prefix, no optimiser state), the non-finite abort with its replay
//! files, replay itself, and a short run in which the loss falls.

mod support;

use std::collections::BTreeMap;

use protodino_dino::replay::{ReplayOverrides, read_batch, replay, write_batch};
use protodino_dino::{DinoError, LocalReducer};
use support::*;
use tch::{Kind, Tensor};

fn all_state(t: &TinyTrainer) -> BTreeMap<String, Tensor> {
    t.checkpoint_tensors().into_iter().collect()
}

#[test]
fn resume_is_bit_identical() {
    let dir = TempDir::new("resume");
    let mut cfg = tiny_config();
    cfg.koleo.nn_refresh_interval = 3; // the neighbour cache must survive the checkpoint too
    let n = 6;
    let k = 3;
    let mut straight = tiny_trainer(cfg.clone());
    for s in 0..n {
        straight
            .train_step(&synthetic_batch(s, 2, 2), &LocalReducer)
            .unwrap();
    }
    let mut first = tiny_trainer(cfg.clone());
    for s in 0..k {
        first
            .train_step(&synthetic_batch(s, 2, 2), &LocalReducer)
            .unwrap();
    }
    let path = dir.0.join("ckpt.safetensors");
    first.data_position = serde_json::json!({"epoch": 1, "offset": 6});
    first.save_checkpoint(&path).unwrap();
    drop(first);
    let mut cfg2 = cfg.clone();
    cfg2.train.seed = 99; // a different init must be fully overwritten by the checkpoint
    let mut resumed = tiny_trainer(cfg2);
    let loaded = resumed.load_checkpoint(&path).unwrap();
    let meta = loaded.meta.unwrap();
    assert_eq!(meta.step, k);
    assert_eq!(meta.data_position["offset"], 6);
    assert!(loaded.had_optimizer_state && loaded.had_center);
    assert_eq!(resumed.step, k);
    for s in k..n {
        resumed
            .train_step(&synthetic_batch(s, 2, 2), &LocalReducer)
            .unwrap();
    }
    let a = all_state(&straight);
    let b = all_state(&resumed);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, ta) in &a {
        assert!(ta.equal(&b[name]), "{name} differs after resume");
    }
    // The checkpoint uses the official names.
    for name in [
        "student.backbone.cls_token",
        "student.head.mlp.0.weight",
        "student.head.mlp.4.bias",
        "student.head.last_layer.weight_g",
        "student.head.last_layer.weight_v",
        "teacher.head.last_layer.weight_v",
        "dino_loss.center",
        "optimizer.exp_avg.student.head.mlp.0.weight",
        "optimizer.exp_avg_sq.student.backbone.cls_token",
        "optimizer.step.student.head.last_layer.weight_v",
    ] {
        assert!(a.contains_key(name), "missing {name}");
    }
}

#[test]
fn official_checkpoint_with_module_prefix_loads() {
    let dir = TempDir::new("official");
    let src = tiny_trainer(tiny_config());
    // As an official DINO checkpoint converted to safetensors: DDP student, plain teacher,
    // no optimiser, no centre, no metadata.
    let mut tensors = Vec::new();
    for (n, t) in protodino_dino::params::named_variables(&src.student_vs) {
        tensors.push((n.replacen("student.", "student.module.", 1), t * 1.5));
    }
    for (n, t) in protodino_dino::params::named_variables(&src.teacher_vs) {
        tensors.push((n, t * 0.5));
    }
    let path = dir.0.join("official.safetensors");
    protodino_dino::io::save_tensors(&path, &tensors, &BTreeMap::new()).unwrap();
    let mut cfg = tiny_config();
    cfg.train.seed = 5;
    let mut t = tiny_trainer(cfg);
    let loaded = t.load_checkpoint(&path).unwrap();
    assert!(loaded.meta.is_none() && !loaded.had_optimizer_state && !loaded.had_center);
    let sv = protodino_dino::params::named_variables(&t.student_vs);
    let orig = protodino_dino::params::named_variables(&src.student_vs);
    for ((n, a), (_, b)) in sv.iter().zip(&orig) {
        assert!(a.equal(&(b * 1.5)), "{n}");
    }
    assert_eq!(t.step, 0);
    assert_eq!(
        t.dino_loss.center.abs().sum(Kind::Float).double_value(&[]),
        0.0
    );
    // It trains from there as a fresh optimiser.
    t.train_step(&synthetic_batch(0, 2, 2), &LocalReducer)
        .unwrap();

    // A wrong architecture is refused with the names.
    let bad = dir.0.join("bad.safetensors");
    let mut more: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    more.push((
        "student.module.head.extra.weight".into(),
        Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)),
    ));
    protodino_dino::io::save_tensors(&bad, &more, &BTreeMap::new()).unwrap();
    let err = t.load_checkpoint(&bad).unwrap_err().to_string();
    assert!(err.contains("student.head.extra.weight"), "{err}");
}

#[test]
fn non_finite_loss_aborts_untouched_and_replays() {
    let dir = TempDir::new("nonfinite");
    let mut t = tiny_trainer(tiny_config());
    t.set_failure_dir(&dir.0);
    t.train_step(&synthetic_batch(0, 2, 2), &LocalReducer)
        .unwrap();
    let before = all_state(&t);
    let bad = synthetic_batch(1, 2, 2);
    let _ = bad.global_crops[0].get(0).fill_(f64::NAN);
    let err = t.train_step(&bad, &LocalReducer).unwrap_err();
    let DinoError::NonFiniteLoss(report) = err else {
        panic!("expected NonFiniteLoss, got {err}");
    };
    assert_eq!(report.step, 1);
    assert!(!report.total.is_finite());
    // Nothing moved.
    assert_eq!(t.step, 1);
    for (name, tb) in &before {
        let now = all_state(&t);
        assert!(tb.equal(&now[name]), "{name} changed");
    }
    // The replay files reproduce the failure.
    let ckpt = report.checkpoint.clone().unwrap();
    let bfile = report.batch.clone().unwrap();
    let (b2, sv) = read_batch(&bfile).unwrap();
    assert_eq!(sv.unwrap().step, 1);
    assert_eq!(b2.local_crops.len(), 2);
    let k = tiny_config().head.out_dim;
    let build = move |p: &tch::nn::Path, student: bool| TinyDino::new(p, k, !student);
    let r = replay(
        tiny_config(),
        &ckpt,
        &bfile,
        ReplayOverrides::default(),
        None,
        build,
    )
    .unwrap();
    assert!(!r.total.is_finite() && r.had_optimizer_state && !r.applied);
}

#[test]
fn replay_equals_the_training_step() {
    let dir = TempDir::new("replay");
    let cfg = tiny_config();
    let k = cfg.head.out_dim;
    let build = move |p: &tch::nn::Path, student: bool| TinyDino::new(p, k, !student);
    let mut t = tiny_trainer(cfg.clone());
    for s in 0..2 {
        t.train_step(&synthetic_batch(s, 2, 2), &LocalReducer)
            .unwrap();
    }
    let ckpt = dir.0.join("c.safetensors");
    t.save_checkpoint(&ckpt).unwrap();
    let batch = synthetic_batch(2, 2, 2);
    let bfile = dir.0.join("b.safetensors");
    write_batch(&bfile, &batch, None).unwrap();
    let m = t.train_step(&batch, &LocalReducer).unwrap();

    let out = dir.0.join("c2.safetensors");
    let r = replay(
        cfg.clone(),
        &ckpt,
        &bfile,
        ReplayOverrides::default(),
        Some(&out),
        build,
    )
    .unwrap();
    assert!(r.applied && r.had_optimizer_state);
    assert_eq!(r.schedule, m.schedule);
    assert_eq!(
        (r.dino_loss, r.koleo_proto, r.total),
        (m.dino_loss, m.koleo_proto, m.total)
    );
    // The written state equals the trainer after its step.
    let (written, _) = protodino_dino::io::load_tensors(&out).unwrap();
    for (name, tt) in all_state(&t) {
        assert!(tt.equal(&written[&name]), "{name}");
    }
    // Overrides change the result (lr 0 leaves the student unchanged).
    let over = ReplayOverrides {
        lr: Some(0.0),
        teacher_temp: Some(0.05),
        ..Default::default()
    };
    let out0 = dir.0.join("c3.safetensors");
    let r0 = replay(cfg, &ckpt, &bfile, over, Some(&out0), build).unwrap();
    assert_eq!(r0.schedule.lr, 0.0);
    assert_eq!(r0.schedule.teacher_temp, 0.05);
    assert_ne!(r0.dino_loss, r.dino_loss);
    let (before, _) = protodino_dino::io::load_tensors(&ckpt).unwrap();
    let (after, _) = protodino_dino::io::load_tensors(&out0).unwrap();
    assert!(before["student.head.mlp.0.weight"].equal(&after["student.head.mlp.0.weight"]));
}

#[test]
fn loss_falls_in_a_short_run() {
    // Fixed initial weights (the reference's), constant teacher temperature (with the warm-up
    // the targets' entropy, the floor of the loss, would rise during the run).
    let dir = TempDir::new("falls");
    let mut cfg = tiny_config();
    cfg.train.epochs = 30;
    cfg.optim.lr = 2.0;
    cfg.optim.warmup_epochs = 1;
    cfg.optim.freeze_last_layer = 0;
    cfg.loss.warmup_teacher_temp_epochs = 0;
    cfg.loss.teacher_temp = 0.04;
    let mut t = golden_tiny_trainer_with(&dir.0, cfg);
    let mut losses = Vec::new();
    for s in 0..16 {
        let m = t
            .train_step(&synthetic_batch(s, 2, 2), &LocalReducer)
            .unwrap();
        losses.push(m.dino_loss);
    }
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let (head, tail) = (mean(&losses[..4]), mean(&losses[12..]));
    println!("tiny run dino loss: first 4 steps mean {head:.4}, last 4 mean {tail:.4}");
    assert!(tail < 0.5 * head, "loss did not fall: {losses:?}");
}

/// A "group" of two whose members hold the same values: every sum is the identity (so the step
/// is the single-member one) and the reducer records the bytes it was handed.
struct CountingPair(std::cell::Cell<u64>);

impl protodino_dino::Reducer for CountingPair {
    fn world_size(&self) -> usize {
        2
    }

    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> protodino_dino::Result<()> {
        let bytes: u64 = tensors
            .iter()
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum();
        self.0.set(self.0.get() + bytes);
        Ok(())
    }
}

#[test]
fn the_step_times_its_phases_and_counts_the_bytes_it_reduces() {
    let mut t = tiny_trainer(tiny_config());
    assert_eq!(t.last_timings, protodino_dino::StepTimings::default());
    t.train_step(&synthetic_batch(0, 2, 2), &LocalReducer)
        .unwrap();
    let alone = t.last_timings;
    assert_eq!(alone.all_reduce_bytes, 0, "nothing moves in a world of one");
    for (phase, s) in [
        ("forward", alone.forward),
        ("backward", alone.backward),
        ("optimizer", alone.optimizer),
    ] {
        assert!(s > 0.0 && s < 60.0, "{phase}: {s}");
    }
    assert!(alone.all_reduce >= 0.0 && alone.ema >= 0.0, "{alone:?}");

    let pair = CountingPair(std::cell::Cell::new(0));
    t.train_step(&synthetic_batch(1, 2, 2), &pair).unwrap();
    assert!(pair.0.get() > 4, "the gradients were reduced");
    assert_eq!(t.last_timings.all_reduce_bytes, pair.0.get());
}
