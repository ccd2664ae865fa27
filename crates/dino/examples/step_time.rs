//! Time of one DINO + KoLeo-proto training step of ViT-S/16 or ViT-Ti/16 (official head, K = 65536) at
//! 2×224 + 10×96 crops, on the CPU or a CUDA device.
//!
//! `cargo run --release -p protodino-dino --example step_time -- [batch] [threads] [steps] [K]
//! [koleo_weight] [--arch vit_small|vit_tiny] [--device cpu|cuda|cuda:N] [--bf16] [--warmup N]
//! [--max-seconds S] [--json]`
//! (defaults 8, 2, 3, 65536, 0.1, cpu, fp32, 1, no limit; weight 0 skips KoLeo-proto). Random normalised
//! inputs, made on the device before the clock starts; the first `warmup` steps (allocator,
//! cuDNN/cuBLAS set-up) are reported but not averaged. On CUDA each timed step ends with a device
//! synchronisation; no step starts after `--max-seconds` of stepping. `--bf16` is `train.precision = "bf16"` (autocast; CUDA only). `--json` ends
//! with one summary line `{"images_per_s": …}` (images = batch rows per step).
//!
//! The PyTorch eager counterpart is `scripts/gpu/step_torch.py`.

use protodino_config::{Arch, Precision, TrainConfig};
use protodino_dino::network::parse_device;
use protodino_dino::{Batch, DinoTrainer, LocalReducer};
use tch::{Device, Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut positional = Vec::new();
    let mut device = "cpu".to_string();
    let mut arch = "vit_small".to_string();
    let mut bf16 = false;
    let mut json = false;
    let mut warmup: usize = 1;
    let mut max_seconds = f64::INFINITY;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--device" => device = it.next().ok_or("--device needs a value")?,
            "--arch" => arch = it.next().ok_or("--arch needs a value")?,
            "--bf16" => bf16 = true,
            "--json" => json = true,
            "--warmup" => warmup = it.next().ok_or("--warmup needs a value")?.parse()?,
            "--max-seconds" => {
                max_seconds = it.next().ok_or("--max-seconds needs a value")?.parse()?
            }
            _ if a.starts_with("--") => return Err(format!("unknown flag {a}").into()),
            _ => positional.push(a),
        }
    }
    let koleo_weight = match positional.get(4) {
        Some(w) => w.parse::<f64>()?,
        None => 0.1,
    };
    let args: Vec<i64> = positional
        .iter()
        .take(4)
        .map(|a| a.parse::<i64>())
        .collect::<Result<_, _>>()?;
    let b = *args.first().unwrap_or(&8);
    let threads = *args.get(1).unwrap_or(&2);
    let steps = *args.get(2).unwrap_or(&3);
    let k = *args.get(3).unwrap_or(&65536);
    let dev = parse_device(&device)?;
    if dev.is_cuda() && !tch::Cuda::is_available() {
        return Err(format!(
            "--device {device}: libtorch sees no CUDA device (CPU-only libtorch, or no driver)"
        )
        .into());
    }
    tch::set_num_threads(threads as i32);
    let mut cfg = TrainConfig::defaults()?;
    cfg.head.out_dim = k;
    cfg.model.arch = match arch.as_str() {
        "vit_small" => Arch::VitSmall,
        "vit_tiny" => Arch::VitTiny,
        other => return Err(format!("--arch {other}: expected vit_small or vit_tiny").into()),
    };
    cfg.crops.local_crops_number = 10;
    cfg.train.batch_size_per_worker = b;
    cfg.train.device = device.clone();
    cfg.train.precision = if bf16 {
        Precision::Bf16
    } else {
        Precision::Fp32
    };
    cfg.optim.freeze_last_layer = 0;
    cfg.koleo.weight = koleo_weight;
    let mut trainer = DinoTrainer::from_config(cfg, 1000, 1)?;
    let n_params: i64 = trainer
        .trainable()
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    println!(
        "{arch}/16 + head K={k}: {n_params} trainable parameters, batch {b}, {threads} threads, \
         device {device}, {}",
        if bf16 { "bf16 autocast" } else { "fp32" }
    );
    let sync = || {
        if let Device::Cuda(i) = dev {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let batch = |s: i64| {
        tch::manual_seed(s);
        let r = |size: i64| Tensor::randn([b, 3, size, size], (Kind::Float, dev));
        Batch {
            global_crops: vec![r(224), r(224)],
            local_crops: (0..10).map(|_| r(96)).collect(),
            sample_ids: (0..b).map(|i| s * b + i).collect(),
            masks: None,
        }
    };
    let mut times = Vec::new();
    let mut last = None;
    let begin = std::time::Instant::now();
    for s in 0..steps {
        if begin.elapsed().as_secs_f64() > max_seconds {
            println!("stopping after {s} steps: --max-seconds {max_seconds} reached");
            break;
        }
        let x = batch(s);
        sync();
        let start = std::time::Instant::now();
        let m = trainer.train_step(&x, &LocalReducer)?;
        sync();
        let dt = start.elapsed().as_secs_f64();
        println!(
            "step {s}: {dt:.4} s  dino {:.4} koleo_proto {:.4} grad_norm {:.3}",
            m.dino_loss, m.koleo_proto, m.grad_norm
        );
        times.push(dt);
        last = Some(m);
    }
    let rest = &times[warmup.min(times.len())..];
    let mean = if rest.is_empty() {
        f64::NAN
    } else {
        rest.iter().sum::<f64>() / rest.len() as f64
    };
    if !rest.is_empty() {
        println!("mean step time after {warmup} warm-up step(s): {mean:.4} s");
    }
    if json {
        let m = last.as_ref();
        println!(
            "{}",
            serde_json::json!({
                "impl": "rust-tch",
                "arch": arch,
                "device": device,
                "bf16": bf16,
                "batch": b,
                "K": k,
                "koleo_weight": koleo_weight,
                "steps_timed": rest.len(),
                "warmup": warmup.min(times.len()),
                "mean_step_s": mean,
                "images_per_s": b as f64 / mean,
                "step_times_s": times,
                "last_dino_loss": m.map(|m| m.dino_loss),
                "last_koleo_proto": m.map(|m| m.koleo_proto),
            })
        );
    }
    Ok(())
}
