//! Bounds and cross-field rules. Each failure names the field as a dotted path, so the same
//! message works for a TOML file, an environment variable and a gRPC job spec.

use crate::{Arch, Centering, PrototypeKind, TrainConfig};

/// A configuration value outside its allowed range; `field` is the dotted key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        message: message.into(),
    }
}

fn int_in(field: &str, v: i64, lo: i64, hi: i64) -> Result<(), FieldError> {
    if v < lo || v > hi {
        return Err(err(field, format!("{v} is outside [{lo}, {hi}]")));
    }
    Ok(())
}

fn float_in(field: &str, v: f64, lo: f64, hi: f64) -> Result<(), FieldError> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(err(field, format!("{v} is outside [{lo}, {hi}]")));
    }
    Ok(())
}

fn scale_pair(field: &str, s: [f64; 2]) -> Result<(), FieldError> {
    if !(s[0].is_finite() && s[1].is_finite() && 0.0 < s[0] && s[0] <= s[1] && s[1] <= 1.0) {
        return Err(err(
            field,
            format!("{s:?} must satisfy 0 < min <= max <= 1"),
        ));
    }
    Ok(())
}

impl TrainConfig {
    /// Check every bound and rule; the first violation is returned.
    pub fn validate(&self) -> Result<(), FieldError> {
        let m = &self.model;
        if m.arch.is_vit() {
            if ![4, 8, 14, 16].contains(&m.patch_size) {
                return Err(err(
                    "model.patch_size",
                    format!("{} is not one of 4, 8, 14, 16", m.patch_size),
                ));
            }
            int_in("model.img_size", m.img_size, 16, 1024)?;
            if m.img_size % m.patch_size != 0 {
                return Err(err(
                    "model.img_size",
                    format!(
                        "{} is not a multiple of model.patch_size {}",
                        m.img_size, m.patch_size
                    ),
                ));
            }
        }
        float_in("model.drop_path_rate", m.drop_path_rate, 0.0, 0.9)?;
        int_in("model.depth", m.depth, 0, 64)?;

        let h = &self.head;
        int_in("head.out_dim", h.out_dim, 2, 1 << 20)?;
        int_in("head.hidden_dim", h.hidden_dim, 1, 1 << 16)?;
        int_in("head.bottleneck_dim", h.bottleneck_dim, 2, 1 << 14)?;
        int_in("head.nlayers", h.nlayers, 1, 8)?;
        if h.prototypes == PrototypeKind::Vmf && h.norm_last_layer {
            return Err(err(
                "head.norm_last_layer",
                "must be false when head.prototypes = \"vmf\": a vMF prototype carries its \
                 concentration in its norm, and with unit-norm rows every κ is equal and the \
                 log-normaliser cancels",
            ));
        }

        let l = &self.loss;
        float_in("loss.student_temp", l.student_temp, 1e-3, 10.0)?;
        float_in("loss.teacher_temp", l.teacher_temp, 1e-3, 10.0)?;
        float_in(
            "loss.warmup_teacher_temp",
            l.warmup_teacher_temp,
            1e-3,
            10.0,
        )?;
        int_in(
            "loss.warmup_teacher_temp_epochs",
            l.warmup_teacher_temp_epochs,
            0,
            100_000,
        )?;
        float_in("loss.center_momentum", l.center_momentum, 0.0, 1.0)?;

        let k = &self.koleo;
        float_in("koleo.weight", k.weight, 0.0, 100.0)?;
        float_in("koleo.eps", k.eps, 0.0, 1.0)?;
        int_in(
            "koleo.nn_refresh_interval",
            k.nn_refresh_interval,
            1,
            1_000_000,
        )?;
        int_in("koleo.block_rows", k.block_rows, 1, 1 << 20)?;

        let o = &self.optim;
        float_in("optim.lr", o.lr, 0.0, 100.0)?;
        float_in("optim.min_lr", o.min_lr, 0.0, 100.0)?;
        int_in("optim.warmup_epochs", o.warmup_epochs, 0, 100_000)?;
        float_in("optim.weight_decay", o.weight_decay, 0.0, 10.0)?;
        float_in("optim.weight_decay_end", o.weight_decay_end, 0.0, 10.0)?;
        float_in("optim.clip_grad", o.clip_grad, 0.0, 1e6)?;
        int_in("optim.freeze_last_layer", o.freeze_last_layer, 0, 100_000)?;
        float_in("optim.momentum_teacher", o.momentum_teacher, 0.0, 1.0)?;
        float_in("optim.adam_beta1", o.adam_beta1, 0.0, 0.999_999)?;
        float_in("optim.adam_beta2", o.adam_beta2, 0.0, 0.999_999_9)?;
        float_in("optim.adam_eps", o.adam_eps, 1e-12, 1.0)?;

        let c = &self.crops;
        int_in("crops.global_crop_size", c.global_crop_size, 8, 1024)?;
        scale_pair("crops.global_crops_scale", c.global_crops_scale)?;
        int_in("crops.local_crops_number", c.local_crops_number, 0, 64)?;
        int_in("crops.local_crop_size", c.local_crop_size, 8, 1024)?;
        scale_pair("crops.local_crops_scale", c.local_crops_scale)?;
        for (i, p) in c.blur_prob.iter().enumerate() {
            float_in(&format!("crops.blur_prob[{i}]"), *p, 0.0, 1.0)?;
        }
        float_in("crops.solarize_prob", c.solarize_prob, 0.0, 1.0)?;
        if m.arch.is_vit() {
            for (field, size) in [
                ("crops.global_crop_size", c.global_crop_size),
                ("crops.local_crop_size", c.local_crop_size),
            ] {
                if size % m.patch_size != 0 {
                    return Err(err(
                        field,
                        format!(
                            "{size} is not a multiple of model.patch_size {}",
                            m.patch_size
                        ),
                    ));
                }
            }
        }

        let d = &self.data;
        int_in("data.limit", d.limit, 0, i64::MAX)?;
        int_in("data.num_threads", d.num_threads, 1, 1024)?;
        int_in("data.prefetch_batches", d.prefetch_batches, 1, 1024)?;
        int_in("data.eval_resize", d.eval_resize, 8, 4096)?;
        int_in("data.eval_crop_size", d.eval_crop_size, 8, 4096)?;
        if d.eval_crop_size > d.eval_resize {
            return Err(err(
                "data.eval_crop_size",
                "must not exceed data.eval_resize",
            ));
        }
        if d.eval_train.is_empty() != d.eval_test.is_empty() {
            return Err(err(
                "data.eval_test",
                "data.eval_train and data.eval_test are given together or not at all",
            ));
        }

        let r = &self.train;
        int_in("train.epochs", r.epochs, 1, 100_000)?;
        int_in(
            "train.batch_size_per_worker",
            r.batch_size_per_worker,
            1,
            65_536,
        )?;
        int_in("train.max_steps", r.max_steps, 0, i64::MAX)?;
        int_in("train.threads", r.threads, 0, 1024)?;
        if !(r.device == "cpu"
            || r.device == "cuda"
            || r.device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<u32>().is_ok()))
        {
            return Err(err(
                "train.device",
                format!("{:?} is not cpu, cuda or cuda:N", r.device),
            ));
        }
        if r.output_dir.is_empty() {
            return Err(err("train.output_dir", "must not be empty"));
        }
        int_in(
            "train.checkpoint_every_steps",
            r.checkpoint_every_steps,
            0,
            i64::MAX,
        )?;
        int_in("train.checkpoint_keep", r.checkpoint_keep, 1, 1_000_000)?;
        int_in("train.log_every_steps", r.log_every_steps, 1, i64::MAX)?;

