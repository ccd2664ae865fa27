//! Golden comparisons against `reference/golden_step.py` (PyTorch 2.11, official DINO semantics).
//! Every comparison prints its worst relative error (`cargo test -- --nocapture`), measured per
//! tensor as `max |ours − reference| / max |reference|` (see `support::max_rel_err`).

mod support;

use protodino_dino::{DinoLoss, LocalReducer, Schedules, koleo_proto};
use support::*;
use tch::{Kind, Tensor};

const TOL: f64 = 1e-5;

fn report(what: &str, err: f64) {
    println!("golden {what}: worst relative error {err:.3e}");
    assert!(err <= TOL, "{what}: relative error {err:e} > {TOL:e}");
}

#[test]
fn dino_loss_pairs_total_grad_and_center() {
    let fx = load("loss.safetensors");
    let (b, v, k) = (3, 4, 10);
    let mut loss = DinoLoss::new(k, v, 0.1, 0.9, tch::Device::Cpu);
    loss.center = fx["center"].shallow_clone();
    let student = fx["student_output"].detach().set_requires_grad(true);
    let out = loss.loss(&student, &fx["teacher_output"], 0.055).unwrap();
    assert_eq!(out.pair_terms.len() as i64, 2 * v - 2);
    let ours: Vec<f64> = out
        .pair_terms
        .iter()
        .map(|(_, t)| t.double_value(&[]))
        .collect();
    let pairs = Tensor::from_slice(&ours);
    report(
        "loss pair terms",
        max_rel_err(&pairs, &fx["pair_terms"], 1e-6),
    );
    report(
        "loss total",
        max_rel_err(&out.loss.reshape([1]), &fx["loss"], 1e-6),
    );
    // The skipped pairs are exactly v == a.
    let skipped: Vec<(i64, i64)> = out.pair_terms.iter().map(|(p, _)| *p).collect();
    assert!(!skipped.contains(&(0, 0)) && !skipped.contains(&(1, 1)));
    assert!(skipped.contains(&(0, 1)) && skipped.contains(&(1, 0)));
    out.loss.backward();
    report(
        "loss grad wrt student logits",
        max_rel_err(&student.grad(), &fx["grad_student"], 1e-6),
    );
    // The loss did not move the centre; the update uses the raw teacher logits.
    assert!(loss.center.equal(&fx["center"]));
    loss.update_center(&fx["teacher_output"], &LocalReducer)
        .unwrap();
    report(
        "centre after update",
        max_rel_err(&loss.center, &fx["new_center"], 1e-6),
    );
    assert_eq!(b * 2, fx["teacher_output"].size()[0]);
}

#[test]
fn koleo_proto_value_indices_and_gradients_with_duplicates() {
    let fx = load("koleo.safetensors");
    let v = fx["weight_v"].detach().set_requires_grad(true);
    let g = fx["weight_g"].detach().set_requires_grad(true);
    let w = Tensor::internal_weight_norm(&v, &g, 0);
    // Blocks of 16 rows: four blocks for K = 64, the duplicates in different blocks.
    let out = koleo_proto(&w, 1e-8, 16, None).unwrap();
    assert!(
        out.nn_index.equal(&fx["nn_index"]),
        "neighbour indices differ"
    );
    assert_eq!(out.nn_index.int64_value(&[5]), 40);
    assert_eq!(out.nn_index.int64_value(&[50]), 51);
    report(
        "koleo value",
        max_rel_err(&out.loss.reshape([1]), &fx["loss"], 1e-6),
    );
    report(
        "koleo distances",
        max_rel_err(&out.distances, &fx["distances"], 1e-6),
    );
    out.loss.backward();
    // Duplicated prototypes get ~1/d gradients (1e6 scale).
    report(
        "koleo grad weight_v",
        max_rel_err(&v.grad(), &fx["grad_v"], 1e-6),
    );
    report(
        "koleo grad weight_g",
        max_rel_err(&g.grad(), &fx["grad_g"], 1e-6),
    );
    // The non-duplicated rows on their own (their gradients are ~1e5 times smaller).
    let plain = Tensor::from_slice(&[0i64, 1, 2, 3, 10, 20, 30, 63]);
    report(
        "koleo grad weight_v, non-duplicated rows",
        max_rel_err(
            &v.grad().index_select(0, &plain),
            &fx["grad_v"].index_select(0, &plain),
            1e-6,
        ),
    );
}

#[test]
fn schedules_at_chosen_iterations() {
    let s = json("schedules.json");
    let mut cfg = protodino_config::TrainConfig::defaults().unwrap();
    cfg.train.epochs = s["epochs"].as_i64().unwrap();
    cfg.train.batch_size_per_worker = s["batch_size_per_worker"].as_i64().unwrap();
    cfg.optim.lr = s["lr"].as_f64().unwrap();
    cfg.optim.min_lr = s["min_lr"].as_f64().unwrap();
    cfg.optim.warmup_epochs = s["warmup_epochs"].as_i64().unwrap();
    cfg.optim.weight_decay = s["weight_decay"].as_f64().unwrap();
    cfg.optim.weight_decay_end = s["weight_decay_end"].as_f64().unwrap();
    cfg.optim.momentum_teacher = s["momentum_teacher"].as_f64().unwrap();
    cfg.loss.warmup_teacher_temp = s["warmup_teacher_temp"].as_f64().unwrap();
    cfg.loss.teacher_temp = s["teacher_temp"].as_f64().unwrap();
    cfg.loss.warmup_teacher_temp_epochs = s["warmup_teacher_temp_epochs"].as_i64().unwrap();
    let world = s["world_size"].as_u64().unwrap() as usize;
    let sch = Schedules::new(&cfg, s["niter_per_epoch"].as_i64().unwrap(), world).unwrap();
    let mut worst = 0.0f64;
    for (i, it) in s["its"].as_array().unwrap().iter().enumerate() {
        let it = it.as_i64().unwrap();
        let v = sch.at(it);
        for (ours, key) in [
            (v.lr, "lr_at"),
            (v.weight_decay, "wd_at"),
            (v.momentum, "momentum_at"),
        ] {
            let want = s[key][i].as_f64().unwrap();
            let err = if want == 0.0 {
                ours.abs()
            } else {
                rel(ours, want)
            };
            assert!(err <= 1e-12, "{key} at {it}: {ours} vs {want}");
            worst = worst.max(err);
        }
    }
    for (i, e) in s["epochs_at"].as_array().unwrap().iter().enumerate() {
        let e = e.as_i64().unwrap();
        let want = s["teacher_temp_at"][i].as_f64().unwrap();
        let err = rel(sch.teacher_temp(e), want);
        assert!(err <= 1e-12, "teacher temp at epoch {e}");
        worst = worst.max(err);
    }
    report("schedules (lr, wd, momentum, teacher temp)", worst);
}

