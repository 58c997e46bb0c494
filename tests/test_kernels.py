"""Exact kernels (reference, blocked) against the float64 NumPy oracle."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from jax.test_util import check_grads

import tensorattn
from tensorattn.kernels import blocked

SMALL_BLOCKS = tensorattn.BlockSizes(block_q=4, block_k1=3, block_k2=4)
EXACT = [
    ("reference", {}),
    ("blocked", {}),
    ("blocked", {"block_sizes": SMALL_BLOCKS}),
]
EXACT_IDS = ["reference", "blocked", "blocked-small-tiles"]


def _jit_attention(impl, case, masks, options):
    """The call under test, jitted (one compile instead of one per eager op)."""
    return jax.jit(
        lambda *x: tensorattn.tensor_attention(
            *x, implementation=impl, **case.kwargs(masks), **options
        )
    )


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: sizes and masks."""

    batch: int = 2
    t: int = 13
    s1: int = 11
    s2: int = 9
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 5
    value_dim: int = 3
    causal: bool = False
    window: tuple | None = None
    masked: bool = False
    scale: float | None = None

    def inputs(self, seed=0, dtype=np.float32):
        rng = np.random.default_rng(seed)
        b, kv = self.batch, self.kv_heads
        q = rng.normal(size=(b, self.t, self.heads, self.head_dim))
        k1 = rng.normal(size=(b, self.s1, kv, self.head_dim))
        k2 = rng.normal(size=(b, self.s2, kv, self.head_dim))
        v1 = rng.normal(size=(b, self.s1, kv, self.value_dim))
        v2 = rng.normal(size=(b, self.s2, kv, self.value_dim))
        arrays = [jnp.asarray(x, dtype) for x in (q, k1, k2, v1, v2)]
        masks = (None, None)
        if self.masked:
            m1 = rng.random((b, self.s1)) > 0.3
            m2 = rng.random((b, self.s2)) > 0.3
            m1[0, :] = False  # batch row 0 has no valid pair at all
            masks = (m1, m2)
        return arrays, masks

    def kwargs(self, masks):
        return dict(
            causal=self.causal,
            window=self.window,
            k1_mask=masks[0],
            k2_mask=masks[1],
            scale=self.scale,
        )

    def oracle(self, arrays, masks):
        q, k1, k2, v1, v2 = arrays
        windows = None if self.window is None else self.window
        return oracle.attention(
            q,
            [k1, k2],
            [v1, v2],
            scale=self.scale,
            causal=self.causal or self.window is not None,
            windows=windows,
            masks=masks,
        )


CASES = {
    "cross-lengths": Case(),
    "one-head": Case(heads=1, kv_heads=1, t=7, s1=5, s2=6),
    "grouped-6-per-kv": Case(heads=6, kv_heads=1, t=9, s1=10, s2=4),
    "masked": Case(masked=True),
    "causal": Case(t=14, s1=14, s2=14, causal=True),
    "causal-masked": Case(t=14, s1=14, s2=14, causal=True, masked=True),
    "window": Case(t=19, s1=19, s2=19, window=(6, 3)),
    "window-masked": Case(t=19, s1=19, s2=19, window=(2, 9), masked=True),
    "papers-scale": Case(scale=1 / 5),
}


@pytest.mark.parametrize("impl,options", EXACT, ids=EXACT_IDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_oracle(name, impl, options):
    case = CASES[name]
    arrays, masks = case.inputs()
    out = _jit_attention(impl, case, masks, options)(*arrays)
    expected = case.oracle(arrays, masks)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)
    if case.masked:  # batch row 0 has no valid first key: zeros, not NaN
        np.testing.assert_array_equal(np.asarray(out[0]), 0.0)


@pytest.mark.parametrize("impl,options", EXACT, ids=EXACT_IDS)
def test_bfloat16(impl, options):
    case = Case(masked=True)
    arrays, masks = case.inputs(dtype=jnp.bfloat16)
    out = _jit_attention(impl, case, masks, options)(*arrays)
    assert out.dtype == jnp.bfloat16
    expected = case.oracle([np.asarray(a, np.float32) for a in arrays], masks)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2, rtol=3e-2)


def test_default_implementation_is_exact():
    case = Case(causal=True, t=9, s1=9, s2=9)
    arrays, masks = case.inputs()
    out = tensorattn.tensor_attention(*arrays, **case.kwargs(masks))
    np.testing.assert_allclose(np.asarray(out), case.oracle(arrays, masks), atol=2e-5)


def test_large_logits_stay_finite():
    case = Case(causal=True, t=10, s1=10, s2=10, scale=50.0)
    arrays, masks = case.inputs()
    arrays = [arrays[0] * 10.0, *arrays[1:]]
    for impl in ("reference", "blocked"):
        out = tensorattn.tensor_attention(*arrays, implementation=impl, **case.kwargs(masks))
        assert np.isfinite(np.asarray(out)).all()
        np.testing.assert_allclose(np.asarray(out), case.oracle(arrays, masks), atol=1e-4)


