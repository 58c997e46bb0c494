"""Approximate tensor attention by the polynomial method (docs/math.md §4-§5).

`exp` is replaced by a degree-`g` polynomial `p` (Taylor, or a Chebyshev fit on `[-R, R]`), so
`p(score)` factorises through monomial features and attention costs
`O((T + sum_j S_j) · r · Hv)` with `r = C(H+g, g)`, never forming a `T × S1 × S2` array.
Sequences are processed in chunks by `lax.scan`, carrying `r × (Hv+1)` sums (prefix sums under
causal/window masks), so memory is `O(chunk · r · Hv)`.

Error control: if every allowed score lies in `[-R, R]` and `p` has relative error
`eps = relative_error(polynomial, degree, R)` there, then every output entry satisfies
`|O~ - O| <= eps / (1 - eps) · (max - min over key tuples of the value product)`
`<= 2 eps / (1 - eps) · prod_j max|V_j|` (`output_error_bound`, `certified_error`).
Every call measures `R` from its inputs (`O(T·H)` max-norm reductions) and, by default, warns
(`PolynomialAccuracyWarning`) when `eps` exceeds a tolerance: see `attention(on_uncertified=)`
and `polynomial_certificate`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from tensorattn.kernels import causal_scan, cost, features, spine
from tensorattn.kernels.configs import (
    GRADIENTS,
    MAX_DEGREE,
    ON_UNCERTIFIED,
    POLYNOMIALS,
    PolynomialConfig,
)
from tensorattn.kernels.spine import AttentionSpec

__all__ = ["GRADIENTS", "MAX_DEGREE", "ON_UNCERTIFIED", "POLYNOMIALS", "PolynomialConfig"]
DEFAULT_DEGREE = 4
# Largest feature rank C(H+g, g) accepted (a clear error instead of an allocation failure).
MAX_RANK = 1 << 20
_GRID = 20001  # points at which a Chebyshev fit's relative error is evaluated
# Default largest certified relative error `eps` of the attention weights: the output error is
# then at most ~1% of the value range (`eps/(1-eps)·(max - min)`). The certificate is a
# worst case (Hölder bound on the scores), often orders of magnitude above the measured error,
# so a tighter default would flag inputs whose real error is fine; 1e-2 flags the grossly wrong.
DEFAULT_TOLERANCE = 1e-2
# Rounding: summing `p(s)` through the monomial features cancels terms as large as
# `sum_t |c_t| R^t` (= e^R for Taylor) down to `p(s) >= e^-R`, so the computed sums carry a
# relative error of up to about `ROUNDING_FACTOR · machine_epsilon · sum_t |c_t| R^t · e^R`
# (the factor covers the chained products and chunked sums). Measured float32 errors, T = 64 to
# 8192, H = 1 to 16, degree 4 to 36, stayed below 1/10 of this term (0.06 at most).
ROUNDING_FACTOR = 8


def rank_over_limit(head_dim: int, degree: int) -> str | None:
    """Why the features of this head dim and degree are too wide to run (their rank over
    `MAX_RANK`), or None."""
    r = cost.feature_rank(head_dim, degree)
    if r <= MAX_RANK:
        return None
    return f"rank C({head_dim}+{degree}, {degree}) = {r} > {MAX_RANK}"


class PolynomialAccuracyWarning(UserWarning):
    """The polynomial method ran on inputs where its certified error exceeds the tolerance."""


class PolynomialAccuracyError(ValueError):
    """`on_uncertified="error"`: the certified error of the call exceeds the tolerance."""


# ----------------------------------------------------------------------------------------------
# The polynomial and its error.


def coefficients(polynomial: str, degree: int, score_range: float | None = None) -> np.ndarray:
    """Power-basis coefficients `c_0..c_g` of `p(s) = sum_t c_t s^t` approximating `exp(s)`.

    "taylor": `1/t!`. "chebyshev": interpolation of `exp` at the `g+1` Chebyshev points of
    `[-R, R]` (near-minimax), which needs `score_range=R > 0`.
    """
    _check_polynomial(polynomial)
    if polynomial == "taylor":
        return np.array([1.0 / math.factorial(t) for t in range(degree + 1)])
    if score_range is None or not score_range > 0:
        raise ValueError(f"polynomial='chebyshev' needs a score_range R > 0, got {score_range!r}")
    cheb = np.polynomial.chebyshev.chebinterpolate(lambda x: np.exp(score_range * x), degree)
    in_x = np.polynomial.chebyshev.cheb2poly(cheb)  # power basis in x = s / R
    # cheb2poly drops trailing zero coefficients (a tiny leading term can round to zero).
    in_x = np.pad(in_x, (0, degree + 1 - in_x.size))
    return in_x / score_range ** np.arange(degree + 1)


def relative_error(polynomial: str, degree: int, R: float) -> float:
    """`max_{|s| <= R} |p(s) - e^s| / e^s` (for Chebyshev, of the fit on `[-R, R]`).

    Taylor: `h(s) = e^{-s} p(s) - 1` has `h' = -e^{-s} s^g / g!`, so `|h|` is largest at
    `s = ±R` and the value is exact. Chebyshev: the maximum over a 20001-point grid plus
    `spacing/2 · max|h'|` (a bound on what lies between grid points, to first order).
    """
    _check_polynomial(polynomial)
    R = float(R)
    if R < 0:
        raise ValueError(f"R must be >= 0, got {R}")
    return _error_on(coefficients(polynomial, degree, R), R, polynomial == "taylor")


def _error_on(c, R: float, taylor: bool) -> float:
    """`max_{|s| <= R} |p(s) e^-s - 1|` of the polynomial with coefficients `c` (inf if it
    overflows); `taylor`: the coefficients are Taylor's, whose error peaks at `±R`."""
    with np.errstate(over="ignore", invalid="ignore"):
        if taylor:
            s = np.array([-R, R])
            err = np.max(np.abs(np.polyval(c[::-1], s) * np.exp(-s) - 1.0))
        else:
            s = np.linspace(-R, R, _GRID)
            p = np.polyval(c[::-1], s)
            dp = np.polyval(np.polyder(c[::-1]), s) if len(c) > 1 else np.zeros_like(s)
            h = np.abs(p * np.exp(-s) - 1.0)
            dh = np.abs((dp - p) * np.exp(-s))
            err = np.max(h) + (s[1] - s[0]) / 2 * np.max(dh)
    return float(err) if np.isfinite(err) else math.inf


