"""Exact kernels (reference, blocked): kernel-specific checks, the public API's dispatch and
its errors. The per-case comparison of every implementation with the oracle is
tests/test_conformance.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from jax.test_util import check_grads

import tensorattn
from tensorattn.kernels import blocked, spine

SMALL_BLOCKS = tensorattn.BlockedConfig(block_q=4, block_outer=3, block_inner=4)


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


def test_scores_beyond_float32_give_nan_rows_only_there():
    """The documented edge case (tensor_attention's docstring): finite entries whose scores
    overflow float32 make that query's row NaN, as a softmax over inf does; others exact."""
    case = Case(t=4, s1=4, s2=4, heads=1, kv_heads=1, head_dim=4, value_dim=4, masked=False)
    arrays, masks = case.inputs()
    q, k1 = np.array(arrays[0]), np.asarray(arrays[1]) * 1e10
    q[0, 1] *= 1e30  # |score| ~ 1e40 in row 1 of batch row 0
    arrays = [q, k1, *arrays[2:]]
    for impl in ("reference", "blocked"):
        out = np.asarray(tensorattn.tensor_attention(*arrays, implementation=impl))
        nan_rows = np.isnan(out).any(axis=(2, 3))[0]
        np.testing.assert_array_equal(nan_rows, [False, True, False, False])
        assert np.isfinite(out[0, [0, 2, 3]]).all()


def test_blocked_custom_vjp_check_grads():
    case = Case(
        batch=1, t=6, s1=5, s2=7, heads=2, kv_heads=1, head_dim=3, value_dim=2, masked=False
    )
    with jax.enable_x64(True):
        arrays, masks = case.inputs(seed=5, dtype=np.float64)

        def f(*x):
            return tensorattn.tensor_attention(*x, implementation="blocked", config=SMALL_BLOCKS)

        check_grads(f, arrays, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def _higher_order_inputs(order, seed=0, dtype=np.float32, lengths=(7, 6, 5), hv=3):
    rng = np.random.default_rng(seed)
    b, t, n, kv, h = 2, 6, 4, 2, 4
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
    keys = [jnp.asarray(rng.normal(size=(b, s, kv, h)), dtype) for s in lengths[: order - 1]]
    values = [jnp.asarray(rng.normal(size=(b, s, kv, hv)), dtype) for s in lengths[: order - 1]]
    return q, keys, values


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
        call = spine.Call(1.0, causal, windows, t, (t, t), heads=1, kv_heads=1)
        cfg = blocked._Config.fitted(call, tensorattn.BlockedConfig(block_inner=128))
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
    with pytest.raises(ValueError, match="BlockedConfig.block_inner"):
        tensorattn.BlockedConfig(block_inner=0)
    with pytest.raises(ValueError, match="BlockedConfig.block_q"):
        tensorattn.tensor_attention(*_bad_inputs(), implementation="blocked", block_q=(1, 2))


def test_higher_order_bad_input():
    q, keys, values = _higher_order_inputs(3)
    with pytest.raises(ValueError, match="key sets but"):
        tensorattn.higher_order_attention(q, keys, values[:1])
    with pytest.raises(ValueError, match="order must be"):
        tensorattn.higher_order_attention(q, keys * 2, values * 2)


def _record_runs(monkeypatch):
    """Records the implementations `api` runs (and whether each raised Unsupported)."""
    from tensorattn.kernels import api

    runs = []
    real = api._run

    def run(name, *args):
        try:
            out = real(name, *args)
        except tensorattn.Unsupported:
            runs.append((name, "unsupported"))
            raise
        runs.append((name, "ran"))
        return out

    monkeypatch.setattr(api, "_run", run)
    return runs


def test_default_implementation_follows_key_count(monkeypatch):
    """Short keys go to the reference, long ones to the tiled kernel (both exact)."""
    runs = _record_runs(monkeypatch)
    for s, expected in ((12, "reference"), (40, "blocked")):
        case = Case(t=5, s1=s, s2=s)
        arrays, masks = case.inputs()
        out = tensorattn.tensor_attention(*arrays, **case.kwargs(masks))
        np.testing.assert_allclose(np.asarray(out), case.oracle(arrays, masks), atol=2e-5)
        assert runs[-1] == (expected, "ran")


def test_default_falls_back_when_pallas_cannot_run(monkeypatch):
    """Issue 11: on a GPU with H=16, Hv=24 the default tries pallas, which reports it cannot
    run the call (Hv is not a power of two), and falls back to an exact kernel."""
    runs = _record_runs(monkeypatch)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    case = Case(t=5, s1=6, s2=7, head_dim=16, value_dim=24)
    arrays, masks = case.inputs()
    out = tensorattn.tensor_attention(*arrays, **case.kwargs(masks))
    np.testing.assert_allclose(np.asarray(out), case.oracle(arrays, masks), atol=2e-5)
    assert runs == [("pallas", "unsupported"), ("reference", "ran")]
    # Named explicitly, the same refusal is a ValueError with the reason.
    with pytest.raises(ValueError, match=r"implementation='pallas' cannot run.*Hv=24"):
        tensorattn.tensor_attention(*arrays, implementation="pallas")


def test_tpu_default_skips_pallas(monkeypatch):
    """On TPU the Pallas kernels compile but have not been run: the default does not try
    them (docs/pallas.md, "TPU")."""
    runs = _record_runs(monkeypatch)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    arrays, _ = Case(t=5, s1=40, s2=40, head_dim=16, value_dim=16).inputs()
    tensorattn.tensor_attention(*arrays)
    assert runs == [("blocked", "ran")]


OPTION_ERRORS = {
    # Issue 11: these raised TypeError (the default picked "blocked", which took no `degree`).
    "degree-without-implementation": (dict(degree=4), r"degree.*implementation='polynomial'"),
    "tiles-without-implementation": (
        dict(block_q=8, interpret=True),
        r"block_q.*implementation='blocked'.*interpret.*implementation='pallas'",
    ),
    "blocked-degree": (dict(implementation="blocked", degree=4), r"'blocked' takes no.*degree"),
    "reference-tiles": (
        dict(implementation="reference", block_q=8),
        r"'reference' takes no option 'block_q'",
    ),
    "unknown-option": (dict(implementation="blocked", block_sizes=1), "block_sizes"),
    "config-of-another": (
        dict(implementation="reference", config=tensorattn.BlockedConfig()),
        "takes a ReferenceConfig, got BlockedConfig",
    ),
    "config-and-options": (
        dict(config=tensorattn.BlockedConfig(), block_q=8),
        "either config= or keyword options",
    ),
    "config-not-a-config": (dict(config={"block_q": 8}), "config must be a KernelConfig"),
    "pallas-order-2": (dict(implementation="pallas", interpret=True), None),
}


@pytest.mark.parametrize("name", sorted(OPTION_ERRORS))
def test_options_the_implementation_does_not_take_raise(name):
    kwargs, match = OPTION_ERRORS[name]
    arrays, _ = Case(t=5, s1=6, s2=7).inputs()
    if name == "pallas-order-2":
        with pytest.raises(ValueError, match=r"'pallas' cannot run this call: order 2"):
            tensorattn.higher_order_attention(arrays[0], arrays[1:2], arrays[3:4], **kwargs)
        return
    with pytest.raises(ValueError, match=match):
        tensorattn.tensor_attention(*arrays, **kwargs)


def test_config_runs_its_implementation_and_equals_the_shorthand(monkeypatch):
    runs = _record_runs(monkeypatch)
    case = Case(t=9, s1=9, s2=9, causal=True)
    arrays, masks = case.inputs()
    a = tensorattn.tensor_attention(*arrays, config=SMALL_BLOCKS, **case.kwargs(masks))
    b = tensorattn.tensor_attention(
        *arrays, implementation="blocked", block_q=4, block_outer=3, block_inner=4,
        **case.kwargs(masks),
    )  # fmt: skip
    assert runs == [("blocked", "ran")] * 2
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a), case.oracle(arrays, masks), atol=2e-5)


