//! The training step: [`DinoTrainer`] owns student and teacher, the optimiser state, the DINO
//! centre, KoLeo-proto and the schedules, and runs one iteration in the official order
//! (docs/algorithm.md §1.8):
//!
//! 1. schedule values of iteration `it` (lr both groups, wd group 0, momentum, τ_t(epoch));
//! 2. teacher forward on the 2 global crops (no grad), student forward on all crops — inside a
//!    bf16 autocast region on CUDA when `train.precision = "bf16"`; DINO loss and KoLeo-proto
//!    in fp32 outside it; `total = L_DINO + λ·L_KP`;
//! 3. abort on a non-finite total: nothing has been modified yet, and (with a failure directory)
//!    a checkpoint of the state and the batch file are written for `replay`;
//! 4. zero grads, backward;
//! 5. gradient all-reduce (mean) through the [`Reducer`];
//! 6. per-parameter clipping;
//! 7. optimiser step, skipping `last_layer` parameters entirely while `epoch < freeze_last_layer`;
//! 8. EMA of every teacher parameter (including a frozen `weight_g`), buffers excluded;
//! 9. centre update from the raw teacher logits through the reducer (see `loss` for why it is
//!    done last; the loss of this step used the previous centre either way) — with
//!    `loss.centering = "ema"`; Sinkhorn-Knopp centring (`variants`) keeps no centre, its
//!    all-reduces happen in step 2.
//!
//! The wall time of each phase of the last step (forward, backward, all-reduce, optimiser, EMA)
//! and the bytes its all-reduces carried are kept in [`DinoTrainer::last_timings`] for the
//! worker's metrics; measuring them adds no synchronisation and changes no number.
//!
//! With `loss.objective = "ibot"` (docs/algorithm.md §5) step 2 runs iBOT's forwards — the
//! teacher on the unmasked global crops, the student on the masked global crops and the local
//! crops, both returning CLS and patch logits — and the loss is `λ₁·L_cls + λ₂·L_patch`
//! ([`crate::ibot`]), KoLeo-proto acting on each trained prototype layer; step 9 also updates
//! the patch centre `center2`. The batch's masks come from [`Batch::masks`] or, when absent,
//! from [`crate::masking::ibot_masks`] — a function of (seed, epoch, sample id, crop), so both
//! give the same masks.
//!
//! Determinism: drop-path randomness comes from `(seed, step, sample id)` in the models crate and
//! everything else here is deterministic, so `N` steps equal `k` steps + checkpoint + resume +
//! `N − k` steps bit for bit (tested).

use std::path::PathBuf;
use std::time::Instant;

use protodino_config::{Precision, TrainConfig};
use protodino_models::ForwardCtx;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use crate::ema::{copy_student_to_teacher, ema_update, pair_parameters};
use crate::error::{DinoError, NonFiniteLoss, Result};
use crate::grads::{clip_gradients, total_norm};
use crate::koleo::KoleoProto;
use crate::loss::DinoLoss;
use crate::network::{DinoNetwork, parse_device, use_bf16_autocast};
use crate::optim::Optimizer;
use crate::params::{is_last_layer, named_parameters, named_variables, trainable_parameters};
use crate::reducer::Reducer;
use crate::schedule::{ScheduleValues, Schedules};

/// The crops of one step on this worker.
#[derive(Debug)]
pub struct Batch {
    /// 2 tensors `[B, 3, G, G]` (global-1, global-2), normalised fp32.
    pub global_crops: Vec<Tensor>,
    /// L tensors `[B, 3, l, l]`.
    pub local_crops: Vec<Tensor>,
    /// Dataset index of each of the B images (drives drop-path randomness).
    pub sample_ids: Vec<i64>,
    /// iBOT: the student's masks of the 2 global crops, bool `[B, h, w]` each (None for DINO;
    /// for iBOT None means "derive them from the sample ids", [`crate::masking::ibot_masks`]).
    pub masks: Option<Vec<Tensor>>,
}

