//! iBOT's masked-patch objective and its patch centre (docs/algorithm.md §5.4; `iBOTLoss` of
//! bytedance/ibot `main_ibot.py`).
//!
//! iBOT's loss is `λ₁·L_cls + λ₂·L_patch`:
//! * `L_cls` is DINO's loss on the CLS logits — every student crop against each teacher global
//!   crop of a *different* view, averaged over the `2V − 2` pairs — computed by
//!   [`crate::variants::variant_loss`] with the EMA centre `center` (`dino_loss.center`);
//! * `L_patch` pairs each global crop with *itself*: the teacher's patch targets
//!   `softmax((Z_t − c₂)/τ_t2)` on the unmasked crop against the student's
//!   `log_softmax(Z_s/τ_s)` on the masked one, token by token; per image the cross-entropies
//!   of the masked tokens are averaged (`Σ_p m_p ℓ_p / max(Σ_p m_p, 1)`: an image without a
//!   mask contributes 0), then averaged over the B images and over the 2 global crops.
//!
//! The patch centre `c₂` (`[1, 1, K₂]`, saved as `ibot_loss.center2`) follows
//! `c₂ ← m₂·c₂ + (1 − m₂)·Σ_rows mean_p Z_t / rows` after the step, its row sums riding in the
//! gradients' all-reduce with the CLS centre's (so a group's centre equals one big batch's).
//! With vMF prototypes the patch logits get the same correction as the CLS logits
//! ([`crate::vmf::logit_correction`]), from the patch prototype layer at τ_s / τ_t2.
//!
//! The patch teacher temperature follows iBOT's schedule: `τ_t2 = warmup` for the
//! `pred_start_epoch` epochs before masking starts, then `linspace(warmup, final, E_w)` over
//! `loss.warmup_teacher_temp_epochs`, then `final`.

use protodino_config::TrainConfig;
use tch::{Device, Kind, Tensor};

use crate::error::{DinoError, Result};
use crate::schedule::linspace_at;

/// The patch term and its parts.
#[derive(Debug)]
pub struct PatchLossOutput {
    /// `L_patch` (before λ₂), scalar fp32 in the student's graph.
    pub loss: Tensor,
    /// The same masked average of the targets' entropies (detached): `loss − target_entropy`
    /// is the masked mean KL(teacher ‖ student).
    pub target_entropy: Tensor,
    /// The term of each global crop (detached scalars).
    pub crop_terms: Vec<Tensor>,
}

/// iBOT's patch loss state: the temperatures, momenta, weights and the patch centre.
#[derive(Debug)]
pub struct IbotLoss {
    /// `τ_s` (shared with the CLS term).
    pub student_temp: f64,
    /// `m₂`.
    pub center_momentum2: f64,
    /// `λ₁`, `λ₂`.
    pub lambda1: f64,
    pub lambda2: f64,
    pub warmup_teacher_patch_temp: f64,
    pub teacher_patch_temp: f64,
    pub warmup_epochs: i64,
    pub pred_start_epoch: i64,
    /// `c₂`, `[1, 1, K₂]` fp32; saved as `ibot_loss.center2`.
    pub center2: Tensor,
}

impl IbotLoss {
    /// The patch loss of `cfg`, K₂ = the teacher's patch dimension, with a zero centre.
    pub fn new(cfg: &TrainConfig, patch_dim: i64, device: Device) -> Self {
        let b = &cfg.ibot;
        IbotLoss {
            student_temp: cfg.loss.student_temp,
            center_momentum2: b.center_momentum2,
            lambda1: b.lambda1,
            lambda2: b.lambda2,
            warmup_teacher_patch_temp: b.warmup_teacher_patch_temp,
            teacher_patch_temp: b.teacher_patch_temp,
            warmup_epochs: cfg.loss.warmup_teacher_temp_epochs,
            pred_start_epoch: b.pred_start_epoch,
            center2: Tensor::zeros([1, 1, patch_dim], (Kind::Float, device)),
        }
    }

