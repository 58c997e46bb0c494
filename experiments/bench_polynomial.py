r"""Benchmark of the polynomial method (docs/math.md §4-§5) against the blocked exact kernel.

  python -m experiments.bench_polynomial                      # T = 2^10 .. 2^16
  python -m experiments.bench_polynomial --quick              # small sizes, a fast check
  python -m experiments.bench_polynomial --out=runs/bench_polynomial_gpu.jsonl   # on a GPU

Order 3, B=1, one head, H=Hv=8, scale=1/H, entries uniform in [-1, 1] (so |score| <= 1).
Prints four tables and appends one JSON object per measurement to `--out`:
  1. forward and forward+gradient time, compile time and compiled temp memory vs T, with the
     fitted log-log slope of time against T;
  2. the blocked exact kernel's time vs T (measured up to --blocked_max_log2_t, extrapolated
     by T^3 above it, marked so);
  3. the crossover length where the polynomial method at error <= --target_error becomes
     faster, and the speed-up at T=4096;
  4. relative error of p on [-R, R] (and measured output error) against degree and R.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import tensorattn
from experiments import benchlib
from tensorattn.kernels import polynomial

_QUICK = flags.DEFINE_bool("quick", False, "Small sizes: T = 2^8 .. 2^11, blocked to 2^8.")
_MIN_LOG2_T = flags.DEFINE_integer("min_log2_t", 10, "Smallest T = 2^k of the sweep.")
_MAX_LOG2_T = flags.DEFINE_integer("max_log2_t", 16, "Largest T = 2^k of the sweep.")
_BLOCKED_MAX = flags.DEFINE_integer(
    "blocked_max_log2_t",
    None,
    "Largest T measured for the blocked kernel (default 10 on CPU, "
    "13 on accelerators); longer ones are extrapolated by T^3.",
)
_DEGREE = flags.DEFINE_integer("degree", 4, "Degree of the time sweep.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 8, "H = Hv.")
_CAUSAL = flags.DEFINE_bool("causal", False, "Causal self-attention instead of full.")
_TARGET = flags.DEFINE_float("target_error", 1e-3, "Output error target of the crossover.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per point (median reported).")
_OUT = flags.DEFINE_string("out", "runs/bench_polynomial.jsonl", "JSON lines ('' = none).")


def _inputs(t, h, seed=0, bound=1.0):
    keys = jax.random.split(jax.random.key(seed), 5)
    return [jax.random.uniform(k, (1, t, 1, h), jnp.float32, -bound, bound) for k in keys]


def _forward(implementation, scale, causal, **options):
    def fn(q, k1, k2, v1, v2):
        return tensorattn.tensor_attention(
            q,
            k1,
            k2,
            v1,
            v2,
            implementation=implementation,
            scale=scale,
            causal=causal,
            **options,
        )

    return fn


def _with_grad(fwd):
    def loss(*args):
        return jnp.sum(fwd(*args) * args[0][..., :1])  # a non-trivial cotangent

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def _measure(fn, args, repeats):
    jitted = jax.jit(fn)
    compile_s, run_s = benchlib.time_call(jitted, *args, repeats=repeats)
    return compile_s, run_s, benchlib.temp_bytes(fn, *args)


def _slope(ts, times):
    return float(np.polyfit(np.log(ts), np.log(times), 1)[0])


def _oracle_error(out, args, scale, causal):
    """Max |O~ - O| against a float64 NumPy evaluation (small T only)."""
    q, k1, k2, v1, v2 = (np.asarray(a, np.float64)[0, :, 0] for a in args)
    s = np.einsum("ih,ah,bh->iab", q, k1, k2) * scale
    if causal:
        i = np.arange(len(q))
        s = np.where(
            (i[None, :, None] <= i[:, None, None]) & (i[None, None, :] <= i[:, None, None]),
            s,
            -np.inf,
        )
    p = np.exp(s - s.max(axis=(1, 2), keepdims=True))
    p /= p.sum(axis=(1, 2), keepdims=True)
    ref = np.einsum("iab,ah,bh->ih", p, v1, v2)
    return float(np.max(np.abs(np.asarray(out, np.float64)[0, :, 0] - ref)))


def time_sweep(lengths, h, scale, causal, degree, repeats, out, meta):
    rows = []
    fwd = _forward("polynomial", scale, causal, degree=degree)
    for t in lengths:
        args = _inputs(t, h)
        row = dict(meta, table="time", implementation="polynomial", degree=degree, t=t)
        for name, fn in (("fwd", fwd), ("fwd_grad", _with_grad(fwd))):
            compile_s, run_s, temp = _measure(fn, args, repeats)
            row.update(
                {
                    f"{name}_s": run_s,
                    f"{name}_compile_s": compile_s,
                    f"{name}_temp_mb": None if temp is None else temp / 2**20,
                }
            )
        benchlib.append_jsonl(out, row)
        rows.append(row)
    ts = [r["t"] for r in rows]
    for name in ("fwd", "fwd_grad"):
        slope = _slope(ts, [r[f"{name}_s"] for r in rows])
        mem = [r[f"{name}_temp_mb"] for r in rows]
        mem_slope = _slope(ts, mem) if all(m for m in mem) else None
        for r in rows:
            r[f"{name}_slope"] = slope
            r[f"{name}_mem_slope"] = mem_slope
        benchlib.append_jsonl(
            out,
            dict(
                meta,
                table="slope",
                quantity=name,
                degree=degree,
                time_slope=slope,
                memory_slope=mem_slope,
                t_min=min(ts),
                t_max=max(ts),
            ),
        )
    print(f"\n1. polynomial method, degree {degree}, causal={causal}")
    benchlib.print_table(
        rows,
        [
            "t",
            "fwd_s",
            "fwd_grad_s",
            "fwd_compile_s",
            "fwd_grad_compile_s",
            "fwd_temp_mb",
            "fwd_grad_temp_mb",
        ],
    )
    print(
        f"   log-log slope of time vs T: forward {rows[0]['fwd_slope']:.3f}, "
        f"forward+grad {rows[0]['fwd_grad_slope']:.3f}; of temp memory: "
        f"forward {rows[0]['fwd_mem_slope']}, forward+grad {rows[0]['fwd_grad_mem_slope']}"
    )
    return rows


def blocked_sweep(lengths, measured_max, h, scale, causal, repeats, out, meta):
    rows = []
    fwd = _forward("blocked", scale, causal)
    last = None
    for t in lengths:
        row = dict(meta, table="blocked", implementation="blocked", t=t)
        if t <= measured_max:
            args = _inputs(t, h)
            for name, fn in (("fwd", fwd), ("fwd_grad", _with_grad(fwd))):
                compile_s, run_s, _ = _measure(fn, args, repeats)
                row.update({f"{name}_s": run_s, f"{name}_compile_s": compile_s})
            row["extrapolated"] = False
            last = row
        else:  # exact attention costs T^3: extrapolate from the largest measured length
            factor = (t / last["t"]) ** 3
            row.update(
                fwd_s=last["fwd_s"] * factor,
                fwd_grad_s=last["fwd_grad_s"] * factor,
                extrapolated=True,
            )
        benchlib.append_jsonl(out, row)
        rows.append(row)
    print(f"\n2. blocked exact kernel (measured up to T={measured_max}, T^3 above)")
    benchlib.print_table(rows, ["t", "fwd_s", "fwd_grad_s", "extrapolated"])
    return rows


def pick_degree(h, scale, causal, target, out, meta):
    """Smallest degree with measured max error <= target (T=256), and the certified one."""
    args = _inputs(256, h, seed=1)
    measured = None
    for degree in range(1, 12):
        fn = jax.jit(_forward("polynomial", scale, causal, degree=degree))
        err = _oracle_error(fn(*args), args, scale, causal)
        if err <= target:
            measured = degree
            break
    R = scale * h  # tau d B^3 with B = 1
    # |O~ - O| <= eps/(1-eps) * range(v1 v2) <= eps/(1-eps) * 2  (values in [-1, 1])
    eps = target / (2 + target)
    certified = polynomial.select_degree(R, eps, "taylor")
    benchlib.append_jsonl(
        out,
        dict(
            meta,
            table="degree",
            target_error=target,
            measured_degree=measured,
            certified_degree=certified,
            R=R,
        ),
    )
    return measured, certified


def crossover(poly_rows_by_degree, blocked_rows, out, meta):
    """Smallest T (log-log interpolated between sweep points) where polynomial < blocked."""
    rows = []
    blocked = {r["t"]: r for r in blocked_rows}
    for label, degree, poly_rows in poly_rows_by_degree:
        for name in ("fwd", "fwd_grad"):
            ts = [r["t"] for r in poly_rows if r["t"] in blocked]
            ratio = [
                blocked[t][f"{name}_s"] / r[f"{name}_s"]
                for t, r in zip(ts, [r for r in poly_rows if r["t"] in blocked])
            ]
            cross = None
            if ratio and ratio[0] >= 1:
                cross = f"<= {ts[0]}"
            for (t0, r0), (t1, r1) in zip(zip(ts, ratio), zip(ts[1:], ratio[1:])):
                if cross is None and r0 < 1 <= r1:
                    frac = -math.log(r0) / (math.log(r1) - math.log(r0))
                    cross = round(t0 * (t1 / t0) ** frac)
            at4096 = dict(zip(ts, ratio)).get(4096)
            row = dict(
                meta,
                table="crossover",
                degree_choice=label,
                degree=degree,
                quantity=name,
                crossover_t=cross,
                speedup_at_4096=at4096,
                blocked_extrapolated_at_4096=blocked.get(4096, {}).get("extrapolated"),
            )
            benchlib.append_jsonl(out, row)
            rows.append(row)
    print("\n3. crossover vs blocked exact kernel")
    benchlib.print_table(
        rows,
        [
            "degree_choice",
            "degree",
            "quantity",
            "crossover_t",
            "speedup_at_4096",
            "blocked_extrapolated_at_4096",
        ],
    )


def error_table(h, out, meta):
    """Relative error of p on [-R, R] and the measured output error at that score range."""
    rows = []
    t = 64
    for R in (0.5, 1.0, 2.0, 4.0):
        # Entries in [-B, B] with tau d B^3 = R at tau = 1/d: B = R^(1/3).
        bound = R ** (1 / 3)
        args = _inputs(t, h, seed=2, bound=bound)
        for poly in polynomial.POLYNOMIALS:
            for degree in (1, 2, 3, 4, 6, 8):
                eps = polynomial.relative_error(poly, degree, R)
                fn = jax.jit(
                    _forward(
                        "polynomial", 1 / h, False, degree=degree, polynomial=poly, score_range=R
                    )
                )
                err = _oracle_error(fn(*args), args, 1 / h, False)
                certified = float(
                    polynomial.certified_error(
                        args[0],
                        args[1:3],
                        args[3:],
                        degree=degree,
                        scale=1 / h,
                        polynomial=poly,
                        score_range=R if poly == "chebyshev" else None,
                    )
                )
                row = dict(
                    meta,
                    table="error",
                    polynomial=poly,
                    degree=degree,
                    R=R,
                    relative_error=eps,
                    output_error=err,
                    certified_error=certified,
                )
                benchlib.append_jsonl(out, row)
                rows.append(row)
    print(
        f"\n4. error vs degree and score range R (output error: T={t}, entries in "
        "[-R^(1/3), R^(1/3)], scale=1/H)"
    )
    benchlib.print_table(
        rows, ["polynomial", "R", "degree", "relative_error", "output_error", "certified_error"]
    )


def main(argv):
    del argv
    h = _HEAD_DIM.value
    scale = 1.0 / h
    lo, hi = (8, 11) if _QUICK.value else (_MIN_LOG2_T.value, _MAX_LOG2_T.value)
    blocked_max = _BLOCKED_MAX.value
    if blocked_max is None:
        blocked_max = 8 if _QUICK.value else (10 if jax.default_backend() == "cpu" else 13)
    lengths = [2**k for k in range(lo, hi + 1)]
    causal, repeats, out = _CAUSAL.value, _REPEATS.value, _OUT.value
    meta = dict(benchlib.device_description(), head_dim=h, causal=causal, scale=scale)
    print(f"device: {meta['device_kind']} ({meta['platform']}); H=Hv={h}, B=1, one head")
    poly_rows = time_sweep(lengths, h, scale, causal, _DEGREE.value, repeats, out, meta)
    measured, certified = pick_degree(h, scale, causal, _TARGET.value, out, meta)
    print(
        f"\ndegree for max error <= {_TARGET.value}: measured {measured} (T=256), "
        f"certified {certified} (Taylor, R = scale*H*B^3 = {scale * h:g})"
    )
    blocked_lengths = [2**k for k in range(min(lo, 8), max(hi, 12) + 1)]
    blocked_rows = blocked_sweep(
        blocked_lengths, 2**blocked_max, h, scale, causal, repeats, out, meta
    )
    by_degree = [(f"sweep degree {_DEGREE.value}", _DEGREE.value, poly_rows)]
    cross_lengths = [t for t in blocked_lengths]
    for label, degree in (("measured", measured), ("certified", certified)):
        if degree is not None and degree != _DEGREE.value:
            rows = time_sweep(
                cross_lengths,
                h,
                scale,
                causal,
                degree,
                repeats,
                out,
                dict(meta, purpose=f"crossover_{label}"),
            )
            by_degree.append((label, degree, rows))
        elif degree is not None:
            by_degree.append((label, degree, poly_rows))
    crossover(by_degree, blocked_rows, out, meta)
    error_table(h, out, meta)


if __name__ == "__main__":
    app.run(main)
