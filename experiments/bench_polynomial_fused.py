r"""The fused Pallas polynomial kernels (`PolynomialConfig(fused=True)`) against the XLA
polynomial kernel at the shape of issue 14: order 3, B=1, 8 heads, H=Hv=16, Taylor degree 4
(rank 4,845), bfloat16, scale 1/H, entries uniform in [-1, 1].

  python -m experiments.bench_polynomial_fused --out=runs/fused_h100.jsonl          # GPU
  python -m experiments.bench_polynomial_fused --causal=1 --out=runs/fused_h100.jsonl
  python -m experiments.bench_polynomial_fused --preset=quick --out=          # CPU, seconds

For each length, causal mask, pass ("fwd", "fwd+grad") and kernel ("fused"; "xla", the XLA scan
with the closed-form gradient; "xla_autodiff", the same forward differentiated by autodiff,
whose gradient is the derivative of the approximation (docs/math.md §5), timed forward+gradient
only): the median time, the compiled temporary memory (`memory_analysis`) and the status, one
row per measurement in the schema of `experiments.harness` (plus `bench`, `kernel`,
`table="time"`) appended to --out; then one `table="slope"` row per series: the log-log slope of
time over the last three lengths. The issue's targets, checked for the fused rows on a GPU:
forward <= 10.5 ms and forward+gradient <= 90 ms at n = 65536 (H100), slopes <= 1.10.
`run(...)` is callable from Python.
"""

from __future__ import annotations

import argparse

from experiments import benchlib, harness

TARGET_N = 65536
TARGET_MS = {"fwd": 10.5, "fwd+grad": 90.0}
MAX_SLOPE = 1.10
PRESETS = {
    "issue": dict(lengths=[2**k for k in range(14, 21)], heads=8, head_dim=16, degree=4),
    "quick": dict(lengths=[16, 32, 64], heads=2, head_dim=4, degree=2),
}
KERNELS = ("fused", "xla", "xla_autodiff")


def point(kernel: str, n: int, pass_: str, causal: bool, *, heads, head_dim, degree, dtype,
          precision=None):  # fmt: skip
    """A harness point: B=1, `heads` query and key/value heads, H = Hv = head_dim, scale 1/H,
    entries in [-1, 1] (|score| <= 1: Taylor degree 4 is certified to ~1e-2), no check."""
    options = {"degree": degree, "on_uncertified": "ignore"}
    if kernel == "xla_autodiff":
        options["gradient"] = "autodiff"
    if kernel == "fused":
        options["fused"] = True
        if precision is not None:
            options["precision"] = precision
    return harness.make_point(
        "polynomial",
        n,
        heads=heads,
        kv_heads=heads,
        head_dim=head_dim,
        value_dim=head_dim,
        dtype=dtype,
        causal=causal,
        entry_bound=1.0,
        scale=1.0 / head_dim,
        options=options,
        **{"pass": pass_},
    )


def _series(rows):
    out = {}
    for r in rows:
        out.setdefault((r["kernel"], r["causal"], r["pass"]), []).append(r)
    return out


def slopes(rows: list[dict]) -> list[dict]:
    """One row per (kernel, causal, pass): the slope of `median_ms` over its last three
    measured lengths, and (fused) whether it meets the issue's targets."""
    out = []
    for (kernel, _, pass_), series in _series(rows).items():
        ok = [r for r in series if r["status"] == "ok"]
        last = ok[-3:]
        row = dict(series[-1], table="slope", median_ms=None, temp_bytes=None)
        row["slope"] = harness.fit_slope([r["n"] for r in last], [r["median_ms"] for r in last])
        row["slope_lengths"] = [r["n"] for r in last]
        at = [r["median_ms"] for r in ok if r["n"] == TARGET_N]
        row["ms_at_target_n"] = at[0] if at else None
        if kernel == "fused":
            row["meets_targets"] = bool(
                at and at[0] <= TARGET_MS[pass_] and len(last) == 3 and row["slope"] <= MAX_SLOPE
            )
        out.append(row)
    return out


