//! The DINO loss under the configured variants: `loss.centering` (EMA centre or Sinkhorn-Knopp,
//! [`crate::sinkhorn`]) and `head.prototypes` (plain or vMF logits, [`crate::vmf`]);
//! docs/algorithm.md §1.6, §1.10.
//!
//! | centring \ prototypes | `normalised` | `vmf` |
//! |---|---|---|
//! | `ema` | DINO: [`DinoLoss::loss`], unchanged | teacher `softmax((Z_t − c)/τ_t + b_t)`, student `log_softmax(Z_s/τ_s + b_s)` |
//! | `sinkhorn` | DINOv2's SK targets | SK targets, student `log_softmax(Z_s/τ_s + b_s)` |
//!
//! with `b_s = log C_d(‖w^s_k‖/τ_s)` from the student's prototypes (in the graph) and
//! `b_t = log C_d(‖w^t_k‖/τ_t)` from the teacher's (detached), each minus its maximum over k (a
//! constant of the softmax). Under Sinkhorn-Knopp the teacher's `b_t` is a factor per prototype
//! that the first per-prototype normalisation removes, so it is not computed.

use protodino_config::{Centering, PrototypeKind, TrainConfig};
use tch::Tensor;

use crate::error::Result;
use crate::loss::{DinoLoss, DinoLossOutput};
use crate::network::DinoNetwork;
use crate::reducer::Reducer;
use crate::sinkhorn::{SINKHORN_ITERATIONS, sinkhorn_knopp_teacher};
use crate::vmf::logit_correction;

/// The loss of one step and the bytes its forward-side collectives carried.
#[derive(Debug)]
pub struct VariantLoss {
    pub output: DinoLossOutput,
    /// Bytes all-reduced while forming the targets (Sinkhorn-Knopp in a group; else 0).
    pub all_reduce_bytes: u64,
}

/// Whether the configuration keeps (and updates) the EMA centre.
pub fn uses_ema_center(cfg: &TrainConfig) -> bool {
    cfg.loss.centering == Centering::Ema
}

/// `L_DINO` of crop-major student logits `[V·B, K]` and raw teacher logits `[2B, K]` under
/// `cfg`'s centring and prototype reading; `student` / `teacher` give the prototypes of the vMF
/// correction. With the defaults this is exactly [`DinoLoss::loss`].
#[allow(clippy::too_many_arguments)]
pub fn variant_loss<N: DinoNetwork>(
    loss: &DinoLoss,
    cfg: &TrainConfig,
    student: &N,
    teacher: &N,
    student_output: &Tensor,
    teacher_output: &Tensor,
    teacher_temp: f64,
    reducer: &dyn Reducer,
) -> Result<VariantLoss> {
    let vmf = cfg.head.prototypes == PrototypeKind::Vmf;
    if !vmf && uses_ema_center(cfg) {
        return Ok(VariantLoss {
            output: loss.loss(student_output, teacher_output, teacher_temp)?,
            all_reduce_bytes: 0,
        });
    }
    loss.check_teacher(teacher_output)?;
    let (targets, all_reduce_bytes) = match cfg.loss.centering {
        Centering::Ema => {
            let bias = if vmf {
                let protos = tch::no_grad(|| teacher.prototypes().detach());
                Some(logit_correction(&protos, teacher_temp)?)
            } else {
                None
            };
            (
                loss.centered_targets(teacher_output, teacher_temp, bias.as_ref()),
                0,
            )
        }
        Centering::Sinkhorn => {
            let sk =
                sinkhorn_knopp_teacher(teacher_output, teacher_temp, SINKHORN_ITERATIONS, reducer)?;
            (sk.targets, sk.all_reduce_bytes)
        }
    };
    let student_bias = if vmf {
        Some(logit_correction(&student.prototypes(), loss.student_temp)?)
    } else {
        None
    };
    Ok(VariantLoss {
        output: loss.loss_with_targets(student_output, &targets, student_bias.as_ref())?,
        all_reduce_bytes,
    })
}
