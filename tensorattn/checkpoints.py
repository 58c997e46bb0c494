"""Orbax checkpoints of a train-state pytree under `DIR/checkpoints`.

Saves are synchronous: `save` returns once the step is on disk, and a save that cannot be
written raises `CheckpointError` at once (the folder is probed first), never hangs. Only finite
states are saved. Each step folder gets a SHA-256 of every file orbax wrote (`CHECKSUMS`), so
damage that still decodes (flipped bytes) is found on restore too. `restore_latest` falls back
to the newest checkpoint that restores: each newer one that does not is moved to
`DIR/checkpoints_corrupt/` and named in a warning. When none restores, nothing is moved
(`CheckpointError`: the cause may be the machine, not the files). A checkpoint whose tree
structure or shapes differ from the state to restore (a config change, not damage) is never
moved: `CheckpointMismatchError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from tensorattn import workdir as workdir_files

log = logging.getLogger(__name__)

CHECKSUMS = "tensorattn_sha256.json"  # in each step folder: {relative path: sha256 hex}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the message names the folder and the cause)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's tree structure differs from the state to restore into (another
    optimizer or model); nothing is moved or dropped."""


def _is_mismatch(error: Exception) -> bool:
    """Orbax's errors for a restore target whose tree or array shapes differ from the saved
    ones (a config change, e.g. another width or optimizer)."""
    text = str(error)
    return isinstance(error, ValueError) and (
        "structures do not match" in text or "is not compatible with the stored shape" in text
    )


class ChecksumError(ValueError):
    """A checkpoint file whose bytes differ from those written (damaged on disk)."""


def _file_digests(step_directory: str) -> dict[str, str]:
    """{path relative to the step folder: SHA-256 hex} of every file orbax wrote there."""
    digests = {}
    for folder, _, names in os.walk(step_directory):
        for name in names:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, step_directory)
            if relative == CHECKSUMS or name.startswith(f".{CHECKSUMS}."):
                continue
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            digests[relative] = sha.hexdigest()
    return digests


def _verify(step_directory: str) -> None:
    """Raises ChecksumError when a file listed in the step's CHECKSUMS is missing or differs.
    A step without CHECKSUMS (a kill between orbax's commit and that write, or an older
    checkpoint) is restored unverified."""
    path = os.path.join(step_directory, CHECKSUMS)
    if not os.path.exists(path):
        return
    with open(path) as f:
        expected = json.load(f)
    actual = _file_digests(step_directory)
    missing = sorted(p for p in expected if p not in actual)
    changed = sorted(p for p, digest in expected.items() if p in actual and actual[p] != digest)
    if missing or changed:
        raise ChecksumError(
            f"{len(missing)} file(s) missing, {len(changed)} differing from their SHA-256 at "
            f"save time, e.g. {(missing + changed)[0]}"
        )


def _drop_closed_loop_reports() -> None:
    """After a failed orbax restore, the reads still in flight complete into the asyncio loop
    orbax has closed, and each reports `RuntimeError: Event loop is closed` as an unraisable
    exception: dozens of tracebacks around the one warning that matters. From the first
    `restore_latest` on, this process drops exactly those; other unraisable exceptions go to
    the hook that was there before."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook


def _first_line(error: Exception, limit: int) -> str:
    return str(error).splitlines()[0][:limit] if str(error) else ""


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.array(True)]))


def all_finite(tree) -> bool:
    """True when every floating-point leaf of `tree` is finite."""
    return bool(_all_finite(tree))


class Checkpoints:
    """Saves every call to `save` (the caller decides when); keeps the newest `keep`."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.corrupt_directory = self.directory.rstrip(os.sep) + "_corrupt"
        self._keep = keep
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self._keep, create=True, enable_async_checkpointing=False
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _probe(self) -> None:
        try:
            fd, path = tempfile.mkstemp(dir=self.directory, prefix=".probe")
            os.close(fd)
            os.unlink(path)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoints to {self.directory}: {e}") from e

    def save(self, step: int, state) -> None:
        """Writes `state` as step `step`; raises CheckpointError if it is not finite or the
        folder cannot be written."""
        if not all_finite(state):
            raise CheckpointError(f"refusing to save step {step}: the state holds NaN/inf")
        self._probe()
        try:
            self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                step_directory = os.path.join(self.directory, str(step))
                text = json.dumps(_file_digests(step_directory), indent=0, sort_keys=True)
                workdir_files.write_atomic(os.path.join(step_directory, CHECKSUMS), text)
        except Exception as e:  # orbax raises many types; name the folder and step
            raise CheckpointError(
                f"saving step {step} to {self.directory} failed: {type(e).__name__}: {e}"
            ) from e

    def restore(self, step: int, target):
        """Restores into `target`'s structure, dtypes and shardings, once the step's files
        match their checksums (ChecksumError otherwise)."""
        _verify(os.path.join(self.directory, str(step)))
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_latest(self, target):
        """`(step, state)` from the newest checkpoint that restores and is finite, or
        `(None, target)` when there is none. Newer ones that fail are moved aside only once an
        older one restores (reading works, so they are damaged); when none restores, nothing
        is moved and CheckpointError names each failure (a permission or memory error is not
        damage). Raises CheckpointMismatchError, moving nothing, when a checkpoint's structure
        or shapes differ from `target`'s (a config change)."""
        failed = []  # (step, error)
        _drop_closed_loop_reports()
        for step in reversed(self.steps()):
            try:
                state = self.restore(step, target)
                if not all_finite(state):
                    raise ValueError("the state holds NaN/inf")
            except Exception as e:  # noqa: BLE001 - any other failure means: try an older one
                if _is_mismatch(e):
                    raise CheckpointMismatchError(
                        f"checkpoint step {step} in {self.directory} holds a state of another "
                        f"structure ({_first_line(e, 200)}); resume with the config that "
                        "wrote it or use a new workdir"
                    ) from e
                failed.append((step, e))
                self._reopen()  # a failed restore can leave the manager's item layout wrong
                continue
            for bad, e in failed:
                log.warning(
                    "checkpoint step %d in %s cannot be restored (%s: %s); moved it to %s and "
                    "resuming from step %d",
                    bad,
                    self.directory,
                    type(e).__name__,
                    _first_line(e, 300),
                    self._quarantine(bad),
                    step,
                )
            return step, state
        if failed:
            reasons = "; ".join(
                f"step {s}: {type(e).__name__}: {_first_line(e, 200)}" for s, e in failed
            )
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores ({reasons}). Nothing was moved or "
                "dropped. If the cause is the machine (permissions, memory), fix it and resume; "
                f"if the checkpoints are damaged, move {self.directory} away to start over "
                "(metrics.jsonl is then rewritten from step 0) or use a new workdir"
            ) from failed[0][1]
        return None, target

    def _quarantine(self, step: int) -> str:
        os.makedirs(self.corrupt_directory, exist_ok=True)
        destination = os.path.join(self.corrupt_directory, f"{step}-{int(time.time())}")
        shutil.move(os.path.join(self.directory, str(step)), destination)
        self._reopen()
        return destination

    def _reopen(self) -> None:
        self._manager.close()
        self._manager = self._open()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
