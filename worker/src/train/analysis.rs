//! Collapse figures of both heads: for the teacher (the paper's convention, and the headline)
//! and for the student, unique prototypes (greedy groups and connected components at every
//! `eval.unique_eps`), nearest-neighbour statistics with the KoLeo-proto value (measured at
//! every λ, 0 included) and the displacement from the step-0 prototypes,
//! `1 − mean_k cos(μ_k(t), μ_k(0))`; in the final report also the teacher's prototype usage over
//! a fixed probe set of training images (MLCD, used clusters, grouped MLCD) and the sharpness of
//! its targets (mean per-sample entropy against `ln K`).
//!
//! The periodic analysis runs on rank 0 while training goes on: [`Analyst`] takes a snapshot of
//! the prototypes (CPU copies, the only thing it needs) and analyses it on its own thread, so the
//! group's next step is never held up; its results come back at a later step, tagged with the
//! step they describe. Usage figures need teacher forwards over the probe images, which would
//! hold the replica, so they are left to the final report.
//!
//! The step-0 prototypes are rebuilt rather than stored: [`initial_prototypes`] constructs the
//! student network again under the trainer's seeding (`protodino_dino::step::seeded` with
//! `train.seed`, the very call `DinoTrainer::new` makes, on the training device), which
//! reproduces its initial weights bit for bit — also after a resume from a checkpoint — and the
//! teacher starts as a copy of them. Training draws nothing from libtorch's generator (drop path
//! is counter-based), so re-seeding it on the analysis thread changes no step.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use protodino_analysis::{
    Assignment, Displacement, Grouping, HeadAnalysis, HeadFigures, Sharpness, UniqueAnalysis,
    UniqueOptions, UniqueReport, UsageAccumulator, UsageReport, analyze_head,
};
use protodino_config::{HeadConfig, ModelConfig};
use protodino_data::Loader;
use protodino_models::{ForwardCtx, MultiCrop};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Kind, Tensor};

use super::features::for_each_eval_batch;
use super::model::Trainer;

/// Snapshots waiting for (or in) analysis beyond which a new one is skipped, so an analysis
/// slower than its cadence cannot pile up memory.
const MAX_PENDING: usize = 2;

/// `protos` (any device and dtype), L2-normalised, as a CPU f64 copy owned by the caller.
fn normalized_copy(protos: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let protos = protos.to_kind(Kind::Double).to_device(tch::Device::Cpu);
        &protos / protos.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
    })
}

/// What rebuilds a run's step-0 prototypes: the network's configuration, the seed and the
/// training device.
#[derive(Debug, Clone, PartialEq)]
pub struct InitialSpec {
    pub model: ModelConfig,
    pub head: HeadConfig,
    pub seed: u64,
    pub device: tch::Device,
}

impl InitialSpec {
    pub fn of(trainer: &Trainer) -> Self {
        InitialSpec {
            model: trainer.cfg.model.clone(),
            head: trainer.cfg.head.clone(),
            seed: trainer.cfg.train.seed,
            device: trainer.device,
        }
    }
}

/// The step-0 prototypes of the run `spec` describes (student and teacher alike), normalised,
/// as a CPU f64 copy: the student network built again exactly as `DinoTrainer::new` builds it.
pub fn initial_prototypes(spec: &InitialSpec) -> Tensor {
    protodino_dino::step::seeded(spec.seed as i64, || {
        let vs = tch::nn::VarStore::new(spec.device);
        let student = MultiCrop::new(&(vs.root() / "student"), &spec.model, &spec.head, true);
        normalized_copy(&tch::no_grad(|| student.head.prototypes()))
    })
}

/// The prototypes of both heads at one step, as normalised CPU f64 copies, and what rebuilds
/// their step-0 values.
#[derive(Debug)]
pub struct PrototypeSnapshot {
    pub teacher: Tensor,
    pub student: Tensor,
    pub initial: InitialSpec,
}

/// Both heads' prototypes, L2-normalised, as CPU f64 copies owned by the caller.
pub fn prototype_snapshot(trainer: &Trainer) -> PrototypeSnapshot {
    PrototypeSnapshot {
        teacher: normalized_copy(&tch::no_grad(|| trainer.teacher.head.prototypes())),
        student: normalized_copy(&tch::no_grad(|| trainer.student.head.prototypes())),
        initial: InitialSpec::of(trainer),
    }
}

