r"""Benchmark of the polynomial method (docs/math.md §4-§5) against the blocked exact kernel.

  python -m experiments.bench_polynomial                      # T = 2^10 .. 2^16
  python -m experiments.bench_polynomial --quick              # small sizes, a fast check
  python -m experiments.bench_polynomial --out=runs/bench_polynomial_gpu.jsonl   # on a GPU

Order 3, B=1, one head, H=Hv=8, scale=1/H, entries uniform in [-1, 1] (so |score| <= 1).
Prints four tables and appends one row per measurement to `--out` (the row schema of
`experiments.harness`, with a `table` field naming the table):
  1. forward and forward+gradient time, compile time and compiled temp memory vs n, with the
     fitted log-log slope of time against n;
  2. the blocked exact kernel's time vs n (measured up to --blocked_max_log2_t; above it the
     row is "skipped" with `extrapolated_ms`, the largest measured time times (n/n0)^3);
  3. the crossover length where the polynomial method at error <= --target_error becomes
     faster, and the speed-up at n=4096;
  4. relative error of p on [-R, R] (and measured and certified output error) against degree
     and R.
Degrees outside the certified range (tables 3-4 scan them) run with `on_uncertified="ignore"`.
"""

from __future__ import annotations

import math

import jax
from absl import app, flags

from experiments import benchlib, harness
from tensorattn.kernels import polynomial

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this command's flags; only `__main__` calls it, so the module imports (and
    its functions run) without them."""
    flags.DEFINE_bool("quick", False, "Small sizes: T = 2^8 .. 2^11, blocked to 2^8.")
    flags.DEFINE_integer("min_log2_t", 10, "Smallest T = 2^k of the sweep.")
    flags.DEFINE_integer("max_log2_t", 16, "Largest T = 2^k of the sweep.")
    flags.DEFINE_integer(
        "blocked_max_log2_t",
        None,
        "Largest T measured for the blocked kernel (default 10 on CPU, "
        "13 on accelerators); longer ones are extrapolated by T^3.",
    )
    flags.DEFINE_integer("degree", 4, "Degree of the time sweep.")
    flags.DEFINE_integer("head_dim", 8, "H = Hv.")
    flags.DEFINE_bool("causal", False, "Causal self-attention instead of full.")
    flags.DEFINE_float("target_error", 1e-3, "Output error target of the crossover.")
    flags.DEFINE_integer("repeats", 5, "Timed runs per point (median reported).")
    flags.DEFINE_string("out", "runs/bench_polynomial.jsonl", "JSON lines ('' = none).")


def point(impl: str, n: int, h: int, causal: bool, pass_: str = "fwd", bound=1.0, **options):
    """A harness point of this benchmark: one head, H = Hv = h, scale 1/h."""
    return harness.make_point(
        impl,
        n,
        head_dim=h,
        scale=1.0 / h,
        causal=causal,
        entry_bound=bound,
        options=options,
        **{"pass": pass_},
    )


def _pivot(rows: list[dict]) -> list[dict]:
    """One table line per n with the fwd and fwd+grad columns side by side."""
    out = {}
    for r in rows:
        line = out.setdefault(r["n"], {"n": r["n"]})
        for key in ("median_ms", "compile_s", "temp_bytes", "extrapolated_ms"):
            if r.get(key) is not None:
                line[f"{r['pass']} {key}"] = r[key]
    return [out[n] for n in sorted(out)]


def check_mode(degree: int, R: float = 1.0) -> str:
    """`on_uncertified` of a timed degree: the default where Taylor's relative error on
    [-R, R] is within the default tolerance 1e-2 (certified calls), "ignore" where the degree
    is deliberately too low."""
    return "warn" if polynomial.relative_error("taylor", degree, R) <= 1e-2 else "ignore"


def time_sweep(lengths, h, causal, degree, repeats, out, meta) -> list[dict]:
    """Table 1: the polynomial method's forward and forward+gradient rows, and their slopes."""
    rows = []
    options = {"degree": degree, "on_uncertified": check_mode(degree)}
    for n in lengths:
        for pass_ in harness.PASSES:
            p = point("polynomial", n, h, causal, pass_, **options)
            row = harness.measure(p, repeats=repeats)
            row.update(meta, table="time")
            benchlib.append_jsonl(out, row)
            rows.append(row)
    print(f"\n1. polynomial method, degree {degree}, causal={causal}")
    benchlib.print_table(
        _pivot(rows),
        ["n"]
        + [f"{p} {k}" for k in ("median_ms", "compile_s", "temp_bytes") for p in harness.PASSES],
    )
    for pass_ in harness.PASSES:
        ok = [r for r in rows if r["pass"] == pass_ and r["status"] == "ok"]
        ns = [r["n"] for r in ok]
        slope = harness.fit_slope(ns, [r["median_ms"] for r in ok])
        mem = [r["temp_bytes"] for r in ok]
        mem_slope = harness.fit_slope(ns, mem) if mem and all(mem) else None
        benchlib.append_jsonl(
            out,
            dict(meta, table="slope", implementation="polynomial", degree=degree, time_slope=slope,
                 memory_slope=mem_slope, n_min=min(ns, default=None), n_max=max(ns, default=None),
                 **{"pass": pass_}),
        )  # fmt: skip
        print(f"   {pass_}: log-log slope of time vs n {slope:.3f}, of temp memory {mem_slope}")
    return rows


