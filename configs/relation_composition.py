"""Binary relation composition: an m x m 0/1 grid R; per cell (i, j), is there k with
R(i,k) and R(k,j)?

Config string: `attention=tensor|standard|polynomial`, `size=6`, `smoke`.

    python -m experiments.train --config=configs/relation_composition.py --workdir=/tmp/rc
    python -m experiments.train --config=configs/relation_composition.py:smoke --workdir=/tmp/rc_s
"""

from configs import common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, attention="tensor", size=6, smoke=False)
    config = common.base_config("relation_composition", {"size": a.size}, a.attention)
    # Grid positions carry the (row, column) structure.
    config.model.positional = "learned"
    config.train.num_steps = 4000
    if a.smoke:
        common.apply_smoke(config)
    return config
