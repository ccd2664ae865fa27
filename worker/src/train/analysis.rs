//! Collapse figures of the teacher head: unique prototypes (greedy groups and connected
//! components at every `eval.unique_eps`), nearest-neighbour statistics, and — in the final
//! report only — prototype usage over a fixed probe set of training images.
//!
//! The periodic analysis runs on rank 0 while training goes on: [`Analyst`] takes a snapshot of
//! the prototypes (a CPU copy, the only thing it needs) and analyses it on its own thread, so the
//! group's next step is never held up; its results come back at a later step, tagged with the
//! step they describe. Usage figures need teacher forwards over the probe images, which would
//! hold the replica, so they are left to the final report.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use protodino_analysis::{
    Assignment, Grouping, UniqueAnalysis, UniqueOptions, UniqueReport, UsageAccumulator,
    UsageReport, analyze_unique,
};
use protodino_data::Loader;
use protodino_models::ForwardCtx;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Kind, Tensor};

use super::features::for_each_eval_batch;
use super::model::Trainer;

/// Snapshots waiting for (or in) analysis beyond which a new one is skipped, so an analysis
/// slower than its cadence cannot pile up memory.
const MAX_PENDING: usize = 2;

/// The teacher's prototypes, L2-normalised, as a CPU f64 copy owned by the caller.
pub fn prototype_snapshot(trainer: &Trainer) -> Tensor {
    tch::no_grad(|| {
        let protos = trainer
            .teacher
            .head
            .prototypes()
            .to_kind(Kind::Double)
            .to_device(tch::Device::Cpu);
        &protos / protos.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
    })
}

/// Unique prototypes of a normalised snapshot: counts, NN statistics and the greedy groups of
/// every ε.
pub fn analyze_snapshot(normalized: &Tensor, eps: &[f64]) -> Result<UniqueAnalysis> {
    Ok(analyze_unique(
        normalized,
        &UniqueOptions {
            eps: eps.to_vec(),
            ..UniqueOptions::default()
        },
    )?)
}

/// Unique prototypes of the teacher head (the paper's convention).
pub fn collapse_analysis(trainer: &Trainer, eps: &[f64]) -> Result<UniqueAnalysis> {
    analyze_snapshot(&prototype_snapshot(trainer), eps)
}

/// One periodic analysis: the unique-prototype report of the teacher at `step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollapseRecord {
    pub step: i64,
    pub report: UniqueReport,
}

impl CollapseRecord {
    /// Greedy unique prototypes at the headline ε (`eval.unique_eps[0]`).
    pub fn unique_prototypes(&self) -> i64 {
        self.report.counts.first().map_or(-1, |c| c.greedy as i64)
    }

    /// The `metrics.jsonl` record (`kind = "collapse"`).
    pub fn to_json(&self) -> serde_json::Value {
        json!({ "kind": "collapse", "step": self.step, "head": "teacher", "report": &self.report })
    }

    /// The human line of the record.
    pub fn summary(&self) -> String {
        let (greedy, eps) = self
            .report
            .counts
            .first()
            .map_or((0, f64::NAN), |c| (c.greedy, c.eps));
        format!(
            "step {}: unique prototypes {greedy} / {} at eps {eps} (teacher), KoLeo-proto {:.4}",
            self.step, self.report.k, self.report.nn.koleo_proto
        )
    }
}

/// Snapshots to analyse (step, prototypes) and the thread that analyses them.
type AnalysisThread = (Sender<(i64, Tensor)>, JoinHandle<()>);

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
    /// earlier ones are still pending.
    pub fn submit(&mut self, step: i64, snapshot: Tensor) -> Result<bool> {
        if self.pending >= MAX_PENDING {
            return Ok(false);
        }
        if self.worker.is_none() {
            let (tx, rx) = channel::<(i64, Tensor)>();
            let (done_tx, done_rx) = channel();
            let eps = self.eps.clone();
            let handle = std::thread::Builder::new()
                .name("protodino-analysis".into())
                .spawn(move || {
                    for (step, protos) in rx {
                        let rec = analyze_snapshot(&protos, &eps)
                            .map(|a| CollapseRecord {
                                step,
                                report: a.report,
                            })
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

/// The collapse figures of the final report: unique counts and NN statistics, and (when a probe
/// set is given) usage, whose grouped part carries the grouped MLCD `Π` sorted from the largest
/// group down (`usage.grouped.mass_sorted`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalCollapse {
    /// Always `"teacher"`.
    pub head: String,
    pub report: UniqueReport,
    /// The [`UsageReport`] as JSON, with `grouped.mass_sorted` added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<serde_json::Value>,
}

/// Analyses the final state (synchronously: the run is over).
pub fn final_collapse(
    trainer: &Trainer,
    probe: Option<(&Loader, &[u64])>,
) -> Result<FinalCollapse> {
    let analysis = collapse_analysis(trainer, &trainer.cfg.eval.unique_eps)?;
    let usage = match probe {
        Some((loader, ids)) => {
            let usage = usage_figures(trainer, loader, ids, &analysis)?;
            let mut v = serde_json::to_value(&usage)?;
            if let Some(g) = &usage.grouped {
                let mut m = g.mass.clone();
                m.sort_by(|a, b| b.total_cmp(a));
                v["grouped"]["mass_sorted"] = json!(m);
            }
            Some(v)
        }
        None => None,
    };
    Ok(FinalCollapse {
        head: "teacher".into(),
        report: analysis.report,
        usage,
    })
}
