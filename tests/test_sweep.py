"""The sequence-length sweep (experiments/sweep.py): rows, statuses, resume, plot, config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import sweep as sweep_config
from experiments import harness, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    c = sweep_config.get_config("smoke")
    c.lengths = (16, 24, 32)
    c.max_length = {}
    c.error_max_length = 16
    c.update(overrides)
    return c.to_dict()


def _lines(workdir):
    with open(os.path.join(workdir, "sweep.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_smoke_config_covers_the_issue():
    c = sweep_config.get_config("smoke")
    assert {"reference", "blocked", "polynomial"} <= set(c.implementations)
    assert len(c.lengths) >= 3
    assert sweep_config.get_config("preset=gpu").lengths[-1] >= 32768
    with pytest.raises(ValueError, match="preset"):
        sweep_config.get_config("preset=tpu")


def test_fit_slope_recovers_a_power_law():
    ns = [64, 128, 256, 512]
    assert sweep.fit_slope(ns, [3.0 * n**2.5 for n in ns]) == pytest.approx(2.5)


def test_flops_of_a_point():
    point = dict(sweep.points_of(_config())[0], implementation="blocked", n=8)
    assert harness.flops(point) == 4.0 * 8**3 * 8


def test_sweep_writes_rows_plot_table_and_resumes(tmp_path):
    workdir = str(tmp_path)
    rows = sweep.run_sweep(_config(), workdir, log=lambda _: None)
    assert len(rows) == 9
    for r in rows:
        assert {
            "implementation",
            "n",
            "pass",
            "median_ms",
            "tflops",
            "status",
            "device_kind",
            "jax_version",
        } <= set(r)
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["compile_s"] > 0 and r["flops"] > 0
    poly = [r for r in rows if r["implementation"] == "polynomial"]
    assert all(r["rank"] == 45 for r in poly)  # C(8 + 2, 2)
    errors = [r["relative_error"] for r in poly if r["relative_error"] is not None]
    assert errors and max(errors) < 0.1
    for name in ("sweep.png", "sweep.md"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    again = sweep.run_sweep(_config(), workdir, log=lambda _: None)
    assert len(again) == 9 and len(_lines(workdir)) == 9  # nothing re-run
    more = sweep.run_sweep(
        _config(lengths=(16, 24, 32, 40), implementations=("polynomial",)),
        workdir,
        log=lambda _: None,
    )
    assert len(more) == 4 and len(_lines(workdir)) == 10  # only n=40 is new


def test_failures_are_rows_and_the_sweep_goes_on(tmp_path):
    config = _config(
        implementations=("reference", "blocked", "polynomial"),
        lengths=(16, 32),
        max_length={"reference": 16},
        memory_limit_bytes=1,
    )
    rows = sweep.run_sweep(config, str(tmp_path), log=lambda _: None)
    status = {(r["implementation"], r["n"]): r["status"] for r in rows}
    assert status[("reference", 32)] == "skipped"
    assert status[("blocked", 16)] == "oom"  # compiled memory above the limit: not run
    assert status[("blocked", 32)] == "timeout"  # a shorter length already failed
    assert all(r["median_ms"] is None for r in rows)


def test_time_budget_stops_longer_lengths(tmp_path):
    config = _config(implementations=("blocked",), lengths=(16, 32), time_budget_s=1e-9)
    rows = sweep.run_sweep(config, str(tmp_path), log=lambda _: None)
    assert [r["status"] for r in rows] == ["ok", "timeout"]


def test_gradient_point_with_error_against_exact():
    polys = [p for p in sweep.points_of(_config()) if p["implementation"] == "polynomial"]
    point = dict(polys[0], n=16, **{"pass": "fwd+grad"})
    row = sweep.measure(point, repeats=1, memory_limit=1 << 40, error_max_length=16)
    assert row["status"] == "ok", row
    assert 0 < row["relative_error"] < 0.1
    assert np.isfinite(row["median_ms"])


# ----------------------------------------------------------------------------------------------
# Issue 12, item 10: config normalisation and validation, retries, a safe workdir.


def _raw(**overrides):
    """`_config()` as a plain dict with `overrides` taken as they are (no ConfigDict casts)."""
    return {**_config(), **overrides}


def _fake_measure(monkeypatch, status_of=lambda point: "ok"):
    """Replaces `sweep.measure` (no compilation); returns the list of measured points."""
    calls = []

    def measure(point, *, repeats, memory_limit, error_max_length=0, budget_s=None):
        calls.append((point["implementation"], point["pass"], point["n"]))
        row = dict(point, status=status_of(point), **harness.environment())
        if row["status"] == "ok":
            row.update(median_ms=0.01 * point["n"], wall_s=1e-3, memory_bytes=100 * point["n"])
        else:
            row["reason"] = "RuntimeError: simulated failure"
        return row

    monkeypatch.setattr(sweep, "measure", measure)
    return calls


@pytest.mark.parametrize(
    "value",
    [
        "blocked,polynomial",
        ("blocked,polynomial",),
        ("blocked", " polynomial", "blocked"),
        ["blocked,", "polynomial"],
    ],
)
def test_implementations_accept_a_comma_separated_string(value):
    """`--config.implementations=blocked,polynomial` arrives as ('blocked,polynomial',)."""
    config = sweep.validate_config(_raw(implementations=value))
    assert config["implementations"] == ("blocked", "polynomial")
    assert {p["implementation"] for p in sweep.points_of(_raw(implementations=value))} == {
        "blocked",
        "polynomial",
    }
    assert sweep.validate_config(_raw(passes="fwd,fwd+grad"))["passes"] == ("fwd", "fwd+grad")
    assert sweep.validate_config(_raw(lengths="32,16,16"))["lengths"] == (16, 32)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(implementations=("blocked", "flash")), "implementations"),
        (dict(implementations="blocked,flash"), "implementations"),
        (dict(implementations=""), "implementations"),
        (dict(lengths=(0,)), "lengths"),
        (dict(lengths=(16, -32)), "lengths"),
        (dict(lengths=()), "lengths"),
        (dict(lengths=(16.0,)), "lengths"),
        (dict(dtype="float8"), "dtype"),
        (dict(passes=("fwd,bwd",)), "passes"),
        (dict(window=(0, 2)), "window"),
        (dict(window=(2,)), "window"),
        (dict(causal="yes"), "causal"),
        (dict(batch=0), "batch"),
        (dict(kv_heads=3, heads=2), "kv_heads"),
        (dict(head_dim="8"), "head_dim"),
        (dict(entry_bound=float("inf")), "entry_bound"),
        (dict(time_budget_s=0.0), "time_budget_s"),
        (dict(repeats=0), "repeats"),
        (dict(memory_limit_bytes=-1), "memory_limit_bytes"),
        (dict(fit_points=1), "fit_points"),
        (dict(error_max_length=None), "error_max_length"),
        (dict(max_length={"flash": 64}), "max_length.flash"),
        (dict(max_length={"reference": 0}), "max_length.reference"),
        (dict(polynomial={"degree": -1}), "polynomial.degree"),
        (dict(polynomial={"degree": 2, "gradient": "exact"}), "polynomial.gradient"),
        (dict(polynomial={"degree": None, "tolerance": 1e-2, "bound": 1.0}), "polynomial.degree"),
        (dict(lenghts=(16,)), "lenghts"),
    ],
)
def test_bad_sweep_config_is_refused_before_anything_runs(tmp_path, overrides, field):
    workdir = tmp_path / "sweep"
    with pytest.raises(sweep.SweepConfigError, match="^" + field.replace(".", r"\.")):
        sweep.run_sweep(_raw(**overrides), str(workdir), log=lambda _: None)
    assert not workdir.exists()


def test_missing_field_is_named():
    config = _raw()
    del config["repeats"]
    with pytest.raises(sweep.SweepConfigError, match="^repeats: required"):
        sweep.validate_config(config)


def test_error_rows_are_retried_final_rows_kept(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    config = _raw(implementations="blocked,polynomial", lengths=(16, 24))
    _fake_measure(monkeypatch, lambda p: "error" if p["implementation"] == "blocked" else "ok")
    rows = sweep.run_sweep(config, workdir, log=lambda _: None)
    assert [r["status"] for r in rows] == ["error", "error", "ok", "ok"]
    # A row without a status (an older writer) is not a finished point, and does not crash.
    lines = _lines(workdir)
    del lines[2]["status"]
    with open(os.path.join(workdir, "sweep.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    calls = _fake_measure(monkeypatch)  # the environment is fixed
    rows = sweep.run_sweep(config, workdir, log=lambda _: None)
    assert sorted(calls) == [
        ("blocked", "fwd", 16),
        ("blocked", "fwd", 24),
        ("polynomial", "fwd", 16),
    ]
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert rows[0]["previous_status"] == "error"
    assert len(_lines(workdir)) == 4 + 3  # append-only; the newest row of a point wins
    calls.clear()
    again = sweep.run_sweep(config, workdir, log=lambda _: None)
    assert calls == [] and again == rows  # ok rows are final
    table = open(os.path.join(workdir, "sweep.md")).read()
    assert "| error |" not in table


def test_oom_and_timeout_rows_are_final_skipped_rows_redecided(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    calls = _fake_measure(monkeypatch, lambda p: "oom")
    config = _raw(implementations="blocked", lengths=(16, 24, 32), max_length={"blocked": 16})
    rows = sweep.run_sweep(config, workdir, log=lambda _: None)
    assert [r["status"] for r in rows] == ["oom", "skipped", "skipped"]
    calls = _fake_measure(monkeypatch)
    sweep.run_sweep(config, workdir, log=lambda _: None)
    assert calls == [] and len(_lines(workdir)) == 3  # nothing new: oom final, still skipped
    rows = sweep.run_sweep(dict(config, max_length={}), workdir, log=lambda _: None)
    assert [r["status"] for r in rows] == ["oom", "timeout", "timeout"]  # 16 ran out of memory
    assert calls == []
    sweep.run_sweep(dict(config, max_length={}), workdir, log=lambda _: None)
    assert len(_lines(workdir)) == 5  # timeout rows are final too


def test_torn_last_line_is_reported_and_cut_bad_middle_line_refused(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    path = os.path.join(workdir, "sweep.jsonl")
    _fake_measure(monkeypatch)
    config = _raw(implementations="blocked", lengths=(16, 24))
    sweep.run_sweep(config, workdir, log=lambda _: None)
    with open(path, "a") as f:
        f.write('{"implementation": "blocked", "n": 3')  # a kill mid-append
    messages = []
    rows = sweep.run_sweep(dict(config, lengths=(16, 24, 32)), workdir, log=messages.append)
    assert any("torn" in m for m in messages)
    assert [r["n"] for r in rows] == [16, 24, 32]
    assert [r["n"] for r in _lines(workdir)] == [16, 24, 32]  # cut, then appended cleanly
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write("not json\n" + text)
    with pytest.raises(sweep.workdir_files.CorruptFileError, match="line 1"):
        sweep.run_sweep(config, workdir, log=lambda _: None)


def test_one_sweep_per_workdir(tmp_path, monkeypatch):
    calls = _fake_measure(monkeypatch)
    with sweep.workdir_files.lock(str(tmp_path)):
        with pytest.raises(sweep.workdir_files.WorkdirLockedError, match="in use"):
            sweep.run_sweep(_raw(), str(tmp_path), log=lambda _: None)
    assert calls == [] and not os.path.exists(tmp_path / "sweep.jsonl")
    sweep.run_sweep(_raw(), str(tmp_path), log=lambda _: None)  # released


def test_plot_and_table_are_replaced_atomically(tmp_path, monkeypatch):
    import matplotlib.figure

    workdir = str(tmp_path)
    _fake_measure(monkeypatch)
    rows = sweep.run_sweep(_raw(), workdir, log=lambda _: None)
    before = open(os.path.join(workdir, "sweep.png"), "rb").read()

    def dying_savefig(self, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a png")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dying_savefig)
    with pytest.raises(KeyboardInterrupt):
        sweep.plot_sweep(rows, sweep.series_slopes(rows), os.path.join(workdir, "sweep.png"))
    assert open(os.path.join(workdir, "sweep.png"), "rb").read() == before
    assert sorted(os.listdir(workdir)) == [".lock", "sweep.jsonl", "sweep.md", "sweep.png"]


def test_module_is_callable_without_its_main(tmp_path, monkeypatch):
    from absl import app

    with pytest.raises(app.UsageError, match="define_flags"):
        sweep.main(["sweep"])
    _fake_measure(monkeypatch)
    out = []
    rows = sweep.run_command(_raw(implementations="blocked"), str(tmp_path), out=out.append)
    assert len(rows) == 3 and "| blocked | fwd | 16 | ok |" in out[-1]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--config=configs/sweep.py:smoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_command_line_comma_separated_implementations(tmp_path):
    """Also: any implementation's `max_length` can be set by name (the config has them all)."""
    out = _cli(
        f"--workdir={tmp_path}",
        "--config.implementations=blocked,polynomial",
        "--config.lengths=16,32",
        "--config.max_length.blocked=16",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert {(r["implementation"], r["n"], r["status"]) for r in _lines(tmp_path)} == {
        ("blocked", 16, "ok"),
        ("blocked", 32, "skipped"),
        ("polynomial", 16, "ok"),
        ("polynomial", 32, "ok"),
    }


@pytest.mark.parametrize(
    "arg,field",
    [
        ("--config.implementations=blocked,flash", "implementations"),
        ("--config.lengths=0", "lengths"),
    ],
)
def test_command_line_bad_config_exits_nonzero(tmp_path, arg, field):
    out = _cli(f"--workdir={tmp_path / 'sweep'}", arg)
    assert out.returncode != 0
    assert f"invalid sweep config: {field}" in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "sweep").exists()


