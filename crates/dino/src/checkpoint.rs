//! Checkpoints: one safetensors file holding the whole training state (docs/algorithm.md §1.6, §1.8;
//! docs/service.md, "Rank 0's extra work").
//!
//! Tensor names:
//! * `student.<official name>` and `teacher.<official name>` for every variable of the two
//!   networks, buffers included (`student.backbone.cls_token`,
//!   `student.head.last_layer.weight_v`, `teacher.head.mlp.0.weight`, …);
//! * `dino_loss.center` ([1, K]);
//! * the optimiser state: `optimizer.exp_avg.<param>`, `optimizer.exp_avg_sq.<param>`,
//!   `optimizer.step.<param>` (AdamW), `optimizer.momentum_buffer.<param>` (SGD),
//!   `optimizer.mu.<param>` (LARS), with `<param>` the full student name;
//! * `koleo.nn_index` when KoLeo-proto caches neighbour indices (refresh interval > 1).
//!
//! The metadata key `protodino` holds a JSON [`CheckpointMeta`]: step, epoch, the whole
//! configuration, the data position, the seed, iterations per epoch, world size and the schedule
//! values of the last and of the next step.
//!
//! Loading accepts any file whose `student.*` / `teacher.*` tensors cover both networks — in
//! particular an official DINO checkpoint converted to safetensors, with or without the DDP
//! `module.` prefix (`student.module.backbone.…`). Without optimiser tensors the optimiser starts
//! fresh; without a centre the centre is zero; without metadata the step counter is 0.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{DinoError, Result};
use crate::io::{load_tensors, save_tensors};
use crate::network::DinoNetwork;
use crate::params::named_variables;
use crate::schedule::ScheduleValues;
use crate::step::DinoTrainer;

/// Metadata key of the JSON record.
pub const META_KEY: &str = "protodino";
/// Format tag of the JSON record.
pub const FORMAT: &str = "protodino-dino/1";

/// The JSON metadata record of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    /// Completed steps = index of the next iteration.
    pub step: i64,
    /// Epoch of the next iteration.
    pub epoch: i64,
    pub config: serde_json::Value,
    pub data_position: serde_json::Value,
    pub seed: u64,
    pub niter_per_epoch: i64,
    pub world_size: usize,
    /// Schedule values of the last completed step (None before the first).
    pub last_schedule: Option<ScheduleValues>,
    /// Schedule values the next step will use.
    pub next_schedule: ScheduleValues,
    /// Step at which `koleo.nn_index` was computed, when present.
    pub koleo_nn_step: Option<i64>,
}

/// What [`DinoTrainer::load_checkpoint`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedCheckpoint {
    pub meta: Option<CheckpointMeta>,
    pub had_optimizer_state: bool,
    pub had_center: bool,
}

/// `student.module.x` → `student.x` (same for `teacher.`); other names unchanged.
pub fn canonical_name(name: &str) -> String {
    for root in ["student.", "teacher."] {
        if let Some(rest) = name.strip_prefix(root) {
            let rest = rest.strip_prefix("module.").unwrap_or(rest);
            return format!("{root}{rest}");
        }
    }
    name.to_string()
}

/// Read the metadata record of a checkpoint file, if it has one.
pub fn read_meta(
    metadata: &BTreeMap<String, String>,
    path: &Path,
) -> Result<Option<CheckpointMeta>> {
    match metadata.get(META_KEY) {
        None => Ok(None),
        Some(s) => serde_json::from_str(s)
            .map(Some)
            .map_err(|e| DinoError::format(path, format!("metadata `{META_KEY}`: {e}"))),
    }
}