def _loss(impl, case, masks, d_out, **options):
    def loss(*arrays):
        out = tensorattn.tensor_attention(
            *arrays, implementation=impl, **case.kwargs(masks), **options
        )
        return jnp.sum(out * d_out)

    return loss


GRAD_CASES = ["cross-lengths", "grouped-6-per-kv", "causal-masked", "window-masked"]


@pytest.mark.parametrize("impl,options", [EXACT[0], EXACT[2]], ids=[EXACT_IDS[0], EXACT_IDS[2]])
@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradients_match_oracle(name, impl, options):
    case = CASES[name]
    arrays, masks = case.inputs(seed=1)
    d_out = np.random.default_rng(2).normal(size=(case.batch, case.t, case.heads, case.value_dim))
    loss = _loss(impl, case, masks, jnp.asarray(d_out, jnp.float32), **options)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*arrays)
    q, k1, k2, v1, v2 = arrays
    dq, dks, dvs = oracle.attention_grads(
        q,
        [k1, k2],
        [v1, v2],
        d_out,
        scale=case.scale,
        causal=case.causal or case.window is not None,
        windows=case.window,
        masks=masks,
    )
    for got, want in zip(grads, [dq, *dks, *dvs]):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-5, rtol=5e-5)
    if case.masked:  # batch row 0 has no allowed pair: its gradients are zero
        for got in grads:
            np.testing.assert_array_equal(np.asarray(got[0]), 0.0)


def test_blocked_gradients_match_reference_gradients():
    case = CASES["causal-masked"]
    arrays, masks = case.inputs(seed=3)
    d_out = jnp.asarray(np.random.default_rng(4).normal(size=(2, 14, 4, 3)), jnp.float32)
    argnums = (0, 1, 2, 3, 4)
    ref = jax.grad(_loss("reference", case, masks, d_out), argnums=argnums)(*arrays)
    got = jax.grad(_loss("blocked", case, masks, d_out, block_sizes=SMALL_BLOCKS), argnums=argnums)(
        *arrays
    )
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def test_blocked_custom_vjp_check_grads():
    case = Case(
        batch=1, t=6, s1=5, s2=7, heads=2, kv_heads=1, head_dim=3, value_dim=2, masked=False
    )
    with jax.enable_x64(True):
        arrays, masks = case.inputs(seed=5, dtype=np.float64)

        def f(*x):
            return tensorattn.tensor_attention(
                *x, implementation="blocked", block_sizes=SMALL_BLOCKS
            )

        check_grads(f, arrays, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def _higher_order_inputs(order, seed=0, dtype=np.float32, lengths=(7, 6, 5), hv=3):
    rng = np.random.default_rng(seed)
    b, t, n, kv, h = 2, 6, 4, 2, 4
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
    keys = [jnp.asarray(rng.normal(size=(b, s, kv, h)), dtype) for s in lengths[: order - 1]]
    values = [jnp.asarray(rng.normal(size=(b, s, kv, hv)), dtype) for s in lengths[: order - 1]]
    return q, keys, values


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("impl", ["reference", "blocked"])
def test_higher_order_forward_and_gradient(order, impl):
    q, keys, values = _higher_order_inputs(order)
    out = tensorattn.higher_order_attention(q, keys, values, implementation=impl)
    np.testing.assert_allclose(np.asarray(out), oracle.attention(q, keys, values), atol=2e-5)
    d_out = np.random.default_rng(9).normal(size=out.shape)

    def loss(q, keys, values):
        out = tensorattn.higher_order_attention(q, keys, values, implementation=impl)
        return jnp.sum(out * d_out)

    dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, keys, values)
    wq, wk, wv = oracle.attention_grads(q, keys, values, d_out)
    for got, want in zip([dq, *dk, *dv], [wq, *wk, *wv]):
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("order", [2, 4])
def test_higher_order_causal_masked(order):
    lengths = (8, 8, 8)
    q, keys, values = _higher_order_inputs(order, lengths=lengths)
    q = jnp.concatenate([q, q[:, :2]], axis=1)  # T = 8
    masks = [np.random.default_rng(j).random((2, 8)) > 0.4 for j in range(order - 1)]
    expected = oracle.attention(q, keys, values, causal=True, masks=masks)
    for impl in ("reference", "blocked"):
        out = tensorattn.higher_order_attention(
            q, keys, values, implementation=impl, causal=True, key_masks=masks
        )
        np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)


def test_order_two_is_dot_product_attention():
    q, (k,), (v,) = _higher_order_inputs(2, hv=4)
    expected = jax.nn.dot_product_attention(q, k, v)
    for impl in ("reference", "blocked"):
        out = tensorattn.higher_order_attention(q, [k], [v], implementation=impl)
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-5)


