"""The five claims (experiments/claims.py) at smoke size, their pure pieces, and their budgets
(configs/claims.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from configs import claims as claims_config
from experiments import benchlib, claim_plots, claims, task_shortcuts
from tensorattn import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _summaries(workdir):
    with open(os.path.join(workdir, "claims.jsonl")) as f:
        return {r["claim"]: r for r in map(json.loads, f)}


def test_presets_hold_every_claims_budget():
    smoke, cpu, full = (claims_config.get_config(f"preset={p}") for p in claims.PRESETS)
    assert claims_config.get_config("smoke").preset == "smoke"
    assert claims_config.get_config().preset == "cpu"
    for c in (smoke, cpu, full):
        for section in ("forward", "gradient", "threshold", "expressivity", "bounded"):
            assert section in c
        assert c.forward.implementations == ("exact", "polynomial")  # the fastest exact kernel
        assert c.forward.passes == ("fwd",) and c.gradient.passes == ("fwd+grad",)
    # CPU budgets of claims 4-5 (about a minute per run) and the smaller task instances.
    assert cpu.expressivity.budgets.match3.task_arg == "length=6,modulus=19"
    assert cpu.expressivity.budgets.match2.steps == 300
    assert cpu.bounded.budget.steps == 800
    assert set(cpu.expressivity.tasks) == set(claims_config.TASKS)
    # full: each task's own config, Match3 at its hard instance with 2000 steps.
    assert full.expressivity.budgets.to_dict() == {
        "match3": {"steps": 2000, "batch_size": 256, "task_arg": "length=16,modulus=181"}
    }
    # full: practical head dim and degree, lengths to where each curve stops being feasible.
    assert (full.forward.head_dim, full.forward.degree) == (16, 4)
    assert max(full.forward.lengths) == 2**20 and max(full.gradient.lengths) >= 65536
    assert full.polynomial_model.degree == 4
    assert smoke.expressivity.tasks == ("match3",) and smoke.expressivity.seeds == (0,)
    with pytest.raises(ValueError, match="preset"):
        claims_config.get_config("preset=tpu")


def test_importable_without_main_and_claims_are_functions():
    """Every experiments module imports together and defines no flags (issue 11)."""
    code = (
        "import experiments.claims as c, experiments.sweep as s; from absl import flags; "
        "import experiments.bench_kernels, experiments.bench_pallas, "
        "experiments.bench_polynomial; "
        "assert not {'claim', 'workdir', 'repeats', 'out', 'preset'} & set(flags.FLAGS); "
        "assert sorted(c.CLAIMS) == ['bounded', 'expressivity', 'forward', 'gradient', "
        "'threshold']; print(c.scaling_config(c.load_config('smoke')['forward'])['lengths'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(16, 32, 64)"


def test_scaling_config_is_a_valid_sweep_config():
    from experiments import sweep

    for preset in claims.PRESETS:
        for section in ("forward", "gradient"):
            config = claims.scaling_config(claims.load_config(preset)[section])
            sweep.validate_config(config)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+grad"])
def test_scaling_claims_smoke(tmp_path, pass_):
    figure = claims.claim_scaling(str(tmp_path), "smoke", pass_)
    assert figure["exact_slope"] is not None and figure["polynomial_slope"] is not None
    assert len(figure["exact_fit_lengths"]) == 3
    assert 0 < figure["max_relative_error"] < 0.1
    assert figure["rank"] == 45  # C(8 + 2, 2)
    name = "claim1_forward" if pass_ == "fwd" else "claim2_gradient"
    for ext in ("png", "md"):
        assert os.path.getsize(os.path.join(tmp_path, f"{name}.{ext}")) > 0
    assert name in _summaries(tmp_path)


def test_scaling_claim_counts_points_that_ended_in_error(tmp_path, monkeypatch):
    """A sweep point that ended in "error" is counted in the figure's `failed`, so the command
    line exits non-zero and scripts/reproduce.sh leaves the step unmarked; the printed figure
    is strict JSON (null, never a bare NaN)."""
    from experiments import sweep

    def measure(point, **_):
        status = "error" if point["implementation"] == "polynomial" else "ok"
        row = dict(point, status=status, reason="RuntimeError: simulated", median_ms=1.0)
        return row

    monkeypatch.setattr(sweep, "measure", measure)
    printed = []
    figures = claims.run_claims("forward", str(tmp_path), "smoke", out=printed.append)
    assert figures[0]["failed"] == 3  # the polynomial series, one point per length
    assert json.loads(printed[0])["polynomial_slope"] is None


def test_claims_1_to_3_configs_are_checked_before_any_work(tmp_path):
    """A bad sweep field of claims 1-2 or a bad grid of claim 3 stops the claims before any
    runs, naming the claim and the field; the workdir is not created."""
    config = claims.load_config("smoke")
    bad = {
        r"claim forward: config.forward: implementations: unknown 'bogus'": (
            "forward", {"implementations": ("bogus",)}),
        r"claim gradient: config.gradient: dtype": ("gradient", {"dtype": "float64"}),
        r"config.threshold.lengths: ints >= 2": ("threshold", {"lengths": (0, 64)}),
        r"config.threshold.bounds: positive": ("threshold", {"bounds": (0.5, -1.0)}),
        r"config.threshold.orders: ints >= 2": ("threshold", {"orders": (1, 3)}),
    }  # fmt: skip
    workdir = tmp_path / "claims"
    for message, (section, fields) in bad.items():
        broken = dict(config, **{section: {**config[section], **fields}})
        with pytest.raises(claims.ClaimConfigError, match=message):
            claims.run_claims(f"threshold,{section}", str(workdir), broken)
    assert not workdir.exists()


def test_threshold_plot_draws_the_orders_and_c_of_the_table(tmp_path, monkeypatch):
    """The plot has one panel per order of the grid (not a fixed 2, 3, 4) and marks the c of
    claim 3's table (capped crossings left out)."""
    drawn = {}
    monkeypatch.setattr(claim_plots, "_save", lambda fig, path: drawn.update(fig=fig))
    config = claims.load_config("smoke")
    config["threshold"] = {**config["threshold"], "orders": (3, 5), "lengths": (256, 1000)}
    figure = claims.claim_threshold(str(tmp_path), config)
    axes = drawn["fig"].axes
    assert [ax.get_title() for ax in axes] == [
        "order 3: threshold (ln n)^(1/3)", "order 5: threshold (ln n)^(1/5)"]  # fmt: skip
    for ax, t in zip(axes, (3, 5)):
        labels = ax.get_legend_handles_labels()[1]
        assert f"median c={figure[f'c_order{t}']:.2f}" in labels
        assert labels[:2] == ["n=2^8", "n=1000"]