def run(lengths, *, heads=8, head_dim=16, degree=4, dtype="bfloat16", causals=(False, True),
        passes=("fwd", "fwd+grad"), kernels=KERNELS, xla_max_n=None, precision=None,
        repeats=3, budget_s=20.0, out=None, log=print):  # fmt: skip
    """Measures every (causal, pass, kernel, length); returns the time rows and the slope
    rows (both also appended to `out`) and prints the table."""
    rows = []
    for causal in causals:
        for pass_ in passes:
            for kernel in kernels:
                for n in lengths:
                    if kernel == "xla_autodiff" and pass_ == "fwd":
                        continue  # the "xla" forward
                    if kernel != "fused" and xla_max_n is not None and n > xla_max_n:
                        continue
                    p = point(kernel, n, pass_, causal, heads=heads, head_dim=head_dim,
                              degree=degree, dtype=dtype, precision=precision)  # fmt: skip
                    row = harness.measure(p, repeats=repeats, budget_s=budget_s)
                    row.update(bench="polynomial_fused", kernel=kernel, table="time")
                    rows.append(row)
                    benchlib.append_jsonl(out, row)
                    log(f"{kernel} causal={causal} {pass_} n={n}: {row['status']} "
                        f"{benchlib.format_cell(row['median_ms'])} ms "
                        f"{row['reason'] or ''}")  # fmt: skip
    summary = slopes(rows)
    for row in summary:
        benchlib.append_jsonl(out, row)
    for r in rows:
        r["temp_MiB"] = None if r["temp_bytes"] is None else r["temp_bytes"] / 2**20
    columns = ["kernel", "causal", "pass", "n", "status", "median_ms", "temp_MiB", "compile_s"]
    benchlib.print_table(rows, columns, out=log)
    log("")
    columns = ["kernel", "causal", "pass", "slope", "slope_lengths", "ms_at_target_n"]
    benchlib.print_table(summary, columns + ["meets_targets"], out=log)
    log(f"targets (fused, H100): fwd <= {TARGET_MS['fwd']} ms, fwd+grad <= "
        f"{TARGET_MS['fwd+grad']} ms at n = {TARGET_N}; slopes <= {MAX_SLOPE}")  # fmt: skip
    return rows, summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="issue", choices=sorted(PRESETS))
    parser.add_argument("--lengths", default=None, help="comma-separated n (default: preset)")
    parser.add_argument("--causal", default="0,1", help="0, 1 or 0,1")
    parser.add_argument("--passes", default="fwd,fwd+grad")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--xla_max_n", type=int, default=None, help="longest n of the xla rows")
    parser.add_argument("--precision", default=None, help="fused: bf16x3 (default), bf16, ...")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget_s", type=float, default=20.0, help="per point, timed runs")
    parser.add_argument("--out", default="runs/bench_polynomial_fused.jsonl", help="'' = none")
    a = parser.parse_args(argv)
    unknown = set(a.kernels.split(",")) - set(KERNELS)
    if unknown:
        parser.error(f"--kernels: unknown {sorted(unknown)}; choose from {', '.join(KERNELS)}")
    preset = dict(PRESETS[a.preset])
    if a.lengths:
        preset["lengths"] = [int(x) for x in a.lengths.split(",")]
    env = harness.environment()
    print(f"device: {env['device_kind']} ({env['platform']}), jax {env['jax_version']}")
    return run(
        preset.pop("lengths"),
        **preset,
        dtype=a.dtype,
        causals=tuple(bool(int(c)) for c in a.causal.split(",")),
        passes=tuple(a.passes.split(",")),
        kernels=tuple(a.kernels.split(",")),
        xla_max_n=a.xla_max_n,
        precision=a.precision,
        repeats=a.repeats,
        budget_s=a.budget_s,
        out=a.out or None,
    )


if __name__ == "__main__":
    main()
