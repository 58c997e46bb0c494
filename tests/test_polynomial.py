"""Polynomial-method attention (docs/math.md §4-§5) against the float64 oracle."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import tensorattn
from tensorattn import (
    PolynomialAccuracyError,
    PolynomialAccuracyWarning,
    higher_order_attention,
    tensor_attention,
)
from tensorattn.kernels import features, polynomial


@pytest.fixture
def x64():
    """float64 inside one test; restores the previous setting for the rest of the suite."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _inputs(seed, b=2, t=24, s=(24, 24), n=2, kv=1, h=8, hv=4, bound=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.uniform(-bound, bound, (b, t, n, h)).astype(dtype)
    keys = [rng.uniform(-bound, bound, (b, sj, kv, h)).astype(dtype) for sj in s]
    values = [rng.uniform(-1, 1, (b, sj, kv, hv)).astype(dtype) for sj in s]
    return q, keys, values


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _poly(q, keys, values, key_masks=None, **kw):
    """Jitted (eager dispatch of the many small ops is far slower than compiling once)."""

    def fn(q, keys, values, key_masks):
        return higher_order_attention(
            q, keys, values, implementation="polynomial", key_masks=key_masks, **kw
        )

    return jax.jit(fn)(q, list(keys), list(values), key_masks)


# --- feature maps and error control ---------------------------------------------------------


@pytest.mark.parametrize("dim,degree", [(3, 4), (8, 4), (16, 4), (5, 7)])
def test_monomials_expand_powers_of_sums(dim, degree):
    mono = features.monomials(dim, degree)
    assert mono.rank == math.comb(dim + degree, degree)
    x = np.random.default_rng(0).normal(size=dim)
    f = np.asarray(features.features(jnp.asarray(x, jnp.float32), mono), np.float64)
    w = np.concatenate(mono.multinomials)
    deg = mono.degrees()
    for t in range(degree + 1):  # multinomial theorem
        np.testing.assert_allclose((f * w)[deg == t].sum(), x.sum() ** t, rtol=2e-5, atol=1e-5)


def test_relative_error_and_select_degree():
    for poly in polynomial.POLYNOMIALS:
        errs = [polynomial.relative_error(poly, g, 1.5) for g in range(1, 10)]
        assert all(a > b for a, b in zip(errs, errs[1:])), errs
        deg = polynomial.select_degree(1.5, 1e-6, poly)
        assert polynomial.relative_error(poly, deg, 1.5) <= 1e-6
        assert polynomial.relative_error(poly, deg - 1, 1.5) > 1e-6
    # Chebyshev needs a lower degree for the same relative error; the Taylor value is exact.
    assert polynomial.select_degree(4.0, 1e-6, "chebyshev") < polynomial.select_degree(
        4.0, 1e-6, "taylor"
    )
    s = np.linspace(-2.0, 2.0, 100001)
    for poly in polynomial.POLYNOMIALS:
        c = polynomial.coefficients(poly, 5, 2.0)
        dense = np.max(np.abs(np.polyval(c[::-1], s) * np.exp(-s) - 1))
        assert dense <= polynomial.relative_error(poly, 5, 2.0) <= dense * 1.01


def test_score_bound_holds():
    q, (k1, k2), _ = _inputs(1, bound=1.7)
    s = np.einsum("btnh,bakh,bckh->btnac", q, k1, k2) / 8
    for bound in (
        polynomial.score_bound(q, k1, k2, 1 / 8),
        polynomial.score_bound(q, k1, k2, 1 / 8, per_batch=True),
    ):
        assert np.all(np.abs(s).max(axis=(1, 2, 3, 4)) <= np.asarray(bound) * (1 + 1e-6))
    assert float(polynomial.score_bound(q, k1, k2, 1 / 8)) <= 8 * 1.7**3 / 8  # tau d B^3


# --- forward accuracy -----------------------------------------------------------------------