def test_repeated_tasks_seeds_and_bounds_train_once():
    config = claims.load_config("smoke")
    once = len(claims.expressivity_points(config)), len(claims.bounded_points(config))
    config["expressivity"] = {**config["expressivity"], "tasks": ("match3,match3",),
                              "seeds": (0, 0)}  # fmt: skip
    config["bounded"] = {**config["bounded"], "bounds": (1.0, 1.0), "seeds": (0, 0)}
    assert (len(claims.expressivity_points(config)), len(claims.bounded_points(config))) == once
    printed = []
    benchlib.print_table([], ["a", "bb"], out=printed.append)  # no rows: the header alone
    assert printed == ["a  bb"]


def test_threshold_rows_degree_rank_and_cost():
    rows = claims.threshold_rows([3], [256], [0.25, 0.5, 1.0, 1.5, 2.0])
    degrees = [r["degree"] for r in rows]
    assert degrees == sorted(degrees) and degrees[0] >= 1  # more degree as B grows
    for r in rows:
        assert r["d"] == 8 and r["R"] == pytest.approx(r["B"] ** 3)
        assert r["rank"] == math.comb(8 + r["degree"], r["degree"])
        assert r["cost_ratio"] == pytest.approx(2 * r["rank"] * 9 * 3 * 256 / (4 * 256**3 * 8))
    ratios = [r["cost_ratio"] for r in rows]
    assert ratios == sorted(ratios)


