//! Synthetic clustered features: C cluster centres drawn uniformly on the unit sphere of R^D,
//! samples scattered around them, and two noisy views of every sample.
//!
//! * centre `c` is `normalize(g)`, `g ~ N(0, I_D)`;
//! * sample `x = normalize(μ_c + spread · g/√D)`: `spread` is the noise norm relative to the
//!   centre's (0.5: samples lie about 27° from their centre);
//! * view `v = normalize(x + view_noise · g'/√D)`, drawn independently for the two views;
//! * class sizes: balanced, or long-tailed with `n_c ∝ imbalance^(−c/(C−1))` (class 0 is the
//!   largest, `imbalance` the ratio of the largest to the smallest), every class at least 1.
//!
//! All draws come from the data crate's counter-based generator keyed by `seed` (normals by
//! Box–Muller), never from libtorch's global generator, so a seed gives the same features bit
//! for bit whatever else the process is doing.

use anyhow::{Result, ensure};
use protodino_data::rng::{CounterRng, sample_key};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::features::FeatureSet;

/// Parameters of the synthetic feature generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    pub clusters: i64,
    pub dim: i64,
    pub samples: i64,
    pub spread: f64,
    pub view_noise: f64,
    /// Largest over smallest class size; 1 = balanced.
    pub imbalance: f64,
    pub seed: i64,
}

/// Samples per class: balanced or long-tailed as in the module doc; sums to `samples`.
pub fn class_sizes(clusters: i64, samples: i64, imbalance: f64) -> Vec<i64> {
    let c = clusters.max(1) as usize;
    let w: Vec<f64> = (0..c)
        .map(|i| {
            if c == 1 {
                1.0
            } else {
                imbalance.powf(-(i as f64) / (c - 1) as f64)
            }
        })
        .collect();
    let total: f64 = w.iter().sum();
    let mut sizes: Vec<i64> = w
        .iter()
        .map(|x| ((x / total) * samples as f64).floor().max(1.0) as i64)
        .collect();
    // Hand out (or take back) the rounding remainder from the largest class down.
    let mut diff = samples - sizes.iter().sum::<i64>();
    let mut i = 0;
    while diff != 0 {
        let j = i % c;
        if diff > 0 {
            sizes[j] += 1;
            diff -= 1;
        } else if sizes[j] > 1 {
            sizes[j] -= 1;
            diff += 1;
        }
        i += 1;
    }
    sizes
}

/// `n` standard normal draws from `rng` (Box–Muller on two uniforms in (0, 1]).
fn gaussians(rng: &mut CounterRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = 1.0 - rng.uniform01();
            let u2 = rng.uniform01();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// A `[rows, cols]` tensor of standard normals from the stream `stream` of `seed`.
fn randn(seed: i64, stream: u64, rows: i64, cols: i64) -> Tensor {
    let mut rng = CounterRng::new(sample_key(seed as u64, 0, stream, 0x5359_4e54)); // "SYNT"
    Tensor::from_slice(&gaussians(&mut rng, (rows * cols) as usize)).reshape([rows, cols])
}

fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
}

/// The feature set of `spec`.
pub fn generate(spec: &SyntheticSpec) -> Result<FeatureSet> {
    ensure!(spec.clusters >= 1, "clusters must be >= 1");
    ensure!(
        spec.samples >= spec.clusters,
        "need at least one sample per cluster"
    );
    ensure!(spec.dim >= 2, "dim must be >= 2");
    ensure!(
        spec.spread >= 0.0 && spec.view_noise >= 0.0 && spec.imbalance >= 1.0,
        "spread and view noise must be >= 0, imbalance >= 1"
    );
    let sizes = class_sizes(spec.clusters, spec.samples, spec.imbalance);
    let labels: Vec<i64> = sizes
        .iter()
        .enumerate()
        .flat_map(|(c, &n)| std::iter::repeat_n(c as i64, n as usize))
        .collect();
    let scale = 1.0 / (spec.dim as f64).sqrt();
    let (n, d) = (spec.samples, spec.dim);
    let (v0, v1) = tch::no_grad(|| {
        let centres = normalize(&randn(spec.seed, 0, spec.clusters, d));
        let idx = Tensor::from_slice(&labels);
        let noise = randn(spec.seed, 1, n, d) * (spec.spread * scale);
        let x = normalize(&(centres.index_select(0, &idx) + noise));
        let view =
            |stream| normalize(&(&x + randn(spec.seed, stream, n, d) * (spec.view_noise * scale)));
        (view(2), view(3))
    });
    FeatureSet::new("synthetic", [v0, v1], labels, serde_json::to_value(spec)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn spec() -> SyntheticSpec {
        SyntheticSpec {
            clusters: 4,
            dim: 8,
            samples: 40,
            spread: 0.3,
            view_noise: 0.1,
            imbalance: 1.0,
            seed: 3,
        }
    }

    #[test]
    fn balanced_and_long_tailed_sizes() {
        assert_eq!(class_sizes(4, 40, 1.0), vec![10, 10, 10, 10]);
        let lt = class_sizes(3, 120, 4.0);
        assert_eq!(lt.iter().sum::<i64>(), 120);
        assert!(lt[0] > lt[1] && lt[1] > lt[2], "{lt:?}");
        assert!((lt[0] as f64 / lt[2] as f64 - 4.0).abs() < 0.5, "{lt:?}");
        // Every class keeps a sample even under a huge ratio.
        assert!(class_sizes(5, 10, 1e9).iter().all(|&n| n >= 1));
    }

    #[test]
    fn unit_rows_and_the_same_features_for_a_seed() {
        let a = generate(&spec()).unwrap();
        let b = generate(&spec()).unwrap();
        assert!(a.views[0].equal(&b.views[0]) && a.views[1].equal(&b.views[1]));
        let norms = a.views[0].norm_scalaropt_dim(2, [1], false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-5);
        assert_eq!(a.info.class_counts, vec![10; 4]);
        let c = generate(&SyntheticSpec { seed: 4, ..spec() }).unwrap();
        assert!(!a.views[0].equal(&c.views[0]));
    }

    #[test]
    fn views_of_a_sample_are_closer_than_samples_of_different_clusters() {
        let s = generate(&spec()).unwrap();
        let same = (&s.views[0] * &s.views[1]).sum_dim_intlist(1, false, Kind::Float);
        // Sample 0 (cluster 0) against sample 39 (cluster 3).
        let cross = (s.views[0].get(0) * s.views[0].get(39)).sum(Kind::Float);
        assert!(same.min().double_value(&[]) > cross.double_value(&[]));
    }
}
