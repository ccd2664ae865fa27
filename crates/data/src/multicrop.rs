//! The multi-crop batch: contiguous, crop-major, normalised f32 buffers the worker turns into
//! tensors, and how one batch is filled on a thread pool.
//!
//! Layout: `global_crops` is `[2, B, 3, G, G]`, `local_crops` is `[L, B, 3, l, l]` (crop-major,
//! image-minor, as DINO's multi-crop wrapper concatenates them). Sample `n`'s crop `v` is the
//! slice `[(v·B + n)·3S², (v·B + n + 1)·3S²)`.
//!
//! Records that cannot be read or decoded are skipped: they are listed in `skipped` and the
//! batch holds the remaining samples, compacted, with `batch_size` reduced accordingly (the
//! architecture weights gradients and centre by sample counts, so a short batch is exact;
//! refilling it with other ids would break the coordinator's exactly-once ledger).

use std::cell::RefCell;

use protodino_config::CropsConfig;
use rayon::prelude::*;

use crate::augment::{CropSpec, Scratch, render_crop, sample_crop_params};
use crate::dataset::{Dataset, SkippedRecord};
use crate::error::DataError;
use crate::rng::CounterRng;

/// The crops of one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MultiCropBatch {
    pub epoch: u64,
    pub batch_size: usize,
    pub global_size: usize,
    pub local_size: usize,
    pub n_local: usize,
    /// `[2, B, 3, G, G]`, normalised.
    pub global_crops: Vec<f32>,
    /// `[L, B, 3, l, l]`, normalised.
    pub local_crops: Vec<f32>,
    pub sample_ids: Vec<i64>,
    /// Labels (evaluation only; −1 where unknown).
    pub labels: Vec<i64>,
    /// Corrupt or unreadable records met while filling this batch.
    pub skipped: Vec<SkippedRecord>,
}

impl MultiCropBatch {
    /// Shape of `global_crops` as tensor dims.
    pub fn global_shape(&self) -> [usize; 5] {
        let g = self.global_size;
        [2, self.batch_size, 3, g, g]
    }
    /// Shape of `local_crops` as tensor dims.
    pub fn local_shape(&self) -> [usize; 5] {
        let l = self.local_size;
        [self.n_local, self.batch_size, 3, l, l]
    }
}

/// The crop positions of a step, validated from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiCrop {
    pub global_size: usize,
    pub local_size: usize,
    pub n_local: usize,
    /// `2 + n_local` specs in output order: global-1, global-2, local-1 … local-L.
    pub specs: Vec<CropSpec>,
}

fn check_scale(name: &str, s: [f64; 2]) -> Result<(), DataError> {
    if !(s[0] > 0.0 && s[0] <= s[1] && s[1] <= 1.0) {
        return Err(DataError::Config(format!(
            "{name} = {s:?} must satisfy 0 < min <= max <= 1"
        )));
    }
    Ok(())
}

impl MultiCrop {
    pub fn from_config(c: &CropsConfig) -> Result<Self, DataError> {
        if c.global_crop_size < 1 || c.local_crop_size < 1 || c.local_crops_number < 0 {
            return Err(DataError::Config(format!(
                "crop sizes must be positive and local_crops_number >= 0 (got {}, {}, {})",
                c.global_crop_size, c.local_crop_size, c.local_crops_number
            )));
        }
        check_scale("global_crops_scale", c.global_crops_scale)?;
        if c.local_crops_number > 0 {
            check_scale("local_crops_scale", c.local_crops_scale)?;
        }
        for p in c.blur_prob.iter().chain([&c.solarize_prob]) {
            if !(0.0..=1.0).contains(p) {
                return Err(DataError::Config(format!("probability {p} outside [0, 1]")));
            }
        }
        let g = c.global_crop_size as usize;
        let l = c.local_crop_size as usize;
        let global = |blur: f64, sol: f64| CropSpec {
            size: g,
            scale: c.global_crops_scale,
            blur_prob: blur,
            solarize_prob: sol,
        };
        let mut specs = vec![
            global(c.blur_prob[0], 0.0),
            global(c.blur_prob[1], c.solarize_prob),
        ];
        specs.extend((0..c.local_crops_number).map(|_| CropSpec {
            size: l,
            scale: c.local_crops_scale,
            blur_prob: c.blur_prob[2],
            solarize_prob: 0.0,
        }));
        Ok(Self {
            global_size: g,
            local_size: l,
            n_local: c.local_crops_number as usize,
            specs,
        })
    }
}

