//! Times the network part of one DINO step for ViT-S/16 on this machine: teacher forward on the
//! 2 global crops and student forward + backward on all crops (default 2×224 + 10×96, batch 8,
//! K = 65536). Loss, optimiser and EMA are not included (see the dino crate for the full step).
//!
//! `cargo run -p protodino-models --example forward_bench -- [batch] [K] [reps]` (the dev profile
//! already optimises dependencies; the time is spent inside libtorch)

use std::time::Instant;

use protodino_config::TrainConfig;
use protodino_models::{ForwardCtx, MultiCrop};
use tch::{Device, Kind, Tensor, nn};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: i64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, k, reps) = (arg(1, 8), arg(2, 65536), arg(3, 3));
    let mut cfg = TrainConfig::defaults().expect("defaults");
    cfg.head.out_dim = k;
    cfg.crops.local_crops_number = 10;
    let vs = nn::VarStore::new(Device::Cpu);
    let student = MultiCrop::new(&(vs.root() / "student"), &cfg.model, &cfg.head, true);
    let teacher = MultiCrop::new(&(vs.root() / "teacher"), &cfg.model, &cfg.head, false);
    let mut crops = Vec::new();
    for c in 0..cfg.n_crops() {
        let s = if c < 2 {
            cfg.crops.global_crop_size
        } else {
            cfg.crops.local_crop_size
        };
        crops.push(Tensor::randn([batch, 3, s, s], (Kind::Float, Device::Cpu)));
    }
    let ids: Vec<i64> = (0..batch).collect();
    println!(
        "ViT-S/16, batch {batch}, 2x{} + {}x{}, K {k}, threads {}",
        cfg.crops.global_crop_size,
        cfg.crops.local_crops_number,
        cfg.crops.local_crop_size,
        tch::get_num_threads()
    );
    for rep in 0..reps {
        let ctx = ForwardCtx {
            train: true,
            seed: 0,
            step: rep,
            sample_ids: &ids,
            crop: 0,
        };
        let t0 = Instant::now();
        let t = tch::no_grad(|| teacher.forward(&crops[..2], &ctx));
        let t1 = Instant::now();
        let s = student.forward(&crops, &ctx);
        let t2 = Instant::now();
        (s.mean(Kind::Float) + t.mean(Kind::Float)).backward();
        let t3 = Instant::now();
        println!(
            "rep {rep}: teacher fwd {:.2}s, student fwd {:.2}s, student bwd {:.2}s, total {:.2}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t3 - t0).as_secs_f64()
        );
    }
}
