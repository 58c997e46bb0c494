r"""Sequence-length sweep: time, compiled memory and achieved rate of each implementation.

    python -m experiments.sweep --config=configs/sweep.py:smoke --workdir=/tmp/sweep_smoke
    python -m experiments.sweep --config=configs/sweep.py:preset=gpu --workdir=DIR \
        --config.dtype=bfloat16 --config.implementations=blocked,polynomial

The whole config is checked before any point runs (`validate_config`: a bad field exits
non-zero naming it; `check_supported`: an implementation the kernel refuses on this backend,
`tensorattn.Unsupported` while tracing its shortest point, exits naming it and why); list
fields take a tuple or a comma-separated string. Implementation "exact" is
`implementation=None`: the library's fastest exact kernel on the device (pallas on a GPU).
Writes one JSON line per (implementation, pass, n) to `DIR/sweep.jsonl`, in the row schema of
`experiments.harness` (`n`, `pass`, `median_ms`, `tflops`, `rank`, `device_kind`,
`jax_version`, ...), with its status: "ok", "oom", "timeout", "skipped" or "error" (failures
do not stop the sweep; each point prints a line when it starts and one with its status and
reason when it ends). The time budget: a point predicted (from the shorter lengths of its
series) to take longer than `time_budget_s` is "timeout" without running, and so is every
longer length once a point of the series was "oom"/"timeout" or took longer than the budget;
a point that ran keeps its "ok" and its numbers even when it took longer (a run cannot be
stopped midway; its `reason` says so), and its timed runs are cut to fit the budget.

On a re-run, "ok", "oom" and "timeout" rows are final (delete them, or use another DIR, to
measure them again); "error" rows (and rows without a known status) are measured again, since
the failure may have been the environment; "skipped" rows are decided again from the current
`max_length`. Rows of another `device_kind` or `jax_version` are set aside (kept in the file,
counted in a printed note, never reused nor shown: this machine measures its own). The newest
row of a point supersedes older ones. Then draws `DIR/sweep.png` (log-log time and memory vs
n, fitted slope per series: everything that identifies the measured function but n) and
`DIR/sweep.md`. The command exits non-zero, after the rows and table, when a point ended in
"error". One sweep per DIR at a time (a second exits naming the first); a torn last line of
sweep.jsonl (a kill mid-append) is reported and cut off; the plot and table are replaced
atomically. The same command runs on CPU, GPU and TPU (jax picks the default backend); TPU
runs are untested by the author (pallas there: a call over its VMEM budget is "oom").
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

import tensorattn
from experiments import benchlib, harness
from tensorattn import workdir as workdir_files
from tensorattn.kernels import cost
from tensorattn.kernels.configs import PolynomialConfig

IMPLEMENTATIONS = harness.IMPLEMENTATIONS
EXACT = harness.EXACT
PASSES = harness.PASSES
DTYPES = harness.DTYPES
# Statuses a re-run keeps; "error" and unknown statuses are retried, "skipped" re-decided.
FINAL = ("ok", "oom", "timeout")
# What identifies a point in sweep.jsonl.
IDENTITY = harness.POINT_FIELDS
MAX_RANK = 1 << 20  # largest feature rank the polynomial kernel takes


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
    "value_dim": None,
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


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


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
        if not _is_int(part) or part < 1:
            raise SweepConfigError(f"lengths: every length must be a positive int, got {part!r}")
        lengths.append(int(part))
    if not lengths:
        raise SweepConfigError("lengths: empty")
    return tuple(sorted(set(lengths)))


def _int(field: str, value, low: int) -> int:
    if not _is_int(value) or value < low:
        raise SweepConfigError(f"{field}: must be an int >= {low}, got {value!r}")
    return int(value)


def _positive(field: str, value) -> float:
    if not (_is_real(value) and 0 < value < math.inf):
        raise SweepConfigError(f"{field}: must be a positive finite number, got {value!r}")
    return float(value)


def validate_config(config: Mapping[str, Any]) -> dict:
    """The normalised sweep config (a new dict), or SweepConfigError naming the bad field.

    Allowed: implementations: names from IMPLEMENTATIONS (tuple or "a,b"; duplicates dropped);
    lengths: positive ints (tuple or "128,256"); passes: "fwd" and/or "fwd+grad"; batch, heads,
    kv_heads, head_dim, repeats: positive ints, kv_heads dividing heads; dtype: float32,
    bfloat16 or float16; causal: a bool; window: None or a pair of positive ints (implies a
    causal mask); entry_bound, time_budget_s: positive finite numbers; polynomial: options of
    implementation="polynomial" (`PolynomialConfig` fields) with an int `degree` whose feature
    rank is at most MAX_RANK; value_dim: None (= head_dim) or a positive int;
    memory_limit_bytes, error_max_length: ints >= 0; max_length: {implementation: positive
    int or None (no limit)}; fit_points: an int >= 2.
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
            ok = all(_is_int(w) and w >= 1 for w in window)
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
        if not _is_int(polynomial.get("degree")):
            raise SweepConfigError(
                f"polynomial.degree: the sweep needs an int degree (rank and FLOPs), got "
                f"{polynomial.get('degree')!r}"
            )
        try:
            PolynomialConfig.from_mapping(polynomial, prefix="polynomial")
        except ValueError as e:
            field = re.search(r"(?:PolynomialConfig|polynomial)\.(\w+)", str(e))
            where = f"polynomial.{field.group(1)}" if field else "polynomial"
            raise SweepConfigError(f"{where}: {e}") from e
        rank = cost.feature_rank(out["head_dim"], polynomial["degree"])
        if rank > MAX_RANK:
            raise SweepConfigError(
                f"polynomial.degree: feature rank C(head_dim + degree, degree) = {rank} "
                f"exceeds {MAX_RANK}"
            )
    out["polynomial"] = dict(polynomial)
    value_dim = c["value_dim"]
    out["value_dim"] = out["head_dim"] if value_dim is None else _int("value_dim", value_dim, 1)
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
        if n is not None:
            _int(f"max_length.{impl}", n, 1)
    out["max_length"] = {impl: n for impl, n in max_length.items() if n is not None}
    return out