def select_degree(R: float, eps: float, polynomial: str = "taylor") -> int:
    """The smallest degree whose `relative_error` on `[-R, R]` is at most `eps`."""
    if not 0 < eps < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {eps!r}")
    for degree in range(MAX_DEGREE + 1):
        if relative_error(polynomial, degree, R) <= eps:
            return degree
    raise ValueError(
        f"no {polynomial} degree <= {MAX_DEGREE} reaches tolerance={eps} on [-{R}, {R}]; "
        "the bounded-entry condition fails at this size (use an exact kernel)"
    )


def score_bound(q, *keys, scale: float | None = None, per_batch: bool = False):
    """A data-dependent bound on `|score|` (docs/math.md §4, generalised Hölder):
    `scale · max||q||_2 · prod_{j<m} max||k_j||_inf · max||k_m||_2`.

    Call as `score_bound(q, k1, k2, scale)` or `score_bound(q, *keys, scale=...)`. Maxima run
    over positions and heads (and the batch, unless `per_batch`: then shape `[B]`).
    """
    if scale is None and keys and isinstance(keys[-1], (int, float)):
        keys, scale = keys[:-1], keys[-1]
    if not keys:
        raise ValueError("score_bound needs at least one key array")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    axes = (1, 2) if per_batch else (0, 1, 2)

    def top(x, norm):
        x = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
        n = jnp.sqrt(jnp.sum(x * x, -1)) if norm == 2 else jnp.max(jnp.abs(x), -1)
        return jnp.max(n, axis=axes, initial=0.0)  # initial: zero-size inputs

    bound = abs(scale) * top(q, 2) * top(keys[-1], 2)
    for k in keys[:-1]:
        bound = bound * top(k, "inf")
    return bound


def output_error_bound(eps: float, values, per_batch: bool = False):
    """Bound on `max|O~ - O|` when `p` has relative error `eps` on every allowed score:
    `eps/(1-eps) · max_l (max - min over key tuples of prod_j V_j[a_j, l])` (inf if eps >= 1).

    Why: `p = e^s (1 + δ)` with `|δ| <= eps` gives `P~ - P = P (δ - δ̄) / (1 + δ̄)`, whose
    entries sum to zero, so `|O~ - O| <= eps/(1-eps) · (max v - min v)`.
    """
    if eps >= 1:
        return np.inf
    axes = (1, 2) if per_batch else (0, 1, 2)
    lo = hi = None
    for v in values:
        v = np.asarray(v, np.float64)
        vmin, vmax = v.min(axis=axes), v.max(axis=axes)  # [.., Hv]
        if lo is None:
            lo, hi = vmin, vmax
        else:
            corners = np.stack([lo * vmin, lo * vmax, hi * vmin, hi * vmax])
            lo, hi = corners.min(0), corners.max(0)
    return eps / (1 - eps) * np.max(hi - lo, axis=-1)


def certified_error(
    q,
    keys,
    values,
    *,
    degree: int,
    scale: float | None = None,
    polynomial: str = "taylor",
    score_range: float | None = None,
    per_batch: bool = False,
):
    """Certified bound on `max|O~ - O|` of `attention` with these options on these inputs,
    rounding in the inputs' dtype included (`certificate(...).certified_error`)."""
    if polynomial == "chebyshev" and score_range is None:
        raise ValueError("polynomial='chebyshev' needs score_range")
    cert = certificate(
        q,
        keys,
        values,
        degree=degree,
        scale=scale,
        polynomial=polynomial,
        score_range=score_range,
        per_batch=per_batch,
    )
    return cert.certified_error


@dataclasses.dataclass(frozen=True)
class Certificate:
    """What the polynomial method guarantees for one call (`polynomial_certificate`).

    score_bound: `R >= |score|` for every key tuple (`score_bound`, masked keys left out).
    polynomial_error: `eps_p`, p's relative error on `[-R, R]` (`relative_error`).
    relative_error: `eps`, the certified relative error of every attention weight: `eps_p`
      plus rounding (`ROUNDING_FACTOR · machine epsilon` of the compute dtype times the
      cancellation `sum_t |c_t| R^t · e^R`, and half an ulp of the output dtype). The check
      in `attention` compares it with `tolerance`.
    certified_error: bound on `max|O~ - O|` over the output entries:
      `eps_p/(1-eps_p) · (max - min of the value products)` plus the rounding terms times
      `max|value product|` (inf once the polynomial's `eps_p >= 1`).
    Floats, or `[B]` arrays with `per_batch=True`.
    """

    score_bound: float | np.ndarray
    polynomial_error: float | np.ndarray
    relative_error: float | np.ndarray
    certified_error: float | np.ndarray
    degree: int
    polynomial: str
    tolerance: float

    @property
    def certified(self) -> bool:
        """Whether `relative_error <= tolerance` (for every batch row)."""
        return bool(np.all(np.asarray(self.relative_error) <= self.tolerance))

    def __str__(self) -> str:
        def fmt(x):
            x = np.asarray(x)
            return f"{float(x):.2g}" if x.ndim == 0 else f"max {float(np.max(x)):.2g}"

        nan = " (the inputs hold NaN/inf)" if np.any(np.isnan(self.score_bound)) else ""
        return (
            f"score bound R={fmt(self.score_bound)}{nan}, {self.polynomial} degree {self.degree}: "
            f"relative error <= {fmt(self.relative_error)} "
            f"({'within' if self.certified else 'above'} tolerance {self.tolerance:g}), "
            f"max|output error| <= {fmt(self.certified_error)}"
        )


