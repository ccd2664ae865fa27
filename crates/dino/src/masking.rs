//! iBOT's masks of the global crops (docs/algorithm.md §5.2): which patch tokens of each global
//! crop the student sees replaced by the mask token, as `ImageFolderMask` of bytedance/ibot
//! draws them, with randomness that is a pure function of (seed, epoch, sample id, crop).
//!
//! Per crop, a prediction ratio `r` is drawn: 0 before `ibot.pred_start_epoch`; otherwise one
//! entry `(m, v)` of `ibot.pred_ratio` / `pred_ratio_var` is picked uniformly and `r` is
//! `U(m − v, m + v)` (exactly `m` when `v = 0`). With `ibot.pred_ratio = [0, 0.3]` half of the
//! images are therefore not masked at all: that is how the official recipe sets its per-image
//! masking probability. Then on the `h × w` patch grid, with `high = r·h·w`:
//!
//! * `block` (BEiT's generator): while fewer than `high` patches are masked, up to 10 attempts
//!   draw a rectangle of area `U(⌊min(h, w)/3⌋², high − masked)` and aspect ratio
//!   `exp(U(log a₀, log a₁))`, sides rounded half-to-even (Python's `round`), accepted when it
//!   fits strictly inside the grid and adds between 1 and `high − masked` new patches; the
//!   first accepted rectangle ends the attempts, ten failures end the mask;
//! * `rand`: `⌊high⌋` patches chosen uniformly.
//!
//! The official loader draws from Python's global `random` in the data-loader worker, so its
//! masks depend on worker scheduling. Here every crop has its own counter-based generator keyed
//! by (seed, epoch, sample id, crop) — the idea of `protodino_data`'s per-sample streams, with
//! a key domain of its own — so a sample gets the same masks on any worker, in any batch split
//! and after any restart. `reference/golden_ibot.py` ports this generator bit for bit and also
//! runs the official algorithm with Python's `random`; the tests compare both.

use protodino_config::{PredShape, TrainConfig};
use protodino_data::rng::{CounterRng, GOLDEN, mix64};
use tch::Tensor;

/// Key domain of the masks ("IBOTMASK"), distinct from the crops' and drop path's.
const MASK_DOMAIN: u64 = 0x4942_4f54_4d41_534b;

/// The key of one (seed, epoch, sample id, crop): each field absorbed by its own mixing round.
pub fn mask_key(seed: u64, epoch: i64, sample_id: i64, crop: i64) -> u64 {
    let mut k = mix64(seed ^ MASK_DOMAIN);
    for field in [epoch, sample_id, crop] {
        k = mix64(k.wrapping_add(GOLDEN) ^ field as u64);
    }
    k
}

/// The data pipeline's counter-based generator ([`CounterRng`]: the `n`-th draw depends only on
/// the key and `n`) on a mask key, plus the integer draw the mask algorithm needs.
#[derive(Debug, Clone)]
pub struct MaskRng {
    rng: CounterRng,
}

impl MaskRng {
    /// The generator of crop `crop` of sample `sample_id` in `epoch`.
    pub fn for_crop(seed: u64, epoch: i64, sample_id: i64, crop: i64) -> Self {
        MaskRng {
            rng: CounterRng::new(mask_key(seed, epoch, sample_id, crop)),
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform01(&mut self) -> f64 {
        self.rng.uniform01()
    }

    /// Python's `random.uniform(a, b)`: `a + (b − a)·u` (also for `b < a`).
    pub fn uniform(&mut self, a: f64, b: f64) -> f64 {
        self.rng.uniform(a, b)
    }

    /// Uniform integer in [0, n) (n > 0) by the widening multiply.
    pub fn below(&mut self, n: u64) -> u64 {
        self.rng.below(n)
    }

    /// Python's `random.randint(a, b)`: uniform in [a, b], both included.
    pub fn randint(&mut self, a: i64, b: i64) -> i64 {
        a + self.below((b - a + 1) as u64) as i64
    }
}

/// What the masks of a run depend on, from `[ibot]`.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskSpec {
    /// `(m, v)`: each `ibot.pred_ratio` entry with its `pred_ratio_var`.
    pub ratios: Vec<(f64, f64)>,
    /// `(log a₀, log a₁)` of `ibot.pred_aspect_ratio`.
    pub log_aspect: (f64, f64),
    pub shape: PredShape,
    pub start_epoch: i64,
}

impl MaskSpec {
    pub fn from_config(cfg: &TrainConfig) -> Self {
        let b = &cfg.ibot;
        MaskSpec {
            ratios: b.pred_ratio.iter().copied().zip(b.ratio_vars()).collect(),
            log_aspect: (b.pred_aspect_ratio[0].ln(), b.pred_aspect_ratio[1].ln()),
            shape: b.pred_shape,
            start_epoch: b.pred_start_epoch,
        }
    }

