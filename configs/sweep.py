"""Sequence-length sweep of the tensor-attention implementations (experiments/sweep.py).

Config string: comma-separated `preset=cpu|gpu`, `smoke`. Every field below can be overridden
on the command line; list fields take comma-separated values (`--config.lengths=256,512`,
`--config.implementations=blocked,polynomial`). The sweep checks every field before any point
runs (experiments/sweep.py `validate_config`) and exits naming a bad one. Runnable commands:

    python -m experiments.sweep --config=configs/sweep.py:smoke --workdir=/tmp/sweep_smoke
    python -m experiments.sweep --config=configs/sweep.py --workdir=/tmp/sweep_cpu
    python -m experiments.sweep --config=configs/sweep.py:preset=gpu --workdir=/tmp/sweep_gpu \
        --config.dtype=bfloat16
    python -m experiments.sweep --config=configs/sweep.py --workdir=/tmp/sweep \
        --config.lengths=256,512,1024 --config.implementations=blocked,polynomial \
        --config.passes=fwd+grad --config.causal=True --config.head_dim=32
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, preset="cpu", smoke=False)
    if a.preset not in ("cpu", "gpu"):
        raise ValueError(f"preset must be cpu or gpu, got {a.preset!r}")
    c = ml_collections.ConfigDict()
    # Implementations to sweep: any of "reference", "blocked", "polynomial", "pallas".
    c.implementations = ("reference", "blocked", "polynomial")
    # Sequence lengths n (= T = S1 = S2, self-attention shapes): positive ints.
    c.lengths = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    # "fwd" (forward only) and/or "fwd+grad" (forward and the gradient w.r.t. all inputs).
    c.passes = ("fwd", "fwd+grad")
    # Shapes: batch B, query heads N, key/value heads K dividing N, head dim H (value dim = H).
    c.batch = 1
    c.heads = 1
    c.kv_heads = 1
    c.head_dim = 16
    # Input dtype: "float32", "bfloat16" or "float16".
    c.dtype = "float32"
    # Causal mask, and a causal sliding window "w1,w2" of positive ints (None: no window).
    c.causal = False
    c.window = ml_collections.FieldReference(None, field_type=tuple)
    # Inputs are uniform in [-entry_bound, entry_bound] (the polynomial method's hypothesis).
    c.entry_bound = 1.0
    # Options for implementation="polynomial" (see tensorattn/kernels/polynomial.py); the
    # sweep needs an int degree (the feature rank and FLOPs are computed from it).
    c.polynomial = ml_collections.ConfigDict()
    c.polynomial.degree = 4
    c.polynomial.polynomial = "taylor"
    c.polynomial.gradient = "closed_form"
    # Timed runs per point after one warm-up run (the median is reported).
    c.repeats = 3
    # A point whose predicted (or measured) wall time exceeds this is recorded as "timeout",
    # and so are the longer lengths of the same implementation and pass.
    c.time_budget_s = 60.0
    # Points whose compiled memory exceeds this are recorded as "oom" without running
    # (0: the device's own limit where known, else 8 GiB).
    c.memory_limit_bytes = 0
    # Skip an implementation at lengths above this (e.g. reference materialises n^3 scores);
    # implementation -> max n. Missing: no limit.
    c.max_length = ml_collections.ConfigDict({"reference": 512})
    # The log-log slope is fitted to the last `fit_points` completed lengths of each series.
    c.fit_points = 3
    # Also record the error of non-exact implementations against "blocked" at lengths <= this.
    c.error_max_length = 1024
    if a.preset == "gpu":
        c.implementations = ("reference", "blocked", "pallas", "polynomial")
        c.lengths = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
        c.head_dim = 64
        c.heads = 8
        c.kv_heads = 8
        c.max_length = ml_collections.ConfigDict({"reference": 1024})
        c.time_budget_s = 120.0
        c.repeats = 5
    if a.smoke:
        c.lengths = (32, 64, 128)
        c.head_dim = 8
        c.passes = ("fwd",)
        c.repeats = 1
        c.time_budget_s = 20.0
        c.polynomial.degree = 2
        c.error_max_length = 64
    return c
