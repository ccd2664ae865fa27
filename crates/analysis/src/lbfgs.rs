//! Limited-memory BFGS with a backtracking (Armijo) line search, for the smooth, strongly
//! convex objectives of the evaluations (L2-regularised logistic regression). Works on a flat
//! f64 tensor; the caller supplies the value and the gradient.
//!
//! Why L-BFGS: full-batch quasi-Newton reaches a tight gradient tolerance on these small
//! problems (a few thousand samples) in tens to hundreds of iterations, deterministically,
//! where SGD-type solvers would need a tolerance heuristic. Curvature pairs with
//! `sᵀy ≤ 1e-12·yᵀy` are skipped so the inverse-Hessian estimate stays positive definite;
//! a non-descent direction resets the memory to steepest descent. The run also ends when a step
//! has not lowered the objective beyond f64 resolution five times in a row (`converged` then tells whether the
//! gradient tolerance was met).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::Result;

/// Options of [`minimize`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LbfgsOptions {
    /// Curvature pairs kept.
    pub history: usize,
    pub max_iter: usize,
    /// Stop when `‖∇f‖_∞ ≤ grad_tol`.
    pub grad_tol: f64,
}

impl Default for LbfgsOptions {
    fn default() -> Self {
        LbfgsOptions {
            history: 10,
            max_iter: 1000,
            grad_tol: 1e-6,
        }
    }
}

/// Outcome of [`minimize`].
#[derive(Debug)]
pub struct LbfgsResult {
    pub x: Tensor,
    pub value: f64,
    pub grad_inf_norm: f64,
    pub iterations: usize,
    /// Whether the gradient tolerance was met (otherwise the iteration or line-search limit
    /// ended the run).
    pub converged: bool,
}

fn dot(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(a.f_dot(b)?.f_double_value(&[])?)
}

fn inf_norm(g: &Tensor) -> Result<f64> {
    Ok(g.f_abs()?.f_max()?.f_double_value(&[])?)
}

/// Minimise `f` from `x0` (a flat f64 tensor). `f` returns `(value, gradient)`.
pub fn minimize<F>(mut f: F, x0: &Tensor, opts: &LbfgsOptions) -> Result<LbfgsResult>
where
    F: FnMut(&Tensor) -> Result<(f64, Tensor)>,
{
    let _guard = tch::no_grad_guard();
    let mut x = x0.f_to_kind(Kind::Double)?.f_reshape([-1])?;
    let (mut fx, mut g) = f(&x)?;
    let mut memory: VecDeque<(Tensor, Tensor, f64)> = VecDeque::new();
    let mut iterations = 0;
    let mut stalled = 0;
    let mut gnorm = inf_norm(&g)?;
    while iterations < opts.max_iter && gnorm > opts.grad_tol {
        // Two-loop recursion: d = −H·g.
        let mut q = g.copy();
        let mut alphas = Vec::with_capacity(memory.len());
        for (s, y, rho) in memory.iter().rev() {
            let a = rho * dot(s, &q)?;
            q = q.f_sub(&y.f_mul_scalar(a)?)?;
            alphas.push(a);
        }
        if let Some((s, y, _)) = memory.back() {
            q = q.f_mul_scalar(dot(s, y)? / dot(y, y)?)?;
        }
        for ((s, y, rho), a) in memory.iter().zip(alphas.into_iter().rev()) {
            let b = rho * dot(y, &q)?;
            q = q.f_add(&s.f_mul_scalar(a - b)?)?;
        }
        let mut d = q.f_neg()?;
        let mut slope = dot(&g, &d)?;
        if slope >= 0.0 {
            memory.clear();
            d = g.f_neg()?;
            slope = dot(&g, &d)?;
        }
        let mut step = if memory.is_empty() {
            (1.0 / g.f_abs()?.f_sum(Kind::Double)?.f_double_value(&[])?).min(1.0)
        } else {
            1.0
        };
        // Armijo backtracking.
        let mut accepted = None;
        for _ in 0..60 {
            let x_new = x.f_add(&d.f_mul_scalar(step)?)?;
            let (f_new, g_new) = f(&x_new)?;
            if f_new.is_finite() && f_new <= fx + 1e-4 * step * slope {
                accepted = Some((x_new, f_new, g_new));
                break;
            }
            step *= 0.5;
        }
        iterations += 1;
        let Some((x_new, f_new, g_new)) = accepted else {
            break; // no decrease possible at floating-point resolution
        };
        let s = x_new.f_sub(&x)?;
        let y = g_new.f_sub(&g)?;
        let sy = dot(&s, &y)?;
        let yy = dot(&y, &y)?;
        if sy > 1e-12 * yy && sy > 0.0 {
            memory.push_back((s, y, 1.0 / sy));
            if memory.len() > opts.history {
                memory.pop_front();
            }
        }
        if fx - f_new <= 4.0 * f64::EPSILON * fx.abs() {
            stalled += 1;
        } else {
            stalled = 0;
        }
        x = x_new;
        fx = f_new;
        g = g_new;
        gnorm = inf_norm(&g)?;
        if stalled >= 5 {
            break; // the objective no longer changes at f64 resolution
        }
    }
    Ok(LbfgsResult {
        x,
        value: fx,
        grad_inf_norm: gnorm,
        iterations,
        converged: gnorm <= opts.grad_tol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimises_an_ill_conditioned_quadratic() {
        // f(x) = ½ Σ a_i (x_i − 1)², condition number 1e4.
        let a = Tensor::from_slice(&[1.0f64, 10.0, 100.0, 1000.0, 10000.0]);
        let f = |x: &Tensor| -> Result<(f64, Tensor)> {
            let r = x - 1.0;
            let v = (&a * &r * &r).sum(Kind::Double).double_value(&[]) * 0.5;
            Ok((v, &a * &r))
        };
        let x0 = Tensor::zeros([5], (Kind::Double, tch::Device::Cpu));
        let opts = LbfgsOptions {
            grad_tol: 1e-10,
            ..Default::default()
        };
        let r = minimize(f, &x0, &opts).unwrap();
        assert!(r.converged, "{r:?}");
        let x = Vec::<f64>::try_from(&r.x).unwrap();
        for v in x {
            assert!((v - 1.0).abs() < 1e-9);
        }
    }
}
