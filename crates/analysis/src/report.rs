//! What the command-line interface prints: one JSON-serialisable record per command and a
//! plain-text rendering of each (`Display`), plus the options derived from a [`TrainConfig`].
//!
//! The CLI calls [`prototype_reports`] for `prototypes CHECKPOINT` — one [`PrototypeReport`] per
//! prototype layer of the chosen head (`last_layer`, and iBOT's `last_layer2` when the file has
//! it) — and prints either one `serde_json` line per report (`--json`) or `report.to_string()`.

use std::fmt;
use std::path::Path;

use protodino_config::TrainConfig;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::Result;
use crate::fewshot::FewShotReport;
use crate::knn::{KnnOptions, KnnReport};
use crate::linear::LinearProbeReport;
use crate::prototypes::{
    Head, Layer, LayerSelection, NormStats, PrototypeSource, Prototypes, read_named_tensors,
};
use crate::unique::{UniqueOptions, UniqueReport, analyze_unique};
use crate::usage::UsageReport;

/// `prototypes CHECKPOINT`, for one prototype layer: where the prototypes came from and their
/// unique-prototype analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrototypeReport {
    pub source: PrototypeSource,
    /// The norms `‖w_k‖` of the effective rows (not 1 for a vMF head).
    pub norms: NormStats,
    pub unique: UniqueReport,
}

/// Read `head`'s `last_layer` (the DINO / [CLS] prototypes) from a safetensors file (a full
/// checkpoint or a bare head) and analyse it.
pub fn prototype_report(path: &Path, head: Head, opts: &UniqueOptions) -> Result<PrototypeReport> {
    report_for(Prototypes::load(path, head)?, opts)
}

/// The same for named tensors already in memory (e.g. a trainer's variables under their
/// checkpoint names, at the end of training).
pub fn prototype_report_from_named(
    named: &[(String, Tensor)],
    head: Head,
    opts: &UniqueOptions,
) -> Result<PrototypeReport> {
    report_for(Prototypes::from_named(named, head)?, opts)
}

/// Read the selected prototype layers of `head` from a safetensors file and analyse each: one
/// report per layer, `last_layer` first.
pub fn prototype_reports(
    path: &Path,
    head: Head,
    layers: LayerSelection,
    opts: &UniqueOptions,
) -> Result<Vec<PrototypeReport>> {
    prototype_reports_from_named(&read_named_tensors(path)?, head, layers, opts)
}

/// [`prototype_reports`] for named tensors already in memory.
pub fn prototype_reports_from_named(
    named: &[(String, Tensor)],
    head: Head,
    layers: LayerSelection,
    opts: &UniqueOptions,
) -> Result<Vec<PrototypeReport>> {
    Prototypes::all_from_named(named, head, layers)?
        .into_iter()
        .map(|p| report_for(p, opts))
        .collect()
}

fn report_for(p: Prototypes, opts: &UniqueOptions) -> Result<PrototypeReport> {
    let unique = analyze_unique(&p.normalized, opts)?.report;
    Ok(PrototypeReport {
        norms: NormStats::of(&p.norms)?,
        source: p.source,
        unique,
    })
}

impl UniqueOptions {
    /// `eval.unique_eps` (the first is the headline ε) and `koleo.block_rows`.
    pub fn from_config(cfg: &TrainConfig) -> Self {
        UniqueOptions {
            eps: cfg.eval.unique_eps.clone(),
            block_rows: cfg.koleo.block_rows,
        }
    }
}

impl KnnOptions {
    /// `eval.knn_k` first (the headline), then DINO's other printed k (10, 20, 100, 200) that
    /// differ from it; `eval.knn_temperature`.
    pub fn from_config(cfg: &TrainConfig) -> Self {
        let mut ks = vec![cfg.eval.knn_k];
        ks.extend([10, 20, 100, 200].iter().filter(|&&k| k != cfg.eval.knn_k));
        KnnOptions {
            ks,
            temperature: cfg.eval.knn_temperature,
            ..Default::default()
        }
    }

    /// Drop the k larger than the training set (small data sets), keeping at least one.
    pub fn clamped_to(mut self, n_train: i64) -> Self {
        let smallest = self
            .ks
            .iter()
            .copied()
            .min()
            .unwrap_or(1)
            .min(n_train)
            .max(1);
        self.ks.retain(|&k| k <= n_train);
        if self.ks.is_empty() {
            self.ks.push(smallest);
        }
        self
    }
}