def test_jit_does_not_retrace():
    traces = []

    @jax.jit
    def f(*arrays):
        traces.append(1)
        return tensorattn.tensor_attention(*arrays, implementation="blocked", causal=True)

    arrays, _ = Case(t=8, s1=8, s2=8).inputs()
    f(*arrays)
    f(*[a + 1.0 for a in arrays])
    assert len(traces) == 1


def test_blocked_memory_is_linear():
    """T=1024, H=32: the reference needs 4 GiB of scores; blocked stays in a few MiB."""
    shape = jax.ShapeDtypeStruct((1, 1024, 1, 32), jnp.float32)

    def fwd(*x):
        return tensorattn.tensor_attention(*x, implementation="blocked")

    def grad(*x):
        return jax.grad(lambda *y: fwd(*y).sum(), argnums=(0, 1, 2, 3, 4))(*x)

    for fn, limit in ((fwd, 64), (grad, 256)):
        analysis = jax.jit(fn).lower(*[shape] * 5).compile().memory_analysis()
        assert analysis.temp_size_in_bytes < limit * 2**20


def test_masks_skip_whole_tiles():
    """Work follows the allowed pairs: windows are linear in T, causal about a third."""

    def live(t, causal, windows):
        spec_blocks = tensorattn.BlockSizes().fitted(t, (t, t), windows)
        cfg = blocked._Config(1.0, causal, windows, t, (t, t), spec_blocks)
        return len(cfg.live_tiles()), cfg.num_q_tiles

    full, _ = live(512, False, (None, None))
    causal, _ = live(512, True, (None, None))
    assert causal < 0.45 * full
    w1, _ = live(2048, True, (64, 16))
    w2, _ = live(4096, True, (64, 16))
    assert w2 <= 2.1 * w1


def _bad_inputs():
    arrays, _ = Case().inputs()
    return arrays


BAD = {
    "rank": (lambda q, k1, k2, v1, v2: (q[0], k1, k2, v1, v2), {}, "q must have rank 4"),
    "head-dim": (lambda q, k1, k2, v1, v2: (q, k1[..., :2], k2, v1, v2), {}, "k1 shape"),
    "batch": (lambda q, k1, k2, v1, v2: (q, k1, k2[:1], v1, v2), {}, "k2 shape"),
    "value-length": (lambda q, k1, k2, v1, v2: (q, k1, k2, v1[:, :3], v2), {}, "v1 shape"),
    "value-dim": (lambda q, k1, k2, v1, v2: (q, k1, k2, v1, v2[..., :1]), {}, "v2 value dim"),
    "groups": (lambda q, k1, k2, v1, v2: (q[:, :, :3], k1, k2, v1, v2), {}, "multiple"),
    "causal": (lambda *a: a, {"causal": True}, "causal=True needs equal lengths"),
    "implementation": (lambda *a: a, {"implementation": "fast"}, "unknown implementation"),
    "window-shape": (lambda *a: a, {"window": (4,)}, "window must be a pair"),
    "window-lengths": (lambda *a: a, {"window": (4, 2)}, "needs equal lengths"),
    "mask-shape": (lambda *a: a, {"k1_mask": np.ones((2, 3), bool)}, "k1_mask must have shape"),
    "scale": (lambda *a: a, {"scale": "big"}, "scale must be"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_raises_value_error(name):
    transform, kwargs, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        tensorattn.tensor_attention(*transform(*_bad_inputs()), **kwargs)


def test_bad_window_values():
    arrays, _ = Case(t=8, s1=8, s2=8).inputs()
    with pytest.raises(ValueError, match="window sizes must be positive"):
        tensorattn.tensor_attention(*arrays, window=(0, 3))


def test_bad_block_sizes():
    with pytest.raises(ValueError, match="block_k2"):
        tensorattn.BlockSizes(block_k2=0)
    with pytest.raises(ValueError, match="block_sizes must be"):
        tensorattn.tensor_attention(*_bad_inputs(), implementation="blocked", block_sizes=(1, 2))


def test_higher_order_bad_input():
    q, keys, values = _higher_order_inputs(3)
    with pytest.raises(ValueError, match="key sets but"):
        tensorattn.higher_order_attention(q, keys, values[:1])
    with pytest.raises(ValueError, match="order must be"):
        tensorattn.higher_order_attention(q, keys * 2, values * 2)


def test_default_implementation_follows_key_count(monkeypatch):
    """Short keys go to the reference, long ones to the tiled kernel (both exact)."""
    from tensorattn.kernels import api

    chosen = []
    real = api._module
    monkeypatch.setattr(api, "_module", lambda name: chosen.append(name) or real(name))
    for s, expected in ((12, "reference"), (40, "blocked")):
        case = Case(t=5, s1=s, s2=s)
        arrays, masks = case.inputs()
        out = tensorattn.tensor_attention(*arrays, **case.kwargs(masks))
        np.testing.assert_allclose(np.asarray(out), case.oracle(arrays, masks), atol=2e-5)
        assert chosen[-1] == expected
