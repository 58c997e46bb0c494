"""Sequence-length sweep of the tensor-attention implementations (experiments/sweep.py).

Config string: comma-separated `preset=cpu|gpu`, `smoke`. Every field below can be overridden
on the command line; list fields take comma-separated values (`--config.lengths=256,512`,
`--config.implementations=blocked,polynomial`). The sweep checks every field before any point
runs (experiments/sweep.py `validate_config`) and exits naming a bad one.

`preset=gpu`: every curve means something. The polynomial method at a practical head dim and
degree (H = 16, degree 4: rank C(20, 4) = 4845), with entries bounded by 0.5 so that each call
is certified (score bound R = 0.5, Taylor relative error ~3e-4); lengths 2^8 .. 2^20, each
series stopping (timeout/oom rows) where it stops being feasible: the exact kernels near
n = 2^14, the polynomial method's forward+gradient past 2^16 and its forward at 2^20. The exact
baseline is "exact" (`implementation=None`: pallas on a GPU). Runnable commands:

    python -m experiments.sweep --config=configs/sweep.py:smoke --workdir=/tmp/sweep_smoke
    python -m experiments.sweep --config=configs/sweep.py --workdir=/tmp/sweep_cpu
    python -m experiments.sweep --config=configs/sweep.py:preset=gpu --workdir=/tmp/sweep_gpu
    python -m experiments.sweep --config=configs/sweep.py:preset=gpu --workdir=/tmp/sweep_gpu \
        --config.implementations=exact --config.passes=fwd    # one series (resumable step)
    python -m experiments.sweep --config=configs/sweep.py --workdir=/tmp/sweep \
        --config.lengths=256,512,1024 --config.implementations=blocked,polynomial \
        --config.passes=fwd+grad --config.causal=True --config.head_dim=32
"""

import ml_collections

from configs import common
from experiments import harness


def _max_length(**limits) -> ml_collections.ConfigDict:
    """Every implementation a field (None: no limit), so each can be overridden by name."""
    return ml_collections.ConfigDict(
        {
            impl: ml_collections.FieldReference(limits.get(impl), field_type=int)
            for impl in harness.IMPLEMENTATIONS
        }
    )


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, preset="cpu", smoke=False)
    if a.preset not in ("cpu", "gpu"):
        raise ValueError(f"preset must be cpu or gpu, got {a.preset!r}")
    c = ml_collections.ConfigDict()
    # Implementations to sweep: any of "exact" (implementation=None: the fastest exact kernel
    # on the device), "reference", "blocked", "pallas", "polynomial".
    c.implementations = ("reference", "blocked", "polynomial")
    # Sequence lengths n (= T = S1 = S2, self-attention shapes): positive ints.
    c.lengths = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    # "fwd" (forward only) and/or "fwd+grad" (forward and the gradient w.r.t. all inputs).
    c.passes = ("fwd", "fwd+grad")
    # Shapes: batch B, query heads N, key/value heads K dividing N, head dim H, value dim Hv
    # (None: H).
    c.batch = 1
    c.heads = 1
    c.kv_heads = 1
    c.head_dim = 16
    c.value_dim = ml_collections.FieldReference(None, field_type=int)
    # Input dtype: "float32", "bfloat16" or "float16".
    c.dtype = "float32"
    # Causal mask, and a causal sliding window "w1,w2" of positive ints (None: no window).
    c.causal = False
    c.window = ml_collections.FieldReference(None, field_type=tuple)
    # Inputs are uniform in [-entry_bound, entry_bound] (the polynomial method's hypothesis).
    c.entry_bound = 1.0
    # Options for implementation="polynomial" (PolynomialConfig fields); the sweep needs an
    # int degree (the feature rank and FLOPs are computed from it).
    c.polynomial = ml_collections.ConfigDict()
    c.polynomial.degree = 4
    c.polynomial.polynomial = "taylor"
    c.polynomial.gradient = "closed_form"
    # With entries up to 1 at H = 16 the score bound is R ~ 4, outside what degree 4 certifies:
    # this sweep measures time (and reports the measured relative_error), so no per-call check.
    c.polynomial.on_uncertified = "ignore"
    # Timed runs per point after one warm-up run (the median is reported).
    c.repeats = 3
    # Seconds per point. A point predicted (from shorter lengths) to take longer is recorded
    # as "timeout" without running, and so are its series' longer lengths. A point that ran
    # longer keeps "ok" and its numbers (its `reason` says so; a run cannot be stopped midway)
    # and its series' longer lengths become "timeout". Timed runs are cut to fit the budget.
    c.time_budget_s = 60.0
    # Points whose compiled memory exceeds this are recorded as "oom" without running
    # (0: the device's own limit where known, else 8 GiB).
    c.memory_limit_bytes = 0
    # Skip an implementation at lengths above this (e.g. reference materialises n^3 scores);
    # implementation -> max n, None: no limit (`--config.max_length.blocked=4096`).
    c.max_length = _max_length(reference=512)
    # The log-log slope is fitted to the last `fit_points` completed lengths of each series.
    c.fit_points = 3
    # Also record the error of non-exact implementations against "blocked" at lengths <= this.
    c.error_max_length = 1024
    if a.preset == "gpu":
        c.implementations = ("reference", "blocked", "exact", "polynomial")
        c.lengths = tuple(2**k for k in range(8, 21))
        c.heads = 8
        c.kv_heads = 8
        c.head_dim = 16
        # Certified calls: R = scale·||q||·||k1||_inf·||k2|| ~ 0.25·(4B)·B·(4B) = 0.5 at B=0.5.
        c.entry_bound = 0.5
        c.polynomial.on_uncertified = "warn"
        c.max_length = _max_length(reference=512)
        c.time_budget_s = 120.0
        c.repeats = 5
        c.error_max_length = 2048
    if a.smoke:
        c.lengths = (32, 64, 128)
        c.head_dim = 8
        c.passes = ("fwd",)
        c.repeats = 1
        c.time_budget_s = 20.0
        c.polynomial.degree = 2
        c.error_max_length = 64
    return c
