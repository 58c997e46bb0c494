"""Synthetic higher-order tasks (docs/math.md §6) behind one registry: `make(name, **kwargs)`.

task = tensorattn.tasks.make("match3", length=16, modulus=181)
inputs, labels, mask = task.sample(numpy.random.default_rng(0), batch_size=32)
"""

from __future__ import annotations

from collections.abc import Callable

from tensorattn.tasks.base import (
    Batch,
    Task,
    eval_set,
    held_out_keys,
    majority_baseline,
    positive_rate,
    train_batch,
)
from tensorattn.tasks.composition import (
    function_composition,
    quotient_relation_composition,
    relation_composition,
)
from tensorattn.tasks.match import match2, match3

REGISTRY: dict[str, Callable[..., Task]] = {
    "match2": match2,
    "match3": match3,
    "function_composition": function_composition,
    "relation_composition": relation_composition,
    "quotient_relation_composition": quotient_relation_composition,
}


def names() -> list[str]:
    return sorted(REGISTRY)


def make(name: str, **kwargs) -> Task:
    """Builds task `name`; raises ValueError for an unknown name or bad arguments."""
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose one of {names()}")
    try:
        return REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for task {name!r}: {e}") from e


__all__ = [
    "Batch",
    "REGISTRY",
    "Task",
    "eval_set",
    "held_out_keys",
    "majority_baseline",
    "make",
    "names",
    "positive_rate",
    "train_batch",
]
