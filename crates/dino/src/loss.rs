//! The DINO loss with teacher centring and sharpening (docs/algorithm.md §1.5, §1.6; pitfalls 1–4, 11).
//!
//! Student and teacher outputs are crop-major (`[global-1 of all B images; global-2; local-1; …]`).
//! The loss averages the cross-entropies of the `2V − 2` (teacher crop `a`, student crop `v ≠ a`)
//! pairs, each a mean over the B images. Softmax and log-softmax run in fp32 whatever the dtype of
//! the logits (bf16 autocast on CUDA).
//!
//! The centre `c` ([1, K], zero at start) is *not* touched by [`DinoLoss::loss`]: the step sums
//! [`DinoLoss::center_stats`] over the group together with the gradients and calls
//! [`DinoLoss::apply_center`] after the optimiser step ([`DinoLoss::update_center`] does both for
//! a lone caller), with the raw teacher logits of both
//! global crops, so the loss of a step always uses the centre of the previous steps — exactly as
//! the official code, where the update happens at the end of the loss call — and a step aborted
//! for a non-finite loss leaves the centre untouched (it can be replayed). The update goes
//! through a [`Reducer`]: row sums and row counts are all-reduced, so
//! `c_batch = Σ_workers Σ_rows Z_t / (2B·W)`, also when workers hold different numbers of rows.

use tch::{Device, Kind, Tensor};

use crate::error::{DinoError, Result};
use crate::reducer::Reducer;

/// The loss value and its parts.
#[derive(Debug)]
pub struct DinoLossOutput {
    /// `L_DINO`, a scalar fp32 tensor in the student's autograd graph.
    pub loss: Tensor,
    /// `ℓ(a, v)` (detached scalars) for every used pair, in the official summation order
    /// (`a` outer, `v` inner). Kept as tensors so that no device sync happens per pair.
    pub pair_terms: Vec<((i64, i64), Tensor)>,
    /// Mean entropy (nats) of the centred, sharpened teacher targets (detached scalar);
    /// `loss − target_entropy` is the mean KL(teacher ‖ student).
    pub target_entropy: Tensor,
}

/// The DINO loss module: the temperatures, the number of crops and the centre buffer.
#[derive(Debug)]
pub struct DinoLoss {
    /// `τ_s` (0.1).
    pub student_temp: f64,
    /// `m_c` (0.9).
    pub center_momentum: f64,
    /// `V = 2 + L`.
    pub n_crops: i64,
    /// `c`, shape [1, K], fp32; saved as `dino_loss.center`.
    pub center: Tensor,
}

impl DinoLoss {
    /// A loss for `out_dim = K` prototypes with a zero centre.
    pub fn new(
        out_dim: i64,
        n_crops: i64,
        student_temp: f64,
        center_momentum: f64,
        device: Device,
    ) -> Self {
        DinoLoss {
            student_temp,
            center_momentum,
            n_crops,
            center: Tensor::zeros([1, out_dim], (Kind::Float, device)),
        }
    }

    /// `L_DINO` of crop-major student logits `[V·B, K]` and teacher logits `[2B, K]` at teacher
    /// temperature `teacher_temp`. The teacher side is detached.
    pub fn loss(
        &self,
        student_output: &Tensor,
        teacher_output: &Tensor,
        teacher_temp: f64,
    ) -> Result<DinoLossOutput> {
        self.check_teacher(teacher_output)?;
        let targets = self.centered_targets(teacher_output, teacher_temp, None);
        self.loss_with_targets(student_output, &targets, None)
    }

    /// The teacher's targets with the EMA centre, `softmax((Z_t − c)/τ_t + bias)` in fp32,
    /// detached; `logit_bias` `[1, K]` (the vMF correction) is added after the centring.
    pub fn centered_targets(
        &self,
        teacher_output: &Tensor,
        teacher_temp: f64,
        logit_bias: Option<&Tensor>,
    ) -> Tensor {
        let centered = (teacher_output.to_kind(Kind::Float) - &self.center) / teacher_temp;
        let centered = match logit_bias {
            None => centered,
            Some(b) => centered + b,
        };
        centered.softmax(-1, Kind::Float).detach()
    }

    /// The teacher output's shape against the centre and the crops.
    pub fn check_teacher(&self, teacher_output: &Tensor) -> Result<()> {
        let (rows_t, k_t) = dims2(teacher_output, "teacher output")?;
        let k = self.center.size()[1];
        if k_t != k || rows_t % 2 != 0 {
            return Err(DinoError::Shape(format!(
                "teacher output of {rows_t} rows and {k_t} columns (centre {k}): 2B rows of K expected"
            )));
        }
        Ok(())
    }

