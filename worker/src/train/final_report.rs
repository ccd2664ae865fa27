//! The final report of a run: what rank 0 prints at the end of `protodino train` (and records in
//! `metrics.jsonl`) and what it sends the coordinator as the job's result (`ReportResult`):
//! the last step's losses, the collapse figures of the final state (both heads: unique counts,
//! NN statistics and KoLeo-proto, displacement from step 0; the teacher's usage and target
//! sharpness), the k-NN of its teacher, throughput and the final checkpoint.

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
        print!("{}", collapse_lines(&self.collapse));
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

/// The collapse part of the printed report: unique prototypes of both heads at every ε, NN
/// distances, KoLeo-proto and displacement, then the teacher's target sharpness and usage.
pub fn collapse_lines(c: &FinalCollapse) -> String {
    use std::fmt::Write;
    let r = &c.report;
    let mut s = String::new();
    let student = c.student.as_ref();
    let _ = writeln!(
        s,
        "unique prototypes (K = {}), greedy / connected components:",
        r.k
    );
    for (i, t) in r.counts.iter().enumerate() {
        let _ = write!(
            s,
            "  eps {:<6} teacher {:>6} / {:<6}",
            t.eps, t.greedy, t.connected_components
        );
        if let Some(sc) = student.and_then(|h| h.report.counts.get(i)) {
            let _ = write!(
                s,
                "  student {:>6} / {:<6}",
                sc.greedy, sc.connected_components
            );
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
    }
    let disp = |d: Option<&protodino_analysis::Displacement>| {
        d.map_or(String::new(), |d| {
            format!(", displacement from step 0 {:.4}", d.mean)
        })
    };
    let _ = writeln!(
        s,
        "teacher prototypes: NN distance mean {:.4}, min {:.4}, KoLeo-proto {:.4}{}",
        r.nn.mean,
        r.nn.min,
        r.nn.koleo_proto,
        disp(c.displacement.as_ref())
    );
    if let Some(h) = student {
        let n = &h.report.nn;
        let _ = writeln!(
            s,
            "student prototypes: NN distance mean {:.4}, min {:.4}, KoLeo-proto {:.4}{}",
            n.mean,
            n.min,
            n.koleo_proto,
            disp(h.displacement.as_ref())
        );
    }
    if let Some(sh) = &c.sharpness {
        let _ = writeln!(
            s,
            "teacher targets: mean entropy {:.3} nats vs ln K {:.3} (ratio {:.3})",
            sh.mean_sample_entropy, sh.ln_k, sh.relative
        );
    }
    if let Some(u) = &c.usage {
        let _ = writeln!(
            s,
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
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::analysis::{analyze_heads, initial_prototypes, prototype_snapshot};
    use crate::train::model::build_trainer;
    use crate::train::testing::tiny_config;

    #[test]
    fn collapse_lines_show_both_heads() {
        let trainer = build_trainer(&tiny_config(), 4, 1).unwrap();
        let snap = prototype_snapshot(&trainer);
        let init = initial_prototypes(&snap.initial);
        let (t, s) = analyze_heads(&snap, Some(&init), &[0.025, 0.1]).unwrap();
        let c = FinalCollapse {
            head: "teacher".into(),
            report: t.figures.report,
            usage: None,
            displacement: t.figures.displacement,
            student: Some(s.figures),
            sharpness: Some(protodino_analysis::Sharpness::new(1.0, 16).unwrap()),
        };
        let text = collapse_lines(&c);
        assert!(
            text.contains("eps 0.1    teacher     16 / 16      student     16 / 16\n"),
            "{text}"
        );
        assert!(text.contains("student prototypes: NN distance"), "{text}");
        assert!(
            text.contains("displacement from step 0 0.0000")
                || text.contains("displacement from step 0 -0.0000"),
            "{text}"
        );
        assert!(text.contains("vs ln K 2.773"), "{text}");
    }
}