# ----------------------------------------------------------------------------------------------
# One point (experiments.harness).


def measure(
    point: dict,
    *,
    repeats: int,
    memory_limit: int,
    error_max_length: int = 0,
    budget_s: float | None = None,
) -> dict:
    """`harness.measure` of one point (fewer timed runs when the warm-up says `repeats` would
    exceed `budget_s`); non-exact points at `n <= error_max_length` also get their
    `relative_error` against blocked (never raises)."""
    check = point["implementation"] not in EXACT and point["n"] <= error_max_length
    return harness.measure(
        point,
        repeats=repeats,
        memory_limit=memory_limit,
        budget_s=budget_s,
        error_against="blocked" if check else None,
    )


# ----------------------------------------------------------------------------------------------
# The sweep.


def points_of(config: Mapping[str, Any]) -> list[dict]:
    """Every (pass, implementation, n) point of a sweep config, shortest lengths first."""
    config = validate_config(config)
    base = {
        k: config[k]
        for k in ("batch", "heads", "kv_heads", "head_dim", "value_dim", "dtype", "causal")
    }
    base.update(window=config["window"], entry_bound=config["entry_bound"])
    points = []
    for pass_ in config["passes"]:
        for impl in config["implementations"]:
            options = dict(config["polynomial"]) if impl == "polynomial" else {}
            for n in config["lengths"]:
                points.append(
                    harness.make_point(impl, n, options=options, **base, **{"pass": pass_})
                )
    return points


def identity(row: Mapping[str, Any]) -> str:
    return json.dumps([row.get(k) for k in IDENTITY], sort_keys=True)


def read_rows(path: str) -> list[dict]:
    """Every row of a sweep.jsonl, oldest first ([] if absent); a torn last line is dropped
    (and reported); any other bad line raises `tensorattn.workdir.CorruptFileError`."""
    return [harness.upgrade_row(r) for r in workdir_files.read_jsonl(path)]


def latest_rows(rows: list[dict], per_environment: bool = False) -> dict[str, dict]:
    """identity -> the newest row of each point (a retried point supersedes its old row); with
    `per_environment`, the newest of each point on each device kind and JAX version."""
    env = ("device_kind", "jax_version") if per_environment else ()
    return {identity(r) + "".join(f"|{r.get(k)}" for k in env): r for r in rows}


def _predicted_seconds(done: list[dict], n: int, repeats: int) -> float | None:
    """Wall time of a point at length n extrapolated from the series' completed points."""
    ok = sorted((r for r in done if r.get("status") == "ok" and r["n"] < n), key=lambda r: r["n"])
    if not ok:
        return None
    last = ok[-1]
    slope = 3.0 if last["implementation"] in EXACT else 1.0
    if len(ok) >= 2:
        slope = max(slope, fit_slope([r["n"] for r in ok[-2:]], [r["median_ms"] for r in ok[-2:]]))
    return (last["median_ms"] / 1e3) * (n / last["n"]) ** slope * (repeats + 2)


def _flush_print(message: str) -> None:
    print(message, flush=True)


