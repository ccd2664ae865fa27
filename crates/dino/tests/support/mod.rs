//! Shared helpers of the integration tests: the tiny DINO network that
//! `reference/golden_step.py` mirrors, fixture loading and the tiny configuration.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use protodino_config::TrainConfig;
use protodino_dino::DinoNetwork;
use protodino_models::ForwardCtx;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn load(name: &str) -> BTreeMap<String, Tensor> {
    protodino_dino::io::load_tensors(&fixture(name)).unwrap().0
}

pub fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

/// Relative error of a tensor: `max |a − b| / max(max |b|, floor)` (normwise, relative to the
/// reference's largest entry — element-wise ratios are meaningless for entries that are sums
/// cancelling to ~0, whose absolute errors are at the fp32 rounding level of the larger terms).
pub fn max_rel_err(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(floor);
    (a - &b).abs().max().double_value(&[]) / scale
}

pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// adaptive-avg-pool 2×2 → Linear(12, 16) + cls_token → GELU → LayerNorm(eps 1e-6), then the DINO
/// head 16 → 24 → 24 → 8, L2-normalise, weight-normalised 8 → K prototypes.
#[derive(Debug)]
pub struct TinyDino {
    cls_token: Tensor,
    embed: nn::Linear,
    norm: nn::LayerNorm,
    mlp: [nn::Linear; 3],
    weight_g: Tensor,
    weight_v: Tensor,
}

impl TinyDino {
    /// `norm_last_layer`: `weight_g` frozen (the teacher, and the student when set).
    pub fn new(p: &nn::Path, out_dim: i64, norm_last_layer: bool) -> Self {
        let b = p / "backbone";
        let h = p / "head";
        let m = &h / "mlp";
        let l = &h / "last_layer";
        let weight_g = if norm_last_layer {
            l.ones_no_train("weight_g", &[out_dim, 1])
        } else {
            l.ones("weight_g", &[out_dim, 1])
        };
        TinyDino {
            cls_token: b.zeros("cls_token", &[1, 1, 16]),
            embed: nn::linear(&b / "embed", 12, 16, Default::default()),
            norm: nn::layer_norm(
                &b / "norm",
                vec![16],
                nn::LayerNormConfig {
                    eps: 1e-6,
                    ..Default::default()
                },
            ),
            mlp: [
                nn::linear(&m / 0, 16, 24, Default::default()),
                nn::linear(&m / 2, 24, 24, Default::default()),
                nn::linear(&m / 4, 24, 8, Default::default()),
            ],
            weight_g,
            weight_v: l.randn_standard("weight_v", &[out_dim, 8]),
        }
    }

    fn backbone(&self, x: &Tensor) -> Tensor {
        let x = x.adaptive_avg_pool2d([2, 2]).flatten(1, -1);
        let x = self.embed.forward(&x) + self.cls_token.reshape([1, -1]);
        self.norm.forward(&x.gelu("none"))
    }

    fn head(&self, x: &Tensor) -> Tensor {
        let x = self.mlp[0].forward(x).gelu("none");
        let x = self.mlp[1].forward(&x).gelu("none");
        let x = self.mlp[2].forward(&x);
        let denom = x
            .norm_scalaropt_dim(2, [-1i64].as_slice(), true)
            .clamp_min(1e-12)
            .expand_as(&x);
        let x = x / denom;
        x.linear::<Tensor>(&self.prototypes(), None)
    }
}

impl DinoNetwork for TinyDino {
    fn forward(&self, crops: &[Tensor], _ctx: &ForwardCtx) -> Tensor {
        let mut outs = Vec::new();
        let mut start = 0;
        while start < crops.len() {
            let size = crops[start].size()[3];
            let mut end = start + 1;
            while end < crops.len() && crops[end].size()[3] == size {
                end += 1;
            }
            outs.push(self.backbone(&Tensor::cat(&crops[start..end], 0)));
            start = end;
        }
        self.head(&Tensor::cat(&outs, 0))
    }

    fn prototypes(&self) -> Tensor {
        Tensor::internal_weight_norm(&self.weight_v, &self.weight_g, 0)
    }
}