def _data_stats(q, keys, values, masks, scale: float, per_batch: bool):
    """`(R, lo, hi)`: the score bound over valid keys (NaN where q or a valid key or value
    holds NaN/inf) and, per value set, the min and max of each value column over valid keys
    (`[m, Hv]`, or `[m, B, Hv]` with `per_batch`). Costs one pass of reductions over the
    inputs."""
    axes = (1, 2) if per_batch else (0, 1, 2)
    ct = _compute_dtype(jnp.result_type(q))

    def valid(x, m, fill):
        x = jnp.asarray(x, ct)
        return x if m is None else jnp.where(jnp.asarray(m)[:, :, None, None], x, fill)

    masks = (None,) * len(keys) if masks is None else masks
    keys = [valid(k, m, 0) for k, m in zip(keys, masks)]
    R = score_bound(jnp.asarray(q, ct), *keys, scale=scale, per_batch=per_batch)
    finite = [jnp.isfinite(jnp.asarray(q, ct))] + [jnp.isfinite(k) for k in keys]
    finite += [jnp.isfinite(valid(v, m, 0)) for v, m in zip(values, masks)]
    finite = [jnp.all(x, axis=tuple(range(int(per_batch), x.ndim))) for x in finite]
    R = jnp.where(math.prod(finite), R, jnp.nan)
    lo = [jnp.min(valid(v, m, jnp.inf), axes, initial=jnp.inf) for v, m in zip(values, masks)]
    hi = [jnp.max(valid(v, m, -jnp.inf), axes, initial=-jnp.inf) for v, m in zip(values, masks)]
    return R, jnp.stack(lo), jnp.stack(hi)


def _relative(R, c, taylor: bool, compute_dtype, out_dtype):
    """`(eps_p, arith, out_round, eps)` at score bound `R` (array): p's relative error, the
    compute dtype's rounding (see `ROUNDING_FACTOR`), the output dtype's half ulp, their sum."""
    R = np.asarray(R, np.float64)
    eps_p = np.vectorize(lambda r: _error_on(c, float(r), taylor), otypes=[np.float64])(R)
    out_round = float(jnp.finfo(out_dtype).eps) / 2
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        mass = np.polyval(np.abs(c)[::-1], R)  # sum_t |c_t| R^t >= the summed terms / tuple
        arith = ROUNDING_FACTOR * float(jnp.finfo(compute_dtype).eps) * mass * np.exp(R)
        arith = np.where(eps_p < 1, arith / (1 - eps_p), arith)  # err is inf anyway then
        rel = eps_p + arith + out_round
    return eps_p, arith, out_round, np.where(np.isnan(rel), np.inf, rel)


def _certify(R, lo, hi, *, coeffs, polynomial, compute_dtype, out_dtype, tolerance):
    """The `Certificate` (NumPy, float64) from `_data_stats`' `(R, lo, hi)`."""
    R = np.asarray(R, np.float64)
    c = np.asarray(coeffs, np.float64)
    eps_p, arith, out_round, rel = _relative(R, c, polynomial == "taylor", compute_dtype, out_dtype)
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    empty = lo > hi  # a value column with no valid key
    lo, hi = np.where(empty, 0.0, lo), np.where(empty, 0.0, hi)
    vlo, vhi = lo[0], hi[0]  # range of the products prod_j V_j[a_j, l]
    for a, b in zip(lo[1:], hi[1:]):
        corners = np.stack([vlo * a, vlo * b, vhi * a, vhi * b])
        vlo, vhi = corners.min(0), corners.max(0)
    spread = np.max(vhi - vlo, axis=-1, initial=0.0)
    top = np.max(np.maximum(np.abs(vlo), np.abs(vhi)), axis=-1, initial=0.0)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        err = (
            np.where(eps_p < 1, eps_p / (1 - eps_p) * spread, np.inf)
            + np.where(arith < 1, 2 * arith / (1 - arith) * top, np.inf)
            + out_round * top
        )

    def out(x):
        return float(x) if R.ndim == 0 else x

    return Certificate(
        score_bound=out(R),
        polynomial_error=out(eps_p),
        relative_error=out(rel),
        certified_error=out(err),
        degree=len(c) - 1,
        polynomial=polynomial,
        tolerance=tolerance,
    )


def certificate(
    q,
    keys,
    values,
    *,
    scale=None,
    key_masks=None,
    per_batch: bool = False,
    config: PolynomialConfig | None = None,
    causal: bool = False,
    window=None,
    implementation: str | None = "polynomial",
    **options,
) -> Certificate:
    """The `Certificate` of `higher_order_attention(q, keys, values,
    implementation="polynomial", ...)` with the same config (or `PolynomialConfig` fields as
    keyword `options`), computed from these inputs (concrete arrays; under `jit` the call
    itself checks and warns: here ValueError). The bound holds for every key tuple, so causal
    and window masks (accepted, ignored) only make it looser. `scale` may be an array, as in
    the call; `implementation` is accepted as in the call (only "polynomial")."""
    del causal, window
    if implementation not in (None, "polynomial"):
        raise ValueError(
            "the certificate is the polynomial method's (implementation='polynomial'), got "
            f"implementation={implementation!r}: the exact kernels need none"
        )
    leaves = jax.tree_util.tree_leaves((q, keys, values, key_masks, scale))
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        raise ValueError(
            "polynomial_certificate needs concrete arrays: call it outside jax.jit (and "
            "grad/vmap); under jit the attention call checks its own certificate "
            "(on_uncertified=)"
        )
    cfg = _config(config, options)
    keys, values = tuple(keys), tuple(values)
    m = len(keys)
    q, spec = spine.prepare_tuples(q, keys, values, causal=False, key_masks=key_masks, scale=scale)
    degree, R_fit, tol = _resolve(spec, q.shape[-1], m + 1, cfg)
    dtype = jnp.result_type(q)
    stats = _data_stats(q, keys, values, spec.key_masks, spec.scale, per_batch)
    return _certify(
        *stats,
        coeffs=coefficients(cfg.polynomial, degree, R_fit),
        polynomial=cfg.polynomial,
        compute_dtype=_compute_dtype(dtype),
        out_dtype=dtype,
        tolerance=tol,
    )


def _config(config: PolynomialConfig | None, options) -> PolynomialConfig:
    if config is None:
        return PolynomialConfig.from_mapping(options)
    if options:
        raise ValueError(
            f"give either config= or keyword options, not both (got {sorted(options)})"
        )
    if not isinstance(config, PolynomialConfig):
        raise ValueError(f"config must be a PolynomialConfig, got {type(config).__name__}")
    return config