def _unsupported(error: BaseException | None) -> BaseException | None:
    """The `tensorattn.Unsupported` behind `error` (itself or a cause), or None."""
    while error is not None:
        if isinstance(error, tensorattn.Unsupported):
            return error
        error = error.__cause__
    return None


@functools.lru_cache(maxsize=256)
def _why_unsupported(point_json: str) -> str | None:
    """Why the kernel refuses a point on this backend (`Unsupported` while tracing it with
    `jax.eval_shape`, no compilation), or None; other errors are left to the measurement."""
    point = json.loads(point_json)
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in harness.make_inputs(point)]
    try:
        jax.eval_shape(harness.make_fn(point), *shapes)
    except Exception as e:  # only Unsupported refuses the implementation
        why = _unsupported(e)
        return None if why is None else str(why)
    return None


def check_supported(config: Mapping[str, Any]) -> None:
    """SweepConfigError naming each implementation the kernel refuses on this backend
    (`tensorattn.Unsupported` at the shortest length of each pass), before any work."""
    config = validate_config(config)
    shortest = config["lengths"][0]
    refused = []
    for point in points_of(config):
        if point["n"] != shortest or point["implementation"] in [i for i, _ in refused]:
            continue
        why = _why_unsupported(json.dumps(point, sort_keys=True))
        if why is not None:
            refused.append((point["implementation"], f"{point['pass']} n={shortest}: {why}"))
    if refused:
        backend = jax.default_backend()
        raise SweepConfigError(
            f"implementations: cannot run on this backend ({backend}); remove "
            + "; ".join(f"{impl!r} ({why})" for impl, why in refused)
        )


def same_environment(row: Mapping[str, Any], env: Mapping[str, Any]) -> bool:
    """Whether a row was measured on this device kind and JAX version (a field the row does
    not record is taken to match)."""
    return all(row.get(k) in (None, env[k]) for k in ("device_kind", "jax_version"))


def run_sweep(config: Mapping[str, Any], workdir: str, log=_flush_print) -> list[dict]:
    """Runs (or resumes) a sweep in `workdir`; returns the newest row of each of its points.

    Raises SweepConfigError (before anything runs: a bad field, or an implementation the
    kernel refuses on this backend), `tensorattn.workdir.WorkdirLockedError` when another
    process holds `workdir`, and `CorruptFileError` for a bad line of sweep.jsonl that is not
    its last.
    """
    config = validate_config(config)
    check_supported(config)
    workdir = workdir_files.make_workdir(workdir)
    with workdir_files.lock(workdir):
        return _run_locked(config, workdir, log)


def _load(path: str, env: Mapping[str, Any], log) -> dict[str, dict]:
    """The newest row of each point measured in `env` (a torn last line cut off; rows of
    another device or JAX version set aside, kept in the file, and counted in a note)."""
    rows = read_rows(path)
    size = os.path.getsize(path) if os.path.exists(path) else 0
    workdir_files.repair_jsonl(path)
    if os.path.exists(path) and os.path.getsize(path) < size:
        log(f"{path}: cut off a torn last line (a kill mid-append); that point runs again")
    mine = [r for r in rows if same_environment(r, env)]
    if len(mine) < len(rows):
        log(
            f"{path}: set aside {len(rows) - len(mine)} rows of another device or JAX version "
            f"(kept in the file; this {env['device_kind']}, jax {env['jax_version']} measures "
            "its own)"
        )
    return latest_rows(mine)


def _over_budget(series: list[dict], budget: float) -> str | None:
    """Why a series stops: its shortest point that ran out of time or memory, or None."""
    for r in sorted(series, key=lambda r: r["n"]):
        if r.get("status") in ("timeout", "oom"):
            return f"n={r['n']} is {r['status']}"
        if (r.get("wall_s") or 0) > budget:
            return f"n={r['n']} took {r['wall_s']:.3g} s > time_budget_s {budget:g}"
    return None


def _decide(point: dict, latest: dict[str, dict], config: dict) -> dict | None:
    """The row of a point that is not measured ("skipped" or "timeout"), else None."""
    budget = config["time_budget_s"]
    if point["n"] > config["max_length"].get(point["implementation"], math.inf):
        return dict(harness.new_row(point), status="skipped", reason="above max_length")
    series = [
        r
        for r in latest.values()
        if all(r.get(k) == point[k] for k in IDENTITY if k != "n")
        and isinstance(r.get("n"), int)
        and r["n"] < point["n"]
    ]
    why = _over_budget(series, budget)
    predicted = _predicted_seconds(series, point["n"], config["repeats"])
    if why is None and predicted is not None and predicted > budget:
        why = f"predicted {predicted:.3g} s > time_budget_s {budget:g}"
    if why is None:
        return None
    return dict(harness.new_row(point), status="timeout", predicted_s=predicted, reason=why)


