"""The Mosaic GPU forward kernel (`implementation="mosaic_gpu"`).

Without a GPU: (1) the kernel lowers for CUDA (Pallas -> Mosaic GPU runs in Python: layouts,
shared memory, TMA, wgmma shapes) at issue 10's shapes; (2) it runs in Mosaic GPU's interpret
mode on tiny shapes against the float64 oracle, forward and one gradient (the gradient is the
Pallas backward, in Pallas interpret mode). (3) On a GPU the same cases run compiled.
"""

import contextlib
import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import tensorattn
from tensorattn import MosaicGPUConfig
from tensorattn.kernels import api, lowering, mosaic_gpu, mosaic_gpu_bwd, spine

BF16, F16 = jnp.bfloat16, jnp.float16
INTERPRET = MosaicGPUConfig(interpret=True)
on_gpu = jax.default_backend() == "gpu"


def _spec(q, keys, values, *, causal=False, window=None, masks=None):
    return spine.validate(
        q, keys, values, causal=causal, windows=window, key_masks=masks, scale=None,
        key_names=("k1", "k2"), value_names=("v1", "v2"), mask_names=("m1", "m2"),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# (1) Lowering for CUDA, no execution.

# (B, T, N, K, H, Hv, dtype, window, causal, S1, S2, config)
LOWER = {
    "g64-d128-w32x256-bf16": (1, 1000, 64, 1, 128, 128, BF16, (32, 256), False, None, None, None),
    "g128-d128-w512x32-bf16": (1, 2048, 128, 1, 128, 128, BF16, (512, 32), False, None, None, None),
    "g64-d64-causal-f16": (1, 300, 64, 1, 64, 64, F16, None, True, None, None, None),
    "g128-d64-hv128-w32x256-f16": (2, 100, 256, 2, 64, 128, F16, (32, 256), False, None, None,
                                   None),
    "g4-d64-cross-lengths-masked": (2, 50, 8, 2, 64, 64, BF16, None, False, 100, 77, None),
    "g2-d128-tiles": (1, 129, 2, 1, 128, 64, BF16, (32, 512), False, None, None,
                      MosaicGPUConfig(block_k1=64, block_k2=128, max_concurrent_steps=2)),
    "g3-three-wgs": (1, 64, 3, 1, 64, 64, BF16, (32, 256), False, None, None, None),
    "g128-one-wg": (1, 256, 128, 1, 64, 64, BF16, (32, 256), False, None, None,
                    MosaicGPUConfig(num_compute_wgs=1)),
    # The shared-memory operands of interpret mode, compiled (default: register operands).
    "g64-smem-operands": (1, 1000, 64, 1, 128, 128, BF16, (32, 256), False, None, None,
                          MosaicGPUConfig(register_operands=False)),
    # Two compute warpgroups without the ping-pong schedule barrier (default: with it).
    "g64-no-schedule": (1, 1000, 64, 1, 128, 128, BF16, (512, 32), False, None, None,
                        MosaicGPUConfig(schedule_barrier=False)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LOWER))
def test_lowers_for_cuda(name):
    b, t, n, kv, h, hv, dtype, window, causal, s1, s2, config = LOWER[name]
    s1, s2 = s1 or t, s2 or t
    shapes = [(b, t, n, h), (b, s1, kv, h), (b, s2, kv, h), (b, s1, kv, hv), (b, s2, kv, hv)]
    args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    masked = s1 != t
    if masked:
        args += [jax.ShapeDtypeStruct((b, s1), bool), jax.ShapeDtypeStruct((b, s2), bool)]

    def f(q, k1, k2, v1, v2, *masks):
        keys, values = (k1, k2), (v1, v2)
        spec = _spec(q, keys, values, causal=causal, window=window, masks=masks or None)
        return mosaic_gpu.forward(q, keys, values, spec, config)

    with lowering.abstract_gpu():
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


# ---------------------------------------------------------------------------------------------
# (2) Numerics against the float64 oracle (interpret mode on CPU; compiled on a GPU).


@dataclasses.dataclass(frozen=True)
class Case:
    t: int
    batch: int = 1
    heads: int = 4
    kv_heads: int = 2
    lengths: tuple | None = None  # (S1, S2); None: T
    value_dim: int = 64
    window: tuple | None = None
    causal: bool = False
    masked: bool = False
    dtype: object = BF16
    config: MosaicGPUConfig = MosaicGPUConfig()

    def inputs(self, seed=0):
        rng = np.random.default_rng(seed)
        b, kv, h = self.batch, self.kv_heads, 64
        s1, s2 = self.lengths or (self.t, self.t)
        shapes = [(b, self.t, self.heads, h), (b, s1, kv, h), (b, s2, kv, h)]
        shapes += [(b, s1, kv, self.value_dim), (b, s2, kv, self.value_dim)]
        x = [jnp.asarray(rng.standard_normal(s), self.dtype) for s in shapes]
        masks = [rng.random((b, s)) > 0.3 for s in (s1, s2)] if self.masked else None
        return x, masks

    def run(self, x, masks, config):
        m = masks or (None, None)
        return tensorattn.tensor_attention(
            *x, config=config, window=self.window, causal=self.causal, k1_mask=m[0], k2_mask=m[1]
        )

    def oracle(self, x, masks):
        x64 = [np.asarray(a.astype(jnp.float32), np.float64) for a in x]
        causal = self.causal or self.window is not None
        kw = dict(causal=causal, windows=self.window, masks=masks)
        return x64, kw


CASES = {
    # G=2 query heads per kv head: 32 positions per program; w1 < w2: no swap.
    "window-w1<w2-masked": Case(t=24, window=(4, 12), masked=True),
    # w1 > w2: the key sets are swapped.
    "window-w1>w2-masked": Case(t=24, window=(12, 4), masked=True),
    # Full causal, length not a tile multiple, more steps than pipeline slots (block_k1=8).
    "causal-steps": Case(
        t=33, causal=True, config=MosaicGPUConfig(block_k1=8, max_concurrent_steps=2)
    ),
    # 64 query heads per kv head (one position per program), Hv != H, float16.
    "grouped-64-f16": Case(
        t=5, heads=64, kv_heads=1, value_dim=128, window=(2, 4), dtype=F16, masked=True
    ),
    # 128 query heads per kv head on one 128-row compute warpgroup.
    "grouped-128-one-wg": Case(
        t=5, heads=128, kv_heads=1, window=(2, 4), config=MosaicGPUConfig(num_compute_wgs=1)
    ),
    # Cross attention: S1 != S2 != T, two second-key tiles, key masks per batch row.
    "cross-lengths-masked": Case(t=20, batch=2, lengths=(12, 70), masked=True),
    # Pairs every row of a program sees skip the position masks: 16 positions per program
    # and second-key tiles of 64, so that some tiles and first keys are inside both windows
    # (swapped: w1 > w2), or below the causal diagonal.
    "edge-masks-window": Case(t=136, heads=4, kv_heads=1, window=(90, 20), masked=True),
    "edge-masks-causal": Case(t=80, heads=4, kv_heads=1, causal=True),
    # No causal mask, no key mask: the second-key tile past T=20 needs the padding biases; at
    # T=64 no score needs a bias (`_Config.biased`).
    "full-padded": Case(t=20),
    "full-no-biases": Case(t=64),
}
# The interpreter runs each simulated warpgroup as a concurrent XLA CPU computation blocking
# in callbacks; with 2 cores a third one (two compute warpgroups + producer) can starve and
# hang (seen on jax 0.10.2), so these run in interpret mode only on >= 4 cores.
MANY_THREADS = {
    # 128 query heads per kv head: two compute warpgroups share each pipeline slot.
    "grouped-128-two-wgs": Case(t=5, heads=128, kv_heads=1, window=(2, 4)),
}
ATOL = {BF16: 3e-2, F16: 5e-3}


def _on_interpreter_device(config: MosaicGPUConfig):
    """Interpret mode on the host CPU, also on a GPU machine: the same runs as in CI."""
    if config.interpret and on_gpu:
        return jax.default_device(jax.devices("cpu")[0])
    return contextlib.nullcontext()


def _check_forward(case: Case, config: MosaicGPUConfig):
    with _on_interpreter_device(config):
        x, masks = case.inputs()
        config = dataclasses.replace(
            case.config, interpret=config.interpret, register_operands=config.register_operands
        )
        out = case.run(x, masks, config)
    assert out.shape == x[0].shape[:3] + (case.value_dim,) and out.dtype == x[0].dtype
    x64, kw = case.oracle(x, masks)
    want = oracle.attention(x64[0], x64[1:3], x64[3:], **kw)
    err = float(np.max(np.abs(np.asarray(out, np.float64) - want)))
    print(f"max |out - oracle| = {err:.3g}")
    assert err < ATOL[case.dtype], err


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreter_matches_oracle(name):
    _check_forward(CASES[name], INTERPRET)


@pytest.mark.skipif((os.cpu_count() or 1) < 4, reason="the interpreter can hang on < 4 cores")
@pytest.mark.parametrize("name", sorted(MANY_THREADS))
def test_interpreter_two_warpgroups(name):
    _check_forward(MANY_THREADS[name], INTERPRET)


@pytest.mark.gpu(hopper=True)
@pytest.mark.parametrize("name", sorted(CASES | MANY_THREADS))
def test_gpu_matches_oracle(name):
    _check_forward((CASES | MANY_THREADS)[name], MosaicGPUConfig(interpret=False))


@pytest.mark.gpu(hopper=True)
@pytest.mark.parametrize("name", ["window-w1>w2-masked", "grouped-64-f16"])
def test_gpu_shared_memory_operands_match_oracle(name):
    """The interpreter's operand layout, compiled (`register_operands=False`)."""
    _check_forward(CASES[name], MosaicGPUConfig(interpret=False, register_operands=False))


def _check_gradient(config: MosaicGPUConfig, case: Case = Case(t=16, window=(4, 9), masked=True)):
    """All five gradients against the float64 oracle."""
    backward = config.backward or case.config.backward
    config = dataclasses.replace(case.config, interpret=config.interpret, backward=backward)
    with _on_interpreter_device(config):
        x, masks = case.inputs(seed=3)
        d_out = np.random.default_rng(4).standard_normal(x[0].shape[:3] + (case.value_dim,))

        def loss(*x):
            return jnp.sum(case.run(x, masks, config).astype(jnp.float32) * d_out)

        grad = jax.grad(loss, argnums=tuple(range(5)))
        # Interpret mode runs eagerly: under an outer jax.jit it hung here (2 cores, jax 0.10.2).
        grads = grad(*x) if config.interpret else jax.jit(grad)(*x)
    x64, kw = case.oracle(x, masks)
    dq, dk, dv = oracle.attention_grads(x64[0], x64[1:3], x64[3:], d_out, **kw)
    for name, g, want in zip(("dq", "dk1", "dk2", "dv1", "dv2"), grads, [dq, *dk, *dv]):
        g = np.asarray(g, np.float64)
        rel = np.linalg.norm(g - want) / np.linalg.norm(want)
        print(f"{name} relative error {rel:.3g}")
        assert rel < 3e-2, (name, rel)


def test_interpreter_gradient_matches_oracle():
    _check_gradient(INTERPRET)


@pytest.mark.gpu(hopper=True)
def test_gpu_gradient_matches_oracle():
    _check_gradient(MosaicGPUConfig(interpret=False))


# ---------------------------------------------------------------------------------------------
# (4) The Mosaic GPU backward (`MosaicGPUConfig(backward="mosaic_gpu")`): lowered for CUDA at
# the forward's shapes; its five gradients against the oracle in interpret mode (one dK/dV
# compute warpgroup there, two compiled) and on a GPU.

BWD_CASES = {
    name: CASES[name]
    for name in (
        "window-w1<w2-masked",
        "window-w1>w2-masked",
        "causal-steps",
        "grouped-64-f16",
        "full-padded",
        "full-no-biases",
        # Pairs below the causal diagonal skip the position masks in the dQ kernel too.
        "edge-masks-causal",
    )
} | {
    # The same inside both windows, fused: positions 64..79 see the whole second-key tile
    # [0, 64) (swapped: w2 = 80) and first keys 60..64 (w1 = 20). Shorter than the forward's
    # case, for CI's time.
    "edge-masks-window-fused": Case(t=80, heads=4, kv_heads=1, window=(80, 20), masked=True),
    # Cross attention with key masks; dK1/dV1's streamed set is the longer second one.
    "cross-lengths-masked": Case(t=20, batch=2, lengths=(12, 70), masked=True),
    # G = 128: dQ on one 128-row warpgroup; dK/dV on 64-row tiles holding half the heads.
    "grouped-128-split": CASES["grouped-128-one-wg"],
    # Windows: dK1/dV1 from the dQ kernel's partial sums by default; here the dK/dV kernel.
    "window-w1>w2-unfused": Case(
        t=24,
        window=(12, 4),
        masked=True,
        config=MosaicGPUConfig(backward="mosaic_gpu", bwd_fuse_k1=False),
    ),
}
MOSAIC_BWD = MosaicGPUConfig(backward="mosaic_gpu")


FUSED_AT = ("g64-d128-w32x256-bf16", "g128-d128-w512x32-bf16", "g64-no-schedule")


@pytest.mark.parametrize(
    "name", sorted(n for n in LOWER if n != "g64-smem-operands")
)  # fmt: skip
def test_backward_lowers_for_cuda(name):
    b, t, n, kv, h, hv, dtype, window, causal, s1, s2, config = LOWER[name]
    s1, s2 = s1 or t, s2 or t
    shapes = [(b, t, n, h), (b, s1, kv, h), (b, s2, kv, h), (b, s1, kv, hv), (b, s2, kv, hv)]
    args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes + [(b, t, n, hv)]]
    if s1 != t:
        args += [jax.ShapeDtypeStruct((b, s1), bool), jax.ShapeDtypeStruct((b, s2), bool)]

    fused = []

    def f(q, k1, k2, v1, v2, d_out, *masks):
        keys, values = (k1, k2), (v1, v2)
        spec = _spec(q, keys, values, causal=causal, window=window, masks=masks or None)
        cfg = mosaic_gpu._prepare(q, keys, values, spec, config)[0]
        fused.append(mosaic_gpu_bwd.plan(cfg, h, hv, dtype).dq.fuse)
        return mosaic_gpu.gradients(q, keys, values, d_out, spec, config)

    with lowering.abstract_gpu():
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # The forward, dQ (with dK1/dV1's partial sums when fused) and dK/dV kernels.
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == (3 if fused[0] else 4)
    # FBGEMM's and the paper's shapes (first window 32 once ordered) take the fused layout.
    assert fused[0] or name not in FUSED_AT


