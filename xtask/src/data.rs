//! Provision the real data sets into the cache: nothing is fetched at run time.
//!
//! Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (`apt-get download`, then
//! `dpkg-deb -x`); its four IDX files are decompressed and checked against the SHA-256 of the
//! original data before anything is written under `data/fashion-mnist/raw/`. The directory is
//! assembled in a temporary place and renamed, so an interrupted run leaves nothing half-made.
//!
//! The verified IDX files are then converted once, by the data crate's `protodino-data` tool,
//! into the project's shard format: `fashion-mnist/train` (60 000), `fashion-mnist/test`
//! (10 000; labels kept for evaluation) and the long-tailed variant `fashion-mnist/train-lt100`
//! (class counts decaying exponentially, imbalance ratio 100; its source ids are listed in
//! `train-lt100.ids`). The conversion is deterministic, so the SHA-256 of every shard index is
//! pinned below and checked, and every record is decoded once (`verify`).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

use crate::cache_root;

/// SHA-256 of the *decompressed* Fashion-MNIST IDX files (Debian re-compresses the archives,
/// so the .gz digests differ from upstream's; the content does not).
pub const FASHION_MNIST: &[(&str, &str)] = &[
    (
        "train-images-idx3-ubyte",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    (
        "train-labels-idx1-ubyte",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    (
        "t10k-images-idx3-ubyte",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    (
        "t10k-labels-idx1-ubyte",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
];

pub fn data_root() -> PathBuf {
    cache_root().join("data")
}

/// Provision every data set; returns the data root.
pub fn ensure() -> Result<PathBuf> {
    let root = data_root();
    ensure_fashion_mnist_raw(&root.join("fashion-mnist"))?;
    ensure_fashion_mnist_shards(&root.join("fashion-mnist"))?;
    Ok(root)
}

fn ensure_fashion_mnist_raw(dir: &Path) -> Result<()> {
    let raw = dir.join("raw");
    if raw.join(".complete").exists() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    let work = dir.join(format!("raw.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    eprintln!("xtask: fetching Debian package dataset-fashion-mnist");
    let deb = apt_download("dataset-fashion-mnist", &cache_root().join("debs"))?;
    let unpacked = work.join("deb");
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&unpacked)
        .status()
        .context("running dpkg-deb")?;
    ensure!(status.success(), "dpkg-deb -x {} failed", deb.display());
    for (name, want) in FASHION_MNIST {
        let gz = unpacked
            .join("usr/share/datasets/fashion-mnist")
            .join(format!("{name}.gz"));
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(
            fs::File::open(&gz).with_context(|| format!("opening {}", gz.display()))?,
        )
        .read_to_end(&mut bytes)?;
        let got = hex::encode(Sha256::digest(&bytes));
        if got != *want {
            bail!("{name}: SHA-256 {got} differs from the original data's {want}");
        }
        fs::write(work.join(name), &bytes)?;
    }
    fs::remove_dir_all(&unpacked)?;
    fs::write(work.join(".complete"), "verified by SHA-256\n")?;
    let _ = fs::remove_dir_all(&raw);
    fs::rename(&work, &raw)?;
    Ok(())
}

/// SHA-256 of the `index.pdi` of each converted split (records are stored raw, so the
/// conversion is byte-for-byte deterministic).
pub const FASHION_MNIST_SHARDS: &[(&str, u64, &str)] = &[
    ("train", 60_000, INDEX_SHA_TRAIN),
    ("test", 10_000, INDEX_SHA_TEST),
    ("train-lt100", LT100_RECORDS, INDEX_SHA_LT100),
];
const INDEX_SHA_TRAIN: &str = "d2e47081431e49a31ff448a53c62a206981870f29325560664be1041bf4e2fb0";
const INDEX_SHA_TEST: &str = "c55954f6e167b438da96d56b739899ccddba90ffdea741a21b47f794d44fe9da";
const INDEX_SHA_LT100: &str = "91c023bf6d491de89d657ca37ebcc46b21b6303dc0aa5510d2db30d4f129702d";
/// floor(6000 · 100^(−c/9)) summed over the 10 classes.
const LT100_RECORDS: u64 = 14_886;

/// Run the data crate's tool (`cargo run -p protodino-data --bin protodino-data -- …`).
fn data_tool(args: &[&std::ffi::OsStr]) -> Result<()> {
    let mut c = crate::cargo();
    c.args([
        "run",
        "-q",
        "-p",
        "protodino-data",
        "--bin",
        "protodino-data",
        "--",
    ]);
    c.args(args);
    crate::run(c)
}

fn ensure_fashion_mnist_shards(dir: &Path) -> Result<()> {
    let marker = dir.join(".shards-complete");
    if marker.exists() {
        return Ok(());
    }
    let raw = dir.join("raw");
    for (split, prefix) in [("train", "train"), ("test", "t10k")] {
        let images = raw.join(format!("{prefix}-images-idx3-ubyte"));
        let labels = raw.join(format!("{prefix}-labels-idx1-ubyte"));
        let out = dir.join(split);
        data_tool(&[
            "convert-idx".as_ref(),
            images.as_os_str(),
            labels.as_os_str(),
            out.as_os_str(),
            "fashion-mnist".as_ref(),
        ])?;
    }
    let lt = dir.join("train-lt100");
    data_tool(&[
        "long-tail".as_ref(),
        dir.join("train").as_os_str(),
        "100".as_ref(),
        lt.as_os_str(),
    ])?;
    for (split, records, want) in FASHION_MNIST_SHARDS {
        let index = dir.join(split).join("index.pdi");
        let bytes = fs::read(&index).with_context(|| format!("reading {}", index.display()))?;
        let got = hex::encode(Sha256::digest(&bytes));
        let n = u64::from_le_bytes(bytes[8..16].try_into()?);
        ensure!(n == *records, "{split}: {n} records, expected {records}");
        ensure!(
            got == *want,
            "{}: SHA-256 {got} differs from the pinned {want}",
            index.display()
        );
        data_tool(&[
            "verify".as_ref(),
            "shards".as_ref(),
            dir.join(split).as_os_str(),
        ])?;
    }
    fs::write(&marker, "converted and verified\n")?;
    Ok(())
}

/// `apt-get download` a package into `dest` (running `apt-get update` once if the lists are
/// empty), returning the .deb path. A cached .deb is reused.
pub(crate) fn apt_download(package: &str, dest: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dest)?;
    let find = || -> Result<Option<PathBuf>> {
        Ok(fs::read_dir(dest)?.flatten().map(|e| e.path()).find(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with(&format!("{package}_"))
                    && n.to_string_lossy().ends_with(".deb")
            })
        }))
    };
    if let Some(p) = find()? {
        return Ok(p);
    }
    let download = || {
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(dest)
            .status()
    };
    if !download().context("running apt-get")?.success() {
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        ensure!(download()?.success(), "apt-get download {package} failed");
    }
    find()?.with_context(|| {
        format!(
            "apt-get download left no {package} .deb in {}",
            dest.display()
        )
    })
}
