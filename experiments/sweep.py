r"""Sequence-length sweep: time, compiled memory and achieved rate of each implementation.

    python -m experiments.sweep --config=configs/sweep.py:smoke --workdir=/tmp/sweep_smoke
    python -m experiments.sweep --config=configs/sweep.py:preset=gpu --workdir=DIR \
        --config.dtype=bfloat16 --config.implementations=blocked,polynomial

The whole config is checked before any point runs (`validate_config`: a bad field exits
non-zero naming it); list fields take a tuple or a comma-separated string. Writes one JSON
line per (implementation, pass, n) to `DIR/sweep.jsonl` with its status: "ok", "oom",
"timeout", "skipped" or "error" (failures do not stop the sweep). On a re-run, "ok", "oom"
and "timeout" rows are final (delete them, or use another DIR, to measure them again, e.g.
after raising time_budget_s or memory_limit_bytes); "error" rows (and rows without a known
status) are measured again, since the failure may have been the environment; "skipped" rows
are decided again from the current `max_length`. The newest row of a point supersedes older
ones. Then draws `DIR/sweep.png` (log-log time and memory vs n, fitted slope per series) and
`DIR/sweep.md`. One sweep per DIR at a time (a second exits naming the first); a torn last
line of sweep.jsonl (a kill mid-append) is reported and cut off; the plot and table are
replaced atomically. The same command runs on CPU, GPU and TPU (jax picks the default
backend); GPU/TPU runs are untested by the author.
"""

from __future__ import annotations

import json
import math
import os
import sys
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
from tensorattn import models
from tensorattn import workdir as workdir_files
from tensorattn.kernels import api

EXACT = ("reference", "blocked", "pallas")
IMPLEMENTATIONS = tuple(api.IMPLEMENTATIONS)
PASSES = ("fwd", "fwd+grad")
DTYPES = ("float32", "bfloat16", "float16")
# Statuses a re-run keeps; "error" and unknown statuses are retried, "skipped" re-decided.
FINAL = ("ok", "oom", "timeout")
GRAD_FLOP_FACTOR = 3.5  # exact forward (1) + backward (2.5), docs/math.md §3
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


class SweepConfigError(ValueError):
    """A bad sweep config; the message starts with the field's name."""


# ----------------------------------------------------------------------------------------------
# The config.

# Optional fields and their defaults; every other field of configs/sweep.py is required.
OPTIONAL = {
    "window": None,
    "memory_limit_bytes": 0,
    "max_length": {},
    "fit_points": 3,
    "error_max_length": 0,
}
REQUIRED = (
    "implementations",
    "lengths",
    "passes",
    "batch",
    "heads",
    "kv_heads",
    "head_dim",
    "dtype",
    "causal",
    "entry_bound",
    "polynomial",
    "repeats",
    "time_budget_s",
)


def _names(field: str, value, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A tuple of names from a tuple/list or a comma-separated string; on the command line
    `--config.implementations=blocked,polynomial` arrives as ('blocked,polynomial',)."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise SweepConfigError(
            f"{field}: must be a tuple or a comma-separated string, got {value!r}"
        )
    names: list[str] = []
    for entry in value:
        if not isinstance(entry, str):
            raise SweepConfigError(f"{field}: entries must be names {allowed}, got {entry!r}")
        for name in (part.strip() for part in entry.split(",")):
            if name and name not in allowed:
                raise SweepConfigError(f"{field}: unknown {name!r}; choose from {allowed}")
            if name and name not in names:
                names.append(name)
    if not names:
        raise SweepConfigError(f"{field}: empty; choose from {allowed}")
    return tuple(names)


def _lengths(value) -> tuple[int, ...]:
    parts = value.split(",") if isinstance(value, str) else value
    if isinstance(parts, int) and not isinstance(parts, bool):
        parts = (parts,)
    if not isinstance(parts, (list, tuple)):
        raise SweepConfigError(f"lengths: must be a tuple of positive ints, got {value!r}")
    lengths = []
    for part in parts:
        if isinstance(part, str) and part.strip().isdigit():
            part = int(part)
        elif isinstance(part, str) and not part.strip():
            continue
        if not models.is_int(part) or part < 1:
            raise SweepConfigError(f"lengths: every length must be a positive int, got {part!r}")
        lengths.append(int(part))
    if not lengths:
        raise SweepConfigError("lengths: empty")
    return tuple(sorted(set(lengths)))


def _int(field: str, value, low: int) -> int:
    if not models.is_int(value) or value < low:
        raise SweepConfigError(f"{field}: must be an int >= {low}, got {value!r}")
    return int(value)


