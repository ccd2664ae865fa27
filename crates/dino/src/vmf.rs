//! DINO-vMF: the prototypes as von Mises–Fisher components (docs/algorithm.md §1.10).
//!
//! With `head.prototypes = "vmf"` the rows `w_k` of the prototype layer are not unit vectors
//! (`head.norm_last_layer = false`: `weight_g` is trained). Prototype k is read as a vMF
//! component on the unit sphere of the bottleneck (dimension d) with mean direction
//! `μ_k = w_k/‖w_k‖` and concentration `κ_k = ‖w_k‖/τ` at temperature τ; the logit
//! `w_k·y/τ = κ_k μ_k·y` of a normalised feature y then lacks only the component's log-normaliser,
//! which is added:
//!
//! `logit_k = w_k·y/τ + log C_d(κ_k)`,  `C_d(κ) = κ^{d/2−1} / ((2π)^{d/2} I_{d/2−1}(κ))`.
//!
//! It is added at each network's own temperature — `τ_s` with the student's rows for the student
//! logits, `τ_t` with the teacher's rows for the teacher targets — after the centre has been
//! subtracted (the centre keeps averaging the raw logits `w_k·y`).
//!
//! **Reconstructed, not verified against the authors' code** (their DINO-vMF code was not
//! available): the form of the correction and `κ_k = ‖w_k‖/τ` follow the paper's summary
//! (ALGORITHM.md §1.10); where it is added relative to the centre is this project's reading; the
//! paper's large-order Bessel approximation and its probability-space centring are not
//! reproduced — the log-normaliser here is computed to f64 accuracy instead (below), and the
//! centring is whichever `loss.centering` selects.
//!
//! **Computing `log C_d(κ)`.** With `ν = d/2 − 1`, `log C_d(κ) = ν ln κ − (ν+1) ln 2π − ln I_ν(κ)`
//! and `d/dκ log C_d(κ) = −I_{ν+1}(κ)/I_ν(κ)`. Both are computed in f64 for any `ν ≥ 0` and
//! `κ ≥ 0` without overflow (`I_127(5000)` is about e^4993):
//! * small κ (`κ² ≤ 4(ν+1)`): the power series of `I_ν(κ)/(κ/2)^ν`, whose terms shrink at least
//!   like `1/k!` there, so `log C_d` is taken without the `ν ln κ` cancellation and is exact at
//!   κ = 0 (the log of one over the sphere's area);
//! * otherwise: the uniform (Debye) asymptotic expansion of `ln I_L(κ)` at an order `L ≥ 40` with
//!   the terms `u_1 … u_6` (truncation below 1e−12 there), and for `ν < 40` the downward
//!   recurrence of the ratios `I_{j+1}/I_j = 1/(2(j+1)/κ + I_{j+2}/I_{j+1})` from L to ν, which is
//!   stable (each step damps an error by the squared ratio, < 1).
//!
//! The tests check both against SciPy (`scripts/vmf_log_normaliser.py` → a committed fixture).
//! In the training step the values and derivatives are computed on the CPU for the K norms and
//! enter the graph as `value + (κ − κ̂)·derivative` (κ̂ the detached κ): the forward value is the
//! f64 value (rounded to fp32), the gradient with respect to the prototypes the exact one.

use tch::{Device, Kind, Tensor};

use crate::error::{DinoError, Result};

/// Order from which the Debye expansion is used directly.
const DEBYE_MIN_ORDER: f64 = 40.0;

