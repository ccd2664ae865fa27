//! The experiment: train only a DINO head on a frozen [`FeatureSet`] with the product's
//! [`DinoTrainer`], and analyse both heads as it goes.
//!
//! * [`MechanismOptions`] become a product [`TrainConfig`] ([`MechanismOptions::train_config`]):
//!   two global crops (the two views), no local crops, the head, temperatures, centring, λ,
//!   AdamW and the cosine schedules. An epoch is one pass over the N samples in the order of
//!   the product's `epoch_permutation(seed, epoch)`, `⌊N/B⌋` steps (drop last); the step count
//!   is rounded up to whole epochs so that every schedule ends where it should.
//! * Every `log_every` steps a [`StepRecord`]; at step 0, every `analysis_every` steps and at the
//!   end an [`AnalysisRecord`]: unique prototypes, NN statistics, KoLeo-proto and displacement
//!   from step 0 for the teacher and the student, and the teacher's usage over a probe set
//!   (view 0 of `probe` evenly spaced samples) with its training target
//!   `softmax((z − c)/τ_t)` — MLCD, used clusters, grouped MLCD at the first ε — and the
//!   sharpness of those targets against `ln K`.
//!
//! Everything runs on the CPU with libtorch's seeded generator, so one seed gives one record
//! (timings aside).

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use protodino_analysis::{
    Assignment, Grouping, HeadFigures, Sharpness, UniqueOptions, UsageAccumulator, UsageReport,
    analyze_head,
};
use protodino_config::{HeadConfig, TrainConfig};
use protodino_dino::{DinoNetwork, DinoTrainer, LocalReducer, StepMetrics};
use protodino_models::ForwardCtx;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::features::{FeatureInfo, FeatureSet};
use crate::network::{FeatureHead, pack_features};

/// The ε list of the unique-prototype counts (the first is the headline of grouped MLCD).
pub const DEFAULT_EPS: [f64; 6] = [0.025, 0.01, 0.05, 0.1, 0.25, 0.5];

/// Rows per teacher forward of the usage probe.
const PROBE_BATCH: i64 = 1024;

/// The knobs of one run (recorded in its JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MechanismOptions {
    /// K prototypes.
    pub k: i64,
    /// KoLeo-proto weight λ (0: not in the loss; still measured).
    pub lambda: f64,
    /// Steps (rounded up to whole epochs).
    pub steps: i64,
    pub batch: i64,
    /// Base learning rate per 256 samples (linearly scaled by the batch, as the product does).
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: i64,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    /// Per-parameter gradient clipping norm (0 = off).
    pub clip_grad: f64,
    /// Epochs at the start with the last layer frozen.
    pub freeze_last_layer: i64,
    /// Teacher EMA momentum at step 0 (cosine to 1).
    pub momentum: f64,
    pub teacher_temp: f64,
    pub warmup_teacher_temp: f64,
    pub warmup_teacher_temp_epochs: i64,
    pub student_temp: f64,
    pub center_momentum: f64,
    pub hidden_dim: i64,
    pub bottleneck_dim: i64,
    pub nlayers: i64,
    pub seed: u64,
    pub log_every: i64,
    pub analysis_every: i64,
    /// Samples of the usage probe (0 = all).
    pub probe: i64,
    pub eps: Vec<f64>,
}

impl Default for MechanismOptions {
    fn default() -> Self {
        MechanismOptions {
            k: 1024,
            lambda: 0.0,
            steps: 1000,
            batch: 256,
            lr: 1e-3,
            min_lr: 1e-6,
            warmup_epochs: 2,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            clip_grad: 3.0,
            freeze_last_layer: 0,
            momentum: 0.99,
            teacher_temp: 0.04,
            warmup_teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 0,
            student_temp: 0.1,
            center_momentum: 0.9,
            hidden_dim: 512,
            bottleneck_dim: 256,
            nlayers: 3,
            seed: 0,
            log_every: 10,
            analysis_every: 100,
            probe: 2048,
            eps: DEFAULT_EPS.to_vec(),
        }
    }
}

/// The product's default head configuration (what [`MechanismOptions`] start from).
pub fn default_head_config() -> HeadConfig {
    TrainConfig::defaults()
        .expect("the compiled-in defaults are valid")
        .head
}

impl MechanismOptions {
    /// Steps per epoch over `n` samples (drop last).
    pub fn steps_per_epoch(&self, n: i64) -> i64 {
        n / self.batch
    }

