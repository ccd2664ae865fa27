//! Naming and grouping of parameters (docs/algorithm.md §1.7 groups, §1.8 freeze and EMA; pitfalls 6–9).
//!
//! A network's variables live in a tch `VarStore` under their official DINO names
//! (`student.backbone.cls_token`, `student.head.last_layer.weight_v`, …). Three questions are
//! answered here, all by name and shape so that they hold for any backbone:
//! * which variables are *parameters* (everything but BatchNorm buffers) — the EMA covers all
//!   of them, including a frozen `weight_g`;
//! * which parameters are *trainable* (`requires_grad`) — the optimiser sees only those;
//! * which group a trainable parameter is in: group 0 (decayed) unless its name ends in `.bias`
//!   or it is 1-D (then group 1, weight decay 0). `cls_token`, `pos_embed` and a trainable
//!   `weight_g` (K×1) are therefore decayed, as in the official code.

use tch::Tensor;
use tch::nn::VarStore;

/// BatchNorm buffers: variables that are neither trained nor EMA-ed.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

/// The prototype layer that `freeze_last_layer` skips (official test: the name contains
/// `last_layer`).
pub fn is_last_layer(name: &str) -> bool {
    name.contains("last_layer")
}

/// Group 0 (weight-decayed) membership of a trainable parameter.
pub fn is_regularized(name: &str, tensor: &Tensor) -> bool {
    !name.ends_with(".bias") && tensor.dim() > 1
}

/// All variables of a store, sorted by name (HashMap order is not deterministic).
pub fn named_variables(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Parameters (variables that are not buffers), sorted by name.
pub fn named_parameters(vs: &VarStore) -> Vec<(String, Tensor)> {
    named_variables(vs)
        .into_iter()
        .filter(|(n, _)| !is_buffer(n))
        .collect()
}

/// Trainable parameters (`requires_grad`), sorted by name.
pub fn trainable_parameters(vs: &VarStore) -> Vec<(String, Tensor)> {
    named_parameters(vs)
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect()
}

/// Buffers (BatchNorm running statistics), sorted by name.
pub fn named_buffers(vs: &VarStore) -> Vec<(String, Tensor)> {
    named_variables(vs)
        .into_iter()
        .filter(|(n, _)| is_buffer(n))
        .collect()
}

/// The name without its first component (`student.head.x` → `head.x`).
pub fn strip_root(name: &str) -> &str {
    name.split_once('.').map_or(name, |(_, rest)| rest)
}