    /// K₂ of the two patch logits (one per side in the official code; the same here).
    pub fn patch_dim(cfg: &TrainConfig) -> i64 {
        let b = &cfg.ibot;
        if b.shared_head_teacher {
            cfg.head.out_dim
        } else {
            b.patch_out_dim
        }
    }

    /// `τ_t2(epoch)` (`teacher_temp2_schedule`; past the end the final value).
    pub fn patch_temp(&self, epoch: i64) -> f64 {
        let (warm, fin, n) = (
            self.warmup_teacher_patch_temp,
            self.teacher_patch_temp,
            self.warmup_epochs,
        );
        let e = epoch - self.pred_start_epoch;
        if e < 0 {
            warm
        } else if e < n {
            linspace_at(warm, fin, n, e)
        } else {
            fin
        }
    }

    /// The teacher's patch targets `softmax((Z_t − c₂)/τ_t2 + bias)`, fp32, detached;
    /// `teacher_patch` `[2B, P, K₂]`, `bias` `[1, K₂]` (the vMF correction).
    pub fn patch_targets(
        &self,
        teacher_patch: &Tensor,
        temp2: f64,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let k2 = self.center2.size()[2];
        let s = teacher_patch.size();
        if s.len() != 3 || s[2] != k2 || s[0] % 2 != 0 {
            return Err(DinoError::Shape(format!(
                "teacher patch logits of shape {s:?}: [2B, P, {k2}] expected"
            )));
        }
        let z = (teacher_patch.to_kind(Kind::Float) - &self.center2) / temp2;
        let z = match bias {
            None => z,
            Some(b) => z + b.reshape([1, 1, -1]),
        };
        Ok(z.softmax(-1, Kind::Float).detach())
    }

    /// `L_patch` of the student's patch logits `[2B, P, K₂]` (of the masked crops) against the
    /// targets `[2B, P, K₂]` and the student's masks `[2B, P]` (global-1 rows, then global-2);
    /// `student_bias` `[1, K₂]` (the vMF correction, in the graph) is added to `Z_s/τ_s`.
    pub fn patch_loss(
        &self,
        student_patch: &Tensor,
        targets: &Tensor,
        masks: &Tensor,
        student_bias: Option<&Tensor>,
    ) -> Result<PatchLossOutput> {
        let (ss, ts, ms) = (student_patch.size(), targets.size(), masks.size());
        if ss != ts || ss.len() != 3 || ms.as_slice() != &ss[..2] || ss[0] % 2 != 0 {
            return Err(DinoError::Shape(format!(
                "patch logits {ss:?}, targets {ts:?} and masks {ms:?} do not fit [2B, P, K₂] / [2B, P]"
            )));
        }
        let s = student_patch.to_kind(Kind::Float) / self.student_temp;
        let s = match student_bias {
            None => s,
            Some(b) => s + b.reshape([1, 1, -1]),
        };
        let log_p = s.log_softmax(-1, Kind::Float);
        let m = masks.to_kind(Kind::Float);
        // Per token, then the masked mean per image, then the mean over images — per crop.
        let ce = (-targets * log_p).sum_dim_intlist(-1, false, Kind::Float);
        let ent = (-targets.xlogy(targets)).sum_dim_intlist(-1, false, Kind::Float);
        let per_image = |x: &Tensor, m: &Tensor| {
            (x * m).sum_dim_intlist(-1, false, Kind::Float)
                / m.sum_dim_intlist(-1, false, Kind::Float).clamp_min(1.0)
        };
        let (ce, ent, m) = (ce.chunk(2, 0), ent.chunk(2, 0), m.chunk(2, 0));
        let mut total: Option<Tensor> = None;
        let mut entropy: Option<Tensor> = None;
        let mut crop_terms = Vec::with_capacity(2);
        for q in 0..2 {
            let term = per_image(&ce[q], &m[q]).mean(Kind::Float);
            let h = per_image(&ent[q], &m[q]).mean(Kind::Float).detach();
            crop_terms.push(term.detach());
            total = Some(match total {
                None => term,
                Some(t) => t + term,
            });
            entropy = Some(match entropy {
                None => h,
                Some(e) => e + h,
            });
        }
        let two = 2.0;
        Ok(PatchLossOutput {
            loss: total.expect("two crops") / two,
            target_entropy: entropy.expect("two crops") / two,
            crop_terms,
        })
    }