impl Batch {
    /// Images per crop, B.
    pub fn batch_size(&self) -> i64 {
        self.global_crops.first().map_or(0, |t| t.size()[0])
    }

    /// All crops in the official order, moved to `device`.
    pub fn crops(&self, device: Device) -> Vec<Tensor> {
        self.global_crops
            .iter()
            .chain(self.local_crops.iter())
            .map(|t| t.to_device(device))
            .collect()
    }

    /// The batch with iBOT's masks of its sample ids in `epoch` under `cfg` (unchanged for
    /// DINO). The trainer derives the same masks itself when they are missing.
    pub fn with_ibot_masks(mut self, cfg: &TrainConfig, epoch: i64) -> Self {
        if cfg.is_ibot() {
            self.masks = Some(crate::masking::ibot_masks(cfg, epoch, &self.sample_ids));
        }
        self
    }

    fn check(&self, n_local: i64) -> Result<()> {
        let b = self.batch_size();
        if self.global_crops.len() != 2 || self.local_crops.len() as i64 != n_local {
            return Err(DinoError::Shape(format!(
                "batch has {} global and {} local crops, expected 2 and {n_local}",
                self.global_crops.len(),
                self.local_crops.len()
            )));
        }
        if b == 0 || self.sample_ids.len() as i64 != b {
            return Err(DinoError::Shape(format!(
                "batch of {b} images has {} sample ids",
                self.sample_ids.len()
            )));
        }
        for t in self.global_crops.iter().chain(&self.local_crops) {
            if t.dim() != 4 || t.size()[0] != b || t.size()[1] != 3 {
                return Err(DinoError::Shape(format!(
                    "crop of shape {:?}, expected [{b}, 3, H, W]",
                    t.size()
                )));
            }
        }
        if let Some(m) = &self.masks {
            let ok = m.len() == 2 && m.iter().all(|t| t.dim() == 3 && t.size()[0] == b);
            if !ok {
                return Err(DinoError::Shape(format!(
                    "batch masks {:?}: two [{b}, h, w] tensors expected",
                    m.iter().map(Tensor::size).collect::<Vec<_>>()
                )));
            }
        }
        Ok(())
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    #[serde(flatten)]
    pub schedule: ScheduleValues,
    /// This member's share of the step's samples, `n_r / N` (1 alone): the weight of its
    /// losses in the group's mean.
    pub sample_share: f64,
    pub dino_loss: f64,
    /// Mean entropy of the teacher targets; `dino_loss − teacher_entropy` is the mean
    /// KL(teacher ‖ student), the part of the loss the student can lower (the entropy rises
    /// as the centre flattens the targets, so the raw loss need not fall early in training).
    pub teacher_entropy: f64,
    /// `L_KP` (0 when λ = 0: not computed).
    pub koleo_proto: f64,
    /// `L_DINO + λ·L_KP`.
    pub total: f64,
    /// Global gradient norm before clipping (after the all-reduce).
    pub grad_norm: f64,
    /// Global gradient norm after clipping.
    pub grad_norm_clipped: f64,
    /// Largest per-parameter gradient norm before clipping.
    pub grad_norm_max: f64,
    /// Whether the last layer was skipped (`epoch < freeze_last_layer`).
    pub last_layer_frozen: bool,
    /// Mean / min nearest-neighbour distance of the normalised student prototypes (KoLeo's d_k;
    /// NaN-free 0 when λ = 0).
    pub prototype_nn_mean: f64,
    pub prototype_nn_min: f64,
    /// iBOT: `λ₁·L_cls`, the CLS part of `dino_loss` (DINO: `dino_loss` itself).
    #[serde(default)]
    pub cls_loss: f64,
    /// iBOT: `λ₂·L_patch`, the masked-patch part of `dino_loss` (DINO: 0).
    #[serde(default)]
    pub patch_loss: f64,
    /// iBOT: the share of the global crops' patches this member masked (DINO: 0).
    #[serde(default)]
    pub masked_fraction: f64,
    /// iBOT: the patch teacher temperature `τ_t2(epoch)` (DINO: 0).
    #[serde(default)]
    pub teacher_patch_temp: f64,
}

/// Wall time of the phases of one step on this worker, in seconds, and the payload of its
/// all-reduces. Each phase is timed with `Instant` around its calls and nothing more: on the CPU
/// a phase's work is done when its calls return; on CUDA the host runs ahead of the device up to
/// the next point where it waits anyway (the losses' scalars after the forward, every NCCL
/// bucket, the gradient norms), so device time still queued is counted in a later phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimings {
    /// Student and teacher forwards and the losses.
    pub forward: f64,
    /// Zeroing the gradients and backward.
    pub backward: f64,
    /// The step's reductions: the sample counts, then the gradients with the centre
    /// statistics.
    pub all_reduce: f64,
    /// Gradient clipping and the optimiser step.
    pub optimizer: f64,
    /// The teacher's EMA and the centre update.
    pub ema: f64,
    /// Bytes of the buffers the step all-reduced (0 in a world of one, where nothing moves),
    /// including Sinkhorn-Knopp's sums, which run (and are timed) in the forward.
    pub all_reduce_bytes: u64,
}

