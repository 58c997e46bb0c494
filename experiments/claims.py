r"""The seed papers' five claims, each one command writing JSON lines, a plot and a table.

    python -m experiments.claims --config=configs/claims.py:preset=cpu --claim=forward \
        --workdir=results/cpu
    python -m experiments.claims --config=configs/claims.py:preset=cpu --claim=threshold \
        --workdir=results/cpu
    python -m experiments.claims --config=configs/claims.py:preset=smoke --workdir=/tmp/claims
    python -m experiments.claims --config=configs/claims.py:preset=cpu --claim=expressivity \
        --workdir=/tmp/claims --config.expressivity.tasks=match3,match2
    python -m experiments.claims --preset=cpu --claim=bounded --workdir=/tmp/claims \
        --bounds=0.5,1,2

Budgets (lengths, grids, tasks, steps, seeds) live in configs/claims.py, presets `smoke` (CI,
seconds), `cpu` (this machine, minutes) and `full` (accelerators); `--preset=P` is short for
`--config=configs/claims.py:preset=P`, `--tasks`/`--bounds` for the claim 4/5 fields. Claim
`X` writes `WORKDIR/claimN_X.{jsonl,png,md}` and appends its headline figure to
`WORKDIR/claims.jsonl`. Training runs (claims 4-5) keep checkpoints in `WORKDIR/train/...` and
resume; re-running a claim skips the points finished with the same training config (its
`training.run_fingerprint`, in each row and in the run's folder name: a changed learning rate,
task format or `training.RESULTS_VERSION` trains again). Every training run's config is checked
before any claim starts (an unknown task, a bound or option the model refuses: exit 1 naming
it); a run that fails anyway is a row with its reason, retried on the next call, and makes
the command exit 1 once all claims are written. From Python: `CLAIMS[name](workdir, config)`
with a config of configs/claims.py (or a preset name).

1. forward: time slope of the polynomial method vs the fastest exact kernel
   (`implementation=None`), error vs exact.
2. gradient: the same for forward+gradient with the closed-form gradient.
3. threshold: smallest Chebyshev degree reaching output error 1/n for entry bound B, its rank
   and cost against the exact cost, for orders 2, 3, 4; fits c in `B* = c (ln n)^{1/t}`.
4. expressivity: accuracy of 1- and 2-layer standard, 1-layer exact tensor and 1-layer
   polynomial tensor attention (entries bounded by B = 1) on the five tasks, three seeds.
5. bounded: Match3 accuracy as the entry bound B grows, of the polynomial model and of the
   exact model with the same bound, against the unbounded exact model.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping

import jax
from absl import app, flags
from ml_collections import config_flags

from experiments import benchlib, claim_plots, harness, sweep
from tensorattn import workdir as workdir_files
from tensorattn.kernels import cost
from tensorattn.kernels import polynomial as poly

PRESETS = ("smoke", "cpu", "full")


def load_config(config="cpu") -> dict:
    """The claims config as a plain dict: a preset name, a config string of configs/claims.py
    ("preset=full"), or a config (ConfigDict or mapping) of that file."""
    if isinstance(config, str):
        arg = f"preset={config}" if config in PRESETS else config
        config = importlib.import_module("configs.claims").get_config(arg)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return dict(config)


def _names(value) -> tuple:
    """A tuple from a tuple or a comma-separated string (as the command line gives it), each
    entry once."""
    if isinstance(value, str):
        value = (value,)
    out = []
    for entry in value:
        out += [p.strip() for p in entry.split(",")] if isinstance(entry, str) else [entry]
    return tuple(dict.fromkeys(p for p in out if p != ""))


def _summary(workdir: str, claim: str, figure: dict) -> dict:
    row = {"claim": claim, **figure, **harness.environment()}
    benchlib.append_jsonl(os.path.join(workdir, "claims.jsonl"), row)
    return row


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    workdir_files.write_atomic(path, text)


# ----------------------------------------------------------------------------------------------
# Claims 1-2: scaling of the polynomial method against the fastest exact kernel.


def scaling_config(section: Mapping) -> dict:
    """The sweep config (configs/sweep.py fields) of a claims config's forward/gradient
    section."""
    s = dict(section)
    return {
        "implementations": tuple(s["implementations"]),
        "lengths": tuple(s["lengths"]),
        "passes": tuple(s["passes"]),
        "batch": 1,
        "heads": s["heads"],
        "kv_heads": s["kv_heads"],
        "head_dim": s["head_dim"],
        "dtype": s["dtype"],
        "causal": False,
        "entry_bound": s["entry_bound"],
        "polynomial": {
            "degree": s["degree"],
            "polynomial": "taylor",
            "gradient": "closed_form",
            "on_uncertified": s["on_uncertified"],
        },
        "repeats": s["repeats"],
        "time_budget_s": s["time_budget_s"],
        "error_max_length": s["error_max_length"],
        "fit_points": s["fit_points"],
        "max_length": {},
    }


def claim_scaling(workdir: str, config, pass_: str) -> dict:
    """Claim 1 (pass "fwd") or 2 ("fwd+grad"): slopes, crossover and error against exact."""
    name = "claim1_forward" if pass_ == "fwd" else "claim2_gradient"
    config = scaling_config(load_config(config)["forward" if pass_ == "fwd" else "gradient"])
    degree, head_dim = config["polynomial"]["degree"], config["head_dim"]
    rank = cost.feature_rank(head_dim, degree)
    rows = sweep.run_sweep(config, os.path.join(workdir, name))
    slopes = sweep.series_slopes(rows, config["fit_points"])
    sweep.plot_sweep(
        rows,
        slopes,
        os.path.join(workdir, f"{name}.png"),
        title=f"claim {name[5]}: polynomial (degree {degree}, rank {rank}) vs exact, {pass_}, "
        f"H={head_dim}",
    )
    by = {(r["implementation"], r["n"]): r for r in rows if r["status"] == "ok"}
    faster = [
        n
        for (impl, n), r in sorted(by.items())
        if impl == "polynomial"
        and ("exact", n) in by
        and r["median_ms"] < by[("exact", n)]["median_ms"]
    ]
    errors = [r["relative_error"] for r in rows if r.get("relative_error") is not None]
    exact, approx = slopes.get(("exact", pass_), {}), slopes.get(("polynomial", pass_), {})
    figure = {
        "pass": pass_,
        "head_dim": head_dim,
        "degree": degree,
        "rank": rank,
        "exact_slope": exact.get("time_slope"),
        "polynomial_slope": approx.get("time_slope"),
        "exact_fit_lengths": exact.get("fit_lengths"),
        "polynomial_fit_lengths": approx.get("fit_lengths"),
        "first_n_polynomial_faster": min(faster) if faster else None,
        "analytic_crossover_n": cost.crossover_length(head_dim, degree),
        "max_relative_error": max(errors) if errors else None,
        # Points that ended in "error" (retried on a re-run): the command then exits non-zero.
        "failed": sum(r["status"] == "error" for r in rows),
    }
    table = open(os.path.join(workdir, name, "sweep.md")).read()
    _write(
        os.path.join(workdir, f"{name}.md"),
        benchlib.markdown_table([figure], list(figure)) + "\n" + table,
    )
    return _summary(workdir, name, figure)


def claim_forward(workdir: str, config="cpu") -> dict:
    return claim_scaling(workdir, config, "fwd")


def claim_gradient(workdir: str, config="cpu") -> dict:
    return claim_scaling(workdir, config, "fwd+grad")


# ----------------------------------------------------------------------------------------------
# Claim 3: the bounded-entry threshold.


def threshold_rows(orders, lengths, bounds, *, tolerance_of=lambda n: 1.0 / n) -> list[dict]:
    """Degree, rank and polynomial/exact cost ratio on a grid of (order t, n, entry bound B).

    Convention of the papers: scale `1/d`, `|entries| <= B`, so `R = B^t`; `d = ceil(log2 n)`.
    Output error 1/n needs relative error `eps <= 1/(2n+1)` (values in [-1, 1], polynomial.py
    `output_error_bound`). Cost ratio: `tensorattn.kernels.cost.cost_ratio` (docs/math.md
    §3-§4).
    """
    rows = []
    for t in orders:
        for n in lengths:
            d = math.ceil(math.log2(n))
            target = tolerance_of(n)
            eps = target / (2 + target)
            degree = 0
            for b in sorted(bounds):
                R = float(b) ** t
                while (
                    degree <= poly.MAX_DEGREE and poly.relative_error("chebyshev", degree, R) > eps
                ):
                    degree += 1
                row = {"order": t, "n": n, "d": d, "B": float(b), "R": R, "tolerance": target}
                if degree > poly.MAX_DEGREE:
                    row.update(degree=None, rank=None, cost_ratio=math.inf)
                else:
                    row.update(
                        degree=degree,
                        rank=cost.feature_rank(d, degree),
                        cost_ratio=cost.cost_ratio(n, d, degree, t),
                    )
                row["x"] = R / math.log(n)
                rows.append(row)
    return rows


def crossing_bounds(rows: list[dict]) -> list[dict]:
    """Per (order, n): the entry bound B* where the cost ratio reaches 1 (log-linear
    interpolation between grid points) and `c = B* / (ln n)^{1/t}`."""
    out = []
    for t, n in sorted({(r["order"], r["n"]) for r in rows}):
        series = sorted((r for r in rows if (r["order"], r["n"]) == (t, n)), key=lambda r: r["B"])
        b_star, capped = None, False
        for lo, hi in zip(series, series[1:]):
            if lo["cost_ratio"] < 1 <= hi["cost_ratio"]:
                if math.isinf(hi["cost_ratio"]):  # degree > MAX_DEGREE: B* is only a bound
                    b_star, capped = hi["B"], True
                else:
                    a, c = math.log(lo["cost_ratio"]), math.log(hi["cost_ratio"])
                    b_star = lo["B"] + (hi["B"] - lo["B"]) * (0 - a) / (c - a)
                break
        c_fit = None if b_star is None else b_star / math.log(n) ** (1 / t)
        out.append({"order": t, "n": n, "B_star": b_star, "c": c_fit, "capped": capped})
    return out


def empirical_check(n: int, bounds, *, max_rank: int = 3000) -> list[dict]:
    """Order 3: run the polynomial kernel at the degree claim 3 selects (scale 1/d, entries
    uniform in [-B, B], d = log2 n) and measure its max error against blocked; should be
    <= 1/n. These calls are inside the certified range (the certificate's default check)."""
    out = []
    for row in threshold_rows([3], [n], bounds):
        if row["degree"] is None or row["rank"] > max_rank:
            continue
        d = row["d"]
        options = {
            "polynomial": "chebyshev",
            "degree": row["degree"],
            "score_range": max(row["R"], 1e-6),
        }
        point = harness.make_point(
            "polynomial", n, head_dim=d, entry_bound=row["B"], scale=1.0 / d, options=options
        )
        inputs = harness.make_inputs(point)
        err = max(harness.result_errors(point, inputs, "blocked", relative=False))
        out.append({**row, "measured_error": err, "holds": err <= row["tolerance"]})
    return out


def _finite(x):
    return None if x is None or (isinstance(x, float) and math.isinf(x)) else x


def claim_threshold(workdir: str, config="cpu") -> dict:
    """Claim 3: grid, crossing bounds, fitted c per order, empirical check, plot, table."""
    c = load_config(config)["threshold"]
    orders, lengths, bounds = list(c["orders"]), list(c["lengths"]), list(c["bounds"])
    rows = threshold_rows(orders, lengths, bounds)
    name = "claim3_threshold"
    path = os.path.join(workdir, f"{name}.jsonl")
    crossings = crossing_bounds(rows)
    check_bounds = [b for b in bounds if b <= c["check_max_bound"]][::2]
    checks = empirical_check(c["check_n"], check_bounds, max_rank=c["check_max_rank"])
    # Recomputed whole (cheap), replacing the old file at once: a kill leaves the old one.
    workdir_files.rewrite_jsonl(
        path, [{**r, "cost_ratio": _finite(r.get("cost_ratio"))} for r in rows + crossings + checks]
    )
    fits = {}
    for t in orders:
        cs = [r["c"] for r in crossings if r["order"] == t and r["c"] is not None]
        cs = [r["c"] for r in crossings if r["order"] == t and r["c"] and not r["capped"]] or cs
        fits[t] = {
            "c_median": statistics.median(cs) if cs else None,
            "c_min": min(cs) if cs else None,
            "c_max": max(cs) if cs else None,
        }
    c_fit = {t: fits[t]["c_median"] for t in fits}
    claim_plots.threshold(rows, c_fit, os.path.join(workdir, f"{name}.png"))
    figure = {
        **{f"c_order{t}": fits[t]["c_median"] for t in fits},
        **{f"c_order{t}_range": [fits[t]["c_min"], fits[t]["c_max"]] for t in fits},
        "capped_crossings": sum(r["capped"] for r in crossings),
        "lengths": [min(lengths), max(lengths)],
        "empirical_checks": len(checks),
        "empirical_checks_holding": sum(r["holds"] for r in checks),
    }
    _write(os.path.join(workdir, f"{name}.md"), threshold_table(figure, crossings, checks))
    return _summary(workdir, name, figure)


def threshold_table(figure: dict, crossings: list[dict], checks: list[dict]) -> str:
    """Claim 3's markdown: the headline figure, crossing bounds, the empirical check."""
    return (
        benchlib.markdown_table([figure], list(figure))
        + "\nCrossing bound B* (polynomial cost = exact cost) and c = B* / (ln n)^(1/t):\n\n"
        + f"(capped: the degree needed passed polynomial.MAX_DEGREE={poly.MAX_DEGREE} before "
        + "the cost crossed,\nso B* is where the search stopped; capped rows are left out of "
        + "the fitted c.)\n\n"
        + benchlib.markdown_table(crossings, ["order", "n", "B_star", "c", "capped"])
        + "\nEmpirical check (order 3, measured max error vs blocked; target 1/n):\n\n"
        + benchlib.markdown_table(
            checks, ["n", "d", "B", "degree", "rank", "tolerance", "measured_error", "holds"]
        )
    )


# ----------------------------------------------------------------------------------------------
# Claims 4-5: training.


@dataclasses.dataclass(frozen=True)
class Model:
    """One model of the expressivity comparison (equal width across models)."""

    name: str
    attention: str
    num_layers: int = 1
    entry_bound: float | None = None
    degree: int | None = None
    head_dim: int | None = None


def polynomial_model(entry_bound: float, degree: int = 2, head_dim: int = 16) -> Model:
    name = f"polynomial-1(B={entry_bound:g},g={degree},H={head_dim})"
    return Model(name, "polynomial", 1, entry_bound, degree, head_dim)


def models_for(entry_bound: float, degree: int = 2, head_dim: int = 16) -> list[Model]:
    return [
        Model("standard-1", "standard"),
        Model("standard-2", "standard", num_layers=2),
        Model("tensor-1", "tensor"),
        polynomial_model(entry_bound, degree, head_dim),
    ]


def train_config(
    task: str,
    model: Model,
    seed: int,
    preset: str,
    budget: Mapping | None = None,
    polynomial_options: Mapping | None = None,
) -> dict:
    """The task's own config (configs/TASK.py, with the budget's `task_arg` such as
    "length=6") with this model and seed; `smoke` shrinks it, a budget with `steps` > 0 sets
    the steps and batch size. `polynomial_options`: the polynomial layer's kernel options
    besides its degree (e.g. gradient, on_uncertified)."""
    budget = dict(budget or {})
    task_arg = budget.get("task_arg", "")
    arg = ",".join(
        filter(
            None, [f"attention={model.attention}", task_arg, "smoke" if preset == "smoke" else ""]
        )
    )
    config = importlib.import_module(f"configs.{task}").get_config(arg)
    config.model.num_layers = model.num_layers
    if model.entry_bound is not None:
        config.model.entry_bound = model.entry_bound
    if model.degree is not None:
        for key, value in {**(polynomial_options or {}), "degree": model.degree}.items():
            config.model.polynomial[key] = value  # PolynomialConfig fields
    if model.head_dim is not None:
        config.model.head_dim = model.head_dim
    config.train.seed = seed
    steps = budget.get("steps", 0)
    if steps and preset != "smoke":
        config.train.num_steps = steps
        config.train.batch_size = budget["batch_size"]
        config.train.eval_every = steps
        config.train.checkpoint_every = steps
        config.train.log_every = 100
        config.train.eval_size = 1024
        config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 4)
    return config.to_dict()


