"""One conformance suite every implementation runs through, against the float64 oracle.

`IMPLS` is the table of implementations with their capabilities (orders, dtypes, gradients,
head dims they need); `CASES` the problems (masks, windows, cross lengths, grouped heads,
array scales, orders 2-4), with lengths that are not tile multiples. A case an
implementation cannot run is not generated (the capability says so, not a skip). Pallas runs
in interpret mode with small tiles (several tiles per axis, forward and backward tiles
different) and, on a GPU or a TPU, compiled with the default tiles. The polynomial method runs at a
certified setting (entries in [-0.5, 0.5], degree 6) and is held to its certificate.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import tensorattn
from tensorattn import (
    BlockedConfig,
    MosaicGPUConfig,
    PallasConfig,
    PolynomialConfig,
    ReferenceConfig,
)
from tensorattn.kernels import polynomial

F32, BF16 = np.dtype(np.float32), np.dtype(jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation under test and what it can run."""

    implementation: str
    config: tensorattn.KernelConfig
    orders: tuple = (2, 3, 4)
    dtypes: tuple = (F32, BF16)
    gradients: bool = True  # checks the gradients too
    head_dims: tuple | None = None  # (H, Hv) it needs (compiled Pallas: powers of two >= 16)
    entries: float = 1.0  # inputs uniform in [-entries, entries]
    needs_gpu: bool = False  # compiled kernels: marked `gpu` (skipped without one)
    needs_tpu: bool = False  # compiled for a TPU: marked `tpu` (skipped without one)
    certified: bool = False  # approximate: held to its certificate instead of a fixed tolerance