def polynomial_certificate(
    q,
    k1,
    k2,
    v1,
    v2,
    *,
    scale=None,
    k1_mask=None,
    k2_mask=None,
    per_batch=False,
    config: PolynomialConfig | None = None,
    **options,
) -> Certificate:
    """`tensor_attention(q, k1, k2, v1, v2, implementation="polynomial", **options)`'s
    certificate on these inputs: score bound, certified relative and output error.

        cert = tensorattn.polynomial_certificate(q, k1, k2, v1, v2, degree=4)
        print(cert)  # score bound R=0.42, taylor degree 4: relative error <= 1.6e-05 ...
    """
    return certificate(
        q,
        (k1, k2),
        (v1, v2),
        scale=scale,
        key_masks=(k1_mask, k2_mask),
        per_batch=per_batch,
        config=config,
        **options,
    )


@dataclasses.dataclass(frozen=True)
class _Check:
    """Static part of one call's accuracy check."""

    coeffs: tuple
    polynomial: str
    compute_dtype: object
    out_dtype: object
    tolerance: float
    mode: str


def _report(check: _Check, R, lo, hi, stacklevel: int = 2):
    """Warns (or raises) when the certificate of one call is above its tolerance."""
    cert = _certify(
        R,
        lo,
        hi,
        coeffs=check.coeffs,
        polynomial=check.polynomial,
        compute_dtype=check.compute_dtype,
        out_dtype=check.out_dtype,
        tolerance=check.tolerance,
    )
    if cert.certified:
        return
    if np.isnan(cert.score_bound):
        msg = (
            "polynomial attention is not certified on these inputs: q, a key or a value holds "
            "NaN or inf at a valid position (score bound R=nan), so no error bound holds; the "
            "query rows it reaches are NaN, as with the exact kernels. Cause: non-finite "
            "inputs, not the degree. on_uncertified='ignore' silences this check, 'error' "
            "raises."
        )
        if check.mode == "error":
            raise PolynomialAccuracyError(msg)
        warnings.warn(msg, PolynomialAccuracyWarning, stacklevel=stacklevel)
        return
    r_max = _certified_range(check)
    dtype = jnp.dtype(check.out_dtype).name
    if r_max > 0:
        reach = f"which this degree certifies for score bounds up to R={r_max:.2g} in {dtype}"
    else:
        reach = f"which no score bound reaches at this degree in {dtype}"
    if cert.polynomial_error <= check.tolerance:
        why = f"{dtype} rounding: raise the tolerance or compute in a wider dtype"
    else:
        why = (
            "the scores are too large for this degree: bound the entries of q and the keys "
            "(e.g. TensorAttention(entry_bound=1.0)), raise the degree, or use an exact "
            "implementation"
        )
    # Two significant digits and no relative error: as R drifts in a training loop the text
    # repeats, and Python shows each distinct warning text once per location.
    msg = (
        f"polynomial attention is not certified on these inputs: score bound "
        f"R={cert.score_bound:.2g}, {check.polynomial} degree {cert.degree}, certified "
        f"max|output error| <= {cert.certified_error:.2g}; its relative error is above the "
        f"tolerance {check.tolerance:g}, {reach}. Cause: {why}. on_uncertified='ignore' "
        "silences this check, 'error' raises."
    )
    if check.mode == "error":
        raise PolynomialAccuracyError(msg)
    warnings.warn(msg, PolynomialAccuracyWarning, stacklevel=stacklevel)


