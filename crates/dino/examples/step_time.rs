//! Time of one DINO + KoLeo-proto training step of ViT-S/16 (official head, K = 65536) at
//! 2×224 + 10×96 crops, on the CPU.
//!
//! `cargo run --release -p protodino-dino --example step_time -- [batch] [threads] [steps] [K]
//! [koleo_weight]` (defaults 8, 2, 3, 65536, 0.1; weight 0 skips KoLeo-proto). Random normalised inputs; the first step is reported separately
//! (allocator warm-up).

use protodino_config::TrainConfig;
use protodino_dino::{Batch, DinoTrainer, LocalReducer};
use tch::{Device, Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let koleo_weight = match raw.get(4) {
        Some(w) => w.parse::<f64>()?,
        None => 0.1,
    };
    let args: Vec<i64> = raw
        .iter()
        .take(4)
        .map(|a| a.parse::<i64>())
        .collect::<Result<_, _>>()?;
    let b = *args.first().unwrap_or(&8);
    let threads = *args.get(1).unwrap_or(&2);
    let steps = *args.get(2).unwrap_or(&3);
    let k = *args.get(3).unwrap_or(&65536);
    tch::set_num_threads(threads as i32);
    let mut cfg = TrainConfig::defaults()?;
    cfg.head.out_dim = k;
    cfg.crops.local_crops_number = 10;
    cfg.train.batch_size_per_worker = b;
    cfg.optim.freeze_last_layer = 0;
    cfg.koleo.weight = koleo_weight;
    let mut trainer = DinoTrainer::from_config(cfg, 1000, 1)?;
    let n_params: i64 = trainer
        .trainable()
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    println!(
        "ViT-S/16 + head K={k}: {n_params} trainable parameters, batch {b}, {threads} threads"
    );
    let batch = |s: i64| {
        tch::manual_seed(s);
        let r = |size: i64| Tensor::randn([b, 3, size, size], (Kind::Float, Device::Cpu));
        Batch {
            global_crops: vec![r(224), r(224)],
            local_crops: (0..10).map(|_| r(96)).collect(),
            sample_ids: (0..b).map(|i| s * b + i).collect(),
        }
    };
    let mut times = Vec::new();
    for s in 0..steps {
        let x = batch(s);
        let start = std::time::Instant::now();
        let m = trainer.train_step(&x, &LocalReducer)?;
        let dt = start.elapsed().as_secs_f64();
        println!(
            "step {s}: {dt:.2} s  dino {:.4} koleo_proto {:.4} grad_norm {:.3}",
            m.dino_loss, m.koleo_proto, m.grad_norm
        );
        times.push(dt);
    }
    if times.len() > 1 {
        let rest = &times[1..];
        println!(
            "mean step time after the first: {:.2} s",
            rest.iter().sum::<f64>() / rest.len() as f64
        );
    }
    Ok(())
}
