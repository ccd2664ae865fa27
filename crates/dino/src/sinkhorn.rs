//! Sinkhorn-Knopp centring of the teacher (`loss.centering = "sinkhorn"`, docs/algorithm.md
//! §1.6): DINOv2's `sinkhorn_knopp_teacher` in place of the EMA centre.
//!
//! With `Q = exp(Z_t/τ_t)` over the `N = 2B` teacher rows of every member (`N_g` in the group)
//! and the K prototypes, three iterations of: every prototype's total over the *group's* rows is
//! made `1/K` (the sums are all-reduced), then every row's total over the prototypes is made
//! `1/N_g` (local); finally the rows are scaled to sum to 1 and are the targets. No centre is
//! kept or updated (`dino_loss.center` stays as it is, zero in a fresh run).
//!
//! Numerics (a choice; exact arithmetic is unchanged). DINOv2 exponentiates `Z_t/τ_t` directly
//! and first divides by the grand total. Here every prototype's column is shifted by a constant
//! shared by the group before anything is exponentiated — a factor per prototype that the first
//! per-prototype normalisation cancels exactly, as it cancels the grand total, which is therefore
//! not formed — and the iterations run on `log Q`: the per-row step is a local `logsumexp`,
//! the per-prototype step sums `exp(log Q)` over the rows. With the shift every prototype's
//! first total is at least 1 (in a world of one the shift is the column maximum), and every later
//! total is at least `1/(K·N_g)`, so nothing underflows to zero or overflows, even for the large
//! unnormalised logits of vMF prototypes. In a group the shift is the mean of the members'
//! column maxima (one extra all-reduce of K + 1 floats, which also carries the row count, so
//! members may hold different numbers of rows).
//!
//! Collectives: in a group, `1 + n_iterations` all-reduces of K (+1) f32 values, all in the
//! forward — before anything is updated; none alone.

use tch::{Kind, Tensor};

use crate::error::{DinoError, Result};
use crate::reducer::Reducer;

/// DINOv2's number of Sinkhorn-Knopp iterations.
pub const SINKHORN_ITERATIONS: usize = 3;

/// Targets of a Sinkhorn-Knopp centring and what its collectives carried.
#[derive(Debug)]
pub struct SinkhornOutput {
    /// `[N, K]` fp32 probabilities (each row sums to 1), detached.
    pub targets: Tensor,
    /// Bytes all-reduced (0 in a world of one).
    pub all_reduce_bytes: u64,
}