/// The tiny configuration of `reference/golden_step.py` (`TINY`).
pub fn tiny_config() -> TrainConfig {
    let mut cfg = TrainConfig::defaults().unwrap();
    cfg.head.out_dim = 32;
    cfg.head.norm_last_layer = false;
    cfg.crops.local_crops_number = 2;
    cfg.crops.global_crop_size = 16;
    cfg.crops.local_crop_size = 8;
    cfg.train.batch_size_per_worker = 2;
    cfg.train.epochs = 3;
    cfg.train.threads = 1;
    cfg.optim.lr = 5.0;
    cfg.optim.min_lr = 1e-4;
    cfg.optim.warmup_epochs = 1;
    cfg.optim.weight_decay = 0.04;
    cfg.optim.weight_decay_end = 0.4;
    cfg.optim.momentum_teacher = 0.9;
    cfg.optim.clip_grad = 0.3;
    cfg.optim.freeze_last_layer = 1;
    cfg.loss.warmup_teacher_temp = 0.04;
    cfg.loss.teacher_temp = 0.07;
    cfg.loss.warmup_teacher_temp_epochs = 2;
    cfg.koleo.weight = 0.1;
    cfg.koleo.eps = 1e-8;
    cfg.koleo.block_rows = 8;
    cfg
}

/// Iterations per epoch of the tiny run.
pub const TINY_IPE: i64 = 2;

pub type TinyTrainer = protodino_dino::DinoTrainer<TinyDino>;

/// A tiny trainer (student with a trainable `weight_g`, teacher frozen) with random init.
pub fn tiny_trainer(cfg: TrainConfig) -> TinyTrainer {
    let k = cfg.head.out_dim;
    let student_g_frozen = cfg.head.norm_last_layer;
    protodino_dino::DinoTrainer::new(cfg, TINY_IPE, 1, move |p, student| {
        TinyDino::new(p, k, if student { student_g_frozen } else { true })
    })
    .unwrap()
}

/// A tiny trainer initialised with the reference's initial weights, loaded as an
/// official-style checkpoint holding only `student.*` and `teacher.*`.
pub fn golden_tiny_trainer(dir: &Path) -> TinyTrainer {
    golden_tiny_trainer_with(dir, tiny_config())
}

/// [`golden_tiny_trainer`] with another configuration (same network sizes).
pub fn golden_tiny_trainer_with(dir: &Path, cfg: TrainConfig) -> TinyTrainer {
    let fx = load("tiny_step.safetensors");
    let mut tensors = Vec::new();
    for (k, v) in &fx {
        if let Some(name) = k.strip_prefix("init.") {
            tensors.push((name.to_string(), v.shallow_clone()));
            tensors.push((name.replacen("student.", "teacher.", 1), v.shallow_clone()));
        }
    }
    let path = dir.join("init.safetensors");
    protodino_dino::io::save_tensors(&path, &tensors, &BTreeMap::new()).unwrap();
    let mut t = tiny_trainer(cfg);
    let loaded = t.load_checkpoint(&path).unwrap();
    assert!(loaded.meta.is_none() && !loaded.had_optimizer_state && !loaded.had_center);
    t
}

/// Batch `it` of the golden fixture.
pub fn golden_batch(fx: &BTreeMap<String, Tensor>, it: usize) -> protodino_dino::Batch {
    protodino_dino::Batch {
        global_crops: fx[&format!("batch{it}.global_crops")].unbind(0),
        local_crops: fx[&format!("batch{it}.local_crops")].unbind(0),
        sample_ids: vec![0, 1],
        masks: None,
    }
}

/// A temporary directory under the target dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let base = std::env::var_os("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let p = base.join(format!("dino-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A deterministic synthetic batch: `B` images drawn from a fixed pool of 6 prototypical
/// images plus a perturbation, so that there is structure to learn. Built from closed-form
/// patterns, not libtorch's global generator (tests run in parallel threads).
pub fn synthetic_batch(step: i64, b: i64, n_local: i64) -> protodino_dino::Batch {
    let pool = 6;
    let pattern = |freq: f64, phase: f64, size: i64| {
        (Tensor::arange(3 * size * size, (Kind::Float, tch::Device::Cpu)) * freq + phase)
            .sin()
            .reshape([3, size, size])
    };
    let ids: Vec<i64> = (0..b).map(|i| (step * b + i) % pool).collect();
    let crop = |c: i64, size: i64| {
        let imgs: Vec<Tensor> = ids
            .iter()
            .map(|&id| {
                let base = pattern(0.37 * (id + 1) as f64, 0.0, size);
                let noise = pattern(1.7 + 0.01 * c as f64, (step * 13 + c * 7 + id) as f64, size);
                base + noise * 0.3
            })
            .collect();
        Tensor::stack(&imgs, 0)
    };
    protodino_dino::Batch {
        global_crops: (0..2).map(|c| crop(c, 16)).collect(),
        local_crops: (0..n_local).map(|c| crop(2 + c, 8)).collect(),
        sample_ids: ids,
        masks: None,
    }
}