@pytest.mark.parametrize("name", sorted(BWD_CASES))
def test_interpreter_backward_matches_oracle(name):
    _check_gradient(dataclasses.replace(MOSAIC_BWD, interpret=True), BWD_CASES[name])


@pytest.mark.skipif((os.cpu_count() or 1) < 4, reason="the interpreter can hang on < 4 cores")
@pytest.mark.parametrize("name", sorted(MANY_THREADS))
def test_interpreter_backward_two_warpgroups(name):
    """Two compute warpgroups in the fused dQ kernel, each with its own partial sums."""
    _check_gradient(dataclasses.replace(MOSAIC_BWD, interpret=True), MANY_THREADS[name])


@pytest.mark.gpu(hopper=True)
@pytest.mark.parametrize("name", sorted(BWD_CASES | MANY_THREADS))
def test_gpu_backward_matches_oracle(name):
    _check_gradient(
        dataclasses.replace(MOSAIC_BWD, interpret=False), (BWD_CASES | MANY_THREADS)[name]
    )  # fmt: skip


def test_key_biases_only_where_needed():
    """Scores take the 0/-inf key biases only with a key mask or, without a causal mask, a
    second-key tile past the end; the backward kernels follow the forward."""

    def cfg(t, causal=False, masked=False):
        q, k = jnp.zeros((1, t, 2, 64), BF16), jnp.zeros((1, t, 1, 64), BF16)
        masks = (jnp.ones((1, t), bool), None) if masked else None
        spec = _spec(q, (k, k), (k, k), causal=causal, masks=masks)
        forward = mosaic_gpu._prepare(q, (k, k), (k, k), spec, INTERPRET)[0]
        return forward, mosaic_gpu_bwd.plan(forward, 64, 64, BF16).dq

    assert [cfg(t)[0].biased for t in (20, 64, 128)] == [True, False, False]
    assert not cfg(20, causal=True)[0].biased and cfg(64, masked=True)[0].biased
    assert [cfg(t)[1].dq_biased for t in (20, 64)] == [True, False]
    assert cfg(64, masked=True)[1].key_masks and not cfg(20, causal=True)[1].key_masks