/// Forward results of a step before anything is updated.
#[derive(Debug)]
pub struct StepLosses {
    pub schedule: ScheduleValues,
    pub dino_loss: Tensor,
    /// Mean entropy of the teacher targets (see [`crate::loss::DinoLossOutput`]).
    pub target_entropy: Tensor,
    pub koleo: Option<crate::koleo::KoleoOutput>,
    /// KoLeo-proto on iBOT's separate patch prototype layer `last_layer2`.
    pub koleo_patch: Option<crate::koleo::KoleoOutput>,
    pub total: Tensor,
    pub teacher_output: Tensor,
    /// iBOT: the teacher's raw patch logits `[2B, P, K₂]` (for `center2`).
    pub teacher_patch_output: Option<Tensor>,
    /// iBOT: `λ₁·L_cls` and `λ₂·L_patch` (detached scalars).
    pub ibot_parts: Option<(Tensor, Tensor)>,
    /// iBOT: the share of masked patches of the global crops.
    pub masked_fraction: f64,
    /// iBOT: `τ_t2` of the step (0 for DINO).
    pub teacher_patch_temp: f64,
    /// Bytes all-reduced while forming the teacher targets (Sinkhorn-Knopp in a group).
    pub all_reduce_bytes: u64,
}

/// Student, teacher and everything a DINO + KoLeo-proto step changes.
pub struct DinoTrainer<N: DinoNetwork> {
    pub cfg: TrainConfig,
    pub device: Device,
    pub student_vs: VarStore,
    pub teacher_vs: VarStore,
    pub student: N,
    pub teacher: N,
    pub optimizer: Optimizer,
    pub dino_loss: DinoLoss,
    pub koleo: KoleoProto,
    /// KoLeo-proto of iBOT's separate `last_layer2` (its own neighbour cache; unused else).
    pub koleo_patch: KoleoProto,
    /// iBOT's patch loss and centre `center2` (`loss.objective = "ibot"`).
    pub ibot: Option<crate::ibot::IbotLoss>,
    pub schedules: Schedules,
    /// Index of the next iteration (= number of completed steps).
    pub step: i64,
    /// Where the data pipeline stands; opaque here, stored in checkpoints.
    pub data_position: serde_json::Value,
    /// Schedule values of the last completed step.
    pub last_schedule: Option<ScheduleValues>,
    /// Phase times and all-reduce bytes of the last completed step (not checkpointed).
    pub last_timings: StepTimings,
    pub(crate) world_size: usize,
    failure_dir: Option<PathBuf>,
    ema_pairs: Vec<(Tensor, Tensor)>,
    trainable: Vec<(String, Tensor)>,
}

