r"""Sequence-length sweep: time, compiled memory and achieved rate of each implementation.

    python -m experiments.sweep --config=configs/sweep.py:smoke --workdir=/tmp/sweep_smoke
    python -m experiments.sweep --config=configs/sweep.py:preset=gpu --workdir=DIR \
        --config.dtype=bfloat16 --config.implementations=blocked,polynomial

Writes one JSON line per (implementation, pass, n) to `DIR/sweep.jsonl` (status "ok", "oom",
"timeout", "skipped" or "error"; failures do not stop the sweep), skips points already in the
file, then draws `DIR/sweep.png` (log-log time and memory vs n, fitted slope per series) and
`DIR/sweep.md`. The same command runs on CPU, GPU and TPU (jax picks the default backend);
GPU/TPU runs are untested by the author.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import tensorattn
from experiments import benchlib

EXACT = ("reference", "blocked", "pallas")
GRAD_FLOP_FACTOR = 3.5  # exact forward (1) + backward (2.5), MATH.md section 3
IDENTITY = (
    "implementation",
    "n",
    "pass",
    "head_dim",
    "batch",
    "heads",
    "kv_heads",
    "dtype",
    "causal",
    "window",
    "entry_bound",
    "options",
)


# ----------------------------------------------------------------------------------------------
# Analytic cost.


def polynomial_rank(head_dim: int, degree: int) -> int:
    """Feature rank r = C(H+g, g) of the order-3 polynomial method."""
    return math.comb(head_dim + degree, degree)


def analytic_flops(point: Mapping[str, Any]) -> float:
    """Multiply-adds x2 of one point: exact `4·tuples·H` (x3.5 with the gradient, MATH.md
    section 3); polynomial `2·r·(Hv+1)·3n` forward, plus `2·r·(Hv+1)·(H+1)·5n` backward
    (MATH.md sections 4-5; an estimate that ignores feature construction)."""
    n, h, heads = point["n"], point["head_dim"], point["batch"] * point["heads"]
    grad = point["pass"] == "fwd+grad"
    if point["implementation"] == "polynomial":
        r = polynomial_rank(h, point["options"]["degree"])
        flops = 2.0 * r * (h + 1) * 3 * n
        if grad:
            flops += 2.0 * r * (h + 1) * (h + 1) * 5 * n
        return flops * heads
    tuples = benchlib.allowed_tuples(n, point["causal"], point["window"])
    return 4.0 * tuples * h * heads * (GRAD_FLOP_FACTOR if grad else 1.0)


# ----------------------------------------------------------------------------------------------
# One point.


def make_inputs(point: Mapping[str, Any], seed: int = 0):
    """`q, k1, k2, v1, v2` uniform in `[-entry_bound, entry_bound]` (values in [-1, 1])."""
    b, n, h = point["batch"], point["n"], point["head_dim"]
    shapes = [(b, n, point["heads"], h)] + [(b, n, point["kv_heads"], h)] * 4
    bounds = [point["entry_bound"]] * 3 + [1.0, 1.0]
    keys = jax.random.split(jax.random.key(seed + n), 5)
    dtype = jnp.dtype(point["dtype"])
    return [
        jax.random.uniform(k, s, jnp.float32, -bd, bd).astype(dtype)
        for k, s, bd in zip(keys, shapes, bounds)
    ]


def make_fn(point: Mapping[str, Any], implementation: str | None = None):
    """The function a point times: the forward, or its gradient w.r.t. all five inputs."""
    impl = implementation or point["implementation"]
    options = dict(point["options"]) if impl == "polynomial" else {}
    window = None if point["window"] is None else tuple(point["window"])

    def forward(*x):
        return tensorattn.tensor_attention(
            *x, implementation=impl, causal=point["causal"], window=window, **options
        )

    if point["pass"] == "fwd":
        return forward

    def grad(*x):
        return jax.grad(
            lambda *y: jnp.sum(forward(*y).astype(jnp.float32) ** 2) / 2, argnums=(0, 1, 2, 3, 4)
        )(*x)

    return grad


def _memory(compiled) -> dict[str, int | None]:
    """Compiled memory (bytes), defensively: backends differ in what they report."""
    try:
        m = compiled.memory_analysis()
        temp = int(m.temp_size_in_bytes)
        total = temp + int(m.argument_size_in_bytes) + int(m.output_size_in_bytes)
        return {"temp_bytes": temp, "memory_bytes": total}
    except Exception:
        return {"temp_bytes": None, "memory_bytes": None}


def _is_oom(e: Exception) -> bool:
    text = str(e).lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in type(e).__name__


def device_memory_limit(configured: int) -> int:
    if configured:
        return int(configured)
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    except Exception:
        pass
    return 8 << 30


def error_against_exact(point: Mapping[str, Any], inputs, compiled=None) -> float:
    """Max |approx - exact| / max |exact| (output, or all five gradients) against blocked."""
    approx = (compiled or jax.jit(make_fn(point)))(*inputs)
    exact = jax.jit(make_fn(point, "blocked"))(*inputs)
    leaves_a = [np.asarray(x, np.float64) for x in jax.tree.leaves(approx)]
    leaves_e = [np.asarray(x, np.float64) for x in jax.tree.leaves(exact)]
    err = max(float(np.max(np.abs(a - e))) for a, e in zip(leaves_a, leaves_e))
    scale = max(float(np.max(np.abs(e))) for e in leaves_e)
    return err / max(scale, 1e-30)


def measure(point: dict, *, repeats: int, memory_limit: int, error_max_length: int = 0) -> dict:
    """Compiles, checks memory, times one point; returns the row (never raises)."""
    row = dict(point, **benchlib.device_description())
    row["flops"] = analytic_flops(point)
    if point["implementation"] == "polynomial":
        row["rank"] = polynomial_rank(point["head_dim"], point["options"]["degree"])
    try:
        inputs = make_inputs(point)
        start = time.perf_counter()
        compiled = jax.jit(make_fn(point)).lower(*inputs).compile()
        row["compile_s"] = time.perf_counter() - start
        row.update(_memory(compiled))
        if row["memory_bytes"] is not None and row["memory_bytes"] > memory_limit:
            row["status"] = "oom"
            row["reason"] = f"compiled memory {row['memory_bytes']} > limit {memory_limit}"
            return row
        start = time.perf_counter()
        _, seconds = benchlib.time_call(compiled, *inputs, repeats=repeats)
        row["wall_s"] = time.perf_counter() - start
        row["time_ms"] = seconds * 1e3
        row["flops_per_s"] = row["flops"] / seconds
        if point["implementation"] not in EXACT and point["n"] <= error_max_length:
            row["relative_error"] = error_against_exact(point, inputs, compiled)
        row["status"] = "ok"
    except Exception as e:  # a failed point is a row, not the end of the sweep
        row["status"] = "oom" if _is_oom(e) else "error"
        row["reason"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


# ----------------------------------------------------------------------------------------------
# The sweep.


def points_of(config: Mapping[str, Any]) -> list[dict]:
    """Every (pass, implementation, n) point of a sweep config, shortest lengths first."""
    window = config.get("window")
    base = {
        "head_dim": int(config["head_dim"]),
        "batch": int(config["batch"]),
        "heads": int(config["heads"]),
        "kv_heads": int(config["kv_heads"]),
        "dtype": str(config["dtype"]),
        "causal": bool(config["causal"]),
        "window": None if window is None else [int(w) for w in window],
        "entry_bound": float(config["entry_bound"]),
    }
    points = []
    for pass_ in config["passes"]:
        if pass_ not in ("fwd", "fwd+grad"):
            raise ValueError(f"passes: unknown pass {pass_!r}; choose fwd, fwd+grad")
        for impl in config["implementations"]:
            options = dict(config["polynomial"]) if impl == "polynomial" else {}
            for n in sorted(int(n) for n in config["lengths"]):
                points.append(
                    dict(base, implementation=impl, n=n, options=options, **{"pass": pass_})
                )
    return points


def identity(row: Mapping[str, Any]) -> str:
    return json.dumps([row.get(k) for k in IDENTITY], sort_keys=True)


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _predicted_seconds(done: list[dict], n: int, repeats: int) -> float | None:
    """Wall time of a point at length n extrapolated from the series' completed points."""
    ok = [r for r in done if r.get("status") == "ok" and r["n"] < n]
    if not ok:
        return None
    last = ok[-1]
    slope = 3.0 if last["implementation"] in EXACT else 1.0
    if len(ok) >= 2:
        slope = max(slope, fit_slope([r["n"] for r in ok[-2:]], [r["time_ms"] for r in ok[-2:]]))
    return (last["time_ms"] / 1e3) * (n / last["n"]) ** slope * (repeats + 2)