def test_degree4_relative_error_at_most_1e5():
    """The issue's target: entries in [-1, 1], H=8, scale=1/H, degree 4 (float32)."""
    q, keys, values = _inputs(2, t=64, s=(64, 48), h=8, hv=8)
    ref = oracle.attention(q, keys, values, scale=1 / 8)
    out = _poly(q, keys, values, degree=4, scale=1 / 8)
    assert out.dtype == jnp.float32
    assert _rel(out, ref) <= 1e-5


def test_error_falls_with_degree(x64):
    q, keys, values = _inputs(3, h=4, bound=1.2, dtype=np.float64)
    ref = oracle.attention(q, keys, values, scale=0.5)
    kw = dict(scale=0.5, on_uncertified="ignore")  # degrees 1 and 2 are out of range here
    errs = [_rel(_poly(q, keys, values, degree=g, **kw), ref) for g in (1, 2, 4, 6, 8)]
    assert all(a > 2 * b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-5


CASES = {
    # name: (input shapes, mask kwargs). Both cases use grouped heads (N=4, K=2).
    "global": (dict(t=19, s=(23, 11), n=4, kv=2), {"masks": True}),
    # window 40 >= T is the unbounded causal path, 5 the windowed one.
    "causal_window": (dict(t=29, s=(29, 29), n=4, kv=2), {"windows": (5, 40), "masks": True}),
    "causal": (dict(t=27, s=(27, 27)), {"causal": True}),
}


def _case(name, seed=4, dtype=np.float32):
    shapes, kw = CASES[name]
    q, keys, values = _inputs(seed, dtype=dtype, **shapes)
    rng = np.random.default_rng(seed + 100)
    masks = None
    if kw.get("masks"):
        masks = [rng.uniform(size=(q.shape[0], k.shape[1])) > 0.3 for k in keys]
        masks[0][0, :] = False  # batch row 0 has no valid pair: zeros, no NaN
    windows = kw.get("windows")
    api = dict(causal=kw.get("causal", False), key_masks=masks)
    if windows is not None:
        api = dict(window=windows, k1_mask=masks[0], k2_mask=masks[1])
    ref_kw = dict(
        causal=kw.get("causal", False) or windows is not None, windows=windows, masks=masks
    )
    return q, keys, values, api, ref_kw


def _call(q, keys, values, api, **kw):
    if "window" in api:
        return tensor_attention(q, *keys, *values, implementation="polynomial", **api, **kw)
    return higher_order_attention(q, keys, values, implementation="polynomial", **api, **kw)


# --- gradients ------------------------------------------------------------------------------


def _grads(q, keys, values, api, d_out, **kw):
    def loss(q, keys, values):
        return jnp.sum(_call(q, keys, values, api, **kw) * d_out)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, list(keys), list(values))


def _grad_errors(name, degree, gradient, seed=6, dtype=np.float32, bound=1.0, scale=1 / 8, **kw):
    q, keys, values, api, ref_kw = _case(name, seed, dtype)
    if bound != 1.0:
        q = q * bound
        keys = [k * bound for k in keys]
    d_out = np.random.default_rng(seed).normal(size=q.shape[:3] + (values[0].shape[-1],))
    dq, dks, dvs = oracle.attention_grads(q, keys, values, d_out, scale=scale, **ref_kw)
    gq, gks, gvs = _grads(
        q,
        keys,
        values,
        api,
        d_out.astype(dtype),
        degree=degree,
        scale=scale,
        gradient=gradient,
        chunk_size=8,
        **kw,
    )
    got = [gq, *gks, *gvs]
    assert all(np.all(np.isfinite(np.asarray(g))) for g in got)
    return [_rel(a, b) for a, b in zip(got, [dq, *dks, *dvs])]


@pytest.mark.parametrize("name", ["global", "causal_window"])
@pytest.mark.parametrize("gradient", ["autodiff"])  # closed_form: tests/test_conformance.py
def test_gradients_match_exact_at_degree8(name, gradient):
    errs = _grad_errors(name, 8, gradient)
    assert max(errs) <= 1e-4, errs


