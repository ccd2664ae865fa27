//! Our own optimisers with exportable state (docs/algorithm.md §1.7; tch cannot export
//! its optimiser state, and the checkpoint, resume and state broadcast need it).
//!
//! * **AdamW** exactly as PyTorch's single-tensor path (the one PyTorch uses on CPU): per
//!   parameter a float step count, `p ← p·(1 − lr·wd)`, `m.lerp_(g, 1 − β₁)`,
//!   `v ← β₂v + (1 − β₂)·g·g`, `p ← p − (lr/(1 − β₁ᵗ))·m / (√v/√(1 − β₂ᵗ) + ε)`, with the bias
//!   corrections in f64 and every tensor operation in the same order as PyTorch so results agree
//!   to the last bits. tch 0.24's generated bindings expose neither `_foreach_*` nor
//!   `_fused_adamw_`, so the update is a handful of in-place ops per tensor; the only temporaries
//!   are the `(1 − β₂)·g·g` and `m·(−step)/denom` products.
//! * **SGD** (momentum 0.9, coupled L2 weight decay, PyTorch semantics: the first buffer is a
//!   copy of the gradient).
//! * **LARS** as the official DINO class: for non-1-D parameters `d = g + wd·p` scaled by the
//!   trust ratio `η‖p‖/‖d‖` (1 where a norm is 0); `μ ← 0.9μ + d`, `p ← p − lr·μ`.
//!
//! Two groups: group 0 (see `params::is_regularized`) gets the scheduled weight decay, group 1
//! none; both the scheduled lr. A parameter is skipped *entirely* — no state created or advanced,
//! no decay — when its gradient is undefined or when the caller's `skip` says so (the
//! `freeze_last_layer` rule), exactly like PyTorch with `grad = None`. State is created lazily at
//! a parameter's first update, so a frozen last layer starts its AdamW step count at 1 when it
//! thaws.

use std::collections::BTreeMap;

use protodino_config::{OptimConfig, OptimizerKind};
use tch::{Kind, Tensor};

use crate::error::{DinoError, Result};
use crate::params::is_regularized;

/// LARS momentum and trust coefficient (official defaults), SGD momentum.
pub const MOMENTUM: f64 = 0.9;
pub const LARS_ETA: f64 = 0.001;

/// Optimiser state of one parameter.
#[derive(Debug)]
pub enum ParamState {
    AdamW {
        /// Number of updates applied so far (PyTorch's `state['step']`).
        step: i64,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
    },
    Sgd {
        momentum_buffer: Tensor,
    },
    Lars {
        mu: Tensor,
    },
}

/// An optimiser over named parameters with per-step lr and weight decay.
#[derive(Debug)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// State by parameter name.
    pub state: BTreeMap<String, ParamState>,
}

impl Optimizer {
    pub fn new(cfg: &OptimConfig) -> Self {
        Optimizer {
            kind: cfg.optimizer,
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
            state: BTreeMap::new(),
        }
    }

    /// One step over `params` with learning rate `lr` (both groups) and weight decay
    /// `weight_decay` (group 0). Parameters for which `skip(name)` holds, or without a gradient,
    /// are left completely untouched.
    pub fn step(
        &mut self,
        params: &[(String, Tensor)],
        lr: f64,
        weight_decay: f64,
        skip: impl Fn(&str) -> bool,
    ) -> Result<()> {
        tch::no_grad(|| {
            for (name, p) in params {
                if skip(name) {
                    continue;
                }
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let wd = if is_regularized(name, p) {
                    weight_decay
                } else {
                    0.0
                };
                let mut p = p.shallow_clone();
                match self.kind {
                    OptimizerKind::Adamw => self.adamw(name, &mut p, &grad, lr, wd)?,
                    OptimizerKind::Sgd => self.sgd(name, &mut p, &grad, lr, wd)?,
                    OptimizerKind::Lars => self.lars(name, &mut p, &grad, lr, wd)?,
                }
            }
            Ok(())
        })
    }

