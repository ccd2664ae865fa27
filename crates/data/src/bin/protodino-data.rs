//! `protodino-data`: converters and checks for the data pipeline (used by `cargo xtask data`).
//!
//! ```text
//! protodino-data convert-idx IMAGES LABELS OUT_DIR [fashion-mnist|mnist]
//! protodino-data convert (image_folder|file_list|shards) SRC OUT_DIR [SHARD_MIB]
//! protodino-data verify (image_folder|file_list|shards) PATH
//! protodino-data long-tail SHARD_DIR RATIO OUT_DIR        # subset shards + OUT_DIR.ids
//! protodino-data digest FORMAT PATH SEED EPOCH THREADS IDS  # hash of one multi-crop batch
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use protodino_config::{CropsConfig, DataConfig, DatasetFormat, TrainConfig};
use protodino_data::dataset::Subset;
use protodino_data::idx::{FASHION_MNIST_CLASSES, idx_to_shards, read_idx};
use protodino_data::longtail::long_tailed_subset;
use protodino_data::{Dataset, Loader, open_dataset, shard};

fn format(s: &str) -> Result<DatasetFormat> {
    Ok(match s {
        "image_folder" => DatasetFormat::ImageFolder,
        "file_list" => DatasetFormat::FileList,
        "shards" => DatasetFormat::Shards,
        _ => bail!("unknown format {s:?} (image_folder | file_list | shards)"),
    })
}

const MNIST_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// FNV-1a 64 over the bit patterns of a batch (a digest, not a checksum of record).
fn fnv(bytes: impl Iterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn verify(ds: &dyn Dataset) -> (usize, Vec<String>) {
    let mut ok = 0;
    let mut bad = Vec::new();
    for id in 0..ds.len() as u64 {
        match ds.load(id) {
            Ok(_) => ok += 1,
            Err(e) => bad.push(format!("sample {id}: {e}")),
        }
    }
    (ok, bad)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("missing argument {i}; see the usage in the source header"))
    };
    match a(0)? {
        "convert-idx" => {
            let images = read_idx(Path::new(a(1)?))?;
            let labels = read_idx(Path::new(a(2)?))?;
            let classes: &[&str] = match args.get(4).map(String::as_str) {
                Some("mnist") => &MNIST_CLASSES,
                _ => &FASHION_MNIST_CLASSES,
            };
            let (meta, _) = idx_to_shards(&images, &labels, classes, Path::new(a(3)?), 64 << 20)?;
            println!(
                "{} records in {} shard(s)",
                meta.num_records,
                meta.shards.len()
            );
        }
        "convert" => {
            let src = open_dataset(format(a(1)?)?, Path::new(a(2)?))?;
            let mib: u64 = args.get(4).map_or(Ok(256), |s| s.parse())?;
            let (meta, skipped) = shard::convert(&*src, Path::new(a(3)?), mib << 20)?;
            for e in src.ignored_entries() {
                eprintln!("ignored: {e}");
            }
            for s in &skipped {
                eprintln!("skipped sample {}: {}", s.sample_id, s.reason);
            }
            println!(
                "{} records in {} shard(s); {} unreadable skipped; {} non-image entries ignored",
                meta.num_records,
                meta.shards.len(),
                skipped.len(),
                src.ignored_entries().len()
            );
        }
        "verify" => {
            let ds = open_dataset(format(a(1)?)?, Path::new(a(2)?))?;
            let (ok, bad) = verify(&*ds);
            for b in &bad {
                eprintln!("{b}");
            }
            println!(
                "{ok} decodable, {} bad, {} ignored",
                bad.len(),
                ds.ignored_entries().len()
            );
            if !bad.is_empty() {
                std::process::exit(1);
            }
        }
        "long-tail" => {
            let ds: Arc<dyn Dataset> = open_dataset(DatasetFormat::Shards, Path::new(a(1)?))?;
            let ratio: f64 = a(2)?.parse()?;
            let labels: Vec<i64> = (0..ds.len() as u64).map(|i| ds.label(i)).collect();
            let ids = long_tailed_subset(&labels, ds.classes().len(), ratio);
            let out = PathBuf::from(a(3)?);
            let list = out.with_extension("ids");
            let text: String = ids.iter().map(|i| format!("{i}\n")).collect();
            let n = ids.len();
            let (meta, _) = shard::convert(&Subset::new(ds, ids), &out, 256 << 20)?;
            std::fs::write(&list, text)?;
            println!(
                "{n} of {} records kept (ratio {ratio}); ids in {}",
                labels.len(),
                list.display()
            );
            let _ = meta;
        }
        "digest" => {
            let ds = open_dataset(format(a(1)?)?, Path::new(a(2)?))?;
            let seed: u64 = a(3)?.parse()?;
            let epoch: u64 = a(4)?.parse()?;
            let threads: i64 = a(5)?.parse()?;
            let ids: Vec<u64> = a(6)?
                .split(',')
                .map(|s| s.parse())
                .collect::<Result<_, _>>()?;
            let cfg = TrainConfig::defaults()?;
            let crops = CropsConfig {
                global_crop_size: 32,
                local_crop_size: 16,
                local_crops_number: 3,
                ..cfg.crops
            };
            let data = DataConfig {
                num_threads: threads,
                ..cfg.data
            };
            let loader = Loader::new(ds, &crops, &data, seed)?;
            let b = loader.make_batch(epoch, &ids);
            let h = fnv(
                b.global_crops
                    .iter()
                    .chain(&b.local_crops)
                    .flat_map(|v| v.to_bits().to_le_bytes()),
                0xcbf2_9ce4_8422_2325,
            );
            println!("{h:016x} {} {}", b.batch_size, b.skipped.len());
        }
        other => bail!("unknown command {other:?}"),
    }
    Ok(())
}
