"""Reference values of the vMF log-normaliser for crates/dino/src/vmf.rs.

    log C_d(k) = (d/2 - 1) ln k - (d/2) ln(2 pi) - ln I_{d/2-1}(k)
    d/dk log C_d(k) = -I_{d/2}(k) / I_{d/2-1}(k)

computed independently of the Rust code, with SciPy: the exponentially scaled Bessel function
`scipy.special.ive` where its value is a normal double, and otherwise (large orders at small k,
where I_nu(k) is below 1e-300) the integral representation

    I_nu(x) = (x/2)^nu / (sqrt(pi) Gamma(nu + 1/2)) * int_{-1}^{1} (1 - t^2)^(nu - 1/2) e^(x t) dt

by adaptive quadrature (`scipy.integrate.quad`) around the integrand's peak, in logs. Where both
are available the script checks that they agree. At k = 0 the value is the limit, minus the log
of the area of the unit sphere S^{d-1}.

Rerun from the repository root with the Python reference environment (`cargo xtask pyref`
provisions it and prints its python):

    $(cargo xtask pyref) scripts/vmf_log_normaliser.py crates/dino/tests/fixtures/vmf_log_normaliser.json

The Rust test `log_normaliser_matches_scipy` (crates/dino/tests/golden_variants.rs) reads the
committed JSON, so the test suite needs no Python.
"""
import json
import math
import sys

import numpy as np
import scipy
from scipy import integrate, special

DIMS = [2, 3, 8, 16, 64, 256, 257, 768, 1024]
KAPPAS = [0.0, 1e-6, 1e-3, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 22.6, 23.0, 32.0, 64.0, 100.0,
          127.0, 128.0, 256.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0]


def ln_i_ive(nu, x):
    """ln I_nu(x) from ive, or None where ive is not a normal positive double."""
    v = special.ive(nu, x)
    if not (np.isfinite(v) and v > 1e-300):
        return None
    return math.log(v) + x


def ln_i_quad(nu, x):
    """ln I_nu(x) by quadrature of the integral representation (nu > 1/2, x > 0), in the variable
    s = 1 - t (so 1 - t^2 = s (2 - s) keeps its precision next to the peak at small s)."""
    a = nu - 0.5
    # Peak of a ln(s (2 - s)) - x s on (0, 2), the smaller root of x s^2 - 2(x + a) s + 2a.
    s_peak = 2 * a / ((x + a) + math.sqrt(x * x + a * a))

    def g(s):
        return a * (math.log(s) + math.log(2.0 - s)) - x * s if 0 < s < 2 else -math.inf

    top = g(s_peak)
    total, total_err = 0.0, 0.0
    edges = sorted({0.0, s_peak, 2.0} | {min(2.0, s_peak * f) for f in (0.1, 0.5, 2.0, 10.0)})
    for lo, hi in zip(edges, edges[1:]):
        if hi <= lo:
            continue
        # The integrand is at most 1 (it is scaled by its peak), so an absolute tolerance far
        # below the peak's own contribution suffices.
        val, err = integrate.quad(lambda s: math.exp(g(s) - top), lo, hi, epsabs=1e-16 * s_peak,
                                  epsrel=1e-13, limit=500)
        total += val
        total_err += err
    assert total_err <= 1e-12 * total, (nu, x, total, total_err)
    return (nu * math.log(x / 2) - 0.5 * math.log(math.pi) - special.gammaln(nu + 0.5)
            + x + top + math.log(total))


def ln_i(nu, x):
    v = ln_i_ive(nu, x)
    q = ln_i_quad(nu, x) if nu > 0.5 else None
    if v is not None and q is not None:
        assert abs(v - q) <= 1e-11 * max(1.0, abs(v)), (nu, x, v, q)
    if v is not None:
        return v, "ive"
    return q, "quad"


def main():
    out = sys.argv[1]
    rows = []
    for d in DIMS:
        nu = d / 2 - 1
        for k in KAPPAS:
            if k == 0.0:
                value = special.gammaln(d / 2) - math.log(2) - (d / 2) * math.log(math.pi)
                rows.append({"d": d, "kappa": k, "log_c": value, "dlog_c": 0.0,
                             "method": "limit"})
                continue
            a, how_a = ln_i(nu, k)
            b, how_b = ln_i(nu + 1, k)
            value = nu * math.log(k) - (nu + 1) * math.log(2 * math.pi) - a
            rows.append({"d": d, "kappa": k, "log_c": value, "dlog_c": -math.exp(b - a),
                         "method": how_a if how_a == how_b else f"{how_a}/{how_b}"})
    with open(out, "w") as f:
        json.dump({"scipy": scipy.__version__, "rows": rows}, f, indent=1)
        f.write("\n")
    print(f"{len(rows)} values written to {out}")


if __name__ == "__main__":
    main()
