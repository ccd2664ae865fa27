//! The dataset abstraction every format implements, record decoding, and the report of
//! records that could not be used.
//!
//! A dataset is an indexed collection of records `0..len`; the sample id *is* the index (the
//! order is deterministic for every format: sorted paths, list order, or shard index order).
//! A record is the stored bytes plus how to read them. Decoding failures never abort: they
//! become a [`SkippedRecord`] that the loader reports in the batch it was met in.

use std::path::PathBuf;
use std::sync::Arc;

use crate::image::RgbImage;

/// How a record's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// An encoded image file (PNG or JPEG), decoded with the `image` crate.
    Encoded = 0,
    /// Raw 8-bit grey: `u32 width, u32 height` (little endian) then the pixels.
    RawGray = 1,
    /// Raw 8-bit interleaved RGB: `u32 width, u32 height` then the pixels.
    RawRgb = 2,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Encoded),
            1 => Some(Self::RawGray),
            2 => Some(Self::RawRgb),
            _ => None,
        }
    }
}

/// Why a record was skipped.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("sample id {0} is outside the data set")]
    OutOfRange(u64),
    #[error("i/o error reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("malformed record: {0}")]
    Malformed(String),
    #[error("not a decodable image: {0}")]
    Decode(String),
}

/// A record met while filling a batch that could not be used; the loader never drops one
/// silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRecord {
    pub sample_id: u64,
    pub reason: String,
}

/// Stored bytes of one record.
#[derive(Debug, Clone)]
pub struct Record {
    pub kind: RecordKind,
    pub bytes: Vec<u8>,
}

/// An indexed collection of labelled images.
pub trait Dataset: Send + Sync {
    /// Number of records (sample ids are `0..len`).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Label of a record (class index; −1 when the format carries none). Labels are for
    /// evaluation only; training never reads them.
    fn label(&self, id: u64) -> i64;
    /// Class names by index (may be empty).
    fn classes(&self) -> &[String];
    /// The stored bytes of a record.
    fn read_record(&self, id: u64) -> Result<Record, RecordError>;
    /// Read and decode a record.
    fn load(&self, id: u64) -> Result<RgbImage, RecordError> {
        decode_record(&self.read_record(id)?)
    }
    /// Entries met while indexing that are not images (e.g. `README.txt` in an ImageFolder
    /// class directory, list lines that could not be parsed): never silently dropped.
    fn ignored_entries(&self) -> &[String] {
        &[]
    }
}

/// Shared handle used by the loader's threads.
pub type SharedDataset = Arc<dyn Dataset>;

fn raw_dims(bytes: &[u8]) -> Result<(usize, usize, &[u8]), RecordError> {
    if bytes.len() < 8 {
        return Err(RecordError::Malformed(
            "raw record shorter than its header".into(),
        ));
    }
    let w = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let h = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    Ok((w, h, &bytes[8..]))
}

/// Decode a record into 8-bit RGB. Grey images become three equal channels (what PIL's
/// `convert("RGB")` does in DINO's `pil_loader`); alpha is dropped.
pub fn decode_record(rec: &Record) -> Result<RgbImage, RecordError> {
    match rec.kind {
        RecordKind::Encoded => {
            let img = image::load_from_memory(&rec.bytes)
                .map_err(|e| RecordError::Decode(e.to_string()))?;
            let rgb = img.into_rgb8();
            let (w, h) = (rgb.width() as usize, rgb.height() as usize);
            RgbImage::new(w, h, rgb.into_raw())
                .ok_or_else(|| RecordError::Decode("empty image".into()))
        }
        RecordKind::RawGray => {
            let (w, h, px) = raw_dims(&rec.bytes)?;
            RgbImage::from_gray(w, h, px).ok_or_else(|| {
                RecordError::Malformed(format!("raw grey {w}x{h} with {} bytes", px.len()))
            })
        }
        RecordKind::RawRgb => {
            let (w, h, px) = raw_dims(&rec.bytes)?;
            RgbImage::new(w, h, px.to_vec()).ok_or_else(|| {
                RecordError::Malformed(format!("raw RGB {w}x{h} with {} bytes", px.len()))
            })
        }
    }
}

/// Encode raw pixels as a record payload (`channels` 1 or 3).
pub fn raw_record(width: usize, height: usize, channels: usize, pixels: &[u8]) -> Record {
    let mut bytes = Vec::with_capacity(8 + pixels.len());
    bytes.extend_from_slice(&(width as u32).to_le_bytes());
    bytes.extend_from_slice(&(height as u32).to_le_bytes());
    bytes.extend_from_slice(pixels);
    Record {
        kind: if channels == 1 {
            RecordKind::RawGray
        } else {
            RecordKind::RawRgb
        },
        bytes,
    }
}

/// `limit` evenly spaced records of a data set (`DataConfig::limit`): new id `i` is inner id
/// `⌊i·n/limit⌋`. Evenly spaced rather than the first `limit`, so a class-ordered set (an
/// ImageFolder, a long-tailed subset) keeps its class proportions.
pub struct Limited {
    inner: SharedDataset,
    len: usize,
}

impl Limited {
    pub fn new(inner: SharedDataset, limit: usize) -> Self {
        let len = if limit == 0 {
            inner.len()
        } else {
            inner.len().min(limit)
        };
        Self { inner, len }
    }

    /// The inner id of new id `id` (`id < len`).
    fn inner_id(&self, id: u64) -> u64 {
        (id as u128 * self.inner.len() as u128 / self.len as u128) as u64
    }
}

impl Dataset for Limited {
    fn len(&self) -> usize {
        self.len
    }
    fn label(&self, id: u64) -> i64 {
        if id < self.len as u64 {
            self.inner.label(self.inner_id(id))
        } else {
            -1
        }
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
    fn read_record(&self, id: u64) -> Result<Record, RecordError> {
        if id >= self.len as u64 {
            return Err(RecordError::OutOfRange(id));
        }
        self.inner.read_record(self.inner_id(id))
    }
    fn ignored_entries(&self) -> &[String] {
        self.inner.ignored_entries()
    }
}

/// A data set restricted to listed sample ids (new id `i` = `ids[i]` of the inner set), e.g.
/// the long-tailed subset.
pub struct Subset {
    inner: SharedDataset,
    ids: Vec<u64>,
}

impl Subset {
    pub fn new(inner: SharedDataset, ids: Vec<u64>) -> Self {
        Self { inner, ids }
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.ids.len()
    }
    fn label(&self, id: u64) -> i64 {
        self.ids
            .get(id as usize)
            .map_or(-1, |&i| self.inner.label(i))
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
    fn read_record(&self, id: u64) -> Result<Record, RecordError> {
        let &i = self
            .ids
            .get(id as usize)
            .ok_or(RecordError::OutOfRange(id))?;
        self.inner.read_record(i)
    }
    fn ignored_entries(&self) -> &[String] {
        self.inner.ignored_entries()
    }
}
