//! The evaluation transform for k-NN feature extraction: resize the shorter side to
//! `eval_resize` (bicubic), centre-crop `eval_crop_size`, ImageNet normalisation, into one
//! contiguous `[N, 3, S, S]` buffer. No randomness.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::augment::{Scratch, render_eval};
use crate::dataset::{Dataset, SkippedRecord};

/// Evaluation images; skipped records are left out (and listed), so `images` holds
/// `sample_ids.len()` images.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalBatch {
    pub size: usize,
    /// `[N, 3, S, S]`, normalised.
    pub images: Vec<f32>,
    pub sample_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub skipped: Vec<SkippedRecord>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Fill `batch` with the evaluation view of `ids` on `pool`.
pub fn fill_eval_batch(
    pool: &rayon::ThreadPool,
    dataset: &dyn Dataset,
    resize: usize,
    crop: usize,
    ids: &[u64],
    batch: &mut EvalBatch,
) {
    let s3 = 3 * crop * crop;
    batch.size = crop;
    batch.images.resize(ids.len() * s3, 0.0);
    batch.sample_ids.clear();
    batch.labels.clear();
    batch.skipped.clear();
    if ids.is_empty() {
        return;
    }
    let results: Vec<Result<(), String>> = pool.install(|| {
        batch
            .images
            .par_chunks_mut(s3)
            .zip(ids.par_iter())
            .map(|(out, &id)| {
                let img = dataset.load(id).map_err(|e| e.to_string())?;
                SCRATCH.with(|s| render_eval(&img, resize, crop, &mut s.borrow_mut(), out));
                Ok(())
            })
            .collect()
    });
    let mut kept = 0;
    for (n, (r, &id)) in results.into_iter().zip(ids).enumerate() {
        match r {
            Ok(()) => {
                if kept != n {
                    batch.images.copy_within(n * s3..(n + 1) * s3, kept * s3);
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
    batch.images.truncate(kept * s3);
}