def test_closed_form_more_accurate_than_autodiff(x64):
    """At equal low degree the closed form keeps degree-g accuracy; autodiff uses p' (degree
    g-1), so its q/k gradients are several times worse once scores are not tiny."""
    kw = dict(degree=2, dtype=np.float64, on_uncertified="ignore")  # degree 2: uncertified
    closed = _grad_errors("causal_window", gradient="closed_form", **kw)
    auto = _grad_errors("causal_window", gradient="autodiff", **kw)
    assert max(closed[:3]) < 0.5 * min(auto[:3]), (closed, auto)
    assert max(c / a for c, a in zip(closed, auto)) <= 1.0 + 1e-9, (closed, auto)


# --- certified error ------------------------------------------------------------------------


@pytest.mark.parametrize("poly", polynomial.POLYNOMIALS)
def test_certified_bound_never_exceeded(poly, x64):
    """100 random bounded inputs (a batch of 100, each with its own entry bound)."""
    rng = np.random.default_rng(7)
    b, t, h = 100, 12, 8
    bound = rng.uniform(0.3, 1.1, (b, 1, 1, 1))
    q = rng.uniform(-1, 1, (b, t, 1, h)) * bound
    keys = [rng.uniform(-1, 1, (b, t, 1, h)) * bound for _ in range(2)]
    values = [rng.uniform(-1, 1, (b, t, 1, 3)) * rng.uniform(0.5, 2, (b, 1, 1, 1)) for _ in keys]
    scale, degree = 8**-0.5, 4
    kw = dict(degree=degree, scale=scale, polynomial=poly, on_uncertified="ignore")
    if poly == "chebyshev":
        kw["score_range"] = 1.5  # inputs whose score bound exceeds it get an infinite bound
    out = np.asarray(_poly(q, keys, values, **kw))
    ref = oracle.attention(q, keys, values, scale=scale)
    observed = np.abs(out - ref).max(axis=(1, 2, 3))
    certified = polynomial.certified_error(
        q,
        keys,
        values,
        degree=degree,
        scale=scale,
        polynomial=poly,
        score_range=kw.get("score_range"),
        per_batch=True,
    )
    assert certified.shape == (b,)
    assert np.all(observed <= certified), np.max(observed / certified)
    assert np.sum(np.isfinite(certified)) >= 50
    assert np.max((observed / certified)[np.isfinite(certified)]) > 1e-5  # not vacuous


