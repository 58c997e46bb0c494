r"""Fused Pallas polynomial kernels (tensorattn/kernels/polynomial_fused.py) against the XLA
polynomial kernel, at the shape of issue 14: order 3, B=1, N=K=8 heads, H=Hv=16, Taylor
degree 4 (rank 4,845), bfloat16, scale 1/H, entries uniform in [-1, 1].

  python -m experiments.bench_polynomial_fused                     # T = 2^10 .. 2^20, GPU
  python -m experiments.bench_polynomial_fused --quick             # tiny, interpret mode on CPU
  python -m experiments.bench_polynomial_fused --causal --grad --out=runs/fused.jsonl

For each T: median seconds of the jitted forward (and forward+gradient with --grad) of both
kernels, their max abs difference, and the achieved rate of the polynomial method's useful
matmul FLOPs (`useful_flops`) as a fraction of this device's measured bfloat16 matmul rate.
One JSON object per measurement is appended to --out. `run(...)` is callable from Python.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import tensorattn
from tensorattn.kernels import polynomial_fused


def useful_flops(t: int, heads: int, h: int, hv: int, degree: int, grad: bool) -> float:
    """Matmul FLOPs of the factorised method (docs/math.md §4.4, §5.1), one batch row, K=N:
    forward `2·r·(Hv+1)` per key row of each set and per query row; the gradient adds about
    `H+1` times that (the `(Hv+1)×(H+1)` sums) for the key sums, queries and keys."""
    r = math.comb(h + degree, degree)
    fwd = 2 * r * (hv + 1) * 3 * t * heads
    return fwd * (1 + 2 * (h + 1)) if grad else fwd


def matmul_rate(dtype=jnp.bfloat16, n: int = 4096, repeats: int = 5) -> float:
    """Measured FLOP/s of an `n × n` matmul in `dtype` on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    return 2 * n**3 / _median_seconds(f, (a,), repeats)


def _median_seconds(f, args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(t, heads, h, hv, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.uniform(-1, 1, (1, t, heads, h))
    keys = [rng.uniform(-1, 1, (1, t, heads, h)) for _ in range(2)]
    values = [rng.uniform(-1, 1, (1, t, heads, hv)) for _ in range(2)]
    return [jnp.asarray(x, dtype) for x in (q, *keys, *values)]


def _kernel(name: str, causal: bool, degree: int, scale: float, **fused_options):
    def attend(q, k1, k2, v1, v2):
        if name == "fused":
            return polynomial_fused.fused_tensor_attention(
                q, k1, k2, v1, v2, causal=causal, scale=scale, degree=degree, **fused_options
            )
        return tensorattn.tensor_attention(
            q, k1, k2, v1, v2, causal=causal, scale=scale, implementation="polynomial",
            degree=degree, on_uncertified="ignore",
        )  # fmt: skip

    return attend


def run(
    log2_ts=range(10, 21),
    *,
    heads=8,
    h=16,
    hv=16,
    degree=4,
    dtype="bfloat16",
    causal=False,
    grad=False,
    precision="bf16x3",
    xla_max_log2_t=16,
    repeats=3,
    interpret=None,
    out=None,
):
    """Measures both kernels for each `T = 2^k`; returns the rows (and appends them to `out`)."""
    dtype = jnp.dtype(dtype)
    rate = matmul_rate(jnp.bfloat16, 512 if jax.default_backend() == "cpu" else 8192)
    scale = 1.0 / h
    rows = []
    for k in log2_ts:
        t = 1 << k
        args = _inputs(t, heads, h, hv, dtype)
        outputs = {}
        for name in ("fused", "xla"):
            if name == "xla" and k > xla_max_log2_t:
                continue
            options = {"precision": precision, "interpret": interpret} if name == "fused" else {}
            attend = _kernel(name, causal, degree, scale, **options)
            modes = {"forward": jax.jit(attend)}
            if grad:
                modes["forward+gradient"] = jax.jit(
                    jax.grad(lambda *a, f=attend: jnp.sum(f(*a).astype(jnp.float32)), (0, 1, 2))
                )
            for mode, fn in modes.items():
                start = time.perf_counter()
                result = jax.block_until_ready(fn(*args))
                compile_s = time.perf_counter() - start
                if mode == "forward":
                    outputs[name] = np.asarray(result, np.float64)
                seconds = _median_seconds(fn, args, repeats)
                flops = useful_flops(t, heads, h, hv, degree, mode != "forward")
                row = {
                    "kernel": name,
                    "T": t,
                    "causal": causal,
                    "mode": mode,
                    "seconds": seconds,
                    "compile_seconds": compile_s,
                    "useful_flops": flops,
                    "fraction_of_bf16_matmul_rate": flops / seconds / rate,
                    "heads": heads,
                    "H": h,
                    "Hv": hv,
                    "degree": degree,
                    "dtype": dtype.name,
                    "precision": precision if name == "fused" else "xla",
                    "device": str(jax.devices()[0].device_kind),
                }
                rows.append(row)
                print(json.dumps(row))
        if len(outputs) == 2:
            diff = float(np.max(np.abs(outputs["fused"] - outputs["xla"])))
            print(json.dumps({"T": t, "causal": causal, "max_abs_diff_fused_vs_xla": diff}))
            rows.append({"T": t, "causal": causal, "max_abs_diff_fused_vs_xla": diff})
    if out:
        with open(out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min_log2_t", type=int, default=10)
    parser.add_argument("--max_log2_t", type=int, default=20)
    parser.add_argument("--xla_max_log2_t", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--degree", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--precision", default="bf16x3", choices=polynomial_fused.PRECISIONS)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--grad", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="T = 2^5..2^6, 2 heads, H=Hv=4")
    parser.add_argument("--out", default=None)
    a = parser.parse_args(argv)
    sizes = {"h": 4, "hv": 4, "heads": 2} if a.quick else {"heads": a.heads}
    lo, hi = (5, 6) if a.quick else (a.min_log2_t, a.max_log2_t)
    run(
        range(lo, hi + 1),
        degree=a.degree,
        dtype=a.dtype,
        causal=a.causal,
        grad=a.grad,
        precision=a.precision,
        xla_max_log2_t=a.xla_max_log2_t,
        repeats=a.repeats,
        out=a.out,
        **sizes,
    )


if __name__ == "__main__":
    main()