def test_crossing_bounds_interpolates_and_fits_c():
    rows = [
        {"order": 3, "n": 1024, "B": 1.0, "cost_ratio": 0.1},
        {"order": 3, "n": 1024, "B": 2.0, "cost_ratio": 10.0},
        {"order": 2, "n": 1024, "B": 1.0, "cost_ratio": 2.0},
    ]
    out = {r["order"]: r for r in claims.crossing_bounds(rows)}
    assert out[3]["B_star"] == pytest.approx(1.5)  # log-linear: halfway between 0.1 and 10
    assert out[3]["c"] == pytest.approx(1.5 / math.log(1024) ** (1 / 3))
    assert out[2]["B_star"] is None  # never cheap on the grid


def test_threshold_claim_smoke(tmp_path):
    figure = claims.claim_threshold(str(tmp_path), "smoke")
    for t in (2, 3, 4):
        assert figure[f"c_order{t}"] > 0
    assert figure["empirical_checks"] >= 1
    assert figure["empirical_checks_holding"] == figure["empirical_checks"]
    assert os.path.getsize(os.path.join(tmp_path, "claim3_threshold.png")) > 0


def test_train_configs_of_every_task_and_model():
    cpu = claims.load_config("cpu")
    options = {"gradient": "autodiff", "on_uncertified": "ignore"}
    for task in claims_config.TASKS:
        for model in claims.models_for(1.5, 3):
            for preset in ("smoke", "cpu"):
                c = claims.train_config(task, model, seed=2, preset=preset)
                assert c["model"]["attention"] == model.attention
                assert c["model"]["num_layers"] == model.num_layers
                assert c["train"]["seed"] == 2
        poly = claims.train_config(task, claims.models_for(1.5, 3)[-1], 0, "smoke", None, options)
        assert poly["model"]["entry_bound"] == 1.5
        poly_options = poly["model"]["polynomial"]
        assert poly_options["degree"] == 3 and poly_options["on_uncertified"] == "ignore"
        budget = cpu["expressivity"]["budgets"][task]
        c = claims.train_config(task, claims.models_for(1.0)[2], 0, "cpu", budget)
        assert c["train"]["num_steps"] == budget["steps"]


def test_cpu_task_instances_are_valid():
    """The smaller CPU instances (e.g. Match3 length 6 mod 19) pass the tasks' own checks."""
    from tensorattn import tasks

    budgets = claims.load_config("cpu")["expressivity"]["budgets"]
    for task in claims_config.TASKS:
        c = claims.train_config(task, claims.models_for(1.0)[0], 0, "cpu", budgets[task])
        tasks.make(c["task"]["name"], **c["task"]["kwargs"])


def test_aggregate_median_and_spread(tmp_path):
    rows = [
        {"task": "m", "model": "a", "accuracy": acc, "status": "ok", "majority": 0.6}
        for acc in (0.7, 0.9, 0.8)
    ] + [{"task": "m", "model": "b", "accuracy": None, "status": "error", "majority": 0.6}]
    agg = {a["model"]: a for a in claims.aggregate(rows)}
    assert agg["a"]["median"] == 0.8 and agg["a"]["min"] == 0.7 and agg["a"]["max"] == 0.9
    assert agg["b"]["median"] is None and agg["b"]["failed"] == 1
    claim_plots.accuracy_bars(list(agg.values()), str(tmp_path / "bars.png"))
    assert os.path.getsize(tmp_path / "bars.png") > 0


def test_training_claims_smoke(tmp_path):
    """Claim 5 at smoke size (covers claim 4's machinery: runs, resume, aggregate, plot)."""
    figure = claims.claim_bounded(str(tmp_path), "smoke")
    assert set(figure["accuracy"]) == {
        "tensor-1(H=16)",
        "tensor-1(B=1,H=16)",
        "polynomial-1(B=1,g=2,H=16)",
    }
    assert all(0 <= a <= 1 for a in figure["accuracy"].values())
    again = claims.CLAIMS["bounded"](str(tmp_path), "smoke")  # resumes: no new runs
    assert again["accuracy"] == figure["accuracy"]
    with open(os.path.join(tmp_path, "claim5_bounded.jsonl")) as f:
        assert len(f.readlines()) == 3
    table = open(os.path.join(tmp_path, "claim5_bounded.md")).read()
    assert "| polynomial-1(B=1,g=2,H=16) | 1 | 4 |" in table  # R = sqrt(16) * 1^3