def blocked_sweep(lengths, measured_max, h, causal, repeats, out, meta) -> list[dict]:
    """Table 2: the blocked kernel, measured up to `measured_max`, extrapolated by n^3 above."""
    rows, last = [], {}
    for n in lengths:
        for pass_ in harness.PASSES:
            p = point("blocked", n, h, causal, pass_)
            if n <= measured_max:
                row = harness.measure(p, repeats=repeats)
                if row["status"] == "ok":
                    last[pass_] = row
            elif pass_ in last:  # exact attention costs n^3
                row = dict(harness.new_row(p), status="skipped", reason="extrapolated by n^3")
                row["extrapolated_ms"] = last[pass_]["median_ms"] * (n / last[pass_]["n"]) ** 3
            else:
                continue
            row.update(meta, table="blocked")
            benchlib.append_jsonl(out, row)
            rows.append(row)
    print(f"\n2. blocked exact kernel (measured up to n={measured_max}, n^3 above)")
    benchlib.print_table(
        _pivot(rows),
        ["n"] + [f"{p} {k}" for k in ("median_ms", "extrapolated_ms") for p in harness.PASSES],
    )
    return rows


def pick_degree(h, causal, target, out, meta):
    """Smallest degree with measured max error <= target (n=256, against the float64 oracle),
    and the certified one."""
    measured = None
    for degree in range(1, 12):
        p = point("polynomial", 256, h, causal, degree=degree, on_uncertified="ignore")
        inputs = harness.make_inputs(p, seed=1)
        if harness.result_errors(p, inputs, "oracle", relative=False)[0] <= target:
            measured = degree
            break
    R = 1.0  # scale · H · B^3 with scale = 1/H, B = 1
    # |O~ - O| <= eps/(1-eps) * 2 (values in [-1, 1], polynomial.output_error_bound)
    certified = polynomial.select_degree(R, target / (2 + target), "taylor")
    benchlib.append_jsonl(
        out,
        dict(meta, table="degree", target_error=target, measured_degree=measured,
             certified_degree=certified, R=R),
    )  # fmt: skip
    return measured, certified


def _ms(row):
    return row.get("median_ms") or row.get("extrapolated_ms")


def crossover(poly_rows_by_degree, blocked_rows, out, meta):
    """Table 3: smallest n (log-log interpolated between points) where polynomial < blocked."""
    rows = []
    for label, degree, poly_rows in poly_rows_by_degree:
        for pass_ in harness.PASSES:
            blocked = {r["n"]: _ms(r) for r in blocked_rows if r["pass"] == pass_ and _ms(r)}
            approx = {r["n"]: _ms(r) for r in poly_rows if r["pass"] == pass_ and _ms(r)}
            ns = sorted(set(blocked) & set(approx))
            ratio = [blocked[n] / approx[n] for n in ns]
            cross = f"<= {ns[0]}" if ratio and ratio[0] >= 1 else None
            for (n0, r0), (n1, r1) in zip(zip(ns, ratio), zip(ns[1:], ratio[1:])):
                if cross is None and r0 < 1 <= r1:
                    frac = -math.log(r0) / (math.log(r1) - math.log(r0))
                    cross = round(n0 * (n1 / n0) ** frac)
            extrapolated = any(r.get("extrapolated_ms") for r in blocked_rows if r["n"] == 4096)
            row = dict(
                meta, table="crossover", degree_choice=label, degree=degree, crossover_n=cross,
                speedup_at_4096=dict(zip(ns, ratio)).get(4096),
                blocked_extrapolated_at_4096=extrapolated, **{"pass": pass_},
            )  # fmt: skip
            benchlib.append_jsonl(out, row)
            rows.append(row)
    print("\n3. crossover vs blocked exact kernel")
    benchlib.print_table(
        rows,
        ["degree_choice", "degree", "pass", "crossover_n", "speedup_at_4096",
         "blocked_extrapolated_at_4096"],
    )  # fmt: skip


