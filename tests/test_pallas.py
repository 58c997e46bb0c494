"""Pallas-specific behaviour: tiles, interpret mode, what it refuses, the window swap.

Its forward and gradient against the float64 oracle (interpret mode, and compiled on a GPU)
run in tests/test_conformance.py with every other implementation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import tensorattn
from tensorattn import PallasConfig
from tensorattn.kernels import lowering, pallas, spine

SMALL = PallasConfig(
    fwd_block_rows=8, fwd_block_k2=8, bwd_block_rows=16, bwd_block_k1=4, bwd_block_k2=16,
    interpret=True,
)  # fmt: skip
B, N, K, H, HV = 2, 4, 2, 8, 16


def _inputs(seed, t, s1, s2, dtype=np.float32):
    rng = np.random.default_rng(seed)
    shapes = [(B, t, N, H), (B, s1, K, H), (B, s2, K, H), (B, s1, K, HV), (B, s2, K, HV)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes], rng


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_default_tiles_match_small_tiles():
    x, _ = _inputs(5, t=9, s1=7, s2=12)
    a = tensorattn.tensor_attention(*x, config=PallasConfig(interpret=True))
    b = tensorattn.tensor_attention(*x, config=SMALL)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_env_var_selects_interpret_mode(monkeypatch):
    x, _ = _inputs(6, t=5, s1=5, s2=5)
    monkeypatch.setenv("TENSORATTN_PALLAS_INTERPRET", "1")
    out = tensorattn.tensor_attention(*x, implementation="pallas", fwd_block_rows=8)
    assert _rel(out, oracle.attention(x[0], x[1:3], x[3:])) < 1e-4


def test_default_tiles_heuristic():
    """Today's defaults; forward tiles of 64 rows once 64 query heads share a kv head."""

    def plan(t, heads, config=None):
        call = spine.Call(1.0, False, (None, None), t, (t, t), heads=heads, kv_heads=1)
        return pallas.plan(call, config or PallasConfig())

    p = plan(512, 1)
    assert (p.fwd.rows, p.fwd.bk2, p.fwd.num_warps, p.fwd.num_stages) == (128, 64, 8, 2)
    # Backward: 64 rows, 32 second keys, 8 warps (larger tiles spill at H = 128).
    assert (p.bwd.rows, p.bwd.bk1, p.bwd.bk2, p.bwd.num_warps) == (64, 16, 32, 8)
    assert (p.kv2.rows, p.kv2.bk2, p.kv2.num_warps) == (64, 64, 8)  # its products' rows: keys
    p = plan(512, 64)
    assert (p.fwd.rows, p.fwd.bk2, p.fwd.num_warps) == (64, 64, 4)
    assert (p.bwd.rows, p.bwd.bq, p.bwd.splits) == (64, 1, 1)
    p = plan(512, 128)  # the forward keeps whole groups; backward tiles hold half of one
    assert (p.fwd.rows, p.fwd.splits, p.bwd.rows, p.bwd.bq, p.bwd.splits) == (128, 1, 64, 1, 2)
    assert (p.bwd.nq, p.bwd.nq_pos) == (1024, 512)
    p = plan(5, 1)  # short sequences: tiles shrink to the lengths (powers of two)
    assert (p.fwd.bq, p.fwd.bk2) == (8, 16)
    p = plan(512, 4, PallasConfig(fwd_block_rows=32, bwd_block_k2=32, num_warps=2))
    assert (p.fwd.bq, p.bwd.bk2, p.fwd.num_warps, p.bwd.num_warps) == (8, 32, 2, 2)


def test_unsupported_calls_raise_unsupported():
    x, _ = _inputs(7, t=5, s1=5, s2=5)
    spec = spine.validate(
        x[0], x[1:3], x[3:], causal=False, windows=None, key_masks=None, scale=None,
        key_names=("k1", "k2"), value_names=("v1", "v2"), mask_names=("m1", "m2"),
    )  # fmt: skip
    with pytest.raises(tensorattn.Unsupported, match="order 2"):
        pallas.attention(x[0], x[1:2], x[3:4], dataclasses.replace(spec, windows=(None,)), SMALL)
    if jax.default_backend() == "cpu":
        with pytest.raises(tensorattn.Unsupported, match="interpret=True"):
            pallas.attention(x[0], x[1:3], x[3:], spec, PallasConfig(interpret=False))
        with pytest.raises(ValueError, match="'pallas' cannot run this call.*GPU or TPU"):
            tensorattn.tensor_attention(*x, implementation="pallas", interpret=False)
    with pytest.raises(ValueError, match="PallasConfig.bwd_block_k1"):
        PallasConfig(bwd_block_k1=0)