# ----------------------------------------------------------------------------------------------
# Audit defects: failed steps, other devices' rows, series keys, the time budget, unsupported
# implementations.


def _reproduce(tmp_path, *args, python=None, env=None, script=None):
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "CLAIMS", "FORCE")}
    environ.update(OUT=str(tmp_path / "out"), **(env or {}))
    if python is not None:
        environ["PYTHON"] = python
    return subprocess.run(
        ["bash", script or os.path.join(ROOT, "scripts", "reproduce.sh"), *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )


def _fake_python(path, rc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "$@" >> "{path}.calls"\nexit {rc}\n')
    path.chmod(0o755)
    return str(path)


def test_reproduce_failed_step_is_not_marked_done(tmp_path):
    failing = _fake_python(tmp_path / "bin" / "python", 3)
    out = _reproduce(tmp_path, "--smoke", "--step=sweep,claim1-forward", python=failing)
    assert out.returncode == 3
    assert "step sweep FAILED" in out.stderr
    assert not (tmp_path / "out" / ".steps" / "sweep.done").exists()
    assert len(open(failing + ".calls").readlines()) == 1  # stopped at the failed step
    ok = _fake_python(tmp_path / "bin2" / "python", 0)
    out = _reproduce(tmp_path, "--smoke", "--step=sweep", python=ok)
    assert out.returncode == 0 and (tmp_path / "out" / ".steps" / "sweep.done").exists()


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--step=sweep,claim9"], {}, "unknown step 'claim9'; steps: sweep claim1-forward"),
        ([], {"CLAIMS": "forward,bogus"}, "unknown claim 'bogus'; choose from forward,"),
    ],
)
def test_reproduce_refuses_unknown_steps_and_claims(tmp_path, args, env, message):
    python = _fake_python(tmp_path / "bin" / "python", 0)
    out = _reproduce(tmp_path, "--smoke", *args, python=python, env=env)
    assert out.returncode == 2 and message in out.stderr
    assert not (tmp_path / "out").exists() and not os.path.exists(python + ".calls")


