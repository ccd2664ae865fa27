//! The [`Reducer`] of CUDA tensors: NCCL through `protodino_collectives::NcclGroup`.
//!
//! Gradients are reduced in flat buckets (tensors of one element type concatenated up to
//! [`BUCKET_BYTES`], one `ncclAllReduce` each, like PyTorch DDP), the centre sums as one more
//! bucket. Everything runs on CUDA's legacy default stream, the one libtorch enqueues its kernels
//! on unless told otherwise, so NCCL sees the gradients after backward has written them and the
//! copies back into the gradients run after NCCL is done; each bucket is synchronised against the
//! group's deadline, so a dead or hung peer ends the step in a typed error
//! (`CollectiveError::is_peer_failure`) instead of NCCL's watchdog minutes.
//!
//! The communicator's unique id comes from the coordinator (`Assignment.nccl_unique_id`) or, when
//! that is empty, from rank 0, which generates one and broadcasts it over the TCP ring. A machine
//! without `libnccl.so` / `libcuda.so` compiles this and gets a clear error when a CUDA group is
//! asked for; nothing here runs on CPU-only machines (no GPU test runs in CI).

use std::cell::RefCell;
use std::time::Duration;

use anyhow::{Context, Result};
use protodino_collectives::nccl::MISSING_LIBRARIES;
use protodino_collectives::{
    CollectiveError, NcclDType, NcclGroup, NcclUniqueId, ReduceOp, nccl_available,
};
use protodino_dino::{DinoError, Reducer};
use tch::{Device, Kind, Tensor};

use crate::dist::Dist;

/// Largest flat bucket of one all-reduce (PyTorch DDP's default).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Progress deadline of every NCCL operation (as the ring's).
const TIMEOUT: Duration = Duration::from_secs(10);

/// NCCL reductions of the tensors of one CUDA device.
pub struct NcclReducer {
    group: RefCell<NcclGroup>,
    device: usize,
}

impl NcclReducer {
    /// Joins the communicator of `dist`'s group on CUDA device `device`.
    pub fn join(dist: &Dist, device: usize, coordinator_id: &[u8]) -> Result<Self> {
        if !nccl_available() {
            anyhow::bail!(
                "train.device is CUDA in a group of {} but NCCL is unavailable: {MISSING_LIBRARIES}",
                dist.world
            );
        }
        let id = if coordinator_id.is_empty() {
            // No id from the coordinator: rank 0 makes one and hands it round the ring.
            let mut bytes = if dist.rank == 0 {
                NcclUniqueId::generate()?.0.to_vec()
            } else {
                Vec::new()
            };
            dist.broadcast_bytes(&mut bytes, 0)
                .context("broadcasting the NCCL unique id")?;
            NcclUniqueId::from_bytes(&bytes)?
        } else {
            NcclUniqueId::from_bytes(coordinator_id)?
        };
        let group = NcclGroup::init(&id, dist.rank, dist.world, device as i32, TIMEOUT)
            .with_context(|| format!("joining the NCCL group on cuda:{device}"))?;
        Ok(Self {
            group: RefCell::new(group),
            device,
        })
    }

    fn reduce(&self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), DinoError> {
        let invalid = |what: String| DinoError::Collective(CollectiveError::InvalidArgument(what));
        for t in tensors.iter() {
            if t.device() != Device::Cuda(self.device) {
                return Err(invalid(format!(
                    "the NCCL reducer of cuda:{} got a tensor on {:?}",
                    self.device,
                    t.device()
                )));
            }
            if !matches!(t.kind(), Kind::Float | Kind::BFloat16) {
                return Err(invalid(format!(
                    "NCCL reduces f32 and bf16 tensors here; got {:?}",
                    t.kind()
                )));
            }
        }
        for kind in [Kind::Float, Kind::BFloat16] {
            let idx: Vec<usize> = (0..tensors.len())
                .filter(|&i| tensors[i].kind() == kind)
                .collect();
            for bucket in buckets(&idx, tensors, kind) {
                self.reduce_bucket(tensors, &bucket, kind, op)?;
            }
        }
        Ok(())
    }