    /// The product configuration of a run on `n` samples; validated like any configuration.
    pub fn train_config(&self, n: i64) -> Result<TrainConfig> {
        ensure!(self.batch >= 1, "batch must be >= 1");
        let spe = self.steps_per_epoch(n);
        ensure!(
            spe >= 1,
            "{n} samples are fewer than one batch of {}",
            self.batch
        );
        ensure!(self.steps >= 1, "steps must be >= 1");
        let mut cfg = TrainConfig::defaults()?;
        cfg.head.out_dim = self.k;
        cfg.head.hidden_dim = self.hidden_dim;
        cfg.head.bottleneck_dim = self.bottleneck_dim;
        cfg.head.nlayers = self.nlayers;
        cfg.loss.student_temp = self.student_temp;
        cfg.loss.teacher_temp = self.teacher_temp;
        cfg.loss.warmup_teacher_temp = self.warmup_teacher_temp;
        cfg.loss.warmup_teacher_temp_epochs = self.warmup_teacher_temp_epochs;
        cfg.loss.center_momentum = self.center_momentum;
        cfg.koleo.weight = self.lambda;
        cfg.koleo.block_rows = cfg.koleo.block_rows.min(self.k);
        cfg.optim.lr = self.lr;
        cfg.optim.min_lr = self.min_lr;
        cfg.optim.warmup_epochs = self.warmup_epochs;
        cfg.optim.weight_decay = self.weight_decay;
        cfg.optim.weight_decay_end = self.weight_decay_end;
        cfg.optim.clip_grad = self.clip_grad;
        cfg.optim.freeze_last_layer = self.freeze_last_layer;
        cfg.optim.momentum_teacher = self.momentum;
        cfg.crops.local_crops_number = 0;
        cfg.train.batch_size_per_worker = self.batch;
        cfg.train.epochs = (self.steps + spe - 1) / spe;
        cfg.train.seed = self.seed;
        cfg.train.device = "cpu".into();
        cfg.eval.unique_eps = self.eps.clone();
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("mechanism options: {e}"))?;
        Ok(cfg)
    }
}

/// One logged training step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Completed steps after this one.
    pub step: i64,
    pub epoch: i64,
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub teacher_temp: f64,
    pub dino_loss: f64,
    /// Mean entropy of the batch's teacher targets (compare with `ln K`).
    pub teacher_entropy: f64,
    /// `L_KP` of the step (0 when λ = 0: the loss does not compute it).
    pub koleo_proto: f64,
    pub total: f64,
    pub grad_norm: f64,
}

impl StepRecord {
    fn of(m: &StepMetrics) -> Self {
        StepRecord {
            step: m.schedule.step + 1,
            epoch: m.schedule.epoch,
            lr: m.schedule.lr,
            weight_decay: m.schedule.weight_decay,
            momentum: m.schedule.momentum,
            teacher_temp: m.schedule.teacher_temp,
            dino_loss: m.dino_loss,
            teacher_entropy: m.teacher_entropy,
            koleo_proto: m.koleo_proto,
            total: m.total,
            grad_norm: m.grad_norm,
        }
    }
}

/// The figures of one analysis point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisRecord {
    /// Completed steps.
    pub step: i64,
    pub teacher: HeadFigures,
    pub student: HeadFigures,
    /// The teacher's usage over the probe set, grouped by its greedy groups at the first ε.
    pub usage: UsageReport,
    /// The grouped MLCD `Π`, largest group first.
    pub grouped_mass_sorted: Vec<f64>,
    /// The MLCD `π` over the K prototypes, largest first (the curve `Π` is compared against).
    #[serde(default)]
    pub mlcd_mass_sorted: Vec<f64>,
    /// Mean per-sample entropy of the teacher's targets against `ln K`.
    pub sharpness: Sharpness,
    /// The teacher temperature the usage targets were formed with.
    pub teacher_temp: f64,
}

/// The JSON record of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MechanismRecord {
    /// Always `"mechanism"`.
    pub kind: String,
    pub options: MechanismOptions,
    pub features: FeatureInfo,
    /// Steps actually run (`steps` rounded up to whole epochs).
    pub steps_run: i64,
    pub steps_per_epoch: i64,
    pub ln_k: f64,
    pub seconds: f64,
    pub steps: Vec<StepRecord>,
    pub analyses: Vec<AnalysisRecord>,
    /// The last analysis (the state after the last step).
    #[serde(rename = "final")]
    pub final_figures: AnalysisRecord,
}

type Trainer = DinoTrainer<FeatureHead>;

/// Normalised-or-not effective prototypes of a network as a CPU f64 copy.
fn prototypes_of(net: &FeatureHead) -> Tensor {
    tch::no_grad(|| {
        net.prototypes()
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Double)
    })
}

/// Probe sample ids: `probe` evenly spaced indices (all when 0 or ≥ N).
pub fn probe_ids(n: i64, probe: i64) -> Vec<i64> {
    let m = if probe <= 0 { n } else { probe.min(n) };
    (0..m).map(|i| i * n / m).collect()
}

struct Analyser<'a> {
    features: &'a FeatureSet,
    initial: Tensor,
    probe: Tensor,
    opts: UniqueOptions,
}

