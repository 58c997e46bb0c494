"""The sequence-length sweep (experiments/sweep.py): rows, statuses, resume, plot, config."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs import sweep as sweep_config
from experiments import benchlib, sweep


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


def test_allowed_tuples_and_flops():
    assert benchlib.allowed_tuples(4, False, None) == 64
    assert benchlib.allowed_tuples(3, True, None) == 1 + 4 + 9
    assert benchlib.allowed_tuples(3, True, (1, 2)) == 1 + 2 + 2
    point = dict(sweep.points_of(_config())[0], implementation="blocked", n=8)
    assert sweep.analytic_flops(point) == 4.0 * 8**3 * 8


def test_sweep_writes_rows_plot_table_and_resumes(tmp_path):
    workdir = str(tmp_path)
    rows = sweep.run_sweep(_config(), workdir, log=lambda _: None)
    assert len(rows) == 9
    for r in rows:
        assert {"implementation", "n", "pass", "time_ms", "status", "platform"} <= set(r)
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0 and r["compile_s"] > 0 and r["flops"] > 0
    poly = [r for r in rows if r["implementation"] == "polynomial"]
    assert all(r["rank"] == 45 for r in poly)  # C(8 + 2, 2)
    errors = [r["relative_error"] for r in poly if "relative_error" in r]
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
    assert all(r["time_ms"] is None for r in rows)


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
    assert np.isfinite(row["time_ms"])
