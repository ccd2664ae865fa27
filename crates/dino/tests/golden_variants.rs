//! Golden comparisons of the loss variants — Sinkhorn-Knopp centring and the vMF prototypes
//! (docs/algorithm.md §1.6, §1.10) — against `reference/golden_variants.py` (PyTorch 2.11), and
//! of the vMF log-normaliser against SciPy (`scripts/vmf_log_normaliser.py`). Every comparison
//! prints its worst relative error (`cargo test -- --nocapture`), measured per tensor as
//! `max |ours − reference| / max |reference|` (see `support::max_rel_err`).

mod support;

use std::collections::BTreeMap;

use protodino_config::{Centering, PrototypeKind, TrainConfig};
use protodino_dino::vmf::{log_normaliser_and_derivative, log_normaliser_tensor, logit_correction};
use protodino_dino::{DinoLoss, LocalReducer, sinkhorn_knopp_teacher};
use support::*;
use tch::{Kind, Tensor};

const TOL: f64 = 1e-5;

fn report(what: &str, err: f64) {
    println!("golden {what}: worst relative error {err:.3e}");
    assert!(err <= TOL, "{what}: relative error {err:e} > {TOL:e}");
}

fn meta_f64(name: &str, key: &str) -> f64 {
    let (_, meta) = protodino_dino::io::load_tensors(&fixture(name)).unwrap();
    meta[key].parse().unwrap()
}

#[test]
fn log_normaliser_matches_scipy() {
    let fx = json("vmf_log_normaliser.json");
    let rows = fx["rows"].as_array().unwrap();
    assert!(rows.len() > 150);
    let (mut worst_v, mut worst_g) = (0.0f64, 0.0f64);
    for r in rows {
        let d = r["d"].as_i64().unwrap();
        let kappa = r["kappa"].as_f64().unwrap();
        let want_v = r["log_c"].as_f64().unwrap();
        let want_g = r["dlog_c"].as_f64().unwrap();
        let (v, g) = log_normaliser_and_derivative(d, kappa);
        // Values: relative to max(1, |value|) (they reach −9000 at κ = 10⁴); derivatives
        // (in (−1, 0]): relative, with a floor for the ≈ −κ/d ones next to 0.
        let ev = (v - want_v).abs() / want_v.abs().max(1.0);
        let eg = (g - want_g).abs() / want_g.abs().max(1e-6);
        assert!(
            ev <= 1e-11,
            "d {d} κ {kappa}: log C {v} vs {want_v} ({ev:e})"
        );
        assert!(eg <= 1e-9, "d {d} κ {kappa}: d/dκ {g} vs {want_g} ({eg:e})");
        worst_v = worst_v.max(ev);
        worst_g = worst_g.max(eg);
    }
    println!(
        "log C_d(κ) vs SciPy over {} (d, κ): worst relative error {worst_v:.3e} (value), \
         {worst_g:.3e} (derivative)",
        rows.len()
    );
}

#[test]
fn sinkhorn_knopp_targets_loss_and_grad() {
    let fx = load("sinkhorn.safetensors");
    let temp = meta_f64("sinkhorn.safetensors", "teacher_temp");
    let (v, k) = (3, 10);
    let out = sinkhorn_knopp_teacher(&fx["teacher_output"], temp, 3, &LocalReducer).unwrap();
    report(
        "sinkhorn-knopp targets",
        max_rel_err(&out.targets, &fx["targets"], 1e-6),
    );
    let loss = DinoLoss::new(k, v, 0.1, 0.9, tch::Device::Cpu);
    let student = fx["student_output"].detach().set_requires_grad(true);
    let l = loss
        .loss_with_targets(&student, &out.targets, None)
        .unwrap();
    let terms: Vec<f64> = l
        .pair_terms
        .iter()
        .map(|(_, t)| t.double_value(&[]))
        .collect();
    report(
        "sinkhorn-knopp loss pair terms",
        max_rel_err(&Tensor::from_slice(&terms), &fx["pair_terms"], 1e-6),
    );
    report(
        "sinkhorn-knopp loss",
        max_rel_err(&l.loss.reshape([1]), &fx["loss"], 1e-6),
    );
    l.loss.backward();
    report(
        "sinkhorn-knopp loss grad wrt student logits",
        max_rel_err(&student.grad(), &fx["grad_student"], 1e-6),
    );
}