def error_table(h, out, meta):
    """Table 4: relative error of p on [-R, R], and the measured (float64 oracle) and
    certified output error at that score range."""
    rows = []
    n = 64
    for R in (0.5, 1.0, 2.0, 4.0):
        bound = R ** (1 / 3)  # entries in [-B, B] with scale·H·B^3 = R at scale = 1/H
        for poly in polynomial.POLYNOMIALS:
            for degree in (1, 2, 3, 4, 6, 8):
                p = point(
                    "polynomial", n, h, False, bound=bound, degree=degree, polynomial=poly,
                    score_range=R, on_uncertified="ignore",
                )  # fmt: skip
                inputs = harness.make_inputs(p, seed=2)
                err = harness.result_errors(p, inputs, "oracle", relative=False)[0]
                certified = float(
                    polynomial.certified_error(
                        inputs[0], inputs[1:3], inputs[3:], degree=degree, scale=1 / h,
                        polynomial=poly, score_range=R if poly == "chebyshev" else None,
                    )
                )  # fmt: skip
                row = dict(
                    meta, table="error", polynomial=poly, degree=degree, R=R, n=n,
                    relative_error=polynomial.relative_error(poly, degree, R),
                    output_error=err, certified_error=certified,
                )  # fmt: skip
                benchlib.append_jsonl(out, row)
                rows.append(row)
    print(
        f"\n4. error vs degree and score range R (output error: n={n}, entries in "
        "[-R^(1/3), R^(1/3)], scale=1/H)"
    )
    benchlib.print_table(
        rows, ["polynomial", "R", "degree", "relative_error", "output_error", "certified_error"]
    )


def main(argv):
    del argv
    h = FLAGS.head_dim
    lo, hi = (8, 11) if FLAGS.quick else (FLAGS.min_log2_t, FLAGS.max_log2_t)
    blocked_max = FLAGS.blocked_max_log2_t
    if blocked_max is None:
        blocked_max = 8 if FLAGS.quick else (10 if jax.default_backend() == "cpu" else 13)
    lengths = [2**k for k in range(lo, hi + 1)]
    causal, repeats, out = FLAGS.causal, FLAGS.repeats, FLAGS.out
    meta = {"bench": "polynomial"}
    env = harness.environment()
    print(f"device: {env['device_kind']} ({env['platform']}); H=Hv={h}, B=1, one head")
    poly_rows = time_sweep(lengths, h, causal, FLAGS.degree, repeats, out, meta)
    measured, certified = pick_degree(h, causal, FLAGS.target_error, out, meta)
    print(
        f"\ndegree for max error <= {FLAGS.target_error}: measured {measured} (n=256), "
        f"certified {certified} (Taylor, R = scale*H*B^3 = 1)"
    )
    blocked_lengths = [2**k for k in range(min(lo, 8), max(hi, 12) + 1)]
    blocked_rows = blocked_sweep(blocked_lengths, 2**blocked_max, h, causal, repeats, out, meta)
    by_degree = [(f"sweep degree {FLAGS.degree}", FLAGS.degree, poly_rows)]
    for label, degree in (("measured", measured), ("certified", certified)):
        if degree is not None and degree != FLAGS.degree:
            rows = time_sweep(
                blocked_lengths, h, causal, degree, repeats, out, dict(meta, purpose=label)
            )
            by_degree.append((label, degree, rows))
        elif degree is not None:
            by_degree.append((label, degree, poly_rows))
    crossover(by_degree, blocked_rows, out, meta)
    error_table(h, out, meta)


if __name__ == "__main__":
    define_flags()
    app.run(main)
