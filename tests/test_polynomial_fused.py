"""Fused Pallas polynomial kernels (tensorattn/kernels/polynomial_fused.py) against the float64
oracle and the XLA polynomial kernel. On CPU they run in Pallas interpret mode (tiny shapes);
`test_compiled_on_gpu` runs the Triton kernels and skips without a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import tensorattn
from tensorattn.kernels import features, lowering, polynomial
from tensorattn.kernels import polynomial_fused as pf

DEGREE = 8  # Taylor: relative error 6.8e-6 on [-1, 1]


def _inputs(seed, t=11, s=(13, 9), n=4, kv=2, h=3, hv=3, dtype=np.float32, b=1):
    """Entries uniform in [-1, 1]; with scale 1/H every score lies in [-1, 1] (docs/math.md §4.1).
    Random key padding masks; with b=2 the second batch row has no valid first key."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(-1, 1, (b, t, n, h))
    keys = [rng.uniform(-1, 1, (b, sj, kv, h)) for sj in s]
    values = [rng.uniform(-1, 1, (b, sj, kv, hv)) for sj in s]
    masks = [rng.uniform(size=(b, sj)) > 0.3 for sj in s]
    masks[0][1:] = False
    cast = [jnp.asarray(x, dtype) for x in (q, *keys, *values)]
    return cast[0], cast[1:3], cast[3:5], masks


def _tolerance(degree=DEGREE):
    """Certified output error at R = 1 (docs/math.md §4.5: eps/(1-eps) times the value-product
    range, here <= 2), plus float32 rounding."""
    eps = polynomial.relative_error("taylor", degree, 1.0)
    return eps / (1 - eps) * 2 + 1e-5


def _fused(q, keys, values, masks, causal, **options):
    """`PolynomialConfig(fused=True)` (interpret mode unless `interpret=False`)."""
    options = {"interpret": True, "on_uncertified": "ignore", **options}
    config = tensorattn.PolynomialConfig(fused=True, **options)

    def fn(q, keys, values, masks):
        return tensorattn.tensor_attention(
            q,
            *keys,
            *values,
            causal=causal,
            k1_mask=masks[0],
            k2_mask=masks[1],
            scale=1.0 / q.shape[-1],
            config=config,
        )

    return jax.jit(fn)(q, keys, values, [jnp.asarray(m) for m in masks])


def _xla(q, keys, values, masks, causal, degree=DEGREE):
    def fn(q, keys, values, masks):
        return tensorattn.tensor_attention(
            q,
            *keys,
            *values,
            causal=causal,
            k1_mask=masks[0],
            k2_mask=masks[1],
            scale=1.0 / q.shape[-1],
            implementation="polynomial",
            degree=degree,
            on_uncertified="ignore",
        )

    return jax.jit(fn)(q, keys, values, [jnp.asarray(m) for m in masks])


def _oracle(q, keys, values, masks, causal):
    f64 = [np.asarray(x, np.float64) for x in (q, *keys, *values)]
    return oracle.attention(
        f64[0], f64[1:3], f64[3:5], scale=1.0 / q.shape[-1], causal=causal, masks=masks
    )


def test_selection_tables_give_the_monomials_of_features():
    rng = np.random.default_rng(0)
    h, degree = 5, 4
    x = rng.uniform(-1, 1, (7, h)).astype(np.float32)
    rank = features.monomials(h, degree).rank
    sel = pf._selection(h, degree, 16, 128)
    x_pad = np.zeros((7, 16), np.float32)
    x_pad[:, :h] = x
    picked = np.einsum("th,jhr->jtr", x_pad, sel[:degree]) + sel[degree, :degree, None, :]
    phi = picked[0] * picked[1] * picked[2] * picked[3]  # the kernel's product order
    want = features.features(jnp.asarray(x), features.monomials(h, degree))
    np.testing.assert_array_equal(phi[:, :rank], np.asarray(want))
    assert not phi[:, rank:].any()