/// Numerators of the Debye polynomials `u_k(t)` (powers `t^k, t^{k+2}, …, t^{3k}`) and their
/// denominators; from the recurrence `u_{k+1} = ½t²(1−t²)u_k' + ⅛∫₀ᵗ(1−5s²)u_k(s)ds`
/// (Abramowitz & Stegun 9.3.9–9.3.10).
const DEBYE: [(f64, &[f64]); 6] = [
    (24.0, &[3.0, -5.0]),
    (1152.0, &[81.0, -462.0, 385.0]),
    (414720.0, &[30375.0, -369603.0, 765765.0, -425425.0]),
    (
        39813120.0,
        &[
            4465125.0,
            -94121676.0,
            349922430.0,
            -446185740.0,
            185910725.0,
        ],
    ),
    (
        6688604160.0,
        &[
            1519035525.0,
            -49286948607.0,
            284499769554.0,
            -614135872350.0,
            566098157625.0,
            -188699385875.0,
        ],
    ),
    (
        4815794995200.0,
        &[
            2757049477875.0,
            -127577298354750.0,
            1050760774457901.0,
            -3369032068261860.0,
            5104696716244125.0,
            -3685299006138750.0,
            1023694168371875.0,
        ],
    ),
];

/// `ln Γ(x)` for `x > 0`: the Stirling series once the argument is at least 15 (shifted up with
/// `Γ(x+1) = xΓ(x)`); error below 1e−15 relative.
pub fn ln_gamma(x: f64) -> f64 {
    let mut x = x;
    let mut shift = 0.0;
    while x < 15.0 {
        shift += x.ln();
        x += 1.0;
    }
    let inv = 1.0 / x;
    let inv2 = inv * inv;
    let series = inv
        * (1.0 / 12.0
            - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 * (1.0 / 1680.0 - inv2 / 1188.0))));
    (x - 0.5) * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI).ln() + series - shift
}

/// `ln I_ν(x)` by the uniform asymptotic expansion, for large ν and `x > 0`.
fn ln_bessel_i_debye(nu: f64, x: f64) -> f64 {
    let z = x / nu;
    let s = z.hypot(1.0);
    let t = 1.0 / s;
    // η = √(1+z²) + ln(z/(1+√(1+z²))) = √(1+z²) − asinh(1/z), without cancellation at large z.
    let eta = s - (1.0 / z).asinh();
    let t2 = t * t;
    let mut sum = 1.0;
    let mut nu_pow = 1.0;
    let mut t_pow = 1.0;
    for (den, coefs) in DEBYE.iter() {
        nu_pow /= nu;
        t_pow *= t;
        // Σ_j c_j t^{2j}, times t^k.
        let mut poly = 0.0;
        for c in coefs.iter().rev() {
            poly = poly * t2 + c;
        }
        sum += poly * t_pow / den * nu_pow;
    }
    nu * eta - 0.5 * (2.0 * std::f64::consts::PI * nu).ln() - 0.5 * s.ln() + sum.ln()
}

/// `Σ_k (x²/4)^k / (k! (a+1)_k)` (the power series of `Γ(a+1) I_a(x)/(x/2)^a`).
fn bessel_series(a: f64, x: f64) -> f64 {
    let q = 0.25 * x * x;
    let mut term = 1.0;
    let mut sum = 1.0;
    for k in 1..200 {
        let k = k as f64;
        term *= q / (k * (a + k));
        sum += term;
        if term < 1e-17 * sum {
            break;
        }
    }
    sum
}

/// Whether `(ν, x)` is in the power-series region.
fn in_series_region(nu: f64, x: f64) -> bool {
    x * x <= 4.0 * (nu + 1.0)
}

/// `(ln I_ν(x), I_{ν+1}(x)/I_ν(x))` for `ν ≥ 0`, `x > 0` outside the series region.
fn ln_bessel_i_large(nu: f64, x: f64) -> (f64, f64) {
    if nu >= DEBYE_MIN_ORDER {
        let a = ln_bessel_i_debye(nu, x);
        let b = ln_bessel_i_debye(nu + 1.0, x);
        return (a, (b - a).exp());
    }
    let steps = (DEBYE_MIN_ORDER - nu).ceil();
    let top = nu + steps;
    let mut ln_i = ln_bessel_i_debye(top, x);
    let mut ratio = (ln_bessel_i_debye(top + 1.0, x) - ln_i).exp();
    // From order j + 1 down to j: r_j = 1/(2(j+1)/x + r_{j+1}), ln I_j = ln I_{j+1} − ln r_j.
    for step in (0..steps as i64).rev() {
        let j = nu + step as f64;
        ratio = 1.0 / (2.0 * (j + 1.0) / x + ratio);
        ln_i -= ratio.ln();
    }
    (ln_i, ratio)
}

