//! Per-iteration schedules of a DINO run (docs/algorithm.md §1.7, §1.5): learning rate (linear scaling
//! with the global batch, linear warm-up from 0, cosine to `min_lr`), weight decay (cosine
//! 0.04 → 0.4, increasing), teacher EMA momentum (cosine 0.996 → 1) and the per-**epoch**
//! teacher temperature (linspace with both endpoints, then constant).
//!
//! The official code precomputes numpy arrays of length `T = epochs · I`; here the same values
//! come from closed forms evaluated in `f64` with numpy's operation order (`linspace` is
//! `start + i · (stop − start)/(n − 1)` with the last point set exactly to `stop`), so no array of
//! length T is held and any iteration can be queried. Iterations past `T` (possible with
//! `max_steps` beyond the planned run) are clamped to the last scheduled value.

use protodino_config::TrainConfig;

use crate::error::{DinoError, Result};

/// numpy's `linspace(start, stop, n)[i]` (endpoint included).
pub fn linspace_at(start: f64, stop: f64, n: i64, i: i64) -> f64 {
    if n <= 1 || i <= 0 {
        return start;
    }
    if i >= n - 1 {
        return stop;
    }
    let step = (stop - start) / (n - 1) as f64;
    i as f64 * step + start
}

/// The official `cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs,
/// start_warmup_value)` at iteration `it` (clamped into `[0, total_iters)`).
pub fn cosine_at(
    base: f64,
    final_value: f64,
    total_iters: i64,
    warmup_iters: i64,
    start_warmup: f64,
    it: i64,
) -> f64 {
    let it = it.clamp(0, (total_iters - 1).max(0));
    if it < warmup_iters {
        return linspace_at(start_warmup, base, warmup_iters, it);
    }
    let n = total_iters - warmup_iters;
    if n <= 0 {
        return base;
    }
    let j = (it - warmup_iters) as f64;
    let cos = (std::f64::consts::PI * j / n as f64).cos();
    final_value + 0.5 * (base - final_value) * (1.0 + cos)
}

/// All schedule values that one iteration uses.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScheduleValues {
    /// Global iteration index `it`.
    pub step: i64,
    /// `it / I`.
    pub epoch: i64,
    pub lr: f64,
    /// Weight decay of group 0 (group 1 always 0).
    pub weight_decay: f64,
    /// Teacher EMA momentum `m_it`.
    pub momentum: f64,
    /// Teacher temperature `τ_t(epoch)`.
    pub teacher_temp: f64,
}

/// The schedules of one run, fixed by the configuration, the iterations per epoch and the world
/// size (the global batch `B_g = batch_size_per_worker · W`).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedules {
    /// `lr · B_g / 256` (the linear scaling rule; `min_lr` is not scaled).
    pub lr_base: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    pub momentum_teacher: f64,
    pub warmup_teacher_temp: f64,
    pub teacher_temp: f64,
    pub warmup_teacher_temp_epochs: i64,
    /// `I`, iterations per epoch (`floor(N / B_g)` with `drop_last`).
    pub niter_per_epoch: i64,
    pub epochs: i64,
    /// `warmup_epochs · I`.
    pub warmup_iters: i64,
}

impl Schedules {
    /// Schedules of `cfg` for `niter_per_epoch` iterations per epoch and `world_size` workers.
    pub fn new(cfg: &TrainConfig, niter_per_epoch: i64, world_size: usize) -> Result<Self> {
        if niter_per_epoch < 1 {
            return Err(DinoError::Config(format!(
                "iterations per epoch must be >= 1, got {niter_per_epoch}"
            )));
        }
        let global_batch = cfg.train.batch_size_per_worker * world_size as i64;
        let o = &cfg.optim;
        Ok(Schedules {
            lr_base: o.lr * global_batch as f64 / 256.0,
            min_lr: o.min_lr,
            weight_decay: o.weight_decay,
            weight_decay_end: o.weight_decay_end,
            momentum_teacher: o.momentum_teacher,
            warmup_teacher_temp: cfg.loss.warmup_teacher_temp,
            teacher_temp: cfg.loss.teacher_temp,
            warmup_teacher_temp_epochs: cfg.loss.warmup_teacher_temp_epochs,
            niter_per_epoch,
            epochs: cfg.train.epochs,
            warmup_iters: o.warmup_epochs * niter_per_epoch,
        })
    }

    /// `T = epochs · I`.
    pub fn total_iters(&self) -> i64 {
        self.epochs * self.niter_per_epoch
    }

    pub fn epoch_of(&self, it: i64) -> i64 {
        it / self.niter_per_epoch
    }

    pub fn lr(&self, it: i64) -> f64 {
        cosine_at(
            self.lr_base,
            self.min_lr,
            self.total_iters(),
            self.warmup_iters,
            0.0,
            it,
        )
    }

    pub fn weight_decay(&self, it: i64) -> f64 {
        cosine_at(
            self.weight_decay,
            self.weight_decay_end,
            self.total_iters(),
            0,
            0.0,
            it,
        )
    }

    pub fn momentum(&self, it: i64) -> f64 {
        cosine_at(self.momentum_teacher, 1.0, self.total_iters(), 0, 0.0, it)
    }

    /// `τ_t(e)`: `linspace(warmup, final, E_w)[e]` for `e < E_w`, `final` afterwards.
    pub fn teacher_temp(&self, epoch: i64) -> f64 {
        if epoch < self.warmup_teacher_temp_epochs {
            linspace_at(
                self.warmup_teacher_temp,
                self.teacher_temp,
                self.warmup_teacher_temp_epochs,
                epoch,
            )
        } else {
            self.teacher_temp
        }
    }

    /// Every value of iteration `it`.
    pub fn at(&self, it: i64) -> ScheduleValues {
        let epoch = self.epoch_of(it);
        ScheduleValues {
            step: it,
            epoch,
            lr: self.lr(it),
            weight_decay: self.weight_decay(it),
            momentum: self.momentum(it),
            teacher_temp: self.teacher_temp(epoch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_endpoints() {
        assert_eq!(linspace_at(0.0, 1.0, 5, 0), 0.0);
        assert_eq!(linspace_at(0.0, 1.0, 5, 2), 0.5);
        assert_eq!(linspace_at(0.0, 1.0, 5, 4), 1.0);
        assert_eq!(linspace_at(0.04, 0.07, 1, 0), 0.04);
    }

    #[test]
    fn warmup_starts_at_zero_and_reaches_base() {
        // 10 warm-up iterations of a 100-iteration run.
        assert_eq!(cosine_at(2.0, 0.1, 100, 10, 0.0, 0), 0.0);
        assert_eq!(cosine_at(2.0, 0.1, 100, 10, 0.0, 9), 2.0);
        // First cosine iteration is the base value again (cos 0 = 1).
        assert_eq!(cosine_at(2.0, 0.1, 100, 10, 0.0, 10), 2.0);
        // Clamped past the end.
        let last = cosine_at(2.0, 0.1, 100, 10, 0.0, 99);
        assert_eq!(cosine_at(2.0, 0.1, 100, 10, 0.0, 1000), last);
        assert!(last > 0.1 && last < 0.101);
    }
}
