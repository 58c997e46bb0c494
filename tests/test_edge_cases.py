"""Edge cases of the public entry points, for every implementation: empty inputs, non-boolean
masks, non-finite keys/values at masked positions, non-finite scale, window tuples.

Tiny shapes; pallas runs in interpret mode with small tiles (several tiles per axis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import tensorattn

B, T, N, K, H, HV = 2, 8, 4, 2, 4, 3
CONFIGS = {
    "reference": tensorattn.ReferenceConfig(),
    "blocked": tensorattn.BlockedConfig(block_q=4, block_outer=3, block_inner=4),
    "polynomial": tensorattn.PolynomialConfig(degree=8, on_uncertified="ignore"),
    "pallas": tensorattn.PallasConfig(
        fwd_block_rows=8,
        fwd_block_k2=8,
        bwd_block_rows=8,
        bwd_block_k1=4,
        bwd_block_k2=8,
        interpret=True,
    ),  # fmt: skip
}
IMPLS = sorted(CONFIGS)


def _inputs(seed=0, t=T, s1=T, s2=T, b=B, hv=HV, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.uniform(-1, 1, (b, t, N, H))
    keys = [rng.uniform(-1, 1, (b, s, K, H)) for s in (s1, s2)]
    values = [rng.uniform(-1, 1, (b, s, K, hv)) for s in (s1, s2)]
    return q.astype(dtype), [k.astype(dtype) for k in keys], [v.astype(dtype) for v in values]


def _attend(impl, q, keys, values, **kw):
    return tensorattn.tensor_attention(q, *keys, *values, config=CONFIGS[impl], **kw)


def _jit_attend(impl, q, keys, values, **kw):
    """Jitted: one compile is faster than dispatching the many small ops eagerly."""
    return jax.jit(lambda *x: _attend(impl, *x, **kw))(q, keys, values)


# --- 11. empty inputs -----------------------------------------------------------------------

EMPTY = {
    "S1=0": dict(s1=0),
    "S2=0": dict(s2=0),
    "B=0": dict(b=0),
    "Hv=0": dict(hv=0),
    "T=0-causal": dict(t=0, s1=0, s2=0, causal=True),
    "T=0": dict(t=0),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(EMPTY))
def test_empty_inputs_give_zeros_and_zero_grads(impl, case):
    sizes = dict(EMPTY[case])
    causal = sizes.pop("causal", False)
    q, keys, values = _inputs(**sizes)

    def loss(q, keys, values):
        out = _attend(impl, q, keys, values, causal=causal)
        return jnp.sum(out), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, keys, values)
    assert out.shape == q.shape[:3] + (values[0].shape[-1],) and out.dtype == q.dtype
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    for g, x in zip(jax.tree.leaves(grads), [q, *keys, *values]):
        assert g.shape == x.shape
        np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_empty_inputs_keep_dtype_and_check_implementation():
    q, keys, values = _inputs(s2=0, dtype=jnp.bfloat16)
    out = tensorattn.higher_order_attention(q, keys, values)
    assert out.shape == (B, T, N, HV) and out.dtype == jnp.bfloat16
    out = tensorattn.higher_order_attention(q, keys[1:], values[1:], causal=False)
    assert out.shape == (B, T, N, HV)
    with pytest.raises(ValueError, match="unknown implementation"):
        tensorattn.higher_order_attention(q, keys, values, implementation="fast")


@pytest.mark.parametrize(
    "what", ["H=0", "N=0", "K=0", "K=0,N=0"], ids=lambda w: w.replace(",", "-")
)
def test_zero_heads_or_head_dim_raise(what):
    q, keys, values = _inputs()
    if what == "H=0":
        q, keys = q[..., :0], [k[..., :0] for k in keys]
    if "N=0" in what:
        q = q[:, :, :0]
    if "K=0" in what:
        keys, values = [k[:, :, :0] for k in keys], [v[:, :, :0] for v in values]
    with pytest.raises(ValueError, match=r"must be positive.*q shape"):
        tensorattn.tensor_attention(q, *keys, *values)


# --- 12. masks must be boolean --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint8])
def test_non_boolean_masks_raise(dtype):
    q, keys, values = _inputs()
    valid = np.random.default_rng(1).random((B, T)) > 0.5
    additive = np.where(valid, 0.0, -np.inf).astype(dtype) if dtype == np.float32 else valid
    mask = np.asarray(additive, dtype)
    with pytest.raises(ValueError, match=rf"k2_mask must be a boolean mask.*{np.dtype(dtype)}"):
        tensorattn.tensor_attention(q, *keys, *values, k1_mask=valid, k2_mask=mask)
    with pytest.raises(ValueError, match=r"key_masks\[0\] must be a boolean mask \(True = valid"):
        tensorattn.higher_order_attention(q, keys[:1], values[:1], key_masks=[jnp.asarray(mask)])


# --- 14. scale and window -------------------------------------------------------------------


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_raises(scale):
    q, keys, values = _inputs()
    with pytest.raises(ValueError, match="scale must be finite"):
        tensorattn.tensor_attention(q, *keys, *values, scale=scale)


def test_any_window_tuple_implies_causal():
    impl = "reference"  # the window tuple only changes the validated spec
    q, keys, values = _inputs()
    causal = _jit_attend(impl, q, keys, values, causal=True)
    np.testing.assert_allclose(
        np.asarray(causal), oracle.attention(q, keys, values, causal=True), atol=2e-5
    )
    none = _jit_attend(impl, q, keys, values, window=(None, None))
    np.testing.assert_array_equal(np.asarray(none), np.asarray(causal))
    half = _jit_attend(impl, q, keys, values, window=(None, 3))
    want = oracle.attention(q, keys, values, causal=True, windows=(None, 3))
    np.testing.assert_allclose(np.asarray(half), want, atol=2e-5)
    q2, keys2, values2 = _inputs(s1=5)
    with pytest.raises(ValueError, match=r"window=\(None, None\) needs equal lengths"):
        tensorattn.tensor_attention(q2, *keys2, *values2, window=(None, None))


# --- 13. non-finite keys/values at masked positions -----------------------------------------

BAD_VALUES = (np.nan, np.inf, -np.inf)


def _scenario(name):
    """Inputs with non-finite entries planted at masked and visible positions, and the
    attention arguments. Returns (q, keys, values, kwargs)."""
    q, keys, values = _inputs(seed=2)
    rng = np.random.default_rng(3)
    kw = {}
    if name == "padding":  # non-causal: padded positions hold NaN/inf; batch 1 has no pair
        m1, m2 = rng.random((B, T)) > 0.3, rng.random((B, T)) > 0.3
        m1[0, 2], m2[0, 5] = False, False
        m1[1] = False
        keys[0][0, 2], values[0][0, 2, 1, 0] = np.nan, np.inf
        values[1][0, 5, 0] = -np.inf
        keys[1][1, 1, 0, 0] = np.nan  # valid k2 of batch 1, but no row of batch 1 has a pair
        kw = dict(k1_mask=m1, k2_mask=m2)
    elif name == "visible":  # non-causal: a valid NaN poisons every row of its (batch, group)
        m2 = np.ones((B, T), bool)
        m2[1, 3] = False
        values[0][0, 4, 1, 2] = np.nan  # batch 0, kv head 1: rows of query heads 2, 3
        keys[1][1, 3, 0] = np.inf  # masked
        kw = dict(k2_mask=m2)
    elif name == "causal":  # future positions hold NaN/inf; visible to rows >= 5 and >= 6
        keys[0][0, 5, 0, 1] = np.nan
        values[1][1, 6, 1] = np.inf
        keys[1][:, T - 1] = -np.inf
        kw = dict(causal=True)
    elif name == "window":  # NaN at 2 is seen by rows 2..4 of window 3 only
        m1 = np.ones((B, T), bool)
        m1[1, 6] = False
        keys[0][0, 2, 1, 0] = np.nan
        values[0][1, 6] = np.nan  # masked
        values[1][1, 0, 0, 0] = np.inf  # k2 window 2: rows 0, 1 only
        kw = dict(window=(3, 2), k1_mask=m1)
    else:
        raise AssertionError(name)
    return q, keys, values, kw


def _expected(q, keys, values, kw, d_out):
    """Oracle on inputs with the non-finite entries replaced by 0, NaN on the rows that see one
    (brute force over every allowed pair), and the gradients with those rows' d_out zeroed."""
    masks = [kw.get("k1_mask"), kw.get("k2_mask")]
    causal = kw.get("causal", False) or "window" in kw
    okw = dict(causal=causal, windows=kw.get("window"), masks=masks)
    allowed = oracle._allowed(T, [T, T], B, causal, kw.get("window"), masks)  # [B,T,S1,S2]
    bad = [~(np.isfinite(k).all(-1) & np.isfinite(v).all(-1)) for k, v in zip(keys, values)]
    touch = bad[0][:, :, None, :] | bad[1][:, None, :, :]  # [B,S1,S2,K]
    poisoned = np.einsum("btxy,bxyk->btk", allowed, touch) > 0  # [B,T,K]
    rows = np.repeat(poisoned, N // K, axis=2)[..., None]  # [B,T,N,1]
    clean = [[np.where(np.isfinite(x), x, 0.0) for x in xs] for xs in (keys, values)]
    out = oracle.attention(q, *clean, **okw)
    grads = oracle.attention_grads(q, *clean, np.where(rows, 0.0, d_out), **okw)
    return np.where(rows, np.nan, out), (grads[0], *grads[1], *grads[2]), poisoned


# The poisoned rows are found in the API, the same for every implementation; each kernel
# must ignore (finite) masked entries: padding covers the unmasked path, window the causal one.
NON_FINITE_CASES = [
    (impl, name)
    for impl in IMPLS
    for name in ("padding", "visible", "causal", "window")
    if impl in ("reference", "blocked") or name in ("padding", "window")
]


@pytest.mark.parametrize("impl,name", NON_FINITE_CASES)
def test_non_finite_at_masked_positions(impl, name):
    q, keys, values, kw = _scenario(name)
    d_out = np.random.default_rng(4).uniform(-1, 1, (B, T, N, HV))
    want, want_grads, poisoned = _expected(q, keys, values, kw, d_out)
    assert not poisoned.all() and poisoned.any() == (name != "padding")

    def loss(q, keys, values):
        out = _attend(impl, q, keys, values, **kw)
        return jnp.sum(jnp.where(jnp.isnan(out), 0.0, out) * d_out), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, keys, values)
    out = np.asarray(out)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    tol = 2e-3 if impl == "polynomial" else 2e-5
    np.testing.assert_allclose(out, want, atol=tol, rtol=tol)
    for got, w in zip(jax.tree.leaves(grads), want_grads):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(np.asarray(got), w, atol=5 * tol, rtol=5 * tol)