/// DINOv2's `sinkhorn_knopp_teacher` on this member's raw teacher logits `[N, K]` at teacher
/// temperature `teacher_temp`; the per-prototype sums go through `reducer`.
pub fn sinkhorn_knopp_teacher(
    teacher_output: &Tensor,
    teacher_temp: f64,
    n_iterations: usize,
    reducer: &dyn Reducer,
) -> Result<SinkhornOutput> {
    let (rows, k) = match teacher_output.size().as_slice() {
        [r, k] => (*r, *k),
        s => {
            return Err(DinoError::Shape(format!(
                "teacher output must be 2-D, got {s:?}"
            )));
        }
    };
    if rows == 0 || k == 0 {
        return Err(DinoError::Shape(format!(
            "Sinkhorn-Knopp needs rows and prototypes, got [{rows}, {k}]"
        )));
    }
    let group = reducer.world_size() > 1;
    tch::no_grad(|| {
        tch::autocast(false, || {
            let logits = teacher_output.detach().to_kind(Kind::Float) / teacher_temp;
            let (max, _) = logits.max_dim(0, true);
            let mut bytes = 0u64;
            let (shift, total_rows) = if group {
                let count = Tensor::from_slice(&[rows as f32]).to_device(max.device());
                let mut parts = [max, count];
                reducer.all_reduce_sum(&mut parts)?;
                bytes += 4 * (k as u64 + 1);
                let [sum, count] = parts;
                let w = reducer.world_size() as f64;
                (sum / w, count.double_value(&[0]))
            } else {
                (max, rows as f64)
            };
            let (ln_k, ln_n) = ((k as f64).ln(), total_rows.ln());
            let mut log_q = logits - shift;
            for _ in 0..n_iterations {
                // Every prototype's total over the group's rows becomes 1/K.
                let mut col = [log_q.exp().sum_dim_intlist(0, true, Kind::Float)];
                if group {
                    reducer.all_reduce_sum(&mut col)?;
                    bytes += 4 * k as u64;
                }
                let [col] = col;
                log_q = log_q - col.log() - ln_k;
                // Every row's total over the prototypes becomes 1/N_g.
                log_q = &log_q - log_q.logsumexp([1i64].as_slice(), true) - ln_n;
            }
            // Rows scaled to sum to 1: the targets.
            let targets = (log_q + ln_n).exp();
            Ok(SinkhornOutput {
                targets,
                all_reduce_bytes: bytes,
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reducer::LocalReducer;
    use tch::Device;

    /// DINOv2's version, verbatim in its arithmetic (K-by-N layout), for comparison.
    fn plain(t: &Tensor, temp: f64, iters: usize) -> Tensor {
        let mut q = (t.to_kind(Kind::Double) / temp).exp().tr();
        let (k, n) = (q.size()[0] as f64, q.size()[1] as f64);
        q = &q / q.sum(Kind::Double);
        for _ in 0..iters {
            q = &q / q.sum_dim_intlist(1, true, Kind::Double) / k;
            q = &q / q.sum_dim_intlist(0, true, Kind::Double) / n;
        }
        (q * n).tr()
    }

    #[test]
    fn equals_the_plain_algorithm_and_has_its_marginals() {
        tch::manual_seed(5);
        let t = Tensor::randn([12, 7], (Kind::Float, Device::Cpu));
        let out = sinkhorn_knopp_teacher(&t, 0.1, 3, &LocalReducer).unwrap();
        assert_eq!(out.all_reduce_bytes, 0);
        let want = plain(&t, 0.1, 3);
        let err = (out.targets.to_kind(Kind::Double) - &want)
            .abs()
            .max()
            .double_value(&[]);
        assert!(err < 1e-6, "{err}");
        // Rows sum to 1; after many iterations the prototypes are used equally (N/K each).
        let rows = out.targets.sum_dim_intlist(1, false, Kind::Double);
        assert!((rows - 1.0).abs().max().double_value(&[]) < 1e-6);
        let many = sinkhorn_knopp_teacher(&t, 0.1, 200, &LocalReducer).unwrap();
        let cols = many.targets.sum_dim_intlist(0, false, Kind::Double);
        assert!((cols - 12.0 / 7.0).abs().max().double_value(&[]) < 1e-4);
    }

    /// Each member's tensors of the all-reduce under way, and the barrier of the two.
    type Shared = (std::sync::Barrier, std::sync::Mutex<[Vec<Vec<f32>>; 2]>);

    /// A member of an in-process group of two: every all-reduce sums the two members' values
    /// in rank order, so both get the same bits.
    struct Member {
        rank: usize,
        shared: std::sync::Arc<Shared>,
    }

    impl Reducer for Member {
        fn world_size(&self) -> usize {
            2
        }

        fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
            let (barrier, slots) = &*self.shared;
            slots.lock().unwrap()[self.rank] = tensors
                .iter()
                .map(|t| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap())
                .collect();
            barrier.wait();
            let sums: Vec<Vec<f32>> = {
                let s = slots.lock().unwrap();
                s[0].iter()
                    .zip(&s[1])
                    .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x + y).collect())
                    .collect()
            };
            barrier.wait();
            for (t, v) in tensors.iter_mut().zip(sums) {
                let size = t.size();
                *t = Tensor::from_slice(&v).reshape(size.as_slice());
            }
            Ok(())
        }
    }

    #[test]
    fn a_group_of_two_equals_one_member_with_the_whole_batch() {
        tch::manual_seed(8);
        let t = Tensor::randn([10, 9], (Kind::Float, Device::Cpu)) * 3.0;
        let whole = sinkhorn_knopp_teacher(&t, 0.05, 3, &LocalReducer).unwrap();
        // Uneven shares: 6 rows and 4 rows.
        let shared = std::sync::Arc::new((
            std::sync::Barrier::new(2),
            std::sync::Mutex::new([Vec::new(), Vec::new()]),
        ));
        let parts = [t.narrow(0, 0, 6), t.narrow(0, 6, 4)];
        let outs: Vec<SinkhornOutput> = std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .iter()
                .enumerate()
                .map(|(rank, part)| {
                    let member = Member {
                        rank,
                        shared: shared.clone(),
                    };
                    let part = part.shallow_clone();
                    s.spawn(move || sinkhorn_knopp_teacher(&part, 0.05, 3, &member).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(outs[0].all_reduce_bytes, 4 * (9 + 1) + 3 * 4 * 9);
        let joined = Tensor::cat(&[&outs[0].targets, &outs[1].targets], 0);
        let err = (joined - whole.targets).abs().max().double_value(&[]);
        assert!(err < 1e-6, "{err}");
    }

    #[test]
    fn huge_logits_do_not_overflow() {
        // exp(5000/0.04) overflows any float; the plain algorithm gives NaN, this does not.
        tch::manual_seed(6);
        let t = Tensor::randn([8, 5], (Kind::Float, Device::Cpu)) * 5000.0;
        let out = sinkhorn_knopp_teacher(&t, 0.04, 3, &LocalReducer).unwrap();
        assert!(out.targets.isfinite().all().int64_value(&[]) == 1);
        let rows = out.targets.sum_dim_intlist(1, false, Kind::Double);
        assert!((rows - 1.0).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn a_per_prototype_offset_cancels() {
        // What makes the vMF correction a no-op under Sinkhorn-Knopp: the first per-prototype
        // normalisation removes any factor per prototype.
        tch::manual_seed(7);
        let t = Tensor::randn([10, 6], (Kind::Float, Device::Cpu));
        let offset = Tensor::randn([1, 6], (Kind::Float, Device::Cpu)) * 0.3;
        let a = sinkhorn_knopp_teacher(&t, 0.07, 3, &LocalReducer).unwrap();
        let b = sinkhorn_knopp_teacher(&(&t + offset), 0.07, 3, &LocalReducer).unwrap();
        let err = (a.targets - b.targets).abs().max().double_value(&[]);
        assert!(err < 1e-6, "{err}");
    }
}