fn unique_options(eps: &[f64]) -> UniqueOptions {
    UniqueOptions {
        eps: eps.to_vec(),
        ..UniqueOptions::default()
    }
}

/// The analyses of both heads of a snapshot, with displacement from `initial` (step 0).
pub fn analyze_heads(
    snapshot: &PrototypeSnapshot,
    initial: Option<&Tensor>,
    eps: &[f64],
) -> Result<(HeadAnalysis, HeadAnalysis)> {
    let opts = unique_options(eps);
    Ok((
        analyze_head("teacher", &snapshot.teacher, initial, &opts)?,
        analyze_head("student", &snapshot.student, initial, &opts)?,
    ))
}

/// One periodic analysis at `step`: the teacher's unique-prototype report (the headline, under
/// its historical key), the teacher's displacement from step 0 and the student's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollapseRecord {
    pub step: i64,
    /// The teacher's counts and NN statistics.
    pub report: UniqueReport,
    /// The teacher's displacement from its step-0 prototypes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub displacement: Option<Displacement>,
    /// The student's counts, NN statistics and displacement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student: Option<HeadFigures>,
}

impl CollapseRecord {
    /// The record of both heads' analyses.
    pub fn of_heads(step: i64, teacher: HeadFigures, student: HeadFigures) -> Self {
        CollapseRecord {
            step,
            report: teacher.report,
            displacement: teacher.displacement,
            student: Some(student),
        }
    }

    /// Greedy unique prototypes at the headline ε (`eval.unique_eps[0]`).
    pub fn unique_prototypes(&self) -> i64 {
        self.report.counts.first().map_or(-1, |c| c.greedy as i64)
    }

    /// The `metrics.jsonl` record (`kind = "collapse"`): `report` and `displacement` are the
    /// teacher's, `student` the student's figures, `ln_k` the entropy of a flat target (what
    /// the step records' `teacher_entropy` is compared with).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "kind": "collapse", "step": self.step, "head": "teacher", "report": &self.report,
            "displacement": &self.displacement, "student": &self.student,
            "ln_k": (self.report.k as f64).ln(),
        })
    }

    /// The human line of the record.
    pub fn summary(&self) -> String {
        let (greedy, eps) = self
            .report
            .counts
            .first()
            .map_or((0, f64::NAN), |c| (c.greedy, c.eps));
        let mut line = format!(
            "step {}: unique prototypes {greedy} / {} at eps {eps} (teacher), KoLeo-proto {:.4}",
            self.step, self.report.k, self.report.nn.koleo_proto
        );
        if let Some(d) = &self.displacement {
            line += &format!(", displacement {:.4}", d.mean);
        }
        if let Some(s) = &self.student {
            let g = s.report.counts.first().map_or(0, |c| c.greedy);
            line += &format!(
                "; student {g} unique, KoLeo-proto {:.4}",
                s.report.nn.koleo_proto
            );
            if let Some(d) = &s.displacement {
                line += &format!(", displacement {:.4}", d.mean);
            }
        }
        line
    }
}

/// Snapshots to analyse (step, prototypes) and the thread that analyses them.
type AnalysisThread = (Sender<(i64, PrototypeSnapshot)>, JoinHandle<()>);

/// The background analysis thread of rank 0 (started on the first snapshot).
pub struct Analyst {
    eps: Vec<f64>,
    worker: Option<AnalysisThread>,
    results: Option<Receiver<Result<CollapseRecord, String>>>,
    pending: usize,
}

impl Analyst {
    pub fn new(eps: Vec<f64>) -> Self {
        Self {
            eps,
            worker: None,
            results: None,
            pending: 0,
        }
    }

