//! Small numeric helpers shared by the analyses: entropies of distributions, quantiles and
//! mean ± standard deviation.

use serde::{Deserialize, Serialize};

/// Shannon entropy in nats of a non-negative vector after normalising it to sum 1
/// (`0 · log 0 = 0`). An all-zero vector has entropy 0.
pub fn entropy(weights: &[f64]) -> f64 {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    -weights
        .iter()
        .filter(|&&w| w > 0.0)
        .map(|&w| {
            let p = w / total;
            p * p.ln()
        })
        .sum::<f64>()
}

/// Quantile with linear interpolation between order statistics (numpy's default "linear"
/// method): position `q·(n−1)` in the sorted data. `sorted` must be sorted ascending, non-empty.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    if n == 1 {
        return sorted[0];
    }
    let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// `x > 0` and not NaN (for validating temperatures, rates and penalties).
pub(crate) fn positive(x: f64) -> bool {
    x > 0.0
}

/// Mean and population standard deviation (ddof = 0, numpy's default) of a sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    pub mean: f64,
    pub std: f64,
}

impl MeanStd {
    pub fn of(xs: &[f64]) -> MeanStd {
        if xs.is_empty() {
            return MeanStd {
                mean: f64::NAN,
                std: f64::NAN,
            };
        }
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        MeanStd {
            mean,
            std: var.sqrt(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_uniform_is_log_n() {
        assert!((entropy(&[1.0; 8]) - 8f64.ln()).abs() < 1e-12);
        assert!((entropy(&[3.0, 0.0, 0.0]) - 0.0).abs() < 1e-12);
        assert_eq!(entropy(&[0.0, 0.0]), 0.0);
    }

    #[test]
    fn quantile_matches_numpy_linear() {
        let s = [1.0, 2.0, 4.0, 8.0];
        // numpy.quantile([1,2,4,8], [0, .25, .5, 1]) = [1, 1.75, 3, 8]
        assert_eq!(quantile_sorted(&s, 0.0), 1.0);
        assert!((quantile_sorted(&s, 0.25) - 1.75).abs() < 1e-12);
        assert!((quantile_sorted(&s, 0.5) - 3.0).abs() < 1e-12);
        assert_eq!(quantile_sorted(&s, 1.0), 8.0);
    }

    #[test]
    fn mean_std_population() {
        let m = MeanStd::of(&[1.0, 3.0]);
        assert_eq!(m.mean, 2.0);
        assert_eq!(m.std, 1.0);
    }
}