#[test]
fn vmf_correction_on_fixed_prototypes() {
    let fx = load("vmf_logits.safetensors");
    let mut worst = 0.0f64;
    let mut worst_grad = 0.0f64;
    for d in [8, 256] {
        let w = &fx[&format!("d{d}.prototypes")];
        for temp in ["0.1", "0.04"] {
            let want = &fx[&format!("d{d}.log_c.t{temp}")];
            let want = want - want.max();
            let ours = logit_correction(w, temp.parse().unwrap()).unwrap();
            assert_eq!(ours.size(), [1, 16]);
            worst = worst.max(max_rel_err(&ours.reshape([16]), &want, 1e-6));
            // The derivative the correction back-propagates, in f64.
            let kappa = (w
                .to_kind(Kind::Double)
                .norm_scalaropt_dim(2, [1i64].as_slice(), false)
                / temp.parse::<f64>().unwrap())
            .set_requires_grad(true);
            log_normaliser_tensor(&kappa, d, false)
                .unwrap()
                .sum(Kind::Double)
                .backward();
            worst_grad = worst_grad.max(max_rel_err(
                &kappa.grad(),
                &fx[&format!("d{d}.dlog_c.t{temp}")],
                1e-6,
            ));
        }
    }
    report("vMF correction log C_d(|w|/τ) (d 8, 256)", worst);
    assert!(worst_grad <= 1e-9, "{worst_grad:e}");
    println!("golden vMF correction derivative (f64): worst relative error {worst_grad:.3e}");
}

#[test]
fn vmf_loss_on_fixed_features_and_prototypes() {
    let fx = load("vmf_logits.safetensors");
    let tau_s = meta_f64("vmf_logits.safetensors", "student_temp");
    let tau_t = meta_f64("vmf_logits.safetensors", "teacher_temp");
    let (v, k) = (4, 12);
    let mut loss = DinoLoss::new(k, v, tau_s, 0.9, tch::Device::Cpu);
    loss.center = fx["center"].shallow_clone();
    let ys = fx["ys"].detach().set_requires_grad(true);
    let weight_v = fx["weight_v"].detach().set_requires_grad(true);
    let weight_g = fx["weight_g"].detach().set_requires_grad(true);
    let w_s = Tensor::internal_weight_norm(&weight_v, &weight_g, 0);
    let w_t = &fx["teacher_prototypes"];
    let student_output = ys.mm(&w_s.tr());
    let teacher_output = fx["yt"].mm(&w_t.tr());
    let t_bias = logit_correction(w_t, tau_t).unwrap();
    let targets = loss.centered_targets(&teacher_output, tau_t, Some(&t_bias));
    report(
        "vMF teacher targets",
        max_rel_err(&targets, &fx["targets"], 1e-6),
    );
    let s_bias = logit_correction(&w_s, tau_s).unwrap();
    let out = loss
        .loss_with_targets(&student_output, &targets, Some(&s_bias))
        .unwrap();
    let terms: Vec<f64> = out
        .pair_terms
        .iter()
        .map(|(_, t)| t.double_value(&[]))
        .collect();
    report(
        "vMF loss pair terms",
        max_rel_err(&Tensor::from_slice(&terms), &fx["pair_terms"], 1e-6),
    );
    report(
        "vMF loss",
        max_rel_err(&out.loss.reshape([1]), &fx["loss"], 1e-6),
    );
    out.loss.backward();
    report(
        "vMF loss grad wrt student features",
        max_rel_err(&ys.grad(), &fx["grad_ys"], 1e-6),
    );
    report(
        "vMF loss grad wrt weight_v",
        max_rel_err(&weight_v.grad(), &fx["grad_v"], 1e-6),
    );
    report(
        "vMF loss grad wrt weight_g (through log C_d)",
        max_rel_err(&weight_g.grad(), &fx["grad_g"], 1e-6),
    );
}

/// A tiny trainer of `cfg` with the initial weights of fixture `name` (student and teacher).
fn variant_trainer(dir: &std::path::Path, name: &str, cfg: TrainConfig) -> TinyTrainer {
    let fx = load(name);
    let mut tensors = Vec::new();
    for (k, v) in &fx {
        if let Some(n) = k.strip_prefix("init.") {
            tensors.push((n.to_string(), v.shallow_clone()));
            tensors.push((n.replacen("student.", "teacher.", 1), v.shallow_clone()));
        }
    }
    let path = dir.join("init.safetensors");
    protodino_dino::io::save_tensors(&path, &tensors, &BTreeMap::new()).unwrap();
    let mut t = tiny_trainer(cfg);
    let loaded = t.load_checkpoint(&path).unwrap();
    assert!(loaded.meta.is_none() && !loaded.had_optimizer_state && !loaded.had_center);
    t
}