    /// Queues the analysis of `snapshot` (the prototypes at `step`); false when skipped because
    /// earlier ones are still pending. The thread rebuilds the step-0 prototypes once, at its
    /// first snapshot.
    pub fn submit(&mut self, step: i64, snapshot: PrototypeSnapshot) -> Result<bool> {
        if self.pending >= MAX_PENDING {
            return Ok(false);
        }
        if self.worker.is_none() {
            let (tx, rx) = channel::<(i64, PrototypeSnapshot)>();
            let (done_tx, done_rx) = channel();
            let eps = self.eps.clone();
            let handle = std::thread::Builder::new()
                .name("protodino-analysis".into())
                .spawn(move || {
                    let mut initial: Option<(InitialSpec, Tensor)> = None;
                    for (step, snap) in rx {
                        if initial
                            .as_ref()
                            .is_none_or(|(spec, _)| *spec != snap.initial)
                        {
                            let protos = initial_prototypes(&snap.initial);
                            initial = Some((snap.initial.clone(), protos));
                        }
                        let init = initial.as_ref().map(|(_, t)| t);
                        let rec = analyze_heads(&snap, init, &eps)
                            .map(|(t, s)| CollapseRecord::of_heads(step, t.figures, s.figures))
                            .map_err(|e| format!("collapse analysis of step {step}: {e:#}"));
                        if done_tx.send(rec).is_err() {
                            break;
                        }
                    }
                })
                .context("starting the analysis thread")?;
            self.worker = Some((tx, handle));
            self.results = Some(done_rx);
        }
        if let Some((tx, _)) = &self.worker {
            tx.send((step, snapshot))
                .map_err(|_| anyhow::anyhow!("the analysis thread is gone"))?;
            self.pending += 1;
        }
        Ok(true)
    }

    /// Analyses finished since the last call, oldest first.
    pub fn poll(&mut self) -> Result<Vec<CollapseRecord>> {
        let mut out = Vec::new();
        if let Some(rx) = &self.results {
            while let Ok(r) = rx.try_recv() {
                self.pending = self.pending.saturating_sub(1);
                out.push(r.map_err(anyhow::Error::msg)?);
            }
        }
        Ok(out)
    }

    /// Waits for every queued analysis and returns the ones not yet polled.
    pub fn finish(mut self) -> Result<Vec<CollapseRecord>> {
        let Some((tx, handle)) = self.worker.take() else {
            return Ok(Vec::new());
        };
        drop(tx);
        if handle.join().is_err() {
            anyhow::bail!("the analysis thread panicked");
        }
        self.poll()
    }
}

/// The fixed probe set of usage figures: `n` evenly spaced training images.
pub fn usage_ids(n_train: usize, n: usize) -> Vec<u64> {
    let n = n.min(n_train);
    (0..n as u64)
        .map(|i| i * n_train as u64 / n as u64)
        .collect()
}

/// Prototype usage of the teacher over `ids` (eval transform): `p(k|x)` is the training target
/// `softmax((z − c)/τ_t)` with the current centre and the final teacher temperature — plus the
/// vMF correction `log C_d(‖w_k‖/τ_t)` with `head.prototypes = "vmf"`, folded into the centre
/// as `c − τ_t·log C_d`; with Sinkhorn-Knopp centring (a batch-level target, no centre) it is
/// the sharpened softmax with the zero centre. Groups are the greedy unique-prototype groups
/// at the headline ε (`eval.unique_eps[0]`).
pub fn usage_figures(
    trainer: &Trainer,
    loader: &Loader,
    ids: &[u64],
    analysis: &UniqueAnalysis,
) -> Result<UsageReport> {
    let cfg = &trainer.cfg;
    let k = cfg.head.out_dim;
    // A view of the trainer's centre on the CPU: never modified in place.
    let center = trainer
        .dino_loss
        .center
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .reshape([k]);
    let center = if cfg.head.prototypes == protodino_config::PrototypeKind::Vmf {
        let protos = tch::no_grad(|| trainer.teacher.head.prototypes());
        let bias = protodino_dino::vmf::logit_correction(&protos, cfg.loss.teacher_temp)?;
        &center - bias.to_device(tch::Device::Cpu).reshape([k]) * cfg.loss.teacher_temp
    } else {
        center
    };
    let mut acc = UsageAccumulator::new(
        k,
        Assignment::TeacherCentered {
            center,
            teacher_temp: cfg.loss.teacher_temp,
        },
    )?;
    for_each_eval_batch(trainer, loader, ids, |x, _| {
        let logits = tch::no_grad(|| {
            let f = trainer.teacher.backbone.forward(x, &ForwardCtx::eval());
            trainer.teacher.head.forward(&f, false)
        });
        Ok(acc.update(&logits.to_device(tch::Device::Cpu).to_kind(Kind::Float))?)
    })?;
    anyhow::ensure!(
        acc.n_samples() > 0,
        "no readable image for the usage figures"
    );
    let eps = analysis.report.counts[0].eps;
    Ok(acc.finish(Some(Grouping {
        eps,
        groups: &analysis.greedy_groups[0],
    }))?)
}

