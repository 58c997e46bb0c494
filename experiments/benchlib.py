"""Shared benchmark helpers: timing, compiled memory, the machine's matmul rate, JSON lines."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tensorattn import workdir


def time_call(fn, *args, repeats: int = 5, budget_s: float | None = None) -> tuple[float, float]:
    """(compile seconds, median run seconds) of a jitted `fn`; warm-up excluded.

    With `budget_s`, fewer than `repeats` runs are timed when the warm-up run says they would
    take longer than that (at least one run is always timed).
    """
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    warm_s = time.perf_counter() - start
    if budget_s is not None:
        repeats = max(1, min(repeats, int(budget_s / max(warm_s, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times)


def allowed_tuples(t: int, causal: bool, window=None) -> float:
    """Allowed (i, a, b) triples of order-3 self-attention of length t (a window is causal)."""
    if not causal and window is None:
        return float(t) ** 3
    i = np.arange(1, t + 1, dtype=np.float64)
    w1, w2 = window if window is not None else (t, t)
    return float(np.sum(np.minimum(i, w1) * np.minimum(i, w2)))


def temp_bytes(fn, *args) -> int | None:
    """Compiled temporary memory of `jax.jit(fn)(*args)`, or None where unsupported."""
    try:
        analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
        return int(analysis.temp_size_in_bytes)
    except Exception:  # backends differ in what memory_analysis offers
        return None


def matmul_rate(dtype=jnp.float32, size: int | None = None, repeats: int = 5) -> float:
    """This machine's measured FLOP/s for a square matmul in `dtype`."""
    if size is None:
        size = 2048 if jax.default_backend() == "cpu" else 8192
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    _, seconds = time_call(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2.0 * size**3 / seconds


def device_description() -> dict:
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind}


def append_jsonl(path: str | None, row: dict) -> None:
    """Appends `row` as one fsynced line (`tensorattn.workdir.append_jsonl`); no-op without a
    path."""
    if path:
        workdir.append_jsonl(path, row)


def format_cell(v) -> str:
    """A table cell: floats to 3 significant digits, None as "-"."""
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """`rows` as a markdown table over `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Prints `rows` as a fixed-width table over `columns`."""
    cells = [[format_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