def _positive(field: str, value) -> float:
    if not (models.is_real(value) and 0 < value < math.inf):
        raise SweepConfigError(f"{field}: must be a positive finite number, got {value!r}")
    return float(value)


def validate_config(config: Mapping[str, Any]) -> dict:
    """The normalised sweep config (a new dict), or SweepConfigError naming the bad field.

    Allowed: implementations: names from IMPLEMENTATIONS (tuple or "a,b"; duplicates dropped);
    lengths: positive ints (tuple or "128,256"); passes: "fwd" and/or "fwd+grad"; batch, heads,
    kv_heads, head_dim, repeats: positive ints, kv_heads dividing heads; dtype: float32,
    bfloat16 or float16; causal: a bool; window: None or a pair of positive ints (implies a
    causal mask); entry_bound, time_budget_s: positive finite numbers; polynomial: options of
    implementation="polynomial" (`models.check_attention_options`) with an int `degree`;
    memory_limit_bytes, error_max_length: ints >= 0; max_length: {implementation: positive
    int}; fit_points: an int >= 2.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise SweepConfigError(f"config: must be a mapping, got {config!r}")
    for key in config:
        if key not in REQUIRED and key not in OPTIONAL:
            raise SweepConfigError(
                f"{key}: unknown field; known: {sorted(REQUIRED + tuple(OPTIONAL))}"
            )
    for key in REQUIRED:
        if key not in config:
            raise SweepConfigError(f"{key}: required")
    c = {**OPTIONAL, **config}
    out = {
        "implementations": _names("implementations", c["implementations"], IMPLEMENTATIONS),
        "lengths": _lengths(c["lengths"]),
        "passes": _names("passes", c["passes"], PASSES),
    }
    for key in ("batch", "heads", "kv_heads", "head_dim", "repeats"):
        out[key] = _int(key, c[key], 1)
    if out["heads"] % out["kv_heads"]:
        raise SweepConfigError(f"kv_heads: {out['kv_heads']} does not divide heads {out['heads']}")
    if not isinstance(c["dtype"], str) or c["dtype"] not in DTYPES:
        raise SweepConfigError(f"dtype: must be one of {DTYPES}, got {c['dtype']!r}")
    out["dtype"] = c["dtype"]
    if not isinstance(c["causal"], bool):
        raise SweepConfigError(f"causal: must be a bool, got {c['causal']!r}")
    out["causal"] = c["causal"]
    window = c["window"]
    if window is not None:
        if isinstance(window, str):
            window = window.split(",")
        ok = isinstance(window, (list, tuple)) and len(window) == 2
        if ok:
            window = [int(w) if isinstance(w, str) and w.strip().isdigit() else w for w in window]
            ok = all(models.is_int(w) and w >= 1 for w in window)
        if not ok:
            raise SweepConfigError(
                f"window: must be None or a pair of positive ints, got {c['window']!r}"
            )
        window = tuple(int(w) for w in window)
    out["window"] = window
    out["entry_bound"] = _positive("entry_bound", c["entry_bound"])
    out["time_budget_s"] = _positive("time_budget_s", c["time_budget_s"])
    polynomial = c["polynomial"]
    if not isinstance(polynomial, Mapping):
        raise SweepConfigError(f"polynomial: must be a mapping of options, got {polynomial!r}")
    if "polynomial" in out["implementations"]:
        if not models.is_int(polynomial.get("degree")):
            raise SweepConfigError(
                f"polynomial.degree: the sweep needs an int degree (rank and FLOPs), got "
                f"{polynomial.get('degree')!r}"
            )
        try:
            models.check_attention_options(
                "polynomial",
                polynomial,
                head_dim=out["head_dim"],
                scale=out["head_dim"] ** -0.5,
                prefix="polynomial",
            )
        except ValueError as e:
            raise SweepConfigError(str(e)) from e
    out["polynomial"] = dict(polynomial)
    out["memory_limit_bytes"] = _int("memory_limit_bytes", c["memory_limit_bytes"], 0)
    out["error_max_length"] = _int("error_max_length", c["error_max_length"], 0)
    out["fit_points"] = _int("fit_points", c["fit_points"], 2)
    max_length = c["max_length"] or {}
    if not isinstance(max_length, Mapping):
        raise SweepConfigError(
            f"max_length: must be a mapping implementation -> n, got {max_length!r}"
        )
    for impl, n in max_length.items():
        if impl not in IMPLEMENTATIONS:
            raise SweepConfigError(
                f"max_length.{impl}: unknown implementation; choose from {IMPLEMENTATIONS}"
            )
        _int(f"max_length.{impl}", n, 1)
    out["max_length"] = dict(max_length)
    return out


# ----------------------------------------------------------------------------------------------
# Analytic cost.


def polynomial_rank(head_dim: int, degree: int) -> int:
    """Feature rank r = C(H+g, g) of the order-3 polynomial method."""
    return math.comb(head_dim + degree, degree)


def analytic_flops(point: Mapping[str, Any]) -> float:
    """Multiply-adds x2 of one point: exact `4·tuples·H` (x3.5 with the gradient, docs/math.md
    §3); polynomial `2·r·(Hv+1)·3n` forward, plus `2·r·(Hv+1)·(H+1)·5n` backward
    (docs/math.md §4-§5; an estimate that ignores feature construction)."""
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
    config = validate_config(config)
    window = config["window"]
    base = {
        "head_dim": config["head_dim"],
        "batch": config["batch"],
        "heads": config["heads"],
        "kv_heads": config["kv_heads"],
        "dtype": config["dtype"],
        "causal": config["causal"],
        "window": None if window is None else list(window),
        "entry_bound": config["entry_bound"],
    }
    points = []
    for pass_ in config["passes"]:
        for impl in config["implementations"]:
            options = dict(config["polynomial"]) if impl == "polynomial" else {}
            for n in config["lengths"]:
                points.append(
                    dict(base, implementation=impl, n=n, options=options, **{"pass": pass_})
                )
    return points


def identity(row: Mapping[str, Any]) -> str:
    return json.dumps([row.get(k) for k in IDENTITY], sort_keys=True)


def read_rows(path: str) -> list[dict]:
    """Every row of a sweep.jsonl, oldest first ([] if absent); a torn last line is dropped
    (and reported); any other bad line raises `tensorattn.workdir.CorruptFileError`."""
    return workdir_files.read_jsonl(path)


def latest_rows(rows: list[dict]) -> dict[str, dict]:
    """identity -> the newest row of each point (a retried point supersedes its old row)."""
    return {identity(r): r for r in rows}


def _predicted_seconds(done: list[dict], n: int, repeats: int) -> float | None:
    """Wall time of a point at length n extrapolated from the series' completed points."""
    ok = sorted((r for r in done if r.get("status") == "ok" and r["n"] < n), key=lambda r: r["n"])
    if not ok:
        return None
    last = ok[-1]
    slope = 3.0 if last["implementation"] in EXACT else 1.0
    if len(ok) >= 2:
        slope = max(slope, fit_slope([r["n"] for r in ok[-2:]], [r["time_ms"] for r in ok[-2:]]))
    return (last["time_ms"] / 1e3) * (n / last["n"]) ** slope * (repeats + 2)