def test_backward_tiles():
    def tiles(group, interpret=False):
        call = spine.Call(1.0, True, (32, None), 512, (512, 512), heads=group, kv_heads=1)
        config = MosaicGPUConfig(interpret=interpret)
        plan = mosaic_gpu_bwd.plan(mosaic_gpu._plan(call, config), 128, 128, BF16)
        return (plan.dq.bq, plan.dq.rows, plan.dq.wgs), (plan.kv.bq, plan.kv.splits, plan.kv.rows)

    # dK/dV query tiles of 64 rows (the columns of its score tiles), a position's heads split
    # when G > 64; dQ keeps the forward's tiles.
    assert tiles(64) == ((2, 128, 2), (1, 1, 64))
    assert tiles(128) == ((1, 128, 2), (1, 2, 64))
    assert tiles(4) == ((32, 128, 2), (16, 1, 64))
    assert tiles(3) == ((64, 192, 3), (64, 3, 64))
    assert tiles(96) == ((2, 192, 3), (2, 3, 64))
    assert tiles(64, interpret=True)[1] == (1, 1, 64)


def test_backward_refusals():
    x = _small(h=128, hv=128)
    spec = _spec(x[0], x[1:3], x[3:])
    with pytest.raises(ValueError, match="backward must be one of"):
        MosaicGPUConfig(backward="triton")
    with pytest.raises(ValueError, match="bwd_fuse_k1 is an option of the Mosaic GPU backward"):
        MosaicGPUConfig(bwd_fuse_k1=False)
    fused = MosaicGPUConfig(backward="mosaic_gpu", bwd_fuse_k1=True, interpret=True)
    with pytest.raises(tensorattn.Unsupported, match="needs a causal window on the first"):
        mosaic_gpu.attention(x[0], x[1:3], x[3:], spec, fused)
    # Shared-memory operands compiled: the kernels' scratch exceeds an H100's.
    config = MosaicGPUConfig(block_q=64, register_operands=False, backward="mosaic_gpu")
    with pytest.raises(tensorattn.Unsupported, match="backward's dq kernel needs"):
        mosaic_gpu.gradients(x[0], x[1:3], x[3:], x[0], spec, config)