/// `ln I_ν(x)` and the ratio `I_{ν+1}(x)/I_ν(x)` for `ν ≥ 0`, `x ≥ 0` (`ln I_ν(0)` is −∞ for
/// ν > 0 and 0 for ν = 0; the ratio at 0 is 0).
pub fn ln_bessel_i_and_ratio(nu: f64, x: f64) -> (f64, f64) {
    if x == 0.0 {
        return (if nu == 0.0 { 0.0 } else { f64::NEG_INFINITY }, 0.0);
    }
    if in_series_region(nu, x) {
        let s0 = bessel_series(nu, x);
        let s1 = bessel_series(nu + 1.0, x);
        let ln_i = nu * (0.5 * x).ln() - ln_gamma(nu + 1.0) + s0.ln();
        (ln_i, 0.5 * x / (nu + 1.0) * s1 / s0)
    } else {
        ln_bessel_i_large(nu, x)
    }
}

/// `log C_d(κ)` and its derivative `d/dκ log C_d(κ) = −I_{d/2}(κ)/I_{d/2−1}(κ)` for a dimension
/// `d ≥ 2` and finite `κ ≥ 0` (NaN otherwise).
pub fn log_normaliser_and_derivative(d: i64, kappa: f64) -> (f64, f64) {
    if !kappa.is_finite() || kappa < 0.0 || d < 2 {
        return (f64::NAN, f64::NAN);
    }
    let nu = 0.5 * d as f64 - 1.0;
    let ln_2pi = (2.0 * std::f64::consts::PI).ln();
    if in_series_region(nu, kappa) {
        // ν ln κ − ν ln(κ/2) cancels exactly: log C = ν ln 2 − (ν+1) ln 2π + ln Γ(ν+1) − ln S.
        let s0 = bessel_series(nu, kappa);
        let s1 = bessel_series(nu + 1.0, kappa);
        let value =
            nu * std::f64::consts::LN_2 - (nu + 1.0) * ln_2pi + ln_gamma(nu + 1.0) - s0.ln();
        (value, -0.5 * kappa / (nu + 1.0) * s1 / s0)
    } else {
        let (ln_i, ratio) = ln_bessel_i_large(nu, kappa);
        (nu * kappa.ln() - (nu + 1.0) * ln_2pi - ln_i, -ratio)
    }
}

/// `log C_d(κ)` (see [`log_normaliser_and_derivative`]).
pub fn log_normaliser(d: i64, kappa: f64) -> f64 {
    log_normaliser_and_derivative(d, kappa).0
}

/// Inputs from which the values are computed on several threads.
const PARALLEL_MIN: usize = 8192;