def run_sweep(config: Mapping[str, Any], workdir: str, log=print) -> list[dict]:
    """Runs (or resumes) a sweep in `workdir`; returns the newest row of each of its points.

    Raises SweepConfigError (before anything runs), `tensorattn.workdir.WorkdirLockedError`
    when another process holds `workdir`, and `CorruptFileError` for a bad line of sweep.jsonl
    that is not its last.
    """
    config = validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    with workdir_files.lock(workdir):
        return _run_locked(config, workdir, log)


def _run_locked(config: dict, workdir: str, log) -> list[dict]:
    path = os.path.join(workdir, "sweep.jsonl")
    latest = latest_rows(read_rows(path))
    size = os.path.getsize(path) if os.path.exists(path) else 0
    workdir_files.repair_jsonl(path)
    if os.path.exists(path) and os.path.getsize(path) < size:
        log(f"{path}: cut off a torn last line (a kill mid-append); that point runs again")
    limit = device_memory_limit(config["memory_limit_bytes"])
    max_length = config["max_length"]
    budget = config["time_budget_s"]
    repeats = config["repeats"]
    points = points_of(config)
    for point in points:
        key = identity(point)
        old = latest.get(key, {})
        above = point["n"] > max_length.get(point["implementation"], math.inf)
        if old.get("status") in FINAL or (old.get("status") == "skipped" and above):
            continue
        series = [
            r
            for r in latest.values()
            if all(r.get(k) == point[k] for k in IDENTITY if k != "n")
            and isinstance(r.get("n"), int)
            and r["n"] < point["n"]
        ]
        predicted = _predicted_seconds(series, point["n"], repeats)
        over_budget = any(
            r.get("status") in ("timeout", "oom") or (r.get("wall_s") or 0) > budget for r in series
        )
        if above:
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
                error_max_length=config["error_max_length"],
            )
        row.setdefault("time_ms", None)
        row.update(benchlib.device_description())
        if old.get("status") is not None:
            row["previous_status"] = old["status"]
        workdir_files.append_jsonl(path, row)
        latest[key] = row
        err = row.get("relative_error")
        log(
            f"{row['implementation']:>10} {row['pass']:<8} n={row['n']:<6} {row['status']:<7} "
            + (f"{row['time_ms']:10.2f} ms" if row["time_ms"] is not None else " " * 13)
            + (f"  err {err:.2e}" if err is not None else "")
        )
    rows = [latest[identity(p)] for p in points]
    slopes = series_slopes(rows, config["fit_points"])
    plot_sweep(rows, slopes, os.path.join(workdir, "sweep.png"))
    write_table(rows, slopes, os.path.join(workdir, "sweep.md"))
    return rows