        let e = &self.eval;
        int_in("eval.knn_k", e.knn_k, 1, 10_000)?;
        float_in("eval.knn_temperature", e.knn_temperature, 1e-4, 100.0)?;
        if e.unique_eps.is_empty() {
            return Err(err("eval.unique_eps", "needs at least one threshold"));
        }
        for (i, v) in e.unique_eps.iter().enumerate() {
            float_in(&format!("eval.unique_eps[{i}]"), *v, 0.0, 2.0)?;
        }
        int_in(
            "eval.analysis_every_steps",
            e.analysis_every_steps,
            0,
            i64::MAX,
        )?;
        int_in("eval.usage_images", e.usage_images, 0, 10_000_000)?;
        int_in("eval.knn_train_images", e.knn_train_images, 0, 100_000_000)?;
        int_in("eval.knn_test_images", e.knn_test_images, 0, 100_000_000)?;

        if m.arch == Arch::Resnet50 && m.small_input_stem && c.global_crop_size > 128 {
            return Err(err(
                "model.small_input_stem",
                "the small-input stem is for crops of at most 128 px",
            ));
        }
        if self.is_ibot() {
            self.validate_ibot()?;
        }
        Ok(())
    }

    /// The `[ibot]` section and the combinations iBOT defines (only with `loss.objective =
    /// "ibot"`).
    fn validate_ibot(&self) -> Result<(), FieldError> {
        if !self.model.arch.is_vit() {
            return Err(err(
                "loss.objective",
                "\"ibot\" needs a ViT backbone (model.arch vit_*): it masks patch tokens",
            ));
        }
        if self.loss.centering != Centering::Ema {
            return Err(err(
                "loss.centering",
                "iBOT defines only the EMA centres (`center`, `center2`); Sinkhorn-Knopp \
                 centring of masked patch tokens is DINOv2's different loss, not available here",
            ));
        }
        if self.head.use_bn {
            return Err(err(
                "head.use_bn",
                "must be false with loss.objective = \"ibot\": the head runs on every patch \
                 token, and BatchNorm over tokens is not the official DINO head",
            ));
        }
        let b = &self.ibot;
        if b.pred_ratio.is_empty() {
            return Err(err("ibot.pred_ratio", "needs at least one value"));
        }
        for (i, r) in b.pred_ratio.iter().enumerate() {
            float_in(&format!("ibot.pred_ratio[{i}]"), *r, 0.0, 1.0)?;
        }
        if b.pred_ratio_var.len() != 1 && b.pred_ratio_var.len() != b.pred_ratio.len() {
            return Err(err(
                "ibot.pred_ratio_var",
                format!(
                    "has {} values: give one, or one per ibot.pred_ratio value ({})",
                    b.pred_ratio_var.len(),
                    b.pred_ratio.len()
                ),
            ));
        }
        for (i, (r, v)) in b.pred_ratio.iter().zip(b.ratio_vars()).enumerate() {
            float_in(&format!("ibot.pred_ratio_var[{i}]"), v, 0.0, 1.0)?;
            if v > *r || r + v > 1.0 {
                return Err(err(
                    &format!("ibot.pred_ratio_var[{i}]"),
                    format!("{v} must satisfy var <= ratio and ratio + var <= 1 (ratio {r})"),
                ));
            }
        }
        let [lo, hi] = b.pred_aspect_ratio;
        if !(lo.is_finite() && hi.is_finite() && 0.0 < lo && lo <= hi) {
            return Err(err(
                "ibot.pred_aspect_ratio",
                format!("{:?} must satisfy 0 < min <= max", b.pred_aspect_ratio),
            ));
        }
        int_in("ibot.pred_start_epoch", b.pred_start_epoch, 0, 100_000)?;
        int_in("ibot.patch_out_dim", b.patch_out_dim, 2, 1 << 20)?;
        float_in("ibot.teacher_patch_temp", b.teacher_patch_temp, 1e-3, 10.0)?;
        float_in(
            "ibot.warmup_teacher_patch_temp",
            b.warmup_teacher_patch_temp,
            1e-3,
            10.0,
        )?;
        float_in("ibot.center_momentum2", b.center_momentum2, 0.0, 1.0)?;
        float_in("ibot.lambda1", b.lambda1, 0.0, 100.0)?;
        float_in("ibot.lambda2", b.lambda2, 0.0, 100.0)?;
        if b.shared_head && !b.shared_head_teacher {
            return Err(err(
                "ibot.shared_head_teacher",
                "must be true when ibot.shared_head = true: the student would have no \
                 last_layer2 to average into the teacher's, which would never change",
            ));
        }
        if !b.shared_head && b.shared_head_teacher && b.patch_out_dim != self.head.out_dim {
            return Err(err(
                "ibot.patch_out_dim",
                format!(
                    "{} must equal head.out_dim {} when the teacher's head is shared \
                     (ibot.shared_head_teacher = true) and the student's is not: the teacher's \
                     patch logits then come from its CLS prototypes",
                    b.patch_out_dim, self.head.out_dim
                ),
            ));
        }
        Ok(())
    }
}
