r"""Issue 10's speed targets, checked against the rows of one GPU run.

  python -m experiments.gpu_targets --dir=DIR [--out=DIR/targets.jsonl]

DIR is what `scripts/gpu_checks.sh DIR peers kernels` wrote: `peers_torch.jsonl` (the peers'
Triton kernels), `tensorattn_jax.jsonl` (tensorattn on the same shapes with
`implementation=None`), `mosaic_gpu/tensorattn_jax.jsonl` (with `implementation="mosaic_gpu"`)
and `bench_pallas.jsonl` (full attention at T=4096). For each tensorattn run, each target: the
measured value, the threshold and whether it is met (`-` where the run has no such row). Rates
are fractions of the same run's bf16 matmul rate; speed-up = peer time / tensorattn time on the
same shapes; the backward alone is 2.5x the forward's FLOPs over the time beyond the forward
(docs/math.md §3.4). Then the choices a GPU session makes from the same rows: for each case,
head dim and pass, the fastest configuration timed and how much slower the default (what
`implementation=None` runs) was. Nothing here times anything.
"""

from __future__ import annotations

import argparse
import functools
import os

from experiments import benchlib
from tensorattn import workdir
from tensorattn.kernels.cost import BACKWARD_FACTOR

# The peers' harness's cases (B, T, Hq/Hk, D, windows in issue 10's table) that FBGEMM's
# forward runs (D = 128: not luc_16k_d64, lucidrains' D = 64 case), and tensorattn's
# forward+backward on two.
FORWARD_CASES = (
    "fb_4k_h64", "fb_4k_h128", "fb_16k_h64", "fb_16k_h128",
    "paper_16k_512x32", "paper_16k_512x32_h128",
)  # fmt: skip
PAPER_CASES = ("paper_16k_512x32", "paper_16k_512x32_h128")
# bench_pallas' default-tile backward layouts of each implementation at full attention.
FULL_BACKWARDS = {"pallas": ("default",), "mosaic_gpu": ("default", "mosaic_bwd")}
FBGEMM, LUCIDRAINS = "fbgemm_triton", "lucidrains_triton"
RUNS = {"default": "tensorattn_jax.jsonl", "mosaic_gpu": "mosaic_gpu/tensorattn_jax.jsonl"}


def _last(rows, **fields):
    """The last row with these fields (a run repeated into the same folder: its latest)."""
    found = [r for r in rows if all(r.get(k) == v for k, v in fields.items())]
    return found[-1] if found else None


def _time(rows, case, pass_, impl=None):
    fields = dict(kind="time", case=case, **{"pass": pass_})
    return _last(rows, **fields, **({} if impl is None else {"impl": impl}))


def _matmul(rows):
    row = _last(rows, kind="matmul")
    return row["tflops"] if row else None


def _target(run, name, case, measured, threshold):
    met = None if measured is None else bool(measured >= threshold)
    return dict(run=run, target=name, case=case, measured=measured, threshold=threshold, met=met)


def peer_targets(run: str, ours: list[dict], peers: list[dict]) -> list[dict]:
    """Forward speed-ups over FBGEMM (>= 1.0, >= 1.5 on the paper's cases) and the forward's
    share of the matmul rate on the paper's H=128 case (>= 0.5); forward+backward over
    lucidrains on luc_16k_d64 (>= 3.0) and the backward's share on paper_16k_512x32
    (>= 0.35)."""
    out, mm = [], _matmul(ours)
    for case in FORWARD_CASES:
        peer, mine = _time(peers, case, "fwd", FBGEMM), _time(ours, case, "fwd")
        speedup = peer["ms"] / mine["ms"] if peer and mine else None
        threshold = 1.5 if case in PAPER_CASES else 1.0
        out.append(_target(run, "fwd speed-up over FBGEMM", case, speedup, threshold))
    fwd = _time(ours, "paper_16k_512x32_h128", "fwd")
    share = fwd["tflops"] / mm if fwd and mm else None
    out.append(_target(run, "fwd share of matmul", "paper_16k_512x32_h128", share, 0.5))
    peer = _time(peers, "luc_16k_d64", "fwd+bwd", LUCIDRAINS)
    mine = _time(ours, "luc_16k_d64", "fwd+bwd")
    speedup = peer["ms"] / mine["ms"] if peer and mine else None
    out.append(_target(run, "fwd+bwd speed-up over lucidrains", "luc_16k_d64", speedup, 3.0))
    fwd, both = _time(ours, "paper_16k_512x32", "fwd"), _time(ours, "paper_16k_512x32", "fwd+bwd")
    share = None
    if fwd and both and mm and both["ms"] > fwd["ms"]:
        flops = fwd["tflops"] * 1e12 * fwd["ms"] / 1e3
        share = BACKWARD_FACTOR * flops / ((both["ms"] - fwd["ms"]) / 1e3) / 1e12 / mm
    out.append(_target(run, "bwd share of matmul", "paper_16k_512x32", share, 0.35))
    return out


