//! Replaying one step from a checkpoint and a batch file (issue 3, `protodino replay`).
//!
//! A batch file is safetensors with `global_crops` [2, B, 3, G, G], `local_crops` [L, B, 3, l, l]
//! (absent when L = 0), both normalised fp32, optionally `sample_ids` [B] (int64; default
//! 0..B), optionally `global_masks` [2, B, h, w] (uint8, iBOT's masks; when absent an iBOT
//! replay derives them from the sample ids as training does), and optionally the metadata key `protodino_batch` holding the JSON
//! [`ScheduleValues`] of the step. The trainer writes one when a step's loss is not finite.
//!
//! Schedule values of the replayed step, first match wins per value: an explicit override,
//! the batch file's record, the checkpoint's `next_schedule` (or the schedules at the
//! checkpoint's step). Overriding only the epoch also moves the teacher temperature to that
//! epoch's value. A checkpoint without optimiser state replays as the first step of a fresh
//! optimiser.

use std::collections::BTreeMap;
use std::path::Path;

use protodino_config::TrainConfig;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::checkpoint::{LoadedCheckpoint, read_meta};
use crate::error::{DinoError, Result};
use crate::io::{load_tensors, read_metadata, save_tensors};
use crate::network::DinoNetwork;
use crate::reducer::LocalReducer;
use crate::schedule::ScheduleValues;
use crate::step::{Batch, DinoTrainer};

/// Metadata key of a batch file's schedule record.
pub const BATCH_META_KEY: &str = "protodino_batch";

/// Write `batch` (and the schedule values of its step) to `path`.
pub fn write_batch(path: &Path, batch: &Batch, schedule: Option<&ScheduleValues>) -> Result<()> {
    let mut tensors = vec![(
        "global_crops".to_string(),
        Tensor::stack(&batch.global_crops, 0),
    )];
    if !batch.local_crops.is_empty() {
        tensors.push(("local_crops".into(), Tensor::stack(&batch.local_crops, 0)));
    }
    tensors.push(("sample_ids".into(), Tensor::from_slice(&batch.sample_ids)));
    if let Some(m) = &batch.masks {
        let stacked = Tensor::stack(m, 0).to_kind(Kind::Uint8);
        tensors.push(("global_masks".into(), stacked));
    }
    let mut metadata = BTreeMap::new();
    if let Some(s) = schedule {
        let json = serde_json::to_string(s).map_err(|e| DinoError::format(path, e.to_string()))?;
        metadata.insert(BATCH_META_KEY.to_string(), json);
    }
    save_tensors(path, &tensors, &metadata)
}

/// Read a batch file: the batch and the schedule record, if any.
pub fn read_batch(path: &Path) -> Result<(Batch, Option<ScheduleValues>)> {
    let (tensors, metadata) = load_tensors(path)?;
    let crops = |name: &str| -> Result<Vec<Tensor>> {
        match tensors.get(name) {
            None => Ok(Vec::new()),
            Some(t) if t.dim() == 5 && t.size()[2] == 3 => Ok(t.to_kind(Kind::Float).unbind(0)),
            Some(t) => Err(DinoError::format(
                path,
                format!("{name} has shape {:?}, expected [n, B, 3, H, W]", t.size()),
            )),
        }
    };
    let global_crops = crops("global_crops")?;
    if global_crops.len() != 2 {
        return Err(DinoError::format(
            path,
            "global_crops must hold exactly 2 crops",
        ));
    }
    let local_crops = crops("local_crops")?;
    let b = global_crops[0].size()[0];
    let sample_ids = match tensors.get("sample_ids") {
        Some(t) => Vec::<i64>::try_from(t.to_kind(Kind::Int64).flatten(0, -1))?,
        None => (0..b).collect(),
    };
    let masks = match tensors.get("global_masks") {
        None => None,
        Some(t) if t.dim() == 4 && t.size()[0] == 2 && t.size()[1] == b => {
            Some(t.to_kind(Kind::Bool).unbind(0))
        }
        Some(t) => {
            return Err(DinoError::format(
                path,
                format!(
                    "global_masks has shape {:?}, expected [2, {b}, h, w]",
                    t.size()
                ),
            ));
        }
    };
    let schedule = match metadata.get(BATCH_META_KEY) {
        Some(s) => Some(
            serde_json::from_str(s)
                .map_err(|e| DinoError::format(path, format!("{BATCH_META_KEY}: {e}")))?,
        ),
        None => None,
    };
    Ok((
        Batch {
            global_crops,
            local_crops,
            sample_ids,
            masks,
        },
        schedule,
    ))
}

