r"""Benchmark of the polynomial method (docs/math.md §4-§5) against the exact kernel.

  python -m experiments.bench_polynomial                      # T = 2^10 .. 2^16
  python -m experiments.bench_polynomial --quick              # small sizes, a fast check
  python -m experiments.bench_polynomial --out=runs/bench_polynomial_gpu.jsonl   # on a GPU
  # Where the method stops being worth it at wide heads (issue 14), on a GPU:
  python -m experiments.bench_polynomial --head_dim=64 --heads=8 --degree=2 --degrees=4 \
      --entry_bound=0.5 --max_log2_t=14 --exact_max_log2_t=12 --out=runs/bench_polynomial_h64.jsonl
  python -m experiments.bench_polynomial --from_rows=runs/bench_polynomial_h64.jsonl  # cut run
  python -m experiments.bench_polynomial --check_cost --causal --entry_bound=0.9 --min_log2_t=8

Order 3, B=1, `--heads` heads (default one), H=Hv=`--head_dim` (8), scale=1/H, entries uniform
in [-B, B] with B = `--entry_bound` (default 1, so |score| <= R = B^3 = 1). Prints four tables
and appends one row per measurement to `--out` (the row schema of `experiments.harness`, with
a `table` field naming the table):
  1. forward and forward+gradient time, compile time and compiled temp memory vs n, with the
     fitted log-log slope of time against n;
  2. the exact kernel's time vs n (`--exact`, default "exact": `implementation=None`, pallas
     on a GPU, blocked on a CPU; measured up to --exact_max_log2_t, above it the row is
     "skipped" with `extrapolated_ms`, the largest measured time times (n/n0)^3);
  3. the crossover length where the polynomial method becomes faster than the exact kernel,
     and the speed-up at n=4096, for the degree reaching error <= --target_error (measured and
     certified) and each of `--degrees`, with the degree's certified relative error at R;
  4. relative error of p on [-R, R] (and measured and certified output error) against degree
     and R.
Degrees outside the certified range (tables 3-4 scan them) run with `on_uncertified="ignore"`.
With `--check_cost`, instead: the cost of the per-call accuracy check (docs/kernels.md), each
length and pass timed with `on_uncertified="warn"` (the check) and "ignore" (none).
"""

from __future__ import annotations

import math

import jax
from absl import app, flags

