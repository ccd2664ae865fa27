//! Checkpoint files of a run directory: `checkpoint-<step, 8 digits>.safetensors`, written
//! atomically by the trainer (temporary name, fsync, rename), with the retention of
//! `train.checkpoint_keep`, and their SHA-256 for the coordinator's catalogue.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::model::Trainer;

/// Checkpoints of a run directory, oldest first.
pub fn checkpoints(dir: &Path) -> Vec<(i64, PathBuf)> {
    let mut out: Vec<(i64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name
                .strip_prefix("checkpoint-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Saves the trainer's state as the checkpoint of its step and removes all but the newest
/// `keep` checkpoints.
pub fn save_checkpoint(trainer: &Trainer, dir: &Path, keep: usize) -> Result<PathBuf> {
    let path = dir.join(format!("checkpoint-{:08}.safetensors", trainer.step));
    trainer.save_checkpoint(&path)?;
    let all = checkpoints(dir);
    for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_file(old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(path)
}

/// SHA-256 of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<[u8; 32]> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}
