"""Analytic cost of exact and polynomial tensor attention (FLOP counts, docs/math.md §3-§5).

Counts are multiply-adds × 2 per head unless `heads` is given. They are models, used to plot
achieved rates and to decide where the polynomial method pays off; the kernels do not use them.
"""

from __future__ import annotations

import math

import numpy as np

# Exact backward / forward work per allowed tuple: `10H / 4H` at `Hv = H` (docs/math.md §3.4).
BACKWARD_FACTOR = 2.5
GRAD_FACTOR = 1.0 + BACKWARD_FACTOR  # forward + backward


def allowed_tuples(n: int, causal: bool = False, window=None) -> float:
    """Allowed `(i, a, b)` triples of order-3 self-attention of length `n` (docs/math.md §2):
    `n³` unmasked, `Σ_i i²` causal, `Σ_i min(i, w1)·min(i, w2)` with a window (causal)."""
    if not causal and window is None:
        return float(n) ** 3
    i = np.arange(1, n + 1, dtype=np.float64)
    w1, w2 = window if window is not None else (n, n)
    return float(np.sum(np.minimum(i, w1) * np.minimum(i, w2)))


def exact_flops(
    n: int,
    head_dim: int,
    *,
    value_dim: int | None = None,
    causal: bool = False,
    window=None,
    heads: int = 1,
    grad: bool = False,
) -> float:
    """Exact order-3 FLOPs: `2·tuples·(H + Hv)` forward (`4·tuples·H` at `Hv = H`), ×3.5 with
    the gradient (docs/math.md §3.4)."""
    value_dim = head_dim if value_dim is None else value_dim
    flops = 2.0 * allowed_tuples(n, causal, window) * (head_dim + value_dim) * heads
    return flops * (GRAD_FACTOR if grad else 1.0)


def feature_rank(head_dim: int, degree: int) -> int:
    """Rank `r = C(H+g, g)` of the polynomial features (docs/math.md §4.3); H=16, g=4: 4845."""
    if head_dim < 1 or degree < 0:
        raise ValueError(
            f"feature_rank needs head_dim >= 1 and degree >= 0, got {head_dim}, {degree}"
        )
    return math.comb(head_dim + degree, degree)


def polynomial_flops(
    n: int,
    head_dim: int,
    degree: int,
    *,
    value_dim: int | None = None,
    order: int = 3,
    heads: int = 1,
    grad: bool = False,
) -> float:
    """Polynomial-method FLOPs of self-attention of length `n`: the factorised forward
    `2·r·(Hv+1)·t·n` (docs/math.md §4.4), plus `2·r·(Hv+1)·(H+1)·(2t−1)·n` for the gradient
    (docs/math.md §5: the forward's cost times `H+1`). Feature construction is not counted."""
    value_dim = head_dim if value_dim is None else value_dim
    r = feature_rank(head_dim, degree)
    flops = 2.0 * r * (value_dim + 1) * order * n
    if grad:
        flops += 2.0 * r * (value_dim + 1) * (head_dim + 1) * (2 * order - 1) * n
    return flops * heads


def cost_ratio(n: int, head_dim: int, degree: int, order: int = 3) -> float:
    """Polynomial / exact forward cost of order-`t` attention of length `n` at `Hv = H = d`:
    `2·r·(d+1)·t·n / (4·n^t·d)` (docs/math.md §3.4, §4.4). Below 1 the polynomial method is
    cheaper."""
    r = feature_rank(head_dim, degree)
    return (2.0 * r * (head_dim + 1) * order * n) / (4.0 * float(n) ** order * head_dim)


def crossover_length(head_dim: int, degree: int, order: int = 3) -> float:
    """The length `n` where `cost_ratio` reaches 1: `(r·(d+1)·t / (2d))^(1/(t−1))`; longer
    sequences are cheaper with the polynomial method."""
    if order < 2:
        raise ValueError(f"crossover_length needs order >= 2, got {order}")
    r = feature_rank(head_dim, degree)
    return (r * (head_dim + 1) * order / (2.0 * head_dim)) ** (1.0 / (order - 1))