/// Three steps of the tiny network with a variant against `tiny_step_<variant>.*`.
fn three_tiny_steps(variant: &str, centering: Centering, prototypes: PrototypeKind) {
    let dir = TempDir::new(&format!("golden-{variant}"));
    let name = format!("tiny_step_{variant}.safetensors");
    let fx = load(&name);
    let meta = json(&format!("tiny_step_{variant}.json"));
    let mut cfg = tiny_config();
    cfg.optim.freeze_last_layer = 0;
    cfg.loss.centering = centering;
    cfg.head.prototypes = prototypes;
    let mut t = variant_trainer(&dir.0, &name, cfg);
    let (mut worst_loss, mut worst_center) = (0.0f64, 0.0f64);
    for (it, want) in meta["steps"].as_array().unwrap().iter().enumerate() {
        let m = t.train_step(&golden_batch(&fx, it), &LocalReducer).unwrap();
        assert!(!m.last_layer_frozen);
        assert!((m.schedule.teacher_temp - want["teacher_temp"].as_f64().unwrap()).abs() < 1e-12);
        for (ours, key) in [
            (m.dino_loss, "dino_loss"),
            (m.koleo_proto, "koleo_proto"),
            (m.total, "total"),
        ] {
            worst_loss = worst_loss.max(rel(ours, want[key].as_f64().unwrap()));
        }
        worst_center = worst_center.max(max_rel_err(
            &t.dino_loss.center,
            &fx[&format!("center{it}")],
            1e-6,
        ));
    }
    if centering == Centering::Sinkhorn {
        assert_eq!(
            t.dino_loss.center.abs().max().double_value(&[]),
            0.0,
            "Sinkhorn-Knopp keeps no centre"
        );
    }
    report(&format!("{variant}: step losses x3"), worst_loss);
    report(&format!("{variant}: centre after each step"), worst_center);
    let (mut g_err, mut s_err, mut m_err, mut v_err, mut t_err) =
        (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let st = t.optimizer.state_tensors();
    let find = |k: String| {
        st.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, t)| t.shallow_clone())
            .unwrap()
    };
    for (name, p) in t.trainable() {
        g_err = g_err.max(max_rel_err(&p.grad(), &fx[&format!("grad.{name}")], 1e-6));
        s_err = s_err.max(max_rel_err(p, &fx[name.as_str()], 1e-6));
        m_err = m_err.max(max_rel_err(
            &find(format!("optimizer.exp_avg.{name}")),
            &fx[&format!("optimizer.exp_avg.{name}")],
            1e-8,
        ));
        v_err = v_err.max(max_rel_err(
            &find(format!("optimizer.exp_avg_sq.{name}")),
            &fx[&format!("optimizer.exp_avg_sq.{name}")],
            1e-12,
        ));
        let step = find(format!("optimizer.step.{name}")).int64_value(&[]);
        assert_eq!(step, 3, "{name}");
        assert_eq!(
            step,
            fx[&format!("optimizer.step.{name}")].int64_value(&[]),
            "{name}"
        );
    }
    for (name, p) in protodino_dino::params::named_parameters(&t.teacher_vs) {
        t_err = t_err.max(max_rel_err(&p, &fx[name.as_str()], 1e-6));
    }
    report(
        &format!("{variant}: gradients after clipping (step 2)"),
        g_err,
    );
    report(&format!("{variant}: student after 3 AdamW steps"), s_err);
    report(&format!("{variant}: AdamW exp_avg"), m_err);
    report(&format!("{variant}: AdamW exp_avg_sq"), v_err);
    report(&format!("{variant}: EMA teacher after 3 steps"), t_err);
}

#[test]
fn three_tiny_steps_with_sinkhorn_centring() {
    three_tiny_steps("sinkhorn", Centering::Sinkhorn, PrototypeKind::Normalised);
}

#[test]
fn three_tiny_steps_with_vmf_prototypes() {
    three_tiny_steps("vmf", Centering::Ema, PrototypeKind::Vmf);
}

#[test]
fn three_tiny_steps_with_vmf_prototypes_and_sinkhorn_centring() {
    three_tiny_steps("vmf_sinkhorn", Centering::Sinkhorn, PrototypeKind::Vmf);
}

#[test]
fn each_variant_fixture_tells_the_variant_from_plain_dino() {
    // The goldens above would not notice a variant that does nothing: plain DINO on each
    // variant's fixture must miss its first loss by far more than the tolerance.
    for (variant, centering, prototypes) in [
        ("sinkhorn", Centering::Ema, PrototypeKind::Normalised),
        ("vmf", Centering::Ema, PrototypeKind::Normalised),
        (
            "vmf_sinkhorn",
            Centering::Sinkhorn,
            PrototypeKind::Normalised,
        ),
    ] {
        let dir = TempDir::new(&format!("plain-{variant}"));
        let name = format!("tiny_step_{variant}.safetensors");
        let fx = load(&name);
        let meta = json(&format!("tiny_step_{variant}.json"));
        let mut cfg = tiny_config();
        cfg.optim.freeze_last_layer = 0;
        cfg.loss.centering = centering;
        cfg.head.prototypes = prototypes;
        let mut t = variant_trainer(&dir.0, &name, cfg);
        let mut worst = 0.0f64;
        for (it, want) in meta["steps"].as_array().unwrap().iter().enumerate() {
            let m = t.train_step(&golden_batch(&fx, it), &LocalReducer).unwrap();
            worst = worst.max(rel(m.dino_loss, want["dino_loss"].as_f64().unwrap()));
        }
        println!("{variant} fixture with a plain reading: loss differs by {worst:.3e}");
        assert!(worst > 1e-3, "{variant}: {worst:e}");
    }
}
