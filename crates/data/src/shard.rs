//! The protodino packed shard format: large append-only files of checksummed records plus one
//! binary index, written by a converter and read with one positioned read per record.
//!
//! Layout of a shard directory:
//! * `shard-00000.pds`, `shard-00001.pds`, …: the 8-byte magic `PDSHARD1`, then records, each a
//!   32-byte header — magic `PDRC`, `u64` sample id, `u32` payload length, `u8` kind, 3 zero
//!   bytes, `i64` label, `u32` CRC-32 of the payload — followed by the payload. Records are
//!   self-describing, so a shard can be scanned sequentially (and verified) without the index.
//! * `index.pdi`: magic `PDINDEX1`, `u64` count, then per sample id a 32-byte entry — `u32`
//!   shard number, `u64` header offset, `u32` payload length, `i64` label, `u32` CRC, `u8`
//!   kind, 3 zero bytes.
//! * `meta.json`: format name, version, record count, shard names, class names.
//!
//! Everything is little endian. The writer fills a temporary directory and renames it into
//! place, so a crash never leaves a half-written shard set behind. A reader checks the header
//! against the index and the payload against its CRC; any mismatch makes the record a
//! [`RecordError`] (skipped and reported by the loader), never a panic or a silent drop.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crc32::crc32;
use crate::dataset::{Dataset, Location, Record, RecordError, RecordKind};

pub const SHARD_MAGIC: &[u8; 8] = b"PDSHARD1";
pub const INDEX_MAGIC: &[u8; 8] = b"PDINDEX1";
pub const RECORD_MAGIC: &[u8; 4] = b"PDRC";
pub const HEADER_LEN: usize = 32;
pub const ENTRY_LEN: usize = 32;
pub const INDEX_FILE: &str = "index.pdi";
pub const META_FILE: &str = "meta.json";

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardMeta {
    pub format: String,
    pub version: u32,
    pub num_records: u64,
    pub shards: Vec<String>,
    pub classes: Vec<String>,
}

/// One index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub shard: u32,
    pub offset: u64,
    pub len: u32,
    pub label: i64,
    pub crc: u32,
    pub kind: u8,
}

impl IndexEntry {
    fn to_bytes(self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0..4].copy_from_slice(&self.shard.to_le_bytes());
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.label.to_le_bytes());
        b[24..28].copy_from_slice(&self.crc.to_le_bytes());
        b[28] = self.kind;
        b
    }

    fn from_bytes(b: &[u8]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        Self {
            shard: u32_at(0),
            offset: u64_at(4),
            len: u32_at(12),
            label: u64_at(16) as i64,
            crc: u32_at(24),
            kind: b[28],
        }
    }
}