def test_array_scale_equals_float_scale():
    case = Case(t=9, s1=9, s2=9, causal=True)
    arrays, masks = case.inputs()
    for impl in ("reference", "blocked"):
        a = tensorattn.tensor_attention(*arrays, implementation=impl, scale=0.3)
        b = tensorattn.tensor_attention(*arrays, implementation=impl, scale=jnp.float32(0.3))
        c = tensorattn.tensor_attention(
            *arrays, implementation=impl, scale=jnp.full((case.heads,), 0.3)
        )
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(\) or \[N\]=\(4,\)"):
        tensorattn.tensor_attention(*arrays, scale=jnp.ones((3,)))


@pytest.mark.parametrize("implementation", ["reference", "blocked", "polynomial"])
def test_eager_calls_compile_once(implementation, caplog):
    """A repeated eager call (no outer jit) reuses its compilation, forward and gradient: the
    scan-based kernels used to compile on every call (250-750 ms at T=16 on 2 CPU cores)."""
    x = 0.3 * jax.random.normal(jax.random.key(0), (1, 16, 2, 4))
    options = {"degree": 4, "on_uncertified": "ignore"} if implementation == "polynomial" else {}

    def call(q):
        return tensorattn.tensor_attention(
            q, x, x, x, x, implementation=implementation, causal=True, **options
        )

    for _ in range(2):
        jax.block_until_ready((call(x), jax.grad(lambda q: call(q).sum())(x)))
    with jax.log_compiles(), caplog.at_level("WARNING", logger="jax"):
        jax.block_until_ready((call(x), jax.grad(lambda q: call(q).sum())(x)))
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert not compiled, compiled[:3]


@pytest.mark.parametrize("implementation", ["reference", "blocked"])
def test_large_finite_values_in_the_future_leave_earlier_rows_exact(implementation):
    """v1[5] = v2[5] = 1e20 are finite, but their product overflows float32: the rows that
    cannot see position 5 keep their exact outputs and gradients (no 0 · inf)."""
    ks = jax.random.split(jax.random.key(3), 5)
    q, k1, k2, v1, v2 = (jax.random.normal(k, (1, 6, 1, 4)) for k in ks)
    big1, big2 = v1.at[:, 5].set(1e20), v2.at[:, 5].set(1e20)

    def f(q, v1, v2):
        out = tensorattn.tensor_attention(
            q, k1, k2, v1, v2, implementation=implementation, causal=True
        )
        return out[:, :5]

    np.testing.assert_array_equal(f(q, big1, big2), f(q, v1, v2))
    grad = jax.grad(lambda q, a, b: f(q, a, b).sum())
    np.testing.assert_allclose(grad(q, big1, big2)[:, :5], grad(q, v1, v2)[:, :5], atol=1e-6)