#[test]
fn three_tiny_steps_match_pytorch() {
    let dir = TempDir::new("golden");
    let fx = load("tiny_step.safetensors");
    let meta = json("tiny_step.json");
    let mut t = golden_tiny_trainer(&dir.0);
    let mut worst_loss = 0.0f64;
    let mut worst_center = 0.0f64;
    for (it, want) in meta["steps"].as_array().unwrap().iter().enumerate() {
        let m = t.train_step(&golden_batch(&fx, it), &LocalReducer).unwrap();
        for (ours, key) in [
            (m.schedule.lr, "lr"),
            (m.schedule.weight_decay, "weight_decay"),
            (m.schedule.momentum, "momentum"),
            (m.schedule.teacher_temp, "teacher_temp"),
        ] {
            let w = want[key].as_f64().unwrap();
            assert!(
                (ours - w).abs() <= 1e-12 * w.abs().max(1.0),
                "{key} at step {it}"
            );
        }
        assert_eq!(m.last_layer_frozen, it < 2);
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
        if it == 0 {
            let mut worst = 0.0f64;
            for (name, p) in protodino_dino::params::named_parameters(&t.teacher_vs) {
                let key = name.replacen("teacher.", "teacher_after0.", 1);
                let e = max_rel_err(&p, &fx[&key], 1e-6);
                if e > TOL {
                    println!("{name}: {e:e}");
                }
                worst = worst.max(e);
            }
            report("EMA teacher after step 0 (frozen last layer)", worst);
        }
    }
    report("step losses (dino, koleo_proto, total) x3", worst_loss);
    report("centre after each step", worst_center);

    let (mut g_err, mut s_err, mut t_err, mut m_err, mut v_err) =
        (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (name, p) in t.trainable() {
        let g = &fx[&format!("grad.{name}")];
        g_err = g_err.max(max_rel_err(&p.grad(), g, 1e-6));
        s_err = s_err.max(max_rel_err(p, &fx[name.as_str()], 1e-6));
        let st = t.optimizer.state_tensors();
        let find = |k: String| {
            st.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, t)| t.shallow_clone())
                .unwrap()
        };
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
        assert_eq!(
            step,
            fx[&format!("optimizer.step.{name}")].int64_value(&[]),
            "{name}"
        );
        assert_eq!(
            step,
            if name.contains("last_layer") { 1 } else { 3 },
            "{name}"
        );
    }
    for (name, p) in protodino_dino::params::named_parameters(&t.teacher_vs) {
        t_err = t_err.max(max_rel_err(&p, &fx[name.as_str()], 1e-6));
    }
    report("gradients after clipping (step 2)", g_err);
    report("student parameters after 3 AdamW steps", s_err);
    report("AdamW exp_avg", m_err);
    report("AdamW exp_avg_sq", v_err);
    report("EMA teacher after 3 steps", t_err);
    let _ = Kind::Float;
}

#[test]
fn sgd_and_lars_two_steps_match_pytorch() {
    use protodino_config::OptimizerKind;
    let fx = load("sgd_lars.safetensors");
    for (kind, tag) in [(OptimizerKind::Sgd, "sgd"), (OptimizerKind::Lars, "lars")] {
        let mut cfg = protodino_config::TrainConfig::defaults().unwrap().optim;
        cfg.optimizer = kind;
        let mut opt = protodino_dino::Optimizer::new(&cfg);
        let w = fx["w0"].detach().copy().set_requires_grad(true);
        let b = fx["b0"].detach().copy().set_requires_grad(true);
        let params = vec![
            ("net.fc.weight".to_string(), w.shallow_clone()),
            ("net.fc.bias".to_string(), b.shallow_clone()),
        ];
        for (i, (lr, wd)) in [(0.1, 0.04), (0.05, 0.3)].into_iter().enumerate() {
            // Give the parameters their gradients through a backward pass.
            for (_, p) in &params {
                let mut p = p.shallow_clone();
                p.zero_grad();
            }
            let loss = (&w * &fx[&format!("grad{i}.w")]).sum(Kind::Float)
                + (&b * &fx[&format!("grad{i}.b")]).sum(Kind::Float);
            loss.backward();
            opt.step(&params, lr, wd, |_| false).unwrap();
        }
        report(
            &format!("{tag} weight after 2 steps"),
            max_rel_err(&w, &fx[&format!("{tag}.w")], 1e-6),
        );
        report(
            &format!("{tag} bias after 2 steps"),
            max_rel_err(&b, &fx[&format!("{tag}.b")], 1e-6),
        );
    }
}