fn record_header(id: u64, len: u32, kind: u8, label: i64, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(RECORD_MAGIC);
    h[4..12].copy_from_slice(&id.to_le_bytes());
    h[12..16].copy_from_slice(&len.to_le_bytes());
    h[16] = kind;
    h[20..28].copy_from_slice(&label.to_le_bytes());
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes a shard directory; records get consecutive sample ids from 0.
pub struct ShardWriter {
    final_dir: PathBuf,
    tmp_dir: PathBuf,
    shard_bytes: u64,
    shards: Vec<String>,
    current: Option<(BufWriter<File>, u64)>,
    index: Vec<IndexEntry>,
}

impl ShardWriter {
    /// Start writing into `dir` (created on `finish`); shards roll over after
    /// `shard_bytes` bytes (e.g. 256 MiB).
    pub fn create(dir: &Path, shard_bytes: u64) -> Result<Self, ShardError> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "shards".into());
        let tmp_dir = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp_dir);
        fs::create_dir_all(&tmp_dir).map_err(io(&tmp_dir))?;
        Ok(Self {
            final_dir: dir.to_path_buf(),
            tmp_dir,
            shard_bytes: shard_bytes.max(1),
            shards: Vec::new(),
            current: None,
            index: Vec::new(),
        })
    }

    /// Append one record; returns its sample id.
    pub fn push(&mut self, record: &Record, label: i64) -> Result<u64, ShardError> {
        let roll = match &self.current {
            None => true,
            Some((_, pos)) => *pos >= self.shard_bytes,
        };
        if roll {
            self.close_current()?;
            let name = format!("shard-{:05}.pds", self.shards.len());
            let path = self.tmp_dir.join(&name);
            let mut f = BufWriter::new(File::create(&path).map_err(io(&path))?);
            f.write_all(SHARD_MAGIC).map_err(io(&path))?;
            self.shards.push(name);
            self.current = Some((f, SHARD_MAGIC.len() as u64));
        }
        let id = self.index.len() as u64;
        let len = u32::try_from(record.bytes.len()).map_err(|_| ShardError::Format {
            path: self.tmp_dir.clone(),
            msg: format!("record {id} is larger than 4 GiB"),
        })?;
        let crc = crc32(&record.bytes);
        let kind = record.kind as u8;
        let shard = (self.shards.len() - 1) as u32;
        let path = self.tmp_dir.join(&self.shards[shard as usize]);
        let Some((f, pos)) = self.current.as_mut() else {
            unreachable!("a shard was opened above")
        };
        f.write_all(&record_header(id, len, kind, label, crc))
            .and_then(|_| f.write_all(&record.bytes))
            .map_err(io(&path))?;
        self.index.push(IndexEntry {
            shard,
            offset: *pos,
            len,
            label,
            crc,
            kind,
        });
        *pos += (HEADER_LEN + record.bytes.len()) as u64;
        Ok(id)
    }

    fn close_current(&mut self) -> Result<(), ShardError> {
        if let Some((mut f, _)) = self.current.take() {
            let path = self.tmp_dir.clone();
            f.flush().map_err(io(&path))?;
            f.get_ref().sync_all().map_err(io(&path))?;
        }
        Ok(())
    }

    /// Write the index and metadata, then move the directory into place.
    pub fn finish(mut self, classes: Vec<String>) -> Result<ShardMeta, ShardError> {
        self.close_current()?;
        let ipath = self.tmp_dir.join(INDEX_FILE);
        let mut f = BufWriter::new(File::create(&ipath).map_err(io(&ipath))?);
        f.write_all(INDEX_MAGIC).map_err(io(&ipath))?;
        f.write_all(&(self.index.len() as u64).to_le_bytes())
            .map_err(io(&ipath))?;
        for e in &self.index {
            f.write_all(&e.to_bytes()).map_err(io(&ipath))?;
        }
        f.flush().map_err(io(&ipath))?;
        let meta = ShardMeta {
            format: "protodino-shards".into(),
            version: 1,
            num_records: self.index.len() as u64,
            shards: self.shards.clone(),
            classes,
        };
        let mpath = self.tmp_dir.join(META_FILE);
        let text = serde_json::to_string_pretty(&meta).map_err(|e| ShardError::Format {
            path: mpath.clone(),
            msg: e.to_string(),
        })?;
        fs::write(&mpath, text).map_err(io(&mpath))?;
        let _ = fs::remove_dir_all(&self.final_dir);
        if let Some(parent) = self.final_dir.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        fs::rename(&self.tmp_dir, &self.final_dir).map_err(io(&self.final_dir))?;
        Ok(meta)
    }
}

/// A shard directory opened for random access by sample id.
pub struct ShardDataset {
    dir: PathBuf,
    meta: ShardMeta,
    files: Vec<File>,
    /// Length of each shard file when opened: a record reaching past it is truncated (and a
    /// corrupt index cannot make us allocate more than the file holds).
    sizes: Vec<u64>,
    index: Vec<IndexEntry>,
}