def run_sweep(config: Mapping[str, Any], workdir: str, log=print) -> list[dict]:
    """Runs (or resumes) a sweep in `workdir`; returns all its rows, old and new."""
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "sweep.jsonl")
    rows = read_rows(path)
    done = {identity(r) for r in rows}
    limit = device_memory_limit(config.get("memory_limit_bytes", 0))
    max_length = dict(config.get("max_length") or {})
    budget = float(config["time_budget_s"])
    repeats = int(config["repeats"])
    for point in points_of(config):
        if identity(point) in done:
            continue
        series = [
            r
            for r in rows
            if all(r.get(k) == point[k] for k in IDENTITY if k != "n") and r["n"] < point["n"]
        ]
        predicted = _predicted_seconds(series, point["n"], repeats)
        over_budget = any(
            r.get("status") in ("timeout", "oom") or r.get("wall_s", 0) > budget for r in series
        )
        if point["n"] > max_length.get(point["implementation"], math.inf):
            row = dict(point, status="skipped", reason="above max_length")
        elif over_budget or (predicted is not None and predicted > budget):
            row = dict(point, status="timeout", predicted_s=predicted)
            row["reason"] = (
                "a shorter length ran out of time or memory"
                if over_budget
                else (f"predicted {predicted:.3g} s > time_budget_s {budget}")
            )
        else:
            row = measure(
                point,
                repeats=repeats,
                memory_limit=limit,
                error_max_length=int(config.get("error_max_length", 0)),
            )
        row.setdefault("time_ms", None)
        row.update(benchlib.device_description())
        benchlib.append_jsonl(path, row)
        rows.append(row)
        done.add(identity(row))
        err = row.get("relative_error")
        log(
            f"{row['implementation']:>10} {row['pass']:<8} n={row['n']:<6} {row['status']:<7} "
            + (f"{row['time_ms']:10.2f} ms" if row["time_ms"] is not None else " " * 13)
            + (f"  err {err:.2e}" if err is not None else "")
        )
    selected = {identity(p) for p in points_of(config)}
    rows = [r for r in rows if identity(r) in selected]
    slopes = series_slopes(rows, int(config.get("fit_points", 3)))
    plot_sweep(rows, slopes, os.path.join(workdir, "sweep.png"))
    write_table(rows, slopes, os.path.join(workdir, "sweep.md"))
    return rows


