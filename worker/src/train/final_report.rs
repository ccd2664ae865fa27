//! The final report of a run: what rank 0 prints at the end of `protodino train` (and records in
//! `metrics.jsonl`) and what it sends the coordinator as the job's result (`ReportResult`):
//! the last step's losses, the collapse figures of the final state with usage, the k-NN of its
//! teacher, throughput and the final checkpoint.

use std::path::Path;

use anyhow::Result;
use protodino_analysis::KnnReport;
use protodino_data::Loader;
use protodino_dino::StepMetrics;
use serde::{Deserialize, Serialize};

use super::analysis::{FinalCollapse, final_collapse};
use super::features::knn_eval;
use super::model::Trainer;
use super::step_loop::LoopStats;

/// The final report (`kind = "final"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalReport {
    /// Always `"final"` (the record kind in `metrics.jsonl`).
    pub kind: String,
    /// Completed steps of the job.
    pub step: i64,
    /// Steps this run (or session) did itself.
    pub steps_run: i64,
    /// Wall time of the run, final analysis and evaluation included.
    pub seconds: f64,
    /// The training loop's own time (data, steps, periodic work): what throughput is over.
    pub train_seconds: f64,
    pub images_seen: usize,
    pub images_per_second: f64,
    pub last_step: Option<StepMetrics>,
    pub collapse: FinalCollapse,
    /// None without a labelled evaluation set.
    pub knn: Option<KnnReport>,
    pub skipped_records: usize,
    /// The final checkpoint (a path for `train`; relative to the checkpoint root for the agent).
    pub checkpoint: String,
}

/// What the final stage evaluates with.
pub struct FinalInputs<'a> {
    /// The usage probe set: the training loader and its ids (None: no usage figures).
    pub probe: Option<(&'a Loader, &'a [u64])>,
    pub data_root: &'a Path,
    /// k-NN on at most this many (train, test) images (0 = all).
    pub knn_limits: (usize, usize),
}

impl FinalReport {
    /// Analyses and evaluates the final state of `trainer` (rank 0, after the last step and the
    /// final checkpoint `checkpoint`); `seconds` is the run's wall time so far.
    pub fn evaluate(
        trainer: &Trainer,
        inputs: &FinalInputs<'_>,
        stats: &LoopStats,
        checkpoint: String,
        started: std::time::Instant,
    ) -> Result<Self> {
        let cfg = &trainer.cfg;
        let collapse = final_collapse(trainer, inputs.probe)?;
        let knn = match protodino_data::open_eval(&cfg.data, inputs.data_root)? {
            Some((tr, te)) => Some(knn_eval(trainer, cfg, &tr, &te, inputs.knn_limits)?),
            None => None,
        };
        Ok(Self {
            kind: "final".into(),
            step: trainer.step,
            steps_run: trainer.step - stats.start_step,
            seconds: started.elapsed().as_secs_f64(),
            train_seconds: stats.train_seconds,
            images_seen: stats.images_seen,
            images_per_second: stats.images_seen as f64 / stats.train_seconds.max(1e-9),
            last_step: stats.last.clone(),
            collapse,
            knn,
            skipped_records: stats.skipped_total,
            checkpoint,
        })
    }

    /// Headline of the unique-prototype counts: greedy groups at the first ε.
    pub fn unique_prototypes(&self) -> i64 {
        self.collapse
            .report
            .counts
            .first()
            .map_or(-1, |c| c.greedy as i64)
    }

    /// The human-readable report on stdout.
    pub fn print(&self) {
        println!("\n== protodino: final report (step {}) ==", self.step);
        if let Some(m) = &self.last_step {
            println!(
                "DINO loss {:.4}   KoLeo-proto {:.4}   total {:.4}",
                m.dino_loss, m.koleo_proto, m.total
            );
        }
        let r = &self.collapse.report;
        println!("unique prototypes (teacher head, K = {}):", r.k);
        for c in &r.counts {
            println!(
                "  eps {:<6} greedy {:>6}  connected components {:>6}",
                c.eps, c.greedy, c.connected_components
            );
        }
        if let Some(u) = &self.collapse.usage {
            println!(
                "prototype usage over {} training images: {} clusters used, MLCD entropy {:.3} (effective {:.1}), grouped at eps {}: {} of {} groups used",
                u["n_samples"],
                u["used_clusters"],
                u["mlcd"]["entropy"].as_f64().unwrap_or(f64::NAN),
                u["mlcd"]["effective_number"].as_f64().unwrap_or(f64::NAN),
                u["grouped"]["eps"],
                u["grouped"]["used_groups"],
                u["grouped"]["groups"]
            );
        }
        println!(
            "prototype NN distance: mean {:.4}, min {:.4}",
            r.nn.mean, r.nn.min
        );
        match &self.knn {
            Some(k) => {
                for res in &k.results {
                    println!(
                        "k-NN (k = {}, T = {}): top-1 {:.2}%  top-5 {:.2}%  ({} train / {} test images)",
                        res.k, k.temperature, res.top1, res.top5, k.n_train, k.n_test
                    );
                }
            }
            None => println!("k-NN: no labelled evaluation set configured"),
        }
        println!(
            "{:.1} images/s; skipped records: {}; checkpoint {}",
            self.images_per_second, self.skipped_records, self.checkpoint
        );
    }
}