    fn adamw(&mut self, name: &str, p: &mut Tensor, grad: &Tensor, lr: f64, wd: f64) -> Result<()> {
        let st = self
            .state
            .entry(name.to_string())
            .or_insert_with(|| ParamState::AdamW {
                step: 0,
                exp_avg: p.zeros_like(),
                exp_avg_sq: p.zeros_like(),
            });
        let ParamState::AdamW {
            step,
            exp_avg,
            exp_avg_sq,
        } = st
        else {
            return Err(state_mismatch(name, "AdamW"));
        };
        *step += 1;
        let t = *step as f64;
        if wd != 0.0 {
            let _ = p.g_mul_scalar_(1.0 - lr * wd);
        }
        let _ = exp_avg.lerp_(grad, 1.0 - self.beta1);
        let _ = exp_avg_sq.g_mul_scalar_(self.beta2);
        let _ = exp_avg_sq.g_add_(&((grad * (1.0 - self.beta2)) * grad));
        let bias_correction1 = 1.0 - self.beta1.powf(t);
        let bias_correction2 = 1.0 - self.beta2.powf(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.powf(0.5);
        let mut denom = exp_avg_sq.sqrt() / bias_correction2_sqrt;
        let _ = denom.g_add_scalar_(self.eps);
        let _ = p.g_add_(&((&*exp_avg * -step_size) / denom));
        Ok(())
    }

    fn sgd(&mut self, name: &str, p: &mut Tensor, grad: &Tensor, lr: f64, wd: f64) -> Result<()> {
        let d_p = if wd != 0.0 {
            grad + &*p * wd
        } else {
            grad.shallow_clone()
        };
        let d_p = match self.state.get_mut(name) {
            None => {
                let buf = d_p.detach().copy();
                let out = buf.shallow_clone();
                self.state.insert(
                    name.to_string(),
                    ParamState::Sgd {
                        momentum_buffer: buf,
                    },
                );
                out
            }
            Some(ParamState::Sgd { momentum_buffer }) => {
                let _ = momentum_buffer.g_mul_scalar_(MOMENTUM);
                let _ = momentum_buffer.g_add_(&d_p);
                momentum_buffer.shallow_clone()
            }
            Some(_) => return Err(state_mismatch(name, "SGD")),
        };
        let _ = p.g_add_(&(d_p * -lr));
        Ok(())
    }

    fn lars(&mut self, name: &str, p: &mut Tensor, grad: &Tensor, lr: f64, wd: f64) -> Result<()> {
        let mut dp = grad.shallow_clone();
        if p.dim() != 1 {
            dp = &dp + &*p * wd;
            let param_norm = p.norm();
            let update_norm = dp.norm();
            let one = param_norm.ones_like();
            let trust = (&param_norm * LARS_ETA) / &update_norm;
            // `torch.where(‖p‖ > 0, torch.where(‖d‖ > 0, trust, 1), 1)`; tch's
            // `a.where_self(cond, b)` is `torch.where(cond, a, b)`.
            let q = trust
                .where_self(&update_norm.gt(0.0), &one)
                .where_self(&param_norm.gt(0.0), &one);
            dp *= q;
        }
        let st = self
            .state
            .entry(name.to_string())
            .or_insert_with(|| ParamState::Lars { mu: p.zeros_like() });
        let ParamState::Lars { mu } = st else {
            return Err(state_mismatch(name, "LARS"));
        };
        let _ = mu.g_mul_scalar_(MOMENTUM);
        let _ = mu.g_add_(&dp);
        let _ = p.g_add_(&(&*mu * -lr));
        Ok(())
    }

    /// The state as named tensors for a checkpoint: `optimizer.exp_avg.<param>`,
    /// `optimizer.exp_avg_sq.<param>`, `optimizer.step.<param>` (int64 scalar) for AdamW,
    /// `optimizer.momentum_buffer.<param>` for SGD, `optimizer.mu.<param>` for LARS.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, st) in &self.state {
            match st {
                ParamState::AdamW {
                    step,
                    exp_avg,
                    exp_avg_sq,
                } => {
                    out.push((format!("optimizer.exp_avg.{name}"), exp_avg.shallow_clone()));
                    out.push((
                        format!("optimizer.exp_avg_sq.{name}"),
                        exp_avg_sq.shallow_clone(),
                    ));
                    out.push((format!("optimizer.step.{name}"), Tensor::from(*step)));
                }
                ParamState::Sgd { momentum_buffer } => out.push((
                    format!("optimizer.momentum_buffer.{name}"),
                    momentum_buffer.shallow_clone(),
                )),
                ParamState::Lars { mu } => {
                    out.push((format!("optimizer.mu.{name}"), mu.shallow_clone()))
                }
            }
        }
        out
    }

    /// Restore the state from checkpoint tensors (`name → tensor`, the keys of
    /// [`Optimizer::state_tensors`]); tensors of other prefixes are ignored. Parameters without
    /// state tensors start fresh.
    pub fn load_state_tensors(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        device: tch::Device,
    ) -> Result<()> {
        self.state.clear();
        let get = |key: String| {
            tensors
                .get(&key)
                .map(|t| t.to_device(device).to_kind(Kind::Float))
        };
        for key in tensors.keys() {
            let (kind_key, param) = match key.strip_prefix("optimizer.") {
                Some(rest) => match rest.split_once('.') {
                    Some(x) => x,
                    None => continue,
                },
                None => continue,
            };
            let st = match (self.kind, kind_key) {
                (OptimizerKind::Adamw, "exp_avg") => {
                    let exp_avg_sq = get(format!("optimizer.exp_avg_sq.{param}"));
                    let step = tensors.get(&format!("optimizer.step.{param}"));
                    match (exp_avg_sq, step) {
                        (Some(exp_avg_sq), Some(step)) => ParamState::AdamW {
                            step: step.int64_value(&[]),
                            exp_avg: tensors[key].to_device(device).to_kind(Kind::Float),
                            exp_avg_sq,
                        },
                        _ => {
                            return Err(DinoError::Shape(format!(
                                "optimizer state of {param} is incomplete"
                            )));
                        }
                    }
                }
                (OptimizerKind::Sgd, "momentum_buffer") => ParamState::Sgd {
                    momentum_buffer: tensors[key].to_device(device).to_kind(Kind::Float),
                },
                (OptimizerKind::Lars, "mu") => ParamState::Lars {
                    mu: tensors[key].to_device(device).to_kind(Kind::Float),
                },
                (_, "exp_avg" | "exp_avg_sq" | "step" | "momentum_buffer" | "mu") => {
                    if matches!(
                        (self.kind, kind_key),
                        (OptimizerKind::Adamw, "exp_avg_sq" | "step")
                    ) {
                        continue;
                    }
                    return Err(DinoError::Config(format!(
                        "checkpoint optimiser state `{key}` does not belong to {:?}",
                        self.kind
                    )));
                }
                _ => continue,
            };
            self.state.insert(param.to_string(), st);
        }
        Ok(())
    }
}

fn state_mismatch(name: &str, want: &str) -> DinoError {
    DinoError::Config(format!("optimiser state of {name} is not {want} state"))
}
