//! How sharp the teacher's targets are: the mean per-sample entropy `E_x[H(p(·|x))]` of its
//! training targets against `ln K`, the entropy of a flat target over K prototypes.
//!
//! DINO's teacher is sharpened by its temperature and flattened by centring. At random
//! initialisation the logits are small and the targets almost flat (entropy ≈ ln K); the
//! paper's shortcut (matching a uniform marginal by duplicating prototypes) only acts once the
//! targets are sharp, so a ratio `H / ln K` near 1 says a run never reached that regime.

use serde::{Deserialize, Serialize};

use crate::error::{AnalysisError, Result};
use crate::usage::UsageReport;

/// The teacher's mean per-sample entropy next to `ln K`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sharpness {
    /// `E_x[H(p(·|x))]` in nats.
    pub mean_sample_entropy: f64,
    /// `ln K`: the entropy of a flat target.
    pub ln_k: f64,
    /// `mean_sample_entropy / ln K`: 1 for flat targets, 0 for one-hot ones.
    pub relative: f64,
    /// `exp(mean_sample_entropy)`: the effective number of prototypes one target spreads over.
    pub effective_per_sample: f64,
}

impl Sharpness {
    /// From a mean per-sample entropy (nats) over `k ≥ 2` prototypes.
    pub fn new(mean_sample_entropy: f64, k: i64) -> Result<Self> {
        if k < 2 {
            return Err(AnalysisError::invalid("k", "needs at least 2 prototypes"));
        }
        if !(mean_sample_entropy.is_finite() && mean_sample_entropy >= -1e-9) {
            return Err(AnalysisError::invalid(
                "mean_sample_entropy",
                format!("{mean_sample_entropy} is not a finite entropy ≥ 0"),
            ));
        }
        let ln_k = (k as f64).ln();
        Ok(Sharpness {
            mean_sample_entropy,
            ln_k,
            relative: mean_sample_entropy / ln_k,
            effective_per_sample: mean_sample_entropy.exp(),
        })
    }

    /// The sharpness of a usage report's assignments (the teacher's targets when the report was
    /// made with [`crate::usage::Assignment::TeacherCentered`]).
    pub fn of_usage(usage: &UsageReport) -> Result<Self> {
        Self::new(usage.mean_sample_entropy, usage.k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{Assignment, UsageAccumulator};
    use tch::{Kind, Tensor};

    #[test]
    fn flat_targets_have_relative_entropy_one() {
        let s = Sharpness::new(64f64.ln(), 64).unwrap();
        assert!((s.relative - 1.0).abs() < 1e-12);
        assert!((s.effective_per_sample - 64.0).abs() < 1e-9);
    }

    #[test]
    fn one_hot_targets_have_relative_entropy_zero() {
        let mut acc = UsageAccumulator::new(8, Assignment::Probabilities).unwrap();
        let p = Tensor::eye(8, (Kind::Float, tch::Device::Cpu));
        acc.update(&p).unwrap();
        let s = Sharpness::of_usage(&acc.finish(None).unwrap()).unwrap();
        assert!(s.relative.abs() < 1e-9 && (s.effective_per_sample - 1.0).abs() < 1e-9);
    }

    #[test]
    fn two_way_targets_sit_in_between() {
        // Every target splits its mass evenly between 2 of 16 prototypes: H = ln 2.
        let s = Sharpness::new(2f64.ln(), 16).unwrap();
        assert!((s.relative - 0.25).abs() < 1e-12);
    }

    #[test]
    fn rejects_nonsense() {
        assert!(Sharpness::new(1.0, 1).is_err());
        assert!(Sharpness::new(f64::NAN, 4).is_err());
        assert!(Sharpness::new(-1.0, 4).is_err());
    }
}