/// [`log_normaliser_and_derivative`] of every κ, split over the available cores for large
/// inputs (K = 65 536 prototypes).
pub fn log_normalisers(d: i64, kappas: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut values = vec![0.0; kappas.len()];
    let mut derivs = vec![0.0; kappas.len()];
    let fill = |ks: &[f64], vs: &mut [f64], ds: &mut [f64]| {
        for ((k, v), g) in ks.iter().zip(vs.iter_mut()).zip(ds.iter_mut()) {
            (*v, *g) = log_normaliser_and_derivative(d, *k);
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if kappas.len() < PARALLEL_MIN || threads < 2 {
        fill(kappas, &mut values, &mut derivs);
    } else {
        let chunk = kappas.len().div_ceil(threads);
        std::thread::scope(|s| {
            for ((ks, vs), ds) in kappas
                .chunks(chunk)
                .zip(values.chunks_mut(chunk))
                .zip(derivs.chunks_mut(chunk))
            {
                s.spawn(move || fill(ks, vs, ds));
            }
        });
    }
    (values, derivs)
}

/// `log C_d(κ)` of every element of `kappa` (any shape), computed in f64 on the CPU and
/// returned in κ's dtype and device (NaN where κ is NaN, infinite or negative); minus `max_k log C_d(κ_k)` when `subtract_max` (a constant
/// that cancels in a softmax over k and keeps the f32 values small). Differentiable with
/// respect to κ: the result is `value + (κ − κ̂)·derivative`.
pub fn log_normaliser_tensor(kappa: &Tensor, d: i64, subtract_max: bool) -> Result<Tensor> {
    let host: Vec<f64> = Vec::<f64>::try_from(
        kappa
            .detach()
            .to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )?;
    // A NaN or infinite κ (diverged prototypes) gives NaN here, so the step's loss is not
    // finite and the step aborts with its replay files, as for any other non-finite loss.
    let (mut values, derivs) = log_normalisers(d, &host);
    if subtract_max {
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        for v in &mut values {
            *v -= max;
        }
    }
    let shape = kappa.size();
    let opts = |v: &[f64]| {
        Tensor::from_slice(v)
            .reshape(shape.as_slice())
            .to_kind(kappa.kind())
            .to_device(kappa.device())
    };
    let value = opts(&values);
    if kappa.requires_grad() {
        Ok(value + (kappa - kappa.detach()) * opts(&derivs))
    } else {
        Ok(value)
    }
}

/// The vMF logit correction `log C_d(‖w_k‖/τ) − max_j log C_d(‖w_j‖/τ)`, `[1, K]` fp32, of the
/// effective prototypes `w` `[K, d]` at temperature τ; in the graph of `w` when `w` requires
/// gradient. Add it to `logits/τ` before the softmax.
pub fn logit_correction(prototypes: &Tensor, temp: f64) -> Result<Tensor> {
    let d = match prototypes.size().as_slice() {
        [_, d] => *d,
        s => {
            return Err(DinoError::Shape(format!(
                "prototypes must be [K, d], got {s:?}"
            )));
        }
    };
    tch::autocast(false, || {
        let kappa = prototypes
            .to_kind(Kind::Float)
            .norm_scalaropt_dim(2, [1i64].as_slice(), false)
            / temp;
        Ok(log_normaliser_tensor(&kappa, d, true)?.unsqueeze(0))
    })
}

/// `‖w_k‖` of the effective prototypes (detached, fp32, `[K]`): `κ_k·τ`.
pub fn prototype_norms(prototypes: &Tensor) -> Tensor {
    tch::no_grad(|| {
        prototypes
            .detach()
            .to_kind(Kind::Float)
            .norm_scalaropt_dim(2, [1i64].as_slice(), false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    #[test]
    fn ln_gamma_matches_factorials_and_half_integers() {
        let mut fact = 1.0f64;
        for n in 1..30 {
            assert!(close(ln_gamma(n as f64), fact.ln(), 1e-14), "Γ({n})");
            fact *= n as f64;
        }
        let sqrt_pi = std::f64::consts::PI.sqrt();
        assert!(close(ln_gamma(0.5), sqrt_pi.ln(), 1e-14));
        assert!(close(ln_gamma(1.5), (0.5 * sqrt_pi).ln(), 1e-14));
    }

    #[test]
    fn closed_forms_of_d_2_and_3() {
        // d = 3: C_3(κ) = κ / (4π sinh κ); d/dκ log C_3 = 1/κ − coth κ.
        for &k in &[1e-3, 0.1, 1.0, 2.449, 2.45, 5.0, 30.0, 300.0] {
            let (v, g) = log_normaliser_and_derivative(3, k);
            let ln_sinh = k + (-(-2.0 * k).exp()).ln_1p() - std::f64::consts::LN_2;
            let want = k.ln() - (4.0 * std::f64::consts::PI).ln() - ln_sinh;
            assert!(close(v, want, 1e-13), "κ {k}: {v} vs {want}");
            let want_g = 1.0 / k - 1.0 / k.tanh();
            assert!(close(g, want_g, 1e-11), "κ {k}: {g} vs {want_g}");
        }
        // d = 2 at κ = 0: −ln 2π; d = 3 at κ = 0: −ln 4π (one over the sphere's area).
        assert!(close(
            log_normaliser(2, 0.0),
            -(2.0 * std::f64::consts::PI).ln(),
            1e-14
        ));
        assert!(close(
            log_normaliser(3, 0.0),
            -(4.0 * std::f64::consts::PI).ln(),
            1e-14
        ));
    }

    #[test]
    fn series_and_asymptotic_regions_agree_at_the_border() {
        for d in [2i64, 8, 16, 64, 256, 1024] {
            let nu = 0.5 * d as f64 - 1.0;
            let border = (4.0 * (nu + 1.0)).sqrt();
            let (a, ga) = log_normaliser_and_derivative(d, border * (1.0 - 1e-12));
            let (b, gb) = log_normaliser_and_derivative(d, border * (1.0 + 1e-12));
            assert!(close(a, b, 1e-11), "d {d}: {a} vs {b}");
            assert!(close(ga, gb, 1e-9), "d {d}: {ga} vs {gb}");
        }
    }

    #[test]
    fn derivative_is_the_finite_difference() {
        for d in [2i64, 3, 8, 256] {
            for &k in &[0.5, 3.0, 17.0, 90.0, 700.0, 4000.0] {
                let h = 1e-5 * k;
                let fd = (log_normaliser(d, k + h) - log_normaliser(d, k - h)) / (2.0 * h);
                let (_, g) = log_normaliser_and_derivative(d, k);
                assert!(close(g, fd, 1e-6), "d {d} κ {k}: {g} vs {fd}");
            }
        }
    }

    #[test]
    fn huge_concentrations_stay_finite() {
        let (v, g) = log_normaliser_and_derivative(256, 1e6);
        assert!(v.is_finite() && g.is_finite() && g < 0.0 && g > -1.0);
        assert!(log_normaliser(256, -1.0).is_nan());
    }

    #[test]
    fn tensor_form_has_the_f64_value_and_the_exact_gradient() {
        let kappa = Tensor::from_slice(&[0.0f64, 2.0, 40.0, 400.0]).set_requires_grad(true);
        let out = log_normaliser_tensor(&kappa, 16, false).unwrap();
        for (i, &k) in [0.0, 2.0, 40.0, 400.0].iter().enumerate() {
            assert_eq!(out.double_value(&[i as i64]), log_normaliser(16, k));
        }
        out.sum(Kind::Double).backward();
        for (i, &k) in [0.0, 2.0, 40.0, 400.0].iter().enumerate() {
            let (_, g) = log_normaliser_and_derivative(16, k);
            assert_eq!(kappa.grad().double_value(&[i as i64]), g);
        }
        let shifted = log_normaliser_tensor(&kappa.detach(), 16, true).unwrap();
        assert_eq!(shifted.max().double_value(&[]), 0.0);
        assert!(!shifted.requires_grad());
        let bad = Tensor::from_slice(&[1.0f32, f32::NAN, f32::INFINITY]);
        let out = log_normaliser_tensor(&bad, 16, true).unwrap();
        assert_eq!(out.double_value(&[0]), 0.0);
        assert!(out.double_value(&[1]).is_nan() && out.double_value(&[2]).is_nan());
    }

    #[test]
    fn parallel_and_serial_evaluation_agree() {
        let ks: Vec<f64> = (0..20_000).map(|i| i as f64 * 0.37).collect();
        let (v, g) = log_normalisers(256, &ks);
        for (i, k) in ks.iter().enumerate().step_by(997) {
            assert_eq!((v[i], g[i]), log_normaliser_and_derivative(256, *k));
        }
    }
}