def _measure(point: dict, config: dict, limit: int) -> dict:
    """`measure` of a point; an "ok" row whose timed runs took longer than the budget says so
    in its `reason` (its numbers are kept; the longer lengths become "timeout")."""
    budget = config["time_budget_s"]
    row = measure(
        point,
        repeats=config["repeats"],
        memory_limit=limit,
        error_max_length=config["error_max_length"],
        budget_s=budget,
    )
    if row.get("status") == "ok" and (row.get("wall_s") or 0) > budget:
        row["reason"] = (
            f"took {row['wall_s']:.3g} s > time_budget_s {budget:g}: longer lengths not run"
        )
    return row


def _describe(row: dict) -> str:
    """The printed line of a finished point: status, time, rank, error, and its reason."""
    err, rank, ms = row.get("relative_error"), row.get("rank"), row.get("median_ms")
    return (
        f"{row['implementation']:>10} {row['pass']:<8} n={row['n']:<7} {row['status']:<7} "
        + (f"{ms:10.2f} ms" if ms is not None else " " * 13)
        + (f"  rank {rank}" if rank is not None else "")
        + (f"  err {err:.2e}" if err is not None else "")
        + (f"  ({row['reason']})" if row.get("reason") else "")
    )


def _run_locked(config: dict, workdir: str, log) -> list[dict]:
    path = os.path.join(workdir, "sweep.jsonl")
    latest = _load(path, harness.environment(), log)
    limit = harness.device_memory_limit(config["memory_limit_bytes"])
    points = points_of(config)
    for point in points:
        key = identity(point)
        old = latest.get(key, {})
        above = point["n"] > config["max_length"].get(point["implementation"], math.inf)
        if old.get("status") in FINAL or (old.get("status") == "skipped" and above):
            continue
        row = _decide(point, latest, config)
        if row is None:
            log(f"{point['implementation']:>10} {point['pass']:<8} n={point['n']:<7} running...")
            row = _measure(point, config, limit)
        row.setdefault("median_ms", None)
        if old.get("status") is not None:
            row["previous_status"] = old["status"]
        workdir_files.append_jsonl(path, row)
        latest[key] = row
        log(_describe(row))
    rows = [latest[identity(p)] for p in points]
    slopes = series_slopes(rows, config["fit_points"])
    plot_sweep(rows, slopes, os.path.join(workdir, "sweep.png"))
    write_table(rows, slopes, os.path.join(workdir, "sweep.md"))
    return rows


# ----------------------------------------------------------------------------------------------
# Slopes, plot, table.


fit_slope = harness.fit_slope

# What identifies a series (the measured function): a point without its length, and where.
SERIES_FIELDS = tuple(k for k in IDENTITY if k != "n") + ("device_kind", "jax_version")


def _series_fields(row: Mapping[str, Any]) -> dict:
    """The `SERIES_FIELDS` of a row, its options flattened (`degree`, ...; `options.NAME` for
    an option named like a point field)."""
    fields = {k: row.get(k) for k in SERIES_FIELDS if k != "options"}
    for name, value in (row.get("options") or {}).items():
        fields[f"options.{name}" if name in SERIES_FIELDS else name] = value
    return fields


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _varying(series: list[dict], names) -> set[str]:
    """The names among `names` whose value differs between some of `series`."""
    return {k for k in names if len({json.dumps(f.get(k), default=str) for f in series}) > 1}


