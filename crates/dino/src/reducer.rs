//! The collective hook of a training step.
//!
//! The step calls a [`Reducer`] twice, both times before it updates anything: to sum the
//! members' sample counts (each weights its loss by its share `n_r / N`, so shares may be
//! uneven), and after backward to sum the weighted gradients together with the teacher-logit
//! row sums and row counts of the centre update (docs/algorithm.md §1.6). The worker implements it with real collectives (TCP ring, NCCL); this
//! crate only ships the trivial world of one, [`LocalReducer`].

use tch::Tensor;

use crate::error::Result;

/// All-reduce over a fixed group of workers. Tensors are reduced in place; after the call every
/// member holds the same values.
pub trait Reducer {
    /// Number of members of the group (W).
    fn world_size(&self) -> usize;
    /// How the reductions move data (`shm`, `tcp`, `nccl`…), for the metrics of the bytes
    /// they carry; `local` when nothing moves.
    fn transport(&self) -> &'static str {
        "local"
    }
    /// Element-wise sum over the group, in place.
    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()>;
    /// Element-wise mean over the group, in place (DDP's gradient averaging).
    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<()> {
        self.all_reduce_sum(tensors)?;
        let w = self.world_size();
        if w > 1 {
            tch::no_grad(|| {
                for t in tensors.iter_mut() {
                    let _ = t.g_div_scalar_(w as f64);
                }
            });
        }
        Ok(())
    }
}

/// A world of one: every reduction is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalReducer;

impl Reducer for LocalReducer {
    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _tensors: &mut [Tensor]) -> Result<()> {
        Ok(())
    }

    fn all_reduce_mean(&self, _tensors: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
}
