//! Stochastic depth ("drop path") whose randomness is a pure function of
//! `(seed, step, sample_id, crop, block, branch)`.
//!
//! Official DINO draws `u ~ U[0,1)` per sample from the global RNG and keeps the residual branch
//! iff `u >= rate` (`floor(keep_prob + u)`), scaling kept rows by `1/(1 − rate)`. Here `u` comes
//! from a counter-based hash instead, so a sample gets the same mask whichever worker, batch slot
//! or batch split processes it; the distribution is the same. `branch` is 0 for the attention
//! residual and 1 for the MLP residual of a block: official DINO draws them independently.

use tch::{Device, Tensor};

use crate::ForwardCtx;

/// SplitMix64 finaliser: a bijective 64-bit mixer with full avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The uniform `u ∈ [0, 1)` (53 random bits) of one (seed, step, sample, crop, block, branch).
/// Each field is absorbed by its own mixing round, so distinct keys give independent draws.
pub fn drop_path_uniform(
    seed: u64,
    step: i64,
    sample_id: i64,
    crop: i64,
    block: i64,
    branch: i64,
) -> f64 {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = mix64(seed ^ 0x5052_4f54_4f44_494e); // "PROTODIN"
    for field in [step, sample_id, crop, block, branch] {
        h = mix64(h.wrapping_add(GOLDEN) ^ (field as u64));
    }
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The per-row keep scale `[N, 1, 1]` (0 or `1/(1 − rate)`) for rows of a forward with `ctx`.
///
/// Row `r` belongs to image `ctx.sample_ids[r % n]` and crop `ctx.crop + r / n`, with
/// `n = ctx.sample_ids.len()` (crop-major multi-crop groups; `n = N` for a single crop). With no
/// sample ids the row index is the sample id.
///
/// # Panics
/// If the row count is not a multiple of the number of sample ids (a caller bug).
pub fn keep_scale(
    ctx: &ForwardCtx,
    rows: i64,
    rate: f64,
    block: i64,
    branch: i64,
    device: Device,
) -> Tensor {
    let n = ctx.sample_ids.len() as i64;
    assert!(
        n == 0 || rows % n == 0,
        "drop path: {rows} rows are not a multiple of {n} sample ids"
    );
    let scale = 1.0 / (1.0 - rate);
    let values: Vec<f32> = (0..rows)
        .map(|r| {
            let (sample, crop) = if n == 0 {
                (r, ctx.crop)
            } else {
                (ctx.sample_ids[(r % n) as usize], ctx.crop + r / n)
            };
            let u = drop_path_uniform(ctx.seed, ctx.step, sample, crop, block, branch);
            if u >= rate { scale as f32 } else { 0.0 }
        })
        .collect();
    Tensor::from_slice(&values)
        .view([rows, 1, 1])
        .to_device(device)
}

/// `x` with dropped rows zeroed and kept rows scaled, or `x` itself when inactive
/// (evaluation, or rate 0 as for the teacher).
pub fn drop_path(x: &Tensor, ctx: &ForwardCtx, rate: f64, block: i64, branch: i64) -> Tensor {
    if !ctx.train || rate <= 0.0 {
        return x.shallow_clone();
    }
    let rows = x.size()[0];
    let mask = keep_scale(ctx, rows, rate, block, branch, x.device()).to_kind(x.kind());
    x * mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_and_depends_on_every_field() {
        let base = drop_path_uniform(1, 2, 3, 4, 5, 0);
        assert!((0.0..1.0).contains(&base));
        let variants = [
            drop_path_uniform(9, 2, 3, 4, 5, 0),
            drop_path_uniform(1, 9, 3, 4, 5, 0),
            drop_path_uniform(1, 2, 9, 4, 5, 0),
            drop_path_uniform(1, 2, 3, 9, 5, 0),
            drop_path_uniform(1, 2, 3, 4, 9, 0),
            drop_path_uniform(1, 2, 3, 4, 5, 1),
        ];
        for v in variants {
            assert_ne!(v, base);
        }
    }

    #[test]
    fn keep_rate_matches_the_drop_rate() {
        let rate = 0.3;
        let n = 20_000;
        let kept = (0..n)
            .filter(|&i| drop_path_uniform(7, 0, i, 0, 1, 0) >= rate)
            .count() as f64;
        let frac = kept / n as f64;
        // binomial std ≈ 0.0032; 5σ bound
        assert!((frac - 0.7).abs() < 0.017, "kept fraction {frac}");
    }
}
