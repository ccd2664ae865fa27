//! CPU-versus-device equality of one DINO + KoLeo-proto step on a fixed batch (docs/gpu.md: CUDA
//! forward/backward, bf16 autocast, CPU and GPU loss within tolerance).
//!
//! ```text
//! replay_check prepare --config FILE --out DIR [--seed S] [--lr LR]
//! replay_check check --fixtures DIR [--device cuda] [--variants fp32-nocudnn,fp32,bf16]
//! ```
//!
//! `prepare` (on the CPU, where the fixtures are made): builds the trainer of FILE, writes
//! `DIR/config.toml` (a copy), `DIR/state.safetensors` (the fresh state, as `protodino replay`
//! reads it), `DIR/batch.safetensors` (a seeded random batch with the schedule values of its step,
//! lr non-zero so the optimiser moves) and `DIR/reference.json` (the metrics of one step on this
//! CPU: losses, gradient norms, per-tensor gradient norms).
//!
//! `check`: runs the step on the CPU of this machine and then once per variant on the device, each
//! from the same state and batch, and compares
//! * losses (`dino_loss`, `koleo_proto`, `total`) and the global gradient norm: relative error;
//! * all gradients (after clipping): `‖g_dev − g_cpu‖ / ‖g_cpu‖` over every parameter, and the
//!   worst single tensor;
//! * the DINO centre after the update and the EMA teacher: relative error;
//! * this CPU against `reference.json` (another libtorch build of the same version).
//!
//! Variants: `fp32-nocudnn` (cuDNN off, so the patch convolution does not use TF32: the strict
//! fp32 comparison), `fp32` (libtorch defaults: cuDNN convolutions may use TF32), `bf16`
//! (`train.precision = "bf16"`: autocast). Tolerances, relative: 1e-4 (fp32-nocudnn; gradients
//! 1e-3), 2e-3 (fp32; gradients 1e-2), 2e-2 (bf16; gradients 1e-1); CPU vs reference 1e-4.
//! Prints one JSON summary; exit 0 when everything is within tolerance, 1 otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use protodino_config::{Precision, TrainConfig};
use protodino_dino::{Batch, DinoTrainer, LocalReducer, StepMetrics, read_batch, write_batch};
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Outcome {
    metrics: StepMetrics,
    /// Clipped gradients of the trainable parameters, on the CPU, fp64.
    grads: Vec<(String, Tensor)>,
    /// The state after the step (student, teacher, centre, optimiser), on the CPU, fp64.
    state: BTreeMap<String, Tensor>,
    seconds: f64,
}

fn load_config(dir: &Path) -> Res<TrainConfig> {
    Ok(TrainConfig::load_files(&[dir.join("config.toml")])?)
}

/// One step from `DIR/state.safetensors` on `DIR/batch.safetensors` with `cfg`'s device/precision.
fn run_step(cfg: TrainConfig, dir: &Path) -> Res<Outcome> {
    let mut trainer = DinoTrainer::from_config(cfg, 1000, 1)?;
    trainer.load_checkpoint(&dir.join("state.safetensors"))?;
    let (batch, sv) = read_batch(&dir.join("batch.safetensors"))?;
    let sv = sv.ok_or("the batch file has no schedule record")?;
    trainer.step = sv.step;
    let start = std::time::Instant::now();
    let metrics = trainer.apply_step(&batch, sv, &LocalReducer)?;
    if let Device::Cuda(i) = trainer.device {
        tch::Cuda::synchronize(i as i64);
    }
    let seconds = start.elapsed().as_secs_f64();
    let host = |t: &Tensor| t.detach().to_device(Device::Cpu).to_kind(Kind::Double);
    let grads = trainer
        .trainable()
        .iter()
        .filter_map(|(n, p)| {
            let g = p.grad();
            g.defined().then(|| (n.clone(), host(&g)))
        })
        .collect();
    let state = trainer
        .checkpoint_tensors()
        .into_iter()
        .filter(|(_, t)| t.is_floating_point())
        .map(|(n, t)| (n, host(&t)))
        .collect();
    Ok(Outcome {
        metrics,
        grads,
        state,
        seconds,
    })
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs().max(1e-12)
    }
}

fn norm(t: &Tensor) -> f64 {
    t.norm().double_value(&[])
}

