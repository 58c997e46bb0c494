r"""GPU benchmark of the Pallas tensor-attention kernels against the blocked XLA kernel.

  PYTHONUNBUFFERED=1 python -m experiments.bench_pallas --out=$OUT/bench_pallas.jsonl
  TENSORATTN_PALLAS_INTERPRET=1 python -m experiments.bench_pallas --cases=tiny \
      --head_dims=16 --matmul_size=256 --variants_window=32:16:4   # any backend, slowly
  # The Mosaic GPU forward beside the Triton-lowered one (Hopper; issue 10's shapes):
  python -m experiments.bench_pallas --impls=pallas,mosaic_gpu --bwd_impls=pallas,mosaic_gpu \
      --cases=window16384,group64,group128 --head_dims=128 --out=$OUT/bench_mosaic.jsonl

In one run: the device's bf16 matmul rate; a correctness check of the Pallas kernels against
the blocked kernel (forward and gradients); then forward and forward+gradient TFLOP/s of
"pallas" and "blocked" at T=4096 (full) and T=16384 with windows (512, 32), head dims 64 and
128, grouped heads. Each implementation runs at its default tiles (variant "default", what
`implementation=None` users get), then at forward variants: `PallasConfig` tiles
`rows:block_k2:warps` (for "mosaic_gpu", `MosaicGPUConfig` fields
`block_k1:block_k2:max_concurrent_steps`, then switches `smem` for
`register_operands=False` and `nosched` for `schedule_barrier=False`). The default tiles are
also timed with the gradient (mosaic_gpu's: the Pallas backward, `bwd_layout` "default", and
the Mosaic GPU one, "mosaic_bwd", and with windows "mosaic_bwd_split": dK1/dV1 by the dK/dV
kernel instead of the dQ kernel's partial sums).
Rows follow the schema of `experiments.harness`
(`n`, `pass`, `median_ms`, `tflops`, `status`, ...; FLOPs from `tensorattn.kernels.cost`),
plus `case`, `variant`, `frac_matmul` and, for "fwd+grad", `bwd_tflops`: the backward alone
(2.5x the forward's FLOPs, docs/math.md §3.4) over the time beyond the forward, and
`bwd_layout`: the Pallas backward's variant (`PallasConfig.bwd_fuse_k1`: "default" is the
library's choice, "fused" dK1/dV1 inside the dQ kernel, "split" three kernels; or backward
`PallasConfig` fields "name=value+...", by default the split tiles used before register
reports chose today's, `PREVIOUS_BWD_TILES`). Compile time is reported apart; times are
medians after a warm-up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import benchlib, harness
from tensorattn.kernels import cost

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this command's flags; only `__main__` calls it, so the module imports (and
    its functions run) without them."""
    flags.DEFINE_string("out", "", "JSON lines output ('' = none).")
    flags.DEFINE_integer("repeats", 5, "Timed runs per point (median reported).")
    flags.DEFINE_float("budget_s", 12.0, "Max seconds of timed runs per point.")
    flags.DEFINE_list("head_dims", ["64", "128"], "Head dims to measure.")
    flags.DEFINE_list("cases", ["window16384", "full4096"], "Cases to measure.")
    flags.DEFINE_list("impls", ["pallas", "blocked"], "Implementations.")
    flags.DEFINE_list(
        "variants_full", ["128:64:8", "128:128:8", "64:64:4"], "Pallas rows:block_k2:warps (full)."
    )
    flags.DEFINE_list(
        "variants_window",
        ["128:64:8", "128:32:8", "64:32:4"],
        "Pallas rows:block_k2:warps (window).",
    )
    flags.DEFINE_list(
        "variants_mosaic",
        ["32:64:2", "32:64:2:smem", "32:64:2:nosched", "32:64:3", "32:128:2", "64:64:2"],
        "Mosaic GPU block_k1:block_k2:max_concurrent_steps[:smem][:nosched] (smem: "
        "register_operands=False; nosched: schedule_barrier=False).",
    )
    flags.DEFINE_bool("check", True, "Check pallas against blocked first.")
    flags.DEFINE_integer("matmul_size", 8192, "Side of the bf16 matmul rate probe.")
    flags.DEFINE_list("bwd_impls", ["pallas", "blocked"], "Implementations timed forward+gradient.")
    flags.DEFINE_list(
        "bwd_layouts",
        ["fused", "split", PREVIOUS_BWD_TILES],
        "Pallas backward variants timed: default (the library's choice), fused (windowed cases "
        "only), split, or PallasConfig fields name=value+name=value.",
    )


# name -> (batch, T, heads N, kv heads K, window)
CASES = {
    "full4096": (1, 4096, 8, 2, None),
    "window16384": (1, 16384, 16, 2, (512, 32)),
    "tiny": (1, 64, 4, 2, (16, 8)),
    # Issue 10: 64 or 128 query heads per key/value head, narrow first window.
    "group64": (1, 4096, 64, 1, (32, 256)),
    "group128": (1, 4096, 128, 1, (32, 512)),
}


