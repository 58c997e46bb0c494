r"""Benchmark of the exact kernels: time, compiled memory and achieved rate vs matmul.

  python -m experiments.bench_kernels                       # the issue's targets, float32
  python -m experiments.bench_kernels --dtype=bfloat16 --out=runs/bench_gpu.jsonl  # on a GPU
  python -m experiments.bench_kernels --preset=sweep --lengths=128,256,512

Prints a table and appends one row per measurement to `--out` (the row schema of
`experiments.harness`: `n`, `pass`, `median_ms`, `tflops`, `status`, ...); `--impls` may name
"exact" (`implementation=None`), `--block_sizes=64,32,128` sets `BlockedConfig` tiles.
"""

from __future__ import annotations

import jax.numpy as jnp
from absl import app, flags

from experiments import benchlib, harness

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this command's flags; only `__main__` calls it, so the module imports (and
    its functions run) without them."""
    flags.DEFINE_enum("preset", "targets", ["targets", "sweep", "gpu", "tiles"], "What to measure.")
    flags.DEFINE_list(
        "block_sizes", [], "block_q,block_outer,block_inner (BlockedConfig) for 'blocked'."
    )
    flags.DEFINE_list("lengths", ["128", "256", "512"], "Sweep lengths (preset=sweep).")
    flags.DEFINE_list("impls", ["reference", "blocked"], "Implementations (preset=sweep).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype.")
    flags.DEFINE_integer("batch", 1, "Batch size.")
    flags.DEFINE_integer("heads", 1, "Query heads N.")
    flags.DEFINE_integer("kv_heads", 1, "Key/value heads K.")
    flags.DEFINE_list("head_dims", ["64", "128"], "Head dims (preset=gpu).")
    flags.DEFINE_integer("repeats", 3, "Timed runs per point (median reported).")
    flags.DEFINE_string("out", "runs/bench_kernels.jsonl", "JSON lines output ('' = none).")


_TILE_GRID = ["64,32,128", "128,32,128", "128,64,128", "128,32,256", "256,16,256", "64,64,256"]

TILES = ("block_q", "block_outer", "block_inner")


def measure(
    impl,
    t,
    head_dim,
    *,
    causal=False,
    window=None,
    grad=False,
    run=True,
    dtype="float32",
    blocks=None,
    batch=1,
    heads=1,
    kv_heads=1,
    repeats=3,
):
    """One benchmark point: `harness.measure`'s row (memory checked, never refused)."""
    options = dict(zip(TILES, blocks)) if impl == "blocked" and blocks else {}
    point = harness.make_point(
        impl,
        t,
        head_dim=head_dim,
        causal=causal,
        window=window,
        dtype=dtype,
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        options=options,
        **{"pass": "fwd+grad" if grad else "fwd"},
    )
    row = harness.measure(point, repeats=repeats, memory_limit=1 << 62, timed=run)
    row["temp_mib"] = None if row["temp_bytes"] is None else row["temp_bytes"] / 2**20
    return row


def report_targets(rows):
    """Checks the exact-kernel issue's CPU targets against the measured rows."""

    def find(**kw):
        return next(r for r in rows if all(r.get(k) == v for k, v in kw.items()))

    mib = 2**20
    fwd512 = find(implementation="blocked", n=512, causal=False, **{"pass": "fwd"})
    ref128 = find(implementation="reference", n=128, **{"pass": "fwd"})
    blk128 = find(implementation="blocked", n=128, **{"pass": "fwd"})
    mem_f = find(implementation="blocked", n=1024, **{"pass": "fwd"})["temp_bytes"]
    mem_g = find(implementation="blocked", n=1024, **{"pass": "fwd+grad"})["temp_bytes"]
    mem_ref = find(implementation="reference", n=1024, **{"pass": "fwd"})["temp_bytes"]
    causal = find(implementation="blocked", n=512, causal=True, window=None, **{"pass": "fwd"})
    win = find(implementation="blocked", n=4096, **{"pass": "fwd"})
    full_4096_ms = fwd512["median_ms"] * (4096 / 512) ** 3
    checks = [
        (
            "blocked fwd T=512 H=64 / matmul rate",
            fwd512["fraction_of_matmul"],
            ">= 0.60",
            fwd512["fraction_of_matmul"] >= 0.60,
        ),
        (
            "blocked / reference time, T=128",
            blk128["median_ms"] / ref128["median_ms"],
            "<= 1.25",
            blk128["median_ms"] <= 1.25 * ref128["median_ms"],
        ),
        ("blocked fwd temp MiB, T=1024 H=32", mem_f / mib, "<= 64", mem_f <= 64 * mib),
        ("blocked grad temp MiB, T=1024 H=32", mem_g / mib, "<= 256", mem_g <= 256 * mib),
        ("reference fwd temp MiB, T=1024 H=32", mem_ref / mib, "(for comparison)", True),
        (
            "causal / full time, T=512",
            causal["median_ms"] / fwd512["median_ms"],
            "<= 0.45",
            causal["median_ms"] <= 0.45 * fwd512["median_ms"],
        ),
        (
            "full(4096, from 512 x 8^3) / window(64,16)",
            full_4096_ms / win["median_ms"],
            ">= 500",
            full_4096_ms >= 500 * win["median_ms"],
        ),
    ]
    print("\nTargets:")
    for name, value, target, ok in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {name}: {value:.3g} (target {target})")
    return checks