def _train(config: dict, run_dir: str) -> dict:
    """Trains (or resumes) one run; its final metrics (`eval/accuracy`, `eval/majority`)."""
    from tensorattn import training

    return training.train_and_evaluate(config, run_dir)


def train_point(
    config: dict, instance: str, model: Model, preset: str, workdir: str, fingerprint: str
) -> dict:
    """Trains (or resumes) one run of `train_config(...)` in a folder named by its
    `fingerprint` (`training.run_fingerprint(config)`); returns a result row."""
    from tensorattn.training import TrainingInterrupted

    train = config["train"]
    budget = f"steps{train['num_steps']}_batch{train['batch_size']}"
    # Another config (learning rate, task format, ...) never resumes this run's checkpoints.
    run_dir = os.path.join(
        workdir, "train", preset, instance, model.name, budget, f"seed{train['seed']}_{fingerprint}"
    )
    row = {
        "task": instance,
        "task_format": examples_format(config),
        "model": model.name,
        "attention": model.attention,
        "num_layers": model.num_layers,
        "entry_bound": model.entry_bound,
        "degree": model.degree,
        "seed": train["seed"],
        "preset": preset,
        "steps": train["num_steps"],
        "width": config["model"]["width"],
        "head_dim": config["model"]["head_dim"],
        "batch_size": train["batch_size"],
        "fingerprint": fingerprint,
    }
    start = time.perf_counter()
    try:
        final = _train(config, run_dir)
        row["accuracy"] = final.get("eval/accuracy")
        # Majority-class accuracy of the held-out set: the baseline to beat.
        row["majority"] = final.get("eval/majority")
        row["status"] = "ok"
    except TrainingInterrupted:  # SIGTERM/Ctrl-C: the run saved its step; stop the claims
        raise
    except Exception as e:  # a diverged or failed run is a row, not the end of the claim
        row["status"] = "error"
        row["reason"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["accuracy"] = row["majority"] = None
    row["wall_s"] = round(time.perf_counter() - start, 1)
    return row


def examples_format(config: dict) -> int:
    """`Task.format_version` of a training config's task."""
    from tensorattn import tasks

    return tasks.make(config["task"]["name"], **config["task"]["kwargs"]).format_version


def task_instance(task: str, budget: dict | None) -> str:
    """The task's name with its budget's `task_arg`, e.g. `relation_composition(size=4)`."""
    task_arg = (budget or {}).get("task_arg", "")
    return task + (f"({task_arg})" if task_arg else "")


def run_points(points, workdir: str, name: str, preset: str, polynomial_options=None, log=print,
               train_dir: str = ""):  # fmt: skip
    """Trains each (task, budget, model, seed) point not already finished in
    `WORKDIR/name.jsonl` (checkpoints under `train_dir`, or the workdir); returns one row per
    point."""
    from tensorattn.training import run_fingerprint

    path = os.path.join(workdir, f"{name}.jsonl")
    # A finished row is reused only for the same run: its config's fingerprint. Failed runs
    # are tried again; rows written before runs were fingerprinted cannot be told apart.
    finished = [r for r in workdir_files.read_jsonl(path) if r.get("status") == "ok"]
    done = {r["fingerprint"]: r for r in finished if "fingerprint" in r}
    if len(done) < len(finished):
        log(f"{path}: {len(finished) - len(done)} finished rows have no fingerprint (written "
            "before runs were fingerprinted); their points are trained again")  # fmt: skip
    rows = []
    for i, (task, budget, model, seed) in enumerate(points):
        config = train_config(task, model, seed, preset, budget, polynomial_options)
        fingerprint = run_fingerprint(config)
        if fingerprint in done:
            rows.append(done[fingerprint])
            continue
        instance = task_instance(task, budget)
        row = train_point(config, instance, model, preset, train_dir or workdir, fingerprint)
        benchlib.append_jsonl(path, row)
        reason = f" ({row['reason']})" if row["status"] != "ok" else ""
        log(
            f"[{i + 1}/{len(points)}] {instance} {model.name} seed {seed}: {row['status']} "
            f"accuracy {row['accuracy']} ({row['wall_s']:.0f} s){reason}"
        )
        rows.append(row)
    return rows


def aggregate(rows: list[dict], by=("task", "model")) -> list[dict]:
    """Median, min and max accuracy over seeds per group."""
    out = []
    for key in sorted({tuple(r[k] for k in by) for r in rows}, key=str):
        group = [r for r in rows if tuple(r[k] for k in by) == key]
        accs = [r["accuracy"] for r in group if r.get("accuracy") is not None]
        out.append(
            {
                **dict(zip(by, key)),
                "seeds": len(accs),
                "median": statistics.median(accs) if accs else None,
                "min": min(accs) if accs else None,
                "max": max(accs) if accs else None,
                "majority": next((r["majority"] for r in group if r.get("majority")), None),
                "failed": sum(r["status"] != "ok" for r in group),
            }
        )
    return out


def _polynomial_options(config: dict) -> tuple[dict, int, int]:
    """(kernel options besides the degree, degree, head dim) of the claims' polynomial model."""
    pm = dict(config["polynomial_model"])
    degree, head_dim = pm.pop("degree"), pm.pop("head_dim")
    return pm, degree, head_dim


# Held-out accuracy reported by Kozachinskiy et al. (Strassen attention, NeurIPS 2025) for one
# layer of third-order attention and for two layers of standard attention, on the tasks that
# paper shares with claim 4 (docs/math.md §6 defines the tasks).
PAPER_ACCURACY = {
    "relation_composition": {"third-order-1": 1.00, "standard-2": 0.92},
    "quotient_relation_composition": {"third-order-1": 0.98, "standard-2": 0.82},
}


def beside_paper(agg: list[dict]) -> list[dict]:
    """Rows of claim 4's medians (tensor-1, standard-2) beside the paper's numbers, for the
    tasks the paper shares; `task` keeps our instance (e.g. the grid size)."""
    rows = []
    for task in sorted({a["task"] for a in agg}):
        paper = PAPER_ACCURACY.get(task.split("(")[0])
        if paper is None:
            continue
        ours = {a["model"]: a["median"] for a in agg if a["task"] == task}
        rows.append(
            {
                "task": task,
                "tensor-1": ours.get("tensor-1"),
                "paper third-order-1": paper["third-order-1"],
                "standard-2": ours.get("standard-2"),
                "paper standard-2": paper["standard-2"],
            }
        )
    return rows


def expressivity_points(config: dict) -> list[tuple]:
    """Claim 4's (task, budget, model, seed) points."""
    c = config["expressivity"]
    _, degree, head_dim = _polynomial_options(config)
    budgets = c["budgets"] or {}
    return [
        (t, budgets.get(t), m, s)
        for t in _names(c["tasks"])
        for s in _names(c["seeds"])
        for m in models_for(c["entry_bound"], degree, head_dim)
    ]


def pairwise_lookups(points, preset: str, polynomial_options) -> dict[str, float | None]:
    """{task instance: the pairwise-feature lookup's accuracy} for claim 4's points."""
    from experiments import task_shortcuts

    out = {}
    for task, budget, model, seed in points:
        instance = task_instance(task, budget)
        if instance not in out:
            task_config = train_config(task, model, seed, preset, budget, polynomial_options)
            kwargs = dict(task_config["task"]["kwargs"])
            out[instance] = task_shortcuts.pairwise_lookup(task_config["task"]["name"], kwargs)
    return out


def claim_expressivity(workdir: str, config="cpu") -> dict:
    """Claim 4: accuracy per (task, model) over seeds."""
    config = load_config(config)
    preset = config["preset"]
    options, _, _ = _polynomial_options(config)
    points = expressivity_points(config)
    rows = run_points(
        points,
        workdir,
        "claim4_expressivity",
        preset,
        options,
        train_dir=config.get("train_dir", ""),
    )
    agg = aggregate(rows)
    lookup = pairwise_lookups(points, preset, options)
    for a in agg:
        a["pairwise_lookup"] = lookup.get(a["task"])
    claim_plots.accuracy_bars(agg, os.path.join(workdir, "claim4_expressivity.png"))
    columns = ["task", "model", "seeds", "median", "min", "max", "majority", "pairwise_lookup"]
    table = (
        "pairwise_lookup: the held-out accuracy of a lookup on a few pairwise features of each "
        "task instance (`python -m experiments.task_shortcuts`, docs/math.md §6); a model at "
        "or below it shows no composition.\n\n" + benchlib.markdown_table(agg, [*columns, "failed"])
    )
    paper = beside_paper(agg)
    if paper:
        table += (
            "\nBeside Kozachinskiy et al. (NeurIPS 2025), medians over seeds (our task formats, "
            "docs/math.md §6; the paper's input encoding may differ):\n\n"
            + benchlib.markdown_table(paper, list(paper[0]))
        )
    _write(os.path.join(workdir, "claim4_expressivity.md"), table)
    figure = {"preset": preset, "accuracy": {f"{a['task']}/{a['model']}": a["median"] for a in agg}}
    figure["failed"] = sum(a["failed"] for a in agg)
    return _summary(workdir, "claim4_expressivity", figure)


def score_range(head_dim: int, entry_bound: float) -> float:
    """Largest |score| of an order-3 layer with entries <= B and scale 1/sqrt(H): sqrt(H) B^3."""
    return math.sqrt(head_dim) * entry_bound**3


def bounded_points(config: dict) -> list[tuple]:
    """Claim 5's (task, budget, model, seed) points: the unbounded exact model, then per bound
    the bounded exact and the polynomial model."""
    c = config["bounded"]
    _, degree, head_dim = _polynomial_options(config)
    models = [Model(f"tensor-1(H={head_dim})", "tensor", head_dim=head_dim)]
    for b in (float(b) for b in _names(c["bounds"])):
        models.append(Model(f"tensor-1(B={b:g},H={head_dim})", "tensor", 1, b, None, head_dim))
        models.append(polynomial_model(b, degree, head_dim))
    return [(c["task"], c["budget"], m, s) for m in models for s in _names(c["seeds"])]


def claim_bounded(workdir: str, config="cpu") -> dict:
    """Claim 5: Match3 accuracy as the entry bound B grows, of the polynomial model and of the
    exact model with the same bound (which separates bounding from approximating), against
    the unbounded exact model; all with the polynomial model's head dim."""
    config = load_config(config)
    c, preset = config["bounded"], config["preset"]
    options, degree, head_dim = _polynomial_options(config)
    budget = c["budget"]
    points = bounded_points(config)
    rows = run_points(
        points, workdir, "claim5_bounded", preset, options, train_dir=config.get("train_dir", "")
    )
    agg = aggregate(rows, by=("model", "attention", "entry_bound"))
    lookup = pairwise_lookups(points[:1], preset, options).popitem()[1] if points else None
    for a in agg:
        a["pairwise_lookup"] = lookup
        b = a["entry_bound"]
        a["R"] = None if b is None else score_range(head_dim, b)
        a["taylor_rel_error"] = (
            poly.relative_error("taylor", degree, a["R"])
            if a["attention"] == "polynomial"
            else None
        )
    cols = ["model", "entry_bound", "R", "taylor_rel_error", "seeds", "median", "min", "max"]
    _write(
        os.path.join(workdir, "claim5_bounded.md"),
        f"Match3 ({budget.get('task_arg') or 'config default'}), majority class "
        f"{benchlib.format_cell(agg[0]['majority'] if agg else None)}, pairwise-feature "
        f"lookup {benchlib.format_cell(lookup)} "
        "(`python -m experiments.task_shortcuts`); R = sqrt(H) B^3 is the largest |score|, "
        f"taylor_rel_error the degree-{degree} polynomial's largest relative error on [-R, R].\n\n"
        + benchlib.markdown_table(agg, cols),
    )
    claim_plots.bounded(agg, os.path.join(workdir, "claim5_bounded.png"))
    figure = {"preset": preset, "accuracy": {a["model"]: a["median"] for a in agg}}
    figure["failed"] = sum(a["failed"] for a in agg)
    return _summary(workdir, "claim5_bounded", figure)


CLAIMS = {
    "forward": claim_forward,
    "gradient": claim_gradient,
    "threshold": claim_threshold,
    "expressivity": claim_expressivity,
    "bounded": claim_bounded,
}


TRAINING_POINTS = {"expressivity": expressivity_points, "bounded": bounded_points}


class ClaimConfigError(ValueError):
    """A claim's config that cannot train, found before any work."""


def check_claims(names, config: dict) -> None:
    """Every named claim's config, before any work; ClaimConfigError naming the claim and the
    field: claims 1-2 as sweeps (their fields, and implementations this backend runs), claim
    3's grid, claims 4-5's training configs (`check_training_points`)."""
    for name in ("forward", "gradient"):
        if name in names:
            try:
                sweep.check_supported(scaling_config(config[name]))
            except (sweep.SweepConfigError, KeyError, TypeError) as e:
                raise ClaimConfigError(f"claim {name}: config.{name}: {e}") from None
    if "threshold" in names:
        try:
            check_threshold(config["threshold"])
        except ValueError as e:
            raise ClaimConfigError(f"claim threshold: config.threshold.{e}") from None
    check_training_points(names, config)


def check_threshold(section: Mapping) -> None:
    """ValueError ("FIELD: why") unless claim 3's grid has int orders, lengths and check_n of
    at least 2, positive finite bounds and check_max_bound, and a positive int check_max_rank
    (orders, lengths, bounds: non-empty tuples)."""
    is_int = lambda v, low: sweep._is_int(v) and v >= low  # noqa: E731
    rules = {
        "orders": (lambda v: is_int(v, 2), "ints >= 2"),
        "lengths": (lambda v: is_int(v, 2), "ints >= 2"),
        "bounds": (lambda v: sweep._is_real(v) and 0 < v < math.inf, "positive finite numbers"),
        "check_n": (lambda v: is_int(v, 2), "an int >= 2"),
        "check_max_bound": (lambda v: sweep._is_real(v) and 0 < v < math.inf, "a positive number"),
        "check_max_rank": (lambda v: is_int(v, 1), "a positive int"),
    }
    for field, (ok, what) in rules.items():
        value = section[field]
        values = value if field in ("orders", "lengths", "bounds") else (value,)
        if not isinstance(values, (list, tuple)) or not values or not all(map(ok, values)):
            raise ValueError(f"{field}: {what} expected, got {value!r}")


def check_training_points(names, config: dict) -> None:
    """Builds and validates the training config of every (task, model) the named claims
    will train, before any work; raises ClaimConfigError naming the claim, task and model."""
    from tensorattn import training

    for name in names:
        if name not in TRAINING_POINTS:
            continue
        section = "expressivity" if name == "expressivity" else "bounded"
        try:
            points = TRAINING_POINTS[name](config)
        except ValueError as e:
            raise ClaimConfigError(f"claim {name}: config.{section}: {e}") from None
        seen = set()
        for task, budget, model, seed in points:
            if importlib.util.find_spec(f"configs.{task}") is None:
                raise ClaimConfigError(
                    f"claim {name}: unknown task {task!r} (no configs/{task}.py)"
                )
            if (task, model) in seen:  # seeds differ only in train.seed
                continue
            seen.add((task, model))
            options, _, _ = _polynomial_options(config)
            try:
                cfg = train_config(task, model, seed, config["preset"], budget, options)
                training.validate(training.options_from_dict(cfg))
            except ValueError as e:  # ConfigError, or a config string the task refuses
                raise ClaimConfigError(
                    f"claim {name}, task {task}, model {model.name}: {e}"
                ) from None


def run_claims(names, workdir: str, config="cpu", out=print) -> list[dict]:
    """What the command line does: checks the named claims' configs (`check_claims`), then
    runs the claims (or "all") in `workdir` under its lock; prints and returns each headline
    figure (`failed` counts the sweep points or training runs that ended in an error)."""
    names = list(CLAIMS) if names in ("all", ["all"]) else list(_names(names))
    for name in names:
        if name not in CLAIMS:
            raise ValueError(f"claim: unknown {name!r}; choose {sorted(CLAIMS)} or all")
    config = load_config(config)
    check_claims(names, config)
    figures = []
    workdir = workdir_files.make_workdir(workdir)
    with workdir_files.lock(workdir):
        for name in names:
            figures.append(CLAIMS[name](workdir, config))
            out(workdir_files.dumps_json(figures[-1]))
    return figures


# ----------------------------------------------------------------------------------------------
# The command line. Flags are defined by `define_flags()`, which only `__main__` calls.

_FLAGS = {}


def define_flags() -> None:
    """Defines --config, --preset, --claim, --workdir, --tasks, --bounds (once)."""
    if _FLAGS:
        return
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Claims config: configs/claims.py:preset=smoke|cpu|full."
    )
    _FLAGS["preset"] = flags.DEFINE_enum(
        "preset", None, PRESETS, "Short for --config=configs/claims.py:preset=PRESET."
    )
    _FLAGS["claim"] = flags.DEFINE_string(
        "claim", "all", f"Comma-separated claims: {sorted(CLAIMS)}, all."
    )
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Directory for the outputs.")
    _FLAGS["tasks"] = flags.DEFINE_list("tasks", [], "Claim 4's tasks (config.expressivity.tasks).")
    _FLAGS["bounds"] = flags.DEFINE_list("bounds", [], "Claim 5's bounds (config.bounded.bounds).")
    flags.mark_flags_as_required(["workdir"])