/// `‖a − b‖ / ‖b‖` over the union of the named tensors both have; also the worst single tensor.
fn tensors_rel(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> (f64, String, f64, usize) {
    let bm: BTreeMap<&str, &Tensor> = b.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let (mut diff2, mut ref2) = (0.0, 0.0);
    let (mut worst_name, mut worst) = (String::new(), 0.0);
    let mut missing = 0;
    for (n, ta) in a {
        let Some(tb) = bm.get(n.as_str()) else {
            missing += 1;
            continue;
        };
        let d = norm(&(ta - *tb));
        let r = norm(tb);
        diff2 += d * d;
        ref2 += r * r;
        let e = if r > 0.0 { d / r } else { d };
        if e > worst {
            worst = e;
            worst_name = n.clone();
        }
    }
    let am: std::collections::BTreeSet<&str> = a.iter().map(|(n, _)| n.as_str()).collect();
    missing += bm.keys().filter(|n| !am.contains(**n)).count();
    let total = if ref2 > 0.0 {
        (diff2 / ref2).sqrt()
    } else {
        diff2.sqrt()
    };
    (total, worst_name, worst, missing)
}

fn select(state: &BTreeMap<String, Tensor>, prefix: &str) -> Vec<(String, Tensor)> {
    state
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

fn metrics_json(m: &StepMetrics) -> Value {
    json!({
        "dino_loss": m.dino_loss,
        "koleo_proto": m.koleo_proto,
        "total": m.total,
        "grad_norm": m.grad_norm,
        "grad_norm_clipped": m.grad_norm_clipped,
        "grad_norm_max": m.grad_norm_max,
        "prototype_nn_mean": m.prototype_nn_mean,
    })
}

fn prepare(config: &Path, out: &Path, seed: i64, lr: f64) -> Res<()> {
    std::fs::create_dir_all(out)?;
    let text = std::fs::read_to_string(config)?;
    std::fs::write(out.join("config.toml"), &text)?;
    let mut cfg = load_config(out)?;
    cfg.train.device = "cpu".into();
    cfg.train.precision = Precision::Fp32;
    let trainer = DinoTrainer::from_config(cfg.clone(), 1000, 1)?;
    trainer.save_checkpoint(&out.join("state.safetensors"))?;
    let mut sv = trainer.schedules.at(0);
    sv.lr = lr;
    tch::manual_seed(seed);
    let b = cfg.train.batch_size_per_worker;
    let r = |size: i64| Tensor::randn([b, 3, size, size], (Kind::Float, Device::Cpu));
    let batch = Batch {
        global_crops: vec![r(cfg.crops.global_crop_size), r(cfg.crops.global_crop_size)],
        local_crops: (0..cfg.crops.local_crops_number)
            .map(|_| r(cfg.crops.local_crop_size))
            .collect(),
        sample_ids: (0..b).map(|i| 1000 + 7 * i).collect(),
        masks: None,
    };
    write_batch(&out.join("batch.safetensors"), &batch, Some(&sv))?;
    let o = run_step(cfg, out)?;
    let grad_norms: BTreeMap<String, f64> =
        o.grads.iter().map(|(n, g)| (n.clone(), norm(g))).collect();
    let reference = json!({
        "made_with": format!("protodino {} on the CPU", env!("CARGO_PKG_VERSION")),
        "metrics": metrics_json(&o.metrics),
        "schedule": serde_json::to_value(sv)?,
        "grad_norms": grad_norms,
        "seconds": o.seconds,
    });
    std::fs::write(
        out.join("reference.json"),
        serde_json::to_string_pretty(&reference)?,
    )?;
    println!("{}", serde_json::to_string(&reference["metrics"])?);
    Ok(())
}

struct Tol {
    loss: f64,
    grad: f64,
}

fn tolerance(variant: &str) -> Res<Tol> {
    Ok(match variant {
        "fp32-nocudnn" => Tol {
            loss: 1e-4,
            grad: 1e-3,
        },
        "fp32" => Tol {
            loss: 2e-3,
            grad: 1e-2,
        },
        "bf16" => Tol {
            loss: 2e-2,
            grad: 1e-1,
        },
        other => return Err(format!("unknown variant {other}").into()),
    })
}

/// Compares `dev` with `cpu`; returns the JSON record and whether it is within `tol`.
fn compare(dev: &Outcome, cpu: &Outcome, tol: &Tol) -> (Value, bool) {
    let (d, c) = (&dev.metrics, &cpu.metrics);
    let losses = json!({
        "dino_loss": rel(d.dino_loss, c.dino_loss),
        "koleo_proto": rel(d.koleo_proto, c.koleo_proto),
        "total": rel(d.total, c.total),
        "grad_norm": rel(d.grad_norm, c.grad_norm),
    });
    let loss_max = [
        rel(d.dino_loss, c.dino_loss),
        rel(d.koleo_proto, c.koleo_proto),
        rel(d.total, c.total),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    let gn = rel(d.grad_norm, c.grad_norm);
    let (g_all, g_worst_name, g_worst, g_missing) = tensors_rel(&dev.grads, &cpu.grads);
    let (center, _, _, _) = tensors_rel(
        &select(&dev.state, "dino_loss.center"),
        &select(&cpu.state, "dino_loss.center"),
    );
    let (teacher, _, _, _) = tensors_rel(
        &select(&dev.state, "teacher."),
        &select(&cpu.state, "teacher."),
    );
    let (student, _, _, _) = tensors_rel(
        &select(&dev.state, "student."),
        &select(&cpu.state, "student."),
    );
    let ok = loss_max <= tol.loss
        && gn <= tol.loss.max(1e-4) * 10.0
        && g_all <= tol.grad
        && g_missing == 0
        && center <= tol.grad
        && d.total.is_finite();
    (
        json!({
            "ok": ok,
            "tolerance": {"loss": tol.loss, "grad_norm": tol.loss.max(1e-4) * 10.0, "grad": tol.grad},
            "metrics": metrics_json(d),
            "rel_err": losses,
            "grad_rel_err_all": g_all,
            "grad_rel_err_worst": {"name": g_worst_name, "value": g_worst},
            "grads_missing": g_missing,
            "center_rel_err": center,
            "teacher_rel_err": teacher,
            "student_rel_err": student,
            "seconds": dev.seconds,
        }),
        ok,
    )
}

fn check(dir: &Path, device: &str, variants: &[String]) -> Res<bool> {
    let base = load_config(dir)?;
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
    let mut cpu_cfg = base.clone();
    cpu_cfg.train.device = "cpu".into();
    cpu_cfg.train.precision = Precision::Fp32;
    let cpu = run_step(cpu_cfg, dir)?;
    let rm = &reference["metrics"];
    let f = |k: &str| rm[k].as_f64().unwrap_or(f64::NAN);
    let cpu_vs_ref = [
        rel(cpu.metrics.dino_loss, f("dino_loss")),
        rel(cpu.metrics.koleo_proto, f("koleo_proto")),
        rel(cpu.metrics.total, f("total")),
        rel(cpu.metrics.grad_norm, f("grad_norm")),
    ]
    .into_iter()
    .fold(
        0.0,
        |a: f64, b: f64| if b.is_nan() { f64::INFINITY } else { a.max(b) },
    );
    let mut all_ok = cpu_vs_ref <= 1e-4;
    let mut out = json!({
        "check": "replay_cpu_vs_device",
        "device": device,
        "cuda_available": tch::Cuda::is_available(),
        "cudnn_available": tch::Cuda::cudnn_is_available(),
        "cpu": {"metrics": metrics_json(&cpu.metrics), "seconds": cpu.seconds},
        "cpu_vs_reference_max_rel_err": cpu_vs_ref,
        "reference_metrics": rm.clone(),
        "variants": {},
    });
    let dev = protodino_dino::network::parse_device(device)?;
    if dev.is_cuda() && !tch::Cuda::is_available() {
        out["error"] = json!("libtorch sees no CUDA device");
        all_ok = false;
    } else {
        for v in variants {
            let tol = tolerance(v)?;
            let mut cfg = base.clone();
            cfg.train.device = device.into();
            cfg.train.precision = if v == "bf16" {
                Precision::Bf16
            } else {
                Precision::Fp32
            };
            tch::Cuda::set_user_enabled_cudnn(v != "fp32-nocudnn");
            let rec = match run_step(cfg, dir) {
                Ok(o) => {
                    let (rec, ok) = compare(&o, &cpu, &tol);
                    all_ok &= ok;
                    rec
                }
                Err(e) => {
                    all_ok = false;
                    json!({"ok": false, "error": e.to_string()})
                }
            };
            eprintln!("{v}: {rec}");
            out["variants"][v.as_str()] = rec;
        }
        tch::Cuda::set_user_enabled_cudnn(true);
    }
    out["ok"] = json!(all_ok);
    println!("{out}");
    Ok(all_ok)
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    match args.first().map(String::as_str) {
        Some("prepare") => {
            let config = PathBuf::from(get("--config").ok_or("--config FILE")?);
            let out = PathBuf::from(get("--out").ok_or("--out DIR")?);
            let seed = get("--seed").map_or(Ok(3), |s| s.parse())?;
            let lr = get("--lr").map_or(Ok(1e-3), |s| s.parse())?;
            prepare(&config, &out, seed, lr)
        }
        Some("check") => {
            let dir = PathBuf::from(get("--fixtures").ok_or("--fixtures DIR")?);
            let device = get("--device").unwrap_or_else(|| "cuda".into());
            let variants: Vec<String> = get("--variants")
                .unwrap_or_else(|| "fp32-nocudnn,fp32,bf16".into())
                .split(',')
                .map(str::to_string)
                .collect();
            let ok = check(&dir, &device, &variants)?;
            std::process::exit(if ok { 0 } else { 1 });
        }
        _ => Err(
            "usage: replay_check prepare --config FILE --out DIR [--seed S] [--lr LR] | \
                  check --fixtures DIR [--device cuda] [--variants fp32-nocudnn,fp32,bf16]"
                .into(),
        ),
    }
}