def _unbounded(seed=15, t=8, h=8):
    """The README's former example, small: standard normal q, k1, k2 at scale 1/sqrt(H)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(1, t, 2, h)).astype(np.float32)
    keys = [rng.normal(size=(1, t, 1, h)).astype(np.float32) for _ in range(2)]
    values = [rng.normal(size=(1, t, 1, 4)).astype(np.float32) for _ in range(2)]
    return q, keys, values


def _attend(q, keys, values, **kw):
    return tensor_attention(q, *keys, *values, implementation="polynomial", **kw)


def test_unbounded_inputs_warn_eagerly_and_under_jit():
    q, keys, values = _unbounded()
    cert = tensorattn.polynomial_certificate(q, *keys, *values, degree=4)
    assert not cert.certified and cert.certified_error == np.inf
    ref = oracle.attention(q, keys, values)
    for fn in (_attend, jax.jit(_attend)):
        with pytest.warns(PolynomialAccuracyWarning) as record:
            out = jax.block_until_ready(fn(q, keys, values))
        msg = str(record[0].message)
        assert f"score bound R={cert.score_bound:.2g}" in msg, msg
        assert "taylor degree 4" in msg and "max|output error| <= inf" in msg, msg
        assert _rel(out, ref) > 0.05  # the warning is deserved
        assert np.all(np.isfinite(np.asarray(out)))


def test_on_uncertified_error_and_ignore():
    q, keys, values = _unbounded()
    with pytest.raises(PolynomialAccuracyError, match="score bound R="):
        _attend(q, keys, values, on_uncertified="error")
    with pytest.raises(jax.errors.JaxRuntimeError, match="not certified"):
        jax.block_until_ready(
            jax.jit(lambda *a: _attend(*a, on_uncertified="error"))(q, keys, values)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolynomialAccuracyWarning)
        _poly(q, keys, values, on_uncertified="ignore")
        b = _inputs(17, t=8, s=(8, 8))  # bounded entries, scale 1/H: certified, silent
        _poly(*b, degree=4, scale=1 / 8)
        _poly(*b, degree=4, scale=1 / 8, on_uncertified="error")


def test_tolerance_is_the_check_threshold():
    q, keys, values = _inputs(18, t=8, s=(8, 8))
    cert = polynomial.certificate(q, keys, values, degree=3, scale=1 / 8)
    assert 1e-6 < cert.relative_error < polynomial.DEFAULT_TOLERANCE
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolynomialAccuracyWarning)
        _poly(q, keys, values, degree=3, scale=1 / 8, tolerance=2 * cert.relative_error)
    with pytest.warns(PolynomialAccuracyWarning, match="above the tolerance"):
        _poly(q, keys, values, degree=3, scale=1 / 8, tolerance=cert.relative_error / 2)


def test_certificate_bounds_the_error_and_skips_masked_keys():
    q, keys, values = _inputs(19, t=10, s=(10, 7), bound=1.2)
    big = [k.copy() for k in keys]
    big[0][:, 7:] = 50.0  # masked out below: no allowed tuple uses them
    masks = [np.arange(10)[None].repeat(2, 0) < 7, np.ones((2, 7), bool)]
    valid = [k[:, :7] for k in keys], [values[0][:, :7], values[1]]
    ref = oracle.attention(q, big, values, scale=1 / 8, masks=masks)
    for degree in (4, 6):
        kw = dict(degree=degree, scale=1 / 8, on_uncertified="ignore")
        cert = tensorattn.polynomial_certificate(q, *big, *values, k1_mask=masks[0], **kw)
        assert cert == polynomial.certificate(q, *valid, **kw)
        out = np.asarray(_poly(q, big, values, key_masks=masks, **kw))
        observed = np.abs(out - ref).max()
        assert observed <= cert.certified_error, (observed, cert)
        # Not vacuous where the polynomial's error dominates (degree 4: about 3e-6); at degree
        # 6 the error is float32 rounding (2e-8 to 5e-8, by JAX version).
        assert degree == 6 or 1e-4 * cert.certified_error < observed, (observed, cert)
    assert cert.certified


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_certificate_includes_rounding(dtype):
    """Entries +-0.25, degree 8: p is exact to 1e-16, the error is all rounding."""
    q, keys, values = (
        jnp.asarray(x, dtype) if not isinstance(x, list) else [jnp.asarray(a, dtype) for a in x]
        for x in _inputs(20, t=16, s=(16, 16), bound=0.25)
    )
    cert = polynomial.certificate(q, keys, values, degree=8, scale=1 / 8)
    assert cert.polynomial_error < 1e-12
    ref = oracle.attention(q, keys, values, scale=1 / 8)  # of the inputs as given
    observed = np.abs(np.asarray(_poly(q, keys, values, degree=8, scale=1 / 8), np.float64) - ref)
    eps = float(jnp.finfo(dtype).eps)
    assert observed.max() <= cert.certified_error < 50 * eps
    assert cert.relative_error >= eps / 2
    if dtype == jnp.bfloat16:  # a tolerance below bfloat16's half ulp cannot be certified
        with pytest.warns(PolynomialAccuracyWarning, match="bfloat16 rounding"):
            _poly(q, keys, values, degree=8, scale=1 / 8, tolerance=1e-3)


def test_far_out_of_range_is_finite_and_reported():
    """Issue 12 item 15: sums that overflow give zero rows (no NaN), and the check says so."""
    q, keys, values = _inputs(21, b=1, t=6, s=(6, 6), h=4, bound=1e5)
    for kw in (dict(degree=3), dict(polynomial="chebyshev", score_range=60.0)):
        kw = dict(kw, scale=1 / 4)
        with pytest.warns(PolynomialAccuracyWarning):
            out = np.asarray(_poly(q, keys, values, **kw))
        assert np.all(np.isfinite(out))

        def loss(q, keys, values, kw=kw):
            return jnp.sum(_call(q, keys, values, {}, on_uncertified="ignore", **kw))

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, keys, values)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


def _overflow_case(causal, seed=30):
    """Entries in [-1, 1] except: query row 4 at 1e6 (its features would overflow) and, causal,
    key 3 of both sets at 1e4 (the prefix sums overflow from row 3 on). Returns the inputs,
    the rows that output zeros and a cotangent."""
    q, keys, values = _inputs(seed, b=1, t=6, s=(6, 6), n=1, h=2, hv=2)
    q[0, 4] = 1e6
    zero = np.zeros(6, bool)
    zero[4] = True
    if causal:
        for k in keys:
            k[0, 3] = 1e4
        zero[3:] = True
    d_out = np.random.default_rng(seed).normal(size=(1, 6, 1, 2))
    return q, keys, values, zero, d_out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gradient", ["autodiff", "closed_form"])
def test_overflowed_rows_give_zeros_and_the_rest_the_oracle(causal, gradient):
    """Rows whose features or sums overflow output zeros and contribute zero gradients; the
    other rows and every gradient match the oracle's (with a zero cotangent on those rows)."""
    q, keys, values, zero, d_out = _overflow_case(causal)
    kw = dict(degree=8, scale=1 / 2, causal=causal, gradient=gradient, on_uncertified="ignore")
    out = np.asarray(_poly(q, keys, values, **kw))
    ref = oracle.attention(q, keys, values, scale=1 / 2, causal=causal)
    np.testing.assert_array_equal(out[0, zero], 0.0)
    np.testing.assert_allclose(out[0, ~zero], ref[0, ~zero], atol=1e-5)
    d_out[0, zero] = 0.0  # the oracle's gradient without the zeroed rows
    got = jax.tree_util.tree_leaves(_grads(q, keys, values, {}, d_out.astype(np.float32), **kw))
    dq, dks, dvs = oracle.attention_grads(q, keys, values, d_out, scale=1 / 2, causal=causal)
    for g, o in zip(got, [dq, *dks, *dvs]):
        np.testing.assert_allclose(np.asarray(g), o, atol=1e-4)