def config_from_flags(config, preset: str | None, tasks=(), bounds=()) -> dict:
    """The claims config of the command line: --config (default preset cpu), or --preset;
    --tasks/--bounds override claim 4's tasks and claim 5's bounds."""
    if config is not None and preset is not None and config.preset != preset:
        raise app.UsageError(f"--preset={preset} contradicts --config (preset {config.preset})")
    config = load_config(config if config is not None else (preset or "cpu"))
    if tasks:
        config["expressivity"] = {**config["expressivity"], "tasks": tuple(tasks)}
    if bounds:
        try:
            values = tuple(float(b) for b in bounds)
        except ValueError:
            raise app.UsageError(f"--bounds: numbers expected, got {list(bounds)}") from None
        config["bounded"] = {**config["bounded"], "bounds": values}
    return config


def preset_as_config(argv: list[str]) -> list[str]:
    """`--preset=P` (or `--preset P`) rewritten as `--config=configs/claims.py:preset=P` when
    there is no --config, so that `--config.FIELD=...` overrides work with it too."""
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--preset="):
            out.append(f"--config=configs/claims.py:preset={a.split('=', 1)[1]}")
        elif a == "--preset" and i + 1 < len(argv):
            out.append(f"--config=configs/claims.py:preset={argv[i + 1]}")
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _FLAGS:
        raise app.UsageError("flags are not defined: call define_flags() before app.run(main)")
    from tensorattn import training

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax is chatty at INFO
    v = {k: f.value for k, f in _FLAGS.items()}
    config = config_from_flags(v["config"], v["preset"], v["tasks"], v["bounds"])
    print(f"claims preset {config['preset']} on {jax.devices()[0].device_kind}", flush=True)
    names = v["claim"] if v["claim"] == "all" else _names(v["claim"])
    unknown = [n for n in ([] if names == "all" else names) if n not in CLAIMS]
    if unknown:
        raise app.UsageError(f"--claim: unknown {unknown}; choose {sorted(CLAIMS)} or all")
    try:
        figures = run_claims(names, v["workdir"], config, out=lambda s: print(s, flush=True))
    except ClaimConfigError as e:
        sys.exit(f"invalid config: {e}")
    except workdir_files.WorkdirError as e:
        sys.exit(str(e))
    except workdir_files.WorkdirLockedError as e:
        sys.exit(f"workdir busy: {e}")
    except workdir_files.CorruptFileError as e:
        sys.exit(f"cannot resume: {e}")
    except training.TrainingInterrupted as e:
        sys.exit(f"training interrupted: {e}")
    failed = sum(f.get("failed", 0) for f in figures)
    if failed:
        sys.exit(
            f"{failed} sweep point(s) or training run(s) ended in an error (their reasons are "
            "above and in the claims' .jsonl rows); re-running retries them"
        )


if __name__ == "__main__":
    define_flags()
    sys.argv = preset_as_config(sys.argv)
    app.run(main)