def full_attention_targets(rows: list[dict]) -> list[dict]:
    """bench_pallas' full attention at T=4096, head dim 128, default tiles: the forward's
    share of the matmul rate (>= 0.5) and the backward's (>= 0.35), per implementation and
    backward layout."""
    out = []
    for impl, layouts in FULL_BACKWARDS.items():
        base = dict(kind="time", case="full4096", head_dim=128, variant="default", status="ok")
        fwd = _last(rows, **base, implementation=impl, **{"pass": "fwd"})
        share = fwd["frac_matmul"] if fwd else None
        out.append(_target(impl, "fwd share of matmul", "full4096_h128", share, 0.5))
        for layout in layouts:
            both = _last(rows, **base, implementation=impl, bwd_layout=layout,
                         **{"pass": "fwd+grad"})  # fmt: skip
            share = both.get("bwd_frac_matmul") if both else None
            name = f"bwd share of matmul ({layout})"
            out.append(_target(impl, name, "full4096_h128", share, 0.35))
    return out


def _timings(bench: list[dict], runs: dict[str, list[dict]]) -> dict:
    """(source, case, head dim, pass) -> {configuration: (ms, is the default)}; a run repeated
    into the same folder: its last row."""
    out = {}
    for r in bench:
        if r.get("kind") == "time" and r.get("status") == "ok" and r.get("median_ms"):
            layout = r.get("bwd_layout")
            config = " ".join(str(x) for x in (r["implementation"], r["variant"], layout) if x)
            default = r["implementation"] == "pallas" and r["variant"] == "default"
            default &= layout in (None, "default")
            key = ("bench_pallas", r["case"], r["head_dim"], r["pass"])
            out.setdefault(key, {})[config] = (r["median_ms"], default)
    for run, rows in runs.items():
        for r in rows:
            if r.get("kind") == "time" and r.get("ms"):
                key = ("peers harness", r["case"], None, r["pass"])
                out.setdefault(key, {})[run] = (r["ms"], run == "default")
    return out


def choices(bench: list[dict], runs: dict[str, list[dict]]) -> list[dict]:
    """The fastest configuration per (case, head dim, pass): among bench_pallas' rows (each
    implementation, tile variant and backward layout), and between the peers' harness runs
    (`implementation=None` against `"mosaic_gpu"`); `default_over_fastest` is the default's
    time over the fastest's (1.0: the default is the fastest)."""
    out = []
    for (source, case, head_dim, pass_), timed in _timings(bench, runs).items():
        if len(timed) < 2:
            continue
        fastest = min(timed, key=lambda config: timed[config][0])
        default_ms = next((ms for ms, default in timed.values() if default), None)
        slower = default_ms / timed[fastest][0] if default_ms else None
        out.append({"source": source, "case": case, "head_dim": head_dim, "pass": pass_,
                    "fastest": fastest, "fastest_ms": timed[fastest][0],
                    "default_ms": default_ms, "default_over_fastest": slower})  # fmt: skip
    return out


def _read(directory: str, name: str) -> list[dict]:
    return workdir.read_jsonl(os.path.join(directory, name))


def check(directory: str) -> list[dict]:
    """Every target of the runs found in `directory`."""
    peers = _read(directory, "peers_torch.jsonl")
    out = []
    for run, name in RUNS.items():
        ours = _read(directory, name)
        if ours:
            out += peer_targets(run, ours, peers)
    bench = _read(directory, "bench_pallas.jsonl")
    return out + (full_attention_targets(bench) if bench else [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="a gpu_checks.sh output folder")
    parser.add_argument("--out", default="", help="JSON lines output ('' = none)")
    args = parser.parse_args(argv)
    rows = check(args.dir)
    if not rows:
        raise SystemExit(f"{args.dir}: no tensorattn_jax.jsonl or bench_pallas.jsonl rows")
    for row in rows:
        benchlib.append_jsonl(args.out or None, row)
    read = functools.partial(_read, args.dir)
    fastest = choices(read("bench_pallas.jsonl"), {run: read(name) for run, name in RUNS.items()})
    if fastest:
        print("Fastest configuration timed, and the default's time over it:")
        benchlib.print_table(fastest, ["source", "case", "head_dim", "pass", "fastest"]
                             + ["fastest_ms", "default_ms", "default_over_fastest"])  # fmt: skip
        print()
    benchlib.print_table(rows, ["run", "target", "case", "measured", "threshold", "met"])
    met = [r["met"] for r in rows if r["met"] is not None]
    print(f"{sum(met)} of {len(met)} measured targets met ({len(rows) - len(met)} not measured)")
    return rows


if __name__ == "__main__":
    main()