def test_expressivity_claim_smoke(tmp_path):
    """Claim 4 at smoke size: Match3, the four models, one seed each; a table and a plot."""
    figure = claims.claim_expressivity(str(tmp_path), "smoke")
    assert len(figure["accuracy"]) == 4
    assert all(0 <= a <= 1 for a in figure["accuracy"].values())
    table = open(os.path.join(tmp_path, "claim4_expressivity.md")).read()
    assert "standard-2" in table and "polynomial-1(B=1,g=2,H=16)" in table
    assert os.path.getsize(os.path.join(tmp_path, "claim4_expressivity.png")) > 0
    lookup = task_shortcuts.pairwise_lookup("match3", {"length": 10, "modulus": 53})
    assert f"| {benchlib.format_cell(lookup)} |" in table  # the default instance's lookup


def test_pairwise_lookup_of_the_task_instances():
    """Match3 6/19 gives its pairwise matches away (76% against a 69% majority); 10/53 does
    not; Match2 has no pairwise shortcut to measure (it is pairwise itself). Function
    composition's lookup is many-class: one hop and the mode of f guess f(f(x)) a quarter of
    the time, against a 7% majority class."""
    assert task_shortcuts.pairwise_lookup("match2", {"length": 10}) is None
    assert task_shortcuts.pairwise_lookup("match3", {"length": 6, "modulus": 19}) > 0.75
    assert task_shortcuts.pairwise_lookup("match3", {"length": 10, "modulus": 53}) < 0.66
    assert 0.2 < task_shortcuts.pairwise_lookup("function_composition", {"size": 16}) < 0.3