    /// `L_DINO` of crop-major student logits `[V·B, K]` against given teacher targets `[2B, K]`
    /// (rows of probabilities, detached: [`Self::centered_targets`] or Sinkhorn-Knopp's);
    /// `student_logit_bias` `[1, K]` (the vMF correction, in the graph) is added to the student's
    /// `Z_s/τ_s` before its log-softmax.
    pub fn loss_with_targets(
        &self,
        student_output: &Tensor,
        targets: &Tensor,
        student_logit_bias: Option<&Tensor>,
    ) -> Result<DinoLossOutput> {
        let (rows_s, k_s) = dims2(student_output, "student output")?;
        let (rows_t, k_t) = dims2(targets, "teacher targets")?;
        let k = self.center.size()[1];
        if k_s != k || k_t != k {
            return Err(DinoError::Shape(format!(
                "logits have {k_s} (student) / {k_t} (teacher) columns, the centre {k}"
            )));
        }
        if rows_t % 2 != 0 || rows_s != rows_t / 2 * self.n_crops {
            return Err(DinoError::Shape(format!(
                "student rows {rows_s} and teacher rows {rows_t} do not fit {} crops",
                self.n_crops
            )));
        }
        let student_out = student_output.to_kind(Kind::Float) / self.student_temp;
        let student_out = match student_logit_bias {
            None => student_out,
            Some(b) => student_out + b,
        };
        let student_out = student_out.chunk(self.n_crops, 0);
        let teacher_out = targets;
        // Mean entropy of the targets: each teacher crop meets V − 1 student crops, so the loss
        // is exactly this plus the mean KL(teacher ‖ student) that training lowers.
        let target_entropy = -teacher_out
            .xlogy(teacher_out)
            .sum_dim_intlist(-1, false, Kind::Float)
            .mean(Kind::Float);
        let teacher_out = teacher_out.chunk(2, 0);
        let mut total: Option<Tensor> = None;
        let mut pair_terms = Vec::with_capacity(2 * self.n_crops as usize - 2);
        for (iq, q) in teacher_out.iter().enumerate() {
            for (v, s) in student_out.iter().enumerate() {
                if v == iq {
                    continue;
                }
                let term = (-q * s.log_softmax(-1, Kind::Float))
                    .sum_dim_intlist(-1, false, Kind::Float)
                    .mean(Kind::Float);
                pair_terms.push(((iq as i64, v as i64), term.detach()));
                total = Some(match total {
                    None => term,
                    Some(t) => t + term,
                });
            }
        }
        let n_terms = pair_terms.len() as f64;
        let loss = total.ok_or_else(|| DinoError::Shape("no loss pairs (V < 2)".into()))? / n_terms;
        Ok(DinoLossOutput {
            loss,
            pair_terms,
            target_entropy,
        })
    }

    /// `c ← m_c·c + (1 − m_c)·c_batch` from the raw teacher logits `[2B, K]` of this worker;
    /// the row sums and the row count are all-reduced with `reducer` first.
    pub fn update_center(&mut self, teacher_output: &Tensor, reducer: &dyn Reducer) -> Result<()> {
        let mut parts = Self::center_stats(teacher_output)?;
        reducer.all_reduce_sum(&mut parts)?;
        let [sum, count] = parts;
        self.apply_center(&sum, &count);
        Ok(())
    }

    /// This worker's part of the centre update: the row sums `[1, K]` (f32) and the row count
    /// `[1]` of its teacher logits, to be summed over the group.
    pub fn center_stats(teacher_output: &Tensor) -> Result<[Tensor; 2]> {
        let (rows, _) = dims2(teacher_output, "teacher output")?;
        Ok(tch::no_grad(|| {
            let sum = teacher_output
                .detach()
                .to_kind(Kind::Float)
                .sum_dim_intlist(0, true, Kind::Float);
            let count = Tensor::from_slice(&[rows as f32]).to_device(sum.device());
            [sum, count]
        }))
    }

    /// The EMA step of the centre from the group's summed [`Self::center_stats`].
    pub fn apply_center(&mut self, sum: &Tensor, count: &Tensor) {
        tch::no_grad(|| {
            let batch_center = sum / count.squeeze();
            self.center =
                &self.center * self.center_momentum + batch_center * (1.0 - self.center_momentum);
        });
    }
}

fn dims2(t: &Tensor, what: &str) -> Result<(i64, i64)> {
    match t.size().as_slice() {
        [r, k] => Ok((*r, *k)),
        s => Err(DinoError::Shape(format!("{what} must be 2-D, got {s:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_target_entropy_plus_a_non_negative_kl() {
        let (k, b, v) = (16, 3, 4);
        let loss = DinoLoss::new(k, v, 0.1, 0.9, Device::Cpu);
        // Uniform targets: entropy ln K.
        let t = Tensor::zeros([2 * b, k], (Kind::Float, Device::Cpu));
        let s = Tensor::randn([v * b, k], (Kind::Float, Device::Cpu));
        let out = loss.loss(&s, &t, 0.04).unwrap();
        let h = out.target_entropy.double_value(&[]);
        assert!((h - (k as f64).ln()).abs() < 1e-5, "{h}");
        // Sharp targets: the loss still exceeds the entropy (KL ≥ 0), and equals it when the
        // student reproduces the targets exactly.
        let t = Tensor::randn([2 * b, k], (Kind::Float, Device::Cpu));
        let out = loss.loss(&s, &t, 0.04).unwrap();
        let (l, h) = (
            out.loss.double_value(&[]),
            out.target_entropy.double_value(&[]),
        );
        assert!(h > 0.0 && l > h, "loss {l} entropy {h}");
        let same = (&t / 0.04 * 0.1).repeat([v / 2, 1]);
        let out = loss.loss(&same, &t, 0.04).unwrap();
        let (l, h) = (
            out.loss.double_value(&[]),
            out.target_entropy.double_value(&[]),
        );
        assert!(l > h, "crops see the other global crop's target: KL > 0");
    }
}