impl Analyser<'_> {
    fn analyse(&self, trainer: &Trainer) -> Result<AnalysisRecord> {
        let step = trainer.step;
        let teacher = analyze_head(
            "teacher",
            &prototypes_of(&trainer.teacher),
            Some(&self.initial),
            &self.opts,
        )?;
        let student = analyze_head(
            "student",
            &prototypes_of(&trainer.student),
            Some(&self.initial),
            &self.opts,
        )?;
        // The target of the step that would come next: its epoch's temperature.
        let teacher_temp = trainer
            .schedules
            .teacher_temp(trainer.schedules.epoch_of(step));
        let k = trainer.cfg.head.out_dim;
        let center = trainer.dino_loss.center.to_kind(Kind::Float).reshape([k]);
        let mut acc = UsageAccumulator::new(
            k,
            Assignment::TeacherCentered {
                center,
                teacher_temp,
            },
        )?;
        let n = self.probe.size()[0];
        let mut start = 0;
        while start < n {
            let len = PROBE_BATCH.min(n - start);
            let x = self.features.views[0].index_select(0, &self.probe.narrow(0, start, len));
            let logits = tch::no_grad(|| {
                trainer
                    .teacher
                    .forward(&[pack_features(&x)], &ForwardCtx::eval())
            });
            acc.update(&logits)?;
            start += len;
        }
        let eps = self.opts.eps[0];
        let usage = acc.finish(Some(Grouping {
            eps,
            groups: &teacher.unique.greedy_groups[0],
        }))?;
        let mut grouped_mass_sorted = usage
            .grouped
            .as_ref()
            .map(|g| g.mass.clone())
            .unwrap_or_default();
        grouped_mass_sorted.sort_by(|a, b| b.total_cmp(a));
        let mut mlcd_mass_sorted = usage.soft.clone();
        mlcd_mass_sorted.sort_by(|a, b| b.total_cmp(a));
        Ok(AnalysisRecord {
            step,
            teacher: teacher.figures,
            student: student.figures,
            sharpness: Sharpness::of_usage(&usage)?,
            usage,
            grouped_mass_sorted,
            mlcd_mass_sorted,
            teacher_temp,
        })
    }
}

/// Trains the head of `opts` on `features`; `progress` sees every analysis as it is made.
pub fn run(
    features: &FeatureSet,
    opts: &MechanismOptions,
    mut progress: impl FnMut(&AnalysisRecord),
) -> Result<MechanismRecord> {
    let started = Instant::now();
    let n = features.len();
    let cfg = opts.train_config(n)?;
    let spe = opts.steps_per_epoch(n);
    let total = cfg.train.epochs * spe;
    let (dim, head) = (features.dim(), cfg.head.clone());
    let mut trainer: Trainer = DinoTrainer::new(cfg.clone(), spe, 1, move |p, student| {
        FeatureHead::new(p, dim, &head, student)
    })
    .context("building the head and its teacher")?;
    let analyser = Analyser {
        features,
        initial: prototypes_of(&trainer.student),
        probe: Tensor::from_slice(&probe_ids(n, opts.probe)),
        opts: UniqueOptions {
            eps: opts.eps.clone(),
            ..UniqueOptions::default()
        },
    };
    let mut analyses = vec![analyser.analyse(&trainer)?];
    progress(&analyses[0]);
    let mut steps = Vec::new();
    let mut perm: Vec<i64> = Vec::new();
    while trainer.step < total {
        let step = trainer.step;
        let (epoch, slot) = (step / spe, step % spe);
        if slot == 0 {
            perm = protodino_data::epoch_permutation(cfg.train.seed, epoch as u64, n as u64)
                .into_iter()
                .map(|i| i as i64)
                .collect();
        }
        let b = opts.batch as usize;
        let ids = &perm[slot as usize * b..(slot as usize + 1) * b];
        let batch = crate::network::feature_batch(&features.views, ids);
        let m = trainer
            .train_step(&batch, &LocalReducer)
            .with_context(|| format!("step {step}"))?;
        let done = trainer.step;
        if done % opts.log_every.max(1) == 0 || done == total {
            steps.push(StepRecord::of(&m));
        }
        if done == total || (opts.analysis_every > 0 && done % opts.analysis_every == 0) {
            let a = analyser.analyse(&trainer)?;
            progress(&a);
            analyses.push(a);
        }
    }
    let final_figures = analyses.last().cloned().expect("step 0 is always analysed");
    Ok(MechanismRecord {
        kind: "mechanism".into(),
        options: opts.clone(),
        features: features.info.clone(),
        steps_run: total,
        steps_per_epoch: spe,
        ln_k: (opts.k as f64).ln(),
        seconds: started.elapsed().as_secs_f64(),
        steps,
        analyses,
        final_figures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_up_to_whole_epochs() {
        let o = MechanismOptions {
            steps: 10,
            batch: 32,
            ..MechanismOptions::default()
        };
        let cfg = o.train_config(100).unwrap();
        assert_eq!(o.steps_per_epoch(100), 3);
        assert_eq!(cfg.train.epochs, 4);
        assert_eq!(cfg.crops.local_crops_number, 0);
        assert_eq!(cfg.n_crops(), 2);
        assert!(o.train_config(16).is_err(), "fewer samples than a batch");
    }

    #[test]
    fn probe_ids_are_evenly_spaced() {
        assert_eq!(probe_ids(10, 5), vec![0, 2, 4, 6, 8]);
        assert_eq!(probe_ids(3, 0), vec![0, 1, 2]);
    }
}
