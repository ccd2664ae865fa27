//! Helpers shared by the integration tests: seeded random matrices and points at exactly known
//! distances on the unit sphere.
#![allow(dead_code)]

use protodino_analysis::rng::SplitMix64;
use tch::{Kind, Tensor};

/// `n × d` standard-normal rows (f64), seeded.
pub fn gaussian(n: usize, d: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut r = SplitMix64::new(seed);
    (0..n)
        .map(|_| (0..d).map(|_| r.normal()).collect())
        .collect()
}

pub fn normalize(v: &[f64]) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| x / n).collect()
}

/// `n × d` random unit rows.
pub fn unit_rows(n: usize, d: usize, seed: u64) -> Vec<Vec<f64>> {
    gaussian(n, d, seed).iter().map(|v| normalize(v)).collect()
}

pub fn to_tensor(rows: &[Vec<f64>]) -> Tensor {
    let d = rows[0].len() as i64;
    let flat: Vec<f64> = rows.iter().flatten().cloned().collect();
    Tensor::from_slice(&flat).reshape([-1, d])
}

pub fn to_tensor_f32(rows: &[Vec<f64>]) -> Tensor {
    to_tensor(rows).to_kind(Kind::Float)
}

/// A unit vector orthogonal to `b` (Gram–Schmidt of a seeded random vector).
pub fn orthogonal_unit(b: &[f64], seed: u64) -> Vec<f64> {
    let g = &gaussian(1, b.len(), seed)[0];
    let dot: f64 = g.iter().zip(b).map(|(x, y)| x * y).sum();
    normalize(
        &g.iter()
            .zip(b)
            .map(|(x, y)| x - dot * y)
            .collect::<Vec<_>>(),
    )
}

/// The point at angle `theta` from unit `b` towards the orthogonal unit `u`.
pub fn on_great_circle(b: &[f64], u: &[f64], theta: f64) -> Vec<f64> {
    b.iter()
        .zip(u)
        .map(|(x, y)| theta.cos() * x + theta.sin() * y)
        .collect()
}

/// The angle whose chord on the unit sphere has length `d`: `D = 2 sin(θ/2)`.
pub fn angle_for_distance(d: f64) -> f64 {
    2.0 * (d / 2.0).asin()
}

pub fn dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}
