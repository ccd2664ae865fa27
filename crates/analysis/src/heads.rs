//! The collapse figures of one head (student or teacher) in one call: unique-prototype counts
//! over ε (greedy and connected components), nearest-neighbour statistics with the KoLeo-proto
//! value (measured whatever λ the run used), and the displacement from the head's initial
//! prototypes when those are known. The training loop and the mechanism experiment both report
//! these for each head.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::displacement::{Displacement, displacement};
use crate::error::Result;
use crate::unique::{UniqueAnalysis, UniqueOptions, UniqueReport, analyze_unique};

/// The serialisable figures of one head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadFigures {
    /// `"teacher"` or `"student"`.
    pub head: String,
    /// Unique counts at every ε and the NN statistics (`nn.koleo_proto` is `L_KP`).
    pub report: UniqueReport,
    /// `1 − cos(μ_k(t), μ_k(0))` statistics; None when the initial prototypes are unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub displacement: Option<Displacement>,
}

impl HeadFigures {
    /// Greedy unique prototypes at `eps` (None when `eps` was not analysed).
    pub fn greedy_at(&self, eps: f64) -> Option<usize> {
        self.report
            .counts
            .iter()
            .find(|c| (c.eps - eps).abs() < 1e-12)
            .map(|c| c.greedy)
    }

    /// Connected components at `eps` (None when `eps` was not analysed).
    pub fn components_at(&self, eps: f64) -> Option<usize> {
        self.report
            .counts
            .iter()
            .find(|c| (c.eps - eps).abs() < 1e-12)
            .map(|c| c.connected_components)
    }
}

/// The figures of a head and the full unique analysis behind them (group assignments for
/// grouped MLCD).
#[derive(Debug, Clone)]
pub struct HeadAnalysis {
    pub figures: HeadFigures,
    pub unique: UniqueAnalysis,
}

/// Analyses the prototypes `[K, d]` of head `head`; `initial` (same shape) are its step-0
/// prototypes.
pub fn analyze_head(
    head: &str,
    prototypes: &Tensor,
    initial: Option<&Tensor>,
    opts: &UniqueOptions,
) -> Result<HeadAnalysis> {
    let unique = analyze_unique(prototypes, opts)?;
    let displacement = initial
        .map(|init| displacement(prototypes, init))
        .transpose()?;
    Ok(HeadAnalysis {
        figures: HeadFigures {
            head: head.to_string(),
            report: unique.report.clone(),
            displacement,
        },
        unique,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn duplicated_rows_count_once_and_moved_rows_show_displacement() {
        tch::manual_seed(11);
        let init = Tensor::randn([32, 16], (Kind::Float, tch::Device::Cpu));
        // Rows 1..4 become copies of row 0: 4 fewer unique prototypes, and they moved.
        let now = init.copy();
        for i in 1..5 {
            now.get(i).copy_(&init.get(0));
        }
        let opts = UniqueOptions {
            eps: vec![0.025, 0.1],
            ..UniqueOptions::default()
        };
        let a = analyze_head("student", &now, Some(&init), &opts).unwrap();
        assert_eq!(a.figures.greedy_at(0.025), Some(28));
        assert_eq!(a.figures.components_at(0.1), Some(28));
        assert_eq!(a.figures.greedy_at(0.5), None);
        let d = a.figures.displacement.unwrap();
        assert!(d.mean > 0.0 && d.min == 0.0, "{d:?}");
        // Without initial prototypes there is no displacement.
        let b = analyze_head("teacher", &now, None, &opts).unwrap();
        assert!(b.figures.displacement.is_none());
        // Five rows at distance 0 give −log(1e-8) ≈ 18.4 each: L_KP ≈ 5·18.4/32 − 0.2 ≈ 2.7.
        let kp = b.figures.report.nn.koleo_proto;
        assert!(kp > 2.0 && kp < 3.5, "duplicates drive L_KP up: {kp}");
    }
}