# Pallas backward layouts: `PallasConfig.bwd_fuse_k1` (None: the library's choice).
BWD_LAYOUTS = {"default": None, "fused": True, "split": False}
# Mosaic GPU backward layouts: `MosaicGPUConfig.backward` (the default is the Pallas one).
# "mosaic_bwd": the library's choice (dK1/dV1 fused into dQ under a narrow causal first window);
# "mosaic_bwd_split": dK1/dV1 from the dK/dV kernel.
MOSAIC_BWD_LAYOUTS = {
    "default": {},
    "mosaic_bwd": {"backward": "mosaic_gpu"},
    "mosaic_bwd_split": {"backward": "mosaic_gpu", "bwd_fuse_k1": False},
}
# The split backward's tiles before they were chosen by register reports (commit a8cb9ca).
PREVIOUS_BWD_TILES = "bwd_block_rows=128+bwd_block_k2=64+bwd_fuse_k1=false"


def bwd_options(variant: str) -> dict:
    """`PallasConfig` fields of a backward variant: a layout name or "name=value+..."."""
    if variant in BWD_LAYOUTS:
        fuse = BWD_LAYOUTS[variant]
        return {} if fuse is None else {"bwd_fuse_k1": fuse}
    return benchlib.config_fields(variant)


def variant_options(variant: str | None, impl: str = "pallas") -> dict:
    """`PallasConfig` fields of a variant "rows:block_k2:warps" (forward and backward tiles),
    or for "mosaic_gpu" the `MosaicGPUConfig` fields of "block_k1:block_k2:steps[:smem]
    [:nosched]" (`smem`: wgmma's first operands through shared memory, `register_operands=
    False`; `nosched`: no ping-pong between the compute warpgroups, `schedule_barrier=False`)."""
    if variant is None:
        return {}
    if impl == "mosaic_gpu":
        block_k1, block_k2, steps, *switches = variant.split(":")
        offs = {"smem": "register_operands", "nosched": "schedule_barrier"}
        if not set(switches) <= set(offs) or len(set(switches)) < len(switches):
            raise ValueError(
                f"mosaic_gpu variant {variant!r}: block_k1:block_k2:steps[:smem][:nosched]"
            )
        options = {"block_k1": int(block_k1), "block_k2": int(block_k2)}
        options["max_concurrent_steps"] = int(steps)
        return options | {offs[name]: False for name in switches}
    rows, block_k2, warps = map(int, variant.split(":"))
    return {
        "fwd_block_rows": rows,
        "fwd_block_k2": block_k2,
        "bwd_block_rows": rows,
        "bwd_block_k2": block_k2,
        "num_warps": warps,
    }


def case_point(case: str, impl: str, head_dim: int, *, pass_="fwd", dtype="bfloat16", options=None):
    batch, t, n, kv, window = CASES[case]
    return harness.make_point(
        impl,
        t,
        batch=batch,
        heads=n,
        kv_heads=kv,
        head_dim=head_dim,
        window=window,
        causal=window is not None,
        dtype=dtype,
        options=options or {},
        **{"pass": pass_},
    )


def check_correctness(emit, impls=("pallas",)) -> None:
    """Pallas (and mosaic_gpu, bfloat16 only) vs blocked on the device: relative errors of the
    output and all five gradients (largest entry error / largest entry), float32 full and
    bfloat16 windowed."""
    cases = [("pallas", "float32", None, {})] if "pallas" in impls else []
    exact = [impl for impl in impls if impl in ("pallas", "mosaic_gpu")]
    cases += [(impl, "bfloat16", (64, 16), {}) for impl in exact]
    if "mosaic_gpu" in impls:
        cases.append(("mosaic_gpu", "bfloat16", (64, 16), MOSAIC_BWD_LAYOUTS["mosaic_bwd"]))
    for impl, dtype, window, options in cases:
        errors = []
        for pass_ in ("fwd", "fwd+grad"):
            point = harness.make_point(
                impl,
                256,
                heads=8,
                kv_heads=2,
                head_dim=64,
                dtype=dtype,
                window=window,
                causal=window is not None,
                options=options,
                **{"pass": pass_},
            )
            inputs = harness.make_inputs(point, seed=1)
            errors += harness.result_errors(point, inputs, "blocked")
        emit(
            {
                "kind": "check",
                "implementation": impl,
                "dtype": dtype,
                "window": window,
                "options": options,
                "rel_err_out_dq_dk1_dk2_dv1_dv2": errors,
                "finite": all(e == e for e in errors),  # nan compares unequal
                **harness.environment(),
            }
        )