@pytest.mark.parametrize("impl", ["reference", "blocked"])
@pytest.mark.parametrize("order", [2, 4])
def test_non_finite_future_keys_higher_orders(order, impl):
    rng = np.random.default_rng(5)
    q = rng.uniform(-1, 1, (1, 6, 2, 3)).astype(np.float32)
    keys = [rng.uniform(-1, 1, (1, 6, 1, 3)).astype(np.float32) for _ in range(order - 1)]
    values = [rng.uniform(-1, 1, (1, 6, 1, 2)).astype(np.float32) for _ in range(order - 1)]
    keys[-1][0, 4, 0, 0] = np.nan  # rows 4, 5 see these
    values[0][0, 5, 0, 1] = np.inf
    clean = [[np.where(np.isfinite(x), x, 0.0) for x in xs] for xs in (keys, values)]
    want = oracle.attention(q, *clean, causal=True)
    want[:, 4:] = np.nan

    def fn(q, keys, values):
        return tensorattn.higher_order_attention(q, keys, values, implementation=impl, causal=True)

    np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, keys, values)), want, atol=2e-5)


def test_argument_types():
    """numpy ints are window sizes; `causal` must be a bool; nested lists are not arrays;
    higher_order_attention says it has no windows."""
    q, k, v = (jnp.ones((1, 4, 1, 2)) * 0.1 for _ in range(3))
    out = tensorattn.tensor_attention(q, k, k, v, v, window=(np.int64(2), 2))
    ref = tensorattn.tensor_attention(q, k, k, v, v, window=(2, 2))
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match="causal must be a bool"):
        tensorattn.tensor_attention(q, k, k, v, v, causal="no")
    with pytest.raises(ValueError, match="q must be an array"):
        tensorattn.tensor_attention(np.asarray(q).tolist(), k, k, v, v)
    with pytest.raises(ValueError, match="higher_order_attention takes no window"):
        tensorattn.higher_order_attention(q, [k, k], [v, v], window=(2, 2))