impl<N: DinoNetwork> std::fmt::Debug for DinoTrainer<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DinoTrainer")
            .field("device", &self.device)
            .field("step", &self.step)
            .field("trainable", &self.trainable.len())
            .finish_non_exhaustive()
    }
}

/// Runs `f` with libtorch's global generator seeded with `seed`, holding a process-wide lock:
/// two trainers built at once in one process (two sessions of an agent, tests in parallel)
/// would otherwise interleave their draws and get weights that depend on timing.
pub fn seeded<R>(seed: i64, f: impl FnOnce() -> R) -> R {
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(seed);
    f()
}

impl<N: DinoNetwork> DinoTrainer<N> {
    /// Build student (`root/"student"`, `build(path, true)`) and teacher (`root/"teacher"`,
    /// `build(path, false)`) in their own VarStores on `cfg.train.device`, seeding libtorch's
    /// generator with `cfg.train.seed` first so the initial weights are reproducible. The teacher
    /// starts as a copy of every student variable and never requires gradients.
    pub fn new(
        cfg: TrainConfig,
        niter_per_epoch: i64,
        world_size: usize,
        build: impl Fn(&nn::Path, bool) -> N,
    ) -> Result<Self> {
        let device = parse_device(&cfg.train.device)?;
        if world_size == 0 {
            return Err(DinoError::Config("world size must be >= 1".into()));
        }
        let (student_vs, student, mut teacher_vs, teacher) = seeded(cfg.train.seed as i64, || {
            let student_vs = VarStore::new(device);
            let student = build(&(student_vs.root() / "student"), true);
            let teacher_vs = VarStore::new(device);
            let teacher = build(&(teacher_vs.root() / "teacher"), false);
            (student_vs, student, teacher_vs, teacher)
        });
        teacher_vs.freeze();
        // Initial copy covers buffers too (`load_state_dict(student.state_dict())`).
        let init_pairs =
            pair_parameters(&named_variables(&student_vs), &named_variables(&teacher_vs))?;
        copy_student_to_teacher(&init_pairs);
        if cfg.is_ibot() && !cfg.ibot.shared_head && cfg.ibot.shared_head_teacher {
            // iBOT's teacher with a shared head loads the student's `last_layer2` into its one
            // prototype layer last (`load_state_dict(strict=False)` visits `last_layer2` after
            // `last_layer`, the same module); the EMA then follows the student's `last_layer`.
            crate::ema::copy_renamed(
                &named_variables(&student_vs),
                &named_variables(&teacher_vs),
                "head.last_layer2.",
                "head.last_layer.",
            );
        }
        let ema_pairs = pair_parameters(
            &named_parameters(&student_vs),
            &named_parameters(&teacher_vs),
        )?;
        let trainable = trainable_parameters(&student_vs);
        let schedules = Schedules::new(&cfg, niter_per_epoch, world_size)?;
        let dino_loss = DinoLoss::new(
            cfg.head.out_dim,
            cfg.n_crops(),
            cfg.loss.student_temp,
            cfg.loss.center_momentum,
            device,
        );
        let ibot = cfg.is_ibot().then(|| {
            crate::ibot::IbotLoss::new(&cfg, crate::ibot::IbotLoss::patch_dim(&cfg), device)
        });
        Ok(DinoTrainer {
            optimizer: Optimizer::new(&cfg.optim),
            koleo: KoleoProto::new(&cfg.koleo),
            koleo_patch: KoleoProto::new(&cfg.koleo),
            ibot,
            cfg,
            device,
            student_vs,
            teacher_vs,
            student,
            teacher,
            dino_loss,
            schedules,
            step: 0,
            data_position: serde_json::Value::Null,
            last_schedule: None,
            last_timings: StepTimings::default(),
            world_size,
            failure_dir: None,
            ema_pairs,
            trainable,
        })
    }

    /// Where to write the checkpoint and batch of a step whose loss is not finite.
    pub fn set_failure_dir(&mut self, dir: impl Into<PathBuf>) {
        self.failure_dir = Some(dir.into());
    }

