r"""GPU benchmark of the Pallas tensor-attention kernels against the blocked XLA kernel.

  PYTHONUNBUFFERED=1 python -m experiments.bench_pallas --out=$OUT/bench_pallas.jsonl

In one run: the device's bf16 matmul rate; a correctness check of the Pallas kernels against
the blocked kernel (forward and gradients); then forward and forward+backward TFLOP/s of
"pallas" and "blocked" at T=4096 (full) and T=16384 with windows (512, 32), head dims 64 and
128, grouped heads. FLOPs count allowed (i, a, b) triples: `4·pairs·H·N·B` forward, 2.5× that
for the backward. Compile time is reported apart; times are medians after a warm-up.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import tensorattn
from experiments import benchlib
from tensorattn.kernels.pallas import PallasBlockSizes

_OUT = flags.DEFINE_string("out", "", "JSON lines output ('' = none).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per point (median reported).")
_BUDGET = flags.DEFINE_float("budget_s", 12.0, "Max seconds of timed runs per point.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dims to measure.")
_CASES = flags.DEFINE_list("cases", ["window16384", "full4096"], "Cases to measure.")
_IMPLS = flags.DEFINE_list("impls", ["pallas", "blocked"], "Implementations.")
_VARIANTS_FULL = flags.DEFINE_list(
    "variants_full", ["128:64:8", "128:128:8", "64:64:4"], "Pallas rows:block_k2:warps (full)."
)
_VARIANTS_WINDOW = flags.DEFINE_list(
    "variants_window", ["128:64:8", "128:32:8", "64:32:4"], "Pallas rows:block_k2:warps (window)."
)
_CHECK = flags.DEFINE_bool("check", True, "Check pallas against blocked first.")
_MATMUL = flags.DEFINE_integer("matmul_size", 8192, "Side of the bf16 matmul rate probe.")
_BWD_IMPLS = flags.DEFINE_list("bwd_impls", ["pallas", "blocked"], "Implementations timed fwd+bwd.")

BWD_FACTOR = 2.5  # backward FLOPs / forward FLOPs (docs/math.md §3)

# name -> (batch, T, heads N, kv heads K, window)
CASES = {
    "full4096": (1, 4096, 8, 2, None),
    "window16384": (1, 16384, 16, 2, (512, 32)),
    "tiny": (1, 64, 4, 2, (16, 8)),
}


def time_fn(fn, *args, repeats: int, budget_s: float) -> dict:
    """Compile time and the median of up to `repeats` timed runs within `budget_s`."""
    compile_s, seconds = benchlib.time_call(jax.jit(fn), *args, repeats=repeats, budget_s=budget_s)
    return {"compile_s": compile_s, "seconds": seconds}


def make_inputs(batch, t, n, kv, h, dtype=jnp.bfloat16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    shapes = [(batch, t, n, h)] + [(batch, t, kv, h)] * 4
    x = [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]
    d_out = jax.random.normal(keys[5], (batch, t, n, h), jnp.float32).astype(dtype)
    return x, d_out


def attention_fn(impl, window, options):
    def forward(*x):
        return tensorattn.tensor_attention(
            *x, implementation=impl, causal=window is not None, window=window, **options
        )

    def forward_backward(d_out, *x):
        out, vjp = jax.vjp(forward, *x)
        return out, vjp(d_out)

    return forward, forward_backward


def check_correctness(rows):
    """Pallas vs blocked on the device: relative errors of the output and all gradients."""
    for dtype, window in [(jnp.float32, None), (jnp.bfloat16, (64, 16))]:
        x, d_out = make_inputs(1, 256, 8, 2, 64, dtype, seed=1)
        results = {}
        for impl in ("pallas", "blocked"):
            _, fb = attention_fn(impl, window, {})
            out, grads = jax.jit(fb)(d_out, *x)
            results[impl] = [np.asarray(a, np.float64) for a in (out, *grads)]
        errs = [
            float(np.linalg.norm(p - b) / max(np.linalg.norm(b), 1e-30))
            for p, b in zip(results["pallas"], results["blocked"])
        ]
        finite = all(np.all(np.isfinite(p)) for p in results["pallas"])
        row = {
            "kind": "check",
            "dtype": jnp.dtype(dtype).name,
            "window": window,
            "rel_err_out_dq_dk1_dk2_dv1_dv2": errs,
            "finite": finite,
        }
        emit(rows, row)


def emit(rows, row):
    """Prints `row`, keeps it, and appends it to `--out` at once (partial runs keep data)."""
    print(json.dumps(row), flush=True)
    rows.append(row)
    if _OUT.value:
        with open(_OUT.value, "a") as f:
            f.write(json.dumps(row) + "\n")


def main(argv):
    del argv
    device = jax.devices()[0]
    rows = []
    print(f"jax {jax.__version__} on {device.device_kind}", flush=True)
    peak = benchlib.matmul_rate(jnp.bfloat16, _MATMUL.value) / 1e12
    emit(rows, {"kind": "matmul", "tflops": peak, "device": device.device_kind})
    print(f"bf16 matmul {_MATMUL.value}^3: {peak:.1f} TFLOP/s", flush=True)
    if _CHECK.value:
        check_correctness(rows)
    table = []
    for case in _CASES.value:
        batch, t, n, kv, window = CASES[case]
        for h in map(int, _HEAD_DIMS.value):
            x, d_out = make_inputs(batch, t, n, kv, h)
            flops = 4.0 * benchlib.allowed_tuples(t, False, window) * h * n * batch
            runs = []
            for impl in _IMPLS.value:
                pallas_variants = _VARIANTS_FULL.value if window is None else _VARIANTS_WINDOW.value
                variants = [None] if impl != "pallas" else pallas_variants
                for variant in variants:
                    options = {}
                    if variant is not None:
                        rws, bk2, warps = map(int, variant.split(":"))
                        options["block_sizes"] = PallasBlockSizes(
                            block_rows=rws, block_k2=bk2, num_warps=warps
                        )
                    runs.append((impl, variant, options))
            best_variant = {}
            for impl, variant, options in runs:
                fwd, fb = attention_fn(impl, window, options)
                base = {
                    "kind": "time", "case": case, "impl": impl, "variant": variant,
                    "batch": batch, "T": t, "N": n, "K": kv, "H": h, "window": window,
                    "flops_fwd": flops, "device": device.device_kind, "jax": jax.__version__,
                }  # fmt: skip
                try:
                    r = time_fn(fwd, *x, repeats=_REPEATS.value, budget_s=_BUDGET.value)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"FAILED {case} H={h} {impl} {variant} fwd: {e!r}"[:2000], flush=True)
                    continue
                row = {**base, "pass": "fwd", **r, "tflops": flops / r["seconds"] / 1e12}
                row["frac_matmul"] = row["tflops"] / peak
                emit(rows, row)
                table.append(row)
                key = impl
                if key not in best_variant or r["seconds"] < best_variant[key][0]:
                    best_variant[key] = (r["seconds"], variant, options)
            for impl in _BWD_IMPLS.value:
                if impl not in best_variant:
                    continue
                t_fwd, variant, options = best_variant[impl]
                _, fb = attention_fn(impl, window, options)
                try:
                    r = time_fn(fb, d_out, *x, repeats=_REPEATS.value, budget_s=_BUDGET.value)
                except Exception as e:  # noqa: BLE001
                    print(f"FAILED {case} H={h} {impl} fwd+bwd: {e!r}"[:2000], flush=True)
                    continue
                total = flops * (1 + BWD_FACTOR)
                row = {
                    "kind": "time", "case": case, "impl": impl, "variant": variant,
                    "batch": batch, "T": t, "N": n, "K": kv, "H": h, "window": window,
                    "flops_fwd": flops, "device": device.device_kind, "jax": jax.__version__,
                    "pass": "fwd+bwd", **r, "tflops": total / r["seconds"] / 1e12,
                    "bwd_tflops": flops * BWD_FACTOR / max(r["seconds"] - t_fwd, 1e-9) / 1e12,
                }  # fmt: skip
                row["frac_matmul"] = row["tflops"] / peak
                row["bwd_frac_matmul"] = row["bwd_tflops"] / peak
                emit(rows, row)
                table.append(row)
    print(f"\nbf16 matmul rate: {peak:.1f} TFLOP/s ({device.device_kind}, jax {jax.__version__})")
    header = (
        f"{'case':<12} {'H':>4} {'impl':<8} {'variant':<10} {'pass':<8} {'ms':>10} "
        f"{'TFLOP/s':>8} {'%mm':>6} {'bwd TF/s':>9} {'bwd %mm':>8} {'compile s':>9}"
    )
    print(header)
    for r in table:
        bwd = (
            f"{r['bwd_tflops']:9.1f} {100 * r['bwd_frac_matmul']:7.1f}%"
            if "bwd_tflops" in r
            else ""
        )
        print(
            f"{r['case']:<12} {r['H']:>4} {r['impl']:<8} {str(r['variant']):<10} {r['pass']:<8} "
            f"{1e3 * r['seconds']:10.2f} {r['tflops']:8.1f} {100 * r['frac_matmul']:5.1f}% "
            f"{bwd:<18} {r['compile_s']:9.1f}"
        )


if __name__ == "__main__":
    app.run(main)