/// The collapse figures of the final report: the teacher's unique counts, NN statistics and
/// displacement, the student's figures, and (when a probe set is given) the teacher's usage,
/// whose MLCD `π` and grouped MLCD `Π` are listed sorted from the largest mass down
/// (`usage.mlcd.mass_sorted`, `usage.grouped.mass_sorted`), and the sharpness of its targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalCollapse {
    /// Always `"teacher"`: the head of `report`, `displacement` and `usage`.
    pub head: String,
    pub report: UniqueReport,
    /// The [`UsageReport`] as JSON, with `mlcd.mass_sorted` and `grouped.mass_sorted` added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<serde_json::Value>,
    /// The teacher's displacement from its step-0 prototypes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub displacement: Option<Displacement>,
    /// The student's counts, NN statistics (KoLeo-proto) and displacement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student: Option<HeadFigures>,
    /// The teacher's mean per-sample target entropy over the probe set against `ln K`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharpness: Option<Sharpness>,
}

/// Analyses the final state (synchronously: the run is over).
pub fn final_collapse(
    trainer: &Trainer,
    probe: Option<(&Loader, &[u64])>,
) -> Result<FinalCollapse> {
    let snapshot = prototype_snapshot(trainer);
    let initial = initial_prototypes(&snapshot.initial);
    let (teacher, student) =
        analyze_heads(&snapshot, Some(&initial), &trainer.cfg.eval.unique_eps)?;
    let (usage, sharpness) = match probe {
        Some((loader, ids)) => {
            let usage = usage_figures(trainer, loader, ids, &teacher.unique)?;
            let mut v = serde_json::to_value(&usage)?;
            let mut pi = usage.soft.clone();
            pi.sort_by(|a, b| b.total_cmp(a));
            v["mlcd"]["mass_sorted"] = json!(pi);
            if let Some(g) = &usage.grouped {
                let mut m = g.mass.clone();
                m.sort_by(|a, b| b.total_cmp(a));
                v["grouped"]["mass_sorted"] = json!(m);
            }
            (Some(v), Some(Sharpness::of_usage(&usage)?))
        }
        None => (None, None),
    };
    Ok(FinalCollapse {
        head: "teacher".into(),
        report: teacher.figures.report,
        usage,
        displacement: teacher.figures.displacement,
        student: Some(student.figures),
        sharpness,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::build_trainer;
    use crate::train::testing::tiny_config;

    #[test]
    fn rebuilt_initial_prototypes_are_the_step0_ones() {
        let trainer = build_trainer(&tiny_config(), 4, 1).unwrap();
        let snap = prototype_snapshot(&trainer);
        let init = initial_prototypes(&snap.initial);
        assert!(init.equal(&snap.teacher), "teacher at step 0");
        assert!(init.equal(&snap.student), "student at step 0");
        // Another seed gives another head.
        let mut cfg = tiny_config();
        cfg.train.seed += 1;
        let other = build_trainer(&cfg, 4, 1).unwrap();
        assert!(!init.equal(&prototype_snapshot(&other).teacher));
    }

    #[test]
    fn step0_analysis_has_zero_displacement_for_both_heads() {
        let trainer = build_trainer(&tiny_config(), 4, 1).unwrap();
        let snap = prototype_snapshot(&trainer);
        let init = initial_prototypes(&snap.initial);
        let (t, s) = analyze_heads(&snap, Some(&init), &[0.025, 0.5]).unwrap();
        let rec = CollapseRecord::of_heads(0, t.figures, s.figures);
        // 1 − Σ μ_i² of a unit row in f64: zero up to rounding.
        assert!(rec.displacement.as_ref().unwrap().mean.abs() < 1e-12);
        let student = rec.student.as_ref().unwrap();
        assert!(student.displacement.as_ref().unwrap().mean.abs() < 1e-12);
        assert_eq!(rec.unique_prototypes(), 16);
        let v = rec.to_json();
        assert_eq!(v["kind"], "collapse");
        assert_eq!(v["report"]["counts"][1]["eps"], 0.5);
        assert_eq!(v["student"]["head"], "student");
        assert!(v["student"]["report"]["nn"]["koleo_proto"].is_f64());
        assert!((v["ln_k"].as_f64().unwrap() - 16f64.ln()).abs() < 1e-12);
        // Old readers' keys still parse, and old records (without the new keys) too.
        let back: CollapseRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, rec);
        let old = json!({"step": 3, "report": serde_json::to_value(&rec.report).unwrap()});
        let old: CollapseRecord = serde_json::from_value(old).unwrap();
        assert!(old.student.is_none() && old.displacement.is_none());
    }
}