@functools.lru_cache(maxsize=64)
def _certified_range(check: _Check) -> float:
    """Largest score bound `R` whose certified relative error is within the tolerance (0 if
    none; bisection, the error grows with R)."""
    c = np.asarray(check.coeffs, np.float64)

    def ok(r):
        rel = _relative(r, c, check.polynomial == "taylor", check.compute_dtype, check.out_dtype)
        return rel[-1] <= check.tolerance

    if not ok(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while ok(hi) and hi < 1e6:
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _verify(check: _Check, q, keys, values, spec: AttentionSpec):
    """Measures the score bound and reports: at once on concrete inputs (an error then comes
    before any work), through `jax.debug.callback` under tracing."""
    stats = _data_stats(q, keys, values, spec.key_masks, spec.scale, per_batch=False)
    if any(isinstance(x, jax.core.Tracer) for x in stats):
        jax.debug.callback(functools.partial(_report, check), *stats)
    else:
        # _report <- _verify <- attention <- api._run <- api._attend <- api._dispatch <- api
        # entry point <- caller
        _report(check, *stats, stacklevel=8)


def _check_polynomial(polynomial):
    if polynomial not in POLYNOMIALS:
        raise ValueError(f"polynomial must be one of {POLYNOMIALS}, got {polynomial!r}")


# ----------------------------------------------------------------------------------------------
# The kernel.


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one call (hashable: a `custom_vjp` non-differentiable arg)."""

    call: spine.Call
    dim: int
    coeffs: tuple
    chunk: int
    bwd_chunk: int

    scale = property(lambda self: self.call.scale)
    causal = property(lambda self: self.call.causal)
    windows = property(lambda self: self.call.windows)

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    @property
    def mono(self) -> features.Monomials:
        return features.monomials(self.dim, self.degree)

    def query_weights(self) -> np.ndarray:
        return features.feature_weights(self.mono, self.coeffs, self.scale)


_dot = spine.dot  # full precision: the approximation's error budget is not TF32's
_ein = spine.einsum


def _augment(x):
    """Appends a column of ones: values then carry the denominator, keys the value sums."""
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def _key_sums(cfg: _Config, k, v, ok, with_keys: bool):
    """`sum_a φ(k_a) ⊗ [v_a, 1]` (`[r, Hv+1]`), or with `⊗ [k_a, 1]` (`[r, Hv+1, H+1]`)."""
    rhs = _augment(v) * ok[:, None]
    if with_keys:
        rhs = rhs[:, :, None] * _augment(k)[:, None, :]
    shape = rhs.shape[1:]
    rhs = rhs.reshape(rhs.shape[0], -1)

    @jax.checkpoint
    def step(acc, xs):
        kc, rc = xs
        return acc + _dot(features.features(kc, cfg.mono), rc, (0, 0)), None

    init = jnp.zeros((cfg.mono.rank, rhs.shape[1]), rhs.dtype)
    acc, _ = jax.lax.scan(
        step, init, (causal_scan.chunked(k, cfg.chunk), causal_scan.chunked(rhs, cfg.chunk))
    )
    return acc.reshape((cfg.mono.rank,) + shape)


def _normalise(y, count):
    """`y [.., Hv+1]` (numerator, denominator) -> output and `1/den` (0 for empty rows)."""
    den = y[..., -1]
    # A denominator that is not positive (p < 0 somewhere; or below the smallest normal: 1/den
    # would overflow) or sums that overflowed (scores far outside the polynomial's range) give
    # a zero row instead of NaN/inf; the accuracy check reports such inputs (their certified
    # error is inf). `where` on both sides: the zeroed rows get zero (not NaN) gradients.
    tiny = jnp.finfo(y.dtype).tiny
    ok = (count > 0.5) & (den >= tiny) & jnp.all(jnp.isfinite(y), axis=-1)
    inv_den = jnp.where(ok, 1.0 / jnp.where(ok, den, 1.0), 0.0)
    return jnp.where(ok[..., None], y[..., :-1], 0.0) * inv_den[..., None], inv_den


def guard_sums(sums, axes):
    """Sums that overflowed -> 0 (with `where`, so their autodiff gradients are zero rather
    than NaN); `fine` (over the leading axes) says which were kept. `sums` are the factors of
    one product: it is finite iff every factor is and it does not overflow."""
    fine = jnp.all(jnp.isfinite(math.prod(sums)), axis=axes)
    shape = fine.shape + (1,) * (sums[0].ndim - fine.ndim)
    return [jnp.where(fine.reshape(shape), x, 0.0) for x in sums], fine


def zero_overflow(x):
    """Gradient entries that overflowed -> 0 (the inputs are finite: `_guard_inputs`); shared
    with `polynomial_fused`."""
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _forward_global(cfg: _Config, q, keys, values, valid):
    """No causal mask: every query row sees the same key sums. `q [T,G,H]`."""
    sums = [_key_sums(cfg, k, v, ok, with_keys=False) for k, v, ok in zip(keys, values, valid)]
    # Always guarded: one [r, Hv+1] pass (and 8% faster on a CPU than without, T = 4096).
    sums, fine = guard_sums(sums, None)  # overflowed: every row zero
    prod = math.prod(sums)
    count = math.prod(jnp.sum(ok.astype(q.dtype)) for ok in valid) * fine
    weights = cfg.query_weights()

    @jax.checkpoint
    def step(qc):
        return _dot(features.features(qc, cfg.mono, weights), prod, (2, 0))

    y = jax.lax.map(step, causal_scan.chunked(q, cfg.chunk)).reshape(
        (-1,) + q.shape[1:2] + prod.shape[1:]
    )
    return _normalise(y[: q.shape[0]], count)


def _forward_causal(cfg: _Config, q, keys, values, valid, guard: bool):
    """Causal (and window) masks: per-row prefix sums carried chunk by chunk. `guard`: zero
    the sums of rows whose product overflows, which autodiff needs (finite gradients). The
    output is the same without: `_normalise` zeroes rows whose `y` is not finite, and with
    finite query features `y` is finite iff the product is; it saves a pass over the
    `[C, r, Hv+1]` sums per set (the closed-form gradient does not differentiate this)."""
    weights = cfg.query_weights()
    sets = [
        causal_scan.KeySet(k, _augment(v) * ok[:, None], w, cfg.chunk)
        for k, v, ok, w in zip(keys, values, valid, cfg.windows)
    ]

    def feats(kc):
        return features.features(kc, cfg.mono)

    @jax.checkpoint
    def step(carry, xs):
        qc, key_xs = xs
        sums, new_carry = [], []
        for ks, c, x in zip(sets, carry, key_xs):
            s, c = ks.row_sums(c, x, feats)
            sums.append(s)  # [C, r, Hv+1]
            new_carry.append(c)
        if guard:
            sums, _ = guard_sums(sums, (1, 2))  # rows whose sums overflowed: zero (count 0)
        count = math.prod(s[:, 0, -1] for s in sums)  # the constant monomial counts keys
        y = _ein("cgr,crx->cgx", features.features(qc, cfg.mono, weights), math.prod(sums))
        return tuple(new_carry), (y, count)

    init = tuple(ks.init(cfg.mono.rank) for ks in sets)
    xs = (causal_scan.chunked(q, cfg.chunk), tuple(ks.xs() for ks in sets))
    _, (y, count) = jax.lax.scan(step, init, xs)
    t = q.shape[0]
    y = y.reshape((-1,) + y.shape[2:])[:t]
    return _normalise(y, count.reshape(-1)[:t, None])


def _pad_to(x, n):
    return jnp.pad(x, ((0, n - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def _to_grads(x, v_aug, scale, h):
    """`X [C, Hv+1, H+1]` (keys' feature rows times the backward sums) -> `(dk, dv)`."""
    dk = scale * _ein("cx,cxy->cy", v_aug, x[:, :, :h])
    return dk, x[:, :-1, h]


def _backward_global(cfg: _Config, q, keys, values, valid, out, inv_den, d_out):
    """docs/math.md §5 without causal masks: every sum factorises through the features."""
    t, g, h = q.shape
    r, ch = cfg.mono.rank, cfg.bwd_chunk
    n_full = [_key_sums(cfg, k, v, ok, with_keys=True) for k, v, ok in zip(keys, values, valid)]
    n_full, _ = guard_sums(n_full, None)  # overflowed: no contribution (zero gradients)
    x, y = n_full[0].shape[1:]
    pn = math.prod(n_full).reshape(r, x * y)
    delta = jnp.sum(d_out * out, -1, keepdims=True)
    do_aug = jnp.concatenate([d_out, -delta], -1)  # [T, G, Hv+1]
    weights = cfg.query_weights()

    @jax.checkpoint
    def q_step(rq, xs):
        qc, dc, ic = xs
        phi = features.features(qc, cfg.mono, weights) * ic[..., None]  # [C, G, r]
        tmp = _dot(phi, pn, (2, 0)).reshape(ch, g, x, y)
        dq = cfg.scale * _ein("cgx,cgxy->cgy", dc, tmp[..., :h])
        dq = jnp.where((ic[..., None] > 0) & jnp.isfinite(dq), dq, 0.0)  # zero, overflowed rows
        rhs = (dc[..., :, None] * _augment(qc)[..., None, :]).reshape(ch * g, x * y)
        return rq + _dot(phi.reshape(ch * g, r), rhs, (0, 0)), dq

    xs = tuple(causal_scan.chunked(a, ch) for a in (q, do_aug, inv_den))
    rq, dq = jax.lax.scan(q_step, jnp.zeros((r, x * y), q.dtype), xs)
    dq = dq.reshape(-1, g, h)[:t]
    rq = rq.reshape(r, x, y)
    dks, dvs = [], []
    for j, (k, v, ok) in enumerate(zip(keys, values, valid)):
        yj = (rq * math.prod(n for jj, n in enumerate(n_full) if jj != j)).reshape(r, x * y)

        @jax.checkpoint
        def k_step(xs, yj=yj):
            kc, vc, okc = xs
            f = features.features(kc, cfg.mono) * okc[:, None]
            return _to_grads(_dot(f, yj, (1, 0)).reshape(-1, x, y), _augment(vc), cfg.scale, h)

        dk, dv = jax.lax.map(k_step, tuple(causal_scan.chunked(a, ch) for a in (k, v, ok)))
        dks.append(zero_overflow(dk.reshape(-1, h)[: k.shape[0]]))
        dvs.append(zero_overflow(dv.reshape(-1, v.shape[-1])[: k.shape[0]]))
    return dq, tuple(dks), tuple(dvs)


def _backward_causal(cfg: _Config, q, keys, values, valid, out, inv_den, d_out):
    """docs/math.md §5 under causal/window masks, in one chunked scan.

    Per row `i`: `N_j(i) = sum_{a allowed} φ(k_a) ⊗ [v_a,1] ⊗ [k_a,1]` (windowed prefix sums),
    `W_j(i) = (φ0(q_i)/den_i) ⊗ dO_aug_i ⊗ [q_i,1] ∘ prod_{j'!=j} N_j'(i)`. Key `a` of set `j`
    gets `φ(k_a) · sum_{i in [a, a+w)} W_j(i)`: the prefix sum of `W_j` at `a+w-1` (read when
    the scan reaches that row, or the final total) minus the one at `a-1`.
    """
    t, g, h = q.shape
    r, ch = cfg.mono.rank, cfg.bwd_chunk
    hv = values[0].shape[-1]
    x, y = hv + 1, h + 1
    delta = jnp.sum(d_out * out, -1, keepdims=True)
    do_aug = jnp.concatenate([d_out, -delta], -1)
    weights = cfg.query_weights()
    sets, own, lead = [], [], []
    for k, v, ok, w in zip(keys, values, valid, cfg.windows):
        v_aug = _augment(v)
        rhs = (v_aug * ok[:, None])[:, :, None] * _augment(k)[:, None, :]
        sets.append(causal_scan.KeySet(k, rhs, w, ch))
        own.append(tuple(causal_scan.chunked(a, ch) for a in (k, v_aug, ok)))
        if w is not None:
            padded = -(-t // ch) * ch  # shift after padding: key t-1 may lead a padded row
            lead.append(
                tuple(
                    causal_scan.chunked(causal_scan.shift(_pad_to(a, padded), w - 1), ch)
                    for a in (k, v_aug, ok)
                )
            )
        else:
            lead.append(None)

    def feats(kc):
        return features.features(kc, cfg.mono)

    def grads(f, pw, v_aug):
        return _to_grads(_ein("cr,crz->cz", f, pw).reshape(-1, x, y), v_aug, cfg.scale, h)

    @jax.checkpoint
    def step(carry, xs):
        qc, dc, ic, key_xs, own_xs, lead_xs = xs
        n_rows, new_sets = [], []
        for ks, (c, _), kx in zip(sets, carry, key_xs):
            n, c = ks.row_sums(c, kx, feats)
            n_rows.append(n.reshape(ch, r, x * y))
            new_sets.append(c)
        phi = features.features(qc, cfg.mono, weights) * ic[..., None]  # [C, G, r]
        tmp = _ein("cgr,crz->cgz", phi, math.prod(n_rows))
        # Rows whose sums' product overflowed contribute nothing. With finite query features
        # the small `tmp [C, G, (Hv+1)(H+1)]` is finite iff that product is (and then every
        # factor is): testing it spares a pass over the `[C, r, ...]` sums.
        fine = jnp.all(jnp.isfinite(tmp), axis=(1, 2))  # [C]
        tmp = tmp.reshape(ch, g, x, y)
        dq = cfg.scale * _ein("cgx,cgxy->cgy", dc, tmp[..., :h])
        dq = jnp.where((ic[..., None] > 0) & fine[:, None, None] & jnp.isfinite(dq), dq, 0.0)
        rhs = (dc[..., :, None] * _augment(qc)[..., None, :]).reshape(ch, g, x * y)
        row = _ein("cgr,cgz->crz", phi, rhs)
        new_pw, ys = [], []
        for j, ((_, pw0), o, ld) in enumerate(zip(carry, own_xs, lead_xs)):
            others = math.prod(n for jj, n in enumerate(n_rows) if jj != j)
            # The `where` also made this step 10x faster under XLA:CPU (causal fwd+grad at
            # T = 256, H = 16, degree 4: 3.1 s against 31 s for `row * others` alone).
            wj = jnp.where(fine[:, None, None], row * others, 0.0)
            pw = pw0[None] + jnp.cumsum(wj, axis=0)
            new_pw.append(pw[-1])
            kc, vc, okc = o
            dk, dv = grads(-feats(kc) * okc[:, None], pw - wj, vc)
            if ld:
                kc, vc, okc = ld
                dk_lead, dv_lead = grads(feats(kc) * okc[:, None], pw, vc)
            else:
                dk_lead, dv_lead = jnp.zeros_like(dk), jnp.zeros_like(dv)
            ys.append((dk, dv, dk_lead, dv_lead))
        return tuple(zip(new_sets, new_pw)), (dq, tuple(ys))

    init = tuple((ks.init(r), jnp.zeros((r, x * y), q.dtype)) for ks in sets)
    xs = (
        *(causal_scan.chunked(a, ch) for a in (q, do_aug, inv_den)),
        tuple(ks.xs() for ks in sets),
        tuple(own),
        tuple(ld if ld is not None else () for ld in lead),
    )
    final, (dq, ys) = jax.lax.scan(step, init, xs)
    padded = dq.shape[0] * ch
    dq = dq.reshape(-1, g, h)[:t]
    dks, dvs = [], []
    for j, (k, v, ok, w) in enumerate(zip(keys, values, valid, cfg.windows)):
        dk, dv, dk_lead, dv_lead = (a.reshape((padded,) + a.shape[2:]) for a in ys[j])
        if w is not None:  # row i's lead term belongs to key i - w + 1
            dk = dk + causal_scan.shift(dk_lead, -(w - 1))
            dv = dv + causal_scan.shift(dv_lead, -(w - 1))
        total = final[j][1]
        reach = jnp.arange(padded) + (padded if w is None else w - 1) >= padded
        ok_total = jnp.pad(ok, (0, padded - t)) * reach

        @jax.checkpoint
        def tail_step(xs, total=total):
            kc, vc, okc = xs
            return grads(feats(kc) * okc[:, None], jnp.broadcast_to(total, (ch,) + total.shape), vc)

        tail = (
            causal_scan.chunked(k, ch),
            causal_scan.chunked(_augment(v), ch),
            ok_total.reshape(-1, ch),
        )
        dk_tail, dv_tail = jax.lax.map(tail_step, tail)
        # Keys seen by no row with an output get nothing: not `φ(k_a)` times the rounding
        # of a difference of prefix sums (huge when the key's features are).
        live = causal_scan.seen_by(jnp.any(inv_den > 0, axis=1)[None], w)[0, :, None]
        dks.append(jnp.where(live, zero_overflow((dk + dk_tail.reshape(padded, h))[:t]), 0.0))
        dvs.append(jnp.where(live, zero_overflow((dv + dv_tail.reshape(padded, hv))[:t]), 0.0))
    return dq, tuple(dks), tuple(dvs)


# ----------------------------------------------------------------------------------------------
# Layout, custom_vjp and the entry point.


def _compute_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _split(q, keys, values, valid):
    """`[B,T,N,H]` -> `[B,K,T,G,H]`; keys/values `[B,S,K,X]` -> `[B,K,S,X]`; masks `[B,K,S]`."""
    kv = keys[0].shape[2]
    ct = _compute_dtype(q.dtype)
    q5 = spine.split_heads(q.astype(ct), kv)
    keys = tuple(spine.split_keys(k.astype(ct)) for k in keys)
    values = tuple(spine.split_keys(v.astype(ct)) for v in values)
    valid = tuple(
        jnp.broadcast_to(m[:, None, :], (m.shape[0], kv, m.shape[1])).astype(ct) for m in valid
    )
    return q5, keys, values, valid


_merge = spine.merge_heads


def _per_head(fn):
    return jax.vmap(jax.vmap(fn))


def _forward_heads(cfg: _Config, q, keys, values, valid, guard: bool):
    if cfg.causal:
        fwd = functools.partial(_forward_causal, cfg, guard=guard)
    else:
        fwd = functools.partial(_forward_global, cfg)
    return _per_head(fwd)(*_split(q, keys, values, valid))


def _autodiff(cfg: _Config, q, keys, values, valid):
    out, _ = _forward_heads(cfg, q, keys, values, valid, guard=True)
    return _merge(out).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _closed_form(cfg: _Config, q, keys, values, valid):
    out, _ = _forward_heads(cfg, q, keys, values, valid, guard=False)
    return _merge(out).astype(q.dtype)


def _closed_form_fwd(cfg: _Config, q, keys, values, valid):
    out, inv_den = _forward_heads(cfg, q, keys, values, valid, guard=False)
    return _merge(out).astype(q.dtype), (q, keys, values, valid, out, inv_den)


def _closed_form_bwd(cfg: _Config, res, d_out):
    q, keys, values, valid, out, inv_den = res
    kv = keys[0].shape[2]
    q5, keys5, values5, valid5 = _split(q, keys, values, valid)
    do5 = spine.split_heads(d_out.astype(out.dtype), kv)
    bwd = _backward_causal if cfg.causal else _backward_global
    dq, dks, dvs = _per_head(functools.partial(bwd, cfg))(
        q5, keys5, values5, valid5, out, inv_den, do5
    )

    def unsplit(d, like):
        return spine.split_keys(d).astype(like.dtype)

    grads = (
        _merge(dq).astype(q.dtype),
        tuple(unsplit(d, k) for d, k in zip(dks, keys)),
        tuple(unsplit(d, v) for d, v in zip(dvs, values)),
    )
    return (*upstream_nan(d_out, grads), tuple(None for _ in valid))


def upstream_nan(d_out, grads):
    """`grads`, all NaN when the cotangent `d_out` holds NaN/inf: the kernels zero the entries
    that overflow, which must not hide a non-finite gradient coming from upstream."""
    bad = ~jnp.all(jnp.isfinite(d_out))
    return jax.tree_util.tree_map(lambda g: jnp.where(bad, jnp.nan, g).astype(g.dtype), grads)


_closed_form.defvjp(_closed_form_fwd, _closed_form_bwd)
_GRADIENTS = {"closed_form": spine.cached(_closed_form), "autodiff": spine.cached(_autodiff)}


@functools.lru_cache(maxsize=64)
def _feature_limits(dim: int, coeffs: tuple, scale: float, dtype) -> tuple[float, float]:
    """`(query, key)`: the largest `max|x|` of a row whose monomial features (the query's
    times their weights) stay below a quarter of `dtype`'s largest value (no overflow)."""
    mono = features.monomials(dim, len(coeffs) - 1)
    top = float(jnp.finfo(dtype).max) / 4
    w = np.abs(features.feature_weights(mono, coeffs, scale))
    deg = mono.degrees()
    lq = lk = math.inf
    for t in range(1, mono.degree + 1):
        lk = min(lk, top ** (1 / t))
        lq = min(lq, (top / max(1.0, float(np.max(w[deg == t])))) ** (1 / t))
    return lq, lk


def _guard_inputs(q, keys, valid, spec: AttentionSpec, limits, ct):
    """Finite inputs for the kernels and the query rows to overwrite: `(q, keys, zero, nan)`
    (`[B, T, N]` masks).

    A non-finite entry of q becomes 0 and its row NaN where it has an allowed tuple, as with
    the exact kernels (keys and values arrive with theirs handled: `api._sanitize`). A row of
    q or a key whose features would overflow (`max|x|` above `_feature_limits`) becomes 0 and
    the query rows it reaches output zeros, as rows whose sums overflow; with finite features
    the kernels' gradients stay finite. Ordinary inputs pass unchanged."""
    lq, lk = limits
    finite = jnp.isfinite(q)
    nan = ~jnp.all(finite, axis=-1)
    q = jnp.where(finite, q, jnp.zeros((), q.dtype))
    q_big = jnp.max(jnp.abs(q.astype(ct)), axis=-1) > lq
    q = jnp.where(q_big[..., None], jnp.zeros((), q.dtype), q)
    guarded, big, has_pair = [], False, True
    for k, ok, w in zip(keys, valid, spec.windows):
        k_big = jnp.max(jnp.abs(k.astype(ct)), axis=-1) > lk  # [B, S, K]
        guarded.append(jnp.where(k_big[..., None], jnp.zeros((), k.dtype), k))
        big = big | causal_scan.seen(k_big & ok[:, :, None], spec.causal, w)  # [B, T|1, K]
        has_pair = has_pair & causal_scan.seen(ok, spec.causal, w)  # [B, T|1]
    group = q.shape[2] // keys[0].shape[2]
    zero = q_big | jnp.repeat(big, group, axis=2)
    return q, tuple(guarded), zero, nan & has_pair[..., None]


def _pow2_chunk(per_row: int, t: int, budget: int = 1 << 21) -> int:
    """Largest power of two with `chunk · per_row <= budget` elements, in `[8, 1024]`, and no
    larger than needed for `t` rows."""
    chunk = 8
    while chunk < 1024 and 2 * chunk * per_row <= budget and chunk < t:
        chunk *= 2
    return chunk


def _resolve(spec: AttentionSpec, h: int, order: int, config: PolynomialConfig):
    """`(degree, R, tolerance)`: the degree, the static score range `R` (from `bound` or
    `score_range`; None without) and the check's tolerance. `bound` needs a static scale."""
    R = None
    if config.score_range is not None:
        R = float(config.score_range)
    elif config.bound is not None:
        if not spec.static_scale:
            raise ValueError(
                "PolynomialConfig.bound needs a static scale (a Python float) to give the score "
                "range R = scale·H·bound^order; with an array scale give score_range (or a "
                "degree and no bound: every call still checks its certificate)"
            )
        R = abs(spec.scale) * h * float(config.bound) ** order
    degree = config.degree
    if degree is None:
        degree = DEFAULT_DEGREE
        if config.tolerance is not None:
            degree = select_degree(R, float(config.tolerance), config.polynomial)
    tol = DEFAULT_TOLERANCE if config.tolerance is None else float(config.tolerance)
    return degree, R, tol


def attention(q, keys, values, spec: AttentionSpec, config: PolynomialConfig | None = None):
    """Polynomial-method attention; same shapes and masks as the exact kernels.

    `config` (`PolynomialConfig`, docs/math.md §4-§5): the polynomial and its degree (or a
    tolerance with a bound/score range choosing it), the accuracy check and the gradient.
    on_uncertified: what a call does when the certificate measured on its inputs
    (`certificate`: score bound `R`, p's relative error on `[-R, R]` plus rounding) is above
    the tolerance. "warn" (default): `PolynomialAccuracyWarning` naming the score bound,
    degree and certified error; "error": `PolynomialAccuracyError` before any work on
    concrete inputs, and under `jit` a runtime error (`JaxRuntimeError` carrying the same
    message) when the call executes; "ignore": no check (e.g. a polynomial layer trained as
    an attention of its own). The check costs `O(T·H)` reductions and one host callback. With
    an array scale (folded into `q`) the check measures the scaled queries, so it stays true;
    `bound` (a static score range from the scale) then raises ValueError.
    """
    config = config or PolynomialConfig()
    order = len(keys) + 1
    h = q.shape[-1]
    degree, R, tol = _resolve(spec, h, order, config)
    polynomial = config.polynomial
    t = q.shape[1]
    lengths = tuple(k.shape[1] for k in keys)
    hv = values[0].shape[-1]
    g = q.shape[2] // keys[0].shape[2]
    r = cost.feature_rank(h, degree)
    if too_wide := rank_over_limit(h, degree):
        raise ValueError(
            f"polynomial features of head_dim={h} at degree={degree}: {too_wide}; the state "
            f"alone would need ~{r * (hv + 1) * 4 / 2**30:.3g} GiB per batch row and head; "
            "lower the degree or the head dim (or use an exact kernel)"
        )
    if spec.causal:
        fwd_row, bwd_row = (
            4 * len(keys) * r * (hv + 1),
            (4 * len(keys) + 2) * r * (hv + 1) * (h + 1),
        )
    else:
        fwd_row, bwd_row = r * g, r * g + g * (hv + 1) * (h + 1)
    longest = max((t,) + lengths)
    coeffs = tuple(float(c) for c in coefficients(polynomial, degree, R))
    chunk_size = config.chunk_size
    cfg = _Config(
        call=spec.call(q, keys),
        dim=h,
        coeffs=coeffs,
        chunk=chunk_size or _pow2_chunk(fwd_row, longest),
        bwd_chunk=chunk_size or _pow2_chunk(bwd_row, longest),
    )
    dtype = jnp.result_type(q)
    ct = _compute_dtype(dtype)
    largest = float(np.max(np.abs(cfg.query_weights())))
    if not largest <= float(jnp.finfo(ct).max):
        raise ValueError(
            f"the {polynomial} polynomial of degree {degree} on [-{R:g}, {R:g}] has feature "
            f"weights up to {largest:.3g}, beyond {jnp.dtype(ct).name} (max "
            f"{float(jnp.finfo(ct).max):.3g}): it cannot be evaluated at all; lower "
            "score_range/bound or use an exact kernel"
        )
    if config.on_uncertified != "ignore":
        check = _Check(coeffs, polynomial, ct, dtype, tol, config.on_uncertified)
        _verify(check, q, keys, values, spec)
    valid = spec.valid(q.shape[0], lengths)
    limits = _feature_limits(h, coeffs, float(spec.scale), ct)
    q, keys, zero, nan = _guard_inputs(q, tuple(keys), valid, spec, limits, ct)
    if config.fused:
        from tensorattn.kernels import polynomial_fused  # it imports this module

        out = polynomial_fused.attention(
            q, keys, values, spec, config, degree=degree, score_range=R
        )
    else:
        out = _GRADIENTS[config.gradient](cfg, q, keys, tuple(values), valid)
    out = jnp.where(zero[..., None], jnp.zeros((), out.dtype), out)
    return jnp.where(nan[..., None], jnp.array(jnp.nan, out.dtype), out)
