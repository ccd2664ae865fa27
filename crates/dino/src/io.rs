//! safetensors files of named tensors with string metadata, written atomically.
//!
//! Checkpoints and batch files go through these functions, thin wrappers over the models crate's
//! `weights` module (one implementation of the format in the workspace): a write goes to a
//! temporary file in the target directory, is fsynced, renamed over the target and the directory
//! fsynced, so a crash leaves either the old or the new file, never a torn one. Only reading the
//! header alone ([`read_metadata`], used by `replay` before building the networks) lives here.

use std::collections::BTreeMap;
use std::path::Path;

use protodino_models::weights;
use tch::Tensor;

use crate::error::{DinoError, Result};

fn weights_err(e: protodino_models::WeightsError) -> DinoError {
    DinoError::Weights(e.to_string())
}

/// Write `tensors` (any device; copied to the host) and `metadata` to `path` atomically
/// (`protodino_models::weights::save`: temporary file, fsync, rename, directory fsync).
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    weights::save(path, tensors, metadata).map_err(weights_err)
}

/// Write `bytes` to `path` through a fsynced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    weights::write_atomic(path, bytes).map_err(weights_err)
}

/// Read every tensor (to the CPU) and the metadata of a safetensors file.
pub fn load_tensors(path: &Path) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>)> {
    let (tensors, metadata) = weights::load(path).map_err(weights_err)?;
    Ok((tensors.into_iter().collect(), metadata))
}

/// Read only the string metadata of a safetensors file (its header), not the tensors.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let io = |e| DinoError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Err(DinoError::format(path, "safetensors header too large"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| DinoError::format(path, format!("safetensors header: {e}")))?;
    let mut out = BTreeMap::new();
    if let Some(meta) = json.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in meta {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.to_string());
            }
        }
    }
    Ok(out)
}