def test_command_line_preset_alias_and_overrides(tmp_path):
    """`--preset` is short for `--config=configs/claims.py:preset=...`; `--claim` and
    `--workdir` as before; an unknown claim exits non-zero."""
    cmd = [sys.executable, "-m", "experiments.claims", f"--workdir={tmp_path}"]
    out = subprocess.run(
        cmd + ["--config=configs/claims.py:preset=smoke", "--claim=threshold",
               "--config.threshold.lengths=256"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["lengths"] == [256, 256]
    bad = subprocess.run(
        cmd + ["--preset=smoke", "--claim=nonsense"], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "nonsense" in bad.stderr


def test_training_configs_are_checked_before_any_work(tmp_path, monkeypatch):
    """An unknown task, a bound the model refuses or a polynomial option it refuses stop the
    claims before any of them runs (claims 1-3 included), naming the claim, task and model."""
    ran = []
    monkeypatch.setitem(claims.CLAIMS, "forward", lambda *a: ran.append(a))
    config = claims.load_config("smoke")
    bad = {
        "unknown task 'match4'": ("expressivity", {"tasks": ("match4",)}),
        "model.entry_bound": ("bounded", {"bounds": (-1.0,)}),
    }
    for message, (section, fields) in bad.items():
        broken = dict(config, **{section: {**config[section], **fields}})
        with pytest.raises(claims.ClaimConfigError, match=message):
            claims.run_claims("all", str(tmp_path), broken)
    broken = dict(config, polynomial_model={**config["polynomial_model"], "gradient": "bogus"})
    with pytest.raises(claims.ClaimConfigError, match=r"polynomial-1.*gradient"):
        claims.run_claims("forward,expressivity", str(tmp_path), broken)
    assert not ran and not os.listdir(tmp_path)


def test_preset_takes_config_overrides_and_failed_runs_are_counted(tmp_path, monkeypatch):
    """`--preset` becomes `--config=...:preset=` so that `--config.FIELD` overrides apply; a
    run that fails is logged with its reason and counted in the figure (the command line then
    exits non-zero)."""
    assert claims.preset_as_config(["x", "--preset", "smoke", "--config.a=1"]) == [
        "x", "--config=configs/claims.py:preset=smoke", "--config.a=1"]  # fmt: skip
    assert claims.preset_as_config(["x", "--preset=cpu"]) == [
        "x", "--config=configs/claims.py:preset=cpu"]  # fmt: skip
    argv = ["x", "--config=configs/claims.py", "--preset=cpu"]  # main names the contradiction
    assert claims.preset_as_config(argv) == argv

    def fail(config, run_dir):
        raise RuntimeError("diverged")

    monkeypatch.setattr(claims, "_train", fail)
    config = claims.load_config("smoke")
    config["expressivity"] = {**config["expressivity"], "tasks": ("match2",)}
    figure = claims.claim_expressivity(str(tmp_path), config)
    assert figure["failed"] == len(claims.expressivity_points(config)) == 4

    def interrupted(config, run_dir):  # SIGTERM/Ctrl-C in a run stops the claims, no row
        raise training.TrainingInterrupted("SIGTERM at step 3")

    monkeypatch.setattr(claims, "_train", interrupted)
    with pytest.raises(training.TrainingInterrupted):
        claims.claim_expressivity(str(tmp_path / "again"), config)


def test_rows_are_reused_for_the_same_run_only(tmp_path, monkeypatch):
    """A finished row is reused only for its config's fingerprint (`training.run_fingerprint`):
    another learning rate trains the point again, in a folder of its own; rows without a
    fingerprint (written before runs were fingerprinted) are trained again, and said so."""
    run_dirs, logged = [], []

    def train(config, run_dir):
        run_dirs.append(os.path.relpath(run_dir, tmp_path))
        return {"eval/accuracy": 1.0, "eval/majority": 0.5}

    monkeypatch.setattr(claims, "_train", train)
    config = claims.load_config("smoke")
    config["expressivity"] = {**config["expressivity"], "tasks": ("match2", "function_composition")}
    points = [p for p in claims.expressivity_points(config) if p[2].name == "standard-1"]
    first = claims.run_points(points, str(tmp_path), "rows", "smoke", log=lambda _: None)
    assert [r["task_format"] for r in first] == [1, 2]
    prints = [r["fingerprint"] for r in first]
    assert run_dirs == [
        os.path.join("train", "smoke", r["task"], "standard-1",
                     f"steps{r['steps']}_batch{r['batch_size']}", f"seed0_{r['fingerprint']}")
        for r in first
    ]  # fmt: skip
    run_dirs.clear()
    assert claims.run_points(points, str(tmp_path), "rows", "smoke", log=logged.append) == first
    assert not run_dirs and not logged

    train_config = claims.train_config

    def faster(task, *args, **kwargs):  # function composition at another learning rate
        config = train_config(task, *args, **kwargs)
        if task == "function_composition":
            config["optim"]["learning_rate"] = 0.01
        return config

    monkeypatch.setattr(claims, "train_config", faster)
    again = claims.run_points(points, str(tmp_path), "rows", "smoke", log=lambda _: None)
    assert again[0] == first[0] and again[1]["fingerprint"] not in prints
    assert len(run_dirs) == 1 and run_dirs[0].endswith(f"seed0_{again[1]['fingerprint']}")

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({k: v for k, v in first[0].items() if k != "fingerprint"}) + "\n")
    run_dirs.clear()
    claims.run_points(points[:1], str(tmp_path), "rows", "smoke", log=logged.append)
    assert len(run_dirs) == 1 and "1 finished rows have no fingerprint" in logged[0]


def test_threshold_search_reaches_degree_31():
    """Claim 3's `full` grid meets R = 10.24 (n = 2^21, order 2, B = 3.2) near degree 31, where
    numpy's cheb2poly once dropped a zero leading coefficient."""
    (row,) = claims.threshold_rows([2], [2**21], [3.2])
    eps = row["tolerance"] / (2 + row["tolerance"])
    degree = row["degree"]
    assert poly_error(degree, 10.24) <= eps < poly_error(degree - 1, 10.24)


def poly_error(degree: int, R: float) -> float:
    from tensorattn.kernels import polynomial

    return polynomial.relative_error("chebyshev", degree, R)


def test_reproduce_full_is_split_into_steps():
    out = subprocess.run(
        ["bash", "scripts/reproduce.sh", "--full", "--list"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    steps = out.stdout.split()
    assert out.returncode == 0 and len(steps) == len(set(steps))
    expected = ["sweep-exact-fwd", "sweep-polynomial-grad", "sweep-plot", "claim1-forward"]
    expected += ["claim3-threshold", "claim4-expressivity-match3-seed1", "claim5-bounded-seed2"]
    assert set(expected) <= set(steps)
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"split into {len(steps)} resumable steps" in readme
    cpu = subprocess.run(
        ["bash", "scripts/reproduce.sh", "--list"], cwd=ROOT, capture_output=True, text=True
    )
    assert cpu.stdout.split()[0] == "sweep" and "claim5-bounded" in cpu.stdout


def _stand_in_python(path, sleep_s=0):
    """A stand-in for Python in reproduce.sh: each claims run appends a row saying how many
    rows its workdir held, then sleeps."""
    path.write_text(
        "#!/bin/sh\n"
        "for a; do case $a in --workdir=*) d=${a#--workdir=};; esac; done\n"
        'n=$(cat "$d/claim5_bounded.jsonl" 2>/dev/null | wc -l)\n'
        'echo "{\\"rows_seen\\": $n}" >> "$d/claim5_bounded.jsonl"\n'
        "echo '{}' >> \"$d/claims.jsonl\"\n"
        f"sleep {sleep_s}\n"
    )
    path.chmod(0o755)
    return str(path)


def _reproduce_step(tmp_path, python, train_dir, timeout=None):
    env = dict(os.environ, PYTHON=python, OUT=str(tmp_path / "out"), FORCE="1",
               CLAIMS="bounded", TRAIN_DIR=str(tmp_path / train_dir))  # fmt: skip
    command = ["bash", "scripts/reproduce.sh", "--full", "--step=claim5-bounded-seed0"]
    if timeout:
        command = ["timeout", str(timeout)] + command
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_reproduce_resumes_training_claims_from_its_output_alone(tmp_path):
    """The rows of finished training runs are in OUT as each run ends (a kill keeps them),
    whatever TRAIN_DIR (another machine's, empty or stale) holds the checkpoints."""
    python = _stand_in_python(tmp_path / "python")
    for machine in ("first", "second", "second", "first"):
        run = _reproduce_step(tmp_path, python, machine)
        assert run.returncode == 0, run.stderr
    rows = (tmp_path / "out" / "claim5_bounded.jsonl").read_text().splitlines()
    assert [json.loads(r)["rows_seen"] for r in rows] == [0, 1, 2, 3]
    run = _reproduce_step(tmp_path, _stand_in_python(tmp_path / "slow", 30), "third", timeout=2)
    assert run.returncode == 124
    rows = (tmp_path / "out" / "claim5_bounded.jsonl").read_text().splitlines()
    assert [json.loads(r)["rows_seen"] for r in rows] == [0, 1, 2, 3, 4]


def test_beside_paper_pairs_our_medians_with_the_papers():
    agg = [
        {"task": "relation_composition(size=6)", "model": "tensor-1", "median": 0.99},
        {"task": "relation_composition(size=6)", "model": "standard-2", "median": 0.9},
        {"task": "match2", "model": "tensor-1", "median": 1.0},
    ]
    (row,) = claims.beside_paper(agg)
    assert row == {
        "task": "relation_composition(size=6)",
        "tensor-1": 0.99,
        "paper third-order-1": 1.0,
        "standard-2": 0.9,
        "paper standard-2": 0.92,
    }


@pytest.mark.parametrize("claim", ["claim4_expressivity", "claim5_bounded"])
def test_committed_cpu_rows_are_this_codes_runs(claim):
    """Every committed CPU row of claims 4-5 (results/cpu, quoted in the README) has the
    fingerprint of a point of today's cpu preset: a change to a budget, a task config, the
    training code's `RESULTS_VERSION` or the fingerprint itself shows here until the claim is
    re-run (`scripts/reproduce.sh`, which would otherwise train those points again)."""
    config = claims.load_config("cpu")
    options, _, _ = claims._polynomial_options(config)
    points = {"claim4_expressivity": claims.expressivity_points,
              "claim5_bounded": claims.bounded_points}[claim](config)  # fmt: skip
    current = {
        training.run_fingerprint(claims.train_config(task, model, seed, "cpu", budget, options))
        for task, budget, model, seed in points
    }
    with open(os.path.join(ROOT, "results", "cpu", f"{claim}.jsonl")) as f:
        committed = {json.loads(line)["fingerprint"] for line in f}
    assert committed == current