impl ShardDataset {
    pub fn open(dir: &Path) -> Result<Self, ShardError> {
        let mpath = dir.join(META_FILE);
        let text = fs::read_to_string(&mpath).map_err(io(&mpath))?;
        let meta: ShardMeta = serde_json::from_str(&text).map_err(|e| ShardError::Format {
            path: mpath.clone(),
            msg: e.to_string(),
        })?;
        let ipath = dir.join(INDEX_FILE);
        let mut bytes = Vec::new();
        File::open(&ipath)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io(&ipath))?;
        let bad = |msg: String| ShardError::Format {
            path: ipath.clone(),
            msg,
        };
        if bytes.len() < 16 || &bytes[..8] != INDEX_MAGIC {
            return Err(bad("not a protodino shard index".into()));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&bytes[8..16]);
        let count = u64::from_le_bytes(n) as usize;
        if bytes.len() != 16 + count * ENTRY_LEN || count as u64 != meta.num_records {
            return Err(bad(format!(
                "index holds {} bytes for {count} entries; meta says {}",
                bytes.len(),
                meta.num_records
            )));
        }
        let index: Vec<IndexEntry> = bytes[16..]
            .chunks_exact(ENTRY_LEN)
            .map(IndexEntry::from_bytes)
            .collect();
        let files = meta
            .shards
            .iter()
            .map(|s| {
                let p = dir.join(s);
                File::open(&p).map_err(io(&p))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sizes = files
            .iter()
            .zip(&meta.shards)
            .map(|(f, s)| f.metadata().map(|m| m.len()).map_err(io(&dir.join(s))))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(e) = index.iter().find(|e| e.shard as usize >= files.len()) {
            return Err(bad(format!(
                "entry names shard {} of {}",
                e.shard,
                files.len()
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            files,
            sizes,
            index,
        })
    }

    pub fn meta(&self) -> &ShardMeta {
        &self.meta
    }

    pub fn entry(&self, id: u64) -> Option<&IndexEntry> {
        self.index.get(id as usize)
    }
}

impl Dataset for ShardDataset {
    fn len(&self) -> usize {
        self.index.len()
    }

    fn label(&self, id: u64) -> i64 {
        self.index.get(id as usize).map_or(-1, |e| e.label)
    }

    fn classes(&self) -> &[String] {
        &self.meta.classes
    }

    fn read_record(&self, id: u64) -> Result<Record, RecordError> {
        let e = *self.entry(id).ok_or(RecordError::OutOfRange(id))?;
        let at = || self.location(id);
        let file = &self.files[e.shard as usize];
        let end = e.offset + HEADER_LEN as u64 + e.len as u64;
        if end > self.sizes[e.shard as usize] {
            return Err(RecordError::Malformed {
                at: at(),
                msg: format!(
                    "record ends at byte {end}, past the end of its shard ({} bytes): truncated",
                    self.sizes[e.shard as usize]
                ),
            });
        }
        let mut buf = vec![0u8; HEADER_LEN + e.len as usize];
        file.read_exact_at(&mut buf, e.offset)
            .map_err(|source| RecordError::Io { at: at(), source })?;
        let want = record_header(id, e.len, e.kind, e.label, e.crc);
        if buf[..HEADER_LEN] != want {
            return Err(RecordError::Malformed {
                at: at(),
                msg: "the record header does not match the index".into(),
            });
        }
        let payload = buf.split_off(HEADER_LEN);
        let computed = crc32(&payload);
        if computed != e.crc {
            return Err(RecordError::Checksum {
                at: at(),
                stored: e.crc,
                computed,
            });
        }
        let kind = RecordKind::from_u8(e.kind).ok_or_else(|| RecordError::Malformed {
            at: at(),
            msg: format!("unknown record kind {}", e.kind),
        })?;
        Ok(Record {
            kind,
            bytes: payload,
        })
    }

    /// The shard file, the sample id (records are indexed by it) and the header's offset.
    fn location(&self, id: u64) -> Location {
        match self.entry(id) {
            Some(e) => Location::Packed {
                file: self.dir.join(&self.meta.shards[e.shard as usize]),
                record: id,
                offset: e.offset,
            },
            None => Location::Sample(id),
        }
    }
}

/// Convert any data set into a shard directory, keeping stored bytes as they are (encoded
/// images stay encoded). Records that cannot be read are skipped and returned.
pub fn convert(
    src: &dyn Dataset,
    dir: &Path,
    shard_bytes: u64,
) -> Result<(ShardMeta, Vec<crate::dataset::SkippedRecord>), ShardError> {
    let mut w = ShardWriter::create(dir, shard_bytes)?;
    let mut skipped = Vec::new();
    for id in 0..src.len() as u64 {
        match src.read_record(id) {
            Ok(rec) => {
                w.push(&rec, src.label(id))?;
            }
            Err(e) => skipped.push(crate::dataset::SkippedRecord {
                sample_id: id,
                reason: e.to_string(),
            }),
        }
    }
    Ok((w.finish(src.classes().to_vec())?, skipped))
}