@pytest.mark.parametrize(
    "bound,degree,gradient",
    [
        (30.0, 12, "autodiff"),
        (1e4, 8, "closed_form"),
        (1e4, 12, "autodiff"),
        (1e6, 20, "closed_form"),
    ],
)
def test_gradients_finite_when_every_row_overflows(bound, degree, gradient):
    """The audit's cases (scores far out of range, sums overflowing): finite outputs and
    gradients, not NaN."""
    rng = np.random.default_rng(3)
    q, k1, k2 = (bound * rng.normal(size=(1, 3, 1, 2)).astype(np.float32) for _ in range(3))
    v1, v2 = (rng.normal(size=(1, 3, 1, 2)).astype(np.float32) for _ in range(2))
    kw = dict(implementation="polynomial", degree=degree, on_uncertified="ignore")

    def loss(*args):
        return tensor_attention(*args, gradient=gradient, **kw).sum()

    assert np.all(np.isfinite(np.asarray(tensor_attention(q, k1, k2, v1, v2, **kw))))
    grads = jax.jit(jax.grad(loss, argnums=range(5)))(q, k1, k2, v1, v2)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_nan_query_gives_nan_rows_like_the_exact_kernels():
    """A NaN/inf query entry: its row is NaN (rows with no allowed pair stay zero), the other
    rows and their gradients are unchanged, and the check names the inputs, not the degree."""
    q, keys, values = _inputs(31, b=2, t=5, s=(5, 5), n=2, h=2, hv=2)
    q[0, 2, 1, 0] = np.nan
    q[1, 3, 0, 1] = np.inf
    q[1, 0, 0, 0] = np.nan  # batch row 1, position 0: no allowed pair (first key masked)
    masks = [np.array([[True] * 5, [False] + [True] * 4]), None]
    kw = dict(causal=True, scale=1 / 2, key_masks=masks)
    exact = np.asarray(higher_order_attention(q, keys, values, implementation="reference", **kw))
    with pytest.warns(PolynomialAccuracyWarning, match="NaN or inf") as record:
        out = np.asarray(_poly(q, keys, values, degree=8, **kw))
    assert not any("too large" in str(w.message) for w in record)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(exact))
    assert np.isnan(out).any() and out[1, 0, 0].tolist() == [0.0, 0.0]
    clean = ~np.isnan(exact)
    np.testing.assert_allclose(out[clean], exact[clean], atol=1e-5)

    def loss(q):
        out = _call(q, keys, values, {}, degree=8, on_uncertified="ignore", **kw)
        return jnp.sum(jnp.where(jnp.isnan(out), 0.0, out))

    q_clean = np.where(np.isfinite(q), q, 0.0)
    dq = np.asarray(jax.jit(jax.grad(loss))(q))
    bad = ~np.all(np.isfinite(q), -1)
    assert np.all(np.isfinite(dq)) and np.all(dq[bad] == 0)
    dq_clean = np.asarray(jax.jit(jax.grad(loss))(q_clean))
    np.testing.assert_allclose(dq[~bad], dq_clean[~bad], atol=1e-6)
    cert = tensorattn.polynomial_certificate(q, *keys, *values, degree=8)
    assert np.isnan(cert.score_bound) and not cert.certified and "NaN/inf" in str(cert)


