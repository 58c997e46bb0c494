"""What the synthetic tasks give away without a higher-order relation (docs/math.md §6).

For each task instance: the majority class and the accuracy of a lookup table on a few pairwise
features, fitted on one half of the samples and scored on the other (a Bayes classifier over
those features: a ceiling for any model that sees only them). A model at this accuracy shows no
composition at all.

    python -m experiments.task_shortcuts
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from tensorattn import tasks


def lookup_accuracy(keys: list, labels: np.ndarray) -> float:
    """Fits `key -> most frequent label` on the first half, scores it on the second."""
    half = len(keys) // 2
    counts = defaultdict(Counter)
    for k, y in zip(keys[:half], labels[:half]):
        counts[k][int(y)] += 1
    default = Counter(labels[:half].tolist()).most_common(1)[0][0]
    pred = [counts[k].most_common(1)[0][0] if k in counts else default for k in keys[half:]]
    return float(np.mean(np.array(pred) == labels[half:]))


def match3(task, n: int, rng) -> tuple[list, np.ndarray]:
    """Feature: x_i has a pairwise match (`j = i`: 2x_i + x_k, or `j = k`: x_i + 2x_j, = 0)."""
    x, y, _ = task.sample(rng, n)
    m = task.modulus
    i_with_k = ((2 * x[:, :, None] + x[:, None, :]) % m == 0).any(2)
    j_twice = ((x[:, :, None] + 2 * x[:, None, :]) % m == 0).any(2)
    return [(bool(f),) for f in (i_with_k | j_twice).ravel()], y.ravel()


def function_composition(task, n: int, rng) -> tuple[list, np.ndarray]:
    """Features: whether `f(x) = x` (then `f(f(x)) = x`), and the best guess without the second
    hop: `x` if so, else the most frequent value of `f` off position `x` (ties: the smallest)."""
    size = task.size
    x, y, _ = task.sample(rng, n)
    f, arg = x[:, :size], x[:, size]
    rows = np.arange(n)
    fixed = f[rows, arg] == arg
    others = np.where(np.arange(size)[None, :] == arg[:, None], size, f)  # drop position x
    counts = np.stack([(others == v).sum(1) for v in range(size)], axis=1)
    guess = np.where(fixed, arg, counts.argmax(1))
    return list(zip(fixed.tolist(), guess.tolist())), y


def relation(task, n: int, rng) -> tuple[list, np.ndarray]:
    """Features of cell (i, j): i = j, R(i,j), R(i,i), R(j,j), row i's and column j's sums."""
    m = task.size
    x, y, _ = task.sample(rng, n)
    r = (x % 2).reshape(n, m, m)  # the quotient task's cells carry colours above bit 0
    labels = y.reshape(n, m, m)
    rows, cols = r.sum(2), r.sum(1)
    keys, out = [], []
    for i in range(m):
        for j in range(m):
            feats = zip(r[:, i, j], r[:, i, i], r[:, j, j], rows[:, i], cols[:, j])
            keys += [(i == j, *map(int, f)) for f in feats]
            out.append(labels[:, i, j])
    order = rng.permutation(len(keys))  # mix cells between the two halves
    return [keys[k] for k in order], np.concatenate(out)[order]


# Pairwise features per task (Match2 is itself pairwise: no shortcut to measure).
FEATURES = {
    "match3": match3,
    "function_composition": function_composition,
    "relation_composition": relation,
    "quotient_relation_composition": relation,
}
# Samples per instance: ~0.5M labelled positions or cells, a few seconds each.
SAMPLES = {"match3": 40_000, "function_composition": 200_000}


def pairwise_lookup(name: str, kwargs: dict | None = None, seed: int = 0) -> float | None:
    """Held-out accuracy of the pairwise-feature lookup on task `name(**kwargs)`; None for a
    task without one (Match2)."""
    if name not in FEATURES:
        return None
    task = tasks.make(name, **(kwargs or {}))
    keys, labels = FEATURES[name](task, SAMPLES.get(name, 30_000), np.random.default_rng(seed))
    return lookup_accuracy(keys, labels)


# The instances of the CPU and full claim presets (docs/math.md §6).
INSTANCES = [
    ("match3", {"length": 6, "modulus": 19}),
    ("match3", {"length": 10, "modulus": 53}),
    ("match3", {"length": 16, "modulus": 181}),
    ("function_composition", {"size": 16}),
    *((name, {"size": m}) for name in ("relation_composition", "quotient_relation_composition")
      for m in (4, 6)),
]  # fmt: skip


def majority(name: str, kwargs: dict, seed: int = 0) -> float:
    task = tasks.make(name, **kwargs)
    _, labels, mask = task.sample(np.random.default_rng(seed), 20_000)
    return tasks.majority_baseline(labels, mask, task.num_classes)


def main() -> None:
    print(f"{'task':48s} {'majority':>9s} {'pairwise lookup':>16s}")
    for name, kwargs in INSTANCES:
        instance = f"{name}({','.join(f'{k}={v}' for k, v in kwargs.items())})"
        accuracy = pairwise_lookup(name, kwargs)
        print(f"{instance:48s} {majority(name, kwargs):9.3f} {accuracy:16.3f}", flush=True)


if __name__ == "__main__":
    main()