# ----------------------------------------------------------------------------------------------
# Slopes, plot, table.


def fit_slope(ns, values) -> float:
    """Least-squares slope of log(values) against log(ns)."""
    x, y = np.log(np.asarray(ns, float)), np.log(np.asarray(values, float))
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 else float("nan")


def series_slopes(rows: list[dict], fit_points: int = 3) -> dict[tuple[str, str], dict]:
    """(implementation, pass) -> fitted time and memory slopes over the last completed lengths."""
    out = {}
    for key in sorted({(r["implementation"], r["pass"]) for r in rows}):
        ok = sorted(
            (r for r in rows if (r["implementation"], r["pass"]) == key and r["status"] == "ok"),
            key=lambda r: r["n"],
        )[-fit_points:]
        mem = [r for r in ok if r.get("memory_bytes")]
        out[key] = {
            "time_slope": fit_slope([r["n"] for r in ok], [r["time_ms"] for r in ok]),
            "memory_slope": fit_slope([r["n"] for r in mem], [r["memory_bytes"] for r in mem]),
            "fit_lengths": [r["n"] for r in ok],
        }
    return out


def plot_sweep(rows: list[dict], slopes: dict, path: str, title: str = "") -> None:
    """Log-log time and compiled memory vs n, one line per (implementation, pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, fit in slopes.items():
        ok = sorted(
            (r for r in rows if (r["implementation"], r["pass"]) == key and r["status"] == "ok"),
            key=lambda r: r["n"],
        )
        if not ok:
            continue
        label = f"{key[0]} {key[1]}"
        style = "-" if key[1] == "fwd" else "--"
        ns = [r["n"] for r in ok]
        ax_t.loglog(
            ns,
            [r["time_ms"] for r in ok],
            style,
            marker="o",
            base=2,
            label=f"{label} (slope {fit['time_slope']:.2f})",
        )
        mem = [r for r in ok if r.get("memory_bytes")]
        if mem:
            ax_m.loglog(
                [r["n"] for r in mem],
                [r["memory_bytes"] / 2**20 for r in mem],
                style,
                marker="o",
                base=2,
                label=f"{label} (slope {fit['memory_slope']:.2f})",
            )
    ax_t.set(xlabel="sequence length n", ylabel="median time (ms)", title="time")
    ax_m.set(xlabel="sequence length n", ylabel="compiled memory (MiB)", title="memory")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    device = rows[0].get("device_kind", "") if rows else ""
    fig.suptitle(title or f"tensor attention sweep on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_table(rows: list[dict], slopes: dict, path: str) -> None:
    """Markdown: one row per point, then the fitted slopes."""
    cols = [
        "implementation",
        "pass",
        "n",
        "status",
        "time_ms",
        "memory_bytes",
        "flops_per_s",
        "relative_error",
    ]
    ordered = sorted(rows, key=lambda r: (r["pass"], r["implementation"], r["n"]))
    fits = [
        {
            "implementation": impl,
            "pass": pass_,
            "time slope": s["time_slope"],
            "memory slope": s["memory_slope"],
            "fitted on n": s["fit_lengths"],
        }
        for (impl, pass_), s in slopes.items()
    ]
    with open(path, "w") as f:
        f.write(benchlib.markdown_table(ordered, cols) + "\n")
        f.write(benchlib.markdown_table(fits, list(fits[0]) if fits else []))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(f"device: {benchlib.device_description()}")
    run_sweep(_CONFIG.value, _WORKDIR.value)
    print(open(os.path.join(_WORKDIR.value, "sweep.md")).read())


if __name__ == "__main__":  # flags only for the command line: tests import this module
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file.")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for sweep.jsonl and plots.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