from experiments import benchlib, harness
from tensorattn import workdir
from tensorattn.kernels import cost, polynomial
from tensorattn.kernels.polynomial import rank_over_limit

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this command's flags; only `__main__` calls it, so the module imports (and
    its functions run) without them."""
    flags.DEFINE_bool("quick", False, "Small sizes: T = 2^8 .. 2^11, blocked to 2^8.")
    flags.DEFINE_integer("min_log2_t", 10, "Smallest T = 2^k of the sweep.")
    flags.DEFINE_integer("max_log2_t", 16, "Largest T = 2^k of the sweep.")
    flags.DEFINE_string(
        "exact", "exact", "Exact kernel of the comparison ('exact' = implementation=None)."
    )
    flags.DEFINE_integer(
        "exact_max_log2_t",
        None,
        "Largest T measured for the exact kernel (default 10 on CPU, "
        "13 on accelerators); longer ones are extrapolated by T^3.",
    )
    flags.DEFINE_integer("degree", 4, "Degree of the time sweep.")
    flags.DEFINE_list("degrees", [], "More degrees to time against the exact kernel.")
    flags.DEFINE_integer("head_dim", 8, "H = Hv.")
    flags.DEFINE_integer("heads", 1, "Query heads (each its own key/value head).")
    flags.DEFINE_float("entry_bound", 1.0, "Entries uniform in [-B, B]; score bound R = B^3.")
    flags.DEFINE_bool("causal", False, "Causal self-attention instead of full.")
    flags.DEFINE_float("target_error", 1e-3, "Output error target of the crossover.")
    flags.DEFINE_integer("repeats", 5, "Timed runs per point (median reported).")
    flags.DEFINE_string("out", "runs/bench_polynomial.jsonl", "JSON lines ('' = none).")
    flags.DEFINE_string(
        "from_rows", "", "Instead: reprint the crossover table from this run's rows (e.g. cut)."
    )
    flags.DEFINE_bool("check_cost", False, "Instead: time the per-call accuracy check.")


def point(
    impl: str, n: int, h: int, causal: bool, pass_: str = "fwd", bound=1.0, heads=1, **options
):
    """A harness point of this benchmark: `heads` heads, H = Hv = h, scale 1/h."""
    return harness.make_point(
        impl,
        n,
        heads=heads,
        kv_heads=heads,
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


def score_range(bound: float) -> float:
    """R = scale · H · B^3 with scale = 1/H: the largest |score| of entries in [-B, B]."""
    return bound**3


def check_mode(degree: int, R: float = 1.0) -> str:
    """`on_uncertified` of a timed degree: the default where Taylor's relative error on
    [-R, R] is within the default tolerance 1e-2 (certified calls), "ignore" where the degree
    is deliberately too low."""
    return "warn" if polynomial.relative_error("taylor", degree, R) <= 1e-2 else "ignore"


def time_sweep(lengths, h, causal, degree, repeats, out, meta, bound=1.0, heads=1) -> list[dict]:
    """Table 1: the polynomial method's forward and forward+gradient rows, and their slopes."""
    rows = []
    options = {"degree": degree, "on_uncertified": check_mode(degree, score_range(bound))}
    for n in lengths:
        for pass_ in harness.PASSES:
            p = point("polynomial", n, h, causal, pass_, bound, heads, **options)
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


def check_cost(lengths, h, causal, degree, repeats, out, meta, bound=1.0, heads=1) -> list[dict]:
    """The per-call accuracy check's cost: each length and pass timed with
    `on_uncertified="warn"` (score-bound reductions and a host callback) and "ignore"."""
    lines = []
    for n in lengths:
        for pass_ in harness.PASSES:
            line = {"n": n, "pass": pass_}
            for mode in ("warn", "ignore"):
                options = {"degree": degree, "on_uncertified": mode}
                p = point("polynomial", n, h, causal, pass_, bound, heads, **options)
                row = harness.measure(p, repeats=repeats)
                row.update(meta, table="check_cost")
                benchlib.append_jsonl(out, row)
                line[f"{mode} ms"] = row.get("median_ms")
            if line["warn ms"] and line["ignore ms"]:
                line["check %"] = 100 * (line["warn ms"] / line["ignore ms"] - 1)
            lines.append(line)
            print(f"   n={n} {pass_}: {line}", flush=True)
    print(f"\ncost of the accuracy check, degree {degree}, causal={causal}, H={h}")
    benchlib.print_table(lines, ["n", "pass", "warn ms", "ignore ms", "check %"])
    return lines


def exact_sweep(
    exact, lengths, measured_max, h, causal, repeats, out, meta, bound=1.0, heads=1
) -> list[dict]:
    """Table 2: the exact kernel `exact`, measured up to `measured_max`, extrapolated by n^3
    above."""
    rows, last = [], {}
    for n in lengths:
        for pass_ in harness.PASSES:
            p = point(exact, n, h, causal, pass_, bound, heads)
            if n <= measured_max:
                row = harness.measure(p, repeats=repeats)
                if row["status"] == "ok":
                    last[pass_] = row
            elif pass_ in last:  # exact attention costs n^3
                row = dict(harness.new_row(p), status="skipped", reason="extrapolated by n^3")
                row["extrapolated_ms"] = last[pass_]["median_ms"] * (n / last[pass_]["n"]) ** 3
            else:
                continue
            row.update(meta, table="exact")
            benchlib.append_jsonl(out, row)
            rows.append(row)
    print(f"\n2. exact kernel {exact!r} (measured up to n={measured_max}, n^3 above)")
    benchlib.print_table(
        _pivot(rows),
        ["n"] + [f"{p} {k}" for k in ("median_ms", "extrapolated_ms") for p in harness.PASSES],
    )
    return rows