    /// World size the schedules were built for.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Trainable student parameters (name, tensor), sorted by name.
    pub fn trainable(&self) -> &[(String, Tensor)] {
        &self.trainable
    }

    fn bf16(&self) -> bool {
        self.cfg.train.precision == Precision::Bf16 && self.device.is_cuda()
    }

    /// Forward of student and teacher and the losses of `batch` with the given schedule values;
    /// changes nothing. Alone: Sinkhorn-Knopp centring sees only this batch.
    pub fn losses(&mut self, batch: &Batch, sv: ScheduleValues) -> Result<StepLosses> {
        self.losses_with(batch, sv, &crate::reducer::LocalReducer)
    }

    /// [`Self::losses`] with the group's `reducer` (Sinkhorn-Knopp sums over the group).
    pub fn losses_with(
        &mut self,
        batch: &Batch,
        sv: ScheduleValues,
        reducer: &dyn Reducer,
    ) -> Result<StepLosses> {
        batch.check(self.cfg.crops.local_crops_number)?;
        if self.ibot.is_some() {
            return self.ibot_losses(batch, sv, reducer);
        }
        let crops = batch.crops(self.device);
        let bf16 = self.bf16();
        if bf16 {
            use_bf16_autocast();
        }
        let ctx = ForwardCtx {
            train: true,
            seed: self.cfg.train.seed,
            step: sv.step,
            sample_ids: &batch.sample_ids,
            crop: 0,
        };
        let (teacher_output, student_output) = tch::autocast(bf16, || {
            let t = tch::no_grad(|| self.teacher.forward(&crops[..2], &ctx));
            let s = self.student.forward(&crops, &ctx);
            (t.detach(), s)
        });
        let dino = tch::autocast(false, || {
            crate::variants::variant_loss(
                &self.dino_loss,
                &self.cfg,
                &self.student,
                &self.teacher,
                &student_output,
                &teacher_output,
                sv.teacher_temp,
                reducer,
            )
        })?;
        let target_bytes = dino.all_reduce_bytes;
        let dino = dino.output;
        let lambda = self.cfg.koleo.weight;
        let koleo = if lambda != 0.0 {
            let protos = self.student.prototypes();
            Some(self.koleo.compute(&protos, sv.step)?)
        } else {
            None
        };
        let total = match &koleo {
            Some(k) => &dino.loss + &k.loss * lambda,
            None => dino.loss.shallow_clone(),
        };
        Ok(StepLosses {
            schedule: sv,
            dino_loss: dino.loss,
            target_entropy: dino.target_entropy,
            koleo,
            koleo_patch: None,
            total,
            teacher_output,
            teacher_patch_output: None,
            ibot_parts: None,
            masked_fraction: 0.0,
            teacher_patch_temp: 0.0,
            all_reduce_bytes: target_bytes,
        })
    }