# ----------------------------------------------------------------------------------------------
# Slopes, plot, table.


def fit_slope(ns, values) -> float:
    """Least-squares slope of log(values) against log(ns)."""
    x, y = np.log(np.asarray(ns, float)), np.log(np.asarray(values, float))
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 else float("nan")


def _ok_rows(rows: list[dict], key: tuple[str, str]) -> list[dict]:
    """The "ok" rows of series `key` = (implementation, pass), by length."""
    return sorted(
        (
            r
            for r in rows
            if (r.get("implementation"), r.get("pass")) == key and r.get("status") == "ok"
        ),
        key=lambda r: r["n"],
    )


def series_slopes(rows: list[dict], fit_points: int = 3) -> dict[tuple[str, str], dict]:
    """(implementation, pass) -> fitted time and memory slopes over the last completed lengths."""
    out = {}
    rows = [r for r in rows if all(k in r for k in ("implementation", "pass", "n"))]
    for key in sorted({(r["implementation"], r["pass"]) for r in rows}):
        ok = _ok_rows(rows, key)[-fit_points:]
        mem = [r for r in ok if r.get("memory_bytes")]
        out[key] = {
            "time_slope": fit_slope([r["n"] for r in ok], [r["time_ms"] for r in ok]),
            "memory_slope": fit_slope([r["n"] for r in mem], [r["memory_bytes"] for r in mem]),
            "fit_lengths": [r["n"] for r in ok],
        }
    return out


def plot_sweep(rows: list[dict], slopes: dict, path: str, title: str = "") -> None:
    """Log-log time and compiled memory vs n, one line per (implementation, pass); replaces
    `path` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, fit in slopes.items():
        ok = _ok_rows(rows, key)
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
    try:
        with workdir_files.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)


def write_table(rows: list[dict], slopes: dict, path: str) -> None:
    """Markdown: one row per point, then the fitted slopes; replaces `path` atomically."""
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
    ordered = sorted(
        rows, key=lambda r: (str(r.get("pass")), str(r.get("implementation")), r.get("n") or 0)
    )
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
    text = benchlib.markdown_table(ordered, cols) + "\n"
    text += benchlib.markdown_table(fits, list(fits[0]) if fits else [])
    workdir_files.write_atomic(path, text)


# ----------------------------------------------------------------------------------------------
# The command line.

# Set by `define_flags()`, which only the command line calls: tests import this module, and
# experiments.train defines flags of the same names.
_CONFIG = None
_WORKDIR = None


def define_flags() -> None:
    """Defines --config and --workdir (once)."""
    global _CONFIG, _WORKDIR
    if _CONFIG is None:
        _CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file.")
        _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for sweep.jsonl and plots.")
        flags.mark_flags_as_required(["config", "workdir"])


def run_command(config, workdir: str, out=print) -> list[dict]:
    """What the command line does, callable from Python: checks the config, runs (or resumes)
    the sweep, prints the table. Raises what `run_sweep` raises."""
    config = validate_config(config)
    out(f"device: {benchlib.device_description()}")
    rows = run_sweep(config, workdir, log=out)
    with open(os.path.join(workdir, "sweep.md")) as f:
        out(f.read())
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG is None:
        raise app.UsageError("flags are not defined: call define_flags() before app.run(main)")
    try:
        run_command(_CONFIG.value, _WORKDIR.value)
    except SweepConfigError as e:
        sys.exit(f"invalid sweep config: {e}")
    except workdir_files.WorkdirLockedError as e:
        sys.exit(f"workdir busy: {e}")
    except workdir_files.CorruptFileError as e:
        sys.exit(f"cannot resume: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