def test_polynomial_certificate_takes_the_calls_options_and_refuses_tracers():
    q, keys, values = _inputs(32, t=6, s=(6, 6))
    args = (q, *keys, *values)
    plain = tensorattn.polynomial_certificate(*args, degree=4, scale=1 / 8)
    same = tensorattn.polynomial_certificate(
        *args, implementation="polynomial", degree=4, scale=1 / 8
    )
    assert same == plain
    with pytest.raises(ValueError, match="implementation='blocked'"):
        tensorattn.polynomial_certificate(*args, implementation="blocked", degree=4)
    with pytest.raises(ValueError, match="concrete arrays.*outside jax.jit"):
        jax.jit(lambda *a: tensorattn.polynomial_certificate(*a, degree=4).score_bound)(*args)


def test_tolerance_picks_degree():
    q, keys, values = _inputs(8, t=16, s=(16, 16))
    R = 1 / 8 * 8 * 1.0**3
    degree = polynomial.select_degree(R, 1e-4, "taylor")
    a = _poly(q, keys, values, scale=1 / 8, tolerance=1e-4, bound=1.0)
    b = _poly(q, keys, values, scale=1 / 8, degree=degree)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref = oracle.attention(q, keys, values, scale=1 / 8)
    eps = polynomial.relative_error("taylor", degree, R)
    assert np.abs(np.asarray(a) - ref).max() <= polynomial.output_error_bound(eps, values) + 1e-6


def test_no_nan_for_large_entries_and_odd_degree():
    q, keys, values = _inputs(10, bound=4.0)
    for degree in (1, 3, 4):
        out = _poly(q, keys, values, degree=degree, scale=1 / 8, on_uncertified="ignore")
        assert np.all(np.isfinite(np.asarray(out)))


# --- scale ----------------------------------------------------------------------------------


