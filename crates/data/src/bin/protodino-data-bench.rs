//! Throughput of the full multi-crop pipeline (decode + every DINO transform + normalisation
//! into the batch buffers), in images per second, for the two presets the project uses:
//!
//! * `dino`: 2 × 224 + 10 × 96 (official ViT-S/16 scales (0.25, 1) / (0.05, 0.25));
//! * `cpu`:  2 × 32 + 6 × 16 (configs/cpu-demo.toml scales (0.4, 1) / (0.1, 0.4)).
//!
//! ```text
//! protodino-data-bench [--photos DIR] [--fmnist SHARD_DIR] [--threads 2] [--images 512]
//!                      [--batch 64] [--repeats 3]
//! ```
//! The older `key=value` spelling (`photos=DIR threads=2`) is still accepted.
//! Two figures per row: wall-clock images/s (best of `repeats` runs, the least disturbed by
//! other load) and images per CPU-second of the whole process (user + system time of all
//! threads from `/proc/self/stat`, robust to a shared machine).
//! `photos` is an ImageFolder of JPEGs (`reference/bench_torchvision.py --make-photos DIR`
//! writes the ~500×375 photographs both benchmarks read); `fmnist` the Fashion-MNIST shard
//! directory `cargo xtask data` provisions. The torchvision counterpart is
//! `reference/bench_torchvision.py`, which prints the same table rows.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Parser;
use protodino_config::{CropsConfig, DataConfig, DatasetFormat, TrainConfig};
use protodino_data::{Loader, SharedDataset, open_dataset};

fn preset(name: &str, base: &CropsConfig) -> CropsConfig {
    match name {
        "dino" => CropsConfig {
            global_crop_size: 224,
            global_crops_scale: [0.25, 1.0],
            local_crops_number: 10,
            local_crop_size: 96,
            local_crops_scale: [0.05, 0.25],
            ..base.clone()
        },
        _ => CropsConfig {
            global_crop_size: 32,
            global_crops_scale: [0.4, 1.0],
            local_crops_number: 6,
            local_crop_size: 16,
            local_crops_scale: [0.1, 0.4],
            ..base.clone()
        },
    }
}

/// User + system CPU seconds of this process (all threads), from `/proc/self/stat`
/// (Linux; clock ticks of USER_HZ = 100).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime and stime are the 12th and
    // 13th of them (fields 14 and 15 of the line).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// (wall images/s, images per CPU-second) of one run.
fn run(
    ds: &SharedDataset,
    crops: &CropsConfig,
    data: &DataConfig,
    images: usize,
    batch: usize,
) -> (f64, f64) {
    let n = ds.len() as u64;
    let ids: Vec<u64> = (0..images as u64).map(|i| i % n).collect();
    let steps: Vec<Vec<u64>> = ids.chunks(batch).map(<[u64]>::to_vec).collect();
    let loader = match Loader::new(ds.clone(), crops, data, 0) {
        Ok(l) => l,
        Err(e) => panic!("loader: {e}"),
    };
    // Warm-up batch (thread-local buffers, page cache).
    let _ = loader.make_batch(99, &steps[0]);
    let t = Instant::now();
    let cpu0 = cpu_seconds();
    let mut stream = loader.epoch(0, steps);
    let mut done = 0usize;
    let mut skipped = 0usize;
    while let Some(b) = stream.next() {
        done += b.batch_size;
        skipped += b.skipped.len();
        stream.recycle(b);
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    assert_eq!(skipped, 0, "benchmark data has corrupt records");
    (done as f64 / secs, done as f64 / cpu.max(1e-9))
}

#[derive(Parser)]
#[command(
    name = "protodino-data-bench",
    version,
    about = "Images per second of the full multi-crop pipeline on an ImageFolder of photographs \
             and/or the Fashion-MNIST shards"
)]
struct Args {
    /// An ImageFolder of JPEG photographs (`reference/bench_torchvision.py --make-photos DIR`).
    #[arg(long)]
    photos: Option<PathBuf>,
    /// The Fashion-MNIST shard directory that `cargo xtask data` provisions.
    #[arg(long)]
    fmnist: Option<PathBuf>,
    /// Decode/augment threads of the loader.
    #[arg(long, default_value_t = 2)]
    threads: i64,
    /// Images per run of the `dino` preset (the `cpu` preset runs 8 times as many).
    #[arg(long, default_value_t = 512)]
    images: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Runs per row; the fastest counts.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// The options of the older `key=value` spelling.
const KEYS: [&str; 6] = ["photos", "fmnist", "threads", "images", "batch", "repeats"];

/// `key=value` arguments (the older spelling) as `--key=value`.
fn modern(args: impl Iterator<Item = String>) -> Vec<String> {
    args.map(|a| match a.split_once('=') {
        Some((k, _)) if KEYS.contains(&k) => format!("--{a}"),
        _ => a,
    })
    .collect()
}

fn main() -> Result<()> {
    let Args {
        photos,
        fmnist,
        threads,
        images,
        batch,
        repeats,
    } = Args::parse_from(modern(std::env::args()));
    if images == 0 || batch == 0 {
        bail!("--images and --batch must be at least 1");
    }
    let cfg = TrainConfig::defaults()?;
    let data = DataConfig {
        num_threads: threads,
        prefetch_batches: 2,
        ..cfg.data
    };
    let mut sets: Vec<(&str, SharedDataset)> = Vec::new();
    if let Some(p) = photos {
        sets.push((
            "photos-500x375-jpeg",
            open_dataset(DatasetFormat::ImageFolder, &p)?,
        ));
    }
    if let Some(p) = fmnist {
        sets.push((
            "fashion-mnist-shards",
            open_dataset(DatasetFormat::Shards, &p)?,
        ));
    }
    if sets.is_empty() {
        bail!("give --photos DIR and/or --fmnist SHARD_DIR");
    }
    println!("impl\tdataset\tpreset\tthreads\timages/s\timages/cpu-s");
    for (name, ds) in &sets {
        let ds: SharedDataset = Arc::clone(ds);
        for p in ["dino", "cpu"] {
            let crops = preset(p, &cfg.crops);
            // The cpu preset is ~100x cheaper per image: run more images for a stable figure.
            let n = if p == "cpu" { images * 8 } else { images };
            let (mut best, mut per_cpu) = (0f64, 0f64);
            for _ in 0..repeats.max(1) {
                let (ips, ipc) = run(&ds, &crops, &data, n, batch);
                best = best.max(ips);
                per_cpu = per_cpu.max(ipc);
            }
            println!("protodino\t{name}\t{p}\t{threads}\t{best:.1}\t{per_cpu:.1}");
        }
    }
    Ok(())
}