    /// One all-reduce over the tensors `bucket` of `tensors` (a single contiguous tensor in
    /// place, several through a flat copy).
    fn reduce_bucket(
        &self,
        tensors: &mut [Tensor],
        bucket: &[usize],
        kind: Kind,
        op: ReduceOp,
    ) -> Result<(), DinoError> {
        let dtype = if kind == Kind::BFloat16 {
            NcclDType::Bf16
        } else {
            NcclDType::F32
        };
        let in_place = bucket.len() == 1 && tensors[bucket[0]].is_contiguous();
        let flat = if in_place {
            tensors[bucket[0]].shallow_clone()
        } else {
            let parts: Vec<Tensor> = bucket
                .iter()
                .map(|&i| tensors[i].detach().reshape([-1]))
                .collect();
            Tensor::cat(&parts, 0)
        };
        let numel = flat.numel();
        let stream = std::ptr::null_mut();
        let mut g = self.group.borrow_mut();
        // SAFETY: `flat` is a contiguous CUDA tensor of `numel` elements of `dtype` on this
        // rank's device, alive until the synchronise below returns; the null stream is CUDA's
        // legacy default stream, always valid.
        unsafe {
            g.all_reduce(flat.data_ptr() as u64, numel, dtype, op, stream)?;
            g.synchronize(stream)?;
        }
        drop(g);
        if !in_place {
            let mut offset = 0i64;
            tch::no_grad(|| {
                for &i in bucket {
                    let n = tensors[i].numel() as i64;
                    let part = flat.narrow(0, offset, n).view_as(&tensors[i]);
                    tensors[i].copy_(&part);
                    offset += n;
                }
            });
        }
        Ok(())
    }
}

/// Consecutive runs of `idx` whose bytes stay within [`BUCKET_BYTES`] (a larger tensor is a
/// bucket of its own).
fn buckets(idx: &[usize], tensors: &[Tensor], kind: Kind) -> Vec<Vec<usize>> {
    let elt = kind.elt_size_in_bytes();
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0usize;
    for &i in idx {
        let b = tensors[i].numel() * elt;
        match out.last_mut() {
            Some(last) if bytes + b <= BUCKET_BYTES => {
                last.push(i);
                bytes += b;
            }
            _ => {
                out.push(vec![i]);
                bytes = b;
            }
        }
    }
    out
}

impl Reducer for NcclReducer {
    fn world_size(&self) -> usize {
        self.group.borrow().world()
    }

    fn transport(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<(), DinoError> {
        self.reduce(tensors, ReduceOp::Sum)
    }

    /// NCCL's own average (each element divided once, on its final sum).
    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<(), DinoError> {
        self.reduce(tensors, ReduceOp::Average)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_at_the_byte_limit() {
        let n = BUCKET_BYTES / 4 / 2; // half a bucket of f32
        let t = |k: usize| Tensor::zeros([k as i64], (Kind::Float, Device::Cpu));
        let tensors = vec![t(n), t(n), t(n), t(3 * n), t(1)];
        let b = buckets(&[0, 1, 2, 3, 4], &tensors, Kind::Float);
        assert_eq!(b, vec![vec![0, 1], vec![2], vec![3], vec![4]]);
    }

    /// Where there is no NCCL (every CI machine), asking for a CUDA group says so clearly.
    #[test]
    fn a_cuda_group_without_nccl_is_a_clear_error() {
        if nccl_available() {
            eprintln!("NCCL present: the GPU path is exercised on GPU machines only");
            return;
        }
        let dist = Dist::solo();
        let err = match NcclReducer::join(&dist, 0, &[]) {
            Ok(_) => panic!("NCCL reported unavailable yet joined"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("NCCL is unavailable"), "{err}");
    }
}
