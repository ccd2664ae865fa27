//! `protodino-data`: converters and checks for the data pipeline (used by `cargo xtask data`).
//!
//! ```text
//! protodino-data convert-idx IMAGES LABELS OUT_DIR [fashion-mnist|mnist]
//! protodino-data convert (image_folder|file_list|shards) SRC OUT_DIR [SHARD_MIB]
//! protodino-data verify (image_folder|file_list|shards) PATH
//! protodino-data long-tail SHARD_DIR RATIO OUT_DIR        # subset shards + OUT_DIR.ids
//! protodino-data digest FORMAT PATH SEED EPOCH THREADS IDS  # hash of one multi-crop batch
//! ```
//!
//! `protodino-data --help` and `protodino-data COMMAND --help` describe every argument.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use protodino_config::{CropsConfig, DataConfig, DatasetFormat, TrainConfig};
use protodino_data::dataset::Subset;
use protodino_data::idx::{FASHION_MNIST_CLASSES, idx_to_shards, read_idx};
use protodino_data::longtail::long_tailed_subset;
use protodino_data::{Dataset, Loader, open_dataset, shard};

#[derive(Parser)]
#[command(
    name = "protodino-data",
    version,
    about = "Converters and checks for protodino's data sets"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// A data set format, spelled as in the configuration's `data.format`.
#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// `root/<class>/<file>` with .jpg/.jpeg/.png files.
    #[value(name = "image_folder")]
    ImageFolder,
    /// A text list of `relative/path [label]` lines, or an iNaturalist-2018 JSON file.
    #[value(name = "file_list")]
    FileList,
    /// A protodino shard directory (`shard-NNNNN.pds`, `index.pdi`, `meta.json`).
    #[value(name = "shards")]
    Shards,
}

impl From<Format> for DatasetFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::ImageFolder => DatasetFormat::ImageFolder,
            Format::FileList => DatasetFormat::FileList,
            Format::Shards => DatasetFormat::Shards,
        }
    }
}

/// The class names an IDX pair is labelled with.
#[derive(Clone, Copy, ValueEnum)]
enum IdxClasses {
    /// Fashion-MNIST: T-shirt/top, Trouser, … Ankle boot.
    FashionMnist,
    /// MNIST: the digits 0 to 9.
    Mnist,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert an MNIST-style IDX image/label pair into a shard directory of raw grey records.
    ConvertIdx {
        /// The IDX file of images (`[N, rows, cols]`, unsigned bytes).
        images: PathBuf,
        /// The IDX file of labels (`[N]`, unsigned bytes).
        labels: PathBuf,
        /// The shard directory to write (replaced when it exists).
        out_dir: PathBuf,
        /// Class names to store with the shards.
        #[arg(value_enum, default_value = "fashion-mnist")]
        classes: IdxClasses,
    },
    /// Convert a data set of any format into a shard directory, keeping the stored bytes;
    /// unreadable records are skipped and listed on stderr.
    Convert {
        /// Format of SRC.
        #[arg(value_enum)]
        format: Format,
        /// The data set to convert (a directory or a list file).
        src: PathBuf,
        /// The shard directory to write (replaced when it exists).
        out_dir: PathBuf,
        /// Size at which a shard file rolls over to the next, in MiB.
        #[arg(default_value_t = 256)]
        shard_mib: u64,
    },
    /// Read and decode every record of a data set; each bad one is listed on stderr with its
    /// file, and the exit status is 1 when there is any.
    Verify {
        /// Format of PATH.
        #[arg(value_enum)]
        format: Format,
        /// The data set (a directory or a list file).
        path: PathBuf,
    },
    /// Write the long-tailed subset of a shard directory (class c keeps
    /// `floor(n_max · ratio^(−c/(C−1)))` images) as shards, and its source ids to OUT_DIR.ids.
    LongTail {
        /// The shard directory to take the subset of.
        shard_dir: PathBuf,
        /// The imbalance ratio between the largest and the smallest class.
        ratio: f64,
        /// The shard directory to write.
        out_dir: PathBuf,
    },
    /// Print a digest of one multi-crop batch (FNV-1a of the crops' bits), its size and the
    /// number of skipped records: the same batch in any process gives the same digest.
    Digest {
        /// Format of PATH.
        #[arg(value_enum)]
        format: Format,
        /// The data set (a directory or a list file).
        path: PathBuf,
        /// The data seed.
        seed: u64,
        /// The epoch the batch belongs to.
        epoch: u64,
        /// Decode/augment threads.
        threads: i64,
        /// The batch's sample ids, comma separated.
        #[arg(value_delimiter = ',', required = true, num_args = 1)]
        ids: Vec<u64>,
    },
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

/// (decodable records, one line per bad record). Each line names the sample id and, through
/// the record error, the file the record lives in.
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
    match Cli::parse().cmd {
        Cmd::ConvertIdx {
            images,
            labels,
            out_dir,
            classes,
        } => {
            let images = read_idx(&images)?;
            let labels = read_idx(&labels)?;
            let classes: &[&str] = match classes {
                IdxClasses::Mnist => &MNIST_CLASSES,
                IdxClasses::FashionMnist => &FASHION_MNIST_CLASSES,
            };
            let (meta, _) = idx_to_shards(&images, &labels, classes, &out_dir, 64 << 20)?;
            println!(
                "{} records in {} shard(s)",
                meta.num_records,
                meta.shards.len()
            );
        }
        Cmd::Convert {
            format,
            src,
            out_dir,
            shard_mib,
        } => {
            let src = open_dataset(format.into(), &src)?;
            let (meta, skipped) = shard::convert(&*src, &out_dir, shard_mib << 20)?;
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
        Cmd::Verify { format, path } => {
            let ds = open_dataset(format.into(), &path)?;
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
        Cmd::LongTail {
            shard_dir,
            ratio,
            out_dir,
        } => long_tail(&shard_dir, ratio, &out_dir)?,
        Cmd::Digest {
            format,
            path,
            seed,
            epoch,
            threads,
            ids,
        } => {
            let ds = open_dataset(format.into(), &path)?;
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
    }
    Ok(())
}

fn long_tail(shard_dir: &Path, ratio: f64, out: &Path) -> Result<()> {
    let ds: Arc<dyn Dataset> = open_dataset(DatasetFormat::Shards, shard_dir)?;
    let labels: Vec<i64> = (0..ds.len() as u64).map(|i| ds.label(i)).collect();
    let ids = long_tailed_subset(&labels, ds.classes().len(), ratio);
    let list = out.with_extension("ids");
    let text: String = ids.iter().map(|i| format!("{i}\n")).collect();
    let n = ids.len();
    shard::convert(&Subset::new(ds, ids), out, 256 << 20)?;
    std::fs::write(&list, text)?;
    println!(
        "{n} of {} records kept (ratio {ratio}); ids in {}",
        labels.len(),
        list.display()
    );
    Ok(())
}
