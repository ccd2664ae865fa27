//! Gradient handling between backward and the optimiser step (docs/algorithm.md §1.8 steps 5–6;
//! pitfalls 5, 6): per-parameter clipping and the gradient norms reported as metrics.
//!
//! Clipping is per tensor, not global: for each gradient `n = ‖grad‖₂`, `coef = clip/(n + 1e-6)`
//! computed as the official code does (`(n + 1e-6).reciprocal() · clip` in fp32, Python's
//! `__rtruediv__`), and the gradient is multiplied by `min(coef, 1)` — multiplying by exactly 1.0
//! leaves a gradient bit-identical, so this equals the official `if coef < 1` without a
//! device-to-host sync per tensor. The last-layer freeze is not done here by zeroing gradients:
//! the optimiser skips frozen parameters entirely (see `optim`).

use tch::{Kind, Tensor};

/// L2 norm of every defined gradient, in parameter order (undefined gradients are skipped),
/// as one fp32 tensor `[n]` (no host sync).
pub fn grad_norms(params: &[(String, Tensor)]) -> Tensor {
    let norms: Vec<Tensor> = params
        .iter()
        .filter_map(|(_, p)| {
            let g = p.grad();
            g.defined().then(|| g.norm().to_kind(Kind::Float))
        })
        .collect();
    if norms.is_empty() {
        Tensor::zeros([0], (Kind::Float, tch::Device::Cpu))
    } else {
        Tensor::stack(&norms, 0)
    }
}

/// Per-parameter clipping of every defined gradient to norm `clip` (no-op for `clip <= 0`).
/// Returns the norms before clipping (`[n]`, parameter order).
pub fn clip_gradients(params: &[(String, Tensor)], clip: f64) -> Tensor {
    tch::no_grad(|| {
        let norms = grad_norms(params);
        if clip > 0.0 {
            let mut i = 0;
            for (_, p) in params {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                let norm = norms.get(i);
                i += 1;
                let coef = (norm + 1e-6).reciprocal() * clip;
                let _ = g.g_mul_(&coef.clamp_max(1.0));
            }
        }
        norms
    })
}

/// √(Σ nᵢ²) of per-tensor norms: the global gradient norm, for metrics.
pub fn total_norm(norms: &Tensor) -> f64 {
    if norms.numel() == 0 {
        return 0.0;
    }
    norms
        .to_kind(Kind::Double)
        .square()
        .sum(Kind::Double)
        .sqrt()
        .double_value(&[])
}