def test_wider_first_window_swaps_the_key_sets(monkeypatch):
    """w1 > w2: the kernels run with the sets swapped (per-key loop over the smaller window);
    the output and every gradient still match the oracle, in the caller's order."""
    plans = []
    real = pallas._attend_cached
    monkeypatch.setattr(
        pallas, "_attend_cached", lambda plan, *a: plans.append(plan) or real(plan, *a)
    )
    x, rng = _inputs(2, t=15, s1=15, s2=15)
    m1 = rng.random((B, 15)) > 0.2
    kw = dict(window=(6, 2), k1_mask=m1)
    okw = dict(causal=True, windows=(6, 2), masks=[m1, None])
    d_out = rng.standard_normal((B, 15, N, HV))

    def loss(*args):
        out = tensorattn.tensor_attention(*args, config=SMALL, **kw)
        return jnp.sum(out * d_out), out

    grads, out = jax.grad(loss, argnums=tuple(range(5)), has_aux=True)(*x)
    assert plans[0].fwd.call.windows == (2, 6)
    assert _rel(out, oracle.attention(x[0], x[1:3], x[3:], **okw)) < 1e-5
    dq, dk, dv = oracle.attention_grads(x[0], x[1:3], x[3:], d_out, **okw)
    for got, want in zip(grads, [dq, *dk, *dv]):
        assert _rel(got, want) < 1e-5


def test_fused_backward_choice():
    """dK1/dV1 join the dQ kernel (partial sums) by default when the first key set has a
    causal window short enough; the three-kernel backward otherwise, or when asked."""

    def plan(t, heads, windows, config=None, kernel="bwd"):
        call = spine.Call(1.0, True, windows, t, (t, t), heads=heads, kv_heads=1)
        return getattr(pallas.plan(call, config or PallasConfig()), kernel)

    p = plan(4096, 64, (32, 512))  # fused tiles: 64 rows (bq 1), 8 warps; span 32
    assert p.fuse_k1 and (p.rows, p.bq, p.span, p.num_warps) == (64, 1, 32, 8)
    p = plan(4096, 64, (32, 512), kernel="kv2")  # dK2/dV2 keeps the split tiles
    assert not p.fuse_k1 and (p.rows, p.bq, p.bk2) == (64, 1, 64)
    p = plan(4096, 128, (32, 512))  # 64-row tiles of half a position's heads
    assert p.fuse_k1 and (p.rows, p.bq, p.splits) == (64, 1, 2)
    assert plan(4096, 2, (32, 512)).fuse_k1  # bq 32: span 63 <= 128
    p = plan(4096, 2, (512, None))  # span 543 > 128: the split kernels' tiles
    assert not p.fuse_k1 and (p.rows, p.num_warps) == (64, 8)
    assert not plan(4096, 2, (None, None)).fuse_k1  # causal, no window
    assert not plan(4096, 64, (32, 512), PallasConfig(bwd_fuse_k1=False)).fuse_k1
    x, _ = _inputs(8, t=6, s1=6, s2=6)
    with pytest.raises(ValueError, match="bwd_fuse_k1=True needs a causal window"):
        tensorattn.tensor_attention(
            *x, implementation="pallas", causal=True, bwd_fuse_k1=True, interpret=True
        )
    with pytest.raises(ValueError, match="PallasConfig.bwd_fuse_k1"):
        PallasConfig(bwd_fuse_k1=1)