thread_local! {
    /// Per-thread transform buffers: warm after the first crops, so steady-state batches
    /// allocate nothing per pixel or per crop.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Produce every crop of one sample into its output slots (`slots[v]` for crop `v`).
pub fn render_sample(
    dataset: &dyn Dataset,
    crops: &MultiCrop,
    seed: u64,
    epoch: u64,
    id: u64,
    slots: &mut [&mut [f32]],
) -> Result<(), crate::dataset::RecordError> {
    let img = dataset.load(id)?;
    SCRATCH.with(|s| {
        let scratch = &mut *s.borrow_mut();
        for (v, (spec, out)) in crops.specs.iter().zip(slots.iter_mut()).enumerate() {
            let mut rng = CounterRng::for_sample(seed, epoch, id, v as u64);
            let p = sample_crop_params(&mut rng, img.width, img.height, spec);
            render_crop(&img, spec.size, &p, scratch, out);
        }
    });
    Ok(())
}

/// Fill `batch` with the crops of `ids` (in that order) on `pool`, reusing its buffers.
pub fn fill_batch(
    pool: &rayon::ThreadPool,
    dataset: &dyn Dataset,
    crops: &MultiCrop,
    seed: u64,
    epoch: u64,
    ids: &[u64],
    batch: &mut MultiCropBatch,
) {
    let b = ids.len();
    let (g3, l3) = (
        3 * crops.global_size * crops.global_size,
        3 * crops.local_size * crops.local_size,
    );
    batch.epoch = epoch;
    batch.global_size = crops.global_size;
    batch.local_size = crops.local_size;
    batch.n_local = crops.n_local;
    batch.global_crops.resize(2 * b * g3, 0.0);
    batch.local_crops.resize(crops.n_local * b * l3, 0.0);
    batch.skipped.clear();
    if b == 0 {
        batch.batch_size = 0;
        batch.sample_ids.clear();
        batch.labels.clear();
        return;
    }
    let mut slots: Vec<Vec<&mut [f32]>> = (0..b)
        .map(|_| Vec::with_capacity(crops.specs.len()))
        .collect();
    for crop in batch.global_crops.chunks_mut(b * g3) {
        for (n, s) in crop.chunks_mut(g3).enumerate() {
            slots[n].push(s);
        }
    }
    if l3 > 0 {
        for crop in batch.local_crops.chunks_mut(b * l3) {
            for (n, s) in crop.chunks_mut(l3).enumerate() {
                slots[n].push(s);
            }
        }
    }
    let results: Vec<Result<(), String>> = pool.install(|| {
        slots
            .into_par_iter()
            .zip(ids.par_iter())
            .map(|(mut s, &id)| {
                render_sample(dataset, crops, seed, epoch, id, &mut s).map_err(|e| e.to_string())
            })
            .collect()
    });
    // Compact: keep successful samples in order.
    let mut kept = 0usize;
    batch.sample_ids.clear();
    batch.labels.clear();
    for (n, (r, &id)) in results.into_iter().zip(ids).enumerate() {
        match r {
            Ok(()) => {
                if kept != n {
                    for v in 0..2 {
                        let src = (v * b + n) * g3;
                        batch
                            .global_crops
                            .copy_within(src..src + g3, (v * b + kept) * g3);
                    }
                    for v in 0..crops.n_local {
                        let src = (v * b + n) * l3;
                        batch
                            .local_crops
                            .copy_within(src..src + l3, (v * b + kept) * l3);
                    }
                }
                batch.sample_ids.push(id as i64);
                batch.labels.push(dataset.label(id));
                kept += 1;
            }
            Err(reason) => batch.skipped.push(SkippedRecord {
                sample_id: id,
                reason,
            }),
        }
    }
    if kept < b {
        // Re-pack crop-major with the smaller batch dimension.
        for v in 0..2 {
            batch
                .global_crops
                .copy_within(v * b * g3..(v * b + kept) * g3, v * kept * g3);
        }
        batch.global_crops.truncate(2 * kept * g3);
        for v in 0..crops.n_local {
            batch
                .local_crops
                .copy_within(v * b * l3..(v * b + kept) * l3, v * kept * l3);
        }
        batch.local_crops.truncate(crops.n_local * kept * l3);
    }
    batch.batch_size = kept;
}
