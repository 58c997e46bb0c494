"""Match3 (mod M): is x_i part of a triple summing to 0 mod M? (docs/math.md §6)

One standard attention layer of small width cannot solve it; one tensor attention layer can.
Default setting: length 10, modulus 53 (about 65% positives). Pairs with `j = k` or `i` among
them are order-2 relations a standard layer can learn, but here they fall mostly on positions
that are positive anyway, so they barely beat the majority class; the rest needs the triple.
Measured with the default config (800 steps, batch 256; one core of a shared 2-core CPU):
tensor 99.99% held-out accuracy (99.8% by step 400), standard 67.3%, majority baseline 65.3%
(docs/training.md).
Config string: comma-separated `attention=tensor|standard|polynomial`, `length=10`,
`modulus=53`, `smoke`. Runnable commands:

    python -m experiments.train --config=configs/match3.py --workdir=/tmp/match3_tensor
    python -m experiments.train --config=configs/match3.py:attention=standard \
        --workdir=/tmp/match3_standard
    python -m experiments.train --config=configs/match3.py:smoke --workdir=/tmp/match3_smoke
    python -m experiments.train --config=configs/match3.py --workdir=/tmp/m3 \
        --config.model.num_heads=4 --config.train.num_steps=1000
"""

from configs import common

# Fourier frequencies of the embedding, at most: fewer are learned faster, and with all of them
# one tensor layer stalls at large moduli. Measured on a CPU (tensor model, seed 0 unless said;
# docs/training.md): length 10 mod 53, 99.8% held-out accuracy at step 400 with 16 frequencies
# against 91.1% at step 800 with all 26; length 16 mod 181, 99.7% at step 625 with 16 (seed 1:
# 99.5% at 875), 99.8% at 1000 with 24, 97.3% at 1250 with 26, 99.9% at 1500 with 32 (seed 1:
# 88%), and 63.4% from step 2000 to 4000 with all 90 (what pairwise matches alone give).
MAX_FREQUENCIES = 16


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, attention="tensor", length=10, modulus=53, smoke=False)
    config = common.base_config("match3", {"length": a.length, "modulus": a.modulus}, a.attention)
    # Fixed Fourier features of x mod M: the sums x_i + x_j + x_k live in frequency space.
    config.model.embedding = "fourier"
    config.model.fourier_frequencies = min((a.modulus - 1) // 2, MAX_FREQUENCIES)
    config.model.width = 64
    config.model.num_heads = 2
    # Wider heads than width // num_heads: the trilinear score takes 4 dims per frequency
    # (docs/math.md §6).
    config.model.head_dim = 128
    if a.attention == "polynomial":
        # The polynomial method's state has rank C(head_dim + degree, degree) per key/value
        # head: C(132, 4) ~ 1.2e7 is beyond the 2^20 limit (and memory); head_dim 16 at the
        # default degree 4 gives C(20, 4) = 4845.
        config.model.head_dim = 16
    config.model.num_layers = 1
    config.train.batch_size = 256
    config.train.num_steps = 800
    config.train.eval_every = 200
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 200
    if a.smoke:
        common.apply_smoke(config)
    return config
