"""Match2 (mod M): is there `j` with `x_i + x_j = 0 (mod M)`? One standard layer solves it.

Config string: `attention=tensor|standard|polynomial`, `length=16`, `modulus=25`, `smoke`.

    python -m experiments.train --config=configs/match2.py:attention=standard --workdir=/tmp/m2
    python -m experiments.train --config=configs/match2.py:smoke --workdir=/tmp/m2_smoke
"""

from configs import common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, attention="standard", length=16, modulus=25, smoke=False)
    config = common.base_config("match2", {"length": a.length, "modulus": a.modulus}, a.attention)
    # Fixed Fourier features of x mod M.
    config.model.embedding = "fourier"
    config.train.num_steps = 2000
    if a.smoke:
        common.apply_smoke(config)
    return config
