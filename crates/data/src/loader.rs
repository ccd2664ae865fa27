//! The loader the worker drives: a thread pool, a producer thread and a bounded prefetch
//! queue of preallocated batches.
//!
//! Per epoch the worker passes the ordered sample ids of each step (the coordinator decides
//! them, e.g. from [`crate::epoch_permutation`]). A producer thread fills one batch at a time
//! with all pool threads working on its samples, and pushes it into a channel bounded by
//! `prefetch_batches`, so at most that many finished batches wait while the next one is being
//! made. Consumed batches can be handed back with [`EpochStream::recycle`]; their buffers are
//! reused, so the steady state allocates no crop memory at all.
//!
//! Buffers are plain `Vec<f32>`: the worker wraps them with `Tensor::from_slice`-style copies
//! or, zero-copy, `from_blob` while the batch is alive; pinning for CUDA is done by the worker
//! (`cudaHostRegister` on the same allocation), since this crate stays free of libtorch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use protodino_config::{CropsConfig, DataConfig};

use crate::dataset::SharedDataset;
use crate::error::DataError;
use crate::eval::{EvalBatch, fill_eval_batch};
use crate::multicrop::{MultiCrop, MultiCropBatch, fill_batch};

/// The multi-crop loader of one data set.
pub struct Loader {
    dataset: SharedDataset,
    crops: Arc<MultiCrop>,
    seed: u64,
    pool: Arc<rayon::ThreadPool>,
    prefetch: usize,
    eval_resize: usize,
    eval_crop: usize,
}

impl Loader {
    /// Build from the configuration: `data.num_threads` pool threads, `data.prefetch_batches`
    /// queued batches (at least 1), crops from `crops`, all randomness from `seed`.
    pub fn new(
        dataset: SharedDataset,
        crops: &CropsConfig,
        data: &DataConfig,
        seed: u64,
    ) -> Result<Self, DataError> {
        if data.num_threads < 1 || data.prefetch_batches < 0 {
            return Err(DataError::Config(format!(
                "data.num_threads = {} must be >= 1 and data.prefetch_batches = {} >= 0",
                data.num_threads, data.prefetch_batches
            )));
        }
        if data.eval_resize < 1 || data.eval_crop_size < 1 {
            return Err(DataError::Config(
                "eval_resize and eval_crop_size must be >= 1".into(),
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(data.num_threads as usize)
            .thread_name(|i| format!("protodino-data-{i}"))
            .build()
            .map_err(|e| DataError::Threads(e.to_string()))?;
        Ok(Self {
            dataset,
            crops: Arc::new(MultiCrop::from_config(crops)?),
            seed,
            pool: Arc::new(pool),
            prefetch: (data.prefetch_batches as usize).max(1),
            eval_resize: data.eval_resize as usize,
            eval_crop: data.eval_crop_size as usize,
        })
    }

    pub fn dataset(&self) -> &SharedDataset {
        &self.dataset
    }

    pub fn crops(&self) -> &MultiCrop {
        &self.crops
    }

    /// Make one batch synchronously (on the pool).
    pub fn make_batch(&self, epoch: u64, ids: &[u64]) -> MultiCropBatch {
        let mut b = MultiCropBatch::default();
        self.fill(epoch, ids, &mut b);
        b
    }

    /// Refill an existing batch (its buffers are reused).
    pub fn fill(&self, epoch: u64, ids: &[u64], batch: &mut MultiCropBatch) {
        fill_batch(
            &self.pool,
            &*self.dataset,
            &self.crops,
            self.seed,
            epoch,
            ids,
            batch,
        );
    }

    /// Evaluation images of `ids` (`[N, 3, S, S]`, resize + centre crop, normalised).
    pub fn eval_batch(&self, ids: &[u64]) -> EvalBatch {
        let mut b = EvalBatch::default();
        fill_eval_batch(
            &self.pool,
            &*self.dataset,
            self.eval_resize,
            self.eval_crop,
            ids,
            &mut b,
        );
        b
    }

    /// Evaluation images of `ids` of another data set (e.g. the k-NN train/test sets from
    /// [`crate::open_eval`]), on this loader's threads.
    pub fn eval_batch_of(&self, dataset: &dyn crate::Dataset, ids: &[u64]) -> EvalBatch {
        let mut b = EvalBatch::default();
        fill_eval_batch(
            &self.pool,
            dataset,
            self.eval_resize,
            self.eval_crop,
            ids,
            &mut b,
        );
        b
    }

    /// Start producing the batches of an epoch in the background; `steps[i]` are the ordered
    /// sample ids of step `i`. Dropping the stream stops the producer.
    pub fn epoch(&self, epoch: u64, steps: Vec<Vec<u64>>) -> EpochStream {
        let (tx, rx) = bounded::<MultiCropBatch>(self.prefetch);
        let (recycle_tx, recycle_rx) = unbounded::<MultiCropBatch>();
        let stop = Arc::new(AtomicBool::new(false));
        let (dataset, crops, pool, seed) = (
            self.dataset.clone(),
            self.crops.clone(),
            self.pool.clone(),
            self.seed,
        );
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("protodino-data-producer".into())
            .spawn(move || {
                for ids in steps {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    let mut batch = recycle_rx.try_recv().unwrap_or_default();
                    fill_batch(&pool, &*dataset, &crops, seed, epoch, &ids, &mut batch);
                    if tx.send(batch).is_err() {
                        break;
                    }
                }
            });
        EpochStream {
            rx: Some(rx),
            recycle: recycle_tx,
            stop,
            handle: handle.ok(),
        }
    }
}

/// The batches of one epoch, in step order.
pub struct EpochStream {
    rx: Option<Receiver<MultiCropBatch>>,
    recycle: Sender<MultiCropBatch>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl EpochStream {
    /// Hand a consumed batch back so its buffers are reused.
    pub fn recycle(&self, batch: MultiCropBatch) {
        let _ = self.recycle.send(batch);
    }

    /// Whether the producer thread started (it fails only if the OS refuses a thread, in which
    /// case the stream is empty).
    pub fn is_running(&self) -> bool {
        self.handle.is_some()
    }
}

impl Iterator for EpochStream {
    type Item = MultiCropBatch;
    fn next(&mut self) -> Option<MultiCropBatch> {
        match self.rx.as_ref()?.recv() {
            Ok(b) => Some(b),
            Err(_) => {
                // The producer is done. If it died by a panic, re-raise it here: an epoch that
                // ends early must never look like a finished one.
                if let Some(h) = self.handle.take()
                    && let Err(panic) = h.join()
                {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }
}

impl Drop for EpochStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver makes a blocked `send` fail, so the producer exits.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
