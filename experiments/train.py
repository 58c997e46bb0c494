"""Trains one config: `python -m experiments.train --config=configs/match3.py --workdir=DIR`.

Overrides: `--config.model.num_heads=4`, `--config.train.num_steps=1000`,
`--config.kernel.implementation=blocked --config.kernel.blocked.block_q=32`,
`--config.kernel.pallas.fwd_block_rows=64`, `--config.model.polynomial.degree=3` (with
`:attention=polynomial`), ... Every field is checked before anything compiles. A finished run
in DIR is reported complete; an interrupted one resumes from its newest intact checkpoint,
also under another kernel (`config.kernel`), device count or `train.sequence_shards`; another
task or model architecture is refused. One run per DIR at a time (a second exits naming the
first).
"""

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from tensorattn import checkpoints, training, workdir

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host launch)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    logging.getLogger("tensorattn").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax is chatty at INFO
    try:
        options = training.options_from_dict(_CONFIG.value.to_dict())
        training.validate(options)
    except training.ConfigError as e:
        sys.exit(f"invalid config: {e}")
    try:
        training.train_and_evaluate(options, _WORKDIR.value)
    except workdir.WorkdirLockedError as e:
        sys.exit(f"workdir busy: {e}")
    except (training.NonFiniteLossError, checkpoints.CheckpointError) as e:
        sys.exit(f"training stopped: {e}")
    except (training.ConfigError, workdir.CorruptFileError) as e:
        sys.exit(f"cannot resume: {e}")


if __name__ == "__main__":
    app.run(main)