    /// The prediction ratio `r` of one crop (`get_pred_ratio`).
    pub fn pred_ratio(&self, epoch: i64, rng: &mut MaskRng) -> f64 {
        if epoch < self.start_epoch || self.ratios.is_empty() {
            return 0.0;
        }
        let (m, v) = if self.ratios.len() == 1 {
            self.ratios[0]
        } else {
            self.ratios[rng.below(self.ratios.len() as u64) as usize]
        };
        if v > 0.0 {
            rng.uniform(m - v, m + v)
        } else {
            m
        }
    }

    /// The mask of one crop, row-major `h × w` (true = masked).
    pub fn mask(&self, h: i64, w: i64, epoch: i64, rng: &mut MaskRng) -> Vec<bool> {
        let high = self.pred_ratio(epoch, rng) * (h * w) as f64;
        match self.shape {
            PredShape::Block => block_mask(h, w, high, self.log_aspect, rng),
            PredShape::Rand => rand_mask(h, w, high, rng),
        }
    }

    /// The mask of crop `crop` of `sample_id` (its own generator).
    pub fn crop_mask(
        &self,
        seed: u64,
        epoch: i64,
        sample_id: i64,
        crop: i64,
        grid: (i64, i64),
    ) -> Vec<bool> {
        let mut rng = MaskRng::for_crop(seed, epoch, sample_id, crop);
        self.mask(grid.0, grid.1, epoch, &mut rng)
    }

