//! The dataset abstraction every format implements, record decoding, and the report of
//! records that could not be used.
//!
//! A dataset is an indexed collection of records `0..len`; the sample id *is* the index (the
//! order is deterministic for every format: sorted paths, list order, or shard index order).
//! A record is the stored bytes plus how to read them. Decoding failures never abort: they
//! become a [`SkippedRecord`] that the loader reports in the batch it was met in. Every error
//! about a record names where it is stored ([`Location`]): its file, or the shard file and the
//! record's index and offset in it.

use std::path::{Path, PathBuf};
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

/// Where a record is stored, as record errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An image file of a folder or file-list data set.
    File(PathBuf),
    /// A record inside a packed file (a shard): the file, the record's index in the data set
    /// and the byte offset of its header in the file.
    Packed {
        file: PathBuf,
        record: u64,
        offset: u64,
    },
    /// A record of a data set that has no files (generated in memory): only its sample id.
    Sample(u64),
}

impl Location {
    /// The file the record is stored in, if it is in one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::File(f) | Self::Packed { file: f, .. } => Some(f),
            Self::Sample(_) => None,
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Packed {
                file,
                record,
                offset,
            } => write!(f, "{} (record {record} at byte {offset})", file.display()),
            Self::Sample(id) => write!(f, "sample {id}"),
        }
    }
}

/// Why a record was skipped. Every variant but `OutOfRange` names where the record is stored.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("sample id {0} is outside the data set")]
    OutOfRange(u64),
    #[error("{at}: i/o error: {source}")]
    Io {
        at: Location,
        #[source]
        source: std::io::Error,
    },
    #[error("{at}: checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum {
        at: Location,
        stored: u32,
        computed: u32,
    },
    #[error("{at}: malformed record: {msg}")]
    Malformed { at: Location, msg: String },
    #[error("{at}: not a decodable image: {msg}")]
    Decode { at: Location, msg: String },
}

impl RecordError {
    /// Where the record is stored (`None` for an id outside the data set).
    pub fn location(&self) -> Option<&Location> {
        match self {
            Self::OutOfRange(_) => None,
            Self::Io { at, .. }
            | Self::Checksum { at, .. }
            | Self::Malformed { at, .. }
            | Self::Decode { at, .. } => Some(at),
        }
    }
}

/// Why stored bytes are not an image. The data set that read the bytes turns it into a
/// [`RecordError`] naming the record's location ([`DecodeError::at`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed record: {0}")]
    Malformed(String),
    #[error("not a decodable image: {0}")]
    Image(String),
}

impl DecodeError {
    pub fn at(self, at: Location) -> RecordError {
        match self {
            Self::Malformed(msg) => RecordError::Malformed { at, msg },
            Self::Image(msg) => RecordError::Decode { at, msg },
        }
    }
}

/// A record met while filling a batch that could not be used; the loader never drops one
/// silently. `reason` is the [`RecordError`]'s message, which names the record's location.
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
    /// The stored bytes of a record. Its errors name the record's [`Location`].
    fn read_record(&self, id: u64) -> Result<Record, RecordError>;
    /// Where record `id` is stored: its file, or the packed file and the record in it. A
    /// data set without files keeps the default, the sample id.
    fn location(&self, id: u64) -> Location {
        Location::Sample(id)
    }
    /// Read and decode a record; a record that does not decode is an error naming its
    /// location.
    fn load(&self, id: u64) -> Result<RgbImage, RecordError> {
        decode_record(&self.read_record(id)?).map_err(|e| e.at(self.location(id)))
    }
    /// Entries met while indexing that are not images (e.g. `README.txt` in an ImageFolder
    /// class directory, list lines that could not be parsed): never silently dropped.
    fn ignored_entries(&self) -> &[String] {
        &[]
    }
}

/// Shared handle used by the loader's threads.
pub type SharedDataset = Arc<dyn Dataset>;

fn raw_dims(bytes: &[u8]) -> Result<(usize, usize, &[u8]), DecodeError> {
    if bytes.len() < 8 {
        return Err(DecodeError::Malformed(
            "raw record shorter than its header".into(),
        ));
    }
    let w = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let h = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    Ok((w, h, &bytes[8..]))
}

/// Decode a record into 8-bit RGB. Grey images become three equal channels (what PIL's
/// `convert("RGB")` does in DINO's `pil_loader`); alpha is dropped. The bytes do not know
/// where they came from: [`Dataset::load`] adds the location to the error.
pub fn decode_record(rec: &Record) -> Result<RgbImage, DecodeError> {
    match rec.kind {
        RecordKind::Encoded => {
            let img = image::load_from_memory(&rec.bytes)
                .map_err(|e| DecodeError::Image(e.to_string()))?;
            let rgb = img.into_rgb8();
            let (w, h) = (rgb.width() as usize, rgb.height() as usize);
            RgbImage::new(w, h, rgb.into_raw())
                .ok_or_else(|| DecodeError::Image("empty image".into()))
        }
        RecordKind::RawGray => {
            let (w, h, px) = raw_dims(&rec.bytes)?;
            RgbImage::from_gray(w, h, px).ok_or_else(|| {
                DecodeError::Malformed(format!("raw grey {w}x{h} with {} bytes", px.len()))
            })
        }
        RecordKind::RawRgb => {
            let (w, h, px) = raw_dims(&rec.bytes)?;
            RgbImage::new(w, h, px.to_vec()).ok_or_else(|| {
                DecodeError::Malformed(format!("raw RGB {w}x{h} with {} bytes", px.len()))
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
    fn location(&self, id: u64) -> Location {
        if id < self.len as u64 {
            self.inner.location(self.inner_id(id))
        } else {
            Location::Sample(id)
        }
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
    fn location(&self, id: u64) -> Location {
        match self.ids.get(id as usize) {
            Some(&i) => self.inner.location(i),
            None => Location::Sample(id),
        }
    }
    fn ignored_entries(&self) -> &[String] {
        self.inner.ignored_entries()
    }
}