PALLAS_SMALL = PallasConfig(
    fwd_block_rows=8,
    fwd_block_k2=8,
    bwd_block_rows=16,
    bwd_block_k1=4,
    bwd_block_k2=16,
    interpret=True,
)
IMPLS = {
    "reference": Impl("reference", ReferenceConfig()),
    # Default tiles: outputs only (the gradient code is the one run with small tiles).
    "blocked": Impl("blocked", BlockedConfig(), gradients=False),
    "blocked-small-tiles": Impl("blocked", BlockedConfig(block_q=4, block_outer=3, block_inner=4)),
    "pallas-interpret": Impl("pallas", PALLAS_SMALL, orders=(3,)),
    "pallas-gpu": Impl("pallas", PallasConfig(), orders=(3,), head_dims=(16, 16), needs_gpu=True),
    # The TPU plan (128-key tiles, aligned row loads, query tiles on the grid), compiled.
    "pallas-tpu": Impl("pallas", PallasConfig(), orders=(3,), needs_tpu=True),
    # Mosaic GPU forward (Hopper) + Pallas backward; its interpret mode cannot run under this
    # suite's jax.jit (tests/test_mosaic_gpu.py runs it eagerly).
    "mosaic_gpu-gpu": Impl(
        "mosaic_gpu",
        MosaicGPUConfig(),
        orders=(3,),
        dtypes=(BF16,),
        head_dims=(64, 64),
        needs_gpu=True,
    ),  # fmt: skip
    "polynomial": Impl(
        "polynomial",
        PolynomialConfig(degree=6, chunk_size=8, on_uncertified="error"),
        entries=0.5,
        certified=True,
    ),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: sizes, masks and scale."""

    lengths: tuple = (11, 9)  # key set lengths: order = len + 1
    t: int = 13
    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 5
    value_dim: int = 3
    causal: bool = False
    window: tuple | None = None
    masked: bool = False
    scale: object = None  # None, a float, "array" (shape ()) or "per-head" (shape [N])
    dtype: np.dtype = F32

    @property
    def order(self) -> int:
        return len(self.lengths) + 1

    def runs_on(self, impl: Impl) -> bool:
        return self.order in impl.orders and self.dtype in impl.dtypes

    def inputs(self, impl: Impl, seed=0):
        rng = np.random.default_rng(seed)
        h, hv = impl.head_dims or (self.head_dim, self.value_dim)
        b, kv, e = self.batch, self.kv_heads, impl.entries
        q = rng.uniform(-e, e, (b, self.t, self.heads, h))
        keys = [rng.uniform(-e, e, (b, s, kv, h)) for s in self.lengths]
        values = [rng.uniform(-1, 1, (b, s, kv, hv)) for s in self.lengths]
        masks = None
        if self.masked:
            masks = [rng.random((b, s)) > 0.3 for s in self.lengths]
            masks[0][0, :] = False  # batch row 0 has no allowed tuple at all
        scale = self.scale
        if scale == "array":
            scale = np.float32(0.3)
        elif scale == "per-head":
            scale = rng.uniform(0.2, 0.6, self.heads).astype(np.float32)
        q, keys, values = (
            jnp.asarray(q, self.dtype),
            [jnp.asarray(k, self.dtype) for k in keys],
            [jnp.asarray(v, self.dtype) for v in values],
        )
        d_out = rng.normal(size=(b, self.t, self.heads, hv))
        return q, keys, values, masks, scale, d_out

    def attention(self, impl: Impl, q, keys, values, masks, scale):
        kw = dict(implementation=impl.implementation, config=impl.config, scale=scale)
        if self.order == 3:
            m = masks or (None, None)
            return tensorattn.tensor_attention(
                q, *keys, *values, causal=self.causal, window=self.window,
                k1_mask=m[0], k2_mask=m[1], **kw,
            )  # fmt: skip
        return tensorattn.higher_order_attention(
            q, keys, values, causal=self.causal, key_masks=masks, **kw
        )

    def oracle_kwargs(self, masks, scale):
        if scale is not None and not isinstance(scale, float):
            scale = np.asarray(scale, np.float64)  # () or per query head [N]
        return dict(
            scale=scale,
            causal=self.causal or self.window is not None,
            windows=self.window,
            masks=masks,
        )


# Every case checks the output and (where the implementation runs gradients) the gradient of
# every input, in one compiled call.
CASES = {
    "masked-per-head-scale": Case(masked=True, scale="per-head"),
    "one-head-float-scale": Case(heads=1, kv_heads=1, t=7, lengths=(5, 6), scale=1 / 5),
    "grouped-6-per-kv": Case(heads=6, kv_heads=1, t=9, lengths=(10, 4)),
    "causal-masked": Case(t=14, lengths=(14, 14), causal=True, masked=True),
    "causal-array-scale": Case(t=10, lengths=(10, 10), causal=True, scale="array"),
    "window": Case(t=19, lengths=(19, 19), window=(6, 3)),
    "window-masked": Case(t=19, lengths=(19, 19), window=(2, 9), masked=True),
    "bfloat16-causal": Case(t=17, lengths=(17, 17), causal=True, dtype=BF16),
    "order-2": Case(lengths=(7,), t=6),
    "order-4": Case(lengths=(7, 6, 5), t=6),
    "order-4-causal-masked": Case(lengths=(8, 8, 8), t=8, causal=True, masked=True),
}


def _marks(impl: Impl, name: str) -> list:
    if impl.needs_gpu:
        return [pytest.mark.gpu(hopper=name.startswith("mosaic_gpu"))]
    return [pytest.mark.tpu] if impl.needs_tpu else []


PARAMS = [
    pytest.param(
        impl_name,
        case_name,
        id=f"{impl_name}-{case_name}",
        marks=_marks(IMPLS[impl_name], impl_name),
    )
    for impl_name in IMPLS
    for case_name in CASES
    if CASES[case_name].runs_on(IMPLS[impl_name])
]


def _tolerance(impl: Impl, case: Case, q, keys, values, masks, scale):
    """`(forward atol, gradient rtol)`: fixed for the exact kernels (by dtype), from the
    certificate for the polynomial method."""
    if not impl.certified:
        return (3e-2, 3e-2) if case.dtype == BF16 else (2e-5, 1e-4)
    cert = polynomial.certificate(q, keys, values, scale=scale, key_masks=masks, config=impl.config)
    assert cert.certified, cert
    # The certificate bounds the output; the gradient (docs/math.md §5) has the same relative
    # accuracy, checked against a norm-relative tolerance with the same margin.
    return cert.certified_error, max(10 * cert.relative_error, 1e-4)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("impl_name,case_name", PARAMS)
def test_matches_oracle(impl_name, case_name):
    impl, case = IMPLS[impl_name], CASES[case_name]
    q, keys, values, masks, scale, d_out = case.inputs(impl)
    okw = case.oracle_kwargs(masks, scale)
    f64 = [np.asarray(x, np.float64) for x in (q, *keys, *values)]
    q64, keys64, values64 = f64[0], f64[1 : case.order], f64[case.order :]
    atol, grad_rtol = _tolerance(impl, case, q, keys, values, masks, scale)
    array_scale = scale is not None and not isinstance(scale, float)

    def loss(q, keys, values, scale):
        out = case.attention(impl, q, keys, values, masks, scale)
        return jnp.sum(out.astype(jnp.float32) * d_out), out

    if impl.gradients:
        argnums = (0, 1, 2, 3) if array_scale else (0, 1, 2)
        grads, out = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(q, keys, values, scale)
    else:
        out = jax.jit(lambda *a: loss(*a)[1])(q, keys, values, scale)
    assert out.shape == q.shape[:3] + (values[0].shape[-1],) and out.dtype == q.dtype
    want = oracle.attention(q64, keys64, values64, **okw)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=atol, rtol=atol)
    if case.masked:  # batch row 0 has no allowed tuple: zeros, not NaN
        np.testing.assert_array_equal(np.asarray(out[0], np.float64), 0.0)
    if not impl.gradients:
        return
    want_q, want_k, want_v = oracle.attention_grads(q64, keys64, values64, d_out, **okw)
    got = [grads[0], *grads[1], *grads[2]]
    for g, want, x in zip(got, [want_q, *want_k, *want_v], [q, *keys, *values]):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert np.all(np.isfinite(np.asarray(g, np.float64)))
        assert _rel(g, want) < grad_rtol, (_rel(g, want), grad_rtol)
    if case.masked:  # batch row 0 has no allowed tuple: its gradients are zero
        for g in got:
            np.testing.assert_array_equal(np.asarray(g[0], np.float64), 0.0)
    if array_scale:
        # d loss / d scale_n = sum over head n of (dL/dq_scaled · q): dq above is w.r.t. the
        # unscaled q, i.e. scale · dq_scaled, so dL/dscale_n = sum(dq · q)_n / scale_n.
        s = np.asarray(scale, np.float64)
        per_head = np.einsum("btnh,btnh->n", want_q, q64) / np.broadcast_to(s, (case.heads,))
        want_s = per_head.sum() if s.ndim == 0 else per_head
        assert grads[3].shape == np.shape(scale)
        assert _rel(grads[3], want_s) < grad_rtol