@pytest.fixture
def small_segments(monkeypatch):
    """Causal kernels: one chunk per segment, so the states cross segment boundaries."""
    monkeypatch.setattr(pf, "SEGMENT_BYTES", 1)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_oracle_and_xla_kernel_float32(causal, small_segments):
    """Lengths not tile multiples, key padding masks (a batch row with none valid: zero
    output), grouped heads (N=4, K=2); causal: two rank groups, two segments."""
    s = (11, 11) if causal else (13, 9)
    q, keys, values, masks = _inputs(1, s=s, b=2)
    tiles = dict(block_rank=64, rank_group=128, causal_chunk=8) if causal else {}
    out = _fused(q, keys, values, masks, causal, degree=DEGREE, precision="highest", **tiles)
    out = np.asarray(out)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, _oracle(q, keys, values, masks, causal), atol=_tolerance())
    xla = np.asarray(_xla(q, keys, values, masks, causal))
    np.testing.assert_allclose(out, xla, atol=2e-6)
    assert np.all(out[1] == 0)


def test_bf16x3_precision_float32():
    """The default precision: products within ~2^-16 of the XLA kernel's float32."""
    q, keys, values, masks = _inputs(2)
    out = np.asarray(_fused(q, keys, values, masks, False, degree=4))
    xla = np.asarray(_xla(q, keys, values, masks, False, degree=4))
    np.testing.assert_allclose(out, xla, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16(causal):
    s = (11, 11) if causal else (13, 9)
    q, keys, values, masks = _inputs(3, s=s, dtype=jnp.bfloat16)
    out = _fused(q, keys, values, masks, causal, degree=6)  # eps 5e-4 << 2 ulp
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float64)
    ulp = 2.0**-8  # one bfloat16 ulp at |x| in [0.5, 1)
    np.testing.assert_allclose(out, _oracle(q, keys, values, masks, causal), atol=2 * ulp)
    xla = np.asarray(_xla(q, keys, values, masks, causal, degree=6), np.float64)
    np.testing.assert_allclose(out, xla, atol=ulp)


@pytest.mark.parametrize("causal,y_group", [(False, None), (False, 3), (True, None)])
def test_gradient(causal, y_group, small_segments, monkeypatch):
    """The fused closed-form gradient kernels against the oracle's gradient (and the XLA
    kernel's); grouped heads, masks (a batch row with no valid first key), lengths not tile
    multiples; causal: two segments (prefix states carried across), two rank groups;
    `y_group=3`: the key sums and Γ over groups of augmented coordinates, the last one padded
    (H+1 = 4 = 3 + 1)."""
    if y_group is not None:
        monkeypatch.setattr(pf, "_y_group", lambda *args: y_group)
    t = 9
    s = (t, t) if causal else (t, 7)
    q, keys, values, masks = _inputs(4, t=t, s=s, b=2)
    d_out = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, t, 4, 3)), jnp.float32)

    def loss(fn):
        def f(q, keys, values):
            return jnp.sum(fn(q, keys, values, masks, causal) * d_out)

        return f

    def fused(q, keys, values, masks, causal):
        tiles = dict(block_rank=64, rank_group=128, causal_chunk=8) if causal else {}
        return _fused(q, keys, values, masks, causal, degree=DEGREE, precision="highest", **tiles)

    got = jax.tree.leaves(jax.grad(loss(fused), argnums=(0, 1, 2))(q, keys, values))
    f64 = [np.asarray(x, np.float64) for x in (q, *keys, *values)]
    dq, dks, dvs = oracle.attention_grads(
        f64[0], f64[1:3], f64[3:5], np.asarray(d_out), scale=1 / 3, causal=causal, masks=masks
    )
    for g, o in zip(got, [dq, *dks, *dvs]):
        np.testing.assert_allclose(np.asarray(g), o, atol=_tolerance())
    if not causal:  # (causal: the oracle only, to keep the file's time)
        want = jax.grad(loss(_xla), argnums=(0, 1, 2))(q, keys, values)
        for g, w in zip(got, jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)


def test_output_and_gradients_in_the_inputs_dtypes():
    """q bfloat16, keys and values float32: the output is bfloat16 (q's dtype, as every
    kernel), each gradient in its input's dtype."""
    q, keys, values, masks = _inputs(6, t=5, s=(5, 5), n=2, kv=1, h=2, hv=2)
    q = q.astype(jnp.bfloat16)
    out = _fused(q, keys, values, masks, False, degree=4)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(_xla(q, keys, values, masks, False, 4)), atol=4e-3
    )

    def loss(q, keys, values):
        return jnp.sum(_fused(q, keys, values, masks, False, degree=4).astype(jnp.float32))

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, keys, values)
    assert [g.dtype for g in jax.tree.leaves(grads)] == [jnp.bfloat16] + [jnp.float32] * 4


