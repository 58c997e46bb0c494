"""The task interface, a fixed held-out evaluation set and the majority-class baseline."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


class Task(Protocol):
    """A synthetic task: `sample` returns `(inputs [B,T] int32, labels, mask)`.

    `labels` is int32 `[B,T]` (`label_kind == "token"`) or `[B]` (`"sequence"`); `mask` is a
    boolean array of the labels' shape marking entries that carry a label. `format_version`
    goes up when `sample` changes what its arrays mean: a training workdir or claim row of
    another format is not resumed or reused.
    """

    name: str
    format_version: int
    length: int
    vocab_size: int
    num_classes: int
    label_kind: str

    def sample(
        self, rng: np.random.Generator, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class Batch:
    inputs: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


# Rounds of redrawing held-out examples before `train_batch` gives up (the held-out set then
# holds nearly the whole input space, e.g. 2x2 relation grids).
MAX_REDRAWS = 100


def train_batch(
    task: Task, seed: int, step: int, batch_size: int, held_out: frozenset = frozenset()
) -> Batch:
    """The training batch of `step`: a pure function of `(seed, step, held_out)`, so resuming
    is exact. Examples whose inputs are in `held_out` (`held_out_keys` of the eval set) are
    redrawn from follow-up streams of the same step, so no evaluated example is trained on
    (on small input spaces, e.g. 4x4 relation grids, most would be otherwise)."""
    inputs, labels, mask = task.sample(np.random.default_rng([seed, 0, step]), batch_size)
    redraw = 1
    while held_out and (seen := _in(held_out, inputs)).any():
        rows = np.flatnonzero(seen)
        if redraw > MAX_REDRAWS:
            raise ValueError(
                f"{rows.size} examples of training step {step} are still held out after "
                f"{MAX_REDRAWS} redraws: the held-out set covers (almost) every input of "
                f"{task.name}; use a larger instance or a smaller held-out set"
            )
        new = task.sample(np.random.default_rng([seed, 0, step, redraw]), rows.size)
        for array, fresh in zip((inputs, labels, mask), new):
            array[rows] = fresh
        redraw += 1
    return Batch(inputs, labels, mask)


def held_out_keys(batch: Batch) -> frozenset:
    """The eval set's examples as keys for `train_batch(held_out=...)` (the inputs determine
    the labels)."""
    return frozenset(_keys(batch.inputs))


def _keys(inputs: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in np.ascontiguousarray(inputs, np.int32)]


def _in(keys: frozenset, inputs: np.ndarray) -> np.ndarray:
    return np.array([k in keys for k in _keys(inputs)], bool)


def eval_set(task: Task, seed: int, size: int) -> Batch:
    """The fixed held-out set: drawn from a stream disjoint from every training batch's;
    training batches exclude its examples (`held_out_keys`)."""
    return Batch(*task.sample(np.random.default_rng([seed, 1]), size))


def majority_baseline(labels: np.ndarray, mask: np.ndarray, num_classes: int) -> float:
    """Accuracy of always predicting the most frequent class among the labelled entries."""
    counts = np.bincount(labels[mask].ravel(), minlength=num_classes)
    return float(counts.max() / max(counts.sum(), 1))


def positive_rate(task: Task, seed: int = 0, size: int = 512) -> float:
    x, y, m = task.sample(np.random.default_rng([seed, 2]), size)
    return float(y[m].mean())