def time_case(
    case: str,
    head_dim: int,
    peak: float,
    emit,
    *,
    impls=("pallas", "blocked"),
    variants=(),
    mosaic_variants=(),
    bwd_impls=("pallas", "blocked"),
    bwd_layouts=("default",),
    repeats: int = 5,
    budget_s: float | None = None,
) -> list[dict]:
    """Forward rows of every implementation at its default tiles ("default": what
    `implementation=None` users get) and, for pallas and mosaic_gpu, at each of `variants` /
    `mosaic_variants`; then forward+gradient rows of each of `bwd_impls` at its default
    tiles (pallas: each of `bwd_layouts`), the backward timed beyond the default forward;
    `peak`: the matmul TFLOP/s."""
    timing = dict(repeats=repeats, budget_s=budget_s)
    rows, default = [], {}
    variants_of = {"pallas": variants, "mosaic_gpu": mosaic_variants}
    for impl in impls:
        for variant in [None, *variants_of.get(impl, ())]:
            point = case_point(case, impl, head_dim, options=variant_options(variant, impl))
            row = harness.measure(point, **timing)
            row.update(kind="time", case=case, variant=variant or "default")
            if row["status"] != "ok":
                print(f"FAILED {case} H={head_dim} {impl} {variant} fwd: {row['reason']}")
                continue
            row["frac_matmul"] = row["tflops"] / peak
            emit(row)
            rows.append(row)
            if variant is None:
                default[impl] = row
    for impl in bwd_impls:
        if impl not in default:
            continue
        fwd = default[impl]
        windowed = CASES[case][4] is not None
        if impl == "mosaic_gpu":
            layouts = [x for x in MOSAIC_BWD_LAYOUTS if windowed or x != "mosaic_bwd_split"]
            options_of = MOSAIC_BWD_LAYOUTS.get
        else:
            layouts = bwd_layouts if impl == "pallas" else []
            layouts = [x for x in layouts if windowed or not bwd_options(x).get("bwd_fuse_k1")]
            options_of = bwd_options
        for layout in layouts or ["default"]:
            options = dict(fwd["options"]) | options_of(layout)
            point = case_point(case, impl, head_dim, pass_="fwd+grad", options=options)
            row = harness.measure(point, **timing)
            row.update(kind="time", case=case, variant=fwd["variant"], bwd_layout=layout)
            if row["status"] != "ok":
                print(f"FAILED {case} H={head_dim} {impl} fwd+grad {layout}: {row['reason']}")
                continue
            bwd_flops = fwd["flops"] * cost.BACKWARD_FACTOR
            bwd_s = max(row["median_ms"] - fwd["median_ms"], 1e-6) / 1e3
            row["frac_matmul"] = row["tflops"] / peak
            row["bwd_tflops"] = bwd_flops / bwd_s / 1e12
            row["bwd_frac_matmul"] = row["bwd_tflops"] / peak
            emit(row)
            rows.append(row)
    return rows


def main(argv):
    del argv
    env = harness.environment()
    print(f"jax {env['jax_version']} on {env['device_kind']}", flush=True)

    def emit(row):  # appended at once: a killed run keeps its rows
        benchlib.append_jsonl(FLAGS.out, row)

    peak = harness.matmul_rate(jnp.bfloat16, FLAGS.matmul_size) / 1e12
    emit({"kind": "matmul", "tflops": peak, **env})
    print(f"bf16 matmul {FLAGS.matmul_size}^3: {peak:.1f} TFLOP/s", flush=True)
    if FLAGS.check:
        check_correctness(lambda row: (emit(row), print(row, flush=True)), FLAGS.impls)
    table = []
    for case in FLAGS.cases:
        for h in map(int, FLAGS.head_dims):
            window = CASES[case][4]
            variants = FLAGS.variants_full if window is None else FLAGS.variants_window
            table += time_case(
                case, h, peak, emit, impls=FLAGS.impls, variants=variants,
                mosaic_variants=FLAGS.variants_mosaic, bwd_impls=FLAGS.bwd_impls,
                bwd_layouts=FLAGS.bwd_layouts, repeats=FLAGS.repeats, budget_s=FLAGS.budget_s,
            )  # fmt: skip
    print(f"\nbf16 matmul rate: {peak:.1f} TFLOP/s ({env['device_kind']}, jax {jax.__version__})")
    for r in table:
        r["%mm"] = 100 * r["frac_matmul"]
        r["bwd %mm"] = 100 * r["bwd_frac_matmul"] if "bwd_frac_matmul" in r else None
    benchlib.print_table(
        table,
        ["case", "head_dim", "implementation", "variant", "pass", "bwd_layout", "median_ms"]
        + ["tflops", "%mm"]
        + ["bwd_tflops", "bwd %mm", "compile_s"],
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