@pytest.mark.parametrize("causal", [False, True])
def test_overflowed_rows_give_zeros_and_finite_gradients(causal):
    """Query row 4 at 1e6 (features would overflow) and, causal, key 3 of both sets at 1e4
    (prefix sums overflow from row 3 on): those rows output zeros and contribute zero
    gradients; the rest match the oracle. Non-causal with every key sum overflowing (keys at
    1e4): zeros and finite (zero) gradients."""
    q, keys, values, _ = _inputs(7, t=6, s=(6, 6), n=1, kv=1, h=2, hv=2)
    masks = [np.ones((1, 6), bool)] * 2
    q = q.at[0, 4].set(1e6)
    zero = np.zeros(6, bool)
    zero[4] = True
    if causal:
        keys = [k.at[0, 3].set(1e4) for k in keys]
        zero[3:] = True
    d_out = np.random.default_rng(8).normal(size=(1, 6, 1, 2))
    d_out[0, zero] = 0.0  # the oracle's gradient without the zeroed rows

    def loss(q, keys, values):
        out = _fused(q, keys, values, masks, causal, degree=DEGREE, precision="highest")
        return jnp.sum(out * d_out.astype(np.float32))

    out = np.asarray(_fused(q, keys, values, masks, causal, degree=DEGREE, precision="highest"))
    np.testing.assert_array_equal(out[0, zero], 0.0)
    ref = _oracle(q, keys, values, masks, causal)
    np.testing.assert_allclose(out[0, ~zero], ref[0, ~zero], atol=_tolerance())
    got = jax.tree.leaves(jax.grad(loss, argnums=(0, 1, 2))(q, keys, values))
    f64 = [np.asarray(x, np.float64) for x in (q, *keys, *values)]
    dq, dks, dvs = oracle.attention_grads(
        f64[0], f64[1:3], f64[3:5], d_out, scale=1 / 2, causal=causal, masks=masks
    )
    for g, o in zip(got, [dq, *dks, *dvs]):
        np.testing.assert_allclose(np.asarray(g), o, atol=1e-4)
    if not causal:
        keys = [k * 1e4 for k in keys]
        assert np.all(np.asarray(_fused(q, keys, values, masks, False, degree=DEGREE)) == 0)
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, keys, values)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_rejects_unsupported_calls_and_options():
    q, keys, values, _ = _inputs(7, s=(11, 11))
    config = tensorattn.PolynomialConfig(fused=True, on_uncertified="ignore")

    def call(**kwargs):
        return tensorattn.tensor_attention(q, *keys, *values, config=config, **kwargs)

    with pytest.raises(ValueError, match="window"):
        call(window=(4, None))
    with pytest.raises(ValueError, match="order 2"):
        spec = pf.AttentionSpec(scale=1.0, causal=False, windows=(None,), key_masks=(None,))
        pf.attention(q, keys[:1], values[:1], spec, config, degree=2)
    with pytest.raises(ValueError, match="scale"):
        call(scale=jnp.asarray(0.5))
    for options, match in [
        (dict(precision="fp8"), "precision"),
        (dict(block_rank=48), "block_rank"),
        (dict(block_rank=32, rank_group=16), "rank_group"),
        (dict(interpret=1), "interpret"),
        (dict(num_warps=0), "num_warps"),
        (dict(gradient="autodiff"), "gradient"),
    ]:
        with pytest.raises(ValueError, match=match):
            tensorattn.PolynomialConfig(fused=True, **options)
    with pytest.raises(ValueError, match="block_q .*fused=True"):
        tensorattn.PolynomialConfig(block_q=64)
    with pytest.raises(ValueError, match="fused must be a bool"):
        tensorattn.PolynomialConfig(fused=1)