impl fmt::Display for PrototypeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.source;
        writeln!(
            f,
            "prototypes: {} head, {} ({}), `{}`{}, K = {}, d = {}",
            s.head,
            s.layer,
            s.layer.role(),
            s.weight_v,
            s.weight_g
                .as_deref()
                .map_or(" (no weight_g)".to_string(), |g| format!(" × `{g}`")),
            s.k,
            s.dim
        )?;
        if let Some(first) = &s.same_as {
            writeln!(
                f,
                "the same tensors as `{first}` (a shared head: one set of prototypes under two \
                 names)"
            )?;
        }
        writeln!(f, "{}", self.norms)?;
        write!(f, "{}", self.unique)
    }
}

impl PrototypeReport {
    /// Which layer this report is about.
    pub fn layer(&self) -> Layer {
        self.source.layer
    }
}

impl fmt::Display for UniqueReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:>8}  {:>10} {:>8}  {:>10} {:>8}",
            "eps", "greedy", "%", "components", "%"
        )?;
        for c in &self.counts {
            writeln!(
                f,
                "{:>8}  {:>10} {:>7.2}%  {:>10} {:>7.2}%",
                c.eps,
                c.greedy,
                100.0 * c.greedy_fraction,
                c.connected_components,
                100.0 * c.cc_fraction
            )?;
        }
        let nn = &self.nn;
        write!(
            f,
            "nearest-neighbour distance: mean {:.4}, min {:.4}",
            nn.mean, nn.min
        )?;
        for q in &nn.quantiles {
            write!(f, ", p{:02} {:.4}", (q.q * 100.0).round(), q.value)?;
        }
        writeln!(f, ", max {:.4}", nn.max)?;
        writeln!(
            f,
            "KoLeo-proto: {:.4}   ({:.2} s, {} candidate pairs, {} exact refinements)",
            nn.koleo_proto, self.seconds, self.candidate_pairs, self.exact_refinements
        )
    }
}

impl fmt::Display for UsageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "usage over {} samples, K = {}, p(k|x) = {}",
            self.n_samples, self.k, self.assignment
        )?;
        let row =
            |f: &mut fmt::Formatter<'_>, name: &str, d: &crate::usage::DistributionSummary| {
                writeln!(
                    f,
                    "  {name:<18} H = {:.4} nats, exp(H) = {:.1}, max mass {:.4}, support {}",
                    d.entropy, d.effective_number, d.max_mass, d.support
                )
            };
        row(f, "MLCD", &self.mlcd)?;
        row(f, "hard MLCD", &self.hard_mlcd)?;
        writeln!(
            f,
            "  used clusters {}, mean per-sample entropy {:.4} nats",
            self.used_clusters, self.mean_sample_entropy
        )?;
        if let Some(g) = &self.grouped {
            writeln!(f, "  grouped at eps = {} ({} groups):", g.eps, g.groups)?;
            row(f, "grouped MLCD", &g.mlcd)?;
            row(f, "grouped hard MLCD", &g.hard_mlcd)?;
            writeln!(f, "  used groups {}", g.used_groups)?;
        }
        Ok(())
    }
}

impl fmt::Display for KnnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "weighted k-NN (T = {}), {} train / {} test, {} classes",
            self.temperature, self.n_train, self.n_test, self.num_classes
        )?;
        for r in &self.results {
            writeln!(
                f,
                "  k = {:>4}: top-1 {:.2}%, top-5 {:.2}%",
                r.k, r.top1, r.top5
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for LinearProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "linear probe ({} epochs, lr {}), {} train / {} val, d = {}, {} classes",
            self.epochs.len(),
            self.epochs.first().map_or(f64::NAN, |e| e.lr),
            self.n_train,
            self.n_val,
            self.dim,
            self.num_classes
        )?;
        writeln!(
            f,
            "  best top-1 {:.2}% (epoch {}), final top-1 {:.2}%",
            self.best_top1, self.best_epoch, self.final_top1
        )
    }
}

impl fmt::Display for FewShotReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "few-shot logistic regression (lambd = {}), {} classes, {} test",
            self.lambd, self.num_classes, self.n_test
        )?;
        for r in &self.results {
            writeln!(
                f,
                "  {} per class: top-1 {:.2} ± {:.2}% over {} seeds",
                r.shots,
                r.top1.mean,
                r.top1.std,
                r.runs.len()
            )?;
        }
        Ok(())
    }
}
