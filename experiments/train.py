"""Trains one config: `python -m experiments.train --config=configs/match3.py --workdir=DIR`.

Overrides: `--config.model.num_heads=4`, `--config.train.num_steps=1000`,
`--config.kernel.implementation=blocked --config.kernel.blocked.block_q=32`,
`--config.kernel.pallas.fwd_block_rows=64`, `--config.model.polynomial.degree=3` (with
`:attention=polynomial`), ... Every field, the config file and string, and the workdir are
checked before anything compiles; a bad one exits non-zero with one line. A finished run
in DIR is reported complete; an interrupted one resumes from its newest intact checkpoint,
also under another kernel (`config.kernel`), device count or `train.sequence_shards`; another
task or model architecture is refused. One run per DIR at a time (a second exits naming the
first). SIGTERM or Ctrl-C saves the current step, then exits non-zero saying where to resume.
"""

import logging
import re
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


def _last_line(text: str) -> str:
    """The last non-empty line of `text` (the innermost cause of a chained message)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _unknown_field(error: Exception, argv: list[str]) -> str | None:
    """`DOTTED: not a field ...` for the `--config.DOTTED=` override that named a missing
    field (ml_collections raises a bare AttributeError/KeyError with only the last key, and
    for a near miss a second line `Did you mean ...`, kept as the hint)."""
    while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(..))
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    key, _, hint = text.partition("\n")
    key, hint = key.strip().strip("'\""), hint.strip()
    for arg in argv:
        name = arg.split("=", 1)[0].lstrip("-")
        if name.startswith("config.") and key in name.split(".")[1:]:
            dotted = name.removeprefix("config.")
            return f"{dotted}: not a field of the config (set by {arg})" + (
                f". {hint}" if hint else ""
            )
    return None


def _message(error) -> str:
    """The innermost line of `error`'s message, without an exception-class prefix."""
    return re.sub(r"^\w+(Error|Exception): ", "", _last_line(error))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a bad config string, override value or an override of a field
    that does not exist exits non-zero with one line, no traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        sys.exit(f"invalid config: {_unknown_field(e, argv) or _message(e)}")
    except flags.Error as e:
        if str(e).startswith("flag --config"):
            name = str(e).split(": ", 1)[0].removeprefix("flag ")
            message = _message(e).removeprefix(f"flag {name}: ")
            sys.exit(f"invalid config: {name}: {message}")
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull for help.")


def _load_config() -> dict:
    """The config as a dict; exits with one line when its file did not load."""
    try:
        return _CONFIG.value.to_dict()
    except OSError as e:
        name = config_flags.get_config_filename(flags.FLAGS["config"])
        sys.exit(f"invalid config: --config={name}: {_message(e.__cause__ or e)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    logging.getLogger("tensorattn").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax is chatty at INFO
    config = _load_config()
    try:
        path = workdir.check_workdir(_WORKDIR.value)
    except workdir.WorkdirError as e:
        sys.exit(f"invalid workdir: {e}")
    try:
        options = training.options_from_dict(config)
        training.validate(options)
    except training.ConfigError as e:
        sys.exit(f"invalid config: {e}")
    try:
        training.train_and_evaluate(options, path)
    except workdir.WorkdirLockedError as e:
        sys.exit(f"workdir busy: {e}")
    except workdir.WorkdirError as e:
        sys.exit(f"invalid workdir: {e}")
    except (training.NonFiniteLossError, checkpoints.CheckpointError) as e:
        sys.exit(f"training stopped: {e}")
    except (training.ConfigError, workdir.CorruptFileError) as e:
        sys.exit(f"cannot resume: {e}")
    except training.TrainingInterrupted as e:
        sys.exit(f"training interrupted: {e}")
    except OSError as e:  # e.g. a full disk or a file made unwritable: every write is atomic
        sys.exit(
            f"training stopped: {type(e).__name__}: {e}; the files in {path} are intact: fix "
            "the cause and run the same command to resume"
        )
    except KeyboardInterrupt:
        print(
            f"interrupted; run the same command to resume from the newest checkpoint in {path}",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