def series_rows(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by series (`SERIES_FIELDS`), sorted by n. A key is (implementation, pass)
    followed by "field=value" for each field that differs between the series sharing that
    implementation and pass (e.g. ("polynomial", "fwd", "degree=2")), and the device and JAX
    version when the rows hold several: readable, and distinct."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if all(k in r for k in ("implementation", "pass", "n")):
            key = json.dumps(sorted(_series_fields(r).items()), default=str)
            groups.setdefault(key, []).append(r)
    by_pass: dict[tuple, list[dict]] = {}
    for members in groups.values():
        by_pass.setdefault((members[0]["implementation"], members[0]["pass"]), []).append(
            _series_fields(members[0])
        )
    every = [f for peers in by_pass.values() for f in peers]
    where = _varying(every, ("device_kind", "jax_version"))  # named in every label
    out = {}
    for members in groups.values():
        fields, first = _series_fields(members[0]), members[0]
        peers = by_pass[(first["implementation"], first["pass"])]
        varying = sorted(_varying(peers, {k for f in peers for k in f}) | where)
        extra = tuple(f"{k}={_text(fields[k])}" for k in varying if k in fields)
        key = (str(first["implementation"]), str(first["pass"]), *extra)
        out[key] = sorted(members, key=lambda r: r["n"])
    return dict(sorted(out.items()))


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def series_slopes(rows: list[dict], fit_points: int = 3) -> dict[tuple, dict]:
    """Series key (`series_rows`: (implementation, pass) for a single-config sweep) -> fitted
    time and memory slopes over its last `fit_points` completed lengths."""
    out = {}
    for key, members in series_rows(rows).items():
        ok = _ok(members)[-fit_points:]
        mem = [r for r in ok if r.get("memory_bytes")]
        out[key] = {
            "time_slope": fit_slope([r["n"] for r in ok], [r["median_ms"] for r in ok]),
            "memory_slope": fit_slope([r["n"] for r in mem], [r["memory_bytes"] for r in mem]),
            "fit_lengths": [r["n"] for r in ok],
        }
    return out


def series_label(key: tuple) -> str:
    return " ".join(key)


def devices(rows: list[dict]) -> str:
    """The device kinds of the rows, comma-separated."""
    return ", ".join(sorted({str(r["device_kind"]) for r in rows if r.get("device_kind")}))


def plot_sweep(rows: list[dict], slopes: dict, path: str, title: str = "") -> None:
    """Log-log time and compiled memory vs n, one line per series (`series_rows`); replaces
    `path` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = series_rows(rows)
    for key, fit in slopes.items():
        ok = _ok(groups.get(key, []))
        if not ok:
            continue
        label = series_label(key)
        if ok[0].get("rank") is not None:  # the polynomial method's feature rank
            label += f" (g={ok[0]['options'].get('degree')}, rank {ok[0]['rank']})"
        style = "-" if key[1] == "fwd" else "--"
        ns = [r["n"] for r in ok]
        ax_t.loglog(
            ns,
            [r["median_ms"] for r in ok],
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
    fig.suptitle(title or f"tensor attention sweep on {devices(rows)}")
    fig.tight_layout()
    try:
        with workdir_files.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)


def write_table(rows: list[dict], slopes: dict, path: str) -> None:
    """Markdown: one row per point, then the fitted slopes; a "series" column names what
    else tells series of the same implementation and pass apart (when anything does).
    Replaces `path` atomically."""
    cols = [
        "implementation",
        "pass",
        "n",
        "status",
        "median_ms",
        "memory_bytes",
        "tflops",
        "rank",
        "relative_error",
    ]
    groups = series_rows(rows)
    labelled = any(len(key) > 2 for key in groups)
    points = [dict(r, series=" ".join(key[2:])) for key, members in groups.items() for r in members]
    ordered = sorted(
        points, key=lambda r: (str(r["pass"]), str(r["implementation"]), r["series"], r["n"])
    )
    fits = [
        {
            "implementation": key[0],
            "pass": key[1],
            **({"series": " ".join(key[2:])} if labelled else {}),
            "time slope": s["time_slope"],
            "memory slope": s["memory_slope"],
            "fitted on n": s["fit_lengths"],
        }
        for key, s in slopes.items()
    ]
    text = benchlib.markdown_table(ordered, cols + (["series"] if labelled else [])) + "\n"
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


def run_command(config, workdir: str, out=_flush_print) -> list[dict]:
    """What the command line does, callable from Python: checks the config, runs (or resumes)
    the sweep, prints the table. Raises what `run_sweep` raises."""
    config = validate_config(config)
    out(f"device: {harness.environment()}")
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
        rows = run_command(_CONFIG.value, _WORKDIR.value)
    except SweepConfigError as e:
        sys.exit(f"invalid sweep config: {e}")
    except workdir_files.WorkdirLockedError as e:
        sys.exit(f"workdir busy: {e}")
    except workdir_files.WorkdirError as e:
        sys.exit(str(e))
    except workdir_files.CorruptFileError as e:
        sys.exit(f"cannot resume: {e}")
    failed = errors_of(rows)
    if failed:
        sys.exit(failed)


def errors_of(rows: list[dict]) -> str:
    """ "" when no point ended in "error" (oom, timeout and skipped are results), else a line
    naming them (their reasons are in the printed lines and sweep.jsonl)."""
    bad = [r for r in rows if r.get("status") == "error"]
    if not bad:
        return ""
    names = ", ".join(f"{r['implementation']} {r['pass']} n={r['n']}" for r in bad)
    return f"{len(bad)} point(s) ended in error (retried on a re-run): {names}"


if __name__ == "__main__":
    define_flags()
    app.run(main)