def main(argv):
    del argv
    dtype = jnp.dtype(FLAGS.dtype)
    rate = harness.matmul_rate(dtype)
    env = harness.environment()
    print(f"device: {env}  {dtype.name} matmul: {rate / 1e9:.1f} GFLOP/s")
    benchlib.append_jsonl(
        FLAGS.out, {"kind": "matmul_rate", "dtype": dtype.name, "flops_per_s": rate, **env}
    )
    if FLAGS.preset == "targets":
        points = [
            dict(impl="reference", t=128, head_dim=64),
            dict(impl="blocked", t=128, head_dim=64),
            dict(impl="reference", t=128, head_dim=64, grad=True),
            dict(impl="blocked", t=128, head_dim=64, grad=True),
            dict(impl="blocked", t=512, head_dim=64),
            dict(impl="blocked", t=512, head_dim=64, grad=True),
            dict(impl="blocked", t=512, head_dim=64, causal=True),
            dict(impl="blocked", t=1024, head_dim=32, run=False),
            dict(impl="blocked", t=1024, head_dim=32, grad=True, run=False),
            dict(impl="reference", t=1024, head_dim=32, run=False),
            dict(impl="blocked", t=4096, head_dim=64, window=(64, 16)),
        ]
    elif FLAGS.preset == "gpu":
        points = [dict(impl="reference", t=512, head_dim=64)]
        for head_dim in map(int, FLAGS.head_dims):
            for grad in (False, True):
                points += [
                    dict(impl="blocked", t=1024, head_dim=head_dim, grad=grad),
                    dict(impl="blocked", t=4096, head_dim=head_dim, grad=grad),
                    dict(impl="blocked", t=16384, head_dim=head_dim, grad=grad, window=(512, 32)),
                ]
    elif FLAGS.preset == "tiles":
        points = [
            dict(
                impl="blocked",
                t=int(FLAGS.lengths[-1]),
                head_dim=64,
                blocks=tuple(int(b) for b in tiles.split(",")),
            )
            for tiles in _TILE_GRID
        ]
    else:
        points = [
            dict(impl=impl, t=int(t), head_dim=64, grad=grad)
            for t in FLAGS.lengths
            for impl in FLAGS.impls
            for grad in (False, True)
        ]
    blocks = tuple(int(b) for b in FLAGS.block_sizes) or None
    shape = dict(batch=FLAGS.batch, heads=FLAGS.heads, kv_heads=FLAGS.kv_heads)
    rows = []
    for point in points:
        point = {"blocks": blocks, **point}
        row = measure(**point, **shape, dtype=dtype.name, repeats=FLAGS.repeats)
        if row["tflops"] is not None:
            # The matmul rate is re-measured next to each point, so a busy machine slows both.
            row["matmul_flops_per_s"] = harness.matmul_rate(dtype)
            row["fraction_of_matmul"] = row["tflops"] * 1e12 / row["matmul_flops_per_s"]
        row["block_sizes"] = point["blocks"] if row["implementation"] == "blocked" else None
        benchlib.append_jsonl(FLAGS.out, row)
        rows.append(row)
        ms = row["median_ms"]
        print(
            f"  {row['implementation']:>9} n={row['n']:<5} {row['pass']:<8} {row['status']:<6}"
            + (f"{ms:10.2f} ms" if ms is not None else ""),
            flush=True,
        )
    print()
    benchlib.print_table(
        rows,
        [
            "implementation",
            "n",
            "head_dim",
            "block_sizes",
            "causal",
            "window",
            "pass",
            "compile_s",
            "median_ms",
            "tflops",
            "fraction_of_matmul",
            "temp_mib",
        ],
    )
    if FLAGS.preset == "targets":
        report_targets(rows)


if __name__ == "__main__":
    define_flags()
    app.run(main)