impl<N: DinoNetwork> DinoTrainer<N> {
    /// Every tensor of the state, with checkpoint names.
    pub fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = named_variables(&self.student_vs);
        out.extend(named_variables(&self.teacher_vs));
        out.push((
            "dino_loss.center".into(),
            self.dino_loss.center.shallow_clone(),
        ));
        out.extend(self.optimizer.state_tensors());
        if let Some((_, idx)) = &self.koleo.cache {
            out.push(("koleo.nn_index".into(), idx.shallow_clone()));
        }
        out
    }

    /// The metadata record of the current state.
    pub fn checkpoint_meta(&self) -> CheckpointMeta {
        let next = self.schedules.at(self.step);
        CheckpointMeta {
            format: FORMAT.into(),
            step: self.step,
            epoch: next.epoch,
            config: self.cfg.to_json(),
            data_position: self.data_position.clone(),
            seed: self.cfg.train.seed,
            niter_per_epoch: self.schedules.niter_per_epoch,
            world_size: self.world_size(),
            last_schedule: self.last_schedule,
            next_schedule: next,
            koleo_nn_step: self.koleo.cache.as_ref().map(|(s, _)| *s),
        }
    }

    /// Write the whole state to `path` (atomically).
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let meta = serde_json::to_string(&self.checkpoint_meta())
            .map_err(|e| DinoError::format(path, e.to_string()))?;
        let metadata = BTreeMap::from([(META_KEY.to_string(), meta)]);
        save_tensors(path, &self.checkpoint_tensors(), &metadata)
    }

    /// Restore the state from `path` (see the module doc for what may be missing).
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<LoadedCheckpoint> {
        let (raw, metadata) = load_tensors(path)?;
        let meta = read_meta(&metadata, path)?;
        let tensors: BTreeMap<String, Tensor> = raw
            .into_iter()
            .map(|(k, v)| (canonical_name(&k), v))
            .collect();
        self.load_state_tensors(&tensors, path)?;
        let had_center = tensors.contains_key("dino_loss.center");
        let had_optimizer_state = tensors.keys().any(|k| k.starts_with("optimizer."));
        match &meta {
            Some(m) => {
                self.step = m.step;
                self.data_position = m.data_position.clone();
                self.last_schedule = m.last_schedule;
                self.koleo.cache = match (m.koleo_nn_step, tensors.get("koleo.nn_index")) {
                    (Some(s), Some(idx)) => Some((s, idx.to_device(self.device))),
                    _ => None,
                };
            }
            None => {
                self.step = 0;
                self.data_position = serde_json::Value::Null;
                self.last_schedule = None;
                self.koleo.cache = None;
            }
        }
        Ok(LoadedCheckpoint {
            meta,
            had_optimizer_state,
            had_center,
        })
    }

    fn load_state_tensors(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        path: &Path,
    ) -> Result<()> {
        let mut vars = named_variables(&self.student_vs);
        vars.extend(named_variables(&self.teacher_vs));
        let expected: std::collections::HashSet<&str> =
            vars.iter().map(|(n, _)| n.as_str()).collect();
        let unexpected: Vec<&String> = tensors
            .keys()
            .filter(|k| k.starts_with("student.") || k.starts_with("teacher."))
            .filter(|k| !expected.contains(k.as_str()))
            .take(5)
            .collect();
        if !unexpected.is_empty() {
            return Err(DinoError::format(
                path,
                format!("tensors not in the model (architecture mismatch?): {unexpected:?}"),
            ));
        }
        let missing: Vec<&str> = vars
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !tensors.contains_key(*n))
            .take(5)
            .collect();
        if !missing.is_empty() {
            return Err(DinoError::format(
                path,
                format!("missing tensors: {missing:?}"),
            ));
        }
        for (name, var) in &vars {
            let src = &tensors[name];
            if src.size() != var.size() {
                return Err(DinoError::format(
                    path,
                    format!(
                        "{name}: shape {:?} in the file, {:?} in the model",
                        src.size(),
                        var.size()
                    ),
                ));
            }
        }
        let center = match tensors.get("dino_loss.center") {
            Some(c) => {
                if c.size() != self.dino_loss.center.size() {
                    return Err(DinoError::format(
                        path,
                        format!(
                            "dino_loss.center: shape {:?}, expected {:?}",
                            c.size(),
                            self.dino_loss.center.size()
                        ),
                    ));
                }
                c.to_device(self.device).to_kind(tch::Kind::Float)
            }
            None => self.dino_loss.center.zeros_like(),
        };
        let mut optimizer = crate::optim::Optimizer::new(&self.cfg.optim);
        optimizer.load_state_tensors(tensors, self.device)?;
        // All checks passed: now mutate.
        tch::no_grad(|| {
            for (name, var) in &vars {
                let mut v = var.shallow_clone();
                v.copy_(&tensors[name]);
            }
        });
        self.dino_loss.center = center;
        self.optimizer = optimizer;
        Ok(())
    }
}