/// Values that override the step's schedule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayOverrides {
    pub epoch: Option<i64>,
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    pub momentum: Option<f64>,
    pub teacher_temp: Option<f64>,
}

/// The result of a replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayReport {
    pub dino_loss: f64,
    pub koleo_proto: f64,
    pub total: f64,
    /// The schedule values used.
    pub schedule: ScheduleValues,
    /// Whether the checkpoint held optimiser state (otherwise: a fresh optimiser's first step).
    pub had_optimizer_state: bool,
    /// Whether one optimiser step was applied and the new state written.
    pub applied: bool,
}

/// Recompute `{dino_loss, koleo_proto, total}` of the batch in `batch_path` with the state of
/// `checkpoint`; with `out`, apply one full step (clip, freeze, optimiser, EMA, centre) and write
/// the new state there. `build` constructs the network as in [`DinoTrainer::new`].
pub fn replay<N: DinoNetwork>(
    cfg: TrainConfig,
    checkpoint: &Path,
    batch_path: &Path,
    overrides: ReplayOverrides,
    out: Option<&Path>,
    build: impl Fn(&tch::nn::Path, bool) -> N,
) -> Result<ReplayReport> {
    let metadata = read_metadata(checkpoint)?;
    let meta = read_meta(&metadata, checkpoint)?;
    let (niter, world) = meta
        .as_ref()
        .map_or((1, 1), |m| (m.niter_per_epoch.max(1), m.world_size.max(1)));
    let mut trainer = DinoTrainer::new(cfg, niter, world, build)?;
    let loaded: LoadedCheckpoint = trainer.load_checkpoint(checkpoint)?;
    let (batch, batch_schedule) = read_batch(batch_path)?;
    let base = batch_schedule
        .or(loaded.meta.as_ref().map(|m| m.next_schedule))
        .unwrap_or_else(|| trainer.schedules.at(trainer.step));
    let mut sv = base;
    if let Some(e) = overrides.epoch {
        sv.epoch = e;
        sv.teacher_temp = trainer.schedules.teacher_temp(e);
    }
    if let Some(v) = overrides.lr {
        sv.lr = v;
    }
    if let Some(v) = overrides.weight_decay {
        sv.weight_decay = v;
    }
    if let Some(v) = overrides.momentum {
        sv.momentum = v;
    }
    if let Some(v) = overrides.teacher_temp {
        sv.teacher_temp = v;
    }
    trainer.step = sv.step;
    let report = |d, k, t, applied| ReplayReport {
        dino_loss: d,
        koleo_proto: k,
        total: t,
        schedule: sv,
        had_optimizer_state: loaded.had_optimizer_state,
        applied,
    };
    match out {
        Some(out) => {
            let m = trainer.apply_step(&batch, sv, &LocalReducer)?;
            trainer.save_checkpoint(out)?;
            Ok(report(m.dino_loss, m.koleo_proto, m.total, true))
        }
        None => {
            let l = trainer.losses(&batch, sv)?;
            let k = l.koleo.as_ref().map_or(0.0, |k| k.loss.double_value(&[]));
            Ok(report(
                l.dino_loss.double_value(&[]),
                k,
                l.total.double_value(&[]),
                false,
            ))
        }
    }
}
