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
//! * `koleo.nn_index` when KoLeo-proto caches neighbour indices (refresh interval > 1), and
//!   `koleo.nn_index_patch` for iBOT's separate `last_layer2`;
//! * iBOT (`loss.objective = "ibot"`): `ibot_loss.center2` ([1, 1, K₂], the patch centre) and
//!   the networks' iBOT variables under their official names — `student.backbone.masked_embed`
//!   ([1, D], the student's mask token; the teacher has none) and
//!   `{student,teacher}.head.last_layer2.weight_g` / `weight_v` where that network's head is
//!   not shared. The CLS centre stays `dino_loss.center`.
//!
//! The metadata key `protodino` holds a JSON [`CheckpointMeta`]: step, epoch, the whole
//! configuration, the data position, the seed, iterations per epoch, world size and the schedule
//! values of the last and of the next step.
//!
//! Loading accepts any file whose `student.*` / `teacher.*` tensors cover both networks — in
//! particular an official DINO checkpoint converted to safetensors, with or without the DDP
//! `module.` prefix (`student.module.backbone.…`). Without optimiser tensors the optimiser starts
//! fresh; without a centre the centre is zero; without metadata the step counter is 0.
//!
//! An official iBOT checkpoint loads too. Its `ibot_loss` state is `ibot_loss.center` ([1, K])
//! and `ibot_loss.center2` ([1, 1, K₂]); the official-checkpoint converter renames the first
//! to `dino_loss.center` and keeps the second (a file that still says `ibot_loss.center` is
//! read as the CLS centre when `dino_loss.center` is absent). A shared head's `state_dict`
//! lists the one prototype layer twice, as `head.last_layer.*` and `head.last_layer2.*`: for a
//! network whose head is shared the `last_layer2` copies are accepted when they equal
//! `last_layer` and are otherwise an error.

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
        if let Some(ibot) = &self.ibot {
            out.push(("ibot_loss.center2".into(), ibot.center2.shallow_clone()));
        }
        out.extend(self.optimizer.state_tensors());
        if let Some((_, idx)) = &self.koleo.cache {
            out.push(("koleo.nn_index".into(), idx.shallow_clone()));
        }
        if let Some((_, idx)) = &self.koleo_patch.cache {
            out.push(("koleo.nn_index_patch".into(), idx.shallow_clone()));
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
        let mut tensors: BTreeMap<String, Tensor> = raw
            .into_iter()
            .map(|(k, v)| (canonical_name(&k), v))
            .collect();
        if !tensors.contains_key("dino_loss.center")
            && let Some(c) = tensors.remove("ibot_loss.center")
        {
            tensors.insert("dino_loss.center".into(), c);
        }
        self.drop_shared_head_copies(&mut tensors, path)?;
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
                // The patch layer's cache is computed at the same steps as the CLS layer's.
                self.koleo_patch.cache =
                    match (m.koleo_nn_step, tensors.get("koleo.nn_index_patch")) {
                        (Some(s), Some(idx)) => Some((s, idx.to_device(self.device))),
                        _ => None,
                    };
            }
            None => {
                self.step = 0;
                self.data_position = serde_json::Value::Null;
                self.last_schedule = None;
                self.koleo.cache = None;
                self.koleo_patch.cache = None;
            }
        }
        Ok(LoadedCheckpoint {
            meta,
            had_optimizer_state,
            had_center,
        })
    }

    /// Remove `<root>.head.last_layer2.*` of a network without its own `last_layer2` (a
    /// shared iBOT head, whose official `state_dict` repeats `last_layer`) after checking that
    /// they equal the `last_layer` tensors.
    fn drop_shared_head_copies(
        &self,
        tensors: &mut BTreeMap<String, Tensor>,
        path: &Path,
    ) -> Result<()> {
        let mut vars = named_variables(&self.student_vs);
        vars.extend(named_variables(&self.teacher_vs));
        let names: std::collections::HashSet<String> = vars.into_iter().map(|(n, _)| n).collect();
        let copies: Vec<String> = tensors
            .keys()
            .filter(|k| k.contains(".head.last_layer2.") && !names.contains(k.as_str()))
            .cloned()
            .collect();
        for name in copies {
            let original = name.replacen(".head.last_layer2.", ".head.last_layer.", 1);
            let same = match (tensors.get(&name), tensors.get(&original)) {
                (Some(a), Some(b)) => a.size() == b.size() && a.equal(b),
                _ => false,
            };
            if !same {
                return Err(DinoError::format(
                    path,
                    format!(
                        "{name}: this network's head is shared (no last_layer2), but the file's \
                         last_layer2 differs from {original}"
                    ),
                ));
            }
            tensors.remove(&name);
        }
        Ok(())
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
        let center2 = match (&self.ibot, tensors.get("ibot_loss.center2")) {
            (Some(ibot), Some(c)) => {
                let want = ibot.center2.size();
                // The official buffer is [1, 1, K₂]; a [1, K₂] one is accepted as well.
                if c.numel() as i64 != want[2] || c.size().last() != want.last() {
                    return Err(DinoError::format(
                        path,
                        format!("ibot_loss.center2: shape {:?}, expected {want:?}", c.size()),
                    ));
                }
                Some(
                    c.reshape(want.as_slice())
                        .to_device(self.device)
                        .to_kind(tch::Kind::Float),
                )
            }
            (Some(ibot), None) => Some(ibot.center2.zeros_like()),
            (None, _) => None,
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
        if let (Some(ibot), Some(c2)) = (self.ibot.as_mut(), center2) {
            ibot.center2 = c2;
        }
        self.optimizer = optimizer;
        Ok(())
    }
}