# ---------------------------------------------------------------------------------------------
# What it refuses, and that it is not the default.


def _small(dtype=BF16, h=64, hv=64):
    rng = np.random.default_rng(0)
    shapes = [(1, 8, 4, h), (1, 8, 2, h), (1, 8, 2, h), (1, 8, 2, hv), (1, 8, 2, hv)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dtype=jnp.float32), "bfloat16 or float16"),
        (dict(h=32), "H=32"),
        (dict(hv=320), "Hv=320"),
    ],
)
def test_unsupported(kwargs, match):
    x = _small(**kwargs)
    spec = _spec(x[0], x[1:3], x[3:])
    with pytest.raises(tensorattn.Unsupported, match=match):
        mosaic_gpu.attention(x[0], x[1:3], x[3:], spec, INTERPRET)


def test_unsupported_order_tiles_and_device():
    x = _small()
    spec = _spec(x[0], x[1:3], x[3:])
    with pytest.raises(tensorattn.Unsupported, match="order 2"):
        mosaic_gpu.attention(x[0], x[1:2], x[3:4], dataclasses.replace(spec, windows=(None,)))
    with pytest.raises(tensorattn.Unsupported, match="64 or 128 rows"):
        mosaic_gpu.attention(x[0], x[1:3], x[3:], spec, MosaicGPUConfig(block_q=3, interpret=True))
    with pytest.raises(tensorattn.Unsupported, match="schedule_barrier=True with 1"):
        config = MosaicGPUConfig(schedule_barrier=True, interpret=True)
        mosaic_gpu.attention(x[0], x[1:3], x[3:], spec, config)
    with pytest.raises(tensorattn.Unsupported, match="max_concurrent_steps=1"):
        config = MosaicGPUConfig(block_q=64, max_concurrent_steps=1, schedule_barrier=True)
        mosaic_gpu.forward(x[0], x[1:3], x[3:], spec, config)  # compiled: two warpgroups
    with pytest.raises(tensorattn.Unsupported, match="register_operands=True in interpret"):
        config = MosaicGPUConfig(register_operands=True, interpret=True)
        mosaic_gpu.attention(x[0], x[1:3], x[3:], spec, config)
    too_big = MosaicGPUConfig(block_k1=64, block_k2=128, max_concurrent_steps=4, interpret=True)
    with pytest.raises(tensorattn.Unsupported, match="shared memory"):
        mosaic_gpu.attention(x[0], x[1:3], x[3:], spec, too_big)
    if not on_gpu:
        with pytest.raises(tensorattn.Unsupported, match="interpret=True"):
            mosaic_gpu.attention(x[0], x[1:3], x[3:], spec, MosaicGPUConfig(interpret=False))
        with pytest.raises(ValueError, match="implementation='mosaic_gpu' cannot run"):
            tensorattn.tensor_attention(*x, implementation="mosaic_gpu")