    /// iBOT's forwards and losses (docs/algorithm.md §5): the teacher on the unmasked global
    /// crops, the student on the masked global crops and the locals; `λ₁·L_cls + λ₂·L_patch`
    /// plus λ·L_KP on `last_layer` and on a separate `last_layer2`.
    fn ibot_losses(
        &mut self,
        batch: &Batch,
        sv: ScheduleValues,
        reducer: &dyn Reducer,
    ) -> Result<StepLosses> {
        let crops = batch.crops(self.device);
        let masks = match &batch.masks {
            Some(m) => m.iter().map(|t| t.to_device(self.device)).collect(),
            None => crate::masking::ibot_masks(&self.cfg, sv.epoch, &batch.sample_ids)
                .into_iter()
                .map(|t| t.to_device(self.device))
                .collect::<Vec<_>>(),
        };
        let (gh, gw) = (crops[0].size()[2], crops[0].size()[3]);
        let p = self.cfg.model.patch_size;
        for m in &masks {
            if m.size()[1..] != [gh / p, gw / p] {
                return Err(DinoError::Shape(format!(
                    "masks of shape {:?} for global crops of {gh}×{gw} px, patch {p}",
                    m.size()
                )));
            }
        }
        let bf16 = self.bf16();
        if bf16 {
            use_bf16_autocast();
        }
        let ctx = ForwardCtx {
            train: true,
            seed: self.cfg.train.seed,
            step: sv.step,
            sample_ids: &batch.sample_ids,
            crop: 0,
        };
        let missing = || DinoError::Config("loss.objective = \"ibot\" needs a ViT network".into());
        let (teacher_out, student_out) = tch::autocast(bf16, || {
            let t = tch::no_grad(|| self.teacher.forward_ibot(&crops[..2], 2, None, &ctx));
            let s = self.student.forward_ibot(&crops, 2, Some(&masks), &ctx);
            (t, s)
        });
        let (teacher_out, student_out) = (
            teacher_out.ok_or_else(missing)?,
            student_out.ok_or_else(missing)?,
        );
        let (t_cls, t_patch) = (teacher_out.cls.detach(), teacher_out.patch.detach());
        let ibot = self.ibot.as_ref().expect("iBOT state");
        let temp2 = ibot.patch_temp(sv.epoch);
        let vmf = self.cfg.head.prototypes == protodino_config::PrototypeKind::Vmf;
        let (cls, patch) = tch::autocast(false, || -> Result<_> {
            let cls = crate::variants::variant_loss(
                &self.dino_loss,
                &self.cfg,
                &self.student,
                &self.teacher,
                &student_out.cls,
                &t_cls,
                sv.teacher_temp,
                reducer,
            )?;
            let (t_bias, s_bias) = if vmf {
                let tp = tch::no_grad(|| self.teacher.patch_prototypes().detach());
                (
                    Some(crate::vmf::logit_correction(&tp, temp2)?),
                    Some(crate::vmf::logit_correction(
                        &self.student.patch_prototypes(),
                        ibot.student_temp,
                    )?),
                )
            } else {
                (None, None)
            };
            let targets = ibot.patch_targets(&t_patch, temp2, t_bias.as_ref())?;
            let stacked = crate::ibot::stacked_masks(&masks, self.device);
            let patch = ibot.patch_loss(&student_out.patch, &targets, &stacked, s_bias.as_ref())?;
            Ok((cls, patch))
        })?;
        let masked_fraction = tch::no_grad(|| {
            crate::ibot::stacked_masks(&masks, self.device)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[])
        });
        let (l1, l2) = (ibot.lambda1, ibot.lambda2);
        let cls_part = &cls.output.loss * l1;
        let patch_part = &patch.loss * l2;
        let loss = &cls_part + &patch_part;
        let entropy = &cls.output.target_entropy * l1 + &patch.target_entropy * l2;
        let lambda = self.cfg.koleo.weight;
        let (koleo, koleo_patch) = if lambda != 0.0 {
            let k = self.koleo.compute(&self.student.prototypes(), sv.step)?;
            let kp = match self.student.separate_patch_prototypes() {
                Some(protos) => Some(self.koleo_patch.compute(&protos, sv.step)?),
                None => None,
            };
            (Some(k), kp)
        } else {
            (None, None)
        };
        let total = koleo
            .iter()
            .chain(koleo_patch.iter())
            .fold(loss.shallow_clone(), |t, k| t + &k.loss * lambda);
        Ok(StepLosses {
            schedule: sv,
            dino_loss: loss,
            target_entropy: entropy.detach(),
            koleo,
            koleo_patch,
            total,
            teacher_output: t_cls,
            teacher_patch_output: Some(t_patch),
            ibot_parts: Some((cls_part.detach(), patch_part.detach())),
            masked_fraction,
            teacher_patch_temp: temp2,
            all_reduce_bytes: cls.all_reduce_bytes,
        })
    }

    /// Run iteration `self.step` on this worker's `batch`.
    pub fn train_step(&mut self, batch: &Batch, reducer: &dyn Reducer) -> Result<StepMetrics> {
        let sv = self.schedules.at(self.step);
        self.apply_step(batch, sv, reducer)
    }

    /// One full step with explicit schedule values (used by `train_step` and `replay`).
    pub fn apply_step(
        &mut self,
        batch: &Batch,
        sv: ScheduleValues,
        reducer: &dyn Reducer,
    ) -> Result<StepMetrics> {
        let started = Instant::now();
        let losses = self.losses_with(batch, sv, reducer)?;
        let dino_loss = losses.dino_loss.double_value(&[]);
        let teacher_entropy = losses.target_entropy.double_value(&[]);
        // Both prototype layers' values (the patch layer's only when separate, iBOT).
        let koleo_proto = losses
            .koleo
            .iter()
            .chain(losses.koleo_patch.iter())
            .map(|k| k.loss.double_value(&[]))
            .sum::<f64>();
        let total = losses.total.double_value(&[]);
        let (cls_loss, patch_loss) = match &losses.ibot_parts {
            Some((c, p)) => (c.double_value(&[]), p.double_value(&[])),
            None => (dino_loss, 0.0),
        };
        if !total.is_finite() {
            return Err(self.non_finite(batch, sv, dino_loss, koleo_proto, total));
        }
        let mut timings = StepTimings {
            forward: started.elapsed().as_secs_f64(),
            ..StepTimings::default()
        };
        let t = Instant::now();
        for (_, p) in &self.trainable {
            let mut p = p.shallow_clone();
            p.zero_grad();
        }
        timings.backward = t.elapsed().as_secs_f64();
        // This member's weight n_r / N in the global batch: its loss (a mean over its own n_r
        // samples) is scaled by it, so the summed gradients are those of the mean over all N
        // samples whatever the shares (uneven, or fewer after skipped records). λ·L_KP is the
        // same on every replica; its weights sum to one, so it counts once.
        let t = Instant::now();
        let share = self.sample_share(batch, reducer)?;
        timings.all_reduce = t.elapsed().as_secs_f64();
        let t = Instant::now();
        if share == 1.0 {
            losses.total.backward();
        } else {
            (&losses.total * share).backward();
        }
        timings.backward += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut grads: Vec<Tensor> = self
            .trainable
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect();
        // The centre's row sums and count ride in the gradients' all-reduce: every collective of
        // the step happens before anything is updated, so a failed one leaves the replica at
        // the previous step, whole.
        let ema_center = crate::variants::uses_ema_center(&self.cfg);
        if ema_center {
            grads.extend(DinoLoss::center_stats(&losses.teacher_output)?);
        }
        // iBOT's patch centre: its row sums after the CLS centre's (same row count).
        let patch_center = losses.teacher_patch_output.is_some() && self.ibot.is_some();
        if let Some(tp) = losses
            .teacher_patch_output
            .as_ref()
            .filter(|_| patch_center)
        {
            grads.push(crate::ibot::IbotLoss::center2_stats(tp));
        }
        if reducer.world_size() > 1 {
            // The sample count (one f32), then the gradients and the centre statistics.
            timings.all_reduce_bytes = 4 + grads
                .iter()
                .map(|g| (g.numel() * g.kind().elt_size_in_bytes()) as u64)
                .sum::<u64>();
        }
        reducer.all_reduce_sum(&mut grads)?;
        timings.all_reduce_bytes += losses.all_reduce_bytes;
        let patch_centre_sum = if patch_center { grads.pop() } else { None };
        let centre = if ema_center {
            match (grads.pop(), grads.pop()) {
                (Some(c), Some(s)) => Some((c, s)),
                _ => {
                    return Err(DinoError::Shape(
                        "the centre statistics went missing".into(),
                    ));
                }
            }
        } else {
            None
        };
        timings.all_reduce += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let norms = clip_gradients(&self.trainable, self.cfg.optim.clip_grad);
        let grad_norm = total_norm(&norms);
        let grad_norm_max = if norms.numel() > 0 {
            norms.max().double_value(&[])
        } else {
            0.0
        };
        let grad_norm_clipped = total_norm(&crate::grads::grad_norms(&self.trainable));
        let frozen = sv.epoch < self.cfg.optim.freeze_last_layer;
        self.optimizer
            .step(&self.trainable, sv.lr, sv.weight_decay, |n| {
                frozen && is_last_layer(n)
            })?;
        timings.optimizer = t.elapsed().as_secs_f64();
        let t = Instant::now();
        ema_update(&self.ema_pairs, sv.momentum);
        if let Some((centre_count, centre_sum)) = centre {
            if let (Some(sum2), Some(ibot)) = (&patch_centre_sum, self.ibot.as_mut()) {
                ibot.apply_center2(sum2, &centre_count);
            }
            self.dino_loss.apply_center(&centre_sum, &centre_count);
        }
        timings.ema = t.elapsed().as_secs_f64();
        let (nn_mean, nn_min) = match &losses.koleo {
            Some(k) => (
                k.distances.mean(Kind::Float).double_value(&[]),
                k.distances.min().double_value(&[]),
            ),
            None => (0.0, 0.0),
        };
        self.step = sv.step + 1;
        self.last_schedule = Some(sv);
        self.last_timings = timings;
        Ok(StepMetrics {
            schedule: sv,
            sample_share: share,
            dino_loss,
            teacher_entropy,
            koleo_proto,
            total,
            grad_norm,
            grad_norm_clipped,
            grad_norm_max,
            last_layer_frozen: frozen,
            prototype_nn_mean: nn_mean,
            prototype_nn_min: nn_min,
            cls_loss,
            patch_loss,
            masked_fraction: losses.masked_fraction,
            teacher_patch_temp: losses.teacher_patch_temp,
        })
    }

    /// `n_r / N`: this member's samples over the group's (one summed scalar; 1 alone).
    fn sample_share(&self, batch: &Batch, reducer: &dyn Reducer) -> Result<f64> {
        if reducer.world_size() <= 1 {
            return Ok(1.0);
        }
        let local = batch.batch_size() as f64;
        let mut count = [Tensor::from_slice(&[local as f32]).to_device(self.device)];
        reducer.all_reduce_sum(&mut count)?;
        let [count] = count;
        let total = count.double_value(&[0]);
        if total < 1.0 {
            return Err(DinoError::Shape(format!(
                "the group's batch is empty ({total} samples over {} members)",
                reducer.world_size()
            )));
        }
        Ok(local / total)
    }

    fn non_finite(
        &self,
        batch: &Batch,
        sv: ScheduleValues,
        dino_loss: f64,
        koleo_proto: f64,
        total: f64,
    ) -> DinoError {
        let mut report = NonFiniteLoss {
            step: sv.step,
            epoch: sv.epoch,
            dino_loss,
            koleo_proto,
            total,
            checkpoint: None,
            batch: None,
        };
        if let Some(dir) = &self.failure_dir {
            let ckpt = dir.join(format!("nonfinite-step{}.ckpt.safetensors", sv.step));
            let bfile = dir.join(format!("nonfinite-step{}.batch.safetensors", sv.step));
            let written = std::fs::create_dir_all(dir)
                .map_err(|e| DinoError::Io {
                    path: dir.clone(),
                    source: e,
                })
                .and_then(|()| self.save_checkpoint(&ckpt))
                .and_then(|()| crate::replay::write_batch(&bfile, batch, Some(&sv)));
            match written {
                Ok(()) => {
                    report.checkpoint = Some(ckpt);
                    report.batch = Some(bfile);
                }
                Err(e) => tracing::error!(error = %e, "could not write the replay files"),
            }
        }
        DinoError::NonFiniteLoss(Box::new(report))
    }
}
