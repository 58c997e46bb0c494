"""The one benchmark harness of experiments/: points, inputs, timing, FLOPs, errors, rows.

A *point* is a dict of `POINT_FIELDS` (`make_point`); `measure(point)` compiles and times it
and returns a *row*: the point plus `RESULT_FIELDS` and `ENV_FIELDS`, with the same names in
every benchmark (sweep, bench_kernels, bench_pallas, bench_polynomial):

- `implementation`: a kernel name, or "exact" for `implementation=None` (the library's fastest
  exact kernel on the device: pallas on a GPU, else blocked or reference).
- `pass`: "fwd" (forward) or "fwd+grad" (forward and the gradient w.r.t. all five inputs).
- `n`: sequence length (self-attention: T = S1 = S2); `median_ms`: median of the timed runs
  after a warm-up; `tflops`: analytic FLOPs (`tensorattn.kernels.cost`) / median time / 1e12.
- `status`: "ok", "oom", "timeout", "error" (or "skipped", the sweep's points above a
  `max_length`); a failed point is a row with a `reason`, never an exception.

Every call into the kernel API goes through `attention_fn`; a point's `options` are the keyword
shorthand of the implementation's config (`tensorattn.kernels.configs`: `degree`,
`on_uncertified`, `block_q`, `fwd_block_rows`, ...).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import tensorattn
from tensorattn.kernels import cost

EXACT = ("exact", "reference", "blocked", "pallas", "mosaic_gpu")
IMPLEMENTATIONS = EXACT + ("polynomial",)
PASSES = ("fwd", "fwd+grad")
DTYPES = ("float32", "bfloat16", "float16")
STATUSES = ("ok", "oom", "timeout", "error", "skipped")

# What a point is (and what identifies it in a results file).
POINT_FIELDS = (
    "implementation",
    "pass",
    "n",
    "batch",
    "heads",
    "kv_heads",
    "head_dim",
    "value_dim",
    "order",
    "dtype",
    "causal",
    "window",
    "entry_bound",
    "scale",
    "options",
)
RESULT_FIELDS = (
    "status",
    "median_ms",
    "tflops",
    "flops",
    "compile_s",
    "wall_s",
    "memory_bytes",
    "temp_bytes",
    "rank",
    "relative_error",
    "reason",
)
ENV_FIELDS = ("device_kind", "platform", "jax_version")
ROW_FIELDS = POINT_FIELDS + RESULT_FIELDS + ENV_FIELDS

_DEFAULTS = {
    "pass": "fwd",
    "batch": 1,
    "heads": 1,
    "kv_heads": 1,
    "head_dim": 16,
    "value_dim": None,
    "order": 3,
    "dtype": "float32",
    "causal": False,
    "window": None,
    "entry_bound": 1.0,
    "scale": None,
    "options": {},
}


def make_point(implementation: str, n: int, **fields) -> dict:
    """A point with every `POINT_FIELDS` entry (defaults above; `value_dim` None -> head_dim);
    ValueError names an unknown field or value."""
    unknown = set(fields) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"make_point: unknown fields {sorted(unknown)}; known {POINT_FIELDS}")
    p = {"implementation": implementation, "n": n, **_DEFAULTS, **fields}
    if p["value_dim"] is None:
        p["value_dim"] = p["head_dim"]
    p["options"] = dict(p["options"] or {})
    p["window"] = None if p["window"] is None else [int(w) for w in p["window"]]
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: unknown {implementation!r}; choose {IMPLEMENTATIONS}")
    if p["pass"] not in PASSES:
        raise ValueError(f"pass: must be one of {PASSES}, got {p['pass']!r}")
    if p["dtype"] not in DTYPES:
        raise ValueError(f"dtype: must be one of {DTYPES}, got {p['dtype']!r}")
    if p["order"] != 3:
        raise ValueError(f"order: the harness measures order-3 attention, got {p['order']!r}")
    return p


def environment() -> dict:
    """`ENV_FIELDS` of this process: the default device and the JAX version."""
    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
    }


# ----------------------------------------------------------------------------------------------
# Inputs and the functions timed.


def make_inputs(point: Mapping[str, Any], seed: int = 0) -> list:
    """`q, k1, k2, v1, v2` (`[B,n,N,H]`, keys `[B,n,K,H]`, values `[B,n,K,Hv]`): q and keys
    uniform in `[-entry_bound, entry_bound]` (the polynomial method's hypothesis), values in
    `[-1, 1]`; the same for every implementation at a given (point, seed)."""
    b, n, h, hv = point["batch"], point["n"], point["head_dim"], point["value_dim"]
    n_q, n_kv = point["heads"], point["kv_heads"]
    shapes = [(b, n, n_q, h), (b, n, n_kv, h), (b, n, n_kv, h), (b, n, n_kv, hv), (b, n, n_kv, hv)]
    bounds = [point["entry_bound"]] * 3 + [1.0, 1.0]
    keys = jax.random.split(jax.random.key(seed + n), 5)
    dtype = jnp.dtype(point["dtype"])
    return [
        jax.random.uniform(k, s, jnp.float32, -bd, bd).astype(dtype)
        for k, s, bd in zip(keys, shapes, bounds)
    ]


def attention_fn(point: Mapping[str, Any], implementation: str | None = None):
    """The forward `fn(q, k1, k2, v1, v2)` of a point (or of `implementation` on the same
    inputs and masks, without the point's options): the one call into the kernel API."""
    name = implementation or point["implementation"]
    kernel = None if name == "exact" else name
    options = dict(point["options"]) if implementation is None else {}
    window = None if point["window"] is None else tuple(point["window"])

    def forward(q, k1, k2, v1, v2):
        return tensorattn.tensor_attention(
            q,
            k1,
            k2,
            v1,
            v2,
            implementation=kernel,
            causal=point["causal"],
            window=window,
            scale=point["scale"],
            **options,
        )

    return forward


def make_fn(point: Mapping[str, Any], implementation: str | None = None):
    """What a point times: its forward, or (pass "fwd+grad") the gradient of `½·Σ out²`
    w.r.t. all five inputs."""
    forward = attention_fn(point, implementation)
    if point["pass"] == "fwd":
        return forward

    def grad(*x):
        return jax.grad(
            lambda *y: jnp.sum(forward(*y).astype(jnp.float32) ** 2) / 2, argnums=(0, 1, 2, 3, 4)
        )(*x)

    return grad


# ----------------------------------------------------------------------------------------------
# Timing, memory, FLOPs, slopes.


def time_call(fn, *args, repeats: int = 5, budget_s: float | None = None) -> tuple[float, float]:
    """(first-call seconds, median seconds of `repeats` runs) of `fn`, after one warm-up run,
    each run waited on with `block_until_ready`. With `budget_s`, fewer runs are timed when the
    warm-up says they would take longer (at least one is)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    warm_s = time.perf_counter() - start
    if budget_s is not None:
        repeats = max(1, min(repeats, int(budget_s / max(warm_s, 1e-6))))
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first_s, statistics.median(times)


def compiled_memory(compiled) -> dict[str, int | None]:
    """`temp_bytes` and `memory_bytes` (temp + arguments + outputs) of a compiled function;
    None where the backend does not report them."""
    try:
        m = compiled.memory_analysis()
        temp = int(m.temp_size_in_bytes)
        total = temp + int(m.argument_size_in_bytes) + int(m.output_size_in_bytes)
        return {"temp_bytes": temp, "memory_bytes": total}
    except Exception:  # backends differ in what memory_analysis offers
        return {"temp_bytes": None, "memory_bytes": None}


def device_memory_limit(configured: int = 0) -> int:
    """`configured` bytes, else the device's own limit where known, else 8 GiB."""
    if configured:
        return int(configured)
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    except Exception:
        pass
    return 8 << 30


def flops(point: Mapping[str, Any]) -> float:
    """Analytic FLOPs of a point (`tensorattn.kernels.cost`, docs/math.md §3-§5)."""
    grad = point["pass"] == "fwd+grad"
    heads = point["batch"] * point["heads"]
    if point["implementation"] == "polynomial":
        return cost.polynomial_flops(
            point["n"],
            point["head_dim"],
            point["options"].get("degree", 4),
            value_dim=point["value_dim"],
            heads=heads,
            grad=grad,
        )
    return cost.exact_flops(
        point["n"],
        point["head_dim"],
        value_dim=point["value_dim"],
        causal=point["causal"],
        window=point["window"],
        heads=heads,
        grad=grad,
    )


def fit_slope(ns, values) -> float:
    """Least-squares slope of log(values) against log(ns) (nan with fewer than 2 points)."""
    x, y = np.log(np.asarray(ns, float)), np.log(np.asarray(values, float))
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 else float("nan")


def matmul_rate(dtype=jnp.float32, size: int | None = None, repeats: int = 5) -> float:
    """This machine's measured FLOP/s for a square matmul in `dtype`."""
    if size is None:
        size = 2048 if jax.default_backend() == "cpu" else 8192
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    _, seconds = time_call(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2.0 * size**3 / seconds


# ----------------------------------------------------------------------------------------------
# Accuracy.


def oracle(point: Mapping[str, Any], inputs) -> np.ndarray:
    """Float64 NumPy order-3 attention of a point's inputs (materialises `[B,n,N,n,n]`: small
    n only). Causal: keys `a, b <= i`; window `(w1, w2)`: also `i-w1 < a`, `i-w2 < b`."""
    q, k1, k2, v1, v2 = (np.asarray(x, np.float64) for x in inputs)
    group = q.shape[2] // k1.shape[2]
    k1, k2, v1, v2 = (np.repeat(x, group, axis=2) for x in (k1, k2, v1, v2))
    scale = point["scale"] if point["scale"] is not None else q.shape[-1] ** -0.5
    s = np.einsum("bind,band,bcnd->binac", q, k1, k2) * scale
    n = q.shape[1]
    i, a = np.arange(n)[:, None], np.arange(n)[None, :]
    ok1 = ok2 = np.ones((n, n), bool)
    if point["causal"] or point["window"] is not None:
        w1, w2 = point["window"] or (n, n)
        ok1, ok2 = (a <= i) & (a > i - w1), (a <= i) & (a > i - w2)
    allowed = ok1[:, :, None] & ok2[:, None, :]  # [i, a, c]
    s = np.where(allowed[None, :, None], s, -np.inf)
    p = np.exp(s - s.max(axis=(3, 4), keepdims=True))
    p /= p.sum(axis=(3, 4), keepdims=True)
    return np.einsum("binac,bane,bcne->bine", p, v1, v2)


def result_errors(
    point: Mapping[str, Any], inputs, against: str = "blocked", *, relative: bool = True
) -> list[float]:
    """Max |x - exact| of each result leaf of the point (the output, or the five gradients)
    against `against`: an implementation name, or "oracle" (float64 NumPy, forward only);
    divided by max |exact| when `relative`."""
    approx = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.jit(make_fn(point))(*inputs))]
    if against == "oracle":
        if point["pass"] != "fwd":
            raise ValueError("result_errors: against='oracle' checks the forward pass only")
        exact = [oracle(point, inputs)]
    else:
        result = jax.jit(make_fn(point, against))(*inputs)
        exact = [np.asarray(x, np.float64) for x in jax.tree.leaves(result)]
    errors = [float(np.max(np.abs(a - e))) for a, e in zip(approx, exact)]
    if relative:
        errors = [err / max(float(np.max(np.abs(e))), 1e-30) for err, e in zip(errors, exact)]
    return errors


# ----------------------------------------------------------------------------------------------
# One point.


def _is_oom(e: Exception) -> bool:
    text = str(e).lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in type(e).__name__


def new_row(point: Mapping[str, Any]) -> dict:
    """A row of `point` with every `RESULT_FIELDS` entry None and this process's environment."""
    row = {k: point.get(k) for k in POINT_FIELDS}
    row.update({k: None for k in RESULT_FIELDS})
    row.update(environment())
    row["flops"] = flops(point)
    if point["implementation"] == "polynomial":
        row["rank"] = cost.feature_rank(point["head_dim"], point["options"].get("degree", 4))
    return row


def measure(
    point: Mapping[str, Any],
    *,
    repeats: int = 3,
    memory_limit: int | None = None,
    budget_s: float | None = None,
    error_against: str | None = None,
    timed: bool = True,
) -> dict:
    """Compiles, checks memory, times one point; returns its row (never raises).

    `memory_limit`: above this compiled memory the point is "oom" without running (None: the
    device's limit). `budget_s`: fewer timed runs when the warm-up says they would exceed it.
    `error_against`: also record `relative_error` (largest over the result leaves) against
    that implementation or "oracle". `timed=False`: compile and memory only.
    """
    row = new_row(point)
    limit = device_memory_limit() if memory_limit is None else memory_limit
    try:
        inputs = make_inputs(point)
        start = time.perf_counter()
        compiled = jax.jit(make_fn(point)).lower(*inputs).compile()
        row["compile_s"] = time.perf_counter() - start
        row.update(compiled_memory(compiled))
        if row["memory_bytes"] is not None and row["memory_bytes"] > limit:
            row["status"] = "oom"
            row["reason"] = f"compiled memory {row['memory_bytes']} > limit {limit}"
            return row
        if timed:
            start = time.perf_counter()
            _, seconds = time_call(compiled, *inputs, repeats=repeats, budget_s=budget_s)
            row["wall_s"] = time.perf_counter() - start
            row["median_ms"] = seconds * 1e3
            row["tflops"] = row["flops"] / seconds / 1e12
        if error_against is not None:
            row["relative_error"] = max(result_errors(point, inputs, error_against))
        row["status"] = "ok"
    except Exception as e:  # a failed point is a row, not the end of the benchmark
        row["status"] = "oom" if _is_oom(e) else "error"
        row["reason"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


# Old names of row fields (results files written before this schema), read as the new ones.
_LEGACY = {"time_ms": "median_ms", "T": "n", "H": "head_dim", "N": "heads", "K": "kv_heads"}


def upgrade_row(row: Mapping[str, Any]) -> dict:
    """A row of an older results file in this schema: `time_ms` -> `median_ms`,
    `flops_per_s` -> `tflops`, `fwd+bwd` -> `fwd+grad`, missing `value_dim`/`order` filled."""
    row = dict(row)
    for old, new in _LEGACY.items():
        if old in row and new not in row:
            row[new] = row.pop(old)
    if "flops_per_s" in row and "tflops" not in row:
        fps = row.pop("flops_per_s")
        row["tflops"] = None if fps is None else fps / 1e12
    if row.get("pass") == "fwd+bwd":
        row["pass"] = "fwd+grad"
    if "head_dim" in row and row.get("value_dim") is None:
        row["value_dim"] = row["head_dim"]
    row.setdefault("order", 3)
    row.setdefault("scale", None)
    return row