def test_reproduce_defaults_to_the_venv_python(tmp_path):
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "reproduce.sh"
    script.write_text(open(os.path.join(ROOT, "scripts", "reproduce.sh")).read())
    venv = _fake_python(tmp_path / ".venv" / "bin" / "python", 0)
    out = _reproduce(tmp_path, "--smoke", "--step=sweep", script=str(script))
    assert out.returncode == 0, out.stderr
    assert "experiments.sweep" in open(venv + ".calls").read()


def test_reproduce_writes_to_this_machines_folder_by_default(tmp_path):
    """Without OUT the output folder is runs/reproduce_PRESET (not in git), not the committed
    results/ folder, whose finished step markers would skip every step."""
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "reproduce.sh"
    script.write_text(open(os.path.join(ROOT, "scripts", "reproduce.sh")).read())
    (tmp_path / "results" / "cpu" / ".steps").mkdir(parents=True)
    (tmp_path / "results" / "cpu" / ".steps" / "sweep.done").touch()
    python = _fake_python(tmp_path / "bin" / "python", 0)
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "FORCE", "CLAIMS")}
    out = subprocess.run(
        ["bash", str(script), "--step=sweep"], capture_output=True, text=True, timeout=60,
        env=dict(env, PYTHON=python),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--workdir=runs/reproduce_cpu/sweep" in open(python + ".calls").read()
    assert (tmp_path / "runs" / "reproduce_cpu" / ".steps" / "sweep.done").exists()


def test_command_exits_nonzero_when_a_point_ended_in_error(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    config = _raw(implementations="blocked,polynomial", lengths=(16,))
    _fake_measure(monkeypatch, lambda p: "error" if p["implementation"] == "blocked" else "ok")
    monkeypatch.setattr(sweep, "_CONFIG", SimpleNamespace(value=config))
    monkeypatch.setattr(sweep, "_WORKDIR", SimpleNamespace(value=str(tmp_path)))
    with pytest.raises(SystemExit, match="1 point.* ended in error.*blocked fwd n=16"):
        sweep.main(["sweep"])
    assert len(_lines(tmp_path)) == 2 and (tmp_path / "sweep.md").exists()  # all written first
    assert "simulated failure" in capsys.readouterr().out  # the failed point's printed reason
    _fake_measure(monkeypatch, lambda p: "oom")  # oom, timeout, skipped are results
    sweep.main(["sweep"])


def test_rows_of_another_device_are_set_aside_not_reused(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    config = _raw(implementations="blocked", lengths=(16, 24))
    _fake_measure(monkeypatch)
    sweep.run_sweep(config, workdir, log=lambda _: None)
    lines = [dict(r, device_kind="NVIDIA H100 80GB HBM3", median_ms=9.0) for r in _lines(workdir)]
    lines[1]["jax_version"] = "0.0.1"
    with open(os.path.join(workdir, "sweep.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    calls, messages = _fake_measure(monkeypatch), []
    rows = sweep.run_sweep(config, workdir, log=messages.append)
    assert len(calls) == 2  # measured again here
    assert sum("set aside 2 rows" in m for m in messages) == 1
    here = harness.environment()["device_kind"]
    assert [r["device_kind"] for r in rows] == [here] * 2 and rows[0]["median_ms"] != 9.0
    assert len(_lines(workdir)) == 4  # the H100 rows are kept
    assert "H100" not in open(os.path.join(workdir, "sweep.md")).read()
    assert sweep.devices(rows) == here
    both = list(sweep.read_rows(os.path.join(workdir, "sweep.jsonl")))
    keys = list(sweep.series_rows(both))  # a series per device and JAX version, each labelled
    assert len(keys) == 3 and all(any(p.startswith("device_kind=") for p in k) for k in keys)


def _series(degree, slope, device="cpu", **fields):
    return [
        dict(
            harness.make_point("polynomial", n, options={"degree": degree}, **fields),
            status="ok",
            median_ms=float(n) ** slope,
            device_kind=device,
        )
        for n in (64, 128, 256)
    ]


def _plot_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "plot_sweep", os.path.join(ROOT, "scripts", "plot_sweep.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_series_are_keyed_by_the_measured_function(tmp_path, capsys):
    rows = _series(2, 1.0) + _series(3, 2.0) + _series(2, 3.0, head_dim=32)
    slopes = sweep.series_slopes(rows)
    assert {k: round(s["time_slope"], 6) for k, s in slopes.items()} == {
        ("polynomial", "fwd", "degree=2", "head_dim=16", "value_dim=16"): 1.0,
        ("polynomial", "fwd", "degree=3", "head_dim=16", "value_dim=16"): 2.0,
        ("polynomial", "fwd", "degree=2", "head_dim=32", "value_dim=32"): 3.0,
    }
    assert list(sweep.series_slopes(_series(2, 1.0))) == [("polynomial", "fwd")]  # one config
    with open(tmp_path / "sweep.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in _series(2, 1.0) + _series(3, 2.0))
    _plot_script().main([str(tmp_path), "--fit_points=2"])
    assert "polynomial fwd degree=3: time slope 2.00" in capsys.readouterr().out
    table = open(tmp_path / "sweep.md").read()
    assert "| polynomial | fwd | degree=2 | 1 |" in table and "| degree=3 | 2 |" in table


@pytest.mark.parametrize("args,message", [(["--fit_points=1"], ">= 2"), ([], "no ")])
def test_plot_script_refuses_bad_arguments(tmp_path, capsys, args, message):
    workdir = tmp_path / ("empty" if not args else "")
    if args:
        (tmp_path / "sweep.jsonl").write_text(json.dumps(_series(2, 1.0)[0]) + "\n")
    with pytest.raises(SystemExit) as e:
        _plot_script().main([str(workdir), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_progress_line_and_over_budget_point(tmp_path, monkeypatch):
    budgets = []

    def measure(point, *, repeats, memory_limit, error_max_length=0, budget_s=None):
        budgets.append(budget_s)
        return dict(point, status="ok", median_ms=100.0, wall_s=2.35)

    monkeypatch.setattr(sweep, "measure", measure)
    messages = []
    config = _raw(implementations="blocked", lengths=(16, 24), time_budget_s=0.5)
    rows = sweep.run_sweep(config, str(tmp_path), log=messages.append)
    assert budgets == [0.5]  # timed runs cut to the budget
    assert "n=16      running" in messages[0]
    assert rows[0]["status"] == "ok" and rows[0]["median_ms"] == 100.0
    assert "took 2.35 s > time_budget_s 0.5" in rows[0]["reason"] in messages[1]
    assert rows[1]["status"] == "timeout"
    assert rows[1]["reason"] == "n=16 took 2.35 s > time_budget_s 0.5"
    assert rows[1]["reason"] in messages[2]


@pytest.mark.skipif(sweep.jax.default_backend() != "cpu", reason="pallas runs on a GPU")
def test_implementation_unsupported_on_this_backend_is_refused(tmp_path):
    workdir = tmp_path / "sweep"
    with pytest.raises(sweep.SweepConfigError, match="^implementations: .*'pallas'.*GPU"):
        sweep.run_sweep(_raw(implementations="blocked,pallas"), str(workdir))
    assert not workdir.exists()
    sweep.check_supported(_raw(implementations="blocked,exact,polynomial"))  # these run here