LAYOUTS = ["fused", "split", "fused-heads", "split-heads", "default-tiles"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_variants_match_oracle(layout):
    """Both backward layouts, a window whose partial sums start before key 0, key masks,
    a length that is not a tile multiple, two positions per tile (bq = 2), or ("-heads") one
    head of a position per tile (`_Config.splits` = G = 2); with default tiles, bq = 32."""
    t = 40 if layout == "default-tiles" else 19
    x, rng = _inputs(9, t=t, s1=t, s2=t)
    masks = [rng.random((B, t)) > 0.3 for _ in range(2)]
    d_out = rng.standard_normal((B, t, N, HV))
    config = {
        "fused": dataclasses.replace(SMALL, bwd_block_rows=4, bwd_fuse_k1=True),
        "split": dataclasses.replace(SMALL, bwd_block_rows=4, bwd_fuse_k1=False),
        "fused-heads": dataclasses.replace(SMALL, bwd_block_rows=1, bwd_fuse_k1=True),
        "split-heads": dataclasses.replace(SMALL, bwd_block_rows=1, bwd_fuse_k1=False),
        "default-tiles": PallasConfig(interpret=True),
    }[layout]

    def loss(*args):
        out = tensorattn.tensor_attention(
            *args, config=config, window=(5, 9), k1_mask=masks[0], k2_mask=masks[1]
        )
        return jnp.sum(out * d_out)

    grads = jax.grad(loss, argnums=tuple(range(5)))(*x)
    okw = dict(causal=True, windows=(5, 9), masks=masks)
    dq, dk, dv = oracle.attention_grads(x[0], x[1:3], x[3:], d_out, **okw)
    for got, want in zip(grads, [dq, *dk, *dv]):
        assert _rel(got, want) < 1e-5


# (B, T, N, K, D, window): issue 10's shapes, cut in length; lowering only, no execution.
LOWER = {
    "g64-d128-w512x32": (1, 1000, 64, 1, 128, (512, 32)),  # swapped; fused backward
    "g128-d128-w32x256": (1, 1000, 128, 1, 128, (32, 256)),  # fused, two tiles per position
    "g2-d64-causal": (2, 300, 4, 2, 64, None),  # three-kernel backward
}


@pytest.mark.parametrize("name", sorted(LOWER))
def test_lowers_for_cuda(name, monkeypatch):
    """Forward and backward lower to Triton custom calls for the "cuda" platform on any host
    (compiling them to PTX needs a GPU machine)."""
    target = lowering.abstract_gpu()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the kernels' launch settings
    b, t, n, kv, d, window = LOWER[name]
    shapes = [(b, t, n, d)] + [(b, t, kv, d)] * 4
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]

    def loss(q, k1, k2, v1, v2):
        spec = spine.validate(
            q, (k1, k2), (v1, v2), causal=True, windows=window, key_masks=None, scale=None,
            key_names=("k1", "k2"), value_names=("v1", "v2"), mask_names=("m1", "m2"),
        )  # fmt: skip
        out = pallas.attention(q, (k1, k2), (v1, v2), spec, PallasConfig(interpret=False))
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(5))))
    with target:
        text = grad.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # The forward, then the backward: fused dQ/dK1/dV1 and dK2/dV2, or three kernels.
    assert text.count("__gpu$xla.gpu.triton") == (3 if window else 4)


SMALL_TPU = PallasConfig(
    fwd_block_rows=16, fwd_block_k2=16, bwd_block_rows=16, bwd_block_k2=16, bwd_block_k1=16,
    interpret=True,
)  # fmt: skip
# name -> (config, (T, S1, S2), (N, K), window or None for non-causal, masked)
TPU_CASES = {
    "default-tiles": (PallasConfig(interpret=True), (37, 37, 37), (4, 2), (9, 5), True),
    "small-tiles": (SMALL_TPU, (37, 37, 37), (4, 2), (9, 5), True),
    "small-tiles-cross": (SMALL_TPU, (21, 40, 19), (4, 2), None, False),
    # 32 heads per key/value head in tiles of 16 rows: each position is two row tiles.
    "split-heads": (SMALL_TPU, (19, 19, 19), (32, 1), (None, 4), False),
}


@pytest.mark.parametrize("name", sorted(TPU_CASES))
def test_tpu_tiles_match_oracle(name, monkeypatch):
    """The TPU plan run in interpret mode against the oracle: G·block_q rows a multiple of 16,
    one-row loads through aligned 16-row blocks (`_Config.row_align`), the dK/dV kernels
    over a grid axis of query tiles (`grid_q`), the split backward; 128-key tiles (one per
    key set here) or several 16-key tiles and query tiles; key masks, windows wider first
    (swapped), non-causal cross lengths, positions split over row tiles, lengths that are not
    tile multiples."""
    monkeypatch.setattr(pallas, "_tpu_tiles", lambda interpret: True)
    config, (t, s1, s2), (n, kv), window, masked = TPU_CASES[name]
    rng = np.random.default_rng(11)
    shapes = [(B, t, n, H), (B, s1, kv, H), (B, s2, kv, H), (B, s1, kv, HV), (B, s2, kv, HV)]
    x = [jnp.asarray(rng.standard_normal(shape), np.float32) for shape in shapes]
    masks = [rng.random((B, s)) > 0.3 for s in (s1, s2)] if masked else [None, None]
    d_out = rng.standard_normal((B, t, n, HV))
    causal = window is not None
    call = spine.Call(1.0, causal, window or (None, None), t, (s1, s2), heads=n, kv_heads=kv)
    p = pallas.plan(call, config)
    assert all(c.row_align == 16 and c.grid_q for c in (p.fwd, p.bwd, p.kv2))
    assert not p.bwd.fuse_k1 and p.fwd.bk2 == (128 if config.fwd_block_k2 is None else 16)
    assert p.bwd.splits == (2 if name == "split-heads" else 1)

    def loss(*args):
        out = tensorattn.tensor_attention(
            *args, config=config, causal=causal, window=window, k1_mask=masks[0],
            k2_mask=masks[1],
        )  # fmt: skip
        return jnp.sum(out * d_out), out

    grads, out = jax.grad(loss, argnums=tuple(range(5)), has_aux=True)(*x)
    okw = dict(causal=causal, windows=window, masks=None if not masked else masks)
    assert _rel(out, oracle.attention(x[0], x[1:3], x[3:], **okw)) < 1e-5
    dq, dk, dv = oracle.attention_grads(x[0], x[1:3], x[3:], d_out, **okw)
    for got, want in zip(grads, [dq, *dk, *dv]):
        assert _rel(got, want) < 1e-5