    /// This worker's part of the `c₂` update: `Σ_rows mean_p Z_t` `[1, 1, K₂]` (f32) of its
    /// teacher patch logits `[2B, P, K₂]` (the row count is the CLS centre's).
    pub fn center2_stats(teacher_patch: &Tensor) -> Tensor {
        tch::no_grad(|| {
            teacher_patch
                .detach()
                .to_kind(Kind::Float)
                .mean_dim(1, false, Kind::Float)
                .sum_dim_intlist(0, true, Kind::Float)
                .unsqueeze(0)
        })
    }

    /// The EMA step of `c₂` from the group's summed [`Self::center2_stats`] and row count.
    pub fn apply_center2(&mut self, sum: &Tensor, count: &Tensor) {
        tch::no_grad(|| {
            let batch = sum / count.squeeze();
            self.center2 =
                &self.center2 * self.center_momentum2 + batch * (1.0 - self.center_momentum2);
        });
    }
}

/// The student's masks of a batch as one `[2B, P]` bool tensor (global-1 rows, then global-2).
pub fn stacked_masks(masks: &[Tensor], device: Device) -> Tensor {
    Tensor::cat(masks, 0).flatten(1, -1).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TrainConfig {
        let mut c = TrainConfig::defaults().unwrap();
        c.loss.warmup_teacher_temp_epochs = 3;
        c.ibot.warmup_teacher_patch_temp = 0.04;
        c.ibot.teacher_patch_temp = 0.07;
        c
    }

    #[test]
    fn patch_temperature_follows_the_official_schedule() {
        let mut c = cfg();
        let l = IbotLoss::new(&c, 4, Device::Cpu);
        let t: Vec<f64> = (0..5).map(|e| l.patch_temp(e)).collect();
        assert_eq!(t[0], 0.04);
        assert!((t[1] - 0.055).abs() < 1e-15);
        assert_eq!(&t[2..], &[0.07, 0.07, 0.07]);
        c.ibot.pred_start_epoch = 2;
        let l = IbotLoss::new(&c, 4, Device::Cpu);
        let t: Vec<f64> = (0..7).map(|e| l.patch_temp(e)).collect();
        assert_eq!(&t[..3], &[0.04, 0.04, 0.04]);
        assert!((t[3] - 0.055).abs() < 1e-15);
        assert_eq!(&t[4..], &[0.07, 0.07, 0.07]);
    }

    #[test]
    fn unmasked_images_contribute_zero_and_masked_tokens_average() {
        let l = IbotLoss::new(&cfg(), 5, Device::Cpu);
        let opts = (Kind::Float, Device::Cpu);
        let (b, p, k) = (2, 3, 5);
        let tz = Tensor::randn([2 * b, p, k], opts);
        let sz = Tensor::randn([2 * b, p, k], opts);
        let t = l.patch_targets(&tz, 0.07, None).unwrap();
        // Only image 0 of crop 0 has masked tokens (0 and 2).
        let mut m = vec![false; (2 * b * p) as usize];
        m[0] = true;
        m[2] = true;
        let masks = Tensor::from_slice(&m).view([2 * b, p]);
        let out = l.patch_loss(&sz, &t, &masks, None).unwrap();
        let ce = (-&t * (&sz / 0.1).log_softmax(-1, Kind::Float)).sum_dim_intlist(
            -1,
            false,
            Kind::Float,
        );
        let want = (ce.double_value(&[0, 0]) + ce.double_value(&[0, 2])) / 2.0 / b as f64 / 2.0;
        assert!((out.loss.double_value(&[]) - want).abs() < 1e-6);
        assert!(out.loss.double_value(&[]) >= out.target_entropy.double_value(&[]));
        assert_eq!(out.crop_terms[1].double_value(&[]), 0.0);
    }
}