    /// The masks of the two global crops of `sample_ids` in `epoch`: two bool tensors
    /// `[B, h, w]` (global-1, global-2).
    pub fn global_masks(
        &self,
        seed: u64,
        epoch: i64,
        sample_ids: &[i64],
        grid: (i64, i64),
    ) -> Vec<Tensor> {
        (0..2)
            .map(|crop| {
                let flat: Vec<bool> = sample_ids
                    .iter()
                    .flat_map(|&id| self.crop_mask(seed, epoch, id, crop, grid))
                    .collect();
                Tensor::from_slice(&flat).view([sample_ids.len() as i64, grid.0, grid.1])
            })
            .collect()
    }
}

/// The two global-crop masks of a batch under `cfg` (seed `train.seed`, grid of a global crop).
pub fn ibot_masks(cfg: &TrainConfig, epoch: i64, sample_ids: &[i64]) -> Vec<Tensor> {
    MaskSpec::from_config(cfg).global_masks(
        cfg.train.seed,
        epoch,
        sample_ids,
        cfg.global_patch_grid(),
    )
}

/// BEiT / iBOT blockwise masking of `high` patches on an `h × w` grid.
fn block_mask(h: i64, w: i64, high: f64, log_aspect: (f64, f64), rng: &mut MaskRng) -> Vec<bool> {
    let mut mask = vec![false; (h * w) as usize];
    let mut count = 0i64;
    let low = ((h.min(w) / 3).pow(2)) as f64;
    while (count as f64) < high {
        let max_mask = high - count as f64;
        let mut delta = 0i64;
        for _attempt in 0..10 {
            let target_area = rng.uniform(low, max_mask);
            let aspect = rng.uniform(log_aspect.0, log_aspect.1).exp();
            let bh = (target_area * aspect).sqrt().round_ties_even() as i64;
            let bw = (target_area / aspect).sqrt().round_ties_even() as i64;
            if bw < w && bh < h {
                let top = rng.randint(0, h - bh);
                let left = rng.randint(0, w - bw);
                let cell = |i: i64, j: i64| (i * w + j) as usize;
                let already = (top..top + bh)
                    .flat_map(|i| (left..left + bw).map(move |j| (i, j)))
                    .filter(|&(i, j)| mask[cell(i, j)])
                    .count() as i64;
                let new = bh * bw - already;
                if 0 < new && new as f64 <= max_mask {
                    for i in top..top + bh {
                        for j in left..left + bw {
                            if !mask[cell(i, j)] {
                                mask[cell(i, j)] = true;
                                delta += 1;
                            }
                        }
                    }
                }
            }
            if delta > 0 {
                break;
            }
        }
        if delta == 0 {
            break;
        }
        count += delta;
    }
    mask
}

/// `⌊high⌋` of the `h·w` patches, uniformly (a partial Fisher–Yates shuffle).
fn rand_mask(h: i64, w: i64, high: f64, rng: &mut MaskRng) -> Vec<bool> {
    let n = (h * w) as usize;
    let k = (high.max(0.0) as usize).min(n);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + rng.below((n - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut mask = vec![false; n];
    for &i in &idx[..k] {
        mask[i] = true;
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ratios: &[(f64, f64)], shape: PredShape) -> MaskSpec {
        MaskSpec {
            ratios: ratios.to_vec(),
            log_aspect: (0.3f64.ln(), (1.0f64 / 0.3).ln()),
            shape,
            start_epoch: 0,
        }
    }

    #[test]
    fn masks_depend_only_on_seed_epoch_sample_and_crop() {
        let s = spec(&[(0.3, 0.2)], PredShape::Block);
        let a = s.crop_mask(1, 2, 42, 0, (14, 14));
        assert_eq!(a, s.crop_mask(1, 2, 42, 0, (14, 14)));
        let others = [
            s.crop_mask(2, 2, 42, 0, (14, 14)),
            s.crop_mask(1, 3, 42, 0, (14, 14)),
            s.crop_mask(1, 2, 43, 0, (14, 14)),
            s.crop_mask(1, 2, 42, 1, (14, 14)),
        ];
        assert!(others.iter().all(|o| *o != a));
        // A batch's tensor is the per-sample masks stacked, whatever else is in the batch.
        let ids = [42, 7, 9];
        let m = s.global_masks(1, 2, &ids, (14, 14));
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].size(), [3, 14, 14]);
        let alone = s.global_masks(1, 2, &[7], (14, 14));
        assert!(m[1].get(1).equal(&alone[1].get(0)));
        let first: Vec<bool> = Vec::try_from(m[0].get(0).flatten(0, -1)).unwrap();
        assert_eq!(first, a);
    }

    #[test]
    fn block_masks_stay_within_the_budget_and_are_unions_of_rectangles() {
        let s = spec(&[(0.3, 0.0)], PredShape::Block);
        let (h, w) = (14, 14);
        let high = 0.3 * (h * w) as f64;
        let mut total = 0usize;
        for id in 0..500 {
            let m = s.crop_mask(0, 0, id, 0, (h, w));
            let n = m.iter().filter(|&&b| b).count();
            // The loop stops at the first count >= high; a block adds at most high − count.
            assert!(n as f64 <= high, "{n} > {high}");
            total += n;
        }
        let mean = total as f64 / 500.0;
        assert!(mean > 0.8 * high, "mean {mean} of {high}");
    }

    #[test]
    fn rand_masks_have_exactly_floor_high_patches() {
        let s = spec(&[(0.37, 0.0)], PredShape::Rand);
        for id in 0..50 {
            let m = s.crop_mask(3, 1, id, 1, (4, 4));
            assert_eq!(m.iter().filter(|&&b| b).count(), (0.37f64 * 16.0) as usize);
        }
    }

    #[test]
    fn ratio_choice_and_start_epoch() {
        let mut s = spec(&[(0.0, 0.0), (0.3, 0.2)], PredShape::Block);
        let mut zero = 0;
        for id in 0..2000 {
            let mut rng = MaskRng::for_crop(5, 0, id, 0);
            let r = s.pred_ratio(0, &mut rng);
            if r == 0.0 {
                zero += 1;
            } else {
                assert!((0.1..=0.5).contains(&r), "{r}");
            }
        }
        // Binomial(2000, 1/2): σ ≈ 22.4; 5σ.
        assert!((zero as f64 - 1000.0).abs() < 112.0, "{zero}");
        s.start_epoch = 3;
        let mut rng = MaskRng::for_crop(5, 2, 1, 0);
        assert_eq!(s.pred_ratio(2, &mut rng), 0.0);
        assert!(s.crop_mask(5, 2, 1, 0, (4, 4)).iter().all(|&b| !b));
    }

    #[test]
    fn python_rounding_is_half_to_even() {
        assert_eq!(2.5f64.round_ties_even(), 2.0);
        assert_eq!(3.5f64.round_ties_even(), 4.0);
    }
}