def test_not_the_default():
    x = _small()
    assert "mosaic_gpu" not in api._candidates(x[0], x[1:3])
    assert api.IMPLEMENTATIONS["mosaic_gpu"] is mosaic_gpu


def test_default_tiles():
    def plan(heads, kv_heads=1, config=None):
        call = spine.Call(1.0, True, (32, None), 512, (512, 512), heads=heads, kv_heads=kv_heads)
        return mosaic_gpu._plan(call, config or MosaicGPUConfig(interpret=False))

    def tiles(*args, **kwargs):
        cfg = plan(*args, **kwargs)
        return cfg.bq, cfg.rows, cfg.wgs

    # Compiled: two 64-row compute warpgroups and register operands; interpret mode: one
    # warpgroup, shared-memory operands.
    assert tiles(64) == (2, 128, 2) and plan(64).registers and plan(64).schedule
    assert tiles(64, config=INTERPRET) == (1, 64, 1) and not plan(64, config=INTERPRET).registers
    assert not plan(64, config=INTERPRET).schedule and not plan(3).schedule
    assert not plan(64, config=MosaicGPUConfig(interpret=False, max_concurrent_steps=1)).schedule
    assert tiles(128) == (1, 128, 2)
    assert tiles(4) == (32, 128, 2)
    assert tiles(4, config=INTERPRET) == (16, 64, 1)
    assert tiles(3) == (64, 192, 3)
    assert tiles(128, config=MosaicGPUConfig(num_compute_wgs=1)) == (1, 128, 1)
