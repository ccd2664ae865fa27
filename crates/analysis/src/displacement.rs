//! How far each prototype has travelled from its initialisation: the cosine distance
//! `δ_k = 1 − cos(μ_k(t), μ_k(0))` of every row with its own step-0 row, on L2-normalised
//! prototypes. The headline figure is the mean, `1 − mean_k cos(μ_k(t), μ_k(0))`: 0 for a head
//! that has not moved, 1 for rows that have all turned orthogonal to where they started, 2 for
//! rows that all point the opposite way. Partial prototype collapse needs prototypes to travel
//! (a random head has no near-duplicates), so a displacement near 0 means a run was too short
//! for collapse to be possible at all.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{AnalysisError, Result};
use crate::prototypes::l2_normalize_rows;
use crate::stats::quantile_sorted;
use crate::unique::{NN_QUANTILES, Quantile};

/// Displacement of a prototype matrix from its initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Displacement {
    /// `1 − mean_k cos(μ_k(t), μ_k(0))`, in [0, 2].
    pub mean: f64,
    /// Smallest `δ_k` (the prototype that moved least).
    pub min: f64,
    /// Largest `δ_k`.
    pub max: f64,
    /// Quantiles of `δ_k` at [`NN_QUANTILES`].
    pub quantiles: Vec<Quantile>,
}

/// The per-row cosine distances `δ_k = 1 − cos(μ_k(t), μ_k(0))` of `current` and `initial`
/// (both `[K, d]`, any float dtype; rows are normalised here, in f64).
pub fn cosine_distances(current: &Tensor, initial: &Tensor) -> Result<Vec<f64>> {
    let (a, b) = (current.size(), initial.size());
    if a.len() != 2 || a != b || a[0] < 1 || a[1] < 1 {
        return Err(AnalysisError::Shape(format!(
            "displacement needs two [K, d] matrices of one shape, found {a:?} and {b:?}"
        )));
    }
    let _guard = tch::no_grad_guard();
    let prep = |t: &Tensor| -> Result<Tensor> {
        l2_normalize_rows(&t.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Double)?)
    };
    let cos = prep(current)?
        .f_mul(&prep(initial)?)?
        .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?
        // Rounding can put a cosine of unit vectors a hair outside [−1, 1].
        .f_clamp(-1.0, 1.0)?;
    let cos: Vec<f64> = Vec::<f64>::try_from(&cos)?;
    if cos.iter().any(|c| !c.is_finite()) {
        return Err(AnalysisError::invalid(
            "prototypes",
            "contain NaN or infinite values",
        ));
    }
    Ok(cos.into_iter().map(|c| 1.0 - c).collect())
}

/// The [`Displacement`] of `current` from `initial`.
pub fn displacement(current: &Tensor, initial: &Tensor) -> Result<Displacement> {
    let mut d = cosine_distances(current, initial)?;
    d.sort_by(f64::total_cmp);
    let mean = d.iter().sum::<f64>() / d.len() as f64;
    Ok(Displacement {
        mean,
        min: d[0],
        max: d[d.len() - 1],
        quantiles: NN_QUANTILES
            .iter()
            .map(|&q| Quantile {
                q,
                value: quantile_sorted(&d, q),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: &[f64], k: i64) -> Tensor {
        Tensor::from_slice(v).reshape([k, -1])
    }

    #[test]
    fn identical_prototypes_have_not_moved() {
        tch::manual_seed(1);
        let p = Tensor::randn([64, 16], (Kind::Float, tch::Device::Cpu));
        let d = displacement(&p, &p).unwrap();
        assert!(d.mean.abs() < 1e-12 && d.max.abs() < 1e-12, "{d:?}");
    }

    #[test]
    fn scale_does_not_count_as_movement() {
        let p = rows(&[1.0, 2.0, -3.0, 0.5], 2);
        let d = displacement(&(&p * 7.5), &p).unwrap();
        assert!(d.mean.abs() < 1e-12, "{d:?}");
    }

    #[test]
    fn opposite_prototypes_give_two_and_orthogonal_ones_one() {
        let p = rows(&[1.0, 0.0, 0.0, 1.0], 2);
        assert!((displacement(&(-&p), &p).unwrap().mean - 2.0).abs() < 1e-12);
        let q = rows(&[0.0, 1.0, -1.0, 0.0], 2);
        assert!((displacement(&q, &p).unwrap().mean - 1.0).abs() < 1e-12);
    }

    #[test]
    fn mean_min_max_of_mixed_rows() {
        // Row 0 unmoved (0), row 1 reversed (2), row 2 turned by 60° (0.5).
        let init = rows(&[1.0, 0.0, 0.0, 1.0, 1.0, 0.0], 3);
        let half = 3f64.sqrt() / 2.0;
        let now = rows(&[1.0, 0.0, 0.0, -1.0, 0.5, half], 3);
        let d = displacement(&now, &init).unwrap();
        assert!((d.mean - 2.5 / 3.0).abs() < 1e-12, "{d:?}");
        assert!(d.min.abs() < 1e-12 && (d.max - 2.0).abs() < 1e-12);
        let c = cosine_distances(&now, &init).unwrap();
        assert!((c[2] - 0.5).abs() < 1e-12);
    }

    #[test]
    fn shapes_must_match() {
        let a = Tensor::ones([3, 2], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::ones([4, 2], (Kind::Float, tch::Device::Cpu));
        assert!(displacement(&a, &b).is_err());
        assert!(displacement(&a.reshape([-1]), &a.reshape([-1])).is_err());
    }
}