def test_tpu_plan_rounds_rows_to_16(monkeypatch):
    monkeypatch.setattr(pallas, "_tpu_tiles", lambda interpret: True)
    for heads, rows in [(3, 48), (1, 16), (64, 64)]:
        call = spine.Call(1.0, False, (None, None), 5, (300, 300), heads=heads, kv_heads=1)
        p = pallas.plan(call, PallasConfig())
        assert p.fwd.rows % 16 == 0 and p.bwd.rows % 16 == 0
        assert (p.bwd.rows, p.fwd.bk2, p.kv2.bk2) == (rows, 128, 128)


def _tpu_call(shape_q, shape_k, dtype=jnp.bfloat16, window=(96, 32), **config):
    """`pallas.attention` traced (not run) as for a TPU v5e."""
    q = jax.ShapeDtypeStruct(shape_q, dtype)
    k = jax.ShapeDtypeStruct(shape_k, dtype)

    def f(q, k):
        spec = spine.validate(
            q, (k, k), (k, k), causal=True, windows=window, key_masks=None, scale=None,
            key_names=("k1", "k2"), value_names=("v1", "v2"), mask_names=("m1", "m2"),
        )  # fmt: skip
        out = pallas.attention(q, (k, k), (k, k), spec, PallasConfig(interpret=False, **config))
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(f, argnums=(0, 1))).trace(q, k)


def test_lowers_for_tpu():
    """Forward and backward lower to Mosaic custom calls for the "tpu" platform on any host
    (libtpu compiles them without a TPU: `experiments.tpu_compile`)."""
    with lowering.tpu_target():
        traced = _tpu_call((1, 300, 8, 128), (1, 300, 2, 128))
        text = traced.lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("@tpu_custom_call") == 4  # forward, dQ, dK1/dV1, dK2/dV2


TPU_REFUSALS = {
    "float16": (dict(dtype=jnp.float16), "float16 on TPU"),
    "fused-backward": (dict(bwd_fuse_k1=True), "bwd_fuse_k1=True on TPU"),
    "narrow-key-tiles": (dict(fwd_block_k2=64), "fwd_block_k2=64 .*multiple of 128"),
    "narrow-key-tiles-short": (
        dict(bwd_block_k2=16, shape_q=(1, 13, 8, 64), shape_k=(1, 13, 2, 64)),
        "bwd_block_k2=16 .*multiple of 128",
    ),
    "first-key-tiles": (dict(bwd_block_k1=8), "bwd_block_k1=8 \\(on TPU multiples of 16"),
    # 64 heads per key/value head in tiles of 8: one position's heads split in 8 tiles.
    "rows": (
        dict(bwd_block_rows=8, shape_q=(1, 300, 64, 64), shape_k=(1, 300, 1, 64)),
        "bwd tiles of 8 rows",
    ),
    # 131072 keys: the whole key sets need 196 MiB of VMEM.
    "vmem": (dict(shape_q=(1, 2**17, 8, 128), shape_k=(1, 2**17, 1, 128)), " 196 MiB .* 96 MiB"),
}


@pytest.mark.parametrize("name", sorted(TPU_REFUSALS))
def test_tpu_refuses_what_mosaic_cannot_compile(name):
    kwargs, message = TPU_REFUSALS[name]
    kwargs = {"shape_q": (1, 300, 8, 64), "shape_k": (1, 300, 2, 64), **kwargs}
    with lowering.tpu_target(), pytest.raises(tensorattn.Unsupported, match=message):
        _tpu_call(**kwargs)
