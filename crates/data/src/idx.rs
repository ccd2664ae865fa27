//! Reading the IDX files of MNIST / Fashion-MNIST and converting them into shards.
//!
//! IDX: big-endian magic `0x0000 08 NN` (8 = unsigned byte, NN = number of dimensions), then NN
//! `u32` sizes, then the data. Images are `[N, rows, cols]`, labels `[N]`.

use std::path::Path;

use crate::dataset::{SkippedRecord, raw_record};
use crate::shard::{ShardError, ShardMeta, ShardWriter};

#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Format(String),
    #[error(transparent)]
    Shard(#[from] ShardError),
}

/// An unsigned-byte IDX array.
#[derive(Debug, Clone)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn parse_idx(bytes: &[u8]) -> Result<IdxArray, IdxError> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(IdxError::Format("not an unsigned-byte IDX file".into()));
    }
    let nd = bytes[3] as usize;
    let head = 4 + 4 * nd;
    if bytes.len() < head {
        return Err(IdxError::Format("IDX header truncated".into()));
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let n: usize = dims.iter().product();
    if bytes.len() != head + n {
        return Err(IdxError::Format(format!(
            "IDX dims {dims:?} need {n} bytes, file has {}",
            bytes.len() - head
        )));
    }
    Ok(IdxArray {
        dims,
        data: bytes[head..].to_vec(),
    })
}

pub fn read_idx(path: &Path) -> Result<IdxArray, IdxError> {
    let bytes = std::fs::read(path).map_err(|source| IdxError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_idx(&bytes).map_err(|e| match e {
        IdxError::Format(msg) => IdxError::Format(format!("{}: {msg}", path.display())),
        other => other,
    })
}

/// Fashion-MNIST class names (index = label).
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Convert an IDX image/label pair into a shard directory of raw grey records.
pub fn idx_to_shards(
    images: &IdxArray,
    labels: &IdxArray,
    classes: &[&str],
    dir: &Path,
    shard_bytes: u64,
) -> Result<(ShardMeta, Vec<SkippedRecord>), IdxError> {
    if images.dims.len() != 3 || labels.dims.len() != 1 || images.dims[0] != labels.dims[0] {
        return Err(IdxError::Format(format!(
            "image dims {:?} do not match label dims {:?}",
            images.dims, labels.dims
        )));
    }
    let (n, h, w) = (images.dims[0], images.dims[1], images.dims[2]);
    let mut writer = ShardWriter::create(dir, shard_bytes)?;
    for i in 0..n {
        let px = &images.data[i * h * w..(i + 1) * h * w];
        writer.push(&raw_record(w, h, 1, px), labels.data[i] as i64)?;
    }
    let meta = writer.finish(classes.iter().map(|s| s.to_string()).collect())?;
    Ok((meta, Vec::new()))
}