def pick_degree(h, causal, target, out, meta, bound=1.0):
    """Smallest degree with measured max error <= target (n=256, against the float64 oracle),
    and the certified one."""
    measured = None
    for degree in range(1, 12):
        if rank_over_limit(h, degree):  # ranks grow with the degree: none above runs either
            break
        p = point("polynomial", 256, h, causal, bound=bound, degree=degree, on_uncertified="ignore")
        inputs = harness.make_inputs(p, seed=1)
        if harness.result_errors(p, inputs, "oracle", relative=False)[0] <= target:
            measured = degree
            break
    R = score_range(bound)
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


def _unmeasured(rows: list[dict], pass_: str) -> str | None:
    """Why a pass has lengths without a time: the first failed row's status, from which n."""
    failed = [r for r in rows if r["pass"] == pass_ and r["status"] not in ("ok", "skipped")]
    if not failed:
        return None
    first = min(failed, key=lambda r: r["n"])
    return f"{first['status']} from n={first['n']}"


def crossover(poly_rows_by_degree, exact_rows, out, meta, R=1.0, h=8):
    """Table 3: smallest n (log-log interpolated between points) where polynomial < exact,
    with each degree's relative error of exp on [-R, R] (the certified bound at this R), its
    feature rank at head dim `h`, and why lengths went unmeasured (a rank over the limit,
    out of memory)."""
    rows = []
    for label, degree, poly_rows in poly_rows_by_degree:
        for pass_ in harness.PASSES:
            exact = {r["n"]: _ms(r) for r in exact_rows if r["pass"] == pass_ and _ms(r)}
            approx = {r["n"]: _ms(r) for r in poly_rows if r["pass"] == pass_ and _ms(r)}
            ns = sorted(set(exact) & set(approx))
            ratio = [exact[n] / approx[n] for n in ns]
            cross = f"<= {ns[0]}" if ratio and ratio[0] >= 1 else None
            for (n0, r0), (n1, r1) in zip(zip(ns, ratio), zip(ns[1:], ratio[1:])):
                if cross is None and r0 < 1 <= r1:
                    frac = -math.log(r0) / (math.log(r1) - math.log(r0))
                    cross = round(n0 * (n1 / n0) ** frac)
            extrapolated = any(r.get("extrapolated_ms") for r in exact_rows if r["n"] == 4096)
            row = dict(
                meta, table="crossover", degree_choice=label, degree=degree, crossover_n=cross,
                speedup_at_4096=dict(zip(ns, ratio)).get(4096), R=R,
                relative_error=polynomial.relative_error("taylor", degree, R),
                exact_extrapolated_at_4096=extrapolated, rank=cost.feature_rank(h, degree),
                note=rank_over_limit(h, degree) or _unmeasured(poly_rows, pass_), **{"pass": pass_},
            )  # fmt: skip
            benchlib.append_jsonl(out, row)
            rows.append(row)
    print(f"\n3. crossover vs the exact kernel (R = {R:g})")
    benchlib.print_table(
        rows,
        ["degree_choice", "degree", "rank", "relative_error", "pass", "crossover_n",
         "speedup_at_4096", "exact_extrapolated_at_4096", "note"],
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
                skipped, err = rank_over_limit(h, degree), None
                if not skipped:
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
                    **({"reason": f"not run: {skipped}"} if skipped else {}),
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
    for degree in sorted({r["degree"] for r in rows if r.get("reason")}):
        print(f"   degree {degree}: output error not measured, {rank_over_limit(h, degree)}")


def crossover_from_rows(rows: list[dict]) -> None:
    """Table 3 again from a run's time and exact rows, e.g. of a run cut before its end:
    each timed degree with the rows it has."""
    time_rows = [r for r in rows if r.get("table") == "time"]
    exact_rows = [r for r in rows if r.get("table") == "exact"]
    if not time_rows or not exact_rows:
        raise SystemExit("--from_rows: no time and exact rows of this benchmark (yet)")
    by_degree = {}
    for r in time_rows:
        degree = r["options"]["degree"]
        label = r.get("purpose") or f"sweep degree {degree}"
        by_degree.setdefault(degree, (label, degree, []))[2].append(r)
    first = time_rows[0]
    crossover(
        list(by_degree.values()), exact_rows, "", {}, score_range(first["entry_bound"]),
        first["head_dim"],
    )  # fmt: skip


def main(argv):
    del argv
    if FLAGS.from_rows:
        return crossover_from_rows(workdir.read_jsonl(FLAGS.from_rows))
    h, heads, bound = FLAGS.head_dim, FLAGS.heads, FLAGS.entry_bound
    if reason := rank_over_limit(h, FLAGS.degree):
        raise app.UsageError(f"--degree={FLAGS.degree} at --head_dim={h}: {reason}")
    lo, hi = (8, 11) if FLAGS.quick else (FLAGS.min_log2_t, FLAGS.max_log2_t)
    exact_max = FLAGS.exact_max_log2_t
    if exact_max is None:
        exact_max = 8 if FLAGS.quick else (10 if jax.default_backend() == "cpu" else 13)
    lengths = [2**k for k in range(lo, hi + 1)]
    causal, repeats, out = FLAGS.causal, FLAGS.repeats, FLAGS.out
    meta = {"bench": "polynomial"}
    shape = {"bound": bound, "heads": heads}
    env = harness.environment()
    print(
        f"device: {env['device_kind']} ({env['platform']}); H=Hv={h}, B=1, {heads} head(s), "
        f"entries in [-{bound:g}, {bound:g}] (R = {score_range(bound):g})"
    )
    if FLAGS.check_cost:
        if check_mode(FLAGS.degree, score_range(bound)) == "ignore":
            raise app.UsageError(
                f"--degree={FLAGS.degree} is not certified at R = B^3: the check would warn on "
                "every call; raise --degree or lower --entry_bound"
            )
        check_cost(lengths, h, causal, FLAGS.degree, repeats, out, meta, **shape)
        return
    poly_rows = time_sweep(lengths, h, causal, FLAGS.degree, repeats, out, meta, **shape)
    measured, certified = pick_degree(h, causal, FLAGS.target_error, out, meta, bound)
    print(
        f"\ndegree for max error <= {FLAGS.target_error}: measured {measured} (n=256), "
        f"certified {certified} (Taylor, R = scale*H*B^3 = {score_range(bound):g})"
    )
    exact_lengths = [2**k for k in range(min(lo, 8), max(hi, 12) + 1)]
    exact_rows = exact_sweep(
        FLAGS.exact, exact_lengths, 2**exact_max, h, causal, repeats, out, meta, **shape
    )
    by_degree = [(f"sweep degree {FLAGS.degree}", FLAGS.degree, poly_rows)]
    timed = {FLAGS.degree: poly_rows}  # each degree is timed once
    extra = [("measured", measured), ("certified", certified)]
    extra += [(f"degree {d}", int(d)) for d in FLAGS.degrees]
    for label, degree in extra:
        if degree is None:
            continue
        if degree not in timed:  # none over the rank limit: the table says why
            timed[degree] = [] if rank_over_limit(h, degree) else time_sweep(
                exact_lengths, h, causal, degree, repeats, out, dict(meta, purpose=label), **shape
            )  # fmt: skip
        by_degree.append((label, degree, timed[degree]))
    crossover(by_degree, exact_rows, out, meta, score_range(bound), h)
    error_table(h, out, meta)


if __name__ == "__main__":
    define_flags()
    app.run(main)