def test_compiled_kernels_need_a_gpu(monkeypatch):
    """Without a GPU the compiled (Triton) kernels are refused before any work, with what
    runs instead: interpret=False on CPU, and on TPU by default (not the slow interpreter)."""
    q, keys, values, _ = _inputs(7, s=(11, 11))

    def call(**options):
        config = tensorattn.PolynomialConfig(fused=True, on_uncertified="ignore", **options)
        return tensorattn.tensor_attention(q, *keys, *values, config=config)

    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU and (pretended) TPU hosts")
    with pytest.raises(ValueError, match="compile for a GPU only .*'cpu'.*fused=False"):
        call(interpret=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="compile for a GPU only .*'tpu'.*interpret=True"):
        call()


def test_polynomial_config_fused_runs_the_fused_kernels():
    """`PolynomialConfig(fused=True)` through the public entry point: same result as the XLA
    scan, the certificate still checked, unsupported calls and options refused by name."""
    q, keys, values, masks = _inputs(8)
    config = tensorattn.PolynomialConfig(degree=DEGREE, fused=True, on_uncertified="error")

    def fn(q, keys, values, masks):
        return tensorattn.tensor_attention(
            q,
            *keys,
            *values,
            k1_mask=masks[0],
            k2_mask=masks[1],
            scale=1.0 / q.shape[-1],
            config=config,
        )

    got = jax.jit(fn)(q, keys, values, [jnp.asarray(m) for m in masks])
    want = _xla(q, keys, values, masks, causal=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
    with pytest.raises(ValueError, match="fused"):
        tensorattn.PolynomialConfig(fused=True, gradient="autodiff")
    with pytest.raises(ValueError, match="window"):
        tensorattn.tensor_attention(q, *keys[:1] * 2, *values[:1] * 2, window=(4, 2), config=config)


@pytest.mark.parametrize("causal", [False, True])
def test_lowers_to_triton_for_cuda_without_a_gpu(causal):
    """The kernels trace and lower to Triton custom calls for the "cuda" platform on any host
    (compiling the Triton IR to PTX needs the CUDA plugin, i.e. a GPU machine)."""
    shape = jax.ShapeDtypeStruct

    config = tensorattn.PolynomialConfig(
        degree=2, fused=True, interpret=False, on_uncertified="ignore"
    )

    def fn(q, k1, k2, v1, v2):
        return tensorattn.tensor_attention(q, k1, k2, v1, v2, causal=causal, config=config)

    def loss(*a):
        return jnp.sum(fn(*a).astype(jnp.float32))

    args = [shape((1, 32, 2, 8), jnp.bfloat16)] + [shape((1, 32, 1, 8), jnp.bfloat16)] * 4
    with lowering.gpu_target():
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == (1 if causal else 2)
    # Forward and gradient. Non-causal: 2 + (2 key sums, dQ, Γ, 2 dK/dV); causal: 1 + (the
    # causal gradient kernel, 2 dK/dV of the totals).
    with lowering.gpu_target():
        grad = jax.jit(jax.grad(loss, (0, 1, 2))).trace(*args)
        text = grad.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == (4 if causal else 8)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_on_gpu(causal, dtype):
    """The compiled Triton kernels agree with the XLA kernel at the shape of issue 14's head
    (H = Hv = 16, degree 4), lengths not tile multiples, masks, grouped heads."""
    t = 200
    q, keys, values, masks = _inputs(8, t=t, s=(t, t), n=4, kv=2, h=16, hv=16, dtype=dtype)
    out = _fused(q, keys, values, masks, causal, degree=4, interpret=False)
    xla = _xla(q, keys, values, masks, causal, degree=4)
    atol = 1e-4 if dtype == jnp.float32 else 2.0**-8
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(xla, np.float64), atol=atol)

    def loss(fn, **options):
        def f(q, keys, values):
            out = fn(q, keys, values, masks, causal, degree=4, **options)
            return jnp.sum(out.astype(jnp.float32) * jnp.cos(out.astype(jnp.float32)))

        return f

    got = jax.grad(loss(_fused, interpret=False), (0, 1, 2))(q, keys, values)
    want = jax.grad(loss(_xla), (0, 1, 2))(q, keys, values)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = np.max(np.abs(w)) + 1e-30
        assert np.max(np.abs(g - w)) <= (1e-4 if dtype == jnp.float32 else 2e-2) * scale