def test_long_sequence_runs_without_quadratic_memory():
    t, h = 8192, 8
    rng = np.random.default_rng(12)
    args = [jnp.asarray(rng.uniform(-1, 1, (1, t, 1, h)), jnp.float32) for _ in range(5)]

    def fwd(*a):
        return tensor_attention(*a, implementation="polynomial", causal=True, scale=1 / h)

    compiled = jax.jit(fwd).lower(*args).compile()
    try:
        temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # memory analysis is backend dependent
        temp = None
    if temp is not None:
        assert temp < t * t  # far below one T x T float32 array (t*t*4 bytes)
    out = np.asarray(compiled(*args))
    assert np.all(np.isfinite(out)) and out.shape == (1, t, 1, h)
    # Causal: the first 128 rows only see the first 128 positions; check them exactly.
    head = [np.asarray(a)[:, :128] for a in args]
    ref = oracle.attention(head[0], head[1:3], head[3:], scale=1 / h, causal=True)
    assert _rel(out[:, :128], ref) <= 1e-5


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(degree=-1), "degree"),
        (dict(degree=2.5), "degree"),
        (dict(polynomial="pade"), "polynomial"),
        (dict(gradient="numerical"), "gradient"),
        (dict(polynomial="chebyshev"), "chebyshev"),
        (dict(tolerance=1e-3), "tolerance"),
        (dict(on_uncertified="loud"), "on_uncertified"),
        (dict(polynomial="chebyshev", score_range=500.0), "cannot be evaluated"),
        (dict(tolerance=2.0, bound=1.0), "tolerance"),
        (dict(bound=-1.0), "bound"),
        (dict(score_range=0.0), "score_range"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(block_sizes=None), "block_sizes"),
        (dict(degree=30), "rank"),  # C(8+30, 30) = 48.9M features
    ],
)
def test_invalid_options_raise(options, match):
    q, keys, values = _inputs(13, t=4, s=(4, 4))
    with pytest.raises(ValueError, match=match):
        _poly(q, keys, values, **options)


def test_array_scale_needs_score_range_not_bound():
    """A learned (array) scale: options that derive the static score range from `bound` raise;
    `score_range` and the runtime certificate (measured on the scaled queries) stay valid."""
    q, keys, values = _inputs(16, t=8, s=(8, 8))
    scale = jnp.float32(1 / 8)
    for options in (
        dict(degree=4, bound=1.0),
        dict(tolerance=1e-4, bound=1.0),
        dict(polynomial="chebyshev", degree=6, bound=1.0),
    ):
        with pytest.raises(ValueError, match="needs a static scale"):
            _poly(q, keys, values, scale=scale, **options)
    kw = dict(polynomial="chebyshev", degree=6, score_range=1.0)
    a = _poly(q, keys, values, scale=scale, **kw)
    b = _poly(q, keys, values, scale=1 / 8, **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    cert = tensorattn.polynomial_certificate(q, *keys, *values, degree=4, scale=scale)
    assert cert == tensorattn.polynomial_certificate(q, *keys, *values, degree=4, scale=1 / 8)
    big = jnp.full((q.shape[2],), 3.0)  # large learned scales: the check sees them
    with pytest.warns(PolynomialAccuracyWarning, match="not certified"):
        jax.block_until_ready(_poly(q, keys, values, degree=4, scale=big))


def test_shape_errors_are_the_shared_ones():
    q, keys, values = _inputs(14, t=4, s=(4, 5))
    with pytest.raises(ValueError, match="causal"):
        _poly(q, keys, values, causal=True)


def test_chebyshev_coefficients_keep_degree_plus_one_terms():
    # numpy's cheb2poly drops a leading coefficient that rounds to zero (degree 31, R = 10.24).
    c = polynomial.coefficients("chebyshev", 31, 10.24)
    assert c.shape == (32,)
    assert polynomial.relative_error("chebyshev", 31, 10.24) < 1e-6


@pytest.mark.parametrize("fused", [False, True])
def test_nan_cotangent_gives_nan_gradients(fused):
    """The closed-form gradient zeroes entries that overflow; a NaN coming from upstream must
    still show as NaN, not become zero."""
    ks = jax.random.split(jax.random.key(3), 5)
    q, k1, k2, v1, v2 = (0.3 * jax.random.normal(k, (1, 8, 1, 4)) for k in ks)
    kw = dict(implementation="polynomial", degree=4, on_uncertified="ignore", fused=fused)
    _, vjp = jax.vjp(lambda *a: tensorattn.tensor_attention(*a, **kw), q, k1, k2, v1, v2)
    clean = vjp(jnp.ones((1, 8, 1, 4)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in clean)
    grads = vjp(jnp.ones((1, 8, 1, 4)).at[0, 3, 0, 1].set(jnp.nan))
    assert all(bool(jnp.any(jnp.isnan(g))) for g in grads)
